//! Pipes under faults, across real processes: several processes sending
//! on one end, a co-writer killed in the middle of a message, a peer that
//! writes half a frame or an impossible header, a receiver short of
//! memory or of descriptors. Every wait is bounded: a receive that hangs
//! fails the test instead of stalling it.
use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use multiproc::connection::{Connection, RecvTimeoutError, Sender};
use multiproc::{Error, Pipe, Process, process_fn, spawn};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(100);

/// Runs `f` on a thread and fails the test if it has not returned within
/// `limit` (a receive that ignores its timeout, a lost message).
fn bounded<R: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => panic!("{what}: did not return within {limit:?}"),
    }
}

/// An `Error::Io` of `kind`, or a receive error that failed with one.
fn is_io<E: Clone + Into<Error>>(err: &E, kind: std::io::ErrorKind) -> bool {
    matches!(err.clone().into(), Error::Io { source, .. } if source.kind() == kind)
}

fn joined_ok(p: &mut Process) {
    let status = p
        .join_timeout(LONG)
        .expect("join")
        .expect("the child ended");
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------
// Two processes sending large messages on one end.

const PER_SENDER: u32 = 500;

/// 64 KiB to 1 MiB, spread over the messages.
fn size(id: u8, seq: u32) -> usize {
    let span = (1 << 20) - (64 << 10);
    (64 << 10) + (seq as usize * 2_654_435_761 + id as usize * 40_503) % span
}

fn fill(id: u8, seq: u32) -> u8 {
    (u32::from(id) * 131 + seq * 7) as u8
}

/// Message `seq` of sender `id`: `[id][seq, 4 bytes][fill...]`.
fn message(id: u8, seq: u32) -> Vec<u8> {
    let mut msg = vec![fill(id, seq); size(id, seq)];
    msg[0] = id;
    msg[1..5].copy_from_slice(&seq.to_le_bytes());
    msg
}

#[process_fn]
fn blast(mut carrier: Connection<Connection<()>>, id: u8, count: u32) {
    let end = carrier.recv_timeout(LONG).expect("the shared end");
    for seq in 0..count {
        end.send_bytes(&message(id, seq)).expect("send");
    }
}

#[test]
fn two_processes_sending_on_one_end_deliver_every_message_whole() {
    let _alone = multiproc_tests::alone();
    let (mine, theirs) = Pipe::new::<()>().expect("pipe");
    let mut senders = Vec::new();
    for id in [1u8, 2] {
        let (carrier, carrier_theirs) = Pipe::new::<Connection<()>>().expect("carrier");
        let mut p = Process::new(blast, (carrier_theirs, id, PER_SENDER));
        p.start().expect("start");
        carrier.send(&theirs).expect("hand over a copy of the end");
        senders.push(p);
    }
    drop(theirs);
    let (mine, next) = bounded(Duration::from_secs(300), "receiving", move || {
        let mut mine = mine;
        let mut next = [0u32; 2];
        for _ in 0..2 * PER_SENDER {
            let msg = mine.recv_bytes_timeout(LONG).expect("recv");
            assert!(msg.len() >= 5, "a message of {} bytes", msg.len());
            let id = msg[0];
            assert!(id == 1 || id == 2, "a message from no sender (id {id})");
            let seq = u32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]);
            let slot = &mut next[usize::from(id - 1)];
            assert_eq!(seq, *slot, "sender {id}'s messages in its order, none lost");
            assert!(
                msg == message(id, seq),
                "message {seq} of sender {id} is whole"
            );
            *slot += 1;
        }
        (mine, next)
    });
    assert_eq!(next, [PER_SENDER; 2]);
    for p in &mut senders {
        joined_ok(p);
    }
    let mut mine = mine;
    let err = mine.recv_bytes_timeout(LONG).expect_err("nothing more");
    assert!(err.is_disconnected(), "{err}");
}

// ---------------------------------------------------------------------
// A co-writer killed in the middle of a message.

#[process_fn]
fn write_huge(mut carrier: Connection<Connection<()>>) {
    let end = carrier.recv_timeout(LONG).expect("the shared end");
    // Far more than the socket holds: killed while blocked in it.
    let _ = end.send_bytes(&vec![1u8; 64 << 20]);
}

#[process_fn]
fn hold_then_send(mut carrier: Connection<Connection<()>>, mut control: Connection<String>) {
    let end = carrier.recv_timeout(LONG).expect("the shared end");
    if control.recv_timeout(LONG).is_err() {
        return;
    }
    let outcome = match end.send_bytes(&vec![2u8; 1 << 20]) {
        Ok(()) => "sent".to_string(),
        Err(e) => e.to_string(),
    };
    let _ = control.send(&outcome);
    // Keeps the end open until told.
    let _ = control.recv_timeout(LONG);
}

