//! A vfio-user client: one connection to a server process that carries a device.
//!
//! Requests are numbered and matched to their replies. Whoever reads the main socket also
//! serves the server's DMA_READ/DMA_WRITE requests it finds there (for memory mapped without
//! an fd): a calling thread that finds no one reading reads itself, until its own reply
//! arrives, delivering the replies of the calls that came meanwhile; then it hands the reading
//! to one of those (which reads its own reply), or leaves the socket to the receiver thread.
//! That thread reads only while no call does: an epoll watch wakes it when a message arrives
//! then. While calls are being made it is not armed (arming and disarming it around every call
//! would cost two system calls each); a ticker wakes the receiver every [`TICK`] instead, to
//! end a reading call that is past its deadline and, once no call is left, to arm the watch
//! again. So a lone call costs what a hand-written client pays, with no thread wake-up
//! between the socket and the caller; a server request that comes just after a call, while no
//! call reads, waits at most a tick. When the server offers a twin socket for its requests, a
//! second thread serves them there at once.
//!
//! Every request has a deadline. The first broken rule (a dead or stalled server, a reply
//! nobody asked for, an impossible size, unexpected fds) fails the connection: that call and
//! every later one get the same error, every waiting call is woken with it, and the socket is
//! shut so the server sees it too.

pub(crate) mod inbox;
pub(crate) mod proto;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use once_cell::sync::OnceCell;

use crate::error::{Error, Result};
use crate::sys::watch::{Fired, Watch};
use crate::sys::{self, Context, socket};
use inbox::{Inbox, Message, ReadError};
use proto::{Doorbell, Header, IoFds};

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
/// The largest message vfiokit takes.
const MESSAGE_LIMIT: u32 = MAX_DATA_XFER + MESSAGE_SLACK;
/// How long a request waits for its reply unless `VFIOKIT_VFIO_USER_TIMEOUT_MS` says otherwise.
const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// How often the receiver looks at the connection while calls are being made: how late past
/// its deadline a call reading the socket may end, and how long a server request that comes
/// while no call reads may wait after the last call.
const TICK: Duration = Duration::from_millis(4);
/// The watch's number once the connection has failed: it fires for good.
const WATCH_FAILED: u64 = u64::MAX - 1;
/// The most regions a device may have (as the device's open checks).
const MAX_REGIONS: usize = 64;
/// Room for this many sub-regions in the first GET_REGION_IO_FDS of a region.
const IO_FDS_FIRST: u32 = 8;

/// A region's ioeventfds, as its server gave them.
#[derive(Default)]
struct Doorbells {
    bells: Vec<Doorbell>,
    fds: Vec<OwnedFd>,
}

/// A reply, with the fds that came with it.
pub(crate) struct Reply {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Who reads the main socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// No one: the receiver thread's watch is armed (the next message wakes it), or is armed
    /// at its next tick.
    Nobody,
    /// The receiver thread, for one message.
    Receiver,
    /// The call waiting for the reply to this request, until that reply arrives.
    Call(u16),
}

/// A request sent and not yet answered.
struct Waiter {
    /// Its reply, when another thread read it.
    reply: Option<(Header, Reply)>,
    /// The calling thread, unparked when its reply is in, when it is to read, or on failure;
    /// None for a call that reads from the start (no one else wakes it: it reads until its
    /// reply is in or the connection fails).
    thread: Option<Thread>,
    command: u16,
    deadline: Instant,
}

/// The requests waiting for replies: few (one a calling thread), so a vector.
#[derive(Default)]
struct Waiting(Vec<(u16, Waiter)>);

impl Waiting {
    fn get(&self, id: u16) -> Option<&Waiter> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, w)| w)
    }

    fn get_mut(&mut self, id: u16) -> Option<&mut Waiter> {
        self.0.iter_mut().find(|(i, _)| *i == id).map(|(_, w)| w)
    }

    fn contains(&self, id: u16) -> bool {
        self.get(id).is_some()
    }

    fn insert(&mut self, id: u16, waiter: Waiter) {
        self.0.push((id, waiter));
    }

    fn remove(&mut self, id: u16) {
        if let Some(at) = self.0.iter().position(|(i, _)| *i == id) {
            self.0.swap_remove(at);
        }
    }

    /// The threads of the calls that may be parked.
    fn threads(&self) -> impl Iterator<Item = &Thread> {
        self.0.iter().filter_map(|(_, w)| w.thread.as_ref())
    }
}

