//! iommufd: an IOAS on /dev/iommu, which devices opened through their VFIO cdev attach to.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, OnceLock};

use super::backend::{Backend, Export, Hook, map_error, open_node, unmap_what};
use super::ledger::Record;
use super::{IOMMUFD, IommuKind, lock};
use crate::error::{Error, Result};
use crate::handoff::Handoff;
use crate::host::{self, PciDevice};
use crate::iova::IovaRange;
use crate::sys::{self, Context, iommufd, vfio};

pub(crate) struct Iommufd {
    fd: OwnedFd,
    ioas: u32,
    /// An adopted context: the device cdevs handed over with it, by PCI address, each taken by
    /// the device's first open.
    adopted: Mutex<HashMap<String, OwnedFd>>,
    /// Whether the kernel has IOMMU_IOAS_MAP_FILE (Linux 6.13+), asked once.
    map_file: OnceLock<bool>,
}

impl Iommufd {
    pub fn open() -> Result<Iommufd> {
        let fd = open_node(IOMMUFD, "is the kernel built with CONFIG_IOMMUFD?")?;
        let ioas = iommufd::ioas_alloc(fd.as_fd()).context(|| "allocating an IOAS")?;
        Ok(Iommufd::adopted(fd, ioas, HashMap::new()))
    }

    /// A context handed over: its fd, IOAS and device cdevs (see [`Iommufd::ranges`] for the
    /// check that the fd holds that IOAS).
    pub fn adopted(fd: OwnedFd, ioas: u32, cdevs: HashMap<String, OwnedFd>) -> Iommufd {
        Iommufd { fd, ioas, adopted: Mutex::new(cdevs), map_file: OnceLock::new() }
    }

    /// Whether the kernel maps files (IOMMU_IOAS_MAP_FILE): one with the ioctl refuses a bad
    /// fd, one without it the command.
    fn has_map_file(&self) -> bool {
        *self.map_file.get_or_init(|| {
            iommufd::ioas_map_file(self.fd.as_fd(), self.ioas, -1, 0, 0, 0, false)
                != Err(sys::Errno(libc::ENOTTY))
        })
    }

    /// Peer-to-peer: maps the part of another device's region that `m` is a mapping of, by
    /// the dma-buf vfio-pci exports of it, through IOMMU_IOAS_MAP_FILE. EFAULT when `m` is no
    /// kernel device's region; the kernel's refusal, explained, when it exports no dma-buf.
    fn map_peer_region(&self, m: &Record) -> Result<sys::SysResult<()>> {
        let Some((device, region, offset)) = crate::device::region_at(m.vaddr, m.len) else {
            return Ok(Err(sys::Errno(libc::EFAULT)));
        };
        let buf = vfio::region_dma_buf(device.as_fd(), region, offset, m.len as u64).map_err(
            |sys::Errno(e)| {
                Error::new(
                    libc::EFAULT,
                    format!(
                        "DMA map of {:#x} bytes at IOVA {:#x}: peer-to-peer DMA to region {region} of another device \
                         needs, on iommufd, a kernel whose vfio-pci exports it as a dma-buf \
                         (VFIO_DEVICE_FEATURE_DMA_BUF, built with CONFIG_PCI_P2PDMA; this kernel, {}, says: {}); \
                         a type1 context maps BARs by address",
                        m.len,
                        m.iova,
                        sys::kernel_release(),
                        std::io::Error::from_raw_os_error(e)
                    ),
                )
            },
        )?;
        let file = buf.as_raw_fd();
        Ok(iommufd::ioas_map_file(
            self.fd.as_fd(),
            self.ioas,
            file,
            0,
            m.len as u64,
            m.iova,
            m.facts.writable,
        ))
    }

    pub fn valid_ranges(&self) -> Result<Vec<IovaRange>> {
        let ranges = iommufd::ioas_iova_ranges(self.fd.as_fd(), self.ioas)
            .context(|| format!("IOVA ranges of IOAS {}", self.ioas))?;
        Ok(ranges.into_iter().map(|(start, last)| IovaRange { start, last }).collect())
    }
}

