//! The seam between a DMA context and what carries its mappings: the operations in which the
//! backends really differ, and the helpers they share.
//!
//! Each backend is one file (container.rs, iommufd.rs, noiommu.rs, vfio_user.rs); a context
//! holds one as a `Box<dyn Backend>`. A feature only some backends have is a method with a
//! default that refuses (ENOTSUP or EINVAL and a message), overridden where it works.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::IommuKind;
use super::ledger::Record;
use crate::error::{Error, Result};
use crate::handoff::Handoff;
use crate::host::PciDevice;
use crate::iova::IovaRange;
use crate::sys::{self, Context, vfio};
use crate::vfio_user::Client;

/// A change of the ledger that the backend makes at the moment its devices see it (see
/// [`Backend::map`]).
pub(crate) type Hook<'a> = &'a dyn Fn() -> Result<()>;

/// What [`Backend::export`] hands over: the message, and the fds it lists (the context's
/// first), with the ones opened for the handover, which close once it is sent.
pub(crate) struct Export {
    pub message: Handoff,
    pub fds: Vec<RawFd>,
    pub _opened: Vec<OwnedFd>,
}

pub(crate) trait Backend: Send + Sync {
    fn kind(&self) -> IommuKind;

    /// The context's fd, for ioctls vfiokit does not wrap.
    fn fd(&self) -> Result<BorrowedFd<'_>>;

    /// The IOAS of an iommufd context.
    fn ioas(&self) -> Option<u32> {
        None
    }

    /// The IOVA ranges devices may use now; None while the backend cannot know them yet (a
    /// type1 container before its first group), when every IOVA is taken.
    fn ranges(&self) -> Result<Option<Vec<IovaRange>>>;

    /// The least alignment of the IOVAs it is given.
    fn iova_align(&self) -> u64 {
        sys::page_size() as u64
    }

    /// The kernel's errno for a DMA range that wraps past 2^64 (vfiokit refuses it first).
    fn wraps_errno(&self) -> i32 {
        self.kind().wraps_errno()
    }

    /// Whether DMA buffers are memfd-backed: a device server maps them by fd; iommufd maps them
    /// by file where it can, so that the mapping holds the file's pages, not this process's.
    fn buffers_by_fd(&self) -> bool {
        false
    }

