//! vfiokit against the real kernel's VFIO, in the test guest. `cargo test --test guest` boots
//! the guest; see harness.rs.

mod common;
mod device;
mod dma;
mod doctor;
mod equivalence;
mod fidelity;
mod handoff;
mod harness;
mod hotreset;
mod irq;
mod noiommu;

use common::*;
use vfiokit::irq::*;
use vfiokit::region::*;
use vfiokit::{Device, Iommu, IommuKind};

const CASES: &[harness::Case] = &[
    ("backend_choice", backend_choice),
    ("open_by_every_name_form", device::open_by_every_name_form),
    ("open_by_cdev_path", device::open_by_cdev_path),
    ("open_failures_name_their_cause", device::open_failures_name_their_cause),
    ("bind_and_unbind", device::bind_and_unbind),
    ("group_of_two_devices_opened_once", group_of_two_devices_opened_once),
    ("non_viable_group_names_its_blocker", non_viable_group_names_its_blocker),
    ("edu_records", device::edu_records),
    ("nvme_records_msix_mappable_mem64", device::nvme_records_msix_mappable_mem64),
    ("ivshmem_records_prefetchable_64bit", device::ivshmem_records_prefetchable_64bit),
    ("testdev_io_bar_is_not_mmappable", device::testdev_io_bar_is_not_mmappable),
    ("edu_registers_through_the_mapping", device::edu_registers_through_the_mapping),
    (
        "testdev_io_port_every_width_through_the_fd",
        device::testdev_io_port_every_width_through_the_fd,
    ),
    ("testdev_mmio_through_the_mapping", device::testdev_mmio_through_the_mapping),
    ("ivshmem_map_and_accessors_agree", device::ivshmem_map_and_accessors_agree),
    ("big_bar_far_end", device::big_bar_far_end),
    ("range_and_width_checks", device::range_and_width_checks),
    ("config_space_and_capabilities", device::config_space_and_capabilities),
    ("edu_msi_raised_interrupt_is_seen", irq::edu_msi_raised_interrupt_is_seen),
    ("edu_intx_must_be_unmasked_to_fire_again", irq::edu_intx_must_be_unmasked_to_fire_again),
    ("nvme_msix_subrange_and_trigger", irq::nvme_msix_subrange_and_trigger),
    ("err_and_req_irqs", irq::err_and_req_irqs),
    ("irq_misuse", irq::irq_misuse),
    ("reenabled_vectors_start_empty", irq::reenabled_vectors_start_empty),
    ("disable_and_cancel_end_waits", irq::disable_and_cancel_end_waits),
    ("caller_eventfds", irq::caller_eventfds),
    ("iova_ranges_and_mapping_rules", dma::iova_ranges_and_mapping_rules),
    ("edu_dma_round_trip", dma::edu_dma_round_trip),
    ("type1_v1_and_iommufd_compat_kinds", type1_v1_and_iommufd_compat_kinds),
    ("dma_errors_are_the_kernels", fidelity::dma_errors_are_the_kernels),
    ("region_and_irq_errors_are_the_kernels", fidelity::region_and_irq_errors_are_the_kernels),
    ("dma_to_unmapped_iova_does_not_reach_memory", dma::dma_to_unmapped_iova_does_not_reach_memory),
    ("readonly_dma_memory_is_not_written", dma::readonly_dma_memory_is_not_written),
    ("p2p_dma_through_another_devices_bar", dma::p2p_dma_through_another_devices_bar),
    ("hugepage_buffers", dma::hugepage_buffers),
    ("guard_pages_stop_an_overrun", dma::guard_pages_stop_an_overrun),
    ("maps_before_the_first_device", dma::maps_before_the_first_device),
    ("dma_flag_and_buffer_misuse", dma::dma_flag_and_buffer_misuse),
    ("reset_where_supported", reset_where_supported),
    ("device_info_fds_and_features", device::device_info_fds_and_features),
    ("several_devices_and_contexts", several_devices_and_contexts),
    ("group_not_permitted", group_not_permitted),
    ("memlock_too_low_is_named", memlock_too_low_is_named),
    ("open_close_cycles_leak_nothing", open_close_cycles_leak_nothing),
    ("open_map_alloc_cycles_leak_nothing", open_map_alloc_cycles_leak_nothing),
    ("threads_share_handles", threads_share_handles),
    ("fds_are_close_on_exec", fds_are_close_on_exec),
    (
        "exit_without_close_leaves_the_device_reusable",
        exit_without_close_leaves_the_device_reusable,
    ),
    ("second_process_gets_ebusy", second_process_gets_ebusy),
    ("handoff_to_an_unprivileged_process", handoff::handoff_to_an_unprivileged_process),
    ("malformed_handoffs_are_refused", handoff::malformed_handoffs_are_refused),
    ("doctor_finds_each_problem_with_its_fix", doctor::doctor_finds_each_problem_with_its_fix),
    ("hot_reset_resets_every_dependent", hotreset::hot_reset_resets_every_dependent),
    ("backends_agree", equivalence::backends_agree),
    ("noiommu_refused_with_its_cause", noiommu::noiommu_refused_with_its_cause),
];

