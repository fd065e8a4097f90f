//! The baseline: what a careful hand-written driver does, straight on libc + vfio-bindings +
//! iommufd-bindings (none of vfiokit's code). Errors panic: a broken baseline must fail loudly.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use iommufd_bindings as iofd;
use vfio_bindings::bindings::vfio as k;

const fn vfio_io(n: u32) -> libc::c_ulong {
    ((k::VFIO_TYPE as libc::c_ulong) << 8) | (k::VFIO_BASE + n) as libc::c_ulong
}
const fn iommufd_io(n: u32) -> libc::c_ulong {
    ((iofd::IOMMUFD_TYPE as libc::c_ulong) << 8) | n as libc::c_ulong
}

const GET_API_VERSION: libc::c_ulong = vfio_io(0);
const CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const SET_IOMMU: libc::c_ulong = vfio_io(2);
const GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
const DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const DEVICE_GET_IRQ_INFO: libc::c_ulong = vfio_io(9);
const DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
const IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);
const DEVICE_BIND_IOMMUFD: libc::c_ulong = vfio_io(18);
const DEVICE_ATTACH_IOMMUFD_PT: libc::c_ulong = vfio_io(19);
const IOAS_ALLOC: libc::c_ulong = iommufd_io(iofd::IOMMUFD_CMD_IOAS_ALLOC);
const IOAS_MAP: libc::c_ulong = iommufd_io(iofd::IOMMUFD_CMD_IOAS_MAP);
const IOAS_UNMAP: libc::c_ulong = iommufd_io(iofd::IOMMUFD_CMD_IOAS_UNMAP);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// ioctl that must succeed.
unsafe fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T, what: &str) -> i32 {
    // SAFETY: forwarded.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    assert!(r >= 0, "raw: {what}: {}", std::io::Error::last_os_error());
    r
}

fn open(path: &str) -> OwnedFd {
    let c = CString::new(path).unwrap();
    // SAFETY: valid string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "raw: open {path}: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The IOMMU group number of a PCI device (readlink of its iommu_group).
pub fn group_of(address: &str) -> u32 {
    let link = std::fs::read_link(format!("/sys/bus/pci/devices/{address}/iommu_group"))
        .expect("iommu_group link");
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

/// The VFIO cdev of a PCI device (/dev/vfio/devices/vfioN, from sysfs).
pub fn cdev_of(address: &str) -> String {
    let mut dir = std::fs::read_dir(format!("/sys/bus/pci/devices/{address}/vfio-dev"))
        .expect("vfio-dev directory");
    let name = dir.next().expect("one vfio-dev entry").unwrap().file_name();
    format!("/dev/vfio/devices/{}", name.to_str().unwrap())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    Type1,
    Iommufd,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Type1 => "type1",
            Backend::Iommufd => "iommufd",
        }
    }
}

/// A raw DMA context with one device in it (type1: container + group; iommufd: iommufd + IOAS
/// + bound, attached cdev). Fields drop in order: device, group, then the context fd.
pub struct Ctx {
    pub device: OwnedFd,
    _group: Option<OwnedFd>,
    pub fd: OwnedFd,
    pub ioas: u32,
    pub backend: Backend,
}

