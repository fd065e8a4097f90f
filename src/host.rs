//! What the host says about a PCI device: its sysfs node, driver, IOMMU group and VFIO cdev.
//! Also binding devices to vfio-pci. All file access goes through `sys::sysfs`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::pci;
use crate::sys::Context;
use crate::sys::sysfs;

pub(crate) const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// vfio-pci's parameter: off, it refuses to enable the VFs of a PF it drives.
pub(crate) const ENABLE_SRIOV_PARAM: &str = "/sys/module/vfio_pci/parameters/enable_sriov";
pub(crate) const VFIO_DRIVER: &str = "vfio-pci";
const CDEV_DIR: &str = "/dev/vfio/devices/";

/// A PCI device as sysfs describes it.
#[derive(Debug, Clone)]
pub(crate) struct PciDevice {
    /// Canonical address, "0000:00:02.0".
    pub address: String,
}

impl PciDevice {
    /// Resolves a PCI address ("0000:00:02.0", "00:02.0"), a sysfs device path, or a VFIO
    /// cdev path ("/dev/vfio/devices/vfio0").
    pub fn find(name: &str) -> Result<PciDevice> {
        let dev = PciDevice::named(name)?;
        dev.require_present()?;
        Ok(dev)
    }

    /// [`PciDevice::find`] without checking that a device at a PCI address is present.
    pub fn named(name: &str) -> Result<PciDevice> {
        let address = if let Some(node) = name.strip_prefix(CDEV_DIR) {
            if !sysfs::exists(Path::new(name)) {
                return Err(Error::new(libc::ENOENT, format!("no such VFIO device cdev {name}")));
            }
            let link = Path::new("/sys/class/vfio-dev").join(node).join("device");
            let path = sysfs::canonical(&link)
                .context(|| format!("{name}: no such VFIO device cdev ({})", link.display()))?;
            let base =
                path.file_name().map(|b| b.to_string_lossy().into_owned()).unwrap_or_default();
            pci::parse_address(&base)
                .map_err(|_| Error::invalid(format!("{name} is not a PCI device's cdev")))?
        } else if name.starts_with('/') {
            let path =
                sysfs::canonical(Path::new(name)).context(|| format!("device path {name}"))?;
            let base =
                path.file_name().map(|b| b.to_string_lossy().into_owned()).unwrap_or_default();
            pci::parse_address(&base)
                .map_err(|_| Error::invalid(format!("{name} is not a PCI device's sysfs path")))?
        } else {
            pci::parse_address(name).map_err(|e| Error::invalid(e.to_string()))?
        };
        Ok(PciDevice { address })
    }

    /// Its sysfs node, "/sys/bus/pci/devices/0000:00:02.0".
    pub fn sysfs(&self) -> PathBuf {
        [PCI_DEVICES, "/", &self.address].concat().into()
    }

    /// The path of `name` in its sysfs node ("iommu_group", "driver/unbind").
    pub fn attr(&self, name: &str) -> PathBuf {
        [PCI_DEVICES, "/", &self.address, "/", name].concat().into()
    }

    /// Fails (ENOENT) unless the device is in sysfs.
    pub fn require_present(&self) -> Result<()> {
        if !sysfs::exists(&self.sysfs()) {
            return Err(Error::new(
                libc::ENOENT,
                format!("no PCI device {} (nothing at {})", self.address, self.sysfs().display()),
            ));
        }
        Ok(())
    }

    /// Why the device cannot be opened through VFIO, if sysfs says: it is absent (ENOENT) or
    /// not bound to vfio-pci (ENODEV). For an open that failed, in preference to its error.
    pub fn why_not_vfio(&self) -> Option<Error> {
        self.require_present().and_then(|()| self.require_vfio_driver()).err()
    }

    pub fn driver(&self) -> Option<String> {
        sysfs::link_name(&self.attr("driver"))
    }

    /// Fails with a message saying how to fix it unless the device is bound to vfio-pci.
    pub fn require_vfio_driver(&self) -> Result<()> {
        match self.driver() {
            Some(d) if d == VFIO_DRIVER => Ok(()),
            other => {
                let bound = match other {
                    Some(d) => format!("is bound to {d}, not {VFIO_DRIVER}"),
                    None => "is not bound to any driver".to_owned(),
                };
                Err(Error::new(
                    libc::ENODEV,
                    format!(
                        "{a} {bound}; bind it to {VFIO_DRIVER}: `python3 -m vfiokit bind {a}`, or \
                         echo {VFIO_DRIVER} > {s}/driver_override; echo {a} > {s}/driver/unbind; \
                         echo {a} > /sys/bus/pci/drivers_probe",
                        a = self.address,
                        s = self.sysfs().display()
                    ),
                ))
            }
        }
    }

