//! How a child is started (parent side) and dispatched (child side).
//!
//! A child is this same executable, started from `/proc/self/exe` with one
//! inherited Unix socket at descriptor 3 and the variable `MULTIPROC_CHILD`
//! (`fd:parent_pid:deathsig`) in its environment. A constructor in
//! `.init_array` (see `sys`) runs before `main`: when the variable is set it
//! reads the start message (build identity, registered name, process names,
//! arguments and their descriptors), runs the function under
//! `catch_unwind`, sends back the result or the panic, and exits, so the
//! user's `main` never runs in a child. Every registration is already in
//! place then, because every crate that registers depends on this one and
//! is initialized before it.
//!
//! The child dies with its parent: `PR_SET_PDEATHSIG(SIGKILL)` when it was
//! started from the parent's main thread (the signal follows the thread),
//! otherwise a watcher thread that sees the parent's end of the socket
//! close. Pool workers also see that end close in their input loop.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::PollFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};
use crate::registry::{self, Call, PanicRecord};
use crate::sys;
use crate::wire::Channel;

/// The environment variable that marks a process as a multiproc child.
pub(crate) const ENV_VAR: &str = "MULTIPROC_CHILD";

/// Frame tags of the start protocol.
pub(crate) const TAG_START: u32 = 1;
pub(crate) const TAG_RETURNED: u32 = 2;
pub(crate) const TAG_PANICKED: u32 = 3;
pub(crate) const TAG_FAILED: u32 = 4;

/// What the parent wants from the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Mode {
    /// `Process`: run, discard the return value, exit 0 (1 after a panic).
    Process,
    /// `spawn`: also send the return value or the panic back.
    Spawn,
    /// A runtime-internal entry point (a pool worker...).
    Internal,
}

#[derive(Debug, Serialize, Deserialize)]
struct Start {
    build_id: u64,
    name: String,
    process_name: String,
    parent_name: String,
    parent_pid: u32,
    mode: Mode,
}

/// Who this process is, as `current_process()` reports it.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) name: String,
    pub(crate) parent: Option<(String, u32)>,
}

static IDENTITY: OnceLock<Identity> = OnceLock::new();
static READY: AtomicBool = AtomicBool::new(false);

pub(crate) fn identity() -> &'static Identity {
    IDENTITY.get_or_init(|| Identity {
        name: "MainProcess".to_string(),
        parent: None,
    })
}

/// Runtime-internal entry points a child can be started into.
type InternalMain = fn(Channel, Vec<u8>, Vec<OwnedFd>) -> i32;

fn internal_entry(name: &str) -> Option<InternalMain> {
    match name {
        crate::pool::WORKER_ENTRY => Some(crate::pool::worker_main),
        #[cfg(test)]
        "__multiproc::test::echo" => Some(test_echo_main),
        _ => None,
    }
}

#[cfg(test)]
fn test_echo_main(channel: Channel, args: Vec<u8>, _fds: Vec<OwnedFd>) -> i32 {
    match channel.send(TAG_RETURNED, &[&args], &[]) {
        Ok(()) => 0,
        Err(_) => 3,
    }
}

/// Called by the load-time constructor (and by [`init`]): makes this
/// process able to start children and, if it is a child, runs what its
/// parent asked and exits.
pub(crate) fn on_load() {
    if READY.swap(true, Ordering::SeqCst) {
        return;
    }
    let Some(value) = std::env::var_os(ENV_VAR) else {
        return;
    };
    sys::remove_env_before_threads(ENV_VAR);
    sys::ignore_sigpipe();
    let code = match registry::catch(|| run_child(value)) {
        Ok(code) => code,
        Err(record) => {
            eprintln!("multiproc: child runtime panicked: {}", record.message);
            70
        }
    };
    std::process::exit(code);
}

