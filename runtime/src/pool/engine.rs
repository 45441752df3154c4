//! The parent side of a pool: workers, the queue of encoded chunks, jobs
//! that collect their chunks' outcomes, and the thread that reads results.
//!
//! Any thread may *dispatch*: under the state lock it assigns queued chunks
//! to workers with a free slot (at most [`SLOTS`] chunks in flight per
//! worker), then sends them with the lock released, each worker's socket
//! behind its own lock. Submitting threads dispatch after queueing; the
//! reader thread dispatches after each result frees a slot. Sends never
//! wait on a busy worker (a worker reads its socket on a thread of its
//! own), so the reader can send too.
//!
//! The reader thread polls every worker's socket (and a wake-up socket).
//! A result goes to its job; end of stream means the worker died: every
//! frame it sent before dying is still read and delivered, then it is
//! reaped, exactly its in-flight chunks fail with [`Error::WorkerDied`],
//! and a replacement starts. Jobs only collect raw frames; decoding into
//! typed values happens in the thread that consumes the results, in
//! parallel with the workers.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use nix::sys::signal::Signal;

use super::arena::{InArena, Lease, OutArena, SHM_MIN};
use super::protocol::{
    self, AbortReport, ChunkBody, FromWorker, Malformed, POOL_MAX_FRAME, RESULT_AT, TaskFailure,
    ToWorker, WorkerInit,
};
use super::worker;
use crate::child::{self, ChildProc, Mode};
use crate::codec;
use crate::error::{Error, Result};
use crate::registry::PanicRecord;
use crate::sys;
use crate::wire::{Channel, Frame};

use super::job::{ChunkInfo, Job, Outcome, lock};

/// Chunks in flight per worker: one running, one waiting in the worker, so
/// it never idles waiting for the parent, and the tail of a map stays
/// balanced across workers.
pub(crate) const SLOTS: usize = 2;

/// A local worker whose tasks take at least this long (as learned from
/// its results) runs *deep*: it is given up to [`DEEP_SLOTS`] chunks of
/// `map`s ahead (about [`AHEAD`] of work) in one send, and, while every
/// worker can have a core (`Core::defer`), the reader lets their results
/// wait in its socket until about half of that work should be done (see
/// [`defer_until`]), then reads them all at once: one wake-up of the
/// parent for several tasks instead of one each. Shorter tasks keep
/// [`SLOTS`] and a wake-up per result, which costs less than their run.
const LONG_TASK: Duration = Duration::from_millis(1);

/// The work a deep worker is given ahead of it.
const AHEAD: Duration = Duration::from_millis(200);

/// The most chunks a deep worker holds at once.
const DEEP_SLOTS: usize = 32;

/// How many chunks a worker whose tasks take `task_time` may hold, given
/// its usual `slots`.
fn window(slots: usize, task_time: Option<Duration>) -> usize {
    match task_time {
        Some(t) if t >= LONG_TASK => {
            let ahead = (AHEAD.as_nanos() / t.as_nanos().max(1)) as usize;
            (slots + ahead).clamp(slots, DEEP_SLOTS.max(slots))
        }
        _ => slots,
    }
}

/// The next task-time estimate after a sample: down at once (a worker
/// read too late idles), up by a quarter of the difference.
fn learn(task_time: Option<Duration>, sample: Duration) -> Duration {
    match task_time {
        Some(t) if sample > t => t + (sample - t) / 4,
        _ => sample,
    }
}

/// Until when the reader may leave the results of a worker unread: it
/// has held `in_flight` chunks of tasks of `task_time` since `from` (its
/// last results were read then). With chunks still queued (`refill`), it
/// keeps two, without one (the last result is read as it comes), and the
/// reader wakes when half of the others should be done: a worker that
/// runs up to twice as fast as it did (a busy machine's cores come and
/// go) still never waits for work, nor its results for the reader.
/// `None`: read each result as it comes.
fn defer_until(
    from: Instant,
    task_time: Duration,
    in_flight: usize,
    refill: bool,
) -> Option<Instant> {
    let keep = if refill { 2 } else { 1 };
    if task_time < LONG_TASK || in_flight <= keep {
        return None;
    }
    let ahead = u32::try_from(in_flight - keep).unwrap_or(u32::MAX);
    Some(from + task_time.saturating_mul(ahead) / 2)
}

static WORKER_COUNTER: AtomicUsize = AtomicUsize::new(1);

/// An encoded chunk waiting for a worker, or sent to one and not yet
/// answered (kept, so that a worker that dies before it starts the chunk
/// gives it back instead of failing it).
#[derive(Debug)]
pub(crate) struct Task {
    pub(crate) job: Arc<Job>,
    pub(crate) info: ChunkInfo,
    /// The chunk's [`ChunkBody`] (the id goes in front when sent).
    payload: Arc<Vec<u8>>,
    fds: Arc<Vec<OwnedFd>>,
    /// The encoded outcomes of the chunk's first items, when this task is
    /// the rest of a chunk whose worker ended on a panic (`panic =
    /// "abort"`): they go in front of this task's outcomes.
    prefix: Option<Vec<u8>>,
    /// How often a dead worker gave this task back unstarted.
    requeued: u8,
}

/// A task given back this many times by dying workers fails instead (a
/// bound on loops, should a worker's death be misread as "not started").
const MAX_REQUEUES: u8 = 3;

/// Workers killed before they were ready, in a row, after which the pool
/// gives up (their start or initializer kills them).
const MAX_EARLY_DEATHS: u32 = 3;

impl Task {
    pub(crate) fn new(job: Arc<Job>, info: ChunkInfo, payload: Vec<u8>, fds: Vec<OwnedFd>) -> Task {
        Task {
            job,
            info,
            payload: Arc::new(payload),
            fds: Arc::new(fds),
            prefix: None,
            requeued: 0,
        }
    }

    /// How many items the payload holds (the chunk's, or its rest's).
    fn items(&self) -> usize {
        ChunkBody::items(&self.payload)
    }
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    task: Task,
}

/// The sending side of one worker.
#[derive(Debug)]
struct Conn {
    pid: u32,
    tx: Tx,
}

/// How chunks reach a worker: the two transports.
#[derive(Debug)]
// One per worker, behind its `Arc<Conn>`: the size does not matter.
#[cfg_attr(feature = "mpi", allow(clippy::large_enum_variant))]
enum Tx {
    /// A local worker process's socket.
    Socket(Mutex<Channel>),
    /// A worker on another host.
    #[cfg(feature = "mpi")]
    Remote(Arc<dyn RemoteWorker>),
}

/// What runs a worker's chunks: a local child, or a worker on another
/// host.
#[derive(Debug)]
enum Proc {
    Child(ChildProc),
    #[cfg(feature = "mpi")]
    Remote(Arc<dyn RemoteWorker>),
}

/// A worker on another host, as the engine sees it. The transport that
/// reaches it implements this (`super::ranks`: a session on a serving MPI
/// rank), so the engine knows no transport but its own sockets. Its
/// answers come back through [`Core::on_frame`] (then
/// [`Core::retire_if_done`] and [`Core::dispatch`]).
#[cfg(feature = "mpi")]
pub(crate) trait RemoteWorker: std::marker::Send + Sync + std::fmt::Debug {
    /// The place it runs on (a serving rank), one worker of a pool each.
    fn place(&self) -> i32;
    /// Sends its start (an encoded [`WorkerInit`]), answered `Ready` or
    /// `InitFailed`.
    fn start(&self, init: &[u8]) -> Result<()>;
    /// Sends a frame of the pool protocol, in parts; it is answered.
    fn send(&self, tag: u32, parts: &[&[u8]]) -> Result<()>;
    /// Sends chunk `id` (`ToWorker::Task`), whose body the transport may
    /// keep (and send without a copy) until it is sent; it is answered.
    fn send_task(&self, id: u64, body: &Arc<Vec<u8>>) -> Result<()>;
    /// Ends it: its late answers are dropped. Later calls do nothing.
    fn stop(&self);
    /// Runs chunk `id` (`body`) alone: sends it and waits for its answer
    /// on the calling thread, which makes the transport's calls itself
    /// meanwhile (delivering other answers that arrive to their workers)
    /// and gives the answer's frame (tag, bytes) to `answer`, with no
    /// queue, dispatch or job between (see [`Core::run_alone`]).
    fn run_alone(&self, id: u64, body: &[u8], answer: &mut dyn FnMut(u32, &[u8])) -> Alone;
}