    pub fn iommu_group(&self) -> Result<u32> {
        sysfs::link_name(&self.attr("iommu_group")).and_then(|g| g.parse().ok()).ok_or_else(|| {
            Error::new(
                libc::ENODEV,
                format!(
                    "{} has no IOMMU group: is an IOMMU enabled (intel_iommu=on / amd_iommu=on)?",
                    self.address
                ),
            )
        })
    }

    /// The node of the device's group if VFIO made it a no-IOMMU group ("/dev/vfio/noiommu-0").
    pub fn noiommu_node(&self) -> Option<String> {
        let node = group_node(self.iommu_group().ok()?, true);
        sysfs::exists(Path::new(&node)).then_some(node)
    }

    /// The device's VFIO cdev ("/dev/vfio/devices/vfio0"), found in sysfs, without checking
    /// that the node is there ([`PciDevice::cdev`] does).
    pub fn cdev_unchecked(&self) -> Option<String> {
        // "vfio-dev" holds the one cdev's name ("vfio0").
        let name = sysfs::first_name(&self.attr("vfio-dev"))?;
        Some([CDEV_DIR, &name].concat())
    }

    /// The device's VFIO cdev ("/dev/vfio/devices/vfio0").
    pub fn cdev(&self) -> Result<String> {
        if let Some(node) = self.noiommu_node() {
            return Err(Error::new(
                libc::ENODEV,
                format!(
                    "{} has no IOMMU ({node}, VFIO's unsafe no-IOMMU mode): its DMA sees physical addresses, \
                     not an iommufd context's IOVAs; open it in a no-IOMMU context (VFIOKIT_IOMMU=noiommu)",
                    self.address
                ),
            ));
        }
        // 6.1 to 6.5 list the device under vfio-dev but have no /dev node for it.
        let node = self.cdev_unchecked().filter(|node| sysfs::exists(Path::new(node)));
        node.ok_or_else(|| {
            Error::new(
                libc::ENODEV,
                format!(
                    "{} has no VFIO cdev: the kernel lacks CONFIG_VFIO_DEVICE_CDEV (use the type1 backend: VFIOKIT_IOMMU=type1)",
                    self.address
                ),
            )
        })
    }
}

impl PciDevice {
    /// How many VFs the device can have (sysfs `sriov_totalvfs`); ENOTSUP naming the device
    /// when it is no SR-IOV PF.
    pub fn sriov_total_vfs(&self) -> Result<u32> {
        let path = self.attr("sriov_totalvfs");
        match sysfs::read_u64(&path.to_string_lossy()) {
            Ok(n) => Ok(n as u32),
            Err(crate::sys::Errno(libc::ENOENT)) => Err(Error::new(
                libc::ENOTSUP,
                format!("{} is not an SR-IOV PF (it has no {})", self.address, path.display()),
            )),
            Err(crate::sys::Errno(e)) => Err(Error::os(e, format!("reading {}", path.display()))),
        }
    }

    /// The addresses of its enabled VFs, in VF order (its `virtfnN` links).
    pub fn vfs(&self) -> Vec<String> {
        let mut vfs: Vec<(u32, String)> = sysfs::list(&self.sysfs())
            .into_iter()
            .filter_map(|name| {
                let n = name.strip_prefix("virtfn")?.parse().ok()?;
                Some((n, sysfs::link_name(&self.attr(&name))?))
            })
            .collect();
        vfs.sort();
        vfs.into_iter().map(|(_, a)| a).collect()
    }

    /// The PF of a VF (its `physfn` link); None for any other device.
    pub fn physfn(&self) -> Option<String> {
        sysfs::link_name(&self.attr("physfn"))
    }
}

/// Enables `n` VFs of the SR-IOV PF `pf` (0 disables them) through its `sriov_numvfs` (root
/// only). A PF with VFs enabled goes through 0 first, as the kernel asks. Returns the VFs'
/// addresses.
pub fn sriov_set_numvfs(pf: &str, n: u32) -> Result<Vec<String>> {
    let dev = PciDevice::find(pf)?;
    let total = dev.sriov_total_vfs()?;
    if n > total {
        return Err(Error::invalid(format!("{} has at most {total} VFs, not {n}", dev.address)));
    }
    let numvfs = dev.attr("sriov_numvfs");
    let write = |count: u32| {
        sysfs::write(&numvfs, &count.to_string()).map_err(|crate::sys::Errno(e)| {
            let hint = match (e, dev.driver()) {
                (libc::ENOENT, Some(d)) if d == VFIO_DRIVER => {
                    " (vfio-pci enables VFs only when loaded with enable_sriov=1: \
                     modprobe vfio-pci enable_sriov=1, or vfio_pci.enable_sriov=1 on the kernel \
                     command line)"
                        .to_owned()
                }
                (libc::ENOENT | libc::EOPNOTSUPP, None) => {
                    " (the PF has no driver: bind it to vfio-pci first)".to_owned()
                }
                _ => String::new(),
            };
            Error::os(e, format!("writing {count} to {}{hint}", numvfs.display()))
        })
    };
    let now = sysfs::read_u64(&numvfs.to_string_lossy()).unwrap_or(0) as u32;
    if now != n {
        if now != 0 && n != 0 {
            write(0)?;
        }
        write(n)?;
    }
    Ok(dev.vfs())
}