#[test]
fn a_co_writer_killed_mid_message_never_blocks_a_timed_receive() {
    let _alone = multiproc_tests::alone();
    let (mine, theirs) = Pipe::new::<()>().expect("pipe");
    let (mut control, control_theirs) = Pipe::new::<String>().expect("control");
    let (carrier_h, carrier_h_theirs) = Pipe::new::<Connection<()>>().expect("carrier");
    let mut holder = Process::new(hold_then_send, (carrier_h_theirs, control_theirs));
    holder.start().expect("start holder");
    carrier_h.send(&theirs).expect("hand over");
    let (carrier_w, carrier_w_theirs) = Pipe::new::<Connection<()>>().expect("carrier");
    let mut writer = Process::new(write_huge, (carrier_w_theirs,));
    writer.start().expect("start writer");
    carrier_w.send(&theirs).expect("hand over");
    drop(theirs);
    // The marker is on the pipe: the writer holds the send lock and is in
    // the middle of its frame (the socket is full). Kill it there.
    assert!(mine.poll(LONG).expect("poll"), "the writer began");
    writer.kill().expect("kill");
    writer.join_timeout(LONG).expect("join").expect("ended");

    // Half a frame, whose writer is dead, while the holder keeps the end
    // open: a timed receive returns by its deadline, every time.
    let mine = bounded(
        Duration::from_secs(20),
        "receive after a co-writer died",
        move || {
            let mut mine = mine;
            for _ in 0..3 {
                let err = mine.recv_bytes_timeout(SHORT).expect_err("half a frame");
                assert!(err.is_timeout(), "{err}");
            }
            mine
        },
    );

    // The next large message finds the end broken: a clear error for the
    // sender, and the receiver is told too instead of waiting forever.
    control.send(&"go".to_string()).expect("go");
    let outcome = control.recv_timeout(LONG).expect("the holder's outcome");
    assert!(outcome.contains("died"), "{outcome}");
    let mine = bounded(
        Duration::from_secs(20),
        "receive on a broken end",
        move || {
            let mut mine = mine;
            let err = mine.recv_bytes_timeout(LONG).expect_err("broken");
            assert!(is_io(&err, std::io::ErrorKind::InvalidData), "{err}");
            let err = mine.recv_bytes_timeout(LONG).expect_err("then");
            assert!(err.is_disconnected(), "{err}");
            mine
        },
    );
    control.send(&"bye".to_string()).expect("bye");
    joined_ok(&mut holder);
    drop(mine);
}

// ---------------------------------------------------------------------
// A peer that writes what no sender writes.

#[process_fn]
fn write_raw(tx: Sender<u8>, bytes: Vec<u8>, mut control: Connection<u8>) {
    let fd = tx.as_fd().try_clone_to_owned().expect("dup");
    std::fs::File::from(fd).write_all(&bytes).expect("write");
    // Keeps the end open until told.
    let _ = control.recv_timeout(LONG);
}

