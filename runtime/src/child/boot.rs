//! The child's side: recognise that this process is a multiproc child,
//! run what the parent asked, report the outcome, exit.
//!
//! The dispatch starts from a load-time hook and does not depend on the
//! order in which load-time constructors run: in a child, the hook first
//! runs the constructors the loader has not reached yet (every `inventory`
//! registration among them), and only then looks the name up. The child
//! never returns to the loader, so each constructor runs once. See
//! [`crate::sys::boot`].
//!
//! The function then runs on a thread named `main` with the main thread's
//! stack size, as close as a process can get to std's `main` before std's
//! runtime exists: `thread::current().name()` is `Some("main")`, a panic
//! reads `thread 'main' panicked at ...`, and a stack overflow is reported
//! with std's words and `SIGABRT`. The thread ends the process itself, so
//! exit handlers run while it is alive.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::PollFlags;

use super::{
    BIND_NOW_MARK, BIND_NOW_VAR, CHILD_FD, ENV_VAR, Identity, MAIN_THREAD, Message, Mode, READY,
    exe_identity, set_identity,
};
use crate::error::Error;
use crate::registry::{self, Call, Entry, PanicRecord};
use crate::sys;
use crate::sys::boot::LoadTime;
use crate::wire::{Channel, Frame};

crate::sys::boot::load_time_hook!(on_load);

/// How long a child waits for its start message. The parent sends it right
/// after starting the child; a socket that stays silent this long is not a
/// live multiproc parent's.
const START_WAIT: Duration = Duration::from_secs(60);

/// Exit codes of a child that could not run what was asked.
const EXIT_REFUSED: i32 = 2;
const EXIT_RUNTIME_PANIC: i32 = 70;

/// A child's claim on its start: the parent, and the socket to it.
struct Claim {
    parent: u32,
    deathsig: bool,
    /// The parent's `main` began with `#[multiproc::main]`, so this
    /// one's does too: the child runs from there, on the real main thread.
    in_main: bool,
    /// This process is the forkserver: it runs on the thread it was
    /// started with and never starts another (`child::server`).
    server: bool,
    socket: OwnedFd,
}

/// A claim made at load time for `main` to run (see [`main_init`]).
static FOR_MAIN: std::sync::Mutex<Option<Claim>> = std::sync::Mutex::new(None);

/// Set once `#[multiproc::main]`'s first line ran in this process: this
/// executable's `main` starts a child itself, so its children are told to
/// wait for it (the fourth field of [`ENV_VAR`](super::ENV_VAR)).
static MAIN_DISPATCHES: AtomicBool = AtomicBool::new(false);

/// Whether the children of this process run from their `main`.
pub(crate) fn main_dispatches() -> bool {
    MAIN_DISPATCHES.load(Ordering::Relaxed)
}

