//! Queues across processes: Python's `multiprocessing.Queue`,
//! `SimpleQueue` and `JoinableQueue`, typed, crash-safe and fast.
//!
//! A queue is a ring of fixed-size slots in shared memory (a memfd mapped
//! by every process that holds a handle): a `put` claims a slot with one
//! CAS and encodes straight into it, a `get` takes it with one CAS and
//! decodes in place, and neither makes a system call or a full memory
//! fence while nobody sleeps; sleepers use futexes (and a `membarrier`
//! before sleeping). A message that does not fit a slot (over ~1 KiB
//! encoded) goes to that slot's own extent of a sparse memfd (one
//! `pwrite`, one `pread`, its pages freed once it is read), so no `put`
//! ever waits for another; the handles a message carries wait in a
//! datagram socket beside the ring. The design, and why nothing can hang,
//! is described in the `ring` module's source.
//!
//! Guarantees:
//! - any number of producer and consumer processes; a message is delivered
//!   whole, exactly once (but see the last point);
//! - a `bounded(n)` queue holds `n` messages of any size;
//! - a producer killed in the middle of a `put` neither corrupts nor blocks
//!   the queue: consumers detect the dead writer and skip its slot (its
//!   `put` never returned, so nothing that was put is lost);
//! - a consumer killed in the middle of a `get` neither blocks the queue
//!   nor loses the message it was taking: the next consumer that has to
//!   wait on an empty queue (or calls `try_get` on it) takes the dead
//!   consumer's slot over and delivers that message again, out of order. The dead `get` never
//!   returned, so user code sees the message once. Two exceptions: a
//!   message of over ~1 KiB whose consumer had finished decoding it when
//!   it died counts as delivered (its memory is being freed); and a
//!   message whose second consumer dies too is dropped rather than handed
//!   to a third (a message that crashes its decoder would otherwise kill
//!   every consumer in turn). A dropped message counts as done for
//!   [`JoinableQueue::join`];
//! - a dead producer or consumer is recognised even once its pid went to
//!   another process: each process that holds the queue is named in the
//!   queue's memory by its pid and start time. Nothing is taken from a
//!   process that cannot be judged (one in another pid namespace, or
//!   behind `hidepid`): the queue then waits behind a dead one's message
//!   as behind a live one's. More than 256 attachments alive at once
//!   (each process that holds the queue is one; a process that received
//!   it twice is two) are named by bare pid, and a dead one of those whose
//!   pid was reused is taken for alive while the new process lives;
//! - `get_timeout`, `put_timeout`, `try_get` and `try_put` return by their
//!   deadline whatever other processes do (one stopped or spinning in the
//!   middle of a message included); a queue whose shared state is corrupt
//!   returns an error rather than panicking or hanging;
//! - a `put` that returned has placed the message in shared memory: the
//!   producer may exit at once (no feeder thread, no flush at exit);
//! - `put` reports encoding failures to its caller, with the item back;
//! - a handle inside a message is received as the type it was sent as, or
//!   the `get` fails with [`Error::Decode`]; a message whose handles'
//!   descriptors the kernel had to drop (MSG_CTRUNC: a full descriptor
//!   table) fails with an [`Error::Io`] of its own (it is consumed, the
//!   descriptors that did arrive are closed), and later messages are not
//!   affected.
//!
//! Limits: unlike Python's, [`Queue::new`] is not unbounded: it holds
//! [`DEFAULT_CAPACITY`] (8192) messages, and a `put` beyond that waits, as
//! on a bounded queue (see [`DEFAULT_CAPACITY`] for why). Messages that
//! carry handles are also bounded by the side socket's buffer: about 270
//! of them can wait in one queue at a time (with Linux's default socket
//! buffer of 208 KiB), and a `put` of one more waits for room as if the
//! queue were full. A message is at most 1 TiB (less for queues of more
//! than 4 Mi slots). The arena's offsets are large (slot `i`'s extent
//! starts at `i` TiB, sparse): a process with a file-size limit (`ulimit
//! -f`) gets `SIGXFSZ` when it puts a large message past that limit.
//!
//! ```no_run
//! use multiproc::{process_fn, Process, Queue};
//!
//! #[process_fn]
//! fn produce(q: Queue<(u32, String, String)>) {
//!     q.put((38, "snake".into(), "hello".into())).ok();
//! }
//!
//! # fn main() -> multiproc::Result<()> {
//! let q = Queue::new()?;
//! let mut p = Process::new(produce, (q.clone(),));
//! p.start()?;
//! println!("{:?}", q.get()?);
//! p.join()?;
//! # Ok(())
//! # }
//! ```

mod error;
#[cfg(all(test, loom))]
mod loom;
mod protocol;
mod ring;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use self::error::{
    GetError, GetTimeoutError, PutError, PutManyError, PutTimeoutError, TryGetError, TryPutError,
};
use self::ring::{
    ARENA_HEADER, BATCH_HEADER, Claim, Claimed, Held, Outgoing, Publish, Quick, Ring, Taken, Wait,
};
use crate::codec;
use crate::error::{Error, Result};
use crate::handle::{self, HandleWire, Kind, Parts, Received, handle_serde};

/// Capacity of [`Queue::new`], in messages: 8192.
///
/// Python's `Queue()` is unbounded; this one is bounded, deliberately.
/// Each slot is 1088 bytes (a message up to about 1 KiB encoded travels in
/// the slot itself, which is what makes 1 KiB messages fast), and a ring
/// touches every slot once it has gone round, so a queue costs its
/// capacity times 1088 bytes of shared memory: 8.5 MiB here; 64 Ki slots
/// would be 68 MiB per queue. A growing chain of rings would have to hand
/// each new memfd to every process holding the queue, crash-safely; not
/// worth it against a bound that only a producer running 8192 messages
/// ahead of its consumers ever meets. Need more? [`Queue::bounded`].
pub const DEFAULT_CAPACITY: usize = 8192;

/// The most items in one batch message (`put_many`): bounds what a
/// consumer reserves for a count read from shared memory.
const MAX_BATCH: usize = 4096;

enum PutFail {
    Full,
    Closed,
    Failed(Error),
}

enum GetFail {
    Empty,
    Disconnected,
    Failed(Error),
}

