use std::os::fd::OwnedFd;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::*;
use crate::codec;
use crate::connection::{Connection, Pipe, Receiver, Sender};
use crate::queue::{JoinableQueue, Queue, SimpleQueue};
use crate::shared::{Array, RawArray, RawValue, SharedMemory, Value};
use crate::sync::{Barrier, BoundedSemaphore, Condition, Event, Lock, RLock, Semaphore};

/// An encoded message: its bytes and its descriptors.
type Payload = (Vec<u8>, Vec<OwnedFd>);

fn encode<T: Serialize>(value: &T) -> Payload {
    let (mut bytes, mut fds) = (Vec::new(), Vec::new());
    codec::encode(value, &mut bytes, &mut fds).expect("encode");
    (bytes, fds)
}

fn dup(fds: &[OwnedFd]) -> Vec<OwnedFd> {
    fds.iter().map(|fd| fd.try_clone().expect("dup")).collect()
}

/// The decode error of `bytes` + `fds` read as a `T`.
fn refusal<T: DeserializeOwned>(bytes: &[u8], fds: &[OwnedFd]) -> String {
    match codec::decode::<T>(bytes, dup(fds)) {
        Ok(_) => panic!("decoded as {}", std::any::type_name::<T>()),
        Err(Error::Decode { message }) => message,
        Err(other) => panic!("not a decode error: {other}"),
    }
}

/// Sends `value` and receives it as a `B`: the error.
fn confused<A: Serialize, B: DeserializeOwned>(value: &A) -> String {
    let (bytes, fds) = encode(value);
    refusal::<B>(&bytes, &fds)
}

/// Bytes of an encoded [`Tag`] (fixed-width).
const TAG_BYTES: usize = 4 + 8 + 4 + 4 + 8 + 8 + 8;
/// Where the tag's place (offset, then stamp) starts.
const PLACE_AT: usize = TAG_BYTES - 16;

fn shm_name(what: &str) -> String {
    format!("unit-handle-{what}-{}", std::process::id())
}

#[test]
fn the_four_confusions_of_the_issue_are_refused_naming_both_kinds() {
    let array = Array::new(&[1u64, 2, 3]).expect("array");
    let message = confused::<_, SharedMemory>(&array);
    assert!(
        message.contains("wrong handle kind: expected SharedMemory, found Array"),
        "{message}"
    );

    let bytes = Array::new(&[1u8, 2, 3]).expect("array");
    let message = confused::<_, RawArray<u8>>(&bytes);
    assert!(
        message.contains("expected RawArray<u8>, found Array"),
        "{message}"
    );

    let pair = ("name".to_string(), Lock::new().expect("lock"));
    let message = confused::<_, SharedMemory>(&pair);
    assert!(
        message.contains(
            "expected a handle (SharedMemory), found bytes that are not a multiproc handle"
        ),
        "{message}"
    );

    let queue = Queue::<u64>::bounded(2).expect("queue");
    let message = confused::<_, Queue<String>>(&queue);
    assert!(
        message.contains("wrong handle element type: expected Queue<alloc::string::String>")
            && message.contains("found a Queue of another element type (elements of 8 bytes"),
        "{message}"
    );
}

