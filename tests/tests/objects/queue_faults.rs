//! Queues under load and faults ("nothing hangs, nothing is lost"):
//! several producers of large messages to one consumer, a bounded queue
//! full of large messages, consumers killed in the middle of a `get`, and
//! a producer or consumer killed in the middle of a message whose pid then
//! goes to another live process.
//!
//! Every wait is bounded: a queue that stops moving fails the test with a
//! timeout instead of hanging it.
use std::sync::OnceLock;
use std::time::Duration;

use multiproc::queue::{GetTimeoutError, TryPutError};
use multiproc::shared::RawArray;
use multiproc::sync::Event;
use multiproc::{Process, Queue, process_fn};
use multiproc_tests::checksum;
use multiproc_tests::pid_reuse::{let_it_age, spawn_with_pid, start_ticks};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest wait for anything that should happen (a message, a child).
const LONG: Duration = Duration::from_secs(30);

/// Tests in this file run one at a time (they are heavy on a small machine).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills the processes it holds when dropped (a failed assertion must not
/// leave producers running).
struct KillOnDrop(Vec<Process>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for p in &mut self.0 {
            if p.is_alive() {
                let _ = p.kill();
                let _ = p.join_timeout(LONG);
            }
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct Big {
    producer: u32,
    seq: u64,
    data: Vec<u8>,
    sum: u64,
}

fn big(producer: u32, seq: u64, len: usize) -> Big {
    let data: Vec<u8> = (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(31)
                .wrapping_add(seq * 7 + producer as u64) as u8
        })
        .collect();
    Big {
        producer,
        seq,
        sum: checksum(&data),
        data,
    }
}

fn check(m: &Big) {
    assert_eq!(
        checksum(&m.data),
        m.sum,
        "message {} of producer {} is corrupt",
        m.seq,
        m.producer
    );
}

const KIB: usize = 1024;

/// The size of message `seq` of producer `k`: sizes that do not fit a
/// slot (2 to 256 KiB; up to 16 KiB they used to travel in the side
/// socket's datagrams) in turn, and three of 4 MiB.
fn size_of(k: u32, seq: u64) -> usize {
    if matches!(seq, 10 | 30 | 90) {
        return 4 << 20;
    }
    [2 * KIB, 8 * KIB, 15 * KIB, 64 * KIB, 12 * KIB, 256 * KIB][((seq + k as u64) % 6) as usize]
}

const PER_PRODUCER: u64 = 200;

/// Builds its messages first, so that the puts come in a burst.
#[process_fn]
fn put_large(q: Queue<Big>, ready: Queue<u32>, k: u32) {
    let msgs: Vec<Big> = (0..PER_PRODUCER)
        .map(|seq| big(k, seq, size_of(k, seq)))
        .collect();
    ready.put(k).expect("ready");
    for m in msgs {
        q.put_timeout(m, LONG)
            .expect("put (timed out: the queue stopped moving)");
    }
}

/// Takes every producer's messages, checking each and each producer's
/// order. A child process, so that the test's wait for it is bounded
/// whatever the queue does.
#[process_fn]
fn take_large(q: Queue<Big>, producers: u32) -> u64 {
    let mut next = vec![0u64; producers as usize];
    let total = PER_PRODUCER * producers as u64;
    for n in 0..total {
        let m = match q.get_timeout(LONG) {
            Ok(m) => m,
            Err(e) => panic!("after {n} of {total} messages: {e}"),
        };
        check(&m);
        assert_eq!(m.data.len(), size_of(m.producer, m.seq));
        let want = &mut next[m.producer as usize];
        assert_eq!(m.seq, *want, "producer {}: order or loss", m.producer);
        *want += 1;
    }
    total
}

fn producers_to_one_consumer(producers: u32) {
    let q = Queue::<Big>::bounded(64).expect("queue");
    let ready = Queue::<u32>::bounded(8).expect("ready");
    let mut procs = KillOnDrop(Vec::new());
    for k in 0..producers {
        let mut p = Process::new(put_large, (q.clone(), ready.clone(), k));
        p.start().expect("start producer");
        procs.0.push(p);
    }
    // Start taking once every producer is putting: they run ahead.
    for _ in 0..producers {
        ready.get_timeout(LONG).expect("producer ready");
    }
    let mut consumer =
        multiproc::spawn(take_large, (q.clone(), producers)).expect("spawn consumer");
    match consumer.join_timeout(3 * LONG) {
        Ok(n) => assert_eq!(n, PER_PRODUCER * producers as u64),
        Err(e) => panic!("the consumer failed: {e}"),
    }
    for p in &mut procs.0 {
        let status = p.join_timeout(LONG).expect("join").expect("producer ended");
        assert!(status.success());
    }
    assert!(matches!(
        q.get_timeout(Duration::from_millis(10)),
        Err(GetTimeoutError::Timeout)
    ));
}

/// Two producers of 2 KiB to 4 MiB messages, one consumer: all delivered
/// whole and in each producer's order. (A producer used to wait for room
/// in the side socket while holding its slot, with the socket full of
/// later positions' messages: the queue stopped for good.)
#[test]
fn two_producers_of_large_messages_to_one_consumer() {
    let _serial = serial();
    producers_to_one_consumer(2);
}

/// As above with four producers.
#[test]
fn four_producers_of_large_messages_to_one_consumer() {
    let _serial = serial();
    producers_to_one_consumer(4);
}

#[process_fn]
fn fill_with_large(q: Queue<Big>, n: u64) -> u64 {
    let sizes = [2 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 4 << 20];
    for seq in 0..n {
        let len = sizes[(seq % sizes.len() as u64) as usize];
        if q.put_timeout(big(0, seq, len), Duration::from_secs(5))
            .is_err()
        {
            return seq;
        }
    }
    n
}

/// A bounded(16) queue nobody reads holds 16 large messages (it used to
/// hold 12, or fewer: each large put also left a tombstone behind).
#[test]
fn bounded_sixteen_holds_sixteen_large_messages() {
    let _serial = serial();
    let q = Queue::<Big>::bounded(16).expect("queue");
    let mut h = multiproc::spawn(fill_with_large, (q.clone(), 16)).expect("spawn");
    let put = h.join_timeout(LONG).expect("the producer finished");
    assert_eq!(put, 16, "only {put} large messages fit");
    assert_eq!(q.qsize(), 16);
    assert!(matches!(
        q.try_put(big(1, 0, 2 * KIB)),
        Err(TryPutError::Full(_))
    ));
    for seq in 0..16 {
        let m = q.get_timeout(LONG).expect("get");
        check(&m);
        assert_eq!(m.seq, seq);
    }
    assert!(q.empty());
}

#[process_fn]
fn fill_with_handles(q: Queue<(u64, Queue<u64>)>, inner: Queue<u64>, n: u64) -> u64 {
    for seq in 0..n {
        if q.put_timeout((seq, inner.clone()), Duration::from_secs(5))
            .is_err()
        {
            return seq;
        }
    }
    n
}

/// A bounded(16) queue also holds 16 messages that carry handles, and the
/// handles work when they come out.
#[test]
fn bounded_sixteen_holds_sixteen_messages_with_handles() {
    let _serial = serial();
    let q = Queue::<(u64, Queue<u64>)>::bounded(16).expect("queue");
    let inner = Queue::<u64>::bounded(64).expect("inner");
    let mut h = multiproc::spawn(fill_with_handles, (q.clone(), inner.clone(), 16)).expect("spawn");
    let put = h.join_timeout(LONG).expect("the producer finished");
    assert_eq!(put, 16, "only {put} messages with handles fit");
    for seq in 0..16 {
        let (got, handle) = q.get_timeout(LONG).expect("get");
        assert_eq!(got, seq);
        handle.put(seq).expect("use the handle");
    }
    for seq in 0..16 {
        assert_eq!(inner.get_timeout(LONG).expect("through the handles"), seq);
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct Counted {
    seq: u64,
    data: Vec<u8>,
    sum: u64,
    /// Every third message carries a handle (its descriptors travel
    /// beside the ring).
    handle: Option<Queue<u8>>,
}

/// Takes messages until killed, counting each in `seen` (one writer: this
/// process) and announcing progress on `progress`.
#[process_fn]
fn count_until_killed(q: Queue<Counted>, seen: RawArray<u32>, progress: Queue<u64>) {
    loop {
        let m = q.get_timeout(LONG).expect("get");
        assert_eq!(checksum(&m.data), m.sum, "message {} corrupt", m.seq);
        let i = m.seq as usize;
        seen.set(i, seen.get(i).expect("seen") + 1).expect("count");
        progress.put(m.seq).expect("progress");
    }
}

/// A tiny deterministic generator (the test needs variety, not quality).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// A consumer SIGKILLed in the middle of `get`, 30 times on one queue:
/// afterwards the queue still holds its full capacity and delivers
/// everything; every message is delivered exactly once, except that one
/// per kill may have been taken whole by the consumer that died (after
/// decoding it, before its `get` returned). (A slot taken by a dead
/// consumer used to stay taken: after a wrap, `try_put` was Full and
/// `try_get` Empty for good.)
#[test]
fn consumer_killed_mid_get_thirty_times() {
    let _serial = serial();
    const CAP: usize = 24;
    const ROUNDS: u64 = 30;
    const PER_ROUND: u64 = 20;
    let total = ROUNDS * PER_ROUND;
    let q = Queue::<Counted>::bounded(CAP).expect("queue");
    let seen = RawArray::<u32>::zeroed(total as usize).expect("array");
    let mut mine = vec![0u32; total as usize];
    let inner = Queue::<u8>::bounded(4).expect("inner");
    let mut rng = Lcg(7);
    let mut lost_to_the_dead = 0;
    let mut out_of_order = 0;
    for round in 0..ROUNDS {
        // Inline, arena and large messages, so that the kill lands in
        // every part of a `get`.
        for seq in round * PER_ROUND..(round + 1) * PER_ROUND {
            let len = [100, 3 * KIB, 64 * KIB, 256 * KIB][rng.next(4) as usize];
            let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ seq) as u8).collect();
            let m = Counted {
                seq,
                sum: checksum(&data),
                data,
                handle: (seq % 3 == 0).then(|| inner.clone()),
            };
            q.put_timeout(m, LONG)
                .expect("put before the consumer starts");
        }
        let progress = Queue::<u64>::bounded(64).expect("progress");
        let mut c = KillOnDrop(vec![Process::new(
            count_until_killed,
            (q.clone(), seen.clone(), progress.clone()),
        )]);
        c.0[0].start().expect("start consumer");
        for _ in 0..=rng.next(PER_ROUND / 2) {
            progress.get_timeout(LONG).expect("consumer progress");
        }
        c.0[0].kill().expect("kill");
        let status = c.0[0].join_timeout(LONG).expect("join").expect("ended");
        assert!(!status.success());
        drop(c);

        // Take what is left (anything the dead consumer had taken comes
        // back); stop when everything is accounted for, or when one
        // message is missing and nothing more comes.
        let counted = |mine: &[u32]| -> u64 {
            seen.to_vec()
                .iter()
                .zip(mine)
                .filter(|(a, b)| **a + **b > 0)
                .count() as u64
        };
        let expected = (round + 1) * PER_ROUND;
        let mut last = None;
        while counted(&mine) + lost_to_the_dead < expected {
            let wait = if counted(&mine) + 1 + lost_to_the_dead >= expected {
                Duration::from_secs(3)
            } else {
                LONG
            };
            match q.get_timeout(wait) {
                Ok(m) => {
                    assert_eq!(checksum(&m.data), m.sum, "message {} corrupt", m.seq);
                    assert_eq!(m.handle.is_some(), m.seq % 3 == 0);
                    if let Some(h) = m.handle {
                        h.try_put(7).expect("the handle works");
                        assert_eq!(inner.try_get().expect("through the handle"), 7);
                    }
                    // The message the dead consumer held comes back after
                    // those behind it.
                    if last.is_some_and(|l| m.seq < l) {
                        out_of_order += 1;
                    }
                    last = Some(m.seq);
                    mine[m.seq as usize] += 1;
                }
                Err(GetTimeoutError::Timeout) => {
                    lost_to_the_dead += 1;
                    assert!(
                        lost_to_the_dead <= round + 1,
                        "round {round}: more than one message lost per kill"
                    );
                    break;
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        let all = seen.to_vec();
        for (seq, (a, b)) in all.iter().zip(&mine).enumerate() {
            assert!(
                a + b <= 1,
                "round {round}: message {seq} delivered {} times",
                a + b
            );
        }

        // The whole capacity is there again, and it all comes out.
        for i in 0..CAP {
            let m = Counted {
                seq: u64::MAX,
                data: vec![i as u8; 10],
                sum: checksum(&[i as u8; 10]),
                handle: None,
            };
            if let Err(e) = q.try_put(m) {
                panic!("round {round}: only {i} of {CAP} slots usable after the kill: {e}");
            }
        }
        for _ in 0..CAP {
            let m = q.get_timeout(LONG).expect("get the fill");
            assert_eq!(m.seq, u64::MAX);
        }
        assert!(q.empty());
    }
    let all = seen.to_vec();
    let delivered = all
        .iter()
        .zip(&mine)
        .filter(|(a, b)| **a + **b == 1)
        .count() as u64;
    assert_eq!(delivered + lost_to_the_dead, total);
    assert!(
        lost_to_the_dead <= ROUNDS,
        "{lost_to_the_dead} messages lost in {ROUNDS} kills"
    );
    // Guards the test itself: most kills land inside a `get` (it is where
    // the consumer spends its time), so some message must have come back.
    assert!(
        out_of_order > 0,
        "no kill landed inside a get: recovery was not exercised"
    );
}

// ---------------------------------------------------------------------
// A dead holder whose pid went to a live process.
//
// (The pid helpers are `multiproc_tests::pid_reuse`.)

/// Set in a child that must stop for good in the middle of encoding
/// (`HANG_PUT`) or decoding (`HANG_GET`) a [`Msg`]: the event is set when
/// it gets there.
static HANG_PUT: OnceLock<Event> = OnceLock::new();
static HANG_GET: OnceLock<Event> = OnceLock::new();

/// A message that an encoder or decoder may be made to stop in (see
/// `HANG_PUT`), holding its queue slot until killed.
#[derive(Debug, PartialEq, Eq)]
struct Msg(u64);

fn hang_here(at: &OnceLock<Event>) {
    if let Some(event) = at.get() {
        event.set();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Serialize for Msg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        hang_here(&HANG_PUT);
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Msg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Msg, D::Error> {
        let n = u64::deserialize(d)?;
        hang_here(&HANG_GET);
        Ok(Msg(n))
    }
}

/// Stops for good in the middle of putting a message (its slot claimed,
/// half written).
#[process_fn]
fn put_and_hang(q: Queue<Msg>, there: Event) {
    HANG_PUT.set(there).expect("once");
    let _ = q.put(Msg(666));
}

/// Stops for good in the middle of getting a message (its slot taken).
#[process_fn]
fn get_and_hang(q: Queue<Msg>, there: Event) {
    HANG_GET.set(there).expect("once");
    let _ = q.get();
}

/// Starts `f` on `q`, waits until it stopped in the middle of a message,
/// then SIGKILLs it, reaps it (its pid is free) and starts a live process
/// with its pid if it can. Returns that heir.
fn kill_mid_message(
    f: fn(Queue<Msg>, Event) -> Process,
    q: &Queue<Msg>,
) -> Option<std::process::Child> {
    let there = Event::new().expect("event");
    let mut p = KillOnDrop(vec![f(q.clone(), there.clone())]);
    p.0[0].start().expect("start");
    assert!(
        there.wait_timeout(LONG),
        "the child never got into the message"
    );
    let pid = p.0[0].pid().expect("started");
    // A holder is told from the process that reuses its pid by its start
    // time in clock ticks: let it live past its first tick (see above).
    let started = let_it_age(pid, LONG);
    p.0[0].kill().expect("kill");
    p.0[0].join_timeout(LONG).expect("join").expect("reaped");
    let heir = spawn_with_pid(pid);
    if heir.is_some() {
        assert_ne!(start_ticks(pid), started, "the heir is another process");
    }
    heir
}

/// The heir lived through the recovery (so it was not because pid `pid`
/// was gone); then it is stopped.
fn check_and_stop(heir: Option<std::process::Child>) {
    if let Some(mut heir) = heir {
        assert!(heir.try_wait().expect("heir").is_none(), "the heir died");
        let _ = heir.kill();
        let _ = heir.wait();
    }
}

/// Every slot of `q` (capacity `cap`, empty) takes a message and gives it
/// back in order.
fn whole_capacity_works(q: &Queue<Msg>, cap: u64) {
    for i in 0..cap {
        if let Err(e) = q.try_put(Msg(1000 + i)) {
            panic!("only {i} of {cap} slots usable: {e}");
        }
    }
    for i in 0..cap {
        assert_eq!(q.get_timeout(LONG).expect("get"), Msg(1000 + i));
    }
    assert!(q.empty());
}

/// A producer killed in the middle of a put, whose pid then goes to a
/// live process: the messages put after it still come, in order, while
/// that heir lives (its slot is skipped: the dead writer is named by pid
/// and start time, and the heir's start time differs). A pid-only check
/// sees the heir alive and waits behind the dead writer's slot for good.
#[test]
fn a_writer_killed_mid_put_whose_pid_went_to_a_live_process_is_skipped() {
    let _serial = serial();
    const CAP: u64 = 8;
    let q = Queue::<Msg>::bounded(CAP as usize).expect("queue");
    let heir = kill_mid_message(|q, e| Process::new(put_and_hang, (q, e)), &q);
    for i in 0..2 * CAP {
        q.put_timeout(Msg(i), LONG).expect("put");
        match q.get_timeout(LONG) {
            Ok(m) => assert_eq!(m, Msg(i)),
            Err(e) => panic!("message {i} behind the dead writer's slot: {e}"),
        }
    }
    whole_capacity_works(&q, CAP);
    check_and_stop(heir);
}

/// A consumer killed in the middle of a get, whose pid then goes to a live
/// process: the message it was taking is delivered again (after the one
/// behind it) while that heir lives, and the queue keeps its capacity.
#[test]
fn a_consumer_killed_mid_get_whose_pid_went_to_a_live_process_is_recovered() {
    let _serial = serial();
    const CAP: u64 = 4;
    let q = Queue::<Msg>::bounded(CAP as usize).expect("queue");
    q.put(Msg(1)).expect("put");
    q.put(Msg(2)).expect("put");
    let heir = kill_mid_message(|q, e| Process::new(get_and_hang, (q, e)), &q);
    assert_eq!(q.get_timeout(LONG).expect("the next message"), Msg(2));
    match q.get_timeout(LONG) {
        Ok(m) => assert_eq!(m, Msg(1), "the dead consumer's message"),
        Err(e) => panic!("the dead consumer's message never came back: {e}"),
    }
    whole_capacity_works(&q, CAP);
    check_and_stop(heir);
}
