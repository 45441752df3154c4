//! [`SharedMemory`]: blocks of bytes found by name.

use std::fmt;
use std::io::IoSlice;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, Backlog, Shutdown, SockFlag, SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec;
use crate::error::{Error, Result};
use crate::sys;
use crate::sys::shm::Mapping;

const MAX_NAME: usize = 64;

/// A block of shared bytes that other processes find by name: Python's
/// `multiprocessing.shared_memory.SharedMemory`.
///
/// # How names work (and why nothing is ever left behind)
///
/// The bytes live in a memfd: an anonymous file that exists while a
/// process maps it or holds its descriptor, so no crash can leave anything
/// in `/dev/shm`. The *name* is a Unix socket in Linux's abstract namespace
/// (`multiproc-shm/<uid>/<name>`, never a file), bound by the creating
/// process, where a small thread hands the memfd to [`open`](SharedMemory::open)
/// (to processes of the same user only, checked with `SO_PEERCRED`).
/// The name disappears on [`unlink`](SharedMemory::unlink) or when the
/// creating process exits, however it exits; the memory disappears when
/// the last process that mapped it unmaps it or dies. Unlike Python, a
/// name cannot outlive its creator (open it, or pass the handle, before
/// the creator ends), and dropping the creator's handle does not remove
/// the name (as in Python, call `unlink`).
///
/// # Access and aliasing
///
/// A `SharedMemory` derefs to `[u8]` (and mutably with `&mut`), bounds-checked
/// like any slice. Other processes, and other handles to the same name in
/// this one, may write those bytes at any time: coordinate writers with a
/// [`Lock`](crate::Lock), as in Python. For data shared with your own
/// threads or polled without a lock, use [`Value`](crate::Value),
/// [`Array`](crate::Array) or [`RawArray`](crate::shared::RawArray), whose
/// accesses are always well defined.
///
/// # Examples
///
/// ```no_run
/// use multiproc::shared::SharedMemory;
///
/// # fn main() -> multiproc::Result<()> {
/// let mut shm = SharedMemory::create("psm_demo", 1024)?;
/// shm[..5].copy_from_slice(b"hello");
/// // In another process of the same user:
/// let other = SharedMemory::open("psm_demo")?;
/// assert_eq!(&other[..5], b"hello");
/// shm.unlink()?;
/// # Ok(())
/// # }
/// ```
pub struct SharedMemory {
    map: Mapping,
    name: String,
    listener: Mutex<Option<Arc<OwnedFd>>>,
}

fn address(name: &str) -> Result<UnixAddr> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') || name.contains('/') {
        return Err(Error::invalid(format!(
            "shared memory name {name:?} must be 1 to {MAX_NAME} bytes without '/' or NUL"
        )));
    }
    let uid = nix::unistd::getuid();
    UnixAddr::new_abstract(format!("multiproc-shm/{uid}/{name}").as_bytes())
        .map_err(|e| Error::errno("shared memory name", e))
}

fn unix_socket() -> Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::errno("could not create a socket", e))
}

