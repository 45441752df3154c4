//! One program, one machine or many: `cargo run --example mpi_pool` runs
//! the pool on local worker processes; built with `--features mpi` and
//! started by `mpirun -n 3 target/debug/examples/mpi_pool`, the same
//! pool runs on MPI ranks 1 and 2 while rank 0 runs `main`.
use multiproc::{Pool, process_fn};

#[process_fn]
fn cube(x: u64) -> u64 {
    x * x * x
}

/// Where a task ran.
#[process_fn]
fn pid_of(_item: u32) -> u32 {
    std::process::id()
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let pool = Pool::builder().mpi().build()?;
    let cubes = pool.map(cube, 0..100_000)?;
    assert_eq!(cubes[21], 9261);
    let sum = cubes.iter().fold(0u64, |a, c| a.wrapping_add(*c));
    println!("sum of 100000 cubes (mod 2^64): {sum}");
    let mut pids = pool.map_chunked(pid_of, 0..16, 1)?;
    pids.sort_unstable();
    pids.dedup();
    println!(
        "{} workers, tasks ran in {} processes other than main's ({})",
        pool.processes(),
        pids.len(),
        std::process::id()
    );
    Ok(())
}
