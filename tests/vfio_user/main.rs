//! vfiokit driving devices served over vfio-user: a device model behind rust-vmm's server
//! (model.rs, edu to a driver), libvfio-user's sample servers (libvfio_user.rs), and scripted
//! servers that break the protocol. On the host: no root, no IOMMU.

mod concurrency;
mod heap;
mod libvfio_user;
mod model;
mod scripted;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, Once};

use vfiokit::{DMA_READONLY, Device, Iommu, IommuKind, irq, region};

use model::*;

/// A socket path nobody uses yet, in a directory removed with the process's temp files.
fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vfiokit-vfio-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// Serializes the tests (the fd count is process-wide) and sets the reply timeout: short, so
/// the stalled-server cases end quickly; every other reply comes at once.
fn setup() -> MutexGuard<'static, ()> {
    static ONCE: Once = Once::new();
    static SERIAL: Mutex<()> = Mutex::new(());
    ONCE.call_once(|| unsafe { std::env::set_var("VFIOKIT_VFIO_USER_TIMEOUT_MS", "1500") });
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A model device served at a fresh socket, opened in `iommu` (or its own context).
fn open_model(name: &str, iommu: Option<&Iommu>) -> (Device, std::thread::JoinHandle<()>) {
    let path = socket_path(name);
    let server = serve(&path);
    let dev =
        Device::open(&format!("vfio-user:{}", path.display()), iommu).expect("open the model");
    (dev, server)
}

