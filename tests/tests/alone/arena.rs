//! Issue 10: small shared objects live in cells of shared arenas, so a
//! process holds 100 000 Locks and 100 000 Values in a few descriptors,
//! and each still travels to other processes (as a process argument or on
//! a queue) as the same memory.

use std::time::Duration;

use multiproc::sync::{Barrier, Condition, Event, RLock, Semaphore};
use multiproc::{Lock, Process, Queue, Value, process_fn};

const JOIN: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(30);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn join(p: &mut Process) {
    let status = p
        .join_timeout(JOIN)
        .expect("join")
        .expect("the child did not end in time");
    assert!(status.success(), "child failed: {status:?}");
}

/// Writes `values[i] = tag + i`, takes every lock, says so and holds them
/// until told to let go.
#[process_fn]
fn hold_and_write(locks: Vec<Lock>, values: Vec<Value<u64>>, tag: u64, held: Event, go: Event) {
    for (i, v) in values.iter().enumerate() {
        v.store(tag + i as u64);
    }
    let guards: Vec<_> = locks
        .iter()
        .map(|l| l.acquire().expect("not poisoned"))
        .collect();
    held.set();
    assert!(go.wait_timeout(WAIT), "never told to let go");
    drop(guards);
}

/// As [`hold_and_write`], the objects taken from a queue.
#[process_fn]
fn hold_and_write_from(queue: Queue<(Lock, Value<u64>)>, n: u32, tag: u64, held: Event, go: Event) {
    let (locks, values): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| queue.get_timeout(WAIT).expect("an item"))
        .unzip();
    for (i, v) in values.iter().enumerate() {
        v.store(tag + i as u64);
    }
    let guards: Vec<_> = locks
        .iter()
        .map(|l| l.acquire().expect("not poisoned"))
        .collect();
    held.set();
    assert!(go.wait_timeout(WAIT), "never told to let go");
    drop(guards);
}

/// Checks that the child saw the parent's objects: the values it wrote,
/// the locks it holds (then released).
fn check_child(
    mut child: Process,
    locks: &[Lock],
    values: &[Value<u64>],
    tag: u64,
    held: &Event,
    go: &Event,
) {
    assert!(held.wait_timeout(WAIT), "the child never held the locks");
    for (i, (l, v)) in locks.iter().zip(values).enumerate() {
        assert!(l.is_locked(), "lock {i} is not held in the parent's view");
        assert!(
            l.try_acquire().is_err(),
            "lock {i} taken while the child holds it"
        );
        assert_eq!(v.load(), tag + i as u64, "value {i}");
    }
    go.set();
    join(&mut child);
    for l in locks {
        assert!(!l.is_locked());
    }
}

#[test]
fn a_hundred_thousand_locks_and_values_in_a_few_descriptors_each_passable() {
    let _alone = multiproc_tests::alone();
    let before = open_fds();
    let locks: Vec<Lock> = (0..100_000).map(|_| Lock::new().expect("lock")).collect();
    let values: Vec<Value<u64>> = (0..100_000u64)
        .map(|i| Value::new(i).expect("value"))
        .collect();
    let after = open_fds();
    eprintln!(
        "100 000 Locks + 100 000 Value<u64>: {} descriptors",
        after - before
    );
    assert!(after - before <= 64, "{} descriptors", after - before);
    assert!(values.iter().enumerate().all(|(i, v)| v.load() == i as u64));

    // Every 1000th, as process arguments.
    let sample_locks: Vec<Lock> = locks.iter().step_by(1000).cloned().collect();
    let sample_values: Vec<Value<u64>> = values.iter().step_by(1000).cloned().collect();
    let (held, go) = (Event::new().expect("event"), Event::new().expect("event"));
    let mut child = Process::new(
        hold_and_write,
        (
            sample_locks.clone(),
            sample_values.clone(),
            1 << 40,
            held.clone(),
            go.clone(),
        ),
    );
    child.start().expect("start");
    check_child(child, &sample_locks, &sample_values, 1 << 40, &held, &go);

    drop((sample_locks, sample_values, held, go));

    // Every 1000th from 500 on, on a queue.
    let sample_locks: Vec<Lock> = locks.iter().skip(500).step_by(1000).cloned().collect();
    let sample_values: Vec<Value<u64>> = values.iter().skip(500).step_by(1000).cloned().collect();
    let queue = Queue::new().expect("queue");
    let (held, go) = (Event::new().expect("event"), Event::new().expect("event"));
    let mut child = Process::new(
        hold_and_write_from,
        (
            queue.clone(),
            sample_locks.len() as u32,
            1 << 41,
            held.clone(),
            go.clone(),
        ),
    );
    child.start().expect("start");
    for pair in sample_locks
        .iter()
        .cloned()
        .zip(sample_values.iter().cloned())
    {
        queue.put(pair).expect("put");
    }
    check_child(child, &sample_locks, &sample_values, 1 << 41, &held, &go);
    // The untouched objects are as they were.
    assert_eq!(values[1].load(), 1);
    assert!(!locks[1].is_locked());
    drop((locks, values, sample_locks, sample_values, queue, held, go));
    // The arenas are unmapped with their last objects, but the current
    // one of the class, kept for the next objects.
    let left = open_fds();
    assert!(left <= before + 1, "{} descriptors left", left - before);
}

