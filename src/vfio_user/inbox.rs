//! Messages read ahead from a socket. One receive brings a small message whole, header and
//! payload (a hand-written client pays one for each); what of the next message came with it
//! waits here for the next read.
//!
//! The fds that come with a receive belong to the last message that starts in the bytes
//! read so far: the kernel ends a receive right after the bytes that carried fds, and a
//! sender's fds travel with the first byte it wrote, so those bytes start a message, or (a
//! message written in parts) continue the one in progress.

use std::os::fd::OwnedFd;

use super::proto::{HEADER_LEN, Header};

/// The buffer's size: every reply vfiokit asks for fits but region reads and region infos with
/// long chains, whose rest is received straight into their payload.
const LEN: usize = 4096;

/// One message as read from a socket.
#[derive(Debug)]
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Why no message could be read.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) enum ReadError<E> {
    /// The peer closed the connection: between messages (None), or inside a message of this
    /// many bytes.
    Closed(Option<u32>),
    /// A header whose size is below 16 or above the limit.
    Size(Header),
    /// The receive failed.
    Recv(E),
}

#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) struct Inbox {
    buf: Box<[u8; LEN]>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The stream position of `buf[start]`: the start of the next message.
    at: u64,
    /// The fds received and not yet taken, by the stream position of their message.
    fds: Vec<(u64, Vec<OwnedFd>)>,
}

impl Default for Inbox {
    fn default() -> Inbox {
        Inbox::new()
    }
}

impl Inbox {
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn new() -> Inbox {
        Inbox { buf: Box::new([0; LEN]), start: 0, end: 0, at: 0, fds: Vec::new() }
    }

    /// The header of the next message, when its 16 bytes are here.
    fn header(&self) -> Option<Header> {
        let head = self.buf.get(self.start..self.start + HEADER_LEN)?;
        (self.start + HEADER_LEN <= self.end)
            .then(|| Header::decode(head.try_into().expect("16 bytes")))
    }

