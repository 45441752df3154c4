//! A process started by an MPI launcher (`mpirun`, `mpiexec`, `srun`...):
//! rank 0 runs `main`, the other ranks never do, they serve the pool's
//! tasks (feature `mpi`).
//!
//! Launchers tell each process its rank in the environment
//! (`OMPI_COMM_WORLD_RANK` for OpenMPI, `PMIX_RANK` for PMIx launchers,
//! Slurm's included, `PMI_RANK` for MPICH's Hydra and PMI-1/2). When one
//! of them is set, the load-time hook (after it ruled out a multiproc
//! child, whose claim comes first) initializes MPI on every rank, with
//! `MPI_THREAD_MULTIPLE` asked for (the transport itself needs only
//! `MPI_THREAD_SERIALIZED`: one thread of rank 0's makes its calls; with
//! `MULTIPLE` the program's own MPI calls, on tags other than the pool's,
//! may run beside it), and learns, through two collectives
//! every rank takes part in, how many ranks share each host and each
//! rank's pid and number of local workers. Then:
//!
//! - rank 0 returns to the loader and runs `main`; an exit handler tells
//!   the serving ranks to stop ([`Role::finish`]) and finalizes MPI when
//!   the program exits (`main` returns, panics or calls
//!   `std::process::exit`);
//! - every other rank runs the remaining load-time constructors (every
//!   registration), then the pool's serving loop ([`Role::serve`]) until
//!   rank 0 says it is finishing, finalizes MPI and exits: its `main`
//!   never runs.
//!
//! A program that no launcher started never initializes MPI.

use std::sync::{Mutex, OnceLock};

use mpi::collective::Root;
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::sys::boot::LoadTime;

/// The variables by which launchers tell a process its rank.
const RANK_VARS: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"];

/// Overrides the number of local workers of each serving rank.
pub(crate) const WORKERS_VAR: &str = "MULTIPROC_MPI_WORKERS";

/// A serving rank, as rank 0 knows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RankInfo {
    pub(crate) rank: i32,
    pub(crate) pid: u32,
    /// Processes of its own that it runs tasks in (1: the rank itself).
    pub(crate) workers: u32,
}

/// This process's place in the MPI job.
#[derive(Debug, Clone)]
pub(crate) struct World {
    pub(crate) rank: i32,
    /// The MPI library allows calls from any thread, one at a time
    /// (`MPI_THREAD_SERIALIZED` or more), as the transport's thread needs.
    pub(crate) serialized: bool,
    /// This rank's local workers (see [`RankInfo::workers`]).
    pub(crate) workers: u32,
    /// On rank 0: the serving ranks.
    pub(crate) serving: Vec<RankInfo>,
}

/// What the pool gives this layer: the serving ranks' loop, and what rank
/// 0 does at exit before MPI is finalized.
#[derive(Debug)]
pub(crate) struct Role {
    /// Runs on a serving rank until rank 0 finishes; the exit code.
    pub(crate) serve: fn(&World) -> i32,
    /// Runs on rank 0 at exit, before `MPI_Finalize`.
    pub(crate) finish: fn(),
}

inventory::collect!(Role);

static WORLD: OnceLock<World> = OnceLock::new();
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

/// This process's MPI world, if an MPI launcher started it.
pub(crate) fn world() -> Option<&'static World> {
    WORLD.get()
}

/// An MPI launcher started this process.
fn launched() -> bool {
    RANK_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// Called by the load-time hook of a process that is not a multiproc
/// child. Returns on rank 0 (and when no launcher started this process);
/// a serving rank never returns.
pub(crate) fn on_load(load: LoadTime) {
    if !launched() {
        return;
    }
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
        return;
    };
    let comm = universe.world();
    let (rank, size) = (comm.rank(), comm.size());
    let on_host = comm.split_shared(rank).size().max(1) as usize;
    let workers = local_workers(on_host);
    // Rank 0 learns every rank's pid and number of workers.
    let mine = [std::process::id(), workers];
    let root = comm.process_at_rank(0);
    let mut serving = Vec::new();
    if rank == 0 {
        let mut all = vec![0u32; 2 * size as usize];
        root.gather_into_root(&mine[..], &mut all[..]);
        serving = (1..size)
            .map(|r| RankInfo {
                rank: r,
                pid: all[2 * r as usize],
                workers: all[2 * r as usize + 1].max(1),
            })
            .collect();
    } else {
        root.gather_into(&mine[..]);
    }
    let world = World {
        rank,
        serialized: matches!(threading, Threading::Serialized | Threading::Multiple),
        workers,
        serving,
    };
    *UNIVERSE.lock().unwrap_or_else(|p| p.into_inner()) = Some(universe);
    let world = WORLD.get_or_init(|| world);
    if rank == 0 {
        // Without it, rank 0 would exit without MPI_Finalize and the
        // launcher would end the job as failed.
        let _ = crate::sys::at_exit(finish_at_exit);
        return;
    }
    load.finish_then_exit(move || {
        let Some(role) = inventory::iter::<Role>.into_iter().next() else {
            finalize();
            return 0;
        };
        // The loop catches the tasks' panics; one of its own would finalize
        // nothing and leave rank 0 waiting: the job is aborted instead.
        let code = match crate::registry::catch(|| (role.serve)(world)) {
            Ok(code) => code,
            Err(record) => {
                eprintln!(
                    "multiproc: the serving loop of MPI rank {} panicked: {}; aborting the job",
                    world.rank, record.message
                );
                mpi::topology::Communicator::abort(&SimpleCommunicator::world(), 70)
            }
        };
        if code != 0 {
            // Finalizing would leave rank 0 waiting for answers: the job
            // ends instead, with the reason.
            eprintln!(
                "multiproc: MPI rank {} received a message that is not the pool's protocol; \
                 aborting the job",
                world.rank
            );
            mpi::topology::Communicator::abort(&SimpleCommunicator::world(), code)
        }
        finalize();
        code
    })
}

/// Each serving rank's local workers: [`WORKERS_VAR`] if set, else this
/// host's CPUs shared among the ranks on it (one rank per host uses all
/// its cores; several share them).
fn local_workers(ranks_on_host: usize) -> u32 {
    if let Some(n) = std::env::var(WORKERS_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        return n.max(1);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from((cpus / ranks_on_host).max(1)).unwrap_or(1)
}

/// `MPI_Finalize`, once.
fn finalize() {
    let universe = UNIVERSE.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(universe);
}

extern "C" fn finish_at_exit() {
    // Unwinding out of an atexit handler would abort: contain it.
    let _ = crate::registry::catch(|| {
        for role in inventory::iter::<Role> {
            (role.finish)();
        }
        finalize();
    });
}

/// The world communicator (only once MPI is initialized).
pub(crate) fn comm() -> SimpleCommunicator {
    SimpleCommunicator::world()
}
