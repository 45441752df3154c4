//! The Pool on MPI ranks (feature `mpi`). `.ci/run` runs this binary under
//! `mpirun -n 3 --oversubscribe`: rank 0 runs the test harness, ranks 1
//! and 2 serve the pools. Run without a launcher, every test checks the
//! same results on the local pool (the same program, unchanged), and
//! `a_dead_rank_ends_the_job_with_an_error` starts a job of its own.
#![cfg(feature = "mpi")]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multiproc::{Error, Lock, Pool, process_fn};

const LONG: Duration = Duration::from_secs(60);

/// This binary was started by an MPI launcher with serving ranks.
fn under_mpi() -> bool {
    std::env::var("OMPI_COMM_WORLD_SIZE")
        .or_else(|_| std::env::var("PMI_SIZE"))
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n > 1)
}

fn pool() -> Pool {
    let pool = Pool::builder().mpi().build().expect("pool");
    if under_mpi() {
        // Two serving ranks, each with its local workers (1 on this
        // 2-core machine with 3 ranks, unless the variable says more).
        let per_rank = std::env::var("MULTIPROC_MPI_WORKERS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(1);
        assert_eq!(pool.processes(), 2 * per_rank);
    }
    pool
}

#[process_fn]
fn cube(x: u64) -> u64 {
    x * x * x
}

#[process_fn]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// The MPI rank a task ran on (`None` off MPI), as OpenMPI's launcher or
/// MPICH's Hydra tells it.
#[process_fn]
fn rank_of(_x: u64) -> Option<u32> {
    std::env::var("OMPI_COMM_WORLD_RANK")
        .or_else(|_| std::env::var("PMI_RANK"))
        .ok()
        .and_then(|r| r.parse().ok())
}

#[process_fn]
fn fail_on(x: u64, bad: u64) -> u64 {
    if x == bad {
        panic!("item {x} is bad");
    }
    x
}

#[process_fn]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[process_fn]
fn holds_lock(_lock: Lock, x: u64) -> u64 {
    x
}

static SEED: AtomicU64 = AtomicU64::new(0);

#[process_fn]
fn set_seed(seed: u64) {
    SEED.store(seed, Ordering::SeqCst);
}

#[process_fn]
fn seeded(x: u64) -> u64 {
    SEED.load(Ordering::SeqCst) + x
}

#[process_fn]
fn raise_sigkill(_x: u64) -> u64 {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    0
}

#[test]
fn map_and_map_chunked_give_the_local_results_in_order() {
    let pool = pool();
    let expect: Vec<u64> = (0..20_000u64).map(|x| x * x * x).collect();
    assert_eq!(pool.map(cube, 0..20_000u64).expect("map"), expect);
    assert_eq!(
        pool.map_chunked(cube, 0..20_000u64, 7)
            .expect("map_chunked"),
        expect
    );
    assert_eq!(pool.map(cube, Vec::<u64>::new()).expect("empty"), vec![]);
}

#[process_fn]
fn reversed(bytes: Vec<u8>) -> Vec<u8> {
    bytes.into_iter().rev().collect()
}

static BLOB: AtomicU64 = AtomicU64::new(0);

#[process_fn]
fn keep_blob_sum(blob: Vec<u8>) {
    BLOB.store(blob.iter().map(|&b| u64::from(b)).sum(), Ordering::SeqCst);
}

#[process_fn]
fn blob_sum(x: u64) -> u64 {
    BLOB.load(Ordering::SeqCst) + x
}

/// Frames larger than the receive each side keeps posted (64 KiB) travel
/// as an announcement and a second message: chunks and results of a
/// large map, a large argument and result, and a large start (the
/// initializer's arguments).
#[test]
fn large_chunks_results_and_starts_travel_whole() {
    let pool = pool();
    let expect: Vec<u64> = (0..300_000u64).map(|x| x * x * x).collect();
    assert_eq!(pool.map(cube, 0..300_000u64).expect("map"), expect);
    let bytes: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let back = pool.apply(reversed, (bytes.clone(),)).expect("apply");
    assert_eq!(back.len(), bytes.len());
    assert!(back.iter().rev().eq(bytes.iter()));

    let blob = vec![3u8; 200_000];
    let pool = Pool::builder()
        .mpi()
        .initializer(keep_blob_sum, (blob,))
        .build()
        .expect("pool");
    assert_eq!(
        pool.map_chunked(blob_sum, 0..8u64, 1).expect("map"),
        (600_000..600_008).collect::<Vec<u64>>()
    );
}

#[test]
fn tasks_run_on_the_serving_ranks() {
    let pool = pool();
    let ranks: HashSet<Option<u32>> = pool
        .map_chunked(rank_of, 0..64u64, 1)
        .expect("map")
        .into_iter()
        .collect();
    if under_mpi() {
        assert!(
            ranks.iter().all(|r| matches!(r, Some(1 | 2))),
            "ran on {ranks:?}"
        );
        assert!(!pool.worker_pids().contains(&std::process::id()));
    } else {
        assert_eq!(ranks, HashSet::from([None]));
    }
}

#[test]
fn starmap_apply_and_apply_async() {
    let pool = pool();
    let pairs: Vec<(u64, u64)> = (0..500).map(|i| (i, 2 * i)).collect();
    assert_eq!(
        pool.starmap(add, pairs).expect("starmap"),
        (0..500).map(|i| 3 * i).collect::<Vec<u64>>()
    );
    assert_eq!(pool.apply(add, (40, 2)).expect("apply"), 42);
    let mut pending: Vec<_> = (0..10u64)
        .map(|i| pool.apply_async(cube, (i,)).expect("apply_async"))
        .collect();
    for (i, result) in pending.iter_mut().enumerate() {
        let i = i as u64;
        assert_eq!(result.get_timeout(LONG).expect("result"), i * i * i);
    }
}

#[test]
fn imap_keeps_order_and_imap_unordered_gives_every_result() {
    let pool = pool();
    let ordered: Vec<u64> = pool
        .imap(cube, 0..300u64)
        .expect("imap")
        .collect::<Result<_, _>>()
        .expect("results");
    assert_eq!(ordered, (0..300u64).map(|x| x * x * x).collect::<Vec<_>>());
    // An endless input, read lazily.
    let first: Vec<u64> = pool
        .imap_chunked(cube, 0.., 3)
        .expect("imap_chunked")
        .take(10)
        .collect::<Result<_, _>>()
        .expect("results");
    assert_eq!(first, (0..10u64).map(|x| x * x * x).collect::<Vec<_>>());
    let mut unordered: Vec<u64> = pool
        .imap_unordered(sleep_ms, [30u64, 0, 20, 0, 10, 0])
        .expect("imap_unordered")
        .collect::<Result<_, _>>()
        .expect("results");
    unordered.sort_unstable();
    assert_eq!(unordered, vec![0, 0, 0, 10, 20, 30]);
}

#[test]
fn a_panicking_task_fails_alone_with_its_message() {
    let pool = pool();
    let err = pool
        .starmap(fail_on, (0..100u64).map(|x| (x, 37)))
        .expect_err("item 37 panics");
    match &err {
        Error::Panicked { message, item, .. } => {
            assert!(message.contains("item 37 is bad"), "{message}");
            assert_eq!(*item, Some(37));
        }
        other => panic!("expected Panicked, got {other}"),
    }
    // The rank serves on.
    assert_eq!(pool.apply(fail_on, (5, 37)).expect("after the panic"), 5);
    let err = pool.apply(fail_on, (37, 37)).expect_err("apply panics");
    assert_eq!(
        err.panic_message().map(|m| m.contains("item 37 is bad")),
        Some(true)
    );
}

#[test]
fn a_task_carrying_a_handle_names_it_and_is_not_sent() {
    let pool = pool();
    let lock = Lock::new().expect("lock");
    let outcome = pool.apply(holds_lock, (lock, 7));
    if under_mpi() {
        let err = outcome.expect_err("a Lock cannot go to another rank");
        assert!(matches!(err, Error::Encode { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("Lock") && text.contains("MPI rank"), "{text}");
    } else {
        assert_eq!(outcome.expect("a local pool takes handles"), 7);
    }
    // Plain data still goes.
    assert_eq!(pool.apply(cube, (3,)).expect("cube"), 27);
}

#[process_fn]
fn make_lock(_x: u64) -> Lock {
    Lock::new().expect("lock")
}

#[test]
fn a_result_carrying_a_handle_fails_with_its_name() {
    let pool = pool();
    let outcome = pool.apply(make_lock, (1,));
    if under_mpi() {
        let text = outcome
            .expect_err("a Lock cannot come back from another rank")
            .to_string();
        assert!(text.contains("Lock") && text.contains("MPI rank"), "{text}");
    } else {
        drop(outcome.expect("a local pool returns handles"));
    }
    assert_eq!(pool.apply(cube, (4,)).expect("cube"), 64);
}

#[test]
fn chunked_variants_and_callbacks_match_the_local_pool() {
    let pool = pool();
    let pairs: Vec<(u64, u64)> = (0..300).map(|i| (i, i)).collect();
    assert_eq!(
        pool.starmap_chunked(add, pairs, 11)
            .expect("starmap_chunked"),
        (0..300).map(|i| 2 * i).collect::<Vec<u64>>()
    );
    let mut unordered: Vec<u64> = pool
        .imap_unordered_chunked(cube, 0..100u64, 9)
        .expect("imap_unordered_chunked")
        .collect::<Result<_, _>>()
        .expect("results");
    unordered.sort_unstable();
    assert_eq!(
        unordered,
        (0..100u64).map(|x| x * x * x).collect::<Vec<_>>()
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let mut result = pool
        .apply_async(cube, (5,))
        .expect("apply_async")
        .callback(move |v| {
            let _ = tx.send(*v);
        });
    assert_eq!(result.get_timeout(LONG).expect("result"), 125);
    assert_eq!(rx.recv_timeout(LONG).expect("the callback ran"), 125);
}

#[test]
fn the_initializer_runs_on_every_rank_and_task_limits_renew_it() {
    let pool = Pool::builder()
        .mpi()
        .initializer(set_seed, (1000,))
        .max_tasks_per_child(2)
        .build()
        .expect("pool");
    assert_eq!(
        pool.map_chunked(seeded, 0..40u64, 1).expect("map"),
        (1000..1040).collect::<Vec<u64>>()
    );
}

#[test]
fn terminate_with_work_running_then_a_new_pool_serves() {
    {
        let pool = pool();
        let _pending = pool.map_async(sleep_ms, [200u64; 6]).expect("map_async");
        pool.terminate();
        assert!(matches!(pool.apply(cube, (2,)), Err(Error::Closed)));
    }
    let pool = pool();
    assert_eq!(pool.map(cube, 0..4u64).expect("map"), vec![0, 1, 8, 27]);
    pool.close();
    pool.join().expect("join");
}

/// What `apply` and `apply_async` (whose task always goes through the
/// pool's queue) give for `f(args)`, as text (the value or the error).
macro_rules! both_ways {
    ($pool:expr, $f:expr, $args:expr) => {{
        let alone = format!("{:?}", $pool.apply($f, $args));
        let queued = $pool
            .apply_async($f, $args)
            .and_then(|mut r| r.get_timeout(LONG));
        (alone, format!("{queued:?}"))
    }};
}

#[process_fn]
fn zeros(n: usize) -> Vec<u8> {
    vec![0; n]
}

#[test]
fn apply_on_a_free_rank_gives_what_a_queued_task_gives() {
    let pool = pool();
    // Every rank has answered its start: later applies find them free.
    assert_eq!(pool.map(cube, 0..8u64).expect("map").len(), 8);
    for i in 0..300u64 {
        assert_eq!(pool.apply(add, (i, 1)).expect("apply"), i + 1);
    }
    let (alone, queued) = both_ways!(pool, fail_on, (37u64, 37u64));
    assert!(alone.contains("item 37 is bad"), "{alone}");
    // The same error (the pid may differ: another rank may have run it).
    let no_pid = |s: &str| s.split("pid").next().unwrap_or("").to_string();
    assert_eq!(no_pid(&alone), no_pid(&queued));
    let (alone, queued) = both_ways!(pool, make_lock, (1u64,));
    assert_eq!(alone.starts_with("Ok"), !under_mpi(), "{alone}");
    if under_mpi() {
        assert_eq!(no_pid(&alone), no_pid(&queued));
    }
    // Not sent at all: the argument cannot travel.
    let lock = Lock::new().expect("lock");
    let alone = pool.apply(holds_lock, (lock.clone(), 7));
    let queued = pool
        .apply_async(holds_lock, (lock, 7))
        .and_then(|mut r| r.get_timeout(LONG));
    assert_eq!(format!("{alone:?}"), format!("{queued:?}"));
    // A large argument and result travel as on the queued path.
    let blob: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let mut expect = blob.clone();
    expect.reverse();
    assert_eq!(pool.apply(reversed, (blob,)).expect("large"), expect);
    // A small task's large result.
    assert_eq!(
        pool.apply(zeros, (300_000,)).expect("large result"),
        vec![0u8; 300_000]
    );
    assert_eq!(pool.apply(cube, (5,)).expect("after"), 125);
}

#[test]
fn apply_while_a_map_runs_and_from_several_threads() {
    let pool = pool();
    assert_eq!(pool.map(cube, 0..8u64).expect("map").len(), 8);
    // A map's answers arrive while applies wait for theirs (and go to
    // the map), on two threads at once.
    let running = pool
        .map_async_chunked(sleep_ms, vec![1u64; 60], 1)
        .expect("map_async");
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let pool = &pool;
                scope.spawn(move || {
                    for i in 0..300u64 {
                        let x = t * 1000 + i;
                        assert_eq!(pool.apply(cube, (x,)).expect("apply"), x * x * x);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("an applying thread");
        }
    });
    assert_eq!(running.get().expect("the map"), vec![1u64; 60]);
    // A task longer than a spin hands its answer over to whoever makes
    // the calls; another thread's applies go on meanwhile.
    std::thread::scope(|scope| {
        let long = scope.spawn(|| pool.apply(sleep_ms, (30,)));
        for i in 0..100u64 {
            assert_eq!(pool.apply(add, (i, i)).expect("apply"), 2 * i);
        }
        assert_eq!(long.join().expect("the long apply").expect("slept"), 30);
    });
}

/// A result whose reading panics (on the caller's side).
#[derive(Debug, serde::Serialize)]
struct Fragile(u64);

impl<'de> serde::Deserialize<'de> for Fragile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fragile, D::Error> {
        let x = <u64 as serde::Deserialize>::deserialize(d)?;
        panic!("Fragile({x}) cannot be read");
    }
}

#[process_fn]
fn fragile(x: u64) -> Fragile {
    Fragile(x)
}

#[test]
fn a_result_that_panics_as_it_is_read_leaves_the_pool_whole() {
    let pool = pool();
    assert_eq!(pool.map(cube, 0..8u64).expect("map").len(), 8);
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.apply(fragile, (7,))));
    assert!(read.is_err(), "the reading panicked in the caller");
    assert_eq!(pool.apply(cube, (2,)).expect("after"), 8);
    // No worker is left counted busy.
    pool.close();
    pool.join().expect("join");
}

/// Creates the file `path` (the task has started), then sleeps `ms`.
#[process_fn]
fn mark_then_sleep(path: String, ms: u64) -> u64 {
    let _ = std::fs::write(&path, b"started");
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[test]
fn terminate_during_a_long_apply_ends_it() {
    {
        let pool = pool();
        assert_eq!(pool.map(cube, 0..8u64).expect("map").len(), 8);
        let mark =
            std::env::temp_dir().join(format!("multiproc-mpi-test-{}-started", std::process::id()));
        let _ = std::fs::remove_file(&mark);
        std::thread::scope(|scope| {
            let pool = &pool;
            let path = mark.to_string_lossy().into_owned();
            let long = scope.spawn(move || pool.apply(mark_then_sleep, (path, 500)));
            // The task runs (its apply waits for the answer) when the
            // mark exists.
            let started = Instant::now();
            while !mark.exists() && started.elapsed() < LONG {
                std::thread::sleep(Duration::from_millis(1));
            }
            pool.terminate();
            let outcome = long.join().expect("the apply returned");
            assert!(
                matches!(outcome, Err(Error::Closed) | Ok(500)),
                "{outcome:?}"
            );
        });
        let _ = std::fs::remove_file(&mark);
        assert!(matches!(pool.apply(cube, (2,)), Err(Error::Closed)));
    }
    let pool = pool();
    assert_eq!(pool.apply(cube, (3,)).expect("a new pool"), 27);
}

/// Started by `a_dead_rank_ends_the_job_with_an_error` under `mpirun`:
/// a task kills its rank.
#[test]
#[ignore = "runs as rank 0 of a job that a_dead_rank_ends_the_job_with_an_error starts"]
fn helper_a_task_kills_its_rank() {
    let pool = pool();
    let _ = pool.map_chunked(raise_sigkill, 0..4u64, 1);
    // The launcher ends the job before this line is reached.
    std::thread::sleep(LONG);
}

/// As `helper_a_task_kills_its_rank`, with `apply` on a free rank.
#[test]
#[ignore = "runs as rank 0 of a job that a_dead_rank_ends_the_job_with_an_error starts"]
fn helper_an_apply_kills_its_rank() {
    let pool = pool();
    assert_eq!(pool.map(cube, 0..8u64).expect("map").len(), 8);
    let _ = pool.apply(raise_sigkill, (0,));
    // The launcher ends the job before this line is reached.
    std::thread::sleep(LONG);
}

/// What MPI's fault model allows: a rank that dies ends the whole job
/// (the launcher kills every rank and reports which one died), never a
/// hang.
#[test]
fn a_dead_rank_ends_the_job_with_an_error() {
    if under_mpi() || Command::new("mpirun").arg("--version").output().is_err() {
        return;
    }
    for helper in [
        "helper_a_task_kills_its_rank",
        "helper_an_apply_kills_its_rank",
    ] {
        a_dead_rank_ends_the_job(helper);
    }
}

fn a_dead_rank_ends_the_job(helper: &str) {
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new("timeout")
        .arg("120")
        .arg("mpirun")
        .args(["-n", "3", "--oversubscribe"])
        .arg(exe)
        .args(["--exact", helper, "--ignored"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    let started = Instant::now();
    let out = loop {
        if child.try_wait().expect("wait").is_some() {
            break child.wait_with_output().expect("output");
        }
        assert!(started.elapsed() < Duration::from_secs(130), "mpirun hung");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert_ne!(out.status.code(), Some(124), "the job hung: {text}");
    assert!(
        text.contains("signal 9") || text.contains("Killed"),
        "the launcher names the dead rank's signal: {text}"
    );
}
