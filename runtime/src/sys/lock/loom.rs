//! Loom model of the lock word protocol ([`super::protocol`], the code the
//! real lock runs): threads over one shared word stand in for processes,
//! a mutex and condition variable for the futex, and an array of atomics
//! for the process table that `/proc` shows.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p multiproc --release --lib sys::lock::loom
//! ```
//!
//! What each model checks, over every interleaving and every weak-memory
//! outcome loom explores (preemptions bounded, see [`check`]):
//! - mutual exclusion and the happens-before of a critical section on the
//!   next (the guarded counter is a loom `UnsafeCell`, whose unordered
//!   accesses loom reports), with no lost wake-up (the futex model sleeps
//!   without a timeout, so a lost wake-up is a deadlock loom reports);
//! - takeover from a holder that died (a thread that takes the lock,
//!   marks itself dead in the process table, and ends without releasing),
//!   with poisoning reported to the taker and kept for later takers;
//! - a dead holder whose pid was reused by a live process that is itself
//!   waiting for the lock: it is taken over exactly once and nobody takes
//!   the lock from a live holder;
//! - a holder in another pid namespace is never taken over, even though
//!   the process table (this namespace's) shows its pid dead.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::{Arc, Condvar, Mutex};

use super::protocol::{self, Env, Parts};
use crate::sys::futex::Wake;
use crate::sys::ipc::Holder;

/// How many timed sleeps of a model process end at once (see
/// [`Proc::eager`]).
const EAGER: u32 = 2;

/// In a process table entry: the process is a zombie (dead, not reaped).
const ZOMBIE: u64 = 1 << 32;
/// Process ids 1..IDS exist in the model.
const IDS: usize = 4;

/// What the model processes share: the lock header, the futex, the
/// process table of the checkers' namespace, the guarded data.
struct World {
    word: AtomicU64,
    poison: AtomicU32,
    register: AtomicU32,
    futex: Mutex<()>,
    sleepers: Condvar,
    /// Per process id: 0 if no process has it, else the start-time tag of
    /// the one that has, with [`ZOMBIE`] once it died.
    table: [AtomicU64; IDS],
    /// A counter only ever touched with the lock held.
    data: UnsafeCell<u32>,
}

impl World {
    fn new() -> Arc<World> {
        Arc::new(World {
            word: AtomicU64::new(0),
            poison: AtomicU32::new(0),
            register: AtomicU32::new(protocol::NS_NONE),
            futex: Mutex::new(()),
            sleepers: Condvar::new(),
            table: std::array::from_fn(|_| AtomicU64::new(0)),
            data: UnsafeCell::new(0),
        })
    }

    fn parts(&self) -> Parts<'_, AtomicU64, AtomicU32> {
        Parts {
            word: &self.word,
            poison: &self.poison,
            register: &self.register,
        }
    }

    /// Process `id` with tag `tag` starts (or takes over a reaped id).
    fn born(&self, id: u32, tag: u32) {
        self.table[id as usize].store(u64::from(tag), Ordering::SeqCst);
    }

    /// The process that has `id` dies; its last writes happen before.
    fn dies(&self, id: u32) {
        self.table[id as usize].fetch_or(ZOMBIE, Ordering::SeqCst);
    }

    /// One critical section: `+= 1` on the data, which loom checks is
    /// ordered after every other access.
    fn bump(&self) -> u32 {
        self.data.with_mut(|p| {
            // SAFETY: `p` points at the cell's value, live for the
            // closure; loom reports any access not ordered with this one
            // (which is what the model checks: only the lock holder runs
            // this).
            let value = unsafe { &mut *p };
            *value += 1;
            *value
        })
    }

    fn total(&self) -> u32 {
        self.data.with(|p| {
            // SAFETY: as in `bump`, for a read.
            unsafe { *p }
        })
    }
}

/// One model process: who it is and how it sleeps.
struct Proc {
    world: Arc<World>,
    me: Holder,
    ns: u32,
    /// Sleeps end after a "timeout" (dead-holder models) or only when
    /// woken (the exclusion model, so that a lost wake-up deadlocks).
    timed: bool,
    /// How many sleeps are left before the deadline, if any.
    budget: Cell<Option<u32>>,
    /// Timed sleeps that end without letting the others run first: the
    /// liveness check can then happen at any point of another process's
    /// run (after these, a sleep yields, which loom schedules only once
    /// the others cannot go on, so that the waiting loop ends).
    eager: Cell<u32>,
}

