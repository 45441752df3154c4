//! A `loom` model of the queue's slot-state protocol: the real
//! [`protocol`](super::protocol) code (claim, publish, take, release,
//! tombstones, the takeover of a dead writer's claim and of a dead
//! consumer's slot, the head and tail counters and their helping CASes),
//! run by threads that stand in for processes over one set of words, with
//! a table standing in for "is this process alive"; and the participant
//! table (join, the recycling of a dead holder's entry, the liveness of a
//! name in a slot word), with processes that join it in their own thread,
//! so that nothing but the protocol's own orderings tells one process
//! what another did to the table.
//!
//! Run (a few minutes on 2 cores, release build):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p multiproc --release --lib queue::loom
//! ```
//!
//! What is checked, in every interleaving loom explores (and every value a
//! relaxed load may return under the C++ memory model):
//!
//! - **Exclusive payloads.** Each slot has an owner word that a process
//!   swaps its number into when the protocol gives it a right to the slot and
//!   swaps out when it hands the slot on, all with relaxed RMWs (which add
//!   no ordering of their own). Finding another live owner there fails the
//!   model: two rights to one payload at once. Finding a dead one is a
//!   takeover, which only a dead holder allows.
//! - **Publication.** The payload is a relaxed atomic word: a consumer
//!   reads the value its producer wrote only if the protocol's own
//!   release and acquire order the write before the read, and reads a
//!   later lap's value only if its read is not ordered before that write.
//!   Every message carries a unique value, so either shows as a wrong one.
//! - **Exactly once.** Every message put by a producer that lived is
//!   received exactly once (once more, by the recovering consumer, if its
//!   first consumer died holding it); a dead writer's message is never
//!   received; and the tombstone count matches.
//!
//! A process dies by stopping where its scenario says (holding a right it
//! never gives back), then marking itself dead: its last act, so a
//! takeover that sees it dead comes after everything it did, as a
//! process's exit does.
//!
//! Processes are numbered (1..PIDS): the number is both the holder word a
//! process puts in the participant table and the bare pid it names itself
//! by when the table is full (a small table makes some processes
//! participants and some bare pids in every scenario). What the model
//! cannot check is what stands behind "dead": `Holder::liveness` and the
//! namespace register, which only ever answer dead for a process that is.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use ::loom::sync::Arc;
use ::loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use ::loom::thread;

use super::protocol::{
    Gate, Geometry, ReadRight, Roster, Slots, Take, WriteRight, join, who_alive,
};

/// Pids 1..PIDS.
const PIDS: usize = 5;

/// The shared words of one ring, and the model's own bookkeeping.
struct Mem {
    geo: Geometry,
    head: AtomicU64,
    tail: AtomicU64,
    states: Vec<AtomicU64>,
    /// The message of each slot (relaxed: see the module docs).
    payload: Vec<AtomicU64>,
    /// The process holding a right to each slot, 0 for none (relaxed
    /// RMWs).
    owner: Vec<AtomicU64>,
    /// The participant table: (holder, generation) words per entry.
    table: Vec<(AtomicU64, AtomicU64)>,
    /// The liveness table, by process number.
    dead: Vec<AtomicBool>,
    tombs: AtomicUsize,
    skipped: AtomicUsize,
}

impl Mem {
    /// A ring of `cap` slots with a participant table of `entries`.
    fn new(cap: u64, entries: usize) -> Arc<Mem> {
        let n = cap as usize;
        Arc::new(Mem {
            geo: Geometry::new(cap),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            states: (0..n).map(|_| AtomicU64::new(0)).collect(),
            payload: (0..n).map(|_| AtomicU64::new(0)).collect(),
            owner: (0..n).map(|_| AtomicU64::new(0)).collect(),
            table: (0..entries)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            dead: (0..PIDS).map(|_| AtomicBool::new(false)).collect(),
            tombs: AtomicUsize::new(0),
            skipped: AtomicUsize::new(0),
        })
    }

