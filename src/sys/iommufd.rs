//! The iommufd ioctls (/dev/iommu) and binding a VFIO device cdev to it. Structures come from
//! `iommufd-bindings` and `vfio-bindings`; request numbers are `_IO(';', n)`.

use std::os::fd::{AsRawFd, BorrowedFd};

use iommufd_bindings as k;
use vfio_bindings::bindings::vfio as v;

use super::{Errno, SysResult, ioctl_ptr};

const fn io(n: u32) -> u64 {
    ((k::IOMMUFD_TYPE as u64) << 8) | n as u64
}

const IOAS_ALLOC: u64 = io(k::IOMMUFD_CMD_IOAS_ALLOC);
const IOAS_IOVA_RANGES: u64 = io(k::IOMMUFD_CMD_IOAS_IOVA_RANGES);
const IOAS_MAP: u64 = io(k::IOMMUFD_CMD_IOAS_MAP);
const IOAS_UNMAP: u64 = io(k::IOMMUFD_CMD_IOAS_UNMAP);
const IOAS_MAP_FILE: u64 = io(k::IOMMUFD_CMD_IOAS_MAP_FILE);
const IOAS_CHANGE_PROCESS: u64 = io(k::IOMMUFD_CMD_IOAS_CHANGE_PROCESS);
const DEVICE_BIND_IOMMUFD: u64 = ((v::VFIO_TYPE as u64) << 8) | (v::VFIO_BASE + 18) as u64;
const DEVICE_ATTACH_IOMMUFD_PT: u64 = ((v::VFIO_TYPE as u64) << 8) | (v::VFIO_BASE + 19) as u64;

fn size<T>() -> u32 {
    size_of::<T>() as u32
}

/// Allocates an IOAS (an I/O address space) and returns its id.
pub(crate) fn ioas_alloc(iommufd: BorrowedFd) -> SysResult<u32> {
    let mut arg =
        k::iommu_ioas_alloc { size: size::<k::iommu_ioas_alloc>(), flags: 0, out_ioas_id: 0 };
    // SAFETY: IOAS_ALLOC reads and writes one iommu_ioas_alloc.
    unsafe { ioctl_ptr(iommufd, IOAS_ALLOC, &mut arg)? };
    Ok(arg.out_ioas_id)
}