/// `len` bytes of fresh private memory, not from vfiokit (so mapped without an fd).
fn anonymous(len: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn records_describe_the_served_device() {
    let _serial = setup();
    let (dev, server) = open_model("records", None);
    assert_eq!(dev.iommu().kind(), IommuKind::VfioUser);
    assert!(dev.address().starts_with("vfio-user:/"));
    let info = dev.info();
    assert_eq!((info.vendor_id, info.device_id, info.class_code), (0x1234, 0x11e8, 0x00ff00));
    assert_eq!(info.num_regions, 8);
    let bar0 = dev.regions()[0];
    assert_eq!((bar0.size, bar0.num_areas), (BAR0_LEN, 0));
    assert_ne!(bar0.flags & region::REGION_WRITE, 0);
    assert_eq!(dev.regions()[1].flags & region::REGION_PRESENT, 0);
    let bar2 = dev.regions()[2];
    let areas: Vec<_> = dev.areas()[bar2.first_area as usize..][..bar2.num_areas as usize]
        .iter()
        .map(|a| (a.offset, a.size))
        .collect();
    assert_eq!(areas, [(0, HOLE.0), (HOLE.1, RAM_LEN as u64 - HOLE.1)]);
    let bar4 = dev.regions()[4];
    assert_eq!((bar4.size, bar4.num_areas), (ROM_LEN as u64, 1));
    assert_eq!(bar4.flags & (region::REGION_READ | region::REGION_WRITE), region::REGION_READ);
    assert_eq!(dev.irqs()[irq::IRQ_MSIX as usize].count, 4);
    // The escape hatches say there is no kernel fd rather than hand out the socket.
    assert_eq!(dev.fd().unwrap_err().errno(), libc::ENOTSUP);
    assert_eq!(dev.iommu().fd().unwrap_err().errno(), libc::ENOTSUP);
    drop(dev);
    server.join().unwrap();
}

#[test]
fn registers_go_through_messages() {
    let _serial = setup();
    let (dev, server) = open_model("registers", None);
    assert_eq!(dev.read_reg::<u32>(0, 0).unwrap(), ID);
    dev.write_reg::<u32>(0, REG_LIVENESS, 0x1234_5678).unwrap();
    assert_eq!(dev.read_reg::<u32>(0, REG_LIVENESS).unwrap(), !0x1234_5678u32);
    // BAR0 has no mmappable area: map refuses, accessors keep working.
    assert_eq!(dev.map(0).unwrap_err().errno(), libc::ENOTSUP);
    // The server's refusal is this call's error only.
    let refused = dev.read_reg::<u32>(0, REG_REFUSED).unwrap_err();
    assert_eq!(refused.errno(), libc::EIO, "{refused}");
    assert!(refused.message().contains("REGION_READ"), "{refused}");
    assert_eq!(dev.read_reg::<u32>(0, 0).unwrap(), ID);
    // Checked before any message: out of range, misaligned.
    assert_eq!(dev.read_reg::<u32>(0, BAR0_LEN).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(dev.read_reg::<u32>(0, 2).unwrap_err().errno(), libc::EINVAL);
    // Config space through messages, and a reset the server sees.
    let mut vendor = [0u8; 2];
    dev.read(region::PCI_CONFIG, 0, &mut vendor).unwrap();
    assert_eq!(u16::from_le_bytes(vendor), 0x1234);
    dev.reset().unwrap();
    assert_eq!(dev.read_reg::<u64>(0, REG_RESETS).unwrap(), 1);
    drop(dev);
    server.join().unwrap();
}

#[test]
fn sparse_areas_map_the_servers_memory() {
    let _serial = setup();
    let (dev, server) = open_model("sparse", None);
    let base = dev.map(2).unwrap().as_ptr();
    // Written through our mapping, seen by the server in its own.
    unsafe { base.add(0x100).cast::<u32>().write_volatile(0xfeed_f00d) };
    dev.write_reg::<u32>(0, REG_PEEK_OFF, 0x100).unwrap();
    assert_eq!(dev.read_reg::<u32>(0, REG_PEEK).unwrap(), 0xfeed_f00d);
    // The second area too, and the accessors take the mapping there.
    dev.write_reg::<u32>(2, HOLE.1 + 8, 0xabcd_0123).unwrap();
    assert_eq!(unsafe { base.add(HOLE.1 as usize + 8).cast::<u32>().read_volatile() }, 0xabcd_0123);
    // The hole between the areas is reached by messages, larger than one transfer too.
    let pattern: Vec<u8> = (0..HOLE.1 - HOLE.0).map(|i| (i * 7) as u8).collect();
    dev.write(2, HOLE.0, &pattern).unwrap();
    let mut back = vec![0u8; pattern.len()];
    dev.read(2, HOLE.0, &mut back).unwrap();
    assert_eq!(back, pattern);
    dev.write_reg::<u32>(0, REG_PEEK_OFF, HOLE.0 as u32 + 4).unwrap();
    assert_eq!(
        dev.read_reg::<u32>(0, REG_PEEK).unwrap(),
        u32::from_ne_bytes(pattern[4..8].try_into().unwrap())
    );
    drop(dev);
    server.join().unwrap();
}

#[test]
fn map_info_says_what_goes_straight_through_the_mapping() {
    let _serial = setup();
    let (dev, server) = open_model("map-info", None);
    // BAR4: read-only, one area covering it: reads go straight through a read-only mapping.
    let rom = dev.map_info(4).unwrap();
    assert_eq!(rom.addr, dev.map(4).unwrap().as_ptr().cast());
    assert_eq!(
        (rom.len, rom.direct, rom.access),
        (ROM_LEN as u64, ROM_LEN as u64, region::REGION_READ)
    );
    assert_eq!(unsafe { rom.addr.cast::<u32>().add(3).read_volatile() }, ROM_BASE + 3);
    assert_eq!(dev.read_reg::<u32>(4, 8).unwrap(), ROM_BASE + 2);
    // A store the mapping does not permit is the accessor's error, not a fault.
    assert_eq!(dev.write_reg::<u32>(4, 8, 1).unwrap_err().errno(), libc::EACCES);
    // BAR2: two areas with a hole, so nothing is direct; readable and writable.
    let ram = dev.map_info(2).unwrap();
    let rw = region::REGION_READ | region::REGION_WRITE;
    assert_eq!((ram.len, ram.direct, ram.access), (RAM_LEN as u64, 0, rw));
    // BAR0 cannot be mapped, and a missing region is not there.
    assert_eq!(dev.map_info(0).unwrap_err().errno(), libc::ENOTSUP);
    assert_eq!(dev.map_info(1).unwrap_err().errno(), libc::EINVAL);
    drop(dev);
    server.join().unwrap();
}

#[test]
fn registers_are_checked_once() {
    let _serial = setup();
    let (dev, server) = open_model("register", None);
    // BAR2's first area: a write through the handle is seen by the server and by read_reg.
    let reg = dev.register::<u32>(2, 0x40).unwrap();
    reg.write(0x1234_5678);
    assert_eq!(reg.read(), 0x1234_5678);
    assert_eq!(dev.read_reg::<u32>(2, 0x40).unwrap(), 0x1234_5678);
    dev.write_reg::<u32>(0, REG_PEEK_OFF, 0x40).unwrap();
    assert_eq!(dev.read_reg::<u32>(0, REG_PEEK).unwrap(), 0x1234_5678);
    let wide = dev.register::<u64>(2, HOLE.1).unwrap();
    wide.write(0x0123_4567_89ab_cdef);
    assert_eq!(dev.read_reg::<u64>(2, HOLE.1).unwrap(), 0x0123_4567_89ab_cdef);
    // What the handle cannot take: BAR4 (read-only, as write_reg says), BAR2's hole and BAR0
    // (no mmappable area), a misaligned or out-of-range offset, a missing region.
    let refused = dev.register::<u32>(4, 8).unwrap_err();
    assert_eq!(refused.errno(), libc::EACCES);
    assert_eq!(refused.message(), dev.write_reg::<u32>(4, 8, 1).unwrap_err().message());
    let errno = |r: vfiokit::Result<vfiokit::Register<'_, u32>>| r.err().map(|e| e.errno());
    assert_eq!(errno(dev.register(2, HOLE.0)), Some(libc::ENOTSUP));
    assert_eq!(errno(dev.register(0, 0)), Some(libc::ENOTSUP));
    assert_eq!(errno(dev.register(2, 2)), Some(libc::EINVAL));
    assert_eq!(errno(dev.register(2, RAM_LEN as u64)), Some(libc::EINVAL));
    assert_eq!(errno(dev.register(1, 0)), Some(libc::EINVAL));
    drop(dev);
    server.join().unwrap();
}

#[test]
fn irqs_are_eventfds_the_server_signals() {
    let _serial = setup();
    let (dev, server) = open_model("irqs", None);
    // Four vectors to a server that takes one fd per message: sent in four.
    let fds = dev.irq_enable(irq::IRQ_MSIX, 0, 4).unwrap();
    assert_eq!(fds.len(), 4);
    dev.write_reg::<u32>(0, REG_RAISE_MSIX, 2).unwrap();
    assert_eq!(dev.irq_wait(irq::IRQ_MSIX, 2, 2000).unwrap(), 1);
    assert_eq!(dev.irq_wait(irq::IRQ_MSIX, 3, 50).unwrap_err().errno(), libc::ETIMEDOUT);
    dev.irq_trigger(irq::IRQ_MSIX, 3).unwrap();
    assert_eq!(dev.irq_wait(irq::IRQ_MSIX, 3, 2000).unwrap(), 1);
    // The caller's own eventfd, re-routed.
    let own = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    dev.irq_enable_fds(irq::IRQ_MSIX, 1, &[unsafe { BorrowedFd::borrow_raw(own) }]).unwrap();
    dev.write_reg::<u32>(0, REG_RAISE_MSIX, 1).unwrap();
    let mut count = 0u64;
    assert_eq!(unsafe { libc::read(own, (&raw mut count).cast(), 8) }, 8);
    assert_eq!(count, 1);
    unsafe { libc::close(own) };
    dev.irq_disable(irq::IRQ_MSIX).unwrap();
    assert_eq!(dev.irq_wait(irq::IRQ_MSIX, 2, 0).unwrap_err().errno(), libc::EINVAL);
    drop(dev);
    server.join().unwrap();
}

/// Copies `len` bytes from IOVA `src` to IOVA `dst` through the model's buffer, as two edu
/// transfers each ending in an interrupt (MSI-X vector 0); returns the first error.
fn dma(dev: &Device, src: u64, dst: u64, len: u64) -> u64 {
    let transfer = |from: u64, to: u64, cmd: u64| {
        dev.write_reg(0, REG_DMA_SRC, from).unwrap();
        dev.write_reg(0, REG_DMA_DST, to).unwrap();
        dev.write_reg(0, REG_DMA_COUNT, len).unwrap();
        dev.write_reg(0, REG_DMA_CMD, cmd | DMA_START | DMA_IRQ).unwrap();
        assert_eq!(dev.irq_wait(irq::IRQ_MSIX, 0, 2000).unwrap(), 1);
        dev.write_reg(0, REG_IRQ_ACK, IRQ_DMA).unwrap();
        dev.read_reg::<u64>(0, REG_DMA_ERROR).unwrap()
    };
    match transfer(src, BUFFER, 0) {
        0 => transfer(BUFFER, dst, DMA_TO_RAM),
        e => e,
    }
}

/// edu's factorial with its MSI, and INTx automasked until unmasked, as the kernel makes it.
#[test]
fn the_model_is_edu_to_a_driver() {
    let _serial = setup();
    let (dev, server) = open_model("edu", None);
    dev.irq_enable(irq::IRQ_MSI, 0, 1).unwrap();
    dev.write_reg::<u32>(0, REG_STATUS, STATUS_IRQ_FACT).unwrap();
    dev.write_reg::<u32>(0, REG_FACTORIAL, 10).unwrap();
    assert_eq!(dev.irq_wait(irq::IRQ_MSI, 0, 2000).unwrap(), 1);
    assert_eq!(dev.read_reg::<u32>(0, REG_IRQ_STATUS).unwrap(), IRQ_FACT);
    assert_eq!(dev.read_reg::<u32>(0, REG_FACTORIAL).unwrap(), 3_628_800);
    dev.write_reg::<u32>(0, REG_IRQ_ACK, IRQ_FACT).unwrap();
    dev.irq_disable(irq::IRQ_MSI).unwrap();
    dev.irq_enable(irq::IRQ_INTX, 0, 1).unwrap();
    dev.write_reg::<u32>(0, REG_IRQ_RAISE, 1).unwrap();
    assert_eq!(dev.irq_wait(irq::IRQ_INTX, 0, 2000).unwrap(), 1);
    dev.write_reg::<u32>(0, REG_IRQ_ACK, 1).unwrap();
    dev.write_reg::<u32>(0, REG_IRQ_RAISE, 2).unwrap();
    let held = dev.irq_wait(irq::IRQ_INTX, 0, 100).unwrap_err();
    assert_eq!(held.errno(), libc::ETIMEDOUT, "masked: {held}");
    dev.irq_unmask(irq::IRQ_INTX, 0).unwrap();
    assert_eq!(dev.irq_wait(irq::IRQ_INTX, 0, 2000).unwrap(), 1);
    assert_eq!(dev.read_reg::<u32>(0, REG_IRQ_STATUS).unwrap(), 2);
    drop(dev);
    server.join().unwrap();
}

#[test]
fn dma_buffers_reach_the_server_by_fd() {
    let _serial = setup();
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    // Allocated before the device: sent to it when it attaches.
    let (src, src_iova) = iommu.alloc(4096).unwrap();
    unsafe { std::ptr::write_bytes(src.as_ptr(), 0x5a, 4096) };
    let (dev, server) = open_model("dma", Some(&iommu));
    dev.irq_enable(irq::IRQ_MSIX, 0, 1).unwrap();
    // Allocated after: sent at once.
    let (dst, dst_iova) = iommu.alloc(4096).unwrap();
    assert_eq!(dma(&dev, src_iova, dst_iova, 4096), 0);
    assert!(unsafe { std::slice::from_raw_parts(dst.as_ptr(), 4096) }.iter().all(|&b| b == 0x5a));
    assert_eq!(iommu.translate(unsafe { dst.as_ptr().add(10) }, 1).unwrap(), dst_iova + 10);
    // A read-only buffer: the device may read it, not write it.
    let (ro, ro_iova) = iommu.alloc_flags(4096, DMA_READONLY).unwrap();
    assert_eq!(dma(&dev, src_iova, ro_iova, 4096), libc::EFAULT as u64);
    assert!(unsafe { std::slice::from_raw_parts(ro.as_ptr(), 4096) }.iter().all(|&b| b == 0));
    assert_eq!(dma(&dev, ro_iova, dst_iova, 4096), 0);
    // Freed: the server no longer reaches it.
    iommu.free(src.as_ptr()).unwrap();
    assert_eq!(dma(&dev, src_iova, dst_iova, 16), libc::EFAULT as u64);
    drop(dev);
    server.join().unwrap();
}

/// map_file: the server is given the caller's file and the offset of the mapping in it, and
/// its DMA reads and writes the file's pages there.
#[test]
fn file_mappings_reach_the_server_at_their_offset() {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    let _serial = setup();
    let (dev, server) = open_model("dma-file", None);
    dev.irq_enable(irq::IRQ_MSIX, 0, 1).unwrap();
    let iommu = dev.iommu();
    // SAFETY: plain syscalls; the fd is checked before it is owned.
    let file = unsafe {
        let fd = libc::memfd_create(c"vfiokit-test-file".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0 && libc::ftruncate(fd, 4 * 4096) == 0);
        OwnedFd::from_raw_fd(fd)
    };
    let marks = [b'a', b'b', b'c', b'd'].map(|m| [m; 4096]);
    for (page, mark) in marks.iter().enumerate() {
        // SAFETY: writes 4096 bytes from mark.
        let n = unsafe {
            libc::pwrite(file.as_raw_fd(), mark.as_ptr().cast(), 4096, page as i64 * 4096)
        };
        assert_eq!(n, 4096);
    }
    let (m, iova) = iommu.map_file(file.as_fd(), 2 * 4096, 2 * 4096, 0).unwrap();
    // The server copies the mapping's first page (the file's third) over its second.
    assert_eq!(dma(&dev, iova, iova + 4096, 4096), 0);
    let mut back = [0u8; 4096];
    // SAFETY: reads 4096 bytes into back.
    let n = unsafe { libc::pread(file.as_raw_fd(), back.as_mut_ptr().cast(), 4096, 3 * 4096) };
    assert_eq!((n, back), (4096, marks[2]), "the file's fourth page holds its third");
    iommu.free(m.as_ptr()).unwrap();
    assert_eq!(dma(&dev, iova, iova + 4096, 16), libc::EFAULT as u64, "unmapped at the server");
    drop(dev);
    server.join().unwrap();
}

/// The leak cycles, as the guest suite runs them on kernel devices: open, map a BAR, enable
/// IRQs, allocate and map DMA memory, close; fds and mappings come back to where they were.
#[test]
fn cycles_leak_nothing() {
    let _serial = setup();
    // Shared or file-backed mappings only, as every mapping vfiokit makes here is (the
    // server's memfd BAR, memfd DMA buffers): libtest starts a thread for each test as
    // another ends, and those threads' stacks (private, anonymous) come and go meanwhile.
    let maps = || {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields[1].contains('s') || fields.len() > 5
            })
            .count()
    };
    let page = 4096;
    let mem = anonymous(page);
    let cycle = |i: usize| {
        let (dev, server) = open_model(&format!("cycle-{i}"), None);
        dev.map(2).unwrap();
        dev.irq_enable(irq::IRQ_MSIX, 0, 4).unwrap();
        let (buf, _) = dev.iommu().alloc(8192).unwrap();
        unsafe { buf.as_ptr().write(1) };
        let iova = unsafe { dev.iommu().map_any(mem, page) }.unwrap();
        assert_eq!(dev.iommu().unmap(iova, page).unwrap(), page as u64);
        drop(dev);
        server.join().unwrap();
    };
    // Warm up once so lazily created process state is not counted.
    cycle(0);
    let before = (open_fds(), maps());
    for i in 1..=100 {
        cycle(i);
    }
    assert_eq!((open_fds(), maps()), before);
    unsafe { libc::munmap(mem.cast(), page) };
}

