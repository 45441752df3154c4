//! `Process`: a function or task running in a child process, with Python's
//! `multiprocessing.Process` API; and `spawn`, std::thread's shape across
//! processes.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::child::{self, ChildProc, Mode, StartMethod};
use crate::codec;
use crate::error::{Error, Result};
use crate::registry::{self, Entry};
use crate::wire::Channel;

/// A registered function (`#[process_fn]`) callable with the argument tuple
/// `Args`: `fn(A, B) -> R` is `ProcessFn<(A, B)>`.
///
/// Implemented for every `Fn` of 0 to 8 arguments whose arguments are
/// `Serialize` and whose result is `DeserializeOwned`; whether the function
/// is *registered* is checked when it is used, before any process starts.
pub trait ProcessFn<Args>: 'static {
    /// What the function returns.
    type Output;
}

macro_rules! impl_process_fn {
    ($($arg:ident),*) => {
        impl<F, R, $($arg,)*> ProcessFn<($($arg,)*)> for F
        where
            F: Fn($($arg),*) -> R + 'static,
            $($arg: Serialize,)*
        {
            type Output = R;
        }
    };
}

impl_process_fn!();
impl_process_fn!(A1);
impl_process_fn!(A1, A2);
impl_process_fn!(A1, A2, A3);
impl_process_fn!(A1, A2, A3, A4);
impl_process_fn!(A1, A2, A3, A4, A5);
impl_process_fn!(A1, A2, A3, A4, A5, A6);
impl_process_fn!(A1, A2, A3, A4, A5, A6, A7);
impl_process_fn!(A1, A2, A3, A4, A5, A6, A7, A8);

/// What a process will run: a registered entry and its encoded arguments.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) entry: &'static Entry,
    pub(crate) args: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

impl Target {
    pub(crate) fn of_fn<F: ProcessFn<A>, A: Serialize>(_f: &F, args: &A) -> Result<Target> {
        let entry = registry::lookup_type::<F>()?;
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        codec::encode(args, &mut bytes, &mut fds)?;
        Ok(Target {
            entry,
            args: bytes,
            fds,
        })
    }

    pub(crate) fn of_task<T: crate::ProcessTask>(task: &T) -> Result<Target> {
        let entry = registry::lookup_type::<T>()?;
        let mut bytes = Vec::new();
        let mut fds = Vec::new();
        codec::encode(task, &mut bytes, &mut fds)?;
        Ok(Target {
            entry,
            args: bytes,
            fds,
        })
    }
}

/// How a child process ended, in Python's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitStatus {
    code: i32,
}

impl ExitStatus {
    /// From Python's `exitcode`: the exit code, or `-N` for signal N.
    pub(crate) fn from_code(code: i32) -> ExitStatus {
        ExitStatus { code }
    }

    /// `true` if the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Python's `exitcode`: the exit code, or `-N` when killed by signal N.
    pub fn code(&self) -> i32 {
        self.code
    }

    /// The signal that killed the process, if one did.
    pub fn signal(&self) -> Option<i32> {
        (self.code < 0).then_some(-self.code)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.signal() {
            Some(sig) => write!(f, "killed by {} ({sig})", crate::error::signal_name(sig)),
            None => write!(f, "exit code {}", self.code),
        }
    }
}

/// A started child with its bookkeeping, shared by its `Process` handle and
/// the process table (which joins it at the end of `main`).
#[derive(Debug)]
struct Running {
    child: ChildProc,
    name: String,
    daemon: bool,
    // Held open so that the child's parent watch sees the parent alive
    // (a forked child has none: it dies with the forkserver).
    _channel: Mutex<Option<Channel>>,
}

fn table() -> &'static Mutex<Vec<Arc<Running>>> {
    static TABLE: Mutex<Vec<Arc<Running>>> = Mutex::new(Vec::new());
    &TABLE
}