    fn is_dead(&self, process: u64) -> bool {
        self.dead
            .get(process as usize)
            .is_some_and(|d| d.load(Ordering::SeqCst))
    }
}

/// One process's view of the ring.
struct Proc {
    mem: Arc<Mem>,
    /// Its number (see the module docs).
    pid: u64,
    /// Its name in slot words: a participant word, or `pid`.
    me: u64,
    backlog: Cell<bool>,
}

impl Roster for Proc {
    type W = AtomicU64;

    fn entries(&self) -> usize {
        self.mem.table.len()
    }
    fn entry(&self, idx: usize) -> (&AtomicU64, &AtomicU64) {
        let (holder, generation) = &self.mem.table[idx];
        (holder, generation)
    }
    fn holder_dead(&self, holder: u64) -> bool {
        self.mem.is_dead(holder)
    }
    fn pid_dead(&self, pid: u64) -> bool {
        self.mem.is_dead(pid)
    }
}

impl Slots for Proc {
    type W = AtomicU64;

    fn geometry(&self) -> &Geometry {
        &self.mem.geo
    }
    fn tail(&self) -> &AtomicU64 {
        &self.mem.tail
    }
    fn head(&self) -> &AtomicU64 {
        &self.mem.head
    }
    fn state(&self, idx: usize) -> &AtomicU64 {
        &self.mem.states[idx]
    }
    fn me(&self) -> u64 {
        self.me
    }
    fn alive(&self, who: u64) -> bool {
        who_alive(self, who)
    }
    fn closed(&self) -> bool {
        false
    }
    fn backlog(&self) -> bool {
        self.backlog.get()
    }
    fn set_backlog(&self, on: bool) {
        self.backlog.set(on);
    }
    fn freed(&self) {}
    fn tombstoned(&self) {
        self.mem.tombs.fetch_add(1, Ordering::Relaxed);
    }
    fn skipped(&self) {
        self.mem.skipped.fetch_add(1, Ordering::Relaxed);
    }
    fn left_tomb(&self) {}
    fn took_over_writer(&self, idx: usize) {
        // The dead writer's right passes to us for the moment of the
        // tombstone (which `tombstone` then hands on).
        self.own(idx);
        self.disown(idx);
    }
    fn writer_stalled(&self, pos: u64, s: u64) -> bool {
        self.take_over_writer(pos, s)
    }
}

impl Proc {
    /// Process `pid` attaches to the ring: it joins the participant table
    /// (in the calling thread), or names itself by its number.
    fn new(mem: &Arc<Mem>, pid: u64) -> Proc {
        let mut p = Proc {
            mem: Arc::clone(mem),
            pid,
            me: pid,
            backlog: Cell::new(false),
        };
        if let Some(who) = join(&p, pid) {
            p.me = who;
        }
        p
    }

    fn idx(&self, pos: u64) -> usize {
        self.mem.geo.split(pos).1
    }

    /// The protocol gave us a right to slot `idx`: no live process may
    /// hold one.
    fn own(&self, idx: usize) {
        let was = self.mem.owner[idx].swap(self.pid, Ordering::Relaxed);
        assert!(
            was == 0 || self.mem.is_dead(was),
            "pid {} got slot {idx} while live pid {was} holds it",
            self.pid
        );
    }

    fn disown(&self, idx: usize) {
        let was = self.mem.owner[idx].swap(0, Ordering::Relaxed);
        assert_eq!(was, self.pid, "slot {idx} was not ours to hand on");
    }

    /// One claim attempt: the right, with the payload written.
    fn claim_and_write(&self, value: u64) -> Option<WriteRight> {
        let right = self.claim().expect("claim refused")?;
        let idx = self.idx(right.pos());
        self.own(idx);
        self.mem.payload[idx].store(value, Ordering::Relaxed);
        Some(right)
    }

