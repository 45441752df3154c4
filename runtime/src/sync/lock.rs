//! [`Lock`] and [`RLock`].

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LockResult, PoisonError, TryLockError, TryLockResult};
use std::time::{Duration, Instant};

use super::deadline;
use crate::error::Result;
use crate::handle::{mapped_handle, new_block};
use crate::sys::arena::Block;
use crate::sys::lock::{Header, RawGuard};
use crate::sys::shm::LOCK_HEADER;

/// A mutual-exclusion lock shared by processes and threads: Python's
/// `multiprocessing.Lock` with std's `Mutex` shape (an RAII guard, and
/// poisoning when a holder dies).
///
/// An uncontended `acquire` + release is one compare-and-swap and one swap
/// on a word in shared memory (tens of nanoseconds). If a holder dies while
/// holding it (SIGKILL, a crash), the next acquirer gets it within about
/// 100 ms and receives `Err(PoisonError)` holding the guard; see the
/// [module docs](crate::sync) for the details and the limits.
///
/// Drop the guard to release (there is no free-standing `release`). The
/// lock belongs to the *process* holding the guard: recovery happens when
/// that process dies, while a guard leaked with `mem::forget` by a thread
/// keeps the lock held, as with std's `Mutex`. Acquiring again while this
/// process holds it waits (use [`RLock`] for re-entrance).
///
/// # Examples
///
/// The tutorial's example: ten processes print one at a time.
///
/// ```no_run
/// use multiproc::{process_fn, Lock, Process};
///
/// #[process_fn]
/// fn f(lock: Lock, i: u32) {
///     let _guard = lock.acquire().expect("a holder died holding the lock");
///     println!("hello world {i}");
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let lock = Lock::new()?;
/// let mut procs = Vec::new();
/// for i in 0..10 {
///     let mut p = Process::new(f, (lock.clone(), i));
///     p.start()?;
///     procs.push(p);
/// }
/// for p in &mut procs {
///     p.join()?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Lock {
    map: Arc<Block>,
}

/// Holds a [`Lock`]; dropping it releases the lock (and poisons it if the
/// thread is panicking).
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a> {
    _raw: RawGuard<'a>,
}

const LOCK_BYTES: usize = LOCK_HEADER;

