//! The shared ring under every queue: a bounded MPMC queue of fixed-size
//! slots in a memfd mapping (after Vyukov's sequence-number design), with
//! futex wake-ups that cost no syscall and no full fence while nobody
//! sleeps. Messages that do not fit a slot go to the slot's extent of a
//! sparse *arena* memfd; the descriptors of messages that carry handles
//! wait in a datagram socket.
//!
//! # Slot states
//!
//! Each slot starts with one state word: (lap, tag, who). The tag is
//! free, writing (claimed by producer `who`), ready (published), taken
//! (being read by consumer `who`) or tombstone (a position to skip). Every
//! transition that gives a slot to a process is one CAS that writes its
//! name, so a slot is never held without the name of its holder, and the
//! lap in the word rules out ABA.
//!
//! A process's name (`who`, 29 bits) is its *participant word*: when it
//! attaches to the ring (creates or receives it), before it can write any
//! word, it registers its pid namespace and takes an entry of the ring's
//! participant table, which holds its pid and start time; the name is the
//! entry's index and generation (see [`protocol`] for
//! the table and why a reused pid no longer keeps a dead holder's slot
//! held). It gives the entry back when the ring is dropped. A process that
//! finds the table full (more than [`ENTRIES`] live attachments) names
//! itself by its bare pid, judged as before by the pid alone.
//!
//! - A producer claims the slot at the tail with a CAS from "free in lap
//!   L" to "writing, P", moves the tail (a CAS others help with),
//!   writes the message and publishes it by storing "ready".
//! - A consumer takes the slot at the head with a CAS from "ready" to
//!   "taken, C", moves the head (others help, as with the tail),
//!   reads the message and releases the slot by storing "free in lap
//!   L+1". The head only ever moves past a taken slot or a tombstone, so a
//!   released slot's lap is never ahead of a fresh head or tail; a slot
//!   that says otherwise is corrupt (see below).
//!
//! The transitions of the state words and of the head and tail live in
//! [`protocol`], generic so that the `loom` model
//! (`queue::loom`) checks the same code; a won transition returns the
//! right ([`WriteRight`], [`ReadRight`]) from which the slot's payload
//! token is made (`try_claim`, `hold`: the ring's only `unsafe`).
//!
//! # Nothing waits while holding a slot for what a later position frees
//!
//! This is what makes the queue deadlock-free: the one thing a slot
//! holder may wait for is its own work (encoding, copying, a syscall on
//! its own extent), never room that only a later position can free.
//!
//! - **Large payloads** (over [`INLINE_MAX`] encoded) go into the arena: a
//!   memfd that is never mapped and never sized in advance, where slot `i`
//!   owns the extent at `i << extent_shift` (1 TiB apart for rings of up
//!   to 4 Mi slots). The producer that holds the slot `pwrite`s the
//!   message there (a 16-byte header, its length and position, then the
//!   bytes); the consumer that holds it `pread`s it, then punches the
//!   extent's pages out (`fallocate(PUNCH_HOLE)`) before releasing the
//!   slot. The file is sparse: only messages in the queue use memory. No
//!   allocator, no shared buffer to run out of: a `bounded(n)` queue holds
//!   `n` messages of any size, and no producer waits on another.
//! - **Handles** (descriptors) travel in one small datagram per message,
//!   `(position, count)` plus SCM_RIGHTS, on a socket pair shared by every
//!   process. The producer sends it while it holds its slot, *without
//!   waiting*: if the socket is full it tombstones its slot, waits for room
//!   holding nothing, and claims again. A datagram stays in the socket
//!   until its position is done: the consumer of a position walks the
//!   socket with `MSG_PEEK` (with `SO_PEEK_OFF`, one datagram at a time,
//!   under a small shared lock that only walkers take) and receives
//!   duplicates of its descriptors; datagrams at the front whose positions
//!   are done are removed by the walkers. So no datagram is ever only in
//!   a process that may die, and nothing is sent back.
//!
//! # Crash safety
//!
//! - A consumer behind an unpublished slot checks its writer every few
//!   milliseconds (sleeping meanwhile). A dead writer's claim is taken
//!   over by a CAS from its own word (which cannot race with it: it is
//!   dead), its extent punched and the slot turned into a tombstone. So a
//!   message is published whole once, or dropped because its `put` never
//!   returned. A live producer that fails (encode error, panic, no room
//!   for its handles) tombstones its own slot.
//! - A consumer that dies while it holds a taken slot (between its CAS and
//!   its release: inside `get`, before `get` returned) is found by the
//!   scan a consumer makes when it has to sleep on an empty queue, or
//!   calls `try_get` on one (at most every [`RECOVER_EVERY`] per process,
//!   and not while the head has not moved since a scan that found no slot
//!   taken): the slot is taken over by CAS from the
//!   dead consumer's word and its message **delivered again**, to the
//!   consumer that found it, out of order. Its bytes are still in the slot
//!   or its extent and its descriptors still in the socket, so the copy is
//!   exact; and since the dead `get` never returned, the message reaches
//!   user code once. Two exceptions, both documented on `Queue`: an arena
//!   message whose consumer had finished decoding it (it marks the slot
//!   consumed before punching the extent) counts as delivered; and a
//!   message whose second consumer dies too is dropped (a message that
//!   kills its decoder must not kill every consumer in turn). A dropped
//!   message counts as a tombstone, so `JoinableQueue::join` still returns.
//! - A process that dies holding the side lock is detected the same way
//!   (the lock word holds its name) and the lock taken over: a walk only
//!   peeks, so a dead walker loses nothing.
//!
//! A holder is dead when its entry's generation has moved on or the entry
//! was given back, or when `/proc` proves its process gone (its pid names
//! nothing, a zombie, or a process with another start time); a bare pid
//! when it names nothing or a zombie. Holders are judged by `/proc` only
//! while every process that attached is in our pid namespace (the
//! namespace register, as the lock's); `/proc` that cannot tell (hidden by
//! `hidepid`, not mounted, unreadable) means alive. So a slot is never
//! taken from a live process; a holder that cannot be judged keeps its
//! slot, and the queue waits behind it, as it would behind a live one.
//!
//! # Corruption
//!
//! Positions and state words read from shared memory are checked before
//! use: an index past the capacity, a lap that is neither the expected one
//! nor the one before it, an unknown tag or kind, a length past the slot
//! or the extent, an arena header that does not match its slot: each is an
//! error returned to the caller, never an out-of-bounds access, a panic or
//! an endless loop.
//!
//! # Files
//!
//! This file holds the header's layout, the slots and the arena; the side
//! socket and its lock are in [`side`], the unfinished-task count of
//! joinable queues in [`joinable`]. All three are `impl Ring`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::protocol::{
    self, Gate, Geometry, MAX_ENTRIES, PARTICIPANT, ReadRight, Refused, Roster, Slots, TAG_FREE,
    TAG_MASK, Take, WHO_MASK, WriteRight, lap_diff,
};
use crate::error::{Error, Result};
use crate::sys;
use crate::sys::futex;
use crate::sys::ipc::{self, Holder, Liveness};
use crate::sys::lock::protocol::{register, register_is};
use crate::sys::shm::{Exclusive, Mapping};

mod joinable;
mod side;

use self::side::SideLock;

const MAGIC: u64 = 0x6d70_7175_6575_6534; // "mpqueue4"
/// The header: a page of counters and flags, then a page of the
/// participant table.
const HEADER_BYTES: usize = 8192;
/// Bytes per slot: a 16-byte header (state word, length, kind) and the
/// inline payload.
pub(crate) const STRIDE: usize = 1088;
const SLOT_HEADER: usize = 16;
/// Largest message carried inline in a slot.
pub(crate) const INLINE_MAX: usize = STRIDE - SLOT_HEADER;
/// Bytes before a message in its arena extent (its length and position);
/// a message being prepared for the arena starts with this much room.
pub(crate) const ARENA_HEADER: usize = 16;
/// Largest extent per slot: 1 TiB (the arena is sparse).
const MAX_EXTENT_SHIFT: u32 = 40;

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
const H_SIDE_LOCK: usize = 320; // byte 1280: who walks the socket (as in a slot word), or 0
const H_NS: usize = 336; // byte 1344: the pid namespace register (see `sys::lock::protocol`)
/// Byte 4096: the participant table, [`ENTRIES`] entries of two words
/// (holder, generation; see `protocol::Roster`).
const W_TABLE: usize = 512;
/// Entries of the participant table.
const ENTRIES: usize = MAX_ENTRIES;

