//! Connections between programs, and between machines: Python's
//! `multiprocessing.connection.Listener` and `Client`.
//!
//! A [`Listener`] listens on an [`Address`]: a Unix socket path, a name in
//! Linux's abstract Unix namespace, or a TCP address. Each
//! [`accept`](Listener::accept) gives a [`Connection<T>`] that works as a
//! Pipe end does (`send`, `recv`, `recv_timeout`, `poll`, `send_bytes`,
//! `recv_bytes`, [`wait`](super::wait)); [`Client::connect`] gives the
//! other end. Any program can be either side: the two need not be parent
//! and child, nor run the same executable, as long as they agree on the
//! message type `T` (bincode, as everywhere in multiproc).
//!
//! # Authentication
//!
//! With an authkey (`Some(key)` on both sides), each side proves that it
//! knows the key before the connection is handed out, by CPython's
//! challenge–response (`deliver_challenge` / `answer_challenge`), with
//! HMAC-SHA256 where CPython 3.11 uses HMAC-MD5 (see `connection/auth.rs`
//! for the messages). A key mismatch is [`Error::AuthenticationError`] on
//! both sides; nothing an unauthenticated peer sends reaches the
//! connection's decoder. [`process::authkey`](crate::process::authkey) is
//! the key every process of this program shares (random in the main
//! process, inherited by children), as CPython's
//! `current_process().authkey`.
//!
//! Without an authkey anyone who can reach the address can connect and
//! send: then a message still never makes this side allocate more than
//! what actually arrived, but what it decodes to is whatever the peer
//! chose. Use a key for anything reachable from another user or machine.
//! The bytes are not encrypted: use an encrypted tunnel (SSH, WireGuard)
//! between machines whose network you do not trust.
//!
//! # Deadlines
//!
//! - [`accept`](Listener::accept) waits for a peer as long as it takes,
//!   like std's `TcpListener::accept`; [`accept_timeout`](Listener::accept_timeout)
//!   gives up with [`Error::Timeout`].
//! - The handshake (with an authkey) has a deadline of its own,
//!   [`DEFAULT_HANDSHAKE_TIMEOUT`] unless
//!   [`set_handshake_timeout`](Listener::set_handshake_timeout) says
//!   otherwise: a peer that stays silent or stops half-way makes `accept`
//!   return [`Error::Timeout`] by then, and one that sends what is no
//!   handshake (random bytes, a huge length, another message) an
//!   [`Error::AuthenticationError`] at once. The listener serves on.
//!   Accepting is one peer at a time: while a peer stalls its handshake,
//!   the next waits (up to the deadline).
//! - [`Client::connect`] waits for the TCP connection as long as the
//!   kernel does (its SYN retries, about two minutes) and then for the
//!   handshake up to [`DEFAULT_HANDSHAKE_TIMEOUT`];
//!   [`Client::connect_timeout`] bounds both together.
//!
//! # Between machines
//!
//! A TCP connection's peer may be on another host, where a Queue, Lock,
//! Value, shared memory, a Pipe end or a [`Descriptor`](super::Descriptor)
//! of this machine mean nothing: sending a message that holds one is an
//! [`Error::Encode`] that names it, and nothing is sent. A Unix socket
//! connection (same machine) carries handles as a Pipe does.
//!
//! A connection from a listener or a client is a handle like a Pipe end:
//! pass it to a child process (a worker that serves an accepted peer) or
//! send it through a Queue or Pipe; copies share one send lock.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{self as unix, UnixListener};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

use super::auth::{self, Side};
use super::link::Link;
use super::{Connection, Waitable};
use crate::error::{Error, Result};
use crate::sys;
use crate::wire::{self, Channel};

/// How long a handshake may take unless
/// [`Listener::set_handshake_timeout`] or [`Client::connect_timeout`] say
/// otherwise: 10 seconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a [`Listener`] listens and a [`Client`] connects (Python's
/// address families `AF_UNIX` and `AF_INET`).
///
/// `"127.0.0.1:6000".parse()` is a TCP address, `"@name"` an abstract
/// Unix name, anything else a Unix socket path;
/// [`Address::tcp`] resolves a host name. An address is plain data: pass
/// it to a child process or send it in a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Address {
    /// A TCP address: the peer may be on another machine.
    Tcp(SocketAddr),
    /// A Unix socket at a path in the file system (the listener creates
    /// it, and removes it when dropped).
    Unix(PathBuf),
    /// A name in Linux's abstract Unix namespace (Python's `'\0name'`): no
    /// file, gone when the listener is.
    Abstract(Vec<u8>),
    /// A Unix peer that bound no name (what
    /// [`last_accepted`](Listener::last_accepted) says of most clients).
    Unnamed,
}