fn lock_table() -> std::sync::MutexGuard<'static, Vec<Arc<Running>>> {
    table().lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops a joined child from the table (Python's `_children.discard`).
fn forget(running: &Arc<Running>) {
    lock_table().retain(|r| !Arc::ptr_eq(r, running));
}

/// Drops reaped children from the table (Python's `_cleanup`).
fn sweep() {
    lock_table().retain(|r| !matches!(r.child.try_wait(), Ok(Some(_))));
}

/// A function or task running in a child process: Python's
/// `multiprocessing.Process`.
///
/// Build it with [`Process::new`] (a `#[process_fn]` function and its
/// argument tuple), [`Process::from_task`] (a `#[derive(ProcessTask)]`
/// value) or [`Process::builder`], then [`start`](Process::start) and
/// [`join`](Process::join) it. A process that is dropped while running is
/// not stopped: like Python, the end of `#[multiproc::main]` joins it (or
/// terminates it if it is daemonic).
///
/// # Examples
///
/// ```no_run
/// use multiproc::{process_fn, Process};
///
/// #[process_fn]
/// fn greet(name: String) {
///     println!("l am a {name}");
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let mut p = Process::new(greet, ("snake".to_string(),));
/// p.start()?;
/// assert!(p.join()?.success());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Process {
    name: String,
    daemon: bool,
    method: Option<StartMethod>,
    target: Option<Result<Target>>,
    running: Option<Arc<Running>>,
    /// After [`close`](Process::close): the exit code it had (`None` if it
    /// never started).
    closed: Option<Option<i32>>,
}

impl Process {
    /// A process that will run the registered function `f` with `args`, a
    /// tuple matching `f`'s parameters (`()` for none, `(x,)` for one).
    ///
    /// Nothing starts until [`start`](Process::start); an unregistered `f`
    /// (a closure, a fn without `#[process_fn]`) is reported there.
    #[must_use = "a Process does nothing until start() is called"]
    pub fn new<F, A>(f: F, args: A) -> Process
    where
        F: ProcessFn<A>,
        A: Serialize,
    {
        Process::builder().target(f, args).build()
    }

    /// A process that will run `task`'s [`ProcessTask::run`](crate::ProcessTask::run),
    /// like a Python `Process` subclass that overrides `run`. Its name is
    /// `task.name()` if that returns one.
    #[must_use = "a Process does nothing until start() is called"]
    pub fn from_task<T: crate::ProcessTask>(task: T) -> Process {
        Process::builder().task(task).build()
    }

    /// A builder to set the name and daemon flag.
    pub fn builder() -> ProcessBuilder {
        ProcessBuilder {
            name: None,
            daemon: false,
            method: None,
            target: None,
        }
    }

    /// Starts the child process.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyStarted`] on a second call; [`Error::NotRegistered`]
    /// if the target is not registered; [`Error::Encode`] if the arguments
    /// cannot be encoded; [`Error::Io`] if the OS refuses a new process.
    pub fn start(&mut self) -> Result<()> {
        self.check_open()?;
        if self.running.is_some() {
            return Err(Error::AlreadyStarted);
        }
        let target = match self.target.take() {
            None => return Err(Error::AlreadyStarted),
            Some(Err(err)) => {
                let again = err.clone();
                self.target = Some(Err(err));
                return Err(again);
            }
            Some(Ok(target)) => target,
        };
        sweep();
        register_shutdown_at_exit();
        let (child, channel) = child::start_process_by(
            self.method,
            target.entry.name(),
            &self.name,
            Mode::Process,
            &target.args,
            &target.fds,
        )?;
        let running = Arc::new(Running {
            child,
            name: self.name.clone(),
            daemon: self.daemon,
            _channel: Mutex::new(channel),
        });
        lock_table().push(Arc::clone(&running));
        self.running = Some(running);
        Ok(())
    }

    /// Waits for the process to end and returns how it ended. May be called
    /// again: it returns the same status.
    ///
    /// # Errors
    ///
    /// [`Error::NotStarted`] before [`start`](Process::start).
    pub fn join(&mut self) -> Result<ExitStatus> {
        self.check_open()?;
        let running = self.running.as_ref().ok_or(Error::NotStarted)?;
        let code = running.child.wait(None)?.ok_or(Error::Timeout)?;
        forget(running);
        Ok(ExitStatus::from_code(code))
    }

