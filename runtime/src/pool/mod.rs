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
//! compute the next chunks.
//!
//! # Failures
//!
//! A panic fails only its item ([`Error::Panicked`] with the item's index);
//! the worker lives on. A worker that dies (killed, aborted, out of memory)
//! fails exactly the chunks it was running with [`Error::WorkerDied`]
//! naming its pid and signal, and is replaced. Nothing in a pool waits
//! forever on a dead worker.

mod arena;
mod engine;
mod worker;

use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use self::engine::{ChunkInfo, Config, Core, Job, Outcome, Task, lock};
use crate::codec;
use crate::error::{Error, Result};
use crate::process::{ProcessFn, Target};
use crate::registry::{self, PanicRecord};

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
}

/// Builds a [`Pool`]: `Pool::builder().processes(4).initializer(f, args).max_tasks_per_child(100).build()`.
#[derive(Debug)]
pub struct PoolBuilder {
    processes: Option<usize>,
    initializer: Option<Result<Target>>,
    max_tasks_per_child: Option<usize>,
}

impl PoolBuilder {
    /// The number of worker processes (default: [`cpu_count`](crate::process::cpu_count)).
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = Some(n);
        self
    }

    /// Runs the registered function `f` with `args` in each worker when it
    /// starts (and in each replacement), before it takes any task: Python's
    /// `initializer` and `initargs`.
    pub fn initializer<F, A>(mut self, f: F, args: A) -> Self
    where
        F: ProcessFn<A>,
        A: Serialize + 'static,
    {
        self.initializer = Some(Target::of_fn(&f, &args));
        self
    }

    /// A worker exits after running `k` tasks and is replaced by a fresh
    /// one (Python's `maxtasksperchild`). As in Python, a task is one
    /// chunk: pass a chunksize of 1 (`map_chunked`) to count items.
    pub fn max_tasks_per_child(mut self, k: usize) -> Self {
        self.max_tasks_per_child = Some(k);
        self
    }

    /// Starts the workers. With an initializer, waits until every worker
    /// has run it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for 0 processes or `max_tasks_per_child(0)`;
    /// [`Error::NotRegistered`] if the initializer is not a `#[process_fn]`;
    /// [`Error::InitializerFailed`] with the panic's message if the
    /// initializer panicked in a worker; [`Error::Io`] if the OS refuses a
    /// new process.
    pub fn build(self) -> Result<Pool> {
        let processes = self.processes.unwrap_or_else(crate::process::cpu_count);
        if processes == 0 {
            return Err(Error::invalid("a pool needs at least one process"));
        }
        if self.max_tasks_per_child == Some(0) {
            return Err(Error::invalid("max_tasks_per_child must be at least 1"));
        }
        let (initializer, init_fds) = match self.initializer.transpose()? {
            Some(target) => (
                Some((target.entry.name().to_string(), target.args)),
                target.fds,
            ),
            None => (None, Vec::new()),
        };
        let has_initializer = initializer.is_some();
        let config = Config {
            processes,
            init: worker::WorkerInit {
                initializer,
                max_tasks: self.max_tasks_per_child.map(|k| k as u64),
            },
            init_fds,
        };
        let (core, waker) = Core::new(config)?;
        let reader = {
            let core = Arc::clone(&core);
            std::thread::Builder::new()
                .name("multiproc-pool".into())
                .spawn(move || core.read_loop(waker))
                .map_err(|e| Error::io("could not start the pool's thread", e))?
        };
        let pool = Pool {
            core,
            reader: Mutex::new(Some(reader)),
        };
        for _ in 0..processes {
            pool.core.start_worker()?;
        }
        if has_initializer {
            pool.core.wait_ready()?;
        }
        Ok(pool)
    }
}

/// Python's default chunksize: `ceil(n / (4 * workers))`.
fn default_chunksize(n: usize, workers: usize) -> usize {
    n.div_ceil(4 * workers).max(1)
}

/// The sizes of a map's chunks.
///
/// With an explicit chunksize every chunk has that size. Without one, the
/// first chunks have Python's default size, `ceil(n / (4 * workers))`, and
/// then shrink with what is left (guided self-scheduling: `ceil(left / (2 *
/// workers))`), down to an eighth of the default. The end of a map is then
/// made of small chunks, so a worker that is slowed down (by an uneven task
/// or by the machine) holds up the end by a small chunk, not a large one,
/// at the cost of a few more messages.
#[derive(Debug)]
struct ChunkPlan {
    fixed: Option<usize>,
    largest: usize,
    smallest: usize,
    left: usize,
    workers: usize,
}