/// The cases for a guest without an IOMMU (VFIOKIT_VM_KERNELS entries `KERNEL:noiommu`).
const NOIOMMU_CASES: &[harness::Case] = &[
    ("noiommu_dma_and_msi", noiommu::noiommu_dma_and_msi),
    // Last: on the legacy kernel it unloads vfio-pci.
    ("noiommu_doctor", noiommu::noiommu_doctor),
];

fn main() -> std::process::ExitCode {
    harness::main(CASES, NOIOMMU_CASES)
}

fn backend_choice() {
    let kernel = std::env::var("VFIOKIT_VM_KERNEL").unwrap();
    assert_eq!(
        kernel == "iommufd",
        std::path::Path::new("/dev/iommu").exists(),
        "only the iommufd kernel has /dev/iommu"
    );
    assert_eq!(Iommu::open_auto().unwrap().kind(), expected_kind());
    assert_eq!(open("EDU").iommu().kind(), expected_kind(), "the shared context");
    assert_eq!(
        Iommu::open(IommuKind::Type1).unwrap().kind(),
        IommuKind::Type1,
        "type1 is there on both kernels"
    );
    fails(IommuKind::from_code(8), libc::EINVAL, &["unknown IOMMU kind 8", "7 no-IOMMU"]);
    if kernel == "iommufd" {
        assert_eq!(Iommu::open(IommuKind::Iommufd).unwrap().kind(), IommuKind::Iommufd);
        // One device bound through iommufd cannot be opened again through its group.
        let fd_ctx = Iommu::open(IommuKind::Iommufd).unwrap();
        let _edu = open_in("EDU", &fd_ctx);
        fails(
            Device::open(&addr("EDU"), Some(&Iommu::open(IommuKind::Type1).unwrap())),
            libc::EBUSY,
            &[],
        );
        fails(
            Device::open(&addr("EDU"), Some(&Iommu::open(IommuKind::Iommufd).unwrap())),
            libc::EBUSY,
            &["already bound"],
        );
    } else {
        fails(Iommu::open(IommuKind::Iommufd), libc::ENOENT, &["/dev/iommu", "CONFIG_IOMMUFD"]);
    }
}

