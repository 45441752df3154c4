//! Per-operation errors of queues. Those of `put` give the item back
//! (crossbeam's `SendError` shape); all convert into [`crate::Error`] so
//! that `?` works in a function returning [`crate::Result`]: a full queue
//! is [`Error::Full`], an empty one [`Error::Empty`], a wait that ran out
//! [`Error::Timeout`].

use std::fmt;

use crate::error::{Error, receive_error, widen_receive_error};

macro_rules! item_error {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident, $is:ident => $msg:expr, $to:expr;)* }) => {
        $(#[$doc])*
        #[non_exhaustive]
        pub enum $name<T> {
            $($(#[$vdoc])* $variant(T),)*
            /// The item could not be encoded, or the OS refused an
            /// operation; the item is handed back with the reason.
            Failed(T, Error),
        }

        impl<T> $name<T> {
            $(
                #[doc = concat!("`true` for [`", stringify!($name), "::", stringify!($variant), "`].")]
                #[must_use]
                pub fn $is(&self) -> bool {
                    matches!(self, $name::$variant(_))
                }
            )*

            /// The item that was not put.
            pub fn into_inner(self) -> T {
                match self {
                    $($name::$variant(item) => item,)*
                    $name::Failed(item, _) => item,
                }
            }
        }

        impl<T> fmt::Debug for $name<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $($name::$variant(_) => f.write_str(concat!(stringify!($variant), "(..)")),)*
                    $name::Failed(_, e) => write!(f, "Failed(.., {e:?})"),
                }
            }
        }

        impl<T> fmt::Display for $name<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $($name::$variant(_) => f.write_str($msg),)*
                    $name::Failed(_, e) => write!(f, "could not put the item: {e}"),
                }
            }
        }

        impl<T> std::error::Error for $name<T> {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                match self {
                    $name::Failed(_, e) => Some(e),
                    _ => None,
                }
            }
        }

        impl<T> From<$name<T>> for Error {
            fn from(err: $name<T>) -> Error {
                match err {
                    $($name::$variant(_) => $to,)*
                    $name::Failed(_, e) => e,
                }
            }
        }
    };
}

item_error! {
    /// Why [`Queue::put`](super::Queue::put) failed.
    PutError {
        /// The queue was closed.
        Closed, is_closed => "the queue is closed", Error::Closed;
    }
}

item_error! {
    /// Why [`Queue::try_put`](super::Queue::try_put) failed.
    TryPutError {
        /// The queue is full.
        Full, is_full => "the queue is full", Error::Full;
        /// The queue was closed.
        Closed, is_closed => "the queue is closed", Error::Closed;
    }
}

item_error! {
    /// Why [`Queue::put_timeout`](super::Queue::put_timeout) failed.
    PutTimeoutError {
        /// The queue stayed full for the whole timeout.
        Timeout, is_timeout => "timed out waiting for room in the queue", Error::Timeout;
        /// The queue was closed.
        Closed, is_closed => "the queue is closed", Error::Closed;
    }
}

receive_error! {
    /// Why [`Queue::get`](super::Queue::get) failed.
    GetError {}
    /// The queue was closed and is empty.
    Disconnected => "the queue is closed and empty";
    /// A message could not be decoded as the queue's type (it is
    /// consumed), or the OS refused an operation.
    Failed => "could not get an item";
}

receive_error! {
    /// Why [`Queue::try_get`](super::Queue::try_get) failed.
    TryGetError {
        /// Nothing to get right now.
        Empty, is_empty => "the queue is empty", Error::Empty;
    }
    /// The queue was closed and is empty.
    Disconnected => "the queue is closed and empty";
    /// A message could not be decoded as the queue's type (it is
    /// consumed), or the OS refused an operation.
    Failed => "could not get an item";
}

receive_error! {
    /// Why [`Queue::get_timeout`](super::Queue::get_timeout) failed.
    GetTimeoutError {
        /// Nothing arrived within the timeout.
        Timeout, is_timeout => "timed out waiting for an item", Error::Timeout;
    }
    /// The queue was closed and is empty.
    Disconnected => "the queue is closed and empty";
    /// A message could not be decoded as the queue's type (it is
    /// consumed), or the OS refused an operation.
    Failed => "could not get an item";
}

widen_receive_error!(GetError => TryGetError, GetTimeoutError);

/// Why [`Queue::put_many`](super::Queue::put_many) (or its `try_` or
/// `_timeout` form) stopped before the end of the slice. Each variant says
/// how many items, the first ones of the slice, were put before it
/// stopped ([`put`](PutManyError::put)): the others were not, and are still
/// the caller's.
#[non_exhaustive]
#[derive(Debug)]
pub enum PutManyError {
    /// The queue was closed.
    Closed {
        /// Items put before.
        put: usize,
    },
    /// The queue stayed full until the deadline (`put_many_timeout` only).
    Timeout {
        /// Items put before.
        put: usize,
    },
    /// The item at index `put` could not be encoded, or the OS refused an
    /// operation.
    Failed {
        /// Items put before.
        put: usize,
        /// What went wrong.
        error: Error,
    },
}

impl PutManyError {
    /// How many items (the first ones of the slice) were put.
    #[must_use]
    pub fn put(&self) -> usize {
        match self {
            PutManyError::Closed { put }
            | PutManyError::Timeout { put }
            | PutManyError::Failed { put, .. } => *put,
        }
    }
}

impl fmt::Display for PutManyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutManyError::Closed { put } => {
                write!(f, "the queue is closed (after {put} items were put)")
            }
            PutManyError::Timeout { put } => write!(
                f,
                "timed out waiting for room in the queue (after {put} items were put)"
            ),
            PutManyError::Failed { put, error } => {
                write!(f, "could not put item {put} of the batch: {error}")
            }
        }
    }
}

impl std::error::Error for PutManyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PutManyError::Failed { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<PutManyError> for Error {
    fn from(err: PutManyError) -> Error {
        match err {
            PutManyError::Closed { .. } => Error::Closed,
            PutManyError::Timeout { .. } => Error::Timeout,
            PutManyError::Failed { error, .. } => error,
        }
    }
}
