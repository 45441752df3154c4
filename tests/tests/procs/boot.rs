//! How a child starts: what it inherits (arguments, a thread named `main`,
//! `/dev/null` as stdin, std's report of a stack overflow), what a stray
//! marker variable does, the errors a user reads, and panics under either
//! panic strategy. The scenarios that need a child's stderr or exit code
//! run in the probe programs, each under both start paths: `boot_probe` (a
//! plain `main`: children start from the load-time hook, on a thread named
//! `main`) and `boot_probe_main` (`#[multiproc::main]`: children start from
//! `main`'s first line, on the real main thread).
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use multiproc::process_fn;

const LIMIT: Duration = Duration::from_secs(60);

#[process_fn]
fn thread_name() -> Option<String> {
    std::thread::current().name().map(str::to_string)
}

#[test]
fn a_childs_function_runs_on_a_thread_named_main() {
    let name = multiproc::spawn(thread_name, ())
        .expect("spawn")
        .join_timeout(LIMIT)
        .expect("join");
    assert_eq!(name.as_deref(), Some("main"));
}

#[test]
fn a_closure_is_refused_in_words_that_name_closures() {
    let err = multiproc::spawn(|x: u64| x + 1, (1,)).expect_err("closures cannot travel");
    let text = err.to_string();
    assert!(
        text.contains("closures cannot run in another process; use a `#[process_fn]` fn"),
        "{text}"
    );
    assert!(!text.contains("__multiproc"), "{text}");
}

/// The probe programs: (name, executable).
const PROBES: [(&str, &str); 2] = [
    ("boot_probe", env!("CARGO_BIN_EXE_boot_probe")),
    ("boot_probe_main", env!("CARGO_BIN_EXE_boot_probe_main")),
];

/// `scenario` run by each probe: (probe name, what it did).
fn probe(scenario: &str) -> Vec<(&'static str, Output)> {
    PROBES
        .iter()
        .map(|&(name, exe)| (name, probe_with(exe, scenario, |_| {})))
        .collect()
}

#[test]
fn a_child_sees_the_parents_arguments() {
    for (name, exe) in PROBES {
        let out = probe_with(exe, "args", |cmd| {
            cmd.args(["extra", "--flag=1", "last arg"]);
        });
        assert_eq!(
            text(&out.stdout),
            "same args: true\n",
            "{name}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_childs_stdin_is_dev_null_whatever_the_parents_is() {
    // The parent's stdin is a pipe; the child's must be /dev/null.
    for (name, exe) in PROBES {
        let out = probe_with(exe, "stdin", |cmd| {
            cmd.stdin(Stdio::piped());
        });
        assert_eq!(
            text(&out.stdout),
            "stdin /dev/null read 0\n",
            "{name}: {}",
            text(&out.stderr)
        );
    }
}

fn probe_with(exe: &str, scenario: &str, set: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new(exe);
    cmd.arg(scenario)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    set(&mut cmd);
    let child = cmd.spawn().expect("start the probe");
    let pid = child.id();
    // Bounded: a probe that hangs is killed and fails the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(out) => out.expect("the probe's output"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{exe} {scenario} did not finish within {LIMIT:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_stack_overflow_in_a_child_is_reported_as_std_reports_it() {
    for (name, out) in probe("overflow") {
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            stdout.contains("exitcode -6"),
            "{name}: stdout: {stdout}\nstderr: {stderr}"
        );
        assert!(
            stderr.contains("thread 'main' (") && stderr.contains(") has overflowed its stack"),
            "{name}: {stderr}"
        );
        assert!(
            stderr.contains("fatal runtime error: stack overflow"),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn a_panicking_process_exits_with_code_one_under_either_panic_strategy() {
    for (name, out) in probe("process-panic") {
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            stdout.contains("exitcode 1\n"),
            "{name}: stdout: {stdout}\nstderr: {stderr}"
        );
        assert!(stderr.contains("thread 'main' ("), "{name}: {stderr}");
        assert!(stderr.contains("probe panic"), "{name}: {stderr}");
    }
}

#[test]
fn a_panicking_spawn_returns_its_message_under_either_panic_strategy() {
    for (name, out) in probe("spawn-panic") {
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("spawn error: process ")
                && stdout.contains("panicked: probe spawn panic"),
            "{name}: stdout: {stdout}\nstderr: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_panicking_pool_task_fails_alone_under_either_panic_strategy() {
    for (name, out) in probe("pool-panic") {
        let stdout = text(&out.stdout);
        pool_panic_lines(name, &stdout);
    }
}

fn pool_panic_lines(name: &str, stdout: &str) {
    for chunksize in [1, 4, 100] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("chunksize {chunksize}:")))
            .unwrap_or_else(|| panic!("{name}: no line for chunksize {chunksize}: {stdout}"));
        let items: Vec<&str> = line
            .split_once(": ")
            .map(|(_, rest)| rest.split(" | ").collect())
            .unwrap_or_default();
        assert_eq!(items.len(), 8, "{line}");
        for (i, item) in items.iter().enumerate() {
            if i == 3 {
                assert!(
                    item.contains("panicked on item 3: item three fails"),
                    "{line}"
                );
            } else {
                assert_eq!(*item, (i * 10).to_string(), "{line}");
            }
        }
    }
    assert!(
        stdout.contains("after: [0, 1, 4, 9, 16]"),
        "{name}: {stdout}"
    );
}

#[test]
fn the_probe_runs_with_the_panic_strategy_ci_asked_for() {
    for (name, out) in probe("panic-strategy") {
        let strategy = text(&out.stdout).trim().to_string();
        match std::env::var("MULTIPROC_EXPECT_PANIC") {
            Ok(expected) => assert_eq!(strategy, expected, "{name}"),
            Err(_) => assert!(
                matches!(strategy.as_str(), "abort" | "unwind"),
                "{name}: {strategy}"
            ),
        }
    }
}

#[test]
fn main_returning_an_error_prints_what_to_do() {
    for (name, out) in probe("main-error") {
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "Error: `{name}::scenarios::run_scenario::forgot` is not registered: add \
                 #[process_fn]"
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("NotRegistered {"), "{name}: {stderr}");
    }
}

