//! The DMA context: which IOVAs a device may reach, and the memory behind them.
//!
//! One type, four carriers behind it: the kernel's legacy type1 container with its groups,
//! iommufd (an IOAS that devices opened through their cdev attach to), vfio-user (each map sent
//! to every device server in the context), and VFIO's no-IOMMU mode (no translation: memory is
//! locked and its physical address is the IOVA). The IOVA bookkeeping, DMA buffers and error
//! messages are shared; only the requests differ.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use crate::dmamap::DmaMap;
use crate::error::{Error, Result};
use crate::handoff::{self, Handoff};
use crate::host::{self, PciDevice};
use crate::iova::{self, IovaRange, IovaSpace};
use crate::pagemap::{self, PagemapError};
use crate::sys::{self, Context, iommufd, mem, socket, sysfs, vfio};
use crate::vfio_user::{Client, DmaAccess};

/// Pick the best interface the kernel offers (or what `VFIOKIT_IOMMU` in the environment says).
pub const IOMMU_AUTO: u32 = 0;
/// The legacy container/group interface with the type1 (v2) IOMMU driver.
pub const IOMMU_TYPE1: u32 = 1;
/// iommufd (/dev/iommu) with devices opened through their VFIO cdev.
pub const IOMMU_IOMMUFD: u32 = 2;
/// Devices served by other processes over vfio-user sockets (never chosen by AUTO).
pub const IOMMU_VFIO_USER: u32 = 3;
/// The legacy container with the original type1 (v1) IOMMU driver (see the README for how its
/// unmap differs from v2's).
pub const IOMMU_TYPE1V1: u32 = 4;
/// iommufd's compatibility container: /dev/iommu driven with the legacy container and group
/// ioctls, type1v2 semantics.
pub const IOMMU_IOMMUFD_COMPAT: u32 = 5;
/// iommufd's compatibility container with type1 (v1) semantics.
pub const IOMMU_IOMMUFD_COMPAT_V1: u32 = 6;
/// VFIO's unsafe no-IOMMU mode, for machines without an IOMMU: no isolation, DMA buffers locked
/// in memory with their physical addresses as IOVAs. Never chosen by AUTO.
pub const IOMMU_NOIOMMU: u32 = 7;

/// The kernel interface a context uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuKind {
    Type1,
    Iommufd,
    VfioUser,
    Type1V1,
    IommufdCompat,
    IommufdCompatV1,
    NoIommu,
}

impl IommuKind {
    pub fn code(self) -> u32 {
        match self {
            IommuKind::Type1 => IOMMU_TYPE1,
            IommuKind::Iommufd => IOMMU_IOMMUFD,
            IommuKind::VfioUser => IOMMU_VFIO_USER,
            IommuKind::Type1V1 => IOMMU_TYPE1V1,
            IommuKind::IommufdCompat => IOMMU_IOMMUFD_COMPAT,
            IommuKind::IommufdCompatV1 => IOMMU_IOMMUFD_COMPAT_V1,
            IommuKind::NoIommu => IOMMU_NOIOMMU,
        }
    }

    /// A kind that uses the legacy container and group ioctls (on /dev/vfio/vfio or
    /// /dev/iommu).
    fn is_container(self) -> bool {
        matches!(
            self,
            IommuKind::Type1
                | IommuKind::Type1V1
                | IommuKind::IommufdCompat
                | IommuKind::IommufdCompatV1
        )
    }

    /// A kind whose DMA maps go through iommufd (which pins pages rather than following PFNs).
    fn is_iommufd(self) -> bool {
        matches!(self, IommuKind::Iommufd | IommuKind::IommufdCompat | IommuKind::IommufdCompatV1)
    }

    /// The kernel's errno for a DMA range past 2^64: no valid range to type1, an overflow to
    /// iommufd.
    fn wraps_errno(self) -> i32 {
        if self.is_iommufd() { libc::EOVERFLOW } else { libc::EINVAL }
    }

    /// The kind `IOMMU_AUTO` stands for: `VFIOKIT_IOMMU` (type1, iommufd or noiommu) if set,
    /// else iommufd where the kernel has it and gives devices a cdev (6.6+), else type1. The
    /// unsafe no-IOMMU mode only when named.
    pub fn auto() -> Result<IommuKind> {
        match std::env::var("VFIOKIT_IOMMU").as_deref() {
            Ok("type1") => Ok(IommuKind::Type1),
            Ok("iommufd") => Ok(IommuKind::Iommufd),
            Ok("noiommu") => Ok(IommuKind::NoIommu),
            Ok(other) => Err(Error::invalid(format!(
                "VFIOKIT_IOMMU={other}: expected type1, iommufd or noiommu"
            ))),
            Err(_)
                if sysfs::exists(Path::new(IOMMUFD))
                    && sysfs::exists(Path::new("/dev/vfio/devices")) =>
            {
                Ok(IommuKind::Iommufd)
            }
            Err(_) => Ok(IommuKind::Type1),
        }
    }

    /// The kind an `IOMMU_*` code (the C API's and Python's integer) names; AUTO as
    /// [`auto`](Self::auto).
    pub fn from_code(code: u32) -> Result<IommuKind> {
        match code {
            IOMMU_TYPE1 => Ok(IommuKind::Type1),
            IOMMU_IOMMUFD => Ok(IommuKind::Iommufd),
            IOMMU_VFIO_USER => Ok(IommuKind::VfioUser),
            IOMMU_TYPE1V1 => Ok(IommuKind::Type1V1),
            IOMMU_IOMMUFD_COMPAT => Ok(IommuKind::IommufdCompat),
            IOMMU_IOMMUFD_COMPAT_V1 => Ok(IommuKind::IommufdCompatV1),
            IOMMU_NOIOMMU => Ok(IommuKind::NoIommu),
            IOMMU_AUTO => IommuKind::auto(),
            other => Err(Error::invalid(format!(
                "unknown IOMMU kind {other} (expected 0 auto, 1 type1, 2 iommufd, 3 vfio-user, 4 type1 v1, \
                 5 iommufd compat, 6 iommufd compat v1, 7 no-IOMMU)"
            ))),
        }
    }
}

const CONTAINER: &str = "/dev/vfio/vfio";
const IOMMUFD: &str = "/dev/iommu";
const TYPE1V2: u32 = 3;
const TYPE1: u32 = 1;
const NOIOMMU: u32 = vfio_bindings::bindings::vfio::VFIO_NOIOMMU_IOMMU;
/// VFIO's switch for no-IOMMU mode; absent where the kernel lacks CONFIG_VFIO_NOIOMMU.
pub(crate) const NOIOMMU_PARAM: &str = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";
const CAP_SYS_RAWIO: u32 = 17;

enum Backend {
    /// Any container kind: the legacy one, or /dev/iommu used as one.
    Type1 {
        container: OwnedFd,
        kind: IommuKind,
    },
    Iommufd {
        fd: OwnedFd,
        ioas: u32,
    },
    /// The device servers; held while maps are sent, so each server sees every map once and
    /// in order (never the state lock: the receivers need it to serve DMA meanwhile).
    VfioUser {
        peers: Mutex<Vec<std::sync::Weak<Client>>>,
    },
    /// A container with the no-IOMMU driver: groups as for type1, no DMA requests at all.
    NoIommu {
        container: OwnedFd,
    },
}

/// How a vfio-user context's mapping is offered to servers.
struct UserMap {
    writable: bool,
    /// The memfd behind a DMA buffer, which servers map; without one they use DMA_READ/WRITE.
    fd: Option<Arc<OwnedFd>>,
}

/// The device may only read this memory: an IOMMU mapping without write permission.
pub const DMA_READONLY: u32 = 1 << 0;
/// `alloc` only: back the buffer with 2 MiB hugetlb pages (length rounded, IOVA aligned).
pub const DMA_HUGE_2M: u32 = 1 << 1;
/// `alloc` only: back the buffer with 1 GiB hugetlb pages (length rounded, IOVA aligned).
pub const DMA_HUGE_1G: u32 = 1 << 2;
const DMA_FLAGS: u32 = DMA_READONLY | DMA_HUGE_2M | DMA_HUGE_1G;

