//! The pool's second transport: the serving ranks of an MPI job
//! (feature `mpi`).
//!
//! A serving rank is a worker of the same pool: the engine sends it the
//! same [`ToWorker`] messages (registered name + encoded chunk) and reads
//! the same [`FromWorker`] answers, so results, ordering and errors are the
//! local pool's. What differs is only how the bytes travel: one MPI message
//! per frame, the frame's bytes followed by an 8-byte trailer, `tag: u32`
//! (the pool protocol's tag, or one of the control tags below) and
//! `session: u32` (which pool's worker the frame belongs to; several pools
//! may use the ranks at once), all with the MPI tag [`MPI_TAG`]. The
//! trailer comes last so that the receiver drops it without moving the
//! frame's bytes, and a result's outcomes stay where the engine reads them.
//!
//! | control message | tag | bytes | answer |
//! |---|---|---|---|
//! | rank 0 → rank: start a session | `0x5101` | a `WorkerInit` (codec) | `Ready` or `InitFailed` |
//! | rank 0 → rank: stop a session | `0x5102` | none | none |
//! | rank 0 → rank: rank 0 is exiting | `0x5103` | none | none: the rank finalizes MPI and exits |
//!
//! Every start and every task gets exactly one answer (a task of a session
//! that was stopped is answered [`Error::Closed`] without running), so rank 0
//! knows how many answers are still on their way and keeps receiving until
//! they came: a rank is never left blocked in a send nobody receives.
//!
//! # Rank 0
//!
//! Every MPI call after the start is made under one lock ([`Link`]'s
//! `calls`: `MPI_Isend` of the queued frames, `MPI_Improbe` + `MPI_Mrecv`
//! of the answers, `MPI_Test` of the sends), so `MPI_THREAD_SERIALIZED`
//! is enough. Any thread of the pool queues a frame without waiting, so a
//! busy rank never holds up the others. Who makes the calls:
//!
//! - a thread that waits for a job's results (`apply`, `get`, `map`,
//!   `imap`'s `next`...) drives the link itself ([`Drive`]): rounds of
//!   calls, yielding between them, until one of its answers came or
//!   [`DRIVE_SPIN`] passed. The answer is delivered by the thread that
//!   waits for it, with no wake-up between two threads (the round trip of
//!   one task is one thread's send and receive, as in a raw ping-pong);
//! - otherwise the transport's thread: while answers are due it spins
//!   (yielding) for [`DUE_SPIN`] after the last message, then sleeps in
//!   growing steps up to [`DUE_NAP`]. While a thread drives it naps
//!   ([`DUE_NAP`]) and takes over when the driver stops.
//!   With nothing due it naps ([`IDLE_NAP`]) for [`IDLE_WINDOW`], so that
//!   queuing a frame wakes nobody while callers drive their own answers,
//!   then waits on a condition variable (no CPU at all) and a new frame
//!   wakes it.

//! # A serving rank
//!
//! A single thread: probe (spinning [`SPIN`] after a message, then
//! sleeping up to [`MAX_NAP`]: an idle rank costs 1-2% of a core),
//! receive, run the chunk through the pool's
//! own worker code ([`worker::run_chunk`]: a panicking item fails alone,
//! with its message), answer with a blocking send (rank 0 is always
//! receiving while an answer is due). With more than one local worker
//! ([`crate::child::ranks::WORKERS_VAR`], or a host with more CPUs than
//! ranks) the rank hands its chunks to a local pool of that many worker
//! processes instead, and answers as they finish.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError, Weak};
use std::time::{Duration, Instant};

use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::Communicator;

use super::engine::{Config, Core, RemoteHosts, RemoteWorker, Task, Transport};
use super::job::{Drive, lock};
use super::protocol::{FromWorker, TaskFailure, ToWorker, WorkerInit};
use super::worker;
use crate::child::ranks::{self as launch, RankInfo, Role, World};
use crate::codec;
use crate::error::{Error, Result};
use crate::registry;
use crate::sys::mpi::OwnedSend;
use crate::wire::Frame;

/// The MPI tag of every message of multiproc's.
const MPI_TAG: i32 = 0x4d50;

const TAG_START: u32 = 0x5101;
const TAG_STOP: u32 = 0x5102;
const TAG_FINISH: u32 = 0x5103;

/// `tag: u32`, `session: u32` after the frame's bytes.
const TRAILER: usize = 8;

