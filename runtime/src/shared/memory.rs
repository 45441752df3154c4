//! [`SharedMemory`]: blocks of bytes found by name.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64};

use crate::error::{Error, Result};
use crate::handle::{self, HandleWire, Kind, Parts, Received};
use crate::sys;
use crate::sys::shm::Mapping;
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};

mod names;

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
/// process, where its name server hands the memfd to
/// [`open`](SharedMemory::open) (to processes of the same user only,
/// checked with `SO_PEERCRED`). One thread, `multiproc-shm`, serves every
/// name of a process, however many blocks it creates.
/// The name disappears on [`unlink`](SharedMemory::unlink) (by any
/// handle of the block, in any process) or when the creating process
/// exits, however it exits; the memory disappears when
/// the last process that mapped it unmaps it or dies. Unlike Python, a
/// name cannot outlive its creator (open it, or pass the handle, before
/// the creator ends), and dropping the creator's handle does not remove
/// the name (as in Python, call `unlink`).
///
/// # Access: copies, atomics, or `unsafe`
///
/// Other processes, and other handles to the same name in this one, may
/// write the bytes at any time, so a `SharedMemory` never hands safe code a
/// `&[u8]` (which promises the compiler that its bytes do not change) or a
/// `&mut [u8]` (which promises that nobody else sees them): memmap2's rule
/// for shared mappings. Its safe surface is
///
/// - copies: [`read`](SharedMemory::read), [`write`](SharedMemory::write),
///   [`to_vec`](SharedMemory::to_vec), bounds-checked, made of relaxed
///   atomic byte loads and stores, so a copy that races with a writer sees
///   a mix of old and new bytes (coordinate with a [`Lock`](crate::Lock)
///   when that matters, as in Python), never undefined behaviour;
/// - an atomic view: [`as_atomic_u8`](SharedMemory::as_atomic_u8), for
///   flags that processes poll and update without a lock.
///
/// Every safe access is one byte wide: Rust's memory model leaves racing
/// atomic accesses of different sizes to the same bytes undefined, so the
/// wider views, [`atomic_u32_at`](SharedMemory::atomic_u32_at) and
/// [`atomic_u64_at`](SharedMemory::atomic_u64_at), are `unsafe fn`s whose
/// caller keeps those bytes for that one width. Also available:
/// - raw pointers: [`as_ptr`](SharedMemory::as_ptr) and
///   [`as_mut_ptr`](SharedMemory::as_mut_ptr), for code that does its own
///   `unsafe` reasoning.
///
/// [`as_slice`](SharedMemory::as_slice) and
/// [`as_mut_slice`](SharedMemory::as_mut_slice) borrow the bytes as a
/// slice, in place; they are `unsafe fn`s: the caller promises that nothing
/// writes (for `as_mut_slice`, touches) the bytes while the slice lives.
///
/// For typed data, [`Value`](crate::Value), [`Array`](crate::Array) and
/// [`RawArray`](crate::shared::RawArray) are usually the better fit.
///
/// # Examples
///
/// ```no_run
/// use multiproc::shared::SharedMemory;
///
/// # fn main() -> multiproc::Result<()> {
/// let shm = SharedMemory::create("psm_demo", 1024)?;
/// shm.write(0, b"hello")?;
/// shm.as_atomic_u8()[8].store(7, std::sync::atomic::Ordering::Release);
/// // In another process of the same user:
/// let other = SharedMemory::open("psm_demo")?;
/// let mut greeting = [0u8; 5];
/// other.read(0, &mut greeting)?;
/// assert_eq!(&greeting, b"hello");
/// assert_eq!(other.as_atomic_u8()[8].load(std::sync::atomic::Ordering::Acquire), 7);
/// shm.unlink()?;
/// # Ok(())
/// # }
/// ```
pub struct SharedMemory {
    map: Mapping,
    name: String,
    /// The name this handle serves: only the creating handle's, until
    /// `unlink`.
    served: Mutex<Option<names::Token>>,
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

/// How long [`SharedMemory::open`] waits for a name's server to accept
/// and to answer.
const OPEN_TIMEOUT_SECS: i64 = 30;

const SERVER_SILENT: &str = "the shared memory name server did not answer within 30 s";

/// Refuses a name server that runs as another user than `our_uid`.
fn check_server(name: &str, pid: i32, uid: u32, our_uid: u32) -> Result<()> {
    if uid == our_uid {
        return Ok(());
    }
    Err(Error::io_kind_owned(
        format!(
            "shared memory name {name:?} is held by process {pid} of another user (uid {uid}, \
             not {our_uid}): refused, its memory could be rewritten or truncated by that user"
        ),
        std::io::ErrorKind::PermissionDenied,
    ))
}

/// Why `create` could not bind `addr`, which is in use: asks the holder
/// who it is, without waiting (a non-blocking connect either queues at
/// once or fails).
fn name_in_use(name: &str, addr: &UnixAddr) -> Error {
    let holder = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .and_then(|probe| {
        socket::connect(probe.as_raw_fd(), addr)?;
        socket::getsockopt(&probe, sockopt::PeerCredentials)
    });
    let Ok(holder) = holder else {
        return exists(format!("shared memory named {name:?} already exists"));
    };
    let our_uid = nix::unistd::getuid().as_raw();
    match check_server(name, holder.pid(), holder.uid(), our_uid) {
        Ok(()) => exists(format!(
            "shared memory named {name:?} already exists (created by process {})",
            holder.pid()
        )),
        Err(_) => exists(format!(
            "shared memory name {name:?} is taken by process {} of another user (uid {})",
            holder.pid(),
            holder.uid()
        )),
    }
}

/// How long `create` waits for a name that is being released: unlinked,
/// its socket shut down, but a copy of the socket still open in a child
/// that another thread is starting (between its `clone` and its `exec`,
/// which closes it).
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds `listener` to the name's address. A name whose socket refuses
/// connections (shut down by `unlink`, closed once the last copy goes) is
/// being released: the bind is tried again until it succeeds or
/// [`RELEASE_WAIT`] is over, so that a name is free again after `unlink`
/// even while other threads start processes.
fn bind_name(listener: &OwnedFd, name: &str, addr: &UnixAddr) -> Result<()> {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        match socket::bind(listener.as_raw_fd(), addr) {
            Ok(()) => return Ok(()),
            Err(Errno::EADDRINUSE) => {
                if !being_released(addr) || std::time::Instant::now() >= deadline {
                    return Err(name_in_use(name, addr));
                }
                // Nothing to wait on: the copy goes with another process's
                // exec. Short pauses, doubling up to 2 ms.
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(2));
            }
            Err(e) => return Err(Error::errno("could not bind the shared memory name", e)),
        }
    }
}

