//! Pipes between processes: Python's `multiprocessing.Pipe`, typed.
//!
//! [`Pipe::new`] gives two duplex [`Connection`]s; [`Pipe::simplex`] gives a
//! [`Receiver`] and a [`Sender`]. Messages are length-framed (a 64-bit
//! length, so a message of any size up to the receiver's limit works).
//! Small messages travel over real pipes (a duplex pair is two of them),
//! which is as fast as the OS allows; a message that carries handles, or a
//! large one, travels over a side Unix socket with the handles'
//! descriptors attached (SCM_RIGHTS). Each end is a handle: pass it to a
//! [`Process`](crate::Process) or send it through a Queue or another Pipe,
//! and it arrives working (its descriptors go along).
//!
//! [`wait`] waits on several connections and process sentinels at once
//! (Python's `multiprocessing.connection.wait`).
//!
//! # Listeners and clients: other programs, other machines
//!
//! A [`Listener`] accepts connections on an [`Address`] (a Unix socket
//! path, an abstract Unix name, or a TCP address) and [`Client::connect`]
//! makes them, as Python's `multiprocessing.connection.Listener` and
//! `Client`: each side gets a [`Connection<T>`] with the methods of a Pipe
//! end, usable in [`wait`] (so is the `Listener`, ready when a peer
//! waits). The two sides may be any two programs that agree on `T`.
//!
//! With an authkey on both sides, each proves it knows the key before
//! the connection is handed out: CPython's challenge–response
//! (`deliver_challenge`/`answer_challenge`), with **HMAC-SHA256** (the
//! `hmac` and `sha2` crates; CPython 3.11 uses HMAC-MD5, 3.12 SHA-256), 40
//! random bytes per challenge and a constant-time comparison. A wrong key
//! is [`Error::AuthenticationError`] on both sides, and nothing an
//! unauthenticated peer sends reaches a decoder (handshake messages are
//! at most 256 bytes, compared as bytes). [`process::authkey`] is the key
//! all processes of this program share: random in the main process,
//! inherited by children (CPython's `current_process().authkey`).
//!
//! Deadlines: [`accept`](Listener::accept) waits for a peer as std's
//! `TcpListener::accept` does ([`accept_timeout`](Listener::accept_timeout)
//! gives up); each handshake must end within
//! [`DEFAULT_HANDSHAKE_TIMEOUT`] (10 s;
//! [`set_handshake_timeout`](Listener::set_handshake_timeout)), or accept
//! returns [`Error::Timeout`], and one that breaks the protocol (random
//! bytes, a huge length, a message instead of a response) is refused at
//! once; the listener serves on. [`Client::connect_timeout`] bounds the
//! connect and the handshake together.
//!
//! A message over a listener's or client's socket is one length-framed
//! frame (the wire format of the side sockets); its buffer grows as its
//! bytes arrive, never from the length a peer announces. Over a Unix
//! socket, handles travel as over a Pipe. Over TCP the peer may be on
//! another machine, where a [`Queue`](crate::Queue), a
//! [`Lock`](crate::Lock), a [`Value`](crate::Value), shared memory, a Pipe
//! end or a [`Descriptor`] mean nothing: a message holding one is an
//! [`Error::Encode`] naming it, and nothing is sent. Messages are not
//! encrypted. A connection from a listener or a client travels to other
//! processes of this machine as a Pipe end does (a worker process can
//! serve an accepted peer).
//!
//! # Passing any descriptor
//!
//! A [`Descriptor`] wraps any open file descriptor (`OwnedFd`, `File`,
//! `TcpStream`, `UnixStream`...) as a handle: it travels in a Queue, a
//! Pipe, a Unix-socket connection or a process's arguments, and the
//! receiver gets its own descriptor for the same open file.
//! [`send_handle`](Connection::send_handle) and
//! [`recv_handle`](Connection::recv_handle) are Python's
//! `multiprocessing.reduction.send_handle`/`recv_handle` on any
//! connection.
//!
//! [`process::authkey`]: crate::process::authkey
//!
//! # Several senders on one end
//!
//! Unlike Python's, an end may be used by several senders at once: threads
//! sharing it, or processes that each hold a copy. Every message arrives
//! whole, and the messages of each sender arrive in the order it sent
//! them. Small messages (up to `PIPE_BUF`, 4 KiB with the header) are one
//! atomic pipe write and take no lock; the others are written under a
//! lock shared by every copy of the end (a small memfd that travels with
//! it, made on the end's first large message or first copy). If a sender
//! dies in the middle of such a message, nobody can finish it: the next
//! sender that takes the lock over gets an [`Error::Io`] saying so, the end
//! is unusable from then on for every sender, and the receiver gets a
//! [`RecvError::Failed`] with an [`Error::Io`] of kind `InvalidData` (once;
//! then `Disconnected`) instead of waiting for the rest.
//!
//! # Errors
//!
//! Receiving has crossbeam-channel's per-operation errors, as
//! [`Queue`](crate::Queue)'s `get` has: [`recv`](Connection::recv) fails
//! with a [`RecvError`], [`try_recv`](Connection::try_recv) with a
//! [`TryRecvError`] (`Empty`: nothing now), and
//! [`recv_timeout`](Connection::recv_timeout) with a [`RecvTimeoutError`]
//! (`Timeout`). Each has `Disconnected` (the peer is gone: Python's
//! `EOFError`) and `Failed(Error)` (a message that arrived but could not be
//! received: the [`Error`] inside says why), the predicates
//! `is_disconnected()`, `is_timeout()` / `is_empty()`, and a `From`
//! conversion into [`Error`] for `?`. Sending has nothing to hand back (it
//! borrows the value), so [`send`](Connection::send) returns
//! [`multiproc::Result`](crate::Result).
//!
//! [`iter`](Connection::iter) (also `for x in &mut conn`) waits for each
//! message until the peer is gone, and [`try_iter`](Connection::try_iter)
//! takes what is there now, as `std::sync::mpsc::Receiver`'s.
//!
//! # What a receiver can count on
//!
//! - `recv_timeout` and `try_recv` return by their deadline whatever the
//!   peer sends. A message that is only partly there stays buffered and
//!   the next call resumes it.
//! - A length is checked against [`set_max_message_size`] before anything
//!   is allocated, and the allocation itself may fail without aborting:
//!   a message over the limit fails with [`Error::MessageTooLarge`], one
//!   this process cannot allocate with an [`Error::Io`] of kind
//!   `OutOfMemory` (both inside `Failed`). Either is skipped, and the end
//!   stays usable.
//! - A message whose descriptors the kernel had to drop (a full descriptor
//!   table: MSG_CTRUNC) fails with an [`Error::Io`] of its own; the descriptors of
//!   it that did arrive are closed, and later messages work once
//!   descriptors are free again. Descriptors that come with a message
//!   without belonging to it are closed, never handed to another one.
//! - Bytes that no sender writes (an impossible header) make the end
//!   corrupt: a failure with an [`Error::Io`] of kind `InvalidData` once,
//!   then `Disconnected`.
//!
//! Several *receivers* on one end are not supported (as in Python): each
//! would get parts of the other's messages.
//!
//! [`set_max_message_size`]: Connection::set_max_message_size
//!
//! Sending to an end whose peer is gone is [`Error::Disconnected`] because
//! SIGPIPE is ignored: Rust's `main` does that, and so does a multiproc
//! child. A program that restores SIGPIPE's default action is killed by
//! such a send instead (a pipe write has no `MSG_NOSIGNAL`).
//!
//! A `recv` after the other end was closed, or its process died, is
//! [`RecvError::Disconnected`] (Python's `EOFError`), never a hang.
//!
//! ```no_run
//! use multiproc::{process_fn, Pipe, Process};
//! use multiproc::connection::Connection;
//!
//! #[process_fn]
//! fn child(conn: Connection<(u32, String)>) {
//!     conn.send(&(42, "hello".to_string())).ok();
//! }
//!
//! # fn main() -> multiproc::Result<()> {
//! let (parent, child_end) = Pipe::new::<(u32, String)>()?;
//! let mut p = Process::new(child, (child_end,));
//! p.start()?;
//! let mut parent = parent;
//! assert_eq!(parent.recv()?, (42, "hello".to_string()));
//! p.join()?;
//! # Ok(())
//! # }
//! ```

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::poll::PollFlags;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::error::{Error, Result};
use crate::handle::{HandleWire, Kind, Parts, Received, handle_serde};
use crate::sys;

