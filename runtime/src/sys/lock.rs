//! The process-shared lock word under every multiproc lock, and the guard
//! whose existence proves the lock is held (the one proof
//! [`Region::locked_slice_mut`](super::shm::Region::locked_slice_mut)
//! accepts).
//!
//! A lock's region (its own mapping, or its cell of an arena) starts with a
//! [`LOCK_HEADER`] of 16 bytes:
//!
//! | bytes | what |
//! | --- | --- |
//! | 0..8 | the lock word (`u64`): 0 free, else the holder, see below |
//! | 8..12 | the poison flag (`u32`, 0 or 1) |
//! | 12..16 | the pid namespace register (`u32`, see [`protocol`]) |
//!
//! The word holds its holder as a [`Holder`]: process id (thread id for a
//! re-entrant lock) in bits 0..31 and the low 32 bits of that process's
//! (thread's) start time in bits 32..64, with [`protocol::CONTENDED`]
//! (bit 31) set when someone may be sleeping on it; the futex is the low
//! half. Uncontended acquire is one load (the namespace register, already
//! written) and one CAS, release one swap (plus a futex wake only if
//! contended). A waiter spins briefly, reading the word at doubling
//! intervals, then sleeps on the word with a bounded futex timeout
//! ([`CHECK_EVERY`]); each time it wakes without the lock it asks `/proc`
//! whether the holder is dead and, if so, takes the lock over with a CAS
//! and reports it. See [`protocol`] for why that can never take a lock
//! from a live holder: a reused pid carries another start time, a holder
//! in another pid namespace (or behind `hidepid`, or without a `/proc`)
//! is never judged dead.
//!
//! Why the *process* for locks that guard data ([`RawGuard`]): when a
//! process is dead, no reference into the mapping can survive in it, so a
//! takeover can never create a second live `&mut` to the guarded data. A
//! thread that exits in a live process after leaking a guard (`mem::forget`,
//! `Box::leak`) may have handed a borrow of the data to another thread, so
//! it leaves the lock held forever, as std's `Mutex` does.
//!
//! The protocol is model-checked with loom (threads over one shared word
//! stand in for processes, and a model of the process table answers the
//! liveness question), running the same generic code as the real lock:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p multiproc --release --lib sys::lock::loom
//! ```
//!
//! The 32-bit words of [`acquire`] and [`release`] (a Pipe's send lock)
//! run the same protocol with the thread id alone and the older check
//! (the id exists and is not a zombie): they can be fooled by a reused
//! id, which leaves them held for as long as the reusing thread lives.

// `--cfg loom` is set by hand (see above), not by a Cargo feature.
#![allow(unexpected_cfgs)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::futex::{self, Wake};
use super::ipc::{self, Holder, Liveness};

pub(crate) mod protocol;

#[cfg(all(test, loom))]
mod loom;

pub(crate) use protocol::Acquired;

/// How often a sleeping waiter checks that the holder is still alive.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How many `pause` instructions a waiter spends spinning before it sleeps
/// (about 7 µs on this project's machines, on the order of a futex sleep
/// and wake-up).
const SPIN_PAUSES: u32 = 400;
/// The longest run of `pause`s between two reads of the word.
const MAX_PAUSE: u32 = 128;

/// The 32-bit words of the older API: values are ids below 2^31 with the
/// contended mark in bit 31, so they fit.
impl protocol::Word for AtomicU32 {
    #[inline]
    fn load(&self, order: Ordering) -> u64 {
        u64::from(AtomicU32::load(self, order))
    }
    #[inline]
    fn store(&self, value: u64, order: Ordering) {
        AtomicU32::store(self, value as u32, order)
    }
    #[inline]
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        AtomicU32::compare_exchange(self, current as u32, new as u32, success, failure)
            .map(u64::from)
            .map_err(u64::from)
    }
    #[inline]
    fn swap(&self, value: u64, order: Ordering) -> u64 {
        u64::from(AtomicU32::swap(self, value as u32, order))
    }
}

