//! The side socket of a ring: the descriptors of messages that carry
//! handles, one datagram per message (see the ring's docs, "Handles"), and
//! the side lock that orders the walks of its queue.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;

use super::{H_SIDE_LOCK, LIVENESS_EVERY, Ring, corrupt};
use crate::error::{Error, Result};
use crate::queue::protocol::{Slots, TAG_FREE, TAG_MASK, TAG_TOMB, lap_diff};
use crate::sys;
use crate::sys::futex;

/// Bytes of a handle datagram: magic, descriptor count, position id.
pub(super) const DGRAM_LEN: usize = 16;
pub(super) const DGRAM_MAGIC: u32 = 0x6466_706d; // "mpfd"

/// The error of a message whose handles' descriptors the kernel dropped.
fn side_fds_truncated() -> Error {
    Error::io(
        "the kernel dropped descriptors of a queue message's handles (MSG_CTRUNC: is the \
         descriptor table full?); the message was skipped",
        io::Error::other("control message truncated"),
    )
}

/// The side lock, released when dropped.
#[derive(Debug)]
pub(super) struct SideLock<'a> {
    ring: &'a Ring,
}

impl Drop for SideLock<'_> {
    fn drop(&mut self) {
        let w = self.ring.u32w(H_SIDE_LOCK);
        w.store(0, Ordering::Release);
        futex::wake(w, 1);
    }
}

impl Ring {
    /// Sends the handle datagram of `pos` without waiting: `Ok(false)` if
    /// the socket has no room.
    pub(super) fn send_fds(&self, pos: u64, fds: &[OwnedFd]) -> Result<bool> {
        if fds.len() > sys::MAX_FDS_PER_MSG {
            return Err(Error::invalid("too many handles in one queue message"));
        }
        let mut d = [0u8; DGRAM_LEN];
        d[..4].copy_from_slice(&DGRAM_MAGIC.to_le_bytes());
        d[4..8].copy_from_slice(&(fds.len() as u32).to_le_bytes());
        d[8..].copy_from_slice(&self.pos_id(pos).to_le_bytes());
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        match sys::send_with_fds(self.tx.as_fd(), &[io::IoSlice::new(&d)], &raw) {
            Ok(_) => Ok(true),
            Err(Errno::EAGAIN | Errno::ENOBUFS) => Ok(false),
            Err(e) => Err(Error::errno("queue side channel send", e)),
        }
    }

