//! Not vfiokit: a sketch of the fix proposed for its accessors' overhead (see the report in
//! bench/README.md). The same checks as `Device::read_reg`/`write_reg` on a mapped region
//! (alignment, range, permission), but from a per-region record cached when the region is
//! mapped, in an `#[inline]` body whose error path is out of line and cold. It shows what a
//! checked accessor can cost on this machine; vfiokit's own figures are the "vfiokit" rows.

use std::ptr::NonNull;

use vfiokit::{Device, Error, Result};

pub struct Fast {
    base: NonNull<u8>,
    size: u64,
    flags: u32,
}

#[cold]
#[inline(never)]
fn bad(off: u64, bytes: usize) -> Error {
    Error::invalid(format!(
        "offset {off:#x} (+{bytes}) is misaligned, outside the region or not allowed"
    ))
}

impl Fast {
    /// For a region that one mmappable area covers whole (BARs here).
    pub fn new(dev: &Device, index: u32) -> Fast {
        let r = dev.regions()[index as usize];
        let a = &dev.areas()[r.first_area as usize];
        assert!(
            r.num_areas == 1 && a.offset == 0 && a.size >= r.size,
            "one area covering the region"
        );
        Fast { base: dev.map(index).expect("map"), size: r.size, flags: r.flags }
    }

    #[inline]
    fn at<T>(&self, off: u64, access: u32) -> Result<*mut T> {
        let bytes = size_of::<T>() as u64;
        if off % bytes != 0
            || off >= self.size
            || self.size - off < bytes
            || self.flags & access == 0
        {
            return Err(bad(off, bytes as usize));
        }
        // SAFETY: checked inside the mapping.
        Ok(unsafe { self.base.as_ptr().add(off as usize) }.cast())
    }

    #[inline]
    pub fn read32(&self, off: u64) -> Result<u32> {
        // SAFETY: aligned and inside the mapping; volatile: exactly one access.
        self.at::<u32>(off, vfiokit::region::REGION_READ).map(|p| unsafe { p.read_volatile() })
    }

    #[inline]
    pub fn write32(&self, off: u64, v: u32) -> Result<()> {
        // SAFETY: as above.
        self.at::<u32>(off, vfiokit::region::REGION_WRITE).map(|p| unsafe { p.write_volatile(v) })
    }
}
