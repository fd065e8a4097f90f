//! Mapping regions and the accessors over them: the checked register accessors with their
//! one-comparison fast path, register handles, and reads and writes through the device.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Device;
use crate::error::{Error, Result};
use crate::pci;
use crate::region::{self, Area, PCI_CONFIG, REGION_READ, REGION_WRITE, Region};
use crate::sys::{self, Context, fault, mem};

/// One contiguous virtual range for a region: its mmappable areas mapped, the rest reserved
/// with no access.
pub(super) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// The region's size when one area covers it whole, so any in-range access may use the
    /// mapping (the accessors' fast path); 0 otherwise.
    whole: u64,
    /// The region's REGION_READ / REGION_WRITE flags.
    access: u32,
    /// Its slot in the SIGBUS guard (`sys::fault`), a kernel device's, until dropped.
    guard: Option<usize>,
}

/// A kernel device's region mapping: what an iommufd context is given when a driver DMA-maps
/// another device's BAR (peer-to-peer), which it maps by the region's dma-buf instead.
struct KernelMapping {
    len: usize,
    device: RawFd,
    region: u32,
}

/// The region mappings of kernel devices, by address. An entry lives while its mapping does,
/// and the mapping goes before the device's fd closes.
static KERNEL_MAPPINGS: Mutex<BTreeMap<usize, KernelMapping>> = Mutex::new(BTreeMap::new());

/// The region behind `[vaddr, vaddr+len)` when it lies inside one kernel device's region
/// mapping: a duplicate of the device's fd, the region's index and the offset in it.
pub(crate) fn region_at(vaddr: usize, len: usize) -> Option<(OwnedFd, u32, u64)> {
    let maps = KERNEL_MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
    let (&base, m) = maps.range(..=vaddr).next_back()?;
    (vaddr + len <= base + m.len).then_some(())?;
    // SAFETY: listed, so the device's fd is open until the lock is released.
    let fd = sys::dup(unsafe { BorrowedFd::borrow_raw(m.device) }).ok()?;
    Some((fd, m.region, (vaddr - base) as u64))
}

/// Regions below this index (the PCI BARs, ROM, config space and VGA) have a [`FastPath`].
pub(super) const FAST_REGIONS: usize = 9;

/// The register accessors' fast path for one region, kept inline in the device apart from
/// its mapping: a checked access then loads one word and takes one branch (under emulation
/// each load, and each branch, costs about what the access itself to RAM does). Set once,
/// when the region is mapped.
#[derive(Default)]
pub(super) struct FastPath {
    read: FastAccess,
    write: FastAccess,
}

/// [`FastPath`] for one kind of access: the mapping's base (page-aligned) with, in its low
/// bits, `k` such that any aligned access of 1 to 8 bytes below `(1 << k) >> 1` fits in the
/// mapping (the largest power of two no larger than its `whole`; a BAR's size is one). 0,
/// so that no access qualifies, until the region is mapped, and where it forbids this
/// access or its mapping does not cover it whole (or is smaller than 8 bytes).
#[derive(Default)]
pub(super) struct FastAccess(AtomicUsize);

impl FastAccess {
    /// The low bits holding `k` (a page-aligned base leaves 12 free).
    const K: usize = 63;

    #[inline(always)]
    pub(super) fn limit(word: usize) -> u64 {
        (1u64 << (word & Self::K)) >> 1
    }
}

impl FastPath {
    pub(super) fn set(&self, m: &Mapping) {
        if m.whole < 8 {
            return;
        }
        // k - 1 is the power of two's log2: at least 3, as whole >= 8.
        let k = ((u64::BITS - m.whole.leading_zeros()) as usize).min(FastAccess::K);
        let word = m.base.as_ptr().expose_provenance() | k;
        debug_assert!(m.base.as_ptr().addr() & FastAccess::K == 0, "mmap returns pages");
        debug_assert!(FastAccess::limit(word) <= m.whole);
        for (a, flag) in [(&self.read, REGION_READ), (&self.write, REGION_WRITE)] {
            if m.access & flag != 0 {
                a.0.store(word, Ordering::Release);
            }
        }
    }

