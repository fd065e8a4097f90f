//! Devices: opening by each name form and failing with the cause named, binding, the region,
//! area and IRQ records, register and block accessors through the fd and the mappings, range
//! and width checks, config space and capabilities, the info record, fds and features.

use vfiokit::irq::*;
use vfiokit::region::*;
use vfiokit::{Device, Iommu, IommuKind};

use crate::common::*;

pub fn open_by_cdev_path() {
    let cdevs: Vec<String> =
        std::fs::read_dir(format!("/sys/bus/pci/devices/{}/vfio-dev", addr("EDU")))
            .map(|rd| rd.flatten().map(|e| e.file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
    if std::env::var("VFIOKIT_VM_KERNEL").unwrap() == "legacy" {
        assert!(!std::path::Path::new("/dev/vfio/devices").exists(), "6.1 has no device cdevs");
        fails(
            Device::open("/dev/vfio/devices/vfio0", None),
            libc::ENOENT,
            &["no such VFIO device cdev"],
        );
        fails(Iommu::open(IommuKind::Iommufd), libc::ENOENT, &["/dev/iommu"]);
        return;
    }
    let path = format!("/dev/vfio/devices/{}", cdevs[0]);
    let d = Device::open(&path, None).unwrap();
    assert_eq!(d.address(), addr("EDU"));
    assert_eq!(rd::<u32>(&d, 0, edu::ID), 0x010000ed);
}

pub fn open_by_every_name_form() {
    let full = addr("EDU");
    let short = full.strip_prefix("0000:").expect("domain 0").to_owned();
    let sysfs = format!("/sys/bus/pci/devices/{full}");
    let iommu = Iommu::open_auto().unwrap();
    for name in [full.as_str(), short.as_str(), &short.to_uppercase(), sysfs.as_str()] {
        let d = Device::open(name, Some(&iommu)).unwrap_or_else(|e| panic!("open {name}: {e}"));
        assert_eq!(d.address(), full);
        assert_eq!(rd::<u32>(&d, 0, edu::ID), 0x010000ed);
    }
}

pub fn open_failures_name_their_cause() {
    fails(Device::open("0000:00:1e.7", None), libc::ENOENT, &["no PCI device 0000:00:1e.7"]);
    fails(Device::open("00:02", None), libc::EINVAL, &["not a PCI address"]);
    fails(Device::open("/sys/bus/pci", None), libc::EINVAL, &["not a PCI device"]);
    fails(Device::open("/nonexistent/0000:00:03.0", None), libc::ENOENT, &["/nonexistent"]);
    // Devices the guest did not bind: the host bridge (no driver) and the 9p transport,
    // which virtio-pci drives.
    fails(
        Device::open("0000:00:00.0", None),
        libc::ENODEV,
        &["not bound to any driver", "python3 -m vfiokit bind", "driver_override"],
    );
    let virtio = std::fs::read_dir("/sys/bus/pci/devices")
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("vendor")).unwrap().trim() == "0x1af4"
                && std::fs::read_link(e.path().join("driver"))
                    .is_ok_and(|d| d.ends_with("virtio-pci"))
        })
        .expect("a virtio-pci device (the 9p share)");
    let name = virtio.file_name().into_string().unwrap();
    fails(
        Device::open(&name, None),
        libc::ENODEV,
        &["is bound to virtio-pci, not vfio-pci", "driver_override"],
    );
    // Unbinding only ever takes a device from vfio-pci.
    fails(
        vfiokit::unbind(&name),
        libc::EINVAL,
        &["is bound to virtio-pci, not vfio-pci: not unbinding it"],
    );
    assert!(virtio.path().join("driver").exists(), "still bound");
}

/// bind/unbind round trip on pci-testdev, which has no native driver: unbound, then back.
pub fn bind_and_unbind() {
    let a = addr("TESTDEV");
    let driver = || std::fs::read_link(format!("/sys/bus/pci/devices/{a}/driver")).ok();
    vfiokit::bind(&a).unwrap();
    vfiokit::unbind(&a).unwrap();
    assert_eq!(driver(), None);
    fails(Device::open(&a, None), libc::ENODEV, &["not bound to any driver"]);
    vfiokit::bind(&a).unwrap();
    assert!(driver().is_some_and(|d| d.ends_with("vfio-pci")));
    vfiokit::bind(&a).unwrap(); // already bound: nothing to do
    assert_eq!(rd::<u16>(&open("TESTDEV"), PCI_CONFIG, 0), 0x1b36);
}

