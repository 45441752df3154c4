//! Spawn + join of a trivial child: multiproc (`spawn` and `Process`)
//! against a bare `Command::new(current_exe)` spawn + wait of the same
//! binary exiting at once (the floor: exec + dynamic loading), and CPython's
//! `multiprocessing.Process` start + join (fork and spawn) in the same run.
//!
//! Run: `cargo bench -p multiproc-benches --bench spawn`
//!
//! `MULTIPROC_BENCH_ONLY=forkserver` runs only what the forkserver's
//! figures need, in a minute: the interleaved rounds of `Process` start +
//! join by both methods (and `spawn` + join), `Pool::new(2)` by both
//! methods and the 1000-start loop; no criterion groups, no CPU section,
//! no CPython.
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::Criterion;
use multiproc::{Pool, Process, StartMethod, process_fn};

#[process_fn]
fn trivial() {}

#[process_fn]
fn trivial_value() -> u32 {
    7
}

#[process_fn]
fn echo(x: u32) -> u32 {
    x
}

#[process_fn]
fn server_pid() -> u32 {
    std::os::unix::process::parent_id()
}

const EXIT_NOW: &str = "MULTIPROC_BENCH_EXIT_NOW";
const ONLY: &str = "MULTIPROC_BENCH_ONLY";

