//! Pool: map, imap, starmap, apply_async; panics, dead workers,
//! initializers, task limits, close/join/terminate. Every wait is bounded.
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multiproc::{Error, Pool, process_fn};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const LONG: Duration = Duration::from_secs(30);

#[process_fn]
fn cube(x: u64) -> u64 {
    x * x * x
}

#[process_fn]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[process_fn]
fn pid_of(_x: u64) -> u32 {
    std::process::id()
}

#[process_fn]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[process_fn]
fn fail_on(x: u64, bad: u64) -> u64 {
    if x == bad {
        panic!("item {x} is bad");
    }
    x
}

#[process_fn]
fn bad_at_61234(x: u64) -> u64 {
    if x == 61_234 {
        panic!("item {x} is bad");
    }
    x + 1
}

#[process_fn]
fn kill_self() -> u32 {
    let pid = std::process::id();
    multiproc_tests::kill(pid, 9);
    std::thread::sleep(Duration::from_secs(60));
    pid
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
fn bad_initializer() {
    panic!("initializer refuses");
}

/// Encodes fine in the worker, never decodes in the parent.
#[derive(Debug, Serialize)]
struct Undecodable(u8);

impl<'de> Deserialize<'de> for Undecodable {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("this type never decodes"))
    }
}

#[process_fn]
fn undecodable(x: u8) -> Undecodable {
    Undecodable(x)
}

/// Never encodes when it holds 0.
#[derive(Debug, Deserialize)]
struct UnencodableZero(u64);

impl Serialize for UnencodableZero {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            0 => Err(serde::ser::Error::custom("zero never encodes")),
            x => s.serialize_u64(x),
        }
    }
}

#[process_fn]
fn unwrap_zero(x: UnencodableZero) -> u64 {
    x.0
}

#[process_fn]
fn put_square(q: multiproc::Queue<u64>, x: u64) -> u64 {
    q.put(x * x).expect("put");
    x
}

fn not_registered(x: u64) -> u64 {
    x
}

fn pool2() -> Pool {
    Pool::new(2).expect("pool")
}

#[test]
fn map_equals_sequential() {
    let pool = pool2();
    for n in [0u64, 1, 4, 10_000] {
        let got = pool.map(cube, 0..n).expect("map");
        let want: Vec<u64> = (0..n).map(cube).collect();
        assert_eq!(got, want, "n = {n}");
    }
    // An input without an exact length, and explicit chunk sizes.
    let odd: Vec<u64> = pool
        .map(cube, (0..100u64).filter(|x| x % 2 == 1))
        .expect("map filter");
    assert_eq!(
        odd,
        (0..100u64)
            .filter(|x| x % 2 == 1)
            .map(cube)
            .collect::<Vec<_>>()
    );
    for chunksize in [1, 7, 1000] {
        assert_eq!(
            pool.map_chunked(cube, 0..500u64, chunksize)
                .expect("map_chunked"),
            (0..500u64).map(cube).collect::<Vec<_>>()
        );
    }
}

#[test]
fn tutorial_map_with_five_workers() {
    let pool = Pool::new(5).expect("pool");
    assert_eq!(pool.map(cube, 0..4).expect("map"), vec![0, 1, 8, 27]);
    assert_eq!(pool.processes(), 5);
}

#[test]
fn starmap_and_apply() {
    let pool = pool2();
    let pairs: Vec<(u64, u64)> = (0..50).map(|i| (i, 2 * i)).collect();
    assert_eq!(
        pool.starmap(add, pairs.clone()).expect("starmap"),
        pairs.iter().map(|(a, b)| a + b).collect::<Vec<_>>()
    );
    assert_eq!(
        pool.starmap_async(add, pairs)
            .expect("submit")
            .get()
            .expect("get")
            .len(),
        50
    );
    assert_eq!(pool.apply(add, (2, 3)).expect("apply"), 5);
    assert_eq!(
        pool.map_async(cube, 0..10)
            .expect("submit")
            .get()
            .expect("get"),
        (0..10).map(cube).collect::<Vec<_>>()
    );
}

