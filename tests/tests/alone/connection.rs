//! Pipes across real processes: the tutorial's example, big messages,
//! end of stream when the peer dies, connections that travel.
use std::time::Duration;

use multiproc::connection::{Connection, Receiver, RecvTimeoutError, Sender};
use multiproc::{Pipe, Process, Queue, process_fn};

const LONG: Duration = Duration::from_secs(30);

#[process_fn]
fn send_greeting(conn: Connection<(u32, String, String)>) {
    conn.send(&(38, "snake".into(), "hello".into()))
        .expect("send");
}

#[test]
fn child_sends_parent_receives() {
    let _alone = multiproc_tests::alone();
    let (mut parent, child) = Pipe::new().expect("pipe");
    let mut p = Process::new(send_greeting, (child,));
    p.start().expect("start");
    let got = parent.recv_timeout(LONG).expect("recv");
    assert_eq!(got, (38, "snake".to_string(), "hello".to_string()));
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

#[process_fn]
fn echo_twice(mut conn: Connection<u64>) {
    for _ in 0..2 {
        let v = conn.recv_timeout(LONG).expect("recv");
        conn.send(&(v + 1)).expect("send");
    }
}

#[test]
fn duplex_round_trips() {
    let _alone = multiproc_tests::alone();
    let (mut a, b) = Pipe::new::<u64>().expect("pipe");
    let mut p = Process::new(echo_twice, (b,));
    p.start().expect("start");
    a.send(&1).expect("send");
    assert_eq!(a.recv_timeout(LONG).expect("recv"), 2);
    a.send(&10).expect("send");
    assert_eq!(a.recv_timeout(LONG).expect("recv"), 11);
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

#[process_fn]
fn send_big(tx: Sender<Vec<u8>>, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    tx.send(&data).expect("send big");
    tx.send_bytes(&data[..1000]).expect("send bytes");
}

#[test]
fn fifty_mib_message_through_a_pipe() {
    let _alone = multiproc_tests::alone();
    let len = 50 << 20;
    let (mut rx, tx) = Pipe::simplex::<Vec<u8>>().expect("pipe");
    let mut p = Process::new(send_big, (tx, len));
    p.start().expect("start");
    let got = rx.recv_timeout(LONG).expect("recv big");
    assert_eq!(got.len(), len);
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 253) as u8));
    assert_eq!(rx.recv_bytes().expect("bytes"), got[..1000].to_vec());
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

#[test]
fn oversized_message_is_an_error_not_an_allocation() {
    let _alone = multiproc_tests::alone();
    let (a, mut b) = Pipe::new::<Vec<u8>>().expect("pipe");
    b.set_max_message_size(1024);
    let t = std::thread::spawn(move || {
        a.send(&vec![0u8; 1 << 20]).expect("send");
        a.send(&vec![1u8; 10]).expect("send");
    });
    let err = b.recv_timeout(LONG).expect_err("too large");
    assert!(
        matches!(
            err,
            RecvTimeoutError::Failed(multiproc::Error::MessageTooLarge { .. })
        ),
        "{err}"
    );
    assert_eq!(b.recv_timeout(LONG).expect("next"), vec![1u8; 10]);
    t.join().expect("thread");
}

#[process_fn]
fn hold_forever(conn: Connection<u8>) {
    let _keep = conn;
    loop {
        std::thread::park();
    }
}

#[test]
fn recv_after_peer_died_is_disconnected() {
    let _alone = multiproc_tests::alone();
    let (mut parent, child) = Pipe::new::<u8>().expect("pipe");
    let mut p = Process::new(hold_forever, (child,));
    p.start().expect("start");
    assert!(
        parent
            .recv_timeout(Duration::from_millis(100))
            .expect_err("nothing yet")
            .is_timeout()
    );
    p.kill().expect("kill");
    let err = parent
        .recv_timeout(Duration::from_secs(2))
        .expect_err("peer died");
    assert!(err.is_disconnected(), "{err}");
    p.join_timeout(LONG).expect("join").expect("exited");
}

