//! Interrupts: routing vectors to eventfds, masking, triggering and waiting, lock-free on
//! the paths that run per interrupt.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use once_cell::sync::OnceCell;

use super::Device;
use super::transport::{Io, IoError};
use crate::error::{Error, Result};
use crate::irq::{self, Action, Irq};
use crate::sys::{self, Context, Readable, vfio};

/// The routed vectors of one IRQ index, and what wakes the threads waiting on them.
#[derive(Default)]
pub(super) struct IrqRoute {
    /// Each vector's routing (None: not routed); empty until the index is first enabled.
    vectors: Vec<Option<Vector>>,
    /// An eventfd signalled, then replaced, when vectors of this index that threads may be
    /// waiting on are disabled or routed anew; present while any vector is routed.
    cancel: Option<Arc<OwnedFd>>,
}

/// A routed vector: the fd the kernel signals, as handed out.
pub(super) struct Vector {
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
pub(super) struct VectorSlot {
    /// [`SLOT_OWN`], [`SLOT_CALLER`] or [`SLOT_OFF`] (also after `cancel_waits`), as
    /// `IrqState::routes` says: written only under the IRQ lock.
    state: AtomicU8,
    /// The vector's own eventfd: made at its first `irq_enable`, reused (emptied first) by
    /// later ones, closed when the device drops.
    own: OnceCell<OwnedFd>,
}

/// [`VectorSlot::state`]: not routed (or waits are cancelled).
pub(super) const SLOT_OFF: u8 = 0;
/// [`VectorSlot::state`]: routed to the caller's eventfd.
pub(super) const SLOT_CALLER: u8 = 1;
/// [`VectorSlot::state`]: routed to the vector's own eventfd.
pub(super) const SLOT_OWN: u8 = 2;

impl IrqRoute {
    pub(super) fn is_enabled(&self) -> bool {
        self.vectors.iter().any(Option::is_some)
    }

    pub(super) fn vector(&self, vector: u32) -> Option<&Vector> {
        self.vectors.get(vector as usize)?.as_ref()
    }

    /// Wakes every waiter on this index; each then checks whether its vector is still routed.
    pub(super) fn wake_waiters(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            // A fresh eventfd signalled once cannot overflow, so this cannot fail.
            let _ = sys::eventfd_signal(cancel.as_fd());
        }
    }
}

pub(super) struct IrqState {
    routes: Vec<IrqRoute>,
    /// Set by [`Device::cancel_waits`]: every wait, current or later, ends with ECANCELED.
    cancelled: bool,
    /// How many routings were made, for [`Vector::routing`].
    routings: u64,
}

impl IrqState {
    pub(super) fn new(irqs: &[Irq]) -> IrqState {
        IrqState {
            routes: irqs.iter().map(|_| IrqRoute::default()).collect(),
            cancelled: false,
            routings: 0,
        }
    }
}

impl VectorSlot {
    /// A slot for each vector of each IRQ index.
    pub(super) fn table(irqs: &[Irq]) -> Box<[Box<[VectorSlot]>]> {
        irqs.iter().map(|irq| (0..irq.count).map(|_| VectorSlot::default()).collect()).collect()
    }
}

impl Device {
    pub(super) fn irq_record(&self, index: u32) -> Result<&Irq> {
        self.present()?;
        self.irqs.get(index as usize).filter(|i| i.count > 0).ok_or_else(|| {
            Error::invalid(format!("{} has no IRQ {index} ({})", self.address, irq_name(index)))
        })
    }

