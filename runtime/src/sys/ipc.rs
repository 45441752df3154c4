//! Small OS helpers for queues: a datagram socket pair, a peek offset to
//! walk its datagrams in place, a peek, and a liveness check of another
//! process.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket;

/// A connected pair of close-on-exec Unix datagram sockets.
pub(crate) fn socketpair_dgram() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::Datagram,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Sets `SO_PEEK_OFF` on `sock`: from then on each `MSG_PEEK` starts that
/// many bytes into the receive queue and moves the offset past what it
/// read, so successive peeks walk the queued datagrams one by one without
/// removing any (a plain receive moves the offset back by what it removed).
pub(crate) fn set_peek_offset(sock: BorrowedFd<'_>, offset: i32) -> io::Result<()> {
    let value: libc::c_int = offset;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a pointer to
    // a live local c_int and writes no user memory; the descriptor is
    // borrowed, so open, for the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&raw const value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies the next datagram of `sock` (at the peek offset, see
/// [`set_peek_offset`]) into `buf` without removing it, never blocking,
/// and appends *duplicates* of the descriptors it carries to `fds` (the
/// datagram keeps its own). As [`recv_fds`](super::recv_fds), reports a
/// truncated control message (MSG_CTRUNC: the descriptor table is full)
/// instead of failing, so that the duplicates that were installed are not
/// leaked. `WouldBlock` when there is no datagram there.
pub(crate) fn peek_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<super::Received> {
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    super::recvmsg_fds(sock, buf, fds, flags)
}

/// `false` once process `pid` has exited (including as an unreaped
/// zombie). A reused pid reads as alive: the caller only loses time.
pub(crate) fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself contain spaces or parentheses.
        Ok(stat) => match stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
        {
            Some(state) => !matches!(state, "Z" | "X" | "x"),
            None => true,
        },
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}