/// A FIFO queue shared by any number of producer and consumer processes.
///
/// `Clone` gives another handle to the same queue. Pass a handle to a
/// [`Process`](crate::Process), a pool task, or through another queue or
/// pipe: it arrives working (its memfd and sockets travel with it). The
/// queue's memory is freed when the last handle in every process is gone.
///
/// Capacity: [`Queue::new`] holds [`DEFAULT_CAPACITY`] (8192) messages,
/// not an unbounded number as in Python; `put` waits when it is full.
///
/// # Examples
///
/// ```
/// use multiproc::Queue;
/// let q = Queue::bounded(2)?;
/// q.put(1u32)?;
/// q.try_put(2).unwrap();
/// assert!(q.try_put(3).is_err()); // full: the error hands 3 back
/// assert_eq!(q.get()?, 1);
/// assert_eq!(q.qsize(), 1);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Queue<T> {
    ring: Arc<Ring>,
    _marker: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            ring: Arc::clone(&self.ring),
            _marker: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("capacity", &self.ring.capacity())
            .field("qsize", &self.ring.len())
            .finish()
    }
}

impl<T> Queue<T> {
    /// A queue holding up to [`DEFAULT_CAPACITY`] (8192) messages: a `put`
    /// beyond that waits for room. Python's `Queue()` is unbounded; this is
    /// not (see [`DEFAULT_CAPACITY`] for the memory arithmetic).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory or the sockets cannot be created.
    pub fn new() -> Result<Queue<T>> {
        Queue::bounded(DEFAULT_CAPACITY)
    }

    /// A queue holding at most `maxsize` messages: Python's
    /// `Queue(maxsize)`. `put` waits (and `try_put` fails) while it is full.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for `maxsize == 0`; [`Error::Io`] as
    /// [`Queue::new`].
    pub fn bounded(maxsize: usize) -> Result<Queue<T>> {
        Ok(Queue::from_ring(Ring::create(maxsize, false)?))
    }

    fn from_ring(ring: Ring) -> Queue<T> {
        Queue {
            ring: Arc::new(ring),
            _marker: PhantomData,
        }
    }

    /// The number of messages in the queue (approximate while other
    /// processes use it, as in Python; it counts puts in progress).
    pub fn qsize(&self) -> usize {
        self.ring.len()
    }

    /// `true` if the queue holds no message (approximate, as `qsize`).
    pub fn empty(&self) -> bool {
        self.ring.len() == 0
    }

    /// `true` if the queue is at capacity (approximate, as `qsize`).
    pub fn full(&self) -> bool {
        self.ring.len() >= self.ring.capacity()
    }

    /// The most messages the queue holds.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }

    /// Closes the queue for every process: later puts fail with
    /// `Closed` (the item handed back); gets return what is left, then
    /// `Disconnected`. Waiting producers and consumers wake up, and an
    /// [`iter`](Queue::iter) ends once the queue is drained.
    pub fn close(&self) {
        self.ring.close();
    }

    /// `true` once [`close`](Queue::close) was called (in any process).
    pub fn is_closed(&self) -> bool {
        self.ring.is_closed()
    }
}

