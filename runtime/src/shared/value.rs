//! [`Value`] and [`RawValue`].

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LockResult, PoisonError, TryLockError, TryLockResult};
use std::time::Duration;

use bytemuck::Pod;

use crate::error::Result;
use crate::handle::{HandleWire, Kind, Parts, Received, handle_serde, new_block};
use crate::sync::{AnyLock, Held, Lock, deadline};
use crate::sys::arena::Block;
use crate::sys::lock::{Header, RawGuard};
use crate::sys::shm::{AtomicWord, LOCK_HEADER};

/// Where a value's data starts: past the lock header, aligned for `T`.
pub(crate) const fn data_offset<T>(header: usize) -> usize {
    let align = std::mem::align_of::<T>();
    header.div_ceil(align) * align
}

/// A `T` in shared memory with a lock beside it: Python's
/// `multiprocessing.Value`.
///
/// [`lock`](Value::lock) gives a guard that derefs to `T`; [`get`](Value::get)
/// and [`set`](Value::set) take the lock for one copy. For the integer
/// types (`i32`, `u32`, `i64`, `u64`, `isize`, `usize`),
/// [`fetch_add`](Value::fetch_add), [`fetch_sub`](Value::fetch_sub),
/// [`compare_exchange`](Value::compare_exchange), [`load`](Value::load) and
/// [`store`](Value::store) are single atomic instructions on the shared
/// word (sequentially consistent) that do not take the lock.
///
/// The guard works on a copy of the value taken when the lock was acquired
/// and writes it back when dropped (if it was mutably borrowed): the lock
/// word and the data share a cache line, so this costs two plain word
/// copies, and it keeps the lock-free atomics sound to mix with the lock
/// (an atomic update made while a guard is held is overwritten by the
/// guard's write-back, a race in your program but never undefined
/// behaviour).
///
/// A clone is another handle to the same value; handles travel to other
/// processes as arguments or messages.
///
/// A value has a lock word of its own beside its data, or is built over
/// an existing [`Lock`] or [`RLock`](crate::sync::RLock)
/// ([`with_lock`](Value::with_lock), CPython's `Value(t, v, lock=l)`), so
/// that one lock guards several values; [`get_lock`](Value::get_lock)
/// returns the lock either way.
///
/// # Examples
///
/// The Python docs' example, ported (see `examples/shared_value.rs`):
///
/// ```no_run
/// use multiproc::{process_fn, Array, Process, Value};
///
/// #[process_fn]
/// fn f(n: Value<f64>, a: Array<i32>) {
///     n.set(3.1415927);
///     for x in a.lock().expect("not poisoned").iter_mut() {
///         *x = -*x;
///     }
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let num = Value::new(0.0f64)?;
/// let arr = Array::new(&(0..10).collect::<Vec<i32>>())?;
/// let mut p = Process::new(f, (num.clone(), arr.clone()));
/// p.start()?;
/// p.join()?;
/// println!("{}", num.get());
/// println!("{:?}", arr.to_vec());
/// # Ok(())
/// # }
/// ```
pub struct Value<T: Pod> {
    map: Arc<Block>,
    /// The lock it was built over (`None`: the word beside its data).
    lock: Option<AnyLock>,
    _t: PhantomData<T>,
}

impl<T: Pod> Clone for Value<T> {
    fn clone(&self) -> Self {
        Value {
            map: Arc::clone(&self.map),
            lock: self.lock.clone(),
            _t: PhantomData,
        }
    }
}

/// The lock of a [`Value`], held; derefs to the value.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ValueGuard<'a, T: Pod> {
    value: &'a Value<T>,
    local: T,
    dirty: bool,
    _held: Held<'a>,
}

impl<T: Pod> Value<T> {
    const DATA: usize = data_offset::<T>(LOCK_HEADER);

