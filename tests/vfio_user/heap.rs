//! The DMA heap on a vfio-user context, on the host: its objects against each other, against
//! the device model's DMA engine, and from many threads. The guest suite runs it against the
//! kernel's backends.

use std::collections::BTreeMap;

use vfiokit::{Iommu, IommuKind, irq};

use super::{dma, open_fds, open_model, setup};

/// The bytes of `[p, p+len)`.
fn bytes(p: *const u8, len: usize) -> Vec<u8> {
    // SAFETY: a live heap object of at least len bytes, not written meanwhile.
    unsafe { std::slice::from_raw_parts(p, len) }.to_vec()
}

#[test]
fn heap_objects_are_zeroed_disjoint_aligned_and_translate_both_ways() {
    let _serial = setup();
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    let mut live: BTreeMap<usize, (usize, u64)> = BTreeMap::new();
    let sizes = [1, 7, 16, 48, 64, 100, 512, 4000, 4096, 5000, 32768, 40000, 200 << 10];
    for round in 0..4096 {
        let size = if round < 3000 { 64 } else { sizes[round % sizes.len()] };
        let align = [1, 8, 64, 4096][round % 4];
        let (p, iova) = iommu.heap_alloc(size, align).unwrap();
        let addr = p.as_ptr() as usize;
        assert_eq!(addr % align, 0, "{size} bytes aligned to {align}");
        assert!(bytes(p.as_ptr(), size).iter().all(|&b| b == 0), "zeroed");
        assert_eq!(iommu.translate(p.as_ptr(), size).unwrap(), iova);
        assert_eq!(iommu.dma_to_vaddr(iova, size).unwrap(), p);
        assert_eq!(
            iommu.dma_to_vaddr(iova + size as u64 - 1, 1).unwrap().as_ptr() as usize,
            addr + size - 1
        );
        // Dirtied, so a reuse that is not zeroed again shows.
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0xa5, size) };
        live.insert(addr, (size, iova));
    }
    let mut end = 0;
    for (&addr, &(size, _)) in &live {
        assert!(addr >= end, "objects overlap at {addr:#x}");
        end = addr + size;
    }
    let info = iommu.heap_info();
    assert_eq!(info.arena_size, 2 << 20);
    let asked: usize = live.values().map(|&(size, _)| size).sum();
    assert!(info.used as usize <= asked * 2 + (2 << 20), "{info:?} for {asked} bytes");
    assert!(info.arenas as u64 * info.arena_size >= info.used);
    // Freed and allocated again: zeroed again.
    for (&addr, _) in live.iter().take(100) {
        iommu.heap_free(addr as *mut u8).unwrap();
    }
    for _ in 0..100 {
        let (p, _) = iommu.heap_alloc(64, 1).unwrap();
        assert!(bytes(p.as_ptr(), 64).iter().all(|&b| b == 0), "zeroed on reuse");
    }
    drop(iommu);
}

#[test]
fn heap_frees_of_anything_but_a_live_object_are_refused() {
    let _serial = setup();
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    let nothing = iommu.heap_free(std::ptr::dangling_mut()).unwrap_err();
    assert_eq!(nothing.errno(), libc::EINVAL, "before any allocation: {nothing}");
    let (p, _) = iommu.heap_alloc(64, 1).unwrap();
    let inside = iommu.heap_free(p.as_ptr().wrapping_add(16)).unwrap_err();
    assert_eq!(inside.errno(), libc::EINVAL, "{inside}");
    iommu.heap_free(p.as_ptr()).unwrap();
    let twice = iommu.heap_free(p.as_ptr()).unwrap_err();
    assert_eq!(twice.errno(), libc::EINVAL);
    assert!(twice.message().contains("freed already"), "{twice}");
    let other = Iommu::open(IommuKind::VfioUser).unwrap();
    let (q, _) = other.heap_alloc(64, 1).unwrap();
    assert_eq!(iommu.heap_free(q.as_ptr()).unwrap_err().errno(), libc::EINVAL, "another context's");
    let e = iommu.heap_alloc(0, 1).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert_eq!(
        iommu.heap_alloc(64, 3).unwrap_err().errno(),
        libc::EINVAL,
        "alignment not a power of two"
    );
    assert_eq!(iommu.heap_alloc((2 << 20) + 1, 1).unwrap_err().errno(), libc::EINVAL);
    // A heap arena is no caller mapping: unmap refuses it.
    let (r, iova) = iommu.heap_alloc(64, 1).unwrap();
    let e = iommu.unmap(iova & !0x1f_ffff, 2 << 20).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    assert_eq!(iommu.translate(r.as_ptr(), 64).unwrap(), iova, "still mapped");
}