#[process_fn]
fn send_through_received(q: Queue<Connection<String>>) {
    let conn = q.get_timeout(LONG).expect("get connection");
    conn.send(&"via queue".to_string()).expect("send");
}

#[test]
fn connection_through_a_queue_to_another_process() {
    let _alone = multiproc_tests::alone();
    let q = Queue::<Connection<String>>::new().expect("queue");
    let (mut mine, theirs) = Pipe::new::<String>().expect("pipe");
    let mut p = Process::new(send_through_received, (q.clone(),));
    p.start().expect("start");
    q.put(theirs).expect("put connection");
    assert_eq!(mine.recv_timeout(LONG).expect("recv"), "via queue");
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
    // Every copy of the other end is gone: end of stream.
    assert!(mine.recv_timeout(LONG).expect_err("eof").is_disconnected());
}

#[test]
fn fd_count_unchanged_after_a_thousand_connection_transfers() {
    let _alone = multiproc_tests::alone();
    let (carrier_tx, mut carrier_rx) = Pipe::new::<Connection<u8>>().expect("carrier");
    // The carrier's first message with handles creates its send lock (a
    // memfd it keeps): count from after that one.
    let transfer = |carrier_rx: &mut Connection<Connection<u8>>| {
        let (a, mut b) = Pipe::new::<u8>().expect("pipe");
        carrier_tx.send(&a).expect("send");
        drop(a);
        let a = carrier_rx.recv().expect("recv");
        a.send(&5).expect("send");
        assert_eq!(b.recv().expect("recv"), 5);
    };
    transfer(&mut carrier_rx);
    let before = multiproc_tests::open_fds();
    for _ in 0..1_000 {
        transfer(&mut carrier_rx);
    }
    assert_eq!(multiproc_tests::open_fds(), before);
}

#[process_fn]
fn relay(mut inbox: Receiver<(String, Sender<String>)>) {
    // The Sender inside the message arrives with its descriptors.
    while let Ok((text, reply)) = inbox.recv_timeout(LONG) {
        reply.send(&format!("{text}!")).expect("reply");
    }
}

#[test]
fn handles_inside_messages_reach_another_process() {
    let _alone = multiproc_tests::alone();
    let (inbox_rx, inbox_tx) = Pipe::simplex::<(String, Sender<String>)>().expect("pipe");
    let mut p = Process::new(relay, (inbox_rx,));
    p.start().expect("start");
    for i in 0..20 {
        let (mut rx, tx) = Pipe::simplex::<String>().expect("pipe");
        // Plain messages and messages with handles interleave on one pipe.
        inbox_tx.send(&(format!("hi {i}"), tx)).expect("send");
        assert_eq!(rx.recv_timeout(LONG).expect("reply"), format!("hi {i}!"));
        // The only copy of the sender was in the child, which dropped it.
        assert!(rx.recv_timeout(LONG).expect_err("eof").is_disconnected());
    }
    drop(inbox_tx);
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

// ---------------------------------------------------------------------
// Iteration, error predicates and conversions.

#[process_fn]
fn send_range_and_exit(tx: Sender<u32>, n: u32) {
    for i in 0..n {
        tx.send(&i).expect("send");
    }
}

#[test]
fn iteration_ends_when_the_sending_process_is_gone() {
    let _alone = multiproc_tests::alone();
    let (mut rx, tx) = Pipe::simplex::<u32>().expect("pipe");
    let mut p = Process::new(send_range_and_exit, (tx, 500));
    p.start().expect("start");
    let mut got = Vec::new();
    for x in &mut rx {
        got.push(x);
    }
    assert_eq!(got, (0..500).collect::<Vec<_>>());
    let mut it = rx.iter();
    assert_eq!(it.next(), None);
    assert!(it.take_error().is_none(), "ended by the disconnect");
    drop(it);
    assert!(rx.recv().expect_err("gone").is_disconnected());
    p.join_timeout(LONG).expect("join").expect("ended");

    // The owning form, on a duplex end.
    let (a, b) = Pipe::new::<String>().expect("pipe");
    a.send(&"x".to_string()).expect("send");
    a.send(&"y".to_string()).expect("send");
    drop(a);
    assert_eq!(b.into_iter().collect::<Vec<_>>(), ["x", "y"]);
}

#[test]
fn try_iter_takes_what_is_there_and_a_failed_message_ends_iter() {
    let _alone = multiproc_tests::alone();
    let (tx, mut rx) = Pipe::new::<Vec<u8>>().expect("pipe");
    assert_eq!(rx.try_iter().count(), 0);
    tx.send(&vec![1]).expect("send");
    tx.send(&vec![2]).expect("send");
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), [vec![1], vec![2]]);
    // A message over the limit ends the iteration with its error; the
    // end stays usable.
    rx.set_max_message_size(1024);
    tx.send(&vec![3]).expect("send");
    tx.send(&vec![0u8; 4096]).expect("send big");
    tx.send(&vec![4]).expect("send");
    let mut it = rx.iter();
    assert_eq!(it.next(), Some(vec![3]));
    assert_eq!(it.next(), None);
    let err = it.take_error().expect("the big message ended it");
    assert!(
        matches!(err, multiproc::Error::MessageTooLarge { .. }),
        "{err}"
    );
    assert_eq!(rx.recv_timeout(LONG).expect("the next one"), vec![4]);
}

