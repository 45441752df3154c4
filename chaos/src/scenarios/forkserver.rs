//! The forkserver killed: SIGKILL of the server at a random step of a
//! start (before its fork request, between the fork and the answer,
//! while the child reads its start message, runs, or is reaped and its
//! status relayed), and SIGKILL of the program while it starts children
//! through its server.
//!
//! A start that races the server's death either works or fails in time
//! with a clear error; a child it had forked dies with it and reports -9;
//! the next start restarts the server, which serves on. After a SIGKILL of
//! the program, its server and every child the server forked are gone
//! within 5 s. The harness checks zombies, descriptors and orphans (a
//! server or child left alive carries the run's marker) after each run.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use multiproc::{Error, StartMethod, process_fn};

use super::Scenario;
use crate::ctx::{Context, Ctx, Res};
use crate::util;

/// How long a server's children may outlive it, or it the program.
const DIE_WITHIN: Duration = Duration::from_secs(5);
/// How long one start + join may take, whatever dies meanwhile.
const START_WITHIN: Duration = Duration::from_secs(10);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "forkserver/server-killed-at-each-step-of-a-start",
            run: server_killed,
        },
        Scenario {
            name: "forkserver/program-killed-while-starting-children",
            run: program_killed,
        },
    ]
}

fn forkserver() -> multiproc::Context {
    multiproc::get_context(StartMethod::ForkServer)
}

#[process_fn]
fn server_pid() -> u32 {
    std::os::unix::process::parent_id()
}

#[process_fn]
fn twice(x: u64) -> u64 {
    x * 2
}

#[process_fn]
fn sleep_long() {
    std::thread::sleep(Duration::from_secs(120));
}

/// The pid of the server now (starting one if there is none).
fn current_server() -> Result<u32, String> {
    let mut probe = forkserver().spawn(server_pid, ()).ctx("spawn a probe")?;
    probe.join_timeout(START_WITHIN).ctx("join the probe")
}

/// Starts a `spawn` child (`x` → `2x`) and joins it; `Ok(None)` if it
/// died with its server (-9), `Err` for any other outcome.
fn start_and_join(x: u64) -> Result<Option<u64>, String> {
    let mut handle = match forkserver().spawn(twice, (x,)) {
        Ok(handle) => handle,
        // The server died under the start (twice: the retry too).
        Err(Error::Io { .. }) => return Ok(None),
        Err(err) => return Err(format!("start {x}: unexpected error {err}")),
    };
    match handle.join_timeout(START_WITHIN) {
        Ok(v) if v == 2 * x => Ok(Some(v)),
        Ok(v) => Err(format!("start {x}: wrong result {v}")),
        Err(Error::Killed { signal: 9, .. }) => Ok(None),
        Err(err) if err.is_timeout() => Err(format!("start {x}: no result in {START_WITHIN:?}")),
        Err(err) => Err(format!("start {x}: unexpected error {err}")),
    }
}

/// Six times: a start begins, and a killer thread SIGKILLs the server 0
/// to 600 us later (a start takes 0.3 to 0.5 ms here, so the kill lands
/// at any of its steps). The start must end in time, well or with the
/// server's death; the server must be gone; the next start must get a
/// new server, which serves.
fn server_killed(ctx: &mut Ctx) -> Res {
    let delays: Vec<u64> = (0..6).map(|_| ctx.rng.range(0, 600)).collect();
    ctx.guarded(Duration::from_secs(40), "server killed", move |ctx| {
        let (go, wait) = mpsc::channel::<(u32, u64)>();
        let killer = std::thread::spawn(move || {
            for (server, delay_us) in wait {
                std::thread::sleep(Duration::from_micros(delay_us));
                util::sigkill(server);
            }
        });
        for (round, delay) in delays.into_iter().enumerate() {
            let server = current_server()?;
            go.send((server, delay)).ctx("arm the killer")?;
            if let Err(err) = start_and_join(round as u64) {
                ctx.fail(format!("round {round} (kill after {delay} us): {err}"));
            }
            // A child of the dead server is gone once joined (its status
            // says so); one left behind is an orphan the driver finds.
            let gone = util::eventually(DIE_WITHIN, || !util::alive(server));
            ctx.check(gone, || {
                format!("round {round}: server {server} outlived its SIGKILL")
            });
            // The next start restarts the server, which serves on.
            let next = current_server()?;
            ctx.check(next != server, || {
                format!("round {round}: the killed server {server} still answers")
            });
            for x in 0..3 {
                match start_and_join(100 + x) {
                    Ok(Some(_)) => {}
                    Ok(None) => ctx.fail(format!(
                        "round {round}: the restarted server {next} lost start {x}"
                    )),
                    Err(err) => ctx.fail(format!("round {round}, restarted: {err}")),
                }
            }
            if !ctx.failures.is_empty() {
                break;
            }
        }
        drop(go);
        killer
            .join()
            .map_err(|_| "the killer thread panicked".to_string())
    })
}

/// The probe (`__probe forkserver-victim`): starts `Process` children
/// through its forkserver in a loop and prints each pid (the server's
/// first), until it is killed.
pub fn victim_main() -> i32 {
    let mut kept = Vec::new();
    match current_server() {
        Ok(server) => println!("server {server}"),
        Err(_) => {
            println!("error");
            return 1;
        }
    }
    for _ in 0..200 {
        let mut p = forkserver().process(sleep_long, ());
        if p.start().is_err() {
            println!("error");
            return 1;
        }
        println!("child {}", p.pid().unwrap_or(0));
        kept.push(p);
    }
    let _ = std::io::stdin().read_line(&mut String::new());
    0
}

/// The program SIGKILLed 0 to 30 ms into a loop of forkserver starts:
/// its server and every child must be gone within 5 s.
fn program_killed(ctx: &mut Ctx) -> Res {
    let after = ctx.rng.millis(0, 30);
    ctx.guarded(Duration::from_secs(30), "program killed", move |ctx| {
        let exe = std::env::current_exe().ctx("current_exe")?;
        let mut child = Command::new(exe)
            .args(["__probe", "forkserver-victim"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ctx("start the program probe")?;
        let stdout = child.stdout.take().ctx("stdout")?;
        let (tx, pids) = mpsc::channel::<u32>();
        // Reads every pid the probe prints, until it dies.
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let pid = line
                    .strip_prefix("server ")
                    .or_else(|| line.strip_prefix("child "))
                    .and_then(|p| p.trim().parse::<u32>().ok());
                if let Some(pid) = pid {
                    let _ = tx.send(pid);
                }
            }
        });
        let server = pids.recv_timeout(Duration::from_secs(10));
        std::thread::sleep(after);
        util::sigkill(child.id());
        child.wait().ctx("reap the probe")?;
        reader
            .join()
            .map_err(|_| "the reader panicked".to_string())?;
        let Ok(server) = server else {
            return Err("the probe did not report its server".into());
        };
        let mut all: Vec<u32> = vec![server];
        all.extend(pids.try_iter());
        let gone = util::eventually(DIE_WITHIN, || all.iter().all(|&p| !util::alive(p)));
        if !gone {
            let left: Vec<u32> = all.iter().copied().filter(|&p| util::alive(p)).collect();
            // Left alive for the driver's orphan scan, which counts and
            // kills them.
            ctx.fail(format!(
                "{} of {} (the server {server} and its children) outlived the SIGKILLed \
                 program by {DIE_WITHIN:?}: {left:?}",
                left.len(),
                all.len()
            ));
        }
        Ok(())
    })
}
