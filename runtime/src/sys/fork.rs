//! `fork(2)` for the forkserver, and what it needs to know first: how many
//! threads this process has.
//!
//! Forking is sound only from a process that has exactly one thread: the
//! child gets a copy of every lock, and a lock another thread held at the
//! moment of the fork stays held forever in the child (malloc's arenas,
//! stdio's buffers, a `Mutex` of this crate). From a single-threaded
//! process there is no such thread, so the child is in the state the
//! forking thread left it in, and may run any code.
#![allow(unsafe_code)]

use std::io;

use nix::unistd::{ForkResult, Pid};

/// Which side of a fork the caller is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forked {
    /// The new process.
    Child,
    /// The calling process; the new one has this pid.
    Parent(Pid),
}

/// How many threads this process has (the entries of `/proc/self/task`).
pub(crate) fn thread_count() -> io::Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        entry?;
        count += 1;
    }
    Ok(count)
}

/// Forks this process. Fails (`EAGAIN`, `ENOMEM`) without a child.
///
/// # Safety
///
/// The calling process has exactly one thread (the caller), checked or
/// ensured by construction: then no lock can be held by a thread that does
/// not exist in the child, and the child may run any code, not only
/// async-signal-safe calls.
pub(crate) unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the process is single-threaded (this function's contract),
    // which is the condition under which nix documents fork's child as
    // free to run arbitrary code.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => Ok(Forked::Child),
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_thread_is_counted() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _ = started_tx.send(());
            let _ = rx.recv();
        });
        started.recv().expect("started");
        let during = thread_count().expect("count");
        drop(tx);
        thread.join().expect("join");
        assert!(during >= 2, "{during}");
    }
}
