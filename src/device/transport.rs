//! The transport: what carries a device's requests, the kernel's VFIO device fd or a
//! vfio-user connection.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};

use crate::error::{Error, Result};
use crate::irq::{self};
use crate::region::{self, Region};
use crate::sys::{self, Context, vfio};
use crate::vfio_user::Client;

/// What carries a device's requests: the kernel's VFIO device fd, or a vfio-user connection
/// with the fds its server sent to mmap regions from (by region index).
pub(super) enum Io {
    Kernel(OwnedFd),
    /// `region_fds`: by region, the fds its areas are mapped from (see [`Io::mmap_source`]).
    User {
        client: Arc<Client>,
        region_fds: Vec<Vec<OwnedFd>>,
    },
}

impl Io {
    pub(super) fn device_info(&self, address: &str) -> Result<(u32, u32, u32)> {
        match self {
            Io::Kernel(fd) => vfio::device_info(fd.as_fd())
                .map(|i| (i.flags, i.num_regions, i.num_irqs))
                .context(|| format!("VFIO_DEVICE_GET_INFO on {address}")),
            Io::User { client, .. } => client.device_info(),
        }
    }

    /// Region `i`'s information; absent regions (EINVAL from vfio-pci or the server) are
    /// empty. Called for indices in order: a vfio-user region's mmap fd is kept by index.
    /// `scratch` holds the kernel's replies, reused from region to region.
    pub(super) fn region_info(
        &mut self,
        i: u32,
        address: &str,
        scratch: &mut Vec<u64>,
    ) -> Result<region::RegionInfo> {
        let decode = |reply: &[u8]| {
            region::decode_region_info(reply)
                .map_err(|e| Error::new(libc::EPROTO, format!("{address} region {i}: {e}")))
        };
        match self {
            Io::Kernel(fd) => match vfio::region_info(fd.as_fd(), i, scratch) {
                Ok(reply) => decode(reply),
                Err(sys::Errno(libc::EINVAL)) => Ok(Default::default()),
                Err(sys::Errno(e)) => {
                    Err(Error::os(e, format!("VFIO_DEVICE_GET_REGION_INFO {i} on {address}")))
                }
            },
            Io::User { client, region_fds } => {
                let answer = client.region_info(i);
                let (reply, fds) = match answer {
                    Err(e) if e.errno() == libc::EINVAL => (None, Vec::new()),
                    other => other.map(|(reply, fds)| (Some(reply), fds))?,
                };
                region_fds.push(fds);
                let mut info = reply.map_or_else(|| Ok(Default::default()), |r| decode(&r))?;
                // The spec's READ and WRITE say whether the client may read and write a
                // region. libvfio-user says neither for the config region it makes for every
                // device (vfu_pci_init sizes it and leaves its flags 0) and serves both (QEMU's
                // client never looks at the two flags there). vfio-pci always says both for
                // config space, so a config region with a size is taken as readable and
                // writable, as every PCI device's is.
                if i == region::PCI_CONFIG && info.size > 0 {
                    info.flags |= VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
                }
                Ok(info)
            }
        }
    }

    /// IRQ index `i`'s (flags, count); absent (EINVAL) ones have neither.
    pub(super) fn irq_info(&self, i: u32, address: &str) -> Result<(u32, u32)> {
        // vfio-pci answers EINVAL for ERR on a device that is not PCIe: none of them. Told
        // apart before an error (and its message) is made, as for regions: every open of
        // such a device gets it.
        match self {
            Io::Kernel(fd) => match vfio::irq_info(fd.as_fd(), i) {
                Err(sys::Errno(libc::EINVAL)) => Ok((0, 0)),
                other => other
                    .map(|ki| (ki.flags, ki.count))
                    .context(|| format!("VFIO_DEVICE_GET_IRQ_INFO {i} on {address}")),
            },
            Io::User { client, .. } => match client.irq_info(i) {
                Err(e) if e.errno() == libc::EINVAL => Ok((0, 0)),
                other => other,
            },
        }
    }