/// The node of VFIO group `group`: "/dev/vfio/N", or for a no-IOMMU group "/dev/vfio/noiommu-N".
pub(crate) fn group_node(group: u32, noiommu: bool) -> String {
    match noiommu {
        true => format!("/dev/vfio/noiommu-{group}"),
        false => format!("/dev/vfio/{group}"),
    }
}

/// Why a group is not viable: its members bound to a driver other than vfio-pci (bridges'
/// pcieport aside), as "ADDR is bound to DRIVER" phrases; empty if none is.
pub(crate) fn group_blockers(group: u32) -> Vec<String> {
    let dir = PathBuf::from(format!("/sys/kernel/iommu_groups/{group}/devices"));
    sysfs::list(&dir)
        .into_iter()
        .filter_map(|addr| {
            let driver = sysfs::link_name(&dir.join(&addr).join("driver"))?;
            (driver != VFIO_DRIVER && driver != "pcieport")
                .then(|| format!("{addr} is bound to {driver}"))
        })
        .collect()
}

/// The error for a group that is not viable, naming what blocks it.
pub(crate) fn not_viable(group: u32) -> Error {
    let blockers = group_blockers(group);
    let why = match blockers.is_empty() {
        true => "a device in it is bound to a driver other than vfio-pci".to_owned(),
        false => blockers.join(", "),
    };
    Error::new(
        libc::EBUSY,
        format!(
            "group {group} is not viable: {why}; bind all of its devices to vfio-pci (or unbind them)"
        ),
    )
}

/// Binds a PCI device to vfio-pci through driver_override (root only).
pub fn bind(name: &str) -> Result<()> {
    let dev = PciDevice::find(name)?;
    if dev.driver().as_deref() == Some(VFIO_DRIVER) {
        return Ok(());
    }
    let a = &dev.address;
    sysfs::write(&dev.attr("driver_override"), VFIO_DRIVER)
        .context(|| format!("setting driver_override of {a}"))?;
    if dev.driver().is_some() {
        sysfs::write(&dev.attr("driver/unbind"), a)
            .context(|| format!("unbinding {a} from its driver"))?;
    }
    sysfs::write(Path::new("/sys/bus/pci/drivers_probe"), a).context(|| format!("probing {a}"))?;
    match dev.driver() {
        Some(d) if d == VFIO_DRIVER => Ok(()),
        _ => Err(Error::new(
            libc::ENODEV,
            format!("{VFIO_DRIVER} did not claim {a}: is the vfio-pci module loaded?"),
        )),
    }
}

/// Unbinds a PCI device from vfio-pci and lets its own driver probe it again (root only).
/// A device bound to another driver is refused: that driver is not ours to take away.
pub fn unbind(name: &str) -> Result<()> {
    let dev = PciDevice::find(name)?;
    let a = &dev.address;
    match dev.driver() {
        Some(d) if d == VFIO_DRIVER => {
            sysfs::write(&dev.attr("driver/unbind"), a).context(|| format!("unbinding {a}"))?
        }
        Some(d) => {
            return Err(Error::invalid(format!(
                "{a} is bound to {d}, not {VFIO_DRIVER}: not unbinding it"
            )));
        }
        None => {}
    }
    // An empty override lets the device's native driver match again.
    sysfs::write(&dev.attr("driver_override"), "\n")
        .context(|| format!("clearing driver_override of {a}"))?;
    // No driver may want the device; that is not an error.
    let _ = sysfs::write(Path::new("/sys/bus/pci/drivers_probe"), a);
    Ok(())
}

/// Whether this process has capability `cap` (CAP_*'s bit number) in its effective set.
pub(crate) fn has_capability(cap: u32) -> bool {
    capability_in(&sysfs::read_text("/proc/self/status").unwrap_or_default(), cap)
}

/// Whether capability `cap` is in the effective set a /proc/PID/status text shows.
fn capability_in(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|eff| eff & (1 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_from_proc_status() {
        const CAP_IPC_LOCK: u32 = 14;
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let nobody = "CapEff:\t0000000000000000\n";
        assert!(capability_in(root, CAP_IPC_LOCK));
        assert!(!capability_in(nobody, CAP_IPC_LOCK));
        assert!(!capability_in("", CAP_IPC_LOCK));
    }
}
