//! Queue throughput and Pipe round trips between real processes, with a
//! raw `pipe(2)` ping-pong measured in the same run as the floor to beat.
//! CPython's numbers come from `benches/python/queue_bench.py`.
//!
//! Run: `cargo bench -p multiproc-benches --bench queue`.
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use multiproc::connection::Connection;
use multiproc::{Pipe, Process, Queue, process_fn};

use multiproc_benches::{ECHO_ENV, RawPipeEcho, raw_echo};

#[process_fn]
fn produce_u64(ctrl: Queue<u64>, q: Queue<u64>) {
    while let Ok(n) = ctrl.get() {
        for i in 0..n {
            if q.put(i).is_err() {
                return;
            }
        }
    }
}

#[process_fn]
fn produce_kib(ctrl: Queue<u64>, q: Queue<Vec<u8>>) {
    let msg = vec![7u8; 1024];
    while let Ok(n) = ctrl.get() {
        for _ in 0..n {
            if q.put(msg.clone()).is_err() {
                return;
            }
        }
    }
}

#[process_fn]
fn consume_u64(ctrl: Queue<u64>, q: Queue<u64>, done: Queue<u64>) {
    while let Ok(n) = ctrl.get() {
        let mut sum = 0u64;
        for _ in 0..n {
            match q.get() {
                Ok(v) => sum = sum.wrapping_add(v),
                Err(_) => return,
            }
        }
        if done.put(sum).is_err() {
            return;
        }
    }
}

#[process_fn]
fn echo(mut conn: Connection<u64>) {
    while let Ok(v) = conn.recv() {
        if conn.send(&v).is_err() {
            return;
        }
    }
}

fn start(p: &mut Process) {
    p.start().expect("start bench process");
}

fn queue_one_to_one(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_1p1c");
    g.throughput(Throughput::Elements(1));

    let ctrl = Queue::<u64>::new().expect("queue");
    let q = Queue::<u64>::new().expect("queue");
    let mut p = Process::new(produce_u64, (ctrl.clone(), q.clone()));
    start(&mut p);
    g.bench_function("u64", |b| {
        b.iter_custom(|iters| {
            ctrl.put(iters).expect("ctrl");
            let t = Instant::now();
            for _ in 0..iters {
                black_box(q.get().expect("get"));
            }
            t.elapsed()
        })
    });
    ctrl.close();
    q.close();
    p.join_timeout(Duration::from_secs(30)).expect("join");

    let ctrl = Queue::<u64>::new().expect("queue");
    let q = Queue::<Vec<u8>>::new().expect("queue");
    let mut p = Process::new(produce_kib, (ctrl.clone(), q.clone()));
    start(&mut p);
    g.bench_function("1KiB_vec", |b| {
        b.iter_custom(|iters| {
            ctrl.put(iters).expect("ctrl");
            let t = Instant::now();
            for _ in 0..iters {
                black_box(q.get().expect("get"));
            }
            t.elapsed()
        })
    });
    ctrl.close();
    q.close();
    p.join_timeout(Duration::from_secs(30)).expect("join");
    g.finish();
}

fn queue_four_to_two(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_4p2c");
    g.throughput(Throughput::Elements(1));
    let pctrl = Queue::<u64>::new().expect("queue");
    let cctrl = Queue::<u64>::new().expect("queue");
    let done = Queue::<u64>::new().expect("queue");
    let q = Queue::<u64>::new().expect("queue");
    let mut procs: Vec<Process> = (0..4)
        .map(|_| Process::new(produce_u64, (pctrl.clone(), q.clone())))
        .chain((0..2).map(|_| Process::new(consume_u64, (cctrl.clone(), q.clone(), done.clone()))))
        .collect();
    procs.iter_mut().for_each(start);
    g.bench_function("u64", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(4);
            let t = Instant::now();
            for _ in 0..2 {
                cctrl.put(per * 2).expect("ctrl");
            }
            for _ in 0..4 {
                pctrl.put(per).expect("ctrl");
            }
            for _ in 0..2 {
                done.get().expect("done");
            }
            t.elapsed()
        })
    });
    pctrl.close();
    cctrl.close();
    q.close();
    for p in &mut procs {
        p.join_timeout(Duration::from_secs(30)).expect("join");
    }
    g.finish();
}

fn pipe_round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipe_round_trip");
    let (mut mine, theirs) = Pipe::new::<u64>().expect("pipe");
    let mut p = Process::new(echo, (theirs,));
    start(&mut p);
    g.bench_function("connection_u64", |b| {
        b.iter(|| {
            mine.send(&42).expect("send");
            black_box(mine.recv().expect("recv"))
        })
    });
    drop(mine);
    p.join_timeout(Duration::from_secs(30)).expect("join");

    let mut echo = RawPipeEcho::start();
    g.bench_function("raw_pipe2_8_bytes", |b| b.iter(|| black_box(echo.ping())));
    echo.stop();
    g.finish();
}

fn main() {
    if std::env::var_os(ECHO_ENV).is_some() {
        raw_echo(false);
        return;
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    queue_one_to_one(&mut c);
    queue_four_to_two(&mut c);
    pipe_round_trip(&mut c);
    c.final_summary();
}
