//! A VFIO device: its records, mapped regions, width-exact accessors, config space, IRQs and
//! reset. Owns its fds and mappings; everything is released on drop.
//!
//! Here: opening (by PCI address, sysfs path, cdev path or vfio-user socket), the records,
//! reset and hot reset. transport.rs carries the requests (kernel fd or vfio-user client),
//! access.rs maps regions and accesses them, interrupts.rs routes and waits for IRQs.

mod access;
mod interrupts;
mod transport;

use std::ffi::c_char;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use once_cell::sync::OnceCell;
use vfio_bindings::bindings::vfio as k;

use crate::error::{Error, Result};
use crate::host::PciDevice;
use crate::iommu::{Iommu, IommuKind, OpenDevice};
use crate::irq::{self, Irq};
use crate::pci;
use crate::region::{self, Area, PCI_CONFIG, Region};
use crate::sys::{self, Context, fault, vfio};
use crate::text::{fill, text};
use crate::vfio_user::Client;

pub(crate) use self::access::region_at;
use self::access::{FAST_REGIONS, FastPath, Mapping};
pub use self::access::{MapInfo, Register, Width};
use self::interrupts::{IrqState, VectorSlot};
use self::transport::{Io, IoResult};

/// The most vectors an IRQ index may have: MSI-X's 2048.
const MAX_VECTORS: u32 = 2048;

/// A device that a hot reset of this one resets too (itself included), as
/// [`Device::hot_reset_info`] lists it: the C API's `vfiokit_hot_reset_dep`, 48 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotResetDep {
    /// Its canonical PCI address, NUL-terminated.
    pub address: [c_char; 16],
    /// Its IOMMU group.
    pub group: u32,
    /// Its iommufd device id, where the device was opened through its cdev and this one is
    /// bound to the same iommufd; 0 otherwise.
    pub devid: u32,
    /// 1 when it is open in this device's IOMMU context, as a hot reset needs every dependent.
    pub owned: u32,
    pub reserved0: u32,
    pub reserved: [u64; 2],
}

const _: () = assert!(size_of::<HotResetDep>() == 48);

impl HotResetDep {
    pub fn address(&self) -> &str {
        text(&self.address)
    }
}

/// `vfiokit_device_feature` (`Device::feature`): read the feature's data.
pub const FEATURE_GET: u32 = 1 << 16;
/// `vfiokit_device_feature` (`Device::feature`): write the feature's data.
pub const FEATURE_SET: u32 = 1 << 17;
/// `vfiokit_device_feature` (`Device::feature`): ask whether the feature (with GET and/or SET) is supported.
pub const FEATURE_PROBE: u32 = 1 << 18;
// Literals so that cbindgen can write them; the kernel's values, checked.
const _: () = assert!(
    FEATURE_GET == k::VFIO_DEVICE_FEATURE_GET
        && FEATURE_SET == k::VFIO_DEVICE_FEATURE_SET
        && FEATURE_PROBE == k::VFIO_DEVICE_FEATURE_PROBE
);

/// The name prefix of devices served over vfio-user: `vfio-user:<socket path>`.
pub const VFIO_USER_PREFIX: &str = "vfio-user:";

