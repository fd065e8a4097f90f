//! Operation 8, on the host: vfio-user round trips through vfiokit against the same messages
//! written by hand on a raw socket (the baseline), each side talking to its own instance of
//! the test device model (tests/vfio_user/model.rs, served by rust-vmm's `vfio_user` server).
//! The doorbell case is against libvfio-user: the project's doorbell server
//! (tests/vfio_user/doorbell.c, built by tests/vfio_user/libvfio-user), whose ioeventfd a
//! write rings without a message.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;
use vfiokit::irq::IRQ_MSIX;
use vfiokit::{Device, Iommu, IommuKind};

use crate::stats::{Figure, run_case, variant};
use crate::{EDU_ID, Opts, batch, read_n};

#[path = "../../tests/vfio_user/model.rs"]
#[allow(dead_code)] // the model's register names the tests use and this does not
mod model;

const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
/// VFIO_IRQ_SET_DATA_NONE | ACTION_TRIGGER, and DATA_EVENTFD | ACTION_TRIGGER.
const TRIGGER: u32 = 1 | (1 << 5);
const EVENTFD: u32 = (1 << 2) | (1 << 5);
const IOVA: u64 = 1 << 30;

/// A vfio-user client written the way a careful driver would without a library: one request
/// in flight, each reply read straight after it (the model sends no requests of its own).
struct Raw {
    sock: UnixStream,
    next_id: u16,
    reply: Vec<u8>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let sock = UnixStream::connect(path).expect("raw: connect");
        let mut raw = Raw { sock, next_id: 0, reply: Vec::new() };
        let json = br#"{"capabilities":{"max_msg_fds":8}}"#;
        raw.request(VERSION, &[&0u16.to_ne_bytes(), &1u16.to_ne_bytes(), json, &[0]], None);
        raw
    }

    /// Sends one command (with `fd` by SCM_RIGHTS) and reads its reply's payload into `reply`.
    fn request(&mut self, command: u16, parts: &[&[u8]], fd: Option<RawFd>) -> &[u8] {
        let size = 16 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut msg = Vec::with_capacity(size);
        for field in
            [&self.next_id.to_ne_bytes()[..], &command.to_ne_bytes(), &(size as u32).to_ne_bytes()]
        {
            msg.extend_from_slice(field);
        }
        msg.extend_from_slice(&[0; 8]);
        parts.iter().for_each(|p| msg.extend_from_slice(p));
        match fd {
            None => self.sock.write_all(&msg).expect("raw: send"),
            Some(fd) => send_with_fd(&self.sock, &msg, fd),
        }
        let mut header = [0u8; 16];
        self.sock.read_exact(&mut header).expect("raw: reply header");
        let id = u16::from_ne_bytes([header[0], header[1]]);
        let len = u32::from_ne_bytes(header[4..8].try_into().unwrap()) as usize - 16;
        let flags = u32::from_ne_bytes(header[8..12].try_into().unwrap());
        assert_eq!((id, flags & 0x2f), (self.next_id, 1), "raw: a good reply to {command}");
        self.next_id = self.next_id.wrapping_add(1);
        self.reply.resize(len, 0);
        self.sock.read_exact(&mut self.reply).expect("raw: reply payload");
        &self.reply
    }

    fn read32(&mut self, region: u32, offset: u64) -> u32 {
        let reply = self.request(
            REGION_READ,
            &[&offset.to_ne_bytes(), &region.to_ne_bytes(), &4u32.to_ne_bytes()],
            None,
        );
        u32::from_ne_bytes(reply[16..20].try_into().unwrap())
    }

    fn write32(&mut self, region: u32, offset: u64, value: u32) {
        let parts: [&[u8]; 4] = [
            &offset.to_ne_bytes(),
            &region.to_ne_bytes(),
            &4u32.to_ne_bytes(),
            &value.to_ne_bytes(),
        ];
        self.request(REGION_WRITE, &parts, None);
    }

    fn set_irqs(&mut self, flags: u32, fd: Option<RawFd>) {
        // argsz, flags, index, start, count: MSI-X vector 0.
        let fields = [20u32, flags, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1];
        let bytes: Vec<u8> = fields.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.request(SET_IRQS, &[&bytes], fd);
    }
}

fn send_with_fd(sock: &UnixStream, msg: &[u8], fd: RawFd) {
    let mut space = [0u64; 4]; // CMSG_SPACE(sizeof(int)), aligned
    let mut iov = libc::iovec { iov_base: msg.as_ptr() as *mut _, iov_len: msg.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = space.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    hdr.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the control buffer holds one cmsg with an int (CMSG_SPACE(4) bytes).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&hdr);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
    }
    // SAFETY: a valid socket and message.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, 0) };
    assert_eq!(sent, msg.len() as isize, "raw: sendmsg");
}

