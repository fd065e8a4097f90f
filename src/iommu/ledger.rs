//! The DMA ledger: one record per mapping of a context, and the IOVA space they are in. Pure.
//!
//! A mapping goes through three phases around the request that makes the backend (kernel or
//! device server) take it, and the one that makes it let go:
//!
//!   reserve_at | reserve_any  ->  Reserved  --commit-->  Live  --retire-->  Retiring
//!        \________ abort (the request failed) ________/                        |
//!                                                             finish (the unmap is done)
//!
//! Its IOVAs are held from the reservation until abort or finish, so no other mapping can be
//! given them while the backend may still hold the old one. Only Live mappings translate, are
//! unmapped by range, and serve a device's DMA.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::dmamap::{DmaMap, DmaMapping};
use crate::iova::{IovaRange, IovaSpace};

/// Whose memory a mapping is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The caller's (map, map_any): unmapped by unmap.
    #[default]
    Caller,
    /// A DMA buffer from `alloc`, whose memory the context owns (and frees).
    Buffer,
    /// An arena of the DMA heap, mapped until the context closes.
    Heap,
}

/// What a mapping is, beyond where it is.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    /// The device may write the memory.
    pub writable: bool,
    pub owner: Owner,
    /// The memfd behind the memory (a DMA buffer's), for backends that map memory by fd.
    pub fd: Option<Arc<OwnedFd>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reserved,
    Live,
    Retiring,
}

/// One mapping: `len` bytes at `vaddr`, at `iova`.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub vaddr: usize,
    pub len: usize,
    pub iova: u64,
    /// An unmapped guard page follows it in the IOVA space (guard mode).
    pub guard: bool,
    pub facts: Facts,
    phase: Phase,
}

impl Record {
    /// A mapping not in a ledger (yet): what a backend is asked to undo when the ledger refuses
    /// a placement.
    pub fn new(vaddr: usize, len: usize, iova: u64, facts: Facts) -> Record {
        Record { vaddr, len, iova, guard: false, facts, phase: Phase::Reserved }
    }

    fn mapping(&self) -> DmaMapping {
        DmaMapping { vaddr: self.vaddr, len: self.len, iova: self.iova }
    }
}

/// Why a reservation at a chosen IOVA was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// It overlaps a mapping (what the kernel calls EEXIST).
    Overlaps(String),
    /// It lies outside the valid ranges.
    Invalid(String),
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    space: IovaSpace,
    /// Every record, whatever its phase, by IOVA.
    records: BTreeMap<u64, Record>,
    /// The Live records, by address too (translate).
    live: DmaMap,
    /// The size of a guard page.
    guard_len: u64,
}

impl Ledger {
    /// An empty ledger whose guard pages are `guard_len` bytes, with no valid IOVA yet.
    pub fn new(guard_len: u64) -> Ledger {
        Ledger { guard_len, ..Ledger::default() }
    }

    pub fn set_valid(&mut self, ranges: Vec<IovaRange>) {
        self.space.set_valid(ranges);
    }

    pub fn valid(&self) -> &[IovaRange] {
        self.space.valid()
    }

    /// The valid ranges, for messages.
    pub fn describe(&self) -> String {
        self.space.describe()
    }

    /// Whether the ledger holds no mapping in any phase.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// How much IOVA space a record holds: its guard page too.
    fn held(&self, r: &Record) -> u64 {
        r.len as u64 + if r.guard { self.guard_len } else { 0 }
    }

    /// Reserves `[iova, iova+len)` for `len` bytes at `vaddr`.
    pub fn reserve_at(
        &mut self,
        vaddr: usize,
        len: usize,
        iova: u64,
        facts: Facts,
    ) -> Result<(), Refused> {
        self.space.claim(iova, len as u64).map_err(|why| {
            match self.space.overlaps(iova, len as u64) {
                true => Refused::Overlaps(why),
                false => Refused::Invalid(why),
            }
        })?;
        self.insert(Record { vaddr, len, iova, guard: false, facts, phase: Phase::Reserved });
        Ok(())
    }

    /// Reserves an IOVA `align`ed for `len` bytes at `vaddr` (and a guard page after it when
    /// `guard`), and returns it; None when no free range fits.
    pub fn reserve_any(
        &mut self,
        vaddr: usize,
        len: usize,
        align: u64,
        guard: bool,
        facts: Facts,
    ) -> Option<u64> {
        let held = len as u64 + if guard { self.guard_len } else { 0 };
        let iova = self.space.alloc(held, align)?;
        self.insert(Record { vaddr, len, iova, guard, facts, phase: Phase::Reserved });
        Some(iova)
    }

