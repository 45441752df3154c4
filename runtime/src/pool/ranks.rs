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
//! Each side keeps a receive of [`SMALL`] bytes (64 KiB) posted on
//! [`MPI_TAG`] ([`OwnedRecv`]), so that a message is written where it is
//! read, with no probe and no queue of unexpected messages between (a
//! probing loop alone was 2.5-4x a raw blocking ping-pong). A larger frame
//! travels as two messages: on [`MPI_TAG`] an announcement (its parts but
//! the last, its tag, and a trailer with [`TAG_BULK`]), then its last part
//! on [`MPI_TAG_BULK`], sent as it is (rank 0 sends a chunk's shared
//! payload, a serving rank its outcomes buffer: no copy into one message)
//! and received right after the announcement's parts, into room MPI
//! writes once.
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
//! `calls`: `MPI_Isend` of the queued frames, `MPI_Test` of the sends and
//! of the answers' posted receive, the blocking receive of an announced
//! large answer), so `MPI_THREAD_SERIALIZED` is enough. Any thread of the
//! pool queues a frame without waiting (and starts its send itself when
//! the lock is free), so a busy rank never holds up the others. Who makes
//! the calls:
//!
//! - a thread that waits for a job's results (`apply`, `get`, `map`,
//!   `imap`'s `next`...) drives the link itself ([`Drive`]): rounds of
//!   calls until one of its answers came or [`DRIVE_SPIN`] passed, with
//!   no yield of its own between two (MPI's progress yields in each call
//!   when the ranks oversubscribe the cores, as in its own blocking
//!   receive; a yield when another thread holds the lock). The answer is
//!   delivered by the thread that waits for it, with no wake-up between
//!   two threads (the round trip of one task is one thread's send and
//!   receive, as in a raw ping-pong), and its job skips the condition
//!   variable's wake-up, since nobody sleeps on it;
//! - a synchronous `apply` with a ready rank that holds nothing of its
//!   pool (nothing queued, no task limit) runs its task *alone*
//!   ([`RankSession::run_alone`], from [`Core::run_alone`]): no job,
//!   queue, dispatch or outbox. Under `calls` it sends the task (a
//!   blocking `MPI_Send` up to [`EAGER`] bytes, which returns once the
//!   bytes are copied out; `MPI_Isend` above) and makes the rounds itself
//!   ([`Link::round_taking`]): its answer is decoded where it was received,
//!   any other answer delivered as usual. Past [`DRIVE_SPIN`] it leaves a
//!   [`Claim`] (session, chunk id) in the link's state, which whoever
//!   receives the answer fills ([`Link::deliver`]), and sleeps on
//!   `claimed`; a stopped session ends the wait with [`Error::Closed`]
//!   (its late answer is dropped). With `calls` held by another thread
//!   for long (its own wait), the task takes the queued path;
//! - otherwise the transport's thread: while answers are due it spins
//!   (yielding) for [`DUE_SPIN`] after the last message, then sleeps in
//!   growing steps up to [`DUE_NAP`]. While a thread drives, or for one
//!   [`DUE_NAP`] after a driver left with its answer (it is likely back
//!   soon: `apply` in a loop), it naps and takes over after.
//!   With nothing due it naps ([`IDLE_NAP`]) for [`IDLE_WINDOW`], so that
//!   queuing a frame wakes nobody while callers drive their own answers,
//!   then waits on a condition variable (no CPU at all) and a new frame
//!   wakes it.

//! # A serving rank
//!
//! A single thread: test its posted receive (spinning [`SPIN`] after a
//! message, then sleeping up to [`MAX_NAP`]: an idle rank costs 1-3% of
//! a core), run the chunk, in place in the receive's buffer, through the
//! pool's
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

use mpi::datatype::Equivalence;
use mpi::point_to_point::{Destination, Source};
use mpi::topology::Communicator;

