//! vfio-user messages (QEMU's docs/interop/vfio-user.rst, protocol 0.x): the header, the
//! payloads vfiokit sends, and checked decoding of what a server sends back. Pure.
//!
//! Payloads reuse the kernel's VFIO structures in the host's byte order, so region-info replies
//! go through the same decoder as the kernel's.

use crate::caps::{self, DecodeError};

pub(crate) const HEADER_LEN: usize = 16;

pub(crate) const VERSION: u16 = 1;
pub(crate) const DMA_MAP: u16 = 2;
pub(crate) const DMA_UNMAP: u16 = 3;
pub(crate) const DEVICE_GET_INFO: u16 = 4;
pub(crate) const DEVICE_GET_REGION_INFO: u16 = 5;
pub(crate) const DEVICE_GET_REGION_IO_FDS: u16 = 6;
pub(crate) const DEVICE_GET_IRQ_INFO: u16 = 7;
pub(crate) const DEVICE_SET_IRQS: u16 = 8;
pub(crate) const REGION_READ: u16 = 9;
pub(crate) const REGION_WRITE: u16 = 10;
pub(crate) const DMA_READ: u16 = 11;
pub(crate) const DMA_WRITE: u16 = 12;
pub(crate) const DEVICE_RESET: u16 = 13;
pub(crate) const DEVICE_FEATURE: u16 = 16;

const TYPE_MASK: u32 = 0xf;
const TYPE_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;

/// DMA_MAP flags: what the device may do with the memory.
pub(crate) const DMA_FLAG_READ: u32 = 1 << 0;
pub(crate) const DMA_FLAG_WRITE: u32 = 1 << 1;

/// The protocol version vfiokit speaks (0.1, what libvfio-user and QEMU speak).
pub(crate) const MAJOR: u16 = 0;
pub(crate) const MINOR: u16 = 1;

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// The whole message's size, header included.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Header {
        let u32_at = |off| u32::from_ne_bytes(bytes[off..off + 4].try_into().expect("4 bytes"));
        Header {
            id: u16::from_ne_bytes([bytes[0], bytes[1]]),
            command: u16::from_ne_bytes([bytes[2], bytes[3]]),
            size: u32_at(4),
            flags: u32_at(8),
            error: u32_at(12),
        }
    }

    pub fn is_reply(&self) -> bool {
        self.flags & TYPE_MASK == TYPE_REPLY
    }

    /// The errno of an error reply; a server that flags an error without one gets EIO.
    pub fn errno(&self) -> Option<i32> {
        (self.flags & FLAG_ERROR != 0).then(|| match self.error {
            0 => libc::EIO,
            e => e.min(i32::MAX as u32) as i32,
        })
    }
}

fn encode(id: u16, command: u16, flags: u32, error: u32, parts: &[&[u8]]) -> Vec<u8> {
    let size = HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut msg = Vec::with_capacity(size);
    msg.extend_from_slice(&id.to_ne_bytes());
    msg.extend_from_slice(&command.to_ne_bytes());
    msg.extend_from_slice(&(size as u32).to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&error.to_ne_bytes());
    parts.iter().for_each(|p| msg.extend_from_slice(p));
    msg
}

/// A command: header and payload `parts`, concatenated.
pub fn command(id: u16, command: u16, parts: &[&[u8]]) -> Vec<u8> {
    encode(id, command, 0, 0, parts)
}

/// A command, as [`command`], written at the start of `buf` if it fits there: its length.
pub fn command_into(buf: &mut [u8], id: u16, command: u16, parts: &[&[u8]]) -> Option<usize> {
    let size = HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
    let out = buf.get_mut(..size)?;
    out[0..2].copy_from_slice(&id.to_ne_bytes());
    out[2..4].copy_from_slice(&command.to_ne_bytes());
    out[4..8].copy_from_slice(&(size as u32).to_ne_bytes());
    out[8..HEADER_LEN].fill(0);
    let mut at = HEADER_LEN;
    for p in parts {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    Some(size)
}

/// A reply to command `id`.
pub fn reply(id: u16, command: u16, parts: &[&[u8]]) -> Vec<u8> {
    encode(id, command, TYPE_REPLY, 0, parts)
}

/// An error reply to command `id`.
pub fn error_reply(id: u16, command: u16, errno: i32) -> Vec<u8> {
    encode(id, command, TYPE_REPLY | FLAG_ERROR, errno as u32, &[])
}

fn words<const N: usize>(fields: &[u64], widths: &[usize]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut at = 0;
    for (&v, &w) in fields.iter().zip(widths) {
        out[at..at + w].copy_from_slice(&v.to_ne_bytes()[..w]);
        at += w;
    }
    debug_assert_eq!(at, N);
    out
}

/// What each side may send, from the VERSION exchange's JSON capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub max_msg_fds: u32,
    pub max_data_xfer_size: u32,
    pub pgsizes: u64,
    pub max_dma_maps: u32,
    /// Ours: twin-socket mode is supported.
    pub twin_socket: bool,
    /// Theirs: twin-socket mode is on, its socket at this index of the reply's fds.
    pub twin_fd_index: Option<u32>,
}