/// The largest message MPI counts (`int` elements).
const MPI_MAX: u64 = i32::MAX as u64;

/// How long a serving rank keeps probing without sleeping after a
/// message, and its longest sleep between two probes when idle.
const SPIN: Duration = Duration::from_micros(200);
const MAX_NAP: Duration = Duration::from_millis(1);

/// Rank 0 while answers are due: a chunk's answer is picked up at most
/// this late (it holds up the rank's next chunk), at the price of a few
/// percent of a core while tasks run; with none due its thread sleeps.
const DUE_SPIN: Duration = Duration::from_micros(50);
const DUE_NAP: Duration = Duration::from_micros(100);

/// Rank 0's thread after its last work: for [`IDLE_WINDOW`] it looks for
/// new frames every [`IDLE_NAP`] (a frame queued then is picked up by a
/// thread that waits for its answer, or at the end of the nap), then it
/// sleeps until a frame wakes it.
const IDLE_WINDOW: Duration = Duration::from_millis(2);
const IDLE_NAP: Duration = Duration::from_micros(500);

/// How long rank 0's exit waits for answers still due (tasks still running
/// on serving ranks) before it aborts the job instead of finalizing.
const FINISH_WAIT: Duration = Duration::from_secs(30);

inventory::submit! {
    Role { serve, finish }
}

/// The serving ranks as a pool's transport, when this process is rank 0
/// of an MPI job with at least one of them.
pub(crate) fn transport() -> Option<Transport> {
    let world = launch::world()?;
    (world.rank == 0 && world.serialized && !world.serving.is_empty())
        .then(|| Transport::Remote(Box::new(Ranks(world.serving.clone()))))
}

/// The serving ranks, where a pool opens its sessions.
#[derive(Debug)]
struct Ranks(Vec<RankInfo>);

impl RemoteHosts for Ranks {
    fn places(&self) -> &[RankInfo] {
        &self.0
    }

    fn driver(&self) -> Option<&'static dyn Drive> {
        Some(link())
    }

    fn open(&self, info: &RankInfo, core: Weak<Core>, key: u64) -> Arc<dyn RemoteWorker> {
        let link = link();
        let session = link.next_session.fetch_add(1, Ordering::Relaxed);
        lock(&link.state)
            .sessions
            .insert(session, Session { core, key });
        Arc::new(RankSession {
            rank: info.rank,
            session,
            closed: AtomicBool::new(false),
        })
    }
}

/// A frame's bytes, in parts, with the trailer.
fn pack(tag: u32, session: u32, parts: &[&[u8]]) -> Vec<u8> {
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + TRAILER;
    let mut bytes = Vec::with_capacity(len);
    for part in parts {
        bytes.extend_from_slice(part);
    }
    bytes.extend_from_slice(&tag.to_le_bytes());
    bytes.extend_from_slice(&session.to_le_bytes());
    bytes
}

/// Takes the trailer off `bytes`: (tag, session).
fn unpack(bytes: &mut Vec<u8>) -> Option<(u32, u32)> {
    let at = bytes.len().checked_sub(TRAILER)?;
    let tag = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
    let session = u32::from_le_bytes(bytes.get(at + 4..at + 8)?.try_into().ok()?);
    bytes.truncate(at);
    Some((tag, session))
}

/// Probing with back-off: spin (yielding the CPU) for `spin` after the
/// last message, then sleep, doubling from 10 µs up to `max_nap`.
struct Backoff {
    last: Instant,
    nap: Duration,
    spin: Duration,
    max_nap: Duration,
}

impl Backoff {
    fn new(spin: Duration, max_nap: Duration) -> Backoff {
        Backoff {
            last: Instant::now(),
            nap: Duration::from_micros(10),
            spin,
            max_nap,
        }
    }

    fn reset(&mut self) {
        self.last = Instant::now();
        self.nap = Duration::from_micros(10);
    }

    fn spinning(&self) -> bool {
        self.last.elapsed() < self.spin
    }

    fn snooze(&mut self) {
        if self.spinning() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.nap);
            self.nap = (self.nap * 2).min(self.max_nap);
        }
    }
}

// ---------------------------------------------------------------------
// Rank 0.

/// Where a session's answers go.
#[derive(Debug)]
struct Session {
    core: Weak<Core>,
    key: u64,
}

