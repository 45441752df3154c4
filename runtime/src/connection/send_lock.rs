//! The lock that keeps concurrent senders on one end of a Pipe from
//! interleaving messages that cannot be written atomically.
//!
//! A message of at most `PIPE_BUF` bytes is one pipe write, which the
//! kernel never interleaves, and takes no lock. Any other message is a
//! marker on the pipe plus a frame on the side socket, written by several
//! calls that the senders' calls could interleave with; the sender holds
//! this lock across both, so that frames stay whole and each marker is
//! followed by its own frame (per-sender order is kept).
//!
//! The lock is two 32-bit words in a small memfd shared by every copy of
//! the end, in every process (it travels with the end): the lock word of
//! [`crate::sys::lock`] (holder's thread id; a holder that died is taken
//! over) and a state word. The state records whether the holder is in the
//! middle of a message: a taker-over that finds it so knows the side
//! stream holds half a frame that nobody can finish, marks the end broken
//! and shuts the side socket down for writing, so that the receiver gets
//! an error instead of waiting for the rest of a frame forever. Every
//! later send on that end fails with a clear error.
//!
//! The memfd is created lazily, by the first message that needs the lock
//! or the first copy of the end (whichever comes first): a copy made
//! before any large message already shares it, and a pipe that only ever
//! sends small messages in one process never creates it.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::sys::lock::{self as raw, Acquired};
use crate::sys::shm::Mapping;

/// No message in progress.
const IDLE: u32 = 0;
/// The holder is writing a message (marker and side frame).
const WRITING: u32 = 1;
/// A holder died in the middle of a message: the end is unusable.
const BROKEN: u32 = 2;

/// Bytes of the lock's memfd: the lock word and the state word.
pub(crate) const BYTES: usize = 8;

/// The error of a send on an end that a dying sender left half-written.
pub(super) fn broken() -> Error {
    Error::io(
        "cannot send: a process died in the middle of sending a message on this connection \
         end, which is unusable from then on",
        io::Error::from(io::ErrorKind::BrokenPipe),
    )
}

/// The shared lock of one sending end.
#[derive(Debug)]
pub(super) struct SendLock {
    map: Mapping,
}

impl SendLock {
    /// A new, free lock.
    pub(super) fn create() -> Result<SendLock> {
        SendLock::check(Mapping::create("multiproc-pipe-send", BYTES)?)
    }

    /// The lock of an end received from another process (its memfd
    /// mapped, of [`BYTES`] bytes).
    pub(super) fn from_map(map: Mapping) -> Result<SendLock> {
        SendLock::check(map)
    }

    fn check(map: Mapping) -> Result<SendLock> {
        if map.atomics_u32().len() < 2 {
            return Err(crate::handle::decode("a pipe's send lock is too small"));
        }
        Ok(SendLock { map })
    }

    /// The memfd, to send with a copy of the end.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd()
    }

    /// The memfd's size.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    fn words(&self) -> Option<(&AtomicU32, &AtomicU32)> {
        match self.map.atomics_u32() {
            [lock, state, ..] => Some((lock, state)),
            _ => None,
        }
    }

    /// `true` once a sender died in the middle of a message.
    pub(super) fn is_broken(&self) -> bool {
        self.words()
            .is_some_and(|(_, state)| state.load(Ordering::Relaxed) == BROKEN)
    }

    /// Takes the lock for one message (waiting for another sender to
    /// finish its own). `Err` if the end is broken, found so now or
    /// before: the caller then shuts the side socket down.
    pub(super) fn lock(&self) -> Result<SendGuard<'_>> {
        let (lock, state) = self
            .words()
            .ok_or_else(|| Error::internal("a pipe's send lock is too small"))?;
        let taken_over = match raw::acquire(lock, raw::tid(), None) {
            Acquired::Free => false,
            Acquired::TakenOver => true,
            Acquired::TimedOut => return Err(Error::Timeout),
        };
        // From here the guard frees the lock on every path.
        let guard = SendGuard { lock, state };
        let was = state.load(Ordering::Relaxed);
        if was == BROKEN || (taken_over && was == WRITING) {
            state.store(BROKEN, Ordering::Relaxed);
            return Err(broken());
        }
        state.store(WRITING, Ordering::Relaxed);
        Ok(guard)
    }
}

/// A held send lock; dropping it ends the message and frees the lock.
#[derive(Debug)]
pub(super) struct SendGuard<'a> {
    lock: &'a AtomicU32,
    state: &'a AtomicU32,
}

impl SendGuard<'_> {
    /// The message was left half-written (a failed write): the end is
    /// unusable.
    pub(super) fn mark_broken(self) {
        self.state.store(BROKEN, Ordering::Relaxed);
    }
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        // Keeps BROKEN; ends a message otherwise.
        let _ = self
            .state
            .compare_exchange(WRITING, IDLE, Ordering::Relaxed, Ordering::Relaxed);
        raw::release(self.lock);
    }
}

#[cfg(test)]
impl SendLock {
    /// Makes the lock look held by a thread that died (exited) in the
    /// middle of a message (`writing`) or between two.
    pub(super) fn fake_dead_holder(&self, writing: bool) {
        let (word, state) = self.words().expect("words");
        let dead = std::thread::spawn(raw::tid).join().expect("thread");
        word.store(dead, Ordering::Relaxed);
        state.store(if writing { WRITING } else { IDLE }, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_that_died_writing_breaks_the_end() {
        let lock = SendLock::create().expect("create");
        drop(lock.lock().expect("free"));
        assert!(!lock.is_broken());
        lock.fake_dead_holder(true);
        let (word, _) = lock.words().expect("words");
        let err = lock.lock().expect_err("broken");
        assert!(err.to_string().contains("died"), "{err}");
        assert!(lock.is_broken());
        assert!(lock.lock().is_err());
        assert_eq!(word.load(Ordering::Relaxed), 0, "the lock is free again");
    }

    #[test]
    fn a_holder_that_died_between_messages_does_not() {
        let lock = SendLock::create().expect("create");
        lock.fake_dead_holder(false);
        drop(lock.lock().expect("taken over, not broken"));
        assert!(!lock.is_broken());
    }
}
