//! A VFIO device: its records, mapped regions, width-exact accessors, config space, IRQs and
//! reset. Owns its fds and mappings; everything is released on drop.

use std::ffi::c_char;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use once_cell::sync::OnceCell;
use vfio_bindings::bindings::vfio as k;

use crate::error::{Error, Result};
use crate::host::PciDevice;
use crate::iommu::{Iommu, IommuKind, OpenDevice};
use crate::irq::{self, Action, Irq};
use crate::pci;
use crate::region::{self, Area, PCI_CONFIG, REGION_READ, REGION_WRITE, Region};
use crate::sys::{self, Context, Readable, mem, vfio};
use crate::text::{fill, text};
use crate::vfio_user::Client;

/// One contiguous virtual range for a region: its mmappable areas mapped, the rest reserved
/// with no access.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// The region's size when one area covers it whole, so any in-range access may use the
    /// mapping (the accessors' fast path); 0 otherwise.
    whole: u64,
    /// The region's REGION_READ / REGION_WRITE flags.
    access: u32,
}

/// The most vectors an IRQ index may have: MSI-X's 2048.
const MAX_VECTORS: u32 = 2048;

/// Regions below this index (the PCI BARs, ROM, config space and VGA) have a [`FastPath`].
const FAST_REGIONS: usize = 9;

/// The register accessors' fast path for one region, kept inline in the device apart from
/// its mapping: a checked access then loads one word and takes one branch (under emulation
/// each load, and each branch, costs about what the access itself to RAM does). Set once,
/// when the region is mapped.
#[derive(Default)]
struct FastPath {
    read: FastAccess,
    write: FastAccess,
}

/// [`FastPath`] for one kind of access: the mapping's base (page-aligned) with, in its low
/// bits, `k` such that any aligned access of 1 to 8 bytes below `(1 << k) >> 1` fits in the
/// mapping (the largest power of two no larger than its `whole`; a BAR's size is one). 0,
/// so that no access qualifies, until the region is mapped, and where it forbids this
/// access or its mapping does not cover it whole (or is smaller than 8 bytes).
#[derive(Default)]
struct FastAccess(AtomicUsize);

impl FastAccess {
    /// The low bits holding `k` (a page-aligned base leaves 12 free).
    const K: usize = 63;

    #[inline(always)]
    fn limit(word: usize) -> u64 {
        (1u64 << (word & Self::K)) >> 1
    }
}

impl FastPath {
    fn set(&self, m: &Mapping) {
        if m.whole < 8 {
            return;
        }
        // k - 1 is the power of two's log2: at least 3, as whole >= 8.
        let k = ((u64::BITS - m.whole.leading_zeros()) as usize).min(FastAccess::K);
        let word = m.base.as_ptr().expose_provenance() | k;
        debug_assert!(m.base.as_ptr().addr() & FastAccess::K == 0, "mmap returns pages");
        debug_assert!(FastAccess::limit(word) <= m.whole);
        for (a, flag) in [(&self.read, REGION_READ), (&self.write, REGION_WRITE)] {
            if m.access & flag != 0 {
                a.0.store(word, Ordering::Release);
            }
        }
    }

    /// The address of an access of `T` at `off` when the fast path may take it: aligned, in
    /// range, allowed, and mapped.
    #[inline(always)]
    fn direct<T: Width>(&self, off: u64, access: u32) -> Option<*mut T> {
        let a = if access == REGION_WRITE { &self.write } else { &self.read };
        let word = a.0.load(Ordering::Acquire);
        // One comparison for all four conditions: the limit is 0 unless mapped and allowed.
        (off % T::BYTES as u64 == 0 && off < FastAccess::limit(word)).then(|| {
            let base = std::ptr::with_exposed_provenance_mut::<u8>(word & !FastAccess::K);
            // SAFETY: off is aligned to T (a power of two up to 8) and below the limit, a
            // power of two of at least 8 no larger than the mapping's `whole`, so
            // off + T::BYTES <= limit <= whole <= len: inside the mapping.
            unsafe { base.add(off as usize).cast::<T>() }
        })
    }
}

/// A region's mapping and the rule the register accessors follow on it, for callers that take
/// the same shortcut themselves (the Python package's memoryviews). 48 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    /// The mapping's address (what `vfiokit_region_map` and `Device::map` give).
    pub addr: *mut std::ffi::c_void,
    /// Its length: the region's size rounded up to pages.
    pub len: u64,
    /// Accesses of 1, 2, 4 or 8 bytes aligned to their width inside `[0, direct)` go straight
    /// through the mapping, if `access` allows them; the rest go through the device. 0 when the
    /// region's mmappable areas do not cover it whole.
    pub direct: u64,
    /// `VFIOKIT_REGION_READ` and `VFIOKIT_REGION_WRITE`: what the mapping permits (its pages'
    /// protection). A store it does not permit faults: leave it to the accessors, which refuse
    /// it with an error.
    pub access: u32,
    pub reserved0: u32,
    pub reserved: [u64; 2],
}

const _: () = assert!(size_of::<MapInfo>() == 48 && std::mem::offset_of!(MapInfo, access) == 24);

// SAFETY: the mapping is plain memory shared with a device; access discipline is the caller's.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we reserved base..base+len and nothing else refers to it once we drop.
        unsafe { mem::unmap(self.base, self.len) };
    }
}

/// A register checked once, for the loops that poll or feed one: [`Device::register`] checked
/// its alignment, range and mapping and that its region may be read and written, so
/// [`read`](Self::read) and [`write`](Self::write) are one volatile access each, what a
/// hand-written driver does through its own pointer. It borrows the device, whose mapping it
/// points into.
pub struct Register<'a, T: Width> {
    at: NonNull<T>,
    _device: PhantomData<&'a Device>,
}

