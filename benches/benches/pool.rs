//! Pool benchmarks against their peers, in one run:
//! `cargo bench -p multiproc-benches --bench pool`.
//!
//! 1. `map(cube, 0..1_000_000)` with 2 workers, warm and including pool
//!    start; peers: sequential, rayon (2 threads), procspawn's Pool (2,
//!    one hand-made chunk per worker: it has no map), CPython `Pool(2).map` (fork, spawn).
//! 2. 200 tasks of ~8 ms CPU, 2 workers: speedup over sequential (runs
//!    alternate, medians of 3), parent CPU time per task (getrusage of the
//!    whole parent process, its pool thread included).
//! 3. `map` of 10_000 items with chunksize 1: wall time and parent CPU
//!    per task.
//! 4. 4 workers on the 2-core machine beside 2 workers: the warm 1M map,
//!    the 200 tasks and the 10_000 tiny ones again (more processes than
//!    cores: nothing may spin at the others' expense). The 200 tasks run
//!    with the default chunks and with `map_chunked(.., 1)` (a round trip
//!    per task: the parent's cost per task shows).
//!
//! Criterion times each case (`iter_custom`); the same samples give the
//! medians of the table printed at the end (also written to
//! `target/pool-bench.md`).
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use multiproc::Pool;
// `cube`, and `burn` (the 8 ms task), registered in the benches library.
use multiproc_benches::work::{burn, cube};
use rayon::prelude::*;

const N: u64 = 1_000_000;

fn cube_chunk(v: Vec<u64>) -> Vec<u64> {
    v.into_iter().map(cube).collect()
}

thread_local! {
    static SAMPLES: RefCell<BTreeMap<&'static str, Vec<f64>>> = const { RefCell::new(BTreeMap::new()) };
}

fn record(name: &'static str, seconds: f64) {
    SAMPLES.with(|s| s.borrow_mut().entry(name).or_default().push(seconds));
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn result(name: &str) -> f64 {
    SAMPLES.with(|s| s.borrow().get(name).map(|v| median(v)).unwrap_or(f64::NAN))
}

/// Runs `f` under criterion and records each iteration's wall time.
fn bench(c: &mut Criterion, name: &'static str, mut f: impl FnMut()) {
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                f();
                let d = t.elapsed();
                record(name, d.as_secs_f64());
                total += d;
            }
            total
        })
    });
}

fn parent_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let us = |t: nix::sys::time::TimeVal| {
                Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
            };
            us(u.user_time()) + us(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// Wall time and parent CPU time (every thread of this process) of `f`.
fn parent_cost(f: impl FnOnce()) -> (f64, f64) {
    let cpu0 = parent_cpu();
    let t = Instant::now();
    f();
    let wall = t.elapsed().as_secs_f64();
    (wall, (parent_cpu() - cpu0).as_secs_f64())
}

/// CPU time (schedstat, ns precision) and wake-ups (voluntary context
/// switches) of each thread of this process so far, by thread id and name.
fn thread_times() -> BTreeMap<String, (f64, f64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        let ns: f64 = stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let switches: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        let name = format!("{}:{}", entry.file_name().to_string_lossy(), comm.trim());
        out.insert(name, (ns / 1e9, switches));
    }
    out
}

/// Iterations of `burn` that take about 8 ms here.
fn calibrate_burn() -> u64 {
    let mut iters = 100_000u64;
    loop {
        let t = Instant::now();
        black_box(burn(iters));
        let d = t.elapsed();
        if d >= Duration::from_millis(20) {
            return (iters as f64 * 0.008 / d.as_secs_f64()) as u64;
        }
        iters *= 2;
    }
}

/// One 200-task case: medians of sequential and pool wall time, and of
/// the parent's CPU time per task.
struct Long {
    seq: f64,
    par: f64,
    cpu: f64,
}

struct Python {
    medians: BTreeMap<String, f64>,
    extra: BTreeMap<String, f64>,
}

fn run_python() -> Option<Python> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/pool_bench.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("python3 failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let mut medians = BTreeMap::new();
    let mut extra = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let secs: Vec<f64> = v["seconds"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        for key in ["sequential", "parent_cpu_per_task_us"] {
            if let Some(x) = v[key].as_f64() {
                extra.insert(format!("{name}.{key}"), x);
            }
        }
        medians.insert(name, median(&secs));
    }
    Some(Python { medians, extra })
}

