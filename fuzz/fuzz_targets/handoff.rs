//! A handoff message (Iommu::adopt): a context, or an error; never a panic. What decodes
//! encodes back to the same bytes (the format has one spelling of each message).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = vfiokit::Handoff::decode(data) {
        assert_eq!(message.encode(), data, "decode then encode is the identity");
        assert_eq!(message.fds(), 1 + message.groups.len() + message.devices.len());
    }
});
