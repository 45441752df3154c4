//! The name server of [`SharedMemory`](super::SharedMemory): one thread per
//! process answers for every name the process created.
//!
//! Each name is a listening Unix socket in the abstract namespace: the
//! kernel keeps that namespace, refuses a second bind of a name, and frees
//! a name when its socket closes, so a name vanishes when its creator dies
//! however it dies. One thread (started with the first name, named
//! `multiproc-shm`) polls every listening socket of the process plus a
//! wake-up pipe; for each connection it checks the client's uid and sends
//! the block's memfd. A new name wakes it to poll one more socket.
//!
//! A client first sends one request: [`OPEN`] (answered with the memfd),
//! or [`UNLINK`] and the identity of the block it holds (device and inode
//! of its memfd, 16 bytes): the thread removes the name if it still serves
//! that block and answers [`UNLINKED`] once the socket is closed, or
//! [`OTHER_BLOCK`]. So any handle of a block, in any process, can unlink
//! its name (as in CPython, where a consumer often unlinks what a producer
//! created), and never the name of a block created later under it. A
//! request not there yet when the connection is accepted is waited for
//! (the connection is polled with the listeners) for at most
//! [`REQUEST_WAIT`].
//!
//! [`withdraw`] (`unlink` on the creating handle) shuts the socket down,
//! so connects are refused at once, then waits until the thread has let go
//! of the descriptor (it polls a snapshot of the table, which it drops
//! before it takes the next one) and closes it: once `unlink` returns, the
//! name can be bound again.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::socket::{self, Shutdown, SockFlag, sockopt};

use crate::sys;

/// A request: send the memfd.
pub(super) const OPEN: u8 = b'O';
/// A request: remove the name (16 bytes of block identity follow).
pub(super) const UNLINK: u8 = b'U';
/// The bytes of an unlink request.
pub(super) const UNLINK_REQUEST: usize = 17;
/// An answer to [`UNLINK`]: the name is gone.
pub(super) const UNLINKED: u8 = 1;
/// An answer to [`UNLINK`]: the name now holds another block.
pub(super) const OTHER_BLOCK: u8 = 2;
/// How long the thread waits for a connection's request.
const REQUEST_WAIT: Duration = Duration::from_secs(30);

/// The identity of the file `fd` refers to (device, inode).
pub(super) fn identity(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    Ok((st.st_dev, st.st_ino))
}

/// A name served by this process, as [`serve`] returned it.
#[derive(Debug)]
pub(super) struct Token(u64);

/// One name: its listening socket and the memfd it hands out.
struct Served {
    listener: Arc<OwnedFd>,
    memfd: Arc<OwnedFd>,
}

struct State {
    names: HashMap<u64, Served>,
    next: u64,
    /// Snapshots of `names` the thread has taken; it drops each one
    /// before it takes the next.
    rounds: u64,
    /// The write end of the thread's wake-up pipe, while the thread runs.
    wake: Option<OwnedFd>,
}

struct Server {
    state: Mutex<State>,
    /// Signalled at each new round and when the thread ends.
    turned: Condvar,
}

static SERVER: OnceLock<Server> = OnceLock::new();

fn server() -> &'static Server {
    SERVER.get_or_init(|| Server {
        state: Mutex::new(State {
            names: HashMap::new(),
            next: 0,
            rounds: 0,
            wake: None,
        }),
        turned: Condvar::new(),
    })
}

