//! Issue 13's synchronisation gaps, with CPython's semantics as the
//! reference: a Barrier's action, `reset()` and default timeout; a
//! Condition over an existing Lock or RLock, `notify_n`,
//! `wait_timeout_while`; `BoundedSemaphore::new(0)`.
//!
//! Every wait is bounded; nothing sleeps to synchronise.

use std::sync::TryLockError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use multiproc::shared::SharedMemory;
use multiproc::sync::{Barrier, BoundedSemaphore, Condition, RLock};
use multiproc::{Error, Lock, Value, process_fn};

const JOIN: Duration = Duration::from_secs(30);

/// Polls `f` until it holds, for at most 30 s (a bounded wait for a state
/// that another process reaches, not a sleep standing in for one).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + JOIN;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn unique(what: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "mp-sync-more-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[test]
fn bounded_semaphore_of_zero_is_allowed_and_refuses_release() {
    let sem = BoundedSemaphore::new(0).expect("CPython allows BoundedSemaphore(0)");
    assert_eq!(sem.value(), 0);
    assert!(!sem.try_acquire());
    assert!(!sem.acquire_timeout(Duration::from_millis(5)));
    let err = sem.release().expect_err("above its bound of 0");
    assert!(matches!(err, Error::Misuse { .. }), "{err}");
    assert_eq!(sem.value(), 0);
}

/// A barrier action: counts the trips in the first byte of a named block.
#[process_fn]
fn count_trip(name: String) {
    let shm = SharedMemory::open(&name).expect("the counter block");
    shm.as_atomic_u8()[0].fetch_add(1, Ordering::SeqCst);
}

#[process_fn]
fn rounds_at_barrier(barrier: Barrier, rounds: u32) -> u32 {
    let mut led = 0;
    for _ in 0..rounds {
        if barrier.wait_timeout(JOIN).expect("barrier").is_leader() {
            led += 1;
        }
    }
    led
}

#[test]
fn barrier_action_runs_exactly_once_per_trip_across_processes() {
    const ROUNDS: u32 = 20;
    let name = unique("trips");
    let counter = SharedMemory::create(&name, 1).expect("counter");
    let barrier = Barrier::builder(3)
        .action(count_trip, (name.clone(),))
        .build()
        .expect("barrier");
    let children: Vec<_> = (0..2)
        .map(|_| multiproc::spawn(rounds_at_barrier, (barrier.clone(), ROUNDS)).expect("spawn"))
        .collect();
    let mut led = rounds_at_barrier(barrier.clone(), ROUNDS);
    for mut child in children {
        led += child.join_timeout(JOIN).expect("join");
    }
    assert_eq!(led, ROUNDS, "one leader per round");
    assert_eq!(
        u32::from(counter.as_atomic_u8()[0].load(Ordering::SeqCst)),
        ROUNDS,
        "the action runs once per trip"
    );
    assert!(!barrier.is_broken());
}

#[process_fn]
fn explode() {
    panic!("the action failed");
}

