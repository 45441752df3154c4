//! The forkserver process: small, single-threaded, it forks children on
//! request, so that a child costs a fork instead of an exec (CPython's
//! `forkserver` start method).
//!
//! # The server
//!
//! The server is the internal entry [`FORKSERVER`], started like any child
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
//! # The protocol
//!
//! Its messages, tags and layouts are in [`super::protocol`]: the
//! program starts the server with a start message (the preloads as its
//! arguments) and asks for each child with a fork request carrying the
//! write end of the child's status pipe and either the child's start
//! message (with its descriptors, and the child's end of its socket if it
//! has one) or only the child's end of its socket (a start too long to
//! carry, sent there after the fork); the program's side is
//! [`super::forkserver`].
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
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::poll::PollFlags;
use nix::unistd::Pid;

use super::Message;
use super::proc::exit_code;
use super::protocol::{
    Assigned, FORKSERVER, Preloads, TAG_ASSIGN, TAG_FORK, TAG_FORK_FAILED, TAG_FORK_START,
    TAG_FORKED, TAG_READY, TAG_START,
};
use crate::codec;
use crate::error::{Error, Result};
use crate::registry::{self, Call};
use crate::spin;
use crate::sys;
use crate::sys::fork::Forked;
use crate::wire::{Channel, Frame};

inventory::submit! {
    crate::registry::Entry::internal(FORKSERVER, server_main)
}

/// Exit code of a server that refuses to serve.
const EXIT_REFUSED: i32 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A child of the server that it has not reaped yet.
#[derive(Debug)]
struct Kid {
    pid: Pid,
    pidfd: OwnedFd,
    /// The write end of its status pipe.
    status: OwnedFd,
}

/// A child forked ahead of the next request, waiting on its link for
/// what to run: a start then costs the server one message instead of a
/// fork, and the fork of the next spare comes after the answer, while
/// the child just started runs (see the module docs).
#[derive(Debug)]
struct Spare {
    pid: Pid,
    pidfd: OwnedFd,
    link: Channel,
}

/// A forked child's pid and the server's pidfd of it.
type Started = (Pid, OwnedFd);

#[derive(Debug)]
struct Server {
    /// `None` only in a forked child, which drops it at once.
    control: Option<Channel>,
    kids: Vec<Kid>,
    spare: Option<Spare>,
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
        spare: None,
        requester,
        me: std::process::id(),
    };
    server.refill();
    server.serve()
}