    fn insert(&mut self, r: Record) {
        let old = self.records.insert(r.iova, r);
        debug_assert!(old.is_none(), "the IOVA space hands out an IOVA once");
    }

    /// The backend took the mapping at `iova`: from now on it translates and serves DMA. A
    /// mapping already Live stays so.
    pub fn commit(&mut self, iova: u64) {
        let Some(r) = self.records.get_mut(&iova) else { return };
        if r.phase == Phase::Reserved {
            r.phase = Phase::Live;
            let m = r.mapping();
            // Its IOVAs were claimed for it alone, so no other live record overlaps them.
            let added = self.live.insert(m.vaddr, m.len, m.iova);
            debug_assert!(added.is_ok(), "{added:?}");
        }
    }

    /// Forgets the mapping at `iova`, in whatever phase (the backend refused it, or let go of
    /// it), and frees its IOVAs; returns its record.
    pub fn remove(&mut self, iova: u64) -> Option<Record> {
        let r = self.records.remove(&iova)?;
        if r.phase == Phase::Live {
            self.live.remove(r.iova, r.len);
        }
        let released = self.space.release(r.iova, self.held(&r));
        debug_assert!(released, "a record's IOVAs are claimed until it is removed");
        Some(r)
    }

    /// The Live mapping of exactly `[iova, iova+len)`.
    pub fn live_at(&self, iova: u64, len: usize) -> Option<&Record> {
        self.records.get(&iova).filter(|r| r.len == len && r.phase == Phase::Live)
    }

    /// Starts unmapping the Live mapping of exactly `[iova, iova+len)`: it stops translating
    /// and serving DMA, and keeps its IOVAs until [`remove`](Self::remove). None (nothing
    /// changed) if there is no such Live mapping.
    pub fn retire(&mut self, iova: u64, len: usize) -> Option<Record> {
        let r = self.records.get_mut(&iova).filter(|r| r.len == len && r.phase == Phase::Live)?;
        r.phase = Phase::Retiring;
        self.live.remove(iova, len);
        Some(r.clone())
    }

    /// The IOVA of `[vaddr, vaddr+len)` inside one Live mapping (see [`DmaMap::translate`]).
    pub fn translate(&self, vaddr: usize, len: usize) -> Option<u64> {
        self.live.translate(vaddr, len)
    }

    /// The Live record whose IOVA range holds all of `[iova, iova+len)`.
    pub fn containing(&self, iova: u64, len: u64) -> Option<&Record> {
        let m = self.live.containing(iova, len)?;
        self.records.get(&m.iova)
    }