/// How [`RemoteWorker::run_alone`] ended.
#[cfg(feature = "mpi")]
#[derive(Debug)]
pub(crate) enum Alone {
    /// The answer came and went to the caller's closure.
    Answered,
    /// Not sent (the transport is busy with another thread's calls, or
    /// the chunk needs more than one message): the caller takes the
    /// normal path.
    NotSent,
    /// The task cannot be answered: the worker was stopped, or the
    /// transport is ending.
    Failed(Error),
}

/// A task's answer on the one-task path ([`Core::run_alone`]).
#[cfg(feature = "mpi")]
#[derive(Debug)]
pub(crate) enum AloneOutcome<'a> {
    /// The chunk's encoded outcomes, from the worker `pid`.
    Outcomes { bytes: &'a [u8], pid: u32 },
    /// The chunk failed as a whole.
    Failed(Error),
}

/// Where a pool's remote workers are opened (the serving ranks of an MPI
/// job).
#[cfg(feature = "mpi")]
pub(crate) trait RemoteHosts: std::marker::Send + Sync + std::fmt::Debug {
    /// The places, each of which runs one worker of a pool.
    fn places(&self) -> &[crate::child::ranks::RankInfo];
    /// What a thread waiting for these workers' answers drives itself.
    fn driver(&self) -> Option<&'static dyn super::job::Drive>;
    /// Opens a worker on `place`, answering worker `key` of `core`.
    fn open(
        &self,
        place: &crate::child::ranks::RankInfo,
        core: std::sync::Weak<Core>,
        key: u64,
    ) -> Arc<dyn RemoteWorker>;
}

impl Proc {
    /// Waits for the worker to end; a rank's session is closed and ends
    /// at once (`Some(0)`).
    fn wait(&self, timeout: Option<Duration>) -> Result<Option<i32>> {
        match self {
            Proc::Child(child) => child.wait(timeout),
            #[cfg(feature = "mpi")]
            Proc::Remote(remote) => {
                remote.stop();
                Ok(Some(0))
            }
        }
    }

    /// Signals a child; closes a rank's session (a rank is never signalled).
    fn signal(&self, signal: Signal) -> Result<()> {
        match self {
            Proc::Child(child) => child.signal(signal),
            #[cfg(feature = "mpi")]
            Proc::Remote(remote) => {
                remote.stop();
                Ok(())
            }
        }
    }
}

/// Where a pool's workers are.
#[derive(Debug)]
pub(crate) enum Transport {
    /// Child processes of this one.
    Local,
    /// Workers on other hosts (the serving ranks of the MPI job this
    /// process is rank 0 of).
    #[cfg(feature = "mpi")]
    Remote(Box<dyn RemoteHosts>),
}

#[derive(Debug)]
struct Worker {
    key: u64,
    conn: Arc<Conn>,
    child: Proc,
    in_flight: Vec<InFlight>,
    sent: u64,
    /// Chunks it may hold at once ([`SLOTS`] per process that runs them);
    /// more for `map`s when it runs long tasks (see [`LONG_TASK`]).
    slots: usize,
    /// Since when it is known busy: its last results were read then, or
    /// it got a chunk while it held none. `None`: it may be idle.
    busy_from: Option<Instant>,
    /// How long its tasks take, learned from its results (local workers),
    /// and the job they belong to: the estimate holds for that job only.
    task_time: Option<Duration>,
    timed: std::sync::Weak<Job>,
    ready: bool,
    /// Tasks it runs on the one-task path ([`Core::run_alone`]), not in
    /// `in_flight`: they count as held chunks.
    alone: usize,
    /// Shared-memory arenas for large payloads (`None`: socket only).
    input: Option<InArena>,
    output: Option<Arc<OutArena>>,
}

impl Worker {
    /// Whether it takes one more chunk now, `task`, the first of `queued`
    /// for `workers` workers.
    fn accepts(&self, max_tasks: Option<u64>, task: &Task, queued: usize, workers: usize) -> bool {
        if max_tasks.is_some_and(|m| self.sent >= m) {
            return false;
        }
        let n = self.in_flight.len() + self.alone;
        if n < self.slots {
            return true;
        }
        // Deep: chunks of the `map` it was timed on only (an `apply` or
        // an `imap` does not wait behind them), and no more extra ones
        // than its share of the queue: the window shrinks with the queue
        // (guided scheduling), so the workers still finish together.
        n < window(self.slots, self.task_time)
            && n - self.slots < queued / workers.max(1)
            && self.timed_on(&task.job)
            && self.in_flight.iter().all(|f| self.timed_on(&f.task.job))
    }

    /// Whether its task time was learned on `job`, a `map`'s.
    fn timed_on(&self, job: &Arc<Job>) -> bool {
        job.batched && std::ptr::eq(self.timed.as_ptr(), Arc::as_ptr(job))
    }

    /// Until when the reader may leave its results unread (see
    /// [`defer_until`]).
    fn defer_until(&self, refill: bool) -> Option<Instant> {
        let (from, task_time) = (self.busy_from?, self.task_time?);
        if !self.in_flight.iter().all(|f| self.timed_on(&f.task.job)) {
            return None;
        }
        defer_until(from, task_time, self.in_flight.len(), refill)
    }

    /// `k` of its results were read at `now` (`deferred`: after the
    /// reader had let them wait): what they say of its task time, and
    /// since when it is busy.
    fn note_results(&mut self, k: usize, now: Instant, deferred: bool) {
        match self.in_flight.first() {
            // It ran out of work: idle for an unknown time, so no sample;
            // and if its results were left waiting, the estimate was too
            // long (it idled): learn again.
            None => {
                if deferred {
                    self.task_time = None;
                }
                self.busy_from = None;
                return;
            }
            // The chunk it runs now is of another job: learn that one's.
            Some(f) if !std::ptr::eq(self.timed.as_ptr(), Arc::as_ptr(&f.task.job)) => {
                self.timed = Arc::downgrade(&f.task.job);
                self.task_time = None;
            }
            Some(_) => {
                if let (Some(from), Ok(k)) = (self.busy_from, u32::try_from(k)) {
                    // It still holds a chunk, so it ran `k` chunks and part
                    // of one since `from`: a slight overestimate.
                    let sample = now.saturating_duration_since(from) / k.max(1);
                    self.task_time = Some(learn(self.task_time, sample));
                }
            }
        }
        self.busy_from = Some(now);
    }
}

#[derive(Debug)]
pub(crate) enum Phase {
    Running,
    /// `close()`: no new work; workers finish what is queued.
    Closed,
    /// `join()` saw the work done, or `terminate()`: the reader stops.
    Stopping,
}

#[derive(Debug)]
struct State {
    workers: Vec<Worker>,
    queue: VecDeque<Task>,
    next_id: u64,
    next_key: u64,
    phase: Phase,
    /// The pool cannot serve anymore (an initializer failed, a worker could not be replaced).
    broken: Option<Error>,
    /// Worker channels started by someone else than the reader, for it to adopt.
    adopt: Vec<(u64, Channel)>,
    /// Workers killed before they were ready, since one last was.
    early_deaths: u32,
    /// Replacements that could not be started yet (no descriptors, no
    /// memory...), and why: the reader tries again every
    /// [`RETRY_SPAWN`].
    missing: usize,
    spawn_error: Option<Error>,
}

