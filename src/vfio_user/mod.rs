//! A vfio-user client: one connection to a server process that carries a device.
//!
//! Requests are numbered and matched to their replies by a receiver thread, which also serves
//! the server's DMA_READ/DMA_WRITE requests (for memory mapped without an fd); when the server
//! offers a twin socket for its requests, a second thread serves them there. Every request has
//! a deadline. The first broken rule (a dead or stalled server, a reply nobody asked for, an
//! impossible size, unexpected fds) fails the connection: that call and every later one get the
//! same error, and the socket is shut so the server sees it too.

pub(crate) mod proto;

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::{self, Context, socket};
use proto::Header;

/// What a server's DMA request asks of the client's memory.
pub(crate) enum DmaAccess<'a> {
    Read { iova: u64, len: usize },
    Write { iova: u64, data: &'a [u8] },
}

/// Serves a DMA request: the bytes read (for a read), or an errno to answer with.
pub(crate) type DmaServer =
    Box<dyn Fn(DmaAccess) -> std::result::Result<Vec<u8>, i32> + Send + Sync>;

/// The most fds vfiokit takes with one message, and says it takes.
const MAX_MSG_FDS: u32 = 16;
/// The largest data transfer vfiokit accepts in one message, and says it accepts.
const MAX_DATA_XFER: u32 = 1 << 20;
/// Room for a message's fixed parts beyond its data (region info capability chains included).
const MESSAGE_SLACK: u32 = 64 << 10;
/// How long a request waits for its reply unless `VFIOKIT_VFIO_USER_TIMEOUT_MS` says otherwise.
const DEFAULT_TIMEOUT_MS: u64 = 5000;

/// A reply, with the fds that came with it.
pub(crate) struct Reply {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

#[derive(Default)]
struct Calls {
    /// Requests sent and not yet answered: their replies land here.
    waiting: HashMap<u16, Option<(Header, Reply)>>,
    next_id: u16,
    /// Why the connection is unusable, once it is.
    failed: Option<Error>,
}

struct Connection {
    /// "vfio-user:<path>", the start of every message about this connection.
    name: String,
    sock: OwnedFd,
    /// The server's command channel, in twin-socket mode.
    twin: std::sync::OnceLock<OwnedFd>,
    /// Held while a message is written, so messages never interleave.
    send: Mutex<()>,
    calls: Mutex<Calls>,
    answered: Condvar,
}

impl Connection {
    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection failed (the first reason stays), wakes every waiting call, and
    /// shuts the socket. Returns the connection's error.
    fn fail(&self, errno: i32, why: impl std::fmt::Display) -> Error {
        let mut calls = self.calls();
        let error =
            calls.failed.get_or_insert_with(|| Error::new(errno, format!("{}: {why}", self.name)));
        let error = error.clone();
        drop(calls);
        self.answered.notify_all();
        self.shutdown();
        error
    }

    fn shutdown(&self) {
        socket::shutdown(self.sock.as_fd());
        if let Some(twin) = self.twin.get() {
            socket::shutdown(twin.as_fd());
        }
    }

