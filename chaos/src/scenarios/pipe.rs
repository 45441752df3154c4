//! Pipe/Connection under faults: a peer killed in the middle of a 50 MiB
//! message, two processes sending large messages on one end (one of them
//! killed mid-message, or not), hostile bytes written to the pipe and to
//! the side socket.
//!
//! A receiver must get whole messages or an error, by its deadline: never
//! a partial message, never a hang, never a panic.
use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use multiproc::connection::{Connection, Sender};
use multiproc::{Error, Pipe, Process, Value, process_fn};

use super::{Scenario, reap, start};
use crate::ctx::{Context, Ctx, Res};
use crate::util::{self, Rng};

const LIMIT: Duration = Duration::from_secs(30);

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "pipe/peer-killed-mid-send-50MiB",
            run: peer_killed_mid_send,
        },
        Scenario {
            name: "pipe/two-senders-large-messages-one-end",
            run: two_senders,
        },
        Scenario {
            name: "pipe/co-writer-killed-mid-frame",
            run: co_writer_killed,
        },
        Scenario {
            name: "pipe/hostile-bytes-on-pipe",
            run: hostile::<false>,
        },
        Scenario {
            name: "pipe/hostile-bytes-on-side-socket",
            run: hostile::<true>,
        },
    ]
}

/// Message `seq` of sender `id` as raw bytes: `[id][seq: 4][body]`.
pub fn raw_message(id: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut m = util::body(u64::from(id), u64::from(seq), len.max(5));
    m[0] = id;
    m[1..5].copy_from_slice(&seq.to_le_bytes());
    m
}

fn raw_whole(m: &[u8]) -> Option<(u8, u32)> {
    if m.len() < 5 {
        return None;
    }
    let id = m[0];
    let seq = u32::from_le_bytes([m[1], m[2], m[3], m[4]]);
    (raw_message(id, seq, m.len()) == m).then_some((id, seq))
}

const BIG: usize = 50 << 20;

#[process_fn]
fn send_big(end: Connection<()>, count: u32) {
    for seq in 0..count {
        if end.send_bytes(&raw_message(7, seq, BIG)).is_err() {
            return;
        }
    }
}

fn peer_killed_mid_send(ctx: &mut Ctx) -> Res {
    let after = ctx.rng.millis(0, 250);
    ctx.guarded(LIMIT, "peer killed mid-send", move |ctx| {
        let (mut mine, theirs) = Pipe::new::<()>().ctx("Pipe::new")?;
        let mut p = start(Process::new(send_big, (theirs, 3u32)))?;
        if !mine.poll(LIMIT).ctx("poll")? {
            return Err("the sender never began".into());
        }
        std::thread::sleep(after);
        p.kill().ctx("kill")?;
        reap(&mut p)?;
        let mut whole = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if Instant::now() > deadline {
                ctx.hang = Some("no end of stream 10 s after the sender died".into());
                return Err("the receiver never learnt that the sender died".into());
            }
            match mine
                .recv_bytes_timeout(Duration::from_secs(1))
                .map_err(Error::from)
            {
                Ok(m) => match raw_whole(&m) {
                    Some((7, seq)) if seq == whole && m.len() == BIG => whole += 1,
                    _ => ctx.tear(1, || {
                        format!("a message of {} bytes that no one sent", m.len())
                    }),
                },
                Err(Error::Disconnected) => break,
                Err(Error::Timeout) => {}
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::InvalidData => {}
                Err(e) => return Err(format!("receive after the sender died: {e}")),
            }
        }
        Ok(())
    })
}

#[process_fn]
/// Sends messages `0..count` of `sizes` bytes on the end it receives
/// through `carrier`, until one fails; `sent` holds how many sends
/// returned `Ok`.
fn blast(
    mut carrier: Connection<Connection<()>>,
    id: u8,
    count: u32,
    sizes: (u64, u64),
    seed: u64,
    sent: Value<u64>,
) {
    let Ok(end) = carrier.recv_timeout(LIMIT) else {
        return;
    };
    let mut rng = Rng::new(seed);
    for seq in 0..count {
        let len = rng.range(sizes.0, sizes.1) as usize;
        if end.send_bytes(&raw_message(id, seq, len)).is_err() {
            return;
        }
        sent.store(u64::from(seq) + 1);
    }
}

