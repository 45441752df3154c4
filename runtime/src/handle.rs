//! What a handle is on the wire, in one place: every handle type (Queue,
//! Connection, Lock, Value, SharedMemory...) implements [`HandleWire`], and
//! [`handle_serde!`] gives it the one `Serialize` / `Deserialize` pair below,
//! so that the checks a received handle passes are written once.
//!
//! # The wire form
//!
//! A handle is a tuple of three parts (bincode: no length prefixes):
//!
//! 1. a **tag**: a magic number with the handle's [`Kind`], the
//!    fingerprint of its element type ([`Elem`]: a hash of
//!    `std::any::type_name` with the type's size and alignment; `()` for
//!    untyped handles), the size in bytes of its shared memory (0 if it
//!    has none), and where that memory is: a cell of an arena (its offset
//!    and stamp, see `sys::arena`) or a memfd of its own (both 0);
//! 2. its **plain fields**, no descriptors (an array's length, a barrier's
//!    party count, a name), checked by the handle;
//! 3. up to [`SLOTS`] **descriptors**, each an optional index into the
//!    message's descriptors (see [`codec`](crate::codec)).
//!
//! Small objects (`Lock`, `Value`, `Event`...: every [`Block`] handle of at
//! most `sys::arena::MAX_OBJECT` bytes) live in cells of shared arenas, and
//! their descriptor slot names the arena's memfd: a message sends each
//! arena once however many of its objects it holds, and the receiver maps
//! an arena once however many messages bring it (a file it already maps is
//! recognised by `fstat`, and the descriptor that came is closed with the
//! message). Sending such a handle marks its object shared, so that its
//! creator never reuses the cell (see `sys::arena` for the lifetime of
//! cells); on arrival, the cell must hold an object of the handle's kind,
//! element type and size (its trailer) under the stamp the handle names.
//!
//! # What the receiver checks, before it maps or uses anything
//!
//! - The kind and the element fingerprint are those of the type it decodes
//!   into, or decoding fails with an [`Error::Decode`] that names the kind
//!   expected and the kind found: an `Array<u64>` is not a `SharedMemory`,
//!   an `Array<u8>` not a `RawArray<u8>`, a `Queue<u64>` not a
//!   `Queue<String>`, and a `(String, Lock)` is no handle at all.
//! - The mapping size the tag announces is the one this type needs with
//!   these plain fields ([`HandleWire::mapping_size`]), and the memfd that
//!   arrives has exactly that size ([`Received::mapping`]; handles' memfds
//!   are sealed against resizing, and a memfd that is not sealed against
//!   shrinking is refused): a received handle never maps a size other than
//!   the one its type computes. An object in an arena names a cell
//!   instead: the descriptor must be a sealed memfd of exactly an arena's
//!   size that this process maps as nothing else, the offset a cell's
//!   start for that arena's cell size, the size one of that cell size, and
//!   the cell's trailer must hold the handle's stamp, kind and element
//!   fingerprint ([`kind_word`]) and size; a cell this process holds as
//!   another object, or one of its own arenas that holds none, is refused
//!   (`sys::arena`, [`Received::block`]).
//! - Descriptors the handle does not use are closed.
//!
//! Then the handle rebuilds itself ([`HandleWire::rebuild`]) and checks
//! what only its memory can tell (a queue's header, an array's length word).
//!
//! # Why a name hash is enough
//!
//! Handles only travel between processes of one build: a child is this
//! executable started again from `/proc/self/exe`, and the start protocol
//! refuses a child whose executable identity or registrations differ from
//! its parent's (`Error::BuildMismatch`); every other process that can hold
//! a queue, pipe or handle got it from such a parent. So both sides ran the
//! same compiler on the same source, and `type_name::<T>()` is the same
//! string on both for the same `T`. It is not guaranteed unique (two
//! versions of one crate in the build may name two types alike), which is
//! why the size and alignment ride with it; a collision only loses this
//! check, never soundness: what memory safety rests on is checked
//! separately (the mapping's exact size, the element size and alignment,
//! `T: Pod` for shared data, and serde's own checks for the messages of a
//! queue or a pipe, which are bytes, not memory). `TypeId` would be unique,
//! but needs `T: 'static`, which `Queue<T>`'s serde impls do not ask for.
//! The hash is FNV-1a, fixed, so it is the same in every process.

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::{self, FdOut, SharedFdOut};
use crate::error::{Error, Result};
use crate::sys::arena::{self, Block, Place};
use crate::sys::shm::Mapping;