/// A DMA buffer from `alloc`.
struct Buffer {
    iova: u64,
    len: usize,
}

/// A map made on a type1 context before its first group: the kernel takes it at attach.
struct EarlyMap {
    vaddr: usize,
    len: usize,
    iova: u64,
    writable: bool,
}

struct State {
    /// Groups attached to the container, kept until the context closes so that DMA mappings
    /// outlive any one device. Ordered, like `devices`: both stay small, and a short tree walk
    /// costs an open less than hashing.
    groups: BTreeMap<u32, OwnedFd>,
    /// Valid IOVA ranges and the mappings in them, once first needed (`stale` until then). A
    /// type1 container reports its ranges only once a group is in it: until then the whole
    /// space, and `early` holds the maps.
    space: IovaSpace,
    /// Type1 before the first group: the maps the kernel has not been given yet.
    early: Option<Vec<EarlyMap>>,
    /// The valid ranges are not known yet, or the kernel's changed (a device attached): they
    /// are found before the next claim, allocation or query, so an open does not pay for them.
    stale: bool,
    /// Every DMA mapping by IOVA and by address (for translate).
    maps: DmaMap,
    /// DMA buffers from `alloc`, by address.
    buffers: HashMap<usize, Buffer>,
    /// Guard mode: allocated IOVA ranges get an unmapped page after them (their IOVAs here).
    guarded: Option<HashSet<u64>>,
    /// PCI addresses of the devices open in this context (see [`OpenDevice`]).
    devices: BTreeSet<String>,
    /// An adopted iommufd context: the device cdevs handed over with it, by PCI address, each
    /// taken by the device's first open.
    adopted: HashMap<String, OwnedFd>,
    /// vfio-user contexts: each mapping's permission and fd, by IOVA.
    user_maps: HashMap<u64, UserMap>,
    /// The least alignment of IOVAs the allocator hands out: the page size, or the largest
    /// smallest page of the context's vfio-user servers.
    iova_align: u64,
}

impl State {
    /// Records a mapping the kernel (or the early list) has taken; its IOVA range was claimed,
    /// so no other record can overlap it.
    fn record(&mut self, vaddr: *mut u8, len: usize, iova: u64) -> Result<()> {
        self.maps
            .insert(vaddr as usize, len, iova)
            .map_err(|why| Error::invalid(format!("DMA map: {why}")))
    }

    /// Whether `m` is the mapping of a DMA buffer from alloc.
    fn is_buffer(&self, m: &crate::DmaMapping) -> bool {
        self.buffers.get(&m.vaddr).is_some_and(|b| b.iova == m.iova)
    }

    /// Gives an IOVA range (and its guard page) back to the allocator.
    fn release_iova(&mut self, iova: u64, len: usize) {
        let reserved = self.reserved(iova, len as u64);
        self.space.release(iova, reserved);
        if let Some(guarded) = self.guarded.as_mut() {
            guarded.remove(&iova);
        }
    }

    /// How much IOVA space the mapping at `iova` of `len` bytes holds: its guard page too.
    fn reserved(&self, iova: u64, len: u64) -> u64 {
        match &self.guarded {
            Some(g) if g.contains(&iova) => len + sys::page_size() as u64,
            _ => len,
        }
    }
}

/// A device's place in its context. While it lives the device cannot be opened again in the
/// context: type1 would hand out a second fd silently sharing the first one's IRQs and reset,
/// iommufd would refuse the second bind as if another context held the device. Kept by the
/// device after its fd, so the place is free only once the fd is closed.
pub(crate) struct OpenDevice {
    context: Arc<DmaContext>,
    address: String,
}

impl Drop for OpenDevice {
    fn drop(&mut self) {
        lock(&self.context.state).devices.remove(&self.address);
    }
}

/// What an [`Iommu`] shares.
pub(crate) struct DmaContext {
    backend: Backend,
    state: Mutex<State>,
}

impl Drop for DmaContext {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Backend::NoIommu { .. } = self.backend {
            // The locks stand in for the kernel's pins, which a closing container drops.
            for m in state.maps.iter().filter(|m| !state.buffers.contains_key(&m.vaddr)) {
                let _ = mem::unlock(m.vaddr as *const u8, m.len);
            }
        }
        for (&addr, &Buffer { len, .. }) in &state.buffers {
            // SAFETY: alloc mapped this range; the context is going away, so no one can free it.
            unsafe { mem::unmap(NonNull::new(addr as *mut u8).expect("non-null buffer"), len) };
        }
    }
}

/// A DMA context shared by the devices opened in it. Cloning shares it.
#[derive(Clone)]
pub struct Iommu(Arc<DmaContext>);

/// The same context (not merely the same kind).
impl PartialEq for Iommu {
    fn eq(&self, other: &Iommu) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Iommu").field(&self.kind()).finish()
    }
}

static DEFAULT: Mutex<Weak<DmaContext>> = Mutex::new(Weak::new());

impl Iommu {
    /// Opens a new context of `kind` (see [`open_auto`](Self::open_auto) for the usual choice).
    pub fn open(kind: IommuKind) -> Result<Iommu> {
        let (backend, early) = match kind {
            kind if kind.is_container() => {
                let container = match kind.is_iommufd() {
                    true => open_container(
                        IOMMUFD,
                        "the compatibility container is iommufd's: is the kernel built with CONFIG_IOMMUFD?",
                    )?,
                    false => open_container(CONTAINER, "is the vfio module loaded?")?,
                };
                (Backend::Type1 { container, kind }, Some(Vec::new()))
            }
            IommuKind::Iommufd => {
                let fd = open_node(IOMMUFD, "is the kernel built with CONFIG_IOMMUFD?")?;
                let ioas = iommufd::ioas_alloc(fd.as_fd()).context(|| "allocating an IOAS")?;
                (Backend::Iommufd { fd, ioas }, None)
            }
            IommuKind::VfioUser => (Backend::VfioUser { peers: Mutex::new(Vec::new()) }, None),
            IommuKind::NoIommu => {
                let container = open_container(CONTAINER, "is the vfio module loaded?")?;
                check_noiommu(&container)?;
                (Backend::NoIommu { container }, None)
            }
            _ => unreachable!("every container kind is matched above"),
        };
        Ok(Iommu::with(backend, None, early, BTreeMap::new(), HashMap::new()))
    }

    /// A context over `backend` with no mapping yet; `valid` None: its ranges are found when
    /// first needed (see [`Iommu::refresh_ranges`]).
    fn with(
        backend: Backend,
        valid: Option<Vec<IovaRange>>,
        early: Option<Vec<EarlyMap>>,
        groups: BTreeMap<u32, OwnedFd>,
        adopted: HashMap<String, OwnedFd>,
    ) -> Iommu {
        // Read once: an environment lookup costs a context's open more than its allocations.
        static GUARD: OnceLock<bool> = OnceLock::new();
        let guard =
            *GUARD.get_or_init(|| std::env::var_os("VFIOKIT_DMA_GUARD") == Some("1".into()));
        let state = State {
            groups,
            stale: valid.is_none(),
            space: valid.map(IovaSpace::new).unwrap_or_default(),
            early,
            maps: DmaMap::new(),
            buffers: HashMap::new(),
            guarded: guard.then(HashSet::new),
            devices: BTreeSet::new(),
            adopted,
            user_maps: HashMap::new(),
            iova_align: sys::page_size() as u64,
        };
        Iommu(Arc::new(DmaContext { backend, state: Mutex::new(state) }))
    }