    /// A new shared value holding `value`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    ///
    /// # Examples
    ///
    /// ```
    /// let counter = multiproc::Value::new(0i64)?;
    /// counter.fetch_add(5);
    /// *counter.lock()? += 1;
    /// assert_eq!(counter.get(), 6);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new(value: T) -> Result<Value<T>> {
        Self::create(value, None)
    }

    /// A new shared value holding `value`, guarded by an existing
    /// [`Lock`] or [`RLock`](crate::sync::RLock) (CPython's `lock=`):
    /// [`lock`](Value::lock), [`get`](Value::get) and [`set`](Value::set)
    /// take that lock, so one critical section can cover several values.
    /// With an `RLock`, a thread that holds it can still `get` and `set`
    /// (CPython's default); with a `Lock` it would wait for itself.
    ///
    /// The value keeps its own memory and the lock keeps its own (the
    /// value's handle holds the lock's, and sends it along when it
    /// travels).
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    ///
    /// # Examples
    ///
    /// ```
    /// use multiproc::{sync::RLock, Value};
    ///
    /// let lock = RLock::new()?;
    /// let x = Value::with_lock(1i64, lock.clone())?;
    /// let y = Value::with_lock(2i64, lock.clone())?;
    /// {
    ///     let _both = lock.acquire()?; // one critical section for x and y
    ///     let (a, b) = (x.get(), y.get()); // re-entrant: no deadlock
    ///     x.set(b);
    ///     y.set(a);
    /// }
    /// assert_eq!((x.get(), y.get()), (2, 1));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn with_lock(value: T, lock: impl Into<AnyLock>) -> Result<Value<T>> {
        Self::create(value, Some(lock.into()))
    }

    fn create(value: T, lock: Option<AnyLock>) -> Result<Value<T>> {
        let map = new_block::<Self>(
            "multiproc-value",
            Self::DATA + std::mem::size_of::<T>(),
            std::mem::align_of::<T>().max(8),
        )?;
        map.store_pods(Self::DATA, std::slice::from_ref(&value))?;
        Ok(Value {
            map,
            lock,
            _t: PhantomData,
        })
    }

    /// The lock that guards the value (CPython's `get_lock()`): the one it
    /// was built over, or a [`Lock`] handle onto the word beside its data
    /// (taking it excludes [`lock`](Value::lock), `get` and `set`).
    ///
    /// A lock of the second kind is a view of the value's memory: it
    /// cannot be sent to another process on its own (that is an
    /// [`Error::Misuse`](crate::Error::Misuse) when encoding); send the
    /// value, or build it [`with_lock`](Value::with_lock) over a `Lock`
    /// of its own.
    pub fn get_lock(&self) -> AnyLock {
        match &self.lock {
            Some(lock) => lock.clone(),
            None => AnyLock::Lock(Lock::view_of(Arc::clone(&self.map))),
        }
    }

    fn header(&self) -> Header<'_> {
        self.map.lock_header()
    }

    fn hold(&self, deadline: Option<std::time::Instant>) -> Option<(Held<'_>, bool)> {
        match &self.lock {
            Some(lock) => lock.hold(deadline, true),
            None => RawGuard::lock(self.header(), deadline)
                .map(|(raw, poisoned)| (Held::Raw(raw), poisoned)),
        }
    }

    fn read(&self) -> T {
        let mut out = T::zeroed();
        // In range by construction (checked on creation and arrival).
        let _ = self
            .map
            .load_pods(Self::DATA, std::slice::from_mut(&mut out));
        out
    }

    fn write(&self, value: &T) {
        let _ = self.map.store_pods(Self::DATA, std::slice::from_ref(value));
    }

    fn guard<'a>(&'a self, held: Held<'a>) -> ValueGuard<'a, T> {
        ValueGuard {
            value: self,
            local: self.read(),
            dirty: false,
            _held: held,
        }
    }

    /// Takes the value's lock; the guard derefs to the value.
    ///
    /// # Errors
    ///
    /// `Err(PoisonError)` with the guard if a holder died or panicked
    /// holding the lock (see [`Lock::acquire`](crate::Lock::acquire)).
    pub fn lock(&self) -> LockResult<ValueGuard<'_, T>> {
        loop {
            if let Some((held, poisoned)) = self.hold(None) {
                let guard = self.guard(held);
                return if poisoned {
                    Err(PoisonError::new(guard))
                } else {
                    Ok(guard)
                };
            }
        }
    }

    /// As [`lock`](Value::lock), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// `Err(TryLockError::WouldBlock)` on timeout; poisoning as for `lock`.
    pub fn lock_timeout(&self, timeout: Duration) -> TryLockResult<ValueGuard<'_, T>> {
        match self.hold(deadline(timeout)) {
            None => Err(TryLockError::WouldBlock),
            Some((held, false)) => Ok(self.guard(held)),
            Some((held, true)) => Err(TryLockError::Poisoned(PoisonError::new(self.guard(held)))),
        }
    }

    /// A copy of the value, read under the lock (a poisoned lock is
    /// ignored: the copy is returned anyway).
    pub fn get(&self) -> T {
        match self.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    /// Replaces the value, under the lock (poisoning ignored).
    pub fn set(&self, value: T) {
        let mut guard = match self.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *guard = value;
    }

    /// `true` if a holder of the lock died or panicked holding it.
    pub fn is_poisoned(&self) -> bool {
        match &self.lock {
            Some(lock) => lock.is_poisoned(),
            None => self.header().is_poisoned(),
        }
    }

    /// Clears the poison flag.
    pub fn clear_poison(&self) {
        match &self.lock {
            Some(lock) => lock.clear_poison(),
            None => self.header().clear_poison(),
        }
    }
}

