//! [`Condition`].

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LockResult, PoisonError};
use std::time::Duration;

use crate::error::Result;
use crate::handle::{mapped_handle, new_block};
use crate::sys::arena::Block;
use crate::sys::futex;
use crate::sys::lock::RawGuard;
use crate::sys::shm::LOCK_HEADER;

// The lock header, then the u32 words sequence and sleepers.
const SEQ: usize = LOCK_HEADER / 4;
const SLEEPERS: usize = SEQ + 1;
const COND_BYTES: usize = LOCK_HEADER + 8;

/// A condition variable with its own lock, shared by processes and
/// threads: Python's `multiprocessing.Condition` in std's `Condvar` shape:
/// [`acquire`](Condition::acquire) gives a guard and
/// [`wait`](Condition::wait) takes it and gives it back.
///
/// Waits may wake spuriously (as std's): check the condition in a loop, or
/// use [`wait_while`](Condition::wait_while). The lock is recovered from a
/// dead holder and poisoned exactly as a [`Lock`](crate::Lock).
///
/// # Examples
///
/// ```no_run
/// use multiproc::{process_fn, sync::Condition, Process, Value};
///
/// #[process_fn]
/// fn produce(cond: Condition, ready: Value<u32>) {
///     let _guard = cond.acquire().expect("not poisoned");
///     ready.store(1);
///     cond.notify_all();
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let cond = Condition::new()?;
/// let ready = Value::new(0u32)?;
/// let mut p = Process::new(produce, (cond.clone(), ready.clone()));
/// p.start()?;
/// let guard = cond.acquire()?;
/// let _guard = cond.wait_while(guard, || ready.load() == 0)?;
/// p.join()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Condition {
    map: Arc<Block>,
}

/// Holds a [`Condition`]'s lock; dropping it releases the lock.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ConditionGuard<'a> {
    cond: &'a Condition,
    raw: RawGuard<'a>,
}

/// Whether [`Condition::wait_timeout`] returned because its time was up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitTimeoutResult(bool);

impl WaitTimeoutResult {
    /// `true` if the wait ended because the timeout passed (Python's
    /// `wait(timeout)` returning `False`).
    pub fn timed_out(&self) -> bool {
        self.0
    }
}

impl Condition {
    /// A new condition variable with a new lock.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    pub fn new() -> Result<Condition> {
        Ok(Condition {
            map: new_block::<Condition>("multiproc-condition", COND_BYTES, 8)?,
        })
    }

    /// The sequence word (bumped by each notify) and the sleeper count.
    fn words(&self) -> (&AtomicU32, &AtomicU32) {
        let w = self.map.atomics_u32();
        (&w[SEQ], &w[SLEEPERS])
    }

    /// Takes the condition's lock.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the guard, as for
    /// [`Lock::acquire`](crate::Lock::acquire).
    pub fn acquire(&self) -> LockResult<ConditionGuard<'_>> {
        loop {
            if let Some((raw, poisoned)) = RawGuard::lock(self.map.lock_header(), None) {
                let guard = ConditionGuard { cond: self, raw };
                return if poisoned {
                    Err(PoisonError::new(guard))
                } else {
                    Ok(guard)
                };
            }
        }
    }

    fn wait_for(
        guard: ConditionGuard<'_>,
        timeout: Option<Duration>,
    ) -> LockResult<(ConditionGuard<'_>, bool)> {
        let mut guard = guard;
        let (seq, sleepers) = guard.cond.words();
        let seen = seq.load(Ordering::SeqCst);
        sleepers.fetch_add(1, Ordering::SeqCst);
        let (wake, poisoned) = guard.raw.unlocked(|| futex::wait(seq, seen, timeout));
        sleepers.fetch_sub(1, Ordering::SeqCst);
        let timed_out = wake == futex::Wake::TimedOut;
        if poisoned {
            Err(PoisonError::new((guard, timed_out)))
        } else {
            Ok((guard, timed_out))
        }
    }

    /// Releases the lock, sleeps until notified (or spuriously woken), and
    /// takes the lock again. `guard` must come from this condition's
    /// [`acquire`](Condition::acquire) (the guard's own condition is used).
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the re-acquired guard if the lock is poisoned.
    pub fn wait<'a>(&self, guard: ConditionGuard<'a>) -> LockResult<ConditionGuard<'a>> {
        match Self::wait_for(guard, None) {
            Ok((guard, _)) => Ok(guard),
            Err(p) => Err(PoisonError::new(p.into_inner().0)),
        }
    }

    /// As [`wait`](Condition::wait), for at most `timeout`.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the re-acquired guard and the result if the
    /// lock is poisoned.
    pub fn wait_timeout<'a>(
        &self,
        guard: ConditionGuard<'a>,
        timeout: Duration,
    ) -> LockResult<(ConditionGuard<'a>, WaitTimeoutResult)> {
        match Self::wait_for(guard, Some(timeout)) {
            Ok((guard, t)) => Ok((guard, WaitTimeoutResult(t))),
            Err(p) => {
                let (guard, t) = p.into_inner();
                Err(PoisonError::new((guard, WaitTimeoutResult(t))))
            }
        }
    }

    /// Waits while `condition()` is true (checked with the lock held),
    /// Python's `wait_for` with the test negated as in std.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the guard if the lock is poisoned.
    pub fn wait_while<'a>(
        &self,
        guard: ConditionGuard<'a>,
        mut condition: impl FnMut() -> bool,
    ) -> LockResult<ConditionGuard<'a>> {
        let mut guard = guard;
        let mut poisoned = false;
        while condition() {
            guard = match self.wait(guard) {
                Ok(g) => g,
                Err(p) => {
                    poisoned = true;
                    p.into_inner()
                }
            };
        }
        if poisoned {
            Err(PoisonError::new(guard))
        } else {
            Ok(guard)
        }
    }

    /// Wakes one waiter (if any).
    pub fn notify(&self) {
        self.wake(1);
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) {
        self.wake(u32::MAX);
    }

    fn wake(&self, n: u32) {
        let (seq, sleepers) = self.words();
        seq.fetch_add(1, Ordering::SeqCst);
        if sleepers.load(Ordering::SeqCst) > 0 {
            futex::wake(seq, n);
        }
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Condition")
    }
}

impl fmt::Debug for ConditionGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConditionGuard")
    }
}

mapped_handle!(Condition, COND_BYTES);
