//! The one error type of multiproc, and its `Result` alias.
//!
//! Every variant says what happened in words a user can act on: a child's
//! panic message, a dead worker's pid and signal, which function was not
//! registered. Putting into a queue and receiving from a queue or a pipe
//! have their own small error enums, crossbeam-channel's shapes (see
//! [`crate::queue`] and [`crate::connection`]): a `put` hands the item
//! back, a receive says `Disconnected`, `Empty` or `Timeout` or carries the
//! [`Error`] of a message that could not be received. Each converts into
//! [`Error`] for `?`. Everything else returns [`Result<T>`].
//!
//! Whose fault: [`Error::InvalidArgument`] is an argument out of range,
//! [`Error::Misuse`] a call the object's state does not allow, and
//! [`Error::Remote`] a failure another process could only describe in
//! words; an operation that would have had to wait is [`Error::Full`],
//! [`Error::Empty`] or [`Error::WouldBlock`], never [`Error::Timeout`],
//! which is a wait that ran out.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// `Result<T, multiproc::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a multiproc operation.
///
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a
/// `_` arm. [`Error::is_timeout`], [`Error::is_disconnected`] and
/// [`Error::panic_message`] answer the common questions without a match.
///
/// `Error` is `Serialize + Deserialize`, so a `#[process_fn]` may return
/// `multiproc::Result<T>` (an OS error travels as its errno and message).
#[derive(Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Error {
    /// The function or task type has no registration: it is a closure, a
    /// plain `fn` without `#[process_fn]`, or a type without
    /// `#[derive(ProcessTask)]`. Detected in the parent, before any process
    /// is started.
    NotRegistered {
        /// The Rust type name (for a lookup by value) or registered name
        /// (for a lookup by name in a child).
        name: String,
    },
    /// The child process could not find the registration its parent asked
    /// for (the executable is the same: this is not a rebuild).
    RegistrationMissing {
        /// The registered name the parent asked for.
        name: String,
        /// How many registrations the parent has.
        parent_registrations: u32,
        /// How many the child has.
        child_registrations: u32,
    },
    /// Two registrations share one name.
    DuplicateName {
        /// The name registered twice.
        name: String,
    },
    /// The function panicked in the child process.
    Panicked {
        /// The panic's message (`"explicit panic"` when it had none that is a string).
        message: String,
        /// `file:line:column` of the panic, when known.
        location: Option<String>,
        /// The pid of the process that panicked.
        pid: u32,
        /// For a pool map: the index of the input item whose task panicked.
        item: Option<usize>,
    },
    /// The process was killed by a signal before it returned a result.
    Killed {
        /// The pid of the process.
        pid: u32,
        /// The signal number (9 for SIGKILL, 15 for SIGTERM, ...).
        signal: i32,
    },
    /// The process exited (for instance through `std::process::exit`)
    /// without returning a result.
    Exited {
        /// The pid of the process.
        pid: u32,
        /// Its exit code.
        code: i32,
    },
    /// A pool worker died while running this task; the pool replaced it.
    WorkerDied {
        /// The pid of the worker that died.
        pid: u32,
        /// The signal that killed it, if a signal did.
        signal: Option<i32>,
        /// Its exit code, if it exited instead.
        code: Option<i32>,
    },
    /// The other end is gone (closed or its process died): Python's `EOFError`.
    Disconnected,
    /// The operation did not complete within its timeout.
    Timeout,
    /// The object was closed (a pool after `close()`, a closed queue...).
    Closed,
    /// A value could not be encoded.
    Encode {
        /// What the encoder said.
        message: String,
    },
    /// Bytes could not be decoded into the expected type.
    Decode {
        /// What the decoder said.
        message: String,
    },
    /// A message is larger than the configured limit.
    MessageTooLarge {
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The child was started from a different build of the program than the parent.
    BuildMismatch {
        /// The parent's build identity.
        expected: u64,
        /// The child's build identity.
        found: u64,
    },
    /// `start()` was called on a process that was already started.
    AlreadyStarted,
    /// The operation needs a started process.
    NotStarted,
    /// An argument was out of range (`Pool::new(0)`, a chunksize of 0, an
    /// index past the end...). For a call the object's state does not
    /// allow, see [`Error::Misuse`].
    InvalidArgument {
        /// What is wrong with it.
        message: String,
    },
    /// A pool's initializer, or the child initializer
    /// ([`set_child_initializer`](crate::set_child_initializer)), panicked
    /// or failed.
    InitializerFailed {
        /// Why.
        message: String,
    },
    /// A barrier was broken (a party timed out, died or reset it).
    BrokenBarrier,
    /// A lock was poisoned: a holder died (or panicked) while holding it,
    /// so the data it protects may be half-updated. Produced by `?` on a
    /// [`std::sync::PoisonError`] from [`crate::Lock::acquire`] and friends.
    Poisoned,
    /// An operating-system call failed.
    Io {
        /// What multiproc was doing.
        context: Cow<'static, str>,
        /// The underlying error.
        #[serde(with = "io_error_serde")]
        source: Arc<io::Error>,
    },
    /// A call the object's state or history does not allow: a bug in the
    /// calling code, not in its arguments. `Pool::join` before `close`,
    /// `JoinableQueue::task_done` called more often than items were put
    /// and `BoundedSemaphore::release` past its bound (Python's
    /// `ValueError` for the last two), a value taken twice from an
    /// `AsyncResult`, a `Process` built without a target, a connection
    /// sent on with unread data in its buffer.
    Misuse {
        /// What was done wrong, and what to do instead.
        message: String,
    },
    /// Another process (a pool worker) failed in a way it could only
    /// describe in words: an OS error there, or a report this process
    /// could not decode. Its own failures keep their variants
    /// ([`Error::Panicked`], [`Error::Decode`], ...).
    Remote {
        /// The pid of the process that failed, when known.
        pid: Option<u32>,
        /// What it said.
        message: String,
    },
    /// `try_put` on a full queue: Python's `queue.Full`. (Only a
    /// conversion from [`TryPutError::Full`](crate::queue::TryPutError::Full)
    /// gives it; a wait that ran out is [`Error::Timeout`].)
    Full,
    /// `try_get` or `try_recv` found nothing: Python's `queue.Empty`. (A
    /// wait that ran out is [`Error::Timeout`].)
    Empty,
    /// `try_acquire` found the lock held by another holder (`?` on
    /// [`std::sync::TryLockError::WouldBlock`]).
    WouldBlock,
    /// The pool task was cancelled before it started
    /// ([`AsyncResult::cancel`](crate::pool::AsyncResult::cancel)): Python's
    /// `concurrent.futures.CancelledError`.
    Cancelled,
    /// multiproc reached a state its own invariants rule out (a reader
    /// thread that panicked, a buffer that cannot be full): a bug in
    /// multiproc, not in the calling code or a peer. Please report it with
    /// the message.
    Internal {
        /// What went wrong, and where.
        message: String,
    },
    /// The peer of a [`Listener`](crate::connection::Listener) or
    /// [`Client`](crate::connection::Client) connection did not prove
    /// that it knows the authentication key, or refused the proof this
    /// side gave (Python's `multiprocessing.AuthenticationError`). Both
    /// sides of a key mismatch get it.
    AuthenticationError {
        /// What went wrong in the handshake.
        message: String,
    },
}

