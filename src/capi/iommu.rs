//! C exports for DMA contexts.

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

use super::boundary::{array_arg, call, call_or, need, need_records, put, put_records, str_arg};
use super::device::vfiokit_device;
use super::handle::{Call, FreeSlots, Handle, Hold, Slot, lock};
use crate::error::{Error, Result};
use crate::iommu::{IOMMU_AUTO, Iommu, IommuKind};
use crate::iova::IovaRange;

/// A DMA context (opaque). Reference-counted: devices opened in it keep it alive.
pub struct vfiokit_iommu {
    _private: [u8; 0],
}

/// A context handle carries the context; the devices opened in it hold it (see
/// [`super::device`]), so it stays open for them after its owner closed it, and
/// `vfiokit_device_iommu` can return it.
impl Handle for vfiokit_iommu {
    type Value = Iommu;
    const MAGIC: u64 = u64::from_be_bytes(*b"vfkIOMMU");
    const NAME: &'static str = "iommu";
    const TYPE: &'static str = "vfiokit_iommu";
    /// The context goes when the last call in flight on it, or the last device, lets it go.
    const CLOSE_WAITS: bool = false;
    fn free_slots() -> &'static FreeSlots<Self> {
        static FREE: FreeSlots<vfiokit_iommu> = Mutex::new(Vec::new());
        &FREE
    }
}

/// The body of the calls that allocate DMA memory: `vaddr` and `iova` checked, then `alloc`'s
/// address and IOVA written to them.
///
/// # Safety
/// `vaddr` and `iova` must be NULL or valid for writes.
unsafe fn allocated(
    vaddr: *mut *mut c_void,
    iova: *mut u64,
    alloc: impl FnOnce() -> Result<(std::ptr::NonNull<u8>, u64)>,
) -> Result<()> {
    need(vaddr, "vaddr")?;
    need(iova, "iova")?;
    let (addr, at) = alloc()?;
    // SAFETY: both checked non-null.
    unsafe {
        put(vaddr, "vaddr", addr.as_ptr().cast())?;
        put(iova, "iova", at)
    }
}

/// The context behind `p`, held for the duration of one call.
///
/// # Safety
/// As for [`Handle::enter`].
pub(super) unsafe fn iommu(p: *const vfiokit_iommu) -> Result<Call<vfiokit_iommu>> {
    // SAFETY: forwarded from the caller.
    unsafe { vfiokit_iommu::enter(p) }
}

/// The handles of the contexts the library made for devices opened without one (the shared
/// context; a vfio-user device's own), which no one owns: each is open while devices hold it.
/// So the devices in one such context give C one pointer for it.
static MADE: Mutex<Vec<&'static Slot<vfiokit_iommu>>> = Mutex::new(Vec::new());

/// A hold on the handle of `context`, the context a device opened without one is in: the
/// handle the other devices in it hold, or a new one.
pub(super) fn made_for(context: &Iommu) -> Hold<vfiokit_iommu> {
    let mut made = lock(&MADE);
    let found = made.iter().find_map(|slot| slot.hold().ok().filter(|h| **h == *context));
    // Closed ones go (a closed slot may be reused for any context handle).
    made.retain(|slot| slot.is_open());
    found.unwrap_or_else(|| {
        let hold = vfiokit_iommu::held(context.clone());
        // Once, though its slot may have closed and come back since the retain.
        made.retain(|slot| !std::ptr::eq(*slot, hold.slot()));
        made.push(hold.slot());
        hold
    })
}

/// Opens a DMA context: `VFIOKIT_IOMMU_AUTO`, `_TYPE1`, `_IOMMUFD`, `_VFIO_USER` (for devices
/// served over vfio-user), `_TYPE1V1`, `_IOMMUFD_COMPAT`, `_IOMMUFD_COMPAT_V1` or `_NOIOMMU`
/// (VFIO's unsafe no-IOMMU mode: ENOTSUP where the kernel lacks it, ENODEV while it is off,
/// EPERM without CAP_SYS_RAWIO).
///
/// # Safety
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_open(kind: u32, out: *mut *mut vfiokit_iommu) -> c_int {
    call(|| {
        need(out, "out")?;
        let h = vfiokit_iommu::into_c(Iommu::open(IommuKind::from_code(kind)?)?);
        // SAFETY: checked non-null; the caller provides a writable slot.
        unsafe { put(out, "out", h) }
    })
}

