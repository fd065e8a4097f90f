//! What a vfio-user server sends: a header and any payload through every decoder (the VERSION
//! JSON, device/IRQ/region info, a region-read reply, a DMA request, a region io fds reply and
//! the doorbells it gives, a device feature reply); an error or a value, never a panic or a
//! hang. And the same bytes as a stream, cut into messages by the client's
//! inbox.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfiokit::vfio_user_proto as proto;

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.first_chunk::<16>() {
        let h = proto::Header::decode(head);
        let _ = (h.is_reply(), h.errno());
    }
    let _ = proto::decode_version(data);
    let _ = proto::decode_device_info(data);
    let _ = proto::decode_irq_info(data);
    let _ = proto::region_info_argsz(data);
    let _ = proto::decode_dma_access(data);
    let count = data.first().map_or(0, |&n| n as usize);
    let _ = proto::decode_region_read(data, count);
    // Sent with as many fds as the first byte says; every doorbell names one of them and
    // rings only at its own offset.
    let fds = count % 17;
    if let Ok(proto::IoFds::Doorbells(bells)) = proto::decode_region_io_fds(data, 0, fds) {
        for b in bells {
            assert!((b.fd_index as usize) < fds);
            let _ = b.rings(b.offset, &data[..data.len().min(8)]);
            assert!(!b.rings(b.offset.wrapping_add(1), &[0]));
        }
    }
    if let Ok(got) = proto::decode_device_feature(data, count) {
        assert!(got.len() <= count);
    }
    let _ = vfiokit::region::decode_region_info(data);
    // Received in pieces of a size the first byte sets: every message taken is one the bytes
    // hold, whole and in order, and none is more than they are.
    let step = 1 + data.first().map_or(0, |&n| n as usize % 64);
    let mut at = 0;
    let mut recv = |buf: &mut [u8]| -> Result<(usize, Vec<std::os::fd::OwnedFd>), ()> {
        let n = step.min(buf.len()).min(data.len() - at);
        buf[..n].copy_from_slice(&data[at..at + n]);
        at += n;
        Ok((n, Vec::new()))
    };
    let mut inbox = proto::Inbox::new();
    let mut taken = 0;
    while let Ok(m) = inbox.read(64 << 10, &mut recv) {
        assert_eq!(m.payload.len() + 16, m.header.size as usize);
        taken += m.header.size as usize;
        assert!(taken <= data.len());
        let _ = inbox.ready(64 << 10);
    }
});
