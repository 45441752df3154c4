//! Shared arenas of small objects: the memory of every `Lock`, `Value`,
//! `Event`... up to [`MAX_OBJECT`] bytes, so that a process holds one
//! descriptor per arena (1 MiB, thousands of objects) instead of one per
//! object. (Not the pool's data arenas, nor a queue's payload arena: those
//! are `pool::arena` and the queue ring's.)
//!
//! # Layout
//!
//! An arena is a sealed memfd of [`ARENA_BYTES`], cut into cells of one
//! size: 64-byte lines times a power of two (1 to 64 lines: a class per
//! size). An object takes the smallest cell that holds it and a 16-byte
//! trailer, so two objects never share a cache line, and its bytes start on
//! a line (any `T` aligned to at most 64 fits). Larger objects, or ones
//! aligned to more, keep a memfd of their own ([`Block`] with no cell).
//!
//! | bytes | what |
//! | --- | --- |
//! | 0..8 | magic |
//! | 8..16 | geometry: cell size (low half), cell count (high half) |
//! | 64.. | the cells |
//!
//! Each cell ends with its trailer: a stamp (`u64`, 0 while the cell is
//! free), the object's kind fingerprint (`u32`) and its length (`u32`),
//! written by the arena's creator when it allocates the cell, before any
//! handle to it can leave the process. The trailer is never part of the
//! object's [`Region`].
//!
//! # Who allocates, and when a cell is reused
//!
//! Only the process that created an arena allocates from it, and all its
//! allocation state (the never-used tail, the free cells, which cell is
//! whose) is in that process's memory, under a mutex: nothing in the
//! shared bytes steers an allocation. A creation is a pop from a `Vec` and
//! three stores, where an object of its own costs a `memfd_create`, an
//! `ftruncate`, a seal and an `mmap`.
//!
//! A cell is reused only if its object never left the process: the first
//! time a handle of it is serialized ([`Block::sent`]) the object is marked
//! shared, and a shared object's cell is never handed out again, even after
//! the creator dropped it (it may still be in use elsewhere, or in a
//! message in flight). Its memory comes back with its whole arena: the
//! kernel frees a memfd once no process maps it or holds its descriptor,
//! and a process unmaps an arena when it holds none of its objects (the
//! creator keeps its current arena of each class). So:
//!
//! - creating and dropping objects in a loop reuses one cell;
//! - objects that were sent cost their cell until their arena is given up
//!   by every process: a long-lived shared object keeps its whole arena
//!   (1 MiB, one descriptor per process holding it) alive;
//! - a process killed while it holds objects changes nothing for the
//!   others: there are no counts or lists in the shared bytes for it to
//!   leave half-updated. Its arenas live on in the processes that map
//!   them.
//!
//! This is simpler than the first design of this module (a free list and
//! cross-process reference counts in the shared bytes, counts added on
//! send and given back by a journal of the codec): that one reused shared
//! cells, but a count could be lost or taken twice by paths that decode
//! one message twice or never (a pool chunk sent again to another worker,
//! a queue dropped with messages in it), and a miscounted cell is reused
//! while another process uses it. Here no protocol runs across processes,
//! so there is no such failure and nothing for loom to check.
//!
//! # What a received handle is checked against
//!
//! The receiver learns the arena's file from its descriptor (`fstat`: a
//! file this process already maps is not mapped again, and the descriptor
//! that came is closed with the message); a new arena must be a sealed
//! memfd of exactly [`ARENA_BYTES`] with a valid header (its geometry is
//! then read once and kept: a peer rewriting the header later changes
//! nothing here), and must not be mapped by this process as anything else
//! (see `shm::Role`). The handle names a cell by offset and stamp: the
//! offset must be a cell's start in this arena, the object's size one this
//! arena's class holds, and the trailer must hold that stamp, that kind
//! and that length. A forged offset or size is an error, never an access
//! outside the arena nor an alias of part of another cell.
//!
//! Within this process, one more rule holds whatever the shared memory
//! says: a cell is used by at most one object (the per-arena table of the
//! process's live blocks, consulted under the arena's mutex on every
//! allocation and receipt). A received handle naming a cell this process
//! holds as another object is refused, and so is one naming a cell of this
//! process's own arenas that it never allocated or holds free. So no two
//! objects of this process ever overlap, which is what the locked slices
//! of an `Array` and the single width of each atomic rest on. What a peer
//! that maps an arena can do is what it could always do to shared memory:
//! write wrong values into it.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use super::shm::{FileId, Mapping, Region, Role};

