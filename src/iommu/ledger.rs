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
    /// Its layer in the address index, while Live.
    layer: usize,
}

impl Record {
    /// A mapping not in a ledger (yet): what a backend is asked to undo when the ledger refuses
    /// a placement.
    pub fn new(vaddr: usize, len: usize, iova: u64, facts: Facts) -> Record {
        Record { vaddr, len, iova, guard: false, facts, phase: Phase::Reserved, layer: 0 }
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

/// How many unmapped mappings keep their IOVAs for reuse.
const SPARES: usize = 64;

/// A spare record's key and size, so that finding one that fits reads no record.
#[derive(Debug, Clone, Copy)]
struct Spare {
    iova: u64,
    len: usize,
    guard: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    space: IovaSpace,
    /// Every record, whatever its phase, by IOVA.
    records: BTreeMap<u64, Record>,
    /// The Live records by address (translate).
    index: VaddrIndex,
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
        self.records.len() == self.spares.len()
    }

    /// How much IOVA space a record holds: its guard page too.
    fn held(&self, r: &Record) -> u64 {
        r.len as u64 + if r.guard { self.guard_len } else { 0 }
    }

    /// Gives every spare's IOVAs back to the IOVA space.
    fn release_spares(&mut self) {
        for spare in std::mem::take(&mut self.spares) {
            let r = self.records.remove(&spare.iova).expect("spares are records");
            let released = self.space.release(r.iova, self.held(&r));
            debug_assert!(released, "a spare's IOVAs are claimed");
        }
    }

    /// Takes the spare at `iova` back for `len` bytes at `vaddr`, if there is one that size.
    fn take_spare(&mut self, at: usize, vaddr: usize, len: usize, facts: Facts) -> u64 {
        let iova = self.spares.swap_remove(at).iova;
        let r = self.records.get_mut(&iova).expect("spares are records");
        debug_assert_eq!(r.len, len);
        (r.vaddr, r.facts, r.phase) = (vaddr, facts, Phase::Reserved);
        iova
    }

    /// Reserves `[iova, iova+len)` for `len` bytes at `vaddr`.
    pub fn reserve_at(
        &mut self,
        vaddr: usize,
        len: usize,
        iova: u64,
        facts: Facts,
    ) -> Result<(), Refused> {
        if let Some(at) =
            self.spares.iter().rposition(|s| s.iova == iova && s.len == len && !s.guard)
        {
            self.take_spare(at, vaddr, len, facts);
            return Ok(());
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
        self.insert(Record { guard: false, ..Record::new(vaddr, len, iova, facts) });
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
        let fits = |s: &Spare| s.len == len && s.guard == guard && s.iova % align.max(1) == 0;
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
        self.insert(Record { guard, ..Record::new(vaddr, len, iova, facts) });
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
            r.layer = self.index.insert(r.vaddr, r.len, r.iova);
        }
    }

    /// Forgets the mapping at `iova`, in whatever phase (the backend refused it, or let go of
    /// it); its IOVAs stay held for the next mapping of its size until they are needed.
    pub fn remove(&mut self, iova: u64) {
        let Some(r) = self.records.get_mut(&iova).filter(|r| r.phase != Phase::Spare) else {
            return;
        };
        if r.phase == Phase::Live {
            self.index.remove(r.vaddr, r.layer);
        }
        (r.phase, r.facts) = (Phase::Spare, Facts::default());
        self.spares.push(Spare { iova, len: r.len, guard: r.guard });
        if self.spares.len() > SPARES {
            let oldest = self.spares.remove(0);
            let r = self.records.remove(&oldest.iova).expect("spares are records");
            self.space.release(r.iova, self.held(&r));
        }
    }

    /// The Live mapping of exactly `[iova, iova+len)`.
    pub fn live_at(&self, iova: u64, len: usize) -> Option<&Record> {
        self.records.get(&iova).filter(|r| r.len == len && r.phase == Phase::Live)
    }

    /// Starts unmapping the Live mapping of exactly `[iova, iova+len)`: it stops translating
    /// and serving DMA, and keeps its IOVAs until [`remove`](Self::remove). False (nothing
    /// changed) if there is no such Live mapping.
    pub fn retire(&mut self, iova: u64, len: usize) -> bool {
        let Some(r) =
            self.records.get_mut(&iova).filter(|r| r.len == len && r.phase == Phase::Live)
        else {
            return false;
        };
        r.phase = Phase::Retiring;
        self.index.remove(r.vaddr, r.layer);
        true
    }

    /// The IOVA of `[vaddr, vaddr+len)` inside one Live mapping (see [`VaddrIndex::translate`]).
    pub fn translate(&self, vaddr: usize, len: usize) -> Option<u64> {
        self.index.translate(vaddr, len)
    }

    /// The Live record whose IOVA range holds all of `[iova, iova+len)`.
    pub fn containing(&self, iova: u64, len: u64) -> Option<&Record> {
        let last = iova.checked_add(len.max(1) - 1)?;
        let (_, r) = self.records.range(..=iova).next_back()?;
        (r.phase == Phase::Live && last <= r.iova + (r.len as u64 - 1)).then_some(r)
    }

    /// The Live records holding any IOVA in `[iova, last]`, by IOVA. Records do not overlap, so
    /// only the one starting last before `iova` can reach into the range from below.
    pub fn overlapping(&self, iova: u64, last: u64) -> impl Iterator<Item = &Record> + '_ {
        let reaching_in = self
            .records
            .range(..iova)
            .next_back()
            .filter(|(_, r)| r.iova + (r.len as u64 - 1) >= iova);
        reaching_in
            .into_iter()
            .chain(self.records.range(iova..=last))
            .map(|(_, r)| r)
            .filter(|r| r.phase == Phase::Live)
    }