impl Error {
    /// `true` for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout)
    }

    /// `true` for [`Error::Cancelled`].
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Error::Cancelled)
    }

    /// `true` for [`Error::Disconnected`].
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Disconnected)
    }

    /// `true` for the errors of an operation that would have had to wait:
    /// [`Error::Full`], [`Error::Empty`] and [`Error::WouldBlock`]
    /// (`io::ErrorKind::WouldBlock`'s meaning). A timeout is not one of
    /// them: see [`is_timeout`](Error::is_timeout).
    pub fn is_would_block(&self) -> bool {
        matches!(self, Error::Full | Error::Empty | Error::WouldBlock)
    }

    /// The kind of the OS error, for [`Error::Io`]: for instance
    /// [`io::ErrorKind::NotFound`] when [`SharedMemory::open`](crate::shared::SharedMemory::open)
    /// finds no block of that name (Python's `FileNotFoundError`) and
    /// [`io::ErrorKind::AlreadyExists`] when
    /// [`SharedMemory::create`](crate::shared::SharedMemory::create) finds the
    /// name taken (`FileExistsError`).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// `true` for [`Error::AuthenticationError`].
    pub fn is_authentication_error(&self) -> bool {
        matches!(self, Error::AuthenticationError { .. })
    }

    /// The panic message, for [`Error::Panicked`].
    pub fn panic_message(&self) -> Option<&str> {
        match self {
            Error::Panicked { message, .. } => Some(message),
            _ => None,
        }
    }

    pub(crate) fn io(context: &'static str, source: io::Error) -> Error {
        Error::Io {
            context: Cow::Borrowed(context),
            source: Arc::new(source),
        }
    }

    pub(crate) fn errno(context: &'static str, errno: nix::errno::Errno) -> Error {
        Error::io(context, io::Error::from(errno))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidArgument {
            message: message.into(),
        }
    }

    /// An [`Error::Io`] of kind `kind` whose context names what failed.
    pub(crate) fn io_kind_owned(context: String, kind: io::ErrorKind) -> Error {
        Error::Io {
            context: Cow::Owned(context),
            source: Arc::new(io::Error::from(kind)),
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> Error {
        Error::Internal {
            message: message.into(),
        }
    }

    pub(crate) fn misuse(message: impl Into<String>) -> Error {
        Error::Misuse {
            message: message.into(),
        }
    }

    /// The error of a failed send or receive on a connection: `EPIPE` and
    /// `ECONNRESET` say that the peer is gone ([`Error::Disconnected`]).
    pub(crate) fn transport(context: &'static str, err: io::Error) -> Error {
        match err.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET) => Error::Disconnected,
            _ => Error::io(context, err),
        }
    }

    /// [`transport`](Error::transport), for nix's errors.
    pub(crate) fn transport_errno(context: &'static str, errno: nix::errno::Errno) -> Error {
        Error::transport(context, io::Error::from(errno))
    }
}

