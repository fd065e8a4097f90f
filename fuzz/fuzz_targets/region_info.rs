//! A region-info reply with its capability chain: decoded into a record whose areas lie inside
//! the region, or rejected; never a panic, a hang or an unbounded allocation. The same bytes
//! also go through the BAR attribute decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfiokit::region::{bar_flags, decode_region_info, record};

fuzz_target!(|data: &[u8]| {
    let Ok(info) = decode_region_info(data) else { return };
    let mut areas = Vec::new();
    // The same bytes as BAR registers, so the BAR decoder is fuzzed too.
    let bars: [u32; 6] = std::array::from_fn(|i| {
        data.get(4 * i..4 * i + 4).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()))
    });
    let attrs = bar_flags(&bars, data.len() % 6);
    let r = record(0, &info, attrs, &mut areas);
    assert_eq!(r.num_areas as usize, areas.len());
    for a in &areas {
        assert!(a.size > 0 && a.offset.checked_add(a.size).is_some_and(|end| end <= r.size));
    }
});
