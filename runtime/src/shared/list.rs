//! [`ShareableList`]: CPython's `shared_memory.ShareableList`.
//!
//! The layout of the block (all integers little-endian; see
//! ARCHITECTURE.md):
//!
//! ```text
//! 0        8 bytes   magic "mpSList1" (written last, when the list is whole)
//! 8        u64       n, the number of items
//! 16       n × 8     per item: its slot's offset (u32) and capacity (u32)
//! offset   8         the slot's header: tag (u8), 3 zero bytes, len (u32)
//! +8       capacity  the slot's data (len bytes used)
//! ```
//!
//! Slots are 8-byte aligned; a number, a boolean or `None` has 8 bytes of
//! data, a string or bytes the next multiple of 8 of its length (at least
//! 8), fixed when the list is created. Tags: 0 `None`, 1 int (`i64`), 2
//! float (`f64`), 3 bool, 4 str (UTF-8), 5 bytes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::memory::SharedMemory;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"mpSList1";
const HEADER: usize = 16;
const SLOT_HEADER: usize = 8;
/// Bytes of data of a slot holding a number, a boolean or `None`.
const WORD: usize = 8;

const TAG_NONE: u8 = 0;
const TAG_INT: u8 = 1;
const TAG_FLOAT: u8 = 2;
const TAG_BOOL: u8 = 3;
const TAG_STR: u8 = 4;
const TAG_BYTES: u8 = 5;

/// One item of a [`ShareableList`]: the types CPython's `ShareableList`
/// holds.
#[derive(Debug, Clone, PartialEq)]
pub enum ListItem {
    /// Python's `None`.
    None,
    /// An integer (CPython's are 64-bit there too).
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string, stored as UTF-8.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

impl ListItem {
    /// The tag and the data bytes of the item.
    fn encode(&self) -> (u8, Vec<u8>) {
        match self {
            ListItem::None => (TAG_NONE, Vec::new()),
            ListItem::Int(v) => (TAG_INT, v.to_le_bytes().to_vec()),
            ListItem::Float(v) => (TAG_FLOAT, v.to_le_bytes().to_vec()),
            ListItem::Bool(v) => (TAG_BOOL, vec![u8::from(*v)]),
            ListItem::Str(s) => (TAG_STR, s.as_bytes().to_vec()),
            ListItem::Bytes(b) => (TAG_BYTES, b.clone()),
        }
    }

