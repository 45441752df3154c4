//! A job: the results of one call (`map`, `apply_async`, an `imap`...),
//! chunk by chunk, as the reader thread delivers them and the caller's
//! thread takes them.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;

use super::arena::Lease;
use crate::error::Error;

/// The pool's locks are never left inconsistent by a panic (every change
/// is one step), so a poisoned one is used as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one chunk came back as.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The worker's result frame's bytes (outcomes of the items start
    /// at `offset`) and descriptors.
    Done {
        bytes: Vec<u8>,
        fds: Vec<OwnedFd>,
        offset: usize,
        pid: u32,
    },
    /// The worker's result, in its output arena (released when dropped).
    Shared { lease: Lease, pid: u32 },
    /// Every item of the chunk fails with this error.
    Failed(Error),
}

impl Outcome {
    /// A few results in a frame: not worth waking a lazy consumer for
    /// (see [`Job::take_lazy`]).
    fn is_small(&self) -> bool {
        match self {
            Outcome::Done {
                bytes, fds, offset, ..
            } => fds.is_empty() && bytes.len().saturating_sub(*offset) < LAZY_SMALL,
            Outcome::Shared { .. } | Outcome::Failed(_) => false,
        }
    }

    /// The chunk's encoded outcomes, as a worker wrote them (for a
    /// serving MPI rank that passes a local worker's outcomes on).
    #[cfg(feature = "mpi")]
    pub(crate) fn into_bytes(self) -> Result<Vec<u8>, Error> {
        match self {
            Outcome::Done {
                mut bytes,
                fds,
                offset,
                ..
            } => {
                if !fds.is_empty() {
                    return Err(Error::Encode {
                        message: crate::codec::handles_refusal(crate::codec::Peer::MpiRank),
                    });
                }
                bytes.drain(..offset.min(bytes.len()));
                Ok(bytes)
            }
            Outcome::Shared { lease, .. } => lease.bytes().map(<[u8]>::to_vec),
            Outcome::Failed(err) => Err(err),
        }
    }
}

/// One chunk of a job: where its items start in the job's input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkInfo {
    pub(crate) index: usize,
    pub(crate) first: usize,
    pub(crate) count: usize,
}

#[derive(Debug, Default)]
pub(crate) struct JobState {
    /// Outcome of chunk `i`, until the consumer takes it.
    pub(crate) outcomes: Vec<Option<(ChunkInfo, Outcome)>>,
    /// Chunk indices in the order they completed (for unordered consumers).
    pub(crate) completed: VecDeque<usize>,
    /// Chunks submitted and completed (taken or not).
    pub(crate) submitted: usize,
    pub(crate) done: usize,
    /// Nobody will read the results: drop queued chunks and late results.
    pub(crate) cancelled: bool,
    /// Every chunk was submitted: the job is finished once `done ==
    /// submitted` (an `imap`'s job is never sealed).
    pub(crate) sealed: bool,
    /// Run once when the sealed job is finished, by the thread that
    /// completes its last chunk (the reader): each must be quick and
    /// never block (a send on a channel, a condvar, a waker).
    pub(crate) on_finished: Hooks,
    /// Woken at each chunk's completion (an async consumer's).
    pub(crate) waker: Option<Waker>,
    /// Its results are delivered to callbacks: dropping its owner does not
    /// cancel it.
    pub(crate) detached: bool,
    /// The transport its chunks went to, when a waiting thread makes it
    /// progress itself instead of sleeping (see [`Drive`]).
    pub(crate) driver: Option<&'static dyn Drive>,
    /// Threads waiting in [`Job::wait`]: a completion with none skips the
    /// wake-up.
    waiting: usize,
    /// The chunk a [`take_lazy`](Job::take_lazy) consumer waits for.
    lazy: Option<usize>,
    /// Outcomes delivered and not taken yet.
    untaken: usize,
}

/// A transport that a thread waiting for a job's results drives itself:
/// it polls for its own answers (the pool on MPI ranks), which saves the
/// crossing of two threads that a wake-up costs. The wait falls back to
/// the job's condition variable when [`drive`](Drive::drive) returns
/// without progress.
pub(crate) trait Drive: Sync {
    /// Makes progress until `progressed()`, `deadline`, or a short while
    /// has passed (never long: the transport's own thread takes over).
    fn drive(&self, progressed: &dyn Fn() -> bool, deadline: Option<Instant>);
}