/// The address of the futex half (bits 0..32) of a 64-bit lock word.
fn futex_half(word: &AtomicU64) -> *mut u32 {
    let low = if cfg!(target_endian = "big") { 1 } else { 0 };
    word.as_ptr().cast::<u32>().wrapping_add(low)
}

fn timespec(t: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    }
}

/// Sleeps while the futex half of `word` holds the low half of
/// `expected`, at most `timeout`.
fn wait64(word: &AtomicU64, expected: u64, timeout: Duration) -> Wake {
    let ts = timespec(timeout);
    // SAFETY: the futex half lies inside `word`, a valid, 8-byte aligned
    // atomic for the duration of the call (borrowed), so it is a valid,
    // aligned u32; `ts` is a live timespec. FUTEX_WAIT reads both and
    // writes neither (the kernel's 32-bit read of an atomic's half is not
    // a Rust access).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            futex_half(word),
            libc::FUTEX_WAIT,
            expected as u32,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        )
    };
    if rc == 0 {
        return Wake::Retry;
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::ETIMEDOUT => Wake::TimedOut,
        _ => Wake::Retry,
    }
}

/// Wakes one sleeper of `word`.
fn wake64(word: &AtomicU64) {
    // SAFETY: as in `wait64`; FUTEX_WAKE only uses the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            futex_half(word),
            libc::FUTEX_WAKE,
            1u32,
            0usize,
            0usize,
            0u32,
        )
    };
}

/// The time left before `deadline`, at most [`CHECK_EVERY`].
fn slice(deadline: Option<Instant>) -> Option<Duration> {
    match deadline {
        None => Some(CHECK_EVERY),
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(CHECK_EVERY))
        }
    }
}

/// The real surroundings of a 64-bit lock word: futexes, `/proc`, and the
/// lock's namespace register.
struct Real<'a> {
    register: &'a AtomicU32,
}

impl protocol::Env<AtomicU64> for Real<'_> {
    #[inline]
    fn spin_pauses(&self) -> u32 {
        SPIN_PAUSES
    }
    #[inline]
    fn pause(&self) {
        std::hint::spin_loop();
    }
    fn slice(&self, deadline: Option<Instant>) -> Option<Duration> {
        slice(deadline)
    }
    fn wait(&self, word: &AtomicU64, expected: u64, timeout: Duration) -> Wake {
        wait64(word, expected, timeout)
    }
    fn wake(&self, word: &AtomicU64) {
        wake64(word);
    }
    fn holder_dead(&self, held: u64) -> bool {
        protocol::register_is(self.register, ipc::pid_namespace())
            && Holder::from_word(held).liveness() == Liveness::Dead
    }
}

/// The surroundings of a 32-bit word of the older API: the id alone.
struct Legacy;

impl protocol::Env<AtomicU32> for Legacy {
    #[inline]
    fn spin_pauses(&self) -> u32 {
        SPIN_PAUSES
    }
    #[inline]
    fn pause(&self) {
        std::hint::spin_loop();
    }
    fn slice(&self, deadline: Option<Instant>) -> Option<Duration> {
        slice(deadline)
    }
    fn wait(&self, word: &AtomicU32, expected: u64, timeout: Duration) -> Wake {
        futex::wait(word, expected as u32, Some(timeout))
    }
    fn wake(&self, word: &AtomicU32) {
        futex::wake(word, 1);
    }
    fn holder_dead(&self, held: u64) -> bool {
        is_dead(protocol::holder_id(held))
    }
}

/// The calling thread's id, cached (a `gettid` syscall the first time).
#[inline]
pub(crate) fn tid() -> u32 {
    Holder::this_thread().id()
}

