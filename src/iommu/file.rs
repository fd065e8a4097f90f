//! DMA over a file's pages (a memfd, a file on shared hugetlbfs): mapped into this process and
//! for the devices, by the file itself where the backend can (iommufd's IOMMU_IOAS_MAP_FILE,
//! Linux 6.13+; a vfio-user server, given the fd), by its address elsewhere.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use super::ledger::{Facts, Owner};
use super::{At, DMA_READONLY, Iommu, dma_alignment};
use crate::error::{Error, Result};
use crate::sys::{self, mem};

impl Iommu {
    /// Maps `len` bytes of the file `fd` from `offset` (both whole pages) into this process,
    /// shared, and for DMA; returns the address and IOVA, which [`Iommu::free`] releases. The
    /// file stays the caller's (the context keeps its own duplicate of the fd while mapped) and
    /// is never poisoned. On iommufd the kernel maps the file's pages, not this process's
    /// address range, so the mapping does not depend on the process's memory (what a handover
    /// needs); a kernel without IOMMU_IOAS_MAP_FILE refuses with EOPNOTSUPP naming the version.
    /// `flags`: [`DMA_READONLY`] (the device only reads; the file may be open read-only).
    pub fn map_file(
        &self,
        fd: BorrowedFd,
        offset: u64,
        len: usize,
        flags: u32,
    ) -> Result<(NonNull<u8>, u64)> {
        let what = || format!("DMA map of {len:#x} bytes of a file at offset {offset:#x}");
        if flags & !DMA_READONLY != 0 {
            return Err(Error::invalid(format!(
                "{}: flags {flags:#x}: only DMA_READONLY applies to a file's mapping",
                what()
            )));
        }
        let page = sys::page_size();
        if len == 0 || len % page != 0 || offset % page as u64 != 0 {
            return Err(Error::invalid(format!(
                "{}: the offset and length must be whole pages (of {page:#x} bytes), the length not zero",
                what()
            )));
        }
        self.0.backend.check_map_file()?;
        let writable = flags & DMA_READONLY == 0;
        let (fd, addr) = mem::map_file(fd, offset, len, writable).map_err(|sys::Errno(e)| {
            let hint = match e {
                libc::EACCES => " (a file open read-only maps with DMA_READONLY)",
                libc::ENODEV => " (this kind of file cannot be mapped)",
                _ => "",
            };
            Error::os(e, format!("{}{hint}", what()))
        })?;
        let facts = Facts { writable, owner: Owner::File, fd: Some(Arc::new(fd)), offset };
        // SAFETY: a new shared mapping, which only the ledger (and the caller) reach.
        match unsafe { self.map_at(addr.as_ptr(), len, At::Any(dma_alignment(len)), facts) } {
            Ok(iova) => Ok((addr, iova)),
            Err(e) => {
                // SAFETY: just mapped above, never handed out.
                unsafe { mem::unmap(addr, len) };
                Err(e)
            }
        }
    }
}