fn two_senders(ctx: &mut Ctx) -> Res {
    let seeds = [ctx.rng.next_u64(), ctx.rng.next_u64()];
    ctx.guarded(LIMIT, "two senders on one end", move |ctx| {
        let per = 60u32;
        let (mut mine, theirs) = Pipe::new::<()>().ctx("Pipe::new")?;
        let mut senders = Vec::new();
        for id in [1u8, 2] {
            let (carrier, carrier_theirs) = Pipe::new::<Connection<()>>().ctx("carrier")?;
            senders.push(start(Process::new(
                blast,
                (
                    carrier_theirs,
                    id,
                    per,
                    (64 << 10, 1 << 20),
                    seeds[usize::from(id - 1)],
                    Value::new(0u64).ctx("Value")?,
                ),
            ))?);
            carrier.send(&theirs).ctx("hand over a copy of the end")?;
        }
        drop(theirs);
        let mut next = [0u32; 2];
        for _ in 0..2 * per {
            let m = mine
                .recv_bytes_timeout(Duration::from_secs(10))
                .ctx("recv")?;
            match raw_whole(&m) {
                Some((id @ (1 | 2), seq)) => {
                    let slot = &mut next[usize::from(id - 1)];
                    if seq < *slot {
                        ctx.duplicate(1, || format!("sender {id} message {seq}"));
                    } else {
                        ctx.lose(u64::from(seq - *slot), || {
                            format!("sender {id}: {}..{seq} skipped", *slot)
                        });
                        *slot = seq + 1;
                    }
                }
                _ => ctx.tear(1, || {
                    format!("a message of {} bytes that is no sender's", m.len())
                }),
            }
        }
        for p in &mut senders {
            let s = reap(p)?;
            if !s.success() {
                ctx.fail(format!("a sender ended with {s:?}"));
            }
        }
        match mine
            .recv_bytes_timeout(Duration::from_secs(5))
            .map_err(Error::from)
        {
            Err(Error::Disconnected) => Ok(()),
            other => Err(format!(
                "after both senders ended: {:?}",
                other.map(|m| m.len())
            )),
        }
    })
}

