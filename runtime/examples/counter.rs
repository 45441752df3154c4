//! Four processes count to 400 000 in one shared counter, first under the
//! value's lock, then with a lock-free `fetch_add`, and print the timings.
use std::time::Instant;

use multiproc::{Process, ProcessFn, Value, process_fn};

const PROCS: u64 = 4;
const EACH: u64 = 100_000;

#[process_fn]
fn with_lock(counter: Value<u64>) {
    for _ in 0..EACH {
        *counter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
    }
}

#[process_fn]
fn with_fetch_add(counter: Value<u64>) {
    for _ in 0..EACH {
        counter.fetch_add(1);
    }
}

fn run<F: ProcessFn<(Value<u64>,)> + Copy>(f: F, label: &str) -> multiproc::Result<()> {
    let counter = Value::new(0u64)?;
    let mut procs: Vec<Process> = (0..PROCS)
        .map(|_| Process::new(f, (counter.clone(),)))
        .collect();
    let start = Instant::now();
    for p in &mut procs {
        p.start()?;
    }
    for p in &mut procs {
        p.join()?;
    }
    let elapsed = start.elapsed();
    println!(
        "{label:>9}: {} in {elapsed:.2?} (process start included)",
        counter.get()
    );
    Ok(())
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    run(with_lock, "lock")?;
    run(with_fetch_add, "fetch_add")
}
