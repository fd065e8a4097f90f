//! The kinds of DMA context, with the integer codes the C API and Python name them by.

use std::path::Path;

use crate::error::{Error, Result};
use crate::sys::sysfs;

/// Pick the best interface the kernel offers (or what `VFIOKIT_IOMMU` in the environment says).
pub const IOMMU_AUTO: u32 = 0;
/// The legacy container/group interface with the type1 (v2) IOMMU driver.
pub const IOMMU_TYPE1: u32 = 1;
/// iommufd (/dev/iommu) with devices opened through their VFIO cdev.
pub const IOMMU_IOMMUFD: u32 = 2;
/// Devices served by other processes over vfio-user sockets (never chosen by AUTO).
pub const IOMMU_VFIO_USER: u32 = 3;
/// The legacy container with the original type1 (v1) IOMMU driver (see docs/backends.md for
/// how its unmap differs from v2's).
pub const IOMMU_TYPE1V1: u32 = 4;
/// iommufd's compatibility container: /dev/iommu driven with the legacy container and group
/// ioctls, type1v2 semantics.
pub const IOMMU_IOMMUFD_COMPAT: u32 = 5;
/// iommufd's compatibility container with type1 (v1) semantics.
pub const IOMMU_IOMMUFD_COMPAT_V1: u32 = 6;
/// VFIO's unsafe no-IOMMU mode, for machines without an IOMMU: no isolation, DMA buffers locked
/// in memory with their physical addresses as IOVAs. Never chosen by AUTO.
pub const IOMMU_NOIOMMU: u32 = 7;

/// The kernel interface a context uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuKind {
    Type1,
    Iommufd,
    VfioUser,
    Type1V1,
    IommufdCompat,
    IommufdCompatV1,
    NoIommu,
}

impl IommuKind {
    pub fn code(self) -> u32 {
        match self {
            IommuKind::Type1 => IOMMU_TYPE1,
            IommuKind::Iommufd => IOMMU_IOMMUFD,
            IommuKind::VfioUser => IOMMU_VFIO_USER,
            IommuKind::Type1V1 => IOMMU_TYPE1V1,
            IommuKind::IommufdCompat => IOMMU_IOMMUFD_COMPAT,
            IommuKind::IommufdCompatV1 => IOMMU_IOMMUFD_COMPAT_V1,
            IommuKind::NoIommu => IOMMU_NOIOMMU,
        }
    }

    /// A kind that uses the legacy container and group ioctls (on /dev/vfio/vfio or
    /// /dev/iommu).
    pub(crate) fn is_container(self) -> bool {
        matches!(
            self,
            IommuKind::Type1
                | IommuKind::Type1V1
                | IommuKind::IommufdCompat
                | IommuKind::IommufdCompatV1
        )
    }

    /// A kind whose DMA maps go through iommufd (which pins pages rather than following PFNs).
    pub(crate) fn is_iommufd(self) -> bool {
        matches!(self, IommuKind::Iommufd | IommuKind::IommufdCompat | IommuKind::IommufdCompatV1)
    }

    /// The kernel's errno for a DMA range past 2^64: no valid range to type1 (up to Linux
    /// 6.12; a type1 context with a group asks its kernel), an overflow to iommufd.
    pub(crate) fn wraps_errno(self) -> i32 {
        if self.is_iommufd() { libc::EOVERFLOW } else { libc::EINVAL }
    }

    /// The kind `IOMMU_AUTO` stands for: `VFIOKIT_IOMMU` (type1, iommufd or noiommu) if set,
    /// else iommufd where the kernel has it and gives devices a cdev (6.6+), else type1. The
    /// unsafe no-IOMMU mode only when named.
    pub fn auto() -> Result<IommuKind> {
        match std::env::var("VFIOKIT_IOMMU").as_deref() {
            Ok("type1") => Ok(IommuKind::Type1),
            Ok("iommufd") => Ok(IommuKind::Iommufd),
            Ok("noiommu") => Ok(IommuKind::NoIommu),
            Ok(other) => Err(Error::invalid(format!(
                "VFIOKIT_IOMMU={other}: expected type1, iommufd or noiommu"
            ))),
            Err(_)
                if sysfs::exists(Path::new(super::IOMMUFD))
                    && sysfs::exists(Path::new("/dev/vfio/devices")) =>
            {
                Ok(IommuKind::Iommufd)
            }
            Err(_) => Ok(IommuKind::Type1),
        }
    }

    /// The kind an `IOMMU_*` code (the C API's and Python's integer) names; AUTO as
    /// [`auto`](Self::auto).
    pub fn from_code(code: u32) -> Result<IommuKind> {
        match code {
            IOMMU_TYPE1 => Ok(IommuKind::Type1),
            IOMMU_IOMMUFD => Ok(IommuKind::Iommufd),
            IOMMU_VFIO_USER => Ok(IommuKind::VfioUser),
            IOMMU_TYPE1V1 => Ok(IommuKind::Type1V1),
            IOMMU_IOMMUFD_COMPAT => Ok(IommuKind::IommufdCompat),
            IOMMU_IOMMUFD_COMPAT_V1 => Ok(IommuKind::IommufdCompatV1),
            IOMMU_NOIOMMU => Ok(IommuKind::NoIommu),
            IOMMU_AUTO => IommuKind::auto(),
            other => Err(Error::invalid(format!(
                "unknown IOMMU kind {other} (expected 0 auto, 1 type1, 2 iommufd, 3 vfio-user, 4 type1 v1, \
                 5 iommufd compat, 6 iommufd compat v1, 7 no-IOMMU)"
            ))),
        }
    }
}