/// Whether the socket bound to `addr` refuses connections (it was shut
/// down, or never listened), rather than serving them.
fn being_released(addr: &UnixAddr) -> bool {
    let Ok(probe) = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    ) else {
        return false;
    };
    matches!(
        socket::connect(probe.as_raw_fd(), addr),
        Err(Errno::ECONNREFUSED)
    )
}

/// Python's `FileExistsError`: an [`Error::Io`] of kind `AlreadyExists`.
fn exists(context: String) -> Error {
    Error::io_kind_owned(context, std::io::ErrorKind::AlreadyExists)
}

/// Python's `FileNotFoundError`: an [`Error::Io`] of kind `NotFound`.
fn not_found(context: String) -> Error {
    Error::io_kind_owned(context, std::io::ErrorKind::NotFound)
}

/// The name server's answer on `conn`: one byte, the number of
/// descriptors it attached (1: the memfd; 0: a refusal). Descriptors beyond
/// that number (any, on a refusal) are closed; a memfd the kernel had to
/// drop (MSG_CTRUNC: the descriptor table is full) is an error, not a
/// refusal.
fn receive_memfd(conn: BorrowedFd<'_>, name: &str) -> Result<OwnedFd> {
    let mut fds = Vec::new();
    let mut byte = [0u8; 1];
    let got = sys::recv_fds(conn, &mut byte, &mut fds).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => Error::errno(SERVER_SILENT, Errno::ETIMEDOUT),
        _ => Error::io("could not receive the shared memory", e),
    })?;
    if got.truncated {
        return Err(Error::io(
            "the kernel dropped the shared memory's descriptor (MSG_CTRUNC: is the descriptor \
             table full?)",
            std::io::Error::other("control message truncated"),
        ));
    }
    if got.bytes == 0 {
        return Err(Error::io(
            "the shared memory name server closed the connection without answering",
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        ));
    }
    let mut fds = fds.into_iter().take(usize::from(byte[0]));
    let memfd = fds.next();
    drop(fds);
    memfd.ok_or_else(|| not_found(format!("no shared memory named {name:?} (refused)")))
}

