//! The boundary every export goes through: the panic boundary ([`call`], [`call_or`]), this
//! thread's last error, and the checks and writes of pointer arguments and out-parameters.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::{Error, Result};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(e: &Error) {
    // Interior NULs cannot come from our messages, but never let one cost the message.
    let msg = CString::new(e.message().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = msg);
}

/// This thread's last failure message, "" if none yet: valid until its next failing call.
pub(super) fn last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

fn panic_error(payload: Box<dyn std::any::Any + Send>) -> Error {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    Error::new(libc::EIO, format!("internal error in vfiokit (a bug, please report it): {what}"))
}

/// Runs an export's body: `Ok` is 0, `Err` is `-errno` with the message recorded, a panic is
/// `-EIO` and never unwinds into C.
pub(super) fn call(body: impl FnOnce() -> Result<()>) -> c_int {
    call_or(|e| -e.errno(), || body().map(|()| 0))
}

/// Like [`call`] for exports that return a value: `fallback` turns a failure into one.
pub(super) fn call_or<T>(
    fallback: impl FnOnce(&Error) -> T,
    body: impl FnOnce() -> Result<T>,
) -> T {
    let err = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => return value,
        Ok(Err(e)) => e,
        Err(payload) => panic_error(payload),
    };
    set_last_error(&err);
    fallback(&err)
}

/// The error for a NULL pointer argument named `what`.
pub(super) fn null(what: &str) -> Error {
    Error::invalid(format!("{what} is NULL"))
}

/// Writes an out-parameter, which must be non-null.
///
/// # Safety
/// `out` must be NULL or valid for a write of `T`.
pub(super) unsafe fn put<T>(out: *mut T, what: &str, value: T) -> Result<()> {
    // SAFETY: upheld by the caller for non-null pointers.
    unsafe { out.as_mut() }.map(|slot| *slot = value).ok_or_else(|| null(what))
}

/// Checks the arguments of a call that returns a variable number of fixed-size records (`out`
/// may be NULL when `cap` is 0), before the work whose result they will carry.
pub(super) fn need_records<T>(out: *mut T, cap: usize, n: *mut usize) -> Result<()> {
    need(n, "n")?;
    if cap > 0 { need(out, "out") } else { Ok(()) }
}

/// Copies up to `cap` of `records` to `out` and sets `*n` to how many there are (which may
/// exceed `cap`): such a call's result.
///
/// # Safety
/// As checked by [`need_records`]; `out` valid for writing `cap` records.
pub(super) unsafe fn put_records<T: Copy>(
    records: &[T],
    out: *mut T,
    cap: usize,
    n: *mut usize,
) -> Result<()> {
    for (i, r) in records.iter().take(cap).enumerate() {
        // SAFETY: i < cap, and out holds cap records.
        unsafe { out.add(i).write(*r) };
    }
    // SAFETY: upheld by the caller.
    unsafe { put(n, "n", records.len()) }
}

/// Checks that an out-parameter is non-null before doing work whose result it will carry.
pub(super) fn need<T>(out: *mut T, what: &str) -> Result<()> {
    if out.is_null() { Err(null(what)) } else { Ok(()) }
}

/// The caller's array of `n` values at `items` (NULL is fine when `n` is 0), each turned into
/// what the call needs by `f`: the first failure, or all of them.
///
/// # Safety
/// `items` must be NULL or valid for reading `n` values.
pub(super) unsafe fn array_arg<P: Copy, T>(
    items: *const P,
    n: usize,
    what: &str,
    f: impl FnMut(P) -> Result<T>,
) -> Result<Vec<T>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    need(items.cast_mut(), what)?;
    // SAFETY: checked non-null; the caller provides n values.
    unsafe { std::slice::from_raw_parts(items, n) }.iter().copied().map(f).collect()
}

/// A borrowed C string as UTF-8.
///
/// # Safety
/// `s` must be NULL or a NUL-terminated string that lives for `'a`.
pub(super) unsafe fn str_arg<'a>(s: *const c_char, what: &str) -> Result<&'a str> {
    if s.is_null() {
        return Err(null(what));
    }
    // SAFETY: upheld by the caller.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| Error::invalid(format!("{what} is not UTF-8")))
}
