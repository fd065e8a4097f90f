//! A device name: parsed into the canonical DDDD:BB:DD.F form, which parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfiokit::pci::parse_address;

fuzz_target!(|name: &str| {
    if let Ok(canonical) = parse_address(name) {
        assert_eq!(canonical.len(), 12);
        assert_eq!(parse_address(&canonical).as_deref(), Ok(canonical.as_str()));
    }
});