/// Makes this program able to run as a multiproc child.
///
/// Multiproc does this by itself before `main` (a load-time constructor),
/// so calling it is optional; it is the documented fallback for programs
/// that want to be explicit. Call it as the first line of `main`: in a
/// child it runs the requested function and exits, so nothing after it
/// runs there. Calling it again does nothing.
///
/// # Examples
///
/// ```no_run
/// multiproc::init(); // first line of main
/// // ... start processes ...
/// ```
pub fn init() {
    on_load();
}

pub(crate) fn ensure_ready() -> Result<()> {
    if READY.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(Error::invalid(
            "multiproc is not initialized in this program: call multiproc::init() as the first \
             line of main (or use #[multiproc::main])",
        ))
    }
}

fn parse_env(value: &OsString) -> Option<(u32, bool)> {
    let value = value.to_str()?;
    let mut parts = value.split(':');
    let fd: i32 = parts.next()?.parse().ok()?;
    let ppid: u32 = parts.next()?.parse().ok()?;
    let deathsig = parts.next()? == "1";
    (fd == sys::CHILD_FD).then_some((ppid, deathsig))
}

fn run_child(value: OsString) -> i32 {
    let Some((ppid, deathsig)) = parse_env(&value) else {
        eprintln!(
            "multiproc: this process was started with {ENV_VAR}={value:?}, which multiproc did not \
             set; refusing to run as a child"
        );
        return 2;
    };
    if deathsig && sys::set_parent_death_signal().is_err() {
        return 2;
    }
    if sys::parent_pid() != ppid {
        // The parent died before we could arm the death signal.
        return 1;
    }
    let Some(fd) = sys::take_inherited_child_fd() else {
        eprintln!("multiproc: child started without its socket to the parent");
        return 2;
    };
    let mut channel = Channel::new(fd);
    let frame = match channel.recv(None) {
        Ok(frame) if frame.tag == TAG_START => frame,
        Ok(_) | Err(_) => return 1,
    };
    let Some((start, args)) = split_start(&frame.bytes) else {
        eprintln!("multiproc: malformed start message from the parent");
        return 2;
    };
    let expected = registry::build_id();
    if start.build_id != expected {
        let err = Error::BuildMismatch {
            expected: start.build_id,
            found: expected,
        };
        eprintln!("multiproc: {err}");
        let _ = channel.send(TAG_FAILED, &[err.to_string().as_bytes()], &[]);
        return 2;
    }
    let _ = IDENTITY.set(Identity {
        name: start.process_name.clone(),
        parent: Some((start.parent_name.clone(), start.parent_pid)),
    });
    if !deathsig {
        // Started from a thread other than the parent's main thread: the
        // death signal would follow that thread, so it was not armed, and a
        // watcher thread sees the parent's end of the socket close instead.
        // (With the signal armed the kernel does it, and the child saves a
        // thread's start and teardown.)
        watch_parent(&channel);
    }
    registry::install_panic_hook();

    if start.mode == Mode::Internal {
        return match internal_entry(&start.name) {
            Some(main) => main(channel, args.to_vec(), frame.fds),
            None => {
                eprintln!("multiproc: unknown internal entry `{}`", start.name);
                2
            }
        };
    }
    let entry = match registry::lookup_name(&start.name) {
        Ok(entry) => entry,
        Err(err) => {
            eprintln!("multiproc: {err}");
            let _ = channel.send(TAG_FAILED, &[err.to_string().as_bytes()], &[]);
            return 2;
        }
    };
    let mut out = Vec::new();
    let mut out_fds = Vec::new();
    let result = entry.invoke(&mut Call::single(args, frame.fds, &mut out, &mut out_fds));
    match result {
        Ok(()) => {
            if start.mode == Mode::Spawn {
                let _ = channel.send(TAG_RETURNED, &[&out], &out_fds);
            }
            0
        }
        Err(Error::Panicked {
            message, location, ..
        }) => {
            if start.mode == Mode::Spawn {
                let record = PanicRecord { message, location };
                if let Ok(bytes) = codec::encode_plain(&record) {
                    let _ = channel.send(TAG_PANICKED, &[&bytes], &[]);
                }
            }
            1
        }
        Err(err) => {
            eprintln!("multiproc: {err}");
            let _ = channel.send(TAG_FAILED, &[err.to_string().as_bytes()], &[]);
            2
        }
    }
}