impl Backend for Iommufd {
    fn kind(&self) -> IommuKind {
        IommuKind::Iommufd
    }

    /// Live handover on iommufd: the handed-over buffers are mapped by their file
    /// (IOMMU_IOAS_MAP_FILE), so the IOAS keeps them whatever address space maps them, and the
    /// receiver takes the pinned pages' accounting with IOMMU_IOAS_CHANGE_PROCESS (both Linux
    /// 6.13).
    fn check_hand_over(&self) -> Result<()> {
        if self.has_map_file() {
            return Ok(());
        }
        Err(Error::new(
            libc::EOPNOTSUPP,
            format!(
                "an iommufd context is handed over live by IOMMU_IOAS_MAP_FILE and IOMMU_IOAS_CHANGE_PROCESS \
                 (Linux 6.13 or later; this kernel is {}): hand over a type1 context here (VFIOKIT_IOMMU_TYPE1)",
                sys::kernel_release()
            ),
        ))
    }

    /// Nothing to let go: the IOAS maps the buffers' files, not this process's addresses.
    fn release_maps(&self, maps: &[Record]) -> Result<()> {
        self.check_hand_over()?;
        match maps.iter().find(|m| m.facts.fd.is_none()) {
            None => Ok(()),
            Some(m) => Err(Error::new(
                libc::EBUSY,
                format!(
                    "the DMA mapping at IOVA {:#x} is not of a file: it cannot be handed over live",
                    m.iova
                ),
            )),
        }
    }

    /// The mappings are this process's once their pinned pages are charged to it.
    fn claim_maps(&self, _maps: &[Record]) -> Result<()> {
        iommufd::ioas_change_process(self.fd.as_fd())
            .context(|| "taking over the iommufd's pinned DMA memory (IOMMU_IOAS_CHANGE_PROCESS)")
    }