impl<T: Pod> Deref for ValueGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.local
    }
}

impl<T: Pod> DerefMut for ValueGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.dirty = true;
        &mut self.local
    }
}

impl<T: Pod> Drop for ValueGuard<'_, T> {
    fn drop(&mut self) {
        // Runs before the lock (`_raw`) is released.
        if self.dirty {
            self.value.write(&self.local);
        }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ValueGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ValueGuard").field(&self.local).finish()
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Read without the lock: a Debug print must not block.
        f.debug_tuple("Value").field(&self.read()).finish()
    }
}

/// Travels as its memory and the lock it was built over, if any.
impl<T: Pod> HandleWire for Value<T> {
    const KIND: Kind = Kind::Value;
    type Elem = T;
    type Plain = Option<AnyLock>;

    fn parts(&self) -> Result<Parts<'_, Option<AnyLock>>> {
        Ok(Parts::block(&self.map, self.lock.clone()))
    }

    fn mapping_size(_: &Option<AnyLock>) -> Result<usize> {
        Ok(Self::DATA + std::mem::size_of::<T>())
    }

    fn rebuild(lock: Option<AnyLock>, fds: &mut Received) -> Result<Self> {
        Ok(Value {
            map: fds.block()?,
            lock,
            _t: PhantomData,
        })
    }
}

handle_serde!([T: Pod] Value<T>);

mod sealed {
    pub trait Sealed {}
}

/// The integer types whose [`Value`]s have lock-free atomic operations:
/// `i32`, `u32`, `i64`, `u64`, `isize`, `usize`. Sealed: the methods are
/// implementation details, call them on [`Value`].
pub trait AtomicInteger: Pod + sealed::Sealed {
    #[doc(hidden)]
    fn fetch_add(value: &Value<Self>, v: Self) -> Self;
    #[doc(hidden)]
    fn fetch_sub(value: &Value<Self>, v: Self) -> Self;
    #[doc(hidden)]
    fn compare_exchange(
        value: &Value<Self>,
        current: Self,
        new: Self,
    ) -> std::result::Result<Self, Self>;
    #[doc(hidden)]
    fn swap(value: &Value<Self>, v: Self) -> Self;
    #[doc(hidden)]
    fn load(value: &Value<Self>) -> Self;
    #[doc(hidden)]
    fn store(value: &Value<Self>, v: Self);
}

// The atomic cannot be missing: the data offset is aligned and in range by
// construction (checked on creation and on arrival). The fallbacks only
// keep the library free of panics.
macro_rules! atomic_integer {
    ($($t:ty => $a:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl AtomicInteger for $t {
            #[inline]
            fn fetch_add(value: &Value<$t>, v: $t) -> $t {
                value.atomic::<$a>().map_or(0, |a| a.fetch_add(v, Ordering::SeqCst))
            }
            #[inline]
            fn fetch_sub(value: &Value<$t>, v: $t) -> $t {
                value.atomic::<$a>().map_or(0, |a| a.fetch_sub(v, Ordering::SeqCst))
            }
            #[inline]
            fn compare_exchange(value: &Value<$t>, current: $t, new: $t) -> std::result::Result<$t, $t> {
                value
                    .atomic::<$a>()
                    .map_or(Err(current), |a| a.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst))
            }
            #[inline]
            fn swap(value: &Value<$t>, v: $t) -> $t {
                value.atomic::<$a>().map_or(0, |a| a.swap(v, Ordering::SeqCst))
            }
            #[inline]
            fn load(value: &Value<$t>) -> $t {
                value.atomic::<$a>().map_or(0, |a| a.load(Ordering::SeqCst))
            }
            #[inline]
            fn store(value: &Value<$t>, v: $t) {
                if let Ok(a) = value.atomic::<$a>() {
                    a.store(v, Ordering::SeqCst);
                }
            }
        }
    )*};
}

atomic_integer!(
    i32 => std::sync::atomic::AtomicI32,
    u32 => std::sync::atomic::AtomicU32,
    i64 => std::sync::atomic::AtomicI64,
    u64 => std::sync::atomic::AtomicU64,
    isize => std::sync::atomic::AtomicIsize,
    usize => std::sync::atomic::AtomicUsize
);

impl<T: Pod> Value<T> {
    #[inline]
    fn atomic<A: AtomicWord>(&self) -> Result<&A> {
        Ok(self.map.atomic_at::<A>(Self::DATA)?)
    }
}

impl<T: AtomicInteger> Value<T> {
    /// Adds `v` (wrapping) without taking the lock; returns the previous
    /// value. One atomic instruction, sequentially consistent.
    ///
    /// # Examples
    ///
    /// ```
    /// let n = multiproc::Value::new(41u64)?;
    /// assert_eq!(n.fetch_add(1), 41);
    /// assert_eq!(n.load(), 42);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[inline]
    pub fn fetch_add(&self, v: T) -> T {
        T::fetch_add(self, v)
    }

