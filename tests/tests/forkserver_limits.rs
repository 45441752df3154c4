//! The forkserver's own processes under stress. A fork that fails in the
//! server is an error of that start, and the next start works: the
//! server is put in a cgroup whose `pids.max` it has already reached, so
//! its `fork(2)` really fails with `EAGAIN`. A spare (the child the
//! server forks ahead) killed while it waits is replaced.
//!
//! Its own test binary, one test at a time (`SERIAL`): while the limit
//! holds, every fork of this program's server fails, and the spare test
//! counts the server's children, which would fail or kill other tests
//! running beside them.
//! Needs a writable pids controller (cgroup v1 at `/sys/fs/cgroup/pids`,
//! or v2 with `pids` enabled at `/sys/fs/cgroup`), as root has here; the
//! test says so and passes only when there is none.
use std::path::{Path, PathBuf};
use std::time::Duration;

use multiproc::{Error, StartMethod, process_fn};
use multiproc_tests::{children_of, eventually};

const LIMIT: Duration = Duration::from_secs(30);

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The server's pid, from a forked child.
fn server_pid(ctx: &multiproc::Context) -> u32 {
    let mut probe = ctx.spawn(os_parent, ()).expect("spawn");
    let server = probe.join_timeout(LIMIT).expect("join");
    assert_ne!(server, std::process::id(), "the child is the server's");
    server
}

#[process_fn]
fn nothing() {}

#[process_fn]
fn os_parent() -> u32 {
    std::os::unix::process::parent_id()
}

/// A pids cgroup of this test's own, removed (its process moved back to
/// the root) when dropped, even if the test fails.
struct PidsCgroup {
    root: PathBuf,
    dir: PathBuf,
    member: Option<u32>,
}

impl PidsCgroup {
    /// `Err(reason)` when the machine has no writable pids controller.
    fn new() -> Result<PidsCgroup, String> {
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let v2 = Path::new("/sys/fs/cgroup");
        let root = if v1.join("pids.max").exists() || v1.join("cgroup.procs").exists() {
            v1.to_path_buf()
        } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "pids"))
        {
            v2.to_path_buf()
        } else {
            return Err("no pids cgroup controller (v1 or v2) on this machine".into());
        };
        let dir = root.join(format!("multiproc-forkserver-test-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot create a cgroup under {}: {e}", root.display()))?;
        Ok(PidsCgroup {
            root,
            dir,
            member: None,
        })
    }

    fn enter(&mut self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
        self.member = Some(pid);
    }

    fn set_max(&self, max: &str) {
        std::fs::write(self.dir.join("pids.max"), max).expect("write pids.max");
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        if let Some(pid) = self.member {
            let _ = std::fs::write(self.root.join("cgroup.procs"), pid.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_fork_the_kernel_refuses_fails_that_start_and_the_next_start_works() {
    let _serial = serial();
    let ctx = multiproc::get_context(StartMethod::ForkServer);
    let mut cgroup = match PidsCgroup::new() {
        Ok(cgroup) => cgroup,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    let server = server_pid(&ctx);
    // The server alone is in the cgroup, and may have no more processes.
    cgroup.enter(server);
    cgroup.set_max("1");

    // The spare the server forked before the limit (outside the cgroup)
    // takes this start; its replacement is refused, silently.
    let mut spare = ctx.process(nothing, ());
    spare
        .start()
        .expect("the spare forked before the limit starts");
    let status = spare
        .join_timeout(LIMIT)
        .expect("join")
        .expect("ended in time");
    assert!(status.success(), "{status:?}");

    // No spare left: this start forks for itself, and is refused.
    let mut refused = ctx.process(nothing, ());
    let err = refused.start().expect_err("the server cannot fork");
    let text = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{text}");
    assert!(text.contains("could not fork"), "{text}");
    assert!(text.contains("os error 11"), "EAGAIN: {text}");
    assert!(!refused.is_alive());

    // The same server serves the next start once the limit is lifted.
    cgroup.set_max("max");
    let mut p = ctx.process(nothing, ());
    p.start().expect("start after the limit");
    let status = p.join_timeout(LIMIT).expect("join").expect("ended in time");
    assert!(status.success(), "{status:?}");
    let mut probe = ctx.spawn(os_parent, ()).expect("spawn");
    assert_eq!(
        probe.join_timeout(LIMIT).expect("join"),
        server,
        "the same server"
    );
}

#[test]
fn a_spare_killed_while_it_waits_is_replaced_and_starts_go_on() {
    let _serial = serial();
    let ctx = multiproc::get_context(StartMethod::ForkServer);
    let server = server_pid(&ctx);
    // Nothing of this program runs: the server's one child is its spare
    // (the probe was reaped before its status came back).
    let spares = children_of(server);
    assert_eq!(spares.len(), 1, "one spare: {spares:?}");
    let spare = nix::unistd::Pid::from_raw(spares[0] as i32);
    // Only the server reaps it, when it sees it die: the pid is still its.
    nix::sys::signal::kill(spare, nix::sys::signal::Signal::SIGKILL).expect("kill the spare");
    // The kill is delivered asynchronously: a start sent before the spare
    // is gone may still be handed to it (and report -9, as any child killed
    // at its start). Wait, bounded, until the server has seen it die and
    // reaped it.
    assert!(
        eventually(LIMIT, || !children_of(server).contains(&spares[0])),
        "the server never reaped its spare"
    );

    for _ in 0..3 {
        let mut p = ctx.process(nothing, ());
        p.start().expect("start without the killed spare");
        let status = p.join_timeout(LIMIT).expect("join").expect("ended in time");
        assert!(status.success(), "{status:?}");
    }
    assert_eq!(server_pid(&ctx), server, "the same server");
    let now = children_of(server);
    assert_eq!(now.len(), 1, "a new spare: {now:?}");
    assert_ne!(now[0], spares[0], "not the killed one");
}