mod auth;
mod descriptor;
mod error;
mod link;
mod listener;
mod send_lock;
pub use self::descriptor::Descriptor;
use self::error::Sorted;
pub use self::error::{RecvError, RecvTimeoutError, TryRecvError};
pub use self::listener::{Address, Client, DEFAULT_HANDSHAKE_TIMEOUT, Listener};
use link::Link;

const TAG_VALUE: u32 = 1;
const TAG_BYTES: u32 = 2;
const TAG_HANDLE: u32 = 3;

thread_local! {
    /// Reused encode buffer: sending does not allocate once it has grown.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Creates pipes: [`Pipe::new`] (duplex) and [`Pipe::simplex`].
#[derive(Debug, Clone, Copy)]
pub struct Pipe(());

impl Pipe {
    /// Two connected duplex ends: what one sends, the other receives.
    /// Python's `Pipe()`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the OS refuses a pipe or a socket pair.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Pipe;
    /// let (a, mut b) = Pipe::new::<u64>()?;
    /// a.send(&7)?;
    /// assert_eq!(b.recv()?, 7);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new<T>() -> Result<(Connection<T>, Connection<T>)> {
        let (a, b) = Link::duplex()?;
        Ok((Connection::from_link(a), Connection::from_link(b)))
    }

    /// A one-way pipe: a [`Receiver`] and a [`Sender`] (in Python's order,
    /// `Pipe(duplex=False)`).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the OS refuses a pipe or a socket pair.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Pipe;
    /// let (mut rx, tx) = Pipe::simplex::<String>()?;
    /// tx.send(&"hi".to_string())?;
    /// assert_eq!(rx.recv()?, "hi");
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn simplex<T>() -> Result<(Receiver<T>, Sender<T>)> {
        let (rx, tx) = Link::simplex()?;
        Ok((
            Receiver {
                conn: Connection::from_link(rx),
            },
            Sender {
                conn: Connection::from_link(tx),
            },
        ))
    }
}

/// One end of a [`Pipe`]: sends and receives values of type `T`.
///
/// Connections are moved, not cloned; the reading state (a buffer) lives
/// in the handle. Dropping the last handle to an end (in every process)
/// closes it, and the other end's `recv` then returns
/// [`RecvError::Disconnected`].
pub struct Connection<T> {
    link: Link,
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    _marker: PhantomData<fn(T) -> T>,
}

