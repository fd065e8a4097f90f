//! C exports for devices: records, regions, accessors, config space, IRQs.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use super::iommu::vfiokit_iommu;
use super::{Handle, call, call_or, close, need, opened, put, str_arg};
use crate::device::{Device, Width};
use crate::error::{Error, Result};

/// An open VFIO device (opaque).
pub struct vfiokit_device {
    magic: u64,
    device: Device,
    iommu: Arc<vfiokit_iommu>,
}

impl Handle for vfiokit_device {
    const MAGIC: u64 = u64::from_be_bytes(*b"vfkDEVIC");
    const NAME: &'static str = "dev";
    fn magic(&self) -> u64 {
        self.magic
    }
}

impl Drop for vfiokit_device {
    fn drop(&mut self) {
        self.magic = 0;
    }
}

/// # Safety
/// `dev` must be NULL or point to memory at least as large as a handle.
unsafe fn dev<'a>(dev: *const vfiokit_device) -> Result<&'a Device> {
    // SAFETY: forwarded from the caller.
    Ok(&unsafe { vfiokit_device::from_ptr(dev) }?.device)
}

/// Opens a device by PCI address ("0000:00:02.0", "00:02.0") or sysfs path, in `iommu`
/// (NULL: the process-wide shared context).
///
/// # Safety
/// `name` must be NULL or a NUL-terminated string; `iommu` NULL or live; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_open(
    name: *const c_char,
    iommu: *mut vfiokit_iommu,
    out: *mut *mut vfiokit_device,
) -> c_int {
    call(|| {
        need(out, "out")?;
        // SAFETY: forwarded from the caller.
        let name = unsafe { str_arg(name, "name") }?;
        // With no context, the device's name is checked before the shared context is made,
        // so a bad name is reported as such even where VFIO is missing.
        let (device, iommu) = if iommu.is_null() {
            let device = Device::open(name, None)?;
            let shared = vfiokit_iommu::shared(device.iommu());
            (device, shared)
        } else {
            // SAFETY: forwarded from the caller.
            let iommu = unsafe { vfiokit_iommu::retain(iommu) }?;
            (Device::open(name, Some(&iommu.iommu))?, iommu)
        };
        let handle = Box::new(vfiokit_device { magic: vfiokit_device::MAGIC, device, iommu });
        // SAFETY: checked non-null.
        unsafe { put(out, "out", opened(Box::into_raw(handle)).cast_mut()) }
    })
}

/// Closes a device: disables its IRQs, unmaps its regions, closes its fds. NULL is fine.
///
/// Closing a handle twice is refused with `EBADF` (the message says so).
///
/// # Safety
/// `dev` must be NULL or from `vfiokit_device_open`; nothing may use it or its records,
/// mappings or eventfds afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_close(dev: *mut vfiokit_device) {
    // SAFETY: from Box::into_raw in vfiokit_device_open, and open until now.
    close(dev, "vfiokit_device", |p| drop(unsafe { Box::from_raw(p) }))
}

/// The device's DMA context (borrowed: valid while the device is open; do not close it).
///
/// # Safety
/// `dev` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_iommu(dev: *const vfiokit_device) -> *mut vfiokit_iommu {
    call_or(
        |_| std::ptr::null_mut(),
        // SAFETY: forwarded from the caller.
        || Ok(Arc::as_ptr(&unsafe { vfiokit_device::from_ptr(dev) }?.iommu).cast_mut()),
    )
}

/// Resets the device; `-ENOTSUP` if the kernel has no reset for it.
///
/// # Safety
/// `dev` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_reset(dev: *mut vfiokit_device) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.reset())
}

/// Returns a record array owned by the device (NULL on error) and its length in `*n`.
fn records<'a, T: 'a>(n: *mut usize, get: impl FnOnce() -> Result<&'a [T]>) -> *const T {
    call_or(
        |_| std::ptr::null(),
        || {
            need(n, "n")?;
            let records = get()?;
            // SAFETY: checked non-null.
            unsafe { put(n, "n", records.len()) }?;
            Ok(records.as_ptr())
        },
    )
}

/// The region records; record i describes region index i. Valid until close.
///
/// # Safety
/// `dev` must be NULL or live; `n` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_regions(
    dev: *const vfiokit_device,
    n: *mut usize,
) -> *const crate::Region {
    // SAFETY: forwarded from the caller; the records live as long as the handle.
    records(n, || Ok(unsafe { self::dev(dev) }?.regions()))
}

