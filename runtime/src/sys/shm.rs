//! Shared mappings backed by memfd: anonymous files that exist only while
//! a descriptor or a mapping refers to them, so nothing is ever left in
//! `/dev/shm` after a crash. They travel between processes as descriptors.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytemuck::Pod;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::MFdFlags;
use nix::sys::mman::{MapFlags, ProtFlags};

pub(crate) use super::lock::LOCK_HEADER;
use super::lock::{Header, RawGuard};
use std::io;

/// A refusal of this module that says why in words.
fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.into())
}

/// The size of the memfd `fd`, once it is known to be sealed against
/// shrinking. Only memfds created with `MFD_ALLOW_SEALING` can carry
/// `F_SEAL_SHRINK` (any other file answers `F_GET_SEALS` with EINVAL, or
/// with `F_SEAL_SEAL` alone for a tmpfs file), so the check also proves
/// that `fd` is a memfd.
fn sealed_len(fd: BorrowedFd<'_>) -> io::Result<(usize, FileId)> {
    let seals = match fcntl(fd, FcntlArg::F_GET_SEALS) {
        Ok(bits) => SealFlag::from_bits_retain(bits),
        Err(nix::errno::Errno::EINVAL) => {
            return Err(invalid(
                "refused a shared memory descriptor that is not a memfd",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if !seals.contains(SealFlag::F_SEAL_SHRINK) {
        return Err(invalid(
            "refused a shared memory descriptor that is not sealed against shrinking \
             (its holders could truncate it under this process's mapping)",
        ));
    }
    // Read after the seals: from here on the size can only grow.
    let stat = nix::sys::stat::fstat(fd)?;
    let len = usize::try_from(stat.st_size).map_err(|_| invalid("bad shared memory size"))?;
    if len == 0 {
        return Err(invalid("empty shared memory object"));
    }
    Ok((len, FileId::from_stat(&stat)))
}

/// Which file a descriptor names: its device and inode, as `fstat` gives
/// them. Two descriptors with the same `FileId` reach the same memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file `fd` refers to.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> io::Result<FileId> {
        let stat = nix::sys::stat::fstat(fd)?;
        Ok(FileId::from_stat(&stat))
    }

    fn from_stat(stat: &libc::stat) -> FileId {
        FileId {
            dev: stat.st_dev,
            ino: stat.st_ino,
        }
    }

    /// The two numbers, for a key that crosses no process boundary (the
    /// codec's per-message table of descriptors already sent).
    pub(crate) fn key(self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

/// A `MAP_SHARED` mapping of a whole memfd. Zero-filled when created.
///
/// # Access
///
/// Safely: atomics (`atomics_u8/u32/u64`, [`atomic_at`](Mapping::atomic_at))
/// and atomic copies ([`load_bytes`](Mapping::load_bytes),
/// [`Region::load_pods`], [`store_bytes`](Mapping::store_bytes)...), so a
/// race with another process is a torn value, never undefined behaviour.
/// In place: [`exclusive`](Mapping::exclusive) (a token for a range its
/// holder alone touches), [`view`](Mapping::view), the locked slices of a
/// [`Region`] (a lock guard is the proof) and the `bytes_unchecked` pair;
/// each unsafe one's caller says why its protocol rules out racing
/// accesses.
///
/// One rule the types do not enforce: racing atomic accesses of different
/// widths to the same bytes are undefined in Rust's memory model (as in
/// C++'s), so each layout gives every byte one width: `SharedMemory` bytes
/// only, a `Value<T>` or `RawArray<T>` the width `load_pods` derives from
/// `T`, queue and lock words their own word width, pool arena data
/// plain bytes (filled through an `exclusive` token, read in place by
/// `view`: both rule out racing accesses altogether), an arena's header and cell trailers their own words
/// (see `sys::arena`; a cell's bytes change width only between two
/// objects of its creator, the first of which never left that process and
/// is gone).
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
    id: FileId,
}

// SAFETY: the mapping is plain memory shared by design; every safe access
// goes through atomics or atomic copies; a plain reference into it comes
// only from an `unsafe fn` whose caller rules out racing accesses.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only hands out atomics and atomic copies
// safely.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A new zero-filled shared mapping of `len` bytes (at least 1).
    ///
    /// The memfd is sealed against shrinking, growing and further sealing
    /// before it is mapped: its size never changes, so no holder of the
    /// descriptor (here or in a process it was sent to) can truncate it
    /// under another holder's mapping (which would SIGBUS that holder).
    pub(crate) fn create(name: &str, len: usize) -> io::Result<Mapping> {
        Mapping::create_as(name, len, Role::Object)
    }

    /// As [`create`](Mapping::create), for a mapping used as `role`.
    pub(crate) fn create_as(name: &str, len: usize, role: Role) -> io::Result<Mapping> {
        let len = len.max(1);
        let cname =
            std::ffi::CString::new(name.replace('\0', "")).map_err(|_| invalid("bad name"))?;
        let fd = nix::sys::memfd::memfd_create(
            cname.as_c_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let off =
            libc::off_t::try_from(len).map_err(|_| invalid("shared memory size too large"))?;
        nix::unistd::ftruncate(&fd, off)?;
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        let id = FileId::of(fd.as_fd())?;
        Mapping::map(fd, len, id, role)
    }

    /// Maps the whole memfd `fd` (received from another process).
    ///
    /// Refused unless `fd` is a memfd sealed against shrinking (as
    /// [`create`](Mapping::create) makes them): a peer must not be able to
    /// hand over a file that it, or anyone else holding it, could truncate
    /// under this mapping. The seals are read before the size, so the size
    /// mapped can only have grown since (never shrunk): every mapped byte
    /// stays backed.
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Mapping> {
        let (len, id) = sealed_len(fd.as_fd())?;
        Mapping::map(fd, len, id, Role::Object)
    }

    /// As [`from_fd`](Mapping::from_fd), for a memfd that must have exactly
    /// `len` bytes (a handle's, whose size its kind and fields fix): any
    /// other size is refused before anything is mapped.
    pub(crate) fn from_fd_sized(fd: OwnedFd, len: usize) -> io::Result<Mapping> {
        Mapping::from_fd_sized_as(fd, len, Role::Object)
    }

    /// As [`from_fd_sized`](Mapping::from_fd_sized), for a mapping used as
    /// `role` (refused if this process maps the file in the other role).
    pub(crate) fn from_fd_sized_as(fd: OwnedFd, len: usize, role: Role) -> io::Result<Mapping> {
        let (found, id) = sealed_len(fd.as_fd())?;
        if found != len {
            return Err(invalid(format!(
                "shared memory of {found} bytes where {len} were expected"
            )));
        }
        Mapping::map(fd, len, id, role)
    }

    fn map(fd: OwnedFd, len: usize, id: FileId, role: Role) -> io::Result<Mapping> {
        let nz = std::num::NonZeroUsize::new(len).ok_or_else(|| invalid("empty mapping"))?;
        enter(id, role)?;
        // SAFETY: a fresh shared mapping at an address the kernel chooses
        // cannot overlap any Rust object; `fd` is a valid memfd of at least
        // `len` bytes.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .inspect_err(|_| leave(id))?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            fd,
            id,
        })
    }

    /// Size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The memfd, to send to another process.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The file this maps.
    pub(crate) fn id(&self) -> FileId {
        self.id
    }

    /// The whole mapping, for the accessors [`Span`] implements once.
    #[inline]
    fn span(&self) -> Span<'_> {
        Span {
            ptr: self.ptr,
            len: self.len,
            _mapping: PhantomData,
        }
    }

    /// The mapping as 32-bit atomics (lock words, counters).
    #[inline]
    pub(crate) fn atomics_u32(&self) -> &[AtomicU32] {
        self.span().atomics_u32()
    }

    /// The mapping as 64-bit atomics.
    #[inline]
    pub(crate) fn atomics_u64(&self) -> &[AtomicU64] {
        self.span().atomics_u64()
    }

    /// The mapping as byte atomics.
    pub(crate) fn atomics_u8(&self) -> &[AtomicU8] {
        self.span().atomics_u8()
    }

    /// The integer atomic `A` (one of std's `AtomicI32`, `AtomicU64`, ...)
    /// at byte `offset`, which must be aligned for it and in range.
    pub(crate) fn atomic_at<A: AtomicWord>(&self, offset: usize) -> io::Result<&A> {
        self.span().atomic_at(offset)
    }

    /// The right to read and write the `len` bytes at `offset` alone, for
    /// as long as the returned token lives: the payload of a queue slot
    /// that this process claimed (producer) or took (consumer). Its
    /// [`bytes`](Exclusive::bytes) and [`bytes_mut`](Exclusive::bytes_mut)
    /// are then safe: the token's existence is the proof. Out of range: an
    /// error.
    ///
    /// # Safety
    ///
    /// From this call until the token is dropped, nothing else accesses
    /// the range: no other thread or process, through no mapping of the
    /// memfd, and not through `self` either (its atomics, copies, or another
    /// token or view overlapping it). The caller must drop the token before
    /// it hands the range on (the release store that lets the next holder
    /// in), and any access that came before the token must happen-before
    /// this call (the acquire that gave the range to the caller).
    #[inline]
    pub(crate) unsafe fn exclusive(&self, offset: usize, len: usize) -> io::Result<Exclusive<'_>> {
        self.span().check(offset, len)?;
        Ok(Exclusive {
            ptr: NonNull::new(self.ptr.as_ptr().wrapping_add(offset))
                .ok_or_else(|| invalid("null shared memory range"))?,
            len,
            _mapping: PhantomData,
        })
    }

    /// `len` bytes at `offset`, borrowed for reading in place (a pool
    /// chunk's arguments in the worker, a chunk's results in the parent).
    /// Out of range: an error.
    ///
    /// # Safety
    ///
    /// While the returned slice lives, nothing writes any of these bytes:
    /// no thread or process, through no mapping of the memfd, and not
    /// through `self` (its atomics, [`store_bytes`](Mapping::store_bytes),
    /// a token); and every write made before the call happens-before it (a `&[u8]`
    /// promises the compiler that its bytes do not change). Other readers
    /// are allowed.
    pub(crate) unsafe fn view(&self, offset: usize, len: usize) -> io::Result<&[u8]> {
        self.span().check(offset, len)?;
        // SAFETY: the range was checked to lie inside the mapping, which
        // stays mapped while `&self` lives; u8 has no invalid values; no
        // writer touches the range while the slice lives (this function's
        // contract, passed on to its caller).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().wrapping_add(offset), len) })
    }

    /// The whole mapping as bytes, borrowed: `SharedMemory::as_slice`.
    ///
    /// # Safety
    ///
    /// While the returned slice lives, no process and no other mapping of
    /// the same memfd in this one may write any of these bytes, and no
    /// write may go through `self` either (its atomics, [`store_bytes`],
    /// a token...): a `&[u8]` promises the compiler that its bytes do not
    /// change.
    ///
    /// [`store_bytes`]: Mapping::store_bytes
    pub(crate) unsafe fn bytes_unchecked(&self) -> &[u8] {
        // SAFETY: `len` bytes lie inside the mapping, which stays mapped
        // while `&self` lives; u8 has no invalid values; no writer touches
        // them while the slice lives (this function's contract, passed on
        // to its caller).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole mapping as mutable bytes: `SharedMemory::as_mut_slice`.
    ///
    /// # Safety
    ///
    /// While the returned slice lives, no process and no other mapping of
    /// the same memfd in this one may read or write any of these bytes
    /// (`&mut self` already excludes every other access through `self`).
    pub(crate) unsafe fn bytes_unchecked_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes_unchecked`; `&mut self` excludes every
        // other borrow of this mapping, and the caller excludes every other
        // mapping's accesses while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The first byte of the mapping, as a raw pointer (valid for
    /// [`len`](Mapping::len) bytes while `self` lives). Using it is the
    /// caller's business, and `unsafe` there.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `out.len()` bytes from `offset` with relaxed atomic byte
    /// loads: a copy that races with a write of another process or handle
    /// reads a mix of old and new bytes, never undefined behaviour. Bytes,
    /// not words: `SharedMemory`'s safe surface uses one access width only,
    /// since racing atomic accesses of different sizes on the same bytes
    /// are undefined in Rust's memory model. Out of range: an error.
    pub(crate) fn load_bytes(&self, offset: usize, out: &mut [u8]) -> io::Result<()> {
        let span = self.span();
        span.check(offset, out.len())?;
        let cells = &span.atomics_u8()[offset..][..out.len()];
        for (byte, cell) in out.iter_mut().zip(cells) {
            *byte = cell.load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// Copies `data` to `offset` with relaxed atomic stores (see
    /// [`load_bytes`](Mapping::load_bytes)). Out of range: an error.
    pub(crate) fn store_bytes(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        let span = self.span();
        span.check(offset, data.len())?;
        let cells = &span.atomics_u8()[offset..][..data.len()];
        for (byte, cell) in data.iter().zip(cells) {
            cell.store(*byte, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// `len` bytes of a live mapping from `ptr`, for `'a`: the one
/// implementation of the accessors that [`Mapping`] (the whole of it) and
/// [`Region`] (one object's bytes of it) share.
///
/// Invariants, established by the two constructors ([`Mapping::span`],
/// [`Region::span`]) and relied on by every `unsafe` block here: the `len`
/// bytes from `ptr` lie inside one mapping that stays mapped for `'a` (the
/// span borrows its owner), and `ptr` is 64-byte aligned (a mapping starts
/// on a page, a region on a cell of 64-byte lines).
#[derive(Clone, Copy)]
struct Span<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _mapping: PhantomData<&'a Mapping>,
}

