//! A dead holder whose pid went to a live process: a Lock holder, a queue
//! producer killed in the middle of a `put`, a queue consumer killed in
//! the middle of a `get`. The victim is SIGKILLed and reaped, then the
//! kernel is made to give its pid to a new process (`sleep 60`, started
//! right after `/proc/sys/kernel/ns_last_pid` was set to the pid before
//! it); the recovery must happen while that heir lives. A holder is named
//! by pid and start time (`runtime/src/sys/ipc.rs`), so the heir, which
//! started in a later clock tick, is not taken for it.
//!
//! Choosing the next pid needs root in the pid namespace: where
//! `ns_last_pid` cannot be written, the scenarios fail and say so (they
//! would prove nothing).
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use multiproc::sync::Event;
use multiproc::{Lock, Process, Queue, process_fn};

use super::{Scenario, reap, start};
use crate::ctx::{Context, Ctx, Res};
use crate::util;

const LIMIT: Duration = Duration::from_secs(30);
/// How long a recovery may take once the holder is dead: the documented
/// ~100 ms, with room for a loaded machine.
const RECOVERY: Duration = Duration::from_secs(2);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "reuse/lock-holder-killed-pid-reused",
            run: lock_holder,
        },
        Scenario {
            name: "reuse/queue-producer-killed-mid-put-pid-reused",
            run: queue_producer,
        },
        Scenario {
            name: "reuse/queue-consumer-killed-mid-get-pid-reused",
            run: queue_consumer,
        },
    ]
}

/// A live process (`sleep 60`) holding `pid`, stopped (by its pid) on
/// drop.
struct Heir(std::process::Child);