impl<T: Serialize + 'static> Queue<T> {
    fn put_inner(
        &self,
        item: T,
        deadline: Option<Instant>,
        wait: bool,
    ) -> Result<(), (T, PutFail)> {
        // A number: written with two word stores at most, no encoder.
        if let Some((bytes, len)) = codec::primitive_bytes(&item) {
            if self.ring.try_put_small(&bytes, len) {
                return Ok(());
            }
        }
        self.put_ref(&item, deadline, wait, None)
            .map_err(|f| (item, f))
    }

    /// Claims a slot, then encodes straight into it (no intermediate
    /// buffer, no copy). A message that does not fit is encoded into a
    /// buffer *keeping the slot* and goes to the slot's arena extent (a
    /// `bounded(n)` queue holds `n` messages of any size: a claim given up
    /// would be a tombstone taking room). A message with handles also
    /// sends them to the side socket, without waiting: when there is no
    /// room it gives its slot up, waits for room holding nothing, and
    /// claims again.
    ///
    /// `first`: a slot the caller claimed already (`put_many`), used for
    /// the first attempt.
    fn put_ref(
        &self,
        item: &T,
        deadline: Option<Instant>,
        wait: bool,
        mut first: Option<Claim<'_>>,
    ) -> Result<(), PutFail> {
        let mut out: Option<Outgoing> = None;
        let mut side_waits = 0u32;
        loop {
            let claimed = match first.take() {
                Some(claim) => Claimed::Slot(claim),
                None => self.ring.try_claim(),
            };
            let mut claim = match claimed {
                Claimed::Slot(claim) => claim,
                Claimed::Closed => return Err(PutFail::Closed),
                Claimed::Failed(e) => return Err(PutFail::Failed(*e)),
                Claimed::Full => {
                    if !wait || self.ring.wait_not_full(deadline) == Wait::Deadline {
                        return Err(PutFail::Full);
                    }
                    continue;
                }
            };
            let sent = match &mut out {
                Some(out) => claim.publish_out(out),
                None => {
                    let mut fds = Vec::new();
                    let fit = claim
                        .write(|buf| codec::encode_typed_into(item, buf, &mut fds))
                        .and_then(|r| r)
                        .map_err(PutFail::Failed)?;
                    let prepared = match fit {
                        Some(len) if fds.is_empty() => {
                            claim.publish_inline(len);
                            return Ok(());
                        }
                        Some(len) => {
                            let mut buf = vec![0u8; ARENA_HEADER];
                            buf.extend_from_slice(&claim.written(len).map_err(PutFail::Failed)?);
                            Outgoing { buf, fds }
                        }
                        None => {
                            drop(fds);
                            let (mut buf, mut fds) = (vec![0u8; ARENA_HEADER], Vec::new());
                            codec::encode_typed(item, &mut buf, &mut fds)
                                .map_err(PutFail::Failed)?;
                            Outgoing { buf, fds }
                        }
                    };
                    claim.publish_out(out.insert(prepared))
                }
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(Publish::Failed(e)) => return Err(PutFail::Failed(e)),
                Err(Publish::SideFull) => {
                    if !wait || !self.ring.wait_side_room(deadline, side_waits) {
                        return Err(PutFail::Full);
                    }
                    side_waits += 1;
                }
            }
        }
    }

    /// Puts `items` in order: several per message when they are small (as
    /// many as fit a slot's ~1 KiB, a message the consumers take with one
    /// claim), alone when one is large or carries handles.
    fn put_many_inner(
        &self,
        items: &[T],
        deadline: Option<Instant>,
        wait: bool,
    ) -> Result<(), (usize, PutFail)> {
        let mut done = 0;
        while let Some(rest) = items.get(done..).filter(|r| !r.is_empty()) {
            let mut claim = match self.ring.try_claim() {
                Claimed::Slot(claim) => claim,
                Claimed::Closed => return Err((done, PutFail::Closed)),
                Claimed::Failed(e) => return Err((done, PutFail::Failed(*e))),
                Claimed::Full => {
                    if !wait || self.ring.wait_not_full(deadline) == Wait::Deadline {
                        return Err((done, PutFail::Full));
                    }
                    continue;
                }
            };
            let written = claim.write(|buf| {
                let (head, body) = buf.split_at_mut(BATCH_HEADER);
                let (n, len) = codec::encode_batch_into(rest, body, MAX_BATCH);
                if n == 1 {
                    // One item: a plain message (its bytes moved to the front).
                    buf.copy_within(BATCH_HEADER..BATCH_HEADER + len, 0);
                } else {
                    head[..4].copy_from_slice(&(n as u32).to_le_bytes());
                }
                (n, len)
            });
            match written {
                Ok((0, _)) => {
                    // Too large, with handles, or failing: on its own, in
                    // the slot claimed for it.
                    self.put_ref(&rest[0], deadline, wait, Some(claim))
                        .map_err(|f| (done, f))?;
                    done += 1;
                }
                Ok((1, len)) => {
                    claim.publish_inline(len);
                    done += 1;
                }
                Ok((n, len)) => {
                    claim.publish_batch(BATCH_HEADER + len);
                    done += n;
                }
                Err(e) => return Err((done, PutFail::Failed(e))),
            }
        }
        Ok(())
    }

    /// Puts every item of `items`, in order, waiting while the queue is
    /// full: the batch form of [`put`](Queue::put). Small items travel
    /// several to a message (as many as fit a slot's ~1 KiB: 134 `u64`s),
    /// which a consumer takes with one claim, so a batch costs far less
    /// per item than single puts; a large item, or one that carries
    /// handles, travels alone. The items stay in order with respect to
    /// every other put of this thread.
    ///
    /// Such a message takes one slot of the queue's capacity and counts
    /// as one in [`qsize`](Queue::qsize). A consumer that takes part of it
    /// (a [`get`](Queue::get) takes one item) keeps the rest in its
    /// process for its next gets: if that process dies first, those items
    /// are lost with it, as items a consumer took always are.
    ///
    /// # Errors
    ///
    /// [`PutManyError::Closed`] after [`close`](Queue::close);
    /// [`PutManyError::Failed`] if an item cannot be encoded. Both say how
    /// many items went in before.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Queue;
    /// let q = Queue::bounded(4)?;
    /// q.put_many(&[1u64, 2, 3])?;
    /// q.put(4)?;
    /// let mut got = Vec::new();
    /// assert_eq!(q.get_many(&mut got, 10)?, 4);
    /// assert_eq!(got, [1, 2, 3, 4]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn put_many(&self, items: &[T]) -> Result<(), PutManyError> {
        self.put_many_inner(items, None, true)
            .map_err(|(put, f)| match f {
                PutFail::Full | PutFail::Closed => PutManyError::Closed { put },
                PutFail::Failed(error) => PutManyError::Failed { put, error },
            })
    }

    /// Like [`put_many`](Queue::put_many), waiting at most `timeout` in
    /// all for room.
    ///
    /// # Errors
    ///
    /// [`PutManyError::Timeout`] if the queue stayed full; otherwise as
    /// [`put_many`](Queue::put_many).
    pub fn put_many_timeout(&self, items: &[T], timeout: Duration) -> Result<(), PutManyError> {
        let deadline = Instant::now() + timeout;
        self.put_many_inner(items, Some(deadline), true)
            .map_err(|(put, f)| match f {
                PutFail::Full => PutManyError::Timeout { put },
                PutFail::Closed => PutManyError::Closed { put },
                PutFail::Failed(error) => PutManyError::Failed { put, error },
            })
    }

    /// Puts as many of `items` (the first ones, in order) as there is room
    /// for now, without waiting: how many it put (0 when the queue is
    /// full). See [`put_many`](Queue::put_many).
    ///
    /// # Errors
    ///
    /// As [`put_many`](Queue::put_many).
    pub fn try_put_many(&self, items: &[T]) -> Result<usize, PutManyError> {
        match self.put_many_inner(items, None, false) {
            Ok(()) => Ok(items.len()),
            Err((put, PutFail::Full)) => Ok(put),
            Err((put, PutFail::Closed)) => Err(PutManyError::Closed { put }),
            Err((put, PutFail::Failed(error))) => Err(PutManyError::Failed { put, error }),
        }
    }

    /// Puts `item` at the end of the queue, waiting while it is full.
    /// When this returns `Ok`, the message is in shared memory: the process
    /// may exit at once.
    ///
    /// # Errors
    ///
    /// [`PutError::Closed`] after [`close`](Queue::close);
    /// [`PutError::Failed`] if the item cannot be encoded. Both hand the
    /// item back.
    pub fn put(&self, item: T) -> Result<(), PutError<T>> {
        self.put_inner(item, None, true)
            .map_err(|(item, f)| match f {
                PutFail::Full | PutFail::Closed => PutError::Closed(item),
                PutFail::Failed(e) => PutError::Failed(item, e),
            })
    }

    /// Like [`put`](Queue::put), waiting at most `timeout` for room.
    ///
    /// # Errors
    ///
    /// [`PutTimeoutError::Timeout`] if the queue stayed full; otherwise as
    /// [`put`](Queue::put).
    pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<(), PutTimeoutError<T>> {
        let deadline = Instant::now() + timeout;
        self.put_inner(item, Some(deadline), true)
            .map_err(|(item, f)| match f {
                PutFail::Full => PutTimeoutError::Timeout(item),
                PutFail::Closed => PutTimeoutError::Closed(item),
                PutFail::Failed(e) => PutTimeoutError::Failed(item, e),
            })
    }

    /// Puts `item` if there is room now (Python's `put_nowait`).
    ///
    /// # Errors
    ///
    /// [`TryPutError::Full`] if the queue is full; otherwise as
    /// [`put`](Queue::put).
    pub fn try_put(&self, item: T) -> Result<(), TryPutError<T>> {
        self.put_inner(item, None, false)
            .map_err(|(item, f)| match f {
                PutFail::Full => TryPutError::Full(item),
                PutFail::Closed => TryPutError::Closed(item),
                PutFail::Failed(e) => TryPutError::Failed(item, e),
            })
    }
}

