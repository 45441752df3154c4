//! The forkserver start method: the same semantics as `spawn` from the
//! user's side (exit codes, signals, sentinels, results, panics), the
//! server's life (restart after its death, none left after the program's
//! SIGKILL), pools, the context API and the preload.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use multiproc::process::{active_children, current_process, parent_process};
use multiproc::{Error, Pool, Process, StartMethod, process_fn};
use multiproc_tests::{eventually, open_fds, pid_alive, sleep_forever};

const LIMIT: Duration = Duration::from_secs(30);

fn ctx() -> multiproc::Context {
    multiproc::get_context(StartMethod::ForkServer)
}

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
fn describe() -> (String, u32, Option<(String, u32)>, u32) {
    let me = current_process();
    let parent = parent_process().map(|p| (p.name().to_string(), p.pid()));
    (
        me.name().to_string(),
        me.pid(),
        parent,
        std::os::unix::process::parent_id(),
    )
}

#[process_fn]
fn os_parent() -> u32 {
    std::os::unix::process::parent_id()
}

#[process_fn]
fn os_parent_of(_item: u64) -> u32 {
    std::os::unix::process::parent_id()
}

#[process_fn]
fn env_var(name: String) -> Option<String> {
    std::env::var(name).ok()
}

#[process_fn]
fn inc(x: u64) -> u64 {
    x + 1
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
fn the_start_methods_are_cpythons() {
    assert_eq!(
        multiproc::get_all_start_methods(),
        &[StartMethod::Spawn, StartMethod::ForkServer]
    );
    assert_eq!(
        "forkserver".parse::<StartMethod>().ok(),
        Some(StartMethod::ForkServer)
    );
    assert_eq!(
        "spawn".parse::<StartMethod>().ok(),
        Some(StartMethod::Spawn)
    );
    let err = "fork".parse::<StartMethod>().expect_err("no fork");
    assert!(err.to_string().contains("forkserver"), "{err}");
    assert_eq!(StartMethod::ForkServer.to_string(), "forkserver");
    assert_eq!(ctx().start_method(), StartMethod::ForkServer);
}

#[test]
fn exit_codes_are_pythons() {
    assert_eq!(run_to_end(ctx().process(nothing, ())), 0);
    assert_eq!(run_to_end(ctx().process(exits_with, (7,))), 7);
    let quiet = Process::builder()
        .start_method(StartMethod::ForkServer)
        .target(panics, ("boom".to_string(),))
        .build();
    assert_eq!(run_to_end(quiet), 1);
}

/// Exits 0 when `bytes` are `len` bytes counting up from 0 (mod 251), 3
/// otherwise.
#[process_fn]
fn exits_unless_counted(bytes: Vec<u8>, len: usize) {
    let counted =
        bytes.len() == len && bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8);
    if !counted {
        std::process::exit(3);
    }
}

#[test]
fn a_process_gets_its_arguments_in_the_request_or_on_its_socket_when_too_long() {
    // 16 KiB and less ride in the fork request; more go on the child's
    // socket after the fork.
    for len in [0, 100, 16 * 1024 - 64, 16 * 1024 + 1, 1 << 20] {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let code = run_to_end(ctx().process(exits_unless_counted, (bytes, len)));
        assert_eq!(code, 0, "{len} bytes of arguments");
    }
}

#[test]
fn terminate_and_kill_give_minus_the_signal() {
    for (signal, code) in [(false, -15), (true, -9)] {
        let mut p = ctx().process(sleep_forever, ());
        p.start().expect("start");
        assert!(p.is_alive());
        assert_eq!(p.exitcode(), None);
        assert!(
            p.join_timeout(Duration::from_millis(10))
                .expect("join")
                .is_none()
        );
        if signal {
            p.kill().expect("kill");
        } else {
            p.terminate().expect("terminate");
        }
        let status = p.join_timeout(LIMIT).expect("join").expect("ended");
        assert_eq!(status.code(), code);
        assert_eq!(p.exitcode(), Some(code));
        // Signalling an ended child is harmless (its pid is never reused
        // under it: the signal goes through a pidfd).
        p.kill().expect("kill after the end");
    }
}

#[test]
fn spawn_returns_values_and_panics() {
    let mut handle = ctx().spawn(add, (2, 3)).expect("spawn");
    assert_eq!(handle.join_timeout(LIMIT).expect("join"), 5);
    let mut handle = ctx()
        .spawn(panics, ("no luck".to_string(),))
        .expect("spawn");
    match handle.join_timeout(LIMIT) {
        Err(Error::Panicked { message, .. }) => assert!(message.contains("no luck"), "{message}"),
        other => panic!("not a panic: {other:?}"),
    }
}