impl<'a> Span<'a> {
    #[inline]
    fn atomics_u32(self) -> &'a [AtomicU32] {
        // SAFETY: `ptr` is 64-byte aligned, `len / 4` whole words lie inside
        // the span, which stays mapped for `'a` (the type's invariants), and
        // AtomicU32 has u32's layout and permits shared mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU32>(), self.len / 4) }
    }

    #[inline]
    fn atomics_u64(self) -> &'a [AtomicU64] {
        // SAFETY: as for `atomics_u32`, with 8-byte words (the 64-byte
        // alignment covers 8).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    #[inline]
    fn atomics_u8(self) -> &'a [AtomicU8] {
        // SAFETY: `len` bytes lie inside the span, which stays mapped for
        // `'a`; AtomicU8 has u8's layout and permits shared mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU8>(), self.len) }
    }

    #[inline]
    fn check(self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(invalid(format!(
                "range {offset}..{} outside shared memory of {} bytes",
                offset.saturating_add(len),
                self.len
            ))),
        }
    }

    #[inline]
    fn atomic_at<A: AtomicWord>(self, offset: usize) -> io::Result<&'a A> {
        self.check(offset, std::mem::size_of::<A>())?;
        if offset % std::mem::align_of::<A>() != 0 {
            return Err(invalid("misaligned atomic in shared memory"));
        }
        // SAFETY: the range was checked to lie inside the span and the
        // offset to be aligned for `A` (the base is 64-byte aligned, and no
        // integer atomic is aligned to more); `A` is one of std's integer
        // atomics (sealed trait), which have their integer's layout and
        // permit shared mutation through `&A`; the span stays mapped for
        // `'a`.
        Ok(unsafe { &*self.ptr.as_ptr().wrapping_add(offset).cast::<A>() })
    }

    fn load_pods<T: Pod>(self, offset: usize, out: &mut [T]) -> io::Result<()> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        self.check(offset, bytes.len())?;
        match word_width(std::mem::size_of::<T>(), offset) {
            8 => {
                let words = &self.atomics_u64()[offset / 8..][..bytes.len() / 8];
                for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
                    chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
                }
            }
            4 => {
                let words = &self.atomics_u32()[offset / 4..][..bytes.len() / 4];
                for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
                    chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
                }
            }
            _ => {
                let cells = &self.atomics_u8()[offset..][..bytes.len()];
                for (byte, cell) in bytes.iter_mut().zip(cells) {
                    *byte = cell.load(Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn store_pods<T: Pod>(self, offset: usize, data: &[T]) -> io::Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.check(offset, bytes.len())?;
        match word_width(std::mem::size_of::<T>(), offset) {
            8 => {
                let words = &self.atomics_u64()[offset / 8..][..bytes.len() / 8];
                for (chunk, word) in bytes.chunks_exact(8).zip(words) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(chunk);
                    word.store(u64::from_ne_bytes(b), Ordering::Relaxed);
                }
            }
            4 => {
                let words = &self.atomics_u32()[offset / 4..][..bytes.len() / 4];
                for (chunk, word) in bytes.chunks_exact(4).zip(words) {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(chunk);
                    word.store(u32::from_ne_bytes(b), Ordering::Relaxed);
                }
            }
            _ => {
                let cells = &self.atomics_u8()[offset..][..bytes.len()];
                for (byte, cell) in bytes.iter().zip(cells) {
                    cell.store(*byte, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Checks that `guard` holds the lock whose word is this span's first
    /// 8 bytes and that `len` `T`s at `offset` lie past the lock header,
    /// aligned, inside the span.
    fn check_locked<T: Pod>(
        self,
        guard: &RawGuard<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        self.check_guard(guard)?;
        self.check_data::<T>(offset, len)
    }

    /// Checks that `guard` holds the lock whose word is this span's first
    /// 8 bytes.
    fn check_guard(self, guard: &RawGuard<'_>) -> io::Result<()> {
        let holds_ours = self
            .atomics_u64()
            .first()
            .is_some_and(|w| std::ptr::eq(w, guard.word()));
        if !holds_ours {
            return Err(invalid("guard of another lock"));
        }
        Ok(())
    }

    /// Checks that `len` `T`s at `offset` lie past the lock header,
    /// aligned, inside the span.
    fn check_data<T: Pod>(self, offset: usize, len: usize) -> io::Result<()> {
        if offset < LOCK_HEADER || offset % std::mem::align_of::<T>() != 0 {
            return Err(invalid(
                "locked data overlaps the lock header or is misaligned",
            ));
        }
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| invalid("shared array too large"))?;
        self.check(offset, bytes)
    }
}

/// Where regions may start in a mapping: on a 64-byte line (an arena
/// cell), or at its start.
pub(crate) const REGION_ALIGN: usize = 64;

/// The bytes of one shared object: the whole of a mapping (an object with
/// its own memfd) or one cell of an arena (see `sys::arena`), with the
/// accessors the primitives use, relative to the region's first byte and
/// bounded by its length. The region keeps its mapping mapped.
#[derive(Debug)]
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
    offset: usize,
    map: Arc<Mapping>,
}

// SAFETY: as for `Mapping`: plain shared memory whose safe accesses are
// atomics, atomic copies, and slices proven exclusive by a lock guard.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// The whole of `map`.
    pub(crate) fn whole(map: Arc<Mapping>) -> Region {
        Region {
            ptr: map.ptr,
            len: map.len,
            offset: 0,
            map,
        }
    }

    /// The `len` bytes of `map` at `offset`, which must lie inside it and
    /// start on a [`REGION_ALIGN`] boundary.
    pub(crate) fn new(map: Arc<Mapping>, offset: usize, len: usize) -> io::Result<Region> {
        map.span().check(offset, len)?;
        if offset % REGION_ALIGN != 0 || len == 0 {
            return Err(invalid(format!(
                "a region of {len} bytes at {offset} is empty or not on a line"
            )));
        }
        let ptr = NonNull::new(map.ptr.as_ptr().wrapping_add(offset))
            .ok_or_else(|| invalid("null shared memory range"))?;
        Ok(Region {
            ptr,
            len,
            offset,
            map,
        })
    }

    #[inline]
    fn span(&self) -> Span<'_> {
        Span {
            ptr: self.ptr,
            len: self.len,
            _mapping: PhantomData,
        }
    }

    /// Size in bytes.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Where it starts in its mapping.
    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    /// The mapping it is part of.
    pub(crate) fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    /// The region as 32-bit atomics.
    #[inline]
    pub(crate) fn atomics_u32(&self) -> &[AtomicU32] {
        self.span().atomics_u32()
    }

    /// The region as 64-bit atomics.
    #[inline]
    pub(crate) fn atomics_u64(&self) -> &[AtomicU64] {
        self.span().atomics_u64()
    }

    /// The lock header in the region's first [`LOCK_HEADER`] bytes (see
    /// `sys::lock`). The region must be at least that long: every locked
    /// type's size includes it, checked when it is created or received.
    #[inline]
    pub(crate) fn lock_header(&self) -> Header<'_> {
        Header::in_words(self.atomics_u64(), self.atomics_u32())
    }

    /// The integer atomic `A` at byte `offset` of the region, which must
    /// be aligned for it and in range.
    #[inline]
    pub(crate) fn atomic_at<A: AtomicWord>(&self, offset: usize) -> io::Result<&A> {
        self.span().atomic_at(offset)
    }

    /// Copies `out.len()` values of `T` from `offset` using relaxed atomic
    /// loads of the widest word that divides `T`'s size and the offset, so
    /// that a copy racing with another thread's copy or atomic operation is
    /// a torn value at worst, never undefined behaviour.
    pub(crate) fn load_pods<T: Pod>(&self, offset: usize, out: &mut [T]) -> io::Result<()> {
        self.span().load_pods(offset, out)
    }

    /// Copies `data` to `offset` with relaxed atomic stores (see
    /// [`load_pods`](Region::load_pods)).
    pub(crate) fn store_pods<T: Pod>(&self, offset: usize, data: &[T]) -> io::Result<()> {
        self.span().store_pods(offset, data)
    }

    /// Zeroes the region with relaxed 64-bit stores (its length is a whole
    /// number of words: a cell's object bytes).
    pub(crate) fn zero(&self) {
        for word in self.atomics_u64() {
            word.store(0, Ordering::Relaxed);
        }
    }

    /// `len` values of `T` at `offset`, borrowed for as long as `guard`
    /// is: the data of a region whose lock word is its first 8 bytes (see
    /// [`locked_slice_mut`](Region::locked_slice_mut)).
    pub(crate) fn locked_slice<'g, T: Pod>(
        &'g self,
        guard: &'g RawGuard<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<&'g [T]> {
        let span = self.span();
        span.check_locked::<T>(guard, offset, len)?;
        // SAFETY: `check_locked` proved the range lies inside the region,
        // past the lock header, aligned for `T`, and that `guard` holds this
        // region's lock (its first 8 bytes). By the layout rule of this crate (see
        // `locked_slice_mut`), every access to a locked region goes through
        // a guard of that lock, and only one guard exists at a time in all
        // processes; this shared borrow is tied to a shared borrow of the
        // guard, so no `&mut` from the same guard can coexist with it.
        // `T: Pod` makes every bit pattern valid.
        Ok(unsafe {
            std::slice::from_raw_parts(span.ptr.as_ptr().wrapping_add(offset).cast::<T>(), len)
        })
    }

    /// As [`locked_slice`](Region::locked_slice), for a region whose data
    /// is guarded by the lock word at the start of another region, `lock`
    /// (an `Array` built over a shared `Lock`) instead of its own: the
    /// layout rule of [`locked_slice_mut`](Region::locked_slice_mut) holds
    /// with that lock in place of the region's, because every handle of
    /// the region uses the same one (the region records its lock's
    /// identity when it is created, and a received handle that brings
    /// another lock is refused: `shared::array`).
    pub(crate) fn locked_slice_under<'g, T: Pod>(
        &'g self,
        lock: &Region,
        guard: &'g RawGuard<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<&'g [T]> {
        lock.span().check_guard(guard)?;
        let span = self.span();
        span.check_data::<T>(offset, len)?;
        // SAFETY: `check_data` proved the range lies inside the region,
        // past its header, aligned for `T`; `check_guard` that `guard`
        // holds `lock`, the one lock every access to this region's data
        // goes through (see above), and only one guard of it exists at a
        // time in all processes; the shared borrow is tied to a shared
        // borrow of the guard. `T: Pod` makes every bit pattern valid.
        Ok(unsafe {
            std::slice::from_raw_parts(span.ptr.as_ptr().wrapping_add(offset).cast::<T>(), len)
        })
    }

    /// As [`locked_slice_under`](Region::locked_slice_under), mutably.
    pub(crate) fn locked_slice_under_mut<'g, T: Pod>(
        &'g self,
        lock: &Region,
        guard: &'g mut RawGuard<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<&'g mut [T]> {
        lock.span().check_guard(guard)?;
        let span = self.span();
        span.check_data::<T>(offset, len)?;
        // SAFETY: as for `locked_slice_under`; here the borrow is tied to
        // an exclusive borrow of the one guard of `lock` in all processes,
        // so this is the only reference to the range anywhere until it ends.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(span.ptr.as_ptr().wrapping_add(offset).cast::<T>(), len)
        })
    }

    /// `len` values of `T` at `offset`, mutably borrowed for as long as the
    /// guard is.
    ///
    /// The layout rule that makes this sound: a region used with this
    /// function keeps its lock header (`sys::lock::Header`) at byte 0 and
    /// every byte past [`LOCK_HEADER`] is touched only while that lock is
    /// held (Array's `lock`, `get`, `set`, `to_vec`: never the lock-free
    /// copies of `RawArray` or `Value`'s atomics, which use other regions).
    /// The bytes of a region belong to one object in this process: a
    /// received handle whose region overlaps another live object's here is
    /// refused (see `sys::arena`), so no other handle of this process can
    /// reach them with atomics.
    pub(crate) fn locked_slice_mut<'g, T: Pod>(
        &'g self,
        guard: &'g mut RawGuard<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<&'g mut [T]> {
        let span = self.span();
        span.check_locked::<T>(guard, offset, len)?;
        // SAFETY: as for `locked_slice`; here the borrow is tied to an
        // exclusive borrow of the one guard that exists in all processes,
        // so this is the only reference to the range anywhere until it ends.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(span.ptr.as_ptr().wrapping_add(offset).cast::<T>(), len)
        })
    }
}

