//! What the guest suites share: the test devices' addresses and small device helpers.

use std::ptr::NonNull;

use vfiokit::{Device, Iommu, IommuKind, Width};

pub fn addr(role: &str) -> String {
    std::env::var(format!("VFIOKIT_TEST_{role}"))
        .unwrap_or_else(|_| panic!("VFIOKIT_TEST_{role} is not set: run in tests/vm/run"))
}

pub fn open(role: &str) -> Device {
    Device::open(&addr(role), None).unwrap_or_else(|e| panic!("open {role}: {e}"))
}

pub fn open_in(role: &str, iommu: &Iommu) -> Device {
    Device::open(&addr(role), Some(iommu)).unwrap_or_else(|e| panic!("open {role}: {e}"))
}

pub fn rd<T: Width>(d: &Device, region: u32, off: u64) -> T {
    d.read_reg::<T>(region, off)
        .unwrap_or_else(|e| panic!("read at {off:#x} of region {region}: {e}"))
}

pub fn wr<T: Width>(d: &Device, region: u32, off: u64, v: T) {
    d.write_reg(region, off, v)
        .unwrap_or_else(|e| panic!("write at {off:#x} of region {region}: {e}"))
}

/// Asserts a failure with this errno whose message contains every `words`.
#[track_caller]
pub fn fails<T: std::fmt::Debug>(r: vfiokit::Result<T>, errno: i32, words: &[&str]) {
    let e = r.expect_err("expected a failure");
    assert_eq!(e.errno(), errno, "errno of: {e}");
    for w in words {
        assert!(e.message().contains(w), "message {:?} lacks {w:?}", e.message());
    }
}

const PCI_COMMAND: u64 = 0x04;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_MASTER: u16 = 1 << 2;

/// DMA and MSI are memory writes by the device: bus mastering must be on for either.
pub fn enable_bus_master(d: &Device) {
    let cmd: u16 = rd(d, vfiokit::region::PCI_CONFIG, PCI_COMMAND);
    wr(d, vfiokit::region::PCI_CONFIG, PCI_COMMAND, cmd | COMMAND_MASTER | COMMAND_MEMORY);
}

/// QEMU's edu device: registers in BAR0.
pub mod edu {
    pub const ID: u64 = 0x00;
    pub const LIVENESS: u64 = 0x04;
    pub const FACTORIAL: u64 = 0x08;
    pub const STATUS: u64 = 0x20;
    pub const IRQ_STATUS: u64 = 0x24;
    pub const IRQ_RAISE: u64 = 0x60;
    pub const IRQ_ACK: u64 = 0x64;
    pub const DMA_SRC: u64 = 0x80;
    pub const DMA_DST: u64 = 0x88;
    pub const DMA_COUNT: u64 = 0x90;
    pub const DMA_CMD: u64 = 0x98;
    /// The device's own DMA buffer, as a device-side address.
    pub const BUFFER: u64 = 0x40000;
    pub const CMD_START: u64 = 1;
    pub const CMD_TO_RAM: u64 = 2;

