//! A config space and a capability id: the walk ends, and an offset it finds holds that id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfiokit::pci::{PCI_CAP_EXTENDED, find_capability};

fuzz_target!(|data: &[u8]| {
    let Some((id, config)) = data.split_first_chunk::<4>() else { return };
    let id = u32::from_le_bytes(*id) % (PCI_CAP_EXTENDED + 0x100);
    if let Some(at) = find_capability(config, id) {
        let at = at as usize;
        if id >= PCI_CAP_EXTENDED {
            assert_eq!(
                u16::from_le_bytes([config[at], config[at + 1]]) as u32,
                id - PCI_CAP_EXTENDED
            );
        } else {
            assert_eq!(config[at] as u32, id);
        }
    }
});
