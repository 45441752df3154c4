//! The pool's wire protocol and the worker process's main loop.
//!
//! A worker is a re-executed child started into [`main`] (an internal entry
//! of `child`). Its start arguments are a [`WorkerInit`] (the initializer's
//! registered name and encoded arguments, the task limit); the descriptors
//! of the initializer's arguments come with the start frame.
//!
//! Frames, parent to worker: [`TAG_TASK`], payload `id: u64`, `count: u32`,
//! `name_len: u32`, the registered name, then `count` argument tuples back
//! to back (the chunk), with the descriptors of handles inside them.
//!
//! Frames, worker to parent: [`TAG_READY`] once the initializer ran;
//! [`TAG_INIT_FAILED`] (a [`TaskFailure`]) if it failed, then the worker
//! exits; [`TAG_RESULT`], payload `id: u64` then one outcome per item
//! (`registry::Call::chunk`'s format); [`TAG_TASK_FAILED`], payload
//! `id: u64` then a [`TaskFailure`], when a whole chunk could not run.
//!
//! Shared memory (see [`arena`](super::arena)): [`TAG_ARENAS`], parent to
//! worker, first frame after the start, carries the input and output
//! arenas' descriptors; [`TAG_TASK_SHM`] (`id`, `start: u64`, `len: u64`)
//! is a [`TAG_TASK`] whose payload after the id lies in the input arena;
//! [`TAG_RESULT_SHM`] (same fields) is a [`TAG_RESULT`] whose outcomes
//! lie in the output arena.
//!
//! Under `panic = "abort"`, a panicking item ends its worker; the panic hook
//! first sends [`TAG_TASK_ABORTED`] (an [`AbortReport`]: the chunk, the
//! item, the outcomes of the items before it, the panic record), so the
//! parent fails that item alone and sends the rest of the chunk again.
//! Before it runs a chunk the worker marks it started in its output arena,
//! so that after a death the parent tells the running chunk from those the
//! worker never started (they go to another worker).
//!
//! The worker reads its socket on a thread of its own, so the parent's
//! writes never wait for the worker to finish a task: the parent can send
//! from any thread, including the one that reads results, without the two
//! processes ever waiting on each other. The parent bounds how many tasks
//! it sends ahead, so this buffer stays small.

use std::os::fd::OwnedFd;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use super::arena::{OutWriter, SHM_MIN};
use crate::codec;
use crate::error::Error;
use crate::registry::{self, Call, Entry};
use crate::sys::shm::Mapping;
use crate::wire::{Channel, Frame};

/// The internal entry name a worker is started with.
pub(crate) const ENTRY: &str = "__multiproc::pool::worker";

inventory::submit! {
    Entry::internal(ENTRY, main)
}

pub(crate) const TAG_TASK: u32 = 0x5001;
pub(crate) const TAG_READY: u32 = 0x5002;
pub(crate) const TAG_INIT_FAILED: u32 = 0x5003;
pub(crate) const TAG_RESULT: u32 = 0x5004;
pub(crate) const TAG_TASK_FAILED: u32 = 0x5005;
pub(crate) const TAG_ARENAS: u32 = 0x5006;
pub(crate) const TAG_TASK_SHM: u32 = 0x5007;
pub(crate) const TAG_RESULT_SHM: u32 = 0x5008;
pub(crate) const TAG_TASK_ABORTED: u32 = 0x5009;

/// The largest frame either side of a pool accepts: a peer's header that
/// announces more is refused before anything is allocated. Results are
/// as large as the user's data, so the bound is generous.
pub(crate) const POOL_MAX_FRAME: u64 = 1 << 32;

/// Bytes before the name in a task body (the payload after the id):
/// count, name length.
pub(crate) const TASK_HEADER: usize = 8;

/// What a worker is started with.
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
    fn from_error(err: Error) -> TaskFailure {
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

/// Chunks are large: a send buffer that holds a good part of one means
/// fewer wake-ups of the reader per chunk. The kernel caps it at
/// `net.core.wmem_max`; failing to raise it only costs speed.
pub(crate) fn enlarge_send_buffer(fd: std::os::fd::BorrowedFd<'_>) {
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &(1 << 20));
}

/// What a worker's panic hook sends under `panic = "abort"`: payload
/// `id: u64`, `done: u32` (the panicking item's place in the chunk),
/// `next: u64` (where the next item's arguments start), `partial_len: u64`,
/// the outcomes of the items before it, then the panic record.
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

/// The payload of the last `rest` items of a chunk whose payload is
/// `payload`, their arguments starting at `next` within the chunk's.
pub(crate) fn rest_of_chunk(payload: &[u8], rest: usize, next: usize) -> Option<Vec<u8>> {
    let name_len = read_u32(payload, 4)? as usize;
    let args_at = TASK_HEADER.checked_add(name_len)?;
    let name = payload.get(TASK_HEADER..args_at)?;
    let args = payload.get(args_at..)?.get(next..)?;
    let mut out = Vec::with_capacity(TASK_HEADER + name.len() + args.len());
    out.extend_from_slice(&u32::try_from(rest).ok()?.to_le_bytes());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(args);
    Some(out)
}