/// Bytes of every arena.
pub(crate) const ARENA_BYTES: usize = 1 << 20;
/// A cache line: the unit of cells.
const LINE: usize = 64;
/// Cells of 1, 2, 4 ... 64 lines.
const CLASSES: usize = 7;
/// The stamp, kind and length at the end of every cell.
const TRAILER: usize = 16;
/// The largest object kept in an arena; larger ones have their own memfd.
pub(crate) const MAX_OBJECT: usize = (LINE << (CLASSES - 1)) - TRAILER;
/// The strictest alignment an object in an arena may need.
pub(crate) const MAX_ALIGN: usize = LINE;

const MAGIC: u64 = u64::from_le_bytes(*b"mparena2");
// The header's words (u64 indices).
const H_MAGIC: usize = 0;
const H_GEOMETRY: usize = 1;
/// Where the cells start.
const CELLS_AT: usize = LINE;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The class of an object of `len` bytes aligned to `align`: the smallest
/// cell that holds it and its trailer; `None` if it needs its own memfd.
pub(crate) fn class_for(len: usize, align: usize) -> Option<usize> {
    if len == 0 || len > MAX_OBJECT || align > MAX_ALIGN {
        return None;
    }
    let lines = (len + TRAILER).div_ceil(LINE).next_power_of_two();
    Some(lines.trailing_zeros() as usize)
}

/// Cell size and cell count of an arena of `class`.
fn geometry(class: usize) -> (usize, u32) {
    let cell = LINE << class;
    (cell, ((ARENA_BYTES - CELLS_AT) / cell) as u32)
}

fn geometry_word(class: usize) -> u64 {
    let (cell, cells) = geometry(class);
    cell as u64 | (u64::from(cells) << 32)
}

/// A stamp for a newly allocated cell: never 0, and different for every
/// allocation of this process (a bijection of a counter, seeded per
/// process so that two processes rarely agree), so that a handle that names
/// a cell which was freed and allocated again, or another cell than the one
/// it was sent for, is told apart.
fn new_stamp() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        (u64::from(std::process::id()) << 32) ^ nanos
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut z = (seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

/// Where a handle's memory is, on the wire: a cell of an arena (its offset
/// and stamp) or a memfd of its own ([`Place::OWN`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    /// Byte offset of the cell in its arena (0 for an own memfd).
    pub(crate) offset: u64,
    /// The cell's stamp (0: an own memfd).
    pub(crate) stamp: u64,
}

impl Place {
    /// A memfd of the object's own.
    pub(crate) const OWN: Place = Place {
        offset: 0,
        stamp: 0,
    };

    /// A cell of an arena (the descriptor then names the arena).
    pub(crate) fn is_cell(self) -> bool {
        self.stamp != 0
    }
}

/// What this process knows of one cell.
#[derive(Debug, Default)]
enum Slot {
    /// Never allocated here (in an arena of this process), or not held
    /// (in a received one).
    #[default]
    Vacant,
    /// Free, in the arena's free list (arenas of this process only).
    Free,
    /// An object of this process; the `Weak` is dead while it is dropped.
    Live(Weak<Block>),
    /// Its object was shared and is no longer held here: never reused
    /// (arenas of this process only).
    Left,
}

/// The allocation state of an arena, in this process's memory only.
#[derive(Debug, Default)]
struct Cells {
    /// By cell index; cells past the end are vacant.
    slots: Vec<Slot>,
    /// Cells to reuse (arenas of this process only).
    free: Vec<u32>,
    /// Cells handed out so far from the never-used tail.
    fresh: u32,
}

impl Cells {
    fn slot(&mut self, index: u32) -> &mut Slot {
        let i = index as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, Slot::default);
        }
        &mut self.slots[i]
    }
}