#[derive(Debug, Default)]
struct LinkState {
    /// Frames to send: (rank, bytes).
    outbox: VecDeque<(i32, Vec<u8>)>,
    /// Answers still due.
    due: usize,
    sessions: HashMap<u32, Session>,
    /// Threads waiting for their answers that make the MPI calls
    /// themselves meanwhile ([`Drive`]); the transport's thread sleeps.
    drivers: usize,
    /// Rank 0 is exiting: the thread sends what is queued, waits for the
    /// answers due (up to [`FINISH_WAIT`]) and ends.
    finishing: bool,
    /// The thread waits without a timeout: a new frame must wake it. Up to
    /// [`IDLE_WINDOW`] after its last work it naps instead, so that the
    /// frames of a caller that will drive its own answer (`apply` in a
    /// loop) cost no wake-up.
    asleep: bool,
}

/// Rank 0's side of the transport: the queue of frames, the right to make
/// MPI calls, and the thread that makes them when no waiting thread does.
#[derive(Debug, Default)]
struct Link {
    state: Mutex<LinkState>,
    changed: Condvar,
    /// Held for every MPI call after the start: the sends in progress.
    /// Taken after `state`'s lock is released, never the other way.
    calls: Mutex<Vec<OwnedSend>>,
    /// Sends in progress (`calls`' length, readable under `state`).
    sending: AtomicUsize,
    thread: Mutex<Option<std::thread::JoinHandle<bool>>>,
    next_session: AtomicU32,
}

static LINK: OnceLock<Link> = OnceLock::new();

fn link() -> &'static Link {
    LINK.get_or_init(Link::default)
}

impl Link {
    /// Queues `bytes` for `rank`; `answered`: one answer is due for it.
    fn push(&self, rank: i32, bytes: Vec<u8>, answered: bool) -> Result<()> {
        let mut st = lock(&self.state);
        if st.finishing {
            return Err(Error::Closed);
        }
        st.outbox.push_back((rank, bytes));
        if answered {
            st.due += 1;
        }
        // A driving thread sends it in its next round; a napping thread
        // sees it when its nap ends, unless someone drives it first.
        let wake = st.drivers == 0 && st.asleep;
        drop(st);
        if wake {
            self.changed.notify_all();
        }
        Ok(())
    }

    /// Starts the thread, once.
    fn ensure_thread(&'static self) -> Result<()> {
        let mut thread = lock(&self.thread);
        if thread.is_none() {
            let handle = std::thread::Builder::new()
                .name("multiproc-mpi".into())
                .spawn(move || self.run())
                .map_err(|e| Error::io("could not start the MPI transport's thread", e))?;
            *thread = Some(handle);
        }
        Ok(())
    }

    /// The thread: rounds of calls with back-off while something is due
    /// and no waiting thread drives. `true` if it ended with every answer
    /// in.
    fn run(&self) -> bool {
        let mut backoff = Backoff::new(DUE_SPIN, DUE_NAP);
        let mut deadline: Option<Instant> = None;
        let mut last_work = Instant::now();
        loop {
            {
                let mut st = lock(&self.state);
                loop {
                    let sending = self.sending.load(Ordering::Acquire) > 0;
                    if st.finishing {
                        let left = *deadline.get_or_insert_with(|| Instant::now() + FINISH_WAIT);
                        if st.outbox.is_empty() && !sending && st.due == 0 {
                            return true;
                        }
                        if Instant::now() >= left {
                            return false;
                        }
                        break;
                    }
                    let work = !st.outbox.is_empty() || st.due > 0 || sending;
                    if work || st.drivers > 0 {
                        last_work = Instant::now();
                    }
                    if st.drivers == 0 && (work || backoff.spinning()) {
                        break;
                    }
                    let idle = last_work.elapsed();
                    if work {
                        // A thread drives: this one takes over at most a
                        // nap after it stops.
                        st = self
                            .changed
                            .wait_timeout(st, DUE_NAP)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    } else if idle < IDLE_WINDOW {
                        st = self
                            .changed
                            .wait_timeout(st, IDLE_NAP.min(IDLE_WINDOW - idle))
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    } else {
                        st.asleep = true;
                        st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                        st.asleep = false;
                        backoff.reset();
                    }
                }
            }
            if self.round(&mut lock(&self.calls)) {
                backoff.reset();
            } else {
                backoff.snooze();
            }
        }
    }

