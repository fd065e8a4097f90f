//! UNIX stream sockets with file descriptors passed alongside (SCM_RIGHTS): the vfio-user
//! transport.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::{Errno, SysResult, check, check_len};

/// Connects a close-on-exec stream socket to the UNIX socket at `path`.
pub(crate) fn connect_unix(path: &str) -> SysResult<OwnedFd> {
    let cpath = CString::new(path).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = cpath.as_bytes_with_nul();
    if bytes.len() > addr.sun_path.len() {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain syscall with no pointers.
    let fd =
        check(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket just returned this fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        // SAFETY: addr is a valid sockaddr_un of the length given.
        let done = check(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        });
        match done {
            Err(Errno(libc::EINTR)) => continue,
            other => return other.map(|_| fd),
        }
    }
}

/// Room for the control message of up to `n` fds.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) as usize }
}

/// Sends all of `bytes`, with `fds` attached to its first byte. Never raises SIGPIPE: a closed
/// peer is EPIPE.
pub(crate) fn send_with_fds(sock: BorrowedFd, bytes: &[u8], fds: &[RawFd]) -> SysResult<()> {
    if fds.is_empty() {
        return send_all(sock, bytes);
    }
    let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    let mut done = 0;
    while done < bytes.len() {
        let mut iov =
            libc::iovec { iov_base: bytes[done..].as_ptr() as *mut _, iov_len: bytes.len() - done };
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if done == 0 && !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(fds.len()) as _;
            // SAFETY: control has room for one header and fds.len() fds (cmsg_space).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(fds) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        // SAFETY: msg points at live buffers for the duration of the call.
        match check_len(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) }) {
            Ok(n) => done += n,
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends all of `bytes` (send(2): no message header to build). Never raises SIGPIPE.
fn send_all(sock: BorrowedFd, bytes: &[u8]) -> SysResult<()> {
    let mut done = 0;
    while done < bytes.len() {
        let rest = &bytes[done..];
        // SAFETY: rest is a live buffer of the length given.
        match check_len(unsafe {
            libc::send(sock.as_raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL)
        }) {
            Ok(n) => done += n,
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and the fds that came with them (close-on-exec; at most
/// `max_fds` are taken, more is EPROTO and closes them all). 0 bytes: the peer closed.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd,
    buf: &mut [u8],
    max_fds: usize,
) -> SysResult<(usize, Vec<OwnedFd>)> {
    // Room for 16 fds on the stack (the vfio-user client's every receive); more on the heap.
    let mut small = [0u64; 16];
    let mut large = Vec::new();
    let words = cmsg_space(max_fds).div_ceil(8);
    let control = match words <= small.len() {
        true => &mut small[..words],
        false => {
            large.resize(words, 0u64);
            &mut large[..]
        }
    };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = (control.len() * 8) as _;
    let n = loop {
        // SAFETY: msg points at live, writable buffers of the lengths it states.
        match check_len(unsafe {
            libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC)
        }) {
            Err(Errno(libc::EINTR)) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed control messages.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    // The kernel installed these fds in our table for us.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(Errno(libc::EPROTO));
    }
    Ok((n, fds))
}

/// Fills all of `buf`, keeping every fd that comes along (at most `max_fds` a call). A peer
/// that closes first is ECONNRESET.
pub(crate) fn recv_exact_with_fds(
    sock: BorrowedFd,
    buf: &mut [u8],
    max_fds: usize,
) -> SysResult<Vec<OwnedFd>> {
    let (mut done, mut fds) = (0, Vec::new());
    while done < buf.len() {
        match recv_with_fds(sock, &mut buf[done..], max_fds)? {
            (0, _) => return Err(Errno(libc::ECONNRESET)),
            (n, more) => {
                done += n;
                fds.extend(more);
            }
        }
    }
    Ok(fds)
}

/// Ends both directions of a socket: a thread blocked receiving on it wakes with 0 bytes.
pub(crate) fn shutdown(sock: BorrowedFd) {
    // SAFETY: plain syscall; failure (already shut down) changes nothing we rely on.
    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
}
