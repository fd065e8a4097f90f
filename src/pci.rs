//! PCI addresses and config-space capability walks. Pure.

use crate::caps::{self, DecodeError};

/// Why a name is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a PCI address (expected DDDD:BB:DD.F or BB:DD.F, hex)")]
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) struct BadAddress(pub String);

/// Parses "0000:00:02.0" or "00:02.0" into the canonical lowercase "0000:00:02.0".
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) fn parse_address(name: &str) -> Result<String, BadAddress> {
    let bad = || BadAddress(name.to_owned());
    let hex = |s: &str, len: usize, max: u32| -> Result<u32, BadAddress> {
        let nibbles = (s.len() == len).then(|| s.chars().map(|c| c.to_digit(16)));
        let value = nibbles.and_then(|mut n| n.try_fold(0, |v, d| Some(v << 4 | d?)));
        value.filter(|&v| v <= max).ok_or_else(bad)
    };
    let (rest, function) = name.rsplit_once('.').ok_or_else(bad)?;
    let (domain, bus_device) = match rest.split_once(':') {
        Some((d, bd)) if bd.contains(':') => (hex(d, 4, 0xffff)?, bd),
        _ => (0, rest),
    };
    let (bus, device) = bus_device.split_once(':').ok_or_else(bad)?;
    let (bus, device) = (hex(bus, 2, 0xff)?, hex(device, 2, 0x1f)?);
    let function = hex(function, 1, 7)?;
    // Already canonical (what sysfs and most callers use): no formatting.
    if name.len() == 12 && !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Ok(name.to_owned());
    }
    Ok(address(domain, bus as u8, device << 3 | function))
}

/// The canonical form of a PCI address ("0000:02:00.1"), `devfn` as in config cycles.
fn address(domain: u32, bus: u8, devfn: u32) -> String {
    format!("{domain:04x}:{bus:02x}:{:02x}.{:x}", devfn >> 3, devfn & 7)
}

/// `cap_id` values at or above this select an extended capability (`id + EXTENDED`).
pub const PCI_CAP_EXTENDED: u32 = 0x10000;

const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u8 = 1 << 4;
const CAP_POINTER: usize = 0x34;
const EXT_START: usize = 0x100;

/// The config-space offset of capability `cap_id` (standard below 0x100, extended as
/// `id + PCI_CAP_EXTENDED`), walking the lists in `config` with a bounded number of steps.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) fn find_capability(config: &[u8], cap_id: u32) -> Option<u32> {
    if cap_id >= PCI_CAP_EXTENDED {
        let id = u16::try_from(cap_id - PCI_CAP_EXTENDED).ok()?;
        return find_extended(config, id);
    }
    let id = u8::try_from(cap_id).ok()?;
    if config.get(STATUS)? & STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut pos = (*config.get(CAP_POINTER)? & 0xfc) as usize;
    // 48 steps is the most a 256-byte space can hold past its header; more means a loop.
    for _ in 0..48 {
        if pos < 0x40 {
            return None;
        }
        let (this, next) = (*config.get(pos)?, *config.get(pos + 1)?);
        if this == id {
            return Some(pos as u32);
        }
        pos = (next & 0xfc) as usize;
    }
    None
}

fn find_extended(config: &[u8], id: u16) -> Option<u32> {
    let mut pos = EXT_START;
    for _ in 0..(4096 - EXT_START) / 4 {
        let header = u32::from_le_bytes(config.get(pos..pos + 4)?.try_into().ok()?);
        if header == 0 || header == u32::MAX {
            return None;
        }
        if header as u16 == id {
            return Some(pos as u32);
        }
        pos = ((header >> 20) & 0xffc) as usize;
        if pos < EXT_START {
            return None;
        }
    }
    None
}

/// What `vfiokit_device_get_info` reports of a device: VFIO's device flags and counts, and the
/// identity from its PCI config header, read once at open. 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIOKIT_DEVICE_*`: the kernel's `VFIO_DEVICE_FLAGS_*` as it reports them.
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    /// Base class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub revision: u8,
    pub reserved0: [u8; 7],
    pub reserved: [u64; 4],
}

const _: () =
    assert!(size_of::<DeviceInfo>() == 64 && std::mem::offset_of!(DeviceInfo, revision) == 24);