impl<T: DeserializeOwned + 'static> Queue<T> {
    /// Takes the first message, waiting as `deadline` and `wait` say, and
    /// hands it to `on`.
    fn take_with<R>(
        &self,
        deadline: Option<Instant>,
        wait: bool,
        mut on: impl FnMut(Held<'_>) -> Result<R, GetFail>,
    ) -> Result<R, GetFail> {
        // Whether this call has slept: only then (or without waiting) does
        // it look for messages of dead consumers (a scan reads every slot),
        // so the fast path, which waits by spinning, reads no clock.
        let mut slept = false;
        loop {
            match self.ring.try_take(deadline, wait) {
                Taken::Slot(held) => return on(held),
                Taken::Failed(e) => return Err(GetFail::Failed(*e)),
                Taken::Busy => return Err(GetFail::Empty),
                Taken::Closed => {
                    return match self.ring.recover(deadline, wait, true) {
                        Some(held) => on(held),
                        None => Err(GetFail::Disconnected),
                    };
                }
                Taken::Empty(stalled) => {
                    if !wait || slept {
                        if let Some(held) = self.ring.recover(deadline, wait, false) {
                            return on(held);
                        }
                    }
                    if !wait {
                        return Err(GetFail::Empty);
                    }
                    match self.ring.wait_not_empty(deadline, stalled) {
                        Wait::Deadline => return Err(GetFail::Empty),
                        Wait::Slept => slept = true,
                        Wait::Ready => {}
                    }
                }
            }
        }
    }

    /// Decodes the message of `held` into `out`: at most `room` items of a
    /// batch (the rest go to this process's stash), or the one item of a
    /// plain message. Returns how many items it appended.
    fn decode_into(&self, held: Held<'_>, out: &mut Vec<T>, room: usize) -> Result<usize, GetFail> {
        if held.is_batch() {
            return held
                .read(|bytes, _| self.unbatch(bytes, out, room))
                .and_then(|r| r)
                .map_err(GetFail::Failed);
        }
        let v = held
            .read(|bytes, fds| codec::decode_typed(bytes, fds))
            .and_then(|r| r)
            .map_err(GetFail::Failed)?;
        out.push(v);
        Ok(1)
    }

    /// The items of a batch message's `bytes`: up to `room` into `out`,
    /// the others into the stash (copied: the slot is released next).
    fn unbatch(&self, bytes: &[u8], out: &mut Vec<T>, room: usize) -> Result<usize> {
        let bad = |what: String| Error::Decode { message: what };
        let (head, items) = bytes
            .split_at_checked(BATCH_HEADER)
            .ok_or_else(|| bad("a batch message without its header".into()))?;
        let count = head
            .first_chunk::<4>()
            .map_or(0, |c| u32::from_le_bytes(*c) as usize);
        if !(2..=MAX_BATCH).contains(&count) {
            return Err(bad(format!("a batch message of {count} items")));
        }
        let now = count.min(room);
        let mut dec = codec::SeqDecoder::new(items);
        dec.extend_into(now, out)?;
        if now < count {
            let rest = &items[items.len() - dec.remaining()..];
            self.ring.with_stash(|stash| {
                stash.bytes.clear();
                stash.bytes.extend_from_slice(rest);
                stash.left = count - now;
            });
        }
        Ok(now)
    }

    /// Up to `room` items of this process's stash (see
    /// [`put_many`](Queue::put_many)), appended to `out`.
    fn take_stashed(&self, out: &mut Vec<T>, room: usize) -> Result<usize> {
        self.ring.with_stash(|stash| {
            let now = stash.left.min(room);
            if now == 0 {
                return Ok(0);
            }
            let mut dec = codec::SeqDecoder::new(&stash.bytes);
            let got = dec.extend_into(now, out);
            let used = stash.bytes.len() - dec.remaining();
            if got.is_err() {
                // Undecodable: the rest cannot be found either.
                stash.left = 0;
                return got.map(|()| 0);
            }
            stash.bytes.drain(..used);
            stash.left -= now;
            Ok(now)
        })
    }

    fn get_inner(&self, deadline: Option<Instant>, wait: bool) -> Result<T, GetFail> {
        if self.ring.has_stash() {
            let mut one = Vec::with_capacity(1);
            self.take_stashed(&mut one, 1).map_err(GetFail::Failed)?;
            if let Some(v) = one.pop() {
                return Ok(v);
            }
        }
        let decode_held = |held: Held<'_>| {
            if held.is_batch() {
                let mut one = Vec::with_capacity(1);
                self.decode_into(held, &mut one, 1)?;
                return one
                    .pop()
                    .ok_or_else(|| GetFail::Failed(Error::internal("an empty batch message")));
            }
            held.read(|bytes, fds| codec::decode_typed(bytes, fds))
                .and_then(|r| r)
                .map_err(GetFail::Failed)
        };
        // A number (at most two words) is copied out and its slot released
        // before it is decoded: decoding it runs no user code, so nothing
        // can die or panic in a decode after the slot was given back.
        // Other types decode while they hold the slot (see `Queue`'s
        // guarantees on consumers killed mid-get).
        if codec::is_primitive::<T>() {
            match self.ring.try_take_small() {
                Quick::Bytes(bytes, len) => {
                    let mut rest = &bytes[..len.min(bytes.len())];
                    return match codec::read_primitive::<T>(&mut rest) {
                        Some(v) => v.map_err(GetFail::Failed),
                        None => codec::decode_typed(rest, Vec::new()).map_err(GetFail::Failed),
                    };
                }
                Quick::Held(held) => return decode_held(held),
                Quick::Miss => {}
            }
        }
        self.take_with(deadline, wait, decode_held)
    }

    /// Appends up to `limit` items to `buf`: those this process kept from
    /// a batch, then the first message (waiting for one as `deadline` and
    /// `wait` say if none came yet), then whatever can be taken without
    /// waiting.
    fn get_many_inner(
        &self,
        buf: &mut Vec<T>,
        limit: usize,
        deadline: Option<Instant>,
        wait: bool,
    ) -> Result<usize, GetFail> {
        let mut got = 0;
        if limit == 0 {
            return Ok(0);
        }
        if self.ring.has_stash() {
            got += self.take_stashed(buf, limit).map_err(GetFail::Failed)?;
        }
        if got == 0 {
            got += self.take_with(deadline, wait, |held| self.decode_into(held, buf, limit))?;
        }
        while got < limit {
            match self.ring.try_take(None, false) {
                Taken::Slot(held) => got += self.decode_into(held, buf, limit - got)?,
                Taken::Failed(e) => return Err(GetFail::Failed(*e)),
                Taken::Empty(_) | Taken::Busy | Taken::Closed => break,
            }
        }
        Ok(got)
    }

    /// Appends to `buf` at least one item and at most `limit`, waiting
    /// only for the first: the batch form of [`get`](Queue::get), as
    /// tokio's `Receiver::recv_many`. It takes what a `get` would, in the
    /// same order, and after the first item takes only what is there
    /// already. Returns how many items it appended (0 only for `limit ==
    /// 0`, which returns at once). Items of a batch message
    /// ([`put_many`](Queue::put_many)) past `limit` are kept in this
    /// process for its next gets.
    ///
    /// # Errors
    ///
    /// As [`get`](Queue::get). A message that does not decode ends the
    /// call with [`GetError::Failed`]; the items taken before it are in
    /// `buf`.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Queue;
    /// let q = Queue::bounded(8)?;
    /// q.put_many(&[1u32, 2, 3, 4, 5])?;
    /// let mut buf = Vec::new();
    /// assert_eq!(q.get_many(&mut buf, 2)?, 2);
    /// assert_eq!(q.get()?, 3); // the rest of the batch, in order
    /// assert_eq!(q.get_many(&mut buf, 10)?, 2);
    /// assert_eq!(buf, [1, 2, 4, 5]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get_many(&self, buf: &mut Vec<T>, limit: usize) -> Result<usize, GetError> {
        self.get_many_inner(buf, limit, None, true)
            .map_err(|f| match f {
                GetFail::Empty | GetFail::Disconnected => GetError::Disconnected,
                GetFail::Failed(e) => GetError::Failed(e),
            })
    }

    /// Like [`get_many`](Queue::get_many), waiting at most `timeout` for
    /// the first item.
    ///
    /// # Errors
    ///
    /// [`GetTimeoutError::Timeout`] if nothing arrived; otherwise as
    /// [`get_many`](Queue::get_many).
    pub fn get_many_timeout(
        &self,
        buf: &mut Vec<T>,
        limit: usize,
        timeout: Duration,
    ) -> Result<usize, GetTimeoutError> {
        let deadline = Instant::now() + timeout;
        self.get_many_inner(buf, limit, Some(deadline), true)
            .map_err(|f| match f {
                GetFail::Empty => GetTimeoutError::Timeout,
                GetFail::Disconnected => GetTimeoutError::Disconnected,
                GetFail::Failed(e) => GetTimeoutError::Failed(e),
            })
    }

    /// Like [`get_many`](Queue::get_many), without waiting at all.
    ///
    /// # Errors
    ///
    /// [`TryGetError::Empty`] if there was nothing to take; otherwise as
    /// [`get_many`](Queue::get_many).
    pub fn try_get_many(&self, buf: &mut Vec<T>, limit: usize) -> Result<usize, TryGetError> {
        self.get_many_inner(buf, limit, None, false)
            .map_err(|f| match f {
                GetFail::Empty => TryGetError::Empty,
                GetFail::Disconnected => TryGetError::Disconnected,
                GetFail::Failed(e) => TryGetError::Failed(e),
            })
    }

    /// Removes and returns the first message, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`GetError::Disconnected`] once the queue is closed and empty;
    /// [`GetError::Failed`] if the message does not decode as `T` (it is
    /// consumed).
    pub fn get(&self) -> Result<T, GetError> {
        self.get_inner(None, true).map_err(|f| match f {
            GetFail::Empty | GetFail::Disconnected => GetError::Disconnected,
            GetFail::Failed(e) => GetError::Failed(e),
        })
    }

    /// Like [`get`](Queue::get), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`GetTimeoutError::Timeout`] if nothing arrived; otherwise as
    /// [`get`](Queue::get).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use multiproc::Queue;
    /// use multiproc::queue::GetTimeoutError;
    /// let q = Queue::<u8>::bounded(1)?;
    /// assert!(matches!(q.get_timeout(Duration::from_millis(10)), Err(GetTimeoutError::Timeout)));
    /// q.close();
    /// assert!(matches!(q.get_timeout(Duration::from_secs(1)), Err(GetTimeoutError::Disconnected)));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, GetTimeoutError> {
        let deadline = Instant::now() + timeout;
        self.get_inner(Some(deadline), true).map_err(|f| match f {
            GetFail::Empty => GetTimeoutError::Timeout,
            GetFail::Disconnected => GetTimeoutError::Disconnected,
            GetFail::Failed(e) => GetTimeoutError::Failed(e),
        })
    }

    /// Removes and returns the first message if there is one now (Python's
    /// `get_nowait`).
    ///
    /// # Errors
    ///
    /// [`TryGetError::Empty`] if there is none; otherwise as
    /// [`get`](Queue::get).
    pub fn try_get(&self) -> Result<T, TryGetError> {
        self.get_inner(None, false).map_err(|f| match f {
            GetFail::Empty => TryGetError::Empty,
            GetFail::Disconnected => TryGetError::Disconnected,
            GetFail::Failed(e) => TryGetError::Failed(e),
        })
    }

    /// An iterator that waits for each message, as
    /// [`std::sync::mpsc::Receiver::iter`]; also `for x in &queue`.
    ///
    /// What ends it: a queue cannot know that its producers are gone (a
    /// handle may sit unused in any process, or travel inside a message),
    /// so "disconnected" means *closed*: the iteration ends once
    /// [`close`](Queue::close) was called, in any process, and every
    /// message put before was taken. Until then it waits, as
    /// [`get`](Queue::get) does. Close the queue when the last producer is
    /// done (the producer itself, or the parent once it has joined them).
    /// A message that cannot be decoded ([`GetError::Failed`]) ends the
    /// iteration too; [`Iter::take_error`] gives it.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Queue;
    /// let q = Queue::bounded(4)?;
    /// q.put(1u32)?;
    /// q.put(2)?;
    /// q.close(); // without this, the loop would wait for a third item
    /// let mut sum = 0;
    /// for x in &q {
    ///     sum += x;
    /// }
    /// assert_eq!(sum, 3);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn iter(&self) -> Iter<'_, T> {
        Iter {
            queue: self,
            error: None,
            done: false,
        }
    }

    /// An iterator over the messages that can be taken now, as
    /// [`std::sync::mpsc::Receiver::try_iter`]: it never waits, and ends at
    /// the first [`try_get`](Queue::try_get) that gives no message (the
    /// queue is empty, closed and empty, or a message failed:
    /// [`TryIter::take_error`]). Other consumers may take messages
    /// meanwhile, so it does not promise to drain the queue.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::Queue;
    /// let q = Queue::bounded(4)?;
    /// q.put(1u32)?;
    /// q.put(2)?;
    /// assert_eq!(q.try_iter().collect::<Vec<_>>(), [1, 2]);
    /// assert_eq!(q.try_iter().next(), None); // empty, still open
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_iter(&self) -> TryIter<'_, T> {
        TryIter {
            queue: self,
            error: None,
        }
    }
}