impl Proc {
    fn new(world: &Arc<World>, id: u32, tag: u32, ns: u32, timed: bool) -> Proc {
        Proc {
            world: Arc::clone(world),
            me: Holder::new(id, tag),
            ns,
            timed,
            budget: Cell::new(None),
            eager: Cell::new(EAGER),
        }
    }

    /// Takes the lock as `RawGuard::lock` does: `Some(poisoned)`, or
    /// `None` once the budget of sleeps is spent.
    fn lock(&self) -> Option<bool> {
        protocol::lock(
            self.world.parts(),
            self.ns,
            self.me.to_word(),
            None,
            true,
            self,
        )
    }

    fn unlock(&self) {
        protocol::release(&self.world.word, self);
    }
}

impl Env<AtomicU64> for Proc {
    fn spin_pauses(&self) -> u32 {
        0
    }

    fn pause(&self) {}

    fn slice(&self, _deadline: Option<Instant>) -> Option<Duration> {
        match self.budget.get() {
            Some(0) => None,
            Some(n) => {
                self.budget.set(Some(n - 1));
                Some(super::CHECK_EVERY)
            }
            None => Some(super::CHECK_EVERY),
        }
    }

    fn wait(&self, word: &AtomicU64, expected: u64, _timeout: Duration) -> Wake {
        // FUTEX_WAIT compares the low half, under the futex bucket lock
        // that FUTEX_WAKE takes too.
        let same = |w: &AtomicU64| w.load(Ordering::Relaxed) as u32 == expected as u32;
        if self.timed {
            if !same(word) {
                return Wake::Retry;
            }
            match self.eager.get() {
                0 => loom::thread::yield_now(),
                n => self.eager.set(n - 1),
            }
            return Wake::TimedOut;
        }
        let guard = self.world.futex.lock().expect("futex model");
        if same(word) {
            drop(self.world.sleepers.wait(guard).expect("futex model"));
        }
        Wake::Retry
    }

    fn wake(&self, _word: &AtomicU64) {
        let _guard = self.world.futex.lock().expect("futex model");
        self.world.sleepers.notify_one();
    }

    /// `/proc` as the real `Env` reads it: the register must hold this
    /// process's namespace, then the id must name nobody, someone with
    /// another start time, or a zombie.
    fn holder_dead(&self, held: u64) -> bool {
        if !protocol::register_is(&self.world.register, self.ns) {
            return false;
        }
        let holder = Holder::from_word(held);
        let entry = self.world.table[holder.id() as usize].load(Ordering::SeqCst);
        entry == 0 || entry as u32 != holder.tag() || entry & ZOMBIE != 0
    }
}

/// Runs a model with at most `preemptions` forced preemptions per
/// execution (loom's bound: 3 to 4 here, which finds every bug that was
/// planted to test these models (a Relaxed take, a lost wake, a takeover
/// without the check, pid-only liveness, an unpublished namespace
/// registration) and keeps the whole run to seconds).
fn check(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder.check(f);
}

const NS: u32 = 7;