impl Lock {
    /// A new, free lock.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    pub fn new() -> Result<Lock> {
        Ok(Lock {
            map: new_block::<Lock>("multiproc-lock", LOCK_BYTES, 8)?,
        })
    }

    #[inline]
    pub(crate) fn header(&self) -> Header<'_> {
        self.map.lock_header()
    }

    /// A handle onto the lock word at the start of another object's memory
    /// (a `Value`'s or an `Array`'s, for their `get_lock`). It works as
    /// any lock here, but cannot be sent: its memory is not a Lock's.
    pub(crate) fn view_of(map: Arc<Block>) -> Lock {
        Lock { map }
    }

    /// Its memory (an `Array` over this lock checks guards against it).
    pub(crate) fn block(&self) -> &Block {
        &self.map
    }

    #[inline]
    fn wrap<'a>(raw: RawGuard<'a>, poisoned: bool) -> LockResult<LockGuard<'a>> {
        let guard = LockGuard { _raw: raw };
        if poisoned {
            Err(PoisonError::new(guard))
        } else {
            Ok(guard)
        }
    }

    /// Waits for the lock and takes it.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` (which holds the guard: the lock *is* held) if a
    /// holder died or panicked while holding it, now or earlier, until
    /// [`clear_poison`](Lock::clear_poison). `?` turns it into
    /// [`Error::Poisoned`](crate::Error::Poisoned) (releasing the lock).
    ///
    /// # Examples
    ///
    /// ```
    /// let lock = multiproc::Lock::new()?;
    /// {
    ///     let _guard = lock.acquire()?;
    ///     // ... critical section ...
    /// }
    /// // A guard recovered from a poisoned lock:
    /// let _guard = lock.acquire().unwrap_or_else(|poisoned| poisoned.into_inner());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[inline]
    pub fn acquire(&self) -> LockResult<LockGuard<'_>> {
        match RawGuard::lock(self.header(), None) {
            Some((raw, poisoned)) => Self::wrap(raw, poisoned),
            // Without a deadline the lock is always eventually taken.
            None => self.acquire(),
        }
    }

    /// Takes the lock if it is free, without waiting.
    ///
    /// # Errors
    ///
    /// `Err(TryLockError::WouldBlock)` if another thread or process holds
    /// it; `Err(TryLockError::Poisoned)` (with the guard) as for
    /// [`acquire`](Lock::acquire).
    ///
    /// # Examples
    ///
    /// ```
    /// let lock = multiproc::Lock::new()?;
    /// let held = lock.acquire()?;
    /// assert!(lock.try_acquire().is_err());
    /// drop(held);
    /// assert!(lock.try_acquire().is_ok());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_acquire(&self) -> TryLockResult<LockGuard<'_>> {
        match RawGuard::try_lock(self.header()) {
            Some((raw, poisoned)) => Self::wrap(raw, poisoned).map_err(TryLockError::from),
            None => Err(TryLockError::WouldBlock),
        }
    }

    /// Waits at most `timeout` for the lock.
    ///
    /// # Errors
    ///
    /// `Err(TryLockError::WouldBlock)` if the lock stayed held for the
    /// whole timeout (`?` makes it
    /// [`Error::WouldBlock`](crate::Error::WouldBlock), as for
    /// [`try_acquire`](Lock::try_acquire));
    /// `Err(TryLockError::Poisoned)` (with the guard) as for
    /// [`acquire`](Lock::acquire).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let lock = multiproc::Lock::new()?;
    /// let _held = lock.acquire()?;
    /// let err = lock.acquire_timeout(Duration::from_millis(10)).map(drop).map_err(multiproc::Error::from);
    /// assert!(err.is_err_and(|e| e.is_would_block()));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn acquire_timeout(&self, timeout: Duration) -> TryLockResult<LockGuard<'_>> {
        match RawGuard::lock(self.header(), deadline(timeout)) {
            Some((raw, poisoned)) => Self::wrap(raw, poisoned).map_err(TryLockError::from),
            None => Err(TryLockError::WouldBlock),
        }
    }

    /// `true` if some thread or process holds the lock now (Python's
    /// `locked()`); the answer may be stale as soon as it is returned.
    pub fn is_locked(&self) -> bool {
        self.header().is_locked()
    }

    /// `true` if a holder died or panicked holding the lock and the poison
    /// has not been cleared.
    pub fn is_poisoned(&self) -> bool {
        self.header().is_poisoned()
    }

    /// Clears the poison flag, once the protected data has been repaired.
    pub fn clear_poison(&self) {
        self.header().clear_poison();
    }
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("locked", &self.is_locked())
            .field("poisoned", &self.is_poisoned())
            .finish()
    }
}

impl fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LockGuard")
    }
}

/// A `Lock` travels as its cell; a view of another object's lock word
/// ([`Lock::view_of`]) is refused when encoding, with a clear error.
impl crate::handle::HandleWire for Lock {
    const KIND: crate::handle::Kind = crate::handle::Kind::Lock;
    type Elem = ();
    type Plain = ();

    fn parts(&self) -> Result<crate::handle::Parts<'_, ()>> {
        if self.map.len() != LOCK_BYTES {
            return Err(crate::Error::misuse(
                "this Lock is the lock word of a Value or an Array (from get_lock) and cannot \
                 be sent on its own: send the Value or Array, or build it with_lock over a Lock",
            ));
        }
        Ok(crate::handle::Parts::block(&self.map, ()))
    }

    fn mapping_size((): &()) -> Result<usize> {
        Ok(LOCK_BYTES)
    }

    fn rebuild((): (), fds: &mut crate::handle::Received) -> Result<Self> {
        Ok(Lock { map: fds.block()? })
    }
}

crate::handle::handle_serde!([] Lock);

/// A re-entrant lock: the thread that holds it may acquire it again, and
/// it is released when every guard is dropped. Python's
/// `multiprocessing.RLock`; ownership is per process *and* thread.
///
/// A holder that dies is detected as for [`Lock`] (the lock is taken over
/// and poisoned).
///
/// # Examples
///
/// ```
/// let rlock = multiproc::sync::RLock::new()?;
/// let outer = rlock.acquire()?;
/// let inner = rlock.acquire()?; // the same thread: no deadlock
/// drop(inner);
/// drop(outer);
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone)]
pub struct RLock {
    map: Arc<Block>,
}