// A slot's kind word (written by the slot's holder only).
/// The bytes are in the slot's arena extent; the payload holds their
/// length (u64).
const K_ARENA: u32 = 1;
/// The message's descriptors wait in the side socket.
const K_FDS: u32 = 2;
/// Its consumer decoded it and is freeing its extent: never redelivered.
const K_CONSUMED: u32 = 4;
/// Delivered again once already (its first consumer died).
const K_REDELIVERED: u32 = 8;
/// Several items in one inline message (`Queue::put_many`): a count, then
/// the items back to back (see [`BATCH_HEADER`]). Never with `K_ARENA` or
/// `K_FDS`.
const K_BATCH: u32 = 16;
const K_KNOWN: u32 = K_ARENA | K_FDS | K_CONSUMED | K_REDELIVERED | K_BATCH;
/// Bytes before the items of a batch message: the item count (u32, little
/// endian) and four bytes of padding.
pub(crate) const BATCH_HEADER: usize = 8;
/// In a [`Held`] only, never in shared memory: drop the message (it
/// counts as a tombstone) instead of delivering it.
const K_DROP: u32 = 1 << 31;

/// In a ready word's holder bits: the message has handles.
const READY_FDS: u64 = 1;
/// How often a consumer stuck behind an unpublished slot checks its writer.
const LIVENESS_EVERY: Duration = Duration::from_millis(5);
/// How often (at most, per process) a consumer that finds the queue empty
/// looks for slots taken by dead consumers.
const RECOVER_EVERY: Duration = Duration::from_millis(10);
/// How long a sleeper that could not issue a global membarrier sleeps at a
/// time (a wake-up may be lost to a waker that only used a compiler fence).
const UNRELIABLE_SLEEP: Duration = Duration::from_millis(10);

/// A state word or position that the protocol cannot produce (kept out of
/// line: the fast paths only branch to it).
#[cold]
#[inline(never)]
fn bad_word(what: &'static str, value: u64, at: u64) -> Box<Error> {
    Box::new(corrupt(format!("{what} {value:#x} at position {at:#x}")))
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::io(
        "the queue's shared memory is corrupt",
        io::Error::new(io::ErrorKind::InvalidData, what.into()),
    )
}

/// The origin of this process's stall clock.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The shared state of one queue.
#[derive(Debug)]
pub(crate) struct Ring {
    map: Mapping,
    tx: OwnedFd,
    rx: OwnedFd,
    /// The sparse memfd of large payloads (never mapped).
    arena: OwnedFd,
    /// How positions map to slots (capacity, lap shift, index mask).
    geo: Geometry,
    /// Slot `i`'s arena extent starts at `i << extent_shift`.
    extent_shift: u32,
    /// How this process names itself in slot words and the side lock: its
    /// participant word, or its bare pid if it has no entry (see
    /// `protocol`).
    me: u64,
    /// This process's holder word in its entry (0: no entry).
    holder: u64,
    /// This process is registered for global membarriers: publishing needs
    /// only a compiler fence before checking for sleepers (see `wake_one`).
    light_wake: bool,
    /// The unpublished position this process last found at the head (plus
    /// one; 0: none), and when its writer was last checked (nanoseconds
    /// since [`epoch`], plus one; 0: not yet). Touched only while stuck.
    stall_pos: AtomicU64,
    stall_checked: AtomicU64,
    /// The last `try_take` of this process found a message waiting at the
    /// head (see `try_take`).
    backlog: std::sync::atomic::AtomicBool,
    /// When this process last looked for slots of dead consumers, the head
    /// then, and whether any slot was taken (by anyone) then.
    last_scan: Mutex<Option<(Instant, u64, bool)>>,
    /// Items of a batch message this process took but has not handed to
    /// its caller yet (a `get` takes one item of a batch), and whether
    /// there are any (read without the lock on every `get`).
    stash: Mutex<Stash>,
    stashed: std::sync::atomic::AtomicBool,
}

