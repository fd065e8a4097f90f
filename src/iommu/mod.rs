//! The DMA context: which IOVAs a device may reach, and the memory behind them.
//!
//! One type, [`Iommu`], over four backends, one file each (see backend.rs for the seam): the
//! legacy type1 container with its groups (container.rs), iommufd (an IOAS that devices opened
//! through their cdev attach to), vfio-user (each map sent to every device server in the
//! context), and VFIO's no-IOMMU mode (no translation: memory is locked and its physical
//! address is the IOVA). The ledger (ledger.rs) records every mapping, with reserve, then
//! commit or abort, around the backend's request; the IOVA allocation, DMA buffers, guard mode
//! and error messages are shared.

mod backend;
mod container;
mod file;
mod handoff;
mod handover;
mod heap;
mod iommufd;
mod kind;
mod ledger;
mod noiommu;
mod pool;
mod vfio_user;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use self::backend::Backend;
use self::heap::Heap;
pub use self::heap::HeapInfo;
pub use self::kind::*;
use self::ledger::{Facts, Ledger, Owner, Record, Refused, Slot};
pub(crate) use self::noiommu::NOIOMMU_PARAM;
use crate::error::{Error, Result};
use crate::host::PciDevice;
use crate::iova::{self, IovaRange};
use crate::sys::{self, mem, sysfs};
use crate::vfio_user::{Client, DmaAccess, DmaServer};

const IOMMUFD: &str = "/dev/iommu";

/// The device may only read this memory: an IOMMU mapping without write permission.
pub const DMA_READONLY: u32 = 1 << 0;
/// `alloc` only: back the buffer with 2 MiB hugetlb pages (length rounded, IOVA aligned).
pub const DMA_HUGE_2M: u32 = 1 << 1;
/// `alloc` only: back the buffer with 1 GiB hugetlb pages (length rounded, IOVA aligned).
pub const DMA_HUGE_1G: u32 = 1 << 2;
/// `alloc` only: the buffer's memory is in a memfd of the context's (one per page size), so that
/// a live handover can give it to another process ([`Iommu::hand_over`]).
pub const DMA_SHAREABLE: u32 = 1 << 3;
const DMA_FLAGS: u32 = DMA_READONLY | DMA_HUGE_2M | DMA_HUGE_1G | DMA_SHAREABLE;

struct State {
    ledger: Ledger,
    /// The valid ranges are not known yet, or the kernel's changed (a device attached): they
    /// are found before the next reservation or query, so an open does not pay for them.
    stale: bool,
    /// Guard mode for new allocations: each is followed by an unmapped IOVA page.
    guard: bool,
    /// PCI addresses of the devices open in this context (see [`OpenDevice`]). Ordered: few
    /// entries, and a short tree walk costs an open less than hashing.
    devices: BTreeSet<String>,
    /// After a live handover (handover.rs): the mappings given away, whose memory this process
    /// still has mapped until the context closes; no DMA call may change the context then.
    handed: Option<Vec<Record>>,
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
    backend: Box<dyn Backend>,
    /// The backend's kind and whether it places memory itself (see [`Backend::place`]):
    /// asked once, not at every map, unmap and alloc. (Whether buffers are memfd-backed is
    /// not: iommufd asks the kernel at first use, which an open should not pay for.)
    kind: IommuKind,
    places: bool,
    state: Mutex<State>,
    /// Made at the first heap allocation; dropped after the backend, which unmaps its arenas.
    heap: OnceLock<Arc<Heap>>,
    /// The memory of DMA buffers where the backend can hand them over (pool.rs).
    pools: pool::Pools,
}