pub struct Device {
    address: String,
    info: pci::DeviceInfo,
    regions: Vec<Region>,
    areas: Vec<Area>,
    irqs: Vec<Irq>,
    mappings: Vec<OnceCell<Mapping>>,
    fast: [FastPath; FAST_REGIONS],
    irq_state: Mutex<IrqState>,
    /// By IRQ index and vector.
    irq_slots: Box<[Box<[VectorSlot]>]>,
    io: Io,
    /// Set when a BAR mapping faulted (the SIGBUS guard replaced it with all-ones) or by
    /// [`Device::retire`]: every call then fails with ENODEV. Made at the first guarded
    /// mapping, blocking wait or retire (not at open, which it would cost an allocation and
    /// an eventfd).
    gone: OnceCell<Arc<fault::Gone>>,
    _place: OpenDevice,
    // Dropped last: a type1 device must leave before its group and container.
    iommu: Iommu,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("address", &self.address)
            .field("vfio_user", &matches!(self.io, Io::User { .. }))
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens a device by PCI address ("0000:00:02.0", "00:02.0") or sysfs path, in `iommu`
    /// or (None) the process-wide shared context.
    pub fn open(name: &str, iommu: Option<&Iommu>) -> Result<Device> {
        if let Some(path) = name.strip_prefix(VFIO_USER_PREFIX) {
            let iommu = match iommu {
                Some(i) => i.clone(),
                None => Iommu::open(IommuKind::VfioUser)?,
            };
            // Refused before connecting where the context is a kernel one.
            if iommu.kind() != IommuKind::VfioUser {
                return Err(Error::invalid(format!(
                    "{name} is served over vfio-user: open it in a vfio-user context (VFIOKIT_IOMMU_VFIO_USER) \
                     or with none"
                )));
            }
            // A server serves one connection: a second open in the context is refused first.
            let place = iommu.take_place(name)?;
            let client = Arc::new(Client::connect(path, iommu.dma_server())?);
            iommu.add_peer(name, &client)?;
            let io = Io::User { client, region_fds: Vec::new() };
            return Device::from_io(name.to_string(), iommu, io, place);
        }
        Device::open_kernel(name, iommu, None)
    }

    /// Opens an SR-IOV VF whose PF is bound to vfio-pci (or such a PF while its VFs are in
    /// use) with the VF token its PF's user set ([`Device::set_vf_token`]): in the type1
    /// group's device name, or with VFIO_DEVICE_BIND_FLAG_TOKEN on the cdev (Linux 6.17+).
    pub fn open_vf(
        name: &str,
        iommu: Option<&Iommu>,
        token: &crate::sriov::VfToken,
    ) -> Result<Device> {
        Device::open_kernel(name, iommu, Some(token))
    }

    fn open_kernel(
        name: &str,
        iommu: Option<&Iommu>,
        token: Option<&crate::sriov::VfToken>,
    ) -> Result<Device> {
        let pci = PciDevice::named(name)?;
        // Whether the device is there and bound to vfio-pci is asked of sysfs only when the
        // open fails (a device fd comes only from a VFIO driver): two lookups fewer.
        let opened = match iommu {
            Some(i) => Ok(i.clone()),
            None => Iommu::shared(),
        }
        .and_then(|iommu| Ok((iommu.open_device(&pci, token)?, iommu)));
        let ((fd, place), iommu) = opened.map_err(|e| {
            pci.why_not_vfio().unwrap_or_else(|| match e.errno() {
                libc::EACCES => token_refused(&pci, token, e),
                _ => e,
            })
        })?;
        Device::from_io(pci.address, iommu, Io::Kernel(fd), place)
    }

    /// A device another process handed over live (crate::Iommu::take_over): its open VFIO
    /// device fd, never reopened (vfio-pci resets a device at its first open), with its routed
    /// vectors; its records are read again from the fd, as at open.
    pub(crate) fn adopt(
        address: String,
        iommu: &Iommu,
        fd: std::os::fd::OwnedFd,
        vectors: Vec<(u32, u32, std::os::fd::OwnedFd)>,
    ) -> Result<Device> {
        let place = iommu.take_place(&address)?;
        let device = Device::from_io(address, iommu.clone(), Io::Kernel(fd), place)?;
        device.adopt_routes(vectors)?;
        Ok(device)
    }