/// The blocking iterator of a [`Queue`]: see [`Queue::iter`].
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct Iter<'a, T> {
    queue: &'a Queue<T>,
    error: Option<Error>,
    done: bool,
}

/// The non-blocking iterator of a [`Queue`]: see [`Queue::try_iter`].
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct TryIter<'a, T> {
    queue: &'a Queue<T>,
    error: Option<Error>,
}

/// The owning blocking iterator of a [`Queue`] (`for x in queue`): as
/// [`Queue::iter`].
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct IntoIter<T> {
    queue: Queue<T>,
    error: Option<Error>,
    done: bool,
}

/// The next message of a blocking iteration; `None` (for good) once the
/// queue is closed and drained, or a message failed (kept in `error`).
fn next_blocking<T: DeserializeOwned + 'static>(
    queue: &Queue<T>,
    error: &mut Option<Error>,
    done: &mut bool,
) -> Option<T> {
    if *done {
        return None;
    }
    match queue.get() {
        Ok(v) => Some(v),
        Err(e) => {
            *done = true;
            *error = e.failure().cloned();
            None
        }
    }
}

crate::error::iter_take_error!(
    "The failure that ended the iteration, if a message that could not be decoded (or an OS failure) ended it rather than a closed (or, for [`TryIter`], an empty) queue.":
    Iter<'a>, TryIter<'a>, IntoIter
);