#[test]
fn kinds_that_share_a_layout_are_still_told_apart() {
    let msg = confused::<_, Semaphore>(&BoundedSemaphore::new(1).expect("sem"));
    assert!(msg.contains("found BoundedSemaphore"), "{msg}");
    let msg = confused::<_, BoundedSemaphore>(&Semaphore::new(1).expect("sem"));
    assert!(msg.contains("found Semaphore"), "{msg}");
    let msg = confused::<_, RLock>(&Lock::new().expect("lock"));
    assert!(msg.contains("expected RLock, found Lock"), "{msg}");
    let msg = confused::<_, Queue<u64>>(&JoinableQueue::<u64>::bounded(1).expect("q"));
    assert!(msg.contains("found JoinableQueue"), "{msg}");
    let msg = confused::<_, SimpleQueue<u64>>(&Queue::<u64>::bounded(1).expect("q"));
    assert!(
        msg.contains("expected SimpleQueue<u64>, found Queue "),
        "{msg}"
    );
    let (rx, tx) = Pipe::simplex::<u64>().expect("pipe");
    let msg = confused::<_, Connection<u64>>(&rx);
    assert!(msg.contains("found Receiver"), "{msg}");
    let msg = confused::<_, Receiver<u64>>(&tx);
    assert!(msg.contains("found Sender"), "{msg}");
    let (a, _b) = Pipe::new::<u64>().expect("pipe");
    let msg = confused::<_, Sender<u64>>(&a);
    assert!(msg.contains("found Connection"), "{msg}");
    // Same size and alignment, another type: the name tells them apart.
    let msg = confused::<_, Value<f32>>(&Value::new(1u32).expect("value"));
    assert!(msg.contains("Value<f32>"), "{msg}");
    let msg = confused::<_, RawValue<u64>>(&Value::new(1u64).expect("value"));
    assert!(msg.contains("found Value"), "{msg}");
    let msg = confused::<_, Connection<String>>(&a);
    assert!(msg.contains("another element type"), "{msg}");
}

#[test]
fn every_kind_round_trips_through_the_codec() {
    fn round<T: Serialize + DeserializeOwned>(value: &T) -> T {
        let (bytes, fds) = encode(value);
        codec::decode(&bytes, fds).expect("decode")
    }
    let q = round(&Queue::<u64>::bounded(3).expect("q"));
    q.put(5).expect("put");
    assert_eq!(q.capacity(), 3);
    let sq = round(&SimpleQueue::<u64>::new().expect("q"));
    sq.put(1).expect("put");
    let jq = round(&JoinableQueue::<u64>::bounded(2).expect("q"));
    jq.put(1).expect("put");
    let (a, mut b) = Pipe::new::<u64>().expect("pipe");
    round(&a).send(&7).expect("send");
    assert_eq!(b.recv().expect("recv"), 7);
    let (mut rx, tx) = Pipe::simplex::<u64>().expect("pipe");
    round(&tx).send(&8).expect("send");
    assert_eq!(rx.recv().expect("recv"), 8);
    tx.send(&9).expect("send");
    assert_eq!(round(&rx).recv().expect("recv"), 9);
    let lock = Lock::new().expect("lock");
    let held = lock.acquire().expect("acquire");
    assert!(round(&lock).is_locked());
    drop(held);
    assert!(!round(&RLock::new().expect("rlock")).is_poisoned());
    assert_eq!(round(&Semaphore::new(3).expect("sem")).value(), 3);
    assert!(
        round(&BoundedSemaphore::new(2).expect("sem"))
            .release()
            .is_err()
    );
    let event = Event::new().expect("event");
    round(&event).set();
    assert!(event.is_set());
    drop(
        round(&Condition::new().expect("cond"))
            .acquire()
            .expect("cond"),
    );
    assert_eq!(round(&Barrier::new(5).expect("barrier")).parties(), 5);
    let value = Value::new(40u64).expect("value");
    round(&value).fetch_add(2);
    assert_eq!(value.get(), 42);
    let raw = RawValue::new([1u8, 2, 3]).expect("raw value");
    round(&raw).set([4, 5, 6]);
    assert_eq!(raw.get(), [4, 5, 6]);
    let array = Array::new(&[1i32, 2, 3]).expect("array");
    round(&array).set(1, 20).expect("set");
    assert_eq!(array.to_vec(), [1, 20, 3]);
    let empty = round(&Array::<u64>::zeroed(0).expect("array"));
    assert!(empty.is_empty());
    let raw_array = RawArray::new(&[1u16, 2]).expect("raw array");
    round(&raw_array).set(0, 9).expect("set");
    assert_eq!(raw_array.to_vec(), [9, 2]);
    let shm = SharedMemory::create(&shm_name("round"), 100).expect("shm");
    let got = round(&shm);
    got.write(99, b"z").expect("write");
    assert_eq!((got.name(), got.size()), (shm.name(), 100));
    assert_eq!(shm.to_vec()[99], b'z');
    shm.unlink().expect("unlink");
}

