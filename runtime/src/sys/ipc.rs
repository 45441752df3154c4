//! Small OS helpers for the shared objects: a datagram socket pair, a peek
//! offset to walk its datagrams in place, a peek (the queue), and who holds
//! something ([`Holder`]: an id and a start time, which survives pid reuse)
//! with the `/proc` checks of whether that holder still runs.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket;

/// Connects a close-on-exec Unix stream socket to the listener at `name`
/// (a path, or a name in the abstract namespace when `abstract_name`).
/// A listener whose backlog is full is tried again every 10 ms until
/// `deadline` (`None`: as long as it takes), which passes as
/// `ErrorKind::TimedOut`; any other refusal is returned at once.
pub(crate) fn unix_connect(
    name: &[u8],
    abstract_name: bool,
    deadline: Option<std::time::Instant>,
) -> io::Result<OwnedFd> {
    let addr = if abstract_name {
        socket::UnixAddr::new_abstract(name)?
    } else {
        socket::UnixAddr::new(name)?
    };
    let fd = socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::Stream,
        socket::SockFlag::SOCK_CLOEXEC | socket::SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    loop {
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
    super::set_nonblocking(fd.as_fd(), false)?;
    Ok(fd)
}

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
    match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_state(&stat), Some(b'Z' | b'X' | b'x')),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
            Err(Errno::ESRCH)
        ),
        Err(_) => true,
    }
}

#[cfg(test)]
mod pid_alive_tests {
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

// ---------------------------------------------------------------------
// Who holds something: identities that survive pid reuse.

/// A process (or thread) named in a way that survives the reuse of its
/// id: the id (pid, or tid for a thread) and a *tag*, the low 32 bits of
/// its start time (field 22 of `/proc/<id>/stat`, clock ticks since boot;
/// never 0, which means "unknown").
///
/// The limit: two holders with the same id and tag are the same holder to
/// every check. That takes a process (thread) that reuses the id of one
/// that started in the same clock tick (10 ms), i.e. the first lived less
/// than a tick and its id was handed out again at once (possible when
/// `ns_last_pid` is set, or when nearly every pid is in use), or started a
/// multiple of 2^32 ticks (497 days at 100 Hz) after it. The later one is
/// then taken for the earlier: a dead holder for alive (its lock stays
/// held while the heir lives), and in principle, if the dead holder's lock
/// is taken over by one waiter, released and taken by the heir while
/// another waiter is between its check and its CAS, a live heir for dead.
/// The pidfs inode of a pidfd (unique per boot since Linux 6.9) would lift
/// this; the start time works on every kernel.
///
/// It packs into one `u64` ([`to_word`](Holder::to_word)): the id in the
/// low 31 bits (pids and tids are below 2^22), bit 31 left to the caller
/// (the lock word keeps its contended mark there), the tag in the high 32
/// bits. That lets a lock word or a queue's writer slot name its holder
/// with one atomic store or CAS, with no window between "taken" and
/// "identified" in which a holder that dies would be unidentifiable.
///
/// What a tag proves depends on the pid namespace: an id means something
/// only in the namespace of the process that wrote it. Callers that share
/// a word between processes must know that the writer is in their own
/// namespace before they trust [`liveness`](Holder::liveness) (see
/// [`pid_namespace`] and the lock's namespace register in
/// `sys::lock::protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Holder {
    id: u32,
    tag: u32,
}

/// The bits of a packed [`Holder`] that hold its id.
pub(crate) const HOLDER_ID_BITS: u64 = (1 << 31) - 1;

/// What `/proc` says about a [`Holder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// It runs (or it may: the answer can only go stale towards dead).
    Alive,
    /// It certainly no longer runs: its id names no process or thread, or
    /// one with another start time (reused), or it is a zombie.
    Dead,
    /// `/proc` cannot tell (unreadable, hidden, not mounted, a tag of 0):
    /// callers must treat it as alive.
    Unknown,
}

impl Holder {
    /// A holder from its parts (`tag` 0: unknown start time).
    pub(crate) const fn new(id: u32, tag: u32) -> Holder {
        Holder {
            id: id & HOLDER_ID_BITS as u32,
            tag,
        }
    }

