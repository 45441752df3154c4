//! SharedMemory names taken by someone else first (squatting).
//!
//! A name is an abstract Unix socket, `multiproc-shm/<uid>/<name>`, bound
//! by its creator. A squatter binds it first, as a probe program
//! (`__probe squat <address> <mode>`, this executable with a plain
//! `main`), and answers every connection in its own hostile way: random
//! bytes, a pipe or an empty memfd in place of the block, a count of
//! descriptors that never come, three descriptors of the wrong kinds, an
//! answer cut off, a memfd not sealed against shrinking, or a memfd
//! sealed as a creator's is (a process of the same user can answer as a
//! creator would: that one, from the same user, must open). `open` must return in time with an error (or that memfd),
//! leaking nothing; `create` must refuse the taken name, naming the
//! holder; once the squatter is dead the name is free and works. A
//! squatter of another user (uid 65534, started by root) must be refused
//! by `open` before anything is received, and named by `create`.
use std::io::{BufRead, IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use multiproc::shared::SharedMemory;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use super::Scenario;
use crate::ctx::{Context, Ctx, Res};
use crate::util::Rng;

const LIMIT: Duration = Duration::from_secs(60);
/// How long an `open` of a squatted name may take: every squatter answers
/// at once, so this is far above what it needs.
const OPEN_BOUND: Duration = Duration::from_secs(10);
const SQUATTING: &str = "squatting";
/// The squatters' answers (see [`squat_main`]).
const MODES: u8 = 8;
/// The mode whose answer is a memfd sealed as a creator's is (against
/// shrinking and growing): a process of the same user can answer that.
const REAL_MEMFD: u8 = 7;
const NOBODY: u32 = 65534;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "shm/name-squatted-by-a-hostile-server",
            run: squatted_same_user,
        },
        Scenario {
            name: "shm/name-squatted-by-another-user",
            run: squatted_other_user,
        },
    ]
}

/// Starts the name server (one thread and a wake-up pipe per process,
/// for the process's lifetime) before the run counts its descriptors.
pub fn warm_up() {
    let name = format!("chaos-warm-up-{}", std::process::id());
    if let Ok(shm) = SharedMemory::create(&name, 1) {
        let _ = shm.unlink();
    }
}

/// The squatter: binds `address` (abstract), says [`SQUATTING`] on
/// stdout, answers connections in `mode` until its stdin closes.
pub fn squat_main(args: &[String]) -> i32 {
    let (Some(address), Some(mode)) = (args.first(), args.get(1).and_then(|m| m.parse().ok()))
    else {
        eprintln!("usage: __probe squat <address> <mode>");
        return 2;
    };
    let listener = match SocketAddr::from_abstract_name(address.as_bytes())
        .and_then(|a| UnixListener::bind_addr(&a))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("squat: bind {address}: {e}");
            return 2;
        }
    };
    println!("{SQUATTING}");
    std::thread::spawn(move || {
        let mut rng = Rng::new(u64::from(mode) + 1);
        for stream in listener.incoming().flatten() {
            answer(&stream, mode, &mut rng);
        }
    });
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    0
}

fn answer(stream: &std::os::unix::net::UnixStream, mode: u8, rng: &mut Rng) {
    let fd = stream.as_raw_fd();
    let send = |byte: u8, fds: &[OwnedFd]| {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let _ = sendmsg::<()>(fd, &[IoSlice::new(&[byte])], cmsgs, MsgFlags::empty(), None);
    };
    let memfd = |len: i64, sealed: bool| -> Option<OwnedFd> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let m = memfd_create(
            c"squatter",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .ok()?;
        nix::unistd::ftruncate(m.as_fd(), len).ok()?;
        if sealed {
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
            fcntl(m.as_fd(), FcntlArg::F_ADD_SEALS(seals)).ok()?;
        }
        Some(m)
    };
    match mode {
        0 => {
            let n = rng.range(1, 64) as usize;
            let _ = nix::sys::socket::send(fd, &rng.bytes(n), MsgFlags::empty());
        }
        1 => {
            if let Ok((r, w)) = nix::unistd::pipe() {
                send(1, &[r, w]);
            }
        }
        2 => {
            if let Some(m) = memfd(0, true) {
                send(1, &[m]);
            }
        }
        3 => {}
        4 => send(255, &[]),
        5 => {
            // Unsealed: the squatter could shrink it under the mapping.
            if let Some(m) = memfd(65536, false) {
                send(1, &[m]);
            }
        }
        REAL_MEMFD => {
            if let Some(m) = memfd(65536, true) {
                send(1, &[m]);
            }
        }
        _ => {
            let (Ok((r, _w)), Some(m)) = (nix::unistd::pipe(), memfd(4096, true)) else {
                return;
            };
            let s = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            );
            if let Ok(s) = s {
                send(3, &[r, m, s]);
            }
        }
    }
}

