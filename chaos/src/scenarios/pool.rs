//! Pool under faults: a worker that dies in a task (SIGKILL, `abort()`,
//! `exit(0)`, a stack overflow) under `map`, `imap`, `imap_unordered` and
//! `apply_async`; a worker killed while it starts, while idle, and at a
//! random moment from outside; a task that writes forged frames or
//! garbage to its socket to the pool.
//!
//! Every item's result is a self-checking [`Msg`]: an item whose result is
//! missing or failed (other than the victim) is lost, a result seen twice
//! is duplicated, a result that is not whole or not its item's is torn.
use std::collections::HashMap;
use std::time::Duration;

use multiproc::sync::Event;
use multiproc::{Error, Pool, Queue, process_fn};

use super::Scenario;
use crate::ctx::{Context, Ctx, Res};
use crate::util::{self, Msg, Rng};

/// The bound on one scenario's body: past it, the body counts as hung.
pub const LIMIT: Duration = Duration::from_secs(30);
const ITEMS: u64 = 24;
const NO_VICTIM: u64 = u64::MAX;

const SIGKILL: u8 = 0;
const ABORT: u8 = 1;
const EXIT0: u8 = 2;
const OVERFLOW: u8 = 3;

const MAP: u8 = 0;
const IMAP: u8 = 1;
const IMAP_UNORDERED: u8 = 2;
const APPLY_ASYNC: u8 = 3;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "pool/sigkill/map",
            run: death::<SIGKILL, MAP>,
        },
        Scenario {
            name: "pool/sigkill/imap",
            run: death::<SIGKILL, IMAP>,
        },
        Scenario {
            name: "pool/sigkill/imap_unordered",
            run: death::<SIGKILL, IMAP_UNORDERED>,
        },
        Scenario {
            name: "pool/sigkill/apply_async",
            run: death::<SIGKILL, APPLY_ASYNC>,
        },
        Scenario {
            name: "pool/abort/map",
            run: death::<ABORT, MAP>,
        },
        Scenario {
            name: "pool/abort/imap",
            run: death::<ABORT, IMAP>,
        },
        Scenario {
            name: "pool/abort/imap_unordered",
            run: death::<ABORT, IMAP_UNORDERED>,
        },
        Scenario {
            name: "pool/abort/apply_async",
            run: death::<ABORT, APPLY_ASYNC>,
        },
        Scenario {
            name: "pool/exit0/map",
            run: death::<EXIT0, MAP>,
        },
        Scenario {
            name: "pool/exit0/imap",
            run: death::<EXIT0, IMAP>,
        },
        Scenario {
            name: "pool/exit0/imap_unordered",
            run: death::<EXIT0, IMAP_UNORDERED>,
        },
        Scenario {
            name: "pool/exit0/apply_async",
            run: death::<EXIT0, APPLY_ASYNC>,
        },
        Scenario {
            name: "pool/stack-overflow/map",
            run: death::<OVERFLOW, MAP>,
        },
        Scenario {
            name: "pool/stack-overflow/imap",
            run: death::<OVERFLOW, IMAP>,
        },
        Scenario {
            name: "pool/stack-overflow/imap_unordered",
            run: death::<OVERFLOW, IMAP_UNORDERED>,
        },
        Scenario {
            name: "pool/stack-overflow/apply_async",
            run: death::<OVERFLOW, APPLY_ASYNC>,
        },
        Scenario {
            name: "pool/killed-in-initializer",
            run: killed_in_initializer,
        },
        Scenario {
            name: "pool/killed-while-idle",
            run: killed_while_idle,
        },
        Scenario {
            name: "pool/killed-from-outside-mid-imap",
            run: killed_from_outside,
        },
        Scenario {
            name: "pool/forged-frame-1TiB",
            run: forged::<0>,
        },
        Scenario {
            name: "pool/forged-frame-2^63",
            run: forged::<1>,
        },
        Scenario {
            name: "pool/forged-frame-random-header",
            run: forged::<2>,
        },
        Scenario {
            name: "pool/garbage-on-worker-socket",
            run: forged::<3>,
        },
    ]
}

/// The size of item `i`'s result: mostly small, one in eight large
/// enough to leave the shared arena's fast path.
fn size_for(seed: u64, i: u64) -> usize {
    let mut r = Rng::new(seed ^ i.wrapping_mul(0x9e37));
    if r.chance(8) {
        r.range(16 << 10, 96 << 10) as usize
    } else {
        r.range(0, 2048) as usize
    }
}

fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[0] = depth as u8;
    std::hint::black_box(&mut frame);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + u64::from(frame[0])
}

fn die(how: u8) {
    match how {
        SIGKILL => {
            util::sigkill(std::process::id());
            std::thread::sleep(Duration::from_secs(60));
        }
        ABORT => std::process::abort(),
        EXIT0 => std::process::exit(0),
        _ => {
            std::hint::black_box(recurse(0));
        }
    }
}

