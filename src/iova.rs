//! Valid IOVA ranges (decoded from the type1 info reply) and the IOVA allocator. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Bound, RangeBounds};

use crate::caps;

/// An inclusive IOVA range `[start, last]`, as the kernel reports valid ranges. 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IovaRange {
    pub start: u64,
    pub last: u64,
}

/// Every IOVA: what a context offers before the kernel reports its ranges, and what a type1
/// reply without the ranges capability means.
pub(crate) const EVERY_IOVA: IovaRange = IovaRange { start: 0, last: u64::MAX };

/// IOVA bookkeeping for one DMA context: the valid IOVA ranges, every recorded mapping (made at
/// a caller's IOVA with [`claim`](Self::claim) or at one picked by [`alloc`](Self::alloc)), and
/// the free space between them.
///
/// Pure: it never talks to the kernel. A driver records a mapping here before (or instead of)
/// asking the IOMMU for it, and releases it once the IOMMU has unmapped it.
///
/// - IOVAs below [`LOWEST`](Self::LOWEST) (the zero page) are never allocated, so a zero IOVA in
///   a descriptor is always a bug the IOMMU catches; a claim there is allowed if it is valid.
/// - Mappings never overlap each other, and are made only inside one valid range.
/// - The valid ranges can change while mappings exist ([`set_valid`](Self::set_valid)); mappings
///   left outside them stay recorded until released.
///
/// Cost, with n mappings: `claim`, `release` and `alloc` are O(log n) (see `alloc` for the one
/// exception); `set_valid` is O(n); `is_mapped` is O(log n).
///
/// Allocation is best fit (the smallest free range that fits, at its lowest suitably aligned
/// address), not lowest address first; it is deterministic: the same sequence of calls always
/// gives the same IOVAs.
#[derive(Debug, Default, Clone)]
pub struct IovaSpace {
    /// Sorted, non-empty, neither overlapping nor adjacent.
    valid: Vec<IovaRange>,
    /// start -> length of each mapping.
    used: BTreeMap<u64, u64>,
    /// The free space: every address at or above `LOWEST` inside a valid range and outside every
    /// mapping, as maximal ranges start -> last (inclusive). Two free ranges are never adjacent.
    free: BTreeMap<u64, u64>,
    /// The same ranges as (size, start), to find the smallest that fits. Sizes cannot overflow:
    /// every free range starts at or above `LOWEST`.
    by_size: BTreeSet<(u64, u64)>,
}

/// How many free ranges `alloc` tries, smallest first, among those large enough for the length
/// but not for every alignment, before it takes the smallest range that fits whatever its
/// alignment.
const ALIGNED_SCAN: usize = 16;

impl IovaSpace {
    /// IOVA 0 is never handed out, so a zero IOVA in a descriptor is always a bug the IOMMU
    /// catches: allocation starts at this address.
    pub const LOWEST: u64 = 0x1000;

    /// An empty space with these valid ranges (as for [`set_valid`](Self::set_valid)).
    pub fn new(valid: Vec<IovaRange>) -> Self {
        let mut space = IovaSpace::default();
        space.set_valid(valid);
        space
    }

    /// Replaces the valid ranges (an iommufd IOAS narrows them as devices attach); existing
    /// mappings stay recorded, even those now outside the valid ranges (their space is not
    /// reused; releasing them gives back only what is still valid). The ranges are kept sorted,
    /// with empty ones (`start > last`) dropped and overlapping or adjacent ones merged. O(n) in
    /// the number of mappings.
    pub fn set_valid(&mut self, mut valid: Vec<IovaRange>) {
        valid.retain(|r| r.start <= r.last);
        valid.sort_by_key(|r| r.start);
        let mut merged: Vec<IovaRange> = Vec::with_capacity(valid.len());
        for r in valid {
            match merged.last_mut() {
                Some(p) if r.start <= p.last.saturating_add(1) => p.last = p.last.max(r.last),
                _ => merged.push(r),
            }
        }
        self.valid = merged;
        self.rebuild_free();
    }