/// One arena, as this process maps it.
pub(crate) struct Arena {
    map: Arc<Mapping>,
    class: usize,
    /// Cell size in bytes, read once (checked) when the arena was created
    /// or received; the header's copy is never trusted again.
    cell: usize,
    cells: u32,
    /// This process created it, and alone allocates from it.
    owned: bool,
    state: Mutex<Cells>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("cell", &self.cell)
            .field("cells", &self.cells)
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

/// The process's arenas by file, so that each is mapped once however many
/// of its objects arrive (its own ones too, when they come back), and
/// every object of it here is checked against the same table of cells.
static ARENAS: Mutex<BTreeMap<FileId, Weak<Arena>>> = Mutex::new(BTreeMap::new());

/// Where a class's objects are allocated in this process.
struct Pool {
    /// The arena allocated from until it is full (kept mapped, so that
    /// creating and dropping objects in a loop never creates arenas).
    current: Option<Arc<Arena>>,
    /// The other arenas of the class this process created and still maps:
    /// tried when the current one is full.
    others: Vec<Weak<Arena>>,
}

static POOLS: [Mutex<Pool>; CLASSES] = [const {
    Mutex::new(Pool {
        current: None,
        others: Vec::new(),
    })
}; CLASSES];

// Lock order: a pool, then ARENAS, then an arena's cells, then `shm`'s
// table of mapped files.

fn remember(arenas: &mut BTreeMap<FileId, Weak<Arena>>, arena: &Arc<Arena>) {
    arenas.insert(arena.map.id(), Arc::downgrade(arena));
    if arenas.len() % 64 == 0 {
        arenas.retain(|_, a| a.strong_count() > 0);
    }
}

impl Arena {
    /// A new arena of `class`, registered.
    fn create(class: usize) -> io::Result<Arc<Arena>> {
        let map = Arc::new(Mapping::create_as(
            "multiproc-arena",
            ARENA_BYTES,
            Role::Arena,
        )?);
        let words = map.atomics_u64();
        words[H_GEOMETRY].store(geometry_word(class), Ordering::Relaxed);
        words[H_MAGIC].store(MAGIC, Ordering::Relaxed);
        let arena = Arc::new(Arena::new(map, class, true));
        remember(&mut lock(&ARENAS), &arena);
        Ok(arena)
    }

    /// A received arena's mapping, checked: the magic, and a geometry that
    /// is one of a class.
    fn open(map: Arc<Mapping>) -> io::Result<Arena> {
        let words = map.atomics_u64();
        let (magic, geometry) = match (words.get(H_MAGIC), words.get(H_GEOMETRY)) {
            (Some(m), Some(g)) => (m.load(Ordering::Relaxed), g.load(Ordering::Relaxed)),
            _ => return Err(invalid("an arena without its header")),
        };
        if magic != MAGIC {
            return Err(invalid(
                "refused an arena of small objects whose header is not one",
            ));
        }
        let class = (0..CLASSES)
            .find(|&c| geometry_word(c) == geometry)
            .ok_or_else(|| invalid(format!("refused an arena of geometry {geometry:#x}")))?;
        Ok(Arena::new(map, class, false))
    }

    fn new(map: Arc<Mapping>, class: usize, owned: bool) -> Arena {
        let (cell, cells) = geometry(class);
        Arena {
            map,
            class,
            cell,
            cells,
            owned,
            state: Mutex::new(Cells::default()),
        }
    }

    /// Byte offset of cell `index` (below `cells`).
    fn cell_at(&self, index: u32) -> usize {
        CELLS_AT + index as usize * self.cell
    }

    /// The trailer of cell `index` (below `cells`, so inside the arena):
    /// stamp, kind, length.
    fn trailer(&self, index: u32) -> (&AtomicU64, &AtomicU32, &AtomicU32) {
        let at = self.cell_at(index) + self.cell - TRAILER;
        let words = self.map.atomics_u32();
        (
            &self.map.atomics_u64()[at / 8],
            &words[at / 4 + 2],
            &words[at / 4 + 3],
        )
    }

    /// A new object of `len` bytes (its class's) and kind `kind` here;
    /// `None` if the arena is full.
    fn alloc(self: &Arc<Self>, len: usize, kind: u32) -> io::Result<Option<Arc<Block>>> {
        let mut cells = lock(&self.state);
        let (index, reused) = match cells.free.pop() {
            Some(index) => (index, true),
            None if cells.fresh < self.cells => {
                cells.fresh += 1;
                (cells.fresh - 1, false)
            }
            None => return Ok(None),
        };
        let at = self.cell_at(index);
        if reused {
            // Its last object never left this process and is gone: no one
            // else touches these bytes.
            Region::new(Arc::clone(&self.map), at, self.cell - TRAILER)?.zero();
        }
        let region = Region::new(Arc::clone(&self.map), at, len)?;
        let stamp = new_stamp();
        let (stamp_word, kind_word, len_word) = self.trailer(index);
        kind_word.store(kind, Ordering::Relaxed);
        len_word.store(len as u32, Ordering::Relaxed);
        stamp_word.store(stamp, Ordering::Release);
        let block = Arc::new(Block {
            region,
            cell: Some(Cell {
                arena: Arc::clone(self),
                index,
                stamp,
                kind,
            }),
            shared: AtomicBool::new(false),
        });
        *cells.slot(index) = Slot::Live(Arc::downgrade(&block));
        Ok(Some(block))
    }

