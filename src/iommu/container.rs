//! The legacy container and its groups (/dev/vfio/vfio, or /dev/iommu used as one): the type1
//! backend in its four kinds (type1 v2 and v1, iommufd's compatibility container v2 and v1),
//! and the groups a no-IOMMU container shares with them.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::backend::{
    Backend, Export, Hook, all_or_none, map_error, open_container, open_node, unmap_what,
};
use super::ledger::Record;
use super::{IOMMUFD, IommuKind, lock};
use crate::error::{Error, Result};
use crate::handoff::Handoff;
use crate::host::{self, PciDevice};
use crate::iova::{self, IovaRange};
use crate::sys::{self, Context, sysfs, vfio};

pub(crate) const CONTAINER: &str = "/dev/vfio/vfio";
const TYPE1V2: u32 = 3;
const TYPE1: u32 = 1;
const NOIOMMU: u32 = vfio_bindings::bindings::vfio::VFIO_NOIOMMU_IOMMU;

/// A container and the groups attached to it, kept until the context closes so that DMA
/// mappings outlive any one device. Ordered: a context has few groups, and a short tree walk
/// costs an open less than hashing.
pub(crate) struct Container {
    fd: OwnedFd,
    kind: IommuKind,
    groups: Mutex<BTreeMap<u32, OwnedFd>>,
}

impl Container {
    /// Opens the container node of `kind` (a type1 kind, or no-IOMMU).
    pub fn open(kind: IommuKind) -> Result<Container> {
        let fd = match kind.is_iommufd() {
            true => open_container(
                IOMMUFD,
                "the compatibility container is iommufd's: is the kernel built with CONFIG_IOMMUFD?",
            )?,
            false => open_container(CONTAINER, "is the vfio module loaded?")?,
        };
        Ok(Container { fd, kind, groups: Mutex::new(BTreeMap::new()) })
    }

