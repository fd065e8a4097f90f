//! The DMA heap: zeroed objects of 1 byte to 2 MiB for device DMA (queue entries, PRP and SGL
//! lists, descriptors, status words) carved from 2 MiB arenas that are mapped once.
//!
//! - Arenas lie side by side in one address-space reservation per heap, each 2 MiB-aligned,
//!   backed by a 2 MiB hugetlb page where one is free, else by 4 KiB pages, and DMA-mapped whole
//!   (one ledger record, so an object's IOVAs are contiguous). Where the backend places memory
//!   at its physical address (no IOMMU) and the arena is not one hugepage, each 4 KiB page is
//!   mapped by itself, and objects larger than a page are refused there: the device would see
//!   a discontiguity inside them.
//! - An arena is 32 spans of 64 KiB. A span holds objects of one size class up to 32 KiB;
//!   objects of a class up to 4 KiB are laid out page by page, so none crosses a page.
//!   Larger objects take whole spans of one arena.
//! - Each thread keeps a cache of free objects per class and heap: alloc and free of a small
//!   object take no lock and make no system call unless the cache is empty (then a batch comes
//!   from the heap's central lists, under its lock) or full.
//! - An object's span and arena are found from its address alone (the arena's place in the
//!   reservation), and one byte per object slot says whether it is allocated, so a free of
//!   anything else is refused rather than corrupting the heap.
//! - Arenas stay mapped until the context closes: freed objects are reused by their class, no
//!   IOVA of a live object is ever handed out again.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::ledger::{Facts, Owner};
use super::{At, Iommu, lock};
use crate::error::{Error, Result};
use crate::sys::{self, mem};

/// An arena's size (and alignment): one 2 MiB hugepage.
pub(crate) const ARENA: usize = 2 << 20;
const SPAN: usize = 64 << 10;
const SPANS: usize = ARENA / SPAN;
const PAGE: usize = 4096;
/// A heap's arenas at most: 64 GiB (less where the address space is short: under valgrind).
const MAX_ARENAS: usize = 32768;
/// The size classes of objects that share spans; larger objects take whole spans.
const CLASSES: [usize; 31] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 8192, 16384, 32768,
];
/// Every object starts at a multiple of this (the smallest class): an arena's map of allocated
/// objects has one byte per grain.
const GRAIN: usize = CLASSES[0];
/// How many free objects a thread takes from the central list at once, and twice that its
/// cache holds of a class before it gives half back.
const BATCH: usize = 32;

/// [`Arena::spans`]: a free span.
const SPAN_FREE: u8 = 0;
/// [`Arena::spans`]: the first span of a large object of `n` spans is `SPAN_LARGE + n`.
const SPAN_LARGE: u8 = 64;
/// [`Arena::spans`]: a span after the first of a large object.
const SPAN_TAIL: u8 = 255;

/// The class for `size` bytes aligned to `align`: the smallest that holds them and whose
/// objects are aligned enough (a class's objects are aligned to its largest power-of-two
/// divisor). None: a large object.
fn class_of(size: usize, align: usize) -> Option<usize> {
    // The classes step by 16 bytes up to 128: the first that holds `size` is found directly.
    let first = if size <= 128 { size.saturating_sub(1) / 16 } else { 8 };
    let fits = |&c: &usize| c >= size && c & c.wrapping_neg() >= align;
    CLASSES[first..].iter().position(fits).map(|i| first + i)
}

/// Per class: how many objects a span holds, how many of them a page (0 for classes over a
/// page, laid out end to end), and 2^32 / size rounded up, so that the hot paths divide by a
/// class's size with a multiplication. Made at compile time.
const LAYOUT: [(usize, usize, u64); CLASSES.len()] = {
    let mut table = [(0, 0, 0); CLASSES.len()];
    let mut c = 0;
    while c < CLASSES.len() {
        let size = CLASSES[c];
        table[c] = match size <= PAGE {
            true => {
                ((SPAN / PAGE) * (PAGE / size), PAGE / size, (1u64 << 32).div_ceil(size as u64))
            }
            false => (SPAN / size, 0, (1u64 << 32).div_ceil(size as u64)),
        };
        c += 1;
    }
    table
};

/// How many objects of `class` a span holds, and how many of them a page (0 for classes over a
/// page, laid out end to end).
fn layout(class: usize) -> (usize, usize) {
    let (count, per_page, _) = LAYOUT[class];
    (count, per_page)
}