fn on_load(load: LoadTime) {
    if READY.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Some(claim) = claim(true) {
        if claim.server && !claim.in_main {
            // The forkserver stays single-threaded: it runs here, on the
            // thread the loader started, once the constructors ran. (Under
            // `#[multiproc::main]` it runs from `main`'s first line, on
            // std's main thread, so that its children's thread is std's
            // `main` as a spawned child's is.)
            load.finish_then_exit(move || {
                if let Err(code) = prepare(&claim) {
                    return code;
                }
                match registry::catch(|| read_start(claim)) {
                    Ok(Ok(started)) => run(started),
                    Ok(Err(code)) => code,
                    Err(record) => runtime_panicked(&record),
                }
            });
        }
        if claim.in_main {
            // `main` takes it as its first line (`main_init`): std's
            // runtime is then set up and this thread is std's main thread,
            // so no thread of our own is needed (the 40-100 us of a new
            // thread and its malloc arena are most of a child's start-up
            // beyond exec). The constructors run as the loader runs them.
            *FOR_MAIN
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(claim);
            return;
        }
        // The thread is started first, so that its start-up (tens of
        // microseconds: a fresh stack, a new malloc arena) overlaps the
        // constructors, the death-signal set-up and the reading of the
        // start message, which happen here; it waits for the result.
        let (handoff, handed) = std::sync::mpsc::sync_channel::<Handoff>(1);
        let thread = start_main_thread(handed);
        load.finish_then_exit(move || {
            let thread = match thread {
                Ok(thread) => thread,
                Err(err) => {
                    eprintln!("multiproc: could not start the child's main thread: {err}");
                    return EXIT_REFUSED;
                }
            };
            if let Err(code) = prepare(&claim) {
                return code;
            }
            // Without it an overflow on the thread is a bare SIGSEGV; with
            // it, std's report.
            let alt_stack = sys::boot::prepare_overflow_report(&thread, "main").ok();
            let started = match registry::catch(|| read_start(claim)) {
                Ok(Ok(started)) => started,
                Ok(Err(code)) => return code,
                Err(record) => return runtime_panicked(&record),
            };
            if handoff.send(Handoff { alt_stack, started }).is_ok() {
                // The thread exits the process; it returns only by a bug.
                let _ = thread.join();
            }
            EXIT_RUNTIME_PANIC
        });
    } else {
        // Not a multiproc child: under an MPI launcher, the ranks other
        // than 0 serve the pool here and never return.
        #[cfg(feature = "mpi")]
        super::ranks::on_load(load);
    }
}

/// Makes this program able to run as a multiproc child.
///
/// Multiproc does this by itself before `main` (a load-time hook), so
/// calling it is optional; it is the documented fallback for programs that
/// want to be explicit, or that link multiproc in a way that keeps its
/// hook from running. Call it as the first line of `main`: in a child it
/// runs the requested function and exits, so nothing after it runs there.
/// Calling it again does nothing.
///
/// # Examples
///
/// ```
/// multiproc::init(); // first line of main
/// // ... start processes ...
/// ```
pub fn init() {
    if READY.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Some(claim) = claim(false) {
        run_in_main(claim);
    }
}

/// `#[multiproc::main]`'s first line: [`init`], and a claim the load-time
/// hook left for `main` (this executable's `main` has this line, the
/// parent's did, and tells its children so) runs here.
#[doc(hidden)]
pub fn main_init() {
    MAIN_DISPATCHES.store(true, Ordering::Relaxed);
    let left = FOR_MAIN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(claim) = left {
        run_in_main(claim);
    }
    init();
}

/// Runs the child from `main`: std's runtime is set up and this is the
/// main thread. Never returns.
fn run_in_main(claim: Claim) -> ! {
    let code = prepare(&claim).and_then(|()| {
        registry::catch(|| read_start(claim)).unwrap_or_else(|r| Err(runtime_panicked(&r)))
    });
    std::process::exit(match code {
        Ok(started) => run(started),
        Err(code) => code,
    });
}

/// `Some` when this process was started by a multiproc parent: the
/// variable is well-formed and descriptor [`CHILD_FD`] is a socket whose
/// peer is the parent it names. Anything else (a variable inherited by an
/// unrelated program) is dropped, and the program runs its `main`. Runs
/// at most once per process (both callers swap [`READY`] first).
///
/// The variable is removed only `at_load` (before `main`, before this
/// process started any thread): `init` may be called after the program
/// started threads that read the environment, and a variable left there
/// is harmless (the children multiproc starts do not inherit it, and any
/// other program refuses it: its descriptor is not a socket to the parent).
fn claim(at_load: bool) -> Option<Claim> {
    let value = std::env::var_os(ENV_VAR)?;
    if at_load {
        // SAFETY: the load-time hook runs before `main`, and this process
        // starts its first thread only after the claim (`on_load`); a
        // constructor of another library that ran earlier and started a
        // thread that reads the environment is the exception std's rule
        // cannot rule out either.
        unsafe { sys::remove_env(ENV_VAR) };
    }
    let (parent, deathsig, in_main, server) = parse_env(&value)?;
    if at_load && server && std::env::var_os(BIND_NOW_VAR).is_some_and(|v| v == BIND_NOW_MARK) {
        // SAFETY: as above: before `main`, before this process starts a
        // thread (and the forkserver starts none).
        unsafe { sys::remove_env(BIND_NOW_VAR) };
    }
    // SAFETY: CHILD_FD is the number the parent placed this process's end
    // of the socket at (`child::start`); this runs once per process (both
    // callers swap READY first), before the program's own code (at load
    // time, or `init` as the first line of `main`, as documented), and
    // nothing in this crate wraps that number anywhere else.
    let socket = unsafe { sys::take_inherited_socket(CHILD_FD, parent) }?;
    Some(Claim {
        parent,
        deathsig,
        in_main,
        server,
        socket,
    })
}