use super::engine::{Alone, Config, Core, RemoteHosts, RemoteWorker, Task, Transport};
use super::job::{Drive, lock};
use super::protocol::{self, FromWorker, TaskFailure, ToWorker, WorkerInit};
use super::worker;
use crate::child::ranks::{self as launch, RankInfo, Role, World};
use crate::codec;
use crate::error::{Error, Result};
use crate::registry;
use crate::sys::mpi::{OwnedRecv, OwnedSend};
use crate::wire::Frame;

/// The MPI tag of every message of multiproc's.
const MPI_TAG: i32 = 0x4d50;

const TAG_START: u32 = 0x5101;
const TAG_STOP: u32 = 0x5102;
const TAG_FINISH: u32 = 0x5103;

/// The MPI tag of a large frame's message, which follows its
/// announcement ([`TAG_BULK`]) on [`MPI_TAG`].
const MPI_TAG_BULK: i32 = 0x4d51;

/// An announcement: the next message from this rank on [`MPI_TAG_BULK`]
/// is a frame (with its trailer) larger than [`SMALL`].
const TAG_BULK: u32 = 0x5104;

/// `tag: u32`, `session: u32` after the frame's bytes.
const TRAILER: usize = 8;

/// The largest message (frame and trailer) sent on [`MPI_TAG`]: each side
/// keeps a receive of this size posted, so that a message is written
/// where it is read, with no queue of unexpected messages between. A
/// larger frame is announced, then received whole as it comes.
const SMALL: usize = 64 << 10;

/// A serving rank keeps its buffer for large chunks up to this size.
const BULK_KEPT: usize = 16 << 20;

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
    let mut bytes = Vec::new();
    pack_into(&mut bytes, tag, session, parts);
    bytes
}

/// [`pack`] into `bytes` (cleared first), kept for its allocation.
fn pack_into(bytes: &mut Vec<u8>, tag: u32, session: u32, parts: &[&[u8]]) {
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + TRAILER;
    bytes.clear();
    bytes.reserve(len);
    for part in parts {
        bytes.extend_from_slice(part);
    }
    bytes.extend_from_slice(&tag.to_le_bytes());
    bytes.extend_from_slice(&session.to_le_bytes());
}

/// The largest message sent with a blocking send (`MPI_Send`) on the
/// one-task path: well under the shared-memory transport's eager limit
/// (OpenMPI's is 4 KiB), so that the send returns once the bytes are
/// copied out, whatever the receiver does. A larger one is sent as the
/// others are (`MPI_Isend`, tested in the rounds).
const EAGER: usize = 1024;

/// A message's frame and trailer: (frame bytes, tag, session).
fn split(bytes: &[u8]) -> Option<(&[u8], u32, u32)> {
    let at = bytes.len().checked_sub(TRAILER)?;
    let (frame, trailer) = bytes.split_at(at);
    let tag = u32::from_le_bytes(trailer.get(..4)?.try_into().ok()?);
    let session = u32::from_le_bytes(trailer.get(4..8)?.try_into().ok()?);
    Some((frame, tag, session))
}

/// A frame on its way to a serving rank: one message on [`MPI_TAG`] (the
/// frame with its trailer, or the announcement of a large one) and, for a
/// large frame, its last part on [`MPI_TAG_BULK`], sent without a copy.
#[derive(Debug)]
struct Outgoing {
    rank: i32,
    message: Vec<u8>,
    bulk: Option<Arc<Vec<u8>>>,
}

/// The second message of a large frame.
enum Bulk<'a> {
    /// The frame's last part.
    Last(&'a [u8]),
    /// The whole frame (when the parts before the last do not fit an
    /// announcement).
    Whole(Vec<u8>),
}

impl Bulk<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Bulk::Last(bytes) => bytes,
            Bulk::Whole(bytes) => bytes,
        }
    }
}

