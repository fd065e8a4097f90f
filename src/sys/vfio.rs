//! The VFIO ioctls, typed. Structures come from `vfio-bindings`; request numbers are the
//! uapi's `_IO(VFIO_TYPE, VFIO_BASE + n)`, which bindgen cannot express.

use std::ffi::CString;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vfio_bindings::bindings::vfio::*;

use super::{Errno, SysResult, ioctl_ptr, ioctl_val};

const fn vfio_io(n: u32) -> u64 {
    ((VFIO_TYPE as u64) << 8) | (VFIO_BASE + n) as u64
}

const GET_API_VERSION: u64 = vfio_io(0);
const CHECK_EXTENSION: u64 = vfio_io(1);
const SET_IOMMU: u64 = vfio_io(2);
const GROUP_GET_STATUS: u64 = vfio_io(3);
const GROUP_SET_CONTAINER: u64 = vfio_io(4);
const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const DEVICE_GET_INFO: u64 = vfio_io(7);
const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const DEVICE_GET_IRQ_INFO: u64 = vfio_io(9);
const DEVICE_SET_IRQS: u64 = vfio_io(10);
const DEVICE_RESET: u64 = vfio_io(11);
const IOMMU_GET_INFO: u64 = vfio_io(12);
const IOMMU_MAP_DMA: u64 = vfio_io(13);
const IOMMU_UNMAP_DMA: u64 = vfio_io(14);
const DEVICE_GET_PCI_HOT_RESET_INFO: u64 = vfio_io(12);
const DEVICE_PCI_HOT_RESET: u64 = vfio_io(13);
const DEVICE_FEATURE: u64 = vfio_io(17);

fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

pub(crate) fn api_version(container: BorrowedFd) -> SysResult<i32> {
    ioctl_val(container, GET_API_VERSION, 0)
}

pub(crate) fn check_extension(container: BorrowedFd, ext: u32) -> SysResult<bool> {
    Ok(ioctl_val(container, CHECK_EXTENSION, ext.into())? > 0)
}

pub(crate) fn set_iommu(container: BorrowedFd, kind: u32) -> SysResult<()> {
    ioctl_val(container, SET_IOMMU, kind.into()).map(drop)
}

pub(crate) fn group_flags(group: BorrowedFd) -> SysResult<u32> {
    let mut status = vfio_group_status { argsz: argsz::<vfio_group_status>(), flags: 0 };
    // SAFETY: GET_STATUS writes one vfio_group_status.
    unsafe { ioctl_ptr(group, GROUP_GET_STATUS, &mut status)? };
    Ok(status.flags)
}

pub(crate) fn group_set_container(group: BorrowedFd, container: BorrowedFd) -> SysResult<()> {
    let mut fd: i32 = std::os::fd::AsRawFd::as_raw_fd(&container);
    // SAFETY: SET_CONTAINER reads one int.
    unsafe { ioctl_ptr(group, GROUP_SET_CONTAINER, &mut fd) }.map(drop)
}

pub(crate) fn group_device_fd(group: BorrowedFd, name: &str) -> SysResult<OwnedFd> {
    let cname = CString::new(name).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: GET_DEVICE_FD reads a NUL-terminated string.
    let fd = unsafe { ioctl_ptr(group, GROUP_GET_DEVICE_FD, cname.as_ptr().cast_mut()) }?;
    // SAFETY: the kernel just created this fd for us (with O_CLOEXEC).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn device_info(device: BorrowedFd) -> SysResult<vfio_device_info> {
    let mut info = vfio_device_info { argsz: argsz::<vfio_device_info>(), ..Default::default() };
    // SAFETY: GET_INFO writes at most argsz bytes.
    unsafe { ioctl_ptr(device, DEVICE_GET_INFO, &mut info)? };
    Ok(info)
}

