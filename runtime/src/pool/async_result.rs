//! [`AsyncResult`]: the pending result of an `*_async` call, with
//! Python's `AsyncResult` API (`get`, `wait`, `ready`, `successful`), the
//! `callback`/`error_callback` of `apply_async` and `map_async`, and the
//! future's side of `concurrent.futures` (`cancel`, `done`, done
//! callbacks; [`wait`](super::wait) and [`as_completed`](super::as_completed)
//! over many).
//!
//! Without callbacks, the thread that asks for the value decodes it. Once a
//! callback is added, the pool's callback thread (see `callbacks.rs`)
//! decodes it when the job is finished, runs the callbacks, and keeps the
//! value for [`get`](AsyncResult::get).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::Pool;
use super::job::{Job, JobGuard, lock, set_waker};
use crate::error::{Error, Result};

pub(super) type Finish<R> = fn(&Job, usize, usize, Option<Instant>) -> Result<R>;

/// A callback run with the outcome.
type DoneCallback<R> = Box<dyn FnOnce(&Result<R>) + Send>;

/// A hook run once the result is ready (quick, never blocking).
pub(super) type ReadyHook = Box<dyn FnOnce() + Send>;

/// The value of a result with callbacks, as the callback thread delivers it.
struct Delivery<R> {
    state: Mutex<DeliveryState<R>>,
    cond: Condvar,
}

struct DeliveryState<R> {
    value: Option<Result<R>>,
    /// The value was decoded and the callbacks added before it ran.
    ready: bool,
    /// Callbacks are running with the value (`get` waits for them).
    busy: bool,
    /// Callbacks still to run.
    pending: Vec<DoneCallback<R>>,
    on_ready: Vec<ReadyHook>,
    waker: Option<Waker>,
}

impl<R> Delivery<R> {
    fn new(first: DoneCallback<R>) -> Delivery<R> {
        Delivery {
            state: Mutex::new(DeliveryState {
                value: None,
                ready: false,
                busy: true,
                pending: vec![first],
                on_ready: Vec::new(),
                waker: None,
            }),
            cond: Condvar::new(),
        }
    }

    /// Runs the pending callbacks with `value` until none is left, then
    /// keeps the value and says it is ready. On the callback thread.
    fn drain(&self, value: Result<R>) {
        loop {
            let callbacks = {
                let mut st = lock(&self.state);
                let callbacks = std::mem::take(&mut st.pending);
                if callbacks.is_empty() {
                    st.value = Some(value);
                    st.busy = false;
                    st.ready = true;
                    let hooks = std::mem::take(&mut st.on_ready);
                    let waker = st.waker.take();
                    drop(st);
                    self.cond.notify_all();
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                    for hook in hooks {
                        hook();
                    }
                    return;
                }
                callbacks
            };
            for callback in callbacks {
                // A panicking callback is reported by the panic hook; the
                // others still run and the value stays.
                let _ = crate::registry::catch(|| callback(&value));
            }
        }
    }

