//! Counts the children and descriptors of the whole process: in the
//! `alone` binary, so that no other test's are counted.
use std::time::Duration;

use multiproc::process_fn;

#[process_fn]
fn one() -> u8 {
    1
}

#[test]
fn no_zombie_and_no_descriptor_leak_after_200_spawn_join_cycles() {
    let _alone = multiproc_tests::alone();
    // Warm up lazily-initialized state (registry, build id) first.
    multiproc::spawn(one, ())
        .expect("spawn")
        .join_timeout(Duration::from_secs(30))
        .expect("join");
    let fds_before = multiproc_tests::open_fds();
    // Children that outlive their test by design (the forkserver an
    // earlier test of this binary started) are not the cycles' leftovers.
    let children_before = multiproc_tests::child_pids();
    for i in 0..200 {
        let value = multiproc::spawn(one, ())
            .expect("spawn")
            .join_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        assert_eq!(value, 1);
        let mut p = multiproc::Process::new(one, ());
        p.start().expect("start");
        p.join_timeout(Duration::from_secs(30))
            .expect("join")
            .expect("ended");
    }
    let left: Vec<u32> = multiproc_tests::child_pids()
        .into_iter()
        .filter(|pid| !children_before.contains(pid))
        .collect();
    assert_eq!(left, Vec::<u32>::new(), "no child (zombie or not) is left");
    assert_eq!(
        multiproc_tests::open_fds(),
        fds_before,
        "no descriptor leaked"
    );
}