fn split_start(bytes: &[u8]) -> Option<(Start, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let header = bytes.get(4..4 + len)?;
    let start: Start = codec::decode_plain(header).ok()?;
    Some((start, &bytes[4 + len..]))
}

/// A thread that kills this process when the parent's end of the socket
/// closes (the parent died, even by SIGKILL, or from a thread that the
/// death signal would not follow).
fn watch_parent(channel: &Channel) {
    let Ok(fd) = channel.fd().try_clone_to_owned() else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("multiproc-parent-watch".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let flags = sys::POLLRDHUP;
            if let Ok(ev) = sys::poll_one(fd.as_fd(), flags, None) {
                if ev.intersects(sys::POLLRDHUP | PollFlags::POLLHUP | PollFlags::POLLERR) {
                    sys::kill_self();
                }
            }
        });
}

// ---------------------------------------------------------------------
// Parent side.

/// How a child process ended, in Python's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitStatus {
    code: i32,
}

impl ExitStatus {
    pub(crate) fn from_wait(status: WaitStatus) -> ExitStatus {
        match status {
            WaitStatus::Exited(_, code) => ExitStatus { code },
            WaitStatus::Signaled(_, sig, _) => ExitStatus {
                code: -(sig as i32),
            },
            // Stopped/continued are not final states; waitpid without
            // WUNTRACED does not report them.
            _ => ExitStatus { code: -1 },
        }
    }

    /// `true` if the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Python's `exitcode`: the exit code, or `-N` when killed by signal N.
    pub fn code(&self) -> i32 {
        self.code
    }

    /// The signal that killed the process, if one did.
    pub fn signal(&self) -> Option<i32> {
        (self.code < 0).then_some(-self.code)
    }

    pub(crate) fn into_error(self, pid: u32) -> Error {
        match self.signal() {
            Some(signal) => Error::Killed { pid, signal },
            None => Error::Exited {
                pid,
                code: self.code,
            },
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.signal() {
            Some(sig) => write!(f, "killed by {} ({sig})", crate::error::signal_name(sig)),
            None => write!(f, "exit code {}", self.code),
        }
    }
}

/// A started child: its pid, a pidfd to wait on and signal without a
/// pid-reuse race, its socket, and its exit status once reaped.
#[derive(Debug)]
pub(crate) struct ChildProc {
    pid: Pid,
    pidfd: OwnedFd,
    status: std::sync::Mutex<Option<ExitStatus>>,
}

impl ChildProc {
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// The exit status if the child has ended (reaping it), without blocking.
    pub(crate) fn try_wait(&self) -> Result<Option<ExitStatus>> {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = *status {
            return Ok(Some(s));
        }
        if let Some(ws) = sys::try_reap(self.pid)? {
            let s = ExitStatus::from_wait(ws);
            *status = Some(s);
            return Ok(Some(s));
        }
        Ok(None)
    }

    /// Waits for the child to end, at most `timeout` (`None`: forever).
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.try_wait()? {
            return Ok(Some(s));
        }
        let ev = sys::poll_one(self.pidfd.as_fd(), PollFlags::POLLIN, timeout)?;
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
        let s = sys::reap(self.pid)
            .map(ExitStatus::from_wait)
            .unwrap_or(ExitStatus { code: -1 });
        *status = Some(s);
        Ok(Some(s))
    }

    /// Sends `signal` unless the child was already reaped.
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if status.is_some() {
            return Ok(());
        }
        sys::pidfd_send_signal(self.pidfd.as_fd(), signal)
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

static NAME_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

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
    start_child_as(registry::build_id(), name, process_name, mode, args, fds)
}

