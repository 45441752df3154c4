//! `imap` over a long job with a progress bar: results arrive in order as
//! the workers finish them, and the input is read only as fast as needed.
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use multiproc::{Pool, process_fn};

#[process_fn]
fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20));
    x * x
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let n = 200;
    let pool = Pool::new(multiproc::process::cpu_count())?;
    let bar = ProgressBar::new(n);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut total = 0;
    for result in pool.imap(slow_square, 0..n)? {
        total += result?;
        bar.inc(1);
    }
    bar.finish();
    println!("sum of squares below {n}: {total}");
    Ok(())
}
