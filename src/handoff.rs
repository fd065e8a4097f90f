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
        check_header(header, (HEADER_LEN, MAGIC, VERSION), what, "handoff")?;
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
            .map(|raw| canonical_address(raw, "handoff"))
            .collect::<Result<Vec<_>, _>>()?;
        if has_repeats(&groups) || has_repeats(&devices) {
            return Err(malformed("handoff", "a group or device is listed twice"));
        }
        Ok(Handoff { kind: word(12)?, ioas: word(16)?, groups, devices })
    }
}

/// Checks a header's length, magic and version (`expected`); `name` says what it should be.
fn check_header(
    header: &[u8],
    (len, magic, version): (usize, [u8; 8], u32),
    what: &'static str,
    name: &str,
) -> Result<(), DecodeError> {
    if header.len() < len {
        return Err(DecodeError::Truncated { what, need: len, have: header.len() });
    }
    if header[..8] != magic {
        return Err(malformed(what, format!("not a vfiokit {name} (bad magic)")));
    }
    let found = caps::u32_at(header, 8, what)?;
    if found != version {
        return Err(malformed(what, format!("version {found}, expected {version}")));
    }
    Ok(())
}

/// A device's canonical PCI address as a message carries it (12 bytes).
fn canonical_address(raw: &[u8], what: &'static str) -> Result<String, DecodeError> {
    let bad = || malformed(what, "a device address is not canonical");
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    match pci::parse_address(text) {
        Ok(canonical) if canonical == text => Ok(canonical),
        _ => Err(bad()),
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

/// The live handover's message ([`Iommu::hand_over`](crate::Iommu::hand_over) and
/// [`Iommu::take_over`](crate::Iommu::take_over)): the context with its devices, their routed
/// IRQ vectors and DMA buffers, whose IOMMU mappings stay in place. The fds go beside it, in
/// this order: the container (or /dev/iommu), each group's, each device's (the open VFIO device fd), each
/// pool's (the memfd its buffers are in), each vector's eventfd.
///
/// Layout, native-endian: magic `vfkHOVER`, version (u32), kind (u32), the numbers of groups,
/// devices and pools (u16 each) and a reserved u16, of vectors and of buffers (u32 each), the
/// IOAS (u32: an iommufd context's, else 0) and a reserved u32; then
/// the records: each group's number (u32); each device's canonical address (12 bytes) and a
/// reserved u32; each pool's page shift (u32: 0, 21 or 30) and a reserved u32; each vector
/// (the device's place in the list, u16; the IRQ index, u16; the vector, u32); each buffer
/// (IOVA, length, offset in its pool's file: u64 each; its pool's place, u16; flags, u16:
/// bit 0 writable by the device; a reserved u32). Reserved fields are zero.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) struct Handover {
    pub kind: u32,
    /// An iommufd context's IOAS.
    pub ioas: u32,
    pub groups: Vec<u32>,
    pub devices: Vec<String>,
    /// Each pool's page shift.
    pub pools: Vec<u32>,
    pub vectors: Vec<HandedVector>,
    pub buffers: Vec<HandedBuffer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) struct HandedVector {
    pub device: u16,
    pub index: u16,
    pub vector: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) struct HandedBuffer {
    pub iova: u64,
    pub len: u64,
    pub offset: u64,
    pub pool: u16,
    pub writable: bool,
}

const LIVE_MAGIC: [u8; 8] = *b"vfkHOVER";
const LIVE_VERSION: u32 = 1;
/// The fixed part of a live handover's message.
pub(crate) const LIVE_HEADER_LEN: usize = 40;
/// The most fds one sendmsg carries (the kernel's SCM_MAX_FD): a live handover's limit.
pub(crate) const LIVE_MAX_FDS: usize = 253;
/// The most pools: one a page size (4 KiB, 2 MiB, 1 GiB).
const MAX_POOLS: usize = 3;
/// The most buffers one handover carries.
pub(crate) const MAX_BUFFERS: usize = 1 << 20;
const BUFFER_WRITABLE: u16 = 1;
/// The receiver's answer: magic `vfkTAKEN`, 0 or the errno it refused with (i32), reserved.
pub(crate) const REPLY_LEN: usize = 16;
const REPLY_MAGIC: [u8; 8] = *b"vfkTAKEN";

/// A message's record counts: groups, devices, pools, vectors, buffers.
struct Counts([usize; 5]);

impl Counts {
    fn len(&self) -> usize {
        let [g, d, p, v, b] = self.0;
        LIVE_HEADER_LEN + 4 * g + 16 * d + 8 * p + 8 * v + 32 * b
    }
}

impl Handover {
    /// How many fds go with the message.
    pub fn fds(&self) -> usize {
        1 + self.groups.len() + self.devices.len() + self.pools.len() + self.vectors.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.counts().len());
        out.extend(LIVE_MAGIC);
        out.extend(LIVE_VERSION.to_ne_bytes());
        out.extend(self.kind.to_ne_bytes());
        for n in [self.groups.len(), self.devices.len(), self.pools.len(), 0] {
            out.extend((n as u16).to_ne_bytes());
        }
        out.extend((self.vectors.len() as u32).to_ne_bytes());
        out.extend((self.buffers.len() as u32).to_ne_bytes());
        out.extend(self.ioas.to_ne_bytes());
        out.extend(0u32.to_ne_bytes());
        out.extend(self.groups.iter().flat_map(|g| g.to_ne_bytes()));
        for d in &self.devices {
            assert_eq!(d.len(), ADDRESS_LEN, "canonical PCI address");
            out.extend(d.as_bytes());
            out.extend(0u32.to_ne_bytes());
        }
        for shift in &self.pools {
            out.extend(shift.to_ne_bytes());
            out.extend(0u32.to_ne_bytes());
        }
        for v in &self.vectors {
            out.extend(v.device.to_ne_bytes());
            out.extend(v.index.to_ne_bytes());
            out.extend(v.vector.to_ne_bytes());
        }
        for b in &self.buffers {
            for word in [b.iova, b.len, b.offset] {
                out.extend(word.to_ne_bytes());
            }
            out.extend(b.pool.to_ne_bytes());
            out.extend(if b.writable { BUFFER_WRITABLE } else { 0 }.to_ne_bytes());
            out.extend(0u32.to_ne_bytes());
        }
        out
    }

    fn counts(&self) -> Counts {
        Counts([
            self.groups.len(),
            self.devices.len(),
            self.pools.len(),
            self.vectors.len(),
            self.buffers.len(),
        ])
    }

    /// Refuses what no message may carry (the sender checks before it lets go of anything).
    pub fn check_limits(&self) -> Result<(), DecodeError> {
        check_counts(&self.counts())
    }

    /// The whole message's length, from its first [`LIVE_HEADER_LEN`] bytes.
    pub fn len_from_header(header: &[u8]) -> Result<usize, DecodeError> {
        header_counts(header).map(|c| c.len())
    }

    /// Decodes a whole message, which must be exactly as long as its header says.
    pub fn decode(bytes: &[u8]) -> Result<Handover, DecodeError> {
        let what = "live handover";
        let counts = header_counts(bytes)?;
        if bytes.len() != counts.len() {
            return Err(malformed(
                what,
                format!("{} bytes where its header says {}", bytes.len(), counts.len()),
            ));
        }
        let [g, d, p, v, b] = counts.0;
        let mut at = LIVE_HEADER_LEN;
        let mut take = |size: usize| {
            at += size;
            &bytes[at - size..at]
        };
        let u16_at = |r: &[u8], off| caps::u16_at(r, off, what);
        let u32_at = |r: &[u8], off| caps::u32_at(r, off, what);
        let u64_at = |r: &[u8], off| caps::u64_at(r, off, what);
        let groups = (0..g).map(|_| u32_at(take(4), 0)).collect::<Result<Vec<_>, _>>()?;
        let mut reserved = 0u64;
        let mut devices = Vec::with_capacity(d);
        for _ in 0..d {
            let r = take(16);
            devices.push(canonical_address(&r[..ADDRESS_LEN], what)?);
            reserved |= u64::from(u32_at(r, ADDRESS_LEN)?);
        }
        let mut pools = Vec::with_capacity(p);
        for _ in 0..p {
            let r = take(8);
            match u32_at(r, 0)? {
                shift @ (0 | 21 | 30) => pools.push(shift),
                shift => return Err(malformed(what, format!("a pool of page shift {shift}"))),
            }
            reserved |= u64::from(u32_at(r, 4)?);
        }
        let mut vectors = Vec::with_capacity(v);
        for _ in 0..v {
            let r = take(8);
            let vector =
                HandedVector { device: u16_at(r, 0)?, index: u16_at(r, 2)?, vector: u32_at(r, 4)? };
            if usize::from(vector.device) >= d {
                return Err(malformed(what, format!("a vector of device {}", vector.device)));
            }
            vectors.push(vector);
        }
        let mut buffers = Vec::with_capacity(b);
        for _ in 0..b {
            let r = take(32);
            let (iova, len, offset) = (u64_at(r, 0)?, u64_at(r, 8)?, u64_at(r, 16)?);
            let (pool, flags) = (u16_at(r, 24)?, u16_at(r, 26)?);
            reserved |= u64::from(u32_at(r, 28)?) | u64::from(flags & !BUFFER_WRITABLE);
            let bounded = iova.checked_add(len).is_some() && offset.checked_add(len).is_some();
            if len == 0 || !bounded || usize::from(pool) >= p {
                return Err(malformed(
                    what,
                    format!(
                        "a buffer of {len:#x} bytes at IOVA {iova:#x}, offset {offset:#x} of pool {pool}"
                    ),
                ));
            }
            buffers.push(HandedBuffer { iova, len, offset, pool, writable: flags != 0 });
        }
        if reserved != 0 {
            return Err(malformed(what, "a reserved field or flag is not zero"));
        }
        if has_repeats(&groups)
            || has_repeats(&devices)
            || has_repeats(&pools)
            || has_repeats(&vectors)
        {
            return Err(malformed(what, "a group, device, pool or vector is listed twice"));
        }
        Ok(Handover {
            kind: caps::u32_at(bytes, 12, what)?,
            ioas: caps::u32_at(bytes, 32, what)?,
            groups,
            devices,
            pools,
            vectors,
            buffers,
        })
    }
}

