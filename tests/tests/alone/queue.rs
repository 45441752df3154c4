//! Queues across real processes: order, exactly-once delivery with many
//! producers and consumers, bounds, JoinableQueue, producers killed in the
//! middle of a put, big messages, handles that travel, no descriptor leaks.
use std::time::Duration;

use multiproc::queue::{GetTimeoutError, JoinableQueue, TryGetError, TryPutError};
use multiproc::{Process, Queue, process_fn};
use multiproc_tests::{Checked, checksum};

const LONG: Duration = Duration::from_secs(30);

#[process_fn]
fn put_range(q: Queue<u64>, from: u64, to: u64) {
    for i in from..to {
        q.put(i).expect("put");
    }
}

#[test]
fn fifo_with_one_producer() {
    let _alone = multiproc_tests::alone();
    let q = Queue::<u64>::new().expect("queue");
    let mut p = Process::new(put_range, (q.clone(), 0, 5_000));
    p.start().expect("start");
    for i in 0..5_000 {
        assert_eq!(q.get_timeout(LONG).expect("get"), i);
    }
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

#[process_fn]
fn consume_until_none(q: Queue<Option<u64>>) -> (u64, u64) {
    let (mut count, mut sum) = (0, 0);
    while let Some(v) = q.get_timeout(LONG).expect("get") {
        count += 1;
        sum += v;
    }
    (count, sum)
}

#[process_fn]
fn put_some(q: Queue<Option<u64>>, from: u64, to: u64) {
    for i in from..to {
        q.put(Some(i)).expect("put");
    }
}

#[test]
fn four_producers_two_consumers_every_item_once() {
    let _alone = multiproc_tests::alone();
    const N: u64 = 10_000;
    let q = Queue::<Option<u64>>::bounded(1024).expect("queue");
    let consumers: Vec<_> = (0..2)
        .map(|_| multiproc::spawn(consume_until_none, (q.clone(),)).expect("spawn consumer"))
        .collect();
    let mut producers: Vec<_> = (0..4u64)
        .map(|k| {
            let mut p = Process::new(put_some, (q.clone(), k * N, (k + 1) * N));
            p.start().expect("start producer");
            p
        })
        .collect();
    for p in &mut producers {
        assert!(
            p.join_timeout(LONG)
                .expect("join")
                .expect("exited")
                .success()
        );
    }
    q.put(None).expect("sentinel");
    q.put(None).expect("sentinel");
    let (mut count, mut sum) = (0, 0);
    for mut c in consumers {
        let (n, s) = c.join_timeout(LONG).expect("consumer result");
        count += n;
        sum += s;
    }
    let total = 4 * N;
    assert_eq!(count, total);
    assert_eq!(sum, total * (total - 1) / 2);
}

#[test]
fn bounded_try_put_on_full_and_get_timeout_on_empty() {
    let _alone = multiproc_tests::alone();
    let q = Queue::<u32>::bounded(2).expect("queue");
    let mut p = Process::new(fill_two, (q.clone(),));
    p.start().expect("start");
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
    assert!(q.full());
    assert!(matches!(q.try_put(3), Err(TryPutError::Full(3))));
    assert!(matches!(
        q.put_timeout(4, Duration::from_millis(50)),
        Err(multiproc::queue::PutTimeoutError::Timeout(4))
    ));
    assert_eq!(q.get_timeout(LONG).expect("first"), 1);
    assert_eq!(q.get_timeout(LONG).expect("second"), 2);
    assert!(matches!(
        q.get_timeout(Duration::from_millis(50)),
        Err(GetTimeoutError::Timeout)
    ));
    assert!(q.empty());
}

#[process_fn]
fn fill_two(q: Queue<u32>) {
    q.put(1).expect("put");
    q.put(2).expect("put");
}

#[process_fn]
fn work_and_mark_done(q: JoinableQueue<u64>, done: Queue<u64>, n: u64) {
    for _ in 0..n {
        let v = q.get_timeout(LONG).expect("get");
        done.put(v * 2).expect("put result");
        q.task_done().expect("task_done");
    }
}

#[test]
fn joinable_queue_join_waits_for_task_done() {
    let _alone = multiproc_tests::alone();
    let q = JoinableQueue::<u64>::new().expect("queue");
    let done = Queue::<u64>::new().expect("results");
    for i in 0..100 {
        q.put(i).expect("put");
    }
    let mut p = Process::new(work_and_mark_done, (q.clone(), done.clone(), 100));
    p.start().expect("start");
    q.join_timeout(LONG).expect("join");
    // Every task was marked done, so every result is already there.
    assert_eq!(done.qsize(), 100);
    assert!(
        q.task_done().is_err(),
        "task_done beyond the puts is an error"
    );
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

#[process_fn]
fn put_forever(q: Queue<Checked>) {
    let mut seq = 0u64;
    loop {
        // Sizes cross the inline/side-channel boundary.
        let len = [8usize, 300, 1_000, 5_000, 40_000][(seq % 5) as usize];
        q.put(Checked::new(seq, len)).expect("put");
        seq += 1;
    }
}

#[test]
fn producer_killed_mid_put_leaves_queue_usable() {
    let _alone = multiproc_tests::alone();
    let q = Queue::<Checked>::bounded(64).expect("queue");
    for round in 0..5 {
        let mut p = Process::new(put_forever, (q.clone(),));
        p.start().expect("start");
        let mut last = None;
        // Let the producer get well into its loop (the queue fills up).
        for _ in 0..200 {
            let m = q.get_timeout(LONG).expect("get while producing");
            assert_eq!(
                checksum(&m.data),
                m.sum,
                "round {round}: message {} corrupt",
                m.seq
            );
            assert!(
                last.is_none_or(|l| m.seq == l + 1),
                "round {round}: order or duplicate"
            );
            last = Some(m.seq);
        }
        p.kill().expect("kill");
        let status = p.join_timeout(LONG).expect("join").expect("exited");
        assert!(!status.success());
        // Drain what it left: every message whole, none twice. The
        // producer is reaped, so nothing more comes: what `try_get` does
        // not give now (a slot its death left half-written is reclaimed by
        // the take itself) is not there.
        loop {
            match q.try_get() {
                Ok(m) => {
                    assert_eq!(
                        checksum(&m.data),
                        m.sum,
                        "round {round}: message {} corrupt",
                        m.seq
                    );
                    assert!(
                        last.is_none_or(|l| m.seq == l + 1),
                        "round {round}: order or duplicate"
                    );
                    last = Some(m.seq);
                }
                Err(TryGetError::Empty) => break,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        // Still usable by everyone.
        let data = vec![round as u8; 2000];
        q.put_timeout(
            Checked {
                seq: u64::MAX,
                sum: checksum(&data),
                data,
            },
            LONG,
        )
        .expect("put after kill");
        let m = q.get_timeout(LONG).expect("get after kill");
        assert_eq!(m.seq, u64::MAX);
        assert!(q.empty());
    }
}

#[process_fn]
fn put_big(q: Queue<Vec<u8>>, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    q.put(data).expect("put big");
}

#[test]
fn fifty_mib_message_through_a_queue() {
    let _alone = multiproc_tests::alone();
    let len = 50 << 20;
    let q = Queue::<Vec<u8>>::new().expect("queue");
    let mut p = Process::new(put_big, (q.clone(), len));
    p.start().expect("start");
    // The producer may exit before anyone reads: the message lives on.
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
    let got = q.get_timeout(LONG).expect("get big");
    assert_eq!(got.len(), len);
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
}

#[process_fn]
fn relay_from_outer(outer: Queue<Queue<u64>>) -> u64 {
    let inner = outer.get_timeout(LONG).expect("get queue");
    inner.get_timeout(LONG).expect("get value")
}

#[test]
fn queue_passed_to_a_process_and_through_another_queue() {
    let _alone = multiproc_tests::alone();
    let outer = Queue::<Queue<u64>>::new().expect("outer");
    let inner = Queue::<u64>::new().expect("inner");
    let mut h = multiproc::spawn(relay_from_outer, (outer.clone(),)).expect("spawn");
    outer.put(inner.clone()).expect("put queue");
    inner.put(4242).expect("put value");
    assert_eq!(h.join_timeout(LONG).expect("result"), 4242);
}

#[test]
fn fd_count_unchanged_after_a_thousand_handle_transfers() {
    let _alone = multiproc_tests::alone();
    let carrier = Queue::<Queue<u8>>::new().expect("carrier");
    let q = Queue::<u8>::new().expect("queue");
    // Warm up (thread-local buffers, lazily opened descriptors).
    carrier.put(q.clone()).expect("put");
    drop(carrier.get().expect("get"));
    let before = multiproc_tests::open_fds();
    for _ in 0..1_000 {
        carrier.put(q.clone()).expect("put");
        let back = carrier.get().expect("get");
        back.put(1).expect("use");
        assert_eq!(q.get().expect("get"), 1);
    }
    assert_eq!(multiproc_tests::open_fds(), before);
}

#[process_fn]
fn put_joinable_forever(q: JoinableQueue<u64>) {
    let mut i = 0u64;
    loop {
        q.put(i).expect("put");
        i += 1;
    }
}

/// The unfinished-task count stays exact when producers die mid-put: after
/// every delivered item is marked done, `join` returns (no count left over
/// by a dead writer) and one more `task_done` is refused (none taken away
/// twice). Several kills make a kill inside a put likely.
#[test]
fn joinable_count_exact_when_producers_are_killed() {
    let _alone = multiproc_tests::alone();
    let q = JoinableQueue::<u64>::bounded(16).expect("queue");
    for round in 0..5 {
        let mut p = Process::new(put_joinable_forever, (q.clone(),));
        p.start().expect("start");
        for _ in 0..100 {
            q.get_timeout(LONG).expect("get while producing");
            q.task_done().expect("task_done while producing");
        }
        p.kill().expect("kill");
        assert!(
            !p.join_timeout(LONG)
                .expect("join")
                .expect("exited")
                .success()
        );
        // The producer is reaped: what `try_get` does not give now is
        // not there.
        loop {
            match q.try_get() {
                Ok(_) => q.task_done().expect("task_done while draining"),
                Err(TryGetError::Empty) => break,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        q.join_timeout(LONG).expect("join after every task is done");
        assert!(
            q.task_done().is_err(),
            "round {round}: the count went below zero"
        );
    }
}

// ---------------------------------------------------------------------
// Iteration, error predicates and conversions, JoinableQueue's own methods.

#[process_fn]
fn put_range_then_close(q: Queue<u64>, n: u64) {
    for i in 0..n {
        q.put(i).expect("put");
    }
    q.close();
}

#[test]
fn iter_waits_for_a_producer_and_ends_when_it_closes_the_queue() {
    let _alone = multiproc_tests::alone();
    let q = Queue::<u64>::bounded(16).expect("queue");
    let mut p = Process::new(put_range_then_close, (q.clone(), 1_000));
    p.start().expect("start");
    let mut it = q.iter();
    let got: Vec<u64> = it.by_ref().collect();
    assert_eq!(got, (0..1_000).collect::<Vec<_>>());
    assert!(it.take_error().is_none(), "ended by the close");
    assert_eq!(it.next(), None, "an ended iteration stays ended");
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("ended")
            .success()
    );
    // The owning form, on a queue closed before it starts: what is left,
    // then the end.
    let q = Queue::<u64>::bounded(4).expect("queue");
    q.put(7).expect("put");
    q.close();
    assert_eq!(q.into_iter().collect::<Vec<_>>(), [7]);
}

#[test]
fn try_iter_takes_what_is_there_and_never_waits() {
    let _alone = multiproc_tests::alone();
    let q = Queue::<u64>::bounded(8).expect("queue");
    assert_eq!(q.try_iter().next(), None);
    for i in 0..5 {
        q.put(i).expect("put");
    }
    let mut it = q.try_iter();
    assert_eq!(it.by_ref().take(2).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(it.by_ref().collect::<Vec<_>>(), [2, 3, 4]);
    assert!(it.take_error().is_none(), "ended by an empty queue");
    q.put(5).expect("put");
    assert_eq!(it.next(), Some(5), "a try_iter may be resumed");
    let mut sum = 0;
    q.put(1).expect("put");
    q.put(2).expect("put");
    q.close();
    for x in &q {
        sum += x;
    }
    assert_eq!(sum, 3);
}

/// `?` on each queue error in a function returning `multiproc::Result`.
fn try_put_then(q: &Queue<u8>, item: u8) -> multiproc::Result<()> {
    q.try_put(item)?;
    Ok(())
}

fn try_get_then(q: &Queue<u8>) -> multiproc::Result<u8> {
    Ok(q.try_get()?)
}

fn get_timeout_then(q: &Queue<u8>) -> multiproc::Result<u8> {
    Ok(q.get_timeout(Duration::from_millis(10))?)
}

#[test]
fn queue_errors_have_predicates_and_convert_into_error() {
    let _alone = multiproc_tests::alone();
    use multiproc::Error;
    use multiproc::queue::{GetError, PutTimeoutError, TryGetError};
    let q = Queue::<u8>::bounded(1).expect("queue");

    let empty = q.try_get().expect_err("empty");
    assert!(empty.is_empty() && !empty.is_disconnected(), "{empty}");
    assert!(empty.failure().is_none());
    assert!(matches!(try_get_then(&q), Err(Error::Empty)));
    let timeout = q
        .get_timeout(Duration::from_millis(10))
        .expect_err("nothing");
    assert!(timeout.is_timeout() && !timeout.is_disconnected());
    assert!(matches!(get_timeout_then(&q), Err(Error::Timeout)));

    q.put(1).expect("put");
    let full = q.try_put(2).expect_err("full");
    assert!(full.is_full() && !full.is_closed(), "{full:?}");
    assert_eq!(full.into_inner(), 2);
    let err = try_put_then(&q, 3).expect_err("full");
    assert!(matches!(err, Error::Full) && err.is_would_block(), "{err}");
    assert!(!err.is_timeout(), "a full queue is not a timeout");
    let late = q
        .put_timeout(4, Duration::from_millis(10))
        .expect_err("still full");
    assert!(late.is_timeout() && !late.is_closed());
    assert!(matches!(Error::from(late), Error::Timeout));

    q.close();
    let closed = q.try_put(5).expect_err("closed");
    assert!(closed.is_closed() && !closed.is_full());
    assert!(matches!(Error::from(closed), Error::Closed));
    assert_eq!(q.try_get().expect("left"), 1);
    let gone = q.get().expect_err("closed and empty");
    assert!(gone.is_disconnected(), "{gone}");
    assert!(matches!(Error::from(gone.clone()), Error::Disconnected));
    // The blocking operation's error is one of the others'.
    assert!(TryGetError::from(GetError::Disconnected).is_disconnected());
    assert!(GetTimeoutError::from(gone).is_disconnected());
    assert!(matches!(
        PutTimeoutError::Closed(0u8),
        PutTimeoutError::Closed(_)
    ));
}

#[test]
fn joinable_queue_has_the_queue_methods_of_its_own() {
    let _alone = multiproc_tests::alone();
    use multiproc::Error;
    let q = JoinableQueue::<u32>::bounded(2).expect("queue");
    assert_eq!(q.capacity(), 2);
    assert!(q.empty() && !q.full() && !q.is_closed());
    q.put(1).expect("put");
    q.try_put(2).expect("try_put");
    assert!(q.full());
    assert_eq!(q.qsize(), 2);
    assert!(
        q.put_timeout(3, Duration::from_millis(10))
            .expect_err("full")
            .is_timeout()
    );
    assert!(q.try_put(3).expect_err("full").is_full());
    assert_eq!(q.get().expect("get"), 1);
    assert_eq!(q.get_timeout(LONG).expect("get_timeout"), 2);
    assert!(q.try_get().expect_err("empty").is_empty());
    q.task_done().expect("one");
    assert!(
        matches!(
            q.join_timeout(Duration::from_millis(10)),
            Err(Error::Timeout)
        ),
        "one task still open"
    );
    q.task_done().expect("two");
    q.join().expect("all done");
    let err = q.task_done().expect_err("more than were put");
    assert!(matches!(err, Error::Misuse { .. }), "{err}");
    q.put(4).expect("put");
    q.put(5).expect("put");
    assert_eq!(q.try_iter().next(), Some(4));
    q.close();
    assert!(q.is_closed());
    assert_eq!((&q).into_iter().collect::<Vec<_>>(), [5]);
    assert_eq!(q.iter().next(), None);
}