impl<T> fmt::Debug for Connection<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("fds", &self.link.fds())
            .finish()
    }
}

impl<T> Connection<T> {
    fn from_link(link: Link) -> Self {
        Connection {
            link,
            bytes: Vec::new(),
            fds: Vec::new(),
            _marker: PhantomData,
        }
    }

    /// Sends raw bytes as one message, without serde (Python's
    /// `send_bytes`). Read them with [`recv_bytes`](Connection::recv_bytes).
    ///
    /// # Errors
    ///
    /// [`Error::Disconnected`] if the other end is closed; [`Error::Io`] if
    /// another sender died in the middle of a message on this end (see
    /// the [module docs](self)).
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<()> {
        self.link.send(TAG_BYTES, &[bytes], &[])
    }

    /// Receives one message as raw bytes (Python's `recv_bytes`).
    ///
    /// # Errors
    ///
    /// [`RecvError::Disconnected`] when the other end is closed and nothing
    /// is left to read; [`RecvError::Failed`] with
    /// [`Error::MessageTooLarge`] for a message over
    /// [`max_message_size`](Connection::set_max_message_size) (it is
    /// skipped; the connection stays usable).
    pub fn recv_bytes(&mut self) -> Result<Vec<u8>, RecvError> {
        self.recv_bytes_inner(None).map_err(RecvError::from)
    }

    /// Like [`recv_bytes`](Connection::recv_bytes), waiting at most
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// As [`recv_bytes`](Connection::recv_bytes), plus
    /// [`RecvTimeoutError::Timeout`].
    pub fn recv_bytes_timeout(&mut self, timeout: Duration) -> Result<Vec<u8>, RecvTimeoutError> {
        self.recv_bytes_inner(Some(timeout))
            .map_err(RecvTimeoutError::from)
    }

    fn recv_bytes_inner(&mut self, timeout: Option<Duration>) -> Result<Vec<u8>, Sorted> {
        self.fds.clear();
        let mut out = Vec::new();
        let got = self.link.recv_into(&mut out, &mut self.fds, timeout);
        self.fds.clear();
        self.check_tag(got.map_err(error::sort)?)?;
        Ok(out)
    }

    /// Refuses a frame no sender of a user's messages writes: a handshake
    /// message reaching a connection made without an authkey.
    fn check_tag(&self, tag: u32) -> Result<(), Sorted> {
        if tag == auth::TAG {
            return Err(Sorted::Failed(Error::AuthenticationError {
                message: "the peer asks for authentication: connect with its authkey".into(),
            }));
        }
        Ok(())
    }

    /// Sends a duplicate of the descriptor `fd` as one message (Python's
    /// `multiprocessing.reduction.send_handle`); the peer takes it with
    /// [`recv_handle`](Connection::recv_handle). The message is the
    /// encoding of a [`Descriptor`], so a `Connection<Descriptor>`'s
    /// `recv` takes it too.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] on a TCP connection (a descriptor means nothing
    /// on another machine); [`Error::Io`] if the descriptor cannot be
    /// duplicated; as [`send_bytes`](Connection::send_bytes).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::os::unix::net::UnixStream;
    /// use multiproc::Pipe;
    ///
    /// let (a, mut b) = Pipe::new::<()>()?;
    /// let (mut mine, theirs) = UnixStream::pair()?;
    /// a.send_handle(&theirs)?;
    /// drop(theirs); // the peer has its own
    /// let mut got = UnixStream::from(b.recv_handle()?);
    /// mine.write_all(b"hi")?;
    /// let mut buf = [0u8; 2];
    /// got.read_exact(&mut buf)?;
    /// assert_eq!(&buf, b"hi");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_handle(&self, fd: impl AsFd) -> Result<()> {
        let handle = Descriptor::duplicate(fd.as_fd())?;
        self.send_as(&handle, TAG_HANDLE, &mut Vec::new())
    }

    /// Receives a descriptor sent with
    /// [`send_handle`](Connection::send_handle) (Python's
    /// `multiprocessing.reduction.recv_handle`).
    ///
    /// # Errors
    ///
    /// As [`recv`](Connection::recv); [`RecvError::Failed`] with
    /// [`Error::Decode`] if the message is not a descriptor.
    pub fn recv_handle(&mut self) -> Result<OwnedFd, RecvError> {
        self.recv_as::<Descriptor>(None)
            .map(Descriptor::into_owned_fd)
            .map_err(RecvError::from)
    }

    /// Like [`recv_handle`](Connection::recv_handle), waiting at most
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// As [`recv_handle`](Connection::recv_handle), plus
    /// [`RecvTimeoutError::Timeout`].
    pub fn recv_handle_timeout(&mut self, timeout: Duration) -> Result<OwnedFd, RecvTimeoutError> {
        self.recv_as::<Descriptor>(Some(timeout))
            .map(Descriptor::into_owned_fd)
            .map_err(RecvTimeoutError::from)
    }

    /// Encodes `value` (refusing handles on a TCP connection) and sends it
    /// as one message tagged `tag`.
    fn send_as<U: Serialize + ?Sized>(&self, value: &U, tag: u32, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        buf.resize(link::HEADER, 0);
        let mut fds = Vec::new();
        if self.link.is_remote() {
            codec::encode_for(codec::Peer::Tcp, value, buf)?;
        } else {
            codec::encode(value, buf, &mut fds)?;
        }
        let result = self.link.send_framed(tag, buf, &fds);
        if buf.capacity() > 1 << 20 {
            *buf = Vec::new();
        }
        result
    }

    /// Receives one message and decodes it as a `U`.
    fn recv_as<U: DeserializeOwned>(&mut self, timeout: Option<Duration>) -> Result<U, Sorted> {
        self.fds.clear();
        let tag = self
            .link
            .recv_into(&mut self.bytes, &mut self.fds, timeout)
            .map_err(error::sort)?;
        let fds = std::mem::take(&mut self.fds);
        self.check_tag(tag)?;
        let value = codec::decode(&self.bytes, fds);
        if self.bytes.capacity() > 1 << 20 {
            self.bytes = Vec::new();
        }
        value.map_err(Sorted::Failed)
    }

    /// `true` if a message (or the end of the stream) can be read within
    /// `timeout` (`Duration::ZERO`: do not wait). Python's `poll`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if polling fails.
    pub fn poll(&self, timeout: Duration) -> Result<bool> {
        self.link.poll(Some(timeout))
    }

    /// Sets the largest message this end accepts (default 1 GiB); a larger
    /// one is an error for that message (a `Failed` receive with
    /// [`Error::MessageTooLarge`], once its bytes were skipped), not an
    /// allocation.
    pub fn set_max_message_size(&mut self, bytes: u64) {
        self.link.set_max_frame(bytes);
    }

    /// Closes this end (dropping it does the same). The other end's
    /// `recv` then reports `Disconnected` once every copy of this
    /// end, in every process, is closed.
    pub fn close(self) {}
}