/// The undelivered rest of a batch message, in this process's memory: the
/// items' bytes as the message held them, and how many items they are.
#[derive(Debug, Default)]
pub(crate) struct Stash {
    pub(crate) bytes: Vec<u8>,
    pub(crate) left: usize,
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// The condition held while spinning (no sleep).
    Ready,
    /// Registered as a sleeper (and slept, unless the condition held at
    /// the re-check): the condition may hold now.
    Slept,
    /// The deadline passed.
    Deadline,
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
        let (tx, rx) = ipc::socketpair_dgram()?;
        sys::set_nonblocking(tx.as_fd(), true)?;
        sys::set_nonblocking(rx.as_fd(), true)?;
        let arena = nix::sys::memfd::memfd_create(
            c"multiproc-queue-arena",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| Error::errno("memfd_create", e))?;
        Ring::assemble(map, tx, rx, arena, cap as u64)
    }

    /// Bytes of the shared memory of a ring of `cap` slots.
    pub(crate) fn mapping_bytes(cap: u64) -> Option<usize> {
        usize::try_from(cap)
            .ok()
            .and_then(|cap| cap.checked_mul(STRIDE))
            .and_then(|b| b.checked_add(HEADER_BYTES))
    }

    /// A ring received from another process: its shared memory (mapped
    /// already) and its descriptors.
    pub(crate) fn from_fds(map: Mapping, tx: OwnedFd, rx: OwnedFd, arena: OwnedFd) -> Result<Ring> {
        if map.len() < HEADER_BYTES || map.atomics_u64()[W_MAGIC].load(Ordering::Relaxed) != MAGIC {
            return Err(corrupt("not a multiproc queue"));
        }
        let cap = map.atomics_u64()[W_CAP].load(Ordering::Relaxed);
        if cap == 0
            || cap > (1 << 48)
            || (cap as usize)
                .saturating_mul(STRIDE)
                .saturating_add(HEADER_BYTES)
                > map.len()
        {
            return Err(corrupt("an impossible capacity in the header"));
        }
        Ring::assemble(map, tx, rx, arena, cap)
    }

    /// The ring of `map` (checked) for this process, which joins it: it
    /// registers its pid namespace, then takes an entry of the participant
    /// table (see `protocol`), before it can name itself in any word.
    fn assemble(map: Mapping, tx: OwnedFd, rx: OwnedFd, arena: OwnedFd, cap: u64) -> Result<Ring> {
        let pid = u64::from(std::process::id());
        if pid == 0 || pid >= PARTICIPANT {
            return Err(Error::internal(
                "process id does not fit a queue slot word (Linux pids are below 2^22)",
            ));
        }
        let geo = Geometry::new(cap);
        let mut ring = Ring {
            map,
            tx,
            rx,
            arena,
            geo,
            extent_shift: MAX_EXTENT_SHIFT.min(62 - geo.shift),
            me: pid,
            holder: 0,
            light_wake: futex::barrier_registered(),
            stall_pos: AtomicU64::new(0),
            stall_checked: AtomicU64::new(0),
            backlog: std::sync::atomic::AtomicBool::new(false),
            last_scan: Mutex::new(None),
            stash: Mutex::new(Stash::default()),
            stashed: std::sync::atomic::AtomicBool::new(false),
        };
        register(ring.u32w(H_NS), ipc::pid_namespace());
        // Without a start time the entry would prove nothing: a holder of
        // tag 0 is never judged dead. A bare pid at least is, by `kill`.
        let holder = Holder::this_process();
        if holder.tag() != 0 {
            if let Some(who) = protocol::join(&ring, holder.to_word()) {
                ring.me = who;
                ring.holder = holder.to_word();
            }
        }
        Ok(ring)
    }

    pub(crate) fn fds(&self) -> [BorrowedFd<'_>; 4] {
        [
            self.map.fd(),
            self.tx.as_fd(),
            self.rx.as_fd(),
            self.arena.as_fd(),
        ]
    }

    pub(crate) fn capacity(&self) -> usize {
        self.geo.cap as usize
    }

    /// Bytes of the shared memory, for a copy of the handle.
    pub(crate) fn mapping_len(&self) -> usize {
        self.map.len()
    }

    fn u64w(&self, i: usize) -> &AtomicU64 {
        &self.map.atomics_u64()[i]
    }

    fn u32w(&self, i: usize) -> &AtomicU32 {
        &self.map.atomics_u32()[i]
    }

    /// `(lap, slot index)` of a position.
    fn split(&self, pos: u64) -> (u64, usize) {
        self.geo.split(pos)
    }

    /// How many positions come before `pos`.
    fn count(&self, pos: u64) -> u64 {
        self.geo.count(pos)
    }

    /// A position as its slot words see it (see [`Geometry::pos_id`]).
    fn pos_id(&self, pos: u64) -> u64 {
        self.geo.pos_id(pos)
    }

    fn slot_off(&self, idx: usize) -> usize {
        HEADER_BYTES + idx * STRIDE
    }

    /// The slot's length and kind words.
    fn meta(&self, idx: usize) -> (&AtomicU32, &AtomicU32) {
        let w = self.slot_off(idx) / 4 + 2;
        let words = self.map.atomics_u32();
        (&words[w], &words[w + 1])
    }

    fn payload_off(&self, idx: usize) -> usize {
        self.slot_off(idx) + SLOT_HEADER
    }

    /// `true` if this process holds items of a batch message not yet
    /// handed out (see [`Stash`]).
    #[inline(always)]
    pub(crate) fn has_stash(&self) -> bool {
        self.stashed.load(Ordering::Acquire)
    }

    /// Runs `f` on this process's stash, under its lock.
    pub(crate) fn with_stash<R>(&self, f: impl FnOnce(&mut Stash) -> R) -> R {
        let mut stash = lock(&self.stash);
        let r = f(&mut stash);
        if stash.left == 0 {
            stash.bytes = Vec::new();
        }
        self.stashed.store(stash.left != 0, Ordering::Release);
        r
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

    // -----------------------------------------------------------------
    // Producing.

    /// Publishes the claimed slot of `right`: its kind and length, then
    /// the ready word, then a wake-up.
    #[inline]
    fn publish(&self, right: WriteRight, kind: u32, len: u32) {
        let (klen, kkind) = self.meta(self.split(right.pos()).1);
        klen.store(len, Ordering::Relaxed);
        kkind.store(kind, Ordering::Relaxed);
        // A ready word carries READY_FDS for a message with handles, so
        // that a consumer's direct CAS from a plain ready word (see
        // `try_take`) never takes one without the side lock.
        let flags = if kind & K_FDS != 0 { READY_FDS } else { 0 };
        self.mark_ready(right, flags);
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
    #[inline]
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

    /// The fast path of a small message (at most [`SMALL`] bytes: a
    /// number's encoding): one attempt to claim the slot at the tail,
    /// write the bytes with relaxed word stores (atomic: no payload token
    /// needed; the publish orders them before the consumer's take) and
    /// publish. `false` if there was no slot to claim now (full, closed or
    /// corrupt): the general path tries again and says why.
    #[inline]
    pub(crate) fn try_put_small(&self, bytes: &[u8; SMALL], len: usize) -> bool {
        let Ok(Some(right)) = self.claim() else {
            return false;
        };
        let w = self.payload_off(self.split(right.pos()).1) / 8;
        let words = self.map.atomics_u64();
        for (i, chunk) in bytes.chunks_exact(8).enumerate().take(len.div_ceil(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            words[w + i].store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
        self.publish(right, 0, len.min(SMALL) as u32);
        true
    }

    /// One attempt to claim the slot at the tail for a message.
    #[inline]
    pub(crate) fn try_claim(&self) -> Claimed<'_> {
        match self.claim() {
            Ok(Some(right)) => {
                let off = self.payload_off(self.split(right.pos()).1);
                // SAFETY: `right` exists only because this process won the
                // CAS from "free" to "writing, our name" on this slot's word
                // (see `protocol`; the loom model checks it). From then on
                // no one else accesses the payload: producers need the
                // slot free, consumers need it ready, and a takeover needs
                // our name dead: our process gone, or our participant
                // entry given back, which only happens once this ring is
                // dropped, and the `Claim` borrows it. The `Claim` drops
                // the token before it
                // publishes or tombstones the slot (its release store).
                // The previous holder's release store happens-before our
                // acquire CAS. Within this process only `Claim` touches a
                // slot's payload (the ring's mapping is private to this
                // module, and no other code here reads or writes payload
                // bytes but through a token).
                let payload = unsafe { self.map.exclusive(off, INLINE_MAX) };
                match payload {
                    Ok(payload) => Claimed::Slot(Claim {
                        ring: self,
                        slot: Some((right, payload)),
                        in_arena: false,
                    }),
                    Err(e) => {
                        self.tombstone(right);
                        Claimed::Failed(Box::new(e.into()))
                    }
                }
            }
            Ok(None) => Claimed::Full,
            Err(Refused::Closed) => Claimed::Closed,
            Err(Refused::Corrupt(what, value, at)) => Claimed::Failed(bad_word(what, value, at)),
        }
    }

    /// The [`Held`] of a slot taken by this process (`right`), with the
    /// message's kind and the side lock if it has handles.
    #[inline]
    fn hold<'a>(&'a self, right: ReadRight, kind: u32, side: Option<SideLock<'a>>) -> Held<'a> {
        let off = self.payload_off(self.split(right.pos()).1);
        // SAFETY: `right` exists only because this process won the CAS to
        // "taken, our name" on this slot's word, from "ready" or from a
        // dead consumer's "taken" (see `protocol`; the loom model checks
        // it). While the slot is taken no one else accesses the payload:
        // producers need it free, other consumers need it ready, and a
        // takeover needs our name dead (as in `try_claim`: the `Held`
        // borrows this ring, so our entry is not given back while it
        // lives); the `Held` drops the token before it releases the slot. The writer's publish (release) happens-before
        // our acquire CAS. Within this process only `Claim` and `Held`
        // touch a slot's payload, each through its own token.
        let payload = unsafe { self.map.exclusive(off, INLINE_MAX) };
        Held {
            ring: self,
            slot: Some((right, payload.ok())),
            kind,
            side,
        }
    }

    /// Sleeps until a slot may have been released, or `deadline`.
    pub(crate) fn wait_not_full(&self, deadline: Option<Instant>) -> Wait {
        self.wait_on(
            H_NOT_FULL,
            H_PROD_WAIT,
            deadline,
            Duration::from_millis(100),
            || {
                let t = self.u64w(W_TAIL).load(Ordering::SeqCst);
                let (lap, idx) = self.split(t);
                self.checked_state(idx)
                    .is_none_or(|s| lap_diff(s.load(Ordering::SeqCst), lap) >= 0)
                    || self.is_closed()
            },
        )
    }

    /// Spins briefly, then registers as a waiter and sleeps on `word` until
    /// `ready()` or `deadline`, at most `slice` at a time.
    fn wait_on(
        &self,
        word: usize,
        waiters: usize,
        deadline: Option<Instant>,
        slice: Duration,
        ready: impl Fn() -> bool,
    ) -> Wait {
        for i in 0..200u32 {
            if ready() {
                return Wait::Ready;
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
                slice
            } else {
                slice.min(UNRELIABLE_SLEEP)
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
        if ok { Wait::Slept } else { Wait::Deadline }
    }

    // -----------------------------------------------------------------
    // Consuming.

    /// One attempt to take the message at the head. Handles a dead
    /// producer in front of the queue by turning its slot into a tombstone.
    /// `deadline` and `wait` bound the wait for the side lock (messages
    /// with handles): without `wait`, a few attempts only.
    ///
    /// Emptiness is read from the slot at the head alone (free in this
    /// lap, or still holding the previous lap): slots are claimed in
    /// position order, so a free slot at the head means nothing behind it
    /// is claimed either. Consumers never read the producers' tail line.
    ///
    /// Taking is one CAS on the slot's word. While this process finds
    /// messages waiting (a backlog: the usual case for a consumer that is
    /// behind), the CAS goes straight from the plain ready word: one
    /// transfer of the slot's line, in exclusive state, instead of a load
    /// and then an upgrade whose latency the locked CAS cannot hide. A
    /// consumer that has caught up loads first, so as not to take the
    /// line away from a producer writing it.
    #[inline]
    pub(crate) fn try_take(&self, deadline: Option<Instant>, wait: bool) -> Taken<'_> {
        // The side lock is taken before the slot, so that a consumer never
        // waits for it while holding a slot.
        let gate = |idx: usize| {
            let kind = self.meta(idx).1.load(Ordering::Relaxed);
            if kind & K_FDS == 0 {
                return Gate::Go((kind, None));
            }
            match self.lock_side(deadline, wait) {
                Some(l) => Gate::Go((kind, Some(l))),
                None => Gate::Busy,
            }
        };
        match self.take(gate) {
            Take::Slot(right, Some((kind, side))) => Taken::Slot(self.hold(right, kind, side)),
            // Taken by the direct CAS of a plain ready word (no handles):
            // its kind is read now that the slot is ours.
            Take::Slot(right, None) => {
                let kind = self
                    .meta(self.split(right.pos()).1)
                    .1
                    .load(Ordering::Relaxed);
                Taken::Slot(self.hold(right, kind, None))
            }
            Take::Empty => self.nothing(None),
            Take::Stalled(idx, s) => self.nothing(Some((idx, s))),
            Take::Busy => Taken::Busy,
            Take::Corrupt(what, value, at) => Taken::Failed(bad_word(what, value, at)),
        }
    }

    /// The fast path of a consumer: one attempt to take the message at the
    /// head; a plain inline message of at most [`SMALL`] bytes is read with
    /// relaxed word loads and its slot released at once
    /// ([`Quick::Bytes`]); another message is handed over taken
    /// ([`Quick::Held`]). [`Quick::Miss`]: nothing taken (empty, stalled,
    /// handles at the head, corrupt): the general path tries again and
    /// says why.
    #[inline]
    pub(crate) fn try_take_small(&self) -> Quick<'_> {
        // Messages with handles need the side lock: the general path.
        let gate = |idx: usize| {
            let kind = self.meta(idx).1.load(Ordering::Relaxed);
            if kind & K_FDS == 0 {
                Gate::Go(kind)
            } else {
                Gate::Busy
            }
        };
        let (right, kind) = match self.take(gate) {
            Take::Slot(right, Some(kind)) => (right, kind),
            Take::Slot(right, None) => {
                let kind = self
                    .meta(self.split(right.pos()).1)
                    .1
                    .load(Ordering::Relaxed);
                (right, kind)
            }
            _ => return Quick::Miss,
        };
        let idx = self.split(right.pos()).1;
        let len = self.meta(idx).0.load(Ordering::Relaxed) as usize;
        if kind != 0 || len > SMALL {
            return Quick::Held(self.hold(right, kind, None));
        }
        let w = self.payload_off(idx) / 8;
        let words = self.map.atomics_u64();
        let mut bytes = [0u8; SMALL];
        for (i, chunk) in bytes.chunks_exact_mut(8).enumerate().take(len.div_ceil(8)) {
            chunk.copy_from_slice(&words[w + i].load(Ordering::Relaxed).to_ne_bytes());
        }
        self.release(right);
        Quick::Bytes(bytes, len)
    }

    fn nothing(&self, stalled: Option<(usize, u64)>) -> Taken<'_> {
        if self.is_closed() {
            Taken::Closed
        } else {
            Taken::Empty(stalled)
        }
    }

    /// Called while the slot at `pos` (state `s`) is claimed but not
    /// published: every few milliseconds, checks whether its writer is
    /// alive, and if it died, takes its claim over (a CAS from the dead
    /// writer's own word, which cannot race with that writer), frees its
    /// extent and tombstones the slot (`true`). A live writer's word is
    /// never touched, so a message is either published whole once or
    /// dropped because its `put` never returned.
    ///
    /// The first sighting of a position reads no clock: it is usually a
    /// live producer a few nanoseconds from its publish.
    fn check_stalled(&self, pos: u64, s: u64) -> bool {
        let key = pos.wrapping_add(1);
        if self.stall_pos.load(Ordering::Relaxed) != key {
            self.stall_pos.store(key, Ordering::Relaxed);
            self.stall_checked.store(0, Ordering::Relaxed);
            return false;
        }
        let now = epoch().elapsed().as_nanos() as u64 + 1;
        let checked = self.stall_checked.load(Ordering::Relaxed);
        if checked == 0 || now.saturating_sub(checked) < LIVENESS_EVERY.as_nanos() as u64 {
            if checked == 0 {
                self.stall_checked.store(now, Ordering::Relaxed);
            }
            return false;
        }
        self.stall_checked.store(now, Ordering::Relaxed);
        self.take_over_writer(pos, s)
    }

    /// `true` if a `try_take` may find something (or the queue closed).
    fn maybe_ready(&self) -> bool {
        let h = self.u64w(W_HEAD).load(Ordering::SeqCst);
        let (lap, idx) = self.split(h);
        let Some(slot) = self.checked_state(idx) else {
            return true;
        };
        let s = slot.load(Ordering::SeqCst);
        let d = lap_diff(s, lap);
        d > 0 || (d == 0 && s & TAG_MASK != TAG_FREE) || self.is_closed()
    }

    /// Sleeps until a message may have arrived, or `deadline`. When
    /// `stalled` (slot index and its state word: a producer between its
    /// claim and its publish), until that slot changes, waking at least
    /// every [`LIVENESS_EVERY`] to check the writer.
    pub(crate) fn wait_not_empty(
        &self,
        deadline: Option<Instant>,
        stalled: Option<(usize, u64)>,
    ) -> Wait {
        let Some((idx, s)) = stalled else {
            return self.wait_on(
                H_NOT_EMPTY,
                H_CONS_WAIT,
                deadline,
                Duration::from_millis(100),
                || self.maybe_ready(),
            );
        };
        // Usually a live producer between its claim and its publish (a few
        // dozen nanoseconds): watch the slot a little before sleeping on
        // it (its publish wakes sleepers).
        let slot = self.state(idx);
        for _ in 0..64 {
            std::hint::spin_loop();
            if slot.load(Ordering::Relaxed) != s {
                return Wait::Ready;
            }
        }
        self.wait_on(H_NOT_EMPTY, H_CONS_WAIT, deadline, LIVENESS_EVERY, || {
            slot.load(Ordering::SeqCst) != s || self.is_closed()
        })
    }

    /// Looks for slots taken by consumers that died before releasing them
    /// (and tombstones left behind by dead skippers), at most every
    /// [`RECOVER_EVERY`] unless `force`, and not again while the head has
    /// not moved since a scan that found no slot taken (a slot is only
    /// taken at the head). A dead consumer's message is taken over and
    /// returned, to be delivered again; one that must not be (consumed, or
    /// already delivered again once) is dropped here.
    ///
    /// It reads every slot's word (a cache line each): callers scan only
    /// when the queue looked empty for a while (see `Queue::get`).
    pub(crate) fn recover(
        &self,
        deadline: Option<Instant>,
        wait: bool,
        force: bool,
    ) -> Option<Held<'_>> {
        let now = Instant::now();
        let head_now = self.u64w(W_HEAD).load(Ordering::Acquire);
        {
            let last = lock(&self.last_scan);
            if let Some((at, head, taken)) = *last {
                if !force
                    && (now.duration_since(at) < RECOVER_EVERY || (head == head_now && !taken))
                {
                    return None;
                }
            }
        }
        let mut taken = false;
        let found = self.scan(deadline, wait, &mut taken);
        *lock(&self.last_scan) = Some((now, head_now, taken || found.is_some()));
        found
    }

    fn scan(&self, deadline: Option<Instant>, wait: bool, taken: &mut bool) -> Option<Held<'_>> {
        // A dead consumer's message is delivered again unless it was
        // consumed or already delivered again once; the side lock is taken
        // before the slot, for one that has handles.
        let mut gate = |idx: usize| {
            let kind = self.meta(idx).1.load(Ordering::Relaxed);
            let again = kind & (K_CONSUMED | K_REDELIVERED) == 0;
            if again && kind & K_FDS != 0 {
                let side = self.lock_side(deadline, wait)?;
                return Some((kind, again, Some(side)));
            }
            Some((kind, again, None))
        };
        let mut from = 0;
        while let Some((idx, right, (kind, again, side))) =
            self.recover_from(from, taken, &mut gate)
        {
            from = idx + 1;
            let held = self.hold(right, if again { kind } else { kind | K_DROP }, side);
            if !again {
                drop(held);
                continue;
            }
            self.meta(idx)
                .1
                .store(kind | K_REDELIVERED, Ordering::Relaxed);
            return Some(held);
        }
        None
    }

    // -----------------------------------------------------------------
    // The arena.

    fn extent(&self, idx: usize) -> u64 {
        (idx as u64) << self.extent_shift
    }

    /// Largest message the arena takes.
    fn arena_max(&self) -> u64 {
        (1u64 << self.extent_shift) - ARENA_HEADER as u64
    }

    /// Writes `buf` (an [`ARENA_HEADER`] of room, then the message) to slot
    /// `idx`'s extent, filling in the header.
    fn write_arena(&self, idx: usize, pos: u64, buf: &mut [u8]) -> Result<()> {
        let len = (buf.len() - ARENA_HEADER) as u64;
        if len > self.arena_max() {
            return Err(Error::MessageTooLarge {
                size: len,
                limit: self.arena_max(),
            });
        }
        buf[..8].copy_from_slice(&len.to_le_bytes());
        buf[8..16].copy_from_slice(&self.pos_id(pos).to_le_bytes());
        let mut off = self.extent(idx);
        let mut rest: &[u8] = buf;
        while !rest.is_empty() {
            match nix::sys::uio::pwrite(&self.arena, rest, off as libc::off_t) {
                Ok(0) => {
                    return Err(Error::io(
                        "queue arena refused a write",
                        io::Error::from(io::ErrorKind::WriteZero),
                    ));
                }
                Ok(n) => {
                    rest = &rest[n..];
                    off += n as u64;
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::errno("queue arena write", e)),
            }
        }
        Ok(())
    }

    fn pread_exact(&self, mut off: u64, mut out: &mut [u8]) -> Result<()> {
        while !out.is_empty() {
            match nix::sys::uio::pread(&self.arena, out, off as libc::off_t) {
                Ok(0) => return Err(corrupt("an arena message ends early")),
                Ok(n) => {
                    out = &mut out[n..];
                    off += n as u64;
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::errno("queue arena read", e)),
            }
        }
        Ok(())
    }

    /// The message in slot `idx`'s extent (taken by us at `pos`, whose
    /// payload starts with `len_word`): checked against the slot (length
    /// and position) before anything is allocated.
    fn read_arena(&self, idx: usize, pos: u64, len_word: &[u8]) -> Result<Vec<u8>> {
        let len = len_word
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| corrupt("an arena message without its length"))?;
        if len > self.arena_max() {
            return Err(corrupt(format!("arena message length {len}")));
        }
        let mut head = [0u8; ARENA_HEADER];
        self.pread_exact(self.extent(idx), &mut head)?;
        let (hlen, hpos) = head.split_at(8);
        if hlen != len.to_le_bytes() || hpos != self.pos_id(pos).to_le_bytes() {
            return Err(corrupt("an arena message does not match its slot"));
        }
        let len = usize::try_from(len).map_err(|_| Error::MessageTooLarge {
            size: len,
            limit: usize::MAX as u64,
        })?;
        let mut out = Vec::new();
        out.try_reserve_exact(len)
            .map_err(|_| Error::MessageTooLarge {
                size: len as u64,
                limit: len as u64,
            })?;
        out.resize(len, 0);
        self.pread_exact(self.extent(idx) + ARENA_HEADER as u64, &mut out)?;
        Ok(out)
    }

    /// Frees slot `idx`'s extent (the caller holds the slot). A sparse
    /// range costs nothing to punch, so the whole extent goes.
    fn punch(&self, idx: usize) {
        use nix::fcntl::FallocateFlags as F;
        let _ = nix::fcntl::fallocate(
            &self.arena,
            F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
            self.extent(idx) as libc::off_t,
            (1i64 << self.extent_shift) as libc::off_t,
        );
    }
}