impl SharedMemory {
    /// Creates a zero-filled block of `size` bytes named `name`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the name is empty, longer than 64
    /// bytes, or holds `/` or NUL, or if `size` is 0, or if the name is
    /// already in use (Python's `FileExistsError`); [`Error::Io`] if the
    /// OS refuses.
    pub fn create(name: &str, size: usize) -> Result<SharedMemory> {
        if size == 0 {
            return Err(Error::invalid("shared memory size must be at least 1 byte"));
        }
        let addr = address(name)?;
        let map = Mapping::create(name, size)?;
        let listener = unix_socket()?;
        match socket::bind(listener.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(Errno::EADDRINUSE) => {
                return Err(Error::invalid(format!(
                    "shared memory named {name:?} already exists"
                )));
            }
            Err(e) => return Err(Error::errno("could not bind the shared memory name", e)),
        }
        let backlog = Backlog::new(64).map_err(|e| Error::errno("listen", e))?;
        socket::listen(&listener, backlog).map_err(|e| Error::errno("listen", e))?;
        let listener = Arc::new(listener);
        let memfd = map
            .fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("could not duplicate the shared memory descriptor", e))?;
        let serving = Arc::clone(&listener);
        std::thread::Builder::new()
            .name(format!("multiproc-shm-{name}"))
            .spawn(move || serve(&serving, &memfd))
            .map_err(|e| Error::io("could not start the shared memory name server", e))?;
        Ok(SharedMemory {
            map,
            name: name.to_string(),
            listener: Mutex::new(Some(listener)),
        })
    }

    /// Opens the block named `name`, created by a live process of this user.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if no block has that name (never created,
    /// unlinked, or its creator exited: Python's `FileNotFoundError`) or
    /// the name is malformed; [`Error::Io`] if the OS refuses.
    pub fn open(name: &str) -> Result<SharedMemory> {
        let addr = address(name)?;
        let conn = unix_socket()?;
        match socket::connect(conn.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(Errno::ECONNREFUSED | Errno::ENOENT) => {
                return Err(Error::invalid(format!("no shared memory named {name:?}")));
            }
            Err(e) => return Err(Error::errno("could not reach the shared memory name", e)),
        }
        let mut fds = Vec::new();
        let mut byte = [0u8; 1];
        sys::recv_with_fds(conn.as_fd(), &mut byte, &mut fds)
            .map_err(|e| Error::errno("could not receive the shared memory", e))?;
        let fd = fds
            .into_iter()
            .next()
            .ok_or_else(|| Error::invalid(format!("no shared memory named {name:?} (refused)")))?;
        Ok(SharedMemory {
            map: Mapping::from_fd(fd)?,
            name: name.to_string(),
            listener: Mutex::new(None),
        })
    }

    /// Removes the name: later [`open`](SharedMemory::open)s fail, handles
    /// already open keep working, and the memory is freed when the last is
    /// dropped. Only the creating handle holds the name; on other handles
    /// (and a second time) this does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the name server cannot be stopped.
    pub fn unlink(&self) -> Result<()> {
        let listener = match self.listener.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(listener) = listener {
            // Wakes the server's accept() with an error; the name is gone
            // once both it and this handle have closed the socket.
            match socket::shutdown(listener.as_raw_fd(), Shutdown::Both) {
                Ok(()) | Err(Errno::ENOTCONN) => {}
                Err(e) => {
                    return Err(Error::errno(
                        "could not stop the shared memory name server",
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The size in bytes.
    pub fn size(&self) -> usize {
        self.map.len()
    }
}

/// The name server: hands the memfd to each connecting process of our uid.
fn serve(listener: &OwnedFd, memfd: &OwnedFd) {
    let uid = nix::unistd::getuid().as_raw();
    loop {
        let conn = match socket::accept4(listener.as_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(conn) => conn,
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            // Shut down by `unlink`, or broken: either way stop serving.
            Err(_) => return,
        };
        let same_user =
            socket::getsockopt(&conn, sockopt::PeerCredentials).is_ok_and(|c| c.uid() == uid);
        let fds = [memfd.as_raw_fd()];
        let fds: &[i32] = if same_user { &fds } else { &[] };
        let _ = sys::send_with_fds(conn.as_fd(), &[IoSlice::new(&[1])], fds);
    }
}

impl Deref for SharedMemory {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.map.bytes()
    }
}

impl DerefMut for SharedMemory {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.map.bytes_mut()
    }
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("name", &self.name)
            .field("size", &self.size())
            .finish()
    }
}

fn serialize_borrowed_fd<S: Serializer>(
    fd: &BorrowedFd<'_>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    codec::serialize_fd(*fd, serializer)
}

#[derive(Serialize)]
struct WireOut<'a> {
    name: &'a str,
    #[serde(serialize_with = "serialize_borrowed_fd")]
    fd: BorrowedFd<'a>,
}

#[derive(Deserialize)]
struct WireIn {
    name: String,
    #[serde(deserialize_with = "codec::deserialize_fd")]
    fd: OwnedFd,
}

/// Travels as its memory (the receiver maps the same bytes) and its name;
/// the received handle does not hold the name (its `unlink` does nothing).
impl Serialize for SharedMemory {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        WireOut {
            name: &self.name,
            fd: self.map.fd(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SharedMemory {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let wire = WireIn::deserialize(deserializer)?;
        Ok(SharedMemory {
            map: Mapping::from_fd(wire.fd).map_err(D::Error::custom)?,
            name: wire.name,
            listener: Mutex::new(None),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_unlink() {
        let name = format!("unit-{}", std::process::id());
        let mut a = SharedMemory::create(&name, 100).expect("create");
        a[..3].copy_from_slice(b"abc");
        assert!(SharedMemory::create(&name, 100).is_err());
        let b = SharedMemory::open(&name).expect("open");
        assert_eq!(&b[..3], b"abc");
        assert_eq!(b.len(), 100);
        a.unlink().expect("unlink");
        // The server closes its end asynchronously: retry briefly.
        let gone = (0..200).any(|_| {
            let gone = SharedMemory::open(&name).is_err();
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            gone
        });
        assert!(gone);
        assert_eq!(&b[..3], b"abc");
    }
}