    /// A container handed over with the groups in it (checked by the caller).
    pub fn adopted(fd: OwnedFd, kind: IommuKind, groups: BTreeMap<u32, OwnedFd>) -> Container {
        Container { fd, kind, groups: Mutex::new(groups) }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn has_groups(&self) -> bool {
        !lock(&self.groups).is_empty()
    }

    /// Attaches `group` unless it is already; the first one sets the IOMMU driver, and then
    /// `first` runs (before any other group can attach). On failure the group fd closes,
    /// leaving the container as it was.
    fn join(&self, group: u32, first: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut groups = lock(&self.groups);
        if groups.contains_key(&group) {
            return Ok(());
        }
        let fd = self.attach_group(group, groups.is_empty())?;
        if groups.is_empty() {
            first()?;
        }
        groups.insert(group, fd);
        Ok(())
    }

    /// The VFIO device fd of `dev`, from its group (attached first if it is not yet).
    pub fn device_fd(
        &self,
        dev: &PciDevice,
        token: Option<&crate::sriov::VfToken>,
        first: impl FnOnce() -> Result<()>,
    ) -> Result<OwnedFd> {
        let group = dev.iommu_group()?;
        self.join(group, first)?;
        let groups = lock(&self.groups);
        // A VF's token goes in the name: "ADDR vf_token=UUID".
        let name = crate::sriov::group_device_name(&dev.address, token);
        vfio::group_device_fd(groups[&group].as_fd(), &name)
            .context(|| format!("getting the VFIO device fd of {} from group {group}", dev.address))
    }

    /// A hot reset with the fds of `groups`, each of which must be in this container.
    pub fn hot_reset(&self, device: BorrowedFd, groups: &[u32]) -> Result<()> {
        let held = lock(&self.groups);
        let fds = groups
            .iter()
            .map(|g| {
                held.get(g).map(|fd| fd.as_raw_fd()).ok_or_else(|| {
                    Error::new(libc::EPERM, format!("group {g} is not in this context's container"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        vfio::hot_reset(device, &fds).context(|| "VFIO_DEVICE_PCI_HOT_RESET")
    }

    /// Adds a group to the container; the `first` one also sets the IOMMU driver.
    fn attach_group(&self, group: u32, first: bool) -> Result<OwnedFd> {
        let noiommu = self.kind == IommuKind::NoIommu;
        let node = host::group_node(group, noiommu);
        let fd = open_node(&node, "no such group node: is the device bound to vfio-pci?").map_err(
            |e| match e.errno() {
                libc::ENOENT => wrong_group_kind(group, noiommu).unwrap_or(e),
                _ => e,
            },
        )?;
        const VIABLE: u32 = vfio_bindings::bindings::vfio::VFIO_GROUP_FLAGS_VIABLE;
        if vfio::group_flags(fd.as_fd()).context(|| format!("status of group {group}"))? & VIABLE
            == 0
        {
            return Err(host::not_viable(group));
        }
        vfio::group_set_container(fd.as_fd(), self.fd())
            .context(|| format!("adding group {group} to the container"))?;
        if first && noiommu {
            vfio::set_iommu(self.fd(), NOIOMMU)
                .context(|| "setting the no-IOMMU driver on the container")?;
        } else if first {
            let v1 = matches!(self.kind, IommuKind::Type1V1 | IommuKind::IommufdCompatV1);
            let driver = if !v1 && vfio::check_extension(self.fd(), TYPE1V2).unwrap_or(false) {
                TYPE1V2
            } else {
                TYPE1
            };
            vfio::set_iommu(self.fd(), driver).map_err(|sys::Errno(e)| {
                let hint = if e == libc::EPERM {
                    " (no interrupt remapping? the IOMMU must support it)"
                } else {
                    ""
                };
                Error::os(e, format!("setting the type1 IOMMU on the container{hint}"))
            })?;
        }
        Ok(fd)
    }
}

/// Where a group's node is missing, whether the group is of the other kind (behind an IOMMU or
/// not): then the error says which context its devices need.
fn wrong_group_kind(group: u32, noiommu: bool) -> Option<Error> {
    let other = host::group_node(group, !noiommu);
    sysfs::exists(Path::new(&other)).then(|| {
        Error::new(
            libc::EINVAL,
            match noiommu {
                true => format!(
                    "group {group} is behind an IOMMU ({other}): open its devices in a type1 or iommufd \
                     context; no-IOMMU contexts are for devices without one"
                ),
                false => format!(
                    "group {group} has no IOMMU ({other}, VFIO's unsafe no-IOMMU mode): open its devices \
                     in a no-IOMMU context (VFIOKIT_IOMMU=noiommu), where they can DMA anywhere in memory"
                ),
            },
        )
    })
}

/// A map made before the container's first group: the kernel takes it at attach.
struct EarlyMap {
    vaddr: usize,
    len: usize,
    iova: u64,
    writable: bool,
}

/// The type1 backend (any container kind but no-IOMMU).
pub(crate) struct Type1 {
    container: Container,
    /// The first group is in: maps go straight to the kernel.
    attached: AtomicBool,
    /// Before the first group: the maps the kernel has not been given yet (None after).
    early: Mutex<Option<Vec<EarlyMap>>>,
}

impl Type1 {
    pub fn new(container: Container) -> Type1 {
        let attached = container.has_groups();
        let early = (!attached).then(Vec::new);
        Type1 { container, attached: AtomicBool::new(attached), early: Mutex::new(early) }
    }

    /// The maps made before the first group, when it has just attached: checked against the
    /// valid ranges the kernel now reports, then given to it (all or none).
    fn replay_early_maps(&self) -> Result<()> {
        let mut early = lock(&self.early);
        let maps = early.as_deref().unwrap_or_default();
        if !maps.is_empty() {
            let ranges = type1_ranges(self.container.fd())?;
            for m in maps {
                let last = m.iova + (m.len as u64 - 1);
                if !ranges.iter().any(|r| r.start <= m.iova && last <= r.last) {
                    return Err(Error::invalid(format!(
                        "the DMA map of {:#x} bytes at IOVA {:#x}, made before any device, is outside the IOVA \
                         ranges of this IOMMU: {}",
                        m.len,
                        m.iova,
                        ranges
                            .iter()
                            .map(|r| format!("[{:#x}, {:#x}]", r.start, r.last))
                            .collect::<Vec<_>>()
                            .join(" ")
                    )));
                }
            }
            for (i, m) in maps.iter().enumerate() {
                // SAFETY: the caller of the map that recorded this took on its memory contract.
                let done = unsafe {
                    vfio::dma_map(
                        self.container.fd(),
                        m.vaddr as u64,
                        m.len as u64,
                        m.iova,
                        m.writable,
                    )
                };
                if let Err(sys::Errno(e)) = done {
                    for undo in &maps[..i] {
                        let _ =
                            vfio::dma_unmap(self.container.fd(), undo.iova, undo.len as u64, false);
                    }
                    return Err(map_error(e, m.len, m.iova, ""));
                }
            }
        }
        *early = None;
        self.attached.store(true, Ordering::Release);
        Ok(())
    }

    /// Records a map in the early list while there is one; false once the first group is in.
    fn defer(&self, m: &Record) -> bool {
        if self.attached.load(Ordering::Acquire) {
            return false;
        }
        let mut early = lock(&self.early);
        let Some(list) = early.as_mut() else { return false };
        list.push(EarlyMap {
            vaddr: m.vaddr,
            len: m.len,
            iova: m.iova,
            writable: m.facts.writable,
        });
        true
    }

    /// Forgets a map from the early list while there is one; false once the first group is in.
    fn undefer(&self, m: &Record) -> bool {
        if self.attached.load(Ordering::Acquire) {
            return false;
        }
        let mut early = lock(&self.early);
        let Some(list) = early.as_mut() else { return false };
        list.retain(|e| e.iova != m.iova);
        true
    }
}

/// The two halves of a live handover's request for one mapping.
impl Type1 {
    fn unmap_vaddr(&self, m: &Record) -> sys::SysResult<()> {
        vfio::dma_unmap_vaddr(self.container.fd(), m.iova, m.len as u64)
    }

    fn map_vaddr(&self, m: &Record) -> sys::SysResult<()> {
        // SAFETY: a handover's records are of its pooled buffers, whose mappings in this
        // process are of the very pages the IOMMU mapping pinned, kept until they are freed.
        unsafe { vfio::dma_map_vaddr(self.container.fd(), m.vaddr as u64, m.len as u64, m.iova) }
    }
}

impl Backend for Type1 {
    fn kind(&self) -> IommuKind {
        self.container.kind
    }

    fn fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.container.fd())
    }

    /// Type1 said EINVAL up to Linux 6.12 and says EOVERFLOW on 7.3: ask the kernel, with an
    /// unmap of two pages across 2^64, which changes nothing (only on this error path).
    fn wraps_errno(&self) -> i32 {
        let page = sys::page_size() as u64;
        match self.attached.load(Ordering::Acquire) {
            true => vfio::dma_unmap(self.container.fd(), 0u64.wrapping_sub(page), 2 * page, false)
                .err()
                .map_or(self.kind().wraps_errno(), |sys::Errno(e)| e),
            false => self.kind().wraps_errno(),
        }
    }

    fn ranges(&self) -> Result<Option<Vec<IovaRange>>> {
        // A type1 container reports its ranges once a group is in it.
        match self.attached.load(Ordering::Acquire) {
            true => type1_ranges(self.container.fd()).map(Some),
            false => Ok(None),
        }
    }

    unsafe fn map(&self, m: &Record, commit: Hook) -> Result<()> {
        if !self.defer(m) {
            // SAFETY: forwarded from the caller.
            unsafe {
                vfio::dma_map(
                    self.container.fd(),
                    m.vaddr as u64,
                    m.len as u64,
                    m.iova,
                    m.facts.writable,
                )
            }
            .map_err(|sys::Errno(e)| {
                // The compatibility container is iommufd's, which pins pages.
                let hint = if self.kind().is_iommufd() { super::iommufd::map_hint(e) } else { "" };
                map_error(e, m.len, m.iova, hint)
            })?;
        }
        commit()
    }

    fn unmap(&self, m: &Record, retire: Hook) -> Result<()> {
        if !self.undefer(m) {
            vfio::dma_unmap(self.container.fd(), m.iova, m.len as u64, false)
                .context(|| unmap_what(m))?;
        }
        retire()
    }

    fn check_hand_over(&self) -> Result<()> {
        if !self.attached.load(Ordering::Acquire) {
            return Err(Error::invalid(
                "no device is open in this context: a live handover hands over devices and their DMA",
            ));
        }
        const UPDATE_VADDR: u32 = vfio_bindings::bindings::vfio::VFIO_UPDATE_VADDR;
        if vfio::check_extension(self.container.fd(), UPDATE_VADDR).unwrap_or(false) {
            return Ok(());
        }
        let why = match self.kind().is_iommufd() {
            true => "iommufd's compatibility container lacks it: hand over a type1 container's",
            false => "this kernel's type1 IOMMU lacks it (Linux 5.12 added it)",
        };
        Err(Error::new(
            libc::ENOTSUP,
            format!("a live handover needs VFIO_UPDATE_VADDR to keep the DMA mappings: {why}"),
        ))
    }

    fn release_maps(&self, maps: &[Record]) -> Result<()> {
        let what = "letting go of the address (VFIO_DMA_UNMAP_FLAG_VADDR) of";
        all_or_none(maps, |m| self.unmap_vaddr(m), |m| self.map_vaddr(m), what)
    }

    fn claim_maps(&self, maps: &[Record]) -> Result<()> {
        let what = "giving this process's address (VFIO_DMA_MAP_FLAG_VADDR) to";
        all_or_none(maps, |m| self.map_vaddr(m), |m| self.unmap_vaddr(m), what)
    }

    fn done_at_retire(&self) -> bool {
        true
    }

    fn open_device(
        &self,
        dev: &PciDevice,
        token: Option<&crate::sriov::VfToken>,
    ) -> Result<OwnedFd> {
        self.container.device_fd(dev, token, || self.replay_early_maps())
    }

    fn hot_reset(&self, device: BorrowedFd, groups: &[u32]) -> Result<()> {
        self.container.hot_reset(device, groups)
    }

    fn export(&self, devices: &[PciDevice]) -> Result<Export> {
        for pci in devices {
            self.container.join(pci.iommu_group()?, || self.replay_early_maps())?;
        }
        let held = lock(&self.container.groups);
        let groups: Vec<u32> = held.keys().copied().collect();
        let fds = std::iter::once(self.container.fd.as_raw_fd())
            .chain(held.values().map(|fd| fd.as_raw_fd()))
            .collect();
        let message = Handoff { kind: self.kind().code(), ioas: 0, groups, devices: Vec::new() };
        Ok(Export { message, fds, _opened: Vec::new() })
    }
}

/// The valid IOVA ranges from the type1 info's capability chain; without one (older kernels),
/// the whole 64-bit space.
fn type1_ranges(container: BorrowedFd) -> Result<Vec<IovaRange>> {
    let mut buf = Vec::new();
    let reply = vfio::iommu_info(container, &mut buf).context(|| "VFIO_IOMMU_GET_INFO")?;
    iova::decode_type1_ranges(reply)
        .map_err(|e| Error::new(libc::EPROTO, format!("type1 IOMMU info: {e}")))
}
