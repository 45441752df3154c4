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
//! instead of a descriptor that silently does not arrive. What else a
//! handle writes (its kind, element type and size, checked on arrival) is
//! the [`handle`](crate::handle) module's.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};

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

/// The thread's fd sink: a stack of descriptors shared by nested
/// [`with_fd_sink`] scopes (each takes what was pushed after it began), so
/// entering and leaving a scope moves no vectors (this is on every queue
/// `put`).
struct Sink {
    fds: RefCell<Vec<OwnedFd>>,
    /// A scope is active: handles may serialize.
    active: Cell<bool>,
    /// Added to a descriptor's stack position to give its index in the
    /// innermost scope's output (which may already hold descriptors).
    offset: Cell<usize>,
    /// The stack position where the innermost scope began.
    start: Cell<usize>,
    /// Descriptors pushed by [`serialize_shared_fd`]: the file's key and
    /// its stack position, so that a file goes once into a message however
    /// many handles of it the message holds.
    shared: RefCell<Vec<((u64, u64), usize)>>,
}

thread_local! {
    static FD_SINK: Sink = const {
        Sink {
            fds: RefCell::new(Vec::new()),
            active: Cell::new(false),
            offset: Cell::new(0),
            start: Cell::new(0),
            shared: RefCell::new(Vec::new()),
        }
    };
    static FD_SOURCE: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
    /// Where what this thread encodes goes (see [`encoding_for`]).
    static PEER: Cell<Peer> = const { Cell::new(Peer::ThisHost) };
}

/// Where an encoded message goes, as far as handles are concerned: a
/// handle (Queue, Lock, Value, Connection, a descriptor...) is its
/// descriptors and shared memory, which exist only on this machine, so it
/// travels only to a process of this machine. This is the one check that
/// keeps it from leaving: every handle's `Serialize` asks
/// [`handle_refusal`] first, before it duplicates or marks anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// A process of this machine (a child, a local pool worker, the peer
    /// of a pipe or a Unix socket): handles travel.
    ThisHost,
    /// The peer of a TCP connection, which may be another host.
    Tcp,
    /// A serving rank of an MPI job (a pool on MPI ranks), which may be
    /// another host.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    MpiRank,
}

/// Runs `f` with what this thread encodes going to `peer` (the outer
/// destination is restored after it, also when `f` panics).
pub(crate) fn encoding_for<R>(peer: Peer, f: impl FnOnce() -> R) -> R {
    struct Restore(Peer);
    impl Drop for Restore {
        fn drop(&mut self) {
            PEER.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PEER.with(|p| p.replace(peer)));
    f()
}

/// `Some(message)` when a handle must not be encoded now, because what
/// this thread encodes goes to another host ([`encoding_for`]); `handle`
/// names the handle's type as users write it.
pub(crate) fn handle_refusal(handle: impl FnOnce() -> String) -> Option<String> {
    refusal(PEER.with(Cell::get), handle)
}

/// Why a `handle` cannot go to `peer`; `None` for this host.
pub(crate) fn refusal(peer: Peer, handle: impl FnOnce() -> String) -> Option<String> {
    match peer {
        Peer::ThisHost => None,
        Peer::Tcp => Some(format!(
            "a {} only makes sense on this machine and cannot be sent over a TCP connection \
             (whose peer may be another host); send plain data instead",
            handle()
        )),
        Peer::MpiRank => {
            let handle = handle();
            Some(format!(
                "a {handle} cannot travel to another MPI rank: it is local to this machine (its \
                 descriptors and shared memory exist only here); pass plain data to a pool on \
                 MPI ranks, or use a local Pool for tasks that need the {handle}"
            ))
        }
    }
}

/// Why values that carry handles cannot go to `peer` (when only their
/// descriptors tell that they did).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn handles_refusal(peer: Peer) -> String {
    refusal(peer, || {
        "handle (Queue, Lock, Value, Connection...)".to_string()
    })
    .unwrap_or_default()
}

