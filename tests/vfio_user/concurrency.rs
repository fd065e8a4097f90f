//! Many threads on one connection: whichever of them finds the socket unread reads it for
//! all, serving the server's DMA requests it meets and delivering the others' replies, then
//! hands the reading on. A scripted server makes DMA requests before it answers (so a waiting
//! call must serve them) and between answers (so the receiver thread must), on the main
//! socket or the twin; and it dies, stalls, or sees the device closed with calls in flight.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vfiokit::{Device, Iommu, IommuKind};

use crate::scripted::{self, Header, Peer};
use crate::{anonymous, setup, socket_path};

const REGION_READ: u16 = 9;
const DEVICE_GET_REGION_INFO: u16 = 5;
const THREADS: u64 = 8;
const READS: u64 = 200;
/// The DMA slots the server writes: u64s of the mapped page.
const SLOTS: u64 = 512;

/// What the server returns for a 4-byte read at `offset` of region 0.
fn value_at(offset: u64) -> u32 {
    (offset as u32).wrapping_mul(2_654_435_761) ^ 0x5a5a_5a5a
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// VERSION (with a twin socket when `twin`), the map made before the device, DEVICE_GET_INFO
/// (a PCI device with one region and no IRQs) and region 0's information (1 MiB, read and
/// write, no mmap). Returns the twin's server end.
fn open_one_region_device(peer: &mut Peer, twin: bool) -> Option<Peer> {
    let (h, _) = peer.expect(scripted::VERSION);
    let theirs = match twin {
        true => {
            let json = r#"{"capabilities":{"max_msg_fds":8,"twin_socket":{"supported":true,"fd_index":0}}}"#;
            Some(peer.reply_version_with_twin(h, json))
        }
        false => {
            let payload =
                [&[0u8, 0, 1, 0][..], br#"{"capabilities":{"max_msg_fds":8}}"#, &[0]].concat();
            peer.reply(h, &payload);
            None
        }
    };
    let (h, _) = peer.expect(scripted::DMA_MAP);
    peer.reply(h, &[]);
    let (h, _) = peer.expect(scripted::DEVICE_GET_INFO);
    peer.reply(h, &u32s(&[16, 0b11, 1, 0]));
    let (h, _) = peer.expect(DEVICE_GET_REGION_INFO);
    let mut info = u32s(&[32, 0b11, 0, 0]);
    info.extend((1u64 << 20).to_ne_bytes());
    info.extend(0u64.to_ne_bytes());
    peer.reply(h, &info);
    theirs
}

/// The busy server's account of its run.
#[derive(Debug, Default)]
struct Account {
    reads: u64,
    dma_requests: u64,
    errors: Vec<String>,
}

/// Answers REGION_READs of region 0 with [`value_at`], making DMA requests to `iova` as it
/// goes: before every third answer a DMA_WRITE of a counter to a slot, waited for (the
/// caller must serve it to get its answer); after every fifth a DMA_WRITE not waited for
/// (served whenever and by whoever reads); before every seventh a DMA_READ of the slot last
/// written, checked. At the client's DEVICE_RESET it reads every slot back, then answers.
fn busy_server(peer: &mut Peer, mut twin: Option<Peer>, iova: u64) -> Account {
    let mut account = Account::default();
    let mut queued: VecDeque<(Header, Vec<u8>)> = VecDeque::new();
    let mut next_id = 1000u16;
    let mut counter = 0u64;
    // Slot -> value last written; DMA request id -> (slot, value) written or expected.
    let mut slots: HashMap<u64, u64> = HashMap::new();
    let mut outstanding: HashMap<u16, (u16, u64, u64)> = HashMap::new();
    // Sends a DMA request; its reply is checked when it comes (see `settle`).
    macro_rules! dma {
        ($command:expr, $slot:expr, $value:expr) => {{
            let id = next_id;
            next_id = next_id.wrapping_add(1);
            let at = iova + $slot * 8;
            let payload = match $command {
                scripted::DMA_WRITE => {
                    [&at.to_ne_bytes()[..], &8u64.to_ne_bytes(), &$value.to_ne_bytes()].concat()
                }
                _ => [&at.to_ne_bytes()[..], &8u64.to_ne_bytes()].concat(),
            };
            let on = twin.as_mut().unwrap_or(&mut *peer);
            on.send(id, $command, 0, 0, &payload);
            outstanding.insert(id, ($command, $slot, $value));
            account.dma_requests += 1;
            id
        }};
    }
    let check = |account: &mut Account,
                 outstanding: &mut HashMap<u16, (u16, u64, u64)>,
                 h: Header,
                 data: &[u8]| {
        let Some((command, slot, value)) = outstanding.remove(&h.id) else {
            account.errors.push(format!("a reply to no DMA request: {h:?}"));
            return;
        };
        if h.flags & scripted::ERROR != 0 || h.command != command {
            account.errors.push(format!("DMA request {} failed: {h:?}", h.id));
        } else if command == scripted::DMA_READ && (data.len() != 24 || u64_at(data, 16) != value) {
            account.errors.push(format!("slot {slot} read {data:?}, {value} expected"));
        }
    };
    // Reads until the DMA request `id` is answered, queueing the client's commands.
    macro_rules! settle {
        ($id:expr) => {{
            while outstanding.contains_key(&$id) {
                let from_twin = twin.is_some();
                let got = match twin.as_mut() {
                    Some(t) => t.recv(),
                    None => peer.recv(),
                };
                let Some((h, data)) = got else { return account };
                if h.flags & scripted::REPLY != 0 {
                    check(&mut account, &mut outstanding, h, &data);
                } else if from_twin {
                    account.errors.push(format!("a command on the twin: {h:?}"));
                } else {
                    queued.push_back((h, data));
                }
            }
        }};
    }
    loop {
        let (h, data) = match queued.pop_front() {
            Some(next) => next,
            None => match peer.recv() {
                Some(next) => next,
                None => return account,
            },
        };
        if h.flags & scripted::REPLY != 0 {
            // The reply to a DMA request not waited for (main socket only).
            check(&mut account, &mut outstanding, h, &data);
            continue;
        }
        match h.command {
            REGION_READ => {
                let (offset, count) =
                    (u64_at(&data, 0), u32::from_ne_bytes(data[12..16].try_into().unwrap()));
                account.reads += 1;
                let n = account.reads;
                if n % 3 == 0 {
                    counter += 1;
                    let slot = counter % SLOTS;
                    let id = dma!(scripted::DMA_WRITE, slot, counter);
                    slots.insert(slot, counter);
                    settle!(id);
                }
                if n % 7 == 0
                    && let Some((&slot, &value)) = slots.iter().next()
                {
                    let id = dma!(scripted::DMA_READ, slot, value);
                    settle!(id);
                }
                let reply =
                    [&data[..16], &value_at(offset).to_ne_bytes()[..count as usize]].concat();
                peer.reply(h, &reply);
                if n % 5 == 0 {
                    counter += 1;
                    let slot = counter % SLOTS;
                    dma!(scripted::DMA_WRITE, slot, counter);
                    slots.insert(slot, counter);
                }
            }
            scripted::DEVICE_RESET => {
                // Every write not waited for is in before the slots are read back.
                let pending: Vec<u16> = outstanding.keys().copied().collect();
                for id in pending {
                    settle!(id);
                }
                let all: Vec<(u64, u64)> = slots.iter().map(|(&s, &v)| (s, v)).collect();
                for (slot, value) in all {
                    let id = dma!(scripted::DMA_READ, slot, value);
                    settle!(id);
                }
                peer.reply(h, &[]);
            }
            other => account.errors.push(format!("unexpected command {other}")),
        }
    }
}

/// Runs [`busy_server`] against `THREADS` threads reading in parallel, and checks every
/// answer, every DMA request served, and the memory the server wrote.
fn many_threads_against_the_busy_server(name: &str, twin: bool) {
    let _serial = setup();
    let page = 4096;
    let mem = anonymous(page);
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    let iova = unsafe { iommu.map_any(mem, page) }.unwrap();
    let path = socket_path(name);
    let (account_tx, account_rx) = mpsc::channel();
    let server = scripted::serve(&path, move |peer| {
        let theirs = open_one_region_device(peer, twin);
        account_tx.send(busy_server(peer, theirs, iova)).unwrap();
    });
    let dev = Device::open(&format!("vfio-user:{}", path.display()), Some(&iommu)).unwrap();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let dev = &dev;
            s.spawn(move || {
                for i in 0..READS {
                    let offset = (t * READS + i) * 4;
                    assert_eq!(
                        dev.read_reg::<u32>(0, offset).unwrap(),
                        value_at(offset),
                        "{t}/{i}"
                    );
                }
            });
        }
    });
    // The server reads every slot back (checked on its side) before it answers.
    dev.reset().unwrap();
    drop(dev);
    server.join().unwrap();
    let account = account_rx.recv().unwrap();
    assert_eq!(account.errors, Vec::<String>::new());
    assert_eq!(account.reads, THREADS * READS);
    assert!(account.dma_requests > THREADS * READS / 2, "{account:?}");
    drop(iommu);
    unsafe { libc::munmap(mem.cast(), page) };
}

