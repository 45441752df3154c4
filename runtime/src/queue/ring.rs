//! The shared ring under every queue: a bounded MPMC queue of fixed-size
//! slots in a memfd mapping (after Vyukov's sequence-number design), with
//! futex wake-ups that cost no syscall and no full fence while nobody
//! sleeps, and a side channel (a datagram socket pair carrying a memfd per
//! message) for messages that do not fit a slot or carry descriptors.
//!
//! Each slot starts with one state word: (lap, tag, writer pid), the tag
//! being free, writing, ready or tombstone.
//!
//! Crash safety. A producer claims the slot at the tail with one CAS from
//! "free in lap L" to "writing, pid P, lap L", moves the tail (a CAS that
//! others help with), writes the message into the slot and publishes it by
//! storing "ready". A consumer that finds the head slot claimed but not
//! published checks the writer's pid every few milliseconds: a dead
//! writer's slot is turned into a *tombstone* by a CAS from the writer's
//! own claim word, which cannot race with that writer (it is dead), while a
//! live writer's slot is never touched. So a message is either published
//! whole once, or dropped because its `put` never returned. The lap in the
//! word rules out ABA. A live producer that fails (encode error, panic,
//! oversized message) tombstones its own slot, and skips it at once when
//! it is at the head. A consumer killed between taking and releasing a slot
//! is not recovered (documented on `Queue`).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;

use crate::error::{Error, Result};
use crate::sys;
use crate::sys::futex;
use crate::sys::shm::Mapping;

const MAGIC: u64 = 0x6d70_7175_6575_6532; // "mpqueue2"
const HEADER_BYTES: usize = 4096;
/// Bytes per slot: a 16-byte header (state word, length, kind) and the
/// inline payload.
pub(crate) const STRIDE: usize = 1088;
const SLOT_HEADER: usize = 16;
/// Largest message carried inline in a slot.
pub(crate) const INLINE_MAX: usize = STRIDE - SLOT_HEADER;
/// Largest side-channel message carried in the datagram itself.
const DGRAM_INLINE_MAX: usize = 16 * 1024;
const DGRAM_HEADER: usize = 24;

// Header words (u64 indices).
const W_MAGIC: usize = 0;
const W_CAP: usize = 1;
const W_TAIL: usize = 16; // byte 128
const W_HEAD: usize = 32; // byte 256
// Header words (u32 indices).
const H_NOT_EMPTY: usize = 96; // byte 384
const H_CONS_WAIT: usize = 112; // byte 448
const H_NOT_FULL: usize = 128; // byte 512
const H_PROD_WAIT: usize = 144; // byte 576
const H_CLOSED: usize = 160; // byte 640
const H_JOINABLE: usize = 224; // byte 896
const W_DONE: usize = 128; // byte 1024: task_done calls (joinable queues)
const W_TOMBS: usize = 136; // byte 1088: positions turned into tombstones
const H_JOIN_SEQ: usize = 288; // byte 1152: bumped when the unfinished count may be zero
const W_SKIPPED: usize = 152; // byte 1216: tombstones consumers have skipped

const KIND_INLINE: u32 = 0;
const KIND_SIDE: u32 = 1;

// A slot's state word: the lap (low 32 bits of it) in bits 32..64, a tag
// in bits 30..32, the writer's pid in bits 0..30 (Linux pids are below
// 2^22). Free in lap L: the slot may be claimed for position L*one_lap+i;
// writing: claimed by pid; ready: a message; tomb: a position to skip.
// A consumer releases a slot by storing "free in lap L+1".
const TAG_FREE: u64 = 0;
const TAG_WRITING: u64 = 1 << 30;
const TAG_READY: u64 = 2 << 30;
const TAG_TOMB: u64 = 3 << 30;
const TAG_MASK: u64 = 3 << 30;
const PID_MASK: u64 = (1 << 30) - 1;
/// How often a consumer stuck behind an unpublished slot checks its writer.
const LIVENESS_EVERY: Duration = Duration::from_millis(5);
/// How long a sleeper that could not issue a global membarrier sleeps at a
/// time (a wake-up may be lost to a waker that only used a compiler fence).
const UNRELIABLE_SLEEP: Duration = Duration::from_millis(10);
/// How long a consumer waits for its side-channel message before deciding
/// that the consumer who held it died.
const SIDE_GIVE_UP: Duration = Duration::from_secs(30);