/// The mmap-area records (each region's slice is first_area..first_area+num_areas).
///
/// # Safety
/// `dev` must be NULL or live; `n` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_areas(
    dev: *const vfiokit_device,
    n: *mut usize,
) -> *const crate::Area {
    // SAFETY: forwarded from the caller; the records live as long as the handle.
    records(n, || Ok(unsafe { self::dev(dev) }?.areas()))
}

/// The IRQ records; record i describes irq index i. Valid until close.
///
/// # Safety
/// `dev` must be NULL or live; `n` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_irqs(
    dev: *const vfiokit_device,
    n: *mut usize,
) -> *const crate::Irq {
    // SAFETY: forwarded from the caller; the records live as long as the handle.
    records(n, || Ok(unsafe { self::dev(dev) }?.irqs()))
}

/// One contiguous mapping of a region (mmappable areas mapped, the rest inaccessible).
/// The same pointer on every call; unmapped at close.
///
/// # Safety
/// `dev` must be NULL or live; `ptr` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_region_map(
    dev: *mut vfiokit_device,
    region: u32,
    ptr: *mut *mut c_void,
) -> c_int {
    call(|| {
        need(ptr, "ptr")?;
        // SAFETY: forwarded from the caller.
        let base = unsafe { self::dev(dev) }?.map(region)?;
        // SAFETY: checked non-null.
        unsafe { put(ptr, "ptr", base.as_ptr().cast()) }
    })
}

/// # Safety
/// `buf` must be NULL or valid for `len` bytes.
unsafe fn bytes<'a>(buf: *const c_void, len: usize) -> Result<&'a [u8]> {
    match (buf.is_null(), len) {
        (_, 0) => Ok(&[]),
        (true, _) => Err(super::null("buf")),
        // SAFETY: upheld by the caller.
        (false, _) => Ok(unsafe { std::slice::from_raw_parts(buf.cast(), len) }),
    }
}

/// Reads `len` bytes at `off` of a region into `buf`. 1, 2, 4 or 8 bytes at an offset aligned
/// to that size are one access of that width; longer transfers use unspecified widths.
///
/// # Safety
/// `dev` NULL or live; `buf` valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_region_read(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    buf: *mut c_void,
    len: usize,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller; the slice is only written through.
        let out = unsafe { bytes(buf, len) }?;
        // SAFETY: as above: the caller gave us len writable bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(out.as_ptr().cast_mut(), out.len()) };
        // SAFETY: forwarded from the caller.
        unsafe { self::dev(dev) }?.read(region, off, out)
    })
}

/// Writes `len` bytes from `buf` at `off` of a region (access widths as for reads).
///
/// # Safety
/// `dev` NULL or live; `buf` valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_region_write(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    buf: *const c_void,
    len: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.write(region, off, unsafe { bytes(buf, len) }?))
}

fn read_reg<T: Width>(dev: *mut vfiokit_device, region: u32, off: u64, val: *mut T) -> c_int {
    call(|| {
        need(val, "val")?;
        // SAFETY: the exports forward their callers' guarantee that dev is NULL or live.
        let v = unsafe { self::dev(dev) }?.read_reg::<T>(region, off)?;
        // SAFETY: checked non-null; the caller provides a writable slot.
        unsafe { put(val, "val", v) }
    })
}

fn write_reg<T: Width>(dev: *mut vfiokit_device, region: u32, off: u64, val: T) -> c_int {
    // SAFETY: the exports forward their callers' guarantee that dev is NULL or live.
    call(|| unsafe { self::dev(dev) }?.write_reg(region, off, val))
}

// Spelled out rather than macro-generated: cbindgen reads source, not expansions.

/// One 8-bit read at `off` (aligned): through the mapping where the offset is mmappable,
/// through the device fd where it is not (I/O-port BARs, parts outside sparse areas).
///
/// # Safety
/// `dev` NULL or live; `val` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_read8(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: *mut u8,
) -> c_int {
    read_reg(dev, region, off, val)
}

/// One 8-bit write at `off` (aligned), through the mapping or the device fd as for reads.
///
/// # Safety
/// `dev` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_write8(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: u8,
) -> c_int {
    write_reg(dev, region, off, val)
}

/// One 16-bit read at `off` (aligned): through the mapping where the offset is mmappable,
/// through the device fd where it is not (I/O-port BARs, parts outside sparse areas).
///
/// # Safety
/// `dev` NULL or live; `val` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_read16(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: *mut u16,
) -> c_int {
    read_reg(dev, region, off, val)
}

/// One 16-bit write at `off` (aligned), through the mapping or the device fd as for reads.
///
/// # Safety
/// `dev` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_write16(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: u16,
) -> c_int {
    write_reg(dev, region, off, val)
}