fn recv_then(rx: &mut Receiver<u8>) -> multiproc::Result<u8> {
    Ok(rx.recv()?)
}

fn try_recv_then(rx: &mut Receiver<u8>) -> multiproc::Result<u8> {
    Ok(rx.try_recv()?)
}

fn recv_timeout_then(rx: &mut Receiver<u8>) -> multiproc::Result<u8> {
    Ok(rx.recv_timeout(Duration::from_millis(10))?)
}

#[test]
fn receive_errors_have_predicates_and_convert_into_error() {
    let _alone = multiproc_tests::alone();
    use multiproc::Error;
    use multiproc::connection::{RecvError, TryRecvError};
    let (mut rx, tx) = Pipe::simplex::<u8>().expect("pipe");

    let empty = rx.try_recv().expect_err("nothing yet");
    assert!(empty.is_empty() && !empty.is_disconnected(), "{empty}");
    assert!(empty.failure().is_none());
    assert!(matches!(try_recv_then(&mut rx), Err(Error::Empty)));
    let late = rx
        .recv_timeout(Duration::from_millis(10))
        .expect_err("nothing yet");
    assert!(late.is_timeout() && !late.is_disconnected(), "{late}");
    let err = recv_timeout_then(&mut rx).expect_err("nothing yet");
    assert!(matches!(err, Error::Timeout) && err.is_timeout());
    assert!(
        rx.recv_bytes_timeout(Duration::from_millis(10))
            .expect_err("nothing yet")
            .is_timeout()
    );

    tx.send(&9).expect("send");
    assert_eq!(recv_then(&mut rx).expect("one"), 9);
    tx.close();
    let gone = rx.recv().expect_err("sender closed");
    assert!(gone.is_disconnected(), "{gone}");
    assert!(matches!(Error::from(gone.clone()), Error::Disconnected));
    assert!(matches!(recv_then(&mut rx), Err(Error::Disconnected)));
    assert!(rx.try_recv().expect_err("closed").is_disconnected());
    assert!(
        rx.recv_timeout(Duration::from_millis(10))
            .expect_err("closed")
            .is_disconnected()
    );
    // The blocking operation's error is one of the others'.
    assert!(TryRecvError::from(gone.clone()).is_disconnected());
    assert!(RecvTimeoutError::from(gone).is_disconnected());
    let failed = RecvError::Failed(Error::Decode {
        message: "x".into(),
    });
    assert!(failed.failure().is_some() && !failed.is_disconnected());
    assert!(matches!(Error::from(failed), Error::Decode { .. }));
}
