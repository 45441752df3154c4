//! How a child process starts: the protocol between a parent and a child
//! it started, the child's side ([`boot`]) and the parent's ([`start`]).
//!
//! A child is this same executable, started again from `/proc/self/exe`
//! with the parent's arguments, `/dev/null` as standard input, one
//! inherited Unix socket at descriptor [`CHILD_FD`] and the variable
//! [`ENV_VAR`] (`fd:parent_pid:deathsig[:m|:s|:sm]`) in its environment. Before
//! `main`, the child's load-time hook runs the load-time constructors that
//! come after it (so every registration is in place whatever the link
//! order), reads the start message, checks that it runs the parent's
//! executable, looks the registered name up, runs the function on a thread
//! named `main`, sends back the outcome and exits. The user's `main` (or
//! the test harness) never runs in a child.
//!
//! When the parent's `main` began with `#[multiproc::main]` (so the
//! child's does: it is the same executable), the variable ends in `:m` and
//! the hook only claims the socket: the loader runs the constructors, std
//! sets its runtime up, and `main`'s first line runs the child on the real
//! main thread, before any of the user's `main` body. That saves the
//! thread of the load-time path (its stack and malloc arena), most of what
//! a child costs beyond exec; see BENCHMARKS.md.
//!
//! The start protocol, its messages and their layouts, is in
//! [`protocol`]: the parent sends a start, the child answers with its
//! outcome. A runtime-internal entry (the pool worker) speaks its own
//! protocol on the socket after the start.
//!
//! The child dies with its parent: `PR_SET_PDEATHSIG(SIGKILL)` when it was
//! started from a thread that lives as long as the parent process,
//! otherwise a watcher thread that sees the parent's end of the socket
//! close.
//!
//! The start method `forkserver` starts one spawned child marked `:s`
//! (`:sm` under `#[multiproc::main]`): the server ([`server`]), which runs
//! single-threaded and forks the others on request ([`forkserver`] is the
//! program's link to it). A forked child gets its socket from the server
//! instead of at [`CHILD_FD`], and from there reads the same start message
//! and makes the same checks as a spawned one (`boot::run_forked`).
//!
//! The files form layers, each using only those below it:
//!
//! - the parent's side: [`start`] (a start by either method, a spawned
//!   child's outcome) over [`forkserver`] (the link to the server) over
//!   [`spawn`] (a fresh start of the executable, the start message) over
//!   [`proc`] (a started child: pidfd, exit status, its first frame);
//! - the child's side: [`server`] (the forkserver process) over [`boot`]
//!   (a child starts, runs, reports);
//! - under both: [`protocol`] (every message, its tag and layout) and this
//!   file (the process's identity, authkey, start method).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

mod boot;
mod forkserver;
mod proc;
mod protocol;
#[cfg(feature = "mpi")]
pub(crate) mod ranks;
mod server;
mod spawn;
mod start;

pub(crate) use boot::main_dispatches;
pub use boot::{init, main_init};
pub(crate) use forkserver::{set_preload, start_server_now};
pub(crate) use proc::ChildProc;
pub(crate) use protocol::{Message, Mode, Start};
pub(crate) use start::{next_process_name, read_outcome, start_child_by, start_process_by};

/// The environment variable that marks a process as a multiproc child.
pub(crate) const ENV_VAR: &str = "MULTIPROC_CHILD";

/// The dynamic loader's variable that resolves every symbol at start
/// instead of at first call, and the value the program gives it in the
/// forkserver's environment when the program does not set it itself: the
/// server then resolves each library's symbols once, so that its children
/// (which start from its memory) do not each resolve, and copy-on-write,
/// the ones their exit calls (libgcc_s's destructor among them: a dozen
/// page faults per child, measured). The server removes the variable at
/// load when it holds this value, so its children never see it.
pub(crate) const BIND_NOW_VAR: &str = "LD_BIND_NOW";
pub(crate) const BIND_NOW_MARK: &str = "multiproc-forkserver";

/// The descriptor number at which a child finds its socket to the parent.
pub(crate) const CHILD_FD: RawFd = 3;

/// Who this process is, as `current_process()` reports it.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) name: String,
    pub(crate) parent: Option<(String, u32)>,
}

/// Set in a child by its start; a child forked by the forkserver
/// replaces the server's (so it is not a `OnceLock`). Each value is
/// leaked: at most two per process. The lock is never held across a fork
/// (the server is single-threaded).
static IDENTITY: std::sync::Mutex<Option<&'static Identity>> = std::sync::Mutex::new(None);

/// This process's authentication key (`None` until first asked for or
/// received from the parent).
static AUTHKEY: Mutex<Option<Arc<[u8]>>> = Mutex::new(None);

/// Bytes of a key made at random.
pub(crate) const AUTHKEY_BYTES: usize = 32;

/// This process's authentication key: the one the parent sent (a child),
/// the one set last, or else 32 random bytes made now and kept (the main
/// process), as CPython's `current_process().authkey`.
pub(crate) fn authkey() -> Result<Arc<[u8]>> {
    let mut key = AUTHKEY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(key) = &*key {
        return Ok(Arc::clone(key));
    }
    let mut fresh = [0u8; AUTHKEY_BYTES];
    crate::sys::random_bytes(&mut fresh)
        .map_err(|e| Error::io("could not make a random authentication key", e))?;
    let fresh: Arc<[u8]> = Arc::from(&fresh[..]);
    *key = Some(Arc::clone(&fresh));
    Ok(fresh)
}

