//! The parent SIGKILLed while it has children and a pool running: every
//! child of it must die within bounded time (the death signal, or the
//! watcher that sees the parent's socket close).
//!
//! The parent is a probe program (`__probe parent-victim <main|thread>`):
//! this executable again, with a plain `main`, the way a user's program
//! runs. With `thread`, its children and its pool are started from a
//! short-lived thread (so the death signal cannot be armed for them).
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use multiproc::{Pool, Process, process_fn, spawn};

use super::Scenario;
use crate::ctx::{Context, Ctx, Res};
use crate::util;

/// How long children may outlive their SIGKILLed parent.
const DIE_WITHIN: Duration = Duration::from_secs(5);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "parent/killed-with-children-and-pool",
            run: parent_killed::<false>,
        },
        Scenario {
            name: "parent/killed-with-children-and-pool-started-from-a-thread",
            run: parent_killed::<true>,
        },
    ]
}

#[process_fn]
fn sleep_long() {
    std::thread::sleep(Duration::from_secs(120));
}

#[process_fn]
fn sleep_then(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20));
    x
}

#[process_fn]
fn grandparent() {
    // A child that has a child of its own: both must go.
    let mut p = Process::new(sleep_long, ());
    if p.start().is_ok() {
        println!("grandchild {}", p.pid().unwrap_or(0));
    }
    std::thread::sleep(Duration::from_secs(120));
}

/// The probe: starts children, a spawned child, a grandchild and a pool
/// (with one worker replaced after a kill, and work in flight), prints
/// every pid, then waits to be killed (or for its stdin to close).
pub fn victim_main(from_thread: bool) -> i32 {
    let build = move || -> multiproc::Result<(Vec<Process>, multiproc::JoinHandle<()>, Pool)> {
        let mut procs = Vec::new();
        for _ in 0..2 {
            let mut p = Process::new(sleep_long, ());
            p.start()?;
            procs.push(p);
        }
        let mut g = Process::new(grandparent, ());
        g.start()?;
        procs.push(g);
        let spawned = spawn(sleep_long, ())?;
        let pool = Pool::new(2)?;
        pool.map(sleep_then, 0..4u64)?;
        if let Some(&w) = pool.worker_pids().first() {
            util::sigkill(w);
        }
        // The replacement is started by the pool itself.
        pool.map(sleep_then, 0..4u64)?;
        Ok((procs, spawned, pool))
    };
    let built = if from_thread {
        std::thread::spawn(build)
            .join()
            .unwrap_or(Err(multiproc::Error::Closed))
    } else {
        build()
    };
    let Ok((procs, spawned, pool)) = built else {
        println!("error");
        return 1;
    };
    let mut pids: Vec<u32> = procs.iter().filter_map(Process::pid).collect();
    pids.push(spawned.pid());
    pids.extend(pool.worker_pids());
    println!(
        "pids {}",
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Work in flight when the kill comes.
    let _busy = pool.map_async(sleep_then, 0..1000u64);
    let _ = std::io::stdin().read_line(&mut String::new());
    0
}

fn parent_killed<const FROM_THREAD: bool>(ctx: &mut Ctx) -> Res {
    let after = ctx.rng.millis(0, 50);
    ctx.guarded(Duration::from_secs(30), "parent killed", move |ctx| {
        let exe = std::env::current_exe().ctx("current_exe")?;
        let mut child = Command::new(exe)
            .args([
                "__probe",
                "parent-victim",
                if FROM_THREAD { "thread" } else { "main" },
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ctx("start the parent probe")?;
        let stdout = child.stdout.take().ctx("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut pids = Vec::new();
        for line in lines.by_ref() {
            let line = line.ctx("read the probe")?;
            if let Some(rest) = line.strip_prefix("pids ") {
                pids.extend(
                    rest.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
                break;
            }
            if let Some(g) = line.strip_prefix("grandchild ") {
                pids.extend(g.trim().parse::<u32>().ok());
                continue;
            }
            if line == "error" {
                break;
            }
        }
        if pids.len() < 6 {
            util::sigkill(child.id());
            let _ = child.wait();
            return Err(format!("the probe did not report its children: {pids:?}"));
        }
        std::thread::sleep(after);
        util::sigkill(child.id());
        child.wait().ctx("reap the probe")?;
        let all_gone = util::eventually(DIE_WITHIN, || pids.iter().all(|&p| !util::alive(p)));
        if !all_gone {
            let left: Vec<u32> = pids.iter().copied().filter(|&p| util::alive(p)).collect();
            // Left alive for the driver's orphan scan, which counts and
            // kills them.
            ctx.fail(format!(
                "{} of {} children outlived their SIGKILLed parent by {DIE_WITHIN:?}: {left:?}",
                left.len(),
                pids.len()
            ));
        }
        Ok(())
    })
}
