//! The DMA context: which IOVAs a device may reach, and the memory behind them.
//!
//! One type, two kernel interfaces behind it: the legacy type1 container with its groups, and
//! iommufd (an IOAS that devices opened through their cdev attach to). The IOVA allocator,
//! DMA buffers and error messages are shared; only the ioctls differ.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::error::{Error, Result};
use crate::host::{self, PciDevice};
use crate::iova::{self, IovaRange, IovaSpace};
use crate::sys::{self, Context, iommufd, mem, sysfs, vfio};

/// Pick the best interface the kernel offers (or what `VFIOKIT_IOMMU` in the environment says).
pub const IOMMU_AUTO: u32 = 0;
/// The legacy container/group interface with the type1 (v2) IOMMU driver.
pub const IOMMU_TYPE1: u32 = 1;
/// iommufd (/dev/iommu) with devices opened through their VFIO cdev.
pub const IOMMU_IOMMUFD: u32 = 2;

/// The kernel interface a context uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuKind {
    Type1,
    Iommufd,
}

impl IommuKind {
    pub fn code(self) -> u32 {
        match self {
            IommuKind::Type1 => IOMMU_TYPE1,
            IommuKind::Iommufd => IOMMU_IOMMUFD,
        }
    }

    /// Resolves an `IOMMU_*` code; AUTO consults `VFIOKIT_IOMMU`, then the kernel.
    pub fn resolve(code: u32) -> Result<IommuKind> {
        match code {
            IOMMU_TYPE1 => Ok(IommuKind::Type1),
            IOMMU_IOMMUFD => Ok(IommuKind::Iommufd),
            IOMMU_AUTO => match std::env::var("VFIOKIT_IOMMU").as_deref() {
                Ok("type1") => Ok(IommuKind::Type1),
                Ok("iommufd") => Ok(IommuKind::Iommufd),
                Ok(other) => {
                    Err(Error::invalid(format!("VFIOKIT_IOMMU={other}: expected type1 or iommufd")))
                }
                // iommufd where the kernel has it and gives devices a cdev (6.6+).
                Err(_)
                    if sysfs::exists(Path::new(IOMMUFD))
                        && sysfs::exists(Path::new("/dev/vfio/devices")) =>
                {
                    Ok(IommuKind::Iommufd)
                }
                Err(_) => Ok(IommuKind::Type1),
            },
            other => Err(Error::invalid(format!(
                "unknown IOMMU kind {other} (expected 0 auto, 1 type1, 2 iommufd)"
            ))),
        }
    }
}

const CONTAINER: &str = "/dev/vfio/vfio";
const IOMMUFD: &str = "/dev/iommu";
const TYPE1V2: u32 = 3;
const TYPE1: u32 = 1;

enum Backend {
    Type1 { container: OwnedFd },
    Iommufd { fd: OwnedFd, ioas: u32 },
}

struct State {
    /// Groups attached to the container, kept until the context closes so that DMA mappings
    /// outlive any one device.
    groups: HashMap<u32, OwnedFd>,
    /// Valid IOVA ranges and the mappings in them; type1 knows its ranges only once a group is
    /// attached.
    space: Option<IovaSpace>,
    /// DMA buffers from `alloc`: address -> (iova, len).
    buffers: HashMap<usize, (u64, usize)>,
}

struct Inner {
    backend: Backend,
    state: Mutex<State>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (&addr, &(_, len)) in &state.buffers {
            // SAFETY: alloc mapped this range; the context is going away, so no one can free it.
            unsafe { mem::unmap(NonNull::new(addr as *mut u8).expect("non-null buffer"), len) };
        }
    }
}

/// A DMA context shared by the devices opened in it. Cloning shares it.
#[derive(Clone)]
pub struct Iommu(Arc<Inner>);

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

static DEFAULT: Mutex<Weak<Inner>> = Mutex::new(Weak::new());

impl Iommu {
    /// Opens a new context of `kind` (an `IOMMU_*` code).
    pub fn open(kind: u32) -> Result<Iommu> {
        let (backend, space) = match IommuKind::resolve(kind)? {
            IommuKind::Type1 => (Backend::Type1 { container: open_container()? }, None),
            IommuKind::Iommufd => {
                let fd = open_node(IOMMUFD, "is the kernel built with CONFIG_IOMMUFD?")?;
                let ioas = iommufd::ioas_alloc(fd.as_fd()).context(|| "allocating an IOAS")?;
                let space = IovaSpace::new(ioas_ranges(&fd, ioas)?);
                (Backend::Iommufd { fd, ioas }, Some(space))
            }
        };
        let state = State { groups: HashMap::new(), space, buffers: HashMap::new() };
        Ok(Iommu(Arc::new(Inner { backend, state: Mutex::new(state) })))
    }

    /// The process-wide context used by devices opened without one; it lives while any
    /// device (or caller) holds it, and a new one is opened after that.
    pub fn shared() -> Result<Iommu> {
        let mut slot = lock(&DEFAULT);
        if let Some(inner) = slot.upgrade() {
            return Ok(Iommu(inner));
        }
        let iommu = Iommu::open(IOMMU_AUTO)?;
        *slot = Arc::downgrade(&iommu.0);
        Ok(iommu)
    }

