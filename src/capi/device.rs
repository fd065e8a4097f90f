//! C exports for devices: records, regions, accessors, config space, IRQs.

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

use super::boundary::{call, call_or, need, need_records, null, put, put_records, str_arg};
use super::handle::{Call, FreeSlots, Handle, Hold};
use super::iommu::vfiokit_iommu;
use crate::device::{Device, HotResetDep, MapInfo, Width};
use crate::error::{Error, Result};
use crate::sriov::VfToken;

/// An open VFIO device (opaque).
pub struct vfiokit_device {
    _private: [u8; 0],
}

/// What a device handle carries: the device, and a hold on the handle of its context (the
/// one it was opened in, or the one made for it), which keeps that handle open while the
/// device is and is what `vfiokit_device_iommu` returns. Dropped in this order: the device
/// first, then the context's handle.
pub(super) struct Opened {
    device: Device,
    context: Hold<vfiokit_iommu>,
}

impl std::ops::Deref for Opened {
    type Target = Device;
    fn deref(&self) -> &Device {
        &self.device
    }
}

/// A device handle is its owner's alone (nothing holds it): its close ends the IRQ waits on
/// it, waits for the other calls in flight to return, and releases the device (its fds,
/// mappings and eventfds, the kernel's reset included) before it returns.
impl Handle for vfiokit_device {
    type Value = Opened;
    const MAGIC: u64 = u64::from_be_bytes(*b"vfkDEVIC");
    const NAME: &'static str = "dev";
    const TYPE: &'static str = "vfiokit_device";
    const CLOSE_WAITS: bool = true;
    fn closing(value: &Opened) {
        value.device.cancel_waits();
    }
    fn free_slots() -> &'static FreeSlots<Self> {
        static FREE: FreeSlots<vfiokit_device> = Mutex::new(Vec::new());
        &FREE
    }
}

/// The device behind `dev`, held for the duration of one call.
///
/// # Safety
/// As for [`Handle::enter`].
pub(super) unsafe fn dev(dev: *const vfiokit_device) -> Result<Call<vfiokit_device>> {
    // SAFETY: forwarded from the caller.
    unsafe { vfiokit_device::enter(dev) }
}

/// A new handle for `device`, which is in the context `context` holds.
pub(super) fn handle(device: Device, context: Hold<vfiokit_iommu>) -> *mut vfiokit_device {
    vfiokit_device::into_c(Opened { device, context })
}

/// Opens a device by PCI address ("0000:00:02.0", "00:02.0") or sysfs path, in `iommu`
/// (NULL: the process-wide shared context); or a device served by another process as
/// "vfio-user:<socket path>", in a `VFIOKIT_IOMMU_VFIO_USER` context (NULL: a new one).
///
/// # Safety
/// `name` must be NULL or a NUL-terminated string; `iommu` NULL or live; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_open(
    name: *const c_char,
    iommu: *mut vfiokit_iommu,
    out: *mut *mut vfiokit_device,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { open_with(name, None, iommu, out) })
}

/// [`vfiokit_device_open`], with the VF token the PF's user set, if any.
///
/// # Safety
/// As for [`vfiokit_device_open`].
unsafe fn open_with(
    name: *const c_char,
    token: Option<&VfToken>,
    iommu: *mut vfiokit_iommu,
    out: *mut *mut vfiokit_device,
) -> Result<()> {
    need(out, "out")?;
    // SAFETY: forwarded from the caller.
    let name = unsafe { str_arg(name, "name") }?;
    let open = |iommu: Option<&crate::Iommu>| match token {
        Some(t) => Device::open_vf(name, iommu, t),
        None => Device::open(name, iommu),
    };
    // With no context, the device's name is checked before the shared context is made,
    // so a bad name is reported as such even where VFIO is missing.
    let opened = match iommu.is_null() {
        true => {
            let device = open(None)?;
            Opened { context: super::iommu::made_for(device.iommu()), device }
        }
        false => {
            // SAFETY: forwarded from the caller.
            let iommu = unsafe { super::iommu::iommu(iommu) }?;
            let context = iommu.hold()?;
            Opened { device: open(Some(&iommu))?, context }
        }
    };
    let h = vfiokit_device::into_c(opened);
    // SAFETY: checked non-null.
    unsafe { put(out, "out", h) }
}

