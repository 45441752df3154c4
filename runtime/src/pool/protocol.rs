//! The pool's protocol between the parent and a worker: every message, its
//! tag and its layout, in one place.
//!
//! A worker is a child started with [`WorkerInit`] as its arguments (the
//! start protocol of `child::protocol`); after the start, each message is
//! one frame of [`crate::wire`] on the worker's socket (the frame header
//! carries the tag). Integers are little-endian; "codec" is
//! [`crate::codec`]'s plain encoding.
//!
//! | message | tag | bytes after the frame header | descriptors |
//! |---|---|---|---|
//! | parent → worker | | | |
//! | [`ToWorker::Arenas`] | `0x5006` | none; first frame after the start, if any | input arena, output arena |
//! | [`ToWorker::Task`] | `0x5001` | `id: u64`, then a [chunk body](ChunkBody) | the handles in the arguments |
//! | [`ToWorker::TaskShm`] | `0x5007` | `id: u64`, `start: u64`, `len: u64`: the chunk body lies in the input arena | none |
//! | worker → parent | | | |
//! | [`FromWorker::Ready`] | `0x5002` | none: the initializer ran | none |
//! | [`FromWorker::InitFailed`] | `0x5003` | a [`TaskFailure`] (codec); the worker exits | none |
//! | [`FromWorker::Result`] | `0x5004` | `id: u64`, then the chunk's outcomes (`registry::Call::chunk`'s format) | the handles in the results |
//! | [`FromWorker::ResultShm`] | `0x5008` | `id: u64`, `start: u64`, `len: u64`: the outcomes lie in the output arena | none |
//! | [`FromWorker::TaskFailed`] | `0x5005` | `id: u64`, then a [`TaskFailure`] (codec): the whole chunk failed | none |
//! | [`FromWorker::Aborted`] | `0x5009` | an [`AbortReport`] (`panic = "abort"` only) | none |
//! | [`FromWorker::Refused`] | 4 | the start protocol's refusal: the worker could not start | none |
//!
//! A chunk body is `count: u32`, `name_len: u32`, the registered name,
//! then `count` argument tuples back to back (see [`ChunkBody`]).
//!
//! The per-chunk messages (tasks and results) are laid out by hand, not
//! encoded: their bodies are built in place (a chunk's arguments by the
//! pool's encoder, its outcomes by the call) and sent as parts of one
//! frame, so nothing is copied on the way. The rare messages carry codec
//! values.
//!
//! Everything from a peer is checked: a length or an offset is compared
//! with the bytes that came before anything is sliced, and what does not
//! parse is a [`Malformed`] (the parent) or ends the worker (exit code 2,
//! which the parent sees as a death).

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use crate::child;
use crate::codec;
use crate::error::{Error, Result};
use crate::wire::Channel;

const TAG_TASK: u32 = 0x5001;
const TAG_READY: u32 = 0x5002;
const TAG_INIT_FAILED: u32 = 0x5003;
const TAG_RESULT: u32 = 0x5004;
const TAG_TASK_FAILED: u32 = 0x5005;
const TAG_ARENAS: u32 = 0x5006;
const TAG_TASK_SHM: u32 = 0x5007;
const TAG_RESULT_SHM: u32 = 0x5008;
const TAG_TASK_ABORTED: u32 = 0x5009;

/// The largest frame either side of a pool accepts: a peer's header that
/// announces more is refused before anything is allocated. Results are
/// as large as the user's data, so the bound is generous.
pub(crate) const POOL_MAX_FRAME: u64 = 1 << 32;

/// Where a [`FromWorker::Result`]'s outcomes start in its frame (after
/// the chunk's id).
pub(crate) const RESULT_AT: usize = 8;

/// Bytes before the name in a chunk body: count, name length.
const BODY_HEADER: usize = 8;

/// What a worker is started with (the arguments of its start message).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WorkerInit {
    /// Registered name of the initializer and its encoded argument tuple.
    pub(crate) initializer: Option<(String, Vec<u8>)>,
    /// Exit after this many tasks (chunks).
    pub(crate) max_tasks: Option<u64>,
}

