//! [`Barrier`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::deadline;
use crate::error::{Error, Result};
use crate::handle::{self, HandleWire, Kind, Parts, Received, new_block};
use crate::sys::arena::Block;
use crate::sys::futex;
use crate::sys::lock::{self as raw, Header, RawGuard};
use crate::sys::shm::LOCK_HEADER;

// The lock header (u32 words 0..4), the u32 words arrived, generation,
// broken and parties, then from byte 32 one u64 per waiting party: its
// process as a lock word names it (pid and start time, so that a party
// whose pid was reused is still seen dead), written and read under the
// lock.
const ARRIVED: usize = LOCK_HEADER / 4;
const GENERATION: usize = ARRIVED + 1;
const BROKEN: usize = ARRIVED + 2;
const PARTIES: usize = ARRIVED + 3;
/// The first party slot, as an index of u64 words.
const SLOTS: usize = 4;
const SLOTS_BYTE: usize = SLOTS * 8;

/// A rendezvous point for a fixed number of parties (processes or
/// threads): Python's `multiprocessing.Barrier` with std's shape.
///
/// A waiting party that dies (SIGKILL, a crash) breaks the barrier: every
/// other party, waiting now or arriving later, gets
/// [`Error::BrokenBarrier`] instead of hanging. So does a party whose
/// [`wait_timeout`](Barrier::wait_timeout) runs out (it gets
/// [`Error::Timeout`]), and [`abort`](Barrier::abort). A party that dies
/// *before* arriving cannot be told from a slow one: use `wait_timeout`.
///
/// # Examples
///
/// ```no_run
/// use multiproc::{process_fn, sync::Barrier, Process};
///
/// #[process_fn]
/// fn party(barrier: Barrier) -> bool {
///     barrier.wait().is_ok()
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let barrier = Barrier::new(3)?;
/// let mut procs: Vec<Process> = (0..2).map(|_| Process::new(party, (barrier.clone(),))).collect();
/// for p in &mut procs {
///     p.start()?;
/// }
/// barrier.wait()?; // the third party: all three go on together
/// for p in &mut procs {
///     p.join()?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Barrier {
    map: Arc<Block>,
}

/// What [`Barrier::wait`] tells a party.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierWaitResult(bool);

impl BarrierWaitResult {
    /// `true` for exactly one party per round: the last to arrive.
    pub fn is_leader(&self) -> bool {
        self.0
    }
}

impl Barrier {
    /// A barrier for `parties` parties.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `parties` is 0 or absurdly large;
    /// [`Error::Io`] if the shared memory cannot be created.
    pub fn new(parties: u32) -> Result<Barrier> {
        if parties == 0 || parties > 1 << 20 {
            return Err(Error::invalid("a barrier needs between 1 and 2^20 parties"));
        }
        let map = new_block::<Barrier>("multiproc-barrier", SLOTS_BYTE + parties as usize * 8, 8)?;
        map.atomics_u32()[PARTIES].store(parties, Ordering::Relaxed);
        Ok(Barrier { map })
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        &self.map.atomics_u32()[i]
    }

