//! The one handle scheme behind every C handle kind (`vfiokit_iommu`, `vfiokit_device`).
//!
//! As rustls-ffi's `Castable` ties each opaque C type to its Rust type, [`Handle`] ties a C
//! handle type to the value its handles carry, so every cast, check and release is written
//! once, here. A handle is a pointer to a [`Slot`]: capi-owned memory holding the kind's magic
//! word, a state word and the value. Slots are type-stable: never returned to the allocator,
//! reused only for later handles of the same kind (as fd numbers are reused). So a pointer to a
//! closed handle always reads "closed" (`EBADF`) instead of freed memory, and a double close is
//! refused by the slot itself.
//!
//! A handle has an owner (whoever got it from `_open`, until `_close`) and may have holds:
//! references other handles keep on it, as a device keeps the context it was opened in. It is
//! open while either remains; then it closes: calls that start later are refused with `EBADF`,
//! calls in flight keep the value until they return, and the last of them drops it. Which
//! kind does what at close (end IRQ waits, wait for the calls in flight) is its [`Handle`]
//! impl's say.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::boundary::{call_or, null};
use crate::error::{Error, Result};

/// A C handle type: an opaque `vfiokit_*` struct whose pointers are [`Slot`]s of this kind.
pub(super) trait Handle: Sized + 'static {
    /// What a handle of this kind carries.
    type Value: Send + Sync + 'static;
    /// The first word of every slot of this kind: a pointer whose memory says otherwise is
    /// refused (a best-effort check for foreign pointers and handles of another kind).
    const MAGIC: u64;
    /// The parameter name in messages ("dev", "iommu").
    const NAME: &'static str;
    /// The C type's name, for messages ("vfiokit_device").
    const TYPE: &'static str;
    /// Whether the owner's close, when it closes the handle, waits for the calls in flight on
    /// it to return, so that the value is gone (its fds closed) when `_close` returns. If not,
    /// the last of them drops it. A close through the release of the last hold never waits
    /// (a hold may be released inside a call on the handle).
    const CLOSE_WAITS: bool;

    /// Run on the value by the thread that closes a handle, before it waits for the calls in
    /// flight: ends whatever would keep them from returning promptly.
    fn closing(_value: &Self::Value) {}

    /// This kind's slots whose value is gone, for reuse by later handles.
    fn free_slots() -> &'static FreeSlots<Self>;

    /// A new handle carrying `value`, for C: its owner's to close.
    fn into_c(value: Self::Value) -> *mut Self {
        Slot::fill(value, OWNED).as_c()
    }

    /// A new handle carrying `value` that no one owns: open while it is held, starting with
    /// the hold returned (handles the library makes, e.g. a context for a device opened
    /// without one).
    fn held(value: Self::Value) -> Hold<Self> {
        Hold(Slot::fill(value, HOLD))
    }

    /// Starts a call on the handle `p`: its value, kept until the returned [`Call`] drops.
    /// NULL is `EINVAL`; a closed handle, or a pointer that is not one of this kind, `EBADF`.
    ///
    /// # Safety
    /// `p` must be NULL, or a pointer this kind handed out (open or closed), or point to
    /// readable memory at least as large as a slot.
    unsafe fn enter(p: *const Self) -> Result<Call<Self>> {
        // SAFETY: forwarded from the caller.
        unsafe { Slot::from_c(p) }?.enter()
    }

    /// The body of every `_close`: NULL does nothing; a pointer that is not an open handle of
    /// this kind, or whose owner closed it already, is refused with `EBADF` and a message,
    /// touching nothing but the slot's words. Otherwise the owner's reference goes, and if no
    /// hold remains the handle closes: [`Handle::closing`] runs, the calls in flight are waited
    /// for ([`Handle::CLOSE_WAITS`]), and the value is dropped as the last call leaves.
    ///
    /// # Safety
    /// As for [`Handle::enter`].
    unsafe fn close(p: *mut Self) {
        call_or(
            |_| (),
            || {
                if p.is_null() {
                    return Ok(());
                }
                let not_open = || {
                    Error::new(
                        libc::EBADF,
                        format!(
                            "{} {p:p} is not open: closed already, or not from {}_open",
                            Self::TYPE,
                            Self::TYPE
                        ),
                    )
                };
                // SAFETY: forwarded from the caller.
                let call = unsafe { Slot::from_c(p) }?.enter().map_err(|_| not_open())?;
                if call.release(OWNED).ok_or_else(not_open)? {
                    call.end(Self::CLOSE_WAITS);
                }
                Ok(())
            },
        )
    }
}