/// Drops the caller's reference; devices still open in the context keep it alive.
/// NULL is fine; closing twice is refused with `EBADF`.
///
/// # Safety
/// `iommu` must be NULL or from `vfiokit_iommu_open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_close(iommu: *mut vfiokit_iommu) {
    // SAFETY: forwarded from the caller.
    unsafe { vfiokit_iommu::close(iommu) }
}

/// The context's `VFIOKIT_IOMMU_*` kind (never AUTO); `VFIOKIT_IOMMU_AUTO` (0) if `iommu` is invalid.
///
/// # Safety
/// `iommu` must be NULL or a live context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_kind(iommu: *const vfiokit_iommu) -> u32 {
    // SAFETY: forwarded from the caller.
    call_or(|_| IOMMU_AUTO, || Ok(unsafe { self::iommu(iommu) }?.kind().code()))
}

/// The context's fd (the type1 container or /dev/iommu), for ioctls vfiokit does not wrap, or
/// a negative errno. Borrowed: valid until the context is closed; do not close it.
///
/// # Safety
/// `iommu` must be NULL or a live context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_fd(iommu: *const vfiokit_iommu) -> c_int {
    // SAFETY: forwarded from the caller.
    call_or(|e| -e.errno(), || Ok(unsafe { self::iommu(iommu) }?.fd()?.as_raw_fd()))
}

/// Hands the context, and access to the `n` devices named in `devices` (bound to vfio-pci), to
/// the process at the other end of the UNIX socket `sock`, which rebuilds it with
/// `vfiokit_iommu_adopt`: a privileged helper opens, an unprivileged driver runs. The fds go
/// over SCM_RIGHTS (the container and the devices' groups, or /dev/iommu and their cdevs).
/// Only before any DMA mapping (`-EBUSY`); then close this handle: the context is the
/// receiver's to map in.
///
/// # Safety
/// `iommu` NULL or live; `devices` valid for reading `n` pointers to NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_export(
    iommu: *mut vfiokit_iommu,
    devices: *const *const c_char,
    n: usize,
    sock: c_int,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let iommu = unsafe { self::iommu(iommu) }?;
        // SAFETY: the caller provides n string pointers, each NULL or a string.
        let names = unsafe { array_arg(devices, n, "devices", |p| str_arg(p, "a device name")) }?;
        iommu.export(&names, socket_arg(sock)?)
    })
}

/// Rebuilds the context another process handed over with `vfiokit_iommu_export` on the UNIX
/// socket `sock`; open its devices with `vfiokit_device_open(name, *out, ...)`. A malformed
/// message is `-EPROTO`, with every fd that came with it closed.
///
/// # Safety
/// `out` must be NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_adopt(sock: c_int, out: *mut *mut vfiokit_iommu) -> c_int {
    call(|| {
        need(out, "out")?;
        let h = vfiokit_iommu::into_c(Iommu::adopt(socket_arg(sock)?)?);
        // SAFETY: checked non-null; the caller provides a writable slot.
        unsafe { put(out, "out", h) }
    })
}

