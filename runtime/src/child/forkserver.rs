//! The forkserver: a small single-threaded process that forks children on
//! request, so that a child costs a fork instead of an exec (CPython's
//! `forkserver` start method).
//!
//! # The server
//!
//! The server is the internal entry [`ENTRY`], started like any child
//! (`posix_spawn` of `/proc/self/exe`) but marked `:s` in `MULTIPROC_CHILD`, so
//! that its load-time hook runs it on the thread the loader started,
//! once the constructors ran, and starts no thread: the server is
//! single-threaded by construction (no `main` thread, no parent watcher:
//! its own loop sees the program's socket close). Under
//! `#[multiproc::main]` (`:sm`) it runs from `main`'s first line instead,
//! on std's main thread, still the only one, so that its children run on
//! std's `main` thread as spawned children do. It checks that (a
//! constructor of another library may have started a thread) when it
//! starts and again after the preload, and refuses to serve otherwise, so
//! a fork never copies a lock held by a thread that does not exist in the
//! child. Its loop `poll`s its socket to the program and the pidfds of
//! its children; nothing else runs in it.
//!
//! # The protocol (frames of [`crate::wire`] on the server's socket)
//!
//! | message | direction | tag | bytes | descriptors |
//! |---|---|---|---|---|
//! | start | program → server | the child start message ([`super::protocol`]) with the preloads (codec) as arguments | | |
//! | ready | server → program | 16 | none | none |
//! | failed | server → program | the child [`Message::Failed`]: the preload failed, or the server is not single-threaded | | |
//! | fork | program → server | 17 | none | the child's end of its socket, the write end of its status pipe |
//! | forked | server → program | 18 | `pid: u32` | a pidfd of the child |
//! | fork failed | server → program | 19 | `errno: i32` | none |
//!
//! The program then sends the child its start message on its own socket,
//! exactly as to a spawned child; the forked child reads and checks it as
//! a spawned child does ([`super::boot`]).
//!
//! # Exit statuses and signals
//!
//! A forked child is the server's child: the server reaps it when its
//! pidfd turns readable and writes its exit code (Python's numbers, an
//! `i32`) to its status pipe, then closes the pipe. The program reads it
//! there; the pipe is also the child's sentinel. The server opens the
//! child's pidfd right after the fork, before it could reap it, and sends
//! a copy: the program signals the child through it, so a signal never
//! reaches a reused pid, without reparenting anything.
//!
//! # Lifetimes
//!
//! The server dies with the program: `PR_SET_PDEATHSIG` when it was
//! started from the main thread, and in every case its loop ends when the
//! program's end of its socket closes (SIGKILL included). A forked child
//! arms `PR_SET_PDEATHSIG(SIGKILL)` towards the server (its only thread is
//! the server), so it dies with the server, and so with the program. A
//! server that died is restarted by the next start; a child it left dies
//! with it and reports -9.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::poll::PollFlags;
use nix::unistd::Pid;

use super::start::{ChildProc, death_error, exit_code, start_server};
use super::{Message, ensure_ready};
use crate::codec;
use crate::error::{Error, Result};
use crate::registry::{self, Call};
use crate::sys;
use crate::sys::fork::Forked;
use crate::wire::Channel;

/// The forkserver's registered name.
pub(crate) const ENTRY: &str = "__multiproc::forkserver";

inventory::submit! {
    crate::registry::Entry::internal(ENTRY, server_main)
}

const TAG_READY: u32 = 16;
const TAG_FORK: u32 = 17;
const TAG_FORKED: u32 = 18;
const TAG_FORK_FAILED: u32 = 19;

/// How long the program waits for the server to be ready (it runs the
/// preload first) and for an answer to a fork.
const READY_WAIT: Duration = Duration::from_secs(60);
const FORK_WAIT: Duration = Duration::from_secs(30);

/// Exit code of a server that refuses to serve.
const EXIT_REFUSED: i32 = 2;

/// What the server runs before it is ready: registered names and their
/// encoded (empty) arguments.
type Preloads = Vec<(String, Vec<u8>)>;

// ---------------------------------------------------------------------
// The server.

/// A child of the server that it has not reaped yet.
#[derive(Debug)]
struct Kid {
    pid: Pid,
    pidfd: OwnedFd,
    /// The write end of its status pipe.
    status: OwnedFd,
}

#[derive(Debug)]
struct Server {
    /// `None` only in a forked child, which drops it at once.
    control: Option<Channel>,
    kids: Vec<Kid>,
    requester: u32,
    me: u32,
}

fn refuse(channel: &Channel, err: Error) -> i32 {
    let _ = Message::Failed(err).send(channel, &[]);
    EXIT_REFUSED
}

