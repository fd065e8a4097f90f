//! The DMA translation map: which IOVA each mapped range of virtual memory is at. Pure.

use std::collections::BTreeMap;

/// One recorded DMA mapping: `len` bytes at virtual address `vaddr`, at IOVA `iova`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMapping {
    pub vaddr: usize,
    pub len: usize,
    pub iova: u64,
}

/// The DMA mappings of a context by virtual address, to translate a buffer's address into the
/// IOVA a device must use, and by IOVA, to find a mapping's record when it is unmapped.
///
/// The IOVA ranges of the records never overlap (an IOVA stands for one address). Their virtual
/// ranges may: the same memory can be mapped at several IOVAs.
///
/// Cost, with n records: [`remove`](Self::remove) and [`get`](Self::get) are O(log n);
/// [`translate`](Self::translate) and [`insert`](Self::insert) are O(L log n), where L is the
/// number of layers: the records are kept in layers whose virtual ranges do not overlap, each
/// record in the first layer where it overlaps nothing. When no two records share a virtual
/// address (the usual case) L is 1; mapping the same buffer at two IOVAs makes it 2. In general
/// L is at most a small multiple of the largest number of records covering one virtual address
/// (first-fit interval colouring needs at most 8 times as many colours as the best colouring),
/// and it can stay at its past maximum while records remain in the upper layers.
#[derive(Debug, Default, Clone)]
pub struct DmaMap {
    /// iova -> (vaddr, len, layer).
    by_iova: BTreeMap<u64, (usize, usize, usize)>,
    index: VaddrIndex,
}

/// The virtual ranges of DMA mappings, to find the one holding an address: the layers of
/// [`DmaMap`] (see there for their cost), for bookkeeping that keeps its records by IOVA itself.
#[derive(Debug, Default, Clone)]
pub struct VaddrIndex {
    /// Per layer: vaddr -> (len, iova), virtual ranges disjoint within a layer.
    layers: Vec<BTreeMap<usize, (usize, u64)>>,
}

/// The record of `layer` that may contain `addr`: the one starting at or below it, as
/// (vaddr, last byte, iova). Only it can (the layer's ranges do not overlap).
fn below(layer: &BTreeMap<usize, (usize, u64)>, addr: usize) -> Option<(usize, usize, u64)> {
    layer.range(..=addr).next_back().map(|(&v, &(len, iova))| (v, v + (len - 1), iova))
}

impl VaddrIndex {
    /// Records `[vaddr, vaddr+len)` (len > 0, not wrapping) at `iova`; returns its layer, which
    /// [`remove`](Self::remove) needs.
    pub fn insert(&mut self, vaddr: usize, len: usize, iova: u64) -> usize {
        let vlast = vaddr + (len - 1);
        let layer =
            match self.layers.iter().position(|m| below(m, vlast).is_none_or(|r| r.1 < vaddr)) {
                Some(k) => k,
                None => {
                    self.layers.push(BTreeMap::new());
                    self.layers.len() - 1
                }
            };
        self.layers[layer].insert(vaddr, (len, iova));
        layer
    }

    /// Forgets the range recorded at `vaddr` in `layer`.
    pub fn remove(&mut self, vaddr: usize, layer: usize) {
        self.layers[layer].remove(&vaddr);
        while self.layers.last().is_some_and(BTreeMap::is_empty) {
            self.layers.pop();
        }
    }

    /// The IOVA of `vaddr`, when `[vaddr, vaddr+len)` lies wholly inside one recorded range
    /// (`len` 0 is taken as 1); through the lowest layer's where several hold it.
    pub fn translate(&self, vaddr: usize, len: usize) -> Option<u64> {
        let last = vaddr.checked_add(len.max(1) - 1)?;
        self.layers.iter().find_map(|m| {
            below(m, vaddr).filter(|r| last <= r.1).map(|(v, _, iova)| iova + (vaddr - v) as u64)
        })
    }
}

impl DmaMap {
    pub fn new() -> Self {
        DmaMap::default()
    }