/// A VF token argument: a UUID string ("bd8d9d2b-5a5f-4f5a-a211-f591514ba1f3"); `-EINVAL`
/// for NULL or anything else.
///
/// # Safety
/// `token` must be NULL or a NUL-terminated string.
unsafe fn token_arg(token: *const c_char) -> Result<VfToken> {
    // SAFETY: forwarded from the caller.
    let text = unsafe { str_arg(token, "vf_token") }?;
    text.parse().map_err(Error::invalid)
}

/// Opens an SR-IOV VF whose PF is bound to vfio-pci (or such a PF while its VFs are in use)
/// with `vf_token`, the UUID string its PF's user set with `vfiokit_device_set_vf_token`: in
/// the group's device name on type1, with VFIO_DEVICE_BIND_FLAG_TOKEN on the cdev (Linux
/// 6.17+; `-EOPNOTSUPP` naming 6.17 before). The kernel's `-EACCES` for a wrong token, with a
/// message naming the PF; `-EINVAL` for a string that is not a UUID. Otherwise as
/// `vfiokit_device_open`.
///
/// # Safety
/// `name` and `vf_token` NULL or NUL-terminated strings; `iommu` NULL or live; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_open_vf(
    name: *const c_char,
    vf_token: *const c_char,
    iommu: *mut vfiokit_iommu,
    out: *mut *mut vfiokit_device,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let token = unsafe { token_arg(vf_token) }?;
        // SAFETY: forwarded from the caller.
        unsafe { open_with(name, Some(&token), iommu, out) }
    })
}

/// Sets the VF token of the SR-IOV PF `dev` (VFIO_DEVICE_FEATURE_PCI_VF_TOKEN) to the UUID
/// string `vf_token`: its VFs then open only with it (`vfiokit_device_open_vf`). `-ENOTSUP`
/// for a device that is not a PF, `-EINVAL` for a string that is not a UUID.
///
/// # Safety
/// `dev` NULL or live; `vf_token` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_set_vf_token(
    dev: *mut vfiokit_device,
    vf_token: *const c_char,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let dev = unsafe { self::dev(dev) }?;
        // SAFETY: forwarded from the caller.
        let token = unsafe { token_arg(vf_token) }?;
        dev.set_vf_token(&token)
    })
}

/// Closes a device: ends every `vfiokit_irq_wait` on it (they return `-ECANCELED`), waits for
/// the calls other threads are making on it to return, then disables its IRQs, unmaps its
/// regions and closes its fds. NULL is fine; closing a handle twice is refused with `EBADF`;
/// a call that starts after close gets `-EBADF`.
///
/// # Safety
/// `dev` must be NULL or from `vfiokit_device_open`; nothing may use it or its records,
/// mappings or eventfds after the calls in flight have returned.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_close(dev: *mut vfiokit_device) {
    // SAFETY: forwarded from the caller.
    unsafe { vfiokit_device::close(dev) }
}

/// 1 when the device is gone, 0 while it is not (`-EINVAL` for NULL): gone once one of its
/// mapped BARs faulted with SIGBUS (vfio-pci zapped it: the device was removed, reset, or its
/// memory decode disabled) and vfiokit's SIGBUS guard replaced its mappings with memory that
/// reads all-ones, or once `vfiokit_device_retire` was called. A gone device's calls return
/// `-ENODEV` with a message; close it to release its fds and DMA mappings.
///
/// # Safety
/// `dev` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_gone(dev: *const vfiokit_device) -> c_int {
    // SAFETY: forwarded from the caller.
    call_or(|e| -e.errno(), || Ok(unsafe { self::dev(dev) }?.gone() as c_int))
}

