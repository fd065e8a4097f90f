//! DMA: the IOVA ranges and the mapping rules, edu's round trips through its engine, what the
//! vIOMMU blocks (unmapped IOVAs, read-only memory, a guard page), peer-to-peer through another
//! device's BAR, hugepage buffers, maps made before the first device, files mapped by their
//! fd, and flag misuse.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use vfiokit::{Device, Iommu, IommuKind};

use crate::common::*;

pub fn iova_ranges_and_mapping_rules() {
    let iommu = Iommu::open_auto().unwrap();
    match iommu.kind() {
        IommuKind::Type1 => fails(iommu.iova_ranges(), libc::ENODEV, &["open a device first"]),
        IommuKind::Iommufd => {
            assert!(!iommu.iova_ranges().unwrap().is_empty(), "an IOAS has ranges from the start")
        }
        other => unreachable!("AUTO picks type1 or iommufd, not {other:?}"),
    }
    let _d = open_in("EDU", &iommu);
    let ranges = iommu.iova_ranges().unwrap();
    assert!(!ranges.is_empty());
    let msi_window = 0xfee0_0000u64;
    assert!(
        !ranges.iter().any(|r| r.start <= msi_window && msi_window <= r.last),
        "the MSI window is reserved: {ranges:x?}"
    );
    let page = 4096;
    let (buf, iova) = iommu.alloc(3 * page).unwrap();
    assert!(ranges.iter().any(|r| r.start <= iova && iova + 3 * page as u64 - 1 <= r.last));
    let mem = buf.as_ptr();
    // SAFETY: buf is ours for the test's duration, mapped only where asserted below.
    unsafe {
        fails(iommu.map(mem, page, iova), libc::EEXIST, &["overlaps"]);
        fails(iommu.map(mem, page, msi_window), libc::EINVAL, &["outside the valid IOVA ranges"]);
        fails(iommu.map(mem.add(1), page, 0x100_0000), libc::EINVAL, &["multiples"]);
        fails(iommu.map(mem, 100, 0x100_0000), libc::EINVAL, &["multiples"]);
        fails(iommu.map(std::ptr::null_mut(), page, 0x100_0000), libc::EFAULT, &["null address"]);
        iommu.map(mem, page, 0x100_0000).unwrap();
        let any = iommu.map_any(mem, page).unwrap();
        assert_ne!(any, 0x100_0000);
        iommu.unmap(any, page).unwrap();
        iommu.unmap(0x100_0000, page).unwrap();
    }
    fails(iommu.unmap(0x100_0000, page), libc::ENOENT, &["no DMA mapping"]);
    // unmap_all takes every map, not the buffer's own mapping, and says how much.
    // SAFETY: as above.
    let (a, b) =
        unsafe { (iommu.map_any(mem, page).unwrap(), iommu.map_any(mem, 2 * page).unwrap()) };
    assert_eq!(iommu.unmap_all().unwrap(), 3 * page as u64);
    fails(iommu.unmap(a, page), libc::ENOENT, &["no DMA mapping"]);
    fails(iommu.unmap(b, 2 * page), libc::ENOENT, &["no DMA mapping"]);
    assert_eq!(iommu.translate(mem, 3 * page).unwrap(), iova, "the buffer stays mapped");
    assert_eq!(iommu.unmap_all().unwrap(), 0);
    fails(iommu.alloc(0), libc::EINVAL, &["zero"]);
    fails(iommu.free(0x1000 as *mut u8), libc::EINVAL, &["not a DMA buffer"]);
    iommu.free(buf.as_ptr()).unwrap();
    fails(iommu.free(buf.as_ptr()), libc::EINVAL, &["not a DMA buffer"]);
}

