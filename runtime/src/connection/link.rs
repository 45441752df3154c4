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
//!   `PIPE_BUF` bytes is written with one `write`, which the kernel makes
//!   atomic: concurrent senders on one end never interleave such messages,
//!   and they take no lock.
//! - A message that carries descriptors, or is larger than that, is a
//!   *marker* header on the pipe (flag [`SIDE`]) followed by one
//!   [`Channel`] frame on the side socket (descriptors attached with
//!   SCM_RIGHTS). The marker goes first, so a large message streams while
//!   the receiver reads it; the receiver, on a marker, reads the next
//!   frame of the side socket. Those writes are not atomic, so the sender
//!   holds the end's [`SendLock`] across marker and frame: concurrent
//!   senders on one end (threads, or processes holding copies of it) each
//!   get their messages through whole, in their own order.
//!
//! The receiver trusts nothing it reads (see [`crate::wire`] for the side
//! socket): a pipe frame is handed out only once it is whole, so a timed
//! receive returns by its deadline whatever was written, and what arrived
//! stays buffered for the next call; a header no sender writes (unknown
//! flags, a length over `PIPE_BUF`) makes the end corrupt, reported once as
//! [`Error::Io`] of kind `InvalidData`, then [`Error::Disconnected`].
//!
//! The end of stream is the pipe's: once every copy of the peer's write
//! end is closed, `read` returns 0 and the receiver reports
//! [`Error::Disconnected`]. A write to a pipe whose reader is gone is
//! `EPIPE` (std and the child runtime ignore SIGPIPE), also `Disconnected`.
//!
//! # Spinning before a receive sleeps
//!
//! A receive that finds the pipe empty looks at it again without blocking
//! (`preadv2` with `RWF_NOWAIT`, so the end itself stays a blocking one
//! for every process that holds a copy; `poll` and `read` on a kernel
//! without it), back to back for 5 µs and then yielding between looks, for
//! up to its end's budget, at most 200 µs, before it sleeps (see
//! [`crate::spin`]: the budget follows how long this end's receives
//! waited, so an end whose peer answers in microseconds keeps spinning
//! and one whose messages come rarely soon sleeps at once; nobody spins
//! on a single CPU, nor while the machine has more runnable threads than
//! CPUs). A sleeping receiver costs its peer's `write` a wake-up, and on
//! this project's VM an idle vCPU takes 10-100 µs to wake: a round trip
//! between two processes that each have a core was 6-19 µs with sleeping
//! receives, about a raw `pipe(2)` ping-pong's, and is 2-3.6 µs with the
//! spin (`benches/RESULTS-queue.md`, "Pipe spin"). Beside busy processes
//! it is level with before. Without a deadline the sleep is one blocking
//! `read`, as a raw pipe's receiver's; with one, `poll` and a read that
//! does not wait, so that a second reader of the same pipe that took the
//! bytes first leaves this one waiting, not blocked past its deadline. A
//! socket link and the side socket do not spin.
//!
//! # A socket link
//!
//! An end that a [`Listener`](super::Listener) accepted or a
//! [`Client`](super::Client) connected is one stream socket (Unix or TCP)
//! and nothing else: every message is one [`Channel`] frame on it (for a
//! Unix socket, descriptors attached; a TCP socket never carries any), the
//! pipes and the marker are not used. Its peer may be anyone who could
//! reach the address, so its frames' buffers grow as their bytes arrive
//! ([`Channel::set_grow_as_received`]) instead of being reserved from the
//! length a header announces. Concurrent senders (threads, or processes
//! that each hold a copy of the end) take the end's [`SendLock`] for each
//! frame, as a pipe's large messages do; a send that fails in the middle
//! of a frame, or a sender that dies in one, breaks the end for every
//! sender and shuts the socket for writing, so that the peer gets an
//! error instead of waiting for the rest.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;