/// One 32-bit read at `off` (aligned): through the mapping where the offset is mmappable,
/// through the device fd where it is not (I/O-port BARs, parts outside sparse areas).
///
/// # Safety
/// `dev` NULL or live; `val` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_read32(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: *mut u32,
) -> c_int {
    read_reg(dev, region, off, val)
}

/// One 32-bit write at `off` (aligned), through the mapping or the device fd as for reads.
///
/// # Safety
/// `dev` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_write32(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: u32,
) -> c_int {
    write_reg(dev, region, off, val)
}

/// One 64-bit read at `off` (aligned): through the mapping where the offset is mmappable,
/// through the device fd where it is not (I/O-port BARs, parts outside sparse areas).
///
/// # Safety
/// `dev` NULL or live; `val` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_read64(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: *mut u64,
) -> c_int {
    read_reg(dev, region, off, val)
}

/// One 64-bit write at `off` (aligned), through the mapping or the device fd as for reads.
///
/// # Safety
/// `dev` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_write64(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: u64,
) -> c_int {
    write_reg(dev, region, off, val)
}

/// The config-space offset of a capability: `cap_id < 0x100` standard, `id + 0x10000`
/// extended. `-ENOENT` if the device does not have it.
///
/// # Safety
/// `dev` NULL or live; `offset` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_pci_find_capability(
    dev: *mut vfiokit_device,
    cap_id: u32,
    offset: *mut u32,
) -> c_int {
    call(|| {
        need(offset, "offset")?;
        // SAFETY: forwarded from the caller.
        let d = unsafe { self::dev(dev) }?;
        let at = d.find_capability(cap_id)?.ok_or_else(|| {
            Error::new(libc::ENOENT, format!("{} has no PCI capability {cap_id:#x}", d.address()))
        })?;
        // SAFETY: checked non-null.
        unsafe { put(offset, "offset", at) }
    })
}

/// Enables vectors `first..first+count` of an IRQ index, each signalling its own eventfd;
/// the eventfds (owned by the device, closed by disable/close) are written to `eventfds`.
///
/// # Safety
/// `dev` NULL or live; `eventfds` valid for `count` ints.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_irq_enable(
    dev: *mut vfiokit_device,
    irq: u32,
    first: u32,
    count: u32,
    eventfds: *mut c_int,
) -> c_int {
    call(|| {
        need(eventfds, "eventfds")?;
        // SAFETY: forwarded from the caller.
        let fds = unsafe { self::dev(dev) }?.irq_enable(irq, first, count)?;
        // SAFETY: the caller provides count ints; fds has count entries.
        unsafe { std::ptr::copy_nonoverlapping(fds.as_ptr(), eventfds, fds.len()) };
        Ok(())
    })
}

/// Disables an IRQ index and closes its eventfds; `-EINVAL` if it is not enabled.
///
/// # Safety
/// `dev` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_irq_disable(dev: *mut vfiokit_device, irq: u32) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.irq_disable(irq))
}

/// Masks one vector (INTx is maskable; MSI/MSI-X are not, per vfio-pci).
///
/// # Safety
/// `dev` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_irq_mask(
    dev: *mut vfiokit_device,
    irq: u32,
    vector: u32,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.irq_mask(irq, vector))
}

/// Unmasks one vector (INTx is automasked when it fires: unmask it to get the next one).
///
/// # Safety
/// `dev` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_irq_unmask(
    dev: *mut vfiokit_device,
    irq: u32,
    vector: u32,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.irq_unmask(irq, vector))
}

/// Makes the kernel signal an enabled vector's eventfd (loopback test of the IRQ path).
///
/// # Safety
/// `dev` NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_irq_trigger(
    dev: *mut vfiokit_device,
    irq: u32,
    vector: u32,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.irq_trigger(irq, vector))
}

/// Waits for an enabled vector to fire; `*count` is how often it did since the last wait.
/// `timeout_ms < 0` waits forever; `-ETIMEDOUT` on timeout. Blocks no other call.
///
/// # Safety
/// `dev` NULL or live; `count` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_irq_wait(
    dev: *mut vfiokit_device,
    irq: u32,
    vector: u32,
    timeout_ms: c_int,
    count: *mut u64,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let n = unsafe { self::dev(dev) }?.irq_wait(irq, vector, timeout_ms)?;
        if !count.is_null() {
            // SAFETY: checked non-null.
            unsafe { count.write(n) };
        }
        Ok(())
    })
}