    /// The address of an access of `T` at `off` when the fast path may take it: aligned, in
    /// range, allowed, and mapped.
    #[inline(always)]
    pub(super) fn direct<T: Width>(&self, off: u64, access: u32) -> Option<*mut T> {
        let a = if access == REGION_WRITE { &self.write } else { &self.read };
        let word = a.0.load(Ordering::Acquire);
        // One comparison for all four conditions: the limit is 0 unless mapped and allowed.
        (off % T::BYTES as u64 == 0 && off < FastAccess::limit(word)).then(|| {
            let base = std::ptr::with_exposed_provenance_mut::<u8>(word & !FastAccess::K);
            // SAFETY: off is aligned to T (a power of two up to 8) and below the limit, a
            // power of two of at least 8 no larger than the mapping's `whole`, so
            // off + T::BYTES <= limit <= whole <= len: inside the mapping.
            unsafe { base.add(off as usize).cast::<T>() }
        })
    }
}

/// A region's mapping and the rule the register accessors follow on it, for callers that take
/// the same shortcut themselves (the Python package's memoryviews). 48 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    /// The mapping's address (what `vfiokit_region_map` and `Device::map` give).
    pub addr: *mut std::ffi::c_void,
    /// Its length: the region's size rounded up to pages.
    pub len: u64,
    /// Accesses of 1, 2, 4 or 8 bytes aligned to their width inside `[0, direct)` go straight
    /// through the mapping, if `access` allows them; the rest go through the device. 0 when the
    /// region's mmappable areas do not cover it whole.
    pub direct: u64,
    /// `VFIOKIT_REGION_READ` and `VFIOKIT_REGION_WRITE`: what the mapping permits (its pages'
    /// protection). A store it does not permit faults: leave it to the accessors, which refuse
    /// it with an error.
    pub access: u32,
    pub reserved0: u32,
    pub reserved: [u64; 2],
}

const _: () = assert!(size_of::<MapInfo>() == 48 && std::mem::offset_of!(MapInfo, access) == 24);

impl Mapping {
    /// Replaces a guarded mapping with all-ones memory.
    pub(super) fn retire(&self) -> sys::SysResult<()> {
        self.guard.map_or(Ok(()), fault::retire)
    }
}

// SAFETY: the mapping is plain memory shared with a device; access discipline is the caller's.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // A kernel device's is listed; no other live mapping has its address.
        let mut maps = KERNEL_MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
        maps.remove(&self.base.as_ptr().addr());
        drop(maps);
        if let Some(slot) = self.guard {
            fault::unguard(slot);
        }
        // SAFETY: we reserved base..base+len and nothing else refers to it once we drop.
        unsafe { mem::unmap(self.base, self.len) };
    }
}

/// A register checked once, for the loops that poll or feed one: [`Device::register`] checked
/// its alignment, range and mapping and that its region may be read and written, so
/// [`read`](Self::read) and [`write`](Self::write) are one volatile access each, what a
/// hand-written driver does through its own pointer. It borrows the device, whose mapping it
/// points into.
pub struct Register<'a, T: Width> {
    at: NonNull<T>,
    _device: PhantomData<&'a Device>,
}

// SAFETY: `at` points into the device's mapping, which the borrow keeps alive; every access
// is one volatile load or store, as the device's own accessors make from any thread.
unsafe impl<T: Width> Send for Register<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Width> Sync for Register<'_, T> {}

impl<T: Width> std::fmt::Debug for Register<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Register").field(&self.at).finish()
    }
}

impl<T: Width> Register<'_, T> {
    /// Its address in the mapping: valid while the device lives.
    pub fn as_ptr(&self) -> *mut T {
        self.at.as_ptr()
    }

    #[inline]
    pub fn read(&self) -> T {
        // SAFETY: aligned, inside a mapped area of a readable region (checked at creation);
        // volatile so it is exactly one access.
        unsafe { self.at.as_ptr().read_volatile() }
    }

    #[inline]
    pub fn write(&self, value: T) {
        // SAFETY: as for read, in a writable region, so a writable mapping.
        unsafe { self.at.as_ptr().write_volatile(value) }
    }
}

