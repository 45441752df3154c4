//! How cost grows with the work: curves, not single points. Every curve has
//! its peers measured in the same run (CPython's multiprocessing through
//! `benches/python/curves.py`, rayon on threads, a sequential loop) and is
//! drawn as an SVG in `benches/plots/`, with the numbers in
//! `benches/plots/curves.md`.
//!
//! Run: `cargo bench -p multiproc-benches --bench curves` (about 3
//! minutes; `-- --quick` for fewer sizes and runs).
//!
//! 1. `map(cube, 0..n)`, 2 workers, warm, for n = 10^3 .. 10^7.
//! 2. `map` of 1000 tasks of a given CPU cost (0.1 µs .. 1 ms), 2 workers:
//!    wall time per task; the ideal is cost / 2.
//! 3. Queue and Pipe throughput, one process to another, against the
//!    message size (8 B .. 64 MiB).
//! 4. `map` time against the number of workers (1 .. 8 on this machine's
//!    2 cores, so oversubscription shows): 1000 tasks of 100 µs, and
//!    `map(cube, 0..10^6)`.
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use multiproc::connection::Connection;
use multiproc::{Pipe, Pool, Process, Queue, process_fn};
use multiproc_benches::plot::{Chart, Series, Style};
use multiproc_benches::work::{burn, cube};
use rayon::prelude::*;

/// Puts `count` messages of `size` bytes for each request on `ctrl`.
#[process_fn]
fn produce_bytes(ctrl: Queue<(u64, u64)>, q: Queue<Vec<u8>>) {
    while let Ok((count, size)) = ctrl.get() {
        let msg = vec![7u8; size as usize];
        for _ in 0..count {
            if q.put(msg.clone()).is_err() {
                return;
            }
        }
    }
}

/// Receives messages until an empty one, then answers the bytes it got.
#[process_fn]
fn sink(mut conn: Connection<Vec<u8>>) {
    let mut total = 0u64;
    while let Ok(m) = conn.recv() {
        if m.is_empty() {
            if conn.send(&total.to_le_bytes().to_vec()).is_err() {
                return;
            }
            total = 0;
        } else {
            total += m.len() as u64;
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median wall time of `runs` calls of `f`, in seconds, after two calls
/// that are not timed (warm: a pool's arenas grow to the size's needs).
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut v: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut v)
}

/// CPU time of the calling thread (a calibration by wall time would be
/// wrong whenever other work shares the cores).
fn thread_cpu() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or(Duration::ZERO)
}

/// Iterations of `burn` per microsecond of CPU on this machine: the
/// median of five measurements of about 20 ms each (the same method as
/// `curves.py`).
fn burn_per_us() -> f64 {
    let cpu_of = |iters: u64| {
        let t = thread_cpu();
        black_box(burn(black_box(iters)));
        thread_cpu().saturating_sub(t)
    };
    let mut iters = 100_000u64;
    while cpu_of(iters) < Duration::from_millis(20) {
        iters *= 2;
    }
    let mut rates: Vec<f64> = (0..5)
        .map(|_| iters as f64 / (cpu_of(iters).as_secs_f64() * 1e6))
        .collect();
    median(&mut rates)
}

/// `tasks` tasks of `burn(iters)` on the pool.
fn pool_burn(pool: &Pool, tasks: u64, iters: u64) {
    let args = std::iter::repeat_n(iters, tasks as usize);
    black_box(pool.map(burn, args).expect("map"));
}

/// `tasks` tasks of `burn(iters)` on rayon's threads.
fn rayon_burn(threads: &rayon::ThreadPool, tasks: u64, iters: u64) {
    threads.install(|| {
        let out: Vec<u64> = (0..tasks)
            .into_par_iter()
            .map(|_| burn(black_box(iters)))
            .collect();
        black_box(out);
    });
}

/// `cube` over `0..n` on rayon's threads.
fn rayon_cube(threads: &rayon::ThreadPool, n: u64) {
    threads.install(|| black_box((0..n).into_par_iter().map(cube).collect::<Vec<u64>>()));
}

/// A chart of multiproc, CPython (its points named `python`) and rayon.
fn peer_chart(
    run: &Run,
    (title, x_label, y_label): (&str, &str, &str),
    ours: (&str, Vec<(f64, f64)>),
    python: (&str, &str),
    rayon: (&str, Vec<(f64, f64)>),
) -> Chart {
    Chart::new(title, x_label, y_label, COMMAND)
        .series(Series::new(ours.0, Style::Ours, ours.1))
        .series(Series::new(python.0, Style::Python, run.python(python.1)))
        .series(Series::new(rayon.0, Style::Rayon, rayon.1))
}

fn rayon_pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .expect("rayon pool")
}