    /// One round of MPI calls: starts the queued sends, tests those in
    /// progress, receives and delivers every answer that arrived. `true`
    /// if anything moved.
    fn round(&self, sending: &mut Vec<OwnedSend>) -> bool {
        let comm = launch::comm();
        let batch: Vec<(i32, Vec<u8>)> = lock(&self.state).outbox.drain(..).collect();
        let mut active = !batch.is_empty();
        for (rank, bytes) in batch {
            sending.push(OwnedSend::start(&comm, rank, MPI_TAG, bytes));
        }
        if !sending.is_empty() {
            sending.retain_mut(|send| !send.test());
            self.sending.store(sending.len(), Ordering::Release);
        }
        while let Some(message) = comm.any_process().immediate_matched_probe_with_tag(MPI_TAG) {
            let (bytes, _status) = message.matched_receive_vec::<u8>();
            self.deliver(bytes);
            active = true;
        }
        active
    }

    /// An answer from a serving rank: to its session's pool.
    fn deliver(&self, mut bytes: Vec<u8>) {
        let Some((tag, session)) = unpack(&mut bytes) else {
            return;
        };
        let target = {
            let mut st = lock(&self.state);
            st.due = st.due.saturating_sub(1);
            st.sessions.get(&session).map(|s| (s.core.upgrade(), s.key))
        };
        // A stopped session's answer is dropped.
        if let Some((Some(core), key)) = target {
            let frame = Frame {
                tag,
                bytes,
                fds: Vec::new(),
            };
            core.on_frame(key, frame);
            core.retire_if_done(key);
            core.dispatch();
        }
    }
}

/// A thread waiting for answers from the ranks polls for them itself for
/// at most this long (then the transport's thread takes over with its
/// back-off, and the waiting thread sleeps until woken).
const DRIVE_SPIN: Duration = Duration::from_micros(200);

impl Drive for Link {
    fn drive(&self, progressed: &dyn Fn() -> bool, deadline: Option<Instant>) {
        /// Counts this thread out of the drivers, also if a round panics
        /// (the transport's thread would otherwise never take over).
        struct Driving<'a> {
            link: &'a Link,
            progress: bool,
        }
        impl Drop for Driving<'_> {
            fn drop(&mut self) {
                let link = self.link;
                let mut st = lock(&link.state);
                st.drivers -= 1;
                let sending = link.sending.load(Ordering::Acquire) > 0;
                // A caller that got its answer is usually back soon (the
                // next result of its map): the thread takes over after
                // its nap. One that gave up hands over now.
                let wake = !self.progress
                    && st.drivers == 0
                    && (st.due > 0 || !st.outbox.is_empty() || sending);
                drop(st);
                if wake {
                    link.changed.notify_all();
                }
            }
        }
        {
            let mut st = lock(&self.state);
            if st.finishing {
                return;
            }
            st.drivers += 1;
        }
        let mut driving = Driving {
            link: self,
            progress: false,
        };
        let until = Instant::now() + DRIVE_SPIN;
        let until = deadline.map_or(until, |d| d.min(until));
        loop {
            // Busy (another driver, or the thread finishing a round): the
            // next turn is soon.
            match self.calls.try_lock() {
                Ok(mut sending) => {
                    self.round(&mut sending);
                }
                Err(TryLockError::Poisoned(poisoned)) => {
                    self.round(&mut poisoned.into_inner());
                }
                Err(TryLockError::WouldBlock) => {}
            }
            if progressed() {
                driving.progress = true;
                return;
            }
            if Instant::now() >= until {
                return;
            }
            std::thread::yield_now();
        }
    }
}

/// A session on a serving rank: what a worker process is to the local
/// pool. Dropped (or stopped), its late answers are dropped and its queued
/// tasks answered without running.
#[derive(Debug)]
struct RankSession {
    rank: i32,
    session: u32,
    closed: AtomicBool,
}

impl RemoteWorker for RankSession {
    fn place(&self) -> i32 {
        self.rank
    }

    fn start(&self, init: &[u8]) -> Result<()> {
        if init.len() as u64 + TRAILER as u64 > MPI_MAX {
            return Err(Error::MessageTooLarge {
                size: init.len() as u64,
                limit: MPI_MAX,
            });
        }
        let link = link();
        link.ensure_thread()?;
        link.push(self.rank, pack(TAG_START, self.session, &[init]), true)
    }

    fn send(&self, tag: u32, parts: &[&[u8]]) -> Result<()> {
        let size = parts.iter().map(|p| p.len() as u64).sum::<u64>() + TRAILER as u64;
        if size > MPI_MAX {
            return Err(Error::MessageTooLarge {
                size,
                limit: MPI_MAX,
            });
        }
        link().push(self.rank, pack(tag, self.session, parts), true)
    }

