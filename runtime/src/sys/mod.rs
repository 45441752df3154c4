//! The one place with `unsafe`, and the only one that speaks to the OS:
//! process creation, descriptor passing, polling, and (in submodules) the
//! load-time hook, futexes, lock words and shared mappings.
//!
//! This layer knows nothing of the rest of the crate: it takes names,
//! numbers and descriptors as arguments and returns `io::Result` (or nix's
//! `Errno` on the hot I/O paths, whose callers match on it). Every `unsafe`
//! block makes one call and carries a `// SAFETY:` comment. Everything else
//! goes through nix's safe wrappers.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsString};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{self, ControlMessage, MsgFlags};
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use std::io;

pub(crate) mod arena;
pub(crate) mod boot;
pub(crate) mod fork;
pub(crate) mod futex;
pub(crate) mod ipc;
pub(crate) mod lock;
#[cfg(feature = "mpi")]
pub(crate) mod mpi;
pub(crate) mod shm;
pub(crate) mod word;

/// Most descriptors the kernel accepts in one SCM_RIGHTS message.
pub(crate) const MAX_FDS_PER_MSG: usize = 253;

// ---------------------------------------------------------------------
// Process creation.

/// Starts the executable `exe` with `argv` and exactly the environment
/// `envp`, `child_end` as descriptor `child_fd` (which `child_end` must not
/// already be), `/dev/null` as standard input, standard output and error
/// inherited, and an empty signal mask.
pub(crate) fn spawn(
    exe: &CStr,
    argv: &[CString],
    envp: &[CString],
    child_end: BorrowedFd<'_>,
    child_fd: RawFd,
) -> io::Result<Pid> {
    use nix::fcntl::OFlag;
    use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
    use nix::sys::stat::Mode;

    let mut actions = PosixSpawnFileActions::init()?;
    // dup2 onto another number clears close-on-exec on the copy.
    actions.add_dup2(child_end.as_raw_fd(), child_fd)?;
    actions.add_open(0, c"/dev/null", OFlag::O_RDONLY, Mode::empty())?;
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_flags(PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK)?;
    Ok(nix::spawn::posix_spawn(exe, &actions, &attr, argv, envp)?)
}

/// `s` as a C string, its NUL bytes dropped (an argument or environment
/// entry cannot hold one).
pub(crate) fn cstring(s: OsString) -> CString {
    let mut bytes = s.into_vec();
    bytes.retain(|b| *b != 0);
    CString::new(bytes).unwrap_or_default()
}

/// A connected pair of close-on-exec Unix stream sockets.
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::Stream,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Fills `buf` with random bytes from the kernel's CSPRNG (`getrandom(2)`,
/// which waits only until the pool is first initialised at boot).
pub(crate) fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is `rest.len()` writable bytes, exclusively
        // borrowed for the call, which writes at most that many.
        let rc = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        done += rc as usize;
    }
    Ok(())
}

/// A close-on-exec pipe: `(read end, write end)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// A close-on-exec pipe whose two ends are non-blocking: (read end, write end).
pub(crate) fn pipe_nonblocking() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?)
}

/// `read(2)` into `buf`, retried on `EINTR`. Returns 0 at end of stream.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::result::Result<usize, Errno> {
    loop {
        match nix::unistd::read(fd, buf) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// A read that never waits, whatever the descriptor's own mode:
/// `preadv2(fd, buf, -1, RWF_NOWAIT)`, retried on `EINTR`. `Ok(None)` when
/// nothing is there (`EAGAIN`); `Ok(Some(0))` at end of stream. A kernel
/// or file without `RWF_NOWAIT` reports `EOPNOTSUPP` (Linux before 5.x for
/// pipes) or `EINVAL`, and the caller falls back to `poll` and `read`.
pub(crate) fn read_nowait(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> std::result::Result<Option<usize>, Errno> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: `iov` describes `buf`, valid for writes of its length for
        // the duration of the call, and `fd` is a live descriptor borrowed
        // for it; offset -1 reads at (and moves) the file's own position.
        let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        match usize::try_from(n) {
            Ok(n) => return Ok(Some(n)),
            Err(_) => match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => return Ok(None),
                e => return Err(e),
            },
        }
    }
}

