//! `ShareableList` and the `SharedMemory` name gaps of issue 13, across
//! real processes, with CPython's semantics as the reference: each type
//! round-trips, a too-long string is refused with a clear error, a block
//! made without a name gets a unique one, a consumer's `unlink` removes
//! the producer's name and a second `unlink` is an error.

use std::time::Duration;

use multiproc::shared::{ListItem, ShareableList, SharedMemory};
use multiproc::{Error, process_fn};

const JOIN: Duration = Duration::from_secs(30);

fn unique(what: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "mp-list-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn every_type() -> Vec<ListItem> {
    vec![
        ListItem::Int(-42),
        ListItem::Float(2.5),
        ListItem::Bool(true),
        ListItem::Str("howdy".into()),
        ListItem::Bytes(b"raw\0\0".to_vec()),
        ListItem::None,
        ListItem::Str(String::new()),
        ListItem::Int(i64::MAX),
    ]
}

/// Opens the list by name, reports what it holds, then writes new items
/// of every type.
#[process_fn]
fn read_then_rewrite(name: String) -> String {
    let list = ShareableList::open(&name).expect("open by name");
    let seen = format!("{:?}", list.to_vec().expect("items"));
    list.set(0, 7i64).expect("int");
    list.set(1, -0.125).expect("float");
    list.set(2, false).expect("bool");
    list.set(3, "héllo").expect("a str of 6 bytes fits 8");
    list.set(4, &b"\x00\xff"[..]).expect("bytes");
    list.set(5, "now str")
        .expect("a str in a None slot: 7 bytes fit 8");
    list.set(6, ()).expect("None");
    list.set(7, 1.0).expect("a float in an int slot");
    seen
}

#[test]
fn every_type_round_trips_between_processes() {
    let list = ShareableList::new(&every_type()).expect("list");
    assert_eq!(list.len(), 8);
    let mut child = multiproc::spawn(read_then_rewrite, (list.name().to_string(),)).expect("spawn");
    let seen = child.join_timeout(JOIN).expect("join");
    assert_eq!(
        seen,
        format!("{:?}", every_type()),
        "the child read every item"
    );
    assert_eq!(
        list.to_vec().expect("items"),
        [
            ListItem::Int(7),
            ListItem::Float(-0.125),
            ListItem::Bool(false),
            ListItem::Str("héllo".into()),
            ListItem::Bytes(vec![0, 0xff]),
            ListItem::Str("now str".into()),
            ListItem::None,
            ListItem::Float(1.0),
        ]
    );
    assert_eq!(list.count(&ListItem::None).expect("count"), 1);
    assert_eq!(list.index(&ListItem::Float(1.0)).expect("index"), Some(7));
    assert_eq!(list.index(&ListItem::Int(99)).expect("index"), None);
    list.unlink().expect("unlink");
}

#[process_fn]
fn sum_received(list: ShareableList) -> i64 {
    let mut total = 0;
    for item in list.to_vec().expect("items") {
        if let ListItem::Int(v) = item {
            total += v;
        }
    }
    list.set(0, total).expect("set");
    total
}

#[test]
fn a_list_travels_as_an_argument() {
    let items: Vec<ListItem> = (1..=10i64).map(ListItem::from).collect();
    let list = ShareableList::create(&unique("arg"), &items).expect("list");
    let mut child = multiproc::spawn(
        sum_received,
        (ShareableList::open(list.name()).expect("open"),),
    )
    .expect("spawn");
    assert_eq!(child.join_timeout(JOIN).expect("join"), 55);
    assert_eq!(list.get(0).expect("get"), ListItem::Int(55));
    list.unlink().expect("unlink");
}

#[test]
fn a_too_long_string_is_refused_with_a_clear_error() {
    let list = ShareableList::new(&[ListItem::from("abc"), ListItem::from(1i64)]).expect("list");
    assert_eq!(list.capacity(0), Some(8));
    list.set(0, "12345678").expect("8 bytes fit");
    let err = list.set(0, "123456789").expect_err("9 bytes do not");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("a str of 9 bytes"), "{text}");
    assert!(text.contains("slot 0"), "{text}");
    assert!(text.contains("at most 8 bytes"), "{text}");
    let err = list.set(1, vec![0u8; 9]).expect_err("bytes too");
    assert!(err.to_string().contains("bytes of 9 bytes"), "{err}");
    assert_eq!(
        list.get(0).expect("unchanged"),
        ListItem::Str("12345678".into())
    );
    assert!(list.get(2).is_err(), "out of range");
    list.unlink().expect("unlink");
}