/// The IOAS's usable IOVA ranges as inclusive (start, last) pairs.
pub(crate) fn ioas_iova_ranges(iommufd: BorrowedFd, ioas: u32) -> SysResult<Vec<(u64, u64)>> {
    // Room for the usual few ranges, so one call does; the kernel says how many there are
    // (EMSGSIZE) when the array is too small, and the count can change between calls as
    // devices attach, hence the loop.
    let mut ranges = vec![k::iommu_iova_range::default(); 8];
    for _ in 0..4 {
        let mut arg = k::iommu_ioas_iova_ranges {
            size: size::<k::iommu_ioas_iova_ranges>(),
            ioas_id: ioas,
            num_iovas: ranges.len() as u32,
            allowed_iovas: ranges.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: allowed_iovas points at num_iovas writable records.
        match unsafe { ioctl_ptr(iommufd, IOAS_IOVA_RANGES, &mut arg) } {
            Ok(_) => {
                ranges.truncate(arg.num_iovas as usize);
                return Ok(ranges.iter().map(|r| (r.start, r.last)).collect());
            }
            Err(Errno(libc::EMSGSIZE)) => {
                ranges = vec![k::iommu_iova_range::default(); arg.num_iovas as usize]
            }
            Err(e) => return Err(e),
        }
    }
    Err(Errno(libc::EAGAIN))
}

/// # Safety
/// `vaddr..vaddr+length` must stay mapped, and unaliased by references that assume no
/// concurrent writes, for as long as the mapping exists.
pub(crate) unsafe fn ioas_map(
    iommufd: BorrowedFd,
    ioas: u32,
    vaddr: u64,
    length: u64,
    iova: u64,
    writable: bool,
) -> SysResult<()> {
    let write = if writable { k::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE } else { 0 };
    let mut arg = k::iommu_ioas_map {
        size: size::<k::iommu_ioas_map>(),
        flags: k::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
            | k::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
            | write,
        ioas_id: ioas,
        user_va: vaddr,
        length,
        iova,
        ..Default::default()
    };
    // SAFETY: IOAS_MAP reads one iommu_ioas_map; the memory contract is the caller's.
    unsafe { ioctl_ptr(iommufd, IOAS_MAP, &mut arg) }.map(drop)
}

/// IOAS_MAP_FILE (Linux 6.13+): maps `length` bytes of the file `fd` from `start` at `iova`.
/// The pages are the file's, pinned through it, whatever this process maps; a kernel without
/// the ioctl says ENOTTY.
pub(crate) fn ioas_map_file(
    iommufd: BorrowedFd,
    ioas: u32,
    fd: i32,
    start: u64,
    length: u64,
    iova: u64,
    writable: bool,
) -> SysResult<()> {
    let write = if writable { k::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE } else { 0 };
    let mut arg = k::iommu_ioas_map_file {
        size: size::<k::iommu_ioas_map_file>(),
        flags: k::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
            | k::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
            | write,
        ioas_id: ioas,
        fd,
        start,
        length,
        iova,
    };
    // SAFETY: IOAS_MAP_FILE reads one iommu_ioas_map_file; no memory of ours is mapped.
    unsafe { ioctl_ptr(iommufd, IOAS_MAP_FILE, &mut arg) }.map(drop)
}

/// IOAS_CHANGE_PROCESS (Linux 6.13+): the pages pinned for every mapping of every IOAS of the
/// iommufd are charged to this process from now on (a live handover's receiver). All or
/// nothing; EINVAL while a mapping is not of a file (IOAS_MAP_FILE).
pub(crate) fn ioas_change_process(iommufd: BorrowedFd) -> SysResult<()> {
    let mut arg = k::iommu_ioas_change_process {
        size: size::<k::iommu_ioas_change_process>(),
        __reserved: 0,
    };
    // SAFETY: IOAS_CHANGE_PROCESS reads one iommu_ioas_change_process.
    unsafe { ioctl_ptr(iommufd, IOAS_CHANGE_PROCESS, &mut arg) }.map(drop)
}

/// Returns the number of bytes unmapped; iova 0 with length `u64::MAX` unmaps everything.
pub(crate) fn ioas_unmap(iommufd: BorrowedFd, ioas: u32, iova: u64, length: u64) -> SysResult<u64> {
    let mut arg =
        k::iommu_ioas_unmap { size: size::<k::iommu_ioas_unmap>(), ioas_id: ioas, iova, length };
    // SAFETY: IOAS_UNMAP reads and writes back one iommu_ioas_unmap.
    unsafe { ioctl_ptr(iommufd, IOAS_UNMAP, &mut arg)? };
    Ok(arg.length)
}

// The bind with its Linux 6.17 fields (flags' TOKEN, token_uuid_ptr), as vfio-bindings has it.
const _: () = assert!(
    size_of::<v::vfio_device_bind_iommufd>() == 24
        && std::mem::offset_of!(v::vfio_device_bind_iommufd, flags) == 4
        && std::mem::offset_of!(v::vfio_device_bind_iommufd, token_uuid_ptr) == 16
        && v::VFIO_DEVICE_BIND_FLAG_TOKEN == 1
);

/// Binds an opened VFIO device cdev to the iommufd (after which the device fd works), with
/// `token` (a VF's, or a PF's with VFs in use) under VFIO_DEVICE_BIND_FLAG_TOKEN: Linux 6.17+;
/// an older kernel refuses the flag with EINVAL.
pub(crate) fn bind(
    device: BorrowedFd,
    iommufd: BorrowedFd,
    token: Option<&[u8; 16]>,
) -> SysResult<()> {
    let mut arg = v::vfio_device_bind_iommufd {
        argsz: size::<v::vfio_device_bind_iommufd>(),
        iommufd: iommufd.as_raw_fd(),
        ..Default::default()
    };
    if let Some(uuid) = token {
        arg.flags = v::VFIO_DEVICE_BIND_FLAG_TOKEN;
        arg.token_uuid_ptr = uuid.as_ptr() as u64;
    }
    // SAFETY: BIND_IOMMUFD reads and writes back one vfio_device_bind_iommufd, and reads the
    // 16 bytes at token_uuid_ptr, which live until it returns.
    unsafe { ioctl_ptr(device, DEVICE_BIND_IOMMUFD, &mut arg) }.map(drop)
}

/// Attaches a bound device to an IOAS: its DMA is translated by the IOAS from now on.
pub(crate) fn attach(device: BorrowedFd, ioas: u32) -> SysResult<()> {
    let mut arg = v::vfio_device_attach_iommufd_pt {
        argsz: size::<v::vfio_device_attach_iommufd_pt>(),
        pt_id: ioas,
        ..Default::default()
    };
    // SAFETY: ATTACH_IOMMUFD_PT reads and writes back one vfio_device_attach_iommufd_pt.
    unsafe { ioctl_ptr(device, DEVICE_ATTACH_IOMMUFD_PT, &mut arg) }.map(drop)
}