/// Why a whole task (or the initializer) failed, as it travels back.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum TaskFailure {
    Panicked {
        message: String,
        location: Option<String>,
    },
    NotRegistered(String),
    Decode(String),
    Encode(String),
    TooLarge {
        size: u64,
        limit: u64,
    },
    Other(String),
}

impl TaskFailure {
    pub(crate) fn from_error(err: Error) -> TaskFailure {
        match err {
            Error::Panicked {
                message, location, ..
            } => TaskFailure::Panicked { message, location },
            Error::NotRegistered { name } => TaskFailure::NotRegistered(name),
            Error::Decode { message } => TaskFailure::Decode(message),
            Error::Encode { message } => TaskFailure::Encode(message),
            Error::MessageTooLarge { size, limit } => TaskFailure::TooLarge { size, limit },
            other => TaskFailure::Other(other.to_string()),
        }
    }

    /// The error a whole chunk's items report.
    pub(crate) fn into_error(self, pid: u32, item: Option<usize>) -> Error {
        match self {
            TaskFailure::Panicked { message, location } => Error::Panicked {
                message,
                location,
                pid,
                item,
            },
            TaskFailure::NotRegistered(name) => Error::NotRegistered { name },
            TaskFailure::Decode(message) => Error::Decode { message },
            TaskFailure::Encode(message) => Error::Encode { message },
            TaskFailure::TooLarge { size, limit } => Error::MessageTooLarge { size, limit },
            TaskFailure::Other(message) => Error::Remote {
                pid: Some(pid),
                message,
            },
        }
    }

    /// The message of a failed initializer.
    pub(crate) fn describe(&self) -> String {
        match self {
            TaskFailure::Panicked {
                message,
                location: Some(at),
            } => format!("panicked at {at}: {message}"),
            TaskFailure::Panicked {
                message,
                location: None,
            } => format!("panicked: {message}"),
            TaskFailure::NotRegistered(name) => {
                Error::NotRegistered { name: name.clone() }.to_string()
            }
            TaskFailure::TooLarge { size, limit } => Error::MessageTooLarge {
                size: *size,
                limit: *limit,
            }
            .to_string(),
            TaskFailure::Decode(m) | TaskFailure::Encode(m) | TaskFailure::Other(m) => m.clone(),
        }
    }
}

/// A chunk body, as a worker reads it: `count: u32`, `name_len: u32`, the
/// registered name (UTF-8), then `count` argument tuples back to back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ChunkBody<'a> {
    pub(crate) count: u32,
    pub(crate) name: &'a str,
    /// The argument tuples.
    pub(crate) args: &'a [u8],
}