/// Gives the device up while other threads may still be accessing its mappings (after
/// `VFIOKIT_IRQ_REQ`, vfio-pci asking for it back): its mapped regions become memory that
/// reads all-ones (what PCIe returns for a vanished device) so those threads keep running,
/// `vfiokit_irq_wait`s end with `-ECANCELED`, and later calls return `-ENODEV`. Then stop
/// those threads and `vfiokit_device_close` it.
///
/// # Safety
/// `dev` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_retire(dev: *mut vfiokit_device) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.retire())
}

/// The device's DMA context (borrowed: valid while the device is open; do not close it).
/// Devices opened in the same context give the same pointer.
///
/// # Safety
/// `dev` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_iommu(dev: *const vfiokit_device) -> *mut vfiokit_iommu {
    call_or(
        |_| std::ptr::null_mut(),
        // SAFETY: forwarded from the caller.
        || Ok(unsafe { self::dev(dev) }?.context.as_c()),
    )
}

/// Copies the device's info record (VFIO's flags and counts, the PCI identity read at open)
/// to `*info`.
///
/// # Safety
/// `dev` must be NULL or live; `info` NULL or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_get_info(
    dev: *const vfiokit_device,
    info: *mut crate::DeviceInfo,
) -> c_int {
    call(|| {
        need(info, "info")?;
        // SAFETY: forwarded from the caller.
        let record = *unsafe { self::dev(dev) }?.info();
        // SAFETY: checked non-null.
        unsafe { put(info, "info", record) }
    })
}

/// The VFIO device fd, for ioctls vfiokit does not wrap, or a negative errno. Borrowed: valid
/// until the device is closed; do not close it.
///
/// # Safety
/// `dev` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_fd(dev: *const vfiokit_device) -> c_int {
    // SAFETY: forwarded from the caller.
    call_or(|e| -e.errno(), || Ok(unsafe { self::dev(dev) }?.fd()?.as_raw_fd()))
}

/// VFIO_DEVICE_FEATURE: `feature` is the kernel's `VFIO_DEVICE_FEATURE_*` index, `flags` one or
/// more of `VFIOKIT_FEATURE_GET`, `_SET` and `_PROBE`, and `data` the feature's payload of `len`
/// bytes (read by SET, written by GET; NULL when `len` is 0). Returns the ioctl's value (0, or a
/// fd for features that hand one out) or a negative errno.
///
/// # Safety
/// `dev` must be NULL or live; `data` NULL or valid for reads and writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_feature(
    dev: *mut vfiokit_device,
    feature: u32,
    flags: u32,
    data: *mut c_void,
    len: usize,
) -> c_int {
    call_or(
        |e| -e.errno(),
        || {
            // SAFETY: forwarded from the caller.
            let payload = unsafe { bytes_mut(data, len) }?;
            // SAFETY: forwarded from the caller.
            unsafe { self::dev(dev) }?.feature(feature, flags, payload)
        },
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

/// The devices a hot (bus or slot) reset of `dev` resets too, itself included: copies up to
/// `cap` `vfiokit_hot_reset_dep` records (address, group, iommufd devid, whether open in this
/// context) to `out` and sets `*n` to how many there are (which may exceed `cap`; `out` may be
/// NULL when `cap` is 0). `-ENOTSUP` where the kernel has no bus or slot reset for it.
///
/// # Safety
/// `dev` NULL or live; `out` valid for `cap` records; `n` for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_hot_reset_info(
    dev: *mut vfiokit_device,
    out: *mut HotResetDep,
    cap: usize,
    n: *mut usize,
) -> c_int {
    call(|| {
        // SAFETY: forwarded from the caller.
        let dev = unsafe { self::dev(dev) }?;
        need_records(out, cap, n)?;
        // SAFETY: checked; the caller provides cap records.
        unsafe { put_records(&dev.hot_reset_info()?, out, cap, n) }
    })
}

/// Resets `dev` and every device `vfiokit_device_hot_reset_info` lists with it (a bus or slot
/// reset, for devices without a function-level reset or to reset a slot together). Every one
/// must be open in `dev`'s context: `-EPERM` naming those that are not.
///
/// # Safety
/// `dev` must be NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_device_hot_reset(dev: *mut vfiokit_device) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.hot_reset())
}