/// `true` if thread `tid` no longer runs: it does not exist (where `/proc`
/// shows every process of this namespace), or it is a zombie (killed but
/// not reaped yet) or dead. A reused id reads as alive. Reads `/proc`, so
/// it is for slow paths only. Unknown (permission denied...) counts as
/// alive.
pub(crate) fn is_dead(tid: u32) -> bool {
    match std::fs::read(format!("/proc/{tid}/stat")) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound && ipc::procfs_shows_all(),
        Ok(stat) => matches!(ipc::stat_state(&stat), Some(b'Z' | b'X' | b'x')),
    }
}

/// Takes the 32-bit `word` for thread or process id `me`, waiting until
/// `deadline` (`None`: no limit), taking it over if its holder died (the
/// older check: see the module docs).
#[inline]
pub(crate) fn acquire(word: &AtomicU32, me: u32, deadline: Option<Instant>) -> Acquired {
    protocol::acquire(word, u64::from(me), deadline, &Legacy)
}

/// Frees the 32-bit `word`, waking one sleeper if any may be waiting.
#[inline]
pub(crate) fn release(word: &AtomicU32) {
    protocol::release(word, &Legacy);
}

/// This process as a lock word names it (pid and start time), for records
/// of who is where (a barrier's parties).
#[inline]
pub(crate) fn this_process() -> u64 {
    me().0
}

/// This process's lock word value and pid namespace, cached in two plain
/// atomics for the fast path (one load each).
#[inline]
fn me() -> (u64, u32) {
    let word = ME.load(Ordering::Acquire);
    if word != 0 {
        return (word, MY_NS.load(Ordering::Relaxed));
    }
    me_slow()
}

static ME: AtomicU64 = AtomicU64::new(0);
static MY_NS: AtomicU32 = AtomicU32::new(0);

#[cold]
fn me_slow() -> (u64, u32) {
    // Never 0: a pid is not.
    let word = Holder::this_process().to_word();
    let ns = ipc::pid_namespace();
    MY_NS.store(ns, Ordering::Relaxed);
    ME.store(word, Ordering::Release);
    (word, ns)
}

/// Bytes at the start of a locked region: the 64-bit lock word, its
/// poison flag and its namespace register (see the module docs); locked
/// data starts at or after it.
pub(crate) const LOCK_HEADER: usize = 16;

/// The lock header at the start of a region: see the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header<'a> {
    word: &'a AtomicU64,
    poison: &'a AtomicU32,
    register: &'a AtomicU32,
}