/// An `io::Error` on the wire: its errno if it has one, else its message.
mod io_error_serde {
    use std::io;
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(err: &Arc<io::Error>, s: S) -> Result<S::Ok, S::Error> {
        (err.raw_os_error(), err.to_string()).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<io::Error>, D::Error> {
        let (errno, message) = <(Option<i32>, String)>::deserialize(d)?;
        Ok(Arc::new(match errno {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::other(message),
        }))
    }
}

/// The conventional name of a signal number (`SIGKILL` for 9).
pub(crate) fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(sig) => sig.as_str().to_string(),
        Err(_) => format!("signal {signal}"),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotRegistered { name } if name.contains("{{closure}}") => {
                let place = name.split("::{{closure}}").next().unwrap_or(name);
                write!(
                    f,
                    "closures cannot run in another process; use a `#[process_fn]` fn \
                     (a closure in `{place}` was given where a registered function is needed)"
                )
            }
            Error::RegistrationMissing {
                name,
                parent_registrations,
                child_registrations,
            } => write!(
                f,
                "the child process has no registration named `{name}` (the parent has \
                 {parent_registrations} registrations, the child {child_registrations}). A crate \
                 whose items nothing references is dropped by the linker with its registrations: \
                 use one of its items"
            ),
            Error::NotRegistered { name } => write!(
                f,
                "`{name}` is not registered: add #[process_fn] to the function \
                 (or #[derive(ProcessTask)] to the type). If it is registered in a crate whose \
                 items nothing references, the linker dropped that crate with its \
                 registrations: use one of its items"
            ),
            Error::DuplicateName { name } => write!(
                f,
                "two functions or tasks are registered as `{name}`: give one a different \
                 name with #[process_fn(name = \"...\")]"
            ),
            Error::Panicked {
                message,
                location,
                pid,
                item,
            } => {
                write!(f, "process {pid} panicked")?;
                if let Some(item) = item {
                    write!(f, " on item {item}")?;
                }
                write!(f, ": {message}")?;
                if let Some(location) = location {
                    write!(f, " (at {location})")?;
                }
                Ok(())
            }
            Error::Killed { pid, signal } => write!(
                f,
                "process {pid} was killed by {} ({signal})",
                signal_name(*signal)
            ),
            Error::Exited { pid, code } => write!(
                f,
                "process {pid} exited with code {code} before returning a result"
            ),
            Error::WorkerDied { pid, signal, code } => {
                write!(f, "pool worker {pid} died")?;
                match (signal, code) {
                    (Some(sig), _) => write!(f, ", killed by {} ({sig})", signal_name(*sig))?,
                    (None, Some(code)) => write!(f, ", exit code {code}")?,
                    (None, None) => {}
                }
                write!(f, " while running this task; the pool replaced it")
            }
            Error::Disconnected => {
                f.write_str("disconnected: the other end is closed or its process died")
            }
            Error::Timeout => f.write_str("timed out"),
            Error::Closed => f.write_str("closed"),
            Error::Encode { message } => write!(f, "could not encode the value: {message}"),
            Error::Decode { message } => write!(f, "could not decode the value: {message}"),
            Error::MessageTooLarge { size, limit } => write!(
                f,
                "message of {size} bytes is larger than the limit of {limit} bytes"
            ),
            Error::BuildMismatch { expected, found } => write!(
                f,
                "the child runs a different build of the program (build {found:#x}, parent \
                 has {expected:#x}): was the executable rebuilt while the parent ran?"
            ),
            Error::AlreadyStarted => {
                f.write_str("the process was already started (a process can be started once)")
            }
            Error::NotStarted => f.write_str("the process was not started: call start() first"),
            Error::InvalidArgument { message } => write!(f, "invalid argument: {message}"),
            Error::InitializerFailed { message } => {
                write!(f, "an initializer failed: {message}")
            }
            Error::BrokenBarrier => {
                f.write_str("the barrier is broken (a party timed out, died or reset it)")
            }
            Error::Poisoned => f.write_str(
                "the lock is poisoned: a process or thread died or panicked while holding it, \
                 so the data it protects may be inconsistent",
            ),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Misuse { message } => write!(f, "misuse: {message}"),
            Error::Remote {
                pid: Some(pid),
                message,
            } => write!(f, "process {pid} failed: {message}"),
            Error::Remote { pid: None, message } => {
                write!(f, "another process failed: {message}")
            }
            Error::Full => f.write_str("the queue is full"),
            Error::Empty => f.write_str("nothing to receive right now"),
            Error::WouldBlock => f.write_str("the lock is held by another holder"),
            Error::Cancelled => f.write_str("the task was cancelled before it started"),
            Error::Internal { message } => write!(
                f,
                "internal error (a bug in multiproc, please report it): {message}"
            ),
            Error::AuthenticationError { message } => {
                write!(f, "authentication failed: {message}")
            }
        }
    }
}