pub fn edu_records() {
    let d = open("EDU");
    let r = d.regions();
    assert_eq!(r.len(), 9, "vfio-pci's nine fixed regions");
    for (i, rec) in r.iter().enumerate() {
        assert_eq!(rec.index, i as u32);
        assert_eq!(rec.reserved, [0; 3]);
    }
    assert_eq!(r[0].size, 1 << 20);
    assert_eq!(r[0].flags, REGION_PRESENT | REGION_READ | REGION_WRITE | REGION_MMAP);
    assert_eq!(r[PCI_CONFIG as usize].flags, REGION_PRESENT | REGION_READ | REGION_WRITE);
    assert_eq!(r[PCI_CONFIG as usize].size, 256, "conventional PCI config space");
    assert_eq!(r[PCI_VGA as usize].flags, 0, "no VGA: a record with flags 0");
    assert_eq!((r[0].first_area, r[0].num_areas), (0, 1));
    let area = d.areas()[0];
    assert_eq!((area.region, area.offset, area.size), (0, 0, 1 << 20));
    let irqs = d.irqs();
    assert_eq!(irqs.len(), 5);
    assert_eq!(
        (irqs[IRQ_INTX as usize].count, irqs[IRQ_INTX as usize].flags),
        (1, IRQ_EVENTFD | IRQ_MASKABLE | IRQ_AUTOMASKED)
    );
    assert_eq!(
        (irqs[IRQ_MSI as usize].count, irqs[IRQ_MSI as usize].flags),
        (1, IRQ_EVENTFD | IRQ_NORESIZE)
    );
    assert_eq!(irqs[IRQ_MSIX as usize].count, 0);
    assert_eq!(irqs[IRQ_ERR as usize].count, err_irqs_off_pcie(), "not PCIe: ERR irqs");
    assert_eq!(irqs[IRQ_REQ as usize].count, 1);
}

pub fn nvme_records_msix_mappable_mem64() {
    let d = open("NVME");
    let bar0 = d.regions()[0];
    assert_eq!(bar0.flags & REGION_MEM64, REGION_MEM64);
    assert_eq!(
        bar0.flags & REGION_MSIX_MAPPABLE,
        REGION_MSIX_MAPPABLE,
        "vfio-pci lets the MSI-X BAR be mmapped"
    );
    assert_eq!(bar0.flags & REGION_MMAP, REGION_MMAP);
    assert_eq!(d.regions()[1].flags, 0, "the upper half of the 64-bit BAR0");
    assert_eq!(d.regions()[PCI_CONFIG as usize].size, 4096, "PCIe config space");
    assert_eq!(d.irqs()[IRQ_MSIX as usize].count, 65);
    assert_eq!(d.irqs()[IRQ_ERR as usize].count, 1, "PCIe: an ERR irq");
}

pub fn ivshmem_records_prefetchable_64bit() {
    for (role, size) in [("IVSHMEM", 64u64 << 20), ("IVSHMEM_BIG", 8 << 30)] {
        let d = open(role);
        let bar2 = d.regions()[2];
        assert_eq!(bar2.size, size, "{role}");
        assert_eq!(
            bar2.flags,
            REGION_PRESENT
                | REGION_READ
                | REGION_WRITE
                | REGION_MMAP
                | REGION_MEM64
                | REGION_PREFETCH
        );
        assert_eq!(d.regions()[3].flags, 0);
        assert_eq!(
            d.regions()[0].flags & (REGION_MEM64 | REGION_PREFETCH | REGION_IO_PORT),
            0,
            "BAR0 is 32-bit MMIO"
        );
    }
}

pub fn testdev_io_bar_is_not_mmappable() {
    let d = open("TESTDEV");
    let bar1 = d.regions()[1];
    assert_eq!(bar1.flags, REGION_PRESENT | REGION_READ | REGION_WRITE | REGION_IO_PORT);
    assert_eq!(bar1.num_areas, 0);
    fails(d.map(1), libc::ENOTSUP, &["cannot be mmapped", "I/O-port"]);
    fails(d.map(PCI_CONFIG), libc::ENOTSUP, &["cannot be mmapped"]);
    for region in [1, PCI_CONFIG] {
        fails(d.register::<u32>(region, 0), libc::ENOTSUP, &["not in an mmappable area"]);
    }
    assert_eq!(d.irqs()[IRQ_INTX as usize].count, 0, "pci-testdev has no INTx pin");
}

