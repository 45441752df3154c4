//! The worker process's main loop (its messages are in
//! [`protocol`](super::protocol)).
//!
//! A worker is a re-executed child started into [`main`] (an internal entry
//! of `child`). Its start arguments are a [`WorkerInit`] (the initializer's
//! registered name and encoded arguments, the task limit); the descriptors
//! of the initializer's arguments come with the start frame. It answers
//! [`FromWorker::Ready`] once the initializer ran, then runs chunks until
//! the parent closes its socket or the task limit is reached.
//!
//! Under `panic = "abort"`, a panicking item ends its worker; the panic hook
//! first sends [`FromWorker::Aborted`] (the chunk, the item, the outcomes
//! of the items before it, the panic record), so the parent fails that
//! item alone and sends the rest of the chunk again. Before it runs a
//! chunk the worker marks it started in its output arena, so that after a
//! death the parent tells the running chunk from those the worker never
//! started (they go to another worker).
//!
//! The worker reads its socket on a thread of its own, so the parent's
//! writes never wait for the worker to finish a task: the parent can send
//! from any thread, including the one that reads results, without the two
//! processes ever waiting on each other. The parent bounds how many tasks
//! it sends ahead, so this buffer stays small.

use std::os::fd::OwnedFd;
use std::sync::mpsc;

use super::arena::{OutWriter, SHM_MIN};
use super::protocol::{
    AbortReport, ChunkBody, FromWorker, POOL_MAX_FRAME, TaskFailure, ToWorker, WorkerInit,
};
use crate::codec;
use crate::error::Error;
use crate::registry::{self, Call, Entry, RUN_HEADER};
use crate::sys::shm::Mapping;
use crate::wire::{Channel, Frame};

/// The internal entry name a worker is started with.
pub(crate) const ENTRY: &str = "__multiproc::pool::worker";

inventory::submit! {
    Entry::internal(ENTRY, main)
}

/// Chunks are large: a send buffer that holds a good part of one means
/// fewer wake-ups of the reader per chunk. The kernel caps it at
/// `net.core.wmem_max`; failing to raise it only costs speed.
pub(crate) fn enlarge_send_buffer(fd: std::os::fd::BorrowedFd<'_>) {
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &(1 << 20));
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
        send_failure(channel, None, failure);
        std::process::exit(1);
    };
    let (done, next, partial) =
        registry::take_abort_progress().unwrap_or((u32::MAX, 0, Vec::new()));
    if let Ok(record) = codec::encode_plain(&record) {
        let report = AbortReport {
            id,
            done,
            next,
            partial: &partial,
            record: &record,
        };
        let _ = FromWorker::Aborted(report).send(channel, &[]);
    }
    std::process::exit(1);
}

/// Sends the failure of chunk `id`, or of the initializer (`None`).
fn send_failure(channel: &Channel, id: Option<u64>, failure: TaskFailure) -> bool {
    let message = match id {
        Some(id) => FromWorker::TaskFailed { id, failure },
        None => FromWorker::InitFailed(failure),
    };
    message.send(channel, &[]).is_ok()
}