/// The message a user can act on, as `Display` gives it, so that a `main`
/// returning `multiproc::Result` prints it (`{:#?}` adds the variant).
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "Error::{}: ", self.variant())?;
        }
        fmt::Display::fmt(self, f)
    }
}

impl Error {
    fn variant(&self) -> &'static str {
        match self {
            Error::NotRegistered { .. } => "NotRegistered",
            Error::RegistrationMissing { .. } => "RegistrationMissing",
            Error::DuplicateName { .. } => "DuplicateName",
            Error::Panicked { .. } => "Panicked",
            Error::Killed { .. } => "Killed",
            Error::Exited { .. } => "Exited",
            Error::WorkerDied { .. } => "WorkerDied",
            Error::Disconnected => "Disconnected",
            Error::Timeout => "Timeout",
            Error::Closed => "Closed",
            Error::Encode { .. } => "Encode",
            Error::Decode { .. } => "Decode",
            Error::MessageTooLarge { .. } => "MessageTooLarge",
            Error::BuildMismatch { .. } => "BuildMismatch",
            Error::AlreadyStarted => "AlreadyStarted",
            Error::NotStarted => "NotStarted",
            Error::InvalidArgument { .. } => "InvalidArgument",
            Error::InitializerFailed { .. } => "InitializerFailed",
            Error::BrokenBarrier => "BrokenBarrier",
            Error::Poisoned => "Poisoned",
            Error::Io { .. } => "Io",
            Error::Misuse { .. } => "Misuse",
            Error::Remote { .. } => "Remote",
            Error::Full => "Full",
            Error::Empty => "Empty",
            Error::WouldBlock => "WouldBlock",
            Error::Cancelled => "Cancelled",
            Error::Internal { .. } => "Internal",
            Error::AuthenticationError { .. } => "AuthenticationError",
        }
    }
}

