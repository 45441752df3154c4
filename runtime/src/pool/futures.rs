//! [`wait`] and [`as_completed`]: `concurrent.futures`' functions over many
//! [`AsyncResult`]s.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::async_result::{AsyncResult, ReadyHook};
use super::job::lock;
use crate::error::{Error, Result};

/// When [`wait`] returns: `concurrent.futures`' `return_when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnWhen {
    /// As soon as one result is done (`FIRST_COMPLETED`).
    FirstCompleted,
    /// When every result is done (`ALL_COMPLETED`).
    AllCompleted,
}

/// What [`wait`] found: indices into the slice it was given
/// (`concurrent.futures`' `DoneAndNotDoneFutures`), each in increasing order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DoneAndNotDone {
    /// The results that are done (ready, cancelled included).
    pub done: Vec<usize>,
    /// The others.
    pub not_done: Vec<usize>,
}

/// The indices of the results that became ready, in that order.
#[derive(Default)]
struct ReadySet {
    ready: Mutex<VecDeque<usize>>,
    cond: Condvar,
}

impl ReadySet {
    /// Watches `results`; index `i` is pushed when `results[i]` is ready.
    fn watch<'a, 'p: 'a, R: 'a>(
        results: impl IntoIterator<Item = &'a AsyncResult<'p, R>>,
    ) -> Arc<ReadySet> {
        let set = Arc::new(ReadySet::default());
        for (i, result) in results.into_iter().enumerate() {
            result.on_ready(ReadySet::hook(Arc::downgrade(&set), i));
        }
        set
    }

    fn hook(set: Weak<ReadySet>, i: usize) -> ReadyHook {
        Box::new(move || {
            if let Some(set) = set.upgrade() {
                lock(&set.ready).push_back(i);
                set.cond.notify_all();
            }
        })
    }

    /// Waits until at least `n` indices are in; `false` on timeout.
    fn wait_for(&self, n: usize, deadline: Option<Instant>) -> bool {
        let mut ready = lock(&self.ready);
        while ready.len() < n {
            ready = match deadline {
                None => self.cond.wait(ready).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.cond
                        .wait_timeout(ready, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        true
    }
}

/// Waits until one or all of `results` are done, or `timeout` passes
/// (`None`: no limit): `concurrent.futures.wait(fs, timeout, return_when)`.
/// Returns which are done and which are not; on a timeout that is simply
/// what was done by then. The results stay where they are (take each
/// value with [`get`](AsyncResult::get), which does not wait for a done
/// one).
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use multiproc::pool::{ReturnWhen, wait};
/// use multiproc::{process_fn, Pool};
///
/// #[process_fn]
/// fn sleep_ms(ms: u64) -> u64 {
///     std::thread::sleep(Duration::from_millis(ms));
///     ms
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let pool = Pool::new(2)?;
/// let results = vec![pool.apply_async(sleep_ms, (5,))?, pool.apply_async(sleep_ms, (2000,))?];
/// let first = wait(&results, Some(Duration::from_secs(10)), ReturnWhen::FirstCompleted);
/// assert!(!first.done.is_empty());
/// let all = wait(&results, None, ReturnWhen::AllCompleted);
/// assert_eq!(all.done, vec![0, 1]);
/// # Ok(())
/// # }
/// ```
pub fn wait<R>(
    results: &[AsyncResult<'_, R>],
    timeout: Option<Duration>,
    return_when: ReturnWhen,
) -> DoneAndNotDone {
    let deadline = timeout.map(|t| Instant::now() + t);
    let need = match return_when {
        ReturnWhen::FirstCompleted => results.len().min(1),
        ReturnWhen::AllCompleted => results.len(),
    };
    if results.iter().filter(|r| r.ready()).count() < need {
        let set = ReadySet::watch(results);
        let _ = set.wait_for(need, deadline);
    }
    let mut outcome = DoneAndNotDone::default();
    for (i, r) in results.iter().enumerate() {
        if r.ready() {
            outcome.done.push(i);
        } else {
            outcome.not_done.push(i);
        }
    }
    outcome
}

/// The results of `results` in the order they complete, each with its
/// index in `results`: `concurrent.futures.as_completed(fs)`. Each comes
/// out ready, so its [`get`](AsyncResult::get) does not wait.
///
/// # Examples
///
/// ```no_run
/// use multiproc::pool::as_completed;
/// use multiproc::{process_fn, Pool};
///
/// #[process_fn]
/// fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let pool = Pool::new(2)?;
/// let results = (0..4)
///     .map(|x| pool.apply_async(square, (x,)))
///     .collect::<multiproc::Result<Vec<_>>>()?;
/// let mut sum = 0;
/// for (_index, result) in as_completed(results) {
///     sum += result.get()?;
/// }
/// assert_eq!(sum, 14);
/// # Ok(())
/// # }
/// ```
pub fn as_completed<'pool, R>(
    results: impl IntoIterator<Item = AsyncResult<'pool, R>>,
) -> AsCompleted<'pool, R> {
    let results: Vec<Option<AsyncResult<'pool, R>>> = results.into_iter().map(Some).collect();
    let set = ReadySet::watch(results.iter().flatten());
    AsCompleted {
        left: results.len(),
        results,
        set,
    }
}

/// The iterator of [`as_completed`]: `(index, result)` pairs, in the order
/// the results complete.
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct AsCompleted<'pool, R> {
    results: Vec<Option<AsyncResult<'pool, R>>>,
    left: usize,
    set: Arc<ReadySet>,
}

impl<R> std::fmt::Debug for AsCompleted<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsCompleted")
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl<'pool, R> AsCompleted<'pool, R> {
    fn next_until(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(usize, AsyncResult<'pool, R>)>> {
        while self.left > 0 {
            if !self.set.wait_for(1, deadline) {
                return Err(Error::Timeout);
            }
            let Some(i) = lock(&self.set.ready).pop_front() else {
                continue;
            };
            if let Some(result) = self.results.get_mut(i).and_then(Option::take) {
                self.left -= 1;
                return Ok(Some((i, result)));
            }
        }
        Ok(None)
    }

    /// The next result to complete, waiting at most `timeout`;
    /// `Ok(None)` once every result came out. (`as_completed(fs,
    /// timeout)` raises `TimeoutError` instead.)
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if none completed in time; the iteration goes on.
    pub fn next_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(usize, AsyncResult<'pool, R>)>> {
        self.next_until(Some(Instant::now() + timeout))
    }

    /// How many results have not come out yet.
    pub fn remaining(&self) -> usize {
        self.left
    }
}

impl<'pool, R> Iterator for AsCompleted<'pool, R> {
    type Item = (usize, AsyncResult<'pool, R>);

    fn next(&mut self) -> Option<(usize, AsyncResult<'pool, R>)> {
        self.next_until(None).ok().flatten()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}