pub fn edu_registers_through_the_mapping() {
    let d = open("EDU");
    let bar0 = d.map(0).unwrap();
    assert_eq!(d.map(0).unwrap(), bar0, "one mapping per region");
    // SAFETY: offset 0 of BAR0 is the id register, inside the mapping.
    assert_eq!(unsafe { bar0.cast::<u32>().as_ptr().read_volatile() }, 0x010000ed);
    for v in [0u32, 0x12345678, u32::MAX] {
        wr(&d, 0, edu::LIVENESS, v);
        assert_eq!(rd::<u32>(&d, 0, edu::LIVENESS), !v);
    }
    wr(&d, 0, edu::FACTORIAL, 10u32);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rd::<u32>(&d, 0, edu::STATUS) & 1 != 0 {
        assert!(std::time::Instant::now() < deadline);
    }
    assert_eq!(rd::<u32>(&d, 0, edu::FACTORIAL), 3628800);
    // The same through registers checked once, the status poll as a driver writes it.
    let reg = |off| d.register::<u32>(0, off).unwrap();
    let (liveness, factorial, status) = (reg(edu::LIVENESS), reg(edu::FACTORIAL), reg(edu::STATUS));
    liveness.write(0x0f0f_0f0f);
    assert_eq!(liveness.read(), 0xf0f0_f0f0);
    factorial.write(5);
    while status.read() & 1 != 0 {
        assert!(std::time::Instant::now() < deadline);
    }
    assert_eq!((factorial.read(), rd::<u32>(&d, 0, edu::FACTORIAL)), (120, 120));
    let mut id = [0u8; 4];
    d.read(0, edu::ID, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x010000ed);
}

/// pci-testdev: writing N to offset 0 selects test N, whose header (test, width, pad[2],
/// offset, data, count, name) then reads back one byte per access; a write at the test's
/// offset counts. Its I/O-port tests sit at odd offsets, so wide accesses go to offset 0.
fn testdev_protocol(d: &Device, bar: u32) {
    let byte = |off: u64| rd::<u8>(d, bar, off) as u32;
    let le32 = |off: u64| (0..4).fold(0, |v, i| v | byte(off + i) << (8 * i));
    wr(d, bar, 0, 0u8);
    let first = byte(0);
    // Writes of each width to the select register reach the device whole.
    wr(d, bar, 0, 1u16);
    assert_eq!(byte(0), first + 1);
    wr(d, bar, 0, 2u32);
    assert_eq!(byte(0), first + 2);
    wr(d, bar, 0, 0u8);
    let (offset, count) = (le32(4) as u64, le32(12));
    let name: Vec<u8> = (16..40).map(|o| byte(o) as u8).take_while(|&b| b != 0).collect();
    assert!(name.ends_with(b"no-eventfd"), "test name {:?}", String::from_utf8_lossy(&name));
    let mut writes = 0;
    for width in [1, 2, 4] {
        if offset % width == 0 {
            match width {
                1 => wr(d, bar, offset, 0xfau8),
                2 => wr(d, bar, offset, 0xfau16),
                _ => wr(d, bar, offset, 0xfau32),
            }
            writes += 1;
        }
    }
    assert_eq!(
        le32(12),
        count + writes,
        "each write at the test's offset {offset:#x} reached the device"
    );
    // Wider reads return the header byte at their offset (the device answers byte-wise).
    assert_eq!(rd::<u16>(d, bar, 12) as u32, (count + writes) & 0xff);
    assert_eq!(rd::<u32>(d, bar, 12), (count + writes) & 0xff);
}

pub fn testdev_io_port_every_width_through_the_fd() {
    testdev_protocol(&open("TESTDEV"), 1);
}

pub fn testdev_mmio_through_the_mapping() {
    let d = open("TESTDEV");
    d.map(0).unwrap();
    testdev_protocol(&d, 0);
}

