//! The Pool on MPI ranks against its peers, in one run, under an MPI
//! launcher with rank 0 and 2 serving ranks (`benches/RESULTS-mpi.md`):
//!
//! ```sh
//! cargo bench -p multiproc-benches --features mpi --bench mpi --no-run
//! mpirun -n 3 --oversubscribe target/release/deps/mpi-<hash>
//! ```
//!
//! 1. `map(cube, 0..1_000_000)`: the pool on the 2 serving ranks against
//!    the local pool of 2 worker processes, both warm, runs alternating,
//!    medians.
//! 2. Tiny tasks with chunking: `map_chunked(cube, 0..1_000_000, c)` for
//!    c = 1000 and 100 on the ranks: tasks per second.
//! 3. One task's round trip, `apply(cube, (x,))`, against a raw rsmpi
//!    ping-pong of 8 bytes between rank 0 and the same serving rank (the
//!    rank runs the echo as a pool task), and against the local pool's:
//!    the mean of batches of 2000 (median of 5 batches), and the median
//!    of 10000 single timed calls of each (a batch's mean on a loaded
//!    machine is mostly the preemptions it met).
//! 4. Idle CPU of each serving rank (and of rank 0) while rank 0 sleeps
//!    3 s with the pool open: `utime + stime` from `/proc`.
//!
//! Not a criterion bench: criterion's runner would be rank 0's `main`
//! too, but its many short samples add nothing to these medians, and the
//! run must stay inside one job. Each figure is a median over repeated
//! runs, printed as a table (also written to `target/mpi-bench.md`).
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use mpi::point_to_point::{Destination, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use multiproc::{Pool, process_fn};

const N: u64 = 1_000_000;
const RAW_TAG: i32 = 99;

#[process_fn]
fn cube(x: u64) -> u64 {
    x * x * x
}

/// On a serving rank: says which rank it is, then echoes `n` raw 8-byte
/// messages from rank 0 (the peer of the round trip).
#[process_fn]
fn raw_echo(n: u64) -> u64 {
    let world = SimpleCommunicator::world();
    let root = world.process_at_rank(0);
    root.send_with_tag(&world.rank(), RAW_TAG);
    for _ in 0..n {
        let (x, _) = root.receive_with_tag::<u64>(RAW_TAG);
        root.send_with_tag(&x, RAW_TAG);
    }
    n
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// CPU seconds (user + system, every thread) of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th fields of the line, in clock ticks (100 per s).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

fn main() -> multiproc::Result<()> {
    if std::env::var("OMPI_COMM_WORLD_SIZE").as_deref() != Ok("3") {
        println!("run under `mpirun -n 3` (rank 0 + 2 serving ranks): see the file's docs");
        return Ok(());
    }
    let ranks = Pool::builder().mpi().build()?;
    let local = Pool::new(2)?;
    assert_eq!(ranks.processes(), 2);
    let expect: Vec<u64> = (0..N).map(|x| x * x * x).collect();
    let mut out = String::new();

    // `-x MPI_BENCH_ROUND_TRIP_ONLY=1`: the round trip and the idle CPU
    // only (a few seconds; the figure that swings most with the load).
    let only_rt = std::env::var_os("MPI_BENCH_ROUND_TRIP_ONLY").is_some();
    // 1. map(cube, 0..1M), alternating, warm.
    if !only_rt {
        assert_eq!(ranks.map(cube, 0..N)?, expect);
        assert_eq!(local.map(cube, 0..N)?, expect);
        let (mut on_ranks, mut on_local) = (Vec::new(), Vec::new());
        for _ in 0..21 {
            on_ranks.push(time(|| drop(ranks.map(cube, 0..N).expect("map"))));
            on_local.push(time(|| drop(local.map(cube, 0..N).expect("map"))));
        }
        let (r, l) = (median(on_ranks), median(on_local));
        writeln!(out, "| `map(cube, 0..1_000_000)` | 2 serving ranks: {:.2} ms | local pool, 2 workers: {:.2} ms | {:.2}x local (goal <= 2x) |", r * 1e3, l * 1e3, r / l).ok();

        // 2. Tiny tasks, chunked.
        for chunk in [1000usize, 100] {
            let _ = ranks.map_chunked(cube, 0..N, chunk)?;
            let mut runs = Vec::new();
            for _ in 0..7 {
                runs.push(time(|| {
                    drop(ranks.map_chunked(cube, 0..N, chunk).expect("map"))
                }));
            }
            let t = median(runs);
            let mut lruns = Vec::new();
            for _ in 0..7 {
                lruns.push(time(|| {
                    drop(local.map_chunked(cube, 0..N, chunk).expect("map"))
                }));
            }
            let lt = median(lruns);
            writeln!(out, "| tiny tasks, chunksize {chunk} | 2 serving ranks: {:.2} M tasks/s | local pool: {:.2} M tasks/s | goal >= 1.5 M/s |", N as f64 / t / 1e6, N as f64 / lt / 1e6).ok();
        }
    }
    // 3. One task's round trip, and the raw ping-pong with the same rank.
    let rounds = 2000u64;
    let (mut ours, mut raw, mut loc) = (Vec::new(), Vec::new(), Vec::new());
    // Each round trip alone too: on a loaded machine a batch's mean is
    // mostly the preemptions it met, the median of single calls is not.
    let (mut ours_each, mut raw_each) = (Vec::new(), Vec::new());
    let world = SimpleCommunicator::world();
    for _ in 0..5 {
        ours.push(
            time(|| {
                for i in 0..rounds {
                    assert_eq!(ranks.apply(cube, (i,)).expect("apply"), i * i * i);
                }
            }) / rounds as f64,
        );
        for i in 0..rounds {
            ours_each.push(time(|| {
                assert_eq!(ranks.apply(cube, (i,)).expect("apply"), i * i * i);
            }));
        }
        loc.push(
            time(|| {
                for i in 0..rounds {
                    assert_eq!(local.apply(cube, (i,)).expect("apply"), i * i * i);
                }
            }) / rounds as f64,
        );
        let mut echo = ranks.apply_async(raw_echo, (2 * rounds + 100,))?;
        let (peer, _) = world.any_process().receive_with_tag::<i32>(RAW_TAG);
        let peer = world.process_at_rank(peer);
        for i in 0..100u64 {
            peer.send_with_tag(&i, RAW_TAG);
            let _ = peer.receive_with_tag::<u64>(RAW_TAG);
        }
        raw.push(
            time(|| {
                for i in 0..rounds {
                    peer.send_with_tag(&i, RAW_TAG);
                    let (x, _) = peer.receive_with_tag::<u64>(RAW_TAG);
                    assert_eq!(x, i);
                }
            }) / rounds as f64,
        );
        for i in 0..rounds {
            raw_each.push(time(|| {
                peer.send_with_tag(&i, RAW_TAG);
                let (x, _) = peer.receive_with_tag::<u64>(RAW_TAG);
                assert_eq!(x, i);
            }));
        }
        echo.get_timeout(Duration::from_secs(60))?;
    }
    let (o, w, lo) = (median(ours), median(raw), median(loc));
    writeln!(out, "| one task's round trip, `apply(cube, (x,))` | serving rank: {:.2} µs | raw rsmpi 8-byte ping-pong, same ranks: {:.2} µs | {:.2}x raw (goal <= 1.5x); local pool: {:.2} µs |", o * 1e6, w * 1e6, o / w, lo * 1e6).ok();
    let (oe, we) = (median(ours_each), median(raw_each));
    writeln!(out, "| one task's round trip, median of single calls | serving rank: {:.2} µs | raw rsmpi ping-pong: {:.2} µs | {:.2}x raw (goal <= 1.5x) |", oe * 1e6, we * 1e6, oe / we).ok();

    // 4. Idle CPU while rank 0 sleeps 3 s, the pool open.
    let pids = ranks.worker_pids();
    let me = std::process::id();
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let mine = cpu_seconds(me);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let secs = start.elapsed().as_secs_f64();
    let idle: Vec<String> = pids
        .iter()
        .zip(&before)
        .map(|(&p, b)| format!("{:.1}%", (cpu_seconds(p) - b) / secs * 100.0))
        .collect();
    let rank0 = (cpu_seconds(me) - mine) / secs * 100.0;
    writeln!(out, "| idle CPU while rank 0 sleeps 3 s | serving ranks: {} of a core | rank 0: {rank0:.1}% | goal <= 5% |", idle.join(", ")).ok();

    println!("{out}");
    let _ = std::fs::create_dir_all("target");
    let _ = std::fs::write("target/mpi-bench.md", &out);
    Ok(())
}
