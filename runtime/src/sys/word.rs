//! The atomic words the lock-word and queue-slot protocols run on, as two
//! small traits: `std`'s atomics implement them in a program, `loom`'s in
//! the models (`sys::lock::loom`, `queue::loom`), so one protocol source
//! serves both.
use std::sync::atomic::Ordering;

/// A 64-bit atomic word.
pub(crate) trait Word {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64>;
    fn swap(&self, value: u64, order: Ordering) -> u64;
}

/// A 32-bit atomic beside a word (a poison flag, a namespace register).
pub(crate) trait Cell32 {
    fn load(&self, order: Ordering) -> u32;
    fn store(&self, value: u32, order: Ordering);
    fn compare_exchange(
        &self,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u32, u32>;
}

/// Implements [`Word`] for 64-bit atomic types by calling their own
/// methods of the same names.
macro_rules! word {
    ($($ty:ty),*) => {$(
        impl Word for $ty {
            #[inline(always)]
            fn load(&self, order: Ordering) -> u64 {
                <$ty>::load(self, order)
            }
            #[inline(always)]
            fn store(&self, value: u64, order: Ordering) {
                <$ty>::store(self, value, order)
            }
            #[inline(always)]
            fn compare_exchange(
                &self,
                current: u64,
                new: u64,
                success: Ordering,
                failure: Ordering,
            ) -> Result<u64, u64> {
                <$ty>::compare_exchange(self, current, new, success, failure)
            }
            #[inline(always)]
            fn swap(&self, value: u64, order: Ordering) -> u64 {
                <$ty>::swap(self, value, order)
            }
        }
    )*};
}

/// Implements [`Cell32`] for 32-bit atomic types by calling their own
/// methods of the same names.
macro_rules! cell32 {
    ($($ty:ty),*) => {$(
        impl Cell32 for $ty {
            #[inline(always)]
            fn load(&self, order: Ordering) -> u32 {
                <$ty>::load(self, order)
            }
            #[inline(always)]
            fn store(&self, value: u32, order: Ordering) {
                <$ty>::store(self, value, order)
            }
            #[inline(always)]
            fn compare_exchange(
                &self,
                current: u32,
                new: u32,
                success: Ordering,
                failure: Ordering,
            ) -> Result<u32, u32> {
                <$ty>::compare_exchange(self, current, new, success, failure)
            }
        }
    )*};
}

word!(std::sync::atomic::AtomicU64);
cell32!(std::sync::atomic::AtomicU32);
#[cfg(loom)]
word!(loom::sync::atomic::AtomicU64);
#[cfg(loom)]
cell32!(loom::sync::atomic::AtomicU32);
