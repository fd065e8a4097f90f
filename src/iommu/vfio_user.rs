//! vfio-user: devices served by other processes over UNIX sockets. Each mapping is sent to
//! every device server of the context; the servers reach memory mapped without an fd through
//! DMA_READ/DMA_WRITE requests, which the context serves from its ledger.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::backend::{Backend, Export, Hook, unmap_what};
use super::ledger::Record;
use super::{IommuKind, lock};
use crate::error::{Error, Result};
use crate::host::PciDevice;
use crate::iova::{EVERY_IOVA, IovaRange};
use crate::sys;
use crate::vfio_user::Client;

pub(crate) struct VfioUser {
    /// The device servers; held while maps are sent, so each server sees every map once and
    /// in order (never the context's ledger lock: the receivers need it to serve DMA
    /// meanwhile).
    peers: Mutex<Vec<Weak<Client>>>,
    /// The largest smallest page of the servers, which every IOVA must be aligned to.
    align: AtomicU64,
}

impl VfioUser {
    pub fn new() -> VfioUser {
        VfioUser { peers: Mutex::new(Vec::new()), align: AtomicU64::new(sys::page_size() as u64) }
    }
}

/// How a server may reach a mapping's memory: through its file (a DMA buffer's memfd, a
/// mapped file), at the memory's offset in it.
fn shared_fd(m: &Record) -> Option<(i32, u64)> {
    m.facts.fd.as_ref().map(|f| (f.as_raw_fd(), m.facts.offset))
}

impl Backend for VfioUser {
    fn kind(&self) -> IommuKind {
        IommuKind::VfioUser
    }

    fn fd(&self) -> Result<BorrowedFd<'_>> {
        Err(Error::new(
            libc::ENOTSUP,
            "a vfio-user context has no fd: its devices are served by other processes",
        ))
    }

    fn ranges(&self) -> Result<Option<Vec<IovaRange>>> {
        Ok(Some(vec![EVERY_IOVA]))
    }

    fn iova_align(&self) -> u64 {
        self.align.load(Ordering::Relaxed)
    }

    fn buffers_by_fd(&self) -> bool {
        true
    }

    unsafe fn map(&self, m: &Record, commit: Hook) -> Result<()> {
        let peers = lock(&self.peers);
        let live: Vec<Arc<Client>> = peers.iter().filter_map(Weak::upgrade).collect();
        // Live first: a server may reach the memory as soon as it has answered. A device
        // attaching meanwhile waits for the servers' lock, then is given it.
        commit()?;
        for (i, peer) in live.iter().enumerate() {
            if let Err(e) = peer.dma_map(m.iova, m.len as u64, m.facts.writable, shared_fd(m)) {
                for done in &live[..i] {
                    let _ = done.dma_unmap(m.iova, m.len as u64);
                }
                return Err(Error::new(
                    e.errno(),
                    format!("DMA map of {:#x} bytes at IOVA {:#x}: {}", m.len, m.iova, e.message()),
                ));
            }
        }
        Ok(())
    }

    fn unmap(&self, m: &Record, retire: Hook) -> Result<()> {
        let peers = lock(&self.peers);
        // Retired first: from here on no server request reaches the memory.
        retire()?;
        // Every server is told, and the mapping is gone here whatever they answer: a server
        // that failed to unmap (or died) cannot be made to.
        let refused = peers
            .iter()
            .filter_map(Weak::upgrade)
            .fold(None, |first, peer| first.or(peer.dma_unmap(m.iova, m.len as u64).err()));
        match refused {
            Some(e) => Err(Error::new(e.errno(), format!("{}: {}", unmap_what(m), e.message()))),
            None => Ok(()),
        }
    }

    fn open_device(
        &self,
        dev: &PciDevice,
        _token: Option<&crate::sriov::VfToken>,
    ) -> Result<OwnedFd> {
        Err(Error::invalid(format!(
            "{} is a kernel VFIO device: open it in a type1 or iommufd context, not a vfio-user one",
            dev.address
        )))
    }

    /// Gives a new server every mapping the context has, under the servers' lock: a map in
    /// flight either was Live before (and is among `maps`) or sends to it afterwards.
    fn add_peer(
        &self,
        name: &str,
        peer: &Arc<Client>,
        maps: &dyn Fn() -> Vec<Record>,
    ) -> Result<()> {
        let mut peers = lock(&self.peers);
        for m in maps() {
            peer.dma_map(m.iova, m.len as u64, m.facts.writable, shared_fd(&m)).map_err(|e| {
                Error::new(
                    e.errno(),
                    format!("giving {name} the context's DMA mappings: {}", e.message()),
                )
            })?;
        }
        peers.retain(|p| p.strong_count() > 0);
        peers.push(Arc::downgrade(peer));
        self.align.fetch_max(peer.page_size(), Ordering::Relaxed);
        Ok(())
    }

    fn hot_reset(&self, _device: BorrowedFd, _groups: &[u32]) -> Result<()> {
        Err(Error::new(libc::ENOTSUP, "a vfio-user device has no PCI hot reset"))
    }

    fn export(&self, _devices: &[PciDevice]) -> Result<Export> {
        Err(Error::new(
            libc::ENOTSUP,
            "a vfio-user context has no fds to hand over: the other process connects to the device servers itself",
        ))
    }
}