/// A kind's free slots (see [`Handle::free_slots`]).
pub(super) type FreeSlots<H> = Mutex<Vec<&'static Slot<H>>>;

/// What a handle points to. Written only before it is handed out and by the one thread that
/// drops its value; see the module's comment.
#[repr(C)]
pub(super) struct Slot<H: Handle> {
    /// [`Handle::MAGIC`], for the slot's whole life.
    magic: u64,
    /// [`OWNED`], [`CLOSED`] and [`DROPPED`], the number of holds and of calls in flight.
    state: AtomicU64,
    /// Present while the slot is not [`DROPPED`]. Read by calls in flight and by holders;
    /// written only while no one can read it: by [`Slot::fill`] on a dropped slot, and by the
    /// one thread that wins the CLOSED -> DROPPED transition.
    value: UnsafeCell<Option<H::Value>>,
}

// SAFETY: `value` is read only through a `Call` or a `Hold`, which exist only while the slot
// is not DROPPED, and written only while it is (see the field); the value is Send + Sync.
unsafe impl<H: Handle> Sync for Slot<H> {}

/// The owner's reference (the pointer `_open` returned) has not been released.
const OWNED: u64 = 1 << 63;
/// No owner and no hold left: new calls are refused.
const CLOSED: u64 = 1 << 62;
/// The value is gone; the slot is free (or about to be). Always with CLOSED.
const DROPPED: u64 = 1 << 61;
/// One hold, counted in the bits [`HOLDS`].
const HOLD: u64 = 1 << 32;
/// The bits counting calls in flight (and the short-lived counts of releases and late calls).
const CALLS: u64 = HOLD - 1;
/// The bits counting holds.
const HOLDS: u64 = (DROPPED - 1) & !CALLS;

