//! `Value` and `Array` built over an existing lock (CPython's `lock=`),
//! and `get_lock()`, across real processes. Every wait is bounded.

use std::sync::TryLockError;
use std::time::Duration;

use multiproc::shared::RawValue;
use multiproc::sync::{AnyLock, RLock};
use multiproc::{Array, Error, Lock, Value, process_fn};

const JOIN: Duration = Duration::from_secs(30);

/// Updates a value and an array that share one lock, and a lock-free
/// counter under that lock's guard: the counter loses updates unless the
/// shared lock excludes the other processes.
#[process_fn]
fn bump_both(x: Value<u64>, arr: Array<u64>, plain: RawValue<u64>, n: u32) {
    for _ in 0..n {
        let mut guard = x.lock().expect("not poisoned");
        *guard += 1;
        plain.set(plain.get() + 1);
        drop(guard);
        let mut elems = arr.lock().expect("not poisoned");
        elems[0] += 1;
        plain.set(plain.get() + 1);
    }
}

#[test]
fn a_value_and_an_array_over_one_lock_exclude_each_other_across_processes() {
    let lock = Lock::new().expect("lock");
    let x = Value::with_lock(0u64, lock.clone()).expect("value");
    let arr = Array::with_lock(&[0u64, 0], lock.clone()).expect("array");
    let plain = RawValue::new(0u64).expect("raw");
    let children: Vec<_> = (0..3)
        .map(|_| {
            multiproc::spawn(bump_both, (x.clone(), arr.clone(), plain.clone(), 2000))
                .expect("spawn")
        })
        .collect();
    for mut child in children {
        child.join_timeout(JOIN).expect("join");
    }
    assert_eq!(x.get(), 6000);
    assert_eq!(arr.to_vec(), [6000, 0]);
    assert_eq!(plain.get(), 12_000, "the shared lock did not exclude");
    // The guards take the lock itself.
    let guard = arr.lock().expect("not poisoned");
    assert!(matches!(lock.try_acquire(), Err(TryLockError::WouldBlock)));
    assert!(matches!(
        x.lock_timeout(Duration::from_millis(5)),
        Err(TryLockError::WouldBlock)
    ));
    drop(guard);
    assert!(lock.try_acquire().is_ok());
    assert!(matches!(x.get_lock(), AnyLock::Lock(_)));
}

#[process_fn]
fn swap_under_rlock(lock: RLock, a: Value<i64>, b: Value<i64>) -> (i64, i64) {
    let _both = lock.acquire().expect("not poisoned");
    let (x, y) = (a.get(), b.get()); // re-entrant
    a.set(y);
    b.set(x);
    (a.get(), b.get())
}

#[test]
fn values_over_an_rlock_are_reentrant_for_its_holder_in_a_child() {
    let lock = RLock::new().expect("rlock");
    let a = Value::with_lock(1i64, lock.clone()).expect("value");
    let b = Value::with_lock(2i64, lock.clone()).expect("value");
    let mut child =
        multiproc::spawn(swap_under_rlock, (lock.clone(), a.clone(), b.clone())).expect("spawn");
    assert_eq!(child.join_timeout(JOIN).expect("join"), (2, 1));
    assert_eq!((a.get(), b.get()), (2, 1));
    assert!(matches!(a.get_lock(), AnyLock::RLock(_)));
}

#[test]
fn get_lock_of_a_value_with_its_own_lock_excludes_its_guards() {
    let v = Value::new(5u32).expect("value");
    let AnyLock::Lock(lock) = v.get_lock() else {
        panic!("its own lock word is a Lock");
    };
    let held = lock.acquire().expect("not poisoned");
    assert!(matches!(
        v.lock_timeout(Duration::from_millis(5)),
        Err(TryLockError::WouldBlock)
    ));
    drop(held);
    assert_eq!(v.get(), 5);
    let arr = Array::new(&[1u8, 2]).expect("array");
    let AnyLock::Lock(lock) = arr.get_lock() else {
        panic!("an Array's lock is a Lock");
    };
    let held = lock.acquire().expect("not poisoned");
    assert!(matches!(
        arr.lock_timeout(Duration::from_millis(5)),
        Err(TryLockError::WouldBlock)
    ));
    drop(held);
    assert_eq!(arr.to_vec(), [1, 2]);
}

#[process_fn]
fn take(lock: Lock) -> bool {
    lock.try_acquire().is_ok()
}

#[test]
fn the_lock_word_of_a_value_cannot_travel_alone() {
    let v = Value::new(0u64).expect("value");
    let AnyLock::Lock(lock) = v.get_lock() else {
        panic!("a Lock");
    };
    let err = multiproc::spawn(take, (lock,))
        .map(drop)
        .expect_err("a view");
    assert!(err.to_string().contains("get_lock"), "{err}");
    assert!(matches!(err, Error::Encode { .. }), "{err:?}");
}
