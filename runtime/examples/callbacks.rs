//! Python's `apply_async(f, args, callback=..., error_callback=...)`: the
//! callbacks run in this process, on the pool's callback thread, once each.
use std::sync::{Arc, Mutex};

use multiproc::{Pool, process_fn};

#[process_fn]
fn checked_sqrt(x: u64) -> u64 {
    assert!(x % 7 != 0, "{x} is a multiple of 7");
    (x as f64).sqrt() as u64
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let pool = Pool::new(2)?;
    let roots = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    for x in [4, 9, 14, 16] {
        let (roots, failures) = (Arc::clone(&roots), Arc::clone(&failures));
        // Dropping a result that has callbacks lets it run on: they get it.
        drop(
            pool.apply_async(checked_sqrt, (x,))?
                .callback(move |r: &u64| roots.lock().unwrap_or_else(|p| p.into_inner()).push(*r))
                .error_callback(move |e| {
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(e.to_string())
                }),
        );
    }
    // join() returns once every callback has run.
    pool.close();
    pool.join()?;
    let mut roots = roots.lock().unwrap_or_else(|p| p.into_inner()).clone();
    roots.sort_unstable();
    println!("roots: {roots:?}");
    println!(
        "failures: {:?}",
        failures.lock().unwrap_or_else(|p| p.into_inner())
    );
    Ok(())
}