/// Calls a GET_INFO-style ioctl whose reply may carry a capability chain, growing `buf` to the
/// `argsz` the kernel asks for. Returns the whole reply, header first, in `buf`.
///
/// `head` is the fixed header with `argsz` as its first u32 (every VFIO info struct starts so).
/// `buf` is scratch a caller may reuse: it keeps its largest size, so the regions of a device
/// share one allocation and a chain costs a second call only when it is longer than any
/// before (the kernel leaves a larger `argsz` as it was).
fn info_with_caps<'a, T: Copy>(
    fd: BorrowedFd,
    request: u64,
    head: T,
    buf: &'a mut Vec<u64>,
) -> SysResult<&'a [u8]> {
    // u64 storage keeps the buffer aligned for the header's 64-bit fields.
    let mut words = buf.len().max(size_of::<T>().div_ceil(8));
    // Two rounds suffice: the kernel's second answer fits what its first asked for. A third
    // guards against a chain that grew in between.
    for _ in 0..3 {
        buf.clear();
        buf.resize(words, 0);
        let want = 8 * words;
        let bytes = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: buf holds want >= size_of::<T>() bytes and is 8-aligned; T is plain data;
        // argsz (the first u32) says want, and the kernel writes at most that much.
        let asked = unsafe {
            std::ptr::write(bytes.cast::<T>(), head);
            bytes.cast::<u32>().write(want as u32);
            ioctl_ptr(fd, request, bytes)?;
            bytes.cast::<u32>().read()
        } as usize;
        if asked <= want {
            // SAFETY: buf is want bytes long and initialized.
            return Ok(unsafe { std::slice::from_raw_parts(bytes, want) });
        }
        words = asked.div_ceil(8);
    }
    Err(Errno(libc::EAGAIN))
}

/// The region's info with its capability chain (if any) as raw bytes, in `buf` (see
/// [`info_with_caps`]).
pub(crate) fn region_info<'a>(
    device: BorrowedFd,
    index: u32,
    buf: &'a mut Vec<u64>,
) -> SysResult<&'a [u8]> {
    let head = vfio_region_info { index, ..Default::default() };
    info_with_caps(device, DEVICE_GET_REGION_INFO, head, buf)
}

pub(crate) fn irq_info(device: BorrowedFd, index: u32) -> SysResult<vfio_irq_info> {
    let mut info = vfio_irq_info { argsz: argsz::<vfio_irq_info>(), index, ..Default::default() };
    // SAFETY: GET_IRQ_INFO writes one vfio_irq_info.
    unsafe { ioctl_ptr(device, DEVICE_GET_IRQ_INFO, &mut info)? };
    Ok(info)
}

/// SET_IRQS with an already encoded `vfio_irq_set` (header + data).
#[inline]
pub(crate) fn set_irqs(device: BorrowedFd, encoded: &mut [u8]) -> SysResult<()> {
    // SAFETY: encoded starts with a vfio_irq_set whose argsz equals encoded.len().
    unsafe { ioctl_ptr(device, DEVICE_SET_IRQS, encoded.as_mut_ptr()) }.map(drop)
}

/// VFIO_DEVICE_GET_PCI_HOT_RESET_INFO's whole reply: the header (argsz, flags, count), then
/// each affected device. A buffer too small for them is ENOSPC with the count filled in.
pub(crate) fn hot_reset_info(device: BorrowedFd) -> SysResult<Vec<u8>> {
    let mut count = 0;
    // Three rounds: the set could grow between the count and the read (a hotplug).
    for _ in 0..3 {
        let mut buf = vec![0u32; 3 + 2 * count];
        buf[0] = 4 * buf.len() as u32;
        // SAFETY: buf holds argsz bytes: the header and `count` 8-byte entries.
        match unsafe { ioctl_ptr(device, DEVICE_GET_PCI_HOT_RESET_INFO, buf.as_mut_ptr()) } {
            Ok(_) => return Ok(buf.iter().flat_map(|w| w.to_ne_bytes()).collect()),
            Err(Errno(libc::ENOSPC)) => count = buf[2] as usize,
            Err(e) => return Err(e),
        }
    }
    Err(Errno(libc::EAGAIN))
}