/// libvfio's other container modes: type1 v1, and /dev/iommu used as a container (v2 and v1).
/// Each carries edu's DMA round trip; a raw unmap of a mapping's second page shows how their
/// unmaps differ (VFIO_IOMMU_UNMAP_DMA through the container fd).
fn type1_v1_and_iommufd_compat_kinds() {
    let page = 4096usize;
    for kind in [IommuKind::Type1V1, IommuKind::IommufdCompat, IommuKind::IommufdCompatV1] {
        let iommu = match Iommu::open(kind) {
            Err(e)
                if kind != IommuKind::Type1V1 && !std::path::Path::new("/dev/iommu").exists() =>
            {
                fails::<()>(Err(e), libc::ENOENT, &["/dev/iommu", "CONFIG_IOMMUFD"]);
                continue;
            }
            other => other.unwrap_or_else(|e| panic!("{kind:?}: {e}")),
        };
        assert_eq!(iommu.kind(), kind);
        let d = open_in("EDU", &iommu);
        enable_bus_master(&d);
        let (src, src_iova) = iommu.alloc(page).unwrap();
        let (dst, dst_iova) = iommu.alloc(page).unwrap();
        // SAFETY: our buffer; the device only reads it during the transfer.
        unsafe { std::ptr::write_bytes(src.as_ptr(), 0xa5, 64) };
        edu::dma(&d, src_iova, edu::BUFFER, 64, false);
        edu::dma(&d, edu::BUFFER, dst_iova, 64, true);
        assert_eq!(volatile_bytes(dst, 64), vec![0xa5; 64], "{kind:?}: round trip");
        // Two pages mapped at once; then the raw unmap of the second page alone.
        let (two, iova) = iommu.alloc(2 * page).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&iommu.fd().unwrap());
        let (rc, errno, unmapped) = raw_type1_unmap(fd, iova + page as u64, page as u64);
        match kind {
            // v1 keeps a mapping whole: an unmap starting inside it succeeds and removes nothing.
            IommuKind::Type1V1 => assert_eq!((rc, unmapped), (0, 0), "{kind:?}"),
            // iommufd's v1 compatibility splits the mapping and removes the page.
            IommuKind::IommufdCompatV1 => assert_eq!((rc, unmapped), (0, page as u64), "{kind:?}"),
            // v2 semantics refuse to split a mapping.
            _ => assert!(rc < 0 && errno != 0, "{kind:?}: rc {rc}, {unmapped:#x} unmapped"),
        }
        let _ = two;
        drop(d);
        drop(iommu);
    }
}

fn reset_where_supported() {
    let nvme = open("NVME");
    wr(&nvme, PCI_CONFIG, 0x3c, 0x11u8);
    nvme.reset().unwrap();
    let edu = open("EDU");
    fails(edu.reset(), libc::ENOTSUP, &["does not support reset"]);
}

fn several_devices_and_contexts() {
    // Two devices in one context share its DMA space.
    let shared = Iommu::open_auto().unwrap();
    let edu = open_in("EDU", &shared);
    let nvme = open_in("NVME", &shared);
    assert!(std::ptr::eq(edu.iommu() as *const _, edu.iommu() as *const _));
    let (buf, _) = nvme.iommu().alloc(4096).unwrap();
    edu.iommu().free(buf.as_ptr()).unwrap();
    // One handle per device and context, on every backend (the place is free again at close,
    // below).
    fails(
        Device::open(&addr("EDU"), Some(&shared)),
        libc::EBUSY,
        &["already open in this IOMMU context"],
    );
    // A device already in one context cannot join another.
    let other = Iommu::open_auto().unwrap();
    fails(Device::open(&addr("EDU"), Some(&other)), libc::EBUSY, &["already"]);
    // Separate contexts for separate devices.
    let testdev = open_in("TESTDEV", &other);
    assert_eq!(rd::<u16>(&testdev, PCI_CONFIG, 0), 0x1b36);
    // Closed and opened again, in the same context; then in a new one once the old is gone.
    drop(edu);
    let edu = open_in("EDU", &shared);
    assert_eq!(rd::<u32>(&edu, 0, edu::ID), 0x010000ed);
    drop((edu, nvme, shared));
    let edu = open_in("EDU", &other);
    assert_eq!(rd::<u32>(&edu, 0, edu::ID), 0x010000ed);
    // The default context is shared by devices opened without one.
    let a = open("IVSHMEM");
    let b = open("IVSHMEM_BIG");
    let (buf, _) = a.iommu().alloc(4096).unwrap();
    b.iommu().free(buf.as_ptr()).unwrap();
}

