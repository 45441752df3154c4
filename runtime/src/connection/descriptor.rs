//! Any file descriptor as a handle that travels: Python's
//! `multiprocessing.reduction.send_handle` / `recv_handle`, typed.

use std::fs::File;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{self, AddressFamily, SockType, SockaddrLike, SockaddrStorage, sockopt};

use crate::error::{Error, Result};
use crate::handle::{HandleWire, Kind, Parts, Received, handle_serde};
use crate::sys::arena::Place;

/// An open file descriptor of any kind (a file, a socket, a pipe, a
/// memfd...) that travels like multiproc's own handles: put it in a
/// [`Queue`](crate::Queue), send it through a [`Connection`](super::Connection)
/// (or with [`send_handle`](super::Connection::send_handle)), pass it to a
/// [`Process`](crate::Process), and the receiver gets its own descriptor
/// for the same open file (SCM_RIGHTS: shared offset and flags, as after
/// `dup`). The sender keeps its own.
///
/// A descriptor only means something on its machine: sending one over a
/// TCP connection is an [`Error::Encode`] saying so.
///
/// # Examples
///
/// ```
/// use std::io::{Read, Write};
/// use std::os::unix::net::UnixStream;
/// use multiproc::Pipe;
/// use multiproc::connection::Descriptor;
///
/// let (a, mut b) = Pipe::new::<Descriptor>()?;
/// let (mut mine, theirs) = UnixStream::pair()?;
/// a.send(&Descriptor::from(theirs))?; // a duplicate travels
/// let mut got = b.recv()?.into_unix_stream()?;
/// mine.write_all(b"hi")?;
/// let mut buf = [0u8; 2];
/// got.read_exact(&mut buf)?;
/// assert_eq!(&buf, b"hi");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Descriptor(OwnedFd);

impl Descriptor {
    /// Wraps a descriptor this process owns.
    pub fn new(fd: impl Into<OwnedFd>) -> Descriptor {
        Descriptor(fd.into())
    }

    /// A duplicate of `fd` (the caller keeps its own).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the descriptor cannot be duplicated (the table is
    /// full).
    pub fn duplicate(fd: BorrowedFd<'_>) -> Result<Descriptor> {
        fd.try_clone_to_owned()
            .map(Descriptor)
            .map_err(|e| Error::io("could not duplicate a descriptor", e))
    }

    /// The descriptor.
    pub fn into_owned_fd(self) -> OwnedFd {
        self.0
    }

    /// The descriptor as a [`File`] (any kind of descriptor can be read
    /// and written as one).
    pub fn into_file(self) -> File {
        File::from(self.0)
    }

    /// The descriptor as a [`TcpStream`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless it is an IPv4 or IPv6 stream
    /// socket (the descriptor is closed).
    pub fn into_tcp_stream(self) -> Result<TcpStream> {
        self.expect_stream(&[AddressFamily::Inet, AddressFamily::Inet6], "a TCP socket")?;
        Ok(TcpStream::from(self.0))
    }

    /// The descriptor as a [`UnixStream`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless it is a Unix stream socket (it is
    /// closed).
    pub fn into_unix_stream(self) -> Result<UnixStream> {
        self.expect_stream(&[AddressFamily::Unix], "a Unix stream socket")?;
        Ok(UnixStream::from(self.0))
    }

    fn expect_stream(&self, families: &[AddressFamily], what: &str) -> Result<()> {
        let wrong = || Error::invalid(format!("the descriptor is not {what}"));
        let kind = socket::getsockopt(&self.0, sockopt::SockType).map_err(|_| wrong())?;
        let addr: SockaddrStorage =
            socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&self.0)).map_err(|_| wrong())?;
        let family = addr.family();
        if kind != SockType::Stream || !family.is_some_and(|f| families.contains(&f)) {
            return Err(wrong());
        }
        Ok(())
    }
}

impl AsFd for Descriptor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl From<OwnedFd> for Descriptor {
    fn from(fd: OwnedFd) -> Descriptor {
        Descriptor(fd)
    }
}

impl From<File> for Descriptor {
    fn from(file: File) -> Descriptor {
        Descriptor(file.into())
    }
}

impl From<TcpStream> for Descriptor {
    fn from(stream: TcpStream) -> Descriptor {
        Descriptor(stream.into())
    }
}

impl From<UnixStream> for Descriptor {
    fn from(stream: UnixStream) -> Descriptor {
        Descriptor(stream.into())
    }
}

impl From<Descriptor> for OwnedFd {
    fn from(d: Descriptor) -> OwnedFd {
        d.0
    }
}

/// One descriptor in slot 0, nothing else.
impl HandleWire for Descriptor {
    const KIND: Kind = Kind::Descriptor;
    type Elem = ();
    type Plain = ();

    fn parts(&self) -> Result<Parts<'_, ()>> {
        Ok(Parts {
            plain: (),
            fds: [Some(self.0.as_fd()), None, None, None],
            size: 0,
            place: Place::OWN,
            arena: None,
        })
    }

    fn mapping_size((): &()) -> Result<usize> {
        Ok(0)
    }

    fn rebuild((): (), fds: &mut Received) -> Result<Self> {
        Ok(Descriptor(fds.fd(0)?))
    }
}

handle_serde!([] Descriptor);
