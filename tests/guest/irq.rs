//! Interrupts: edu's MSI and INTx raised by the device, MSI-X subranges and loopback triggers,
//! the ERR and REQ IRQs, misuse refused, re-enabled vectors, the caller's own eventfds, and
//! waits ended by disable, re-route and cancel.

use vfiokit::Device;
use vfiokit::irq::*;

use crate::common::*;

fn edu_raise(d: &Device, value: u32) {
    wr(d, 0, edu::IRQ_RAISE, value);
}

fn edu_ack(d: &Device) {
    let pending: u32 = rd(d, 0, edu::IRQ_STATUS);
    wr(d, 0, edu::IRQ_ACK, pending);
}

pub fn edu_msi_raised_interrupt_is_seen() {
    let d = open("EDU");
    enable_bus_master(&d);
    let fds = d.irq_enable(IRQ_MSI, 0, 1).unwrap();
    assert_eq!(fds.len(), 1);
    fails(d.irq_wait(IRQ_MSI, 0, 50), libc::ETIMEDOUT, &["no interrupt within 50 ms"]);
    edu_raise(&d, 0x1234);
    assert!(d.irq_wait(IRQ_MSI, 0, 5000).unwrap() >= 1);
    assert_eq!(rd::<u32>(&d, 0, edu::IRQ_STATUS), 0x1234);
    edu_ack(&d);
    // Loopback: the kernel signals the eventfd itself.
    d.irq_trigger(IRQ_MSI, 0).unwrap();
    assert_eq!(d.irq_wait(IRQ_MSI, 0, 1000).unwrap(), 1);
    d.irq_disable(IRQ_MSI).unwrap();
}

pub fn edu_intx_must_be_unmasked_to_fire_again() {
    let d = open("EDU");
    d.irq_enable(IRQ_INTX, 0, 1).unwrap();
    edu_raise(&d, 1);
    assert!(d.irq_wait(IRQ_INTX, 0, 5000).unwrap() >= 1);
    edu_ack(&d);
    edu_raise(&d, 2);
    fails(d.irq_wait(IRQ_INTX, 0, 300), libc::ETIMEDOUT, &["INTx"]);
    d.irq_unmask(IRQ_INTX, 0).unwrap();
    assert!(
        d.irq_wait(IRQ_INTX, 0, 5000).unwrap() >= 1,
        "unmasking delivers the pending interrupt"
    );
    edu_ack(&d);
    d.irq_unmask(IRQ_INTX, 0).unwrap();
    // Masked by hand: a raise is held back until unmask.
    d.irq_mask(IRQ_INTX, 0).unwrap();
    edu_raise(&d, 4);
    fails(d.irq_wait(IRQ_INTX, 0, 300), libc::ETIMEDOUT, &[]);
    d.irq_unmask(IRQ_INTX, 0).unwrap();
    assert!(d.irq_wait(IRQ_INTX, 0, 5000).unwrap() >= 1);
    edu_ack(&d);
    d.irq_disable(IRQ_INTX).unwrap();
}

pub fn nvme_msix_subrange_and_trigger() {
    let d = open("NVME");
    let fds = d.irq_enable(IRQ_MSIX, 2, 3).unwrap();
    assert_eq!(fds.len(), 3);
    assert!(fds.iter().all(|&fd| fd >= 0));
    d.irq_trigger(IRQ_MSIX, 3).unwrap();
    assert_eq!(d.irq_wait(IRQ_MSIX, 3, 1000).unwrap(), 1);
    fails(d.irq_wait(IRQ_MSIX, 2, 50), libc::ETIMEDOUT, &[]);
    fails(d.irq_trigger(IRQ_MSIX, 0), libc::EINVAL, &["vector 0 is not enabled"]);
    fails(d.irq_wait(IRQ_MSIX, 5, 0), libc::EINVAL, &["not enabled"]);
    // The eventfd is the caller's to poll too.
    d.irq_trigger(IRQ_MSIX, 4).unwrap();
    let mut pfd = libc::pollfd { fd: fds[2], events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1);
    d.irq_disable(IRQ_MSIX).unwrap();
    // SAFETY: fcntl on a number we no longer own only queries it.
    assert_eq!(unsafe { libc::fcntl(fds[0], libc::F_GETFD) }, -1, "disable closes the eventfds");
}