#[test]
fn imap_keeps_order() {
    let pool = pool2();
    // Earlier items sleep longer, so they finish later than later items.
    let input: Vec<u64> = (0..12).map(|i| (12 - i) * 5).collect();
    let got: Vec<u64> = pool
        .imap(sleep_ms, input.clone())
        .expect("imap")
        .map(|r| r.expect("item"))
        .collect();
    assert_eq!(got, input);
    let chunked: Vec<u64> = pool
        .imap_chunked(cube, 0..1000u64, 64)
        .expect("imap")
        .map(|r| r.expect("item"))
        .collect();
    assert_eq!(chunked, (0..1000u64).map(cube).collect::<Vec<_>>());
}

#[test]
fn imap_unordered_gives_every_result() {
    let pool = pool2();
    let got: HashSet<u64> = pool
        .imap_unordered(cube, 0..200u64)
        .expect("imap")
        .map(|r| r.expect("item"))
        .collect();
    assert_eq!(got, (0..200u64).map(cube).collect::<HashSet<_>>());
}

#[test]
fn imap_over_an_endless_iterator() {
    let pool = pool2();
    let got: Vec<u64> = pool
        .imap(cube, 0u64..)
        .expect("imap")
        .take(100)
        .map(|r| r.expect("item"))
        .collect();
    assert_eq!(got, (0..100u64).map(cube).collect::<Vec<_>>());
    // The pool is usable afterwards (the abandoned window is discarded).
    assert_eq!(pool.map(cube, 0..3).expect("map after"), vec![0, 1, 8]);
}

#[test]
fn apply_async_get_timeout_times_out_then_succeeds() {
    let pool = pool2();
    let mut result = pool.apply_async(sleep_ms, (1500,)).expect("submit");
    let err = result
        .get_timeout(Duration::from_millis(10))
        .expect_err("not ready yet");
    assert!(err.is_timeout(), "{err}");
    assert!(!result.ready());
    assert_eq!(result.successful(), None);
    assert_eq!(result.get_timeout(LONG).expect("value"), 1500);
    // The value was taken: asking again is an error, not a hang.
    assert!(result.get_timeout(LONG).is_err());

    let done = pool.apply_async(add, (1, 1)).expect("submit");
    assert!(done.wait_timeout(LONG));
    assert!(done.ready());
    assert_eq!(done.successful(), Some(true));
    assert_eq!(done.get().expect("value"), 2);
}

#[test]
fn panic_fails_its_item_and_the_pool_lives_on() {
    let pool = pool2();
    let input: Vec<(u64, u64)> = (0..100).map(|i| (i, 37)).collect();
    let err = pool.starmap(fail_on, input).expect_err("item 37 panics");
    match &err {
        Error::Panicked { message, item, .. } => {
            assert_eq!(message, "item 37 is bad");
            assert_eq!(*item, Some(37));
        }
        other => panic!("expected a panic error, got {other}"),
    }
    assert!(err.to_string().contains("item 37"), "{err}");
    // Only that item failed: imap shows every other result.
    let results: Vec<Result<u64, Error>> = pool.imap(cube, 0..10u64).expect("imap").collect();
    assert!(results.iter().all(Result::is_ok));
    let mixed: Vec<bool> = pool
        .imap_chunked(sleep_ms, [0u64, 0, 0], 3)
        .expect("imap")
        .map(|r| r.is_ok())
        .collect();
    assert_eq!(mixed, vec![true, true, true]);
    let failed = pool.apply_async(fail_on, (5, 5)).expect("submit");
    assert!(failed.wait_timeout(LONG));
    assert_eq!(failed.successful(), Some(false));
    assert_eq!(
        pool.map(cube, 0..5).expect("next map"),
        vec![0, 1, 8, 27, 64]
    );
}

