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
//! load-time hook in this crate sees that it is a child, runs the load-time
//! constructors that have not run yet (so every registration is in place,
//! whatever order the linker gave them), looks the name up, decodes the
//! arguments, runs the function on a thread named `main` and exits. So the
//! user's `main` (or the test harness) never runs in a child, and plain
//! `#[test]` functions can start processes, in every build profile (LTO,
//! `codegen-units = 1`, `panic = "abort"`). [`init`] and
//! `#[multiproc::main]` remain as the explicit, documented way in.
//!
//! A child inherits the parent's arguments, environment, working directory,
//! stdout and stderr; its stdin is `/dev/null`, as in CPython's spawned
//! children.
//!
//! # Pools
//!
//! [`Pool`] keeps long-lived worker processes and runs a registered
//! function over many inputs: `map`, `imap`, `starmap`, `apply_async`...
//! A panic fails only its item; a worker that dies fails only the chunks
//! it was running, with its pid and signal, and is replaced. See
//! [`pool`] for how work travels. An [`AsyncResult`](pool::AsyncResult)
//! takes callbacks (run on the pool's callback thread) and is a
//! `concurrent.futures` future ([`pool::wait`], [`pool::as_completed`]).
//!
//! # Features
//!
//! `async` (off by default): [`AsyncResult`](pool::AsyncResult) is a
//! [`Future`] and [`Imap`](pool::Imap) a
//! `futures_core::Stream`, so pool results can be `.await`ed from any
//! async runtime. It adds only `futures-core` (the trait), no runtime.
//!
//! # Panics
//!
//! A panic in a child is caught there; [`spawn`]'s `join` returns
//! [`Error::Panicked`] with the message and location, and a
//! [`Process`] exits with code 1 (Python's numbers). Under
//! `panic = "abort"` the same holds: the panic hook reports before the
//! process ends. A pool task's panic fails that item alone.
//!
//! # Serialization limits
//!
//! Arguments and results travel with serde (bincode inside): they must be
//! `Serialize + DeserializeOwned + 'static`. Handles (queues, connections,
//! locks, shared values) travel too, their descriptors beside the bytes.
//! Closures cannot travel: pass a `#[process_fn]`.
//!
//! # Errors
//!
//! Most operations return [`Result<T>`](Result), whose [`Error`] names what
//! happened in words a user can act on (a child's panic message, a dead
//! worker's pid and signal, a function that is not registered). Receiving
//! and putting have crossbeam-channel's per-operation errors instead:
//! [`Queue`]'s `put` family hands the item back
//! ([`PutError`](queue::PutError), [`TryPutError`](queue::TryPutError)...),
//! its `get` family and a [`Connection`](connection::Connection)'s `recv`
//! family say `Disconnected`, `Empty` or `Timeout`, or carry the [`Error`]
//! of a message that could not be received
//! ([`GetTimeoutError`](queue::GetTimeoutError),
//! [`RecvTimeoutError`](connection::RecvTimeoutError)...). Each has
//! predicates (`is_timeout()`, `is_disconnected()`...) and converts into
//! [`Error`], so `?` works in a function returning [`Result`]: a full queue
//! becomes [`Error::Full`], nothing to receive [`Error::Empty`], a busy
//! lock [`Error::WouldBlock`], a wait that ran out [`Error::Timeout`].
//!
//! # What dropping a handle does
//!
//! | handle | when dropped |
//! |---|---|
//! | [`Process`], not started | nothing |
//! | [`Process`], started | nothing stops: as in Python, the child runs on; the end of `main` (of `#[multiproc::main]`, or the program's exit without it) joins it, or sends SIGTERM and reaps it if daemonic |
//! | [`JoinHandle`] (from [`spawn`]) | the child is killed (SIGKILL) and reaped; its result is lost (call `join` to keep it; `join_timeout` keeps the handle) |
//! | [`Pool`] | workers get SIGTERM, then SIGKILL after 500 ms, and are reaped; work not yet collected is lost (`close` then `join` let it finish) |
//! | [`PoolBuilder`](pool::PoolBuilder), [`ProcessBuilder`](process::ProcessBuilder) | nothing (`#[must_use]`) |
//! | [`AsyncResult`](pool::AsyncResult), [`Imap`](pool::Imap) | the result is not wanted: queued chunks are dropped, late results discarded; the pool serves on. An `AsyncResult` with callbacks runs on instead, and its callbacks get the outcome |
//! | [`Connection`](connection::Connection), [`Receiver`](connection::Receiver), [`Sender`](connection::Sender) | this copy of the end closes; once every copy (in every process) is closed, the peer's `recv` is `Disconnected` and its `send` fails |
//! | [`Listener`](connection::Listener) | it stops listening; a Unix socket file it created is removed. Connections it accepted live on |
//! | [`Queue`], [`SimpleQueue`](queue::SimpleQueue), [`JoinableQueue`](queue::JoinableQueue) | this handle goes; the queue and its messages live while any process holds a handle. Dropping is not [`close`](Queue::close): the other processes' `iter` does not end |
//! | [`Lock`], [`RLock`](sync::RLock), [`Semaphore`](sync::Semaphore), [`Event`](sync::Event), [`Condition`](sync::Condition), [`Barrier`](sync::Barrier), [`Value`], [`Array`], the `Raw` forms | this handle goes; the object lives while any process holds a handle. Units taken from a semaphore are not given back |
//! | a guard: [`LockGuard`](sync::LockGuard), [`RLockGuard`](sync::RLockGuard) (the outermost), [`ConditionGuard`](sync::ConditionGuard), a `Value`/`Array` guard | the lock is released (a `Value` guard writes its copy back first); if the thread is panicking, the lock is poisoned first |
//! | [`SharedMemory`](shared::SharedMemory) | this mapping goes; the name stays until `unlink` or until its creator exits, the memory until the last mapping goes |
//! | [`iter`](Queue::iter) and the other iterators | nothing: messages not yet taken stay in the queue or the pipe |
//!
//! A process that ends (or is killed) drops all of its handles at once,
//! with the same effects; a lock it held is taken over by the next waiter,
//! with [`PoisonError`](std::sync::PoisonError).
//!
//! # Logging, and set-up in every child
//!
//! The runtime reports what it handles on its own (a pool worker that died
//! and its replacement, a replacement the OS refused, a broken pool, a
//! child that refused to start) through the [`log`](https://docs.rs/log)
//! facade, under targets starting with `multiproc`: nothing is printed
//! unless the program installs a logger. A child does not inherit the
//! parent's logger (nor any other per-process state): register a function
//! that sets it up with [`set_child_initializer`], and every child
//! (`Process`, `spawn`, pool workers, and their own children) runs it
//! before its target, as a `Pool`'s initializer does for its workers.
//!
//! # Testing
//!
//! Everything works under `cargo test`, in unit tests and integration
//! tests, with `#[test]` or `#[multiproc::test]`.
//!
//! # Platforms
//!
//! Linux (glibc; musl builds, but a child sees no `std::env::args()` there),
//! kernel 5.3 or newer (pidfd). Building for another OS stops with one
//! `compile_error!` that says so.
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "multiproc runs on Linux only (kernel 5.3 or newer: it needs pidfd, memfd, futex and \
     SCM_RIGHTS); this target is not Linux"
);