impl<T: Serialize> Connection<T> {
    /// Sends `value` as one message; handles inside it travel with their
    /// descriptors.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if `value` cannot be encoded (nothing is sent);
    /// [`Error::Disconnected`] if the other end is closed; [`Error::Io`] if
    /// another sender died in the middle of a message on this end (see
    /// the [module docs](self)).
    pub fn send(&self, value: &T) -> Result<()> {
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => self.send_with(value, &mut buf),
            Err(_) => self.send_with(value, &mut Vec::new()),
        })
    }

    fn send_with(&self, value: &T, buf: &mut Vec<u8>) -> Result<()> {
        self.send_as(value, TAG_VALUE, buf)
    }
}

impl<T: DeserializeOwned> Connection<T> {
    /// Receives the next value, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`RecvError::Disconnected`] when the other end is closed (or its
    /// process died) and nothing is left to read; [`RecvError::Failed`]
    /// with [`Error::Decode`] if the message is not a `T`, or with
    /// [`Error::MessageTooLarge`] for a message over the limit (skipped).
    /// `?` turns either into a [`multiproc::Error`].
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Pipe;
    /// use multiproc::connection::RecvError;
    /// let (a, mut b) = Pipe::new::<u8>()?;
    /// a.send(&7)?;
    /// drop(a);
    /// assert_eq!(b.recv()?, 7);
    /// assert!(matches!(b.recv(), Err(RecvError::Disconnected)));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn recv(&mut self) -> Result<T, RecvError> {
        self.recv_inner(None).map_err(RecvError::from)
    }

    /// Like [`recv`](Connection::recv), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`RecvTimeoutError::Timeout`] if no whole message arrived in time
    /// (a part that did stays buffered); otherwise as
    /// [`recv`](Connection::recv).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use multiproc::Pipe;
    /// let (a, mut b) = Pipe::new::<u8>()?;
    /// assert!(b.recv_timeout(Duration::from_millis(10)).unwrap_err().is_timeout());
    /// a.send(&1)?;
    /// assert_eq!(b.recv_timeout(Duration::from_secs(1))?, 1);
    /// drop(a);
    /// assert!(b.recv_timeout(Duration::from_secs(1)).unwrap_err().is_disconnected());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        self.recv_inner(Some(timeout))
            .map_err(RecvTimeoutError::from)
    }

    /// The next value if one is ready now (Python's `poll()` then
    /// `recv()`).
    ///
    /// # Errors
    ///
    /// [`TryRecvError::Empty`] if no whole message is there; otherwise as
    /// [`recv`](Connection::recv).
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Pipe;
    /// use multiproc::connection::TryRecvError;
    /// let (a, mut b) = Pipe::new::<u8>()?;
    /// assert!(matches!(b.try_recv(), Err(TryRecvError::Empty)));
    /// a.send(&1)?;
    /// assert_eq!(b.try_recv()?, 1);
    /// drop(a);
    /// assert!(b.try_recv().unwrap_err().is_disconnected());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.recv_inner(Some(Duration::ZERO))
            .map_err(TryRecvError::from)
    }

    /// An iterator that waits for each message, as
    /// [`std::sync::mpsc::Receiver::iter`]: it ends once the other end is
    /// closed, in every process (or its process died), and every message
    /// sent before was read. A message that cannot be received
    /// ([`RecvError::Failed`]) ends it too; [`Iter::take_error`] tells
    /// which.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Pipe;
    /// let (tx, mut rx) = Pipe::new::<u32>()?;
    /// for i in 0..3 {
    ///     tx.send(&i)?;
    /// }
    /// drop(tx);
    /// let mut got = rx.iter();
    /// assert_eq!(got.by_ref().collect::<Vec<_>>(), [0, 1, 2]);
    /// assert!(got.take_error().is_none()); // ended by the disconnect
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn iter(&mut self) -> Iter<'_, T> {
        Iter {
            conn: self,
            error: None,
            done: false,
        }
    }

    /// An iterator over the messages that are there now, as
    /// [`std::sync::mpsc::Receiver::try_iter`]: it never waits, and ends at
    /// the first [`try_recv`](Connection::try_recv) that gives no value.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Pipe;
    /// let (tx, mut rx) = Pipe::new::<u32>()?;
    /// tx.send(&1)?;
    /// tx.send(&2)?;
    /// assert_eq!(rx.try_iter().collect::<Vec<_>>(), [1, 2]);
    /// assert_eq!(rx.try_iter().count(), 0); // nothing now; tx is still open
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_iter(&mut self) -> TryIter<'_, T> {
        TryIter {
            conn: self,
            error: None,
        }
    }

    fn recv_inner(&mut self, timeout: Option<Duration>) -> Result<T, Sorted> {
        self.recv_as(timeout)
    }
}

