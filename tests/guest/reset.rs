//! Resets: a device's own reset where it has one, refused where it has not; and hot reset with
//! its dependents: nvme (function 0) and edu (function 1) share a slot behind a PCIe root port,
//! so a bus reset of either resets both.

use std::time::{Duration, Instant};

use vfiokit::region::PCI_CONFIG;
use vfiokit::{Device, Iommu};

use crate::common::*;

pub fn reset_where_supported() {
    let nvme = open("NVME");
    wr(&nvme, PCI_CONFIG, 0x3c, 0x11u8);
    nvme.reset().unwrap();
    let edu = open("EDU");
    fails(edu.reset(), libc::ENOTSUP, &["does not support reset"]);
}

// NVMe controller registers (BAR0).
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;
const AQA: u64 = 0x24;
const ASQ: u64 = 0x28;
const ACQ: u64 = 0x30;
const CSTS_RDY: u32 = 1;

/// Enables the controller with an admin queue pair in fresh DMA memory: CSTS.RDY goes to 1.
fn enable_nvme(nvme: &Device) {
    enable_bus_master(nvme);
    let (_, sq) = nvme.iommu().alloc(4096).unwrap();
    let (_, cq) = nvme.iommu().alloc(4096).unwrap();
    wr(nvme, 0, AQA, (15u32 << 16) | 15);
    wr(nvme, 0, ASQ, sq);
    wr(nvme, 0, ACQ, cq);
    // 64-byte submission and 16-byte completion entries, 4 KiB pages, the NVM command set.
    wr(nvme, 0, CC, (4u32 << 20) | (6 << 16) | 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rd::<u32>(nvme, 0, CSTS) & CSTS_RDY == 0 {
        assert!(Instant::now() < deadline, "the NVMe controller did not become ready");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn addresses(d: &Device) -> Vec<(String, u32)> {
    let mut deps: Vec<(String, u32)> =
        d.hot_reset_info().unwrap().iter().map(|h| (h.address().to_string(), h.owned)).collect();
    deps.sort();
    deps
}

pub fn hot_reset_resets_every_dependent() {
    let (nvme_addr, edu_addr) = (addr("RESET_NVME"), addr("RESET_EDU"));
    let iommu = Iommu::open_auto().unwrap();
    let edu = open_in("RESET_EDU", &iommu);
    // Only edu open here: the reset would take the nvme with it, so it is refused, naming it.
    assert_eq!(addresses(&edu), [(nvme_addr.clone(), 0), (edu_addr.clone(), 1)]);
    let group = edu.hot_reset_info().unwrap()[0].group;
    assert_eq!(group.to_string(), group_of_address(&nvme_addr), "the kernel's group or sysfs's");
    fails(edu.hot_reset(), libc::EPERM, &[&nvme_addr, "not open in its IOMMU context"]);

    // Held by another process, the nvme cannot join this context, nor the reset go ahead there.
    let nvme = open_in("RESET_NVME", &iommu);
    in_child(|| {
        let other = Iommu::open_auto().unwrap();
        let edu = Device::open(&edu_addr, Some(&other));
        // On type1 the group is this process's already (EBUSY at its open); on iommufd the
        // device is: either way the reset cannot be had from here.
        match edu {
            Err(e) => assert_eq!(e.errno(), libc::EBUSY, "{e}"),
            Ok(edu) => fails(edu.hot_reset(), libc::EPERM, &[&nvme_addr]),
        }
    });

    // Both open in one context: the reset goes through and the controller is reset.
    enable_nvme(&nvme);
    assert_eq!(addresses(&edu), [(nvme_addr.clone(), 1), (edu_addr.clone(), 1)]);
    edu.hot_reset().unwrap();
    assert_eq!(rd::<u32>(&nvme, 0, CSTS) & CSTS_RDY, 0, "CSTS.RDY after the bus reset");
    assert_eq!(rd::<u32>(&edu, 0, edu::ID), 0x010000ed, "edu answers after the reset");
    // From the nvme's side too, and again after re-enabling.
    enable_nvme(&nvme);
    nvme.hot_reset().unwrap();
    assert_eq!(rd::<u32>(&nvme, 0, CSTS) & CSTS_RDY, 0);

    // A device on the root bus has no bus or slot reset to offer.
    let lone = open("EDU");
    fails(lone.hot_reset_info(), libc::ENOTSUP, &["no bus or slot reset"]);
}
