//! Small OS helpers for queues: a datagram socket pair and a liveness
//! check of another process. No `unsafe` here.

use std::os::fd::OwnedFd;

use nix::sys::socket;

use std::io;

/// A connected pair of close-on-exec Unix datagram sockets.
pub(crate) fn socketpair_dgram() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::Datagram,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )?)
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