/// CPython's points: `name -> [(x, y)]`, from `benches/python/curves.py`.
fn run_python(quick: bool) -> BTreeMap<String, Vec<(f64, f64)>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/curves.py");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script);
    if quick {
        cmd.arg("--quick");
    }
    let mut out = BTreeMap::new();
    let output = match cmd.output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!("python3 failed: {}", String::from_utf8_lossy(&o.stderr));
            return out;
        }
        Err(e) => {
            eprintln!("python3 not run: {e}");
            return out;
        }
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(x), Some(y)) = (v["name"].as_str(), v["x"].as_f64(), v["y"].as_f64())
        else {
            continue;
        };
        out.entry(name.to_string())
            .or_insert_with(Vec::new)
            .push((x, y));
    }
    out
}

struct Run {
    quick: bool,
    python: BTreeMap<String, Vec<(f64, f64)>>,
    table: String,
}

impl Run {
    fn python(&self, name: &str) -> Vec<(f64, f64)> {
        self.python.get(name).cloned().unwrap_or_default()
    }

    fn chart(&mut self, chart: Chart, file: &str) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/plots");
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("cannot create {dir}: {e}");
            return;
        }
        let path = format!("{dir}/{file}");
        self.table.push_str(&chart.table(file));
        match chart.write_svg(&path) {
            Ok(()) => println!("wrote {path}"),
            Err(e) => eprintln!("cannot write {path}: {e}"),
        }
    }
}

const COMMAND: &str = "cargo bench -p multiproc-benches --bench curves";

fn map_against_size(run: &mut Run, pool: &Pool) {
    let sizes: Vec<u64> = if run.quick {
        vec![1_000, 100_000, 10_000_000]
    } else {
        vec![1_000, 10_000, 100_000, 1_000_000, 10_000_000]
    };
    let rayon2 = rayon_pool(2);
    let (mut ours, mut ray, mut seq) = (Vec::new(), Vec::new(), Vec::new());
    for &n in &sizes {
        let runs = if n >= 10_000_000 { 3 } else { 7 };
        let t = time(runs, || {
            black_box(pool.map(cube, 0..n).expect("map"));
        });
        ours.push((n as f64, t * 1e3));
        ray.push((n as f64, time(runs, || rayon_cube(&rayon2, n)) * 1e3));
        let t = time(runs, || {
            black_box((0..n).map(|x| cube(black_box(x))).collect::<Vec<u64>>());
        });
        seq.push((n as f64, t * 1e3));
    }
    let chart = peer_chart(
        run,
        (
            "map(cube, 0..n), 2 workers, warm",
            "items n",
            "wall time (ms)",
        ),
        ("multiproc Pool(2)", ours),
        ("CPython Pool(2), fork", "map_size"),
        ("rayon, 2 threads", ray),
    )
    .log_x()
    .log_y()
    .series(Series::new("sequential", Style::Floor, seq));
    run.chart(chart, "map_size.svg");
}

fn map_against_task_cost(run: &mut Run, pool: &Pool, per_us: f64) {
    let costs: Vec<f64> = if run.quick {
        vec![0.1, 10.0, 1000.0]
    } else {
        vec![0.1, 1.0, 10.0, 100.0, 1000.0]
    };
    let tasks = 1000u64;
    let rayon2 = rayon_pool(2);
    let (mut ours, mut ray, mut ideal) = (Vec::new(), Vec::new(), Vec::new());
    for &cost in &costs {
        let iters = ((cost * per_us) as u64).max(1);
        let runs = if cost >= 100.0 { 3 } else { 7 };
        let per_task = |t: f64| (cost, t * 1e6 / tasks as f64);
        ours.push(per_task(time(runs, || pool_burn(pool, tasks, iters))));
        ray.push(per_task(time(runs, || rayon_burn(&rayon2, tasks, iters))));
        ideal.push((cost, cost / 2.0));
    }
    let chart = peer_chart(
        run,
        (
            "map of 1000 tasks of a given CPU cost, 2 workers",
            "CPU cost of one task (µs)",
            "wall time per task (µs)",
        ),
        ("multiproc Pool(2)", ours),
        ("CPython Pool(2), fork", "map_cost"),
        ("rayon, 2 threads", ray),
    )
    .log_x()
    .log_y()
    .series(Series::new("ideal: cost / 2", Style::Floor, ideal));
    run.chart(chart, "map_task_cost.svg");
}

/// Messages per point: about 128 MiB in all, at least 8, at most 200 000.
fn message_count(size: u64) -> u64 {
    ((128 << 20) / size).clamp(8, 200_000)
}