/// How often the reader tries again to start a replacement the OS refused.
const RETRY_SPAWN: Duration = Duration::from_millis(100);

/// Configuration a worker is started with.
#[derive(Debug)]
pub(crate) struct Config {
    /// Processes that run tasks (a serving rank may run several).
    pub(crate) processes: usize,
    /// Workers of the engine: processes locally, serving ranks on MPI.
    pub(crate) workers: usize,
    pub(crate) init: WorkerInit,
    pub(crate) init_fds: Vec<OwnedFd>,
    pub(crate) transport: Transport,
    /// How workers start: fixed when the pool is built.
    pub(crate) start_method: crate::StartMethod,
}

/// Everything the pool's threads share.
#[derive(Debug)]
pub(crate) struct Core {
    /// This core, for the transports that call back into it.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    me: std::sync::Weak<Core>,
    state: Mutex<State>,
    /// Signalled when a worker becomes ready, work drains, or the pool breaks.
    changed: Changed,
    config: Config,
    init_bytes: Vec<u8>,
    wake_tx: UnixStream,
    /// Whether the reader may leave deep workers' results waiting (see
    /// [`defer_until`]): only while every worker can have a core. Workers
    /// that share cores run by turns, their speed swings by more than the
    /// margin, and one left without work loses its turn (measured: 200
    /// tasks of 8 ms took 1.4x as long with 4 workers on 2 cores).
    defer: bool,
}

/// A condition variable that skips the wake-up system call when no
/// thread waits: the reader signals it at every result, and a thread waits
/// on it only in [`Core::wait_ready`] and [`Core::wait_idle`]. Every
/// change a waiter looks for is made under the state lock, and a waiter
/// counts itself under that lock before it sleeps, so a signaller that
/// sees no waiter after its change has nobody to wake.
#[derive(Debug, Default)]
struct Changed {
    cond: Condvar,
    waiters: AtomicUsize,
}

impl Changed {
    fn notify_all(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.cond.notify_all();
        }
    }

    fn wait<'a, T>(
        &self,
        guard: std::sync::MutexGuard<'a, T>,
    ) -> std::sync::LockResult<std::sync::MutexGuard<'a, T>> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let woken = self.cond.wait(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        woken
    }
}

/// The reader thread's end of the wake-up socket.
pub(crate) struct Waker(UnixStream);

impl Core {
    pub(crate) fn new(config: Config) -> Result<(Arc<Core>, Waker)> {
        let init_bytes = codec::encode_plain(&config.init)?;
        let (wake_tx, wake_rx) =
            UnixStream::pair().map_err(|e| Error::io("could not create a socket pair", e))?;
        wake_rx
            .set_nonblocking(true)
            .and_then(|()| wake_tx.set_nonblocking(true))
            .map_err(|e| Error::io("fcntl", e))?;
        let core = Arc::new_cyclic(|me| Core {
            me: me.clone(),
            state: Mutex::new(State {
                workers: Vec::new(),
                queue: VecDeque::new(),
                next_id: 0,
                next_key: 0,
                phase: Phase::Running,
                broken: None,
                adopt: Vec::new(),
                early_deaths: 0,
                missing: 0,
                spawn_error: None,
            }),
            changed: Changed::default(),
            defer: matches!(config.transport, Transport::Local)
                && std::thread::available_parallelism()
                    .is_ok_and(|cores| config.processes <= cores.get()),
            config,
            init_bytes,
            wake_tx,
        });
        Ok((core, Waker(wake_rx)))
    }

    /// Starts a pool's core, its reader thread and its `workers` workers.
    /// On failure, the workers already started are stopped.
    pub(crate) fn start(
        config: Config,
        workers: usize,
    ) -> Result<(Arc<Core>, std::thread::JoinHandle<()>)> {
        let (core, waker) = Core::new(config)?;
        let reader = {
            let core = Arc::clone(&core);
            std::thread::Builder::new()
                .name("multiproc-pool".into())
                .spawn(move || core.read_loop(waker))
                .map_err(|e| Error::io("could not start the pool's thread", e))?
        };
        for _ in 0..workers {
            if let Err(err) = core.start_worker() {
                core.terminate(Some(reader));
                return Err(err);
            }
        }
        Ok((core, reader))
    }

    pub(crate) fn processes(&self) -> usize {
        self.config.processes
    }

