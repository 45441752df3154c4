//! How a map's input is cut into chunks, encoded for a worker, and how a
//! chunk's outcome is decoded into results and errors.

use std::os::fd::OwnedFd;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::job::{ChunkInfo, Outcome};
use super::protocol::ChunkBody;
use crate::codec;
use crate::error::{Error, Result};
use crate::registry::{self, PanicRecord};

/// Python's default chunksize: `ceil(n / (4 * workers))`.
pub(super) fn default_chunksize(n: usize, workers: usize) -> usize {
    n.div_ceil(4 * workers).max(1)
}

/// The sizes of a map's chunks.
///
/// With an explicit chunksize every chunk has that size. Without one, the
/// first chunks have Python's default size, `ceil(n / (4 * workers))`, and
/// then shrink with what is left (guided self-scheduling: `ceil(left / (2 *
/// workers))`), down to an eighth of the default. The end of a map is then
/// made of small chunks, so a worker that is slowed down (by an uneven task
/// or by the machine) holds up the end by a small chunk, not a large one,
/// at the cost of a few more messages.
#[derive(Debug)]
pub(super) struct ChunkPlan {
    fixed: Option<usize>,
    largest: usize,
    smallest: usize,
    left: usize,
    workers: usize,
}

impl ChunkPlan {
    pub(super) fn new(n: usize, workers: usize, chunksize: Option<usize>) -> ChunkPlan {
        let largest = default_chunksize(n, workers);
        ChunkPlan {
            fixed: chunksize,
            largest,
            smallest: largest.div_ceil(8),
            left: n,
            workers: workers.max(1),
        }
    }

    pub(super) fn next_size(&mut self) -> usize {
        let size = match self.fixed {
            Some(size) => size,
            None => self
                .left
                .div_ceil(2 * self.workers)
                .clamp(self.smallest, self.largest),
        };
        self.left = self.left.saturating_sub(size);
        size.max(1)
    }
}

/// One encoded task payload and the descriptors of the handles in it.
pub(super) type Encoded = (Vec<u8>, Vec<OwnedFd>);

/// Encodes chunks of argument tuples for one registered function.
pub(super) struct ChunkEncoder {
    name: &'static str,
    /// Capacity for the next buffer (the last chunk's size).
    hint: usize,
    /// Where the chunks go (handles are refused unless on this host).
    peer: codec::Peer,
}

impl ChunkEncoder {
    pub(super) fn new<F: 'static>(peer: codec::Peer) -> Result<ChunkEncoder> {
        Ok(ChunkEncoder {
            name: registry::lookup_type::<F>()?.name(),
            hint: 0,
            peer,
        })
    }

    /// Takes up to `max` items from `items` and encodes them as one task
    /// payload. `None` once `items` is exhausted; `(count, Err)` if an item
    /// failed to encode (the chunk's other items are still consumed).
    pub(super) fn next<T: Serialize + 'static>(
        &mut self,
        items: &mut impl Iterator<Item = T>,
        max: usize,
    ) -> Option<(usize, Result<Encoded>)> {
        let buf = Vec::with_capacity(self.hint.max(64));
        self.next_in(items, max, buf)
    }

    /// [`next`](ChunkEncoder::next), encoding into `buf` (cleared first:
    /// a buffer kept for its allocation).
    pub(super) fn next_in<T: Serialize + 'static>(
        &mut self,
        items: &mut impl Iterator<Item = T>,
        max: usize,
        mut buf: Vec<u8>,
    ) -> Option<(usize, Result<Encoded>)> {
        let first = items.next()?;
        buf.clear();
        let mut fds = Vec::new();
        // Items taken so far (the first one, even if it fails to encode).
        let mut count = 1usize;
        let result = ChunkBody::begin(&mut buf, self.name).and_then(|()| {
            codec::encoding_for(self.peer, || {
                codec::with_fd_sink(&mut fds, || {
                    let mut enc = codec::SeqEncoder::new(&mut buf);
                    enc.push_value(&first)?;
                    // Numbers: one loop of fixed-width stores.
                    if let Some(more) = codec::push_primitives(enc.out(), items, max - count) {
                        count += more;
                        return Ok(());
                    }
                    while count < max {
                        let Some(item) = items.next() else { break };
                        count += 1;
                        enc.push_value(&item)?;
                    }
                    Ok(())
                })
            })
        });
        let result = result.and_then(|()| ChunkBody::set_count(&mut buf, count));
        if let Err(err) = result {
            // Keep the item count right for the caller's indices.
            count += items.take(max - count).count();
            return Some((count, Err(err)));
        }
        self.hint = buf.len();
        Some((count, Ok((buf, fds))))
    }
}