/// The blocking iterator of a [`Connection`] or [`Receiver`]: see
/// [`Connection::iter`].
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct Iter<'a, T> {
    conn: &'a mut Connection<T>,
    error: Option<Error>,
    done: bool,
}

/// The non-blocking iterator of a [`Connection`] or [`Receiver`]: see
/// [`Connection::try_iter`].
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct TryIter<'a, T> {
    conn: &'a mut Connection<T>,
    error: Option<Error>,
}

/// The owning blocking iterator of a [`Connection`] or [`Receiver`]
/// (`for x in rx`): as [`Connection::iter`].
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct IntoIter<T> {
    conn: Connection<T>,
    error: Option<Error>,
    done: bool,
}

/// The next value of a blocking iteration; `None` (for good) once the
/// peer is gone or a message failed, which is kept in `error`.
fn next_blocking<T: DeserializeOwned>(
    conn: &mut Connection<T>,
    error: &mut Option<Error>,
    done: &mut bool,
) -> Option<T> {
    if *done {
        return None;
    }
    match conn.recv() {
        Ok(v) => Some(v),
        Err(e) => {
            *done = true;
            *error = e.failure().cloned();
            None
        }
    }
}

crate::error::iter_take_error!(
    "The failure that ended the iteration, if a message that could not be received ended it rather than the end of the stream (or, for [`TryIter`], no message being ready).":
    Iter<'a>, TryIter<'a>, IntoIter
);

impl<T: DeserializeOwned> Iterator for Iter<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        next_blocking(self.conn, &mut self.error, &mut self.done)
    }
}

impl<T: DeserializeOwned> Iterator for IntoIter<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        next_blocking(&mut self.conn, &mut self.error, &mut self.done)
    }
}

/// Once it has returned `None`, it always does.
impl<T: DeserializeOwned> std::iter::FusedIterator for Iter<'_, T> {}

/// Once it has returned `None`, it always does.
impl<T: DeserializeOwned> std::iter::FusedIterator for IntoIter<T> {}

/// Unlike [`Iter`], a `TryIter` may be resumed: after `None`, a later
/// `next` looks again.
impl<T: DeserializeOwned> Iterator for TryIter<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self.conn.try_recv() {
            Ok(v) => Some(v),
            Err(e) => {
                self.error = e.failure().cloned();
                None
            }
        }
    }
}

impl<'a, T: DeserializeOwned> IntoIterator for &'a mut Connection<T> {
    type Item = T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T: DeserializeOwned> IntoIterator for Connection<T> {
    type Item = T;
    type IntoIter = IntoIter<T>;

    fn into_iter(self) -> IntoIter<T> {
        IntoIter {
            conn: self,
            error: None,
            done: false,
        }
    }
}

/// The descriptor that is readable when a message (or the end of stream)
/// is there. Bytes already read into the connection's buffer do not show
/// on it: use [`poll`](Connection::poll) or [`wait`], which know.
impl<T> AsFd for Connection<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.link.read_fd()
    }
}

/// An end travels as its descriptors: the pipe it reads (slot 0), the pipe
/// it writes (1), the side socket (2), and the send lock that every copy of
/// a sending end shares (3, a memfd). Duplex ends, receiving ends and
/// sending ends are three kinds; each has the pipes of its kind (a
/// [`Receiver`] has no write pipe and no lock, a [`Sender`] no read pipe).
impl<T> Connection<T> {
    fn wire_parts(&self) -> Result<Parts<'_, ()>> {
        if self.link.has_buffered_data() {
            return Err(Error::misuse(
                "a connection with received but unread data cannot move to another process: \
                 receive the rest first",
            ));
        }
        let lock = self.link.lock_fd()?;
        let (rx, tx, side) = self.link.fds();
        Ok(Parts {
            plain: (),
            fds: [rx, tx, Some(side), lock.map(|(fd, _)| fd)],
            size: lock.map_or(0, |(_, len)| len),
            place: crate::sys::arena::Place::OWN,
            arena: None,
        })
    }

    /// The lock's size for an end that can send (`tx`), none otherwise.
    fn wire_size(tx: bool) -> usize {
        if tx { send_lock::BYTES } else { 0 }
    }

    fn rebuild_wire(fds: &mut Received, rx: bool, tx: bool) -> Result<Connection<T>> {
        let rx = if rx { Some(fds.fd(0)?) } else { None };
        let (tx, lock) = if tx {
            (Some(fds.fd(1)?), Some(fds.mapping(3)?))
        } else {
            (None, None)
        };
        let link = Link::from_fds(rx, tx, fds.fd(2)?, lock)?;
        Ok(Connection::from_link(link))
    }
}