impl<'a> Header<'a> {
    /// The header in the first [`LOCK_HEADER`] bytes of a region, seen as
    /// its 64-bit and its 32-bit words. The region must be at least
    /// [`LOCK_HEADER`] long: its type's size, checked when it was created
    /// or received (`Region::lock_header` is the one caller).
    #[inline]
    pub(crate) fn in_words(u64s: &'a [AtomicU64], u32s: &'a [AtomicU32]) -> Header<'a> {
        Header {
            word: &u64s[0],
            poison: &u32s[2],
            register: &u32s[3],
        }
    }

    #[inline]
    fn parts(&self) -> protocol::Parts<'a, AtomicU64, AtomicU32> {
        protocol::Parts {
            word: self.word,
            poison: self.poison,
            register: self.register,
        }
    }

    #[inline]
    fn env(&self) -> Real<'a> {
        Real {
            register: self.register,
        }
    }

    /// `true` if someone holds the lock now.
    pub(crate) fn is_locked(&self) -> bool {
        self.word.load(Ordering::Relaxed) != 0
    }

    /// `true` if some thread of some process holds the lock (a snapshot;
    /// sequentially consistent, for a "publish, then check the holder"
    /// handshake such as [`Condition`](crate::sync::Condition)'s deferred
    /// wake).
    pub(crate) fn is_held(&self) -> bool {
        self.word.load(Ordering::SeqCst) != 0
    }

    /// `true` if the poison flag is set.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poison.load(Ordering::Relaxed) != 0
    }

    /// Sets the poison flag (a holder that panicked).
    pub(crate) fn set_poison(&self) {
        self.poison.store(1, Ordering::Relaxed);
    }

    /// Clears the poison flag.
    pub(crate) fn clear_poison(&self) {
        self.poison.store(0, Ordering::Relaxed);
    }

    /// For a thread-owned lock (RLock): `true` if the calling thread holds
    /// it (the word names this thread, id and start time).
    pub(crate) fn held_by_this_thread(&self) -> bool {
        protocol::holder(self.word.load(Ordering::Relaxed)) == Holder::this_thread().to_word()
    }

    /// For a thread-owned lock (RLock): takes it for the calling thread,
    /// waiting until `deadline` if `wait`, else trying once. `Some(poisoned)`
    /// once held, `None` if not.
    pub(crate) fn lock_for_thread(&self, deadline: Option<Instant>, wait: bool) -> Option<bool> {
        protocol::lock(
            self.parts(),
            ipc::pid_namespace(),
            Holder::this_thread().to_word(),
            deadline,
            wait,
            &self.env(),
        )
    }

    /// For a thread-owned lock (RLock) held by the calling thread: frees
    /// it. Never for a lock whose holder is a [`RawGuard`].
    pub(crate) fn release_for_thread(&self) {
        protocol::release(self.word, &self.env());
    }

    /// `true` only if `party` (a value of [`this_process`] that some
    /// process wrote beside this lock while holding it, read while holding
    /// it) names a process that certainly died, judged as the lock judges
    /// its holders (same namespace register, same `/proc` checks).
    pub(crate) fn party_dead(&self, party: u64) -> bool {
        party != 0
            && party != this_process()
            && protocol::register_is(self.register, ipc::pid_namespace())
            && Holder::from_word(party).liveness() == Liveness::Dead
    }
}

/// A held lock: the header of a region, freed on drop. Only
/// [`RawGuard::lock`] and [`RawGuard::try_lock`] make one, and only once
/// the word names this process: having one proves that no other guard of
/// the same word exists in any process (a takeover happens only when the
/// holding process is dead, see [`protocol`]).
#[derive(Debug)]
pub(crate) struct RawGuard<'a> {
    header: Header<'a>,
}

impl<'a> RawGuard<'a> {
    #[inline]
    fn take(header: Header<'a>, deadline: Option<Instant>, wait: bool) -> Option<(Self, bool)> {
        let (me, ns) = me();
        let poisoned = protocol::lock(header.parts(), ns, me, deadline, wait, &header.env())?;
        Some((RawGuard { header }, poisoned))
    }

    /// Acquires the lock of `header`, waiting until `deadline` (`None`: no
    /// limit) and taking it over from a dead holder. `Some((guard,
    /// poisoned))`, where `poisoned` is true if a holder died holding it
    /// (now or before, until the flag is cleared) or panicked; `None` on
    /// timeout.
    #[inline]
    pub(crate) fn lock(header: Header<'a>, deadline: Option<Instant>) -> Option<(Self, bool)> {
        RawGuard::take(header, deadline, true)
    }

    /// One attempt, no waiting.
    #[inline]
    pub(crate) fn try_lock(header: Header<'a>) -> Option<(Self, bool)> {
        RawGuard::take(header, None, false)
    }

    /// The lock word this guard holds.
    pub(crate) fn word(&self) -> &AtomicU64 {
        self.header.word
    }

    /// Frees the lock for a while (a condition variable's wait), then takes
    /// it again; `f` runs while it is free. Returns whether the lock is
    /// poisoned after re-acquiring.
    pub(crate) fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> (R, bool) {
        let header = self.header;
        protocol::release(header.word, &header.env());
        let r = f();
        // Without a deadline the lock is always eventually taken.
        let (me, ns) = me();
        let mut poisoned = None;
        while poisoned.is_none() {
            poisoned = protocol::lock(header.parts(), ns, me, None, true, &header.env());
        }
        (r, header.is_poisoned())
    }
}

