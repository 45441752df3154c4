//! Hostile bytes on descriptors a peer can write that the pool and pipe
//! scenarios do not cover: a child's start socket, from either side, and
//! a queue's side socket; random bytes written into the shared memory of
//! a queue, a lock and a value; and a stray `MULTIPROC_CHILD` in the
//! environment of a program that is not a multiproc child.
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, socketpair};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use multiproc::queue::GetTimeoutError;
use multiproc::sync::Event;
use multiproc::{Lock, Process, Queue, Value, process_fn, spawn};

use super::{Scenario, reap, start};
use crate::ctx::{Context, Ctx, Res};
use crate::util::{self, Msg, Rng};

const LIMIT: Duration = Duration::from_secs(30);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "hostile/child-writes-garbage-to-its-start-socket",
            run: child_garbage,
        },
        Scenario {
            name: "hostile/parent-writes-garbage-to-a-child-start-socket",
            run: parent_garbage,
        },
        Scenario {
            name: "hostile/garbage-datagrams-on-a-queue-side-socket",
            run: queue_side_garbage,
        },
        Scenario {
            name: "hostile/garbage-in-shared-memory/queue",
            run: scribbled::<0>,
        },
        Scenario {
            name: "hostile/garbage-in-shared-memory/lock",
            run: scribbled::<1>,
        },
        Scenario {
            name: "hostile/garbage-in-shared-memory/value",
            run: scribbled::<2>,
        },
        Scenario {
            name: "hostile/stray-MULTIPROC_CHILD-runs-main",
            run: stray_marker,
        },
    ]
}

/// A spawned child that writes hostile bytes to its socket to the parent
/// (descriptor 3), then returns a value (or exits, or sleeps).
#[process_fn]
fn child_writes_garbage(seed: u64, then: u8) -> u64 {
    let mut rng = Rng::new(seed);
    let bytes = super::pipe::hostile_bytes(&mut rng);
    let _ = nix::sys::socket::send(3, &bytes, MsgFlags::MSG_DONTWAIT);
    match then {
        0 => 7,
        1 => std::process::exit(0),
        _ => {
            std::thread::sleep(Duration::from_secs(60));
            7
        }
    }
}

fn child_garbage(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    let then = ctx.rng.range(0, 3) as u8;
    ctx.guarded(
        LIMIT,
        "a child writing garbage to its start socket",
        move |_ctx| {
            let t0 = Instant::now();
            let mut h = spawn(child_writes_garbage, (seed, then)).ctx("spawn")?;
            let pid = h.pid();
            // The join must return, by its deadline at the latest: a value (the
            // garbage happened to be skipped), or an error.
            let r = h.join_timeout(Duration::from_secs(3));
            // Dropping the handle kills the child if it still runs.
            drop(h);
            if t0.elapsed() > Duration::from_secs(8) {
                return Err(format!("join_timeout(3 s) took {:?}", t0.elapsed()));
            }
            match r {
                Ok(7) | Err(_) => {}
                Ok(v) => return Err(format!("join gave {v}, a value the child never returned")),
            }
            // The handle is gone: the child must be gone too (killed, reaped).
            if !util::eventually(Duration::from_secs(5), || !util::alive(pid)) {
                return Err(format!("child {pid} still runs after its join returned"));
            }
            // A normal child works as ever.
            let v = spawn(child_writes_garbage_not, (5u64,))
                .ctx("spawn")?
                .join_timeout(LIMIT)
                .ctx("join")?;
            if v != 5 {
                return Err(format!("a plain child returned {v}"));
            }
            Ok(())
        },
    )
}

#[process_fn]
fn child_writes_garbage_not(x: u64) -> u64 {
    x
}

/// How long a scribbler writes.
const SCRIBBLE: Duration = Duration::from_millis(800);