/// The ring's words and surroundings for the slot-state protocol.
impl Slots for Ring {
    type W = AtomicU64;

    #[inline(always)]
    fn geometry(&self) -> &Geometry {
        &self.geo
    }
    #[inline(always)]
    fn tail(&self) -> &AtomicU64 {
        self.u64w(W_TAIL)
    }
    #[inline(always)]
    fn head(&self) -> &AtomicU64 {
        self.u64w(W_HEAD)
    }
    #[inline(always)]
    fn state(&self, idx: usize) -> &AtomicU64 {
        &self.map.atomics_u64()[self.slot_off(idx) / 8]
    }
    #[inline(always)]
    fn me(&self) -> u64 {
        self.me
    }
    fn alive(&self, who: u64) -> bool {
        protocol::who_alive(self, who & WHO_MASK)
    }
    #[inline(always)]
    fn closed(&self) -> bool {
        self.is_closed()
    }
    #[inline(always)]
    fn backlog(&self) -> bool {
        self.backlog.load(Ordering::Relaxed)
    }
    #[inline(always)]
    fn set_backlog(&self, on: bool) {
        self.backlog.store(on, Ordering::Relaxed);
    }
    #[inline(always)]
    fn freed(&self) {
        self.wake_one(H_NOT_FULL, H_PROD_WAIT);
    }
    fn tombstoned(&self) {
        self.count_tombstone();
    }
    fn skipped(&self) {
        self.u64w(W_SKIPPED).fetch_add(1, Ordering::Relaxed);
    }
    fn left_tomb(&self) {
        self.wake_one(H_NOT_EMPTY, H_CONS_WAIT);
    }
    fn took_over_writer(&self, idx: usize) {
        self.punch(idx);
    }
    fn writer_stalled(&self, pos: u64, s: u64) -> bool {
        self.check_stalled(pos, s)
    }
}