/// A child the forkserver just forked, on its only thread: it has the
/// server's state (constructors run, registry built), `socket`, its end
/// of the socket to the program that asked for it (`requester`), if it
/// has one, and `start`, its start message, when the request carried it
/// (otherwise the program sends it on `socket`). From here it starts as a
/// spawned child does: the same start message, the same checks, the same
/// reports. Returns the exit code.
pub(super) fn run_forked(
    socket: Option<OwnedFd>,
    start: Option<Frame>,
    requester: u32,
    server: u32,
) -> i32 {
    match arm_forked(server) {
        Ok(()) => run_assigned(socket, start, requester),
        Err(code) => code,
    }
}

/// The forkserver's spare, just forked (see `server`): armed as any forked
/// child, it waits on `link` for what to run, then runs it as
/// [`run_forked`] does. A server that drops it closes `link`: it exits 0.
pub(super) fn run_spare(mut link: Channel, requester: u32, server: u32) -> i32 {
    if let Err(code) = arm_forked(server) {
        return code;
    }
    let frame = match link.recv(None) {
        Ok(frame) => frame,
        Err(_) => return 0,
    };
    drop(link);
    match super::protocol::assignment(frame) {
        Some((socket, start)) => run_assigned(socket, start, requester),
        None => EXIT_REFUSED,
    }
}

/// How a forked child ends once it ran, as CPython's forked children do
/// (`os._exit` after `_bootstrap`): its own children are joined (and the
/// daemonic ones terminated), stdout and stderr flushed, then `_exit`. The
/// server's atexit handlers and the loaded objects' destructors are the
/// server's: they do not run again in every child, and the child does not
/// free the server's heap page by page (every page it touches is a
/// copy-on-write fault).
pub(super) fn exit_forked(code: i32) -> ! {
    let _ = registry::catch(crate::process::shutdown);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = std::io::Write::flush(&mut std::io::stderr());
    sys::flush_c_stdio();
    sys::exit_now(code)
}

/// What every forked child does first: its death signal follows the
/// server's only thread (it dies with the server, which dies with the
/// program). `Err(code)`: exit with it.
fn arm_forked(server: u32) -> Result<(), i32> {
    if sys::set_parent_death_signal().is_err() {
        return Err(EXIT_REFUSED);
    }
    if sys::parent_pid() != server {
        // The server died before the death signal was armed.
        return Err(1);
    }
    super::FORKED_BY.store(server, Ordering::Relaxed);
    Ok(())
}

/// A forked child's start: from `start` or read on `socket`.
fn run_assigned(socket: Option<OwnedFd>, start: Option<Frame>, requester: u32) -> i32 {
    let read = || match (socket, start) {
        (socket, Some(frame)) => {
            registry::install_panic_hook();
            check_start(socket.map(Channel::new), frame, false, true)
        }
        (Some(socket), None) => read_start(Claim {
            parent: requester,
            deathsig: true,
            in_main: false,
            server: false,
            socket,
        }),
        (None, None) => Err(EXIT_REFUSED),
    };
    match registry::catch(read) {
        Ok(Ok(started)) => run(started),
        Ok(Err(code)) => code,
        Err(record) => runtime_panicked(&record),
    }
}