/// VFIO_DEVICE_PCI_HOT_RESET with the fds of the groups holding every affected device (type1),
/// or none: a cdev's zero-length form, the kernel checking the iommufd's ownership itself.
pub(crate) fn hot_reset(device: BorrowedFd, group_fds: &[RawFd]) -> SysResult<()> {
    let mut buf = vec![4 * (3 + group_fds.len() as u32), 0, group_fds.len() as u32];
    buf.extend(group_fds.iter().map(|&fd| fd as u32));
    // SAFETY: buf is a vfio_pci_hot_reset of argsz bytes.
    unsafe { ioctl_ptr(device, DEVICE_PCI_HOT_RESET, buf.as_mut_ptr()) }.map(drop)
}

pub(crate) fn device_reset(device: BorrowedFd) -> SysResult<()> {
    ioctl_val(device, DEVICE_RESET, 0).map(drop)
}

/// The type1 container's info with its capability chain (IOVA ranges) as raw bytes, in `buf`.
pub(crate) fn iommu_info<'a>(container: BorrowedFd, buf: &'a mut Vec<u64>) -> SysResult<&'a [u8]> {
    info_with_caps(container, IOMMU_GET_INFO, vfio_iommu_type1_info::default(), buf)
}

/// # Safety
/// `vaddr..vaddr+size` must stay mapped and unaliased by Rust references that assume no
/// concurrent writes for as long as the DMA mapping exists.
pub(crate) unsafe fn dma_map(
    container: BorrowedFd,
    vaddr: u64,
    size: u64,
    iova: u64,
    writable: bool,
) -> SysResult<()> {
    let write = if writable { VFIO_DMA_MAP_FLAG_WRITE } else { 0 };
    let mut map = vfio_iommu_type1_dma_map {
        argsz: argsz::<vfio_iommu_type1_dma_map>(),
        flags: VFIO_DMA_MAP_FLAG_READ | write,
        vaddr,
        iova,
        size,
    };
    // SAFETY: MAP_DMA reads one vfio_iommu_type1_dma_map; the memory contract is the caller's.
    unsafe { ioctl_ptr(container, IOMMU_MAP_DMA, &mut map) }.map(drop)
}