    /// Waits until the value can be taken; `None` once `deadline` passed.
    fn wait_idle(&self, deadline: Option<Instant>) -> Option<MutexGuard<'_, DeliveryState<R>>> {
        let mut st = lock(&self.state);
        while !st.ready || st.busy {
            st = match deadline {
                None => self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.cond
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        Some(st)
    }
}

/// The pending result of [`Pool::apply_async`], [`Pool::map_async`] or
/// [`Pool::starmap_async`]: Python's `AsyncResult`, and a future in the
/// `concurrent.futures` sense ([`cancel`](AsyncResult::cancel),
/// [`done`](AsyncResult::done),
/// [`add_done_callback`](AsyncResult::add_done_callback), and
/// [`wait`](super::wait) / [`as_completed`](super::as_completed) over
/// many). With the `async` feature it is also a [`Future`](std::future::Future)
/// of `Result<R>`.
///
/// It borrows its pool, so the pool outlives it (for a `'static` result,
/// one another thread or an async runtime's `spawn` can take, keep the
/// pool in a `static`, e.g. a `OnceLock<Pool>`). Dropping it discards the
/// result (chunks not yet started are not run), unless it has callbacks:
/// then the work runs on and the callbacks get its outcome, as in Python.
///
/// # Callbacks
///
/// [`callback`](AsyncResult::callback), [`error_callback`](AsyncResult::error_callback)
/// and [`add_done_callback`](AsyncResult::add_done_callback) run on the
/// pool's callback thread, `multiproc-pool-callbacks` (Python's result
/// handler thread), never on the thread that reads the workers' results,
/// so a slow callback delays other callbacks, never the delivery of
/// results. Each runs exactly once. Those added before the result arrives
/// run before it is [`ready`](AsyncResult::ready) (as in Python, `get`
/// returns after them); one added later runs soon after, on the same
/// thread. A callback added after [`get_timeout`](AsyncResult::get_timeout)
/// took the value never runs (there is no value left to show it). A
/// panicking callback is reported by the panic hook and otherwise ignored.
/// [`Pool::join`] and [`Pool::terminate`] (and so dropping the pool) wait
/// for the callbacks already due (a callback that never returns keeps them
/// waiting); a callback must not wait for another result's callbacks
/// (they run on the same thread). Once the pool was joined or terminated,
/// a callback added runs in the thread that adds it.
///
/// # Examples
///
/// ```no_run
/// use std::sync::mpsc;
/// use multiproc::{process_fn, Pool};
///
/// #[process_fn]
/// fn add(a: u32, b: u32) -> u32 {
///     a + b
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let pool = Pool::new(2)?;
/// let (tx, rx) = mpsc::channel();
/// let result = pool
///     .apply_async(add, (2, 3))?
///     .callback(move |sum: &u32| tx.send(*sum).unwrap_or(()));
/// assert_eq!(result.get()?, 5);
/// assert_eq!(rx.recv().ok(), Some(5));
/// # Ok(())
/// # }
/// ```
#[must_use = "an AsyncResult does nothing unless you get() its value"]
pub struct AsyncResult<'pool, R> {
    pool: &'pool Pool,
    job: JobGuard,
    chunks: usize,
    items: usize,
    finish: Finish<R>,
    /// The value, when this thread decoded it before it was taken.
    value: Mutex<Option<Result<R>>>,
    /// Set once the result has callbacks.
    delivery: Option<Arc<Delivery<R>>>,
    taken: bool,
    cancelled: bool,
}

impl<R> std::fmt::Debug for AsyncResult<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("chunks", &self.chunks)
            .field("items", &self.items)
            .field("ready", &self.ready())
            .field("callbacks", &self.delivery.is_some())
            .finish_non_exhaustive()
    }
}

// Nothing in it is pinned (the `async` feature's `Future` moves nothing).
impl<R> Unpin for AsyncResult<'_, R> {}

impl<'pool, R> AsyncResult<'pool, R> {
    pub(super) fn new(
        pool: &'pool Pool,
        job: JobGuard,
        chunks: usize,
        items: usize,
        finish: Finish<R>,
    ) -> Self {
        job.0.seal();
        AsyncResult {
            pool,
            job,
            chunks,
            items,
            finish,
            value: Mutex::new(None),
            delivery: None,
            taken: false,
            cancelled: false,
        }
    }

    fn take_value(&mut self, deadline: Option<Instant>) -> Result<R> {
        if self.taken {
            return Err(Error::misuse(
                "the value of this AsyncResult was already taken",
            ));
        }
        let value = match &self.delivery {
            Some(delivery) => match delivery.wait_idle(deadline) {
                None => Err(Error::Timeout),
                Some(mut st) => st.value.take().unwrap_or_else(|| {
                    Err(Error::misuse(
                        "the value of this AsyncResult was already taken",
                    ))
                }),
            },
            None => match lock(&self.value).take() {
                Some(v) => v,
                None => (self.finish)(&self.job.0, self.chunks, self.items, deadline),
            },
        };
        if !matches!(value, Err(Error::Timeout)) {
            self.taken = true;
        }
        value
    }

