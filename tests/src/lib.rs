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

/// A message that says whether it arrived whole: the queue tests send it
/// through faults (killed producers, batches across slot kinds) and check
/// every one they get.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Checked {
    /// The producer's count, for order and duplicates.
    pub seq: u64,
    /// Bytes that depend on `seq`.
    pub data: Vec<u8>,
    /// [`checksum`] of `data`, taken before it was sent.
    pub sum: u64,
}

impl Checked {
    /// Message `seq` with `len` bytes.
    pub fn new(seq: u64, len: usize) -> Checked {
        let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ seq) as u8).collect();
        Checked {
            seq,
            sum: checksum(&data),
            data,
        }
    }

    /// Its bytes are those its sum was taken of.
    pub fn is_whole(&self) -> bool {
        checksum(&self.data) == self.sum
    }
}

/// FNV-1a of `data`: a torn or mixed-up message does not keep its sum.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Taken by every test of the `alone` binary (tests/tests/alone/): each of
/// them counts something of the whole process (open descriptors,
/// children), lowers one of its limits (`RLIMIT_NOFILE`, `RLIMIT_AS`) or
/// sets process-wide state (the child initializer, the logger), so no
/// other test may run beside it. The tests of `procs` touch none of
/// that and run in parallel. A test that failed while holding the turn
/// does not poison it for the others.
pub fn alone() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// The children of process `pid` (of its main thread), from `/proc`;
/// empty when it is gone.
pub fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
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

/// Forcing pid reuse: a process given a chosen pid, and the start times
/// that tell it from the pid's previous owner.
pub mod pid_reuse {
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// A `sleep` process started with pid `pid`, if the kernel can be made to
    /// hand that pid out now (`/proc/sys/kernel/ns_last_pid` is writable: root
    /// in this pid namespace). Other processes on the machine may take it
    /// first: a bounded number of tries.
    pub fn spawn_with_pid(pid: u32) -> Option<std::process::Child> {
        for _ in 0..100 {
            let last = std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/sys/kernel/ns_last_pid")
                .and_then(|mut f| f.write_all(format!("{}", pid - 1).as_bytes()));
            if let Err(e) = last {
                eprintln!("cannot choose the next pid ({e}): pid reuse not forced");
                return None;
            }
            let mut child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("spawn sleep");
            if child.id() == pid {
                return Some(child);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        eprintln!("pid {pid} was always taken by another process first: pid reuse not forced");
        None
    }

    /// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks.
    pub fn start_ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after = &stat[stat.rfind(')').expect("comm") + 1..];
        after
            .split_ascii_whitespace()
            .nth(19)
            .and_then(|s| s.parse().ok())
            .expect("start time")
    }

    /// Clock ticks since boot (`/proc/uptime` has hundredths of a second, the
    /// tick of `/proc/<pid>/stat` on Linux: USER_HZ is 100).
    pub fn uptime_ticks() -> u64 {
        let uptime = std::fs::read_to_string("/proc/uptime").expect("uptime");
        let secs = uptime.split_ascii_whitespace().next().expect("uptime");
        let (whole, hundredths) = secs.split_once('.').expect("uptime");
        whole.parse::<u64>().expect("uptime") * 100 + hundredths.parse::<u64>().expect("uptime")
    }

    /// Waits until the clock has moved past the tick in which `pid` started:
    /// a process that reuses the pid of one that started in the same tick is
    /// taken for it (`Holder`'s documented limit, on the safe side). Fails the
    /// test if the clock has not moved within `limit`.
    pub fn let_it_age(pid: u32, limit: Duration) -> u64 {
        let started = start_ticks(pid);
        let deadline = Instant::now() + limit;
        while uptime_ticks() <= started + 1 {
            assert!(Instant::now() < deadline, "the clock does not tick");
            std::thread::yield_now();
        }
        started
    }
}