/// Like [`encode`], for `peer`: a handle anywhere in `value` (a Queue, a
/// Lock, a Value, a Pipe end, a descriptor) makes it an [`Error::Encode`]
/// that names the handle, and nothing is sent.
pub(crate) fn encode_for<T: Serialize + ?Sized>(
    peer: Peer,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<()> {
    let mut fds = Vec::new();
    encoding_for(peer, || encode(value, out, &mut fds))?;
    if !fds.is_empty() {
        // Every handle refuses first; this is the backstop for a
        // descriptor that came some other way.
        let message = refusal(peer, || "file descriptor".to_string())
            .unwrap_or_else(|| "the value carries file descriptors".to_string());
        return Err(Error::Encode { message });
    }
    Ok(())
}

/// Runs `f` with `fds` as this thread's fd sink; descriptors serialized by
/// handles inside `f` are appended to `fds`.
pub(crate) fn with_fd_sink<R>(fds: &mut Vec<OwnedFd>, f: impl FnOnce() -> R) -> R {
    /// Restores the outer scope and collects this one's descriptors, also
    /// when `f` panics.
    struct Scope<'a> {
        out: &'a mut Vec<OwnedFd>,
        start: usize,
        active: bool,
        offset: usize,
        outer_start: usize,
        shared: usize,
    }
    impl Drop for Scope<'_> {
        fn drop(&mut self) {
            FD_SINK.with(|sink| {
                sink.active.set(self.active);
                sink.offset.set(self.offset);
                sink.start.set(self.outer_start);
                if let Ok(mut pushed) = sink.fds.try_borrow_mut() {
                    if pushed.len() > self.start {
                        self.out.extend(pushed.drain(self.start..));
                    }
                }
                if let Ok(mut shared) = sink.shared.try_borrow_mut() {
                    shared.truncate(self.shared);
                }
            });
        }
    }
    let scope = FD_SINK.with(|sink| {
        let start = sink.fds.try_borrow().map_or(0, |v| v.len());
        Scope {
            start,
            active: sink.active.replace(true),
            offset: sink.offset.replace(fds.len().wrapping_sub(start)),
            outer_start: sink.start.replace(start),
            shared: sink.shared.try_borrow().map_or(0, |v| v.len()),
            out: fds,
        }
    });
    let result = f();
    drop(scope);
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

/// Pushes `dup` into the sink: its index in the innermost scope's output.
fn push_fd(dup: OwnedFd) -> Option<usize> {
    FD_SINK.with(|sink| {
        if !sink.active.get() {
            return None;
        }
        let mut fds = sink.fds.try_borrow_mut().ok()?;
        let index = fds.len().wrapping_add(sink.offset.get());
        fds.push(dup);
        Some(index)
    })
}