impl ChunkPlan {
    fn new(n: usize, workers: usize, chunksize: Option<usize>) -> ChunkPlan {
        let largest = default_chunksize(n, workers);
        ChunkPlan {
            fixed: chunksize,
            largest,
            smallest: largest.div_ceil(8),
            left: n,
            workers: workers.max(1),
        }
    }

    fn next_size(&mut self) -> usize {
        let size = match self.fixed {
            Some(size) => size,
            None => self
                .left
                .div_ceil(2 * self.workers)
                .clamp(self.smallest, self.largest),
        };
        self.left = self.left.saturating_sub(size);
        size.max(1)
    }
}

/// One encoded task payload and the descriptors of the handles in it.
type Encoded = (Vec<u8>, Vec<OwnedFd>);

/// Encodes chunks of argument tuples for one registered function.
struct ChunkEncoder {
    name: &'static str,
    /// Capacity for the next buffer (the last chunk's size).
    hint: usize,
}

impl ChunkEncoder {
    fn new<F: 'static>() -> Result<ChunkEncoder> {
        Ok(ChunkEncoder {
            name: registry::lookup_type::<F>()?.name(),
            hint: 0,
        })
    }

    /// Takes up to `max` items from `items` and encodes them as one task
    /// payload. `None` once `items` is exhausted; `(count, Err)` if an item
    /// failed to encode (the chunk's other items are still consumed).
    fn next<T: Serialize + 'static>(
        &mut self,
        items: &mut impl Iterator<Item = T>,
        max: usize,
    ) -> Option<(usize, Result<Encoded>)> {
        let first = items.next()?;
        let mut buf = Vec::with_capacity(self.hint.max(64));
        buf.extend_from_slice(&[0u8; 4]);
        buf.extend_from_slice(&(self.name.len() as u32).to_le_bytes());
        buf.extend_from_slice(self.name.as_bytes());
        let mut fds = Vec::new();
        let mut count = 0usize;
        let result = codec::with_fd_sink(&mut fds, || {
            let mut enc = codec::SeqEncoder::new(&mut buf);
            enc.push_value(&first)?;
            count = 1;
            while count < max {
                let Some(item) = items.next() else { break };
                count += 1;
                enc.push_value(&item)?;
            }
            Ok(())
        });
        if let Err(err) = result {
            // Keep the item count right for the caller's indices.
            count += items.take(max - count).count();
            return Some((count, Err(err)));
        }
        let Ok(count32) = u32::try_from(count) else {
            return Some((count, Err(Error::invalid("chunksize too large"))));
        };
        buf[..4].copy_from_slice(&count32.to_le_bytes());
        self.hint = buf.len();
        Some((count, Ok((buf, fds))))
    }
}

/// Decodes one chunk's outcome: the values of its successful items are
/// appended to `out` in order; the failed items are returned as
/// (position in the chunk, error), in order.
fn decode_chunk<R: DeserializeOwned + 'static>(
    info: ChunkInfo,
    outcome: Outcome,
    out: &mut Vec<R>,
) -> Vec<(usize, Error)> {
    // Results come in a frame (with the descriptors of their handles) or
    // in the worker's output arena, read in place and released on return.
    let (frame_bytes, fds, lease, offset, pid) = match outcome {
        Outcome::Failed(err) => return (0..info.count).map(|i| (i, err.clone())).collect(),
        Outcome::Done { frame, offset, pid } => (frame.bytes, frame.fds, None, offset, pid),
        Outcome::Shared { lease, pid } => (Vec::new(), Vec::new(), Some(lease), 0, pid),
    };
    let bytes: &[u8] = match &lease {
        None => frame_bytes.get(offset..).unwrap_or(&[]),
        Some(lease) => match lease.bytes() {
            Ok(bytes) => bytes,
            Err(err) => return (0..info.count).map(|i| (i, err.clone())).collect(),
        },
    };
    let mut errors = Vec::new();
    let mut pos = 0usize;
    let result = codec::with_fd_source(fds, || -> Result<()> {
        let mut dec = codec::SeqDecoder::new(bytes);
        while pos < info.count {
            // A run of results, then (if the chunk goes on) a panic record.
            let run = dec.next::<u32>()? as usize;
            if run > info.count - pos {
                return Err(Error::Decode {
                    message: format!(
                        "a pool result has {run} values where {} were left",
                        info.count - pos
                    ),
                });
            }
            let before = out.len();
            let decoded = dec.extend_into(run, out);
            pos += out.len() - before;
            decoded?;
            if pos < info.count {
                let record: PanicRecord = dec.next()?;
                errors.push((pos, record.into_error(pid, Some(info.first + pos))));
                pos += 1;
            }
        }
        Ok(())
    });
    if let Err(err) = result {
        // The item that failed to decode, and the ones after it (their
        // bytes cannot be found any more), fail with the decode error.
        errors.extend((pos..info.count).map(|i| (i, err.clone())));
    }
    errors
}