#[test]
fn many_threads_share_a_socket_the_server_also_sends_on() {
    many_threads_against_the_busy_server("busy-main", false);
}

#[test]
fn many_threads_share_a_socket_while_the_twin_carries_the_servers_requests() {
    many_threads_against_the_busy_server("busy-twin", true);
}

/// `THREADS` threads each make one call, answered by nothing; `after` ends it (the server
/// dies, or the device is closed). Returns each call's error and how long the calls took.
fn stalled_calls(
    name: &str,
    end: impl FnOnce(&mut Peer) + Send + 'static,
    close: bool,
) -> (Vec<vfiokit::Error>, Duration) {
    let path = socket_path(name);
    let server = scripted::serve(&path, move |peer| {
        peer.open_bare_device();
        // Every thread's request is in: the one reading and the ones parked.
        for _ in 0..THREADS {
            peer.expect(scripted::DEVICE_RESET);
        }
        end(peer);
        peer.until_closed();
    });
    let dev = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap();
    let started = Instant::now();
    let errors = std::thread::scope(|s| {
        let calls: Vec<_> = (0..THREADS).map(|_| s.spawn(|| dev.reset().unwrap_err())).collect();
        if close {
            std::thread::sleep(Duration::from_millis(200));
            dev.cancel_waits();
        }
        calls.into_iter().map(|c| c.join().unwrap()).collect::<Vec<_>>()
    });
    let took = started.elapsed();
    drop(dev);
    server.join().unwrap();
    (errors, took)
}