struct Calls {
    waiting: Waiting,
    next_id: u16,
    /// Why the connection is unusable, once it is.
    failed: Option<Error>,
    reader: Reader,
    /// The number of the watch's latest arming or disarming: an arming that fires under an
    /// older number was undone (the socket went to a call) before the receiver saw it.
    watch_number: u64,
    /// Whether the watch is armed under `watch_number` and has not fired.
    armed: bool,
    /// Whether the watch's ticker runs: from when a call takes the socket until the receiver
    /// finds no call left.
    ticking: bool,
}

struct Connection {
    /// "vfio-user:<path>", the start of every message about this connection.
    name: String,
    sock: OwnedFd,
    /// What the main socket's reader has received ahead.
    inbox: Mutex<Inbox>,
    /// The server's command channel, in twin-socket mode.
    twin: std::sync::OnceLock<OwnedFd>,
    /// Wakes the receiver thread when a message arrives on the main socket while no call
    /// reads it, and at each tick while calls are being made.
    watch: Watch,
    /// Held while a message is written, so messages never interleave.
    send: Mutex<()>,
    calls: Mutex<Calls>,
    /// How long a request waits for its reply.
    timeout: Duration,
    serve_dma: DmaServer,
}

impl Connection {
    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection failed (the first reason stays), wakes every waiting call and the
    /// receiver, and shuts the socket. Returns the connection's error.
    fn fail(&self, errno: i32, why: impl std::fmt::Display) -> Error {
        let mut calls = self.calls();
        let error =
            calls.failed.get_or_insert_with(|| Error::new(errno, format!("{}: {why}", self.name)));
        let error = error.clone();
        let waiters: Vec<Thread> = calls.waiting.threads().cloned().collect();
        drop(calls);
        waiters.iter().for_each(Thread::unpark);
        self.shutdown();
        // The receiver may be waiting with its watch disarmed; the shut socket is readable for
        // good, so this wakes it, and it sees the failure. If this fails the receiver is
        // reading, and the shutdown ends its receive.
        let _ = self.watch.arm_for_good(WATCH_FAILED);
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

    /// Gives the main socket to call `id` (under the calls lock): the receiver's watch no
    /// longer fires for data, and its ticker runs, to end the call at its deadline. A failure
    /// to disarm is harmless (the receiver, woken, finds the arming's number stale); one to
    /// start the ticker is the caller's to fail the connection with, once the lock is released.
    fn give_socket(&self, calls: &mut Calls, id: u16) -> std::result::Result<(), sys::Errno> {
        calls.reader = Reader::Call(id);
        if calls.armed {
            calls.armed = false;
            calls.watch_number += 1;
            let _ = self.watch.disarm(calls.watch_number);
        }
        if !calls.ticking {
            self.watch.tick(Some(TICK))?;
            calls.ticking = true;
        }
        Ok(())
    }

    /// The reader is done (under the calls lock): the reading goes to a call still waiting
    /// for its reply, whose thread is returned to be unparked, or to no one. The receiver then
    /// arms its watch at its next tick, or at once (`arm`, when the receiver was the reader).
    fn hand_on(
        &self,
        calls: &mut Calls,
        arm: bool,
    ) -> std::result::Result<Option<Thread>, sys::Errno> {
        if let Some((next, waiter)) = calls.waiting.0.iter().find(|(_, w)| w.reply.is_none()) {
            let (next, thread) = (*next, waiter.thread.clone());
            self.give_socket(calls, next)?;
            return Ok(thread);
        }
        calls.reader = Reader::Nobody;
        if arm {
            self.arm(calls)?;
        }
        Ok(None)
    }

    /// Arms the receiver's watch (under the calls lock).
    fn arm(&self, calls: &mut Calls) -> std::result::Result<(), sys::Errno> {
        calls.watch_number += 1;
        self.watch.arm(calls.watch_number)?;
        calls.armed = true;
        Ok(())
    }

    /// After [`Connection::hand_on`], with the lock released.
    fn handed_on(&self, next: std::result::Result<Option<Thread>, sys::Errno>) {
        match next {
            Ok(Some(thread)) => thread.unpark(),
            Ok(None) => {}
            Err(sys::Errno(e)) => {
                self.fail(e, format!("handing the socket on: {}", strerror(e)));
            }
        }
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads one whole message from `sock` into `inbox`, or fails the connection.
    fn read_message(&self, inbox: &mut Inbox, sock: BorrowedFd) -> Result<Message> {
        let recv = |buf: &mut [u8]| socket::recv_with_fds(sock, buf, MAX_MSG_FDS as usize);
        inbox.read(MESSAGE_LIMIT, recv).map_err(|e| match e {
            ReadError::Closed(None) => {
                self.fail(libc::ECONNRESET, "the server closed the connection")
            }
            ReadError::Closed(Some(size)) => self.fail(
                libc::EPROTO,
                format!("the server closed the connection in the middle of a {size}-byte message"),
            ),
            ReadError::Size(header) => self.fail(
                libc::EPROTO,
                format!(
                    "the server sent a message of {} bytes (id {}, {}): not between 16 and {MESSAGE_LIMIT}",
                    header.size,
                    header.id,
                    command_name(header.command)
                ),
            ),
            ReadError::Recv(sys::Errno(e)) => {
                self.fail(e, format!("receiving from the server: {}", strerror(e)))
            }
        })
    }

    /// Reads one whole message from the main socket (its reader only), and says whether
    /// another waits whole in the inbox.
    fn read_main(&self) -> Result<(Message, bool)> {
        let mut inbox = self.inbox();
        let message = self.read_message(&mut inbox, self.sock.as_fd())?;
        Ok((message, inbox.ready(MESSAGE_LIMIT)))
    }

    /// Handles a message read from the main socket by the call `me` (None: the receiver): a
    /// reply goes to its call, or is returned when it is `me`'s; a server request is served.
    fn dispatch(&self, message: Message, me: Option<u16>) -> Result<Option<(Header, Reply)>> {
        let Message { header, payload, fds } = message;
        if !header.is_reply() {
            self.serve_request(self.sock.as_fd(), &header, &payload, fds)?;
            return Ok(None);
        }
        let reply = Reply { payload, fds };
        if me == Some(header.id) {
            return Ok(Some((header, reply)));
        }
        let mut calls = self.calls();
        let thread = match calls.waiting.get_mut(header.id) {
            Some(waiter) if waiter.reply.is_none() => {
                waiter.reply = Some((header, reply));
                waiter.thread.clone()
            }
            _ => {
                drop(calls);
                return Err(self.fail(
                    libc::EPROTO,
                    format!(
                        "the server sent a reply (id {}, {}) to no outstanding request",
                        header.id,
                        command_name(header.command)
                    ),
                ));
            }
        };
        drop(calls);
        thread.as_ref().map(Thread::unpark);
        Ok(None)
    }

    /// Serves a command the server sent on `sock` (DMA_READ, DMA_WRITE) and sends the answer.
    fn serve_request(
        &self,
        sock: BorrowedFd,
        header: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<()> {
        if !fds.is_empty() {
            return Err(self.fail(
                libc::EPROTO,
                format!("the server sent {} fds with {}", fds.len(), command_name(header.command)),
            ));
        }
        let answer = serve(header, payload, &self.serve_dma);
        self.send(sock, &answer, &[])
    }

    /// Waits for the reply to request `id` (sent, or failed to send): reads it itself when
    /// the socket is, or becomes, its to read; else is woken when another reader delivers it.
    fn wait_for(&self, id: u16, command: u16, deadline: Instant) -> Result<(Header, Reply)> {
        let mut calls = self.calls();
        loop {
            // A reply that arrived before the connection failed still answers its call.
            if let Some(answer) = calls.waiting.get_mut(id).and_then(|w| w.reply.take()) {
                calls.waiting.remove(id);
                return Ok(answer);
            }
            if let Some(e) = &calls.failed {
                let e = e.clone();
                calls.waiting.remove(id);
                return Err(e);
            }
            if calls.reader == Reader::Nobody
                && let Err(sys::Errno(e)) = self.give_socket(&mut calls, id)
            {
                drop(calls);
                self.fail(e, format!("starting the receiver's ticker: {}", strerror(e)));
                calls = self.calls();
                continue;
            }
            if calls.reader == Reader::Call(id) {
                drop(calls);
                return self.read_until(id, command, deadline);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                calls.waiting.remove(id);
                drop(calls);
                return Err(self.timed_out(command));
            }
            drop(calls);
            std::thread::park_timeout(left);
            calls = self.calls();
        }
    }

    /// The reading call `id`: reads the main socket until its reply arrives, then hands the
    /// reading on. A server that sends nothing is the receiver's to time out (at a tick, by
    /// failing the connection, which ends the receive); one that keeps sending other messages
    /// is timed out here.
    fn read_until(&self, id: u16, command: u16, deadline: Instant) -> Result<(Header, Reply)> {
        let stopped = |e| {
            self.calls().waiting.remove(id);
            e
        };
        let (answer, mut more) = loop {
            let (message, more) = self.read_main().map_err(stopped)?;
            if let Some(answer) = self.dispatch(message, Some(id)).map_err(stopped)? {
                break (answer, more);
            }
            if Instant::now() >= deadline {
                self.calls().waiting.remove(id);
                return Err(self.timed_out(command));
            }
        };
        // What came in the same receive is handled before the socket is left.
        while more {
            let message;
            (message, more) = self.read_main().map_err(stopped)?;
            if self.dispatch(message, Some(id)).map_err(stopped)?.is_some() {
                let twice =
                    format!("the server replied twice to {} (id {id})", command_name(command));
                return Err(stopped(self.fail(libc::EPROTO, twice)));
            }
        }
        let mut calls = self.calls();
        calls.waiting.remove(id);
        let next = self.hand_on(&mut calls, false);
        drop(calls);
        self.handed_on(next);
        Ok(answer)
    }

    fn timed_out(&self, command: u16) -> Error {
        self.fail(
            libc::ETIMEDOUT,
            format!(
                "no reply to {} within {} ms (set VFIOKIT_VFIO_USER_TIMEOUT_MS to wait longer)",
                command_name(command),
                self.timeout.as_millis()
            ),
        )
    }
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
        DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        REGION_READ => "REGION_READ",
        REGION_WRITE => "REGION_WRITE",
        DMA_READ => "DMA_READ",
        DMA_WRITE => "DMA_WRITE",
        DEVICE_RESET => "DEVICE_RESET",
        DEVICE_FEATURE => "DEVICE_FEATURE",
        _ => "an unknown command",
    }
}

/// One connection to a vfio-user server. Dropping it shuts the socket and joins its receivers.
pub(crate) struct Client {
    conn: Arc<Connection>,
    /// The server's limits.
    caps: proto::Caps,
    /// DMA mappings the server holds, against its `max_dma_maps`.
    dma_maps: Mutex<u32>,
    /// Whether to ask the server for regions' ioeventfds (see [`Client::doorbell`]).
    io_fds: bool,
    /// By region, its ioeventfds, asked for at the first write that could ring one.
    doorbells: Box<[OnceCell<Doorbells>]>,
    /// The receivers of the main socket and, in twin-socket mode, of the twin.
    receivers: Vec<JoinHandle<()>>,
}

impl Client {
    /// Starts the thread that receives on the main socket or (`twin`) the twin socket.
    fn start_receiver(&mut self, twin: bool) -> Result<()> {
        let conn = self.conn.clone();
        let thread = std::thread::Builder::new()
            .name("vfiokit-vfio-user".into())
            .spawn(move || match twin {
                true => receive_twin(&conn),
                false => receive(&conn),
            })
            .map_err(sys::Errno::from)
            .context(|| "starting a vfio-user receiver thread")?;
        self.receivers.push(thread);
        Ok(())
    }

    /// Connects to the server at `path` and negotiates the protocol version; `serve_dma`
    /// answers the server's DMA requests.
    pub(crate) fn connect(path: &str, serve_dma: DmaServer) -> Result<Client> {
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
        let timeout = Duration::from_millis(timeout_ms);
        let watch =
            Watch::new(sock.as_fd(), 0).context(|| format!("making an epoll watch of {name}"))?;
        let calls = Calls {
            waiting: Waiting::default(),
            next_id: 0,
            failed: None,
            reader: Reader::Nobody,
            watch_number: 0,
            armed: true,
            ticking: false,
        };
        let conn = Arc::new(Connection {
            name,
            sock,
            inbox: Mutex::new(Inbox::new()),
            twin: std::sync::OnceLock::new(),
            watch,
            send: Mutex::new(()),
            calls: Mutex::new(calls),
            timeout,
            serve_dma,
        });
        let mut client = Client {
            conn,
            caps: proto::Caps::default(),
            dma_maps: Mutex::new(0),
            io_fds: false,
            doorbells: (0..MAX_REGIONS).map(|_| OnceCell::new()).collect(),
            receivers: Vec::new(),
        };
        client.start_receiver(false)?;
        let ours = proto::Caps {
            max_msg_fds: MAX_MSG_FDS,
            max_data_xfer_size: MAX_DATA_XFER,
            twin_socket: true,
            ..Default::default()
        };
        let reply =
            client.request(proto::VERSION, &[&proto::version(&ours)], &[], MAX_MSG_FDS as usize)?;
        let (major, minor, theirs) =
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
            client.start_receiver(true)?;
        }
        if major != proto::MAJOR {
            return Err(client.conn.fail(
                libc::EPROTO,
                format!("the server speaks vfio-user {major}.x; vfiokit speaks {}.x", proto::MAJOR),
            ));
        }
        client.caps = theirs;
        // There is no capability for GET_REGION_IO_FDS, and rust-vmm's server, which speaks
        // 0.0, answers a command it does not know without reading its payload, which it then
        // takes for the next message: only a server of 0.1 or later (libvfio-user) is asked.
        client.io_fds = minor >= 1;
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
        let deadline = Instant::now() + conn.timeout;
        let id = {
            let mut calls = conn.calls();
            if let Some(e) = &calls.failed {
                return Err(e.clone());
            }
            let mut id = calls.next_id;
            while calls.waiting.contains(id) {
                id = id.wrapping_add(1);
            }
            calls.next_id = id.wrapping_add(1);
            // Taken before the request goes out, so that the reply cannot wake the receiver.
            let reads = calls.reader == Reader::Nobody;
            let thread = (!reads).then(std::thread::current);
            calls.waiting.insert(id, Waiter { reply: None, thread, command, deadline });
            if reads && let Err(sys::Errno(e)) = conn.give_socket(&mut calls, id) {
                drop(calls);
                // The wait reports it.
                conn.fail(e, format!("starting the receiver's ticker: {}", strerror(e)));
            }
            id
        };
        // A failed send fails the connection, which the wait then reports. Small commands
        // (nearly all) are put together on the stack.
        let mut small = [0u8; 256];
        let _ = match proto::command_into(&mut small, id, command, parts) {
            Some(n) => conn.send(conn.sock.as_fd(), &small[..n], fds),
            None => conn.send(conn.sock.as_fd(), &proto::command(id, command, parts), fds),
        };
        let (header, reply) = conn.wait_for(id, command, deadline)?;
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
        if let Some(fd) = self.doorbell(index, off, buf)? {
            // The server's ioeventfd, as KVM would signal it: no message and no reply. The
            // connection's state still decides, so a failed one fails this write too.
            if let Some(e) = &self.conn.calls().failed {
                return Err(e.clone());
            }
            return sys::eventfd_signal(fd).map_err(|sys::Errno(e)| {
                Error::os(
                    e,
                    format!("{}: ringing region {index}'s ioeventfd at {off:#x}", self.conn.name),
                )
            });
        }
        let step = self.chunk();
        for (i, part) in buf.chunks(step).enumerate() {
            let at = off + (i * step) as u64;
            let fixed = proto::region_access(index, at, part.len() as u32);
            self.request(proto::REGION_WRITE, &[&fixed, part], &[], 0)?;
        }
        Ok(())
    }

    /// The ioeventfd that a write of `buf` at `off` of region `index` rings instead of a
    /// REGION_WRITE, asking the server for the region's on the first write that could (a
    /// server that refuses has none).
    fn doorbell(&self, index: u32, off: u64, buf: &[u8]) -> Result<Option<BorrowedFd<'_>>> {
        if !self.io_fds || buf.len() > 8 {
            return Ok(None);
        }
        let Some(slot) = self.doorbells.get(index as usize) else { return Ok(None) };
        let bells = slot.get_or_try_init(|| self.region_io_fds(index))?;
        let rung = bells.bells.iter().find(|b| b.rings(off, buf));
        Ok(rung.map(|b| bells.fds[b.fd_index as usize].as_fd()))
    }