pub fn edu_dma_round_trip() {
    let d = open("EDU");
    enable_bus_master(&d);
    let iommu = d.iommu();
    let (src, src_iova) = iommu.alloc(4096).unwrap();
    let (dst, dst_iova) = iommu.alloc(4096).unwrap();
    assert!(src_iova < 1 << 28 && dst_iova < 1 << 28, "edu reaches only 28 bits");
    let len = 2048;
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    // SAFETY: our buffer; the device only reads it during the transfer.
    unsafe { std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.as_ptr(), len) };
    edu::dma(&d, src_iova, edu::BUFFER, len as u64, false);
    edu::dma(&d, edu::BUFFER, dst_iova, len as u64, true);
    // SAFETY: the transfer has completed; volatile reads because the device wrote the memory.
    let back: Vec<u8> = (0..len).map(|i| unsafe { dst.as_ptr().add(i).read_volatile() }).collect();
    assert_eq!(back, pattern, "the buffer made the round trip through the device");
    iommu.free(src.as_ptr()).unwrap();
    iommu.free(dst.as_ptr()).unwrap();
}

pub fn dma_to_unmapped_iova_does_not_reach_memory() {
    let d = open("EDU");
    enable_bus_master(&d);
    let iommu = d.iommu();
    let (src, src_iova) = iommu.alloc(4096).unwrap();
    // SAFETY: our buffer.
    unsafe { std::ptr::write_bytes(src.as_ptr(), 0xab, 4096) };
    edu::dma(&d, src_iova, edu::BUFFER, 1024, false);
    // A page mapped and then unmapped: its IOVA no longer leads anywhere.
    let victim = NonNull::new(Box::into_raw(Box::new([0u8; 8192])).cast::<u8>()).unwrap();
    // SAFETY: page-aligned inside the 8 KiB box, which outlives its mapping.
    let page = unsafe { victim.as_ptr().add(4096 - victim.as_ptr() as usize % 4096) };
    let iova = 0x80_0000;
    // SAFETY: as above.
    unsafe { iommu.map(page, 4096, iova).unwrap() };
    edu::dma(&d, edu::BUFFER, iova, 1024, true);
    // SAFETY: the device wrote it; read volatile.
    assert_eq!(unsafe { page.read_volatile() }, 0xab, "a mapped IOVA is reached (control)");
    // SAFETY: our page.
    unsafe { std::ptr::write_bytes(page, 0, 4096) };
    iommu.unmap(iova, 4096).unwrap();
    edu::dma(&d, edu::BUFFER, iova, 1024, true);
    // SAFETY: as above.
    let after: Vec<u8> = (0..4096).map(|i| unsafe { page.add(i).read_volatile() }).collect();
    assert!(after.iter().all(|&b| b == 0), "the IOMMU blocked the DMA to the unmapped IOVA");
    iommu.free(src.as_ptr()).unwrap();
    // SAFETY: from Box::into_raw above, no longer mapped.
    drop(unsafe { Box::from_raw(victim.as_ptr().cast::<[u8; 8192]>()) });
}

/// DMA_READONLY: edu's engine reads the buffer; its write into it is blocked by the vIOMMU.
pub fn readonly_dma_memory_is_not_written() {
    let d = open("EDU");
    enable_bus_master(&d);
    let iommu = d.iommu();
    let (ro, ro_iova) = iommu.alloc_flags(4096, vfiokit::DMA_READONLY).unwrap();
    let (rw, rw_iova) = iommu.alloc(4096).unwrap();
    // SAFETY: our buffers, idle.
    unsafe {
        std::ptr::write_bytes(ro.as_ptr(), 0x5a, 4096);
        std::ptr::write_bytes(rw.as_ptr(), 0xc3, 4096);
    }
    edu::dma(&d, ro_iova, edu::BUFFER, 1024, false);
    edu::dma(&d, edu::BUFFER, rw_iova, 1024, true);
    assert!(volatile_bytes(rw, 1024).iter().all(|&b| b == 0x5a), "the device read the buffer");
    // SAFETY: our buffer, idle.
    unsafe { std::ptr::write_bytes(rw.as_ptr(), 0xc3, 4096) };
    edu::dma(&d, rw_iova, edu::BUFFER, 1024, false);
    edu::dma(&d, edu::BUFFER, ro_iova, 1024, true);
    assert!(volatile_bytes(ro, 4096).iter().all(|&b| b == 0x5a), "the write was blocked");
    // The same through map_flags of the caller's memory.
    let (mem, _) = iommu.alloc(8192).unwrap();
    // SAFETY: mem is ours and stays mapped until freed after the unmap below.
    let iova = unsafe { iommu.map_any_flags(mem.as_ptr(), 4096, vfiokit::DMA_READONLY) }.unwrap();
    edu::dma(&d, edu::BUFFER, iova, 512, true);
    assert!(volatile_bytes(mem, 512).iter().all(|&b| b == 0), "read-only map: no write");
    iommu.unmap(iova, 4096).unwrap();
    for b in [ro, rw, mem] {
        iommu.free(b.as_ptr()).unwrap();
    }
}

