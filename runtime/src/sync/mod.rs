//! Synchronization primitives that work across processes and threads:
//! [`Lock`], [`RLock`], [`Semaphore`], [`BoundedSemaphore`], [`Event`],
//! [`Condition`] and [`Barrier`], Python's `multiprocessing` names with
//! std's shapes (RAII guards, [`std::sync::LockResult`]).
//!
//! Each lives in a small shared mapping (a memfd, never a file in
//! `/dev/shm`); a handle is `Clone` (another handle to the same object) and
//! travels to other processes as an argument, a pool task or a message.
//!
//! # Dead holders
//!
//! None of them is ever deadlocked by a process that dies. A lock word
//! holds its holder's process id (thread id for [`RLock`]); a waiter sleeps
//! at most 100 ms at a time and then checks that the holder still runs. If it does not (killed,
//! crashed, a zombie not yet reaped), the waiter takes the lock over and is
//! told: `acquire` returns `Err(PoisonError)` with the guard inside, as
//! std's `Mutex` does after a panic. The lock then stays poisoned (every
//! later `acquire` reports it) until [`Lock::clear_poison`], because the
//! data it protected may be half-updated. A [`Barrier`] whose waiting party
//! dies breaks for the others ([`Error::BrokenBarrier`](crate::Error)).
//! CPython deadlocks forever in these cases (cpython issue 88304).

mod barrier;
mod condition;
mod event;
mod lock;
mod semaphore;

pub use barrier::{Barrier, BarrierWaitResult};
pub use condition::{Condition, ConditionGuard, WaitTimeoutResult};
pub use event::Event;
pub use lock::{Lock, LockGuard, RLock, RLockGuard};
pub use semaphore::{BoundedSemaphore, Semaphore};

use std::time::{Duration, Instant};

/// `now + timeout`, or `None` (no deadline) if that overflows.
pub(crate) fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}