impl<T: DeserializeOwned + 'static> Iterator for Iter<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        next_blocking(self.queue, &mut self.error, &mut self.done)
    }
}

impl<T: DeserializeOwned + 'static> Iterator for IntoIter<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        next_blocking(&self.queue, &mut self.error, &mut self.done)
    }
}

/// Once it has returned `None`, it always does.
impl<T: DeserializeOwned + 'static> std::iter::FusedIterator for Iter<'_, T> {}

/// Once it has returned `None`, it always does.
impl<T: DeserializeOwned + 'static> std::iter::FusedIterator for IntoIter<T> {}

/// Unlike [`Iter`], a `TryIter` may be resumed: after `None`, a later
/// `next` looks again.
impl<T: DeserializeOwned + 'static> Iterator for TryIter<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self.queue.try_get() {
            Ok(v) => Some(v),
            Err(e) => {
                self.error = e.failure().cloned();
                None
            }
        }
    }
}

impl<'a, T: DeserializeOwned + 'static> IntoIterator for &'a Queue<T> {
    type Item = T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T: DeserializeOwned + 'static> IntoIterator for Queue<T> {
    type Item = T;
    type IntoIter = IntoIter<T>;

    fn into_iter(self) -> IntoIter<T> {
        IntoIter {
            queue: self,
            error: None,
            done: false,
        }
    }
}

/// A queue travels as its capacity, which fixes the size of its shared
/// memory, and four descriptors: that memory, the two ends of the side
/// socket, the arena. The three queue types are three kinds: a
/// `JoinableQueue` is not received as a `Queue`, nor the reverse.
impl<T> Queue<T> {
    fn wire_parts(&self) -> Parts<'_, u64> {
        let [mem, tx, rx, arena] = self.ring.fds();
        Parts {
            plain: self.ring.capacity() as u64,
            fds: [Some(mem), Some(tx), Some(rx), Some(arena)],
            size: self.ring.mapping_len(),
            place: crate::sys::arena::Place::OWN,
            arena: None,
        }
    }

    fn wire_size(cap: u64) -> Result<usize> {
        Ring::mapping_bytes(cap)
            .filter(|_| cap > 0)
            .ok_or_else(|| handle::decode(format!("a queue of {cap} slots")))
    }

    fn rebuild_wire(cap: u64, fds: &mut Received) -> Result<Queue<T>> {
        let map = fds.mapping(0)?;
        let ring = Ring::from_fds(map, fds.fd(1)?, fds.fd(2)?, fds.fd(3)?)?;
        if ring.capacity() as u64 != cap {
            return Err(handle::decode(format!(
                "a queue sent with {cap} slots has {}",
                ring.capacity()
            )));
        }
        Ok(Queue::from_ring(ring))
    }
}

impl<T> HandleWire for Queue<T> {
    const KIND: Kind = Kind::Queue;
    type Elem = T;
    type Plain = u64;

    fn parts(&self) -> Result<Parts<'_, u64>> {
        Ok(self.wire_parts())
    }

    fn mapping_size(&cap: &u64) -> Result<usize> {
        Self::wire_size(cap)
    }

    fn rebuild(cap: u64, fds: &mut Received) -> Result<Self> {
        Self::rebuild_wire(cap, fds)
    }
}

handle_serde!([T] Queue<T>);

/// Python's `SimpleQueue`: `put`, `get`, `empty`, `close`, and the
/// blocking [`iter`](SimpleQueue::iter) a Rust `for` loop wants.
///
/// # Examples
///
/// ```
/// use multiproc::queue::SimpleQueue;
/// let q = SimpleQueue::new()?;
/// q.put("hi".to_string())?;
/// assert_eq!(q.get()?, "hi");
/// assert!(q.empty());
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct SimpleQueue<T> {
    inner: Queue<T>,
}

impl<T> Clone for SimpleQueue<T> {
    fn clone(&self) -> Self {
        SimpleQueue {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for SimpleQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleQueue")
            .field("qsize", &self.inner.qsize())
            .finish()
    }
}

impl<T> SimpleQueue<T> {
    /// A new queue (capacity [`DEFAULT_CAPACITY`]).
    ///
    /// # Errors
    ///
    /// As [`Queue::new`].
    pub fn new() -> Result<SimpleQueue<T>> {
        Ok(SimpleQueue {
            inner: Queue::new()?,
        })
    }

    /// `true` if the queue holds no message.
    pub fn empty(&self) -> bool {
        self.inner.empty()
    }