    /// The valid ranges: sorted, neither overlapping nor adjacent.
    pub fn valid(&self) -> &[IovaRange] {
        &self.valid
    }

    /// The number of recorded mappings.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// The recorded mappings, as (iova, length), by IOVA.
    pub fn mappings(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.mappings_in(..)
    }

    /// The recorded mappings starting in `starts`, as (iova, length), by IOVA.
    pub fn mappings_in(
        &self,
        starts: impl RangeBounds<u64>,
    ) -> impl DoubleEndedIterator<Item = (u64, u64)> + '_ {
        self.used.range(starts).map(|(&s, &l)| (s, l))
    }

    fn fits_valid(&self, iova: u64, len: u64) -> bool {
        let Some(last) = iova.checked_add(len - 1) else { return false };
        let i = self.valid.partition_point(|r| r.start <= iova);
        i > 0 && last <= self.valid[i - 1].last
    }

    /// Whether `[iova, iova+len)` overlaps a recorded mapping (what the kernel calls EEXIST).
    pub fn overlaps(&self, iova: u64, len: u64) -> bool {
        len > 0 && self.overlap(iova, iova.saturating_add(len - 1)).is_some()
    }

    /// The mapping that overlaps `[iova, last]`, if any.
    fn overlap(&self, iova: u64, last: u64) -> Option<(u64, u64)> {
        // Only the mapping with the highest start at or before `last` can overlap (mappings do
        // not overlap each other): if it ends before `iova`, every earlier one does too.
        self.used
            .range(..=last)
            .next_back()
            .map(|(&s, &l)| (s, l))
            .filter(|&(s, l)| s + (l - 1) >= iova)
    }

    /// Records a mapping at a chosen IOVA. `Err` names the conflict: the valid ranges when
    /// `[iova, iova+len)` is not inside one of them, or the mapping it overlaps.
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
        let last = iova + (len - 1);
        if let Some((s, l)) = self.overlap(iova, last) {
            return Err(format!("[{iova:#x}, +{len:#x}) overlaps the mapping [{s:#x}, +{l:#x})"));
        }
        self.used.insert(iova, len);
        if last >= Self::LOWEST {
            // Inside a valid range and outside every mapping: free from `LOWEST` on, so inside
            // one (maximal) free range.
            let lo = iova.max(Self::LOWEST);
            match self.free.range(..=lo).next_back().map(|(&s, &l)| (s, l)) {
                Some((fs, fl)) if fl >= last => self.carve(fs, fl, lo, last),
                _ => {
                    debug_assert!(false, "free ranges out of step with the mappings");
                    self.rebuild_free();
                }
            }
        }
        Ok(())
    }

    /// Allocates and records `len` bytes aligned to `align` (a power of two; 0 is taken as 1),
    /// or `None` when no free range fits (or `align` is not a power of two).
    ///
    /// Best fit: among free ranges of at least `len + align - 1` bytes (which fit whatever their
    /// alignment) the smallest, unless one of the few smallest ranges of at least `len` bytes
    /// fits at its own alignment, at the lowest aligned address in the chosen range. O(log n),
    /// except when no free range of `len + align - 1` bytes is left: then every smaller free
    /// range of at least `len` bytes is tried before giving up.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let align = align.max(1);
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        let fit = |start: u64, size: u64| -> Option<u64> {
            let at = start.checked_add(align - 1)? & !(align - 1);
            (at - start <= size.checked_sub(len)?).then_some(at)
        };
        // Ranges of at least `sure` bytes fit at any alignment; smaller ones of at least `len`
        // bytes "maybe" fit.
        let sure = len.checked_add(align - 1);
        let maybe_end = match sure {
            Some(sure) => Bound::Excluded((sure, 0)),
            None => Bound::Unbounded,
        };
        let mut maybe = self.by_size.range((Bound::Included((len, 0)), maybe_end));
        let tried = |&(size, start): &(u64, u64)| {
            fit(start, size).map(|at| (start, start + (size - 1), at))
        };
        let pick = maybe
            .by_ref()
            .take(ALIGNED_SCAN)
            .find_map(tried)
            .or_else(|| {
                sure.and_then(|sure| self.by_size.range((sure, 0)..).next()).and_then(tried)
            })
            .or_else(|| maybe.find_map(tried));
        let (fs, fl, at) = pick?;
        self.carve(fs, fl, at, at + (len - 1));
        self.used.insert(at, len);
        Some(at)
    }

    /// Whether `[iova, iova+len)` is exactly one recorded mapping.
    pub fn is_mapped(&self, iova: u64, len: u64) -> bool {
        self.used.get(&iova) == Some(&len)
    }

    /// Forgets the mapping `[iova, iova+len)` and frees its IOVAs (those still inside the valid
    /// ranges); false if no such mapping was recorded (the exact start and length are needed).
    pub fn release(&mut self, iova: u64, len: u64) -> bool {
        if !self.is_mapped(iova, len) {
            return false;
        }
        self.used.remove(&iova);
        let (lo, last) = (iova.max(Self::LOWEST), iova + (len - 1));
        if last < lo {
            return true;
        }
        let first = self.valid.partition_point(|r| r.last < lo);
        for i in first..self.valid.len() {
            let r = self.valid[i];
            if r.start > last {
                break;
            }
            self.add_free(lo.max(r.start), last.min(r.last));
        }
        true
    }

    /// The valid ranges, as "[start, last] [start, last]".
    pub fn describe(&self) -> String {
        let parts: Vec<String> =
            self.valid.iter().map(|r| format!("[{:#x}, {:#x}]", r.start, r.last)).collect();
        parts.join(" ")
    }

    fn insert_free(&mut self, start: u64, last: u64) {
        self.free.insert(start, last);
        self.by_size.insert((last - start + 1, start));
    }

    fn remove_free(&mut self, start: u64, last: u64) {
        self.free.remove(&start);
        self.by_size.remove(&(last - start + 1, start));
    }

    /// Takes `[lo, hi]` out of the free range `[start, last]` that contains it.
    fn carve(&mut self, start: u64, last: u64, lo: u64, hi: u64) {
        self.remove_free(start, last);
        if start < lo {
            self.insert_free(start, lo - 1);
        }
        if hi < last {
            self.insert_free(hi + 1, last);
        }
    }

    /// Frees `[start, last]` (free of mappings, inside one valid range, at or above `LOWEST`),
    /// merged with the free ranges next to it.
    fn add_free(&mut self, mut start: u64, mut last: u64) {
        let before = self.free.range(..start).next_back().map(|(&s, &l)| (s, l));
        if let Some((ps, pl)) = before.filter(|&(_, pl)| pl + 1 == start) {
            self.remove_free(ps, pl);
            start = ps;
        }
        let after = last.checked_add(1).and_then(|n| self.free.get(&n).map(|&l| (n, l)));
        if let Some((ns, nl)) = after {
            self.remove_free(ns, nl);
            last = nl;
        }
        self.insert_free(start, last);
    }

    /// Recomputes the free ranges from the valid ranges and the mappings. O(n).
    fn rebuild_free(&mut self) {
        let mut pieces = Vec::new();
        for r in &self.valid {
            if r.last < Self::LOWEST {
                continue;
            }
            // The next address that may be free, or None past the end of the range.
            let mut at = Some(r.start.max(Self::LOWEST));
            // A mapping starting below the range may reach into it.
            if let Some((&s, &l)) = self.used.range(..r.start.max(Self::LOWEST)).next_back() {
                let end = s + (l - 1);
                if end >= r.start.max(Self::LOWEST) {
                    at = end.checked_add(1).filter(|&a| a <= r.last);
                }
            }
            if let Some(from) = at {
                for (&s, &l) in self.used.range(from..=r.last) {
                    let Some(a) = at else { break };
                    if s > a {
                        pieces.push((a, s - 1));
                    }
                    at = (s + (l - 1)).checked_add(1).filter(|&a| a <= r.last);
                }
            }
            if let Some(a) = at {
                pieces.push((a, r.last));
            }
        }
        self.free.clear();
        self.by_size.clear();
        for (start, last) in pieces {
            self.insert_free(start, last);
        }
    }

    /// The free ranges, as (start, last), by address.
    #[cfg(test)]
    fn free_ranges(&self) -> Vec<(u64, u64)> {
        assert_eq!(self.free.len(), self.by_size.len(), "both free trees hold the same ranges");
        for (&s, &l) in &self.free {
            assert!(self.by_size.contains(&(l - s + 1, s)), "[{s:#x}, {l:#x}] is in both trees");
        }
        self.free.iter().map(|(&s, &l)| (s, l)).collect()
    }
}

