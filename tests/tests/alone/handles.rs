//! Handles on the wire: a handle is received as the type it was sent as or
//! not at all (through a Pipe, a Queue, into another process), refusals
//! leave no descriptor open, descriptors the kernel had to drop are an
//! error of their message, and every kind of handle round-trips through a
//! Pipe, a Queue, a process argument and a pool task. Every wait is bounded.
use std::marker::PhantomData;
use std::time::Duration;

use multiproc::connection::{Connection, Receiver, Sender};
use multiproc::queue::{GetTimeoutError, JoinableQueue, SimpleQueue};
use multiproc::shared::{RawArray, RawValue, SharedMemory};
use multiproc::sync::{Barrier, BoundedSemaphore, Condition, Event, RLock, Semaphore};
use multiproc::{Array, Error, Lock, Pipe, Pool, Queue, Value, process_fn};
use multiproc_tests::open_fds;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const LONG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------
// A handle received as another type.

/// Serialized as the `A` it holds, deserialized as a `B`: a sender and a
/// receiver that disagree on what a message is, over the real transport
/// (bytes, and descriptors by SCM_RIGHTS).
enum Confused<A, B> {
    Sent(A),
    Received(PhantomData<B>),
}

impl<A: Serialize, B> Serialize for Confused<A, B> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Confused::Sent(a) => a.serialize(s),
            Confused::Received(_) => Err(serde::ser::Error::custom("nothing to send")),
        }
    }
}

impl<'de, A, B: Deserialize<'de>> Deserialize<'de> for Confused<A, B> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        B::deserialize(d).map(|_| Confused::Received(PhantomData))
    }
}

/// The message of the decode error `result` must be.
fn decode_error<T, E: Into<Error>>(result: Result<T, E>) -> String {
    match result.map_err(Into::into) {
        Ok(_) => panic!("a handle was received as another type"),
        Err(Error::Decode { message }) => message,
        Err(other) => panic!("not a decode error: {other}"),
    }
}

/// Sends `value` through a Pipe and receives it as a `B`.
fn through_pipe<A: Serialize, B: DeserializeOwned>(value: A) -> String {
    let (tx, mut rx) = Pipe::new::<Confused<A, B>>().expect("pipe");
    tx.send(&Confused::Sent(value)).expect("send");
    decode_error(rx.recv_timeout(LONG))
}

/// Puts `value` into a Queue and gets it as a `B`.
fn through_queue<A: Serialize + 'static, B: DeserializeOwned + 'static>(value: A) -> String {
    let q = Queue::<Confused<A, B>>::bounded(2).expect("queue");
    q.put(Confused::Sent(value))
        .map_err(|e| e.to_string())
        .expect("put");
    match q.get_timeout(LONG) {
        Err(GetTimeoutError::Failed(e)) => decode_error::<(), Error>(Err(e)),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a handle was received as another type"),
    }
}

fn shm_name(what: &str) -> String {
    format!("handles-{what}-{}", std::process::id())
}

/// Each confusion of the issue, by both ways, fails with a message that
/// names what was expected and what came.
#[test]
fn a_handle_received_as_another_type_is_a_decode_error_naming_both() {
    let _alone = multiproc_tests::alone();
    let array = || Array::new(&[1u64, 2, 3]).expect("array");
    let bytes = || Array::new(&[1u8, 2, 3]).expect("array");
    let pair = || ("name".to_string(), Lock::new().expect("lock"));
    let queue = || Queue::<u64>::bounded(1).expect("queue");
    for message in [
        through_pipe::<_, SharedMemory>(array()),
        through_queue::<_, SharedMemory>(array()),
    ] {
        assert!(
            message.contains("wrong handle kind: expected SharedMemory, found Array"),
            "{message}"
        );
    }
    for message in [
        through_pipe::<_, RawArray<u8>>(bytes()),
        through_queue::<_, RawArray<u8>>(bytes()),
    ] {
        assert!(
            message.contains("wrong handle kind: expected RawArray<u8>, found Array"),
            "{message}"
        );
    }
    for message in [
        through_pipe::<_, SharedMemory>(pair()),
        through_queue::<_, SharedMemory>(pair()),
    ] {
        assert!(
            message.contains(
                "expected a handle (SharedMemory), found bytes that are not a multiproc handle"
            ),
            "{message}"
        );
    }
    for message in [
        through_pipe::<_, Queue<String>>(queue()),
        through_queue::<_, Queue<String>>(queue()),
    ] {
        assert!(
            message.contains(
                "wrong handle element type: expected Queue<alloc::string::String> (elements of \
                 24 bytes, aligned to 8), found a Queue of another element type (elements of 8 \
                 bytes, aligned to 8)"
            ),
            "{message}"
        );
    }
    // The channels that carried them still work.
    let (tx, mut rx) = Pipe::new::<Confused<Lock, SharedMemory>>().expect("pipe");
    tx.send(&Confused::Sent(Lock::new().expect("lock")))
        .expect("send");
    decode_error(rx.recv_timeout(LONG));
    tx.send_bytes(b"after").expect("send bytes");
    assert_eq!(rx.recv_bytes_timeout(LONG).expect("recv bytes"), b"after");
}

