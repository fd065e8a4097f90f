//! `doctor`: the set-up problems users meet first, found in one call, each with how to fix it.
//! Reads sysfs, /dev and this process's limits; changes nothing.

use std::ffi::c_char;
use std::path::Path;

use crate::text::{fill, text};

use crate::host::{self, ENABLE_SRIOV_PARAM, PciDevice, VFIO_DRIVER};
use crate::iommu::NOIOMMU_PARAM;
use crate::sys::{self, sysfs};

/// How much a finding matters.
pub const SEVERITY_INFO: u32 = 0;
/// Works, but something will be missing or slow.
pub const SEVERITY_WARNING: u32 = 1;
/// Opening the device (or any device) fails until this is fixed.
pub const SEVERITY_BLOCKER: u32 = 2;

/// No IOMMU is active (firmware or kernel command line).
pub const FINDING_IOMMU_OFF: u32 = 1;
/// The vfio-pci driver is not loaded.
pub const FINDING_VFIO_PCI_MISSING: u32 = 2;
/// No such device.
pub const FINDING_NO_DEVICE: u32 = 3;
/// The device is bound to another driver, or to none.
pub const FINDING_NOT_BOUND: u32 = 4;
/// Another device of the group is bound to a driver other than vfio-pci.
pub const FINDING_GROUP_NOT_VIABLE: u32 = 5;
/// A node this process must open (group, cdev, /dev/iommu) is not readable and writable.
pub const FINDING_NODE_PERMISSION: u32 = 6;
/// RLIMIT_MEMLOCK is low and the process lacks CAP_IPC_LOCK: DMA maps beyond it fail.
pub const FINDING_MEMLOCK_LOW: u32 = 7;
/// No iommufd or no VFIO device cdev: the type1 backend is used.
pub const FINDING_NO_IOMMUFD: u32 = 8;
/// No 2 MiB hugepages reserved: DMA_HUGE_2M allocations fail.
pub const FINDING_NO_HUGEPAGES: u32 = 9;
/// The device has no reset method: device reset is ENOTSUP.
pub const FINDING_NO_RESET: u32 = 10;
/// VFIO's unsafe no-IOMMU mode is on: devices can DMA anywhere, and the kernel is tainted.
pub const FINDING_NOIOMMU_MODE: u32 = 11;
/// An SR-IOV PF is bound to vfio-pci, which was loaded without `enable_sriov`: its VFs cannot
/// be enabled.
pub const FINDING_SRIOV_OFF: u32 = 12;
/// The device is a VF whose PF vfio-pci drives: it opens only with that PF's VF token.
pub const FINDING_VF_TOKEN: u32 = 13;

/// Below this RLIMIT_MEMLOCK a driver's DMA buffers soon fail (64 MiB).
const MEMLOCK_ENOUGH: u64 = 64 << 20;
const CAP_IPC_LOCK: u32 = 14;

/// One finding: a fixed-size record (the C API's `vfiokit_finding`, 512 bytes), its subject
/// and message NUL-terminated (cut at a character boundary if longer).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// `FINDING_*`.
    pub code: u32,
    /// `SEVERITY_*`.
    pub severity: u32,
    /// What it is about: a PCI address, a path, "RLIMIT_MEMLOCK".
    pub subject: [c_char; 64],
    /// What is wrong and how to fix it.
    pub message: [c_char; 424],
    pub reserved: [u64; 2],
}

const _: () = assert!(size_of::<Finding>() == 512);

impl Finding {
    fn new(code: u32, severity: u32, subject: &str, message: String) -> Finding {
        let mut f =
            Finding { code, severity, subject: [0; 64], message: [0; 424], reserved: [0; 2] };
        fill(&mut f.subject, subject);
        fill(&mut f.message, &message);
        f
    }

    pub fn subject(&self) -> &str {
        text(&self.subject)
    }

    pub fn message(&self) -> &str {
        text(&self.message)
    }
}

impl std::fmt::Debug for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} {}] {}: {}", self.severity, self.code, self.subject(), self.message())
    }
}