    fn publish(&self, right: WriteRight) {
        self.disown(self.idx(right.pos()));
        self.mark_ready(right, 0);
    }

    /// Puts `value` if there is room within `attempts` tries.
    fn put(&self, value: u64, attempts: usize) -> bool {
        for _ in 0..attempts {
            if let Some(right) = self.claim_and_write(value) {
                self.publish(right);
                return true;
            }
            thread::yield_now();
        }
        false
    }

    /// Reads the taken slot of `right`.
    fn read(&self, right: &ReadRight) -> u64 {
        let idx = self.idx(right.pos());
        self.own(idx);
        self.mem.payload[idx].load(Ordering::Relaxed)
    }

    fn release_slot(&self, right: ReadRight) {
        self.disown(self.idx(right.pos()));
        self.release(right);
    }

    /// One take attempt; the message, the slot still held.
    fn take_one(&self) -> Option<(ReadRight, u64)> {
        match self.take(|_| Gate::Go(())) {
            Take::Slot(right, _) => {
                let value = self.read(&right);
                Some((right, value))
            }
            Take::Empty | Take::Stalled(..) => None,
            Take::Busy => unreachable!("the model's gate is never busy"),
            Take::Corrupt(what, value, at) => panic!("{what} {value:#x} at {at:#x}"),
        }
    }

    /// One take attempt, releasing what it took.
    fn get(&self) -> Option<u64> {
        let (right, value) = self.take_one()?;
        self.release_slot(right);
        Some(value)
    }

    /// One recovery scan: a dead consumer's message, delivered again.
    fn recover(&self) -> Option<u64> {
        let mut taken = false;
        let (_, right, ()) = self.recover_from(0, &mut taken, |_| Some(()))?;
        let value = self.read(&right);
        self.release_slot(right);
        Some(value)
    }

    /// Dies: stops here, holding whatever it holds.
    fn die(self, holding: impl Sized) {
        std::mem::forget(holding);
        self.mem.dead[self.pid as usize].store(true, Ordering::SeqCst);
    }
}

/// Threads make a bounded number of attempts (loom needs every thread
/// to finish without waiting for another's progress); what they leave is
/// drained afterwards, alone.
const ATTEMPTS: usize = 2;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = ::loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(4);
    }
    b.check(f);
}

/// Drains the ring alone, once every other thread finished or died:
/// every message left must come out, with no wait (a dead writer's slot
/// is skipped, a dead consumer's recovered).
fn drain(p: &Proc, got: &mut Vec<u64>) {
    for _ in 0..16 {
        match p.get().or_else(|| p.recover()) {
            Some(v) => got.push(v),
            None => return,
        }
    }
    panic!("the ring does not drain");
}

/// Every message put is received exactly once, and nothing else.
fn check_once(mut put: Vec<u64>, mut got: Vec<u64>) {
    put.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, put, "received (left) and put (right) differ");
}

/// The protocol's counters agree with what was received: every position
/// handed out by the tail was consumed, or became a tombstone that the
/// head skipped.
fn check_counters(mem: &Mem, received: usize) {
    let g = mem.geo;
    let head = g.count(mem.head.load(Ordering::SeqCst));
    let tail = g.count(mem.tail.load(Ordering::SeqCst));
    let tombs = mem.tombs.load(Ordering::SeqCst);
    assert_eq!(head, tail, "head and tail disagree at the end");
    assert_eq!(tail as usize, received + tombs, "positions lost");
    assert_eq!(mem.skipped.load(Ordering::SeqCst), tombs);
}

#[test]
fn two_producers_one_consumer_one_slot() {
    model(|| {
        let mem = Mem::new(1, 2);
        let producers: Vec<_> = [1u64, 2]
            .into_iter()
            .map(|pid| {
                let p = Proc::new(&mem, pid);
                thread::spawn(move || p.put(pid * 100, ATTEMPTS).then_some(pid * 100))
            })
            .collect();
        let c = Proc::new(&mem, 3);
        let mut got: Vec<u64> = (0..ATTEMPTS).filter_map(|_| c.get()).collect();
        let put: Vec<u64> = producers
            .into_iter()
            .filter_map(|p| p.join().expect("producer"))
            .collect();
        drain(&c, &mut got);
        check_counters(&mem, got.len());
        check_once(put, got);
    });
}