/// The payload of `value` with the descriptor of slot `slot` replaced by
/// `fd` (indices: the codec numbers descriptors in order).
fn with_fd(value: &impl Serialize, index: usize, fd: OwnedFd) -> Payload {
    let (bytes, mut fds) = encode(value);
    fds[index] = fd;
    (bytes, fds)
}

#[test]
fn a_memfd_of_another_size_is_refused_before_it_is_mapped() {
    let big = Mapping::create("unit-big", 4096).expect("memfd");
    let lock = Lock::new().expect("lock");
    let (bytes, fds) = with_fd(&lock, 0, big.fd().try_clone_to_owned().expect("dup"));
    // A lock lives in an arena: the memfd offered in its place is not one.
    let msg = refusal::<Lock>(&bytes, &fds);
    assert!(
        msg.contains("4096 bytes where 1048576 were expected"),
        "{msg}"
    );
    // An object of its own memfd (too large for an arena) given a smaller
    // memfd.
    let array = Array::new(&[0u64; 1024]).expect("array");
    let (bytes, fds) = with_fd(&array, 0, big.fd().try_clone_to_owned().expect("dup"));
    let msg = refusal::<Array<u64>>(&bytes, &fds);
    assert!(msg.contains("4096 bytes where 8256 were expected"), "{msg}");
    // A Value<u64>'s cell offered as a Value<u32>'s, the tag rewritten to
    // say u32 (a lying sender): the cell's trailer still gives it away.
    let wide = Value::new(1u64).expect("value");
    let narrow = Value::new(1u32).expect("value");
    let (mut bytes, _) = encode(&narrow);
    let (wide_bytes, fds) = encode(&wide);
    bytes[PLACE_AT..TAG_BYTES].copy_from_slice(&wide_bytes[PLACE_AT..TAG_BYTES]);
    let msg = refusal::<Value<u32>>(&bytes, &fds);
    assert!(msg.contains("holds as another object"), "{msg}");
    drop(wide);
    let msg = refusal::<Value<u32>>(&bytes, &fds);
    assert!(msg.contains("holds another kind of object"), "{msg}");
    // Not a memfd at all.
    let (r, _w) = crate::sys::pipe().expect("pipe");
    let (bytes, fds) = with_fd(&Event::new().expect("event"), 0, r);
    assert!(refusal::<Event>(&bytes, &fds).contains("not a memfd"));
    // An array whose length field was changed: the announced size no
    // longer matches, whatever the memory.
    let array = Array::new(&[0u8; 16]).expect("array");
    let (mut bytes, fds) = encode(&array);
    let len_at = TAG_BYTES;
    bytes[len_at..len_at + 8].copy_from_slice(&17u64.to_le_bytes());
    let msg = refusal::<Array<u8>>(&bytes, &fds);
    assert!(
        msg.contains("announces a shared mapping of 80 bytes"),
        "{msg}"
    );
}

