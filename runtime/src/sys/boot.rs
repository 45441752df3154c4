//! What a process needs of the OS before `main`: a load-time hook, the
//! load-time constructors that come after it, and a stack-overflow report
//! for a thread that runs before std's runtime exists.
//!
//! # The hook and the constructors after it
//!
//! [`load_time_hook!`] places one function in `.init_array`, which the
//! loader calls before `main`, in the order the linker laid the entries
//! out. That order is not a contract (cross-crate LTO changes it), so the
//! hook must not rely on any other constructor having run. A process that
//! will never return to the loader (a child that runs its function and
//! exits) may instead call [`LoadTime::finish_then_exit`]: it runs every
//! entry of this executable's `.init_array` that lies *after* the hook's own
//! (those the loader has not called yet), then the given function, then
//! exits. Each constructor runs exactly once, and every registration is in
//! place whatever the link order.
//!
//! The array is found through `__init_array_start` / `__init_array_end`,
//! which the GNU, gold, lld and mold linkers define for every executable.
//!
//! # Stack overflows before std's runtime
//!
//! std installs its stack-overflow handler in `main`'s set-up. A thread
//! started earlier (the thread a load-time child runs on) gets
//! [`prepare_overflow_report`] instead: the same message std prints for a
//! thread of that name, then `SIGABRT`, as std does.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void};
use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};

/// A `.init_array` entry as glibc calls it: `(argc, argv, envp)`. musl
/// passes nothing; the entries that read these arguments are glibc-only.
pub(crate) type InitFn = extern "C" fn(c_int, *const *const c_char, *const *const c_char);

/// Places a function in this executable's `.init_array`: the loader calls
/// `$hook` with a [`LoadTime`] before `main`. Use once per program.
macro_rules! load_time_hook {
    ($hook:path) => {
        // The loader calls every `.init_array` entry once, before `main`,
        // as an `InitFn`; this static has exactly that type, and the
        // function it points to never unwinds (`enter` catches panics).
        #[used]
        #[unsafe(link_section = ".init_array")]
        static LOAD_TIME_HOOK: $crate::sys::boot::InitFn = {
            extern "C" fn load_time_hook(
                argc: ::core::ffi::c_int,
                argv: *const *const ::core::ffi::c_char,
                envp: *const *const ::core::ffi::c_char,
            ) {
                // SAFETY: this function is only ever called by the loader,
                // once, as the `.init_array` entry this macro places, with
                // the loader's own arguments; it is private to this
                // static, so nothing else can call it.
                unsafe { $crate::sys::boot::enter(load_time_hook, argc, argv, envp, $hook) };
            }
            load_time_hook
        };
    };
}
pub(crate) use load_time_hook;

/// The hook's view of the load: what the loader passed it, and where it is
/// in `.init_array`.
#[derive(Debug)]
pub(crate) struct LoadTime {
    me: InitFn,
    argc: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
}

/// Called by the function that [`load_time_hook!`] places. Never unwinds.
///
/// # Safety
///
/// Only from that function, as the loader calls it: `me` is the
/// `.init_array` entry itself, `argc`, `argv` and `envp` are the loader's
/// arguments, and this is before `main` (the [`LoadTime`] it makes runs
/// the constructors after `me`, which must not have run yet, and passes
/// them these arguments).
pub(crate) unsafe fn enter(
    me: InitFn,
    argc: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
    hook: fn(LoadTime),
) {
    let load = LoadTime {
        me,
        argc,
        argv,
        envp,
    };
    // Unwinding out of a constructor aborts: the hook catches its own
    // panics; this is the last line.
    if std::panic::catch_unwind(move || hook(load)).is_err() {
        std::process::exit(70);
    }
}

impl LoadTime {
    /// Runs the load-time constructors of this executable that come after
    /// the hook (the loader has not called them yet), then `f`, then exits
    /// with the code `f` returns. The process never returns to the loader,
    /// so each constructor runs once.
    ///
    /// If the hook is not found in the executable's `.init_array` (the
    /// runtime was linked into a shared library), no constructor is run
    /// here: `f` then runs with those that ran before the hook.
    pub(crate) fn finish_then_exit(self, f: impl FnOnce() -> i32) -> ! {
        let entries = init_array();
        let mine = self.me as usize;
        if let Some(at) = entries.iter().position(|&e| e == mine) {
            for &entry in &entries[at + 1..] {
                // 0 and -1 are the legacy `.ctors` end markers.
                if entry == 0 || entry == usize::MAX || entry == mine {
                    continue;
                }
                // SAFETY: every other entry of `.init_array` is a
                // constructor the compiler or linker placed there to be
                // called once, as the loader calls it: an `extern "C"`
                // function taking (argc, argv, envp), which this process
                // has not called (it lies after the hook, and the loader
                // calls the array in order) and will not call again (this
                // function exits instead of returning to the loader).
                let ctor = unsafe { std::mem::transmute::<usize, InitFn>(entry) };
                ctor(self.argc, self.argv, self.envp);
            }
        }
        std::process::exit(f())
    }
}