/// Most descriptors one handle sends (a queue's four).
pub(crate) const SLOTS: usize = 4;

/// The high half of a tag's first word: this is a multiproc handle.
const MAGIC: u32 = 0x6d68_0000; // "mh"
const MAGIC_MASK: u32 = 0xffff_0000;

macro_rules! kinds {
    ($($kind:ident = $n:literal, typed: $typed:literal;)*) => {
        /// What a handle is: the first thing on its wire form.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Kind {
            $(
                #[doc = concat!("`", stringify!($kind), "`")]
                $kind = $n,
            )*
        }

        impl Kind {
            fn from_number(n: u16) -> Option<Kind> {
                match n {
                    $($n => Some(Kind::$kind),)*
                    _ => None,
                }
            }

            /// The type's name, as users write it.
            pub(crate) fn name(self) -> &'static str {
                match self {
                    $(Kind::$kind => stringify!($kind),)*
                }
            }

            /// Handles of this kind are generic over an element type.
            fn typed(self) -> bool {
                match self {
                    $(Kind::$kind => $typed,)*
                }
            }
        }
    };
}

kinds! {
    Queue = 1, typed: true;
    SimpleQueue = 2, typed: true;
    JoinableQueue = 3, typed: true;
    Connection = 4, typed: true;
    Sender = 5, typed: true;
    Receiver = 6, typed: true;
    Lock = 7, typed: false;
    RLock = 8, typed: false;
    Semaphore = 9, typed: false;
    BoundedSemaphore = 10, typed: false;
    Event = 11, typed: false;
    Condition = 12, typed: false;
    Barrier = 13, typed: false;
    Value = 14, typed: true;
    RawValue = 15, typed: true;
    Array = 16, typed: true;
    RawArray = 17, typed: true;
    SharedMemory = 18, typed: false;
    Descriptor = 19, typed: false;
}

/// The fingerprint of a handle's element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Elem {
    /// FNV-1a of `std::any::type_name`.
    hash: u64,
    size: u32,
    align: u32,
}

impl Elem {
    pub(crate) fn of<T>() -> Elem {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::any::type_name::<T>().bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Elem {
            hash,
            size: narrow(std::mem::size_of::<T>()),
            align: narrow(std::mem::align_of::<T>()),
        }
    }
}

impl fmt::Display for Elem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes, aligned to {}", self.size, self.align)
    }
}

/// The first part of a handle's wire form.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct Tag {
    /// [`MAGIC`] | the kind's number.
    kind: u32,
    elem: Elem,
    /// Bytes of the handle's shared memory (0: none).
    size: u64,
    /// Where that memory is in the descriptor of slot 0: a cell's offset
    /// in its arena (0 for a memfd of its own).
    offset: u64,
    /// The cell's stamp (0: a memfd of its own).
    stamp: u64,
}

/// The fingerprint of a handle type that an arena cell's trailer holds:
/// the kind's number and 24 bits of the element type's hash.
pub(crate) fn kind_word<H: HandleWire>() -> u32 {
    ((Elem::of::<H::Elem>().hash as u32) << 8) | H::KIND as u32
}

/// The memory of a new handle of type `H`: `len` zero bytes aligned to
/// `align`, a cell of an arena when it fits one, else a memfd of its own
/// named `name`.
pub(crate) fn new_block<H: HandleWire>(name: &str, len: usize, align: usize) -> Result<Arc<Block>> {
    Ok(arena::create(name, len, align, kind_word::<H>())?)
}

/// A handle's wire form, and how it is rebuilt from it. Implemented by
/// every handle type; [`handle_serde!`] turns an implementation into the
/// type's `Serialize` and `Deserialize`.
pub(crate) trait HandleWire: Sized {
    /// What this handle is.
    const KIND: Kind;
    /// The type it is generic over (`()` for untyped handles).
    type Elem;
    /// The fields it sends besides its descriptors.
    type Plain: Serialize + DeserializeOwned;