/// `x / CLASSES[class]` when that divides `x` exactly (`x` below a span).
fn divide_exactly(x: usize, class: usize) -> Option<usize> {
    // Exact for multiples: the rounding of the reciprocal adds less than x / 2^32 < 1/2^16.
    let k = ((x as u64 * LAYOUT[class].2) >> 32) as usize;
    (k * CLASSES[class] == x).then_some(k)
}

/// Object `i` of `class`'s offset in its span.
fn object_offset(class: usize, i: usize) -> usize {
    let size = CLASSES[class];
    match layout(class) {
        (_, 0) => i * size,
        (_, per_page) => i / per_page * PAGE + i % per_page * size,
    }
}

/// Which object of `class` starts at `offset` in its span, if one does.
fn object_at(class: usize, offset: usize) -> Option<usize> {
    let (count, per_page) = layout(class);
    let i = match per_page {
        0 => divide_exactly(offset, class)?,
        _ => {
            let k = divide_exactly(offset % PAGE, class).filter(|&k| k < per_page)?;
            offset / PAGE * per_page + k
        }
    };
    (i < count).then_some(i)
}

/// The spans a large object of `size` bytes aligned to `align` takes, and their alignment in
/// spans. None past an arena.
fn large_spans(size: usize, align: usize) -> Option<(usize, usize)> {
    let n = size.div_ceil(SPAN);
    let step = align.div_ceil(SPAN).max(1);
    (n <= SPANS && align <= ARENA).then_some((n, step))
}

/// The first run of `n` free spans at a multiple of `step` in a map of free spans (bit i: span
/// i is free).
fn free_run(free: u32, n: usize, step: usize) -> Option<usize> {
    let run = if n == SPANS { u32::MAX } else { (1u32 << n) - 1 };
    (0..=SPANS - n).step_by(step).find(|&at| (free >> at) & run == run)
}

/// `N` zeroed atomic bytes, from calloc (fresh zero pages: no loop writing them).
fn zeroed_bytes<const N: usize>() -> Box<[AtomicU8; N]> {
    let bytes = vec![0u8; N].into_boxed_slice();
    // SAFETY: AtomicU8 has the size, alignment and bit validity of u8, and there are N of them.
    unsafe { Box::from_raw(Box::into_raw(bytes) as *mut [AtomicU8; N]) }
}

/// What a context's DMA heap holds (`Iommu::heap_info`, `vfiokit_dma_heap_info`): 48 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapInfo {
    /// The size of an arena: 2 MiB.
    pub arena_size: u64,
    /// Arenas mapped, and how many of them are one 2 MiB hugepage each.
    pub arenas: u32,
    pub huge_arenas: u32,
    /// Bytes of spans given to objects (each span a size class, or part of a large object).
    pub used: u64,
    pub reserved: [u64; 3],
}

const _: () = assert!(
    size_of::<HeapInfo>() == 48
        && std::mem::offset_of!(HeapInfo, used) == 16
        && std::mem::offset_of!(HeapInfo, reserved) == 24
);

/// One arena's bookkeeping, made once and read without the lock.
struct Arena {
    /// The IOVA of its first byte, or of each page where they were mapped one by one.
    iovas: Box<[u64]>,
    /// Each span's use: [`SPAN_FREE`], a class + 1, or a large object's.
    spans: [AtomicU8; SPANS],
    /// One byte per grain of the arena: an allocated object starts there. Indexed by the offset
    /// alone (no division by the class's size); plain loads and stores, no read-modify-write on
    /// the hot paths: a byte is written only by the thread that owns the object (the allocator
    /// handing it out, then its one rightful free).
    allocated: Box<[AtomicU8; ARENA / GRAIN]>,
}

impl Arena {
    fn iova(&self, offset: usize) -> u64 {
        match &*self.iovas {
            [one] => one + offset as u64,
            pages => pages[offset / PAGE] + (offset % PAGE) as u64,
        }
    }

    /// Marks the object at `offset` (below an arena) allocated (`on`) or free; false when it
    /// already was so (a double free, or no object starts there).
    fn mark(&self, offset: usize, on: bool) -> bool {
        let slot = &self.allocated[offset % ARENA / GRAIN];
        if (slot.load(Ordering::Acquire) != 0) == on {
            return false;
        }
        slot.store(on as u8, Ordering::Release);
        true
    }
}