/// Where the panic hook reports under `panic = "abort"`, and the chunk
/// running now (its id + 1; 0 while the initializer runs).
static ABORT_TO: std::sync::OnceLock<Channel> = std::sync::OnceLock::new();
static RUNNING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The panic hook's last act in a worker under `panic = "abort"`.
fn report_abort(record: crate::registry::PanicRecord) {
    let Some(channel) = ABORT_TO.get() else {
        return;
    };
    let running = RUNNING.load(std::sync::atomic::Ordering::Relaxed);
    let Some(id) = running.checked_sub(1) else {
        let failure = TaskFailure::Panicked {
            message: record.message,
            location: record.location,
        };
        send_failure(channel, TAG_INIT_FAILED, None, &failure);
        std::process::exit(1);
    };
    let (done, next, partial) =
        registry::take_abort_progress().unwrap_or((u32::MAX, 0, Vec::new()));
    if let Ok(record) = codec::encode_plain(&record) {
        let _ = channel.send(
            TAG_TASK_ABORTED,
            &[
                &id.to_le_bytes(),
                &done.to_le_bytes(),
                &(next as u64).to_le_bytes(),
                &(partial.len() as u64).to_le_bytes(),
                &partial,
                &record,
            ],
            &[],
        );
    }
    std::process::exit(1);
}

/// Reads a little-endian integer field of a task payload.
pub(crate) fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn send_failure(channel: &Channel, tag: u32, id: Option<u64>, failure: &TaskFailure) -> bool {
    let Ok(body) = codec::encode_plain(failure) else {
        return false;
    };
    let id = id.map(u64::to_le_bytes);
    let parts: Vec<&[u8]> = id
        .iter()
        .map(|b| &b[..])
        .chain(std::iter::once(&body[..]))
        .collect();
    channel.send(tag, &parts, &[]).is_ok()
}

