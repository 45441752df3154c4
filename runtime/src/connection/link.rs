//! The transport under a [`Connection`](super::Connection): bytes over real
//! pipes, descriptors and large messages over a side Unix socket.
//!
//! Measured on the project VM (C ping-pong, 24-byte messages, medians):
//! `pipe(2)` 2.9 µs, a Unix stream socket with `read`/`write` 4.6 µs, the
//! same socket with `sendmsg`/`recvmsg` and room for descriptors 5.2 µs.
//! The socket itself is the cost, so the common message (no descriptors,
//! small) goes over a pipe:
//!
//! - A frame on the pipe is a 16-byte header (`u64` payload length, `u32`
//!   tag, `u32` flags, little endian) and its payload. A frame of at most
//!   `PIPE_BUF` bytes is written with one `writev`, which the kernel makes
//!   atomic: concurrent senders on one end never interleave such messages.
//! - A message that carries descriptors, or is larger than that, is a
//!   *marker* header on the pipe (flag [`SIDE`]) followed by one
//!   [`Channel`] frame on the side socket (descriptors attached with
//!   SCM_RIGHTS). The marker goes first, so a large message streams while
//!   the receiver reads it; the receiver, on a marker, reads the next
//!   frame of the side socket. With one sender the order is exact; with
//!   several senders on one end each message still arrives whole with its
//!   own descriptors (the order between concurrent senders is unspecified
//!   anyway).
//!
//! The end of stream is the pipe's: once every copy of the peer's write
//! end is closed, `read` returns 0 and the receiver reports
//! [`Error::Disconnected`]. A write to a pipe whose reader is gone is
//! `EPIPE` (std and the child runtime ignore SIGPIPE), also `Disconnected`.

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;

use crate::error::{Error, Result};
use crate::sys;
use crate::wire::{self, Channel, DEFAULT_MAX_FRAME, remaining};

/// Bytes of a frame header on the pipe.
pub(crate) const HEADER: usize = 16;
/// Writes up to this many bytes to a pipe are atomic (POSIX `PIPE_BUF`).
const PIPE_BUF: usize = 4096;
/// The largest payload carried on the pipe itself.
const INLINE_MAX: usize = PIPE_BUF - HEADER;
const READ_BUF: usize = 16 * 1024;
/// Header flag: the message is the next frame on the side socket.
const SIDE: u32 = 1;

fn io_error(context: &'static str, errno: Errno) -> Error {
    match errno {
        Errno::EPIPE | Errno::ECONNRESET => Error::Disconnected,
        e => Error::errno(context, e),
    }
}

fn header(len: u64, tag: u32, flags: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&len.to_le_bytes());
    h[8..12].copy_from_slice(&tag.to_le_bytes());
    h[12..].copy_from_slice(&flags.to_le_bytes());
    h
}

/// One end of a pipe pair plus its side socket.
#[derive(Debug)]
pub(crate) struct Link {
    /// Read end of the pipe from the peer (`None` for a simplex sender).
    rx: Option<OwnedFd>,
    /// Write end of the pipe to the peer (`None` for a simplex receiver).
    tx: Option<OwnedFd>,
    side: Channel,
    /// Allocated on the first read.
    rbuf: Box<[u8]>,
    start: usize,
    end: usize,
    /// A marker was read but its side frame was not (a timeout hit first).
    pending_side: bool,
    max_frame: u64,
}

