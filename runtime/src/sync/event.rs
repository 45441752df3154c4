//! [`Event`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::deadline;
use crate::error::Result;
use crate::handle::{mapped_handle, new_block};
use crate::sys::arena::Block;
use crate::sys::futex::{self, Wake};

// Words: flag, sleepers.
const EVENT_BYTES: usize = 8;

/// A flag that processes and threads can wait for: Python's
/// `multiprocessing.Event`.
///
/// # Examples
///
/// ```no_run
/// use multiproc::{process_fn, sync::Event, Process};
/// use std::time::Duration;
///
/// #[process_fn]
/// fn worker(ready: Event) {
///     ready.set();
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let ready = Event::new()?;
/// let mut p = Process::new(worker, (ready.clone(),));
/// p.start()?;
/// assert!(ready.wait_timeout(Duration::from_secs(10)));
/// p.join()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Event {
    map: Arc<Block>,
}

impl Event {
    /// A new event, not set.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    pub fn new() -> Result<Event> {
        Ok(Event {
            map: new_block::<Event>("multiproc-event", EVENT_BYTES, 8)?,
        })
    }

    fn words(&self) -> (&AtomicU32, &AtomicU32) {
        let w = self.map.atomics_u32();
        (&w[0], &w[1])
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        let (flag, sleepers) = self.words();
        flag.store(1, Ordering::SeqCst);
        if sleepers.load(Ordering::SeqCst) > 0 {
            futex::wake(flag, u32::MAX);
        }
    }

    /// Clears the flag.
    pub fn clear(&self) {
        self.words().0.store(0, Ordering::SeqCst);
    }

    /// `true` if the flag is set.
    pub fn is_set(&self) -> bool {
        self.words().0.load(Ordering::SeqCst) != 0
    }

    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let (flag, sleepers) = self.words();
        loop {
            if flag.load(Ordering::SeqCst) != 0 {
                return true;
            }
            if futex::wait_counted(flag, 0, sleepers, deadline) == Wake::TimedOut {
                return false;
            }
        }
    }

    /// Waits until the flag is set.
    pub fn wait(&self) {
        self.wait_until(None);
    }

    /// Waits at most `timeout` for the flag; `false` if it was still not
    /// set then (Python's `wait(timeout)`).
    #[must_use = "false means the timeout passed and the event is not set"]
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(deadline(timeout))
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("set", &self.is_set())
            .finish()
    }
}

mapped_handle!(Event, EVENT_BYTES);
