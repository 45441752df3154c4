//! A job: the results of one call (`map`, `apply_async`, an `imap`...),
//! chunk by chunk, as the reader thread delivers them and the caller's
//! thread takes them.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
                        message: codec_refusal(),
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

/// Why results that carry handles do not go back to rank 0.
#[cfg(feature = "mpi")]
fn codec_refusal() -> String {
    crate::codec::off_host(true, || {
        crate::codec::off_host_refusal(|| "handle".to_string())
    })
    .unwrap_or_default()
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
        drop(st);
        self.cond.notify_all();
    }

    pub(crate) fn cancel(&self) {
        let mut st = lock(&self.state);
        st.cancelled = true;
        st.outcomes.clear();
        st.completed.clear();
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
            let found = match index {
                Some(i) => st.outcomes.get_mut(i).and_then(Option::take),
                None => loop {
                    match st.completed.pop_front() {
                        None => break None,
                        Some(i) => {
                            if let Some(o) = st.outcomes.get_mut(i).and_then(Option::take) {
                                break Some(o);
                            }
                        }
                    }
                },
            };
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
        &self,
        st: MutexGuard<'a, JobState>,
        deadline: Option<Instant>,
    ) -> Option<MutexGuard<'a, JobState>> {
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

/// Cancels a job when the call that owns it returns or unwinds.
pub(crate) struct JobGuard(pub(crate) Arc<Job>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