/// Two processes send messages of 256 KiB to 4 MiB on one end; one is
/// SIGKILLed at a random moment, often in the middle of a message. The
/// documented outcome (`runtime/src/connection.rs`, "Several senders on
/// one end"): every message received is whole and in its sender's order;
/// if the victim died holding the end's send lock (in the middle of a
/// message, or just after its last byte), the end is unusable: the
/// survivor's next send fails; a cut message gives the receiver
/// `InvalidData` once, or, when every sender is gone by the time it
/// reaches the cut, the end of the stream (`Disconnected`: a frame cut by
/// its sender's death is dropped, `runtime/src/wire.rs`). Every send of
/// the survivor that returned `Ok` arrives. Every `recv_timeout(1 s)`
/// returns by its deadline.
fn co_writer_killed(ctx: &mut Ctx) -> Res {
    let seeds = [ctx.rng.next_u64(), ctx.rng.next_u64()];
    let victim = ctx.rng.below(2);
    let after = ctx.rng.millis(0, 100);
    ctx.guarded(LIMIT, "a co-writer killed mid-frame", move |ctx| {
        let per = 40u32;
        let (mut mine, theirs) = Pipe::new::<()>().ctx("Pipe::new")?;
        let mut senders = Vec::new();
        let sent = [Value::new(0u64).ctx("Value")?, Value::new(0u64).ctx("Value")?];
        for id in [1u8, 2] {
            let (carrier, carrier_theirs) = Pipe::new::<Connection<()>>().ctx("carrier")?;
            senders.push(start(Process::new(
                blast,
                (
                    carrier_theirs,
                    id,
                    per,
                    (256 << 10, 4 << 20),
                    seeds[usize::from(id - 1)],
                    sent[usize::from(id - 1)].clone(),
                ),
            ))?);
            carrier.send(&theirs).ctx("hand over a copy of the end")?;
        }
        drop(theirs);
        if !mine.poll(LIMIT).ctx("poll")? {
            return Err("the senders never began".into());
        }
        // Killed while the receiver drains the end (by pid: the child is
        // not reaped before the killer is joined).
        let victim_pid = senders[victim].pid().ctx("pid")?;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(after);
            util::sigkill(victim_pid);
        });
        let mut next = [0u32; 2];
        let mut broken = false;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if Instant::now() > deadline {
                ctx.hang = Some("no end of stream 20 s after the kill".into());
                return Err("the receiver never saw the end of the stream".into());
            }
            let t0 = Instant::now();
            let r = mine
                .recv_bytes_timeout(Duration::from_secs(1))
                .map_err(Error::from);
            if t0.elapsed() > Duration::from_secs(3) {
                ctx.hang = Some(format!("recv_timeout(1 s) took {:?}", t0.elapsed()));
            }
            match r {
                Ok(m) => match raw_whole(&m) {
                    Some((id @ (1 | 2), seq)) if !broken => {
                        let slot = &mut next[usize::from(id - 1)];
                        if seq < *slot {
                            ctx.duplicate(1, || format!("sender {id} message {seq}"));
                        } else {
                            ctx.lose(u64::from(seq - *slot), || {
                                format!("sender {id}: {}..{seq} skipped", *slot)
                            });
                            *slot = seq + 1;
                        }
                    }
                    Some((id, seq)) => ctx.fail(format!(
                        "message {seq} of sender {id} received after InvalidData"
                    )),
                    None => ctx.tear(1, || {
                        format!("a message of {} bytes that is no sender's", m.len())
                    }),
                },
                Err(Error::Timeout) => {}
                Err(Error::Disconnected) => break,
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::InvalidData && !broken =>
                {
                    broken = true;
                }
                Err(e) => return Err(format!("receive after the kill: {e}")),
            }
        }
        let _ = killer.join();
        let survivor = 1 - victim;
        for (i, p) in senders.iter_mut().enumerate() {
            let s = reap(p)?;
            if i == survivor && !s.success() {
                ctx.fail(format!("the surviving sender ended with {s:?}"));
            }
        }
        // Every send of the survivor that returned Ok came before the cut
        // (after it, sends fail: the end is unusable), so it arrived.
        let returned = sent[survivor].load();
        let got = u64::from(next[survivor]);
        if got < returned {
            ctx.lose(returned - got, || {
                format!(
                    "the survivor's messages {got}..{returned} returned Ok but never came (InvalidData seen: {broken})"
                )
            });
        }
        Ok(())
    })
}