    /// The fd to mmap area `area` of region `r` from: the device fd, or what the server sent
    /// with the region's information (one fd for every area, or one per area).
    pub(super) fn mmap_source(&self, r: &Region, area: usize) -> Option<BorrowedFd<'_>> {
        match self {
            Io::Kernel(fd) => Some(fd.as_fd()),
            Io::User { region_fds, .. } => match region_fds.get(r.index as usize)?.as_slice() {
                [one] => Some(one.as_fd()),
                per_area if per_area.len() == r.num_areas as usize => Some(per_area[area].as_fd()),
                _ => None,
            },
        }
    }

    pub(super) fn read(&self, r: &Region, off: u64, buf: &mut [u8]) -> IoResult<()> {
        match self {
            Io::Kernel(fd) => {
                sys::pread_exact(fd.as_fd(), buf, r.offset + off).map_err(IoError::Kernel)
            }
            Io::User { client, .. } => client.region_read(r.index, off, buf).map_err(IoError::User),
        }
    }

    pub(super) fn write(&self, r: &Region, off: u64, buf: &[u8]) -> IoResult<()> {
        match self {
            Io::Kernel(fd) => {
                sys::pwrite_all(fd.as_fd(), buf, r.offset + off).map_err(IoError::Kernel)
            }
            Io::User { client, .. } => {
                client.region_write(r.index, off, buf).map_err(IoError::User)
            }
        }
    }

    pub(super) fn set_irqs(&self, set: &mut [u8]) -> IoResult<()> {
        match self {
            Io::Kernel(fd) => vfio::set_irqs(fd.as_fd(), set).map_err(IoError::Kernel),
            Io::User { client, .. } => client.set_irqs(set).map_err(IoError::User),
        }
    }

    pub(super) fn set_irq_eventfds(&self, index: u32, first: u32, fds: &[RawFd]) -> IoResult<()> {
        match self {
            Io::Kernel(_) => self.set_irqs(&mut irq::encode_eventfds(index, first, fds)),
            Io::User { client, .. } => {
                client.set_irq_eventfds(index, first, fds).map_err(IoError::User)
            }
        }
    }

    /// VFIO_DEVICE_FEATURE, or DEVICE_FEATURE (whose value is always 0: it hands out no fd).
    pub(super) fn feature(&self, flags: u32, data: &mut [u8]) -> IoResult<i32> {
        match self {
            Io::Kernel(fd) => {
                vfio::device_feature(fd.as_fd(), flags, data).map_err(IoError::Kernel)
            }
            Io::User { client, .. } => {
                client.device_feature(flags, data).map(|()| 0).map_err(IoError::User)
            }
        }
    }

    pub(super) fn reset(&self) -> IoResult<()> {
        match self {
            Io::Kernel(fd) => vfio::device_reset(fd.as_fd()).map_err(IoError::Kernel),
            Io::User { client, .. } => client.reset().map_err(IoError::User),
        }
    }

    pub(super) fn kernel_fd(&self, address: &str) -> Result<BorrowedFd<'_>> {
        match self {
            Io::Kernel(fd) => Ok(fd.as_fd()),
            Io::User { .. } => Err(Error::new(
                libc::ENOTSUP,
                format!("{address} is served over vfio-user: it has no VFIO device fd"),
            )),
        }
    }
}

/// A failed request: the kernel's errno, or the vfio-user client's error.
pub(super) enum IoError {
    Kernel(sys::Errno),
    User(Error),
}

pub(super) type IoResult<T> = std::result::Result<T, IoError>;

impl IoError {
    /// The error, saying what was being done.
    pub(super) fn within(self, what: impl std::fmt::Display) -> Error {
        match self {
            IoError::Kernel(sys::Errno(e)) => Error::os(e, what),
            IoError::User(e) => Error::new(e.errno(), format!("{what}: {}", e.message())),
        }
    }
}