impl Server {
    /// The loop: forks on request, relays exit statuses, ends when the
    /// program's end of the socket closes. Returns the exit code.
    fn serve(&mut self) -> i32 {
        // Its waits spin a little first (`spin`): the next event of a
        // start usually comes within a vCPU's wake-up time.
        let mut budget = spin::Budget::START;
        loop {
            let Some(control) = self.control.as_ref() else {
                return 0;
            };
            let request_waiting = control.has_buffered_outcome();
            let events = {
                let mut fds = Vec::with_capacity(2 + self.kids.len());
                fds.push((control.fd(), PollFlags::POLLIN | sys::POLLRDHUP));
                fds.extend(
                    self.kids
                        .iter()
                        .map(|k| (k.pidfd.as_fd(), PollFlags::POLLIN)),
                );
                fds.extend(
                    self.spare
                        .as_ref()
                        .map(|s| (s.pidfd.as_fd(), PollFlags::POLLIN)),
                );
                let polled = if request_waiting {
                    sys::poll_many(&fds, Some(Duration::ZERO))
                } else {
                    spin::poll(&mut budget, &fds, None)
                };
                match polled {
                    Ok(events) => events,
                    Err(_) => return 1,
                }
            };
            // A spare that died waiting (killed by someone) is reaped and
            // not replaced until the next request: no fork loop.
            if self.spare.is_some()
                && events
                    .get(1 + self.kids.len())
                    .is_some_and(|e| !e.is_empty())
            {
                self.drop_spare();
            }
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
        match fork_request(frame) {
            Some((socket, status, start)) => self.fork(socket, status, start),
            None => {
                let errno = (libc::EINVAL).to_le_bytes();
                let _ = control.send(TAG_FORK_FAILED, &[&errno], &[]);
                Ok(())
            }
        }
    }

    /// Starts a child with `start` (or on `socket` when the request did
    /// not carry it): the spare if there is one, else a fork. Tells the
    /// program its pid and sends a pidfd, or why the fork failed; then
    /// forks the next spare.
    fn fork(
        &mut self,
        socket: Option<OwnedFd>,
        status: OwnedFd,
        start: Option<Frame>,
    ) -> std::result::Result<(), i32> {
        let started = match self.spare.take() {
            Some(spare) => match assign(&spare, socket, start) {
                Ok(()) => Ok((spare.pid, spare.pidfd)),
                Err((socket, start)) => {
                    // The spare is gone or broken: it gets nothing, and this
                    // start a fork of its own.
                    self.spare = Some(spare);
                    self.drop_spare();
                    self.fork_now(socket, start)
                }
            },
            None => self.fork_now(socket, start),
        };
        let Some(control) = self.control.as_ref() else {
            return Err(0);
        };
        let sent = match started {
            Ok((pid, pidfd)) => {
                let pid_bytes = (pid.as_raw() as u32).to_le_bytes();
                // The program gets its own copy of the pidfd (SCM_RIGHTS),
                // and the server keeps this one.
                let sent = control.send(TAG_FORKED, &[&pid_bytes], std::slice::from_ref(&pidfd));
                // Listed even if the program is gone: it is reaped.
                self.kids.push(Kid { pid, pidfd, status });
                sent
            }
            Err(err) => {
                let errno = err.raw_os_error().unwrap_or(libc::EIO).to_le_bytes();
                control.send(TAG_FORK_FAILED, &[&errno], &[])
            }
        };
        sent.map_err(|_| 0)?;
        self.refill();
        Ok(())
    }

    /// Forks a child that starts with `start` or on `socket`.
    fn fork_now(
        &mut self,
        socket: Option<OwnedFd>,
        start: Option<Frame>,
    ) -> std::io::Result<Started> {
        let (requester, me) = (self.requester, self.me);
        self.fork_child((), move || {
            super::boot::run_forked(socket, start, requester, me)
        })
        .map(|(pid, pidfd, ())| (pid, pidfd))
    }

    /// Forks the next spare, if there is none; a fork refused now is the
    /// next start's error (it forks for itself).
    fn refill(&mut self) {
        if self.spare.is_some() {
            return;
        }
        let Ok((here, there)) = sys::socketpair() else {
            return;
        };
        let (requester, me) = (self.requester, self.me);
        let forked = self.fork_child(here, move || {
            super::boot::run_spare(Channel::new(there), requester, me)
        });
        if let Ok((pid, pidfd, here)) = forked {
            self.spare = Some(Spare {
                pid,
                pidfd,
                link: Channel::new(here),
            });
        }
    }

    /// Ends the spare (killed through its pidfd, so never a reused pid)
    /// and reaps it.
    fn drop_spare(&mut self) {
        if let Some(spare) = self.spare.take() {
            let _ = sys::pidfd_send_signal(spare.pidfd.as_fd(), nix::sys::signal::Signal::SIGKILL);
            let _ = sys::reap(spare.pid);
        }
    }

    /// Forks a child that runs `run` and exits with the code it returns;
    /// `keep` is the server's, closed in the child. Returns the child's pid
    /// and a pidfd of it, and `keep`.
    fn fork_child<T>(
        &mut self,
        keep: T,
        run: impl FnOnce() -> i32,
    ) -> std::io::Result<(Pid, OwnedFd, T)> {
        // SAFETY: this process is the forkserver, single-threaded by
        // construction (it runs on the loader's thread and starts none),
        // checked at its start and after its preload (`single_threaded`).
        match unsafe { sys::fork::fork() } {
            Ok(Forked::Child) => {
                // The server's descriptors are not the child's: the
                // socket to the program (whose close ends the server), the
                // other children's status pipes (whose close tells the
                // program the server is gone) and the spare's link.
                self.control = None;
                self.kids.clear();
                self.spare = None;
                drop(keep);
                super::boot::exit_forked(run())
            }
            Ok(Forked::Parent(pid)) => match sys::pidfd_open(pid) {
                // `run` is dropped here: what it holds is the child's.
                Ok(pidfd) => Ok((pid, pidfd, keep)),
                Err(err) => {
                    // Not reaped yet, so the pid is still this child's.
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = sys::reap(pid);
                    Err(err)
                }
            },
            Err(err) => Err(err),
        }
    }
}

/// Sends the spare what it runs: `[socket, start]` flags (0 or 1), the
/// start message's bytes, and the child's socket then the start's
/// descriptors. Gives them back when the spare cannot take them.
fn assign(
    spare: &Spare,
    socket: Option<OwnedFd>,
    start: Option<Frame>,
) -> std::result::Result<(), Assigned> {
    let flags = [u8::from(socket.is_some()), u8::from(start.is_some())];
    let sent = {
        let mut fds: Vec<std::os::fd::BorrowedFd<'_>> = socket.iter().map(AsFd::as_fd).collect();
        fds.extend(start.iter().flat_map(|s| s.fds.iter().map(AsFd::as_fd)));
        let bytes = start.as_ref().map_or(&[][..], |s| &s.bytes[..]);
        spare.link.send_borrowed(TAG_ASSIGN, &[&flags, bytes], &fds)
    };
    // Once sent, the spare has its own copies.
    sent.map_err(|_| (socket, start))
}

/// A fork request's parts: the child's socket (if it has one), the write
/// end of its status pipe, and its start message when the request carries
/// it. `None`: a malformed request.
fn fork_request(frame: Frame) -> Option<(Option<OwnedFd>, OwnedFd, Option<Frame>)> {
    let mut fds = frame.fds.into_iter();
    match frame.tag {
        TAG_FORK if frame.bytes.is_empty() => match (fds.next(), fds.next(), fds.next()) {
            (Some(socket), Some(status), None) => Some((Some(socket), status, None)),
            _ => None,
        },
        TAG_FORK_START => {
            let (&flag, _) = frame.bytes.split_first()?;
            let status = fds.next()?;
            let socket = match flag {
                0 => None,
                1 => Some(fds.next()?),
                _ => return None,
            };
            let mut bytes = frame.bytes;
            bytes.remove(0);
            let start = Frame {
                tag: TAG_START,
                bytes,
                fds: fds.collect(),
            };
            Some((socket, status, Some(start)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::tests::frame;
    use super::*;

    #[test]
    fn fork_requests_are_checked_whole() {
        let parts = |tag, bytes: &[u8], fds| {
            fork_request(frame(tag, bytes, fds)).map(|(socket, _, start)| {
                (
                    socket.is_some(),
                    start.map(|s| (s.tag, s.bytes, s.fds.len())),
                )
            })
        };
        assert_eq!(parts(TAG_FORK, b"", 2), Some((true, None)));
        assert_eq!(parts(TAG_FORK, b"", 1), None);
        assert_eq!(parts(TAG_FORK, b"", 3), None);
        assert_eq!(parts(TAG_FORK, b"x", 2), None);
        assert_eq!(
            parts(TAG_FORK_START, b"\0start", 3),
            Some((false, Some((TAG_START, b"start".to_vec(), 2))))
        );
        assert_eq!(
            parts(TAG_FORK_START, b"\x01start", 3),
            Some((true, Some((TAG_START, b"start".to_vec(), 1))))
        );
        assert_eq!(parts(TAG_FORK_START, b"\x01start", 1), None);
        assert_eq!(parts(TAG_FORK_START, b"\x02start", 2), None);
        assert_eq!(parts(TAG_FORK_START, b"", 1), None);
        assert_eq!(parts(TAG_FORK_START, b"\0", 0), None);
        assert_eq!(parts(TAG_READY, b"", 2), None);
    }
}
