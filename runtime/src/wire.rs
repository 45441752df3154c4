//! Length-framed messages with file descriptors over a Unix stream socket:
//! the one transport between a parent and its children (process start,
//! results, pool tasks) and the substrate of `Pipe`.
//!
//! A frame is a 16-byte header (`u64` payload length, `u32` descriptor
//! count, `u32` tag, little endian) followed by the payload. Descriptors are
//! attached (SCM_RIGHTS) to the first bytes of the frame, so they have
//! always arrived by the time the frame's last byte has; the receiver keeps
//! them in a queue and hands each frame exactly the number its header names.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;

use crate::error::{Error, Result};
use crate::sys;

const HEADER: usize = 16;
const READ_BUF: usize = 64 * 1024;

/// Default largest payload accepted by a receiver: 1 GiB.
pub(crate) const DEFAULT_MAX_FRAME: u64 = 1 << 30;

/// Prepares a read buffer whose unread bytes are `buf[*start..*end]` to
/// take more input: allocated (`size` bytes) on first use, rewound when
/// empty, compacted when full. Used by `Channel` and by the Pipe link.
pub(crate) fn make_room(buf: &mut Box<[u8]>, start: &mut usize, end: &mut usize, size: usize) {
    if *start == *end {
        *start = 0;
        *end = 0;
        if buf.is_empty() {
            *buf = vec![0u8; size].into_boxed_slice();
        }
    } else if *end == buf.len() {
        buf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
    }
}

/// One received message.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) tag: u32,
    pub(crate) bytes: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

/// One end of a framed connection.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: OwnedFd,
    /// Allocated on the first read: a Pipe's side channel may never read.
    rbuf: Box<[u8]>,
    start: usize,
    end: usize,
    fds: VecDeque<OwnedFd>,
    max_frame: u64,
}

fn io_error(context: &'static str, errno: Errno) -> Error {
    match errno {
        Errno::EPIPE | Errno::ECONNRESET => Error::Disconnected,
        e => Error::errno(context, e),
    }
}

impl Channel {
    pub(crate) fn new(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            rbuf: Box::default(),
            start: 0,
            end: 0,
            fds: VecDeque::new(),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }

    /// A connected pair in this process.
    #[cfg(test)]
    pub(crate) fn pair() -> Result<(Channel, Channel)> {
        let (a, b) = sys::socketpair()?;
        Ok((Channel::new(a), Channel::new(b)))
    }

    pub(crate) fn set_max_frame(&mut self, max: u64) {
        self.max_frame = max;
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `true` when bytes or descriptors were read from the socket and not
    /// yet handed out (a handle in that state cannot move to another
    /// process without losing them).
    pub(crate) fn has_buffered_data(&self) -> bool {
        self.start != self.end || !self.fds.is_empty()
    }

    /// Bytes already read from the socket and not yet handed out.
    pub(crate) fn has_buffered_frame(&self) -> bool {
        let n = self.end - self.start;
        if n < HEADER {
            return false;
        }
        let len = u64::from_le_bytes(self.header_bytes(0));
        (n - HEADER) as u64 >= len
    }

    fn header_bytes(&self, at: usize) -> [u8; 8] {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.rbuf[self.start + at..self.start + at + 8]);
        b
    }