#[test]
fn a_forged_cell_is_a_decode_error_that_says_why() {
    let lock = Lock::new().expect("lock");
    let (bytes, fds) = encode(&lock);
    let offset = u64::from_le_bytes(bytes[PLACE_AT..PLACE_AT + 8].try_into().expect("8"));
    let forged = |offset: u64, stamp: Option<u64>| {
        let mut b = bytes.clone();
        b[PLACE_AT..PLACE_AT + 8].copy_from_slice(&offset.to_le_bytes());
        if let Some(stamp) = stamp {
            b[PLACE_AT + 8..TAG_BYTES].copy_from_slice(&stamp.to_le_bytes());
        }
        refusal::<Lock>(&b, &fds)
    };
    let msg = forged(offset + 16, None);
    assert!(
        msg.contains("a received Lock: refused a handle at byte"),
        "{msg}"
    );
    let msg = forged(1 << 40, None);
    assert!(msg.contains("not where one of its cells"), "{msg}");
    let msg = forged(offset, Some(12345));
    assert!(msg.contains("holds as another object"), "{msg}");
    // The next cells of the arena: not allocated, or another object.
    let msg = forged(offset + 64 * 1000, None);
    assert!(
        msg.contains("holds no object") || msg.contains("another object"),
        "{msg}"
    );
    // A Lock's cell read as an Event's (the tag's kind and size are the
    // Event's, the place the Lock's): refused, never an Event over a
    // Lock's bytes.
    let event = Event::new().expect("event");
    let (mut as_event, _) = encode(&event);
    as_event[PLACE_AT..TAG_BYTES].copy_from_slice(&bytes[PLACE_AT..TAG_BYTES]);
    let msg = refusal::<Event>(&as_event, &fds);
    assert!(msg.contains("holds as another object"), "{msg}");
    drop(lock);
    let msg = refusal::<Event>(&as_event, &fds);
    assert!(msg.contains("holds another kind of object"), "{msg}");
}

#[test]
fn descriptors_of_the_wrong_sort_or_missing_are_errors() {
    let (a, _b) = Pipe::new::<u64>().expect("pipe");
    let (bytes, fds) = encode(&a);
    // Slot 3 (the send lock) given the side socket.
    let side = fds[2].try_clone().expect("dup");
    let (bytes2, fds2) = (bytes.clone(), {
        let mut f = dup(&fds);
        f[3] = side;
        f
    });
    assert!(refusal::<Connection<u64>>(&bytes2, &fds2).contains("not a memfd"));
    // One descriptor short.
    let msg = refusal::<Connection<u64>>(&bytes, &fds[..3]);
    assert!(msg.contains("missing from the message"), "{msg}");
}

#[test]
fn a_received_shared_memory_name_is_checked() {
    let shm = SharedMemory::create(&shm_name("named"), 8).expect("shm");
    let (mut bytes, fds) = encode(&shm);
    shm.unlink().expect("unlink");
    // The name follows the tag: its length (u64), then its bytes.
    bytes[TAG_BYTES + 8 + 4] = b'/';
    let msg = refusal::<SharedMemory>(&bytes, &fds);
    assert!(msg.contains("a SharedMemory named \"unit/"), "{msg}");
}

#[test]
fn element_fingerprints() {
    assert_eq!(Elem::of::<u64>(), Elem::of::<u64>());
    assert_ne!(Elem::of::<u32>(), Elem::of::<f32>());
    assert_ne!(Elem::of::<u32>(), Elem::of::<i32>());
    assert_ne!(Elem::of::<(u8, u8)>(), Elem::of::<[u8; 2]>());
    assert_eq!(Elem::of::<[u8; 3]>().size, 3);
    let (bytes, _) = encode(&Lock::new().expect("lock"));
    assert_eq!(
        bytes.len(),
        TAG_BYTES + 4 + 4,
        "tag, four option bytes, one index"
    );
}