/// The worker process's main: run the initializer, then tasks until the
/// parent closes the connection or the task limit is reached.
pub(crate) fn main(channel: Channel, args: Vec<u8>, fds: Vec<OwnedFd>) -> i32 {
    registry::set_quiet_panics(true);
    let init: WorkerInit = match codec::decode_plain(&args) {
        Ok(init) => init,
        Err(err) => {
            send_failure(&channel, None, TaskFailure::from_error(err));
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

    if let Err(err) = run_initializer(&init, fds) {
        send_failure(&channel, None, TaskFailure::from_error(err));
        return 1;
    }
    if FromWorker::Ready.send(&channel, &[]).is_err() {
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
        let (id, body) = match ToWorker::parse(tag, &bytes) {
            Some(ToWorker::Arenas) => {
                let mut fds = fds.into_iter();
                input_arena = fds.next().and_then(|fd| Mapping::from_fd(fd).ok());
                output_arena = fds
                    .next()
                    .and_then(|fd| Mapping::from_fd(fd).ok())
                    .and_then(|m| OutWriter::new(m).ok());
                continue;
            }
            Some(ToWorker::Task { id, body }) => (id, Ok(body)),
            Some(ToWorker::TaskShm { id, start, len }) => match &input_arena {
                Some(arena) => {
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
                    (id, view.map_err(Error::from))
                }
                None => (
                    id,
                    Err(Error::internal(
                        "a pool task came through shared memory the worker does not have",
                    )),
                ),
            },
            // Not a frame the parent sends: it is not speaking the protocol.
            None => return 2,
        };
        let body = match body {
            Ok(body) => body,
            Err(err) => {
                if !send_failure(&channel, Some(id), TaskFailure::from_error(err)) {
                    return 0;
                }
                continue;
            }
        };
        RUNNING.store(id.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
        if let Some(arena) = &output_arena {
            arena.mark_started(id);
        }
        // Results of fixed-width numbers are written straight into the
        // output arena when the chunk is large: room for the widest (16
        // bytes a result), the unused part given back.
        let reserved = match (&mut output_arena, ChunkBody::parse(body)) {
            (Some(arena), Some(chunk)) if fds.is_empty() && chunk.count as usize * 8 >= SHM_MIN => {
                arena.reserve(RUN_HEADER as u64 + u64::from(chunk.count) * 16)
            }
            _ => None,
        };
        // The region's token ends with this block, before the commit.
        let result = {
            let mut token = match (&output_arena, &reserved) {
                (Some(arena), Some(reserved)) => arena.region(reserved),
                _ => None,
            };
            let direct = token.as_mut().map(|t| t.bytes_mut());
            run_chunk_into(&mut cached, body, fds, &mut out, &mut out_fds, direct)
        };
        let Some(result) = result else {
            return 2;
        };
        let in_place = match (&mut output_arena, reserved) {
            (Some(arena), Some(reserved)) => {
                let used = match &result {
                    Ok(Some(used)) => *used as u64,
                    _ => 0,
                };
                let start = arena.commit(reserved, used);
                (used > 0).then_some((start, used))
            }
            _ => None,
        };
        let sent = match result {
            Ok(_) if in_place.is_some() => {
                let (start, len) = in_place.unwrap_or_default();
                FromWorker::ResultShm { id, start, len }
                    .send(&channel, &[])
                    .is_ok()
            }
            Ok(_) => {
                let in_arena = if out_fds.is_empty() && out.len() >= SHM_MIN {
                    output_arena.as_mut().and_then(|a| a.put(&out))
                } else {
                    None
                };
                let size = out.len() as u64 + 8;
                let message = match in_arena {
                    None if size > POOL_MAX_FRAME => FromWorker::TaskFailed {
                        id,
                        failure: TaskFailure::TooLarge {
                            size,
                            limit: POOL_MAX_FRAME,
                        },
                    },
                    Some(start) => FromWorker::ResultShm {
                        id,
                        start,
                        len: out.len() as u64,
                    },
                    None => FromWorker::Result { id, outcomes: &out },
                };
                let fds = match message {
                    FromWorker::Result { .. } => &out_fds[..],
                    _ => &[],
                };
                message.send(&channel, fds).is_ok()
            }
            Err(err) => send_failure(&channel, Some(id), TaskFailure::from_error(err)),
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

/// Runs the pool's initializer, if it has one (a panic comes back as
/// [`Error::Panicked`]). Shared by both transports.
pub(super) fn run_initializer(init: &WorkerInit, fds: Vec<OwnedFd>) -> Result<(), Error> {
    let Some((name, init_args)) = &init.initializer else {
        return Ok(());
    };
    registry::lookup_name(name).and_then(|entry| {
        let mut out = Vec::new();
        let mut out_fds = Vec::new();
        // A single call: a panic comes back as `Error::Panicked`.
        registry::set_quiet_panics(true);
        entry.invoke(&mut Call::single(init_args, fds, &mut out, &mut out_fds))
    })
}

/// Runs the chunk `body` (a [`ChunkBody`]) with `fds`, its outcomes into
/// `out` (cleared first) and `out_fds`: a panicking item fails alone,
/// with its message. `None`: the body does not parse. `cached` keeps the
/// last name looked up. Shared by both transports.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))] // the MPI transport's
pub(super) fn run_chunk(
    cached: &mut Option<(String, &'static Entry)>,
    body: &[u8],
    fds: Vec<OwnedFd>,
    out: &mut Vec<u8>,
    out_fds: &mut Vec<OwnedFd>,
) -> Option<Result<(), Error>> {
    run_chunk_into(cached, body, fds, out, out_fds, None).map(|r| r.map(|_| ()))
}

/// [`run_chunk`], with `direct` a place where the outcomes of a chunk of
/// fixed-width numbers may go instead of `out`: `Ok(Some(len))` when they
/// went there (its first `len` bytes).
fn run_chunk_into(
    cached: &mut Option<(String, &'static Entry)>,
    body: &[u8],
    fds: Vec<OwnedFd>,
    out: &mut Vec<u8>,
    out_fds: &mut Vec<OwnedFd>,
    direct: Option<&mut [u8]>,
) -> Option<Result<Option<usize>, Error>> {
    let chunk = ChunkBody::parse(body)?;
    let entry = match cached {
        Some((cached_name, entry)) if cached_name == chunk.name => Ok(*entry),
        _ => registry::lookup_name(chunk.name)
            .inspect(|entry| *cached = Some((chunk.name.to_string(), entry))),
    };
    out.clear();
    Some(entry.and_then(|entry| {
        let call = Call::chunk(chunk.args, chunk.count as usize, fds, out, out_fds);
        let mut call = match direct {
            Some(region) => call.with_direct(region),
            None => call,
        };
        entry.invoke(&mut call).map(|()| call.direct_used())
    }))
}
