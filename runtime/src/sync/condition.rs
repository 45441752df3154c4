//! [`Condition`].

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, LockResult, PoisonError};
use std::time::{Duration, Instant};

use super::deadline;
use super::lock::{AnyLock, Held};
use crate::error::Result;
use crate::handle::{HandleWire, Kind, Parts, Received, handle_serde, new_block};
use crate::sys::arena::Block;
use crate::sys::futex::{self, Wake};
use crate::sys::lock::{CHECK_EVERY, RawGuard};
use crate::sys::shm::LOCK_HEADER;

// The lock header (used unless the condition was built over a lock of its
// own), the u32 word sequence (the futex word, bumped by each notify), the
// u32 word deferred (wake-ups owed, see below), then the u64 state word: four 16-bit fields, the epoch (bumped by
// each notify), the waiters registered before the last notify ("old"),
// those registered since ("new"), and the wake-ups granted to old waiters
// and not yet taken. A notify makes every waiter old and grants at most
// `n`, at most one per old waiter not yet granted; a wait returns notified
// only by taking a grant, and only if it registered before the last notify
// (its epoch is not the current one). So `notify_n(n)` wakes at most `n`,
// and a waiter that starts waiting after a notify never takes its grant
// from a waiter that was there (which would leave that one asleep).
//
// A notify wakes as many sleepers as it granted, not all of them: the
// kernel wakes a futex's sleepers first come, first served, so those are
// the old ones, save the few that went back to sleep behind newer ones; a
// woken waiter that finds grants it may not take passes one wake-up on,
// and every sleep lasts at most `CHECK_EVERY`, so a grant is never left
// behind a sleeper for longer.
//
// Wake-ups are deferred while the condition's own lock is held (the usual
// notify, made under the lock): a waiter woken at once would only find the
// lock taken and sleep again on it, two wake-ups and a spin where one
// does. The notifier adds them to `deferred`, then checks the lock again;
// every release of the own lock (a guard dropped, a wait) swaps `deferred`
// to 0 and wakes that many. Publish-then-check on both sides, with SeqCst
// fences: a release either sees the count or the notifier sees the lock
// free (or held by a later holder, whose release wakes them). A holder
// that dies before releasing leaves them to the sleepers' `CHECK_EVERY`
// re-check, after which they take the lock over as any waiter does. A
// condition over a `Lock`/`RLock` of the caller's wakes at once: code
// that holds that lock directly does not release through this type.
const SEQ: usize = LOCK_HEADER / 4;
const DEFERRED: usize = SEQ + 1;
/// The state word, as an index of u64 words.
const STATE: usize = LOCK_HEADER / 8 + 1;
const COND_BYTES: usize = LOCK_HEADER + 16;
/// Most waiters at a time (16-bit counts); more wait in slices.
const MAX_WAITERS: u16 = u16::MAX;

/// The fields of the state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    epoch: u16,
    old: u16,
    new: u16,
    grants: u16,
}

impl State {
    fn of(word: u64) -> State {
        State {
            epoch: (word >> 48) as u16,
            old: (word >> 32) as u16,
            new: (word >> 16) as u16,
            grants: word as u16,
        }
    }

    fn word(self) -> u64 {
        (u64::from(self.epoch) << 48)
            | (u64::from(self.old) << 32)
            | (u64::from(self.new) << 16)
            | u64::from(self.grants)
    }
}

/// A condition variable shared by processes and threads: Python's
/// `multiprocessing.Condition` in std's `Condvar` shape:
/// [`acquire`](Condition::acquire) gives a guard and
/// [`wait`](Condition::wait) takes it and gives it back.
///
/// It has a lock of its own ([`new`](Condition::new)), or is built over an
/// existing [`Lock`](crate::Lock) or [`RLock`](crate::sync::RLock)
/// ([`with_lock`](Condition::with_lock), CPython's `Condition(lock)`):
/// then `acquire` takes that lock, code that takes the lock directly is
/// excluded as well, and `wait` frees it entirely while it sleeps (every
/// recursion level of an `RLock`, restored after, as CPython does).
///
/// [`notify`](Condition::notify) wakes at most one waiter,
/// [`notify_n`](Condition::notify_n) at most `n` (CPython's `notify(n)`:
/// a separate name, since Rust has no default arguments) and
/// [`notify_all`](Condition::notify_all) every one waiting now. A wait may
/// still return without a notify (spuriously, as std's does; after a
/// waiter died while waiting, for instance): check the condition in a
/// loop, or use [`wait_while`](Condition::wait_while) /
/// [`wait_timeout_while`](Condition::wait_timeout_while). The lock is
/// recovered from a dead holder and poisoned exactly as a
/// [`Lock`](crate::Lock).
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
    lock: Option<AnyLock>,
}