    pub fn kind(&self) -> IommuKind {
        match self.0.backend {
            Backend::Type1 { .. } => IommuKind::Type1,
            Backend::Iommufd { .. } => IommuKind::Iommufd,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.0.state)
    }

    /// Opens the VFIO device fd of `dev` in this context.
    pub(crate) fn open_device(&self, dev: &PciDevice) -> Result<OwnedFd> {
        match &self.0.backend {
            Backend::Type1 { container } => {
                let group = dev.iommu_group()?;
                let mut state = self.state();
                if !state.groups.contains_key(&group) {
                    let fd = attach_group(container, group, state.groups.is_empty())?;
                    if state.space.is_none() {
                        state.space = Some(IovaSpace::new(type1_ranges(container)?));
                    }
                    state.groups.insert(group, fd);
                }
                vfio::group_device_fd(state.groups[&group].as_fd(), &dev.address).context(|| {
                    format!("getting the VFIO device fd of {} from group {group}", dev.address)
                })
            }
            Backend::Iommufd { fd, ioas } => {
                let cdev = dev.cdev()?;
                let device = open_node(&cdev, "")?;
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
                let ranges = ioas_ranges(fd, *ioas)?;
                self.with_space(|space| Ok(space.set_valid(ranges)))?;
                Ok(device)
            }
        }
    }

    /// The IOVA ranges devices in this context may use.
    pub fn iova_ranges(&self) -> Result<Vec<IovaRange>> {
        self.with_space(|space| Ok(space.valid().to_vec()))
    }

    fn with_space<T>(&self, f: impl FnOnce(&mut IovaSpace) -> Result<T>) -> Result<T> {
        let mut state = self.state();
        match state.space.as_mut() {
            Some(space) => f(space),
            None => Err(Error::new(
                libc::ENODEV,
                "no device is attached yet: a type1 container has IOVA ranges and accepts DMA mappings only once \
                 a device's group is in it (open a device first)",
            )),
        }
    }

    /// Maps `len` bytes at `vaddr` for device DMA at `iova`.
    ///
    /// # Safety
    /// The memory must stay mapped until it is unmapped here (or the context closes), and must
    /// not be behind a Rust reference while a device may write it.
    pub unsafe fn map(&self, vaddr: *mut u8, len: usize, iova: u64) -> Result<()> {
        check_dma_args(vaddr, len, Some(iova))?;
        self.with_space(|space| {
            space.claim(iova, len as u64).map_err(|why| Error::invalid(format!("DMA map: {why}")))
        })?;
        // SAFETY: forwarded from the caller.
        let mapped = unsafe { self.map_raw(vaddr, len, iova) };
        if mapped.is_err() {
            self.with_space(|space| Ok(space.release(iova, len as u64)))?;
        }
        mapped
    }

    /// Maps `len` bytes at `vaddr` at an IOVA the allocator picks, and returns it.
    ///
    /// # Safety
    /// As for [`Iommu::map`].
    pub unsafe fn map_any(&self, vaddr: *mut u8, len: usize) -> Result<u64> {
        check_dma_args(vaddr, len, None)?;
        let iova = self.with_space(|space| {
            space.alloc(len as u64, dma_alignment(len)).ok_or_else(|| {
                Error::new(
                    libc::ENOSPC,
                    format!("no free IOVA range of {len:#x} bytes in {}", space.describe()),
                )
            })
        })?;
        // SAFETY: forwarded from the caller.
        match unsafe { self.map_raw(vaddr, len, iova) } {
            Ok(()) => Ok(iova),
            Err(e) => {
                self.with_space(|space| Ok(space.release(iova, len as u64)))?;
                Err(e)
            }
        }
    }

    unsafe fn map_raw(&self, vaddr: *mut u8, len: usize, iova: u64) -> Result<()> {
        let result = match &self.0.backend {
            // SAFETY: forwarded from the caller.
            Backend::Type1 { container } => unsafe {
                vfio::dma_map(container.as_fd(), vaddr as u64, len as u64, iova)
            },
            // SAFETY: forwarded from the caller.
            Backend::Iommufd { fd, ioas } => unsafe {
                iommufd::ioas_map(fd.as_fd(), *ioas, vaddr as u64, len as u64, iova)
            },
        };
        result.map_err(|sys::Errno(e)| {
            let mut msg = format!("DMA map of {len:#x} bytes at IOVA {iova:#x}: {}", std::io::Error::from_raw_os_error(e));
            if e == libc::ENOMEM {
                msg += &format!(
                    " (RLIMIT_MEMLOCK is {} bytes; {len} more were asked: raise it with ulimit -l or grant CAP_IPC_LOCK)",
                    sys::memlock_limit()
                );
            }
            Error::new(e, msg)
        })
    }