impl<'a> ChunkBody<'a> {
    pub(crate) fn parse(body: &'a [u8]) -> Option<ChunkBody<'a>> {
        let count = read_u32(body, 0)?;
        let name_end = BODY_HEADER.checked_add(read_u32(body, 4)? as usize)?;
        let name = std::str::from_utf8(body.get(BODY_HEADER..name_end)?).ok()?;
        Some(ChunkBody {
            count,
            name,
            args: body.get(name_end..)?,
        })
    }

    /// Starts a chunk body for `name` in the empty `buf`: the argument
    /// tuples are appended after it, then the count set with
    /// [`ChunkBody::set_count`].
    pub(crate) fn begin(buf: &mut Vec<u8>, name: &str) -> Result<()> {
        let name_len =
            u32::try_from(name.len()).map_err(|_| Error::invalid("function name too long"))?;
        buf.extend_from_slice(&[0u8; 4]);
        buf.extend_from_slice(&name_len.to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        Ok(())
    }

    /// Sets the count of a body begun with [`ChunkBody::begin`].
    pub(crate) fn set_count(buf: &mut [u8], count: usize) -> Result<()> {
        let count = u32::try_from(count).map_err(|_| Error::invalid("chunksize too large"))?;
        let head = buf
            .get_mut(..4)
            .ok_or_else(|| Error::internal("a chunk body without its header"))?;
        head.copy_from_slice(&count.to_le_bytes());
        Ok(())
    }

    /// How many items a body holds (0 for bytes that are not a body).
    pub(crate) fn items(body: &[u8]) -> usize {
        read_u32(body, 0).map_or(0, |n| n as usize)
    }

    /// The body of the last `rest` items of the chunk `body`, their
    /// arguments starting at `next` within the chunk's.
    pub(crate) fn rest(body: &[u8], rest: usize, next: usize) -> Option<Vec<u8>> {
        let name_len = read_u32(body, 4)? as usize;
        let args_at = BODY_HEADER.checked_add(name_len)?;
        let name = body.get(BODY_HEADER..args_at)?;
        let args = body.get(args_at..)?.get(next..)?;
        let mut out = Vec::with_capacity(BODY_HEADER + name.len() + args.len());
        out.extend_from_slice(&u32::try_from(rest).ok()?.to_le_bytes());
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(args);
        Some(out)
    }
}

/// A message from the parent to a worker (layouts in the module docs).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ToWorker<'a> {
    /// The arenas' descriptors ride with the frame: input, then output.
    Arenas,
    /// Chunk `id`, its [`ChunkBody`] in the frame.
    Task { id: u64, body: &'a [u8] },
    /// Chunk `id`, its body at `start..start + len` of the input arena.
    TaskShm { id: u64, start: u64, len: u64 },
}

impl<'a> ToWorker<'a> {
    pub(crate) fn send(&self, channel: &Channel, fds: &[OwnedFd]) -> Result<()> {
        self.with_parts(|tag, parts| channel.send(tag, parts, fds))
    }

    /// Calls `f` with the message's tag and its bytes, in parts (what a
    /// transport sends; the pool's frames and the MPI transport share it).
    pub(crate) fn with_parts<R>(&self, f: impl FnOnce(u32, &[&[u8]]) -> R) -> R {
        match self {
            ToWorker::Arenas => f(TAG_ARENAS, &[]),
            ToWorker::Task { id, body } => f(TAG_TASK, &[&id.to_le_bytes(), body]),
            ToWorker::TaskShm { id, start, len } => f(
                TAG_TASK_SHM,
                &[&id.to_le_bytes(), &start.to_le_bytes(), &len.to_le_bytes()],
            ),
        }
    }

    /// Sends several [`ToWorker::Task`]s (`id`s as little-endian bytes,
    /// bodies) in as few system calls as the kernel takes: the same bytes
    /// as one [`send`](ToWorker::send) each.
    pub(crate) fn send_tasks(channel: &Channel, tasks: &[([u8; 8], &[u8])]) -> Result<()> {
        let parts: Vec<[&[u8]; 2]> = tasks.iter().map(|(id, body)| [&id[..], *body]).collect();
        let frames: Vec<(u32, &[&[u8]])> = parts.iter().map(|p| (TAG_TASK, &p[..])).collect();
        channel.send_frames(&frames)
    }

    /// `None`: a frame the parent does not send.
    pub(crate) fn parse(tag: u32, bytes: &'a [u8]) -> Option<ToWorker<'a>> {
        match tag {
            TAG_ARENAS => Some(ToWorker::Arenas),
            TAG_TASK => Some(ToWorker::Task {
                id: read_u64(bytes, 0)?,
                body: bytes.get(8..)?,
            }),
            TAG_TASK_SHM => Some(ToWorker::TaskShm {
                id: read_u64(bytes, 0)?,
                start: read_u64(bytes, 8)?,
                len: read_u64(bytes, 16)?,
            }),
            _ => None,
        }
    }
}

/// A message from a worker to the parent (layouts in the module docs).
#[derive(Debug)]
pub(crate) enum FromWorker<'a> {
    /// The initializer ran: the worker takes work.
    Ready,
    /// The initializer (or the worker's start-up) failed; the worker exits.
    InitFailed(TaskFailure),
    /// The outcomes of chunk `id` (at [`RESULT_AT`] in the frame).
    Result { id: u64, outcomes: &'a [u8] },
    /// The outcomes of chunk `id`, at `start..start + len` of the output
    /// arena (positions modulo its capacity).
    ResultShm { id: u64, start: u64, len: u64 },
    /// Chunk `id` could not run at all.
    TaskFailed { id: u64, failure: TaskFailure },
    /// `panic = "abort"`: an item's panic is ending the worker.
    Aborted(AbortReport<'a>),
    /// The worker could not start (the start protocol's refusal).
    Refused(Error),
}

/// A frame from a worker that does not parse: `id` is the chunk it names,
/// if it names one (that chunk fails with `error`; a frame that names
/// none is dropped).
#[derive(Debug)]
pub(crate) struct Malformed {
    pub(crate) id: Option<u64>,
    pub(crate) error: Error,
}

impl<'a> FromWorker<'a> {
    pub(crate) fn send(&self, channel: &Channel, fds: &[OwnedFd]) -> Result<()> {
        if let FromWorker::Refused(err) = self {
            return child::Message::Failed(err.clone()).send(channel, fds);
        }
        self.with_parts(|tag, parts| channel.send(tag, parts, fds))?
    }

    /// Calls `f` with the message's tag and its bytes, in parts (see
    /// [`ToWorker::with_parts`]). [`FromWorker::Refused`] belongs to the
    /// start protocol and has no parts here: an [`Error::Misuse`].
    pub(crate) fn with_parts<R>(&self, f: impl FnOnce(u32, &[&[u8]]) -> R) -> Result<R> {
        Ok(match self {
            FromWorker::Ready => f(TAG_READY, &[]),
            FromWorker::InitFailed(failure) => {
                f(TAG_INIT_FAILED, &[&codec::encode_plain(failure)?])
            }
            FromWorker::Result { id, outcomes } => f(TAG_RESULT, &[&id.to_le_bytes(), outcomes]),
            FromWorker::ResultShm { id, start, len } => f(
                TAG_RESULT_SHM,
                &[&id.to_le_bytes(), &start.to_le_bytes(), &len.to_le_bytes()],
            ),
            FromWorker::TaskFailed { id, failure } => f(
                TAG_TASK_FAILED,
                &[&id.to_le_bytes(), &codec::encode_plain(failure)?],
            ),
            FromWorker::Aborted(report) => {
                let AbortReport {
                    id,
                    done,
                    next,
                    partial,
                    record,
                } = report;
                f(
                    TAG_TASK_ABORTED,
                    &[
                        &id.to_le_bytes(),
                        &done.to_le_bytes(),
                        &(*next as u64).to_le_bytes(),
                        &(partial.len() as u64).to_le_bytes(),
                        partial,
                        record,
                    ],
                )
            }
            FromWorker::Refused(_) => {
                return Err(Error::misuse("a start refusal is not a pool frame"));
            }
        })
    }

    pub(crate) fn parse(tag: u32, bytes: &'a [u8]) -> std::result::Result<Self, Malformed> {
        let unattributed = |what: &str| Malformed {
            id: None,
            error: Error::Decode {
                message: format!("a pool worker sent {what}"),
            },
        };
        if let Some(err) = child::Message::refusal(tag, bytes) {
            return Ok(FromWorker::Refused(err));
        }
        match tag {
            TAG_READY => Ok(FromWorker::Ready),
            TAG_INIT_FAILED => Ok(FromWorker::InitFailed(
                // One that does not decode is described by the decode error.
                codec::decode_plain(bytes).unwrap_or_else(|e| TaskFailure::Other(e.to_string())),
            )),
            TAG_RESULT => Ok(FromWorker::Result {
                id: chunk_id(bytes).ok_or_else(|| unattributed("a result without its chunk"))?,
                outcomes: bytes.get(RESULT_AT..).unwrap_or(&[]),
            }),
            TAG_RESULT_SHM | TAG_TASK_FAILED => {
                let id =
                    chunk_id(bytes).ok_or_else(|| unattributed("a result without its chunk"))?;
                let malformed = |error| Malformed {
                    id: Some(id),
                    error,
                };
                if tag == TAG_TASK_FAILED {
                    let failure = codec::decode_plain(bytes.get(8..).unwrap_or(&[]));
                    return Ok(FromWorker::TaskFailed {
                        id,
                        failure: failure.map_err(malformed)?,
                    });
                }
                match (read_u64(bytes, 8), read_u64(bytes, 16)) {
                    (Some(start), Some(len)) => Ok(FromWorker::ResultShm { id, start, len }),
                    _ => Err(malformed(Error::Decode {
                        message: "a pool result frame is malformed".into(),
                    })),
                }
            }
            TAG_TASK_ABORTED => AbortReport::parse(bytes)
                .map(FromWorker::Aborted)
                .ok_or_else(|| unattributed("a malformed abort report")),
            tag => Err(unattributed(&format!("an unknown message (tag {tag})"))),
        }
    }
}

/// The chunk a worker's answer to a task (a result, a failure or an
/// abort report, tag `tag`, `bytes`) names; `None` for any other frame.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))] // the MPI transport's
pub(crate) fn answer_id(tag: u32, bytes: &[u8]) -> Option<u64> {
    match tag {
        TAG_RESULT | TAG_RESULT_SHM | TAG_TASK_FAILED | TAG_TASK_ABORTED => chunk_id(bytes),
        _ => None,
    }
}

/// The chunk a [`FromWorker::Result`] frame's bytes name (also when the
/// rest of the frame is lost).
pub(crate) fn chunk_id(bytes: &[u8]) -> Option<u64> {
    read_u64(bytes, 0)
}

/// What a worker's panic hook sends under `panic = "abort"`: `id: u64`,
/// `done: u32` (the panicking item's place in the chunk), `next: u64`
/// (where the next item's arguments start), `partial_len: u64`, the
/// outcomes of the items before it, then the panic record (codec).
#[derive(Debug)]
pub(crate) struct AbortReport<'a> {
    pub(crate) id: u64,
    pub(crate) done: u32,
    pub(crate) next: usize,
    pub(crate) partial: &'a [u8],
    pub(crate) record: &'a [u8],
}

impl<'a> AbortReport<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Option<AbortReport<'a>> {
        let id = read_u64(bytes, 0)?;
        let done = read_u32(bytes, 8)?;
        let next = usize::try_from(read_u64(bytes, 12)?).ok()?;
        let partial_len = usize::try_from(read_u64(bytes, 20)?).ok()?;
        let partial = bytes.get(28..28usize.checked_add(partial_len)?)?;
        let record = bytes.get(28 + partial_len..)?;
        Some(AbortReport {
            id,
            done,
            next,
            partial,
            record,
        })
    }
}

/// Reads a little-endian integer field.
fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(count: u32, name: &[u8], args: &[u8]) -> Vec<u8> {
        let mut p = count.to_le_bytes().to_vec();
        p.extend_from_slice(&(name.len() as u32).to_le_bytes());
        p.extend_from_slice(name);
        p.extend_from_slice(args);
        p
    }

    #[test]
    fn the_rest_of_a_chunk_keeps_its_name_and_the_later_arguments() {
        let p = payload(5, b"f", &[1, 2, 3, 4, 5]);
        assert_eq!(ChunkBody::rest(&p, 2, 3), Some(payload(2, b"f", &[4, 5])));
        assert_eq!(ChunkBody::rest(&p, 2, 6), None, "past the arguments");
        assert_eq!(ChunkBody::rest(&p[..6], 1, 0), None, "cut in the header");
    }

    #[test]
    fn a_chunk_body_reads_back_as_it_was_built() {
        let mut buf = Vec::new();
        ChunkBody::begin(&mut buf, "m::f").expect("begin");
        buf.extend_from_slice(&[9, 8, 7]);
        ChunkBody::set_count(&mut buf, 3).expect("count");
        assert_eq!(buf, payload(3, b"m::f", &[9, 8, 7]));
        assert_eq!(ChunkBody::items(&buf), 3);
        assert_eq!(
            ChunkBody::parse(&buf),
            Some(ChunkBody {
                count: 3,
                name: "m::f",
                args: &[9, 8, 7],
            })
        );
        assert_eq!(
            ChunkBody::parse(&payload(1, &[0xff], &[])),
            None,
            "not UTF-8"
        );
        assert_eq!(ChunkBody::parse(&buf[..9]), None, "cut in the name");
    }

    #[test]
    fn a_task_names_its_chunk_and_a_short_one_is_refused() {
        let mut bytes = 7u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"body");
        assert_eq!(
            ToWorker::parse(TAG_TASK, &bytes),
            Some(ToWorker::Task {
                id: 7,
                body: b"body"
            })
        );
        assert_eq!(ToWorker::parse(TAG_TASK_SHM, &bytes), None);
        assert_eq!(ToWorker::parse(TAG_READY, &bytes), None);
    }