    fn stop(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let link = link();
        lock(&link.state).sessions.remove(&self.session);
        let _ = link.push(self.rank, pack(TAG_STOP, self.session, &[]), false);
    }
}

impl Drop for RankSession {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Rank 0 at exit: tells every serving rank to finish, waits for the
/// answers still due (or aborts the job after [`FINISH_WAIT`]).
fn finish() {
    let Some(world) = launch::world() else {
        return;
    };
    let link = link();
    let running = lock(&link.thread).take();
    match running {
        Some(thread) => {
            {
                let mut st = lock(&link.state);
                for info in &world.serving {
                    st.outbox.push_back((info.rank, pack(TAG_FINISH, 0, &[])));
                }
                st.finishing = true;
            }
            link.changed.notify_all();
            if !matches!(thread.join(), Ok(true)) {
                eprintln!(
                    "multiproc: tasks were still running on serving MPI ranks {} s after rank 0 \
                     finished; aborting the job",
                    FINISH_WAIT.as_secs()
                );
                launch::comm().abort(3);
            }
        }
        None => {
            // No pool ever used the ranks: this thread is the only one
            // that calls MPI.
            let comm = launch::comm();
            for info in &world.serving {
                comm.process_at_rank(info.rank)
                    .send_with_tag(&pack(TAG_FINISH, 0, &[])[..], MPI_TAG);
            }
        }
    }
}

// ---------------------------------------------------------------------
// A serving rank.

/// A session on a serving rank: its start, and its local pool if the
/// rank fans its chunks out.
struct Served {
    fan: Option<LocalFanOut>,
}

/// A serving rank's loop, until rank 0 finishes: 0, or 2 when rank 0
/// broke the protocol (the job is then aborted by the caller's exit).
fn serve(world: &World) -> i32 {
    // A task's panic is reported to rank 0 (with its location), not here.
    registry::install_panic_hook();
    registry::set_quiet_panics(true);
    let comm = launch::comm();
    let root = comm.process_at_rank(0);
    let mut sessions: HashMap<u32, Served> = HashMap::new();
    let mut cached = None;
    let mut out = Vec::new();
    let mut out_fds = Vec::new();
    let mut backoff = Backoff::new(SPIN, MAX_NAP);
    let answer = |session: u32, reply: &FromWorker<'_>| {
        // Only a start refusal has no parts, and it is never sent here.
        let _ = reply.with_parts(|tag, parts| {
            root.send_with_tag(&pack(tag, session, parts)[..], MPI_TAG);
        });
    };
    loop {
        let mut finished = false;
        for (session, served) in &mut sessions {
            if let Some(fan) = &mut served.fan {
                finished |= fan.answer_finished(*session, &answer);
            }
        }
        if finished {
            backoff.reset();
        }
        let Some(message) = root.immediate_matched_probe_with_tag(MPI_TAG) else {
            backoff.snooze();
            continue;
        };
        backoff.reset();
        let (mut bytes, _status) = message.matched_receive_vec::<u8>();
        let Some((tag, session)) = unpack(&mut bytes) else {
            return 2;
        };
        match tag {
            TAG_FINISH => return 0,
            TAG_STOP => {
                if let Some(Served { fan: Some(fan) }) = sessions.remove(&session) {
                    // Its chunks still running are answered (rank 0
                    // counts on it) and dropped there.
                    fan.stop(session, &answer);
                }
            }
            TAG_START => {
                let started = codec::decode_plain::<WorkerInit>(&bytes).and_then(|init| {
                    if world.workers > 1 {
                        // The initializer runs in each local worker.
                        LocalFanOut::new(world.workers as usize, init).map(Some)
                    } else {
                        worker::run_initializer(&init, Vec::new()).map(|()| None)
                    }
                });
                match started {
                    Ok(fan) => {
                        sessions.insert(session, Served { fan });
                        answer(session, &FromWorker::Ready);
                    }
                    Err(err) => {
                        answer(
                            session,
                            &FromWorker::InitFailed(TaskFailure::from_error(err)),
                        );
                    }
                }
            }
            tag => {
                let Some(ToWorker::Task { id, body }) = ToWorker::parse(tag, &bytes) else {
                    return 2;
                };
                let Some(served) = sessions.get_mut(&session) else {
                    let failure = TaskFailure::from_error(Error::Closed);
                    answer(session, &FromWorker::TaskFailed { id, failure });
                    continue;
                };
                if let Some(fan) = &mut served.fan {
                    if let Err(err) = fan.submit(id, body) {
                        let failure = TaskFailure::from_error(err);
                        answer(session, &FromWorker::TaskFailed { id, failure });
                    }
                    continue;
                }
                // Results travel back to rank 0: handles are refused there too.
                let ran = codec::encoding_for(codec::Peer::MpiRank, || {
                    worker::run_chunk(&mut cached, body, Vec::new(), &mut out, &mut out_fds)
                });
                out_fds.clear();
                let reply = match ran {
                    Some(Ok(())) => FromWorker::Result { id, outcomes: &out },
                    Some(Err(err)) => FromWorker::TaskFailed {
                        id,
                        failure: TaskFailure::from_error(err),
                    },
                    None => FromWorker::TaskFailed {
                        id,
                        failure: TaskFailure::Decode("a pool task that does not parse".into()),
                    },
                };
                answer(session, &reply);
            }
        }
    }
}