    /// Waits a little (longer each `attempt`) for room in the side socket,
    /// holding nothing. `false` once `deadline` has passed.
    pub(crate) fn wait_side_room(&self, deadline: Option<Instant>, attempt: u32) -> bool {
        let mut slice = Duration::from_millis(1 << attempt.min(5));
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            slice = slice.min(left);
        }
        let _ = sys::poll_one(self.tx.as_fd(), PollFlags::POLLOUT, Some(slice));
        true
    }

    /// Takes the side lock: the right to walk (and trim) the socket's
    /// queue, whose peek offset is shared by every process. Its holder only
    /// makes non-blocking calls. A dead holder's lock is taken over.
    /// `None` if `deadline` passed (without `wait`: after a few attempts).
    pub(super) fn lock_side(&self, deadline: Option<Instant>, wait: bool) -> Option<SideLock<'_>> {
        let w = self.u32w(H_SIDE_LOCK);
        // Release as well as acquire, as a slot claim: whoever reads our
        // name here and looks it up sees our participant entry.
        let me = self.me as u32;
        let mut checked: Option<(u32, Instant)> = None;
        let mut i = 0u32;
        loop {
            i = i.saturating_add(1);
            let holder = match w.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(SideLock { ring: self }),
                Err(holder) => holder,
            };
            if i < 64 {
                std::hint::spin_loop();
                continue;
            }
            if !wait && i >= 128 {
                return None;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return None;
            }
            if holder != me {
                match checked {
                    Some((p, at)) if p == holder => {
                        if now.duration_since(at) >= LIVENESS_EVERY {
                            if !self.alive(u64::from(holder))
                                && w.compare_exchange(
                                    holder,
                                    me,
                                    Ordering::AcqRel,
                                    Ordering::Relaxed,
                                )
                                .is_ok()
                            {
                                return Some(SideLock { ring: self });
                            }
                            checked = Some((holder, now));
                        }
                    }
                    _ => checked = Some((holder, now)),
                }
            }
            if i < 128 {
                std::thread::yield_now();
            } else {
                let mut slice = Duration::from_millis(1);
                if let Some(d) = deadline {
                    slice = slice.min(d.saturating_duration_since(now));
                }
                futex::wait(w, holder, Some(slice));
            }
        }
    }

    /// `true` if the handle datagram of position id `id` is no longer
    /// needed: its position was consumed or tombstoned (or it is garbage).
    fn side_done(&self, id: u64) -> bool {
        let idx = (id & 0xffff_ffff) as usize;
        let Some(slot) = self.checked_state(idx) else {
            return true;
        };
        let s = slot.load(Ordering::Acquire);
        match lap_diff(s, id >> 32) {
            0 => matches!(s & TAG_MASK, TAG_TOMB | TAG_FREE),
            _ => true,
        }
    }

    /// The position id and descriptor count of a handle datagram, `None`
    /// if it is not one.
    fn parse_dgram(bytes: &[u8]) -> Option<(u64, usize)> {
        let d: &[u8; DGRAM_LEN] = bytes.try_into().ok()?;
        if d[..4] != DGRAM_MAGIC.to_le_bytes() {
            return None;
        }
        let mut count = [0u8; 4];
        count.copy_from_slice(&d[4..8]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[8..]);
        Some((u64::from_le_bytes(id), u32::from_le_bytes(count) as usize))
    }

    /// Removes the datagram at the front of the socket (its descriptors are
    /// closed, as are any the kernel could not all install). Side lock held.
    fn drop_front(&self) -> Result<()> {
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        match sys::recv_fds(self.rx.as_fd(), &mut buf, &mut fds) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(Error::io("queue side channel recv", e)),
        }
    }

    /// Duplicates of the handles of position `pos` (taken by us), found by
    /// walking the socket's queue with peeks; datagrams at the front whose
    /// positions are done are removed on the way. Side lock held.
    ///
    /// The message gets exactly the descriptors its datagram declares:
    /// more are closed (none for a datagram that declares none), fewer is
    /// an error of this message, and so is a peek whose descriptors the
    /// kernel had to drop (MSG_CTRUNC, typically a full descriptor table;
    /// those that did arrive are closed). The datagram stays in the socket
    /// until its position is done, as always, so later messages are not
    /// affected.
    ///
    /// Cold and never inlined: only messages with handles walk the socket
    /// (with system calls), and keeping the walk out of `Held::read` keeps
    /// the plain get path as it was (measured: a same-thread 1 KiB get was
    /// some 4% slower with it inlined).
    #[cold]
    #[inline(never)]
    pub(super) fn take_fds(&self, pos: u64) -> Result<Vec<OwnedFd>> {
        let want = self.pos_id(pos);
        let io = |e: io::Error| Error::io("queue side channel peek", e);
        sys::ipc::set_peek_offset(self.rx.as_fd(), 0).map_err(io)?;
        let mut buf = [0u8; 64];
        let mut at_front = true;
        loop {
            let mut fds = Vec::new();
            let got = match sys::ipc::peek_fds(self.rx.as_fd(), &mut buf, &mut fds) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(corrupt("the handles of a queue message are missing"));
                }
                Err(e) => return Err(io(e)),
            };
            let dgram = Ring::parse_dgram(&buf[..got.bytes.min(buf.len())]);
            if at_front && dgram.is_none_or(|(id, _)| self.side_done(id)) {
                // The receive moves the peek offset back to the front.
                drop(fds);
                self.drop_front()?;
                continue;
            }
            at_front = false;
            let Some((id, count)) = dgram else { continue };
            if id != want {
                continue;
            }
            if got.truncated {
                return Err(side_fds_truncated());
            }
            if fds.len() < count {
                return Err(corrupt(format!(
                    "a queue message declares {count} handles, {} arrived",
                    fds.len()
                )));
            }
            fds.truncate(count);
            return Ok(fds);
        }
    }

    /// Removes the datagrams at the front of the socket whose positions are
    /// done, if the side lock is free now.
    pub(super) fn trim_side(&self) {
        let Some(_side) = self.lock_side(None, false) else {
            return;
        };
        if sys::ipc::set_peek_offset(self.rx.as_fd(), 0).is_err() {
            return;
        }
        let mut buf = [0u8; 64];
        loop {
            let mut fds = Vec::new();
            let Ok(got) = sys::ipc::peek_fds(self.rx.as_fd(), &mut buf, &mut fds) else {
                return;
            };
            drop(fds);
            let dgram = Ring::parse_dgram(&buf[..got.bytes.min(buf.len())]);
            if dgram.is_some_and(|(id, _)| !self.side_done(id)) || self.drop_front().is_err() {
                return;
            }
        }
    }
}