/// Returns a record array owned by the device (NULL on error) and its length in `*n`.
///
/// # Safety
/// `dev` must be NULL or live; `n` NULL or writable.
unsafe fn records<T>(
    dev: *const vfiokit_device,
    n: *mut usize,
    get: impl FnOnce(&Device) -> &[T],
) -> *const T {
    call_or(
        |_| std::ptr::null(),
        || {
            need(n, "n")?;
            // SAFETY: forwarded from the caller.
            let handle = unsafe { self::dev(dev) }?;
            // The records live as long as the handle: the caller's reference outlives this call.
            let records = get(&handle);
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
    // SAFETY: forwarded from the caller.
    unsafe { records(dev, n, Device::regions) }
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
    // SAFETY: forwarded from the caller.
    unsafe { records(dev, n, Device::areas) }
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
    // SAFETY: forwarded from the caller.
    unsafe { records(dev, n, Device::irqs) }
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

/// Maps a region as `vfiokit_region_map` does and describes the mapping: its address and
/// length, and which register accesses `vfiokit_readN`/`vfiokit_writeN` make straight through it
/// (those inside `[0, direct)` that `access` permits), so a caller can do the same.
///
/// # Safety
/// `dev` must be NULL or live; `info` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_region_map_info(
    dev: *mut vfiokit_device,
    region: u32,
    info: *mut MapInfo,
) -> c_int {
    call(|| {
        need(info, "info")?;
        // SAFETY: forwarded from the caller.
        let record = unsafe { self::dev(dev) }?.map_info(region)?;
        // SAFETY: checked non-null.
        unsafe { put(info, "info", record) }
    })
}

/// The address of the `width`-byte register (1, 2, 4 or 8) at `off` of a region, checked once:
/// aligned, inside the region, in an mmappable area (`-ENOTSUP` elsewhere, where
/// `vfiokit_readN`/`vfiokit_writeN` go through the device fd), in a region that may be read and
/// written (`-EACCES`). Maps the region. Access it
/// with `vfiokit_mmio_readN(addr, 0)` and `vfiokit_mmio_writeN(addr, 0, val)`: one access each,
/// nothing left to check, for the loops that poll or feed a register. Valid until the device
/// is closed.
///
/// # Safety
/// `dev` must be NULL or live; `addr` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_register(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    width: u32,
    addr: *mut *mut c_void,
) -> c_int {
    call(|| {
        need(addr, "addr")?;
        // SAFETY: forwarded from the caller.
        let d = unsafe { self::dev(dev) }?;
        let at: *mut c_void = match width {
            1 => d.register::<u8>(region, off)?.as_ptr().cast(),
            2 => d.register::<u16>(region, off)?.as_ptr().cast(),
            4 => d.register::<u32>(region, off)?.as_ptr().cast(),
            8 => d.register::<u64>(region, off)?.as_ptr().cast(),
            _ => return Err(Error::invalid(format!("register width {width}: 1, 2, 4 or 8"))),
        };
        // SAFETY: checked non-null.
        unsafe { put(addr, "addr", at) }
    })
}

/// The caller's buffer for a write to the device.
///
/// # Safety
/// `buf` must be NULL or valid for reads of `len` bytes, for `'a`.
unsafe fn bytes<'a>(buf: *const c_void, len: usize) -> Result<&'a [u8]> {
    match (buf.is_null(), len) {
        (_, 0) => Ok(&[]),
        (true, _) => Err(null("buf")),
        // SAFETY: upheld by the caller.
        (false, _) => Ok(unsafe { std::slice::from_raw_parts(buf.cast(), len) }),
    }
}

/// The caller's buffer for a read from the device.
///
/// # Safety
/// `buf` must be NULL or valid for writes of `len` bytes, for `'a`, and not otherwise
/// referenced meanwhile.
unsafe fn bytes_mut<'a>(buf: *mut c_void, len: usize) -> Result<&'a mut [u8]> {
    match (buf.is_null(), len) {
        (_, 0) => Ok(&mut []),
        (true, _) => Err(null("buf")),
        // SAFETY: upheld by the caller.
        (false, _) => Ok(unsafe { std::slice::from_raw_parts_mut(buf.cast(), len) }),
    }
}

/// Reads `len` bytes at `off` of a region into `buf`. 1, 2, 4 or 8 bytes at an offset aligned
/// to that size are one access of that width; longer transfers use unspecified widths.
///
/// # Safety
/// `dev` NULL or live; `buf` valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_region_read(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    buf: *mut c_void,
    len: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| unsafe { self::dev(dev) }?.read(region, off, unsafe { bytes_mut(buf, len) }?))
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

