//! `Process::close()` and `parent_process()`'s liveness, across real
//! processes (issue 13). Every wait is bounded.

use std::time::Duration;

use multiproc::process::parent_process;
use multiproc::{Error, Lock, Process, process_fn};

const JOIN: Duration = Duration::from_secs(30);

#[process_fn]
fn sleep_long() {
    std::thread::sleep(Duration::from_secs(60));
}

#[process_fn]
fn quick(lock: Lock) {
    drop(lock);
}

#[test]
fn close_is_refused_while_running_then_releases_the_handle() {
    let mut p = Process::new(sleep_long, ());
    p.start().expect("start");
    let err = p.close().expect_err("still running");
    assert!(matches!(err, Error::Misuse { .. }), "{err}");
    assert!(err.to_string().contains("running"), "{err}");
    // Nothing was released: the process is still there to be stopped.
    assert!(p.is_alive());
    p.kill().expect("kill");
    p.join_timeout(JOIN).expect("join").expect("ended");
    p.close().expect("ended: close");
    p.close().expect("twice is fine");
    assert_eq!(p.exitcode(), Some(-9), "the exit code is kept");
    assert!(!p.is_alive());
    assert_eq!(p.pid(), None);
    assert!(p.sentinel().is_none());
    for err in [
        p.join().map(drop).expect_err("closed"),
        p.start().expect_err("closed"),
        p.terminate().expect_err("closed"),
    ] {
        assert!(matches!(err, Error::Misuse { .. }), "{err}");
        assert!(err.to_string().contains("closed"), "{err}");
    }
}

#[test]
fn close_before_start_drops_the_arguments() {
    let lock = Lock::new().expect("lock");
    let mut p = Process::new(quick, (lock.clone(),));
    p.close().expect("never started");
    assert_eq!(p.exitcode(), None);
    assert!(matches!(p.start(), Err(Error::Misuse { .. })));
}

#[process_fn]
fn look_at_parent() -> (u32, bool, bool, bool) {
    let parent = parent_process().expect("a child has a parent");
    (
        parent.pid(),
        parent.is_alive(),
        parent
            .join_timeout(Duration::from_millis(10))
            .expect("poll"),
        parent.sentinel().is_some(),
    )
}

#[test]
fn parent_process_is_alive_and_can_be_waited_on() {
    assert!(
        parent_process().is_none(),
        "the test process has no parent of ours"
    );
    let mut child = multiproc::spawn(look_at_parent, ()).expect("spawn");
    let (pid, alive, ended, sentinel) = child.join_timeout(JOIN).expect("join");
    assert_eq!(pid, std::process::id());
    assert!(alive, "the parent waits for the child: it is alive");
    assert!(!ended, "join_timeout returns false while the parent runs");
    assert!(sentinel);
}

#[test]
fn parent_process_of_a_forkserver_child_is_the_program_not_the_server() {
    let ctx = multiproc::get_context(multiproc::StartMethod::ForkServer);
    let mut child = ctx.spawn(look_at_parent, ()).expect("spawn");
    let (pid, alive, ended, sentinel) = child.join_timeout(JOIN).expect("join");
    assert_eq!(
        pid,
        std::process::id(),
        "the program that asked, not the server"
    );
    assert!(alive);
    assert!(!ended);
    assert!(sentinel);
}
