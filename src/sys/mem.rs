//! Virtual memory: address-space reservations, device mappings, anonymous and memfd DMA buffers.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use super::{Errno, SysResult, check};

fn check_map(p: *mut libc::c_void) -> SysResult<NonNull<u8>> {
    if p == libc::MAP_FAILED {
        Err(Errno::last())
    } else {
        NonNull::new(p.cast()).ok_or(Errno(libc::ENOMEM))
    }
}

/// Reserves `len` bytes of address space with no access, so parts can be mapped over it.
pub(crate) fn reserve(len: usize) -> SysResult<NonNull<u8>> {
    // SAFETY: a fresh anonymous mapping touches no existing memory.
    check_map(unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    })
}

/// Maps `len` bytes of `fd` at `offset` read/write over `addr`, which must lie in a reservation
/// this process owns.
///
/// # Safety
/// `addr..addr+len` must be inside a reservation made by [`reserve`] and not in use by anyone.
pub(crate) unsafe fn map_shared_fixed(
    addr: NonNull<u8>,
    len: usize,
    fd: BorrowedFd,
    offset: u64,
    prot: i32,
) -> SysResult<()> {
    // SAFETY: upheld by the caller: the range is ours to replace.
    check_map(unsafe {
        libc::mmap(
            addr.as_ptr().cast(),
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    })
    .map(drop)
}

/// Anonymous, private, zero-filled read/write memory (DMA buffers); `huge_shift` 0 for normal
/// pages, else the log2 of the hugetlb page size to back it with (21: 2 MiB, 30: 1 GiB).
pub(crate) fn anonymous(len: usize, huge_shift: u32) -> SysResult<NonNull<u8>> {
    // SAFETY: no fixed address: the kernel picks memory no one uses.
    unsafe { anonymous_at(None, len, huge_shift) }
}

/// [`anonymous`] over `at` when given.
///
/// # Safety
/// `at..at+len` must be inside a reservation made by [`reserve`] and not in use by anyone.
pub(crate) unsafe fn anonymous_at(
    at: Option<NonNull<u8>>,
    len: usize,
    huge_shift: u32,
) -> SysResult<NonNull<u8>> {
    let huge = match huge_shift {
        0 => 0,
        shift => libc::MAP_HUGETLB | (shift as i32) << libc::MAP_HUGE_SHIFT,
    };
    let (addr, fixed) =
        at.map_or((std::ptr::null_mut(), 0), |a| (a.as_ptr().cast(), libc::MAP_FIXED));
    // MAP_POPULATE write-faults every page now: a read-only DMA pin of a never-touched private
    // page would pin the shared zero page, and the device would never see what is written later.
    // SAFETY: a fresh mapping, at a range that is ours to replace when fixed (the caller's word).
    check_map(unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | huge | fixed,
            -1,
            0,
        )
    })
}