impl Default for Caps {
    /// The specification's defaults for a capability left out.
    fn default() -> Caps {
        Caps {
            max_msg_fds: 1,
            max_data_xfer_size: 1 << 20,
            pgsizes: 4096,
            max_dma_maps: 65535,
            twin_socket: false,
            twin_fd_index: None,
        }
    }
}

/// The VERSION payload: major, minor, our capabilities as NUL-terminated JSON.
pub fn version(caps: &Caps) -> Vec<u8> {
    let json = serde_json::json!({ "capabilities": {
        "max_msg_fds": caps.max_msg_fds,
        "max_data_xfer_size": caps.max_data_xfer_size,
        "pgsizes": caps.pgsizes,
        "max_dma_maps": caps.max_dma_maps,
        "twin_socket": { "supported": caps.twin_socket },
    }});
    let mut out = [MAJOR.to_ne_bytes(), MINOR.to_ne_bytes()].concat();
    out.extend_from_slice(json.to_string().as_bytes());
    out.push(0);
    out
}

/// The server's VERSION reply: its (major, minor) and capabilities, defaults for those left out.
pub fn decode_version(payload: &[u8]) -> Result<(u16, u16, Caps), DecodeError> {
    let what = "vfio-user version reply";
    let malformed = |why: String| DecodeError::Malformed { what, why };
    let major = caps::u16_at(payload, 0, what)?;
    let minor = caps::u16_at(payload, 2, what)?;
    let text = &payload[4..];
    // The JSON is NUL-terminated; an empty string means no capabilities.
    let text = text.split(|&b| b == 0).next().unwrap_or_default();
    let mut found = Caps::default();
    if text.is_empty() {
        return Ok((major, minor, found));
    }
    let json: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| malformed(format!("capabilities JSON: {e}")))?;
    let Some(c) = json.get("capabilities") else {
        return Ok((major, minor, found));
    };
    let num = |key: &str, max: u64| -> Result<Option<u64>, DecodeError> {
        match c.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().filter(|&n| n <= max).map(Some).ok_or_else(|| {
                malformed(format!("capability {key} is {v}, not an integer up to {max}"))
            }),
        }
    };
    let max32 = u32::MAX as u64;
    if let Some(n) = num("max_msg_fds", max32)? {
        found.max_msg_fds = n as u32;
    }
    if let Some(n) = num("max_data_xfer_size", max32)? {
        found.max_data_xfer_size = n as u32;
    }
    if let Some(n) = num("pgsizes", u64::MAX)? {
        found.pgsizes = n;
    }
    if let Some(n) = num("max_dma_maps", max32)? {
        found.max_dma_maps = n as u32;
    }
    // Twin-socket mode is on when the server says it supports it and names the fd; supported
    // without an fd is inconsistent (the client could miss the server's commands).
    if let Some(twin) = c.get("twin_socket") {
        let supported = twin.get("supported").and_then(|v| v.as_bool()).unwrap_or(false);
        match (supported, twin.get("fd_index")) {
            (false, _) => {}
            (true, Some(index)) => {
                let index = index.as_u64().filter(|&i| i < 256).ok_or_else(|| {
                    malformed(format!("twin_socket.fd_index is {index}, not a small integer"))
                })?;
                found.twin_fd_index = Some(index as u32);
            }
            (true, None) => {
                return Err(malformed("twin_socket is supported but names no fd_index".into()));
            }
        }
    }
    Ok((major, minor, found))
}

/// DMA_MAP: `size` bytes at IOVA `iova`, at `offset` in the fd sent with it (if any).
pub fn dma_map(flags: u32, offset: u64, iova: u64, size: u64) -> [u8; 32] {
    words(&[32, flags as u64, offset, iova, size], &[4, 4, 8, 8, 8])
}

