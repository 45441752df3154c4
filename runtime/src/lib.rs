//! Python's `multiprocessing`, done right, for Rust.
//!
//! Real OS processes, each with its own memory, driven by an API that a
//! Python programmer recognises at once (`Pool`, `Process`, `Queue`,
//! `Pipe`, `Lock`, `Value`, `Array`) with signatures shaped like std's.
//!
//! ```no_run
//! use multiproc::{process_fn, Process};
//!
//! #[process_fn]
//! fn greet(name: String) {
//!     println!("l am a {name}");
//! }
//!
//! #[multiproc::main]
//! fn main() -> multiproc::Result<()> {
//!     let mut p = Process::new(greet, ("snake".to_string(),));
//!     p.start()?;
//!     p.join()?;
//!     Ok(())
//! }
//! ```
//!
//! # How a child runs your function
//!
//! `#[process_fn]` registers a function by name (`module::path::name`) at
//! compile time; `#[derive(ProcessTask)]` does the same for a type whose
//! [`ProcessTask::run`] you implement. A child process is this same
//! executable, started again from `/proc/self/exe`: before `main` runs, a
//! load-time constructor in this crate sees that it is a child, looks the
//! name up, decodes the arguments, runs the function and exits. So the
//! user's `main` (or the test harness) never runs in a child, and plain
//! `#[test]` functions can start processes. [`init`] and
//! `#[multiproc::main]` remain as the explicit, documented way in.
//!
//! # Pools
//!
//! [`Pool`] keeps long-lived worker processes and runs a registered
//! function over many inputs: `map`, `imap`, `starmap`, `apply_async`...
//! A panic fails only its item; a worker that dies fails only the chunks
//! it was running, with its pid and signal, and is replaced. See
//! [`pool`] for how work travels.
//!
//! # Panics
//!
//! A panic in a child is caught there; [`spawn`]'s `join` returns
//! [`Error::Panicked`] with the message and location, and a
//! [`Process`] exits with code 1 (Python's numbers).
//!
//! # Serialization limits
//!
//! Arguments and results travel with serde (bincode inside): they must be
//! `Serialize + DeserializeOwned + 'static`. Handles (queues, connections,
//! locks, shared values) travel too, their descriptors beside the bytes.
//! Closures cannot travel: pass a `#[process_fn]`.
//!
//! # Testing
//!
//! Everything works under `cargo test`, in unit tests and integration
//! tests, with `#[test]` or `#[multiproc::test]`.
//!
//! # Platforms
//!
//! Linux (glibc or musl), kernel 5.3 or newer (pidfd).
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

#[allow(unused_extern_crates)] // lets macro output (`::multiproc::...`) work inside this crate's tests
extern crate self as multiproc;

mod child;
mod codec;
pub mod error;
pub mod pool;
pub mod process;
pub mod registry;
mod sys;
mod wire;

pub use child::init;
pub use error::{Error, Result};
pub use pool::Pool;
pub use multiproc_macros::{ProcessTask, main, process_fn, test};
pub use process::{ExitStatus, JoinHandle, Process, ProcessFn, spawn};

/// A type whose [`run`](ProcessTask::run) runs in a child process, like a
/// Python class that overrides `Process.run`. Start it with
/// [`Process::from_task`].
///
/// Add `#[derive(ProcessTask)]` (which registers the type) and implement
/// this trait by hand:
///
/// ```no_run
/// use multiproc::{Process, ProcessTask};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, ProcessTask)]
/// struct Greeter {
///     name: String,
/// }
///
/// impl ProcessTask for Greeter {
///     fn run(self) {
///         println!("l am a {}", self.name);
///     }
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let mut p = Process::from_task(Greeter { name: "tom".into() });
/// p.start()?;
/// p.join()?;
/// # Ok(())
/// # }
/// ```
pub trait ProcessTask: __private::RegisteredTask + serde::Serialize + serde::de::DeserializeOwned + 'static {
    /// The work, run in the child.
    fn run(self);

    /// The process name to use; `None` gives Python's `Process-N`.
    fn name(&self) -> Option<String> {
        None
    }
}

/// What the macros expand to. Not public API: no stability guarantees.
#[doc(hidden)]
pub mod __private {
    pub use inventory;
    pub use serde;

    pub use crate::child::init;
    pub use crate::process::MainGuard;
    pub use crate::registry::{Call, Entry, type_id_of};

    /// Fails to compile unless `T` can travel as an argument.
    pub fn assert_arg<T: serde::Serialize + serde::de::DeserializeOwned + 'static>() {}

    /// Fails to compile unless `T` can travel as a result.
    pub fn assert_ret<T: serde::Serialize + serde::de::DeserializeOwned + 'static>() {}

    /// Implemented by `#[derive(ProcessTask)]`: the type is registered.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` is not registered as a process task",
        label = "add `#[derive(ProcessTask)]` to `{Self}`",
        note = "`ProcessTask` needs `#[derive(ProcessTask)]` on the type, which registers it so a child process can run it"
    )]
    pub trait RegisteredTask {
        /// The registered name.
        const NAME: &'static str;
    }
}