impl Drop for RawGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.header.set_poison();
        }
        protocol::release(self.header.word, &self.header.env());
    }
}

#[cfg(test)]
mod tests {
    use super::super::shm::{Mapping, Region};
    use super::*;

    /// A 16-byte lock header in a fresh mapping.
    fn mapping() -> Region {
        let map = Mapping::create("test-lock", LOCK_HEADER).expect("mapping");
        Region::whole(std::sync::Arc::new(map))
    }

    const SOON: Duration = Duration::from_millis(350);
    const PATIENT: Duration = Duration::from_secs(20);

    fn lock_within(header: Header<'_>, wait: Duration) -> Option<bool> {
        RawGuard::lock(header, Some(Instant::now() + wait)).map(|(guard, poisoned)| {
            drop(guard);
            poisoned
        })
    }

    #[test]
    fn dead_and_alive_threads() {
        assert!(!is_dead(tid()));
        assert!(!is_dead(std::process::id()));
        let t = std::thread::spawn(tid);
        let other = t.join().expect("thread");
        // A joined thread may still be finishing its exit in the kernel
        // for a moment (it clears its tid before it leaves /proc).
        let deadline = Instant::now() + PATIENT;
        while !is_dead(other) {
            assert!(Instant::now() < deadline, "thread {other} never went");
            std::thread::yield_now();
        }
    }