/// Numbers in and numbers out take a fast path in the worker (results
/// stored in place, straight into the shared arena for large chunks): a
/// panic in the middle of a large chunk still fails only its item, and
/// every item around it keeps its result.
#[test]
fn a_panic_in_a_large_chunk_of_numbers_fails_only_its_item() {
    let pool = pool2();
    let err = pool
        .map(bad_at_61234, 0..100_000u64)
        .expect_err("item 61234 panics");
    match &err {
        Error::Panicked { message, item, .. } => {
            assert_eq!(message, "item 61234 is bad");
            assert_eq!(*item, Some(61_234));
        }
        other => panic!("expected a panic error, got {other}"),
    }
    let outcomes: Vec<Result<u64, Error>> = pool
        .imap_chunked(bad_at_61234, 0..100_000u64, 20_000)
        .expect("imap")
        .collect();
    assert_eq!(outcomes.len(), 100_000);
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Ok(v) => assert_eq!(*v, i as u64 + 1, "item {i}"),
            Err(err) => assert_eq!(i, 61_234, "only item 61234 fails, not {i}: {err}"),
        }
    }
    assert!(outcomes[61_234].is_err());
    // Large maps of numbers come back whole and in order.
    let big: Vec<u64> = pool.map(bad_at_61234, 70_000..270_000u64).expect("map");
    assert!(big.iter().copied().eq(70_001..270_001u64));
}

#[test]
fn a_killed_worker_fails_its_task_and_is_replaced() {
    let pool = pool2();
    let before = pool.worker_pids();
    let started = Instant::now();
    let mut result = pool.apply_async(kill_self, ()).expect("submit");
    let err = result
        .get_timeout(Duration::from_secs(2))
        .expect_err("the worker died");
    let elapsed = started.elapsed();
    match err {
        Error::WorkerDied { pid, signal, .. } => {
            assert!(before.contains(&pid), "pid {pid} not one of {before:?}");
            assert_eq!(signal, Some(9));
        }
        other => panic!("expected WorkerDied, got {other} after {elapsed:?}"),
    }
    assert_eq!(
        pool.map(cube, 0..1000u64).expect("next map"),
        (0..1000u64).map(cube).collect::<Vec<_>>()
    );
    assert_eq!(pool.worker_pids().len(), 2);
}

/// 256 KiB of the letter `n % 26` (a string encodes as one bulk copy).
#[process_fn]
fn blob(n: u64) -> String {
    char::from(b'a' + (n % 26) as u8)
        .to_string()
        .repeat(256 << 10)
}

#[process_fn]
fn blob_sum(v: String) -> u64 {
    (v.len() as u64) << 8 | v.bytes().next().map_or(0, u64::from)
}

#[process_fn]
fn cube_or_die_at(x: u64, die: u64) -> u64 {
    if x == die {
        kill_self();
    }
    x * x * x
}

#[test]
fn results_larger_than_the_shared_arena_still_arrive() {
    // Chunks of 100 results of 256 KiB: 25 MiB each, so a worker's two
    // chunks in flight do not both fit its 32 MiB output arena (one goes
    // through the socket), and a 160-item chunk (40 MiB) never fits.
    let pool = pool2();
    for chunksize in [100, 160] {
        let out = pool
            .map_chunked(blob, 0..400u64, chunksize)
            .expect("map of large results");
        assert_eq!(out.len(), 400);
        for (i, v) in out.iter().enumerate() {
            assert!(*v == blob(i as u64), "item {i}");
        }
    }
}

#[test]
fn arguments_larger_than_the_shared_arena_still_arrive() {
    let pool = pool2();
    let args: Vec<String> = (0..400u64).map(blob).collect();
    let want: Vec<u64> = args.iter().map(|v| blob_sum(v.clone())).collect();
    for chunksize in [100, 160] {
        assert_eq!(
            pool.map_chunked(blob_sum, args.clone(), chunksize)
                .expect("map of large arguments"),
            want
        );
    }
}

#[test]
fn a_worker_killed_mid_chunk_of_shared_memory_payloads_is_replaced() {
    let pool = pool2();
    // 50_000 items of 8 bytes per chunk: the chunks go through the arenas.
    let n = 400_000u64;
    let err = pool
        .starmap(cube_or_die_at, (0..n).map(|x| (x, 250_000u64)))
        .expect_err("a worker died");
    assert!(
        matches!(
            err,
            Error::WorkerDied {
                signal: Some(9),
                ..
            }
        ),
        "{err}"
    );
    for _ in 0..3 {
        assert_eq!(
            pool.map(cube, 0..n).expect("map after the death"),
            (0..n).map(cube).collect::<Vec<_>>()
        );
    }
    assert_eq!(pool.worker_pids().len(), 2);
}