#[process_fn]
fn receive_as_shared_memory(mut end: Connection<Confused<Array<u64>, SharedMemory>>) -> String {
    match end.recv_timeout(LONG) {
        Ok(_) => "received an Array as a SharedMemory".to_string(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn another_process_refuses_a_handle_of_another_type() {
    let _alone = multiproc_tests::alone();
    let (mine, theirs) = Pipe::new::<Confused<Array<u64>, SharedMemory>>().expect("pipe");
    let mut child = multiproc::spawn(receive_as_shared_memory, (theirs,)).expect("spawn");
    let array = Array::new(&[7u64; 100]).expect("array");
    mine.send(&Confused::Sent(array.clone())).expect("send");
    let said = child.join_timeout(LONG).expect("the child returned");
    assert!(
        said.contains(
            "could not decode the value: wrong handle kind: expected SharedMemory, found Array"
        ),
        "{said}"
    );
    assert_eq!(array.to_vec(), [7u64; 100]);
}

#[test]
fn refused_handles_leave_no_descriptor_open() {
    let _alone = multiproc_tests::alone();
    let (tx, mut rx) =
        Pipe::new::<Confused<(Queue<u64>, Array<u8>), Queue<String>>>().expect("pipe");
    let q = Queue::<Confused<(Queue<u64>, Array<u8>), (Queue<u64>, RawArray<u8>)>>::bounded(4)
        .expect("queue");
    let payload = || {
        (
            Queue::<u64>::bounded(1).expect("queue"),
            Array::new(&[1u8]).expect("array"),
        )
    };
    let mut round = || {
        tx.send(&Confused::Sent(payload())).expect("send");
        decode_error(rx.recv_timeout(LONG));
        q.put(Confused::Sent(payload()))
            .map_err(|e| e.to_string())
            .expect("put");
        assert!(matches!(
            q.get_timeout(LONG),
            Err(GetTimeoutError::Failed(_))
        ));
    };
    // Warm up (thread-local buffers, the queue's side socket).
    for _ in 0..3 {
        round();
    }
    let before = open_fds();
    for _ in 0..200 {
        round();
    }
    assert_eq!(open_fds(), before);
}

// ---------------------------------------------------------------------
// Descriptors the kernel had to drop (a full descriptor table).

fn open_fd_numbers() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Lowers this process's descriptor limit so that exactly `free` (at
/// least 1) descriptor numbers are left; returns the limits to restore.
fn leave_free(free: u64) -> (u64, u64) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    // The listing holds the lowest free number while it runs, so it is
    // counted as open, and is free again once the listing is done: the
    // highest limit below which `free - 1` numbers are counted free leaves
    // `free`.
    let open = open_fd_numbers();
    let counted_free =
        |limit: u64| limit - open.iter().filter(|&&fd| (fd as u64) < limit).count() as u64;
    let mut limit = 1u64;
    while counted_free(limit) < free {
        limit += 1;
    }
    setrlimit(Resource::RLIMIT_NOFILE, limit - 1, hard).expect("setrlimit");
    (soft, hard)
}

#[process_fn]
fn get_with_few_descriptors(
    q: Queue<Vec<Array<u8>>>,
    ready: Queue<u8>,
) -> (String, usize, usize, String) {
    // Fewer than the six arrays of a message (each large enough to have a
    // memfd of its own: small objects share an arena's descriptor).
    let (soft, hard) = leave_free(3);
    let before = open_fd_numbers().len();
    ready.put(1).expect("ready");
    let first = match q.get_timeout(LONG) {
        Ok(v) => format!("received {} arrays", v.len()),
        Err(e) => e.to_string(),
    };
    let after = open_fd_numbers().len();
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore");
    ready.put(2).expect("ready again");
    let second = match q.get_timeout(LONG) {
        Ok(v) => format!("received {} arrays", v.len()),
        Err(e) => e.to_string(),
    };
    (first, before, after, second)
}

#[test]
fn a_queue_message_whose_descriptors_were_truncated_is_an_error_and_later_ones_work() {
    let _alone = multiproc_tests::alone();
    let q = Queue::<Vec<Array<u8>>>::bounded(4).expect("queue");
    let ready = Queue::<u8>::bounded(2).expect("queue");
    let mut child =
        multiproc::spawn(get_with_few_descriptors, (q.clone(), ready.clone())).expect("spawn");
    let locks = || {
        (0..6)
            .map(|_| Array::new(&[0u8; 8192]).expect("array"))
            .collect::<Vec<_>>()
    };
    assert_eq!(ready.get_timeout(LONG).expect("ready"), 1);
    q.put(locks()).map_err(|e| e.to_string()).expect("put");
    assert_eq!(ready.get_timeout(LONG).expect("ready again"), 2);
    q.put(locks()).map_err(|e| e.to_string()).expect("put");
    let (first, before, after, second) = child.join_timeout(LONG).expect("the child returned");
    assert!(first.contains("MSG_CTRUNC"), "{first}");
    assert_eq!(before, after, "the descriptors that did arrive were closed");
    assert_eq!(second, "received 6 arrays");
}

#[process_fn]
fn open_with_one_descriptor_free(name: String) -> (String, String) {
    // The one number left is the connection's: the memfd finds none.
    let (soft, hard) = leave_free(1);
    let first = match SharedMemory::open(&name) {
        Ok(_) => "opened".to_string(),
        Err(e) => e.to_string(),
    };
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore");
    let second = match SharedMemory::open(&name) {
        Ok(shm) => String::from_utf8_lossy(&shm.to_vec()).into_owned(),
        Err(e) => e.to_string(),
    };
    (first, second)
}

#[test]
fn a_shared_memory_dropped_by_a_full_descriptor_table_is_an_error_not_a_refusal() {
    let _alone = multiproc_tests::alone();
    let name = shm_name("ctrunc");
    let shm = SharedMemory::create(&name, 5).expect("create");
    shm.write(0, b"there").expect("write");
    let mut child = multiproc::spawn(open_with_one_descriptor_free, (name,)).expect("spawn");
    let (first, second) = child.join_timeout(LONG).expect("the child returned");
    shm.unlink().expect("unlink");
    assert!(first.contains("MSG_CTRUNC"), "{first}");
    assert!(!first.contains("refused"), "{first}");
    assert_eq!(second, "there");
}

// ---------------------------------------------------------------------
// Every kind, through every way a handle travels.

/// One handle of every kind.
#[derive(Serialize, Deserialize)]
struct Handles {
    queue: Queue<u64>,
    simple: SimpleQueue<String>,
    joinable: JoinableQueue<u64>,
    duplex: Connection<u64>,
    sender: Sender<u64>,
    receiver: Receiver<u64>,
    lock: Lock,
    rlock: RLock,
    semaphore: Semaphore,
    bounded: BoundedSemaphore,
    event: Event,
    condition: Condition,
    barrier: Barrier,
    value: Value<u64>,
    raw_value: RawValue<[u16; 3]>,
    array: Array<u32>,
    raw_array: RawArray<i64>,
    shm: SharedMemory,
}

/// What the sender keeps: the other ends, and clones to look through.
struct Kept {
    queue: Queue<u64>,
    simple: SimpleQueue<String>,
    joinable: JoinableQueue<u64>,
    duplex: Connection<u64>,
    from_sender: Receiver<u64>,
    semaphore: Semaphore,
    bounded: BoundedSemaphore,
    event: Event,
    value: Value<u64>,
    raw_value: RawValue<[u16; 3]>,
    array: Array<u32>,
    raw_array: RawArray<i64>,
    shm: SharedMemory,
}

/// What the receiver of the handles saw.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Seen {
    duplex: u64,
    receiver: u64,
    lock_poisoned: bool,
    rlock_poisoned: bool,
    condition_poisoned: bool,
    barrier_broken: bool,
    bounded_acquired: bool,
    shm: (String, usize),
}

/// Poisons a lock by panicking while holding it (quietly: the tests of
/// this file run one at a time, so the hook is ours for the moment).
fn poison(hold: impl FnOnce() + std::panic::UnwindSafe) {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    assert!(std::panic::catch_unwind(hold).is_err());
    std::panic::set_hook(hook);
}

/// Handles of every kind, in a state the receiver can recognise.
fn handles(what: &str) -> (Handles, Kept) {
    let queue = Queue::bounded(4).expect("queue");
    let simple = SimpleQueue::new().expect("simple queue");
    let joinable = JoinableQueue::bounded(4).expect("joinable queue");
    let (duplex, kept_duplex) = Pipe::new::<u64>().expect("pipe");
    let (from_sender, sender) = Pipe::simplex::<u64>().expect("pipe");
    let (receiver, to_receiver) = Pipe::simplex::<u64>().expect("pipe");
    kept_duplex.send(&40).expect("send");
    to_receiver.send(&60).expect("send");
    let lock = Lock::new().expect("lock");
    let rlock = RLock::new().expect("rlock");
    let condition = Condition::new().expect("condition");
    let (l, r, c) = (lock.clone(), rlock.clone(), condition.clone());
    poison(move || {
        let _l = l.acquire();
        let _r = r.acquire();
        let _c = c.acquire();
        panic!("poisons all three");
    });
    let barrier = Barrier::new(3).expect("barrier");
    barrier.abort();
    let shm = SharedMemory::create(&shm_name(what), 16).expect("shm");
    let sent = Handles {
        queue: queue.clone(),
        simple: simple.clone(),
        joinable: joinable.clone(),
        duplex,
        sender,
        receiver,
        lock,
        rlock,
        semaphore: Semaphore::new(0).expect("semaphore"),
        bounded: BoundedSemaphore::new(2).expect("bounded semaphore"),
        event: Event::new().expect("event"),
        condition,
        barrier,
        value: Value::new(10).expect("value"),
        raw_value: RawValue::new([1, 2, 3]).expect("raw value"),
        array: Array::new(&[1, 2, 3]).expect("array"),
        raw_array: RawArray::zeroed(2).expect("raw array"),
        shm,
    };
    let kept = Kept {
        queue,
        simple,
        joinable,
        duplex: kept_duplex,
        from_sender,
        semaphore: sent.semaphore.clone(),
        bounded: sent.bounded.clone(),
        event: sent.event.clone(),
        value: sent.value.clone(),
        raw_value: sent.raw_value.clone(),
        array: sent.array.clone(),
        raw_array: sent.raw_array.clone(),
        shm: SharedMemory::open(&shm_name(what)).expect("open"),
    };
    // The name is not needed any more: received handles map the memory.
    sent.shm.unlink().expect("unlink");
    (sent, kept)
}

/// Uses every handle, as a receiver would.
fn exercise(mut h: Handles) -> Seen {
    h.queue.put(1).expect("queue");
    h.simple.put("simple".to_string()).expect("simple queue");
    h.joinable.put(3).expect("joinable queue");
    let duplex = h.duplex.recv_timeout(LONG).expect("duplex recv");
    h.duplex.send(&4).expect("duplex send");
    h.sender.send(&5).expect("sender");
    let receiver = h.receiver.recv_timeout(LONG).expect("receiver");
    h.semaphore.release().expect("semaphore");
    h.event.set();
    h.value.fetch_add(5);
    h.raw_value.set([7, 8, 9]);
    h.array.set(2, 33).expect("array");
    h.raw_array.set(0, -4).expect("raw array");
    h.shm.write(5, b"hey").expect("shm");
    Seen {
        duplex,
        receiver,
        lock_poisoned: h.lock.is_poisoned(),
        rlock_poisoned: h.rlock.is_poisoned(),
        condition_poisoned: h.condition.acquire().is_err(),
        barrier_broken: h.barrier.is_broken(),
        bounded_acquired: h.bounded.try_acquire(),
        shm: (h.shm.name().to_string(), h.shm.size()),
    }
}

#[process_fn]
fn exercise_elsewhere(h: Handles) -> Seen {
    exercise(h)
}

/// Checks that what the receiver did reached the sender's objects.
fn verify(what: &str, mut kept: Kept, seen: Seen) {
    assert_eq!(
        seen,
        Seen {
            duplex: 40,
            receiver: 60,
            lock_poisoned: true,
            rlock_poisoned: true,
            condition_poisoned: true,
            barrier_broken: true,
            bounded_acquired: true,
            shm: (shm_name(what), 16),
        },
        "through {what}"
    );
    assert_eq!(kept.queue.get_timeout(LONG).expect("queue"), 1);
    assert_eq!(kept.simple.get().expect("simple queue"), "simple");
    assert_eq!(kept.joinable.get_timeout(LONG).expect("joinable"), 3);
    kept.joinable.task_done().expect("task done");
    kept.joinable.join_timeout(LONG).expect("joined");
    assert_eq!(kept.duplex.recv_timeout(LONG).expect("duplex"), 4);
    assert_eq!(kept.from_sender.recv_timeout(LONG).expect("sender"), 5);
    assert_eq!(kept.semaphore.value(), 1);
    assert_eq!(kept.bounded.value(), 1);
    assert!(kept.event.is_set());
    assert_eq!(kept.value.get(), 15);
    assert_eq!(kept.raw_value.get(), [7, 8, 9]);
    assert_eq!(kept.array.to_vec(), [1, 2, 33]);
    assert_eq!(kept.raw_array.to_vec(), [-4, 0]);
    assert_eq!(&kept.shm.to_vec()[5..8], b"hey");
}

#[test]
fn every_kind_of_handle_round_trips_through_a_pipe() {
    let _alone = multiproc_tests::alone();
    let (sent, kept) = handles("pipe");
    let (tx, mut rx) = Pipe::new::<Handles>().expect("pipe");
    tx.send(&sent).expect("send");
    drop(sent);
    let got = rx.recv_timeout(LONG).expect("recv");
    verify("pipe", kept, exercise(got));
}

#[test]
fn every_kind_of_handle_round_trips_through_a_queue() {
    let _alone = multiproc_tests::alone();
    let (sent, kept) = handles("queue");
    let q = Queue::<Handles>::bounded(1).expect("queue");
    q.put(sent).map_err(|e| e.to_string()).expect("put");
    let got = q.get_timeout(LONG).expect("get");
    verify("queue", kept, exercise(got));
}

#[test]
fn every_kind_of_handle_round_trips_as_a_process_argument() {
    let _alone = multiproc_tests::alone();
    let (sent, kept) = handles("process");
    let mut child = multiproc::spawn(exercise_elsewhere, (sent,)).expect("spawn");
    verify(
        "process",
        kept,
        child.join_timeout(LONG).expect("the child returned"),
    );
}

#[test]
fn every_kind_of_handle_round_trips_as_a_pool_task() {
    let _alone = multiproc_tests::alone();
    let (sent, kept) = handles("pool");
    let pool = Pool::new(1).expect("pool");
    let seen = pool
        .apply_async(exercise_elsewhere, (sent,))
        .expect("submit")
        .get_timeout(LONG)
        .expect("the task returned");
    verify("pool", kept, seen);
}
