//! Used by tests/forkserver.rs: a program that uses the forkserver, with
//! `#[multiproc::main]` (so its server runs from `main`, the other path
//! than the test harness's).
//!
//! - `orphan` / `orphan-thread`: starts a sleeping child by the
//!   forkserver (from the main thread, or from a short-lived thread),
//!   prints its pid, then waits on stdin to be killed. The test SIGKILLs
//!   this program and checks that the child and the server are gone.
//! - `preload`: sets a preload that marks a static in the server, then
//!   prints what a forked child and a spawned child see (`1 0`).
//! - `restart`: kills the server; prints the exit code of the child it
//!   was running (`-9`), whether the next start has a new server, and
//!   that start's exit code (`-9 true 0`).
//! - `bad-preload`: a preload that panics; prints the error of two
//!   starts (the server's start fails each time, nothing hangs).
//! - `thread-name`: the thread name a forked and a spawned child see.
//! - `default`: `set_start_method(ForkServer)`, then prints the method,
//!   the parent pid of a plain `Process` child, and the error of a second
//!   `set_start_method(Spawn)`.
use std::sync::atomic::{AtomicU32, Ordering};

use multiproc::{Process, StartMethod, process_fn};

static PRELOADED: AtomicU32 = AtomicU32::new(0);

#[process_fn]
fn preload() {
    PRELOADED.store(1, Ordering::SeqCst);
}

#[process_fn]
fn preload_panics() {
    panic!("no warm-up today");
}

#[process_fn]
fn preloaded() -> u32 {
    PRELOADED.load(Ordering::SeqCst)
}

#[process_fn]
fn nothing() {}

#[process_fn]
fn my_parent() -> u32 {
    std::os::unix::process::parent_id()
}

#[process_fn]
fn thread_name() -> Option<String> {
    std::thread::current().name().map(String::from)
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let ctx = multiproc::get_context(StartMethod::ForkServer);
    match mode.as_str() {
        "orphan" | "orphan-thread" => {
            let start = move || -> multiproc::Result<Process> {
                let mut p = ctx.process(multiproc_tests::sleep_forever, ());
                p.start()?;
                Ok(p)
            };
            let child = if mode == "orphan-thread" {
                std::thread::spawn(start)
                    .join()
                    .map_err(|_| multiproc::Error::Closed)??
            } else {
                start()?
            };
            println!("{}", child.pid().unwrap_or(0));
            // Wait for the test to kill us (bounded: never outlive a broken test).
            std::io::stdin().read_line(&mut String::new()).ok();
        }
        "preload" => {
            multiproc::set_forkserver_preload(preload)?;
            let forked = ctx.spawn(preloaded, ())?.join()?;
            let spawned = multiproc::get_context(StartMethod::Spawn)
                .spawn(preloaded, ())?
                .join()?;
            println!("{forked} {spawned}");
        }
        "default" => {
            multiproc::set_start_method(StartMethod::ForkServer)?;
            let again = multiproc::set_start_method(StartMethod::Spawn);
            let parent = multiproc::spawn(my_parent, ())?.join()?;
            println!(
                "{} {} {}",
                multiproc::get_start_method(),
                parent != std::process::id(),
                again.is_err()
            );
        }
        "restart" => {
            // A running child dies with its server; the next start gets a
            // new server.
            let mut p = ctx.process(multiproc_tests::sleep_forever, ());
            p.start()?;
            let first = ctx.spawn(my_parent, ())?.join()?;
            multiproc_tests::kill(first, 9);
            let code = p
                .join_timeout(std::time::Duration::from_secs(30))?
                .map_or(0, |s| s.code());
            let second = ctx.spawn(my_parent, ())?.join()?;
            let mut q = ctx.process(nothing, ());
            q.start()?;
            let q_code = q
                .join_timeout(std::time::Duration::from_secs(30))?
                .map_or(-1, |s| s.code());
            println!("{code} {} {q_code}", second != first);
        }
        "bad-preload" => {
            multiproc::set_forkserver_preload(preload_panics)?;
            for _ in 0..2 {
                match ctx.spawn(preloaded, ()) {
                    Err(multiproc::Error::Panicked { message, .. }) => println!("{message}"),
                    other => println!("unexpected: {other:?}"),
                }
            }
        }
        "thread-name" => {
            let forked = ctx.spawn(thread_name, ())?.join()?;
            let spawned = multiproc::get_context(StartMethod::Spawn)
                .spawn(thread_name, ())?
                .join()?;
            println!("{forked:?} {spawned:?}");
        }
        other => {
            eprintln!("unknown mode `{other}`");
            std::process::exit(2);
        }
    }
    Ok(())
}