    #[test]
    fn malformed_results_fail_the_chunk_they_name() {
        let id = 5u64.to_le_bytes();
        let Err(Malformed { id: Some(5), .. }) = FromWorker::parse(TAG_RESULT_SHM, &id) else {
            panic!("a short shared-memory result fails its chunk");
        };
        let Err(Malformed { id: Some(5), .. }) = FromWorker::parse(TAG_TASK_FAILED, &id) else {
            panic!("an undecodable failure fails its chunk");
        };
        let Err(Malformed { id: None, .. }) = FromWorker::parse(TAG_RESULT, &id[..4]) else {
            panic!("a result without its id names no chunk");
        };
        let Ok(FromWorker::InitFailed(TaskFailure::Other(_))) =
            FromWorker::parse(TAG_INIT_FAILED, b"?")
        else {
            panic!("an undecodable initializer failure is described");
        };
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]

        /// What a worker (or a task writing to its socket) can send the
        /// parent: random frames of every tag, abort reports, task
        /// failures and payload cuts never panic, and every slice they
        /// give lies inside the input.
        #[test]
        fn hostile_worker_frames_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            rest in proptest::num::usize::ANY,
            next in proptest::num::usize::ANY,
        ) {
            if let Some(report) = AbortReport::parse(&bytes) {
                proptest::prop_assert!(report.partial.len() + report.record.len() + 28 <= bytes.len());
            }
            for tag in (0..6).chain(TAG_TASK..=TAG_TASK_ABORTED) {
                match FromWorker::parse(tag, &bytes) {
                    Ok(FromWorker::Result { outcomes, .. }) => {
                        proptest::prop_assert_eq!(outcomes.len() + RESULT_AT, bytes.len());
                    }
                    Ok(FromWorker::Aborted(report)) => {
                        proptest::prop_assert!(report.partial.len() + report.record.len() + 28 <= bytes.len());
                    }
                    _ => {}
                }
                if let Some(ToWorker::Task { body, .. }) = ToWorker::parse(tag, &bytes) {
                    proptest::prop_assert_eq!(body.len() + 8, bytes.len());
                }
            }
            if let Some(body) = ChunkBody::parse(&bytes) {
                proptest::prop_assert!(body.name.len() + body.args.len() + 8 <= bytes.len());
            }
            let _ = codec::decode_plain::<TaskFailure>(&bytes);
            let _ = codec::decode_plain::<WorkerInit>(&bytes);
            if let Some(out) = ChunkBody::rest(&bytes, rest % 1000, next % 400) {
                proptest::prop_assert!(out.len() <= bytes.len());
            }
        }

        /// A valid abort report with its length fields rewritten.
        #[test]
        fn abort_reports_with_forged_lengths_never_panic(
            partial_len in proptest::num::u64::ANY,
            next in proptest::num::u64::ANY,
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let mut bytes = 7u64.to_le_bytes().to_vec();
            bytes.extend_from_slice(&3u32.to_le_bytes());
            bytes.extend_from_slice(&next.to_le_bytes());
            bytes.extend_from_slice(&partial_len.to_le_bytes());
            bytes.extend_from_slice(&tail);
            if let Some(report) = AbortReport::parse(&bytes) {
                proptest::prop_assert_eq!(report.partial.len() as u64, partial_len);
                proptest::prop_assert!(report.partial.len() <= tail.len());
            }
        }
    }
}
