//! Pool and futures: chunk sizes for every map, callbacks and error
//! callbacks (on the callback thread, once each), `Imap::next_timeout` and
//! a panicking input, `AsyncResult` as a `concurrent.futures` future
//! (`cancel`, `done`, done callbacks, `wait`, `as_completed`), and the
//! `async` feature's `Future`/`Stream`. CPython's semantics are the
//! reference. Every wait is bounded.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use multiproc::pool::{ReturnWhen, as_completed, wait};
use multiproc::sync::Event;
use multiproc::{Error, Pool, process_fn};

const LONG: Duration = Duration::from_secs(30);

#[process_fn]
fn square(x: u64) -> u64 {
    x * x
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
fn pid_of2(_a: u64, _b: u64) -> u32 {
    std::process::id()
}

#[process_fn]
fn fail_on(x: u64, bad: u64) -> u64 {
    if x == bad {
        panic!("item {x} is bad");
    }
    x
}

/// Returns `x` once `go` is set (a gate the test controls: no sleeps).
#[process_fn]
fn gated(go: Event, x: u64) -> u64 {
    assert!(go.wait_timeout(LONG), "the test never opened the gate");
    x
}

fn event() -> Event {
    Event::new().expect("event")
}

/// Items `0..n` run as chunks of `size`: with one task per worker, a chunk
/// is what one worker pid ran, and no two chunks share a pid.
fn assert_chunks_of(pids: &[u32], size: usize) {
    for (i, chunk) in pids.chunks(size).enumerate() {
        assert!(
            chunk.iter().all(|p| *p == chunk[0]),
            "chunk {i} ran in one worker: {pids:?}"
        );
    }
    let mut firsts: Vec<u32> = pids.chunks(size).map(|c| c[0]).collect();
    let n = firsts.len();
    firsts.sort_unstable();
    firsts.dedup();
    assert_eq!(firsts.len(), n, "each chunk had its own worker: {pids:?}");
}

fn one_task_pool() -> Pool {
    Pool::builder()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .expect("pool")
}

#[test]
fn every_map_takes_a_chunksize() {
    let pool = one_task_pool();
    let pairs: Vec<(u64, u64)> = (0..6).map(|x| (x, x)).collect();
    assert_chunks_of(
        &pool
            .starmap_chunked(pid_of2, pairs.clone(), 3)
            .expect("starmap"),
        3,
    );
    assert_chunks_of(
        &pool
            .map_async_chunked(pid_of, 0..6u64, 2)
            .expect("map_async")
            .get()
            .expect("get"),
        2,
    );
    assert_chunks_of(
        &pool
            .starmap_async_chunked(pid_of2, pairs, 3)
            .expect("starmap_async")
            .get()
            .expect("get"),
        3,
    );
    // Unordered: the items of one chunk come out together, in order.
    let got: Vec<u64> = pool
        .imap_unordered_chunked(square, 0..9u64, 3)
        .expect("imap_unordered")
        .collect::<Result<_, _>>()
        .expect("results");
    let mut chunks: Vec<Vec<u64>> = got.chunks(3).map(<[u64]>::to_vec).collect();
    chunks.sort();
    assert_eq!(
        chunks,
        vec![vec![0, 1, 4], vec![9, 16, 25], vec![36, 49, 64]]
    );
    let pids: Vec<u32> = pool
        .imap_unordered_chunked(pid_of, 0..4u64, 2)
        .expect("imap_unordered")
        .collect::<Result<_, _>>()
        .expect("pids");
    assert_chunks_of(&pids, 2);
}

#[test]
fn a_chunksize_of_zero_is_refused_by_every_map() {
    let pool = Pool::new(1).expect("pool");
    let invalid = |r: Result<(), Error>| matches!(r, Err(Error::InvalidArgument { .. }));
    assert!(invalid(pool.starmap_chunked(add, [(1, 2)], 0).map(drop)));
    assert!(invalid(pool.map_async_chunked(square, [1], 0).map(drop)));
    assert!(invalid(
        pool.starmap_async_chunked(add, [(1, 2)], 0).map(drop)
    ));
    assert!(invalid(
        pool.imap_unordered_chunked(square, [1], 0).map(drop)
    ));
}

#[test]
fn callback_runs_once_with_the_value_on_the_callback_thread_before_get_returns() {
    let pool = Pool::new(2).expect("pool");
    let (tx, rx) = mpsc::channel();
    let ran = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let result = {
        let (ran, errors) = (Arc::clone(&ran), Arc::clone(&errors));
        pool.apply_async(add, (2, 3))
            .expect("apply_async")
            .callback(move |v: &u64| {
                ran.fetch_add(1, Ordering::SeqCst);
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send((*v, name));
            })
            .error_callback(move |_| {
                errors.fetch_add(1, Ordering::SeqCst);
            })
    };
    assert_eq!(result.get().expect("value"), 5);
    // As CPython: the value is set, the callback runs, then get returns.
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    let (value, thread) = rx.recv_timeout(LONG).expect("the callback ran");
    assert_eq!(value, 5);
    assert_eq!(thread.as_deref(), Some("multiproc-pool-callbacks"));
    pool.close();
    pool.join().expect("join");
    assert_eq!(ran.load(Ordering::SeqCst), 1, "once");
    assert_eq!(
        errors.load(Ordering::SeqCst),
        0,
        "no error callback on success"
    );
    assert!(rx.try_recv().is_err());
}

#[test]
fn error_callback_runs_once_on_failure_and_callback_not_at_all() {
    let pool = Pool::new(2).expect("pool");
    let (tx, rx) = mpsc::channel();
    let ran = Arc::new(AtomicBool::new(false));
    let result = {
        let ran = Arc::clone(&ran);
        pool.apply_async(fail_on, (7, 7))
            .expect("apply_async")
            .callback(move |_| ran.store(true, Ordering::SeqCst))
            .error_callback(move |err: &Error| {
                let _ = tx.send(err.clone());
            })
    };
    let err = result.get().expect_err("the task panics");
    assert_eq!(err.panic_message(), Some("item 7 is bad"));
    let seen = rx.recv_timeout(LONG).expect("the error callback ran");
    assert_eq!(seen.panic_message(), Some("item 7 is bad"));
    pool.close();
    pool.join().expect("join");
    assert!(rx.try_recv().is_err(), "once");
    assert!(!ran.load(Ordering::SeqCst));
}

#[test]
fn map_async_and_starmap_async_callbacks_get_the_whole_list_or_the_first_error() {
    let pool = Pool::new(2).expect("pool");
    let (tx, rx) = mpsc::channel();
    let (etx, erx) = mpsc::channel();
    let tx2 = tx.clone();
    let maps = pool
        .map_async(square, 0..5u64)
        .expect("map_async")
        .callback(move |v: &Vec<u64>| tx.send(v.clone()).unwrap_or(()));
    let stars = pool
        .starmap_async(add, [(1, 2), (3, 4)])
        .expect("starmap_async")
        .callback(move |v: &Vec<u64>| tx2.send(v.clone()).unwrap_or(()));
    let failing = pool
        .starmap_async_chunked(fail_on, (0..6u64).map(|x| (x, 4)), 2)
        .expect("starmap_async")
        .error_callback(move |e: &Error| etx.send(e.clone()).unwrap_or(()));
    assert_eq!(maps.get().expect("map"), vec![0, 1, 4, 9, 16]);
    assert_eq!(stars.get().expect("starmap"), vec![3, 7]);
    assert!(failing.get().is_err());
    let mut lists = vec![
        rx.recv_timeout(LONG).expect("callback"),
        rx.recv_timeout(LONG).expect("callback"),
    ];
    lists.sort();
    assert_eq!(lists, vec![vec![0, 1, 4, 9, 16], vec![3, 7]]);
    let err = erx.recv_timeout(LONG).expect("error callback");
    assert!(
        matches!(err, Error::Panicked { item: Some(4), .. }),
        "{err:?}"
    );
    pool.close();
    pool.join().expect("join");
    assert!(
        rx.try_recv().is_err() && erx.try_recv().is_err(),
        "once each"
    );
}

#[test]
fn a_blocked_callback_does_not_hold_up_other_results() {
    let pool = Pool::new(2).expect("pool");
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let blocked = pool
        .apply_async(square, (3,))
        .expect("apply_async")
        .callback(move |_| {
            let _ = entered_tx.send(());
            let _ = release_rx.recv_timeout(LONG);
        });
    entered_rx.recv_timeout(LONG).expect("the callback started");
    // The callback thread is busy: results still arrive and decode.
    assert_eq!(pool.map(square, 0..50u64).expect("map").len(), 50);
    let mut other = pool.apply_async(add, (1, 1)).expect("apply_async");
    assert_eq!(other.get_timeout(LONG).expect("value"), 2);
    assert!(!blocked.ready(), "ready only once its callback returned");
    release_tx.send(()).expect("release");
    assert_eq!(blocked.get().expect("value"), 9);
}

#[test]
fn a_dropped_result_with_a_callback_still_runs_and_join_waits_for_it() {
    let pool = Pool::new(2).expect("pool");
    let got = Arc::new(Mutex::new(Vec::new()));
    for x in 0..10u64 {
        let got = Arc::clone(&got);
        // Python's idiom: apply_async(f, args, callback=results.append).
        drop(
            pool.apply_async(square, (x,))
                .expect("apply_async")
                .callback(move |v: &u64| got.lock().expect("lock").push(*v)),
        );
    }
    pool.close();
    pool.join().expect("join");
    let mut got = got.lock().expect("lock").clone();
    got.sort_unstable();
    assert_eq!(got, (0..10u64).map(|x| x * x).collect::<Vec<_>>());
}

#[test]
fn terminate_gives_pending_results_closed_through_their_error_callback() {
    let pool = Pool::new(1).expect("pool");
    let go = event();
    let (tx, rx) = mpsc::channel();
    let pending: Vec<_> = (0..3u64)
        .map(|x| {
            let tx = tx.clone();
            pool.apply_async(gated, (go.clone(), x))
                .expect("apply_async")
                .error_callback(move |e: &Error| tx.send(e.clone()).unwrap_or(()))
        })
        .collect();
    drop(tx);
    pool.terminate();
    // terminate() returns once the callbacks due have run.
    let errors: Vec<Error> = rx.try_iter().collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors.iter().all(|e| matches!(e, Error::Closed)),
        "{errors:?}"
    );
    for r in pending {
        assert!(matches!(r.get(), Err(Error::Closed)));
    }
}