/// Peer-to-peer: a DMA map of another device's BAR, as vfiokit_region_map gives it. On type1
/// the kernel maps it by address; on iommufd vfiokit maps it by the BAR's dma-buf (7.3), and
/// edu's DMA engine reads and writes ivshmem's BAR2 through the vIOMMU. 6.12's vfio-pci exports
/// no dma-buf: EFAULT, and the error says what is needed.
pub fn p2p_dma_through_another_devices_bar() {
    let d = open("EDU");
    enable_bus_master(&d);
    let iommu = d.iommu();
    let shm = open_in("IVSHMEM", iommu);
    let bar = shm.map(2).unwrap();
    // SAFETY: ivshmem's BAR2 is RAM, mapped and at least 64 KiB; nothing else uses it here.
    let bar_page = |i| unsafe { bar.as_ptr().add(i) };
    // SAFETY: the BAR mapping lives as long as `shm`, past the unmap below.
    let mapped = unsafe { iommu.map_any(bar.as_ptr(), 65536) };
    if iommu.kind() == IommuKind::Iommufd && std::env::var("VFIOKIT_VM_KERNEL").unwrap() != "latest"
    {
        fails(mapped, libc::EFAULT, &["iommufd", "peer-to-peer", "dma-buf", "type1"]);
        return;
    }
    let bar_iova = mapped.unwrap();
    assert!(bar_iova < 1 << 28, "edu reaches it");
    let (ram, ram_iova) = iommu.alloc(4096).unwrap();
    // SAFETY: our buffer and the BAR page, both idle.
    unsafe {
        std::ptr::write_bytes(ram.as_ptr(), 0x6b, 4096);
        std::ptr::write_bytes(bar_page(0), 0, 8192);
        std::ptr::write_bytes(bar_page(8192), 0x3c, 1024);
    }
    // RAM -> edu -> the BAR: the bytes arrive in ivshmem's memory.
    edu::dma(&d, ram_iova, edu::BUFFER, 1024, false);
    edu::dma(&d, edu::BUFFER, bar_iova + 4096, 1024, true);
    let bar_bytes = |off, len| volatile_bytes(NonNull::new(bar_page(off)).unwrap(), len);
    assert!(bar_bytes(4096, 1024).iter().all(|&b| b == 0x6b), "edu wrote into the BAR");
    assert!(bar_bytes(5120, 3072).iter().all(|&b| b == 0), "and no further");
    // The BAR -> edu -> RAM: the device reads the peer's memory.
    edu::dma(&d, bar_iova + 8192, edu::BUFFER, 1024, false);
    edu::dma(&d, edu::BUFFER, ram_iova, 1024, true);
    assert!(volatile_bytes(ram, 1024).iter().all(|&b| b == 0x3c), "edu read from the BAR");
    iommu.unmap(bar_iova, 65536).unwrap();
    iommu.free(ram.as_ptr()).unwrap();
}