fn group_not_permitted() {
    in_child(|| {
        // SAFETY: dropping privileges in the child only.
        assert_eq!(unsafe { libc::setgid(65534) + libc::setuid(65534) }, 0);
        if expected_kind() == IommuKind::Iommufd {
            fails(Iommu::open_auto(), libc::EACCES, &["/dev/iommu", "permission"]);
            return;
        }
        let iommu = Iommu::open_auto().expect("the container node is world-accessible");
        let group = std::fs::read_link(format!("/sys/bus/pci/devices/{}/iommu_group", addr("EDU")))
            .unwrap();
        let node = format!("/dev/vfio/{}", group.file_name().unwrap().to_string_lossy());
        fails(Device::open(&addr("EDU"), Some(&iommu)), libc::EACCES, &[&node, "permission"]);
    });
}

fn memlock_too_low_is_named() {
    in_child(|| {
        drop_capability(CAP_IPC_LOCK);
        let limit = 64 << 10;
        let rl = libc::rlimit { rlim_cur: limit, rlim_max: limit };
        // SAFETY: plain setrlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) }, 0);
        let d = open("EDU");
        let asked = 1 << 20;
        fails(
            d.iommu().alloc(asked),
            libc::ENOMEM,
            &["RLIMIT_MEMLOCK is 65536 bytes", &format!("{asked} more")],
        );
    });
}

fn open_close_cycles_leak_nothing() {
    let cycle = || {
        let iommu = Iommu::open_auto().unwrap();
        let d = open_in("NVME", &iommu);
        d.map(0).unwrap();
        d.irq_enable(IRQ_MSIX, 0, 4).unwrap();
        let (buf, _) = iommu.alloc(8192).unwrap();
        let (_kept, _) = iommu.alloc(4096).unwrap(); // freed by the context's close
        iommu.free(buf.as_ptr()).unwrap();
        let big = open_in("IVSHMEM_BIG", &iommu);
        big.map(2).unwrap();
    };
    cycle(); // first use may allocate process-wide state (thread-locals, the allocator's arenas)
    let before = fds_and_maps();
    // 5: a leak shows after one cycle; each costs 1.3-2.8 s of guest time (two devices opened,
    // released and reset by the kernel), and the case below covers repetition.
    for _ in 0..5 {
        cycle();
    }
    assert_eq!(fds_and_maps(), before, "(fds, mappings) after 5 open/map/irq/dma/close cycles");
}