impl Address {
    /// The first address `addr` resolves to (`"localhost:6000"`,
    /// `("example.org", 6000)`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if it resolves to none; [`Error::Io`]
    /// if resolving fails.
    pub fn tcp(addr: impl ToSocketAddrs) -> Result<Address> {
        addr.to_socket_addrs()
            .map_err(|e| Error::io("could not resolve the address", e))?
            .next()
            .map(Address::Tcp)
            .ok_or_else(|| Error::invalid("the address resolves to no socket address"))
    }

    /// A name in the abstract Unix namespace.
    pub fn abstract_name(name: impl Into<Vec<u8>>) -> Address {
        Address::Abstract(name.into())
    }

    /// `true` for a TCP address (whose peer may be on another machine).
    pub fn is_tcp(&self) -> bool {
        matches!(self, Address::Tcp(_))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
            Address::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            Address::Unnamed => f.write_str("(unnamed)"),
        }
    }
}

impl FromStr for Address {
    type Err = Error;

    /// `ip:port` is TCP, `@name` abstract, anything else a path.
    fn from_str(s: &str) -> Result<Address> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Address::Tcp(addr));
        }
        if let Some(name) = s.strip_prefix('@') {
            return Ok(Address::abstract_name(name));
        }
        if s.is_empty() {
            return Err(Error::invalid("an empty address"));
        }
        Ok(Address::Unix(PathBuf::from(s)))
    }
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Address {
        Address::Tcp(addr)
    }
}

impl From<PathBuf> for Address {
    fn from(path: PathBuf) -> Address {
        Address::Unix(path)
    }
}

impl From<&Path> for Address {
    fn from(path: &Path) -> Address {
        Address::Unix(path.to_path_buf())
    }
}

impl From<&Address> for Address {
    fn from(addr: &Address) -> Address {
        addr.clone()
    }
}

fn unix_addr(addr: &unix::SocketAddr) -> Address {
    if let Some(path) = addr.as_pathname() {
        return Address::Unix(path.to_path_buf());
    }
    match addr.as_abstract_name() {
        Some(name) => Address::Abstract(name.to_vec()),
        None => Address::Unnamed,
    }
}