fn serialize_index<S: Serializer>(index: Option<usize>, serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::Error as _;
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

fn duplicate<E: serde::ser::Error>(fd: BorrowedFd<'_>) -> Result<OwnedFd, E> {
    fd.try_clone_to_owned()
        .map_err(|e| E::custom(format!("could not duplicate a handle's descriptor: {e}")))
}

/// Serializes a file descriptor as an index into the frame's descriptors.
/// For use in the `Serialize` impls of handles.
pub(crate) fn serialize_fd<S: Serializer>(
    fd: BorrowedFd<'_>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let index = push_fd(duplicate::<S::Error>(fd)?);
    serialize_index(index, serializer)
}

/// As [`serialize_fd`], for a descriptor that handles only look at (see
/// [`with_fd`]) and that names the file `key` (its device and inode): the
/// first one of a file in a message is sent, later ones of the same file
/// write the same index. A thousand locks of one arena travel with one
/// descriptor.
pub(crate) fn serialize_shared_fd<S: Serializer>(
    fd: BorrowedFd<'_>,
    key: (u64, u64),
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let known = FD_SINK.with(|sink| {
        if !sink.active.get() {
            return None;
        }
        let start = sink.start.get();
        let shared = sink.shared.try_borrow().ok()?;
        shared
            .iter()
            .rev()
            .take_while(|(_, at)| *at >= start)
            .find(|(k, _)| *k == key)
            .map(|(_, at)| at.wrapping_add(sink.offset.get()))
    });
    if let Some(index) = known {
        return serialize_index(Some(index), serializer);
    }
    let index = push_fd(duplicate::<S::Error>(fd)?);
    if let Some(index) = index {
        FD_SINK.with(|sink| {
            if let Ok(mut shared) = sink.shared.try_borrow_mut() {
                shared.push((key, index.wrapping_sub(sink.offset.get())));
            }
        });
    }
    serialize_index(index, serializer)
}

/// Takes descriptor `index` of the message being decoded (written by
/// [`serialize_fd`]).
pub(crate) fn take_fd(index: u32) -> std::result::Result<OwnedFd, String> {
    FD_SOURCE.with(|source| {
        let mut source = source.borrow_mut();
        let slots = source
            .as_mut()
            .ok_or("multiproc handles can only be deserialized by multiproc itself")?;
        slots
            .get_mut(index as usize)
            .and_then(Option::take)
            .ok_or_else(|| format!("handle descriptor {index} missing from the message"))
    })
}

/// Runs `f` on descriptor `index` of the message being decoded, leaving it
/// there (closed with the message unless `f` duplicated it): a descriptor
/// written by [`serialize_shared_fd`], which several handles may name.
pub(crate) fn with_fd<R>(
    index: u32,
    f: impl FnOnce(BorrowedFd<'_>) -> R,
) -> std::result::Result<R, String> {
    FD_SOURCE.with(|source| {
        let source = source.borrow();
        let slots = source
            .as_ref()
            .ok_or("multiproc handles can only be deserialized by multiproc itself")?;
        let fd = slots
            .get(index as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| format!("handle descriptor {index} missing from the message"))?;
        Ok(f(fd.as_fd()))
    })
}

/// A borrowed descriptor that serializes through [`serialize_fd`]: a
/// field of a handle's serialized form.
pub(crate) struct FdOut<'a>(pub(crate) BorrowedFd<'a>);

impl Serialize for FdOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_fd(self.0, serializer)
    }
}

/// A descriptor that serializes through [`serialize_shared_fd`], with its
/// file's key.
#[derive(Clone, Copy)]
pub(crate) struct SharedFdOut<'a>(pub(crate) BorrowedFd<'a>, pub(crate) (u64, u64));

impl Serialize for SharedFdOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_shared_fd(self.0, self.1, serializer)
    }
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

/// Like [`encode`], with a one-copy path for byte buffers: serde hands a
/// `Vec<u8>` (or `Box<[u8]>`) to bincode one element at a time (about a
/// nanosecond per byte); this writes the same bytes bincode would (fixint:
/// the length as a little-endian `u64`, then the bytes) with one memcpy.
/// Every other type goes through [`encode`]. Needs `T: 'static` to
/// recognise the type.
pub(crate) fn encode_typed<T: Serialize + 'static>(
    value: &T,
    out: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> Result<()> {
    if let Some(bytes) = as_bytes(value) {
        out.reserve(8 + bytes.len());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
        return Ok(());
    }
    encode(value, out, fds)
}

/// Encodes `value` straight into `buf` (a queue slot) if it fits:
/// `Ok(Some(len))`; `Ok(None)` if it does not (what was written is
/// garbage, the descriptors collected in `fds` are to be dropped). The
/// bytes are those of [`encode_typed`].
pub(crate) fn encode_typed_into<T: Serialize + 'static>(
    value: &T,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<Option<usize>> {
    let room = buf.len();
    if let Some((small, len)) = primitive_bytes(value) {
        let Some(dst) = buf.get_mut(..len) else {
            return Ok(None);
        };
        dst.copy_from_slice(&small[..len]);
        return Ok(Some(len));
    }
    if let Some(bytes) = as_bytes(value) {
        let Some(dst) = buf.get_mut(..8 + bytes.len()) else {
            return Ok(None);
        };
        let (len, rest) = dst.split_at_mut(8);
        len.copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        rest.copy_from_slice(bytes);
        return Ok(Some(8 + bytes.len()));
    }
    let mut w: &mut [u8] = buf;
    match with_fd_sink(fds, || options().serialize_into(&mut w, value)) {
        Ok(()) => Ok(Some(room - w.len())),
        Err(e) => match *e {
            bincode::ErrorKind::Io(ref io) if io.kind() == std::io::ErrorKind::WriteZero => {
                Ok(None)
            }
            _ => Err(encode_error(e)),
        },
    }
}

