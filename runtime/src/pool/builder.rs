//! [`PoolBuilder`]: the size, the initializer and the task limit of a pool.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::Pool;
use super::engine::{Config, Core};
use super::protocol;
use crate::error::{Error, Result};
use crate::process::{ProcessFn, Target};

/// Builds a [`Pool`]: `Pool::builder().processes(4).initializer(f, args).max_tasks_per_child(100).build()`.
#[derive(Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct PoolBuilder {
    pub(super) processes: Option<usize>,
    pub(super) initializer: Option<Result<Target>>,
    pub(super) max_tasks_per_child: Option<usize>,
    pub(super) start_method: Option<crate::StartMethod>,
}

impl PoolBuilder {
    /// The number of worker processes (default: [`cpu_count`](crate::process::cpu_count)).
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = Some(n);
        self
    }

    /// Runs the registered function `f` with `args` in each worker when it
    /// starts (and in each replacement), before it takes any task: Python's
    /// `initializer` and `initargs`.
    pub fn initializer<F, A>(mut self, f: F, args: A) -> Self
    where
        F: ProcessFn<A>,
        A: Serialize + 'static,
    {
        self.initializer = Some(Target::of_fn(&f, &args));
        self
    }

    /// How the workers (and their replacements) start (default: the
    /// program's, [`get_start_method`](crate::get_start_method)).
    pub fn start_method(mut self, method: crate::StartMethod) -> Self {
        self.start_method = Some(method);
        self
    }

    /// A worker exits after running `k` tasks and is replaced by a fresh
    /// one (Python's `maxtasksperchild`). As in Python, a task is one
    /// chunk: pass a chunksize of 1 (`map_chunked`) to count items.
    pub fn max_tasks_per_child(mut self, k: usize) -> Self {
        self.max_tasks_per_child = Some(k);
        self
    }

    /// Starts the workers. With an initializer, waits until every worker
    /// has run it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for 0 processes or `max_tasks_per_child(0)`;
    /// [`Error::NotRegistered`] if the initializer is not a `#[process_fn]`;
    /// [`Error::InitializerFailed`] with the panic's message if the
    /// initializer panicked in a worker; [`Error::Io`] if the OS refuses a
    /// new process.
    pub fn build(self) -> Result<Pool> {
        let processes = self.processes.unwrap_or_else(crate::process::cpu_count);
        if processes == 0 {
            return Err(Error::invalid("a pool needs at least one process"));
        }
        if self.max_tasks_per_child == Some(0) {
            return Err(Error::invalid("max_tasks_per_child must be at least 1"));
        }
        let (initializer, init_fds) = match self.initializer.transpose()? {
            Some(target) => (
                Some((target.entry.name().to_string(), target.args)),
                target.fds,
            ),
            None => (None, Vec::new()),
        };
        let has_initializer = initializer.is_some();
        let config = Config {
            processes,
            init: protocol::WorkerInit {
                initializer,
                max_tasks: self.max_tasks_per_child.map(|k| k as u64),
            },
            init_fds,
            start_method: self.start_method.unwrap_or_else(crate::get_start_method),
        };
        let (core, waker) = Core::new(config)?;
        let reader = {
            let core = Arc::clone(&core);
            std::thread::Builder::new()
                .name("multiproc-pool".into())
                .spawn(move || core.read_loop(waker))
                .map_err(|e| Error::io("could not start the pool's thread", e))?
        };
        let pool = Pool {
            core,
            reader: Mutex::new(Some(reader)),
            callbacks: Arc::default(),
        };
        for _ in 0..processes {
            pool.core.start_worker()?;
        }
        if has_initializer {
            pool.core.wait_ready()?;
        }
        Ok(pool)
    }
}
