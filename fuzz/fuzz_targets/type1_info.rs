//! A type1 IOMMU info reply: its IOVA ranges, or an error; never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vfiokit::iova::decode_type1_ranges(data);
});