impl Ctx {
    pub fn open(backend: Backend, address: &str) -> Ctx {
        match backend {
            Backend::Type1 => {
                let container = open("/dev/vfio/vfio");
                let c = container.as_raw_fd();
                // SAFETY: value ioctls.
                unsafe {
                    assert_eq!(libc::ioctl(c, GET_API_VERSION), k::VFIO_API_VERSION as i32);
                    assert_eq!(
                        libc::ioctl(c, CHECK_EXTENSION, k::VFIO_TYPE1v2_IOMMU as libc::c_ulong),
                        1
                    );
                }
                let group = open(&format!("/dev/vfio/{}", group_of(address)));
                let g = group.as_raw_fd();
                let mut status = k::vfio_group_status {
                    argsz: size_of::<k::vfio_group_status>() as u32,
                    flags: 0,
                };
                // SAFETY: one vfio_group_status.
                unsafe { ioctl(g, GROUP_GET_STATUS, &mut status, "GROUP_GET_STATUS") };
                assert!(status.flags & k::VFIO_GROUP_FLAGS_VIABLE != 0, "raw: group not viable");
                let mut cfd = c;
                // SAFETY: one int.
                unsafe { ioctl(g, GROUP_SET_CONTAINER, &mut cfd, "GROUP_SET_CONTAINER") };
                // SAFETY: value ioctl.
                let r =
                    unsafe { libc::ioctl(c, SET_IOMMU, k::VFIO_TYPE1v2_IOMMU as libc::c_ulong) };
                assert!(r >= 0, "raw: SET_IOMMU: {}", std::io::Error::last_os_error());
                let name = CString::new(address).unwrap();
                // SAFETY: NUL-terminated name.
                let dfd = unsafe {
                    ioctl(g, GROUP_GET_DEVICE_FD, name.as_ptr().cast_mut(), "GROUP_GET_DEVICE_FD")
                };
                // SAFETY: fresh fd.
                let device = unsafe { OwnedFd::from_raw_fd(dfd) };
                Ctx { device, _group: Some(group), fd: container, ioas: 0, backend }
            }
            Backend::Iommufd => {
                let iommufd = open("/dev/iommu");
                let mut alloc = iofd::iommu_ioas_alloc {
                    size: size_of::<iofd::iommu_ioas_alloc>() as u32,
                    flags: 0,
                    out_ioas_id: 0,
                };
                // SAFETY: one iommu_ioas_alloc.
                unsafe { ioctl(iommufd.as_raw_fd(), IOAS_ALLOC, &mut alloc, "IOAS_ALLOC") };
                let device = open(&cdev_of(address));
                let mut bind = k::vfio_device_bind_iommufd {
                    argsz: size_of::<k::vfio_device_bind_iommufd>() as u32,
                    iommufd: iommufd.as_raw_fd(),
                    ..Default::default()
                };
                // SAFETY: one vfio_device_bind_iommufd.
                unsafe {
                    ioctl(device.as_raw_fd(), DEVICE_BIND_IOMMUFD, &mut bind, "BIND_IOMMUFD")
                };
                let mut attach = k::vfio_device_attach_iommufd_pt {
                    argsz: size_of::<k::vfio_device_attach_iommufd_pt>() as u32,
                    pt_id: alloc.out_ioas_id,
                    ..Default::default()
                };
                // SAFETY: one vfio_device_attach_iommufd_pt.
                unsafe {
                    ioctl(
                        device.as_raw_fd(),
                        DEVICE_ATTACH_IOMMUFD_PT,
                        &mut attach,
                        "ATTACH_IOMMUFD_PT",
                    )
                };
                Ctx { device, _group: None, fd: iommufd, ioas: alloc.out_ioas_id, backend }
            }
        }
    }

    /// # Safety
    /// vaddr..vaddr+len stays mapped while the DMA mapping exists.
    pub unsafe fn map(&self, vaddr: *mut u8, len: usize, iova: u64) {
        match self.backend {
            Backend::Type1 => {
                let mut m = k::vfio_iommu_type1_dma_map {
                    argsz: size_of::<k::vfio_iommu_type1_dma_map>() as u32,
                    flags: k::VFIO_DMA_MAP_FLAG_READ | k::VFIO_DMA_MAP_FLAG_WRITE,
                    vaddr: vaddr as u64,
                    iova,
                    size: len as u64,
                };
                // SAFETY: one dma_map; the memory contract is the caller's.
                unsafe { ioctl(self.fd.as_raw_fd(), IOMMU_MAP_DMA, &mut m, "MAP_DMA") };
            }
            Backend::Iommufd => {
                let mut m = iofd::iommu_ioas_map {
                    size: size_of::<iofd::iommu_ioas_map>() as u32,
                    flags: iofd::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
                        | iofd::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
                        | iofd::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
                    ioas_id: self.ioas,
                    __reserved: 0,
                    user_va: vaddr as u64,
                    length: len as u64,
                    iova,
                };
                // SAFETY: one ioas_map; the memory contract is the caller's.
                unsafe { ioctl(self.fd.as_raw_fd(), IOAS_MAP, &mut m, "IOAS_MAP") };
            }
        }
    }