/// `write(2)` of `buf`, retried on `EINTR`. Returns how many bytes went
/// out. A write of at most `PIPE_BUF` bytes to a pipe is atomic.
pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> std::result::Result<usize, Errno> {
    loop {
        match nix::unistd::write(fd, buf) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// `writev(2)` of `bufs`, retried on `EINTR`. Returns how many bytes went
/// out. A write of at most `PIPE_BUF` bytes to a pipe is atomic.
pub(crate) fn writev(
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
) -> std::result::Result<usize, Errno> {
    loop {
        match nix::sys::uio::writev(fd, bufs) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// A close-on-exec duplicate of `fd` numbered at least `min`.
pub(crate) fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Takes ownership of the descriptor `fd` that this process inherited,
/// marking it close-on-exec so that its own children do not inherit it.
/// Returns `None` unless `fd` is a Unix socket whose peer is process
/// `peer` (so that a descriptor this process did not get from `peer` is
/// never taken).
///
/// # Safety
///
/// Nothing else in this process owns `fd` or will take it: it is a number
/// this process inherited and has not wrapped anywhere, and this is the
/// only call for it (a second `OwnedFd` of one descriptor closes it under
/// the first).
pub(crate) unsafe fn take_inherited_socket(fd: RawFd, peer: u32) -> Option<OwnedFd> {
    // SAFETY: only used to ask the kernel about `fd`; it is not closed or
    // kept through this borrow, and nothing else owns it (this function's
    // contract).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let cred = socket::getsockopt(&borrowed, socket::sockopt::PeerCredentials).ok()?;
    if u32::try_from(cred.pid()).ok()? != peer {
        return None;
    }
    // FD_CLOEXEC is the only descriptor flag: set it outright.
    nix::fcntl::fcntl(
        borrowed,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .ok()?;
    // SAFETY: the descriptor is open (the calls above succeeded), was
    // placed there for this process by `peer`, and is owned from here on
    // by the returned value alone (this function's contract: no one else
    // owns it, and it is taken once).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes `key` from the environment.
///
/// # Safety
///
/// No other thread reads or writes the environment during the call (std's
/// rule for `remove_var`): in practice, the process has started no thread
/// yet.
pub(crate) unsafe fn remove_env(key: &str) {
    // SAFETY: no other thread touches the environment during the call
    // (this function's contract, passed on to its caller).
    unsafe { std::env::remove_var(key) };
}

/// Ignores SIGPIPE, as std does before `main` (the child runs before it):
/// a write to a closed pipe is then an `EPIPE` error, not a silent death.
pub(crate) fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN runs no handler code, so it cannot violate
    // async-signal-safety.
    let _ =
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) };
}

/// Asks the kernel to SIGKILL this process when its parent thread exits.
pub(crate) fn set_parent_death_signal() -> io::Result<()> {
    Ok(nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?)
}

/// This process's parent pid.
pub(crate) fn parent_pid() -> u32 {
    nix::unistd::getppid().as_raw() as u32
}

/// The calling thread's id equals the process id (it is the main thread).
pub(crate) fn is_main_thread() -> bool {
    nix::unistd::gettid() == nix::unistd::getpid()
}

/// Flushes C's stdio buffers (what foreign code wrote with `printf`).
pub(crate) fn flush_c_stdio() {
    // SAFETY: fflush(NULL) flushes every open output stream of C's stdio,
    // taking each stream's lock; it reads no memory of ours.
    unsafe { libc::fflush(std::ptr::null_mut()) };
}

/// Ends this process at once with `code`, as `_exit(2)`: no atexit
/// handler, no destructor of a loaded object, no flush of C's stdio.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once and touches no memory of it.
    unsafe { libc::_exit(code) }
}

/// Ends this process at once with SIGKILL (the parent is gone).
pub(crate) fn kill_self() -> ! {
    let _ = nix::sys::signal::raise(Signal::SIGKILL);
    std::process::abort()
}

/// Runs `f` when the process exits normally (`main` returns or
/// `std::process::exit`), like Python's `atexit`.
pub(crate) fn at_exit(f: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `f` is a plain `extern "C" fn()` that lives for the whole
    // program; atexit stores the pointer and calls it once at exit.
    let rc = unsafe { libc::atexit(f) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::other("atexit refused another handler"))
    }
}

// ---------------------------------------------------------------------
// pidfds, signals, reaping.

/// A descriptor that becomes readable when process `pid` exits.
pub(crate) fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new
    // descriptor or -1; no memory is passed.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall succeeded, so `raw` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// Sends `signal` to the process behind `pidfd` (no pid-reuse race).
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: Signal) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a descriptor, a signal number, a null
    // siginfo pointer (allowed: the kernel fills one in) and flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match rc {
        0 => Ok(()),
        _ => match Errno::last() {
            // Already exited (and maybe reaped): nothing to signal.
            Errno::ESRCH => Ok(()),
            e => Err(e.into()),
        },
    }
}

