//! A non-blocking MPI send that owns its buffer.
//!
//! rsmpi lends a buffer to a request for a scope (`request::scope`, which
//! must end before the buffer does) or for `'static`. The pool's messages
//! are built one at a time and must outlive the call that sends them
//! (the receiver may be busy with a task), so the buffer is moved onto the
//! heap, lent to MPI as `'static` for the life of the request, and taken
//! back once MPI reports the send complete. This is the transport's only
//! `unsafe`, so it lives here.
#![allow(unsafe_code)]

use mpi::point_to_point::Destination;
use mpi::request::{Request, StaticScope};
use mpi::topology::{Communicator, SimpleCommunicator};

/// A send in progress; its buffer is freed when MPI is done with it.
/// Dropping one that is not complete waits for it (a request must not be
/// dropped while MPI may still read its buffer).
#[derive(Debug)]
pub(crate) struct OwnedSend {
    request: Option<Request<'static, [u8]>>,
    buf: *mut [u8],
}

// SAFETY: an `OwnedSend` owns its buffer alone (nothing else holds the
// pointer), and its request is a handle that MPI lets any thread test or
// wait for, one call at a time: every call on it takes `&mut self`, and
// the transport makes its MPI calls under one lock (`MPI_THREAD_SERIALIZED`
// or more, checked when MPI starts).
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