    pub fn unmap(&self, iova: u64, len: usize) {
        match self.backend {
            Backend::Type1 => {
                let mut u = k::vfio_iommu_type1_dma_unmap {
                    argsz: size_of::<k::vfio_iommu_type1_dma_unmap>() as u32,
                    iova,
                    size: len as u64,
                    ..Default::default()
                };
                // SAFETY: one dma_unmap, no bitmap.
                unsafe { ioctl(self.fd.as_raw_fd(), IOMMU_UNMAP_DMA, &mut u, "UNMAP_DMA") };
                assert_eq!(u.size, len as u64, "raw: UNMAP_DMA unmapped a different size");
            }
            Backend::Iommufd => {
                let mut u = iofd::iommu_ioas_unmap {
                    size: size_of::<iofd::iommu_ioas_unmap>() as u32,
                    ioas_id: self.ioas,
                    iova,
                    length: len as u64,
                };
                // SAFETY: one ioas_unmap.
                unsafe { ioctl(self.fd.as_raw_fd(), IOAS_UNMAP, &mut u, "IOAS_UNMAP") };
                assert_eq!(u.length, len as u64, "raw: IOAS_UNMAP unmapped a different size");
            }
        }
    }

    /// dma_alloc's equivalent: fresh anonymous memory, mapped for DMA.
    pub fn alloc(&self, len: usize, iova: u64) -> *mut u8 {
        let p = anonymous(len);
        // SAFETY: fresh memory, unmapped from the IOMMU before it is freed.
        unsafe { self.map(p, len, iova) };
        p
    }

    pub fn free(&self, p: *mut u8, len: usize, iova: u64) {
        self.unmap(iova, len);
        // SAFETY: from alloc, no longer DMA-mapped.
        unsafe { libc::munmap(p.cast(), len) };
    }
}

/// What the raw enumeration learned (kept so the work is not optimized away, and checked).
#[derive(Default, Debug)]
pub struct Enumeration {
    pub num_regions: u32,
    pub num_irqs: u32,
    pub region_sizes: [u64; 16],
    pub region_flags: [u32; 16],
    pub caps: u32,
    pub areas: u32,
    pub irq_counts: [u32; 8],
}

