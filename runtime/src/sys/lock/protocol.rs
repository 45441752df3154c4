//! The lock word protocol itself, generic over its atomics ([`Word`],
//! [`Cell32`]) and over what it asks of the OS ([`Env`]: sleeping, waking,
//! asking whether a holder died), so that the real lock (std atomics,
//! futexes, `/proc`) and the loom model (loom's atomics, a modelled futex
//! and process table, `sys::lock::loom`) run this same code.
//!
//! # The word
//!
//! A lock word is 64 bits: `0` when free, else the holder packed as a
//! [`Holder`](crate::sys::ipc::Holder) (id in bits 0..31, start-time tag in
//! bits 32..64) with [`CONTENDED`] (bit 31) set when someone may be
//! sleeping on it. The futex sleeps on its low 32 bits (id and mark).
//! Taking the lock writes the holder's whole identity in the one CAS that
//! takes it, so there is no moment at which the lock is held by someone
//! the word does not identify.
//!
//! # Takeover, and why it never happens to a live holder
//!
//! A waiter that slept [`CHECK_EVERY`](super::CHECK_EVERY) without getting
//! the lock re-reads the word with `Acquire`; if it still holds the value
//! `w` it slept on, it asks [`Env::holder_dead`] about `w`'s holder and, if
//! that says dead, takes the lock with `CAS(w → me | CONTENDED)`.
//!
//! The CAS succeeds only if the word still holds `w`: the same id *and*
//! start-time tag, which no other live process or thread can have (short
//! of an id reused by one that started in the same clock tick, the limit
//! `Holder` documents). So the holder at the CAS is the holder that was
//! judged. The real
//! [`Env::holder_dead`] says dead only when the holder is in the waiter's
//! pid namespace and `/proc` proves that the id now names nothing, a
//! zombie, or a process or thread with another start time; never on
//! doubt.
//!
//! # The namespace register
//!
//! An id means something only in its pid namespace, and the word has no
//! room for one. So the lock keeps a register beside the word ([`register`]):
//! `0` until first taken, then the pid namespace of every process that has
//! taken or tried to take it, or [`NS_MIXED`] once two namespaces (or one
//! that could not be read) have. Every taker registers *before* its CAS,
//! which has `Release` ordering, so a waiter that reads a holder's value
//! with `Acquire` and then reads the register sees that holder's namespace
//! in it (the register only moves from 0 to one namespace to mixed). A
//! waiter trusts `/proc` only while the register holds its own namespace.
//! A lock ever used from two pid namespaces is therefore never taken over.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::sys::futex::Wake;
use crate::sys::ipc::HOLDER_ID_BITS;

/// Set in a lock word when a thread may be sleeping on it.
pub(crate) const CONTENDED: u64 = 1 << 31;

/// A namespace register that nobody has written yet.
pub(crate) const NS_NONE: u32 = 0;
/// A namespace register written from two pid namespaces (or from one that
/// could not be read): liveness checks are off for good.
pub(crate) const NS_MIXED: u32 = u32::MAX;

/// The holder in a word value: everything but [`CONTENDED`].
#[inline]
pub(crate) fn holder(value: u64) -> u64 {
    value & !CONTENDED
}

/// The holder's id (pid or tid) in a word value, 0 when free.
#[inline]
pub(crate) fn holder_id(value: u64) -> u32 {
    (value & HOLDER_ID_BITS) as u32
}

pub(crate) use crate::sys::word::{Cell32, Word};

/// What the protocol needs from its surroundings.
pub(crate) trait Env<W: ?Sized> {
    /// How many pause steps a waiter spends spinning before it sleeps.
    fn spin_pauses(&self) -> u32;
    /// One pause step of the spin.
    fn pause(&self);
    /// How long the next sleep may last, at most the liveness period;
    /// `None` once the deadline has passed.
    fn slice(&self, deadline: Option<Instant>) -> Option<Duration>;
    /// Sleeps while `word` holds `expected` (its futex half, for the real
    /// one), at most `timeout`.
    fn wait(&self, word: &W, expected: u64, timeout: Duration) -> Wake;
    /// Wakes one sleeper of `word`.
    fn wake(&self, word: &W);
    /// `true` only if `held` (a word value without [`CONTENDED`]), read
    /// with `Acquire` from the word just before, certainly names a holder
    /// that died. Doubt must answer `false`.
    fn holder_dead(&self, held: u64) -> bool;
}

/// How an acquire ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquired {
    /// Taken normally.
    Free,
    /// Taken over from a holder that died holding it.
    TakenOver,
    /// The deadline passed.
    TimedOut,
}

/// Writes this process's pid namespace `ns` (0: unknown) in the register,
/// before a first attempt to take the lock: one load when it is already
/// there.
#[inline]
pub(crate) fn register(register: &impl Cell32, ns: u32) {
    let seen = register.load(Ordering::Relaxed);
    if (seen == ns && ns != NS_NONE) || seen == NS_MIXED {
        return;
    }
    register_slow(register, ns, seen);
}

