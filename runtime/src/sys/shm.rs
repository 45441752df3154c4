//! Shared mappings backed by memfd: anonymous files that exist only while
//! a descriptor or a mapping refers to them, so nothing is ever left in
//! `/dev/shm` after a crash. They travel between processes as descriptors.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::sys::mman::{MapFlags, ProtFlags};

use crate::error::{Error, Result};

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
    pub(crate) fn create(name: &str, len: usize) -> Result<Mapping> {
        let len = len.max(1);
        let cname = std::ffi::CString::new(name.replace('\0', ""))
            .map_err(|_| Error::invalid("bad name"))?;
        let fd =
            nix::sys::memfd::memfd_create(cname.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map_err(|e| Error::errno("memfd_create", e))?;
        let off = libc::off_t::try_from(len)
            .map_err(|_| Error::invalid("shared memory size too large"))?;
        nix::unistd::ftruncate(&fd, off).map_err(|e| Error::errno("ftruncate", e))?;
        Mapping::map(fd, len)
    }

    /// Maps the whole memfd `fd` (received from another process).
    pub(crate) fn from_fd(fd: OwnedFd) -> Result<Mapping> {
        let stat = nix::sys::stat::fstat(&fd).map_err(|e| Error::errno("fstat", e))?;
        let len =
            usize::try_from(stat.st_size).map_err(|_| Error::invalid("bad shared memory size"))?;
        if len == 0 {
            return Err(Error::invalid("empty shared memory object"));
        }
        Mapping::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Mapping> {
        let nz = std::num::NonZeroUsize::new(len).ok_or_else(|| Error::invalid("empty mapping"))?;
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
        .map_err(|e| Error::errno("mmap", e))?;
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
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
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
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
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

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {offset}..{} outside shared memory of {} bytes",
                offset.saturating_add(len),
                self.len
            ))),
        }
    }

    /// Raw base pointer, for sys-internal views.
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.ptr
    }
}

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
}
