//! Reads of sysfs and /dev: where a device's driver, IOMMU group and cdev are found.

use std::fs;
use std::path::{Path, PathBuf};

use super::SysResult;

/// The last path component of a symlink's target (`driver` -> "vfio-pci"), if the link exists.
pub(crate) fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
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
