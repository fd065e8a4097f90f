//! VFIO's no-IOMMU mode: refused with its cause in the guests with an IOMMU, used in the guests
//! without one (`KERNEL:noiommu` in VFIOKIT_VM_KERNELS: only the iommufd kernel has the mode).

use std::path::Path;
use std::ptr::NonNull;

use vfiokit::irq::IRQ_MSI;
use vfiokit::*;

use crate::common::*;

const PAGE: usize = 4096;
const NOIOMMU_PARAM: &str = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";
const CAP_SYS_RAWIO: u32 = 17;
const CAP_SYS_ADMIN: u32 = 21;

fn legacy() -> bool {
    std::env::var("VFIOKIT_VM_KERNEL").as_deref() == Ok("legacy")
}

/// The physical address of the page at `p`, read by the test itself from /proc/self/pagemap.
fn physical(p: *const u8) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut entry = [0u8; 8];
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    pagemap.read_exact_at(&mut entry, (p as u64 / PAGE as u64) * 8).unwrap();
    let entry = u64::from_ne_bytes(entry);
    assert!(entry >> 63 == 1, "page {p:p} is present");
    (entry & ((1 << 55) - 1)) * PAGE as u64 + (p as u64 % PAGE as u64)
}

/// Locked memory of this process (VmLck, kB).
fn locked_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn fresh_page() -> NonNull<u8> {
    // SAFETY: a fresh anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: touched, so it has a frame.
    unsafe { p.cast::<u8>().write_volatile(1) };
    NonNull::new(p.cast()).unwrap()
}

/// Two pages, virtually adjacent and physically not: two fresh pages moved next to each other
/// in the order that does not follow physical memory.
fn split_pages() -> NonNull<u8> {
    let (a, b) = (fresh_page(), fresh_page());
    let (first, second) = match physical(a.as_ptr()) == physical(b.as_ptr()) + PAGE as u64 {
        true => (a, b),
        false => (b, a),
    };
    // SAFETY: a reservation of two pages, then each page moved over one half of it.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(at, libc::MAP_FAILED);
        for (i, page) in [first, second].into_iter().enumerate() {
            let to = at.cast::<u8>().add(i * PAGE).cast();
            let moved = libc::mremap(
                page.as_ptr().cast(),
                PAGE,
                PAGE,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to,
            );
            assert_eq!(moved, to);
        }
        let at = NonNull::new(at.cast::<u8>()).unwrap();
        assert_ne!(physical(at.as_ptr()) + PAGE as u64, physical(at.as_ptr().add(PAGE)));
        at
    }
}

/// In a guest with an IOMMU: never chosen by AUTO, and refused with what to do, by the
/// constant and by `VFIOKIT_IOMMU=noiommu`.
pub fn noiommu_refused_with_its_cause() {
    assert_ne!(IommuKind::auto().unwrap(), IommuKind::NoIommu);
    let (errno, words) = match Path::new(NOIOMMU_PARAM).exists() {
        false => (libc::ENOTSUP, &["no VFIO no-IOMMU mode", "CONFIG_VFIO_NOIOMMU"][..]),
        true => (libc::ENODEV, &["mode is off", "vfio.enable_unsafe_noiommu_mode=1"][..]),
    };
    assert_eq!(Path::new(NOIOMMU_PARAM).exists(), !legacy(), "only 6.12 has the mode");
    fails(Iommu::open(IommuKind::NoIommu), errno, words);
    in_child(|| {
        // SAFETY: the child is single-threaded.
        unsafe { std::env::set_var("VFIOKIT_IOMMU", "noiommu") };
        fails(Iommu::open_auto(), errno, words);
        fails(Device::open(&addr("EDU"), None), errno, words);
    });
}