    /// What it sends.
    fn parts(&self) -> Result<Parts<'_, Self::Plain>>;

    /// The exact size of the shared mapping of a handle of this type with
    /// these fields (0: it has none). An error if no such handle can exist
    /// (a size that overflows).
    fn mapping_size(plain: &Self::Plain) -> Result<usize>;

    /// Rebuilds a received handle (its tag and size already checked).
    fn rebuild(plain: Self::Plain, fds: &mut Received) -> Result<Self>;
}

/// What a handle sends: its plain fields, its descriptors, and the size of
/// its shared mapping.
pub(crate) struct Parts<'a, P> {
    pub(crate) plain: P,
    pub(crate) fds: [Option<BorrowedFd<'a>>; SLOTS],
    /// Bytes of the handle's mapping (0: none).
    pub(crate) size: usize,
    /// Where the memory is: [`Place::OWN`] unless slot 0 is an arena.
    pub(crate) place: Place,
    /// The arena's file when slot 0 is one (sent once per message).
    pub(crate) arena: Option<(u64, u64)>,
}

impl<'a, P> Parts<'a, P> {
    /// The parts of a handle that is one mapping (its descriptor in slot 0).
    pub(crate) fn mapped(map: &'a Mapping, plain: P) -> Parts<'a, P> {
        Parts {
            plain,
            fds: [Some(map.fd()), None, None, None],
            size: map.len(),
            place: Place::OWN,
            arena: None,
        }
    }

    /// The parts of a handle that is one [`Block`]: a cell of an arena or a
    /// memfd of its own (its descriptor in slot 0). The object is marked
    /// shared: its cell is never reused by this process.
    pub(crate) fn block(block: &'a Block, plain: P) -> Parts<'a, P> {
        block.sent();
        Parts {
            plain,
            fds: [Some(block.fd()), None, None, None],
            size: block.len(),
            place: block.place(),
            arena: block.in_arena().then(|| block.file().key()),
        }
    }
}

/// The descriptors of a received handle, for [`HandleWire::rebuild`], as
/// indices into the message's descriptors; those it does not take are
/// closed when this is dropped (but an arena's, which other handles of the
/// message may name: it is closed with the message).
pub(crate) struct Received {
    kind: Kind,
    slots: [Option<u32>; SLOTS],
    /// The mapping size checked against the tag.
    size: usize,
    place: Place,
    /// [`kind_word`] of the type being decoded.
    kind_word: u32,
}

impl Received {
    /// The descriptor in `slot`; an error if it did not come.
    pub(crate) fn fd(&mut self, slot: usize) -> Result<OwnedFd> {
        match self.index(slot)? {
            Some(index) => codec::take_fd(index).map_err(decode),
            None => Err(self.missing(slot)),
        }
    }

    fn missing(&self, slot: usize) -> Error {
        decode(format!(
            "a {} arrived without its descriptor {slot}",
            self.kind.name()
        ))
    }

    /// The index of `slot`, taken; an error for slot 0 of a handle in an
    /// arena (only [`block`](Received::block) reads it).
    fn index(&mut self, slot: usize) -> Result<Option<u32>> {
        if slot == 0 && self.place.is_cell() {
            return Err(decode(format!(
                "a {} arrived as a cell of an arena, which this kind never is",
                self.kind.name()
            )));
        }
        Ok(self.slots.get_mut(slot).and_then(Option::take))
    }

    /// The memfd in `slot`, mapped, refused unless it has exactly the size
    /// the handle's type computed ([`HandleWire::mapping_size`]).
    pub(crate) fn mapping(&mut self, slot: usize) -> Result<Mapping> {
        let fd = self.fd(slot)?;
        Mapping::from_fd_sized(fd, self.size)
            .map_err(|e| decode(format!("a received {}: {e}", self.kind.name())))
    }

    /// Expects the cell of an arena to hold an object made as an `H`
    /// (a `BoundedSemaphore` is a `Semaphore`'s memory under another kind).
    pub(crate) fn expect_cell_of<H: HandleWire>(&mut self) {
        self.kind_word = kind_word::<H>();
    }

    /// The object in slot 0: the cell of an arena the tag names, or a memfd
    /// of its own, refused unless it holds exactly the size the handle's
    /// type computed and, in an arena, an object of this kind (see
    /// `sys::arena`).
    pub(crate) fn block(&mut self) -> Result<Arc<Block>> {
        let name = self.kind.name();
        let what = |e: std::io::Error| decode(format!("a received {name}: {e}"));
        if !self.place.is_cell() {
            let fd = self.fd(0)?;
            return arena::receive_own(fd, self.size).map_err(what);
        }
        let index = self.slots[0].take().ok_or_else(|| self.missing(0))?;
        let (place, size, kind) = (self.place, self.size, self.kind_word);
        codec::with_fd(index, |fd| arena::receive_cell(fd, place, size, kind))
            .map_err(decode)?
            .map_err(what)
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        let first = usize::from(self.place.is_cell());
        for index in self.slots[first..].iter_mut().filter_map(Option::take) {
            drop(codec::take_fd(index));
        }
    }
}

/// A [`Error::Decode`] saying `message`.
pub(crate) fn decode(message: impl Into<String>) -> Error {
    Error::Decode {
        message: message.into(),
    }
}

/// What `err` says, without the "could not decode" (or "encode") prefix:
/// the codec adds it once, around the whole message.
fn reason(err: &Error) -> String {
    match err {
        Error::Decode { message }
        | Error::Encode { message }
        | Error::InvalidArgument { message } => message.clone(),
        other => other.to_string(),
    }
}

/// `Kind<ElementType>` (or `Kind` for untyped kinds), for messages.
fn expected<H: HandleWire>() -> String {
    if H::KIND.typed() {
        format!("{}<{}>", H::KIND.name(), std::any::type_name::<H::Elem>())
    } else {
        H::KIND.name().to_string()
    }
}

/// Checks that `tag` is one of a handle of type `H`.
fn check_tag<H: HandleWire>(tag: &Tag) -> std::result::Result<(), String> {
    if tag.kind & MAGIC_MASK != MAGIC {
        return Err(format!(
            "expected a handle ({}), found bytes that are not a multiproc handle \
             (a handle is received as the type it was sent as)",
            expected::<H>()
        ));
    }
    let number = (tag.kind & !MAGIC_MASK) as u16;
    let Some(found) = Kind::from_number(number) else {
        return Err(format!(
            "expected a handle ({}), found a handle of unknown kind {number}",
            expected::<H>()
        ));
    };
    if found != H::KIND {
        return Err(format!(
            "wrong handle kind: expected {}, found {} (a handle is received as the type it \
             was sent as)",
            expected::<H>(),
            found.name()
        ));
    }
    let elem = Elem::of::<H::Elem>();
    if tag.elem != elem {
        return Err(format!(
            "wrong handle element type: expected {} (elements of {elem}), found a {} of \
             another element type (elements of {})",
            expected::<H>(),
            found.name(),
            tag.elem
        ));
    }
    Ok(())
}

/// A descriptor on the wire: one of its own, or an arena's (sent once per
/// message). Both are an index into the message's descriptors.
#[derive(Clone, Copy)]
enum FdWire<'a> {
    Own(BorrowedFd<'a>),
    Shared(SharedFdOut<'a>),
}

impl Serialize for FdWire<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            FdWire::Own(fd) => FdOut(*fd).serialize(serializer),
            FdWire::Shared(fd) => fd.serialize(serializer),
        }
    }
}

