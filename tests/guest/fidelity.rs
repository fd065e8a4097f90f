//! errno fidelity: where vfiokit refuses a DMA map or unmap before the kernel sees it, it
//! answers with the kernel's errno for the same mistake. Each mistake is made through vfiokit
//! and with raw ioctls on the same kernel object (the context's container or IOAS), on every
//! v2 kind the guest's kernel offers, and the answers compared.

use std::os::fd::AsRawFd;

use vfiokit::{Iommu, IommuKind};

use crate::common::*;

const PAGE: u64 = 4096;

/// The raw DMA ioctls on a context's own container or IOAS.
struct Raw {
    fd: i32,
    ioas: Option<u32>,
}

fn errno_of(rc: i32) -> i32 {
    if rc == 0 { 0 } else { std::io::Error::last_os_error().raw_os_error().unwrap_or(0) }
}

impl Raw {
    /// Maps `len` bytes at `va` at `iova` (read/write); the errno, 0 on success.
    fn map(&self, va: u64, iova: u64, len: u64) -> i32 {
        match self.ioas {
            // IOMMU_IOAS_MAP: size, flags (FIXED_IOVA | WRITEABLE | READABLE), ioas, 0, va, length, iova
            Some(id) => {
                let mut map = [0u8; 40];
                map[0..4].copy_from_slice(&40u32.to_ne_bytes());
                map[4..8].copy_from_slice(&7u32.to_ne_bytes());
                map[8..12].copy_from_slice(&id.to_ne_bytes());
                map[16..24].copy_from_slice(&va.to_ne_bytes());
                map[24..32].copy_from_slice(&len.to_ne_bytes());
                map[32..40].copy_from_slice(&iova.to_ne_bytes());
                // SAFETY: a struct iommu_ioas_map of the size given in it.
                errno_of(unsafe { libc::ioctl(self.fd, 0x3b85 as _, map.as_mut_ptr()) })
            }
            // VFIO_IOMMU_MAP_DMA: argsz, flags (READ | WRITE), vaddr, iova, size
            None => {
                let mut map = [0u8; 32];
                map[0..4].copy_from_slice(&32u32.to_ne_bytes());
                map[4..8].copy_from_slice(&3u32.to_ne_bytes());
                map[8..16].copy_from_slice(&va.to_ne_bytes());
                map[16..24].copy_from_slice(&iova.to_ne_bytes());
                map[24..32].copy_from_slice(&len.to_ne_bytes());
                // SAFETY: a struct vfio_iommu_type1_dma_map of its argsz.
                errno_of(unsafe { libc::ioctl(self.fd, 0x3b71 as _, map.as_mut_ptr()) })
            }
        }
    }

    /// Unmaps `[iova, iova+len)`: the errno (0 on success) and the bytes the kernel unmapped.
    fn unmap(&self, iova: u64, len: u64) -> (i32, u64) {
        match self.ioas {
            // IOMMU_IOAS_UNMAP: size, ioas, iova, length (written back: the bytes unmapped)
            Some(id) => {
                let mut unmap = [0u8; 24];
                unmap[0..4].copy_from_slice(&24u32.to_ne_bytes());
                unmap[4..8].copy_from_slice(&id.to_ne_bytes());
                unmap[8..16].copy_from_slice(&iova.to_ne_bytes());
                unmap[16..24].copy_from_slice(&len.to_ne_bytes());
                // SAFETY: a struct iommu_ioas_unmap of the size given in it.
                let e = errno_of(unsafe { libc::ioctl(self.fd, 0x3b86 as _, unmap.as_mut_ptr()) });
                (e, if e == 0 { u64::from_ne_bytes(unmap[16..24].try_into().unwrap()) } else { 0 })
            }
            None => {
                let (rc, errno, bytes) = raw_type1_unmap(self.fd, iova, len);
                if rc == 0 { (0, bytes) } else { (errno, 0) }
            }
        }
    }
}

fn strerror(e: i32) -> String {
    format!("{} ({e})", std::io::Error::from_raw_os_error(e))
}

