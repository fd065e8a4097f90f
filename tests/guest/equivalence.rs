//! One program, one behaviour: the same call sequences run on every IOMMU backend the guest's
//! kernel offers, each step's result (0 or the errno) compared with the outcome the "Backend
//! semantics" table of docs/backends.md documents, and the process's fds and mappings checked
//! to return to where they were. A new backend joins by being added to `backends()`; a
//! sequence whose outcome genuinely differs on it gets an entry in `differences()` and a row
//! in the table.

use std::ptr::NonNull;

use vfiokit::irq::{IRQ_INTX, IRQ_MSI, IRQ_MSIX};
use vfiokit::{Device, Iommu, IommuKind};

use crate::common::*;

use libc::{EBUSY, EEXIST, EINVAL, ENOENT};

/// A sequence owns its context, so it can close it before its devices.
type Sequence = fn(Iommu) -> Vec<i32>;

/// (name, sequence, the documented outcome of each step).
const SEQUENCES: &[(&str, Sequence, &[i32])] = &[
    ("open twice, close, open again", open_twice, &[0, EBUSY, 0, 0]),
    ("context closed before its device", context_first, &[0, 0, 0]),
    (
        "maps: overlap, partial unmap, double unmap",
        map_rules,
        &[0, EEXIST, EEXIST, EINVAL, 0, ENOENT],
    ),
    ("maps before the first device, then used", early_maps, &[0, 0, 0, 0]),
    ("buffers: unmap refused, free, free again", buffer_rules, &[0, EBUSY, 0, 0, EINVAL, ENOENT]),
    ("a failed call changes nothing", failure_changes_nothing, &[EINVAL, EINVAL, 0, 0, ENOENT]),
    ("interrupt types one at a time", irq_types, &[0, EINVAL, 0, EINVAL, 0, 0, 0, 0, EINVAL]),
    ("IRQ re-enable and disable orders", irq_orders, &[0, 0, 0, 0, EINVAL, 0, 0]),
    ("reset with DMA and IRQs live", reset_live, &[0, 0, 0, 0, 0, 0]),
];

/// Every backend this kernel offers, by its `IOMMU_*` kind.
fn backends() -> Vec<(&'static str, IommuKind)> {
    let mut found = vec![("type1", IommuKind::Type1)];
    if std::path::Path::new("/dev/iommu").exists() {
        found.push(("iommufd", IommuKind::Iommufd));
    }
    found
}

/// (sequence, backend): where the kernel makes a backend answer differently, with the reason
/// written in docs/backends.md's table.
fn differences() -> Vec<(&'static str, &'static str, &'static [i32])> {
    // An unmap cutting through a mapping: vfiokit answers with each kernel's errno for it.
    vec![(
        "maps: overlap, partial unmap, double unmap",
        "iommufd",
        &[0, EEXIST, EEXIST, ENOENT, 0, ENOENT],
    )]
}

pub fn backends_agree() {
    let backends = backends();
    let kernel = std::env::var("VFIOKIT_VM_KERNEL").unwrap_or_default();
    assert_eq!(backends.len(), if kernel == "legacy" { 1 } else { 2 }, "backends on {kernel}");
    let differences = differences();
    let mut wrong = Vec::new();
    // Mappings are compared over the whole run after the first backend's pass (which may grow
    // the allocator's heap once); fds after every sequence.
    let mut maps_after_warmup = None;
    for &(backend, kind) in &backends {
        for &(name, sequence, documented) in SEQUENCES {
            let expected = differences
                .iter()
                .find(|d| d.0 == name && d.1 == backend)
                .map_or(documented, |d| d.2);
            let fds = fds_and_maps().0;
            let outcome = sequence(Iommu::open(kind).unwrap());
            if outcome != expected {
                wrong.push(format!("{name} on {backend}: {outcome:?}, documented {expected:?}"));
            }
            if fds_and_maps().0 != fds {
                wrong.push(format!("{name} on {backend}: fds {fds} -> {}", fds_and_maps().0));
            }
        }
        maps_after_warmup.get_or_insert(fds_and_maps().1);
    }
    assert_eq!(Some(fds_and_maps().1), maps_after_warmup, "mappings after every backend's pass");
    assert!(
        wrong.is_empty(),
        "outcomes that differ from docs/backends.md's table:\n{}",
        wrong.join("\n")
    );
}

/// 0, or the error's errno.
fn open_twice(io: Iommu) -> Vec<i32> {
    let first = Device::open(&addr("EDU"), Some(&io));
    let again = rc(Device::open(&addr("EDU"), Some(&io)));
    let first = rc(first); // and closed
    let reopened = Device::open(&addr("EDU"), Some(&io));
    let read = reopened.as_ref().map_or(-1, |d| rc(d.read_reg::<u32>(0, edu::ID)));
    vec![first, again, rc(reopened), read]
}

fn context_first(io: Iommu) -> Vec<i32> {
    let edu = open_in("EDU", &io);
    drop(io); // the device keeps it alive
    let (buf, _) = edu.iommu().alloc(4096).unwrap();
    vec![
        rc(edu.read_reg::<u32>(0, edu::ID).map(|id| assert_eq!(id, 0x010000ed))),
        rc(edu.iommu().translate(buf.as_ptr(), 1)),
        rc(edu.iommu().free(buf.as_ptr())),
    ]
}

/// Private pages of the caller's own, for maps; unmapped from the process when dropped.
struct Pages(NonNull<u8>, usize);

