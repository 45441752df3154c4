//! [`Array`] and [`RawArray`].

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LockResult, PoisonError, TryLockError, TryLockResult};
use std::time::Duration;

use bytemuck::Pod;

use super::value::data_offset;
use crate::error::{Error, Result};
use crate::handle::{self, HandleWire, Kind, Parts, Received, handle_serde};
use crate::sync::{AnyLock, Lock, deadline};
use crate::sys::arena::Block;
use crate::sys::lock::{Header, RawGuard};

// Header: the lock header (`LOCK_HEADER`, 16 bytes), then the length and
// element size as u64s at bytes 16 and 24, then the identity of the lock
// an `Array` was built over (`with_lock`; 0s for its own lock word): 1,
// the lock memory's file (device, inode) and offset, at bytes 32 to 56;
// data from byte 64 (aligned for T).
const HEADER: usize = 64;
const LEN_WORD: usize = 2;
const SIZE_WORD: usize = 3;
const LOCK_WORDS: usize = 4;

/// The identity words of `lock`'s memory, as an array's header records it.
fn lock_identity(lock: &Lock) -> [u64; 4] {
    let block = lock.block();
    let (dev, ino) = block.file().key();
    [1, dev, ino, block.place().offset]
}

/// The lock identity recorded in an array's header.
fn recorded_identity(map: &Block) -> [u64; 4] {
    let words = map.atomics_u64();
    std::array::from_fn(|i| {
        words
            .get(LOCK_WORDS + i)
            .map_or(u64::MAX, |w| w.load(Ordering::Relaxed))
    })
}

/// Bytes of an array of `len` `T`s whose data starts at `data`.
fn bytes_for<T: Pod>(data: usize, len: usize) -> Option<usize> {
    len.checked_mul(std::mem::size_of::<T>())
        .and_then(|b| b.checked_add(data))
}

fn create<H: HandleWire, T: Pod>(name: &str, data: usize, len: usize) -> Result<Arc<Block>> {
    let bytes =
        bytes_for::<T>(data, len).ok_or_else(|| Error::invalid("shared array too large"))?;
    let map = handle::new_block::<H>(name, bytes, std::mem::align_of::<T>().max(8))?;
    map.atomics_u64()[LEN_WORD].store(len as u64, Ordering::Relaxed);
    map.atomics_u64()[SIZE_WORD].store(std::mem::size_of::<T>() as u64, Ordering::Relaxed);
    Ok(map)
}

/// The wire form of both array types: the length, then the memory, whose
/// size the length fixes (the header repeats the length and element size,
/// checked on arrival).
fn array_size<T: Pod>(data: usize, len: u64, what: Kind) -> Result<usize> {
    usize::try_from(len)
        .ok()
        .and_then(|len| bytes_for::<T>(data, len))
        .ok_or_else(|| {
            handle::decode(format!(
                "a {} of {len} elements does not fit in memory",
                what.name()
            ))
        })
}

fn arrive<T: Pod>(len: u64, fds: &mut Received, what: Kind) -> Result<(Arc<Block>, usize)> {
    let map = fds.block()?;
    let words = map.atomics_u64();
    let (found_len, size) = match (words.get(LEN_WORD), words.get(SIZE_WORD)) {
        (Some(l), Some(s)) => (l.load(Ordering::Relaxed), s.load(Ordering::Relaxed)),
        _ => {
            return Err(handle::decode(format!(
                "a {} without its header",
                what.name()
            )));
        }
    };
    if found_len != len || size != std::mem::size_of::<T>() as u64 {
        return Err(handle::decode(format!(
            "a {} sent with {len} elements of {} bytes holds {found_len} of {size}",
            what.name(),
            std::mem::size_of::<T>()
        )));
    }
    let len = usize::try_from(len).map_err(|_| handle::decode("array length"))?;
    Ok((map, len))
}