impl Server {
    /// The table, even if a panic poisoned its lock (every update of it is
    /// a single insert or remove, complete or not started).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves `memfd` under the name `listener` is bound to (a listening,
/// non-blocking Unix stream socket), from the process's one server thread,
/// which this starts if it does not run.
pub(super) fn serve(listener: OwnedFd, memfd: OwnedFd) -> io::Result<Token> {
    let server = server();
    let mut state = server.lock();
    if state.wake.is_none() {
        let (wake_rx, wake_tx) = sys::pipe()?;
        sys::set_nonblocking(wake_rx.as_fd(), true)?;
        sys::set_nonblocking(wake_tx.as_fd(), true)?;
        std::thread::Builder::new()
            .name("multiproc-shm".to_string())
            .spawn(move || run(server, &wake_rx))?;
        state.wake = Some(wake_tx);
    }
    let token = state.next;
    state.next += 1;
    state.names.insert(
        token,
        Served {
            listener: Arc::new(listener),
            memfd: Arc::new(memfd),
        },
    );
    wake(&state);
    Ok(Token(token))
}

/// Stops serving the name of `token` and closes its socket; the name is
/// free again when this returns. `Ok(false)` if it was not served anymore
/// (another handle of the block unlinked it).
pub(super) fn withdraw(token: Token) -> io::Result<bool> {
    let server = server();
    let mut state = server.lock();
    let Some(served) = state.names.remove(&token.0) else {
        return Ok(false);
    };
    // Connects are refused from here on, even before the socket closes.
    let shut = match socket::shutdown(served.listener.as_raw_fd(), Shutdown::Both) {
        Ok(()) | Err(Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    };
    // Wait until the thread's snapshot no longer holds the socket: the
    // round under way when it was removed has ended once `rounds` moves.
    let seen = state.rounds;
    wake(&state);
    while state.wake.is_some() && state.rounds == seen {
        state = server.turned.wait(state).unwrap_or_else(|p| p.into_inner());
    }
    drop(state);
    // The last reference: closing it frees the name.
    drop(served);
    shut.map(|()| true)
}

/// Wakes the server thread so that it takes a new snapshot.
fn wake(state: &State) {
    if let Some(wake) = &state.wake {
        // A full pipe (EAGAIN) already holds a wake-up; the thread reads
        // the pipe empty each time.
        let _ = sys::write(wake.as_fd(), &[1]);
    }
}

/// Marks the thread gone when it ends (it ends only if `poll` fails), so
/// that [`withdraw`] does not wait for it and [`serve`] starts another.
struct Ended(&'static Server);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.lock().wake = None;
        self.0.turned.notify_all();
    }
}

/// A connection whose request has not come yet.
struct Pending {
    conn: OwnedFd,
    token: u64,
    listener: Arc<OwnedFd>,
    memfd: Arc<OwnedFd>,
    deadline: Instant,
}

/// What a request asks for.
enum Request {
    /// Not there yet.
    Wait,
    Open,
    /// Unlink, if the block is this identity.
    Unlink((u64, u64)),
    /// Malformed, or the client went away.
    Drop,
}

fn read_request(conn: &OwnedFd) -> Request {
    let mut buf = [0u8; UNLINK_REQUEST];
    match sys::read(conn.as_fd(), &mut buf) {
        Err(Errno::EAGAIN) => Request::Wait,
        Ok(1) if buf[0] == OPEN => Request::Open,
        Ok(UNLINK_REQUEST) if buf[0] == UNLINK => {
            let word = |at: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&buf[at..at + 8]);
                u64::from_le_bytes(w)
            };
            Request::Unlink((word(1), word(9)))
        }
        _ => Request::Drop,
    }
}

