//! `Pool`: a fixed set of worker processes that run registered functions
//! over many inputs, with Python's `multiprocessing.Pool` API.
//!
//! ```no_run
//! use multiproc::{process_fn, Pool};
//!
//! #[process_fn]
//! fn cube(x: u64) -> u64 {
//!     x * x * x
//! }
//!
//! # fn main() -> multiproc::Result<()> {
//! let pool = Pool::new(4)?;
//! assert_eq!(pool.map(cube, 0..4)?, vec![0, 1, 8, 27]);
//! # Ok(())
//! # }
//! ```
//!
//! # How work travels
//!
//! Inputs are cut into *chunks* (Python's `chunksize`), each encoded once
//! into one message and sent over the worker's persistent connection; the
//! worker runs the whole chunk and sends one message back with every
//! item's outcome. Two chunks are in flight per worker, so a worker never
//! waits for the parent between chunks. Results are decoded by the thread
//! that asked for them, straight into the output, while the workers
//! compute the next chunks. When a `map`'s chunks take a millisecond or
//! more, a worker is sent up to about 200 ms of them ahead, and while
//! every worker has a core the pool reads their results in batches, so a
//! parent waiting for long tasks wakes a few times per second, not once
//! per task.
//!
//! # Failures
//!
//! A panic fails only its item ([`Error::Panicked`] with the item's index);
//! the worker lives on. A worker that dies (killed, aborted, out of memory)
//! fails exactly the chunks it was running with [`Error::WorkerDied`]
//! naming its pid and signal, and is replaced. Nothing in a pool waits
//! forever on a dead worker.

mod arena;
mod async_result;
mod builder;
mod callbacks;
mod chunk;
mod engine;
mod futures;
mod imap;
mod job;
mod protocol;
#[cfg(feature = "mpi")]
mod ranks;
mod worker;

pub use self::async_result::AsyncResult;
pub use self::builder::PoolBuilder;
pub use self::futures::{AsCompleted, DoneAndNotDone, ReturnWhen, as_completed, wait};
pub use self::imap::Imap;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde::de::DeserializeOwned;

use self::callbacks::CallbackThread;
use self::chunk::{ChunkEncoder, ChunkPlan, decode_chunk};
use self::engine::{Core, Task};
use self::job::{ChunkInfo, Job, JobGuard, lock};
use crate::error::{Error, Result};
use crate::process::ProcessFn;

/// A registered function a pool can run on the argument tuple `Args`: a
/// [`ProcessFn`] whose arguments encode and whose result decodes. It names
/// the bounds every method of [`Pool`] shares; `fn(A) -> R` is a
/// `PoolFn<(A,)>` (for [`map`](Pool::map) and the like) and `fn(A, B) -> R` a
/// `PoolFn<(A, B)>` (for [`starmap`](Pool::starmap) and the like).
///
/// Implemented for every such function, and for nothing else.
pub trait PoolFn<Args>:
    ProcessFn<Args, Output: DeserializeOwned + 'static> + sealed::Encodes<Args>
{
}

impl<F, Args> PoolFn<Args> for F
where
    F: ProcessFn<Args, Output: DeserializeOwned + 'static>,
    Args: Serialize + 'static,
{
}

mod sealed {
    use serde::Serialize;

    /// What makes [`PoolFn`](super::PoolFn) impossible to implement outside,
    /// and gives the pool `Args` under a name that says it encodes.
    pub trait Encodes<Args> {
        /// `Args` itself.
        type Encoded: Serialize + 'static;
        /// `args`, unchanged.
        fn encoded(args: Args) -> Self::Encoded;
    }

    impl<F, Args: Serialize + 'static> Encodes<Args> for F {
        type Encoded = Args;
        #[inline]
        fn encoded(args: Args) -> Args {
            args
        }
    }
}

use self::sealed::Encodes;

