//! The `forkserver` start method: children forked by a small server
//! process instead of started afresh, several times faster, with the same
//! API. A preload warms state once in the server; every child has it.
use std::sync::OnceLock;

use multiproc::{Pool, StartMethod, process_fn};

static TABLE: OnceLock<Vec<u64>> = OnceLock::new();

/// Runs once, in the server, before it forks anything.
#[process_fn]
fn warm() {
    TABLE.get_or_init(|| (0..1000).map(|i| i * i).collect());
}

#[process_fn]
fn lookup(i: usize) -> u64 {
    // Forked children find the table the preload built.
    TABLE.get().map_or(0, |t| t[i])
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    multiproc::set_start_method(StartMethod::ForkServer)?;
    multiproc::set_forkserver_preload(warm)?;
    println!("start methods: {:?}", multiproc::get_all_start_methods());

    let square = multiproc::spawn(lookup, (12,))?.join()?;
    println!("12 squared, from the preloaded table: {square}");

    let pool = Pool::new(2)?; // workers forked by the server too
    println!("{:?}", pool.map(lookup, [3, 4, 5])?);
    Ok(())
}