/// What a mapped file is used as in this process: an arena of small
/// objects' cells (`sys::arena`), or anything else (one object, a queue's
/// ring, a pool's data). A file is only ever mapped in one role here at a
/// time: a peer that sends an arena's memfd as an `Array` (or an array's as
/// an arena) is refused, so that no bytes of this process are reached both
/// as cells (atomics) and as an object's locked slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Cells of small objects.
    Arena,
    /// Anything else.
    Object,
}

/// The files this process maps, by identity: their role and how many
/// mappings of each are alive.
static MAPPED: Mutex<BTreeMap<FileId, (Role, usize)>> = Mutex::new(BTreeMap::new());

fn mapped() -> std::sync::MutexGuard<'static, BTreeMap<FileId, (Role, usize)>> {
    MAPPED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts one more mapping of `id` in `role`; refused if the file is
/// mapped here in the other role.
fn enter(id: FileId, role: Role) -> io::Result<()> {
    let mut table = mapped();
    let entry = table.entry(id).or_insert((role, 0));
    if entry.0 != role {
        return Err(invalid(match entry.0 {
            Role::Arena => {
                "refused a shared memory that this process maps as an arena of small \
                            objects"
            }
            Role::Object => {
                "refused an arena of small objects that this process maps as \
                             another shared memory"
            }
        }));
    }
    entry.1 += 1;
    Ok(())
}

