//! Sync primitives whose holder is SIGKILLed while holding: Lock, RLock,
//! Condition, Barrier, Semaphore, Value and Array.
//!
//! The promises checked are the documented ones (`runtime/src/sync/mod.rs`
//! and each type's docs): a waiter gets the lock of a dead holder within
//! about 100 ms (checked: within [`RECOVERY`]) with `Err(PoisonError)`; the
//! lock stays poisoned until cleared; a barrier whose waiting party dies
//! breaks for the others; a semaphore unit held by a dead process is lost
//! (as in Python) but the others work and waits stay bounded; a `Value`
//! guard works on a copy, so a holder killed mid-update leaves the old
//! value whole; an `Array` is updated in place, so only the poison is
//! promised.
use std::time::{Duration, Instant};

use multiproc::sync::{Barrier, Condition, Event, RLock, Semaphore};
use multiproc::{Array, Error, Lock, Process, Value, process_fn, spawn};

use super::{Scenario, reap, start};
use crate::ctx::{Context, Ctx, Res};

const LIMIT: Duration = Duration::from_secs(30);
/// How long after the holder's death a waiter may take to get the lock:
/// the documented ~100 ms, with room for a loaded machine.
const RECOVERY: Duration = Duration::from_secs(2);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "sync/lock-holder-killed",
            run: lock_holder_killed,
        },
        Scenario {
            name: "sync/rlock-holder-killed",
            run: rlock_holder_killed,
        },
        Scenario {
            name: "sync/condition-holder-killed-waiter-recovers",
            run: condition_holder_killed,
        },
        Scenario {
            name: "sync/barrier-party-killed",
            run: barrier_party_killed,
        },
        Scenario {
            name: "sync/semaphore-holder-killed",
            run: semaphore_holder_killed,
        },
        Scenario {
            name: "sync/value-holder-killed-mid-update",
            run: value_holder_killed,
        },
        Scenario {
            name: "sync/array-holder-killed-mid-update",
            run: array_holder_killed,
        },
    ]
}

#[process_fn]
fn hold_lock(lock: Lock, holding: Event) {
    let _g = lock.acquire();
    holding.set();
    std::thread::sleep(Duration::from_secs(60));
}

#[process_fn]
fn hold_rlock(lock: RLock, holding: Event) {
    let _a = lock.acquire();
    let _b = lock.acquire();
    holding.set();
    std::thread::sleep(Duration::from_secs(60));
}

/// Waits for the lock in another process: "poisoned", "ok" or "timeout".
#[process_fn]
fn wait_lock(lock: Lock, ready: Event) -> String {
    ready.set();
    match lock.acquire_timeout(Duration::from_secs(20)) {
        Ok(_) => "ok".into(),
        Err(std::sync::TryLockError::Poisoned(_)) => "poisoned".into(),
        Err(std::sync::TryLockError::WouldBlock) => "timeout".into(),
    }
}

/// Kills `p` after a random pause, reaping it before the waiter looks
/// half the time (a dead holder is recovered whether or not it is a
/// zombie yet). Returns when it died.
fn kill_holder(ctx: &mut Ctx, p: &mut Process) -> Result<Instant, String> {
    ctx.pause(0, 30);
    let reap_first = ctx.rng.chance(2);
    p.kill().ctx("kill")?;
    let died = Instant::now();
    if reap_first {
        reap(p)?;
    }
    Ok(died)
}

fn recovered_in_time(ctx: &mut Ctx, died: Instant, what: &str) {
    let took = died.elapsed();
    ctx.check(took <= RECOVERY, || {
        format!("{what} took {took:?} after the holder died")
    });
}

fn lock_holder_killed(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "lock holder killed", move |ctx| {
        let lock = Lock::new().ctx("Lock::new")?;
        let holding = Event::new().ctx("Event")?;
        let mut h = start(Process::new(hold_lock, (lock.clone(), holding.clone())))?;
        if !holding.wait_timeout(LIMIT) {
            return Err("the holder never took the lock".into());
        }
        // A waiter in another process, already waiting when the holder dies.
        let ready = Event::new().ctx("Event")?;
        let mut waiter = spawn(wait_lock, (lock.clone(), ready.clone())).ctx("spawn")?;
        if !ready.wait_timeout(LIMIT) {
            return Err("the waiter never started".into());
        }
        let died = kill_holder(ctx, &mut h)?;
        let verdict = waiter.join_timeout(LIMIT).ctx("the waiter")?;
        recovered_in_time(ctx, died, "the waiting process's acquire");
        if verdict != "poisoned" {
            return Err(format!("the waiter got {verdict:?}, not a PoisonError"));
        }
        reap(&mut h)?;
        match lock.acquire_timeout(RECOVERY) {
            Err(std::sync::TryLockError::Poisoned(_)) => {}
            Ok(_) => return Err("the lock is not poisoned any more before clear_poison".into()),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err("the lock is still held after the waiter released it".into());
            }
        }
        lock.clear_poison();
        match lock.acquire_timeout(RECOVERY) {
            Ok(_) => Ok(()),
            Err(_) => Err("after clear_poison the lock is not free and clean".into()),
        }
    })
}