/// A local pool of `workers` processes with `init` (a serving rank's own,
/// for one session); waits until the initializer ran in each.
fn start_local(
    workers: usize,
    init: WorkerInit,
) -> Result<(Arc<Core>, std::thread::JoinHandle<()>)> {
    let has_initializer = init.initializer.is_some();
    let config = Config {
        processes: workers,
        workers,
        init,
        init_fds: Vec::new(),
        transport: Transport::Local,
        // Re-executed children: a fork of an MPI process would share its
        // MPI state.
        start_method: crate::StartMethod::Spawn,
    };
    let (core, reader) = Core::start(config, workers)?;
    if has_initializer {
        if let Err(err) = core.wait_ready() {
            core.terminate(Some(reader));
            return Err(err);
        }
    }
    Ok((core, reader))
}

/// A session's local pool on a serving rank: chunks from rank 0 go whole
/// to local worker processes (the local transport, with the session's
/// initializer and task limit), their outcomes back to rank 0.
struct LocalFanOut {
    core: Arc<Core>,
    reader: Option<std::thread::JoinHandle<()>>,
    job: Arc<super::job::Job>,
    /// Chunk index in `job` → the chunk's id at rank 0.
    running: HashMap<usize, u64>,
    next: usize,
}

impl LocalFanOut {
    fn new(workers: usize, init: WorkerInit) -> Result<LocalFanOut> {
        let (core, reader) = start_local(workers, init)?;
        Ok(LocalFanOut {
            core,
            reader: Some(reader),
            job: Arc::new(super::job::Job::default()),
            running: HashMap::new(),
            next: 0,
        })
    }

    fn submit(&mut self, id: u64, body: &[u8]) -> Result<()> {
        let index = self.next;
        self.next += 1;
        let info = super::job::ChunkInfo {
            index,
            first: 0,
            count: super::protocol::ChunkBody::items(body),
        };
        let task = Task::new(Arc::clone(&self.job), info, body.to_vec(), Vec::new());
        self.running.insert(index, id);
        self.core.submit([task])
    }

    /// Stops the local workers; the chunks they were running are answered
    /// as closed.
    fn stop(mut self, session: u32, answer: &impl Fn(u32, &FromWorker<'_>)) {
        self.core.terminate(self.reader.take());
        for (_, id) in self.running.drain() {
            let failure = TaskFailure::from_error(Error::Closed);
            answer(session, &FromWorker::TaskFailed { id, failure });
        }
    }

    /// Answers the chunks the local workers finished; `true` if any.
    fn answer_finished(&mut self, session: u32, answer: &impl Fn(u32, &FromWorker<'_>)) -> bool {
        let mut any = false;
        while let Some((info, outcome)) = self.job.take(None, Some(Instant::now())) {
            any = true;
            let Some(id) = self.running.remove(&info.index) else {
                continue;
            };
            match outcome.into_bytes() {
                Ok(bytes) => answer(
                    session,
                    &FromWorker::Result {
                        id,
                        outcomes: &bytes,
                    },
                ),
                Err(err) => {
                    let failure = TaskFailure::from_error(err);
                    answer(session, &FromWorker::TaskFailed { id, failure });
                }
            }
        }
        any
    }
}

impl Drop for LocalFanOut {
    fn drop(&mut self) {
        self.core.terminate(self.reader.take());
    }
}