/// Cancels a job when the call that owns it returns or unwinds.
struct JobGuard(Arc<Job>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
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
        let mut encoder = ChunkEncoder::new::<F>()?;
        let mut plan = ChunkPlan::new(n, self.processes(), chunksize);
        let job = JobGuard(Arc::new(Job::default()));
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
            let (info, outcome) = job.take(Some(i), deadline).ok_or(Error::Timeout)?;
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
        F: ProcessFn<(A,)>,
        A: Serialize + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned + 'static,
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
        F: ProcessFn<(A,)>,
        A: Serialize + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned + 'static,
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
        F: ProcessFn<T>,
        T: Serialize + 'static,
        I: IntoIterator<Item = T>,
        F::Output: DeserializeOwned + 'static,
    {
        self.starmap_async(f, iter)?.get()
    }

    /// Starts a [`map`](Pool::map) and returns at once; the input is
    /// encoded and queued before this returns.
    ///
    /// # Errors
    ///
    /// [`Error::NotRegistered`], [`Error::Encode`], [`Error::Closed`] now;
    /// the items' errors from [`AsyncResult::get`].
    pub fn map_async<F, A, I>(&self, f: F, iter: I) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: ProcessFn<(A,)>,
        A: Serialize + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned + 'static,
    {
        self.map_async_impl::<F, A>(&f, iter, None)
    }

    fn map_async_impl<F, A>(
        &self,
        _f: &F,
        iter: impl IntoIterator<Item = A>,
        chunksize: Option<usize>,
    ) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: ProcessFn<(A,)>,
        A: Serialize + 'static,
        F::Output: DeserializeOwned + 'static,
    {
        let (job, chunks, items) = self.submit_all::<F, A>(iter, chunksize)?;
        Ok(AsyncResult::new(
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
    pub fn starmap_async<F, T, I>(&self, _f: F, iter: I) -> Result<AsyncResult<'_, Vec<F::Output>>>
    where
        F: ProcessFn<T>,
        T: Serialize + 'static,
        I: IntoIterator<Item = T>,
        F::Output: DeserializeOwned + 'static,
    {
        let (job, chunks, items) = self.submit_all::<F, T>(iter, None)?;
        Ok(AsyncResult::new(
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
        F: ProcessFn<T>,
        T: Serialize + 'static,
        F::Output: DeserializeOwned + 'static,
    {
        self.apply_async(f, args)?.get()
    }

    /// Runs `f(args...)` in a worker; the result comes from the returned
    /// [`AsyncResult`]: Python's `apply_async`.
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
        F: ProcessFn<T>,
        T: Serialize + 'static,
        F::Output: DeserializeOwned + 'static,
    {
        let (job, chunks, items) = self.submit_all::<F, T>(std::iter::once(args), Some(1))?;
        Ok(AsyncResult::new(
            job,
            chunks,
            items,
            |job, chunks, items, deadline| {
                let mut v: Vec<F::Output> = Pool::collect_map(job, chunks, items, deadline)?;
                v.pop().ok_or_else(|| Error::Decode {
                    message: "a pool task returned no result".into(),
                })
            },
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
        F: ProcessFn<(A,)>,
        A: Serialize + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned + 'static,
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
        F: ProcessFn<(A,)>,
        A: Serialize + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned + 'static,
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
        F: ProcessFn<(A,)>,
        A: Serialize + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned + 'static,
    {
        self.imap_impl(&f, iter, 1, false)
    }

    fn imap_impl<F, A, I>(
        &self,
        _f: &F,
        iter: I,
        chunksize: usize,
        ordered: bool,
    ) -> Result<Imap<'_, I::IntoIter, F::Output>>
    where
        F: ProcessFn<(A,)>,
        A: Serialize + 'static,
        I: IntoIterator<Item = A>,
        F::Output: DeserializeOwned + 'static,
    {
        if chunksize == 0 {
            return Err(Error::invalid("chunksize must be at least 1"));
        }
        self.core.check_open()?;
        Ok(Imap {
            pool: self,
            input: Some(iter.into_iter()),
            encoder: ChunkEncoder::new::<F>()?,
            job: JobGuard(Arc::new(Job::default())),
            chunksize,
            window: (engine::SLOTS + 1) * self.processes(),
            submitted: 0,
            taken: 0,
            next_item: 0,
            ordered,
            ready: std::collections::VecDeque::new(),
        })
    }

    /// No more work will be submitted; queued work still runs. Python's
    /// `close()`. Submitting afterwards fails with [`Error::Closed`].
    pub fn close(&self) {
        self.core.close();
    }

    /// Waits for the outstanding work to finish and the workers to exit.
    /// Python's `join()`: call [`close`](Pool::close) (or
    /// [`terminate`](Pool::terminate)) first.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the pool was neither closed nor terminated.
    pub fn join(&self) -> Result<()> {
        if !self.core.is_closed() {
            return Err(Error::invalid("join() needs close() or terminate() first"));
        }
        let reader = lock(&self.reader).take();
        if reader.is_some() {
            self.core.shutdown_gracefully(reader);
        }
        Ok(())
    }

    /// Stops the workers now (SIGTERM, then SIGKILL after a short grace),
    /// reaps them, and fails outstanding work with [`Error::Closed`].
    /// Python's `terminate()`; also what dropping the pool does.
    pub fn terminate(&self) {
        let reader = lock(&self.reader).take();
        if reader.is_some() {
            self.core.terminate(reader);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.terminate();
    }
}

type Finish<R> = fn(&Job, usize, usize, Option<Instant>) -> Result<R>;

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
    fn new(job: JobGuard, chunks: usize, items: usize, finish: Finish<R>) -> Self {
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
            return Err(Error::invalid(
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

/// The lazy iterator of [`Pool::imap`] and [`Pool::imap_unordered`]: yields
/// one `Result` per input item, pulling input as results are consumed.
///
/// Dropping it early discards the work in flight.
pub struct Imap<'pool, I, R> {
    pool: &'pool Pool,
    input: Option<I>,
    encoder: ChunkEncoder,
    job: JobGuard,
    chunksize: usize,
    window: usize,
    submitted: usize,
    taken: usize,
    next_item: usize,
    ordered: bool,
    ready: std::collections::VecDeque<Result<R>>,
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

#[cfg(test)]
mod tests {
    use super::ChunkPlan;

    fn sizes(n: usize, workers: usize, chunksize: Option<usize>) -> Vec<usize> {
        let mut plan = ChunkPlan::new(n, workers, chunksize);
        let mut left = n;
        let mut out = Vec::new();
        while left > 0 {
            let size = plan.next_size().min(left);
            left -= size;
            out.push(size);
        }
        out
    }

    #[test]
    fn default_plan_starts_at_pythons_size_and_shrinks_at_the_tail() {
        let s = sizes(200, 2, None);
        assert_eq!(s.iter().sum::<usize>(), 200);
        assert_eq!(s[0], 25, "Python's ceil(200 / (4 * 2))");
        assert!(s.windows(2).all(|w| w[0] >= w[1]), "non-increasing: {s:?}");
        assert!(
            *s.last().unwrap_or(&0) <= 4,
            "small chunks at the end: {s:?}"
        );
        let big = sizes(1_000_000, 2, None);
        assert_eq!(big.iter().sum::<usize>(), 1_000_000);
        assert!(big.len() < 40, "few chunks for a big map: {}", big.len());
    }

    #[test]
    fn explicit_chunksize_is_kept() {
        assert_eq!(sizes(10, 2, Some(3)), vec![3, 3, 3, 1]);
        assert_eq!(sizes(0, 2, None), Vec::<usize>::new());
    }
}