    /// The Live records holding any IOVA in `[iova, last]`, by IOVA.
    pub fn overlapping(&self, iova: u64, last: u64) -> impl Iterator<Item = &Record> + '_ {
        self.live.overlapping(iova, last).filter_map(|m| self.records.get(&m.iova))
    }

    /// The Live records, by IOVA.
    pub fn live(&self) -> impl Iterator<Item = &Record> + '_ {
        self.live.iter().filter_map(|m| self.records.get(&m.iova))
    }

    /// The Live DMA buffer whose memory starts at `vaddr`.
    pub fn buffer_at(&self, vaddr: usize) -> Option<&Record> {
        let iova = self.live.translate(vaddr, 1)?;
        self.records.get(&iova).filter(|r| r.facts.owner == Owner::Buffer && r.vaddr == vaddr)
    }

    /// Every record, whatever its phase (for closing the context).
    pub fn all(&self) -> impl Iterator<Item = &Record> + '_ {
        self.records.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iova::EVERY_IOVA;

    const PAGE: usize = 0x1000;

    fn ledger() -> Ledger {
        let mut l = Ledger::new(PAGE as u64);
        l.set_valid(vec![IovaRange { start: 0, last: 0xff_ffff }]);
        l
    }

    fn plain() -> Facts {
        Facts { writable: true, ..Facts::default() }
    }

    #[test]
    fn a_reserved_mapping_holds_its_iovas_but_does_not_translate() {
        let mut l = ledger();
        l.reserve_at(0x10_0000, PAGE, 0x2000, plain()).unwrap();
        assert_eq!(l.translate(0x10_0000, 1), None, "not Live yet");
        assert!(l.containing(0x2000, 1).is_none(), "serves no DMA yet");
        assert!(matches!(
            l.reserve_at(0x20_0000, PAGE, 0x2000, plain()),
            Err(Refused::Overlaps(_))
        ));
        l.commit(0x2000);
        assert_eq!(l.translate(0x10_0010, 4), Some(0x2010));
        assert_eq!(l.containing(0x2000, PAGE as u64).map(|r| r.vaddr), Some(0x10_0000));
    }

    #[test]
    fn the_backend_refusing_after_a_reserve_leaves_nothing() {
        let mut l = ledger();
        let iova = l.reserve_any(0x10_0000, 2 * PAGE, PAGE as u64, false, plain()).unwrap();
        assert!(l.remove(iova).is_some(), "aborted");
        assert!(l.is_empty());
        assert_eq!(l.translate(0x10_0000, 1), None);
        // The IOVAs are free again: the same allocation gets the same IOVA.
        assert_eq!(l.reserve_any(0x30_0000, 2 * PAGE, PAGE as u64, false, plain()), Some(iova));
        assert!(l.remove(0xdead_0000).is_none(), "nothing to abort");
    }

    #[test]
    fn outside_the_valid_ranges_is_refused_as_invalid() {
        let mut l = ledger();
        let refused = l.reserve_at(0x10_0000, PAGE, 0x100_0000, plain());
        assert!(matches!(refused, Err(Refused::Invalid(ref why)) if why.contains("outside")));
        assert!(l.is_empty());
    }

    #[test]
    fn a_retiring_mapping_keeps_its_iovas_until_removed() {
        let mut l = ledger();
        l.reserve_at(0x10_0000, PAGE, 0x2000, plain()).unwrap();
        assert!(l.retire(0x2000, PAGE).is_none(), "only a Live mapping retires");
        l.commit(0x2000);
        assert!(l.retire(0x2000, 2 * PAGE).is_none(), "the exact length is needed");
        assert!(l.retire(0x2000, PAGE).is_some());
        assert!(l.retire(0x2000, PAGE).is_none(), "retired once: a second unmap finds nothing");
        assert_eq!(l.translate(0x10_0000, 1), None, "no longer translates");
        assert_eq!(l.overlapping(0, u64::MAX).count(), 0, "nor is unmapped by range");
        assert!(l.reserve_at(0x20_0000, PAGE, 0x2000, plain()).is_err(), "IOVAs still held");
        assert!(l.remove(0x2000).is_some());
        assert!(l.reserve_at(0x20_0000, PAGE, 0x2000, plain()).is_ok(), "free after the unmap");
    }

    #[test]
    fn guard_pages_are_held_and_released_with_their_mapping() {
        let mut l = ledger();
        let a = l.reserve_any(0x10_0000, PAGE, PAGE as u64, true, plain()).unwrap();
        let b = l.reserve_any(0x20_0000, PAGE, PAGE as u64, false, plain()).unwrap();
        assert!(b >= a + 2 * PAGE as u64 || b + PAGE as u64 <= a, "b is not in a's guard page");
        assert!(l.reserve_at(0x30_0000, PAGE, a + PAGE as u64, plain()).is_err(), "guard held");
        l.remove(a);
        assert!(l.reserve_at(0x30_0000, PAGE, a + PAGE as u64, plain()).is_ok(), "released");
    }

    #[test]
    fn buffers_are_found_by_their_first_byte_only() {
        let mut l = ledger();
        let facts = Facts { writable: true, owner: Owner::Buffer, fd: None };
        let iova = l.reserve_any(0x10_0000, 2 * PAGE, PAGE as u64, false, facts).unwrap();
        assert!(l.buffer_at(0x10_0000).is_none(), "not Live yet");
        l.commit(iova);
        assert_eq!(l.buffer_at(0x10_0000).map(|r| r.iova), Some(iova));
        assert!(l.buffer_at(0x10_1000).is_none(), "inside, not the start");
        l.reserve_at(0x40_0000, PAGE, 0x8000, plain()).unwrap();
        l.commit(0x8000);
        assert!(l.buffer_at(0x40_0000).is_none(), "a plain mapping is no buffer");
    }

    #[test]
    fn commit_is_idempotent_and_ignores_unknown_iovas() {
        let mut l = Ledger::new(PAGE as u64);
        l.set_valid(vec![EVERY_IOVA]);
        l.reserve_at(0x10_0000, PAGE, 0x2000, plain()).unwrap();
        l.commit(0x2000);
        l.commit(0x2000);
        l.commit(0x9000);
        assert_eq!(l.live().count(), 1);
        assert_eq!(l.all().count(), 1);
    }
}
