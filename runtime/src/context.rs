//! Start methods, chosen as CPython chooses them: a program-wide default
//! ([`set_start_method`], [`get_start_method`], [`get_all_start_methods`])
//! and context objects ([`get_context`]) whose processes and pools use a
//! given method, plus the forkserver's controls ([`start_forkserver`],
//! [`set_forkserver_preload`]).
//!
//! ```no_run
//! use multiproc::{process_fn, StartMethod};
//!
//! #[process_fn]
//! fn work(x: u64) -> u64 {
//!     x + 1
//! }
//!
//! # fn main() -> multiproc::Result<()> {
//! let ctx = multiproc::get_context(StartMethod::ForkServer);
//! let handle = ctx.spawn(work, (41,))?;
//! assert_eq!(handle.join()?, 42);
//! # Ok(())
//! # }
//! ```

use serde::Serialize;

use crate::child;
pub use crate::child::StartMethod;
use crate::error::Result;
use crate::pool::{Pool, PoolBuilder};
use crate::process::{JoinHandle, Process, ProcessBuilder, ProcessFn, Target};

/// Sets the program's default start method (CPython's
/// `set_start_method`): the method of every `Process`, `spawn` and `Pool`
/// that does not name one. Call it once, early in `main`.
///
/// # Errors
///
/// [`Error::Misuse`](crate::Error::Misuse) if another method was already
/// set (CPython's "context has already been set"); use
/// [`force_start_method`] to change it anyway.
pub fn set_start_method(method: StartMethod) -> Result<()> {
    child::set_default_method(method, false)
}

/// Sets the default start method even if one was set (CPython's
/// `set_start_method(method, force=True)`).
pub fn force_start_method(method: StartMethod) {
    let _ = child::set_default_method(method, true);
}

/// The program's default start method: [`StartMethod::Spawn`] unless
/// [`set_start_method`] chose another.
pub fn get_start_method() -> StartMethod {
    child::default_method()
}

/// Every start method this platform offers, the default first. There is
/// no `fork`: forking a multithreaded Rust program is unsound, and the
/// forkserver gives fork's speed without it.
pub fn get_all_start_methods() -> &'static [StartMethod] {
    &[StartMethod::Spawn, StartMethod::ForkServer]
}

/// A context whose processes and pools use `method` (CPython's
/// `get_context`).
pub fn get_context(method: StartMethod) -> Context {
    Context { method }
}

/// Starts the forkserver now, if it is not running, instead of at the
/// first start that needs it: its start-up (an exec, the preload) is then
/// not part of any process's start.
///
/// # Errors
///
/// [`Error::Io`](crate::Error::Io) if the server cannot be started; the
/// preload's error if it failed in the server ([`Error::Panicked`](crate::Error::Panicked)
/// for a panic); [`Error::Misuse`](crate::Error::Misuse) if the server is
/// not single-threaded (a load-time constructor or the preload started a
/// thread).
pub fn start_forkserver() -> Result<()> {
    child::start_server_now()
}

/// Runs the registered function `f` (no arguments) in the forkserver
/// before it forks anything, so that every forked child starts with what
/// it prepared (CPython's `set_forkserver_preload`, which imports modules
/// there). Applies to servers started from now on; the function must not
/// start threads (the server refuses to fork if one runs).
///
/// # Errors
///
/// [`Error::NotRegistered`](crate::Error::NotRegistered) if `f` is not a
/// `#[process_fn]`.
pub fn set_forkserver_preload<F: ProcessFn<()>>(f: F) -> Result<()> {
    let target = Target::of_fn(&f, &())?;
    child::set_preload(vec![(target.entry.name().to_string(), target.args)]);
    Ok(())
}

/// Processes and pools that start by one method: CPython's context
/// objects (`multiprocessing.get_context("forkserver")`). Handles that
/// do not start processes are the same under every method: the context
/// makes a [`Queue`](Context::queue) and a [`Lock`](Context::lock) as
/// CPython's does (`ctx.Queue()`), the others come from their own `new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    method: StartMethod,
}

impl Context {
    /// This context's start method.
    pub fn start_method(&self) -> StartMethod {
        self.method
    }

    /// [`Process::new`], started by this context's method.
    #[must_use = "a Process does nothing until start() is called"]
    pub fn process<F, A>(&self, f: F, args: A) -> Process
    where
        F: ProcessFn<A>,
        A: Serialize,
    {
        self.process_builder().target(f, args).build()
    }

    /// [`Process::builder`], with this context's method.
    pub fn process_builder(&self) -> ProcessBuilder {
        Process::builder().start_method(self.method)
    }

    /// [`spawn`](crate::spawn), by this context's method.
    ///
    /// # Errors
    ///
    /// As [`spawn`](crate::spawn).
    pub fn spawn<F, A>(&self, f: F, args: A) -> Result<JoinHandle<F::Output>>
    where
        F: ProcessFn<A>,
        A: Serialize,
    {
        crate::process::spawn_by(Some(self.method), f, args)
    }

    /// [`Pool::new`], its workers started by this context's method.
    ///
    /// # Errors
    ///
    /// As [`Pool::new`].
    pub fn pool(&self, processes: usize) -> Result<Pool> {
        self.pool_builder().processes(processes).build()
    }

    /// [`Pool::builder`], with this context's method.
    pub fn pool_builder(&self) -> PoolBuilder {
        Pool::builder().start_method(self.method)
    }

    /// [`Queue::new`](crate::Queue::new) (CPython's `ctx.Queue()`): a
    /// queue is the same under every start method.
    ///
    /// # Errors
    ///
    /// As [`Queue::new`](crate::Queue::new).
    pub fn queue<T>(&self) -> Result<crate::Queue<T>> {
        crate::Queue::new()
    }

    /// [`Lock::new`](crate::Lock::new) (CPython's `ctx.Lock()`).
    ///
    /// # Errors
    ///
    /// As [`Lock::new`](crate::Lock::new).
    pub fn lock(&self) -> Result<crate::Lock> {
        crate::Lock::new()
    }
}