    /// Runs one DMA transfer and waits for the engine to finish (it runs on a QEMU timer).
    pub fn dma(d: &vfiokit::Device, src: u64, dst: u64, len: u64, to_ram: bool) {
        super::wr(d, 0, DMA_SRC, src);
        super::wr(d, 0, DMA_DST, dst);
        super::wr(d, 0, DMA_COUNT, len);
        super::wr(d, 0, DMA_CMD, CMD_START | if to_ram { CMD_TO_RAM } else { 0 });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::rd::<u64>(d, 0, DMA_CMD) & CMD_START != 0 {
            assert!(std::time::Instant::now() < deadline, "edu DMA did not complete");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Returns once thread `tid` of this process sleeps in poll(2): a waiter is in the kernel's
/// wait, with no guess at how long a busy emulated CPU takes to get it there (10 s at most).
pub fn until_in_poll(tid: i32) {
    let path = format!("/proc/self/task/{tid}/syscall");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // The syscall's number and arguments, or "running".
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        let nr = now.split_whitespace().next().and_then(|n| n.parse::<i64>().ok());
        if nr == Some(libc::SYS_poll) || nr == Some(libc::SYS_ppoll) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "thread {tid} never reached poll: {now}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Open fds and mappings of this process: what a leak would grow.
pub fn fds_and_maps() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap().lines().count();
    (fds, maps)
}

/// Runs `f` in a forked child and asserts it exited 0 (a panic in the child exits 101).
pub fn in_child(f: impl FnOnce()) {
    wait_child(fork_child(f));
}

/// Runs `f` in a forked child, which exits 0 when it returns (101 when it panics), and returns
/// its pid at once, for [`wait_child`].
pub fn fork_child(f: impl FnOnce()) -> i32 {
    // SAFETY: the runner's only other thread (the watchdog) sleeps holding no lock, so the
    // child is a consistent copy.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
        // SAFETY: leave the child without running the parent's atexit handlers twice.
        unsafe { libc::_exit(if ok { 0 } else { 101 }) };
    }
    pid
}

/// Waits for the child `pid` and asserts it exited 0.
pub fn wait_child(pid: i32) {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed (status {status:#x})"
    );
}

/// VFIO_IOMMU_UNMAP_DMA straight on a type1 container fd (what vfiokit does not wrap): the
/// ioctl's result and errno, and the size the kernel says it unmapped.
pub fn raw_type1_unmap(fd: i32, iova: u64, size: u64) -> (i32, i32, u64) {
    // struct vfio_iommu_type1_dma_unmap: argsz, flags, iova, size
    let mut unmap = [0u8; 24];
    unmap[0..4].copy_from_slice(&24u32.to_ne_bytes());
    unmap[8..16].copy_from_slice(&iova.to_ne_bytes());
    unmap[16..24].copy_from_slice(&size.to_ne_bytes());
    const UNMAP_DMA: u64 = 0x3b72; // _IO(';', 100 + 14)
    // SAFETY: a vfio_iommu_type1_dma_unmap of the size given in its argsz.
    let rc = unsafe { libc::ioctl(fd, UNMAP_DMA as _, unmap.as_mut_ptr()) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    (rc, errno, u64::from_ne_bytes(unmap[16..24].try_into().unwrap()))
}

/// A call's result as the C API would return it: 0, or the errno.
pub fn rc<T>(r: vfiokit::Result<T>) -> i32 {
    r.map_or_else(|e| e.errno(), |_| 0)
}

/// What AUTO must pick here: iommufd where the kernel has it, unless VFIOKIT_IOMMU says type1.
/// The ERR irqs of a device that is not PCI Express (edu): Linux 7.3 offers one on every
/// device, 6.1 and 6.12 on PCIe devices only.
pub fn err_irqs_off_pcie() -> u32 {
    (std::env::var("VFIOKIT_VM_KERNEL").unwrap() == "latest") as u32
}

pub fn expected_kind() -> IommuKind {
    let kernel_has_iommufd = std::path::Path::new("/dev/iommu").exists();
    match std::env::var("VFIOKIT_IOMMU").as_deref() {
        Ok("type1") => IommuKind::Type1,
        Ok(_) => IommuKind::Iommufd,
        Err(_) if kernel_has_iommufd => IommuKind::Iommufd,
        Err(_) => IommuKind::Type1,
    }
}

/// Reads `len` bytes the device may have written.
pub fn volatile_bytes(p: NonNull<u8>, len: usize) -> Vec<u8> {
    // SAFETY: the caller's mapped buffer of at least len bytes; volatile: a device writes it.
    (0..len).map(|i| unsafe { p.as_ptr().add(i).read_volatile() }).collect()
}

pub const CAP_IPC_LOCK: u32 = 14;

/// Removes a capability from this process's effective and permitted sets.
pub fn drop_capability(cap: u32) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: 0x2008_0522, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with the v3 header and two data words, as the ABI asks.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()), 0);
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
        assert_eq!(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()), 0);
    }
}

pub fn group_of(role: &str) -> String {
    group_of_address(&addr(role))
}

/// The device's IOMMU group, as sysfs names it.
pub fn group_of_address(address: &str) -> String {
    let link = std::fs::read_link(format!("/sys/bus/pci/devices/{address}/iommu_group")).unwrap();
    link.file_name().unwrap().to_string_lossy().into_owned()
}