fn rlock_holder_killed(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "rlock holder killed", move |ctx| {
        let lock = RLock::new().ctx("RLock::new")?;
        let holding = Event::new().ctx("Event")?;
        let mut h = start(Process::new(hold_rlock, (lock.clone(), holding.clone())))?;
        if !holding.wait_timeout(LIMIT) {
            return Err("the holder never took the lock".into());
        }
        let died = kill_holder(ctx, &mut h)?;
        match lock.acquire_timeout(Duration::from_secs(10)) {
            Err(std::sync::TryLockError::Poisoned(g)) => {
                recovered_in_time(ctx, died, "acquire");
                // Re-entrant for this thread now.
                let again = lock.try_acquire();
                if matches!(again, Err(std::sync::TryLockError::WouldBlock)) {
                    return Err("the recovered RLock is not re-entrant".into());
                }
                drop(again);
                drop(g);
            }
            Ok(_) => return Err("acquire after the holder died was not poisoned".into()),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err("the RLock of a dead holder was not recovered in 10 s".into());
            }
        }
        reap(&mut h)?;
        lock.clear_poison();
        lock.try_acquire()
            .map(drop)
            .map_err(|e| format!("after clear_poison: {e}"))
    })
}

/// Waits 500 ms on the condition (never notified); returns how the wait
/// came back.
#[process_fn]
fn cond_wait(cond: Condition, waiting: Event) -> String {
    let Ok(guard) = cond.acquire() else {
        return "poisoned at the start".into();
    };
    waiting.set();
    match cond.wait_timeout(guard, Duration::from_millis(500)) {
        Ok((_, t)) => format!("woke, timed out {}", t.timed_out()),
        Err(p) => {
            let (_, t) = p.into_inner();
            format!("poisoned, timed out {}", t.timed_out())
        }
    }
}

#[process_fn]
fn cond_hold(cond: Condition, holding: Event) {
    let _g = cond.acquire();
    holding.set();
    std::thread::sleep(Duration::from_secs(60));
}

fn condition_holder_killed(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "condition holder killed", move |ctx| {
        let cond = Condition::new().ctx("Condition::new")?;
        let (waiting, holding) = (Event::new().ctx("Event")?, Event::new().ctx("Event")?);
        let mut w = spawn(cond_wait, (cond.clone(), waiting.clone())).ctx("spawn")?;
        if !waiting.wait_timeout(LIMIT) {
            return Err("the waiter never waited".into());
        }
        // The holder takes the lock the waiter released inside wait.
        let mut h = start(Process::new(cond_hold, (cond.clone(), holding.clone())))?;
        if !holding.wait_timeout(LIMIT) {
            return Err("the holder never took the lock".into());
        }
        let died = kill_holder(ctx, &mut h)?;
        let verdict = w.join_timeout(Duration::from_secs(10)).ctx("the waiter")?;
        // Its 500 ms wait ends, then it must get the dead holder's lock.
        let took = died.elapsed();
        ctx.check(took <= RECOVERY + Duration::from_millis(500), || {
            format!("the waiter came back {took:?} after the holder died")
        });
        if !verdict.starts_with("poisoned") {
            return Err(format!(
                "the waiter's wait ended with {verdict:?}, not a PoisonError"
            ));
        }
        reap(&mut h)?;
        let g = cond.acquire();
        ctx.check(g.is_err(), || "the condition's lock is not poisoned".into());
        Ok(())
    })
}

#[process_fn]
fn barrier_party(b: Barrier, timeout_ms: u64) -> String {
    match b.wait_timeout(Duration::from_millis(timeout_ms)) {
        Ok(_) => "passed".into(),
        Err(Error::BrokenBarrier) => "broken".into(),
        Err(e) => e.to_string(),
    }
}

fn barrier_party_killed(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "barrier party killed", move |ctx| {
        let b = Barrier::new(4).ctx("Barrier::new")?;
        let mut survivor = spawn(barrier_party, (b.clone(), 20_000u64)).ctx("spawn")?;
        let mut victim = start(Process::new(barrier_party, (b.clone(), 60_000u64)))?;
        let ok = crate::util::eventually(LIMIT, || b.n_waiting() == 2);
        if !ok {
            return Err(format!(
                "the parties never arrived: {} waiting",
                b.n_waiting()
            ));
        }
        let died = kill_holder(ctx, &mut victim)?;
        let verdict = survivor
            .join_timeout(Duration::from_secs(10))
            .ctx("the survivor")?;
        recovered_in_time(ctx, died, "the waiting party's BrokenBarrier");
        if verdict != "broken" {
            return Err(format!(
                "the waiting party got {verdict:?}, not BrokenBarrier"
            ));
        }
        reap(&mut victim)?;
        match b.wait_timeout(Duration::from_secs(5)) {
            Err(Error::BrokenBarrier) => Ok(()),
            other => Err(format!(
                "a party arriving later got {other:?}, not BrokenBarrier"
            )),
        }
    })
}