/// Holds an [`RLock`] once; the lock is free when every guard is dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct RLockGuard<'a> {
    lock: &'a RLock,
    // Guards of a re-entrant lock must stay on the thread that holds it.
    _not_send: std::marker::PhantomData<*const ()>,
}

// The lock header, then the recursion count (u32 word 4).
const COUNT: usize = LOCK_HEADER / 4;
const RLOCK_BYTES: usize = LOCK_HEADER + 4;

impl RLock {
    /// A new, free re-entrant lock.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    pub fn new() -> Result<RLock> {
        Ok(RLock {
            map: new_block::<RLock>("multiproc-rlock", RLOCK_BYTES, 8)?,
        })
    }

    pub(crate) fn header(&self) -> Header<'_> {
        self.map.lock_header()
    }

    fn count(&self) -> &AtomicU32 {
        &self.map.atomics_u32()[COUNT]
    }

    fn lock(&self, deadline: Option<Instant>, wait: bool) -> TryLockResult<RLockGuard<'_>> {
        let header = self.header();
        let count = self.count();
        // The word names this thread by its id and start time: a thread
        // of another process (another pid namespace) with the same id, or
        // an earlier thread that had it, is not taken for this one.
        if header.held_by_this_thread() {
            count.fetch_add(1, Ordering::Relaxed);
        } else {
            if header.lock_for_thread(deadline, wait).is_none() {
                return Err(TryLockError::WouldBlock);
            }
            count.store(1, Ordering::Relaxed);
        }
        let guard = RLockGuard {
            lock: self,
            _not_send: std::marker::PhantomData,
        };
        if header.is_poisoned() {
            Err(TryLockError::Poisoned(PoisonError::new(guard)))
        } else {
            Ok(guard)
        }
    }

    /// Takes the lock, or takes it once more if this thread holds it.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the guard, as for [`Lock::acquire`].
    pub fn acquire(&self) -> LockResult<RLockGuard<'_>> {
        match self.lock(None, true) {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(p)) => Err(p),
            // Without a deadline the lock is always eventually taken.
            Err(TryLockError::WouldBlock) => self.acquire(),
        }
    }

    /// As [`acquire`](RLock::acquire), without waiting.
    ///
    /// # Errors
    ///
    /// `Err(TryLockError::WouldBlock)` if another thread holds it; poisoning
    /// as for [`Lock::acquire`].
    pub fn try_acquire(&self) -> TryLockResult<RLockGuard<'_>> {
        self.lock(None, false)
    }

    /// As [`acquire`](RLock::acquire), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// `Err(TryLockError::WouldBlock)` on timeout; poisoning as for
    /// [`Lock::acquire`].
    pub fn acquire_timeout(&self, timeout: Duration) -> TryLockResult<RLockGuard<'_>> {
        self.lock(deadline(timeout), true)
    }

    /// `true` if a holder died or panicked holding the lock.
    pub fn is_poisoned(&self) -> bool {
        self.header().is_poisoned()
    }

    /// Clears the poison flag.
    pub fn clear_poison(&self) {
        self.header().clear_poison();
    }

    /// For a thread that holds it (a guard of its proves it): frees it
    /// whatever its recursion depth, returning that depth, for
    /// [`relock`](RLock::relock) (CPython's `_release_save`).
    pub(crate) fn unlock_all(&self) -> u32 {
        let depth = self.count().swap(0, Ordering::Relaxed);
        self.header().release_for_thread();
        depth
    }

    /// Takes it again for this thread at `depth` after
    /// [`unlock_all`](RLock::unlock_all) (CPython's `_acquire_restore`);
    /// whether it is poisoned.
    pub(crate) fn relock(&self, depth: u32) -> bool {
        while self.header().lock_for_thread(None, true).is_none() {}
        self.count().store(depth, Ordering::Relaxed);
        self.header().is_poisoned()
    }
}

impl Drop for RLockGuard<'_> {
    fn drop(&mut self) {
        let header = self.lock.header();
        if std::thread::panicking() {
            header.set_poison();
        }
        if self.lock.count().fetch_sub(1, Ordering::Relaxed) == 1 {
            header.release_for_thread();
        }
    }
}

impl fmt::Debug for RLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLock")
            .field("poisoned", &self.is_poisoned())
            .finish()
    }
}

impl fmt::Debug for RLockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RLockGuard")
    }
}

mapped_handle!(RLock, RLOCK_BYTES);