#[derive(Default)]
struct Central {
    /// Free small objects by class.
    free: Vec<Vec<usize>>,
    /// Per arena: its free spans (bit i: span i).
    free_spans: Vec<u32>,
    huge_arenas: u32,
}

/// A context's DMA heap.
pub(crate) struct Heap {
    /// Never reused, so a thread's cache of a closed heap's objects is never taken for another.
    id: u64,
    reservation: NonNull<u8>,
    reservation_len: usize,
    /// The first arena's address (2 MiB-aligned, inside the reservation).
    base: usize,
    /// Arena i at `base + i * ARENA`, once made.
    arenas: Box<[AtomicPtr<Arena>]>,
    central: Mutex<Central>,
    /// Guard mode: freed objects are poisoned (0x6b).
    pub poison: AtomicBool,
}

// SAFETY: the reservation is plain address space the heap owns; its arenas' bookkeeping is
// atomics or under the central lock.
unsafe impl Send for Heap {}
// SAFETY: as above.
unsafe impl Sync for Heap {}

impl Drop for Heap {
    fn drop(&mut self) {
        for a in self.arenas.iter() {
            let p = a.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: made by Box::into_raw in new_arena, dropped once, here.
                drop(unsafe { Box::from_raw(p) });
            }
        }
        // SAFETY: ours; the context closing took the arenas' DMA mappings with it.
        unsafe { mem::unmap(self.reservation, self.reservation_len) };
    }
}

/// A thread's free objects of one heap, by class.
struct Cache {
    /// 0: no heap's (ids start at 1).
    id: u64,
    heap: Weak<Heap>,
    bins: [Vec<usize>; CLASSES.len()],
}

const NO_OBJECTS: [Vec<usize>; CLASSES.len()] = [const { Vec::new() }; CLASSES.len()];

impl Cache {
    const NONE: Cache = Cache { id: 0, heap: Weak::new(), bins: NO_OBJECTS };
}

/// A thread's caches: the one of the heap it used last, in place (found with one comparison),
/// and the others.
struct Caches {
    current: Cache,
    others: Vec<Cache>,
}

impl Drop for Cache {
    /// A thread that ends gives its objects back (if their heap is still there).
    fn drop(&mut self) {
        if let Some(heap) = self.heap.upgrade() {
            let mut central = lock(&heap.central);
            for (class, bin) in self.bins.iter_mut().enumerate() {
                central.free[class].append(bin);
            }
        }
    }
}