    /// The Live records, by IOVA.
    pub fn live(&self) -> impl Iterator<Item = &Record> + '_ {
        self.records.values().filter(|r| r.phase == Phase::Live)
    }

    /// The Live DMA buffer whose memory starts at `vaddr`.
    pub fn buffer_at(&self, vaddr: usize) -> Option<&Record> {
        let iova = self.index.translate(vaddr, 1)?;
        self.records.get(&iova).filter(|r| r.facts.owner.mapped_by_context() && r.vaddr == vaddr)
    }

    /// Every record a backend holds (Reserved, Live or Retiring), for closing the context.
    pub fn all(&self) -> impl Iterator<Item = &Record> + '_ {
        self.records.values().filter(|r| r.phase != Phase::Spare)
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
        l.remove(iova);
        assert!(l.is_empty(), "aborted");
        assert_eq!(l.translate(0x10_0000, 1), None);
        // The IOVAs are free again: the same allocation gets the same IOVA.
        assert_eq!(l.reserve_any(0x30_0000, 2 * PAGE, PAGE as u64, false, plain()), Some(iova));
        l.remove(0xdead_0000);
        assert_eq!(l.all().count(), 1, "nothing to abort");
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
        assert!(!l.retire(0x2000, PAGE), "only a Live mapping retires");
        l.commit(0x2000);
        assert!(!l.retire(0x2000, 2 * PAGE), "the exact length is needed");
        assert!(l.retire(0x2000, PAGE));
        assert!(!l.retire(0x2000, PAGE), "retired once: a second unmap finds nothing");
        assert_eq!(l.translate(0x10_0000, 1), None, "no longer translates");
        assert_eq!(l.overlapping(0, u64::MAX).count(), 0, "nor is unmapped by range");
        assert!(l.reserve_at(0x20_0000, PAGE, 0x2000, plain()).is_err(), "IOVAs still held");
        l.remove(0x2000);
        assert!(l.reserve_at(0x20_0000, PAGE, 0x2000, plain()).is_ok(), "free after the unmap");
    }

    #[test]
    fn guard_pages_are_held_and_released_with_their_mapping() {
        let mut l = ledger();
        let a = l.reserve_any(0x10_0000, PAGE, PAGE as u64, true, plain()).unwrap();
        let b = l.reserve_any(0x20_0000, PAGE, PAGE as u64, false, plain()).unwrap();
        assert!(b >= a + 2 * PAGE as u64 || b + PAGE as u64 <= a, "b is not in a's guard page");
        let c = l.reserve_any(0x40_0000, PAGE, PAGE as u64, true, plain()).unwrap();
        l.remove(c);
        assert_ne!(
            l.reserve_any(0x40_0000, PAGE, PAGE as u64, false, plain()),
            Some(c),
            "guard kept"
        );
        assert!(l.reserve_at(0x30_0000, PAGE, a + PAGE as u64, plain()).is_err(), "guard held");
        l.remove(a);
        assert!(l.reserve_at(0x30_0000, PAGE, a + PAGE as u64, plain()).is_ok(), "released");
    }

    #[test]
    fn buffers_are_found_by_their_first_byte_only() {
        let mut l = ledger();
        let facts = Facts { writable: true, owner: Owner::Buffer, ..Facts::default() };
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
    fn unmapped_iovas_are_taken_back_by_the_next_mapping_of_their_size() {
        let mut l = ledger();
        let a = l.reserve_any(0x10_0000, PAGE, PAGE as u64, false, plain()).unwrap();
        l.commit(a);
        assert!(l.retire(a, PAGE));
        l.remove(a);
        assert!(l.is_empty(), "a spare is no mapping");
        assert_eq!(l.all().count(), 0);
        assert_eq!(l.translate(0x10_0000, 1), None);
        assert_eq!(
            l.reserve_any(0x30_0000, PAGE, PAGE as u64, false, plain()),
            Some(a),
            "taken back"
        );
        l.commit(a);
        assert_eq!(l.translate(0x30_0000, 1), Some(a), "at its new address");
        assert_eq!(l.translate(0x10_0000, 1), None, "not at its old one");
        // Another size does not take it; a claim over a spare succeeds once spares are back.
        assert!(l.retire(a, PAGE));
        l.remove(a);
        let b = l.reserve_any(0x40_0000, 2 * PAGE, 0x10000, false, plain()).unwrap();
        assert_ne!(b, a);
        l.reserve_at(0x50_0000, 2 * PAGE, a, plain()).expect("the spare's IOVAs, released");
        assert!(matches!(l.reserve_at(0x60_0000, PAGE, a, plain()), Err(Refused::Overlaps(_))));
    }

    #[test]
    fn spares_go_back_when_the_valid_ranges_change_and_past_their_limit() {
        let mut l = ledger();
        let iovas: Vec<u64> = (0..SPARES + 8)
            .map(|i| {
                l.reserve_any(0x10_0000 + i * PAGE, PAGE, PAGE as u64, false, plain()).unwrap()
            })
            .collect();
        for &iova in &iovas {
            l.remove(iova);
        }
        assert_eq!(l.spares.len(), SPARES, "the oldest went back");
        assert!(l.is_empty());
        l.set_valid(vec![IovaRange { start: 0x10_0000, last: 0x1f_ffff }]);
        assert!(l.spares.is_empty() && l.records.is_empty(), "every spare released");
        assert!(l.reserve_at(0, PAGE, iovas[0], plain()).is_err(), "outside the new ranges");
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