// SAFETY: `at` points into the device's mapping, which the borrow keeps alive; every access
// is one volatile load or store, as the device's own accessors make from any thread.
unsafe impl<T: Width> Send for Register<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Width> Sync for Register<'_, T> {}

impl<T: Width> std::fmt::Debug for Register<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Register").field(&self.at).finish()
    }
}

impl<T: Width> Register<'_, T> {
    /// Its address in the mapping: valid while the device lives.
    pub fn as_ptr(&self) -> *mut T {
        self.at.as_ptr()
    }

    #[inline]
    pub fn read(&self) -> T {
        // SAFETY: aligned, inside a mapped area of a readable region (checked at creation);
        // volatile so it is exactly one access.
        unsafe { self.at.as_ptr().read_volatile() }
    }

    #[inline]
    pub fn write(&self, value: T) {
        // SAFETY: as for read, in a writable region, so a writable mapping.
        unsafe { self.at.as_ptr().write_volatile(value) }
    }
}

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

/// A register width: one access of exactly this many bytes.
pub trait Width: Copy + sealed::Sealed {
    const BYTES: usize;
    fn from_ne(bytes: &[u8]) -> Self;
    fn to_ne(self, out: &mut [u8]);
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! width {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Width for $t {
            const BYTES: usize = size_of::<$t>();
            fn from_ne(bytes: &[u8]) -> Self {
                <$t>::from_ne_bytes(bytes.try_into().expect("caller passes BYTES bytes"))
            }
            fn to_ne(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_ne_bytes())
            }
        }
    )*};
}
width!(u8, u16, u32, u64);

/// The routed vectors of one IRQ index, and what wakes the threads waiting on them.
#[derive(Default)]
struct IrqRoute {
    /// Each vector's routing (None: not routed); empty until the index is first enabled.
    vectors: Vec<Option<Vector>>,
    /// An eventfd signalled, then replaced, when vectors of this index that threads may be
    /// waiting on are disabled or routed anew; present while any vector is routed.
    cancel: Option<Arc<OwnedFd>>,
}

/// A routed vector: the fd the kernel signals, as handed out.
struct Vector {
    /// A duplicate of the vector's own eventfd ([`VectorSlot::own`]), the number
    /// `irq_enable` returned, closed by disable; or a duplicate of the caller's eventfd.
    _fd: OwnedFd,
    /// False for the caller's eventfds: the caller reads them, so `irq_wait` does not.
    waitable: bool,
    /// Which routing this is (from [`IrqState::routings`]): a wait that finds another one
    /// after a wake-up on the cancel eventfd ends with ECANCELED.
    routing: u64,
}

/// What the fast paths of `irq_trigger` and `irq_wait` read without the IRQ lock, per vector.
///
/// Why no lock is needed: `own` is set once and neither replaced nor closed until the device
/// drops, which cannot happen while a `&self` call runs, so a thread that found the vector
/// routed reads an eventfd that is open, whatever a concurrent disable or enable does. At
/// worst it reads a count signalled just before a disable (the wait then counts as having
/// come first) or finds the eventfd empty and takes the locked path, which decides.
#[derive(Default)]
struct VectorSlot {
    /// [`SLOT_OWN`], [`SLOT_CALLER`] or [`SLOT_OFF`] (also after `cancel_waits`), as
    /// `IrqState::routes` says: written only under the IRQ lock.
    state: AtomicU8,
    /// The vector's own eventfd: made at its first `irq_enable`, reused (emptied first) by
    /// later ones, closed when the device drops.
    own: OnceCell<OwnedFd>,
}

/// [`VectorSlot::state`]: not routed (or waits are cancelled).
const SLOT_OFF: u8 = 0;
/// [`VectorSlot::state`]: routed to the caller's eventfd.
const SLOT_CALLER: u8 = 1;
/// [`VectorSlot::state`]: routed to the vector's own eventfd.
const SLOT_OWN: u8 = 2;

impl IrqRoute {
    fn is_enabled(&self) -> bool {
        self.vectors.iter().any(Option::is_some)
    }

    fn vector(&self, vector: u32) -> Option<&Vector> {
        self.vectors.get(vector as usize)?.as_ref()
    }

    /// Wakes every waiter on this index; each then checks whether its vector is still routed.
    fn wake_waiters(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            // A fresh eventfd signalled once cannot overflow, so this cannot fail.
            let _ = sys::eventfd_signal(cancel.as_fd());
        }
    }
}

struct IrqState {
    routes: Vec<IrqRoute>,
    /// Set by [`Device::cancel_waits`]: every wait, current or later, ends with ECANCELED.
    cancelled: bool,
    /// How many routings were made, for [`Vector::routing`].
    routings: u64,
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

/// What carries a device's requests: the kernel's VFIO device fd, or a vfio-user connection
/// with the fds its server sent to mmap regions from (by region index).
enum Io {
    Kernel(OwnedFd),
    /// `region_fds`: by region, the fds its areas are mapped from (see [`Io::mmap_source`]).
    User {
        client: Arc<Client>,
        region_fds: Vec<Vec<OwnedFd>>,
    },
}

/// The name prefix of devices served over vfio-user: `vfio-user:<socket path>`.
pub const VFIO_USER_PREFIX: &str = "vfio-user:";

impl Io {
    fn device_info(&self, address: &str) -> Result<(u32, u32, u32)> {
        match self {
            Io::Kernel(fd) => vfio::device_info(fd.as_fd())
                .map(|i| (i.flags, i.num_regions, i.num_irqs))
                .context(|| format!("VFIO_DEVICE_GET_INFO on {address}")),
            Io::User { client, .. } => client.device_info(),
        }
    }