    /// Waits at most `timeout`: `Ok(None)` if the process still runs.
    ///
    /// # Errors
    ///
    /// [`Error::NotStarted`] before [`start`](Process::start).
    pub fn join_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.check_open()?;
        let running = self.running.as_ref().ok_or(Error::NotStarted)?;
        let code = running.child.wait(Some(timeout))?;
        if code.is_some() {
            forget(running);
        }
        Ok(code.map(ExitStatus::from_code))
    }

    /// `true` between `start` and the end of the child.
    pub fn is_alive(&self) -> bool {
        self.closed.is_none()
            && self
                .running
                .as_ref()
                .is_some_and(|r| matches!(r.child.try_wait(), Ok(None)))
    }

    /// The child's pid, once started.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.pid())
    }

    /// The process name (`Process-N` unless set).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the process is daemonic (terminated, not joined, at the end of main).
    pub fn daemon(&self) -> bool {
        self.daemon
    }

    /// Python's `exitcode`: `None` while running (or before start), the
    /// exit code after, `-N` if killed by signal N.
    pub fn exitcode(&self) -> Option<i32> {
        if let Some(code) = self.closed {
            return code;
        }
        let running = self.running.as_ref()?;
        running.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM (Python's `terminate()`).
    ///
    /// # Errors
    ///
    /// [`Error::NotStarted`] before start; an OS error if the signal cannot be sent.
    pub fn terminate(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Sends SIGKILL (Python's `kill()`).
    ///
    /// # Errors
    ///
    /// [`Error::NotStarted`] before start; an OS error if the signal cannot be sent.
    pub fn kill(&self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Python's `sentinel`: a descriptor that becomes readable when the
    /// process ends (its pidfd), `None` before [`start`](Process::start).
    /// Wait on it with [`wait`](crate::connection::wait), or with your own
    /// `poll`/`epoll` loop; it stays valid as long as this `Process`.
    pub fn sentinel(&self) -> Option<BorrowedFd<'_>> {
        self.running.as_ref().map(|r| r.child.sentinel())
    }

    /// Releases what the handle holds (CPython's `close()`): the child's
    /// pidfd and socket, its entry in the table of children, and the
    /// encoded arguments of a process never started (the descriptors of
    /// the handles among them). Afterwards [`start`](Process::start),
    /// [`join`](Process::join), [`terminate`](Process::terminate) and
    /// [`kill`](Process::kill) are [`Error::Misuse`], `pid()` and
    /// `sentinel()` are `None`, `is_alive()` is `false`, and
    /// [`exitcode`](Process::exitcode) keeps the code the process ended
    /// with (CPython raises `ValueError` there). Closing twice is fine.
    ///
    /// # Errors
    ///
    /// [`Error::Misuse`] while the process is running (as CPython's
    /// `ValueError`): nothing is released then.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{process_fn, Process};
    /// # #[process_fn] fn work() {}
    /// # fn main() -> multiproc::Result<()> {
    /// let mut p = Process::new(work, ());
    /// p.start()?;
    /// p.join()?;
    /// p.close()?;
    /// assert_eq!(p.exitcode(), Some(0));
    /// # Ok(())
    /// # }
    /// ```
    pub fn close(&mut self) -> Result<()> {
        if self.closed.is_some() {
            return Ok(());
        }
        let code = match &self.running {
            None => None,
            Some(running) => match running.child.try_wait()? {
                Some(code) => Some(code),
                None => {
                    return Err(Error::misuse(format!(
                        "cannot close process {} ({}) while it is running: join it first",
                        self.name,
                        running.child.pid()
                    )));
                }
            },
        };
        if let Some(running) = self.running.take() {
            forget(&running);
        }
        self.target = None;
        self.closed = Some(code);
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        match self.closed {
            Some(_) => Err(Error::misuse(format!(
                "process {} was closed (Process::close)",
                self.name
            ))),
            None => Ok(()),
        }
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        self.check_open()?;
        self.running
            .as_ref()
            .ok_or(Error::NotStarted)?
            .child
            .signal(signal)
    }
}

/// Builds a [`Process`]: `Process::builder().name("worker").daemon(true).target(f, args).build()`.
#[derive(Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct ProcessBuilder {
    name: Option<String>,
    daemon: bool,
    method: Option<StartMethod>,
    target: Option<(Result<Target>, Option<String>)>,
}

impl ProcessBuilder {
    /// The process name (`current_process().name()` in the child).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Daemonic processes are terminated, not joined, at the end of main.
    pub fn daemon(mut self, daemon: bool) -> Self {
        self.daemon = daemon;
        self
    }

    /// How the child starts (default: the program's,
    /// [`get_start_method`](crate::get_start_method) at `start`).
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.method = Some(method);
        self
    }

    /// Runs the registered function `f` with the argument tuple `args`.
    pub fn target<F, A>(mut self, f: F, args: A) -> Self
    where
        F: ProcessFn<A>,
        A: Serialize,
    {
        self.target = Some((Target::of_fn(&f, &args), None));
        self
    }

    /// Runs `task`'s `run` method.
    pub fn task<T: crate::ProcessTask>(mut self, task: T) -> Self {
        let name = task.name();
        self.target = Some((Target::of_task(&task), name));
        self
    }

    /// The process, not yet started. A builder without a target gives a
    /// process whose `start` fails with [`Error::Misuse`].
    #[must_use = "a Process does nothing until start() is called"]
    pub fn build(self) -> Process {
        let (target, task_name) = match self.target {
            Some((target, name)) => (target, name),
            None => (
                Err(Error::misuse(
                    "the process has no target: call .target(f, args) or .task(task)",
                )),
                None,
            ),
        };
        Process {
            name: self
                .name
                .or(task_name)
                .unwrap_or_else(child::next_process_name),
            daemon: self.daemon,
            method: self.method,
            target: Some(target),
            running: None,
            closed: None,
        }
    }
}

/// A handle to a function running in a child process, from [`spawn`]:
/// `join()` gives its return value, like `std::thread::JoinHandle`.
#[derive(Debug)]
#[must_use = "dropping a JoinHandle kills the child; call join()"]
pub struct JoinHandle<R> {
    child: ChildProc,
    channel: Channel,
    _result: std::marker::PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> JoinHandle<R> {
    /// Waits for the function to return and gives its value.
    ///
    /// # Errors
    ///
    /// [`Error::Panicked`] with the panic's message and location;
    /// [`Error::Killed`] with the signal if the child was killed;
    /// [`Error::Exited`] if it exited without returning;
    /// [`Error::Decode`] if the value does not decode as `R`.
    pub fn join(mut self) -> Result<R> {
        child::read_outcome(&self.child, &mut self.channel, None)
    }

    /// Like [`join`](JoinHandle::join), but gives up after `timeout` with
    /// [`Error::Timeout`]. The handle stays usable: wait again with `join`
    /// or `join_timeout` (a result that was arriving when the time ran out
    /// is kept, not lost), or drop it, which kills the child.
    ///
    /// # Errors
    ///
    /// As [`join`](JoinHandle::join), plus [`Error::Timeout`].
    pub fn join_timeout(&mut self, timeout: Duration) -> Result<R> {
        child::read_outcome(&self.child, &mut self.channel, Some(timeout))
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `true` once the child has ended.
    pub fn is_finished(&self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends SIGKILL to the child.
    ///
    /// # Errors
    ///
    /// An OS error if the signal cannot be sent.
    pub fn kill(&self) -> Result<()> {
        self.child.signal(Signal::SIGKILL)
    }
}

/// Ready once the process has ended (its [`sentinel`](Process::sentinel)).
impl crate::connection::Waitable for Process {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        self.sentinel().ok_or(Error::NotStarted)
    }
}

/// Ready once the child has ended.
impl<R> crate::connection::Waitable for JoinHandle<R> {
    fn wait_fd(&self) -> Result<BorrowedFd<'_>> {
        Ok(self.child.sentinel())
    }
}

/// Runs the registered function `f` with `args` in a new child process and
/// returns a handle whose `join()` gives the function's return value:
/// `std::thread::spawn`, across processes.
///
/// # Errors
///
/// [`Error::NotRegistered`] for a closure or a function without
/// `#[process_fn]` (no process is started); [`Error::Encode`] if `args`
/// cannot be encoded; [`Error::Io`] if the OS refuses a new process.
///
/// # Examples
///
/// ```no_run
/// use multiproc::process_fn;
///
/// #[process_fn]
/// fn add(a: u32, b: u32) -> u32 {
///     a + b
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let handle = multiproc::spawn(add, (2, 3))?;
/// assert_eq!(handle.join()?, 5);
/// # Ok(())
/// # }
/// ```
pub fn spawn<F, A>(f: F, args: A) -> Result<JoinHandle<F::Output>>
where
    F: ProcessFn<A>,
    A: Serialize,
{
    spawn_by(None, f, args)
}

/// [`spawn`] by `method` (`None`: the program's default).
pub(crate) fn spawn_by<F, A>(
    method: Option<StartMethod>,
    f: F,
    args: A,
) -> Result<JoinHandle<F::Output>>
where
    F: ProcessFn<A>,
    A: Serialize,
{
    let target = Target::of_fn(&f, &args)?;
    let name = child::next_process_name();
    let (child, channel) = child::start_child_by(
        method,
        target.entry.name(),
        &name,
        Mode::Spawn,
        &target.args,
        &target.fds,
    )?;
    Ok(JoinHandle {
        child,
        channel,
        _result: std::marker::PhantomData,
    })
}

/// A process as `current_process()`, `parent_process()` and
/// `active_children()` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    name: String,
    pid: u32,
    daemon: bool,
    authkey: Option<AuthKey>,
}

impl ProcessInfo {
    /// The process name (`MainProcess` for the main process).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it is daemonic.
    pub fn daemon(&self) -> bool {
        self.daemon
    }

    /// The process's authentication key (CPython's
    /// `current_process().authkey`): `Some` for [`current_process`] (see
    /// [`authkey`]), `None` for the others, whose keys this process does
    /// not keep.
    pub fn authkey(&self) -> Option<&AuthKey> {
        self.authkey.as_ref()
    }
}

/// An authentication key: the secret a
/// [`Listener`](crate::connection::Listener) and a
/// [`Client`](crate::connection::Client) both prove they know before any
/// message passes. `Debug` does not show the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey(Arc<[u8]>);

impl AuthKey {
    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey(<{} bytes>)", self.0.len())
    }
}