/// Encodes the longest prefix of `items` (at most `max` of them) that fits
/// `buf`, back to back as [`SeqEncoder`] writes them (so [`SeqDecoder`]
/// reads them): `(items, bytes)` written. It stops before an item that
/// does not fit, carries handles or fails to encode: that one is for a
/// message of its own (which reports its error). A plain copy per item
/// for primitive numbers.
pub(crate) fn encode_batch_into<T: Serialize + 'static>(
    items: &[T],
    buf: &mut [u8],
    max: usize,
) -> (usize, usize) {
    let items = &items[..items.len().min(max)];
    if let Some((_, size)) = items.first().and_then(primitive_bytes) {
        let n = items.len().min(buf.len() / size);
        for (item, dst) in items[..n].iter().zip(buf.chunks_exact_mut(size)) {
            if let Some((bytes, _)) = primitive_bytes(item) {
                dst.copy_from_slice(&bytes[..size]);
            }
        }
        return (n, n * size);
    }
    let mut used = 0;
    let mut fds = Vec::new();
    for (n, item) in items.iter().enumerate() {
        let Some(rest) = buf.get_mut(used..) else {
            return (n, used);
        };
        match encode_typed_into(item, rest, &mut fds) {
            Ok(Some(len)) if fds.is_empty() => used += len,
            // The duplicates of its descriptors close with `fds`.
            _ => return (n, used),
        }
    }
    (items.len(), used)
}

/// The bytes of `value` if it is a byte buffer with a fast path.
fn as_bytes<T: 'static>(value: &T) -> Option<&[u8]> {
    let any = value as &dyn Any;
    if let Some(v) = any.downcast_ref::<Vec<u8>>() {
        return Some(v);
    }
    any.downcast_ref::<Box<[u8]>>().map(|b| &b[..])
}

/// Like [`decode`], with the one-copy path of [`encode_typed`] for byte
/// buffers (the same wire format, so either side may use either function).
pub(crate) fn decode_typed<T: DeserializeOwned + 'static>(
    bytes: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<T> {
    let mut rest = bytes;
    if let Some(value) = read_primitive::<T>(&mut rest) {
        return value;
    }
    let id = TypeId::of::<T>();
    if id == TypeId::of::<Vec<u8>>() {
        return cast(decode_byte_vec(bytes)?).map_or_else(|| decode(bytes, fds), Ok);
    }
    if id == TypeId::of::<Box<[u8]>>() {
        let boxed = decode_byte_vec(bytes)?.into_boxed_slice();
        return cast(boxed).map_or_else(|| decode(bytes, fds), Ok);
    }
    decode(bytes, fds)
}

/// `value` as a `T`, if it is one (no allocation, no unsafe).
fn cast<T: 'static, U: 'static>(value: U) -> Option<T> {
    let mut slot = Some(value);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take)
}