/// Gives `at..at+len` back to its reservation: no access, no memory behind it.
///
/// # Safety
/// As for [`anonymous_at`]; nothing may use the range afterwards.
pub(crate) unsafe fn unreserve_to(at: NonNull<u8>, len: usize) {
    // SAFETY: upheld by the caller. It fails only for arguments we never pass.
    unsafe {
        libc::mmap(
            at.as_ptr().cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
}

/// Shared, zero-filled read/write memory backed by a memfd (DMA buffers another process can map
/// through the fd: a vfio-user server); `huge_shift` as for [`anonymous`]. Returns the fd and
/// the mapping.
pub(crate) fn memfd(len: usize, huge_shift: u32) -> SysResult<(OwnedFd, NonNull<u8>)> {
    // SAFETY: no fixed address: the kernel picks memory no one uses.
    unsafe { memfd_at(None, len, huge_shift) }
}

/// [`memfd`] over `at` when given.
///
/// # Safety
/// As for [`anonymous_at`].
pub(crate) unsafe fn memfd_at(
    at: Option<NonNull<u8>>,
    len: usize,
    huge_shift: u32,
) -> SysResult<(OwnedFd, NonNull<u8>)> {
    let fd = memfd_create(huge_shift)?;
    set_len(fd.as_fd(), len as u64)?;
    // SAFETY: forwarded from the caller.
    let addr = unsafe { map_shared_at(at, len, fd.as_fd(), 0) }?;
    Ok((fd, addr))
}

/// An empty memfd, close-on-exec, of hugetlb pages when `huge_shift` is not 0.
pub(crate) fn memfd_create(huge_shift: u32) -> SysResult<OwnedFd> {
    let huge = match huge_shift {
        0 => 0,
        shift => libc::MFD_HUGETLB | shift << libc::MFD_HUGE_SHIFT,
    };
    // SAFETY: the name is a valid NUL-terminated string.
    let fd =
        check(unsafe { libc::memfd_create(c"vfiokit-dma".as_ptr(), libc::MFD_CLOEXEC | huge) })?;
    // SAFETY: memfd_create just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the size of the file `fd` (ftruncate).
pub(crate) fn set_len(fd: BorrowedFd, len: u64) -> SysResult<()> {
    // SAFETY: plain syscall on the caller's fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

/// Frees the pages of `[offset, offset+len)` of the file `fd`, which then reads as zeros
/// (fallocate PUNCH_HOLE, the size unchanged).
pub(crate) fn punch_hole(fd: BorrowedFd, offset: u64, len: usize) -> SysResult<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on the caller's fd.
    check(unsafe {
        libc::fallocate(fd.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t)
    })
    .map(drop)
}

/// Maps `len` bytes of `fd` from `offset`, shared, read/write and faulted in, at `at` when
/// given (else where the kernel picks).
///
/// # Safety
/// `at`, when given, as for [`anonymous_at`].
pub(crate) unsafe fn map_shared_at(
    at: Option<NonNull<u8>>,
    len: usize,
    fd: BorrowedFd,
    offset: u64,
) -> SysResult<NonNull<u8>> {
    let (addr, fixed) =
        at.map_or((std::ptr::null_mut(), 0), |a| (a.as_ptr().cast(), libc::MAP_FIXED));
    // SAFETY: a shared mapping of the caller's fd, at a range that is ours to replace when
    // fixed (the caller's word).
    check_map(unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE | fixed,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    })
}

/// A shared mapping of `len` bytes of the file `fd` from `offset` (read-only unless `writable`),
/// and a duplicate of `fd` that the mapping's owner keeps (the caller may close its own).
pub(crate) fn map_file(
    fd: BorrowedFd,
    offset: u64,
    len: usize,
    writable: bool,
) -> SysResult<(OwnedFd, NonNull<u8>)> {
    let own = super::dup(fd)?;
    let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
    // SAFETY: a new shared mapping of the caller's file, where the kernel picks the address.
    let addr = check_map(unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            own.as_raw_fd(),
            offset as libc::off_t,
        )
    })?;
    Ok((own, addr))
}

/// Unmaps a range this process mapped.
///
/// # Safety
/// Nothing may use `addr..addr+len` afterwards.
pub(crate) unsafe fn unmap(addr: NonNull<u8>, len: usize) {
    // SAFETY: upheld by the caller. munmap of a range we mapped cannot fail in a way we could
    // act on.
    unsafe { libc::munmap(addr.as_ptr().cast(), len) };
}

/// Locks `[addr, addr+len)` in memory, faulting it in: what a no-IOMMU context does instead of
/// the kernel's pinning.
pub(crate) fn lock(addr: *const u8, len: usize) -> SysResult<()> {
    // SAFETY: mlock dereferences nothing; the kernel checks that the range is mapped.
    check(unsafe { libc::mlock(addr.cast(), len) }).map(drop)
}

/// Undoes [`lock`] on `[addr, addr+len)`.
pub(crate) fn unlock(addr: *const u8, len: usize) -> SysResult<()> {
    // SAFETY: as for lock.
    check(unsafe { libc::munlock(addr.cast(), len) }).map(drop)
}

/// The raw /proc/self/pagemap entries (8 bytes a page) of the pages of `[addr, addr+len)`.
pub(crate) fn pagemap(addr: usize, len: usize) -> SysResult<Vec<u8>> {
    let page = super::page_size();
    let fd = std::fs::File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; len.div_ceil(page) * 8];
    super::pread_exact(fd.as_fd(), &mut entries, (addr / page * 8) as u64)?;
    Ok(entries)
}