/// A connection to the server of `name`, checked to run as this user.
fn connect(name: &str) -> Result<OwnedFd> {
    let addr = address(name)?;
    let conn = unix_socket()?;
    // A server that never accepts (a full backlog) or never answers
    // must not hang us: both waits are bounded.
    let limit = TimeVal::seconds(OPEN_TIMEOUT_SECS);
    socket::setsockopt(&conn, sockopt::SendTimeout, &limit)
        .and_then(|()| socket::setsockopt(&conn, sockopt::ReceiveTimeout, &limit))
        .map_err(|e| Error::errno("could not set up a socket", e))?;
    match socket::connect(conn.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => {
            return Err(not_found(format!(
                "no shared memory named {name:?} (never created, unlinked, or its creator \
                 exited)"
            )));
        }
        Err(Errno::EAGAIN) => return Err(Error::errno(SERVER_SILENT, Errno::ETIMEDOUT)),
        Err(e) => return Err(Error::errno("could not reach the shared memory name", e)),
    }
    // Before anything is received: a server of another user could hand
    // us memory it rewrites or truncates at will.
    let server = socket::getsockopt(&conn, sockopt::PeerCredentials)
        .map_err(|e| Error::errno("could not identify the shared memory name server", e))?;
    check_server(
        name,
        server.pid(),
        server.uid(),
        nix::unistd::getuid().as_raw(),
    )?;
    Ok(conn)
}

/// Sends a request to a name server: one `sendmsg` of a few bytes on a
/// fresh connection (bounded by the send timeout, no SIGPIPE). Best
/// effort: a server that answered and closed before reading it (a
/// squatter of the name, say) still left its answer to read, and what the
/// answer says (or its absence) is the error worth reporting.
fn send_request(conn: &OwnedFd, request: &[u8]) {
    let _ = sys::send_with_fds(conn.as_fd(), &[std::io::IoSlice::new(request)], &[]);
}

