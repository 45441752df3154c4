//! Shared-memory arenas for large chunk payloads.
//!
//! Each worker gets two memfd mappings from the parent, sent with the
//! first control frame ([`ToWorker::Arenas`](super::protocol::ToWorker::Arenas)): an
//! *input* arena (parent writes, worker reads) and an *output* arena
//! (worker writes, parent reads). A chunk whose payload is at least
//! [`SHM_MIN`] bytes and carries no descriptors goes through its arena and
//! only `(offset, len)` travels on the socket; anything else (no room,
//! descriptors, small payloads, no arenas) uses the socket as before, so a
//! full arena never blocks anyone.
//!
//! Input arena: allocated by the parent alone ([`InArena`]); a region is
//! freed when its chunk's result (or failure) arrives, i.e. after the
//! worker stopped reading it. The worker reads it in place.
//!
//! Output arena: allocated by the worker ([`OutWriter`]) at monotonic
//! positions (`pos % cap` is the place in the data area); the parent
//! decodes a region in place, then releases it ([`Lease`]'s drop), which
//! advances the shared `consumed` counter (word 0) once every earlier
//! region was released. The worker never writes past `consumed + cap`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::sys::shm::{Exclusive, Mapping};

/// Size of each arena. Pages never touched cost nothing.
pub(crate) const ARENA_BYTES: usize = 32 << 20;

/// Smallest payload worth moving through an arena.
pub(crate) const SHM_MIN: usize = 64 << 10;

/// Bytes before the output arena's data: the `consumed` counter (word 0)
/// and the started-chunk mark (word 1).
const OUT_HEADER: usize = 64;

/// Where the worker marks the chunk it is about to run: its id + 1 (0:
/// none yet). The parent reads it after the worker died, to tell the chunk
/// that was running from those that never started.
const STARTED_AT: usize = 8;

/// The parent's allocator over one worker's input arena.
#[derive(Debug)]
pub(crate) struct InArena {
    map: Arc<Mapping>,
    /// Live regions in allocation order: (chunk id, start, len).
    live: Vec<(u64, usize, usize)>,
}

impl InArena {
    pub(crate) fn create() -> Result<InArena> {
        Ok(InArena {
            map: Arc::new(Mapping::create("multiproc-pool-in", ARENA_BYTES)?),
            live: Vec::new(),
        })
    }

    pub(crate) fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    /// A region of `len` bytes for chunk `id`, if there is room: the
    /// lowest gap that fits (first fit), so a pool keeps reusing the same
    /// few pages, which are then already mapped in both processes.
    pub(crate) fn alloc(&mut self, id: u64, len: usize) -> Option<usize> {
        let cap = self.map.len();
        let mut used: Vec<(usize, usize)> = self.live.iter().map(|&(_, s, l)| (s, s + l)).collect();
        used.sort_unstable();
        let mut at = 0usize;
        for (start, end) in used {
            if start.saturating_sub(at) >= len {
                break;
            }
            at = at.max(end);
        }
        if cap.checked_sub(at)? < len {
            return None;
        }
        self.live.push((id, at, len));
        Some(at)
    }

    /// [`alloc`](InArena::alloc), as the right to fill the region.
    pub(crate) fn place(&mut self, id: u64, len: usize) -> Option<Placement> {
        let start = self.alloc(id, len)?;
        Some(Placement {
            map: Arc::clone(&self.map),
            start,
            len,
        })
    }

    /// Chunk `id` is done: its region may be reused.
    pub(crate) fn free(&mut self, id: u64) {
        self.live.retain(|&(i, _, _)| i != id);
    }
}

/// A region of an input arena that [`InArena::place`] gave a chunk not
/// sent yet: the right to fill it, once, before the chunk is sent.
#[derive(Debug)]
pub(crate) struct Placement {
    map: Arc<Mapping>,
    start: usize,
    len: usize,
}

impl Placement {
    /// Where the region starts.
    pub(crate) fn start(&self) -> usize {
        self.start
    }

