//! EINTR storms: signals at a high rate to processes doing queue, pipe and
//! pool work.
//!
//! A signal interrupts a blocking system call only if a handler is
//! installed (a signal whose action is "ignore" or "default ignore" is
//! discarded without waking anyone). Installing a handler is `unsafe` in
//! nix (`sigaction`) and this crate has no `unsafe`; `signal-hook`'s
//! `flag::register` installs one behind a safe function, so that is what
//! the storms use: SIGUSR1, SIGUSR2, SIGCHLD, SIGURG and SIGWINCH, each
//! setting a flag. Its handlers are installed with `SA_RESTART`, so
//! `read`/`write`/`recvmsg` on sockets and pipes and `FUTEX_WAIT` are
//! restarted by the kernel, while `poll`, `ppoll`, `nanosleep`,
//! `clock_nanosleep`, `epoll_wait` and timed socket calls fail with EINTR
//! every time a signal lands (signal(7)). The `stop-cont` storm needs no
//! handler: SIGSTOP/SIGCONT pairs make some of those calls fail with
//! EINTR too, and freeze the process at random points.
//!
//! Signals go to the thread doing the work (`pthread_kill`) in this
//! process, and to the other processes once they have installed their
//! handlers (process-directed: any of their threads).
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::pthread::{Pthread, pthread_kill, pthread_self};
use nix::sys::signal::Signal;

use multiproc::connection::Connection;
use multiproc::sync::Event;
use multiproc::{Pipe, Pool, Process, Queue, Value, process_fn};

use super::{Scenario, reap, start};
use crate::ctx::{Context, Ctx, Res};
use crate::util::{self, Msg};

const LIMIT: Duration = Duration::from_secs(30);
const STORM: [Signal; 5] = [
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
    Signal::SIGURG,
    Signal::SIGWINCH,
];

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "eintr/queue-under-signal-storm",
            run: queue_storm::<false>,
        },
        Scenario {
            name: "eintr/pipe-under-signal-storm",
            run: pipe_storm::<false>,
        },
        Scenario {
            name: "eintr/pool-under-signal-storm",
            run: pool_storm,
        },
        Scenario {
            name: "eintr/queue-under-stop-cont-storm",
            run: queue_storm::<true>,
        },
        Scenario {
            name: "eintr/pipe-under-stop-cont-storm",
            run: pipe_storm::<true>,
        },
    ]
}

/// Installs no-op (flag-setting) handlers for the storm's signals.
fn arm() -> std::io::Result<()> {
    let flag = Arc::new(AtomicBool::new(false));
    for s in STORM {
        signal_hook::flag::register(s as i32, Arc::clone(&flag))?;
    }
    Ok(())
}

#[process_fn]
fn arm_worker() {
    arm().expect("install the storm's handlers");
}

/// A storm: until `stop`, signals to `thread` (in this process) and to
/// `pids` (which have handlers), or, for `stop_cont`, SIGSTOP then SIGCONT
/// to `pids`. Returns how many signals it sent.
struct Storm {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Storm {
    fn start(thread: Option<Pthread>, pids: Vec<u32>, stop_cont: bool, seed: u64) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (st, se) = (Arc::clone(&stop), Arc::clone(&sent));
        let handle = std::thread::spawn(move || {
            let mut rng = util::Rng::new(seed);
            while !st.load(Ordering::Relaxed) {
                if stop_cont {
                    for &p in &pids {
                        util::signal(p, Signal::SIGSTOP);
                    }
                    std::thread::sleep(Duration::from_micros(rng.range(50, 1500)));
                    for &p in &pids {
                        util::signal(p, Signal::SIGCONT);
                    }
                    std::thread::sleep(Duration::from_micros(rng.range(50, 3000)));
                    se.fetch_add(2 * pids.len() as u64, Ordering::Relaxed);
                    continue;
                }
                let s = STORM[rng.below(STORM.len())];
                if let Some(t) = thread {
                    let _ = pthread_kill(t, s);
                    se.fetch_add(1, Ordering::Relaxed);
                }
                for &p in &pids {
                    util::signal(p, s);
                    se.fetch_add(1, Ordering::Relaxed);
                }
                // A few microseconds between signals: a storm, not a
                // starvation of the targets.
                let until = std::time::Instant::now() + Duration::from_micros(rng.range(2, 30));
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            for &p in &pids {
                util::signal(p, Signal::SIGCONT);
            }
        });
        Storm {
            stop,
            sent,
            handle: Some(handle),
        }
    }