impl Pages {
    fn new(pages: usize) -> Pages {
        let len = pages * 4096;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        // SAFETY: a fresh anonymous mapping touches no existing memory.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, 3, flags, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        Pages(NonNull::new(p.cast()).unwrap(), len)
    }

    fn ptr(&self) -> *mut u8 {
        self.0.as_ptr()
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: ours; every sequence unmaps its DMA mappings of it first.
        unsafe { libc::munmap(self.0.as_ptr().cast(), self.1) };
    }
}

fn map_rules(io: Iommu) -> Vec<i32> {
    let _edu = open_in("EDU", &io);
    let mem = Pages::new(2);
    let at = 0x40_0000;
    // SAFETY: the pages outlive their mappings (the one made is unmapped below).
    unsafe {
        vec![
            rc(io.map(mem.ptr(), 8192, at)),
            rc(io.map(mem.ptr(), 4096, at)),
            rc(io.map(mem.ptr(), 8192, at - 4096)),
            rc(io.unmap(at, 4096)),
            rc(io.unmap(at - 4096, 16384)),
            rc(io.unmap(at, 8192)),
        ]
    }
}

fn early_maps(io: Iommu) -> Vec<i32> {
    let (buf, iova) = io.alloc(4096).unwrap();
    // SAFETY: our buffer.
    unsafe { std::ptr::write_bytes(buf.as_ptr(), 0x3c, 4096) };
    let edu = open_in("EDU", &io);
    enable_bus_master(&edu);
    edu::dma(&edu, iova, edu::BUFFER, 64, false);
    edu::dma(&edu, edu::BUFFER, iova + 1024, 64, true);
    // SAFETY: the transfer is done; volatile because the device wrote it.
    let back = unsafe { buf.as_ptr().add(1024).read_volatile() };
    vec![
        rc(io.iova_ranges()),
        i32::from(back != 0x3c),
        rc(io.translate(buf.as_ptr(), 4096).map(|t| assert_eq!(t, iova))),
        rc(io.free(buf.as_ptr())),
    ]
}

fn buffer_rules(io: Iommu) -> Vec<i32> {
    let _edu = open_in("EDU", &io);
    let alloc = io.alloc(8192);
    let (buf, iova) = *alloc.as_ref().unwrap();
    vec![
        rc(alloc),
        rc(io.unmap(iova, 8192)),
        rc(io.translate(buf.as_ptr(), 8192)),
        rc(io.free(buf.as_ptr())),
        rc(io.free(buf.as_ptr())),
        rc(io.translate(buf.as_ptr(), 1)),
    ]
}

fn failure_changes_nothing(io: Iommu) -> Vec<i32> {
    let _edu = open_in("EDU", &io);
    let ranges = io.iova_ranges().unwrap();
    let mem = Pages::new(1);
    // SAFETY: mem outlives its one mapping, unmapped in the same step.
    unsafe {
        vec![
            rc(io.map_any_flags(mem.ptr(), 4096, 1 << 9)),
            rc(io.alloc_flags(4096, vfiokit::DMA_HUGE_2M | vfiokit::DMA_HUGE_1G)),
            rc(io.iova_ranges().map(|now| assert_eq!(now, ranges))),
            rc(io.map_any(mem.ptr(), 4096).and_then(|iova| io.unmap(iova, 4096))),
            rc(io.translate(mem.ptr(), 1)),
        ]
    }
}

fn irq_types(io: Iommu) -> Vec<i32> {
    let d = open_in("EDU", &io);
    vec![
        rc(d.irq_enable(IRQ_MSI, 0, 1)),
        rc(d.irq_enable(IRQ_INTX, 0, 1)),
        rc(d.irq_disable(IRQ_MSI)),
        rc(d.irq_disable(IRQ_MSI)),
        rc(d.irq_enable(IRQ_INTX, 0, 1)),
        rc(d.irq_mask(IRQ_INTX, 0)),
        rc(d.irq_unmask(IRQ_INTX, 0)),
        rc(d.irq_disable(IRQ_INTX)),
        rc(d.irq_enable(IRQ_MSIX, 0, 1)),
    ]
}

fn irq_orders(io: Iommu) -> Vec<i32> {
    let d = open_in("NVME", &io);
    vec![
        rc(d.irq_enable(IRQ_MSIX, 0, 4)),
        rc(d.irq_enable(IRQ_MSIX, 2, 1)),
        rc(d.irq_trigger(IRQ_MSIX, 2)
            .and_then(|()| d.irq_wait(IRQ_MSIX, 2, 1000))
            .map(|n| assert_eq!(n, 1))),
        rc(d.irq_disable(IRQ_MSIX)),
        rc(d.irq_trigger(IRQ_MSIX, 0)),
        rc(d.irq_enable(IRQ_MSIX, 0, 1)),
        rc(d.irq_disable(IRQ_MSIX)),
    ]
}

fn reset_live(io: Iommu) -> Vec<i32> {
    let d = open_in("NVME", &io);
    let alloc = io.alloc(4096);
    let buf = alloc.as_ref().map(|&(b, _)| b).unwrap();
    vec![
        rc(alloc),
        rc(d.irq_enable(IRQ_MSIX, 0, 1)),
        rc(d.reset()),
        rc(d.irq_trigger(IRQ_MSIX, 0)
            .and_then(|()| d.irq_wait(IRQ_MSIX, 0, 1000))
            .map(|n| assert_eq!(n, 1))),
        rc(io.translate(buf.as_ptr(), 4096)),
        rc(io.free(buf.as_ptr())),
    ]
}