/// The server thread.
fn run(server: &'static Server, wake_rx: &OwnedFd) {
    let _ended = Ended(server);
    let uid = nix::unistd::getuid().as_raw();
    let mut pending: Vec<Pending> = Vec::new();
    loop {
        let snapshot: Vec<(u64, Arc<OwnedFd>, Arc<OwnedFd>)> = {
            let mut state = server.lock();
            state.rounds += 1;
            server.turned.notify_all();
            state
                .names
                .iter()
                .map(|(t, s)| (*t, Arc::clone(&s.listener), Arc::clone(&s.memfd)))
                .collect()
        };
        let now = Instant::now();
        pending.retain(|p| p.deadline > now);
        let timeout = pending
            .iter()
            .map(|p| p.deadline.saturating_duration_since(now))
            .min();
        let mut fds = Vec::with_capacity(snapshot.len() + pending.len() + 1);
        fds.push((wake_rx.as_fd(), PollFlags::POLLIN));
        fds.extend(
            snapshot
                .iter()
                .map(|(_, l, _)| (l.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(pending.iter().map(|p| (p.conn.as_fd(), PollFlags::POLLIN)));
        let Ok(ready) = sys::poll_many(&fds, timeout) else {
            return;
        };
        drop(fds);
        if ready.first().is_some_and(|r| !r.is_empty()) {
            let mut drain = [0u8; 64];
            while matches!(sys::read(wake_rx.as_fd(), &mut drain), Ok(n) if n > 0) {}
        }
        let mut arrived: Vec<Pending> = Vec::new();
        for ((token, listener, memfd), revents) in snapshot.iter().zip(ready.iter().skip(1)) {
            if revents.contains(PollFlags::POLLIN) {
                accept_all(*token, listener, memfd, uid, &mut arrived);
            }
        }
        let flags: Vec<PollFlags> = ready.iter().skip(1 + snapshot.len()).copied().collect();
        let mut still = Vec::with_capacity(pending.len());
        for (i, p) in pending.drain(..).enumerate() {
            if flags.get(i).is_some_and(|f| !f.is_empty()) {
                arrived.push(p);
            } else {
                still.push(p);
            }
        }
        pending = still;
        // Answer what came; unlinks close their sockets before they answer.
        let mut unlinked: Vec<(OwnedFd, Served)> = Vec::new();
        for p in arrived {
            match read_request(&p.conn) {
                Request::Wait => pending.push(p),
                Request::Drop => {}
                Request::Open => {
                    let fds = [p.memfd.as_raw_fd()];
                    let _ = sys::send_with_fds(p.conn.as_fd(), &[IoSlice::new(&[1])], &fds);
                }
                Request::Unlink(id) => {
                    if identity(p.memfd.as_fd()).is_ok_and(|ours| ours == id) {
                        let removed = server.lock().names.remove(&p.token);
                        if let Some(served) = removed {
                            let _ = socket::shutdown(served.listener.as_raw_fd(), Shutdown::Both);
                            unlinked.push((p.conn, served));
                        }
                        // Removed meanwhile by `withdraw`: the name is gone
                        // once the round ends; the client is told by its
                        // connection closing (an error on its side).
                    } else {
                        let _ = sys::send_with_fds(
                            p.conn.as_fd(),
                            &[IoSlice::new(&[OTHER_BLOCK])],
                            &[],
                        );
                    }
                }
            }
        }
        // The thread's own references go with the snapshot and the pending
        // connections of the names just removed: then the sockets close.
        drop(snapshot);
        pending.retain(|p| {
            !unlinked
                .iter()
                .any(|(_, s)| Arc::ptr_eq(&s.listener, &p.listener))
        });
        for (conn, served) in unlinked {
            drop(served);
            let _ = sys::send_with_fds(conn.as_fd(), &[IoSlice::new(&[UNLINKED])], &[]);
        }
    }
}

/// Accepts every pending connection on `listener`, refusing clients of
/// another user than `uid` (one byte, no descriptor); the others wait in
/// `arrived` for their request.
fn accept_all(
    token: u64,
    listener: &Arc<OwnedFd>,
    memfd: &Arc<OwnedFd>,
    uid: u32,
    arrived: &mut Vec<Pending>,
) {
    loop {
        let conn = match socket::accept4(
            listener.as_fd(),
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        ) {
            Ok(conn) => conn,
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            // Nothing pending (EAGAIN), or shut down by `withdraw`.
            Err(_) => return,
        };
        let same_user =
            socket::getsockopt(&conn, sockopt::PeerCredentials).is_ok_and(|c| c.uid() == uid);
        if !same_user {
            // One byte on a fresh connection cannot block; a client that
            // went away (EPIPE) is no concern of the others.
            let _ = sys::send_with_fds(conn.as_fd(), &[IoSlice::new(&[0])], &[]);
            continue;
        }
        arrived.push(Pending {
            conn,
            token,
            listener: Arc::clone(listener),
            memfd: Arc::clone(memfd),
            deadline: Instant::now() + REQUEST_WAIT,
        });
    }
}