    /// Sends one frame whose payload is the concatenation of `parts`.
    pub(crate) fn send(&self, tag: u32, parts: &[&[u8]], fds: &[OwnedFd]) -> Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let nfds = u32::try_from(fds.len())
            .map_err(|_| Error::invalid("too many descriptors in one message"))?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(&len.to_le_bytes());
        header[8..12].copy_from_slice(&nfds.to_le_bytes());
        header[12..].copy_from_slice(&tag.to_le_bytes());
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut batches = raw.chunks(sys::MAX_FDS_PER_MSG);
        let total = HEADER as u64 + len;
        let mut sent: u64 = 0;
        // More than one batch of descriptors: send one header byte with each
        // extra batch so that every batch rides on at least one byte.
        let extra = raw.len().div_ceil(sys::MAX_FDS_PER_MSG).saturating_sub(1);
        while sent < total {
            let batch = batches.next().unwrap_or(&[]);
            let limit = if (sent as usize) < extra {
                1
            } else {
                usize::MAX
            };
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
            let mut skip = sent;
            let mut room = limit;
            for part in std::iter::once(&header[..]).chain(parts.iter().copied()) {
                if room == 0 {
                    break;
                }
                if skip >= part.len() as u64 {
                    skip -= part.len() as u64;
                    continue;
                }
                let rest = &part[skip as usize..];
                skip = 0;
                let take = rest.len().min(room);
                slices.push(IoSlice::new(&rest[..take]));
                room -= take;
                if slices.len() >= 64 {
                    break;
                }
            }
            let n = sys::send_with_fds(self.fd.as_fd(), &slices, batch)
                .map_err(|e| io_error("send", e))?;
            sent += n as u64;
        }
        Ok(())
    }

    /// Fills the read buffer with at least one more byte. `Ok(false)` at
    /// end of stream, `Err(Timeout)` when the deadline passes.
    fn fill(&mut self, deadline: Option<Instant>) -> Result<bool> {
        make_room(&mut self.rbuf, &mut self.start, &mut self.end, READ_BUF);
        self.wait_readable(deadline)?;
        let mut fds = Vec::new();
        let n = sys::recv_with_fds(self.fd.as_fd(), &mut self.rbuf[self.end..], &mut fds)
            .map_err(|e| io_error("recv", e))?;
        self.fds.extend(fds);
        self.end += n;
        Ok(n > 0)
    }

    fn wait_readable(&self, deadline: Option<Instant>) -> Result<()> {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = sys::poll_one(self.fd.as_fd(), PollFlags::POLLIN, Some(left))?;
            if ev.is_empty() {
                return Err(Error::Timeout);
            }
        }
        Ok(())
    }

    /// Waits until a frame can be read without blocking, or `timeout`.
    /// `Ok(true)`: readable (a frame, or end of stream); `Ok(false)`: timeout.
    pub(crate) fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        if self.start != self.end {
            return Ok(true);
        }
        let ev = sys::poll_one(self.fd.as_fd(), PollFlags::POLLIN, timeout)?;
        Ok(!ev.is_empty())
    }

    /// Receives one frame. `Err(Disconnected)` at end of stream,
    /// `Err(Timeout)` if `timeout` passes first, `Err(MessageTooLarge)` for a
    /// frame over the limit (its bytes are skipped; the channel stays usable).
    pub(crate) fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame> {
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        let tag = self.recv_into(&mut bytes, &mut fds, timeout)?;
        Ok(Frame { tag, bytes, fds })
    }

    /// Like [`Channel::recv`], reusing `bytes` (cleared first) and appending
    /// descriptors to `fds`.
    pub(crate) fn recv_into(
        &mut self,
        bytes: &mut Vec<u8>,
        fds: &mut Vec<OwnedFd>,
        timeout: Option<Duration>,
    ) -> Result<u32> {
        let deadline = timeout.map(|t| Instant::now() + t);
        while self.end - self.start < HEADER {
            if !self.fill(deadline)? {
                return Err(Error::Disconnected);
            }
        }
        let len = u64::from_le_bytes(self.header_bytes(0));
        let mut nfds_b = [0u8; 4];
        nfds_b.copy_from_slice(&self.rbuf[self.start + 8..self.start + 12]);
        let nfds = u32::from_le_bytes(nfds_b) as usize;
        let mut tag_b = [0u8; 4];
        tag_b.copy_from_slice(&self.rbuf[self.start + 12..self.start + 16]);
        let tag = u32::from_le_bytes(tag_b);
        self.start += HEADER;

        bytes.clear();
        if len > self.max_frame {
            self.skip(len, deadline)?;
            self.drop_fds(nfds);
            return Err(Error::MessageTooLarge {
                size: len,
                limit: self.max_frame,
            });
        }
        let len = len as usize;
        // A large payload goes straight from the socket into the spare
        // capacity of its destination: no zero-filling, no second copy.
        bytes.reserve(len);
        let have = (self.end - self.start).min(len);
        bytes.extend_from_slice(&self.rbuf[self.start..self.start + have]);
        self.start += have;
        while bytes.len() < len {
            let want = len - bytes.len();
            if want >= READ_BUF / 2 {
                self.wait_readable(deadline)?;
                let n = sys::read_to_spare(self.fd.as_fd(), bytes, want)
                    .map_err(|e| io_error("recv", e))?;
                if n == 0 {
                    return Err(Error::Disconnected);
                }
            } else {
                if !self.fill(deadline)? {
                    return Err(Error::Disconnected);
                }
                let have = (self.end - self.start).min(want);
                bytes.extend_from_slice(&self.rbuf[self.start..self.start + have]);
                self.start += have;
            }
        }
        for _ in 0..nfds {
            match self.fds.pop_front() {
                Some(fd) => fds.push(fd),
                None => {
                    return Err(Error::Decode {
                        message: "a message's descriptors did not arrive".into(),
                    });
                }
            }
        }
        Ok(tag)
    }

    fn skip(&mut self, mut len: u64, deadline: Option<Instant>) -> Result<()> {
        loop {
            let have = ((self.end - self.start) as u64).min(len);
            self.start += have as usize;
            len -= have;
            if len == 0 {
                return Ok(());
            }
            if !self.fill(deadline)? {
                return Err(Error::Disconnected);
            }
        }
    }

    fn drop_fds(&mut self, n: usize) {
        for _ in 0..n {
            self.fds.pop_front();
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_fds() {
        let (a, mut b) = Channel::pair().expect("pair");
        let file: OwnedFd = std::fs::File::open("/dev/null").expect("open").into();
        a.send(7, &[b"hello", b" world"], &[file]).expect("send");
        a.send(8, &[], &[]).expect("send empty");
        let f = b.recv(Some(Duration::from_secs(5))).expect("recv");
        assert_eq!(
            (f.tag, &f.bytes[..], f.fds.len()),
            (7, &b"hello world"[..], 1)
        );
        let f = b.recv(Some(Duration::from_secs(5))).expect("recv");
        assert_eq!((f.tag, f.bytes.len()), (8, 0));
    }

    #[test]
    fn large_frame_and_limit() {
        let (a, mut b) = Channel::pair().expect("pair");
        let big = vec![0xabu8; 3 << 20];
        let t = std::thread::spawn(move || {
            a.send(1, &[&big], &[]).expect("send big");
            a.send(2, &[b"x"], &[]).expect("send small");
            a
        });
        let f = b.recv(Some(Duration::from_secs(10))).expect("recv big");
        assert_eq!(f.bytes.len(), 3 << 20);
        assert!(f.bytes.iter().all(|&x| x == 0xab));
        let a = t.join().expect("join");
        b.set_max_frame(4);
        a.send(3, &[b"too long"], &[]).expect("send");
        a.send(4, &[b"ok"], &[]).expect("send");
        let _ = b.recv(Some(Duration::from_secs(5))).expect("small");
        let err = b.recv(Some(Duration::from_secs(5))).expect_err("too large");
        assert!(
            matches!(err, Error::MessageTooLarge { size: 8, limit: 4 }),
            "{err}"
        );
        assert_eq!(
            b.recv(Some(Duration::from_secs(5))).expect("after").bytes,
            b"ok"
        );
    }

    #[test]
    fn eof_and_timeout() {
        let (a, mut b) = Channel::pair().expect("pair");
        let err = b
            .recv(Some(Duration::from_millis(20)))
            .expect_err("timeout");
        assert!(err.is_timeout());
        drop(a);
        let err = b.recv(Some(Duration::from_secs(5))).expect_err("eof");
        assert!(err.is_disconnected());
    }
}