thread_local! {
    static CACHES: RefCell<Caches> =
        const { RefCell::new(Caches { current: Cache::NONE, others: Vec::new() }) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Heap {
    /// A heap with its address space reserved, no arena yet.
    pub fn new(poison: bool) -> Result<Heap> {
        // Halved until the address space takes it, down to 16 arenas.
        let mut arenas = MAX_ARENAS;
        let (reservation, reservation_len) = loop {
            let len = arenas * ARENA + ARENA;
            match mem::reserve(len) {
                Ok(at) => break (at, len),
                Err(_) if arenas > 16 => arenas /= 2,
                Err(sys::Errno(e)) => {
                    return Err(Error::os(e, "reserving address space for the DMA heap"));
                }
            }
        };
        let base = (reservation.as_ptr() as usize).next_multiple_of(ARENA);
        Ok(Heap {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            reservation,
            reservation_len,
            base,
            arenas: (0..arenas).map(|_| AtomicPtr::new(std::ptr::null_mut())).collect(),
            central: Mutex::new(Central {
                free: vec![Vec::new(); CLASSES.len()],
                ..Default::default()
            }),
            poison: AtomicBool::new(poison),
        })
    }

    fn arena(&self, i: usize) -> Option<&Arena> {
        // SAFETY: set once from Box::into_raw, freed only when the heap drops.
        unsafe { self.arenas.get(i)?.load(Ordering::Acquire).as_ref() }
    }

    /// The arena, its index and the offset in it of an address in the heap.
    fn locate(&self, addr: usize) -> Option<(&Arena, usize, usize)> {
        let offset = addr.checked_sub(self.base)?;
        let i = offset / ARENA;
        Some((self.arena(i)?, i, offset % ARENA))
    }

    /// Allocates `size` zeroed bytes aligned to `align` (a power of two): the address and its
    /// IOVA.
    pub fn alloc(
        self: &Arc<Self>,
        iommu: &Iommu,
        size: usize,
        align: usize,
    ) -> Result<(NonNull<u8>, u64)> {
        if size == 0 || size > ARENA || !align.is_power_of_two() || align > ARENA {
            return Err(bad_request(size, align));
        }
        let addr = match class_of(size, align) {
            // The usual request: an object of this thread's cache, with no lock.
            Some(class) => match self.cached(class) {
                Some(addr) => addr,
                None => self.alloc_refilled(iommu, class)?,
            },
            None => self.alloc_large(iommu, size, align)?,
        };
        let (arena, _, offset) = self.locate(addr).expect("carved from an arena");
        let fresh = arena.mark(offset, true);
        debug_assert!(fresh, "a free object is not allocated");
        // SAFETY: a free object of at least `size` bytes, now the caller's.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, size) };
        Ok((NonNull::new(addr as *mut u8).expect("arenas are not at 0"), arena.iova(offset)))
    }

    /// An object of `class` from this thread's cache, if it has one.
    #[inline]
    fn cached(self: &Arc<Self>, class: usize) -> Option<usize> {
        let taken =
            CACHES.try_with(|caches| self.cache(&mut caches.borrow_mut()).bins[class].pop());
        taken.ok().flatten()
    }

    /// An object of `class` when this thread's cache has none: a batch comes from the central
    /// list (a span is carved into it if it is empty).
    #[inline(never)]
    fn alloc_refilled(self: &Arc<Self>, iommu: &Iommu, class: usize) -> Result<usize> {
        let cached = CACHES.try_with(|caches| {
            let mut caches = caches.borrow_mut();
            let cache = self.cache(&mut caches);
            let mut central = lock(&self.central);
            self.refill(iommu, &mut central, class)?;
            let take = central.free[class].len().min(BATCH);
            let from = central.free[class].len() - take;
            cache.bins[class].extend(central.free[class].drain(from..));
            Ok(cache.bins[class].pop().expect("refilled"))
        });
        match cached {
            Ok(taken) => taken,
            // The thread is ending: straight from the central list.
            Err(_) => {
                let mut central = lock(&self.central);
                self.refill(iommu, &mut central, class)?;
                Ok(central.free[class].pop().expect("refilled"))
            }
        }
    }

    /// This thread's cache of this heap.
    #[inline]
    fn cache<'a>(self: &Arc<Self>, caches: &'a mut Caches) -> &'a mut Cache {
        if caches.current.id != self.id {
            self.switch_cache(caches);
        }
        &mut caches.current
    }

    /// Makes this heap's cache the thread's current one, made where the thread has none (and
    /// caches of closed heaps are dropped on the way).
    #[cold]
    fn switch_cache(self: &Arc<Self>, caches: &mut Caches) {
        let mine = match caches.others.iter().position(|c| c.id == self.id) {
            Some(i) => caches.others.swap_remove(i),
            None => {
                caches.others.retain(|c| c.heap.strong_count() > 0);
                Cache { id: self.id, heap: Arc::downgrade(self), bins: NO_OBJECTS }
            }
        };
        let last = std::mem::replace(&mut caches.current, mine);
        if last.id != 0 {
            caches.others.push(last);
        }
    }

    /// Makes sure the central list of `class` has an object: carves a free span into it.
    fn refill(&self, iommu: &Iommu, central: &mut Central, class: usize) -> Result<()> {
        if !central.free[class].is_empty() {
            return Ok(());
        }
        let contiguous = CLASSES[class] > PAGE;
        let (i, span) = self.free_spans(iommu, central, 1, 1, contiguous)?;
        let arena = self.arena(i).expect("just found");
        arena.spans[span].store(class as u8 + 1, Ordering::Release);
        let start = self.base + i * ARENA + span * SPAN;
        // Handed out lowest first.
        let count = layout(class).0;
        central.free[class].extend((0..count).rev().map(|o| start + object_offset(class, o)));
        Ok(())
    }

    /// `n` free spans at a multiple of `step` in an arena (a new one if none has them), taken:
    /// the arena's index and the first span. `contiguous`: in an arena mapped whole.
    fn free_spans(
        &self,
        iommu: &Iommu,
        central: &mut Central,
        n: usize,
        step: usize,
        contiguous: bool,
    ) -> Result<(usize, usize)> {
        let fits = |i: usize, free: u32| {
            (!contiguous || self.arena(i).is_some_and(|a| a.iovas.len() == 1))
                .then(|| free_run(free, n, step))
                .flatten()
        };
        let found =
            central.free_spans.iter().enumerate().find_map(|(i, &free)| Some((i, fits(i, free)?)));
        let (i, span) = match found {
            Some(found) => found,
            None => {
                let i = self.new_arena(iommu, central)?;
                let span = fits(i, u32::MAX).ok_or_else(|| {
                    Error::new(
                        libc::ENOMEM,
                        "a DMA heap object larger than a page needs a 2 MiB hugepage in a no-IOMMU context \
                         (the device sees physical memory, and 4 KiB pages are not contiguous): reserve some \
                         in /proc/sys/vm/nr_hugepages",
                    )
                })?;
                (i, span)
            }
        };
        let run = if n == SPANS { u32::MAX } else { ((1u32 << n) - 1) << span };
        central.free_spans[i] &= !run;
        Ok((i, span))
    }

    /// Maps a new arena: its memory (a hugepage if one is free) and its DMA mapping.
    fn new_arena(&self, iommu: &Iommu, central: &mut Central) -> Result<usize> {
        let i = central.free_spans.len();
        if i == MAX_ARENAS {
            return Err(Error::new(
                libc::ENOMEM,
                format!(
                    "the DMA heap has all its {MAX_ARENAS} arenas ({} GiB)",
                    (MAX_ARENAS * ARENA) >> 30
                ),
            ));
        }
        let at = NonNull::new((self.base + i * ARENA) as *mut u8).expect("inside the reservation");
        let by_fd = iommu.0.backend.buffers_by_fd();
        let back = |huge_shift| {
            // SAFETY: arena i's range, inside our reservation and unused.
            unsafe {
                match by_fd {
                    true => {
                        mem::memfd_at(Some(at), ARENA, huge_shift).map(|(fd, _)| Some(Arc::new(fd)))
                    }
                    false => mem::anonymous_at(Some(at), ARENA, huge_shift).map(|_| None),
                }
            }
        };
        let (fd, huge) = match back(21) {
            Ok(fd) => (fd, true),
            Err(_) => (
                back(0).map_err(|sys::Errno(e)| Error::os(e, "allocating a DMA heap arena"))?,
                false,
            ),
        };
        let facts = Facts { writable: true, owner: Owner::Heap, fd, offset: 0 };
        let mapped = match huge || !iommu.0.places {
            // SAFETY: the arena's memory lives until the heap drops, after the context's
            // mappings are gone; it is never behind a Rust reference.
            true => unsafe { iommu.map_at(at.as_ptr(), ARENA, At::Any(ARENA as u64), facts) }
                .map(|iova| vec![iova]),
            false => (0..ARENA / PAGE)
                .map(|p| {
                    let page = at.as_ptr().wrapping_add(p * PAGE);
                    // SAFETY: as above, one page of it.
                    unsafe { iommu.map_at(page, PAGE, At::Any(PAGE as u64), facts.clone()) }
                })
                .collect::<Result<Vec<u64>>>()
                .inspect_err(|_| iommu.unmap_owned_range(at.as_ptr() as usize, ARENA)),
        };
        let iovas = match mapped {
            Ok(iovas) => iovas,
            Err(e) => {
                // SAFETY: ours, and no longer DMA-mapped.
                unsafe { mem::unreserve_to(at, ARENA) };
                return Err(Error::new(
                    e.errno(),
                    format!("mapping a DMA heap arena: {}", e.message()),
                ));
            }
        };
        let arena =
            Arena { iovas: iovas.into(), spans: Default::default(), allocated: zeroed_bytes() };
        self.arenas[i].store(Box::into_raw(Box::new(arena)), Ordering::Release);
        central.free_spans.push(u32::MAX);
        central.huge_arenas += huge as u32;
        Ok(i)
    }

    #[inline(never)]
    fn alloc_large(&self, iommu: &Iommu, size: usize, align: usize) -> Result<usize> {
        let (n, step) = large_spans(size, align).expect("checked by alloc");
        let mut central = lock(&self.central);
        let (i, span) = self.free_spans(iommu, &mut central, n, step, true)?;
        let arena = self.arena(i).expect("just found");
        for s in span + 1..span + n {
            arena.spans[s].store(SPAN_TAIL, Ordering::Release);
        }
        arena.spans[span].store(SPAN_LARGE + n as u8, Ordering::Release);
        Ok(self.base + i * ARENA + span * SPAN)
    }

    /// Frees an object from [`alloc`](Self::alloc); EINVAL for anything else (an address not
    /// at the start of a live object of this heap, or one freed already).
    pub fn free(self: &Arc<Self>, vaddr: *mut u8) -> Result<()> {
        let addr = vaddr as usize;
        let Some((arena, i, offset)) = self.locate(addr) else { return Err(not_an_object(vaddr)) };
        // Set only where a live object starts: the one check a rightful free needs.
        if !arena.mark(offset, false) {
            return Err(refused(vaddr, arena, offset));
        }
        let span = offset / SPAN;
        let class = match arena.spans[span].load(Ordering::Acquire) {
            c if c >= SPAN_LARGE => {
                self.free_large(arena, i, span, usize::from(c - SPAN_LARGE));
                return Ok(());
            }
            c => usize::from(c - 1),
        };
        if self.poison.load(Ordering::Relaxed) {
            poison(addr, CLASSES[class]);
        }
        let cached = CACHES.try_with(|caches| {
            let mut caches = caches.borrow_mut();
            let bin = &mut self.cache(&mut caches).bins[class];
            bin.push(addr);
            if bin.len() > 2 * BATCH {
                self.spill(bin, class);
            }
        });
        if cached.is_err() {
            lock(&self.central).free[class].push(addr);
        }
        Ok(())
    }

    /// Frees the large object of `n` spans from `span` of arena `i`.
    #[inline(never)]
    fn free_large(&self, arena: &Arena, i: usize, span: usize, n: usize) {
        if self.poison.load(Ordering::Relaxed) {
            poison(self.base + i * ARENA + span * SPAN, n * SPAN);
        }
        let mut central = lock(&self.central);
        for s in span..span + n {
            arena.spans[s].store(SPAN_FREE, Ordering::Release);
        }
        central.free_spans[i] |= if n == SPANS { u32::MAX } else { ((1u32 << n) - 1) << span };
    }

    /// Gives half of a full cache bin of `class` back to the central list.
    #[cold]
    fn spill(&self, bin: &mut Vec<usize>, class: usize) {
        let spill = bin.len() - BATCH;
        lock(&self.central).free[class].extend(bin.drain(spill..));
    }

    pub fn info(&self) -> HeapInfo {
        let central = lock(&self.central);
        let used =
            central.free_spans.iter().map(|f| (SPANS as u32 - f.count_ones()) as u64).sum::<u64>();
        HeapInfo {
            arena_size: ARENA as u64,
            arenas: central.free_spans.len() as u32,
            huge_arenas: central.huge_arenas,
            used: used * SPAN as u64,
            reserved: [0; 3],
        }
    }
}

