//! A non-blocking MPI send and a receive posted ahead, each owning its
//! buffer.
//!
//! rsmpi lends a buffer to a request for a scope (`request::scope`, which
//! must end before the buffer does) or for `'static`. The pool's messages
//! are built one at a time and must outlive the call that sends them
//! (the receiver may be busy with a task), and a receive is posted before
//! its message comes and completes in a later call, so the buffer is moved
//! onto the heap, lent to MPI as `'static` for the life of the request,
//! and taken back once MPI reports the request complete. This is the
//! transport's only `unsafe`, so it lives here.
#![allow(unsafe_code)]

use std::sync::Arc;

use mpi::datatype::Equivalence;
use mpi::point_to_point::{Destination, Message, Source};
use mpi::raw::AsRaw;
use mpi::request::{Request, StaticScope};
use mpi::topology::{Communicator, SimpleCommunicator};

/// A send in progress; its buffer is freed when MPI is done with it.
/// Dropping one that is not complete waits for it (a request must not be
/// dropped while MPI may still read its buffer).
#[derive(Debug)]
pub(crate) struct OwnedSend {
    request: Option<Request<'static, [u8]>>,
    buf: *mut [u8],
    /// Or, instead of `buf`, a buffer shared with others, which nobody can
    /// change while this holds it (sent without a copy).
    shared: Option<Arc<Vec<u8>>>,
}

// SAFETY: an `OwnedSend` owns its buffer alone (nothing else holds the
// pointer; a shared buffer is only read, by anyone), and its request is a
// handle that MPI lets any thread test or wait for, one call at a time:
// every call on it takes `&mut self`, and the transport makes its MPI
// calls under one lock (`MPI_THREAD_SERIALIZED` or more, checked when MPI
// starts).
unsafe impl Send for OwnedSend {}

impl OwnedSend {
    /// Starts sending `buf` to `rank` of `comm` with `tag` (`MPI_Isend`).
    pub(crate) fn start(comm: &SimpleCommunicator, rank: i32, tag: i32, buf: Vec<u8>) -> OwnedSend {
        let buf: *mut [u8] = Box::into_raw(buf.into_boxed_slice());
        // SAFETY: `buf` comes from `Box::into_raw` just above: it is valid,
        // aligned and initialized, and nothing writes it or frees it until
        // `reclaim`, which runs only after MPI reported the send complete
        // (the request, the only holder of this reference, is consumed by
        // then) or after waiting for it.
        let shared: &'static [u8] = unsafe { &*buf };
        let request = comm
            .process_at_rank(rank)
            .immediate_send_with_tag(StaticScope, shared, tag);
        OwnedSend {
            request: Some(request),
            buf,
            shared: None,
        }
    }

    /// Starts sending the bytes of `buf`, which others may share (but not
    /// change: it is behind an `Arc`), without copying them.
    pub(crate) fn start_shared(
        comm: &SimpleCommunicator,
        rank: i32,
        tag: i32,
        buf: Arc<Vec<u8>>,
    ) -> OwnedSend {
        let bytes: *const [u8] = buf.as_slice();
        // SAFETY: the vector's heap buffer does not move or change while
        // an `Arc` to it lives (no `&mut` to a shared `Arc`'s value can be
        // made), and this `OwnedSend` keeps one until the request is
        // complete and consumed (`reclaim`, after `test` or `wait`).
        let lent: &'static [u8] = unsafe { &*bytes };
        let request = comm
            .process_at_rank(rank)
            .immediate_send_with_tag(StaticScope, lent, tag);
        OwnedSend {
            request: Some(request),
            buf: std::ptr::slice_from_raw_parts_mut(std::ptr::NonNull::dangling().as_ptr(), 0),
            shared: Some(buf),
        }
    }

    /// `true` once the send is complete (its buffer is then freed).
    pub(crate) fn test(&mut self) -> bool {
        let Some(request) = self.request.take() else {
            return true;
        };
        match request.test() {
            Ok(_) => {
                self.reclaim();
                true
            }
            Err(request) => {
                self.request = Some(request);
                false
            }
        }
    }

    /// Frees the buffer; the request must be complete (consumed).
    fn reclaim(&mut self) {
        self.shared = None;
        let empty: *mut [u8] =
            std::ptr::slice_from_raw_parts_mut(std::ptr::NonNull::dangling().as_ptr(), 0);
        let buf = std::mem::replace(&mut self.buf, empty);
        if buf.len() == 0 {
            return;
        }
        // SAFETY: `buf` came from `Box::into_raw` in `start` and is freed
        // once (it is replaced by an empty slice above); the request that
        // borrowed it is complete and consumed, so no reference to it is
        // left.
        drop(unsafe { Box::from_raw(buf) });
    }
}

impl Drop for OwnedSend {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            request.wait();
        }
        self.reclaim();
    }
}

/// A receive posted ahead of its message (`MPI_Irecv` into a buffer of a
/// fixed capacity it owns): a message that finds it posted is written
/// into the buffer directly, without MPI's queue of unexpected messages
/// and its copy. Between its completion and the next [`post`](Self::post)
/// the message's bytes are readable ([`received`](Self::received)); a
/// message longer than the capacity is an MPI error (the senders split
/// theirs). Dropped while posted, the receive is cancelled.
#[derive(Debug)]
pub(crate) struct OwnedRecv {
    request: Option<Request<'static, [u8]>>,
    buf: *mut [u8],
    /// The message received (source rank, length), until the next post.
    got: Option<(i32, usize)>,
}

