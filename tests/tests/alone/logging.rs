//! The runtime reports worker deaths, replacements and start failures
//! through the `log` facade: a logger installed by the program sees them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use multiproc::{Pool, process_fn};

const JOIN: Duration = Duration::from_secs(30);

/// Keeps every record multiproc logs.
struct Capture;

static RECORDS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());
static LOGGER: Capture = Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.target().starts_with("multiproc") {
            RECORDS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((record.level(), record.args().to_string()));
        }
    }

    fn flush(&self) {}
}

fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&LOGGER).expect("the only logger");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// Waits (bounded) for a record that satisfies `f`.
fn logged(what: &str, f: impl Fn(log::Level, &str) -> bool) {
    let deadline = Instant::now() + JOIN;
    loop {
        if RECORDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(level, text)| f(*level, text))
        {
            return;
        }
        assert!(Instant::now() < deadline, "never logged: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[process_fn]
fn double(x: u64) -> u64 {
    x * 2
}

#[process_fn]
fn refuse_to_start(_: u32) {
    panic!("this initializer always fails");
}

#[test]
fn a_killed_worker_and_its_replacement_are_logged() {
    let _alone = multiproc_tests::alone();
    install();
    let pool = Pool::new(1).expect("pool");
    assert_eq!(pool.map(double, 0..4).expect("map"), [0, 2, 4, 6]);
    let pid = pool.worker_pids()[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    logged("the worker's death", |level, text| {
        level == log::Level::Warn && text.contains(&format!("worker {pid} died"))
    });
    logged("its replacement", |level, text| {
        level == log::Level::Info && text.contains("as a replacement")
    });
    assert_eq!(pool.map(double, 0..2).expect("map"), [0, 2]);
}

#[test]
fn a_pool_whose_workers_cannot_start_is_logged_as_an_error() {
    let _alone = multiproc_tests::alone();
    install();
    let pool = Pool::builder()
        .processes(1)
        .initializer(refuse_to_start, (0,))
        .build();
    if let Ok(pool) = pool {
        assert!(pool.map(double, 0..2).is_err());
    }
    logged("the failed start", |level, text| {
        level == log::Level::Error && text.contains("the pool is broken")
    });
}

#[process_fn]
fn failing_child_setup() {
    panic!("cannot set up this child");
}

#[test]
fn a_child_that_refuses_to_start_is_logged_as_an_error() {
    let _alone = multiproc_tests::alone();
    install();
    multiproc::set_child_initializer(failing_child_setup, ()).expect("registered");
    let child = multiproc::spawn(double, (1,));
    multiproc::clear_child_initializer();
    let mut child = child.expect("spawn");
    let pid = child.pid();
    assert!(child.join_timeout(JOIN).is_err());
    logged("the refusal", |level, text| {
        level == log::Level::Error
            && text.contains(&format!("child {pid} refused to start"))
            && text.contains("cannot set up this child")
    });
}