pub fn dma_errors_are_the_kernels() {
    let mut kinds = vec![IommuKind::auto().unwrap()];
    if std::path::Path::new("/dev/iommu").exists() {
        kinds.push(IommuKind::IommufdCompat);
    }
    for kind in kinds {
        let iommu = Iommu::open(kind).unwrap();
        let _edu = open_in("EDU", &iommu);
        one_kind(&iommu);
    }
}

fn one_kind(iommu: &Iommu) {
    let kind = iommu.kind();
    let (buf, iova) = iommu.alloc(4 * PAGE as usize).unwrap();
    let va = buf.as_ptr() as u64;
    let raw = Raw { fd: iommu.fd().unwrap().as_raw_fd(), ioas: iommu.ioas_id() };
    let ours_map = |va: u64, at: u64, len: u64| {
        // SAFETY: our buffer (or an address no map here succeeds with), mapped for the test.
        rc(unsafe { iommu.map(va as *mut u8, len as usize, at) })
    };
    // Free IOVAs for the raw maps and for vfiokit's (on type1 one container holds both).
    let (free, ours_at, at) = (0x4000_0000u64, 0x5000_0000u64, 0x6000_0000u64);
    assert_eq!(raw.map(va, free, 2 * PAGE), 0, "{kind:?}: the raw map works");
    assert_eq!(ours_map(va, ours_at, 2 * PAGE), 0, "{kind:?}: vfiokit's map works");
    // A raw map that should fail; one the kernel takes is undone at once (and fails the case).
    let raw_map = |va: u64, at: u64, len: u64| match raw.map(va, at, len) {
        0 => {
            raw.unmap(at, len);
            0
        }
        e => e,
    };
    let wrap = u64::MAX - PAGE + 1;
    // (mistake, vfiokit's errno, the kernel's), each leaving both mappings as they were.
    let mut cases: Vec<(&str, i32, i32)> = vec![
        ("map: range past 2^64", ours_map(va, wrap, 2 * PAGE), raw_map(va, wrap, 2 * PAGE)),
        ("map: overlap", ours_map(va, iova, PAGE), raw_map(va, free, PAGE)),
        ("map: misaligned IOVA", ours_map(va, at + 1, PAGE), raw_map(va, at + 1, PAGE)),
        ("map: misaligned address", ours_map(va + 1, at, PAGE), raw_map(va + 1, at, PAGE)),
        ("map: length not whole pages", ours_map(va, at, PAGE + 1), raw_map(va, at, PAGE + 1)),
        ("map: zero length", ours_map(va, at, 0), raw_map(va, at, 0)),
        ("map: null address", ours_map(0, at, PAGE), raw_map(0, at, PAGE)),
        ("map: reserved IOVA", ours_map(va, 0xfee0_0000, PAGE), raw_map(va, 0xfee0_0000, PAGE)),
        ("map: beyond the IOVA space", ours_map(va, 1 << 62, PAGE), raw_map(va, 1 << 62, PAGE)),
    ];
    let unmap_cases = [
        ("unmap: zero length", ours_at, 0, free),
        ("unmap: range past 2^64", wrap, 2 * PAGE, wrap),
        ("unmap: misaligned IOVA", ours_at + 1, PAGE, free + 1),
        ("unmap: cutting the mapping's first page off", ours_at, PAGE, free),
        ("unmap: cutting its last page off", ours_at + PAGE, PAGE, free + PAGE),
        ("unmap: from inside it past its end", ours_at + PAGE, 4 * PAGE, free + PAGE),
    ];
    for (what, ours, len, theirs) in unmap_cases {
        cases.push((what, rc(iommu.unmap(ours, len as usize)), raw.unmap(theirs, len).0));
    }
    let report: Vec<String> = cases
        .iter()
        .map(|(what, v, k)| {
            format!("{kind:?} {what}: vfiokit {}, kernel {}", strerror(*v), strerror(*k))
        })
        .collect();
    eprintln!("{}", report.join("\n"));
    for (what, vfiokit, kernel) in &cases {
        assert_ne!(*kernel, 0, "{kind:?} {what}: the kernel took it");
        assert_eq!(strerror(*vfiokit), strerror(*kernel), "{kind:?} {what}");
    }
    // An unmap of a range with no mapping in it: an IOAS refuses it, a container (type1, or
    // iommufd's compatibility one) answers 0 bytes. vfiokit refuses it on every kind (ENOENT):
    // 0 bytes is a mistake a driver should hear of.
    let empty = free + 0x20_0000;
    let (kernel, bytes) = raw.unmap(empty, PAGE);
    match kind {
        IommuKind::Iommufd => assert_eq!(kernel, libc::ENOENT, "{kind:?}"),
        _ => assert_eq!((kernel, bytes), (0, 0), "{kind:?}: a container's empty unmap"),
    }
    assert_eq!(rc(iommu.unmap(empty, PAGE as usize)), libc::ENOENT, "{kind:?}");
    // A range holding the whole mapping and more takes it whole, and says how much.
    assert_eq!(raw.unmap(free - PAGE, 4 * PAGE), (0, 2 * PAGE), "{kind:?}: the kernel's count");
    assert_eq!(iommu.unmap(ours_at - PAGE, 4 * PAGE as usize).unwrap(), 2 * PAGE, "{kind:?}");
    iommu.free(buf.as_ptr()).unwrap();
}

