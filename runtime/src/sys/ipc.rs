//! Small OS helpers for queues: a datagram socket pair, peeking at its
//! datagrams in place, and a liveness check of another process.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags};

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
/// datagram keeps its own). Returns the bytes copied; `WouldBlock` when
/// there is no datagram there.
pub(crate) fn peek_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = nix::cmsg_space!([RawFd; super::MAX_FDS_PER_MSG]);
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(msg) => msg,
        };
        let bytes = msg.bytes;
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raws) = cmsg {
                for raw in raws {
                    // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor
                    // in this process (a peek installs duplicates); nothing
                    // else refers to it yet.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        return Ok(bytes);
    }
}

/// `false` once process `pid` has exited (including as an unreaped
/// zombie). A reused pid reads as alive: the caller only loses time.
///
/// A `false` gives away what the process held (a queue slot and its
/// payload), so it must never be said of a live process: a missing
/// `/proc` entry is confirmed by `kill(pid, 0)` (where `/proc` is not
/// mounted, every entry is missing), and anything unclear reads as alive.
/// Pid 0 and pids past `i32::MAX` name no process: `false`.
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw == 0 {
        return false;
    }
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
            Err(Errno::ESRCH)
        ),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_alive_for_this_process_not_for_a_reaped_child() {
        assert!(pid_alive(std::process::id()));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("reap");
        assert!(!pid_alive(pid));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }
}
