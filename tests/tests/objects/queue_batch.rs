//! The batch forms of Queue (`put_many`, `get_many` and their `try_` and
//! `_timeout` forms) across real processes: order, batches mixed with
//! single puts and gets, two producers, large items and items with
//! handles inside a batch, a producer killed in the middle of a batch.
use std::time::Duration;

use multiproc::queue::{GetTimeoutError, PutManyError, TryGetError};
use multiproc::{Process, Queue, process_fn};
use multiproc_tests::{Checked, checksum};
use serde::{Deserialize, Serialize};

const LONG: Duration = Duration::from_secs(30);

/// Puts `from..to` with `put_many`, in chunks of the sizes in `chunks`
/// (cycled).
#[process_fn]
fn put_many_range(q: Queue<u64>, from: u64, to: u64, chunks: Vec<usize>) {
    let items: Vec<u64> = (from..to).collect();
    let mut at = 0;
    for &k in chunks.iter().cycle() {
        if at == items.len() {
            break;
        }
        let end = (at + k).min(items.len());
        q.put_many_timeout(&items[at..end], LONG).expect("put_many");
        at = end;
    }
}

fn join_ok(p: &mut Process) {
    let status = p.join_timeout(LONG).expect("join").expect("exited");
    assert!(status.success(), "{status:?}");
}

/// Takes `n` items with `get_many`, cycling through `limits`.
fn get_many_n(q: &Queue<u64>, n: usize, limits: &[usize]) -> Vec<u64> {
    let mut out = Vec::new();
    for &limit in limits.iter().cycle() {
        if out.len() >= n {
            break;
        }
        let before = out.len();
        let got = q
            .get_many_timeout(&mut out, limit.min(n - before), LONG)
            .expect("get_many");
        assert_eq!(got, out.len() - before, "the count returned");
        assert!(
            got >= 1 && got <= limit,
            "{got} items for a limit of {limit}"
        );
    }
    out
}

#[test]
fn put_many_then_get_many_keeps_order_across_processes() {
    const N: u64 = 200_000;
    let q = Queue::<u64>::bounded(64).expect("queue");
    let mut p = Process::new(
        put_many_range,
        (q.clone(), 0, N, vec![1, 7, 300, 1000, 2, 133, 134, 4096]),
    );
    p.start().expect("start");
    let got = get_many_n(&q, N as usize, &[1, 5, 100, 133, 1000, 10_000]);
    assert!(got.iter().copied().eq(0..N), "out of order or missing");
    join_ok(&mut p);
    assert!(matches!(
        q.try_get_many(&mut Vec::new(), 10),
        Err(TryGetError::Empty)
    ));
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    N(u64),
    Text(String),
}

#[test]
fn batches_mix_with_single_puts_and_gets_in_order() {
    let q = Queue::<Msg>::bounded(16).expect("queue");
    let big = "x".repeat(5_000); // over a slot: travels alone
    let mut sent = vec![Msg::N(0)];
    q.put(Msg::N(0)).expect("put");
    let batch: Vec<Msg> = (1..10)
        .map(Msg::N)
        .chain([Msg::Text(big.clone()), Msg::Text("small".into())])
        .chain((10..300).map(Msg::N))
        .collect();
    q.put_many(&batch).expect("put_many");
    sent.extend(batch);
    q.put(Msg::N(300)).expect("put");
    sent.push(Msg::N(300));
    q.put_many(&[]).expect("an empty batch");

    let mut got = vec![q.get().expect("get")];
    assert_eq!(q.get_many(&mut got, 3).expect("get_many"), 3);
    // A single get takes one item of a batch; a clone in this process sees
    // the rest, in order.
    got.push(q.get().expect("get"));
    let other = q.clone();
    got.push(other.try_get().expect("try_get"));
    while got.len() < sent.len() {
        let before = got.len();
        other
            .get_many_timeout(&mut got, 50, LONG)
            .expect("get_many");
        assert!(got.len() > before);
        if got.len() < sent.len() {
            got.push(q.get_timeout(LONG).expect("get"));
        }
    }
    assert_eq!(got, sent);
    assert!(q.empty());
    assert_eq!(q.get_many(&mut got, 0).expect("limit 0"), 0);
}

#[test]
fn two_producers_every_item_once_each_in_its_own_order() {
    const N: u64 = 100_000;
    let q = Queue::<u64>::bounded(32).expect("queue");
    let mut producers: Vec<Process> = [(0, N, vec![1000, 1]), (N, 2 * N, vec![50, 3000])]
        .into_iter()
        .map(|(from, to, chunks)| {
            let mut p = Process::new(put_many_range, (q.clone(), from, to, chunks));
            p.start().expect("start");
            p
        })
        .collect();
    let got = get_many_n(&q, 2 * N as usize, &[4096, 17]);
    let (a, b): (Vec<u64>, Vec<u64>) = got.iter().partition(|&&v| v < N);
    assert!(a.iter().copied().eq(0..N), "the first producer's items");
    assert!(
        b.iter().copied().eq(N..2 * N),
        "the second producer's items"
    );
    producers.iter_mut().for_each(join_ok);
}

#[process_fn]
fn put_many_big(q: Queue<Vec<u8>>, tag: u8, count: usize) {
    let items: Vec<Vec<u8>> = (0..count).map(|i| vec![tag; 1000 + i * 997]).collect();
    for chunk in items.chunks(5) {
        q.put_many_timeout(chunk, LONG).expect("put_many");
    }
}

