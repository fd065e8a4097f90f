//! IOMMU backends, contexts and groups: the backend AUTO picks, type1 v1 and iommufd's
//! compatibility kinds, several devices and contexts, a group node the process may not open,
//! a group of two devices opened once, and a group that is not viable.

use vfiokit::region::PCI_CONFIG;
use vfiokit::{Device, Iommu, IommuKind};

use crate::common::*;

pub fn backend_choice() {
    let kernel = std::env::var("VFIOKIT_VM_KERNEL").unwrap();
    assert_eq!(
        kernel != "legacy",
        std::path::Path::new("/dev/iommu").exists(),
        "the kernels built from source have /dev/iommu, Debian's 6.1 has not"
    );
    assert_eq!(Iommu::open_auto().unwrap().kind(), expected_kind());
    assert_eq!(open("EDU").iommu().kind(), expected_kind(), "the shared context");
    assert_eq!(
        Iommu::open(IommuKind::Type1).unwrap().kind(),
        IommuKind::Type1,
        "type1 is there on both kernels"
    );
    fails(IommuKind::from_code(8), libc::EINVAL, &["unknown IOMMU kind 8", "7 no-IOMMU"]);
    if kernel != "legacy" {
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
pub fn type1_v1_and_iommufd_compat_kinds() {
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

pub fn several_devices_and_contexts() {
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

pub fn group_not_permitted() {
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

/// Two functions of one slot share an IOMMU group: both open in one context, the group node
/// opened once (type1); another context cannot take either.
pub fn group_of_two_devices_opened_once() {
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
pub fn non_viable_group_names_its_blocker() {
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
