//! Fixed-size text fields of the C records (NUL-terminated `char` arrays).

use std::ffi::c_char;

/// Copies `s` into `out`, NUL-terminated, cut at a character boundary.
pub(crate) fn fill(out: &mut [c_char], s: &str) {
    let mut end = s.len().min(out.len() - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    for (o, &b) in out.iter_mut().zip(&s.as_bytes()[..end]) {
        *o = b as c_char;
    }
}

pub(crate) fn text(chars: &[c_char]) -> &str {
    // SAFETY: c_char and u8 have the same size and alignment.
    let bytes = unsafe { std::slice::from_raw_parts(chars.as_ptr().cast::<u8>(), chars.len()) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end]).unwrap_or("")
}
