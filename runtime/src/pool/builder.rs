//! [`PoolBuilder`]: the size, the initializer and the task limit of a pool.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::Pool;
use super::engine::{Config, Core, Transport};
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
    pub(super) mpi: bool,
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

    /// Uses the serving ranks of the MPI job when this program was
    /// started by an MPI launcher (`mpirun -n 4 ./prog`, `srun -n 4
    /// ./prog`) and is built with the `mpi` feature: rank 0 runs `main`,
    /// every other rank is one worker of this pool (running its chunks in
    /// its own process, or in a local pool of its host's CPUs shared among
    /// the ranks on that host; `MULTIPROC_MPI_WORKERS` sets that number),
    /// and [`processes`](PoolBuilder::processes) is ignored. Otherwise (no
    /// launcher, a job of one rank, or a build without the feature) this
    /// does nothing: the pool is the local one, so the same program runs
    /// unchanged on one machine. Every method gives the same results,
    /// errors and ordering on both.
    ///
    /// Arguments and results must be plain data there: a task whose
    /// arguments carry a handle (`Queue`, `Lock`, `Value`, `Connection`...)
    /// fails with [`Error::Encode`] naming the handle, and is not sent.
    /// See the README's "Outgrowing one machine".
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use multiproc::{process_fn, Pool};
    ///
    /// #[process_fn]
    /// fn cube(x: u64) -> u64 {
    ///     x * x * x
    /// }
    ///
    /// # fn main() -> multiproc::Result<()> {
    /// // The ranks under `mpirun -n 3 ./prog`, local workers otherwise.
    /// let pool = Pool::builder().mpi().build()?;
    /// assert_eq!(pool.map(cube, 0..4)?, vec![0, 1, 8, 27]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn mpi(mut self) -> Self {
        self.mpi = true;
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
        let transport = self.transport();
        let (initializer, init_fds) = match self.initializer.transpose()? {
            Some(target) => (
                Some((target.entry.name().to_string(), target.args)),
                target.fds,
            ),
            None => (None, Vec::new()),
        };
        let has_initializer = initializer.is_some();
        #[cfg(feature = "mpi")]
        let processes = match &transport {
            Transport::Remote(hosts) => {
                if !init_fds.is_empty() {
                    let message = format!(
                        "the initializer's arguments: {}",
                        crate::codec::handles_refusal(crate::codec::Peer::MpiRank)
                    );
                    return Err(Error::Encode { message });
                }
                hosts.places().iter().map(|r| r.workers as usize).sum()
            }
            Transport::Local => processes,
        };
        let workers = match &transport {
            Transport::Local => processes,
            #[cfg(feature = "mpi")]
            Transport::Remote(hosts) => hosts.places().len(),
        };
        let config = Config {
            processes,
            workers,
            init: protocol::WorkerInit {
                initializer,
                max_tasks: self.max_tasks_per_child.map(|k| k as u64),
            },
            init_fds,
            transport,
            start_method: self.start_method.unwrap_or_else(crate::get_start_method),
        };
        let (core, reader) = Core::start(config, workers)?;
        let pool = Pool {
            core,
            reader: Mutex::new(Some(reader)),
            callbacks: Arc::default(),
        };
        if has_initializer {
            pool.core.wait_ready()?;
        }
        Ok(pool)
    }
}

impl PoolBuilder {
    /// Where the workers will be.
    fn transport(&self) -> Transport {
        #[cfg(feature = "mpi")]
        if self.mpi {
            if let Some(ranks) = super::ranks::transport() {
                return ranks;
            }
        }
        Transport::Local
    }
}