    fn from_io(address: String, iommu: Iommu, mut io: Io, place: OpenDevice) -> Result<Device> {
        let (flags, num_regions, num_irqs) = io.device_info(&address)?;
        if flags & k::VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(Error::new(libc::ENOTSUP, format!("{address} is not a VFIO PCI device")));
        }
        // Bounded before anything is allocated for them: a vfio-user server's numbers are
        // not to be trusted.
        if num_regions > 64 || num_irqs > 64 {
            return Err(Error::new(
                libc::EPROTO,
                format!(
                    "{address} reports {num_regions} regions and {num_irqs} IRQ indices (64 at most)"
                ),
            ));
        }
        // Room for a header and a short chain: most regions' replies fit without a reallocation.
        let mut scratch = Vec::with_capacity(32);
        let infos = each(num_regions, |i| io.region_info(i, &address, &mut scratch))?;
        let header = read_header(&io, &infos)
            .map_err(|e| e.within(format!("reading the config header of {address}")))?;
        let bars = pci::bars(&header);
        let mut areas = Vec::with_capacity(infos.len());
        let regions: Vec<Region> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let attrs = if i < 6 { region::bar_flags(&bars, i) } else { 0 };
                region::record(i as u32, info, attrs, &mut areas)
            })
            .collect();
        let irqs = each(num_irqs, |i| {
            io.irq_info(i, &address).map(|(flags, count)| irq::record(i, flags, count))
        })?;
        // Nor are its vector counts: PCI has at most 2048 (MSI-X).
        if let Some(irq) = irqs.iter().find(|irq| irq.count > MAX_VECTORS) {
            return Err(Error::new(
                libc::EPROTO,
                format!(
                    "{address} reports {} vectors for IRQ index {} ({MAX_VECTORS} at most)",
                    irq.count, irq.index
                ),
            ));
        }
        Ok(Device {
            address,
            info: pci::identify(flags, num_regions, num_irqs, &header),
            mappings: regions.iter().map(|_| OnceCell::new()).collect(),
            fast: Default::default(),
            regions,
            areas,
            irq_state: Mutex::new(IrqState::new(&irqs)),
            irq_slots: VectorSlot::table(&irqs),
            irqs,
            io,
            gone: OnceCell::new(),
            _place: place,
            iommu,
        })
    }

    /// Canonical PCI address, or `vfio-user:<socket path>`.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn iommu(&self) -> &Iommu {
        &self.iommu
    }

    /// VFIO's device flags and counts, and the PCI identity, as read at open.
    pub fn info(&self) -> &pci::DeviceInfo {
        &self.info
    }

    /// The VFIO device fd, for ioctls vfiokit does not wrap. Borrowed: it closes with the device.
    /// A device served over vfio-user has none (ENOTSUP).
    pub fn fd(&self) -> Result<BorrowedFd<'_>> {
        self.io.kernel_fd(&self.address)
    }

    /// VFIO_DEVICE_FEATURE: `feature` (the kernel's `VFIO_DEVICE_FEATURE_*` index) with
    /// [`FEATURE_GET`], [`FEATURE_SET`] and/or [`FEATURE_PROBE`] in `flags`; `data` is the
    /// feature's payload, read by SET and written by GET. Returns the ioctl's value (a fd for
    /// features that hand one out, else 0). Over vfio-user, DEVICE_FEATURE carries the same
    /// index, flags and payload to the server (whose features are about migration, if any).
    pub fn feature(&self, feature: u32, flags: u32, data: &mut [u8]) -> Result<i32> {
        let modes = FEATURE_GET | FEATURE_SET | FEATURE_PROBE;
        if feature > k::VFIO_DEVICE_FEATURE_MASK || flags & !modes != 0 || flags == 0 {
            return Err(Error::invalid(format!(
                "device feature {feature:#x} with flags {flags:#x}: expected an index up to 0xffff and \
                 flags of FEATURE_GET, FEATURE_SET and FEATURE_PROBE only (at least one)"
            )));
        }
        self.io.feature(feature | flags, data).map_err(|e| {
            e.within(format!(
                "VFIO_DEVICE_FEATURE {feature} (flags {flags:#x}) on {}",
                self.address
            ))
        })
    }

    /// Sets the VF token of this SR-IOV PF (VFIO_DEVICE_FEATURE_PCI_VF_TOKEN): the UUID its
    /// VFs' users must then present to open them. ENOTSUP for a device that is not a PF.
    pub fn set_vf_token(&self, token: &crate::sriov::VfToken) -> Result<()> {
        vfio::set_vf_token(self.fd()?, &token.0).map_err(|sys::Errno(e)| match e {
            libc::ENOTTY => Error::new(
                libc::ENOTSUP,
                format!("{} is not an SR-IOV PF: it has no VF token to set", self.address),
            ),
            e => Error::os(e, format!("setting the VF token of {}", self.address)),
        })
    }

    /// Record `i` describes region index `i`; absent regions have flags 0.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    pub fn areas(&self) -> &[Area] {
        &self.areas
    }

    pub fn irqs(&self) -> &[Irq] {
        &self.irqs
    }

    /// True once the device is gone: a mapped BAR faulted (vfio-pci zapped it: the device
    /// was removed, reset, or its memory decode disabled) and the SIGBUS guard replaced every
    /// mapping with all-ones memory, or [`Device::retire`] was called.
    pub fn gone(&self) -> bool {
        self.gone.get().is_some_and(|g| g.is_set())
    }

    /// What the SIGBUS guard marks for this device's mappings, and blocked waits poll.
    pub(crate) fn gone_state(&self) -> Result<&Arc<fault::Gone>> {
        self.gone.get_or_try_init(fault::Gone::new).context(|| "creating an eventfd")
    }

    /// ENODEV once the device is [`gone`](Self::gone).
    #[cold]
    fn gone_error(&self) -> Error {
        Error::new(
            libc::ENODEV,
            format!(
                "{} is gone (a BAR access faulted, or the driver retired it after REQ): its \
                 mappings now read all-ones; close it",
                self.address
            ),
        )
    }

    #[inline]
    pub(crate) fn present(&self) -> Result<()> {
        if self.gone() { Err(self.gone_error()) } else { Ok(()) }
    }

    /// Gives the device up while threads may still be accessing it (after REQ, vfio-pci asking
    /// for it back): every guarded mapping becomes all-ones memory, so those threads keep
    /// running and read 0xff..; waits end (ECANCELED); later calls fail with ENODEV. Close it
    /// then, once those threads have stopped, to release its fds and DMA mappings.
    pub fn retire(&self) -> Result<()> {
        self.gone_state()?.set();
        self.cancel_waits();
        for m in self.mappings.iter().filter_map(OnceCell::get) {
            m.retire().context(|| format!("replacing the mappings of {}", self.address))?;
        }
        Ok(())
    }

    pub fn reset(&self) -> Result<()> {
        self.present()?;
        if self.info.flags & pci::DEVICE_RESET == 0 {
            return Err(Error::new(
                libc::ENOTSUP,
                format!(
                    "{} does not support reset (the kernel found no function-level, PM or bus reset)",
                    self.address
                ),
            ));
        }
        self.io.reset().map_err(|e| e.within(format!("resetting {}", self.address)))
    }

    /// The devices a hot (bus or slot) reset of this one resets too, itself included: for a
    /// device without a function-level reset, or to reset a slot's functions together.
    /// ENOTSUP where the kernel has no bus or slot reset for it.
    pub fn hot_reset_info(&self) -> Result<Vec<HotResetDep>> {
        let fd = self.fd()?;
        let reply = vfio::hot_reset_info(fd).map_err(|sys::Errno(e)| match e {
            libc::ENODEV => Error::new(
                libc::ENOTSUP,
                format!("{} has no bus or slot reset the kernel can use", self.address),
            ),
            e => Error::os(e, format!("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO on {}", self.address)),
        })?;
        let (flags, deps) = pci::decode_hot_reset_info(&reply).map_err(|e| {
            Error::new(libc::EPROTO, format!("hot reset info of {}: {e}", self.address))
        })?;
        let by_devid = flags & pci::HOT_RESET_DEV_IDS != 0;
        deps.iter()
            .map(|d| {
                let group = match by_devid {
                    true => PciDevice::find(&d.address)?.iommu_group()?,
                    false => d.id,
                };
                let mut dep = HotResetDep {
                    address: [0; 16],
                    group,
                    // 0 and u32::MAX say "owned" and "not owned", not an id.
                    devid: if by_devid && d.id != u32::MAX { d.id } else { 0 },
                    owned: self.iommu.holds(&d.address) as u32,
                    reserved0: 0,
                    reserved: [0; 2],
                };
                fill(&mut dep.address, &d.address);
                Ok(dep)
            })
            .collect()
    }

    /// Resets this device and every device [`hot_reset_info`](Self::hot_reset_info) lists
    /// with it (a bus or slot reset), which must all be open in this device's context: EPERM
    /// naming those that are not.
    pub fn hot_reset(&self) -> Result<()> {
        let deps = self.hot_reset_info()?;
        let strangers: Vec<&str> =
            deps.iter().filter(|d| d.owned == 0).map(|d| d.address()).collect();
        if !strangers.is_empty() {
            return Err(Error::new(
                libc::EPERM,
                format!(
                    "a hot reset of {} also resets {}, not open in its IOMMU context: open every \
                     affected device in that context first (one open elsewhere, in another context \
                     or process, blocks it)",
                    self.address,
                    strangers.join(", ")
                ),
            ));
        }
        let mut groups: Vec<u32> = deps.iter().map(|d| d.group).collect();
        groups.sort_unstable();
        groups.dedup();
        self.iommu.hot_reset(self.fd()?, &groups).map_err(|e| {
            Error::new(e.errno(), format!("hot reset of {}: {}", self.address, e.message()))
        })
    }
}