/// `fd:parent_pid:deathsig[:m|:s|:sm]`: `(parent, deathsig, in_main, server)`.
fn parse_env(value: &OsString) -> Option<(u32, bool, bool, bool)> {
    let value = value.to_str()?;
    let mut parts = value.split(':');
    let fd: i32 = parts.next()?.parse().ok()?;
    let ppid: u32 = parts.next()?.parse().ok()?;
    let deathsig = match parts.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let (in_main, server) = match parts.next() {
        None => (false, false),
        Some("m") => (true, false),
        Some("s") => (false, true),
        Some("sm") => (true, true),
        Some(_) => return None,
    };
    (fd == CHILD_FD && parts.next().is_none()).then_some((ppid, deathsig, in_main, server))
}

/// What must happen on the thread the parent started: the death signal
/// follows that thread. `Err(code)` when the child must exit at once.
fn prepare(claim: &Claim) -> Result<(), i32> {
    sys::ignore_sigpipe();
    if claim.deathsig && sys::set_parent_death_signal().is_err() {
        return Err(EXIT_REFUSED);
    }
    if sys::parent_pid() != claim.parent {
        // The parent died before the death signal was armed.
        return Err(1);
    }
    Ok(())
}

/// What the thread named `main` gets: its alternate signal stack, and the
/// start, read and checked.
struct Handoff {
    alt_stack: Option<sys::boot::AltStack>,
    started: Started,
}