/// The ring's participant table (in the header's second page) and how
/// this process judges the holders named there.
impl Roster for Ring {
    type W = AtomicU64;

    fn entries(&self) -> usize {
        ENTRIES
    }
    fn entry(&self, idx: usize) -> (&AtomicU64, &AtomicU64) {
        let w = W_TABLE + 2 * idx;
        (self.u64w(w), self.u64w(w + 1))
    }
    /// As the lock judges its holders: only while every process that
    /// joined the ring is in our pid namespace (the register), and `/proc`
    /// proves it dead.
    fn holder_dead(&self, holder: u64) -> bool {
        register_is(self.u32w(H_NS), ipc::pid_namespace())
            && Holder::from_word(holder).liveness() == Liveness::Dead
    }
    /// A bare pid: the same namespace condition, then the pid-only check
    /// (a reused pid reads as alive).
    fn pid_dead(&self, pid: u64) -> bool {
        register_is(self.u32w(H_NS), ipc::pid_namespace()) && !ipc::pid_alive(pid as u32)
    }
}

impl Drop for Ring {
    /// Gives the participant entry back: nothing of this process can hold
    /// a slot or the side lock in its name any more (every `Claim`,
    /// `Held` and `SideLock` borrows the ring).
    fn drop(&mut self) {
        if self.holder != 0 {
            protocol::leave(self, self.me, self.holder);
        }
    }
}

/// The outcome of one attempt to claim a slot.
pub(crate) enum Claimed<'a> {
    Slot(Claim<'a>),
    Full,
    Closed,
    /// Boxed: this enum is returned on every put.
    Failed(Box<Error>),
}

/// Why a prepared message was not published.
pub(crate) enum Publish {
    /// No room for its handles in the side socket: the slot was given up;
    /// wait for room ([`Ring::wait_side_room`]) and claim again.
    SideFull,
    Failed(Error),
}

/// A message encoded outside a slot: [`ARENA_HEADER`] bytes of room, then
/// its bytes; and its descriptors.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) buf: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

/// A slot claimed by this process for one message: published by
/// [`Claim::publish_inline`] or [`Claim::publish_out`], or turned into a
/// tombstone when dropped unpublished (an encoding error, a message that
/// does not fit, a panic in a `Serialize` impl), so a live process never
/// leaves a slot claimed.
pub(crate) struct Claim<'a> {
    ring: &'a Ring,
    /// The right to the slot and its payload ([`INLINE_MAX`] bytes);
    /// `None` once handed on.
    slot: Option<(WriteRight, Exclusive<'a>)>,
    /// Something was written to the slot's extent (freed if unpublished).
    in_arena: bool,
}