/// The entries of this executable's `.init_array`, as addresses.
fn init_array() -> &'static [usize] {
    unsafe extern "C" {
        static __init_array_start: [usize; 0];
        static __init_array_end: [usize; 0];
    }
    let start = (&raw const __init_array_start).cast::<usize>();
    let end = (&raw const __init_array_end).cast::<usize>();
    let bytes = (end as usize).saturating_sub(start as usize);
    if start.is_null() || bytes == 0 || start as usize % std::mem::align_of::<usize>() != 0 {
        return &[];
    }
    // SAFETY: the linker defines the two symbols at the first and one past
    // the last entry of the executable's `.init_array`, an array of
    // pointer-sized, pointer-aligned words (checked non-empty and aligned
    // above) in a segment that stays mapped, read-only after relocation,
    // for the life of the process.
    unsafe { std::slice::from_raw_parts(start, bytes / std::mem::size_of::<usize>()) }
}

// ---------------------------------------------------------------------
// Stack overflow.

/// The soft stack limit (what the main thread may grow to), clamped to
/// 1 MiB..1 GiB; 8 MiB when unlimited or unknown.
pub(crate) fn main_stack_size() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    const DEFAULT: usize = 8 << 20;
    match getrlimit(Resource::RLIMIT_STACK) {
        Ok((soft, _)) if soft != nix::sys::resource::RLIM_INFINITY => {
            usize::try_from(soft).map_or(DEFAULT, |s| s.clamp(1 << 20, 1 << 30))
        }
        _ => DEFAULT,
    }
}

/// The guard range of the thread whose overflow is reported, its name
/// (`'name' (`), and its thread id once it installed the report.
static GUARD_START: AtomicUsize = AtomicUsize::new(0);
static GUARD_END: AtomicUsize = AtomicUsize::new(0);
static PREFIX: OnceLock<Box<[u8]>> = OnceLock::new();
static TID: AtomicUsize = AtomicUsize::new(0);

/// Bytes of the alternate signal stack the handler runs on.
const ALT_STACK: usize = 64 * 1024;

/// The half of the stack-overflow report that only its thread can do:
/// giving itself the alternate signal stack ([`AltStack::install`]).
#[derive(Debug)]
pub(crate) struct AltStack {
    stack: std::ptr::NonNull<c_void>,
}

// SAFETY: the mapping is plain memory that nothing uses until the thread
// it was made for installs it; moving the pointer to that thread is the
// point.
unsafe impl Send for AltStack {}

/// Prepares, from any thread, the report of a stack overflow of `thread`
/// (a thread named `name`) as std's runtime gives it: std's message on
/// standard error, then `SIGABRT`. For a process that runs before std's
/// runtime is set up (std then has no handler of its own). `thread` must
/// then call [`AltStack::install`]. A `SIGSEGV` or `SIGBUS` elsewhere
/// keeps its default effect; a handler the program installed first is
/// left alone. Once per process: a later call fails.
pub(crate) fn prepare_overflow_report<T>(
    thread: &std::thread::JoinHandle<T>,
    name: &str,
) -> io::Result<AltStack> {
    use std::os::unix::thread::JoinHandleExt;
    if PREFIX
        .set(
            format!("\nthread '{name}' (")
                .into_bytes()
                .into_boxed_slice(),
        )
        .is_err()
    {
        return Err(io::Error::other(
            "the stack-overflow report is already set up",
        ));
    }
    let (low, guard) = stack_of(thread.as_pthread_t())?;
    GUARD_START.store(low.saturating_sub(guard), Ordering::SeqCst);
    GUARD_END.store(low.saturating_add(guard), Ordering::SeqCst);
    let stack = map_alt_stack()?;
    let action = SigAction::new(
        SigHandler::SigAction(on_fault),
        SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
        SigSet::empty(),
    );
    for signal in [Signal::SIGSEGV, Signal::SIGBUS] {
        // SAFETY: `on_fault` only reads atomics and static buffers, calls
        // write(2), sigaction(2) and abort(3), all async-signal-safe, so it
        // may run at any point of any thread.
        let old = unsafe { nix::sys::signal::sigaction(signal, &action) }?;
        if !matches!(old.handler(), SigHandler::SigDfl) {
            // The program has its own handler: give it back.
            // SAFETY: reinstates the handler that was there a moment ago.
            unsafe { nix::sys::signal::sigaction(signal, &old) }?;
        }
    }
    Ok(AltStack { stack })
}