pub fn ivshmem_map_and_accessors_agree() {
    let d = open("IVSHMEM");
    let size = d.regions()[2].size as usize;
    let base = d.map(2).unwrap().as_ptr();
    // SAFETY: the whole BAR is mapped RAM; nothing else uses it during the test.
    let bar = unsafe { std::slice::from_raw_parts_mut(base, size) };
    for (i, b) in bar.iter_mut().step_by(4096).enumerate() {
        *b = i as u8;
    }
    assert_eq!(rd::<u8>(&d, 2, 4096 * 7), 7);
    wr(&d, 2, 8, 0x1122334455667788u64);
    assert_eq!(&bar[8..16], &0x1122334455667788u64.to_ne_bytes());
    let block: Vec<u8> = (0..=255u8).cycle().take(64 << 10).collect();
    d.write(2, 1 << 20, &block).unwrap();
    let mut back = vec![0u8; block.len()];
    d.read(2, 1 << 20, &mut back).unwrap();
    assert_eq!(back, block);
    assert_eq!(&bar[1 << 20..(1 << 20) + block.len()], &block[..]);
}

pub fn big_bar_far_end() {
    let d = open("IVSHMEM_BIG");
    let size = d.regions()[2].size;
    assert!(size > 1 << 32);
    let end = size - 8;
    wr(&d, 2, end, 0xfeedface_cafef00du64);
    assert_eq!(rd::<u64>(&d, 2, end), 0xfeedface_cafef00d);
    let base = d.map(2).unwrap();
    // SAFETY: end + 8 <= size, inside the mapping.
    let far = unsafe { base.as_ptr().add(end as usize).cast::<u64>() };
    // SAFETY: as above.
    assert_eq!(unsafe { far.read_volatile() }, 0xfeedface_cafef00d);
    // SAFETY: as above.
    unsafe { far.write_volatile(7) };
    assert_eq!(rd::<u64>(&d, 2, end), 7);
    fails(d.read_reg::<u64>(2, size), libc::EINVAL, &["outside"]);
}

pub fn range_and_width_checks() {
    let d = open("EDU");
    fails(d.read_reg::<u32>(0, 2), libc::EINVAL, &["not aligned"]);
    fails(d.read_reg::<u64>(0, 1 << 20), libc::EINVAL, &["outside"]);
    fails(d.read_reg::<u64>(0, u64::MAX - 7), libc::EINVAL, &["outside"]);
    fails(d.read_reg::<u8>(PCI_VGA, 0), libc::EINVAL, &["has no region 8"]);
    fails(d.read_reg::<u8>(99, 0), libc::EINVAL, &["has no region 99"]);
    fails(d.map(PCI_VGA), libc::EINVAL, &["has no region"]);
    let mut buf = [0u8; 16];
    fails(d.read(0, (1 << 20) - 8, &mut buf), libc::EINVAL, &["outside"]);
    fails(d.write(PCI_CONFIG, 250, &buf), libc::EINVAL, &["outside"]);
}

pub fn config_space_and_capabilities() {
    let d = open("NVME");
    assert_eq!(rd::<u16>(&d, PCI_CONFIG, 0), 0x1b36);
    assert_eq!(rd::<u16>(&d, PCI_CONFIG, 2), 0x0010);
    assert_eq!(rd::<u32>(&d, PCI_CONFIG, 0), 0x0010_1b36);
    assert_eq!(rd::<u8>(&d, PCI_CONFIG, 0x0b), 0x01, "class: mass storage");
    let msix = d.find_capability(0x11).unwrap().expect("nvme has MSI-X");
    assert_eq!(rd::<u8>(&d, PCI_CONFIG, msix as u64), 0x11);
    let table_size = (rd::<u16>(&d, PCI_CONFIG, msix as u64 + 2) & 0x7ff) + 1;
    assert_eq!(table_size, 65);
    let pcie = d.find_capability(0x10).unwrap().expect("nvme is PCIe");
    assert_eq!(rd::<u8>(&d, PCI_CONFIG, pcie as u64), 0x10);
    assert_eq!(d.find_capability(0x05).unwrap(), None, "nvme has no MSI");
    assert_eq!(d.find_capability(vfiokit::pci::PCI_CAP_EXTENDED + 0x0001).unwrap(), None, "no AER");
    let edu = open("EDU");
    assert_eq!(edu.find_capability(0x05).unwrap(), Some(0x40));
    assert_eq!(
        edu.find_capability(vfiokit::pci::PCI_CAP_EXTENDED + 0x0001).unwrap(),
        None,
        "256-byte config space"
    );
    // A config write that sticks: the interrupt line register is virtualized by vfio-pci.
    wr(&edu, PCI_CONFIG, 0x3c, 0x5au8);
    assert_eq!(rd::<u8>(&edu, PCI_CONFIG, 0x3c), 0x5a);
}