#[test]
fn max_tasks_per_child_gives_fresh_workers() {
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .expect("pool");
    let pids = pool.map_chunked(pid_of, 0..6u64, 1).expect("map");
    let distinct: HashSet<u32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), 6, "{pids:?}");
    // Retired workers keep being replaced: the next tasks run in new processes.
    let more = pool.map_chunked(pid_of, 0..2u64, 1).expect("second map");
    assert!(
        more.iter().all(|p| !distinct.contains(p)),
        "{more:?} reused one of {pids:?}"
    );
    assert_ne!(more[0], more[1]);
}

#[test]
fn initializer_runs_in_every_worker() {
    let pool = Pool::builder()
        .processes(2)
        .initializer(set_seed, (1000,))
        .build()
        .expect("pool");
    assert_eq!(
        pool.map_chunked(seeded, 0..8u64, 1).expect("map"),
        (1000..1008).collect::<Vec<u64>>()
    );
}

#[test]
fn a_panicking_initializer_fails_build() {
    let err = Pool::builder()
        .processes(2)
        .initializer(bad_initializer, ())
        .build()
        .expect_err("initializer panics");
    match &err {
        Error::InitializerFailed { message } => {
            assert!(message.contains("initializer refuses"), "{message}")
        }
        other => panic!("expected InitializerFailed, got {other}"),
    }
}

#[test]
fn undecodable_result_is_that_tasks_error() {
    let pool = pool2();
    let err = pool.map(undecodable, [1u8]).expect_err("cannot decode");
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert_eq!(pool.map(cube, 0..2).expect("next"), vec![0, 1]);
}

#[test]
fn an_item_that_fails_to_encode_fails_in_its_place_alone() {
    let pool = pool2();
    // One item per chunk: the failing item is the first of its chunk.
    let items = [1, 0, 2, 3].map(UnencodableZero);
    let got: Vec<Result<u64, Error>> = pool.imap(unwrap_zero, items).expect("imap").collect();
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(matches!(got[1], Err(Error::Encode { .. })), "{got:?}");
    let ok: Vec<(usize, u64)> = got
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|v| (i, *v)))
        .collect();
    assert_eq!(ok, vec![(0, 1), (2, 2), (3, 3)]);
}

#[test]
fn misuse_is_reported() {
    assert!(matches!(Pool::new(0), Err(Error::InvalidArgument { .. })));
    let pool = pool2();
    assert!(matches!(
        pool.map(not_registered, 0..3u64),
        Err(Error::NotRegistered { .. })
    ));
    assert!(matches!(
        pool.map(|x: u64| x, 0..3u64),
        Err(Error::NotRegistered { .. })
    ));
    assert!(matches!(
        pool.map_chunked(cube, 0..3u64, 0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(pool.join().is_err(), "join before close is an error");
    pool.close();
    assert!(matches!(pool.map(cube, 0..3u64), Err(Error::Closed)));
    assert!(matches!(pool.apply_async(add, (1, 2)), Err(Error::Closed)));
    pool.join().expect("join after close");
}

#[test]
fn close_then_join_finishes_outstanding_work() {
    let pool = pool2();
    let pids = pool.worker_pids();
    let pending = pool
        .map_async(sleep_ms, [200u64, 200, 200])
        .expect("submit");
    pool.close();
    pool.join().expect("join");
    assert_eq!(
        pending.get().expect("finished before join returned"),
        vec![200, 200, 200]
    );
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} still exists"
        );
    }
}

#[test]
fn pool_and_results_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Pool>();
    shared::<multiproc::pool::AsyncResult<'static, Vec<u64>>>();
}

#[test]
fn several_threads_share_one_pool() {
    let pool = pool2();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let pool = &pool;
                s.spawn(move || pool.map(cube, t * 1000..(t + 1) * 1000).expect("map"))
            })
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            let t = t as u64;
            assert_eq!(
                h.join().expect("thread"),
                (t * 1000..(t + 1) * 1000).map(cube).collect::<Vec<_>>()
            );
        }
    });
}