/// The same for region accesses and IRQ set-up: each mistake through vfiokit and as a raw
/// pread or VFIO_DEVICE_SET_IRQS on the device fd.
pub fn region_and_irq_errors_are_the_kernels() {
    use vfiokit::irq::IRQ_MSI;
    let iommu = Iommu::open_auto().unwrap();
    let d = open_in("EDU", &iommu);
    let fd = d.fd().unwrap().as_raw_fd();
    let bar0_end = d.regions()[0].size;
    // The errno of a pread of `len` bytes at `off` in region `index`; -1 for a short read.
    let raw_read = |index: u64, off: u64, len: usize| {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into our buffer.
        let n =
            unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, ((index << 40) + off) as i64) };
        match n {
            n if n < 0 => errno_of(-1),
            n if n as usize == len => 0,
            _ => -1,
        }
    };
    let raw_set_irqs = |index: u32, start: u32, count: u32| {
        // struct vfio_irq_set: argsz, flags (DATA_NONE | ACTION_TRIGGER), index, start, count
        let set: Vec<u8> = [20u32, 1 | (1 << 5), index, start, count]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        // SAFETY: a vfio_irq_set of its argsz, with no data.
        errno_of(unsafe { libc::ioctl(fd, 0x3b6e as _, set.as_ptr()) })
    };
    let cases = [
        ("read: no region 9", rc(d.read_reg::<u32>(9, 0)), raw_read(9, 0, 4)),
        ("read: at BAR0's end", rc(d.read_reg::<u32>(0, bar0_end)), raw_read(0, bar0_end, 4)),
        ("read: far past BAR0", rc(d.read_reg::<u32>(0, 1 << 39)), raw_read(0, 1 << 39, 4)),
        ("IRQ: no index 9", rc(d.irq_enable(9, 0, 1)), raw_set_irqs(9, 0, 1)),
        ("IRQ: two vectors of MSI's one", rc(d.irq_enable(IRQ_MSI, 0, 2)), raw_set_irqs(1, 0, 2)),
        ("IRQ: vector 1 of MSI's one", rc(d.irq_enable(IRQ_MSI, 1, 1)), raw_set_irqs(1, 1, 1)),
    ];
    for (what, vfiokit, kernel) in cases {
        eprintln!("{what}: vfiokit {}, kernel {}", strerror(vfiokit), strerror(kernel));
        assert!(kernel > 0, "{what}: the kernel took it");
        assert_eq!(strerror(vfiokit), strerror(kernel), "{what}");
    }
    // A read straddling BAR0's end: the kernel reads what is there (a short count); vfiokit's
    // accessors are exactly their width, so it refuses.
    assert_eq!(raw_read(0, bar0_end - 2, 4), -1, "the kernel's short read");
    assert_eq!(rc(d.read_reg::<u32>(0, bar0_end - 2)), libc::EINVAL);
}
