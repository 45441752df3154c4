//! [`Imap`]: the lazy, bounded iterator of `imap` and `imap_unordered`.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Pool;
use super::chunk::{ChunkEncoder, decode_chunk};
use super::engine::Task;
use super::job::{ChunkInfo, JobGuard, Outcome, lock};
use crate::error::{Error, Result};

/// The lazy iterator of [`Pool::imap`] and [`Pool::imap_unordered`]: yields
/// one `Result` per input item, pulling input as results are consumed.
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
            let Some((count, encoded)) = self.encoder.next(input, self.chunksize) else {
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
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(r);
            }
            self.top_up();
            if self.taken == self.submitted {
                return None;
            }
            let index = self.ordered.then_some(self.taken);
            let (info, outcome) = self.job.0.take(index, None)?;
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
}