    /// Region `i`'s information; absent regions (EINVAL from vfio-pci or the server) are
    /// empty. Called for indices in order: a vfio-user region's mmap fd is kept by index.
    /// `scratch` holds the kernel's replies, reused from region to region.
    fn region_info(
        &mut self,
        i: u32,
        address: &str,
        scratch: &mut Vec<u64>,
    ) -> Result<region::RegionInfo> {
        let decode = |reply: &[u8]| {
            region::decode_region_info(reply)
                .map_err(|e| Error::new(libc::EPROTO, format!("{address} region {i}: {e}")))
        };
        match self {
            Io::Kernel(fd) => match vfio::region_info(fd.as_fd(), i, scratch) {
                Ok(reply) => decode(reply),
                Err(sys::Errno(libc::EINVAL)) => Ok(Default::default()),
                Err(sys::Errno(e)) => {
                    Err(Error::os(e, format!("VFIO_DEVICE_GET_REGION_INFO {i} on {address}")))
                }
            },
            Io::User { client, region_fds } => {
                let answer = client.region_info(i);
                let (reply, fds) = match answer {
                    Err(e) if e.errno() == libc::EINVAL => (None, Vec::new()),
                    other => other.map(|(reply, fds)| (Some(reply), fds))?,
                };
                region_fds.push(fds);
                reply.map_or_else(|| Ok(Default::default()), |reply| decode(&reply))
            }
        }
    }

    /// IRQ index `i`'s (flags, count); absent (EINVAL) ones have neither.
    fn irq_info(&self, i: u32, address: &str) -> Result<(u32, u32)> {
        // vfio-pci answers EINVAL for ERR on a device that is not PCIe: none of them. Told
        // apart before an error (and its message) is made, as for regions: every open of
        // such a device gets it.
        match self {
            Io::Kernel(fd) => match vfio::irq_info(fd.as_fd(), i) {
                Err(sys::Errno(libc::EINVAL)) => Ok((0, 0)),
                other => other
                    .map(|ki| (ki.flags, ki.count))
                    .context(|| format!("VFIO_DEVICE_GET_IRQ_INFO {i} on {address}")),
            },
            Io::User { client, .. } => match client.irq_info(i) {
                Err(e) if e.errno() == libc::EINVAL => Ok((0, 0)),
                other => other,
            },
        }
    }

    /// The fd to mmap area `area` of region `r` from: the device fd, or what the server sent
    /// with the region's information (one fd for every area, or one per area).
    fn mmap_source(&self, r: &Region, area: usize) -> Option<BorrowedFd<'_>> {
        match self {
            Io::Kernel(fd) => Some(fd.as_fd()),
            Io::User { region_fds, .. } => match region_fds.get(r.index as usize)?.as_slice() {
                [one] => Some(one.as_fd()),
                per_area if per_area.len() == r.num_areas as usize => Some(per_area[area].as_fd()),
                _ => None,
            },
        }
    }

    fn read(&self, r: &Region, off: u64, buf: &mut [u8]) -> IoResult<()> {
        match self {
            Io::Kernel(fd) => {
                sys::pread_exact(fd.as_fd(), buf, r.offset + off).map_err(IoError::Kernel)
            }
            Io::User { client, .. } => client.region_read(r.index, off, buf).map_err(IoError::User),
        }
    }

    fn write(&self, r: &Region, off: u64, buf: &[u8]) -> IoResult<()> {
        match self {
            Io::Kernel(fd) => {
                sys::pwrite_all(fd.as_fd(), buf, r.offset + off).map_err(IoError::Kernel)
            }
            Io::User { client, .. } => {
                client.region_write(r.index, off, buf).map_err(IoError::User)
            }
        }
    }

    fn set_irqs(&self, set: &mut [u8]) -> IoResult<()> {
        match self {
            Io::Kernel(fd) => vfio::set_irqs(fd.as_fd(), set).map_err(IoError::Kernel),
            Io::User { client, .. } => client.set_irqs(set).map_err(IoError::User),
        }
    }

    fn set_irq_eventfds(&self, index: u32, first: u32, fds: &[RawFd]) -> IoResult<()> {
        match self {
            Io::Kernel(_) => self.set_irqs(&mut irq::encode_eventfds(index, first, fds)),
            Io::User { client, .. } => {
                client.set_irq_eventfds(index, first, fds).map_err(IoError::User)
            }
        }
    }

    fn reset(&self) -> IoResult<()> {
        match self {
            Io::Kernel(fd) => vfio::device_reset(fd.as_fd()).map_err(IoError::Kernel),
            Io::User { client, .. } => client.reset().map_err(IoError::User),
        }
    }

    fn kernel_fd(&self, address: &str) -> Result<BorrowedFd<'_>> {
        match self {
            Io::Kernel(fd) => Ok(fd.as_fd()),
            Io::User { .. } => Err(Error::new(
                libc::ENOTSUP,
                format!("{address} is served over vfio-user: it has no VFIO device fd"),
            )),
        }
    }
}

/// A failed request: the kernel's errno, or the vfio-user client's error.
enum IoError {
    Kernel(sys::Errno),
    User(Error),
}

type IoResult<T> = std::result::Result<T, IoError>;