    fn fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.fd.as_fd())
    }

    fn ioas(&self) -> Option<u32> {
        Some(self.ioas)
    }

    fn ranges(&self) -> Result<Option<Vec<IovaRange>>> {
        self.valid_ranges().map(Some)
    }

    fn buffers_by_fd(&self) -> bool {
        self.has_map_file()
    }

    fn check_map_file(&self) -> Result<()> {
        match self.has_map_file() {
            true => Ok(()),
            false => Err(Error::new(
                libc::EOPNOTSUPP,
                format!(
                    "mapping a file for DMA on iommufd needs IOMMU_IOAS_MAP_FILE (Linux 6.13+; this kernel is {}); \
                     a type1 context maps the file by its address",
                    sys::kernel_release()
                ),
            )),
        }
    }

    unsafe fn map(&self, m: &Record, commit: Hook) -> Result<()> {
        let (fd, len) = (self.fd.as_fd(), m.len as u64);
        let mapped = match &m.facts.fd {
            // Memory with a file behind it is mapped by the file where the kernel can.
            Some(file) if self.has_map_file() => iommufd::ioas_map_file(
                fd,
                self.ioas,
                file.as_raw_fd(),
                m.facts.offset,
                len,
                m.iova,
                m.facts.writable,
            ),
            // SAFETY: forwarded from the caller.
            _ => match unsafe {
                iommufd::ioas_map(fd, self.ioas, m.vaddr as u64, len, m.iova, m.facts.writable)
            } {
                // Not memory with struct pages: another device's BAR, if one is mapped there.
                Err(sys::Errno(libc::EFAULT)) => self.map_peer_region(m)?,
                other => other,
            },
        };
        mapped.map_err(|sys::Errno(e)| map_error(e, m.len, m.iova, map_hint(e)))?;
        commit()
    }

    fn unmap(&self, m: &Record, retire: Hook) -> Result<()> {
        iommufd::ioas_unmap(self.fd.as_fd(), self.ioas, m.iova, m.len as u64)
            .context(|| unmap_what(m))?;
        retire()
    }

    fn done_at_retire(&self) -> bool {
        true
    }

    fn open_device(
        &self,
        dev: &PciDevice,
        token: Option<&crate::sriov::VfToken>,
    ) -> Result<OwnedFd> {
        // An adopted context's devices come with their cdevs: the process that adopted it may
        // not be allowed to open the nodes.
        let adopted = lock(&self.adopted).remove(&dev.address);
        let (device, cdev) = match adopted {
            Some(fd) => (fd, format!("the cdev handed over for {}", dev.address)),
            None => {
                // Whether the node is there is checked only if it cannot be opened. Linux 7.3
                // gives no-IOMMU devices a cdev too ("noiommu-vfio0"), which binds, but their
                // DMA sees physical addresses, not this context's IOVAs: cdev() refuses them.
                let cdev = match dev.cdev_unchecked() {
                    Some(cdev) if !cdev.contains("/noiommu-") => cdev,
                    _ => dev.cdev()?,
                };
                let fd = open_node(&cdev, "").map_err(|e| dev.cdev().err().unwrap_or(e))?;
                (fd, cdev)
            }
        };
        iommufd::bind(device.as_fd(), self.fd.as_fd(), token.map(|t| &t.0)).map_err(|sys::Errno(e)| match e {
            // Before Linux 6.17 the bind has no flags: the token's is refused as unknown.
            libc::EINVAL if token.is_some() && !sys::kernel_at_least(6, 17) => Error::new(
                libc::EOPNOTSUPP,
                format!(
                    "opening {cdev} ({}) with a VF token: the cdev takes one with VFIO_DEVICE_BIND_FLAG_TOKEN, \
                     Linux 6.17+ (this kernel is {}); open it in a type1 context (VFIOKIT_IOMMU=type1), whose \
                     group takes the token in the device's name",
                    dev.address,
                    sys::kernel_release()
                ),
            ),
            _ if dev.iommu_group().is_ok_and(|g| !host::group_blockers(g).is_empty()) => {
                host::not_viable(dev.iommu_group().unwrap_or_default())
            }
            // Another device of the group belongs to another iommufd (the kernel says EPERM:
            // the group's DMA has another owner).
            libc::EPERM => Error::new(
                libc::EBUSY,
                format!(
                    "binding {cdev} ({}) to iommufd: its IOMMU group is in use by another IOMMU context or process",
                    dev.address
                ),
            ),
            // The kernel's answer when another open of the cdev is bound already; our
            // arguments are otherwise always valid.
            libc::EINVAL | libc::EBUSY => Error::new(
                libc::EBUSY,
                format!(
                    "binding {cdev} ({}) to iommufd: the device is already bound (open in another IOMMU context or process)",
                    dev.address
                ),
            ),
            _ => Error::os(e, format!("binding {cdev} ({}) to iommufd", dev.address)),
        })?;
        iommufd::attach(device.as_fd(), self.ioas)
            .context(|| format!("attaching {cdev} ({}) to IOAS {}", dev.address, self.ioas))?;
        Ok(device)
    }

    fn hot_reset(&self, device: BorrowedFd, _groups: &[u32]) -> Result<()> {
        // The zero-length form: the kernel checks that this iommufd owns every affected device.
        vfio::hot_reset(device, &[]).context(|| "VFIO_DEVICE_PCI_HOT_RESET")
    }

    fn export(&self, devices: &[PciDevice]) -> Result<Export> {
        let opened =
            devices.iter().map(|pci| open_node(&pci.cdev()?, "")).collect::<Result<Vec<_>>>()?;
        let fds = std::iter::once(self.fd.as_raw_fd())
            .chain(opened.iter().map(|fd| fd.as_raw_fd()))
            .collect();
        let message = Handoff {
            kind: self.kind().code(),
            ioas: self.ioas,
            groups: Vec::new(),
            devices: devices.iter().map(|pci| pci.address.clone()).collect(),
        };
        Ok(Export { message, fds, _opened: opened })
    }
}

/// iommufd pins pages; a BAR mapping (VM_PFNMAP) has none, where type1 follows its PFNs.
pub(crate) fn map_hint(e: i32) -> &'static str {
    match e {
        libc::EFAULT => {
            " (iommufd maps ordinary process memory, and another device's BAR mapped through \
             vfiokit by its dma-buf: not an unmapped address)"
        }
        _ => "",
    }
}
