//! The one place that knows the wire format (bincode 1.3, fixed-width
//! little-endian integers), and the side channel that lets handles carry
//! file descriptors beside the bytes.
//!
//! Fixed-width integers were chosen over varints by measurement: decoding a
//! chunk of `u64`s is a plain copy per element, and the parent and child
//! never disagree on the format because they are the same build.
//!
//! A handle (Queue, Connection, Lock, Value...) serializes its file
//! descriptors by pushing a duplicate into the thread's *fd sink* and
//! writing the index it got; on the other side, deserialization takes the
//! descriptor at that index from the *fd source*. The sink and the source
//! exist only while [`encode`] / [`decode`] (or their sequence variants)
//! run, so serializing a handle with any other serializer is an error
//! instead of a descriptor that silently does not arrive.

use std::cell::RefCell;
use std::os::fd::{BorrowedFd, OwnedFd};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

type Opts = bincode::config::WithOtherTrailing<
    bincode::config::WithOtherEndian<
        bincode::config::WithOtherIntEncoding<
            bincode::DefaultOptions,
            bincode::config::FixintEncoding,
        >,
        bincode::config::LittleEndian,
    >,
    bincode::config::AllowTrailing,
>;

fn options() -> Opts {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .allow_trailing_bytes()
}

fn encode_error(err: bincode::Error) -> Error {
    Error::Encode {
        message: err.to_string(),
    }
}

fn decode_error(err: bincode::Error) -> Error {
    Error::Decode {
        message: err.to_string(),
    }
}

thread_local! {
    static FD_SINK: RefCell<Option<Vec<OwnedFd>>> = const { RefCell::new(None) };
    static FD_SOURCE: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
}

/// Runs `f` with `fds` as this thread's fd sink; descriptors serialized by
/// handles inside `f` are appended to `fds`.
pub(crate) fn with_fd_sink<R>(fds: &mut Vec<OwnedFd>, f: impl FnOnce() -> R) -> R {
    let previous = FD_SINK.with(|sink| sink.borrow_mut().replace(std::mem::take(fds)));
    let result = f();
    FD_SINK.with(|sink| {
        let mut sink = sink.borrow_mut();
        if let Some(collected) = sink.take() {
            *fds = collected;
        }
        *sink = previous;
    });
    result
}

/// Runs `f` with `fds` as this thread's fd source; handles deserialized
/// inside `f` take their descriptors from it. Descriptors nobody took are
/// closed when this returns.
pub(crate) fn with_fd_source<R>(fds: Vec<OwnedFd>, f: impl FnOnce() -> R) -> R {
    let slots = fds.into_iter().map(Some).collect();
    let previous = FD_SOURCE.with(|source| source.borrow_mut().replace(slots));
    let result = f();
    FD_SOURCE.with(|source| *source.borrow_mut() = previous);
    result
}

/// Serializes a file descriptor as an index into the frame's descriptors.
/// For use in the `Serialize` impls of handles.
pub(crate) fn serialize_fd<S: Serializer>(
    fd: BorrowedFd<'_>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::Error as _;
    let dup = fd
        .try_clone_to_owned()
        .map_err(|e| S::Error::custom(format!("could not duplicate a handle's descriptor: {e}")))?;
    let index = FD_SINK.with(|sink| {
        sink.borrow_mut().as_mut().map(|fds| {
            fds.push(dup);
            fds.len() - 1
        })
    });
    match index {
        Some(index) => u32::try_from(index)
            .map_err(|_| S::Error::custom("too many handles in one message"))?
            .serialize(serializer),
        None => Err(S::Error::custom(
            "multiproc handles can only be serialized by multiproc itself \
             (pass them as process arguments or send them through a Queue or Pipe)",
        )),
    }
}

/// Deserializes a file descriptor written by [`serialize_fd`].
pub(crate) fn deserialize_fd<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<OwnedFd, D::Error> {
    use serde::de::Error as _;
    let index = u32::deserialize(deserializer)? as usize;
    FD_SOURCE.with(|source| {
        let mut source = source.borrow_mut();
        let slots = source.as_mut().ok_or_else(|| {
            D::Error::custom("multiproc handles can only be deserialized by multiproc itself")
        })?;
        slots.get_mut(index).and_then(Option::take).ok_or_else(|| {
            D::Error::custom(format!(
                "handle descriptor {index} missing from the message"
            ))
        })
    })
}

/// Appends the encoding of `value` to `out`; descriptors of handles inside
/// `value` are appended to `fds`.
pub(crate) fn encode<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> Result<()> {
    with_fd_sink(fds, || options().serialize_into(&mut *out, value)).map_err(encode_error)
}

/// Encodes a value that carries no handles (internal protocol messages).
pub(crate) fn encode_plain<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    options().serialize(value).map_err(encode_error)
}

/// Decodes a value that carries no handles (internal protocol messages).
pub(crate) fn decode_plain<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    options().deserialize(bytes).map_err(decode_error)
}

/// Decodes one value from `bytes`, giving handles inside it the descriptors
/// in `fds`.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<T> {
    if fds.is_empty() {
        return decode_plain(bytes);
    }
    with_fd_source(fds, || options().deserialize(bytes)).map_err(decode_error)
}

/// Encodes a sequence of values back to back, for chunks of pool tasks and
/// their results. Call inside [`with_fd_sink`] when values may carry handles.
pub(crate) struct SeqEncoder<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> SeqEncoder<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        SeqEncoder { out }
    }

    pub(crate) fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let mut serializer = bincode::Serializer::new(&mut *self.out, options());
        value.serialize(&mut serializer).map_err(encode_error)
    }

    pub(crate) fn out(&mut self) -> &mut Vec<u8> {
        self.out
    }
}