    /// The object a received handle names: the cell at `offset`, of `len`
    /// bytes, stamped `stamp`, of kind `kind`.
    fn adopt(
        self: &Arc<Self>,
        offset: usize,
        len: usize,
        stamp: u64,
        kind: u32,
    ) -> io::Result<Arc<Block>> {
        let index = offset
            .checked_sub(CELLS_AT)
            .filter(|rel| rel % self.cell == 0)
            .map(|rel| rel / self.cell)
            .filter(|&i| i < self.cells as usize)
            .ok_or_else(|| {
                invalid(format!(
                    "refused a handle at byte {offset} of an arena, which is not where one of its \
                     cells of {} bytes starts",
                    self.cell
                ))
            })? as u32;
        if class_for(len, 1) != Some(self.class) {
            return Err(invalid(format!(
                "refused a handle of {len} bytes in an arena of cells of {} bytes",
                self.cell
            )));
        }
        let mut cells = lock(&self.state);
        match cells.slot(index) {
            Slot::Live(held) => {
                if let Some(block) = held.upgrade() {
                    let same = block.len() == len
                        && block
                            .cell
                            .as_ref()
                            .is_some_and(|c| c.stamp == stamp && c.kind == kind);
                    if !same {
                        // `block` may be the last handle (its other ones
                        // dropped meanwhile): its drop takes `cells`.
                        drop(cells);
                        drop(block);
                        return Err(invalid(
                            "refused a handle naming a cell that this process holds as another \
                             object",
                        ));
                    }
                    block.sent();
                    return Ok(block);
                }
                // Being dropped on another thread: the new block takes the
                // slot, and the dying one leaves the cell alone (it is then
                // never reused here, see `Block::drop`).
            }
            Slot::Vacant | Slot::Free if self.owned => {
                return Err(invalid(
                    "refused a handle naming a cell of this process's arena that holds no object",
                ));
            }
            Slot::Vacant | Slot::Free | Slot::Left => {}
        }
        let (stamp_word, kind_word, len_word) = self.trailer(index);
        if stamp_word.load(Ordering::Acquire) != stamp {
            return Err(invalid(
                "refused a handle naming a cell that holds no such object (a stale or forged \
                 handle)",
            ));
        }
        if kind_word.load(Ordering::Relaxed) != kind
            || len_word.load(Ordering::Relaxed) as usize != len
        {
            return Err(invalid(
                "refused a handle naming a cell that holds another kind of object",
            ));
        }
        let region = Region::new(Arc::clone(&self.map), self.cell_at(index), len)?;
        let block = Arc::new(Block {
            region,
            cell: Some(Cell {
                arena: Arc::clone(self),
                index,
                stamp,
                kind,
            }),
            shared: AtomicBool::new(true),
        });
        *cells.slot(index) = Slot::Live(Arc::downgrade(&block));
        Ok(block)
    }

    /// The last handle here of `block`, the object of cell `index`, is
    /// gone.
    fn release(&self, index: u32, block: *const Block, shared: bool) {
        let mut cells = lock(&self.state);
        let slot = cells.slot(index);
        if !matches!(slot, Slot::Live(held) if std::ptr::eq(held.as_ptr(), block)) {
            // A received handle took the cell while this one was dropped.
            return;
        }
        if !self.owned {
            *slot = Slot::Vacant;
        } else if shared {
            *slot = Slot::Left;
        } else {
            *slot = Slot::Free;
            self.trailer(index).0.store(0, Ordering::Relaxed);
            cells.free.push(index);
        }
    }
}

/// A cell this process holds.
#[derive(Debug)]
struct Cell {
    arena: Arc<Arena>,
    index: u32,
    stamp: u64,
    kind: u32,
}

/// The memory of one shared object in this process: a cell of an arena,
/// or a memfd of its own. Handles hold it in an `Arc` (a clone is another
/// handle to the same object); it derefs to its [`Region`].
#[derive(Debug)]
pub(crate) struct Block {
    region: Region,
    cell: Option<Cell>,
    /// A handle of it was serialized (or it arrived from another process):
    /// its cell is never reused by this process.
    shared: AtomicBool,
}

impl std::ops::Deref for Block {
    type Target = Region;

    #[inline]
    fn deref(&self) -> &Region {
        &self.region
    }
}

impl Block {
    /// An object that is the whole of `map`.
    fn own(map: Arc<Mapping>) -> Block {
        Block {
            region: Region::whole(map),
            cell: None,
            shared: AtomicBool::new(false),
        }
    }