/// What carries a [`Connection`]'s messages: the plain field of its wire
/// form.
const VIA_PIPES: u8 = 0;
/// One Unix socket (slot 2), from a [`Listener`] or a [`Client`].
const VIA_UNIX_SOCKET: u8 = 1;
/// One TCP socket (slot 2).
const VIA_TCP_SOCKET: u8 = 2;

/// A duplex end is its pipes and side socket, or (from a [`Listener`] or a
/// [`Client`]) one socket in slot 2; either way with its send lock in
/// slot 3.
impl<T> HandleWire for Connection<T> {
    const KIND: Kind = Kind::Connection;
    type Elem = T;
    type Plain = u8;

    fn parts(&self) -> Result<Parts<'_, u8>> {
        let parts = self.wire_parts()?;
        let via = match (self.link.is_socket(), self.link.is_remote()) {
            (false, _) => VIA_PIPES,
            (true, false) => VIA_UNIX_SOCKET,
            (true, true) => VIA_TCP_SOCKET,
        };
        Ok(Parts {
            plain: via,
            fds: parts.fds,
            size: parts.size,
            place: parts.place,
            arena: parts.arena,
        })
    }

    fn mapping_size(via: &u8) -> Result<usize> {
        match *via {
            VIA_PIPES | VIA_UNIX_SOCKET | VIA_TCP_SOCKET => Ok(send_lock::BYTES),
            other => Err(crate::handle::decode(format!(
                "a Connection of an unknown kind ({other})"
            ))),
        }
    }

    fn rebuild(via: u8, fds: &mut Received) -> Result<Self> {
        if via == VIA_PIPES {
            return Self::rebuild_wire(fds, true, true);
        }
        let link = Link::socket_from_fds(fds.fd(2)?, fds.mapping(3)?, via == VIA_TCP_SOCKET)?;
        Ok(Connection::from_link(link))
    }
}

handle_serde!([T] Connection<T>);

/// The receiving end of [`Pipe::simplex`].
pub struct Receiver<T> {
    conn: Connection<T>,
}

/// The sending end of [`Pipe::simplex`].
pub struct Sender<T> {
    conn: Connection<T>,
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("fds", &self.conn.link.fds())
            .finish()
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("fds", &self.conn.link.fds())
            .finish()
    }
}

impl<T: DeserializeOwned> Receiver<T> {
    /// Receives the next value. See [`Connection::recv`].
    ///
    /// # Errors
    ///
    /// [`RecvError::Disconnected`] once every copy of the sender is gone
    /// and nothing is left; [`RecvError::Failed`] as for
    /// [`Connection::recv`].
    pub fn recv(&mut self) -> Result<T, RecvError> {
        self.conn.recv()
    }

    /// Receives, waiting at most `timeout`. See [`Connection::recv_timeout`].
    ///
    /// # Errors
    ///
    /// [`RecvTimeoutError::Timeout`], or as [`recv`](Receiver::recv).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        self.conn.recv_timeout(timeout)
    }

    /// The next value if one is ready now. See [`Connection::try_recv`].
    ///
    /// # Errors
    ///
    /// [`TryRecvError::Empty`], or as [`recv`](Receiver::recv).
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.conn.try_recv()
    }

    /// Waits for each message until every copy of the sender is closed.
    /// See [`Connection::iter`].
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Pipe;
    /// let (mut rx, tx) = Pipe::simplex::<String>()?;
    /// tx.send(&"a".to_string())?;
    /// tx.close();
    /// for s in &mut rx {
    ///     assert_eq!(s, "a");
    /// }
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn iter(&mut self) -> Iter<'_, T> {
        self.conn.iter()
    }

    /// The messages that are there now. See [`Connection::try_iter`].
    pub fn try_iter(&mut self) -> TryIter<'_, T> {
        self.conn.try_iter()
    }
}

impl<'a, T: DeserializeOwned> IntoIterator for &'a mut Receiver<T> {
    type Item = T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T: DeserializeOwned> IntoIterator for Receiver<T> {
    type Item = T;
    type IntoIter = IntoIter<T>;

    fn into_iter(self) -> IntoIter<T> {
        self.conn.into_iter()
    }
}

impl<T> Receiver<T> {
    /// Receives one message as raw bytes. See [`Connection::recv_bytes`].
    ///
    /// # Errors
    ///
    /// As [`Connection::recv_bytes`].
    pub fn recv_bytes(&mut self) -> Result<Vec<u8>, RecvError> {
        self.conn.recv_bytes()
    }

    /// Receives raw bytes, waiting at most `timeout`. See
    /// [`Connection::recv_bytes_timeout`].
    ///
    /// # Errors
    ///
    /// As [`Connection::recv_bytes_timeout`].
    pub fn recv_bytes_timeout(&mut self, timeout: Duration) -> Result<Vec<u8>, RecvTimeoutError> {
        self.conn.recv_bytes_timeout(timeout)
    }