/// The messages that carry a frame (`tag`, `parts`) of `session`: the
/// frame with its trailer if that fits the receive posted on [`MPI_TAG`]
/// ([`SMALL`]); otherwise an announcement there (the parts but the last,
/// the frame's tag, and the trailer with [`TAG_BULK`]) and the last part,
/// which the receiver puts after the others.
fn messages<'a>(tag: u32, session: u32, parts: &[&'a [u8]]) -> (Vec<u8>, Option<Bulk<'a>>) {
    let len = parts.iter().map(|p| p.len()).sum::<usize>();
    if len + TRAILER <= SMALL {
        return (pack(tag, session, parts), None);
    }
    let tag_bytes = tag.to_le_bytes();
    if let Some((last, head)) = parts.split_last() {
        if len - last.len() + tag_bytes.len() + TRAILER <= SMALL {
            let mut announced: Vec<&[u8]> = head.to_vec();
            announced.push(&tag_bytes);
            return (pack(TAG_BULK, session, &announced), Some(Bulk::Last(last)));
        }
    }
    let whole = parts.concat();
    (
        pack(TAG_BULK, session, &[&tag_bytes]),
        Some(Bulk::Whole(whole)),
    )
}

/// Receives into `into` the large frame whose announcement (its frame
/// part: the first parts and the frame's tag) came from `source`, and
/// returns its tag. Blocking: the announcement's sender sends the rest
/// right after. `None` if the announcement is malformed or MPI failed to
/// receive the rest.
fn receive_bulk(
    comm: &mpi::topology::SimpleCommunicator,
    source: i32,
    announced: &[u8],
    into: &mut Vec<u8>,
) -> Option<u32> {
    let at = announced.len().checked_sub(4)?;
    let (head, tag) = announced.split_at(at);
    let tag = u32::from_le_bytes(tag.try_into().ok()?);
    let (message, status) = comm
        .process_at_rank(source)
        .matched_probe_with_tag(MPI_TAG_BULK);
    let count = status.count(u8::equivalent_datatype());
    into.clear();
    into.reserve(head.len() + usize::try_from(count).unwrap_or(0));
    into.extend_from_slice(head);
    crate::sys::mpi::receive_appended(message, count, into).then_some(tag)
}

/// Probing with back-off: spin for `spin` after the last message, then
/// sleep, doubling from 10 µs up to `max_nap`. While it spins it yields
/// the CPU between two probes if `yielding`; otherwise it leaves that to
/// MPI, whose progress engine yields in each call when the job has more
/// ranks than the host has cores (OpenMPI's `mpi_yield_when_idle`, set
/// under oversubscription), as its own blocking receive does.
struct Backoff {
    last: Instant,
    nap: Duration,
    spin: Duration,
    max_nap: Duration,
    yielding: bool,
    /// Probes since the last message: the clock is read every
    /// [`CLOCK_EVERY`] of them while spinning (a probe is a few tens of
    /// nanoseconds; so is a read of the clock).
    probes: u32,
}

/// How many probes a spinning [`Backoff`] makes per look at the clock.
const CLOCK_EVERY: u32 = 16;

/// A [`Backoff`]'s first nap.
const FIRST_NAP: Duration = Duration::from_micros(10);

impl Backoff {
    fn new(spin: Duration, max_nap: Duration, yielding: bool) -> Backoff {
        Backoff {
            last: Instant::now(),
            nap: FIRST_NAP,
            spin,
            max_nap,
            yielding,
            probes: 0,
        }
    }

    fn reset(&mut self) {
        self.last = Instant::now();
        self.nap = FIRST_NAP;
        self.probes = 0;
    }

    fn spinning(&self) -> bool {
        self.last.elapsed() < self.spin
    }