    /// The data bytes a slot made for this item holds.
    fn capacity(&self) -> usize {
        match self {
            ListItem::Str(s) => s.len().div_ceil(WORD).max(1) * WORD,
            ListItem::Bytes(b) => b.len().div_ceil(WORD).max(1) * WORD,
            _ => WORD,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ListItem::None => "None",
            ListItem::Int(_) => "an int",
            ListItem::Float(_) => "a float",
            ListItem::Bool(_) => "a bool",
            ListItem::Str(_) => "a str",
            ListItem::Bytes(_) => "bytes",
        }
    }
}

macro_rules! item_from {
    ($($t:ty => |$v:ident| $e:expr),* $(,)?) => {$(
        impl From<$t> for ListItem {
            fn from($v: $t) -> ListItem {
                $e
            }
        }
    )*};
}

item_from!(
    i64 => |v| ListItem::Int(v),
    i32 => |v| ListItem::Int(i64::from(v)),
    u32 => |v| ListItem::Int(i64::from(v)),
    f64 => |v| ListItem::Float(v),
    bool => |v| ListItem::Bool(v),
    &str => |v| ListItem::Str(v.to_string()),
    String => |v| ListItem::Str(v),
    Vec<u8> => |v| ListItem::Bytes(v),
    &[u8] => |v| ListItem::Bytes(v.to_vec()),
    () => |_v| ListItem::None,
);

/// A fixed-length list of numbers, booleans, short strings, bytes and
/// `None` in one [`SharedMemory`] block found by name: CPython's
/// `multiprocessing.shared_memory.ShareableList`.
///
/// The length and each slot's storage are fixed when the list is made: a
/// slot holds 8 bytes of data for a number, a boolean or `None`, and the
/// next multiple of 8 of the length of a string or bytes (at least 8). Any
/// item that fits may be [`set`](ShareableList::set) in any slot (as in
/// CPython); a longer one is refused with an error that names the slot
/// and both sizes. Unlike CPython, strings and bytes keep their trailing
/// NUL bytes (each slot records the length used).
///
/// There is no lock, as in CPython: a [`get`](ShareableList::get) that
/// races a `set` of the same slot may see a mix of both items (it re-reads
/// until two reads agree, which hides most races but not all), and a slot
/// whose bytes do not decode (a writer killed mid-`set`) is an
/// [`Error::Decode`], never undefined behaviour. Guard the list with a
/// [`Lock`](crate::Lock) when writers and readers overlap.
///
/// The name works as a [`SharedMemory`]'s: [`open`](ShareableList::open)
/// finds it, [`unlink`](ShareableList::unlink) from any handle removes it.
/// A `ShareableList` also travels as an argument or a message, as its
/// block.
///
/// # Examples
///
/// ```
/// use multiproc::shared::{ListItem, ShareableList};
///
/// let list = ShareableList::new(&[
///     ListItem::from(7i64),
///     ListItem::from(2.5),
///     ListItem::from(true),
///     ListItem::from("howdy"),
///     ListItem::from(&b"raw"[..]),
///     ListItem::None,
/// ])?;
/// list.set(0, 8i64)?;
/// list.set(3, "hi there")?; // 8 bytes: fits the slot made for "howdy"
/// assert!(list.set(3, "too long for it").is_err());
/// let other = ShareableList::open(list.name())?;
/// assert_eq!(other.get(0)?, ListItem::Int(8));
/// assert_eq!(other.get(3)?, ListItem::Str("hi there".into()));
/// other.unlink()?; // a consumer may unlink what a producer created
/// assert!(list.unlink().is_err()); // gone already
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct ShareableList {
    shm: SharedMemory,
    /// Each item's slot: its offset and its data capacity, read and
    /// checked once when the handle was made.
    slots: Vec<(usize, usize)>,
}

impl ShareableList {
    /// Creates a list named `name` holding `items` (CPython's
    /// `ShareableList(items, name=name)`).
    ///
    /// # Errors
    ///
    /// As [`SharedMemory::create`] (a malformed or taken name...);
    /// [`Error::InvalidArgument`] if an item is larger than 4 GiB.
    pub fn create(name: &str, items: &[ListItem]) -> Result<ShareableList> {
        let size = Self::size_for(items)?;
        Self::fill(SharedMemory::create(name, size)?, items)
    }

    /// Creates a list holding `items` under a fresh unique name (CPython's
    /// `ShareableList(items)`); [`name`](ShareableList::name) tells it.
    ///
    /// # Errors
    ///
    /// As [`SharedMemory::new`]; [`Error::InvalidArgument`] if an item is
    /// larger than 4 GiB.
    pub fn new(items: &[ListItem]) -> Result<ShareableList> {
        let size = Self::size_for(items)?;
        Self::fill(SharedMemory::new(size)?, items)
    }

    /// Opens the list named `name` (CPython's `ShareableList(name=name)`).
    ///
    /// # Errors
    ///
    /// As [`SharedMemory::open`]; [`Error::InvalidArgument`] if the block
    /// is not a whole `ShareableList` (another kind of block, one not yet
    /// filled by its creator, or a layout that does not fit the block).
    pub fn open(name: &str) -> Result<ShareableList> {
        Self::from_shared_memory(SharedMemory::open(name)?)
    }