/// A [`Lock`] or an [`RLock`]: the lock a [`Condition`](crate::sync::Condition),
/// a [`Value`](crate::Value) or an [`Array`](crate::Array) is built over
/// when it shares one (CPython's `lock=` argument). `From` both, so
/// `Condition::with_lock(lock.clone())` takes either.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum AnyLock {
    /// A plain lock.
    Lock(Lock),
    /// A re-entrant lock.
    RLock(RLock),
}

impl From<Lock> for AnyLock {
    fn from(lock: Lock) -> AnyLock {
        AnyLock::Lock(lock)
    }
}

impl From<RLock> for AnyLock {
    fn from(lock: RLock) -> AnyLock {
        AnyLock::RLock(lock)
    }
}

impl AnyLock {
    /// `true` if a holder died or panicked holding it.
    pub fn is_poisoned(&self) -> bool {
        match self {
            AnyLock::Lock(l) => l.is_poisoned(),
            AnyLock::RLock(l) => l.is_poisoned(),
        }
    }

    /// Clears the poison flag.
    pub fn clear_poison(&self) {
        match self {
            AnyLock::Lock(l) => l.clear_poison(),
            AnyLock::RLock(l) => l.clear_poison(),
        }
    }

    /// Takes it (waiting until `deadline`, `None`: no limit; once, if not
    /// `wait`): the hold and whether it is poisoned; `None` if not taken.
    pub(crate) fn hold(&self, deadline: Option<Instant>, wait: bool) -> Option<(Held<'_>, bool)> {
        match self {
            AnyLock::Lock(l) => {
                let taken = if wait {
                    RawGuard::lock(l.header(), deadline)
                } else {
                    RawGuard::try_lock(l.header())
                };
                taken.map(|(raw, poisoned)| (Held::Raw(raw), poisoned))
            }
            AnyLock::RLock(l) => match l.lock(deadline, wait) {
                Ok(guard) => Some((Held::Re(guard), false)),
                Err(TryLockError::Poisoned(p)) => Some((Held::Re(p.into_inner()), true)),
                Err(TryLockError::WouldBlock) => None,
            },
        }
    }
}

/// A lock held by a [`Condition`](crate::sync::Condition), a
/// [`Value`](crate::Value) or an [`Array`](crate::Array) guard: the lock
/// word beside its data, a shared [`Lock`], or a shared [`RLock`].
#[derive(Debug)]
pub(crate) enum Held<'a> {
    /// A process-owned lock word.
    Raw(RawGuard<'a>),
    /// A re-entrant lock, held once more by this thread.
    Re(RLockGuard<'a>),
}

impl Held<'_> {
    /// Frees the lock entirely while `f` runs (a condition variable's
    /// wait: all recursion levels of an [`RLock`]), then takes it again;
    /// whether it is poisoned then.
    pub(crate) fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> (R, bool) {
        match self {
            Held::Raw(raw) => raw.unlocked(f),
            Held::Re(guard) => {
                let depth = guard.lock.unlock_all();
                let r = f();
                (r, guard.lock.relock(depth))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisoned_by_a_panicking_thread_until_cleared() {
        let lock = Lock::new().expect("lock");
        std::thread::scope(|s| {
            let panicked = s
                .spawn(|| {
                    let _guard = lock.acquire();
                    panic!("while holding the lock");
                })
                .join();
            assert!(panicked.is_err());
        });
        let taken = lock.acquire_timeout(Duration::from_secs(20));
        assert!(matches!(taken, Err(TryLockError::Poisoned(_))));
        drop(taken);
        assert!(lock.is_poisoned());
        lock.clear_poison();
        assert!(lock.acquire().is_ok());
    }

    #[test]
    fn rlock_excludes_other_threads() {
        let rlock = RLock::new().expect("rlock");
        let a = rlock.acquire().expect("a");
        let b = rlock.acquire().expect("b");
        std::thread::scope(|s| {
            s.spawn(|| assert!(matches!(rlock.try_acquire(), Err(TryLockError::WouldBlock))));
        });
        drop(a);
        std::thread::scope(|s| {
            s.spawn(|| assert!(matches!(rlock.try_acquire(), Err(TryLockError::WouldBlock))));
        });
        drop(b);
        std::thread::scope(|s| {
            s.spawn(|| assert!(rlock.try_acquire().is_ok()));
        });
    }
}
