//! The process-shared lock word under every multiproc lock, and the guard
//! whose existence proves the lock is held (the one proof
//! [`Mapping::locked_slice_mut`](super::shm::Mapping::locked_slice_mut)
//! accepts).
//!
//! A lock word is `0` when free, else the holder's process id (or, for a
//! re-entrant lock, thread id, unique across processes in a pid namespace)
//! with [`CONTENDED`] set when someone may be sleeping on it. Uncontended
//! acquire is one CAS, release one swap (plus a futex wake only if
//! [`CONTENDED`] was set). A waiter spins briefly, reading the word at
//! doubling intervals, then sleeps on the word with a bounded futex timeout
//! ([`CHECK_EVERY`]); each time it wakes without the lock it asks whether
//! the holder still exists (`/proc/<id>/stat`: gone, zombie or dead means
//! dead) and, if not, takes the lock over with a CAS and reports it.
//! Detection is therefore only on the slow path and costs nothing when
//! uncontended.
//!
//! Why the *process* id for locks that guard data ([`RawGuard`]): when a
//! process is dead, no reference into the mapping can survive in it, so a
//! takeover can never create a second live `&mut` to the guarded data. A
//! thread that exits in a live process after leaking a guard (`mem::forget`,
//! `Box::leak`) may have handed a borrow of the data to another thread, so
//! it leaves the lock held forever, as std's `Mutex` does.
//!
//! Limits: a holder that died and whose id was reused by a new process or
//! thread before a waiter looked is taken for alive (pid_max is 4 194 304
//! on 64-bit Linux, so this needs the id space to wrap while the lock is
//! held by a dead thread).

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::futex::{self, Wake};

/// Set in a lock word when a thread may be sleeping on it.
pub(crate) const CONTENDED: u32 = 1 << 31;
const OWNER: u32 = !CONTENDED;

/// How often a sleeping waiter checks that the holder is still alive.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How many `pause` instructions a waiter spends spinning before it sleeps
/// (about 7 µs on this project's machines, on the order of a futex sleep
/// and wake-up).
const SPIN_PAUSES: u32 = 400;
/// The longest run of `pause`s between two reads of the word.
const MAX_PAUSE: u32 = 128;

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
}

static PID: AtomicU32 = AtomicU32::new(0);

/// This process's id, cached (the crate never forks without exec, so it
/// cannot change under us).
#[inline]
pub(crate) fn pid() -> u32 {
    let cached = PID.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let pid = std::process::id();
    PID.store(pid, Ordering::Relaxed);
    pid
}

/// The calling thread's id, cached (a `gettid` syscall the first time).
#[inline]
pub(crate) fn tid() -> u32 {
    TID.with(|cell| {
        let cached = cell.get();
        if cached != 0 {
            return cached;
        }
        let tid = nix::unistd::gettid().as_raw() as u32;
        cell.set(tid);
        tid
    })
}

/// `true` if thread `tid` no longer runs: it does not exist, or it is a
/// zombie (killed but not reaped yet) or dead. Reads `/proc`, so it is for
/// slow paths only. Unknown (permission denied...) counts as alive.
pub(crate) fn is_dead(tid: u32) -> bool {
    match std::fs::read(format!("/proc/{tid}/stat")) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(stat) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let after = stat
                .iter()
                .rposition(|&b| b == b')')
                .map_or(&stat[..0], |i| &stat[i + 1..]);
            matches!(
                after.iter().find(|b| !b.is_ascii_whitespace()),
                Some(b'Z' | b'X' | b'x')
            )
        }
    }
}

/// The owner thread id in a lock word value (0 when free).
#[inline]
pub(crate) fn owner(value: u32) -> u32 {
    value & OWNER
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

/// One CAS: takes the free `word` for holder `me` (a [`pid`] or [`tid`]).
#[inline]
pub(crate) fn try_acquire(word: &AtomicU32, me: u32) -> bool {
    word.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Takes `word` for holder `me` (a [`pid`] or [`tid`]), waiting until
/// `deadline` (`None`: no limit), taking it over if its holder died.
#[inline]
pub(crate) fn acquire(word: &AtomicU32, me: u32, deadline: Option<Instant>) -> Acquired {
    if try_acquire(word, me) {
        return Acquired::Free;
    }
    acquire_slow(word, me, deadline)
}

#[cold]
fn acquire_slow(word: &AtomicU32, me: u32, deadline: Option<Instant>) -> Acquired {
    // Spin with exponential backoff: a waiter that reads the word in a
    // tight loop pulls its cache line away from the holder on every read,
    // and the holder (which mostly re-takes the lock at once) then pays a
    // line transfer per acquisition. Reading at doubling intervals lets the
    // holder run its critical sections from its own cache in between.
    let mut pause = 1u32;
    let mut spent = 0u32;
    while spent < SPIN_PAUSES {
        let v = word.load(Ordering::Relaxed);
        if v == 0 {
            if word
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Acquired::Free;
            }
        } else if v & CONTENDED != 0 {
            break;
        }
        for _ in 0..pause {
            std::hint::spin_loop();
        }
        spent += pause;
        pause = (pause * 2).min(MAX_PAUSE);
    }
    loop {
        let v = word.load(Ordering::Relaxed);
        if v == 0 {
            // Others may be asleep: keep the contended mark when taking it.
            if word
                .compare_exchange(0, me | CONTENDED, Ordering::Acquire, Ordering::Relaxed)
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
        let mut slice = CHECK_EVERY;
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Acquired::TimedOut;
            }
            slice = slice.min(left);
        }
        if futex::wait(word, marked, Some(slice)) == Wake::TimedOut {
            let holder = owner(marked);
            if holder != me
                && is_dead(holder)
                && word
                    .compare_exchange(marked, me | CONTENDED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return Acquired::TakenOver;
            }
        }
    }
}