    /// Copies the chunk's payload (exactly the region's length) in, with
    /// one plain copy.
    pub(crate) fn fill(self, data: &[u8]) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::internal("a pool payload does not fit its region"));
        }
        // SAFETY: the input arena's protocol (module docs): the region was
        // free when `place` gave it to this chunk (no worker reads a freed
        // region: its chunk's result had arrived, and a worker reads a
        // region only before it answers), no other chunk's region overlaps
        // it (first fit over the live regions), and no worker is told of it
        // before this fill returns (the frame that names it is sent
        // after); `fill(self)` runs once. The socket orders our writes
        // before the worker's reads.
        let region = unsafe { self.map.exclusive(self.start, self.len) };
        region?.bytes_mut().copy_from_slice(data);
        Ok(())
    }
}

/// The parent's side of one worker's output arena.
#[derive(Debug)]
pub(crate) struct OutArena {
    map: Mapping,
    /// Regions delivered and not yet consumed, in the worker's order:
    /// (end position, released).
    pending: Mutex<VecDeque<(u64, bool)>>,
}

impl OutArena {
    pub(crate) fn create() -> Result<OutArena> {
        Ok(OutArena {
            map: Mapping::create("multiproc-pool-out", ARENA_BYTES)?,
            pending: Mutex::new(VecDeque::new()),
        })
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The last chunk the worker started, if it started one.
    pub(crate) fn started(&self) -> Option<u64> {
        self.map
            .atomic_at::<AtomicU64>(STARTED_AT)
            .ok()?
            .load(Ordering::Acquire)
            .checked_sub(1)
    }

    /// Takes charge of the region `start..start + len` that the worker
    /// just announced (called in the order the worker sent them).
    pub(crate) fn lease(self: &Arc<Self>, start: u64, len: u64) -> Result<Lease> {
        let cap = self.map.len().saturating_sub(OUT_HEADER) as u64;
        let offset = start.checked_rem(cap).unwrap_or(0);
        if len == 0 || len > cap.saturating_sub(offset) {
            return Err(Error::Decode {
                message: format!("a pool result region {start}+{len} is outside its arena"),
            });
        }
        let end = start + len;
        self.pending().push_back((end, false));
        Ok(Lease {
            arena: Arc::clone(self),
            offset: OUT_HEADER + offset as usize,
            len: len as usize,
            end,
        })
    }

    /// The pending list (a panic elsewhere cannot leave it inconsistent:
    /// every change is one push or one pass).
    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, bool)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, end: u64) {
        let mut pending = self.pending();
        if let Some(entry) = pending.iter_mut().find(|e| e.0 == end) {
            entry.1 = true;
        }
        let mut consumed = None;
        while let Some(&(e, true)) = pending.front() {
            consumed = Some(e);
            pending.pop_front();
        }
        if let (Some(c), Ok(word)) = (consumed, self.map.atomic_at::<AtomicU64>(0)) {
            word.store(c, Ordering::Release);
        }
    }
}

/// One result region of an output arena, released when dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    arena: Arc<OutArena>,
    offset: usize,
    len: usize,
    end: u64,
}

impl Lease {
    /// The result bytes, read in place: the worker does not write this
    /// region again before the lease is dropped.
    pub(crate) fn bytes(&self) -> Result<&[u8]> {
        // SAFETY: the output arena's protocol (module docs): the worker
        // wrote this region whole before it announced it (the socket
        // orders its writes before our read of the announcement, which
        // made this lease), and writes only below `consumed + cap`, where
        // `consumed` (word 0) passes this region's end only in `release`,
        // run when the lease is dropped, which cannot happen while the
        // returned slice borrows it. Nothing in this process writes an
        // output arena's data (only word 0, outside every region).
        let view = unsafe { self.arena.map.view(self.offset, self.len) };
        Ok(view?)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.arena.release(self.end);
    }
}

/// A region of the output arena reserved for a chunk's outcomes (see
/// [`OutWriter::reserve`]).
#[derive(Debug)]
pub(crate) struct Reserved {
    start: u64,
    len: u64,
    prev_head: u64,
}