pub fn dma_unmap(iova: u64, size: u64) -> [u8; 24] {
    words(&[24, 0, iova, size], &[4, 4, 8, 8])
}

pub fn device_info() -> [u8; 16] {
    words(&[16, 0, 0, 0], &[4; 4])
}

/// A DEVICE_GET_INFO reply: (flags, number of regions, number of IRQs).
pub fn decode_device_info(payload: &[u8]) -> Result<(u32, u32, u32), DecodeError> {
    let what = "vfio-user device info";
    Ok((
        caps::u32_at(payload, 4, what)?,
        caps::u32_at(payload, 8, what)?,
        caps::u32_at(payload, 12, what)?,
    ))
}

/// DEVICE_GET_REGION_INFO for `index`, with room for an `argsz`-byte reply.
pub fn region_info(index: u32, argsz: u32) -> [u8; 32] {
    words(&[argsz as u64, 0, index as u64, 0, 0, 0], &[4, 4, 4, 4, 8, 8])
}

/// The size a region-info reply says the whole information needs.
pub fn region_info_argsz(payload: &[u8]) -> Result<u32, DecodeError> {
    caps::u32_at(payload, 0, "vfio-user region info")
}

pub fn irq_info(index: u32) -> [u8; 16] {
    words(&[16, 0, index as u64, 0], &[4; 4])
}

/// A DEVICE_GET_IRQ_INFO reply: (flags, count).
pub fn decode_irq_info(payload: &[u8]) -> Result<(u32, u32), DecodeError> {
    let what = "vfio-user IRQ info";
    Ok((caps::u32_at(payload, 4, what)?, caps::u32_at(payload, 12, what)?))
}

/// REGION_READ/REGION_WRITE's fixed part: `count` bytes at `offset` of region `region`.
pub fn region_access(region: u32, offset: u64, count: u32) -> [u8; 16] {
    words(&[offset, region as u64, count as u64], &[8, 4, 4])
}

/// A REGION_READ reply's data, checked to be the `count` bytes asked for.
pub fn decode_region_read(payload: &[u8], count: usize) -> Result<&[u8], DecodeError> {
    let what = "vfio-user region read reply";
    let sent = caps::u32_at(payload, 12, what)? as usize;
    let data = &payload[16..];
    if sent != count || data.len() != count {
        return Err(DecodeError::Malformed {
            what,
            why: format!("{count} bytes asked, {sent} announced and {} sent", data.len()),
        });
    }
    Ok(data)
}

/// DEVICE_GET_REGION_IO_FDS for region `index`, with room for an `argsz`-byte reply.
pub fn region_io_fds(index: u32, argsz: u32) -> [u8; 16] {
    words(&[argsz as u64, 0, index as u64, 0], &[4; 4])
}

/// The fixed part of a region io fds reply, and the least room an entry takes after it.
pub(crate) const IO_FDS_HEADER: u32 = 16;
pub(crate) const IO_FD_ENTRY: u32 = 40;
const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// KVM_IOEVENTFD's flags, which the spec reuses.
const IOEVENTFD_DATAMATCH: u32 = 1 << 0;
const IOEVENTFD_PIO: u32 = 1 << 1;

/// An ioeventfd sub-region: a write of `size` bytes (any size when 0) at `offset` of the region,
/// of `datamatch`'s value if there is one, is a write to the reply's fd `fd_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Doorbell {
    pub offset: u64,
    pub size: u64,
    pub fd_index: u32,
    pub datamatch: Option<u64>,
}

impl Doorbell {
    /// Whether writing `data` at `offset` rings it, as KVM decides for an ioeventfd: the
    /// address, the width unless it is 0, the value zero-extended if it has a datamatch.
    pub fn rings(&self, offset: u64, data: &[u8]) -> bool {
        if offset != self.offset || data.len() > 8 {
            return false;
        }
        if self.size != 0 && self.size != data.len() as u64 {
            return false;
        }
        let mut value = [0u8; 8];
        value[..data.len()].copy_from_slice(data);
        self.datamatch.is_none_or(|m| m == u64::from_ne_bytes(value))
    }
}

/// A region io fds reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoFds {
    /// The sub-regions vfiokit can ring, of a reply that came with `fds` fds. ioregionfds and
    /// ioeventfds with flags it does not know are left out: their writes go by message.
    Doorbells(Vec<Doorbell>),
    /// The reply needs `argsz` bytes, more than were offered and sent.
    Needs(u32),
}