#[test]
fn large_items_in_batches_from_two_producers_arrive_whole() {
    const COUNT: usize = 60;
    let q = Queue::<Vec<u8>>::bounded(4).expect("queue");
    let mut producers: Vec<Process> = [1u8, 2]
        .into_iter()
        .map(|tag| {
            let mut p = Process::new(put_many_big, (q.clone(), tag, COUNT));
            p.start().expect("start");
            p
        })
        .collect();
    let mut next = [0usize; 3];
    let mut buf = Vec::new();
    while next[1] + next[2] < 2 * COUNT {
        buf.clear();
        q.get_many_timeout(&mut buf, 7, LONG).expect("get_many");
        for item in &buf {
            let tag = item[0];
            assert!(tag == 1 || tag == 2, "a foreign item");
            assert_eq!(item.len(), 1000 + next[tag as usize] * 997, "order");
            assert!(item.iter().all(|&b| b == tag), "corrupt");
            next[tag as usize] += 1;
        }
    }
    producers.iter_mut().for_each(join_ok);
}

#[test]
fn handles_inside_a_batch_travel_alone_and_arrive_working() {
    let outer = Queue::<Queue<u64>>::bounded(8).expect("outer");
    let inners: Vec<Queue<u64>> = (0..3).map(|_| Queue::bounded(2).expect("inner")).collect();
    outer.put_many(&inners).expect("put_many of handles");
    let mut got = Vec::new();
    assert_eq!(outer.get_many(&mut got, 10).expect("get_many"), 3);
    for (i, (sent, received)) in inners.iter().zip(&got).enumerate() {
        received
            .put(i as u64)
            .expect("put through the received handle");
        assert_eq!(sent.get_timeout(LONG).expect("get"), i as u64);
    }
}

#[test]
fn full_closed_and_empty_batches_report_how_far_they_got() {
    let q = Queue::<u64>::bounded(2).expect("queue");
    let items: Vec<u64> = (0..1000).collect();
    let err = q
        .put_many_timeout(&items, Duration::from_millis(50))
        .expect_err("two slots cannot hold 1000 u64s");
    let PutManyError::Timeout { put } = err else {
        panic!("expected a timeout, got {err}");
    };
    assert!(put > 0 && put < items.len(), "{put}");
    assert_eq!(q.try_put_many(&items[put..]).expect("full"), 0);
    let mut got = Vec::new();
    while got.len() < put {
        q.try_get_many(&mut got, usize::MAX).expect("what went in");
    }
    assert!(got.iter().copied().eq(0..put as u64));
    assert!(matches!(
        q.get_many_timeout(&mut got, 5, Duration::from_millis(10)),
        Err(GetTimeoutError::Timeout)
    ));
    let partial = q.try_put_many(&items).expect("room for some");
    assert!(partial > 0 && partial < items.len());
    q.close();
    let err = q.put_many(&items).expect_err("closed");
    assert!(matches!(err, PutManyError::Closed { put: 0 }), "{err}");
    assert!(matches!(
        multiproc::Error::from(err),
        multiproc::Error::Closed
    ));
    got.clear();
    while got.len() < partial {
        q.get_many(&mut got, 1000).expect("what is left");
    }
    assert!(got.iter().copied().eq(0..partial as u64));
    assert!(q.get_many(&mut got, 1).is_err(), "closed and drained");
}

#[process_fn]
fn put_many_forever(q: Queue<Checked>) {
    let mut seq = 0u64;
    loop {
        // Sizes cross the batch, inline and arena boundaries.
        let batch: Vec<Checked> = (0..9)
            .map(|k| {
                Checked::new(
                    seq + k,
                    [8usize, 30, 100, 5_000, 16][((seq + k) % 5) as usize],
                )
            })
            .collect();
        q.put_many(&batch).expect("put_many");
        seq += 9;
    }
}

#[test]
fn a_producer_killed_in_put_many_leaves_whole_items_in_order() {
    let q = Queue::<Checked>::bounded(16).expect("queue");
    let check = |m: &Checked, last: &mut Option<u64>, round: usize| {
        assert_eq!(checksum(&m.data), m.sum, "round {round}: {} corrupt", m.seq);
        assert!(
            last.is_none_or(|l| m.seq == l + 1),
            "round {round}: {} after {last:?}",
            m.seq
        );
        *last = Some(m.seq);
    };
    for round in 0..5 {
        let mut last = None;
        let mut p = Process::new(put_many_forever, (q.clone(),));
        p.start().expect("start");
        let mut buf = Vec::new();
        while buf.len() < 500 {
            q.get_many_timeout(&mut buf, 64, LONG).expect("get_many");
        }
        p.kill().expect("kill");
        let status = p.join_timeout(LONG).expect("join").expect("exited");
        assert!(!status.success());
        loop {
            match q.try_get_many(&mut buf, 64) {
                Ok(_) => {}
                Err(TryGetError::Empty) => break,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        buf.iter().for_each(|m| check(m, &mut last, round));
        // Usable after: a batch in, the same batch out.
        let after: Vec<Checked> = (0..3)
            .map(|i| Checked {
                seq: i,
                data: vec![1; 10],
                sum: checksum(&[1; 10]),
            })
            .collect();
        q.put_many_timeout(&after, LONG)
            .expect("put_many after kill");
        let mut again = Vec::new();
        while again.len() < 3 {
            q.get_many_timeout(&mut again, 3, LONG)
                .expect("get after kill");
        }
        assert!(again.iter().map(|m| m.seq).eq(0..3));
        assert!(q.empty());
    }
}