/// Hands `iommu` and its `n` `devices` (every device open in it) to the process at the other
/// end of the UNIX socket `sock`, which takes them with `vfiokit_iommu_take_over`, while the
/// devices keep running: their open fds (never reopened: vfio-pci resets a device at its first
/// open), their routed IRQ eventfds, and every DMA buffer, allocated with
/// `VFIOKIT_DMA_SHAREABLE`, at the same IOVAs over the same memory, which the IOMMU never stops
/// mapping (type1's VFIO_UPDATE_VADDR; on iommufd, mappings of the buffers' memfds and
/// IOMMU_IOAS_CHANGE_PROCESS, Linux 6.13+). Waits for the receiver's answer (stop waiting on the
/// devices' vectors first: a wait here could take the receiver's interrupt). On success close
/// these handles (the devices go on running: the receiver holds their fds); meanwhile the
/// context refuses the DMA calls that would change it with `-EBADF` and IRQ waits on the
/// devices return `-ECANCELED`. On failure this process still owns everything, as before.
/// Refused, changing nothing: a context other than type1 or iommufd (`-ENOTSUP`;
/// `-EOPNOTSUPP` on an iommufd before Linux 6.13); a DMA heap in use, a mapping
/// of the caller's memory, a buffer allocated without `VFIOKIT_DMA_SHAREABLE`, a device of the
/// context not listed (`-EBUSY`); at most 253 fds in all (`-EINVAL`).
///
/// # Safety
/// `iommu` NULL or live; `devices` valid for reading `n` device handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_hand_over(
    iommu: *mut vfiokit_iommu,
    devices: *const *mut vfiokit_device,
    n: usize,
    sock: c_int,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let iommu = unsafe { self::iommu(iommu) }?;
        // SAFETY: the caller provides n handles, each NULL or live.
        let held = unsafe { array_arg(devices, n, "devices", |d| super::device::dev(d)) }?;
        let devices: Vec<&crate::Device> = held.iter().map(|d| &***d).collect();
        iommu.hand_over(&devices, socket_arg(sock)?)
    })
}

/// Takes over the context and devices another process handed over with
/// `vfiokit_iommu_hand_over` on the UNIX socket `sock`: `*iommu` is the context, `devices[0..*n)`
/// its devices in the order they were listed, each a handle to close as usual. Their records,
/// IRQ routes (each vector's eventfd the device's own, for `vfiokit_irq_wait`) and DMA buffers
/// are as the sender had them, the buffers at the same IOVAs and at new addresses
/// (`vfiokit_dma_to_vaddr`). More devices than `cap` is `-ENOSPC`; a malformed message
/// `-EPROTO`; on any failure the sender is told and keeps everything, and every fd received
/// is closed.
///
/// # Safety
/// `iommu` and `n` valid for a write; `devices` for `cap` handles.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_take_over(
    sock: c_int,
    iommu: *mut *mut vfiokit_iommu,
    devices: *mut *mut vfiokit_device,
    cap: usize,
    n: *mut usize,
) -> c_int {
    call(|| {
        need(iommu, "iommu")?;
        need(n, "n")?;
        if cap > 0 {
            need(devices, "devices")?;
        }
        let (context, taken) = Iommu::take_over_at_most(socket_arg(sock)?, cap)?;
        let h = vfiokit_iommu::into_c(context);
        // SAFETY: the handle just made, live.
        let held = unsafe { self::iommu(h) }?;
        let handles = taken
            .into_iter()
            .map(|device| Ok(super::device::handle(device, held.hold()?)))
            .collect::<Result<Vec<_>>>()?;
        for (i, handle) in handles.iter().enumerate() {
            // SAFETY: checked non-null; the caller provides cap slots, and take-over refused
            // more devices than cap.
            unsafe { *devices.add(i) = *handle };
        }
        // SAFETY: checked non-null.
        unsafe { put(n, "n", handles.len()) }?;
        // SAFETY: checked non-null.
        unsafe { put(iommu, "iommu", h) }
    })
}

/// The caller's socket, borrowed for one call.
fn socket_arg(sock: c_int) -> Result<BorrowedFd<'static>> {
    if sock < 0 {
        return Err(Error::new(libc::EBADF, format!("socket {sock} is not a file descriptor")));
    }
    // SAFETY: the caller's fd, open for the duration of the call (a closed one fails in the
    // kernel with EBADF).
    Ok(unsafe { BorrowedFd::borrow_raw(sock) })
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
        let h = unsafe { self::iommu(iommu) }?;
        need_records(out, cap, n)?;
        // SAFETY: checked; the caller provides cap records.
        unsafe { put_records(&h.iova_ranges()?, out, cap, n) }
    })
}