/// Locks a mutex, whether or not a panicking thread held it.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<H: Handle> Slot<H> {
    /// A slot carrying `value`, in state `initial` ([`OWNED`] or one [`HOLD`]): a free one of
    /// this kind, or a new one.
    fn fill(value: H::Value, initial: u64) -> &'static Slot<H> {
        let free = lock(H::free_slots()).pop();
        let slot = free.unwrap_or_else(|| {
            Box::leak(Box::new(Slot {
                magic: H::MAGIC,
                state: AtomicU64::new(CLOSED | DROPPED),
                value: UnsafeCell::new(None),
            }))
        });
        // SAFETY: the slot is DROPPED and on no list, so no one else writes it; the calls that
        // still arrive on it (through stale pointers) see CLOSED and leave without reading it.
        unsafe { *slot.value.get() = Some(value) };
        // Keeps the counts of those late calls, which undo their own.
        let _ = slot
            .state
            .fetch_update(Ordering::Release, Ordering::Relaxed, |s| Some((s & CALLS) | initial));
        slot
    }

    /// The slot behind a pointer C passed, checked to be of this kind.
    ///
    /// # Safety
    /// As for [`Handle::enter`].
    unsafe fn from_c(p: *const H) -> Result<&'static Slot<H>> {
        if p.is_null() {
            return Err(null(H::NAME));
        }
        let foreign = || Error::new(libc::EBADF, format!("{} {p:p} is not a {}", H::NAME, H::TYPE));
        if !p.cast::<Slot<H>>().is_aligned() {
            return Err(foreign());
        }
        // SAFETY: upheld by the caller: readable, and aligned as checked. Only the magic word
        // (the first, repr(C)) is read before it is known to be a slot of this kind.
        if unsafe { (*p.cast::<Slot<H>>()).magic } != H::MAGIC {
            return Err(foreign());
        }
        // SAFETY: a slot of this kind; slots are leaked, so every one is 'static.
        Ok(unsafe { &*p.cast::<Slot<H>>() })
    }

    /// The pointer C holds for this slot.
    fn as_c(&'static self) -> *mut H {
        (self as *const Slot<H>).cast_mut().cast()
    }

    /// Starts a call: the value, kept until the returned guard drops.
    fn enter(&'static self) -> Result<Call<H>> {
        let state = self.state.fetch_add(1, Ordering::Acquire);
        let call = Call(self);
        if state & CLOSED != 0 {
            return Err(Error::new(
                libc::EBADF,
                format!("{} {self:p} is not open (closed already?)", H::NAME),
            ));
        }
        Ok(call)
    }

    /// Whether the handle is open (it may close at any time after).
    pub(super) fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED == 0
    }

    /// A hold on this handle, which keeps it open until dropped; `EBADF` once it is closed.
    pub(super) fn hold(&'static self) -> Result<Hold<H>> {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & CLOSED == 0).then_some(s + HOLD)
            })
            .map(|_| Hold(self))
            .map_err(|_| Error::new(libc::EBADF, format!("{} {self:p} is being closed", H::NAME)))
    }

    /// Ends a call: the last one out of a closed slot drops the value and frees the slot.
    fn leave(&'static self) {
        if self.state.fetch_sub(1, Ordering::AcqRel) != CLOSED | 1
            || self
                .state
                .compare_exchange(CLOSED, CLOSED | DROPPED, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // SAFETY: we won CLOSED -> DROPPED with no call in flight and no hold.
        unsafe { self.drop_value() };
    }

    /// Drops the value and frees the slot.
    ///
    /// # Safety
    /// Only by the thread that won the CLOSED -> DROPPED transition with no call in flight
    /// (later calls see CLOSED and do not read the value).
    unsafe fn drop_value(&'static self) {
        // SAFETY: upheld by the caller.
        drop(unsafe { (*self.value.get()).take() });
        lock(H::free_slots()).push(self);
    }
}

/// A call in flight on a handle: derefs to its value, which stays until this drops.
pub(super) struct Call<H: Handle>(&'static Slot<H>);

impl<H: Handle> Call<H> {
    /// A hold on the handle this call is on (see [`Slot::hold`]).
    pub(super) fn hold(&self) -> Result<Hold<H>> {
        self.0.hold()
    }

    /// Releases `what` ([`OWNED`] or one [`HOLD`]) of the handle's references: Some(true) if it
    /// was the last (the handle is CLOSED now), None if the handle had no such reference.
    fn release(&self, what: u64) -> Option<bool> {
        let had = if what == OWNED { OWNED } else { HOLDS };
        let mut last = false;
        self.0
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                if s & had == 0 {
                    return None;
                }
                let s = s - what;
                last = s & (OWNED | HOLDS) == 0;
                Some(if last { s | CLOSED } else { s })
            })
            .ok()
            .map(|_| last)
    }

    /// Run by the call whose release closed the handle: [`Handle::closing`], then, if `wait`,
    /// waits for the other calls in flight to return and drops the value itself, so that it
    /// is gone when this returns (calls refused meanwhile count themselves for a moment only,
    /// so one leaving last does not get to drop it later). Without `wait` the last call to
    /// leave drops it.
    fn end(self, wait: bool) {
        H::closing(&self);
        if !wait {
            return;
        }
        let slot = self.0;
        // This call's own count goes with the exchange.
        while slot
            .state
            .compare_exchange_weak(
                CLOSED | 1,
                CLOSED | DROPPED,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
        {
            std::thread::yield_now();
        }
        std::mem::forget(self);
        // SAFETY: we won CLOSED -> DROPPED with no other call in flight and no hold.
        unsafe { slot.drop_value() };
    }
}

impl<H: Handle> std::ops::Deref for Call<H> {
    type Target = H::Value;
    fn deref(&self) -> &H::Value {
        // SAFETY: while a call is in flight on a slot it entered open, the value is present
        // and not written.
        unsafe { (*self.0.value.get()).as_ref() }.expect("an open slot holds its value")
    }
}