use super::send_lock::{self, SendLock};
use crate::error::{Error, Result};
use crate::spin;
use crate::sys;
use crate::sys::shm::Mapping;
use crate::wire::{self, Channel, DEFAULT_MAX_FRAME};

/// Bytes of a frame header on the pipe.
pub(crate) const HEADER: usize = 16;
/// Writes up to this many bytes to a pipe are atomic (POSIX `PIPE_BUF`).
const PIPE_BUF: usize = 4096;
/// The largest payload carried on the pipe itself.
const INLINE_MAX: usize = PIPE_BUF - HEADER;
const READ_BUF: usize = 16 * 1024;
/// Header flag: the message is the next frame on the side socket.
const SIDE: u32 = 1;

/// A pipe write that the kernel cut short (it never does for a blocking
/// write, nor for one of at most `PIPE_BUF` bytes): an OS failure, not the
/// caller's.
fn short_write() -> Error {
    Error::io(
        "a short write to a pipe",
        std::io::Error::from(std::io::ErrorKind::WriteZero),
    )
}

fn header(len: u64, tag: u32, flags: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&len.to_le_bytes());
    h[8..12].copy_from_slice(&tag.to_le_bytes());
    h[12..].copy_from_slice(&flags.to_le_bytes());
    h
}

/// What the bytes at the front of the read buffer are.
enum Step {
    /// Not a whole frame yet.
    Need,
    /// A marker: the message is the next side frame.
    Marker,
    /// A whole inline frame.
    Inline { tag: u32, len: usize },
    /// A header no sender writes.
    Malformed,
}

/// A receive's read from the pipe: [`look`](spin::Wait::look) never
/// blocks (`RWF_NOWAIT`, so that the end itself stays blocking, as every
/// process that holds a copy of it expects); [`sleep`](spin::Wait::sleep)
/// without a deadline is one blocking `read`, as a raw pipe's receiver's,
/// and with one a `poll` and a read that does not wait (another reader of
/// the same pipe may have taken the bytes: the wait goes on).
struct PipeRead<'a> {
    fd: BorrowedFd<'a>,
    buf: &'a mut [u8],
}

/// `RWF_NOWAIT` reads work on this kernel's pipes (cleared by the first
/// that does not).
static NOWAIT: AtomicBool = AtomicBool::new(true);

impl PipeRead<'_> {
    fn read(&mut self) -> Result<usize> {
        sys::read(self.fd, self.buf).map_err(|e| Error::transport_errno("recv", e))
    }
}

impl spin::Wait for PipeRead<'_> {
    type Found = usize;
    type Error = Error;

    fn look(&mut self) -> Result<Option<usize>> {
        if NOWAIT.load(Ordering::Relaxed) {
            match sys::read_nowait(self.fd, self.buf) {
                Err(Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENOSYS) => {
                    NOWAIT.store(false, Ordering::Relaxed);
                }
                got => return got.map_err(|e| Error::transport_errno("recv", e)),
            }
        }
        if sys::poll_one(self.fd, PollFlags::POLLIN, Some(Duration::ZERO))?.is_empty() {
            return Ok(None);
        }
        self.read().map(Some)
    }

    fn sleep(&mut self, left: Option<Duration>) -> Result<Option<usize>> {
        let Some(left) = left else {
            return self.read().map(Some);
        };
        if sys::poll_one(self.fd, PollFlags::POLLIN, Some(left))?.is_empty() {
            return Ok(None);
        }
        self.look()
    }
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
    /// Shared by every copy of this end; made by the first message that
    /// needs it or the first copy (see [`send_lock`]).
    lock: OnceLock<SendLock>,
    /// The stream is out of step or over: every receive is `Disconnected`.
    broken: bool,
    /// `Some` for an end that is one stream socket (see the module docs).
    socket: Option<SocketState>,
    /// How long the next receive looks at the pipe before it sleeps
    /// (see [Spinning before a receive sleeps](self#spinning-before-a-receive-sleeps)).
    spin: spin::Budget,
}