/// In a guest without an IOMMU, on a kernel with the mode: edu's DMA at the physical addresses
/// vfiokit gives (small pages, a hugepage, the caller's memory) and its MSI; the misuses a
/// device without an IOMMU makes impossible refused, and nothing left locked.
pub fn noiommu_dma_and_msi() {
    if legacy() {
        // Debian's 6.1 has no no-IOMMU mode: vfio-pci refuses devices without an IOMMU.
        fails(Iommu::open(IommuKind::NoIommu), libc::ENOTSUP, &["CONFIG_VFIO_NOIOMMU"]);
        let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{}/driver", addr("EDU")));
        assert!(driver.is_err(), "vfio-pci cannot take edu without an IOMMU: {driver:?}");
        return;
    }
    // The other kinds say where the device belongs.
    let type1 = Iommu::open(IommuKind::Type1).unwrap();
    fails(Device::open(&addr("EDU"), Some(&type1)), libc::EINVAL, &["has no IOMMU", "noiommu"]);
    let iommufd = Iommu::open(IommuKind::Iommufd).unwrap();
    fails(Device::open(&addr("EDU"), Some(&iommufd)), libc::ENODEV, &["no-IOMMU", "noiommu"]);

    let locked = locked_kb();
    let iommu = Iommu::open(IommuKind::NoIommu).unwrap();
    assert_eq!(iommu.kind(), IommuKind::NoIommu);
    assert_eq!(iommu.iova_ranges().unwrap(), vec![IovaRange { start: 0, last: u64::MAX }]);
    let d = open_in("EDU", &iommu);
    assert!(iommu.fd().is_ok() && d.fd().is_ok());
    // No IOMMU keeps a mapping while its memory changes hands: no live handover.
    let (sock, _peer) = crate::handoff::socketpair();
    let refused = iommu.hand_over(&[&d], std::os::fd::AsFd::as_fd(&sock));
    fails(refused, libc::ENOTSUP, &["cannot be handed over live"]);
    enable_bus_master(&d);

    // Small buffers: the IOVA is the physical address, and the device reaches the memory.
    let (src, src_iova) = iommu.alloc(PAGE).unwrap();
    let (dst, dst_iova) = iommu.alloc(PAGE).unwrap();
    assert_eq!(src_iova, physical(src.as_ptr()));
    assert_eq!(dst_iova, physical(dst.as_ptr()));
    assert_eq!(iommu.translate(src.as_ptr(), 64).unwrap(), src_iova);
    let pattern: Vec<u8> = (0..2048).map(|i| (i * 7 + 3) as u8).collect();
    // SAFETY: our buffer; the device only reads it during the transfer.
    unsafe { std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.as_ptr(), pattern.len()) };
    edu::dma(&d, src_iova, edu::BUFFER, 2048, false);
    edu::dma(&d, edu::BUFFER, dst_iova, 2048, true);
    assert_eq!(volatile_bytes(dst, 2048), pattern, "the round trip at physical addresses");
    assert_eq!(locked_kb(), locked + 8, "two buffers locked");

    // A hugepage is one physically contiguous piece: DMA into its second megabyte.
    std::fs::write("/proc/sys/vm/nr_hugepages", "2").unwrap();
    let (huge, huge_iova) = iommu.alloc_flags(2 << 20, DMA_HUGE_2M).unwrap();
    assert_eq!(huge_iova % (2 << 20), 0);
    assert_eq!(huge_iova, physical(huge.as_ptr()));
    edu::dma(&d, edu::BUFFER, huge_iova + (1 << 20), 2048, true);
    // SAFETY: inside the 2 MiB buffer.
    let far = unsafe { NonNull::new_unchecked(huge.as_ptr().add(1 << 20)) };
    assert_eq!(volatile_bytes(far, 2048), pattern);
    iommu.free(huge.as_ptr()).unwrap();

    // The caller's memory: locked while mapped, unlocked by the unmap.
    let page = fresh_page();
    // SAFETY: our page, kept mapped until after the unmap.
    let iova = unsafe { iommu.map_any(page.as_ptr(), PAGE) }.unwrap();
    assert_eq!(iova, physical(page.as_ptr()));
    assert_eq!(locked_kb(), locked + 12);
    edu::dma(&d, edu::BUFFER, iova, 64, true);
    assert_eq!(volatile_bytes(page, 64), pattern[..64]);
    assert_eq!(iommu.unmap(iova, PAGE).unwrap(), PAGE as u64);
    assert_eq!(locked_kb(), locked + 8);

    // What only an IOMMU could do, refused; memory that is not one physical piece, refused.
    // SAFETY: the page stays mapped; every call here fails.
    unsafe {
        fails(iommu.map(page.as_ptr(), PAGE, 1 << 32), libc::ENOTSUP, &["cannot place memory"]);
        fails(
            iommu.map_any_flags(page.as_ptr(), PAGE, DMA_READONLY),
            libc::ENOTSUP,
            &["read-only DMA needs an IOMMU"],
        );
        let split = split_pages();
        fails(
            iommu.map_any(split.as_ptr(), 2 * PAGE),
            libc::EINVAL,
            &["not physically contiguous", "DMA_HUGE_2M"],
        );
        fails(iommu.alloc_flags(PAGE, DMA_READONLY), libc::ENOTSUP, &["read-only"]);
        // The same memory twice is the same physical range twice.
        let iova = iommu.map_any(page.as_ptr(), PAGE).unwrap();
        fails(iommu.map_any(page.as_ptr(), PAGE), libc::EEXIST, &[]);
        iommu.unmap(iova, PAGE).unwrap();
    }
    assert_eq!(locked_kb(), locked + 8, "failed maps leave nothing locked");
    let unmapped = Iommu::open(IommuKind::NoIommu).unwrap();
    let stdin = std::io::stdin();
    fails(
        unmapped.export(&[], std::os::fd::AsFd::as_fd(&stdin)),
        libc::ENOTSUP,
        &["CAP_SYS_RAWIO"],
    );

    // Without CAP_SYS_RAWIO no context; without CAP_SYS_ADMIN no physical addresses.
    in_child(|| {
        drop_capability(CAP_SYS_RAWIO);
        fails(Iommu::open(IommuKind::NoIommu), libc::EPERM, &["CAP_SYS_RAWIO"]);
    });
    in_child(|| {
        drop_capability(CAP_SYS_ADMIN);
        fails(iommu.alloc(PAGE), libc::EPERM, &["CAP_SYS_ADMIN"]);
    });

    // MSI needs no IOMMU.
    d.irq_enable(IRQ_MSI, 0, 1).unwrap();
    wr(&d, 0, edu::IRQ_RAISE, 0x55u32);
    assert!(d.irq_wait(IRQ_MSI, 0, 5000).unwrap() >= 1);
    assert_eq!(rd::<u32>(&d, 0, edu::IRQ_STATUS), 0x55);
    wr(&d, 0, edu::IRQ_ACK, 0x55u32);

    iommu.free(src.as_ptr()).unwrap();
    iommu.free(dst.as_ptr()).unwrap();
    assert_eq!(locked_kb(), locked, "every lock released");

    // Closing the context releases the locks of what is still mapped, as a container's close
    // releases the pins.
    // SAFETY: our page, mapped until the context closes.
    unsafe { iommu.map_any(page.as_ptr(), PAGE) }.unwrap();
    iommu.alloc(PAGE).unwrap();
    assert_eq!(locked_kb(), locked + 8);
    drop(d);
    drop(iommu);
    assert_eq!(locked_kb(), locked, "the context's close unlocked its memory");
}