    /// Whether [`Inbox::read`] would return without receiving: a whole message (or a header
    /// it refuses) is here.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn ready(&self, limit: u32) -> bool {
        self.header().is_some_and(|h| {
            !(HEADER_LEN as u32..=limit).contains(&h.size)
                || h.size as usize <= self.end - self.start
        })
    }

    /// The next message: from what is here, receiving (with `recv`) as much more as it needs.
    /// `recv` fills as much of the slice as it can and returns how much, with the fds that
    /// came along.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn read<E>(
        &mut self,
        limit: u32,
        mut recv: impl FnMut(&mut [u8]) -> Result<(usize, Vec<OwnedFd>), E>,
    ) -> Result<Message, ReadError<E>> {
        loop {
            if let Some(header) = self.header() {
                if !(HEADER_LEN as u32..=limit).contains(&header.size) {
                    return Err(ReadError::Size(header));
                }
                let size = header.size as usize;
                if size <= self.end - self.start {
                    return Ok(self.take(header, size));
                }
                if size > LEN {
                    return self.read_large(header, recv);
                }
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let (n, fds) = recv(&mut self.buf[self.end..]).map_err(ReadError::Recv)?;
            if n == 0 {
                return Err(ReadError::Closed(self.header().map(|h| h.size)));
            }
            if !fds.is_empty() {
                let owner = self.last_start(self.end + n);
                self.fds.push((owner, fds));
            }
            self.end += n;
        }
    }

    /// The stream position of the last message that starts before `buf[end]`.
    fn last_start(&self, end: usize) -> u64 {
        let mut s = self.start;
        while s + HEADER_LEN <= end {
            let size = Header::decode(self.buf[s..s + HEADER_LEN].try_into().expect("16 bytes"))
                .size as usize;
            match s.checked_add(size) {
                Some(next) if size >= HEADER_LEN && next < end => s = next,
                _ => break,
            }
        }
        self.at + (s - self.start) as u64
    }

    /// The fds of the message at the front.
    fn take_fds(&mut self) -> Vec<OwnedFd> {
        let at = self.at;
        let mut mine = Vec::new();
        self.fds.retain_mut(|(owner, fds)| match *owner <= at {
            true => {
                mine.append(fds);
                false
            }
            false => true,
        });
        mine
    }

    /// The front message, which is here whole, `size` bytes.
    fn take(&mut self, header: Header, size: usize) -> Message {
        let payload = self.buf[self.start + HEADER_LEN..self.start + size].to_vec();
        let fds = self.take_fds();
        self.start += size;
        self.at += size as u64;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        Message { header, payload, fds }
    }

    /// The front message, too large for the buffer (all it holds is this message's): the rest
    /// is received straight into its payload.
    fn read_large<E>(
        &mut self,
        header: Header,
        mut recv: impl FnMut(&mut [u8]) -> Result<(usize, Vec<OwnedFd>), E>,
    ) -> Result<Message, ReadError<E>> {
        let mut payload = vec![0u8; header.size as usize - HEADER_LEN];
        let have = self.end - self.start - HEADER_LEN;
        payload[..have].copy_from_slice(&self.buf[self.start + HEADER_LEN..self.end]);
        let mut fds = self.take_fds();
        self.at += header.size as u64;
        (self.start, self.end) = (0, 0);
        let mut done = have;
        while done < payload.len() {
            let (n, more) = recv(&mut payload[done..]).map_err(ReadError::Recv)?;
            if n == 0 {
                return Err(ReadError::Closed(Some(header.size)));
            }
            fds.extend(more);
            done += n;
        }
        Ok(Message { header, payload, fds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::SysResult;
    use crate::vfio_user::proto;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    /// A receiver that hands out `chunks` in turn (each at most as much as fits), with
    /// `fds[i]` fds on chunk i, then end of stream.
    fn script(
        chunks: Vec<Vec<u8>>,
        fds: Vec<usize>,
    ) -> impl FnMut(&mut [u8]) -> SysResult<(usize, Vec<OwnedFd>)> {
        let mut queue: std::collections::VecDeque<(Vec<u8>, usize)> =
            chunks.into_iter().zip(fds.into_iter().chain(std::iter::repeat(0))).collect();
        move |buf| {
            let Some((mut chunk, nfds)) = queue.pop_front() else { return Ok((0, Vec::new())) };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                queue.push_front((chunk.split_off(n), 0));
            }
            Ok((n, (0..nfds).map(|_| fd()).collect()))
        }
    }

    fn reply(id: u16, payload_len: usize) -> Vec<u8> {
        proto::reply(id, proto::REGION_READ, &[&vec![id as u8; payload_len]])
    }

    const LIMIT: u32 = (1 << 20) + (64 << 10);

    #[test]
    fn one_receive_brings_a_message_and_what_follows_waits() {
        let (a, b) = (reply(1, 20), reply(2, 4));
        let mut inbox = Inbox::new();
        let calls = std::cell::Cell::new(0);
        let mut recv =
            script(vec![[a.clone(), b[..10].to_vec()].concat(), b[10..].to_vec()], vec![]);
        let mut counted = |buf: &mut [u8]| {
            calls.set(calls.get() + 1);
            recv(buf)
        };
        let m = inbox.read(LIMIT, &mut counted).unwrap();
        assert_eq!((m.header.id, m.payload, m.fds.len()), (1, vec![1; 20], 0));
        assert!(!inbox.ready(LIMIT), "half of the second message is here");
        let m = inbox.read(LIMIT, &mut counted).unwrap();
        assert_eq!((m.header.id, m.payload), (2, vec![2; 4]));
        assert_eq!(calls.get(), 2);
        assert_eq!(inbox.read(LIMIT, &mut counted).unwrap_err(), ReadError::Closed(None));
    }

    #[test]
    fn fds_go_with_the_message_their_bytes_start() {
        let (a, b, c) = (reply(1, 8), reply(2, 8), reply(3, 8));
        let mut inbox = Inbox::new();
        // The first receive holds a and the start of b, with b's fds (the kernel ends a
        // receive right after the bytes that carry fds); then the rest of b and c, with none.
        let mut recv = script(
            vec![[a.clone(), b[..4].to_vec()].concat(), [b[4..].to_vec(), c.clone()].concat()],
            vec![2, 0],
        );
        let ids_fds: Vec<_> = (0..3)
            .map(|_| inbox.read(LIMIT, &mut recv).map(|m| (m.header.id, m.fds.len())).unwrap())
            .collect();
        assert_eq!(ids_fds, [(1, 0), (2, 2), (3, 0)]);
        // A message written in parts, its fds on the second: they are still its own.
        let mut recv = script(vec![b[..20].to_vec(), b[20..].to_vec()], vec![0, 1]);
        let m = Inbox::new().read(LIMIT, &mut recv).unwrap();
        assert_eq!((m.header.id, m.fds.len()), (2, 1));
        // Fds on the receive that starts with a new message's first byte are that message's.
        let mut recv = script(vec![a.clone(), b.clone()], vec![0, 3]);
        let mut inbox = Inbox::new();
        assert_eq!(inbox.read(LIMIT, &mut recv).unwrap().fds.len(), 0);
        assert_eq!(inbox.read(LIMIT, &mut recv).unwrap().fds.len(), 3);
    }

    #[test]
    fn a_large_message_is_received_into_its_payload() {
        let big = reply(7, 3 * LEN);
        let mut recv = script(big.chunks(1000).map(<[u8]>::to_vec).collect(), vec![1]);
        let mut inbox = Inbox::new();
        let m = inbox.read(LIMIT, &mut recv).unwrap();
        assert_eq!((m.header.id, m.payload.len(), m.fds.len()), (7, 3 * LEN, 1));
        assert!(m.payload.iter().all(|&b| b == 7));
        assert_eq!(inbox.read(LIMIT, &mut recv).unwrap_err(), ReadError::Closed(None));
    }

    #[test]
    fn impossible_sizes_and_truncation_are_told() {
        let mut head = reply(1, 0);
        head[4..8].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(
            Inbox::new().read(LIMIT, script(vec![head.clone()], vec![])),
            Err(ReadError::Size(h)) if h.size == 8
        ));
        head[4..8].copy_from_slice(&(LIMIT + 1).to_ne_bytes());
        assert!(matches!(
            Inbox::new().read(LIMIT, script(vec![head], vec![])),
            Err(ReadError::Size(_))
        ));
        let a = reply(1, 84);
        let got = Inbox::new().read(LIMIT, script(vec![a[..40].to_vec()], vec![]));
        assert_eq!(got.unwrap_err(), ReadError::Closed(Some(100)));
        let got = Inbox::new().read(LIMIT, script(vec![a[..10].to_vec()], vec![]));
        assert_eq!(got.unwrap_err(), ReadError::Closed(None), "a header cut short");
        let big = reply(1, 2 * LEN);
        let got = Inbox::new().read(LIMIT, script(vec![big[..LEN + 100].to_vec()], vec![]));
        assert_eq!(got.unwrap_err(), ReadError::Closed(Some(big.len() as u32)));
    }
}