pub fn err_and_req_irqs() {
    let d = open("NVME");
    for irq in [IRQ_ERR, IRQ_REQ] {
        d.irq_enable(irq, 0, 1).unwrap();
        d.irq_trigger(irq, 0).unwrap();
        assert_eq!(d.irq_wait(irq, 0, 1000).unwrap(), 1);
        d.irq_disable(irq).unwrap();
    }
    let edu = open("EDU");
    match err_irqs_off_pcie() {
        0 => fails(edu.irq_enable(IRQ_ERR, 0, 1), libc::EINVAL, &["has no IRQ 3 (ERR)"]),
        _ => {
            edu.irq_enable(IRQ_ERR, 0, 1).unwrap();
            edu.irq_disable(IRQ_ERR).unwrap();
        }
    }
}

pub fn irq_misuse() {
    let d = open("EDU");
    fails(d.irq_enable(IRQ_MSI, 0, 2), libc::EINVAL, &["outside its 1 vectors"]);
    fails(d.irq_enable(IRQ_MSI, u32::MAX, 1), libc::EINVAL, &["outside"]);
    fails(d.irq_enable(IRQ_MSI, 0, 0), libc::EINVAL, &["outside"]);
    fails(d.irq_enable(17, 0, 1), libc::EINVAL, &["has no IRQ 17"]);
    fails(d.irq_disable(IRQ_MSI), libc::EINVAL, &["not enabled"]);
    d.irq_enable(IRQ_MSI, 0, 1).unwrap();
    fails(d.irq_mask(IRQ_MSI, 0), libc::ENOTTY, &["MSI vectors cannot be masked"]);
    // One interrupt type at a time, and the error says which one is in the way.
    fails(d.irq_enable(IRQ_INTX, 0, 1), libc::EINVAL, &["MSI is enabled", "before enabling INTx"]);
    d.irq_disable(IRQ_MSI).unwrap();
    fails(d.irq_disable(IRQ_MSI), libc::EINVAL, &["not enabled"]);
    d.irq_enable(IRQ_INTX, 0, 1).unwrap();
    fails(d.irq_enable(IRQ_MSI, 0, 1), libc::EINVAL, &["INTx is enabled"]);
    d.irq_disable(IRQ_INTX).unwrap();
}

/// A vector keeps its own eventfd across enables (irq_wait reads it without the lock), so
/// what it counted and nobody read is emptied when it is enabled again, after a disable or by
/// a re-route, while the fd handed out before is closed.
pub fn reenabled_vectors_start_empty() {
    let d = open("NVME");
    let before = d.irq_enable(IRQ_MSIX, 0, 1).unwrap()[0];
    d.irq_trigger(IRQ_MSIX, 0).unwrap();
    d.irq_disable(IRQ_MSIX).unwrap();
    // SAFETY: fcntl on a number we no longer own only queries it.
    assert_eq!(unsafe { libc::fcntl(before, libc::F_GETFD) }, -1, "disable closes the eventfd");
    d.irq_enable(IRQ_MSIX, 0, 1).unwrap();
    fails(d.irq_wait(IRQ_MSIX, 0, 0), libc::ETIMEDOUT, &[]);
    d.irq_trigger(IRQ_MSIX, 0).unwrap();
    assert_eq!(d.irq_wait(IRQ_MSIX, 0, 1000).unwrap(), 1);
    d.irq_trigger(IRQ_MSIX, 0).unwrap();
    d.irq_enable(IRQ_MSIX, 0, 1).unwrap();
    fails(d.irq_wait(IRQ_MSIX, 0, 0), libc::ETIMEDOUT, &[]);
    d.irq_trigger(IRQ_MSIX, 0).unwrap();
    assert_eq!(d.irq_wait(IRQ_MSIX, 0, 1000).unwrap(), 1);
    d.irq_disable(IRQ_MSIX).unwrap();
}