#[test]
fn one_producer_two_consumers_two_laps() {
    model(|| {
        let mem = Mem::new(1, 2);
        let consumers: Vec<_> = [2u64, 3]
            .into_iter()
            .map(|pid| {
                let c = Proc::new(&mem, pid);
                thread::spawn(move || c.get().into_iter().collect::<Vec<_>>())
            })
            .collect();
        let p = Proc::new(&mem, 1);
        let put: Vec<u64> = [100, 101]
            .into_iter()
            .filter(|&v| p.put(v, ATTEMPTS))
            .collect();
        let mut got: Vec<u64> = consumers
            .into_iter()
            .flat_map(|c| c.join().expect("consumer"))
            .collect();
        drain(&p, &mut got);
        check_counters(&mem, got.len());
        check_once(put, got);
    });
}

#[test]
fn a_dead_or_failing_writer_is_skipped() {
    // pid 1 claims, writes and dies (or, live, gives up: a tombstone);
    // pid 2 puts one message behind it on a one-slot ring; a consumer
    // takes what it can meanwhile. Only pid 2's message ever comes out.
    for dies in [true, false] {
        model(move || {
            let mem = Mem::new(1, 2);
            let a = Proc::new(&mem, 1);
            let writer = thread::spawn(move || {
                if let Some(right) = a.claim_and_write(666) {
                    if dies {
                        a.die(right);
                        return;
                    }
                    a.disown(a.idx(right.pos()));
                    a.tombstone(right);
                }
            });
            let b = Proc::new(&mem, 2);
            let producer = thread::spawn(move || b.put(200, ATTEMPTS));
            let c = Proc::new(&mem, 3);
            let mut got: Vec<u64> = c.get().into_iter().collect();
            writer.join().expect("writer");
            let put = producer.join().expect("producer");
            drain(&c, &mut got);
            check_counters(&mem, got.len());
            check_once(if put { vec![200] } else { vec![] }, got);
        });
    }
}

#[test]
fn a_dead_consumers_message_is_delivered_again() {
    // pid 2 takes a message and dies holding it; pid 3 takes or recovers
    // what it can meanwhile; on one slot, the second message can be
    // claimed only once the first's slot is handed back. Every message put
    // comes out once (the dead consumer's counts as not received).
    model(|| {
        let mem = Mem::new(1, 2);
        let p = Proc::new(&mem, 1);
        let producer = thread::spawn(move || {
            [100u64, 101]
                .into_iter()
                .filter(|&v| p.put(v, ATTEMPTS))
                .collect::<Vec<_>>()
        });
        let c1 = Proc::new(&mem, 2);
        let doomed = thread::spawn(move || {
            if let Some((right, _)) = c1.take_one() {
                c1.die(right);
            }
        });
        let c2 = Proc::new(&mem, 3);
        let mut got: Vec<u64> = c2.get().or_else(|| c2.recover()).into_iter().collect();
        let put = producer.join().expect("producer");
        doomed.join().expect("consumer");
        drain(&c2, &mut got);
        check_counters(&mem, got.len());
        check_once(put, got);
    });
}