/// A started squatter, killed by its pid and reaped on drop.
struct Squatter(Child);

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a squatter of `name` (as user `uid` when given) and waits
/// (bounded) until it holds the name.
fn squat(name: &str, mode: u8, uid: Option<u32>) -> Result<Squatter, String> {
    let exe = std::env::current_exe().ctx("current_exe")?;
    let our_uid = nix::unistd::getuid();
    let mut cmd = Command::new(exe);
    cmd.args([
        "__probe",
        "squat",
        &format!("multiproc-shm/{our_uid}/{name}"),
        &mode.to_string(),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().ctx("start the squatter")?;
    let stdout = child.stdout.take().ctx("its stdout")?;
    let squatter = Squatter(child);
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(SQUATTING) {
                let _ = said.send(());
                break;
            }
        }
    });
    heard
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| format!("the squatter (mode {mode}) never took the name"))?;
    Ok(squatter)
}

/// `open` and `create` of a squatted name, then the name once freed.
fn check_squatted(ctx: &mut Ctx, name: &str, squatter: Squatter, expect: &str, mode: u8) -> Res {
    let t0 = Instant::now();
    let opened = SharedMemory::open(name);
    let took = t0.elapsed();
    ctx.check(took <= OPEN_BOUND, || {
        format!("open of a name squatted in mode {mode} took {took:?}")
    });
    match opened {
        Ok(shm) if mode == REAL_MEMFD && expect.is_empty() => {
            // A real memfd from the same user: usable, bounds checked.
            let ok = shm.write(0, b"x").is_ok()
                && shm.write(shm.size(), b"x").is_err()
                && shm.size() == 65536;
            ctx.check(ok, || {
                format!("the squatter's real memfd, opened: size {}", shm.size())
            });
        }
        Ok(shm) => ctx.fail(format!(
            "open of a name squatted in mode {mode} succeeded ({} bytes)",
            shm.size()
        )),
        Err(e) if mode == REAL_MEMFD && expect.is_empty() => ctx.fail(format!(
            "open of a name served with a real memfd by a process of this user: {e}"
        )),
        Err(e) => ctx.check(e.to_string().contains(expect), || {
            format!("open of a name squatted in mode {mode}: {e} (expected {expect:?})")
        }),
    }
    let pid = squatter.0.id();
    match SharedMemory::create(name, 4096) {
        Ok(_) => ctx.fail(format!(
            "create of a name squatted in mode {mode} succeeded"
        )),
        Err(e) => {
            let text = e.to_string();
            ctx.check(
                e.io_kind() == Some(std::io::ErrorKind::AlreadyExists)
                    && text.contains(&pid.to_string()),
                || format!("create of a squatted name: {text} (expected the holder, pid {pid})"),
            );
        }
    }
    // The squatter dies: the name is free, and works.
    drop(squatter);
    let shm = SharedMemory::create(name, 4096)
        .map_err(|e| format!("create after the squatter (mode {mode}) died: {e}"))?;
    shm.write(0, b"hello").ctx("write")?;
    let other = SharedMemory::open(name).ctx("open after the squatter died")?;
    let mut back = [0u8; 5];
    other.read(0, &mut back).ctx("read")?;
    ctx.check(&back == b"hello", || {
        format!("the freed name's block reads {back:?}")
    });
    shm.unlink().ctx("unlink")?;
    Ok(())
}

fn squatted_same_user(ctx: &mut Ctx) -> Res {
    let first = ctx.rng.below(MODES as usize) as u8;
    ctx.guarded(LIMIT, "a squatted shared memory name", move |ctx| {
        for k in 0..MODES {
            let mode = (first + k) % MODES;
            let name = format!("chaos-squat-{}-{mode}", std::process::id());
            let squatter = squat(&name, mode, None)?;
            check_squatted(ctx, &name, squatter, "", mode)?;
        }
        Ok(())
    })
}

fn squatted_other_user(ctx: &mut Ctx) -> Res {
    let mode = ctx.rng.below(MODES as usize) as u8;
    ctx.guarded(LIMIT, "a name squatted by another user", move |ctx| {
        if !nix::unistd::getuid().is_root() {
            return Err("only root can start a squatter of another user here: not run".into());
        }
        let name = format!("chaos-squat-other-{}", std::process::id());
        let squatter = squat(&name, mode, Some(NOBODY))?;
        check_squatted(
            ctx,
            &name,
            squatter,
            &format!("another user (uid {NOBODY}"),
            mode,
        )
    })
}