impl Link {
    pub(crate) fn from_fds(rx: Option<OwnedFd>, tx: Option<OwnedFd>, side: OwnedFd) -> Link {
        Link {
            rx,
            tx,
            side: Channel::new(side),
            rbuf: Box::default(),
            start: 0,
            end: 0,
            pending_side: false,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }

    /// Two connected duplex ends.
    pub(crate) fn duplex() -> Result<(Link, Link)> {
        let (a_rx, b_tx) = sys::pipe()?;
        let (b_rx, a_tx) = sys::pipe()?;
        let (a_side, b_side) = sys::socketpair()?;
        Ok((
            Link::from_fds(Some(a_rx), Some(a_tx), a_side),
            Link::from_fds(Some(b_rx), Some(b_tx), b_side),
        ))
    }

    /// A one-way pair: `(receiving end, sending end)`.
    pub(crate) fn simplex() -> Result<(Link, Link)> {
        let (rx, tx) = sys::pipe()?;
        let (a_side, b_side) = sys::socketpair()?;
        Ok((
            Link::from_fds(Some(rx), None, a_side),
            Link::from_fds(None, Some(tx), b_side),
        ))
    }

    /// The descriptors that make up this end: `(rx, tx, side)`.
    pub(crate) fn fds(
        &self,
    ) -> (
        Option<BorrowedFd<'_>>,
        Option<BorrowedFd<'_>>,
        BorrowedFd<'_>,
    ) {
        (
            self.rx.as_ref().map(AsFd::as_fd),
            self.tx.as_ref().map(AsFd::as_fd),
            self.side.fd(),
        )
    }

    /// The descriptor that is readable when a message (or the end of
    /// stream) is there: the pipe's read end (the side socket for a
    /// sending-only end).
    pub(crate) fn read_fd(&self) -> BorrowedFd<'_> {
        match &self.rx {
            Some(rx) => rx.as_fd(),
            None => self.side.fd(),
        }
    }