impl<H: Handle> Drop for Call<H> {
    fn drop(&mut self) {
        self.0.leave()
    }
}

/// A reference that keeps a handle open after its owner closed it, as a device keeps the
/// context it was opened in: counted in the slot, released when dropped (which closes the
/// handle if it was the last reference).
pub(super) struct Hold<H: Handle>(&'static Slot<H>);

impl<H: Handle> Hold<H> {
    /// The held handle's pointer, for C to borrow.
    pub(super) fn as_c(&self) -> *mut H {
        self.0.as_c()
    }

    /// The held handle's slot.
    pub(super) fn slot(&self) -> &'static Slot<H> {
        self.0
    }
}

impl<H: Handle> std::ops::Deref for Hold<H> {
    type Target = H::Value;
    fn deref(&self) -> &H::Value {
        // SAFETY: a held slot is not CLOSED, so not DROPPED: its value is present and not
        // written.
        unsafe { (*self.0.value.get()).as_ref() }.expect("a held slot holds its value")
    }
}

impl<H: Handle> Drop for Hold<H> {
    fn drop(&mut self) {
        // A count of its own, so that the value stays until this release is done, and is
        // dropped as it leaves if it closes the handle with no call in flight.
        self.0.state.fetch_add(1, Ordering::Acquire);
        let call = Call(self.0);
        if call.release(HOLD) == Some(true) {
            call.end(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// A kind for these tests: its value counts its drops and the `closing` calls on it.
    struct Thing {
        _private: [u8; 0],
    }

    struct Value {
        drops: Arc<AtomicUsize>,
        closings: Arc<AtomicUsize>,
    }

    impl Drop for Value {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Handle for Thing {
        type Value = Value;
        const MAGIC: u64 = u64::from_be_bytes(*b"vfkTEST_");
        const NAME: &'static str = "thing";
        const TYPE: &'static str = "vfiokit_thing";
        const CLOSE_WAITS: bool = true;
        fn closing(value: &Value) {
            value.closings.fetch_add(1, Ordering::SeqCst);
        }
        fn free_slots() -> &'static FreeSlots<Self> {
            static FREE: FreeSlots<Thing> = Mutex::new(Vec::new());
            &FREE
        }
    }

    /// One test at a time: they share the kind's free slots, and a test's stale pointer may
    /// reach another's handle in a reused slot (as a C caller's would).
    fn serial() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        lock(&SERIAL)
    }

    fn value() -> (Value, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (drops, closings) = (Arc::default(), Arc::default());
        (Value { drops: Arc::clone(&drops), closings: Arc::clone(&closings) }, drops, closings)
    }

    fn count(n: &AtomicUsize) -> usize {
        n.load(Ordering::SeqCst)
    }

    fn errno_of<T>(r: Result<T>) -> i32 {
        r.err().map(|e| e.errno()).unwrap_or(0)
    }

    fn last_error() -> String {
        // SAFETY: a NUL-terminated string of this thread's.
        unsafe { std::ffi::CStr::from_ptr(super::super::boundary::last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn null_foreign_and_misaligned_pointers_are_refused() {
        let _serial = serial();
        // SAFETY: NULL, and pointers to readable memory.
        unsafe {
            assert_eq!(errno_of(Thing::enter(std::ptr::null())), libc::EINVAL);
            let words = [0u64; 4];
            assert_eq!(errno_of(Thing::enter(words.as_ptr().cast())), libc::EBADF);
            let misaligned = words.as_ptr().cast::<u8>().add(1).cast::<Thing>();
            assert_eq!(errno_of(Thing::enter(misaligned)), libc::EBADF);
            Thing::close(std::ptr::null_mut());
        }
    }

    #[test]
    fn close_drops_the_value_and_refuses_later_calls_and_closes() {
        let _serial = serial();
        let (v, drops, closings) = value();
        let p = Thing::into_c(v);
        // SAFETY: p is a handle of this kind, open or closed, for every call below.
        unsafe {
            assert!(Thing::enter(p).is_ok());
            Thing::close(p);
            assert_eq!((count(&drops), count(&closings)), (1, 1));
            assert_eq!(errno_of(Thing::enter(p)), libc::EBADF);
            Thing::close(p);
            assert!(last_error().contains("closed already"), "{}", last_error());
            assert_eq!((count(&drops), count(&closings)), (1, 1));
        }
    }

    #[test]
    fn a_call_in_flight_keeps_the_value_and_a_hold_keeps_the_handle_open() {
        let _serial = serial();
        let (v, drops, _) = value();
        let p = Thing::into_c(v);
        // SAFETY: p is a handle of this kind for every call below.
        unsafe {
            let call = Thing::enter(p).unwrap();
            let hold = call.hold().unwrap();
            drop(call);
            Thing::close(p);
            // The owner is gone; the hold keeps the handle open for calls.
            assert_eq!(count(&drops), 0);
            assert!(Thing::enter(p).is_ok());
            Thing::close(p); // not the owner's any more
            assert!(last_error().contains("closed already"));
            let call = Thing::enter(p).unwrap();
            drop(hold); // the last reference: closed, but the call in flight keeps the value
            assert_eq!(count(&drops), 0);
            assert_eq!(errno_of(Thing::enter(p)), libc::EBADF);
            assert!(errno_of(call.hold()) == libc::EBADF);
            drop(call);
            assert_eq!(count(&drops), 1);
        }
    }

    #[test]
    fn a_handle_no_one_owns_closes_with_its_last_hold() {
        let _serial = serial();
        let (v, drops, _) = value();
        let first = Thing::held(v);
        let p = first.as_c();
        let second = first.slot().hold().unwrap();
        // SAFETY: p is a handle of this kind.
        unsafe {
            Thing::close(p); // no owner: refused, nothing released
            assert!(last_error().contains("not from vfiokit_thing_open"));
            drop(first);
            assert!(Thing::enter(p).is_ok());
            drop(second);
            assert_eq!(count(&drops), 1);
            assert_eq!(errno_of(Thing::enter(p)), libc::EBADF);
        }
    }

    #[test]
    fn slots_are_reused_for_later_handles_of_their_kind() {
        let _serial = serial();
        let (v, drops, _) = value();
        let p = Thing::into_c(v);
        // SAFETY: p and q are handles of this kind, open or closed.
        unsafe {
            Thing::close(p);
            let (v, later, _) = value();
            let q = Thing::into_c(v);
            assert_eq!(q, p, "the closed handle's slot carries the next one");
            // A stale pointer is the new handle now (as a reused fd number is): what C must
            // not do, but nothing reads freed memory.
            assert!(Thing::enter(p).is_ok());
            Thing::close(q);
            assert_eq!((count(&drops), count(&later)), (1, 1));
        }
    }

    /// The close of one thread while others are inside calls: it waits for them, the value
    /// stays until they return and goes before close does, and every later call is refused.
    #[test]
    fn close_under_calls_in_flight() {
        let _serial = serial();
        for _ in 0..50 {
            let (v, drops, _) = value();
            let p = Thing::into_c(v) as usize;
            let started = Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    let (drops, started) = (Arc::clone(&drops), Arc::clone(&started));
                    std::thread::spawn(move || {
                        let mut calls = 0usize;
                        let mut first = true;
                        // SAFETY: p is a handle of this kind, open or closed.
                        while let Ok(call) = unsafe { Thing::enter(p as *const Thing) } {
                            assert_eq!(count(&drops), 0, "a call in flight sees its value");
                            assert_eq!(count(&call.drops), 0);
                            calls += 1;
                            if std::mem::take(&mut first) {
                                started.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        calls
                    })
                })
                .collect();
            while count(&started) < 3 {
                std::thread::yield_now();
            }
            // SAFETY: p is a handle of this kind.
            unsafe { Thing::close(p as *mut Thing) };
            assert_eq!(count(&drops), 1, "the value is gone when close returns");
            for t in threads {
                assert!(t.join().unwrap() > 0);
            }
            assert_eq!(count(&drops), 1);
        }
    }
}
