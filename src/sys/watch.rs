//! A watch on one socket, for a thread that waits on behalf of others: it wakes that thread
//! when the socket becomes readable (each arming fires once, under the number it was armed
//! with) or, while its ticker runs, at every tick.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::{Errno, SysResult, check, check_len};

/// What woke [`Watch::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fired {
    /// The socket, armed under this number.
    Socket(u64),
    /// The ticker.
    Tick,
}

pub(crate) struct Watch {
    epoll: OwnedFd,
    /// The socket watched; it must outlive the watch.
    sock: RawFd,
    ticker: OwnedFd,
}

/// The ticker's event, told apart from the socket's arming numbers.
const TICKER: u64 = u64::MAX;

impl Watch {
    /// Watches `sock`, armed under number `n`; the ticker is stopped.
    pub(crate) fn new(sock: BorrowedFd, n: u64) -> SysResult<Watch> {
        // SAFETY: plain syscalls with no pointers; each returns a new fd, owned below.
        let epoll = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let flags = libc::TFD_CLOEXEC | libc::TFD_NONBLOCK;
        // SAFETY: as above.
        let ticker = check(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, flags) })?;
        let ticker = unsafe { OwnedFd::from_raw_fd(ticker) };
        let watch = Watch { epoll, sock: sock.as_raw_fd(), ticker };
        watch.ctl(libc::EPOLL_CTL_ADD, watch.sock, libc::EPOLLIN | libc::EPOLLONESHOT, n)?;
        watch.ctl(libc::EPOLL_CTL_ADD, watch.ticker.as_raw_fd(), libc::EPOLLIN, TICKER)?;
        Ok(watch)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: libc::c_int, n: u64) -> SysResult<()> {
        let mut event = libc::epoll_event { events: events as u32, u64: n };
        // SAFETY: event is a valid epoll_event; both fds are open.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) }).map(drop)
    }

    /// Fires once, under number `n`, when the socket is (or becomes) readable.
    pub(crate) fn arm(&self, n: u64) -> SysResult<()> {
        self.ctl(libc::EPOLL_CTL_MOD, self.sock, libc::EPOLLIN | libc::EPOLLONESHOT, n)
    }

    /// Stops watching the socket for data (the kernel still reports a hang-up or an error,
    /// once, under `n`).
    pub(crate) fn disarm(&self, n: u64) -> SysResult<()> {
        self.ctl(libc::EPOLL_CTL_MOD, self.sock, libc::EPOLLONESHOT, n)
    }

    /// Fires under `n` for as long as the socket is readable: a shut socket wakes the waiter
    /// at every wait.
    pub(crate) fn arm_for_good(&self, n: u64) -> SysResult<()> {
        self.ctl(libc::EPOLL_CTL_MOD, self.sock, libc::EPOLLIN, n)
    }

    /// Starts the ticker (`Some(every)`) or stops it (`None`).
    pub(crate) fn tick(&self, every: Option<Duration>) -> SysResult<()> {
        let every = every.map_or(libc::timespec { tv_sec: 0, tv_nsec: 0 }, |d| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let spec = libc::itimerspec { it_interval: every, it_value: every };
        // SAFETY: spec is a valid itimerspec; the old value is not asked for.
        check(unsafe {
            libc::timerfd_settime(self.ticker.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        })
        .map(drop)
    }

    /// Waits until the socket's arming or the ticker fires (a tick's expirations are taken).
    pub(crate) fn wait(&self) -> SysResult<Fired> {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        loop {
            // SAFETY: room for one event.
            match check(unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut event, 1, -1) }) {
                Ok(1) if event.u64 == TICKER => {
                    let mut expirations = 0u64;
                    // SAFETY: 8 writable bytes, what a timerfd read needs. Nothing to take
                    // (EAGAIN: stopped and reset meanwhile) is fine.
                    let _ = check_len(unsafe {
                        libc::read(self.ticker.as_raw_fd(), (&raw mut expirations).cast(), 8)
                    });
                    return Ok(Fired::Tick);
                }
                Ok(1) => return Ok(Fired::Socket(event.u64)),
                Ok(_) | Err(Errno(libc::EINTR)) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
