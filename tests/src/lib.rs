//! Shared helpers for the integration tests, and functions registered in a
//! crate other than the test binaries (proving that registrations from
//! another crate of the workspace reach a child).
use std::time::{Duration, Instant};

use multiproc::process_fn;

/// Registered in this crate, called from the test binaries.
#[process_fn]
pub fn helper_triple(x: u64) -> u64 {
    x * 3
}

/// Sleeps in a child until killed (bounded so a bug cannot leak it for long).
#[process_fn]
pub fn sleep_forever() {
    std::thread::sleep(Duration::from_secs(120));
}

/// Sends `signal` (9 for SIGKILL, 15 for SIGTERM...) to process `pid`.
/// Only for processes the test started.
pub fn kill(pid: u32, signal: i32) {
    let Ok(signal) = nix::sys::signal::Signal::try_from(signal) else {
        return;
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// The number of open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `true` while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Polls `cond` every millisecond until it holds or `limit` passes.
/// Returns whether it held.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Children of this process (all threads), zombies included.
pub fn child_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                pids.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    pids
}
