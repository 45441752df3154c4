//! Pipe round trips between real processes, with the OS floors measured in
//! the same run: a raw `pipe(2)` ping-pong and a raw Unix-socket ping-pong
//! (8 bytes each way, plain `read`/`write`), and the shared-memory floor:
//! two processes flipping one `Value<u64>` with busy-waiting, no system
//! call (what a round trip costs when each side has a core and spins; on
//! a loaded machine, or with both on one core, it is far worse than a
//! pipe, which is why a library cannot spin without bound). CPython's
//! number comes from `benches/python/queue_bench.py`.
//!
//! Run: `cargo bench -p multiproc-benches --bench pipe`.
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::Criterion;
use multiproc::connection::Connection;
use multiproc::{Pipe, Process, Value, process_fn};

use multiproc_benches::{ECHO_ENV, RawPipeEcho, raw_echo};

#[process_fn]
fn echo(mut conn: Connection<u64>) {
    while let Ok(v) = conn.recv() {
        if conn.send(&v).is_err() {
            return;
        }
    }
}

#[process_fn]
fn echo_bytes(mut conn: Connection<()>) {
    while let Ok(v) = conn.recv_bytes() {
        if conn.send_bytes(&v).is_err() {
            return;
        }
    }
}

/// The value that stops [`spin_echo`].
const SPIN_STOP: u64 = u64::MAX;

/// Answers every odd value of `word` with the next even one, busy-waiting;
/// returns on [`SPIN_STOP`] or after 60 s without a ping.
#[process_fn]
fn spin_echo(word: Value<u64>) {
    let mut last_ping = Instant::now();
    let mut spins = 0u32;
    loop {
        let v = word.load();
        if v == SPIN_STOP {
            return;
        }
        if !v.is_multiple_of(2) {
            word.store(v + 1);
            last_ping = Instant::now();
            continue;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && last_ping.elapsed() > Duration::from_secs(60) {
            return;
        }
    }
}

/// `iters` shared-memory ping-pongs with [`spin_echo`].
fn spin_round_trips(word: &Value<u64>, iters: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        let ping = word.load() + 1;
        word.store(ping);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut spins = 0u32;
        while word.load() != ping + 1 {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            assert!(
                !spins.is_multiple_of(4096) || Instant::now() < deadline,
                "the spin echo stopped answering"
            );
        }
    }
    t.elapsed()
}

fn round_trips(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipe_round_trip");

    let (mut mine, theirs) = Pipe::new::<u64>().expect("pipe");
    let mut p = Process::new(echo, (theirs,));
    p.start().expect("start");
    g.bench_function("connection_u64", |b| {
        b.iter(|| {
            mine.send(&42).expect("send");
            black_box(mine.recv().expect("recv"))
        })
    });
    drop(mine);
    p.join_timeout(Duration::from_secs(30)).expect("join");

    let (mut mine, theirs) = Pipe::new::<()>().expect("pipe");
    let mut p = Process::new(echo_bytes, (theirs,));
    p.start().expect("start");
    let kib = vec![7u8; 1024];
    g.bench_function("connection_bytes_1KiB", |b| {
        b.iter(|| {
            mine.send_bytes(&kib).expect("send");
            black_box(mine.recv_bytes().expect("recv"))
        })
    });
    drop(mine);
    p.join_timeout(Duration::from_secs(30)).expect("join");

    let mut echo = RawPipeEcho::start();
    g.bench_function("raw_pipe2_8_bytes", |b| b.iter(|| black_box(echo.ping())));
    echo.stop();

    let (mut mine, theirs) = UnixStream::pair().expect("socketpair");
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(&exe)
        .env(ECHO_ENV, "socket")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .spawn()
        .expect("raw socket echo child");
    g.bench_function("raw_unix_socket_8_bytes", |b| {
        b.iter(|| {
            let mut buf = [0u8; 8];
            mine.write_all(&42u64.to_le_bytes()).expect("write");
            mine.read_exact(&mut buf).expect("read");
            black_box(buf)
        })
    });
    drop(mine);
    child.wait().expect("wait raw socket echo");

    let word = Value::new(0u64).expect("value");
    let mut p = Process::new(spin_echo, (word.clone(),));
    p.start().expect("start");
    g.bench_function("shared_memory_spin_u64 (floor, a core each)", |b| {
        b.iter_custom(|iters| spin_round_trips(&word, iters))
    });
    word.store(SPIN_STOP);
    p.join_timeout(Duration::from_secs(30)).expect("join");
    g.finish();
}

/// Send then receive in one thread, on one pipe: the per-message cost of
/// the library (syscalls included) without the cross-process wake-up,
/// which is most of a round trip and also the noisiest part on a shared VM.
fn same_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipe_same_thread");
    let (mut a, b) = Pipe::new::<u64>().expect("pipe");
    g.bench_function("connection_u64_send_recv", |bench| {
        bench.iter(|| {
            b.send(&42).expect("send");
            black_box(a.recv().expect("recv"))
        })
    });
    let (mut from, mut to) = std::io::pipe().expect("pipe");
    g.bench_function("raw_pipe2_8_bytes_write_read", |bench| {
        bench.iter(|| {
            let mut buf = [0u8; 8];
            to.write_all(&42u64.to_le_bytes()).expect("write");
            from.read_exact(&mut buf).expect("read");
            black_box(buf)
        })
    });
    g.finish();
}

fn main() {
    if let Some(kind) = std::env::var_os(ECHO_ENV) {
        raw_echo(kind == "socket");
        return;
    }
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    same_thread(&mut c);
    round_trips(&mut c);
    c.final_summary();
}