/// A bincode (fixint, little-endian) `Vec<u8>` from the front of `bytes`.
fn decode_byte_vec(bytes: &[u8]) -> Result<Vec<u8>> {
    let short = || Error::Decode {
        message: "io error: unexpected end of file".into(),
    };
    let (len, rest) = bytes.split_first_chunk::<8>().ok_or_else(short)?;
    let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| short())?;
    rest.get(..len).map(<[u8]>::to_vec).ok_or_else(short)
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

    /// [`push`](SeqEncoder::push), with one copy for primitive numbers.
    #[inline]
    pub(crate) fn push_value<T: Serialize + 'static>(&mut self, value: &T) -> Result<()> {
        if push_primitive(self.out, value) {
            return Ok(());
        }
        self.push(value)
    }

    pub(crate) fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let mut serializer = bincode::Serializer::new(&mut *self.out, options());
        value.serialize(&mut serializer).map_err(encode_error)
    }

    pub(crate) fn out(&mut self) -> &mut Vec<u8> {
        self.out
    }
}

/// The bytes bincode (fixint, little endian) writes for `value` when `T`
/// is a fixed-width primitive number or a 1-tuple of one (a pool task's
/// argument tuple), in a stack buffer with their length; `None` otherwise.
/// The type tests are on constants and fold away.
#[inline]
pub(crate) fn primitive_bytes<T: 'static>(value: &T) -> Option<([u8; 16], usize)> {
    let any = value as &dyn Any;
    macro_rules! primitive {
        ($($t:ty => $w:ty),*) => {$(
            let v = any.downcast_ref::<$t>().copied().or_else(|| any.downcast_ref::<($t,)>().map(|t| t.0));
            if let Some(v) = v {
                let le = (v as $w).to_le_bytes();
                let mut buf = [0u8; 16];
                buf[..le.len()].copy_from_slice(&le);
                return Some((buf, le.len()));
            }
        )*};
    }
    primitive!(u64 => u64, i64 => i64, u32 => u32, i32 => i32, f64 => f64, f32 => f32,
        usize => u64, isize => i64, u16 => u16, i16 => i16, u8 => u8, i8 => i8, u128 => u128, i128 => i128);
    None
}

/// `true` if `T` is one of the fixed-width primitive numbers (or a
/// 1-tuple of one) that [`primitive_bytes`] encodes: decoding one runs no
/// user code. The type tests are on constants and fold away.
#[inline]
pub(crate) fn is_primitive<T: 'static>() -> bool {
    let id = TypeId::of::<T>();
    macro_rules! any_of {
        ($($t:ty),*) => { false $(|| id == TypeId::of::<$t>() || id == TypeId::of::<($t,)>())* };
    }
    any_of!(
        u64, i64, u32, i32, f64, f32, usize, isize, u16, i16, u8, i8, u128, i128
    )
}

/// The bytes a value of `T` takes on the wire when `T` is one of the
/// fixed-width primitive numbers (or 1-tuples of one) that
/// [`primitive_bytes`] and [`read_primitive`] handle; `None` otherwise.
/// The type tests are on constants and fold away.
#[inline]
pub(crate) fn primitive_width<T: 'static>() -> Option<usize> {
    macro_rules! width {
        ($($t:ty => $w:ty),*) => {$(
            let id = TypeId::of::<T>();
            if id == TypeId::of::<$t>() || id == TypeId::of::<($t,)>() {
                return Some(std::mem::size_of::<$w>());
            }
        )*};
    }
    width!(u64 => u64, i64 => i64, u32 => u32, i32 => i32, f64 => f64, f32 => f32,
        usize => u64, isize => i64, u16 => u16, i16 => i16, u8 => u8, i8 => i8, u128 => u128, i128 => i128);
    None
}

/// Writes `value` (a type [`primitive_width`] knows) into `dst`, which is
/// exactly that wide; `false` (nothing written) otherwise.
#[inline]
pub(crate) fn write_primitive<T: 'static>(value: &T, dst: &mut [u8]) -> bool {
    match primitive_bytes(value) {
        Some((buf, len)) if len == dst.len() => {
            dst.copy_from_slice(&buf[..len]);
            true
        }
        _ => false,
    }
}

/// Reads one value of a type [`primitive_width`] knows from `src`, which
/// is exactly that wide; `None` for other types or widths.
#[inline]
pub(crate) fn read_primitive_exact<T: 'static>(mut src: &[u8]) -> Option<Result<T>> {
    if primitive_width::<T>() != Some(src.len()) {
        return None;
    }
    read_primitive(&mut src)
}