/// Register accesses, DMA map/unmap and IRQ waits from many threads on shared handles at once,
/// with every result checked and a bound on the time.
fn threads_share_handles() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const ROUNDS: u64 = 2000;
    const TRIGGERS: u64 = 200;
    let iommu = Iommu::open_auto().unwrap();
    let edu = Arc::new(open_in("EDU", &iommu));
    let shm = Arc::new(open_in("IVSHMEM", &iommu));
    let nvme = Arc::new(open_in("NVME", &iommu));
    nvme.irq_enable(IRQ_MSIX, 0, 1).unwrap();
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    // Readers of edu's id register (trapping MMIO), and writers of their own slice of ivshmem.
    for t in 0..4u64 {
        let (edu, shm) = (edu.clone(), shm.clone());
        workers.push(std::thread::spawn(move || {
            for i in 0..ROUNDS {
                assert_eq!(edu.read_reg::<u32>(0, edu::ID).unwrap(), 0x010000ed);
                let off = t * 4096 + (i % 512) * 8;
                shm.write_reg(2, off, t << 32 | i).unwrap();
                assert_eq!(shm.read_reg::<u64>(2, off).unwrap(), t << 32 | i);
            }
        }));
    }
    // DMA buffers allocated and freed concurrently never share an IOVA.
    let live = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    for _ in 0..2 {
        let (iommu, live) = (iommu.clone(), live.clone());
        workers.push(std::thread::spawn(move || {
            for _ in 0..100 {
                let (buf, iova) = iommu.alloc(8192).unwrap();
                assert!(live.lock().unwrap().insert(iova), "IOVA {iova:#x} handed out twice");
                // SAFETY: our fresh buffer; held a while so the other thread's allocations overlap.
                unsafe { std::ptr::write_bytes(buf.as_ptr(), 0x5a, 8192) };
                std::thread::yield_now();
                assert!(live.lock().unwrap().remove(&iova));
                iommu.free(buf.as_ptr()).unwrap();
            }
        }));
    }
    // One thread waits for interrupts while another triggers them: none is lost.
    let seen = Arc::new(AtomicU64::new(0));
    let waiter = {
        let (nvme, seen) = (nvme.clone(), seen.clone());
        std::thread::spawn(move || {
            while seen.load(Ordering::Relaxed) < TRIGGERS {
                let n = nvme.irq_wait(IRQ_MSIX, 0, 10_000).expect("an interrupt within 10 s");
                seen.fetch_add(n, Ordering::Relaxed);
            }
        })
    };
    {
        let nvme = nvme.clone();
        workers.push(std::thread::spawn(move || {
            for _ in 0..TRIGGERS {
                nvme.irq_trigger(IRQ_MSIX, 0).unwrap();
            }
        }));
    }
    for w in workers {
        w.join().expect("worker");
    }
    waiter.join().expect("waiter");
    assert_eq!(seen.load(Ordering::Relaxed), TRIGGERS, "every trigger counted once");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "no deadlock: {:?}",
        started.elapsed()
    );
    println!(
        "  7 threads: {} register round trips, 200 DMA alloc/free, {TRIGGERS} IRQs in {:?}",
        4 * ROUNDS,
        started.elapsed()
    );
}

/// Everything vfiokit opens is close-on-exec: a child that execs inherits no VFIO fd.
fn fds_are_close_on_exec() {
    let d = open("NVME");
    d.irq_enable(IRQ_MSIX, 0, 2).unwrap();
    let _buf = d.iommu().alloc(4096).unwrap();
    let out =
        std::process::Command::new("/bin/ls").arg("-l").arg("/proc/self/fd/").output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    for vfio_fd in ["/dev/vfio", "/dev/iommu", "eventfd", "anon_inode:[vfio"] {
        assert!(!listing.contains(vfio_fd), "{vfio_fd} leaked into an exec'd child:\n{listing}");
    }
}

/// A process that exits without closing anything leaves the device usable by the next one.
fn exit_without_close_leaves_the_device_reusable() {
    in_child(|| {
        let d = open("EDU");
        enable_bus_master(&d);
        d.irq_enable(IRQ_MSI, 0, 1).unwrap();
        let (buf, _) = d.iommu().alloc(1 << 20).unwrap();
        std::mem::forget((d, buf));
        // SAFETY: exiting on purpose without running destructors.
        unsafe { libc::_exit(0) };
    });
    let d = open("EDU");
    assert_eq!(rd::<u32>(&d, 0, edu::ID), 0x010000ed);
    d.irq_enable(IRQ_MSI, 0, 1).unwrap();
    d.irq_trigger(IRQ_MSI, 0).unwrap();
    assert_eq!(d.irq_wait(IRQ_MSI, 0, 1000).unwrap(), 1);
}

/// A device open in one process is refused to another, with a message that says so.
fn second_process_gets_ebusy() {
    let _held = open("EDU");
    in_child(|| {
        let iommu = Iommu::open_auto().unwrap();
        fails(Device::open(&addr("EDU"), Some(&iommu)), libc::EBUSY, &["already", "process"]);
    });
}

/// Locked and pinned memory of this process (kB): what leaked DMA mappings would grow.
fn locked_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or(0, |v| v.trim().trim_end_matches(" kB").parse().unwrap())
    };
    (field("VmLck:"), field("VmPin:"))
}