    /// Records that `[vaddr, vaddr+len)` is mapped at `iova`. `Err` (and nothing recorded) when
    /// `len` is 0, either range wraps around the end of the address space, or the IOVA range
    /// overlaps a recorded one (naming it).
    pub fn insert(&mut self, vaddr: usize, len: usize, iova: u64) -> Result<(), String> {
        if len == 0 {
            return Err("length is zero".into());
        }
        let (Some(_), Some(ilast)) = (vaddr.checked_add(len - 1), iova.checked_add(len as u64 - 1))
        else {
            return Err(format!(
                "{vaddr:#x}+{len:#x} at IOVA {iova:#x} wraps around the end of the address space"
            ));
        };
        // Only the record starting last at or before `ilast` can overlap (records do not).
        let clash = self.by_iova.range(..=ilast).next_back().map(|(&at, &(v, l, _))| (at, v, l));
        if let Some((at, v, l)) = clash.filter(|&(at, _, l)| at + (l as u64 - 1) >= iova) {
            return Err(format!(
                "IOVA range [{iova:#x}, +{len:#x}) overlaps the recorded mapping of {v:#x}+{l:#x} at IOVA {at:#x}"
            ));
        }
        let layer = self.index.insert(vaddr, len, iova);
        self.by_iova.insert(iova, (vaddr, len, layer));
        Ok(())
    }

    /// Forgets the mapping at exactly `[iova, iova+len)` and returns its virtual address; `None`
    /// (and nothing changed) if there is no such record.
    pub fn remove(&mut self, iova: u64, len: usize) -> Option<usize> {
        let &(vaddr, l, layer) = self.by_iova.get(&iova)?;
        if l != len {
            return None;
        }
        self.by_iova.remove(&iova);
        self.index.remove(vaddr, layer);
        Some(vaddr)
    }

    /// The record of the mapping starting at `iova`.
    pub fn get(&self, iova: u64) -> Option<DmaMapping> {
        self.by_iova.get(&iova).map(|&(vaddr, len, _)| DmaMapping { vaddr, len, iova })
    }

    /// The IOVA of `vaddr`, when `[vaddr, vaddr+len)` lies wholly inside one recorded mapping
    /// (`len` 0 is taken as 1). A range that spans two mappings has no IOVA, even when they are
    /// adjacent in both spaces: a device must not be given one address for it. When several
    /// mappings contain the range, the IOVA is through the one in the lowest layer (see
    /// [`DmaMap`]), always the same one for the same records.
    pub fn translate(&self, vaddr: usize, len: usize) -> Option<u64> {
        self.index.translate(vaddr, len)
    }

    /// The record whose IOVA range holds all of `[iova, iova+len)` (`len` 0 taken as 1).
    pub fn containing(&self, iova: u64, len: u64) -> Option<DmaMapping> {
        let last = iova.checked_add(len.max(1) - 1)?;
        let (&at, &(vaddr, l, _)) = self.by_iova.range(..=iova).next_back()?;
        (last <= at + (l as u64 - 1)).then_some(DmaMapping { vaddr, len: l, iova: at })
    }

