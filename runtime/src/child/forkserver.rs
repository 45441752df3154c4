//! The program's link to its forkserver ([`super::server`]): the server
//! is started the first time a child is forked (or explicitly, early),
//! asked for one child per request, and restarted when it is found dead.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::poll::PollFlags;
use nix::unistd::Pid;

use super::proc::{ChildProc, recv_or_death};
use super::protocol::{Preloads, TAG_FORK, TAG_FORK_FAILED, TAG_FORK_START, TAG_FORKED, TAG_READY};
use super::spawn::start_server;
use super::{Message, ensure_ready};
use crate::codec;
use crate::error::{Error, Result};
use crate::sys;
use crate::wire::Channel;

/// How long the program waits for the server to be ready (it runs the
/// preload first) and for an answer to a fork.
const READY_WAIT: Duration = Duration::from_secs(60);
const FORK_WAIT: Duration = Duration::from_secs(30);

/// The spin before the program sleeps for an answer (`spin`).
static ANSWER_SPIN: crate::spin::Shared = crate::spin::Shared::new();

/// The program's link to its server.
#[derive(Debug)]
struct Client {
    child: ChildProc,
    channel: Channel,
}

static CLIENT: Mutex<Option<Client>> = Mutex::new(None);
static PRELOADS: Mutex<Preloads> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a fork request failed.
#[derive(Debug)]
pub(crate) enum ForkError {
    /// The server was found dead (it is restarted by the next request).
    ServerGone(Error),
    /// The fork failed, or the server could not be started.
    Failed(Error),
}

impl Client {
    fn start() -> Result<Client> {
        let preloads = lock(&PRELOADS).clone();
        let (mut args, mut fds) = (Vec::new(), Vec::new());
        codec::encode(&preloads, &mut args, &mut fds)?;
        let (child, mut channel) = start_server(&args)?;
        let frame = recv_or_death(&child, &mut channel, Some(READY_WAIT))?;
        if frame.tag == TAG_READY {
            return Ok(Client { child, channel });
        }
        match Message::parse(frame.tag, &frame.bytes) {
            Ok(Message::Failed(err)) => Err(err),
            _ => Err(Error::Decode {
                message: format!("the forkserver answered its start with tag {}", frame.tag),
            }),
        }
    }

    fn gone(&self) -> Error {
        let code = self.child.wait(Some(Duration::from_secs(5))).ok().flatten();
        let how = match code {
            Some(code) if code < 0 => {
                format!("killed by {}", crate::error::signal_name(-code))
            }
            Some(code) => format!("exit code {code}"),
            None => "no exit status".to_string(),
        };
        Error::io_kind_owned(
            format!(
                "the forkserver (pid {}) died ({how}); it is restarted by the next start",
                self.child.pid()
            ),
            std::io::ErrorKind::BrokenPipe,
        )
    }
}

/// The running server, started if there is none (or it died).
fn client(slot: &mut Option<Client>) -> Result<&mut Client> {
    if slot
        .as_ref()
        .is_some_and(|c| !matches!(c.child.try_wait(), Ok(None)))
    {
        *slot = None;
    }
    if slot.is_none() {
        *slot = Some(Client::start()?);
    }
    slot.as_mut()
        .ok_or_else(|| Error::internal("the forkserver slot is empty"))
}

/// Starts the forkserver now if it is not running (`start_forkserver`).
pub(crate) fn start_server_now() -> Result<()> {
    ensure_ready()?;
    client(&mut lock(&CLIENT)).map(|_| ())
}

/// The preloads of the servers started from now on.
pub(crate) fn set_preload(preloads: Preloads) {
    *lock(&PRELOADS) = preloads;
}

/// Asks the server to fork a child that starts on `child_end` (the
/// program sends the start message there).
pub(crate) fn fork(child_end: OwnedFd) -> std::result::Result<ChildProc, ForkError> {
    ask(TAG_FORK, &[], &[child_end.as_fd()], &[])
}

/// Asks the server to fork a child that starts with the start message
/// `head` + `args` and its descriptors `fds`, carried by the request, and
/// has `socket` (its end of its socket to the program), if any.
pub(crate) fn fork_with_start(
    socket: Option<&OwnedFd>,
    head: &[u8],
    args: &[u8],
    fds: &[OwnedFd],
) -> std::result::Result<ChildProc, ForkError> {
    let mut after = Vec::with_capacity(1 + fds.len());
    after.extend(socket.map(AsFd::as_fd));
    after.extend(fds.iter().map(AsFd::as_fd));
    let flag = [u8::from(socket.is_some())];
    ask(TAG_FORK_START, &[&flag, head, args], &[], &after)
}