/// A DEVICE_GET_REGION_IO_FDS reply for region `index` that came with `fds` fds.
pub fn decode_region_io_fds(payload: &[u8], index: u32, fds: usize) -> Result<IoFds, DecodeError> {
    let what = "vfio-user region io fds reply";
    let malformed = |why: String| DecodeError::Malformed { what, why };
    let argsz = caps::u32_at(payload, 0, what)?;
    let replied = caps::u32_at(payload, 8, what)?;
    let count = caps::u32_at(payload, 12, what)?;
    if replied != index {
        return Err(malformed(format!("for region {replied}, asked for region {index}")));
    }
    if count == 0 {
        return Ok(IoFds::Doorbells(Vec::new()));
    }
    // Each entry is at i * ((argsz - 16) / count): 40 bytes today, "not to be relied on".
    let stride = argsz.checked_sub(IO_FDS_HEADER).map_or(0, |room| room / count);
    if stride < IO_FD_ENTRY {
        return Err(malformed(format!(
            "{count} sub-regions in an argsz of {argsz} ({IO_FD_ENTRY} bytes each at least)"
        )));
    }
    if payload.len() < argsz as usize {
        return Ok(IoFds::Needs(argsz));
    }
    let mut doorbells = Vec::new();
    for i in 0..count as usize {
        let at = IO_FDS_HEADER as usize + i * stride as usize;
        let fd_index = caps::u32_at(payload, at + 16, what)?;
        if fd_index as usize >= fds {
            return Err(malformed(format!(
                "sub-region {i} names fd {fd_index} of {fds} sent with the reply"
            )));
        }
        let flags = caps::u32_at(payload, at + 24, what)?;
        if caps::u32_at(payload, at + 20, what)? != IO_FD_TYPE_IOEVENTFD
            || flags & !(IOEVENTFD_DATAMATCH | IOEVENTFD_PIO) != 0
        {
            continue;
        }
        let datamatch = caps::u64_at(payload, at + 32, what)?;
        doorbells.push(Doorbell {
            offset: caps::u64_at(payload, at, what)?,
            size: caps::u64_at(payload, at + 8, what)?,
            fd_index,
            datamatch: (flags & IOEVENTFD_DATAMATCH != 0).then_some(datamatch),
        });
    }
    Ok(IoFds::Doorbells(doorbells))
}

/// DEVICE_FEATURE's fixed part: `flags` (the feature's index and GET/SET/PROBE) and room for
/// an `argsz`-byte reply.
pub fn device_feature(argsz: u32, flags: u32) -> [u8; 8] {
    words(&[argsz as u64, flags as u64], &[4, 4])
}

/// A DEVICE_FEATURE reply's data (a GET's feature data; SET and PROBE echo the request), at
/// most the `len` bytes there is room for.
pub fn decode_device_feature(payload: &[u8], len: usize) -> Result<&[u8], DecodeError> {
    let what = "vfio-user device feature reply";
    caps::u32_at(payload, 4, what)?;
    let data = &payload[8..];
    if data.len() > len {
        return Err(DecodeError::Malformed {
            what,
            why: format!("{} bytes of data, {len} asked at most", data.len()),
        });
    }
    Ok(data)
}

/// A server's DMA_READ or DMA_WRITE request: (IOVA, count, data written).
pub fn decode_dma_access(payload: &[u8]) -> Result<(u64, u64, &[u8]), DecodeError> {
    let what = "vfio-user DMA access";
    Ok((
        caps::u64_at(payload, 0, what)?,
        caps::u64_at(payload, 8, what)?,
        &payload[16.min(payload.len())..],
    ))
}