/// Replaces this process's authentication key; children started from now
/// on inherit the new one.
pub(crate) fn set_authkey(new: Arc<[u8]>) {
    *AUTHKEY.lock().unwrap_or_else(|e| e.into_inner()) = Some(new);
}

/// The child initializer every child started from here runs first (a
/// registered name and its encoded arguments); a child inherits its
/// parent's, so that its own children run it too.
static CHILD_INIT: std::sync::Mutex<Option<(String, Vec<u8>)>> = std::sync::Mutex::new(None);

/// In a child of the forkserver: the server's pid (its OS parent); 0
/// otherwise.
static FORKED_BY: AtomicU32 = AtomicU32::new(0);

/// The forkserver's pid in a child it forked (0 in any other process).
pub(crate) fn forkserver_pid() -> u32 {
    FORKED_BY.load(Ordering::Relaxed)
}

/// Sets (or, with `None`, clears) the child initializer.
pub(crate) fn set_child_init(init: Option<(String, Vec<u8>)>) {
    *CHILD_INIT.lock().unwrap_or_else(|p| p.into_inner()) = init;
}

/// The child initializer, for a start message.
pub(crate) fn child_init() -> Option<(String, Vec<u8>)> {
    CHILD_INIT.lock().unwrap_or_else(|p| p.into_inner()).clone()
}
static READY: AtomicBool = AtomicBool::new(false);

/// The thread that runs a load-time child's function: it lives as long
/// as the process (it ends it), like a main thread.
static MAIN_THREAD: AtomicU32 = AtomicU32::new(0);

pub(crate) fn identity() -> &'static Identity {
    let mut now = IDENTITY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    now.get_or_insert_with(|| {
        Box::leak(Box::new(Identity {
            name: "MainProcess".to_string(),
            parent: None,
        }))
    })
}

/// Sets this process's identity (a child's start).
fn set_identity(identity: Identity) {
    *IDENTITY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::leak(Box::new(identity)));
}

/// How a child process starts: Python's start methods.
///
/// `Spawn` (the default) starts the executable again from
/// `/proc/self/exe`; `ForkServer` asks a small single-threaded server
/// process, started once from `/proc/self/exe`, to fork the child, which
/// is several times faster. Both run the same registered functions with
/// the same semantics; see the README's "Start methods". There is no
/// `fork`: forking a multithreaded Rust program is unsound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartMethod {
    /// A fresh start of the executable (CPython's `spawn`).
    Spawn,
    /// A fork of the forkserver (CPython's `forkserver`).
    ForkServer,
}

impl StartMethod {
    /// CPython's name for it: `"spawn"` or `"forkserver"`.
    pub fn as_str(self) -> &'static str {
        match self {
            StartMethod::Spawn => "spawn",
            StartMethod::ForkServer => "forkserver",
        }
    }
}

impl std::fmt::Display for StartMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StartMethod {
    type Err = Error;

    fn from_str(s: &str) -> Result<StartMethod> {
        match s {
            "spawn" => Ok(StartMethod::Spawn),
            "forkserver" => Ok(StartMethod::ForkServer),
            other => Err(Error::misuse(format!(
                "unknown start method `{other}`; expected `spawn` or `forkserver`"
            ))),
        }
    }
}

/// The program's default start method: 0 not set (spawn), 1 spawn, 2 forkserver.
static DEFAULT_METHOD: AtomicU8 = AtomicU8::new(0);

/// Sets the default start method once; a second call with another method
/// is refused.
pub(crate) fn set_default_method(method: StartMethod, force: bool) -> Result<()> {
    let code = match method {
        StartMethod::Spawn => 1,
        StartMethod::ForkServer => 2,
    };
    if force {
        DEFAULT_METHOD.store(code, Ordering::SeqCst);
        return Ok(());
    }
    match DEFAULT_METHOD.compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => Ok(()),
        Err(now) if now == code => Ok(()),
        Err(_) => Err(Error::misuse(format!(
            "the start method was already set to `{}`",
            default_method()
        ))),
    }
}

/// The start method used when none is given.
pub(crate) fn default_method() -> StartMethod {
    match DEFAULT_METHOD.load(Ordering::SeqCst) {
        2 => StartMethod::ForkServer,
        _ => StartMethod::Spawn,
    }
}

/// `true` on a thread that lives as long as this process (so a child's
/// death signal, which follows the thread that started it, is safe to
/// arm): the main thread, or the thread a load-time child runs on.
pub(crate) fn on_long_lived_thread() -> bool {
    crate::sys::is_main_thread()
        || MAIN_THREAD.load(Ordering::Relaxed) == nix::unistd::gettid().as_raw() as u32
}

pub(crate) fn ensure_ready() -> Result<()> {
    if READY.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(Error::misuse(
            "multiproc is not initialized in this program: call multiproc::init() as the first \
             line of main (or use #[multiproc::main])",
        ))
    }
}

/// The executable this process runs: device, inode, size and modification
/// time of `/proc/self/exe`, hashed. A parent and its child compare it to
/// tell a rebuilt executable from a missing registration.
pub(crate) fn exe_identity() -> u64 {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    static ID: OnceLock<u64> = OnceLock::new();
    *ID.get_or_init(|| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        if let Ok(meta) = std::fs::metadata("/proc/self/exe") {
            (
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
            )
                .hash(&mut hasher);
        }
        hasher.finish()
    })
}