// Lets macro output (`::multiproc::...`) work inside this crate's tests.
#[cfg(target_os = "linux")]
#[allow(unused_extern_crates)]
extern crate self as multiproc;

// Every item below is Linux-only, so that on another target the
// `compile_error!` above is the one error a build reports. (Plain `cfg`
// attributes rather than a wrapping macro: rustfmt follows them.)
#[cfg(target_os = "linux")]
mod child;
#[cfg(target_os = "linux")]
mod codec;
#[cfg(target_os = "linux")]
pub mod connection;
#[cfg(target_os = "linux")]
pub mod context;
#[cfg(target_os = "linux")]
pub mod error;
#[cfg(target_os = "linux")]
mod handle;
#[cfg(target_os = "linux")]
pub mod pool;
#[cfg(target_os = "linux")]
pub mod process;
#[cfg(target_os = "linux")]
pub mod queue;
#[cfg(target_os = "linux")]
pub mod registry;
#[cfg(target_os = "linux")]
pub mod shared;
#[cfg(target_os = "linux")]
mod spin;
#[cfg(target_os = "linux")]
pub mod sync;
#[cfg(target_os = "linux")]
mod sys;
#[cfg(target_os = "linux")]
mod task;
#[cfg(target_os = "linux")]
mod wire;

#[cfg(target_os = "linux")]
pub use child::init;
#[cfg(target_os = "linux")]
pub use connection::{Pipe, Waitable, wait};
#[cfg(target_os = "linux")]
pub use context::{
    Context, StartMethod, force_start_method, get_all_start_methods, get_context, get_start_method,
    set_forkserver_preload, set_start_method, start_forkserver,
};
#[cfg(target_os = "linux")]
pub use error::{Error, Result};
#[cfg(target_os = "linux")]
pub use multiproc_macros::{ProcessTask, main, process_fn, test};
#[cfg(target_os = "linux")]
pub use pool::Pool;
#[cfg(target_os = "linux")]
pub use process::{
    ExitStatus, JoinHandle, Process, ProcessFn, clear_child_initializer, set_child_initializer,
    spawn,
};
#[cfg(target_os = "linux")]
pub use queue::Queue;
#[cfg(target_os = "linux")]
pub use shared::{Array, Value};
#[cfg(target_os = "linux")]
pub use sync::Lock;
#[cfg(target_os = "linux")]
pub use task::ProcessTask;

#[cfg(target_os = "linux")]
/// What the macros expand to. Not public API: no stability guarantees.
#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;