#[test]
fn dropping_a_busy_pool_leaves_no_child() {
    let pool = pool2();
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 2);
    let busy = pool
        .map_async(sleep_ms, [20_000u64, 20_000])
        .expect("submit");
    // Both workers are now busy for 20 s; dropping must not wait for them.
    drop(busy);
    drop(pool);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} left behind"
        );
    }
}

#[test]
fn terminate_fails_pending_work() {
    let pool = pool2();
    let pending = pool.apply_async(sleep_ms, (20_000,)).expect("submit");
    pool.terminate();
    assert!(matches!(pending.get(), Err(Error::Closed)));
    assert!(matches!(pool.map(cube, 0..3u64), Err(Error::Closed)));
    pool.join().expect("join after terminate");
}

#[test]
fn handles_travel_as_task_arguments() {
    let pool = pool2();
    let q = multiproc::Queue::<u64>::new().expect("queue");
    let args: Vec<(multiproc::Queue<u64>, u64)> = (0..20).map(|x| (q.clone(), x)).collect();
    // Chunks of several items, each with its own copy of the queue's descriptors.
    assert_eq!(
        pool.starmap(put_square, args).expect("starmap"),
        (0..20).collect::<Vec<u64>>()
    );
    let mut got: Vec<u64> = (0..20).map(|_| q.get_timeout(LONG).expect("get")).collect();
    got.sort_unstable();
    assert_eq!(got, (0..20u64).map(|x| x * x).collect::<Vec<_>>());
}

#[process_fn]
fn dies_at_three(x: u64) -> u64 {
    if x == 3 {
        kill_self();
    }
    x * 10
}

#[test]
fn one_kill_fails_only_the_item_that_was_running() {
    // One worker, two chunks in flight: when item 3 kills it, item 4 is
    // already queued in it; it must be sent again, not failed.
    let pool = Pool::new(1).expect("pool");
    let results: Vec<Result<u64, Error>> = pool
        .imap_chunked(dies_at_three, 0..8u64, 1)
        .expect("imap")
        .collect();
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (3, Err(Error::WorkerDied { signal, .. })) => assert_eq!(*signal, Some(9)),
            (3, other) => panic!("item 3: expected WorkerDied, got {other:?}"),
            (i, Ok(v)) => assert_eq!(*v, i as u64 * 10),
            (i, Err(e)) => panic!("item {i} failed: {e}"),
        }
    }
}

#[test]
fn a_worker_that_dies_while_idle_fails_no_later_call() {
    let pool = pool2();
    let expected: Vec<u64> = (0..200u64).map(cube).collect();
    for round in 0..20 {
        assert_eq!(pool.map(cube, 0..200u64).expect("warm map"), expected);
        let victim = pool.worker_pids()[round % 2];
        multiproc_tests::kill(victim, 9);
        // The kill races with this map: chunks sent to the dead worker must
        // be given to a live one.
        let got = pool
            .map_chunked(cube, 0..200u64, 1)
            .unwrap_or_else(|e| panic!("round {round}: a call after an idle death failed: {e}"));
        assert_eq!(got, expected, "round {round}");
    }
}

/// A worker's initializer: tell the test who it is, then wait for its go.
#[process_fn]
fn announce_and_wait(me: multiproc::Queue<u32>, go: multiproc::sync::Event) {
    let _ = me.put(std::process::id());
    assert!(go.wait_timeout(Duration::from_secs(20)), "never told to go");
}

#[test]
fn a_worker_killed_before_it_was_ready_is_replaced() {
    let go = multiproc::sync::Event::new().expect("event");
    let starting = multiproc::Queue::<u32>::new().expect("queue");
    let killer = {
        let (go, starting) = (go.clone(), starting.clone());
        std::thread::spawn(move || {
            // A worker of this pool (other tests' pools run beside it).
            let victim = starting
                .get_timeout(LONG)
                .expect("a worker announced itself");
            multiproc_tests::kill(victim, 9);
            go.set();
            victim
        })
    };
    let pool = Pool::builder()
        .processes(2)
        .initializer(announce_and_wait, (starting, go))
        .build()
        .expect("a pool whose worker was killed while starting still builds");
    let victim = killer.join().expect("killer");
    assert!(!pool.worker_pids().contains(&victim));
    assert_eq!(pool.worker_pids().len(), 2);
    assert_eq!(
        pool.map(cube, 0..100u64).expect("map"),
        (0..100u64).map(cube).collect::<Vec<_>>()
    );
}