/// # Safety
/// `dev` NULL or live; `val` NULL or writable.
unsafe fn read_reg<T: Width>(
    dev: *mut vfiokit_device,
    region: u32,
    off: u64,
    val: *mut T,
) -> c_int {
    call(|| {
        need(val, "val")?;
        // SAFETY: forwarded from the caller.
        let v = unsafe { self::dev(dev) }?.read_reg::<T>(region, off)?;
        // SAFETY: checked non-null; the caller provides a writable slot.
        unsafe { put(val, "val", v) }
    })
}

/// # Safety
/// `dev` NULL or live.
unsafe fn write_reg<T: Width>(dev: *mut vfiokit_device, region: u32, off: u64, val: T) -> c_int {
    // SAFETY: forwarded from the caller.
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
    // SAFETY: forwarded from the caller.
    unsafe { read_reg(dev, region, off, val) }
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
    // SAFETY: forwarded from the caller.
    unsafe { write_reg(dev, region, off, val) }
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
    // SAFETY: forwarded from the caller.
    unsafe { read_reg(dev, region, off, val) }
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
    // SAFETY: forwarded from the caller.
    unsafe { write_reg(dev, region, off, val) }
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
    // SAFETY: forwarded from the caller.
    unsafe { read_reg(dev, region, off, val) }
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
    // SAFETY: forwarded from the caller.
    unsafe { write_reg(dev, region, off, val) }
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
    // SAFETY: forwarded from the caller.
    unsafe { read_reg(dev, region, off, val) }
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
    // SAFETY: forwarded from the caller.
    unsafe { write_reg(dev, region, off, val) }
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
/// Each is a duplicate of one the device keeps until close: take it out of an epoll set
/// before disabling, or epoll keeps watching it.
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

/// `vfiokit_irq_enable` with the caller's eventfds, `eventfds[i]` for vector `first + i`.
/// They stay the caller's: the device signals duplicates, disable and close leave the
/// caller's fds open, and `vfiokit_irq_wait` refuses these vectors (read your own fds).
///
/// # Safety
/// `dev` NULL or live; `eventfds` valid for reading `count` ints.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_irq_enable_fds(
    dev: *mut vfiokit_device,
    irq: u32,
    first: u32,
    count: u32,
    eventfds: *const c_int,
) -> c_int {
    call(|| {
        // The handle first: a NULL or closed device must not make us read the caller's array.
        // SAFETY: forwarded from the caller.
        let dev = unsafe { self::dev(dev) }?;
        need(eventfds.cast_mut(), "eventfds")?;
        // SAFETY: the caller provides count ints.
        let raw = unsafe { std::slice::from_raw_parts(eventfds, count as usize) };
        if let Some(bad) = raw.iter().find(|&&fd| fd < 0) {
            return Err(Error::invalid(format!("eventfd {bad} is not a file descriptor")));
        }
        // SAFETY: the caller's fds, open for the duration of the call; the device keeps
        // duplicates, never these.
        let fds: Vec<_> = raw.iter().map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) }).collect();
        dev.irq_enable_fds(irq, first, &fds)
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