impl Drop for DmaContext {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for r in state.ledger.all() {
            self.backend.forget(r);
        }
        for r in state.ledger.all().chain(state.handed.iter().flatten()) {
            if r.facts.owner.mapped_by_context() {
                // SAFETY: alloc or map_file mapped this memory; the context is going away, so
                // no one can free it.
                unsafe { mem::unmap(NonNull::new(r.vaddr as *mut u8).expect("non-null"), r.len) };
            }
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

/// Where a mapping goes: at the caller's IOVA, or at one the context picks, `align`ed.
#[derive(Clone, Copy)]
enum At {
    Iova(u64),
    Any(u64),
}

impl Iommu {
    /// Opens a new context of `kind` (see [`open_auto`](Self::open_auto) for the usual choice).
    pub fn open(kind: IommuKind) -> Result<Iommu> {
        let backend: Box<dyn Backend> = match kind {
            IommuKind::Iommufd => Box::new(iommufd::Iommufd::open()?),
            IommuKind::VfioUser => Box::new(vfio_user::VfioUser::new()),
            IommuKind::NoIommu => Box::new(noiommu::NoIommu::open()?),
            IommuKind::Type1
            | IommuKind::Type1V1
            | IommuKind::IommufdCompat
            | IommuKind::IommufdCompatV1 => {
                Box::new(container::Type1::new(container::Container::open(kind)?))
            }
        };
        Ok(Iommu::with(backend, None))
    }

    /// A context over `backend` with no mapping yet; `valid` None: its ranges are found when
    /// first needed (see [`Iommu::refresh_ranges`]).
    fn with(backend: Box<dyn Backend>, valid: Option<Vec<IovaRange>>) -> Iommu {
        // Read once: an environment lookup costs a context's open more than its allocations.
        static GUARD: OnceLock<bool> = OnceLock::new();
        let guard =
            *GUARD.get_or_init(|| std::env::var_os("VFIOKIT_DMA_GUARD") == Some("1".into()));
        let mut ledger = Ledger::new(sys::page_size() as u64);
        let stale = valid.is_none();
        if let Some(valid) = valid {
            ledger.set_valid(valid);
        }
        let state = State { ledger, stale, guard, devices: BTreeSet::new(), handed: None };
        let state = Mutex::new(state);
        let (kind, places) = (backend.kind(), backend.places_physically());
        let (heap, pools) = (OnceLock::new(), pool::Pools::default());
        Iommu(Arc::new(DmaContext { backend, kind, places, state, heap, pools }))
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
        self.0.kind
    }

    /// The context's fd (the container, or /dev/iommu), for ioctls vfiokit does not wrap.
    /// Borrowed: it closes with the context. A vfio-user context has none (ENOTSUP).
    pub fn fd(&self) -> Result<BorrowedFd<'_>> {
        self.0.backend.fd()
    }

    /// The IOAS of an iommufd context (for IOMMU_IOAS_* ioctls on [`Iommu::fd`]); None for the
    /// other kinds.
    pub fn ioas_id(&self) -> Option<u32> {
        self.0.backend.ioas()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.0.state)
    }

    /// Opens the VFIO device fd of `dev` in this context, with its place there.
    pub(crate) fn open_device(
        &self,
        dev: &PciDevice,
        token: Option<&crate::sriov::VfToken>,
    ) -> Result<(OwnedFd, OpenDevice)> {
        let place = self.take_place(&dev.address)?;
        let fd = self.0.backend.open_device(dev, token)?;
        // The device's reserved regions (the MSI window...) may now be cut out of the ranges.
        self.state().stale = true;
        Ok((fd, place))
    }