    /// This process: its pid and start time, read once and cached (the
    /// crate never forks without exec, so it cannot change).
    pub(crate) fn this_process() -> Holder {
        static ME: std::sync::OnceLock<Holder> = std::sync::OnceLock::new();
        *ME.get_or_init(|| {
            let pid = std::process::id();
            Holder::new(pid, own_tag("/proc/self/stat", pid))
        })
    }

    /// The calling thread: its tid and start time, read once per thread.
    pub(crate) fn this_thread() -> Holder {
        thread_local! {
            static ME: std::cell::Cell<Option<Holder>> = const { std::cell::Cell::new(None) };
        }
        ME.with(|cell| {
            if let Some(me) = cell.get() {
                return me;
            }
            let tid = nix::unistd::gettid().as_raw() as u32;
            let me = Holder::new(tid, own_tag("/proc/thread-self/stat", tid));
            cell.set(Some(me));
            me
        })
    }

    /// The id: a pid or a tid.
    pub(crate) const fn id(self) -> u32 {
        self.id
    }

    /// The start-time tag (0: unknown).
    pub(crate) const fn tag(self) -> u32 {
        self.tag
    }

    /// Packed into a `u64` with bit 31 clear (see the type's docs).
    pub(crate) const fn to_word(self) -> u64 {
        ((self.tag as u64) << 32) | self.id as u64
    }

    /// Unpacked from a `u64` made by [`to_word`](Holder::to_word), bit 31
    /// ignored.
    pub(crate) const fn from_word(word: u64) -> Holder {
        Holder::new((word & HOLDER_ID_BITS) as u32, (word >> 32) as u32)
    }

    /// Whether this holder still runs, read from `/proc/<id>/stat` (slow
    /// path only: one file read).
    ///
    /// Only meaningful if the holder is in the caller's pid namespace (the
    /// caller's business: see the type's docs). Given that, a missing
    /// entry means dead only where `/proc` is this namespace's procfs and
    /// shows every process (no `hidepid`); otherwise it is
    /// [`Liveness::Unknown`], as is any error but "not found" (EACCES
    /// under `hidepid=1`, no `/proc` at all) and a holder whose own start
    /// time could not be read (tag 0).
    pub(crate) fn liveness(self) -> Liveness {
        if self.tag() == 0 || self.id == 0 {
            return Liveness::Unknown;
        }
        match std::fs::read(format!("/proc/{}/stat", self.id)) {
            Ok(stat) => match parse_stat(&stat) {
                Some((_, start)) if tag_of(start) != self.tag => Liveness::Dead,
                Some((b'X' | b'x', _)) => Liveness::Dead,
                // A thread group leader that exited while other threads of
                // its process run reads as a zombie too: the process (and
                // whatever its threads hold) is alive.
                Some((b'Z', _)) => match others_run(self.id) {
                    Some(false) => Liveness::Dead,
                    Some(true) => Liveness::Alive,
                    None => Liveness::Unknown,
                },
                Some(_) => Liveness::Alive,
                None => Liveness::Unknown,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound && procfs_shows_all() => Liveness::Dead,
            Err(_) => Liveness::Unknown,
        }
    }
}

/// Whether a task other than `id` itself is listed in `/proc/<id>/task`
/// (another thread of the process `id` leads); `None` if unreadable.
fn others_run(id: u32) -> Option<bool> {
    let me = id.to_string();
    let tasks = std::fs::read_dir(format!("/proc/{id}/task")).ok()?;
    let mut others = false;
    for task in tasks {
        others |= task.ok()?.file_name() != me.as_str();
    }
    Some(others)
}

/// The tag of a start time: its low 32 bits, 0 moved to 1 (0 means
/// "unknown").
fn tag_of(start: u64) -> u32 {
    (start as u32).max(1)
}

/// The tag of the calling process or thread from its own stat file
/// (`path`), checked to be about `id`; 0 if it cannot be read.
fn own_tag(path: &str, id: u32) -> u32 {
    let Ok(stat) = std::fs::read(path) else {
        return 0;
    };
    // The stat file of a procfs of another namespace would name us with
    // another id: then its start time is still ours, but say "unknown"
    // rather than trust a /proc that is not our namespace's.
    let named = stat
        .iter()
        .position(|&b| b == b' ')
        .and_then(|end| std::str::from_utf8(&stat[..end]).ok())
        .and_then(|s| s.parse::<u32>().ok());
    match (named, parse_stat(&stat)) {
        (Some(named), Some((_, start))) if named == id => tag_of(start),
        _ => 0,
    }
}

/// The fields of a `/proc/<id>/stat` from the state (field 3) on.
fn stat_fields(stat: &[u8]) -> Option<std::str::SplitAsciiWhitespace<'_>> {
    // "pid (comm) S ...": the command may hold spaces and parentheses (and
    // bytes that are not UTF-8), so the fields start after the last ')'.
    let after = &stat[stat.iter().rposition(|&b| b == b')')? + 1..];
    Some(std::str::from_utf8(after).ok()?.split_ascii_whitespace())
}

