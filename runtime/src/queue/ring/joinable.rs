//! The accounting of joinable queues: `task_done` and `join`.
//!
//! The unfinished-task count is not a counter that `put` increments: a
//! producer killed between reserving its slot and counting would leave
//! it off by one, whichever order the two steps come in. It is derived
//! from three monotonic numbers instead,
//!
//! ```text
//! unfinished = positions reserved - tombstones - task_done calls,
//! ```
//!
//! where every reserved position ends exactly one way: published (a
//! consumer takes it; the user calls `task_done`) or tombstoned (by the
//! consumer who gave up on a dead or stalled writer, or by the writer
//! itself, or dropped by `recover`), and the one who tombstones it
//! counts it after the winning CAS. A put in progress counts as
//! unfinished, as in Python (whose `put` counts before its feeder
//! thread sends).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{H_JOIN_SEQ, H_JOINABLE, Ring, W_DONE, W_TAIL, W_TOMBS};
use crate::error::{Error, Result};
use crate::sys::futex;

impl Ring {
    /// This ring is a joinable queue's (it counts finished tasks).
    fn joinable(&self) -> bool {
        self.u32w(H_JOINABLE).load(Ordering::Relaxed) != 0
    }

    /// Unfinished tasks, never below the true value at the moment `tail` is
    /// read: `done` and `tombs` only grow and are read first.
    fn unfinished(&self) -> u64 {
        let done = self.u64w(W_DONE).load(Ordering::SeqCst);
        let tombs = self.u64w(W_TOMBS).load(Ordering::SeqCst);
        let tail = self.u64w(W_TAIL).load(Ordering::SeqCst);
        self.count(tail).saturating_sub(tombs).saturating_sub(done)
    }

    pub(super) fn count_tombstone(&self) {
        self.u64w(W_TOMBS).fetch_add(1, Ordering::SeqCst);
        if self.joinable() {
            self.wake_joiners_if_done();
        }
    }

    fn wake_joiners_if_done(&self) {
        if self.unfinished() == 0 {
            let word = self.u32w(H_JOIN_SEQ);
            word.fetch_add(1, Ordering::SeqCst);
            futex::wake(word, u32::MAX);
        }
    }

    pub(crate) fn task_done(&self) -> Result<()> {
        let done = self.u64w(W_DONE);
        let mut cur = done.load(Ordering::SeqCst);
        loop {
            let tombs = self.u64w(W_TOMBS).load(Ordering::SeqCst);
            let put = self
                .count(self.u64w(W_TAIL).load(Ordering::SeqCst))
                .saturating_sub(tombs);
            if cur >= put {
                return Err(Error::misuse(
                    "task_done() called more times than there were items put",
                ));
            }
            match done.compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.wake_joiners_if_done();
        Ok(())
    }

    pub(crate) fn join(&self, deadline: Option<Instant>) -> Result<()> {
        // Lost wake-ups: `v` is read before the count; whoever brings the
        // count to zero bumps `word` after its own update, so either we see
        // zero or `futex::wait` sees a changed word.
        let word = self.u32w(H_JOIN_SEQ);
        loop {
            let v = word.load(Ordering::SeqCst);
            if self.unfinished() == 0 {
                return Ok(());
            }
            let mut slice = Duration::from_millis(100);
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Timeout);
                }
                slice = slice.min(left);
            }
            futex::wait(word, v, Some(slice));
        }
    }
}