// SAFETY: as for `OwnedSend`: the buffer is this value's alone (MPI holds
// it only while the request is pending, and nothing else reads it then),
// every call on the request takes `&mut self`, and the transport makes its
// MPI calls one at a time.
unsafe impl Send for OwnedRecv {}

impl OwnedRecv {
    /// A receive of at most `capacity` bytes, not posted yet.
    pub(crate) fn new(capacity: usize) -> OwnedRecv {
        let buf: *mut [u8] = Box::into_raw(vec![0u8; capacity].into_boxed_slice());
        OwnedRecv {
            request: None,
            buf,
            got: None,
        }
    }

    /// Posts the receive of the next message with `tag` from `source` of
    /// `comm` (any rank with `None`), unless one is posted; the last
    /// message's bytes are gone.
    pub(crate) fn post(&mut self, comm: &SimpleCommunicator, source: Option<i32>, tag: i32) {
        if self.request.is_some() {
            return;
        }
        self.got = None;
        // SAFETY: `buf` comes from `Box::into_raw` in `new` and stays valid
        // until `drop`. No other reference to it exists now: `received`'s
        // borrows end before this `&mut self` call, and none is made while
        // the request is pending (`got` is `None` until it completes). MPI
        // holds this one until the request completes or is cancelled and
        // waited for, which `test` and `drop` do before the buffer is read
        // or freed.
        let lent: &'static mut [u8] = unsafe { &mut *self.buf };
        let request = match source {
            Some(rank) => {
                comm.process_at_rank(rank)
                    .immediate_receive_into_with_tag(StaticScope, lent, tag)
            }
            None => comm
                .any_process()
                .immediate_receive_into_with_tag(StaticScope, lent, tag),
        };
        self.request = Some(request);
    }

    /// `MPI_Test`: if the posted receive completed, its message's source
    /// rank and bytes (until the next post).
    pub(crate) fn test(&mut self) -> Option<(i32, &[u8])> {
        let request = self.request.take()?;
        match request.test() {
            Ok(status) => {
                let len = usize::try_from(status.count(u8::equivalent_datatype())).unwrap_or(0);
                self.got = Some((status.source_rank(), len));
                self.received()
            }
            Err(request) => {
                self.request = Some(request);
                None
            }
        }
    }

    /// The last message received (source rank and bytes), if the receive
    /// completed and was not posted again.
    pub(crate) fn received(&self) -> Option<(i32, &[u8])> {
        let (source, len) = self.got?;
        // SAFETY: `got` is set only once the request completed (MPI wrote
        // the message and holds no reference any more) and cleared before
        // the buffer is lent again; `buf` is valid until `drop`, which
        // cannot run while this borrow of `self` lives.
        let buf: &[u8] = unsafe { &*self.buf };
        Some((source, buf.get(..len).unwrap_or(buf)))
    }
}

impl Drop for OwnedRecv {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            request.cancel();
            request.wait();
        }
        // SAFETY: `buf` came from `Box::into_raw` in `new` and is freed
        // only here; the request that borrowed it is complete (or was
        // never posted), so no reference to it is left.
        drop(unsafe { Box::from_raw(self.buf) });
    }
}

/// Receives the matched `message` of `count` bytes (its probe's count)
/// at the end of `into`, without first filling the room with zeroes
/// (`MPI_Mrecv` into the vector's spare capacity): a large chunk is
/// written once, by MPI. `false` if MPI reported an error (the bytes are
/// not appended: nothing says MPI wrote them).
#[must_use]
pub(crate) fn receive_appended(message: Message, count: i32, into: &mut Vec<u8>) -> bool {
    let len = count.max(0);
    let count = usize::try_from(len).unwrap_or(0);
    into.reserve(count);
    let at = into.len();
    let mut raw = message.as_raw();
    // `MPI_Mrecv` consumes the handle through `raw`; the `Message` (whose
    // drop checks that it was received) holds nothing else.
    std::mem::forget(message);
    let room = into.spare_capacity_mut();
    let mut status = std::mem::MaybeUninit::uninit();
    // SAFETY: `room` has at least `count` writable bytes (reserved above)
    // that nothing else references while MPI writes them; `raw` is the
    // matched message, received once, and its size is `count` bytes of
    // `MPI_UNSIGNED_CHAR` (its probe's count), so MPI writes exactly that
    // many; `status` is written by MPI.
    let rc = unsafe {
        mpi::ffi::MPI_Mrecv(
            room.as_mut_ptr().cast(),
            len,
            u8::equivalent_datatype().as_raw(),
            &mut raw,
            status.as_mut_ptr(),
        )
    };
    if rc != mpi::ffi::MPI_SUCCESS as i32 {
        return false;
    }
    // SAFETY: MPI initialized the `count` bytes after `at` (it returned
    // MPI_SUCCESS above), within the capacity reserved.
    unsafe { into.set_len(at + count) };
    true
}