#[test]
fn kernel_and_user_contexts_do_not_mix() {
    let _serial = setup();
    let path = socket_path("mix");
    let iommu = Iommu::open(vfiokit::IommuKind::Type1);
    // Opening a type1 context needs /dev/vfio/vfio; where there is one, the mix is refused.
    if let Ok(iommu) = iommu {
        let e = Device::open(&format!("vfio-user:{}", path.display()), Some(&iommu)).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
    }
    let e = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert!(e.message().contains("server running"), "{e}");
}

/// The calls that take kernel fds are refused on a vfio-user context, with why; so is a live
/// handover.
#[test]
fn fd_calls_are_refused_on_a_vfio_user_context() {
    let _serial = setup();
    let (dev, server) = open_model("kinds", None);
    let e = dev.fd().unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
    let mut sv = [0; 2];
    // SAFETY: sv has room for the two fds.
    assert_eq!(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) },
        0
    );
    // SAFETY: the kernel just made these fds ours.
    let (sock, _peer) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    let e = dev.iommu().export(&[], sock.as_fd()).unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
    assert!(e.message().contains("connects to the device servers"), "{e}");
    let e = dev.iommu().hand_over(&[&dev], sock.as_fd()).unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
    assert!(e.message().contains("cannot be handed over live"), "{e}");
    drop(dev);
    server.join().unwrap();
}