#[test]
fn a_stray_marker_variable_lets_the_program_run_its_main() {
    let me = std::process::id().to_string();
    for value in [
        "garbage".to_string(),
        "3:1:1".to_string(),
        format!("3:{me}:1"),
        format!("3:{me}:0:extra"),
        format!("3:{me}:1:m"),
    ] {
        for (name, exe) in PROBES {
            let out = probe_with(exe, "main-ran", |cmd| {
                cmd.env("MULTIPROC_CHILD", &value);
            });
            assert_eq!(
                (out.status.code(), text(&out.stdout)),
                (Some(0), "main ran\n".to_string()),
                "{name}, MULTIPROC_CHILD={value}: {}",
                text(&out.stderr)
            );
        }
    }
}

#[test]
fn a_multiproc_main_child_runs_on_the_real_main_thread() {
    let runs = probe("main-thread");
    let expected = [
        (
            "boot_probe",
            "on the main thread: false, named Some(\"main\")\n",
        ),
        (
            "boot_probe_main",
            "on the main thread: true, named Some(\"main\")\n",
        ),
    ];
    for ((name, out), (expected_name, line)) in runs.iter().zip(expected) {
        assert_eq!(*name, expected_name);
        assert_eq!(text(&out.stdout), line, "{name}: {}", text(&out.stderr));
    }
}

#[test]
fn functions_of_a_library_crate_run_under_either_start_path() {
    for (name, out) in probe("lib-fn") {
        assert_eq!(
            (out.status.code(), text(&out.stdout)),
            (Some(0), "[3, 6, 9, 12] 15\n".to_string()),
            "{name}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_program_whose_functions_live_in_a_library_crate_runs_them() {
    let out = Command::new(env!("CARGO_BIN_EXE_lib_only"))
        .stdin(Stdio::null())
        .output()
        .expect("run lib_only");
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "[3, 6, 9, 12] 15\n".to_string()),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_full_descriptor_table_fails_one_result_not_the_pool() {
    for (name, out) in probe("pool-fds") {
        let stdout = text(&out.stdout);
        pool_fds_lines(name, &stdout, &text(&out.stderr));
    }
}

fn pool_fds_lines(name: &str, stdout: &str, stderr: &str) {
    assert!(
        stdout.contains("full table: the kernel dropped descriptors"),
        "{name}: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("after: Ok(true), same worker: true"),
        "{name}: {stdout}"
    );
    assert!(
        stdout.contains("dead worker, full table: returned"),
        "{name}: {stdout}"
    );
    assert!(stdout.contains("recovered: Some(9)"), "{name}: {stdout}");
}