mod properties {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    /// Holds for a received handle: its mapping has exactly the size its
    /// type computes from its fields.
    fn sized<H: HandleWire>(handle: &H) -> std::result::Result<(), TestCaseError> {
        let parts = handle
            .parts()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want = H::mapping_size(&parts.plain).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parts.size, want, "{:?}", H::KIND);
        Ok(())
    }

    /// Decodes `bytes` + `fds` as an `H`: an error is fine (a decode
    /// error: nothing else is expected of a bad payload), a handle must be
    /// sized right and usable.
    fn try_as<H: HandleWire + DeserializeOwned>(
        bytes: &[u8],
        fds: &[OwnedFd],
        decoded: &mut Vec<Kind>,
        used: impl FnOnce(&H),
    ) -> std::result::Result<(), TestCaseError> {
        match codec::decode::<H>(bytes, dup(fds)) {
            Ok(handle) => {
                sized(&handle)?;
                used(&handle);
                decoded.push(H::KIND);
            }
            Err(Error::Decode { .. }) => {}
            Err(other) => return Err(TestCaseError::fail(format!("{other}"))),
        }
        Ok(())
    }

    /// Decodes the payload as every kind (and a `(String, Lock)`, recorded
    /// as a `Lock`); returns the kinds it decoded as.
    fn every_kind(bytes: &[u8], fds: &[OwnedFd]) -> std::result::Result<Vec<Kind>, TestCaseError> {
        let d = &mut Vec::new();
        try_as::<Queue<u64>>(bytes, fds, d, |q| {
            let _ = q.qsize();
        })?;
        try_as::<Queue<String>>(bytes, fds, d, |_| {})?;
        try_as::<SimpleQueue<u64>>(bytes, fds, d, |q| {
            let _ = q.empty();
        })?;
        try_as::<JoinableQueue<u64>>(bytes, fds, d, |_| {})?;
        try_as::<Connection<u64>>(bytes, fds, d, |_| {})?;
        try_as::<Sender<u64>>(bytes, fds, d, |_| {})?;
        try_as::<Receiver<u64>>(bytes, fds, d, |_| {})?;
        try_as::<Lock>(bytes, fds, d, |l| {
            let _ = l.is_locked();
        })?;
        try_as::<RLock>(bytes, fds, d, |l| {
            let _ = l.is_poisoned();
        })?;
        try_as::<Semaphore>(bytes, fds, d, |s| {
            let _ = s.value();
        })?;
        try_as::<BoundedSemaphore>(bytes, fds, d, |_| {})?;
        try_as::<Event>(bytes, fds, d, |e| {
            let _ = e.is_set();
        })?;
        try_as::<Condition>(bytes, fds, d, |_| {})?;
        try_as::<Barrier>(bytes, fds, d, |b| {
            let _ = (b.parties(), b.n_waiting());
        })?;
        try_as::<Value<u64>>(bytes, fds, d, |v| {
            let _ = v.load();
        })?;
        try_as::<Value<u8>>(bytes, fds, d, |v| {
            let _ = v.get();
        })?;
        try_as::<RawValue<[u32; 3]>>(bytes, fds, d, |v| {
            let _ = v.get();
        })?;
        try_as::<Array<u64>>(bytes, fds, d, |a| {
            assert_eq!(a.to_vec().len(), a.len());
        })?;
        try_as::<Array<u8>>(bytes, fds, d, |a| {
            assert_eq!(a.to_vec().len(), a.len());
        })?;
        try_as::<RawArray<u8>>(bytes, fds, d, |a| {
            assert_eq!(a.to_vec().len(), a.len());
        })?;
        try_as::<SharedMemory>(bytes, fds, d, |s| {
            assert_eq!(s.to_vec().len(), s.size());
        })?;
        match codec::decode::<(String, Lock)>(bytes, dup(fds)) {
            Ok((_, lock)) => {
                sized(&lock)?;
                d.push(Kind::Lock);
            }
            Err(Error::Decode { .. }) => {}
            Err(other) => return Err(TestCaseError::fail(format!("{other}"))),
        }
        Ok(std::mem::take(d))
    }

    /// One payload of every kind, and descriptors to swap in: all of them,
    /// plus memfds of sizes near the ones handles have, and a pipe.
    fn samples() -> (Vec<Payload>, Vec<OwnedFd>) {
        let shm = SharedMemory::create(&shm_name("prop"), 24).expect("shm");
        let (a, _b) = Pipe::new::<u64>().expect("pipe");
        let (rx, tx) = Pipe::simplex::<u64>().expect("pipe");
        let samples = vec![
            encode(&Queue::<u64>::bounded(2).expect("q")),
            encode(&SimpleQueue::<u64>::new().expect("q")),
            encode(&JoinableQueue::<u64>::bounded(1).expect("q")),
            encode(&a),
            encode(&rx),
            encode(&tx),
            encode(&Lock::new().expect("lock")),
            encode(&RLock::new().expect("rlock")),
            encode(&Semaphore::new(1).expect("sem")),
            encode(&BoundedSemaphore::new(1).expect("sem")),
            encode(&Event::new().expect("event")),
            encode(&Condition::new().expect("cond")),
            encode(&Barrier::new(2).expect("barrier")),
            encode(&Value::new(7u64).expect("value")),
            encode(&RawValue::new([1u32, 2, 3]).expect("value")),
            encode(&Array::new(&[1u64, 2]).expect("array")),
            encode(&Array::new(&[1u8, 2, 3]).expect("array")),
            encode(&RawArray::new(&[1u8; 5]).expect("array")),
            encode(&shm),
            encode(&("x".to_string(), Lock::new().expect("lock"))),
        ];
        shm.unlink().expect("unlink");
        let mut extra: Vec<OwnedFd> = samples.iter().flat_map(|(_, fds)| dup(fds)).collect();
        for len in [8, 12, 16, 24, 40, 64, 72, 80, 4096 + 2 * 1088, 4096] {
            let map = Mapping::create("unit-extra", len).expect("memfd");
            extra.push(map.fd().try_clone_to_owned().expect("dup"));
        }
        let (r, w) = crate::sys::pipe().expect("pipe");
        extra.extend([r, w]);
        (samples, extra)
    }

    /// How a payload is spoiled: bytes overwritten (position, value),
    /// little-endian words written (position, value), descriptors replaced
    /// (slot, which extra; `None`: removed), where the bytes are cut.
    type Spoil = (
        usize,
        Vec<(usize, u8)>,
        Vec<(usize, u64)>,
        Vec<(usize, Option<usize>)>,
        Option<usize>,
    );

    fn spoils() -> impl Strategy<Value = Spoil> {
        let words = prop_oneof![
            Just(0u64),
            Just(1),
            Just(2),
            Just(u64::MAX),
            Just(1 << 40),
            Just(u64::from(MAGIC) | 16),
            Just(u64::from(MAGIC) | 18),
            (0u64..5000),
            any::<u64>(),
        ];
        (
            any::<usize>(),
            vec((any::<usize>(), any::<u8>()), 0..4),
            vec((any::<usize>(), words), 0..3),
            vec((any::<usize>(), proptest::option::of(any::<usize>())), 0..3),
            proptest::option::weighted(0.2, any::<usize>()),
        )
    }

    fn spoil(samples: &[Payload], extra: &[OwnedFd], how: &Spoil) -> Payload {
        let (pick, bytes_at, words_at, fds_at, cut) = how;
        let (bytes, fds) = &samples[pick % samples.len()];
        let mut bytes = bytes.clone();
        for &(at, value) in words_at {
            if bytes.len() >= 8 {
                let at = at % (bytes.len() - 7);
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        for &(at, value) in bytes_at {
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[at % n] = value;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        let mut fds: Vec<Option<OwnedFd>> = dup(fds).into_iter().map(Some).collect();
        for &(slot, with) in fds_at {
            if fds.is_empty() {
                break;
            }
            let n = fds.len();
            fds[slot % n] = with.map(|i| extra[i % extra.len()].try_clone().expect("dup"));
        }
        // A removed descriptor shifts the later ones down, as a message
        // that lost one would.
        (bytes, fds.into_iter().flatten().collect())
    }

    #[test]
    fn spoiled_payloads_never_panic_nor_map_a_wrong_size() {
        let (samples, extra) = samples();
        // The samples themselves decode as their own kind and no other.
        for (i, (bytes, fds)) in samples.iter().enumerate() {
            let kinds = every_kind(bytes, fds).expect("a valid payload");
            assert_eq!(kinds.len(), 1, "sample {i} decodes as {kinds:?}");
        }
        let mut runner = TestRunner::new(Config {
            cases: 400,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&spoils(), |how| {
                let (bytes, fds) = spoil(&samples, &extra, &how);
                every_kind(&bytes, &fds).map(drop)
            })
            .expect("every spoiled payload is refused or sized right");
    }

    /// How a cell's place is forged: which sample, then the offset (taken
    /// from another sample and moved, or any), the stamp (its own, another
    /// sample's, any) and the tag's size (its own or another's).
    type Forgery = (usize, usize, i64, Option<u64>, usize, Option<u64>, bool);

    fn forgeries() -> impl Strategy<Value = Forgery> {
        let delta = prop_oneof![
            Just(0i64),
            Just(64),
            Just(-64),
            Just(8),
            Just(1),
            (-4096i64..4096),
            Just(1 << 20),
            Just(i64::MIN),
        ];
        (
            any::<usize>(),
            any::<usize>(),
            delta,
            proptest::option::weighted(0.1, any::<u64>()),
            any::<usize>(),
            proptest::option::weighted(0.2, any::<u64>()),
            any::<bool>(),
        )
    }

    fn word(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn forged_cells_are_refused_or_name_a_cell_of_their_kind() {
        // Handles in arena cells, held (so that their cells stay theirs),
        // and a few that were dropped after they were sent.
        let lock = Lock::new().expect("lock");
        let value = Value::new(7u64).expect("value");
        let byte = Value::new(1u8).expect("value");
        let event = Event::new().expect("event");
        let barrier = Barrier::new(3).expect("barrier");
        let array = Array::new(&[1u64; 40]).expect("array");
        let raw = RawArray::new(&[2u8; 300]).expect("array");
        let sem = BoundedSemaphore::new(2).expect("sem");
        let mut samples = vec![
            encode(&lock),
            encode(&value),
            encode(&byte),
            encode(&event),
            encode(&barrier),
            encode(&array),
            encode(&raw),
            encode(&sem),
        ];
        for _ in 0..3 {
            samples.push(encode(&Lock::new().expect("lock")));
            samples.push(encode(&Value::new(3u64).expect("value")));
        }
        for (i, (bytes, fds)) in samples.iter().enumerate() {
            assert_ne!(word(bytes, PLACE_AT + 8), 0, "sample {i} is in an arena");
            let kinds = every_kind(bytes, fds).expect("a valid payload");
            assert_eq!(kinds.len(), 1, "sample {i} decodes as {kinds:?}");
        }
        let mut runner = TestRunner::new(Config {
            cases: 600,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(
                &forgeries(),
                |(pick, from, delta, offset, stamp_of, stamp, size_of)| {
                    let n = samples.len();
                    let (bytes, fds) = &samples[pick % n];
                    let mut bytes = bytes.clone();
                    let other = &samples[from % n].0;
                    let offset =
                        offset.unwrap_or_else(|| word(other, PLACE_AT).wrapping_add_signed(delta));
                    let stamp =
                        stamp.unwrap_or_else(|| word(&samples[stamp_of % n].0, PLACE_AT + 8));
                    bytes[PLACE_AT..PLACE_AT + 8].copy_from_slice(&offset.to_le_bytes());
                    bytes[PLACE_AT + 8..TAG_BYTES].copy_from_slice(&stamp.to_le_bytes());
                    if size_of {
                        bytes[PLACE_AT - 8..PLACE_AT]
                            .copy_from_slice(&other[PLACE_AT - 8..PLACE_AT]);
                    }
                    // The arenas' descriptors may be swapped too: a message's
                    // descriptors are all arenas here.
                    let mut fds = dup(fds);
                    if delta == 1 {
                        fds = dup(&samples[from % n].1);
                    }
                    let kinds = every_kind(&bytes, &fds)?;
                    // A forged place decodes only as a cell that holds an
                    // object of that kind under that stamp: one of the
                    // samples, the same handle again.
                    prop_assert!(kinds.len() <= 1, "{kinds:?}");
                    if !kinds.is_empty() {
                        let real = samples.iter().any(|(b, _)| {
                            word(b, PLACE_AT) == offset && word(b, PLACE_AT + 8) == stamp
                        });
                        prop_assert!(real, "decoded a cell no handle was sent for");
                    }
                    Ok(())
                },
            )
            .expect("every forged cell is refused or is a real one");
        drop((lock, value, byte, event, barrier, array, raw, sem));
    }
}