    pub(super) fn check_vectors(&self, index: u32, first: u32, count: u32) -> Result<&Irq> {
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

    pub(super) fn set_irqs(&self, encoded: &mut [u8], what: impl FnOnce() -> String) -> Result<()> {
        self.io.set_irqs(encoded).map_err(|e| e.within(format!("{} on {}", what(), self.address)))
    }

    pub(super) fn irq_state(&self) -> MutexGuard<'_, IrqState> {
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

    pub(super) fn check_eventfd_vectors(&self, index: u32, first: u32, count: u32) -> Result<()> {
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
    pub(super) fn route(
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

    /// Every routed vector (index, vector) with the eventfd the kernel signals for it: what a
    /// live handover gives the next process.
    pub(crate) fn routed_eventfds(&self) -> Vec<(u32, u32, RawFd)> {
        let state = self.irq_state();
        let routed = state.routes.iter().enumerate().flat_map(|(index, route)| {
            route.vectors.iter().enumerate().filter_map(move |(vector, v)| {
                v.as_ref().map(|v| (index as u32, vector as u32, v._fd.as_raw_fd()))
            })
        });
        routed.collect()
    }

    /// Routes handed-over vectors (index, vector, the eventfd the kernel already signals) as
    /// [`Device::irq_enable`] would have, asking nothing of the kernel: each eventfd becomes
    /// the vector's own, for [`Device::irq_wait`]. A vector the device lacks is EPROTO.
    pub(crate) fn adopt_routes(&self, vectors: Vec<(u32, u32, OwnedFd)>) -> Result<()> {
        let mut state = self.irq_state();
        state.routings += 1;
        let routing = state.routings;
        for (index, vector, fd) in vectors {
            let slot = self.check_eventfd_vectors(index, vector, 1).ok().and_then(|()| {
                let slot = &self.irq_slots[index as usize][vector as usize];
                slot.own.get().is_none().then_some(slot)
            });
            let Some(slot) = slot else {
                return Err(Error::new(
                    libc::EPROTO,
                    format!("{}: a handed-over IRQ {index} vector {vector} it lacks", self.address),
                ));
            };
            let dup = sys::dup(fd.as_fd()).context(|| "duplicating a handed-over eventfd")?;
            let route = &mut state.routes[index as usize];
            if route.cancel.is_none() {
                route.cancel = Some(Arc::new(sys::eventfd().context(|| "creating an eventfd")?));
            }
            route.vectors.resize_with(self.irqs[index as usize].count as usize, || None);
            route.vectors[vector as usize] = Some(Vector { _fd: dup, waitable: true, routing });
            let _ = slot.own.set(fd);
            slot.state.store(SLOT_OWN, Ordering::Release);
        }
        Ok(())
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
    pub(super) fn vector_action(&self, index: u32, vector: u32, action: Action) -> Result<()> {
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

    pub(super) fn send_action(&self, index: u32, vector: u32, action: Action) -> Result<()> {
        self.io
            .set_irqs(&mut irq::encode_set(index, vector, 1, action))
            .map_err(|e| self.action_failed(index, vector, action, e))
    }

    #[cold]
    pub(super) fn action_failed(
        &self,
        index: u32,
        vector: u32,
        action: Action,
        e: IoError,
    ) -> Error {
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
    pub(super) fn irq_slot(&self, index: u32, vector: u32) -> Option<&VectorSlot> {
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
    pub(super) fn irq_trigger_locked(&self, index: u32, vector: u32) -> Result<()> {
        self.with_route(index, vector, |_, _| Ok(()))?;
        self.send_action(index, vector, Action::Trigger)
    }

    /// Runs `f` on an enabled vector's routing and its index's cancel eventfd, under the IRQ
    /// lock (so `f` must not block).
    pub(super) fn with_route<T>(
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

    pub(super) fn cancelled(&self, index: u32, vector: u32, why: &str) -> Error {
        Error::new(
            libc::ECANCELED,
            format!("{} {} vector {vector}: wait cancelled: {why}", self.address, irq_name(index)),
        )
    }

    /// After a wake-up on the cancel eventfd: the index's new cancel eventfd when the vector
    /// still has the same routing (other vectors were re-routed), ECANCELED when it has not.
    pub(super) fn still_routed(
        &self,
        index: u32,
        vector: u32,
        routing: u64,
    ) -> Result<Arc<OwnedFd>> {
        let state = self.irq_state();
        let route = &state.routes[index as usize];
        match (route.vector(vector), &route.cancel) {
            _ if state.cancelled => {
                Err(self.cancelled(index, vector, "the device is being closed"))
            }
            // Woken by the SIGBUS guard: a mapping faulted.
            _ if self.gone() => Err(self.gone_error()),
            (Some(now), Some(cancel)) if now.routing == routing => Ok(cancel.clone()),
            _ => Err(self.cancelled(index, vector, "the IRQ was disabled or re-enabled")),
        }
    }

    /// Waits for the vector to fire and returns how many times it did since the last wait.
    /// `timeout_ms < 0` waits forever; a timeout is `ETIMEDOUT`; a wait ended by
    /// [`Device::irq_disable`], an [`Device::irq_enable`] that re-routes the vector, or
    /// [`Device::cancel_waits`] is `ECANCELED`; one ended by a mapping's fault (the device is
    /// [`gone`](Device::gone)) is `ENODEV`. Holds no lock while waiting.
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
    pub(super) fn irq_wait_locked(&self, index: u32, vector: u32, timeout_ms: i32) -> Result<u64> {
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
        let gone = self.gone_state()?;
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
            match sys::poll_readable(fd.as_fd(), [cancel.as_fd(), gone.wake_fd()], left)
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