#[test]
fn a_server_that_dies_wakes_every_waiting_call() {
    let _serial = setup();
    let (errors, took) = stalled_calls(
        "dies",
        |peer| peer.stream.shutdown(std::net::Shutdown::Both).unwrap(),
        false,
    );
    for e in &errors {
        assert_eq!(e.errno(), libc::ECONNRESET, "{e}");
    }
    // Not the 1.5 s timeout: the reader saw the end, and woke the others.
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[test]
fn closing_the_device_ends_every_call_in_flight() {
    let _serial = setup();
    let (errors, took) = stalled_calls("close", |_| {}, true);
    for e in &errors {
        assert_eq!(e.errno(), libc::ECANCELED, "{e}");
    }
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[test]
fn a_stalled_server_times_out_every_call() {
    let _serial = setup();
    let (errors, took) = stalled_calls("stalls", |_| {}, false);
    for e in &errors {
        assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
        assert!(e.message().contains("DEVICE_RESET"), "{e}");
    }
    // The 1.5 s of VFIOKIT_VFIO_USER_TIMEOUT_MS (set by setup), a tick or so late at most.
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_millis(2500), "{took:?}");
}

/// A server request with no call in flight: right after a call (drained by that call when it
/// came in the same receive as its reply, else served by the receiver once its watch is armed
/// at the next tick) and on a connection idle since (the watch armed already).
#[test]
fn a_request_between_calls_is_served_by_the_receiver() {
    let _serial = setup();
    let page = 4096;
    let mem = anonymous(page);
    unsafe { std::ptr::write_bytes(mem, 0x33, page) };
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    let iova = unsafe { iommu.map_any(mem, page) }.unwrap();
    let (took_tx, took_rx) = mpsc::channel();
    let path = socket_path("between");
    let server = scripted::serve(&path, move |peer| {
        peer.handshake_with("");
        let (h, _) = peer.expect(scripted::DMA_MAP);
        peer.reply(h, &[]);
        peer.answer_device_info();
        let read = [&iova.to_ne_bytes()[..], &8u64.to_ne_bytes()].concat();
        let served = |peer: &mut Peer, id: u16| {
            let sent = Instant::now();
            peer.send(id, scripted::DMA_READ, 0, 0, &read);
            let (h, data) = peer.recv().unwrap();
            assert_eq!((h.id, h.flags & scripted::ERROR), (id, 0), "{h:?}");
            assert_eq!(&data[16..], &[0x33; 8]);
            sent.elapsed()
        };
        let (h, _) = peer.expect(scripted::DEVICE_RESET);
        peer.reply(h, &[]);
        let right_after = served(peer, 1);
        std::thread::sleep(Duration::from_millis(100));
        let idle = served(peer, 2);
        took_tx.send((right_after, idle)).unwrap();
        peer.until_closed();
    });
    let dev = Device::open(&format!("vfio-user:{}", path.display()), Some(&iommu)).unwrap();
    dev.reset().unwrap();
    let (right_after, idle) = took_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // A tick is 4 ms; the bounds leave room for a busy host.
    assert!(right_after < Duration::from_millis(100), "{right_after:?}");
    assert!(idle < Duration::from_millis(100), "{idle:?}");
    drop(dev);
    server.join().unwrap();
    drop(iommu);
    unsafe { libc::munmap(mem.cast(), page) };
}