/// Writes random bytes at random places of every memfd this process
/// holds (the handles it was given: a queue's ring, a lock word, a
/// value), for [`SCRIBBLE`]: a peer with write access to the shared
/// memory that does not follow the protocol.
fn scribble_memfds(seed: u64) {
    let mut rng = Rng::new(seed);
    let files: Vec<(std::fs::File, u64)> = util::fds_of_kind("/memfd:")
        .into_iter()
        .filter_map(|fd| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/self/fd/{fd}"))
                .ok()?;
            let len = f.metadata().ok()?.len();
            (len > 0).then_some((f, len))
        })
        .collect();
    if files.is_empty() {
        return;
    }
    let end = Instant::now() + SCRIBBLE;
    while Instant::now() < end {
        let (f, len) = &files[rng.below(files.len())];
        // Mostly small writes (a word, a header), sometimes a whole page;
        // half near the start (the header, the first slots), the rest in
        // the first 64 MiB (a queue's arena is a sparse file of terabytes).
        let n = if rng.chance(8) {
            4096
        } else {
            rng.range(1, 17) as usize
        };
        let within = (*len).min(if rng.chance(2) { 8192 } else { 64 << 20 });
        let at = rng.range(0, within);
        let _ = f.write_at(&rng.bytes(n), at);
        std::thread::sleep(Duration::from_micros(rng.range(10, 300)));
    }
}

#[process_fn]
fn scribble_queue(q: Queue<Msg>, seed: u64) {
    scribble_memfds(seed);
    drop(q);
}

#[process_fn]
fn scribble_lock(l: Lock, seed: u64) {
    scribble_memfds(seed);
    drop(l);
}

#[process_fn]
fn scribble_value(v: Value<[u64; 8]>, seed: u64) {
    scribble_memfds(seed);
    drop(v);
}

/// The longest a timed call may take: its timeout plus generous room for
/// a loaded machine. Longer means it ignored its timeout.
const TIMED_CALL_BOUND: Duration = Duration::from_secs(5);

/// A peer holding a queue, a lock or a value writes random bytes into
/// their shared memory while this process uses them with timed calls
/// only. The documented promise (`runtime/src/queue/ring.rs`,
/// "Corruption"; the lock's and value's docs): every timed call returns
/// by its deadline, with a value or an error; nothing panics, aborts or
/// reads out of bounds. Values and messages themselves may be anything:
/// a peer that can write the memory can forge them.
fn scribbled<const WHAT: u8>(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    ctx.guarded(LIMIT, "garbage in shared memory", move |ctx| {
        let mut rng = Rng::new(seed ^ 1);
        let short = Duration::from_millis(50);
        let slow = |ctx: &mut Ctx, what: &str, t0: Instant| {
            if t0.elapsed() > TIMED_CALL_BOUND {
                ctx.hang = Some(format!(
                    "{what} with a 50 ms timeout took {:?}",
                    t0.elapsed()
                ));
            }
        };
        let mut calls = 0u64;
        match WHAT {
            0 => {
                let q = Queue::<Msg>::bounded(16).ctx("Queue::bounded")?;
                let mut p = start(Process::new(scribble_queue, (q.clone(), seed)))?;
                let mut seq = 0;
                while p.is_alive() {
                    let len = rng.range(1, 40_000) as usize;
                    let t0 = Instant::now();
                    let _ = q.put_timeout(Msg::new(1, seq, len), short);
                    slow(ctx, "put_timeout", t0);
                    let t0 = Instant::now();
                    let _ = q.get_timeout(short);
                    slow(ctx, "get_timeout", t0);
                    let t0 = Instant::now();
                    let _ = q.try_get();
                    slow(ctx, "try_get", t0);
                    seq += 1;
                    calls += 3;
                }
                reap(&mut p)?;
            }
            1 => {
                let l = Lock::new().ctx("Lock::new")?;
                let mut p = start(Process::new(scribble_lock, (l.clone(), seed)))?;
                while p.is_alive() {
                    let t0 = Instant::now();
                    drop(l.acquire_timeout(short));
                    slow(ctx, "acquire_timeout", t0);
                    let t0 = Instant::now();
                    drop(l.try_acquire());
                    slow(ctx, "try_acquire", t0);
                    calls += 2;
                }
                reap(&mut p)?;
            }
            _ => {
                let v = Value::new([0u64; 8]).ctx("Value::new")?;
                let mut p = start(Process::new(scribble_value, (v.clone(), seed)))?;
                while p.is_alive() {
                    let t0 = Instant::now();
                    if let Ok(mut g) = v.lock_timeout(short) {
                        g[0] = g[0].wrapping_add(1);
                    }
                    slow(ctx, "lock_timeout", t0);
                    calls += 1;
                }
                reap(&mut p)?;
            }
        }
        ctx.check(calls > 0, || "no call was made while the peer wrote".into());
        if ctx.hang.is_some() {
            return Err("a timed call ignored its timeout".into());
        }
        Ok(())
    })
}

