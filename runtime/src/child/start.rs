//! The parent's side of a start: a child started by the program's start
//! method (a fresh start, [`super::spawn`], or a fork of the forkserver,
//! [`super::forkserver`]), and the outcome a spawned child sends back.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::forkserver::{self, ForkError};
use super::proc::{ChildProc, recv_or_death};
use super::protocol::start_head;
use super::spawn::{Request, spawn};
use super::{Message, Mode, StartMethod, default_method, ensure_ready, exe_identity};
use crate::codec;
use crate::error::{Error, Result};
use crate::sys;
use crate::wire::Channel;

static NAME_COUNTER: AtomicUsize = AtomicUsize::new(1);

/// Python's default name for the next child: `Process-N`.
pub(crate) fn next_process_name() -> String {
    format!("Process-{}", NAME_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Starts a child that will run `name` with the encoded `args` (and the
/// descriptors they carry), by `method` (`None`: the program's default).
/// Returns the child and the parent's end of its socket.
pub(crate) fn start_child_by(
    method: Option<StartMethod>,
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Channel)> {
    let (child, channel) = start_process_by(method, name, process_name, mode, args, fds)?;
    // Only a forked `Process` child has no socket.
    let channel = channel.ok_or_else(|| Error::internal("a child was started without a socket"))?;
    Ok((child, channel))
}

/// [`start_child_by`], for a child that may have no socket: a `Process`
/// child forked by the forkserver sends nothing back, and gets its start
/// message with the fork request (`None`).
pub(crate) fn start_process_by(
    method: Option<StartMethod>,
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Option<Channel>)> {
    let request = Request {
        exe: exe_identity(),
        name,
        process_name,
        mode,
        args,
        fds,
    };
    start_with(method.unwrap_or_else(default_method), &request)
}

/// A spawned child of `name` with no arguments, claiming to run the
/// executable `exe` (tests use another).
#[cfg(test)]
fn start_child_as(exe: u64, name: &str, mode: Mode) -> Result<(ChildProc, Channel)> {
    let request = Request {
        exe,
        name,
        process_name: name,
        mode,
        args: &[],
        fds: &[],
    };
    let (child, channel) = start_with(StartMethod::Spawn, &request)?;
    Ok((child, channel.ok_or_else(|| Error::internal("no socket"))?))
}

fn start_with(method: StartMethod, request: &Request<'_>) -> Result<(ChildProc, Option<Channel>)> {
    ensure_ready()?;
    let started = match method {
        StartMethod::Spawn => spawn(request, false).map(|(child, channel)| (child, Some(channel))),
        StartMethod::ForkServer => fork_child(request),
    };
    if let Err(err) = &started {
        log::error!(
            "multiproc: could not start a child process to run `{}`: {err}",
            request.name
        );
    }
    started
}

/// A start message whose arguments are at most this long rides in the
/// fork request, so that the forked child finds it in its memory at once;
/// a longer one is sent on the child's socket after the fork (the server
/// would otherwise hold it all while other starts wait).
const INLINE: usize = 16 * 1024;

/// A child of the forkserver, and the parent's end of its socket (`None`
/// for a `Process` child whose start rode in the request: it sends nothing
/// back). A server found dead is restarted once, with fresh sockets (a
/// child the dead server may have forked dies with it, and must not see
/// them).
fn fork_child(request: &Request<'_>) -> Result<(ChildProc, Option<Channel>)> {
    let head = if request.args.len() <= INLINE {
        Some(start_head(&request.start()?)?)
    } else {
        None
    };
    let needs_socket = head.is_none() || request.mode != Mode::Process;
    let mut first = true;
    loop {
        let (channel, child_end) = if needs_socket {
            let (parent_end, child_end) =
                sys::socketpair().map_err(|e| Error::io("could not create a socket pair", e))?;
            (Some(Channel::new(parent_end)), Some(child_end))
        } else {
            (None, None)
        };
        let forked = match (&head, child_end) {
            (Some(head), child_end) => {
                forkserver::fork_with_start(child_end.as_ref(), head, request.args, request.fds)
            }
            (None, Some(child_end)) => forkserver::fork(child_end),
            (None, None) => return Err(Error::internal("a long start message needs a socket")),
        };
        match forked {
            Ok(child) => {
                if let (None, Some(channel)) = (&head, &channel) {
                    request.send(channel)?;
                }
                return Ok((child, channel));
            }
            Err(ForkError::ServerGone(_)) if first => first = false,
            Err(ForkError::ServerGone(err) | ForkError::Failed(err)) => return Err(err),
        }
    }
}

/// Reads a spawned child's outcome: its return value (decoded as `R`), or
/// the error that says why there is none. Reaps the child.
pub(crate) fn read_outcome<R: serde::de::DeserializeOwned>(
    child: &ChildProc,
    channel: &mut Channel,
    timeout: Option<Duration>,
) -> Result<R> {
    let frame = recv_or_death(child, channel, timeout)?;
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
    use crate::child::Message;

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
            start_child_by(None, ECHO, "echo", Mode::Internal, b"ping", &[]).expect("start");
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
        let (child, mut channel) = start_child_as(0x5eed, ECHO, Mode::Internal).expect("start");
        let err = refusal(&mut channel);
        assert!(matches!(err, Error::BuildMismatch { .. }), "{err}");
        assert!(err.to_string().contains("rebuilt"), "{err}");
        assert_eq!(exit_code(&child), 2);
    }

    #[test]
    fn a_name_the_child_lacks_is_a_missing_registration_not_a_rebuild() {
        let (child, mut channel) =
            start_child_by(None, "no::such::function", "missing", Mode::Spawn, b"", &[])
                .expect("start");
        let err = refusal(&mut channel);
        let text = err.to_string();
        assert!(matches!(err, Error::RegistrationMissing { .. }), "{text}");
        assert!(text.contains("no::such::function"), "{text}");
        assert!(!text.contains("rebuilt"), "{text}");
        assert_eq!(exit_code(&child), 2);
    }
}