fn pipe_header(len: u64, tag: u32, flags: u32) -> Vec<u8> {
    let mut h = len.to_le_bytes().to_vec();
    h.extend_from_slice(&tag.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h
}

#[test]
fn a_peer_writing_half_a_frame_or_an_impossible_header_never_blocks_a_timed_receive() {
    let _alone = multiproc_tests::alone();
    let mut half = pipe_header(100, 1, 0);
    half.extend_from_slice(&[7u8; 10]);
    let impossible = pipe_header(1 << 63, 1, 0);
    for (bytes, half_frame) in [(half, true), (impossible, false)] {
        let (rx, tx) = Pipe::simplex::<u8>().expect("pipe");
        let (control, control_theirs) = Pipe::new::<u8>().expect("control");
        let mut p = Process::new(write_raw, (tx, bytes, control_theirs));
        p.start().expect("start");
        let rx = bounded(
            Duration::from_secs(20),
            "receive from a faulty peer",
            move || {
                let mut rx = rx;
                assert!(rx.poll(LONG).expect("poll"), "the peer wrote");
                let err = rx.recv_timeout(SHORT).expect_err("no message");
                if half_frame {
                    assert!(err.is_timeout(), "{err}");
                    assert!(rx.recv_timeout(SHORT).expect_err("still").is_timeout());
                    assert!(rx.try_recv().expect_err("try").is_empty());
                } else {
                    assert!(is_io(&err, std::io::ErrorKind::InvalidData), "{err}");
                    let err = rx.recv_timeout(SHORT).expect_err("then");
                    assert!(err.is_disconnected(), "{err}");
                }
                rx
            },
        );
        control.send(&0).expect("release the peer");
        joined_ok(&mut p);
        drop(rx);
    }
}

// ---------------------------------------------------------------------
// A receiver short of memory.

#[process_fn]
fn receive_under_memory_limit(mut end: Connection<()>) -> (String, String) {
    let limit = 256 << 20;
    let (_, hard) = getrlimit(Resource::RLIMIT_AS).expect("getrlimit");
    setrlimit(Resource::RLIMIT_AS, limit, hard).expect("setrlimit");
    end.send_bytes(b"ready").expect("ready");
    let describe = |r: Result<Vec<u8>, RecvTimeoutError>| match r {
        Ok(bytes) if bytes.len() < 100 => String::from_utf8_lossy(&bytes).into_owned(),
        Ok(bytes) => format!("{} bytes", bytes.len()),
        Err(e) => e.to_string(),
    };
    let big = describe(end.recv_bytes_timeout(LONG));
    let next = describe(end.recv_bytes_timeout(LONG));
    (big, next)
}

#[test]
fn a_message_the_receiver_cannot_allocate_is_an_error_not_an_abort() {
    let _alone = multiproc_tests::alone();
    let (mut mine, theirs) = Pipe::new::<()>().expect("pipe");
    let mut child = spawn(receive_under_memory_limit, (theirs,)).expect("spawn");
    assert_eq!(mine.recv_bytes_timeout(LONG).expect("ready"), b"ready");
    // Legal (under the default 1 GiB limit) but more than the receiver's
    // address space allows.
    let big = vec![3u8; 300 << 20];
    let sent = mine.send_bytes(&big);
    drop(big);
    let after = mine.send_bytes(b"after");
    let (big, next) = child.join_timeout(LONG).expect("the receiver returned");
    assert!(sent.is_ok() && after.is_ok(), "{sent:?} {after:?}");
    assert!(big.contains("no memory"), "{big}");
    assert_eq!(next, "after", "the next message arrives");
}

// ---------------------------------------------------------------------
// A receiver short of descriptors.

fn open_fd_numbers() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

#[process_fn]
fn receive_with_few_descriptors(
    mut end: Connection<Vec<Connection<u8>>>,
) -> (String, usize, usize, String) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    // The lowest limit that leaves 4 numbers free (5 once the listing's
    // own descriptor is closed): fewer than a message of three
    // connections carries.
    let open = open_fd_numbers();
    let mut limit = 0u64;
    while limit - open.iter().filter(|&&fd| (fd as u64) < limit).count() as u64 <= 4 {
        limit += 1;
    }
    setrlimit(Resource::RLIMIT_NOFILE, limit - 1, hard).expect("setrlimit");
    let before = open_fd_numbers().len();
    end.send(&Vec::new()).expect("ready");
    let first = match end.recv_timeout(LONG) {
        Ok(v) => format!("received {} connections", v.len()),
        Err(e) => e.to_string(),
    };
    let after = open_fd_numbers().len();
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore");
    end.send(&Vec::new()).expect("ready again");
    let second = match end.recv_timeout(LONG) {
        Ok(v) => {
            for c in &v {
                c.send(&9).expect("the received connection works");
            }
            format!("received {} connections", v.len())
        }
        Err(e) => e.to_string(),
    };
    (first, before, after, second)
}

#[test]
fn a_message_whose_descriptors_were_truncated_is_an_error_and_later_ones_work() {
    let _alone = multiproc_tests::alone();
    let (mut mine, theirs) = Pipe::new::<Vec<Connection<u8>>>().expect("pipe");
    let mut child = spawn(receive_with_few_descriptors, (theirs,)).expect("spawn");
    let batch = || -> (Vec<Connection<u8>>, Vec<Connection<u8>>) {
        (0..3).map(|_| Pipe::new::<u8>().expect("pipe")).unzip()
    };
    assert!(mine.recv_timeout(LONG).expect("ready").is_empty());
    let (send, _keep) = batch();
    mine.send(&send).expect("send the first batch");
    drop(send);
    assert!(mine.recv_timeout(LONG).expect("ready again").is_empty());
    let (send, mut peers) = batch();
    mine.send(&send).expect("send the second batch");
    drop(send);
    let (first, before, after, second) = child.join_timeout(LONG).expect("the receiver returned");
    assert!(first.contains("MSG_CTRUNC"), "{first}");
    assert_eq!(before, after, "the descriptors that did arrive were closed");
    assert_eq!(second, "received 3 connections");
    for peer in &mut peers {
        assert_eq!(
            peer.recv_timeout(LONG).expect("through the second batch"),
            9
        );
    }
}
