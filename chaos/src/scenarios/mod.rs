//! The fault scenarios, one small function each, and the probe programs
//! some of them start.
use std::time::Duration;

use multiproc::{ExitStatus, Process};

use crate::ctx::{Context, Ctx, Res};

mod eintr;
mod forkserver;
mod hostile;
mod limits;
mod parent;
mod pipe;
mod pool;
mod queue;
mod reuse;
mod selftest;
mod shm;
mod sync;

/// One entry of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub run: fn(&mut Ctx) -> Res,
}

pub fn all() -> Vec<Scenario> {
    let mut v = Vec::new();
    v.extend(pool::scenarios());
    v.extend(queue::scenarios());
    v.extend(pipe::scenarios());
    v.extend(sync::scenarios());
    v.extend(reuse::scenarios());
    v.extend(shm::scenarios());
    v.extend(parent::scenarios());
    v.extend(forkserver::scenarios());
    v.extend(eintr::scenarios());
    v.extend(limits::scenarios());
    v.extend(hostile::scenarios());
    v.extend(selftest::scenarios());
    v
}

/// Starts, before a run measures its descriptors, the runtime's
/// once-per-process resources that scenario `name` uses: they live until
/// the process exits, so they are not leaks (the SharedMemory name
/// server's thread and its wake-up pipe).
pub fn warm_up(name: &str) {
    if name.starts_with("shm/") {
        shm::warm_up();
    }
    if name.starts_with("forkserver/") {
        // The program's link to its server (a socket and the server's
        // pidfd) lives as long as the process, restarted servers included.
        let _ = multiproc::start_forkserver();
    }
}

/// A probe program: `__probe <name> args...`. Returns the exit code.
pub fn probe_main(args: &[String]) -> i32 {
    match args.first().map(String::as_str) {
        Some("parent-victim") => {
            parent::victim_main(args.get(1).map(String::as_str) == Some("thread"))
        }
        Some("squat") => shm::squat_main(&args[1..]),
        Some("forkserver-victim") => forkserver::victim_main(),
        Some("main-ran") => {
            println!("main ran");
            3
        }
        other => {
            eprintln!("unknown probe {other:?}");
            2
        }
    }
}

/// Starts `p`.
pub fn start(mut p: Process) -> Result<Process, String> {
    p.start().ctx("start a child")?;
    Ok(p)
}

/// Joins `p` (bounded); one still running after 10 s is killed, and that
/// is an error.
pub fn reap(p: &mut Process) -> Result<ExitStatus, String> {
    let limit = Duration::from_secs(10);
    match p.join_timeout(limit).ctx("join")? {
        Some(status) => Ok(status),
        None => {
            let _ = p.kill();
            let _ = p.join_timeout(limit);
            Err(format!("child {:?} did not end within {limit:?}", p.pid()))
        }
    }
}
