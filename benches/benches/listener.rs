//! Listener/Client connections against their peers, in one run: a round
//! trip of a `u64` over TCP loopback (multiproc with an authkey, raw std
//! `TcpStream`s with `TCP_NODELAY` as the floor, CPython's
//! `multiprocessing.connection` with an authkey) and over an abstract
//! Unix socket, and an authenticated connect + accept (multiproc's
//! HMAC-SHA256 handshake, CPython 3.11's HMAC-MD5 one, a raw TCP connect).
//! CPython's numbers come from `benches/python/listener_bench.py`, started
//! by this bench; the table at the end gives every row as a ratio.
//!
//! Run: `cargo bench -p multiproc-benches --bench listener`.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use multiproc::connection::{Address, Client, Connection, Listener};
use multiproc::{Process, process_fn};

const WAIT: Duration = Duration::from_secs(30);

thread_local! {
    static SAMPLES: RefCell<BTreeMap<&'static str, Vec<f64>>> = const { RefCell::new(BTreeMap::new()) };
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn result(name: &str) -> f64 {
    SAMPLES.with(|s| s.borrow().get(name).map(|v| median(v)).unwrap_or(f64::NAN))
}

/// Runs `f` under criterion and records each sample's time per call.
fn bench(c: &mut Criterion, name: &'static str, mut f: impl FnMut()) {
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            let d = t.elapsed();
            SAMPLES.with(|s| {
                s.borrow_mut()
                    .entry(name)
                    .or_default()
                    .push(d.as_secs_f64() / iters as f64)
            });
            d
        })
    });
}

#[process_fn]
fn echo(address: Address, key: Vec<u8>) {
    let Ok(mut conn) = Client::connect_timeout::<u64>(&address, Some(&key), WAIT) else {
        return;
    };
    while let Ok(v) = conn.recv() {
        if conn.send(&v).is_err() {
            return;
        }
    }
}

#[process_fn]
fn raw_tcp_echo(port: u16) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 8];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

fn round_trip(c: &mut Criterion, name: &'static str, address: Address) {
    let key = b"bench key".to_vec();
    let mut listener = Listener::bind(address, Some(&key)).expect("bind");
    let mut p = Process::new(echo, (listener.address().clone(), key));
    p.start().expect("start");
    let mut conn: Connection<u64> = listener.accept_timeout(WAIT).expect("accept");
    bench(c, name, || {
        conn.send(&42).expect("send");
        black_box(conn.recv().expect("recv"));
    });
    drop(conn);
    p.join_timeout(WAIT).expect("join");
}

fn raw_round_trip(c: &mut Criterion) {
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = server.local_addr().expect("addr").port();
    let mut p = Process::new(raw_tcp_echo, (port,));
    p.start().expect("start");
    let (mut s, _) = server.accept().expect("accept");
    s.set_nodelay(true).expect("nodelay");
    bench(c, "raw_tcp_8_bytes", || {
        let mut buf = [0u8; 8];
        s.write_all(&42u64.to_le_bytes()).expect("write");
        s.read_exact(&mut buf).expect("read");
        black_box(buf);
    });
    drop(s);
    p.join_timeout(WAIT).expect("join");
}

/// Connects to a listener served by a thread of this process: connect,
/// handshake (both directions), accept.
fn connects(c: &mut Criterion) {
    let key = b"bench key".to_vec();
    let any: Address = "127.0.0.1:0".parse().expect("address");
    let mut listener = Listener::bind(any, Some(&key)).expect("bind");
    let addr = listener.address().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let server = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            while !stop.load(Ordering::Relaxed) {
                drop(listener.accept_timeout::<u8>(WAIT));
            }
        }
    });
    bench(c, "authenticated_connect_tcp", || {
        let conn: Connection<u8> =
            Client::connect_timeout(&addr, Some(&key), WAIT).expect("connect");
        black_box(conn);
    });
    stop.store(true, Ordering::Relaxed);
    // Wakes the server (without a key: it gives up on the handshake as
    // soon as this end closes), or lands in the backlog if it had ended.
    drop(Client::connect::<u8>(&addr, None));
    server.join().expect("server");

    let raw = TcpListener::bind("127.0.0.1:0").expect("bind");
    let raw_addr = raw.local_addr().expect("addr");
    stop.store(false, Ordering::Relaxed);
    let server = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            for s in raw.incoming() {
                drop(s);
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
        }
    });
    bench(c, "raw_tcp_connect", || {
        black_box(TcpStream::connect(raw_addr).expect("connect"));
    });
    stop.store(true, Ordering::Relaxed);
    drop(TcpStream::connect(raw_addr));
    server.join().expect("server");
}

fn run_python() -> BTreeMap<String, f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/listener_bench.py");
    let mut out = BTreeMap::new();
    let Ok(run) = std::process::Command::new("python3").arg(script).output() else {
        eprintln!("python3 is not available: no CPython rows");
        return out;
    };
    if !run.status.success() {
        eprintln!("python3 failed: {}", String::from_utf8_lossy(&run.stderr));
    }
    for line in String::from_utf8_lossy(&run.stdout).lines() {
        let parsed = line
            .split_once('=')
            .and_then(|(k, v)| Some((k.trim(), v.trim().parse::<f64>().ok()?)));
        if let Some((k, v)) = parsed {
            out.insert(k.to_string(), v);
        }
    }
    out
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    round_trip(
        &mut c,
        "multiproc_tcp_u64",
        "127.0.0.1:0".parse().expect("address"),
    );
    round_trip(
        &mut c,
        "multiproc_abstract_unix_u64",
        Address::abstract_name(format!("multiproc-bench-{}", std::process::id())),
    );
    raw_round_trip(&mut c);
    connects(&mut c);
    c.final_summary();

    let py = run_python();
    let py_get = |k: &str| py.get(k).copied().unwrap_or(f64::NAN);
    let us = |s: f64| format!("{:.1} us", s * 1e6);
    let floor = result("raw_tcp_8_bytes");
    let mine = result("multiproc_tcp_u64");
    println!("\n| round trip, TCP loopback | median | vs raw TCP | vs multiproc |");
    println!("|---|---:|---:|---:|");
    for (name, secs) in [
        ("raw TcpStream, 8 bytes, TCP_NODELAY", floor),
        ("multiproc Connection<u64>, authkey", mine),
        (
            "multiproc Connection<u64>, abstract Unix socket",
            result("multiproc_abstract_unix_u64"),
        ),
        (
            "CPython Listener/Client send/recv(42), authkey",
            py_get("cpython_tcp_round_trip"),
        ),
    ] {
        println!(
            "| {name} | {} | {:.2}x | {:.2}x |",
            us(secs),
            secs / floor,
            secs / mine
        );
    }
    let raw_connect = result("raw_tcp_connect");
    let connect = result("authenticated_connect_tcp");
    println!("\n| connect + accept, TCP loopback | median | vs multiproc |");
    println!("|---|---:|---:|");
    for (name, secs) in [
        ("raw TcpStream::connect", raw_connect),
        ("multiproc, HMAC-SHA256 handshake", connect),
        (
            "CPython 3.11, HMAC-MD5 handshake",
            py_get("cpython_authenticated_connect"),
        ),
    ] {
        println!("| {name} | {} | {:.2}x |", us(secs), secs / connect);
    }
}