/// DMA_HUGE_2M: hugetlb-backed, rounded to 2 MiB, IOVA aligned; too few pages is ENOMEM
/// naming the knob (both guest kernels have hugetlb). DMA_HUGE_1G: ENOMEM naming its knob
/// where the CPU has 1 GiB pages (none are reserved), ENOTSUP saying so where it has not.
pub fn hugepage_buffers() {
    const MB2: usize = 2 << 20;
    let d = open("EDU");
    enable_bus_master(&d);
    let iommu = d.iommu();
    let gig = "/sys/kernel/mm/hugepages/hugepages-1048576kB";
    let (errno, words) = match std::path::Path::new(gig).exists() {
        true => (libc::ENOMEM, gig),
        false => (libc::ENOTSUP, "no 1048576 kB hugetlb"),
    };
    fails(iommu.alloc_flags(4096, vfiokit::DMA_HUGE_1G), errno, &[words]);
    let knob = "/proc/sys/vm/nr_hugepages";
    std::fs::write(knob, "0").unwrap();
    fails(
        iommu.alloc_flags(MB2 + 1, vfiokit::DMA_HUGE_2M),
        libc::ENOMEM,
        &["2 are needed and 0 are free", knob],
    );
    std::fs::write(knob, "4").unwrap();
    let (buf, iova) = iommu.alloc_flags(4096, vfiokit::DMA_HUGE_2M).unwrap();
    assert_eq!(iova % MB2 as u64, 0, "IOVA aligned to the huge page");
    assert!(iova < 1 << 28, "edu reaches it");
    // SAFETY: our buffer.
    unsafe { std::ptr::write_bytes(buf.as_ptr(), 0x11, 4096) };
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let start = format!("{:x}-", buf.as_ptr() as usize);
    let entry =
        smaps.split("\n").skip_while(|l| !l.starts_with(&start)).take(20).collect::<Vec<_>>();
    assert!(
        entry.iter().any(|l| l.starts_with("KernelPageSize:") && l.contains(" 2048 kB")),
        "{entry:?}"
    );
    edu::dma(&d, iova, edu::BUFFER, 1024, false);
    edu::dma(&d, edu::BUFFER, iova + 8192, 1024, true);
    assert!(
        volatile_bytes(NonNull::new(buf.as_ptr().wrapping_add(8192)).unwrap(), 1024)
            .iter()
            .all(|&b| b == 0x11)
    );
    iommu.free(buf.as_ptr()).unwrap();
    std::fs::write(knob, "0").unwrap();
}

/// Guard mode: a DMA running 4 KiB past the end of a buffer is stopped by the vIOMMU and the
/// next buffer is intact; freed buffers are poisoned.
pub fn guard_pages_stop_an_overrun() {
    let iommu = Iommu::open_auto().unwrap();
    let d = open_in("EDU", &iommu);
    enable_bus_master(&d);
    iommu.set_dma_guard(true);
    let (a, a_iova) = iommu.alloc(4096).unwrap();
    let (b, b_iova) = iommu.alloc(4096).unwrap();
    assert!(b_iova >= a_iova + 8192 || a_iova >= b_iova + 8192, "a guard page between them");
    // SAFETY: our buffers, idle.
    unsafe {
        std::ptr::write_bytes(b.as_ptr(), 0xee, 4096);
    }
    // edu writes its 0x40000 buffer (zeros, then the pattern) past a's end into the guard page.
    edu::dma(&d, b_iova, edu::BUFFER, 64, false);
    let overrun = a_iova + 4096;
    edu::dma(&d, edu::BUFFER, overrun, 64, true);
    assert!(volatile_bytes(b, 4096).iter().all(|&x| x == 0xee), "the neighbour is intact");
    iommu.free(a.as_ptr()).unwrap();
    iommu.free(b.as_ptr()).unwrap();
    iommu.set_dma_guard(false);
}

