//! Process, spawn, exit codes, the registry across crates, and what
//! happens to children when their parent dies.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use multiproc::process::{active_children, current_process, parent_process};
use multiproc::{Error, Process, ProcessTask, process_fn};
use multiproc_tests::{eventually, helper_triple, pid_alive, sleep_forever};
use serde::{Deserialize, Serialize};

const LIMIT: Duration = Duration::from_secs(30);

#[process_fn]
fn nothing() {}

#[process_fn]
fn panics(message: String) {
    panic!("{message}");
}

#[process_fn]
fn exits_with(code: i32) {
    std::process::exit(code);
}

#[process_fn]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[process_fn]
fn describe() -> (String, u32, Option<(String, u32)>) {
    let me = current_process();
    let parent = parent_process().map(|p| (p.name().to_string(), p.pid()));
    (me.name().to_string(), me.pid(), parent)
}

fn not_registered(x: u64) -> u64 {
    x
}

fn run_to_end(mut p: Process) -> i32 {
    p.start().expect("start");
    let status = p
        .join_timeout(LIMIT)
        .expect("join")
        .expect("child ended in time");
    assert_eq!(p.exitcode(), Some(status.code()));
    assert!(!p.is_alive());
    status.code()
}

#[test]
fn exit_code_zero_on_return() {
    assert_eq!(run_to_end(Process::new(nothing, ())), 0);
}

#[test]
fn exit_code_one_after_panic() {
    assert_eq!(
        run_to_end(Process::new(
            panics,
            ("expected panic (exit code test)".to_string(),)
        )),
        1
    );
}

#[test]
fn exit_code_three_after_process_exit() {
    assert_eq!(run_to_end(Process::new(exits_with, (3,))), 3);
}

#[test]
fn terminate_gives_minus_fifteen_and_kill_minus_nine() {
    for (signal, expected) in [(15, -15), (9, -9)] {
        let mut p = Process::new(sleep_forever, ());
        p.start().expect("start");
        assert!(p.is_alive());
        assert_eq!(p.exitcode(), None);
        if signal == 15 {
            p.terminate()
        } else {
            p.kill()
        }
        .expect("signal");
        let status = p.join_timeout(LIMIT).expect("join").expect("ended");
        assert_eq!(status.code(), expected);
        assert_eq!(status.signal(), Some(signal));
        assert!(!status.success());
        // join again returns the cached status
        assert_eq!(p.join().expect("second join"), status);
    }
}

#[test]
fn join_timeout_on_a_sleeping_child_returns_none() {
    let mut p = Process::new(sleep_forever, ());
    p.start().expect("start");
    assert_eq!(
        p.join_timeout(Duration::from_millis(50)).expect("join"),
        None
    );
    assert!(p.is_alive());
    p.kill().expect("kill");
    assert!(p.join_timeout(LIMIT).expect("join").is_some());
}

#[test]
fn second_start_is_an_error() {
    let mut p = Process::new(nothing, ());
    p.start().expect("first start");
    assert!(matches!(p.start(), Err(Error::AlreadyStarted)));
    p.join_timeout(LIMIT).expect("join").expect("ended");
}

#[test]
fn join_before_start_is_an_error() {
    let mut p = Process::new(nothing, ());
    assert!(matches!(p.join(), Err(Error::NotStarted)));
    assert_eq!(p.pid(), None);
}

#[test]
fn spawn_returns_the_value() {
    let mut handle = multiproc::spawn(add, (40, 2)).expect("spawn");
    assert_eq!(handle.join_timeout(LIMIT).expect("join"), 42);
}