/// Item `i` of a job: `(i, victim, how the victim dies, seed)`.
#[process_fn]
fn item(job: (u64, u64, u8, u64)) -> Msg {
    let (i, victim, how, seed) = job;
    if i == victim {
        die(how);
    }
    Msg::new(seed, i, size_for(seed, i))
}

/// Like [`item`], after sleeping `ms` (so that a kill from outside finds
/// the worker mid-task).
#[process_fn]
fn slow_item(job: (u64, u64, u64)) -> Msg {
    let (i, ms, seed) = job;
    std::thread::sleep(Duration::from_millis(ms));
    Msg::new(seed, i, size_for(seed, i))
}

/// Checks item `i`'s result; counts it torn if it is not whole or not `i`'s.
fn check_item(ctx: &mut Ctx, seed: u64, i: u64, m: &Msg) -> bool {
    let good = m.id == seed && m.seq == i && m.body.len() == size_for(seed, i) && m.whole();
    if !good {
        ctx.tear(1, || {
            format!(
                "item {i}: got (id {}, seq {}, {} bytes)",
                m.id,
                m.seq,
                m.body.len()
            )
        });
    }
    good
}

/// `Ok` if `err` is the error a worker dying `how` gives.
fn expect_death(how: u8, err: &Error) -> Result<(), String> {
    let good = match err {
        Error::WorkerDied { signal, code, .. } => match how {
            SIGKILL => *signal == Some(9),
            ABORT => *signal == Some(6),
            EXIT0 => *code == Some(0),
            _ => matches!(signal, Some(6) | Some(11)),
        },
        _ => false,
    };
    if good {
        Ok(())
    } else {
        Err(format!(
            "the victim's error is not the expected WorkerDied: {err}"
        ))
    }
}

/// The pool serves on: a full map is right, and it has its workers.
fn serves_on(ctx: &mut Ctx, pool: &Pool, seed: u64, dead: &[u32]) -> Res {
    let jobs: Vec<_> = (0..ITEMS).map(|i| (i, NO_VICTIM, SIGKILL, seed)).collect();
    let out = pool.map(item, jobs).ctx("a map after the death")?;
    let mut bad = 0;
    for (i, m) in out.iter().enumerate() {
        if !check_item(ctx, seed, i as u64, m) {
            bad += 1;
        }
    }
    if out.len() as u64 != ITEMS {
        ctx.lose(ITEMS.saturating_sub(out.len() as u64), || {
            "a map after the death".into()
        });
    }
    // The pool's reader learns of a death from the dead worker's socket,
    // asynchronously: a worker killed while idle may still be listed for
    // a moment after a map that did not need it. No event announces the
    // replacement, so poll for it (bounded).
    let settled = || {
        let pids = pool.worker_pids();
        pids.len() == 2 && !dead.iter().any(|p| pids.contains(p))
    };
    util::eventually(Duration::from_secs(5), settled);
    let pids = pool.worker_pids();
    if pids.len() != 2 {
        return Err(format!(
            "the pool has {} workers, not 2: {pids:?}",
            pids.len()
        ));
    }
    if let Some(p) = dead.iter().find(|p| pids.contains(p)) {
        return Err(format!("the dead worker {p} is still listed: {pids:?}"));
    }
    if bad > 0 {
        return Err(format!("{bad} wrong results after the death"));
    }
    Ok(())
}