    /// Where it is, for its handle's wire form.
    pub(crate) fn place(&self) -> Place {
        match &self.cell {
            Some(cell) => Place {
                offset: self.region.offset() as u64,
                stamp: cell.stamp,
            },
            None => Place::OWN,
        }
    }

    /// The descriptor its handle sends: its arena's, or its own memfd's.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.region.mapping().fd()
    }

    /// The file [`fd`](Block::fd) names (a message sends each arena once).
    pub(crate) fn file(&self) -> FileId {
        self.region.mapping().id()
    }

    /// Marks the object as shared: a handle of it is being serialized, so
    /// its cell is never reused here.
    pub(crate) fn sent(&self) {
        self.shared.store(true, Ordering::Relaxed);
    }

    /// Is it a cell of an arena?
    pub(crate) fn in_arena(&self) -> bool {
        self.cell.is_some()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(cell) = &self.cell {
            let shared = self.shared.load(Ordering::Relaxed);
            let this: *const Block = &*self;
            cell.arena.release(cell.index, this, shared);
        }
    }
}

/// A new zero-filled object of `len` bytes aligned to `align`, of kind
/// `kind`: a cell of an arena if it fits one, else a memfd of its own
/// named `name`.
pub(crate) fn create(name: &str, len: usize, align: usize, kind: u32) -> io::Result<Arc<Block>> {
    let Some(class) = class_for(len, align) else {
        return Ok(Arc::new(Block::own(Arc::new(Mapping::create(name, len)?))));
    };
    let mut pool = lock(&POOLS[class]);
    if let Some(current) = &pool.current {
        if let Some(block) = current.alloc(len, kind)? {
            return Ok(block);
        }
    }
    pool.others.retain(|a| a.strong_count() > 0);
    let mut found = None;
    for (i, arena) in pool.others.iter().enumerate() {
        if let Some(arena) = arena.upgrade() {
            if let Some(block) = arena.alloc(len, kind)? {
                found = Some((i, arena, block));
                break;
            }
        }
    }
    let (arena, block) = match found {
        Some((i, arena, block)) => {
            pool.others.swap_remove(i);
            (arena, block)
        }
        None => {
            let arena = Arena::create(class)?;
            let block = arena
                .alloc(len, kind)?
                .ok_or_else(|| invalid("a new arena had no free cell"))?;
            (arena, block)
        }
    };
    if let Some(full) = pool.current.replace(arena) {
        pool.others.push(Arc::downgrade(&full));
    }
    Ok(block)
}

/// The arena whose memfd `fd` is (received, still the message's): the one
/// this process maps, or a newly mapped and checked one.
fn arena_of(fd: BorrowedFd<'_>) -> io::Result<Arc<Arena>> {
    let id = FileId::of(fd)?;
    let mut arenas = lock(&ARENAS);
    if let Some(arena) = arenas.get(&id).and_then(Weak::upgrade) {
        return Ok(arena);
    }
    let map = Mapping::from_fd_sized_as(fd.try_clone_to_owned()?, ARENA_BYTES, Role::Arena)?;
    if map.id() != id {
        return Err(invalid("a shared memory changed identity while mapped"));
    }
    let arena = Arc::new(Arena::open(Arc::new(map))?);
    remember(&mut arenas, &arena);
    Ok(arena)
}

/// The object a received handle names in an arena: `place` (a cell) in the
/// arena whose memfd is `fd` (still the message's: a duplicate is kept
/// only if this process did not map the file yet), `len` bytes of kind
/// `kind`. Every check of the module docs comes first.
pub(crate) fn receive_cell(
    fd: BorrowedFd<'_>,
    place: Place,
    len: usize,
    kind: u32,
) -> io::Result<Arc<Block>> {
    let offset = usize::try_from(place.offset).map_err(|_| invalid("offset out of range"))?;
    if !place.is_cell() {
        return Err(invalid("a handle of an arena without a stamp"));
    }
    arena_of(fd)?.adopt(offset, len, place.stamp, kind)
}

/// The object a received handle names that has a memfd of its own, `fd`,
/// which must have exactly `len` bytes (and be no arena of this process).
pub(crate) fn receive_own(fd: OwnedFd, len: usize) -> io::Result<Arc<Block>> {
    let block = Block::own(Arc::new(Mapping::from_fd_sized(fd, len)?));
    block.sent();
    Ok(Arc::new(block))
}

#[cfg(test)]
mod tests;
