//! Live handover: a process hands its open devices and their DMA context to another while the
//! devices keep running (docs/handoff.md, "Live handover"); the message is
//! crate::handoff::Handover.
//!
//! The giver checks everything it can first, then has the backend let go of its mappings'
//! addresses (the IOMMU keeps mapping the IOVAs to the same pinned pages), sends the message
//! and waits for the receiver's answer. The receiver maps the buffers' memory from the pools'
//! memfds, rebuilds the records, gives the backend its own addresses, then answers. Until the
//! giver has that answer nothing is given away: any failure on either side, or a receiver
//! gone, and the giver takes its addresses back and still owns everything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::backend::{Backend, protocol};
use super::container::Type1;
use super::iommufd::Iommufd;
use super::ledger::{Facts, Ledger, Owner, Record};
use super::{Iommu, IommuKind, State};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::handoff::{self, HandedBuffer, HandedVector, Handover};
use crate::sys::{self, Context, mem, socket};

/// Refuses DMA calls that would change a context handed over to another process.
pub(super) fn check_not_handed(state: &State) -> Result<()> {
    match state.handed {
        None => Ok(()),
        Some(_) => Err(Error::new(
            libc::EBADF,
            "this DMA context was handed over to another process (live handover): close it and its devices",
        )),
    }
}