/// Starts this executable (`__probe main-ran`) with `marker` as
/// `MULTIPROC_CHILD` and `fd3` (if any) at descriptor 3; returns its pid.
fn spawn_marked(marker: &str, fd3: Option<std::os::fd::BorrowedFd<'_>>) -> Result<Pid, String> {
    let exe = std::env::current_exe().ctx("current_exe")?;
    let path = CString::new(exe.as_os_str().as_encoded_bytes()).ctx("path")?;
    let args = [path.clone(), c"__probe".into(), c"main-ran".into()];
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != "MULTIPROC_CHILD")
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("MULTIPROC_CHILD={marker}")).ctx("env")?);
    let mut actions = nix::spawn::PosixSpawnFileActions::init().ctx("file actions")?;
    if let Some(fd) = fd3 {
        actions.add_dup2(fd.as_raw_fd(), 3).ctx("dup2")?;
    } else {
        actions.add_close(3).ctx("close")?;
    }
    let attr = nix::spawn::PosixSpawnAttr::init().ctx("attr")?;
    nix::spawn::posix_spawn(path.as_c_str(), &actions, &attr, &args, &env).ctx("posix_spawn")
}

/// Waits (bounded, 10 s) for `pid` to end; kills it (by pid) and reaps it
/// if it does not.
fn wait_bounded(pid: Pid) -> Option<WaitStatus> {
    let mut status = None;
    util::eventually(Duration::from_secs(10), || {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => false,
            Ok(s) => {
                status = Some(s);
                true
            }
            Err(_) => true,
        }
    });
    if status.is_none() {
        util::sigkill(pid.as_raw() as u32);
        let _ = waitpid(pid, None);
    }
    status
}

/// A program that inherited a `MULTIPROC_CHILD` it was not meant to have
/// (malformed, naming a descriptor that is closed, not a socket, or a
/// socket whose peer is not the process named) runs its own `main`
/// (`__probe main-ran`: exit code 3), promptly, whatever the value.
fn stray_marker(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    ctx.guarded(LIMIT, "stray MULTIPROC_CHILD", move |ctx| {
        let mut rng = Rng::new(seed);
        let me = std::process::id();
        let (_r, w) = nix::unistd::pipe().ctx("pipe")?;
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .ctx("socketpair")?;
        let random: String = rng
            .bytes(24)
            .iter()
            .map(|&b| char::from(b' ' + b % 95))
            .collect();
        let cases: Vec<(String, Option<std::os::fd::BorrowedFd<'_>>, &str)> = vec![
            (String::new(), None, "empty"),
            ("garbage".into(), None, "not numbers"),
            (random, None, "random characters"),
            (format!("3:{me}:0"), None, "descriptor 3 closed"),
            (format!("3:{me}:0"), Some(w.as_fd()), "descriptor 3 a pipe"),
            (
                "3:1:0".into(),
                Some(theirs.as_fd()),
                "a socket whose peer is not pid 1",
            ),
            (format!("3:{me}"), Some(theirs.as_fd()), "a field missing"),
            (
                format!("3:{me}:2"),
                Some(theirs.as_fd()),
                "a death-signal flag of 2",
            ),
            (format!("99999:{me}:0"), None, "descriptor 99999"),
            (format!("3:{me}:0:extra"), None, "a field too many"),
            (
                "3:99999999999999999999999:0".into(),
                None,
                "a pid that overflows",
            ),
            (format!("-1:{me}:0"), None, "a negative descriptor"),
        ];
        for (marker, fd3, what) in cases {
            let t0 = Instant::now();
            let pid = spawn_marked(&marker, fd3)?;
            match wait_bounded(pid) {
                Some(WaitStatus::Exited(_, 3)) => {}
                None => {
                    ctx.hang = Some(format!(
                        "a program with a stray marker ({what}: {marker:?}) still ran 10 s later"
                    ));
                    return Err(format!("stray marker, {what}: the program never ended"));
                }
                Some(other) => ctx.fail(format!(
                    "stray marker, {what} ({marker:?}): {other:?}, not main's exit code 3"
                )),
            }
            ctx.check(t0.elapsed() < Duration::from_secs(5), || {
                format!("stray marker, {what}: main ran after {:?}", t0.elapsed())
            });
        }
        drop(mine);
        Ok(())
    })
}