    /// Closes the queue. See [`Queue::close`].
    pub fn close(&self) {
        self.inner.close();
    }
}

impl<T: Serialize + 'static> SimpleQueue<T> {
    /// Puts `item`. See [`Queue::put`].
    ///
    /// # Errors
    ///
    /// As [`Queue::put`].
    pub fn put(&self, item: T) -> Result<(), PutError<T>> {
        self.inner.put(item)
    }
}

impl<T: DeserializeOwned + 'static> SimpleQueue<T> {
    /// Gets the first message, waiting. See [`Queue::get`].
    ///
    /// # Errors
    ///
    /// As [`Queue::get`].
    pub fn get(&self) -> Result<T, GetError> {
        self.inner.get()
    }

    /// Waits for each message until the queue is closed and drained, as
    /// [`Queue::iter`] (the Rust shape of Python's `iter(q.get, None)`).
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::queue::SimpleQueue;
    /// let q = SimpleQueue::new()?;
    /// q.put(1u32)?;
    /// q.put(2)?;
    /// q.close();
    /// assert_eq!(q.iter().sum::<u32>(), 3);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn iter(&self) -> Iter<'_, T> {
        self.inner.iter()
    }
}

impl<'a, T: DeserializeOwned + 'static> IntoIterator for &'a SimpleQueue<T> {
    type Item = T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T> HandleWire for SimpleQueue<T> {
    const KIND: Kind = Kind::SimpleQueue;
    type Elem = T;
    type Plain = u64;

    fn parts(&self) -> Result<Parts<'_, u64>> {
        Ok(self.inner.wire_parts())
    }

    fn mapping_size(&cap: &u64) -> Result<usize> {
        Queue::<T>::wire_size(cap)
    }

    fn rebuild(cap: u64, fds: &mut Received) -> Result<Self> {
        Ok(SimpleQueue {
            inner: Queue::rebuild_wire(cap, fds)?,
        })
    }
}

handle_serde!([T] SimpleQueue<T>);

/// Python's `JoinableQueue`: a [`Queue`] that counts unfinished tasks. It
/// has the queue's methods (`put`, `get`, their `try_`/`_timeout` forms,
/// `iter`, `qsize`, `close`...), each as [`Queue`]'s, plus Python's
/// task count: each `put` adds one; a consumer calls
/// [`task_done`](JoinableQueue::task_done) when it has processed an item;
/// [`join`](JoinableQueue::join) waits until the count is back to zero.
/// It is not a `Queue` (no `Deref`): it travels as a kind of its own.
///
/// # Examples
///
/// ```
/// use multiproc::queue::JoinableQueue;
/// let q = JoinableQueue::new()?;
/// q.put(5u32)?;
/// let item = q.get()?;
/// q.task_done()?;
/// q.join()?;
/// assert!(q.task_done().is_err()); // once more than there were items
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct JoinableQueue<T> {
    inner: Queue<T>,
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue")
            .field("qsize", &self.inner.qsize())
            .finish()
    }
}

impl<T> JoinableQueue<T> {
    /// A new joinable queue (capacity [`DEFAULT_CAPACITY`]).
    ///
    /// # Errors
    ///
    /// As [`Queue::new`].
    pub fn new() -> Result<JoinableQueue<T>> {
        JoinableQueue::bounded(DEFAULT_CAPACITY)
    }

    /// A new joinable queue holding at most `maxsize` messages.
    ///
    /// # Errors
    ///
    /// As [`Queue::bounded`].
    pub fn bounded(maxsize: usize) -> Result<JoinableQueue<T>> {
        Ok(JoinableQueue {
            inner: Queue::from_ring(Ring::create(maxsize, true)?),
        })
    }

    /// The number of messages in the queue. See [`Queue::qsize`].
    pub fn qsize(&self) -> usize {
        self.inner.qsize()
    }

    /// `true` if the queue holds no message. See [`Queue::empty`].
    pub fn empty(&self) -> bool {
        self.inner.empty()
    }

    /// `true` if the queue is at capacity. See [`Queue::full`].
    pub fn full(&self) -> bool {
        self.inner.full()
    }

    /// The most messages the queue holds.
    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// Closes the queue for every process. See [`Queue::close`].
    pub fn close(&self) {
        self.inner.close();
    }

    /// `true` once the queue was closed (in any process).
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Marks one item taken from the queue as processed.
    ///
    /// # Errors
    ///
    /// [`Error::Misuse`] if called more times than items were put
    /// (Python's `ValueError`).
    pub fn task_done(&self) -> Result<()> {
        self.inner.ring.task_done()
    }

    /// Waits until every item put has been marked done.
    ///
    /// # Errors
    ///
    /// None today; the `Result` leaves room for OS failures.
    pub fn join(&self) -> Result<()> {
        self.inner.ring.join(None)
    }

    /// Like [`join`](JoinableQueue::join), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if tasks were still unfinished.
    pub fn join_timeout(&self, timeout: Duration) -> Result<()> {
        self.inner.ring.join(Some(Instant::now() + timeout))
    }
}

impl<T: Serialize + 'static> JoinableQueue<T> {
    /// Puts `item`, adding one unfinished task. See [`Queue::put`].
    ///
    /// # Errors
    ///
    /// As [`Queue::put`].
    pub fn put(&self, item: T) -> Result<(), PutError<T>> {
        self.inner.put(item)
    }

    /// Puts `item`, waiting at most `timeout` for room. See
    /// [`Queue::put_timeout`].
    ///
    /// # Errors
    ///
    /// As [`Queue::put_timeout`].
    pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<(), PutTimeoutError<T>> {
        self.inner.put_timeout(item, timeout)
    }

    /// Puts `item` if there is room now. See [`Queue::try_put`].
    ///
    /// # Errors
    ///
    /// As [`Queue::try_put`].
    pub fn try_put(&self, item: T) -> Result<(), TryPutError<T>> {
        self.inner.try_put(item)
    }
}