impl Iommu {
    /// Hands this context and `devices` (every device open in it) to the process at the other
    /// end of the UNIX socket `sock`, which gets them with [`take_over`](Self::take_over),
    /// while the devices keep running: their open fds, routed IRQ eventfds, and every DMA
    /// buffer (each allocated with [`DMA_SHAREABLE`](super::DMA_SHAREABLE)), at the same IOVAs
    /// over the same memory, which the IOMMU never stops mapping. Waits for the receiver's
    /// answer; on any failure, a refusal or a receiver gone, this process still owns
    /// everything, as before the call. (A thread of this process waiting on a vector meanwhile
    /// may take an interrupt the receiver would have seen: stop waiting first.)
    ///
    /// Refused, changing nothing: on a context other than type1 or iommufd with MAP_FILE
    /// (ENOTSUP, or EOPNOTSUPP on an iommufd before Linux 6.13, naming what it lacks); with a DMA heap in use, a mapping of the caller's
    /// memory (map, map_any: another process cannot map it), a buffer that is not shareable or
    /// a map in flight (EBUSY); with a device of the context missing from `devices` (EBUSY).
    /// Afterwards the context refuses the DMA calls that would change it (EBADF), and the
    /// devices' IRQ waits end (ECANCELED): drop them and the context, which leaves the devices
    /// running.
    pub fn hand_over(&self, devices: &[&Device], sock: BorrowedFd) -> Result<()> {
        let backend = &self.0.backend;
        backend.check_hand_over()?;
        let mut listed = BTreeSet::new();
        for d in devices {
            if d.iommu() != self {
                return Err(Error::invalid(format!(
                    "{} is not open in this DMA context: hand each context over with its own devices",
                    d.address()
                )));
            }
            if !listed.insert(d.address()) {
                return Err(Error::invalid(format!("{} is listed twice", d.address())));
            }
        }
        if let Some(heap) = self.0.heap.get().map(|h| h.info()).filter(|i| i.arenas > 0) {
            return Err(Error::new(
                libc::EBUSY,
                format!(
                    "the context's DMA heap has {} arenas: a live handover does not carry the heap yet (hand over \
                     before the first heap_alloc, and use alloc's buffers)",
                    heap.arenas
                ),
            ));
        }
        // Held to the end: no mapping changes meanwhile.
        let mut state = self.state();
        check_not_handed(&state)?;
        let missing: Vec<&str> =
            state.devices.iter().map(String::as_str).filter(|a| !listed.contains(a)).collect();
        if !missing.is_empty() {
            return Err(Error::new(
                libc::EBUSY,
                format!(
                    "{} open in this context too: a live handover takes every device of the context",
                    missing.join(", ")
                ),
            ));
        }
        let maps = state.ledger.live_records();
        if state.ledger.all().count() != maps.len() {
            return Err(Error::new(libc::EBUSY, "a DMA map or unmap is in flight in this context"));
        }
        let buffers = maps.iter().map(|m| self.handed_buffer(m)).collect::<Result<Vec<_>>>()?;
        // The context's fds (the container and its groups), the devices', the pools', the
        // vectors' (duplicates, so that an IRQ call cannot close one meanwhile).
        let export = backend.export(&[])?;
        let mut fds: Vec<RawFd> = export.fds.clone();
        let mut message = Handover {
            kind: export.message.kind,
            ioas: export.message.ioas,
            groups: export.message.groups.clone(),
            devices: devices.iter().map(|d| d.address().to_string()).collect(),
            buffers,
            ..Handover::default()
        };
        for d in devices {
            fds.push(d.fd()?.as_raw_fd());
        }
        self.0.pools.each(|pools| {
            for (shift, fd) in pools {
                message.pools.push(*shift);
                fds.push(fd.as_raw_fd());
            }
        });
        let mut eventfds = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            for (index, vector, fd) in d.routed_eventfds() {
                // SAFETY: open: the device keeps it while routed, and we are its caller.
                let dup = sys::dup(unsafe { BorrowedFd::borrow_raw(fd) })
                    .context(|| "duplicating an IRQ eventfd")?;
                let index = index as u16;
                message.vectors.push(HandedVector { device: i as u16, index, vector });
                fds.push(dup.as_raw_fd());
                eventfds.push(dup);
            }
        }
        message.check_limits().map_err(|e| Error::invalid(format!("a live handover of {e}")))?;
        backend.release_maps(&maps)?;
        if let Err(e) = send_and_wait(sock, &message.encode(), &fds) {
            let after = match backend.claim_maps(&maps) {
                Ok(()) => "this process still owns the context and its devices".to_string(),
                Err(lost) => format!("and taking the mappings back failed: {}", lost.message()),
            };
            let why = e.message();
            return Err(Error::new(e.errno(), format!("live handover failed: {why}; {after}")));
        }
        let ledger = std::mem::replace(&mut state.ledger, Ledger::new(sys::page_size() as u64));
        state.handed = Some(ledger.all().cloned().collect());
        // Their interrupts are the receiver's now: no wait here may take one.
        devices.iter().for_each(|d| d.cancel_waits());
        Ok(())
    }

    /// The record of the handed-over DMA buffer `m`, or why it cannot be handed over.
    fn handed_buffer(&self, m: &Record) -> Result<HandedBuffer> {
        match (m.facts.owner, self.0.pools.find(m.vaddr)) {
            (Owner::Buffer, Some(placed)) => Ok(HandedBuffer {
                iova: m.iova,
                len: m.len as u64,
                offset: placed.offset,
                pool: placed.pool as u16,
                writable: m.facts.writable,
            }),
            (owner, _) => Err(Error::new(
                libc::EBUSY,
                format!(
                    "the DMA mapping of {:#x} bytes at IOVA {:#x} is {}: unmap or free it before a live handover \
                     (buffers allocated with DMA_SHAREABLE are handed over)",
                    m.len,
                    m.iova,
                    match owner {
                        Owner::Buffer => {
                            "a buffer allocated without DMA_SHAREABLE, whose memory another process cannot map"
                        }
                        Owner::File =>
                            "of the caller's file (map_file), which a live handover does not carry yet",
                        _ =>
                            "of the caller's memory (map, map_any), which another process cannot map",
                    }
                ),
            )),
        }
    }

    /// The context and devices another process handed over with
    /// [`hand_over`](Self::hand_over) on the UNIX socket `sock`, the devices in the order it
    /// listed them: the same records, IRQ routes (each vector's eventfd the device's own, for
    /// [`Device::irq_wait`]) and DMA buffers, at the same IOVAs and at new addresses
    /// ([`dma_to_vaddr`](Self::dma_to_vaddr) finds them). On any failure the sender is told,
    /// keeps everything, and every fd received is closed; a malformed message is EPROTO.
    pub fn take_over(sock: BorrowedFd) -> Result<(Iommu, Vec<Device>)> {
        Iommu::take_over_at_most(sock, usize::MAX)
    }

    /// [`take_over`](Self::take_over), refused (ENOSPC) with more than `max_devices` devices.
    pub(crate) fn take_over_at_most(
        sock: BorrowedFd,
        max_devices: usize,
    ) -> Result<(Iommu, Vec<Device>)> {
        let taken = receive(sock, max_devices);
        let answer = handoff::encode_reply(taken.as_ref().map_or_else(Error::errno, |_| 0));
        let answered = socket::send_with_fds(sock, &answer, &[])
            .context(|| format!("answering a live handover on fd {}", sock.as_raw_fd()));
        match (taken, answered) {
            (Ok(taken), Ok(())) => Ok(taken),
            (Ok((iommu, _)), Err(e)) => {
                // The sender takes its mappings back: they must be free to take.
                let maps = iommu.state().ledger.live_records();
                let _ = iommu.0.backend.release_maps(&maps);
                Err(e)
            }
            (Err(e), _) => Err(e),
        }
    }
}

/// Sends the message and waits for the receiver's answer: Ok once it took everything.
fn send_and_wait(sock: BorrowedFd, message: &[u8], fds: &[RawFd]) -> Result<()> {
    let what = || format!("handing a context over live on fd {}", sock.as_raw_fd());
    socket::send_with_fds(sock, message, fds).context(what)?;
    let mut reply = [0u8; handoff::REPLY_LEN];
    socket::recv_exact_with_fds(sock, &mut reply, 0).context(|| {
        format!("waiting for the answer to a live handover on fd {}", sock.as_raw_fd())
    })?;
    match handoff::decode_reply(&reply).map_err(|e| protocol(e.to_string()))? {
        0 => Ok(()),
        errno => Err(Error::new(
            errno,
            format!(
                "the receiving process refused it: {}",
                std::io::Error::from_raw_os_error(errno)
            ),
        )),
    }
}