/// The worker process's main: run the initializer, then tasks until the
/// parent closes the connection or the task limit is reached.
pub(crate) fn main(channel: Channel, args: Vec<u8>, fds: Vec<OwnedFd>) -> i32 {
    registry::set_quiet_panics(true);
    let init: WorkerInit = match codec::decode_plain(&args) {
        Ok(init) => init,
        Err(err) => {
            send_failure(
                &channel,
                TAG_INIT_FAILED,
                None,
                &TaskFailure::from_error(err),
            );
            return 2;
        }
    };

    // Read tasks on a thread of its own (see the module docs). It keeps
    // the start channel, whose buffer may already hold the first tasks;
    // results go out through a duplicate of the socket.
    let (tx, rx) = mpsc::channel::<Frame>();
    let Ok(write_fd) = channel.fd().try_clone_to_owned() else {
        return 2;
    };
    let mut input = channel;
    let channel = Channel::new(write_fd);
    enlarge_send_buffer(channel.fd());
    if cfg!(panic = "abort") {
        if let Ok(fd) = channel.fd().try_clone_to_owned() {
            let _ = ABORT_TO.set(Channel::new(fd));
            registry::set_abort_reporter(report_abort);
        }
    }
    let spawned = std::thread::Builder::new()
        .name("multiproc-pool-input".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            input.set_max_frame(POOL_MAX_FRAME);
            input.set_strict();
            while let Ok(frame) = input.recv(None) {
                if tx.send(frame).is_err() {
                    break;
                }
            }
        });
    if spawned.is_err() {
        return 2;
    }

    if let Some((name, init_args)) = &init.initializer {
        let outcome = registry::lookup_name(name).and_then(|entry| {
            let mut out = Vec::new();
            let mut out_fds = Vec::new();
            // A single call: a panic comes back as `Error::Panicked`.
            registry::set_quiet_panics(true);
            entry.invoke(&mut Call::single(init_args, fds, &mut out, &mut out_fds))
        });
        if let Err(err) = outcome {
            send_failure(
                &channel,
                TAG_INIT_FAILED,
                None,
                &TaskFailure::from_error(err),
            );
            return 1;
        }
    }
    if channel.send(TAG_READY, &[], &[]).is_err() {
        return 0;
    }

    let mut cached: Option<(String, &'static Entry)> = None;
    let mut out: Vec<u8> = Vec::new();
    let mut out_fds: Vec<OwnedFd> = Vec::new();
    let mut done: u64 = 0;
    let mut input_arena: Option<Mapping> = None;
    let mut output_arena: Option<OutWriter> = None;
    while let Ok(frame) = rx.recv() {
        let Frame { tag, bytes, fds } = frame;
        if tag == TAG_ARENAS {
            let mut fds = fds.into_iter();
            input_arena = fds.next().and_then(|fd| Mapping::from_fd(fd).ok());
            output_arena = fds
                .next()
                .and_then(|fd| Mapping::from_fd(fd).ok())
                .and_then(|m| OutWriter::new(m).ok());
            continue;
        }
        let Some(id) = read_u64(&bytes, 0) else {
            return 2;
        };
        let body: Result<&[u8], Error> = match tag {
            TAG_TASK => Ok(&bytes[8..]),
            TAG_TASK_SHM => match (&input_arena, read_u64(&bytes, 8), read_u64(&bytes, 16)) {
                (Some(arena), Some(start), Some(len)) => {
                    // SAFETY: the input arena's protocol (`pool::arena`):
                    // the parent wrote this region whole before it sent
                    // this frame (the socket orders its writes before our
                    // read), and writes it again only once the region is
                    // free, which is when this chunk's result or failure
                    // frame has arrived; we send that frame only after the
                    // last use of `body` (the `invoke` below). Every other
                    // live region is another chunk's and does not overlap
                    // it (the parent's allocator), and nothing in this
                    // process writes the input arena.
                    let view = unsafe { arena.view(start as usize, len as usize) };
                    view.map_err(Error::from)
                }
                _ => Err(Error::invalid(
                    "a pool task came through shared memory the worker does not have",
                )),
            },
            _ => continue,
        };
        let body = match body {
            Ok(body) => body,
            Err(err) => {
                if !send_failure(
                    &channel,
                    TAG_TASK_FAILED,
                    Some(id),
                    &TaskFailure::from_error(err),
                ) {
                    return 0;
                }
                continue;
            }
        };
        let (Some(count), Some(name_len)) = (read_u32(body, 0), read_u32(body, 4)) else {
            return 2;
        };
        let name_end = TASK_HEADER + name_len as usize;
        let Some(name) = body
            .get(TASK_HEADER..name_end)
            .and_then(|n| std::str::from_utf8(n).ok())
        else {
            return 2;
        };
        let entry = match &cached {
            Some((cached_name, entry)) if cached_name == name => Ok(*entry),
            _ => registry::lookup_name(name)
                .inspect(|entry| cached = Some((name.to_string(), entry))),
        };
        RUNNING.store(id.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
        if let Some(arena) = &output_arena {
            arena.mark_started(id);
        }
        out.clear();
        out.extend_from_slice(&id.to_le_bytes());
        let result = entry.and_then(|entry| {
            entry.invoke(&mut Call::chunk(
                &body[name_end..],
                count as usize,
                fds,
                &mut out,
                &mut out_fds,
            ))
        });
        let sent = match result {
            Ok(()) => {
                let results = &out[8..];
                let in_arena = if out_fds.is_empty() && results.len() >= SHM_MIN {
                    output_arena.as_mut().and_then(|a| a.put(results))
                } else {
                    None
                };
                let size = results.len() as u64 + 8;
                match in_arena {
                    None if size > POOL_MAX_FRAME => send_failure(
                        &channel,
                        TAG_TASK_FAILED,
                        Some(id),
                        &TaskFailure::TooLarge {
                            size,
                            limit: POOL_MAX_FRAME,
                        },
                    ),
                    Some(start) => channel
                        .send(
                            TAG_RESULT_SHM,
                            &[
                                &id.to_le_bytes(),
                                &start.to_le_bytes(),
                                &(results.len() as u64).to_le_bytes(),
                            ],
                            &[],
                        )
                        .is_ok(),
                    None => channel.send(TAG_RESULT, &[&out], &out_fds).is_ok(),
                }
            }
            Err(err) => send_failure(
                &channel,
                TAG_TASK_FAILED,
                Some(id),
                &TaskFailure::from_error(err),
            ),
        };
        out_fds.clear();
        if !sent {
            return 0;
        }
        // Keep a large buffer from one huge chunk from staying forever.
        if out.capacity() > 64 << 20 {
            out = Vec::new();
        }
        done += 1;
        if init.max_tasks.is_some_and(|max| done >= max) {
            return 0;
        }
    }
    0
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
        assert_eq!(rest_of_chunk(&p, 2, 3), Some(payload(2, b"f", &[4, 5])));
        assert_eq!(rest_of_chunk(&p, 2, 6), None, "past the arguments");
        assert_eq!(rest_of_chunk(&p[..6], 1, 0), None, "cut in the header");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]

        /// What a worker (or a task writing to its socket) can send the
        /// parent: random abort reports, task failures and payload cuts
        /// never panic, and every slice they give lies inside the input.
        #[test]
        fn hostile_worker_frames_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            rest in proptest::num::usize::ANY,
            next in proptest::num::usize::ANY,
        ) {
            if let Some(report) = AbortReport::parse(&bytes) {
                proptest::prop_assert!(report.partial.len() + report.record.len() + 28 <= bytes.len());
            }
            let _ = codec::decode_plain::<TaskFailure>(&bytes);
            let _ = codec::decode_plain::<WorkerInit>(&bytes);
            if let Some(out) = rest_of_chunk(&bytes, rest % 1000, next % 400) {
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