/// The descriptor numbers of an end, from its `Debug` form (`(rx, tx,
/// side)` as the connection lists them, absent ones left out): a public
/// view of private fields. The side socket is the last.
pub fn end_fds(end: &impl std::fmt::Debug) -> Vec<i32> {
    let text = format!("{end:?}");
    text.split("fd: ")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

pub fn pipe_header(len: u64, tag: u32, flags: u32) -> Vec<u8> {
    let mut h = len.to_le_bytes().to_vec();
    h.extend_from_slice(&tag.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h
}

/// Hostile bytes for a receiver: random bytes, impossible or huge
/// headers, markers without their side frame, truncated frames.
pub fn hostile_bytes(rng: &mut Rng) -> Vec<u8> {
    let n = rng.range(1, 64 << 10) as usize;
    match rng.below(6) {
        0 => rng.bytes(n),
        1 => pipe_header(1 << 63, 1, 0),
        2 => pipe_header(
            rng.next_u64(),
            rng.range(0, 4) as u32,
            rng.range(0, 4) as u32,
        ),
        3 => {
            let mut h = pipe_header(100, 1, 0);
            let k = rng.below(100);
            h.extend(rng.bytes(k));
            h
        }
        4 => {
            let mut h = pipe_header(rng.range(0, 4080), 2, 0);
            h.extend(rng.bytes(n));
            h
        }
        _ => pipe_header(rng.range(4096, 1 << 40), 2, 1),
    }
}

/// Writes hostile bytes to this end's pipe (or side socket, with a
/// marker on the pipe first half the time), as much as fits without
/// waiting, then keeps the end open until told, then closes it.
#[process_fn]
fn write_hostile(end: Sender<Vec<u8>>, mut control: Connection<u8>, side: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    let Some(&side_fd) = end_fds(&end).last() else {
        return;
    };
    let Ok(mut pipe) = end.as_fd().try_clone_to_owned().map(std::fs::File::from) else {
        return;
    };
    // Writes only what the pipe takes: a receiver that stops reading (a
    // corrupt end) must not leave this writer blocked, nor one that reads
    // only after the control message below.
    let _ = nix::fcntl::fcntl(
        pipe.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    for _ in 0..rng.range(1, 4) {
        let bytes = hostile_bytes(&mut rng);
        if side {
            if rng.chance(2) {
                let _ = pipe.write_all(&pipe_header(rng.range(4081, 1 << 20), 2, 1));
            }
            let _ =
                nix::sys::socket::send(side_fd, &bytes, nix::sys::socket::MsgFlags::MSG_DONTWAIT);
        } else {
            let _ = pipe.write_all(&bytes);
        }
    }
    let _ = control.send(&1);
    let _ = control.recv_timeout(LIMIT);
}

fn hostile<const SIDE: bool>(ctx: &mut Ctx) -> Res {
    let seed = ctx.rng.next_u64();
    ctx.guarded(LIMIT, "hostile bytes to a receiver", move |ctx| {
        let (mut mine, theirs) = Pipe::simplex::<Vec<u8>>().ctx("Pipe::simplex")?;
        let (mut control, control_theirs) = Pipe::new::<u8>().ctx("control")?;
        let mut p = start(Process::new(
            write_hostile,
            (theirs, control_theirs, SIDE, seed),
        ))?;
        control.recv_timeout(LIMIT).ctx("the peer wrote")?;
        // With the peer alive: every timed receive returns by its deadline.
        let mut corrupt = false;
        for _ in 0..4 {
            let t = Duration::from_millis(100);
            let t0 = Instant::now();
            let r = mine.recv_timeout(t).map_err(Error::from);
            let took = t0.elapsed();
            if took > t + Duration::from_millis(500) {
                ctx.fail(format!("a receive with a 100 ms timeout took {took:?}"));
            }
            match r {
                Ok(_)
                | Err(Error::Timeout)
                | Err(Error::MessageTooLarge { .. })
                | Err(Error::Decode { .. }) => {}
                Err(Error::Io { .. }) => corrupt = true,
                Err(Error::Disconnected) if corrupt => {}
                Err(e) => ctx.fail(format!("receive from a hostile peer: {e}")),
            }
        }
        control.send(&0).ctx("release the peer")?;
        reap(&mut p)?;
        // Once the peer is gone: the end of the stream within bounded time.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if Instant::now() > deadline {
                ctx.hang = Some("no end of stream 5 s after the hostile peer ended".into());
                return Err("the receiver never saw the end of the stream".into());
            }
            match mine
                .recv_timeout(Duration::from_millis(200))
                .map_err(Error::from)
            {
                Err(Error::Disconnected) => break,
                Ok(_)
                | Err(Error::Timeout)
                | Err(Error::MessageTooLarge { .. })
                | Err(Error::Decode { .. })
                | Err(Error::Io { .. }) => {}
                Err(e) => return Err(format!("receive after the hostile peer ended: {e}")),
            }
        }
        // A fresh pipe works as ever.
        let (a, mut b) = Pipe::new::<u64>().ctx("Pipe::new")?;
        a.send(&42).ctx("send")?;
        if b.recv_timeout(LIMIT).ctx("recv")? != 42 {
            return Err("a fresh pipe gave the wrong value".into());
        }
        Ok(())
    })
}