#[test]
fn workers_that_always_die_while_starting_break_the_pool_clearly() {
    let err = Pool::builder()
        .processes(1)
        .initializer(kill_self, ())
        .build()
        .expect_err("every worker dies in its initializer");
    let text = err.to_string();
    assert!(matches!(err, Error::InitializerFailed { .. }), "{text}");
    assert!(text.contains("killed before they were ready"), "{text}");
    assert!(text.contains("SIGKILL"), "{text}");
}

/// A task that breaks its worker's protocol: it writes a frame header of
/// `len` bytes (or, for 0, pseudo-random bytes) straight to the worker's
/// socket to the pool (descriptor 3), then waits to be stopped.
#[process_fn]
fn forge_frame(len: u64) -> u64 {
    let mut header = [0u8; 16];
    if len == 0 {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for b in header.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    } else {
        header[..8].copy_from_slice(&len.to_le_bytes());
        header[12..].copy_from_slice(&0x5004u32.to_le_bytes());
    }
    let _ = nix::sys::socket::send(3, &header, nix::sys::socket::MsgFlags::empty());
    std::thread::sleep(Duration::from_secs(60));
    len
}

#[test]
fn a_task_that_forges_frames_fails_and_the_pool_serves_on() {
    let pool = Pool::new(1).expect("pool");
    for len in [1u64 << 40, 1 << 63, u64::MAX, 0] {
        let before = pool.worker_pids();
        let mut result = pool.apply_async(forge_frame, (len,)).expect("submit");
        let err = result
            .get_timeout(LONG)
            .expect_err("the forged frame ends that worker");
        assert!(
            matches!(
                err,
                Error::WorkerDied {
                    signal: Some(9),
                    ..
                }
            ),
            "header {len:#x}: {err}"
        );
        assert_ne!(pool.worker_pids(), before, "header {len:#x}: replaced");
        assert_eq!(
            pool.map(cube, 0..100u64).expect("the pool serves on"),
            (0..100u64).map(cube).collect::<Vec<_>>()
        );
    }
}

/// A task that writes, in one `send`, a whole frame of a tag the pool
/// ignores and right behind it a header announcing 1 TiB, then waits to
/// be stopped: the pool reads both at once, and must act on the header it
/// already holds (no poll will report those bytes again).
#[process_fn]
fn forge_frame_behind_a_frame() -> u64 {
    let mut bytes = Vec::new();
    for (len, tag) in [(0u64, 0x7777u32), (1 << 40, 0x5004)] {
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&tag.to_le_bytes());
    }
    let _ = nix::sys::socket::send(3, &bytes, nix::sys::socket::MsgFlags::empty());
    std::thread::sleep(Duration::from_secs(60));
    0
}

#[test]
fn a_forged_header_read_with_the_frame_before_it_ends_its_worker() {
    let pool = Pool::new(1).expect("pool");
    let before = pool.worker_pids();
    let mut result = pool
        .apply_async(forge_frame_behind_a_frame, ())
        .expect("submit");
    let err = result
        .get_timeout(Duration::from_secs(10))
        .expect_err("the forged header ends that worker");
    assert!(
        matches!(
            err,
            Error::WorkerDied {
                signal: Some(9),
                ..
            }
        ),
        "{err}"
    );
    assert_ne!(pool.worker_pids(), before, "replaced");
    assert_eq!(
        pool.map(cube, 0..100u64).expect("the pool serves on"),
        (0..100u64).map(cube).collect::<Vec<_>>()
    );
}