    /// The list in `shm`, checked.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the block is not a whole
    /// `ShareableList`.
    pub fn from_shared_memory(shm: SharedMemory) -> Result<ShareableList> {
        let bad = |why: &str| {
            Error::invalid(format!(
                "shared memory {:?} is not a ShareableList: {why}",
                shm.name()
            ))
        };
        let size = shm.size();
        let mut head = [0u8; HEADER];
        if size < HEADER || shm.read(0, &mut head).is_err() {
            return Err(bad("too small"));
        }
        if &head[..8] != MAGIC {
            return Err(bad(
                "no ShareableList header (or its creator has not filled it yet)",
            ));
        }
        let n = u64::from_le_bytes(word(&head[8..16]));
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= (size - HEADER) / 8)
            .ok_or_else(|| bad("its item count does not fit the block"))?;
        let mut table = vec![0u8; n * 8];
        shm.read(HEADER, &mut table)
            .map_err(|_| bad("its item table does not fit the block"))?;
        let data_start = HEADER + n * 8;
        let mut slots = Vec::with_capacity(n);
        for (i, entry) in table.chunks_exact(8).enumerate() {
            let offset = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]) as usize;
            let capacity = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]) as usize;
            let end = offset
                .checked_add(SLOT_HEADER)
                .and_then(|e| e.checked_add(capacity));
            let fits = offset >= data_start
                && offset % 8 == 0
                && capacity % WORD == 0
                && capacity >= WORD
                && end.is_some_and(|e| e <= size);
            if !fits {
                return Err(bad(&format!("slot {i} lies outside the block")));
            }
            slots.push((offset, capacity));
        }
        Ok(ShareableList { shm, slots })
    }

    fn size_for(items: &[ListItem]) -> Result<usize> {
        let mut size = HEADER + items.len() * 8;
        for item in items {
            let cap = item.capacity();
            if u32::try_from(cap).is_err() {
                return Err(Error::invalid(
                    "a ShareableList item is at most 4 GiB (its slot size is a u32)",
                ));
            }
            size = size
                .checked_add(SLOT_HEADER + cap)
                .ok_or_else(|| Error::invalid("ShareableList too large"))?;
        }
        if u32::try_from(size).is_err() {
            return Err(Error::invalid(
                "a ShareableList is at most 4 GiB (its slot offsets are u32)",
            ));
        }
        Ok(size)
    }

    fn fill(shm: SharedMemory, items: &[ListItem]) -> Result<ShareableList> {
        let mut table = Vec::with_capacity(items.len() * 8);
        let mut slots = Vec::with_capacity(items.len());
        let mut offset = HEADER + items.len() * 8;
        for item in items {
            let cap = item.capacity();
            // Both fit a u32: checked by `size_for`.
            table.extend_from_slice(&(offset as u32).to_le_bytes());
            table.extend_from_slice(&(cap as u32).to_le_bytes());
            slots.push((offset, cap));
            offset += SLOT_HEADER + cap;
        }
        let list = ShareableList { shm, slots };
        list.shm.write(8, &(items.len() as u64).to_le_bytes())?;
        list.shm.write(HEADER, &table)?;
        for (i, item) in items.iter().enumerate() {
            list.store(i, item)?;
        }
        // Last: an opener sees a whole list or none.
        list.shm.write(0, MAGIC)?;
        Ok(list)
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// `true` for a list of no items.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The bytes of data slot `i` holds (fixed when the list was made), or
    /// `None` if `i` is out of range.
    pub fn capacity(&self, i: usize) -> Option<usize> {
        self.slots.get(i).map(|&(_, cap)| cap)
    }

    fn slot(&self, i: usize) -> Result<(usize, usize)> {
        self.slots.get(i).copied().ok_or_else(|| {
            Error::invalid(format!(
                "index {i} out of range for a ShareableList of {} items",
                self.slots.len()
            ))
        })
    }

    /// Item `i` (Python's `list[i]`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `i` is out of range;
    /// [`Error::Decode`] if the slot's bytes are not an item (a writer
    /// killed mid-`set`, or bytes written through the block directly).
    pub fn get(&self, i: usize) -> Result<ListItem> {
        let (offset, cap) = self.slot(i)?;
        let mut bytes = vec![0u8; SLOT_HEADER + cap];
        let mut again = vec![0u8; SLOT_HEADER + cap];
        self.shm.read(offset, &mut bytes)?;
        // Re-read until two reads agree: a `set` racing this read shows as
        // a difference (most of the time; there is no lock).
        for _ in 0..8 {
            self.shm.read(offset, &mut again)?;
            if again == bytes {
                break;
            }
            std::mem::swap(&mut bytes, &mut again);
        }
        decode(i, &bytes)
    }

    /// Replaces item `i` (Python's `list[i] = item`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `i` is out of range, or if the item
    /// does not fit the slot (a string or bytes longer than its storage:
    /// CPython's `ValueError`).
    pub fn set(&self, i: usize, item: impl Into<ListItem>) -> Result<()> {
        self.store(i, &item.into())
    }

    fn store(&self, i: usize, item: &ListItem) -> Result<()> {
        let (offset, cap) = self.slot(i)?;
        let (tag, data) = item.encode();
        if data.len() > cap {
            return Err(Error::invalid(format!(
                "{} of {} bytes does not fit slot {i} of the ShareableList, which holds at most \
                 {cap} bytes (a slot's storage is fixed when the list is made, as in CPython)",
                item.kind(),
                data.len()
            )));
        }
        let mut bytes = Vec::with_capacity(SLOT_HEADER + data.len());
        bytes.extend_from_slice(&[tag, 0, 0, 0]);
        bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&data);
        self.shm.write(offset, &bytes)
    }

    /// Every item, in order.
    ///
    /// # Errors
    ///
    /// As [`get`](ShareableList::get).
    pub fn to_vec(&self) -> Result<Vec<ListItem>> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    /// How many items equal `item` (Python's `count`).
    ///
    /// # Errors
    ///
    /// As [`get`](ShareableList::get).
    pub fn count(&self, item: &ListItem) -> Result<usize> {
        Ok(self.to_vec()?.iter().filter(|x| *x == item).count())
    }

    /// The first index of `item` (Python's `index`, `None` where it raises
    /// `ValueError`).
    ///
    /// # Errors
    ///
    /// As [`get`](ShareableList::get).
    pub fn index(&self, item: &ListItem) -> Result<Option<usize>> {
        Ok(self.to_vec()?.iter().position(|x| x == item))
    }

    /// The block's name.
    pub fn name(&self) -> &str {
        self.shm.name()
    }

    /// The block (Python's `shm`).
    pub fn shm(&self) -> &SharedMemory {
        &self.shm
    }

    /// Removes the name, from any handle (see [`SharedMemory::unlink`]).
    ///
    /// # Errors
    ///
    /// As [`SharedMemory::unlink`]: an error if the name is gone already.
    pub fn unlink(&self) -> Result<()> {
        self.shm.unlink()
    }
}

