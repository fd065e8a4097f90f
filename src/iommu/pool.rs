//! DMA buffers in memory another process can map (live handover, handover.rs): one memfd per
//! page size and context, each buffer at its own offset of it. One fd however many buffers
//! there are: a memfd a buffer would cost a buffer an fd (RLIMIT_NOFILE) and SCM_RIGHTS could
//! not carry thousands. Offsets only grow (the file is sparse: no memory behind what is not
//! in use), and a freed buffer's pages are punched out of the file.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use crate::sys::{SysResult, mem};

/// One page size's memfd and the buffers in it.
pub(crate) struct Pool {
    /// 0 for normal pages, else the log2 of the hugetlb page size.
    pub huge_shift: u32,
    /// Shared with the records of its buffers, which an iommufd maps by it.
    pub fd: Arc<OwnedFd>,
    /// The file's size: the next buffer's offset.
    end: u64,
    /// Each live buffer's offset in the file, by its address.
    live: BTreeMap<usize, u64>,
}

/// A live buffer as a handover lists it: which pool, where in its file, where in memory.
pub(crate) struct Placed {
    pub pool: usize,
    pub offset: u64,
}

#[derive(Default)]
pub(crate) struct Pools {
    list: Mutex<Vec<Pool>>,
    /// Whether `list` ever had a pool: until then a free (most contexts never share a buffer)
    /// does not take the lock.
    made: AtomicBool,
}

impl Pools {
    /// `len` bytes (a multiple of the page `huge_shift` says), zeroed and faulted in; also
    /// the pool's file and the offset in it.
    pub fn alloc(
        &self,
        len: usize,
        huge_shift: u32,
    ) -> SysResult<(NonNull<u8>, Arc<OwnedFd>, u64)> {
        let mut pools = lock(&self.list);
        let at = match pools.iter().position(|p| p.huge_shift == huge_shift) {
            Some(at) => at,
            None => {
                let fd = Arc::new(mem::memfd_create(huge_shift)?);
                pools.push(Pool { huge_shift, fd, end: 0, live: BTreeMap::new() });
                self.made.store(true, Ordering::Release);
                pools.len() - 1
            }
        };
        let pool = &mut pools[at];
        let offset = pool.end;
        mem::set_len(pool.fd.as_fd(), offset + len as u64)?;
        // SAFETY: no fixed address; the range of the file is this buffer's alone.
        let addr = unsafe { mem::map_shared_at(None, len, pool.fd.as_fd(), offset) }?;
        pool.end = offset + len as u64;
        pool.live.insert(addr.as_ptr() as usize, offset);
        Ok((addr, pool.fd.clone(), offset))
    }

    /// Unmaps a buffer and frees its memory: pooled memory is punched out of its file, other
    /// memory (a backend's own) just unmapped.
    ///
    /// # Safety
    /// Nothing may use `addr..addr+len` afterwards.
    pub unsafe fn free(&self, addr: NonNull<u8>, len: usize) {
        // SAFETY: upheld by the caller.
        unsafe { mem::unmap(addr, len) };
        if !self.made.load(Ordering::Acquire) {
            return;
        }
        let mut pools = lock(&self.list);
        for pool in pools.iter_mut() {
            if let Some(offset) = pool.live.remove(&(addr.as_ptr() as usize)) {
                // Fails only for what a memfd supports: the pages then go with the file.
                let _ = mem::punch_hole(pool.fd.as_fd(), offset, len);
                return;
            }
        }
    }

    /// Where the buffer at `vaddr` lives, if it is pooled.
    pub fn find(&self, vaddr: usize) -> Option<Placed> {
        let pools = lock(&self.list);
        pools
            .iter()
            .enumerate()
            .find_map(|(pool, p)| p.live.get(&vaddr).map(|&offset| Placed { pool, offset }))
    }

    /// Each pool's page size and fd, in the order [`Placed::pool`] counts them; `f` runs under
    /// the pools' lock.
    pub fn each<T>(&self, f: impl FnOnce(&[(u32, BorrowedFd)]) -> T) -> T {
        let pools = lock(&self.list);
        let list: Vec<(u32, BorrowedFd)> =
            pools.iter().map(|p| (p.huge_shift, p.fd.as_fd())).collect();
        f(&list)
    }

    /// Takes over a pool handed over by another process, with no buffer yet.
    pub fn adopt(&self, huge_shift: u32, fd: OwnedFd) {
        lock(&self.list).push(Pool { huge_shift, fd: Arc::new(fd), end: 0, live: BTreeMap::new() });
        self.made.store(true, Ordering::Release);
    }

    /// Maps the buffer of `len` bytes at `offset` of pool `pool` (from [`adopt`](Self::adopt))
    /// into this process: where it now is, and the pool's file.
    pub fn map_adopted(
        &self,
        pool: usize,
        offset: u64,
        len: usize,
    ) -> SysResult<(NonNull<u8>, Arc<OwnedFd>)> {
        let mut pools = lock(&self.list);
        let p = &mut pools[pool];
        // SAFETY: no fixed address; the file's range is the handed-over buffer's.
        let addr = unsafe { mem::map_shared_at(None, len, p.fd.as_fd(), offset) }?;
        p.end = p.end.max(offset + len as u64);
        p.live.insert(addr.as_ptr() as usize, offset);
        Ok((addr, p.fd.clone()))
    }
}