/// Frees `word`, waking one sleeper if any may be waiting.
#[inline]
pub(crate) fn release(word: &AtomicU32) {
    if word.swap(0, Ordering::Release) & CONTENDED != 0 {
        futex::wake(word, 1);
    }
}

/// A held lock: the lock word of a mapping (plus its poison flag), freed on
/// drop. Only [`RawGuard::lock`] and [`RawGuard::try_lock`] make one, and
/// only once the word holds this process's id: having one proves that no
/// other guard of the same word exists in any process (a takeover happens
/// only when the holding process is dead, see the module docs).
#[derive(Debug)]
pub(crate) struct RawGuard<'a> {
    word: &'a AtomicU32,
    poison: &'a AtomicU32,
}

impl<'a> RawGuard<'a> {
    /// Acquires `word` (see [`acquire`]). `Ok((guard, poisoned))`, where
    /// `poisoned` is true if a holder died holding it (now or before,
    /// until the flag is cleared) or panicked; `None` on timeout.
    #[inline]
    pub(crate) fn lock(
        word: &'a AtomicU32,
        poison: &'a AtomicU32,
        deadline: Option<Instant>,
    ) -> Option<(Self, bool)> {
        match acquire(word, pid(), deadline) {
            Acquired::TimedOut => None,
            Acquired::TakenOver => {
                poison.store(1, Ordering::Relaxed);
                Some((RawGuard { word, poison }, true))
            }
            Acquired::Free => Some((
                RawGuard { word, poison },
                poison.load(Ordering::Relaxed) != 0,
            )),
        }
    }

    /// One attempt, no waiting.
    #[inline]
    pub(crate) fn try_lock(word: &'a AtomicU32, poison: &'a AtomicU32) -> Option<(Self, bool)> {
        if try_acquire(word, pid()) {
            Some((
                RawGuard { word, poison },
                poison.load(Ordering::Relaxed) != 0,
            ))
        } else {
            None
        }
    }

    /// The lock word this guard holds.
    pub(crate) fn word(&self) -> &AtomicU32 {
        self.word
    }

    /// Frees the lock for a while (a condition variable's wait), then takes
    /// it again; `f` runs while it is free. Returns whether the lock is
    /// poisoned after re-acquiring.
    pub(crate) fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> (R, bool) {
        release(self.word);
        let r = f();
        let poisoned = acquire(self.word, pid(), None) == Acquired::TakenOver;
        if poisoned {
            self.poison.store(1, Ordering::Relaxed);
        }
        (r, self.poison.load(Ordering::Relaxed) != 0)
    }
}

impl Drop for RawGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.poison.store(1, Ordering::Relaxed);
        }
        release(self.word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_and_alive_threads() {
        assert!(!is_dead(tid()));
        assert!(!is_dead(std::process::id()));
        let t = std::thread::spawn(tid);
        let other = t.join().expect("thread");
        assert!(is_dead(other));
    }

    #[test]
    fn takes_over_from_a_dead_thread_id_but_not_from_a_leaked_guard() {
        // Thread-owned words (RLock) are taken over when the thread is gone.
        let word = AtomicU32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| assert!(try_acquire(&word, tid())));
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        assert_eq!(acquire(&word, tid(), Some(deadline)), Acquired::TakenOver);
        assert_eq!(owner(word.load(Ordering::Relaxed)), tid());
        release(&word);
        assert_eq!(word.load(Ordering::Relaxed), 0);
        // Data guards belong to the process: a guard leaked by a thread
        // that then exits keeps the lock (its borrows may still be alive).
        let poison = AtomicU32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| std::mem::forget(RawGuard::lock(&word, &poison, None)));
        });
        let soon = Instant::now() + CHECK_EVERY * 2;
        assert!(RawGuard::lock(&word, &poison, Some(soon)).is_none());
    }

    #[test]
    fn timeout_when_held_by_a_live_thread() {
        let word = AtomicU32::new(0);
        let poison = AtomicU32::new(0);
        let (held, _) = RawGuard::lock(&word, &poison, None).expect("free");
        std::thread::scope(|s| {
            s.spawn(|| {
                let deadline = Instant::now() + Duration::from_millis(30);
                assert!(RawGuard::lock(&word, &poison, Some(deadline)).is_none());
            });
        });
        drop(held);
    }
}