/// Maps `len` bytes at `vaddr` for DMA at `iova` (all page-aligned). A no-IOMMU context has
/// no IOVAs to choose (`-ENOTSUP`): use `vfiokit_dma_map_any` or `vfiokit_dma_alloc`.
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
        unsafe { self::iommu(iommu)?.map(vaddr.cast(), len, iova) }
    })
}

/// Maps `len` bytes at `vaddr` at an IOVA the allocator picks inside the valid ranges. In a
/// no-IOMMU context: the memory's physical address, with the memory locked until unmapped
/// (`-EINVAL` unless physically contiguous: a page, or within a hugepage).
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
        let at = unsafe { self::iommu(iommu)?.map_any(vaddr.cast(), len) }?;
        // SAFETY: checked non-null.
        unsafe { put(iova, "iova", at) }
    })
}

/// Removes every mapping lying wholly in `[iova, iova+len)` (the one made at `iova` with
/// length `len`, or several), as the kernel's unmap does. Refused, with nothing unmapped, where
/// the range cuts through a mapping (`-EINVAL` on type1 kinds, `-ENOENT` on iommufd ones),
/// holds none (`-ENOENT`) or holds a DMA buffer's mapping (`-EBUSY`).
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
    call(|| unsafe { self::iommu(iommu) }?.unmap(iova, len).map(drop))
}

/// `vfiokit_dma_unmap`, and `*unmapped` (if not NULL) gets the number of bytes unmapped.
///
/// # Safety
/// `iommu` must be NULL or a live context; `unmapped` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_unmap_range(
    iommu: *mut vfiokit_iommu,
    iova: u64,
    len: usize,
    unmapped: *mut u64,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let bytes = unsafe { self::iommu(iommu) }?.unmap(iova, len)?;
        put_if_asked(unmapped, bytes)
    })
}

/// Removes every mapping made by `vfiokit_dma_map*` and `vfiokit_dma_map_any*` (buffers from
/// `vfiokit_dma_alloc*` stay mapped until freed); `*unmapped` (if not NULL) gets the number of
/// bytes unmapped. On failure some mappings may be gone: `*unmapped` is then not written.
///
/// # Safety
/// `iommu` must be NULL or a live context; `unmapped` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_unmap_all(
    iommu: *mut vfiokit_iommu,
    unmapped: *mut u64,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let bytes = unsafe { self::iommu(iommu) }?.unmap_all()?;
        put_if_asked(unmapped, bytes)
    })
}

/// Writes a byte count to `unmapped` unless it is NULL (the count is optional).
fn put_if_asked(unmapped: *mut u64, bytes: u64) -> Result<()> {
    if !unmapped.is_null() {
        // SAFETY: checked non-null; valid for a write per the callers' contracts.
        unsafe { put(unmapped, "unmapped", bytes) }?;
    }
    Ok(())
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
    // SAFETY: forwarded from the caller.
    call(|| unsafe { allocated(vaddr, iova, || self::iommu(iommu)?.alloc(len)) })
}

/// Unmaps and frees a buffer from `vfiokit_dma_alloc`.
///
/// # Safety
/// Nothing may use the buffer afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_free(iommu: *mut vfiokit_iommu, vaddr: *mut c_void) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::iommu(iommu) }?.free(vaddr.cast()))
}

/// `vfiokit_dma_map` with `VFIOKIT_DMA_*` flags: `VFIOKIT_DMA_READONLY` makes the mapping
/// readable only by the device. 0 is `vfiokit_dma_map`.
///
/// # Safety
/// As for `vfiokit_dma_map`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_map_flags(
    iommu: *mut vfiokit_iommu,
    vaddr: *mut c_void,
    len: usize,
    iova: u64,
    flags: u32,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller (pointer validity and memory lifetime).
        unsafe { self::iommu(iommu)?.map_flags(vaddr.cast(), len, iova, flags) }
    })
}

