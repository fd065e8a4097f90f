//! vfiokit against libvfio-user's own sample servers, an implementation of the protocol that
//! shares no code with vfiokit or rust-vmm: `server` (two sparse areas, so the client must take
//! two fds a message; DMA by DMA_WRITE/DMA_READ messages right after an INTx),
//! `gpio-pci-idio-16`, and the project's `doorbell` (doorbell.c: ioeventfds). tests/vfio_user/libvfio-user builds them from Debian's qemu source
//! package and caches them; a test fails (never skips) when they cannot be had.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vfiokit::pci::{DEVICE_PCI, DEVICE_RESET, PCI_CAP_EXTENDED};
use vfiokit::{Device, irq, region};

use crate::{anonymous, setup, socket_path};

/// The directory holding the sample binaries (built on first use).
fn samples() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vfio_user/libvfio-user");
    let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run libvfio-user");
    assert!(
        out.status.success(),
        "{} failed: cannot build libvfio-user's samples",
        script.display()
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A sample serving at a fresh socket, and what it has written to stderr so far (where
/// `server -v` logs; drained by a thread so the sample never blocks on a full pipe).
fn start(sample: &str, args: &[&str], name: &str) -> (Child, PathBuf, Arc<Mutex<String>>) {
    let path = socket_path(name);
    let mut child = Command::new(samples().join(sample))
        .args(args)
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {sample}: {e}"));
    let log = Arc::new(Mutex::new(String::new()));
    let (mut stderr, sink) = (child.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut chunk) {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{sample} did not make its socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, path, log)
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Polls `ready` every 10 ms for up to 10 s (the server acts on its own timer).
fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn libvfio_user_server_sample() {
    let _serial = setup();
    let (mut server, path, log) = start("server", &["-v"], "lvu-server");
    let dev = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap();
    let info = dev.info();
    assert_eq!(info.flags & (DEVICE_PCI | DEVICE_RESET), DEVICE_PCI | DEVICE_RESET);
    assert_eq!((info.num_regions, info.num_irqs), (10, 5));
    assert_eq!((info.vendor_id, info.device_id), (0xdead, 0xbeef));
    assert_eq!((info.subsystem_vendor_id, info.subsystem_id), (0xcafe, 0xbabe));
    // BAR0: 8 bytes, the server's clock, behind messages.
    let bar0 = dev.regions()[0];
    assert_eq!((bar0.size, bar0.num_areas), (8, 0));
    let clock = dev.read_reg::<u64>(0, 0).unwrap() as i64;
    assert!((clock - now()).abs() <= 5, "BAR0 reads {clock}, the time is {}", now());
    // BAR1: two sparse areas with a hole, sent as two fds in one reply.
    let bar1 = dev.regions()[1];
    let areas: Vec<_> = dev.areas()[bar1.first_area as usize..][..bar1.num_areas as usize]
        .iter()
        .map(|a| (a.offset, a.size))
        .collect();
    assert_eq!((bar1.size, areas), (0x3000, vec![(0, 0x1000), (0x2000, 0x1000)]));
    // Written by messages (the server keeps the offset), then read through the mapping.
    dev.write_reg::<u32>(1, 0, 0x1234_5678).unwrap();
    dev.write_reg::<u32>(1, 0x2004, 0x9abc_def0).unwrap();
    let base = dev.map(1).unwrap().as_ptr();
    // SAFETY: inside the two areas of the mapping.
    let mapped = unsafe {
        (base.cast::<u32>().read_volatile(), base.add(0x2004).cast::<u32>().read_volatile())
    };
    assert_eq!(mapped, (0x1234_5678, 0x9abc_def0), "both areas share the server's memory");
    let irqs: Vec<_> = dev.irqs().iter().map(|i| i.count).collect();
    assert_eq!(irqs, [1, 0, 0, 1, 1], "INTx, MSI, MSI-X, ERR, REQ");
    // DMA: two pages without an fd. When the timer set through BAR0 fires, the server raises
    // INTx, then writes its first mapping's first page with 'A' by DMA_WRITE and reads it back
    // by DMA_READ (it exits 1 if the two differ).
    let mem = anonymous(8192);
    let iova = unsafe { dev.iommu().map_any(mem, 8192) }.unwrap();
    dev.irq_enable(irq::IRQ_INTX, 0, 1).unwrap();
    dev.write_reg::<u64>(0, 0, (now() + 2) as u64).unwrap();
    assert_eq!(dev.irq_wait(irq::IRQ_INTX, 0, 10_000).unwrap(), 1);
    // SAFETY: our pages; the server writes them through vfiokit's receiver thread.
    let page = |i: usize| unsafe { std::slice::from_raw_parts(mem.add(i * 4096), 4096) }.to_vec();
    until("the server's DMA_WRITE", || page(0).iter().all(|&b| b == b'A'));
    assert!(page(1).iter().all(|&b| b == 0), "the second page is untouched");
    // The sample takes no request while it waits for a DMA reply (a request then makes it exit
    // 1): its log names the read just before it asks, and the receiver answers at once.
    until("the server's DMA_READ", || log.lock().unwrap().contains("do_dma_io: READ"));
    std::thread::sleep(Duration::from_millis(500));
    dev.reset().unwrap();
    assert_eq!(dev.iommu().unmap(iova, 8192).unwrap(), 8192);
    drop(dev);
    let status = server.wait().unwrap();
    assert!(status.success(), "the server exited with {status} (1: the DMA read-back differed)");
    unsafe { libc::munmap(mem.cast(), 8192) };
    let _ = std::fs::remove_file(&path);
}

#[test]
fn libvfio_user_gpio_sample() {
    let _serial = setup();
    let (mut gpio, path, _) = start("gpio-pci-idio-16", &[], "lvu-gpio");
    let dev = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap();
    assert_eq!((dev.info().vendor_id, dev.info().device_id), (0x494f, 0x0dc8));
    assert_eq!(dev.regions()[2].size, 0x100);
    // Each read of its input register advances a pin counter by a third.
    let pins: Vec<u8> = (0..7).map(|_| dev.read_reg::<u8>(2, 0).unwrap()).collect();
    assert_eq!(pins, [0, 0, 0, 1, 1, 1, 2]);
    dev.write_reg::<u8>(2, 0, 1).unwrap();
    dev.reset().unwrap();
    drop(dev);
    // It serves clients forever.
    gpio.kill().unwrap();
    gpio.wait().unwrap();
    let _ = std::fs::remove_file(&path);
}

/// Config space through the region record, as a driver reaches it: libvfio-user serves every
/// device's config space but leaves READ and WRITE out of the config region's flags (its
/// `vfu_pci_init` sizes the region and never sets them), so the record says what the server
/// does, on the first connection and on the next one (the sample serves one client: a new
/// sample at the same path).
#[test]
fn libvfio_user_config_space() {
    const COMMAND_MEMORY: u16 = 1 << 1;
    const COMMAND_MASTER: u16 = 1 << 2;
    const STATUS_CAP_LIST: u16 = 1 << 4;
    // Power management, MSI, PCI Express, MSI-X; AER (extended).
    const CAPS: [u32; 5] = [0x01, 0x05, 0x10, 0x11, PCI_CAP_EXTENDED + 0x0001];
    let _serial = setup();
    for connection in ["first", "again"] {
        let (mut server, path, _) = start("server", &[], "lvu-config");
        let dev = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap();
        let config = dev.regions()[region::PCI_CONFIG as usize];
        assert_eq!(config.size, 256, "{connection}");
        let rw = region::REGION_PRESENT | region::REGION_READ | region::REGION_WRITE;
        assert_eq!(config.flags & rw, rw, "{connection}: {config:?}");
        let word = |off| dev.read_reg::<u16>(region::PCI_CONFIG, off).unwrap();
        assert_eq!((word(0), word(2)), (0xdead, 0xbeef), "{connection}: vendor and device");
        assert_eq!((word(0x2c), word(0x2e)), (0xcafe, 0xbabe), "{connection}: subsystem");
        // The command register takes memory space and bus master, and reads them back.
        assert_eq!(word(4), 0, "{connection}: command at reset");
        dev.write_reg::<u16>(region::PCI_CONFIG, 4, COMMAND_MEMORY | COMMAND_MASTER).unwrap();
        assert_eq!(word(4), COMMAND_MEMORY | COMMAND_MASTER, "{connection}: command");
        // The sample has no capability list (status bit 4 clear): every walk, standard and
        // extended, answers none instead of failing.
        assert_eq!(word(6) & STATUS_CAP_LIST, 0, "{connection}: status");
        for cap in CAPS {
            assert_eq!(dev.find_capability(cap).unwrap(), None, "{connection}: {cap:#x}");
        }
        drop(dev);
        let status = server.wait().unwrap();
        assert!(status.success(), "{connection}: the server exited with {status}");
        let _ = std::fs::remove_file(&path);
    }
}

/// The doorbell sample's ioeventfds (vfu_create_ioeventfd): a write that matches one (its
/// offset and width, and its datamatch) is a write to its eventfd, with no message; any other
/// write is a REGION_WRITE. The server reads its eventfds when a register is read, after the
/// client's eventfd writes returned, so the counts are exact here.
#[test]
fn libvfio_user_ioeventfds_ring_without_a_message() {
    const ANY: u64 = 0x100;
    const MATCH: u64 = 0x108;
    let _serial = setup();
    let (mut server, path, _) = start("doorbell", &[], "lvu-doorbell");
    let dev = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap();
    let counts = || {
        let read = |off| dev.read_reg::<u64>(0, off).unwrap();
        (read(0x200), read(0x208), read(0x210), read(0x218))
    };
    for value in [1, 0xdead, 0] {
        dev.write_reg::<u32>(0, ANY, value).unwrap();
    }
    assert_eq!(counts(), (3, 0, 0, 0), "any value rings the doorbell at 0x100; none by message");
    dev.write_reg::<u64>(0, MATCH, 0x5a).unwrap();
    assert_eq!(counts(), (3, 1, 0, 0), "the datamatch rings the doorbell at 0x108");
    dev.write_reg::<u64>(0, MATCH, 0x5b).unwrap();
    assert_eq!(counts(), (3, 1, 1, 0x5b), "another value goes by message");
    dev.write_reg::<u16>(0, ANY, 7).unwrap();
    dev.write_reg::<u32>(0, ANY + 4, 8).unwrap();
    assert_eq!(counts(), (3, 1, 3, 8), "another width or offset goes by message");
    drop(dev);
    let status = server.wait().unwrap();
    assert!(status.success(), "the server exited with {status}");
    let _ = std::fs::remove_file(&path);
}
