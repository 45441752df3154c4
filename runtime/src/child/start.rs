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
    CHILD_FD, ENV_VAR, Message, Mode, Start, StartMethod, default_method, ensure_ready,
    exe_identity, identity, on_long_lived_thread,
};
use crate::codec;
use crate::error::{Error, Result};
use crate::registry;
use crate::sys;
use crate::wire::Channel;

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
pub(crate) fn death_error(pid: u32, code: i32) -> Error {
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

impl ChildProc {
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
            let ev = sys::poll_one(relay.as_fd(), PollFlags::POLLIN, timeout)
                .map_err(|e| Error::io("poll", e))?;
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

static NAME_COUNTER: AtomicUsize = AtomicUsize::new(1);

/// Python's default name for the next child: `Process-N`.
pub(crate) fn next_process_name() -> String {
    format!("Process-{}", NAME_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Starts a child that will run `name` with the encoded `args` (and the
/// descriptors they carry), by the program's default start method.
/// Returns the child and the parent's end of its socket.
#[cfg(test)]
pub(crate) fn start_child(
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Channel)> {
    start_child_by(None, name, process_name, mode, args, fds)
}

/// Starts a child as `start_child` does, by `method` (`None`: the program's default).
pub(crate) fn start_child_by(
    method: Option<StartMethod>,
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Channel)> {
    let how = match method.unwrap_or_else(default_method) {
        StartMethod::Spawn => How::Spawn,
        StartMethod::ForkServer => How::Fork,
    };
    start_with(exe_identity(), how, name, process_name, mode, args, fds)
}

/// [`start_child`], claiming to run the executable `exe` (tests use another).
#[cfg(test)]
pub(super) fn start_child_as(
    exe: u64,
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Channel)> {
    start_with(exe, How::Spawn, name, process_name, mode, args, fds)
}

/// Starts the forkserver (the internal entry `name`, with `args`): a
/// spawned child told that it is the server, so that it runs on the
/// thread the loader started and never starts another.
pub(super) fn start_server(name: &str, args: &[u8]) -> Result<(ChildProc, Channel)> {
    start_with(
        exe_identity(),
        How::Server,
        name,
        "ForkServer",
        Mode::Internal,
        args,
        &[],
    )
}

/// How a child comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// A fresh start of `/proc/self/exe`.
    Spawn,
    /// As `Spawn`, marked as the forkserver.
    Server,
    /// Forked by the forkserver.
    Fork,
}

fn start_with(
    exe: u64,
    how: How,
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Channel)> {
    ensure_ready()?;
    let me = identity();
    let authkey = super::authkey()?;
    let start = || Start {
        exe,
        registry: registry::fingerprint(),
        name: name.to_string(),
        process_name: process_name.to_string(),
        parent_name: me.name.clone(),
        parent_pid: std::process::id(),
        mode,
        authkey: authkey.to_vec(),
        init: super::child_init(),
    };
    let send = |channel: &Channel| match (Message::Start {
        start: start(),
        args,
    })
    .send(channel, fds)
    {
        // The child died at once; its exit status tells why.
        Ok(()) | Err(Error::Disconnected) => Ok(()),
        Err(err) => Err(err),
    };
    let started = match how {
        How::Spawn | How::Server => spawn_child(how == How::Server).and_then(|(child, end)| {
            let channel = Channel::new(end);
            send(&channel).map(|()| (child, channel))
        }),
        How::Fork => fork_child(args.len() <= PRESEND, send),
    };
    if let Err(err) = &started {
        log::error!("multiproc: could not start a child process to run `{name}`: {err}");
    }
    started
}

/// A start message whose arguments are at most this long is sent before
/// the fork is asked for (the socket buffers it), so that the forked
/// child finds it at once; a longer one could fill the socket's buffer
/// with no reader yet, and is sent after.
const PRESEND: usize = 16 * 1024;

/// A child of the forkserver, and the parent's end of its socket, with
/// its start message sent (by `send`; before the fork when `presend`). A
/// server found dead is restarted once, with fresh sockets (a child the
/// dead server may have forked dies with it, and must not see them).
fn fork_child(
    presend: bool,
    send: impl Fn(&Channel) -> Result<()>,
) -> Result<(ChildProc, Channel)> {
    let mut first = true;
    loop {
        let (parent_end, child_end) =
            sys::socketpair().map_err(|e| Error::io("could not create a socket pair", e))?;
        let channel = Channel::new(parent_end);
        if presend {
            send(&channel)?;
        }
        match super::forkserver::fork(child_end) {
            Ok(child) => {
                if !presend {
                    send(&channel)?;
                }
                return Ok((child, channel));
            }
            Err(super::forkserver::ForkError::ServerGone(_)) if first => first = false,
            Err(
                super::forkserver::ForkError::ServerGone(err)
                | super::forkserver::ForkError::Failed(err),
            ) => return Err(err),
        }
    }
}

/// A fresh start of `/proc/self/exe` (marked as the forkserver when
/// `server`), and the parent's end of its socket.
fn spawn_child(server: bool) -> Result<(ChildProc, OwnedFd)> {
    let (parent_end, child_end) =
        sys::socketpair().map_err(|e| Error::io("could not create a socket pair", e))?;
    let child_end = if child_end.as_raw_fd() == CHILD_FD {
        sys::dup_at_least(child_end.as_fd(), CHILD_FD + 1)
            .map_err(|e| Error::io("could not duplicate a descriptor", e))?
    } else {
        child_end
    };
    let deathsig = on_long_lived_thread();
    let kind = match (server, super::main_dispatches()) {
        (true, true) => ":sm",
        (true, false) => ":s",
        (false, true) => ":m",
        (false, false) => "",
    };
    let marker = format!(
        "{ENV_VAR}={CHILD_FD}:{}:{}{kind}",
        std::process::id(),
        u8::from(deathsig),
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
    let pid = sys::spawn(c"/proc/self/exe", &argv, &envp, child_end.as_fd(), CHILD_FD)
        .map_err(|e| Error::io("could not start a child process", e))?;
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
        relay: None,
        status: std::sync::Mutex::new(None),
    };
    Ok((child, parent_end))
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