fn main() {
    procspawn::init();
    // Profiling aid: `POOL_BENCH_COLD=20 <bench binary>`: pool start, first
    // map and drop timed separately (medians).
    if let Ok(n) = std::env::var("POOL_BENCH_COLD") {
        let n: usize = n.parse().unwrap_or(20);
        let (mut start, mut first, mut stop) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let t = Instant::now();
            let pool = Pool::new(2).expect("pool");
            start.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            black_box(pool.map(cube, 0..N).expect("map"));
            first.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            drop(pool);
            stop.push(t.elapsed().as_secs_f64());
        }
        println!(
            "cold: start {:.2} ms, first map {:.2} ms, drop {:.2} ms",
            median(&start) * 1e3,
            median(&first) * 1e3,
            median(&stop) * 1e3
        );
        return;
    }
    // Profiling aid: `POOL_BENCH_IDLE=<workers>[,<chunksize>]`: 200 tasks of
    // ~8 ms and 10_000 tiny ones, parent CPU per task (getrusage), and per
    // thread its CPU and wake-ups; `POOL_BENCH_ITERS` fixes the task.
    if let Ok(spec) = std::env::var("POOL_BENCH_IDLE") {
        let mut parts = spec.split(',').map(|p| p.parse::<usize>().unwrap_or(1));
        let workers = parts.next().unwrap_or(2);
        let chunksize = parts.next().unwrap_or(1);
        // A third field, 0: the long tasks only (for profiles).
        let tiny = parts.next().unwrap_or(1) != 0;
        let pool = Pool::new(workers).expect("pool");
        // `POOL_BENCH_ITERS`: the same tasks for two binaries (A/B).
        let iters = std::env::var("POOL_BENCH_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(calibrate_burn);
        for _ in 0..3 {
            // The same tasks in this thread, for the ideal wall time
            // (200 tasks on `workers` cores, or on 2 when more workers).
            let t = Instant::now();
            for _ in 0..10 {
                black_box(burn(black_box(iters)));
            }
            let ideal = t.elapsed().as_secs_f64() * 20.0 / workers.min(2) as f64;
            let threads0 = thread_times();
            let (wall, cpu) = parent_cost(|| {
                black_box(
                    pool.map_chunked(burn, std::iter::repeat_n(iters, 200), chunksize)
                        .expect("map"),
                );
            });
            let threads1 = thread_times();
            for (name, (t, woken)) in &threads1 {
                let (t0, woken0) = threads0.get(name).copied().unwrap_or((0.0, 0.0));
                println!(
                    "  thread {name}: {:.1} us/task, {:.2} wake-ups/task",
                    (t - t0) * 1e6 / 200.0,
                    (woken - woken0) / 200.0
                );
            }
            if !tiny {
                println!(
                    "{workers} workers: 200x8ms chunksize {chunksize}: {:.1} ms ({:.2}x ideal), parent CPU {:.1} us/task",
                    wall * 1e3,
                    wall / ideal,
                    cpu * 1e6 / 200.0
                );
                continue;
            }
            let (wall_s, cpu_s) = parent_cost(|| {
                black_box(pool.map_chunked(cube, 0..10_000u64, 1).expect("map"));
            });
            println!(
                "{workers} workers: 200x8ms chunksize {chunksize}: {:.1} ms ({:.2}x ideal), parent CPU {:.1} us/task; \
                 10k tiny chunksize 1: {:.1} us/task wall, parent CPU {:.1} us/task",
                wall * 1e3,
                wall / ideal,
                cpu * 1e6 / 200.0,
                wall_s * 1e6 / 1e4,
                cpu_s * 1e6 / 1e4
            );
        }
        return;
    }
    // Profiling aid: `POOL_BENCH_PROFILE=300 perf record -g <bench binary>`.
    if let Ok(n) = std::env::var("POOL_BENCH_PROFILE") {
        let pool = Pool::new(2).expect("pool");
        let n: usize = n.parse().unwrap_or(100);
        let t = Instant::now();
        for _ in 0..n {
            black_box(pool.map(cube, 0..N).expect("map"));
        }
        println!(
            "warm map: {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
        return;
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();

    // Figure 1.
    let seq_expected: Vec<u64> = (0..N).map(cube).collect();
    bench(&mut c, "sequential_map_1m", || {
        black_box((0..N).map(|x| cube(black_box(x))).collect::<Vec<u64>>());
    });
    let rayon2 = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("rayon pool");
    bench(&mut c, "rayon2_map_1m", || {
        black_box(rayon2.install(|| (0..N).into_par_iter().map(cube).collect::<Vec<u64>>()));
    });
    let pool = Pool::new(2).expect("pool");
    assert_eq!(pool.map(cube, 0..N).expect("map"), seq_expected);
    bench(&mut c, "multiproc_map_1m_warm", || {
        black_box(pool.map(cube, 0..N).expect("map"));
    });
    bench(&mut c, "multiproc_map_1m_cold", || {
        let pool = Pool::new(2).expect("pool");
        black_box(pool.map(cube, 0..N).expect("map"));
    });
    let ps_pool = procspawn::Pool::new(2).expect("procspawn pool");
    // One chunk per worker: procspawn's Pool::spawn blocks sending a large
    // argument until a worker takes it, so more chunks than workers deadlock
    // (8 chunks of 125_000 hang in the third spawn).
    bench(&mut c, "procspawn2_map_1m_warm", || {
        let per = N.div_ceil(2);
        let handles: Vec<_> = (0..2u64)
            .map(|k| {
                ps_pool.spawn(
                    (k * per..((k + 1) * per).min(N)).collect::<Vec<u64>>(),
                    cube_chunk,
                )
            })
            .collect();
        let out: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("procspawn join"))
            .collect();
        black_box(out);
    });

    // Figure 3: per-task overhead (wall and parent CPU per task).
    let mut tiny_cpu = Vec::new();
    bench(&mut c, "multiproc_map_10k_chunksize1", || {
        let (_, cpu) = parent_cost(|| {
            black_box(pool.map_chunked(cube, 0..10_000u64, 1).expect("map"));
        });
        tiny_cpu.push(cpu / 10_000.0);
    });
    let tiny_cpu_2 = median(&tiny_cpu);

    // Figure 4: more processes than cores (4 workers on this 2-core machine).
    let pool4 = Pool::new(4).expect("pool");
    assert_eq!(pool4.map(cube, 0..N).expect("map"), seq_expected);
    bench(&mut c, "multiproc4_map_1m_warm", || {
        black_box(pool4.map(cube, 0..N).expect("map"));
    });
    let mut tiny_cpu = Vec::new();
    bench(&mut c, "multiproc4_map_10k_chunksize1", || {
        let (_, cpu) = parent_cost(|| {
            black_box(pool4.map_chunked(cube, 0..10_000u64, 1).expect("map"));
        });
        tiny_cpu.push(cpu / 10_000.0);
    });
    let tiny_cpu_4 = median(&tiny_cpu);

    // Figure 2: 200 tasks of ~8 ms CPU (timed by hand: each run takes ~1 s).
    // Sequential and pool runs alternate, so that both see the same load.
    let iters = calibrate_burn();
    let long = |pool: &Pool, chunksize: Option<usize>| -> Long {
        let (mut seq, mut par, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..200 {
                black_box(burn(black_box(iters)));
            }
            seq.push(t.elapsed().as_secs_f64());
            let (wall, parent) = parent_cost(|| {
                let items = std::iter::repeat_n(iters, 200);
                black_box(match chunksize {
                    None => pool.map(burn, items).expect("map"),
                    Some(k) => pool.map_chunked(burn, items, k).expect("map"),
                });
            });
            par.push(wall);
            cpu.push(parent / 200.0);
        }
        Long {
            seq: median(&seq),
            par: median(&par),
            cpu: median(&cpu),
        }
    };
    let long_2 = long(&pool, None);
    let long_2_c1 = long(&pool, Some(1));
    let long_4 = long(&pool4, None);
    let long_4_c1 = long(&pool4, Some(1));
    drop(pool);
    drop(pool4);

    let py = run_python();
    let py_get = |k: &str| {
        py.as_ref()
            .and_then(|p| p.medians.get(k).copied())
            .unwrap_or(f64::NAN)
    };
    let py_extra = |k: &str| {
        py.as_ref()
            .and_then(|p| p.extra.get(k).copied())
            .unwrap_or(f64::NAN)
    };

    let warm = result("multiproc_map_1m_warm");
    let ms = |s: f64| format!("{:.2} ms", s * 1e3);
    let mut table = String::new();
    table.push_str(
        "| `map(cube, 0..1_000_000)`, 2 workers | median | vs multiproc warm |\n|---|---:|---:|\n",
    );
    let rows: Vec<(&str, f64)> = vec![
        ("multiproc Pool, warm", warm),
        (
            "multiproc Pool, incl. pool start",
            result("multiproc_map_1m_cold"),
        ),
        ("sequential (one thread)", result("sequential_map_1m")),
        ("rayon par_iter, 2 threads", result("rayon2_map_1m")),
        (
            "procspawn Pool(2), warm, one hand-made chunk per worker",
            result("procspawn2_map_1m_warm"),
        ),
        (
            "CPython Pool(2).map, fork, warm",
            py_get("cpython_fork_map_1m_warm"),
        ),
        (
            "CPython Pool(2).map, fork, incl. pool start",
            py_get("cpython_fork_map_1m_cold"),
        ),
        (
            "CPython Pool(2).map, spawn, warm",
            py_get("cpython_spawn_map_1m_warm"),
        ),
        (
            "CPython Pool(2).map, spawn, incl. pool start",
            py_get("cpython_spawn_map_1m_cold"),
        ),
    ];
    for (name, secs) in rows {
        table.push_str(&format!(
            "| {name} | {} | {:.1}x |\n",
            ms(secs),
            secs / warm
        ));
    }
    let rayon = result("rayon2_map_1m");
    table.push_str(&format!(
        "\n| warm `map(cube, 0..1_000_000)` | median | vs rayon (2 threads) |\n|---|---:|---:|\n\
         | multiproc, 2 workers | {} | {:.2}x |\n| multiproc, 4 workers on 2 cores | {} | {:.2}x |\n",
        ms(warm),
        warm / rayon,
        ms(result("multiproc4_map_1m_warm")),
        result("multiproc4_map_1m_warm") / rayon,
    ));
    let per_task = result("multiproc_map_10k_chunksize1") / 10_000.0;
    let per_task_4 = result("multiproc4_map_10k_chunksize1") / 10_000.0;
    let py_per_task = py_get("cpython_fork_map_10k_chunksize1") / 10_000.0;
    let py_seq = py_extra("cpython_fork_200x8ms.sequential");
    table.push_str(&format!(
        "\n| 200 tasks of ~8 ms CPU | sequential | pool | speedup | parent CPU per task |\n|---|---:|---:|---:|---:|\n\
         | multiproc, 2 workers, default chunks | {} | {} | {:.2}x | {:.1} us |\n\
         | multiproc, 2 workers, chunksize 1 | {} | {} | {:.2}x | {:.1} us |\n\
         | multiproc, 4 workers on 2 cores, default chunks | {} | {} | {:.2}x | {:.1} us |\n\
         | multiproc, 4 workers on 2 cores, chunksize 1 | {} | {} | {:.2}x | {:.1} us |\n\
         | CPython fork, 2 workers, default chunks | {} | {} | {:.2}x | {:.1} us |\n\
         | CPython fork, 2 workers, chunksize 1 | {} | {} | {:.2}x | {:.1} us |\n",
        ms(long_2.seq),
        ms(long_2.par),
        long_2.seq / long_2.par,
        long_2.cpu * 1e6,
        ms(long_2_c1.seq),
        ms(long_2_c1.par),
        long_2_c1.seq / long_2_c1.par,
        long_2_c1.cpu * 1e6,
        ms(long_4.seq),
        ms(long_4.par),
        long_4.seq / long_4.par,
        long_4.cpu * 1e6,
        ms(long_4_c1.seq),
        ms(long_4_c1.par),
        long_4_c1.seq / long_4_c1.par,
        long_4_c1.cpu * 1e6,
        ms(py_seq),
        ms(py_get("cpython_fork_200x8ms")),
        py_seq / py_get("cpython_fork_200x8ms"),
        py_extra("cpython_fork_200x8ms.parent_cpu_per_task_us"),
        ms(py_seq),
        ms(py_get("cpython_fork_200x8ms_chunksize1")),
        py_seq / py_get("cpython_fork_200x8ms_chunksize1"),
        py_extra("cpython_fork_200x8ms_chunksize1.parent_cpu_per_task_us"),
    ));
    table.push_str(&format!(
        "\n| `map` of 10_000 items, chunksize 1 | wall per task | parent CPU per task |\n|---|---:|---:|\n\
         | multiproc, 2 workers | {:.1} us | {:.1} us |\n| multiproc, 4 workers on 2 cores | {:.1} us | {:.1} us |\n\
         | CPython fork, 2 workers | {:.1} us ({:.1}x multiproc) | {:.1} us |\n",
        per_task * 1e6,
        tiny_cpu_2 * 1e6,
        per_task_4 * 1e6,
        tiny_cpu_4 * 1e6,
        py_per_task * 1e6,
        py_per_task / per_task,
        py_extra("cpython_fork_map_10k_chunksize1.parent_cpu_per_task_us"),
    ));
    println!("\n{table}");
    let _ = std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/pool-bench.md"),
        &table,
    );
}
