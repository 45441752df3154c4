//! `multiproc::wait`: several connections and process sentinels at once.
use std::time::Duration;

use multiproc::connection::{Connection, Receiver, Sender};
use multiproc::{Pipe, Process, process_fn, wait};

const LONG: Duration = Duration::from_secs(30);

/// Waits for the parent to say which connection to answer on, then sends
/// the index back on that one.
#[process_fn]
fn answer_on_one(mut ctrl: Receiver<usize>, outs: Vec<Sender<usize>>) {
    let which = ctrl.recv_timeout(LONG).expect("which");
    outs[which].send(&which).expect("send");
    // Keep every end open until the parent is done.
    let _ = ctrl.recv_timeout(LONG);
}

#[test]
fn a_child_sends_on_one_of_three_connections() {
    let (ctrl_rx, ctrl_tx) = Pipe::simplex::<usize>().expect("pipe");
    let mut rxs = Vec::new();
    let mut txs = Vec::new();
    for _ in 0..3 {
        let (rx, tx) = Pipe::simplex::<usize>().expect("pipe");
        rxs.push(rx);
        txs.push(tx);
    }
    let mut p = Process::new(answer_on_one, (ctrl_rx, txs));
    p.start().expect("start");

    // Nobody has sent anything: nothing is ready.
    let objects: Vec<&dyn multiproc::Waitable> = rxs.iter().map(|r| r as _).collect();
    assert!(
        wait(&objects, Some(Duration::ZERO))
            .expect("wait")
            .is_empty()
    );

    ctrl_tx.send(&1).expect("send");
    assert_eq!(wait(&objects, Some(LONG)).expect("wait"), vec![1]);
    assert_eq!(rxs[1].recv_timeout(LONG).expect("recv"), 1);
    drop(ctrl_tx);
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

#[process_fn]
fn exit_when_told(mut conn: Connection<u8>) {
    let _ = conn.recv_timeout(LONG);
}

#[test]
fn a_process_sentinel_is_ready_when_the_child_exits() {
    let (go, child_end) = Pipe::new::<u8>().expect("pipe");
    let (_idle_a, idle_b) = Pipe::new::<u8>().expect("pipe");
    let mut p = Process::new(exit_when_told, (child_end,));
    assert!(matches!(
        wait(&[&p], Some(Duration::ZERO)),
        Err(multiproc::Error::NotStarted)
    ));
    p.start().expect("start");
    // The child is blocked until we send: its sentinel is not ready.
    assert!(
        wait(&[&idle_b, &p], Some(Duration::ZERO))
            .expect("wait")
            .is_empty()
    );
    go.send(&1).expect("go");
    assert_eq!(wait(&[&idle_b, &p], Some(LONG)).expect("wait"), vec![1]);
    let status = p.join_timeout(LONG).expect("join").expect("exited");
    assert!(status.success());
    // Still ready after the join (the sentinel stays valid).
    assert_eq!(wait(&[&p], Some(LONG)).expect("wait"), vec![0]);
}

#[test]
fn a_timeout_returns_nothing() {
    let (_a, b) = Pipe::new::<u8>().expect("pipe");
    let (c, d) = Pipe::simplex::<u8>().expect("pipe");
    let ready = wait(&[&b, &c], Some(Duration::from_millis(50))).expect("wait");
    assert!(ready.is_empty());
    drop(d);
    // A sender whose receiver is gone is ready (a send would fail).
    assert_eq!(wait(&[&b, &c], Some(LONG)).expect("wait"), vec![1]);
}

#[test]
fn a_peer_that_closes_makes_the_connection_ready() {
    let (a, mut b) = Pipe::new::<u8>().expect("pipe");
    let (_c, d) = Pipe::new::<u8>().expect("pipe");
    drop(a);
    assert_eq!(wait(&[&d, &b], Some(LONG)).expect("wait"), vec![1]);
    assert!(b.recv_timeout(LONG).expect_err("eof").is_disconnected());
}

#[process_fn]
fn double_when_told(mut conn: Connection<u64>) -> u64 {
    conn.recv_timeout(LONG).map(|v| v * 2).unwrap_or(0)
}

#[test]
fn a_join_handle_is_ready_when_its_function_returned() {
    let (go, child_end) = Pipe::new::<u64>().expect("pipe");
    let mut h = multiproc::spawn(double_when_told, (child_end,)).expect("spawn");
    assert!(wait(&[&h], Some(Duration::ZERO)).expect("wait").is_empty());
    go.send(&21).expect("go");
    assert_eq!(wait(&[&h], Some(LONG)).expect("wait"), vec![0]);
    assert_eq!(h.join_timeout(LONG).expect("join"), 42);
}
