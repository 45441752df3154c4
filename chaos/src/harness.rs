//! The driver and the run.
//!
//! The driver (this binary without a hidden sub-command) starts every run
//! as a fresh process: this executable again, `__run <scenario> --seed S
//! --report FILE`, with a unique marker in `MULTIPROC_CHAOS_RUN` that
//! every process the run starts inherits. A watchdog thread waits for the
//! run; one still running after `--timeout-secs` is SIGKILLed and counted
//! as a hang. After each run the driver looks for orphans: processes that
//! carry the run's marker and are still alive after a grace period
//! ([`ORPHAN_GRACE`]); each is counted and SIGKILLed by pid.
//!
//! The run measures itself: descriptors and memfds open at its start and
//! at its end, and its children in state Z at its end, and writes them
//! with the scenario's outcome to the report file.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::ctx::Ctx;
use crate::scenarios::{self, Scenario};
use crate::util;

/// The variable that marks every process a run started.
pub const MARKER_VAR: &str = "MULTIPROC_CHAOS_RUN";
/// How long a process of a finished run may take to die before it counts
/// as an orphan (a child killed by its death signal still has to be
/// scheduled to die).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3);
/// How long a run may take, after its scenario returned, for its
/// descriptors to close and its zombies to be reaped (the pool's reader
/// thread reaps and closes asynchronously).
const SETTLE: Duration = Duration::from_secs(1);

/// What one run reported (or what the driver saw of it).
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub ok: bool,
    pub hang: bool,
    pub lost: u64,
    pub duplicated: u64,
    pub torn: u64,
    pub doc_lost: u64,
    pub leaked_fds: i64,
    pub leaked_memfds: i64,
    pub zombies: u64,
    pub orphans: u64,
    /// The scenario failed otherwise (a wrong error, a panic, a crash).
    pub failed: bool,
    pub messages: Vec<String>,
}

impl Outcome {
    fn all_ok(&self) -> bool {
        self.ok
            && !self.hang
            && !self.failed
            && self.lost == 0
            && self.duplicated == 0
            && self.torn == 0
            && self.leaked_fds <= 0
            && self.leaked_memfds <= 0
            && self.zombies == 0
            && self.orphans == 0
    }
}

// ---------------------------------------------------------------------
// The run: one scenario, in this process.

pub fn run_main(args: &[String]) -> ! {
    let name = args.first().cloned().unwrap_or_default();
    let mut seed = 0u64;
    let mut report = PathBuf::from("/dev/null");
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => seed = it.next().and_then(|s| s.parse().ok()).unwrap_or(0),
            "--report" => report = it.next().map(PathBuf::from).unwrap_or(report),
            _ => {}
        }
    }
    let Some(scenario) = scenarios::all().into_iter().find(|s| s.name == name) else {
        eprintln!("unknown scenario {name:?}");
        std::process::exit(2);
    };
    scenarios::warm_up(scenario.name);
    let arenas0 = util::arena_count();
    let (fds0, memfds0) = util::fd_counts();
    let mut ctx = Ctx::new(seed);
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (scenario.run)(&mut ctx)));
    let mut text = String::new();
    let failed = match result {
        Ok(Ok(())) => false,
        Ok(Err(msg)) => {
            ctx.fail(msg);
            true
        }
        Err(p) => {
            ctx.fail(format!("the scenario panicked: {}", util::panic_text(&*p)));
            true
        }
    };
    let hang = ctx.hang.is_some();
    let (mut zombies, mut fds1, mut memfds1) = (0, fds0, memfds0);
    if !hang {
        let zombie_count = || {
            util::child_pids()
                .into_iter()
                .filter(|&p| util::proc_state(p) == Some('Z'))
                .count()
        };
        util::eventually(SETTLE, || zombie_count() == 0);
        zombies = zombie_count();
        // The arenas the runtime keeps for the process's lifetime (one per
        // size class) are not counted.
        util::eventually(SETTLE, || {
            let (f, m) = util::fd_counts_beyond_arenas(arenas0);
            f <= fds0 && m <= memfds0
        });
        (fds1, memfds1) = util::fd_counts_beyond_arenas(arenas0);
    }
    let _ = writeln!(
        text,
        "failed {}",
        u8::from(failed || !ctx.failures.is_empty())
    );
    let _ = writeln!(text, "hang {}", u8::from(hang));
    let _ = writeln!(text, "lost {}", ctx.lost);
    let _ = writeln!(text, "duplicated {}", ctx.duplicated);
    let _ = writeln!(text, "torn {}", ctx.torn);
    let _ = writeln!(text, "doc_lost {}", ctx.doc_lost);
    let _ = writeln!(text, "fds {fds0} {fds1}");
    let _ = writeln!(text, "memfds {memfds0} {memfds1}");
    let _ = writeln!(text, "zombies {zombies}");
    if let Some(h) = &ctx.hang
        && !ctx.failures.iter().any(|f| f.contains(h.as_str()))
    {
        let _ = writeln!(text, "msg hang: {}", one_line(h));
    }
    for f in &ctx.failures {
        let _ = writeln!(text, "msg {}", one_line(f));
    }
    if fds1 > fds0 {
        let _ = writeln!(text, "msg descriptors at the end: {}", open_fd_list());
    }
    let tmp = report.with_extension("tmp");
    let written = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &report));
    if let Err(e) = written {
        eprintln!("could not write the report {}: {e}", report.display());
    }
    if hang {
        // A call is still stuck on some thread: end the children it may be
        // waiting on, so the exit handlers (which join children) return.
        for pid in util::child_pids() {
            util::sigkill(pid);
        }
    }
    let _ = std::io::stdout().flush();
    std::process::exit(0)
}