/// Holds a [`Condition`]'s lock; dropping it releases the lock.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ConditionGuard<'a> {
    cond: &'a Condition,
    // Dropped in this order: the lock is released, then the deferred
    // wake-ups are made.
    held: Held<'a>,
    _flush: Flush<'a>,
}

/// Makes the wake-ups deferred to a release of the condition's own lock,
/// when its guard is dropped (after the lock, see [`ConditionGuard`]).
struct Flush<'a>(&'a Condition);

impl Drop for Flush<'_> {
    fn drop(&mut self) {
        self.0.after_release();
    }
}

/// What a waiter found when it looked for a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// It took one: it was notified.
    Taken,
    /// There are grants, for waiters older than it.
    Others,
    /// There are none.
    None,
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
            lock: None,
        })
    }

    /// A new condition variable over an existing lock, a
    /// [`Lock`](crate::Lock) or an [`RLock`](crate::sync::RLock) (CPython's
    /// `Condition(lock)`): [`acquire`](Condition::acquire) takes that lock.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::{sync::{Condition, RLock}};
    ///
    /// let rlock = RLock::new()?;
    /// let cond = Condition::with_lock(rlock.clone())?;
    /// let guard = cond.acquire()?;
    /// // The RLock is held (by this thread), through the condition.
    /// let again = rlock.acquire()?;
    /// drop(again);
    /// drop(guard);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn with_lock(lock: impl Into<AnyLock>) -> Result<Condition> {
        Ok(Condition {
            map: new_block::<Condition>("multiproc-condition", COND_BYTES, 8)?,
            lock: Some(lock.into()),
        })
    }

    /// The lock it was built over with [`with_lock`](Condition::with_lock)
    /// (`None`: a lock of its own).
    pub fn lock(&self) -> Option<&AnyLock> {
        self.lock.as_ref()
    }

    fn seq(&self) -> &AtomicU32 {
        &self.map.atomics_u32()[SEQ]
    }

    fn state(&self) -> &AtomicU64 {
        &self.map.atomics_u64()[STATE]
    }

    fn deferred(&self) -> &AtomicU32 {
        &self.map.atomics_u32()[DEFERRED]
    }

    /// Wakes `n` sleepers, now or, while the condition's own lock is held,
    /// at its release (see the layout notes at the top of the file).
    fn wake(&self, n: u32) {
        if self.lock.is_none() && self.map.lock_header().is_held() {
            // (Saturating: the count is at most the grants, < 2^16, unless
            // the memory was scribbled on.)
            let _ = self
                .deferred()
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| {
                    Some(owed.saturating_add(n))
                });
            fence(Ordering::SeqCst);
            if self.map.lock_header().is_held() {
                // The holder's release wakes them (or a later holder's).
                return;
            }
            // Released meanwhile: this or that release's check takes them.
            self.take_deferred();
            return;
        }
        futex::wake(self.seq(), n);
    }

    /// After this thread released the condition's own lock: makes the
    /// wake-ups deferred to a release.
    fn after_release(&self) {
        if self.lock.is_none() {
            fence(Ordering::SeqCst);
            self.take_deferred();
        }
    }

    fn take_deferred(&self) {
        let deferred = self.deferred();
        if deferred.load(Ordering::Relaxed) != 0 {
            let owed = deferred.swap(0, Ordering::SeqCst);
            if owed > 0 {
                futex::wake(self.seq(), owed);
            }
        }
    }

    fn hold(&self) -> (Held<'_>, bool) {
        loop {
            let taken = match &self.lock {
                Some(lock) => lock.hold(None, true),
                None => RawGuard::lock(self.map.lock_header(), None)
                    .map(|(raw, poisoned)| (Held::Raw(raw), poisoned)),
            };
            // Without a deadline the lock is always eventually taken.
            if let Some(taken) = taken {
                return taken;
            }
        }
    }

    /// Takes the condition's lock.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the guard, as for
    /// [`Lock::acquire`](crate::Lock::acquire).
    pub fn acquire(&self) -> LockResult<ConditionGuard<'_>> {
        let (held, poisoned) = self.hold();
        let guard = ConditionGuard {
            cond: self,
            held,
            _flush: Flush(self),
        };
        if poisoned {
            Err(PoisonError::new(guard))
        } else {
            Ok(guard)
        }
    }

    /// Updates the state word with `f` (`None`: leave it); the state it
    /// changed, if it did.
    fn update(&self, mut f: impl FnMut(State) -> Option<State>) -> Option<State> {
        let state = self.state();
        let mut now = state.load(Ordering::SeqCst);
        loop {
            let next = f(State::of(now))?;
            match state.compare_exchange_weak(now, next.word(), Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Some(State::of(now)),
                Err(seen) => now = seen,
            }
        }
    }

    /// Registers a waiter (with the lock held): its epoch, or `None` if
    /// the count is full (it then waits as if woken spuriously).
    fn register(&self) -> Option<u16> {
        self.update(|s| {
            (s.new < MAX_WAITERS && s.old.saturating_add(s.new) < MAX_WAITERS).then(|| State {
                new: s.new + 1,
                ..s
            })
        })
        .map(|s| s.epoch)
    }

    /// Takes a grant if one is there for a waiter of `epoch`.
    fn take_grant(&self, epoch: u16) -> Grant {
        let mut others = false;
        let taken = self.update(|s| {
            others = s.grants > 0;
            (s.epoch != epoch && s.grants > 0).then(|| State {
                old: s.old.saturating_sub(1),
                grants: s.grants - 1,
                ..s
            })
        });
        match (taken, others) {
            (Some(_), _) => Grant::Taken,
            (None, true) => Grant::Others,
            (None, false) => Grant::None,
        }
    }

    /// A waiter of `epoch` whose time is up leaves; `true` if a grant came
    /// for it meanwhile (it was notified after all).
    fn leave_timed_out(&self, epoch: u16) -> bool {
        let mut granted = false;
        self.update(|s| {
            granted = false;
            // (An epoch that came round again, after a multiple of 65536
            // notifies, counts this waiter among the new: the totals stay
            // right, and the next notify makes it old again.)
            Some(if s.epoch == epoch && s.new > 0 {
                State {
                    new: s.new - 1,
                    ..s
                }
            } else if s.grants > 0 {
                granted = true;
                State {
                    old: s.old.saturating_sub(1),
                    grants: s.grants - 1,
                    ..s
                }
            } else {
                State {
                    old: s.old.saturating_sub(1),
                    ..s
                }
            })
        });
        granted
    }

    /// Sleeps with the lock free until notified or `deadline`: the guard,
    /// whether the time ran out, whether the lock is poisoned.
    fn wait_until<'a>(
        guard: ConditionGuard<'a>,
        deadline: Option<Instant>,
    ) -> (ConditionGuard<'a>, bool, bool) {
        let mut guard = guard;
        let cond = guard.cond;
        // Registered with the lock held: a notify made after this thread
        // took the lock counts it.
        let epoch = cond.register();
        let seq = cond.seq();
        let (notified, poisoned) = guard.held.unlocked(|| {
            cond.after_release();
            let Some(epoch) = epoch else {
                // Too many waiters to count: a short sleep, then back as if
                // woken spuriously.
                let seen = seq.load(Ordering::SeqCst);
                let slice = CHECK_EVERY;
                let left = deadline.map_or(slice, |d| {
                    d.saturating_duration_since(Instant::now()).min(slice)
                });
                futex::wait(seq, seen, Some(left));
                return deadline.is_none_or(|d| Instant::now() < d);
            };
            let mut woken = false;
            loop {
                let seen = seq.load(Ordering::SeqCst);
                match cond.take_grant(epoch) {
                    Grant::Taken => return true,
                    // Perhaps woken by a notify meant for an older waiter
                    // (one that went back to sleep behind this one): pass
                    // the wake-up on.
                    Grant::Others if woken => {
                        futex::wake(seq, 1);
                    }
                    Grant::Others | Grant::None => {}
                }
                // At most `CHECK_EVERY` at a time: a notifier that died
                // holding the lock leaves its wake-ups undone.
                let slice = match deadline {
                    None => CHECK_EVERY,
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return cond.leave_timed_out(epoch);
                        }
                        left.min(CHECK_EVERY)
                    }
                };
                woken = futex::wait(seq, seen, Some(slice)) == Wake::Retry;
            }
        });
        (guard, !notified, poisoned)
    }

    /// Releases the lock, sleeps until notified, and takes the lock again.
    /// `guard` must come from this condition's
    /// [`acquire`](Condition::acquire) (the guard's own condition is used).
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the re-acquired guard if the lock is poisoned.
    pub fn wait<'a>(&self, guard: ConditionGuard<'a>) -> LockResult<ConditionGuard<'a>> {
        match Self::wait_until(guard, None) {
            (guard, _, false) => Ok(guard),
            (guard, _, true) => Err(PoisonError::new(guard)),
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
        match Self::wait_until(guard, deadline(timeout)) {
            (guard, t, false) => Ok((guard, WaitTimeoutResult(t))),
            (guard, t, true) => Err(PoisonError::new((guard, WaitTimeoutResult(t)))),
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
            let (g, _, p) = Self::wait_until(guard, None);
            guard = g;
            poisoned |= p;
        }
        if poisoned {
            Err(PoisonError::new(guard))
        } else {
            Ok(guard)
        }
    }

    /// Waits while `condition()` is true, for at most `timeout` in all
    /// (Python's `wait_for(predicate, timeout)`, std's
    /// `Condvar::wait_timeout_while`). The result's
    /// [`timed_out`](WaitTimeoutResult::timed_out) is `true` if the time
    /// ran out with the condition still true.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the guard and the result if the lock is
    /// poisoned.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let cond = multiproc::sync::Condition::new()?;
    /// let guard = cond.acquire()?;
    /// let (_guard, result) = cond
    ///     .wait_timeout_while(guard, Duration::from_millis(10), || true)
    ///     .map_err(|_| multiproc::Error::Poisoned)?;
    /// assert!(result.timed_out());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn wait_timeout_while<'a>(
        &self,
        guard: ConditionGuard<'a>,
        timeout: Duration,
        mut condition: impl FnMut() -> bool,
    ) -> LockResult<(ConditionGuard<'a>, WaitTimeoutResult)> {
        let until = deadline(timeout);
        let mut guard = guard;
        let mut poisoned = false;
        let mut timed_out = false;
        while condition() {
            if until.is_some_and(|d| Instant::now() >= d) {
                timed_out = true;
                break;
            }
            let (g, _, p) = Self::wait_until(guard, until);
            guard = g;
            poisoned |= p;
        }
        let result = (guard, WaitTimeoutResult(timed_out));
        if poisoned {
            Err(PoisonError::new(result))
        } else {
            Ok(result)
        }
    }

    /// Wakes one waiter (if any); `true` if one was waiting.
    pub fn notify(&self) -> bool {
        self.notify_n(1) == 1
    }

    /// Wakes at most `n` of the waiters waiting now (CPython's
    /// `notify(n)`); returns how many it woke. Waiters that start waiting
    /// later are not woken by it.
    pub fn notify_n(&self, n: u32) -> u32 {
        let n = u16::try_from(n).unwrap_or(u16::MAX);
        let mut granted = 0;
        let before = self.update(|s| {
            let old = s.old + s.new;
            granted = n.min(old.saturating_sub(s.grants));
            (granted > 0).then(|| State {
                epoch: s.epoch.wrapping_add(1),
                old,
                new: 0,
                grants: s.grants + granted,
            })
        });
        if before.is_none() {
            return 0;
        }
        self.seq().fetch_add(1, Ordering::SeqCst);
        // As many as were granted (see the layout notes at the top).
        self.wake(u32::from(granted));
        u32::from(granted)
    }

    /// Wakes every waiter waiting now; returns how many.
    pub fn notify_all(&self) -> u32 {
        self.notify_n(u32::MAX)
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition")
            .field("lock", &self.lock)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ConditionGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConditionGuard")
    }
}

/// Travels as its memory and the lock it was built over, if any.
impl HandleWire for Condition {
    const KIND: Kind = Kind::Condition;
    type Elem = ();
    type Plain = Option<AnyLock>;

    fn parts(&self) -> Result<Parts<'_, Option<AnyLock>>> {
        Ok(Parts::block(&self.map, self.lock.clone()))
    }

    fn mapping_size(_: &Option<AnyLock>) -> Result<usize> {
        Ok(COND_BYTES)
    }

    fn rebuild(lock: Option<AnyLock>, fds: &mut Received) -> Result<Self> {
        Ok(Condition {
            map: fds.block()?,
            lock,
        })
    }
}

handle_serde!([] Condition);
