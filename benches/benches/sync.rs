//! Locks, shared values and wake-ups, against a bare futex lock and
//! CPython's multiprocessing (run by `benches/python/sync_bench.py` at the
//! end, in the same run).
//!
//! `cargo bench -p multiproc-benches --bench sync`
//!
//! Cross-process figures use `iter_custom`: the processes are started and
//! synchronised on a Barrier before the clock starts, so process start-up
//! is not counted.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use multiproc::sync::{Barrier, Condition, Event};
use multiproc::{Lock, Value, process_fn};

/// The floor: a futex-style lock word with no owner identity and no poison
/// check (uncontended: one CAS to take, one swap to release).
fn bare_futex_lock(word: &AtomicU32) {
    while word
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::hint::spin_loop();
    }
    // A real futex lock would wake a sleeper if this says contended.
    black_box(word.swap(0, Ordering::Release));
}

fn uncontended(c: &mut Criterion) {
    let mut g = c.benchmark_group("uncontended acquire+release");
    let word = AtomicU32::new(0);
    g.bench_function("bare futex word", |b| {
        b.iter(|| bare_futex_lock(black_box(&word)))
    });
    let lock = Lock::new().expect("lock");
    g.bench_function("multiproc Lock", |b| {
        b.iter(|| drop(black_box(&lock).acquire()))
    });
    let mutex = std::sync::Mutex::new(());
    g.bench_function("std Mutex (one process)", |b| {
        b.iter(|| drop(black_box(&mutex).lock()))
    });
    g.finish();
}

#[process_fn]
fn add_locked(v: Value<i64>, start: Barrier, n: u64) -> u64 {
    start.wait().expect("barrier");
    let t = Instant::now();
    for _ in 0..n {
        *v.lock().expect("not poisoned") += 1;
    }
    t.elapsed().as_nanos() as u64
}

#[process_fn]
fn add_atomic(v: Value<i64>, start: Barrier, n: u64) -> u64 {
    start.wait().expect("barrier");
    let t = Instant::now();
    for _ in 0..n {
        v.fetch_add(1);
    }
    t.elapsed().as_nanos() as u64
}

/// Two processes share `iters` increments; the time is the slower one's.
fn two_process_increments(iters: u64, atomic: bool) -> Duration {
    let v = Value::new(0i64).expect("value");
    let start = Barrier::new(2).expect("barrier");
    let half = iters.div_ceil(2);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let args = (v.clone(), start.clone(), half);
            if atomic {
                multiproc::spawn(add_atomic, args).expect("spawn")
            } else {
                multiproc::spawn(add_locked, args).expect("spawn")
            }
        })
        .collect();
    let ns = handles
        .into_iter()
        .map(|mut h| h.join_timeout(Duration::from_secs(120)).expect("join"))
        .max()
        .unwrap_or(0);
    assert_eq!(v.get(), 2 * half as i64);
    Duration::from_nanos(ns)
}

fn shared_counter(c: &mut Criterion) {
    let mut g = c.benchmark_group("Value<i64> += 1, 2 processes (per increment)");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function("under its lock", |b| {
        b.iter_custom(|iters| two_process_increments(iters, false))
    });
    g.bench_function("fetch_add", |b| {
        b.iter_custom(|iters| two_process_increments(iters, true))
    });
    // The reference: std's Mutex, two threads of one process, same work.
    g.bench_function("std Mutex, 2 threads (reference)", |b| {
        b.iter_custom(two_thread_std_mutex_increments)
    });
    g.finish();
}

/// `iters` increments split over two threads under one `std::sync::Mutex`.
fn two_thread_std_mutex_increments(iters: u64) -> Duration {
    let counter = std::sync::Arc::new(std::sync::Mutex::new(0i64));
    let half = iters / 2;
    let start = std::time::Instant::now();
    let threads: Vec<_> = [half, iters - half]
        .into_iter()
        .map(|n| {
            let counter = std::sync::Arc::clone(&counter);
            std::thread::spawn(move || {
                for _ in 0..n {
                    *counter.lock().expect("not poisoned") += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let elapsed = start.elapsed();
    assert_eq!(*counter.lock().expect("not poisoned"), iters as i64);
    elapsed
}

#[process_fn]
fn event_echo(ping: Event, pong: Event, rounds: u64) {
    for _ in 0..rounds {
        ping.wait();
        ping.clear();
        pong.set();
    }
}

#[process_fn]
fn condition_echo(cond: Condition, turn: Value<u32>, rounds: u64) {
    for _ in 0..rounds {
        let g = cond.acquire().expect("not poisoned");
        let _g = cond
            .wait_while(g, || turn.load() == 0)
            .expect("not poisoned");
        turn.store(0);
        cond.notify_all();
    }
}

/// One round trip = two wake-ups between processes.
fn event_round_trips(iters: u64) -> Duration {
    let (ping, pong) = (Event::new().expect("event"), Event::new().expect("event"));
    let mut child =
        multiproc::spawn(event_echo, (ping.clone(), pong.clone(), iters + 1)).expect("spawn");
    let round = || {
        ping.set();
        assert!(pong.wait_timeout(Duration::from_secs(60)));
        pong.clear();
    };
    round(); // the child has started
    let t = Instant::now();
    for _ in 0..iters {
        round();
    }
    let elapsed = t.elapsed();
    child.join_timeout(Duration::from_secs(60)).expect("join");
    elapsed
}

fn condition_round_trips(iters: u64) -> Duration {
    let cond = Condition::new().expect("condition");
    let turn = Value::new(0u32).expect("value");
    let mut child =
        multiproc::spawn(condition_echo, (cond.clone(), turn.clone(), iters + 1)).expect("spawn");
    let round = || {
        let g = cond.acquire().expect("not poisoned");
        turn.store(1);
        cond.notify_all();
        drop(
            cond.wait_while(g, || turn.load() == 1)
                .expect("not poisoned"),
        );
    };
    round();
    let t = Instant::now();
    for _ in 0..iters {
        round();
    }
    let elapsed = t.elapsed();
    child.join_timeout(Duration::from_secs(60)).expect("join");
    elapsed
}

fn wake_latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("ping-pong round trip between 2 processes");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("Event", |b| b.iter_custom(event_round_trips));
    g.bench_function("Condition", |b| b.iter_custom(condition_round_trips));
    g.finish();
}

fn creation(c: &mut Criterion) {
    let mut g = c.benchmark_group("create + drop");
    g.bench_function("Lock", |b| {
        b.iter(|| drop(black_box(Lock::new().expect("lock"))))
    });
    g.bench_function("Value<u64>", |b| {
        b.iter(|| drop(black_box(Value::new(7u64).expect("value"))))
    });
    g.bench_function("Event", |b| {
        b.iter(|| drop(black_box(Event::new().expect("event"))))
    });
    g.finish();
}

fn cpython(_: &mut Criterion) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/sync_bench.py");
    println!("\nCPython multiprocessing, same run ({script}):");
    match std::process::Command::new("python3").arg(script).output() {
        Ok(out) if out.status.success() => print!("{}", String::from_utf8_lossy(&out.stdout)),
        Ok(out) => println!("  failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => println!("  python3 not available: {e}"),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = uncontended, creation, shared_counter, wake_latency, cpython
}
criterion_main!(benches);