/// The kernel's EACCES for a VF (or a PF with VFs in use) opened without its PF's VF token or
/// with another: the errno kept, the message saying which PF owns it and how to pass the token.
fn token_refused(pci: &PciDevice, token: Option<&crate::sriov::VfToken>, e: Error) -> Error {
    let owner = match pci.physfn() {
        Some(pf) => format!("{} is a VF of {pf}, whose vfio-pci user set a VF token", pci.address),
        None => format!("{} is an SR-IOV PF whose VFs are in use under a VF token", pci.address),
    };
    let what = match token {
        None => {
            "no token was given: open it with that token (Device::open_vf, vfiokit_device_open_vf, \
                 vfiokit.open(..., vf_token=...))"
                .to_owned()
        }
        Some(t) => format!("the token given ({t}) is not that one"),
    };
    Error::new(e.errno(), format!("{owner}; {what} ({})", e.message()))
}

/// `f(0)`, ..., `f(n - 1)` in a vector allocated once (collecting into `Result<Vec<_>>` grows
/// the vector from empty: the first error could come at any point), or the first error.
fn each<T>(n: u32, mut f: impl FnMut(u32) -> Result<T>) -> Result<Vec<T>> {
    let mut all = Vec::with_capacity(n as usize);
    for i in 0..n {
        all.push(f(i)?);
    }
    Ok(all)
}

/// The config space's type 0 header (zeros if the device has no config region that large).
fn read_header(io: &Io, infos: &[region::RegionInfo]) -> IoResult<[u8; pci::HEADER_LEN]> {
    let mut header = [0; pci::HEADER_LEN];
    if let Some(config) = infos.get(PCI_CONFIG as usize).filter(|c| c.size >= header.len() as u64) {
        let r = Region { index: PCI_CONFIG, offset: config.offset, ..Default::default() };
        io.read(&r, 0, &mut header)?;
    }
    Ok(header)
}