/// Starts this executable as a would-be multiproc child, the way the
/// runtime does (socket at descriptor 3, `MULTIPROC_CHILD=3:ppid:0`), and
/// writes hostile bytes as its start message. The child must refuse and
/// exit within bounded time: not crash, not hang, not run `main`.
fn parent_garbage(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    let close_after = ctx.rng.chance(2);
    ctx.guarded(LIMIT, "garbage on a child's start socket", move |ctx| {
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .ctx("socketpair")?;
        let exe = std::env::current_exe().ctx("current_exe")?;
        let path = CString::new(exe.as_os_str().as_encoded_bytes()).ctx("path")?;
        let args = [path.clone(), c"__probe".into(), c"main-ran".into()];
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != "MULTIPROC_CHILD")
            .filter_map(|(k, v)| {
                let mut kv = k.into_encoded_bytes();
                kv.push(b'=');
                kv.extend(v.into_encoded_bytes());
                CString::new(kv).ok()
            })
            .collect();
        env.push(CString::new(format!("MULTIPROC_CHILD=3:{}:0", std::process::id())).ctx("env")?);
        let mut actions = nix::spawn::PosixSpawnFileActions::init().ctx("file actions")?;
        actions.add_dup2(theirs.as_raw_fd(), 3).ctx("dup2")?;
        let attr = nix::spawn::PosixSpawnAttr::init().ctx("attr")?;
        let pid = nix::spawn::posix_spawn(path.as_c_str(), &actions, &attr, &args, &env)
            .ctx("posix_spawn")?;
        drop(theirs);
        let mut rng = Rng::new(seed);
        let bytes = super::pipe::hostile_bytes(&mut rng);
        let _ = nix::sys::socket::send(mine.as_raw_fd(), &bytes, MsgFlags::MSG_DONTWAIT);
        if close_after {
            drop(mine);
        } else {
            // Keep it open a while: a child waiting for the rest of a frame
            // must still end once the socket closes.
            std::thread::sleep(Duration::from_millis(50));
            drop(mine);
        }
        let mut status = None;
        util::eventually(Duration::from_secs(10), || {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => false,
                Ok(s) => {
                    status = Some(s);
                    true
                }
                Err(_) => true,
            }
        });
        match status {
            None => {
                util::sigkill(pid.as_raw() as u32);
                let _ = waitpid(Pid::from_raw(pid.as_raw()), None);
                ctx.hang = Some(
                    "a child given a garbage start message was still running 10 s later".into(),
                );
                Err("the child never ended".into())
            }
            Some(WaitStatus::Exited(_, 1 | 2)) => Ok(()),
            Some(WaitStatus::Exited(_, 3)) => {
                Err("the child ran main: the marker was not taken as a child's".into())
            }
            Some(other) => Err(format!(
                "a child given a garbage start message ended with {other:?}"
            )),
        }
    })
}