#[test]
fn a_block_that_is_not_a_list_is_refused() {
    let shm = SharedMemory::new(64).expect("block");
    let err = ShareableList::open(shm.name()).expect_err("zeros");
    assert!(err.to_string().contains("not a ShareableList"), "{err}");
    // A list whose slot table was overwritten points outside the block.
    let list = ShareableList::new(&[ListItem::Int(1)]).expect("list");
    list.shm()
        .write(16, &u32::MAX.to_le_bytes())
        .expect("write");
    let err = ShareableList::open(list.name()).expect_err("forged offset");
    assert!(err.to_string().contains("slot 0 lies outside"), "{err}");
    // A slot whose bytes are not an item is an error, not a panic.
    let list2 = ShareableList::new(&[ListItem::Int(1)]).expect("list");
    list2.shm().write(24, &[9]).expect("a bad tag");
    assert!(matches!(list2.get(0), Err(Error::Decode { .. })));
    for name in [shm.name(), list.name(), list2.name()] {
        SharedMemory::open(name)
            .expect("open")
            .unlink()
            .expect("unlink");
    }
}

#[test]
fn an_empty_list_is_a_list() {
    let list = ShareableList::new(&[]).expect("empty");
    assert!(list.is_empty());
    assert!(ShareableList::open(list.name()).expect("open").is_empty());
    list.unlink().expect("unlink");
}

#[test]
fn shared_memory_without_a_name_gets_a_unique_one() {
    let a = SharedMemory::new(8).expect("a");
    let b = SharedMemory::new(8).expect("b");
    assert_ne!(a.name(), b.name());
    a.write(0, b"a").expect("write");
    let again = SharedMemory::open(a.name()).expect("open by its name");
    assert_eq!(again.to_vec()[0], b'a');
    a.unlink().expect("unlink");
    b.unlink().expect("unlink");
}

#[process_fn]
fn consumer_unlinks(name: String) -> (bool, String) {
    let shm = SharedMemory::open(&name).expect("open");
    let first = shm.unlink().is_ok();
    let second = shm
        .unlink()
        .map_or_else(|e| e.to_string(), |()| "ok".to_string());
    (first, second)
}

#[test]
fn a_consumer_unlinks_what_a_producer_created() {
    let name = unique("consumer");
    let producer = SharedMemory::create(&name, 16).expect("create");
    producer.write(0, b"kept").expect("write");
    let mut child = multiproc::spawn(consumer_unlinks, (name.clone(),)).expect("spawn");
    let (first, second) = child.join_timeout(JOIN).expect("join");
    assert!(first, "the consumer's unlink removes the name");
    assert!(second.contains("already unlinked"), "{second}");
    let err = SharedMemory::open(&name).expect_err("the name is gone");
    assert!(err.to_string().contains("no shared memory named"), "{err}");
    let err = producer.unlink().expect_err("a second unlink is an error");
    assert_eq!(err.io_kind(), Some(std::io::ErrorKind::NotFound), "{err}");
    // The memory itself lives on in the handles.
    assert_eq!(&producer.to_vec()[..4], b"kept");
    // And the name can be used again.
    let again = SharedMemory::create(&name, 4).expect("free again");
    again.unlink().expect("unlink");
}

#[process_fn]
fn unlink_received(shm: SharedMemory) -> bool {
    shm.unlink().is_ok()
}

#[test]
fn a_received_handle_can_unlink_and_a_stale_one_cannot_unlink_a_newer_block() {
    let name = unique("received");
    let first = SharedMemory::create(&name, 8).expect("create");
    let mut child = multiproc::spawn(unlink_received, (SharedMemory::open(&name).expect("open"),))
        .expect("spawn");
    assert!(child.join_timeout(JOIN).expect("join"));
    assert!(SharedMemory::open(&name).is_err());
    // A handle of the old block must not remove the name of a new one.
    let second = SharedMemory::create(&name, 8).expect("the name again");
    let err = first.unlink().expect_err("stale");
    assert!(err.to_string().contains("already unlinked"), "{err}");
    let opened_old = SharedMemory::open(&name).expect("the new block");
    second.unlink().expect("unlink");
    let _ = opened_old;
    let third = SharedMemory::create(&name, 8).expect("once more");
    let stale = SharedMemory::open(&name).expect("open");
    third.unlink().expect("unlink");
    let fourth = SharedMemory::create(&name, 8).expect("and again");
    let err = stale.unlink().expect_err("names another block");
    assert!(err.to_string().contains("another block"), "{err}");
    assert!(
        SharedMemory::open(&name).is_ok(),
        "the newer block keeps its name"
    );
    fourth.unlink().expect("unlink");
}
