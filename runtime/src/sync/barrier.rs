//! [`Barrier`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::deadline;
use crate::codec;
use crate::error::{Error, Result};
use crate::handle::{self, HandleWire, Kind, Parts, Received, new_block};
use crate::process::ProcessFn;
use crate::registry::{self, Call, Entry};
use crate::sys::arena::Block;
use crate::sys::futex::{self, Wake};
use crate::sys::lock::{self as raw, Header, RawGuard};
use crate::sys::shm::LOCK_HEADER;

// The lock header (u32 words 0..4), the u32 words arrived, generation,
// broken, parties, left and drainers, then from byte 48 one pair of u64
// per party slot: the process waiting in it as a lock word names it (pid
// and start time, so that a party whose pid was reused is still seen
// dead), and the outcome its round ended with (0 while it waits). A party
// takes the slot `arrived` names once it is free (its earlier occupant
// has read its outcome and left), so an outcome is never overwritten
// before it is read: the CPython barrier's "draining" state, per slot.
const ARRIVED: usize = LOCK_HEADER / 4;
const GENERATION: usize = ARRIVED + 1;
const BROKEN: usize = ARRIVED + 2;
const PARTIES: usize = ARRIVED + 3;
/// Bumped whenever a slot is freed or a round ends (a futex word).
const LEFT: usize = ARRIVED + 4;
/// Parties sleeping on [`LEFT`].
const DRAINERS: usize = ARRIVED + 5;
/// The first party slot, as an index of u64 words.
const SLOTS: usize = 6;
const SLOTS_BYTE: usize = SLOTS * 8;
/// Bytes per party slot.
const SLOT_BYTES: usize = 16;

/// An outcome: the round tripped (every party goes on).
const TRIPPED: u64 = 1;
/// An outcome: the round was reset ([`Barrier::reset`]).
const RESET: u64 = 2;

fn mapping_size(parties: u32) -> usize {
    SLOTS_BYTE + parties as usize * SLOT_BYTES
}

fn check_parties(parties: u32) -> bool {
    parties != 0 && parties <= 1 << 20
}

/// The registered function a barrier runs when it trips, with its
/// encoded arguments.
struct Action {
    entry: &'static Entry,
    args: Vec<u8>,
}

impl Action {
    fn new<F: ProcessFn<A>, A: Serialize>(args: &A) -> Result<Action> {
        let entry = registry::lookup_type::<F>()?;
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        codec::encode(args, &mut bytes, &mut fds)?;
        if !fds.is_empty() {
            return Err(Error::invalid(
                "a barrier action's arguments cannot hold handles (Lock, Value, Queue...): \
                 they travel inside the barrier's handle as plain bytes",
            ));
        }
        Ok(Action { entry, args: bytes })
    }

    /// Runs it here; its panic is an [`Error::Panicked`].
    fn run(&self) -> Result<()> {
        let mut out = Vec::new();
        let mut out_fds = Vec::new();
        self.entry.invoke(&mut Call::single(
            &self.args,
            Vec::new(),
            &mut out,
            &mut out_fds,
        ))
    }
}

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
    timeout: Option<Duration>,
    action: Option<Arc<Action>>,
}

/// What [`Barrier::wait`] tells a party.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierWaitResult(bool);

impl BarrierWaitResult {
    /// `true` for exactly one party per round: the last to arrive (the one
    /// that ran the barrier's action, if it has one).
    pub fn is_leader(&self) -> bool {
        self.0
    }
}

/// Builds a [`Barrier`] with an action or a default timeout:
/// Python's `Barrier(parties, action=f, timeout=t)`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use multiproc::{process_fn, sync::Barrier};
///
/// #[process_fn]
/// fn tripped(round: String) {
///     println!("{round}: everyone is here");
/// }
///
/// let barrier = Barrier::builder(1)
///     .action(tripped, ("setup".to_string(),))
///     .timeout(Duration::from_secs(5))
///     .build()?;
/// assert!(barrier.wait()?.is_leader()); // ran `tripped` first
/// # Ok::<(), multiproc::Error>(())
/// ```
#[must_use = "a builder does nothing until build() is called"]
pub struct BarrierBuilder {
    parties: u32,
    timeout: Option<Duration>,
    action: Option<Result<Action>>,
}

