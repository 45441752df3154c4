//! Resource limits: a descriptor table of 64 (`ulimit -n 64`, set with
//! `setrlimit` in the run) while using a pool, a queue and a pipe, and a
//! child with a small address space (`RLIMIT_AS`) receiving a large
//! message over a pipe, a queue, and as a pool task's argument.
//!
//! With the table full, every operation must fail with an error that says
//! so (or succeed), and none may hang; once descriptors are free again,
//! the same objects and new ones work. A receiver short of memory gets an
//! error, not an abort, and the next message arrives.
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use multiproc::connection::Connection;
use multiproc::{Pipe, Pool, Process, Queue, process_fn, spawn};

use super::{Scenario, reap, start};
use crate::ctx::{Context, Ctx, Res};
use crate::util::Msg;

const LIMIT: Duration = Duration::from_secs(30);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "limits/nofile-64-pool-queue-pipe",
            run: nofile_64,
        },
        Scenario {
            name: "limits/rlimit-as-receiver-pipe-300MiB",
            run: small_as_pipe,
        },
        Scenario {
            name: "limits/rlimit-as-receiver-queue-300MiB",
            run: small_as_queue,
        },
        Scenario {
            name: "limits/rlimit-as-pool-worker-300MiB-argument",
            run: small_as_pool,
        },
    ]
}

#[process_fn]
fn triple(x: u64) -> u64 {
    x * 3
}

#[process_fn]
fn put_some(q: Queue<Msg>, n: u64) -> u64 {
    for seq in 0..n {
        if q.put_timeout(
            Msg::new(5, seq, if seq % 2 == 0 { 10 } else { 50_000 }),
            LIMIT,
        )
        .is_err()
        {
            return seq;
        }
    }
    n
}

#[process_fn]
fn echo_once(mut end: Connection<Msg>) {
    if let Ok(m) = end.recv_timeout(LIMIT) {
        let _ = end.send(&m);
    }
}

/// An error that says the descriptor table is full.
fn clear(e: &dyn std::fmt::Display) -> bool {
    let t = e.to_string().to_lowercase();
    t.contains("too many open files") || t.contains("descriptor") || t.contains("emfile")
}