impl std::fmt::Debug for dyn Drive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Drive")
    }
}

/// A lazy consumer is woken once this many outcomes wait for it (or for
/// a large one, a failure, or the job's end).
const LAZY_BATCH: usize = 64;

/// Result bytes under which an outcome is worth no wake-up of its own.
const LAZY_SMALL: usize = 64 << 10;

/// Closures run when a job is finished.
#[derive(Default)]
pub(crate) struct Hooks(pub(crate) Vec<Box<dyn FnOnce() + Send>>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hooks({})", self.0.len())
    }
}

impl JobState {
    /// Sealed, and every chunk has an outcome.
    pub(crate) fn finished(&self) -> bool {
        self.sealed && self.done >= self.submitted
    }
}

/// The results of one call (`map`, `apply_async`, an `imap`...).
#[derive(Debug, Default)]
pub(crate) struct Job {
    pub(crate) state: Mutex<JobState>,
    pub(crate) cond: Condvar,
    /// Its consumer wants all of its several results, not each as soon as
    /// it exists (a `map`): the reader may let them wait in the sockets of
    /// workers that run long tasks, and read them in batches.
    pub(crate) batched: bool,
}

impl Job {
    /// A job whose results are read in batches (see [`Job::batched`]).
    pub(crate) fn batched() -> Job {
        Job {
            batched: true,
            ..Job::default()
        }
    }

