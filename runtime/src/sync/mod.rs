//! Synchronization primitives that work across processes and threads:
//! [`Lock`], [`RLock`], [`Semaphore`], [`BoundedSemaphore`], [`Event`],
//! [`Condition`] and [`Barrier`], Python's `multiprocessing` names with
//! std's shapes (RAII guards, [`std::sync::LockResult`]).
//!
//! Each lives in a cell of a shared arena (a memfd of 1 MiB holding
//! thousands of them, never a file in `/dev/shm`), so a process can hold
//! hundreds of thousands of them in a few descriptors; a handle is `Clone`
//! (another handle to the same object) and travels to other processes as
//! an argument, a pool task or a message.
//!
//! # Dead holders
//!
//! None of them is ever deadlocked by a process that dies. A lock word
//! names its holder by process id and start time (thread id and the
//! thread's start time for [`RLock`]); a waiter sleeps at most 100 ms at a
//! time and then checks that the holder still runs. If it does not
//! (killed, crashed, a zombie not yet reaped, or gone and its pid given to
//! another process, which has another start time), the waiter takes the
//! lock over and is told: `acquire` returns `Err(PoisonError)` with the
//! guard inside, as std's `Mutex` does after a panic. The lock then stays
//! poisoned (every later `acquire` reports it) until [`Lock::clear_poison`],
//! because the data it protected may be half-updated. A [`Barrier`] whose
//! waiting party dies breaks for the others
//! ([`Error::BrokenBarrier`](crate::Error)). CPython deadlocks forever in
//! these cases (cpython issue 88304).
//!
//! A holder is only ever judged dead on proof, never on doubt, so the
//! recovery does not happen when the proof cannot be had:
//! - a lock used by processes of two pid namespaces (containers): their
//!   ids mean different things, so such a lock is never taken over;
//! - `/proc` mounted with `hidepid`, or not this namespace's: a missing
//!   entry proves nothing; without a readable `/proc` a process cannot
//!   learn its own start time, and a holder whose start time is unknown
//!   is never taken over;
//! - a holder that had lived less than one clock tick (10 ms) when it
//!   died, whose pid went at once to a new process: the new one is taken
//!   for the holder while it lives.

mod barrier;
mod condition;
mod event;
mod lock;
mod semaphore;

pub use barrier::{Barrier, BarrierBuilder, BarrierWaitResult};
pub use condition::{Condition, ConditionGuard, WaitTimeoutResult};
pub use event::Event;
pub(crate) use lock::Held;
pub use lock::{AnyLock, Lock, LockGuard, RLock, RLockGuard};
pub use semaphore::{BoundedSemaphore, Semaphore};

use std::time::{Duration, Instant};

/// `now + timeout`, or `None` (no deadline) if that overflows.
pub(crate) fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}