/// Every problem found for the machine, and for device `name` (a PCI address or sysfs path)
/// if given, most severe first.
pub fn doctor(name: Option<&str>) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |code, severity, subject: &str, message: String| {
        out.push(Finding::new(code, severity, subject, message))
    };
    // IOMMU hardware registers itself here (dmar0, ivhd0, ...); iommu_groups would also list
    // the groups no-IOMMU mode makes up.
    let noiommu = sysfs::read_text(NOIOMMU_PARAM).is_some_and(|on| on == "Y");
    if sysfs::list(Path::new("/sys/class/iommu")).is_empty() {
        match noiommu {
            false => add(
                FINDING_IOMMU_OFF,
                SEVERITY_BLOCKER,
                "IOMMU",
                "no IOMMU is active: enable VT-d (Intel) or AMD-Vi in the firmware, and boot with \
                 intel_iommu=on (or amd_iommu=on) on the kernel command line; a machine that has \
                 none can use VFIO's unsafe no-IOMMU mode (vfio.enable_unsafe_noiommu_mode=1 and \
                 VFIOKIT_IOMMU=noiommu), without isolation"
                    .into(),
            ),
            true => add(
                FINDING_IOMMU_OFF,
                SEVERITY_WARNING,
                "IOMMU",
                "no IOMMU is active: devices are usable only in VFIO's no-IOMMU mode, which is on \
                 (open them with VFIOKIT_IOMMU=noiommu), without isolation"
                    .into(),
            ),
        }
    }
    if noiommu {
        add(
            FINDING_NOIOMMU_MODE,
            SEVERITY_WARNING,
            "vfio.enable_unsafe_noiommu_mode",
            "VFIO's no-IOMMU mode is on: devices in it can DMA anywhere in memory and the kernel \
             is tainted; turn it off (echo N > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode) \
             unless this machine has no IOMMU"
                .into(),
        );
    }
    if !sysfs::exists(Path::new("/sys/bus/pci/drivers/vfio-pci")) {
        add(
            FINDING_VFIO_PCI_MISSING,
            SEVERITY_BLOCKER,
            VFIO_DRIVER,
            "the vfio-pci driver is not loaded: modprobe vfio-pci".into(),
        );
    }
    let iommufd = sysfs::exists(Path::new("/dev/iommu"));
    match iommufd {
        true => check_node(&mut add, "/dev/iommu"),
        false => add(
            FINDING_NO_IOMMUFD,
            SEVERITY_INFO,
            "/dev/iommu",
            "no iommufd: vfiokit uses the type1 container; iommufd needs Linux 6.6+ built with \
             CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV"
                .into(),
        ),
    }
    let memlock = sys::memlock_limit();
    if memlock < MEMLOCK_ENOUGH && !host::has_capability(CAP_IPC_LOCK) {
        add(
            FINDING_MEMLOCK_LOW,
            SEVERITY_WARNING,
            "RLIMIT_MEMLOCK",
            format!(
                "RLIMIT_MEMLOCK is {memlock} bytes and this process lacks CAP_IPC_LOCK: DMA maps \
                 beyond it fail with ENOMEM; raise it (ulimit -l, or memlock in \
                 /etc/security/limits.conf) or grant CAP_IPC_LOCK"
            ),
        );
    }
    if sysfs::read_u64("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").unwrap_or(0) == 0 {
        add(
            FINDING_NO_HUGEPAGES,
            SEVERITY_INFO,
            "hugepages-2048kB",
            "no 2 MiB hugepages are reserved: DMA_HUGE_2M allocations fail; reserve some with \
             echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
                .into(),
        );
    }
    if sysfs::read_text(ENABLE_SRIOV_PARAM).is_none_or(|on| on != "Y") {
        sriov_off(&mut add);
    }
    if let Some(name) = name {
        device(&mut add, name, iommufd);
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

/// The SR-IOV PFs bound to vfio-pci while its `enable_sriov` is off. (vfio-pci refuses to bind
/// a PF whose VFs are enabled, so no VF of such a PF exists.)
fn sriov_off(add: &mut impl FnMut(u32, u32, &str, String)) {
    for address in sysfs::list(Path::new(host::PCI_DEVICES)) {
        let Ok(pci) = PciDevice::find(&address) else { continue };
        let Ok(total @ 1..) = pci.sriov_total_vfs() else { continue };
        if pci.driver().as_deref() == Some(VFIO_DRIVER) {
            add(
                FINDING_SRIOV_OFF,
                SEVERITY_WARNING,
                &pci.address,
                format!(
                    "{address} is an SR-IOV PF ({total} VFs) bound to vfio-pci, which was loaded \
                     without enable_sriov: its VFs cannot be enabled (sriov_numvfs gives ENOENT); \
                     echo Y > {ENABLE_SRIOV_PARAM}, or load vfio-pci with enable_sriov=1 \
                     (vfio_pci.enable_sriov=1 on the kernel command line if it is built in)"
                ),
            );
        }
    }
}

fn check_node(add: &mut impl FnMut(u32, u32, &str, String), node: &str) {
    if let Err(sys::Errno(e)) = sysfs::read_writable(node) {
        add(
            FINDING_NODE_PERMISSION,
            SEVERITY_BLOCKER,
            node,
            format!(
                "{node} cannot be opened read-write by this process ({}): run as root, or give \
                 its user access (chown, or a udev rule setting its OWNER/GROUP/MODE)",
                std::io::Error::from_raw_os_error(e)
            ),
        );
    }
}

fn device(add: &mut impl FnMut(u32, u32, &str, String), name: &str, iommufd: bool) {
    let pci = match PciDevice::find(name) {
        Ok(pci) => pci,
        Err(e) => return add(FINDING_NO_DEVICE, SEVERITY_BLOCKER, name, e.message().into()),
    };
    let subject = pci.address.as_str();
    if let Err(e) = pci.require_vfio_driver() {
        add(FINDING_NOT_BOUND, SEVERITY_BLOCKER, subject, e.message().into());
    }
    match pci.iommu_group() {
        Err(e) => add(FINDING_IOMMU_OFF, SEVERITY_BLOCKER, subject, e.message().into()),
        Ok(group) => {
            if !host::group_blockers(group).is_empty() {
                add(
                    FINDING_GROUP_NOT_VIABLE,
                    SEVERITY_BLOCKER,
                    subject,
                    host::not_viable(group).message().into(),
                );
            }
            // The node an open will need: a no-IOMMU group's, else the cdev or the group's.
            match (pci.noiommu_node(), iommufd) {
                (Some(node), _) => check_node(add, &node),
                (None, true) => match pci.cdev() {
                    Ok(cdev) => check_node(add, &cdev),
                    Err(e) => add(FINDING_NO_IOMMUFD, SEVERITY_INFO, subject, e.message().into()),
                },
                (None, false) => check_node(add, &host::group_node(group, false)),
            }
        }
    }
    if let Some(pf) = pci.physfn() {
        if PciDevice::find(&pf).is_ok_and(|p| p.driver().as_deref() == Some(VFIO_DRIVER)) {
            add(
                FINDING_VF_TOKEN,
                SEVERITY_INFO,
                subject,
                format!(
                    "{subject} is a VF of {pf}, which vfio-pci drives: it opens only with the VF \
                     token that PF's user set (vfiokit_device_open_vf; Device::open_vf)"
                ),
            );
        }
    }
    let reset = sysfs::read_text(&pci.attr("reset_method").to_string_lossy());
    if reset.as_deref().is_none_or(str::is_empty) {
        add(
            FINDING_NO_RESET,
            SEVERITY_WARNING,
            subject,
            format!(
                "{subject} has no reset method the kernel can use (no FLR, PM or bus reset): \
                 device reset gives ENOTSUP; a driver must bring it to a known state by itself"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_hold_their_text_nul_terminated_and_cut() {
        let f = Finding::new(1, 2, "0000:00:02.0", "é".repeat(300));
        assert_eq!(f.subject(), "0000:00:02.0");
        assert_eq!(f.message().len(), 422, "423 bytes cut back to a character boundary");
        assert_eq!(f.message[423], 0);
    }
}
