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
}

impl Job {
    pub(crate) fn complete(&self, info: ChunkInfo, outcome: Outcome) {
        let mut st = lock(&self.state);
        st.done += 1;
        if st.cancelled {
            return;
        }
        if st.outcomes.len() <= info.index {
            st.outcomes.resize_with(info.index + 1, || None);
        }
        st.outcomes[info.index] = Some((info, outcome));
        st.completed.push_back(info.index);
        let waker = st.waker.take();
        let hooks = if st.finished() {
            std::mem::take(&mut st.on_finished.0)
        } else {
            Vec::new()
        };
        drop(st);
        self.cond.notify_all();
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
        match index {
            Some(i) => st.outcomes.get_mut(i).and_then(Option::take),
            None => loop {
                let i = st.completed.pop_front()?;
                if let Some(o) = st.outcomes.get_mut(i).and_then(Option::take) {
                    return Some(o);
                }
            },
        }
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
        let st = match st.driver {
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
        match deadline {
            None => Some(self.cond.wait(st).unwrap_or_else(|p| p.into_inner())),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                Some(
                    self.cond
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0,
                )
            }
        }
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