/// Non-blocking reap of `pid`: `Some(status)` if it has exited.
pub(crate) fn try_reap(pid: Pid) -> io::Result<Option<WaitStatus>> {
    match nix::sys::wait::waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => Ok(None),
        Ok(status) => Ok(Some(status)),
        Err(e) => Err(e.into()),
    }
}

/// Blocking reap of `pid`.
pub(crate) fn reap(pid: Pid) -> io::Result<WaitStatus> {
    loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(WaitStatus::StillAlive) => continue,
            Ok(status) => return Ok(status),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

// ---------------------------------------------------------------------
// Polling and descriptor passing.

/// Waits until `fd` shows one of `events` or `timeout` passes (`None`:
/// forever). Returns the events seen (empty on timeout). Unlike nix's
/// `PollFd::revents`, bits nix does not name (POLLRDHUP) are kept.
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    timeout: Option<Duration>,
) -> io::Result<PollFlags> {
    Ok(poll_many(&[(fd, events)], timeout)?[0])
}

/// Waits until any of `fds` shows one of its events, or `timeout` passes.
/// Returns the revents of each, in order (all empty on timeout).
pub(crate) fn poll_many(
    fds: &[(BorrowedFd<'_>, PollFlags)],
    timeout: Option<Duration>,
) -> io::Result<Vec<PollFlags>> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, ev)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: ev.bits(),
            revents: 0,
        })
        .collect();
    loop {
        let ms: libc::c_int = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                // Round up so that a short wait does not spin at 0 ms.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: `pfds` is a live, exclusively borrowed array of
        // `pfds.len()` pollfd structs; the borrowed descriptors outlive the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc > 0 {
            return Ok(pfds
                .iter()
                .map(|p| PollFlags::from_bits_retain(p.revents))
                .collect());
        }
        if rc == 0 {
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(vec![PollFlags::empty(); fds.len()]);
            }
            continue;
        }
        match Errno::last() {
            Errno::EINTR => {}
            e => return Err(e.into()),
        }
    }
}

/// Sends the bytes of `bufs` (at least partly) with `fds` attached.
/// Returns how many bytes went out.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[RawFd],
) -> std::result::Result<usize, Errno> {
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), bufs, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// `POLLRDHUP` (the peer closed its end), which nix does not name.
pub(crate) const POLLRDHUP: PollFlags = PollFlags::from_bits_retain(libc::POLLRDHUP);

/// Reads at most `max` bytes from `fd` into the spare capacity of `buf`
/// (no zero-filling first) and extends `buf` by what arrived. Plain
/// `read`: for the rest of a frame's payload, whose descriptors arrived
/// with its first bytes. Returns the byte count (0 at end of stream).
pub(crate) fn read_to_spare(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::result::Result<usize, Errno> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let n = max.min(spare.len());
    let ptr = spare.as_mut_ptr().cast::<libc::c_void>();
    loop {
        // SAFETY: `ptr` points at `n` writable bytes of `buf`'s spare
        // capacity (reserved above, not aliased), and read writes at most
        // `n` bytes there.
        let rc = unsafe { libc::read(fd.as_raw_fd(), ptr, n) };
        if rc < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(e),
            }
        }
        let got = rc as usize;
        // SAFETY: read initialized the first `got` (<= n <= spare) bytes
        // after the current length.
        unsafe { buf.set_len(buf.len() + got) };
        return Ok(got);
    }
}