impl Drop for Heir {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Heir {
    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

/// Starts `sleep 60` with pid `pid` (free: its holder was reaped). Other
/// processes on the machine may take the pid first: a bounded number of
/// tries.
fn heir_with_pid(pid: u32) -> Result<Heir, String> {
    for _ in 0..200 {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/sys/kernel/ns_last_pid")
            .and_then(|mut f| f.write_all(format!("{}", pid - 1).as_bytes()))
            .map_err(|e| {
                format!("cannot choose the next pid (/proc/sys/kernel/ns_last_pid: {e}): pid reuse cannot be forced here")
            })?;
        let child = std::process::Command::new("sleep")
            .arg("60")
            .stdin(std::process::Stdio::null())
            .spawn()
            .ctx("start sleep")?;
        let heir = Heir(child);
        if heir.0.id() == pid {
            return Ok(heir);
        }
    }
    Err(format!(
        "pid {pid} was taken by another process first 200 times: pid reuse not forced"
    ))
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Clock ticks since boot (`/proc/uptime` in hundredths of a second:
/// USER_HZ is 100).
fn uptime_ticks() -> Option<u64> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let (whole, hundredths) = uptime.split_ascii_whitespace().next()?.split_once('.')?;
    Some(whole.parse::<u64>().ok()? * 100 + hundredths.parse::<u64>().ok()?)
}

/// Waits (bounded) until the clock has moved past the tick in which `pid`
/// started: a process that reuses the pid of one that started in the same
/// tick is taken for it (the documented limit, on the safe side).
fn let_it_age(pid: u32) -> Result<u64, String> {
    let started = start_ticks(pid).ctx("the victim's start time")?;
    let aged = util::eventually(Duration::from_secs(5), || {
        uptime_ticks().is_some_and(|now| now > started + 1)
    });
    if !aged {
        return Err("the clock did not tick in 5 s".into());
    }
    Ok(started)
}

/// Kills `p` (which must have lived past its first tick), reaps it and
/// gives its pid to a live heir.
fn kill_and_reuse(p: &mut Process) -> Result<Heir, String> {
    let pid = p.pid().ctx("the victim's pid")?;
    let started = let_it_age(pid)?;
    p.kill().ctx("kill")?;
    reap(p)?;
    let heir = heir_with_pid(pid)?;
    if start_ticks(pid) == Some(started) {
        return Err("the heir started in the victim's tick".into());
    }
    Ok(heir)
}

#[process_fn]
fn hold_lock(lock: Lock, holding: Event) {
    let _g = lock.acquire();
    holding.set();
    std::thread::sleep(Duration::from_secs(60));
}

fn lock_holder(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "lock holder killed, pid reused", move |ctx| {
        let lock = Lock::new().ctx("Lock::new")?;
        let holding = Event::new().ctx("Event")?;
        let mut h = start(Process::new(hold_lock, (lock.clone(), holding.clone())))?;
        if !holding.wait_timeout(LIMIT) {
            return Err("the holder never took the lock".into());
        }
        let mut heir = kill_and_reuse(&mut h)?;
        let t0 = Instant::now();
        match lock.acquire_timeout(RECOVERY) {
            Err(std::sync::TryLockError::Poisoned(_)) => {}
            Ok(_) => return Err("the dead holder's lock was taken without a PoisonError".into()),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(format!(
                    "the lock of a dead holder whose pid went to a live process was not recovered in {RECOVERY:?}"
                ));
            }
        }
        ctx.check(heir.alive(), || "the heir died during the recovery".into());
        ctx.check(t0.elapsed() <= RECOVERY, || {
            format!("the recovery took {:?}", t0.elapsed())
        });
        lock.clear_poison();
        let g = lock.acquire_timeout(RECOVERY);
        ctx.check(g.is_ok(), || {
            "the lock does not work after clear_poison".into()
        });
        Ok(())
    })
}

/// Set in a child that must stop for good in the middle of encoding
/// (`HANG_PUT`) or decoding (`HANG_GET`) a [`Stall`]; the event is set
/// when it gets there.
static HANG_PUT: OnceLock<Event> = OnceLock::new();
static HANG_GET: OnceLock<Event> = OnceLock::new();

/// A message that a child's encoder or decoder stops in (see `HANG_PUT`),
/// holding its queue slot until it is killed.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Stall(u64);

fn hang_here(at: &OnceLock<Event>) {
    if let Some(event) = at.get() {
        event.set();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Serialize for Stall {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        hang_here(&HANG_PUT);
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Stall {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Stall, D::Error> {
        let n = u64::deserialize(d)?;
        hang_here(&HANG_GET);
        Ok(Stall(n))
    }
}

#[process_fn]
fn put_and_hang(q: Queue<Stall>, there: Event) {
    let _ = HANG_PUT.set(there);
    let _ = q.put(Stall(666));
}

#[process_fn]
fn get_and_hang(q: Queue<Stall>, there: Event) {
    let _ = HANG_GET.set(there);
    let _ = q.get();
}

/// Starts `f` on `q`, waits until it stopped in the middle of a message,
/// kills it and gives its pid to a heir.
fn kill_mid_message(
    q: &Queue<Stall>,
    f: fn(Queue<Stall>, Event) -> Process,
) -> Result<(Heir, Instant), String> {
    let there = Event::new().ctx("Event")?;
    let mut p = start(f(q.clone(), there.clone()))?;
    if !there.wait_timeout(LIMIT) {
        let _ = p.kill();
        let _ = reap(&mut p);
        return Err("the child never got into the message".into());
    }
    let heir = kill_and_reuse(&mut p)?;
    Ok((heir, Instant::now()))
}

/// Every slot of `q` (empty, capacity `cap`) takes a message and gives it
/// back in order.
fn whole_capacity(ctx: &mut Ctx, q: &Queue<Stall>, cap: u64) {
    for i in 0..cap {
        if let Err(e) = q.try_put(Stall(1000 + i)) {
            ctx.fail(format!("only {i} of {cap} slots usable: {e}"));
            return;
        }
    }
    for i in 0..cap {
        match q.get_timeout(RECOVERY) {
            Ok(m) if m == Stall(1000 + i) => {}
            Ok(m) => ctx.tear(1, || format!("{m:?} where Stall({}) was due", 1000 + i)),
            Err(e) => ctx.lose(1, || format!("Stall({}): {e}", 1000 + i)),
        }
    }
}

fn queue_producer(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "producer killed mid-put, pid reused", move |ctx| {
        const CAP: u64 = 8;
        let q = Queue::<Stall>::bounded(CAP as usize).ctx("Queue::bounded")?;
        let (mut heir, died) = kill_mid_message(&q, |q, e| Process::new(put_and_hang, (q, e)))?;
        // The messages put after the dead writer's slot come through,
        // twice round the ring, while the heir lives.
        for i in 0..2 * CAP {
            q.put_timeout(Stall(i), RECOVERY)
                .map_err(|e| format!("put {i} behind the dead writer's slot: {e:?}"))?;
            match q.get_timeout(RECOVERY) {
                Ok(m) if m == Stall(i) => {}
                Ok(m) => ctx.tear(1, || format!("{m:?} where Stall({i}) was due")),
                Err(e) => {
                    ctx.lose(1, || {
                        format!("Stall({i}) behind the dead writer's slot: {e}")
                    });
                    return Ok(());
                }
            }
            if i == 0 {
                ctx.check(died.elapsed() <= RECOVERY, || {
                    format!(
                        "the first message came {:?} after the death",
                        died.elapsed()
                    )
                });
            }
        }
        ctx.check(heir.alive(), || "the heir died during the recovery".into());
        whole_capacity(ctx, &q, CAP);
        Ok(())
    })
}

fn queue_consumer(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "consumer killed mid-get, pid reused", move |ctx| {
        const CAP: u64 = 4;
        let q = Queue::<Stall>::bounded(CAP as usize).ctx("Queue::bounded")?;
        q.put(Stall(1)).map_err(|e| format!("put: {e:?}"))?;
        q.put(Stall(2)).map_err(|e| format!("put: {e:?}"))?;
        let (mut heir, _) = kill_mid_message(&q, |q, e| Process::new(get_and_hang, (q, e)))?;
        // The message the dead consumer was taking comes back (after the
        // one behind it), while the heir lives.
        let mut got = Vec::new();
        for _ in 0..2 {
            match q.get_timeout(RECOVERY) {
                Ok(m) => got.push(m),
                Err(e) => {
                    ctx.lose(1, || format!("after {got:?}: {e}"));
                    break;
                }
            }
        }
        let mut sorted = got.clone();
        sorted.sort_by_key(|m| m.0);
        if sorted.len() == 2 && sorted != [Stall(1), Stall(2)] {
            ctx.tear(1, || format!("got {got:?}, not Stall(1) and Stall(2)"));
        }
        ctx.check(heir.alive(), || "the heir died during the recovery".into());
        match q.try_get() {
            Ok(m) => ctx.duplicate(1, || format!("{m:?} a second time")),
            Err(_) => whole_capacity(ctx, &q, CAP),
        }
        Ok(())
    })
}