/// A register width: one access of exactly this many bytes.
pub trait Width: Copy + sealed::Sealed {
    const BYTES: usize;
    fn from_ne(bytes: &[u8]) -> Self;
    fn to_ne(self, out: &mut [u8]);
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! width {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Width for $t {
            const BYTES: usize = size_of::<$t>();
            fn from_ne(bytes: &[u8]) -> Self {
                <$t>::from_ne_bytes(bytes.try_into().expect("caller passes BYTES bytes"))
            }
            fn to_ne(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_ne_bytes())
            }
        }
    )*};
}
width!(u8, u16, u32, u64);

impl Device {
    /// Every slow path's first check: ENODEV once the device is gone.
    pub(super) fn region(&self, index: u32) -> Result<&Region> {
        self.present()?;
        self.regions
            .get(index as usize)
            .filter(|r| r.flags & region::REGION_PRESENT != 0)
            .ok_or_else(|| Error::invalid(format!("{} has no region {index}", self.address)))
    }

    pub(super) fn region_areas(&self, r: &Region) -> &[Area] {
        &self.areas[r.first_area as usize..(r.first_area + r.num_areas) as usize]
    }

    /// Checks that `[off, off+len)` lies inside the region and the region allows every access
    /// in `access` (REGION_READ, REGION_WRITE or both).
    pub(super) fn check_range(&self, r: &Region, off: u64, len: usize, access: u32) -> Result<()> {
        if off.checked_add(len as u64).is_none_or(|end| end > r.size) {
            return Err(Error::invalid(format!(
                "{} region {}: [{off:#x}, +{len:#x}) is outside its {:#x} bytes",
                self.address, r.index, r.size
            )));
        }
        for (flag, what) in [(REGION_READ, "read"), (REGION_WRITE, "written")] {
            if access & flag != 0 && r.flags & flag == 0 {
                return Err(Error::new(
                    libc::EACCES,
                    format!("{} region {} cannot be {what}", self.address, r.index),
                ));
            }
        }
        Ok(())
    }

    /// The region's contiguous mapping (made on first use).
    pub fn map(&self, index: u32) -> Result<NonNull<u8>> {
        self.mappable(index).map(|m| m.base)
    }

    /// Maps a region as [`map`](Self::map) does and says which accesses may go straight
    /// through the mapping.
    pub fn map_info(&self, index: u32) -> Result<MapInfo> {
        let m = self.mappable(index)?;
        Ok(MapInfo {
            addr: m.base.as_ptr().cast(),
            len: m.len as u64,
            direct: m.whole,
            access: m.access,
            reserved0: 0,
            reserved: [0; 2],
        })
    }

    /// The mapping of region `index`, refused for a region without mmappable areas.
    pub(super) fn mappable(&self, index: u32) -> Result<&Mapping> {
        let r = self.region(index)?;
        if r.num_areas == 0 {
            return Err(Error::new(
                libc::ENOTSUP,
                format!(
                    "{} region {index} cannot be mmapped{}: use the read/write accessors",
                    self.address,
                    if r.flags & region::REGION_IO_PORT != 0 { " (I/O-port BAR)" } else { "" }
                ),
            ));
        }
        self.mapping(r)
    }

