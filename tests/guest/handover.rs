//! Live handover (Iommu::hand_over / Iommu::take_over): a forked child, the old process,
//! brings a device up and hands it over with its DMA context, running, to this process, the
//! new one, then exits; the device never stops. On 6.x iommufd it is refused with its reason.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use vfiokit::irq::{IRQ_MSI, IRQ_MSIX};
use vfiokit::{DMA_SHAREABLE, Device, Iommu, IommuKind};

use crate::common::*;
use crate::handoff::socketpair;

/// This process's VmLck (kB): the type1 IOMMU's locked-memory accounting.
fn vm_lck() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Words between the two processes, beside the handover: what a driver keeps of its own.
fn send_words(sock: &OwnedFd, words: &[u64]) {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    // SAFETY: a live buffer of that length.
    let n = unsafe { libc::send(sock.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(n, bytes.len() as isize, "sending the driver's state");
}

fn recv_words<const N: usize>(sock: &OwnedFd) -> [u64; N] {
    let mut bytes = vec![0u8; N * 8];
    // SAFETY: a live buffer of that length.
    let n = unsafe {
        libc::recv(sock.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len(), libc::MSG_WAITALL)
    };
    assert_eq!(n, bytes.len() as isize, "receiving the driver's state");
    std::array::from_fn(|i| u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()))
}

/// An NVMe queue pair: submission and completion rings in DMA buffers, and where we are.
struct Queue {
    qid: u16,
    sq: u64,
    cq: u64,
    tail: u16,
    head: u16,
    phase: u16,
}

const DEPTH: u16 = 16;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;

impl Queue {
    /// The state a handover carries beside the context: IOVAs and positions.
    fn words(&self) -> [u64; 6] {
        [self.qid.into(), self.sq, self.cq, self.tail.into(), self.head.into(), self.phase.into()]
    }

    fn from_words(w: &[u64]) -> Queue {
        let short = |i: usize| w[i] as u16;
        Queue { qid: short(0), sq: w[1], cq: w[2], tail: short(3), head: short(4), phase: short(5) }
    }

    /// Submits one command and waits for its completion on MSI-X vector `qid`: its status.
    fn run(&mut self, d: &Device, command: [u32; 16]) -> u16 {
        let iommu = d.iommu();
        let at = |iova: u64, len: usize| iommu.dma_to_vaddr(iova, len).unwrap();
        let entry = at(self.sq + 64 * u64::from(self.tail), 64).cast::<u32>();
        for (i, w) in command.iter().enumerate() {
            // SAFETY: a submission entry in our DMA buffer; volatile: the device reads it.
            unsafe { entry.as_ptr().add(i).write_volatile(*w) };
        }
        let stride = 4u64 << ((rd::<u64>(d, 0, 0) >> 32) & 0xf);
        self.tail = (self.tail + 1) % DEPTH;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        wr(d, 0, 0x1000 + 2 * u64::from(self.qid) * stride, u32::from(self.tail));
        let cqe = at(self.cq + 16 * u64::from(self.head), 16).cast::<u32>();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = d.irq_wait(IRQ_MSIX, self.qid.into(), 100);
            // SAFETY: a completion entry in our DMA buffer; volatile: the device writes it.
            let dw3 = unsafe { cqe.as_ptr().add(3).read_volatile() };
            if (dw3 >> 16) as u16 & 1 == self.phase {
                self.head = (self.head + 1) % DEPTH;
                if self.head == 0 {
                    self.phase ^= 1;
                }
                wr(d, 0, 0x1000 + (2 * u64::from(self.qid) + 1) * stride, u32::from(self.head));
                return (dw3 >> 17) as u16;
            }
            assert!(Instant::now() < deadline, "no completion on queue {}", self.qid);
        }
    }
}

/// An NVMe command: opcode, command id, namespace, PRP1 and dwords 10 to 12.
fn command(opcode: u8, cid: u16, nsid: u32, prp1: u64, cdw: [u32; 3]) -> [u32; 16] {
    let mut c = [0u32; 16];
    c[0] = u32::from(opcode) | u32::from(cid) << 16;
    c[1] = nsid;
    (c[6], c[7]) = (prp1 as u32, (prp1 >> 32) as u32);
    c[10..13].copy_from_slice(&cdw);
    c
}