    fn snooze(&mut self) {
        self.probes = self.probes.wrapping_add(1);
        // Not napped since the last message: spinning, until a look at
        // the clock says the spin is over.
        let spin = self.nap == FIRST_NAP && (self.probes % CLOCK_EVERY != 0 || self.spinning());
        if spin {
            if self.yielding {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
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
    outbox: VecDeque<Outgoing>,
    /// Answers still due.
    due: usize,
    sessions: HashMap<u32, Session>,
    /// Threads waiting for their answers that make the MPI calls
    /// themselves meanwhile ([`Drive`]); the transport's thread sleeps.
    drivers: usize,
    /// When the last driver left with its answer: it is likely back soon
    /// (`apply` in a loop, the next chunk of a map), so the thread leaves
    /// the link to it for [`DUE_NAP`] more.
    driven: Option<Instant>,
    /// Rank 0 is exiting: the thread sends what is queued, waits for the
    /// answers due (up to [`FINISH_WAIT`]) and ends.
    finishing: bool,
    /// The thread waits without a timeout: a new frame must wake it. Up to
    /// [`IDLE_WINDOW`] after its last work it naps instead, so that the
    /// frames of a caller that will drive its own answer (`apply` in a
    /// loop) cost no wake-up.
    asleep: bool,
    /// The answers of tasks run alone ([`RankSession::run_alone`]) whose
    /// threads stopped making the calls themselves (a long task), by
    /// (session, chunk id): whoever receives one leaves it here.
    claims: HashMap<(u32, u64), Claim>,
}

/// A task run alone, whose answer any thread may receive.
#[derive(Debug)]
enum Claim {
    /// Its thread waits for it ([`Link`]'s `claimed`).
    Waiting,
    /// Its answer: (tag, frame bytes).
    Answered(u32, Vec<u8>),
    /// Its thread left (the session was stopped): the answer is dropped.
    Abandoned,
}

/// Rank 0's side of the transport: the queue of frames, the right to make
/// MPI calls, and the thread that makes them when no waiting thread does.
#[derive(Debug, Default)]
struct Link {
    state: Mutex<LinkState>,
    changed: Condvar,
    /// Held for every MPI call after the start: the sends in progress and
    /// the receive posted for the next answer.
    /// Taken after `state`'s lock is released, never the other way.
    calls: Mutex<Calls>,
    /// Sends in progress (`calls`' length, readable under `state`).
    sending: AtomicUsize,
    /// Frames in the outbox (changed under `state`'s lock, read without
    /// it: a round with nothing queued takes no lock).
    queued: AtomicUsize,
    thread: Mutex<Option<std::thread::JoinHandle<bool>>>,
    next_session: AtomicU32,
    /// Signalled when a claimed answer arrives or a session stops.
    claimed: Condvar,
    /// Rank 0 is exiting (set before the serving ranks are told to
    /// finish): no task starts alone any more.
    finishing: AtomicBool,
}

/// Rank 0's requests in progress (under [`Link`]'s `calls`).
#[derive(Debug, Default)]
struct Calls {
    sending: Vec<OwnedSend>,
    /// The outbox's frames being started (kept for its allocation).
    batch: VecDeque<Outgoing>,
    /// The next answer's receive, from any rank (posted at the first
    /// round).
    answer: Option<OwnedRecv>,
    /// A task run alone is built here when it is sent with a blocking
    /// send ([`EAGER`]; kept for its allocation).
    out: Vec<u8>,
}

static LINK: OnceLock<Link> = OnceLock::new();

fn link() -> &'static Link {
    LINK.get_or_init(Link::default)
}

impl Link {
    /// Queues a frame; `answered`: one answer is due for it.
    fn push(&self, frame: Outgoing, answered: bool) -> Result<()> {
        let mut st = lock(&self.state);
        if st.finishing {
            return Err(Error::Closed);
        }
        st.outbox.push_back(frame);
        self.queued.store(st.outbox.len(), Ordering::SeqCst);
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
        let mut backoff = Backoff::new(DUE_SPIN, DUE_NAP, true);
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
                    let handed = st.driven.is_some_and(|at| at.elapsed() < DUE_NAP);
                    if st.drivers == 0 && !handed && (work || backoff.spinning()) {
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
            if self.round(&mut lock(&self.calls), None) {
                backoff.reset();
            } else {
                backoff.snooze();
            }
        }
    }

    /// One round of MPI calls: starts the queued sends, tests those in
    /// progress, receives and delivers every answer that arrived (or, with
    /// `enough`, stops after the answer that made it `true`). `true` if
    /// anything moved.
    fn round(&self, calls: &mut Calls, enough: Option<&dyn Fn() -> bool>) -> bool {
        self.round_taking(calls, enough, &mut |_, _, _| false)
    }

    /// [`round`](Link::round), where each answer goes first to `take`
    /// (tag, session, frame bytes, read where they were received): one it
    /// takes (`true`) is not delivered, and the round ends after it.
    fn round_taking(
        &self,
        calls: &mut Calls,
        enough: Option<&dyn Fn() -> bool>,
        take: &mut dyn FnMut(u32, u32, &[u8]) -> bool,
    ) -> bool {
        let comm = launch::comm();
        let mut active = self.start_sends(&comm, calls);
        if !calls.sending.is_empty() {
            calls.sending.retain_mut(|send| !send.test());
            self.sending.store(calls.sending.len(), Ordering::Release);
        }
        // Posted after the sends: its cost overlaps their answers' way.
        let answer = calls.answer.get_or_insert_with(|| OwnedRecv::new(SMALL));
        answer.post(&comm, None, MPI_TAG);
        while let Some((source, message)) = answer.test() {
            let mut taken = false;
            let frame = match split(message) {
                Some((announced, TAG_BULK, session)) => {
                    let mut bytes = Vec::new();
                    receive_bulk(&comm, source, announced, &mut bytes)
                        .map(|tag| (tag, session, bytes))
                }
                Some((bytes, tag, session)) => {
                    taken = take(tag, session, bytes);
                    (!taken).then(|| (tag, session, bytes.to_vec()))
                }
                None => None,
            };
            // A malformed answer is dropped (the rank broke the protocol).
            if let Some((tag, session, bytes)) = frame {
                taken = take(tag, session, &bytes);
                if !taken {
                    self.deliver(tag, session, bytes);
                }
            }
            active = true;
            if taken || enough.is_some_and(|enough| enough()) {
                // The next round posts it again (an answer that comes
                // meanwhile waits in MPI's queue).
                break;
            }
            answer.post(&comm, None, MPI_TAG);
        }
        active
    }

    /// Starts the sends of the queued frames; `true` if there were any.
    fn start_sends(&self, comm: &mpi::topology::SimpleCommunicator, calls: &mut Calls) -> bool {
        if self.queued.load(Ordering::SeqCst) == 0 {
            return false;
        }
        {
            let mut st = lock(&self.state);
            std::mem::swap(&mut st.outbox, &mut calls.batch);
            self.queued.store(0, Ordering::SeqCst);
        }
        if calls.batch.is_empty() {
            return false;
        }
        for frame in calls.batch.drain(..) {
            calls
                .sending
                .push(OwnedSend::start(comm, frame.rank, MPI_TAG, frame.message));
            if let Some(bulk) = frame.bulk {
                calls.sending.push(OwnedSend::start_shared(
                    comm,
                    frame.rank,
                    MPI_TAG_BULK,
                    bulk,
                ));
            }
        }
        self.sending.store(calls.sending.len(), Ordering::Release);
        true
    }

    /// The right to make MPI calls, if the thread that holds it lets it go
    /// within a few turns (a round of the transport's thread); `None` if
    /// it does not (another thread waits for its own answer).
    fn calls_soon(&self) -> Option<std::sync::MutexGuard<'_, Calls>> {
        for _ in 0..64 {
            match self.calls.try_lock() {
                Ok(calls) => return Some(calls),
                Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
                Err(TryLockError::WouldBlock) => std::hint::spin_loop(),
            }
        }
        None
    }

    /// Registers the answer of a task run alone, still due, for whoever
    /// receives it (the caller holds `calls` and lets them go after).
    fn claim(&self, key: (u32, u64), claim: Claim) {
        let mut st = lock(&self.state);
        st.due += 1;
        st.claims.insert(key, claim);
        // The transport's thread takes over the calls.
        let wake = st.drivers == 0;
        drop(st);
        if wake {
            self.changed.notify_all();
        }
    }

    /// Starts the queued sends now if no other thread is making MPI calls:
    /// a frame leaves at once rather than at the next round.
    fn flush(&self) {
        if let Ok(mut calls) = self.calls.try_lock() {
            self.start_sends(&launch::comm(), &mut calls);
        }
    }

    /// An answer from a serving rank: to its session's pool.
    fn deliver(&self, tag: u32, session: u32, bytes: Vec<u8>) {
        let target = {
            let mut st = lock(&self.state);
            st.due = st.due.saturating_sub(1);
            let claim = match protocol::answer_id(tag, &bytes) {
                Some(id) if !st.claims.is_empty() => {
                    Some(id).filter(|id| st.claims.contains_key(&(session, *id)))
                }
                _ => None,
            };
            if let Some(id) = claim {
                // A task run alone: its thread takes the answer.
                let waiting = matches!(st.claims.get(&(session, id)), Some(Claim::Waiting));
                if waiting {
                    st.claims.insert((session, id), Claim::Answered(tag, bytes));
                } else {
                    st.claims.remove(&(session, id));
                }
                drop(st);
                if waiting {
                    self.claimed.notify_all();
                }
                return;
            }
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
                st.driven = self.progress.then(Instant::now);
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
        // Set by a round of this thread's that delivered the awaited answer.
        let got = std::cell::Cell::new(false);
        let enough = || {
            let done = progressed();
            got.set(done);
            done
        };
        let mut turn = 0u32;
        loop {
            turn = turn.wrapping_add(1);
            // Busy (another driver, or the thread finishing a round): the
            // next turn is soon, after a yield (the holder may be waiting
            // for a core). A round of this thread's own makes MPI calls,
            // which yield when the ranks oversubscribe the cores: nothing
            // more is added between two.
            let busy = match self.calls.try_lock() {
                Ok(mut calls) => {
                    self.round(&mut calls, Some(&enough));
                    false
                }
                Err(TryLockError::Poisoned(poisoned)) => {
                    self.round(&mut poisoned.into_inner(), Some(&enough));
                    false
                }
                Err(TryLockError::WouldBlock) => true,
            };
            // Another thread may have delivered it (seen at once when it
            // held the link, else within a few turns).
            if got.get() || ((busy || turn % 8 == 0) && progressed()) {
                driving.progress = true;
                return;
            }
            if Instant::now() >= until {
                return;
            }
            if busy {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
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
        link().ensure_thread()?;
        self.send(TAG_START, &[init])
    }

    fn send(&self, tag: u32, parts: &[&[u8]]) -> Result<()> {
        self.send_frame(tag, parts, None)
    }

    fn send_task(&self, id: u64, body: &Arc<Vec<u8>>) -> Result<()> {
        ToWorker::Task { id, body }.with_parts(|tag, parts| self.send_frame(tag, parts, Some(body)))
    }

    fn run_alone(&self, id: u64, body: &[u8], answer: &mut dyn FnMut(u32, &[u8])) -> Alone {
        let len = ToWorker::Task { id, body }
            .with_parts(|_, parts| parts.iter().map(|p| p.len()).sum::<usize>() + TRAILER);
        if len > SMALL {
            return Alone::NotSent;
        }
        let link = link();
        let Some(mut calls) = link.calls_soon() else {
            return Alone::NotSent;
        };
        // Seen under `calls`: a finish that set it may have told the
        // ranks already (the answer would never come).
        if link.finishing.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst) {
            return Alone::Failed(Error::Closed);
        }
        let comm = launch::comm();
        let task = ToWorker::Task { id, body };
        if len <= EAGER {
            let out = &mut calls.out;
            task.with_parts(|tag, parts| pack_into(out, tag, self.session, parts));
            comm.process_at_rank(self.rank)
                .send_with_tag(&calls.out[..], MPI_TAG);
        } else {
            let message = task.with_parts(|tag, parts| pack(tag, self.session, parts));
            calls
                .sending
                .push(OwnedSend::start(&comm, self.rank, MPI_TAG, message));
            link.sending.store(calls.sending.len(), Ordering::Release);
        }
        let key = (self.session, id);
        let got = std::cell::Cell::new(false);
        let mut take = |tag: u32, session: u32, bytes: &[u8]| {
            let mine = session == key.0 && protocol::answer_id(tag, bytes) == Some(key.1);
            if mine {
                answer(tag, bytes);
                got.set(true);
            }
            mine
        };
        // This thread makes every call until its answer came, or
        // DRIVE_SPIN passed (other threads' frames and answers go through
        // its rounds meanwhile): the round trip is one thread's send and
        // receive, as a raw ping-pong's.
        // The clock is first read after a few turns: an answer that came
        // by then cost no read.
        let mut until = None;
        let mut turn = 0u32;
        loop {
            link.round_taking(&mut calls, None, &mut take);
            if got.get() {
                return Alone::Answered;
            }
            if self.closed.load(Ordering::SeqCst) {
                link.claim(key, Claim::Abandoned);
                return Alone::Failed(Error::Closed);
            }
            turn = turn.wrapping_add(1);
            if turn % 16 == 0 {
                let now = Instant::now();
                if now >= *until.get_or_insert(now + DRIVE_SPIN) {
                    break;
                }
            }
            std::hint::spin_loop();
        }
        // A long task: the transport's thread (or whoever makes the
        // calls) receives the answer and leaves it here.
        link.claim(key, Claim::Waiting);
        drop(calls);
        let mut st = lock(&link.state);
        loop {
            if let Some(Claim::Answered(..)) = st.claims.get(&key) {
                if let Some(Claim::Answered(tag, bytes)) = st.claims.remove(&key) {
                    drop(st);
                    answer(tag, &bytes);
                    return Alone::Answered;
                }
            }
            if self.closed.load(Ordering::SeqCst) {
                st.claims.insert(key, Claim::Abandoned);
                return Alone::Failed(Error::Closed);
            }
            st = link.claimed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn stop(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let link = link();
        lock(&link.state).sessions.remove(&self.session);
        // A thread waiting for a task of this session run alone leaves.
        link.claimed.notify_all();
        let stop = Outgoing {
            rank: self.rank,
            message: pack(TAG_STOP, self.session, &[]),
            bulk: None,
        };
        let _ = link.push(stop, false);
    }
}

impl RankSession {
    /// Queues a frame (answered) and starts its sending if the link is
    /// free; `shared`: its last part, which a large frame sends as it is.
    fn send_frame(&self, tag: u32, parts: &[&[u8]], shared: Option<&Arc<Vec<u8>>>) -> Result<()> {
        let size = parts.iter().map(|p| p.len() as u64).sum::<u64>() + TRAILER as u64;
        if size > MPI_MAX {
            return Err(Error::MessageTooLarge {
                size,
                limit: MPI_MAX,
            });
        }
        let (message, bulk) = messages(tag, self.session, parts);
        let bulk = bulk.map(|bulk| match (bulk, shared) {
            (Bulk::Last(_), Some(shared)) => Arc::clone(shared),
            (bulk, _) => Arc::new(bulk.bytes().to_vec()),
        });
        let link = link();
        link.push(
            Outgoing {
                rank: self.rank,
                message,
                bulk,
            },
            true,
        )?;
        link.flush();
        Ok(())
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
            link.finishing.store(true, Ordering::SeqCst);
            {
                let mut st = lock(&link.state);
                for info in &world.serving {
                    st.outbox.push_back(Outgoing {
                        rank: info.rank,
                        message: pack(TAG_FINISH, 0, &[]),
                        bulk: None,
                    });
                }
                link.queued.store(st.outbox.len(), Ordering::SeqCst);
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
            // Every answer is in: the receive posted for the next one is
            // cancelled before MPI is finalized.
            lock(&link.calls).answer = None;
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
    let mut server = Server {
        world,
        sessions: HashMap::new(),
        cached: None,
        out: Vec::new(),
        out_fds: Vec::new(),
    };
    let mut backoff = Backoff::new(SPIN, MAX_NAP, false);
    let mut next = OwnedRecv::new(SMALL);
    // Large chunks are received here (kept for its allocation).
    let mut bulk = Vec::new();
    loop {
        next.post(&comm, Some(0), MPI_TAG);
        let mut finished = false;
        for (session, served) in &mut server.sessions {
            if let Some(fan) = &mut served.fan {
                finished |= fan.answer_finished(*session, &answer);
            }
        }
        if finished {
            backoff.reset();
        }
        let Some((_, message)) = next.test() else {
            backoff.snooze();
            continue;
        };
        backoff.reset();
        let ended = match split(message) {
            Some((announced, TAG_BULK, session)) => {
                match receive_bulk(&comm, 0, announced, &mut bulk) {
                    Some(tag) => server.handle(tag, session, &bulk),
                    None => Some(2),
                }
            }
            Some((bytes, tag, session)) => server.handle(tag, session, bytes),
            None => Some(2),
        };
        if let Some(code) = ended {
            return code;
        }
        if bulk.capacity() > BULK_KEPT {
            bulk = Vec::new();
        }
    }
}

/// Sends a serving rank's answer to rank 0 (blocking: rank 0 keeps
/// receiving while answers are due).
fn answer(session: u32, reply: &FromWorker<'_>) {
    thread_local! {
        /// The serving rank's small answers are built here (one thread).
        static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let root = launch::comm();
    let root = root.process_at_rank(0);
    // Only a start refusal has no parts, and it is never sent here.
    let _ = reply.with_parts(|tag, parts| {
        if parts.iter().map(|p| p.len()).sum::<usize>() + TRAILER <= SMALL {
            OUT.with_borrow_mut(|out| {
                pack_into(out, tag, session, parts);
                root.send_with_tag(&out[..], MPI_TAG);
            });
            return;
        }
        let (message, bulk) = messages(tag, session, parts);
        root.send_with_tag(&message[..], MPI_TAG);
        if let Some(bulk) = bulk {
            root.send_with_tag(bulk.bytes(), MPI_TAG_BULK);
        }
    });
}

/// A serving rank's sessions and the buffers its chunks reuse.
struct Server<'a> {
    world: &'a World,
    sessions: HashMap<u32, Served>,
    cached: Option<(String, &'static registry::Entry)>,
    out: Vec<u8>,
    out_fds: Vec<std::os::fd::OwnedFd>,
}

impl Server<'_> {
    /// One message from rank 0 (a frame with its trailer); `Some` exit
    /// code when the loop ends.
    fn handle(&mut self, tag: u32, session: u32, bytes: &[u8]) -> Option<i32> {
        match tag {
            TAG_FINISH => return Some(0),
            TAG_STOP => {
                if let Some(Served { fan: Some(fan) }) = self.sessions.remove(&session) {
                    // Its chunks still running are answered (rank 0
                    // counts on it) and dropped there.
                    fan.stop(session, &answer);
                }
            }
            TAG_START => {
                let workers = self.world.workers;
                let started = codec::decode_plain::<WorkerInit>(bytes).and_then(|init| {
                    if workers > 1 {
                        // The initializer runs in each local worker.
                        LocalFanOut::new(workers as usize, init).map(Some)
                    } else {
                        worker::run_initializer(&init, Vec::new()).map(|()| None)
                    }
                });
                match started {
                    Ok(fan) => {
                        self.sessions.insert(session, Served { fan });
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
                let Some(ToWorker::Task { id, body }) = ToWorker::parse(tag, bytes) else {
                    return Some(2);
                };
                let Some(served) = self.sessions.get_mut(&session) else {
                    let failure = TaskFailure::from_error(Error::Closed);
                    answer(session, &FromWorker::TaskFailed { id, failure });
                    return None;
                };
                if let Some(fan) = &mut served.fan {
                    if let Err(err) = fan.submit(id, body) {
                        let failure = TaskFailure::from_error(err);
                        answer(session, &FromWorker::TaskFailed { id, failure });
                    }
                    return None;
                }
                // Results travel back to rank 0: handles are refused there too.
                let (cached, out, out_fds) = (&mut self.cached, &mut self.out, &mut self.out_fds);
                let ran = codec::encoding_for(codec::Peer::MpiRank, || {
                    worker::run_chunk(cached, body, Vec::new(), out, out_fds)
                });
                self.out_fds.clear();
                let reply = match ran {
                    Some(Ok(())) => FromWorker::Result {
                        id,
                        outcomes: &self.out,
                    },
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
        None
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
