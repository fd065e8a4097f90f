//! vfiokit: userspace drivers for VFIO devices, with fixed-size records and fixed-offset
//! regions in front of everything the kernel reports.
//!
//! Layers, each using only those above it: `sys` (the only code that makes system calls);
//! `caps`, `region`, `irq`, `pci`, `iova`, `dmamap` (pure decoding and bookkeeping); `host`
//! (sysfs discovery and binding); `iommu` (DMA contexts); `device`; `capi` (the C ABI).

mod capi;
mod caps;
mod device;
pub mod dmamap;
mod error;
#[cfg(test)]
mod fixtures;
mod host;
mod iommu;
pub mod iova;
pub mod irq;
pub mod pci;
pub mod region;
mod sys;

pub use caps::DecodeError;
pub use device::{Device, FEATURE_GET, FEATURE_PROBE, FEATURE_SET, Width};
pub use dmamap::{DmaMap, DmaMapping};
pub use error::{Error, Result};
pub use host::{bind, unbind};
pub use iommu::{
    DMA_HUGE_1G, DMA_HUGE_2M, DMA_READONLY, IOMMU_AUTO, IOMMU_IOMMUFD, IOMMU_TYPE1, Iommu,
    IommuKind,
};
pub use iova::{IovaRange, IovaSpace};
pub use irq::Irq;
pub use pci::DeviceInfo;
pub use region::{Area, Region};

/// The C ABI's version: bumped (with the soname) on any incompatible change.
pub const ABI_VERSION: u32 = 1;
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
