//! Valid IOVA ranges (decoded from the type1 info reply) and the IOVA allocator: first fit
//! inside them. Pure.

use std::collections::BTreeMap;

use crate::caps;

/// An inclusive IOVA range `[start, last]`, as the kernel reports valid ranges. 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IovaRange {
    pub start: u64,
    pub last: u64,
}

/// Tracks which IOVAs are in use: every DMA mapping, at a caller's IOVA or an allocated one.
#[derive(Debug, Default)]
pub(crate) struct IovaSpace {
    valid: Vec<IovaRange>,
    /// start -> length of each mapping.
    used: BTreeMap<u64, u64>,
}

impl IovaSpace {
    /// IOVA 0 is never handed out, so a zero IOVA in a descriptor is always a bug the IOMMU
    /// catches.
    const LOWEST: u64 = 0x1000;

    pub fn new(valid: Vec<IovaRange>) -> Self {
        let mut space = IovaSpace::default();
        space.set_valid(valid);
        space
    }

    /// Replaces the valid ranges (an iommufd IOAS narrows them as devices attach); existing
    /// mappings stay recorded.
    pub fn set_valid(&mut self, mut valid: Vec<IovaRange>) {
        valid.sort_by_key(|r| r.start);
        self.valid = valid;
    }

    pub fn valid(&self) -> &[IovaRange] {
        &self.valid
    }

    fn fits_valid(&self, iova: u64, len: u64) -> bool {
        let Some(last) = iova.checked_add(len - 1) else { return false };
        self.valid.iter().any(|r| r.start <= iova && last <= r.last)
    }

    /// The first mapping that overlaps `[iova, iova+len)`, if any.
    fn overlap(&self, iova: u64, len: u64) -> Option<(u64, u64)> {
        let end = iova.saturating_add(len);
        // Only the mapping starting before `end` with the highest start can overlap... unless
        // it ends before `iova`, in which case nothing does (mappings do not overlap each other).
        self.used.range(..end).next_back().map(|(&s, &l)| (s, l)).filter(|&(s, l)| s + l > iova)
    }

    /// Records a mapping at a chosen IOVA. `Err` names the conflict.
    pub fn claim(&mut self, iova: u64, len: u64) -> Result<(), String> {
        if len == 0 {
            return Err("length is zero".into());
        }
        if !self.fits_valid(iova, len) {
            return Err(format!(
                "[{iova:#x}, +{len:#x}) is outside the valid IOVA ranges {}",
                self.describe()
            ));
        }
        if let Some((s, l)) = self.overlap(iova, len) {
            return Err(format!("[{iova:#x}, +{len:#x}) overlaps the mapping [{s:#x}, +{l:#x})"));
        }
        self.used.insert(iova, len);
        Ok(())
    }

    /// Allocates `len` bytes aligned to `align` (a power of two), lowest address first.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let align_up = |x: u64| x.checked_add(align - 1).map(|v| v & !(align - 1));
        for range in &self.valid {
            let mut at = align_up(range.start.max(Self::LOWEST))?;
            loop {
                let last = at.checked_add(len - 1)?;
                if last > range.last {
                    break;
                }
                match self.overlap(at, len) {
                    None => {
                        self.used.insert(at, len);
                        return Some(at);
                    }
                    Some((s, l)) => at = align_up(s + l)?,
                }
            }
        }
        None
    }

    /// Whether `[iova, iova+len)` is exactly one recorded mapping.
    pub fn is_mapped(&self, iova: u64, len: u64) -> bool {
        self.used.get(&iova) == Some(&len)
    }

    /// Forgets the mapping `[iova, iova+len)`; false if no such mapping was recorded.
    pub fn release(&mut self, iova: u64, len: u64) -> bool {
        self.is_mapped(iova, len) && self.used.remove(&iova).is_some()
    }

    pub fn describe(&self) -> String {
        let parts: Vec<String> =
            self.valid.iter().map(|r| format!("[{:#x}, {:#x}]", r.start, r.last)).collect();
        parts.join(" ")
    }
}