/// A peer holding the queue that writes garbage datagrams to its side
/// sockets: random bytes, and headers forged for the positions about to
/// be used (read from the ring's header through its memfd), some with a
/// memfd attached that claims to hold a terabyte.
#[process_fn]
fn hostile_queue_peer(q: Queue<Msg>, seed: u64, stop: Event) {
    let mut rng = Rng::new(seed);
    // This process's own descriptors: 0-2, its socket to the parent (3),
    // and the queue's memfd and two datagram sockets.
    let socks: Vec<i32> = util::fds_of_kind("socket:")
        .into_iter()
        .filter(|&fd| fd != 3)
        .collect();
    let mem: Option<std::fs::File> = util::fds_of_kind("/memfd:")
        .first()
        .and_then(|fd| std::fs::File::open(format!("/proc/self/fd/{fd}")).ok());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stop.is_set() && Instant::now() < deadline {
        // The ring's tail (byte 128 of the header): forge datagrams for
        // the positions about to be used.
        let mut tail = [0u8; 8];
        let t = mem
            .as_ref()
            .and_then(|m| m.read_exact_at(&mut tail, 128).ok())
            .map(|_| u64::from_le_bytes(tail));
        let mut dgram = match rng.below(3) {
            0 => {
                let n = rng.range(0, 64) as usize;
                rng.bytes(n)
            }
            1 => {
                let n = rng.range(24, 2048) as usize;
                rng.bytes(n)
            }
            _ => {
                let mut h = Vec::new();
                h.extend_from_slice(&(t.unwrap_or(0) + rng.range(0, 4)).to_le_bytes());
                h.extend_from_slice(&rng.next_u64().to_le_bytes());
                h.extend_from_slice(&(rng.below(2) as u32).to_le_bytes());
                h.extend_from_slice(&[0u8; 4]);
                h
            }
        };
        if dgram.is_empty() {
            dgram.push(0);
        }
        let with_fd = dgram.len() == 24 && rng.chance(3);
        if with_fd {
            dgram[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
            dgram[16] = 1;
        }
        let fake =
            nix::sys::memfd::memfd_create(c"chaos-forged", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .ok();
        for &s in &socks {
            match (&fake, with_fd) {
                (Some(m), true) => {
                    let raw = [m.as_raw_fd()];
                    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
                    let iov = [std::io::IoSlice::new(&dgram)];
                    let _ = nix::sys::socket::sendmsg::<()>(
                        s,
                        &iov,
                        &cmsg,
                        MsgFlags::MSG_DONTWAIT,
                        None,
                    );
                }
                _ => {
                    let _ = nix::sys::socket::send(s, &dgram, MsgFlags::MSG_DONTWAIT);
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    drop(q);
}

/// Puts side-channel-sized messages (5 KiB and 40 KiB), counting returned puts.
#[process_fn]
fn side_producer(q: Queue<Msg>, done: Value<u64>, count: u64) {
    for seq in 0..count {
        let len = if seq % 2 == 0 { 5000 } else { 40_000 };
        if q.put_timeout(Msg::new(3, seq, len), Duration::from_secs(10))
            .is_err()
        {
            return;
        }
        done.store(seq + 1);
    }
}

fn queue_side_garbage(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    ctx.guarded(
        LIMIT,
        "garbage datagrams on a queue's side socket",
        move |ctx| {
            let q = Queue::<Msg>::bounded(16).ctx("Queue::bounded")?;
            let stop = Event::new().ctx("Event")?;
            let done = Value::new(0u64).ctx("Value")?;
            let count = 300u64;
            let mut hostile = start(Process::new(
                hostile_queue_peer,
                (q.clone(), seed, stop.clone()),
            ))?;
            let mut producer = start(Process::new(
                side_producer,
                (q.clone(), done.clone(), count),
            ))?;
            // A peer holding the queue may make a consumer lose or reject
            // messages (it can take their places): what is checked is that
            // every get returns, that none panics or aborts this process, and
            // that the queue works afterwards.
            let deadline = Instant::now() + Duration::from_secs(20);
            let (mut got, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let r = q.get_timeout(Duration::from_millis(500));
                let took = t0.elapsed();
                ctx.check(took < Duration::from_secs(5), || {
                    format!("a get with a 500 ms timeout took {took:?}")
                });
                match r {
                    Ok(_) => got += 1,
                    Err(GetTimeoutError::Timeout) if !producer.is_alive() => break,
                    Err(GetTimeoutError::Timeout) => {}
                    Err(_) => errors += 1,
                }
            }
            stop.set();
            reap(&mut hostile)?;
            reap(&mut producer)?;
            if got + errors == 0 {
                return Err(format!("nothing arrived of {} messages put", done.load()));
            }
            // The queue still works for well-behaved peers: a large message
            // (side channel) and a small one, each call bounded.
            let q2 = q.clone();
            let put = ctx.within(
                Duration::from_secs(10),
                "put_timeout(5 s) of a 9000-byte message after the garbage",
                move || {
                    q2.put_timeout(Msg::new(4, 0, 9000), Duration::from_secs(5))
                        .map_err(|e| e.to_string())
                },
            )?;
            put.map_err(|e| format!("put after the garbage: {e}"))?;
            match q.get_timeout(Duration::from_secs(5)) {
                Ok(m) if m.id == 4 && m.whole() => Ok(()),
                Ok(m) => Err(format!("after the garbage: got id {} seq {}", m.id, m.seq)),
                Err(e) => Err(format!("get after the garbage: {e}")),
            }
        },
    )
}
