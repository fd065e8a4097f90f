//! Handing a context to another process over a UNIX socket (the message: crate::handoff).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::backend::protocol;
use super::container::{Container, Type1};
use super::iommufd::Iommufd;
use super::{IOMMU_AUTO, Iommu, IommuKind};
use crate::error::{Error, Result};
use crate::handoff::{self, Handoff};
use crate::host::PciDevice;
use crate::sys::{Context, socket, vfio};

impl Iommu {
    /// Hands this context, and access to the named devices (bound to vfio-pci), to the process
    /// at the other end of the UNIX socket `sock`, which rebuilds it with
    /// [`adopt`](Self::adopt): how a privileged helper opens what an unprivileged driver then
    /// uses. The fds go over SCM_RIGHTS: the container and the devices' groups (type1, which
    /// this attaches), or /dev/iommu and the devices' cdevs (iommufd). Only before any DMA
    /// mapping: a mapping's memory is this process's. Afterwards the context is the receiver's
    /// to map in; this process should close its handle.
    pub fn export(&self, devices: &[&str], sock: BorrowedFd) -> Result<()> {
        if devices.len() > handoff::MAX_ITEMS {
            return Err(Error::invalid(format!(
                "{} devices to hand over ({} at most)",
                devices.len(),
                handoff::MAX_ITEMS
            )));
        }
        let pcis = devices
            .iter()
            .map(|name| {
                let pci = PciDevice::find(name)?;
                pci.require_vfio_driver()?;
                Ok(pci)
            })
            .collect::<Result<Vec<_>>>()?;
        // Held across the export: no mapping can be made meanwhile.
        let state = self.state();
        if !state.ledger.is_empty() {
            return Err(Error::new(
                libc::EBUSY,
                "the context has DMA mappings: hand it over before mapping (their memory is this process's)",
            ));
        }
        let export = self.0.backend.export(&pcis)?;
        drop(state);
        socket::send_with_fds(sock, &export.message.encode(), &export.fds).context(|| {
            format!("handing the context to another process over fd {}", sock.as_raw_fd())
        })
    }

    /// The context another process handed over with [`export`](Self::export) on the UNIX
    /// socket `sock`; devices it named open with [`Device::open`](crate::Device::open) in it,
    /// without the privileges opening their nodes needs. A malformed message, or fds that are
    /// not what it says, is EPROTO, with every fd received closed.
    pub fn adopt(sock: BorrowedFd) -> Result<Iommu> {
        let what = || format!("receiving a handed-over context on fd {}", sock.as_raw_fd());
        let mut bytes = vec![0u8; handoff::HEADER_LEN];
        let mut fds =
            socket::recv_exact_with_fds(sock, &mut bytes, handoff::MAX_FDS).context(what)?;
        let len = Handoff::len_from_header(&bytes).map_err(|e| protocol(e.to_string()))?;
        bytes.resize(len, 0);
        fds.extend(
            socket::recv_exact_with_fds(sock, &mut bytes[handoff::HEADER_LEN..], handoff::MAX_FDS)
                .context(what)?,
        );
        let message = Handoff::decode(&bytes).map_err(|e| protocol(e.to_string()))?;
        if fds.len() != message.fds() {
            return Err(protocol(format!(
                "{} fds came with a message listing {}",
                fds.len(),
                message.fds()
            )));
        }
        let mut fds = fds.into_iter();
        let context = fds.next().expect("counted above");
        let kind = match IommuKind::from_code(message.kind) {
            Ok(kind)
                if message.kind != IOMMU_AUTO
                    && !matches!(kind, IommuKind::VfioUser | IommuKind::NoIommu) =>
            {
                kind
            }
            _ => {
                return Err(protocol(format!(
                    "context kind {} cannot be handed over",
                    message.kind
                )));
            }
        };
        if kind.is_container() {
            if !message.devices.is_empty() {
                return Err(protocol("device cdevs came with a type1 context".into()));
            }
            let groups: BTreeMap<u32, OwnedFd> = message.groups.iter().copied().zip(fds).collect();
            let backend = Type1::new(adopted_container(context, kind, groups)?);
            return Ok(Iommu::with(Box::new(backend), None));
        }
        if !message.groups.is_empty() {
            return Err(protocol("group fds came with an iommufd context".into()));
        }
        let cdevs: HashMap<String, OwnedFd> = message.devices.into_iter().zip(fds).collect();
        let backend = Iommufd::adopted(context, message.ioas, cdevs);
        // Read now, to check that the fd is an iommufd holding that IOAS.
        let valid = backend.valid_ranges().map_err(|e| protocol(e.message().to_string()))?;
        Ok(Iommu::with(Box::new(backend), Some(valid)))
    }
}

/// A container handed over with its groups, each checked to be a group in a container.
pub(super) fn adopted_container(
    context: OwnedFd,
    kind: IommuKind,
    groups: BTreeMap<u32, OwnedFd>,
) -> Result<Container> {
    const CONTAINER_SET: u32 = vfio_bindings::bindings::vfio::VFIO_GROUP_FLAGS_CONTAINER_SET;
    for (group, fd) in &groups {
        if vfio::group_flags(fd.as_fd()).map_or(true, |f| f & CONTAINER_SET == 0) {
            return Err(protocol(format!("the fd of group {group} is not a group in a container")));
        }
    }
    Ok(Container::adopted(context, kind, groups))
}