fn word(lap: u64, tag: u64, pid: u64) -> u64 {
    (lap << 32) | tag | pid
}

/// The slot word's lap minus `lap`, modulo 2^32 (laps wrap in the word).
fn lap_diff(s: u64, lap: u64) -> i32 {
    ((s >> 32) as u32).wrapping_sub(lap as u32) as i32
}

/// The shared state of one queue.
#[derive(Debug)]
pub(crate) struct Ring {
    map: Mapping,
    tx: OwnedFd,
    rx: OwnedFd,
    cap: u64,
    /// Positions carry the lap above bit `shift` and the slot index below
    /// (`mask`), as in crossbeam's `ArrayQueue`: no division on the fast
    /// path for any capacity. Index values `cap..=mask` are skipped.
    shift: u32,
    mask: u64,
    pid: u64,
    /// This process is registered for global membarriers: publishing needs
    /// only a compiler fence before checking for sleepers (see `wake_one`).
    light_wake: bool,
}

/// Why a claim failed.
enum Put {
    Closed,
}

impl Ring {
    pub(crate) fn create(cap: usize, joinable: bool) -> Result<Ring> {
        if cap == 0 {
            return Err(Error::invalid("a queue needs room for at least one item"));
        }
        let bytes = cap
            .checked_mul(STRIDE)
            .and_then(|b| b.checked_add(HEADER_BYTES))
            .ok_or_else(|| Error::invalid("queue capacity too large"))?;
        let map = Mapping::create("multiproc-queue", bytes)?;
        map.atomics_u64()[W_MAGIC].store(MAGIC, Ordering::Relaxed);
        map.atomics_u64()[W_CAP].store(cap as u64, Ordering::Relaxed);
        map.atomics_u32()[H_JOINABLE].store(joinable as u32, Ordering::Relaxed);
        let (tx, rx) = sys::socketpair_dgram()?;
        sys::set_nonblocking(tx.as_fd(), true)?;
        sys::set_nonblocking(rx.as_fd(), true)?;
        Ring::assemble(map, tx, rx, cap as u64)
    }

    pub(crate) fn from_fds(mem: OwnedFd, tx: OwnedFd, rx: OwnedFd) -> Result<Ring> {
        let map = Mapping::from_fd(mem)?;
        if map.len() < HEADER_BYTES || map.atomics_u64()[W_MAGIC].load(Ordering::Relaxed) != MAGIC {
            return Err(Error::invalid("not a multiproc queue"));
        }
        let cap = map.atomics_u64()[W_CAP].load(Ordering::Relaxed);
        if cap == 0
            || (cap as usize)
                .saturating_mul(STRIDE)
                .saturating_add(HEADER_BYTES)
                > map.len()
        {
            return Err(Error::invalid("corrupt queue header"));
        }
        Ring::assemble(map, tx, rx, cap)
    }

    fn assemble(map: Mapping, tx: OwnedFd, rx: OwnedFd, cap: u64) -> Result<Ring> {
        let pid = u64::from(std::process::id());
        if pid == 0 || pid > PID_MASK {
            return Err(Error::invalid("process id does not fit a queue slot word"));
        }
        let one_lap = cap.next_power_of_two();
        Ok(Ring {
            map,
            tx,
            rx,
            cap,
            shift: one_lap.trailing_zeros(),
            mask: one_lap - 1,
            pid,
            light_wake: futex::barrier_registered(),
        })
    }