/// The receiving half, until the answer: the message, the context, its buffers, its devices.
fn receive(sock: BorrowedFd, max_devices: usize) -> Result<(Iommu, Vec<Device>)> {
    let what = || format!("receiving a live handover on fd {}", sock.as_raw_fd());
    let malformed = |e: crate::caps::DecodeError| protocol(e.to_string());
    let mut bytes = vec![0u8; handoff::LIVE_HEADER_LEN];
    let max_fds = handoff::LIVE_MAX_FDS;
    let mut fds = socket::recv_exact_with_fds(sock, &mut bytes, max_fds).context(what)?;
    bytes.resize(Handover::len_from_header(&bytes).map_err(malformed)?, 0);
    let rest = &mut bytes[handoff::LIVE_HEADER_LEN..];
    fds.extend(socket::recv_exact_with_fds(sock, rest, max_fds).context(what)?);
    let message = Handover::decode(&bytes).map_err(malformed)?;
    if fds.len() != message.fds() {
        return Err(protocol(format!(
            "{} fds came with a message listing {}",
            fds.len(),
            message.fds()
        )));
    }
    if message.devices.len() > max_devices {
        return Err(Error::new(
            libc::ENOSPC,
            format!(
                "the live handover carries {} devices, and there is room for {max_devices}",
                message.devices.len()
            ),
        ));
    }
    let mut fds = fds.into_iter();
    let context = fds.next().expect("counted above");
    let groups: BTreeMap<u32, OwnedFd> = message.groups.iter().copied().zip(fds.by_ref()).collect();
    let backend: Box<dyn Backend> = match IommuKind::from_code(message.kind) {
        Ok(kind @ (IommuKind::Type1 | IommuKind::Type1V1)) => {
            Box::new(Type1::new(super::handoff::adopted_container(context, kind, groups)?))
        }
        Ok(IommuKind::Iommufd) if groups.is_empty() => {
            Box::new(Iommufd::adopted(context, message.ioas, HashMap::new()))
        }
        _ => {
            return Err(protocol(format!("context kind {} is not handed over live", message.kind)));
        }
    };
    // Read now, to check that the context is one with its devices' address space.
    let valid =
        backend.ranges()?.ok_or_else(|| protocol("a handed-over context with no device".into()))?;
    let iommu = Iommu::with(backend, Some(valid));
    let device_fds: Vec<OwnedFd> = fds.by_ref().take(message.devices.len()).collect();
    for (shift, fd) in message.pools.iter().zip(fds.by_ref()) {
        iommu.0.pools.adopt(*shift, fd);
    }
    let mut vectors: Vec<Vec<(u32, u32, OwnedFd)>> =
        message.devices.iter().map(|_| Vec::new()).collect();
    for (v, fd) in message.vectors.iter().zip(fds) {
        vectors[usize::from(v.device)].push((v.index.into(), v.vector, fd));
    }
    let maps = message.buffers.iter().map(|b| iommu.adopt_buffer(b)).collect::<Result<Vec<_>>>()?;
    let devices = message
        .devices
        .into_iter()
        .zip(device_fds)
        .zip(vectors)
        .map(|((address, fd), vectors)| Device::adopt(address, &iommu, fd, vectors))
        .collect::<Result<Vec<_>>>()?;
    iommu.0.backend.claim_maps(&maps)?;
    Ok((iommu, devices))
}

impl Iommu {
    /// Maps a handed-over buffer's memory here and records it Live at its IOVA (its address
    /// is given to the kernel with the others, by claim_maps); its record.
    fn adopt_buffer(&self, b: &HandedBuffer) -> Result<Record> {
        let bad =
            || format!("the handed-over DMA buffer of {:#x} bytes at IOVA {:#x}", b.len, b.iova);
        let len = usize::try_from(b.len).map_err(|_| protocol(bad()))?;
        let (vaddr, file) = self
            .0
            .pools
            .map_adopted(usize::from(b.pool), b.offset, len)
            .map_err(|sys::Errno(e)| Error::os(e, format!("mapping {}", bad())))?;
        // As alloc records a pooled buffer: with its file where the backend maps by file.
        let fd = self.0.backend.buffers_by_fd().then_some(file);
        let facts = Facts { writable: b.writable, owner: Owner::Buffer, fd, offset: b.offset };
        let mut state = self.state();
        let slot =
            match state.ledger.reserve_at(vaddr.as_ptr() as usize, len, b.iova, facts.clone()) {
                Ok(slot) => slot,
                Err(why) => {
                    drop(state);
                    // SAFETY: mapped just above, recorded nowhere; the memory stays the sender's.
                    unsafe { mem::unmap(vaddr, len) };
                    return Err(protocol(format!("{}: {why:?}", bad())));
                }
            };
        state.ledger.commit(slot);
        Ok(Record::new(vaddr.as_ptr() as usize, len, b.iova, facts))
    }
}