/// Decodes `struct vfio_iommu_type1_info` (argsz, flags, iova_pgsizes, cap_offset, pad) and its
/// IOVA-range capability.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) fn decode_type1_ranges(reply: &[u8]) -> Result<Vec<IovaRange>, caps::DecodeError> {
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
    Ok(vec![EVERY_IOVA])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{TYPE1_INFO, XorShift};

    fn space() -> IovaSpace {
        // Like intel-iommu: everything below 4 GiB but the MSI window, and above.
        IovaSpace::new(vec![
            IovaRange { start: 0xfef0_0000, last: 0xffff_ffff_ffff },
            IovaRange { start: 0, last: 0xfedf_ffff },
        ])
    }

    const PAGE: u64 = 0x1000;
    const MIB: u64 = 1 << 20;

    #[test]
    fn best_fit_from_the_bottom_skipping_zero() {
        let mut s = space();
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x1000));
        assert_eq!(s.alloc(0x2000, 0x1000), Some(0x2000));
        assert_eq!(s.alloc(0x20_0000, 0x20_0000), Some(0x20_0000));
        assert!(s.release(0x1000, 0x1000));
        // Free: the page at 0x1000, the alignment gap [0x4000, 0x1f_ffff], the rest above.
        assert_eq!(s.free_ranges()[..2], [(0x1000, 0x1fff), (0x4000, 0x1f_ffff)]);
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x1000), "the smallest fit: the freed page");
        assert_eq!(s.alloc(0x2000, 0x1000), Some(0x4000), "then the gap, before the large rest");
        assert_eq!(s.len(), 4);
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
        let e = s.claim(0x10_0000, 0x1000).unwrap_err();
        assert!(e.contains("overlaps the mapping [0x100000, +0x1000)"), "{e}");
        assert!(s.claim(0xf_f000, 0x2000).unwrap_err().contains("overlaps"));
        assert!(s.overlaps(0xf_f000, 0x2000) && !s.overlaps(0xf_f000, 0x1000));
        let e = s.claim(0xfee0_0000, 0x1000).unwrap_err();
        assert!(e.contains("outside the valid IOVA ranges [0x0, 0xfedfffff] [0xfef00000,"), "{e}");
        assert!(s.claim(u64::MAX, 2).unwrap_err().contains("outside"));
        assert!(s.claim(0x1000, 0).is_err());
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x1000));
        assert!(!s.release(0x10_0000, 0x2000), "release needs the exact mapping");
        assert!(!s.release(0x10_1000, 0x1000), "release needs the exact mapping");
        assert!(s.is_mapped(0x10_0000, 0x1000));
        assert!(s.release(0x10_0000, 0x1000));
        assert!(!s.release(0x10_0000, 0x1000), "released once");
        assert!(s.claim(0x10_0000, 0x1000).is_ok(), "released space can be claimed again");
    }

    #[test]
    fn the_zero_page_is_claimable_but_never_allocated() {
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: 0x3fff }]);
        assert_eq!(s.free_ranges(), [(0x1000, 0x3fff)]);
        assert!(s.claim(0, 0x2000).is_ok(), "a caller may map IOVA 0 on purpose");
        assert_eq!(s.free_ranges(), [(0x2000, 0x3fff)]);
        assert!(s.release(0, 0x2000));
        assert_eq!(s.free_ranges(), [(0x1000, 0x3fff)]);
        assert_eq!(s.alloc(0x3000, 1), Some(0x1000));
        assert_eq!(s.alloc(0x1000, 1), None, "the zero page is not handed out");
    }

    #[test]
    fn mappings_at_the_top_of_the_address_space() {
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: u64::MAX }]);
        let top = u64::MAX - 0xfff;
        assert!(s.claim(top, 0x1000).is_ok());
        assert!(s.claim(u64::MAX, 1).unwrap_err().contains("overlaps"));
        assert!(s.claim(top - 0x1000, 0x2000).unwrap_err().contains("overlaps"));
        assert_eq!(s.free_ranges().last(), Some(&(0x1000, top - 1)));
        assert!(s.release(top, 0x1000));
        assert_eq!(s.free_ranges(), [(0x1000, u64::MAX)]);
        assert_eq!(s.alloc(u64::MAX - 0xfff, 1), Some(0x1000), "the largest possible allocation");
        assert_eq!(s.free_ranges(), []);
    }

    #[test]
    fn exhaustion_is_none() {
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: 0x2fff }]);
        assert_eq!(s.alloc(0x2000, 0x1000), Some(0x1000));
        assert_eq!(s.alloc(0x1000, 0x1000), None);
        assert_eq!(s.alloc(u64::MAX, 0x1000), None);
        assert_eq!(s.alloc(0x1000, 1 << 63), None);
        assert!(s.release(0x1000, 0x2000));
        // Exhausted page by page; then each freed page is found again.
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x1000));
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x2000));
        assert_eq!(s.alloc(0x1000, 0x1000), None);
        assert!(s.release(0x1000, 0x1000));
        assert_eq!(s.alloc(0x2000, 0x1000), None, "one free page is not two");
        assert_eq!(s.alloc(0x1000, 0x1000), Some(0x1000));
        // Bad arguments are None too.
        assert!(s.release(0x2000, 0x1000));
        assert_eq!(s.alloc(0, 0x1000), None);
        assert_eq!(s.alloc(0x1000, 0x3000), None, "not a power of two");
        assert_eq!(s.alloc(0x1000, 0), Some(0x2000), "alignment 0 is 1");
        assert!(IovaSpace::default().alloc(0x1000, 1).is_none(), "no valid ranges");
    }

    /// Free ranges of 2 MiB at 0x40_0000 (aligned) and at 0x80_1000 (not), and from 16 MiB up.
    fn two_holes() -> IovaSpace {
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: 0x1fff_ffff }]);
        s.claim(0x1000, 0x40_0000 - 0x1000).unwrap();
        s.claim(0x60_0000, 0x20_1000).unwrap();
        s.claim(0xa0_1000, 0x100_0000 - 0xa0_1000).unwrap();
        assert_eq!(
            s.free_ranges(),
            [(0x40_0000, 0x5f_ffff), (0x80_1000, 0xa0_0fff), (0x100_0000, 0x1fff_ffff)]
        );
        s
    }

    #[test]
    fn alignment() {
        let mut s = two_holes();
        assert_eq!(s.alloc(2 * MIB, 2 * MIB), Some(0x40_0000), "an exact, aligned fit first");
        assert_eq!(s.alloc(2 * MIB, 2 * MIB), Some(0x100_0000), "the unaligned hole is skipped");
        assert_eq!(s.alloc(2 * MIB, PAGE), Some(0x80_1000), "which fits page alignment");
        // From the rest (now at 0x120_0000): the gap an alignment leaves stays free.
        assert_eq!(s.alloc(PAGE, 0x40_0000), Some(0x140_0000));
        assert_eq!(s.free_ranges()[..2], [(0x120_0000, 0x13f_ffff), (0x140_1000, 0x1fff_ffff)]);
        assert_eq!(s.alloc(0x1f_f000, PAGE), Some(0x120_0000), "and is used");
        for at in [0x40_0000, 0x100_0000, 0x80_1000, 0x140_0000, 0x120_0000] {
            assert_eq!(at % PAGE, 0);
            assert!(s.mappings().any(|(s, _)| s == at));
        }
    }

    #[test]
    fn small_unaligned_ranges_do_not_hide_a_fit() {
        // Many free ranges large enough for the length but unaligned (more than the allocator
        // tries before taking a range large enough for any alignment), and no large range: the
        // one aligned fit is still found.
        // Holes of 2 MiB at 0x20_1000 + 4 MiB steps, and one aligned at 0xc00_0000.
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: 0xfff_ffff }]);
        let mut next = 0x1000;
        let mut holes = Vec::new();
        for i in 0..(ALIGNED_SCAN as u64 + 8) {
            holes.push(0x20_1000 + i * 0x40_0000);
        }
        holes.push(0xc00_0000);
        for &h in &holes {
            s.claim(next, h - next).unwrap();
            next = h + 2 * MIB;
        }
        s.claim(next, 0x1000_0000 - next).unwrap();
        assert_eq!(s.free_ranges().len(), holes.len());
        assert_eq!(s.alloc(2 * MIB, 2 * MIB), Some(0xc00_0000));
        assert_eq!(s.alloc(2 * MIB, 2 * MIB), None);
        assert_eq!(s.alloc(2 * MIB, PAGE), Some(holes[0]), "the smallest, lowest fit");
    }

    #[test]
    fn fragmentation() {
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: 0xffff_ffff }]);
        let pages: Vec<u64> = (0..64).map(|_| s.alloc(PAGE, PAGE).unwrap()).collect();
        assert_eq!(pages, (1..=64).map(|i| i * PAGE).collect::<Vec<_>>());
        for &p in pages.iter().step_by(2) {
            assert!(s.release(p, PAGE));
        }
        assert_eq!(s.free_ranges().len(), 33, "32 one-page holes and the rest");
        // Two pages fit in no hole: they go above.
        assert_eq!(s.alloc(2 * PAGE, PAGE), Some(65 * PAGE));
        // One page takes a hole: the lowest of the smallest.
        assert_eq!(s.alloc(PAGE, PAGE), Some(PAGE));
        assert_eq!(s.alloc(PAGE, PAGE), Some(3 * PAGE));
        // Freeing pages 4 and 6 merges them with the holes at 5 and 7 into one range.
        assert!(s.release(4 * PAGE, PAGE) && s.release(6 * PAGE, PAGE));
        assert!(s.free_ranges().contains(&(4 * PAGE, 8 * PAGE - 1)));
        assert_eq!(s.alloc(3 * PAGE, PAGE), Some(4 * PAGE), "the merged range fits three pages");
        assert!(s.free_ranges().contains(&(7 * PAGE, 8 * PAGE - 1)));
        // Everything released: one free range again.
        let all: Vec<(u64, u64)> = s.mappings().collect();
        for (at, len) in all {
            assert!(s.release(at, len));
        }
        assert!(s.is_empty());
        assert_eq!(s.free_ranges(), [(0x1000, 0xffff_ffff)]);
    }

    #[test]
    fn set_valid_narrowing_keeps_mappings() {
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: 0xffff_ffff }]);
        assert!(s.claim(0xfee0_0000, 0x1000).is_ok());
        assert!(s.claim(0x10_0000, 0x4000).is_ok());
        let a = s.alloc(PAGE, PAGE).unwrap();
        // A device attaches: the MSI window and everything below 0x10_2000 go away.
        s.set_valid(vec![
            IovaRange { start: 0xfef0_0000, last: 0xffff_ffff },
            IovaRange { start: 0x10_2000, last: 0xfedf_ffff },
        ]);
        assert_eq!(s.len(), 3);
        assert!(s.is_mapped(0xfee0_0000, 0x1000) && s.is_mapped(0x10_0000, 0x4000));
        assert!(s.is_mapped(a, PAGE));
        assert_eq!(s.free_ranges(), [(0x10_4000, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff)]);
        assert!(s.claim(0xfee0_1000, 0x1000).unwrap_err().contains("outside"));
        assert!(s.claim(0x10_3000, 0x1000).unwrap_err().contains("overlaps the mapping [0x100000"));
        // Releasing gives back only what is still valid.
        assert!(s.release(0xfee0_0000, 0x1000));
        assert!(s.release(a, PAGE));
        assert_eq!(s.free_ranges(), [(0x10_4000, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff)]);
        assert!(s.release(0x10_0000, 0x4000));
        assert_eq!(s.free_ranges(), [(0x10_2000, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff)]);
        assert_eq!(s.alloc(PAGE, PAGE), Some(0xfef0_0000), "best fit: the smaller range");
        // Widening again makes the old space allocatable again.
        s.set_valid(vec![IovaRange { start: 0, last: 0xffff_ffff }]);
        assert_eq!(s.free_ranges(), [(0x1000, 0xfeef_ffff), (0xfef0_1000, 0xffff_ffff)]);
    }

    #[test]
    fn set_valid_sorts_and_merges() {
        let mut s = IovaSpace::new(vec![
            IovaRange { start: 0x5000, last: 0x5fff },
            IovaRange { start: 0x9000, last: 0x8000 }, // empty
            IovaRange { start: 0x2000, last: 0x3fff },
            IovaRange { start: 0x3000, last: 0x4fff }, // overlaps the one before
            IovaRange { start: 0x8000, last: 0x8fff },
        ]);
        assert_eq!(
            s.valid(),
            [IovaRange { start: 0x2000, last: 0x5fff }, IovaRange { start: 0x8000, last: 0x8fff }]
        );
        assert_eq!(s.describe(), "[0x2000, 0x5fff] [0x8000, 0x8fff]");
        assert!(s.claim(0x3000, 0x3000).is_ok(), "across what were adjacent ranges");
        assert!(s.claim(0x5000, 0x4000).unwrap_err().contains("outside"));
    }

    #[test]
    fn many_mappings() {
        // 50,000 mappings, half freed at random and allocated again: quadratic bookkeeping
        // would take minutes here.
        let mut s = IovaSpace::new(vec![IovaRange { start: 0, last: (1 << 40) - 1 }]);
        let mut live: Vec<u64> = (0..50_000).map(|_| s.alloc(PAGE, PAGE).unwrap()).collect();
        let mut rng = XorShift(7);
        for _ in 0..25_000 {
            let i = rng.below(live.len() as u64) as usize;
            assert!(s.release(live[i], PAGE));
            live[i] = s.alloc(PAGE, PAGE).unwrap();
            assert_eq!(live[i], live[i] & !(PAGE - 1));
        }
        assert_eq!(s.len(), 50_000);
        assert_eq!(s.free_ranges(), [(50_001 * PAGE, (1 << 40) - 1)], "every hole refilled");
    }

    /// The reference model: one flag per page of a small space.
    const PAGES: u64 = 96;

    struct Model {
        valid: Vec<bool>,
        mapped: Vec<bool>,
        maps: BTreeMap<u64, u64>,
    }

    impl Model {
        fn set_valid(&mut self, ranges: &[IovaRange]) {
            for p in 0..PAGES {
                let a = p * PAGE;
                self.valid[p as usize] =
                    ranges.iter().any(|r| r.start <= a && a + PAGE - 1 <= r.last);
            }
        }

        fn pages(at: u64, len: u64) -> std::ops::Range<u64> {
            at / PAGE..(at + len) / PAGE
        }

        fn claim(&self, at: u64, len: u64) -> Result<(), &'static str> {
            if Self::pages(at, len).any(|p| p >= PAGES || !self.valid[p as usize]) {
                Err("outside")
            } else if Self::pages(at, len).any(|p| self.mapped[p as usize]) {
                Err("overlaps")
            } else {
                Ok(())
            }
        }

        fn can_alloc(&self, len: u64, align: u64) -> bool {
            (1..PAGES)
                .map(|p| p * PAGE)
                .filter(|a| a % align == 0)
                .any(|a| self.claim(a, len).is_ok())
        }

        fn record(&mut self, at: u64, len: u64, on: bool) {
            for p in Self::pages(at, len) {
                self.mapped[p as usize] = on;
            }
            if on {
                self.maps.insert(at, len);
            } else {
                self.maps.remove(&at);
            }
        }

        /// Maximal runs of free pages (valid, unmapped, not the zero page).
        fn free(&self) -> Vec<(u64, u64)> {
            let mut out: Vec<(u64, u64)> = Vec::new();
            for p in 1..PAGES {
                if self.valid[p as usize] && !self.mapped[p as usize] {
                    match out.last_mut() {
                        Some(r) if r.1 + 1 == p * PAGE => r.1 = (p + 1) * PAGE - 1,
                        _ => out.push((p * PAGE, (p + 1) * PAGE - 1)),
                    }
                }
            }
            out
        }
    }

    fn random_ranges(rng: &mut XorShift) -> Vec<IovaRange> {
        (0..1 + rng.below(4))
            .map(|_| {
                let start = rng.below(PAGES) * PAGE;
                // Sometimes empty; claims past the end of the model's space are outside.
                let pages = rng.below(PAGES / 2) as i64 - 2;
                let last = (start as i64 + pages * PAGE as i64 - 1).max(0) as u64;
                IovaRange { start, last: last.min(PAGES * PAGE - 1) }
            })
            .collect()
    }

    #[test]
    fn randomized_against_a_reference_model() {
        for seed in 1..=60u64 {
            let mut rng = XorShift::seeded(seed);
            let first = random_ranges(&mut rng);
            let mut s = IovaSpace::new(first.clone());
            let mut m = Model {
                valid: vec![false; PAGES as usize],
                mapped: vec![false; PAGES as usize],
                maps: BTreeMap::new(),
            };
            m.set_valid(&first);
            for step in 0..600 {
                let ctx = format!("seed {seed} step {step}");
                match rng.below(100) {
                    0..=39 => {
                        let most = if rng.below(4) == 0 { 24 } else { 4 };
                        let len = (1 + rng.below(most)) * PAGE;
                        let align = [1, PAGE, 2 * PAGE, 4 * PAGE, 8 * PAGE][rng.below(5) as usize];
                        let expected = m.can_alloc(len, align);
                        match s.alloc(len, align) {
                            Some(at) => {
                                assert!(expected, "{ctx}: alloc({len:#x}, {align:#x}) = {at:#x}");
                                assert_eq!(at % align.max(PAGE), 0, "{ctx}: aligned");
                                assert!(at >= IovaSpace::LOWEST, "{ctx}: not the zero page");
                                assert_eq!(m.claim(at, len), Ok(()), "{ctx}: valid and free");
                                m.record(at, len, true);
                            }
                            None => assert!(!expected, "{ctx}: alloc({len:#x}, {align:#x}) fits"),
                        }
                    }
                    40..=59 => {
                        let at = rng.below(PAGES) * PAGE;
                        let len = (1 + rng.below(6)) * PAGE;
                        let got = s.claim(at, len);
                        match m.claim(at, len) {
                            Ok(()) => {
                                assert_eq!(got, Ok(()), "{ctx}: claim({at:#x}, {len:#x})");
                                m.record(at, len, true);
                            }
                            Err(why) => {
                                let e = got.expect_err(&ctx);
                                assert!(e.contains(why), "{ctx}: {e} (expected {why})");
                            }
                        }
                    }
                    60..=89 => {
                        let (at, len) = match m.maps.iter().nth(rng.below(8) as usize) {
                            Some((&a, &l)) if rng.below(4) != 0 => (a, l),
                            _ => (rng.below(PAGES) * PAGE, (1 + rng.below(3)) * PAGE),
                        };
                        let expected = m.maps.get(&at) == Some(&len);
                        assert_eq!(s.is_mapped(at, len), expected, "{ctx}: is_mapped");
                        assert_eq!(s.release(at, len), expected, "{ctx}: release");
                        if expected {
                            m.record(at, len, false);
                        }
                    }
                    _ => {
                        let ranges = random_ranges(&mut rng);
                        m.set_valid(&ranges);
                        s.set_valid(ranges);
                    }
                }
                assert_eq!(s.free_ranges(), m.free(), "{ctx}: free ranges");
                assert!(s.mappings().eq(m.maps.iter().map(|(&a, &l)| (a, l))), "{ctx}: mappings");
            }
        }
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
