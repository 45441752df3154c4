//! A started child as its parent holds it: its pid, a pidfd to wait on
//! and signal, its exit status (reaped here, or relayed by the
//! forkserver), and the first frame it answers with.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::poll::PollFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::sys;
use crate::wire::{Channel, Frame};

/// Python's `exitcode` of a reaped child: its exit code, or `-N` when
/// signal N killed it.
pub(super) fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => -(sig as i32),
        // Stopped/continued are not final states; waitpid without
        // WUNTRACED does not report them.
        _ => -1,
    }
}

/// The error a spawned child's death gives when it left no outcome.
pub(super) fn death_error(pid: u32, code: i32) -> Error {
    if code < 0 {
        Error::Killed { pid, signal: -code }
    } else {
        Error::Exited { pid, code }
    }
}

/// A started child: its pid, a pidfd to wait on and signal without a
/// pid-reuse race, and its exit code (Python's numbers) once reaped.
///
/// A child of the forkserver is not this process's child: the server
/// reaps it and writes its exit code on the `relay` pipe (then closes it).
/// Its pidfd, opened by the server before it could reap the child and
/// passed here, still signals it without a pid-reuse race.
#[derive(Debug)]
pub(crate) struct ChildProc {
    pid: Pid,
    pidfd: OwnedFd,
    /// The read end of the server's status pipe (non-blocking), for a
    /// forked child.
    relay: Option<OwnedFd>,
    status: std::sync::Mutex<Option<i32>>,
}

/// The exit code of a forked child whose server died without relaying
/// it: the server's death killed it (its death signal is SIGKILL).
const LOST_WITH_SERVER: i32 = -(Signal::SIGKILL as i32);

/// The spin before the program sleeps for a forked child's status
/// (`crate::spin`): a short child's status comes soon after the start.
static STATUS_SPIN: crate::spin::Shared = crate::spin::Shared::new();

impl ChildProc {
    /// A child of this process: its pid and pidfd.
    pub(super) fn spawned(pid: Pid, pidfd: OwnedFd) -> ChildProc {
        ChildProc {
            pid,
            pidfd,
            relay: None,
            status: std::sync::Mutex::new(None),
        }
    }

    /// A child of the forkserver: its pid, the pidfd the server opened,
    /// and the read end of its status pipe.
    pub(super) fn forked(pid: Pid, pidfd: OwnedFd, relay: OwnedFd) -> ChildProc {
        ChildProc {
            pid,
            pidfd,
            relay: Some(relay),
            status: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// A forked child's relayed exit code, without blocking: `Some` once
    /// the server wrote it, or once the server died and the child is gone.
    fn relayed(&self, relay: &OwnedFd) -> Result<Option<i32>> {
        let mut word = [0u8; 4];
        match sys::read(relay.as_fd(), &mut word) {
            // Four bytes written at once to a pipe are read at once.
            Ok(4) => Ok(Some(i32::from_le_bytes(word))),
            Ok(0) => {
                // The server is gone without a word: the child dies with
                // it; report it once it is gone.
                let gone =
                    sys::poll_one(self.pidfd.as_fd(), PollFlags::POLLIN, Some(Duration::ZERO))
                        .map_err(|e| Error::io("poll", e))?;
                Ok((!gone.is_empty()).then_some(LOST_WITH_SERVER))
            }
            Ok(_) => Err(Error::Decode {
                message: "the forkserver relayed a torn exit status".into(),
            }),
            Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(e) => Err(Error::io("read", std::io::Error::from(e))),
        }
    }

    /// The exit code if the child has ended (reaping it), without blocking.
    pub(crate) fn try_wait(&self) -> Result<Option<i32>> {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = *status {
            return Ok(Some(s));
        }
        if let Some(relay) = &self.relay {
            let code = self.relayed(relay)?;
            *status = code;
            return Ok(code);
        }
        if let Some(ws) = sys::try_reap(self.pid).map_err(|e| Error::io("waitpid", e))? {
            let code = exit_code(ws);
            *status = Some(code);
            return Ok(Some(code));
        }
        Ok(None)
    }

    /// Waits for the child to end, at most `timeout` (`None`: forever).
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Result<Option<i32>> {
        if let Some(s) = self.try_wait()? {
            return Ok(Some(s));
        }
        if let Some(relay) = &self.relay {
            // Readable once the server wrote the status, or died.
            let deadline = crate::wire::deadline(timeout);
            let ev = STATUS_SPIN
                .poll(&[(relay.as_fd(), PollFlags::POLLIN)], deadline)
                .map_err(|e| Error::io("poll", e))?[0];
            if ev.is_empty() {
                return Ok(None);
            }
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            // The server died and the child is still dying of it.
            sys::poll_one(
                self.pidfd.as_fd(),
                PollFlags::POLLIN,
                crate::wire::remaining(deadline),
            )
            .map_err(|e| Error::io("poll", e))?;
            return self.try_wait();
        }
        let ev = sys::poll_one(self.pidfd.as_fd(), PollFlags::POLLIN, timeout)
            .map_err(|e| Error::io("poll", e))?;
        if ev.is_empty() {
            return self.try_wait();
        }
        // Readable: the child has exited, so a blocking reap returns at
        // once. Under the status lock, so that two waiters cannot both call
        // waitpid.
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = *status {
            return Ok(Some(s));
        }
        let code = sys::reap(self.pid).map_or(-1, exit_code);
        *status = Some(code);
        Ok(Some(code))
    }

    /// Sends `signal` unless the child was already reaped.
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if status.is_some() {
            return Ok(());
        }
        sys::pidfd_send_signal(self.pidfd.as_fd(), signal)
            .map_err(|e| Error::io("could not signal the process", e))
    }

    /// A descriptor readable once the child's exit status is known: its
    /// pidfd, or a forked child's status pipe.
    pub(crate) fn sentinel(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.relay {
            Some(relay) => relay.as_fd(),
            None => self.pidfd.as_fd(),
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        // Never leave a zombie behind: a child dropped while running is
        // killed and reaped (owners that want it to outlive the handle keep
        // the `ChildProc` alive, as the process table does).
        if self.try_wait().ok().flatten().is_none() {
            let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), Signal::SIGKILL);
            let _ = self.wait(None);
        }
    }
}

/// The next frame `child` sends on `channel`, waiting at most `timeout`;
/// when the child closed its end without one, the error its death gives
/// (its exit status, waited for at most 5 s).
pub(super) fn recv_or_death(
    child: &ChildProc,
    channel: &mut Channel,
    timeout: Option<Duration>,
) -> Result<Frame> {
    match channel.recv(timeout) {
        Err(Error::Disconnected) => {
            let code = child
                .wait(Some(Duration::from_secs(5)))?
                .ok_or(Error::Disconnected)?;
            Err(death_error(child.pid(), code))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn death_errors_use_pythons_numbers() {
        assert!(matches!(
            death_error(7, -9),
            Error::Killed { pid: 7, signal: 9 }
        ));
        assert!(matches!(
            death_error(7, 3),
            Error::Exited { pid: 7, code: 3 }
        ));
    }
}
