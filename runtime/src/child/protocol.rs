//! The start protocol between a parent and a child it started: every
//! message, its tag and its layout, in one place.
//!
//! Each message is one frame of [`crate::wire`] (the frame header carries
//! the tag) on the socket at the child's descriptor [`CHILD_FD`]:
//!
//! | message | direction | tag | bytes after the frame header | descriptors |
//! |---|---|---|---|---|
//! | [`Message::Start`] | parent → child | 1 | `header_len: u32`, the [`Start`] header (codec), the encoded arguments | the arguments' handles |
//! | [`Message::Returned`] | child → parent (`spawn` only) | 2 | the encoded return value | its handles |
//! | [`Message::Panicked`] | child → parent (`spawn` only) | 3 | a [`PanicRecord`] (codec) | none |
//! | [`Message::Failed`] | child → parent | 4 | an [`Error`] (codec): the child could not run what was asked | none |
//!
//! Integers are little-endian. The arguments and the return value are
//! passed on untouched (their decoder is the caller's, which knows their
//! types). A runtime-internal entry (the pool worker) speaks its own
//! protocol on the socket after the start (`pool::protocol`), where a
//! [`Message::Failed`] can still arrive before the worker ran.
//!
//! The forkserver ([`super::server`]) is started with a start message
//! naming [`FORKSERVER`], whose arguments are its [`Preloads`], and then
//! speaks its own protocol on the same socket:
//!
//! | message | direction | tag | bytes | descriptors |
//! |---|---|---|---|---|
//! | start | program → server | 1 | a [`Message::Start`] of [`FORKSERVER`], the [`Preloads`] (codec) as its arguments | none |
//! | ready | server → program | 16 | none | none |
//! | failed | server → program | 4 | a [`Message::Failed`]: the preload failed, or the server is not single-threaded | none |
//! | fork | program → server | 17 | none | the child's end of its socket, the write end of its status pipe |
//! | fork and start | program → server | 20 | `socket: u8` (1: the child has a socket), then the child's start message (the bytes of a [`Message::Start`]) | the write end of its status pipe, the child's end of its socket when `socket` is 1, then the start's descriptors |
//! | forked | server → program | 18 | `pid: u32` | a pidfd of the child |
//! | fork failed | server → program | 19 | `errno: i32` | none |
//! | assign | server → spare | 21 | `socket: u8`, `start: u8` (1: present), then the start message's bytes when `start` is 1 | the child's end of its socket when `socket` is 1, then the start's descriptors |
//!
//! A fork and start carries the child's start message in the request
//! itself: the child finds it in the memory it got from the server, with
//! its descriptors already open, and reads nothing before it runs. A
//! `Process` child, which sends nothing back, then has no socket at all
//! (its exit status comes by the status pipe); a `spawn` child or a pool
//! worker has one for its answers. A start message too long to ride in a
//! request goes the old way: a fork, then the start on the child's socket.
//!
//! The server keeps one child forked ahead, its spare, which waits on a
//! socket of its own (its link) for an assign: the request's socket and
//! start, passed on as they came (the status pipe stays with the server).
//!
//! [`CHILD_FD`]: super::CHILD_FD

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};
use crate::registry::{Fingerprint, PanicRecord};
use crate::wire::{Channel, Frame};

pub(super) const TAG_START: u32 = 1;
const TAG_RETURNED: u32 = 2;
const TAG_PANICKED: u32 = 3;
const TAG_FAILED: u32 = 4;

/// The forkserver's registered name (an internal entry, `child::server`).
pub(crate) const FORKSERVER: &str = "__multiproc::forkserver";

/// The forkserver's tags (see the module docs).
pub(super) const TAG_READY: u32 = 16;
pub(super) const TAG_FORK: u32 = 17;
pub(super) const TAG_FORKED: u32 = 18;
pub(super) const TAG_FORK_FAILED: u32 = 19;
pub(super) const TAG_FORK_START: u32 = 20;
pub(super) const TAG_ASSIGN: u32 = 21;

/// The forkserver's preloads: what it runs before it is ready, registered
/// names and their encoded (empty) arguments.
pub(super) type Preloads = Vec<(String, Vec<u8>)>;

/// What the parent wants from the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Mode {
    /// `Process`: run, discard the return value, exit 0 (1 after a panic).
    Process,
    /// `spawn`: also send the return value or the panic back.
    Spawn,
    /// A runtime-internal entry point (a pool worker...).
    Internal,
}

/// The header of the start message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Start {
    /// The parent's [`exe_identity`](super::exe_identity): the child must
    /// run the same file.
    pub(crate) exe: u64,
    /// The parent's registrations, for the diagnosis of a missing name.
    pub(crate) registry: Fingerprint,
    /// The registered name to run.
    pub(crate) name: String,
    pub(crate) process_name: String,
    pub(crate) parent_name: String,
    pub(crate) parent_pid: u32,
    pub(crate) mode: Mode,
    /// The parent's authentication key: the child's
    /// `current_process().authkey()`, as in CPython.
    pub(crate) authkey: Vec<u8>,
    /// The child initializer ([`set_child_initializer`](crate::set_child_initializer)):
    /// a registered name and its encoded arguments, run before `name`.
    pub(crate) init: Option<(String, Vec<u8>)>,
}