#[test]
fn two_processes_exclude_each_other_and_no_wake_up_is_lost() {
    check(4, || {
        let world = World::new();
        let others: Vec<_> = (1..=2)
            .map(|id| {
                let world = Arc::clone(&world);
                loom::thread::spawn(move || {
                    world.born(id, 1);
                    let me = Proc::new(&world, id, 1, NS, false);
                    for _ in 0..2 {
                        assert_eq!(me.lock(), Some(false));
                        world.bump();
                        me.unlock();
                    }
                })
            })
            .collect();
        for t in others {
            t.join().expect("process");
        }
        assert_eq!(world.total(), 4);
        assert_eq!(world.word.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn three_processes_exclude_each_other() {
    // Bound 3: 4 takes minutes for three processes.
    check(3, || {
        let world = World::new();
        let others: Vec<_> = (1..=3)
            .map(|id| {
                let world = Arc::clone(&world);
                loom::thread::spawn(move || {
                    let me = Proc::new(&world, id, 1, NS, false);
                    assert_eq!(me.lock(), Some(false));
                    world.bump();
                    me.unlock();
                })
            })
            .collect();
        for t in others {
            t.join().expect("process");
        }
        assert_eq!(world.total(), 3);
    });
}

#[test]
fn a_dead_holder_is_taken_over_and_the_lock_stays_poisoned() {
    check(4, || {
        let world = World::new();
        world.born(1, 1);
        world.born(2, 1);
        let w = Arc::clone(&world);
        let victim = loom::thread::spawn(move || {
            let me = Proc::new(&w, 1, 1, NS, true);
            assert_eq!(me.lock(), Some(false));
            w.bump();
            // Killed holding it.
            w.dies(1);
        });
        let me = Proc::new(&world, 2, 1, NS, true);
        // Before the victim took it (then clean), or taken over (poisoned).
        let first = me.lock().expect("no deadline");
        let seen = world.bump();
        me.unlock();
        victim.join().expect("victim");
        if !first {
            // The victim took it after us and died holding it.
            assert_eq!(seen, 1);
            assert_eq!(me.lock(), Some(true));
            world.bump();
            me.unlock();
        }
        assert_eq!(world.total(), 2 + u32::from(!first));
        assert_eq!(world.poison.load(Ordering::SeqCst), 1);
        // Poisoning is kept for later takers.
        assert_eq!(me.lock(), Some(true));
        me.unlock();
    });
}

#[test]
fn a_reused_pid_does_not_hide_a_dead_holder_and_no_live_holder_is_robbed() {
    check(4, || {
        let world = World::new();
        world.born(1, 1);
        world.born(2, 1);
        let w = Arc::clone(&world);
        let victim = loom::thread::spawn(move || {
            let me = Proc::new(&w, 1, 1, NS, true);
            assert_eq!(me.lock(), Some(false));
            w.bump();
            w.dies(1);
            // Reaped; its pid goes to a new process (tag 2), which wants
            // the lock too.
            w.born(1, 2);
            let heir = Proc::new(&w, 1, 2, NS, true);
            assert!(heir.lock().is_some());
            w.bump();
            heir.unlock();
        });
        let me = Proc::new(&world, 2, 1, NS, true);
        assert!(me.lock().is_some());
        world.bump();
        me.unlock();
        victim.join().expect("victim");
        // Every critical section ran exactly once, in turn (loom checks the
        // ordering of the accesses), and the dead holder was taken over.
        assert_eq!(world.total(), 3);
        assert_eq!(world.poison.load(Ordering::SeqCst), 1);
        assert_eq!(world.word.load(Ordering::SeqCst), 0);
    });
}

/// A process of pid namespace `NS + 1` with pid 1 (which names nobody in
/// the checker's namespace) takes the lock and dies holding it.
fn foreign_holder_dies(world: &Arc<World>) -> loom::thread::JoinHandle<()> {
    let w = Arc::clone(world);
    loom::thread::spawn(move || {
        let me = Proc::new(&w, 1, 1, NS + 1, true);
        assert!(me.lock().is_some());
        w.bump();
    })
}

/// The checker tries twice, checking twice each time: never a takeover.
fn never_taken_over(world: &Arc<World>, me: &Proc, foreign: loom::thread::JoinHandle<()>) {
    me.budget.set(Some(2));
    if me.lock() == Some(false) {
        // Taken before the foreign process took it: clean.
        world.bump();
        me.unlock();
    }
    foreign.join().expect("foreign");
    me.budget.set(Some(2));
    me.eager.set(EAGER);
    assert_eq!(me.lock(), None);
    assert_eq!(world.poison.load(Ordering::SeqCst), 0);
    assert_eq!(world.register.load(Ordering::SeqCst), protocol::NS_MIXED);
}

#[test]
fn a_holder_in_another_pid_namespace_is_never_taken_over() {
    check(4, || {
        let world = World::new();
        world.born(2, 1);
        let foreign = foreign_holder_dies(&world);
        let me = Proc::new(&world, 2, 1, NS, true);
        never_taken_over(&world, &me, foreign);
    });
}

#[test]
fn a_process_of_another_namespace_joining_later_is_never_taken_over() {
    check(4, || {
        let world = World::new();
        world.born(2, 1);
        // The lock is first used in the checker's namespace only.
        let me = Proc::new(&world, 2, 1, NS, true);
        assert_eq!(me.lock(), Some(false));
        world.bump();
        me.unlock();
        let foreign = foreign_holder_dies(&world);
        never_taken_over(&world, &me, foreign);
    });
}