fn nofile_64(ctx: &mut Ctx) -> Res {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ctx("getrlimit")?;
    let r = ctx.guarded(LIMIT, "a descriptor table of 64", move |ctx| {
        let pool = Pool::new(2).ctx("Pool::new")?;
        let q = Queue::<Msg>::bounded(16).ctx("Queue::bounded")?;
        let (a, mut b) = Pipe::new::<Msg>().ctx("Pipe::new")?;
        setrlimit(Resource::RLIMIT_NOFILE, 64, hard).ctx("setrlimit 64")?;
        let mut hold = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hold.push(f);
            if hold.len() > 100 {
                return Err("the limit of 64 descriptors did not hold".into());
            }
        }
        // The table is full: each call returns, with a clear error if it fails.
        let mut unclear = Vec::new();
        let t0 = Instant::now();
        if let Err(e) = Pool::new(1)
            && !clear(&e)
        {
            unclear.push(format!("Pool::new: {e}"));
        }
        if let Err(e) = Queue::<u8>::new()
            && !clear(&e)
        {
            unclear.push(format!("Queue::new: {e}"));
        }
        if let Err(e) = Pipe::new::<u8>()
            && !clear(&e)
        {
            unclear.push(format!("Pipe::new: {e}"));
        }
        match spawn(triple, (1,)) {
            Ok(mut h) => drop(h.join_timeout(LIMIT)),
            Err(e) if !clear(&e) => unclear.push(format!("spawn: {e}")),
            Err(_) => {}
        }
        // Existing objects, with no descriptor to spare.
        if let Err(e) = pool.map(triple, 0..100u64) {
            ctx.notes_unclear(&e, "map with a full table", &mut unclear);
        }
        if let Err(e) = q.put_timeout(Msg::new(1, 0, 50_000), Duration::from_secs(2)) {
            ctx.notes_unclear(&e, "a large put with a full table", &mut unclear);
        } else if let Err(e) = q.get_timeout(Duration::from_secs(2)) {
            ctx.notes_unclear(&e, "get with a full table", &mut unclear);
        }
        if let Err(e) = a.send(&Msg::new(1, 1, 100_000)) {
            ctx.notes_unclear(&e, "a large send with a full table", &mut unclear);
        } else if let Err(e) = b.recv_timeout(Duration::from_secs(2)) {
            ctx.notes_unclear(&e, "recv with a full table", &mut unclear);
        }
        let took = t0.elapsed();
        for u in unclear {
            ctx.fail(format!("an error that does not say the table is full: {u}"));
        }
        ctx.check(took < Duration::from_secs(20), || {
            format!("the calls with a full table took {took:?}")
        });
        // Descriptors free again (the limit stays 64): everything works.
        drop(hold);
        let deadline = Instant::now() + Duration::from_secs(10);
        let out = loop {
            match pool.map(triple, 0..100u64) {
                Ok(v) => break v,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the pool never recovered: {e}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if out != (0..100u64).map(|x| x * 3).collect::<Vec<_>>() {
            ctx.tear(1, || "map results after the table was full".into());
        }
        let fresh = Pool::new(2).ctx("a new pool once descriptors are free")?;
        if fresh.map(triple, 0..10u64).ctx("map on the new pool")?
            != (0..10u64).map(|x| x * 3).collect::<Vec<_>>()
        {
            ctx.tear(1, || "a new pool's results".into());
        }
        drop(fresh);
        // Drain whatever the full-table calls left.
        while q.try_get().is_ok() {}
        while b.try_recv().is_ok() {}
        let mut p = start(Process::new(put_some, (q.clone(), 20u64)))?;
        for seq in 0..20 {
            match q.get_timeout(LIMIT) {
                Ok(m) if m.id == 5 && m.seq == seq && m.whole() => {}
                Ok(m) => ctx.tear(1, || format!("queue message {} of {}", m.seq, m.id)),
                Err(e) => return Err(format!("queue get {seq} once descriptors are free: {e}")),
            }
        }
        reap(&mut p)?;
        let (c, d) = Pipe::new::<Msg>().ctx("Pipe::new once descriptors are free")?;
        let mut e = start(Process::new(echo_once, (d,)))?;
        let mut c = c;
        c.send(&Msg::new(6, 0, 200_000)).ctx("send")?;
        match c.recv_timeout(LIMIT) {
            Ok(m) if m.id == 6 && m.whole() => {}
            Ok(_) => ctx.tear(1, || "the echoed message".into()),
            Err(e) => return Err(format!("echo once descriptors are free: {e}")),
        }
        reap(&mut e)?;
        drop((a, b));
        Ok(())
    });
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).ctx("restore the limit")?;
    r
}

impl Ctx {
    /// An error of an operation that needed a descriptor: it must say so
    /// (a timeout is not an answer either).
    fn notes_unclear(&mut self, e: &dyn std::fmt::Display, what: &str, unclear: &mut Vec<String>) {
        if !clear(e) {
            unclear.push(format!("{what}: {e}"));
        }
    }
}

const AS_LIMIT: u64 = 256 << 20;
const HUGE: usize = 300 << 20;

fn limit_as() {
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_AS) {
        let _ = setrlimit(Resource::RLIMIT_AS, AS_LIMIT, hard);
    }
}

fn describe(r: Result<Vec<u8>, String>) -> String {
    match r {
        Ok(b) if b.len() < 100 => String::from_utf8_lossy(&b).into_owned(),
        Ok(b) => format!("{} bytes", b.len()),
        Err(e) => format!("error: {e}"),
    }
}