#[process_fn]
fn wait_at_barrier(barrier: Barrier) -> String {
    match barrier.wait_timeout(JOIN) {
        Ok(r) if r.is_leader() => "leader".to_string(),
        Ok(_) => "passed".to_string(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn barrier_action_that_panics_breaks_it_for_the_others() {
    let barrier = Barrier::builder(2)
        .action(explode, ())
        .build()
        .expect("barrier");
    let mut child = multiproc::spawn(wait_at_barrier, (barrier.clone(),)).expect("spawn");
    eventually("the child waits", || barrier.n_waiting() == 1);
    // The last to arrive runs the action: this process.
    let err = barrier.wait_timeout(JOIN).expect_err("the action panicked");
    assert!(
        err.panic_message()
            .is_some_and(|m| m.contains("the action failed")),
        "{err}"
    );
    assert_eq!(
        child.join_timeout(JOIN).expect("join"),
        Error::BrokenBarrier.to_string()
    );
    assert!(barrier.is_broken());
}

fn plain_fn() {}

#[test]
fn barrier_action_must_be_registered_and_plain() {
    let err = Barrier::builder(2)
        .action(plain_fn, ())
        .build()
        .expect_err("not registered");
    assert!(matches!(err, Error::NotRegistered { .. }), "{err}");
    let lock = Lock::new().expect("lock");
    let err = Barrier::builder(2)
        .action(hold_lock_action, (lock,))
        .build()
        .expect_err("a handle in the action's arguments");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    assert!(err.to_string().contains("handles"), "{err}");
}

#[process_fn]
fn hold_lock_action(lock: Lock) {
    drop(lock.acquire());
}

#[test]
fn barrier_reset_breaks_the_waiters_then_is_reused() {
    let barrier = Barrier::new(3).expect("barrier");
    let mut first = multiproc::spawn(wait_at_barrier, (barrier.clone(),)).expect("spawn");
    let mut second = multiproc::spawn(wait_at_barrier, (barrier.clone(),)).expect("spawn");
    eventually("two parties wait", || barrier.n_waiting() == 2);
    barrier.reset();
    // As in CPython: the parties waiting at the reset get BrokenBarrierError.
    for child in [&mut first, &mut second] {
        assert_eq!(
            child.join_timeout(JOIN).expect("join"),
            Error::BrokenBarrier.to_string()
        );
    }
    assert!(!barrier.is_broken());
    assert_eq!(barrier.n_waiting(), 0);
    // Reusable: a full round passes, with one leader.
    let children: Vec<_> = (0..2)
        .map(|_| multiproc::spawn(wait_at_barrier, (barrier.clone(),)).expect("spawn"))
        .collect();
    let mine = wait_at_barrier(barrier.clone());
    let mut outcomes = vec![mine];
    for mut child in children {
        outcomes.push(child.join_timeout(JOIN).expect("join"));
    }
    outcomes.sort();
    assert_eq!(outcomes, ["leader", "passed", "passed"]);
}

#[test]
fn barrier_reset_repairs_a_broken_barrier() {
    let barrier = Barrier::new(1).expect("barrier");
    barrier.abort();
    assert!(matches!(barrier.wait(), Err(Error::BrokenBarrier)));
    barrier.reset();
    assert!(!barrier.is_broken());
    assert!(barrier.wait().expect("whole again").is_leader());
}

#[test]
fn barrier_reset_after_a_party_was_killed_frees_its_slot() {
    let barrier = Barrier::new(2).expect("barrier");
    let mut victim = multiproc::spawn(wait_at_barrier, (barrier.clone(),)).expect("spawn");
    eventually("the victim waits", || barrier.n_waiting() == 1);
    victim.kill().expect("kill");
    // Reaped, so certainly dead when this party arrives.
    assert!(victim.join_timeout(JOIN).is_err(), "killed");
    assert!(matches!(
        barrier.wait_timeout(JOIN),
        Err(Error::BrokenBarrier)
    ));
    barrier.reset();
    let mut child = multiproc::spawn(wait_at_barrier, (barrier.clone(),)).expect("spawn");
    let mine = barrier.wait_timeout(JOIN).expect("a fresh round");
    let theirs = child.join_timeout(JOIN).expect("join");
    assert!(mine.is_leader() != (theirs == "leader"), "{theirs}");
}

#[test]
fn barrier_default_timeout_applies_to_wait() {
    let barrier = Barrier::builder(2)
        .timeout(Duration::from_millis(20))
        .build()
        .expect("barrier");
    assert_eq!(barrier.timeout(), Some(Duration::from_millis(20)));
    let err = barrier.wait().expect_err("alone, with a default timeout");
    assert!(err.is_timeout(), "{err}");
    assert!(barrier.is_broken());
}

#[process_fn]
fn barrier_timeout_in_child(barrier: Barrier) -> (Option<u64>, bool) {
    let timeout = barrier.timeout().map(|t| t.as_millis() as u64);
    (timeout, barrier.wait().is_err_and(|e| e.is_timeout()))
}

#[test]
fn barrier_default_timeout_travels_with_the_handle() {
    let barrier = Barrier::builder(2)
        .timeout(Duration::from_millis(30))
        .build()
        .expect("barrier");
    let mut child = multiproc::spawn(barrier_timeout_in_child, (barrier,)).expect("spawn");
    assert_eq!(child.join_timeout(JOIN).expect("join"), (Some(30), true));
}

/// Waits once (no loop: a notify_n grant is the only way back besides the
/// timeout); `true` if notified.
#[process_fn]
fn wait_once(cond: Condition, arrived: Value<u32>, woken: Value<u32>) -> bool {
    let guard = cond.acquire().expect("not poisoned");
    arrived.fetch_add(1);
    let (_guard, result) = cond.wait_timeout(guard, JOIN).expect("not poisoned");
    if !result.timed_out() {
        woken.fetch_add(1);
    }
    !result.timed_out()
}

#[test]
fn condition_notify_n_wakes_at_most_n() {
    let cond = Condition::new().expect("condition");
    let arrived = Value::new(0u32).expect("value");
    let woken = Value::new(0u32).expect("value");
    let children: Vec<_> = (0..4)
        .map(|_| {
            multiproc::spawn(wait_once, (cond.clone(), arrived.clone(), woken.clone()))
                .expect("spawn")
        })
        .collect();
    eventually("four waiters", || arrived.load() == 4);
    {
        // Every waiter registered under the lock before it freed it.
        let _guard = cond.acquire().expect("not poisoned");
        assert_eq!(cond.notify_n(2), 2);
    }
    eventually("two woken", || woken.load() == 2);
    // The other two were not woken: they are still there to be notified.
    assert_eq!(cond.notify_all(), 2);
    for mut child in children {
        assert!(child.join_timeout(JOIN).expect("join"), "timed out instead");
    }
    assert_eq!(woken.load(), 4);
    assert_eq!(cond.notify_all(), 0, "nobody waits");
    assert!(!cond.notify());
}

#[process_fn]
fn wait_for_flag(cond: Condition, flag: Value<u32>, arrived: Value<u32>) -> bool {
    let guard = cond.acquire().expect("not poisoned");
    arrived.store(1);
    let (_guard, result) = cond
        .wait_timeout_while(guard, JOIN, || flag.load() == 0)
        .expect("not poisoned");
    !result.timed_out()
}

#[test]
fn condition_over_an_existing_lock_across_processes() {
    let lock = Lock::new().expect("lock");
    let cond = Condition::with_lock(lock.clone()).expect("condition");
    {
        let _guard = cond.acquire().expect("not poisoned");
        assert!(
            matches!(lock.try_acquire(), Err(TryLockError::WouldBlock)),
            "the condition holds the lock it was built over"
        );
    }
    assert!(lock.try_acquire().is_ok());
    let flag = Value::new(0u32).expect("value");
    let arrived = Value::new(0u32).expect("value");
    let mut child = multiproc::spawn(wait_for_flag, (cond.clone(), flag.clone(), arrived.clone()))
        .expect("spawn");
    eventually("the child waits", || arrived.load() == 1);
    {
        // The lock itself, taken directly: the waiter freed it.
        let _guard = lock.acquire_timeout(JOIN).expect("freed by wait");
        flag.store(1);
        cond.notify_all();
    }
    assert!(child.join_timeout(JOIN).expect("join"), "not woken");
}

#[test]
fn condition_over_an_rlock_frees_every_level_while_waiting() {
    let rlock = RLock::new().expect("rlock");
    let cond = Condition::with_lock(rlock.clone()).expect("condition");
    let flag = Value::new(0u32).expect("value");
    let outer = rlock.acquire().expect("outer");
    let guard = cond.acquire().expect("inner, re-entrant");
    std::thread::scope(|s| {
        s.spawn(|| {
            // Only possible while the main thread waits: it holds the
            // RLock twice otherwise.
            let _held = rlock.acquire_timeout(JOIN).expect("freed by wait");
            flag.store(1);
            cond.notify();
        });
        let (guard, result) = cond
            .wait_timeout_while(guard, JOIN, || flag.load() == 0)
            .expect("not poisoned");
        assert!(!result.timed_out());
        drop(guard);
    });
    // Both levels are back: still held by this thread once (outer).
    std::thread::scope(|s| {
        s.spawn(|| assert!(matches!(rlock.try_acquire(), Err(TryLockError::WouldBlock))));
    });
    drop(outer);
    std::thread::scope(|s| {
        s.spawn(|| assert!(rlock.try_acquire().is_ok()));
    });
}

#[test]
fn condition_wait_timeout_while_times_out_or_returns_at_once() {
    let cond = Condition::new().expect("condition");
    let guard = cond.acquire().expect("not poisoned");
    let (guard, result) = cond
        .wait_timeout_while(guard, Duration::from_millis(20), || true)
        .expect("not poisoned");
    assert!(result.timed_out());
    let mut calls = 0;
    let (_guard, result) = cond
        .wait_timeout_while(guard, JOIN, || {
            calls += 1;
            false
        })
        .expect("not poisoned");
    assert!(!result.timed_out());
    assert_eq!(calls, 1, "a false condition does not wait");
}
