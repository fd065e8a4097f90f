//! What a vfio-user server sends: a header and any payload through every decoder (the VERSION
//! JSON, device/IRQ/region info, a region-read reply, a DMA request); an error or a value,
//! never a panic or a hang.
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
    let _ = vfiokit::region::decode_region_info(data);
});