impl SharedMemory {
    /// Creates a zero-filled block of `size` bytes named `name`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the name is empty, longer than 64
    /// bytes, or holds `/` or NUL, or if `size` is 0; an [`Error::Io`] of
    /// kind [`AlreadyExists`](std::io::ErrorKind::AlreadyExists) (see
    /// [`Error::io_kind`]) if the name is already in use (Python's
    /// `FileExistsError`; the message names the holder's pid, and its uid
    /// when another user took the name); [`Error::Io`] if the OS refuses.
    pub fn create(name: &str, size: usize) -> Result<SharedMemory> {
        if size == 0 {
            return Err(Error::invalid("shared memory size must be at least 1 byte"));
        }
        let addr = address(name)?;
        let map = Mapping::create(name, size)?;
        let listener = unix_socket()?;
        bind_name(&listener, name, &addr)?;
        let backlog = Backlog::new(64).map_err(|e| Error::errno("listen", e))?;
        socket::listen(&listener, backlog).map_err(|e| Error::errno("listen", e))?;
        sys::set_nonblocking(listener.as_fd(), true)
            .map_err(|e| Error::io("could not set up the shared memory name", e))?;
        let memfd = map
            .fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("could not duplicate the shared memory descriptor", e))?;
        let token = names::serve(listener, memfd)
            .map_err(|e| Error::io("could not start the shared memory name server", e))?;
        Ok(SharedMemory {
            map,
            name: name.to_string(),
            served: Mutex::new(Some(token)),
        })
    }

    /// Opens the block named `name`, created by a live process of this user.
    ///
    /// The process that answers for the name must run as this user (its
    /// uid is read with `SO_PEERCRED` before anything is received): another
    /// user who took the name first could otherwise hand over memory that
    /// it rewrites at will.
    ///
    /// # Errors
    ///
    /// An [`Error::Io`] of kind [`NotFound`](std::io::ErrorKind::NotFound)
    /// (see [`Error::io_kind`]) if no block has that name (never created,
    /// unlinked, or its creator exited: Python's `FileNotFoundError`), of
    /// kind [`PermissionDenied`](std::io::ErrorKind::PermissionDenied) if
    /// a process of another user holds it; [`Error::InvalidArgument`] if
    /// the name is malformed; [`Error::Io`] if the OS refuses, if the name's server does not
    /// answer within 30 s, or if the descriptor table is full (the kernel
    /// drops the memfd: MSG_CTRUNC; not a refusal, try again once
    /// descriptors are free).
    pub fn open(name: &str) -> Result<SharedMemory> {
        let conn = connect(name)?;
        send_request(&conn, &[names::OPEN]);
        let fd = receive_memfd(conn.as_fd(), name)?;
        Ok(SharedMemory {
            map: Mapping::from_fd(fd)?,
            name: name.to_string(),
            served: Mutex::new(None),
        })
    }

    /// Creates a zero-filled block of `size` bytes under a fresh name that
    /// no other block of this user holds (CPython's
    /// `SharedMemory(create=True, size=size)` without a name):
    /// [`name`](SharedMemory::name) tells it, to pass to the processes that
    /// [`open`](SharedMemory::open) it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `size` is 0; [`Error::Io`] if the OS
    /// refuses.
    ///
    /// # Examples
    ///
    /// ```
    /// let shm = multiproc::shared::SharedMemory::new(16)?;
    /// assert!(shm.name().starts_with("mp_"));
    /// shm.unlink()?;
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new(size: usize) -> Result<SharedMemory> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut last = None;
        for _ in 0..16 {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!("mp_{:x}_{n:x}_{nanos:08x}", std::process::id());
            match SharedMemory::create(&name, size) {
                // Taken (by a process whose pid this one reuses): another.
                Err(err) if err.io_kind() == Some(std::io::ErrorKind::AlreadyExists) => {
                    last = Some(err);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Error::invalid("no free shared memory name")))
    }

    /// Removes the name: once this returns, [`open`](SharedMemory::open)
    /// fails and [`create`](SharedMemory::create) may use the name again;
    /// handles already open keep working, and the memory is freed when the
    /// last is dropped.
    ///
    /// Any handle of the block may do it, in any process, as in CPython
    /// (a consumer often unlinks what a producer created): a handle that
    /// did not create the name asks the creator's name server, which
    /// removes it only if it still names this block (never a block created
    /// later under the same name).
    ///
    /// # Errors
    ///
    /// An [`Error::Io`] of kind [`NotFound`](std::io::ErrorKind::NotFound)
    /// if the name is gone already (unlinked before, by this or another
    /// handle, or its creator exited: CPython's `FileNotFoundError`), or
    /// names another block now; [`Error::Io`] if the name's socket could not be shut down (the name
    /// is removed all the same) or its server does not answer within 30 s.
    pub fn unlink(&self) -> Result<()> {
        let served = match self.served.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(token) = served else {
            return self.unlink_remote();
        };
        match names::withdraw(token) {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.gone()),
            Err(e) => Err(Error::io("could not remove the shared memory name", e)),
        }
    }

    fn gone(&self) -> Error {
        not_found(format!(
            "shared memory {:?} was already unlinked",
            self.name
        ))
    }

    /// `unlink` by a handle that does not serve the name.
    fn unlink_remote(&self) -> Result<()> {
        let conn = match connect(&self.name) {
            Ok(conn) => conn,
            Err(err) if err.io_kind() == Some(std::io::ErrorKind::NotFound) => {
                return Err(self.gone());
            }
            Err(err) => return Err(err),
        };
        let (dev, ino) = names::identity(self.map.fd())
            .map_err(|e| Error::io("could not identify the shared memory", e))?;
        let mut request = [0u8; names::UNLINK_REQUEST];
        request[0] = names::UNLINK;
        request[1..9].copy_from_slice(&dev.to_le_bytes());
        request[9..].copy_from_slice(&ino.to_le_bytes());
        send_request(&conn, &request);
        let mut answer = [0u8; 1];
        match sys::read(conn.as_fd(), &mut answer) {
            Ok(1) if answer[0] == names::UNLINKED => Ok(()),
            Ok(1) if answer[0] == names::OTHER_BLOCK => Err(not_found(format!(
                "shared memory name {:?} now names another block (this one's name is gone): \
                 not unlinked",
                self.name
            ))),
            // Closed without an answer: unlinked meanwhile by its creator.
            Ok(_) => Err(self.gone()),
            Err(Errno::EAGAIN) => Err(Error::errno(SERVER_SILENT, Errno::ETIMEDOUT)),
            Err(e) => Err(Error::errno("could not unlink the shared memory name", e)),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The size in bytes (Python's `size`).
    pub fn size(&self) -> usize {
        self.map.len()
    }

    /// The size in bytes, as for a slice: the same as [`size`](SharedMemory::size).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always `false`: a block holds at least one byte.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Copies `buf.len()` bytes starting at `offset` into `buf`.
    ///
    /// The copy is made of relaxed atomic loads: if another process or
    /// handle writes the range meanwhile, `buf` gets a mix of old and new
    /// bytes (take a [`Lock`](crate::Lock) around both sides when that
    /// matters).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the range does not lie inside the block.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> multiproc::Result<()> {
    /// let shm = multiproc::shared::SharedMemory::create("psm_read", 16)?;
    /// let mut head = [0xffu8; 4];
    /// shm.read(0, &mut head)?;
    /// assert_eq!(head, [0; 4]);
    /// assert!(shm.read(14, &mut head).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        Ok(self.map.load_bytes(offset, buf)?)
    }

    /// Copies `data` into the block starting at `offset`.
    ///
    /// Takes `&self`: the bytes are shared, every handle (and every process
    /// that opened the name) may write them. The copy is made of relaxed
    /// atomic stores (see [`read`](SharedMemory::read)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the range does not lie inside the block.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> multiproc::Result<()> {
    /// let shm = multiproc::shared::SharedMemory::create("psm_write", 16)?;
    /// shm.write(4, b"abcd")?;
    /// assert_eq!(&shm.to_vec()[4..8], b"abcd");
    /// assert!(shm.write(15, b"xy").is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        Ok(self.map.store_bytes(offset, data)?)
    }

    /// A copy of the whole block (see [`read`](SharedMemory::read)).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.map.len()];
        // The range is the whole mapping: it cannot be out of bounds.
        let _ = self.map.load_bytes(0, &mut out);
        out
    }

    /// The block as bytes that may be read and written atomically, in
    /// place, while other processes do the same.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::sync::atomic::Ordering;
    /// # fn main() -> multiproc::Result<()> {
    /// let shm = multiproc::shared::SharedMemory::create("psm_bytes", 16)?;
    /// let bytes = shm.as_atomic_u8();
    /// bytes[3].store(9, Ordering::Relaxed);
    /// assert_eq!(shm.to_vec()[3], 9);
    /// # Ok(())
    /// # }
    /// ```
    pub fn as_atomic_u8(&self) -> &[AtomicU8] {
        self.map.atomics_u8()
    }

    /// The 32-bit atomic at byte `offset` (a flag, a counter, a futex-style
    /// word another process polls).
    ///
    /// # Safety
    ///
    /// Rust's memory model leaves racing atomic accesses of different
    /// sizes to the same bytes undefined. While the returned reference is
    /// used, no access of another width to these 4 bytes may race with it,
    /// in this process or another: not [`read`](SharedMemory::read),
    /// [`write`](SharedMemory::write), [`to_vec`](SharedMemory::to_vec) or
    /// [`as_atomic_u8`](SharedMemory::as_atomic_u8) (byte accesses), nor an
    /// [`atomic_u64_at`](SharedMemory::atomic_u64_at) over them. Keeping a
    /// word for one purpose (a counter that every process only touches
    /// through this function) satisfies it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `offset` is not a multiple of 4 or the
    /// word does not lie inside the block.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::atomic::Ordering;
    /// # fn main() -> multiproc::Result<()> {
    /// let shm = multiproc::shared::SharedMemory::create("psm_u32", 16)?;
    /// // SAFETY: bytes 4..8 are only ever used as this one u32 counter.
    /// let counter = unsafe { shm.atomic_u32_at(4)? };
    /// counter.fetch_add(1, Ordering::SeqCst);
    /// assert_eq!(counter.load(Ordering::SeqCst), 1);
    /// // SAFETY: as above (the calls fail before any access).
    /// assert!(unsafe { shm.atomic_u32_at(2) }.is_err()); // misaligned
    /// assert!(unsafe { shm.atomic_u32_at(16) }.is_err()); // out of range
    /// # Ok(())
    /// # }
    /// ```
    pub unsafe fn atomic_u32_at(&self, offset: usize) -> Result<&AtomicU32> {
        Ok(self.map.atomic_at::<AtomicU32>(offset)?)
    }

    /// The 64-bit atomic at byte `offset`.
    ///
    /// # Safety
    ///
    /// As for [`atomic_u32_at`](SharedMemory::atomic_u32_at), for these 8
    /// bytes: no access of another width may race with the ones made
    /// through the returned reference.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `offset` is not a multiple of 8 or the
    /// word does not lie inside the block.
    pub unsafe fn atomic_u64_at(&self, offset: usize) -> Result<&AtomicU64> {
        Ok(self.map.atomic_at::<AtomicU64>(offset)?)
    }

    /// The first byte, as a raw pointer valid for [`len`](SharedMemory::len)
    /// bytes while this handle lives. Reading through it is `unsafe`, and
    /// sound only under the rules of [`as_slice`](SharedMemory::as_slice)
    /// or with atomic or volatile accesses.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// The first byte, as a raw pointer for writing, valid for
    /// [`len`](SharedMemory::len) bytes while this handle lives (the
    /// memory is shared: `&self` suffices, as for
    /// [`write`](SharedMemory::write)). Writing through it is `unsafe`.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// The whole block as a byte slice, in place.
    ///
    /// # Safety
    ///
    /// While the returned slice lives, nothing may write any of its bytes:
    /// no other process, no other handle to the same block in this process,
    /// and not this handle either ([`write`](SharedMemory::write), the
    /// atomic views, [`as_mut_ptr`](SharedMemory::as_mut_ptr)). A `&[u8]`
    /// promises the compiler that its bytes do not change; a write behind
    /// it is undefined behaviour (a loop that polls the slice may never see
    /// it). Typical sound uses: the block is written once before any other
    /// process opens it, or every writer and reader holds the same
    /// [`Lock`](crate::Lock) around its accesses.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> multiproc::Result<()> {
    /// let shm = multiproc::shared::SharedMemory::create("psm_slice", 16)?;
    /// shm.write(0, b"fixed")?;
    /// // SAFETY: no other process knows the name yet, and this thread
    /// // does not write while `bytes` lives.
    /// let bytes = unsafe { shm.as_slice() };
    /// assert_eq!(&bytes[..5], b"fixed");
    /// # Ok(())
    /// # }
    /// ```
    #[allow(unsafe_code)]
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the caller upholds `as_slice`'s contract, which is
        // `bytes_unchecked`'s: nothing writes the bytes while the slice lives.
        unsafe { self.map.bytes_unchecked() }
    }

    /// The whole block as a mutable byte slice, in place.
    ///
    /// # Safety
    ///
    /// While the returned slice lives, no other process and no other handle
    /// to the same block in this process may read or write any of its
    /// bytes (`&mut self` already excludes this handle's other accesses).
    /// Typical sound uses: filling a block before any other process opens
    /// it, or while every other user holds off by a protocol (a
    /// [`Lock`](crate::Lock) that all of them take around every access).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> multiproc::Result<()> {
    /// let mut shm = multiproc::shared::SharedMemory::create("psm_fill", 4096)?;
    /// // SAFETY: no other process knows the name yet.
    /// let bytes = unsafe { shm.as_mut_slice() };
    /// bytes.fill(0xab);
    /// assert!(shm.to_vec().iter().all(|&b| b == 0xab));
    /// # Ok(())
    /// # }
    /// ```
    #[allow(unsafe_code)]
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the caller upholds `as_mut_slice`'s contract, which is
        // `bytes_unchecked_mut`'s: no other mapping touches the bytes while
        // the slice lives.
        unsafe { self.map.bytes_unchecked_mut() }
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