/// `vfiokit_dma_map_any` with `VFIOKIT_DMA_*` flags (as for `vfiokit_dma_map_flags`).
///
/// # Safety
/// As for `vfiokit_dma_map`; `iova` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_map_any_flags(
    iommu: *mut vfiokit_iommu,
    vaddr: *mut c_void,
    len: usize,
    flags: u32,
    iova: *mut u64,
) -> c_int {
    call(|| {
        need(iova, "iova")?;
        // SAFETY: forwarded from the caller.
        let at = unsafe { self::iommu(iommu)?.map_any_flags(vaddr.cast(), len, flags) }?;
        // SAFETY: checked non-null.
        unsafe { put(iova, "iova", at) }
    })
}

/// `vfiokit_dma_alloc` with `VFIOKIT_DMA_*` flags: `VFIOKIT_DMA_READONLY` (the device may
/// only read it), `VFIOKIT_DMA_HUGE_2M` or `VFIOKIT_DMA_HUGE_1G` (hugetlb pages: the length
/// is rounded up to the huge page and the IOVA aligned to it; `-ENOMEM` names the sysfs knob
/// and how many pages are missing). 0 is `vfiokit_dma_alloc`.
///
/// # Safety
/// `vaddr` and `iova` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_alloc_flags(
    iommu: *mut vfiokit_iommu,
    len: usize,
    flags: u32,
    vaddr: *mut *mut c_void,
    iova: *mut u64,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { allocated(vaddr, iova, || self::iommu(iommu)?.alloc_flags(len, flags)) })
}

/// Maps `len` bytes of the file `fd` from `offset` (both whole pages; a memfd, a file on
/// hugetlbfs) into this process, shared, and for DMA; `*vaddr` and `*iova` say where.
/// `vfiokit_dma_free(iommu, *vaddr)` releases both; the file stays the caller's (the context
/// keeps its own duplicate of `fd`) and is never poisoned. On iommufd the kernel maps the
/// file's pages (IOMMU_IOAS_MAP_FILE), not the process's address range; a kernel without it
/// (before 6.13) is `-EOPNOTSUPP`. `flags`: `VFIOKIT_DMA_READONLY` (the device only reads; the
/// file may be open read-only). A negative `fd` is `-EBADF`.
///
/// # Safety
/// `vaddr` and `iova` must be valid for writes; `fd`, when not negative, an open fd.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_map_file(
    iommu: *mut vfiokit_iommu,
    fd: c_int,
    offset: u64,
    len: usize,
    flags: u32,
    vaddr: *mut *mut c_void,
    iova: *mut u64,
) -> c_int {
    call(|| {
        if fd < 0 {
            return Err(Error::new(libc::EBADF, format!("fd {fd} is not a file to map")));
        }
        // SAFETY: the caller's open fd, borrowed for the call (the context dups it).
        let file = unsafe { BorrowedFd::borrow_raw(fd) };
        // SAFETY: forwarded from the caller.
        unsafe { allocated(vaddr, iova, || self::iommu(iommu)?.map_file(file, offset, len, flags)) }
    })
}

/// Guard mode on (`on` non-zero) or off for later allocations: each IOVA range that
/// `vfiokit_dma_alloc*` and `vfiokit_dma_map_any*` hand out is followed by an unmapped page, so
/// a device DMA running past the end of a buffer is stopped by the IOMMU, and freed buffers
/// are poisoned (0x6b). `VFIOKIT_DMA_GUARD=1` in the environment turns it on for every context.
///
/// # Safety
/// `iommu` must be NULL or a live context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_iommu_set_dma_guard(
    iommu: *mut vfiokit_iommu,
    on: c_int,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        unsafe { self::iommu(iommu) }?.set_dma_guard(on != 0);
        Ok(())
    })
}