/// A fixed-length array of `T` in shared memory with a lock: Python's
/// `multiprocessing.Array`.
///
/// [`lock`](Array::lock) gives a guard that derefs to `[T]` (in place, no
/// copy); [`get`](Array::get), [`set`](Array::set) and
/// [`to_vec`](Array::to_vec) take the lock for one access. A clone is
/// another handle to the same array; handles travel to other processes.
///
/// # Examples
///
/// ```
/// let arr = multiproc::Array::new(&[1.0f64, 2.0, 3.0])?;
/// for x in arr.lock()?.iter_mut() {
///     *x = -*x;
/// }
/// assert_eq!(arr.to_vec(), [-1.0, -2.0, -3.0]);
/// arr.set(0, 10.0)?;
/// assert_eq!(arr.get(0)?, 10.0);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Array<T: Pod> {
    map: Arc<Block>,
    len: usize,
    /// The lock it was built over (`None`: the word in its header).
    lock: Option<Lock>,
    _t: PhantomData<T>,
}

impl<T: Pod> Clone for Array<T> {
    fn clone(&self) -> Self {
        Array {
            map: Arc::clone(&self.map),
            len: self.len,
            lock: self.lock.clone(),
            _t: PhantomData,
        }
    }
}

/// The lock of an [`Array`], held; derefs to the elements, in place.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ArrayGuard<'a, T: Pod> {
    array: &'a Array<T>,
    raw: RawGuard<'a>,
}

impl<T: Pod> Array<T> {
    const DATA: usize = data_offset::<T>(HEADER);

    /// A shared array holding a copy of `values`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created.
    pub fn new(values: &[T]) -> Result<Array<T>> {
        let map = create::<Self, T>("multiproc-array", Self::DATA, values.len())?;
        map.store_pods(Self::DATA, values)?;
        Ok(Array {
            map,
            len: values.len(),
            lock: None,
            _t: PhantomData,
        })
    }