impl From<io::Error> for Error {
    /// An error of the OS layer without more context: [`Error::Io`] for an
    /// OS error, [`Error::InvalidArgument`] for a refusal that says why in
    /// words (a range outside a mapping...).
    fn from(err: io::Error) -> Error {
        if err.raw_os_error().is_none() && err.kind() == io::ErrorKind::InvalidInput {
            return Error::InvalidArgument {
                message: err.to_string(),
            };
        }
        Error::io("an operating-system call failed", err)
    }
}

impl<T> From<std::sync::PoisonError<T>> for Error {
    /// `?` on a poisoned acquire: [`Error::Poisoned`] (the guard inside is
    /// dropped, which releases the lock).
    fn from(_: std::sync::PoisonError<T>) -> Error {
        Error::Poisoned
    }
}

impl<T> From<std::sync::TryLockError<T>> for Error {
    /// `?` on `try_acquire`/`acquire_timeout`: [`Error::WouldBlock`] when
    /// the lock was busy (`acquire_timeout` reports a lock that stayed
    /// busy the same way, as std's `TryLockError` has no timeout of its
    /// own), [`Error::Poisoned`] when it was poisoned.
    fn from(err: std::sync::TryLockError<T>) -> Error {
        match err {
            std::sync::TryLockError::WouldBlock => Error::WouldBlock,
            std::sync::TryLockError::Poisoned(_) => Error::Poisoned,
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// Defines the error enum of one receiving operation (a queue's `get`, a
/// connection's `recv`, and their `try_`/`_timeout` forms): the variants
/// given (each with its predicate, message and conversion into [`Error`]),
/// then `Disconnected` and `Failed(Error)` (a message that could not be
/// received), with `Display`, `std::error::Error` (the failure as its
/// `source`) and `From<_> for Error`. crossbeam-channel's shape.
macro_rules! receive_error {
    (
        $(#[$doc:meta])*
        $name:ident {
            $($(#[$vdoc:meta])* $variant:ident, $is:ident => $msg:expr, $to:expr;)*
        }
        $(#[$ddoc:meta])* Disconnected => $dmsg:expr;
        $(#[$fdoc:meta])* Failed => $fmsg:expr;
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
            $(#[$ddoc])*
            Disconnected,
            $(#[$fdoc])*
            Failed($crate::error::Error),
        }

        impl $name {
            $(
                #[doc = concat!("`true` for [`", stringify!($name), "::", stringify!($variant), "`].")]
                #[must_use]
                pub fn $is(&self) -> bool {
                    matches!(self, $name::$variant)
                }
            )*

            #[doc = concat!("`true` for [`", stringify!($name), "::Disconnected`].")]
            #[must_use]
            pub fn is_disconnected(&self) -> bool {
                matches!(self, $name::Disconnected)
            }

            #[doc = concat!("The error of [`", stringify!($name), "::Failed`].")]
            #[must_use]
            pub fn failure(&self) -> Option<&$crate::error::Error> {
                match self {
                    $name::Failed(e) => Some(e),
                    _ => None,
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                match self {
                    $($name::$variant => f.write_str($msg),)*
                    $name::Disconnected => f.write_str($dmsg),
                    $name::Failed(e) => write!(f, "{}: {e}", $fmsg),
                }
            }
        }

        impl ::std::error::Error for $name {
            fn source(&self) -> Option<&(dyn ::std::error::Error + 'static)> {
                match self {
                    $name::Failed(e) => Some(e),
                    _ => None,
                }
            }
        }

        impl From<$name> for $crate::error::Error {
            #[doc = concat!("`?` on a [`", stringify!($name), "`]: `Disconnected` is ")]
            /// [`Error::Disconnected`], `Failed(e)` is `e`.
            fn from(err: $name) -> $crate::error::Error {
                match err {
                    $($name::$variant => $to,)*
                    $name::Disconnected => $crate::error::Error::Disconnected,
                    $name::Failed(e) => e,
                }
            }
        }
    };
}

pub(crate) use receive_error;

/// `From<$from> for` each of the wider receive errors: the blocking
/// operation's error is one of the others' (crossbeam's
/// `From<RecvError> for TryRecvError`).
macro_rules! widen_receive_error {
    ($from:ident => $($to:ident),*) => {
        $(
            impl From<$from> for $to {
                fn from(err: $from) -> $to {
                    match err {
                        $from::Disconnected => $to::Disconnected,
                        $from::Failed(e) => $to::Failed(e),
                    }
                }
            }
        )*
    };
}

pub(crate) use widen_receive_error;

/// `take_error` and `Debug` for the receiving iterators of `Queue` and
/// `Connection` (`Iter`, `TryIter`, `IntoIter`), which keep the failure
/// that ended them in a field `error: Option<Error>`. `$doc` says what
/// else ends the iteration for that type.
macro_rules! iter_take_error {
    ($doc:literal: $($ty:ident $(<$lt:lifetime>)?),*) => {
        $(
            impl<$($lt,)? T> $ty<$($lt,)? T> {
                #[doc = $doc]
                ///
                /// Taking it leaves `None`.
                pub fn take_error(&mut self) -> Option<$crate::Error> {
                    self.error.take()
                }
            }

            impl<$($lt,)? T> ::std::fmt::Debug for $ty<$($lt,)? T> {
                fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                    f.debug_struct(stringify!($ty))
                        .field("error", &self.error)
                        .finish_non_exhaustive()
                }
            }
        )*
    };
}
pub(crate) use iter_take_error;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn would_block_is_not_a_timeout_and_the_new_variants_travel() {
        for err in [Error::Full, Error::Empty, Error::WouldBlock] {
            assert!(err.is_would_block() && !err.is_timeout(), "{err}");
        }
        assert!(!Error::Timeout.is_would_block());
        let remote = Error::Remote {
            pid: Some(7),
            message: "EBADF".into(),
        };
        assert_eq!(remote.to_string(), "process 7 failed: EBADF");
        assert_eq!(
            format!("{remote:#?}"),
            "Error::Remote: process 7 failed: EBADF"
        );
        let misuse = Error::misuse("join() needs close() first");
        assert_eq!(misuse.to_string(), "misuse: join() needs close() first");
        for err in [remote, misuse, Error::Full, Error::Empty, Error::WouldBlock] {
            let bytes = crate::codec::encode_plain(&err).expect("encode");
            let back: Error = crate::codec::decode_plain(&bytes).expect("decode");
            assert_eq!(back.to_string(), err.to_string());
            assert_eq!(back.variant(), err.variant());
        }
    }

    #[test]
    fn try_lock_errors_convert_to_would_block_and_poisoned() {
        let busy: std::sync::TryLockError<()> = std::sync::TryLockError::WouldBlock;
        assert!(matches!(Error::from(busy), Error::WouldBlock));
        let poisoned = std::sync::TryLockError::Poisoned(std::sync::PoisonError::new(()));
        assert!(matches!(Error::from(poisoned), Error::Poisoned));
    }
}