    /// What a thread waiting for this pool's results drives itself.
    fn driver(&self) -> Option<&'static dyn super::job::Drive> {
        match &self.config.transport {
            Transport::Local => None,
            #[cfg(feature = "mpi")]
            Transport::Remote(hosts) => hosts.driver(),
        }
    }

    /// Where the chunks go (handles go only to this host).
    pub(crate) fn peer(&self) -> codec::Peer {
        match self.config.transport {
            Transport::Local => codec::Peer::ThisHost,
            #[cfg(feature = "mpi")]
            Transport::Remote(_) => codec::Peer::MpiRank,
        }
    }

    fn wake(&self) {
        let _ = (&self.wake_tx).write(&[1]);
    }

    /// Starts one worker and registers it; the reader adopts its channel.
    pub(crate) fn start_worker(&self) -> Result<()> {
        let (key, channel) = self.spawn_worker()?;
        if let Some(channel) = channel {
            lock(&self.state).adopt.push((key, channel));
            self.wake();
        }
        Ok(())
    }

    /// Starts one worker: a child and its channel, for the reader to
    /// adopt, or a session on a serving rank (no channel).
    fn spawn_worker(&self) -> Result<(u64, Option<Channel>)> {
        #[cfg(feature = "mpi")]
        if let Transport::Remote(hosts) = &self.config.transport {
            return self.start_remote(hosts.as_ref()).map(|key| (key, None));
        }
        let name = format!(
            "PoolWorker-{}",
            WORKER_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let (child, channel) = child::start_child_by(
            Some(self.config.start_method),
            worker::ENTRY,
            &name,
            Mode::Internal,
            &self.init_bytes,
            &self.config.init_fds,
        )?;
        let mut channel = channel;
        // Results are as large as the user's data, but a header that
        // announces more than any result can be is refused unread.
        channel.set_max_frame(POOL_MAX_FRAME);
        channel.set_strict();
        let tx = Channel::new(
            channel
                .fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io("dup", e))?,
        );
        worker::enlarge_send_buffer(tx.fd());
        let (input, output) = Core::send_arenas(&tx);
        let conn = Arc::new(Conn {
            pid: child.pid(),
            tx: Tx::Socket(Mutex::new(tx)),
        });
        let mut st = lock(&self.state);
        if matches!(st.phase, Phase::Stopping) {
            // Dropping the child kills and reaps it.
            return Err(Error::Closed);
        }
        let key = st.next_key;
        st.next_key += 1;
        st.workers.push(Worker {
            key,
            conn,
            child: Proc::Child(child),
            in_flight: Vec::new(),
            sent: 0,
            slots: SLOTS,
            busy_from: None,
            task_time: None,
            timed: std::sync::Weak::new(),
            ready: false,
            alone: 0,
            input,
            output,
        });
        Ok((key, Some(channel)))
    }

    /// Opens a worker on the first place no worker of this pool uses,
    /// and sends it the start; the worker's key.
    #[cfg(feature = "mpi")]
    fn start_remote(&self, hosts: &dyn RemoteHosts) -> Result<u64> {
        let proc = {
            let mut st = lock(&self.state);
            if matches!(st.phase, Phase::Stopping) {
                return Err(Error::Closed);
            }
            let used = |place: i32| {
                st.workers
                    .iter()
                    .any(|w| matches!(&w.child, Proc::Remote(p) if p.place() == place))
            };
            let info = hosts
                .places()
                .iter()
                .find(|info| !used(info.rank))
                .copied()
                .ok_or_else(|| {
                    Error::invalid("every serving MPI rank already runs a worker of this pool")
                })?;
            let key = st.next_key;
            st.next_key += 1;
            let remote = hosts.open(&info, self.me.clone(), key);
            st.workers.push(Worker {
                key,
                conn: Arc::new(Conn {
                    pid: info.pid,
                    tx: Tx::Remote(Arc::clone(&remote)),
                }),
                child: Proc::Remote(Arc::clone(&remote)),
                in_flight: Vec::new(),
                sent: 0,
                slots: SLOTS * info.workers as usize,
                busy_from: None,
                task_time: None,
                timed: std::sync::Weak::new(),
                ready: false,
                alone: 0,
                input: None,
                output: None,
            });
            (key, remote)
        };
        // After the worker is in the state: its answer may come at once.
        proc.1.start(&self.init_bytes)?;
        Ok(proc.0)
    }

    /// A serving rank's worker that reached its task limit
    /// (`max_tasks_per_child`) with nothing in flight ends like a worker
    /// that exits, and a fresh session replaces it.
    #[cfg(feature = "mpi")]
    pub(crate) fn retire_if_done(&self, key: u64) {
        let Some(max) = self.config.init.max_tasks else {
            return;
        };
        let done = {
            let st = lock(&self.state);
            st.workers
                .iter()
                .any(|w| w.key == key && w.in_flight.is_empty() && w.sent >= max)
        };
        if done {
            let _ = self.on_death(key);
        }
    }

    /// Creates a worker's arenas and sends them as its first frame. Any
    /// failure leaves that worker on the socket-only path.
    fn send_arenas(tx: &Channel) -> (Option<InArena>, Option<Arc<OutArena>>) {
        let (Ok(input), Ok(output)) = (InArena::create(), OutArena::create()) else {
            return (None, None);
        };
        let fds: std::io::Result<Vec<OwnedFd>> = [input.mapping().fd(), output.mapping().fd()]
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect();
        match fds.map(|fds| ToWorker::Arenas.send(tx, &fds)) {
            Ok(Ok(())) => (Some(input), Some(Arc::new(output))),
            _ => (None, None),
        }
    }

    /// Waits until every worker ran its initializer; the error of one
    /// that failed otherwise.
    pub(crate) fn wait_ready(&self) -> Result<()> {
        let mut st = lock(&self.state);
        loop {
            if let Some(err) = &st.broken {
                return Err(err.clone());
            }
            // Every worker, replacements of those that died starting included.
            if st.workers.len() >= self.config.workers && st.workers.iter().all(|w| w.ready) {
                return Ok(());
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The error a new submission gets, if the pool cannot take one.
    fn refuse(st: &State) -> Option<Error> {
        if let Some(err) = &st.broken {
            return Some(err.clone());
        }
        if st.workers.is_empty() && st.missing > 0 {
            // No worker could be started again yet: fail now, not hang.
            if let Some(err) = &st.spawn_error {
                return Some(err.clone());
            }
        }
        match st.phase {
            Phase::Running => None,
            Phase::Closed | Phase::Stopping => Some(Error::Closed),
        }
    }

    /// Fails at once if the pool takes no new work.
    pub(crate) fn check_open(&self) -> Result<()> {
        match Core::refuse(&lock(&self.state)) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Queues encoded chunks and dispatches what the workers can take.
    pub(crate) fn submit(&self, tasks: impl IntoIterator<Item = Task>) -> Result<()> {
        {
            let mut st = lock(&self.state);
            if let Some(err) = Core::refuse(&st) {
                return Err(err);
            }
            let driver = self.driver();
            for task in tasks {
                let mut job = lock(&task.job.state);
                job.submitted += 1;
                job.driver = job.driver.or(driver);
                drop(job);
                st.queue.push_back(task);
            }
        }
        self.dispatch();
        Ok(())
    }

    /// Whether [`run_alone`](Core::run_alone) may take a task: the
    /// workers are remote, and their transport answers on the calling
    /// thread.
    #[cfg(feature = "mpi")]
    pub(crate) fn runs_alone(&self) -> bool {
        matches!(&self.config.transport, Transport::Remote(hosts) if hosts.driver().is_some())
    }

    /// The one-task path of a synchronous `apply`: chunk `payload` goes to
    /// a remote worker that holds nothing, sent and answered on the
    /// calling thread ([`RemoteWorker::run_alone`]), without the queue,
    /// the dispatch, a job or a hand-off between threads; its outcome goes
    /// to `take`. `false` (and `take` is not called) when the pool takes
    /// no work now, has queued work (which goes first), renews its workers
    /// after a number of tasks, or no ready worker is free: the caller
    /// then submits the chunk as usual, and gets the same error, result or
    /// failure it would have got.
    #[cfg(feature = "mpi")]
    pub(crate) fn run_alone(&self, payload: &[u8], take: &mut dyn FnMut(AloneOutcome<'_>)) -> bool {
        if self.config.init.max_tasks.is_some() {
            return false;
        }
        let (remote, key, pid, id) = {
            let mut st = lock(&self.state);
            if Core::refuse(&st).is_some() || !st.queue.is_empty() {
                return false;
            }
            let id = st.next_id;
            let Some(w) = st
                .workers
                .iter_mut()
                .find(|w| w.ready && w.alone == 0 && w.in_flight.is_empty())
            else {
                return false;
            };
            let Tx::Remote(remote) = &w.conn.tx else {
                return false;
            };
            let remote = Arc::clone(remote);
            w.alone += 1;
            w.sent += 1;
            let (key, pid) = (w.key, w.conn.pid);
            st.next_id += 1;
            (remote, key, pid, id)
        };
        /// Gives the worker back, also if the caller's decoding of the
        /// answer panics (a worker left counted busy would hold `join`).
        struct Release<'a> {
            core: &'a Core,
            key: u64,
            sent: bool,
        }
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let queued = {
                    let mut st = lock(&self.core.state);
                    if let Some(w) = st.workers.iter_mut().find(|w| w.key == self.key) {
                        w.alone -= 1;
                        if !self.sent {
                            w.sent -= 1;
                        }
                    }
                    !st.queue.is_empty()
                };
                // `wait_idle` counts it; chunks queued meanwhile may go to
                // it now.
                self.core.changed.notify_all();
                if queued {
                    self.core.dispatch();
                }
            }
        }
        let mut release = Release {
            core: self,
            key,
            sent: true,
        };
        let ran = remote.run_alone(id, payload, &mut |tag, bytes| {
            take(Core::alone_outcome(tag, bytes, pid));
        });
        release.sent = !matches!(ran, Alone::NotSent);
        drop(release);
        match ran {
            Alone::Answered => true,
            Alone::NotSent => false,
            Alone::Failed(err) => {
                take(AloneOutcome::Failed(err));
                true
            }
        }
    }

    /// What a task's answer on the one-task path says, as
    /// [`on_frame`](Core::on_frame) reads it for a job.
    #[cfg(feature = "mpi")]
    fn alone_outcome(tag: u32, bytes: &[u8], pid: u32) -> AloneOutcome<'_> {
        match FromWorker::parse(tag, bytes) {
            Ok(FromWorker::Result { outcomes, .. }) => AloneOutcome::Outcomes {
                bytes: outcomes,
                pid,
            },
            Ok(FromWorker::TaskFailed { failure, .. }) => {
                AloneOutcome::Failed(failure.into_error(pid, None))
            }
            Err(Malformed { error, .. }) => AloneOutcome::Failed(error),
            // A remote worker answers a task with one of the two above.
            Ok(_) => AloneOutcome::Failed(Error::Decode {
                message: "a pool result frame is malformed".into(),
            }),
        }
    }

    /// Assigns queued chunks to workers with a free slot and sends them.
    pub(crate) fn dispatch(&self) {
        let mut sends: Vec<Send> = Vec::new();
        {
            let mut st = lock(&self.state);
            let st = &mut *st;
            let max_tasks = self.config.init.max_tasks;
            let workers = st.workers.len();
            while let Some(front) = st.queue.front() {
                let queued = st.queue.len();
                // The least loaded worker that can take one more chunk.
                let Some(w) = st
                    .workers
                    .iter_mut()
                    .filter(|w| w.accepts(max_tasks, front, queued, workers))
                    .min_by_key(|w| w.in_flight.len())
                else {
                    break;
                };
                let Some(task) = st.queue.pop_front() else {
                    break;
                };
                if lock(&task.job.state).cancelled {
                    task.job.complete(task.info, Outcome::Failed(Error::Closed));
                    continue;
                }
                let size = task.payload.len() as u64 + 8;
                if size > POOL_MAX_FRAME {
                    let err = Error::MessageTooLarge {
                        size,
                        limit: POOL_MAX_FRAME,
                    };
                    task.job.complete(task.info, Outcome::Failed(err));
                    continue;
                }
                let id = st.next_id;
                st.next_id += 1;
                w.sent += 1;
                if w.in_flight.is_empty() {
                    w.busy_from = Some(Instant::now());
                    // Its first result times this job's tasks.
                    if !std::ptr::eq(w.timed.as_ptr(), Arc::as_ptr(&task.job)) {
                        w.timed = Arc::downgrade(&task.job);
                        w.task_time = None;
                    }
                }
                let placed = match &mut w.input {
                    Some(arena) if task.fds.is_empty() && task.payload.len() >= SHM_MIN => {
                        arena.place(id, task.payload.len())
                    }
                    _ => None,
                };
                sends.push(Send {
                    conn: Arc::clone(&w.conn),
                    key: w.key,
                    id,
                    payload: Arc::clone(&task.payload),
                    fds: Arc::clone(&task.fds),
                    placed,
                });
                w.in_flight.push(InFlight { id, task });
            }
        }
        // Each worker's chunks stay in the order they were assigned (it
        // runs them in that order); a run of plain ones to one worker goes
        // out in one system call.
        sends.sort_by_key(|s| s.key);
        let mut rest = &mut sends[..];
        while let Some((first, tail)) = rest.split_first_mut() {
            let run = 1 + tail
                .iter()
                .take_while(|s| s.key == first.key && s.is_plain())
                .count();
            // Without the `mpi` feature, a plain chunk's transport is the only one.
            #[cfg_attr(not(feature = "mpi"), allow(irrefutable_let_patterns))]
            if let (true, Tx::Socket(tx)) = (run >= 2 && first.is_plain(), &first.conn.tx) {
                let tasks: Vec<([u8; 8], &[u8])> = std::iter::once(&*first)
                    .chain(&tail[..run - 1])
                    .map(|s| (s.id.to_le_bytes(), &s.payload[..]))
                    .collect();
                // A failed send means the worker died (see `send`).
                let _ = ToWorker::send_tasks(&lock(tx), &tasks);
                rest = &mut tail[run - 1..];
                continue;
            }
            self.send(first);
            rest = tail;
        }
    }

    /// Sends one chunk to its worker.
    fn send(&self, send: &mut Send) {
        let Send {
            conn,
            key,
            id,
            payload,
            fds,
            placed,
        } = send;
        let (key, id) = (*key, *id);
        // Without the `mpi` feature there is one transport.
        #[cfg_attr(not(feature = "mpi"), allow(clippy::infallible_destructuring_match))]
        let tx = match &conn.tx {
            Tx::Socket(tx) => tx,
            #[cfg(feature = "mpi")]
            Tx::Remote(remote) => {
                // Nothing sees a remote send fail later: fail it now.
                if let Err(err) = remote.send_task(id, payload) {
                    self.fail_chunk(key, id, err);
                }
                return;
            }
        };
        // A failed send means the worker died: the reader sees its end
        // of stream and fails this chunk with the worker's exit status.
        if let Some(placement) = placed.take() {
            // The region is this chunk's alone until its result arrives.
            let start = placement.start();
            if placement.fill(payload).is_ok() {
                let task = ToWorker::TaskShm {
                    id,
                    start: start as u64,
                    len: payload.len() as u64,
                };
                let _ = task.send(&lock(tx), &[]);
                return;
            }
        }
        let _ = key; // the remote transport's
        let task = ToWorker::Task { id, body: payload };
        let _ = task.send(&lock(tx), fds);
    }

    /// `close()`: no new work; queued work still runs.
    pub(crate) fn close(&self) {
        let mut st = lock(&self.state);
        if matches!(st.phase, Phase::Running) {
            st.phase = Phase::Closed;
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        !matches!(lock(&self.state).phase, Phase::Running)
    }

    /// Waits until nothing is queued or in flight.
    pub(crate) fn wait_idle(&self) {
        let mut st = lock(&self.state);
        while !(st.queue.is_empty()
            && st
                .workers
                .iter()
                .all(|w| w.in_flight.is_empty() && w.alone == 0))
        {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops the reader and fails what is queued or in flight with
    /// [`Error::Closed`]. Returns the workers, still to be stopped.
    fn stop(&self) -> Vec<Worker> {
        let (workers, failed) = {
            let mut st = lock(&self.state);
            st.phase = Phase::Stopping;
            let mut failed: Vec<(Arc<Job>, ChunkInfo)> =
                st.queue.drain(..).map(|t| (t.job, t.info)).collect();
            let workers: Vec<Worker> = st.workers.drain(..).collect();
            for w in &workers {
                failed.extend(
                    w.in_flight
                        .iter()
                        .map(|f| (Arc::clone(&f.task.job), f.task.info)),
                );
            }
            st.adopt.clear();
            (workers, failed)
        };
        for (job, info) in failed {
            job.complete(info, Outcome::Failed(Error::Closed));
        }
        self.changed.notify_all();
        self.wake();
        workers
    }

    /// `join()` after `close()`: waits for the work, then for the workers to exit.
    pub(crate) fn shutdown_gracefully(&self, reader: Option<std::thread::JoinHandle<()>>) {
        self.wait_idle();
        let workers = self.stop();
        if let Some(reader) = reader {
            let _ = reader.join();
        }
        // The reader dropped its ends; dropping ours closes each socket,
        // and an idle worker exits when its socket closes.
        for w in workers {
            drop(w.conn);
            let _ = w.child.wait(Some(Duration::from_secs(5)));
            // ChildProc's drop kills and reaps one that did not exit.
        }
    }

    /// `terminate()` / drop: SIGTERM, a short grace, SIGKILL; every worker reaped.
    pub(crate) fn terminate(&self, reader: Option<std::thread::JoinHandle<()>>) {
        let workers = self.stop();
        for w in &workers {
            let _ = w.child.signal(Signal::SIGTERM);
        }
        if let Some(reader) = reader {
            let _ = reader.join();
        }
        let grace = Instant::now() + Duration::from_millis(500);
        for w in workers {
            let left = grace.saturating_duration_since(Instant::now());
            if !matches!(w.child.wait(Some(left)), Ok(Some(_))) {
                let _ = w.child.signal(Signal::SIGKILL);
                let _ = w.child.wait(Some(Duration::from_secs(10)));
            }
        }
    }

    /// Takes every chunk of `job` off the queue and fails it with
    /// [`Error::Cancelled`], if none of them was sent to a worker and none
    /// has an outcome; otherwise changes nothing and returns `false`.
    pub(crate) fn cancel_unstarted(&self, job: &Arc<Job>) -> bool {
        let mine: Vec<Task> = {
            let mut st = lock(&self.state);
            // Dispatch takes chunks off the queue under this lock, so no
            // chunk of the job can be sent while this looks.
            // In flight, or the rest of a chunk that ran in part (a
            // worker ended on a panic under `panic = "abort"`).
            let sent = st
                .workers
                .iter()
                .any(|w| w.in_flight.iter().any(|f| Arc::ptr_eq(&f.task.job, job)))
                || st
                    .queue
                    .iter()
                    .any(|t| t.prefix.is_some() && Arc::ptr_eq(&t.job, job));
            if sent || lock(&job.state).done > 0 {
                return false;
            }
            let (mine, rest): (VecDeque<Task>, VecDeque<Task>) =
                st.queue.drain(..).partition(|t| Arc::ptr_eq(&t.job, job));
            st.queue = rest;
            mine.into()
        };
        if mine.is_empty() {
            // Nothing queued and nothing done: a job of no chunks, which
            // is finished already.
            return false;
        }
        for task in mine {
            task.job
                .complete(task.info, Outcome::Failed(Error::Cancelled));
        }
        true
    }

    /// The pids of the current workers.
    pub(crate) fn pids(&self) -> Vec<u32> {
        lock(&self.state)
            .workers
            .iter()
            .map(|w| w.conn.pid)
            .collect()
    }

    /// Marks the pool broken and fails everything queued or in flight.
    fn break_pool(&self, err: Error) {
        let failed: Vec<(Arc<Job>, ChunkInfo)> = {
            let mut st = lock(&self.state);
            if st.broken.is_none() {
                log::error!("multiproc pool: the pool is broken: {err}");
                st.broken = Some(err.clone());
            }
            let mut failed: Vec<_> = st.queue.drain(..).map(|t| (t.job, t.info)).collect();
            for w in &mut st.workers {
                failed.extend(w.in_flight.drain(..).map(|f| (f.task.job, f.task.info)));
            }
            failed
        };
        for (job, info) in failed {
            job.complete(info, Outcome::Failed(err.clone()));
        }
        self.changed.notify_all();
    }

    /// One frame from worker `key`.
    pub(crate) fn on_frame(&self, key: u64, frame: Frame) {
        let Frame { tag, bytes, fds } = frame;
        let answer = match FromWorker::parse(tag, &bytes) {
            Ok(FromWorker::Ready) => {
                let mut st = lock(&self.state);
                st.early_deaths = 0;
                if let Some(w) = st.workers.iter_mut().find(|w| w.key == key) {
                    w.ready = true;
                }
                drop(st);
                self.changed.notify_all();
                return;
            }
            Ok(FromWorker::InitFailed(failure)) => {
                let message = failure.describe();
                return self.break_pool(Error::InitializerFailed { message });
            }
            // The worker could not start at all (another executable...).
            Ok(FromWorker::Refused(err)) => {
                let message = err.to_string();
                return self.break_pool(Error::InitializerFailed { message });
            }
            Ok(FromWorker::Aborted(report)) => return self.on_aborted(key, &report),
            Ok(FromWorker::Result { id, .. }) => (id, Answer::Outcomes),
            Ok(FromWorker::ResultShm { id, start, len }) => {
                (id, Answer::Shared(self.lease(key, start, len)))
            }
            Ok(FromWorker::TaskFailed { id, failure }) => (id, Answer::Failed(failure)),
            // A frame that names its chunk fails it; one that names none
            // is dropped.
            Err(Malformed {
                id: Some(id),
                error,
            }) => return self.fail_chunk(key, id, error),
            Err(Malformed { id: None, .. }) => return,
        };
        self.on_result(key, answer, bytes, fds);
    }

    /// Takes charge of the result region `start..start + len` that worker
    /// `key` announced (also when its chunk is unknown, so that the
    /// arena's consumed counter moves on).
    fn lease(&self, key: u64, start: u64, len: u64) -> Result<Lease> {
        let output = lock(&self.state)
            .workers
            .iter()
            .find(|w| w.key == key)
            .and_then(|w| w.output.clone());
        match output {
            Some(arena) => arena.lease(start, len),
            None => Err(Error::Decode {
                message: "a pool result frame is malformed".into(),
            }),
        }
    }

    /// Takes chunk `id` off worker `key` (freeing its input region): the
    /// task and the worker's pid.
    fn take_in_flight(st: &mut State, key: u64, id: u64) -> Option<(Task, u32)> {
        let w = st.workers.iter_mut().find(|w| w.key == key)?;
        if let Some(arena) = &mut w.input {
            arena.free(id);
        }
        let at = w.in_flight.iter().position(|f| f.id == id)?;
        Some((w.in_flight.remove(at).task, w.conn.pid))
    }

    /// Chunk `id` of worker `key` came back: its outcomes in `bytes`
    /// (from [`RESULT_AT`]) with `fds`, in the output arena, or failed.
    fn on_result(&self, key: u64, (id, answer): (u64, Answer), bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        let Some((task, pid)) = Core::take_in_flight(&mut lock(&self.state), key, id) else {
            return;
        };
        let outcome = match answer {
            Answer::Outcomes => Outcome::Done {
                bytes,
                fds,
                offset: RESULT_AT,
                pid,
            },
            Answer::Shared(Ok(lease)) => Outcome::Shared { lease, pid },
            Answer::Shared(Err(err)) => Outcome::Failed(err),
            Answer::Failed(failure) => Outcome::Failed(failure.into_error(pid, None)),
        };
        task.job
            .complete(task.info, with_prefix(task.prefix, outcome));
        self.changed.notify_all();
    }

    /// Under `panic = "abort"`, worker `key` reported the panic that is
    /// ending it: item `done` of chunk `id` panicked, the items before it
    /// gave `partial`. Those outcomes are kept, and the items after it go
    /// back to the queue as the rest of the chunk.
    fn on_aborted(&self, key: u64, report: &AbortReport<'_>) {
        let Some((task, pid)) = Core::take_in_flight(&mut lock(&self.state), key, report.id) else {
            return;
        };
        let items = task.items();
        let mut prefix = task.prefix.unwrap_or_default();
        let failed_at = report.done as usize;
        let record: Option<PanicRecord> = codec::decode_plain(report.record).ok();
        let (Some(record), true) = (record, failed_at < items) else {
            // Not where a panic can be: fail the chunk as a death would.
            task.job.complete(
                task.info,
                Outcome::Failed(Error::WorkerDied {
                    pid,
                    signal: None,
                    code: Some(1),
                }),
            );
            return;
        };
        prefix.extend_from_slice(report.partial);
        // The panicking item's record follows the run before it.
        if codec::encode_plain(&record)
            .map(|r| prefix.extend_from_slice(&r))
            .is_err()
        {
            return;
        }
        let rest = items - failed_at - 1;
        if rest == 0 {
            return self.complete_with(&task.job, task.info, prefix, pid);
        }
        let payload = match (
            task.fds.is_empty(),
            ChunkBody::rest(&task.payload, rest, report.next),
        ) {
            (true, Some(payload)) => payload,
            _ => {
                // Items with handles cannot be cut out of their chunk: each
                // remaining one fails, in the chunk's own format.
                let message = format!(
                    "the pool worker ended on the panic of item {} of this chunk, and this item \
                     (whose arguments carry handles) could not be sent again",
                    task.info.first + failed_at
                );
                let lost = PanicRecord {
                    message,
                    location: None,
                };
                let Ok(lost) = codec::encode_plain(&lost) else {
                    return;
                };
                for _ in 0..rest {
                    // An empty run, then the item's record.
                    prefix.extend_from_slice(&0u32.to_le_bytes());
                    prefix.extend_from_slice(&lost);
                }
                return self.complete_with(&task.job, task.info, prefix, pid);
            }
        };
        let rest = Task {
            job: task.job,
            info: task.info,
            payload: Arc::new(payload),
            fds: Arc::new(Vec::new()),
            prefix: Some(prefix),
            requeued: task.requeued,
        };
        lock(&self.state).queue.push_front(rest);
    }

    /// Completes chunk `info` of `job` with the outcomes `bytes` of all
    /// its items.
    fn complete_with(&self, job: &Job, info: ChunkInfo, bytes: Vec<u8>, pid: u32) {
        let outcome = Outcome::Done {
            bytes,
            fds: Vec::new(),
            offset: 0,
            pid,
        };
        job.complete(info, outcome);
        self.changed.notify_all();
    }

    /// Worker `key` closed its socket: reap it; fail the chunk it was
    /// running, give back those it had not started; replace it. Returns
    /// the replacement's channel.
    fn on_death(&self, key: u64) -> Option<(u64, Channel)> {
        let (worker, stopping) = {
            let mut st = lock(&self.state);
            let at = st.workers.iter().position(|w| w.key == key)?;
            let stopping = matches!(st.phase, Phase::Stopping);
            (st.workers.swap_remove(at), stopping)
        };
        let pid = worker.conn.pid;
        let was_ready = worker.ready;
        let code = match worker.child.wait(Some(Duration::from_secs(5))) {
            Ok(Some(code)) => Some(code),
            _ => {
                let _ = worker.child.signal(Signal::SIGKILL);
                worker
                    .child
                    .wait(Some(Duration::from_secs(5)))
                    .ok()
                    .flatten()
            }
        };
        let err = Error::WorkerDied {
            pid,
            signal: code.filter(|c| *c < 0).map(|c| -c),
            code: code.filter(|c| *c >= 0),
        };
        // Chunks run in the order they were sent: at most one of them (the
        // one marked started, or, without the mark, the oldest) can have
        // been running; the others never started and go back to the queue.
        let started = worker.output.as_ref().map(|o| o.started());
        let mut give_back = Vec::new();
        for (i, f) in worker.in_flight.into_iter().enumerate() {
            let ran = match started {
                Some(started) => started == Some(f.id),
                None => i == 0,
            };
            if ran || f.task.requeued >= MAX_REQUEUES {
                f.task.job.complete(
                    f.task.info,
                    with_prefix(f.task.prefix, Outcome::Failed(err.clone())),
                );
            } else {
                let mut task = f.task;
                task.requeued += 1;
                give_back.push(task);
            }
        }
        // A worker that served its `max_tasks_per_child` exits with 0: a
        // retirement, not a death.
        let retired = code == Some(0)
            && self
                .config
                .init
                .max_tasks
                .is_some_and(|max| worker.sent >= max);
        if !stopping && !retired {
            log::warn!(
                "multiproc pool: worker {pid} died ({err}); {} chunk(s) given to other workers",
                give_back.len()
            );
        }
        {
            let mut st = lock(&self.state);
            for task in give_back.into_iter().rev() {
                st.queue.push_front(task);
            }
        }
        self.changed.notify_all();
        if !was_ready {
            let mut st = lock(&self.state);
            st.early_deaths += 1;
            let give_up = match code {
                // It exited before it could take work: its start or its
                // initializer failed, and a replacement would do the same.
                Some(code) if code >= 0 => Some(format!(
                    "pool worker {pid} exited with code {code} before it was ready"
                )),
                _ if st.early_deaths >= MAX_EARLY_DEATHS => Some(format!(
                    "{} pool workers in a row were killed before they were ready (the last, \
                     {pid}, {})",
                    st.early_deaths,
                    code.map_or("of an unknown cause".to_string(), |c| format!(
                        "by {}",
                        crate::error::signal_name(-c)
                    ))
                )),
                // Killed from outside while starting: replace it.
                _ => None,
            };
            drop(st);
            if let Some(message) = give_up {
                self.break_pool(Error::InitializerFailed { message });
                return None;
            }
        }
        {
            let st = lock(&self.state);
            if st.broken.is_some() || matches!(st.phase, Phase::Stopping) {
                return None;
            }
        }
        self.replace_worker()
    }

    /// Starts a replacement. If the OS refuses (a full descriptor table,
    /// no memory), the pool is not broken: the reader tries again every
    /// [`RETRY_SPAWN`], and while no worker is left at all, queued work
    /// fails with the reason instead of waiting.
    fn replace_worker(&self) -> Option<(u64, Channel)> {
        match self.spawn_worker() {
            Ok((key, channel)) => {
                let mut st = lock(&self.state);
                st.spawn_error = None;
                if let Some(w) = st.workers.iter().find(|w| w.key == key) {
                    log::info!(
                        "multiproc pool: started worker {} as a replacement",
                        w.conn.pid
                    );
                }
                drop(st);
                channel.map(|channel| (key, channel))
            }
            Err(Error::Closed) => None,
            Err(err) => {
                log::error!(
                    "multiproc pool: could not start a replacement worker ({err}); trying again \
                     every {RETRY_SPAWN:?}"
                );
                let failed: Vec<Task> = {
                    let mut st = lock(&self.state);
                    st.missing += 1;
                    st.spawn_error = Some(err.clone());
                    if st.workers.is_empty() {
                        st.queue.drain(..).collect()
                    } else {
                        Vec::new()
                    }
                };
                for task in failed {
                    task.job.complete(task.info, Outcome::Failed(err.clone()));
                }
                self.changed.notify_all();
                None
            }
        }
    }

    /// Tries again to start the replacements that could not be started.
    fn retry_missing(&self) -> Vec<(u64, Channel)> {
        let mut started = Vec::new();
        loop {
            {
                let mut st = lock(&self.state);
                if st.missing == 0
                    || st.broken.is_some()
                    || !matches!(st.phase, Phase::Running | Phase::Closed)
                {
                    break;
                }
                st.missing -= 1;
            }
            match self.replace_worker() {
                Some(new) => started.push(new),
                None => break,
            }
        }
        started
    }

    /// The reader thread: results in, deaths noticed, until `stop`.
    pub(crate) fn read_loop(self: Arc<Self>, waker: Waker) {
        let outcome = crate::registry::catch(|| self.read_loop_inner(&waker));
        let err = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(err)) => err,
            Err(record) => Error::internal(format!(
                "the pool's reader thread panicked: {}",
                record.message
            )),
        };
        self.break_pool(err);
    }

    fn read_loop_inner(&self, waker: &Waker) -> Result<()> {
        let mut channels: Vec<(u64, Channel)> = Vec::new();
        let mut scratch = [0u8; 64];
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        let mut deferred: Vec<bool> = Vec::new();
        loop {
            let retry = {
                let mut st = lock(&self.state);
                if matches!(st.phase, Phase::Stopping) {
                    return Ok(());
                }
                channels.append(&mut st.adopt);
                st.missing > 0
            };
            if retry {
                channels.extend(self.retry_missing());
            }
            // A worker deep in long tasks of `map`s is polled for its end
            // only (`POLLHUP` is always reported): its results wait in its
            // socket until it is about to run out of work, then come in
            // one read with those of every other deferred worker.
            let now = Instant::now();
            let mut timeout = None;
            deferred.clear();
            {
                let st = lock(&self.state);
                let refill = !st.queue.is_empty();
                for (key, _) in &channels {
                    let until = st
                        .workers
                        .iter()
                        .find(|w| w.key == *key && self.defer)
                        .and_then(|w| w.defer_until(refill))
                        .filter(|until| *until > now);
                    if let Some(until) = until {
                        let left = until - now;
                        timeout = Some(timeout.map_or(left, |t: Duration| t.min(left)));
                    }
                    deferred.push(until.is_some());
                }
                if st.missing > 0 {
                    timeout = Some(timeout.map_or(RETRY_SPAWN, |t| t.min(RETRY_SPAWN)));
                }
            }
            let mut polled = Vec::with_capacity(channels.len() + 1);
            polled.push((waker.0.as_fd(), PollFlags::POLLIN));
            polled.extend(channels.iter().zip(&deferred).map(|((_, c), deferred)| {
                let events = if *deferred {
                    PollFlags::empty()
                } else {
                    PollFlags::POLLIN
                };
                (c.fd(), events)
            }));
            let ready = sys::poll_many(&polled, timeout)?;
            drop(polled);
            if !ready[0].is_empty() {
                while matches!((&waker.0).read(&mut scratch), Ok(n) if n > 0) {}
            }
            let mut dead = Vec::new();
            for (i, (key, channel)) in channels.iter_mut().enumerate() {
                if ready[i + 1].is_empty() && !deferred[i] {
                    continue;
                }
                let mut frames = 0usize;
                // What has arrived, without waiting for the rest of a
                // frame: a worker that stops in the middle of one must not
                // stall the others (its frame stays buffered).
                loop {
                    match channel.recv_into(&mut bytes, &mut fds, Some(Duration::ZERO)) {
                        Ok(tag) => {
                            let frame = Frame {
                                tag,
                                bytes: std::mem::take(&mut bytes),
                                fds: std::mem::take(&mut fds),
                            };
                            self.on_frame(*key, frame);
                            frames += 1;
                            // Nothing more buffered: the next poll says
                            // when more arrives (no extra syscall here).
                            if !channel.has_buffered_outcome() {
                                break;
                            }
                        }
                        Err(Error::Timeout) => break,
                        // The kernel dropped the result's descriptors (a
                        // full table): that chunk fails, the worker is fine.
                        Err(err) if crate::wire::is_fds_truncated(&err) => {
                            fds.clear();
                            if let Some(id) = protocol::chunk_id(&bytes) {
                                self.fail_chunk(*key, id, err);
                            }
                        }
                        // An impossible frame (oversized, corrupt) from our
                        // own worker: it is not speaking the protocol;
                        // stop it, which fails its chunk as a death does.
                        Err(Error::Disconnected) => {
                            dead.push(i);
                            break;
                        }
                        Err(_) => {
                            self.kill_worker(*key);
                            dead.push(i);
                            break;
                        }
                    }
                }
                if frames > 0 {
                    let now = Instant::now();
                    let mut st = lock(&self.state);
                    if let Some(w) = st.workers.iter_mut().find(|w| w.key == *key) {
                        w.note_results(frames, now, deferred[i]);
                    }
                }
            }
            for i in dead.into_iter().rev() {
                let (key, channel) = channels.swap_remove(i);
                drop(channel);
                if let Some(new) = self.on_death(key) {
                    channels.push(new);
                }
            }
            self.dispatch();
        }
    }

    /// Fails chunk `id` of worker `key` with `err` (the worker lives on).
    fn fail_chunk(&self, key: u64, id: u64, err: Error) {
        let found = Core::take_in_flight(&mut lock(&self.state), key, id);
        if let Some((task, _)) = found {
            task.job
                .complete(task.info, with_prefix(task.prefix, Outcome::Failed(err)));
            self.changed.notify_all();
        }
    }

    /// SIGKILLs worker `key` (it broke the protocol).
    fn kill_worker(&self, key: u64) {
        let st = lock(&self.state);
        if let Some(w) = st.workers.iter().find(|w| w.key == key) {
            log::warn!(
                "multiproc pool: worker {} broke the protocol; killed",
                w.conn.pid
            );
            let _ = w.child.signal(Signal::SIGKILL);
        }
    }
}

/// Where a chunk's payload was placed in its worker's input arena.
type Placed = super::arena::Placement;

/// One chunk to send, prepared under the state lock and sent after it.
struct Send {
    conn: Arc<Conn>,
    key: u64,
    id: u64,
    payload: Arc<Vec<u8>>,
    fds: Arc<Vec<OwnedFd>>,
    placed: Option<Placed>,
}

impl Send {
    /// A chunk in the socket, without descriptors, to a local worker.
    fn is_plain(&self) -> bool {
        self.placed.is_none() && self.fds.is_empty() && matches!(self.conn.tx, Tx::Socket(_))
    }
}

/// A chunk's outcome with the outcomes of its first items in front (see
/// [`Task::prefix`]).
fn with_prefix(prefix: Option<Vec<u8>>, outcome: Outcome) -> Outcome {
    let Some(mut bytes) = prefix else {
        return outcome;
    };
    let pid = match &outcome {
        Outcome::Done { pid, .. } | Outcome::Shared { pid, .. } => *pid,
        Outcome::Failed(_) => return outcome,
    };
    let fds = match outcome {
        Outcome::Done {
            bytes: rest,
            fds,
            offset,
            ..
        } => {
            bytes.extend_from_slice(rest.get(offset..).unwrap_or(&[]));
            fds
        }
        Outcome::Shared { lease, .. } => match lease.bytes() {
            Ok(rest) => {
                bytes.extend_from_slice(rest);
                Vec::new()
            }
            Err(err) => return Outcome::Failed(err),
        },
        Outcome::Failed(err) => return Outcome::Failed(err),
    };
    Outcome::Done {
        bytes,
        fds,
        offset: 0,
        pid,
    }
}

/// How a chunk came back (see [`Core::on_result`]).
enum Answer {
    /// Its outcomes are in the frame.
    Outcomes,
    /// Its outcomes are in the output arena.
    Shared(Result<Lease>),
    /// The whole chunk failed.
    Failed(TaskFailure),
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn short_tasks_keep_the_usual_window_and_long_ones_get_work_ahead() {
        assert_eq!(window(SLOTS, None), SLOTS);
        assert_eq!(window(SLOTS, Some(Duration::from_micros(50))), SLOTS);
        // 8 ms tasks: AHEAD of work beyond the usual slots.
        assert_eq!(window(SLOTS, Some(8 * MS)), SLOTS + 25);
        // Never more than DEEP_SLOTS, never fewer than the usual slots.
        assert_eq!(window(SLOTS, Some(LONG_TASK)), DEEP_SLOTS);
        assert_eq!(window(SLOTS, Some(10 * AHEAD)), SLOTS);
        assert_eq!(window(64, Some(8 * MS)), 64);
    }

    #[test]
    fn the_task_time_falls_at_once_and_rises_slowly() {
        assert_eq!(learn(None, 8 * MS), 8 * MS);
        assert_eq!(learn(Some(8 * MS), 2 * MS), 2 * MS);
        assert_eq!(learn(Some(8 * MS), 12 * MS), 9 * MS);
    }

    #[test]
    fn results_wait_only_while_a_worker_has_work_left() {
        let t0 = Instant::now();
        // Short tasks, or too little in flight: every result is read.
        assert_eq!(defer_until(t0, Duration::from_micros(10), 16, true), None);
        assert_eq!(defer_until(t0, 8 * MS, 2, true), None);
        assert_eq!(defer_until(t0, 8 * MS, 1, false), None);
        // 10 chunks of 8 ms, more queued: two kept, half of the other
        // eight's time.
        assert_eq!(defer_until(t0, 8 * MS, 10, true), Some(t0 + 32 * MS));
        // Nothing queued: one kept.
        assert_eq!(defer_until(t0, 8 * MS, 10, false), Some(t0 + 36 * MS));
        assert_eq!(defer_until(t0, 8 * MS, 2, false), Some(t0 + 4 * MS));
    }
}