fn single_threaded(when: &str) -> Result<()> {
    match sys::fork::thread_count() {
        Ok(1) => Ok(()),
        Ok(n) => Err(Error::misuse(format!(
            "the forkserver has {n} threads {when}, and forking a multithreaded process is \
             unsound; a load-time constructor or the preload started a thread (use the \
             spawn start method)"
        ))),
        Err(err) => Err(Error::io("could not count the forkserver's threads", err)),
    }
}

/// Under `panic = "abort"`: where a panicking preload is reported, taken
/// (and closed) once the preload is done, so that no forked child holds a
/// copy of the server's socket.
static PRELOAD_REPORT: Mutex<Option<Channel>> = Mutex::new(None);

/// Under `panic = "abort"`: the panic hook's last act when the preload
/// panics; the program gets the panic as it would with unwinding.
fn report_preload_abort(record: registry::PanicRecord) {
    let taken = PRELOAD_REPORT.try_lock().ok().and_then(|mut c| c.take());
    if let Some(channel) = taken {
        let err = record.into_error(std::process::id(), None);
        let _ = Message::Failed(err).send(&channel, &[]);
    }
    std::process::exit(EXIT_REFUSED);
}

/// After the preload: a panic aborts as it would without a reporter.
fn no_report(_record: registry::PanicRecord) {}

/// The server's entry point (see the module docs).
fn server_main(channel: Channel, args: Vec<u8>, fds: Vec<OwnedFd>) -> i32 {
    if let Err(err) = single_threaded("at its start") {
        return refuse(&channel, err);
    }
    if cfg!(panic = "abort") {
        if let Ok(fd) = channel.fd().try_clone_to_owned() {
            *lock(&PRELOAD_REPORT) = Some(Channel::new(fd));
            registry::set_abort_reporter(report_preload_abort);
        }
    }
    let preloads: Preloads = match codec::decode(&args, fds) {
        Ok(preloads) => preloads,
        Err(err) => return refuse(&channel, err),
    };
    for (name, args) in &preloads {
        let entry = match registry::lookup_name(name) {
            Ok(entry) if entry.internal_main().is_none() => entry,
            Ok(_) => {
                return refuse(
                    &channel,
                    Error::misuse(format!("`{name}` cannot be a forkserver preload")),
                );
            }
            Err(err) => return refuse(&channel, err),
        };
        let (mut out, mut out_fds) = (Vec::new(), Vec::new());
        if let Err(err) = entry.invoke(&mut Call::single(args, Vec::new(), &mut out, &mut out_fds))
        {
            return refuse(&channel, err);
        }
    }
    if cfg!(panic = "abort") {
        drop(lock(&PRELOAD_REPORT).take());
        registry::set_abort_reporter(no_report);
    }
    if let Err(err) = single_threaded("after its preload") {
        return refuse(&channel, err);
    }
    // What the preload printed is flushed here, not by every child.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if channel.send(TAG_READY, &[], &[]).is_err() {
        return 1;
    }
    let requester = super::identity().parent.as_ref().map_or(0, |(_, pid)| *pid);
    let mut server = Server {
        control: Some(channel),
        kids: Vec::new(),
        requester,
        me: std::process::id(),
    };
    server.serve()
}

impl Server {
    /// The loop: forks on request, relays exit statuses, ends when the
    /// program's end of the socket closes. Returns the exit code.
    fn serve(&mut self) -> i32 {
        loop {
            let Some(control) = self.control.as_ref() else {
                return 0;
            };
            let request_waiting = control.has_buffered_outcome();
            let events = {
                let mut fds = Vec::with_capacity(1 + self.kids.len());
                fds.push((control.fd(), PollFlags::POLLIN | sys::POLLRDHUP));
                fds.extend(
                    self.kids
                        .iter()
                        .map(|k| (k.pidfd.as_fd(), PollFlags::POLLIN)),
                );
                let timeout = request_waiting.then_some(Duration::ZERO);
                match sys::poll_many(&fds, timeout) {
                    Ok(events) => events,
                    Err(_) => return 1,
                }
            };
            // Reap first: a pid is never reused while its kid is listed.
            for at in (0..self.kids.len()).rev() {
                if !events[at + 1].is_empty() {
                    self.reap(at);
                }
            }
            let control_events = events[0];
            if request_waiting || control_events.contains(PollFlags::POLLIN) {
                if let Err(code) = self.request() {
                    return code;
                }
            } else if control_events
                .intersects(PollFlags::POLLHUP | PollFlags::POLLERR | sys::POLLRDHUP)
            {
                // The program is gone: so is the server (its children die
                // of their death signal).
                return 0;
            }
        }
    }