    /// `true` if a message can be read within `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if polling fails.
    pub fn poll(&self, timeout: Duration) -> Result<bool> {
        self.conn.poll(timeout)
    }

    /// Sets the largest message accepted. See
    /// [`Connection::set_max_message_size`].
    pub fn set_max_message_size(&mut self, bytes: u64) {
        self.conn.set_max_message_size(bytes);
    }

    /// Receives a descriptor. See [`Connection::recv_handle`].
    ///
    /// # Errors
    ///
    /// As [`Connection::recv_handle`].
    pub fn recv_handle(&mut self) -> Result<OwnedFd, RecvError> {
        self.conn.recv_handle()
    }

    /// Receives a descriptor, waiting at most `timeout`. See
    /// [`Connection::recv_handle_timeout`].
    ///
    /// # Errors
    ///
    /// As [`Connection::recv_handle_timeout`].
    pub fn recv_handle_timeout(&mut self, timeout: Duration) -> Result<OwnedFd, RecvTimeoutError> {
        self.conn.recv_handle_timeout(timeout)
    }

    /// Closes this end.
    pub fn close(self) {}
}

impl<T: Serialize> Sender<T> {
    /// Sends `value`. See [`Connection::send`].
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] or [`Error::Disconnected`].
    pub fn send(&self, value: &T) -> Result<()> {
        self.conn.send(value)
    }
}

impl<T> Sender<T> {
    /// Sends raw bytes. See [`Connection::send_bytes`].
    ///
    /// # Errors
    ///
    /// [`Error::Disconnected`] if the receiver is gone.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<()> {
        self.conn.send_bytes(bytes)
    }

    /// Sends a duplicate of the descriptor `fd`. See
    /// [`Connection::send_handle`].
    ///
    /// # Errors
    ///
    /// As [`Connection::send_handle`].
    pub fn send_handle(&self, fd: impl AsFd) -> Result<()> {
        self.conn.send_handle(fd)
    }

    /// Closes this end; the receiver then sees
    /// [`RecvError::Disconnected`] (once every copy of this end is closed).
    pub fn close(self) {}
}

impl<T> AsFd for Receiver<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}

/// The pipe this end writes to.
impl<T> AsFd for Sender<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.link.write_fd()
    }
}

impl<T> HandleWire for Receiver<T> {
    const KIND: Kind = Kind::Receiver;
    type Elem = T;
    type Plain = ();

    fn parts(&self) -> Result<Parts<'_, ()>> {
        self.conn.wire_parts()
    }

    fn mapping_size((): &()) -> Result<usize> {
        Ok(Connection::<T>::wire_size(false))
    }

    fn rebuild((): (), fds: &mut Received) -> Result<Self> {
        Ok(Receiver {
            conn: Connection::rebuild_wire(fds, true, false)?,
        })
    }
}

handle_serde!([T] Receiver<T>);

impl<T> HandleWire for Sender<T> {
    const KIND: Kind = Kind::Sender;
    type Elem = T;
    type Plain = ();

    fn parts(&self) -> Result<Parts<'_, ()>> {
        self.conn.wire_parts()
    }

    fn mapping_size((): &()) -> Result<usize> {
        Ok(Connection::<T>::wire_size(true))
    }

    fn rebuild((): (), fds: &mut Received) -> Result<Self> {
        Ok(Sender {
            conn: Connection::rebuild_wire(fds, false, true)?,
        })
    }
}

handle_serde!([T] Sender<T>);

/// Something [`wait`] can wait on: Python's "object with a `fileno()`".
///
/// Implemented by [`Connection`], [`Receiver`], [`Sender`] (readable: the
/// receiver is gone), [`Process`](crate::Process) (its sentinel: ready
/// once the process has ended) and [`JoinHandle`](crate::JoinHandle).
/// Implement it for your own descriptors (a socket, an eventfd, a
/// `std::process::Child`'s pidfd...).
///
/// A [`Queue`](crate::Queue) is not `Waitable`: its fast path lives in
/// shared memory and wakes sleepers with a futex, so no descriptor becomes
/// readable when an item arrives. To wait on a queue and connections
/// together, let a process forward the queue's items into a [`Pipe`], or
/// use a Pipe where you need `wait`.
pub trait Waitable {
    /// The descriptor that becomes readable (or hangs up) when this object
    /// is ready.
    ///
    /// # Errors
    ///
    /// When the object cannot be waited on (a process not yet started:
    /// [`Error::NotStarted`]).
    fn wait_fd(&self) -> Result<BorrowedFd<'_>>;

    /// `true` when the object is ready without its descriptor showing it
    /// (a message already read into a buffer). The default says `false`.
    fn ready_now(&self) -> bool {
        false
    }
}

impl<T> Waitable for Connection<T> {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.link.read_fd())
    }

    fn ready_now(&self) -> bool {
        self.link.ready_now()
    }
}

impl<T> Waitable for Receiver<T> {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        self.conn.wait_fd()
    }

    fn ready_now(&self) -> bool {
        self.conn.ready_now()
    }
}

/// Ready when the receiving end is gone (a send would fail).
impl<T> Waitable for Sender<T> {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.conn.link.write_fd())
    }
}

impl<W: Waitable + ?Sized> Waitable for &W {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        (**self).wait_fd()
    }

    fn ready_now(&self) -> bool {
        (**self).ready_now()
    }
}