    /// A shared array holding a copy of `values`, guarded by an existing
    /// [`Lock`] (CPython's `Array(t, v, lock=l)`): [`lock`](Array::lock),
    /// `get`, `set` and `to_vec` take that lock, so one lock can guard
    /// several arrays and values. The array keeps its own memory, and its
    /// handle holds (and sends along) the lock's.
    ///
    /// Only a `Lock`, not an [`RLock`](crate::sync::RLock) as CPython
    /// allows: the guard gives the elements in place (`&mut [T]`), and two
    /// guards of a re-entrant lock on one thread would be two `&mut` to
    /// the same elements. A [`Value`](super::Value), whose guard works on
    /// a copy, takes either.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created;
    /// [`Error::Misuse`] if `lock` is itself another object's lock word
    /// (from a `get_lock` of an object without a lock of its own).
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::{Array, Lock};
    ///
    /// let lock = Lock::new()?;
    /// let a = Array::with_lock(&[1u32, 2], lock.clone())?;
    /// let b = Array::with_lock(&[3u32], lock.clone())?;
    /// a.lock()?[0] = 7;
    /// assert!(lock.try_acquire().is_ok()); // free again
    /// assert_eq!(a.to_vec(), [7, 2]);
    /// assert_eq!(b.to_vec(), [3]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn with_lock(values: &[T], lock: Lock) -> Result<Array<T>> {
        if lock.block().len() != crate::sys::shm::LOCK_HEADER {
            return Err(Error::misuse(
                "an Array cannot be built over another object's lock word (a get_lock of a \
                 Value or Array without a lock of its own): use a Lock of its own",
            ));
        }
        let map = create::<Self, T>("multiproc-array", Self::DATA, values.len())?;
        map.store_pods(Self::DATA, values)?;
        let words = map.atomics_u64();
        for (i, word) in lock_identity(&lock).into_iter().enumerate() {
            words[LOCK_WORDS + i].store(word, Ordering::Relaxed);
        }
        Ok(Array {
            map,
            len: values.len(),
            lock: Some(lock),
            _t: PhantomData,
        })
    }

    /// The lock that guards the array (CPython's `get_lock()`): the one it
    /// was built over, or a [`Lock`] handle onto the word in its header.
    /// A lock of the second kind cannot be sent to another process on its
    /// own (see [`Value::get_lock`](super::Value::get_lock)).
    pub fn get_lock(&self) -> AnyLock {
        AnyLock::Lock(match &self.lock {
            Some(lock) => lock.clone(),
            None => Lock::view_of(Arc::clone(&self.map)),
        })
    }

    /// A shared array of `len` zeros (shared memory starts zero-filled).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created;
    /// [`Error::InvalidArgument`] if the size overflows.
    ///
    /// # Examples
    ///
    /// ```
    /// let arr = multiproc::Array::<u64>::zeroed(1000)?;
    /// assert_eq!(arr.len(), 1000);
    /// assert!(arr.to_vec().iter().all(|&x| x == 0));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn zeroed(len: usize) -> Result<Array<T>> {
        let map = create::<Self, T>("multiproc-array", Self::DATA, len)?;
        Ok(Array {
            map,
            len,
            lock: None,
            _t: PhantomData,
        })
    }

    /// The header of the lock that guards it.
    fn header(&self) -> Header<'_> {
        match &self.lock {
            Some(lock) => lock.header(),
            None => self.map.lock_header(),
        }
    }

    fn wrap<'a>(&'a self, raw: RawGuard<'a>, poisoned: bool) -> LockResult<ArrayGuard<'a, T>> {
        let guard = ArrayGuard { array: self, raw };
        if poisoned {
            Err(PoisonError::new(guard))
        } else {
            Ok(guard)
        }
    }

    /// Takes the array's lock; the guard derefs to `[T]`.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the guard if a holder died or panicked
    /// holding the lock (see [`Lock::acquire`](crate::Lock::acquire)).
    pub fn lock(&self) -> LockResult<ArrayGuard<'_, T>> {
        loop {
            if let Some((raw, poisoned)) = RawGuard::lock(self.header(), None) {
                return self.wrap(raw, poisoned);
            }
        }
    }

    /// As [`lock`](Array::lock), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// `Err(TryLockError::WouldBlock)` on timeout; poisoning as for `lock`.
    pub fn lock_timeout(&self, timeout: Duration) -> TryLockResult<ArrayGuard<'_, T>> {
        match RawGuard::lock(self.header(), deadline(timeout)) {
            None => Err(TryLockError::WouldBlock),
            Some((raw, poisoned)) => self.wrap(raw, poisoned).map_err(TryLockError::from),
        }
    }

    fn locked(&self) -> ArrayGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` if the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of element `i`, read under the lock (poisoning ignored).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `i` is out of range.
    pub fn get(&self, i: usize) -> Result<T> {
        self.locked()
            .get(i)
            .copied()
            .ok_or_else(|| self.out_of_range(i))
    }

    /// Replaces element `i`, under the lock (poisoning ignored).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `i` is out of range.
    pub fn set(&self, i: usize, value: T) -> Result<()> {
        let mut guard = self.locked();
        let slot = guard.get_mut(i).ok_or_else(|| self.out_of_range(i))?;
        *slot = value;
        Ok(())
    }

    /// A copy of every element, read under the lock (poisoning ignored).
    pub fn to_vec(&self) -> Vec<T> {
        self.locked().to_vec()
    }

    fn out_of_range(&self, i: usize) -> Error {
        Error::invalid(format!(
            "index {i} out of range for a shared array of length {}",
            self.len
        ))
    }

    /// `true` if a holder of the lock died or panicked holding it.
    pub fn is_poisoned(&self) -> bool {
        self.header().is_poisoned()
    }

    /// Clears the poison flag.
    pub fn clear_poison(&self) {
        self.header().clear_poison();
    }
}

impl<T: Pod> Deref for ArrayGuard<'_, T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // Cannot fail: range, alignment and lock identity are checked on
        // creation and arrival; the empty fallback keeps this panic-free.
        let array = self.array;
        match &array.lock {
            None => array
                .map
                .locked_slice(&self.raw, Array::<T>::DATA, array.len),
            Some(lock) => {
                array
                    .map
                    .locked_slice_under(lock.block(), &self.raw, Array::<T>::DATA, array.len)
            }
        }
        .unwrap_or_default()
    }
}

impl<T: Pod> DerefMut for ArrayGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let array = self.array;
        match &array.lock {
            None => array
                .map
                .locked_slice_mut(&mut self.raw, Array::<T>::DATA, array.len),
            Some(lock) => array.map.locked_slice_under_mut(
                lock.block(),
                &mut self.raw,
                Array::<T>::DATA,
                array.len,
            ),
        }
        .unwrap_or_default()
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ArrayGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Pod> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Travels as its length, its memory and the lock it was built over, if
/// any, which must be the one its header records.
impl<T: Pod> HandleWire for Array<T> {
    const KIND: Kind = Kind::Array;
    type Elem = T;
    type Plain = (u64, Option<Lock>);

    fn parts(&self) -> Result<Parts<'_, (u64, Option<Lock>)>> {
        Ok(Parts::block(
            &self.map,
            (self.len as u64, self.lock.clone()),
        ))
    }

    fn mapping_size(&(len, _): &(u64, Option<Lock>)) -> Result<usize> {
        array_size::<T>(Self::DATA, len, Self::KIND)
    }

    fn rebuild((len, lock): (u64, Option<Lock>), fds: &mut Received) -> Result<Self> {
        let (map, len) = arrive::<T>(len, fds, Self::KIND)?;
        // Every handle of the array must use the same lock, or two
        // processes could both hold "its" lock and its elements in place.
        let expected = lock.as_ref().map_or([0; 4], lock_identity);
        if recorded_identity(&map) != expected {
            return Err(handle::decode(
                "an Array arrived with another lock than the one it was built with",
            ));
        }
        Ok(Array {
            map,
            len,
            lock,
            _t: PhantomData,
        })
    }
}

handle_serde!([T: Pod] Array<T>);

/// A fixed-length array of `T` in shared memory without a lock: Python's
/// `RawArray`. Element reads and writes are copies made of relaxed atomic
/// word accesses: concurrent access is never undefined behaviour, but
/// coordinating it (disjoint ranges, a [`Lock`](crate::Lock)) is yours.
///
/// # Examples
///
/// ```
/// let arr = multiproc::shared::RawArray::<i32>::zeroed(4)?;
/// arr.set(2, 7)?;
/// arr.write(0, &[1, 1])?;
/// assert_eq!(arr.to_vec(), [1, 1, 7, 0]);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct RawArray<T: Pod> {
    map: Arc<Block>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Clone for RawArray<T> {
    fn clone(&self) -> Self {
        RawArray {
            map: Arc::clone(&self.map),
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T: Pod> RawArray<T> {
    const DATA: usize = data_offset::<T>(HEADER);

    /// A shared array holding a copy of `values`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created.
    pub fn new(values: &[T]) -> Result<RawArray<T>> {
        let map = create::<Self, T>("multiproc-rawarray", Self::DATA, values.len())?;
        map.store_pods(Self::DATA, values)?;
        Ok(RawArray {
            map,
            len: values.len(),
            _t: PhantomData,
        })
    }

    /// A shared array of `len` zeros.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the shared memory cannot be created;
    /// [`Error::InvalidArgument`] if the size overflows.
    pub fn zeroed(len: usize) -> Result<RawArray<T>> {
        Ok(RawArray {
            map: create::<Self, T>("multiproc-rawarray", Self::DATA, len)?,
            len,
            _t: PhantomData,
        })
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` if the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn offset(&self, start: usize, count: usize) -> Result<usize> {
        match start.checked_add(count) {
            Some(end) if end <= self.len => Ok(Self::DATA + start * std::mem::size_of::<T>()),
            _ => Err(Error::invalid(format!(
                "range {start}..{} out of range for a shared array of length {}",
                start.saturating_add(count),
                self.len
            ))),
        }
    }

    /// A copy of element `i`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `i` is out of range.
    pub fn get(&self, i: usize) -> Result<T> {
        let mut out = T::zeroed();
        self.read(i, std::slice::from_mut(&mut out))?;
        Ok(out)
    }

    /// Replaces element `i`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `i` is out of range.
    pub fn set(&self, i: usize, value: T) -> Result<()> {
        self.write(i, std::slice::from_ref(&value))
    }

    /// Copies elements `start..start + out.len()` into `out`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the range is out of bounds.
    pub fn read(&self, start: usize, out: &mut [T]) -> Result<()> {
        let offset = self.offset(start, out.len())?;
        Ok(self.map.load_pods(offset, out)?)
    }

    /// Copies `values` to elements `start..start + values.len()`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the range is out of bounds.
    pub fn write(&self, start: usize, values: &[T]) -> Result<()> {
        let offset = self.offset(start, values.len())?;
        Ok(self.map.store_pods(offset, values)?)
    }

    /// A copy of every element.
    pub fn to_vec(&self) -> Vec<T> {
        let mut out = vec![T::zeroed(); self.len];
        let _ = self.read(0, &mut out);
        out
    }
}

impl<T: Pod> fmt::Debug for RawArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawArray")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T: Pod> HandleWire for RawArray<T> {
    const KIND: Kind = Kind::RawArray;
    type Elem = T;
    type Plain = u64;

    fn parts(&self) -> Result<Parts<'_, u64>> {
        Ok(Parts::block(&self.map, self.len as u64))
    }

    fn mapping_size(&len: &u64) -> Result<usize> {
        array_size::<T>(Self::DATA, len, Self::KIND)
    }

    fn rebuild(len: u64, fds: &mut Received) -> Result<Self> {
        let (map, len) = arrive::<T>(len, fds, Self::KIND)?;
        Ok(RawArray {
            map,
            len,
            _t: PhantomData,
        })
    }
}

handle_serde!([T: Pod] RawArray<T>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_is_in_place() {
        let arr = Array::new(&[1u8, 2, 3]).expect("array");
        let other = arr.clone();
        other.lock().expect("lock")[1] = 20;
        assert_eq!(arr.to_vec(), [1, 20, 3]);
        assert!(arr.get(3).is_err());
        let empty = Array::<u64>::zeroed(0).expect("empty");
        assert!(empty.lock().expect("lock").is_empty());
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;
    use crate::codec;

    fn resend<T: Pod>(array: &Array<T>) -> Result<Array<T>> {
        let (mut bytes, mut fds) = (Vec::new(), Vec::new());
        codec::encode(array, &mut bytes, &mut fds)?;
        codec::decode(&bytes, fds)
    }

    fn forged<T: Pod>(array: &Array<T>, lock: Option<Lock>) -> Array<T> {
        Array {
            map: Arc::clone(&array.map),
            len: array.len,
            lock,
            _t: PhantomData,
        }
    }

    #[test]
    fn an_array_arrives_only_with_the_lock_it_was_built_with() {
        let lock = Lock::new().expect("lock");
        let shared = Array::with_lock(&[1u32, 2], lock.clone()).expect("array");
        let back = resend(&shared).expect("its own lock");
        assert_eq!(back.to_vec(), [1, 2]);
        let other = Lock::new().expect("lock");
        for bad in [
            forged(&shared, Some(other.clone())),
            forged(&shared, None),
            forged(&Array::new(&[1u32]).expect("own lock"), Some(other)),
        ] {
            let err = resend(&bad).map(drop).expect_err("another lock");
            assert!(err.to_string().contains("another lock"), "{err}");
        }
    }

    #[test]
    fn a_view_lock_is_refused_as_an_arrays_lock() {
        let own = Array::new(&[0u8; 4]).expect("array");
        let AnyLock::Lock(view) = own.get_lock() else {
            panic!("an Array's lock is a Lock");
        };
        let err = Array::with_lock(&[1u8], view)
            .map(drop)
            .expect_err("a view");
        assert!(matches!(err, Error::Misuse { .. }), "{err}");
    }
}