/// A type1 context takes maps before its first device (as iommufd does) and hands them to the
/// kernel when the first group attaches; a map outside the ranges the kernel then reports
/// makes that attach fail, naming it.
pub fn maps_before_the_first_device() {
    let iommu = Iommu::open_auto().unwrap();
    let (buf, iova) = iommu.alloc(4096).unwrap();
    // SAFETY: our buffer.
    unsafe { std::ptr::write_bytes(buf.as_ptr(), 0x77, 4096) };
    let d = open_in("EDU", &iommu);
    enable_bus_master(&d);
    edu::dma(&d, iova, edu::BUFFER, 256, false);
    edu::dma(&d, edu::BUFFER, iova + 2048, 256, true);
    assert!(
        volatile_bytes(NonNull::new(buf.as_ptr().wrapping_add(2048)).unwrap(), 256)
            .iter()
            .all(|&b| b == 0x77)
    );
    iommu.free(buf.as_ptr()).unwrap();
    drop(d);
    drop(iommu); // it keeps the group attached

    // The interrupt window is never a valid type1 IOVA: a map there fails the first attach.
    // (An IOAS knows its ranges from the start, so iommufd has no such case.)
    let iommu = Iommu::open_auto().unwrap();
    if iommu.kind() == IommuKind::Type1 {
        let (mem, _) = iommu.alloc(4096).unwrap();
        // SAFETY: mem stays allocated until the context closes.
        unsafe { iommu.map(mem.as_ptr(), 4096, 0xfee0_0000) }.unwrap();
        fails(
            Device::open(&addr("EDU"), Some(&iommu)),
            libc::EINVAL,
            &["IOVA 0xfee00000", "made before any device", "outside the IOVA ranges"],
        );
        iommu.unmap(0xfee0_0000, 4096).unwrap();
        let _d = open_in("EDU", &iommu);
        assert!(!iommu.iova_ranges().unwrap().is_empty(), "the retried attach took");
    }
}

/// Bad flags and lengths, and an unmap that would leave a buffer without its mapping.
pub fn dma_flag_and_buffer_misuse() {
    let d = open("EDU");
    let iommu = d.iommu();
    fails(iommu.alloc_flags(4096, 1 << 7), libc::EINVAL, &["unknown DMA flags 0x80"]);
    fails(
        iommu.alloc_flags(4096, vfiokit::DMA_HUGE_2M | vfiokit::DMA_HUGE_1G),
        libc::EINVAL,
        &["exclude each other"],
    );
    fails(iommu.alloc_flags(usize::MAX - 4094, 0), libc::EINVAL, &["overflows"]);
    let (buf, iova) = iommu.alloc(4096).unwrap();
    // SAFETY: never reached: the flag is refused first.
    fails(
        unsafe { iommu.map_any_flags(buf.as_ptr(), 4096, vfiokit::DMA_HUGE_2M) },
        libc::EINVAL,
        &["allocations"],
    );
    fails(iommu.unmap(iova, 4096), libc::EBUSY, &["DMA buffer", "free the buffer"]);
    iommu.free(buf.as_ptr()).unwrap();
    fails(iommu.free(buf.as_ptr()), libc::EINVAL, &["not a DMA buffer"]);
}