/// Waits until at least one of `objects` is ready, or `timeout` passes
/// (`None`: no limit), and returns the indices of the ready ones in
/// ascending order (empty on timeout). Python's
/// `multiprocessing.connection.wait`, with indices instead of the objects
/// so that the caller keeps its own (mutable) handles.
///
/// Ready means: a connection or receiver has a message to read, or its
/// peer is gone (`recv` then reports [`RecvError::Disconnected`] instead of
/// blocking); a process has ended (join returns at once); a sender's
/// receiver is gone.
///
/// # Errors
///
/// [`Error::NotStarted`] for a process not yet started;
/// [`Error::InvalidArgument`] for no objects and no timeout; [`Error::Io`]
/// if polling fails.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use multiproc::{connection::wait, Pipe};
/// let (a, mut b) = Pipe::new::<u8>()?;
/// let (c, d) = Pipe::new::<u8>()?;
/// assert!(wait(&[&b, &d], Some(Duration::ZERO))?.is_empty());
/// a.send(&1)?;
/// assert_eq!(wait(&[&b, &d], None)?, vec![0]);
/// assert_eq!(b.recv()?, 1);
/// # drop(c);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub fn wait(objects: &[&dyn Waitable], timeout: Option<Duration>) -> Result<Vec<usize>> {
    let mut fds = Vec::with_capacity(objects.len());
    for object in objects {
        fds.push((object.wait_fd()?, PollFlags::POLLIN));
    }
    let buffered: Vec<usize> = (0..objects.len())
        .filter(|&i| objects[i].ready_now())
        .collect();
    // Something is ready already: report it with whatever else is ready
    // now, without waiting.
    let timeout = if buffered.is_empty() {
        timeout
    } else {
        Some(Duration::ZERO)
    };
    if fds.is_empty() {
        return match timeout {
            Some(t) => {
                std::thread::sleep(t);
                Ok(Vec::new())
            }
            None => Err(Error::invalid(
                "wait on no objects and no timeout would never return",
            )),
        };
    }
    let revents = sys::poll_many(&fds, timeout)?;
    Ok((0..objects.len())
        .filter(|&i| objects[i].ready_now() || !revents[i].is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplex_both_ways_and_bytes() {
        let (mut a, mut b) = Pipe::new::<(u32, String)>().expect("pipe");
        a.send(&(1, "x".into())).expect("send");
        b.send(&(2, "y".into())).expect("send");
        assert_eq!(b.recv().expect("recv"), (1, "x".to_string()));
        assert_eq!(a.recv().expect("recv"), (2, "y".to_string()));
        a.send_bytes(b"raw").expect("bytes");
        assert_eq!(b.recv_bytes().expect("recv bytes"), b"raw");
        assert!(!b.poll(Duration::ZERO).expect("poll"));
        assert!(b.try_recv().expect_err("try").is_empty());
    }

    #[test]
    fn wait_and_poll_see_a_message_already_buffered() {
        let (a, mut b) = Pipe::new::<u8>().expect("pipe");
        a.send(&1).expect("send");
        a.send(&2).expect("send");
        assert_eq!(b.recv().expect("recv"), 1);
        // One read took both messages: the pipe itself is empty now.
        let ev = sys::poll_one(b.as_fd(), PollFlags::POLLIN, Some(Duration::ZERO)).expect("poll");
        assert!(ev.is_empty());
        assert_eq!(wait(&[&b], Some(Duration::ZERO)).expect("wait"), vec![0]);
        assert!(b.poll(Duration::ZERO).expect("poll"));
        assert_eq!(b.recv().expect("recv"), 2);
        assert!(wait(&[&b], Some(Duration::ZERO)).expect("wait").is_empty());
        assert!(wait(&[], None).is_err());
    }

    #[test]
    fn handles_of_any_descriptor_travel_on_every_kind_of_end() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let (mut rx, tx) = Pipe::simplex::<u8>().expect("pipe");
        let (mut mine, theirs) = UnixStream::pair().expect("pair");
        tx.send_handle(&theirs).expect("send handle");
        drop(theirs);
        let mut got = UnixStream::from(rx.recv_handle_timeout(Duration::from_secs(5)).expect("fd"));
        mine.write_all(b"ok").expect("write");
        let mut buf = [0u8; 2];
        got.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ok");
        // A message that is no descriptor is a decode error, not a handle.
        tx.send(&7).expect("send");
        let err = rx.recv_handle().expect_err("not a descriptor");
        assert!(
            matches!(err.failure(), Some(Error::Decode { .. })),
            "{err:?}"
        );
        // The wire form of a Descriptor is what recv of one takes.
        let (a, mut b) = Pipe::new::<Descriptor>().expect("pipe");
        a.send_handle(std::io::stdout()).expect("send handle");
        let d = b.recv().expect("a Descriptor");
        assert!(d.into_owned_fd().try_clone().is_ok());
    }

    #[test]
    fn connection_travels_through_a_connection() {
        let (a, mut b) = Pipe::new::<Connection<u64>>().expect("pipe");
        let (x, mut y) = Pipe::new::<u64>().expect("pipe");
        a.send(&x).expect("send conn");
        drop(x);
        let x2 = b.recv().expect("recv conn");
        x2.send(&99).expect("send");
        assert_eq!(y.recv().expect("recv"), 99);
        drop(x2);
        assert!(
            y.recv_timeout(Duration::from_secs(5))
                .expect_err("eof")
                .is_disconnected()
        );
    }
}