/// Sends a fork request `tag` of `bytes`, with the descriptors `before`,
/// the write end of the child's status pipe and `after`; reads the answer.
fn ask(
    tag: u32,
    bytes: &[&[u8]],
    before: &[BorrowedFd<'_>],
    after: &[BorrowedFd<'_>],
) -> std::result::Result<ChildProc, ForkError> {
    let mut slot = lock(&CLIENT);
    let client = client(&mut slot).map_err(ForkError::Failed)?;
    // Both ends non-blocking (one call): the server writes 4 bytes once to
    // an empty pipe, which never blocks.
    let (relay, status) = sys::pipe_nonblocking()
        .map_err(|e| ForkError::Failed(Error::io("could not create a pipe", e)))?;
    let mut fds = Vec::with_capacity(before.len() + 1 + after.len());
    fds.extend_from_slice(before);
    fds.push(status.as_fd());
    fds.extend_from_slice(after);
    let sent = client.channel.send_borrowed(tag, bytes, &fds);
    drop(fds);
    drop(status);
    match sent {
        Ok(()) => {}
        Err(Error::Disconnected) => {
            let err = client.gone();
            *slot = None;
            return Err(ForkError::ServerGone(err));
        }
        Err(err) => return Err(ForkError::Failed(err)),
    }
    // The answer comes within a fork: a short spin spares the wake-up.
    if !client.channel.has_buffered_outcome() {
        let fds = [(client.channel.fd(), PollFlags::POLLIN)];
        let _ = ANSWER_SPIN.poll(&fds, crate::wire::deadline(Some(FORK_WAIT)));
    }
    let frame = match client.channel.recv(Some(FORK_WAIT)) {
        Ok(frame) => frame,
        Err(Error::Disconnected) => {
            let err = client.gone();
            *slot = None;
            return Err(ForkError::ServerGone(err));
        }
        Err(Error::Timeout) => {
            // A server that does not answer is stopped (dropping it kills
            // and reaps it); the next start gets a new one.
            *slot = None;
            return Err(ForkError::Failed(Error::io_kind_owned(
                format!(
                    "the forkserver did not answer a fork within {} s; it was stopped",
                    FORK_WAIT.as_secs()
                ),
                std::io::ErrorKind::TimedOut,
            )));
        }
        Err(err) => return Err(ForkError::Failed(err)),
    };
    let word = |bytes: &[u8]| -> Option<[u8; 4]> { bytes.try_into().ok() };
    let mut fds = frame.fds.into_iter();
    match (frame.tag, word(&frame.bytes), fds.next()) {
        (TAG_FORKED, Some(pid), Some(pidfd)) => {
            let pid = Pid::from_raw(u32::from_le_bytes(pid) as i32);
            Ok(ChildProc::forked(pid, pidfd, relay))
        }
        (TAG_FORK_FAILED, Some(errno), None) => Err(ForkError::Failed(Error::io(
            "the forkserver could not fork a child",
            std::io::Error::from_raw_os_error(i32::from_le_bytes(errno)),
        ))),
        (tag, _, _) => {
            *slot = None;
            Err(ForkError::Failed(Error::Decode {
                message: format!(
                    "the forkserver answered a fork with a malformed frame (tag {tag}); it was stopped"
                ),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_request_is_refused_and_the_server_serves_on() {
        {
            let mut slot = lock(&CLIENT);
            let client = client(&mut slot).expect("server");
            let (_keep, one) = sys::socketpair().expect("pair");
            client
                .channel
                .send(TAG_FORK, &[], &[one])
                .expect("send a fork request with one descriptor");
            let frame = client
                .channel
                .recv(Some(Duration::from_secs(20)))
                .expect("an answer");
            assert_eq!(frame.tag, TAG_FORK_FAILED);
            assert_eq!(frame.bytes, libc::EINVAL.to_le_bytes());
            assert!(frame.fds.is_empty());
        }
        // The same server forks the next request.
        let (parent_end, child_end) = sys::socketpair().expect("pair");
        let child = match fork(child_end) {
            Ok(child) => child,
            Err(ForkError::ServerGone(err) | ForkError::Failed(err)) => panic!("{err}"),
        };
        // No start message: the child gives up when its socket closes.
        drop(parent_end);
        let code = child
            .wait(Some(Duration::from_secs(20)))
            .expect("wait")
            .expect("ended");
        assert_eq!(code, 1);
    }
}