/// The `Serialize` of every handle.
pub(crate) fn serialize<H: HandleWire, S: Serializer>(
    handle: &H,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::Error as _;
    // Refused before anything is marked shared or duplicated.
    if let Some(refusal) = codec::handle_refusal(expected::<H>) {
        return Err(S::Error::custom(refusal));
    }
    let parts = handle.parts().map_err(|e| S::Error::custom(reason(&e)))?;
    let tag = Tag {
        kind: MAGIC | H::KIND as u32,
        elem: Elem::of::<H::Elem>(),
        size: parts.size as u64,
        offset: parts.place.offset,
        stamp: parts.place.stamp,
    };
    let mut tuple = serializer.serialize_tuple(3)?;
    tuple.serialize_element(&tag)?;
    tuple.serialize_element(&parts.plain)?;
    let mut fds = parts.fds.map(|fd| fd.map(FdWire::Own));
    if let (Some(key), Some(FdWire::Own(fd))) = (parts.arena, fds[0]) {
        fds[0] = Some(FdWire::Shared(SharedFdOut(fd, key)));
    }
    tuple.serialize_element(&fds)?;
    tuple.end()
}

/// The `Deserialize` of every handle: the tag is checked first, then the
/// size, then the descriptors are taken and the handle rebuilt.
pub(crate) fn deserialize<'de, H: HandleWire, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<H, D::Error> {
    struct HandleVisitor<H>(PhantomData<fn() -> H>);

    impl<'de, H: HandleWire> Visitor<'de> for HandleVisitor<H> {
        type Value = H;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a multiproc {}", expected::<H>())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<H, A::Error> {
            use serde::de::Error as _;
            let missing = |i| A::Error::invalid_length(i, &self);
            let tag: Tag = seq.next_element()?.ok_or_else(|| missing(0))?;
            check_tag::<H>(&tag).map_err(A::Error::custom)?;
            let plain: H::Plain = seq.next_element()?.ok_or_else(|| missing(1))?;
            let size = H::mapping_size(&plain).map_err(|e| A::Error::custom(reason(&e)))?;
            if tag.size != size as u64 {
                return Err(A::Error::custom(format!(
                    "a {} announces a shared mapping of {} bytes where its type needs {size}",
                    expected::<H>(),
                    tag.size
                )));
            }
            let place = Place {
                offset: tag.offset,
                stamp: tag.stamp,
            };
            if !place.is_cell() && place.offset != 0 {
                return Err(A::Error::custom(format!(
                    "a {} of a memfd of its own announces an offset ({})",
                    expected::<H>(),
                    place.offset
                )));
            }
            let slots: [Option<u32>; SLOTS] = seq.next_element()?.ok_or_else(|| missing(2))?;
            let mut fds = Received {
                kind: H::KIND,
                slots,
                size,
                place,
                kind_word: kind_word::<H>(),
            };
            H::rebuild(plain, &mut fds).map_err(|e| A::Error::custom(reason(&e)))
        }
    }

    deserializer.deserialize_tuple(3, HandleVisitor::<H>(PhantomData))
}

