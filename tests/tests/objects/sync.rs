//! Lock, RLock, Semaphore, Event, Condition and Barrier across real
//! processes, including holders and parties that are SIGKILLed.
//!
//! Every wait is bounded; nothing sleeps to synchronise.

use std::sync::TryLockError;
use std::time::{Duration, Instant};

use multiproc::shared::RawValue;
use multiproc::sync::{Barrier, BoundedSemaphore, Condition, Event, RLock, Semaphore};
use multiproc::{Error, Lock, Process, Value, process_fn};

const JOIN: Duration = Duration::from_secs(30);

fn join(p: &mut Process) {
    let status = p
        .join_timeout(JOIN)
        .expect("join")
        .expect("the child did not end in time");
    assert!(status.success(), "child failed: {status:?}");
}

/// Polls `f` until it holds, for at most 30 s (a bounded wait for a state
/// that another process reaches, not a sleep standing in for one).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + JOIN;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[process_fn]
fn locked_increments(lock: Lock, counter: RawValue<u64>, n: u32) {
    for _ in 0..n {
        let _guard = lock.acquire().expect("not poisoned");
        // A read-modify-write that loses updates unless the lock excludes.
        counter.set(counter.get() + 1);
    }
}

#[test]
fn lock_excludes_four_processes() {
    let lock = Lock::new().expect("lock");
    let counter = RawValue::new(0u64).expect("value");
    let mut procs: Vec<Process> = (0..4)
        .map(|_| Process::new(locked_increments, (lock.clone(), counter.clone(), 10_000)))
        .collect();
    for p in &mut procs {
        p.start().expect("start");
    }
    for p in &mut procs {
        join(p);
    }
    assert_eq!(counter.get(), 40_000);
    assert!(!lock.is_locked());
}