/// The info record against sysfs and the kernel's own reply through the raw fd; the context's
/// fd is the node it claims; VFIO_DEVICE_FEATURE probes, enters and leaves low power.
pub fn device_info_fds_and_features() {
    use std::os::fd::AsRawFd;
    use vfio_bindings::bindings::vfio as k;
    let d = open("NVME");
    let sysfs = |f: &str| {
        let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{}/{f}", d.address()));
        u32::from_str_radix(text.unwrap().trim().trim_start_matches("0x"), 16).unwrap()
    };
    let info = *d.info();
    assert_eq!(
        (info.vendor_id, info.device_id, info.subsystem_vendor_id, info.subsystem_id),
        (
            sysfs("vendor") as u16,
            sysfs("device") as u16,
            sysfs("subsystem_vendor") as u16,
            sysfs("subsystem_device") as u16
        )
    );
    assert_eq!((info.class_code, u32::from(info.revision)), (sysfs("class"), sysfs("revision")));
    assert_eq!(
        info.flags & (vfiokit::pci::DEVICE_PCI | vfiokit::pci::DEVICE_RESET),
        3,
        "nvme resets"
    );
    assert_eq!(open("EDU").info().flags & vfiokit::pci::DEVICE_RESET, 0, "edu has no reset");

    let mut raw = k::vfio_device_info {
        argsz: size_of::<k::vfio_device_info>() as u32,
        ..Default::default()
    };
    const GET_INFO: u64 = ((k::VFIO_TYPE as u64) << 8) | (k::VFIO_BASE + 7) as u64;
    // SAFETY: VFIO_DEVICE_GET_INFO writes at most argsz bytes into raw.
    assert_eq!(unsafe { libc::ioctl(d.fd().unwrap().as_raw_fd(), GET_INFO as _, &mut raw) }, 0);
    assert_eq!(
        (raw.flags, raw.num_regions, raw.num_irqs),
        (info.flags, info.num_regions, info.num_irqs)
    );
    assert_eq!(
        (d.regions().len(), d.irqs().len()),
        (info.num_regions as usize, info.num_irqs as usize)
    );
    let node = std::fs::read_link(format!("/proc/self/fd/{}", d.iommu().fd().unwrap().as_raw_fd()))
        .unwrap();
    let expected = match d.iommu().kind() {
        IommuKind::Type1 => "/dev/vfio/vfio",
        IommuKind::Iommufd => "/dev/iommu",
        other => unreachable!("the shared context is type1 or iommufd, not {other:?}"),
    };
    assert_eq!(node.to_str(), Some(expected));

    use vfiokit::{FEATURE_GET, FEATURE_PROBE, FEATURE_SET};
    let entry = k::VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY;
    d.map(0).unwrap();
    let cap = rd::<u64>(&d, 0, 0);
    assert_eq!(d.feature(entry, FEATURE_PROBE | FEATURE_SET, &mut []).unwrap(), 0);
    fails(
        d.feature(entry, FEATURE_PROBE | FEATURE_GET, &mut []),
        libc::EINVAL,
        &["VFIO_DEVICE_FEATURE 3"],
    );
    d.feature(entry, FEATURE_SET, &mut []).unwrap();
    d.feature(k::VFIO_DEVICE_FEATURE_LOW_POWER_EXIT, FEATURE_SET, &mut []).unwrap();
    assert_eq!(rd::<u64>(&d, 0, 0), cap, "the mapped BAR reads the same after low power");
    fails(d.feature(0x1_0000, FEATURE_GET, &mut []), libc::EINVAL, &["up to 0xffff"]);
    fails(d.feature(entry, 0, &mut []), libc::EINVAL, &["at least one"]);
    fails(
        d.feature(0x7777, FEATURE_PROBE | FEATURE_GET, &mut []),
        libc::ENOTTY,
        &["VFIO_DEVICE_FEATURE 30583"],
    );
}