impl std::ops::Deref for AuthKey {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for AuthKey {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for AuthKey {
    fn from(bytes: &[u8]) -> AuthKey {
        AuthKey(Arc::from(bytes))
    }
}

impl From<Vec<u8>> for AuthKey {
    fn from(bytes: Vec<u8>) -> AuthKey {
        AuthKey(Arc::from(bytes))
    }
}

impl From<&str> for AuthKey {
    fn from(text: &str) -> AuthKey {
        AuthKey::from(text.as_bytes())
    }
}

/// This process's authentication key, CPython's
/// `current_process().authkey`: in the main process 32 random bytes
/// (from the kernel's CSPRNG, made on first use and then kept), in a child
/// the key of the parent that started it, unless [`set_authkey`] replaced
/// it. Pass it to [`Listener::bind`](crate::connection::Listener::bind)
/// and [`Client::connect`](crate::connection::Client::connect) to let
/// only this program's processes in.
///
/// # Errors
///
/// [`Error::Io`] if the kernel gives no random bytes
/// (it always does on a supported kernel).
///
/// # Examples
///
/// ```
/// let key = multiproc::process::authkey()?;
/// assert_eq!(key.len(), 32);
/// assert_eq!(multiproc::process::authkey()?, key); // kept
/// # Ok::<(), multiproc::Error>(())
/// ```
pub fn authkey() -> Result<AuthKey> {
    child::authkey().map(AuthKey)
}

/// Replaces this process's authentication key (CPython's
/// `current_process().authkey = key`); children started from now on
/// inherit it.
pub fn set_authkey(key: impl Into<AuthKey>) {
    child::set_authkey(key.into().0);
}

/// This process: `MainProcess` in the parent, the name it was started with
/// in a child.
pub fn current_process() -> ProcessInfo {
    ProcessInfo {
        name: child::identity().name.clone(),
        pid: std::process::id(),
        daemon: false,
        authkey: authkey().ok(),
    }
}

/// The process that started this one, or `None` in the main process
/// (CPython's `parent_process()`): its name and pid, whether it is alive,
/// and a way to wait for its end.
pub fn parent_process() -> Option<ParentProcess> {
    child::identity()
        .parent
        .as_ref()
        .map(|(name, pid)| ParentProcess {
            info: ProcessInfo {
                name: name.clone(),
                pid: *pid,
                daemon: false,
                authkey: None,
            },
        })
}

/// The process that started this one, from [`parent_process`]: CPython's
/// `_ParentProcess`, with `is_alive()` and `join(timeout)`.
///
/// It is watched through a pidfd, opened once per process and checked
/// against `getppid()` (so a pid reused by another process after the
/// parent died is never taken for it; a child of the forkserver, whose OS
/// parent is the server, opens it by pid: the server and its children die
/// with the program that started them). A child usually dies with its
/// parent (see the crate docs: the death signal, or the watcher thread),
/// so waiting for the parent mostly matters in a child that outlives it
/// on purpose, or to learn it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentProcess {
    info: ProcessInfo,
}

impl ParentProcess {
    /// The parent's name.
    pub fn name(&self) -> &str {
        self.info.name()
    }