    /// The records holding any IOVA in `[iova, last]`, by IOVA: the one starting before `iova`
    /// if it reaches into the range, then those starting inside it.
    pub fn overlapping(&self, iova: u64, last: u64) -> impl Iterator<Item = DmaMapping> + '_ {
        let reaching_in = self
            .by_iova
            .range(..iova)
            .next_back()
            .filter(|&(&at, &(_, len, _))| at + (len as u64 - 1) >= iova);
        reaching_in
            .into_iter()
            .chain(self.by_iova.range(iova..=last))
            .map(|(&iova, &(vaddr, len, _))| DmaMapping { vaddr, len, iova })
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.by_iova.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_iova.is_empty()
    }

    /// The records, by IOVA.
    pub fn iter(&self) -> impl Iterator<Item = DmaMapping> + '_ {
        self.by_iova.iter().map(|(&iova, &(vaddr, len, _))| DmaMapping { vaddr, len, iova })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::XorShift;

    const PAGE: usize = 0x1000;

    fn map() -> DmaMap {
        let mut m = DmaMap::new();
        // Two mappings adjacent in both spaces, and one elsewhere.
        m.insert(0x10_0000, 2 * PAGE, 0x1000).unwrap();
        m.insert(0x10_2000, PAGE, 0x3000).unwrap();
        m.insert(0x7f00_0000, 0x20_0000, 0x20_0000).unwrap();
        m
    }

    #[test]
    fn translate_edges() {
        let m = map();
        assert_eq!(m.translate(0x10_0000, 1), Some(0x1000), "first byte");
        assert_eq!(m.translate(0x10_0000, 0), Some(0x1000), "length 0 is 1");
        assert_eq!(m.translate(0x10_1fff, 1), Some(0x2fff), "last byte");
        assert_eq!(m.translate(0x10_0000, 2 * PAGE), Some(0x1000), "the whole mapping");
        assert_eq!(m.translate(0x10_0000, 2 * PAGE + 1), None, "one byte past the end");
        assert_eq!(m.translate(0x10_1fff, 2), None, "spanning two adjacent mappings");
        assert_eq!(m.translate(0x10_2000, PAGE), Some(0x3000));
        assert_eq!(m.translate(0x10_3000, 1), None, "one past the end");
        assert_eq!(m.translate(0xf_ffff, 1), None, "one before the start");
        assert_eq!(m.translate(0xf_ffff, 2), None, "straddling the start");
        assert_eq!(m.translate(0x7f12_3456, 0x100), Some(0x32_3456), "inside");
        assert_eq!(m.translate(0, 1), None);
        assert_eq!(m.translate(usize::MAX, 2), None, "wraps");
        assert_eq!(m.translate(usize::MAX, 1), None);
    }

    #[test]
    fn containing_finds_the_iova_range() {
        let m = map();
        let first = m.iter().next().unwrap();
        let inside = m.containing(first.iova + 1, first.len as u64 - 1);
        assert_eq!(inside, Some(first));
        assert_eq!(m.containing(first.iova, first.len as u64 + 1), None);
        assert_eq!(m.containing(u64::MAX, 2), None);
        assert_eq!(m.containing(first.iova.wrapping_sub(1), 1).filter(|r| *r == first), None);
    }

    #[test]
    fn overlapping_finds_every_record_touching_the_range() {
        let m = map();
        let iovas = |iova, last| m.overlapping(iova, last).map(|r| r.iova).collect::<Vec<_>>();
        assert_eq!(iovas(0x1000, 0x3fff), [0x1000, 0x3000], "exactly two adjacent records");
        assert_eq!(iovas(0x2000, 0x2fff), [0x1000], "inside one record");
        assert_eq!(iovas(0x2fff, 0x3000), [0x1000, 0x3000], "the seam");
        assert_eq!(iovas(0x4000, 0x1f_ffff), Vec::<u64>::new(), "the gap");
        assert_eq!(iovas(0, 0xfff), Vec::<u64>::new(), "below the first");
        assert_eq!(iovas(0x3fff, 0x20_0000), [0x3000, 0x20_0000], "last byte to first byte");
        assert_eq!(iovas(0x40_0000, u64::MAX), Vec::<u64>::new(), "above the last");
        assert_eq!(iovas(0, u64::MAX).len(), 3, "everything");
    }

    #[test]
    fn removed_mappings_do_not_translate() {
        let mut m = map();
        assert_eq!(m.remove(0x1000, PAGE), None, "the exact length is needed");
        assert_eq!(m.remove(0x2000, PAGE), None, "and the exact start");
        assert_eq!(m.len(), 3);
        assert_eq!(m.remove(0x1000, 2 * PAGE), Some(0x10_0000));
        assert_eq!(m.translate(0x10_0000, 1), None);
        assert_eq!(m.translate(0x10_1fff, 1), None);
        assert_eq!(m.translate(0x10_2000, 1), Some(0x3000), "the neighbour stays");
        assert_eq!(m.remove(0x1000, 2 * PAGE), None, "removed once");
        assert_eq!(m.get(0x3000), Some(DmaMapping { vaddr: 0x10_2000, len: PAGE, iova: 0x3000 }));
        assert_eq!(m.get(0x1000), None);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn insert_refuses_bad_records() {
        let mut m = map();
        assert!(m.insert(0x20_0000, 0, 0x10_0000).unwrap_err().contains("zero"));
        assert!(m.insert(usize::MAX, 2, 0x10_0000).unwrap_err().contains("wraps"));
        assert!(m.insert(0x20_0000, 2, u64::MAX).unwrap_err().contains("wraps"));
        let e = m.insert(0x20_0000, PAGE, 0x2000).unwrap_err();
        assert!(
            e.contains("overlaps the recorded mapping of 0x100000+0x2000 at IOVA 0x1000"),
            "{e}"
        );
        assert!(m.insert(0x20_0000, 2 * PAGE, 0).unwrap_err().contains("overlaps"));
        assert_eq!(m.len(), 3, "nothing recorded");
        assert_eq!(m.translate(0x20_0000, 1), None);
        assert!(m.insert(0x20_0000, PAGE, 0).is_ok(), "IOVA 0 next to a mapping is fine");
    }

    #[test]
    fn overlapping_virtual_ranges() {
        let mut m = DmaMap::new();
        // One buffer at two IOVAs, and a bigger mapping around part of it.
        m.insert(0x10_0000, 4 * PAGE, 0x1_0000).unwrap();
        m.insert(0x10_0000, 4 * PAGE, 0x2_0000).unwrap();
        m.insert(0xf_f000, 3 * PAGE, 0x3_0000).unwrap();
        m.insert(0x10_2000, 4 * PAGE, 0x4_0000).unwrap();
        // Layers: the first; the second; the third; the fourth beside the third.
        assert_eq!(m.index.layers.len(), 3);
        let t = m.translate(0x10_1000, PAGE).unwrap();
        assert!([0x1_1000, 0x2_1000, 0x3_2000].contains(&t), "{t:#x}");
        assert_eq!(m.translate(0x10_1000, PAGE), Some(0x1_1000), "the lowest layer's");
        // Only the third contains this range; only the fourth that one.
        assert_eq!(m.translate(0xf_f800, 0x1000), Some(0x3_0800));
        assert_eq!(m.translate(0x10_4000, 0x2000), Some(0x4_2000));
        // Across the end of the first two: only the fourth.
        assert_eq!(m.translate(0x10_3000, 0x2000), Some(0x4_1000));
        assert_eq!(m.translate(0xf_f000, 6 * PAGE), None, "in no single mapping");
        // Removing the first leaves the others translating.
        assert_eq!(m.remove(0x1_0000, 4 * PAGE), Some(0x10_0000));
        assert_eq!(m.translate(0x10_1000, PAGE), Some(0x2_1000));
        assert_eq!(m.remove(0x2_0000, 4 * PAGE), Some(0x10_0000));
        assert_eq!(m.translate(0x10_1000, PAGE), Some(0x3_2000));
        assert_eq!(m.translate(0x10_2000, 2 * PAGE), Some(0x4_0000));
        // A new record takes the first layer with room; emptied top layers go away.
        m.insert(0x10_0000, PAGE, 0x5_0000).unwrap();
        assert_eq!(m.index.layers[0].len(), 1);
        assert_eq!(m.remove(0x4_0000, 4 * PAGE), Some(0x10_2000));
        assert_eq!(m.remove(0x3_0000, 3 * PAGE), Some(0xf_f000));
        assert_eq!(m.index.layers.len(), 1);
        assert_eq!(m.translate(0x10_0000, PAGE), Some(0x5_0000));
        assert_eq!(m.remove(0x5_0000, PAGE), Some(0x10_0000));
        assert!(m.is_empty() && m.index.layers.is_empty());
    }

    #[test]
    fn randomized_against_a_list() {
        for seed in 1..=24u64 {
            let mut rng = XorShift::seeded(seed);
            let mut m = DmaMap::new();
            let mut list: Vec<DmaMapping> = Vec::new();
            let mut next_iova = 0x1000u64;
            for step in 0..300 {
                let ctx = format!("seed {seed} step {step}");
                if rng.below(3) != 0 || list.is_empty() {
                    // Small virtual space, so that ranges often overlap.
                    let vaddr = 0x1000 + rng.below(64) as usize * 0x100;
                    let len = 1 + rng.below(0x800) as usize;
                    m.insert(vaddr, len, next_iova).unwrap();
                    list.push(DmaMapping { vaddr, len, iova: next_iova });
                    next_iova += len as u64 + rng.below(3) * 0x100;
                } else {
                    let r = list.swap_remove(rng.below(list.len() as u64) as usize);
                    assert_eq!(m.remove(r.iova, r.len), Some(r.vaddr), "{ctx}");
                }
                assert_eq!(m.len(), list.len());
                for _ in 0..12 {
                    let vaddr = 0x0f00 + rng.below(0x5000) as usize;
                    let len = rng.below(0x400) as usize;
                    let last = vaddr + len.max(1) - 1;
                    let inside = |r: &&DmaMapping| r.vaddr <= vaddr && last < r.vaddr + r.len;
                    match m.translate(vaddr, len) {
                        Some(iova) => assert!(
                            list.iter()
                                .filter(inside)
                                .any(|r| r.iova + (vaddr - r.vaddr) as u64 == iova),
                            "{ctx}: translate({vaddr:#x}, {len:#x}) = {iova:#x}"
                        ),
                        None => assert!(
                            !list.iter().any(|r| inside(&r)),
                            "{ctx}: translate({vaddr:#x}, {len:#x}) is None"
                        ),
                    }
                }
            }
        }
    }
}