/// A pool of worker processes: Python's `multiprocessing.Pool`.
///
/// Workers are long-lived children of this process (the same executable,
/// re-executed), each with one persistent connection to the pool. The pool
/// is `Sync`: several threads may submit work at once.
///
/// Dropping the pool terminates it, like leaving Python's `with Pool() as p:`
/// block: workers get SIGTERM (then SIGKILL after a short grace) and are
/// reaped, so no child outlives it. Results not collected by then are lost;
/// an [`AsyncResult`] or [`Imap`] borrows the pool, so the compiler refuses
/// to drop a pool whose results are still awaited. Call [`close`](Pool::close)
/// and [`join`](Pool::join) to let outstanding work finish first.
///
/// # Examples
///
/// ```no_run
/// use multiproc::{process_fn, Pool};
///
/// #[process_fn]
/// fn cube(x: u64) -> u64 {
///     x * x * x
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let pool = Pool::new(5)?;
/// println!("{:?}", pool.map(cube, 0..4)?); // [0, 1, 8, 27]
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Pool {
    core: Arc<Core>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Where [`AsyncResult`]'s callbacks run (see `callbacks.rs`).
    callbacks: Arc<CallbackThread>,
}

impl Pool {
    /// A pool of `processes` workers, started now: Python's `Pool(n)`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for 0; [`Error::Io`] if the OS refuses a new process.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> multiproc::Result<()> {
    /// let pool = multiproc::Pool::new(4)?;
    /// assert!(multiproc::Pool::new(0).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(processes: usize) -> Result<Pool> {
        Pool::builder().processes(processes).build()
    }

    /// A builder for the initializer, the task limit and the size.
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            processes: None,
            initializer: None,
            max_tasks_per_child: None,
            mpi: false,
            start_method: None,
        }
    }

    /// The number of worker processes.
    pub fn processes(&self) -> usize {
        self.core.processes()
    }

    /// The pids of the workers running now (replacements included).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.core.pids()
    }

    /// Encodes `items` in chunks and submits them as one job.
    /// Returns the job and the number of chunks and items.
    fn submit_all<F: 'static, T: Serialize + 'static>(
        &self,
        items: impl IntoIterator<Item = T>,
        chunksize: Option<usize>,
    ) -> Result<(JobGuard, usize, usize)> {
        if chunksize == Some(0) {
            return Err(Error::invalid("chunksize must be at least 1"));
        }
        self.core.check_open()?;
        let items = items.into_iter();
        // Python turns the input into a list to know its length; an
        // iterator that knows its exact length is not collected.
        match items.size_hint() {
            (lo, Some(hi)) if lo == hi => self.submit_n::<F, T>(items, lo, chunksize),
            _ => {
                let all: Vec<T> = items.collect();
                let n = all.len();
                self.submit_n::<F, T>(all.into_iter(), n, chunksize)
            }
        }
    }

    fn submit_n<F: 'static, T: Serialize + 'static>(
        &self,
        mut items: impl Iterator<Item = T>,
        n: usize,
        chunksize: Option<usize>,
    ) -> Result<(JobGuard, usize, usize)> {
        let mut encoder = ChunkEncoder::new::<F>(self.core.peer())?;
        let mut plan = ChunkPlan::new(n, self.processes(), chunksize);
        // A job of several items wants them all (one of a single item,
        // an `apply`, wants it as soon as it exists).
        let job = JobGuard(Arc::new(if n > 1 {
            Job::batched()
        } else {
            Job::default()
        }));
        let (mut chunks, mut first) = (0usize, 0usize);
        while let Some((count, encoded)) = encoder.next(&mut items, plan.next_size()) {
            let (payload, fds) = encoded?;
            let info = ChunkInfo {
                index: chunks,
                first,
                count,
            };
            self.core
                .submit([Task::new(Arc::clone(&job.0), info, payload, fds)])?;
            chunks += 1;
            first += count;
        }
        Ok((job, chunks, first))
    }

    fn collect_map<R: DeserializeOwned + 'static>(
        job: &Job,
        chunks: usize,
        items: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<R>> {
        let mut out = Vec::with_capacity(items);
        for i in 0..chunks {
            let (info, outcome) = job.take_lazy(i, deadline).ok_or(Error::Timeout)?;
            if let Some((_, err)) = decode_chunk::<R>(info, outcome, &mut out)
                .into_iter()
                .next()
            {
                return Err(err);
            }
        }
        Ok(out)
    }

    /// Applies the registered function `f` to every item of `iter` in the
    /// workers and returns the results in input order: Python's `map`.
    /// Chunks start at Python's default size, `ceil(n / (4 * processes))`,
    /// and shrink towards the end of the input (down to an eighth of that)
    /// so that the workers finish together.
    ///
    /// # Errors
    ///
    /// The first failing item's error, in input order: [`Error::Panicked`]
    /// (with the item's index), [`Error::WorkerDied`] if its worker died,
    /// [`Error::Decode`] if its result did not decode; also
    /// [`Error::NotRegistered`] (no worker is touched), [`Error::Encode`],
    /// [`Error::Closed`] after [`close`](Pool::close) or
    /// [`terminate`](Pool::terminate).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use multiproc::{process_fn, Pool};
    ///
    /// #[process_fn]
    /// fn cube(x: u64) -> u64 {
    ///     x * x * x
    /// }
    ///
    /// # fn main() -> multiproc::Result<()> {
    /// let pool = Pool::new(2)?;
    /// assert_eq!(pool.map(cube, 0..4)?, vec![0, 1, 8, 27]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn map<F, A, I>(&self, f: F, iter: I) -> Result<Vec<F::Output>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_async_impl::<F, A>(&f, iter, None)?.get()
    }

    /// [`map`](Pool::map) with an explicit chunksize (items per message to a worker).
    ///
    /// # Errors
    ///
    /// As [`map`](Pool::map); [`Error::InvalidArgument`] for a chunksize of 0.
    pub fn map_chunked<F, A, I>(&self, f: F, iter: I, chunksize: usize) -> Result<Vec<F::Output>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_async_impl::<F, A>(&f, iter, Some(chunksize))?
            .get()
    }

    /// Like [`map`](Pool::map) for a function of several arguments: each
    /// item is the argument tuple (Python's `starmap`).
    ///
    /// # Errors
    ///
    /// As [`map`](Pool::map).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use multiproc::{process_fn, Pool};
    ///
    /// #[process_fn]
    /// fn add(a: u32, b: u32) -> u32 {
    ///     a + b
    /// }
    ///
    /// # fn main() -> multiproc::Result<()> {
    /// let pool = Pool::new(2)?;
    /// assert_eq!(pool.starmap(add, [(1, 2), (3, 4)])?, vec![3, 7]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn starmap<F, T, I>(&self, f: F, iter: I) -> Result<Vec<F::Output>>
    where
        F: PoolFn<T>,
        I: IntoIterator<Item = T>,
    {
        self.starmap_async_impl(&f, iter, None)?.get()
    }

    /// [`starmap`](Pool::starmap) with an explicit chunksize.
    ///
    /// # Errors
    ///
    /// As [`map`](Pool::map); [`Error::InvalidArgument`] for a chunksize of 0.
    pub fn starmap_chunked<F, T, I>(
        &self,
        f: F,
        iter: I,
        chunksize: usize,
    ) -> Result<Vec<F::Output>>
    where
        F: PoolFn<T>,
        I: IntoIterator<Item = T>,
    {
        self.starmap_async_impl(&f, iter, Some(chunksize))?.get()
    }

    /// Starts a [`map`](Pool::map) and returns at once; the input is
    /// encoded and queued before this returns. Python's `callback` and
    /// `error_callback` are [`AsyncResult::callback`] and
    /// [`AsyncResult::error_callback`].
    ///
    /// # Errors
    ///
    /// [`Error::NotRegistered`], [`Error::Encode`], [`Error::Closed`] now;
    /// the items' errors from [`AsyncResult::get`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use multiproc::{process_fn, Pool};
    ///
    /// #[process_fn]
    /// fn cube(x: u64) -> u64 {
    ///     x * x * x
    /// }
    ///
    /// # fn main() -> multiproc::Result<()> {
    /// let pool = Pool::new(2)?;
    /// let cubes = pool
    ///     .map_async(cube, 0..4)?
    ///     .callback(|all: &Vec<u64>| assert_eq!(all.len(), 4))
    ///     .error_callback(|err| eprintln!("map failed: {err}"));
    /// assert_eq!(cubes.get()?, vec![0, 1, 8, 27]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn map_async<F, A, I>(&self, f: F, iter: I) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_async_impl::<F, A>(&f, iter, None)
    }

    /// [`map_async`](Pool::map_async) with an explicit chunksize.
    ///
    /// # Errors
    ///
    /// As [`map_async`](Pool::map_async); [`Error::InvalidArgument`] for a
    /// chunksize of 0.
    pub fn map_async_chunked<F, A, I>(
        &self,
        f: F,
        iter: I,
        chunksize: usize,
    ) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.map_async_impl::<F, A>(&f, iter, Some(chunksize))
    }

    fn map_async_impl<F, A>(
        &self,
        _f: &F,
        iter: impl IntoIterator<Item = A>,
        chunksize: Option<usize>,
    ) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: PoolFn<(A,)>,
    {
        // An item is its function's 1-tuple of arguments (the same bytes).
        let items = iter
            .into_iter()
            .map(|a| <F as Encodes<(A,)>>::encoded((a,)));
        let (job, chunks, items) = self.submit_all::<F, _>(items, chunksize)?;
        Ok(AsyncResult::new(
            self,
            job,
            chunks,
            items,
            Pool::collect_map::<F::Output>,
        ))
    }

    /// Starts a [`starmap`](Pool::starmap) and returns at once.
    ///
    /// # Errors
    ///
    /// As [`map_async`](Pool::map_async).
    pub fn starmap_async<F, T, I>(&self, f: F, iter: I) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: PoolFn<T>,
        I: IntoIterator<Item = T>,
    {
        self.starmap_async_impl(&f, iter, None)
    }

    /// [`starmap_async`](Pool::starmap_async) with an explicit chunksize.
    ///
    /// # Errors
    ///
    /// As [`map_async`](Pool::map_async); [`Error::InvalidArgument`] for a
    /// chunksize of 0.
    pub fn starmap_async_chunked<F, T, I>(
        &self,
        f: F,
        iter: I,
        chunksize: usize,
    ) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: PoolFn<T>,
        I: IntoIterator<Item = T>,
    {
        self.starmap_async_impl(&f, iter, Some(chunksize))
    }

    fn starmap_async_impl<F, T, I>(
        &self,
        _f: &F,
        iter: I,
        chunksize: Option<usize>,
    ) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: PoolFn<T>,
        I: IntoIterator<Item = T>,
    {
        let items = iter.into_iter().map(<F as Encodes<T>>::encoded);
        let (job, chunks, items) = self.submit_all::<F, _>(items, chunksize)?;
        Ok(AsyncResult::new(
            self,
            job,
            chunks,
            items,
            Pool::collect_map::<F::Output>,
        ))
    }

    /// Runs `f(args...)` in a worker and waits for its result: Python's `apply`.
    ///
    /// # Errors
    ///
    /// As [`apply_async`](Pool::apply_async) and [`AsyncResult::get`].
    pub fn apply<F, T>(&self, f: F, args: T) -> Result<F::Output>
    where
        F: PoolFn<T>,
    {
        #[cfg(feature = "mpi")]
        if self.core.runs_alone() {
            return self.apply_alone::<F, T>(args);
        }
        self.apply_async(f, args)?.get()
    }

    /// `apply` on remote workers: the task is sent and answered on this
    /// thread when a worker is free ([`Core::run_alone`]: no job, queue or
    /// dispatch), otherwise submitted as [`apply_async`](Pool::apply_async)
    /// does. The same result, and the same error, in either case.
    #[cfg(feature = "mpi")]
    fn apply_alone<F, T>(&self, args: T) -> Result<F::Output>
    where
        F: PoolFn<T>,
    {
        thread_local! {
            /// The last task run alone's buffer, for the next one's
            /// arguments.
            static PAYLOAD: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let args = <F as Encodes<T>>::encoded(args);
        let encoded =
            ChunkEncoder::new::<F>(self.core.peer()).and_then(|mut encoder| {
                match encoder.next_in(&mut std::iter::once(args), 1, PAYLOAD.take()) {
                    Some((count, encoded)) => encoded.map(|encoded| (count, encoded)),
                    None => Err(Error::internal("an apply without its arguments")),
                }
            });
        let (count, (payload, fds)) = match encoded {
            Ok(encoded) => encoded,
            // A closed pool says so first, as `apply_async`.
            Err(err) => {
                self.core.check_open()?;
                return Err(err);
            }
        };
        let info = ChunkInfo {
            index: 0,
            first: 0,
            count,
        };
        if fds.is_empty() {
            let mut value = None;
            let ran = self.core.run_alone(&payload, &mut |outcome| {
                value = Some(match outcome {
                    engine::AloneOutcome::Outcomes { bytes, pid } => {
                        let mut out = Vec::with_capacity(1);
                        match chunk::decode_outcomes::<F::Output>(
                            info,
                            bytes,
                            Vec::new(),
                            pid,
                            &mut out,
                        )
                        .into_iter()
                        .next()
                        {
                            Some((_, err)) => Err(err),
                            None => Pool::the_one(out),
                        }
                    }
                    engine::AloneOutcome::Failed(err) => Err(err),
                });
            });
            if ran {
                // A small one's buffer serves the next.
                if payload.capacity() <= 4096 {
                    PAYLOAD.set(payload);
                }
                return value
                    .unwrap_or_else(|| Err(Error::internal("an apply without its answer")));
            }
        }
        self.core.check_open()?;
        let job = JobGuard(Arc::new(Job::default()));
        self.core
            .submit([Task::new(Arc::clone(&job.0), info, payload, fds)])?;
        AsyncResult::new(self, job, 1, count, Pool::finish_one::<F::Output>).get()
    }

    /// The value of a job of one item (`apply_async`'s).
    fn finish_one<R: DeserializeOwned + 'static>(
        job: &Job,
        chunks: usize,
        items: usize,
        deadline: Option<Instant>,
    ) -> Result<R> {
        Pool::the_one(Pool::collect_map(job, chunks, items, deadline)?)
    }

    /// The one result of a one-item job.
    fn the_one<R>(mut results: Vec<R>) -> Result<R> {
        results.pop().ok_or_else(|| Error::Decode {
            message: "a pool task returned no result".into(),
        })
    }

    /// Runs `f(args...)` in a worker; the result comes from the returned
    /// [`AsyncResult`]: Python's `apply_async`. Python's `callback` and
    /// `error_callback` are [`AsyncResult::callback`] and
    /// [`AsyncResult::error_callback`].
    ///
    /// # Errors
    ///
    /// [`Error::NotRegistered`], [`Error::Encode`], [`Error::Closed`] now;
    /// the task's own error from [`AsyncResult::get`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use multiproc::{process_fn, Pool};
    ///
    /// #[process_fn]
    /// fn add(a: u32, b: u32) -> u32 {
    ///     a + b
    /// }
    ///
    /// # fn main() -> multiproc::Result<()> {
    /// let pool = Pool::new(2)?;
    /// let mut result = pool.apply_async(add, (2, 3))?;
    /// match result.get_timeout(Duration::from_secs(10)) {
    ///     Ok(sum) => assert_eq!(sum, 5),
    ///     Err(err) if err.is_timeout() => println!("not yet"),
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply_async<F, T>(&self, _f: F, args: T) -> Result<AsyncResult<'_, F::Output>>
    where
        F: PoolFn<T>,
    {
        let args = <F as Encodes<T>>::encoded(args);
        let (job, chunks, items) = self.submit_all::<F, _>(std::iter::once(args), Some(1))?;
        Ok(AsyncResult::new(
            self,
            job,
            chunks,
            items,
            Pool::finish_one::<F::Output>,
        ))
    }

    /// A lazy iterator of `f(item)` results in input order: Python's `imap`.
    /// It reads `iter` as results are consumed, with a bounded number of
    /// chunks in flight, so `iter` may be endless. One item per chunk, like
    /// Python; see [`imap_chunked`](Pool::imap_chunked).
    ///
    /// # Errors
    ///
    /// [`Error::NotRegistered`] now; each item's error (as for
    /// [`map`](Pool::map)) in its place in the iteration.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use multiproc::{process_fn, Pool};
    ///
    /// #[process_fn]
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// # fn main() -> multiproc::Result<()> {
    /// let pool = Pool::new(2)?;
    /// let first: Vec<u64> = pool.imap(square, 0..)?.take(5).collect::<Result<_, _>>()?;
    /// assert_eq!(first, vec![0, 1, 4, 9, 16]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn imap<F, A, I>(&self, f: F, iter: I) -> Result<Imap<'_, I::IntoIter, F::Output>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.imap_impl(&f, iter, 1, true)
    }

    /// [`imap`](Pool::imap) with `chunksize` items per message.
    ///
    /// # Errors
    ///
    /// As [`imap`](Pool::imap); [`Error::InvalidArgument`] for a chunksize of 0.
    pub fn imap_chunked<F, A, I>(
        &self,
        f: F,
        iter: I,
        chunksize: usize,
    ) -> Result<Imap<'_, I::IntoIter, F::Output>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.imap_impl(&f, iter, chunksize, true)
    }

    /// Like [`imap`](Pool::imap), but yields results as they complete, in
    /// any order: Python's `imap_unordered`.
    ///
    /// # Errors
    ///
    /// As [`imap`](Pool::imap).
    pub fn imap_unordered<F, A, I>(&self, f: F, iter: I) -> Result<Imap<'_, I::IntoIter, F::Output>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.imap_impl(&f, iter, 1, false)
    }

    /// [`imap_unordered`](Pool::imap_unordered) with `chunksize` items per
    /// message (the items of one chunk come out together, in their order).
    ///
    /// # Errors
    ///
    /// As [`imap`](Pool::imap); [`Error::InvalidArgument`] for a chunksize of 0.
    pub fn imap_unordered_chunked<F, A, I>(
        &self,
        f: F,
        iter: I,
        chunksize: usize,
    ) -> Result<Imap<'_, I::IntoIter, F::Output>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        self.imap_impl(&f, iter, chunksize, false)
    }

    fn imap_impl<F, A, I>(
        &self,
        _f: &F,
        iter: I,
        chunksize: usize,
        ordered: bool,
    ) -> Result<Imap<'_, I::IntoIter, F::Output>>
    where
        F: PoolFn<(A,)>,
        I: IntoIterator<Item = A>,
    {
        if chunksize == 0 {
            return Err(Error::invalid("chunksize must be at least 1"));
        }
        self.core.check_open()?;
        Ok(Imap {
            pool: self,
            input: Some(iter.into_iter()),
            encoder: ChunkEncoder::new::<F>(self.core.peer())?,
            job: JobGuard(Arc::new(Job::default())),
            chunksize,
            window: (engine::SLOTS + 1) * self.processes(),
            submitted: 0,
            taken: 0,
            next_item: 0,
            ordered,
            ready: std::collections::VecDeque::new(),
            input_error: None,
        })
    }

    /// No more work will be submitted; queued work still runs. Python's
    /// `close()`. Submitting afterwards fails with [`Error::Closed`].
    pub fn close(&self) {
        self.core.close();
    }

    /// Waits for the outstanding work to finish, the workers to exit and
    /// the callbacks due to run (then stops the callback thread; see
    /// [`AsyncResult`]'s Callbacks). Python's `join()`: call
    /// [`close`](Pool::close) (or [`terminate`](Pool::terminate)) first.
    ///
    /// # Errors
    ///
    /// [`Error::Misuse`] if the pool was neither closed nor terminated.
    pub fn join(&self) -> Result<()> {
        if !self.core.is_closed() {
            return Err(Error::misuse("join() needs close() or terminate() first"));
        }
        let reader = lock(&self.reader).take();
        if reader.is_some() {
            self.core.shutdown_gracefully(reader);
        }
        // Python's join() also waits for the result handler: every
        // callback due has run when it returns.
        self.callbacks.stop();
        Ok(())
    }

    /// Stops the workers now (SIGTERM, then SIGKILL after a short grace),
    /// reaps them, and fails outstanding work with [`Error::Closed`].
    /// Python's `terminate()`; also what dropping the pool does. Returns
    /// once the callbacks due (their error callbacks get
    /// [`Error::Closed`]) have run on the callback thread.
    pub fn terminate(&self) {
        let reader = lock(&self.reader).take();
        if reader.is_some() {
            self.core.terminate(reader);
        }
        self.callbacks.stop();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.terminate();
    }
}