fn throughput_against_size(run: &mut Run) {
    let sizes: Vec<u64> = if run.quick {
        vec![8, 4096, 1 << 20, 64 << 20]
    } else {
        vec![
            8,
            64,
            512,
            4096,
            32 << 10,
            256 << 10,
            2 << 20,
            16 << 20,
            64 << 20,
        ]
    };
    let runs = if run.quick { 1 } else { 3 };

    let ctrl = Queue::<(u64, u64)>::new().expect("queue");
    let q = Queue::<Vec<u8>>::new().expect("queue");
    let mut producer = Process::new(produce_bytes, (ctrl.clone(), q.clone()));
    producer.start().expect("start producer");
    let mut queue_points = Vec::new();
    for &size in &sizes {
        let count = message_count(size);
        let t = time(runs, || {
            ctrl.put((count, size)).expect("ctrl");
            for _ in 0..count {
                black_box(q.get().expect("get"));
            }
        });
        queue_points.push((size as f64, (count * size) as f64 / t / 1e6));
    }
    ctrl.close();
    q.close();
    producer
        .join_timeout(Duration::from_secs(60))
        .expect("join producer");

    let (mut mine, theirs) = Pipe::new::<Vec<u8>>().expect("pipe");
    let mut p = Process::new(sink, (theirs,));
    p.start().expect("start sink");
    let mut pipe_points = Vec::new();
    for &size in &sizes {
        let count = message_count(size);
        let msg = vec![7u8; size as usize];
        let t = time(runs, || {
            for _ in 0..count {
                mine.send(&msg).expect("send");
            }
            mine.send(&Vec::new()).expect("send");
            black_box(mine.recv().expect("recv"));
        });
        pipe_points.push((size as f64, (count * size) as f64 / t / 1e6));
    }
    drop(mine);
    p.join_timeout(Duration::from_secs(60)).expect("join sink");

    let chart = Chart::new(
        "Queue and Pipe throughput, one process to another",
        "message size (bytes)",
        "throughput (MB/s)",
        COMMAND,
    )
    .log_x()
    .log_y()
    .series(Series::new("multiproc Queue", Style::Ours, queue_points))
    .series(Series::new("multiproc Pipe", Style::Ours2, pipe_points))
    .series(Series::new(
        "CPython Queue",
        Style::Python,
        run.python("queue_size"),
    ))
    .series(Series::new(
        "CPython Pipe",
        Style::Python2,
        run.python("pipe_size"),
    ));
    run.chart(chart, "queue_pipe_size.svg");
}

fn map_against_workers(run: &mut Run, per_us: f64) {
    let workers: Vec<usize> = if run.quick {
        vec![1, 2, 4, 8]
    } else {
        (1..=8).collect()
    };
    let iters = ((100.0 * per_us) as u64).max(1);
    let (mut burn_ours, mut burn_ray, mut cube_ours, mut cube_ray) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &w in &workers {
        let x = w as f64;
        let pool = Pool::new(w).expect("pool");
        black_box(pool.map(cube, 0..1000).expect("warm"));
        burn_ours.push((x, time(5, || pool_burn(&pool, 1000, iters)) * 1e3));
        let t = time(5, || {
            black_box(pool.map(cube, 0..1_000_000).expect("map"));
        });
        cube_ours.push((x, t * 1e3));
        drop(pool);
        let threads = rayon_pool(w);
        burn_ray.push((x, time(5, || rayon_burn(&threads, 1000, iters)) * 1e3));
        cube_ray.push((x, time(5, || rayon_cube(&threads, 1_000_000)) * 1e3));
    }
    let labels = (
        "multiproc Pool(w)",
        "CPython Pool(w), fork",
        "rayon, w threads",
    );
    let chart = peer_chart(
        run,
        (
            "map of 1000 tasks of 100 µs against workers (2 cores)",
            "workers",
            "wall time (ms)",
        ),
        (labels.0, burn_ours),
        (labels.1, "workers_burn"),
        (labels.2, burn_ray),
    );
    run.chart(chart, "map_workers_tasks.svg");
    let chart = peer_chart(
        run,
        (
            "map(cube, 0..10^6) against workers (2 cores)",
            "workers",
            "wall time (ms)",
        ),
        (labels.0, cube_ours),
        (labels.1, "workers_cube"),
        (labels.2, cube_ray),
    )
    .log_y();
    run.chart(chart, "map_workers_cube.svg");
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; nothing else is read.
    let per_us = burn_per_us();
    println!("burn: {per_us:.1} iterations per µs; CPython's points first");
    let python = run_python(quick);
    let mut run = Run {
        quick,
        python,
        table: String::new(),
    };
    let pool = Pool::new(2).expect("pool");
    black_box(pool.map(cube, 0..1000).expect("warm"));
    map_against_size(&mut run, &pool);
    map_against_task_cost(&mut run, &pool, per_us);
    drop(pool);
    throughput_against_size(&mut run);
    map_against_workers(&mut run, per_us);

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let head = format!(
        "# Curves (`{COMMAND}`)\n\nLoad average at the end of the run: {}\n\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/plots/curves.md");
    match std::fs::write(path, head + &run.table) {
        Ok(()) => println!("wrote {path}"),
        Err(e) => eprintln!("cannot write {path}: {e}"),
    }
}
