//! `concurrent.futures.as_completed`: results in the order they finish,
//! and `cancel()` of a task that has not started.
use std::time::Duration;

use multiproc::pool::as_completed;
use multiproc::{Pool, process_fn};

#[process_fn]
fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(50 * (4 - x)));
    x * x
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let pool = Pool::new(2)?;
    let mut results = (0..4)
        .map(|x| pool.apply_async(slow_square, (x,)))
        .collect::<multiproc::Result<Vec<_>>>()?;
    // Two workers take two tasks each: a fifth one waits in the parent.
    let mut late = pool.apply_async(slow_square, (4,))?;
    println!("cancelled the queued task: {}", late.cancel());
    println!("cancelling a sent one: {}", results[0].cancel());
    for (index, result) in as_completed(results) {
        println!("task {index} done: {}", result.get()?);
    }
    match late.get() {
        Err(err) if err.is_cancelled() => println!("the cancelled one: {err}"),
        other => println!("the fifth task ran after all: {other:?}"),
    }
    Ok(())
}