/// Decodes one chunk's outcome: the values of its successful items are
/// appended to `out` in order; the failed items are returned as
/// (position in the chunk, error), in order.
pub(super) fn decode_chunk<R: DeserializeOwned + 'static>(
    info: ChunkInfo,
    outcome: Outcome,
    out: &mut Vec<R>,
) -> Vec<(usize, Error)> {
    // Results come in a frame (with the descriptors of their handles) or
    // in the worker's output arena, read in place and released on return.
    let (frame_bytes, fds, lease, offset, pid) = match outcome {
        Outcome::Failed(err) => return (0..info.count).map(|i| (i, err.clone())).collect(),
        Outcome::Done {
            bytes,
            fds,
            offset,
            pid,
        } => (bytes, fds, None, offset, pid),
        Outcome::Shared { lease, pid } => (Vec::new(), Vec::new(), Some(lease), 0, pid),
    };
    let bytes: &[u8] = match &lease {
        None => frame_bytes.get(offset..).unwrap_or(&[]),
        Some(lease) => match lease.bytes() {
            Ok(bytes) => bytes,
            Err(err) => return (0..info.count).map(|i| (i, err.clone())).collect(),
        },
    };
    decode_outcomes(info, bytes, fds, pid, out)
}

/// [`decode_chunk`] of outcomes read where they lie (`bytes`: a chunk's
/// encoded outcomes, `fds`: the descriptors of their handles), from the
/// worker `pid`.
pub(super) fn decode_outcomes<R: DeserializeOwned + 'static>(
    info: ChunkInfo,
    bytes: &[u8],
    fds: Vec<OwnedFd>,
    pid: u32,
    out: &mut Vec<R>,
) -> Vec<(usize, Error)> {
    let mut errors = Vec::new();
    let mut pos = 0usize;
    let result = codec::with_fd_source(fds, || -> Result<()> {
        let mut dec = codec::SeqDecoder::new(bytes);
        while pos < info.count {
            // A run of results, then (if the chunk goes on) a panic record.
            let run = dec.next::<u32>()? as usize;
            if run > info.count - pos {
                return Err(Error::Decode {
                    message: format!(
                        "a pool result has {run} values where {} were left",
                        info.count - pos
                    ),
                });
            }
            let before = out.len();
            let decoded = dec.extend_into(run, out);
            pos += out.len() - before;
            decoded?;
            if pos < info.count {
                let record: PanicRecord = dec.next()?;
                errors.push((pos, record.into_error(pid, Some(info.first + pos))));
                pos += 1;
            }
        }
        Ok(())
    });
    if let Err(err) = result {
        // The item that failed to decode, and the ones after it (their
        // bytes cannot be found any more), fail with the decode error.
        errors.extend((pos..info.count).map(|i| (i, err.clone())));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::ChunkPlan;

    fn sizes(n: usize, workers: usize, chunksize: Option<usize>) -> Vec<usize> {
        let mut plan = ChunkPlan::new(n, workers, chunksize);
        let mut left = n;
        let mut out = Vec::new();
        while left > 0 {
            let size = plan.next_size().min(left);
            left -= size;
            out.push(size);
        }
        out
    }

    #[test]
    fn default_plan_starts_at_pythons_size_and_shrinks_at_the_tail() {
        let s = sizes(200, 2, None);
        assert_eq!(s.iter().sum::<usize>(), 200);
        assert_eq!(s[0], 25, "Python's ceil(200 / (4 * 2))");
        assert!(s.windows(2).all(|w| w[0] >= w[1]), "non-increasing: {s:?}");
        assert!(
            *s.last().unwrap_or(&0) <= 4,
            "small chunks at the end: {s:?}"
        );
        let big = sizes(1_000_000, 2, None);
        assert_eq!(big.iter().sum::<usize>(), 1_000_000);
        assert!(big.len() < 40, "few chunks for a big map: {}", big.len());
    }

    #[test]
    fn explicit_chunksize_is_kept() {
        assert_eq!(sizes(10, 2, Some(3)), vec![3, 3, 3, 1]);
        assert_eq!(sizes(0, 2, None), Vec::<usize>::new());
    }
}