    /// The device's place in this context (EBUSY if it is open here already).
    pub(crate) fn take_place(&self, address: &str) -> Result<OpenDevice> {
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

    /// What serves a vfio-user server's DMA requests from this context's mappings, for its
    /// connection.
    pub(crate) fn dma_server(&self) -> DmaServer {
        let context = Arc::downgrade(&self.0);
        Box::new(move |access| match context.upgrade() {
            Some(context) => serve_dma(&context, access),
            None => Err(libc::EFAULT),
        })
    }

    /// Makes the connected vfio-user server `client` (the device `name`) a device of this
    /// context: it is given every mapping the context has, and every later one.
    pub(crate) fn add_peer(&self, name: &str, client: &Arc<Client>) -> Result<()> {
        let maps = || self.state().ledger.live_records();
        self.0.backend.add_peer(name, client, &maps)
    }

    /// Whether the device at `address` is open in this context.
    pub(crate) fn holds(&self, address: &str) -> bool {
        self.state().devices.contains(address)
    }

    /// VFIO_DEVICE_PCI_HOT_RESET on `device`, whose reset also resets the devices of `groups`:
    /// on type1 with those groups' fds (each must be in this container), on iommufd in the
    /// zero-length form.
    pub(crate) fn hot_reset(&self, device: BorrowedFd, groups: &[u32]) -> Result<()> {
        self.0.backend.hot_reset(device, groups)
    }

    /// The IOVA ranges devices in this context may use.
    pub fn iova_ranges(&self) -> Result<Vec<IovaRange>> {
        let Some(ranges) = self.0.backend.ranges()? else {
            return Err(Error::new(
                libc::ENODEV,
                "no device is attached yet: a type1 container reports its IOVA ranges once a device's group \
                 is in it (open a device first; maps made before then are checked against them then)",
            ));
        };
        let mut state = self.state();
        state.ledger.set_valid(ranges);
        state.stale = false;
        Ok(state.ledger.valid().to_vec())
    }

    /// Finds the valid ranges when first needed, and reads the kernel's again if they changed
    /// since: an open does not pay for what it may never use. Every new mapping comes here:
    /// refused once the context was handed over.
    fn refresh_ranges(&self, state: &mut State) -> Result<()> {
        handover::check_not_handed(state)?;
        match state.stale {
            true => self.read_ranges(state),
            false => Ok(()),
        }
    }

    #[cold]
    fn read_ranges(&self, state: &mut State) -> Result<()> {
        // Unknown yet (a type1 container before its first group): every IOVA; the early maps
        // are checked against the kernel's ranges at attach.
        let ranges = self.0.backend.ranges()?.unwrap_or_else(|| vec![iova::EVERY_IOVA]);
        state.ledger.set_valid(ranges);
        state.stale = false;
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
    #[inline]
    pub unsafe fn map_flags(
        &self,
        vaddr: *mut u8,
        len: usize,
        iova: u64,
        flags: u32,
    ) -> Result<()> {
        check_dma_args(vaddr, len, Some(iova))?;
        let writable = map_permission(flags)?;
        if self.0.places {
            self.0.backend.check_fixed_iova(iova)?;
        }
        // The kernel's errnos for the same mistakes (an overlap is EEXIST to both).
        if iova.checked_add(len as u64 - 1).is_none() {
            return Err(Error::new(
                self.0.backend.wraps_errno(),
                format!("DMA map of {len:#x} bytes at IOVA {iova:#x}: the range wraps past 2^64"),
            ));
        }
        let facts = Facts { writable, ..Facts::default() };
        // SAFETY: forwarded from the caller.
        unsafe { self.map_at(vaddr, len, At::Iova(iova), facts) }.map(drop)
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
    #[inline]
    pub unsafe fn map_any_flags(&self, vaddr: *mut u8, len: usize, flags: u32) -> Result<u64> {
        check_dma_args(vaddr, len, None)?;
        let facts = Facts { writable: map_permission(flags)?, ..Facts::default() };
        // SAFETY: forwarded from the caller.
        unsafe { self.map_at(vaddr, len, At::Any(dma_alignment(len)), facts) }
    }

    /// Reserves the mapping in the ledger, has the backend take it, and commits it (or aborts
    /// it when the backend refuses). Returns its IOVA.
    ///
    /// # Safety
    /// As for [`Iommu::map`].
    unsafe fn map_at(&self, vaddr: *mut u8, len: usize, at: At, facts: Facts) -> Result<u64> {
        let backend = &self.0.backend;
        let at = match at {
            At::Any(align) => At::Any(align.max(backend.iova_align())),
            fixed => fixed,
        };
        // Where the backend places memory itself (no IOMMU), it does so first: at the memory's
        // physical address, which the ledger then holds.
        let placed = match at {
            At::Any(_) if self.0.places => backend.place(vaddr, len, facts.writable).transpose()?,
            _ => None,
        };
        let reserved = {
            let mut state = self.state();
            self.refresh_ranges(&mut state).and_then(|()| {
                let guard = state.guard;
                reserve(
                    &mut state.ledger,
                    vaddr as usize,
                    len,
                    placed.map_or(at, At::Iova),
                    guard,
                    &facts,
                )
            })
        };
        let (slot, record) = match reserved {
            Ok((slot, iova)) => (slot, Record::new(vaddr as usize, len, iova, facts)),
            Err(e) => {
                if let Some(phys) = placed {
                    backend.forget(&Record::new(vaddr as usize, len, phys, facts));
                }
                return Err(e);
            }
        };
        let commit = || {
            self.state().ledger.commit(slot);
            Ok(())
        };
        // SAFETY: forwarded from the caller.
        match unsafe { backend.map(&record, &commit) } {
            Ok(()) => Ok(record.iova),
            Err(e) => {
                self.state().ledger.remove(slot);
                Err(e)
            }
        }
    }

    /// Removes every DMA mapping lying wholly in `[iova, iova+len)`, as the kernel's unmap
    /// does, and returns how many bytes that unmapped. Refused, with nothing unmapped, where
    /// the range cuts through a mapping, holds none (type1 itself would answer 0 bytes), or
    /// holds a DMA buffer's mapping ([`Iommu::free`] unmaps and frees a buffer). The errnos are
    /// the kernel's for the same range on this kind.
    pub fn unmap(&self, iova: u64, len: usize) -> Result<u64> {
        let kind = self.kind();
        let refuse = |errno, why: String| Err(unmap_refused(errno, iova, len, why));
        let page = sys::page_size() as u64;
        let Some(last) = iova.checked_add((len as u64).wrapping_sub(1)).filter(|_| len > 0) else {
            return match len {
                0 => refuse(libc::EINVAL, "the length is zero".into()),
                _ => refuse(self.0.backend.wraps_errno(), "the range wraps past 2^64".into()),
            };
        };
        // iommufd takes any byte range and answers from the mappings in it; type1 wants pages.
        if !kind.is_iommufd() && (iova | len as u64) & (page - 1) != 0 {
            return refuse(
                libc::EINVAL,
                format!("IOVA and length must be multiples of the {page}-byte page"),
            );
        }
        // The usual range is exactly one mapping: found by its IOVA, no range walked.
        let exact = self
            .state()
            .ledger
            .live_at(iova, len)
            .filter(|(_, m)| m.facts.owner == Owner::Caller)
            .map(|(slot, m)| (slot, m.clone()));
        if let Some((slot, m)) = exact {
            return self.unmap_record(slot, &m).map(|()| len as u64);
        }
        let (first, more) = {
            let state = self.state();
            let (mut first, mut more) = (None, Vec::new());
            for (slot, m) in state.ledger.overlapping(iova, last) {
                if m.iova < iova || m.iova + (m.len as u64 - 1) > last {
                    return refuse(
                        if kind.is_iommufd() { libc::ENOENT } else { libc::EINVAL },
                        format!(
                            "the range cuts through the mapping of {:#x} bytes at IOVA {:#x} (mappings are removed whole)",
                            m.len, m.iova
                        ),
                    );
                }
                match m.facts.owner {
                    Owner::Caller => {}
                    Owner::Buffer | Owner::File => {
                        return refuse(
                            libc::EBUSY,
                            format!(
                                "IOVA {:#x} is the mapping of a DMA buffer from alloc or map_file: free the buffer instead",
                                m.iova
                            ),
                        );
                    }
                    Owner::Heap => {
                        return refuse(
                            libc::EBUSY,
                            format!(
                                "IOVA {:#x} is an arena of the DMA heap, mapped until the context closes: free its \
                                 objects with heap_free",
                                m.iova
                            ),
                        );
                    }
                }
                match first {
                    None => first = Some((slot, m.clone())),
                    Some(_) => more.push((slot, m.clone())),
                }
            }
            (first, more)
        };
        let Some(first) = first else {
            return refuse(libc::ENOENT, "no DMA mapping lies in the range".into());
        };
        self.unmap_each(std::iter::once(first).chain(more))
    }

    /// Removes every DMA mapping made by [`Iommu::map`] and [`Iommu::map_any`] (DMA buffers
    /// stay mapped until freed) and returns how many bytes that unmapped.
    pub fn unmap_all(&self) -> Result<u64> {
        let maps: Vec<(Slot, Record)> = {
            let state = self.state();
            let caller = state.ledger.live().filter(|(_, m)| m.facts.owner == Owner::Caller);
            caller.map(|(slot, m)| (slot, m.clone())).collect()
        };
        self.unmap_each(maps)
    }

    fn unmap_each(&self, maps: impl IntoIterator<Item = (Slot, Record)>) -> Result<u64> {
        maps.into_iter().try_fold(0, |done, (slot, m)| {
            let len = m.len as u64;
            self.unmap_record(slot, &m).map(|()| done + len)
        })
    }

    /// Has the backend let go of the Live mapping `record` (in `slot`), then frees its IOVAs:
    /// only now may the allocator hand them out again (released earlier, another thread could
    /// map them while the backend still has the old mapping: EEXIST).
    fn unmap_record(&self, slot: Slot, record: &Record) -> Result<()> {
        let (iova, len) = (record.iova, record.len);
        // Where the backend is done with the mapping once it retires it, its IOVAs are freed
        // in the same step.
        let done = self.0.backend.done_at_retire();
        let retired = Cell::new(false);
        let retire = || {
            let mut state = self.state();
            if !state.ledger.retire(slot, iova, len) {
                return Err(unmapped_already(iova, len));
            }
            if done {
                state.ledger.remove(slot);
            }
            retired.set(true);
            Ok(())
        };
        // Not under the lock: the kernel's unmap can be slow, and other DMA calls go on.
        let unmapped = self.0.backend.unmap(record, &retire);
        if retired.get() && !done {
            self.state().ledger.remove(slot);
        }
        unmapped
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
        // A power of two.
        let Some(len) = len.checked_add(page - 1).map(|l| l & !(page - 1)) else {
            return Err(rounding_overflows(len));
        };
        // Shareable memory is in the context's pools, for a live handover; a backend that
        // maps buffers by their file (iommufd with MAP_FILE, a vfio-user server) is given it;
        // otherwise the kernel pins any memory.
        let by_fd = self.0.backend.buffers_by_fd();
        let (addr, fd, offset) = match (by_fd, flags & DMA_SHAREABLE != 0) {
            (_, true) => {
                self.0.pools.alloc(len, huge_shift).map(|(a, fd, at)| (a, by_fd.then_some(fd), at))
            }
            (true, false) => mem::memfd(len, huge_shift).map(|(fd, a)| (a, Some(Arc::new(fd)), 0)),
            (false, false) => mem::anonymous(len, huge_shift).map(|a| (a, None, 0)),
        }
        .map_err(|sys::Errno(e)| alloc_error(e, len, huge_shift))?;
        let align = dma_alignment(len).max(page as u64);
        let facts = Facts { writable: flags & DMA_READONLY == 0, owner: Owner::Buffer, fd, offset };
        // SAFETY: fresh private memory that only the ledger (and the caller) reach.
        match unsafe { self.map_at(addr.as_ptr(), len, At::Any(align), facts) } {
            Ok(iova) => Ok((addr, iova)),
            Err(e) => {
                // SAFETY: just mapped above, never handed out.
                unsafe { self.0.pools.free(addr, len) };
                Err(e)
            }
        }
    }

    /// Unmaps and frees a buffer from [`Iommu::alloc`] or [`Iommu::map_file`]. In guard mode an
    /// allocated buffer is poisoned (0x6b) first, so a device still reading it sees garbage
    /// rather than stale data.
    pub fn free(&self, vaddr: *mut u8) -> Result<()> {
        let (buffer, poison) = {
            let state = self.state();
            handover::check_not_handed(&state)?;
            let buffer = state.ledger.buffer_at(vaddr as usize).map(|(slot, r)| (slot, r.clone()));
            (buffer, state.guard)
        };
        let Some((slot, buffer)) = buffer else { return Err(not_a_buffer(vaddr)) };
        let addr = NonNull::new(vaddr).expect("buffers are non-null");
        // A file's pages are the caller's data: only alloc's are poisoned.
        if (poison || buffer.guard) && buffer.facts.owner == Owner::Buffer {
            // SAFETY: our buffer, which the caller gives up by freeing it.
            unsafe { std::ptr::write_bytes(addr.as_ptr(), 0x6b, buffer.len) };
        }
        self.unmap_record(slot, &buffer)?;
        // SAFETY: the buffer came from alloc and is no longer recorded or DMA-mapped.
        unsafe { self.0.pools.free(addr, buffer.len) };
        Ok(())
    }

    /// The IOVA of `vaddr`, when `[vaddr, vaddr+len)` lies wholly inside one DMA mapping of this
    /// context (made by map, map_any or alloc); `len` 0 counts as 1. ENOENT otherwise.
    pub fn translate(&self, vaddr: *const u8, len: usize) -> Result<u64> {
        self.state().ledger.translate(vaddr as usize, len).ok_or_else(|| {
            Error::new(
                libc::ENOENT,
                format!("[{vaddr:p}, +{len:#x}) is not inside one DMA mapping of this context"),
            )
        })
    }

    /// Turns guard mode on or off for later allocations (the `VFIOKIT_DMA_GUARD=1` environment
    /// variable turns it on for every new context): each IOVA range `alloc` and `map_any` hand
    /// out is followed by an unmapped page, so a device running past the end of a buffer is
    /// stopped by the IOMMU, and freed buffers are poisoned. Ranges handed out under guard
    /// keep their guard page until released.
    pub fn set_dma_guard(&self, on: bool) {
        self.state().guard = on;
        if let Some(heap) = self.0.heap.get() {
            heap.poison.store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The address behind `[iova, iova+len)` when it lies wholly inside one DMA mapping of this
    /// context (`len` 0 counts as 1), as a completion entry gives it back; ENOENT otherwise.
    /// O(log n) in the mappings.
    pub fn dma_to_vaddr(&self, iova: u64, len: usize) -> Result<NonNull<u8>> {
        let state = self.state();
        let m = state.ledger.containing(iova, len as u64).ok_or_else(|| {
            Error::new(
                libc::ENOENT,
                format!(
                    "IOVA [{iova:#x}, +{len:#x}) is not inside one DMA mapping of this context"
                ),
            )
        })?;
        let vaddr = m.vaddr + (iova - m.iova) as usize;
        Ok(NonNull::new(vaddr as *mut u8).expect("mappings are not at 0"))
    }

    fn heap(&self) -> Result<&Arc<Heap>> {
        match self.0.heap.get() {
            Some(heap) => Ok(heap),
            None => self.new_heap(),
        }
    }

    /// Makes the heap, at its first allocation.
    #[cold]
    fn new_heap(&self) -> Result<&Arc<Heap>> {
        let heap = Arc::new(Heap::new(self.state().guard)?);
        Ok(self.0.heap.get_or_init(|| heap))
    }

    /// A zeroed object of `size` bytes (1 byte to 2 MiB) aligned to `align` (a power of two up
    /// to 2 MiB) from the context's DMA heap, and its IOVA: for the small objects a driver
    /// allocates by the thousand. See heap.rs for the arenas, classes and thread caches.
    #[inline]
    pub fn heap_alloc(&self, size: usize, align: usize) -> Result<(NonNull<u8>, u64)> {
        self.heap()?.alloc(self, size, align)
    }

    /// Frees an object from [`heap_alloc`](Self::heap_alloc). In guard mode its memory is
    /// poisoned (0x6b) first.
    #[inline]
    pub fn heap_free(&self, vaddr: *mut u8) -> Result<()> {
        match self.0.heap.get() {
            Some(heap) => heap.free(vaddr),
            None => Err(Error::invalid(format!(
                "{vaddr:p} is not an object of this context's DMA heap"
            ))),
        }
    }

    /// What the context's DMA heap holds (all zeros before its first allocation).
    pub fn heap_info(&self) -> HeapInfo {
        self.0.heap.get().map(|heap| heap.info()).unwrap_or_default()
    }

    /// Unmaps the mappings of memory the context owns in `[vaddr, vaddr+len)` (a heap arena
    /// whose pages were mapped one by one, when one of them failed).
    fn unmap_owned_range(&self, vaddr: usize, len: usize) {
        let maps: Vec<(Slot, Record)> = {
            let state = self.state();
            let owned = state.ledger.live().filter(|(_, m)| {
                m.facts.owner != Owner::Caller && m.vaddr >= vaddr && m.vaddr < vaddr + len
            });
            owned.map(|(slot, m)| (slot, m.clone())).collect()
        };
        for (slot, m) in maps {
            let _ = self.unmap_record(slot, &m);
        }
    }
}

#[cold]
fn not_a_buffer(vaddr: *mut u8) -> Error {
    Error::invalid(format!("{vaddr:p} is not a DMA buffer of this context"))
}

#[cold]
fn unmap_refused(errno: i32, iova: u64, len: usize, why: String) -> Error {
    Error::new(errno, format!("DMA unmap of {len:#x} bytes at IOVA {iova:#x}: {why}"))
}

/// An unmap of a mapping that another unmap took first.
#[cold]
fn unmapped_already(iova: u64, len: usize) -> Error {
    Error::new(libc::ENOENT, format!("no DMA mapping of {len:#x} bytes at IOVA {iova:#x}"))
}

/// Reserves a mapping of `len` bytes at `vaddr` in the ledger, at `at`; the errnos are the
/// kernel's for the same refusals.
fn reserve(
    ledger: &mut Ledger,
    vaddr: usize,
    len: usize,
    at: At,
    guard: bool,
    facts: &Facts,
) -> Result<(Slot, u64)> {
    match at {
        At::Iova(iova) => match ledger.reserve_at(vaddr, len, iova, facts.clone()) {
            Ok(slot) => Ok((slot, iova)),
            Err(refused) => Err(refusal(refused)),
        },
        At::Any(align) => match ledger.reserve_any(vaddr, len, align, guard, facts.clone()) {
            Some(slot) => Ok((slot, ledger.get(slot).iova)),
            None => Err(no_space(ledger, len)),
        },
    }
}

/// A reservation at a chosen IOVA refused, with the kernel's errno for it.
#[cold]
fn refusal(refused: Refused) -> Error {
    match refused {
        Refused::Overlaps(why) => Error::new(libc::EEXIST, format!("DMA map: {why}")),
        Refused::Invalid(why) => Error::new(libc::EINVAL, format!("DMA map: {why}")),
    }
}

#[cold]
fn no_space(ledger: &Ledger, len: usize) -> Error {
    Error::new(
        libc::ENOSPC,
        format!("no free IOVA range of {len:#x} bytes in {}", ledger.describe()),
    )
}

/// Serves a vfio-user server's DMA request from the context's mappings: the range must lie in
/// one Live mapping, and a write needs a writable one. Under the state lock, so an unmap (which
/// retires the mapping first) cannot pull the memory away during the copy.
fn serve_dma(context: &DmaContext, access: DmaAccess) -> std::result::Result<Vec<u8>, i32> {
    let state = lock(&context.state);
    let (iova, len, write) = match access {
        DmaAccess::Read { iova, len } => (iova, len, None),
        DmaAccess::Write { iova, data } => (iova, data.len(), Some(data)),
    };
    let m = state.ledger.containing(iova, len as u64).ok_or(libc::EFAULT)?;
    let at = (m.vaddr + (iova - m.iova) as usize) as *mut u8;
    match write {
        None => {
            let mut out = vec![0u8; len];
            // SAFETY: [at, at+len) lies in a mapping whose memory its mapper keeps until unmap,
            // which cannot complete while we hold the state lock.
            unsafe { std::ptr::copy_nonoverlapping(at, out.as_mut_ptr(), len) };
            Ok(out)
        }
        Some(_) if !m.facts.writable => Err(libc::EPERM),
        Some(data) => {
            // SAFETY: as above; the mapping is writable by the device, which this is.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, len) };
            Ok(Vec::new())
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
        unknown => Err(unknown_flags(unknown)),
    }
}

#[cold]
fn unknown_flags(unknown: u32) -> Error {
    Error::invalid(format!("unknown DMA flags {unknown:#x}"))
}

/// Whether a map with `flags` is writable by the device; hugepage flags are for `alloc` only.
fn map_permission(flags: u32) -> Result<bool> {
    check_flags(flags)?;
    if flags & (DMA_HUGE_2M | DMA_HUGE_1G | DMA_SHAREABLE) != 0 {
        return Err(huge_map());
    }
    Ok(flags & DMA_READONLY == 0)
}

#[cold]
fn huge_map() -> Error {
    Error::invalid(
        "DMA_HUGE_2M/DMA_HUGE_1G/DMA_SHAREABLE apply to allocations: a map uses the memory it is given",
    )
}

/// Why a DMA buffer's memory could not be had, with the hugetlb knob to turn where it applies.
#[cold]
fn rounding_overflows(len: usize) -> Error {
    Error::invalid(format!("DMA buffer length {len:#x} overflows when rounded to pages"))
}

#[cold]
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
    // A power of two.
    let page = sys::page_size() as u64;
    let aligned = (vaddr as u64 | len as u64 | iova.unwrap_or(0)) & (page - 1) == 0;
    match len != 0 && !vaddr.is_null() && aligned {
        true => Ok(()),
        false => Err(dma_args_error(vaddr, len, iova)),
    }
}

/// Why [`check_dma_args`] refused its arguments.
#[cold]
fn dma_args_error(vaddr: *mut u8, len: usize, iova: Option<u64>) -> Error {
    let page = sys::page_size();
    // The kernel's errnos: a zero length is invalid, a null address memory it cannot pin.
    if len == 0 {
        return Error::invalid("DMA map of a zero length");
    }
    if vaddr.is_null() {
        return Error::new(libc::EFAULT, "DMA map of a null address");
    }
    Error::invalid(format!(
        "DMA map of {vaddr:p}+{len:#x}{}: address, length and IOVA must be multiples of the {page}-byte page",
        iova.map(|i| format!(" at IOVA {i:#x}")).unwrap_or_default()
    ))
}
