//! vfiokit: userspace drivers for VFIO devices, with fixed-size records and fixed-offset
//! regions in front of everything the kernel reports.
//!
//! Layers, each using only those above it: `sys` (the only code that makes system calls);
//! `caps`, `region`, `irq`, `pci`, `iova`, `dmamap` (pure decoding and bookkeeping); `host`
//! (sysfs discovery and binding); `vfio_user` (the vfio-user client, over `sys`); `iommu` (DMA
//! contexts: one file per backend behind one trait, the ledger, the heap); `device` (which
//! connects its own vfio-user transport: iommu never imports it); `capi` (the C ABI).

mod capi;
mod caps;
mod device;
pub mod dmamap;
mod doctor;
mod error;
#[cfg(test)]
mod fixtures;
mod handoff;
mod host;
mod iommu;
pub mod iova;
pub mod irq;
mod pagemap;
pub mod pci;
pub mod region;
pub mod sriov;
mod sys;
mod text;
mod vfio_user;

pub use caps::DecodeError;
pub use device::{
    Device, FEATURE_GET, FEATURE_PROBE, FEATURE_SET, HotResetDep, MapInfo, Register,
    VFIO_USER_PREFIX, Width,
};
pub use dmamap::{DmaMap, DmaMapping};
pub use doctor::{
    FINDING_GROUP_NOT_VIABLE, FINDING_IOMMU_OFF, FINDING_MEMLOCK_LOW, FINDING_NO_DEVICE,
    FINDING_NO_HUGEPAGES, FINDING_NO_IOMMUFD, FINDING_NO_RESET, FINDING_NODE_PERMISSION,
    FINDING_NOIOMMU_MODE, FINDING_NOT_BOUND, FINDING_SRIOV_OFF, FINDING_VF_TOKEN,
    FINDING_VFIO_PCI_MISSING, Finding, SEVERITY_BLOCKER, SEVERITY_INFO, SEVERITY_WARNING, doctor,
};
pub use error::{Error, Result};
pub use host::{bind, sriov_set_numvfs, unbind};
pub use iommu::{
    DMA_HUGE_1G, DMA_HUGE_2M, DMA_READONLY, DMA_SHAREABLE, HeapInfo, IOMMU_AUTO, IOMMU_IOMMUFD,
    IOMMU_IOMMUFD_COMPAT, IOMMU_IOMMUFD_COMPAT_V1, IOMMU_NOIOMMU, IOMMU_TYPE1, IOMMU_TYPE1V1,
    IOMMU_VFIO_USER, Iommu, IommuKind,
};
pub use iova::{IovaRange, IovaSpace};
pub use irq::Irq;
pub use pci::DeviceInfo;
pub use region::{Area, Region};

/// The vfio-user message decoders, for the fuzz targets: not API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod vfio_user_proto {
    pub use crate::vfio_user::inbox::{Inbox, Message, ReadError};
    pub use crate::vfio_user::proto::{
        Header, IoFds, decode_device_feature, decode_device_info, decode_dma_access,
        decode_irq_info, decode_region_io_fds, decode_region_read, decode_version,
        region_info_argsz,
    };
}

/// The handoff and live handover message decoders, for the fuzz targets: not API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use handoff::{Handoff, Handover};

/// The C ABI's version: bumped (with the soname) on any incompatible change.
pub const ABI_VERSION: u32 = 1;
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