/// edu's DMA engine writes into the middle of one object; its neighbours are untouched.
#[test]
fn a_device_dma_into_one_object_leaves_its_neighbours_alone() {
    let _serial = setup();
    let (dev, server) = open_model("heap-dma", None);
    dev.irq_enable(irq::IRQ_MSIX, 0, 1).unwrap();
    let iommu = dev.iommu();
    let objects: Vec<_> = (0..3).map(|_| iommu.heap_alloc(64, 64).unwrap()).collect();
    let (src, src_iova) = iommu.heap_alloc(16, 16).unwrap();
    unsafe { std::ptr::copy_nonoverlapping(b"from-the-device!".as_ptr(), src.as_ptr(), 16) };
    for (p, _) in &objects {
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0x5a, 64) };
    }
    let (middle, middle_iova) = objects[1];
    assert_eq!(dma(&dev, src_iova, middle_iova + 24, 16), 0);
    let got = bytes(middle.as_ptr(), 64);
    assert_eq!(&got[24..40], b"from-the-device!");
    assert!(got[..24].iter().chain(&got[40..]).all(|&b| b == 0x5a), "the rest of the object");
    for (p, _) in [objects[0], objects[2]] {
        assert!(bytes(p.as_ptr(), 64).iter().all(|&b| b == 0x5a), "a neighbour");
    }
    drop(dev);
    server.join().unwrap();
}

/// Threads allocating and freeing on one context: each object holds its owner's mark until
/// freed, so two live objects sharing memory would show.
#[test]
fn heap_threads_allocate_and_free_on_one_context() {
    let _serial = setup();
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    std::thread::scope(|s| {
        for t in 1..=4u8 {
            let iommu = &iommu;
            s.spawn(move || {
                let mut held = Vec::new();
                for i in 0..5000usize {
                    let size = [16, 64, 200, 4096][i % 4];
                    let (p, iova) = iommu.heap_alloc(size, 1).unwrap();
                    assert!(bytes(p.as_ptr(), size).iter().all(|&b| b == 0));
                    unsafe { std::ptr::write_bytes(p.as_ptr(), t, size) };
                    held.push((p, size, iova));
                    if i % 3 != 0 {
                        let (q, size, iova) = held.swap_remove(i % held.len());
                        assert!(bytes(q.as_ptr(), size).iter().all(|&b| b == t), "thread {t}");
                        assert_eq!(iommu.translate(q.as_ptr(), size).unwrap(), iova);
                        iommu.heap_free(q.as_ptr()).unwrap();
                    }
                }
                for (q, size, _) in held {
                    assert!(bytes(q.as_ptr(), size).iter().all(|&b| b == t), "thread {t}");
                    iommu.heap_free(q.as_ptr()).unwrap();
                }
            });
        }
    });
}

/// 4,096 objects of 64 bytes pin one arena, of which they use four 64 KiB spans: 256 KiB, the
/// bytes asked.
#[test]
fn small_objects_pin_what_they_ask_plus_one_arena() {
    let _serial = setup();
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    for _ in 0..4096 {
        iommu.heap_alloc(64, 64).unwrap();
    }
    let info = iommu.heap_info();
    assert_eq!((info.arenas, info.used), (1, 256 << 10), "{info:?}");
}

/// A context's heap goes with it: fds and mappings back where they were.
#[test]
fn heap_is_released_when_its_context_closes() {
    let _serial = setup();
    let maps = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains("vfiokit-dma"))
            .count()
    };
    let cycle = || {
        let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
        for size in [64, 5000, 300 << 10] {
            iommu.heap_alloc(size, 1).unwrap();
        }
        assert!(maps() > 0);
    };
    cycle();
    let before = (open_fds(), maps());
    for _ in 0..20 {
        cycle();
    }
    assert_eq!((open_fds(), maps()), before);
    assert_eq!(before.1, 0, "no arena left mapped");
}

/// Guard mode poisons freed objects.
#[test]
fn heap_objects_are_poisoned_when_freed_in_guard_mode() {
    let _serial = setup();
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    iommu.set_dma_guard(true);
    let (p, _) = iommu.heap_alloc(64, 1).unwrap();
    iommu.heap_free(p.as_ptr()).unwrap();
    // The memory stays mapped in the arena: what a device still reading it would see.
    assert!(bytes(p.as_ptr(), 64).iter().all(|&b| b == 0x6b));
}