fn death<const HOW: u8, const API: u8>(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    let victim = ctx.rng.range(0, ITEMS);
    ctx.guarded(LIMIT, "pool run", move |ctx| {
        let pool = Pool::new(2).ctx("Pool::new")?;
        let before = pool.worker_pids();
        let jobs: Vec<_> = (0..ITEMS).map(|i| (i, victim, HOW, seed)).collect();
        match API {
            MAP => match pool.map(item, jobs) {
                Ok(_) => {
                    return Err(format!(
                        "map succeeded although item {victim} killed its worker"
                    ));
                }
                Err(e) => expect_death(HOW, &e)?,
            },
            IMAP => {
                let results: Vec<_> = pool.imap(item, jobs).ctx("imap")?.collect();
                if results.len() as u64 != ITEMS {
                    ctx.lose(ITEMS.saturating_sub(results.len() as u64), || {
                        "imap gave fewer results".into()
                    });
                    ctx.duplicate((results.len() as u64).saturating_sub(ITEMS), || {
                        "imap gave more results".into()
                    });
                }
                for (i, r) in results.iter().enumerate() {
                    let i = i as u64;
                    match (i == victim, r) {
                        (true, Err(e)) => expect_death(HOW, e)?,
                        (true, Ok(_)) => return Err(format!("the victim item {i} succeeded")),
                        (false, Ok(m)) => {
                            check_item(ctx, seed, i, m);
                        }
                        (false, Err(e)) => ctx.lose(1, || format!("item {i} failed: {e}")),
                    }
                }
            }
            IMAP_UNORDERED => {
                let results: Vec<_> = pool
                    .imap_unordered(item, jobs)
                    .ctx("imap_unordered")?
                    .collect();
                let mut seen: HashMap<u64, u32> = HashMap::new();
                let mut errors = Vec::new();
                for r in &results {
                    match r {
                        Ok(m) => {
                            if m.seq == victim {
                                return Err(format!("the victim item {victim} succeeded"));
                            }
                            if check_item(ctx, seed, m.seq, m) {
                                *seen.entry(m.seq).or_default() += 1;
                            }
                        }
                        Err(e) => errors.push(e.clone()),
                    }
                }
                let dups: u64 = seen.values().map(|&n| u64::from(n.saturating_sub(1))).sum();
                ctx.duplicate(dups, || "imap_unordered gave an item twice".into());
                let missing = (0..ITEMS)
                    .filter(|i| *i != victim && !seen.contains_key(i))
                    .count() as u64;
                ctx.lose(missing, || {
                    format!("imap_unordered: items missing; errors: {errors:?}")
                });
                match errors.as_slice() {
                    [e] => expect_death(HOW, e)?,
                    [] => return Err("no item failed although a worker died".into()),
                    more => {
                        for e in &more[1..] {
                            ctx.fail(format!("an extra item failed: {e}"));
                        }
                    }
                }
            }
            _ => {
                let mut handles = Vec::new();
                for job in jobs {
                    handles.push(pool.apply_async(item, (job,)).ctx("apply_async")?);
                }
                for (i, mut h) in handles.into_iter().enumerate() {
                    let i = i as u64;
                    match (i == victim, h.get_timeout(LIMIT)) {
                        (true, Err(e)) => expect_death(HOW, &e)?,
                        (true, Ok(_)) => return Err(format!("the victim task {i} succeeded")),
                        (false, Ok(m)) => {
                            check_item(ctx, seed, i, &m);
                        }
                        (false, Err(e)) => ctx.lose(1, || format!("task {i} failed: {e}")),
                    }
                }
            }
        }
        let dead: Vec<u32> = before
            .iter()
            .copied()
            .filter(|p| !pool.worker_pids().contains(p))
            .collect();
        if dead.is_empty() {
            return Err(format!("no worker was replaced: {before:?}"));
        }
        serves_on(ctx, &pool, seed ^ 1, &dead)
    })
}

/// A worker's initializer: announce this worker, then wait for the go.
#[process_fn]
fn announce_and_wait(me: Queue<u32>, go: Event) {
    let _ = me.put(std::process::id());
    assert!(go.wait_timeout(Duration::from_secs(20)), "never told to go");
}

fn killed_in_initializer(ctx: &mut Ctx) -> Res {
    let kills = ctx.rng.range(1, 3) as usize;
    let delay = ctx.rng.range(0, 20);
    let seed = ctx.rng.next_u64();
    ctx.guarded(
        LIMIT,
        "pool with a worker killed while starting",
        move |ctx| {
            let go = Event::new().ctx("Event::new")?;
            let starting = Queue::<u32>::new().ctx("Queue::new")?;
            let killer = {
                let (go, starting) = (go.clone(), starting.clone());
                std::thread::spawn(move || {
                    let mut victims = Vec::new();
                    for _ in 0..kills {
                        if let Ok(v) = starting.get_timeout(LIMIT) {
                            std::thread::sleep(Duration::from_millis(delay));
                            util::sigkill(v);
                            victims.push(v);
                        }
                    }
                    go.set();
                    victims
                })
            };
            let pool = Pool::builder()
                .processes(2)
                .initializer(announce_and_wait, (starting, go))
                .build()
                .ctx("build() with a worker killed in its initializer")?;
            let victims = killer
                .join()
                .map_err(|_| "the killer thread panicked".to_string())?;
            if victims.len() != kills {
                return Err(format!(
                    "only {} of {kills} workers announced themselves",
                    victims.len()
                ));
            }
            serves_on(ctx, &pool, seed, &victims)
        },
    )
}

