//! fd passing for privilege separation: a root process opens a context and hands it, with
//! access to edu, to a process running as nobody (Iommu::export / Iommu::adopt over a UNIX
//! socket), which drives the device; and malformed handoffs refused with nothing leaked.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use vfiokit::irq::IRQ_MSI;
use vfiokit::{Device, Iommu};

use crate::common::*;

pub fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut sv = [0; 2];
    // SAFETY: sv has room for the two fds.
    let rc = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr())
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: the kernel just made these fds ours.
    unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) }
}

/// Gives up root in a forked child, keeping enough locked memory for DMA.
fn become_nobody() {
    let rl = libc::rlimit { rlim_cur: 64 << 20, rlim_max: 64 << 20 };
    // SAFETY: plain syscalls in the child.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl), 0);
        assert_eq!(
            libc::setgroups(0, std::ptr::null()) + libc::setgid(65534) + libc::setuid(65534),
            0
        );
    }
}

/// The root half opens the context and hands it over; the nobody half, which cannot open the
/// device itself, adopts it and does edu's DMA round trip and MSI.
pub fn handoff_to_an_unprivileged_process() {
    let (root_end, driver_end) = socketpair();
    let iommu = Iommu::open_auto().unwrap();
    let kind = iommu.kind();
    assert_eq!(kind, expected_kind());
    iommu.export(&[&addr("EDU")], root_end.as_fd()).unwrap();
    // The fds in flight keep the context alive: the helper's own handle can go.
    drop(iommu);
    in_child(|| {
        become_nobody();
        fails(Device::open(&addr("EDU"), None), libc::EACCES, &["permission"]);
        let iommu = Iommu::adopt(driver_end.as_fd()).unwrap();
        assert_eq!(iommu.kind(), kind);
        let d = Device::open(&addr("EDU"), Some(&iommu)).unwrap();
        enable_bus_master(&d);
        let (src, src_iova) = iommu.alloc(4096).unwrap();
        let (dst, dst_iova) = iommu.alloc(4096).unwrap();
        let pattern: Vec<u8> = (0..1024).map(|i| (i * 13 + 5) as u8).collect();
        // SAFETY: our buffer; the device reads it only during the transfer.
        unsafe { std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.as_ptr(), pattern.len()) };
        edu::dma(&d, src_iova, edu::BUFFER, 1024, false);
        edu::dma(&d, edu::BUFFER, dst_iova, 1024, true);
        // SAFETY: the transfer is complete; volatile: the device wrote this memory.
        let back: Vec<u8> =
            (0..1024).map(|i| unsafe { dst.as_ptr().add(i).read_volatile() }).collect();
        assert_eq!(back, pattern, "DMA from the unprivileged process");
        d.irq_enable(IRQ_MSI, 0, 1).unwrap();
        wr(&d, 0, edu::IRQ_RAISE, 0x77u32);
        assert!(d.irq_wait(IRQ_MSI, 0, 5000).unwrap() >= 1, "MSI in the unprivileged process");
        wr(&d, 0, edu::IRQ_ACK, 0x77u32);
    });
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS), as a handoff message would go.
fn send_with_fds(sock: &OwnedFd, bytes: &[u8], fds: &[i32]) {
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    // SAFETY: an all-zero msghdr is valid; control has room for a header and 8 fds.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(size_of_val(fds) as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
        assert_eq!(libc::sendmsg(sock.as_raw_fd(), &msg, 0), bytes.len() as isize);
    }
}

/// A handoff header written by hand (the wire format, docs/handoff.md): type1, `groups` groups.
fn header(version: u32, groups: &[u32]) -> Vec<u8> {
    let mut m = b"vfkHANDO".to_vec();
    for word in [version, 1, 0] {
        m.extend(word.to_ne_bytes());
    }
    m.extend((groups.len() as u16).to_ne_bytes());
    m.extend(0u16.to_ne_bytes());
    m.extend(groups.iter().flat_map(|g| g.to_ne_bytes()));
    m
}

/// Garbage, a wrong version, fds that are not what the message says, too few fds, a peer gone
/// mid-message: each refused with a message, every fd received closed.
pub fn malformed_handoffs_are_refused() {
    let (sender, receiver) = socketpair();
    let container = std::fs::File::open("/dev/null").unwrap();
    let cases: [(Vec<u8>, Vec<i32>, &[&str]); 4] = [
        (vec![0x5a; 24], vec![container.as_raw_fd()], &["bad magic"]),
        (header(2, &[]), vec![container.as_raw_fd()], &["version 2"]),
        // An fd where a group's should be: /dev/null is no group.
        (header(1, &[7]), vec![container.as_raw_fd(), container.as_raw_fd()], &["group 7"]),
        (header(1, &[7]), vec![container.as_raw_fd()], &["1 fds came with a message listing 2"]),
    ];
    let (fds_before, _) = fds_and_maps();
    for (bytes, fds, words) in cases {
        send_with_fds(&sender, &bytes, &fds);
        let mut all = vec!["refusing a handed-over context"];
        all.extend(words);
        fails(Iommu::adopt(receiver.as_fd()), libc::EPROTO, &all);
        assert_eq!(fds_and_maps().0, fds_before, "every fd received is closed ({words:?})");
    }
    // The sender gone after half a header.
    send_with_fds(&sender, &header(1, &[])[..10], &[]);
    drop(sender);
    fails(Iommu::adopt(receiver.as_fd()), libc::ECONNRESET, &["receiving a handed-over context"]);
    assert_eq!(fds_and_maps().0, fds_before - 1, "only the sender's end is gone");
}