#[test]
fn a_panicking_callback_leaves_the_value_and_the_other_callbacks() {
    let pool = Pool::new(1).expect("pool");
    let (tx, rx) = mpsc::channel();
    let mut result = pool
        .apply_async(square, (4,))
        .expect("apply_async")
        .callback(|_| panic!("a callback that panics"));
    result.add_done_callback(move |r: &Result<u64, Error>| {
        let _ = tx.send(r.as_ref().ok().copied());
    });
    assert_eq!(result.get().expect("value"), 16);
    assert_eq!(rx.recv_timeout(LONG).expect("second callback"), Some(16));
}

#[test]
fn a_done_callback_added_after_the_result_is_ready_runs_once() {
    let pool = Pool::new(1).expect("pool");
    let mut result = pool.apply_async(square, (5,)).expect("apply_async");
    result.wait();
    assert!(result.done());
    let (tx, rx) = mpsc::channel();
    result.add_done_callback(move |r: &Result<u64, Error>| {
        let _ = tx.send(r.as_ref().ok().copied());
    });
    assert_eq!(rx.recv_timeout(LONG).expect("done callback"), Some(25));
    assert_eq!(result.get().expect("value"), 25);
    assert!(rx.try_recv().is_err(), "once");
}

#[test]
fn get_consumes_and_get_timeout_gives_the_value_once() {
    let pool = Pool::new(1).expect("pool");
    let mut result = pool.apply_async(square, (6,)).expect("apply_async");
    assert_eq!(result.get_timeout(LONG).expect("value"), 36);
    assert!(matches!(
        result.get_timeout(LONG),
        Err(Error::Misuse { .. })
    ));
    assert_eq!(result.successful(), None, "the value was taken");
}