impl<'a> Claim<'a> {
    fn pos(&self) -> u64 {
        self.slot.as_ref().map_or(0, |(right, _)| right.pos())
    }

    fn idx(&self) -> usize {
        self.ring.split(self.pos()).1
    }

    #[inline]
    fn payload(&mut self) -> Result<&mut Exclusive<'a>> {
        match &mut self.slot {
            Some((_, payload)) => Ok(payload),
            None => Err(corrupt("a queue slot used after it was handed on")),
        }
    }

    /// Runs `f` on the slot's payload area ([`INLINE_MAX`] bytes).
    #[inline]
    pub(crate) fn write<R>(&mut self, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
        Ok(f(self.payload()?.bytes_mut()))
    }

    /// A copy of the first `len` payload bytes written.
    pub(crate) fn written(&mut self, len: usize) -> Result<Vec<u8>> {
        let bytes = self.payload()?.bytes();
        Ok(bytes[..len.min(bytes.len())].to_vec())
    }

    /// Hands the slot on: the payload token goes first, then the ready
    /// word is published.
    #[inline]
    fn hand_on(&mut self, kind: u32, len: u32) {
        if let Some((right, payload)) = self.slot.take() {
            payload.give_up();
            self.ring.publish(right, kind, len);
        }
    }

    /// Publishes the `len` payload bytes written as the message.
    #[inline]
    pub(crate) fn publish_inline(mut self, len: usize) {
        self.hand_on(0, len.min(INLINE_MAX) as u32);
    }

    /// Publishes the `len` payload bytes written as a batch message: a
    /// [`BATCH_HEADER`] holding the item count, then the items.
    pub(crate) fn publish_batch(mut self, len: usize) {
        self.hand_on(K_BATCH, len.min(INLINE_MAX) as u32);
    }

    /// Publishes `out`: in the slot if it fits, else in the slot's arena
    /// extent; its handles, if any, are sent to the side socket without
    /// waiting. On failure the slot becomes a tombstone; on
    /// [`Publish::SideFull`] `out` keeps its descriptors for another try.
    pub(crate) fn publish_out(mut self, out: &mut Outgoing) -> Result<(), Publish> {
        let len = out.buf.len().saturating_sub(ARENA_HEADER);
        let (mut kind, klen) = if len <= INLINE_MAX {
            let bytes = &out.buf[ARENA_HEADER..];
            self.write(|slot| slot[..len].copy_from_slice(bytes))
                .map_err(Publish::Failed)?;
            (0, len as u32)
        } else {
            self.in_arena = true;
            self.ring
                .write_arena(self.idx(), self.pos(), &mut out.buf)
                .map_err(Publish::Failed)?;
            self.write(|slot| slot[..8].copy_from_slice(&(len as u64).to_le_bytes()))
                .map_err(Publish::Failed)?;
            (K_ARENA, 8)
        };
        if !out.fds.is_empty() {
            if !self
                .ring
                .send_fds(self.pos(), &out.fds)
                .map_err(Publish::Failed)?
            {
                return Err(Publish::SideFull);
            }
            kind |= K_FDS;
            out.fds.clear();
        }
        self.hand_on(kind, klen);
        Ok(())
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some((right, payload)) = self.slot.take() {
            payload.give_up();
            if self.in_arena {
                self.ring.punch(self.ring.split(right.pos()).1);
            }
            self.ring.tombstone(right);
        }
    }
}

/// Largest message of the fast paths ([`Ring::try_put_small`],
/// [`Ring::try_take_small`]): two words.
pub(crate) const SMALL: usize = 16;

/// The outcome of [`Ring::try_take_small`].
pub(crate) enum Quick<'a> {
    /// A small plain message: its bytes (the first `.1`); its slot is
    /// released already.
    Bytes([u8; SMALL], usize),
    /// Another message, taken: decode it as usual.
    Held(Held<'a>),
    /// Nothing taken.
    Miss,
}

/// The outcome of one attempt to take a message.
pub(crate) enum Taken<'a> {
    Slot(Held<'a>),
    /// Nothing to take now; `Some((slot, state))` when stuck behind a
    /// producer between its claim and its publish.
    Empty(Option<(usize, u64)>),
    /// A message with handles is at the head, but another process held
    /// the side lock until the deadline (or, without waiting, for now).
    Busy,
    Closed,
    /// Boxed: this enum is returned on every get.
    Failed(Box<Error>),
}

/// A message taken by this process (its slot "taken, P"): released
/// (the slot handed back to producers, its extent freed) when this is
/// dropped, also on a panic while decoding.
pub(crate) struct Held<'a> {
    ring: &'a Ring,
    /// The right to the slot and its payload token (`None` if the payload
    /// could not be had: reading fails, releasing works); `None` once
    /// released.
    slot: Option<(ReadRight, Option<Exclusive<'a>>)>,
    kind: u32,
    /// The side lock, for a message with handles (released once they are
    /// found).
    side: Option<SideLock<'a>>,
}

impl Held<'_> {
    fn pos(&self) -> u64 {
        self.slot.as_ref().map_or(0, |(right, _)| right.pos())
    }

    /// The message is a batch (`Queue::put_many`): its bytes are a
    /// [`BATCH_HEADER`] and the items.
    pub(crate) fn is_batch(&self) -> bool {
        self.kind & K_BATCH != 0
    }

    /// Runs `f` on the message's bytes and descriptors (read in place from
    /// the slot for inline messages), then releases the slot.
    #[inline]
    pub(crate) fn read<R>(mut self, f: impl FnOnce(&[u8], Vec<OwnedFd>) -> R) -> Result<R> {
        let ring = self.ring;
        let pos = self.pos();
        let idx = ring.split(pos).1;
        if self.kind & !K_KNOWN != 0 {
            return Err(corrupt(format!("message kind {:#x}", self.kind)));
        }
        let fds = if self.kind & K_FDS != 0 {
            let fds = ring.take_fds(pos);
            self.side = None;
            fds?
        } else {
            Vec::new()
        };
        let Some((_, Some(payload))) = &self.slot else {
            return Err(corrupt("a queue slot without its payload"));
        };
        let payload = payload.bytes();
        if self.kind & K_ARENA != 0 {
            let bytes = ring.read_arena(idx, pos, payload)?;
            return Ok(f(&bytes, fds));
        }
        let len = ring.meta(idx).0.load(Ordering::Relaxed) as usize;
        let Some(bytes) = payload.get(..len) else {
            return Err(corrupt(format!("inline message length {len}")));
        };
        Ok(f(bytes, fds))
    }

    /// Hands the slot back: the payload token goes first.
    #[inline]
    fn release(&mut self) {
        if let Some((right, payload)) = self.slot.take() {
            if let Some(payload) = payload {
                payload.give_up();
            }
            self.ring.release(right);
        }
    }
}

impl Held<'_> {
    /// The rest of `drop` for a message that is not plain inline bytes.
    #[cold]
    fn finish(&mut self) {
        let ring = self.ring;
        let idx = ring.split(self.pos()).1;
        self.side = None;
        if self.kind & K_ARENA != 0 {
            // From here on the message counts as delivered: should we die
            // before the release, `recover` does not deliver it again
            // (its pages may be gone).
            ring.meta(idx)
                .1
                .store((self.kind & K_KNOWN) | K_CONSUMED, Ordering::Relaxed);
            ring.punch(idx);
        }
        if self.kind & K_DROP != 0 {
            ring.u64w(W_SKIPPED).fetch_add(1, Ordering::Relaxed);
            ring.count_tombstone();
        }
        self.release();
        if self.kind & K_FDS != 0 {
            ring.trim_side();
        }
    }
}

