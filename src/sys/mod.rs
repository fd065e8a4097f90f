//! The only layer that talks to the kernel: ioctls, mmap, pread/pwrite, eventfds, sockets, sysfs.
//!
//! Every call returns the raw errno on failure; callers above add the context that makes a
//! message useful. Nothing here decides policy.

pub(crate) mod fault;
pub(crate) mod iommufd;
pub(crate) mod mem;
pub(crate) mod socket;
pub(crate) mod sysfs;
pub(crate) mod vfio;
pub(crate) mod watch;

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::error::Error;

/// A raw errno from a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Errno(pub i32);

pub(crate) type SysResult<T> = std::result::Result<T, Errno>;

impl Errno {
    fn last() -> Self {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Attach "what was being done" to a raw errno.
pub(crate) trait Context<T> {
    fn context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> crate::Result<T>;
}

impl<T> Context<T> for SysResult<T> {
    fn context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> crate::Result<T> {
        self.map_err(|Errno(e)| Error::os(e, what()))
    }
}

#[inline]
fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

#[inline]
fn check_len(ret: libc::ssize_t) -> SysResult<usize> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret as usize) }
}

/// Opens a device node read/write with O_CLOEXEC (std's default), so a forked-and-exec'd child
/// never inherits device access. std builds the C path on the stack.
pub(crate) fn open_rw(path: &str) -> SysResult<OwnedFd> {
    Ok(std::fs::OpenOptions::new().read(true).write(true).open(path)?.into())
}

/// An ioctl whose argument is a pointer to `T` (in, out or both).
///
/// # Safety
/// `request` must be an ioctl that reads/writes at most `size_of::<T>()` bytes at `arg`, or
/// as many as `arg`'s `argsz` field declares when `arg` heads a larger buffer.
pub(crate) unsafe fn ioctl_ptr<T>(fd: BorrowedFd, request: u64, arg: *mut T) -> SysResult<i32> {
    // SAFETY: upheld by the caller.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) })
}

/// An ioctl that takes an integer argument (or none).
pub(crate) fn ioctl_val(fd: BorrowedFd, request: u64, arg: libc::c_ulong) -> SysResult<i32> {
    // SAFETY: these requests take their argument by value and touch no user memory.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) })
}

/// Repeats a positional transfer until `len` bytes are done: `step(done)` moves bytes from
/// `done` on and returns how many; moving none (end of the region) is EIO.
fn transfer_all(len: usize, mut step: impl FnMut(usize) -> libc::ssize_t) -> SysResult<()> {
    let mut done = 0;
    while done < len {
        match check_len(step(done))? {
            0 => return Err(Errno(libc::EIO)),
            n => done += n,
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `offset`.
pub(crate) fn pread_exact(fd: BorrowedFd, buf: &mut [u8], offset: u64) -> SysResult<()> {
    let (ptr, len) = (buf.as_mut_ptr(), buf.len());
    transfer_all(len, |done| {
        // SAFETY: ptr+done..ptr+len lies in the caller's writable buffer.
        unsafe {
            libc::pread(
                fd.as_raw_fd(),
                ptr.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        }
    })
}

/// Writes exactly `buf.len()` bytes at `offset`.
pub(crate) fn pwrite_all(fd: BorrowedFd, buf: &[u8], offset: u64) -> SysResult<()> {
    let (ptr, len) = (buf.as_ptr(), buf.len());
    transfer_all(len, |done| {
        // SAFETY: ptr+done..ptr+len lies in the caller's buffer.
        unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                ptr.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        }
    })
}

/// A close-on-exec duplicate of `fd`.
pub(crate) fn dup(fd: BorrowedFd) -> SysResult<OwnedFd> {
    fd.try_clone_to_owned().map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EBADF)))
}

/// A non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> SysResult<OwnedFd> {
    // SAFETY: plain syscall with no pointers.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: eventfd just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until `fd` or one of `cancel` is readable; `timeout_ms < 0` waits forever. Returns
/// which became readable, `None` on timeout.
pub(crate) fn poll_readable(
    fd: BorrowedFd,
    cancel: [BorrowedFd; 2],
    timeout_ms: i32,
) -> SysResult<Option<Readable>> {
    let pfd =
        |fd: BorrowedFd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let mut pfds = [pfd(fd), pfd(cancel[0]), pfd(cancel[1])];
    loop {
        // SAFETY: pfds is valid pollfds, as many as we say.
        match check(unsafe {
            libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms)
        }) {
            Ok(0) => return Ok(None),
            // Cancellation first: a waiter told to stop must not take a count after it.
            Ok(_) if pfds[1..].iter().any(|p| p.revents != 0) => return Ok(Some(Readable::Cancel)),
            Ok(_) => return Ok(Some(Readable::Fd)),
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Which of [`poll_readable`]'s fds is readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readable {
    Fd,
    Cancel,
}

/// Adds one to an eventfd's counter, making it readable.
pub(crate) fn eventfd_signal(fd: BorrowedFd) -> SysResult<()> {
    let one = 1u64;
    // SAFETY: one is 8 readable bytes, what an eventfd write needs.
    check_len(unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) }).map(drop)
}

/// Takes the eventfd's counter (resetting it to zero); `None` if it was zero.
#[inline]
pub(crate) fn eventfd_take(fd: BorrowedFd) -> SysResult<Option<u64>> {
    let mut count = 0u64;
    // SAFETY: count is 8 writable bytes, what an eventfd read needs.
    match check_len(unsafe { libc::read(fd.as_raw_fd(), (&raw mut count).cast(), 8) }) {
        Ok(_) => Ok(Some(count)),
        Err(Errno(libc::EAGAIN)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The soft RLIMIT_MEMLOCK in bytes (`u64::MAX` for unlimited).
pub(crate) fn memlock_limit() -> u64 {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: rl is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } < 0
        || rl.rlim_cur == libc::RLIM_INFINITY
    {
        return u64::MAX;
    }
    rl.rlim_cur
}

pub(crate) fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no memory effects.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize })
}

/// Whether the running kernel's release is `major.minor` or newer (an unparsable one is not).
pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = kernel_release();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    match (next(), next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// The running kernel's release ("6.12.95"), for messages that name the version a feature needs.
pub(crate) fn kernel_release() -> String {
    // SAFETY: utsname is plain bytes; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes one utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }.to_string_lossy().into_owned()
}
