//! Region records: the kernel's region info (with its capability chain) and the BAR registers
//! of config space, decoded into fixed-size records. Pure: bytes in, records out.

use crate::caps::{self, DecodeError};

/// Region indices of a PCI device: fixed by vfio-pci.
pub const PCI_BAR0: u32 = 0;
pub const PCI_BAR1: u32 = 1;
pub const PCI_BAR2: u32 = 2;
pub const PCI_BAR3: u32 = 3;
pub const PCI_BAR4: u32 = 4;
pub const PCI_BAR5: u32 = 5;
pub const PCI_ROM: u32 = 6;
pub const PCI_CONFIG: u32 = 7;
pub const PCI_VGA: u32 = 8;

/// Region flags.
pub const REGION_PRESENT: u32 = 1 << 0;
pub const REGION_READ: u32 = 1 << 1;
pub const REGION_WRITE: u32 = 1 << 2;
pub const REGION_MMAP: u32 = 1 << 3;
/// The kernel allows mmap of only parts of the region (its areas).
pub const REGION_SPARSE: u32 = 1 << 4;
/// The MSI-X table in this BAR may be mmapped.
pub const REGION_MSIX_MAPPABLE: u32 = 1 << 5;
pub const REGION_IO_PORT: u32 = 1 << 6;
pub const REGION_MEM64: u32 = 1 << 7;
pub const REGION_PREFETCH: u32 = 1 << 8;

/// One region of a device; record `i` describes region index `i`. 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Region {
    pub index: u32,
    /// `VFIOKIT_REGION_*` flags; 0 for an absent region.
    pub flags: u32,
    pub size: u64,
    /// Offset of the region in the device fd, as the kernel reported it.
    pub offset: u64,
    /// Device-specific region type and subtype, 0/0 if none.
    pub r#type: u32,
    pub subtype: u32,
    /// This region's slice of the area array.
    pub first_area: u32,
    pub num_areas: u32,
    pub reserved: [u64; 3],
}

/// An mmappable window of a region. 32 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Area {
    pub region: u32,
    pub reserved0: u32,
    /// Offset and size relative to the region.
    pub offset: u64,
    pub size: u64,
    pub reserved1: u64,
}

const _: () = assert!(size_of::<Region>() == 64 && align_of::<Region>() == 8);
const _: () = assert!(
    std::mem::offset_of!(Region, r#type) == 24 && std::mem::offset_of!(Region, reserved) == 40
);
const _: () = assert!(size_of::<Area>() == 32 && std::mem::offset_of!(Area, offset) == 8);

// Kernel uapi values (linux/vfio.h).
const KFLAG_READ: u32 = 1 << 0;
const KFLAG_WRITE: u32 = 1 << 1;
const KFLAG_MMAP: u32 = 1 << 2;
const KFLAG_CAPS: u32 = 1 << 3;
const CAP_SPARSE_MMAP: u16 = 1;
const CAP_TYPE: u16 = 2;
const CAP_MSIX_MAPPABLE: u16 = 3;
/// `struct vfio_region_info`: argsz, flags, index, cap_offset, size, offset.
const INFO_LEN: usize = 32;

/// What one VFIO_DEVICE_GET_REGION_INFO reply says, capabilities included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) struct RegionInfo {
    pub flags: u32,
    pub size: u64,
    pub offset: u64,
    pub type_subtype: (u32, u32),
    /// The sparse-mmap capability's areas (offset, size), when the kernel sent one.
    pub sparse: Option<Vec<(u64, u64)>>,
    pub msix_mappable: bool,
}

/// Decodes a whole region-info reply (fixed header followed by its capability chain).
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) fn decode_region_info(reply: &[u8]) -> Result<RegionInfo, DecodeError> {
    let what = "region info";
    let flags = caps::u32_at(reply, 4, what)?;
    let mut info = RegionInfo {
        flags,
        size: caps::u64_at(reply, 16, what)?,
        offset: caps::u64_at(reply, 24, what)?,
        ..Default::default()
    };
    if flags & KFLAG_CAPS == 0 {
        return Ok(info);
    }
    for cap in caps::walk(reply, caps::u32_at(reply, 12, what)?, INFO_LEN)? {
        match cap.id {
            CAP_SPARSE_MMAP => info.sparse = Some(decode_sparse(&cap, info.size)?),
            CAP_TYPE => {
                info.type_subtype = (
                    cap.u32_at(8, "region type capability")?,
                    cap.u32_at(12, "region type capability")?,
                )
            }
            CAP_MSIX_MAPPABLE => info.msix_mappable = true,
            // Capabilities no record field describes (NVLink2 link speeds, ...) are skipped.
            _ => {}
        }
    }
    Ok(info)
}

