//! A live handover message (Iommu::take_over): a context, or an error; never a panic. What
//! decodes encodes back to the same bytes (reserved fields are zero, flags one spelling).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = vfiokit::Handover::decode(data) {
        assert_eq!(message.encode(), data, "decode then encode is the identity");
        assert!(message.check_limits().is_ok(), "what decodes is within the limits");
    }
});