    pub(crate) fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 3] {
        [self.map.fd(), self.tx.as_fd(), self.rx.as_fd()]
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap as usize
    }

    fn u64w(&self, i: usize) -> &AtomicU64 {
        &self.map.atomics_u64()[i]
    }

    fn u32w(&self, i: usize) -> &AtomicU32 {
        &self.map.atomics_u32()[i]
    }

    /// `(lap, slot index)` of a position.
    fn split(&self, pos: u64) -> (u64, usize) {
        (pos >> self.shift, (pos & self.mask) as usize)
    }

    /// The position after `pos`.
    fn next(&self, pos: u64) -> u64 {
        if (pos & self.mask) + 1 < self.cap {
            pos + 1
        } else {
            (pos | self.mask) + 1
        }
    }

    /// How many positions come before `pos`.
    fn count(&self, pos: u64) -> u64 {
        (pos >> self.shift)
            .wrapping_mul(self.cap)
            .wrapping_add(pos & self.mask)
    }

    fn slot_off(&self, idx: usize) -> usize {
        HEADER_BYTES + idx * STRIDE
    }

    /// The slot's state word (see [`word`]).
    fn state(&self, idx: usize) -> &AtomicU64 {
        &self.map.atomics_u64()[self.slot_off(idx) / 8]
    }

    fn meta(&self, idx: usize) -> (&AtomicU32, &AtomicU32) {
        let w = self.slot_off(idx) / 4 + 2;
        let words = self.map.atomics_u32();
        (&words[w], &words[w + 1])
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.u32w(H_CLOSED).load(Ordering::Acquire) != 0
    }

    pub(crate) fn close(&self) {
        self.u32w(H_CLOSED).store(1, Ordering::Release);
        self.u32w(H_NOT_EMPTY).fetch_add(1, Ordering::SeqCst);
        futex::wake(self.u32w(H_NOT_EMPTY), u32::MAX);
        self.u32w(H_NOT_FULL).fetch_add(1, Ordering::SeqCst);
        futex::wake(self.u32w(H_NOT_FULL), u32::MAX);
    }

    /// Messages in the queue (approximate under concurrency, like Python's):
    /// positions between head and tail, less the tombstones among them.
    pub(crate) fn len(&self) -> usize {
        let skipped = self.u64w(W_SKIPPED).load(Ordering::Acquire);
        let head = self.u64w(W_HEAD).load(Ordering::Acquire);
        let tail = self.u64w(W_TAIL).load(Ordering::Acquire);
        let tombs = self.u64w(W_TOMBS).load(Ordering::Acquire);
        let live_tombs = tombs.saturating_sub(skipped);
        self.count(tail)
            .saturating_sub(self.count(head))
            .saturating_sub(live_tombs) as usize
    }

    fn joinable(&self) -> bool {
        self.u32w(H_JOINABLE).load(Ordering::Relaxed) != 0
    }

    // -----------------------------------------------------------------
    // Producing.

    /// Claims the slot at the tail. `Ok(None)`: full.
    ///
    /// The claim is one CAS on the slot's word, from "free in lap L" to
    /// "written by pid P in lap L", so a slot is never reserved without
    /// the name of its writer; the tail then moves by a CAS that anyone
    /// who finds the slot claimed also attempts (helping), so a producer
    /// that dies between the two steps blocks nobody.
    fn reserve(&self) -> Result<Option<u64>, Put> {
        let tail = self.u64w(W_TAIL);
        let mut t = tail.load(Ordering::Relaxed);
        loop {
            if self.is_closed() {
                return Err(Put::Closed);
            }
            let (lap, idx) = self.split(t);
            let slot = self.state(idx);
            let s = slot.load(Ordering::Acquire);
            let d = lap_diff(s, lap);
            if d == 0 {
                if s & TAG_MASK == TAG_FREE
                    && slot
                        .compare_exchange(
                            s,
                            word(lap, TAG_WRITING, self.pid),
                            Ordering::Acquire,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                {
                    let _ = tail.compare_exchange(
                        t,
                        self.next(t),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    return Ok(Some(t));
                }
                // Claimed by another producer: help it move the tail.
                let _ =
                    tail.compare_exchange(t, self.next(t), Ordering::Relaxed, Ordering::Relaxed);
            } else if d < 0 {
                // The previous lap's message is still in the slot.
                let now = tail.load(Ordering::Relaxed);
                if now == t {
                    return Ok(None);
                }
                t = now;
                continue;
            }
            t = tail.load(Ordering::Relaxed);
        }
    }

    fn publish(&self, pos: u64, kind: u32, len: u32) {
        let (lap, idx) = self.split(pos);
        let (klen, kkind) = self.meta(idx);
        klen.store(len, Ordering::Relaxed);
        kkind.store(kind, Ordering::Relaxed);
        self.state(idx)
            .store(word(lap, TAG_READY, 0), Ordering::Release);
        self.wake_one(H_NOT_EMPTY, H_CONS_WAIT);
    }

    /// Wakes one sleeper on `word` if any registered in `waiters`. The
    /// caller has just made a change (a release store) that a sleeper
    /// waits for.
    ///
    /// Lost wake-ups. A sleeper (`wait_on`) increments `waiters` (a SeqCst
    /// RMW: a full fence), then re-checks the change, then sleeps; we make
    /// the change, then read `waiters`. A Dekker pattern: it is safe when
    /// each side has a full fence between its write and its read, for then
    /// at least one read sees the other side's write (we wake it, or it
    /// does not sleep).
    ///
    /// A full fence here costs the fast path dearly: it waits until the
    /// slot's line, just written, is owned by this core (a cross-core
    /// transfer per message). So when this process is registered for
    /// global membarriers, the fence is asymmetric: only a compiler fence
    /// here, and the sleeper calls `futex::global_barrier()` after
    /// incrementing `waiters` and before re-checking. That barrier runs a
    /// full fence on every running thread of every registered process (a
    /// descheduled thread had one at its context switch), at some point B
    /// of this thread's program. If our change came before B, it is
    /// visible when the barrier returns, so the sleeper's re-check sees it.
    /// If it came after B, our read of `waiters` also comes after B, which
    /// follows the sleeper's increment (made visible by its RMW before the
    /// barrier began), so we see the waiter and wake it. A process that
    /// could not register fences fully here (standard Dekker with the
    /// sleeper's RMW); a sleeper that cannot issue the barrier sleeps in
    /// short slices, so a wake-up lost to a registered waker costs at most
    /// one slice.
    fn wake_one(&self, word: usize, waiters: usize) {
        if self.light_wake {
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        if self.u32w(waiters).load(Ordering::Relaxed) != 0 {
            self.u32w(word).fetch_add(1, Ordering::SeqCst);
            futex::wake(self.u32w(word), 1);
        }
    }

    /// One attempt to claim the slot at the tail for a message.
    pub(crate) fn try_claim(&self) -> Claimed<'_> {
        match self.reserve() {
            Ok(Some(pos)) => Claimed::Slot(Claim {
                ring: self,
                pos,
                open: true,
            }),
            Ok(None) => Claimed::Full,
            Err(_) => Claimed::Closed,
        }
    }

    /// Sleeps until a slot may have been released, or `deadline`.
    pub(crate) fn wait_not_full(&self, deadline: Option<Instant>) -> bool {
        self.wait_on(H_NOT_FULL, H_PROD_WAIT, deadline, || {
            let t = self.u64w(W_TAIL).load(Ordering::SeqCst);
            let (lap, idx) = self.split(t);
            lap_diff(self.state(idx).load(Ordering::SeqCst), lap) >= 0 || self.is_closed()
        })
    }

    /// Spins briefly, then registers as a waiter and sleeps on `word` until
    /// `ready()` or `deadline`. `false` when the deadline passed.
    fn wait_on(
        &self,
        word: usize,
        waiters: usize,
        deadline: Option<Instant>,
        ready: impl Fn() -> bool,
    ) -> bool {
        for i in 0..200u32 {
            if ready() {
                return true;
            }
            if i < 100 {
                for _ in 0..32 {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
        let word = self.u32w(word);
        let waiters = self.u32w(waiters);
        waiters.fetch_add(1, Ordering::SeqCst);
        // See `wake_one` for why this barrier makes the re-check reliable.
        let reliable = futex::global_barrier();
        let v = word.load(Ordering::SeqCst);
        let mut ok = true;
        if !ready() {
            let mut slice = if reliable {
                Duration::from_millis(100)
            } else {
                UNRELIABLE_SLEEP
            };
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    ok = false;
                }
                slice = slice.min(left);
            }
            if ok {
                futex::wait(word, v, Some(slice));
            }
        }
        waiters.fetch_sub(1, Ordering::SeqCst);
        ok
    }

    // -----------------------------------------------------------------
    // Consuming.

    /// One attempt to take the message at the head. Handles a dead
    /// producer in front of the queue by turning its slot into a tombstone.
    ///
    /// Emptiness is read from the slot at the head alone (free in this
    /// lap, or still holding the previous lap): slots are claimed in
    /// position order, so a free slot at the head means nothing behind it
    /// is claimed either. Consumers never read the producers' tail line.
    pub(crate) fn try_take(&self, stall: &mut Stall) -> Taken<'_> {
        let head = self.u64w(W_HEAD);
        let mut h = head.load(Ordering::Relaxed);
        loop {
            let (lap, idx) = self.split(h);
            let s = self.state(idx).load(Ordering::Acquire);
            let d = lap_diff(s, lap);
            if d > 0 {
                h = head.load(Ordering::Relaxed);
                continue;
            }
            let tag = s & TAG_MASK;
            if d < 0 || tag == TAG_FREE {
                stall.clear();
                return if self.is_closed() {
                    Taken::Closed
                } else {
                    Taken::Empty
                };
            }
            if tag == TAG_WRITING {
                // A producer is writing, or died writing.
                if self.check_stalled(h, s, stall) {
                    continue;
                }
                return Taken::Empty;
            }
            if let Err(now) =
                head.compare_exchange_weak(h, self.next(h), Ordering::Relaxed, Ordering::Relaxed)
            {
                h = now;
                continue;
            }
            stall.clear();
            if tag == TAG_TOMB {
                self.u64w(W_SKIPPED).fetch_add(1, Ordering::Relaxed);
                self.release(h);
                h = self.next(h);
                continue;
            }
            return Taken::Slot(Held { ring: self, pos: h });
        }
    }

    fn release(&self, pos: u64) {
        let (lap, idx) = self.split(pos);
        self.state(idx)
            .store(word(lap.wrapping_add(1), TAG_FREE, 0), Ordering::Release);
        self.wake_one(H_NOT_FULL, H_PROD_WAIT);
    }

    /// Called while the slot at `pos` (state `s`) is claimed but not
    /// published: every few milliseconds, checks whether its writer is
    /// alive, and if it died, turns the slot into a tombstone (`true`).
    /// The CAS from the dead writer's own claim word cannot race with that
    /// writer (it is dead), and a live writer's word is never touched, so
    /// a message is either published whole once or dropped because its
    /// `put` never returned.
    fn check_stalled(&self, pos: u64, s: u64, stall: &mut Stall) -> bool {
        let now = Instant::now();
        match &mut stall.at {
            Some((at, checked)) if *at == pos => {
                if now.duration_since(*checked) < LIVENESS_EVERY {
                    return false;
                }
                *checked = now;
            }
            _ => {
                stall.at = Some((pos, now));
                return false;
            }
        }
        let pid = s & PID_MASK;
        if sys::pid_alive(pid as u32) {
            return false;
        }
        // It may have died before moving the tail past its slot: move it,
        // so the tail counts the position that is about to be a tombstone.
        let _ = self.u64w(W_TAIL).compare_exchange(
            pos,
            self.next(pos),
            Ordering::SeqCst,
            Ordering::Relaxed,
        );
        let (lap, idx) = self.split(pos);
        if self
            .state(idx)
            .compare_exchange(
                s,
                word(lap, TAG_TOMB, 0),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            stall.clear();
            self.count_tombstone();
        }
        true
    }

    /// Turns our own claimed position into a tombstone (an encoding error,
    /// a message that did not fit, a failed side send). If it is at the
    /// head, skips it at once as a consumer would (the CAS on the head
    /// decides between us and any consumer), so failed puts on a queue
    /// nobody reads do not fill it with tombstones.
    fn tombstone(&self, pos: u64) {
        let (lap, idx) = self.split(pos);
        self.state(idx)
            .store(word(lap, TAG_TOMB, 0), Ordering::Release);
        self.count_tombstone();
        if self
            .u64w(W_HEAD)
            .compare_exchange(pos, self.next(pos), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.u64w(W_SKIPPED).fetch_add(1, Ordering::Relaxed);
            self.release(pos);
        } else {
            self.wake_one(H_NOT_EMPTY, H_CONS_WAIT);
        }
    }

    /// `true` if a `try_take` may find something (or the queue closed).
    fn maybe_ready(&self) -> bool {
        let h = self.u64w(W_HEAD).load(Ordering::SeqCst);
        let (lap, idx) = self.split(h);
        let s = self.state(idx).load(Ordering::SeqCst);
        let d = lap_diff(s, lap);
        d > 0 || (d == 0 && s & TAG_MASK != TAG_FREE) || self.is_closed()
    }

    /// Sleeps until a message may have arrived, or `deadline`. When
    /// `stalled`, wakes up soon to check the writer in front.
    pub(crate) fn wait_not_empty(&self, deadline: Option<Instant>, stalled: bool) -> bool {
        if stalled {
            // Usually a live producer between its claim and its publish (a
            // few dozen nanoseconds): watch the slot a little before
            // giving the CPU away.
            let h = self.u64w(W_HEAD).load(Ordering::Relaxed);
            let slot = self.state(self.split(h).1);
            let s = slot.load(Ordering::Relaxed);
            for _ in 0..64 {
                std::hint::spin_loop();
                if slot.load(Ordering::Relaxed) != s {
                    return true;
                }
            }
            std::thread::yield_now();
            return deadline.is_none_or(|dl| Instant::now() < dl);
        }
        self.wait_on(H_NOT_EMPTY, H_CONS_WAIT, deadline, || self.maybe_ready())
    }

    // -----------------------------------------------------------------
    // Joinable queues.

    //
    // The unfinished-task count is not a counter that `put` increments: a
    // producer killed between reserving its slot and counting would leave
    // it off by one, whichever order the two steps come in. It is derived
    // from three monotonic numbers instead,
    //
    //     unfinished = positions reserved - tombstones - task_done calls,
    //
    // where every reserved position ends exactly one way: published (a
    // consumer takes it; the user calls `task_done`) or tombstoned (by the
    // consumer who gave up on a dead or stalled writer, or by the writer
    // itself), and the one who tombstones it counts it after the winning
    // CAS. A put in progress counts as unfinished, as in Python (whose
    // `put` counts before its feeder thread sends).

    /// Unfinished tasks, never below the true value at the moment `tail` is
    /// read: `done` and `tombs` only grow and are read first.
    fn unfinished(&self) -> u64 {
        let done = self.u64w(W_DONE).load(Ordering::SeqCst);
        let tombs = self.u64w(W_TOMBS).load(Ordering::SeqCst);
        let tail = self.u64w(W_TAIL).load(Ordering::SeqCst);
        self.count(tail).saturating_sub(tombs).saturating_sub(done)
    }

    fn count_tombstone(&self) {
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
                return Err(Error::invalid(
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

    // -----------------------------------------------------------------
    // The side channel.

    /// Prepares a message that travels beside the ring: in the datagram
    /// itself when small, else in a memfd of its own.
    pub(crate) fn prepare_side(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<SideMsg> {
        if bytes.len() <= DGRAM_INLINE_MAX {
            return Ok(SideMsg {
                inline: bytes.to_vec(),
                len: bytes.len() as u64,
                mem: None,
                fds,
            });
        }
        let mem = Mapping::create("multiproc-queue-message", bytes.len())?;
        mem.write(0, bytes)?;
        Ok(SideMsg {
            inline: Vec::new(),
            len: bytes.len() as u64,
            mem: Some(mem),
            fds,
        })
    }

    fn send_side(&self, pos: u64, side: &SideMsg) -> Result<()> {
        let mut head = [0u8; DGRAM_HEADER];
        head[..8].copy_from_slice(&pos.to_le_bytes());
        head[8..16].copy_from_slice(&side.len.to_le_bytes());
        head[16..20].copy_from_slice(&(side.mem.is_some() as u32).to_le_bytes());
        let mut raw = Vec::with_capacity(side.fds.len() + 1);
        if let Some(mem) = &side.mem {
            raw.push(std::os::fd::AsRawFd::as_raw_fd(&mem.fd()));
        }
        raw.extend(side.fds.iter().map(std::os::fd::AsRawFd::as_raw_fd));
        if raw.len() > sys::MAX_FDS_PER_MSG {
            return Err(Error::invalid("too many handles in one queue message"));
        }
        self.send_dgram(&[&head, &side.inline], &raw)
    }

    fn send_dgram(&self, parts: &[&[u8]], raw: &[std::os::fd::RawFd]) -> Result<()> {
        let slices: Vec<std::io::IoSlice<'_>> =
            parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        loop {
            match sys::send_with_fds(self.tx.as_fd(), &slices, raw) {
                Ok(_) => return Ok(()),
                Err(Errno::EAGAIN) => {
                    sys::poll_one(
                        self.tx.as_fd(),
                        PollFlags::POLLOUT,
                        Some(Duration::from_millis(100)),
                    )?;
                }
                Err(e) => return Err(Error::errno("queue side channel send", e)),
            }
        }
    }

    /// Receives the side-channel message of position `pos` (already taken
    /// from the ring). Messages of other positions are passed back to the
    /// channel, or dropped if their position was abandoned.
    fn recv_side(&self, pos: u64, out: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> Result<()> {
        let mut buf = vec![0u8; DGRAM_HEADER + DGRAM_INLINE_MAX];
        let start = Instant::now();
        loop {
            let mut got = Vec::new();
            let n = match sys::recv_with_fds(self.rx.as_fd(), &mut buf, &mut got) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => {
                    if start.elapsed() > SIDE_GIVE_UP {
                        return Err(Error::Decode {
                            message: "a queue message was lost by a consumer that died".into(),
                        });
                    }
                    sys::poll_one(
                        self.rx.as_fd(),
                        PollFlags::POLLIN,
                        Some(Duration::from_millis(10)),
                    )?;
                    continue;
                }
                Err(e) => return Err(Error::errno("queue side channel recv", e)),
            };
            if n < DGRAM_HEADER {
                continue;
            }
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[i..i + 8]);
                u64::from_le_bytes(b)
            };
            let their = word(0);
            let len = word(8);
            let in_mem = buf[16] != 0;
            if their != pos {
                let (lap, idx) = self.split(their);
                let abandoned = lap_diff(self.state(idx).load(Ordering::Acquire), lap) > 0;
                if !abandoned {
                    let raw: Vec<_> = got.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
                    self.send_dgram(&[&buf[..n]], &raw)?;
                }
                continue;
            }
            let mut got = got.into_iter();
            if in_mem {
                let mem = got.next().ok_or_else(|| Error::Decode {
                    message: "a large queue message arrived without its memory".into(),
                })?;
                let map = Mapping::from_fd(mem)?;
                let len = usize::try_from(len).map_err(|_| Error::invalid("message too large"))?;
                out.resize(len, 0);
                map.read(0, out)?;
            } else {
                let len = (len as usize).min(n - DGRAM_HEADER);
                out.extend_from_slice(&buf[DGRAM_HEADER..DGRAM_HEADER + len]);
            }
            fds.extend(got);
            return Ok(());
        }
    }
}

/// The outcome of one attempt to claim a slot.
pub(crate) enum Claimed<'a> {
    Slot(Claim<'a>),
    Full,
    Closed,
}

/// A slot claimed by this process for one message: published by
/// [`Claim::publish_inline`] or [`Claim::publish_side`], or turned into a
/// tombstone when dropped unpublished (an encoding error, a message that
/// does not fit, a panic in a `Serialize` impl), so a live process never
/// leaves a slot claimed.
pub(crate) struct Claim<'a> {
    ring: &'a Ring,
    pos: u64,
    open: bool,
}

impl Claim<'_> {
    fn payload_off(&self) -> usize {
        self.ring.slot_off(self.ring.split(self.pos).1) + SLOT_HEADER
    }

    /// Runs `f` on the slot's payload area ([`INLINE_MAX`] bytes).
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
        Ok(self
            .ring
            .map
            .with_range_mut(self.payload_off(), INLINE_MAX, f)?)
    }

    /// A copy of the first `len` payload bytes written.
    pub(crate) fn written(&self, len: usize) -> Result<Vec<u8>> {
        Ok(self.ring.map.range(self.payload_off(), len)?.to_vec())
    }

    /// Publishes the `len` payload bytes written as the message.
    pub(crate) fn publish_inline(mut self, len: usize) {
        self.open = false;
        self.ring
            .publish(self.pos, KIND_INLINE, len.min(INLINE_MAX) as u32);
    }

    /// Sends `side` beside the ring and publishes the slot as its place in
    /// the queue. On failure the slot becomes a tombstone.
    pub(crate) fn publish_side(mut self, side: &SideMsg) -> Result<()> {
        self.ring.send_side(self.pos, side)?;
        self.open = false;
        self.ring.publish(self.pos, KIND_SIDE, 0);
        Ok(())
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.open {
            self.ring.tombstone(self.pos);
        }
    }
}

