//! Queue throughput and Pipe round trips between real processes, with the
//! floors to beat measured in the same run: a raw single-producer ring in
//! shared memory (one item per publication, and batched), and a raw
//! `pipe(2)` ping-pong. CPython's numbers come from
//! `benches/python/queue_bench.py`.
//!
//! Run: `cargo bench -p multiproc-benches --bench queue`.
use std::hint::black_box;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use multiproc::connection::Connection;
use multiproc::shared::RawArray;
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

/// Items per `put_many` call in the batch bench.
const PUT_CHUNK: usize = 1024;
/// Most items per `get_many` call in the batch bench.
const GET_CHUNK: usize = 4096;

#[process_fn]
fn produce_u64_many(ctrl: Queue<u64>, q: Queue<u64>) {
    let chunk: Vec<u64> = (0..PUT_CHUNK as u64).collect();
    while let Ok(n) = ctrl.get() {
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(PUT_CHUNK);
            if q.put_many(&chunk[..k]).is_err() {
                return;
            }
            left -= k;
        }
    }
}

// ---------------------------------------------------------------------
// The raw ring peer: one producer, one consumer, u64 items in a
// `RawArray` (relaxed word copies) with release/acquire fences around the
// index stores, each side caching the other's index. `batch` items are
// written per publication of the tail (1: one item at a time, the floor
// for single puts; more: the floor for `put_many`). No crash safety, no
// wake-ups (both sides spin, then yield): the hardware's cost only.

/// Ring size (a power of two).
const RAW_SLOTS: usize = 1 << 16;
/// Control words: the tail at 0, the head at 8 (another cache line),
/// the number of items the producer is asked for at 16, a stop flag at 24.
const C_TAIL: usize = 0;
const C_HEAD: usize = 8;
const C_ASK: usize = 16;
const C_STOP: usize = 24;

fn raw_get(a: &RawArray<u64>, i: usize) -> u64 {
    a.get(i).expect("raw ring index")
}

fn raw_set(a: &RawArray<u64>, i: usize, v: u64) {
    a.set(i, v).expect("raw ring index");
}

fn raw_wait(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[process_fn]
fn raw_ring_producer(ctl: RawArray<u64>, data: RawArray<u64>, batch: u64) {
    let batch = batch as usize;
    let items: Vec<u64> = (0..batch as u64).collect();
    let mut tail = raw_get(&ctl, C_TAIL) as usize;
    let mut head = raw_get(&ctl, C_HEAD) as usize;
    loop {
        // Wait for a request: the consumer stores how many items it wants.
        let mut spins = 0;
        let n = loop {
            if raw_get(&ctl, C_STOP) != 0 {
                return;
            }
            let n = raw_get(&ctl, C_ASK);
            if n != 0 {
                break n;
            }
            raw_wait(&mut spins);
        };
        raw_set(&ctl, C_ASK, 0);
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(batch);
            let mut spins = 0;
            while tail - head + k > RAW_SLOTS {
                head = raw_get(&ctl, C_HEAD) as usize;
                fence(Ordering::Acquire);
                if tail - head + k > RAW_SLOTS {
                    raw_wait(&mut spins);
                }
            }
            let at = tail % RAW_SLOTS;
            let first = k.min(RAW_SLOTS - at);
            data.write(at, &items[..first]).expect("raw ring write");
            data.write(0, &items[first..k]).expect("raw ring write");
            tail += k;
            fence(Ordering::Release);
            raw_set(&ctl, C_TAIL, tail as u64);
            left -= k;
        }
    }
}

/// The consumer side of the raw ring (the bench process).
struct RawRing {
    ctl: RawArray<u64>,
    data: RawArray<u64>,
    head: usize,
    tail: usize,
    buf: Vec<u64>,
    p: Process,
}

impl RawRing {
    fn start(batch: u64) -> RawRing {
        let ctl = RawArray::<u64>::zeroed(32).expect("raw ring control");
        let data = RawArray::<u64>::zeroed(RAW_SLOTS).expect("raw ring data");
        let mut p = Process::new(raw_ring_producer, (ctl.clone(), data.clone(), batch));
        start(&mut p);
        RawRing {
            ctl,
            data,
            head: 0,
            tail: 0,
            buf: vec![0; RAW_SLOTS],
            p,
        }
    }

    /// Asks for `n` items and takes them, as many per read as there are
    /// (at most `max`); returns their sum.
    fn take(&mut self, n: u64, max: usize) -> u64 {
        raw_set(&self.ctl, C_ASK, n);
        let mut left = n as usize;
        let mut sum = 0u64;
        while left > 0 {
            let mut spins = 0;
            while self.tail == self.head {
                self.tail = raw_get(&self.ctl, C_TAIL) as usize;
                fence(Ordering::Acquire);
                if self.tail == self.head {
                    raw_wait(&mut spins);
                }
            }
            let at = self.head % RAW_SLOTS;
            let k = (self.tail - self.head).min(max).min(RAW_SLOTS - at);
            self.data
                .read(at, &mut self.buf[..k])
                .expect("raw ring read");
            sum = self.buf[..k].iter().fold(sum, |a, &b| a.wrapping_add(b));
            self.head += k;
            fence(Ordering::Release);
            raw_set(&self.ctl, C_HEAD, self.head as u64);
            left -= k;
        }
        sum
    }

    fn stop(mut self) {
        raw_set(&self.ctl, C_STOP, 1);
        self.p
            .join_timeout(Duration::from_secs(30))
            .expect("join raw ring producer");
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

    // The floor for single puts: a raw ring publishing one item at a time,
    // read one item at a time.
    let mut raw = RawRing::start(1);
    g.bench_function("raw_ring_u64_one_by_one", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            black_box(raw.take(iters, 1));
            t.elapsed()
        })
    });
    raw.stop();

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

fn queue_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_batch");
    g.throughput(Throughput::Elements(1));

    let ctrl = Queue::<u64>::new().expect("queue");
    let q = Queue::<u64>::new().expect("queue");
    let mut p = Process::new(produce_u64_many, (ctrl.clone(), q.clone()));
    start(&mut p);
    let mut buf = Vec::with_capacity(GET_CHUNK);
    g.bench_function("u64_put_many_get_many", |b| {
        b.iter_custom(|iters| {
            ctrl.put(iters).expect("ctrl");
            let t = Instant::now();
            let mut left = iters as usize;
            while left > 0 {
                buf.clear();
                left -= q.get_many(&mut buf, GET_CHUNK.min(left)).expect("get_many");
                black_box(&buf);
            }
            t.elapsed()
        })
    });
    ctrl.close();
    q.close();
    p.join_timeout(Duration::from_secs(30)).expect("join");

    // The floor: the raw ring, PUT_CHUNK items per publication, read in
    // runs of up to GET_CHUNK.
    let mut raw = RawRing::start(PUT_CHUNK as u64);
    g.bench_function("raw_ring_u64_batched", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            black_box(raw.take(iters, GET_CHUNK));
            t.elapsed()
        })
    });
    raw.stop();
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
    queue_batch(&mut c);
    queue_four_to_two(&mut c);
    pipe_round_trip(&mut c);
    c.final_summary();
}