fn median_of(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Times `f` `n` times, returns the median.
fn time_median(n: usize, mut f: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    median_of(&mut samples)
}

fn bare_command(exe: &std::path::Path) {
    let status = Command::new(exe)
        .env(EXIT_NOW, "1")
        .status()
        .expect("bare spawn");
    assert!(status.success());
}

fn multiproc_spawn() {
    let v = multiproc::spawn(trivial_value, ())
        .expect("spawn")
        .join()
        .expect("join");
    assert_eq!(v, 7);
}

fn multiproc_process() {
    let mut p = Process::new(trivial, ());
    p.start().expect("start");
    assert!(p.join().expect("join").success());
}

fn forkserver() -> multiproc::Context {
    multiproc::get_context(StartMethod::ForkServer)
}

fn forkserver_spawn() {
    let v = forkserver()
        .spawn(trivial_value, ())
        .expect("spawn")
        .join()
        .expect("join");
    assert_eq!(v, 7);
}

fn forkserver_process() {
    let mut p = forkserver().process(trivial, ());
    p.start().expect("start");
    assert!(p.join().expect("join").success());
}

/// The time `Pool::new(2)` by `method` takes to return from `build`, and
/// to give the results of a first `map` of two items (both workers up);
/// the pool's drop (killing and reaping its workers) is not counted.
fn pool_ready(method: StartMethod) -> (Duration, Duration) {
    let t = Instant::now();
    let pool = Pool::builder()
        .processes(2)
        .start_method(method)
        .build()
        .expect("pool");
    let built = t.elapsed();
    let out = pool.map_chunked(echo, 0..2u32, 1).expect("map");
    let served = t.elapsed();
    assert_eq!(out, vec![0, 1]);
    drop(pool);
    (built, served)
}

/// The medians of `n` calls of [`pool_ready`].
fn pool_median(n: usize, method: StartMethod) -> (Duration, Duration) {
    let (mut built, mut served): (Vec<_>, Vec<_>) = (0..n).map(|_| pool_ready(method)).unzip();
    (median_of(&mut built), median_of(&mut served))
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The server's resident memory (kB), and how many of its children are
/// zombies.
fn server_state(server: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{server}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let zombies = std::fs::read_to_string(format!("/proc/{server}/task/{server}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
        })
        .count();
    (rss, zombies)
}

/// Time process `pid`'s main thread has been on a CPU (schedstat, ns).
fn on_cpu(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// CPU time (user + system) of this process and of its reaped children.
fn cpu_now() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let total = |who| {
        getrusage(who).map_or(Duration::ZERO, |u| {
            let (user, sys) = (u.user_time(), u.system_time());
            let us = |t: nix::sys::time::TimeVal| {
                Duration::from_micros((t.tv_sec() * 1_000_000 + t.tv_usec()) as u64)
            };
            us(user) + us(sys)
        })
    };
    total(UsageWho::RUSAGE_SELF) + total(UsageWho::RUSAGE_CHILDREN)
}

/// Minor page faults of this process and of its reaped children.
fn faults_now() -> i64 {
    use nix::sys::resource::{UsageWho, getrusage};
    [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN]
        .into_iter()
        .map(|who| getrusage(who).map_or(0, |u| u.minor_page_faults()))
        .sum()
}

/// CPU time per call of `f` (parent + child, `n` calls), and minor page
/// faults per call: unlike wall time, they hardly move when other programs
/// load the machine.
fn cpu_per_call(n: u32, mut f: impl FnMut()) -> (Duration, i64) {
    let (start, faults) = (cpu_now(), faults_now());
    for _ in 0..n {
        f();
    }
    (
        (cpu_now() - start) / n,
        (faults_now() - faults) / i64::from(n),
    )
}

fn python(method: &str) -> Option<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/spawn.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(method)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `#[multiproc::main]`, as the README's programs have it: the children
/// start from `main`'s first line. (A plain `main`, such as a test
/// harness's, starts them from the load-time hook on a thread of their own,
/// about 40-100 us more: BENCHMARKS.md.)
#[multiproc::main]
fn main() {
    if std::env::var_os(EXIT_NOW).is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    let only_forkserver = std::env::var_os(ONLY).is_some_and(|v| v == "forkserver");
    multiproc::start_forkserver().expect("forkserver");
    if !only_forkserver {
        criterion_groups(&exe);
    }
    report(&exe, only_forkserver);
}

/// The criterion groups: each start in a loop of its own.
fn criterion_groups(exe: &std::path::Path) {
    let mut c = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let mut group = c.benchmark_group("spawn_join");
    group.bench_function("bare_command_spawn_wait", |b| b.iter(|| bare_command(exe)));
    group.bench_function("multiproc_spawn_join", |b| b.iter(multiproc_spawn));
    group.bench_function("multiproc_process_start_join", |b| {
        b.iter(multiproc_process)
    });
    group.bench_function("forkserver_spawn_join", |b| b.iter(forkserver_spawn));
    group.bench_function("forkserver_process_start_join", |b| {
        b.iter(forkserver_process)
    });
    group.finish();
}

/// Everything after the criterion groups (see the module docs for what
/// `only_forkserver` leaves out).
fn report(exe: &std::path::Path, only_forkserver: bool) {
    // The ratio, from interleaved rounds so that drift in machine load
    // hits both sides alike.
    let rounds = 15;
    let (mut bare, mut ours, mut proc_) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fs_spawn, mut fs_proc) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        bare.push(time_median(9, || bare_command(exe)));
        ours.push(time_median(9, multiproc_spawn));
        proc_.push(time_median(9, multiproc_process));
        fs_spawn.push(time_median(9, forkserver_spawn));
        fs_proc.push(time_median(9, forkserver_process));
    }
    let bare = median_of(&mut bare);
    let ours = median_of(&mut ours);
    let proc_ = median_of(&mut proc_);
    let fs_spawn = median_of(&mut fs_spawn);
    let fs_proc = median_of(&mut fs_proc);
    println!("\nspawn + join, medians of {rounds} interleaved rounds of 9:");
    println!(
        "  bare Command spawn+wait      {:>8.3} ms",
        bare.as_secs_f64() * 1e3
    );
    println!(
        "  multiproc::spawn + join      {:>8.3} ms  ({:.3}x bare)",
        ours.as_secs_f64() * 1e3,
        ours.as_secs_f64() / bare.as_secs_f64()
    );
    println!(
        "  Process start + join         {:>8.3} ms  ({:.3}x bare)",
        proc_.as_secs_f64() * 1e3,
        proc_.as_secs_f64() / bare.as_secs_f64()
    );
    println!(
        "  forkserver spawn + join      {:>8.3} ms  ({:.2}x faster than spawn's)",
        fs_spawn.as_secs_f64() * 1e3,
        ours.as_secs_f64() / fs_spawn.as_secs_f64()
    );
    println!(
        "  forkserver Process st+join   {:>8.3} ms  ({:.2}x faster than spawn's)",
        fs_proc.as_secs_f64() * 1e3,
        proc_.as_secs_f64() / fs_proc.as_secs_f64()
    );
    if !only_forkserver {
        cpu_and_cpython(exe, proc_, fs_proc);
    }
    pool_and_loop();
}

