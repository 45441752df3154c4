//! Used by tests/process.rs: at the end of `#[multiproc::main]` the daemonic
//! child is terminated and the non-daemonic one joined (Python's rule).
//! Prints the daemon's pid, then returns from main at once. A second
//! argument `forkserver` starts both children by the forkserver.
use std::time::Duration;

use multiproc::{Process, process_fn};

#[process_fn]
fn linger_then_write(path: String) {
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(path, b"joined").ok();
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/multiproc-daemon-end".into());
    if std::env::args().nth(2).as_deref() == Some("forkserver") {
        multiproc::set_start_method(multiproc::StartMethod::ForkServer)?;
    }
    let mut daemon = Process::builder()
        .daemon(true)
        .target(multiproc_tests::sleep_forever, ())
        .build();
    daemon.start()?;
    let mut worker = Process::new(linger_then_write, (path,));
    worker.start()?;
    println!("{}", daemon.pid().unwrap_or(0));
    Ok(())
}