    #[test]
    fn old_words_take_over_from_a_dead_thread_id() {
        let word = AtomicU32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| assert!(protocol::try_acquire(&word, u64::from(tid()))));
        });
        let deadline = Instant::now() + PATIENT;
        assert_eq!(acquire(&word, tid(), Some(deadline)), Acquired::TakenOver);
        assert_eq!(word.load(Ordering::Relaxed), tid() | 1 << 31);
        release(&word);
        assert_eq!(word.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_guard_leaked_by_a_thread_keeps_the_lock() {
        // Data guards belong to the process: a guard leaked by a thread
        // that then exits keeps the lock (its borrows may still be alive).
        let map = mapping();
        let header = map.lock_header();
        std::thread::scope(|s| {
            s.spawn(|| std::mem::forget(RawGuard::lock(header, None)));
        });
        assert_eq!(lock_within(header, SOON), None);
    }

    #[test]
    fn timeout_when_held_by_a_live_thread() {
        let map = mapping();
        let header = map.lock_header();
        let (held, _) = RawGuard::lock(header, None).expect("free");
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(lock_within(header, Duration::from_millis(30)), None));
        });
        drop(held);
    }

    /// A process that lives until killed, and its identity.
    struct Sleeper(std::process::Child);

    impl Sleeper {
        fn start() -> Sleeper {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("spawn sleep");
            Sleeper(child)
        }
        fn holder(&self) -> Holder {
            // Read its start time as the sleeper itself would.
            let stat =
                std::fs::read(format!("/proc/{}/stat", self.0.id())).expect("stat of a live child");
            let (_, start) = ipc::parse_stat(&stat).expect("start time");
            Holder::new(self.0.id(), (start as u32).max(1))
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Writes `holder` in the lock word as if it had taken the lock, with
    /// the namespace register set to `ns`.
    fn forge(header: Header<'_>, holder: Holder, ns: u32) {
        header.word.store(holder.to_word(), Ordering::SeqCst);
        header.register.store(ns, Ordering::SeqCst);
    }

    #[test]
    fn a_live_holder_is_never_taken_over() {
        let sleeper = Sleeper::start();
        let map = mapping();
        let header = map.lock_header();
        forge(header, sleeper.holder(), ipc::pid_namespace());
        // Several liveness checks (every 100 ms) find it alive.
        assert_eq!(lock_within(header, SOON), None);
        assert_eq!(
            Holder::from_word(header.word.load(Ordering::SeqCst)),
            sleeper.holder()
        );
    }

    #[test]
    fn a_holder_whose_pid_was_reused_is_taken_over_with_poison() {
        // The holder died and its pid went to the sleeper, a live,
        // unrelated process: the start times differ.
        let sleeper = Sleeper::start();
        let live = sleeper.holder();
        let dead = Holder::new(live.id(), live.tag().wrapping_sub(1).max(1));
        assert_ne!(dead, live);
        let map = mapping();
        let header = map.lock_header();
        forge(header, dead, ipc::pid_namespace());
        assert_eq!(lock_within(header, PATIENT), Some(true));
        assert!(header.is_poisoned());
        assert!(!header.is_locked());
        // The same holds when the dead holder's pid is now ours.
        let me = Holder::this_process();
        forge(
            header,
            Holder::new(me.id(), me.tag().wrapping_add(1).max(1)),
            ipc::pid_namespace(),
        );
        assert_eq!(lock_within(header, PATIENT), Some(true));
    }

    #[test]
    fn a_holder_in_another_pid_namespace_is_never_taken_over() {
        // Its pid names nothing here (or someone else): neither proves it
        // dead, since ids mean something only in their own namespace.
        let sleeper = Sleeper::start();
        let other_ns = ipc::pid_namespace().wrapping_add(1).max(1);
        let map = mapping();
        let header = map.lock_header();
        // A pid that names nobody here: the sleeper's, once reaped.
        let gone = sleeper.holder();
        drop(sleeper);
        for register in [other_ns, protocol::NS_MIXED] {
            forge(header, gone, register);
            assert_eq!(lock_within(header, SOON), None, "register {register:#x}");
        }
        // The register holds the holder's namespace and ours: never
        // overwritten back to a single namespace by our attempts.
        forge(header, gone, other_ns);
        assert_eq!(lock_within(header, Duration::from_millis(1)), None);
        assert_eq!(header.register.load(Ordering::SeqCst), protocol::NS_MIXED);
        // Control: with our namespace the same dead holder is taken over.
        forge(header, gone, ipc::pid_namespace());
        assert_eq!(lock_within(header, PATIENT), Some(true));
    }

    #[test]
    fn registering_moves_from_none_to_one_namespace_to_mixed() {
        let register = AtomicU32::new(protocol::NS_NONE);
        protocol::register(&register, 7);
        assert_eq!(register.load(Ordering::SeqCst), 7);
        protocol::register(&register, 7);
        assert_eq!(register.load(Ordering::SeqCst), 7);
        assert!(protocol::register_is(&register, 7));
        assert!(!protocol::register_is(&register, 8));
        protocol::register(&register, 8);
        assert_eq!(register.load(Ordering::SeqCst), protocol::NS_MIXED);
        protocol::register(&register, 7);
        assert_eq!(register.load(Ordering::SeqCst), protocol::NS_MIXED);
        assert!(!protocol::register_is(&register, 7));
        // An unknown namespace (0) makes it mixed at once.
        let register = AtomicU32::new(protocol::NS_NONE);
        protocol::register(&register, 0);
        assert_eq!(register.load(Ordering::SeqCst), protocol::NS_MIXED);
    }

    #[test]
    fn a_holder_with_an_unknown_start_time_is_never_taken_over() {
        let sleeper = Sleeper::start();
        let gone = Holder::new(sleeper.holder().id(), 0);
        drop(sleeper);
        let map = mapping();
        let header = map.lock_header();
        forge(header, gone, ipc::pid_namespace());
        assert_eq!(lock_within(header, SOON), None);
    }

    #[test]
    fn the_word_names_this_process_with_its_start_time() {
        let map = mapping();
        let header = map.lock_header();
        let (guard, poisoned) = RawGuard::lock(header, None).expect("free");
        assert!(!poisoned);
        assert_eq!(
            protocol::holder(header.word.load(Ordering::SeqCst)),
            Holder::this_process().to_word()
        );
        assert_eq!(header.register.load(Ordering::SeqCst), ipc::pid_namespace());
        drop(guard);
        assert!(!header.is_locked());
    }
}