#[test]
fn a_live_consumers_slot_is_never_taken_over() {
    // One message, taken by pid 2, which dies holding it or lives and
    // releases it, while pid 3 takes or recovers: a live holder's slot
    // must never be recovered (the model's owner check), a dead one's
    // message comes out again.
    for dies in [true, false] {
        model(move || {
            let mem = Mem::new(1, 2);
            let p = Proc::new(&mem, 1);
            assert!(p.put(100, 1));
            let c1 = Proc::new(&mem, 2);
            let other = thread::spawn(move || {
                let (right, value) = c1.take_one()?;
                if dies {
                    c1.die(right);
                    return None;
                }
                c1.release_slot(right);
                Some(value)
            });
            let c2 = Proc::new(&mem, 3);
            let mut got: Vec<u64> = c2.get().or_else(|| c2.recover()).into_iter().collect();
            got.extend(other.join().expect("consumer"));
            drain(&c2, &mut got);
            check_counters(&mem, got.len());
            check_once(vec![100], got);
        });
    }
}

#[test]
fn a_live_writers_claim_is_never_taken_over() {
    // pid 1 claims and writes, then publishes (or, dying, does not),
    // while pid 2 takes: a live writer's claim must never be tombstoned
    // under it.
    for dies in [true, false] {
        model(move || {
            let mem = Mem::new(1, 2);
            let w = Proc::new(&mem, 1);
            let writer = thread::spawn(move || {
                let right = w.claim_and_write(100)?;
                if dies {
                    w.die(right);
                    return None;
                }
                w.publish(right);
                Some(100)
            });
            let c = Proc::new(&mem, 2);
            let mut got: Vec<u64> = c.get().into_iter().collect();
            let put: Vec<u64> = writer.join().expect("writer").into_iter().collect();
            drain(&c, &mut got);
            check_counters(&mem, got.len());
            check_once(put, got);
        });
    }
}

#[test]
fn a_dead_writers_recycled_entry_never_makes_its_slot_or_the_heirs_look_wrong() {
    // One entry. Process 1 joins it, claims a slot, writes and dies.
    // Process 2 joins in its own thread (taking the entry over once 1 is
    // dead, else naming itself by its number) and puts a message; process
    // 3 joins meanwhile and takes what it can. The dead writer's slot
    // must be skipped, whoever holds its entry by then (its generation
    // moved on, or its holder is dead); the heir's claim, named by the
    // recycled entry, must never be taken over (the owner check); and
    // everything the heir put comes out once.
    model(|| {
        let mem = Mem::new(2, 1);
        let a = Proc::new(&mem, 1);
        let writer = thread::spawn(move || {
            if let Some(right) = a.claim_and_write(666) {
                a.die(right);
            }
        });
        let heir_mem = Arc::clone(&mem);
        let heir = thread::spawn(move || {
            let q = Proc::new(&heir_mem, 2);
            q.put(200, ATTEMPTS)
        });
        let c = Proc::new(&mem, 3);
        let mut got: Vec<u64> = c.get().into_iter().collect();
        writer.join().expect("writer");
        let put = heir.join().expect("heir");
        drain(&c, &mut got);
        check_counters(&mem, got.len());
        check_once(if put { vec![200] } else { vec![] }, got);
    });
}

#[test]
fn a_dead_consumers_recycled_entry_still_lets_its_message_come_back() {
    // One entry, held by process 2, which takes the one message and dies
    // holding it; process 3 joins in its own thread (perhaps recycling
    // 2's entry) and takes or recovers. The message comes out exactly
    // once, and no live holder's slot is ever taken over.
    model(|| {
        let mem = Mem::new(1, 1);
        let c1 = Proc::new(&mem, 2);
        let p = Proc::new(&mem, 1);
        assert!(p.put(100, 1));
        let doomed = thread::spawn(move || {
            if let Some((right, _)) = c1.take_one() {
                c1.die(right);
            }
        });
        let heir_mem = Arc::clone(&mem);
        let heir = thread::spawn(move || {
            let c2 = Proc::new(&heir_mem, 3);
            c2.get().or_else(|| c2.recover())
        });
        doomed.join().expect("consumer");
        let mut got: Vec<u64> = heir.join().expect("heir").into_iter().collect();
        drain(&p, &mut got);
        check_counters(&mem, got.len());
        check_once(vec![100], got);
    });
}