/// The server runs with `LD_BIND_NOW` (so that its children do not each
/// resolve symbols lazily), but a child sees the program's environment.
#[test]
fn a_forked_child_has_the_programs_environment_without_the_servers_loader_variable() {
    let mine = std::env::var("LD_BIND_NOW").ok();
    let mut handle = ctx()
        .spawn(env_var, ("LD_BIND_NOW".to_string(),))
        .expect("spawn");
    assert_eq!(handle.join_timeout(LIMIT).expect("join"), mine);
    let mut handle = ctx()
        .spawn(env_var, ("CARGO_PKG_NAME".to_string(),))
        .expect("spawn");
    assert_eq!(
        handle.join_timeout(LIMIT).expect("join"),
        std::env::var("CARGO_PKG_NAME").ok()
    );
}

#[test]
fn a_forked_child_is_the_servers_child_and_knows_its_parent() {
    let mut p = ctx().spawn(describe, ()).expect("spawn");
    let pid = p.pid();
    let (name, child_pid, parent, os_parent) = p.join_timeout(LIMIT).expect("join");
    assert!(name.starts_with("Process-"), "{name}");
    assert_eq!(child_pid, pid);
    assert_eq!(
        parent,
        Some(("MainProcess".to_string(), std::process::id()))
    );
    assert_ne!(
        os_parent,
        std::process::id(),
        "forked by the server, not by us"
    );
}

#[test]
fn the_sentinel_turns_ready_when_the_child_ends() {
    let mut p = ctx().process(sleep_forever, ());
    p.start().expect("start");
    let ready = multiproc::wait(&[&p], Some(Duration::from_millis(20))).expect("wait");
    assert!(ready.is_empty(), "ready while running");
    p.kill().expect("kill");
    let ready = multiproc::wait(&[&p], Some(LIMIT)).expect("wait");
    assert_eq!(ready, vec![0]);
    // Once ready, the status is known without blocking.
    assert_eq!(p.exitcode(), Some(-9));
}

#[test]
fn active_children_lists_running_forked_children() {
    let mut p = ctx().process(sleep_forever, ());
    p.start().expect("start");
    let pid = p.pid().expect("pid");
    assert!(active_children().iter().any(|c| c.pid() == pid));
    p.kill().expect("kill");
    p.join_timeout(LIMIT).expect("join").expect("ended");
    assert!(!active_children().iter().any(|c| c.pid() == pid));
}

#[test]
fn a_dead_server_is_restarted_and_its_children_report_minus_nine() {
    // Serialised with the other tests only through the server itself:
    // they may see one start fail with the server's death, so this test
    // runs its own program.
    let out = Command::new(env!("CARGO_BIN_EXE_forkserver_program"))
        .arg("restart")
        .output()
        .expect("run the program");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "-9 true 0", "{text}");
}

#[test]
fn many_starts_leave_no_descriptors_or_zombies() {
    multiproc::start_forkserver().expect("server");
    // Warm up (the first start may open long-lived descriptors).
    assert_eq!(run_to_end(ctx().process(nothing, ())), 0);
    let before = open_fds();
    for _ in 0..200 {
        assert_eq!(run_to_end(ctx().process(nothing, ())), 0);
    }
    let after = open_fds();
    // Other tests of this binary run at the same time and hold a few
    // descriptors each; 200 leaked starts would show as hundreds.
    assert!(
        after < before + 50,
        "descriptors grew from {before} to {after}"
    );
    let server = {
        let mut handle = ctx().spawn(os_parent, ()).expect("spawn");
        handle.join_timeout(LIMIT).expect("join")
    };
    let zombies = std::fs::read_to_string(format!("/proc/{server}/task/{server}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter(|pid| !pid_alive(pid.parse().unwrap_or(0)))
        .count();
    assert!(zombies < 10, "{zombies} zombies under the server");
}

#[test]
fn pool_workers_start_by_the_forkserver_and_are_replaced_by_it() {
    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::ForkServer)
        .build()
        .expect("pool");
    let parents = pool.map(os_parent_of, 0..4u64).expect("map");
    assert!(
        parents.iter().all(|p| *p != std::process::id()),
        "{parents:?}"
    );
    let server = parents[0];
    let victim = pool.worker_pids()[0];
    multiproc_tests::kill(victim, 9);
    assert!(eventually(LIMIT, || {
        let pids = pool.worker_pids();
        pids.len() == 2 && !pids.contains(&victim)
    }));
    let results = pool.map(inc, 0..100u64).expect("map after replacement");
    assert_eq!(results, (1..101).collect::<Vec<u64>>());
    let parents = pool.map(os_parent_of, 0..8u64).expect("map");
    assert!(
        parents.iter().all(|p| *p == server),
        "{parents:?} vs {server}"
    );
}

#[process_fn]
fn put_twice(q: multiproc::Queue<u64>, x: u64) {
    q.put(x).expect("put");
    q.put(x + 1).expect("put");
}

#[process_fn]
fn forks_a_grandchild(a: u64) -> (u64, bool) {
    let mut handle = ctx().spawn(add, (a, 1)).expect("spawn a grandchild");
    let value = handle.join_timeout(LIMIT).expect("join the grandchild");
    (value, handle_parent_differs(std::process::id()))
}

/// Whether a forked child of this process has another parent (its own
/// server), checked from this process.
fn handle_parent_differs(me: u32) -> bool {
    let mut handle = ctx().spawn(os_parent, ()).expect("spawn");
    handle.join_timeout(LIMIT).expect("join") != me
}

#[test]
fn a_forked_child_can_start_children_by_its_own_forkserver() {
    let mut handle = ctx().spawn(forks_a_grandchild, (41,)).expect("spawn");
    assert_eq!(handle.join_timeout(LIMIT).expect("join"), (42, true));
}

#[test]
fn a_context_queue_travels_to_a_forked_child() {
    let q = ctx().queue::<u64>().expect("queue");
    let mut p = ctx().process(put_twice, (q.clone(), 40));
    p.start().expect("start");
    assert_eq!(q.get_timeout(LIMIT).expect("first"), 40);
    assert_eq!(q.get_timeout(LIMIT).expect("second"), 41);
    assert!(
        p.join_timeout(LIMIT)
            .expect("join")
            .expect("ended")
            .success()
    );
}

#[test]
fn a_panicking_preload_fails_each_start_with_its_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_forkserver_program"))
        .arg("bad-preload")
        .output()
        .expect("run the program");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "no warm-up today\nno warm-up today", "{text}");
}