#[process_fn]
fn use_the_others(
    events: Vec<Event>,
    conditions: Vec<Condition>,
    semaphores: Vec<Semaphore>,
    rlocks: Vec<RLock>,
    barriers: Vec<Barrier>,
    held: Event,
    go: Event,
) {
    for e in &events {
        e.set();
    }
    for c in &conditions {
        c.notify_all();
    }
    for s in &semaphores {
        assert!(s.acquire_timeout(WAIT));
    }
    let guards: Vec<_> = rlocks
        .iter()
        .map(|r| r.acquire().expect("not poisoned"))
        .collect();
    for b in &barriers {
        b.wait_timeout(WAIT).expect("barrier");
    }
    held.set();
    assert!(go.wait_timeout(WAIT), "never told to let go");
    drop(guards);
}

#[test]
fn events_conditions_semaphores_rlocks_and_barriers_share_arenas_too() {
    let _alone = multiproc_tests::alone();
    let before = open_fds();
    let n = 5000;
    let events: Vec<Event> = (0..n).map(|_| Event::new().expect("event")).collect();
    let conditions: Vec<Condition> = (0..n).map(|_| Condition::new().expect("cond")).collect();
    let semaphores: Vec<Semaphore> = (0..n).map(|_| Semaphore::new(1).expect("sem")).collect();
    let rlocks: Vec<RLock> = (0..n).map(|_| RLock::new().expect("rlock")).collect();
    let barriers: Vec<Barrier> = (0..n).map(|_| Barrier::new(2).expect("barrier")).collect();
    let after = open_fds();
    eprintln!("5 x 5000 other primitives: {} descriptors", after - before);
    assert!(after - before <= 16, "{} descriptors", after - before);

    let pick = |i: &usize| i % 500 == 7;
    fn sample<T: Clone>(all: &[T], pick: impl Fn(&usize) -> bool) -> Vec<T> {
        all.iter()
            .enumerate()
            .filter(|(i, _)| pick(i))
            .map(|(_, x)| x.clone())
            .collect()
    }
    let (e, c, s, r, b) = (
        sample(&events, pick),
        sample(&conditions, pick),
        sample(&semaphores, pick),
        sample(&rlocks, pick),
        sample(&barriers, pick),
    );
    let (held, go) = (Event::new().expect("event"), Event::new().expect("event"));
    let mut child = Process::new(
        use_the_others,
        (
            e.clone(),
            c,
            s.clone(),
            r.clone(),
            b.clone(),
            held.clone(),
            go.clone(),
        ),
    );
    child.start().expect("start");
    for barrier in &b {
        barrier.wait_timeout(WAIT).expect("barrier");
    }
    assert!(held.wait_timeout(WAIT), "the child never got there");
    assert!(e.iter().all(Event::is_set));
    assert!(!events[8].is_set(), "an event not sent is untouched");
    assert!(s.iter().all(|s| s.value() == 0));
    assert_eq!(semaphores[8].value(), 1);
    for rlock in &r {
        assert!(rlock.try_acquire().is_err(), "an RLock the child holds");
    }
    assert!(rlocks[8].try_acquire().is_ok());
    go.set();
    join(&mut child);
    for rlock in &r {
        assert!(rlock.try_acquire().is_ok());
    }
}

#[process_fn]
fn make_and_send(queue: Queue<(Lock, Value<u64>)>, n: u32, sent: Event) {
    for i in 0..n {
        let lock = Lock::new().expect("lock");
        let value = Value::new(u64::from(i)).expect("value");
        if i % 2 == 0 {
            // Held by the creator when it dies: the parent takes it over.
            std::mem::forget(lock.acquire().expect("not poisoned"));
        }
        queue.put((lock, value)).expect("put");
    }
    sent.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn objects_outlive_the_killed_process_that_made_them() {
    let _alone = multiproc_tests::alone();
    let queue = Queue::new().expect("queue");
    let sent = Event::new().expect("event");
    let mut child = Process::new(make_and_send, (queue.clone(), 10u32, sent.clone()));
    child.start().expect("start");
    let got: Vec<(Lock, Value<u64>)> = (0..10)
        .map(|_| queue.get_timeout(WAIT).expect("an item"))
        .collect();
    assert!(sent.wait_timeout(WAIT));
    child.kill().expect("kill");
    let status = child.join_timeout(JOIN).expect("join").expect("ended");
    assert!(!status.success());
    for (i, (lock, value)) in got.iter().enumerate() {
        assert_eq!(value.load(), i as u64);
        if i % 2 == 0 {
            // The dead creator held it: taken over, poisoned.
            let guard = lock.acquire_timeout(WAIT);
            assert!(
                matches!(guard, Err(std::sync::TryLockError::Poisoned(_))),
                "lock {i}: {guard:?}"
            );
        } else {
            drop(lock.acquire().expect("not poisoned"));
        }
        value.fetch_add(1);
        assert_eq!(value.load(), i as u64 + 1);
    }
    // Objects made here still come from this process's own arenas, and a
    // new object never lands on a received one.
    let mine = Value::new(99u64).expect("value");
    assert!(got.iter().all(|(_, v)| v.load() != 99));
    assert_eq!(mine.load(), 99);
}