/// doctor in a guest without an IOMMU: the IOMMU finding (a warning while no-IOMMU mode is on,
/// else a blocker), the mode's taint, the group node; and, last (it cannot be undone here),
/// vfio-pci unloaded on the kernel where it is a module.
pub fn noiommu_doctor() {
    let findings = doctor(Some(&addr("EDU")));
    let iommu_off: Vec<&Finding> =
        findings.iter().filter(|f| f.code == FINDING_IOMMU_OFF && f.subject() == "IOMMU").collect();
    assert_eq!(iommu_off.len(), 1, "{findings:?}");
    if legacy() {
        assert_eq!(iommu_off[0].severity, SEVERITY_BLOCKER);
        assert!(iommu_off[0].message().contains("vfio.enable_unsafe_noiommu_mode=1"));
        assert!(findings.iter().any(|f| f.code == FINDING_NOT_BOUND), "{findings:?}");
        // SAFETY: a plain syscall; no device is bound to vfio-pci, so nothing uses it.
        let rc = unsafe { libc::syscall(libc::SYS_delete_module, c"vfio_pci".as_ptr(), 0) };
        assert_eq!(rc, 0, "rmmod vfio_pci: {}", std::io::Error::last_os_error());
        let missing = doctor(None);
        let f = missing.iter().find(|f| f.code == FINDING_VFIO_PCI_MISSING).expect("reported");
        assert_eq!(f.severity, SEVERITY_BLOCKER);
        assert!(f.message().contains("modprobe vfio-pci"), "{f:?}");
        return;
    }
    assert_eq!(iommu_off[0].severity, SEVERITY_WARNING, "the mode is on: {findings:?}");
    assert!(iommu_off[0].message().contains("VFIOKIT_IOMMU=noiommu"));
    assert!(findings.iter().any(|f| f.code == FINDING_NOIOMMU_MODE), "{findings:?}");
    assert!(findings.iter().all(|f| f.severity != SEVERITY_BLOCKER), "edu is usable: {findings:?}");
    in_child(|| {
        // SAFETY: dropping privileges in the child only.
        assert_eq!(unsafe { libc::setgid(65534) + libc::setuid(65534) }, 0);
        let denied = doctor(Some(&addr("EDU")));
        assert!(
            denied.iter().any(|f| f.code == FINDING_NODE_PERMISSION
                && f.subject().starts_with("/dev/vfio/noiommu-")),
            "{denied:?}"
        );
    });
}