#[test]
fn a_server_sees_one_open_per_context() {
    let _serial = setup();
    let (dev, server) = open_model("twice", None);
    let e = Device::open(dev.address(), Some(dev.iommu())).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    drop(dev);
    server.join().unwrap();
}

/// A bare device served by `script` after VERSION and DEVICE_GET_INFO.
fn open_scripted(
    name: &str,
    iommu: Option<&Iommu>,
    script: impl FnOnce(&mut scripted::Peer) + Send + 'static,
) -> (Device, std::thread::JoinHandle<()>) {
    let path = socket_path(name);
    let server = scripted::serve(&path, move |peer| {
        peer.open_bare_device();
        script(peer);
    });
    let dev = Device::open(&format!("vfio-user:{}", path.display()), iommu).expect("open");
    (dev, server)
}

/// `script` answers the first reset; the reset's error, then a second reset's.
fn reset_against(
    name: &str,
    script: impl FnOnce(&mut scripted::Peer, scripted::Header) + Send + 'static,
) -> (vfiokit::Error, vfiokit::Error) {
    let (dev, server) = open_scripted(name, None, move |peer| {
        let (h, _) = peer.expect(scripted::DEVICE_RESET);
        script(peer, h);
        peer.until_closed();
    });
    let first = dev.reset().unwrap_err();
    let second = dev.reset().unwrap_err();
    drop(dev);
    server.join().unwrap();
    (first, second)
}