/// The fixed part of a DMA_READ/DMA_WRITE reply.
pub fn dma_access(iova: u64, count: u64) -> [u8; 16] {
    words(&[iova, count], &[8, 8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_flags() {
        let msg = error_reply(7, REGION_READ, libc::EINVAL);
        let h = Header::decode(msg[..HEADER_LEN].try_into().unwrap());
        assert_eq!((h.id, h.command, h.size as usize), (7, REGION_READ, msg.len()));
        assert!(h.is_reply());
        assert_eq!(h.errno(), Some(libc::EINVAL));
        let cmd = command(8, DMA_READ, &[&dma_access(0x1000, 4)]);
        let h = Header::decode(cmd[..HEADER_LEN].try_into().unwrap());
        assert!(!h.is_reply() && h.errno().is_none() && h.size == 32);
        // An error flag without an errno is still an error.
        let mut bare = reply(1, DEVICE_RESET, &[]);
        bare[8] |= 1 << 5;
        assert_eq!(Header::decode(bare[..16].try_into().unwrap()).errno(), Some(libc::EIO));
    }

    #[test]
    fn a_command_in_place_is_the_command() {
        let parts: [&[u8]; 2] = [&region_access(2, 0x40, 4), &[1, 2, 3, 4]];
        let mut buf = [0xffu8; 64];
        let n = command_into(&mut buf, 9, REGION_WRITE, &parts).unwrap();
        assert_eq!(&buf[..n], &command(9, REGION_WRITE, &parts)[..]);
        assert_eq!(command_into(&mut buf[..35], 9, REGION_WRITE, &parts), None, "36 bytes");
    }

    #[test]
    fn version_round_trip_and_defaults() {
        let ours = Caps {
            max_msg_fds: 16,
            max_data_xfer_size: 1 << 16,
            pgsizes: 4096,
            max_dma_maps: 7,
            ..Default::default()
        };
        assert_eq!(decode_version(&version(&ours)).unwrap(), (MAJOR, MINOR, ours));
        // What the rust-vmm server sends: some capabilities, the rest defaulted.
        let mut theirs = vec![0, 0, 0, 0];
        theirs.extend_from_slice(
            br#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#,
        );
        theirs.push(0);
        assert_eq!(decode_version(&theirs).unwrap(), (0, 0, Caps::default()));
        assert_eq!(decode_version(&[0, 0, 1, 0]).unwrap(), (0, 1, Caps::default()));
    }

    #[test]
    fn version_rejects_bad_json_and_values() {
        for bad in [
            &b"{not json"[..],
            br#"{"capabilities":{"max_msg_fds":-1}}"#,
            br#"{"capabilities":{"max_data_xfer_size":"big"}}"#,
            br#"{"capabilities":{"max_msg_fds":4294967296}}"#,
        ] {
            let payload = [&[0u8, 0, 1, 0][..], bad, &[0]].concat();
            assert!(
                matches!(decode_version(&payload), Err(DecodeError::Malformed { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(decode_version(&[0, 0]), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn twin_socket_negotiation() {
        let reply = |json: &str| [&[0u8, 0, 1, 0][..], json.as_bytes(), &[0]].concat();
        let on = decode_version(&reply(
            r#"{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}"#,
        ));
        assert_eq!(on.unwrap().2.twin_fd_index, Some(0));
        let off = decode_version(&reply(r#"{"capabilities":{"twin_socket":{"supported":false}}}"#));
        assert_eq!(off.unwrap().2.twin_fd_index, None);
        for bad in [
            r#"{"capabilities":{"twin_socket":{"supported":true}}}"#,
            r#"{"capabilities":{"twin_socket":{"supported":true,"fd_index":-1}}}"#,
        ] {
            assert!(
                matches!(decode_version(&reply(bad)), Err(DecodeError::Malformed { .. })),
                "{bad}"
            );
        }
        let ours = Caps { twin_socket: true, ..Default::default() };
        assert!(
            String::from_utf8_lossy(&version(&ours))
                .contains(r#""twin_socket":{"supported":true}"#)
        );
    }

    #[test]
    fn payload_layouts() {
        let m = dma_map(DMA_FLAG_READ | DMA_FLAG_WRITE, 0x10, 0x2000, 0x3000);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u32::from_ne_bytes(m[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_ne_bytes(m[8..16].try_into().unwrap()), 0x10);
        assert_eq!(u64::from_ne_bytes(m[16..24].try_into().unwrap()), 0x2000);
        assert_eq!(u64::from_ne_bytes(m[24..32].try_into().unwrap()), 0x3000);
        let r = region_access(2, 0x40, 8);
        assert_eq!(u64::from_ne_bytes(r[0..8].try_into().unwrap()), 0x40);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 2);
        assert_eq!(u32::from_ne_bytes(r[12..16].try_into().unwrap()), 8);
        let ri = region_info(7, 32);
        assert_eq!(u32::from_ne_bytes(ri[8..12].try_into().unwrap()), 7);
    }

    #[test]
    fn region_read_reply_must_match_the_request() {
        let good = [&region_access(0, 0, 4)[..], &[1, 2, 3, 4]].concat();
        assert_eq!(decode_region_read(&good, 4).unwrap(), &[1, 2, 3, 4]);
        assert!(decode_region_read(&good, 8).is_err());
        assert!(decode_region_read(&good[..18], 4).is_err());
        assert!(decode_region_read(&good[..8], 4).is_err());
    }

    /// A region io fds reply as libvfio-user makes it: the header, then 40-byte entries of
    /// (offset, size, fd index, type, flags, datamatch).
    fn io_fds_reply(index: u32, entries: &[(u64, u64, u32, u32, u32, u64)]) -> Vec<u8> {
        let argsz = IO_FDS_HEADER + IO_FD_ENTRY * entries.len() as u32;
        let mut out =
            words::<16>(&[argsz as u64, 0, index as u64, entries.len() as u64], &[4; 4]).to_vec();
        for &(offset, size, fd, kind, flags, datamatch) in entries {
            out.extend_from_slice(&words::<40>(
                &[offset, size, fd as u64, kind as u64, flags as u64, 0, datamatch],
                &[8, 8, 4, 4, 4, 4, 8],
            ));
        }
        out
    }

    #[test]
    fn io_fds_replies_give_the_doorbells_vfiokit_can_ring() {
        let reply = io_fds_reply(
            2,
            &[
                (0x1000, 4, 0, 0, 0, 0),
                (0x1008, 8, 1, 0, IOEVENTFD_DATAMATCH, 7),
                (0x2000, 4, 0, 1, 0, 0),      // an ioregionfd
                (0x3000, 4, 0, 0, 1 << 3, 0), // virtio-ccw: not PCI
            ],
        );
        let IoFds::Doorbells(bells) = decode_region_io_fds(&reply, 2, 2).unwrap() else {
            panic!("complete")
        };
        assert_eq!(
            bells,
            [
                Doorbell { offset: 0x1000, size: 4, fd_index: 0, datamatch: None },
                Doorbell { offset: 0x1008, size: 8, fd_index: 1, datamatch: Some(7) },
            ]
        );
        // Asked with too little room: the header says how much it needs.
        assert_eq!(decode_region_io_fds(&reply[..16], 2, 0), Ok(IoFds::Needs(16 + 4 * 40)));
        assert_eq!(decode_region_io_fds(&io_fds_reply(2, &[]), 2, 0), Ok(IoFds::Doorbells(vec![])));
        for (bad, fds) in [
            (io_fds_reply(3, &[]), 0),                   // another region's
            (io_fds_reply(2, &[(0, 4, 1, 0, 0, 0)]), 1), // an fd not sent
            ([&words::<16>(&[20, 0, 2, 1], &[4; 4])[..], &[0; 4]].concat(), 1), // 4-byte entries
        ] {
            assert!(
                matches!(decode_region_io_fds(&bad, 2, fds), Err(DecodeError::Malformed { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            decode_region_io_fds(&reply[..12], 2, 2),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn a_doorbell_rings_as_a_kvm_ioeventfd_matches() {
        let any = Doorbell { offset: 0x10, size: 0, fd_index: 0, datamatch: None };
        let four = Doorbell { size: 4, ..any };
        let seven = Doorbell { datamatch: Some(7), ..four };
        assert!(any.rings(0x10, &[1]) && any.rings(0x10, &9u64.to_ne_bytes()));
        assert!(!any.rings(0x14, &[1]), "another address");
        assert!(four.rings(0x10, &1u32.to_ne_bytes()) && !four.rings(0x10, &1u16.to_ne_bytes()));
        assert!(seven.rings(0x10, &7u32.to_ne_bytes()));
        assert!(!seven.rings(0x10, &8u32.to_ne_bytes()), "another value goes by message");
        assert!(!any.rings(0x10, &[0; 16]), "wider than any register");
    }

    #[test]
    fn device_feature_layout_and_reply() {
        let f = device_feature(8 + 4, 1 << 16 | 3);
        assert_eq!(u32::from_ne_bytes(f[0..4].try_into().unwrap()), 12);
        assert_eq!(u32::from_ne_bytes(f[4..8].try_into().unwrap()), 1 << 16 | 3);
        let reply = [&f[..], &[1, 2, 3, 4]].concat();
        assert_eq!(decode_device_feature(&reply, 4).unwrap(), &[1, 2, 3, 4]);
        assert_eq!(decode_device_feature(&f, 4).unwrap(), &[] as &[u8]);
        assert!(decode_device_feature(&reply, 2).is_err(), "more than there is room for");
        assert!(decode_device_feature(&f[..6], 0).is_err());
    }
}