#[test]
fn imap_next_timeout_times_out_then_goes_on() {
    let pool = Pool::new(1).expect("pool");
    let go = event();
    let mut it = pool
        .imap(gated_one, (0..3u64).map(|x| (go.clone(), x)))
        .expect("imap");
    let first = it.next_timeout(Duration::from_millis(50));
    assert!(matches!(first, Some(Err(Error::Timeout))), "{first:?}");
    go.set();
    assert_eq!(it.next_timeout(LONG).map(|r| r.ok()), Some(Some(0)));
    assert_eq!(it.next_timeout(LONG).map(|r| r.ok()), Some(Some(1)));
    assert_eq!(it.next_timeout(LONG).map(|r| r.ok()), Some(Some(2)));
    assert!(it.next_timeout(LONG).is_none());
}

#[process_fn]
fn gated_one(args: (Event, u64)) -> u64 {
    assert!(args.0.wait_timeout(LONG), "the test never opened the gate");
    args.1
}

fn panicking_input(k: u64) -> impl Iterator<Item = u64> {
    (0..10u64).inspect(move |&x| {
        if x == k {
            panic!("the input fails at {x}");
        }
    })
}

#[test]
fn an_input_that_panics_yields_the_results_before_it_then_the_error() {
    let pool = Pool::new(2).expect("pool");
    for chunksize in [1, 2, 3] {
        let got: Vec<Result<u64, Error>> = pool
            .imap_chunked(square, panicking_input(5), chunksize)
            .expect("imap")
            .collect();
        assert_eq!(got.len(), 6, "chunksize {chunksize}: {got:?}");
        for (i, r) in got[..5].iter().enumerate() {
            assert_eq!(r.as_ref().ok(), Some(&(i as u64 * i as u64)));
        }
        match &got[5] {
            Err(Error::Panicked {
                message, item, pid, ..
            }) => {
                assert_eq!(message, "the input fails at 5");
                assert_eq!(*item, Some(5));
                assert_eq!(*pid, std::process::id(), "it panicked here");
            }
            other => panic!("expected the input's panic, got {other:?}"),
        }
    }
    let got: Vec<Result<u64, Error>> = pool
        .imap_unordered(square, panicking_input(3))
        .expect("imap_unordered")
        .collect();
    assert_eq!(got.len(), 4, "{got:?}");
    let mut values: Vec<u64> = got[..3].iter().map(|r| *r.as_ref().expect("ok")).collect();
    values.sort_unstable();
    assert_eq!(values, vec![0, 1, 4]);
    assert!(
        got[3]
            .as_ref()
            .is_err_and(|e| e.panic_message() == Some("the input fails at 3"))
    );
    // At the first item: just the error.
    let got: Vec<_> = pool
        .imap(square, panicking_input(0))
        .expect("imap")
        .collect();
    assert_eq!(got.len(), 1);
    assert!(matches!(got[0], Err(Error::Panicked { item: Some(0), .. })));
}