    /// Removes the DMA mapping made at `iova` with length `len`.
    pub fn unmap(&self, iova: u64, len: usize) -> Result<()> {
        self.with_space(|space| match space.is_mapped(iova, len as u64) {
            true => Ok(()),
            false => Err(Error::new(
                libc::ENOENT,
                format!("no DMA mapping of {len:#x} bytes at IOVA {iova:#x}"),
            )),
        })?;
        match &self.0.backend {
            Backend::Type1 { container } => {
                vfio::dma_unmap(container.as_fd(), iova, len as u64).map(drop)
            }
            Backend::Iommufd { fd, ioas } => {
                iommufd::ioas_unmap(fd.as_fd(), *ioas, iova, len as u64)
            }
        }
        .context(|| format!("DMA unmap of {len:#x} bytes at IOVA {iova:#x}"))?;
        // Only now may the allocator hand the IOVA out again: released earlier, another thread
        // could map it while the kernel still has the old mapping (EEXIST).
        self.with_space(|space| Ok(space.release(iova, len as u64)))?;
        Ok(())
    }

    /// Allocates `len` bytes (rounded up to pages) of zeroed memory and maps it for DMA.
    /// Returns its address and IOVA; [`Iommu::free`] releases both.
    pub fn alloc(&self, len: usize) -> Result<(NonNull<u8>, u64)> {
        if len == 0 {
            return Err(Error::invalid("DMA buffer length is zero"));
        }
        let len = len.next_multiple_of(sys::page_size());
        let addr =
            mem::anonymous(len).context(|| format!("allocating a {len:#x}-byte DMA buffer"))?;
        // SAFETY: fresh private memory that only the buffer registry (and the caller) reach.
        match unsafe { self.map_any(addr.as_ptr(), len) } {
            Ok(iova) => {
                self.state().buffers.insert(addr.as_ptr() as usize, (iova, len));
                Ok((addr, iova))
            }
            Err(e) => {
                // SAFETY: just mapped above, never handed out.
                unsafe { mem::unmap(addr, len) };
                Err(e)
            }
        }
    }

    /// Unmaps and frees a buffer from [`Iommu::alloc`].
    pub fn free(&self, vaddr: *mut u8) -> Result<()> {
        let (iova, len) = self.state().buffers.remove(&(vaddr as usize)).ok_or_else(|| {
            Error::invalid(format!("{vaddr:p} is not a DMA buffer of this context"))
        })?;
        let unmapped = self.unmap(iova, len);
        // SAFETY: the buffer came from alloc and is no longer registered or DMA-mapped.
        unsafe { mem::unmap(NonNull::new(vaddr).expect("registered buffers are non-null"), len) };
        unmapped
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

fn check_dma_args(vaddr: *mut u8, len: usize, iova: Option<u64>) -> Result<()> {
    let page = sys::page_size();
    if vaddr.is_null() || len == 0 {
        return Err(Error::invalid("DMA map needs a non-null address and a non-zero length"));
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
    sys::open(path, libc::O_RDWR).map_err(|sys::Errno(e)| {
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

fn open_container() -> Result<OwnedFd> {
    let container = open_node(CONTAINER, "is the vfio module loaded?")?;
    let version = vfio::api_version(container.as_fd()).context(|| "VFIO_GET_API_VERSION")?;
    if version != vfio_bindings::bindings::vfio::VFIO_API_VERSION as i32 {
        return Err(Error::new(
            libc::ENOTSUP,
            format!("VFIO API version {version} is not the supported 0"),
        ));
    }
    Ok(container)
}

fn attach_group(container: &OwnedFd, group: u32, first: bool) -> Result<OwnedFd> {
    let fd = open_node(
        &format!("/dev/vfio/{group}"),
        "no such group node: is the device bound to vfio-pci?",
    )?;
    const VIABLE: u32 = vfio_bindings::bindings::vfio::VFIO_GROUP_FLAGS_VIABLE;
    if vfio::group_flags(fd.as_fd()).context(|| format!("status of group {group}"))? & VIABLE == 0 {
        return Err(host::not_viable(group));
    }
    vfio::group_set_container(fd.as_fd(), container.as_fd())
        .context(|| format!("adding group {group} to the container"))?;
    if first {
        let kind = if vfio::check_extension(container.as_fd(), TYPE1V2).unwrap_or(false) {
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

fn ioas_ranges(fd: &OwnedFd, ioas: u32) -> Result<Vec<IovaRange>> {
    let ranges = iommufd::ioas_iova_ranges(fd.as_fd(), ioas)
        .context(|| format!("IOVA ranges of IOAS {ioas}"))?;
    Ok(ranges.into_iter().map(|(start, last)| IovaRange { start, last }).collect())
}

/// The valid IOVA ranges from the type1 info's capability chain; without one (older kernels),
/// the whole 64-bit space.
fn type1_ranges(container: &OwnedFd) -> Result<Vec<IovaRange>> {
    let reply = vfio::iommu_info(container.as_fd()).context(|| "VFIO_IOMMU_GET_INFO")?;
    iova::decode_type1_ranges(&reply)
        .map_err(|e| Error::new(libc::EPROTO, format!("type1 IOMMU info: {e}")))
}