/// Marks `fd` non-blocking or blocking.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    let mut flags = OFlag::from_bits_truncate(flags);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// What one [`recv_fds`] call brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Received {
    /// Bytes written to the buffer (0 at end of stream).
    pub(crate) bytes: usize,
    /// The kernel dropped descriptors of this read (MSG_CTRUNC: the
    /// descriptor table was full, or more were attached than fit); those
    /// that did arrive are in the caller's vector all the same.
    pub(crate) truncated: bool,
}

/// Receives bytes into `buf`, appending every descriptor that arrived with
/// them (SCM_RIGHTS, close-on-exec) to `fds`, retried on `EINTR`. A
/// truncated control message is reported, not an error of the call (which
/// would lose the bytes already taken from the socket and leak the
/// descriptors the kernel did install).
pub(crate) fn recv_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<Received> {
    recvmsg_fds(sock, buf, fds, libc::MSG_CMSG_CLOEXEC)
}

/// [`recv_fds`] that does not wait: `ErrorKind::WouldBlock` when nothing
/// is there to read (for a caller whose deadline has passed, which needs
/// no `poll` first).
pub(crate) fn try_recv_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<Received> {
    recvmsg_fds(sock, buf, fds, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT)
}

/// `recvmsg(2)` with `flags`, for [`recv_fds`], [`try_recv_fds`] and
/// `ipc::peek_fds`.
fn recvmsg_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: libc::c_int,
) -> std::io::Result<Received> {
    const INT: usize = std::mem::size_of::<libc::c_int>();
    const WORD: usize = std::mem::size_of::<usize>();
    const fn align(n: usize) -> usize {
        (n + WORD - 1) & !(WORD - 1)
    }
    const CMSG_HEADER: usize = align(std::mem::size_of::<libc::cmsghdr>());
    const SPACE: usize = CMSG_HEADER + align(MAX_FDS_PER_MSG * INT);
    let mut control = [0u8; SPACE];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let (rc, controllen, flags) = loop {
        // SAFETY: all-zero bytes are a valid `msghdr` (null pointers, zero
        // lengths); the fields that matter are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = SPACE as _;
        // SAFETY: `msg` points at one iovec covering `buf` (exclusively
        // borrowed, writable) and at `control` (SPACE writable bytes); both
        // outlive the call, which writes at most that much into each.
        let rc = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        break (rc as usize, msg.msg_controllen as usize, msg.msg_flags);
    };
    // Walk the control messages the kernel wrote (plain bytes, parsed
    // without pointer casts): cmsg_len (usize), level, type (c_int), data.
    let written = &control[..controllen.min(SPACE)];
    let mut at = 0;
    while let Some(head) = written.get(at..at + CMSG_HEADER) {
        let word = |i: usize| head.get(i..i + INT).and_then(|b| b.try_into().ok());
        let len = head
            .get(..WORD)
            .and_then(|b| b.try_into().ok())
            .map_or(0, usize::from_ne_bytes);
        let level = word(WORD).map_or(-1, libc::c_int::from_ne_bytes);
        let kind = word(WORD + INT).map_or(-1, libc::c_int::from_ne_bytes);
        if len < CMSG_HEADER {
            break;
        }
        // Never past what was written, so no installed descriptor is skipped.
        let end = at.saturating_add(len).min(written.len());
        let data = written.get(at + CMSG_HEADER..end).unwrap_or(&[]);
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            for raw in data.chunks_exact(INT) {
                let mut b = [0u8; INT];
                b.copy_from_slice(raw);
                let raw = libc::c_int::from_ne_bytes(b);
                // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor in
                // this process; nothing else refers to it yet.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        at += align(len);
    }
    Ok(Received {
        bytes: rc,
        truncated: flags & libc::MSG_CTRUNC != 0,
    })
}
