//! Servers that follow a script instead of the protocol: they die, stall, and send what no
//! server should, so the client's defences can be seen to hold. Messages are built here byte by
//! byte, independently of the library's encoder.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::JoinHandle;

pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const DEVICE_GET_INFO: u16 = 4;
pub const DEVICE_GET_REGION_INFO: u16 = 5;
pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
pub const DEVICE_GET_IRQ_INFO: u16 = 7;
pub const REGION_WRITE: u16 = 10;
pub const DMA_READ: u16 = 11;
pub const DMA_WRITE: u16 = 12;
pub const DEVICE_RESET: u16 = 13;
pub const DEVICE_FEATURE: u16 = 16;
pub const REPLY: u32 = 1;
pub const ERROR: u32 = 1 << 5;

#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

pub struct Peer {
    pub stream: UnixStream,
    /// fds that came with the last message received.
    pub fds: usize,
}

pub fn header_bytes(h: Header) -> Vec<u8> {
    [
        &h.id.to_ne_bytes()[..],
        &h.command.to_ne_bytes(),
        &h.size.to_ne_bytes(),
        &h.flags.to_ne_bytes(),
        &h.error.to_ne_bytes(),
    ]
    .concat()
}

impl Peer {
    /// The next message, or None when the client has closed.
    pub fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut head = [0u8; 16];
        // recvmsg for the header, to count fds that came with it.
        let mut control = [0u64; 16];
        let mut iov = libc::iovec { iov_base: head.as_mut_ptr().cast(), iov_len: 16 };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = unsafe {
            libc::recvmsg(
                self.stream.as_raw_fd(),
                &mut msg,
                libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n <= 0 {
            return None;
        }
        assert_eq!(n, 16);
        self.fds = if msg.msg_controllen > 0 { 1 } else { 0 };
        let u16_at = |o: usize| u16::from_ne_bytes(head[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_ne_bytes(head[o..o + 4].try_into().unwrap());
        let h = Header {
            id: u16_at(0),
            command: u16_at(2),
            size: u32_at(4),
            flags: u32_at(8),
            error: u32_at(12),
        };
        let mut payload = vec![0u8; h.size as usize - 16];
        self.stream.read_exact(&mut payload).ok()?;
        Some((h, payload))
    }

    /// The next message, which must be `command`.
    pub fn expect(&mut self, command: u16) -> (Header, Vec<u8>) {
        let (h, payload) = self.recv().expect("the client closed early");
        assert_eq!(h.command, command, "{h:?}");
        (h, payload)
    }

    pub fn send(&mut self, id: u16, command: u16, flags: u32, error: u32, payload: &[u8]) {
        let size = 16 + payload.len() as u32;
        let mut bytes = header_bytes(Header { id, command, size, flags, error });
        bytes.extend_from_slice(payload);
        let _ = self.stream.write_all(&bytes);
    }

    pub fn reply(&mut self, to: Header, payload: &[u8]) {
        self.send(to.id, to.command, REPLY, 0, payload);
    }

    /// Answers the VERSION request `to` with `capabilities` (JSON, which names the twin socket
    /// at fd index 0), the twin's client end attached; returns the twin's server end.
    pub fn reply_version_with_twin(&mut self, to: Header, capabilities: &str) -> Peer {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let payload = [&[0u8, 0, 1, 0][..], capabilities.as_bytes(), &[0]].concat();
        let head = Header {
            id: to.id,
            command: VERSION,
            size: 16 + payload.len() as u32,
            flags: REPLY,
            error: 0,
        };
        self.send_with_fd(
            &[header_bytes(head), payload].concat(),
            std::os::fd::AsRawFd::as_raw_fd(&theirs),
        );
        Peer { stream: ours, fds: 0 }
    }

    /// Sends `bytes` with `fd` attached (the receiver gets its own copy).
    pub fn send_with_fd(&mut self, bytes: &[u8], fd: i32) {
        let mut control = [0u64; 4];
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            libc::CMSG_DATA(cmsg).cast::<i32>().write_unaligned(fd);
            assert_eq!(libc::sendmsg(self.stream.as_raw_fd(), &msg, 0), bytes.len() as isize);
        }
    }

    /// Answers VERSION with `json` as the capabilities.
    pub fn handshake_with(&mut self, json: &str) {
        let (h, _) = self.expect(VERSION);
        let payload = [&[0u8, 0, 1, 0][..], json.as_bytes(), &[0]].concat();
        self.reply(h, &payload);
    }

    /// VERSION and DEVICE_GET_INFO: a resettable PCI device with no regions and no IRQs.
    pub fn open_bare_device(&mut self) {
        self.handshake_with(r#"{"capabilities":{"max_msg_fds":8}}"#);
        self.answer_device_info();
    }

    /// DEVICE_GET_INFO: a resettable PCI device with no regions and no IRQs.
    pub fn answer_device_info(&mut self) {
        let (h, _) = self.expect(DEVICE_GET_INFO);
        let info: Vec<u8> = [16u32, 0b11, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.reply(h, &info);
    }

    /// Waits for the client to close the connection.
    pub fn until_closed(&mut self) {
        while self.recv().is_some() {}
    }
}

/// Runs `script` against the first client to connect at `path`.
pub fn serve(path: &Path, script: impl FnOnce(&mut Peer) + Send + 'static) -> JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        script(&mut Peer { stream, fds: 0 });
    })
}