/// [`start_child`], claiming to be build `build_id` (tests use another).
fn start_child_as(
    build_id: u64,
    name: &str,
    process_name: &str,
    mode: Mode,
    args: &[u8],
    fds: &[OwnedFd],
) -> Result<(ChildProc, Channel)> {
    ensure_ready()?;
    let (parent_end, child_end) = sys::socketpair()?;
    let child_end = if child_end.as_raw_fd() == sys::CHILD_FD {
        sys::dup_at_least(child_end.as_fd(), sys::CHILD_FD + 1)?
    } else {
        child_end
    };
    let deathsig = sys::is_main_thread();
    let env = format!(
        "{ENV_VAR}={}:{}:{}",
        sys::CHILD_FD,
        std::process::id(),
        u8::from(deathsig)
    );
    let env = CString::new(env).map_err(|_| Error::invalid("environment entry with a NUL byte"))?;
    let pid = sys::spawn_self(child_end.as_fd(), &env)?;
    drop(child_end);
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(err) => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = sys::reap(pid);
            return Err(err);
        }
    };
    let child = ChildProc {
        pid,
        pidfd,
        status: std::sync::Mutex::new(None),
    };
    let channel = Channel::new(parent_end);
    let me = identity();
    let header = codec::encode_plain(&Start {
        build_id,
        name: name.to_string(),
        process_name: process_name.to_string(),
        parent_name: me.name.clone(),
        parent_pid: std::process::id(),
        mode,
    })?;
    let header_len =
        u32::try_from(header.len()).map_err(|_| Error::invalid("process name too long"))?;
    match channel.send(TAG_START, &[&header_len.to_le_bytes(), &header, args], fds) {
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
            let status = child
                .wait(Some(Duration::from_secs(5)))?
                .ok_or(Error::Disconnected)?;
            return Err(status.into_error(child.pid()));
        }
        Err(err) => return Err(err),
    };
    let result = match frame.tag {
        TAG_RETURNED => codec::decode(&frame.bytes, frame.fds),
        TAG_PANICKED => {
            let record: PanicRecord = codec::decode_plain(&frame.bytes)?;
            Err(record.into_error(child.pid(), None))
        }
        _ => Err(Error::InvalidArgument {
            message: String::from_utf8_lossy(&frame.bytes).into_owned(),
        }),
    };
    // The child exits right after sending; reap it.
    let _ = child.wait(Some(Duration::from_secs(5)));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_echo_child_round_trip() {
        let (child, mut channel) = start_child(
            "__multiproc::test::echo",
            "echo",
            Mode::Internal,
            b"ping",
            &[],
        )
        .expect("start");
        let frame = channel.recv(Some(Duration::from_secs(20))).expect("reply");
        assert_eq!((frame.tag, &frame.bytes[..]), (TAG_RETURNED, &b"ping"[..]));
        let status = child
            .wait(Some(Duration::from_secs(20)))
            .expect("wait")
            .expect("exited");
        assert!(status.success(), "{status}");
    }

    #[test]
    fn a_child_of_another_build_refuses_with_exit_code_2() {
        let (child, mut channel) = start_child_as(
            0x5eed,
            "__multiproc::test::echo",
            "echo",
            Mode::Internal,
            b"",
            &[],
        )
        .expect("start");
        let frame = channel.recv(Some(Duration::from_secs(20))).expect("reply");
        assert_eq!(frame.tag, TAG_FAILED);
        assert!(String::from_utf8_lossy(&frame.bytes).contains("different build"));
        let status = child
            .wait(Some(Duration::from_secs(20)))
            .expect("wait")
            .expect("exited");
        assert_eq!(status.code(), 2);
    }

    #[test]
    fn exit_status_numbers() {
        let s = ExitStatus { code: -9 };
        assert_eq!((s.signal(), s.success()), (Some(9), false));
        let s = ExitStatus { code: 3 };
        assert_eq!((s.signal(), s.code()), (None, 3));
    }
}