/// What a socket link is.
#[derive(Debug, Clone, Copy)]
struct SocketState {
    /// TCP: the peer may be on another machine.
    remote: bool,
}

impl Link {
    pub(crate) fn from_fds(
        rx: Option<OwnedFd>,
        tx: Option<OwnedFd>,
        side: OwnedFd,
        lock: Option<Mapping>,
    ) -> Result<Link> {
        let cell = OnceLock::new();
        if let Some(map) = lock {
            let _ = cell.set(SendLock::from_map(map)?);
        }
        Ok(Link {
            rx,
            tx,
            side: Channel::new(side),
            rbuf: Box::default(),
            start: 0,
            end: 0,
            pending_side: false,
            max_frame: DEFAULT_MAX_FRAME,
            lock: cell,
            broken: false,
            socket: None,
            spin: spin::Budget::NEEDS_ROOM,
        })
    }

    /// An end that is one connected stream socket, read through `channel`
    /// (see the module docs); `remote` for TCP.
    pub(crate) fn socket(mut channel: Channel, remote: bool) -> Link {
        channel.set_grow_as_received();
        Link {
            rx: None,
            tx: None,
            side: channel,
            rbuf: Box::default(),
            start: 0,
            end: 0,
            pending_side: false,
            max_frame: DEFAULT_MAX_FRAME,
            lock: OnceLock::new(),
            broken: false,
            socket: Some(SocketState { remote }),
            spin: spin::Budget::NEEDS_ROOM,
        }
    }

    /// A socket link received from another process: its socket and the
    /// send lock every copy shares.
    pub(crate) fn socket_from_fds(side: OwnedFd, lock: Mapping, remote: bool) -> Result<Link> {
        let link = Link::socket(Channel::new(side), remote);
        let _ = link.lock.set(SendLock::from_map(lock)?);
        Ok(link)
    }

    /// `true` for an end whose peer may be on another machine (TCP): it
    /// carries no descriptors.
    pub(crate) fn is_remote(&self) -> bool {
        self.socket.as_ref().is_some_and(|s| s.remote)
    }

    /// `true` for an end that is one socket (a listener's or a client's).
    pub(crate) fn is_socket(&self) -> bool {
        self.socket.is_some()
    }

    /// Two connected duplex ends.
    pub(crate) fn duplex() -> Result<(Link, Link)> {
        let (a_rx, b_tx) = sys::pipe()?;
        let (b_rx, a_tx) = sys::pipe()?;
        let (a_side, b_side) = sys::socketpair()?;
        Ok((
            Link::from_fds(Some(a_rx), Some(a_tx), a_side, None)?,
            Link::from_fds(Some(b_rx), Some(b_tx), b_side, None)?,
        ))
    }