/// One message of the start protocol (see the module docs for the
/// layouts). Byte fields borrow the frame they were read from, or the
/// buffer they are sent from.
#[derive(Debug)]
pub(crate) enum Message<'a> {
    /// Run `start.name` with the encoded `args`.
    Start { start: Start, args: &'a [u8] },
    /// The encoded return value.
    Returned(&'a [u8]),
    /// The function panicked.
    Panicked(PanicRecord),
    /// The child could not run what was asked (another executable, a
    /// missing registration...).
    Failed(Error),
}

impl<'a> Message<'a> {
    /// Sends the message, with `fds` (the handles of the arguments or of
    /// the return value).
    pub(crate) fn send(&self, channel: &Channel, fds: &[OwnedFd]) -> Result<()> {
        match self {
            Message::Start { start, args } => {
                channel.send(TAG_START, &[&start_head(start)?, args], fds)
            }
            Message::Returned(value) => channel.send(TAG_RETURNED, &[value], fds),
            Message::Panicked(record) => {
                channel.send(TAG_PANICKED, &[&codec::encode_plain(record)?], fds)
            }
            Message::Failed(err) => channel.send(TAG_FAILED, &[&codec::encode_plain(err)?], fds),
        }
    }

    /// Reads a message from a frame's tag and bytes. An unknown tag or
    /// bytes that do not parse are `Err(Decode)`; every length is checked
    /// against the frame. A [`Message::Failed`] whose error does not
    /// decode is kept as the text it carries.
    pub(crate) fn parse(tag: u32, bytes: &'a [u8]) -> Result<Message<'a>> {
        match tag {
            TAG_START => {
                let (start, at) = split_start(bytes).ok_or_else(|| Error::Decode {
                    message: "the start message is malformed".into(),
                })?;
                Ok(Message::Start {
                    start,
                    args: bytes.get(at..).unwrap_or(&[]),
                })
            }
            TAG_RETURNED => Ok(Message::Returned(bytes)),
            TAG_PANICKED => Ok(Message::Panicked(codec::decode_plain(bytes)?)),
            TAG_FAILED => Ok(Message::Failed(refusal(bytes))),
            tag => Err(Error::Decode {
                message: format!("an unknown message of the start protocol (tag {tag})"),
            }),
        }
    }

    /// The refusal in a frame, if it is a [`Message::Failed`] (a pool
    /// worker's socket carries one when the worker could not start).
    pub(crate) fn refusal(tag: u32, bytes: &[u8]) -> Option<Error> {
        (tag == TAG_FAILED).then(|| refusal(bytes))
    }
}

/// The bytes of a [`Message::Start`] before its arguments: the header's
/// length and the header.
pub(crate) fn start_head(start: &Start) -> Result<Vec<u8>> {
    let header = codec::encode_plain(start)?;
    let header_len =
        u32::try_from(header.len()).map_err(|_| Error::invalid("process name too long"))?;
    let mut head = Vec::with_capacity(4 + header.len());
    head.extend_from_slice(&header_len.to_le_bytes());
    head.extend_from_slice(&header);
    Ok(head)
}

/// The error a child sent in a [`Message::Failed`].
fn refusal(bytes: &[u8]) -> Error {
    codec::decode_plain::<Error>(bytes).unwrap_or_else(|_| Error::Remote {
        pid: None,
        message: String::from_utf8_lossy(bytes).into_owned(),
    })
}

/// The start header and where the arguments start after it.
fn split_start(bytes: &[u8]) -> Option<(Start, usize)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let end = 4_usize.checked_add(len)?;
    let start: Start = codec::decode_plain(bytes.get(4..end)?).ok()?;
    Some((start, end))
}

/// What a spare runs: the child's socket and its start message, either
/// or both.
pub(super) type Assigned = (Option<OwnedFd>, Option<Frame>);

/// What a spare was sent (the server's `assign`): its socket, if any, and its start
/// message, if the request carried it. `None`: malformed.
pub(super) fn assignment(frame: Frame) -> Option<Assigned> {
    if frame.tag != TAG_ASSIGN {
        return None;
    }
    let (flags, bytes) = frame.bytes.split_at_checked(2)?;
    let mut fds = frame.fds.into_iter();
    let socket = match flags[0] {
        0 => None,
        1 => Some(fds.next()?),
        _ => return None,
    };
    let start = match flags[1] {
        0 if bytes.is_empty() && fds.len() == 0 => None,
        1 => Some(Frame {
            tag: TAG_START,
            bytes: bytes.to_vec(),
            fds: fds.collect(),
        }),
        _ => return None,
    };
    match (&socket, &start) {
        (None, None) => None,
        _ => Some((socket, start)),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::registry;

    /// A frame with `fds` descriptors (read ends of fresh pipes).
    pub(in crate::child) fn frame(tag: u32, bytes: &[u8], fds: usize) -> Frame {
        let fds = (0..fds)
            .map(|_| crate::sys::pipe().map(|(r, _)| r).expect("pipe"))
            .collect();
        Frame {
            tag,
            bytes: bytes.to_vec(),
            fds,
        }
    }

    #[test]
    fn assignments_are_checked_whole() {
        let parts = |tag, bytes: &[u8], fds| {
            assignment(frame(tag, bytes, fds)).map(|(socket, start)| {
                (
                    socket.is_some(),
                    start.map(|s| (s.tag, s.bytes, s.fds.len())),
                )
            })
        };
        assert_eq!(parts(TAG_ASSIGN, b"\x01\0", 1), Some((true, None)));
        assert_eq!(
            parts(TAG_ASSIGN, b"\x01\x01start", 3),
            Some((true, Some((TAG_START, b"start".to_vec(), 2))))
        );
        assert_eq!(
            parts(TAG_ASSIGN, b"\0\x01start", 2),
            Some((false, Some((TAG_START, b"start".to_vec(), 2))))
        );
        // Nothing to run, stray bytes or descriptors, bad flags, short.
        assert_eq!(parts(TAG_ASSIGN, b"\0\0", 0), None);
        assert_eq!(parts(TAG_ASSIGN, b"\x01\0x", 1), None);
        assert_eq!(parts(TAG_ASSIGN, b"\x01\0", 2), None);
        assert_eq!(parts(TAG_ASSIGN, b"\x01\0", 0), None);
        assert_eq!(parts(TAG_ASSIGN, b"\x02\x01start", 2), None);
        assert_eq!(parts(TAG_ASSIGN, b"\0\x02start", 2), None);
        assert_eq!(parts(TAG_ASSIGN, b"\x01", 1), None);
        assert_eq!(parts(TAG_FORK_START, b"\x01\x01start", 3), None);
    }

    #[test]
    fn a_start_message_that_lies_about_its_length_is_malformed() {
        assert!(split_start(&[0xff, 0xff, 0xff, 0xff, 1, 2]).is_none());
        assert!(split_start(&[1, 0]).is_none());
        assert!(Message::parse(TAG_START, &[1, 0]).is_err());
    }

    fn valid_start() -> Vec<u8> {
        let header = codec::encode_plain(&Start {
            exe: 7,
            registry: registry::fingerprint(),
            name: "some::function".into(),
            process_name: "Process-1".into(),
            parent_name: "MainProcess".into(),
            authkey: vec![7; 32],
            parent_pid: 42,
            mode: Mode::Spawn,
            init: None,
        })
        .expect("encode");
        let mut bytes = (header.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(b"arguments");
        bytes
    }

    #[test]
    fn a_valid_start_message_splits_at_its_arguments() {
        let bytes = valid_start();
        let Ok(Message::Start { start, args }) = Message::parse(TAG_START, &bytes) else {
            panic!("a valid start message does not parse");
        };
        assert_eq!(
            (start.name.as_str(), start.parent_pid),
            ("some::function", 42)
        );
        assert_eq!(args, b"arguments");
    }

    #[test]
    fn unknown_tags_and_undecodable_refusals() {
        assert!(Message::parse(9, b"").is_err());
        let Ok(Message::Failed(err)) = Message::parse(TAG_FAILED, b"not an error") else {
            panic!("a refusal always parses");
        };
        assert!(err.to_string().contains("not an error"), "{err}");
        assert!(Message::refusal(TAG_RETURNED, b"").is_none());
    }

    /// The arguments of a start message, if `bytes` parse as one: they
    /// always lie at the end of `bytes`.
    fn args_at(bytes: &[u8]) -> Option<usize> {
        let split = split_start(bytes).map(|(_, at)| at);
        match Message::parse(TAG_START, bytes) {
            Ok(Message::Start { args, .. }) => {
                assert_eq!(split, Some(bytes.len() - args.len()));
                split
            }
            _ => {
                assert_eq!(split, None);
                None
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]

        /// Random bytes: never a panic, and an offset inside the message
        /// whenever they parse.
        #[test]
        fn random_start_messages_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Some(at) = args_at(&bytes) {
                proptest::prop_assert!(at <= bytes.len());
            }
            for tag in 0..6 {
                let _ = Message::parse(tag, &bytes);
            }
        }

        /// A valid message with bytes flipped, cut or its length rewritten:
        /// never a panic, never an offset outside it.
        #[test]
        fn mutated_start_messages_never_panic(
            flips in proptest::collection::vec((proptest::num::usize::ANY, proptest::num::u8::ANY), 0..8),
            cut in proptest::option::of(proptest::num::usize::ANY),
            len in proptest::option::of(proptest::num::u32::ANY),
        ) {
            let mut bytes = valid_start();
            for (at, b) in flips {
                let n = bytes.len();
                bytes[at % n] ^= b;
            }
            if let Some(len) = len {
                bytes[..4].copy_from_slice(&len.to_le_bytes());
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            if let Some(at) = args_at(&bytes) {
                proptest::prop_assert!(at <= bytes.len());
            }
        }
    }
}