#[process_fn]
fn hold_forever(lock: Lock, held: Event) {
    let _guard = lock.acquire().expect("not poisoned");
    held.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn lock_holder_killed_parent_acquires_poisoned() {
    let lock = Lock::new().expect("lock");
    let held = Event::new().expect("event");
    let mut p = Process::new(hold_forever, (lock.clone(), held.clone()));
    p.start().expect("start");
    assert!(held.wait_timeout(JOIN), "the child never took the lock");
    assert!(matches!(lock.try_acquire(), Err(TryLockError::WouldBlock)));
    p.kill().expect("kill");
    // Not reaped yet on purpose: a zombie holder counts as dead too.
    match lock.acquire_timeout(Duration::from_secs(2)) {
        Err(TryLockError::Poisoned(poisoned)) => drop(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => {
            panic!("the lock of a killed holder was not recovered within 2 s")
        }
        Ok(_) => panic!("the takeover was not reported as poisoning"),
    }
    p.join_timeout(JOIN).expect("join").expect("reaped");
    // Poisoning persists until cleared, and `?` maps it to Error::Poisoned.
    assert!(lock.is_poisoned());
    let err = lock
        .acquire()
        .map(drop)
        .map_err(Error::from)
        .expect_err("still poisoned");
    assert!(matches!(err, Error::Poisoned), "{err}");
    lock.clear_poison();
    assert!(lock.acquire().is_ok());
}

#[process_fn]
fn set_event(event: Event) {
    event.set();
}

#[test]
fn event_set_by_child_wakes_parent() {
    let event = Event::new().expect("event");
    assert!(!event.is_set());
    let mut p = Process::new(set_event, (event.clone(),));
    p.start().expect("start");
    assert!(
        event.wait_timeout(JOIN),
        "the child's set() did not wake the parent"
    );
    assert!(event.is_set());
    join(&mut p);
    event.clear();
    assert!(!event.wait_timeout(Duration::from_millis(10)));
}

#[process_fn]
fn admitted(sem: Semaphore, inside: Value<u32>, most: Value<u32>, rounds: u32) {
    for _ in 0..rounds {
        assert!(
            sem.acquire_timeout(JOIN),
            "semaphore never admitted this process"
        );
        let now = inside.fetch_add(1) + 1;
        let mut seen = most.load();
        while now > seen {
            match most.compare_exchange(seen, now) {
                Ok(_) => break,
                Err(actual) => seen = actual,
            }
        }
        // Stay inside a little so that the others pile up at the door.
        std::thread::sleep(Duration::from_millis(2));
        inside.fetch_sub(1);
        sem.release().expect("release");
    }
}

#[test]
fn semaphore_of_two_admits_at_most_two_of_five() {
    let sem = Semaphore::new(2).expect("semaphore");
    let inside = Value::new(0u32).expect("value");
    let most = Value::new(0u32).expect("value");
    let mut procs: Vec<Process> = (0..5)
        .map(|_| Process::new(admitted, (sem.clone(), inside.clone(), most.clone(), 20)))
        .collect();
    for p in &mut procs {
        p.start().expect("start");
    }
    for p in &mut procs {
        join(p);
    }
    assert!(
        most.load() <= 2,
        "{} processes were inside at once",
        most.load()
    );
    assert!(most.load() >= 1);
    assert_eq!(inside.load(), 0);
    assert_eq!(sem.value(), 2);
}

#[test]
fn bounded_semaphore_refuses_release_past_its_bound() {
    let sem = BoundedSemaphore::new(2).expect("semaphore");
    assert!(sem.release().is_err());
    assert!(sem.try_acquire());
    sem.release().expect("back to the bound");
    assert!(matches!(sem.release(), Err(Error::Misuse { .. })));
    assert_eq!(sem.value(), 2);
}

#[process_fn]
fn barrier_party(barrier: Barrier, arrived: Value<u32>) -> (u32, bool) {
    arrived.fetch_add(1);
    let result = barrier.wait_timeout(JOIN).expect("barrier");
    // Nobody may pass before all three have arrived.
    (arrived.load(), result.is_leader())
}

#[test]
fn barrier_of_three_releases_three_processes_together() {
    let barrier = Barrier::new(3).expect("barrier");
    let arrived = Value::new(0u32).expect("value");
    let handles: Vec<_> = (0..3)
        .map(|_| {
            multiproc::spawn(barrier_party, (barrier.clone(), arrived.clone())).expect("spawn")
        })
        .collect();
    let results: Vec<(u32, bool)> = handles
        .into_iter()
        .map(|mut h| h.join_timeout(JOIN).expect("join"))
        .collect();
    assert!(results.iter().all(|(seen, _)| *seen == 3), "{results:?}");
    assert_eq!(
        results.iter().filter(|(_, leader)| *leader).count(),
        1,
        "{results:?}"
    );
    assert!(!barrier.is_broken());
}

#[process_fn]
fn wait_at_barrier(barrier: Barrier) -> String {
    match barrier.wait_timeout(JOIN) {
        Ok(_) => "passed".to_string(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn barrier_party_killed_breaks_it_for_the_others() {
    let barrier = Barrier::new(3).expect("barrier");
    let mut victim = Process::new(wait_at_barrier, (barrier.clone(),));
    victim.start().expect("start");
    eventually("the victim waits at the barrier", || {
        barrier.n_waiting() == 1
    });
    victim.kill().expect("kill");
    victim.join_timeout(JOIN).expect("join").expect("reaped");
    let err = barrier
        .wait_timeout(JOIN)
        .expect_err("a dead party must break the barrier");
    assert!(matches!(err, Error::BrokenBarrier), "{err}");
    assert!(barrier.is_broken());
    // A party arriving later is told at once instead of hanging.
    let mut late = multiproc::spawn(wait_at_barrier, (barrier.clone(),)).expect("spawn");
    assert_eq!(
        late.join_timeout(JOIN).expect("join"),
        Error::BrokenBarrier.to_string()
    );
}

#[test]
fn barrier_timeout_breaks_it() {
    let barrier = Barrier::new(2).expect("barrier");
    let err = barrier
        .wait_timeout(Duration::from_millis(20))
        .expect_err("alone");
    assert!(err.is_timeout(), "{err}");
    assert!(matches!(barrier.wait(), Err(Error::BrokenBarrier)));
}

#[process_fn]
fn rlock_twice_then_probe(rlock: RLock) -> bool {
    let outer = rlock.acquire().expect("first");
    let inner = rlock.acquire().expect("second, re-entrant");
    drop(inner);
    drop(outer);
    true
}

#[process_fn]
fn rlock_try(rlock: RLock) -> bool {
    rlock.try_acquire().is_ok()
}

#[test]
fn rlock_twice_in_one_process_and_excludes_others() {
    let rlock = RLock::new().expect("rlock");
    let mut child = multiproc::spawn(rlock_twice_then_probe, (rlock.clone(),)).expect("spawn");
    assert!(child.join_timeout(JOIN).expect("join"));
    let a = rlock.acquire().expect("a");
    let b = rlock.acquire().expect("b");
    drop(a);
    let mut other = multiproc::spawn(rlock_try, (rlock.clone(),)).expect("spawn");
    assert!(
        !other.join_timeout(JOIN).expect("join"),
        "held once more here: others must be excluded"
    );
    drop(b);
    let mut other = multiproc::spawn(rlock_try, (rlock.clone(),)).expect("spawn");
    assert!(
        other.join_timeout(JOIN).expect("join"),
        "released: others may take it"
    );
}

#[process_fn]
fn condition_waiter(cond: Condition, flag: Value<u32>, waiting: Event) -> bool {
    let mut guard = cond.acquire().expect("not poisoned");
    waiting.set();
    let deadline = Instant::now() + JOIN;
    while flag.load() == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (g, result) = cond.wait_timeout(guard, left).expect("not poisoned");
        guard = g;
        if result.timed_out() {
            return false;
        }
    }
    true
}

#[test]
fn condition_notify_wakes_a_waiting_process() {
    let cond = Condition::new().expect("condition");
    let flag = Value::new(0u32).expect("value");
    let waiting = Event::new().expect("event");
    let mut child = multiproc::spawn(
        condition_waiter,
        (cond.clone(), flag.clone(), waiting.clone()),
    )
    .expect("spawn");
    assert!(waiting.wait_timeout(JOIN));
    {
        // Granted only once the child sleeps in wait (which releases it).
        let _guard = cond.acquire().expect("not poisoned");
        flag.store(1);
        cond.notify();
    }
    assert!(
        child.join_timeout(JOIN).expect("join"),
        "the waiter was not woken by notify"
    );
}

#[test]
fn handles_are_clones_of_one_object() {
    let lock = Lock::new().expect("lock");
    let other = lock.clone();
    let guard = lock.acquire().expect("free");
    assert!(matches!(other.try_acquire(), Err(TryLockError::WouldBlock)));
    drop(guard);
    assert!(other.try_acquire().is_ok());
}

#[test]
fn bounded_semaphore_has_the_semaphore_methods_of_its_own() {
    let sem = BoundedSemaphore::new(2).expect("semaphore");
    assert_eq!(sem.value(), 2);
    sem.acquire();
    assert!(sem.try_acquire());
    assert!(!sem.try_acquire());
    assert!(!sem.acquire_timeout(Duration::from_millis(10)));
    sem.release().expect("one back");
    assert!(sem.acquire_timeout(JOIN));
    sem.release().expect("one back");
    sem.release().expect("both back");
    let err = sem.release().expect_err("past the bound");
    assert!(matches!(err, Error::Misuse { .. }), "{err}");
}

fn try_lock_then(lock: &Lock) -> multiproc::Result<()> {
    let _guard = lock.try_acquire()?;
    Ok(())
}

#[test]
fn a_busy_lock_under_question_mark_is_would_block_not_timeout() {
    let lock = Lock::new().expect("lock");
    let held = lock.acquire().expect("acquire");
    let err = try_lock_then(&lock).expect_err("held");
    assert!(matches!(err, Error::WouldBlock), "{err}");
    assert!(err.is_would_block() && !err.is_timeout());
    drop(held);
    try_lock_then(&lock).expect("free");
}

#[process_fn]
fn wait_untimed(cond: Condition, flag: Value<u32>, waiting: Event) -> (bool, bool) {
    let guard = cond.acquire().expect("not poisoned");
    waiting.set();
    // No timeout on purpose: the test bounds it by joining with one.
    match cond.wait_while(guard, || flag.load() == 0) {
        Ok(_guard) => (false, flag.load() == 1),
        Err(poisoned) => {
            drop(poisoned.into_inner());
            (true, flag.load() == 1)
        }
    }
}

#[process_fn]
fn notify_and_hold(cond: Condition, flag: Value<u32>, notified: Event) {
    let _guard = cond.acquire().expect("not poisoned");
    flag.store(1);
    cond.notify_all();
    notified.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A notify made under the condition's own lock wakes its waiter when the
/// lock is released; a notifier killed before releasing it does not leave
/// the waiter asleep: it wakes, takes the lock over and reports poisoning.
#[test]
fn condition_waiter_wakes_when_the_notifier_dies_holding_the_lock() {
    let cond = Condition::new().expect("condition");
    let flag = Value::new(0u32).expect("value");
    let (waiting, notified) = (Event::new().expect("event"), Event::new().expect("event"));
    let mut waiter = multiproc::spawn(wait_untimed, (cond.clone(), flag.clone(), waiting.clone()))
        .expect("spawn");
    assert!(waiting.wait_timeout(JOIN));
    // The notifier gets the lock only once the waiter sleeps in wait.
    let mut notifier = Process::new(
        notify_and_hold,
        (cond.clone(), flag.clone(), notified.clone()),
    );
    notifier.start().expect("start");
    assert!(notified.wait_timeout(JOIN), "the notifier never notified");
    notifier.kill().expect("kill");
    let (poisoned, saw_flag) = waiter
        .join_timeout(JOIN)
        .expect("the waiter was left asleep");
    assert!(saw_flag, "woken before the flag was set");
    assert!(poisoned, "the takeover from the dead notifier is reported");
    notifier.join_timeout(JOIN).expect("join").expect("reaped");
}