    pub(super) fn mapping(&self, r: &Region) -> Result<&Mapping> {
        self.mappings[r.index as usize].get_or_try_init(|| {
            let what = || format!("mapping {} region {}", self.address, r.index);
            let page = sys::page_size();
            let len = (r.size as usize).next_multiple_of(page);
            let sources = (0..r.num_areas as usize)
                .map(|i| self.io.mmap_source(r, i))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::new(
                        libc::EPROTO,
                        format!(
                            "{}: the server sent no fd, or not one per area, to map region {} from",
                            self.address, r.index
                        ),
                    )
                })?;
            let base = mem::reserve(len).context(what)?;
            let areas = self.region_areas(r);
            let whole = match areas {
                [a] if a.offset == 0 && a.size == r.size => r.size,
                _ => 0,
            };
            // Built first, so an area failing below releases the reservation.
            let access = r.flags & (REGION_READ | REGION_WRITE);
            let mut mapping = Mapping { base, len, whole, access, guard: None };
            let prot = [(REGION_READ, libc::PROT_READ), (REGION_WRITE, libc::PROT_WRITE)]
                .iter()
                .filter(|(f, _)| r.flags & f != 0)
                .fold(0, |p, (_, bit)| p | bit);
            for (a, source) in areas.iter().zip(sources) {
                // SAFETY: base..base+len is our reservation; the area lies inside the region.
                let at = unsafe { base.add(a.offset as usize) };
                // SAFETY: the range is inside our fresh reservation.
                unsafe {
                    mem::map_shared_fixed(
                        at,
                        (a.size as usize).next_multiple_of(page),
                        source,
                        r.offset + a.offset,
                        prot,
                    )
                }
                .context(what)?;
            }
            if let Ok(device) = self.io.kernel_fd(&self.address) {
                let gone = self.gone_state()?;
                let entry = KernelMapping { len, device: device.as_raw_fd(), region: r.index };
                let mut maps = KERNEL_MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
                maps.insert(base.as_ptr().addr(), entry);
                mapping.guard = fault::guard(base, len, gone);
            }
            if let Some(fast) = self.fast.get(r.index as usize) {
                fast.set(&mapping);
            }
            Ok(mapping)
        })
    }

    /// A pointer to `[off, off+len)` through the mapping when one area covers it all.
    pub(super) fn mapped(&self, r: &Region, off: u64, len: usize) -> Result<Option<*mut u8>> {
        let end = off + len as u64;
        if !self.region_areas(r).iter().any(|a| a.offset <= off && end <= a.offset + a.size) {
            return Ok(None);
        }
        // SAFETY: off is inside the region, hence inside the mapping.
        Ok(Some(unsafe { self.mapping(r)?.base.as_ptr().add(off as usize) }))
    }

    /// Reads `buf.len()` bytes at `off` of a region: through the mapping where one area covers
    /// the range, the device fd elsewhere. 1, 2, 4 or 8 bytes at an offset aligned to that size
    /// are one access of that width (a register); longer copies use unspecified widths.
    pub fn read(&self, index: u32, off: u64, buf: &mut [u8]) -> Result<()> {
        match (buf.len(), off % buf.len().max(1) as u64) {
            (1, _) => self.read_reg::<u8>(index, off)?.to_ne(buf),
            (2, 0) => self.read_reg::<u16>(index, off)?.to_ne(buf),
            (4, 0) => self.read_reg::<u32>(index, off)?.to_ne(buf),
            (8, 0) => self.read_reg::<u64>(index, off)?.to_ne(buf),
            (len, _) => {
                let r = self.region(index)?;
                self.check_range(r, off, len, REGION_READ)?;
                match self.mapped(r, off, len)? {
                    // SAFETY: the source is inside our mapping, the destination is the caller's.
                    Some(p) => unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len) },
                    None => self.pread(r, off, buf)?,
                }
            }
        }
        Ok(())
    }

    /// Writes `buf` at `off` of a region, with the same access rules as [`Device::read`].
    pub fn write(&self, index: u32, off: u64, buf: &[u8]) -> Result<()> {
        match (buf.len(), off % buf.len().max(1) as u64) {
            (1, _) => self.write_reg(index, off, buf[0]),
            (2, 0) => self.write_reg(index, off, u16::from_ne(buf)),
            (4, 0) => self.write_reg(index, off, u32::from_ne(buf)),
            (8, 0) => self.write_reg(index, off, u64::from_ne(buf)),
            (len, _) => {
                let r = self.region(index)?;
                self.check_range(r, off, len, REGION_WRITE)?;
                match self.mapped(r, off, len)? {
                    // SAFETY: the destination is inside our mapping, the source is the caller's.
                    Some(p) => unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, len) },
                    None => self.pwrite(r, off, buf)?,
                }
                Ok(())
            }
        }
    }

    pub(super) fn pread(&self, r: &Region, off: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        self.io.read(r, off, buf).map_err(|e| {
            e.within(format!(
                "reading {len} bytes at {off:#x} of {} region {}",
                self.address, r.index
            ))
        })
    }

    pub(super) fn pwrite(&self, r: &Region, off: u64, buf: &[u8]) -> Result<()> {
        self.io.write(r, off, buf).map_err(|e| {
            e.within(format!(
                "writing {} bytes at {off:#x} of {} region {}",
                buf.len(),
                self.address,
                r.index
            ))
        })
    }

    pub(super) fn check_aligned<T: Width>(&self, index: u32, off: u64) -> Result<()> {
        if off % T::BYTES as u64 != 0 {
            return Err(Error::invalid(format!(
                "{} region {index}: offset {off:#x} is not aligned to the {}-byte access",
                self.address,
                T::BYTES
            )));
        }
        Ok(())
    }

    /// The register of `T`'s width at `off` of region `index`, checked once (see [`Register`]):
    /// aligned, inside the region, in one of its mmappable areas (ENOTSUP elsewhere: the
    /// device fd's part of a region is for [`read_reg`](Self::read_reg) and
    /// [`write_reg`](Self::write_reg)), in a region that may be read and written (EACCES
    /// otherwise; every mmappable BAR of vfio-pci may). Maps the region.
    pub fn register<T: Width>(&self, index: u32, off: u64) -> Result<Register<'_, T>> {
        self.check_aligned::<T>(index, off)?;
        let r = self.region(index)?;
        self.check_range(r, off, T::BYTES, REGION_READ | REGION_WRITE)?;
        let at = self.mapped(r, off, T::BYTES)?.ok_or_else(|| {
            Error::new(
                libc::ENOTSUP,
                format!(
                    "{} region {index}: [{off:#x}, +{}) is not in an mmappable area: use read_reg/write_reg",
                    self.address,
                    T::BYTES
                ),
            )
        })?;
        Ok(Register {
            at: NonNull::new(at.cast()).expect("inside a mapping"),
            _device: PhantomData,
        })
    }

    /// One read of exactly `T`'s width at `off` (aligned to it).
    #[inline]
    pub fn read_reg<T: Width>(&self, index: u32, off: u64) -> Result<T> {
        match self.fast.get(index as usize).and_then(|f| f.direct::<T>(off, REGION_READ)) {
            // SAFETY: aligned, inside a mapped area; volatile so it is exactly one access.
            Some(p) => Ok(unsafe { p.read_volatile() }),
            None => self.read_reg_slow(index, off),
        }
    }

    /// Everything but a mapped region's plain access: the first mapping, the device fd, errors.
    #[cold]
    #[inline(never)]
    pub(super) fn read_reg_slow<T: Width>(&self, index: u32, off: u64) -> Result<T> {
        self.check_aligned::<T>(index, off)?;
        let r = self.region(index)?;
        self.check_range(r, off, T::BYTES, REGION_READ)?;
        match self.mapped(r, off, T::BYTES)? {
            // SAFETY: aligned, inside a mapped area; volatile so it is exactly one access.
            Some(p) => Ok(unsafe { p.cast::<T>().read_volatile() }),
            None => {
                let mut bytes = [0u8; 8];
                self.pread(r, off, &mut bytes[..T::BYTES])?;
                Ok(T::from_ne(&bytes[..T::BYTES]))
            }
        }
    }

    /// One write of exactly `T`'s width at `off` (aligned to it).
    #[inline]
    pub fn write_reg<T: Width>(&self, index: u32, off: u64, value: T) -> Result<()> {
        match self.fast.get(index as usize).and_then(|f| f.direct::<T>(off, REGION_WRITE)) {
            // SAFETY: aligned, inside a mapped area; volatile so it is exactly one access.
            Some(p) => unsafe { p.write_volatile(value) },
            None => self.write_reg_slow(index, off, value)?,
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    pub(super) fn write_reg_slow<T: Width>(&self, index: u32, off: u64, value: T) -> Result<()> {
        self.check_aligned::<T>(index, off)?;
        let r = self.region(index)?;
        self.check_range(r, off, T::BYTES, REGION_WRITE)?;
        match self.mapped(r, off, T::BYTES)? {
            // SAFETY: aligned, inside a mapped area; volatile so it is exactly one access.
            Some(p) => unsafe { p.cast::<T>().write_volatile(value) },
            None => {
                let mut bytes = [0u8; 8];
                value.to_ne(&mut bytes[..T::BYTES]);
                self.pwrite(r, off, &bytes[..T::BYTES])?;
            }
        }
        Ok(())
    }

    /// The config-space offset of a capability (`cap_id < 0x100` standard, else extended as
    /// `id + PCI_CAP_EXTENDED`), or None if the device does not have it.
    pub fn find_capability(&self, cap_id: u32) -> Result<Option<u32>> {
        let r = self.region(PCI_CONFIG)?;
        let mut config = vec![0u8; r.size.min(4096) as usize];
        self.pread(r, 0, &mut config)?;
        Ok(pci::find_capability(&config, cap_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mapping of `len` reserved bytes (no access: the fast path only computes addresses).
    fn mapping(len: usize, whole: u64, access: u32) -> Mapping {
        let base = mem::reserve(len).expect("reserve address space");
        Mapping { base, len, whole, access, guard: None }
    }

    fn fast(m: &Mapping) -> FastPath {
        let fast = FastPath::default();
        fast.set(m);
        fast
    }

    #[test]
    fn the_fast_path_takes_aligned_accesses_inside_the_whole_region() {
        let m = mapping(0x1000, 0x1000, REGION_READ | REGION_WRITE);
        let f = fast(&m);
        let at = |off: u64| m.base.as_ptr().wrapping_add(off as usize);
        assert_eq!(f.direct::<u32>(0, REGION_READ), Some(at(0).cast()));
        assert_eq!(f.direct::<u32>(0xffc, REGION_WRITE), Some(at(0xffc).cast()), "last word");
        assert_eq!(f.direct::<u64>(0xff8, REGION_READ), Some(at(0xff8).cast()));
        assert_eq!(f.direct::<u8>(0xfff, REGION_READ), Some(at(0xfff)), "last byte");
        assert_eq!(f.direct::<u32>(0x1000, REGION_READ), None, "past the end");
        assert_eq!(f.direct::<u32>(0x2, REGION_READ), None, "misaligned");
        assert_eq!(f.direct::<u16>(0x1, REGION_READ), None, "misaligned");
        assert_eq!(f.direct::<u32>(u64::MAX - 3, REGION_READ), None, "far out");
    }

    #[test]
    fn the_fast_path_limit_is_the_largest_power_of_two_in_the_region() {
        let m = mapping(0x2000, 0x1800, REGION_READ);
        let f = fast(&m);
        assert!(f.direct::<u32>(0xffc, REGION_READ).is_some());
        assert_eq!(f.direct::<u32>(0x1000, REGION_READ), None, "the slow path decides there");
    }

    #[test]
    fn the_fast_path_refuses_what_the_region_forbids_and_small_or_sparse_regions() {
        let read_only = mapping(0x1000, 0x1000, REGION_READ);
        let f = fast(&read_only);
        assert!(f.direct::<u32>(0, REGION_READ).is_some());
        assert_eq!(f.direct::<u32>(0, REGION_WRITE), None, "no write permission");
        let tiny = mapping(0x1000, 4, REGION_READ | REGION_WRITE);
        assert_eq!(fast(&tiny).direct::<u8>(0, REGION_READ), None, "under 8 bytes");
        let sparse = mapping(0x1000, 0, REGION_READ | REGION_WRITE);
        assert_eq!(fast(&sparse).direct::<u8>(0, REGION_READ), None, "not covered whole");
        assert_eq!(FastPath::default().direct::<u8>(0, REGION_READ), None, "not mapped yet");
    }

    #[test]
    fn widths_round_trip_in_native_order() {
        let mut out = [0u8; 8];
        0x1122_3344u32.to_ne(&mut out[..4]);
        assert_eq!(out[..4], 0x1122_3344u32.to_ne_bytes());
        assert_eq!(u32::from_ne(&out[..4]), 0x1122_3344);
        0xa1b2_c3d4_e5f6_0718u64.to_ne(&mut out);
        assert_eq!(u64::from_ne(&out), 0xa1b2_c3d4_e5f6_0718);
        assert_eq!(<u16 as Width>::BYTES, 2);
    }
}