    /// A one-way pair: `(receiving end, sending end)`.
    pub(crate) fn simplex() -> Result<(Link, Link)> {
        let (rx, tx) = sys::pipe()?;
        let (a_side, b_side) = sys::socketpair()?;
        Ok((
            Link::from_fds(Some(rx), None, a_side, None)?,
            Link::from_fds(None, Some(tx), b_side, None)?,
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

    /// The send lock's memfd and its size, for a copy of this end (`None`
    /// for an end that cannot send). Creates the lock if no message needed
    /// it yet.
    pub(crate) fn lock_fd(&self) -> Result<Option<(BorrowedFd<'_>, usize)>> {
        if self.tx.is_none() && self.socket.is_none() {
            return Ok(None);
        }
        let lock = self.send_lock()?;
        Ok(Some((lock.fd(), lock.len())))
    }

    fn send_lock(&self) -> Result<&SendLock> {
        if let Some(lock) = self.lock.get() {
            return Ok(lock);
        }
        // Two threads may race here: one lock wins, both use it.
        let _ = self.lock.set(SendLock::create()?);
        self.lock
            .get()
            .ok_or_else(|| Error::internal("a pipe's send lock could not be set"))
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

    /// Sends one frame on a socket link, under its send lock.
    fn send_socket(
        &self,
        state: SocketState,
        tag: u32,
        parts: &[&[u8]],
        fds: &[OwnedFd],
    ) -> Result<()> {
        if state.remote && !fds.is_empty() {
            // The codec refuses such messages first; this is the backstop.
            return Err(Error::invalid(
                "descriptors cannot be sent over a TCP connection",
            ));
        }
        let guard = match self.send_lock()?.lock() {
            Ok(guard) => guard,
            Err(e) => {
                self.shut_side();
                return Err(e);
            }
        };
        let sent = self.side.send(tag, parts, fds);
        if let Err(e) = &sent {
            // A peer that is gone reads nothing more, so a frame it got
            // half of harms no one; any other failure may have cut a frame
            // short for a peer that still reads: stop the stream.
            if !e.is_disconnected() {
                guard.mark_broken();
                self.shut_side();
            }
        }
        sent
    }

    /// `true` when a receive would not wait on the pipe: a whole frame is
    /// buffered, a side frame is due, or the end is broken (the receive
    /// reports it at once).
    pub(crate) fn ready_now(&self) -> bool {
        if self.socket.is_some() {
            return self.side.has_buffered_outcome();
        }
        self.broken || self.pending_side || !matches!(self.step(), Step::Need)
    }

    fn step(&self) -> Step {
        let avail = self.end - self.start;
        if avail < HEADER {
            return Step::Need;
        }
        let h = &self.rbuf[self.start..self.start + HEADER];
        let mut word = [0u8; 8];
        word.copy_from_slice(&h[..8]);
        let len = u64::from_le_bytes(word);
        let mut word = [0u8; 4];
        word.copy_from_slice(&h[8..12]);
        let tag = u32::from_le_bytes(word);
        word.copy_from_slice(&h[12..16]);
        let flags = u32::from_le_bytes(word);
        match flags {
            SIDE if len == 0 => Step::Marker,
            0 if len <= INLINE_MAX as u64 => {
                let len = len as usize;
                if avail < HEADER + len {
                    Step::Need
                } else {
                    Step::Inline { tag, len }
                }
            }
            _ => Step::Malformed,
        }
    }

    /// Sends one message whose payload is `frame[HEADER..]`; the caller
    /// leaves the first [`HEADER`] bytes free, so that a message that goes
    /// on the pipe is one plain `write` (measured cheaper than `writev`).
    pub(crate) fn send_framed(&self, tag: u32, frame: &mut [u8], fds: &[OwnedFd]) -> Result<()> {
        let len = frame.len().saturating_sub(HEADER);
        if !fds.is_empty() || len > INLINE_MAX || frame.len() < HEADER || self.socket.is_some() {
            return self.send(tag, &[frame.get(HEADER..).unwrap_or(&[])], fds);
        }
        let tx = self.tx_fd()?;
        frame[..HEADER].copy_from_slice(&header(len as u64, tag, 0));
        let n = sys::write(tx, frame).map_err(|e| Error::transport_errno("send", e))?;
        // At most PIPE_BUF bytes to a blocking pipe: all or nothing.
        if n != frame.len() {
            return Err(short_write());
        }
        Ok(())
    }

    /// The pipe to write to, unless this end cannot send or is broken.
    fn tx_fd(&self) -> Result<BorrowedFd<'_>> {
        let tx = self.tx.as_ref().map(AsFd::as_fd).ok_or_else(|| {
            Error::misuse("this end of the pipe cannot send (a receive-only end)")
        })?;
        if self.lock.get().is_some_and(SendLock::is_broken) {
            return Err(send_lock::broken());
        }
        Ok(tx)
    }

    /// Sends one message whose payload is the concatenation of `parts`.
    pub(crate) fn send(&self, tag: u32, parts: &[&[u8]], fds: &[OwnedFd]) -> Result<()> {
        if let Some(state) = self.socket {
            return self.send_socket(state, tag, parts, fds);
        }
        let tx = self.tx_fd()?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if fds.is_empty() && len <= INLINE_MAX && parts.len() < 8 {
            let h = header(len as u64, tag, 0);
            let mut slices = [std::io::IoSlice::new(&[]); 8];
            slices[0] = std::io::IoSlice::new(&h);
            for (slot, part) in slices[1..].iter_mut().zip(parts) {
                *slot = std::io::IoSlice::new(part);
            }
            let slices = &slices[..=parts.len()];
            let n = sys::writev(tx, slices).map_err(|e| Error::transport_errno("send", e))?;
            // At most PIPE_BUF bytes to a blocking pipe: all or nothing.
            if n != HEADER + len {
                return Err(short_write());
            }
            return Ok(());
        }
        let guard = match self.send_lock()?.lock() {
            Ok(guard) => guard,
            Err(e) => {
                self.shut_side();
                return Err(e);
            }
        };
        let h = header(0, tag, SIDE);
        let n = sys::write(tx, &h).map_err(|e| Error::transport_errno("send", e))?;
        if n != HEADER {
            return Err(short_write());
        }
        // The marker is out: a frame that does not follow whole leaves the
        // receiver out of step for good.
        let sent = self.side.send(tag, parts, fds);
        if sent.is_err() {
            guard.mark_broken();
            self.shut_side();
        }
        sent
    }

    /// Ends the side stream for the receiver, who then reports the end
    /// broken instead of waiting for the rest of a frame nobody writes.
    fn shut_side(&self) {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.side.fd()),
            nix::sys::socket::Shutdown::Write,
        );
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
        let rx = self.rx.as_ref().ok_or_else(|| {
            Error::misuse("this end of the pipe cannot receive (a send-only end)")
        })?;
        wire::make_room(&mut self.rbuf, &mut self.start, &mut self.end, READ_BUF);
        if self.end == self.rbuf.len() {
            // Unreachable: a whole inline frame fits the buffer many times.
            return Err(Error::internal("a pipe's read buffer is full"));
        }
        let mut read = PipeRead {
            fd: rx.as_fd(),
            buf: &mut self.rbuf[self.end..],
        };
        let n = spin::wait(&mut self.spin, deadline, &mut read)?.ok_or(Error::Timeout)?;
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
        if self.broken {
            return Err(Error::Disconnected);
        }
        if self.socket.is_some() {
            return self.side.recv_into(bytes, fds, timeout);
        }
        let deadline = wire::deadline(timeout);
        while !self.pending_side {
            match self.step() {
                Step::Need => {
                    if !self.fill(deadline)? {
                        // Between frames or in one: inline frames are
                        // atomic, so a half one was never ours anyway.
                        self.broken = true;
                        return Err(Error::Disconnected);
                    }
                }
                Step::Malformed => {
                    self.broken = true;
                    return Err(wire::corrupt(
                        "the connection is corrupt: its pipe holds a frame header that no \
                         sender writes",
                    ));
                }
                Step::Marker => {
                    self.start += HEADER;
                    self.pending_side = true;
                }
                Step::Inline { tag, len } => {
                    let at = self.start + HEADER;
                    self.start = at + len;
                    bytes.clear();
                    if len as u64 > self.max_frame {
                        return Err(Error::MessageTooLarge {
                            size: len as u64,
                            limit: self.max_frame,
                        });
                    }
                    bytes.try_reserve(len).map_err(|_| {
                        Error::io(
                            "no memory for a received message (it was skipped)",
                            std::io::Error::from(std::io::ErrorKind::OutOfMemory),
                        )
                    })?;
                    bytes.extend_from_slice(&self.rbuf[at..at + len]);
                    return Ok(tag);
                }
            }
        }
        self.recv_side(bytes, fds, deadline)
    }

    fn recv_side(
        &mut self,
        bytes: &mut Vec<u8>,
        fds: &mut Vec<OwnedFd>,
        deadline: Option<Instant>,
    ) -> Result<u32> {
        match self.side.recv_into(bytes, fds, wire::remaining(deadline)) {
            Ok(tag) => {
                self.pending_side = false;
                Ok(tag)
            }
            // The frame stays pending (and what arrived of it buffered).
            Err(Error::Timeout) => Err(Error::Timeout),
            Err(e) => {
                self.pending_side = false;
                if !self.side.is_broken() {
                    // An error of that message alone (too large, no
                    // memory, its descriptors lost): it was skipped.
                    return Err(e);
                }
                self.broken = true;
                if e.is_disconnected() {
                    return Err(wire::corrupt(
                        "the connection is broken: a message announced on its pipe did not \
                         arrive whole on its side socket (did its sender die writing it?)",
                    ));
                }
                Err(e)
            }
        }
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

    fn socket_pair(remote: bool) -> (Link, Link) {
        let (a, b) = sys::socketpair().expect("socketpair");
        (
            Link::socket(Channel::new(a), remote),
            Link::socket(Channel::new(b), remote),
        )
    }

    #[test]
    fn a_socket_link_keeps_concurrent_senders_whole_and_carries_descriptors() {
        let (a, mut b) = socket_pair(false);
        let a = std::sync::Arc::new(a);
        let senders: Vec<_> = (0..3u32)
            .map(|id| {
                let a = std::sync::Arc::clone(&a);
                std::thread::spawn(move || {
                    for seq in 0..20u32 {
                        let msg = vec![id as u8; 1 + (seq as usize * 40_000)];
                        a.send(id, &[&seq.to_le_bytes(), &msg], &[]).expect("send");
                    }
                })
            })
            .collect();
        let mut next = [0u32; 3];
        for _ in 0..60 {
            let (id, bytes, _) = recv(&mut b, LONG).expect("recv");
            let seq = next[id as usize];
            assert_eq!(bytes[..4], seq.to_le_bytes());
            assert_eq!(bytes.len(), 4 + 1 + seq as usize * 40_000);
            assert!(bytes[4..].iter().all(|&x| x == id as u8));
            next[id as usize] += 1;
        }
        for t in senders {
            t.join().expect("sender");
        }
        let file: OwnedFd = std::fs::File::open("/dev/null").expect("open").into();
        a.send(9, &[b"fd"], &[file]).expect("with a descriptor");
        assert_eq!(recv(&mut b, LONG).expect("fd"), (9, b"fd".to_vec(), 1));
        assert!(!b.ready_now());
        a.send(10, &[b"x"], &[]).expect("send");
        assert!(b.poll(LONG).expect("poll"));
        drop(a);
        assert_eq!(recv(&mut b, LONG).expect("x"), (10, b"x".to_vec(), 0));
        assert!(recv(&mut b, LONG).expect_err("eof").is_disconnected());
    }

    #[test]
    fn a_remote_socket_link_sends_no_descriptors() {
        let (a, _b) = socket_pair(true);
        assert!(a.is_remote() && a.is_socket());
        let file: OwnedFd = std::fs::File::open("/dev/null").expect("open").into();
        assert!(a.send(1, &[b"x"], &[file]).is_err());
        a.send(1, &[b"x"], &[]).expect("plain");
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

    const SHORT: Option<Duration> = Some(Duration::from_millis(100));

    /// Runs `f` on a thread and fails the test if it does not finish
    /// within `limit` (a receive that hangs).
    fn within<R: Send + 'static>(limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .expect("the call did not return in time")
    }

    #[test]
    fn two_receivers_on_one_end_share_its_messages_and_keep_their_deadlines() {
        // Two readers of one pipe (two processes holding copies of one
        // end): `poll` may say readable to both while only one gets the
        // bytes; the other must wait again, not block past its deadline.
        let (rx, tx) = Link::simplex().expect("simplex");
        let copy = |link: &Link| {
            Link::from_fds(
                Some(link.read_fd().try_clone_to_owned().expect("dup rx")),
                None,
                link.side.fd().try_clone_to_owned().expect("dup side"),
                None,
            )
            .expect("copy")
        };
        let readers: Vec<Link> = vec![copy(&rx), rx];
        let got = within(Duration::from_secs(30), move || {
            let (seen_tx, seen) = std::sync::mpsc::channel();
            let threads: Vec<_> = readers
                .into_iter()
                .map(|mut link| {
                    let seen_tx = seen_tx.clone();
                    std::thread::spawn(move || {
                        loop {
                            match recv(&mut link, Some(Duration::from_millis(300))) {
                                Ok((tag, _, _)) => seen_tx.send(tag).expect("report"),
                                Err(e) => {
                                    assert!(e.is_timeout(), "{e}");
                                    return;
                                }
                            }
                        }
                    })
                })
                .collect();
            // One message at a time, each while both readers wait for it.
            let mut all = Vec::new();
            for tag in 0..200 {
                tx.send(tag, &[b"m"], &[]).expect("send");
                all.push(
                    seen.recv_timeout(Duration::from_secs(10))
                        .expect("a reader got it"),
                );
            }
            for t in threads {
                t.join().expect("reader");
            }
            all.sort_unstable();
            all
        });
        assert_eq!(got, (0..200).collect::<Vec<u32>>(), "each message once");
    }

    fn raw_write(fd: BorrowedFd<'_>, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            done += sys::write(fd, &bytes[done..]).expect("write");
        }
    }

    fn side_header(len: u64, nfds: u32, tag: u32) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&len.to_le_bytes());
        h[8..12].copy_from_slice(&nfds.to_le_bytes());
        h[12..].copy_from_slice(&tag.to_le_bytes());
        h
    }

    fn is_corrupt(err: &Error) -> bool {
        matches!(err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData)
    }

    #[test]
    fn half_an_inline_frame_times_out_and_resumes() {
        let (mut b, a) = Link::simplex().expect("simplex");
        let tx = a.tx_fd().expect("tx").try_clone_to_owned().expect("dup");
        let mut frame = header(6, 7, 0).to_vec();
        frame.extend_from_slice(b"abcdef");
        raw_write(tx.as_fd(), &frame[..HEADER + 2]);
        let (b, err) = within(Duration::from_secs(10), move || {
            let err = recv(&mut b, SHORT).expect_err("half a frame");
            (b, err)
        });
        assert!(err.is_timeout(), "{err}");
        let mut b = b;
        assert!(!b.ready_now(), "half a frame is not ready");
        raw_write(tx.as_fd(), &frame[HEADER + 2..]);
        assert_eq!(
            recv(&mut b, LONG).expect("whole"),
            (7, b"abcdef".to_vec(), 0)
        );
        drop((a, tx));
    }

    #[test]
    fn a_header_no_sender_writes_is_corrupt_then_disconnected() {
        for (len, flags) in [(1u64 << 63, 0), (5000, 0), (0, 6), (3, SIDE)] {
            let (mut b, a) = Link::simplex().expect("simplex");
            raw_write(a.tx_fd().expect("tx"), &header(len, 1, flags));
            let err = recv(&mut b, SHORT).expect_err("malformed");
            assert!(is_corrupt(&err), "{len} {flags}: {err}");
            assert!(recv(&mut b, SHORT).expect_err("then").is_disconnected());
        }
    }

    #[test]
    fn garbage_on_the_side_socket_never_blocks_a_timed_receive() {
        // A marker, then on the side: random bytes; a header announcing
        // 2^63 bytes; a frame cut short; a header over the limit.
        let mut noise = vec![0u8; 3000];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut cut = side_header(100, 0, 1).to_vec();
        cut.extend_from_slice(&[1; 10]);
        let cases: Vec<Vec<u8>> = vec![
            noise,
            side_header(1 << 63, 0, 1).to_vec(),
            cut,
            side_header(DEFAULT_MAX_FRAME + 1, 0, 1).to_vec(),
        ];
        for side_bytes in cases {
            let (b, a) = Link::simplex().expect("simplex");
            raw_write(a.tx_fd().expect("tx"), &header(0, 1, SIDE));
            raw_write(a.side.fd(), &side_bytes);
            let (b, results) = within(Duration::from_secs(10), move || {
                let mut b = b;
                let results: Vec<Result<(u32, Vec<u8>, usize)>> =
                    (0..3).map(|_| recv(&mut b, SHORT)).collect();
                (b, results)
            });
            for r in &results {
                let err = r.as_ref().expect_err("garbage is not a message");
                assert!(
                    err.is_timeout() || err.is_disconnected() || is_corrupt(err),
                    "{err}"
                );
            }
            drop((a, b));
        }
    }

    #[test]
    fn concurrent_senders_on_one_end_deliver_whole_messages_in_their_order() {
        const PER_THREAD: u32 = 60;
        fn size(id: u32, seq: u32) -> usize {
            1 + (id as usize * 7919 + seq as usize * 104_729) % 300_000
        }
        fn fill(id: u32, seq: u32) -> u8 {
            (id * 131 + seq * 7) as u8
        }
        let (a, b) = Link::duplex().expect("duplex");
        let a = std::sync::Arc::new(a);
        let senders: Vec<_> = (0..3u32)
            .map(|id| {
                let a = std::sync::Arc::clone(&a);
                std::thread::spawn(move || {
                    for seq in 0..PER_THREAD {
                        let mut msg = vec![fill(id, seq); size(id, seq)];
                        msg[0] = id as u8;
                        a.send(id, &[&seq.to_le_bytes(), &msg], &[]).expect("send");
                    }
                })
            })
            .collect();
        let next = within(Duration::from_secs(60), move || {
            let mut b = b;
            let mut next = [0u32; 3];
            for _ in 0..3 * PER_THREAD {
                let (id, bytes, _) = recv(&mut b, LONG).expect("recv");
                let slot = next.get_mut(id as usize).expect("a sender's tag");
                let seq = *slot;
                let mut want = seq.to_le_bytes().to_vec();
                want.push(id as u8);
                want.extend(std::iter::repeat_n(fill(id, seq), size(id, seq) - 1));
                assert!(
                    bytes == want,
                    "message {seq} of sender {id} arrived whole, in order"
                );
                *slot += 1;
            }
            next
        });
        assert_eq!(next, [PER_THREAD; 3]);
        for t in senders {
            t.join().expect("sender");
        }
    }

    #[test]
    fn a_sender_that_died_mid_message_breaks_the_end_clearly() {
        let (mut b, a) = Link::simplex().expect("simplex");
        // What a dying co-writer leaves: its marker, part of its frame, and
        // the lock held in the middle of a message.
        raw_write(a.tx_fd().expect("tx"), &header(0, 1, SIDE));
        raw_write(a.side.fd(), &side_header(50_000, 0, 1));
        raw_write(a.side.fd(), &[0u8; 1000]);
        a.send_lock().expect("lock").fake_dead_holder(true);
        let err = recv(&mut b, SHORT).expect_err("half a frame");
        assert!(err.is_timeout(), "{err}");
        // The next large message finds it: the sender gets a clear error,
        // and so does the receiver (instead of waiting forever).
        let err = a.send(2, &[&[0u8; 10_000]], &[]).expect_err("broken");
        assert!(err.to_string().contains("died"), "{err}");
        let err = a.send(3, &[b"small"], &[]).expect_err("still broken");
        assert!(err.to_string().contains("died"), "{err}");
        let err = recv(&mut b, LONG).expect_err("cut off");
        assert!(is_corrupt(&err), "{err}");
        assert!(recv(&mut b, LONG).expect_err("then").is_disconnected());
    }
}
