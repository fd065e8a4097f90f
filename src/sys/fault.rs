//! Surviving a device that goes away under a mapped BAR: a process-wide SIGBUS handler that,
//! for a fault inside a guarded mapping, maps memory reading all-ones (what PCIe returns for a
//! vanished device) over the whole mapping, marks its owner gone, and returns so the access
//! retries. Faults anywhere else go to the handler that was there before (or kill the process
//! as SIGBUS does by default).
//!
//! The handler uses only async-signal-safe operations: atomic loads and stores, mmap and an
//! eventfd write.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use super::{Errno, SysResult, check, eventfd, eventfd_signal};

/// The all-ones memory is mapped over a guarded range this many bytes at a time.
const CHUNK: usize = 2 << 20;
/// How many mappings can be guarded at once; more are mapped unguarded.
const SLOTS: usize = 256;

/// A device's removal state, shared by its guarded mappings' slots.
pub(crate) struct Gone {
    flag: AtomicBool,
    /// Signalled (never read, so it stays readable) when a mapping faulted: blocked IRQ waits
    /// poll it, since the handler can take no lock to wake them otherwise.
    wake: OwnedFd,
}

impl Gone {
    pub(crate) fn new() -> SysResult<Arc<Gone>> {
        Ok(Arc::new(Gone { flag: AtomicBool::new(false), wake: eventfd()? }))
    }

    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Gone without a fault (the owner retired it, and ends its waits itself).
    pub(crate) fn set(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Readable once a mapping faulted.
    pub(crate) fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// From the handler: a store and a write(2), both async-signal-safe.
    fn faulted(&self) {
        self.set();
        // A fresh eventfd cannot overflow from one write per fault.
        let _ = eventfd_signal(self.wake.as_fd());
    }
}

struct Slot {
    base: AtomicUsize,
    len: AtomicUsize,
    /// `Arc::into_raw` of the owner's [`Gone`] while the slot is in use.
    gone: AtomicPtr<Gone>,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    gone: AtomicPtr::new(std::ptr::null_mut()),
};
static GUARDED: [Slot; SLOTS] = [FREE; SLOTS];
/// Serializes the writers of [`GUARDED`]; the handler only reads it.
static WRITERS: Mutex<()> = Mutex::new(());
/// A memfd of [`CHUNK`] bytes of 0xff, made when the handler is installed; -1 before.
static ONES: AtomicI32 = AtomicI32::new(-1);
/// The SIGBUS disposition found when the handler was installed.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the handler once per process (unless `VFIOKIT_SIGBUS_GUARD=0`); true when it is.
pub(crate) fn install() -> bool {
    INSTALL.call_once(|| {
        if std::env::var_os("VFIOKIT_SIGBUS_GUARD").is_some_and(|v| v == "0") {
            return;
        }
        let Ok(fd) = make_ones() else { return };
        ONES.store(fd, Ordering::Release);
        // SAFETY: a zeroed sigaction is valid; we fill the handler and flags.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigbus;
        act.sa_sigaction = handler as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_ONSTACK;
        // PREVIOUS is written here only, once, before the handler can run.
        let previous = (&raw mut PREVIOUS).cast::<libc::sigaction>();
        // SAFETY: act is valid; previous points to room for one sigaction.
        if unsafe { libc::sigaction(libc::SIGBUS, &act, previous) } == 0 {
            INSTALLED.store(true, Ordering::Release);
        }
    });
    INSTALLED.load(Ordering::Acquire)
}

/// A memfd holding [`CHUNK`] bytes of 0xff (close-on-exec, kept for the process's life).
fn make_ones() -> SysResult<i32> {
    // SAFETY: the name is NUL-terminated.
    let fd = check(unsafe { libc::memfd_create(c"vfiokit-gone".as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: plain syscall on our fd.
    check(unsafe { libc::ftruncate(fd, CHUNK as libc::off_t) })?;
    let p = map_shared(fd, CHUNK)?;
    // SAFETY: p is CHUNK writable bytes we just mapped; unmapped right after.
    unsafe {
        std::ptr::write_bytes(p.cast::<u8>(), 0xff, CHUNK);
        libc::munmap(p, CHUNK);
    }
    Ok(fd)
}

/// A new read/write shared mapping of `len` bytes of `fd` from its start.
fn map_shared(fd: i32, len: usize) -> SysResult<*mut libc::c_void> {
    // SAFETY: a fresh mapping where the kernel picks the address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED { Err(Errno::last()) } else { Ok(p) }
}

/// Guards `[base, base+len)`: a SIGBUS inside it replaces it with all-ones and marks `gone`.
/// Returns the slot to [`unguard`] before the range is unmapped, None when the handler is not
/// installed or every slot is taken.
pub(crate) fn guard(base: NonNull<u8>, len: usize, gone: &Arc<Gone>) -> Option<usize> {
    if !install() {
        return None;
    }
    let _w = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let i = GUARDED.iter().position(|s| s.base.load(Ordering::Relaxed) == 0)?;
    let s = &GUARDED[i];
    s.gone.store(Arc::into_raw(gone.clone()).cast_mut(), Ordering::Relaxed);
    s.len.store(len, Ordering::Relaxed);
    s.base.store(base.as_ptr().addr(), Ordering::Release);
    Some(i)
}

/// Ends [`guard`]'s protection of a slot.
pub(crate) fn unguard(slot: usize) {
    let _w = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let s = &GUARDED[slot];
    s.base.store(0, Ordering::Release);
    let gone = s.gone.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !gone.is_null() {
        // SAFETY: from Arc::into_raw in guard, taken back once.
        drop(unsafe { Arc::from_raw(gone) });
    }
}

/// Maps all-ones memory (private: stores land in this process's copy, never in the device)
/// over `[base, base+len)`. Async-signal-safe.
///
/// # Safety
/// The range must be a mapping this process owns and means to stop using as device memory.
pub(crate) unsafe fn fill_ones(base: usize, len: usize) -> SysResult<()> {
    let fd = ONES.load(Ordering::Acquire);
    if fd < 0 {
        return Err(Errno(libc::ENOTSUP));
    }
    let mut off = 0;
    while off < len {
        let n = CHUNK.min(len - off);
        // SAFETY: upheld by the caller: the range is ours to replace.
        let p = unsafe {
            libc::mmap(
                (base + off) as *mut libc::c_void,
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        off += n;
    }
    Ok(())
}

/// [`fill_ones`] over a guarded slot's range, outside the handler (the owner marks itself gone).
pub(crate) fn retire(slot: usize) -> SysResult<()> {
    let s = &GUARDED[slot];
    let (base, len) = (s.base.load(Ordering::Acquire), s.len.load(Ordering::Acquire));
    if base == 0 {
        return Ok(());
    }
    // SAFETY: a guarded range is a device mapping its owner is giving up.
    unsafe { fill_ones(base, len) }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The interrupted code may be about to read errno, which mmap and write can change.
    // SAFETY: this thread's errno.
    let errno = unsafe { *libc::__errno_location() };
    on_fault(sig, info, ctx);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() }.addr();
    for s in &GUARDED {
        let base = s.base.load(Ordering::Acquire);
        if base == 0 || addr < base || addr - base >= s.len.load(Ordering::Acquire) {
            continue;
        }
        // SAFETY: a guarded range is a live device mapping; replacing it is what we are for.
        if unsafe { fill_ones(base, s.len.load(Ordering::Acquire)) }.is_ok() {
            let gone = s.gone.load(Ordering::Acquire);
            // SAFETY: the slot's Arc keeps it alive while the slot is in use.
            if let Some(gone) = unsafe { gone.as_ref() } {
                gone.faulted();
            }
            return; // the access retries and reads all-ones
        }
    }
    chain(sig, info, ctx);
}

/// A fault that is not ours: what the previous disposition does with it.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: written once before the handler was installed, never after.
    let prev = unsafe { (&raw const PREVIOUS).cast::<libc::sigaction>().as_ref() };
    let Some(prev) = prev else { return };
    match prev.sa_sigaction {
        libc::SIG_DFL | libc::SIG_IGN => {
            // Back to the default and return: the access faults again and kills the process,
            // with the signal a core dump and the parent expect.
            // SAFETY: a zeroed sigaction is SIG_DFL.
            let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: valid arguments; sigaction is async-signal-safe.
            unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
        }
        h if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous handler was installed with this signature.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(h) };
            f(sig, info, ctx)
        }
        h => {
            // SAFETY: as above, a plain handler.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
            f(sig)
        }
    }
}

/// For tests: the memfd's fd stays open for the process's life.
#[cfg(test)]
pub(crate) fn ones_fd() -> i32 {
    ONES.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file mapping past the file's end faults with SIGBUS, as a zapped BAR does.
    #[test]
    fn a_sigbus_in_a_guarded_mapping_becomes_all_ones_marks_it_gone_and_wakes_waiters() {
        assert!(install(), "the handler installs");
        assert!(ones_fd() >= 0);
        // SAFETY: plain syscalls on a fresh memfd of size 0.
        let fd = unsafe { libc::memfd_create(c"bus".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        let len = 3 * CHUNK / 2;
        // Every access to it faults: it lies past the file's end.
        let p = map_shared(fd, len).expect("a shared mapping");
        let base = NonNull::new(p.cast::<u8>()).unwrap();
        let gone = Gone::new().expect("an eventfd");
        let slot = guard(base, len, &gone).expect("a free slot");
        let at = p.addr() + 0x1000;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping; the fault is survived.
            unsafe { std::ptr::with_exposed_provenance::<u32>(at).read_volatile() }
        });
        assert_eq!(reader.join().expect("the reading thread survives"), 0xffff_ffff);
        assert!(gone.is_set(), "marked gone");
        assert_eq!(crate::sys::eventfd_take(gone.wake_fd()), Ok(Some(1)), "waiters woken");
        // The whole range, past the first chunk too, reads all-ones now.
        // SAFETY: inside the replaced mapping.
        let last = unsafe { base.as_ptr().add(len - 8).cast::<u64>().read_volatile() };
        assert_eq!(last, u64::MAX);
        unguard(slot);
        assert_eq!(Arc::strong_count(&gone), 1, "the slot's reference is released");
        // SAFETY: ours, no longer used.
        unsafe {
            libc::munmap(p, len);
            libc::close(fd);
        }
    }
}