/// The state letter (field 3) of a `/proc/<id>/stat`: `Z` for a zombie,
/// `X` or `x` for a dead task.
pub(crate) fn stat_state(stat: &[u8]) -> Option<u8> {
    stat_fields(stat)?.next()?.as_bytes().first().copied()
}

/// The state letter and start time (field 22) of a `/proc/<id>/stat`.
pub(crate) fn parse_stat(stat: &[u8]) -> Option<(u8, u64)> {
    let mut fields = stat_fields(stat)?;
    let state = *fields.next()?.as_bytes().first()?;
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

/// This process's pid namespace: the inode of `/proc/self/ns/pid`, read
/// once; 0 when it cannot be read (or does not fit in 32 bits, or is
/// `u32::MAX`, the "mixed" mark of the lock's namespace register).
pub(crate) fn pid_namespace() -> u32 {
    static NS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *NS.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self/ns/pid")
            .ok()
            .and_then(|m| u32::try_from(m.ino()).ok())
            .filter(|&ino| ino != u32::MAX)
            .unwrap_or(0)
    })
}

/// `true` if a missing `/proc/<id>` means that no process or thread has
/// that id in this process's pid namespace: `/proc` is mounted, is this
/// namespace's procfs (`/proc/self` names our pid), and hides nobody (no
/// `hidepid` other than 0). Read once.
pub(crate) fn procfs_shows_all() -> bool {
    static ALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALL.get_or_init(|| {
        let ours = std::fs::read_link("/proc/self")
            .ok()
            .and_then(|p| p.to_str().and_then(|s| s.parse::<u32>().ok()))
            == Some(std::process::id());
        ours && std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|info| proc_mount_shows_all(&info))
    })
}