    /// DEVICE_GET_REGION_IO_FDS: the region's ioeventfds (asked again with room for them all
    /// when the first reply says they need more); none when the server refuses.
    fn region_io_fds(&self, index: u32) -> Result<Doorbells> {
        let mut argsz = proto::IO_FDS_HEADER + IO_FDS_FIRST * proto::IO_FD_ENTRY;
        loop {
            let fixed = proto::region_io_fds(index, argsz);
            let reply = match self.request(
                proto::DEVICE_GET_REGION_IO_FDS,
                &[&fixed],
                &[],
                MAX_MSG_FDS as usize,
            ) {
                Ok(reply) => reply,
                // The server's refusal: this region has none.
                Err(_) if self.conn.calls().failed.is_none() => return Ok(Doorbells::default()),
                Err(e) => return Err(e),
            };
            match proto::decode_region_io_fds(&reply.payload, index, reply.fds.len())
                .map_err(|e| self.protocol_error(e))?
            {
                IoFds::Doorbells(bells) => return Ok(Doorbells { bells, fds: reply.fds }),
                IoFds::Needs(needed) if needed > argsz && needed <= MESSAGE_SLACK => argsz = needed,
                IoFds::Needs(needed) => {
                    return Err(self.protocol_error(format!(
                        "region {index}'s io fds need {needed} bytes after {argsz} were offered"
                    )));
                }
            }
        }
    }

