//! [`AsyncResult`]: the pending result of an `*_async` call.

use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Pool;
use super::job::{Job, JobGuard, lock};
use crate::error::{Error, Result};

pub(super) type Finish<R> = fn(&Job, usize, usize, Option<Instant>) -> Result<R>;

/// The pending result of [`Pool::apply_async`], [`Pool::map_async`] or
/// [`Pool::starmap_async`]: Python's `AsyncResult`.
///
/// It borrows its pool, so the pool outlives it. Dropping it discards the
/// result (chunks not yet started are not run).
#[must_use = "an AsyncResult does nothing unless you get() its value"]
pub struct AsyncResult<'pool, R> {
    job: JobGuard,
    chunks: usize,
    items: usize,
    finish: Finish<R>,
    value: Mutex<Option<Result<R>>>,
    taken: bool,
    _pool: PhantomData<&'pool Pool>,
}

impl<R> std::fmt::Debug for AsyncResult<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("chunks", &self.chunks)
            .field("items", &self.items)
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl<'pool, R> AsyncResult<'pool, R> {
    pub(super) fn new(job: JobGuard, chunks: usize, items: usize, finish: Finish<R>) -> Self {
        AsyncResult {
            job,
            chunks,
            items,
            finish,
            value: Mutex::new(None),
            taken: false,
            _pool: PhantomData,
        }
    }

    fn take_value(&mut self, deadline: Option<Instant>) -> Result<R> {
        if self.taken {
            return Err(Error::misuse(
                "the value of this AsyncResult was already taken",
            ));
        }
        let value = match lock(&self.value).take() {
            Some(v) => v,
            None => (self.finish)(&self.job.0, self.chunks, self.items, deadline),
        };
        if !matches!(value, Err(Error::Timeout)) {
            self.taken = true;
        }
        value
    }

    /// Waits for the result and returns it.
    ///
    /// # Errors
    ///
    /// The task's error: [`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Decode`]; for a map, the first failing item's error;
    /// [`Error::Closed`] if the pool was terminated first.
    pub fn get(mut self) -> Result<R> {
        self.take_value(None)
    }

    /// Waits at most `timeout` for the result. On [`Error::Timeout`] the
    /// result stays pending and may be asked for again; once a value or a
    /// task error was returned, later calls fail with
    /// [`Error::InvalidArgument`].
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], or as [`get`](AsyncResult::get).
    pub fn get_timeout(&mut self, timeout: Duration) -> Result<R> {
        let deadline = Instant::now() + timeout;
        if !self.job.0.wait_all(Some(deadline)) {
            return Err(Error::Timeout);
        }
        self.take_value(Some(deadline))
    }

    /// Waits until the result is ready.
    pub fn wait(&self) {
        self.job.0.wait_all(None);
    }

    /// Waits at most `timeout`; `true` if the result is ready.
    #[must_use = "false means the timeout passed and the result is not ready"]
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.job.0.wait_all(Some(Instant::now() + timeout))
    }

    /// `true` once the result is ready (Python's `ready()`).
    pub fn ready(&self) -> bool {
        self.job.0.wait_all(Some(Instant::now()))
    }

    /// Whether the call completed without an error: `None` while it is
    /// not ready (Python raises `ValueError` there).
    pub fn successful(&self) -> Option<bool> {
        if self.taken || !self.ready() {
            return None;
        }
        let mut value = lock(&self.value);
        let value =
            value.get_or_insert_with(|| (self.finish)(&self.job.0, self.chunks, self.items, None));
        Some(value.is_ok())
    }
}