#[test]
fn cancel_stops_a_task_not_yet_started_and_refuses_a_started_one() {
    // One worker busy with two gated tasks (one running, one waiting in
    // the worker): what is submitted next stays queued in the parent.
    let pool = Pool::new(1).expect("pool");
    let go = event();
    let mut running: Vec<_> = (0..2u64)
        .map(|x| {
            pool.apply_async(gated, (go.clone(), x))
                .expect("apply_async")
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    let mut queued = pool
        .map_async(square, 0..4u64)
        .expect("map_async")
        .error_callback(move |e: &Error| tx.send(e.clone()).unwrap_or(()));
    assert!(
        !running[0].cancel(),
        "a task sent to a worker cannot be cancelled"
    );
    assert!(!running[0].cancelled());
    assert!(queued.cancel(), "queued behind the busy worker");
    assert!(queued.cancel(), "cancelling twice still says cancelled");
    assert!(queued.cancelled());
    assert!(queued.wait_timeout(LONG));
    assert!(queued.done());
    assert_eq!(queued.successful(), Some(false));
    assert!(matches!(queued.get(), Err(Error::Cancelled)));
    assert!(
        rx.recv_timeout(LONG)
            .expect("error callback")
            .is_cancelled()
    );
    go.set();
    for (i, r) in running.drain(..).enumerate() {
        assert_eq!(r.get().expect("value"), i as u64);
    }
    let mut finished = pool.apply_async(square, (2,)).expect("apply_async");
    finished.wait();
    assert!(!finished.cancel(), "a finished task cannot be cancelled");
    assert_eq!(finished.get().expect("value"), 4);
    // The pool serves on.
    assert_eq!(pool.map(square, 0..3u64).expect("map"), vec![0, 1, 4]);
}

#[test]
fn wait_first_completed_and_all_completed() {
    let pool = Pool::new(2).expect("pool");
    let go = event();
    let results = vec![
        pool.apply_async(gated, (go.clone(), 0))
            .expect("apply_async"),
        pool.apply_async(add, (1, 1)).expect("apply_async"),
    ];
    let first = wait(&results, Some(LONG), ReturnWhen::FirstCompleted);
    assert_eq!(first.done, vec![1]);
    assert_eq!(first.not_done, vec![0]);
    let timed_out = wait(
        &results,
        Some(Duration::from_millis(50)),
        ReturnWhen::AllCompleted,
    );
    assert_eq!(timed_out.not_done, vec![0], "the gated one is not done");
    go.set();
    let all = wait(&results, Some(LONG), ReturnWhen::AllCompleted);
    assert_eq!(all.done, vec![0, 1]);
    assert!(all.not_done.is_empty());
    let values: Vec<u64> = results
        .into_iter()
        .map(|r| r.get().expect("value"))
        .collect();
    assert_eq!(values, vec![0, 2]);
    assert!(
        wait::<u64>(&[], None, ReturnWhen::AllCompleted)
            .done
            .is_empty()
    );
}

#[test]
fn as_completed_yields_in_completion_order() {
    let pool = Pool::new(2).expect("pool");
    let go = event();
    let results = vec![
        pool.apply_async(gated, (go.clone(), 10))
            .expect("apply_async"),
        pool.apply_async(add, (1, 1)).expect("apply_async"),
    ];
    let mut it = as_completed(results);
    assert_eq!(it.remaining(), 2);
    let (i, r) = it.next_timeout(LONG).expect("in time").expect("one");
    assert_eq!(i, 1);
    assert!(r.ready(), "it comes out done");
    assert_eq!(r.get().expect("value"), 2);
    assert!(matches!(
        it.next_timeout(Duration::from_millis(50)),
        Err(Error::Timeout)
    ));
    go.set();
    let (i, r) = it.next().expect("the gated one");
    assert_eq!((i, r.get().expect("value")), (0, 10));
    assert!(it.next().is_none());
    assert!(matches!(it.next_timeout(LONG), Ok(None)));
}

/// A minimal executor: polls on this thread, parks until woken.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread, AtomicBool);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.1.store(true, Ordering::SeqCst);
            self.0.unpark();
        }
    }
    let unpark = Arc::new(Unpark(std::thread::current(), AtomicBool::new(false)));
    let waker = Waker::from(Arc::clone(&unpark));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let give_up = std::time::Instant::now() + LONG;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        while !unpark.1.swap(false, Ordering::SeqCst) {
            assert!(std::time::Instant::now() < give_up, "never woken");
            std::thread::park_timeout(Duration::from_millis(100));
        }
    }
}