/// CPU time, interleaved too: what a start costs the machine, parent and
/// child together (getrusage of this process and its reaped children);
/// then CPython's starts, against `proc_` and `fs_proc` (our `Process`
/// start + join by spawn and by the forkserver).
fn cpu_and_cpython(exe: &std::path::Path, proc_: Duration, fs_proc: Duration) {
    let rounds = 15;
    let (mut bare_cpu, mut ours_cpu, mut proc_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut faults = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        let (cpu, f) = cpu_per_call(40, || bare_command(exe));
        bare_cpu.push(cpu);
        faults[0].push(f);
        let (cpu, f) = cpu_per_call(40, multiproc_spawn);
        ours_cpu.push(cpu);
        faults[1].push(f);
        let (cpu, f) = cpu_per_call(40, multiproc_process);
        proc_cpu.push(cpu);
        faults[2].push(f);
    }
    let bare_cpu = median_of(&mut bare_cpu);
    let ours_cpu = median_of(&mut ours_cpu);
    let proc_cpu = median_of(&mut proc_cpu);
    let [bare_faults, ours_faults, proc_faults] = faults.map(|mut f| {
        f.sort_unstable();
        f[f.len() / 2]
    });
    println!("CPU time (parent + child) per start, medians of {rounds} interleaved rounds of 40:");
    println!(
        "  bare Command spawn+wait      {:>8.3} ms  {bare_faults:>5} page faults",
        bare_cpu.as_secs_f64() * 1e3
    );
    println!(
        "  multiproc::spawn + join      {:>8.3} ms  {ours_faults:>5} page faults  ({:.3}x bare)",
        ours_cpu.as_secs_f64() * 1e3,
        ours_cpu.as_secs_f64() / bare_cpu.as_secs_f64()
    );
    println!(
        "  Process start + join         {:>8.3} ms  {proc_faults:>5} page faults  ({:.3}x bare)",
        proc_cpu.as_secs_f64() * 1e3,
        proc_cpu.as_secs_f64() / bare_cpu.as_secs_f64()
    );
    for method in ["fork", "forkserver", "spawn"] {
        match python(method) {
            Some(ms) => println!(
                "  CPython Process ({method:10}) start+join {ms:>8.3} ms  (multiproc spawn {:.1}x, forkserver {:.1}x faster)",
                ms / (proc_.as_secs_f64() * 1e3),
                ms / (fs_proc.as_secs_f64() * 1e3),
            ),
            None => println!("  CPython ({method}): python3 not available"),
        }
    }
}

/// `Pool::new(2)` until ready, by method (its drop not counted), and the
/// 1000 starts of the forkserver's leak check.
fn pool_and_loop() {
    let rounds = 15;
    let (mut pool_spawn, mut pool_fs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        pool_spawn.push(pool_median(3, StartMethod::Spawn));
        pool_fs.push(pool_median(3, StartMethod::ForkServer));
    }
    let split = |v: &mut Vec<(Duration, Duration)>| {
        let (mut a, mut b): (Vec<_>, Vec<_>) = v.drain(..).unzip();
        (median_of(&mut a), median_of(&mut b))
    };
    let (spawn_built, spawn_served) = split(&mut pool_spawn);
    let (fs_built, fs_served) = split(&mut pool_fs);
    println!(
        "Pool::new(2): build() returned / first map of 2 items returned, medians of {rounds} \
         interleaved rounds of 3:"
    );
    println!(
        "  spawn                        {:>8.3} ms / {:>8.3} ms",
        spawn_built.as_secs_f64() * 1e3,
        spawn_served.as_secs_f64() * 1e3
    );
    println!(
        "  forkserver                   {:>8.3} ms / {:>8.3} ms  ({:.2}x / {:.2}x faster)",
        fs_built.as_secs_f64() * 1e3,
        fs_served.as_secs_f64() * 1e3,
        spawn_built.as_secs_f64() / fs_built.as_secs_f64(),
        spawn_served.as_secs_f64() / fs_served.as_secs_f64()
    );

    // 1000 starts in a loop: descriptors, zombies, server memory.
    let server = forkserver()
        .spawn(server_pid, ())
        .expect("spawn")
        .join()
        .expect("join");
    let (fds_before, (rss_before, _)) = (open_fds(), server_state(server));
    let busy = on_cpu(server);
    for _ in 0..1000 {
        forkserver_process();
    }
    let (fds_after, (rss_after, zombies)) = (open_fds(), server_state(server));
    let idle = on_cpu(server);
    println!(
        "1000 forkserver Process starts: descriptors {fds_before} -> {fds_after}, server \
         VmRSS {rss_before} -> {rss_after} kB, zombies under the server {zombies}"
    );
    // Its spins back off: an idle server sleeps (`spin.rs`).
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "  server CPU: {:.1} us per start in the loop, {:.1} us in the next 1 s idle",
        (idle - busy).as_secs_f64() * 1e6 / 1000.0,
        (on_cpu(server) - idle).as_secs_f64() * 1e6
    );
}
