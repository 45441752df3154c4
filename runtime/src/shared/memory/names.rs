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
//! [`withdraw`] (`unlink`) shuts the socket down, so connects are refused
//! at once, then waits until the thread has let go of the descriptor (it
//! polls a snapshot of the table, which it drops before it takes the next
//! one) and closes it: once `unlink` returns, the name can be bound again.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::socket::{self, Shutdown, SockFlag, sockopt};

use crate::sys;

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
/// free again when this returns.
pub(super) fn withdraw(token: Token) -> io::Result<()> {
    let server = server();
    let mut state = server.lock();
    let Some(served) = state.names.remove(&token.0) else {
        return Ok(());
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
    shut
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

/// The server thread.
fn run(server: &'static Server, wake_rx: &OwnedFd) {
    let _ended = Ended(server);
    let uid = nix::unistd::getuid().as_raw();
    loop {
        let snapshot: Vec<(Arc<OwnedFd>, Arc<OwnedFd>)> = {
            let mut state = server.lock();
            state.rounds += 1;
            server.turned.notify_all();
            state
                .names
                .values()
                .map(|s| (Arc::clone(&s.listener), Arc::clone(&s.memfd)))
                .collect()
        };
        let mut fds = Vec::with_capacity(snapshot.len() + 1);
        fds.push((wake_rx.as_fd(), PollFlags::POLLIN));
        fds.extend(snapshot.iter().map(|(l, _)| (l.as_fd(), PollFlags::POLLIN)));
        let Ok(ready) = sys::poll_many(&fds, None) else {
            return;
        };
        if ready.first().is_some_and(|r| !r.is_empty()) {
            let mut drain = [0u8; 64];
            while matches!(sys::read(wake_rx.as_fd(), &mut drain), Ok(n) if n > 0) {}
        }
        for ((listener, memfd), revents) in snapshot.iter().zip(ready.iter().skip(1)) {
            if revents.contains(PollFlags::POLLIN) {
                answer_all(listener, memfd, uid);
            }
        }
    }
}

/// Accepts every pending connection on `listener` and sends each client of
/// user `uid` the memfd (others get no descriptor: a refusal). The one byte
/// sent says how many descriptors ride with it (1 or 0).
fn answer_all(listener: &OwnedFd, memfd: &OwnedFd, uid: u32) {
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
        let fds = [memfd.as_raw_fd()];
        let fds: &[i32] = if same_user { &fds } else { &[] };
        // One byte on a fresh connection cannot block; a client that went
        // away (EPIPE) is no concern of the others.
        let count = [fds.len() as u8];
        let _ = sys::send_with_fds(conn.as_fd(), &[IoSlice::new(&count)], fds);
    }
}
