//! Walking VFIO's info capability chains (region info, type1 IOMMU info): pure, bounded.
//!
//! A chain is a linked list inside the kernel's reply: each capability starts with
//! `{ u16 id; u16 version; u32 next; }`, `next` being an offset from the start of the reply
//! (0 ends the chain). A malformed chain gives an error, never a hang or a panic.

/// Why a kernel reply could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("reply truncated: {what} needs {need} bytes, only {have} present")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("capability offset {offset} lies outside the {len}-byte reply")]
    OutOfBounds { offset: usize, len: usize },
    #[error("capability chain loops back to offset {offset}")]
    Loop { offset: usize },
    #[error("{what} [{start:#x}, +{size:#x}) lies outside its {limit:#x}-byte parent")]
    OutOfRange { what: &'static str, start: u64, size: u64, limit: u64 },
    #[error("{what}: {why}")]
    Malformed { what: &'static str, why: String },
}

const HEADER_LEN: usize = 8;

/// One capability: its id and the reply's bytes from its header to the end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cap<'a> {
    pub id: u16,
    pub bytes: &'a [u8],
}

impl<'a> Cap<'a> {
    pub fn u32_at(&self, off: usize, what: &'static str) -> Result<u32, DecodeError> {
        u32_at(self.bytes, off, what)
    }

    pub fn u64_at(&self, off: usize, what: &'static str) -> Result<u64, DecodeError> {
        u64_at(self.bytes, off, what)
    }

    /// Checks that `count` elements of `elem` bytes starting at `start` fit in the reply;
    /// done before allocating, so a hostile count cannot make us allocate.
    pub fn check_array(
        &self,
        start: usize,
        count: usize,
        elem: usize,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let need = count.checked_mul(elem).and_then(|n| n.checked_add(start)).unwrap_or(usize::MAX);
        if need > self.bytes.len() {
            return Err(DecodeError::Truncated { what, need, have: self.bytes.len() });
        }
        Ok(())
    }
}

fn field<const N: usize>(
    bytes: &[u8],
    off: usize,
    what: &'static str,
) -> Result<[u8; N], DecodeError> {
    off.checked_add(N)
        .and_then(|end| bytes.get(off..end))
        .map(|s| s.try_into().expect("slice of length N"))
        .ok_or(DecodeError::Truncated { what, need: off.saturating_add(N), have: bytes.len() })
}

pub(crate) fn u16_at(bytes: &[u8], off: usize, what: &'static str) -> Result<u16, DecodeError> {
    field(bytes, off, what).map(u16::from_ne_bytes)
}

/// A native-endian u32 at `off` (kernel replies are in the host's byte order).
pub(crate) fn u32_at(bytes: &[u8], off: usize, what: &'static str) -> Result<u32, DecodeError> {
    field(bytes, off, what).map(u32::from_ne_bytes)
}

pub(crate) fn u64_at(bytes: &[u8], off: usize, what: &'static str) -> Result<u64, DecodeError> {
    field(bytes, off, what).map(u64::from_ne_bytes)
}

/// All capabilities of the chain starting at `first` (0: none) in `reply`, whose fixed header
/// is `fixed_len` bytes (capabilities may not overlap it).
pub(crate) fn walk(
    reply: &[u8],
    first: u32,
    fixed_len: usize,
) -> Result<Vec<Cap<'_>>, DecodeError> {
    let mut caps = Vec::new();
    let mut offset = first as usize;
    while offset != 0 {
        if offset < fixed_len || offset.checked_add(HEADER_LEN).is_none_or(|end| end > reply.len())
        {
            return Err(DecodeError::OutOfBounds { offset, len: reply.len() });
        }
        // Each capability needs its own 8-byte header, so a chain longer than this has
        // visited some offset twice.
        if caps.len() >= reply.len() / HEADER_LEN {
            return Err(DecodeError::Loop { offset });
        }
        let bytes = &reply[offset..];
        let id = u16::from_ne_bytes([bytes[0], bytes[1]]);
        let next = u32_at(bytes, 4, "capability header")? as usize;
        caps.push(Cap { id, bytes });
        if next == offset {
            return Err(DecodeError::Loop { offset });
        }
        offset = next;
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(id: u16, next: u32) -> Vec<u8> {
        let mut v = id.to_ne_bytes().to_vec();
        v.extend(1u16.to_ne_bytes());
        v.extend(next.to_ne_bytes());
        v
    }

    #[test]
    fn walks_a_chain_in_order() {
        let mut reply = vec![0u8; 16];
        reply.extend(cap(3, 24));
        reply.extend(cap(2, 0));
        let ids: Vec<u16> = walk(&reply, 16, 16).unwrap().iter().map(|c| c.id).collect();
        assert_eq!(ids, [3, 2]);
    }

    #[test]
    fn no_chain_is_empty() {
        assert!(walk(&[0u8; 32], 0, 32).unwrap().is_empty());
    }

    #[test]
    fn self_loop_and_long_loop_are_errors() {
        let mut reply = vec![0u8; 16];
        reply.extend(cap(1, 16));
        assert_eq!(walk(&reply, 16, 16).unwrap_err(), DecodeError::Loop { offset: 16 });

        let mut reply = vec![0u8; 16];
        reply.extend(cap(1, 24));
        reply.extend(cap(2, 16));
        assert!(matches!(walk(&reply, 16, 16), Err(DecodeError::Loop { .. })));
    }

    #[test]
    fn offsets_outside_the_reply_or_into_the_header_are_errors() {
        let mut reply = vec![0u8; 16];
        reply.extend(cap(1, 1000));
        assert_eq!(
            walk(&reply, 16, 16).unwrap_err(),
            DecodeError::OutOfBounds { offset: 1000, len: 24 }
        );
        assert!(matches!(walk(&reply, 8, 16), Err(DecodeError::OutOfBounds { offset: 8, .. })));
        assert!(matches!(walk(&reply, 20, 16), Err(DecodeError::OutOfBounds { offset: 20, .. })));
        assert!(matches!(walk(&reply, u32::MAX, 16), Err(DecodeError::OutOfBounds { .. })));
    }
}