impl<T: DeserializeOwned + 'static> JoinableQueue<T> {
    /// Takes the first message, waiting. See [`Queue::get`]. Call
    /// [`task_done`](JoinableQueue::task_done) once it is processed.
    ///
    /// # Errors
    ///
    /// As [`Queue::get`].
    pub fn get(&self) -> Result<T, GetError> {
        self.inner.get()
    }

    /// Takes the first message, waiting at most `timeout`. See
    /// [`Queue::get_timeout`].
    ///
    /// # Errors
    ///
    /// As [`Queue::get_timeout`].
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, GetTimeoutError> {
        self.inner.get_timeout(timeout)
    }

    /// Takes the first message if there is one now. See
    /// [`Queue::try_get`].
    ///
    /// # Errors
    ///
    /// As [`Queue::try_get`].
    pub fn try_get(&self) -> Result<T, TryGetError> {
        self.inner.try_get()
    }

    /// Waits for each message until the queue is closed and drained. See
    /// [`Queue::iter`]; each item still needs its
    /// [`task_done`](JoinableQueue::task_done).
    pub fn iter(&self) -> Iter<'_, T> {
        self.inner.iter()
    }

    /// The messages that can be taken now. See [`Queue::try_iter`].
    pub fn try_iter(&self) -> TryIter<'_, T> {
        self.inner.try_iter()
    }
}

impl<'a, T: DeserializeOwned + 'static> IntoIterator for &'a JoinableQueue<T> {
    type Item = T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T> HandleWire for JoinableQueue<T> {
    const KIND: Kind = Kind::JoinableQueue;
    type Elem = T;
    type Plain = u64;

    fn parts(&self) -> Result<Parts<'_, u64>> {
        Ok(self.inner.wire_parts())
    }

    fn mapping_size(&cap: &u64) -> Result<usize> {
        Queue::<T>::wire_size(cap)
    }

    fn rebuild(cap: u64, fds: &mut Received) -> Result<Self> {
        Ok(JoinableQueue {
            inner: Queue::rebuild_wire(cap, fds)?,
        })
    }
}

handle_serde!([T] JoinableQueue<T>);

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serializer};

    #[test]
    fn fifo_inline_and_side_messages() {
        let q = Queue::<Vec<u8>>::new().expect("queue");
        let big = vec![7u8; 100_000];
        let mid = vec![3u8; 5_000];
        q.put(vec![1]).expect("put");
        q.put(big.clone()).expect("put big");
        q.put(mid.clone()).expect("put mid");
        q.put(vec![2]).expect("put");
        assert_eq!(q.qsize(), 4);
        assert_eq!(q.get().expect("get"), vec![1]);
        assert_eq!(q.get().expect("get"), big);
        assert_eq!(q.get().expect("get"), mid);
        assert_eq!(q.get().expect("get"), vec![2]);
        assert!(matches!(q.try_get(), Err(TryGetError::Empty)));
    }

    #[test]
    fn bounded_full_and_wraparound() {
        let q = Queue::<u64>::bounded(3).expect("queue");
        for round in 0..10u64 {
            for i in 0..3 {
                q.try_put(round * 3 + i).expect("room");
            }
            assert!(q.full());
            match q.try_put(99) {
                Err(TryPutError::Full(99)) => {}
                other => panic!("expected full, got {other:?}"),
            }
            for i in 0..3 {
                assert_eq!(q.try_get().expect("item"), round * 3 + i);
            }
        }
    }

    #[test]
    fn closed_queue_drains_then_disconnects() {
        let q = Queue::<u32>::bounded(4).expect("queue");
        q.put(1).expect("put");
        q.close();
        assert!(matches!(q.put(2), Err(PutError::Closed(2))));
        assert_eq!(q.get().expect("left"), 1);
        assert!(matches!(q.get(), Err(GetError::Disconnected)));
    }

    #[test]
    fn queue_travels_through_a_queue() {
        let outer = Queue::<Queue<String>>::new().expect("outer");
        let inner = Queue::<String>::new().expect("inner");
        outer.put(inner.clone()).expect("put handle");
        let got = outer.get().expect("get handle");
        got.put("through".into()).expect("put");
        assert_eq!(inner.get().expect("get"), "through");
    }

    #[test]
    fn panic_in_serialize_leaves_no_slot_claimed() {
        struct Boom;
        impl Serialize for Boom {
            fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                panic!("boom");
            }
        }
        #[derive(Serialize, Deserialize)]
        enum Msg {
            Boom(#[serde(skip_deserializing)] Option<BoomBox>),
            N(u32),
        }
        #[derive(Default)]
        struct BoomBox;
        impl Serialize for BoomBox {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                Boom.serialize(s)
            }
        }
        let q = Queue::<Msg>::bounded(2).expect("queue");
        for _ in 0..5 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = q.put(Msg::Boom(Some(BoomBox)));
            }));
            assert!(r.is_err());
        }
        assert!(q.empty());
        q.try_put(Msg::N(7)).expect("room after panics");
        q.try_put(Msg::N(8)).expect("all the room after panics");
        match q.get_timeout(Duration::from_secs(5)).expect("get") {
            Msg::N(7) => {}
            _ => panic!("wrong message"),
        }
    }

    #[test]
    fn a_corrupt_batch_count_is_an_error_and_the_queue_goes_on() {
        let q = Queue::<u64>::bounded(4).expect("queue");
        for count in [0u32, 1, MAX_BATCH as u32 + 1, u32::MAX] {
            let Claimed::Slot(mut claim) = q.ring.try_claim() else {
                panic!("no room");
            };
            claim
                .write(|b| b[..4].copy_from_slice(&count.to_le_bytes()))
                .expect("write");
            claim.publish_batch(BATCH_HEADER + 16);
            let err = q.try_get().expect_err("a forged count");
            assert!(err.to_string().contains("batch message of"), "{err}");
        }
        // A count that promises more items than the bytes hold.
        let Claimed::Slot(mut claim) = q.ring.try_claim() else {
            panic!("no room");
        };
        claim
            .write(|b| b[..4].copy_from_slice(&100u32.to_le_bytes()))
            .expect("write");
        claim.publish_batch(BATCH_HEADER + 16);
        assert!(q.get_many(&mut Vec::new(), 1000).is_err());
        q.put_many(&[1, 2, 3]).expect("put_many");
        let mut got = Vec::new();
        assert_eq!(q.get_many(&mut got, 10).expect("get_many"), 3);
        assert_eq!(got, [1, 2, 3]);
    }

    #[test]
    fn encode_failure_hands_the_item_back() {
        struct Bad;
        impl Serialize for Bad {
            fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("nope"))
            }
        }
        let q = Queue::<Bad>::new().expect("queue");
        match q.put(Bad) {
            Err(PutError::Failed(Bad, Error::Encode { .. })) => {}
            Err(e) => panic!("unexpected {e}"),
            Ok(()) => panic!("encoded"),
        }
        assert!(q.empty());
    }
}