/// The kernel can reset the device (`VFIO_DEVICE_FLAGS_RESET`).
pub const DEVICE_RESET: u32 = 1 << 0;
/// A PCI device (`VFIO_DEVICE_FLAGS_PCI`): always set for the devices vfiokit opens.
pub const DEVICE_PCI: u32 = 1 << 1;

/// How many bytes of config space [`identify`] and [`bars`] need: the type 0 header.
pub(crate) const HEADER_LEN: usize = 0x40;

/// Fills a [`DeviceInfo`] from VFIO's device info and the first [`HEADER_LEN`] bytes of config
/// space (little-endian); bytes missing from a short `header` read as zero.
pub(crate) fn identify(flags: u32, num_regions: u32, num_irqs: u32, header: &[u8]) -> DeviceInfo {
    let byte = |off: usize| header.get(off).copied().unwrap_or(0);
    let u16_at = |off: usize| u16::from_le_bytes([byte(off), byte(off + 1)]);
    DeviceInfo {
        flags,
        num_regions,
        num_irqs,
        class_code: u32::from_le_bytes([byte(0x09), byte(0x0a), byte(0x0b), 0]),
        vendor_id: u16_at(0x00),
        device_id: u16_at(0x02),
        subsystem_vendor_id: u16_at(0x2c),
        subsystem_id: u16_at(0x2e),
        revision: byte(0x08),
        ..Default::default()
    }
}

/// The six BAR registers of a type 0 header (zeros where `header` is short).
pub(crate) fn bars(header: &[u8]) -> [u32; 6] {
    std::array::from_fn(|i| {
        let at = 0x10 + 4 * i;
        header.get(at..at + 4).map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    })
}

/// A device that a hot reset affects, as VFIO_DEVICE_GET_PCI_HOT_RESET_INFO lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dependent {
    /// Canonical PCI address.
    pub address: String,
    /// Its IOMMU group, or with [`HOT_RESET_DEV_IDS`] its iommufd device id (0: owned by the
    /// caller's iommufd but not opened; u32::MAX: not owned).
    pub id: u32,
}

/// The reply's flag saying its ids are iommufd device ids (the device was opened by its cdev).
pub(crate) const HOT_RESET_DEV_IDS: u32 = 1;