    /// Subtracts `v` (wrapping) without taking the lock; returns the
    /// previous value.
    #[inline]
    pub fn fetch_sub(&self, v: T) -> T {
        T::fetch_sub(self, v)
    }

    /// Stores `new` if the value is `current`, without taking the lock.
    ///
    /// # Errors
    ///
    /// `Err(actual)` with the value found when it was not `current`.
    #[inline]
    pub fn compare_exchange(&self, current: T, new: T) -> std::result::Result<T, T> {
        T::compare_exchange(self, current, new)
    }

    /// Stores `v` and returns the previous value, without taking the lock.
    #[inline]
    pub fn swap(&self, v: T) -> T {
        T::swap(self, v)
    }

    /// Reads the value without taking the lock.
    #[inline]
    pub fn load(&self) -> T {
        T::load(self)
    }

    /// Writes the value without taking the lock.
    #[inline]
    pub fn store(&self, v: T) {
        T::store(self, v)
    }
}

/// A `T` in shared memory without a lock: Python's `RawValue`. Reads and
/// writes are copies made of relaxed atomic word accesses, so a read that
/// races a write may see a mix of old and new words (for types wider than
/// 8 bytes), never undefined behaviour.
///
/// # Examples
///
/// ```
/// let v = multiproc::shared::RawValue::new([1u8, 2, 3])?;
/// v.set([4, 5, 6]);
/// assert_eq!(v.get(), [4, 5, 6]);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct RawValue<T: Pod> {
    map: Arc<Block>,
    _t: PhantomData<T>,
}

impl<T: Pod> Clone for RawValue<T> {
    fn clone(&self) -> Self {
        RawValue {
            map: Arc::clone(&self.map),
            _t: PhantomData,
        }
    }
}

impl<T: Pod> RawValue<T> {
    const DATA: usize = data_offset::<T>(8);

    /// A new shared value holding `value`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) if the shared memory cannot be created.
    pub fn new(value: T) -> Result<RawValue<T>> {
        let map = new_block::<Self>(
            "multiproc-rawvalue",
            Self::DATA + std::mem::size_of::<T>(),
            std::mem::align_of::<T>().max(8),
        )?;
        map.store_pods(Self::DATA, std::slice::from_ref(&value))?;
        Ok(RawValue {
            map,
            _t: PhantomData,
        })
    }

    /// A copy of the value.
    pub fn get(&self) -> T {
        let mut out = T::zeroed();
        let _ = self
            .map
            .load_pods(Self::DATA, std::slice::from_mut(&mut out));
        out
    }

    /// Replaces the value.
    pub fn set(&self, value: T) {
        let _ = self
            .map
            .store_pods(Self::DATA, std::slice::from_ref(&value));
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for RawValue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RawValue").field(&self.get()).finish()
    }
}

impl<T: Pod> HandleWire for RawValue<T> {
    const KIND: Kind = Kind::RawValue;
    type Elem = T;
    type Plain = ();

    fn parts(&self) -> Result<Parts<'_, ()>> {
        Ok(Parts::block(&self.map, ()))
    }

    fn mapping_size((): &()) -> Result<usize> {
        Ok(Self::DATA + std::mem::size_of::<T>())
    }

    fn rebuild((): (), fds: &mut Received) -> Result<Self> {
        Ok(RawValue {
            map: fds.block()?,
            _t: PhantomData,
        })
    }
}

handle_serde!([T: Pod] RawValue<T>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_writes_back_and_atomics_work() {
        let v = Value::new(5i64).expect("value");
        {
            let mut g = v.lock().expect("lock");
            *g += 10;
        }
        assert_eq!(v.get(), 15);
        assert_eq!(v.fetch_add(5), 15);
        assert_eq!(v.fetch_sub(1), 20);
        assert_eq!(v.compare_exchange(19, 7), Ok(19));
        assert_eq!(v.compare_exchange(19, 8), Err(7));
        v.store(-3);
        assert_eq!(v.load(), -3);
        let w = v.clone();
        w.set(9);
        assert_eq!(v.get(), 9);
    }

    #[test]
    fn threads_count_with_lock_and_atomics() {
        let v = Value::new(0u64).expect("value");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        *v.lock().expect("lock") += 1;
                        v.fetch_add(1);
                    }
                });
            }
        });
        // Atomic updates racing a guard's write-back may be lost: only the
        // lower bound from the locked increments is certain.
        assert!(v.get() >= 4000);
        let c = Value::new(0u64).expect("value");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        *c.lock().expect("lock") += 1;
                    }
                });
            }
        });
        assert_eq!(c.get(), 4000);
    }
}
