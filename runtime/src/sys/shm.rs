//! Shared mappings backed by memfd: anonymous files that exist only while
//! a descriptor or a mapping refers to them, so nothing is ever left in
//! `/dev/shm` after a crash. They travel between processes as descriptors.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use bytemuck::Pod;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::MFdFlags;
use nix::sys::mman::{MapFlags, ProtFlags};

use super::lock::RawGuard;
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
fn sealed_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
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
    Ok(len)
}

/// A `MAP_SHARED` mapping of a whole memfd. Zero-filled when created.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory shared by design; every access goes
// through atomics or explicit copies, never through unsynchronised
// references handed out to several threads.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only hands out atomics and copies.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// A new zero-filled shared mapping of `len` bytes (at least 1).
    ///
    /// The memfd is sealed against shrinking, growing and further sealing
    /// before it is mapped: its size never changes, so no holder of the
    /// descriptor (here or in a process it was sent to) can truncate it
    /// under another holder's mapping (which would SIGBUS that holder).
    pub(crate) fn create(name: &str, len: usize) -> io::Result<Mapping> {
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
        Mapping::map(fd, len)
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
        let len = sealed_len(fd.as_fd())?;
        Mapping::map(fd, len)
    }

    /// As [`from_fd`](Mapping::from_fd), for a memfd that must have exactly
    /// `len` bytes (a handle's, whose size its kind and fields fix): any
    /// other size is refused before anything is mapped.
    pub(crate) fn from_fd_sized(fd: OwnedFd, len: usize) -> io::Result<Mapping> {
        let found = sealed_len(fd.as_fd())?;
        if found != len {
            return Err(invalid(format!(
                "shared memory of {found} bytes where {len} were expected"
            )));
        }
        Mapping::map(fd, len)
    }
    fn map(fd: OwnedFd, len: usize) -> io::Result<Mapping> {
        let nz = std::num::NonZeroUsize::new(len).ok_or_else(|| invalid("empty mapping"))?;
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
        }?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            fd,
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

    /// The mapping as 32-bit atomics (lock words, counters).
    pub(crate) fn atomics_u32(&self) -> &[AtomicU32] {
        // SAFETY: the mapping is page-aligned, `len / 4` whole words lie
        // inside it, it stays mapped while `&self` lives, and AtomicU32 has
        // u32's layout and permits shared mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU32>(), self.len / 4) }
    }

    /// The mapping as 64-bit atomics.
    pub(crate) fn atomics_u64(&self) -> &[AtomicU64] {
        // SAFETY: as for `atomics_u32`, with 8-byte words (page alignment
        // covers 8).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// Copies `out.len()` bytes from `offset`. Out of range: an error.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) -> io::Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: the range was checked to lie inside the mapping, `out` is
        // a distinct, valid buffer of that length (it cannot alias a shared
        // mapping the caller does not own).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().wrapping_add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Copies `data` to `offset`. Out of range: an error.
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: the range was checked to lie inside the mapping; `data` is
        // a valid buffer that does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().wrapping_add(offset),
                data.len(),
            )
        };
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(invalid(format!(
                "range {offset}..{} outside shared memory of {} bytes",
                offset.saturating_add(len),
                self.len
            ))),
        }
    }

    /// The mapping as byte atomics.
    pub(crate) fn atomics_u8(&self) -> &[AtomicU8] {
        // SAFETY: `len` bytes lie inside the mapping, which stays mapped
        // while `&self` lives; AtomicU8 has u8's layout and permits shared
        // mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU8>(), self.len) }
    }

    /// The integer atomic `A` (one of std's `AtomicI32`, `AtomicU64`, ...)
    /// at byte `offset`, which must be aligned for it and in range.
    pub(crate) fn atomic_at<A: AtomicWord>(&self, offset: usize) -> io::Result<&A> {
        self.check(offset, std::mem::size_of::<A>())?;
        if offset % std::mem::align_of::<A>() != 0 {
            return Err(invalid("misaligned atomic in shared memory"));
        }
        // SAFETY: the range was checked to lie inside the mapping and the
        // offset to be aligned for `A` (the base is page-aligned); `A` is one
        // of std's integer atomics (sealed trait), which have their
        // integer's layout and permit shared mutation through `&A`; the
        // mapping stays mapped while `&self` lives.
        Ok(unsafe { &*self.ptr.as_ptr().wrapping_add(offset).cast::<A>() })
    }

    /// Copies `out.len()` values of `T` from `offset` using relaxed atomic
    /// loads of the widest word that divides `T`'s size and the offset, so
    /// that a copy racing with another thread's copy or atomic operation is
    /// a torn value at worst, never undefined behaviour.
    pub(crate) fn load_pods<T: Pod>(&self, offset: usize, out: &mut [T]) -> io::Result<()> {
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

    /// Copies `data` to `offset` with relaxed atomic stores (see
    /// [`load_pods`](Mapping::load_pods)).
    pub(crate) fn store_pods<T: Pod>(&self, offset: usize, data: &[T]) -> io::Result<()> {
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

    /// `len` values of `T` at `offset`, borrowed for as long as `guard`
    /// is: the data of a mapping whose lock is its word 0 (see
    /// [`locked_slice_mut`](Mapping::locked_slice_mut)).
    pub(crate) fn locked_slice<'g, T: Pod>(
        &'g self,
        guard: &'g RawGuard<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<&'g [T]> {
        self.check_locked::<T>(guard, offset, len)?;
        // SAFETY: `check_locked` proved the range lies inside the mapping,
        // past the lock header, aligned for `T`, and that `guard` holds this
        // mapping's lock (word 0). By the layout rule of this crate (see
        // `locked_slice_mut`), every access to a locked region goes through
        // a guard of that lock, and only one guard exists at a time in all
        // processes; this shared borrow is tied to a shared borrow of the
        // guard, so no `&mut` from the same guard can coexist with it.
        // `T: Pod` makes every bit pattern valid.
        Ok(unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr().wrapping_add(offset).cast::<T>(), len)
        })
    }

    /// `len` values of `T` at `offset`, mutably borrowed for as long as the
    /// guard is.
    ///
    /// The layout rule that makes this sound: a mapping used with this
    /// function keeps its lock word at word 0 (poison flag at word 1) and
    /// every byte past [`LOCK_HEADER`] is touched only while that lock is
    /// held (Array's `lock`, `get`, `set`, `to_vec`: never the lock-free
    /// copies of `RawArray` or `Value`'s atomics, which use other mappings).
    pub(crate) fn locked_slice_mut<'g, T: Pod>(
        &'g self,
        guard: &'g mut RawGuard<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<&'g mut [T]> {
        self.check_locked::<T>(guard, offset, len)?;
        // SAFETY: as for `locked_slice`; here the borrow is tied to an
        // exclusive borrow of the one guard that exists in all processes,
        // so this is the only reference to the range anywhere until it ends.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().wrapping_add(offset).cast::<T>(), len)
        })
    }

    fn check_locked<T: Pod>(
        &self,
        guard: &RawGuard<'_>,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        let holds_ours = self
            .atomics_u32()
            .first()
            .is_some_and(|w| std::ptr::eq(w, guard.word()));
        if !holds_ours {
            return Err(invalid("guard of another lock"));
        }
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

    /// `len` bytes at `offset`, borrowed, for reading a range that the
    /// caller's protocol keeps unchanged while the borrow lives (a queue
    /// slot its consumer has taken: no writer may touch it before the
    /// consumer releases it). Out of range: an error.
    pub(crate) fn range(&self, offset: usize, len: usize) -> io::Result<&[u8]> {
        self.check(offset, len)?;
        // SAFETY: the range was checked to lie inside the mapping, which
        // stays mapped while `&self` lives; u8 has no invalid values.
        // Concurrent writers are excluded by the caller's protocol (as for
        // `bytes`).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().wrapping_add(offset), len) })
    }

    /// Runs `f` on `len` bytes at `offset` as a mutable slice, for writing
    /// a range that the caller's protocol gives to it alone while `f` runs
    /// (a queue slot its producer has claimed). Out of range: an error.
    pub(crate) fn with_range_mut<R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> io::Result<R> {
        self.check(offset, len)?;
        // SAFETY: the range was checked to lie inside the mapping, which
        // stays mapped while `&self` lives; the slice does not outlive `f`;
        // every other access to the range (in this process or another) is
        // excluded by the caller's protocol for that time.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().wrapping_add(offset), len) };
        Ok(f(bytes))
    }

    /// The whole mapping as bytes, borrowed: `SharedMemory::as_slice`.
    ///
    /// # Safety
    ///
    /// While the returned slice lives, no process and no other mapping of
    /// the same memfd in this one may write any of these bytes, and no
    /// write may go through `self` either (its atomics, [`store_bytes`],
    /// [`write`](Mapping::write)...): a `&[u8]` promises the compiler that
    /// its bytes do not change.
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
        self.check(offset, out.len())?;
        let cells = &self.atomics_u8()[offset..][..out.len()];
        for (byte, cell) in out.iter_mut().zip(cells) {
            *byte = cell.load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// Copies `data` to `offset` with relaxed atomic stores (see
    /// [`load_bytes`](Mapping::load_bytes)). Out of range: an error.
    pub(crate) fn store_bytes(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        let cells = &self.atomics_u8()[offset..][..data.len()];
        for (byte, cell) in data.iter().zip(cells) {
            cell.store(*byte, Ordering::Relaxed);
        }
        Ok(())
    }

    /// `len` bytes at `offset` of a pool arena, borrowed for reading in
    /// place (a chunk's arguments in the worker, a chunk's results in the
    /// parent). Out of range: an error.
    ///
    /// The pool's arena protocol keeps the range unchanged while the view
    /// lives: the writer of a region (the parent for input, the worker for
    /// output) fills it completely before announcing it on the socket, and
    /// does not write it again until the reader gives it back (input: the
    /// chunk's result frame arrived, sent after the worker's last read;
    /// output: the parent released it after decoding). Other regions of
    /// the arena may be written meanwhile; they do not overlap this one.
    pub(crate) fn arena_view(&self, offset: usize, len: usize) -> io::Result<&[u8]> {
        self.check(offset, len)?;
        // SAFETY: the range was checked to lie inside the mapping, which
        // stays mapped while `&self` lives; u8 has no invalid values; no
        // process writes the range while the borrow lives (the arena
        // protocol above: a region is rewritten only after its reader
        // handed it back, which the reader does after its last use of the
        // view).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().wrapping_add(offset), len) })
    }
}

/// Bytes at the start of a locked mapping: the lock word (word 0) and its
/// poison flag (word 1); locked data starts at or after it.
pub(crate) const LOCK_HEADER: usize = 8;

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
        a.write(100, b"hello").expect("write");
        let b = Mapping::from_fd(a.fd().try_clone_to_owned().expect("dup")).expect("map");
        assert_eq!(b.atomics_u32()[1].load(Ordering::SeqCst), 7);
        let mut out = [0u8; 5];
        b.read(100, &mut out).expect("read");
        assert_eq!(&out, b"hello");
        assert!(b.read(4094, &mut out).is_err());
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