fn one_line(s: &str) -> String {
    let s: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    if s.len() > 600 {
        let mut end = 600;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

fn open_fd_list() -> String {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for e in dir.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                out.push(format!(
                    "{}->{}",
                    e.file_name().to_string_lossy(),
                    t.display()
                ));
            }
        }
    }
    out.join(" ")
}

fn parse_report(text: &str) -> Outcome {
    let mut o = Outcome {
        ok: true,
        ..Outcome::default()
    };
    for line in text.lines() {
        let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
        let nums: Vec<i64> = rest
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let first = nums.first().copied().unwrap_or(0);
        match key {
            "failed" => o.failed = first != 0,
            "hang" => o.hang = first != 0,
            "lost" => o.lost = first as u64,
            "duplicated" => o.duplicated = first as u64,
            "torn" => o.torn = first as u64,
            "doc_lost" => o.doc_lost = first as u64,
            "fds" if nums.len() == 2 => o.leaked_fds = nums[1] - nums[0],
            "memfds" if nums.len() == 2 => o.leaked_memfds = nums[1] - nums[0],
            "zombies" => o.zombies = first as u64,
            "msg" => o.messages.push(rest.to_string()),
            _ => {}
        }
    }
    // Lost, duplicated and torn have their own columns; "failed" is for
    // everything else.
    if o.failed && (o.lost > 0 || o.duplicated > 0 || o.torn > 0 || o.hang) {
        let other = o.messages.iter().any(|m| {
            !(m.starts_with("lost ")
                || m.starts_with("duplicated ")
                || m.starts_with("torn ")
                || m.starts_with("hang")
                || m.contains("no return within"))
        });
        o.failed = other;
    }
    if o.leaked_fds > 0 {
        o.messages.push(format!(
            "{} descriptor(s) more at the end than at the start",
            o.leaked_fds
        ));
    }
    if o.leaked_memfds > 0 {
        o.messages.push(format!(
            "{} memfd(s) more at the end than at the start",
            o.leaked_memfds
        ));
    }
    if o.zombies > 0 {
        o.messages
            .push(format!("{} zombie child(ren) at the end", o.zombies));
    }
    o
}

// ---------------------------------------------------------------------
// The driver.

#[derive(Debug)]
pub struct Options {
    pub runs: usize,
    pub only: Vec<String>,
    pub seed: u64,
    pub timeout: Duration,
    pub strict: bool,
    pub list: bool,
}

