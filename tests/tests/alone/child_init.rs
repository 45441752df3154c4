//! The child initializer (`multiproc::set_child_initializer`): it runs in
//! every child (Process, spawn, pool workers, their own children) before
//! the target. Process-wide state, which
//! is why this file is in the `alone` binary.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use multiproc::{Error, Pool, Process, process_fn};

const JOIN: Duration = Duration::from_secs(30);

/// Set by the initializer in a child.
static SETUP: AtomicU32 = AtomicU32::new(0);

#[process_fn]
fn setup(value: u32) {
    SETUP.store(value, Ordering::SeqCst);
}

#[process_fn]
fn failing_setup() {
    panic!("no logger for you");
}

#[process_fn]
fn seen(_: u32) -> u32 {
    SETUP.load(Ordering::SeqCst)
}

#[process_fn]
fn seen_by_grandchild() -> u32 {
    let mut grandchild = multiproc::spawn(seen, (0,)).expect("spawn");
    grandchild.join_timeout(JOIN).expect("join")
}

#[process_fn]
fn exit_with_setup() {
    std::process::exit(SETUP.load(Ordering::SeqCst) as i32);
}

#[test]
fn the_initializer_runs_in_every_kind_of_child_before_the_target() {
    let _alone = multiproc_tests::alone();
    multiproc::set_child_initializer(setup, (7,)).expect("registered");
    let mut child = multiproc::spawn(seen, (0,)).expect("spawn");
    assert_eq!(child.join_timeout(JOIN).expect("join"), 7, "spawn");
    let mut p = Process::new(exit_with_setup, ());
    p.start().expect("start");
    let status = p.join_timeout(JOIN).expect("join").expect("ended");
    assert_eq!(status.code(), 7, "Process");
    let pool = Pool::new(2).expect("pool");
    assert_eq!(pool.map(seen, 0..6).expect("map"), [7; 6], "pool workers");
    drop(pool);
    let mut child = multiproc::spawn(seen_by_grandchild, ()).expect("spawn");
    assert_eq!(
        child.join_timeout(JOIN).expect("join"),
        7,
        "inherited by a child's children"
    );
    assert_eq!(SETUP.load(Ordering::SeqCst), 0, "never run in the parent");
    multiproc::clear_child_initializer();
    let mut child = multiproc::spawn(seen, (0,)).expect("spawn");
    assert_eq!(child.join_timeout(JOIN).expect("join"), 0, "cleared");
}

#[test]
fn a_failing_initializer_stops_the_child_with_a_clear_error() {
    let _alone = multiproc_tests::alone();
    multiproc::set_child_initializer(failing_setup, ()).expect("registered");
    let mut child = multiproc::spawn(seen, (0,)).expect("spawn");
    let err = child
        .join_timeout(JOIN)
        .expect_err("the initializer failed");
    multiproc::clear_child_initializer();
    assert!(matches!(err, Error::InitializerFailed { .. }), "{err}");
    assert!(err.to_string().contains("no logger for you"), "{err}");
    assert!(err.to_string().contains("failing_setup"), "{err}");
}

fn not_registered(_: u32) {}

#[test]
fn the_initializer_must_be_registered() {
    let _alone = multiproc_tests::alone();
    let err = multiproc::set_child_initializer(not_registered, (1,)).expect_err("plain fn");
    assert!(matches!(err, Error::NotRegistered { .. }), "{err}");
}

#[test]
fn the_initializer_runs_in_every_child_of_the_forkserver() {
    let _alone = multiproc_tests::alone();
    multiproc::set_child_initializer(setup, (9,)).expect("registered");
    let ctx = multiproc::get_context(multiproc::StartMethod::ForkServer);
    let firsts: Vec<u32> = (0..2)
        .map(|_| {
            let mut child = ctx.spawn(seen, (0,)).expect("spawn");
            child.join_timeout(JOIN).expect("join")
        })
        .collect();
    multiproc::clear_child_initializer();
    assert_eq!(firsts, [9, 9], "each forked child ran it");
}
