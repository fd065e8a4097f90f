//! The C ABI: a thin translation of the Rust API. Every export checks its pointers, catches
//! panics, and reports failure as a negative errno plus a thread-local message.
//!
//! Conventions (also in README.md): fallible calls return 0 or `-errno`; out-parameters are
//! written only on success; `_close(NULL)` does nothing; handles may be shared by threads.

// The C names are the contract; Rust's naming style does not apply to them.
#![allow(non_camel_case_types)]

mod boundary;
mod device;
mod iommu;

use std::collections::BTreeSet;
use std::ffi::{CStr, c_char, c_int};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use boundary::{call, call_or, need_records, null, put_records, str_arg};

/// Handles handed out by `_open` and not closed yet. Only open and close consult it, so a
/// double close is refused without touching freed memory; other calls check the magic word.
static OPEN_HANDLES: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

fn open_handles() -> std::sync::MutexGuard<'static, BTreeSet<usize>> {
    OPEN_HANDLES.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a C handle type stands for a Rust value, as rustls-ffi's `Castable` with
/// `OwnershipArc`: the pointer C holds is `Arc::into_raw` of an `Arc<Self::Target>`, and each
/// call takes a reference of its own for its duration. So a close by another thread drops
/// only the caller's reference: the value (its memory, fds and mappings) goes when the last
/// call in flight returns. A call that starts after close returns is refused with EBADF where
/// the handle's memory still says it is closed (its magic word), as a best effort.
trait ArcHandle: Sized {
    type Target;
    /// The parameter name in messages ("dev", "iommu").
    const NAME: &'static str;
    /// The C type's name, for the close message.
    const TYPE: &'static str;

    /// Whether the pointee is an open handle of this kind.
    fn is_open(target: &Self::Target) -> bool;

    /// A new reference to the value behind `p`, for the duration of one call.
    ///
    /// # Safety
    /// `p` must be NULL, or a pointer from [`ArcHandle::into_c`] or [`ArcHandle::borrow_c`]
    /// whose value is alive (its handle not closed by the time this call started).
    unsafe fn retain(p: *const Self) -> Result<Arc<Self::Target>> {
        let target = p.cast::<Self::Target>();
        // SAFETY: upheld by the caller: NULL or a live Arc's pointee.
        let live = unsafe { target.as_ref() }.ok_or_else(|| null(Self::NAME))?;
        if !Self::is_open(live) {
            return Err(Error::new(
                libc::EBADF,
                format!("{} {p:p} is not open (closed already?)", Self::NAME),
            ));
        }
        // SAFETY: target came from Arc::into_raw or Arc::as_ptr of a live Arc; the new strong
        // reference is balanced by the Arc returned here.
        unsafe {
            Arc::increment_strong_count(target);
            Ok(Arc::from_raw(target))
        }
    }

    /// Hands C the caller's reference to `value`, recorded as open.
    fn into_c(value: Arc<Self::Target>) -> *mut Self {
        let p = Arc::into_raw(value);
        open_handles().insert(p as usize);
        p.cast_mut().cast()
    }

    /// A pointer to `value` that C borrows (not recorded as open: it is not the caller's to
    /// close).
    fn borrow_c(value: &Arc<Self::Target>) -> *mut Self {
        Arc::as_ptr(value).cast_mut().cast()
    }

    /// The body of every `_close`: NULL does nothing, a handle that is not open is refused
    /// (with a message), an open one has `closing` run on it and the caller's reference
    /// dropped.
    ///
    /// # Safety
    /// `p` must be NULL or a pointer from [`ArcHandle::into_c`].
    unsafe fn close(p: *mut Self, closing: impl FnOnce(&Self::Target)) {
        call_or(
            |_| (),
            || {
                if p.is_null() {
                    return Ok(());
                }
                if !open_handles().remove(&(p as usize)) {
                    return Err(Error::new(
                        libc::EBADF,
                        format!(
                            "{} {p:p} is not open: closed already, or not from {}_open",
                            Self::TYPE,
                            Self::TYPE
                        ),
                    ));
                }
                // SAFETY: recorded as open, so this is the caller's reference from into_c,
                // released exactly once (the registry entry is gone).
                let value = unsafe { Arc::from_raw(p.cast_const().cast::<Self::Target>()) };
                closing(&value);
                Ok(())
            },
        )
    }
}

/// The ABI version of the library: equals `VFIOKIT_ABI_VERSION` of the header it was built with.
#[unsafe(no_mangle)]
pub extern "C" fn vfiokit_abi_version() -> u32 {
    crate::ABI_VERSION
}

/// The library's version, e.g. "0.1.0". Static storage.
#[unsafe(no_mangle)]
pub extern "C" fn vfiokit_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => panic!("version has no interior NUL"),
        };
    VERSION.as_ptr()
}

/// This thread's last failure message, "" if none yet. Valid until this thread's next failing
/// call. Successful calls leave it unchanged.
#[unsafe(no_mangle)]
pub extern "C" fn vfiokit_last_error() -> *const c_char {
    boundary::last_error()
}

/// The set-up problems found for this machine and, unless `name` is NULL, for that device (PCI
/// address or sysfs path), most severe first: copies up to `cap` `vfiokit_finding` records to
/// `out` and sets `*n` to how many there are (which may exceed `cap`; `out` may be NULL when
/// `cap` is 0). Each says what is wrong and how to fix it; none of severity
/// `VFIOKIT_SEVERITY_BLOCKER` means nothing found stops an open. Changes nothing.
///
/// # Safety
/// `name` NULL or a NUL-terminated string; `out` valid for `cap` records; `n` for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_doctor(
    name: *const c_char,
    out: *mut crate::Finding,
    cap: usize,
    n: *mut usize,
) -> c_int {
    call(|| {
        need_records(out, cap, n)?;
        // SAFETY: forwarded from the caller.
        let name = if name.is_null() { None } else { Some(unsafe { str_arg(name, "name") }?) };
        // SAFETY: checked; the caller provides cap records.
        unsafe { put_records(&crate::doctor(name), out, cap, n) }
    })
}

/// Binds a PCI device to vfio-pci through driver_override (needs root).
///
/// # Safety
/// `pci_address` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_pci_bind(pci_address: *const c_char) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| crate::bind(unsafe { str_arg(pci_address, "pci_address") }?))
}

/// Unbinds a PCI device from vfio-pci and lets its native driver probe it (needs root);
/// `-EINVAL` for a device bound to another driver.
///
/// # Safety
/// `pci_address` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_pci_unbind(pci_address: *const c_char) -> c_int {
    // SAFETY: forwarded from the caller.
    call(|| crate::unbind(unsafe { str_arg(pci_address, "pci_address") }?))
}