fn decode_sparse(cap: &caps::Cap, region_size: u64) -> Result<Vec<(u64, u64)>, DecodeError> {
    let what = "sparse mmap capability";
    let count = cap.u32_at(8, what)? as usize;
    cap.check_array(16, count, 16, what)?;
    let mut areas = Vec::with_capacity(count);
    for i in 0..count {
        let (offset, size) = (cap.u64_at(16 + 16 * i, what)?, cap.u64_at(24 + 16 * i, what)?);
        if offset.checked_add(size).is_none_or(|end| end > region_size) {
            return Err(DecodeError::OutOfRange {
                what: "sparse mmap area",
                start: offset,
                size,
                limit: region_size,
            });
        }
        if size > 0 {
            areas.push((offset, size));
        }
    }
    Ok(areas)
}

/// The BAR attribute flags of BAR `index` from the six raw BAR registers of config space.
/// The upper half of a 64-bit BAR gets none.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) fn bar_flags(bars: &[u32; 6], index: usize) -> u32 {
    const IO: u32 = 1;
    const MEM_TYPE_64: u32 = 0b100;
    const PREFETCH: u32 = 0b1000;
    let is_mem64 = |raw: u32| raw & IO == 0 && raw & 0b110 == MEM_TYPE_64;
    // Walk from BAR0 so that an upper half is recognized by the BAR below it.
    let mut i = 0;
    while i < index {
        i += if is_mem64(bars[i]) { 2 } else { 1 };
    }
    if i != index {
        return 0;
    }
    let raw = bars[index];
    if raw & IO != 0 {
        return REGION_IO_PORT;
    }
    let mut flags = 0;
    if is_mem64(raw) {
        flags |= REGION_MEM64;
    }
    if raw & PREFETCH != 0 {
        flags |= REGION_PREFETCH;
    }
    flags
}