    fn header(&self) -> Header<'_> {
        self.map.lock_header()
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        &self.map.atomics_u64()[SLOTS + i]
    }

    fn lock(&self) -> RawGuard<'_> {
        loop {
            // Poisoning is irrelevant here: the state is repaired below by
            // breaking the barrier when a party is found dead.
            if let Some((guard, _)) = RawGuard::lock(self.header(), None) {
                return guard;
            }
        }
    }

    /// The number of parties.
    pub fn parties(&self) -> u32 {
        self.word(PARTIES).load(Ordering::Relaxed)
    }

    /// How many parties are waiting now (Python's `n_waiting`).
    pub fn n_waiting(&self) -> u32 {
        self.word(ARRIVED).load(Ordering::Relaxed)
    }

    /// `true` once the barrier is broken.
    pub fn is_broken(&self) -> bool {
        self.word(BROKEN).load(Ordering::SeqCst) != 0
    }

    /// Breaks the barrier: every waiting and future party gets
    /// [`Error::BrokenBarrier`] (Python's `abort()`).
    pub fn abort(&self) {
        let _guard = self.lock();
        self.break_locked();
    }

    fn break_locked(&self) {
        self.word(BROKEN).store(1, Ordering::SeqCst);
        futex::wake(self.word(GENERATION), u32::MAX);
    }

    /// Waits until `parties` parties have called `wait`, then all go on.
    ///
    /// # Errors
    ///
    /// [`Error::BrokenBarrier`] if the barrier is or becomes broken (a
    /// waiting party died or timed out, or [`abort`](Barrier::abort)).
    pub fn wait(&self) -> Result<BarrierWaitResult> {
        self.wait_until(None)
    }

    /// As [`wait`](Barrier::wait), giving up after `timeout`, which breaks
    /// the barrier for the others (as in Python).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] for this party when its time is up;
    /// [`Error::BrokenBarrier`] as for `wait`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<BarrierWaitResult> {
        self.wait_until(deadline(timeout))
    }

    /// Called with the lock held: `true` if a waiting party's process
    /// certainly died (parties of this process are alive: this runs).
    fn any_dead(&self, arrived: u32) -> bool {
        let header = self.header();
        (0..arrived as usize)
            .map(|i| self.slot(i).load(Ordering::Relaxed))
            .any(|party| header.party_dead(party))
    }

    fn wait_until(&self, deadline: Option<Instant>) -> Result<BarrierWaitResult> {
        let me = raw::this_process();
        let generation = self.word(GENERATION);
        let seen = {
            let _guard = self.lock();
            if self.is_broken() {
                return Err(Error::BrokenBarrier);
            }
            let arrived = self.word(ARRIVED).load(Ordering::Relaxed);
            let parties = self.parties();
            if arrived + 1 >= parties {
                if self.any_dead(arrived) {
                    self.break_locked();
                    return Err(Error::BrokenBarrier);
                }
                self.word(ARRIVED).store(0, Ordering::Relaxed);
                generation.fetch_add(1, Ordering::SeqCst);
                futex::wake(generation, u32::MAX);
                return Ok(BarrierWaitResult(true));
            }
            self.slot(arrived as usize).store(me, Ordering::Relaxed);
            self.word(ARRIVED).store(arrived + 1, Ordering::Relaxed);
            generation.load(Ordering::SeqCst)
        };
        loop {
            let mut slice = raw::CHECK_EVERY;
            let mut last = false;
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left <= slice {
                    slice = left;
                    last = true;
                }
            }
            let wake = futex::wait(generation, seen, Some(slice));
            if generation.load(Ordering::SeqCst) != seen {
                return Ok(BarrierWaitResult(false));
            }
            if self.is_broken() {
                return Err(Error::BrokenBarrier);
            }
            if wake == futex::Wake::TimedOut {
                let _guard = self.lock();
                if generation.load(Ordering::SeqCst) != seen {
                    return Ok(BarrierWaitResult(false));
                }
                if last {
                    self.break_locked();
                    return Err(Error::Timeout);
                }
                if self.any_dead(self.word(ARRIVED).load(Ordering::Relaxed)) {
                    self.break_locked();
                    return Err(Error::BrokenBarrier);
                }
            }
        }
    }
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("parties", &self.parties())
            .field("n_waiting", &self.n_waiting())
            .field("broken", &self.is_broken())
            .finish()
    }
}

/// Travels as its memory and its party count, which fixes the memory's
/// size (one thread id per party).
impl HandleWire for Barrier {
    const KIND: Kind = Kind::Barrier;
    type Elem = ();
    type Plain = u32;

    fn parts(&self) -> Result<Parts<'_, u32>> {
        Ok(Parts::block(&self.map, self.parties()))
    }

    fn mapping_size(&parties: &u32) -> Result<usize> {
        if parties == 0 || parties > 1 << 20 {
            return Err(handle::decode(format!("a Barrier of {parties} parties")));
        }
        Ok(SLOTS_BYTE + parties as usize * 8)
    }

    fn rebuild(parties: u32, fds: &mut Received) -> Result<Self> {
        let map = fds.block()?;
        let found = map.atomics_u32()[PARTIES].load(Ordering::Relaxed);
        if found != parties {
            return Err(handle::decode(format!(
                "a Barrier sent as one of {parties} parties holds {found}"
            )));
        }
        Ok(Barrier { map })
    }
}

handle::handle_serde!([] Barrier);