/// Encodes up to `max` values from `items` back to back when `T` is a
/// type [`primitive_width`] knows, in one loop of fixed-width stores (no
/// per-value length bookkeeping); the number taken. `None` (nothing taken)
/// for other types.
#[inline]
pub(crate) fn push_primitives<T: 'static>(
    out: &mut Vec<u8>,
    items: &mut impl Iterator<Item = T>,
    max: usize,
) -> Option<usize> {
    let width = primitive_width::<T>()?;
    let bound = items.size_hint().1.unwrap_or(max).min(max);
    let start = out.len();
    out.resize(start + bound * width, 0);
    let mut count = 0usize;
    for (dst, item) in out[start..].chunks_exact_mut(width).zip(items.by_ref()) {
        write_primitive(&item, dst);
        count += 1;
    }
    // An iterator that ends early (or announces no bound) is taken one by
    // one for the rest.
    out.truncate(start + count * width);
    while count < max {
        let Some(item) = items.next() else { break };
        push_primitive(out, &item);
        count += 1;
    }
    Some(count)
}

/// Appends what [`primitive_bytes`] gives for `value`; `false` (nothing
/// written) when `T` is not such a type.
#[inline]
pub(crate) fn push_primitive<T: 'static>(out: &mut Vec<u8>, value: &T) -> bool {
    match primitive_bytes(value) {
        Some((buf, len)) => {
            out.extend_from_slice(&buf[..len]);
            true
        }
        None => false,
    }
}