/// Poisons a freed object (guard mode).
#[cold]
fn poison(addr: usize, size: usize) {
    // SAFETY: the object is the heap's again; nothing else uses it.
    unsafe { std::ptr::write_bytes(addr as *mut u8, 0x6b, size) };
}

#[cold]
fn bad_request(size: usize, align: usize) -> Error {
    Error::invalid(format!(
        "DMA heap object of {size} bytes aligned to {align}: expected 1 byte to 2 MiB, aligned to a \
         power of two up to 2 MiB"
    ))
}

#[cold]
fn not_an_object(vaddr: *mut u8) -> Error {
    Error::invalid(format!("{vaddr:p} is not an object of this context's DMA heap"))
}

/// Why a free of `vaddr`, at `offset` in `arena`, where no live object starts, is refused.
#[cold]
fn refused(vaddr: *mut u8, arena: &Arena, offset: usize) -> Error {
    let at = offset % SPAN;
    let object_starts = match arena.spans[offset / SPAN].load(Ordering::Acquire) {
        SPAN_FREE | SPAN_TAIL => false,
        c if c >= SPAN_LARGE => at == 0,
        c => object_at(usize::from(c - 1), at).is_some(),
    };
    match object_starts {
        true => Error::invalid(format!(
            "{vaddr:p} is not allocated in this context's DMA heap (freed already?)"
        )),
        false => not_an_object(vaddr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_fit_their_size_and_alignment() {
        assert_eq!(class_of(1, 1).map(|c| CLASSES[c]), Some(16));
        assert_eq!(class_of(64, 64).map(|c| CLASSES[c]), Some(64));
        assert_eq!(class_of(65, 1).map(|c| CLASSES[c]), Some(80));
        assert_eq!(class_of(65, 32).map(|c| CLASSES[c]), Some(96), "80 is aligned to 16 only");
        assert_eq!(class_of(100, 4096).map(|c| CLASSES[c]), Some(4096), "a page-aligned PRP list");
        assert_eq!(class_of(32768, 1).map(|c| CLASSES[c]), Some(32768));
        assert_eq!(class_of(32769, 1), None, "large");
        assert_eq!(class_of(16, 65536), None, "aligned past every class: large");
        for (c, &size) in CLASSES.iter().enumerate() {
            assert_eq!(class_of(size, 1), Some(c));
            assert!(size % 16 == 0);
        }
        // The first class that fits, found directly for small sizes, is the first of all.
        for size in 1..=CLASSES[CLASSES.len() - 1] + 1 {
            for align in [1, 2, 16, 32, 64, 128, 4096, 8192, 65536] {
                let first =
                    CLASSES.iter().position(|&c| c >= size && c & c.wrapping_neg() >= align);
                assert_eq!(class_of(size, align), first, "{size} bytes aligned to {align}");
            }
        }
    }

    #[test]
    fn objects_never_cross_a_page_and_tile_their_span() {
        for (class, &size) in CLASSES.iter().enumerate() {
            let (count, _) = layout(class);
            assert!(count >= 2, "class {size}");
            let mut last_end = 0;
            for i in 0..count {
                let at = object_offset(class, i);
                assert!(at >= last_end, "class {size}: object {i} overlaps the one before");
                assert!(at + size <= SPAN, "class {size}: object {i} leaves the span");
                if size <= PAGE {
                    assert_eq!(
                        at / PAGE,
                        (at + size - 1) / PAGE,
                        "class {size}: object {i} crosses a page"
                    );
                }
                let align = size & size.wrapping_neg();
                assert_eq!(at % align, 0, "class {size}: object {i} misaligned");
                assert_eq!(at % GRAIN, 0, "class {size}: object {i} has its own allocated byte");
                assert_eq!(object_at(class, at), Some(i), "class {size}: object {i} found back");
                last_end = at + size;
            }
            assert!(count <= SPAN / GRAIN);
        }
    }

    #[test]
    fn division_by_multiplication_is_exact_below_a_span() {
        for (class, &size) in CLASSES.iter().enumerate() {
            for x in 0..SPAN {
                let expected = (x % size == 0).then_some(x / size);
                assert_eq!(divide_exactly(x, class), expected, "{x} / {size}");
            }
        }
    }

    #[test]
    fn addresses_inside_or_between_objects_are_no_object() {
        let c48 = class_of(48, 1).unwrap();
        assert_eq!(object_at(c48, 1), None, "inside the first object");
        assert_eq!(object_at(c48, 85 * 48), None, "the tail of a page that holds no object");
        assert_eq!(object_at(c48, PAGE), Some(85), "the first object of the second page");
        let c8k = class_of(8192, 1).unwrap();
        assert_eq!(object_at(c8k, 4096), None);
        assert_eq!(object_at(c8k, 8192), Some(1));
        assert_eq!(object_at(c8k, SPAN), None, "past the span");
    }

    #[test]
    fn large_objects_take_aligned_runs_of_spans() {
        assert_eq!(large_spans(32769, 1), Some((1, 1)));
        assert_eq!(large_spans(ARENA, 1), Some((SPANS, 1)));
        assert_eq!(large_spans(64 << 10, 1 << 20), Some((1, 16)));
        assert_eq!(free_run(u32::MAX, 3, 1), Some(0));
        assert_eq!(free_run(!0b1, 3, 1), Some(1));
        assert_eq!(free_run(!0b1, 1, 16), Some(16), "aligned to 16 spans");
        assert_eq!(free_run(0, 1, 1), None);
        assert_eq!(free_run(u32::MAX, SPANS, 1), Some(0));
        assert_eq!(free_run(u32::MAX >> 1, SPANS, 1), None);
        assert_eq!(free_run(0xf000_0000, 4, 1), Some(28), "the last four");
    }
}