    /// Hands this context, and access to the named devices (bound to vfio-pci), to the process
    /// at the other end of the UNIX socket `sock`, which rebuilds it with
    /// [`adopt`](Self::adopt): how a privileged helper opens what an unprivileged driver then
    /// uses. The fds go over SCM_RIGHTS: the container and the devices' groups (type1, which
    /// this attaches), or /dev/iommu and the devices' cdevs (iommufd). Only before any DMA
    /// mapping: a mapping's memory is this process's. Afterwards the context is the receiver's
    /// to map in; this process should close its handle.
    pub fn export(&self, devices: &[&str], sock: BorrowedFd) -> Result<()> {
        if devices.len() > handoff::MAX_ITEMS {
            return Err(Error::invalid(format!(
                "{} devices to hand over ({} at most)",
                devices.len(),
                handoff::MAX_ITEMS
            )));
        }
        let pcis = devices
            .iter()
            .map(|name| {
                let pci = PciDevice::find(name)?;
                pci.require_vfio_driver()?;
                Ok(pci)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut message =
            Handoff { kind: self.kind().code(), ioas: 0, groups: Vec::new(), devices: Vec::new() };
        let mut cdevs = Vec::new();
        let mut state = self.state();
        if !state.maps.is_empty() {
            return Err(Error::new(
                libc::EBUSY,
                "the context has DMA mappings: hand it over before mapping (their memory is this process's)",
            ));
        }
        let context = match &self.0.backend {
            Backend::Type1 { container, .. } => {
                for pci in &pcis {
                    self.join_group(&mut state, container, pci.iommu_group()?)?;
                }
                message.groups = state.groups.keys().copied().collect();
                container.as_fd()
            }
            Backend::Iommufd { fd, ioas } => {
                message.ioas = *ioas;
                for pci in &pcis {
                    cdevs.push(open_node(&pci.cdev()?, "")?);
                    message.devices.push(pci.address.clone());
                }
                fd.as_fd()
            }
            Backend::VfioUser { .. } => {
                return Err(Error::new(
                    libc::ENOTSUP,
                    "a vfio-user context has no fds to hand over: the other process connects to the device servers itself",
                ));
            }
            Backend::NoIommu { .. } => {
                return Err(Error::new(
                    libc::ENOTSUP,
                    "a no-IOMMU context cannot be handed to a less privileged process: its devices and DMA need \
                     CAP_SYS_RAWIO and CAP_SYS_ADMIN in the process that uses them",
                ));
            }
        };
        let fds: Vec<_> = std::iter::once(context.as_raw_fd())
            .chain(message.groups.iter().map(|g| state.groups[g].as_raw_fd()))
            .chain(cdevs.iter().map(|fd| fd.as_raw_fd()))
            .collect();
        socket::send_with_fds(sock, &message.encode(), &fds).context(|| {
            format!("handing the context to another process over fd {}", sock.as_raw_fd())
        })
    }

    /// The context another process handed over with [`export`](Self::export) on the UNIX
    /// socket `sock`; devices it named open with [`Device::open`](crate::Device::open) in it,
    /// without the privileges opening their nodes needs. A malformed message, or fds that are
    /// not what it says, is EPROTO, with every fd received closed.
    pub fn adopt(sock: BorrowedFd) -> Result<Iommu> {
        let what = || format!("receiving a handed-over context on fd {}", sock.as_raw_fd());
        let mut bytes = vec![0u8; handoff::HEADER_LEN];
        let mut fds =
            socket::recv_exact_with_fds(sock, &mut bytes, handoff::MAX_FDS).context(what)?;
        let len = Handoff::len_from_header(&bytes).map_err(|e| protocol(e.to_string()))?;
        bytes.resize(len, 0);
        fds.extend(
            socket::recv_exact_with_fds(sock, &mut bytes[handoff::HEADER_LEN..], handoff::MAX_FDS)
                .context(what)?,
        );
        let message = Handoff::decode(&bytes).map_err(|e| protocol(e.to_string()))?;
        if fds.len() != message.fds() {
            return Err(protocol(format!(
                "{} fds came with a message listing {}",
                fds.len(),
                message.fds()
            )));
        }
        let mut fds = fds.into_iter();
        let context = fds.next().expect("counted above");
        let kind = match IommuKind::from_code(message.kind) {
            Ok(kind)
                if message.kind != IOMMU_AUTO
                    && !matches!(kind, IommuKind::VfioUser | IommuKind::NoIommu) =>
            {
                kind
            }
            _ => {
                return Err(protocol(format!(
                    "context kind {} cannot be handed over",
                    message.kind
                )));
            }
        };
        if kind.is_container() {
            if !message.devices.is_empty() {
                return Err(protocol("device cdevs came with a type1 context".into()));
            }
            let groups: BTreeMap<u32, OwnedFd> = message.groups.iter().copied().zip(fds).collect();
            const CONTAINER_SET: u32 =
                vfio_bindings::bindings::vfio::VFIO_GROUP_FLAGS_CONTAINER_SET;
            for (group, fd) in &groups {
                if vfio::group_flags(fd.as_fd()).map_or(true, |f| f & CONTAINER_SET == 0) {
                    return Err(protocol(format!(
                        "the fd of group {group} is not a group in a container"
                    )));
                }
            }
            let early = groups.is_empty().then(Vec::new);
            let backend = Backend::Type1 { container: context, kind };
            return Ok(Iommu::with(backend, None, early, groups, HashMap::new()));
        }
        if !message.groups.is_empty() {
            return Err(protocol("group fds came with an iommufd context".into()));
        }
        // Read now, to check that the fd is an iommufd holding that IOAS.
        let valid = Some(
            ioas_ranges(&context, message.ioas).map_err(|e| protocol(e.message().to_string()))?,
        );
        let adopted = message.devices.into_iter().zip(fds).collect();
        let backend = Backend::Iommufd { fd: context, ioas: message.ioas };
        Ok(Iommu::with(backend, valid, None, BTreeMap::new(), adopted))
    }

    /// Opens a new context of the kind [`IommuKind::auto`] picks: iommufd where the kernel
    /// has it, else type1, unless `VFIOKIT_IOMMU` says which.
    pub fn open_auto() -> Result<Iommu> {
        Iommu::open(IommuKind::auto()?)
    }

    /// The process-wide context used by devices opened without one; it lives while any
    /// device (or caller) holds it, and a new one is opened after that.
    pub fn shared() -> Result<Iommu> {
        let mut slot = lock(&DEFAULT);
        if let Some(inner) = slot.upgrade() {
            return Ok(Iommu(inner));
        }
        let iommu = Iommu::open_auto()?;
        *slot = Arc::downgrade(&iommu.0);
        Ok(iommu)
    }

    pub fn kind(&self) -> IommuKind {
        match self.0.backend {
            Backend::Type1 { kind, .. } => kind,
            Backend::Iommufd { .. } => IommuKind::Iommufd,
            Backend::VfioUser { .. } => IommuKind::VfioUser,
            Backend::NoIommu { .. } => IommuKind::NoIommu,
        }
    }

    /// The context's fd (the container, or /dev/iommu), for ioctls vfiokit does not wrap.
    /// Borrowed: it closes with the context. A vfio-user context has none (ENOTSUP).
    pub fn fd(&self) -> Result<BorrowedFd<'_>> {
        match &self.0.backend {
            Backend::Type1 { container, .. } | Backend::NoIommu { container } => {
                Ok(container.as_fd())
            }
            Backend::Iommufd { fd, .. } => Ok(fd.as_fd()),
            Backend::VfioUser { .. } => Err(Error::new(
                libc::ENOTSUP,
                "a vfio-user context has no fd: its devices are served by other processes",
            )),
        }
    }

    /// The IOAS of an iommufd context (for IOMMU_IOAS_* ioctls on [`Iommu::fd`]); None for the
    /// other kinds.
    pub fn ioas_id(&self) -> Option<u32> {
        match &self.0.backend {
            Backend::Iommufd { ioas, .. } => Some(*ioas),
            _ => None,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.0.state)
    }

    /// Opens the VFIO device fd of `dev` in this context, with its place there.
    pub(crate) fn open_device(&self, dev: &PciDevice) -> Result<(OwnedFd, OpenDevice)> {
        if self.kind() == IommuKind::VfioUser {
            return Err(Error::invalid(format!(
                "{} is a kernel VFIO device: open it in a type1 or iommufd context, not a vfio-user one",
                dev.address
            )));
        }
        let place = self.take_place(&dev.address)?;
        self.open_device_fd(dev).map(|fd| (fd, place))
    }

    /// The device's place in this context (EBUSY if it is open here already).
    fn take_place(&self, address: &str) -> Result<OpenDevice> {
        if !self.state().devices.insert(address.to_string()) {
            return Err(Error::new(
                libc::EBUSY,
                format!(
                    "{address} is already open in this IOMMU context: use that handle (one per device and context)"
                ),
            ));
        }
        Ok(OpenDevice { context: self.0.clone(), address: address.to_string() })
    }

    /// Connects to the vfio-user server at `path` as a device of this context: it is sent every
    /// mapping the context has, and every later one.
    pub(crate) fn attach_vfio_user(&self, path: &str) -> Result<(Arc<Client>, OpenDevice)> {
        let name = format!("{}{path}", crate::device::VFIO_USER_PREFIX);
        let Backend::VfioUser { peers } = &self.0.backend else {
            return Err(Error::invalid(format!(
                "{name} is served over vfio-user: open it in a vfio-user context (VFIOKIT_IOMMU_VFIO_USER) \
                 or with none"
            )));
        };
        let place = self.take_place(&name)?;
        let context = Arc::downgrade(&self.0);
        let client = Arc::new(Client::connect(
            path,
            Box::new(move |access| match context.upgrade() {
                Some(context) => serve_dma(&context, access),
                None => Err(libc::EFAULT),
            }),
        )?);
        let mut peers = lock(peers);
        let maps: Vec<_> = {
            let state = self.state();
            state
                .maps
                .iter()
                .filter_map(|m| {
                    let user = state.user_maps.get(&m.iova)?;
                    Some((m.iova, m.len, user.writable, user.fd.clone()))
                })
                .collect()
        };
        for (iova, len, writable, fd) in maps {
            client
                .dma_map(iova, len as u64, writable, fd.as_ref().map(|f| (f.as_raw_fd(), 0)))
                .map_err(|e| {
                    Error::new(
                        e.errno(),
                        format!("giving {name} the context's DMA mappings: {}", e.message()),
                    )
                })?;
        }
        peers.retain(|p| p.strong_count() > 0);
        peers.push(Arc::downgrade(&client));
        let mut state = self.state();
        state.iova_align = state.iova_align.max(client.page_size());
        Ok((client, place))
    }

    fn open_device_fd(&self, dev: &PciDevice) -> Result<OwnedFd> {
        match &self.0.backend {
            Backend::Type1 { container, .. } | Backend::NoIommu { container } => {
                let group = dev.iommu_group()?;
                let mut state = self.state();
                self.join_group(&mut state, container, group)?;
                vfio::group_device_fd(state.groups[&group].as_fd(), &dev.address).context(|| {
                    format!("getting the VFIO device fd of {} from group {group}", dev.address)
                })
            }
            Backend::VfioUser { .. } => unreachable!("refused by open_device"),
            Backend::Iommufd { fd, ioas } => {
                // An adopted context's devices come with their cdevs: the process that
                // adopted it may not be allowed to open the nodes.
                let adopted = self.state().adopted.remove(&dev.address);
                let (device, cdev) = match adopted {
                    Some(fd) => (fd, format!("the cdev handed over for {}", dev.address)),
                    None => {
                        // Whether the node is there is checked only if it cannot be opened.
                        let cdev = dev.cdev_unchecked().map_or_else(|| dev.cdev(), Ok)?;
                        let fd = open_node(&cdev, "").map_err(|e| dev.cdev().err().unwrap_or(e))?;
                        (fd, cdev)
                    }
                };
                iommufd::bind(device.as_fd(), fd.as_fd()).map_err(|sys::Errno(e)| match e {
                    _ if dev.iommu_group().is_ok_and(|g| !host::group_blockers(g).is_empty()) => {
                        host::not_viable(dev.iommu_group().unwrap_or_default())
                    }
                    // Another device of the group belongs to another iommufd (the kernel says
                    // EPERM: the group's DMA has another owner).
                    libc::EPERM => Error::new(
                        libc::EBUSY,
                        format!(
                            "binding {cdev} ({}) to iommufd: its IOMMU group is in use by another IOMMU context or process",
                            dev.address
                        ),
                    ),
                    // The kernel's answer when another open of the cdev is bound already; our
                    // arguments are otherwise always valid.
                    libc::EINVAL | libc::EBUSY => Error::new(
                        libc::EBUSY,
                        format!(
                            "binding {cdev} ({}) to iommufd: the device is already bound (open in another IOMMU context or process)",
                            dev.address
                        ),
                    ),
                    _ => Error::os(e, format!("binding {cdev} ({}) to iommufd", dev.address)),
                })?;
                iommufd::attach(device.as_fd(), *ioas)
                    .context(|| format!("attaching {cdev} ({}) to IOAS {ioas}", dev.address))?;
                // The device's reserved regions (the MSI window...) are now cut out of the IOAS.
                self.state().stale = true;
                Ok(device)
            }
        }
    }

    /// Whether the device at `address` is open in this context.
    pub(crate) fn holds(&self, address: &str) -> bool {
        self.state().devices.contains(address)
    }

    /// VFIO_DEVICE_PCI_HOT_RESET on `device`, whose reset also resets the devices of `groups`:
    /// on type1 with those groups' fds (each must be in this container), on iommufd in the
    /// zero-length form.
    pub(crate) fn hot_reset(&self, device: BorrowedFd, groups: &[u32]) -> Result<()> {
        let state = self.state();
        let fds = match &self.0.backend {
            Backend::Type1 { .. } | Backend::NoIommu { .. } => groups
                .iter()
                .map(|g| {
                    state.groups.get(g).map(|fd| fd.as_raw_fd()).ok_or_else(|| {
                        Error::new(
                            libc::EPERM,
                            format!("group {g} is not in this context's container"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Backend::Iommufd { .. } => Vec::new(),
            Backend::VfioUser { .. } => unreachable!("a vfio-user device has no fd to reset by"),
        };
        vfio::hot_reset(device, &fds).context(|| "VFIO_DEVICE_PCI_HOT_RESET")
    }

    /// Attaches `group` to the type1 container unless it is already; the first group sets the
    /// IOMMU type and gives the kernel the maps made before it.
    fn join_group(&self, state: &mut State, container: &OwnedFd, group: u32) -> Result<()> {
        if state.groups.contains_key(&group) {
            return Ok(());
        }
        let fd = attach_group(container, group, self.kind(), state.groups.is_empty())?;
        match state.early.take() {
            Some(early) if !early.is_empty() => {
                // On failure the group fd closes, leaving the container as it was.
                let ranges = replay_early_maps(container, &early).inspect_err(|_| {
                    state.early = Some(early);
                })?;
                state.space.set_valid(ranges);
                state.stale = false;
            }
            Some(_) => state.stale = true,
            None => {}
        }
        state.groups.insert(group, fd);
        Ok(())
    }

    /// The IOVA ranges devices in this context may use.
    pub fn iova_ranges(&self) -> Result<Vec<IovaRange>> {
        let mut state = self.state();
        if state.early.is_some() {
            return Err(Error::new(
                libc::ENODEV,
                "no device is attached yet: a type1 container reports its IOVA ranges once a device's group \
                 is in it (open a device first; maps made before then are checked against them then)",
            ));
        }
        self.refresh_ranges(&mut state)?;
        Ok(state.space.valid().to_vec())
    }

    /// Finds the valid ranges when first needed, and reads the kernel's again if they changed
    /// since: an open does not pay for what it may never use.
    fn refresh_ranges(&self, state: &mut State) -> Result<()> {
        if state.stale {
            let ranges = match &self.0.backend {
                // A type1 container reports its ranges once a group is in it: until then,
                // every IOVA (the early maps are checked against the ranges at attach).
                Backend::Type1 { .. } if state.early.is_some() => vec![iova::EVERY_IOVA],
                Backend::Type1 { container, .. } => type1_ranges(container)?,
                Backend::Iommufd { fd, ioas } => ioas_ranges(fd, *ioas)?,
                Backend::VfioUser { .. } | Backend::NoIommu { .. } => vec![iova::EVERY_IOVA],
            };
            state.space.set_valid(ranges);
            state.stale = false;
        }
        Ok(())
    }

    /// Maps `len` bytes at `vaddr` for device DMA at `iova`, readable and writable.
    ///
    /// # Safety
    /// The memory must stay mapped until it is unmapped here (or the context closes), and must
    /// not be behind a Rust reference while a device may write it.
    pub unsafe fn map(&self, vaddr: *mut u8, len: usize, iova: u64) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.map_flags(vaddr, len, iova, 0) }
    }

    /// [`Iommu::map`] with `DMA_*` flags (only [`DMA_READONLY`] applies to a map).
    ///
    /// # Safety
    /// As for [`Iommu::map`].
    pub unsafe fn map_flags(
        &self,
        vaddr: *mut u8,
        len: usize,
        iova: u64,
        flags: u32,
    ) -> Result<()> {
        check_dma_args(vaddr, len, Some(iova))?;
        let writable = map_permission(flags)?;
        if self.kind() == IommuKind::NoIommu {
            return Err(Error::new(
                libc::ENOTSUP,
                format!(
                    "DMA map at IOVA {iova:#x}: a no-IOMMU context cannot place memory at an IOVA (its devices \
                     see physical addresses); map_any and alloc map memory and return its address"
                ),
            ));
        }
        // The kernel's errnos for the same mistakes (an overlap is EEXIST to both).
        if iova.checked_add(len as u64 - 1).is_none() {
            return Err(Error::new(
                self.kind().wraps_errno(),
                format!("DMA map of {len:#x} bytes at IOVA {iova:#x}: the range wraps past 2^64"),
            ));
        }
        let mut state = self.state();
        self.refresh_ranges(&mut state)?;
        if let Err(why) = state.space.claim(iova, len as u64) {
            let errno =
                if state.space.overlaps(iova, len as u64) { libc::EEXIST } else { libc::EINVAL };
            return Err(Error::new(errno, format!("DMA map: {why}")));
        }
        drop(state);
        // SAFETY: forwarded from the caller.
        let mapped = unsafe { self.map_raw(vaddr, len, iova, writable, None) };
        if mapped.is_err() {
            self.state().space.release(iova, len as u64);
        }
        mapped
    }

    /// Maps `len` bytes at `vaddr` at an IOVA the allocator picks, and returns it. In a no-IOMMU
    /// context the memory is locked (mlock) until unmapped, and the IOVA is its physical
    /// address: the range must be physically contiguous (one page, or within a hugepage).
    ///
    /// # Safety
    /// As for [`Iommu::map`].
    pub unsafe fn map_any(&self, vaddr: *mut u8, len: usize) -> Result<u64> {
        // SAFETY: forwarded from the caller.
        unsafe { self.map_any_flags(vaddr, len, 0) }
    }

    /// [`Iommu::map_any`] with `DMA_*` flags (only [`DMA_READONLY`] applies to a map).
    ///
    /// # Safety
    /// As for [`Iommu::map`].
    pub unsafe fn map_any_flags(&self, vaddr: *mut u8, len: usize, flags: u32) -> Result<u64> {
        check_dma_args(vaddr, len, None)?;
        let writable = map_permission(flags)?;
        // SAFETY: forwarded from the caller.
        unsafe { self.map_anywhere(vaddr, len, dma_alignment(len), writable, None) }
    }

    /// Maps for the device at an IOVA `align`ed that this context picks, and returns it: one
    /// from the allocator, or in a no-IOMMU context the memory's physical address.
    ///
    /// # Safety
    /// As for [`Iommu::map`].
    unsafe fn map_anywhere(
        &self,
        vaddr: *mut u8,
        len: usize,
        align: u64,
        writable: bool,
        backing: Option<Arc<OwnedFd>>,
    ) -> Result<u64> {
        if let Backend::NoIommu { .. } = self.0.backend {
            return self.lock_physical(vaddr, len, writable);
        }
        let iova = self.alloc_iova(len, align)?;
        // SAFETY: forwarded from the caller.
        match unsafe { self.map_raw(vaddr, len, iova, writable, backing) } {
            Ok(()) => Ok(iova),
            Err(e) => {
                self.state().release_iova(iova, len);
                Err(e)
            }
        }
    }

    /// No-IOMMU: locks the memory in place and records it at its physical address, which is
    /// what the device must be given. Nothing stops the device reaching other memory.
    fn lock_physical(&self, vaddr: *mut u8, len: usize, writable: bool) -> Result<u64> {
        let what = || format!("no-IOMMU DMA map of {vaddr:p}+{len:#x}");
        if !writable {
            return Err(Error::new(
                libc::ENOTSUP,
                format!(
                    "{}: read-only DMA needs an IOMMU to enforce it, and there is none",
                    what()
                ),
            ));
        }
        mem::lock(vaddr, len).map_err(|sys::Errno(e)| {
            let hint = match e {
                libc::ENOMEM | libc::EPERM | libc::EAGAIN => format!(
                    " (RLIMIT_MEMLOCK is {} bytes: raise it with ulimit -l or grant CAP_IPC_LOCK)",
                    sys::memlock_limit()
                ),
                _ => String::new(),
            };
            Error::os(e, format!("{}: locking it in memory{hint}", what()))
        })?;
        let placed = mem::pagemap(vaddr as usize, len)
            .context(|| format!("{}: reading /proc/self/pagemap", what()))
            .and_then(|entries| {
                pagemap::contiguous_physical(&entries, sys::page_size() as u64).map_err(|e| {
                    let (errno, hint) = match e {
                        PagemapError::Hidden => (libc::EPERM, " (run as root)"),
                        PagemapError::NotContiguous { .. } => (
                            libc::EINVAL,
                            " (a device without an IOMMU sees physical memory: map a page at a time, or \
                             allocate with DMA_HUGE_2M for up to 2 MiB in one piece)",
                        ),
                        PagemapError::NotPresent { .. } | PagemapError::Truncated => (libc::EIO, ""),
                    };
                    Error::new(errno, format!("{}: {e}{hint}", what()))
                })
            })
            .and_then(|phys| {
                let mut state = self.state();
                self.refresh_ranges(&mut state)?;
                state.space.claim(phys, len as u64).map_err(|why| {
                    Error::new(libc::EEXIST, format!("{}: {why}", what()))
                })?;
                state.record(vaddr, len, phys).map(|()| phys)
            });
        if placed.is_err() {
            // Undone whatever failed; munlock fails only where the memory (and its lock) is gone.
            let _ = mem::unlock(vaddr, len);
        }
        placed
    }

    /// An IOVA for `len` bytes aligned to `align`, with a guard page after it in guard mode.
    fn alloc_iova(&self, len: usize, align: u64) -> Result<u64> {
        let mut state = self.state();
        self.refresh_ranges(&mut state)?;
        let guard = if state.guarded.is_some() { sys::page_size() } else { 0 };
        let align = align.max(state.iova_align);
        let iova = state.space.alloc((len + guard) as u64, align).ok_or_else(|| {
            Error::new(
                libc::ENOSPC,
                format!("no free IOVA range of {len:#x} bytes in {}", state.space.describe()),
            )
        })?;
        if let Some(guarded) = state.guarded.as_mut().filter(|_| guard > 0) {
            guarded.insert(iova);
        }
        Ok(iova)
    }

    /// Maps for the device; `backing` is the memfd behind a DMA buffer (offered to vfio-user
    /// servers).
    unsafe fn map_raw(
        &self,
        vaddr: *mut u8,
        len: usize,
        iova: u64,
        writable: bool,
        backing: Option<Arc<OwnedFd>>,
    ) -> Result<()> {
        let result = match &self.0.backend {
            Backend::Type1 { container, .. } => {
                let mut state = self.state();
                if let Some(early) = state.early.as_mut() {
                    // No group yet: the kernel takes the map when the first one attaches.
                    early.push(EarlyMap { vaddr: vaddr as usize, len, iova, writable });
                    return state.record(vaddr, len, iova);
                }
                drop(state);
                // SAFETY: forwarded from the caller.
                unsafe {
                    vfio::dma_map(container.as_fd(), vaddr as u64, len as u64, iova, writable)
                }
            }
            // SAFETY: forwarded from the caller.
            Backend::Iommufd { fd, ioas } => unsafe {
                iommufd::ioas_map(fd.as_fd(), *ioas, vaddr as u64, len as u64, iova, writable)
            },
            Backend::VfioUser { peers } => {
                let peers = lock(peers);
                let live: Vec<Arc<Client>> = peers.iter().filter_map(|p| p.upgrade()).collect();
                let fd = backing.as_ref().map(|f| (f.as_raw_fd(), 0));
                // Recorded first: a server may reach the memory as soon as it has answered.
                // A device attaching meanwhile waits for the servers' lock, then sees it.
                {
                    let mut state = self.state();
                    state.record(vaddr, len, iova)?;
                    state.user_maps.insert(iova, UserMap { writable, fd: backing });
                }
                for (i, peer) in live.iter().enumerate() {
                    if let Err(e) = peer.dma_map(iova, len as u64, writable, fd) {
                        for done in &live[..i] {
                            let _ = done.dma_unmap(iova, len as u64);
                        }
                        let mut state = self.state();
                        state.user_maps.remove(&iova);
                        state.maps.remove(iova, len);
                        return Err(Error::new(
                            e.errno(),
                            format!("DMA map of {len:#x} bytes at IOVA {iova:#x}: {}", e.message()),
                        ));
                    }
                }
                return Ok(());
            }
            Backend::NoIommu { .. } => unreachable!("no-IOMMU maps are placed by lock_physical"),
        };
        result.map_err(|sys::Errno(e)| map_error(e, len, iova, self.kind()))?;
        self.state().record(vaddr, len, iova)
    }

    /// Removes every DMA mapping lying wholly in `[iova, iova+len)`, as the kernel's unmap
    /// does, and returns how many bytes that unmapped. Refused, with nothing unmapped, where
    /// the range cuts through a mapping, holds none (type1 itself would answer 0 bytes), or
    /// holds a DMA buffer's mapping ([`Iommu::free`] unmaps and frees a buffer). The errnos are
    /// the kernel's for the same range on this kind.
    pub fn unmap(&self, iova: u64, len: usize) -> Result<u64> {
        let kind = self.kind();
        let refuse = |errno, why: String| {
            Err(Error::new(errno, format!("DMA unmap of {len:#x} bytes at IOVA {iova:#x}: {why}")))
        };
        let page = sys::page_size() as u64;
        let Some(last) = iova.checked_add((len as u64).wrapping_sub(1)).filter(|_| len > 0) else {
            return match len {
                0 => refuse(libc::EINVAL, "the length is zero".into()),
                _ => refuse(kind.wraps_errno(), "the range wraps past 2^64".into()),
            };
        };
        // iommufd takes any byte range and answers from the mappings in it; type1 wants pages.
        if !kind.is_iommufd() && (iova | len as u64) % page != 0 {
            return refuse(
                libc::EINVAL,
                format!("IOVA and length must be multiples of the {page}-byte page"),
            );
        }
        let maps: Vec<(u64, usize)> = {
            let state = self.state();
            let mut maps = Vec::new();
            for m in state.maps.overlapping(iova, last) {
                if m.iova < iova || m.iova + (m.len as u64 - 1) > last {
                    return refuse(
                        if kind.is_iommufd() { libc::ENOENT } else { libc::EINVAL },
                        format!(
                            "the range cuts through the mapping of {:#x} bytes at IOVA {:#x} (mappings are removed whole)",
                            m.len, m.iova
                        ),
                    );
                }
                if state.is_buffer(&m) {
                    return refuse(
                        libc::EBUSY,
                        format!(
                            "IOVA {:#x} is the mapping of a DMA buffer from alloc: free the buffer instead",
                            m.iova
                        ),
                    );
                }
                maps.push((m.iova, m.len));
            }
            maps
        };
        if maps.is_empty() {
            return refuse(libc::ENOENT, "no DMA mapping lies in the range".into());
        }
        self.unmap_each(&maps)
    }

    /// Removes every DMA mapping made by [`Iommu::map`] and [`Iommu::map_any`] (DMA buffers
    /// stay mapped until freed) and returns how many bytes that unmapped.
    pub fn unmap_all(&self) -> Result<u64> {
        let maps: Vec<(u64, usize)> = {
            let state = self.state();
            state.maps.iter().filter(|m| !state.is_buffer(m)).map(|m| (m.iova, m.len)).collect()
        };
        self.unmap_each(&maps)
    }

    fn unmap_each(&self, maps: &[(u64, usize)]) -> Result<u64> {
        maps.iter().try_fold(0, |done, &(iova, len)| {
            self.unmap_mapping(iova, len).map(|()| done + len as u64)
        })
    }

    fn unmap_mapping(&self, iova: u64, len: usize) -> Result<()> {
        let mut state = self.state();
        let reserved = state.reserved(iova, len as u64);
        if !state.space.is_mapped(iova, reserved) {
            return Err(Error::new(
                libc::ENOENT,
                format!("no DMA mapping of {len:#x} bytes at IOVA {iova:#x}"),
            ));
        }
        if let Some(early) = state.early.as_mut() {
            early.retain(|m| m.iova != iova);
        } else {
            // Not under the lock: the kernel's unmap can be slow, and other DMA calls go on.
            drop(state);
            let what = || format!("DMA unmap of {len:#x} bytes at IOVA {iova:#x}");
            match &self.0.backend {
                Backend::Type1 { container, .. } => {
                    vfio::dma_unmap(container.as_fd(), iova, len as u64, false).context(what)?;
                }
                Backend::Iommufd { fd, ioas } => {
                    iommufd::ioas_unmap(fd.as_fd(), *ioas, iova, len as u64).context(what)?;
                }
                Backend::NoIommu { .. } => {
                    let vaddr = self.state().maps.containing(iova, len as u64).map(|m| m.vaddr);
                    // munlock fails only where the memory (and with it the lock) is gone.
                    let _ = vaddr.map(|v| mem::unlock(v as *const u8, len));
                }
                Backend::VfioUser { peers } => {
                    let peers = lock(peers);
                    // Forgotten first: from here on no server request reaches the memory.
                    self.state().user_maps.remove(&iova);
                    // Every server is told, and the mapping is gone here whatever they answer:
                    // a server that failed to unmap (or died) cannot be made to.
                    let refused = peers
                        .iter()
                        .filter_map(|p| p.upgrade())
                        .fold(None, |first, peer| first.or(peer.dma_unmap(iova, len as u64).err()));
                    let mut state = self.state();
                    state.maps.remove(iova, len);
                    state.release_iova(iova, len);
                    return match refused {
                        Some(e) => {
                            Err(Error::new(e.errno(), format!("{}: {}", what(), e.message())))
                        }
                        None => Ok(()),
                    };
                }
            }
            state = self.state();
        }
        // Only now may the allocator hand the IOVA out again: released earlier, another thread
        // could map it while the kernel still has the old mapping (EEXIST).
        state.maps.remove(iova, len);
        state.release_iova(iova, len);
        Ok(())
    }

    /// Allocates `len` bytes (rounded up to pages) of zeroed memory and maps it for DMA.
    /// Returns its address and IOVA; [`Iommu::free`] releases both.
    pub fn alloc(&self, len: usize) -> Result<(NonNull<u8>, u64)> {
        self.alloc_flags(len, 0)
    }

    /// [`Iommu::alloc`] with `DMA_*` flags: [`DMA_READONLY`], and [`DMA_HUGE_2M`] or
    /// [`DMA_HUGE_1G`] for hugetlb-backed memory (length rounded up to the huge page, IOVA
    /// aligned to it).
    pub fn alloc_flags(&self, len: usize, flags: u32) -> Result<(NonNull<u8>, u64)> {
        if len == 0 {
            return Err(Error::invalid("DMA buffer length is zero"));
        }
        check_flags(flags)?;
        let huge_shift = match flags & (DMA_HUGE_2M | DMA_HUGE_1G) {
            0 => 0,
            DMA_HUGE_2M => 21,
            DMA_HUGE_1G => 30,
            _ => return Err(Error::invalid("DMA_HUGE_2M and DMA_HUGE_1G exclude each other")),
        };
        let page = if huge_shift == 0 { sys::page_size() } else { 1 << huge_shift };
        let len = len.checked_next_multiple_of(page).ok_or_else(|| {
            Error::invalid(format!("DMA buffer length {len:#x} overflows when rounded to pages"))
        })?;
        // A vfio-user server maps the buffer through its memfd; the kernel pins any memory.
        let (addr, backing) = match self.kind() {
            IommuKind::VfioUser => {
                mem::memfd(len, huge_shift).map(|(fd, a)| (a, Some(Arc::new(fd))))
            }
            _ => mem::anonymous(len, huge_shift).map(|a| (a, None)),
        }
        .map_err(|sys::Errno(e)| alloc_error(e, len, huge_shift))?;
        let align = dma_alignment(len).max(page as u64);
        let writable = flags & DMA_READONLY == 0;
        // SAFETY: fresh private memory that only the buffer registry (and the caller) reach.
        let mapped = unsafe { self.map_anywhere(addr.as_ptr(), len, align, writable, backing) };
        match mapped {
            Ok(iova) => {
                self.state().buffers.insert(addr.as_ptr() as usize, Buffer { iova, len });
                Ok((addr, iova))
            }
            Err(e) => {
                // SAFETY: just mapped above, never handed out.
                unsafe { mem::unmap(addr, len) };
                Err(e)
            }
        }
    }

    /// Unmaps and frees a buffer from [`Iommu::alloc`]. In guard mode its memory is poisoned
    /// (0x6b) first, so a device still reading it sees garbage rather than stale data.
    pub fn free(&self, vaddr: *mut u8) -> Result<()> {
        let mut state = self.state();
        let Some(buffer) = state.buffers.remove(&(vaddr as usize)) else {
            return Err(Error::invalid(format!("{vaddr:p} is not a DMA buffer of this context")));
        };
        let poison = state.guarded.is_some();
        drop(state);
        let addr = NonNull::new(vaddr).expect("registered buffers are non-null");
        if poison {
            // SAFETY: our buffer, which the caller gives up by freeing it.
            unsafe { std::ptr::write_bytes(addr.as_ptr(), 0x6b, buffer.len) };
        }
        let unmapped = self.unmap_mapping(buffer.iova, buffer.len);
        // SAFETY: the buffer came from alloc and is no longer registered or DMA-mapped.
        unsafe { mem::unmap(addr, buffer.len) };
        unmapped
    }

    /// The IOVA of `vaddr`, when `[vaddr, vaddr+len)` lies wholly inside one DMA mapping of this
    /// context (made by map, map_any or alloc); `len` 0 counts as 1. ENOENT otherwise.
    pub fn translate(&self, vaddr: *const u8, len: usize) -> Result<u64> {
        self.state().maps.translate(vaddr as usize, len).ok_or_else(|| {
            Error::new(
                libc::ENOENT,
                format!("[{vaddr:p}, +{len:#x}) is not inside one DMA mapping of this context"),
            )
        })
    }

    /// Turns guard mode on or off for later allocations (the `VFIOKIT_DMA_GUARD=1` environment
    /// variable turns it on for every new context): each IOVA range `alloc` and `map_any` hand
    /// out is followed by an unmapped page, so a device running past the end of a buffer is
    /// stopped by the IOMMU, and freed buffers are poisoned.
    pub fn set_dma_guard(&self, on: bool) {
        let mut state = self.state();
        match (on, state.guarded.is_some()) {
            (true, false) => state.guarded = Some(HashSet::new()),
            // Ranges handed out under guard keep their guard page until released.
            (false, true) if state.guarded.as_ref().is_some_and(HashSet::is_empty) => {
                state.guarded = None
            }
            _ => {}
        }
    }
}

/// Serves a vfio-user server's DMA request from the context's mappings: the range must lie in
/// one mapping, and a write needs a writable one. Under the state lock, so an unmap (which
/// forgets the mapping first) cannot pull the memory away during the copy.
fn serve_dma(context: &DmaContext, access: DmaAccess) -> std::result::Result<Vec<u8>, i32> {
    let state = lock(&context.state);
    let (iova, len, write) = match access {
        DmaAccess::Read { iova, len } => (iova, len, None),
        DmaAccess::Write { iova, data } => (iova, data.len(), Some(data)),
    };
    let m = state.maps.containing(iova, len as u64).ok_or(libc::EFAULT)?;
    let user = state.user_maps.get(&m.iova).ok_or(libc::EFAULT)?;
    let at = (m.vaddr + (iova - m.iova) as usize) as *mut u8;
    match write {
        None => {
            let mut out = vec![0u8; len];
            // SAFETY: [at, at+len) lies in a mapping whose memory its mapper keeps until unmap,
            // which cannot complete while we hold the state lock.
            unsafe { std::ptr::copy_nonoverlapping(at, out.as_mut_ptr(), len) };
            Ok(out)
        }
        Some(_) if !user.writable => Err(libc::EPERM),
        Some(data) => {
            // SAFETY: as above; the mapping is writable by the device, which this is.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, len) };
            Ok(Vec::new())
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave this bookkeeping half-updated in a way worse than failing.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Large buffers get 2 MiB-aligned IOVAs so the IOMMU can use huge pages for them.
fn dma_alignment(len: usize) -> u64 {
    const HUGE: usize = 2 << 20;
    if len >= HUGE { HUGE as u64 } else { sys::page_size() as u64 }
}

fn check_flags(flags: u32) -> Result<()> {
    match flags & !DMA_FLAGS {
        0 => Ok(()),
        unknown => Err(Error::invalid(format!("unknown DMA flags {unknown:#x}"))),
    }
}

/// Whether a map with `flags` is writable by the device; hugepage flags are for `alloc` only.
fn map_permission(flags: u32) -> Result<bool> {
    check_flags(flags)?;
    if flags & (DMA_HUGE_2M | DMA_HUGE_1G) != 0 {
        return Err(Error::invalid(
            "DMA_HUGE_2M/DMA_HUGE_1G apply to allocations: a map uses the memory it is given",
        ));
    }
    Ok(flags & DMA_READONLY == 0)
}

fn map_error(e: i32, len: usize, iova: u64, kind: IommuKind) -> Error {
    let mut msg = format!(
        "DMA map of {len:#x} bytes at IOVA {iova:#x}: {}",
        std::io::Error::from_raw_os_error(e)
    );
    if e == libc::EFAULT && kind.is_iommufd() {
        // iommufd pins pages; a BAR mapping (VM_PFNMAP) has none, where type1 follows its PFNs.
        msg += " (iommufd maps only ordinary process memory: not an unmapped address, and not \
                another device's BAR for peer-to-peer DMA, which needs dma-buf support that this \
                kernel's iommufd lacks; a type1 context maps BARs)";
    }
    if e == libc::ENOMEM {
        msg += &format!(
            " (RLIMIT_MEMLOCK is {} bytes; {len} more were asked: raise it with ulimit -l or grant CAP_IPC_LOCK)",
            sys::memlock_limit()
        );
    }
    Error::new(e, msg)
}

/// Why a DMA buffer's memory could not be had, with the hugetlb knob to turn where it applies.
fn alloc_error(e: i32, len: usize, huge_shift: u32) -> Error {
    let what = format!("allocating a {len:#x}-byte DMA buffer");
    if huge_shift == 0 {
        return Error::os(e, what);
    }
    let kb = 1usize << (huge_shift - 10);
    let knob = match huge_shift {
        21 => "/proc/sys/vm/nr_hugepages".to_string(),
        _ => format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB/nr_hugepages"),
    };
    let free =
        sysfs::read_u64(&format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB/free_hugepages"));
    match (e, free) {
        (libc::ENOMEM, Ok(free)) => Error::new(
            libc::ENOMEM,
            format!(
                "{what} in {kb} kB hugepages: {} are needed and {free} are free (reserve more in {knob})",
                len >> huge_shift
            ),
        ),
        (_, Err(_)) => Error::new(
            libc::ENOTSUP,
            format!("{what} in {kb} kB hugepages: this kernel has no {kb} kB hugetlb pages"),
        ),
        _ => Error::os(e, format!("{what} in {kb} kB hugepages")),
    }
}

fn check_dma_args(vaddr: *mut u8, len: usize, iova: Option<u64>) -> Result<()> {
    let page = sys::page_size();
    // The kernel's errnos: a zero length is invalid, a null address memory it cannot pin.
    if len == 0 {
        return Err(Error::invalid("DMA map of a zero length"));
    }
    if vaddr.is_null() {
        return Err(Error::new(libc::EFAULT, "DMA map of a null address"));
    }
    if vaddr as usize % page != 0 || len % page != 0 || iova.is_some_and(|i| i % page as u64 != 0) {
        return Err(Error::invalid(format!(
            "DMA map of {vaddr:p}+{len:#x}{}: address, length and IOVA must be multiples of the {page}-byte page",
            iova.map(|i| format!(" at IOVA {i:#x}")).unwrap_or_default()
        )));
    }
    Ok(())
}

/// Opens a device node read/write; `missing` says what its absence means.
fn open_node(path: &str, missing: &str) -> Result<OwnedFd> {
    sys::open_rw(path).map_err(|sys::Errno(e)| {
        let hint = match e {
            libc::ENOENT if !missing.is_empty() => format!(" ({missing})"),
            libc::EACCES | libc::EPERM => {
                " (permission: run as root or make it accessible to this user)".into()
            }
            libc::EBUSY => {
                " (already open: by another process, or by this one in another IOMMU context)"
                    .into()
            }
            _ => String::new(),
        };
        Error::os(e, format!("opening {path}{hint}"))
    })
}

fn open_container(path: &str, missing: &str) -> Result<OwnedFd> {
    let container = open_node(path, missing)?;
    let version = vfio::api_version(container.as_fd()).context(|| "VFIO_GET_API_VERSION")?;
    if version != vfio_bindings::bindings::vfio::VFIO_API_VERSION as i32 {
        return Err(Error::new(
            libc::ENOTSUP,
            format!("VFIO API version {version} is not the supported 0"),
        ));
    }
    Ok(container)
}

/// Adds a group to the container of a context of `kind`; the `first` one also sets the IOMMU
/// driver.
fn attach_group(container: &OwnedFd, group: u32, kind: IommuKind, first: bool) -> Result<OwnedFd> {
    let noiommu = kind == IommuKind::NoIommu;
    let node = host::group_node(group, noiommu);
    let fd =
        open_node(&node, "no such group node: is the device bound to vfio-pci?").map_err(|e| {
            match e.errno() {
                libc::ENOENT => wrong_group_kind(group, noiommu).unwrap_or(e),
                _ => e,
            }
        })?;
    const VIABLE: u32 = vfio_bindings::bindings::vfio::VFIO_GROUP_FLAGS_VIABLE;
    if vfio::group_flags(fd.as_fd()).context(|| format!("status of group {group}"))? & VIABLE == 0 {
        return Err(host::not_viable(group));
    }
    vfio::group_set_container(fd.as_fd(), container.as_fd())
        .context(|| format!("adding group {group} to the container"))?;
    if first && noiommu {
        vfio::set_iommu(container.as_fd(), NOIOMMU)
            .context(|| "setting the no-IOMMU driver on the container")?;
    } else if first {
        let v1 = matches!(kind, IommuKind::Type1V1 | IommuKind::IommufdCompatV1);
        let kind = if !v1 && vfio::check_extension(container.as_fd(), TYPE1V2).unwrap_or(false) {
            TYPE1V2
        } else {
            TYPE1
        };
        vfio::set_iommu(container.as_fd(), kind).map_err(|sys::Errno(e)| {
            let hint = if e == libc::EPERM {
                " (no interrupt remapping? the IOMMU must support it)"
            } else {
                ""
            };
            Error::os(e, format!("setting the type1 IOMMU on the container{hint}"))
        })?;
    }
    Ok(fd)
}

/// Where a group's node is missing, whether the group is of the other kind (behind an IOMMU or
/// not): then the error says which context its devices need.
fn wrong_group_kind(group: u32, noiommu: bool) -> Option<Error> {
    let other = host::group_node(group, !noiommu);
    sysfs::exists(Path::new(&other)).then(|| {
        Error::new(
            libc::EINVAL,
            match noiommu {
                true => format!(
                    "group {group} is behind an IOMMU ({other}): open its devices in a type1 or iommufd \
                     context; no-IOMMU contexts are for devices without one"
                ),
                false => format!(
                    "group {group} has no IOMMU ({other}, VFIO's unsafe no-IOMMU mode): open its devices \
                     in a no-IOMMU context (VFIOKIT_IOMMU=noiommu), where they can DMA anywhere in memory"
                ),
            },
        )
    })
}

fn ioas_ranges(fd: &OwnedFd, ioas: u32) -> Result<Vec<IovaRange>> {
    let ranges = iommufd::ioas_iova_ranges(fd.as_fd(), ioas)
        .context(|| format!("IOVA ranges of IOAS {ioas}"))?;
    Ok(ranges.into_iter().map(|(start, last)| IovaRange { start, last }).collect())
}

/// Gives the kernel the maps made before the container had a group (now it has one), after
/// checking them against the valid ranges it now reports, which it returns.
fn replay_early_maps(container: &OwnedFd, early: &[EarlyMap]) -> Result<Vec<IovaRange>> {
    let ranges = type1_ranges(container)?;
    for m in early {
        let last = m.iova + (m.len as u64 - 1);
        if !ranges.iter().any(|r| r.start <= m.iova && last <= r.last) {
            return Err(Error::invalid(format!(
                "the DMA map of {:#x} bytes at IOVA {:#x}, made before any device, is outside the IOVA ranges \
                 of this IOMMU: {}",
                m.len,
                m.iova,
                ranges
                    .iter()
                    .map(|r| format!("[{:#x}, {:#x}]", r.start, r.last))
                    .collect::<Vec<_>>()
                    .join(" ")
            )));
        }
    }
    for (i, m) in early.iter().enumerate() {
        // SAFETY: the caller of the map that recorded this took on its memory contract.
        let done = unsafe {
            vfio::dma_map(container.as_fd(), m.vaddr as u64, m.len as u64, m.iova, m.writable)
        };
        if let Err(sys::Errno(e)) = done {
            for undo in &early[..i] {
                let _ = vfio::dma_unmap(container.as_fd(), undo.iova, undo.len as u64, false);
            }
            return Err(map_error(e, m.len, m.iova, IommuKind::Type1));
        }
    }
    Ok(ranges)
}

/// The valid IOVA ranges from the type1 info's capability chain; without one (older kernels),
/// the whole 64-bit space.
fn type1_ranges(container: &OwnedFd) -> Result<Vec<IovaRange>> {
    let mut buf = Vec::new();
    let reply = vfio::iommu_info(container.as_fd(), &mut buf).context(|| "VFIO_IOMMU_GET_INFO")?;
    iova::decode_type1_ranges(reply)
        .map_err(|e| Error::new(libc::EPROTO, format!("type1 IOMMU info: {e}")))
}

/// Whether this process can use VFIO's no-IOMMU mode; if not, why, and the fix.
fn check_noiommu(container: &OwnedFd) -> Result<()> {
    let on = vfio::check_extension(container.as_fd(), NOIOMMU)
        .context(|| "VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)")?;
    if !on {
        return Err(match sysfs::exists(Path::new(NOIOMMU_PARAM)) {
            false => Error::new(
                libc::ENOTSUP,
                "this kernel has no VFIO no-IOMMU mode (it was built without CONFIG_VFIO_NOIOMMU)",
            ),
            true => Error::new(
                libc::ENODEV,
                format!(
                    "VFIO's no-IOMMU mode is off: boot with vfio.enable_unsafe_noiommu_mode=1, or echo 1 > \
                     {NOIOMMU_PARAM} before binding devices to vfio-pci (it taints the kernel: such devices \
                     can DMA anywhere in memory)"
                ),
            ),
        });
    }
    if !host::has_capability(CAP_SYS_RAWIO) {
        return Err(Error::new(
            libc::EPERM,
            "VFIO's no-IOMMU mode needs CAP_SYS_RAWIO (and CAP_SYS_ADMIN to read physical addresses): \
             run as root or grant them",
        ));
    }
    Ok(())
}

/// A handover refused: EPROTO, with what was wrong.
fn protocol(why: String) -> Error {
    Error::new(libc::EPROTO, format!("refusing a handed-over context: {why}"))
}