fn wait_csts(d: &Device, ready: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while (rd::<u32>(d, 0, CSTS) & 1 == 1) != ready {
        assert!(Instant::now() < deadline, "CSTS.RDY never became {ready}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Zeroed DMA memory at `iova`, as this process sees it.
fn memory(iommu: &Iommu, iova: u64, len: usize) -> NonNull<u8> {
    iommu.dma_to_vaddr(iova, len).unwrap()
}

/// IDENTIFY CONTROLLER into the buffer at `data`: the serial QEMU was given.
fn identify(d: &Device, admin: &mut Queue, data: u64, cid: u16) {
    assert_eq!(admin.run(d, command(0x06, cid, 0, data, [1, 0, 0])), 0, "IDENTIFY");
    let serial = volatile_bytes(memory(d.iommu(), data, 4096), 24)[4..24].to_vec();
    let serial = String::from_utf8_lossy(&serial).trim().to_string();
    assert_eq!(serial, std::env::var("VFIOKIT_TEST_NVME_SERIAL").unwrap());
}

/// Writes (0x01) or reads (0x02) block `lba` of namespace 1 through the buffer at `data`.
fn block_io(d: &Device, io: &mut Queue, opcode: u8, lba: u32, data: u64, cid: u16) {
    assert_eq!(io.run(d, command(opcode, cid, 1, data, [lba, 0, 0])), 0, "I/O {opcode:#x}");
}

fn fill(iommu: &Iommu, iova: u64, seed: u8) {
    let p = memory(iommu, iova, 512);
    // SAFETY: our DMA buffer, idle.
    unsafe { std::ptr::write_bytes(p.as_ptr(), seed, 512) };
}

/// The old process: the controller reset and enabled, admin queues, an I/O queue pair on
/// Whether this guest's context hands over live: type1 always, iommufd from Linux 6.13 (the
/// 7.3 guest).
fn hands_over_live() -> bool {
    expected_kind() == IommuKind::Type1 || std::env::var("VFIOKIT_VM_KERNEL").unwrap() == "latest"
}

/// MSI-X vector 1, IDENTIFY and a block written; then all of it handed over, and the driver's
/// own state sent after it.
fn bring_up_and_hand_over(sock: &OwnedFd) {
    let iommu = Iommu::open(expected_kind()).unwrap();
    let d = open_in("NVME", &iommu);
    enable_bus_master(&d);
    wr(&d, 0, CC, 0u32);
    wait_csts(&d, false);
    let ring = |len| iommu.alloc_flags(len, DMA_SHAREABLE).unwrap().1;
    let mut admin = Queue { qid: 0, sq: ring(4096), cq: ring(4096), tail: 0, head: 0, phase: 1 };
    wr(&d, 0, 0x24, u32::from(DEPTH - 1) << 16 | u32::from(DEPTH - 1));
    wr(&d, 0, 0x28, admin.sq);
    wr(&d, 0, 0x30, admin.cq);
    d.irq_enable(IRQ_MSIX, 0, 2).unwrap();
    wr(&d, 0, CC, 4u32 << 20 | 6 << 16 | 1);
    wait_csts(&d, true);
    let data = ring(4096);
    identify(&d, &mut admin, data, 1);
    let mut io = Queue { qid: 1, sq: ring(4096), cq: ring(4096), tail: 0, head: 0, phase: 1 };
    let size = u32::from(DEPTH - 1) << 16;
    // CREATE I/O COMPLETION QUEUE 1 on vector 1 (IEN, PC), then its SUBMISSION QUEUE.
    assert_eq!(admin.run(&d, command(0x05, 2, 0, io.cq, [size | 1, 1 << 16 | 3, 0])), 0);
    assert_eq!(admin.run(&d, command(0x01, 3, 0, io.sq, [size | 1, 1 << 16 | 1, 0])), 0);
    fill(&iommu, data, 0xa5);
    block_io(&d, &mut io, 0x01, 7, data, 4);
    let before = vm_lck();
    iommu.hand_over(&[&d], sock.as_fd()).unwrap();
    let after = vm_lck();
    // Handed over: this context changes nothing any more.
    fails(iommu.alloc(4096), libc::EBADF, &["handed over"]);
    let records = [d.regions()[0].size, d.irqs()[IRQ_MSIX as usize].count.into()];
    let mut words = vec![data, before, after, records[0], records[1]];
    words.extend(admin.words());
    words.extend(io.words());
    send_words(sock, &words);
}

/// The NVMe controller stays enabled with its admin and I/O queues across a live handover to
/// this process, whose commands complete on them (with the handed-over MSI-X eventfds), before
/// and after the old process exits, on type1 and on iommufd (Linux 7.3's MAP_FILE and
/// CHANGE_PROCESS); on 6.x iommufd the handover is refused, naming the kernel needed, and the
/// old process keeps everything.
pub fn live_handover_keeps_nvme_running() {
    if !hands_over_live() {
        let iommu = Iommu::open(IommuKind::Iommufd).unwrap();
        let d = open_in("NVME", &iommu);
        let (buf, _) = iommu.alloc_flags(4096, DMA_SHAREABLE).unwrap();
        let (old_end, _new_end) = socketpair();
        let words = ["IOMMU_IOAS_CHANGE_PROCESS", "Linux 6.13"];
        fails(iommu.hand_over(&[&d], old_end.as_fd()), libc::EOPNOTSUPP, &words);
        iommu.free(buf.as_ptr()).unwrap();
        return;
    }
    let (old_end, new_end) = socketpair();
    let child = fork_child(|| {
        bring_up_and_hand_over(&old_end);
    });
    drop(old_end);
    let (iommu, devices) = Iommu::take_over(new_end.as_fd()).unwrap();
    let taken = vm_lck();
    let w: [u64; 17] = recv_words(&new_end);
    let (data, before, after) = (w[0], w[1], w[2]);
    let (mut admin, mut io) = (Queue::from_words(&w[5..11]), Queue::from_words(&w[11..17]));
    assert_eq!(iommu.kind(), expected_kind());
    let [d] = &devices[..] else { panic!("one device") };
    assert_eq!(d.address(), addr("NVME"));
    assert_eq!(d.regions()[0].size, w[3], "the same records");
    assert_eq!(u64::from(d.irqs()[IRQ_MSIX as usize].count), w[4], "the same records");
    assert_eq!(rd::<u32>(d, 0, CC) & 1, 1, "CC.EN still set");
    assert_eq!(rd::<u32>(d, 0, CSTS) & 3, 1, "CSTS.RDY still 1, no fatal status");
    assert_eq!(rd::<u64>(d, 0, 0x28), admin.sq, "the admin queue in place");
    // While the old process is still there, then after it exited.
    identify(d, &mut admin, data, 5);
    wait_child(child);
    let exited = vm_lck();
    eprintln!(
        "VmLck (kB): old process {before} before handover, {after} after; new process {taken} after take-over, \
         {exited} after the old one exited"
    );
    identify(d, &mut admin, data, 6);
    fill(&iommu, data, 0);
    block_io(d, &mut io, 0x02, 7, data, 7);
    assert_eq!(volatile_bytes(memory(&iommu, data, 512), 512), vec![0xa5; 512], "old's block");
    // New DMA memory works beside the handed-over.
    let (fresh, fresh_iova) = iommu.alloc(4096).unwrap();
    fill(&iommu, fresh_iova, 0x3c);
    block_io(d, &mut io, 0x01, 8, fresh_iova, 8);
    block_io(d, &mut io, 0x02, 8, data, 9);
    assert_eq!(volatile_bytes(memory(&iommu, data, 512), 512), vec![0x3c; 512], "new block");
    iommu.free(fresh.as_ptr()).unwrap();
    iommu.free(memory(&iommu, data, 4096).as_ptr()).unwrap();
    assert_eq!(rd::<u32>(d, 0, CSTS) & 3, 1, "CSTS.RDY still 1 at the end");
}

/// edu's DMA engine reaches, after the handover, the buffers mapped before it, and MSI comes
/// through the handed-over eventfd; before that the refusals leave the old process owning
/// everything: the caller's memory, a device left out, a receiver gone mid-handover (the
/// mappings' addresses were let go and are taken back) and a receiver that refuses.
pub fn live_handover_edu_dma_and_refusals() {
    if !hands_over_live() {
        return; // refused: live_handover_keeps_nvme_running
    }
    let (old_end, new_end) = socketpair();
    let pattern: Vec<u8> = (0..1024).map(|i| (i * 7 + 3) as u8).collect();
    let child = fork_child(|| {
        let iommu = Iommu::open(expected_kind()).unwrap();
        let d = open_in("EDU", &iommu);
        enable_bus_master(&d);
        let (src, src_iova) = iommu.alloc_flags(4096, DMA_SHAREABLE).unwrap();
        let (_dst, dst_iova) = iommu.alloc_flags(8192, DMA_SHAREABLE).unwrap();
        // SAFETY: our buffer, idle.
        unsafe { std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.as_ptr(), pattern.len()) };
        d.irq_enable(IRQ_MSI, 0, 1).unwrap();
        let round_trip = |to: u64| {
            edu::dma(&d, src_iova, edu::BUFFER, 1024, false);
            edu::dma(&d, edu::BUFFER, to, 1024, true);
            let back = volatile_bytes(iommu.dma_to_vaddr(to, 1024).unwrap(), 1024);
            assert_eq!(back, pattern, "edu DMA in the old process");
        };
        // The caller's memory cannot go.
        let mut own = vec![0u8; 8192];
        let page = own.as_mut_ptr().wrapping_add(own.as_ptr().align_offset(4096));
        // SAFETY: our memory, unmapped below before it goes.
        let iova = unsafe { iommu.map_any(page, 4096) }.unwrap();
        fails(iommu.hand_over(&[&d], old_end.as_fd()), libc::EBUSY, &["caller's memory"]);
        iommu.unmap(iova, 4096).unwrap();
        // Nor a buffer's private memory.
        let (private, _) = iommu.alloc(4096).unwrap();
        fails(iommu.hand_over(&[&d], old_end.as_fd()), libc::EBUSY, &["without DMA_SHAREABLE"]);
        iommu.free(private.as_ptr()).unwrap();
        // Every device of the context goes, or none.
        fails(iommu.hand_over(&[], old_end.as_fd()), libc::EBUSY, &[&addr("EDU")]);
        // A receiver gone: the addresses were let go and are taken back.
        let (gone, peer) = socketpair();
        drop(peer);
        fails(iommu.hand_over(&[&d], gone.as_fd()), libc::EPIPE, &["still owns"]);
        round_trip(dst_iova);
        // A receiver that refuses: it read the message and its fds, then said no.
        let (refused, peer) = socketpair();
        let refuser = std::thread::spawn(move || {
            let mut bytes = [0u8; 4096];
            // SAFETY: a live buffer; the fds that come are closed at once.
            let n = unsafe { libc::recv(peer.as_raw_fd(), bytes.as_mut_ptr().cast(), 4096, 0) };
            assert!(n > 32, "the message came");
            let mut answer = b"vfkTAKEN".to_vec();
            answer.extend(libc::ENOSPC.to_ne_bytes());
            answer.extend(0u32.to_ne_bytes());
            // SAFETY: a live buffer.
            unsafe { libc::send(peer.as_raw_fd(), answer.as_ptr().cast(), 16, 0) };
        });
        fails(iommu.hand_over(&[&d], refused.as_fd()), libc::ENOSPC, &["refused", "still owns"]);
        refuser.join().unwrap();
        round_trip(dst_iova + 4096);
        wr(&d, 0, edu::IRQ_RAISE, 0x11u32);
        assert!(d.irq_wait(IRQ_MSI, 0, 5000).unwrap() >= 1, "MSI in the old process");
        wr(&d, 0, edu::IRQ_ACK, 0x11u32);
        // The real one.
        iommu.hand_over(&[&d], old_end.as_fd()).unwrap();
        send_words(&old_end, &[src_iova, dst_iova]);
        fails(iommu.unmap(dst_iova, 8192), libc::ENOENT, &[]);
        fails(iommu.free(src.as_ptr()), libc::EBADF, &["handed over"]);
        fails(d.irq_wait(IRQ_MSI, 0, 0), libc::ECANCELED, &["being closed"]);
    });
    drop(old_end);
    let (iommu, devices) = Iommu::take_over(new_end.as_fd()).unwrap();
    let [src_iova, dst_iova] = recv_words(&new_end);
    let d = &devices[0];
    assert_eq!(rd::<u32>(d, 0, edu::ID), 0x010000ed);
    let src = memory(&iommu, src_iova, 4096);
    assert_eq!(volatile_bytes(src, 1024), pattern, "the old process's data, at a new address");
    let round_trip = |to: u64| {
        edu::dma(d, src_iova, edu::BUFFER, 1024, false);
        edu::dma(d, edu::BUFFER, to, 1024, true);
        assert_eq!(volatile_bytes(memory(&iommu, to, 1024), 1024), pattern, "edu DMA after");
    };
    fill(&iommu, dst_iova, 0);
    round_trip(dst_iova);
    wr(d, 0, edu::IRQ_RAISE, 0x22u32);
    assert!(d.irq_wait(IRQ_MSI, 0, 5000).unwrap() >= 1, "MSI through the handed-over eventfd");
    wr(d, 0, edu::IRQ_ACK, 0x22u32);
    wait_child(child);
    round_trip(dst_iova + 4096);
    // The taken-over buffers are this process's: freed here, and handed over again from here.
    iommu.free(memory(&iommu, dst_iova, 8192).as_ptr()).unwrap();
    let (again_old, again_new) = socketpair();
    let taker = std::thread::spawn(move || Iommu::take_over(again_new.as_fd()).map(drop));
    iommu.hand_over(&[d], again_old.as_fd()).unwrap();
    taker.join().unwrap().unwrap();
    drop(devices);
}
