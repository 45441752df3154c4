//! How a child process starts: the protocol between a parent and a child
//! it started, the child's side ([`boot`]) and the parent's ([`start`]).
//!
//! A child is this same executable, started again from `/proc/self/exe`
//! with the parent's arguments, `/dev/null` as standard input, one
//! inherited Unix socket at descriptor [`CHILD_FD`] and the variable
//! [`ENV_VAR`] (`fd:parent_pid:deathsig`) in its environment. Before
//! `main`, the child's load-time hook runs the load-time constructors that
//! come after it (so every registration is in place whatever the link
//! order), reads the start message, checks that it runs the parent's
//! executable, looks the registered name up, runs the function on a thread
//! named `main`, sends back the outcome and exits. The user's `main` (or
//! the test harness) never runs in a child.
//!
//! The start protocol, over the socket (frames of [`crate::wire`]):
//! - parent → child, [`TAG_START`]: `u32` length, a [`Start`] header, then
//!   the encoded arguments; their descriptors ride with the frame;
//! - child → parent, one of [`TAG_RETURNED`] (the encoded return value and
//!   its descriptors, `spawn` only), [`TAG_PANICKED`] (a panic record,
//!   `spawn` only), [`TAG_FAILED`] (an encoded [`Error`]: the child could
//!   not run what was asked). A runtime-internal entry (the pool worker)
//!   speaks its own protocol on the socket after the start.
//!
//! The child dies with its parent: `PR_SET_PDEATHSIG(SIGKILL)` when it was
//! started from a thread that lives as long as the parent process,
//! otherwise a watcher thread that sees the parent's end of the socket
//! close.

use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::registry::Fingerprint;

mod boot;
mod start;

pub use boot::init;
pub(crate) use start::{ChildProc, next_process_name, read_outcome, refusal, start_child};

/// The environment variable that marks a process as a multiproc child.
pub(crate) const ENV_VAR: &str = "MULTIPROC_CHILD";

/// The descriptor number at which a child finds its socket to the parent.
pub(crate) const CHILD_FD: RawFd = 3;

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

/// The header of the start message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Start {
    /// The parent's [`exe_identity`]: the child must run the same file.
    pub(crate) exe: u64,
    /// The parent's registrations, for the diagnosis of a missing name.
    pub(crate) registry: Fingerprint,
    /// The registered name to run.
    pub(crate) name: String,
    pub(crate) process_name: String,
    pub(crate) parent_name: String,
    pub(crate) parent_pid: u32,
    pub(crate) mode: Mode,
}

/// Who this process is, as `current_process()` reports it.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) name: String,
    pub(crate) parent: Option<(String, u32)>,
}

static IDENTITY: OnceLock<Identity> = OnceLock::new();
static READY: AtomicBool = AtomicBool::new(false);

/// The thread that runs a load-time child's function: it lives as long
/// as the process (it ends it), like a main thread.
static MAIN_THREAD: AtomicU32 = AtomicU32::new(0);

pub(crate) fn identity() -> &'static Identity {
    IDENTITY.get_or_init(|| Identity {
        name: "MainProcess".to_string(),
        parent: None,
    })
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