#[cold]
fn register_slow(register: &impl Cell32, ns: u32, seen: u32) {
    if ns != NS_NONE && ns != NS_MIXED && seen == NS_NONE {
        match register.compare_exchange(NS_NONE, ns, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) if now == ns || now == NS_MIXED => return,
            Err(_) => {}
        }
    }
    // Another namespace was here first, or ours is unknown. The register
    // only ever moves towards NS_MIXED, so a plain store cannot undo
    // anything.
    register.store(NS_MIXED, Ordering::Relaxed);
}

/// `true` if every process that ever took the lock is in pid namespace
/// `ns` (known, not 0), read after an `Acquire` read of the word.
#[inline]
pub(crate) fn register_is(register: &impl Cell32, ns: u32) -> bool {
    ns != NS_NONE && ns != NS_MIXED && register.load(Ordering::Acquire) == ns
}

/// One CAS: takes the free `word` for `me` (a packed holder).
#[inline]
pub(crate) fn try_acquire<W: Word>(word: &W, me: u64) -> bool {
    // Release as well: it publishes the namespace registration made just
    // before (free on x86, where every CAS is a full barrier).
    word.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

/// Takes `word` for `me` (a packed holder, [`CONTENDED`] clear), waiting
/// until `deadline` (`None`: no limit), taking it over if its holder died.
#[inline]
pub(crate) fn acquire<W: Word, E: Env<W>>(
    word: &W,
    me: u64,
    deadline: Option<Instant>,
    env: &E,
) -> Acquired {
    if try_acquire(word, me) {
        return Acquired::Free;
    }
    acquire_slow(word, me, deadline, env)
}

#[cold]
fn acquire_slow<W: Word, E: Env<W>>(
    word: &W,
    me: u64,
    deadline: Option<Instant>,
    env: &E,
) -> Acquired {
    // Spin with exponential backoff: a waiter that reads the word in a
    // tight loop pulls its cache line away from the holder on every read,
    // and the holder (which mostly re-takes the lock at once) then pays a
    // line transfer per acquisition. Reading at doubling intervals lets the
    // holder run its critical sections from its own cache in between.
    let budget = env.spin_pauses();
    let mut pause = 1u32;
    let mut spent = 0u32;
    while spent < budget {
        let v = word.load(Ordering::Relaxed);
        if v == 0 {
            if word
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Acquired::Free;
            }
        } else if v & CONTENDED != 0 {
            break;
        }
        for _ in 0..pause {
            env.pause();
        }
        spent += pause;
        pause = (pause * 2).min(super::MAX_PAUSE);
    }
    loop {
        let v = word.load(Ordering::Relaxed);
        if v == 0 {
            // Others may be asleep: keep the contended mark when taking it.
            if word
                .compare_exchange(0, me | CONTENDED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Acquired::Free;
            }
            continue;
        }
        let marked = v | CONTENDED;
        if v != marked
            && word
                .compare_exchange(v, marked, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            continue;
        }
        let Some(slice) = env.slice(deadline) else {
            return Acquired::TimedOut;
        };
        if env.wait(word, marked, slice) == Wake::TimedOut {
            let held = holder(marked);
            // The Acquire read synchronises with the holder's CAS (or a
            // later mark in its release sequence), so `holder_dead` sees
            // the holder's namespace registration.
            if held != me
                && word.load(Ordering::Acquire) == marked
                && env.holder_dead(held)
                && word
                    .compare_exchange(marked, me | CONTENDED, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                return Acquired::TakenOver;
            }
        }
    }
}

/// Frees `word`, waking one sleeper if any may be waiting.
#[inline]
pub(crate) fn release<W: Word, E: Env<W>>(word: &W, env: &E) {
    if word.swap(0, Ordering::Release) & CONTENDED != 0 {
        env.wake(word);
    }
}

/// A lock's shared parts: the word, its poison flag, its namespace
/// register.
#[derive(Debug)]
pub(crate) struct Parts<'a, W, C> {
    pub(crate) word: &'a W,
    pub(crate) poison: &'a C,
    pub(crate) register: &'a C,
}

// Manual: derived Clone/Copy would require `W: Copy` and `C: Copy`.
impl<W, C> Clone for Parts<'_, W, C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W, C> Copy for Parts<'_, W, C> {}

/// Registers `ns` (this process's pid namespace), then takes the lock for
/// `me` as [`acquire`] does (or tries once, if `wait` is false), and keeps
/// the poison flag: set on a takeover. `Some(poisoned)` once held
/// (poisoned: the flag is set, now or from before), `None` if not taken.
#[inline]
pub(crate) fn lock<W: Word, C: Cell32, E: Env<W>>(
    parts: Parts<'_, W, C>,
    ns: u32,
    me: u64,
    deadline: Option<Instant>,
    wait: bool,
    env: &E,
) -> Option<bool> {
    register(parts.register, ns);
    let got = if wait {
        acquire(parts.word, me, deadline, env)
    } else if try_acquire(parts.word, me) {
        Acquired::Free
    } else {
        Acquired::TimedOut
    };
    match got {
        Acquired::TimedOut => None,
        Acquired::TakenOver => {
            parts.poison.store(1, Ordering::Relaxed);
            Some(true)
        }
        Acquired::Free => Some(parts.poison.load(Ordering::Relaxed) != 0),
    }
}