    /// Waits for the result and returns it. It consumes the
    /// `AsyncResult`: the value is moved out, not copied (Python's `get()`
    /// may be called again; keep the value instead).
    ///
    /// # Errors
    ///
    /// The task's error: [`Error::Panicked`], [`Error::WorkerDied`],
    /// [`Error::Decode`]; for a map, the first failing item's error;
    /// [`Error::Closed`] if the pool was terminated first;
    /// [`Error::Cancelled`] after [`cancel`](AsyncResult::cancel).
    pub fn get(mut self) -> Result<R> {
        self.take_value(None)
    }

    /// Waits at most `timeout` for the result. On [`Error::Timeout`] the
    /// result stays pending and may be asked for again; once a value or a
    /// task error was returned, later calls fail with [`Error::Misuse`].
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], or as [`get`](AsyncResult::get).
    pub fn get_timeout(&mut self, timeout: Duration) -> Result<R> {
        let deadline = Instant::now() + timeout;
        if !self.wait_until(Some(deadline)) {
            return Err(Error::Timeout);
        }
        self.take_value(Some(deadline))
    }

    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        match &self.delivery {
            Some(delivery) => {
                let mut st = lock(&delivery.state);
                while !st.ready {
                    st = match deadline {
                        None => delivery.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                        Some(d) => {
                            let left = d.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                return false;
                            }
                            delivery
                                .cond
                                .wait_timeout(st, left)
                                .unwrap_or_else(|p| p.into_inner())
                                .0
                        }
                    };
                }
                true
            }
            None => self.job.0.wait_all(deadline),
        }
    }

    /// Waits until the result is ready.
    pub fn wait(&self) {
        self.wait_until(None);
    }

    /// Waits at most `timeout`; `true` if the result is ready.
    #[must_use = "false means the timeout passed and the result is not ready"]
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Some(Instant::now() + timeout))
    }

    /// `true` once the result is ready (Python's `ready()`): every chunk
    /// came back, and the callbacks added before ran.
    pub fn ready(&self) -> bool {
        match &self.delivery {
            Some(delivery) => lock(&delivery.state).ready,
            None => self.job.0.is_finished(),
        }
    }

    /// `true` once the result is ready, cancelled included:
    /// `concurrent.futures.Future.done()`, the same as
    /// [`ready`](AsyncResult::ready).
    pub fn done(&self) -> bool {
        self.ready()
    }

    /// Whether the call completed without an error: `None` while it is
    /// not ready (Python raises `ValueError` there), and once the value
    /// was taken.
    pub fn successful(&self) -> Option<bool> {
        if self.taken || !self.ready() {
            return None;
        }
        if let Some(delivery) = &self.delivery {
            return delivery.wait_idle(None)?.value.as_ref().map(Result::is_ok);
        }
        let mut value = lock(&self.value);
        let value =
            value.get_or_insert_with(|| (self.finish)(&self.job.0, self.chunks, self.items, None));
        Some(value.is_ok())
    }

    /// Cancels the call if none of its chunks was sent to a worker yet:
    /// `concurrent.futures.Future.cancel()`. Returns `true` if it is
    /// cancelled (now or before); then [`get`](AsyncResult::get) returns
    /// [`Error::Cancelled`], the result is [`done`](AsyncResult::done),
    /// and its error callbacks run with [`Error::Cancelled`]. Returns
    /// `false`, changing nothing, once a chunk is running, waiting in a
    /// worker, or done.
    pub fn cancel(&mut self) -> bool {
        if !self.cancelled && self.pool.core.cancel_unstarted(&self.job.0) {
            self.cancelled = true;
        }
        self.cancelled
    }

    /// `true` if [`cancel`](AsyncResult::cancel) cancelled it.
    pub fn cancelled(&self) -> bool {
        self.cancelled
    }

    /// Runs `hook` once the result is ready (now if it is). For `wait`
    /// and `as_completed`: `hook` must be quick and never block.
    pub(super) fn on_ready(&self, hook: ReadyHook) {
        match &self.delivery {
            None => self.job.0.on_finished(hook),
            Some(delivery) => {
                let mut st = lock(&delivery.state);
                if st.ready {
                    drop(st);
                    hook();
                } else {
                    st.on_ready.push(hook);
                }
            }
        }
    }

    /// `true` if the result is ready; otherwise `waker` is woken when it
    /// may be.
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(super) fn poll_ready(&self, waker: &Waker) -> bool {
        match &self.delivery {
            None => self.job.0.poll_finished(waker),
            Some(delivery) => {
                let mut st = lock(&delivery.state);
                if st.ready && !st.busy {
                    return true;
                }
                set_waker(&mut st.waker, waker);
                false
            }
        }
    }
}

