//! The C ABI: a thin translation of the Rust API. Every export checks its pointers, catches
//! panics, and reports failure as a negative errno plus a thread-local message.
//!
//! Conventions (also in docs/c-api.md): fallible calls return 0 or `-errno`; out-parameters are
//! written only on success; `_close(NULL)` does nothing; handles may be shared by threads.
//!
//! Two files hold what every export shares: `boundary` (the panic boundary, the last error,
//! pointer arguments and out-parameters) and `handle` (the one scheme behind every handle
//! kind: checks, calls in flight, close).

// The C names are the contract; Rust's naming style does not apply to them.
#![allow(non_camel_case_types)]

mod boundary;
mod device;
mod handle;
mod iommu;

use std::ffi::{CStr, c_char, c_int};

use boundary::{call, need_records, put_records, str_arg};

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

/// Enables `num_vfs` VFs of the SR-IOV PF `pf` (0 disables them) through its sysfs
/// `sriov_numvfs` (needs root; a PF bound to vfio-pci needs it loaded with `enable_sriov=1`),
/// then copies up to `cap` of the VFs' addresses (`vfiokit_vf` records, in VF order) to `out`
/// and sets `*n` to how many there are (`out` may be NULL when `cap` is 0). `-ENOTSUP` for a
/// device that is not a PF, `-EINVAL` for more VFs than it has.
///
/// # Safety
/// `pf` NULL or a NUL-terminated string; `out` valid for `cap` records; `n` for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfiokit_pci_sriov_set_numvfs(
    pf: *const c_char,
    num_vfs: u32,
    out: *mut crate::sriov::Vf,
    cap: usize,
    n: *mut usize,
) -> c_int {
    call(|| {
        need_records(out, cap, n)?;
        // SAFETY: forwarded from the caller.
        let pf = unsafe { str_arg(pf, "pf") }?;
        let vfs = crate::sriov::records(&crate::sriov_set_numvfs(pf, num_vfs)?);
        // SAFETY: checked; the caller provides cap records.
        unsafe { put_records(&vfs, out, cap, n) }
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