/// Decodes `struct vfio_iommu_type1_info` (argsz, flags, iova_pgsizes, cap_offset, pad) and its
/// IOVA-range capability.
pub fn decode_type1_ranges(reply: &[u8]) -> Result<Vec<IovaRange>, caps::DecodeError> {
    const INFO_CAPS: u32 = 1 << 1;
    const CAP_IOVA_RANGE: u16 = 1;
    let what = "type1 info";
    let flags = caps::u32_at(reply, 4, what)?;
    let first = if flags & INFO_CAPS != 0 { caps::u32_at(reply, 16, what)? } else { 0 };
    for cap in caps::walk(reply, first, 24)? {
        if cap.id == CAP_IOVA_RANGE {
            let what = "IOVA range capability";
            let count = cap.u32_at(8, what)? as usize;
            cap.check_array(16, count, 16, what)?;
            return (0..count)
                .map(|i| {
                    Ok(IovaRange {
                        start: cap.u64_at(16 + 16 * i, what)?,
                        last: cap.u64_at(24 + 16 * i, what)?,
                    })
                })
                .collect();
        }
    }
    Ok(vec![IovaRange { start: 0, last: u64::MAX }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::TYPE1_INFO;

    fn space() -> IovaSpace {
        // Like intel-iommu: everything below 4 GiB but the MSI window, and above.
        IovaSpace::new(vec![
            IovaRange { start: 0xfef0_0000, last: 0xffff_ffff_ffff },
            IovaRange { start: 0, last: 0xfedf_ffff },
        ])
    }

    #[test]
    fn first_fit_from_the_bottom_skipping_zero() {
        let mut s = space();
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x1000));
        assert_eq!(s.alloc(0x2000, 0x1000), Some(0x2000));
        assert_eq!(s.alloc(0x20_0000, 0x20_0000), Some(0x20_0000));
        assert!(s.release(0x1000, 0x1000));
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x1000), "freed space is reused");
    }

    #[test]
    fn allocation_skips_the_hole_between_ranges() {
        let mut s = space();
        let big = s.alloc(0xfed0_0000, 0x1000).unwrap();
        assert_eq!(big, 0x1000);
        // What is left below the hole is too small; the next fit is above it.
        assert_eq!(s.alloc(0x20_0000, 0x1000), Some(0xfef0_0000));
    }

    #[test]
    fn claims_respect_validity_and_overlap() {
        let mut s = space();
        assert!(s.claim(0x10_0000, 0x1000).is_ok());
        assert!(s.claim(0x10_0000, 0x1000).unwrap_err().contains("overlaps"));
        assert!(s.claim(0xf_f000, 0x2000).unwrap_err().contains("overlaps"));
        assert!(s.claim(0xfee0_0000, 0x1000).unwrap_err().contains("outside"));
        assert!(s.claim(u64::MAX, 2).unwrap_err().contains("outside"));
        assert!(s.claim(0x1000, 0).is_err());
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x1000));
        assert!(!s.release(0x10_0000, 0x2000), "release needs the exact mapping");
    }

    #[test]
    fn exhaustion_is_none() {
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: 0x2fff }]);
        assert_eq!(s.alloc(0x2000, 0x1000), Some(0x1000));
        assert_eq!(s.alloc(0x1000, 0x1000), None);
        assert_eq!(s.alloc(u64::MAX, 0x1000), None);
    }

    #[test]
    fn captured_type1_info_gives_the_ranges_around_the_interrupt_window() {
        assert_eq!(
            decode_type1_ranges(TYPE1_INFO).unwrap(),
            [
                IovaRange { start: 0, last: 0xfed_fffff },
                IovaRange { start: 0xfef0_0000, last: 0x7f_ffff_ffff }
            ]
        );
    }

    #[test]
    fn captured_type1_info_corrupted() {
        assert!(matches!(
            decode_type1_ranges(&TYPE1_INFO[..100]),
            Err(caps::DecodeError::Truncated { .. })
        ));
        // The IOVA-range capability (at 0x44) pointing back at the first one.
        let mut looped = TYPE1_INFO.to_vec();
        looped[0x48] = 0x18;
        assert!(matches!(decode_type1_ranges(&looped), Err(caps::DecodeError::Loop { .. })));
        // A range count that would need more bytes than there are.
        let mut counted = TYPE1_INFO.to_vec();
        counted[0x4c..0x50].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(decode_type1_ranges(&counted), Err(caps::DecodeError::Truncated { .. })));
    }

    #[test]
    fn info_without_caps_allows_the_whole_space() {
        let mut plain = TYPE1_INFO[..24].to_vec();
        plain[4] = 1; // PGSIZES only
        assert_eq!(decode_type1_ranges(&plain).unwrap(), [IovaRange { start: 0, last: u64::MAX }]);
    }
}