/// A model serving one connection at a fresh socket path.
fn serve(name: &str) -> (PathBuf, std::thread::JoinHandle<()>) {
    let dir = std::env::temp_dir().join(format!("vfiokit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let server = model::serve(&path);
    (path, server)
}

/// A 4-byte doorbell write: the raw client's REGION_WRITE, vfiokit's REGION_WRITE (a register
/// with no ioeventfd), and vfiokit's write to the register an ioeventfd covers (an eventfd
/// write: the server does not poll it here, so this is the client's cost alone).
fn doorbells(o: &Opts) -> Vec<Figure> {
    const PLAIN: u64 = 0x110;
    const BELL: u64 = 0x100;
    let (mut ours, ours_path) = doorbell_server("vfiokit-doorbell.sock");
    let (mut theirs, raw_path) = doorbell_server("raw-doorbell.sock");
    let dev = Device::open(&format!("vfio-user:{}", ours_path.display()), None)
        .expect("vfiokit: open the doorbell server");
    let raw = std::cell::RefCell::new(Raw::connect(&raw_path));
    let out = run_case(
        "vfio-user doorbell write 4 B (libvfio-user)",
        "vfio-user",
        o.rounds,
        batch(o, 2000),
        0,
        vec![
            variant("raw", |n| (0..n).for_each(|i| raw.borrow_mut().write32(0, PLAIN, i as u32))),
            variant("vfiokit", |n| {
                (0..n).for_each(|i| dev.write_reg::<u32>(0, PLAIN, i as u32).expect("write"))
            }),
            variant("ioeventfd", |n| {
                (0..n).for_each(|i| dev.write_reg::<u32>(0, BELL, i as u32).expect("ring"))
            }),
        ],
    );
    // Every ring reached the server's eventfd, none by message (its counters at 0x200, 0x210).
    let rang = dev.read_reg::<u64>(0, 0x200).expect("vfiokit: rings");
    let plain = dev.read_reg::<u64>(0, 0x210).expect("vfiokit: writes");
    assert!(rang > 0 && rang == plain, "{rang} rings and {plain} messages: as many of each");
    drop(dev);
    drop(raw);
    for server in [&mut ours, &mut theirs] {
        assert!(server.wait().expect("the doorbell server").success());
    }
    out
}

/// The doorbell server serving one connection at a fresh socket path.
fn doorbell_server(name: &str) -> (std::process::Child, PathBuf) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = std::process::Command::new(repo.join("tests/vfio_user/libvfio-user"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run tests/vfio_user/libvfio-user");
    assert!(built.status.success(), "tests/vfio_user/libvfio-user failed");
    let dir = PathBuf::from(String::from_utf8(built.stdout).expect("a path").trim());
    let path =
        std::env::temp_dir().join(format!("vfiokit-bench-{}", std::process::id())).join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    let child = std::process::Command::new(dir.join("doorbell"))
        .arg(&path)
        .spawn()
        .expect("start the doorbell server");
    while !path.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (child, path)
}

fn eventfd() -> OwnedFd {
    // SAFETY: creates a new fd, owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: fresh and ours.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn read_count(fd: RawFd) -> u64 {
    let mut count = 0u64;
    // SAFETY: an 8-byte read into a u64.
    assert_eq!(unsafe { libc::read(fd, (&raw mut count).cast(), 8) }, 8, "eventfd read");
    count
}

pub fn op_vfio_user(o: &Opts) -> Vec<Figure> {
    let (ours_path, ours_server) = serve("vfiokit.sock");
    let (raw_path, raw_server) = serve("raw.sock");
    let context = Iommu::open(IommuKind::VfioUser).expect("vfiokit: context");
    let device = Device::open(&format!("vfio-user:{}", ours_path.display()), Some(&context))
        .expect("vfiokit: open the model");
    let raw = std::cell::RefCell::new(Raw::connect(&raw_path));
    let (dev, iommu) = (&device, &context);
    let backend = "vfio-user";
    let mut out = run_case(
        "vfio-user region read 4 B (BAR0 id)",
        backend,
        o.rounds,
        batch(o, 2000),
        0,
        vec![
            variant("raw", |n| {
                for _ in 0..n {
                    assert_eq!(raw.borrow_mut().read32(0, 0), EDU_ID);
                }
            }),
            variant("vfiokit", |n| {
                for _ in 0..n {
                    assert_eq!(dev.read_reg::<u32>(0, 0).expect("vfiokit: read"), EDU_ID);
                }
            }),
        ],
    );
    out.extend(run_case(
        "vfio-user region write 4 B",
        backend,
        o.rounds,
        batch(o, 2000),
        0,
        vec![
            variant("raw", |n| (0..n).for_each(|i| raw.borrow_mut().write32(0, 4, i as u32))),
            variant("vfiokit", |n| {
                (0..n).for_each(|i| dev.write_reg::<u32>(0, 4, i as u32).expect("vfiokit: write"))
            }),
        ],
    ));
    // The checked accessors' fast path natively, on a region one area maps whole (BAR4, read
    // only), against a volatile read through the same mapping: what op 2 measures under TCG,
    // where every branch ends a translation block, on the host's CPU.
    let bar4 = dev.map(4).expect("vfiokit: map BAR4").as_ptr();
    const OFF: usize = 0x100;
    const WANT: u32 = model::ROM_BASE + (OFF / 4) as u32;
    // A register handle needs a region that may be written: it reads the same value from BAR2's
    // first area (the model's RAM, the same memfd as BAR4).
    let ram = dev.register::<u32>(2, OFF as u64).expect("vfiokit: BAR2 register");
    ram.write(WANT);
    out.extend(run_case(
        "read32 mapped RAM (vfio-user BAR4, native)",
        backend,
        o.rounds,
        batch(o, 1_000_000),
        0,
        vec![
            variant("raw", |n| {
                read_n(n, WANT, "raw: BAR4 word", || {
                    // SAFETY: inside the mapped BAR (16 KiB), aligned.
                    unsafe { bar4.add(OFF).cast::<u32>().read_volatile() }
                })
            }),
            variant("vfiokit", |n| {
                read_n(n, WANT, "vfiokit: BAR4 word", || {
                    dev.read_reg::<u32>(4, OFF as u64).expect("vfiokit: read_reg")
                })
            }),
            variant("register", |n| read_n(n, WANT, "register: BAR2 word", || ram.read())),
        ],
    ));
    let efd = eventfd();
    raw.borrow_mut().set_irqs(EVENTFD, Some(efd.as_raw_fd()));
    dev.irq_enable(IRQ_MSIX, 0, 1).expect("vfiokit: enable MSI-X");
    out.extend(run_case(
        "vfio-user irq trigger+wait (MSI-X)",
        backend,
        o.rounds,
        batch(o, 2000),
        0,
        vec![
            variant("raw", |n| {
                for _ in 0..n {
                    raw.borrow_mut().set_irqs(TRIGGER, None);
                    assert_eq!(read_count(efd.as_raw_fd()), 1, "raw: one interrupt");
                }
            }),
            variant("vfiokit", |n| {
                for _ in 0..n {
                    dev.irq_trigger(IRQ_MSIX, 0).expect("vfiokit: trigger");
                    assert_eq!(dev.irq_wait(IRQ_MSIX, 0, -1).expect("vfiokit: wait"), 1);
                }
            }),
        ],
    ));
    // Plain memory, mapped without an fd on both sides (vfiokit sends no fd for map).
    let len = 4096usize;
    let mem = crate::raw::anonymous(len);
    out.extend(run_case(
        "vfio-user DMA map+unmap 4 KiB",
        backend,
        o.rounds,
        batch(o, 1000),
        0,
        vec![
            variant("raw", |n| {
                let mut raw = raw.borrow_mut();
                for _ in 0..n {
                    // DMA_MAP: argsz, flags (read | write), offset, address, size; DMA_UNMAP:
                    // argsz, flags, address, size.
                    let map = [
                        &32u32.to_ne_bytes()[..],
                        &3u32.to_ne_bytes(),
                        &0u64.to_ne_bytes(),
                        &IOVA.to_ne_bytes(),
                        &(len as u64).to_ne_bytes(),
                    ];
                    raw.request(DMA_MAP, &map, None);
                    let unmap = [
                        &24u32.to_ne_bytes()[..],
                        &0u32.to_ne_bytes(),
                        &IOVA.to_ne_bytes(),
                        &(len as u64).to_ne_bytes(),
                    ];
                    raw.request(DMA_UNMAP, &unmap, None);
                }
            }),
            variant("vfiokit", |n| {
                for _ in 0..n {
                    // SAFETY: our anonymous page, unmapped at once.
                    unsafe { iommu.map(mem, len, IOVA) }.expect("vfiokit: map");
                    assert_eq!(iommu.unmap(IOVA, len).expect("vfiokit: unmap"), len as u64);
                }
            }),
        ],
    ));
    out.extend(doorbells(o));
    drop(raw);
    drop(device);
    drop(context);
    raw_server.join().expect("the raw client's model");
    ours_server.join().expect("vfiokit's model");
    // SAFETY: no mapping of it is left.
    unsafe { libc::munmap(mem.cast(), len) };
    out
}
