//! The same operations through rust-vmm's `vfio-ioctls` (type1 and iommufd) and `pci-driver`
//! (type1 only: it has no iommufd backend).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use pci_driver::backends::vfio::{VfioContainer as PdContainer, VfioPciDevice};
use pci_driver::device::PciDevice;
use pci_driver::regions::{PciRegion, Permissions};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};

use crate::raw::Backend;

pub fn sysfs(address: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(address)
}

/// vfio-ioctls: a context with one device in it.
pub enum VmmCtx {
    Type1 { device: VfioDevice, container: Arc<VfioContainer> },
    Iommufd { device: VfioDevice, ctx: Arc<VfioIommufd> },
}

impl VmmCtx {
    pub fn open(backend: Backend, address: &str) -> VmmCtx {
        let path = sysfs(address);
        match backend {
            Backend::Type1 => {
                let container = Arc::new(VfioContainer::new(None).expect("vfio-ioctls: container"));
                let device = VfioDevice::new(&path, container.clone() as Arc<dyn VfioOps>, false)
                    .expect("vfio-ioctls: device");
                VmmCtx::Type1 { device, container }
            }
            Backend::Iommufd => {
                let iommufd = Arc::new(IommuFd::new().expect("vfio-ioctls: /dev/iommu"));
                let ctx =
                    Arc::new(VfioIommufd::new(iommufd, None, None).expect("vfio-ioctls: IOAS"));
                let device = VfioDevice::new(&path, ctx.clone() as Arc<dyn VfioOps>, true)
                    .expect("vfio-ioctls: device");
                VmmCtx::Iommufd { device, ctx }
            }
        }
    }

    pub fn device(&self) -> &VfioDevice {
        match self {
            VmmCtx::Type1 { device, .. } | VmmCtx::Iommufd { device, .. } => device,
        }
    }

    /// # Safety
    /// As for the crate's `vfio_dma_map`.
    pub unsafe fn map(&self, vaddr: *mut u8, len: usize, iova: u64) {
        // SAFETY: forwarded.
        match self {
            VmmCtx::Type1 { container, .. } => unsafe { container.vfio_dma_map(iova, len, vaddr) },
            VmmCtx::Iommufd { ctx, .. } => unsafe { ctx.vfio_dma_map(iova, len, vaddr) },
        }
        .expect("vfio-ioctls: DMA map")
    }

    pub fn unmap(&self, iova: u64, len: usize) {
        match self {
            VmmCtx::Type1 { container, .. } => container.vfio_dma_unmap(iova, len),
            VmmCtx::Iommufd { ctx, .. } => ctx.vfio_dma_unmap(iova, len),
        }
        .expect("vfio-ioctls: DMA unmap")
    }
}

/// vfio-ioctls: open, enumerate (what VfioDevice::new reads), read the records, close.
/// Returns BAR0's size and the number of MSI vectors, for the caller to check.
#[inline(never)]
pub fn vmm_open_enumerate_close(backend: Backend, address: &str) -> (u64, u32) {
    let ctx = VmmCtx::open(backend, address);
    let dev = ctx.device();
    let bar0 = dev.get_region_size(0);
    let msi = dev.get_irq_info(1).map(|i| i.count).unwrap_or(0);
    // Drop the device before its context (the type1 group is put on the device's drop).
    drop(ctx);
    (bar0, msi)
}

/// pci-driver: a type1 container with one device.
pub struct PdCtx {
    pub device: VfioPciDevice,
}

impl PdCtx {
    pub fn open(address: &str) -> PdCtx {
        let path = sysfs(address);
        let group = crate::raw::group_of(address);
        let container = Arc::new(PdContainer::new(&[group]).expect("pci-driver: container"));
        let device =
            VfioPciDevice::open_in_container(&path, container).expect("pci-driver: device");
        PdCtx { device }
    }

    /// # Safety
    /// As for the crate's `PciIommu::map`.
    pub unsafe fn map(&self, vaddr: *mut u8, len: usize, iova: u64) {
        // SAFETY: forwarded.
        unsafe { self.device.iommu().map(iova, len, vaddr, Permissions::ReadWrite) }
            .expect("pci-driver: DMA map")
    }

    pub fn unmap(&self, iova: u64, len: usize) {
        self.device.iommu().unmap(iova, len).expect("pci-driver: DMA unmap")
    }
}

/// pci-driver: VfioPciDevice::open (group lookup, container, device, BARs, config), close.
/// Returns BAR0's size.
#[inline(never)]
pub fn pd_open_enumerate_close(address: &str) -> u64 {
    let dev = VfioPciDevice::open(sysfs(address)).expect("pci-driver: open");
    let bar0 = dev.bar(0).map(|b| b.len()).unwrap_or(0);
    let _ = dev.interrupts();
    bar0
}