/// The IOVA of `vaddr`: `[vaddr, vaddr+len)` must lie wholly inside one mapping made by
/// `vfiokit_dma_map*`, `vfiokit_dma_map_any*` or `vfiokit_dma_alloc*` (`len` 0 counts as 1);
/// `-ENOENT` otherwise. O(log n) in the number of mappings: for building PRP/SGL lists.
///
/// # Safety
/// `iommu` must be NULL or a live context; `iova` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_translate(
    iommu: *mut vfiokit_iommu,
    vaddr: *const c_void,
    len: usize,
    iova: *mut u64,
) -> c_int {
    call(|| {
        need(iova, "iova")?;
        // SAFETY: forwarded from the caller.
        let at = unsafe { self::iommu(iommu) }?.translate(vaddr.cast(), len)?;
        // SAFETY: checked non-null.
        unsafe { put(iova, "iova", at) }
    })
}

/// The address behind `[iova, iova+len)`, which must lie wholly inside one DMA mapping of the
/// context (`len` 0 counts as 1): what a completion entry's IOVA stands for. `-ENOENT`
/// otherwise. O(log n) in the number of mappings.
///
/// # Safety
/// `iommu` must be NULL or a live context; `vaddr` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_to_vaddr(
    iommu: *mut vfiokit_iommu,
    iova: u64,
    len: usize,
    vaddr: *mut *mut c_void,
) -> c_int {
    call(|| {
        need(vaddr, "vaddr")?;
        // SAFETY: forwarded from the caller.
        let at = unsafe { self::iommu(iommu) }?.dma_to_vaddr(iova, len)?;
        // SAFETY: checked non-null.
        unsafe { put(vaddr, "vaddr", at.as_ptr().cast()) }
    })
}

/// A zeroed object of `size` bytes (1 byte to 2 MiB) aligned to `align` (a power of two up to
/// 2 MiB; 0 is 1) from the context's DMA heap: its address and IOVA. For the small DMA objects
/// a driver allocates by the thousand (queue entries, PRP/SGL lists, descriptors): they are
/// carved from 2 MiB arenas mapped once (hugepages where reserved), with no system call and
/// no lock on the usual path, and an object never spans a discontiguity the device would see.
/// `vfiokit_dma_translate` and `vfiokit_dma_to_vaddr` work on it. Safe from many threads.
/// `-ENOMEM` on a no-IOMMU context for an object over 4 KiB without a free 2 MiB hugepage.
///
/// # Safety
/// `vaddr` and `iova` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_heap_alloc(
    iommu: *mut vfiokit_iommu,
    size: usize,
    align: usize,
    vaddr: *mut *mut c_void,
    iova: *mut u64,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe {
        allocated(vaddr, iova, || self::iommu(iommu)?.heap_alloc(size, align.max(1)))
    })
}

/// Frees an object from `vfiokit_dma_heap_alloc`; `-EINVAL` for any other address (inside an
/// object, of another context, freed already). In guard mode the object is poisoned (0x6b).
/// Objects still allocated go when the context closes.
///
/// # Safety
/// Nothing may use the object afterwards, the device included.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_heap_free(
    iommu: *mut vfiokit_iommu,
    vaddr: *mut c_void,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::iommu(iommu) }?.heap_free(vaddr.cast()))
}

/// What the context's DMA heap holds: its arenas (and how many are 2 MiB hugepages) and the
/// bytes given to objects. All zero before the first allocation.
///
/// # Safety
/// `out` must be valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_dma_heap_get_info(
    iommu: *const vfiokit_iommu,
    out: *mut crate::HeapInfo,
) -> c_int {
    call(|| {
        need(out, "out")?;
        // SAFETY: forwarded from the caller.
        let info = unsafe { self::iommu(iommu) }?.heap_info();
        // SAFETY: checked non-null.
        unsafe { put(out, "out", info) }
    })
}
