//! [`Semaphore`] and [`BoundedSemaphore`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::deadline;
use crate::error::{Error, Result};
use crate::handle::{self, HandleWire, Kind, Parts, Received, mapped_handle, new_block};
use crate::sys::arena::Block;
use crate::sys::futex::{self, Wake};

// Words: count, sleepers, bound (0: unbounded; `BOUNDED | n`: at most n,
// where n may be 0).
const SEM_BYTES: usize = 12;
/// The flag of a bounded semaphore's bound word (counts fit in 31 bits).
const BOUNDED: u32 = 1 << 31;

/// A counting semaphore shared by processes and threads: Python's
/// `multiprocessing.Semaphore`, with its `acquire()` / `release()` pair.
///
/// A semaphore is not owned: any thread or process may release it. A
/// process that dies between `acquire` and `release` therefore leaks its
/// unit, as in Python (use a [`Lock`](crate::Lock) where ownership and
/// dead-holder recovery matter).
///
/// # Examples
///
/// ```
/// let sem = multiproc::sync::Semaphore::new(2)?;
/// sem.acquire();
/// assert!(sem.try_acquire());
/// assert!(!sem.try_acquire());
/// sem.release()?;
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone)]
pub struct Semaphore {
    map: Arc<Block>,
}

impl Semaphore {
    /// A semaphore holding `value` units.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created;
    /// [`Error::InvalidArgument`] if `value` is above `i32::MAX`.
    pub fn new(value: u32) -> Result<Semaphore> {
        Self::with_bound(value, 0)
    }

    fn with_bound(value: u32, bound: u32) -> Result<Semaphore> {
        if value > i32::MAX as u32 {
            return Err(Error::invalid("a semaphore value must be at most i32::MAX"));
        }
        let map = new_block::<Semaphore>("multiproc-semaphore", SEM_BYTES, 8)?;
        map.atomics_u32()[0].store(value, Ordering::Relaxed);
        map.atomics_u32()[2].store(bound, Ordering::Relaxed);
        Ok(Semaphore { map })
    }

    fn words(&self) -> (&AtomicU32, &AtomicU32, &AtomicU32) {
        let w = self.map.atomics_u32();
        (&w[0], &w[1], &w[2])
    }

    fn take(&self, deadline: Option<Instant>, wait: bool) -> bool {
        let (count, sleepers, _) = self.words();
        loop {
            let c = count.load(Ordering::Relaxed);
            if c > 0 {
                if count
                    .compare_exchange(c, c - 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            if !wait {
                return false;
            }
            if futex::wait_counted(count, 0, sleepers, deadline) == Wake::TimedOut {
                return false;
            }
        }
    }

    /// Takes one unit, waiting until one is available.
    pub fn acquire(&self) {
        self.take(None, true);
    }

    /// Takes one unit if one is available now; `false` otherwise.
    #[must_use = "if it returns true, a unit was taken and must be released"]
    pub fn try_acquire(&self) -> bool {
        self.take(None, false)
    }

    /// Takes one unit, waiting at most `timeout`; `false` on timeout.
    #[must_use = "if it returns true, a unit was taken and must be released"]
    pub fn acquire_timeout(&self, timeout: Duration) -> bool {
        self.take(deadline(timeout), true)
    }

    /// Gives one unit back, waking a waiter.
    ///
    /// # Errors
    ///
    /// [`Error::Misuse`] for a semaphore released past `i32::MAX` units
    /// (a [`BoundedSemaphore`], past its bound: Python's `ValueError`).
    pub fn release(&self) -> Result<()> {
        let (count, sleepers, bound) = self.words();
        let limit = match bound.load(Ordering::Relaxed) {
            0 => i32::MAX as u32,
            b => b & !BOUNDED,
        };
        let mut c = count.load(Ordering::Relaxed);
        loop {
            if c >= limit {
                return Err(Error::misuse(
                    "semaphore released more often than it was acquired",
                ));
            }
            match count.compare_exchange_weak(c, c + 1, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => c = now,
            }
        }
        if sleepers.load(Ordering::SeqCst) > 0 {
            futex::wake(count, 1);
        }
        Ok(())
    }

    /// The units available now (Python's `get_value()`); may be stale as
    /// soon as it is returned.
    pub fn value(&self) -> u32 {
        self.words().0.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("value", &self.value())
            .finish()
    }
}

mapped_handle!(Semaphore, SEM_BYTES);

/// A [`Semaphore`] that refuses to be released above its initial value:
/// Python's `BoundedSemaphore`. It has [`Semaphore`]'s methods, with the
/// bound checked by [`release`](BoundedSemaphore::release); it is not a
/// `Semaphore` (no `Deref`) and travels as a kind of its own.
///
/// # Examples
///
/// ```
/// let sem = multiproc::sync::BoundedSemaphore::new(1)?;
/// assert!(sem.release().is_err()); // never acquired
/// sem.acquire();
/// sem.release()?;
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BoundedSemaphore {
    inner: Semaphore,
}

impl BoundedSemaphore {
    /// A semaphore holding, and bounded by, `value` units.
    ///
    /// `BoundedSemaphore::new(0)` is allowed, as in CPython: it holds no
    /// unit and refuses every `release` (a unit can only come back after
    /// it was taken, and none can be).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created;
    /// [`Error::InvalidArgument`] if `value` is above `i32::MAX`.
    pub fn new(value: u32) -> Result<BoundedSemaphore> {
        Ok(BoundedSemaphore {
            inner: Semaphore::with_bound(value, value | BOUNDED)?,
        })
    }
}

impl BoundedSemaphore {
    /// Takes one unit, waiting until one is available. See
    /// [`Semaphore::acquire`].
    pub fn acquire(&self) {
        self.inner.acquire();
    }

    /// Takes one unit if one is available now; `false` otherwise.
    #[must_use = "if it returns true, a unit was taken and must be released"]
    pub fn try_acquire(&self) -> bool {
        self.inner.try_acquire()
    }

    /// Takes one unit, waiting at most `timeout`; `false` on timeout.
    #[must_use = "if it returns true, a unit was taken and must be released"]
    pub fn acquire_timeout(&self, timeout: Duration) -> bool {
        self.inner.acquire_timeout(timeout)
    }

    /// Gives one unit back, waking a waiter.
    ///
    /// # Errors
    ///
    /// [`Error::Misuse`] if that would take the semaphore above its
    /// initial value (Python's `ValueError`): it was released more often
    /// than acquired.
    pub fn release(&self) -> Result<()> {
        self.inner.release()
    }

    /// The units available now; may be stale as soon as it is returned.
    pub fn value(&self) -> u32 {
        self.inner.value()
    }
}

/// A semaphore's memory under a kind of its own: a `BoundedSemaphore` is
/// not received as a `Semaphore`, nor the reverse.
impl HandleWire for BoundedSemaphore {
    const KIND: Kind = Kind::BoundedSemaphore;
    type Elem = ();
    type Plain = ();

    fn parts(&self) -> Result<Parts<'_, ()>> {
        self.inner.parts()
    }

    fn mapping_size(plain: &()) -> Result<usize> {
        Semaphore::mapping_size(plain)
    }

    fn rebuild(plain: (), fds: &mut Received) -> Result<Self> {
        // Its memory was made as a Semaphore's (its cell says so).
        fds.expect_cell_of::<Semaphore>();
        Ok(BoundedSemaphore {
            inner: Semaphore::rebuild(plain, fds)?,
        })
    }
}

handle::handle_serde!([] BoundedSemaphore);