/// Vectors routed to the caller's eventfds: the kernel signals them, the caller reads and
/// closes them, irq_wait refuses them, and disable and close leave them open.
pub fn caller_eventfds() {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    let eventfd = || {
        // SAFETY: plain syscall; the fd is ours.
        unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)) }
    };
    let read = |fd: &OwnedFd| {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into n.
        let got = unsafe { libc::read(fd.as_raw_fd(), (&raw mut n).cast(), 8) };
        if got == 8 { n } else { 0 }
    };
    let open_fds = || fds_and_maps().0;
    let before = open_fds();
    let (a, b) = (eventfd(), eventfd());
    let d = open("NVME");
    d.irq_enable_fds(IRQ_MSIX, 1, &[a.as_fd(), b.as_fd()]).unwrap();
    d.irq_trigger(IRQ_MSIX, 2).unwrap();
    assert_eq!((read(&a), read(&b)), (0, 1), "vector 2 signals the caller's second eventfd");
    fails(d.irq_wait(IRQ_MSIX, 1, 0), libc::EINVAL, &["caller's own eventfd"]);
    // Re-routed to the device's own eventfd: waitable again.
    d.irq_enable(IRQ_MSIX, 1, 1).unwrap();
    d.irq_trigger(IRQ_MSIX, 1).unwrap();
    assert_eq!((d.irq_wait(IRQ_MSIX, 1, 1000).unwrap(), read(&a)), (1, 0));
    d.irq_disable(IRQ_MSIX).unwrap();
    // SAFETY: a pipe's ends are ours.
    let pipe = unsafe {
        let mut p = [0; 2];
        assert_eq!(libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]))
    };
    fails(d.irq_enable_fds(IRQ_MSIX, 0, &[pipe.0.as_fd()]), libc::EINVAL, &["enabling MSI-X"]);
    d.irq_enable_fds(IRQ_MSIX, 0, &[a.as_fd()]).unwrap();
    drop(d);
    // SAFETY: fcntl on our own fd.
    assert!(unsafe { libc::fcntl(a.as_raw_fd(), libc::F_GETFD) } >= 0, "the caller's fd is open");
    drop((a, b, pipe));
    assert_eq!(open_fds(), before, "the device's duplicates are closed with it");
}

/// A thread waiting forever is woken by irq_disable, by an irq_enable that re-routes its vector,
/// and by cancel_waits, each with ECANCELED; a waiter on another vector waits on.
pub fn disable_and_cancel_end_waits() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let d = Arc::new(open("NVME"));
    let waiter = |vector: u32| {
        let d = d.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            (d.irq_wait(IRQ_MSIX, vector, -1), Instant::now())
        });
        until_in_poll(rx.recv().unwrap());
        t
    };
    d.irq_enable(IRQ_MSIX, 0, 2).unwrap();
    let (w0, w1) = (waiter(0), waiter(1));
    d.irq_enable(IRQ_MSIX, 0, 1).unwrap();
    let (r, _) = w0.join().unwrap();
    fails(r, libc::ECANCELED, &["vector 0", "disabled or re-enabled"]);
    d.irq_trigger(IRQ_MSIX, 1).unwrap();
    assert_eq!(w1.join().unwrap().0.unwrap(), 1, "the other vector's wait is not cancelled");

    let w0 = waiter(0);
    d.irq_disable(IRQ_MSIX).unwrap();
    let disabled = Instant::now();
    let (r, woke) = w0.join().unwrap();
    fails(r, libc::ECANCELED, &["disabled"]);
    assert!(woke.saturating_duration_since(disabled) < Duration::from_millis(100));

    d.irq_enable(IRQ_MSIX, 0, 1).unwrap();
    let w0 = waiter(0);
    d.cancel_waits();
    fails(w0.join().unwrap().0, libc::ECANCELED, &["being closed"]);
    fails(d.irq_wait(IRQ_MSIX, 0, 0), libc::ECANCELED, &["being closed"]);
}