    /// Refuses `map_file` where the mapping would not be of the file itself (an iommufd
    /// without IOMMU_IOAS_MAP_FILE); elsewhere the file is mapped by its pages or its address.
    fn check_map_file(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the context can be handed over live (see handover.rs): refused, saying why,
    /// where it cannot.
    fn check_hand_over(&self) -> Result<()> {
        Err(Error::new(
            libc::ENOTSUP,
            format!(
                "a {:?} context cannot be handed over live: that needs the type1 IOMMU's VFIO_UPDATE_VADDR \
                 (a type1 context, VFIOKIT_IOMMU_TYPE1)",
                self.kind()
            ),
        ))
    }

    /// Live handover, in the process giving the context up: lets go of the memory of the Live
    /// mappings `maps` while the IOMMU keeps mapping their IOVAs to the same pages (devices see
    /// no change), so that another process can give its own addresses of that memory with
    /// [`claim_maps`](Self::claim_maps). All or none: on failure those let go are claimed back.
    fn release_maps(&self, _maps: &[Record]) -> Result<()> {
        self.check_hand_over()
    }

    /// Live handover: this process takes the mappings `maps` that another released, at the
    /// records' addresses (of the same memory); also how a handover that failed gives them
    /// back. All or none.
    fn claim_maps(&self, _maps: &[Record]) -> Result<()> {
        self.check_hand_over()
    }

    /// Refuses a map at an IOVA the caller chose, where this backend cannot honour one. Asked
    /// only of a backend that [places memory itself](Self::places_physically): the only kind
    /// that cannot.
    fn check_fixed_iova(&self, _iova: u64) -> Result<()> {
        Ok(())
    }

    /// Whether the backend places memory at its physical address (see [`place`](Self::place)),
    /// so that only physically contiguous memory is contiguous to the device.
    fn places_physically(&self) -> bool {
        false
    }

    /// Where the backend itself places memory (no IOMMU: at its physical address, locked
    /// there), the IOVA; None where the context's allocator picks one. Undone by
    /// [`unmap`](Self::unmap).
    fn place(&self, _vaddr: *mut u8, _len: usize, _writable: bool) -> Option<Result<u64>> {
        None
    }

    /// Makes the backend take the reserved mapping `m`. `commit` makes it Live in the ledger:
    /// the backend calls it once a device may reach the mapping (after the kernel took it;
    /// before a device server is told, which may DMA as soon as it has answered). On failure
    /// nothing of the mapping is left in the backend, and the context forgets it.
    ///
    /// # Safety
    /// The memory must stay mapped until it is unmapped (see [`crate::Iommu::map`]).
    unsafe fn map(&self, m: &Record, commit: Hook) -> Result<()>;

    /// Makes the backend let go of the Live mapping `m`. `retire` takes it out of the ledger's
    /// Live set, and fails where another unmap did so first: the backend calls it once no
    /// device may reach the mapping (after the kernel let go; before device servers are told,
    /// whatever they answer). A failure before it leaves the mapping Live; after it, the
    /// context forgets the mapping and reports the failure.
    fn unmap(&self, m: &Record, retire: Hook) -> Result<()>;

    /// Whether [`unmap`](Self::unmap) calls `retire` last, once nothing of the mapping is left
    /// in the backend (the kernel let go), so that the context frees its IOVAs in the same step
    /// instead of after the unmap returns. Not where work follows the retirement (device
    /// servers told, memory unlocked), during which the IOVAs must stay held.
    fn done_at_retire(&self) -> bool {
        false
    }

    /// Drops the backend's own hold on `m` without a request: a placement the ledger refused,
    /// or a mapping left when the context closes (what closing its fd does not undo).
    fn forget(&self, _m: &Record) {}

    /// Opens the VFIO device fd of `dev` in this context, presenting `token` (a VF's, or a
    /// PF's whose VFs are in use) where given.
    fn open_device(
        &self,
        dev: &PciDevice,
        token: Option<&crate::sriov::VfToken>,
    ) -> Result<OwnedFd>;

    /// Connects a vfio-user device server: it is given the context's mappings (what `maps`
    /// returns, asked under the lock that orders maps), and every later one.
    fn add_peer(
        &self,
        name: &str,
        _peer: &Arc<Client>,
        _maps: &dyn Fn() -> Vec<Record>,
    ) -> Result<()> {
        Err(Error::invalid(format!(
            "{name}: a {:?} context has no device servers (Device::open checks the kind first)",
            self.kind()
        )))
    }

    /// VFIO_DEVICE_PCI_HOT_RESET on `device`, whose reset also resets the devices of `groups`.
    fn hot_reset(&self, device: BorrowedFd, groups: &[u32]) -> Result<()>;

    /// What hands this context to another process: the fds of the context and of `devices`
    /// (their groups, which this attaches, or their cdevs). Refused where a context cannot be
    /// handed over.
    fn export(&self, devices: &[PciDevice]) -> Result<Export>;
}

/// Opens a device node read/write; `missing` says what its absence means.
pub(crate) fn open_node(path: &str, missing: &str) -> Result<OwnedFd> {
    sys::open_rw(path).map_err(|sys::Errno(e)| {
        let hint = match e {
            libc::ENOENT if !missing.is_empty() => format!(" ({missing})"),
            libc::EACCES | libc::EPERM => {
                " (permission: run as root or make it accessible to this user)".into()
            }
            libc::EBUSY => {
                " (already open: by another process, or by this one in another IOMMU context)"
                    .into()
            }
            _ => String::new(),
        };
        Error::os(e, format!("opening {path}{hint}"))
    })
}

/// Opens a container node and checks its VFIO API version.
pub(crate) fn open_container(path: &str, missing: &str) -> Result<OwnedFd> {
    let container = open_node(path, missing)?;
    let version = vfio::api_version(container.as_fd()).context(|| "VFIO_GET_API_VERSION")?;
    if version != vfio_bindings::bindings::vfio::VFIO_API_VERSION as i32 {
        return Err(Error::new(
            libc::ENOTSUP,
            format!("VFIO API version {version} is not the supported 0"),
        ));
    }
    Ok(container)
}

/// A kernel's refusal of a DMA map, with what to do about it; `hint` adds what the backend
/// knows of the errno.
pub(crate) fn map_error(e: i32, len: usize, iova: u64, hint: &str) -> Error {
    let mut msg = format!(
        "DMA map of {len:#x} bytes at IOVA {iova:#x}: {}{hint}",
        std::io::Error::from_raw_os_error(e)
    );
    if e == libc::ENOMEM {
        msg += &format!(
            " (RLIMIT_MEMLOCK is {} bytes; {len} more were asked: raise it with ulimit -l or grant CAP_IPC_LOCK)",
            sys::memlock_limit()
        );
    }
    Error::new(e, msg)
}

/// The message of an unmap that failed.
pub(crate) fn unmap_what(m: &Record) -> String {
    format!("DMA unmap of {:#x} bytes at IOVA {:#x}", m.len, m.iova)
}

/// `step` on each of `maps`, all or none: after a failure, `undo` on those done (its own
/// failures then change nothing more). `what` names the step for the error.
pub(crate) fn all_or_none(
    maps: &[Record],
    step: impl Fn(&Record) -> sys::SysResult<()>,
    undo: impl Fn(&Record) -> sys::SysResult<()>,
    what: &str,
) -> Result<()> {
    for (i, m) in maps.iter().enumerate() {
        if let Err(sys::Errno(e)) = step(m) {
            for done in &maps[..i] {
                let _ = undo(done);
            }
            return Err(Error::os(
                e,
                format!("{what} the DMA mapping of {:#x} bytes at IOVA {:#x}", m.len, m.iova),
            ));
        }
    }
    Ok(())
}

/// A handover refused: EPROTO, with what was wrong.
pub(crate) fn protocol(why: String) -> Error {
    Error::new(libc::EPROTO, format!("refusing a handed-over context: {why}"))
}
