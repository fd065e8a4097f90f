//! The message that hands a DMA context and access to its devices to another process
//! ([`Iommu::export`](crate::Iommu::export) and [`Iommu::adopt`](crate::Iommu::adopt)): pure
//! encoding and decoding. The fds travel beside it (SCM_RIGHTS) in the order it lists them: the
//! context's (the container or /dev/iommu), each group's (type1), each device cdev's (iommufd).
//!
//! Layout, native-endian (both ends are on one machine): magic `vfkHANDO`, version (u32), the
//! context's kind (its `IOMMU_*` code, u32), the IOAS (u32, iommufd), the number of groups
//! (u16) and of devices (u16), then each group's number (u32), then each device's canonical
//! PCI address (12 bytes, "0000:00:02.0").

use crate::caps::{self, DecodeError};
use crate::pci;

const MAGIC: [u8; 8] = *b"vfkHANDO";
const VERSION: u32 = 1;
/// The fixed part: magic, version, kind, IOAS, the two counts.
pub(crate) const HEADER_LEN: usize = 24;
const ADDRESS_LEN: usize = 12;
/// The most groups, and the most devices, one message carries.
pub(crate) const MAX_ITEMS: usize = 64;
/// The most fds one message carries: the context's, and one per group or device.
pub(crate) const MAX_FDS: usize = 1 + 2 * MAX_ITEMS;

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) struct Handoff {
    /// The context's `IOMMU_*` code.
    pub kind: u32,
    pub ioas: u32,
    /// The groups attached to a type1 container (their fds follow the context's).
    pub groups: Vec<u32>,
    /// Canonical PCI addresses of the devices whose cdev fds follow the groups' (iommufd).
    pub devices: Vec<String>,
}

impl Handoff {
    /// How many fds go with the message.
    pub fn fds(&self) -> usize {
        1 + self.groups.len() + self.devices.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        assert!(self.groups.len() <= MAX_ITEMS && self.devices.len() <= MAX_ITEMS);
        let mut out = Vec::with_capacity(len(self.groups.len(), self.devices.len()));
        out.extend(MAGIC);
        for word in [VERSION, self.kind, self.ioas] {
            out.extend(word.to_ne_bytes());
        }
        out.extend((self.groups.len() as u16).to_ne_bytes());
        out.extend((self.devices.len() as u16).to_ne_bytes());
        out.extend(self.groups.iter().flat_map(|g| g.to_ne_bytes()));
        for d in &self.devices {
            assert_eq!(d.len(), ADDRESS_LEN, "canonical PCI address");
            out.extend(d.as_bytes());
        }
        out
    }

    /// The whole message's length, from its first [`HEADER_LEN`] bytes.
    pub fn len_from_header(header: &[u8]) -> Result<usize, DecodeError> {
        let what = "handoff header";
        if header.len() < HEADER_LEN {
            return Err(DecodeError::Truncated { what, need: HEADER_LEN, have: header.len() });
        }
        if header[..8] != MAGIC {
            return Err(malformed(what, "not a vfiokit handoff (bad magic)"));
        }
        let version = caps::u32_at(header, 8, what)?;
        if version != VERSION {
            return Err(malformed(what, format!("version {version}, expected {VERSION}")));
        }
        let count = |at: usize| caps::u16_at(header, at, what).map(usize::from);
        let (groups, devices) = (count(20)?, count(22)?);
        if groups > MAX_ITEMS || devices > MAX_ITEMS {
            return Err(malformed(
                what,
                format!("{groups} groups and {devices} devices ({MAX_ITEMS} of each at most)"),
            ));
        }
        Ok(len(groups, devices))
    }

    /// Decodes a whole message, which must be exactly as long as its header says.
    pub fn decode(bytes: &[u8]) -> Result<Handoff, DecodeError> {
        let expected = Handoff::len_from_header(bytes)?;
        if bytes.len() != expected {
            return Err(malformed(
                "handoff",
                format!("{} bytes where its header says {expected}", bytes.len()),
            ));
        }
        let word = |at: usize| caps::u32_at(bytes, at, "handoff");
        let groups_len = usize::from(caps::u16_at(bytes, 20, "handoff")?);
        let groups =
            (0..groups_len).map(|i| word(HEADER_LEN + 4 * i)).collect::<Result<Vec<u32>, _>>()?;
        let devices = bytes[HEADER_LEN + 4 * groups_len..]
            .chunks_exact(ADDRESS_LEN)
            .map(|raw| {
                let bad = || malformed("handoff", "a device address is not canonical");
                let text = std::str::from_utf8(raw).map_err(|_| bad())?;
                match pci::parse_address(text) {
                    Ok(canonical) if canonical == text => Ok(canonical),
                    _ => Err(bad()),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if has_repeats(&groups) || has_repeats(&devices) {
            return Err(malformed("handoff", "a group or device is listed twice"));
        }
        Ok(Handoff { kind: word(12)?, ioas: word(16)?, groups, devices })
    }
}

fn has_repeats<T: Ord>(items: &[T]) -> bool {
    let mut sorted: Vec<&T> = items.iter().collect();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}

fn malformed(what: &'static str, why: impl Into<String>) -> DecodeError {
    DecodeError::Malformed { what, why: why.into() }
}

fn len(groups: usize, devices: usize) -> usize {
    HEADER_LEN + 4 * groups + ADDRESS_LEN * devices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Handoff {
        Handoff {
            kind: 1,
            ioas: 0,
            groups: vec![3, 7],
            devices: vec!["0000:00:02.0".into(), "0000:01:00.1".into()],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let bytes = h.encode();
        assert_eq!(bytes.len(), 24 + 8 + 24);
        assert_eq!(Handoff::len_from_header(&bytes[..HEADER_LEN]).unwrap(), bytes.len());
        assert_eq!(Handoff::decode(&bytes).unwrap(), h);
        assert_eq!(h.fds(), 5);
    }

    #[test]
    fn corrupted_copies_are_refused() {
        let good = sample().encode();
        let refused = |bytes: &[u8], words: &str| {
            let e = Handoff::decode(bytes).expect_err("refused");
            assert!(e.to_string().contains(words), "{e} lacks {words:?}");
        };
        refused(&good[..HEADER_LEN - 1], "truncated");
        refused(&good[..good.len() - 1], "where its header says");
        let mut longer = good.clone();
        longer.push(0);
        refused(&longer, "where its header says");
        let mut magic = good.clone();
        magic[0] ^= 1;
        refused(&magic, "bad magic");
        let mut version = good.clone();
        version[8] = 9;
        refused(&version, "version 9");
        let mut many = good.clone();
        many[22..24].copy_from_slice(&65u16.to_ne_bytes());
        refused(&many, "65 devices");
        let mut address = good.clone();
        address[HEADER_LEN + 8 + 4] = b'x'; // "0000x00:02.0"
        refused(&address, "not canonical");
        let mut short_form = good.clone();
        short_form[HEADER_LEN + 8 + 11] = b'8'; // function 8 does not exist
        refused(&short_form, "not canonical");
        let mut twice = sample();
        twice.groups = vec![3, 3];
        refused(&twice.encode(), "listed twice");
    }
}