impl Drop for Held<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.kind & !K_BATCH == 0 {
            self.release();
        } else {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::{TAG_READY, TAG_TAKEN, TAG_WRITING, participant, word};
    use std::os::fd::AsRawFd;

    use super::side::{DGRAM_LEN, DGRAM_MAGIC};
    use super::*;
    use crate::sys::lock::protocol::NS_MIXED;

    fn dead_pid() -> u64 {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("reap");
        u64::from(pid)
    }

    fn put_inline(ring: &Ring, byte: u8) {
        let Claimed::Slot(mut c) = ring.try_claim() else {
            panic!("no room");
        };
        c.write(|b| b[0] = byte).expect("write");
        c.publish_inline(1);
    }

    fn take_byte(ring: &Ring) -> Result<u8> {
        match ring.try_take(None, false) {
            Taken::Slot(h) => h.read(|b, _| b[0]),
            Taken::Failed(e) => Err(*e),
            Taken::Empty(_) | Taken::Busy => Err(Error::Timeout),
            Taken::Closed => Err(Error::Closed),
        }
    }

    /// Publishes a message with one handle, then replaces its datagram in
    /// the side socket with one that declares `declared` descriptors and
    /// carries `attached`. Returns how many the message was given.
    fn forged_handles(ring: &Ring, pos: u64, declared: u32, attached: usize) -> Result<usize> {
        let open = || -> OwnedFd { std::fs::File::open("/dev/null").expect("open").into() };
        let Claimed::Slot(claim) = ring.try_claim() else {
            panic!("no room");
        };
        let mut out = Outgoing {
            buf: vec![0u8; ARENA_HEADER + 4],
            fds: vec![open()],
        };
        assert!(claim.publish_out(&mut out).is_ok());
        let mut real = Vec::new();
        let got = sys::recv_fds(ring.rx.as_fd(), &mut [0u8; 64], &mut real).expect("real");
        assert_eq!((got.bytes, real.len()), (DGRAM_LEN, 1));
        let mut d = [0u8; DGRAM_LEN];
        d[..4].copy_from_slice(&DGRAM_MAGIC.to_le_bytes());
        d[4..8].copy_from_slice(&declared.to_le_bytes());
        d[8..].copy_from_slice(&ring.pos_id(pos).to_le_bytes());
        let fds: Vec<OwnedFd> = (0..attached).map(|_| open()).collect();
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        sys::send_with_fds(ring.tx.as_fd(), &[io::IoSlice::new(&d)], &raw).expect("forge");
        match ring.try_take(None, false) {
            Taken::Slot(h) => h.read(|_, fds| fds.len()),
            _ => panic!("the message did not come"),
        }
    }

    #[test]
    fn a_message_gets_exactly_the_descriptors_its_datagram_declares() {
        let ring = Ring::create(4, false).expect("ring");
        assert_eq!(forged_handles(&ring, 0, 1, 3).expect("one of three"), 1);
        assert_eq!(forged_handles(&ring, 1, 0, 2).expect("none of two"), 0);
        let short = forged_handles(&ring, 2, 2, 1).expect_err("two declared, one came");
        assert!(
            short.to_string().contains("declares 2 handles, 1 arrived"),
            "{short}"
        );
        // The datagrams were all trimmed: the socket is empty again.
        assert_eq!(forged_handles(&ring, 3, 1, 1).expect("one"), 1);
        let mut rest = Vec::new();
        let left = sys::recv_fds(ring.rx.as_fd(), &mut [0u8; 64], &mut rest);
        assert!(left.is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock));
    }

    #[test]
    fn a_corrupt_head_or_tail_index_is_an_error() {
        // Capacity 3: indices run 0..4 in a position, 3 is never valid.
        let ring = Ring::create(3, false).expect("ring");
        ring.u64w(W_HEAD).store(3, Ordering::SeqCst);
        assert!(matches!(ring.try_take(None, false), Taken::Failed(_)));
        assert!(ring.maybe_ready());
        ring.u64w(W_TAIL).store(3, Ordering::SeqCst);
        assert!(matches!(ring.try_claim(), Claimed::Failed(_)));
        assert_eq!(ring.wait_not_full(Some(Instant::now())), Wait::Ready);
    }

    #[test]
    fn a_corrupt_state_word_is_an_error_not_a_hang() {
        let ring = Ring::create(4, false).expect("ring");
        // Slot 0 claims a lap far ahead of head and tail.
        ring.state(0).store(word(7, TAG_READY, 0), Ordering::SeqCst);
        assert!(matches!(ring.try_take(None, false), Taken::Failed(_)));
        assert!(matches!(ring.try_claim(), Claimed::Failed(_)));
        // Two laps behind.
        ring.u64w(W_HEAD)
            .store(2 << ring.geo.shift, Ordering::SeqCst);
        ring.u64w(W_TAIL)
            .store(2 << ring.geo.shift, Ordering::SeqCst);
        ring.state(0).store(word(0, TAG_READY, 0), Ordering::SeqCst);
        assert!(matches!(ring.try_take(None, false), Taken::Failed(_)));
        assert!(matches!(ring.try_claim(), Claimed::Failed(_)));
        // An unknown tag in the current lap.
        ring.state(0).store(word(2, 7 << 29, 0), Ordering::SeqCst);
        assert!(matches!(ring.try_take(None, false), Taken::Failed(_)));
        assert!(matches!(ring.try_claim(), Claimed::Failed(_)));
    }

    #[test]
    fn a_corrupt_length_or_kind_is_an_error_and_the_queue_goes_on() {
        let ring = Ring::create(4, false).expect("ring");
        put_inline(&ring, 1);
        ring.meta(0).0.store(u32::MAX, Ordering::SeqCst);
        assert!(take_byte(&ring).is_err());
        put_inline(&ring, 2);
        ring.meta(1).1.store(0x100, Ordering::SeqCst);
        assert!(take_byte(&ring).is_err());
        // An arena message whose length word lies.
        let Claimed::Slot(c) = ring.try_claim() else {
            panic!("no room");
        };
        let mut out = Outgoing {
            buf: vec![5u8; ARENA_HEADER + 5000],
            fds: Vec::new(),
        };
        assert!(c.publish_out(&mut out).is_ok());
        ring.map
            .store_bytes(ring.payload_off(2), &(1u64 << 50).to_le_bytes())
            .expect("poke");
        assert!(take_byte(&ring).is_err());
        put_inline(&ring, 9);
        assert_eq!(take_byte(&ring).expect("still works"), 9);
    }

    #[test]
    fn a_message_taken_by_a_dead_consumer_is_delivered_again_once() {
        let ring = Ring::create(2, false).expect("ring");
        put_inline(&ring, 42);
        put_inline(&ring, 43);
        let dead = dead_pid();
        // "Consumer `dead` took 42 and died before releasing it."
        let Taken::Slot(h) = ring.try_take(None, false) else {
            panic!("nothing to take");
        };
        std::mem::forget(h);
        let s = ring.state(0).load(Ordering::SeqCst);
        ring.state(0)
            .store((s & !WHO_MASK) | dead, Ordering::SeqCst);
        assert_eq!(take_byte(&ring).expect("43"), 43);
        // Slot 0 is still taken: full until it is recovered.
        assert!(matches!(ring.try_claim(), Claimed::Full));
        assert!(matches!(ring.try_take(None, false), Taken::Empty(None)));
        let again = ring.recover(None, false, true).expect("recovered");
        let mut byte = [0u8];
        ring.map
            .load_bytes(ring.payload_off(0), &mut byte)
            .expect("byte");
        assert_eq!(byte, [42]);
        // Its second consumer dies too: dropped, not delivered a third time.
        std::mem::forget(again);
        let s = ring.state(0).load(Ordering::SeqCst);
        ring.state(0)
            .store((s & !WHO_MASK) | dead, Ordering::SeqCst);
        let tombs = ring.u64w(W_TOMBS).load(Ordering::SeqCst);
        assert!(ring.recover(None, false, true).is_none());
        assert_eq!(ring.u64w(W_TOMBS).load(Ordering::SeqCst), tombs + 1);
        put_inline(&ring, 44);
        assert_eq!(take_byte(&ring).expect("44"), 44);
    }

    #[test]
    fn a_live_holder_of_a_slot_or_the_side_lock_does_not_hold_a_wait_past_its_deadline() {
        let ring = Ring::create(4, false).expect("ring");
        let Claimed::Slot(claim) = ring.try_claim() else {
            panic!("no room");
        };
        // A live writer in front: nothing to take, and the wait ends.
        let Taken::Empty(stall) = ring.try_take(None, false) else {
            panic!("took an unpublished slot");
        };
        assert!(stall.is_some());
        let soon = Instant::now() + Duration::from_millis(20);
        let ended = (0..100_000).any(|_| ring.wait_not_empty(Some(soon), stall) == Wait::Deadline);
        assert!(ended, "the wait behind a live writer did not end");
        drop(claim);
        // A message with handles while another holds the side lock.
        let (a, _b) = ipc::socketpair_dgram().expect("fds");
        let Claimed::Slot(claim) = ring.try_claim() else {
            panic!("no room");
        };
        let mut out = Outgoing {
            buf: vec![0u8; ARENA_HEADER + 4],
            fds: vec![a],
        };
        assert!(claim.publish_out(&mut out).is_ok());
        ring.u32w(H_SIDE_LOCK).store(1, Ordering::SeqCst); // init: alive
        assert!(matches!(ring.try_take(None, false), Taken::Busy));
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(matches!(ring.try_take(Some(soon), true), Taken::Busy));
        ring.u32w(H_SIDE_LOCK).store(0, Ordering::SeqCst);
        match ring.try_take(None, false) {
            Taken::Slot(h) => {
                let n = h.read(|_, fds| fds.len()).expect("read");
                assert_eq!(n, 1);
            }
            _ => panic!("the message with a handle did not come"),
        }
    }

    /// Another attachment of `ring`'s queue in this process, as a process
    /// that receives the queue makes.
    fn attach_again(ring: &Ring) -> Ring {
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().expect("dup");
        let map = Mapping::from_fd(dup(ring.map.fd())).expect("map");
        Ring::from_fds(
            map,
            dup(ring.tx.as_fd()),
            dup(ring.rx.as_fd()),
            dup(ring.arena.as_fd()),
        )
        .expect("attach")
    }

    /// A holder that certainly died: our pid with another start time (an
    /// earlier process that had our pid, which we reuse).
    fn dead_holder() -> u64 {
        let me = Holder::this_process();
        Holder::new(me.id(), me.tag().wrapping_add(1).max(1)).to_word()
    }

    fn me_word() -> u64 {
        Holder::this_process().to_word()
    }

    /// Sets entry `idx` of the table to `holder` in generation `generation`.
    fn forge_entry(ring: &Ring, idx: usize, holder: u64, generation: u64) {
        let (h, g) = ring.entry(idx);
        g.store(generation, Ordering::SeqCst);
        h.store(holder, Ordering::SeqCst);
    }

    #[test]
    fn joining_takes_a_free_entry_and_leaving_gives_it_back() {
        let ring = Ring::create(4, false).expect("ring");
        assert_eq!(ring.me, participant(0, 1));
        assert_eq!(ring.entry(0).0.load(Ordering::SeqCst), me_word());
        let second = attach_again(&ring);
        assert_eq!(second.me, participant(1, 1));
        assert!(ring.alive(second.me) && second.alive(ring.me));
        drop(second);
        assert_eq!(ring.entry(1).0.load(Ordering::SeqCst), 0);
        // Whatever a participant that left may have left behind is free.
        assert!(!ring.alive(participant(1, 1)));
        let third = attach_again(&ring);
        assert_eq!(third.me, participant(1, 2));
        assert!(!ring.alive(participant(1, 1)), "an older generation");
        assert!(ring.alive(third.me));
        assert_eq!(
            u64::try_from(Ring::mapping_bytes(4).expect("size")).expect("size"),
            ring.mapping_len() as u64
        );
    }

    #[test]
    fn generation_and_holder_decide_and_a_mixed_namespace_trusts_generations_only() {
        let ring = Ring::create(4, false).expect("ring");
        forge_entry(&ring, 1, me_word(), 7);
        assert!(ring.alive(participant(1, 7)));
        assert!(!ring.alive(participant(1, 6)), "its entry moved on");
        forge_entry(&ring, 1, dead_holder(), 7);
        assert!(
            !ring.alive(participant(1, 7)),
            "its holder's pid was reused"
        );
        forge_entry(&ring, 1, 0, 7);
        assert!(!ring.alive(participant(1, 7)), "it left");
        // A bare pid, judged by the pid.
        let gone = dead_pid();
        assert!(!ring.alive(gone));
        assert!(ring.alive(u64::from(std::process::id())));
        // Another namespace joined: no holder is judged by `/proc` any
        // more, but a generation that moved on still proves a death.
        ring.u32w(H_NS).store(NS_MIXED, Ordering::SeqCst);
        forge_entry(&ring, 1, dead_holder(), 7);
        assert!(ring.alive(participant(1, 7)));
        assert!(ring.alive(gone));
        assert!(!ring.alive(participant(1, 6)));
    }

    #[test]
    fn a_dead_holders_entry_is_recycled_and_the_slots_it_held_are_recovered() {
        let ring = Ring::create(4, false).expect("ring");
        for idx in 1..ENTRIES {
            forge_entry(&ring, idx, dead_holder(), 5);
        }
        let writer = participant(1, 5);
        let reader = participant(2, 5);
        // The table is full of dead holders: the next process to join
        // takes the first one's entry, and the dead participant's slots
        // now name an older generation.
        let heir = attach_again(&ring);
        assert_eq!(heir.me, participant(1, 6));
        assert_eq!(ring.entry(1).0.load(Ordering::SeqCst), me_word());
        assert!(!ring.alive(writer) && !heir.alive(writer));
        assert!(ring.alive(heir.me));
        // "Participant 2 took 42 and died": delivered again.
        put_inline(&ring, 42);
        let Taken::Slot(h) = ring.try_take(None, false) else {
            panic!("nothing to take");
        };
        std::mem::forget(h);
        ring.state(0)
            .store(word(0, TAG_TAKEN, reader), Ordering::SeqCst);
        let again = heir.recover(None, false, true).expect("redelivered");
        assert_eq!(again.read(|b, _| b[0]).expect("read"), 42);
        // "Participant 1 claimed the next slot and died writing": skipped.
        let Claimed::Slot(c) = ring.try_claim() else {
            panic!("no room");
        };
        std::mem::forget(c);
        ring.state(1)
            .store(word(0, TAG_WRITING, writer), Ordering::SeqCst);
        put_inline(&heir, 43);
        assert!(ring.take_over_writer(1, word(0, TAG_WRITING, writer)));
        assert_eq!(take_byte(&ring).expect("43"), 43);
        // The heir's own claim is never taken over.
        let Claimed::Slot(c) = heir.try_claim() else {
            panic!("no room");
        };
        let s = ring.state(3).load(Ordering::SeqCst);
        assert_eq!(s & WHO_MASK, heir.me);
        assert!(!ring.take_over_writer(3, s));
        drop(c);
    }

    #[test]
    fn a_full_table_falls_back_to_bare_pids() {
        let ring = Ring::create(4, false).expect("ring");
        for idx in 1..ENTRIES {
            forge_entry(&ring, idx, me_word(), 1);
        }
        let late = attach_again(&ring);
        assert_eq!(late.me, u64::from(std::process::id()));
        put_inline(&late, 7);
        let Claimed::Slot(c) = late.try_claim() else {
            panic!("no room");
        };
        let s = ring.state(1).load(Ordering::SeqCst);
        assert_eq!(s & WHO_MASK, late.me);
        assert!(!ring.take_over_writer(1, s), "a live bare pid");
        drop(c);
        assert_eq!(take_byte(&ring).expect("7"), 7);
        drop(late);
        // Leaving without an entry gives none back.
        assert!((1..ENTRIES).all(|i| ring.entry(i).0.load(Ordering::SeqCst) == me_word()));
    }

    #[test]
    fn a_side_lock_held_by_a_dead_participant_is_taken_over_a_live_ones_is_not() {
        let ring = Ring::create(4, false).expect("ring");
        forge_entry(&ring, 1, me_word(), 3);
        ring.u32w(H_SIDE_LOCK)
            .store(participant(1, 3) as u32, Ordering::SeqCst);
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(ring.lock_side(Some(soon), true).is_none());
        forge_entry(&ring, 1, dead_holder(), 3);
        let patient = Instant::now() + Duration::from_secs(30);
        let side = ring.lock_side(Some(patient), true).expect("taken over");
        assert_eq!(
            u64::from(ring.u32w(H_SIDE_LOCK).load(Ordering::SeqCst)),
            ring.me
        );
        drop(side);
    }
}
