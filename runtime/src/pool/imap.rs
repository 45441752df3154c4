//! [`Imap`]: the lazy, bounded iterator of `imap` and `imap_unordered`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Pool;
use super::chunk::{ChunkEncoder, decode_chunk};
use super::engine::Task;
use super::job::{ChunkInfo, JobGuard, Outcome, lock};
use crate::error::{Error, Result};
use crate::registry::{self, PanicRecord};

/// The lazy iterator of [`Pool::imap`] and [`Pool::imap_unordered`]: yields
/// one `Result` per input item, pulling input as results are consumed.
/// [`next_timeout`](Imap::next_timeout) is Python's `next(timeout)`; with
/// the `async` feature it is also a `futures_core::Stream`.
///
/// If the input iterator panics at item `k`, the results of the items
/// before `k` come first, then one [`Error::Panicked`] (with `item:
/// Some(k)` and this process's pid), then the iteration ends (as Python
/// raises the input's exception in its place).
///
/// Dropping it early discards the work in flight.
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct Imap<'pool, I, R> {
    pub(super) pool: &'pool Pool,
    pub(super) input: Option<I>,
    pub(super) encoder: ChunkEncoder,
    pub(super) job: JobGuard,
    pub(super) chunksize: usize,
    pub(super) window: usize,
    pub(super) submitted: usize,
    pub(super) taken: usize,
    pub(super) next_item: usize,
    pub(super) ordered: bool,
    pub(super) ready: std::collections::VecDeque<Result<R>>,
    /// The input's panic, yielded after every result before it.
    pub(super) input_error: Option<Error>,
}

// Nothing in it is pinned (the `async` feature's `Stream` moves nothing;
// the input is only ever used through `&mut`).
impl<I, R> Unpin for Imap<'_, I, R> {}

/// The input of an `imap`, with a panic turned into its end (recorded).
struct Guarded<'a, I> {
    inner: &'a mut I,
    panic: &'a mut Option<PanicRecord>,
}

impl<I: Iterator> Iterator for Guarded<'_, I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        if self.panic.is_some() {
            return None;
        }
        let inner = &mut *self.inner;
        match registry::catch(|| inner.next()) {
            Ok(item) => item,
            Err(record) => {
                *self.panic = Some(record);
                None
            }
        }
    }
}

impl<I, R> std::fmt::Debug for Imap<'_, I, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imap")
            .field("ordered", &self.ordered)
            .field("chunksize", &self.chunksize)
            .field("in_flight", &(self.submitted - self.taken))
            .finish_non_exhaustive()
    }
}

impl<I, R> Imap<'_, I, R>
where
    I: Iterator,
    I::Item: Serialize + 'static,
    R: DeserializeOwned + 'static,
{
    /// Submits chunks until the window is full or the input ends.
    fn top_up(&mut self) {
        while self.submitted - self.taken < self.window {
            let Some(input) = self.input.as_mut() else {
                return;
            };
            let mut panic = None;
            let mut guarded = Guarded {
                inner: input,
                panic: &mut panic,
            };
            let next = self.encoder.next(&mut guarded, self.chunksize);
            if let Some(record) = panic {
                self.input = None;
                let at = self.next_item + next.as_ref().map_or(0, |(count, _)| *count);
                self.input_error = Some(record.into_error(std::process::id(), Some(at)));
            }
            let Some((count, encoded)) = next else {
                self.input = None;
                return;
            };
            let info = ChunkInfo {
                index: self.submitted,
                first: self.next_item,
                count,
            };
            self.submitted += 1;
            self.next_item += count;
            let job = Arc::clone(&self.job.0);
            let submitted = encoded.and_then(|(payload, fds)| {
                self.pool.core.submit([Task::new(job, info, payload, fds)])
            });
            if let Err(err) = submitted {
                // Not queued: the chunk's items report the error in place.
                lock(&self.job.0.state).submitted += 1;
                self.job.0.complete(info, Outcome::Failed(err.clone()));
                if matches!(err, Error::Closed) || self.pool.core.check_open().is_err() {
                    self.input = None;
                }
            }
        }
    }
}

impl<I, R> Iterator for Imap<'_, I, R>
where
    I: Iterator,
    I::Item: Serialize + 'static,
    R: DeserializeOwned + 'static,
{
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        self.next_until(None)
    }
}

impl<I, R> Imap<'_, I, R>
where
    I: Iterator,
    I::Item: Serialize + 'static,
    R: DeserializeOwned + 'static,
{
    /// The next result, waiting at most `timeout` for it: Python's
    /// `next(timeout)`. `None` at the end, as [`next`](Iterator::next).
    ///
    /// # Errors
    ///
    /// `Some(Err(Error::Timeout))` if no result came in time: nothing was
    /// consumed and the iteration goes on (an item's own error is never
    /// [`Error::Timeout`]). Otherwise each item's error in its place, as
    /// for [`next`](Iterator::next).
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<R>> {
        self.next_until(Some(Instant::now() + timeout))
    }

    fn next_until(&mut self, deadline: Option<Instant>) -> Option<Result<R>> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(r);
            }
            self.top_up();
            if self.taken == self.submitted {
                return self.input_error.take().map(Err);
            }
            let index = self.ordered.then_some(self.taken);
            let Some((info, outcome)) = self.job.0.take(index, deadline) else {
                return Some(Err(Error::Timeout));
            };
            self.unpack(info, outcome);
        }
    }

    /// Queues the results of one chunk, in their order.
    fn unpack(&mut self, info: ChunkInfo, outcome: Outcome) {
        self.taken += 1;
        let mut values = Vec::with_capacity(info.count);
        let mut errors = decode_chunk::<R>(info, outcome, &mut values)
            .into_iter()
            .peekable();
        let mut values = values.into_iter();
        for pos in 0..info.count {
            match errors.next_if(|(at, _)| *at == pos) {
                Some((_, err)) => self.ready.push_back(Err(err)),
                None => self.ready.extend(values.next().map(Ok)),
            }
        }
    }
}

#[cfg(feature = "async")]
impl<I, R> futures_core::Stream for Imap<'_, I, R>
where
    I: Iterator,
    I::Item: Serialize + 'static,
    R: DeserializeOwned + 'static,
{
    type Item = Result<R>;

    /// As [`next`](Iterator::next), without blocking: the input is read
    /// (and chunks sent) in `poll_next`, and the task is woken when a
    /// result arrives.
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<R>>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if let Some(r) = this.ready.pop_front() {
                return Poll::Ready(Some(r));
            }
            this.top_up();
            if this.taken == this.submitted {
                return Poll::Ready(this.input_error.take().map(Err));
            }
            let index = this.ordered.then_some(this.taken);
            match this.job.0.poll_take(index, cx.waker()) {
                Some((info, outcome)) => this.unpack(info, outcome),
                None => return Poll::Pending,
            }
        }
    }
}
