//! A fresh start of `/proc/self/exe` (the start method `spawn`, and the
//! forkserver's own start), and the start message every child reads
//! first, however it was started.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::signal::Signal;

use super::proc::ChildProc;
use super::protocol::FORKSERVER;
use super::{
    BIND_NOW_MARK, BIND_NOW_VAR, CHILD_FD, ENV_VAR, Message, Mode, Start, ensure_ready,
    exe_identity, identity, on_long_lived_thread,
};
use crate::error::{Error, Result};
use crate::registry;
use crate::sys;
use crate::wire::Channel;

/// What a child is started to run: what its start message carries.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request<'a> {
    /// The executable the child must run ([`exe_identity`]; tests claim
    /// another).
    pub(super) exe: u64,
    /// The registered name to run.
    pub(super) name: &'a str,
    /// The child's `current_process().name()`.
    pub(super) process_name: &'a str,
    pub(super) mode: Mode,
    /// The encoded arguments, and the descriptors they carry.
    pub(super) args: &'a [u8],
    pub(super) fds: &'a [OwnedFd],
}

impl Request<'_> {
    /// Sends the start message on `channel`. A child that died before it
    /// read it is not an error here: its exit status tells why.
    pub(super) fn send(&self, channel: &Channel) -> Result<()> {
        let message = Message::Start {
            start: self.start()?,
            args: self.args,
        };
        match message.send(channel, self.fds) {
            Ok(()) | Err(Error::Disconnected) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// The header of its start message.
    pub(super) fn start(&self) -> Result<Start> {
        let me = identity();
        Ok(Start {
            exe: self.exe,
            registry: registry::fingerprint(),
            name: self.name.to_string(),
            process_name: self.process_name.to_string(),
            parent_name: me.name.clone(),
            parent_pid: std::process::id(),
            mode: self.mode,
            authkey: super::authkey()?.to_vec(),
            init: super::child_init(),
        })
    }
}

/// Starts `/proc/self/exe` again to run `request` (as the forkserver when
/// `server`), and sends it its start message. Returns the child and the
/// parent's end of its socket.
pub(super) fn spawn(request: &Request<'_>, server: bool) -> Result<(ChildProc, Channel)> {
    let (child, end) = spawn_child(server)?;
    let channel = Channel::new(end);
    request.send(&channel)?;
    Ok((child, channel))
}

/// Starts the forkserver (with its preloads, encoded, as `args`): a
/// spawned child told that it is the server, so that it runs on the
/// thread the loader started and never starts another.
pub(super) fn start_server(args: &[u8]) -> Result<(ChildProc, Channel)> {
    ensure_ready()?;
    let request = Request {
        exe: exe_identity(),
        name: FORKSERVER,
        process_name: "ForkServer",
        mode: Mode::Internal,
        args,
        fds: &[],
    };
    let started = spawn(&request, true);
    if let Err(err) = &started {
        log::error!("multiproc: could not start the forkserver: {err}");
    }
    started
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
    if server && std::env::var_os(BIND_NOW_VAR).is_none() {
        envp.push(sys::cstring(
            format!("{BIND_NOW_VAR}={BIND_NOW_MARK}").into(),
        ));
    }
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
    Ok((ChildProc::spawned(pid, pidfd), parent_end))
}
