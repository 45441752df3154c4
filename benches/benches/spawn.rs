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