/// A task that answers for itself: it writes a result frame for the
/// pool's first chunk (id 0) whose one `String` announces 1 TiB.
#[process_fn]
fn forge_result() -> String {
    let mut frame = Vec::new();
    let payload_len: u64 = 8 + 4 + 8 + 5;
    frame.extend_from_slice(&payload_len.to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    frame.extend_from_slice(&0x5004u32.to_le_bytes());
    frame.extend_from_slice(&0u64.to_le_bytes()); // chunk id
    frame.extend_from_slice(&1u32.to_le_bytes()); // one result
    frame.extend_from_slice(&(1u64 << 40).to_le_bytes()); // its length
    frame.extend_from_slice(b"short");
    let _ = nix::sys::socket::send(3, &frame, nix::sys::socket::MsgFlags::empty());
    std::thread::sleep(Duration::from_secs(60));
    String::new()
}

#[test]
fn a_forged_result_length_is_a_decode_error_not_an_abort() {
    let pool = Pool::new(1).expect("pool");
    let err = pool
        .apply(forge_result, ())
        .expect_err("the forged result does not decode");
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    // The worker is still busy sleeping in the forged task; the pool lives.
    assert_eq!(pool.worker_pids().len(), 1);
}

#[test]
fn calls_in_the_wrong_state_are_misuse_not_invalid_arguments() {
    let pool = pool2();
    let err = pool.join().expect_err("join before close");
    assert!(matches!(err, Error::Misuse { .. }), "{err}");
    let mut pending = pool.apply_async(add, (1, 2)).expect("apply_async");
    assert_eq!(
        pending.get_timeout(Duration::from_secs(30)).expect("value"),
        3
    );
    let err = pending
        .get_timeout(Duration::from_secs(30))
        .expect_err("taken");
    assert!(matches!(err, Error::Misuse { .. }), "{err}");
    pool.close();
    pool.join().expect("join after close");
}

/// `(x, pid)` after `ms` milliseconds: a long task.
#[process_fn]
fn sleep_then_pid(x: u64, ms: u64) -> (u64, u32) {
    std::thread::sleep(Duration::from_millis(ms));
    (x, std::process::id())
}

/// Kills its worker at item `die`; otherwise sleeps `ms` milliseconds.
#[process_fn]
fn sleep_or_die_at(x: u64, ms: u64, die: u64) -> u64 {
    if x == die {
        kill_self();
    }
    std::thread::sleep(Duration::from_millis(ms));
    x
}

#[test]
fn a_map_of_long_tasks_one_a_chunk_keeps_its_order_and_the_task_limit() {
    // Tasks of 3 ms make the workers deep (chunks sent ahead, results read
    // in batches): neither the order nor `max_tasks_per_child` changes.
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(7)
        .build()
        .expect("pool");
    let out = pool
        .starmap_async_chunked(sleep_then_pid, (0..60u64).map(|x| (x, 3)), 1)
        .expect("submit")
        .get_timeout(Duration::from_secs(60))
        .expect("map");
    assert_eq!(
        out.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
        (0..60).collect::<Vec<_>>()
    );
    let mut per_pid = std::collections::HashMap::<u32, usize>::new();
    for (_, pid) in &out {
        *per_pid.entry(*pid).or_default() += 1;
    }
    assert!(per_pid.values().all(|n| *n <= 7), "{per_pid:?}");
}

#[test]
fn a_worker_killed_while_it_holds_long_tasks_ahead_fails_the_map_and_is_replaced() {
    let pool = pool2();
    let err = pool
        .starmap_async_chunked(sleep_or_die_at, (0..60u64).map(|x| (x, 3, 45)), 1)
        .expect("submit")
        .get_timeout(Duration::from_secs(60))
        .expect_err("item 45 kills its worker");
    assert!(
        matches!(
            err,
            Error::WorkerDied {
                signal: Some(9),
                ..
            }
        ),
        "{err}"
    );
    // Its replacement and the other worker serve the same map in full.
    let out = pool
        .starmap_async_chunked(sleep_or_die_at, (0..60u64).map(|x| (x, 3, u64::MAX)), 1)
        .expect("submit")
        .get_timeout(Duration::from_secs(60))
        .expect("map");
    assert_eq!(out, (0..60).collect::<Vec<_>>());
    assert_eq!(pool.worker_pids().len(), 2);
}