/// Decodes VFIO_DEVICE_GET_PCI_HOT_RESET_INFO's reply: its flags and the affected devices.
pub(crate) fn decode_hot_reset_info(reply: &[u8]) -> Result<(u32, Vec<Dependent>), DecodeError> {
    let what = "hot reset info";
    let flags = caps::u32_at(reply, 4, what)?;
    let count = caps::u32_at(reply, 8, what)? as usize;
    let need = count.checked_mul(8).and_then(|n| n.checked_add(12)).unwrap_or(usize::MAX);
    if reply.len() < need {
        return Err(DecodeError::Truncated { what, need, have: reply.len() });
    }
    let devices = (0..count)
        .map(|i| {
            let at = 12 + 8 * i;
            let domain = caps::u16_at(reply, at + 4, what)?.into();
            Ok(Dependent {
                address: address(domain, reply[at + 6], reply[at + 7].into()),
                id: caps::u32_at(reply, at, what)?,
            })
        })
        .collect::<Result<_, DecodeError>>()?;
    Ok((flags, devices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn identity_of_captured_headers() {
        let edu = identify(DEVICE_RESET | DEVICE_PCI, 9, 5, fixtures::EDU_HEADER);
        assert_eq!((edu.vendor_id, edu.device_id, edu.revision), (0x1234, 0x11e8, 0x10));
        assert_eq!(
            (edu.class_code, edu.subsystem_vendor_id, edu.subsystem_id),
            (0x00ff00, 0x1af4, 0x1100)
        );
        assert_eq!((edu.flags, edu.num_regions, edu.num_irqs), (3, 9, 5));
        let nvme = identify(0, 0, 0, fixtures::NVME_HEADER);
        assert_eq!(
            (nvme.vendor_id, nvme.device_id, nvme.class_code, nvme.revision),
            (0x1b36, 0x0010, 0x010802, 2)
        );
        assert_eq!(bars(fixtures::NVME_HEADER)[0] & 0xf, 0x4, "BAR0: 64-bit memory");
    }

    #[test]
    fn short_headers_read_as_zero() {
        let short = identify(0, 0, 0, &fixtures::NVME_HEADER[..0x0b]);
        assert_eq!((short.vendor_id, short.class_code, short.subsystem_id), (0x1b36, 0x0802, 0));
        assert_eq!(bars(&fixtures::NVME_HEADER[..0x16]), [4, 0, 0, 0, 0, 0], "BAR1 cut short");
        assert_eq!(identify(0, 0, 0, &[]), DeviceInfo::default());
    }

    #[test]
    fn addresses_with_and_without_domain() {
        assert_eq!(parse_address("0000:00:02.0").unwrap(), "0000:00:02.0");
        assert_eq!(parse_address("00:1F.7").unwrap(), "0000:00:1f.7");
        assert_eq!(parse_address("abcd:ff:1f.7").unwrap(), "abcd:ff:1f.7");
        assert_eq!(parse_address("ABCD:FF:1F.7").unwrap(), "abcd:ff:1f.7");
    }

    #[test]
    fn bad_addresses() {
        for bad in [
            "",
            "0:0:0.0",
            "00:20.0",
            "00:02.8",
            "00:02",
            "0000:00:02.0.1",
            "0000:00:00:02.0",
            "zz:00.0",
            "00:02.+",
            "+0:02.0",
            "00:02.0 ",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn config_with_chain(chain: &[(usize, u8, u8)]) -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        c[STATUS] = STATUS_CAP_LIST;
        c[CAP_POINTER] = chain[0].0 as u8;
        for &(pos, id, next) in chain {
            c[pos] = id;
            c[pos + 1] = next;
        }
        c
    }

    #[test]
    fn standard_capabilities() {
        let c = config_with_chain(&[(0x40, 0x01, 0x50), (0x50, 0x05, 0x60), (0x60, 0x11, 0)]);
        assert_eq!(find_capability(&c, 0x05), Some(0x50));
        assert_eq!(find_capability(&c, 0x11), Some(0x60));
        assert_eq!(find_capability(&c, 0x10), None);
    }

    #[test]
    fn standard_loop_terminates() {
        let c = config_with_chain(&[(0x40, 0x01, 0x50), (0x50, 0x05, 0x40)]);
        assert_eq!(find_capability(&c, 0x10), None);
    }

    #[test]
    fn extended_capabilities_and_loops() {
        let mut c = vec![0u8; 4096];
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | 1 << 16 | 0x148 << 20).to_le_bytes());
        c[0x148..0x14c].copy_from_slice(&(0x000eu32 | 1 << 16).to_le_bytes());
        assert_eq!(find_capability(&c, PCI_CAP_EXTENDED + 0x0e), Some(0x148));
        assert_eq!(find_capability(&c, PCI_CAP_EXTENDED + 0x01), Some(0x100));
        assert_eq!(find_capability(&c, PCI_CAP_EXTENDED + 0x10), None);
        c[0x148..0x14c].copy_from_slice(&(0x000eu32 | 0x148 << 20).to_le_bytes());
        assert_eq!(find_capability(&c, PCI_CAP_EXTENDED + 0x10), None);
        // A 256-byte (conventional PCI) config space has no extended list.
        assert_eq!(find_capability(&c[..256], PCI_CAP_EXTENDED + 0x01), None);
    }

    #[test]
    fn hot_reset_info_of_a_two_function_slot() {
        // The 6.12 kernel's reply for 0000:02:00.1 (type1): group 15, functions 0 and 1 of bus 2.
        let mut reply = Vec::new();
        for w in [28u32, 0, 2] {
            reply.extend(w.to_ne_bytes());
        }
        for devfn in [0u8, 1] {
            reply.extend(15u32.to_ne_bytes());
            reply.extend(0u16.to_ne_bytes());
            reply.extend([2, devfn]);
        }
        let (flags, deps) = decode_hot_reset_info(&reply).unwrap();
        assert_eq!(flags, 0);
        let got: Vec<_> = deps.iter().map(|d| (d.address.as_str(), d.id)).collect();
        assert_eq!(got, [("0000:02:00.0", 15), ("0000:02:00.1", 15)]);
        assert!(decode_hot_reset_info(&reply[..reply.len() - 1]).is_err(), "a truncated entry");
        reply[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(decode_hot_reset_info(&reply).is_err(), "a count past the reply");
    }
}