    /// The parent's pid.
    pub fn pid(&self) -> u32 {
        self.info.pid()
    }

    /// Whether it is daemonic (never, as in CPython: a parent is not).
    pub fn daemon(&self) -> bool {
        self.info.daemon()
    }

    /// The parent as a [`ProcessInfo`].
    pub fn info(&self) -> &ProcessInfo {
        &self.info
    }

    /// A pidfd of the parent, or `None` if it is gone (this process was
    /// given to another parent).
    fn pidfd(&self) -> Option<BorrowedFd<'static>> {
        static PIDFD: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
        let pid = self.info.pid;
        PIDFD
            .get_or_init(|| {
                let ppid = || nix::unistd::getppid().as_raw() as u32;
                let forked = ppid() != pid && ppid() == crate::child::forkserver_pid();
                if ppid() != pid && !forked {
                    return None;
                }
                let fd = crate::sys::pidfd_open(nix::unistd::Pid::from_raw(pid as i32)).ok()?;
                // Still our parent after the open: the pidfd is its (a
                // parent that dies gives its children to another process).
                // A child of the forkserver has the server as its OS parent
                // and dies with it, which dies with the program that asked
                // for the child: its pidfd is opened by pid, alive or not.
                (forked || ppid() == pid).then_some(fd)
            })
            .as_ref()
            .map(std::os::fd::AsFd::as_fd)
    }