/// Travels as its memory (the receiver maps the same bytes), its name and
/// its size; the received handle does not serve the name (its `unlink`
/// asks the creator's server).
impl HandleWire for SharedMemory {
    const KIND: Kind = Kind::SharedMemory;
    type Elem = ();
    type Plain = (String, u64);

    fn parts(&self) -> Result<Parts<'_, Self::Plain>> {
        let plain = (self.name.clone(), self.map.len() as u64);
        Ok(Parts::mapped(&self.map, plain))
    }

    fn mapping_size((_, size): &Self::Plain) -> Result<usize> {
        usize::try_from(*size)
            .ok()
            .filter(|&size| size > 0)
            .ok_or_else(|| handle::decode(format!("a SharedMemory of {size} bytes")))
    }

    fn rebuild((name, _): Self::Plain, fds: &mut Received) -> Result<Self> {
        address(&name).map_err(|_| handle::decode(format!("a SharedMemory named {name:?}")))?;
        Ok(SharedMemory {
            map: fds.mapping(0)?,
            name,
            served: Mutex::new(None),
        })
    }
}

handle::handle_serde!([] SharedMemory);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_unlink() {
        let name = format!("unit-{}", std::process::id());
        let a = SharedMemory::create(&name, 100).expect("create");
        a.write(0, b"abc").expect("write");
        assert!(SharedMemory::create(&name, 100).is_err());
        let b = SharedMemory::open(&name).expect("open");
        assert_eq!(&b.to_vec()[..3], b"abc");
        assert_eq!(b.len(), 100);
        a.unlink().expect("unlink");
        // Gone at once, and free for another block.
        assert!(SharedMemory::open(&name).is_err());
        let again = SharedMemory::create(&name, 10).expect("the name is free again");
        assert_eq!(SharedMemory::open(&name).expect("open").len(), 10);
        again.unlink().expect("unlink");
        assert_eq!(&b.to_vec()[..3], b"abc");
    }

    #[test]
    fn an_answer_gets_exactly_the_descriptors_it_declares() {
        use std::io::IoSlice;
        // Each descriptor sent is a pipe's read end; the pipe's descriptors
        // still open in this process are counted through /proc (the write
        // end, kept, is one of them).
        let pipe = || {
            let (r, w) = sys::pipe().expect("pipe");
            let ino = nix::sys::stat::fstat(&r).expect("fstat").st_ino;
            (r, w, format!("pipe:[{ino}]"))
        };
        let open = |link: &str| {
            std::fs::read_dir("/proc/self/fd")
                .expect("fds")
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link))
                .count()
        };
        let answer = |count: u8, fds: &[&OwnedFd]| {
            let (ours, theirs) = sys::socketpair().expect("socketpair");
            let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
            sys::send_with_fds(ours.as_fd(), &[IoSlice::new(&[count])], &raw).expect("send");
            receive_memfd(theirs.as_fd(), "n")
        };
        // A refusal that carries a descriptor: refused, the descriptor closed.
        let (r, _w, link) = pipe();
        let refused = answer(0, &[&r]).expect_err("refused");
        drop(r);
        assert!(refused.to_string().contains("refused"), "{refused}");
        assert_eq!(open(&link), 1, "only the write end is left");
        // One declared, two attached: the first is the answer, the second closed.
        let ((r1, _w1, link1), (r2, _w2, link2)) = (pipe(), pipe());
        let got = answer(1, &[&r1, &r2]).expect("the first");
        drop((r1, r2));
        assert_eq!((open(&link1), open(&link2)), (2, 1));
        drop(got);
        assert_eq!(open(&link1), 1);
        // A server that closes without answering.
        let (ours, theirs) = sys::socketpair().expect("socketpair");
        drop(ours);
        let silent = receive_memfd(theirs.as_fd(), "n").expect_err("no answer");
        assert!(silent.to_string().contains("without answering"), "{silent}");
    }

    #[test]
    fn a_name_server_of_another_user_is_refused() {
        assert!(check_server("n", 10, 1000, 1000).is_ok());
        let refused = check_server("n", 4242, 65534, 1000).expect_err("another uid");
        let message = refused.to_string();
        assert!(
            refused.io_kind() == Some(std::io::ErrorKind::PermissionDenied),
            "{message}"
        );
        assert!(message.contains("uid 65534"), "{message}");
        assert!(message.contains("process 4242"), "{message}");
        assert!(
            check_server("n", 1, 0, 1000).is_err(),
            "root is another user too"
        );
    }

    #[test]
    fn a_taken_name_says_who_holds_it() {
        let name = format!("unit-taken-{}", std::process::id());
        let a = SharedMemory::create(&name, 8).expect("create");
        let taken = SharedMemory::create(&name, 8).expect_err("taken");
        assert_eq!(taken.io_kind(), Some(std::io::ErrorKind::AlreadyExists));
        let message = taken.to_string();
        assert!(
            message.contains(&format!("created by process {}", std::process::id())),
            "{message}"
        );
        a.unlink().expect("unlink");
    }

    #[test]
    fn two_handles_see_each_others_writes_through_the_safe_surface() {
        use std::sync::atomic::Ordering;
        let name = format!("unit-safe-{}", std::process::id());
        let a = SharedMemory::create(&name, 64).expect("create");
        let b = SharedMemory::open(&name).expect("open");
        a.unlink().expect("unlink");
        assert_ne!(a.as_ptr(), b.as_ptr(), "two mappings of one memfd");

        a.write(3, b"shared bytes").expect("write");
        let mut out = [0u8; 12];
        b.read(3, &mut out).expect("read");
        assert_eq!(&out, b"shared bytes");

        b.as_atomic_u8()[24].fetch_add(5, Ordering::SeqCst);
        assert_eq!(a.as_atomic_u8()[24].load(Ordering::SeqCst), 5);
        b.as_atomic_u8()[63].store(0x5a, Ordering::SeqCst);
        assert_eq!(a.to_vec()[63], 0x5a);

        assert!(a.write(60, b"12345").is_err(), "out of range");
        assert!(b.read(usize::MAX, &mut out).is_err(), "overflowing range");
        assert_eq!(a.as_atomic_u8().len(), 64);
        assert!(!a.is_empty());
    }
}
