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

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::dmamap::VaddrIndex;
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
    /// A mapping of the caller's file from `map_file`: the context owns the mapping, the
    /// caller the file's pages (never poisoned).
    File,
}

impl Owner {
    /// Memory the context mapped itself and unmaps when the mapping goes (free, close).
    pub fn mapped_by_context(self) -> bool {
        matches!(self, Owner::Buffer | Owner::File)
    }
}

/// What a mapping is, beyond where it is.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    /// The device may write the memory.
    pub writable: bool,
    pub owner: Owner,
    /// The file behind the memory (a DMA buffer's memfd, or the caller's file), for backends
    /// that map memory by fd.
    pub fd: Option<Arc<OwnedFd>>,
    /// Where in `fd` the memory starts.
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reserved,
    Live,
    Retiring,
    /// Unmapped, its IOVAs kept for the next mapping of the same size (see [`Ledger::spares`]).
    Spare,
    /// No record: the slot is free for the next one.
    Vacant,
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
    /// Its layer in the address index, while Live and indexed (see [`Ledger::unindexed`]).
    layer: Option<usize>,
}

impl Record {
    /// A mapping not in a ledger (yet): what a backend is asked to undo when the ledger refuses
    /// a placement.
    pub fn new(vaddr: usize, len: usize, iova: u64, facts: Facts) -> Record {
        Record { vaddr, len, iova, guard: false, facts, phase: Phase::Reserved, layer: None }
    }
}

/// Where a record is kept, from its reservation until it is removed: what the calls that
/// follow a reservation (commit, abort) or a lookup (retire, remove) are given, so that they
/// need not find the record again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot(u32);

/// Why a reservation at a chosen IOVA was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// It overlaps a mapping (what the kernel calls EEXIST).
    Overlaps(String),
    /// It lies outside the valid ranges.
    Invalid(String),
}

/// How many unmapped mappings keep their IOVAs for reuse.
const SPARES: usize = 64;

/// How many Live records wait to be put in the address index (see [`Ledger::unindexed`]).
const UNINDEXED: usize = 8;

/// A spare record's slot and size, so that finding one that fits reads no record.
#[derive(Debug, Clone, Copy)]
struct Spare {
    slot: Slot,
    iova: u64,
    len: usize,
    guard: bool,
}

/// Hashes an IOVA for the exact-IOVA table: a folded multiply, which spreads page-aligned keys
/// over every bit (SipHash, std's default, costs several times as much for one word).
#[derive(Default)]
pub(crate) struct IovaHasher(u64);

impl Hasher for IovaHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let p = u128::from(self.0 ^ x) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (p as u64) ^ (p >> 64) as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// The IOVAs every record holds (its guard page too), which also orders the records.
    space: IovaSpace,
    /// Every record, whatever its phase; a removed one's slot is taken by the next.
    slots: Vec<Record>,
    /// The Vacant slots.
    vacant: Vec<Slot>,
    /// Each record's slot, by its IOVA.
    at: HashMap<u64, Slot, BuildHasherDefault<IovaHasher>>,
    /// The Live records by address (translate), but for those in `unindexed`.
    index: VaddrIndex,
    /// Live records not in the index yet, oldest first: a mapping made and unmapped before
    /// anything is translated (a driver mapping a buffer for one request) never costs an index
    /// insert and remove. Put in the index when more wait, or at the next translation.
    unindexed: Vec<Slot>,
    /// Unmapped records whose IOVAs are still held, most recent last: a driver maps and
    /// unmaps buffers of a few sizes over and over, and taking back a spare's IOVA costs a
    /// lookup where freeing and allocating it again rebuilds the free space around it.
    spares: Vec<Spare>,
    /// The size of a guard page.
    guard_len: u64,
}

impl Ledger {
    /// An empty ledger whose guard pages are `guard_len` bytes, with no valid IOVA yet.
    pub fn new(guard_len: u64) -> Ledger {
        Ledger { guard_len, ..Ledger::default() }
    }

    pub fn set_valid(&mut self, ranges: Vec<IovaRange>) {
        // A spare's IOVAs may fall outside the new ranges: they go back first.
        self.release_spares();
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
        self.at.len() == self.spares.len()
    }

    /// The record in `slot`.
    #[inline]
    pub fn get(&self, slot: Slot) -> &Record {
        &self.slots[slot.0 as usize]
    }

    #[inline]
    fn get_mut(&mut self, slot: Slot) -> &mut Record {
        &mut self.slots[slot.0 as usize]
    }