    /// `true` while the parent runs (CPython's `is_alive()`).
    pub fn is_alive(&self) -> bool {
        matches!(self.join_timeout(Duration::ZERO), Ok(false))
    }

    /// Waits at most `timeout` for the parent to end; `Ok(true)` once it
    /// has (CPython's `join(timeout)`, which tells it with `is_alive()`).
    ///
    /// # Errors
    ///
    /// An OS error if the pidfd cannot be polled.
    pub fn join_timeout(&self, timeout: Duration) -> Result<bool> {
        let Some(fd) = self.pidfd() else {
            return Ok(true);
        };
        let ready = crate::sys::poll_one(fd, nix::poll::PollFlags::POLLIN, Some(timeout))
            .map_err(|e| Error::io("poll", e))?;
        Ok(!ready.is_empty())
    }

    /// Python's `sentinel`: a descriptor that becomes readable when the
    /// parent ends (`None` if it already has).
    pub fn sentinel(&self) -> Option<BorrowedFd<'static>> {
        self.pidfd()
    }
}

/// Sets the child initializer: the registered function `f`
/// (`#[process_fn]`), called with `args` in every child started from now
/// on (by [`Process`], [`spawn`] and the workers of a [`Pool`](crate::Pool))
/// before anything else runs there, and inherited by their own children.
/// It is the place to set up per-process state that a child does not
/// inherit, such as a logger: multiproc reports worker deaths and
/// replacements through the [`log`](https://docs.rs/log) facade, which
/// prints nothing until a logger is installed, in each process.
///
/// The function travels by its registered name, so this works in every
/// build (LTO, functions registered in a library crate); its arguments
/// are plain data (no handles). It runs on the child's main thread, before
/// a pool's own initializer; if it panics, the child does not run its
/// target: [`spawn`]'s `join` and a pool report
/// [`Error::InitializerFailed`], a [`Process`] exits with a failure code.
///
/// # Errors
///
/// [`Error::NotRegistered`] if `f` is not registered;
/// [`Error::InvalidArgument`] if `args` hold handles; [`Error::Encode`] if
/// they cannot be encoded.
///
/// # Examples
///
/// ```no_run
/// use multiproc::{process_fn, Pool};
///
/// #[process_fn]
/// fn setup_logging(level: String) {
///     // e.g. env_logger::Builder::new().parse_filters(&level).init();
///     let _ = level;
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// multiproc::set_child_initializer(setup_logging, ("warn".to_string(),))?;
/// let pool = Pool::new(4)?; // every worker runs setup_logging first
/// # Ok(())
/// # }
/// ```
pub fn set_child_initializer<F, A>(f: F, args: A) -> Result<()>
where
    F: ProcessFn<A>,
    A: Serialize,
{
    let target = Target::of_fn(&f, &args)?;
    if !target.fds.is_empty() {
        return Err(Error::invalid(
            "the child initializer's arguments cannot hold handles (Lock, Value, Queue...): \
             they are sent to every child as plain bytes",
        ));
    }
    child::set_child_init(Some((target.entry.name().to_string(), target.args)));
    Ok(())
}