    fn send(&self, sock: BorrowedFd, msg: &[u8], fds: &[RawFd]) -> Result<()> {
        let _turn = self.send.lock().unwrap_or_else(|e| e.into_inner());
        socket::send_with_fds(sock, msg, fds).map_err(|sys::Errno(e)| {
            self.fail(libc::ECONNRESET, format!("sending to the server: {}", strerror(e)))
        })
    }
}

/// Reads exactly `buf.len()` bytes, collecting fds; `Ok(false)` if the peer closed first.
fn recv_exact(sock: BorrowedFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> sys::SysResult<bool> {
    let mut done = 0;
    while done < buf.len() {
        let (n, more) = socket::recv_with_fds(sock, &mut buf[done..], MAX_MSG_FDS as usize)?;
        fds.extend(more);
        if n == 0 {
            return Ok(false);
        }
        done += n;
    }
    Ok(true)
}

fn strerror(e: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

fn command_name(code: u16) -> &'static str {
    use proto::*;
    match code {
        VERSION => "VERSION",
        DMA_MAP => "DMA_MAP",
        DMA_UNMAP => "DMA_UNMAP",
        DEVICE_GET_INFO => "DEVICE_GET_INFO",
        DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        REGION_READ => "REGION_READ",
        REGION_WRITE => "REGION_WRITE",
        DMA_READ => "DMA_READ",
        DMA_WRITE => "DMA_WRITE",
        DEVICE_RESET => "DEVICE_RESET",
        _ => "an unknown command",
    }
}

/// One connection to a vfio-user server. Dropping it shuts the socket and joins its receiver.
pub(crate) struct Client {
    conn: Arc<Connection>,
    /// The server's limits.
    caps: proto::Caps,
    timeout: Duration,
    /// DMA mappings the server holds, against its `max_dma_maps`.
    dma_maps: Mutex<u32>,
    /// The receivers of the main socket and, in twin-socket mode, of the twin.
    receivers: Vec<JoinHandle<()>>,
}

impl Client {
    /// Connects to the server at `path` and negotiates the protocol version; `serve_dma`
    /// answers the server's DMA requests.
    /// Starts the thread that receives on the main socket or (`twin`) the twin socket.
    fn start_receiver(&mut self, twin: bool, serve_dma: Arc<DmaServer>) -> Result<()> {
        let conn = self.conn.clone();
        let thread = std::thread::Builder::new()
            .name("vfiokit-vfio-user".into())
            .spawn(move || {
                let sock = match twin {
                    true => conn.twin.get().expect("set before its receiver starts").as_fd(),
                    false => conn.sock.as_fd(),
                };
                receive(&conn, sock, twin, &serve_dma)
            })
            .map_err(sys::Errno::from)
            .context(|| "starting a vfio-user receiver thread")?;
        self.receivers.push(thread);
        Ok(())
    }

    pub(crate) fn connect(path: &str, serve_dma: DmaServer) -> Result<Client> {
        let serve_dma = Arc::new(serve_dma);
        let name = format!("vfio-user:{path}");
        let sock = socket::connect_unix(path).map_err(|sys::Errno(e)| {
            let hint = match e {
                libc::ENOENT | libc::ECONNREFUSED => " (is the device's server running?)",
                _ => "",
            };
            Error::os(e, format!("connecting to the vfio-user server at {path}{hint}"))
        })?;
        let timeout_ms = std::env::var("VFIOKIT_VFIO_USER_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_TIMEOUT_MS);
        let conn = Arc::new(Connection {
            name,
            sock,
            twin: std::sync::OnceLock::new(),
            send: Mutex::new(()),
            calls: Mutex::new(Calls::default()),
            answered: Condvar::new(),
        });
        let mut client = Client {
            conn,
            caps: proto::Caps::default(),
            timeout: Duration::from_millis(timeout_ms),
            dma_maps: Mutex::new(0),
            receivers: Vec::new(),
        };
        client.start_receiver(false, serve_dma.clone())?;
        let ours = proto::Caps {
            max_msg_fds: MAX_MSG_FDS,
            max_data_xfer_size: MAX_DATA_XFER,
            twin_socket: true,
            ..Default::default()
        };
        let reply =
            client.request(proto::VERSION, &[&proto::version(&ours)], &[], MAX_MSG_FDS as usize)?;
        let (major, _minor, theirs) =
            proto::decode_version(&reply.payload).map_err(|e| client.protocol_error(e))?;
        if let Some(index) = theirs.twin_fd_index {
            let mut fds = reply.fds;
            if index as usize >= fds.len() {
                return Err(client.protocol_error(format!(
                    "the twin socket is fd {index} of the version reply, which came with {}",
                    fds.len()
                )));
            }
            let _ = client.conn.twin.set(fds.swap_remove(index as usize));
            client.start_receiver(true, serve_dma)?;
        }
        if major != proto::MAJOR {
            return Err(client.conn.fail(
                libc::EPROTO,
                format!("the server speaks vfio-user {major}.x; vfiokit speaks {}.x", proto::MAJOR),
            ));
        }
        client.caps = theirs;
        Ok(client)
    }

    fn protocol_error(&self, e: impl std::fmt::Display) -> Error {
        self.conn.fail(libc::EPROTO, e)
    }

    /// Sends a command with `fds` and waits for its reply, which may carry up to `max_fds` fds.
    /// A server's error reply fails only this call.
    pub(crate) fn request(
        &self,
        command: u16,
        parts: &[&[u8]],
        fds: &[RawFd],
        max_fds: usize,
    ) -> Result<Reply> {
        let conn = &*self.conn;
        let id = {
            let mut calls = conn.calls();
            if let Some(e) = &calls.failed {
                return Err(e.clone());
            }
            let mut id = calls.next_id;
            while calls.waiting.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            calls.next_id = id.wrapping_add(1);
            calls.waiting.insert(id, None);
            id
        };
        let sent = conn.send(conn.sock.as_fd(), &proto::command(id, command, parts), fds);
        let deadline = Instant::now() + self.timeout;
        let mut calls = conn.calls();
        let answer = loop {
            // A reply that arrived before the connection failed still answers its call.
            if let Some(answer) = calls.waiting.get_mut(&id).and_then(Option::take) {
                calls.waiting.remove(&id);
                break answer;
            }
            if sent.is_err() || calls.failed.is_some() {
                calls.waiting.remove(&id);
                return Err(calls.failed.clone().expect("set by the failure"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                calls.waiting.remove(&id);
                drop(calls);
                return Err(conn.fail(
                    libc::ETIMEDOUT,
                    format!(
                        "no reply to {} within {} ms (set VFIOKIT_VFIO_USER_TIMEOUT_MS to wait longer)",
                        command_name(command),
                        self.timeout.as_millis()
                    ),
                ));
            }
            calls = conn.answered.wait_timeout(calls, left).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(calls);
        let (header, reply) = answer;
        if header.command != command {
            return Err(self.protocol_error(format!(
                "the reply to {} (id {id}) is for {}",
                command_name(command),
                command_name(header.command)
            )));
        }
        if reply.fds.len() > max_fds {
            return Err(self.protocol_error(format!(
                "the reply to {} came with {} fds ({max_fds} expected at most)",
                command_name(command),
                reply.fds.len()
            )));
        }
        match header.errno() {
            Some(e) => Err(Error::new(
                e,
                format!(
                    "{}: the server refused {}: {}",
                    conn.name,
                    command_name(command),
                    strerror(e)
                ),
            )),
            None => Ok(reply),
        }
    }

    /// The server's smallest DMA page size: the lowest one in its pgsizes bitmap.
    pub(crate) fn page_size(&self) -> u64 {
        1u64 << self.caps.pgsizes.trailing_zeros().min(63)
    }

    /// Ends the connection: requests waiting for replies, and every later one, fail with
    /// ECANCELED (unless it had failed already, which stays the reason).
    pub(crate) fn cancel(&self) {
        self.conn.fail(libc::ECANCELED, "the device is being closed");
    }

    /// DEVICE_GET_INFO: (flags, number of regions, number of IRQs).
    pub(crate) fn device_info(&self) -> Result<(u32, u32, u32)> {
        let reply = self.request(proto::DEVICE_GET_INFO, &[&proto::device_info()], &[], 0)?;
        proto::decode_device_info(&reply.payload).map_err(|e| self.protocol_error(e))
    }

    /// DEVICE_GET_REGION_INFO: the whole reply (asked again with room for it when the first
    /// says it is larger) and the fds to mmap the region's areas from: one for them all, or
    /// (libvfio-user) one per sparse area.
    pub(crate) fn region_info(&self, index: u32) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut argsz = 32;
        loop {
            let reply = self.request(
                proto::DEVICE_GET_REGION_INFO,
                &[&proto::region_info(index, argsz)],
                &[],
                MAX_MSG_FDS as usize,
            )?;
            let needed =
                proto::region_info_argsz(&reply.payload).map_err(|e| self.protocol_error(e))?;
            if needed <= argsz || reply.payload.len() >= needed as usize {
                return Ok((reply.payload, reply.fds));
            }
            if argsz > 32 || needed > MESSAGE_SLACK {
                return Err(self.protocol_error(format!(
                    "region {index}'s information needs {needed} bytes after {argsz} were offered"
                )));
            }
            argsz = needed;
        }
    }

    /// DEVICE_GET_IRQ_INFO: (flags, count).
    pub(crate) fn irq_info(&self, index: u32) -> Result<(u32, u32)> {
        let reply = self.request(proto::DEVICE_GET_IRQ_INFO, &[&proto::irq_info(index)], &[], 0)?;
        proto::decode_irq_info(&reply.payload).map_err(|e| self.protocol_error(e))
    }

    /// DEVICE_SET_IRQS with no data (disable, mask, unmask, trigger).
    pub(crate) fn set_irqs(&self, set: &[u8]) -> Result<()> {
        self.request(proto::DEVICE_SET_IRQS, &[set], &[], 0).map(drop)
    }

    /// Routes vectors `first..` of IRQ `index` to `fds`, in as many messages as the server's
    /// fd limit needs.
    pub(crate) fn set_irq_eventfds(&self, index: u32, first: u32, fds: &[RawFd]) -> Result<()> {
        let batch = self.caps.max_msg_fds.max(1) as usize;
        for (i, chunk) in fds.chunks(batch).enumerate() {
            let start = first + (i * batch) as u32;
            let set = crate::irq::encode_eventfds_header(index, start, chunk.len() as u32);
            self.request(proto::DEVICE_SET_IRQS, &[&set], chunk, 0)?;
        }
        Ok(())
    }

    /// The most data one REGION_READ/WRITE may move.
    fn chunk(&self) -> usize {
        self.caps.max_data_xfer_size.clamp(8, MAX_DATA_XFER) as usize
    }

    pub(crate) fn region_read(&self, index: u32, off: u64, buf: &mut [u8]) -> Result<()> {
        let step = self.chunk();
        for (i, part) in buf.chunks_mut(step).enumerate() {
            let at = off + (i * step) as u64;
            let fixed = proto::region_access(index, at, part.len() as u32);
            let reply = self.request(proto::REGION_READ, &[&fixed], &[], 0)?;
            let data = proto::decode_region_read(&reply.payload, part.len())
                .map_err(|e| self.protocol_error(e))?;
            part.copy_from_slice(data);
        }
        Ok(())
    }

    pub(crate) fn region_write(&self, index: u32, off: u64, buf: &[u8]) -> Result<()> {
        let step = self.chunk();
        for (i, part) in buf.chunks(step).enumerate() {
            let at = off + (i * step) as u64;
            let fixed = proto::region_access(index, at, part.len() as u32);
            self.request(proto::REGION_WRITE, &[&fixed, part], &[], 0)?;
        }
        Ok(())
    }

    pub(crate) fn reset(&self) -> Result<()> {
        self.request(proto::DEVICE_RESET, &[], &[], 0).map(drop)
    }

    /// DMA_MAP of `size` bytes at `iova`: backed by `fd` at `offset` when given (the server maps
    /// it), else served by DMA_READ/DMA_WRITE.
    pub(crate) fn dma_map(
        &self,
        iova: u64,
        size: u64,
        writable: bool,
        fd: Option<(RawFd, u64)>,
    ) -> Result<()> {
        let flags = proto::DMA_FLAG_READ | if writable { proto::DMA_FLAG_WRITE } else { 0 };
        let (fds, offset) = match fd {
            Some((fd, offset)) => (vec![fd], offset),
            None => (Vec::new(), 0),
        };
        let page = self.page_size();
        if (iova | size | offset) % page != 0 {
            return Err(Error::invalid(format!(
                "{}: DMA map of {size:#x} bytes at IOVA {iova:#x}: the server maps in pages of {page:#x} bytes",
                self.conn.name
            )));
        }
        let mut maps = self.dma_maps.lock().unwrap_or_else(|e| e.into_inner());
        if *maps >= self.caps.max_dma_maps {
            return Err(Error::new(
                libc::ENOSPC,
                format!(
                    "{}: DMA map of {size:#x} bytes at IOVA {iova:#x}: the server takes at most {} mappings",
                    self.conn.name, self.caps.max_dma_maps
                ),
            ));
        }
        let map = proto::dma_map(flags, offset, iova, size);
        self.request(proto::DMA_MAP, &[&map], &fds, 0)?;
        *maps += 1;
        Ok(())
    }

    pub(crate) fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.request(proto::DMA_UNMAP, &[&proto::dma_unmap(iova, size)], &[], 0)?;
        let mut maps = self.dma_maps.lock().unwrap_or_else(|e| e.into_inner());
        *maps = maps.saturating_sub(1);
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.conn.shutdown();
        for receiver in self.receivers.drain(..) {
            let _ = receiver.join();
        }
    }
}

/// A receiver thread: delivers replies (main socket only) and serves the server's requests
/// until the connection ends.
fn receive(conn: &Connection, sock: BorrowedFd, twin: bool, serve_dma: &DmaServer) {
    let limit = MAX_DATA_XFER + MESSAGE_SLACK;
    loop {
        let mut head = [0u8; proto::HEADER_LEN];
        let mut fds = Vec::new();
        match recv_exact(sock, &mut head, &mut fds) {
            Ok(true) => {}
            Ok(false) => {
                return drop(conn.fail(libc::ECONNRESET, "the server closed the connection"));
            }
            Err(sys::Errno(e)) => {
                return drop(conn.fail(e, format!("receiving from the server: {}", strerror(e))));
            }
        }
        let header = Header::decode(&head);
        if (header.size as usize) < proto::HEADER_LEN || header.size > limit {
            return drop(conn.fail(
                libc::EPROTO,
                format!(
                    "the server sent a message of {} bytes (id {}, {}): not between 16 and {limit}",
                    header.size,
                    header.id,
                    command_name(header.command)
                ),
            ));
        }
        let mut payload = vec![0u8; header.size as usize - proto::HEADER_LEN];
        match recv_exact(sock, &mut payload, &mut fds) {
            Ok(true) => {}
            Ok(false) => {
                return drop(conn.fail(
                    libc::EPROTO,
                    format!(
                        "the server closed the connection in the middle of a {}-byte message",
                        header.size
                    ),
                ));
            }
            Err(sys::Errno(e)) => {
                return drop(conn.fail(e, format!("receiving from the server: {}", strerror(e))));
            }
        }
        if header.is_reply() && twin {
            return drop(conn.fail(
                libc::EPROTO,
                format!("the server sent a reply (id {}) on the twin socket", header.id),
            ));
        }
        if header.is_reply() {
            let mut calls = conn.calls();
            match calls.waiting.get_mut(&header.id) {
                Some(slot @ None) => *slot = Some((header, Reply { payload, fds })),
                _ => {
                    drop(calls);
                    return drop(conn.fail(
                        libc::EPROTO,
                        format!(
                            "the server sent a reply (id {}, {}) to no outstanding request",
                            header.id,
                            command_name(header.command)
                        ),
                    ));
                }
            }
            drop(calls);
            conn.answered.notify_all();
            continue;
        }
        if !fds.is_empty() {
            return drop(conn.fail(
                libc::EPROTO,
                format!("the server sent {} fds with {}", fds.len(), command_name(header.command)),
            ));
        }
        let answer = serve(&header, &payload, serve_dma);
        if conn.send(sock, &answer, &[]).is_err() {
            return;
        }
    }
}

/// The reply to a command from the server: DMA_READ and DMA_WRITE are served, others refused.
fn serve(header: &Header, payload: &[u8], serve_dma: &DmaServer) -> Vec<u8> {
    let (id, command) = (header.id, header.command);
    let Ok((iova, count, data)) = proto::decode_dma_access(payload) else {
        return proto::error_reply(id, command, libc::EINVAL);
    };
    let served = match command {
        proto::DMA_READ if count <= MAX_DATA_XFER as u64 => {
            serve_dma(DmaAccess::Read { iova, len: count as usize })
        }
        proto::DMA_WRITE if data.len() as u64 == count => {
            serve_dma(DmaAccess::Write { iova, data })
        }
        proto::DMA_READ | proto::DMA_WRITE => Err(libc::EINVAL),
        _ => Err(libc::ENOTSUP),
    };
    match served {
        Ok(read) => proto::reply(id, command, &[&proto::dma_access(iova, count), &read]),
        Err(e) => proto::error_reply(id, command, e),
    }
}