/// Returns the number of bytes the kernel unmapped. `all` unmaps every mapping (iova and size
/// must then be 0).
pub(crate) fn dma_unmap(container: BorrowedFd, iova: u64, size: u64, all: bool) -> SysResult<u64> {
    let mut unmap = vfio_iommu_type1_dma_unmap {
        argsz: argsz::<vfio_iommu_type1_dma_unmap>(),
        flags: if all { VFIO_DMA_UNMAP_FLAG_ALL } else { 0 },
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: UNMAP_DMA reads and writes back one vfio_iommu_type1_dma_unmap (no bitmap flag).
    unsafe { ioctl_ptr(container, IOMMU_UNMAP_DMA, &mut unmap)? };
    Ok(unmap.size)
}

/// VFIO_DEVICE_FEATURE_DMA_BUF (GET): a dma-buf of `len` bytes of region `region` from
/// `offset`, for another device's DMA (peer-to-peer), where vfio-pci exports BARs so.
pub(crate) fn region_dma_buf(
    device: BorrowedFd,
    region: u32,
    offset: u64,
    len: u64,
) -> SysResult<OwnedFd> {
    const DMA_BUF: u32 = 11;
    // struct vfio_device_feature_dma_buf with one struct vfio_region_dma_range.
    let mut payload = [0u8; 32];
    let open_flags = (libc::O_RDWR | libc::O_CLOEXEC) as u32;
    for (at, word) in [(0, region), (4, open_flags), (8, 0), (12, 1)] {
        payload[at..at + 4].copy_from_slice(&word.to_ne_bytes());
    }
    payload[16..24].copy_from_slice(&offset.to_ne_bytes());
    payload[24..32].copy_from_slice(&len.to_ne_bytes());
    let fd = device_feature(device, VFIO_DEVICE_FEATURE_GET | DMA_BUF, &mut payload)?;
    // SAFETY: the feature returned a new fd, now ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// VFIO_IOMMU_UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR: the kernel forgets the process
/// address of the mapping at exactly `[iova, iova+size)` and keeps the IOMMU mapping and its
/// pinned pages (live handover: the next owner gives its address with [`dma_map_vaddr`]).
pub(crate) fn dma_unmap_vaddr(container: BorrowedFd, iova: u64, size: u64) -> SysResult<()> {
    let mut unmap = vfio_iommu_type1_dma_unmap {
        argsz: argsz::<vfio_iommu_type1_dma_unmap>(),
        flags: VFIO_DMA_UNMAP_FLAG_VADDR,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: UNMAP_DMA reads and writes back one vfio_iommu_type1_dma_unmap (no bitmap flag).
    unsafe { ioctl_ptr(container, IOMMU_UNMAP_DMA, &mut unmap) }.map(drop)
}

/// VFIO_IOMMU_MAP_DMA with VFIO_DMA_MAP_FLAG_VADDR: `vaddr` is the new process address of the
/// mapping at exactly `[iova, iova+size)`, whose address [`dma_unmap_vaddr`] took away.
///
/// # Safety
/// `vaddr..vaddr+size` must map the very pages the mapping pinned, and stay mapped as for
/// [`dma_map`].
pub(crate) unsafe fn dma_map_vaddr(
    container: BorrowedFd,
    vaddr: u64,
    size: u64,
    iova: u64,
) -> SysResult<()> {
    let mut map = vfio_iommu_type1_dma_map {
        argsz: argsz::<vfio_iommu_type1_dma_map>(),
        flags: VFIO_DMA_MAP_FLAG_VADDR,
        vaddr,
        iova,
        size,
    };
    // SAFETY: MAP_DMA reads one vfio_iommu_type1_dma_map; the memory contract is the caller's.
    unsafe { ioctl_ptr(container, IOMMU_MAP_DMA, &mut map) }.map(drop)
}

/// VFIO_DEVICE_FEATURE: `flags` is the feature index with its GET/SET/PROBE bits; `data`, the
/// payload after the 8-byte header, goes in and (for GET) comes back. Returns the ioctl's value.
pub(crate) fn device_feature(device: BorrowedFd, flags: u32, data: &mut [u8]) -> SysResult<i32> {
    const HEADER: usize = 8; // struct vfio_device_feature: argsz, flags, then the payload
    let argsz = u32::try_from(HEADER + data.len()).map_err(|_| Errno(libc::E2BIG))?;
    let mut buf = vec![0u8; HEADER + data.len()];
    buf[..4].copy_from_slice(&argsz.to_ne_bytes());
    buf[4..HEADER].copy_from_slice(&flags.to_ne_bytes());
    buf[HEADER..].copy_from_slice(data);
    // SAFETY: the kernel reads and writes at most argsz bytes, all of them in buf.
    let value = unsafe { ioctl_ptr(device, DEVICE_FEATURE, buf.as_mut_ptr()) }?;
    data.copy_from_slice(&buf[HEADER..]);
    Ok(value)
}

/// VFIO_DEVICE_FEATURE_PCI_VF_TOKEN (SET): the VF token of a PF bound to vfio-pci, which its
/// VFs' users must present. The kernel has no GET (it would leak a previous user's token), and
/// says ENOTTY for a device that is not an SR-IOV PF.
pub(crate) fn set_vf_token(device: BorrowedFd, uuid: &[u8; 16]) -> SysResult<()> {
    let mut payload = *uuid;
    let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PCI_VF_TOKEN;
    device_feature(device, flags, &mut payload).map(drop)
}
