//! Futex wait and wake on words in shared memory (process-shared: no
//! `FUTEX_PRIVATE_FLAG`), the sleeping half of every lock and queue.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

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