#[process_fn]
fn hold_unit(sem: Semaphore, holding: Event) {
    sem.acquire();
    holding.set();
    std::thread::sleep(Duration::from_secs(60));
}

fn semaphore_holder_killed(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "semaphore holder killed", move |ctx| {
        let sem = Semaphore::new(2).ctx("Semaphore::new")?;
        let holding = Event::new().ctx("Event")?;
        let mut h = start(Process::new(hold_unit, (sem.clone(), holding.clone())))?;
        if !holding.wait_timeout(LIMIT) {
            return Err("the holder never took its unit".into());
        }
        kill_holder(ctx, &mut h)?;
        reap(&mut h)?;
        // Documented: the dead holder's unit is lost; the other works, and
        // a wait for a third stays bounded.
        if sem.value() != 1 {
            return Err(format!(
                "value {} after the holder died holding one of 2",
                sem.value()
            ));
        }
        if !sem.try_acquire() {
            return Err("the unit nobody holds cannot be taken".into());
        }
        let t0 = Instant::now();
        if sem.acquire_timeout(Duration::from_millis(200)) {
            return Err("a third unit was taken from a semaphore of 2".into());
        }
        if t0.elapsed() > Duration::from_secs(2) {
            return Err(format!("a 200 ms acquire_timeout took {:?}", t0.elapsed()));
        }
        sem.release().ctx("release")?;
        if sem.value() != 1 {
            return Err(format!("value {} after release", sem.value()));
        }
        Ok(())
    })
}

/// Takes the value's lock and rewrites its eight words one by one,
/// slowly: killed somewhere in the middle.
#[process_fn]
fn update_value(v: Value<[u64; 8]>, holding: Event) {
    let Ok(mut g) = v.lock() else {
        return;
    };
    holding.set();
    for i in 0..8 {
        g[i] = 2;
        std::thread::sleep(Duration::from_millis(3));
    }
    std::thread::sleep(Duration::from_secs(60));
}

fn value_holder_killed(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "value holder killed mid-update", move |ctx| {
        let v = Value::new([1u64; 8]).ctx("Value::new")?;
        let holding = Event::new().ctx("Event")?;
        let mut h = start(Process::new(update_value, (v.clone(), holding.clone())))?;
        if !holding.wait_timeout(LIMIT) {
            return Err("the holder never took the lock".into());
        }
        let died = kill_holder(ctx, &mut h)?;
        match v.lock_timeout(Duration::from_secs(10)) {
            Err(std::sync::TryLockError::Poisoned(p)) => {
                recovered_in_time(ctx, died, "the value's lock");
                let words = *p.into_inner();
                // The guard worked on a copy: the old value, whole.
                if words != [1u64; 8] {
                    ctx.tear(1, || {
                        format!("the value after its holder died mid-update: {words:?}")
                    });
                }
            }
            Ok(_) => return Err("the value's lock of a dead holder is not poisoned".into()),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err("the value's lock of a dead holder was not recovered in 10 s".into());
            }
        }
        reap(&mut h)?;
        Ok(())
    })
}

#[process_fn]
fn update_array(a: Array<u64>, holding: Event) {
    let Ok(mut g) = a.lock() else {
        return;
    };
    holding.set();
    for chunk in g.chunks_mut(64) {
        for x in chunk.iter_mut() {
            *x = 2;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_secs(60));
}

fn array_holder_killed(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "array holder killed mid-update", move |ctx| {
        let a = Array::new(&[1u64; 4096]).ctx("Array::new")?;
        let holding = Event::new().ctx("Event")?;
        let mut h = start(Process::new(update_array, (a.clone(), holding.clone())))?;
        if !holding.wait_timeout(LIMIT) {
            return Err("the holder never took the lock".into());
        }
        let died = kill_holder(ctx, &mut h)?;
        match a.lock_timeout(Duration::from_secs(10)) {
            Err(std::sync::TryLockError::Poisoned(p)) => {
                recovered_in_time(ctx, died, "the array's lock");
                // In place: a prefix of 2s, then 1s (any other value is torn).
                let g = p.into_inner();
                let ones = g.iter().position(|&x| x == 1).unwrap_or(g.len());
                let bad = g[..ones].iter().filter(|&&x| x != 2).count()
                    + g[ones..].iter().filter(|&&x| x != 1).count();
                ctx.tear(bad as u64, || {
                    "array elements that are neither the old nor the new value in order".into()
                });
            }
            Ok(_) => return Err("the array's lock of a dead holder is not poisoned".into()),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err("the array's lock of a dead holder was not recovered in 10 s".into());
            }
        }
        reap(&mut h)?;
        if !a.is_poisoned() {
            return Err("the array is not poisoned after the recovery".into());
        }
        a.clear_poison();
        a.lock()
            .map(drop)
            .map_err(|_| "poisoned after clear_poison".to_string())
    })
}
