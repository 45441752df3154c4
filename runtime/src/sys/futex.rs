//! Futex wait and wake on words in shared memory (process-shared: no
//! `FUTEX_PRIVATE_FLAG`), the sleeping half of every lock and queue.

use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use nix::errno::Errno;

/// How a [`wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Woken, or the word no longer held `expected`, or a signal: re-check.
    Retry,
    /// The timeout passed.
    TimedOut,
}

/// Sleeps while `*word == expected`, at most `timeout` (`None`: no limit).
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Wake {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call
    // (borrowed), and `ts_ptr` is null or points at a live timespec;
    // FUTEX_WAIT reads both and writes neither.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            0usize,
            0u32,
        )
    };
    if rc == 0 {
        return Wake::Retry;
    }
    match Errno::last() {
        Errno::ETIMEDOUT => Wake::TimedOut,
        _ => Wake::Retry,
    }
}

/// Sleeps on `word` while it holds `expected`, counted in `sleepers` (so
/// that wakers skip the wake syscall when nobody sleeps), at most until
/// `deadline`. [`Wake::TimedOut`] only when the deadline had already
/// passed (nothing slept): the caller re-checks its condition otherwise.
pub(crate) fn wait_counted(
    word: &AtomicU32,
    expected: u32,
    sleepers: &AtomicU32,
    deadline: Option<Instant>,
) -> Wake {
    let slice = match deadline {
        None => None,
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Wake::TimedOut;
            }
            Some(left)
        }
    };
    sleepers.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let woke = wait(word, expected, slice);
    sleepers.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    woke
}

/// Wakes at most `n` waiters sleeping on `word`; returns how many woke.
pub(crate) fn wake(word: &AtomicU32, n: u32) -> usize {
    let n = n.min(i32::MAX as u32);
    // SAFETY: `word` is a valid, aligned u32 (borrowed); FUTEX_WAKE only
    // uses its address as a key.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            0usize,
            0usize,
            0u32,
        )
    };
    rc.max(0) as usize
}

// membarrier(2) commands (linux/membarrier.h).
const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL_EXPEDITED: libc::c_int = 1 << 1;
const MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_int = 1 << 2;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes integers only (cmd, flags = 0, cpu_id = 0)
    // and reads or writes no user memory.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_uint,
            0 as libc::c_int,
        )
    }
}

/// `true` if this process takes part in [`global_barrier`]: registered
/// once per process (the first call), `false` where the kernel or a
/// seccomp filter does not offer expedited global membarriers.
///
/// A registered process may replace the store-load fence of a Dekker-style
/// "publish, then check for sleepers" by a compiler fence, provided every
/// sleeper calls [`global_barrier`] between registering as a sleeper and
/// re-checking: the barrier runs a full fence on every running thread of
/// every registered process (a thread that is not running passed through
/// one when it was switched out).
pub(crate) fn barrier_registered() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let need = MEMBARRIER_CMD_GLOBAL_EXPEDITED | MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED;
        let cmds = membarrier(MEMBARRIER_CMD_QUERY);
        cmds > 0
            && (cmds as libc::c_int) & need == need
            && membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) == 0
    })
}

/// Runs a full memory barrier on every running thread of every process
/// registered by [`barrier_registered`] (costs interrupts to the CPUs
/// running them: microseconds; for the slow path only). `false` if this
/// process could not register or the call failed.
pub(crate) fn global_barrier() -> bool {
    barrier_registered() && membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    #[test]
    fn global_barrier_when_registered() {
        // Not every kernel or sandbox offers it; when registered, it works.
        if barrier_registered() {
            assert!(global_barrier());
        }
    }

    #[test]
    fn wait_times_out_and_wake_wakes() {
        let word = Arc::new(AtomicU32::new(0));
        assert_eq!(
            wait(&word, 0, Some(Duration::from_millis(5))),
            Wake::TimedOut
        );
        assert_eq!(wait(&word, 1, Some(Duration::from_millis(5))), Wake::Retry);
        let w = Arc::clone(&word);
        let t = std::thread::spawn(move || {
            while w.load(Ordering::SeqCst) == 0 {
                wait(&w, 0, Some(Duration::from_secs(10)));
            }
        });
        word.store(1, Ordering::SeqCst);
        wake(&word, 1);
        t.join().expect("waiter");
    }
}