/// VFIOKIT_CYCLES (200 in `make test`, 10,000 in `make soak`) each of device open/close, DMA
/// map/unmap and DMA alloc/free: fds, mappings, locked and pinned memory end where they
/// started. Prints the time spent in each of the three.
fn open_map_alloc_cycles_leak_nothing() {
    let cycles: usize = std::env::var("VFIOKIT_CYCLES").map_or(200, |v| v.parse().unwrap());
    let iommu = Iommu::open_auto().unwrap();
    let keep = open_in("NVME", &iommu); // keeps a type1 container's group, hence its mappings
    let (buf, _) = iommu.alloc(4096).unwrap();
    let spent = std::cell::Cell::new([std::time::Duration::ZERO; 3]);
    let timed = |phase: usize, f: &dyn Fn()| {
        let t = std::time::Instant::now();
        f();
        let mut s = spent.get();
        s[phase] += t.elapsed();
        spent.set(s);
    };
    let cycle = |i: usize| {
        timed(0, &|| {
            let d = open_in("EDU", &iommu);
            assert_eq!(rd::<u32>(&d, 0, edu::ID), 0x010000ed);
        });
        let iova = 0x100_0000 + (i as u64 % 64) * 4096;
        // SAFETY: buf lives until the end of the test; mapped and unmapped here.
        timed(1, &|| unsafe {
            iommu.map(buf.as_ptr(), 4096, iova).unwrap();
            iommu.unmap(iova, 4096).unwrap();
        });
        timed(2, &|| {
            let (b, _) = iommu.alloc(8192).unwrap();
            iommu.free(b.as_ptr()).unwrap();
        });
    };
    cycle(0);
    let (before, locked) = (fds_and_maps(), locked_kb());
    let started = std::time::Instant::now();
    for i in 1..=cycles {
        cycle(i);
    }
    assert_eq!(fds_and_maps(), before, "(fds, mappings) after {cycles} cycles");
    assert_eq!(locked_kb(), locked, "(VmLck, VmPin) kB after {cycles} cycles");
    let [open, map, alloc] = spent.get();
    println!(
        "  {cycles} x (open + close, map + unmap, alloc + free) in {:?} ({open:?}, {map:?}, {alloc:?}): fds, maps, locked {locked:?} kB unchanged",
        started.elapsed()
    );
    iommu.free(buf.as_ptr()).unwrap();
    drop(keep);
}

/// Two functions of one slot share an IOMMU group: both open in one context, the group node
/// opened once (type1); another context cannot take either.
fn group_of_two_devices_opened_once() {
    let group = group_of("GROUP_A");
    assert_eq!(group, group_of("GROUP_B"), "the test bed's multi-function slot shares a group");
    let iommu = Iommu::open_auto().unwrap();
    let a = open_in("GROUP_A", &iommu);
    let b = open_in("GROUP_B", &iommu);
    assert_eq!(rd::<u32>(&a, 0, edu::ID), 0x010000ed);
    assert_eq!(rd::<u16>(&b, PCI_CONFIG, 2), 0x0005, "pci-testdev");
    let node = format!("/dev/vfio/{group}");
    let opened = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == node))
        .count();
    let expected = if iommu.kind() == IommuKind::Type1 { 1 } else { 0 };
    assert_eq!(opened, expected, "{node} opened once for both devices (type1), never (iommufd)");
    drop(b);
    let other = Iommu::open_auto().unwrap();
    fails(Device::open(&addr("GROUP_B"), Some(&other)), libc::EBUSY, &[]);
}

/// A group with a member bound to another driver cannot be used; the error names that member.
fn non_viable_group_names_its_blocker() {
    let group = group_of("NONVIABLE");
    let blocker = std::fs::read_dir(format!("/sys/kernel/iommu_groups/{group}/devices"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .find(|a| *a != addr("NONVIABLE"))
        .expect("a second device in the group");
    let why = format!("{blocker} is bound to virtio-pci");
    fails(
        Device::open(&addr("NONVIABLE"), None),
        libc::EBUSY,
        &[&format!("group {group} is not viable"), &why],
    );
}