fn leave(id: FileId) {
    let mut table = mapped();
    if let Some(entry) = table.get_mut(&id) {
        entry.1 = entry.1.saturating_sub(1);
        if entry.1 == 0 {
            table.remove(&id);
        }
    }
}

/// A range of a mapping that its holder alone reads and writes, for as
/// long as it lives (see [`Mapping::exclusive`], whose caller proved it).
#[derive(Debug)]
pub(crate) struct Exclusive<'m> {
    ptr: NonNull<u8>,
    len: usize,
    _mapping: PhantomData<&'m Mapping>,
}

// SAFETY: the token is the right to its range; handing it to another
// thread hands the right over with it (the mapping itself is `Sync`).
unsafe impl Send for Exclusive<'_> {}
// SAFETY: `&Exclusive` only gives shared reads of the range, which no one
// else writes while the token lives.
unsafe impl Sync for Exclusive<'_> {}

impl Exclusive<'_> {
    /// The range, for reading.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the range lies inside a mapping that stays mapped for
        // `'m`, which outlives `self`; u8 has no invalid values; nothing
        // else accesses the range while the token lives (the contract of
        // `Mapping::exclusive`), and `&self` rules out `bytes_mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The range, for writing.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`; `&mut self` makes this the only borrow
        // of the range anywhere until it ends.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Gives the right up, before the store that hands the range on (a
    /// plain drop does the same; this says so where it matters).
    pub(crate) fn give_up(self) {}
}

