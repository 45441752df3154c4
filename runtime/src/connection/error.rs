//! Per-operation errors of receiving from a [`Connection`](super::Connection)
//! or a [`Receiver`](super::Receiver): the shapes of
//! [`Queue`](crate::Queue)'s (and crossbeam-channel's). All convert into
//! [`crate::Error`] so that `?` works in a function returning
//! [`crate::Result`]: nothing to receive is [`Error::Empty`], a wait that
//! ran out [`Error::Timeout`], a peer that is gone [`Error::Disconnected`].

use crate::error::{Error, receive_error, widen_receive_error};

receive_error! {
    /// Why [`Connection::recv`](super::Connection::recv) failed.
    RecvError {}
    /// The other end is closed (every copy of it, in every process) or its
    /// process died, and nothing is left to read: Python's `EOFError`.
    Disconnected => "disconnected: the other end is closed or its process died";
    /// A message arrived but could not be received: it is not a `T`
    /// ([`Error::Decode`]), it is over the size limit
    /// ([`Error::MessageTooLarge`]; it was skipped), its descriptors did not
    /// fit this process, or the end is corrupt ([`Error::Io`]; see the
    /// [module docs](super)). The connection stays usable except when it is
    /// corrupt.
    Failed => "could not receive a message";
}

receive_error! {
    /// Why [`Connection::try_recv`](super::Connection::try_recv) failed.
    TryRecvError {
        /// No message is ready now.
        Empty, is_empty => "no message is ready", Error::Empty;
    }
    /// The other end is closed (every copy of it, in every process) or its
    /// process died, and nothing is left to read: Python's `EOFError`.
    Disconnected => "disconnected: the other end is closed or its process died";
    /// As [`RecvError::Failed`].
    Failed => "could not receive a message";
}

receive_error! {
    /// Why [`Connection::recv_timeout`](super::Connection::recv_timeout)
    /// failed.
    RecvTimeoutError {
        /// No whole message arrived within the timeout (a part that did
        /// stays buffered: the next call resumes it).
        Timeout, is_timeout => "timed out waiting for a message", Error::Timeout;
    }
    /// The other end is closed (every copy of it, in every process) or its
    /// process died, and nothing is left to read: Python's `EOFError`.
    Disconnected => "disconnected: the other end is closed or its process died";
    /// As [`RecvError::Failed`].
    Failed => "could not receive a message";
}

widen_receive_error!(RecvError => TryRecvError, RecvTimeoutError);

/// How the link's errors become a receive error: `Timeout` is the only
/// error a deadline adds, `Disconnected` the end of the stream; the rest
/// belong to the message.
pub(super) fn sort(err: Error) -> Sorted {
    match err {
        Error::Timeout => Sorted::Timeout,
        Error::Disconnected => Sorted::Disconnected,
        other => Sorted::Failed(other),
    }
}

pub(super) enum Sorted {
    Timeout,
    Disconnected,
    Failed(Error),
}

impl From<Sorted> for RecvError {
    /// Without a deadline there is no timeout: one would be a failure.
    fn from(s: Sorted) -> RecvError {
        match s {
            Sorted::Timeout => RecvError::Failed(Error::Timeout),
            Sorted::Disconnected => RecvError::Disconnected,
            Sorted::Failed(e) => RecvError::Failed(e),
        }
    }
}

impl From<Sorted> for TryRecvError {
    fn from(s: Sorted) -> TryRecvError {
        match s {
            Sorted::Timeout => TryRecvError::Empty,
            Sorted::Disconnected => TryRecvError::Disconnected,
            Sorted::Failed(e) => TryRecvError::Failed(e),
        }
    }
}

impl From<Sorted> for RecvTimeoutError {
    fn from(s: Sorted) -> RecvTimeoutError {
        match s {
            Sorted::Timeout => RecvTimeoutError::Timeout,
            Sorted::Disconnected => RecvTimeoutError::Disconnected,
            Sorted::Failed(e) => RecvTimeoutError::Failed(e),
        }
    }
}