/// The outcome of one attempt to take a message.
pub(crate) enum Taken<'a> {
    Slot(Held<'a>),
    Empty,
    Closed,
}

/// A message taken from the head, still in its slot: released (the slot
/// handed back to producers) when this is dropped, also on a panic while
/// decoding.
pub(crate) struct Held<'a> {
    ring: &'a Ring,
    pos: u64,
}

impl Held<'_> {
    /// Runs `f` on the message's bytes and descriptors (read in place from
    /// the slot for inline messages), then releases the slot.
    pub(crate) fn read<R>(self, f: impl FnOnce(&[u8], Vec<OwnedFd>) -> R) -> Result<R> {
        let ring = self.ring;
        let idx = ring.split(self.pos).1;
        let (klen, kkind) = ring.meta(idx);
        if kkind.load(Ordering::Relaxed) == KIND_SIDE {
            let (mut bytes, mut fds) = (Vec::new(), Vec::new());
            ring.recv_side(self.pos, &mut bytes, &mut fds)?;
            drop(self);
            return Ok(f(&bytes, fds));
        }
        let len = (klen.load(Ordering::Relaxed) as usize).min(INLINE_MAX);
        let bytes = ring.map.range(ring.slot_off(idx) + SLOT_HEADER, len)?;
        let r = f(bytes, Vec::new());
        drop(self);
        Ok(r)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.ring.release(self.pos);
    }
}

/// A message prepared for the side channel.
#[derive(Debug)]
pub(crate) struct SideMsg {
    inline: Vec<u8>,
    len: u64,
    mem: Option<Mapping>,
    fds: Vec<OwnedFd>,
}

/// What a consumer remembers about the unpublished slot in front of it.
#[derive(Debug)]
pub(crate) struct Stall {
    /// The stalled position and when its writer was last checked.
    at: Option<(u64, Instant)>,
}

impl Stall {
    /// No stall seen yet (reads no clock: this is on every `get`).
    pub(crate) fn new() -> Stall {
        Stall { at: None }
    }

    pub(crate) fn active(&self) -> bool {
        self.at.is_some()
    }

    pub(crate) fn clear(&mut self) {
        self.at = None;
    }
}