/// A start message, read and checked, its entry looked up: what to run,
/// and how.
struct Started {
    /// The socket to the parent; a forked `Process` child has none.
    channel: Option<Channel>,
    entry: &'static Entry,
    /// The child initializer, to run first.
    init: Option<(&'static Entry, Vec<u8>)>,
    mode: Mode,
    /// The start frame: the encoded arguments from `args_at`, and their
    /// descriptors.
    frame: Frame,
    args_at: usize,
}

/// Starts the thread named `main` that runs the child once it gets its
/// start, and ends the process.
fn start_main_thread(
    handed: std::sync::mpsc::Receiver<Handoff>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("main".into())
        .stack_size(sys::boot::main_stack_size())
        .spawn(move || {
            MAIN_THREAD.store(nix::unistd::gettid().as_raw() as u32, Ordering::Relaxed);
            // None: the process is exiting already.
            if let Ok(Handoff { alt_stack, started }) = handed.recv() {
                if let Some(alt_stack) = alt_stack {
                    let _ = alt_stack.install();
                }
                std::process::exit(run(started))
            }
        })
}

fn runtime_panicked(record: &PanicRecord) -> i32 {
    eprintln!("multiproc: child runtime panicked: {}", record.message);
    EXIT_RUNTIME_PANIC
}

/// Runs what the start names and reports. Returns the exit code; a panic
/// of the runtime itself is contained here.
fn run(started: Started) -> i32 {
    registry::catch(|| run_started(started)).unwrap_or_else(|record| runtime_panicked(&record))
}

/// Reads the start message, checks it and looks its entry up (everything
/// but running it, so that a load-time child does it while its main thread
/// starts). `Err(code)`: exit with it.
fn read_start(claim: Claim) -> Result<Started, i32> {
    registry::install_panic_hook();
    let mut channel = Channel::new(claim.socket);
    let frame = match channel.recv(Some(START_WAIT)) {
        Ok(frame) => frame,
        // The parent died or closed the socket before it could send.
        Err(Error::Disconnected) => return Err(1),
        Err(err) => {
            eprintln!("multiproc: no start message from the parent: {err}");
            return Err(EXIT_REFUSED);
        }
    };
    check_start(Some(channel), frame, claim.server, claim.deathsig)
}

/// Checks the start message `frame` and looks its entry up. `server`:
/// this process is the forkserver; `deathsig`: the death signal is armed
/// (otherwise a thread watches `channel`). `Err(code)`: exit with it.
fn check_start(
    channel: Option<Channel>,
    frame: Frame,
    server: bool,
    deathsig: bool,
) -> Result<Started, i32> {
    let (start, args_at) = match Message::parse(frame.tag, &frame.bytes) {
        Ok(Message::Start { start, args }) => (start, frame.bytes.len() - args.len()),
        Ok(_) => {
            eprintln!(
                "multiproc: the parent's first message has tag {} instead of a start",
                frame.tag
            );
            return Err(EXIT_REFUSED);
        }
        Err(err) => {
            eprintln!("multiproc: the parent's start message is malformed: {err}");
            return Err(EXIT_REFUSED);
        }
    };
    if start.exe != exe_identity() {
        return Err(refuse(
            channel.as_ref(),
            Error::BuildMismatch {
                expected: start.exe,
                found: exe_identity(),
            },
        ));
    }
    super::set_authkey(std::sync::Arc::from(&start.authkey[..]));
    set_identity(Identity {
        name: start.process_name.clone(),
        parent: Some((start.parent_name.clone(), start.parent_pid)),
    });
    if server != (start.name == super::protocol::FORKSERVER) {
        return Err(refuse(
            channel.as_ref(),
            Error::misuse(format!(
                "`{}` cannot run as {}",
                start.name,
                if server { "the forkserver" } else { "a child" }
            )),
        ));
    }
    if !deathsig && !server {
        // Started from a thread that may end before the parent does: the
        // death signal would follow that thread, so it was not armed, and
        // a watcher thread sees the parent's end of the socket close. (The
        // forkserver has no thread of its own: its loop watches.)
        if let Some(channel) = &channel {
            watch_parent(channel);
        }
    }
    let entry = match registry::lookup_name(&start.name) {
        Ok(entry) => entry,
        Err(Error::NotRegistered { name }) => {
            return Err(refuse(
                channel.as_ref(),
                Error::RegistrationMissing {
                    name,
                    parent_registrations: start.registry.count,
                    child_registrations: registry::fingerprint().count,
                },
            ));
        }
        Err(err) => return Err(refuse(channel.as_ref(), err)),
    };
    // The child initializer is looked up now (a missing name is a refusal
    // like the target's), run just before the target, and inherited. Not
    // in the forkserver: each child it forks gets (and runs) its own.
    let init = match start.init.filter(|_| !server) {
        None => None,
        Some((name, args)) => match registry::lookup_name(&name) {
            Ok(init) if init.internal_main().is_none() => {
                super::set_child_init(Some((name, args.clone())));
                Some((init, args))
            }
            Ok(_) => {
                return Err(refuse(
                    channel.as_ref(),
                    Error::invalid(format!("`{name}` is not a function to initialize a child")),
                ));
            }
            Err(err) => return Err(refuse(channel.as_ref(), err)),
        },
    };
    let kind_fits = match start.mode {
        Mode::Internal => entry.internal_main().is_some(),
        Mode::Process | Mode::Spawn => entry.internal_main().is_none(),
    };
    if !kind_fits {
        return Err(refuse(
            channel.as_ref(),
            Error::misuse(format!(
                "`{}` is not an entry point of the kind the parent asked for",
                start.name
            )),
        ));
    }
    if channel.is_none() && start.mode != Mode::Process {
        // Only a `Process` child sends nothing back.
        return Err(refuse(
            None,
            Error::misuse(format!("`{}` needs a socket to its parent", start.name)),
        ));
    }
    Ok(Started {
        channel,
        entry,
        init,
        mode: start.mode,
        frame,
        args_at,
    })
}

fn run_started(started: Started) -> i32 {
    let Started {
        channel,
        entry,
        init,
        mode,
        frame,
        args_at,
    } = started;
    if let Some((init, init_args)) = init {
        let mut out = Vec::new();
        let mut out_fds = Vec::new();
        if let Err(err) = init.invoke(&mut Call::single(
            &init_args,
            Vec::new(),
            &mut out,
            &mut out_fds,
        )) {
            return refuse(
                channel.as_ref(),
                Error::InitializerFailed {
                    message: format!("the child initializer `{}`: {err}", init.name()),
                },
            );
        }
    }
    let args = frame.bytes.get(args_at..).unwrap_or(&[]);
    match entry.internal_main() {
        Some(main) => match channel {
            Some(channel) => main(channel, args.to_vec(), frame.fds),
            None => refuse(
                None,
                Error::misuse(format!("`{}` needs a socket to its parent", entry.name())),
            ),
        },
        None => run_function(entry, mode, channel, args, frame.fds),
    }
}

/// Tells the parent why the child cannot run, and gives the exit code.
fn refuse(channel: Option<&Channel>, err: Error) -> i32 {
    eprintln!("multiproc: {err}");
    if let Some(channel) = channel {
        let _ = Message::Failed(err).send(channel, &[]);
    }
    EXIT_REFUSED
}

/// Where the panic hook reports under `panic = "abort"`.
static REPORT_TO: OnceLock<(Channel, Mode)> = OnceLock::new();

/// Under `panic = "abort"`: the panic hook's last act in a `Process` or
/// `spawn` child. Sends the record as an unwinding child would, and exits
/// with Python's code for an exception.
fn report_abort(record: PanicRecord) {
    if let Some((channel, mode)) = REPORT_TO.get() {
        if *mode == Mode::Spawn {
            let _ = Message::Panicked(record).send(channel, &[]);
        }
    }
    std::process::exit(1);
}

fn run_function(
    entry: &'static Entry,
    mode: Mode,
    channel: Option<Channel>,
    args: &[u8],
    fds: Vec<OwnedFd>,
) -> i32 {
    if cfg!(panic = "abort") {
        if let Some(Ok(fd)) = channel.as_ref().map(|c| c.fd().try_clone_to_owned()) {
            let _ = REPORT_TO.set((Channel::new(fd), mode));
            registry::set_abort_reporter(report_abort);
        }
    }
    let mut out = Vec::new();
    let mut out_fds = Vec::new();
    let result = entry.invoke(&mut Call::single(args, fds, &mut out, &mut out_fds));
    match result {
        Ok(()) => {
            if let (Mode::Spawn, Some(channel)) = (mode, &channel) {
                let _ = Message::Returned(&out).send(channel, &out_fds);
            }
            0
        }
        Err(Error::Panicked {
            message, location, ..
        }) => {
            if let (Mode::Spawn, Some(channel)) = (mode, &channel) {
                let record = PanicRecord { message, location };
                let _ = Message::Panicked(record).send(channel, &[]);
            }
            1
        }
        Err(err) => refuse(channel.as_ref(), err),
    }
}

/// A thread that kills this process when the parent's end of the socket
/// closes (the parent died, even by SIGKILL, or from a thread that the
/// death signal would not follow).
fn watch_parent(channel: &Channel) {
    let Ok(fd) = channel.fd().try_clone_to_owned() else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("multiproc-parent-watch".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let flags = sys::POLLRDHUP;
            if let Ok(ev) = sys::poll_one(fd.as_fd(), flags, None) {
                if ev.intersects(sys::POLLRDHUP | PollFlags::POLLHUP | PollFlags::POLLERR) {
                    sys::kill_self();
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_is_checked_whole() {
        let ok = |s: &str| parse_env(&OsString::from(s));
        assert_eq!(ok("3:42:1"), Some((42, true, false, false)));
        assert_eq!(ok("3:42:0"), Some((42, false, false, false)));
        assert_eq!(ok("3:42:1:m"), Some((42, true, true, false)));
        assert_eq!(ok("3:42:0:s"), Some((42, false, false, true)));
        assert_eq!(ok("3:42:0:sm"), Some((42, false, true, true)));
        assert_eq!(ok("3:42:0:s:m"), None);
        assert_eq!(ok("3:42:0:ms"), None);
        assert_eq!(ok("4:42:1"), None);
        assert_eq!(ok("3:42:1:x"), None);
        assert_eq!(ok("3:42:1:m:m"), None);
        assert_eq!(ok("3:42:yes"), None);
        assert_eq!(ok("3::1"), None);
        assert_eq!(ok(""), None);
    }
}