fn word_width(size: usize, offset: usize) -> usize {
    if size % 8 == 0 && offset % 8 == 0 {
        8
    } else if size % 4 == 0 && offset % 4 == 0 {
        4
    } else {
        1
    }
}

mod sealed {
    pub trait Sealed {}
}

/// std's integer atomics, which may be viewed in a mapping.
pub(crate) trait AtomicWord: sealed::Sealed + Sync {}

macro_rules! atomic_word {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl AtomicWord for $t {}
    )*};
}
atomic_word!(
    std::sync::atomic::AtomicI32,
    std::sync::atomic::AtomicU32,
    std::sync::atomic::AtomicI64,
    std::sync::atomic::AtomicU64,
    std::sync::atomic::AtomicIsize,
    std::sync::atomic::AtomicUsize
);

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no borrow
        // of the mapping outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
        leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn mapping_shares_through_its_fd() {
        let a = Mapping::create("test", 4096).expect("create");
        a.atomics_u32()[1].store(7, Ordering::SeqCst);
        a.store_bytes(100, b"hello").expect("store");
        let b = Mapping::from_fd(a.fd().try_clone_to_owned().expect("dup")).expect("map");
        assert_eq!(b.atomics_u32()[1].load(Ordering::SeqCst), 7);
        let mut out = [0u8; 5];
        b.load_bytes(100, &mut out).expect("read");
        assert_eq!(&out, b"hello");
        assert!(b.load_bytes(4094, &mut out).is_err());
        assert!(b.store_bytes(4094, &out).is_err());
    }

    #[test]
    fn a_received_mapping_cannot_be_resized() {
        let a = Mapping::create("test-sealed", 4096).expect("create");
        let b = Mapping::from_fd(a.fd().try_clone_to_owned().expect("dup")).expect("map");
        for size in [0, 100, 4095, 8192] {
            assert_eq!(
                nix::unistd::ftruncate(b.fd(), size),
                Err(nix::errno::Errno::EPERM),
                "ftruncate to {size} must be refused"
            );
        }
        // Nor can the seals be loosened or added to.
        assert_eq!(
            fcntl(b.fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)),
            Err(nix::errno::Errno::EPERM)
        );
        assert_eq!(nix::sys::stat::fstat(b.fd()).expect("fstat").st_size, 4096);
    }

    fn refusal(fd: OwnedFd) -> String {
        match Mapping::from_fd(fd) {
            Ok(_) => panic!("an unsealed descriptor was mapped"),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn from_fd_refuses_what_could_shrink() {
        // A memfd that cannot be sealed at all.
        let plain =
            nix::sys::memfd::memfd_create(c"test-plain", MFdFlags::MFD_CLOEXEC).expect("memfd");
        nix::unistd::ftruncate(&plain, 4096).expect("size");
        assert!(refusal(plain).contains("not sealed against shrinking"));

        // A sealable memfd whose creator left it unsealed, or sealed only
        // against growth.
        for seals in [SealFlag::empty(), SealFlag::F_SEAL_GROW] {
            let open = nix::sys::memfd::memfd_create(
                c"test-unsealed",
                MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
            )
            .expect("memfd");
            nix::unistd::ftruncate(&open, 4096).expect("size");
            fcntl(&open, FcntlArg::F_ADD_SEALS(seals)).expect("seal");
            assert!(refusal(open).contains("not sealed against shrinking"));
        }

        // Not a memfd: a pipe.
        let (read_end, _write_end) = crate::sys::pipe().expect("pipe");
        assert!(refusal(read_end).contains("not a memfd"));
    }

    #[test]
    fn byte_copies_round_trip_at_every_alignment() {
        let m = Mapping::create("test-bytes", 64).expect("create");
        let data: Vec<u8> = (1..=40).collect();
        for offset in 0..16 {
            for len in [0, 1, 7, 8, 9, 17, 40] {
                m.store_bytes(0, &[0; 64]).expect("clear");
                m.store_bytes(offset, &data[..len]).expect("store");
                let mut all = [0u8; 64];
                m.load_bytes(0, &mut all).expect("load all");
                let mut expected = [0u8; 64];
                expected[offset..offset + len].copy_from_slice(&data[..len]);
                assert_eq!(all, expected, "offset {offset} len {len}");
                let mut back = vec![0u8; len];
                m.load_bytes(offset, &mut back).expect("load");
                assert_eq!(back, &data[..len]);
            }
        }
        assert!(m.store_bytes(60, &[0; 5]).is_err());
        assert!(m.load_bytes(usize::MAX, &mut [0; 2]).is_err());
    }
}