/// The record for region `index`, appending its areas to `areas`. `bar_attrs` are the BAR
/// flags from [`bar_flags`] (0 for non-BAR regions).
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) fn record(
    index: u32,
    info: &RegionInfo,
    bar_attrs: u32,
    areas: &mut Vec<Area>,
) -> Region {
    let mut flags = 0;
    for (kernel, ours) in
        [(KFLAG_READ, REGION_READ), (KFLAG_WRITE, REGION_WRITE), (KFLAG_MMAP, REGION_MMAP)]
    {
        if info.flags & kernel != 0 {
            flags |= ours;
        }
    }
    if info.size > 0 || flags != 0 {
        flags |= REGION_PRESENT | bar_attrs;
    }
    if info.msix_mappable {
        flags |= REGION_MSIX_MAPPABLE;
    }
    let first_area = areas.len() as u32;
    if flags & REGION_MMAP != 0 {
        match &info.sparse {
            Some(sparse) => {
                flags |= REGION_SPARSE;
                areas.extend(sparse.iter().map(|&(offset, size)| Area {
                    region: index,
                    offset,
                    size,
                    ..Default::default()
                }));
            }
            None if info.size > 0 => {
                areas.push(Area { region: index, offset: 0, size: info.size, ..Default::default() })
            }
            None => {}
        }
    }
    Region {
        index,
        flags,
        size: info.size,
        offset: info.offset,
        r#type: info.type_subtype.0,
        subtype: info.type_subtype.1,
        first_area,
        num_areas: areas.len() as u32 - first_area,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32, cap_offset: u32, size: u64, offset: u64) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [0u32, flags, 0, cap_offset] {
            v.extend(x.to_ne_bytes());
        }
        v.extend(size.to_ne_bytes());
        v.extend(offset.to_ne_bytes());
        v
    }

    fn sparse_cap(next: u32, areas: &[(u64, u64)]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(CAP_SPARSE_MMAP.to_ne_bytes());
        v.extend(1u16.to_ne_bytes());
        v.extend(next.to_ne_bytes());
        v.extend((areas.len() as u32).to_ne_bytes());
        v.extend(0u32.to_ne_bytes());
        for (o, s) in areas {
            v.extend(o.to_ne_bytes());
            v.extend(s.to_ne_bytes());
        }
        v
    }

    use crate::fixtures;

    #[test]
    fn captured_nvme_bar0_is_msix_mappable() {
        let info = decode_region_info(fixtures::NVME_BAR0).unwrap();
        assert_eq!((info.flags, info.size, info.offset), (0xf, 0x4000, 0));
        assert!(info.msix_mappable);
        assert_eq!((info.sparse.as_ref(), info.type_subtype), (None, (0, 0)));
        let mut areas = vec![];
        let r = record(0, &info, REGION_MEM64, &mut areas);
        assert_eq!(
            r.flags,
            REGION_PRESENT
                | REGION_READ
                | REGION_WRITE
                | REGION_MMAP
                | REGION_MSIX_MAPPABLE
                | REGION_MEM64
        );
        assert_eq!(areas, [Area { region: 0, offset: 0, size: 0x4000, ..Default::default() }]);
    }

    #[test]
    fn captured_replies_without_caps() {
        let edu = decode_region_info(fixtures::EDU_BAR0).unwrap();
        assert_eq!((edu.flags, edu.size, edu.msix_mappable), (0x7, 1 << 20, false));
        let config = decode_region_info(fixtures::NVME_CONFIG).unwrap();
        assert_eq!((config.flags, config.size, config.offset), (0x3, 0x1000, 7 << 40));
        let r = record(PCI_CONFIG, &config, 0, &mut vec![]);
        assert_eq!((r.flags, r.num_areas), (REGION_PRESENT | REGION_READ | REGION_WRITE, 0));
    }

    #[test]
    fn captured_reply_corrupted() {
        // The MSIX_MAPPABLE capability pointing at itself.
        let mut looped = fixtures::NVME_BAR0.to_vec();
        looped[36] = 32;
        assert_eq!(decode_region_info(&looped).unwrap_err(), DecodeError::Loop { offset: 32 });
        // Cut inside the capability header.
        assert!(matches!(
            decode_region_info(&fixtures::NVME_BAR0[..36]),
            Err(DecodeError::OutOfBounds { offset: 32, .. })
        ));
        // The chain start moved past the end.
        let mut far = fixtures::NVME_BAR0.to_vec();
        far[12] = 0xf0;
        assert!(matches!(
            decode_region_info(&far),
            Err(DecodeError::OutOfBounds { offset: 0xf0, .. })
        ));
    }

    #[test]
    fn plain_region_without_caps() {
        let info = decode_region_info(&header(0x7, 0, 0x100000, 0)).unwrap();
        assert_eq!((info.flags, info.size, &info.sparse), (0x7, 0x100000, &None));
        let mut areas = vec![];
        let r = record(0, &info, 0, &mut areas);
        assert_eq!(r.flags, REGION_PRESENT | REGION_READ | REGION_WRITE | REGION_MMAP);
        assert_eq!(areas, [Area { region: 0, offset: 0, size: 0x100000, ..Default::default() }]);
    }

    #[test]
    fn sparse_area_count_larger_than_the_reply_is_truncated_not_allocated() {
        let mut reply = header(0xf, 32, 0x4000, 0);
        let mut cap = sparse_cap(0, &[]);
        cap[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        reply.extend(cap);
        assert!(matches!(decode_region_info(&reply), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn sparse_area_beyond_the_region_is_rejected() {
        let mut reply = header(0xf, 32, 0x4000, 0);
        reply.extend(sparse_cap(0, &[(0x3000, 0x2000)]));
        assert!(matches!(decode_region_info(&reply), Err(DecodeError::OutOfRange { .. })));
        let mut reply = header(0xf, 32, 0x4000, 0);
        reply.extend(sparse_cap(0, &[(u64::MAX, 2)]));
        assert!(matches!(decode_region_info(&reply), Err(DecodeError::OutOfRange { .. })));
    }

    #[test]
    fn truncated_header_is_an_error() {
        assert!(matches!(decode_region_info(&[0u8; 20]), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn bar_attributes_follow_64_bit_pairs() {
        // BAR0 64-bit prefetchable memory (BAR1 its upper half), BAR2 I/O, BAR3 32-bit memory.
        let bars = [0xfe00_000c, 0x0000_0001, 0x0000_c001, 0xfd00_0000, 0, 0];
        assert_eq!(bar_flags(&bars, 0), REGION_MEM64 | REGION_PREFETCH);
        assert_eq!(bar_flags(&bars, 1), 0, "upper half of BAR0, though its value looks like I/O");
        assert_eq!(bar_flags(&bars, 2), REGION_IO_PORT);
        assert_eq!(bar_flags(&bars, 3), 0);
    }

    #[test]
    fn absent_region_has_a_zero_record() {
        let mut areas = vec![];
        let r = record(8, &RegionInfo::default(), 0, &mut areas);
        assert_eq!((r.index, r.flags, r.num_areas), (8, 0, 0));
    }
}