#[test]
fn a_dead_server_fails_every_call_with_econnreset() {
    let _serial = setup();
    let (first, second) =
        reset_against("dead", |peer, _| peer.stream.shutdown(std::net::Shutdown::Both).unwrap());
    assert_eq!(first.errno(), libc::ECONNRESET, "{first}");
    assert_eq!(second, first);
}

#[test]
fn a_stalled_server_times_out() {
    let _serial = setup();
    let (first, second) = reset_against("stalled", |_, _| {});
    assert_eq!(first.errno(), libc::ETIMEDOUT, "{first}");
    assert!(first.message().contains("DEVICE_RESET"), "{first}");
    assert_eq!(second, first);
}

#[test]
fn cancel_ends_a_call_waiting_for_a_stalled_server() {
    let _serial = setup();
    let (dev, server) = open_scripted("cancel", None, |peer| {
        peer.expect(scripted::DEVICE_RESET);
        peer.until_closed();
    });
    let e = std::thread::scope(|s| {
        let call = s.spawn(|| dev.reset().unwrap_err());
        // Cancelled while the reset is waiting for its reply (or, if the thread is slow to
        // start, before it is sent: either way it ends with ECANCELED).
        std::thread::sleep(std::time::Duration::from_millis(100));
        dev.cancel_waits();
        call.join().unwrap()
    });
    // Not ETIMEDOUT: the call ended without waiting out its deadline.
    assert_eq!(e.errno(), libc::ECANCELED, "{e}");
    assert_eq!(dev.reset().unwrap_err().errno(), libc::ECANCELED);
    drop(dev);
    server.join().unwrap();
}

#[test]
fn protocol_violations_fail_the_connection_with_eproto() {
    let _serial = setup();
    type Lie = fn(&mut scripted::Peer, scripted::Header);
    let lies: [(&str, Lie); 5] = [
        ("wrong-id", |peer, h| peer.send(h.id.wrapping_add(1), h.command, scripted::REPLY, 0, &[])),
        ("wrong-command", |peer, h| peer.send(h.id, scripted::DMA_MAP, scripted::REPLY, 0, &[])),
        ("huge", |peer, h| {
            let head =
                scripted::Header { size: 0xffff_fff0, flags: scripted::REPLY, error: 0, ..h };
            peer.stream.write_all(&scripted::header_bytes(head)).unwrap();
        }),
        ("truncated", |peer, h| {
            let head = scripted::Header { size: 100, flags: scripted::REPLY, error: 0, ..h };
            peer.stream.write_all(&scripted::header_bytes(head)).unwrap();
            peer.stream.write_all(&[0; 20]).unwrap();
            peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
        }),
        ("unexpected-fd", |peer, h| {
            let head = scripted::Header { size: 16, flags: scripted::REPLY, error: 0, ..h };
            peer.send_with_fd(&scripted::header_bytes(head), 0);
        }),
    ];
    for (name, lie) in lies {
        let fds = open_fds();
        let (first, second) = reset_against(name, lie);
        assert_eq!(first.errno(), libc::EPROTO, "{name}: {first}");
        assert_eq!(second, first, "{name}");
        assert_eq!(open_fds(), fds, "{name}: fds left behind");
    }
}