fn killed_while_idle(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    let mut rng = ctx.rng.clone();
    ctx.guarded(LIMIT, "pool with workers killed while idle", move |ctx| {
        let pool = Pool::new(2).ctx("Pool::new")?;
        let jobs = |s: u64| -> Vec<(u64, u64, u8, u64)> {
            (0..ITEMS).map(|i| (i, NO_VICTIM, SIGKILL, s)).collect()
        };
        pool.map(item, jobs(seed)).ctx("warm map")?;
        for round in 0..3u64 {
            let pids = pool.worker_pids();
            let victim = pids[rng.below(pids.len())];
            util::sigkill(victim);
            // Sometimes the next call races the death, sometimes it comes
            // after the pool saw it.
            std::thread::sleep(rng.millis(0, 5));
            let out = pool.map_chunked(item, jobs(seed + round), 1).map_err(|e| {
                format!("round {round}: a call after an idle worker's death failed: {e}")
            })?;
            for (i, m) in out.iter().enumerate() {
                check_item(ctx, seed + round, i as u64, m);
            }
        }
        serves_on(ctx, &pool, seed ^ 7, &[])
    })
}

fn killed_from_outside(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    let after = ctx.rng.millis(10, 150);
    let which = ctx.rng.below(2);
    let sleeps: Vec<u64> = (0..40).map(|_| ctx.rng.range(2, 10)).collect();
    ctx.guarded(
        LIMIT,
        "imap with a worker killed from outside",
        move |ctx| {
            let pool = Pool::new(2).ctx("Pool::new")?;
            let pids = pool.worker_pids();
            let victim = pids[which];
            let killer = std::thread::spawn(move || {
                std::thread::sleep(after);
                util::sigkill(victim);
            });
            let n = sleeps.len() as u64;
            let jobs: Vec<_> = sleeps
                .iter()
                .enumerate()
                .map(|(i, &ms)| (i as u64, ms, seed))
                .collect();
            let results: Vec<_> = pool.imap(slow_item, jobs).ctx("imap")?.collect();
            let _ = killer.join();
            let mut failed = Vec::new();
            for (i, r) in results.iter().enumerate() {
                match r {
                    Ok(m) => {
                        check_item(ctx, seed, i as u64, m);
                    }
                    Err(Error::WorkerDied {
                        pid,
                        signal: Some(9),
                        ..
                    }) if *pid == victim => failed.push(i),
                    Err(e) => ctx.fail(format!("item {i}: unexpected error {e}")),
                }
            }
            // Only the item the victim was running may fail.
            ctx.lose(failed.len().saturating_sub(1) as u64, || {
                format!("items {failed:?} failed with the victim's death; at most one was running")
            });
            ctx.lose(n.saturating_sub(results.len() as u64), || {
                "imap gave fewer results".into()
            });
            serves_on(ctx, &pool, seed ^ 3, &[victim])
        },
    )
}

/// A task that breaks its worker's protocol: it writes to its socket to
/// the pool (descriptor 3) a frame header of `len` bytes (`0`: 16 random
/// bytes; `1`: 16 to 8 KiB of random bytes), then waits to be stopped.
#[process_fn]
fn forge_frame(len: u64, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let bytes = match len {
        0 => rng.bytes(16),
        1 => {
            let n = rng.range(16, 8192) as usize;
            rng.bytes(n)
        }
        _ => {
            let mut header = [0u8; 16];
            header[..8].copy_from_slice(&len.to_le_bytes());
            header[12..].copy_from_slice(&0x5004u32.to_le_bytes());
            header.to_vec()
        }
    };
    let _ = nix::sys::socket::send(3, &bytes, nix::sys::socket::MsgFlags::empty());
    std::thread::sleep(Duration::from_secs(60));
    len
}

fn forged<const KIND: u8>(ctx: &mut Ctx) -> Res {
    let len = match KIND {
        0 => 1u64 << 40,
        1 => 1 << 63,
        2 => 0,
        _ => 1,
    };
    let seed = ctx.rng.next_u64();
    ctx.guarded(LIMIT, "pool with a forged frame", move |ctx| {
        let pool = Pool::new(2).ctx("Pool::new")?;
        let before = pool.worker_pids();
        let mut result = pool
            .apply_async(forge_frame, (len, seed))
            .ctx("apply_async")?;
        match result.get_timeout(Duration::from_secs(10)) {
            Err(Error::WorkerDied { .. }) => {}
            Err(e) => {
                let now = pool.worker_pids();
                let states: Vec<String> = before
                    .iter()
                    .map(|&p| format!("{p}: {:?}", util::proc_state(p)))
                    .collect();
                return Err(format!(
                    "the forging task's error: {e} (expected WorkerDied); workers before {states:?}, now {now:?}"
                ));
            }
            Ok(v) => return Err(format!("the forging task returned {v}")),
        }
        let dead: Vec<u32> = before
            .iter()
            .copied()
            .filter(|p| !pool.worker_pids().contains(p))
            .collect();
        if dead.len() != 1 {
            return Err(format!(
                "expected one worker replaced: before {before:?}, after {:?}",
                pool.worker_pids()
            ));
        }
        serves_on(ctx, &pool, seed ^ 5, &dead)
    })
}