    /// DEVICE_FEATURE: `flags` holds the feature's index and GET, SET and/or PROBE; `data`
    /// goes with the request, as the kernel's payload does, and a GET's reply comes back into it.
    pub(crate) fn device_feature(&self, flags: u32, data: &mut [u8]) -> Result<()> {
        if data.len() > MAX_DATA_XFER as usize {
            return Err(Error::invalid(format!(
                "{}: device feature data of {} bytes ({MAX_DATA_XFER} at most)",
                self.conn.name,
                data.len()
            )));
        }
        let argsz = 8 + data.len() as u32;
        let fixed = proto::device_feature(argsz, flags);
        let reply = self.request(proto::DEVICE_FEATURE, &[&fixed, data], &[], 0)?;
        let got = proto::decode_device_feature(&reply.payload, data.len())
            .map_err(|e| self.protocol_error(e))?;
        if flags & crate::device::FEATURE_GET != 0 && flags & crate::device::FEATURE_PROBE == 0 {
            data[..got.len()].copy_from_slice(got);
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
        // No call is in flight (each holds the client): the receivers see the failure and end.
        self.conn.fail(libc::ECANCELED, "the connection is closed");
        for receiver in self.receivers.drain(..) {
            let _ = receiver.join();
        }
    }
}

/// The main socket's receiver thread: reads a message whenever one arrives while no call is
/// reading; at each tick, ends a reading call that is past its deadline, and arms the watch
/// once no call is left. Until the connection ends.
fn receive(conn: &Connection) {
    loop {
        let fired = match conn.watch.wait() {
            Ok(fired) => fired,
            Err(sys::Errno(e)) => {
                conn.fail(e, format!("waiting for the server: {}", strerror(e)));
                return;
            }
        };
        let mut calls = conn.calls();
        if calls.failed.is_some() {
            return;
        }
        match (fired, calls.reader) {
            (Fired::Tick, Reader::Call(id)) => {
                let late = calls.waiting.get(id).filter(|w| w.deadline <= Instant::now());
                if let Some(command) = late.map(|w| w.command) {
                    drop(calls);
                    // Ends the call's receive: it returns this error.
                    conn.timed_out(command);
                }
                continue;
            }
            (Fired::Tick, _) => {
                // No call reads: the watch goes back on, and the ticker off.
                let next = conn.hand_on(&mut calls, true).and_then(|next| {
                    if calls.reader == Reader::Nobody {
                        conn.watch.tick(None)?;
                        calls.ticking = false;
                    }
                    Ok(next)
                });
                drop(calls);
                conn.handed_on(next);
                continue;
            }
            // An older number: that arming was undone when a call took the socket, which
            // read what woke the watch, or reads it still.
            (Fired::Socket(n), _) if n != calls.watch_number => continue,
            (Fired::Socket(_), reader) => {
                calls.armed = false;
                if reader != Reader::Nobody {
                    continue;
                }
                calls.reader = Reader::Receiver;
            }
        }
        drop(calls);
        // One message, and any that came whole with it.
        loop {
            let Ok((message, more)) = conn.read_main() else {
                return;
            };
            if conn.dispatch(message, None).is_err() {
                return;
            }
            if !more {
                break;
            }
        }
        let mut calls = conn.calls();
        if calls.failed.is_some() {
            return;
        }
        let next = conn.hand_on(&mut calls, true);
        drop(calls);
        conn.handed_on(next);
    }
}

/// The twin socket's receiver thread: serves the server's requests there until the connection
/// ends.
fn receive_twin(conn: &Connection) {
    let sock = conn.twin.get().expect("set before its receiver starts").as_fd();
    let mut inbox = Inbox::new();
    loop {
        let Ok(Message { header, payload, fds }) = conn.read_message(&mut inbox, sock) else {
            return;
        };
        if header.is_reply() {
            conn.fail(
                libc::EPROTO,
                format!("the server sent a reply (id {}) on the twin socket", header.id),
            );
            return;
        }
        if conn.serve_request(sock, &header, &payload, fds).is_err() {
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