/// Implements `Serialize` and `Deserialize` for a [`HandleWire`] type, with
/// [`serialize`] and [`deserialize`]: `handle_serde!([T] Queue<T>)`,
/// `handle_serde!([] Lock)`. The brackets hold the impl's generics.
macro_rules! handle_serde {
    ([$($g:tt)*] $ty:ty) => {
        impl<$($g)*> ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                $crate::handle::serialize(self, serializer)
            }
        }

        impl<'de, $($g)*> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(
                deserializer: D,
            ) -> ::std::result::Result<Self, D::Error> {
                $crate::handle::deserialize(deserializer)
            }
        }
    };
}
pub(crate) use handle_serde;

/// The whole wire form of a handle that is one fixed-size [`Block`] and
/// nothing else (`struct $ty { map: Arc<Block> }`): `mapped_handle!(Lock,
/// LOCK_BYTES)`.
macro_rules! mapped_handle {
    ($ty:ident, $bytes:expr) => {
        impl $crate::handle::HandleWire for $ty {
            const KIND: $crate::handle::Kind = $crate::handle::Kind::$ty;
            type Elem = ();
            type Plain = ();

            fn parts(&self) -> $crate::error::Result<$crate::handle::Parts<'_, ()>> {
                Ok($crate::handle::Parts::block(&self.map, ()))
            }

            fn mapping_size((): &()) -> $crate::error::Result<usize> {
                Ok($bytes)
            }

            fn rebuild(
                (): (),
                fds: &mut $crate::handle::Received,
            ) -> $crate::error::Result<Self> {
                Ok($ty { map: fds.block()? })
            }
        }

        $crate::handle::handle_serde!([] $ty);
    };
}
pub(crate) use mapped_handle;

#[cfg(test)]
mod tests;