/// The DMA heap on the kernel's backends: edu's engine writes into the middle of one object
/// and its neighbours stay as they were; objects translate both ways; an object from a second
/// arena (past 2 MiB of objects) reaches the device too; the heap goes with its context.
pub fn heap_objects_reach_the_device() {
    let before = fds_and_maps();
    let d = open("EDU");
    enable_bus_master(&d);
    let iommu = d.iommu();
    let objects: Vec<_> = (0..3).map(|_| iommu.heap_alloc(256, 64).unwrap()).collect();
    let (src, src_iova) = iommu.heap_alloc(48, 16).unwrap();
    let pattern: Vec<u8> = (0..48).map(|i| (i * 5 + 1) as u8).collect();
    // SAFETY: our objects; the device reads src only during the transfer.
    unsafe {
        std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.as_ptr(), 48);
        for (p, _) in &objects {
            std::ptr::write_bytes(p.as_ptr(), 0x5a, 256);
        }
    }
    let (middle, middle_iova) = objects[1];
    assert!(middle_iova < 1 << 28, "edu reaches only 28 bits");
    assert_eq!(iommu.translate(middle.as_ptr(), 256).unwrap(), middle_iova);
    assert_eq!(
        iommu.dma_to_vaddr(middle_iova + 100, 8).unwrap().as_ptr(),
        middle.as_ptr().wrapping_add(100)
    );
    edu::dma(&d, src_iova, edu::BUFFER, 48, false);
    edu::dma(&d, edu::BUFFER, middle_iova + 100, 48, true);
    let got = volatile_bytes(middle, 256);
    assert_eq!(&got[100..148], &pattern[..], "the device's write landed");
    assert!(got[..100].iter().chain(&got[148..]).all(|&b| b == 0x5a), "the rest of the object");
    for (p, _) in [objects[0], objects[2]] {
        assert!(volatile_bytes(p, 256).iter().all(|&b| b == 0x5a), "a neighbour");
    }
    // A second arena: 40 objects of 64 KiB fill the first.
    let big: Vec<_> = (0..40).map(|_| iommu.heap_alloc(64 << 10, 1).unwrap()).collect();
    assert!(iommu.heap_info().arenas >= 2, "{:?}", iommu.heap_info());
    let (last, last_iova) = *big.last().unwrap();
    edu::dma(&d, src_iova, edu::BUFFER, 48, false);
    edu::dma(&d, edu::BUFFER, last_iova + 4000, 48, true);
    assert_eq!(&volatile_bytes(last, 4048)[4000..], &pattern[..], "an object of the second arena");
    fails(iommu.unmap(last_iova & !0x1f_ffff, 2 << 20), libc::EBUSY, &["DMA heap"]);
    for (p, _) in objects.into_iter().chain(big) {
        iommu.heap_free(p.as_ptr()).unwrap();
    }
    fails(iommu.heap_free(src.as_ptr().wrapping_add(16)), libc::EINVAL, &["not an object"]);
    iommu.heap_free(src.as_ptr()).unwrap();
    drop(d);
    assert_eq!(fds_and_maps(), before, "the heap closed with its context");
}

