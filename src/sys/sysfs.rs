//! Reads of sysfs and /dev: where a device's driver, IOMMU group and cdev are found.

use std::ffi::CString;
use std::fs;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::SysResult;

/// The last path component of a symlink's target (`driver` -> "vfio-pci"), if the link exists.
/// Read into a stack buffer: std's `read_link` allocates and then shrinks its buffer, and every
/// open of a device reads its `iommu_group` link.
pub(crate) fn link_name(path: &Path) -> Option<String> {
    let cpath = CString::new(path.as_os_str().as_bytes()).ok()?;
    // Linux stores a symlink's target in at most PATH_MAX bytes with its NUL. Not zeroed
    // first: that would cost more than the rest.
    let mut buf = [MaybeUninit::<u8>::uninit(); libc::PATH_MAX as usize];
    // SAFETY: cpath is NUL-terminated; readlink writes at most buf.len() bytes.
    let n = unsafe { libc::readlink(cpath.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).ok()?;
    // SAFETY: readlink initialized the first n <= buf.len() bytes.
    let target = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
    // The bytes after the last '/': Path's component parser costs more than the readlink.
    let name = target.rsplit(|&b| b == b'/').next()?;
    Some(String::from_utf8_lossy(name).into_owned())
}

pub(crate) fn write(path: &Path, text: &str) -> SysResult<()> {
    Ok(fs::write(path, text)?)
}

pub(crate) fn exists(path: &Path) -> bool {
    path.exists()
}

pub(crate) fn canonical(path: &Path) -> SysResult<PathBuf> {
    Ok(fs::canonicalize(path)?)
}

/// The first name `readdir` gives in a directory, for directories that hold one; None if it is
/// empty or does not exist.
pub(crate) fn first_name(dir: &Path) -> Option<String> {
    let entry = fs::read_dir(dir).ok()?.flatten().next()?;
    Some(entry.file_name().to_string_lossy().into_owned())
}

/// Names in a directory, sorted; empty if it does not exist.
pub(crate) fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// A file holding one decimal number (sysfs counters).
pub(crate) fn read_u64(path: &str) -> SysResult<u64> {
    fs::read_to_string(path)?.trim().parse().map_err(|_| super::Errno(libc::EPROTO))
}

/// A small text file's contents, trimmed (sysfs attributes, /proc files); None if unreadable.
pub(crate) fn read_text(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|t| t.trim().to_owned())
}

/// Whether this process may open `path` for reading and writing (access(2), as the real ids).
pub(crate) fn read_writable(path: &str) -> SysResult<()> {
    let c = std::ffi::CString::new(path).map_err(|_| super::Errno(libc::EINVAL))?;
    // SAFETY: c is a NUL-terminated path.
    super::check(unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) }).map(drop)
}