impl IoError {
    /// The error, saying what was being done.
    fn within(self, what: impl std::fmt::Display) -> Error {
        match self {
            IoError::Kernel(sys::Errno(e)) => Error::os(e, what),
            IoError::User(e) => Error::new(e.errno(), format!("{what}: {}", e.message())),
        }
    }
}

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
        let pci = PciDevice::named(name)?;
        // Whether the device is there and bound to vfio-pci is asked of sysfs only when the
        // open fails (a device fd comes only from a VFIO driver): two lookups fewer.
        let opened = match iommu {
            Some(i) => Ok(i.clone()),
            None => Iommu::shared(),
        }
        .and_then(|iommu| Ok((iommu.open_device(&pci)?, iommu)));
        let ((fd, place), iommu) = opened.map_err(|e| pci.why_not_vfio().unwrap_or(e))?;
        Device::from_io(pci.address, iommu, Io::Kernel(fd), place)
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
        let routes = irqs.iter().map(|_| IrqRoute::default()).collect();
        let irq_slots = irqs
            .iter()
            .map(|irq| (0..irq.count).map(|_| VectorSlot::default()).collect())
            .collect();
        Ok(Device {
            address,
            info: pci::identify(flags, num_regions, num_irqs, &header),
            mappings: regions.iter().map(|_| OnceCell::new()).collect(),
            fast: Default::default(),
            regions,
            areas,
            irqs,
            irq_state: Mutex::new(IrqState { routes, cancelled: false, routings: 0 }),
            irq_slots,
            io,
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
    /// features that hand one out, else 0).
    pub fn feature(&self, feature: u32, flags: u32, data: &mut [u8]) -> Result<i32> {
        let modes = FEATURE_GET | FEATURE_SET | FEATURE_PROBE;
        if feature > k::VFIO_DEVICE_FEATURE_MASK || flags & !modes != 0 || flags == 0 {
            return Err(Error::invalid(format!(
                "device feature {feature:#x} with flags {flags:#x}: expected an index up to 0xffff and \
                 flags of FEATURE_GET, FEATURE_SET and FEATURE_PROBE only (at least one)"
            )));
        }
        vfio::device_feature(self.fd()?, feature | flags, data).context(|| {
            format!("VFIO_DEVICE_FEATURE {feature} (flags {flags:#x}) on {}", self.address)
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

    pub fn reset(&self) -> Result<()> {
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

    fn region(&self, index: u32) -> Result<&Region> {
        self.regions
            .get(index as usize)
            .filter(|r| r.flags & region::REGION_PRESENT != 0)
            .ok_or_else(|| Error::invalid(format!("{} has no region {index}", self.address)))
    }

    fn region_areas(&self, r: &Region) -> &[Area] {
        &self.areas[r.first_area as usize..(r.first_area + r.num_areas) as usize]
    }

    /// Checks that `[off, off+len)` lies inside the region and the region allows every access
    /// in `access` (REGION_READ, REGION_WRITE or both).
    fn check_range(&self, r: &Region, off: u64, len: usize, access: u32) -> Result<()> {
        if off.checked_add(len as u64).is_none_or(|end| end > r.size) {
            return Err(Error::invalid(format!(
                "{} region {}: [{off:#x}, +{len:#x}) is outside its {:#x} bytes",
                self.address, r.index, r.size
            )));
        }
        for (flag, what) in [(REGION_READ, "read"), (REGION_WRITE, "written")] {
            if access & flag != 0 && r.flags & flag == 0 {
                return Err(Error::new(
                    libc::EACCES,
                    format!("{} region {} cannot be {what}", self.address, r.index),
                ));
            }
        }
        Ok(())
    }

    /// The region's contiguous mapping (made on first use).
    pub fn map(&self, index: u32) -> Result<NonNull<u8>> {
        self.mappable(index).map(|m| m.base)
    }

    /// Maps a region as [`map`](Self::map) does and says which accesses may go straight
    /// through the mapping.
    pub fn map_info(&self, index: u32) -> Result<MapInfo> {
        let m = self.mappable(index)?;
        Ok(MapInfo {
            addr: m.base.as_ptr().cast(),
            len: m.len as u64,
            direct: m.whole,
            access: m.access,
            reserved0: 0,
            reserved: [0; 2],
        })
    }

    /// The mapping of region `index`, refused for a region without mmappable areas.
    fn mappable(&self, index: u32) -> Result<&Mapping> {
        let r = self.region(index)?;
        if r.num_areas == 0 {
            return Err(Error::new(
                libc::ENOTSUP,
                format!(
                    "{} region {index} cannot be mmapped{}: use the read/write accessors",
                    self.address,
                    if r.flags & region::REGION_IO_PORT != 0 { " (I/O-port BAR)" } else { "" }
                ),
            ));
        }
        self.mapping(r)
    }

    fn mapping(&self, r: &Region) -> Result<&Mapping> {
        self.mappings[r.index as usize].get_or_try_init(|| {
            let what = || format!("mapping {} region {}", self.address, r.index);
            let page = sys::page_size();
            let len = (r.size as usize).next_multiple_of(page);
            let sources = (0..r.num_areas as usize)
                .map(|i| self.io.mmap_source(r, i))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::new(
                        libc::EPROTO,
                        format!(
                            "{}: the server sent no fd, or not one per area, to map region {} from",
                            self.address, r.index
                        ),
                    )
                })?;
            let base = mem::reserve(len).context(what)?;
            let areas = self.region_areas(r);
            let whole = match areas {
                [a] if a.offset == 0 && a.size == r.size => r.size,
                _ => 0,
            };
            // Built first, so an area failing below releases the reservation.
            let mapping =
                Mapping { base, len, whole, access: r.flags & (REGION_READ | REGION_WRITE) };
            let prot = [(REGION_READ, libc::PROT_READ), (REGION_WRITE, libc::PROT_WRITE)]
                .iter()
                .filter(|(f, _)| r.flags & f != 0)
                .fold(0, |p, (_, bit)| p | bit);
            for (a, source) in areas.iter().zip(sources) {
                // SAFETY: base..base+len is our reservation; the area lies inside the region.
                let at = unsafe { base.add(a.offset as usize) };
                // SAFETY: the range is inside our fresh reservation.
                unsafe {
                    mem::map_shared_fixed(
                        at,
                        (a.size as usize).next_multiple_of(page),
                        source,
                        r.offset + a.offset,
                        prot,
                    )
                }
                .context(what)?;
            }
            if let Some(fast) = self.fast.get(r.index as usize) {
                fast.set(&mapping);
            }
            Ok(mapping)
        })
    }

    /// A pointer to `[off, off+len)` through the mapping when one area covers it all.
    fn mapped(&self, r: &Region, off: u64, len: usize) -> Result<Option<*mut u8>> {
        let end = off + len as u64;
        if !self.region_areas(r).iter().any(|a| a.offset <= off && end <= a.offset + a.size) {
            return Ok(None);
        }
        // SAFETY: off is inside the region, hence inside the mapping.
        Ok(Some(unsafe { self.mapping(r)?.base.as_ptr().add(off as usize) }))
    }

    /// Reads `buf.len()` bytes at `off` of a region: through the mapping where one area covers
    /// the range, the device fd elsewhere. 1, 2, 4 or 8 bytes at an offset aligned to that size
    /// are one access of that width (a register); longer copies use unspecified widths.
    pub fn read(&self, index: u32, off: u64, buf: &mut [u8]) -> Result<()> {
        match (buf.len(), off % buf.len().max(1) as u64) {
            (1, _) => self.read_reg::<u8>(index, off)?.to_ne(buf),
            (2, 0) => self.read_reg::<u16>(index, off)?.to_ne(buf),
            (4, 0) => self.read_reg::<u32>(index, off)?.to_ne(buf),
            (8, 0) => self.read_reg::<u64>(index, off)?.to_ne(buf),
            (len, _) => {
                let r = self.region(index)?;
                self.check_range(r, off, len, REGION_READ)?;
                match self.mapped(r, off, len)? {
                    // SAFETY: the source is inside our mapping, the destination is the caller's.
                    Some(p) => unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len) },
                    None => self.pread(r, off, buf)?,
                }
            }
        }
        Ok(())
    }

    /// Writes `buf` at `off` of a region, with the same access rules as [`Device::read`].
    pub fn write(&self, index: u32, off: u64, buf: &[u8]) -> Result<()> {
        match (buf.len(), off % buf.len().max(1) as u64) {
            (1, _) => self.write_reg(index, off, buf[0]),
            (2, 0) => self.write_reg(index, off, u16::from_ne(buf)),
            (4, 0) => self.write_reg(index, off, u32::from_ne(buf)),
            (8, 0) => self.write_reg(index, off, u64::from_ne(buf)),
            (len, _) => {
                let r = self.region(index)?;
                self.check_range(r, off, len, REGION_WRITE)?;
                match self.mapped(r, off, len)? {
                    // SAFETY: the destination is inside our mapping, the source is the caller's.
                    Some(p) => unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, len) },
                    None => self.pwrite(r, off, buf)?,
                }
                Ok(())
            }
        }
    }

    fn pread(&self, r: &Region, off: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        self.io.read(r, off, buf).map_err(|e| {
            e.within(format!(
                "reading {len} bytes at {off:#x} of {} region {}",
                self.address, r.index
            ))
        })
    }

    fn pwrite(&self, r: &Region, off: u64, buf: &[u8]) -> Result<()> {
        self.io.write(r, off, buf).map_err(|e| {
            e.within(format!(
                "writing {} bytes at {off:#x} of {} region {}",
                buf.len(),
                self.address,
                r.index
            ))
        })
    }

    fn check_aligned<T: Width>(&self, index: u32, off: u64) -> Result<()> {
        if off % T::BYTES as u64 != 0 {
            return Err(Error::invalid(format!(
                "{} region {index}: offset {off:#x} is not aligned to the {}-byte access",
                self.address,
                T::BYTES
            )));
        }
        Ok(())
    }

    /// The register of `T`'s width at `off` of region `index`, checked once (see [`Register`]):
    /// aligned, inside the region, in one of its mmappable areas (ENOTSUP elsewhere: the
    /// device fd's part of a region is for [`read_reg`](Self::read_reg) and
    /// [`write_reg`](Self::write_reg)), in a region that may be read and written (EACCES
    /// otherwise; every mmappable BAR of vfio-pci may). Maps the region.
    pub fn register<T: Width>(&self, index: u32, off: u64) -> Result<Register<'_, T>> {
        self.check_aligned::<T>(index, off)?;
        let r = self.region(index)?;
        self.check_range(r, off, T::BYTES, REGION_READ | REGION_WRITE)?;
        let at = self.mapped(r, off, T::BYTES)?.ok_or_else(|| {
            Error::new(
                libc::ENOTSUP,
                format!(
                    "{} region {index}: [{off:#x}, +{}) is not in an mmappable area: use read_reg/write_reg",
                    self.address,
                    T::BYTES
                ),
            )
        })?;
        Ok(Register {
            at: NonNull::new(at.cast()).expect("inside a mapping"),
            _device: PhantomData,
        })
    }

    /// One read of exactly `T`'s width at `off` (aligned to it).
    #[inline]
    pub fn read_reg<T: Width>(&self, index: u32, off: u64) -> Result<T> {
        match self.fast.get(index as usize).and_then(|f| f.direct::<T>(off, REGION_READ)) {
            // SAFETY: aligned, inside a mapped area; volatile so it is exactly one access.
            Some(p) => Ok(unsafe { p.read_volatile() }),
            None => self.read_reg_slow(index, off),
        }
    }

    /// Everything but a mapped region's plain access: the first mapping, the device fd, errors.
    #[cold]
    #[inline(never)]
    fn read_reg_slow<T: Width>(&self, index: u32, off: u64) -> Result<T> {
        self.check_aligned::<T>(index, off)?;
        let r = self.region(index)?;
        self.check_range(r, off, T::BYTES, REGION_READ)?;
        match self.mapped(r, off, T::BYTES)? {
            // SAFETY: aligned, inside a mapped area; volatile so it is exactly one access.
            Some(p) => Ok(unsafe { p.cast::<T>().read_volatile() }),
            None => {
                let mut bytes = [0u8; 8];
                self.pread(r, off, &mut bytes[..T::BYTES])?;
                Ok(T::from_ne(&bytes[..T::BYTES]))
            }
        }
    }

    /// One write of exactly `T`'s width at `off` (aligned to it).
    #[inline]
    pub fn write_reg<T: Width>(&self, index: u32, off: u64, value: T) -> Result<()> {
        match self.fast.get(index as usize).and_then(|f| f.direct::<T>(off, REGION_WRITE)) {
            // SAFETY: aligned, inside a mapped area; volatile so it is exactly one access.
            Some(p) => unsafe { p.write_volatile(value) },
            None => self.write_reg_slow(index, off, value)?,
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn write_reg_slow<T: Width>(&self, index: u32, off: u64, value: T) -> Result<()> {
        self.check_aligned::<T>(index, off)?;
        let r = self.region(index)?;
        self.check_range(r, off, T::BYTES, REGION_WRITE)?;
        match self.mapped(r, off, T::BYTES)? {
            // SAFETY: aligned, inside a mapped area; volatile so it is exactly one access.
            Some(p) => unsafe { p.cast::<T>().write_volatile(value) },
            None => {
                let mut bytes = [0u8; 8];
                value.to_ne(&mut bytes[..T::BYTES]);
                self.pwrite(r, off, &bytes[..T::BYTES])?;
            }
        }
        Ok(())
    }

    /// The config-space offset of a capability (`cap_id < 0x100` standard, else extended as
    /// `id + PCI_CAP_EXTENDED`), or None if the device does not have it.
    pub fn find_capability(&self, cap_id: u32) -> Result<Option<u32>> {
        let r = self.region(PCI_CONFIG)?;
        let mut config = vec![0u8; r.size.min(4096) as usize];
        self.pread(r, 0, &mut config)?;
        Ok(pci::find_capability(&config, cap_id))
    }

    fn irq_record(&self, index: u32) -> Result<&Irq> {
        self.irqs.get(index as usize).filter(|i| i.count > 0).ok_or_else(|| {
            Error::invalid(format!("{} has no IRQ {index} ({})", self.address, irq_name(index)))
        })
    }

    fn check_vectors(&self, index: u32, first: u32, count: u32) -> Result<&Irq> {
        let irq = self.irq_record(index)?;
        if count == 0 || first.checked_add(count).is_none_or(|end| end > irq.count) {
            return Err(Error::invalid(format!(
                "{} IRQ {}: vectors [{first}, +{count}) are outside its {} vectors",
                self.address,
                irq_name(index),
                irq.count
            )));
        }
        Ok(irq)
    }

    fn set_irqs(&self, encoded: &mut [u8], what: impl FnOnce() -> String) -> Result<()> {
        self.io.set_irqs(encoded).map_err(|e| e.within(format!("{} on {}", what(), self.address)))
    }

    fn irq_state(&self) -> MutexGuard<'_, IrqState> {
        self.irq_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes vectors `first..first+count` of an IRQ index to eventfds owned by the device,
    /// empty, and enables them. Returns the eventfds, which the device closes at disable or
    /// drop. Threads waiting on vectors this re-routes end their wait with ECANCELED.
    pub fn irq_enable(&self, index: u32, first: u32, count: u32) -> Result<Vec<RawFd>> {
        self.check_eventfd_vectors(index, first, count)?;
        // Each vector keeps one eventfd for the device's life (the waits read it without
        // the lock: see VectorSlot); the caller gets a duplicate, closed at disable.
        let slots = &self.irq_slots[index as usize][first as usize..(first + count) as usize];
        let fds = slots
            .iter()
            .map(|slot| {
                let own = slot.own.get_or_try_init(sys::eventfd)?;
                sys::dup(own.as_fd())
            })
            .collect::<sys::SysResult<Vec<_>>>()
            .context(|| "creating an eventfd")?;
        self.route(index, first, fds, true)
    }

    /// [`Device::irq_enable`] with the caller's eventfds, one per vector from `first`: the
    /// device keeps duplicates (the caller's fds stay the caller's, to read and close), and
    /// [`Device::irq_wait`] refuses these vectors (the caller waits on its own fds).
    pub fn irq_enable_fds(&self, index: u32, first: u32, fds: &[BorrowedFd]) -> Result<()> {
        let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
        self.check_eventfd_vectors(index, first, count)?;
        let dups = fds
            .iter()
            .map(|fd| sys::dup(*fd).context(|| format!("duplicating fd {}", fd.as_raw_fd())))
            .collect::<Result<Vec<_>>>()?;
        self.route(index, first, dups, false).map(drop)
    }

    fn check_eventfd_vectors(&self, index: u32, first: u32, count: u32) -> Result<()> {
        let irq = self.check_vectors(index, first, count)?;
        if irq.flags & irq::IRQ_EVENTFD == 0 {
            return Err(Error::new(
                libc::ENOTSUP,
                format!("{} IRQ {} cannot signal an eventfd", self.address, irq_name(index)),
            ));
        }
        Ok(())
    }

    /// Tells the kernel to signal `fds` for vectors `first..` (`waitable`: duplicates of their
    /// own eventfds, which are emptied first), records them, and returns their numbers.
    fn route(
        &self,
        index: u32,
        first: u32,
        fds: Vec<OwnedFd>,
        waitable: bool,
    ) -> Result<Vec<RawFd>> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let count = raw.len() as u32;
        let mut state = self.irq_state();
        // The kernel's bare EINVAL, explained: a function signals one interrupt type at a time.
        let types = [irq::IRQ_INTX, irq::IRQ_MSI, irq::IRQ_MSIX];
        if let Some(&other) = types.iter().find(|&&t| {
            t != index
                && types.contains(&index)
                && state.routes.get(t as usize).is_some_and(IrqRoute::is_enabled)
        }) {
            return Err(Error::invalid(format!(
                "{} IRQ {} is enabled: disable it before enabling {} (one interrupt type at a time)",
                self.address,
                irq_name(other),
                irq_name(index)
            )));
        }
        let route = &mut state.routes[index as usize];
        // Sized at the index's first enable: most of a device's vectors never are.
        route
            .vectors
            .resize_with(route.vectors.len().max(self.irqs[index as usize].count as usize), || {
                None
            });
        let span = first as usize..(first + count) as usize;
        let rerouted = route.vectors[span.clone()].iter().any(Option::is_some);
        // Made before the kernel is told, so a failure leaves everything as it was.
        let new_cancel = match rerouted || route.cancel.is_none() {
            true => Some(Arc::new(sys::eventfd().context(|| "creating an eventfd")?)),
            false => None,
        };
        let slots = &self.irq_slots[index as usize][span.clone()];
        if waitable {
            // What a previous routing left unread is not this one's. An eventfd read fails
            // only when it is empty.
            slots.iter().filter_map(|s| s.own.get()).for_each(|own| {
                let _ = sys::eventfd_take(own.as_fd());
            });
        }
        self.io.set_irq_eventfds(index, first, &raw).map_err(|e| {
            let what = format!("enabling {} vectors [{first}, +{count})", irq_name(index));
            e.within(format!("{what} on {}", self.address))
        })?;
        state.routings += 1;
        let (routing, cancelled) = (state.routings, state.cancelled);
        let route = &mut state.routes[index as usize];
        for (v, fd) in route.vectors[span].iter_mut().zip(fds) {
            *v = Some(Vector { _fd: fd, waitable, routing });
        }
        let published = match (cancelled, waitable) {
            (true, _) => SLOT_OFF,
            (false, true) => SLOT_OWN,
            (false, false) => SLOT_CALLER,
        };
        slots.iter().for_each(|s| s.state.store(published, Ordering::Release));
        if let Some(cancel) = new_cancel {
            route.wake_waiters();
            route.cancel = Some(cancel);
        }
        Ok(raw)
    }

    /// Disables an IRQ index and closes its eventfds; threads waiting on it end their wait
    /// with ECANCELED.
    pub fn irq_disable(&self, index: u32) -> Result<()> {
        self.irq_record(index)?;
        let mut state = self.irq_state();
        let route = &mut state.routes[index as usize];
        if !route.is_enabled() {
            return Err(Error::invalid(format!(
                "{} IRQ {} is not enabled",
                self.address,
                irq_name(index)
            )));
        }
        self.set_irqs(&mut irq::encode_set(index, 0, 0, Action::Trigger), || {
            format!("disabling {}", irq_name(index))
        })?;
        route.vectors.iter_mut().for_each(|v| *v = None);
        self.irq_slots[index as usize]
            .iter()
            .for_each(|s| s.state.store(SLOT_OFF, Ordering::Release));
        route.wake_waiters();
        Ok(())
    }

    /// Ends every wait in [`Device::irq_wait`], current and later, with ECANCELED: how a
    /// driver stops its interrupt threads before dropping the device (the C API's close does
    /// this first). Over vfio-user it also ends the requests waiting for the server's reply,
    /// and the connection: the device is to be dropped.
    pub fn cancel_waits(&self) {
        let mut state = self.irq_state();
        state.cancelled = true;
        self.irq_slots.iter().flatten().for_each(|s| s.state.store(SLOT_OFF, Ordering::Release));
        state.routes.iter_mut().for_each(IrqRoute::wake_waiters);
        drop(state);
        if let Io::User { client, .. } = &self.io {
            client.cancel();
        }
    }

    /// Mask or unmask: where the kernel reports the index not MASKABLE (MSI and MSI-X on
    /// vfio-pci) its own answer, ENOTTY, with a message saying why.
    fn vector_action(&self, index: u32, vector: u32, action: Action) -> Result<()> {
        if self.check_vectors(index, vector, 1)?.flags & irq::IRQ_MASKABLE == 0 {
            return Err(Error::new(
                libc::ENOTTY,
                format!(
                    "{} {} vectors cannot be masked or unmasked (the kernel does not report them MASKABLE)",
                    self.address,
                    irq_name(index)
                ),
            ));
        }
        self.send_action(index, vector, action)
    }

    fn send_action(&self, index: u32, vector: u32, action: Action) -> Result<()> {
        self.io
            .set_irqs(&mut irq::encode_set(index, vector, 1, action))
            .map_err(|e| self.action_failed(index, vector, action, e))
    }

    #[cold]
    fn action_failed(&self, index: u32, vector: u32, action: Action, e: IoError) -> Error {
        let what = format!("{action:?} of {} vector {vector}", irq_name(index)).to_lowercase();
        e.within(format!("{what} on {}", self.address))
    }

    pub fn irq_mask(&self, index: u32, vector: u32) -> Result<()> {
        self.vector_action(index, vector, Action::Mask)
    }

    pub fn irq_unmask(&self, index: u32, vector: u32) -> Result<()> {
        self.vector_action(index, vector, Action::Unmask)
    }

    /// The vector's lock-free state (None: no such index or vector).
    #[inline]
    fn irq_slot(&self, index: u32, vector: u32) -> Option<&VectorSlot> {
        self.irq_slots.get(index as usize)?.get(vector as usize)
    }

    /// Makes the kernel signal the vector's eventfd as if the device had raised it.
    /// A vector found routed is triggered without the lock: a disable racing with it leaves
    /// the kernel nothing to signal, as if the trigger had come first.
    #[inline(always)]
    pub fn irq_trigger(&self, index: u32, vector: u32) -> Result<()> {
        let routed = self
            .irq_slot(index, vector)
            .is_some_and(|s| s.state.load(Ordering::Acquire) != SLOT_OFF);
        match (&self.io, routed) {
            // The usual case, as one ioctl.
            (Io::Kernel(fd), true) => {
                let mut set = irq::encode_set(index, vector, 1, Action::Trigger);
                vfio::set_irqs(fd.as_fd(), &mut set).map_err(|e| {
                    self.action_failed(index, vector, Action::Trigger, IoError::Kernel(e))
                })
            }
            _ => self.irq_trigger_locked(index, vector),
        }
    }

    /// [`Device::irq_trigger`] on a vector not found routed (which error, precisely, or a
    /// routing just made), or over vfio-user.
    #[inline(never)]
    fn irq_trigger_locked(&self, index: u32, vector: u32) -> Result<()> {
        self.with_route(index, vector, |_, _| Ok(()))?;
        self.send_action(index, vector, Action::Trigger)
    }

    /// Runs `f` on an enabled vector's routing and its index's cancel eventfd, under the IRQ
    /// lock (so `f` must not block).
    fn with_route<T>(
        &self,
        index: u32,
        vector: u32,
        f: impl FnOnce(&Vector, &Arc<OwnedFd>) -> Result<T>,
    ) -> Result<T> {
        self.check_vectors(index, vector, 1)?;
        let state = self.irq_state();
        if state.cancelled {
            return Err(self.cancelled(index, vector, "the device is being closed"));
        }
        let route = &state.routes[index as usize];
        match (route.vector(vector), &route.cancel) {
            (Some(v), Some(cancel)) => f(v, cancel),
            _ => Err(Error::invalid(format!(
                "{} {} vector {vector} is not enabled",
                self.address,
                irq_name(index)
            ))),
        }
    }

    fn cancelled(&self, index: u32, vector: u32, why: &str) -> Error {
        Error::new(
            libc::ECANCELED,
            format!("{} {} vector {vector}: wait cancelled: {why}", self.address, irq_name(index)),
        )
    }

    /// After a wake-up on the cancel eventfd: the index's new cancel eventfd when the vector
    /// still has the same routing (other vectors were re-routed), ECANCELED when it has not.
    fn still_routed(&self, index: u32, vector: u32, routing: u64) -> Result<Arc<OwnedFd>> {
        let state = self.irq_state();
        let route = &state.routes[index as usize];
        match (route.vector(vector), &route.cancel) {
            _ if state.cancelled => {
                Err(self.cancelled(index, vector, "the device is being closed"))
            }
            (Some(now), Some(cancel)) if now.routing == routing => Ok(cancel.clone()),
            _ => Err(self.cancelled(index, vector, "the IRQ was disabled or re-enabled")),
        }
    }

    /// Waits for the vector to fire and returns how many times it did since the last wait.
    /// `timeout_ms < 0` waits forever; a timeout is `ETIMEDOUT`; a wait ended by
    /// [`Device::irq_disable`], an [`Device::irq_enable`] that re-routes the vector, or
    /// [`Device::cancel_waits`] is `ECANCELED`. Holds no lock while waiting.
    #[inline]
    pub fn irq_wait(&self, index: u32, vector: u32, timeout_ms: i32) -> Result<u64> {
        // Already fired: one load and one non-blocking read, no lock (see VectorSlot).
        let own = self
            .irq_slot(index, vector)
            .filter(|s| s.state.load(Ordering::Acquire) == SLOT_OWN)
            .and_then(|s| s.own.get());
        if let Some(Ok(Some(count))) = own.map(|fd| sys::eventfd_take(fd.as_fd())) {
            return Ok(count);
        }
        self.irq_wait_locked(index, vector, timeout_ms)
    }

    /// [`Device::irq_wait`] when the vector had not fired, or something is wrong: decided
    /// under the IRQ lock, then waiting without it.
    #[inline(never)]
    fn irq_wait_locked(&self, index: u32, vector: u32, timeout_ms: i32) -> Result<u64> {
        let take =
            |fd: &OwnedFd| sys::eventfd_take(fd.as_fd()).context(|| "reading an IRQ eventfd");
        let fired = self.with_route(index, vector, |v, cancel| {
            if !v.waitable {
                return Err(Error::invalid(format!(
                    "{} {} vector {vector} signals the caller's own eventfd: wait on that fd",
                    self.address,
                    irq_name(index)
                )));
            }
            let own = self.irq_slot(index, vector).and_then(|s| s.own.get());
            let own = own.expect("a vector routed to its own eventfd has one");
            Ok(take(own)?.map_or_else(|| Err((own, v.routing, cancel.clone())), Ok))
        })?;
        let (fd, routing, mut cancel) = match fired {
            Ok(count) => return Ok(count),
            Err(waiting) => waiting,
        };
        let deadline =
            (timeout_ms >= 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64));
        loop {
            let left = match deadline {
                None => -1,
                Some(d) => {
                    d.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128)
                        as i32
                }
            };
            match sys::poll_readable(fd.as_fd(), cancel.as_fd(), left)
                .context(|| "waiting on an IRQ eventfd")?
            {
                None => {
                    return Err(Error::new(
                        libc::ETIMEDOUT,
                        format!(
                            "{} {} vector {vector}: no interrupt within {timeout_ms} ms",
                            self.address,
                            irq_name(index)
                        ),
                    ));
                }
                Some(Readable::Cancel) => cancel = self.still_routed(index, vector, routing)?,
                // Another waiter may have taken it first: then wait on.
                Some(Readable::Fd) => {
                    if let Some(count) = take(fd)? {
                        return Ok(count);
                    }
                }
            }
        }
    }
}

fn irq_name(index: u32) -> &'static str {
    ["INTx", "MSI", "MSI-X", "ERR", "REQ"].get(index as usize).copied().unwrap_or("device-specific")
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