#[test]
fn an_async_result_is_a_future() {
    let pool = Pool::new(2).expect("pool");
    let go = event();
    assert_eq!(
        block_on(pool.apply_async(add, (2, 3)).expect("apply_async")).expect("v"),
        5
    );
    assert_eq!(
        block_on(
            pool.map_async_chunked(square, 0..20u64, 3)
                .expect("map_async")
        )
        .expect("v"),
        (0..20u64).map(|x| x * x).collect::<Vec<_>>()
    );
    // Woken by the result, not ready at the first poll.
    let gated_result = pool
        .apply_async(gated, (go.clone(), 9))
        .expect("apply_async");
    let opener = {
        let go = go.clone();
        std::thread::spawn(move || go.set())
    };
    assert_eq!(block_on(gated_result).expect("v"), 9);
    opener.join().expect("opener");
    // With a callback, the future waits for it too.
    let called = Arc::new(AtomicBool::new(false));
    let with_callback = {
        let called = Arc::clone(&called);
        pool.apply_async(square, (7,))
            .expect("apply_async")
            .callback(move |_| called.store(true, Ordering::SeqCst))
    };
    assert_eq!(block_on(with_callback).expect("v"), 49);
    assert!(called.load(Ordering::SeqCst));
    assert!(block_on(pool.apply_async(fail_on, (1, 1)).expect("apply_async")).is_err());
}

#[test]
fn an_imap_is_a_stream() {
    use futures_core::Stream;
    let pool = Pool::new(2).expect("pool");
    let mut stream = pool.imap_chunked(square, 0..30u64, 4).expect("imap");
    let mut got = Vec::new();
    while let Some(r) = block_on(std::future::poll_fn(|cx| {
        Pin::new(&mut stream).poll_next(cx)
    })) {
        got.push(r.expect("value"));
    }
    assert_eq!(got, (0..30u64).map(|x| x * x).collect::<Vec<_>>());
    let mut stream = pool
        .imap_unordered(square, panicking_input(2))
        .expect("imap");
    let mut got = Vec::new();
    while let Some(r) = block_on(std::future::poll_fn(|cx| {
        Pin::new(&mut stream).poll_next(cx)
    })) {
        got.push(r);
    }
    assert_eq!(got.len(), 3);
    assert!(got[2].is_err());
}

static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();

#[test]
fn a_static_pool_gives_static_results_another_thread_can_take() {
    // ARCHITECTURE.md's way to `'static` futures: the pool in a static.
    let pool = POOL.get_or_init(|| Pool::new(1).expect("pool"));
    let result: multiproc::pool::AsyncResult<'static, u64> =
        pool.apply_async(square, (8,)).expect("apply_async");
    let taker = std::thread::spawn(move || result.get());
    assert_eq!(taker.join().expect("thread").expect("value"), 64);
}