/// Decodes values written back to back by [`SeqEncoder`]. Call inside
/// [`with_fd_source`] when values may carry handles.
pub(crate) struct SeqDecoder<'de> {
    rest: &'de [u8],
}

/// Appends `n` fixed-width little-endian numbers from `bytes` to `out`
/// when `T` is a primitive number (a plain copy, no per-item decoding).
/// Returns the bytes used, or `None` when `T` is not such a type.
#[allow(clippy::ptr_arg)] // the Vec itself is downcast, then extended
fn extend_primitive<T: 'static>(bytes: &[u8], n: usize, out: &mut Vec<T>) -> Option<Result<usize>> {
    macro_rules! primitive {
        ($($t:ty),*) => {$(
            if let Some(out) = (out as &mut dyn std::any::Any).downcast_mut::<Vec<$t>>() {
                const SIZE: usize = std::mem::size_of::<$t>();
                let Some(run) = n.checked_mul(SIZE).and_then(|len| bytes.get(..len)) else {
                    return Some(Err(Error::Decode { message: format!("{n} values need more bytes than the message has") }));
                };
                out.extend(run.chunks_exact(SIZE).map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default())));
                return Some(Ok(run.len()));
            }
        )*};
    }
    primitive!(u64, i64, u32, i32, u16, i16, u128, i128, f64, f32);
    None
}

impl<'de> SeqDecoder<'de> {
    pub(crate) fn new(bytes: &'de [u8]) -> Self {
        SeqDecoder { rest: bytes }
    }

    pub(crate) fn next<T: DeserializeOwned>(&mut self) -> Result<T> {
        options()
            .deserialize_from(&mut self.rest)
            .map_err(decode_error)
    }

    /// Decodes `n` values written back to back, appending them to `out`
    /// in one loop (a plain copy for primitive numbers). On error, the
    /// values decoded before the bad one are in `out`.
    pub(crate) fn extend_into<T: DeserializeOwned + 'static>(
        &mut self,
        n: usize,
        out: &mut Vec<T>,
    ) -> Result<()> {
        if let Some(used) = extend_primitive(self.rest, n, out) {
            self.rest = &self.rest[used?..];
            return Ok(());
        }
        struct Append<'v, T>(&'v mut Vec<T>, usize);
        impl<'de, T: DeserializeOwned> serde::de::Visitor<'de> for Append<'_, T> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{} values", self.1)
            }
            fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
                self.0.reserve(self.1);
                while let Some(v) = seq.next_element()? {
                    self.0.push(v);
                }
                Ok(())
            }
        }
        let mut de = bincode::Deserializer::with_reader(&mut self.rest, options());
        serde::Deserializer::deserialize_tuple(&mut de, n, Append(out, n)).map_err(decode_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn round_trip_plain() {
        let bytes = encode_plain(&(1u64, "two".to_string())).expect("encode");
        let back: (u64, String) = decode_plain(&bytes).expect("decode");
        assert_eq!(back, (1, "two".to_string()));
    }

    #[test]
    fn sequence_round_trip() {
        let mut out = Vec::new();
        let mut enc = SeqEncoder::new(&mut out);
        for i in 0..10u64 {
            enc.push(&i).expect("push");
        }
        let mut dec = SeqDecoder::new(&out);
        let back: Vec<u64> = (0..10).map(|_| dec.next().expect("next")).collect();
        assert_eq!(back, (0..10).collect::<Vec<u64>>());
    }

    #[test]
    fn runs_decode_in_bulk_and_one_by_one() {
        let mut out = Vec::new();
        let mut enc = SeqEncoder::new(&mut out);
        for i in 0..5u64 {
            enc.push(&i).expect("push");
        }
        enc.push(&"tail".to_string()).expect("push");
        for i in 0..3i32 {
            enc.push(&(i, -i)).expect("push");
        }
        let mut dec = SeqDecoder::new(&out);
        let mut nums: Vec<u64> = Vec::new();
        dec.extend_into(5, &mut nums).expect("bulk");
        assert_eq!(nums, vec![0, 1, 2, 3, 4]);
        assert_eq!(dec.next::<String>().expect("string"), "tail");
        let mut pairs: Vec<(i32, i32)> = Vec::new();
        dec.extend_into(3, &mut pairs).expect("generic");
        assert_eq!(pairs, vec![(0, 0), (1, -1), (2, -2)]);
        let mut more: Vec<u64> = Vec::new();
        assert!(dec.extend_into(1, &mut more).is_err(), "nothing left");
    }

    #[test]
    fn truncated_input_is_an_error() {
        let bytes = encode_plain(&"hello".to_string()).expect("encode");
        let err = decode_plain::<String>(&bytes[..bytes.len() - 1]).expect_err("truncated");
        assert!(matches!(err, Error::Decode { .. }), "{err}");
    }

    #[test]
    fn fd_outside_codec_is_an_error() {
        struct Fd(OwnedFd);
        impl Serialize for Fd {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                serialize_fd(self.0.as_fd(), s)
            }
        }
        let fd = Fd(std::fs::File::open("/dev/null").expect("open").into());
        assert!(bincode::serialize(&fd).is_err());
        let mut out = Vec::new();
        let mut fds = Vec::new();
        encode(&fd, &mut out, &mut fds).expect("encode");
        assert_eq!(fds.len(), 1);
    }
}