/// The worker's allocator over its output arena.
#[derive(Debug)]
pub(crate) struct OutWriter {
    map: Mapping,
    head: u64,
    /// Regions written and not yet known to be consumed: (start, end).
    live: VecDeque<(u64, u64)>,
}

impl OutWriter {
    pub(crate) fn new(map: Mapping) -> Result<OutWriter> {
        if map.len() <= OUT_HEADER {
            return Err(Error::internal("pool output arena too small"));
        }
        Ok(OutWriter {
            map,
            head: 0,
            live: VecDeque::new(),
        })
    }

    /// Marks chunk `id` as started (see [`OutArena::started`]).
    pub(crate) fn mark_started(&self, id: u64) {
        if let Ok(word) = self.map.atomic_at::<AtomicU64>(STARTED_AT) {
            word.store(id.wrapping_add(1), Ordering::Release);
        }
    }

    /// Copies `data` into the arena if there is room; its start position.
    ///
    /// Every live region lies in `oldest start..head`; a new region is
    /// safe when the span from the oldest live start to its end is at most
    /// the capacity (positions are taken modulo the capacity).
    pub(crate) fn put(&mut self, data: &[u8]) -> Option<u64> {
        let start = self.place(data.len() as u64)?;
        let cap = (self.map.len() - OUT_HEADER) as u64;
        // SAFETY: the output arena's protocol (module docs): `place` gave
        // a region within `consumed + cap` of every live region's start,
        // so the parent released (Release store of `consumed`, read with
        // Acquire there) every earlier region that shared its bytes, and
        // reads it only after this process announces it, once this copy
        // is done; nothing else in this process writes the arena.
        let region = unsafe {
            self.map
                .exclusive(OUT_HEADER + (start % cap) as usize, data.len())
        };
        region.ok()?.bytes_mut().copy_from_slice(data);
        Some(start)
    }

    /// Reserves `len` bytes for a chunk's outcomes to be written in place
    /// ([`region`](OutWriter::region)), then kept in part or given back
    /// ([`commit`](OutWriter::commit)) before anything else is placed.
    pub(crate) fn reserve(&mut self, len: u64) -> Option<Reserved> {
        let prev_head = self.head;
        let start = self.place(len)?;
        Some(Reserved {
            start,
            len,
            prev_head,
        })
    }