/// A new memfd of `len` bytes.
fn memfd(len: usize) -> OwnedFd {
    // SAFETY: plain syscalls; the fd is checked before it is owned.
    unsafe {
        let fd = libc::memfd_create(c"vfiokit-test-file".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
        OwnedFd::from_raw_fd(fd)
    }
}

/// `len` bytes of `fd` at `offset`, read with pread.
fn pread(fd: &OwnedFd, offset: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: reads at most len bytes into out.
    let n = unsafe { libc::pread(fd.as_raw_fd(), out.as_mut_ptr().cast(), len, offset as i64) };
    assert_eq!(n, len as isize);
    out
}

/// The /proc/self/maps line of the mapping that starts at `p`.
fn maps_line(p: NonNull<u8>) -> String {
    let start = format!("{:x}-", p.as_ptr() as usize);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().find(|l| l.starts_with(&start)).unwrap_or_default().to_string()
}

/// map_file: a memfd's pages from an offset reach the device both ways, with the caller's fd
/// closed after the map (the context holds its own); what the device wrote is in the file, and
/// free leaves the file's data alone. On iommufd the kernel maps the file itself
/// (IOMMU_IOAS_MAP_FILE, here on 7.3), where alloc's buffers are memfds too; 6.12's iommufd
/// refuses, naming 6.13. Misaligned, empty, unknown-flag, read-only and unmappable files are
/// refused; no fd or mapping is left behind.
pub fn file_mappings_reach_the_device() {
    const PAGE: usize = 4096;
    let d = open("EDU");
    enable_bus_master(&d);
    let iommu = d.iommu();
    // Measured with the device open, its BAR mapped (by a register read) and the context's
    // allocator grown by a first buffer.
    rd::<u32>(&d, 0, 0);
    let (warm, _) = iommu.alloc(PAGE).unwrap();
    iommu.free(warm.as_ptr()).unwrap();
    let before = fds_and_maps();
    let file = memfd(4 * PAGE);
    let iommufd = iommu.kind() == IommuKind::Iommufd;
    if iommufd && std::env::var("VFIOKIT_VM_KERNEL").unwrap() != "latest" {
        fails(
            iommu.map_file(file.as_fd(), 0, PAGE, 0),
            libc::EOPNOTSUPP,
            &["IOMMU_IOAS_MAP_FILE", "Linux 6.13"],
        );
        let (buf, _) = iommu.alloc(PAGE).unwrap();
        assert!(!maps_line(buf).contains("memfd:"), "{}", maps_line(buf));
        iommu.free(buf.as_ptr()).unwrap();
        drop(file);
        assert_eq!(fds_and_maps(), before);
        return;
    }
    let pattern: Vec<u8> = (0..2048).map(|i| (i * 11 + 5) as u8).collect();
    // SAFETY: writes pattern.len() bytes from pattern.
    let n = unsafe { libc::pwrite(file.as_raw_fd(), pattern.as_ptr().cast(), 2048, PAGE as i64) };
    assert_eq!(n, 2048);
    let callers = file.try_clone().unwrap();
    let (m, iova) = iommu.map_file(callers.as_fd(), PAGE as u64, 2 * PAGE, 0).unwrap();
    drop(callers);
    assert_eq!(volatile_bytes(m, 2048), pattern, "the mapping starts at the file's offset");
    assert_eq!(iommu.translate(m.as_ptr(), 2 * PAGE).unwrap(), iova);
    edu::dma(&d, iova, edu::BUFFER, 2048, false);
    edu::dma(&d, edu::BUFFER, iova + PAGE as u64, 2048, true);
    assert_eq!(pread(&file, 2 * PAGE, 2048), pattern, "the device wrote the file's page");
    fails(iommu.unmap(iova, 2 * PAGE), libc::EBUSY, &["map_file"]);
    iommu.set_dma_guard(true);
    iommu.free(m.as_ptr()).unwrap();
    iommu.set_dma_guard(false);
    assert_eq!(pread(&file, PAGE, 2048), pattern, "free does not poison a file");
    let (buf, _) = iommu.alloc(PAGE).unwrap();
    assert_eq!(maps_line(buf).contains("memfd:vfiokit-dma"), iommufd, "{}", maps_line(buf));
    iommu.free(buf.as_ptr()).unwrap();

    fails(iommu.map_file(file.as_fd(), 1, PAGE, 0), libc::EINVAL, &["whole pages"]);
    fails(iommu.map_file(file.as_fd(), 0, PAGE + 1, 0), libc::EINVAL, &["whole pages"]);
    fails(iommu.map_file(file.as_fd(), 0, 0, 0), libc::EINVAL, &["not zero"]);
    fails(
        iommu.map_file(file.as_fd(), 0, PAGE, vfiokit::DMA_HUGE_2M),
        libc::EINVAL,
        &["only DMA_READONLY"],
    );
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let readonly = std::fs::File::open(path).unwrap();
    fails(iommu.map_file(readonly.as_fd(), 0, PAGE, 0), libc::EACCES, &["DMA_READONLY"]);
    let (ro, _) = iommu.map_file(readonly.as_fd(), 0, PAGE, vfiokit::DMA_READONLY).unwrap();
    iommu.free(ro.as_ptr()).unwrap();
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two fds, owned at once.
    let (pipe_r, pipe_w) = unsafe {
        assert_eq!(libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]))
    };
    fails(
        iommu.map_file(pipe_r.as_fd(), 0, PAGE, vfiokit::DMA_READONLY),
        libc::ENODEV,
        &["cannot be mapped"],
    );
    drop((file, readonly, pipe_r, pipe_w));
    assert_eq!(fds_and_maps(), before, "every fd and mapping released");
}