fn word(bytes: &[u8]) -> [u8; 8] {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    w
}

/// The item in a slot's bytes (its header, then its data).
fn decode(i: usize, bytes: &[u8]) -> Result<ListItem> {
    let torn = |why: &str| Error::Decode {
        message: format!(
            "slot {i} of the ShareableList holds no item ({why}): written by something else, or \
             by a writer that died mid-set"
        ),
    };
    let tag = bytes[0];
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let data = bytes
        .get(SLOT_HEADER..SLOT_HEADER.saturating_add(len))
        .ok_or_else(|| torn("a length beyond its storage"))?;
    let fixed = |n: usize| {
        if len == n {
            Ok(())
        } else {
            Err(torn("a length that does not fit its type"))
        }
    };
    Ok(match tag {
        TAG_NONE => {
            fixed(0)?;
            ListItem::None
        }
        TAG_INT => {
            fixed(8)?;
            ListItem::Int(i64::from_le_bytes(word(data)))
        }
        TAG_FLOAT => {
            fixed(8)?;
            ListItem::Float(f64::from_le_bytes(word(data)))
        }
        TAG_BOOL => {
            fixed(1)?;
            match data[0] {
                0 => ListItem::Bool(false),
                1 => ListItem::Bool(true),
                _ => return Err(torn("a boolean that is neither 0 nor 1")),
            }
        }
        TAG_STR => ListItem::Str(
            String::from_utf8(data.to_vec()).map_err(|_| torn("a string that is not UTF-8"))?,
        ),
        TAG_BYTES => ListItem::Bytes(data.to_vec()),
        other => return Err(torn(&format!("unknown type tag {other}"))),
    })
}

impl fmt::Debug for ShareableList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareableList")
            .field("name", &self.name())
            .field("len", &self.len())
            .finish()
    }
}

/// Travels as its block (a [`SharedMemory`] handle), checked again on
/// arrival.
impl Serialize for ShareableList {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.shm.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ShareableList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let shm = SharedMemory::deserialize(deserializer)?;
        ShareableList::from_shared_memory(shm).map_err(serde::de::Error::custom)
    }
}