impl fmt::Debug for BarrierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BarrierBuilder")
            .field("parties", &self.parties)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl BarrierBuilder {
    /// The action: the registered function `f` (`#[process_fn]`), called
    /// with `args` by the last party to arrive, before any party is
    /// released, exactly once per round (Python's `action`). It runs in
    /// the process of that party, which may be any of them, so it is a
    /// registered function (it travels by name, with the barrier's handle)
    /// and its arguments are plain data (no handles). Its result is
    /// dropped. If it panics, the barrier breaks: that party's `wait`
    /// returns the panic ([`Error::Panicked`]) and the others
    /// [`Error::BrokenBarrier`], as in CPython.
    ///
    /// Unlike CPython's, the action runs without the barrier's lock held,
    /// so a waiting party's timeout is honoured while it runs, and a party
    /// that dies running it breaks the barrier for the others.
    pub fn action<F, A>(mut self, f: F, args: A) -> Self
    where
        F: ProcessFn<A>,
        A: Serialize,
    {
        let _ = f;
        self.action = Some(Action::new::<F, A>(&args));
        self
    }

    /// The timeout [`Barrier::wait`] uses (Python's `timeout`): a party
    /// that waits longer gets [`Error::Timeout`] and breaks the barrier.
    /// [`Barrier::wait_timeout`] uses its own.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The barrier.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `parties` is 0 or absurdly large, or
    /// the action's arguments hold handles; [`Error::NotRegistered`] if the
    /// action is not a registered function; [`Error::Encode`] if its
    /// arguments cannot be encoded; [`Error::Io`] if the shared memory
    /// cannot be created.
    pub fn build(self) -> Result<Barrier> {
        let parties = self.parties;
        if !check_parties(parties) {
            return Err(Error::invalid("a barrier needs between 1 and 2^20 parties"));
        }
        let action = self.action.transpose()?.map(Arc::new);
        let map = new_block::<Barrier>("multiproc-barrier", mapping_size(parties), 8)?;
        map.atomics_u32()[PARTIES].store(parties, Ordering::Relaxed);
        Ok(Barrier {
            map,
            timeout: self.timeout,
            action,
        })
    }
}

impl Barrier {
    /// A barrier for `parties` parties, without action or default timeout.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `parties` is 0 or absurdly large;
    /// [`Error::Io`] if the shared memory cannot be created.
    pub fn new(parties: u32) -> Result<Barrier> {
        Barrier::builder(parties).build()
    }

    /// A builder, to give the barrier an action or a default timeout.
    pub fn builder(parties: u32) -> BarrierBuilder {
        BarrierBuilder {
            parties,
            timeout: None,
            action: None,
        }
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        &self.map.atomics_u32()[i]
    }