/// Removes the child initializer: children started from now on run none.
pub fn clear_child_initializer() {
    child::set_child_init(None);
}

/// The children started with [`Process`] that are still running (reaping
/// those that ended, as Python's `active_children()` does).
pub fn active_children() -> Vec<ProcessInfo> {
    sweep();
    lock_table()
        .iter()
        .map(|r| ProcessInfo {
            name: r.name.clone(),
            pid: r.child.pid(),
            daemon: r.daemon,
            authkey: None,
        })
        .collect()
}

/// The number of CPUs this process may run on.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Ends the program the way Python does at exit: daemonic children are
/// terminated, the others joined. `#[multiproc::main]` calls this when
/// `main` returns; call it yourself at the end of a hand-written `main`.
pub fn shutdown() {
    let children: Vec<Arc<Running>> = std::mem::take(&mut *lock_table());
    for running in &children {
        if running.daemon {
            let _ = running.child.signal(Signal::SIGTERM);
        }
    }
    for running in &children {
        let _ = running.child.wait(None);
    }
}

extern "C" fn shutdown_at_exit() {
    // Unwinding out of an atexit handler would abort: contain it.
    let _ = crate::registry::catch(shutdown);
}

/// Python joins non-daemonic children at exit even without an explicit
/// join; so does multiproc, with or without `#[multiproc::main]`.
fn register_shutdown_at_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = crate::sys::at_exit(shutdown_at_exit);
    });
}

/// Used by `#[multiproc::main]`: calls [`shutdown`] when `main` ends,
/// returning or panicking. Not public API.
#[doc(hidden)]
#[derive(Debug)]
pub struct MainGuard(());

impl MainGuard {
    /// Used by `#[multiproc::main]`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> MainGuard {
        MainGuard(())
    }
}

impl Drop for MainGuard {
    fn drop(&mut self) {
        shutdown();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[crate::process_fn]
    fn double(x: i64) -> i64 {
        x * 2
    }

    #[multiproc::test]
    fn multiproc_test_attribute_works_in_a_unit_test() {
        let mut handle = crate::spawn(double, (21,)).expect("spawn");
        assert_eq!(
            handle.join_timeout(Duration::from_secs(30)).expect("join"),
            42
        );
    }

    #[test]
    fn plain_test_attribute_works_too() {
        let mut p = crate::Process::new(double, (1,));
        p.start().expect("start");
        let status = p
            .join_timeout(Duration::from_secs(30))
            .expect("join")
            .expect("ended");
        assert!(status.success());
    }
}
