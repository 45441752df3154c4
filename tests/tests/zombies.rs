//! Alone in its binary so that no other test's children are counted.
use std::time::Duration;

use multiproc::process_fn;

#[process_fn]
fn one() -> u8 {
    1
}

#[test]
fn no_zombie_and_no_descriptor_leak_after_200_spawn_join_cycles() {
    // Warm up lazily-initialized state (registry, build id) first.
    multiproc::spawn(one, ())
        .expect("spawn")
        .join_timeout(Duration::from_secs(30))
        .expect("join");
    let fds_before = multiproc_tests::open_fds();
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
    assert_eq!(
        multiproc_tests::child_pids(),
        Vec::<u32>::new(),
        "no child (zombie or not) is left"
    );
    assert_eq!(
        multiproc_tests::open_fds(),
        fds_before,
        "no descriptor leaked"
    );
}