#[test]
fn set_start_method_picks_the_default_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_forkserver_program"))
        .arg("default")
        .output()
        .expect("run the program");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "forkserver true true");
}

#[test]
fn the_preload_runs_once_in_the_server_before_the_forks() {
    let out = Command::new(env!("CARGO_BIN_EXE_forkserver_program"))
        .arg("preload")
        .output()
        .expect("run the program");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.trim(),
        "1 0",
        "forked sees the preload, spawned does not"
    );
}

#[test]
fn under_multiproc_main_a_forked_child_runs_on_the_main_thread_as_a_spawned_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_forkserver_program"))
        .arg("thread-name")
        .output()
        .expect("run the program");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), r#"Some("main") Some("main")"#);
}

#[test]
fn end_of_main_terminates_forked_daemons_and_joins_the_others() {
    let path = std::env::temp_dir().join(format!("multiproc-fs-daemon-end-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut program = Command::new(env!("CARGO_BIN_EXE_daemon_end"))
        .arg(&path)
        .arg("forkserver")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the program");
    let daemon = read_pid(&mut program);
    assert_ne!(ppid_of(daemon), program.id(), "forked by the server");
    let ended = eventually(LIMIT, || matches!(program.try_wait(), Ok(Some(_))));
    assert!(ended, "the program ended");
    assert!(program.wait().expect("status").success());
    // Reaped by the server before its status reached the program's
    // shutdown, so gone by the time the program is.
    assert!(
        !pid_alive(daemon),
        "the daemonic child was terminated at the end of main"
    );
    assert_eq!(
        std::fs::read(&path).expect("the non-daemonic child finished before main returned"),
        b"joined"
    );
    let _ = std::fs::remove_file(&path);
}

fn read_pid(child: &mut std::process::Child) -> u32 {
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read pid");
    line.trim().parse().expect("a pid")
}

/// The parent pid of `pid`, from `/proc`.
fn ppid_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

fn program_killed_then_server_and_child_gone(arg: &str) {
    let mut program = Command::new(env!("CARGO_BIN_EXE_forkserver_program"))
        .arg(arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the program");
    let child = read_pid(&mut program);
    assert!(
        child > 0 && pid_alive(child),
        "the child lives with the program"
    );
    let server = ppid_of(child);
    assert!(server > 0 && server != program.id(), "forked by the server");
    assert_eq!(
        ppid_of(server),
        program.id(),
        "the server is the program's child"
    );
    // The server's children: the child and the spare it forks after
    // answering (maybe not yet when the program printed the child's pid).
    let children = || multiproc_tests::children_of(server);
    assert!(
        eventually(LIMIT, || children().len() >= 2),
        "the child and the spare: {:?}",
        children()
    );
    let family = children();
    program.kill().expect("SIGKILL the program");
    program.wait().expect("reap the program");
    assert!(
        eventually(LIMIT, || !pid_alive(server)),
        "server {server} outlived its SIGKILLed program"
    );
    for pid in family {
        assert!(
            eventually(LIMIT, || !pid_alive(pid)),
            "{pid} (child {child}, or the spare) outlived its SIGKILLed program"
        );
    }
}

#[test]
fn no_orphans_after_sigkill_of_the_program() {
    program_killed_then_server_and_child_gone("orphan");
}

#[test]
fn no_orphans_after_sigkill_when_the_server_was_started_from_a_thread() {
    program_killed_then_server_and_child_gone("orphan-thread");
}