    fn header(&self) -> Header<'_> {
        self.map.lock_header()
    }

    /// The process waiting in slot `i` (0: free).
    fn id(&self, i: usize) -> &AtomicU64 {
        &self.map.atomics_u64()[SLOTS + 2 * i]
    }

    /// The outcome of the party in slot `i` (0: still waiting).
    fn outcome(&self, i: usize) -> &AtomicU64 {
        &self.map.atomics_u64()[SLOTS + 2 * i + 1]
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

    /// How many parties are waiting now (Python's `n_waiting`; 0 while the
    /// barrier trips).
    pub fn n_waiting(&self) -> u32 {
        let arrived = self.word(ARRIVED).load(Ordering::Relaxed);
        if arrived >= self.parties() {
            0
        } else {
            arrived
        }
    }

    /// The timeout [`wait`](Barrier::wait) uses, if the barrier was built
    /// with one ([`BarrierBuilder::timeout`]).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// `true` once the barrier is broken (until [`reset`](Barrier::reset)).
    pub fn is_broken(&self) -> bool {
        self.word(BROKEN).load(Ordering::SeqCst) != 0
    }

    /// Breaks the barrier: every waiting and future party gets
    /// [`Error::BrokenBarrier`] (Python's `abort()`), until
    /// [`reset`](Barrier::reset).
    pub fn abort(&self) {
        let _guard = self.lock();
        self.break_locked();
    }

    /// Returns the barrier to its empty state (Python's `reset()`): the
    /// parties waiting now get [`Error::BrokenBarrier`], a broken barrier
    /// is whole again, and the barrier can be used for new rounds. As in
    /// CPython, the parties of the round that was reset must agree on what
    /// to do next (it does not tell the others that were not yet waiting).
    pub fn reset(&self) {
        let _guard = self.lock();
        let parties = self.parties();
        let header = self.header();
        // Slots of parties that died are freed now, not when a new party
        // needs one.
        for i in 0..parties as usize {
            let id = self.id(i).load(Ordering::SeqCst);
            if header.party_dead(id) {
                self.leave(i);
            }
        }
        let arrived = self.word(ARRIVED).load(Ordering::Relaxed).min(parties);
        self.word(BROKEN).store(0, Ordering::SeqCst);
        self.end_round(arrived, RESET);
    }

    fn break_locked(&self) {
        self.word(BROKEN).store(1, Ordering::SeqCst);
        futex::wake(self.word(GENERATION), u32::MAX);
        self.bump_left();
    }

    /// Called with the lock held: ends the round of the parties in slots
    /// `0..arrived` with `outcome`, and wakes them.
    fn end_round(&self, arrived: u32, outcome: u64) {
        for i in 0..arrived as usize {
            if self.id(i).load(Ordering::SeqCst) != 0 {
                self.outcome(i).store(outcome, Ordering::SeqCst);
            }
        }
        self.word(ARRIVED).store(0, Ordering::SeqCst);
        let generation = self.word(GENERATION);
        generation.fetch_add(1, Ordering::SeqCst);
        futex::wake(generation, u32::MAX);
        self.bump_left();
    }

    /// Wakes parties waiting for a slot (or for a tripping round to end).
    fn bump_left(&self) {
        let left = self.word(LEFT);
        left.fetch_add(1, Ordering::SeqCst);
        if self.word(DRAINERS).load(Ordering::SeqCst) > 0 {
            futex::wake(left, u32::MAX);
        }
    }

    /// Frees slot `i` (its party has read its outcome, or died).
    fn leave(&self, i: usize) {
        self.outcome(i).store(0, Ordering::SeqCst);
        self.id(i).store(0, Ordering::SeqCst);
        self.bump_left();
    }

    /// The result of the party in slot `i` if its round ended (the slot
    /// then freed).
    fn ended(&self, i: usize) -> Option<Result<BarrierWaitResult>> {
        let outcome = self.outcome(i).load(Ordering::SeqCst);
        if outcome == 0 {
            return None;
        }
        self.leave(i);
        Some(if outcome == TRIPPED {
            Ok(BarrierWaitResult(false))
        } else {
            Err(Error::BrokenBarrier)
        })
    }

    /// Waits until `parties` parties have called `wait`, then all go on
    /// (the last to arrive first runs the action, if there is one). With
    /// the barrier's default [`timeout`](BarrierBuilder::timeout), as
    /// [`wait_timeout`](Barrier::wait_timeout) with it.
    ///
    /// # Errors
    ///
    /// [`Error::BrokenBarrier`] if the barrier is or becomes broken (a
    /// waiting party died or timed out, [`abort`](Barrier::abort), the
    /// action failed in another party) or is [`reset`](Barrier::reset)
    /// while this party waits; [`Error::Timeout`] when the default timeout
    /// passes; the action's [`Error::Panicked`] in the party that ran it.
    pub fn wait(&self) -> Result<BarrierWaitResult> {
        self.wait_until(self.timeout.and_then(deadline))
    }

    /// As [`wait`](Barrier::wait), giving up after `timeout`, which breaks
    /// the barrier for the others (as in Python).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] for this party when its time is up;
    /// the others as for `wait`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<BarrierWaitResult> {
        self.wait_until(deadline(timeout))
    }

    /// Called with the lock held: `true` if a party waiting in slots
    /// `0..arrived` certainly died (parties of this process are alive:
    /// this runs).
    fn any_dead(&self, arrived: u32) -> bool {
        let header = self.header();
        (0..arrived as usize)
            .map(|i| self.id(i).load(Ordering::SeqCst))
            .any(|party| header.party_dead(party))
    }

    /// How long the next sleep may last, and whether it is the last.
    fn slice(deadline: Option<Instant>) -> (Duration, bool) {
        let slice = raw::CHECK_EVERY;
        match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left <= slice {
                    (left, true)
                } else {
                    (slice, false)
                }
            }
            None => (slice, false),
        }
    }

    /// Takes the slot `arrived` names, once it is free (its index and the
    /// lock come back), or the party's error.
    fn enter<'a>(
        &'a self,
        mut guard: RawGuard<'a>,
        deadline: Option<Instant>,
    ) -> Result<(RawGuard<'a>, u32)> {
        let parties = self.parties();
        let mut checked = false;
        loop {
            if self.is_broken() {
                return Err(Error::BrokenBarrier);
            }
            let arrived = self.word(ARRIVED).load(Ordering::Relaxed);
            if arrived < parties {
                let id = self.id(arrived as usize).load(Ordering::SeqCst);
                if id == 0 {
                    return Ok((guard, arrived));
                }
                // Its party of an earlier round has not left yet; it never
                // will if it died.
                if checked && self.header().party_dead(id) {
                    self.leave(arrived as usize);
                    continue;
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.break_locked();
                return Err(Error::Timeout);
            }
            let left = self.word(LEFT);
            let seen = left.load(Ordering::SeqCst);
            drop(guard);
            let (slice, _) = Self::slice(deadline);
            let until = Instant::now().checked_add(slice);
            checked = futex::wait_counted(left, seen, self.word(DRAINERS), until) == Wake::TimedOut
                || until.is_some_and(|u| Instant::now() >= u);
            guard = self.lock();
        }
    }

    fn wait_until(&self, deadline: Option<Instant>) -> Result<BarrierWaitResult> {
        let me = raw::this_process();
        let generation = self.word(GENERATION);
        let parties = self.parties();
        let (guard, index) = self.enter(self.lock(), deadline)?;
        let slot = index as usize;
        if index + 1 == parties {
            // The last party: the round trips.
            if self.any_dead(index) {
                self.break_locked();
                return Err(Error::BrokenBarrier);
            }
            let Some(action) = &self.action else {
                self.end_round(index, TRIPPED);
                return Ok(BarrierWaitResult(true));
            };
            // Run the action with the lock free, in the last slot (so a
            // death here is seen by the waiting parties), no one entering.
            self.id(slot).store(me, Ordering::SeqCst);
            self.word(ARRIVED).store(parties, Ordering::SeqCst);
            let seen = generation.load(Ordering::SeqCst);
            drop(guard);
            let ran = action.run();
            let _guard = self.lock();
            let result = if generation.load(Ordering::SeqCst) != seen || self.is_broken() {
                // Reset or broken while the action ran.
                Err(Error::BrokenBarrier)
            } else if let Err(err) = ran {
                self.break_locked();
                Err(err)
            } else {
                self.end_round(index, TRIPPED);
                Ok(BarrierWaitResult(true))
            };
            self.leave(slot);
            return result;
        }
        self.id(slot).store(me, Ordering::SeqCst);
        self.word(ARRIVED).store(index + 1, Ordering::SeqCst);
        let seen = generation.load(Ordering::SeqCst);
        drop(guard);
        loop {
            let (slice, last) = Self::slice(deadline);
            let wake = futex::wait(generation, seen, Some(slice));
            if let Some(result) = self.ended(slot) {
                return result;
            }
            if self.is_broken() {
                self.leave(slot);
                return Err(Error::BrokenBarrier);
            }
            if wake == Wake::TimedOut || last {
                let _guard = self.lock();
                if let Some(result) = self.ended(slot) {
                    return result;
                }
                if last && deadline.is_some_and(|d| Instant::now() >= d) {
                    self.break_locked();
                    self.leave(slot);
                    return Err(Error::Timeout);
                }
                let arrived = self.word(ARRIVED).load(Ordering::Relaxed).min(parties);
                if self.any_dead(arrived) {
                    self.break_locked();
                    self.leave(slot);
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
            .field("timeout", &self.timeout)
            .field("action", &self.action.as_ref().map(|a| a.entry.name()))
            .finish()
    }
}

/// The party count (which fixes the memory's size), the default timeout
/// and the action's name and arguments.
type BarrierPlain = (u32, Option<Duration>, Option<(String, Vec<u8>)>);

/// Travels as its memory, its party count, its default timeout and its
/// action (by registered name).
impl HandleWire for Barrier {
    const KIND: Kind = Kind::Barrier;
    type Elem = ();
    type Plain = BarrierPlain;

    fn parts(&self) -> Result<Parts<'_, BarrierPlain>> {
        let action = self
            .action
            .as_ref()
            .map(|a| (a.entry.name().to_string(), a.args.clone()));
        Ok(Parts::block(
            &self.map,
            (self.parties(), self.timeout, action),
        ))
    }

    fn mapping_size(&(parties, _, _): &BarrierPlain) -> Result<usize> {
        if !check_parties(parties) {
            return Err(handle::decode(format!("a Barrier of {parties} parties")));
        }
        Ok(mapping_size(parties))
    }

    fn rebuild((parties, timeout, action): BarrierPlain, fds: &mut Received) -> Result<Self> {
        let action = match action {
            None => None,
            Some((name, args)) => Some(Arc::new(Action {
                entry: registry::lookup_name(&name)?,
                args,
            })),
        };
        let map = fds.block()?;
        let found = map.atomics_u32()[PARTIES].load(Ordering::Relaxed);
        if found != parties {
            return Err(handle::decode(format!(
                "a Barrier sent as one of {parties} parties holds {found}"
            )));
        }
        Ok(Barrier {
            map,
            timeout,
            action,
        })
    }
}

handle::handle_serde!([] Barrier);