#[process_fn]
fn pipe_receiver_small_as(mut end: Connection<()>) -> (String, String) {
    limit_as();
    if end.send_bytes(b"ready").is_err() {
        return ("no ready".into(), String::new());
    }
    let big = describe(end.recv_bytes_timeout(LIMIT).map_err(|e| e.to_string()));
    let next = describe(end.recv_bytes_timeout(LIMIT).map_err(|e| e.to_string()));
    (big, next)
}

fn verdict(ctx: &mut Ctx, r: multiproc::Result<(String, String)>) -> Res {
    match r {
        Ok((big, next)) => {
            if !big.starts_with("error") {
                return Err(format!(
                    "the receiver of 300 MiB with 256 MiB of address space got {big:?}"
                ));
            }
            ctx.check(next == "after", || format!("the next message: {next:?}"));
            Ok(())
        }
        Err(e) => Err(format!("the receiver did not come back with an error: {e}")),
    }
}

fn small_as_pipe(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "a pipe receiver short of memory", move |ctx| {
        let (mut mine, theirs) = Pipe::new::<()>().ctx("Pipe::new")?;
        let mut child = spawn(pipe_receiver_small_as, (theirs,)).ctx("spawn")?;
        if mine.recv_bytes_timeout(LIMIT).ctx("ready")? != b"ready" {
            return Err("no ready".into());
        }
        let big = vec![3u8; HUGE];
        let sent = mine.send_bytes(&big);
        drop(big);
        let after = mine.send_bytes(b"after");
        let r = child.join_timeout(LIMIT);
        if sent.is_err() || after.is_err() {
            ctx.fail(format!("sending: {sent:?} {after:?}"));
        }
        verdict(ctx, r)
    })
}

#[process_fn]
fn queue_receiver_small_as(q: Queue<Vec<u8>>, ready: Queue<u8>) -> (String, String) {
    limit_as();
    let _ = ready.put(1);
    let big = describe(q.get_timeout(LIMIT).map_err(|e| e.to_string()));
    let next = describe(q.get_timeout(LIMIT).map_err(|e| e.to_string()));
    (big, next)
}

fn small_as_queue(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "a queue consumer short of memory", move |ctx| {
        let q = Queue::<Vec<u8>>::bounded(4).ctx("Queue::bounded")?;
        let ready = Queue::<u8>::bounded(1).ctx("Queue::bounded")?;
        let mut child = spawn(queue_receiver_small_as, (q.clone(), ready.clone())).ctx("spawn")?;
        ready.get_timeout(LIMIT).ctx("ready")?;
        q.put(vec![3u8; HUGE])
            .map_err(|e| format!("put 300 MiB: {e}"))?;
        q.put(b"after".to_vec())
            .map_err(|e| format!("put after: {e}"))?;
        verdict(ctx, child.join_timeout(LIMIT))
    })
}

#[process_fn]
fn limit_worker_as() {
    limit_as();
}

#[process_fn]
fn length(v: Vec<u8>) -> u64 {
    v.len() as u64
}

fn small_as_pool(ctx: &mut Ctx) -> Res {
    ctx.guarded(LIMIT, "a pool worker short of memory", move |ctx| {
        let pool = Pool::builder()
            .processes(2)
            .initializer(limit_worker_as, ())
            .build()
            .ctx("Pool::build")?;
        // The worker cannot hold it: an error for this task (the worker
        // may die of it and be replaced), not a hang.
        let mut r = pool
            .apply_async(length, (vec![3u8; HUGE],))
            .ctx("apply_async")?;
        match r.get_timeout(LIMIT) {
            Ok(n) => ctx.fail(format!(
                "a worker with 256 MiB of address space took a 300 MiB argument ({n})"
            )),
            Err(e) if e.is_timeout() => {
                return Err("the task neither failed nor finished in 30 s".into());
            }
            Err(_) => {}
        }
        let out = pool
            .map(length, (0..20).map(|i| vec![1u8; i]))
            .ctx("map after")?;
        ctx.check(out == (0..20u64).collect::<Vec<_>>(), || {
            "map results after".into()
        });
        Ok(())
    })
}
