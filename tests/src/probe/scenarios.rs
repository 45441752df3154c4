//! The scenarios of the boot probes (`boot_probe`, a plain `main`, whose
//! children start from the load-time hook; `boot_probe_main`, a
//! `#[multiproc::main]`, whose children start from `main`'s first line):
//! one scenario named by the first argument runs and prints what it saw,
//! so the tests can read a child's standard error and exit code.
use std::time::Duration;

use multiproc::{Pool, Process, process_fn};

#[process_fn]
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[0] = depth as u8;
    std::hint::black_box(&mut frame);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + u64::from(frame[0])
}

#[process_fn]
fn panics(message: String) {
    panic!("{message}");
}

#[process_fn]
fn fails_on_three(x: u64) -> u64 {
    if x == 3 {
        panic!("item three fails");
    }
    x * 10
}

#[process_fn]
fn args() -> Vec<String> {
    std::env::args().collect()
}

/// Where standard input points, and what one read of it gives.
#[process_fn]
fn stdin_state() -> (String, usize) {
    use std::io::Read;
    let target = std::fs::read_link("/proc/self/fd/0")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut buf = [0u8; 16];
    let n = std::io::stdin().read(&mut buf).unwrap_or(usize::MAX);
    (target, n)
}

/// A result that carries descriptors (a queue's).
#[process_fn]
fn make_queue() -> multiproc::Queue<u8> {
    multiproc::Queue::bounded(4).expect("queue")
}

/// Whether the function runs on the process's main thread (its thread id
/// is the pid): the `#[multiproc::main]` path's children do, the load-time
/// path's run on a thread of their own named `main`.
#[process_fn]
fn where_it_runs() -> (bool, Option<String>) {
    let on_main = nix::unistd::gettid() == nix::unistd::getpid();
    (on_main, std::thread::current().name().map(str::to_string))
}

#[process_fn]
fn square(x: u64) -> u64 {
    x * x
}

const LIMIT: Duration = Duration::from_secs(60);

fn run(mut p: Process) -> multiproc::Result<()> {
    p.start()?;
    let status = p.join_timeout(LIMIT)?.ok_or(multiproc::Error::Timeout)?;
    println!("exitcode {}", status.code());
    Ok(())
}

/// Runs the scenario the first argument names.
pub fn run_scenario() -> multiproc::Result<()> {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    match scenario.as_str() {
        "panic-strategy" => {
            println!(
                "{}",
                if cfg!(panic = "abort") {
                    "abort"
                } else {
                    "unwind"
                }
            );
        }
        "overflow" => run(Process::new(recurse, (0,)))?,
        "process-panic" => run(Process::new(panics, ("probe panic".to_string(),)))?,
        "spawn-panic" => {
            let err = multiproc::spawn(panics, ("probe spawn panic".to_string(),))?
                .join_timeout(LIMIT)
                .expect_err("the child panics");
            println!("spawn error: {err}");
        }
        "pool-panic" => {
            let pool = Pool::new(2)?;
            for chunksize in [1, 4, 100] {
                let results: Vec<String> = pool
                    .imap_chunked(fails_on_three, 0..8u64, chunksize)?
                    .map(|r| match r {
                        Ok(v) => v.to_string(),
                        Err(e) => format!("error: {e}"),
                    })
                    .collect();
                println!("chunksize {chunksize}: {}", results.join(" | "));
            }
            println!("after: {:?}", pool.map(square, 0..5u64)?);
        }
        "main-error" => {
            fn forgot(x: u64) -> u64 {
                x
            }
            return multiproc::spawn(forgot, (1,))?.join().map(drop);
        }
        "main-ran" => println!("main ran"),
        "pool-fds" => {
            // A full descriptor table costs the result whose descriptors
            // could not arrive, not the worker; the pool serves on once
            // descriptors are free again.
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            let pool = Pool::new(1)?;
            pool.apply(make_queue, ())?;
            let workers = pool.worker_pids();
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
            setrlimit(Resource::RLIMIT_NOFILE, 256, hard).expect("setrlimit");
            let mut hold = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hold.push(f);
            }
            let full = pool.apply(make_queue, ());
            println!(
                "full table: {}",
                full.map(|_| "ok".to_string())
                    .unwrap_or_else(|e| e.to_string())
            );
            hold.truncate(hold.len().saturating_sub(16));
            let again = pool.apply(make_queue, ()).map(|q| q.put(7).is_ok());
            println!(
                "after: {:?}, same worker: {}",
                again.map_err(|e| e.to_string()),
                pool.worker_pids() == workers
            );
            // The only worker dies while no replacement can be started:
            // work fails with the reason instead of waiting, and the pool
            // starts a worker again once descriptors are free.
            // The worker dies with the table full. Its own descriptors are
            // freed when the pool notices, which may or may not leave room
            // for its replacement: either way the next call must return
            // (a result, or the reason no worker could be started), and
            // the pool must serve again once descriptors are free.
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hold.push(f);
            }
            for pid in &workers {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hold.push(f);
            }
            let starved = pool.apply(square, (3,));
            println!(
                "dead worker, full table: returned ({})",
                if starved.is_ok() {
                    "a result"
                } else {
                    "an error"
                }
            );
            drop(hold);
            let deadline = std::time::Instant::now() + LIMIT;
            let recovered = loop {
                match pool.apply(square, (3,)) {
                    Ok(v) => break Some(v),
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => break None,
                }
            };
            println!("recovered: {recovered:?}");
        }
        "args" => {
            let theirs = multiproc::spawn(args, ())?.join_timeout(LIMIT)?;
            let mine: Vec<String> = std::env::args().collect();
            println!("same args: {}", theirs == mine);
        }
        "main-thread" => {
            let (on_main, name) = multiproc::spawn(where_it_runs, ())?.join_timeout(LIMIT)?;
            println!("on the main thread: {on_main}, named {name:?}");
        }
        "lib-fn" => {
            use multiproc_tests::helper_triple;
            let tripled = Pool::new(2)?.map(helper_triple, 1..=4u64)?;
            let one = multiproc::spawn(helper_triple, (5,))?.join_timeout(LIMIT)?;
            println!("{tripled:?} {one}");
        }
        "stdin" => {
            let (target, n) = multiproc::spawn(stdin_state, ())?.join_timeout(LIMIT)?;
            println!("stdin {target} read {n}");
        }
        other => println!("unknown scenario {other:?}"),
    }
    Ok(())
}