    /// Reaps kid `at` if it has exited, and relays its status.
    fn reap(&mut self, at: usize) {
        match sys::try_reap(self.kids[at].pid) {
            Ok(None) => {}
            Ok(Some(status)) => {
                let kid = self.kids.swap_remove(at);
                let code = exit_code(status).to_le_bytes();
                // A program that dropped its end does not want it.
                let _ = sys::write(kid.status.as_fd(), &code);
            }
            // ECHILD: not ours (cannot happen); forget it, closing its pipe.
            Err(_) => {
                self.kids.swap_remove(at);
            }
        }
    }

    /// Reads and serves one request. `Err(code)`: the server must end.
    fn request(&mut self) -> std::result::Result<(), i32> {
        let Some(control) = self.control.as_mut() else {
            return Err(0);
        };
        let frame = match control.recv(None) {
            Ok(frame) => frame,
            Err(Error::Disconnected) => return Err(0),
            Err(_) => return Err(1),
        };
        let mut fds = frame.fds.into_iter();
        match (frame.tag, fds.next(), fds.next(), fds.next()) {
            (TAG_FORK, Some(socket), Some(status), None) => self.fork(socket, status),
            _ => {
                let errno = (libc::EINVAL).to_le_bytes();
                let _ = control.send(TAG_FORK_FAILED, &[&errno], &[]);
                Ok(())
            }
        }
    }

    /// Forks a child that starts on `socket`; tells the program its pid
    /// and sends a pidfd, or why the fork failed.
    fn fork(&mut self, socket: OwnedFd, status: OwnedFd) -> std::result::Result<(), i32> {
        // SAFETY: this process is the forkserver, single-threaded by
        // construction (it runs on the loader's thread and starts none),
        // checked at its start and after its preload (`single_threaded`).
        match unsafe { sys::fork::fork() } {
            Ok(Forked::Child) => {
                // The server's descriptors are not the child's: the
                // socket to the program (whose close ends the server) and
                // the other children's status pipes (whose close tells the
                // program the server is gone).
                self.control = None;
                self.kids.clear();
                drop(status);
                let code = super::boot::run_forked(socket, self.requester, self.me);
                std::process::exit(code)
            }
            Ok(Forked::Parent(pid)) => {
                drop(socket);
                let Some(control) = self.control.as_ref() else {
                    return Err(0);
                };
                let opened = sys::pidfd_open(pid).and_then(|fd| Ok((fd.try_clone()?, fd)));
                match opened {
                    Ok((theirs, pidfd)) => {
                        let pid_bytes = (pid.as_raw() as u32).to_le_bytes();
                        let sent = control.send(TAG_FORKED, &[&pid_bytes], &[theirs]);
                        // Listed even if the program is gone: it is reaped.
                        self.kids.push(Kid { pid, pidfd, status });
                        sent.map_err(|_| 0)
                    }
                    Err(err) => {
                        // Not reaped yet, so the pid is still this child's.
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        let _ = sys::reap(pid);
                        let errno = err.raw_os_error().unwrap_or(libc::EIO).to_le_bytes();
                        control.send(TAG_FORK_FAILED, &[&errno], &[]).map_err(|_| 0)
                    }
                }
            }
            Err(err) => {
                let Some(control) = self.control.as_ref() else {
                    return Err(0);
                };
                let errno = err.raw_os_error().unwrap_or(libc::EIO).to_le_bytes();
                control.send(TAG_FORK_FAILED, &[&errno], &[]).map_err(|_| 0)
            }
        }
    }
}

// ---------------------------------------------------------------------
// The program's side.

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
        let (child, mut channel) = start_server(ENTRY, &args)?;
        let frame = match channel.recv(Some(READY_WAIT)) {
            Ok(frame) => frame,
            Err(Error::Disconnected) => {
                let code = child
                    .wait(Some(Duration::from_secs(5)))?
                    .ok_or(Error::Disconnected)?;
                return Err(death_error(child.pid(), code));
            }
            Err(err) => return Err(err),
        };
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

/// Asks the server to fork a child that starts on `child_end`.
pub(crate) fn fork(child_end: OwnedFd) -> std::result::Result<ChildProc, ForkError> {
    let mut slot = lock(&CLIENT);
    let client = client(&mut slot).map_err(ForkError::Failed)?;
    let (relay, status) =
        sys::pipe().map_err(|e| ForkError::Failed(Error::io("could not create a pipe", e)))?;
    sys::set_nonblocking(relay.as_fd(), true)
        .map_err(|e| ForkError::Failed(Error::io("fcntl", e)))?;
    match client.channel.send(TAG_FORK, &[], &[child_end, status]) {
        Ok(()) => {}
        Err(Error::Disconnected) => {
            let err = client.gone();
            *slot = None;
            return Err(ForkError::ServerGone(err));
        }
        Err(err) => return Err(ForkError::Failed(err)),
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