/// The counts a live handover's header gives, checked.
fn header_counts(header: &[u8]) -> Result<Counts, DecodeError> {
    let what = "live handover header";
    check_header(header, (LIVE_HEADER_LEN, LIVE_MAGIC, LIVE_VERSION), what, "live handover")?;
    let short = |at: usize| caps::u16_at(header, at, what).map(usize::from);
    let word = |at: usize| caps::u32_at(header, at, what).map(|n| n as usize);
    if short(22)? != 0 || word(36)? != 0 {
        return Err(malformed(what, "a reserved field is not zero"));
    }
    let counts = Counts([short(16)?, short(18)?, short(20)?, word(24)?, word(28)?]);
    check_counts(&counts)?;
    Ok(counts)
}

fn check_counts(counts: &Counts) -> Result<(), DecodeError> {
    let [g, d, p, v, b] = counts.0;
    let fds = 1 + g + d + p + v;
    if g > MAX_ITEMS || d > MAX_ITEMS || p > MAX_POOLS || b > MAX_BUFFERS || fds > LIVE_MAX_FDS {
        return Err(malformed(
            "live handover",
            format!(
                "{g} groups, {d} devices, {p} pools, {v} vectors and {b} buffers ({MAX_ITEMS} groups and devices, \
                 {MAX_POOLS} pools, {MAX_BUFFERS} buffers and {LIVE_MAX_FDS} fds in all at most)"
            ),
        ));
    }
    Ok(())
}