/// Reads one value written by [`push_primitive`] (or by bincode) from the
/// front of `rest` when `T` is a fixed-width primitive number or a 1-tuple
/// of one; `None` (nothing read) otherwise.
#[inline]
pub(crate) fn read_primitive<T: 'static>(rest: &mut &[u8]) -> Option<Result<T>> {
    macro_rules! primitive {
        ($($t:ty => $w:ty),*) => {$(
            let id = TypeId::of::<T>();
            if id == TypeId::of::<$t>() || id == TypeId::of::<($t,)>() {
                const SIZE: usize = std::mem::size_of::<$w>();
                let Some((head, tail)) = rest.split_first_chunk::<SIZE>() else {
                    return Some(Err(Error::Decode { message: "io error: unexpected end of file".into() }));
                };
                *rest = tail;
                let wide = <$w>::from_le_bytes(*head);
                let Some(v) = <$t>::try_from(wide).ok() else {
                    return Some(Err(Error::Decode { message: format!("{wide} does not fit a {}", stringify!($t)) }));
                };
                return cast::<T, $t>(v).or_else(|| cast::<T, ($t,)>((v,))).map(Ok);
            }
        )*};
    }
    primitive!(u64 => u64, i64 => i64, u32 => u32, i32 => i32, usize => u64, isize => i64,
        u16 => u16, i16 => i16, u8 => u8, i8 => i8, u128 => u128, i128 => i128);
    macro_rules! float {
        ($($t:ty),*) => {$(
            let id = TypeId::of::<T>();
            if id == TypeId::of::<$t>() || id == TypeId::of::<($t,)>() {
                const SIZE: usize = std::mem::size_of::<$t>();
                let Some((head, tail)) = rest.split_first_chunk::<SIZE>() else {
                    return Some(Err(Error::Decode { message: "io error: unexpected end of file".into() }));
                };
                *rest = tail;
                let v = <$t>::from_le_bytes(*head);
                return cast::<T, $t>(v).or_else(|| cast::<T, ($t,)>((v,))).map(Ok);
            }
        )*};
    }
    float!(f64, f32);
    None
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

    /// Bytes not decoded yet.
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn next<T: DeserializeOwned + 'static>(&mut self) -> Result<T> {
        if let Some(value) = read_primitive::<T>(&mut self.rest) {
            return value;
        }
        // A reader (not a slice) would allocate whatever length the bytes
        // announce before reading them: the limit makes bincode refuse a
        // length longer than what is left, before any allocation.
        options()
            .with_limit(self.rest.len() as u64)
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
        // Limited to what is left, as in `next`: no allocation of a
        // forged length.
        let limited = options().with_limit(self.rest.len() as u64);
        let mut de = bincode::Deserializer::with_reader(&mut self.rest, limited);
        serde::Deserializer::deserialize_tuple(&mut de, n, Append(out, n)).map_err(decode_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn encoding_for_another_host_refuses_handles_and_restores_the_peer() {
        let mut out = Vec::new();
        let file = std::fs::File::open("/dev/null").expect("open");
        let handle = crate::connection::Descriptor::from(file);
        let err = encode_for(Peer::Tcp, &(1u8, &handle), &mut out).expect_err("a handle");
        assert!(err.to_string().contains("Descriptor"), "{err}");
        assert!(err.to_string().contains("TCP"), "{err}");
        assert_eq!(PEER.with(Cell::get), Peer::ThisHost);
        out.clear();
        let err = encode_for(Peer::MpiRank, &(1u8, &handle), &mut out).expect_err("a handle");
        assert!(err.to_string().contains("Descriptor"), "{err}");
        assert!(err.to_string().contains("MPI rank"), "{err}");
        // Plain data passes, and a local encoding still takes handles.
        out.clear();
        encode_for(Peer::Tcp, &(1u8, "two"), &mut out).expect("plain data");
        let mut fds = Vec::new();
        encode(&handle, &mut Vec::new(), &mut fds).expect("local");
        assert_eq!(fds.len(), 1);
    }

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

    fn same_as_bincode<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + 'static>(
        value: T,
    ) {
        let mut fast = Vec::new();
        assert!(
            push_primitive(&mut fast, &value),
            "{value:?} takes the fast path"
        );
        assert_eq!(fast, encode_plain(&value).expect("bincode"), "{value:?}");
        let mut rest = &fast[..];
        let back = read_primitive::<T>(&mut rest)
            .expect("fast path")
            .expect("decodes");
        assert_eq!((back, rest.len()), (value, 0));
    }

    #[test]
    fn primitive_fast_path_matches_bincode() {
        same_as_bincode(u64::MAX - 7);
        same_as_bincode((42u64,));
        same_as_bincode(-5i32);
        same_as_bincode((-1i8,));
        same_as_bincode(3.25f64);
        same_as_bincode(usize::MAX);
        same_as_bincode(i128::MIN);
        let mut out = Vec::new();
        assert!(!push_primitive(&mut out, &"text".to_string()));
        assert!(!push_primitive(&mut out, &(1u64, 2u64)));
        assert!(out.is_empty());
        let value: u32 = decode_typed(&7u32.to_le_bytes(), Vec::new()).expect("typed");
        assert_eq!(value, 7);
        assert!(
            decode_typed::<u64>(&[1, 2, 3], Vec::new()).is_err(),
            "short input is an error"
        );
    }

    #[test]
    fn byte_fast_path_matches_bincode() {
        for len in [0usize, 1, 7, 8, 1000, 1024, 70_000] {
            let v: Vec<u8> = (0..len).map(|i| (i * 31 % 256) as u8).collect();
            let reference = encode_plain(&v).expect("bincode");
            let (mut fast, mut fds) = (Vec::new(), Vec::new());
            encode_typed(&v, &mut fast, &mut fds).expect("fast");
            assert_eq!(fast, reference, "Vec<u8> of {len}");
            let boxed: Box<[u8]> = v.clone().into_boxed_slice();
            let mut fast_box = Vec::new();
            encode_typed(&boxed, &mut fast_box, &mut fds).expect("fast box");
            assert_eq!(fast_box, reference, "Box<[u8]> of {len}");
            assert!(fds.is_empty());
            let back: Vec<u8> = decode_typed(&reference, Vec::new()).expect("decode");
            assert_eq!(back, v);
            let back: Box<[u8]> = decode_typed(&reference, Vec::new()).expect("decode box");
            assert_eq!(back, boxed);
            // Trailing bytes are allowed, as with bincode.
            let mut padded = reference.clone();
            padded.extend_from_slice(&[9, 9, 9]);
            let back: Vec<u8> = decode_typed(&padded, Vec::new()).expect("padded");
            assert_eq!(back, v);
            if len > 0 {
                let cut = &reference[..reference.len() - 1];
                assert!(decode_typed::<Vec<u8>>(cut, Vec::new()).is_err());
                assert!(decode_plain::<Vec<u8>>(cut).is_err());
            }
        }
        assert!(decode_typed::<Vec<u8>>(&[1, 0, 0], Vec::new()).is_err());
        // Straight into a buffer: the same bytes, or "does not fit".
        let mut slot = [0u8; 64];
        for v in [vec![1u8, 2, 3], vec![5u8; 56], vec![5u8; 57]] {
            let reference = encode_plain(&v).expect("bincode");
            match encode_typed_into(&v, &mut slot, &mut Vec::new()).expect("into") {
                Some(n) => assert_eq!(&slot[..n], &reference[..]),
                None => assert!(reference.len() > slot.len()),
            }
            let t = (7u32, v.clone());
            let reference = encode_plain(&t).expect("bincode");
            match encode_typed_into(&t, &mut slot, &mut Vec::new()).expect("into") {
                Some(n) => assert_eq!(&slot[..n], &reference[..]),
                None => assert!(reference.len() > slot.len()),
            }
        }
        // Other types take the ordinary path.
        let (mut out, mut fds) = (Vec::new(), Vec::new());
        encode_typed(&(5u64, vec![1u16, 2]), &mut out, &mut fds).expect("tuple");
        assert_eq!(out, encode_plain(&(5u64, vec![1u16, 2])).expect("bincode"));
        let back: (u64, Vec<u16>) = decode_typed(&out, Vec::new()).expect("tuple back");
        assert_eq!(back, (5, vec![1, 2]));
    }

    #[test]
    fn nested_sinks_index_into_their_own_output() {
        struct Fd(OwnedFd);
        impl Serialize for Fd {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                serialize_fd(self.0.as_fd(), s)
            }
        }
        let open = || Fd(std::fs::File::open("/dev/null").expect("open").into());
        let (a, b, c) = (open(), open(), open());
        let mut outer: Vec<OwnedFd> = vec![open().0];
        let (mut first, mut nested, mut last) = (Vec::new(), Vec::new(), Vec::new());
        let mut inner = Vec::new();
        with_fd_sink(&mut outer, || {
            options().serialize_into(&mut first, &a).expect("first");
            encode(&(&b, &c), &mut nested, &mut inner).expect("nested");
            options().serialize_into(&mut last, &a).expect("last");
        });
        assert_eq!(decode_plain::<u32>(&first).expect("index"), 1);
        assert_eq!(
            decode_plain::<(u32, u32)>(&nested).expect("indices"),
            (0, 1)
        );
        assert_eq!(decode_plain::<u32>(&last).expect("index"), 2);
        assert_eq!(inner.len(), 2);
        assert_eq!(outer.len(), 3);
        // And no scope is left active.
        assert!(bincode::serialize(&a).is_err());
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

#[cfg(test)]
mod hostile_lengths {
    use super::*;

    #[test]
    fn a_forged_length_in_a_sequence_is_an_error_not_an_allocation() {
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"short");
        let mut dec = SeqDecoder::new(&bytes);
        assert!(dec.next::<String>().is_err());
        let mut dec = SeqDecoder::new(&bytes);
        assert!(dec.next::<Vec<u64>>().is_err());
        let mut out: Vec<String> = Vec::new();
        let mut dec = SeqDecoder::new(&bytes);
        assert!(dec.extend_into(1, &mut out).is_err());
    }
}
