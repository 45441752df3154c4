//! The parent's side: start a child, hold it (pidfd, exit status), read a
//! spawned child's outcome.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::poll::PollFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::{
    CHILD_FD, ENV_VAR, Message, Mode, Start, ensure_ready, exe_identity, identity,
    on_long_lived_thread,
};
use crate::codec;
use crate::error::{Error, Result};
use crate::registry;
use crate::sys;
use crate::wire::Channel;

/// Python's `exitcode` of a reaped child: its exit code, or `-N` when
/// signal N killed it.
fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => -(sig as i32),
        // Stopped/continued are not final states; waitpid without
        // WUNTRACED does not report them.
        _ => -1,
    }
}

/// The error a spawned child's death gives when it left no outcome.
pub(crate) fn death_error(pid: u32, code: i32) -> Error {
    if code < 0 {
        Error::Killed { pid, signal: -code }
    } else {
        Error::Exited { pid, code }
    }
}

/// A started child: its pid, a pidfd to wait on and signal without a
/// pid-reuse race, and its exit code (Python's numbers) once reaped.
#[derive(Debug)]
pub(crate) struct ChildProc {
    pid: Pid,
    pidfd: OwnedFd,
    status: std::sync::Mutex<Option<i32>>,
}

impl ChildProc {
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// The exit code if the child has ended (reaping it), without blocking.
    pub(crate) fn try_wait(&self) -> Result<Option<i32>> {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = *status {
            return Ok(Some(s));
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

    /// The pidfd (readable once the child has exited).
    pub(crate) fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pidfd.as_fd()
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

static NAME_COUNTER: AtomicUsize = AtomicUsize::new(1);

/// Python's default name for the next child: `Process-N`.
pub(crate) fn next_process_name() -> String {
    format!("Process-{}", NAME_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Starts a child that will run `name` with the encoded `args` (and the
/// descriptors they carry). Returns the child and the parent's end of its
/// socket.
pub(crate) fn start_child(
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Channel)> {
    start_child_as(exe_identity(), name, process_name, mode, args, fds)
}

/// [`start_child`], claiming to run the executable `exe` (tests use another).
pub(super) fn start_child_as(
    exe: u64,
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Channel)> {
    ensure_ready()?;
    let (parent_end, child_end) =
        sys::socketpair().map_err(|e| Error::io("could not create a socket pair", e))?;
    let child_end = if child_end.as_raw_fd() == CHILD_FD {
        sys::dup_at_least(child_end.as_fd(), CHILD_FD + 1)
            .map_err(|e| Error::io("could not duplicate a descriptor", e))?
    } else {
        child_end
    };
    let deathsig = on_long_lived_thread();
    let marker = format!(
        "{ENV_VAR}={CHILD_FD}:{}:{}{}",
        std::process::id(),
        u8::from(deathsig),
        if super::main_dispatches() { ":m" } else { "" }
    );
    let argv: Vec<CString> = std::env::args_os().map(sys::cstring).collect();
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != ENV_VAR)
        .map(|(mut k, v)| {
            k.push("=");
            k.push(v);
            sys::cstring(k)
        })
        .collect();
    envp.push(sys::cstring(marker.into()));
    let pid =
        sys::spawn(c"/proc/self/exe", &argv, &envp, child_end.as_fd(), CHILD_FD).map_err(|e| {
            let err = Error::io("could not start a child process", e);
            log::error!("multiproc: could not start a child process to run `{name}`: {err}");
            err
        })?;
    drop(child_end);
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(err) => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = sys::reap(pid);
            return Err(Error::io("pidfd_open", err));
        }
    };
    let child = ChildProc {
        pid,
        pidfd,
        status: std::sync::Mutex::new(None),
    };
    let channel = Channel::new(parent_end);
    let me = identity();
    let start = Start {
        exe,
        registry: registry::fingerprint(),
        name: name.to_string(),
        process_name: process_name.to_string(),
        parent_name: me.name.clone(),
        parent_pid: std::process::id(),
        mode,
        init: super::child_init(),
    };
    match (Message::Start { start, args }).send(&channel, fds) {
        // The child died at once; its exit status tells why.
        Ok(()) | Err(Error::Disconnected) => Ok((child, channel)),
        Err(err) => Err(err),
    }
}

/// Reads a spawned child's outcome: its return value (decoded as `R`), or
/// the error that says why there is none. Reaps the child.
pub(crate) fn read_outcome<R: serde::de::DeserializeOwned>(
    child: &ChildProc,
    channel: &mut Channel,
    timeout: Option<Duration>,
) -> Result<R> {
    let frame = match channel.recv(timeout) {
        Ok(frame) => frame,
        Err(Error::Disconnected) => {
            let code = child
                .wait(Some(Duration::from_secs(5)))?
                .ok_or(Error::Disconnected)?;
            return Err(death_error(child.pid(), code));
        }
        Err(err) => return Err(err),
    };
    let result = match Message::parse(frame.tag, &frame.bytes) {
        Ok(Message::Returned(value)) => codec::decode(value, frame.fds),
        Ok(Message::Panicked(record)) => Err(record.into_error(child.pid(), None)),
        Ok(Message::Failed(err)) => {
            if matches!(
                err,
                Error::BuildMismatch { .. }
                    | Error::RegistrationMissing { .. }
                    | Error::InitializerFailed { .. }
            ) {
                log::error!("multiproc: child {} refused to start: {err}", child.pid());
            }
            Err(err)
        }
        Ok(Message::Start { .. }) => Err(Error::Decode {
            message: "the child answered with a start message".into(),
        }),
        Err(err) => Err(err),
    };
    // The child exits right after sending; reap it.
    let _ = child.wait(Some(Duration::from_secs(5)));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_main(channel: Channel, args: Vec<u8>, _fds: Vec<OwnedFd>) -> i32 {
        match Message::Returned(&args).send(&channel, &[]) {
            Ok(()) => 0,
            Err(_) => 3,
        }
    }

    const ECHO: &str = "__multiproc::test::echo";

    /// The child's first answer, which must be a refusal.
    fn refusal(channel: &mut Channel) -> Error {
        let frame = channel.recv(Some(Duration::from_secs(20))).expect("reply");
        match Message::parse(frame.tag, &frame.bytes) {
            Ok(Message::Failed(err)) => err,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    fn exit_code(child: &ChildProc) -> i32 {
        child
            .wait(Some(Duration::from_secs(20)))
            .expect("wait")
            .expect("exited")
    }

    inventory::submit! {
        crate::registry::Entry::internal(ECHO, echo_main)
    }

    #[test]
    fn internal_echo_child_round_trip() {
        let (child, mut channel) =
            start_child(ECHO, "echo", Mode::Internal, b"ping", &[]).expect("start");
        let frame = channel.recv(Some(Duration::from_secs(20))).expect("reply");
        assert!(
            matches!(
                Message::parse(frame.tag, &frame.bytes),
                Ok(Message::Returned(b"ping"))
            ),
            "{frame:?}"
        );
        assert_eq!(exit_code(&child), 0);
    }

    #[test]
    fn a_child_of_another_executable_refuses_with_exit_code_2() {
        let (child, mut channel) =
            start_child_as(0x5eed, ECHO, "echo", Mode::Internal, b"", &[]).expect("start");
        let err = refusal(&mut channel);
        assert!(matches!(err, Error::BuildMismatch { .. }), "{err}");
        assert!(err.to_string().contains("rebuilt"), "{err}");
        assert_eq!(exit_code(&child), 2);
    }

    #[test]
    fn a_name_the_child_lacks_is_a_missing_registration_not_a_rebuild() {
        let (child, mut channel) =
            start_child("no::such::function", "missing", Mode::Spawn, b"", &[]).expect("start");
        let err = refusal(&mut channel);
        let text = err.to_string();
        assert!(matches!(err, Error::RegistrationMissing { .. }), "{text}");
        assert!(text.contains("no::such::function"), "{text}");
        assert!(!text.contains("rebuilt"), "{text}");
        assert_eq!(exit_code(&child), 2);
    }

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