impl AltStack {
    /// Gives the calling thread (the one the report was prepared for) its
    /// alternate signal stack, kept for the life of the process, so that
    /// the handler can run when the thread's own stack is exhausted.
    pub(crate) fn install(self) -> io::Result<()> {
        TID.store(nix::unistd::gettid().as_raw() as usize, Ordering::SeqCst);
        let ss = libc::stack_t {
            ss_sp: self.stack.as_ptr(),
            ss_flags: 0,
            ss_size: ALT_STACK,
        };
        // SAFETY: `ss` describes a mapping of ALT_STACK bytes that is never
        // unmapped; the old stack is not asked for.
        let rc = unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The lowest usable address of `thread`'s stack and the size of its guard.
/// `thread` comes from a `JoinHandle` not yet joined: its pthread is valid.
fn stack_of(thread: libc::pthread_t) -> io::Result<(usize, usize)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: `thread` is a thread of this process that nobody has joined
    // or detached (it comes from a borrowed `JoinHandle`), so its handle is
    // valid even if it has exited; `attr` is writable storage for one pthread_attr_t,
    // which pthread_getattr_np initializes on success.
    let rc = unsafe { libc::pthread_getattr_np(thread, attr.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let mut addr: *mut c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    let mut guard: libc::size_t = 0;
    // SAFETY: `attr` was initialized above; the out-pointers are valid.
    let rc_stack = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) };
    // SAFETY: as above.
    let rc_guard = unsafe { libc::pthread_attr_getguardsize(attr.as_ptr(), &mut guard) };
    // SAFETY: `attr` was initialized by pthread_getattr_np and is destroyed once.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    if rc_stack != 0 {
        return Err(io::Error::from_raw_os_error(rc_stack));
    }
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as usize);
    let guard = if rc_guard == 0 { guard.max(page) } else { page };
    Ok((addr as usize, guard))
}

/// A mapping for an alternate signal stack, never unmapped.
fn map_alt_stack() -> io::Result<std::ptr::NonNull<c_void>> {
    let len = std::num::NonZeroUsize::new(ALT_STACK).ok_or(io::ErrorKind::InvalidInput)?;
    let flags = nix::sys::mman::MapFlags::MAP_PRIVATE | nix::sys::mman::MapFlags::MAP_ANONYMOUS;
    let prot = nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE;
    // SAFETY: a fresh private anonymous mapping at an address the kernel
    // chooses overlaps no Rust object. It is never unmapped: the signal
    // stack must outlive the thread.
    Ok(unsafe { nix::sys::mman::mmap_anonymous(None, len, prot, flags) }?)
}

/// Writes `bytes` to standard error (async-signal-safe).
fn write_stderr(bytes: &[u8]) {
    // SAFETY: writes `bytes.len()` bytes of a live buffer to descriptor 2.
    let _ = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

extern "C" fn on_fault(signal: c_int, info: *mut libc::siginfo_t, _context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let info = unsafe { &*info };
    // SAFETY: for SIGSEGV/SIGBUS the kernel fills si_addr with the
    // faulting address.
    let addr = unsafe { info.si_addr() } as usize;
    let start = GUARD_START.load(Ordering::Relaxed);
    let end = GUARD_END.load(Ordering::Relaxed);
    if start <= addr && addr < end {
        // std's words: "\nthread 'NAME' (TID) has overflowed its stack".
        if let Some(prefix) = PREFIX.get() {
            write_stderr(prefix);
        }
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut tid = TID.load(Ordering::Relaxed);
        loop {
            at -= 1;
            digits[at] = b'0' + (tid % 10) as u8;
            tid /= 10;
            if tid == 0 || at == 0 {
                break;
            }
        }
        write_stderr(&digits[at..]);
        write_stderr(
            b") has overflowed its stack\nfatal runtime error: stack overflow, aborting\n",
        );
        // SAFETY: abort(3) is async-signal-safe and ends the process with
        // SIGABRT, as std does after a stack overflow.
        unsafe { libc::abort() };
    }
    // Not an overflow: restore the default and return, so the faulting
    // instruction runs again and the signal has its usual effect.
    // SAFETY: all-zero bytes are a valid `sigaction`: SIG_DFL (0), an
    // empty mask, no flags.
    let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    dfl.sa_sigaction = libc::SIG_DFL;
    // SAFETY: installs SIG_DFL for `signal` (async-signal-safe); the old
    // action is not asked for.
    unsafe { libc::sigaction(signal, &dfl, std::ptr::null_mut()) };
}