/// The receiver's answer: 0 (taken) or the errno it refused with.
pub(crate) fn encode_reply(errno: i32) -> [u8; REPLY_LEN] {
    let mut out = [0u8; REPLY_LEN];
    out[..8].copy_from_slice(&REPLY_MAGIC);
    out[8..12].copy_from_slice(&errno.to_ne_bytes());
    out
}

pub(crate) fn decode_reply(bytes: &[u8; REPLY_LEN]) -> Result<i32, DecodeError> {
    let what = "live handover reply";
    if bytes[..8] != REPLY_MAGIC || caps::u32_at(bytes, 12, what)? != 0 {
        return Err(malformed(what, "not a vfiokit live handover reply"));
    }
    Ok(caps::u32_at(bytes, 8, what)? as i32)
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

    fn live_sample() -> Handover {
        Handover {
            kind: 1,
            ioas: 2,
            groups: vec![3, 7],
            devices: vec!["0000:00:04.0".into()],
            pools: vec![0, 21],
            vectors: vec![HandedVector { device: 0, index: 2, vector: 1 }],
            buffers: vec![
                HandedBuffer { iova: 0x1000, len: 0x1000, offset: 0, pool: 0, writable: true },
                HandedBuffer {
                    iova: 0x20_0000,
                    len: 0x20_0000,
                    offset: 0,
                    pool: 1,
                    writable: false,
                },
            ],
        }
    }

    #[test]
    fn live_round_trip() {
        let h = live_sample();
        let bytes = h.encode();
        assert_eq!(bytes.len(), 40 + 8 + 16 + 16 + 8 + 64);
        assert_eq!(Handover::len_from_header(&bytes[..LIVE_HEADER_LEN]).unwrap(), bytes.len());
        assert_eq!(Handover::decode(&bytes).unwrap(), h);
        assert_eq!(h.fds(), 7);
        assert_eq!(decode_reply(&encode_reply(-5)).unwrap(), -5);
        assert_eq!(decode_reply(&encode_reply(0)).unwrap(), 0);
    }

    #[test]
    fn live_corrupted_copies_are_refused() {
        let good = live_sample().encode();
        let refused = |bytes: &[u8], words: &str| {
            let e = Handover::decode(bytes).expect_err("refused");
            assert!(e.to_string().contains(words), "{e} lacks {words:?}");
        };
        let with = |at: usize, patch: &[u8]| {
            let mut b = good.clone();
            b[at..at + patch.len()].copy_from_slice(patch);
            b
        };
        refused(&good[..LIVE_HEADER_LEN - 1], "truncated");
        refused(&good[..good.len() - 1], "where its header says");
        refused(&with(0, b"x"), "bad magic");
        refused(&with(8, &[2]), "version 2");
        refused(&with(22, &[1]), "reserved");
        refused(&with(36, &[1]), "reserved");
        refused(&with(24, &253u32.to_ne_bytes()), "fds in all at most");
        refused(&with(20, &4u16.to_ne_bytes()), "3 pools");
        let records = LIVE_HEADER_LEN + 8;
        refused(&with(records + 4, b"x"), "not canonical");
        refused(&with(records + 12, &[1]), "reserved");
        let pools = records + 16;
        refused(&with(pools, &[12]), "page shift 12");
        refused(&with(pools + 8, &[0]), "listed twice");
        let vectors = pools + 16;
        refused(&with(vectors, &[1]), "a vector of device 1");
        let buffers = vectors + 8;
        refused(&with(buffers + 8, &[0, 0]), "a buffer of 0x0 bytes");
        refused(&with(buffers + 24, &[2]), "of pool 2");
        refused(&with(buffers + 26, &[2]), "reserved");
        refused(&with(buffers, &u64::MAX.to_ne_bytes()), "at IOVA 0xffffffffffffffff");
        let mut many = live_sample();
        many.groups = vec![1; 65];
        assert!(many.check_limits().is_err());
        assert!(decode_reply(b"vfkTAKENxxxxxxxx").is_err());
    }
}