/// The DMA heap without an IOMMU: with no hugepage free, an arena's 4 KiB pages are mapped one
/// by one at their physical addresses, small objects reach the device there, and an object
/// larger than a page is refused (ENOMEM, naming the knob); with hugepages reserved, an arena
/// is one hugepage and a 64 KiB object is physically contiguous.
pub fn noiommu_heap() {
    if legacy() {
        return; // no no-IOMMU mode (noiommu_dma_and_msi says so)
    }
    std::fs::write("/proc/sys/vm/nr_hugepages", "0").unwrap();
    let iommu = Iommu::open(IommuKind::NoIommu).unwrap();
    let d = open_in("EDU", &iommu);
    enable_bus_master(&d);
    let (src, src_iova) = iommu.heap_alloc(64, 64).unwrap();
    let (dst, dst_iova) = iommu.heap_alloc(64, 64).unwrap();
    assert_eq!(src_iova, physical(src.as_ptr()), "the IOVA is the physical address");
    assert_eq!(dst_iova, physical(dst.as_ptr()));
    assert_eq!(iommu.heap_info().huge_arenas, 0);
    // SAFETY: our object; the device reads it during the transfer.
    unsafe { std::ptr::copy_nonoverlapping(b"no-iommu heap!!!".as_ptr(), src.as_ptr(), 16) };
    edu::dma(&d, src_iova, edu::BUFFER, 16, false);
    edu::dma(&d, edu::BUFFER, dst_iova + 8, 16, true);
    let got = volatile_bytes(dst, 64);
    assert_eq!(&got[8..24], b"no-iommu heap!!!");
    assert!(got[..8].iter().chain(&got[24..]).all(|&b| b == 0));
    fails(iommu.heap_alloc(8192, 1), libc::ENOMEM, &["hugepage", "nr_hugepages"]);
    drop(d);
    drop(iommu);

    std::fs::write("/proc/sys/vm/nr_hugepages", "2").unwrap();
    let iommu = Iommu::open(IommuKind::NoIommu).unwrap();
    let (big, big_iova) = iommu.heap_alloc(64 << 10, 4096).unwrap();
    assert_eq!(iommu.heap_info().huge_arenas, 1);
    assert_eq!(big_iova, physical(big.as_ptr()));
    let end = big.as_ptr().wrapping_add((64 << 10) - 1);
    assert_eq!(physical(end), big_iova + (64 << 10) - 1, "physically contiguous");
    drop(iommu);
    std::fs::write("/proc/sys/vm/nr_hugepages", "0").unwrap();
}