/// GET_INFO, every REGION_INFO (re-probed with the argsz the kernel asks for, its capability
/// chain walked), every IRQ_INFO.
pub fn enumerate(device: RawFd) -> Enumeration {
    let mut e = Enumeration::default();
    let mut info = k::vfio_device_info {
        argsz: size_of::<k::vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: one vfio_device_info.
    unsafe { ioctl(device, DEVICE_GET_INFO, &mut info, "DEVICE_GET_INFO") };
    assert!(info.flags & k::VFIO_DEVICE_FLAGS_PCI != 0);
    e.num_regions = info.num_regions;
    e.num_irqs = info.num_irqs;
    let mut buf = [0u64; 64]; // 512 bytes: enough for any chain vfio-pci reports here
    for i in 0..info.num_regions {
        let head = size_of::<k::vfio_region_info>();
        let mut want = head;
        loop {
            let ri = buf.as_mut_ptr().cast::<k::vfio_region_info>();
            // SAFETY: buf holds at least `want` bytes (checked below) and is 8-aligned.
            unsafe {
                ri.write(k::vfio_region_info { argsz: want as u32, index: i, ..Default::default() })
            };
            // SAFETY: argsz = want bytes are writable.
            if unsafe { libc::ioctl(device, DEVICE_GET_REGION_INFO, ri) } < 0 {
                assert_eq!(errno(), libc::EINVAL, "raw: REGION_INFO {i}");
                break; // nothing at this index (VGA)
            }
            // SAFETY: the kernel filled the header.
            let r = unsafe { ri.read() };
            if r.argsz as usize > want {
                want = r.argsz as usize;
                assert!(want <= size_of_val(&buf), "raw: region info chain of {want} bytes");
                continue;
            }
            if (i as usize) < e.region_sizes.len() {
                e.region_sizes[i as usize] = r.size;
                e.region_flags[i as usize] = r.flags;
            }
            if r.flags & k::VFIO_REGION_INFO_FLAG_CAPS != 0 {
                let bytes = buf.as_ptr().cast::<u8>();
                let mut off = r.cap_offset as usize;
                while off >= head && off + 8 <= want {
                    // SAFETY: inside the reply.
                    let h = unsafe {
                        bytes.add(off).cast::<k::vfio_info_cap_header>().read_unaligned()
                    };
                    e.caps += 1;
                    if h.id as u32 == k::VFIO_REGION_INFO_CAP_SPARSE_MMAP {
                        // SAFETY: inside the reply.
                        e.areas += unsafe { bytes.add(off + 8).cast::<u32>().read_unaligned() };
                    }
                    off = h.next as usize;
                }
            }
            break;
        }
    }
    for i in 0..info.num_irqs {
        let mut irq = k::vfio_irq_info {
            argsz: size_of::<k::vfio_irq_info>() as u32,
            index: i,
            ..Default::default()
        };
        // SAFETY: one vfio_irq_info.
        if unsafe { libc::ioctl(device, DEVICE_GET_IRQ_INFO, &mut irq) } < 0 {
            assert_eq!(errno(), libc::EINVAL, "raw: IRQ_INFO {i}");
            continue; // ERR on a non-PCIe device
        }
        if (i as usize) < e.irq_counts.len() {
            e.irq_counts[i as usize] = irq.count;
        }
    }
    e
}

/// Open from scratch, enumerate, close everything.
#[inline(never)]
pub fn open_enumerate_close(backend: Backend, address: &str) -> Enumeration {
    let ctx = Ctx::open(backend, address);
    enumerate(ctx.device.as_raw_fd())
}

#[repr(C)]
struct IrqSetOne {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: i32,
}

/// Routes vector 0 of `index` to a new (blocking) eventfd.
pub fn irq_enable(device: RawFd, index: u32) -> OwnedFd {
    // SAFETY: plain syscall.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(efd >= 0);
    let mut set = IrqSetOne {
        argsz: size_of::<IrqSetOne>() as u32,
        flags: k::VFIO_IRQ_SET_DATA_EVENTFD | k::VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        start: 0,
        count: 1,
        data: efd,
    };
    // SAFETY: header + one eventfd.
    unsafe { ioctl(device, DEVICE_SET_IRQS, &mut set, "SET_IRQS eventfd") };
    // SAFETY: fresh fd.
    unsafe { OwnedFd::from_raw_fd(efd) }
}

/// SET_IRQS (DATA_NONE | ACTION_TRIGGER) on vector 0, then read(eventfd). Returns the count.
pub fn irq_round_trip(device: RawFd, index: u32, efd: RawFd) -> u64 {
    let mut set = k::vfio_irq_set {
        argsz: size_of::<k::vfio_irq_set>() as u32,
        flags: k::VFIO_IRQ_SET_DATA_NONE | k::VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        start: 0,
        count: 1,
        ..Default::default()
    };
    // SAFETY: header only.
    unsafe { ioctl(device, DEVICE_SET_IRQS, &mut set, "SET_IRQS trigger") };
    let mut count = 0u64;
    // SAFETY: 8 writable bytes.
    let n = unsafe { libc::read(efd, (&raw mut count).cast(), 8) };
    assert_eq!(n, 8, "raw: eventfd read");
    count
}

/// Anonymous memory, touched so that no page fault is left for the DMA map to take.
pub struct Prefaulted {
    pub ptr: *mut u8,
    raw: *mut libc::c_void,
    raw_len: usize,
}

impl Prefaulted {
    /// `len` bytes aligned to `align`.
    pub fn new(len: usize, align: usize) -> Prefaulted {
        let raw_len = len + align;
        let raw = anonymous(raw_len).cast::<libc::c_void>();
        let ptr = (raw as usize).next_multiple_of(align) as *mut u8;
        for off in (0..len).step_by(4096) {
            // SAFETY: inside the mapping.
            unsafe { ptr.add(off).write_volatile(1) };
        }
        Prefaulted { ptr, raw, raw_len }
    }
}

impl Drop for Prefaulted {
    fn drop(&mut self) {
        // SAFETY: ours.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}

/// `len` bytes of fresh private anonymous memory (the caller munmaps it).
pub fn anonymous(len: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "raw: mmap: {}", std::io::Error::last_os_error());
    p.cast()
}