#[derive(Debug)]
enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A socket that accepts connections: Python's
/// `multiprocessing.connection.Listener`. See the [module docs](super).
///
/// Dropping it stops listening; a Unix socket file it created is removed
/// (if it is still the one it created).
///
/// # Examples
///
/// ```
/// use multiproc::connection::{Client, Connection, Listener};
///
/// let key = multiproc::process::authkey()?;
/// let mut listener = Listener::bind("127.0.0.1:0".parse::<multiproc::connection::Address>()?, Some(&key))?;
/// let addr = listener.address().clone();
/// let client = std::thread::spawn(move || -> multiproc::Result<String> {
///     let mut conn: Connection<String> = Client::connect(&addr, Some(&key))?;
///     conn.send(&"ping".to_string())?;
///     Ok(conn.recv()?)
/// });
/// let mut conn: Connection<String> = listener.accept()?;
/// assert_eq!(conn.recv()?, "ping");
/// conn.send(&"pong".to_string())?;
/// assert_eq!(client.join().expect("client")?, "pong");
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    address: Address,
    authkey: Option<Arc<[u8]>>,
    handshake_timeout: Duration,
    last_accepted: Option<Address>,
    /// The socket file this listener created, with its device and inode.
    created: Option<(PathBuf, u64, u64)>,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Listener {
    /// Listens on `address` (Python's `Listener(address, authkey=...)`).
    /// With `authkey`, every peer must prove it knows the key (see the
    /// [module docs](super)); a TCP port 0 takes a free port, which
    /// [`address`](Listener::address) tells.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the address cannot be bound (in use, no
    /// permission, a path that exists already);
    /// [`Error::InvalidArgument`] for [`Address::Unnamed`] or an empty
    /// authkey.
    pub fn bind(address: impl Into<Address>, authkey: Option<&[u8]>) -> Result<Listener> {
        let address = address.into();
        let authkey = check_key(authkey)?;
        let bind_err = |e| Error::io("could not listen on the address", e);
        let (socket, address, created) = match address {
            Address::Tcp(addr) => {
                let socket = TcpListener::bind(addr).map_err(bind_err)?;
                let local = socket.local_addr().map_err(bind_err)?;
                (Socket::Tcp(socket), Address::Tcp(local), None)
            }
            Address::Unix(path) => {
                let socket = UnixListener::bind(&path).map_err(bind_err)?;
                let created = file_id(&path).map(|(dev, ino)| (path.clone(), dev, ino));
                (Socket::Unix(socket), Address::Unix(path), created)
            }
            Address::Abstract(name) => {
                let addr = unix::SocketAddr::from_abstract_name(&name).map_err(bind_err)?;
                let socket = UnixListener::bind_addr(&addr).map_err(bind_err)?;
                (Socket::Unix(socket), Address::Abstract(name), None)
            }
            Address::Unnamed => {
                return Err(Error::invalid(
                    "a listener needs an address to listen on, not an unnamed one",
                ));
            }
        };
        let listener = Listener {
            socket,
            address,
            authkey,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            last_accepted: None,
            created,
        };
        // Accepting waits in poll (with or without a deadline), then takes
        // the connection without blocking: a peer that gave up in between
        // never blocks the call.
        match &listener.socket {
            Socket::Tcp(s) => s.set_nonblocking(true),
            Socket::Unix(s) => s.set_nonblocking(true),
        }
        .map_err(|e| Error::io("could not set up the listening socket", e))?;
        Ok(listener)
    }

    /// The address it listens on (with the port the kernel chose for a TCP
    /// port 0).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The address of the peer of the last connection accepted (Python's
    /// `last_accepted`): a TCP peer's address, a Unix peer's name or
    /// [`Address::Unnamed`]. `None` before the first. Set as soon as a
    /// peer is taken, also when its handshake then fails.
    pub fn last_accepted(&self) -> Option<&Address> {
        self.last_accepted.as_ref()
    }

    /// Sets how long the handshake of each accepted peer may take (with an
    /// authkey); [`DEFAULT_HANDSHAKE_TIMEOUT`] until then.
    pub fn set_handshake_timeout(&mut self, timeout: Duration) {
        self.handshake_timeout = timeout;
    }

    /// Waits for a peer, as long as it takes (like std's
    /// `TcpListener::accept`), and returns the connection once the peer
    /// has passed the handshake (with an authkey; the handshake has its
    /// own deadline, see the [module docs](super)).
    ///
    /// # Errors
    ///
    /// [`Error::AuthenticationError`] if the peer did not prove that it
    /// knows the authkey (it was told, and is disconnected);
    /// [`Error::Timeout`] if it did not finish the handshake in time;
    /// [`Error::Disconnected`] if it left during it; [`Error::Io`] if the
    /// OS refuses. The listener stays usable after any of them.
    pub fn accept<T>(&mut self) -> Result<Connection<T>> {
        self.accept_by(None)
    }

    /// Like [`accept`](Listener::accept), giving up with
    /// [`Error::Timeout`] if no peer connects within `timeout` (the
    /// handshake then has its own deadline).
    ///
    /// # Errors
    ///
    /// As [`accept`](Listener::accept), plus [`Error::Timeout`].
    pub fn accept_timeout<T>(&mut self, timeout: Duration) -> Result<Connection<T>> {
        self.accept_by(wire::deadline(Some(timeout)))
    }

    fn accept_by<T>(&mut self, deadline: Option<Instant>) -> Result<Connection<T>> {
        let (fd, peer, remote) = loop {
            let left = wire::remaining(deadline);
            let ev = sys::poll_one(self.socket_fd(), PollFlags::POLLIN, left)
                .map_err(|e| Error::io("could not wait for a connection", e))?;
            if ev.is_empty() {
                return Err(Error::Timeout);
            }
            match self.take() {
                Ok(taken) => break taken,
                // The peer gave up in between, or a signal came.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(Error::io("could not accept a connection", e)),
            }
        };
        self.last_accepted = Some(peer);
        let channel = Channel::new(fd);
        if let Some(key) = &self.authkey {
            let deadline = wire::deadline(Some(self.handshake_timeout));
            auth::handshake(&channel, key, Side::Accepting, deadline)?;
        }
        Ok(Connection::from_link(Link::socket(channel, remote)))
    }

    /// Takes one pending connection: its socket, its peer, and whether it
    /// is TCP.
    fn take(&self) -> io::Result<(OwnedFd, Address, bool)> {
        match &self.socket {
            Socket::Tcp(s) => {
                let (stream, peer) = s.accept()?;
                // Request and reply are small: do not wait to fill packets.
                stream.set_nodelay(true)?;
                Ok((stream.into(), Address::Tcp(peer), true))
            }
            Socket::Unix(s) => {
                let (stream, peer) = s.accept()?;
                Ok((stream.into(), unix_addr(&peer), false))
            }
        }
    }

    fn socket_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }

    /// Stops listening (dropping it does the same).
    pub fn close(self) {}
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.created {
            // Only the file this listener made: not one that replaced it.
            if file_id(path) == Some((*dev, *ino)) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The listening socket: readable when a peer is waiting to be accepted.
impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket_fd()
    }
}