#[test]
fn spawn_returns_the_panic_message() {
    let mut handle =
        multiproc::spawn(panics, ("the answer is not 42".to_string(),)).expect("spawn");
    let pid = handle.pid();
    match handle.join_timeout(LIMIT) {
        Err(Error::Panicked {
            message,
            location,
            pid: p,
            ..
        }) => {
            assert_eq!(message, "the answer is not 42");
            assert!(
                location.is_some_and(|l| l.contains("process.rs")),
                "location names the file"
            );
            assert_eq!(p, pid);
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
}

#[test]
fn spawn_reports_a_killed_child() {
    let mut handle = multiproc::spawn(sleep_forever, ()).expect("spawn");
    let pid = handle.pid();
    handle.kill().expect("kill");
    match handle.join_timeout(LIMIT) {
        Err(Error::Killed { pid: p, signal: 9 }) => assert_eq!(p, pid),
        other => panic!("expected killed by 9, got {other:?}"),
    }
}

#[test]
fn spawn_reports_an_exit_without_result() {
    match multiproc::spawn(exits_with, (3,))
        .expect("spawn")
        .join_timeout(LIMIT)
    {
        Err(Error::Exited { code: 3, .. }) => {}
        other => panic!("expected exit 3, got {other:?}"),
    }
}

#[test]
fn unregistered_fn_is_refused_before_any_process_starts() {
    let before = multiproc_tests::child_pids().len();
    let err = multiproc::spawn(not_registered, (1,)).expect_err("not registered");
    assert!(matches!(err, Error::NotRegistered { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("not registered: add #[process_fn]"),
        "{err}"
    );
    let closure = |x: u64| x + 1;
    let err = multiproc::spawn(closure, (1,)).expect_err("closure");
    assert!(matches!(err, Error::NotRegistered { .. }), "{err}");
    let mut p = Process::new(not_registered, (1,));
    assert!(matches!(p.start(), Err(Error::NotRegistered { .. })));
    assert_eq!(p.pid(), None);
    // Other tests run concurrently; this one started nothing, so the count
    // cannot have grown because of it. Checked loosely: no child of ours
    // runs `not_registered` because none was started.
    let _ = before;
}

#[test]
fn a_fn_registered_in_another_crate_runs_in_the_child() {
    let mut handle = multiproc::spawn(helper_triple, (14,)).expect("spawn");
    assert_eq!(handle.join_timeout(LIMIT).expect("join"), 42);
}

#[test]
fn child_knows_its_name_and_parent() {
    let (name, pid, parent) = multiproc::spawn(describe, ())
        .expect("spawn")
        .join_timeout(LIMIT)
        .expect("join");
    assert!(name.starts_with("Process-"), "{name}");
    assert_ne!(pid, std::process::id());
    assert_eq!(
        parent,
        Some(("MainProcess".to_string(), std::process::id()))
    );
    assert_eq!(current_process().name(), "MainProcess");
    assert!(parent_process().is_none());
}

#[derive(Serialize, Deserialize, ProcessTask)]
struct ExitWithSum {
    a: i32,
    b: i32,
}

impl ProcessTask for ExitWithSum {
    fn run(self) {
        std::process::exit(self.a + self.b);
    }

    fn name(&self) -> Option<String> {
        Some(format!("sum-{}-{}", self.a, self.b))
    }
}

#[test]
fn a_process_task_run_sees_its_fields() {
    let p = Process::from_task(ExitWithSum { a: 3, b: 4 });
    assert_eq!(p.name(), "sum-3-4");
    assert_eq!(run_to_end(p), 7);
}

#[test]
fn builder_sets_name_and_daemon() {
    let mut p = Process::builder()
        .name("worker-7")
        .daemon(true)
        .target(sleep_forever, ())
        .build();
    assert_eq!((p.name(), p.daemon()), ("worker-7", true));
    p.start().expect("start");
    let pid = p.pid().expect("pid");
    assert!(
        active_children()
            .iter()
            .any(|c| c.pid() == pid && c.name() == "worker-7" && c.daemon())
    );
    p.kill().expect("kill");
    p.join_timeout(LIMIT).expect("join").expect("ended");
    assert!(!active_children().iter().any(|c| c.pid() == pid));
}

#[multiproc::test]
fn multiproc_test_attribute_works_in_an_integration_test() {
    assert_eq!(
        multiproc::spawn(add, (1, 2))
            .expect("spawn")
            .join_timeout(LIMIT)
            .expect("join"),
        3
    );
}

fn read_pid(child: &mut std::process::Child) -> u32 {
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read pid");
    line.trim().parse().expect("a pid")
}

fn parent_killed_then_child_gone(arg: &str) {
    let mut parent = Command::new(env!("CARGO_BIN_EXE_orphan_parent"))
        .arg(arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the parent");
    let grandchild = read_pid(&mut parent);
    assert!(grandchild > 0);
    assert!(
        pid_alive(grandchild),
        "the child lives while its parent lives"
    );
    parent.kill().expect("SIGKILL the parent");
    parent.wait().expect("reap the parent");
    assert!(
        eventually(Duration::from_secs(1), || !pid_alive(grandchild)),
        "child {grandchild} outlived its SIGKILLed parent by more than 1 s"
    );
}

#[test]
fn child_dies_within_a_second_of_its_parent_being_killed() {
    parent_killed_then_child_gone("main");
}

#[test]
fn child_started_from_a_finished_thread_lives_with_its_parent_and_dies_with_it() {
    parent_killed_then_child_gone("thread");
}

#[test]
fn end_of_main_terminates_daemons_and_joins_the_others() {
    let dir = std::env::temp_dir().join(format!("multiproc-daemon-end-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let mut program = Command::new(env!("CARGO_BIN_EXE_daemon_end"))
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the program");
    let daemon = read_pid(&mut program);
    let ended = eventually(LIMIT, || matches!(program.try_wait(), Ok(Some(_))));
    assert!(ended, "the program ended");
    assert!(program.wait().expect("status").success());
    assert!(
        !pid_alive(daemon),
        "the daemonic child was terminated at the end of main"
    );
    assert_eq!(
        std::fs::read(&dir).expect("the non-daemonic child finished before main returned"),
        b"joined"
    );
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn a_process_started_with_a_foreign_marker_runs_its_main() {
    // A program that inherits the child marker without having been started
    // by a multiproc parent (no socket from that parent at descriptor 3)
    // is not a child: it runs its `main`, here the test harness.
    let out = Command::new(std::env::current_exe().expect("exe"))
        .env("MULTIPROC_CHILD", "3:1:1")
        .arg("--list")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("a_process_started_with_a_foreign_marker_runs_its_main: test"),
        "the test harness ran: {stdout}"
    );
}

#[process_fn(name = "tests::duplicate")]
fn first_of_two() -> u8 {
    1
}

#[process_fn(name = "tests::duplicate")]
fn second_of_two() -> u8 {
    2
}

#[test]
fn two_registrations_with_one_name_are_reported_not_guessed() {
    for result in [
        multiproc::spawn(first_of_two, ()).map(|_| ()),
        multiproc::spawn(second_of_two, ()).map(|_| ()),
    ] {
        match result {
            Err(Error::DuplicateName { name }) => assert_eq!(name, "tests::duplicate"),
            other => panic!("expected a duplicate-name error, got {other:?}"),
        }
    }
}

#[process_fn]
fn fails_with(message: String) -> multiproc::Result<u8> {
    Err(Error::InvalidArgument { message })
}

#[test]
fn a_process_fn_may_return_a_multiproc_result() {
    match multiproc::spawn(fails_with, ("bad input".to_string(),))
        .expect("spawn")
        .join_timeout(LIMIT)
    {
        Ok(Err(Error::InvalidArgument { message })) => assert_eq!(message, "bad input"),
        other => panic!("expected the child's own error, got {other:?}"),
    }
}

#[process_fn]
fn answer_after(go: multiproc::sync::Event) -> u32 {
    assert!(go.wait_timeout(Duration::from_secs(30)), "never told to go");
    42
}

#[test]
fn join_timeout_keeps_the_handle_for_another_wait() {
    let go = multiproc::sync::Event::new().expect("event");
    let mut handle = multiproc::spawn(answer_after, (go.clone(),)).expect("spawn");
    let err = handle
        .join_timeout(Duration::from_millis(50))
        .expect_err("the child waits for its go");
    assert!(err.is_timeout(), "{err}");
    go.set();
    assert_eq!(handle.join_timeout(LIMIT).expect("second wait"), 42);
}

#[test]
fn a_process_built_without_a_target_is_misuse() {
    let mut p = Process::builder().name("nothing to run").build();
    let err = p.start().expect_err("no target");
    assert!(matches!(err, Error::Misuse { .. }), "{err}");
}