    fn end(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        // Joined before the target thread can end: `pthread_kill` to a
        // thread that is gone is undefined.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

const SIZES: [usize; 5] = [1, 300, 2000, 20_000, 300_000];

/// Puts `count` messages of varying sizes (inline, side datagram, side
/// memfd), after arming handlers (unless `plain`) and saying so.
#[process_fn]
fn storm_producer(q: Queue<Msg>, armed: Event, done: Value<u64>, count: u64, plain: bool) {
    if !plain {
        arm().expect("install the storm's handlers");
    }
    armed.set();
    for seq in 0..count {
        let m = Msg::new(1, seq, SIZES[seq as usize % SIZES.len()]);
        if q.put_timeout(m, LIMIT).is_err() {
            return;
        }
        done.store(seq + 1);
    }
}

fn queue_storm<const STOP_CONT: bool>(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    ctx.guarded(LIMIT, "queue under a signal storm", move |ctx| {
        if !STOP_CONT {
            arm().ctx("install handlers")?;
        }
        let count = 1500u64;
        let q = Queue::<Msg>::bounded(32).ctx("Queue::bounded")?;
        let armed = Event::new().ctx("Event")?;
        let done = Value::new(0u64).ctx("Value")?;
        let mut p = start(Process::new(
            storm_producer,
            (q.clone(), armed.clone(), done.clone(), count, STOP_CONT),
        ))?;
        if !armed.wait_timeout(LIMIT) {
            return Err("the producer never armed".into());
        }
        let me = (!STOP_CONT).then(pthread_self);
        let storm = Storm::start(me, p.pid().into_iter().collect(), STOP_CONT, seed);
        let mut next = 0u64;
        while next < count {
            match q.get_timeout(Duration::from_secs(10)) {
                Ok(m) if m.id == 1 && m.whole() => {
                    if m.seq != next {
                        if m.seq < next {
                            ctx.duplicate(1, || format!("message {}", m.seq));
                            continue;
                        }
                        ctx.lose(m.seq - next, || {
                            format!("messages {next}..{} skipped", m.seq)
                        });
                    }
                    next = m.seq + 1;
                }
                Ok(m) => ctx.tear(1, || format!("message {} of {}", m.seq, m.id)),
                Err(e) => {
                    let sent = storm.end();
                    return Err(format!("get {next} under the storm ({sent} signals): {e}"));
                }
            }
        }
        let sent = storm.end();
        ctx.check(sent > 0, || "the storm sent nothing".into());
        let s = reap(&mut p)?;
        ctx.check(s.success(), || format!("the producer ended with {s:?}"));
        Ok(())
    })
}

/// Echoes every message back until the pipe closes.
#[process_fn]
fn echo(mut end: Connection<Msg>, armed: Event, plain: bool) {
    if !plain {
        arm().expect("install the storm's handlers");
    }
    armed.set();
    while let Ok(m) = end.recv() {
        if end.send(&m).is_err() {
            return;
        }
    }
}

fn pipe_storm<const STOP_CONT: bool>(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    ctx.guarded(LIMIT, "pipe under a signal storm", move |ctx| {
        if !STOP_CONT {
            arm().ctx("install handlers")?;
        }
        let (mut mine, theirs) = Pipe::new::<Msg>().ctx("Pipe::new")?;
        let armed = Event::new().ctx("Event")?;
        let mut p = start(Process::new(echo, (theirs, armed.clone(), STOP_CONT)))?;
        if !armed.wait_timeout(LIMIT) {
            return Err("the echo never armed".into());
        }
        let me = (!STOP_CONT).then(pthread_self);
        let storm = Storm::start(me, p.pid().into_iter().collect(), STOP_CONT, seed);
        let rounds = 600u64;
        for seq in 0..rounds {
            let m = Msg::new(2, seq, SIZES[seq as usize % SIZES.len()]);
            if let Err(e) = mine.send(&m) {
                let sent = storm.end();
                return Err(format!("send {seq} under the storm ({sent} signals): {e}"));
            }
            match mine.recv_timeout(Duration::from_secs(10)) {
                Ok(back) if back.id == 2 && back.seq == seq && back.whole() => {}
                Ok(back) => ctx.tear(1, || {
                    format!("sent {seq}, got back {} of {}", back.seq, back.id)
                }),
                Err(e) => {
                    let sent = storm.end();
                    return Err(format!(
                        "receive {seq} under the storm ({sent} signals): {e}"
                    ));
                }
            }
        }
        let sent = storm.end();
        ctx.check(sent > 0, || "the storm sent nothing".into());
        drop(mine);
        let s = reap(&mut p)?;
        ctx.check(s.success(), || format!("the echo ended with {s:?}"));
        Ok(())
    })
}

#[process_fn]
fn cube_slowly(x: u64) -> u64 {
    std::thread::sleep(Duration::from_micros(x % 200));
    x.wrapping_mul(x).wrapping_mul(x)
}

fn pool_storm(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    ctx.guarded(LIMIT, "pool under a signal storm", move |ctx| {
        arm().ctx("install handlers")?;
        let pool = Pool::builder()
            .processes(2)
            .initializer(arm_worker, ())
            .build()
            .ctx("Pool::build")?;
        let storm = Storm::start(Some(pthread_self()), pool.worker_pids(), false, seed);
        let n = 3000u64;
        let want: Vec<u64> = (0..n).map(|x| x.wrapping_mul(x).wrapping_mul(x)).collect();
        let got = pool.map_chunked(cube_slowly, 0..n, 7);
        let imap: Result<Vec<u64>, _> = match pool.imap(cube_slowly, 0..300u64) {
            Ok(it) => it.collect(),
            Err(e) => Err(e),
        };
        let mut asyncs = Vec::new();
        for x in 0..50u64 {
            asyncs.push(pool.apply_async(cube_slowly, (x,)));
        }
        let applied: Vec<_> = asyncs
            .into_iter()
            .map(|a| a.and_then(|mut a| a.get_timeout(LIMIT)))
            .collect();
        let sent = storm.end();
        match got {
            Ok(v) if v == want => {}
            Ok(v) => {
                let bad = v.iter().zip(&want).filter(|(a, b)| a != b).count();
                ctx.tear(bad as u64, || "map results under the storm".into());
            }
            Err(e) => return Err(format!("map under the storm ({sent} signals): {e}")),
        }
        match imap {
            Ok(v) if v[..] == want[..300] => {}
            Ok(_) => ctx.tear(1, || "imap results under the storm".into()),
            Err(e) => return Err(format!("imap under the storm: {e}")),
        }
        for (x, r) in applied.into_iter().enumerate() {
            match r {
                Ok(v) if v == want[x] => {}
                Ok(_) => ctx.tear(1, || format!("apply_async {x}")),
                Err(e) => return Err(format!("apply_async {x} under the storm: {e}")),
            }
        }
        Ok(())
    })
}
