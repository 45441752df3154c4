//! Small tools the scenarios share: a seeded random generator, message
//! payloads that check themselves, `/proc` scans, bounded waits, signals.
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// SplitMix64: small, seedable, good enough to pick victims and delays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.range(0, n as u64) as usize
    }

    pub fn chance(&mut self, one_in: u64) -> bool {
        self.range(0, one_in.max(1)) == 0
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// FNV-1a over `bytes`, seeded: the checksum carried by every message.
pub fn checksum(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    // Eight bytes at a time where possible: 16 MiB messages are common.
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in chunks.remainder() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The body of message `seq` of sender `id`: `len` bytes derived from both,
/// so a receiver can tell a whole message from a torn or foreign one.
pub fn body(id: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    out
}

/// A self-checking message: who sent it, its number, its body, and a
/// checksum over all three.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Msg {
    pub id: u64,
    pub seq: u64,
    pub body: Vec<u8>,
    pub sum: u64,
}

impl Msg {
    pub fn new(id: u64, seq: u64, len: usize) -> Msg {
        let body = body(id, seq, len);
        let sum = checksum(id ^ (seq << 20), &body);
        Msg { id, seq, body, sum }
    }

    /// `true` if the body is the one `(id, seq)` has and the checksum holds.
    pub fn whole(&self) -> bool {
        self.sum == checksum(self.id ^ (self.seq << 20), &self.body)
            && self.body == body(self.id, self.seq, self.body.len())
    }
}

/// Sends `signal` to `pid` (ignoring a process that is already gone).
pub fn signal(pid: u32, signal: Signal) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
}

pub fn sigkill(pid: u32) {
    signal(pid, Signal::SIGKILL);
}

/// The state letter of `pid` (`R`, `S`, `Z`...), `None` once it is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// `true` while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    !matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// Children of this process (every thread's), zombies included: the
/// integration tests' reader, shared.
pub use multiproc_tests::child_pids;

/// How many arenas of small shared objects (`Lock`, `Value`, `Event`...)
/// a process may keep for its lifetime: its current arena of each size
/// class, 1 to 64 cache lines by powers of two (`runtime/src/sys/arena.rs`,
/// "the creator keeps its current arena of each class"). Not a leak.
pub const ARENA_CLASSES: usize = 7;

/// `(descriptors, memfds)` open in this process now, not counting up to
/// [`ARENA_CLASSES`] arenas more than `arenas_before` (see
/// [`arena_count`]).
pub fn fd_counts_beyond_arenas(arenas_before: usize) -> (usize, usize) {
    let (fds, memfds) = fd_counts();
    let kept = arena_count()
        .saturating_sub(arenas_before)
        .min(ARENA_CLASSES);
    (fds.saturating_sub(kept), memfds.saturating_sub(kept))
}

/// The runtime's arenas of small shared objects open in this process
/// (memfds named `multiproc-arena`).
pub fn arena_count() -> usize {
    fds_of_kind("/memfd:multiproc-arena").len()
}

/// `(descriptors, memfds)` open in this process now.
pub fn fd_counts() -> (usize, usize) {
    let (mut fds, mut memfds) = (0usize, 0usize);
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for entry in dir.flatten() {
            fds += 1;
            if let Ok(target) = std::fs::read_link(entry.path())
                && target.to_string_lossy().starts_with("/memfd:")
            {
                memfds += 1;
            }
        }
    }
    // The directory's own descriptor was counted while it was open.
    (fds.saturating_sub(1), memfds)
}

/// Descriptor numbers of this process whose link starts with `prefix`
/// (`"socket:"`, `"pipe:"`, `"/memfd:"`).
pub fn fds_of_kind(prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for entry in dir.flatten() {
            let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if let Ok(target) = std::fs::read_link(entry.path())
                && target.to_string_lossy().starts_with(prefix)
            {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Processes (other than this one) whose environment holds `needle`
/// (`NAME=value`): the ones a run started, however deep.
pub fn pids_with_env(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|var| var == needle.as_bytes()) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Polls `cond` until it holds or `limit` passes (for states of other
/// processes that no event announces: a death, a reaping).
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Why a bounded call gave up.
#[derive(Debug)]
pub enum Bounded {
    /// It did not return in time (it may still be running).
    Hung(String),
    /// It panicked.
    Panicked(String),
}

/// Runs `f` on a thread and waits for it at most `limit`. A call that
/// does not return in time is left running (the run then reports a hang
/// and ends its process).
pub fn bounded<R: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, Bounded> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("bounded: {what}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        return Err(Bounded::Panicked(format!(
            "{what}: could not start a thread: {e}"
        )));
    }
    match rx.recv_timeout(limit) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(p)) => Err(Bounded::Panicked(format!("{what}: {}", panic_text(&p)))),
        Err(_) => Err(Bounded::Hung(format!("{what}: no return within {limit:?}"))),
    }
}

pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}