impl<R: Send + 'static> AsyncResult<'_, R> {
    /// Runs `callback` with the value if the call succeeds: Python's
    /// `callback` argument of `apply_async`, `map_async` and
    /// `starmap_async` (for a map, the callback gets the whole list). It
    /// runs once, on the pool's callback thread (see
    /// [Callbacks](AsyncResult#callbacks)); `get` still returns the value.
    pub fn callback(self, callback: impl FnOnce(&R) + Send + 'static) -> Self {
        self.with_done_callback(move |outcome: &Result<R>| {
            if let Ok(value) = outcome {
                callback(value);
            }
        })
    }

    /// Runs `error_callback` with the error if the call fails: Python's
    /// `error_callback` (for a map, the first failing item's error; also
    /// [`Error::Closed`] if the pool is terminated first and
    /// [`Error::Cancelled`] after [`cancel`](AsyncResult::cancel)). It
    /// runs once, on the pool's callback thread (see
    /// [Callbacks](AsyncResult#callbacks)).
    pub fn error_callback(self, error_callback: impl FnOnce(&Error) + Send + 'static) -> Self {
        self.with_done_callback(move |outcome: &Result<R>| {
            if let Err(err) = outcome {
                error_callback(err);
            }
        })
    }

    fn with_done_callback(mut self, f: impl FnOnce(&Result<R>) + Send + 'static) -> Self {
        self.add_done_callback(f);
        self
    }

    /// Runs `f` with the outcome (the value or the error) once the result
    /// is done: `concurrent.futures.Future.add_done_callback`. On the
    /// pool's callback thread, once; added after the result is ready, it
    /// runs soon after (see [Callbacks](AsyncResult#callbacks)).
    pub fn add_done_callback(&mut self, f: impl FnOnce(&Result<R>) + Send + 'static) {
        if self.taken {
            return;
        }
        let f: DoneCallback<R> = Box::new(f);
        let callbacks = Arc::clone(&self.pool.callbacks);
        callbacks.ensure_started();
        if let Some(delivery) = &self.delivery {
            let mut st = lock(&delivery.state);
            st.pending.push(f);
            if st.ready && !st.busy {
                // Delivered and idle: run it now, with the value.
                let Some(value) = st.value.take() else {
                    return;
                };
                st.busy = true;
                drop(st);
                let delivery = Arc::clone(delivery);
                callbacks.run(Box::new(move || delivery.drain(value)));
            }
            return;
        }
        // The first callback: from now on the callback thread decodes the
        // value, and the job runs to its end even if this is dropped.
        let delivery = Arc::new(Delivery::new(f));
        self.delivery = Some(Arc::clone(&delivery));
        let job = Arc::clone(&self.job.0);
        job.detach();
        if let Some(value) = lock(&self.value).take() {
            // Decoded here already (by `successful`).
            callbacks.run(Box::new(move || delivery.drain(value)));
            return;
        }
        let (chunks, items, finish) = (self.chunks, self.items, self.finish);
        let hook_job = Arc::clone(&job);
        job.on_finished(Box::new(move || {
            callbacks.run(Box::new(move || {
                let value = finish(&hook_job, chunks, items, None);
                delivery.drain(value);
            }));
        }));
    }
}

#[cfg(feature = "async")]
impl<R> std::future::Future for AsyncResult<'_, R> {
    type Output = Result<R>;

    /// Ready with [`get`](AsyncResult::get)'s outcome. Polled again
    /// after that, it is [`Error::Misuse`].
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<R>> {
        let this = self.get_mut();
        if this.taken || this.poll_ready(cx.waker()) {
            std::task::Poll::Ready(this.take_value(None))
        } else {
            std::task::Poll::Pending
        }
    }
}