/// Ready when a peer is waiting: [`accept`](Listener::accept) then takes
/// it at once (its handshake may still take time).
impl Waitable for Listener {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.socket_fd())
    }
}

fn check_key(authkey: Option<&[u8]>) -> Result<Option<Arc<[u8]>>> {
    match authkey {
        Some([]) => Err(Error::invalid(
            "an empty authkey proves nothing: pass None for no authentication",
        )),
        Some(key) => Ok(Some(Arc::from(key))),
        None => Ok(None),
    }
}

/// Connects to a [`Listener`]: Python's
/// `multiprocessing.connection.Client`. See the [module docs](super).
#[derive(Debug, Clone, Copy)]
pub struct Client(());

impl Client {
    /// Connects to the listener at `address` (Python's
    /// `Client(address, authkey=...)`) and, with `authkey`, runs the
    /// handshake (within [`DEFAULT_HANDSHAKE_TIMEOUT`]). A TCP connect
    /// waits as long as the kernel does; see
    /// [`connect_timeout`](Client::connect_timeout).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if nothing listens there (connection refused, no such
    /// file); [`Error::AuthenticationError`] if the keys differ, or if this
    /// side has a key and the listener has none and sends a message
    /// instead of a challenge; [`Error::Timeout`] if the handshake did not
    /// end in time (a keyless listener that sends nothing leaves it to run
    /// out). Without a key here, a keyed listener's challenge reaches no
    /// decoder: the first receive is an [`Error::AuthenticationError`].
    /// [`Error::InvalidArgument`] for [`Address::Unnamed`] or an empty
    /// authkey.
    pub fn connect<T>(
        address: impl Into<Address>,
        authkey: Option<&[u8]>,
    ) -> Result<Connection<T>> {
        connect(&address.into(), authkey, None)
    }

    /// Like [`connect`](Client::connect), with one deadline for the
    /// connect and the handshake together.
    ///
    /// # Errors
    ///
    /// As [`connect`](Client::connect); [`Error::Timeout`] when `timeout`
    /// passes first.
    pub fn connect_timeout<T>(
        address: impl Into<Address>,
        authkey: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Connection<T>> {
        connect(&address.into(), authkey, Some(timeout))
    }
}

fn connect<T>(
    address: &Address,
    authkey: Option<&[u8]>,
    timeout: Option<Duration>,
) -> Result<Connection<T>> {
    let authkey = check_key(authkey)?;
    let deadline = wire::deadline(timeout);
    let refused = |e: io::Error| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::Timeout,
        _ => Error::io("could not connect to the listener", e),
    };
    let (fd, remote): (OwnedFd, bool) = match address {
        Address::Tcp(addr) => {
            let stream = match timeout {
                None => TcpStream::connect(addr),
                Some(t) => TcpStream::connect_timeout(addr, t.max(Duration::from_millis(1))),
            }
            .map_err(refused)?;
            stream.set_nodelay(true).map_err(refused)?;
            (stream.into(), true)
        }
        Address::Unix(path) => (
            sys::ipc::unix_connect(path.as_os_str().as_encoded_bytes(), false, deadline)
                .map_err(refused)?,
            false,
        ),
        Address::Abstract(name) => (
            sys::ipc::unix_connect(name, true, deadline).map_err(refused)?,
            false,
        ),
        Address::Unnamed => {
            return Err(Error::invalid("cannot connect to an unnamed address"));
        }
    };
    let channel = Channel::new(fd);
    if let Some(key) = &authkey {
        let deadline = deadline.or_else(|| wire::deadline(Some(DEFAULT_HANDSHAKE_TIMEOUT)));
        auth::handshake(&channel, key, Side::Connecting, deadline)?;
    }
    Ok(Connection::from_link(Link::socket(channel, remote)))
}