#[test]
fn an_impossible_vector_count_refuses_the_open() {
    let _serial = setup();
    let fds = open_fds();
    let path = socket_path("vectors");
    let server = scripted::serve(&path, |peer| {
        peer.handshake_with(r#"{"capabilities":{"max_msg_fds":8}}"#);
        let (h, _) = peer.expect(scripted::DEVICE_GET_INFO);
        // A PCI device with no regions and one IRQ index, which claims 2^32 - 1 vectors.
        let info: Vec<u8> = [16u32, 0b11, 0, 1].iter().flat_map(|v| v.to_ne_bytes()).collect();
        peer.reply(h, &info);
        let (h, _) = peer.expect(scripted::DEVICE_GET_IRQ_INFO);
        let irq: Vec<u8> = [16u32, 0, 0, u32::MAX].iter().flat_map(|v| v.to_ne_bytes()).collect();
        peer.reply(h, &irq);
        peer.until_closed();
    });
    let e = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap_err();
    assert_eq!(e.errno(), libc::EPROTO, "{e}");
    assert!(e.message().contains("4294967295 vectors"), "{e}");
    server.join().unwrap();
    assert_eq!(open_fds(), fds, "fds left behind");
}

#[test]
fn a_servers_errno_fails_only_that_call() {
    let _serial = setup();
    let (dev, server) = open_scripted("errno", None, |peer| {
        let (h, _) = peer.expect(scripted::DEVICE_RESET);
        peer.send(h.id, h.command, scripted::REPLY | scripted::ERROR, libc::ENOTTY as u32, &[]);
        let (h, _) = peer.expect(scripted::DEVICE_RESET);
        peer.reply(h, &[]);
        peer.until_closed();
    });
    let e = dev.reset().unwrap_err();
    assert_eq!(e.errno(), libc::ENOTTY, "{e}");
    dev.reset().unwrap();
    drop(dev);
    server.join().unwrap();
}

#[test]
fn a_bad_version_reply_refuses_the_open() {
    let _serial = setup();
    for (name, json) in [("json", "{not json"), ("caps", r#"{"capabilities":{"max_msg_fds":-3}}"#)]
    {
        let path = socket_path(name);
        let server = scripted::serve(&path, move |peer| {
            peer.handshake_with(json);
            peer.until_closed();
        });
        let e = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap_err();
        assert_eq!(e.errno(), libc::EPROTO, "{e}");
        server.join().unwrap();
    }
}

/// Memory mapped without an fd is reached through DMA_READ/DMA_WRITE, which the client serves
/// from the context's mappings and refuses elsewhere.
#[test]
fn server_dma_requests_are_served_from_mapped_memory() {
    let _serial = setup();
    let page = 4096;
    let mem = anonymous(2 * page);
    unsafe { std::ptr::write_bytes(mem, 0x11, 2 * page) };
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    let iova = unsafe { iommu.map_any(mem, page) }.unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let path = socket_path("dma-requests");
    let server = scripted::serve(&path, move |peer| {
        peer.handshake_with("");
        // The map made before the device, offered at attach, without an fd.
        let (h, map) = peer.expect(scripted::DMA_MAP);
        assert_eq!(peer.fds, 0);
        assert_eq!(u32::from_ne_bytes(map[4..8].try_into().unwrap()), 3, "read and write");
        assert_eq!(u64::from_ne_bytes(map[16..24].try_into().unwrap()), iova);
        peer.reply(h, &[]);
        peer.answer_device_info();
        // The read-only map made after it.
        let (h, map) = peer.expect(scripted::DMA_MAP);
        assert_eq!(u32::from_ne_bytes(map[4..8].try_into().unwrap()), 1, "read only");
        let ro_iova = u64::from_ne_bytes(map[16..24].try_into().unwrap());
        peer.reply(h, &[]);
        let access = |iova: u64, data: &[u8], count: u64| {
            [&iova.to_ne_bytes()[..], &count.to_ne_bytes(), data].concat()
        };
        peer.send(100, scripted::DMA_WRITE, 0, 0, &access(iova + 8, b"vfio-usr", 8));
        let (h, _) = peer.recv().unwrap();
        assert_eq!((h.id, h.flags & scripted::ERROR), (100, 0), "{h:?}");
        peer.send(101, scripted::DMA_READ, 0, 0, &access(iova + 4, &[], 12));
        let (h, data) = peer.recv().unwrap();
        assert_eq!((h.id, h.flags & scripted::ERROR), (101, 0));
        assert_eq!(&data[16..], b"\x11\x11\x11\x11vfio-usr");
        // Outside every mapping, across its end, and a write to read-only memory.
        for (id, command, at, data, count) in [
            (102, scripted::DMA_READ, ro_iova + page as u64, &[][..], 8),
            (103, scripted::DMA_READ, iova + page as u64 - 4, &[][..], 8),
            (104, scripted::DMA_WRITE, ro_iova, &[1u8; 8][..], 8),
        ] {
            peer.send(id, command, 0, 0, &access(at, data, count));
            let (h, _) = peer.recv().unwrap();
            assert_eq!(h.id, id);
            assert_ne!(h.flags & scripted::ERROR, 0, "request {id} was served");
            let expected = if id == 104 { libc::EPERM } else { libc::EFAULT };
            assert_eq!(h.error, expected as u32, "request {id}");
        }
        done_tx.send(()).unwrap();
        peer.until_closed();
    });
    let dev = Device::open(&format!("vfio-user:{}", path.display()), Some(&iommu)).unwrap();
    unsafe { iommu.map_any_flags(mem.add(page), page, DMA_READONLY) }.unwrap();
    done_rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the script ran");
    assert_eq!(unsafe { std::slice::from_raw_parts(mem.add(8), 8) }, b"vfio-usr");
    assert!(unsafe { std::slice::from_raw_parts(mem.add(page), page) }.iter().all(|&b| b == 0x11));
    drop(dev);
    server.join().unwrap();
    drop(iommu);
    unsafe { libc::munmap(mem.cast(), 2 * page) };
}

/// The server's VERSION limits bind the client: its page size and its number of mappings.
#[test]
fn the_servers_dma_limits_are_kept() {
    let _serial = setup();
    let path = socket_path("limits");
    let server = scripted::serve(&path, |peer| {
        peer.handshake_with(r#"{"capabilities":{"max_dma_maps":1,"pgsizes":8192}}"#);
        peer.answer_device_info();
        let (h, map) = peer.expect(scripted::DMA_MAP);
        assert_eq!(u64::from_ne_bytes(map[24..32].try_into().unwrap()), 8192);
        peer.reply(h, &[]);
        let (h, _) = peer.expect(scripted::DMA_UNMAP);
        peer.reply(h, &[]);
        peer.until_closed();
    });
    let dev = Device::open(&format!("vfio-user:{}", path.display()), None).unwrap();
    let iommu = dev.iommu();
    let small = iommu.alloc(4096).unwrap_err();
    assert_eq!(small.errno(), libc::EINVAL, "{small}");
    assert!(small.message().contains("pages of 0x2000"), "{small}");
    let (buf, _) = iommu.alloc(8192).unwrap();
    let over = iommu.alloc(8192).unwrap_err();
    assert_eq!(over.errno(), libc::ENOSPC, "{over}");
    assert!(over.message().contains("at most 1"), "{over}");
    iommu.free(buf.as_ptr()).unwrap();
    drop(dev);
    server.join().unwrap();
}

/// Twin-socket mode: offered by the client, and when the server takes it, its requests are
/// served on the twin, where a reply from the server is a protocol violation.
#[test]
fn a_twin_socket_carries_the_servers_requests() {
    let _serial = setup();
    let page = 4096;
    let mem = anonymous(page);
    unsafe { std::ptr::write_bytes(mem, 0x22, page) };
    let iommu = Iommu::open(IommuKind::VfioUser).unwrap();
    let iova = unsafe { iommu.map_any(mem, page) }.unwrap();
    let path = socket_path("twin");
    let server = scripted::serve(&path, move |peer| {
        let (h, version) = peer.expect(scripted::VERSION);
        assert!(String::from_utf8_lossy(&version).contains(r#""twin_socket":{"supported":true}"#));
        let json = r#"{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}"#;
        let mut twin = peer.reply_version_with_twin(h, json);
        let (h, _) = peer.expect(scripted::DMA_MAP);
        peer.reply(h, &[]);
        peer.answer_device_info();
        twin.send(
            7,
            scripted::DMA_READ,
            0,
            0,
            &[&iova.to_ne_bytes()[..], &4u64.to_ne_bytes()].concat(),
        );
        let (h, data) = twin.recv().expect("a reply on the twin");
        assert_eq!((h.id, h.command, h.flags & scripted::ERROR), (7, scripted::DMA_READ, 0));
        assert_eq!(&data[16..], &[0x22; 4]);
        // The reset's reply, sent where only requests belong: it must not answer the call.
        let (h, _) = peer.expect(scripted::DEVICE_RESET);
        twin.send(h.id, scripted::DEVICE_RESET, scripted::REPLY, 0, &[]);
        peer.until_closed();
    });
    let dev = Device::open(&format!("vfio-user:{}", path.display()), Some(&iommu)).unwrap();
    let e = dev.reset().unwrap_err();
    assert_eq!(e.errno(), libc::EPROTO, "{e}");
    assert!(e.message().contains("twin"), "{e}");
    drop(dev);
    drop(iommu);
    server.join().unwrap();
    unsafe { libc::munmap(mem.cast(), page) };
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// A device with one region (BAR0: 4 KiB behind messages) served by `script` after VERSION
/// (0.1, so its io fds are asked for), DEVICE_GET_INFO and the region's information.
fn open_one_region(
    name: &str,
    script: impl FnOnce(&mut scripted::Peer) + Send + 'static,
) -> (Device, std::thread::JoinHandle<()>) {
    let path = socket_path(name);
    let server = scripted::serve(&path, move |peer| {
        peer.handshake_with(r#"{"capabilities":{"max_msg_fds":8}}"#);
        let (h, _) = peer.expect(scripted::DEVICE_GET_INFO);
        peer.reply(h, &words(&[16, 0b11, 1, 0]));
        let (h, _) = peer.expect(scripted::DEVICE_GET_REGION_INFO);
        let rw = 0b11; // VFIO_REGION_INFO_FLAG_READ | _WRITE
        peer.reply(
            h,
            &[words(&[32, rw, 0, 0]), 0x1000u64.to_ne_bytes().to_vec(), vec![0; 8]].concat(),
        );
        script(peer);
    });
    let dev = Device::open(&format!("vfio-user:{}", path.display()), None).expect("open");
    (dev, server)
}

/// Expects a REGION_WRITE at `offset` and acknowledges it.
fn ack_write(peer: &mut scripted::Peer, offset: u64) {
    let (h, payload) = peer.expect(scripted::REGION_WRITE);
    assert_eq!(payload[..8], offset.to_ne_bytes(), "{h:?}");
    peer.reply(h, &payload[..16]);
}

#[test]
fn a_refused_io_fds_request_leaves_writes_to_messages() {
    let _serial = setup();
    let (dev, server) = open_one_region("io-fds-refused", |peer| {
        let (h, payload) = peer.expect(scripted::DEVICE_GET_REGION_IO_FDS);
        assert_eq!(payload[4..], words(&[0, 0, 0]), "flags, index and count are zero");
        peer.send(h.id, h.command, scripted::REPLY | scripted::ERROR, libc::EINVAL as u32, &[]);
        ack_write(peer, 0x40);
        // Asked once: the region has none.
        ack_write(peer, 0x40);
        peer.until_closed();
    });
    dev.write_reg::<u32>(0, 0x40, 1).unwrap();
    dev.write_reg::<u32>(0, 0x40, 2).unwrap();
    drop(dev);
    server.join().unwrap();
}

#[test]
fn io_fds_are_asked_again_with_room_for_them_all() {
    let _serial = setup();
    let (dev, server) = open_one_region("io-fds-again", |peer| {
        let (h, payload) = peer.expect(scripted::DEVICE_GET_REGION_IO_FDS);
        let offered = u32::from_ne_bytes(payload[..4].try_into().unwrap());
        // Nine sub-regions: more than the room offered, so only the header comes.
        let argsz = 16 + 9 * 40;
        assert!(offered < argsz, "{offered}");
        peer.reply(h, &words(&[argsz, 0, 0, 9]));
        let (h, payload) = peer.expect(scripted::DEVICE_GET_REGION_IO_FDS);
        assert_eq!(u32::from_ne_bytes(payload[..4].try_into().unwrap()), argsz);
        // An ioeventfd of 4 bytes at 0x80, and eight ioregionfds vfiokit leaves alone.
        let mut reply = words(&[argsz, 0, 0, 9]);
        for i in 0..9u64 {
            let (offset, kind) = if i == 0 { (0x80, 0) } else { (0x100 * i, 1) };
            let entry = [offset.to_ne_bytes(), 4u64.to_ne_bytes()].concat();
            reply.extend_from_slice(&[entry, words(&[0, kind, 0, 0]), vec![0; 8]].concat());
        }
        let bell = vfiokit_test_eventfd();
        let head = scripted::Header {
            id: h.id,
            command: h.command,
            size: 16 + reply.len() as u32,
            flags: scripted::REPLY,
            error: 0,
        };
        peer.send_with_fd(&[scripted::header_bytes(head), reply].concat(), bell.as_raw_fd());
        // The doorbell's write came before this message was sent.
        ack_write(peer, 0x84);
        let mut count = [0u8; 8];
        assert_eq!(unsafe { libc::read(bell.as_raw_fd(), count.as_mut_ptr().cast(), 8) }, 8);
        assert_eq!(u64::from_ne_bytes(count), 1, "one ring");
        ack_write(peer, 0x100);
        peer.until_closed();
    });
    dev.write_reg::<u32>(0, 0x80, 0xabcd).unwrap();
    dev.write_reg::<u32>(0, 0x84, 1).unwrap();
    dev.write_reg::<u32>(0, 0x100, 1).unwrap();
    drop(dev);
    server.join().unwrap();
}

fn vfiokit_test_eventfd() -> OwnedFd {
    // SAFETY: a new fd, owned from here.
    unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)) }
}

#[test]
fn device_features_go_to_the_server() {
    const MIGRATION: u32 = 1;
    const MIG_DEVICE_STATE: u32 = 2;
    const RUNNING: u32 = 2;
    let _serial = setup();
    let (dev, server) = open_scripted("feature", None, |peer| {
        // GET: the data comes back in the reply, its length added to argsz.
        let (h, payload) = peer.expect(scripted::DEVICE_FEATURE);
        assert_eq!(payload, [words(&[16, vfiokit::FEATURE_GET | MIGRATION]), vec![0; 8]].concat());
        peer.reply(
            h,
            &[words(&[16, vfiokit::FEATURE_GET | MIGRATION]), 1u64.to_ne_bytes().to_vec()].concat(),
        );
        // SET: the data goes with the request, and the reply echoes it.
        let (h, payload) = peer.expect(scripted::DEVICE_FEATURE);
        assert_eq!(payload, words(&[16, vfiokit::FEATURE_SET | MIG_DEVICE_STATE, RUNNING, 0]));
        peer.reply(h, &payload);
        let (h, _) = peer.expect(scripted::DEVICE_FEATURE);
        peer.send(h.id, h.command, scripted::REPLY | scripted::ERROR, libc::ENOTTY as u32, &[]);
        peer.until_closed();
    });
    let mut flags = [0u8; 8];
    assert_eq!(dev.feature(MIGRATION, vfiokit::FEATURE_GET, &mut flags).unwrap(), 0);
    assert_eq!(u64::from_ne_bytes(flags), 1, "VFIO_MIGRATION_STOP_COPY");
    let mut state = words(&[RUNNING, 0]);
    dev.feature(MIG_DEVICE_STATE, vfiokit::FEATURE_SET, &mut state).unwrap();
    let e = dev.feature(6, vfiokit::FEATURE_PROBE | vfiokit::FEATURE_SET, &mut []).unwrap_err();
    assert_eq!(e.errno(), libc::ENOTTY, "{e}");
    drop(dev);
    server.join().unwrap();
}