    pub(crate) fn complete(&self, info: ChunkInfo, outcome: Outcome) {
        let mut st = lock(&self.state);
        st.done += 1;
        if st.cancelled {
            return;
        }
        if st.outcomes.len() <= info.index {
            st.outcomes.resize_with(info.index + 1, || None);
        }
        let small = outcome.is_small();
        st.outcomes[info.index] = Some((info, outcome));
        st.completed.push_back(info.index);
        st.untaken += 1;
        // A lazy consumer (an ordered map) sleeps through small outcomes:
        // it decodes them in a batch, and the parent does not pay a
        // thread wake-up per task while workers run long ones.
        // Nobody on the condition variable (the consumer is not there
        // yet, or drives the transport itself): no wake-up, whose system
        // call is a good part of a round trip on MPI ranks. Whoever waits
        // later looks at the state first, under this lock.
        let wake = st.waiting > usize::from(st.lazy.is_some())
            || (st.waiting > 0
                && match st.lazy {
                    None => true,
                    Some(i) => {
                        st.finished()
                            || (st.outcomes.get(i).is_some_and(Option::is_some)
                                && (!small || st.untaken >= LAZY_BATCH))
                    }
                });
        let waker = st.waker.take();
        let hooks = if st.finished() {
            std::mem::take(&mut st.on_finished.0)
        } else {
            Vec::new()
        };
        drop(st);
        if wake {
            self.cond.notify_all();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
        for hook in hooks {
            hook();
        }
    }

    pub(crate) fn cancel(&self) {
        let mut st = lock(&self.state);
        if st.detached {
            return;
        }
        st.cancelled = true;
        st.outcomes.clear();
        st.completed.clear();
        st.untaken = 0;
        st.waker = None;
        let hooks = std::mem::take(&mut st.on_finished.0);
        drop(st);
        // Dropped without running: nobody waits for this job any more.
        drop(hooks);
    }

    /// No chunk will be added: from now on the job is finished once every
    /// chunk has an outcome.
    pub(crate) fn seal(&self) {
        lock(&self.state).sealed = true;
    }

    /// Runs `hook` once the (sealed) job is finished: now, in this thread,
    /// if it is; otherwise in the thread that completes its last chunk.
    /// A cancelled job never runs it.
    pub(crate) fn on_finished(&self, hook: Box<dyn FnOnce() + Send>) {
        let mut st = lock(&self.state);
        if st.cancelled {
            return;
        }
        if !st.finished() {
            st.on_finished.0.push(hook);
            return;
        }
        drop(st);
        hook();
    }

    /// From now on [`cancel`](Job::cancel) does nothing: the job runs to
    /// its end for its callbacks.
    pub(crate) fn detach(&self) {
        lock(&self.state).detached = true;
    }

    /// `true` if the sealed job is finished; otherwise `waker` is woken at
    /// the next chunk's completion.
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn poll_finished(&self, waker: &Waker) -> bool {
        let mut st = lock(&self.state);
        if st.finished() {
            return true;
        }
        set_waker(&mut st.waker, waker);
        false
    }

    /// Takes the outcome of chunk `index` (or, with `None`, of any chunk)
    /// if there is one; otherwise `waker` is woken at the next completion.
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn poll_take(
        &self,
        index: Option<usize>,
        waker: &Waker,
    ) -> Option<(ChunkInfo, Outcome)> {
        let mut st = lock(&self.state);
        let found = Job::find(&mut st, index);
        if found.is_none() {
            set_waker(&mut st.waker, waker);
        }
        found
    }

    fn find(st: &mut JobState, index: Option<usize>) -> Option<(ChunkInfo, Outcome)> {
        let found = match index {
            Some(i) => st.outcomes.get_mut(i).and_then(Option::take),
            None => loop {
                let Some(i) = st.completed.pop_front() else {
                    break None;
                };
                if let Some(o) = st.outcomes.get_mut(i).and_then(Option::take) {
                    break Some(o);
                }
            },
        };
        if found.is_some() {
            st.untaken = st.untaken.saturating_sub(1);
        }
        found
    }

    /// Whether the sealed job is finished.
    pub(crate) fn is_finished(&self) -> bool {
        lock(&self.state).finished()
    }

    /// Waits until chunk `index` (or, with `None`, any chunk) has an
    /// outcome and takes it. `None` on timeout.
    pub(crate) fn take(
        &self,
        index: Option<usize>,
        deadline: Option<Instant>,
    ) -> Option<(ChunkInfo, Outcome)> {
        let mut st = lock(&self.state);
        loop {
            let found = Job::find(&mut st, index);
            if found.is_some() {
                return found;
            }
            st = self.wait(st, deadline)?;
        }
    }

    /// [`take`](Job::take) of chunk `index` for a consumer that takes the
    /// chunks in order and only wants them all: it is woken when a batch of
    /// outcomes waits (see [`LAZY_BATCH`]), a large outcome or a failure
    /// arrived, or the job is finished, not at every small outcome.
    pub(crate) fn take_lazy(
        &self,
        index: usize,
        deadline: Option<Instant>,
    ) -> Option<(ChunkInfo, Outcome)> {
        let mut st = lock(&self.state);
        loop {
            let found = Job::find(&mut st, Some(index));
            if found.is_some() {
                return found;
            }
            st.lazy = Some(index);
            let next = self.wait(st, deadline);
            match next {
                Some(next) => st = next,
                None => {
                    lock(&self.state).lazy = None;
                    return None;
                }
            }
            st.lazy = None;
        }
    }

    /// Waits until every submitted chunk has an outcome; `false` on timeout.
    pub(crate) fn wait_all(&self, deadline: Option<Instant>) -> bool {
        let mut st = lock(&self.state);
        while st.done < st.submitted {
            match self.wait(st, deadline) {
                Some(next) => st = next,
                None => return false,
            }
        }
        true
    }

    /// Waits for the next completion; `None` once `deadline` has passed.
    fn wait<'a>(
        &'a self,
        st: MutexGuard<'a, JobState>,
        deadline: Option<Instant>,
    ) -> Option<MutexGuard<'a, JobState>> {
        let mut st = match st.driver {
            Some(driver) => {
                let seen = st.done;
                drop(st);
                driver.drive(&|| lock(&self.state).done != seen, deadline);
                let st = lock(&self.state);
                // A completion while this thread drove did not wait on
                // the condition variable: it is seen here.
                if st.done != seen {
                    return Some(st);
                }
                st
            }
            None => st,
        };
        let left = match deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                Some(left)
            }
        };
        st.waiting += 1;
        let mut st = match left {
            None => self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
            Some(left) => {
                self.cond
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
        st.waiting -= 1;
        Some(st)
    }
}

/// Keeps the newest waker (a future is woken through the last one it was
/// polled with).
pub(crate) fn set_waker(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(old) if old.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

/// Cancels a job when the call that owns it returns or unwinds.
#[derive(Debug)]
pub(crate) struct JobGuard(pub(crate) Arc<Job>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
