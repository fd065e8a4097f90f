//! SR-IOV with VF tokens: the test bed's nvme PF (SRIOV_PF, 2 VFs, vfio-pci loaded with
//! enable_sriov=1) gets a VF token, enables its VFs, and a VF opens only with that token: in
//! the group's device name on type1, with VFIO_DEVICE_BIND_FLAG_TOKEN on the cdev (Linux 6.17+;
//! refused, naming 6.17, before).

use vfiokit::region::PCI_CONFIG;
use vfiokit::sriov::VfToken;
use vfiokit::{Device, Iommu, IommuKind, sriov_set_numvfs};

use crate::common::*;

const TOKEN: &str = "bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3";
const WRONG: &str = "00000000-0000-0000-0000-000000000001";

fn sysfs(addr: &str, attr: &str) -> String {
    std::fs::read_to_string(format!("/sys/bus/pci/devices/{addr}/{attr}"))
        .unwrap_or_else(|e| panic!("{addr}/{attr}: {e}"))
        .trim()
        .to_owned()
}

fn token_on_cdev() -> bool {
    // 6.17+: the 7.3 guest; 6.1 has no cdev and 6.12 no BIND_FLAG_TOKEN.
    std::env::var("VFIOKIT_VM_KERNEL").unwrap() == "latest"
}

pub fn vfs_open_with_their_pfs_token() {
    let pf_addr = addr("SRIOV_PF");
    let (token, wrong): (VfToken, VfToken) = (TOKEN.parse().unwrap(), WRONG.parse().unwrap());
    let iommu = Iommu::open_auto().unwrap();
    assert_eq!(iommu.kind(), expected_kind());
    let pf = open_in("SRIOV_PF", &iommu);
    pf.set_vf_token(&token).unwrap();
    assert_eq!(sysfs(&pf_addr, "sriov_totalvfs"), "2");
    let vfs = sriov_set_numvfs(&pf_addr, 2).unwrap();
    assert_eq!(vfs.len(), 2, "{vfs:?}");
    assert_eq!(sysfs(&pf_addr, "sriov_numvfs"), "2");
    for vf in &vfs {
        let physfn = std::fs::read_link(format!("/sys/bus/pci/devices/{vf}/physfn")).unwrap();
        assert!(physfn.ends_with(&pf_addr), "{vf}'s PF is {physfn:?}");
        let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{vf}/driver")).unwrap();
        assert!(driver.ends_with("vfio-pci"), "{vf} is bound to {driver:?}");
    }
    let vf = &vfs[0];
    let findings = vfiokit::doctor(Some(vf));
    let hint: Vec<_> = findings.iter().filter(|f| f.code == vfiokit::FINDING_VF_TOKEN).collect();
    assert!(hint.len() == 1 && hint[0].message().contains(&pf_addr), "{findings:?}");
    assert!(vfiokit::doctor(Some(&pf_addr)).iter().all(|f| f.code != vfiokit::FINDING_VF_TOKEN));
    let cdev = iommu.kind() == IommuKind::Iommufd;
    if !cdev || token_on_cdev() {
        fails(Device::open(vf, Some(&iommu)), libc::EACCES, &[vf, &pf_addr, "no token was given"]);
        fails(Device::open_vf(vf, Some(&iommu), &wrong), libc::EACCES, &[&pf_addr, WRONG]);
        let d = Device::open_vf(vf, Some(&iommu), &token).unwrap();
        // vfio-pci gives a VF's config space the ids sysfs shows (a VF's own read 0xffff).
        let vendor = u16::from_str_radix(sysfs(vf, "vendor").trim_start_matches("0x"), 16).unwrap();
        let device = u16::from_str_radix(sysfs(vf, "device").trim_start_matches("0x"), 16).unwrap();
        assert_eq!(rd::<u16>(&d, PCI_CONFIG, 0), vendor);
        assert_eq!(rd::<u16>(&d, PCI_CONFIG, 2), device);
        assert_eq!(vendor, 0x1b36);
        drop(d);
    } else {
        fails(
            Device::open_vf(vf, Some(&iommu), &token),
            libc::EOPNOTSUPP,
            &["Linux 6.17", "type1"],
        );
    }
    // The VFs go before they are disabled (the kernel waits for their users).
    assert_eq!(sriov_set_numvfs(&pf_addr, 0).unwrap(), Vec::<String>::new());
    assert_eq!(sysfs(&pf_addr, "sriov_numvfs"), "0");
    // Not a PF.
    let edu = open_in("EDU", &iommu);
    fails(edu.set_vf_token(&token), libc::ENOTSUP, &["not an SR-IOV PF"]);
    fails(sriov_set_numvfs(&addr("EDU"), 1), libc::ENOTSUP, &["not an SR-IOV PF"]);
    fails(sriov_set_numvfs(&pf_addr, 3), libc::EINVAL, &["at most 2 VFs"]);
}
