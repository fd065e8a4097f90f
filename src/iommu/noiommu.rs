//! VFIO's unsafe no-IOMMU mode: a container with the no-IOMMU driver and its groups, and no
//! DMA requests at all. Memory for DMA is locked in place, and its physical address is the IOVA.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use super::IommuKind;
use super::backend::{Backend, Export, Hook};
use super::container::Container;
use super::ledger::{Owner, Record};
use crate::error::{Error, Result};
use crate::host::{self, PciDevice};
use crate::iova::{EVERY_IOVA, IovaRange};
use crate::pagemap::{self, PagemapError};
use crate::sys::{self, Context, mem, sysfs, vfio};

/// VFIO's switch for no-IOMMU mode; absent where the kernel lacks CONFIG_VFIO_NOIOMMU.
pub(crate) const NOIOMMU_PARAM: &str = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";
const CAP_SYS_RAWIO: u32 = 17;

pub(crate) struct NoIommu {
    container: Container,
}

impl NoIommu {
    pub fn open() -> Result<NoIommu> {
        let container = Container::open(IommuKind::NoIommu)?;
        check_noiommu(container.fd())?;
        Ok(NoIommu { container })
    }
}

impl Backend for NoIommu {
    fn kind(&self) -> IommuKind {
        IommuKind::NoIommu
    }

    fn fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.container.fd())
    }

    fn ranges(&self) -> Result<Option<Vec<IovaRange>>> {
        Ok(Some(vec![EVERY_IOVA]))
    }

    fn check_fixed_iova(&self, iova: u64) -> Result<()> {
        Err(Error::new(
            libc::ENOTSUP,
            format!(
                "DMA map at IOVA {iova:#x}: a no-IOMMU context cannot place memory at an IOVA (its devices \
                 see physical addresses); map_any and alloc map memory and return its address"
            ),
        ))
    }

    fn places_physically(&self) -> bool {
        true
    }

    /// Locks the memory in place and returns its physical address, which is what the device
    /// must be given. Nothing stops the device reaching other memory.
    fn place(&self, vaddr: *mut u8, len: usize, writable: bool) -> Option<Result<u64>> {
        Some(lock_physical(vaddr, len, writable))
    }

    unsafe fn map(&self, _m: &Record, commit: Hook) -> Result<()> {
        // Placed (locked) already: nothing to ask of the kernel.
        commit()
    }

    fn unmap(&self, m: &Record, retire: Hook) -> Result<()> {
        retire()?;
        // munlock fails only where the memory (and with it the lock) is gone.
        let _ = mem::unlock(m.vaddr as *const u8, m.len);
        Ok(())
    }

    fn forget(&self, m: &Record) {
        // The locks stand in for the kernel's pins, which a closing container drops; those of
        // memory the context owns (buffers, heap arenas) go with it.
        if m.facts.owner == Owner::Caller {
            let _ = mem::unlock(m.vaddr as *const u8, m.len);
        }
    }

    fn open_device(
        &self,
        dev: &PciDevice,
        token: Option<&crate::sriov::VfToken>,
    ) -> Result<OwnedFd> {
        self.container.device_fd(dev, token, || Ok(()))
    }

    fn hot_reset(&self, device: BorrowedFd, groups: &[u32]) -> Result<()> {
        self.container.hot_reset(device, groups)
    }

    fn export(&self, _devices: &[PciDevice]) -> Result<Export> {
        Err(Error::new(
            libc::ENOTSUP,
            "a no-IOMMU context cannot be handed to a less privileged process: its devices and DMA need \
             CAP_SYS_RAWIO and CAP_SYS_ADMIN in the process that uses them",
        ))
    }
}

/// Locks `[vaddr, vaddr+len)` and returns its physical address; it must be physically
/// contiguous. Unlocked again on failure.
fn lock_physical(vaddr: *mut u8, len: usize, writable: bool) -> Result<u64> {
    let what = || format!("no-IOMMU DMA map of {vaddr:p}+{len:#x}");
    if !writable {
        return Err(Error::new(
            libc::ENOTSUP,
            format!("{}: read-only DMA needs an IOMMU to enforce it, and there is none", what()),
        ));
    }
    mem::lock(vaddr, len).map_err(|sys::Errno(e)| {
        let hint = match e {
            libc::ENOMEM | libc::EPERM | libc::EAGAIN => format!(
                " (RLIMIT_MEMLOCK is {} bytes: raise it with ulimit -l or grant CAP_IPC_LOCK)",
                sys::memlock_limit()
            ),
            _ => String::new(),
        };
        Error::os(e, format!("{}: locking it in memory{hint}", what()))
    })?;
    let placed = mem::pagemap(vaddr as usize, len)
        .context(|| format!("{}: reading /proc/self/pagemap", what()))
        .and_then(|entries| {
            pagemap::contiguous_physical(&entries, sys::page_size() as u64).map_err(|e| {
                let (errno, hint) = match e {
                    PagemapError::Hidden => (libc::EPERM, " (run as root)"),
                    PagemapError::NotContiguous { .. } => (
                        libc::EINVAL,
                        " (a device without an IOMMU sees physical memory: map a page at a time, or \
                         allocate with DMA_HUGE_2M for up to 2 MiB in one piece)",
                    ),
                    PagemapError::NotPresent { .. } | PagemapError::Truncated => (libc::EIO, ""),
                };
                Error::new(errno, format!("{}: {e}{hint}", what()))
            })
        });
    if placed.is_err() {
        // munlock fails only where the memory (and its lock) is gone.
        let _ = mem::unlock(vaddr, len);
    }
    placed
}

/// Whether this process can use VFIO's no-IOMMU mode; if not, why, and the fix.
fn check_noiommu(container: BorrowedFd) -> Result<()> {
    const NOIOMMU: u32 = vfio_bindings::bindings::vfio::VFIO_NOIOMMU_IOMMU;
    let on = vfio::check_extension(container, NOIOMMU)
        .context(|| "VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)")?;
    if !on {
        return Err(match sysfs::exists(Path::new(NOIOMMU_PARAM)) {
            false => Error::new(
                libc::ENOTSUP,
                "this kernel has no VFIO no-IOMMU mode (it was built without CONFIG_VFIO_NOIOMMU)",
            ),
            true => Error::new(
                libc::ENODEV,
                format!(
                    "VFIO's no-IOMMU mode is off: boot with vfio.enable_unsafe_noiommu_mode=1, or echo 1 > \
                     {NOIOMMU_PARAM} before binding devices to vfio-pci (it taints the kernel: such devices \
                     can DMA anywhere in memory)"
                ),
            ),
        });
    }
    if !host::has_capability(CAP_SYS_RAWIO) {
        return Err(Error::new(
            libc::EPERM,
            "VFIO's no-IOMMU mode needs CAP_SYS_RAWIO (and CAP_SYS_ADMIN to read physical addresses): \
             run as root or grant them",
        ));
    }
    Ok(())
}
