//! C exports for DMA contexts.

use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, Weak};

use super::{Handle, call, call_or, close, need, opened, put};
use crate::error::Result;
use crate::iommu::{IOMMU_AUTO, Iommu};
use crate::iova::IovaRange;

/// A DMA context (opaque). Reference-counted: devices opened in it keep it alive.
pub struct vfiokit_iommu {
    magic: u64,
    pub(super) iommu: Iommu,
}

impl Handle for vfiokit_iommu {
    const MAGIC: u64 = u64::from_be_bytes(*b"vfkIOMMU");
    const NAME: &'static str = "iommu";
    fn magic(&self) -> u64 {
        self.magic
    }
}

impl Drop for vfiokit_iommu {
    fn drop(&mut self) {
        self.magic = 0;
    }
}

impl vfiokit_iommu {
    fn new(iommu: Iommu) -> Arc<vfiokit_iommu> {
        Arc::new(vfiokit_iommu { magic: Self::MAGIC, iommu })
    }

    /// The handle of the process-wide shared context that `iommu` (a device's) is: one per
    /// process while in use, so `vfiokit_device_iommu` gives every such device the same pointer.
    pub(super) fn shared(iommu: &Iommu) -> Arc<vfiokit_iommu> {
        static SHARED: Mutex<Weak<vfiokit_iommu>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        match slot.upgrade() {
            Some(h) if h.iommu == *iommu => h,
            _ => {
                let h = vfiokit_iommu::new(iommu.clone());
                *slot = Arc::downgrade(&h);
                h
            }
        }
    }

    /// A new reference to the handle behind `p`.
    ///
    /// # Safety
    /// `p` must be NULL or a pointer from `vfiokit_iommu_open`/`vfiokit_device_iommu`.
    pub(super) unsafe fn retain(p: *const vfiokit_iommu) -> Result<Arc<vfiokit_iommu>> {
        // SAFETY: forwarded from the caller.
        unsafe { Self::from_ptr(p) }?;
        // SAFETY: p came from Arc::into_raw (open) or Arc::as_ptr of a live Arc (device).
        unsafe { Arc::increment_strong_count(p) };
        // SAFETY: balanced by the increment above.
        Ok(unsafe { Arc::from_raw(p) })
    }
}

/// Opens a DMA context: `VFIOKIT_IOMMU_AUTO`, `_TYPE1` or `_IOMMUFD`.
///
/// # Safety
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_open(kind: u32, out: *mut *mut vfiokit_iommu) -> c_int {
    call(|| {
        need(out, "out")?;
        let h = vfiokit_iommu::new(Iommu::open(kind)?);
        // SAFETY: checked non-null; the caller provides a writable slot.
        unsafe { put(out, "out", opened(Arc::into_raw(h)).cast_mut()) }
    })
}

/// Drops the caller's reference; devices still open in the context keep it alive.
/// NULL is fine; closing twice is refused with `EBADF`.
///
/// # Safety
/// `iommu` must be NULL or from `vfiokit_iommu_open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_close(iommu: *mut vfiokit_iommu) {
    // SAFETY: the reference vfiokit_iommu_open handed out, released exactly once.
    close(iommu, "vfiokit_iommu", |p| drop(unsafe { Arc::from_raw(p) }))
}

/// `VFIOKIT_IOMMU_TYPE1` or `VFIOKIT_IOMMU_IOMMUFD`; `VFIOKIT_IOMMU_AUTO` (0) if `iommu` is invalid.
///
/// # Safety
/// `iommu` must be NULL or a live context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_kind(iommu: *const vfiokit_iommu) -> u32 {
    // SAFETY: forwarded from the caller.
    call_or(|_| IOMMU_AUTO, || Ok(unsafe { vfiokit_iommu::from_ptr(iommu) }?.iommu.kind().code()))
}

/// Copies up to `cap` valid IOVA ranges to `out` and sets `*n` to how many there are (which
/// may exceed `cap`; `out` may be NULL when `cap` is 0).
///
/// # Safety
/// `out` must be valid for `cap` records; `n` for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_iova_ranges(
    iommu: *const vfiokit_iommu,
    out: *mut IovaRange,
    cap: usize,
    n: *mut usize,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let h = unsafe { vfiokit_iommu::from_ptr(iommu) }?;
        need(n, "n")?;
        if cap > 0 {
            need(out, "out")?;
        }
        let ranges = h.iommu.iova_ranges()?;
        for (i, r) in ranges.iter().take(cap).enumerate() {
            // SAFETY: i < cap, and out holds cap records.
            unsafe { out.add(i).write(*r) };
        }
        // SAFETY: checked non-null.
        unsafe { put(n, "n", ranges.len()) }
    })
}

/// Maps `len` bytes at `vaddr` for DMA at `iova` (all page-aligned).
///
/// # Safety
/// The memory must stay mapped until unmapped here or the context closes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_map(
    iommu: *mut vfiokit_iommu,
    vaddr: *mut c_void,
    len: usize,
    iova: u64,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller (pointer validity and memory lifetime).
        unsafe { vfiokit_iommu::from_ptr(iommu)?.iommu.map(vaddr.cast(), len, iova) }
    })
}

/// Maps `len` bytes at `vaddr` at an IOVA the allocator picks inside the valid ranges.
///
/// # Safety
/// As for `vfiokit_dma_map`; `iova` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_map_any(
    iommu: *mut vfiokit_iommu,
    vaddr: *mut c_void,
    len: usize,
    iova: *mut u64,
) -> c_int {
    call(|| {
        need(iova, "iova")?;
        // SAFETY: forwarded from the caller.
        let at = unsafe { vfiokit_iommu::from_ptr(iommu)?.iommu.map_any(vaddr.cast(), len) }?;
        // SAFETY: checked non-null.
        unsafe { put(iova, "iova", at) }
    })
}

/// Removes the mapping made at `iova` with length `len`.
///
/// # Safety
/// `iommu` must be NULL or a live context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_unmap(
    iommu: *mut vfiokit_iommu,
    iova: u64,
    len: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { vfiokit_iommu::from_ptr(iommu) }?.iommu.unmap(iova, len))
}

/// Allocates zeroed, page-rounded memory mapped for DMA; returns its address and IOVA.
///
/// # Safety
/// `vaddr` and `iova` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_alloc(
    iommu: *mut vfiokit_iommu,
    len: usize,
    vaddr: *mut *mut c_void,
    iova: *mut u64,
) -> c_int {
    call(|| {
        need(vaddr, "vaddr")?;
        need(iova, "iova")?;
        // SAFETY: forwarded from the caller.
        let (addr, at) = unsafe { vfiokit_iommu::from_ptr(iommu) }?.iommu.alloc(len)?;
        // SAFETY: both checked non-null.
        unsafe {
            put(vaddr, "vaddr", addr.as_ptr().cast())?;
            put(iova, "iova", at)
        }
    })
}

/// Unmaps and frees a buffer from `vfiokit_dma_alloc`.
///
/// # Safety
/// Nothing may use the buffer afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_free(iommu: *mut vfiokit_iommu, vaddr: *mut c_void) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { vfiokit_iommu::from_ptr(iommu) }?.iommu.free(vaddr.cast()))
}