    /// The record at `iova`, and its slot.
    #[inline]
    fn at(&self, iova: u64) -> Option<(Slot, &Record)> {
        self.at.get(&iova).map(|&slot| (slot, self.get(slot)))
    }

    /// The records starting in `starts`, by IOVA.
    fn in_order(
        &self,
        starts: impl std::ops::RangeBounds<u64>,
    ) -> impl DoubleEndedIterator<Item = (Slot, &Record)> + '_ {
        self.space.mappings_in(starts).map(|(iova, _)| self.at(iova).expect("held by a record"))
    }

    /// Gives every spare's IOVAs back to the IOVA space.
    fn release_spares(&mut self) {
        for spare in std::mem::take(&mut self.spares) {
            self.release(spare);
        }
    }

    /// Gives a spare's IOVAs back to the IOVA space, and its slot to the next record.
    fn release(&mut self, spare: Spare) {
        let held = spare.len as u64 + if spare.guard { self.guard_len } else { 0 };
        let released = self.space.release(spare.iova, held);
        debug_assert!(released, "a spare's IOVAs are claimed");
        self.at.remove(&spare.iova);
        let r = self.get_mut(spare.slot);
        (r.phase, r.facts) = (Phase::Vacant, Facts::default());
        self.vacant.push(spare.slot);
    }

    /// Takes the spare at `at` in the list back for `len` bytes at `vaddr`.
    #[inline(always)]
    fn take_spare(&mut self, at: usize, vaddr: usize, len: usize, facts: Facts) -> Slot {
        let slot = self.spares.swap_remove(at).slot;
        let r = self.get_mut(slot);
        debug_assert_eq!((r.len, r.phase), (len, Phase::Spare));
        (r.vaddr, r.facts, r.phase) = (vaddr, facts, Phase::Reserved);
        slot
    }

    /// Reserves `[iova, iova+len)` for `len` bytes at `vaddr`.
    pub fn reserve_at(
        &mut self,
        vaddr: usize,
        len: usize,
        iova: u64,
        facts: Facts,
    ) -> Result<Slot, Refused> {
        if let Some(at) =
            self.spares.iter().rposition(|s| s.iova == iova && s.len == len && !s.guard)
        {
            return Ok(self.take_spare(at, vaddr, len, facts));
        }
        let claimed = match self.space.claim(iova, len as u64) {
            // A spare may be in the way: the space decides once they are back.
            Err(_) if !self.spares.is_empty() => {
                self.release_spares();
                self.space.claim(iova, len as u64)
            }
            claimed => claimed,
        };
        claimed.map_err(|why| match self.space.overlaps(iova, len as u64) {
            true => Refused::Overlaps(why),
            false => Refused::Invalid(why),
        })?;
        Ok(self.insert(Record { guard: false, ..Record::new(vaddr, len, iova, facts) }))
    }

    /// Reserves an IOVA aligned to `align` (a power of two) for `len` bytes at `vaddr` (and a
    /// guard page after it when `guard`), and returns its slot; None when no free range fits.
    pub fn reserve_any(
        &mut self,
        vaddr: usize,
        len: usize,
        align: u64,
        guard: bool,
        facts: Facts,
    ) -> Option<Slot> {
        let fits = |s: &Spare| s.len == len && s.guard == guard && s.iova & (align.max(1) - 1) == 0;
        if let Some(at) = self.spares.iter().rposition(fits) {
            return Some(self.take_spare(at, vaddr, len, facts));
        }
        let held = len as u64 + if guard { self.guard_len } else { 0 };
        let iova = match self.space.alloc(held, align) {
            None if !self.spares.is_empty() => {
                self.release_spares();
                self.space.alloc(held, align)
            }
            iova => iova,
        }?;
        Some(self.insert(Record { guard, ..Record::new(vaddr, len, iova, facts) }))
    }

    fn insert(&mut self, r: Record) -> Slot {
        let iova = r.iova;
        let slot = match self.vacant.pop() {
            Some(slot) => {
                *self.get_mut(slot) = r;
                slot
            }
            None => {
                let slot = Slot(u32::try_from(self.slots.len()).expect("fewer than 2^32 records"));
                self.slots.push(r);
                slot
            }
        };
        let old = self.at.insert(iova, slot);
        debug_assert!(old.is_none(), "the IOVA space hands out an IOVA once");
        slot
    }

    /// The backend took the reserved mapping in `slot`: from now on it translates and serves
    /// DMA. A mapping already Live stays so.
    #[inline(always)]
    pub fn commit(&mut self, slot: Slot) {
        let r = self.get_mut(slot);
        if r.phase != Phase::Reserved {
            return;
        }
        r.phase = Phase::Live;
        self.unindexed.push(slot);
        if self.unindexed.len() > UNINDEXED {
            let oldest = self.unindexed.remove(0);
            self.put_in_index(oldest);
        }
    }

    fn put_in_index(&mut self, slot: Slot) {
        let r = &mut self.slots[slot.0 as usize];
        r.layer = Some(self.index.insert(r.vaddr, r.len, r.iova));
    }

    /// Takes the Live record in `slot` out of the address index (or the records waiting for it).
    #[inline(always)]
    fn unindex(&mut self, slot: Slot) {
        let r = &mut self.slots[slot.0 as usize];
        match r.layer.take() {
            Some(layer) => self.index.remove(r.vaddr, layer),
            // Most often the last one committed.
            None if self.unindexed.last() == Some(&slot) => {
                self.unindexed.pop();
            }
            None => {
                let at = self.unindexed.iter().rposition(|&s| s == slot);
                self.unindexed.remove(at.expect("a Live record is indexed or waits to be"));
            }
        }
    }

    /// Forgets the mapping in `slot`, in whatever phase (the backend refused it, or let go of
    /// it); its IOVAs stay held for the next mapping of its size until they are needed.
    #[inline(always)]
    pub fn remove(&mut self, slot: Slot) {
        let r = self.get(slot);
        match r.phase {
            Phase::Spare | Phase::Vacant => return,
            Phase::Live => self.unindex(slot),
            Phase::Reserved | Phase::Retiring => {}
        }
        let r = self.get_mut(slot);
        (r.phase, r.facts) = (Phase::Spare, Facts::default());
        let spare = Spare { slot, iova: r.iova, len: r.len, guard: r.guard };
        self.spares.push(spare);
        if self.spares.len() > SPARES {
            let oldest = self.spares.remove(0);
            self.release(oldest);
        }
    }

    /// The Live mapping of exactly `[iova, iova+len)`, and its slot.
    #[inline]
    pub fn live_at(&self, iova: u64, len: usize) -> Option<(Slot, &Record)> {
        self.at(iova).filter(|(_, r)| r.len == len && r.phase == Phase::Live)
    }

    /// Starts unmapping the Live mapping of exactly `[iova, iova+len)` in `slot`: it stops
    /// translating and serving DMA, and keeps its IOVAs until [`remove`](Self::remove). False
    /// (nothing changed) if `slot` holds no such Live mapping (another unmap took it first).
    #[inline(always)]
    pub fn retire(&mut self, slot: Slot, iova: u64, len: usize) -> bool {
        let r = self.get(slot);
        if r.phase != Phase::Live || r.iova != iova || r.len != len {
            return false;
        }
        self.unindex(slot);
        self.get_mut(slot).phase = Phase::Retiring;
        true
    }

    /// The IOVA of `[vaddr, vaddr+len)` inside one Live mapping (see [`VaddrIndex::translate`]).
    pub fn translate(&mut self, vaddr: usize, len: usize) -> Option<u64> {
        for slot in std::mem::take(&mut self.unindexed) {
            self.put_in_index(slot);
        }
        self.index.translate(vaddr, len)
    }

    /// The Live record whose IOVA range holds all of `[iova, iova+len)`.
    pub fn containing(&self, iova: u64, len: u64) -> Option<&Record> {
        let last = iova.checked_add(len.max(1) - 1)?;
        let (_, r) = self.in_order(..=iova).next_back()?;
        (r.phase == Phase::Live && last <= r.iova + (r.len as u64 - 1)).then_some(r)
    }

    /// The Live records holding any IOVA in `[iova, last]`, by IOVA. Records do not overlap, so
    /// only the one starting last before `iova` can reach into the range from below.
    pub fn overlapping(&self, iova: u64, last: u64) -> impl Iterator<Item = (Slot, &Record)> + '_ {
        let reaching_in =
            self.in_order(..iova).next_back().filter(|(_, r)| r.iova + (r.len as u64 - 1) >= iova);
        reaching_in
            .into_iter()
            .chain(self.in_order(iova..=last))
            .filter(|(_, r)| r.phase == Phase::Live)
    }

    /// The Live records, by IOVA.
    pub fn live(&self) -> impl Iterator<Item = (Slot, &Record)> + '_ {
        self.in_order(..).filter(|(_, r)| r.phase == Phase::Live)
    }

    /// Copies of the Live records, by IOVA: what a backend is given to replay or hand over.
    pub fn live_records(&self) -> Vec<Record> {
        self.live().map(|(_, r)| r.clone()).collect()
    }

    /// The Live DMA buffer whose memory starts at `vaddr`, and its slot.
    pub fn buffer_at(&self, vaddr: usize) -> Option<(Slot, &Record)> {
        let is_buffer = |r: &Record| r.facts.owner.mapped_by_context() && r.vaddr == vaddr;
        // A buffer freed soon after its allocation is found among the few not indexed yet.
        let mut waiting = self.unindexed.iter().rev().map(|&s| (s, self.get(s)));
        if let Some(found) = waiting.find(|(_, r)| is_buffer(r)) {
            return Some(found);
        }
        let iova = self.index.translate(vaddr, 1)?;
        self.at(iova).filter(|(_, r)| is_buffer(r))
    }

    /// Every record a backend holds (Reserved, Live or Retiring), for closing the context.
    pub fn all(&self) -> impl Iterator<Item = &Record> + '_ {
        self.slots.iter().filter(|r| !matches!(r.phase, Phase::Spare | Phase::Vacant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::XorShift;
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
        let a = l.reserve_at(0x10_0000, PAGE, 0x2000, plain()).unwrap();
        assert_eq!(l.translate(0x10_0000, 1), None, "not Live yet");
        assert!(l.containing(0x2000, 1).is_none(), "serves no DMA yet");
        assert!(matches!(
            l.reserve_at(0x20_0000, PAGE, 0x2000, plain()),
            Err(Refused::Overlaps(_))
        ));
        l.commit(a);
        assert_eq!(l.translate(0x10_0010, 4), Some(0x2010));
        assert_eq!(l.containing(0x2000, PAGE as u64).map(|r| r.vaddr), Some(0x10_0000));
    }

    #[test]
    fn the_backend_refusing_after_a_reserve_leaves_nothing() {
        let mut l = ledger();
        let a = l.reserve_any(0x10_0000, 2 * PAGE, PAGE as u64, false, plain()).unwrap();
        let iova = l.get(a).iova;
        l.remove(a);
        assert!(l.is_empty(), "aborted");
        assert_eq!(l.translate(0x10_0000, 1), None);
        // The IOVAs are free again: the same allocation gets the same IOVA.
        let b = l.reserve_any(0x30_0000, 2 * PAGE, PAGE as u64, false, plain()).unwrap();
        assert_eq!(l.get(b).iova, iova);
        l.remove(a);
        l.remove(b);
        l.remove(b);
        assert_eq!(l.all().count(), 0, "removed once");
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
        let a = l.reserve_at(0x10_0000, PAGE, 0x2000, plain()).unwrap();
        assert!(!l.retire(a, 0x2000, PAGE), "only a Live mapping retires");
        l.commit(a);
        assert_eq!(l.live_at(0x2000, PAGE).map(|(s, _)| s), Some(a));
        assert!(l.live_at(0x2000, 2 * PAGE).is_none(), "the exact length is needed");
        assert!(!l.retire(a, 0x2000, 2 * PAGE), "the exact length is needed");
        assert!(!l.retire(a, 0x3000, PAGE), "and the exact IOVA");
        assert!(l.retire(a, 0x2000, PAGE));
        assert!(!l.retire(a, 0x2000, PAGE), "retired once: a second unmap finds nothing");
        assert!(l.live_at(0x2000, PAGE).is_none());
        assert_eq!(l.translate(0x10_0000, 1), None, "no longer translates");
        assert_eq!(l.overlapping(0, u64::MAX).count(), 0, "nor is unmapped by range");
        assert!(l.reserve_at(0x20_0000, PAGE, 0x2000, plain()).is_err(), "IOVAs still held");
        l.remove(a);
        assert!(l.reserve_at(0x20_0000, PAGE, 0x2000, plain()).is_ok(), "free after the unmap");
    }

    #[test]
    fn guard_pages_are_held_and_released_with_their_mapping() {
        let mut l = ledger();
        let sa = l.reserve_any(0x10_0000, PAGE, PAGE as u64, true, plain()).unwrap();
        let a = l.get(sa).iova;
        let sb = l.reserve_any(0x20_0000, PAGE, PAGE as u64, false, plain()).unwrap();
        let b = l.get(sb).iova;
        assert!(b >= a + 2 * PAGE as u64 || b + PAGE as u64 <= a, "b is not in a's guard page");
        let sc = l.reserve_any(0x40_0000, PAGE, PAGE as u64, true, plain()).unwrap();
        let c = l.get(sc).iova;
        l.remove(sc);
        let sd = l.reserve_any(0x40_0000, PAGE, PAGE as u64, false, plain()).unwrap();
        assert_ne!(l.get(sd).iova, c, "guard kept");
        assert!(l.reserve_at(0x30_0000, PAGE, a + PAGE as u64, plain()).is_err(), "guard held");
        l.remove(sa);
        assert!(l.reserve_at(0x30_0000, PAGE, a + PAGE as u64, plain()).is_ok(), "released");
    }

    #[test]
    fn buffers_are_found_by_their_first_byte_only() {
        let mut l = ledger();
        let facts = Facts { writable: true, owner: Owner::Buffer, ..Facts::default() };
        let a = l.reserve_any(0x10_0000, 2 * PAGE, PAGE as u64, false, facts.clone()).unwrap();
        assert!(l.buffer_at(0x10_0000).is_none(), "not Live yet");
        l.commit(a);
        assert_eq!(l.buffer_at(0x10_0000).map(|(s, _)| s), Some(a), "found before indexing");
        assert!(l.buffer_at(0x10_1000).is_none(), "inside, not the start");
        let b = l.reserve_at(0x40_0000, PAGE, 0x8000, plain()).unwrap();
        l.commit(b);
        assert!(l.buffer_at(0x40_0000).is_none(), "a plain mapping is no buffer");
        // Once more mappings are Live than wait for the index, through the index.
        for i in 0..2 * UNINDEXED {
            let s = l.reserve_any(0x80_0000 + i * PAGE, PAGE, PAGE as u64, false, facts.clone());
            l.commit(s.unwrap());
        }
        assert!(l.unindexed.len() <= UNINDEXED && !l.unindexed.contains(&a));
        assert_eq!(l.buffer_at(0x10_0000).map(|(s, _)| s), Some(a), "found in the index");
        assert!(l.buffer_at(0x10_1000).is_none());
        assert!(l.buffer_at(0x40_0000).is_none());
    }

    #[test]
    fn unmapped_iovas_are_taken_back_by_the_next_mapping_of_their_size() {
        let mut l = ledger();
        let sa = l.reserve_any(0x10_0000, PAGE, PAGE as u64, false, plain()).unwrap();
        let a = l.get(sa).iova;
        l.commit(sa);
        assert!(l.retire(sa, a, PAGE));
        l.remove(sa);
        assert!(l.is_empty(), "a spare is no mapping");
        assert_eq!(l.all().count(), 0);
        assert_eq!(l.translate(0x10_0000, 1), None);
        let again = l.reserve_any(0x30_0000, PAGE, PAGE as u64, false, plain()).unwrap();
        assert_eq!((again, l.get(again).iova), (sa, a), "taken back");
        l.commit(sa);
        assert_eq!(l.translate(0x30_0000, 1), Some(a), "at its new address");
        assert_eq!(l.translate(0x10_0000, 1), None, "not at its old one");
        // Another size does not take it; a claim over a spare succeeds once spares are back.
        assert!(l.retire(sa, a, PAGE));
        l.remove(sa);
        let sb = l.reserve_any(0x40_0000, 2 * PAGE, 0x10000, false, plain()).unwrap();
        assert_ne!(l.get(sb).iova, a);
        l.reserve_at(0x50_0000, 2 * PAGE, a, plain()).expect("the spare's IOVAs, released");
        assert!(matches!(l.reserve_at(0x60_0000, PAGE, a, plain()), Err(Refused::Overlaps(_))));
    }

    #[test]
    fn spares_go_back_when_the_valid_ranges_change_and_past_their_limit() {
        let mut l = ledger();
        let slots: Vec<Slot> = (0..SPARES + 8)
            .map(|i| {
                l.reserve_any(0x10_0000 + i * PAGE, PAGE, PAGE as u64, false, plain()).unwrap()
            })
            .collect();
        let first = l.get(slots[0]).iova;
        for &slot in &slots {
            l.remove(slot);
        }
        assert_eq!(l.spares.len(), SPARES, "the oldest went back");
        assert_eq!(l.vacant.len(), 8, "their slots are free");
        assert!(l.is_empty());
        l.set_valid(vec![IovaRange { start: 0x10_0000, last: 0x1f_ffff }]);
        assert!(l.spares.is_empty() && l.at.is_empty(), "every spare released");
        assert_eq!(l.vacant.len(), SPARES + 8);
        assert!(l.reserve_at(0, PAGE, first, plain()).is_err(), "outside the new ranges");
        let s = l.reserve_at(0x10_0000, PAGE, 0x10_0000, plain()).unwrap();
        assert!(slots.contains(&s) && l.slots.len() == SPARES + 8, "a vacant slot is taken");
    }

    #[test]
    fn commit_is_idempotent() {
        let mut l = Ledger::new(PAGE as u64);
        l.set_valid(vec![EVERY_IOVA]);
        let a = l.reserve_at(0x10_0000, PAGE, 0x2000, plain()).unwrap();
        l.commit(a);
        l.commit(a);
        assert_eq!(l.unindexed, [a], "once");
        assert_eq!(l.live().count(), 1);
        assert_eq!(l.all().count(), 1);
    }

    #[test]
    fn randomized_against_a_list() {
        for seed in 1..=16u64 {
            let mut rng = XorShift::seeded(seed);
            let mut l = ledger();
            // (slot, vaddr, len, iova) of the Live mappings.
            let mut live: Vec<(Slot, usize, usize, u64)> = Vec::new();
            for step in 0..400 {
                let ctx = format!("seed {seed} step {step}");
                let len = (1 + rng.below(3) as usize) * PAGE;
                // Caller mappings often share memory; a buffer's memory is its own.
                let (vaddr, owner) = match rng.below(4) {
                    0 => (0x100_0000 + (step * 4 + 64) * PAGE, Owner::Buffer),
                    _ => (0x100_0000 + rng.below(32) as usize * PAGE, Owner::Caller),
                };
                let facts = Facts { writable: true, owner, ..Facts::default() };
                match rng.below(8) {
                    0..=2 => {
                        let slot = match rng.below(2) {
                            0 => l.reserve_any(vaddr, len, PAGE as u64, rng.below(4) == 0, facts),
                            _ => {
                                let iova = (1 + rng.below(48)) * PAGE as u64;
                                l.reserve_at(vaddr, len, iova, facts).ok()
                            }
                        };
                        let Some(slot) = slot else { continue };
                        if rng.below(5) == 0 {
                            l.remove(slot);
                            continue;
                        }
                        l.commit(slot);
                        live.push((slot, vaddr, len, l.get(slot).iova));
                    }
                    3..=4 if !live.is_empty() => {
                        let (slot, _, len, iova) =
                            live.swap_remove(rng.below(live.len() as u64) as usize);
                        assert_eq!(l.live_at(iova, len).map(|(s, _)| s), Some(slot), "{ctx}");
                        assert!(l.retire(slot, iova, len), "{ctx}");
                        assert!(!l.retire(slot, iova, len), "{ctx}: retired once");
                        l.remove(slot);
                    }
                    _ => {}
                }
                assert!(l.unindexed.len() <= UNINDEXED, "{ctx}");
                assert_eq!(l.live().count(), live.len(), "{ctx}");
                for &(slot, v, len, iova) in &live {
                    let r = l.containing(iova + len as u64 - 1, 1).expect("Live");
                    assert_eq!((r.vaddr, r.iova), (v, iova), "{ctx}");
                    if l.get(slot).facts.owner == Owner::Buffer && rng.below(2) == 0 {
                        let found = l.buffer_at(v).map(|(s, r)| (s, r.iova));
                        assert_eq!(found, Some((slot, iova)), "{ctx}");
                    }
                }
                if rng.below(4) == 0 {
                    let v = 0x100_0000 + rng.below(36 * PAGE as u64 + 1700 * PAGE as u64) as usize;
                    let holds =
                        |&&(_, mv, ml, _): &&(Slot, usize, usize, u64)| mv <= v && v < mv + ml;
                    match l.translate(v, 1) {
                        Some(iova) => assert!(
                            live.iter()
                                .filter(holds)
                                .any(|&(_, mv, _, mi)| mi + (v - mv) as u64 == iova),
                            "{ctx}: translate({v:#x}) = {iova:#x}"
                        ),
                        None => assert!(!live.iter().any(|m| holds(&m)), "{ctx}: {v:#x}"),
                    }
                    assert!(l.unindexed.is_empty(), "{ctx}: translating indexes every mapping");
                }
            }
        }
    }
}