    /// The descriptor messages are written to (the side socket for a
    /// receiving-only end).
    pub(crate) fn write_fd(&self) -> BorrowedFd<'_> {
        match &self.tx {
            Some(tx) => tx.as_fd(),
            None => self.side.fd(),
        }
    }

    pub(crate) fn set_max_frame(&mut self, max: u64) {
        self.max_frame = max;
        self.side.set_max_frame(max);
    }

    /// `true` when something was read and not yet handed out (such an end
    /// cannot move to another process without losing it).
    pub(crate) fn has_buffered_data(&self) -> bool {
        self.start != self.end || self.pending_side || self.side.has_buffered_data()
    }

    /// `true` when a message can be handed out without waiting on the pipe
    /// (a whole header is buffered, or a side frame is due).
    pub(crate) fn ready_now(&self) -> bool {
        self.end - self.start >= HEADER || self.pending_side
    }

    /// Sends one message whose payload is `frame[HEADER..]`; the caller
    /// leaves the first [`HEADER`] bytes free, so that a message that goes
    /// on the pipe is one plain `write` (measured cheaper than `writev`).
    pub(crate) fn send_framed(&self, tag: u32, frame: &mut [u8], fds: &[OwnedFd]) -> Result<()> {
        let len = frame.len().saturating_sub(HEADER);
        if !fds.is_empty() || len > INLINE_MAX || frame.len() < HEADER {
            return self.send(tag, &[frame.get(HEADER..).unwrap_or(&[])], fds);
        }
        frame[..HEADER].copy_from_slice(&header(len as u64, tag, 0));
        let n = sys::write(self.tx_fd()?, frame).map_err(|e| io_error("send", e))?;
        // At most PIPE_BUF bytes to a blocking pipe: all or nothing.
        if n != frame.len() {
            return Err(Error::invalid("a short write to a pipe"));
        }
        Ok(())
    }

    fn tx_fd(&self) -> Result<BorrowedFd<'_>> {
        self.tx
            .as_ref()
            .map(AsFd::as_fd)
            .ok_or_else(|| Error::invalid("this end of the pipe cannot send"))
    }

    /// Sends one message whose payload is the concatenation of `parts`.
    pub(crate) fn send(&self, tag: u32, parts: &[&[u8]], fds: &[OwnedFd]) -> Result<()> {
        let tx = self.tx_fd()?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if fds.is_empty() && len <= INLINE_MAX && parts.len() < 8 {
            let h = header(len as u64, tag, 0);
            let mut slices = [IoSlice::new(&[]); 8];
            slices[0] = IoSlice::new(&h);
            for (slot, part) in slices[1..].iter_mut().zip(parts) {
                *slot = IoSlice::new(part);
            }
            let slices = &slices[..=parts.len()];
            let n = sys::writev(tx, slices).map_err(|e| io_error("send", e))?;
            // At most PIPE_BUF bytes to a blocking pipe: all or nothing.
            if n != HEADER + len {
                return Err(Error::invalid("a short write to a pipe"));
            }
            return Ok(());
        }
        let h = header(0, tag, SIDE);
        let n = sys::writev(tx, &[IoSlice::new(&h)]).map_err(|e| io_error("send", e))?;
        if n != HEADER {
            return Err(Error::invalid("a short write to a pipe"));
        }
        self.side.send(tag, parts, fds)
    }

    /// Waits until a message can be read, or `timeout`. `Ok(true)`:
    /// readable (a message, or the end of stream).
    pub(crate) fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        if self.ready_now() {
            return Ok(true);
        }
        let ev = sys::poll_one(self.read_fd(), PollFlags::POLLIN, timeout)?;
        Ok(!ev.is_empty())
    }

    /// Reads at least one more byte from the pipe. `Ok(false)` at end of
    /// stream, `Err(Timeout)` when the deadline passes first.
    fn fill(&mut self, deadline: Option<Instant>) -> Result<bool> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| Error::invalid("this end of the pipe cannot receive"))?;
        wire::make_room(&mut self.rbuf, &mut self.start, &mut self.end, READ_BUF);
        if let Some(left) = remaining(deadline) {
            let ev = sys::poll_one(rx.as_fd(), PollFlags::POLLIN, Some(left))?;
            if ev.is_empty() {
                return Err(Error::Timeout);
            }
        }
        let n =
            sys::read(rx.as_fd(), &mut self.rbuf[self.end..]).map_err(|e| io_error("recv", e))?;
        self.end += n;
        Ok(n > 0)
    }

    /// Receives one message into `bytes` (cleared first), appending its
    /// descriptors to `fds`; returns its tag. `Err(Disconnected)` at end of
    /// stream, `Err(Timeout)` if `timeout` passes first (nothing is lost:
    /// the next call resumes), `Err(MessageTooLarge)` for a message over
    /// the limit (skipped; the end stays usable).
    pub(crate) fn recv_into(
        &mut self,
        bytes: &mut Vec<u8>,
        fds: &mut Vec<OwnedFd>,
        timeout: Option<Duration>,
    ) -> Result<u32> {
        let deadline = timeout.map(|t| Instant::now() + t);
        if self.pending_side {
            return self.recv_side(bytes, fds, deadline);
        }
        // Inline frames are written atomically, so once the header is here
        // the payload is too: only the header wait can time out.
        while self.end - self.start < HEADER {
            if !self.fill(deadline)? {
                return Err(Error::Disconnected);
            }
        }
        let mut len_b = [0u8; 8];
        len_b.copy_from_slice(&self.rbuf[self.start..self.start + 8]);
        let len = u64::from_le_bytes(len_b);
        let mut word = [0u8; 4];
        word.copy_from_slice(&self.rbuf[self.start + 8..self.start + 12]);
        let tag = u32::from_le_bytes(word);
        word.copy_from_slice(&self.rbuf[self.start + 12..self.start + 16]);
        let flags = u32::from_le_bytes(word);
        self.start += HEADER;
        if flags & SIDE != 0 {
            self.pending_side = true;
            return self.recv_side(bytes, fds, deadline);
        }
        bytes.clear();
        if len > INLINE_MAX as u64 {
            return Err(Error::Decode {
                message: "a malformed frame on a pipe".into(),
            });
        }
        let len = len as usize;
        while self.end - self.start < len {
            if !self.fill(None)? {
                return Err(Error::Disconnected);
            }
        }
        let payload = &self.rbuf[self.start..self.start + len];
        self.start += len;
        if len as u64 > self.max_frame {
            return Err(Error::MessageTooLarge {
                size: len as u64,
                limit: self.max_frame,
            });
        }
        bytes.extend_from_slice(payload);
        Ok(tag)
    }

    fn recv_side(
        &mut self,
        bytes: &mut Vec<u8>,
        fds: &mut Vec<OwnedFd>,
        deadline: Option<Instant>,
    ) -> Result<u32> {
        // Only the wait for the frame's first byte is bounded: the sender
        // writes the frame right after its marker, and a frame abandoned
        // halfway would leave the socket out of step.
        if deadline.is_some() && !self.side.poll(remaining(deadline))? {
            return Err(Error::Timeout);
        }
        self.pending_side = false;
        self.side.recv_into(bytes, fds, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Option<Duration> = Some(Duration::from_secs(10));

    fn recv(link: &mut Link, timeout: Option<Duration>) -> Result<(u32, Vec<u8>, usize)> {
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        let tag = link.recv_into(&mut bytes, &mut fds, timeout)?;
        Ok((tag, bytes, fds.len()))
    }

    #[test]
    fn inline_side_and_large_messages_keep_their_order() {
        let (a, mut b) = Link::duplex().expect("duplex");
        let file: OwnedFd = std::fs::File::open("/dev/null").expect("open").into();
        let big = vec![5u8; 3 * INLINE_MAX];
        let edge = vec![6u8; INLINE_MAX];
        let mut framed = vec![0u8; HEADER + 3];
        framed[HEADER..].copy_from_slice(b"abc");
        let t = std::thread::spawn(move || {
            a.send(1, &[b"one"], &[]).expect("inline");
            a.send(2, &[b"two"], &[file]).expect("with a descriptor");
            a.send(3, &[&big], &[]).expect("large");
            a.send(4, &[&edge], &[]).expect("largest inline");
            a.send_framed(5, &mut framed, &[]).expect("framed");
            a.send(6, &[], &[]).expect("empty");
            a
        });
        assert_eq!(recv(&mut b, LONG).expect("1"), (1, b"one".to_vec(), 0));
        assert_eq!(recv(&mut b, LONG).expect("2"), (2, b"two".to_vec(), 1));
        assert_eq!(
            recv(&mut b, LONG).expect("3"),
            (3, vec![5u8; 3 * INLINE_MAX], 0)
        );
        assert_eq!(
            recv(&mut b, LONG).expect("4"),
            (4, vec![6u8; INLINE_MAX], 0)
        );
        assert_eq!(recv(&mut b, LONG).expect("5"), (5, b"abc".to_vec(), 0));
        assert_eq!(recv(&mut b, LONG).expect("6"), (6, Vec::new(), 0));
        let a = t.join().expect("join");
        drop(a);
        assert!(recv(&mut b, LONG).expect_err("eof").is_disconnected());
    }

    #[test]
    fn a_timeout_between_marker_and_side_frame_loses_nothing() {
        let (mut b, a) = Link::simplex().expect("simplex");
        let (b_rx, a_tx) = (&mut b, &a);
        // Only the marker: the side frame has not been sent yet.
        let marker = header(0, 9, SIDE);
        sys::write(a_tx.tx_fd().expect("tx"), &marker).expect("marker");
        let err = recv(b_rx, Some(Duration::from_millis(20))).expect_err("timeout");
        assert!(err.is_timeout(), "{err}");
        assert!(b_rx.ready_now() && b_rx.has_buffered_data());
        a_tx.side.send(9, &[b"late"], &[]).expect("side frame");
        a_tx.send(10, &[b"next"], &[]).expect("inline");
        assert_eq!(recv(b_rx, LONG).expect("late"), (9, b"late".to_vec(), 0));
        assert_eq!(recv(b_rx, LONG).expect("next"), (10, b"next".to_vec(), 0));
    }

    #[test]
    fn limit_applies_on_both_paths_and_the_end_stays_usable() {
        let (a, mut b) = Link::duplex().expect("duplex");
        b.set_max_frame(4);
        a.send(1, &[b"too long"], &[]).expect("inline");
        let file: OwnedFd = std::fs::File::open("/dev/null").expect("open").into();
        a.send(2, &[b"too long too"], &[file]).expect("side");
        a.send(3, &[b"ok"], &[]).expect("inline");
        for size in [8, 12] {
            let err = recv(&mut b, LONG).expect_err("too large");
            assert!(
                matches!(err, Error::MessageTooLarge { size: s, limit: 4 } if s == size),
                "{err}"
            );
        }
        assert_eq!(recv(&mut b, LONG).expect("ok"), (3, b"ok".to_vec(), 0));
    }

    #[test]
    fn a_simplex_end_refuses_the_wrong_direction() {
        let (rx, tx) = Link::simplex().expect("simplex");
        assert!(rx.send(1, &[b"x"], &[]).is_err());
        let mut tx = tx;
        assert!(recv(&mut tx, Some(Duration::ZERO)).is_err());
        drop(rx);
        let err = tx.send(1, &[b"x"], &[]).expect_err("receiver gone");
        assert!(err.is_disconnected(), "{err}");
    }
}