pub fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        runs: 10,
        only: Vec::new(),
        seed: 1,
        timeout: Duration::from_secs(60),
        strict: false,
        list: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--runs" => {
                o.runs = value("--runs")?
                    .parse()
                    .map_err(|e| format!("--runs: {e}"))?
            }
            "--only" => o.only.push(value("--only")?),
            "--seed" => {
                o.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--timeout-secs" => {
                let t: u64 = value("--timeout-secs")?
                    .parse()
                    .map_err(|e| format!("--timeout-secs: {e}"))?;
                o.timeout = Duration::from_secs(t.max(1));
            }
            "--strict" => o.strict = true,
            "--list" => o.list = true,
            "-h" | "--help" => {
                return Err(String::new());
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

pub const USAGE: &str = "usage: multiproc-chaos [--runs N] [--only SUBSTRING]... [--seed S] \
[--timeout-secs T] [--strict] [--list]
  --runs N          runs per scenario (default 10)
  --only SUBSTRING  only the scenarios whose name contains it (repeatable)
  --seed S          run k of a scenario uses seed S + k (default 1)
  --timeout-secs T  the watchdog's limit for one run (default 60)
  --strict          exit 1 unless every run of every scenario was all ok
  --list            print the scenario names and exit";

pub fn driver_main(opts: &Options) -> i32 {
    let all = scenarios::all();
    // A name given whole selects that scenario alone (one name can be a
    // prefix of another: `pool/sigkill/imap`, `pool/sigkill/imap_unordered`).
    // The harness's self-tests run only when asked for by name.
    let picks = |s: &Scenario| {
        (opts.only.is_empty() && !s.name.starts_with("selftest/"))
            || opts.only.iter().any(|o| {
                if all.iter().any(|t| t.name == o.as_str()) {
                    s.name == o.as_str()
                } else {
                    s.name.contains(o.as_str())
                }
            })
    };
    let selected: Vec<Scenario> = all.iter().filter(|s| picks(s)).cloned().collect();
    if opts.list {
        for s in &selected {
            println!("{}", s.name);
        }
        return 0;
    }
    if selected.is_empty() {
        eprintln!("no scenario matches {:?}", opts.only);
        return 2;
    }
    let dir = std::env::temp_dir().join(format!("multiproc-chaos-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return 2;
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot find this executable: {e}");
            return 2;
        }
    };
    let started = Instant::now();
    let mut rows: Vec<(String, Vec<(u64, Outcome)>)> = Vec::new();
    for (si, s) in selected.iter().enumerate() {
        let t0 = Instant::now();
        let mut outcomes = Vec::new();
        for k in 0..opts.runs {
            let seed = opts.seed.wrapping_add(k as u64);
            let marker = format!("{}-{si}-{k}", std::process::id());
            let o = run_once(&exe, &dir, s.name, seed, &marker, opts.timeout);
            outcomes.push((seed, o));
        }
        let bad = outcomes.iter().filter(|(_, o)| !o.all_ok()).count();
        eprintln!(
            "[{:>6.1}s] {:<44} {:>3}/{} ok ({:.1}s)",
            started.elapsed().as_secs_f64(),
            s.name,
            opts.runs - bad,
            opts.runs,
            t0.elapsed().as_secs_f64()
        );
        rows.push((s.name.to_string(), outcomes));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let all_ok = rows
        .iter()
        .all(|(_, os)| os.iter().all(|(_, o)| o.all_ok()));
    print!("{}", table(&rows, opts, started.elapsed()));
    if opts.strict && !all_ok {
        eprintln!("--strict: some runs were not all ok");
        return 1;
    }
    0
}

fn run_once(
    exe: &Path,
    dir: &Path,
    name: &str,
    seed: u64,
    marker: &str,
    timeout: Duration,
) -> Outcome {
    let report = dir.join(format!("{marker}.report"));
    let log = dir.join(format!("{marker}.log"));
    let _ = std::fs::remove_file(&report);
    let spawned = std::fs::File::create(&log).and_then(|out| {
        let err = out.try_clone()?;
        Command::new(exe)
            .arg("__run")
            .arg(name)
            .arg("--seed")
            .arg(seed.to_string())
            .arg("--report")
            .arg(&report)
            .env(MARKER_VAR, marker)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                failed: true,
                messages: vec![format!("could not start the run: {e}")],
                ..Outcome::default()
            };
        }
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let mut hang = false;
    let status = match rx.recv_timeout(timeout) {
        Ok(s) => s.ok(),
        Err(_) => {
            hang = true;
            util::sigkill(pid);
            rx.recv_timeout(Duration::from_secs(30))
                .ok()
                .and_then(Result::ok)
        }
    };
    let _ = waiter.join();
    let mut o = match std::fs::read_to_string(&report) {
        Ok(text) if !hang => parse_report(&text),
        _ => {
            let mut o = Outcome {
                ok: false,
                ..Outcome::default()
            };
            if hang {
                o.hang = true;
                o.messages
                    .push(format!("the watchdog killed the run after {timeout:?}"));
            } else {
                o.failed = true;
                o.messages
                    .push(format!("the run ended without a report: {status:?}"));
            }
            o.messages
                .push(format!("end of its log: {}", log_tail(&log)));
            o
        }
    };
    let needle = format!("{MARKER_VAR}={marker}");
    util::eventually(ORPHAN_GRACE, || util::pids_with_env(&needle).is_empty());
    let orphans = util::pids_with_env(&needle);
    if !orphans.is_empty() {
        let described: Vec<String> = orphans.iter().map(|&p| describe(p)).collect();
        o.orphans = orphans.len() as u64;
        o.messages.push(format!(
            "{} orphan(s) alive {ORPHAN_GRACE:?} after the run ended: {}",
            orphans.len(),
            described.join(", ")
        ));
        for p in orphans {
            util::sigkill(p);
        }
    }
    if o.all_ok() {
        let _ = std::fs::remove_file(&log);
    }
    let _ = std::fs::remove_file(&report);
    o
}

fn describe(pid: u32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(str::to_string))
        .and_then(|rest| rest.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default();
    format!(
        "pid {pid} (ppid {ppid}, state {:?}): {cmd}",
        util::proc_state(pid)
    )
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(6).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    one_line(&tail.join(" | "))
}

fn table(rows: &[(String, Vec<(u64, Outcome)>)], opts: &Options, elapsed: Duration) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| scenario | runs | ok | hangs | lost | duplicated | torn | leaked fds | leaked memfds | zombies | orphans | failed | lost (documented) |"
    );
    let _ = writeln!(
        t,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut notes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, outcomes) in rows {
        let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|(_, o)| f(o)).count();
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            outcomes.len(),
            count(&|o| o.all_ok()),
            count(&|o| o.hang),
            count(&|o| o.lost > 0),
            count(&|o| o.duplicated > 0),
            count(&|o| o.torn > 0),
            count(&|o| o.leaked_fds > 0),
            count(&|o| o.leaked_memfds > 0),
            count(&|o| o.zombies > 0),
            count(&|o| o.orphans > 0),
            count(&|o| o.failed),
            count(&|o| o.doc_lost > 0),
        );
        for (k, (seed, o)) in outcomes.iter().enumerate() {
            if o.all_ok() && o.doc_lost == 0 {
                continue;
            }
            let mut msgs = o.messages.clone();
            if o.doc_lost > 0 {
                msgs.push(format!(
                    "{} message(s) lost where the docs allow it",
                    o.doc_lost
                ));
            }
            notes
                .entry(name.clone())
                .or_default()
                .push(format!("run {k} (seed {seed}): {}", msgs.join("; ")));
        }
    }
    let _ = writeln!(
        t,
        "\n{} scenario(s), {} run(s) each, seed {}, watchdog {:?}, {:.0} s in all.",
        rows.len(),
        opts.runs,
        opts.seed,
        opts.timeout,
        elapsed.as_secs_f64()
    );
    if !notes.is_empty() {
        let _ = writeln!(
            t,
            "\nRuns that were not all ok, and runs with a documented loss (reproduce one: `--only <scenario> --seed <seed> --runs 1`):\n"
        );
        for (name, list) in notes {
            let _ = writeln!(t, "- **{name}**");
            for n in list.iter().take(10) {
                let _ = writeln!(t, "  - {n}");
            }
            if list.len() > 10 {
                let _ = writeln!(t, "  - ... and {} more", list.len() - 10);
            }
        }
    }
    t
}