/// Whether the procfs mounted at `/proc` (the last mount there, which
/// hides the earlier ones) shows every process, from `/proc/self/mountinfo`.
fn proc_mount_shows_all(mountinfo: &str) -> bool {
    let mut shows_all = false;
    for line in mountinfo.lines() {
        // "id parent major:minor root mountpoint options [tags] - fstype source superoptions"
        let Some((mount, sb)) = line.split_once(" - ") else {
            continue;
        };
        if mount.split(' ').nth(4) != Some("/proc") {
            continue;
        }
        let mut sb = sb.split(' ');
        shows_all = sb.next() == Some("proc")
            && !sb.nth(1).unwrap_or("").split(',').any(|opt| {
                opt.strip_prefix("hidepid=")
                    .is_some_and(|v| v != "0" && v != "off")
            });
    }
    shows_all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_pack_and_unpack() {
        let h = Holder::new(4_194_303, 0xdead_beef);
        assert_eq!(Holder::from_word(h.to_word()), h);
        assert_eq!(h.to_word() & (1 << 31), 0);
        assert_eq!(Holder::from_word(h.to_word() | 1 << 31), h);
    }

    #[test]
    fn this_process_and_thread_are_alive_with_known_tags() {
        let me = Holder::this_process();
        assert_eq!(me.id(), std::process::id());
        assert_ne!(me.tag(), 0, "this machine has a readable /proc");
        assert_eq!(me.liveness(), Liveness::Alive);
        let thread = Holder::this_thread();
        assert_eq!(thread.id(), nix::unistd::gettid().as_raw() as u32);
        assert_eq!(thread.liveness(), Liveness::Alive);
        assert_ne!(pid_namespace(), 0);
    }

    #[test]
    fn a_reused_id_an_exited_thread_and_a_zero_tag() {
        let me = Holder::this_process();
        // Our pid with another start time: the holder was an earlier
        // process that had our pid.
        let earlier = Holder::new(me.id(), me.tag().wrapping_add(1).max(1));
        assert_eq!(earlier.liveness(), Liveness::Dead);
        let gone = std::thread::spawn(Holder::this_thread)
            .join()
            .expect("thread");
        let expected = if procfs_shows_all() {
            Liveness::Dead
        } else {
            Liveness::Unknown
        };
        // A joined thread may still be finishing its exit in the kernel
        // for a moment (it clears its tid before it is gone from /proc).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while gone.liveness() == Liveness::Alive && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(gone.liveness(), expected);
        assert_eq!(Holder::new(me.id(), 0).liveness(), Liveness::Unknown);
    }

    #[test]
    fn a_zombie_is_dead_unless_other_threads_of_its_process_run() {
        // A zombie child: killed, not reaped.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let stat = std::fs::read(format!("/proc/{pid}/stat")).expect("stat");
        let (_, start) = parse_stat(&stat).expect("parsed");
        let holder = Holder::new(pid, tag_of(start));
        assert_eq!(holder.liveness(), Liveness::Alive);
        child.kill().expect("kill");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while parse_stat(&std::fs::read(format!("/proc/{pid}/stat")).expect("zombie"))
            .is_some_and(|(state, _)| state != b'Z')
        {
            assert!(std::time::Instant::now() < deadline, "never a zombie");
            std::thread::yield_now();
        }
        assert_eq!(others_run(pid), Some(false));
        assert_eq!(holder.liveness(), Liveness::Dead);
        child.wait().expect("reap");
        // With another thread alive, a leader that read as a zombie would
        // still lead a live process.
        let gate = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| gate.wait());
            assert_eq!(others_run(std::process::id()), Some(true));
            gate.wait();
        });
    }

    #[test]
    fn stat_fields_after_a_tricky_command_name() {
        let stat = b"42 (a) b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 123456 0 0";
        assert_eq!(parse_stat(stat), Some((b'S', 123_456)));
        assert_eq!(parse_stat(b"42 (x) Z 1"), None);
        assert_eq!(parse_stat(b"garbage"), None);
        assert_eq!(stat_state(stat), Some(b'S'));
        assert_eq!(stat_state(b"42 (x) Z 1"), Some(b'Z'));
        assert_eq!(
            stat_state(b"42 (\xff) x"),
            Some(b'x'),
            "a command that is not UTF-8"
        );
        assert_eq!(stat_state(b"42 (x)"), None);
        assert_eq!(stat_state(b"garbage Z"), None);
    }

    #[test]
    fn hidepid_makes_a_missing_entry_unknown() {
        let plain = "22 27 0:21 / /proc rw,relatime - proc proc rw\n";
        assert!(proc_mount_shows_all(plain));
        let zero = "22 27 0:21 / /proc rw - proc proc rw,hidepid=0\n";
        assert!(proc_mount_shows_all(zero));
        for hidden in [
            "hidepid=2",
            "hidepid=invisible",
            "hidepid=1",
            "hidepid=noaccess",
        ] {
            let info = format!("{plain}30 22 0:40 / /proc rw - proc proc rw,{hidden}\n");
            assert!(!proc_mount_shows_all(&info), "{hidden}");
        }
        // Not mounted, or something else mounted over it.
        assert!(!proc_mount_shows_all(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        ));
        let tmpfs = format!("{plain}31 22 0:41 / /proc rw - tmpfs tmpfs rw\n");
        assert!(!proc_mount_shows_all(&tmpfs));
    }
}
