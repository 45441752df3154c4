//! Spawn + join of a trivial child: multiproc (`spawn` and `Process`)
//! against a bare `Command::new(current_exe)` spawn + wait of the same
//! binary exiting at once (the floor: exec + dynamic loading), and CPython's
//! `multiprocessing.Process` start + join (fork and spawn) in the same run.
//!
//! Run: `cargo bench -p multiproc-benches --bench spawn`
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::Criterion;
use multiproc::{Process, process_fn};

#[process_fn]
fn trivial() {}

#[process_fn]
fn trivial_value() -> u32 {
    7
}

const EXIT_NOW: &str = "MULTIPROC_BENCH_EXIT_NOW";

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
    let mut c = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let mut group = c.benchmark_group("spawn_join");
    group.bench_function("bare_command_spawn_wait", |b| b.iter(|| bare_command(&exe)));
    group.bench_function("multiproc_spawn_join", |b| b.iter(multiproc_spawn));
    group.bench_function("multiproc_process_start_join", |b| {
        b.iter(multiproc_process)
    });
    group.finish();

    // The ratio, from interleaved rounds so that drift in machine load
    // hits both sides alike.
    let rounds = 15;
    let (mut bare, mut ours, mut proc_) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        bare.push(time_median(9, || bare_command(&exe)));
        ours.push(time_median(9, multiproc_spawn));
        proc_.push(time_median(9, multiproc_process));
    }
    let bare = median_of(&mut bare);
    let ours = median_of(&mut ours);
    let proc_ = median_of(&mut proc_);
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
    // CPU time, interleaved too: what a start costs the machine, parent and
    // child together (getrusage of this process and its reaped children).
    let (mut bare_cpu, mut ours_cpu, mut proc_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut faults = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        let (cpu, f) = cpu_per_call(40, || bare_command(&exe));
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
    for method in ["fork", "spawn"] {
        match python(method) {
            Some(ms) => println!(
                "  CPython Process ({method:5}) start+join {ms:>8.3} ms  (multiproc is {:.1}x faster)",
                ms / (ours.as_secs_f64() * 1e3)
            ),
            None => println!("  CPython ({method}): python3 not available"),
        }
    }
}