    /// The reserved bytes, to write alone until the token is dropped.
    pub(crate) fn region(&self, reserved: &Reserved) -> Option<Exclusive<'_>> {
        let cap = (self.map.len() - OUT_HEADER) as u64;
        // SAFETY: as in `put`: the reservation's region is free of every
        // region the parent may still read, and the parent reads it only
        // once it is announced, which happens after `commit`, when the
        // token (borrowing `self`) is gone; nothing else in this process
        // writes the arena.
        let region = unsafe {
            self.map.exclusive(
                OUT_HEADER + (reserved.start % cap) as usize,
                reserved.len as usize,
            )
        };
        region.ok()
    }

    /// Keeps the first `used` bytes of the newest reservation (0: gives it
    /// all back); the start to announce.
    pub(crate) fn commit(&mut self, reserved: Reserved, used: u64) -> u64 {
        let used = used.min(reserved.len);
        if used == 0 {
            if self.live.back().is_some_and(|&(s, _)| s == reserved.start) {
                self.live.pop_back();
            }
            self.head = reserved.prev_head;
        } else {
            if let Some(last) = self.live.back_mut().filter(|l| l.0 == reserved.start) {
                last.1 = reserved.start + used;
            }
            self.head = reserved.start + used;
        }
        reserved.start
    }

    /// Finds room for `len` bytes and marks it live; its start position.
    fn place(&mut self, len: u64) -> Option<u64> {
        let cap = (self.map.len() - OUT_HEADER) as u64;
        if len == 0 || len > cap {
            return None;
        }
        let consumed = self
            .map
            .atomic_at::<AtomicU64>(0)
            .ok()?
            .load(Ordering::Acquire);
        while self.live.front().is_some_and(|&(_, end)| end <= consumed) {
            self.live.pop_front();
        }
        let phys = self.head % cap;
        // The beginning of the data area, where the pages are warm, if
        // there is room before the oldest live region; else right after
        // the newest one (or the beginning, if it does not fit before the end).
        let wrapped = self.head + (cap - phys) % cap;
        let start = match self.live.front() {
            None => wrapped,
            Some(&(oldest, _)) => {
                let next = if phys + len > cap { wrapped } else { self.head };
                if wrapped + len - oldest <= cap {
                    wrapped
                } else if next + len - oldest <= cap {
                    next
                } else {
                    return None;
                }
            }
        };
        self.head = start + len;
        self.live.push_back((start, self.head));
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_ring_reuses_freed_space_and_refuses_when_full() {
        let mut a = InArena::create().expect("arena");
        let cap = a.mapping().len();
        let big = cap / 2 - 10;
        assert_eq!(a.alloc(1, big), Some(0));
        assert_eq!(a.alloc(2, big), Some(big));
        assert_eq!(a.alloc(3, big), None);
        a.free(1);
        assert_eq!(a.alloc(3, big), Some(0));
        assert_eq!(a.alloc(4, 20), Some(2 * big));
        assert_eq!(a.alloc(5, 1), None);
        a.free(2);
        assert_eq!(a.alloc(6, 30), Some(big), "lowest gap first");
        a.free(3);
        a.free(4);
        a.free(6);
        assert_eq!(a.alloc(7, cap), Some(0));
    }

    #[test]
    fn output_ring_round_trips_and_waits_for_release() {
        let parent = Arc::new(OutArena::create().expect("arena"));
        let fd = parent.mapping().fd().try_clone_to_owned().expect("dup");
        let mut w = OutWriter::new(Mapping::from_fd(fd).expect("map")).expect("writer");
        let cap = ARENA_BYTES - OUT_HEADER;
        let big = vec![7u8; cap / 2 + 1];
        let s1 = w.put(&big).expect("first");
        let l1 = parent.lease(s1, big.len() as u64).expect("lease");
        assert_eq!(l1.bytes().expect("view"), &big[..]);
        assert_eq!(w.put(&big), None, "no room until released");
        drop(l1);
        let s2 = w.put(&[1, 2, 3]).expect("after release");
        let l2 = parent.lease(s2, 3).expect("lease");
        assert_eq!(l2.bytes().expect("view"), &[1, 2, 3]);
        // A restart at the beginning leaves no phantom occupied space.
        let third = vec![9u8; cap / 3];
        let s3 = w.put(&third).expect("third");
        let s4 = w.put(&third).expect("fourth");
        let l3 = parent.lease(s3, third.len() as u64).expect("lease");
        let l4 = parent.lease(s4, third.len() as u64).expect("lease");
        assert_eq!(l4.bytes().expect("view"), &third[..]);
        drop((l2, l3, l4));
        let s5 = w.put(&big).expect("after all released");
        assert_eq!(s5 % cap as u64, 0);
    }

    #[test]
    fn a_reservation_keeps_what_was_used_and_gives_the_rest_back() {
        let parent = Arc::new(OutArena::create().expect("arena"));
        let fd = parent.mapping().fd().try_clone_to_owned().expect("dup");
        let mut w = OutWriter::new(Mapping::from_fd(fd).expect("map")).expect("writer");
        let r = w.reserve(1000).expect("room");
        {
            let mut region = w.region(&r).expect("region");
            region.bytes_mut()[..3].copy_from_slice(&[4, 5, 6]);
        }
        let s1 = w.commit(r, 3);
        let l1 = parent.lease(s1, 3).expect("lease");
        assert_eq!(l1.bytes().expect("view"), &[4, 5, 6]);
        // The next region starts right after the bytes kept.
        let s2 = w.put(&[7]).expect("put");
        assert_eq!(s2, s1 + 3);
        // A reservation given back whole leaves no trace.
        let r = w.reserve(500).expect("room");
        w.commit(r, 0);
        assert_eq!(w.put(&[8]).expect("put"), s2 + 1);
        drop(l1);
    }
}
