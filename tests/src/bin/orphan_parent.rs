//! Used by tests/process.rs: starts a child that sleeps, prints its pid,
//! then waits to be killed. The test SIGKILLs this process and checks the
//! child dies with it. With `thread` as argument the child is started from
//! a short-lived thread (the death signal would follow that thread; the
//! socket watch must not kill the child while this process lives).
use multiproc::Process;

fn main() -> multiproc::Result<()> {
    let from_thread = std::env::args().nth(1).as_deref() == Some("thread");
    let start = || -> multiproc::Result<Process> {
        let mut p = Process::new(multiproc_tests::sleep_forever, ());
        p.start()?;
        Ok(p)
    };
    let child = if from_thread {
        std::thread::spawn(start)
            .join()
            .map_err(|_| multiproc::Error::Closed)??
    } else {
        start()?
    };
    println!("{}", child.pid().unwrap_or(0));
    // Wait for the test to kill us (bounded: never outlive a broken test).
    std::io::stdin().read_line(&mut String::new()).ok();
    Ok(())
}
