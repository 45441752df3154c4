//! The Python docs' shared-memory example: a child sets a shared float and
//! negates every element of a shared array.
//!
//! Python:
//! ```python
//! def f(n, a):
//!     n.value = 3.1415927
//!     for i in range(len(a)):
//!         a[i] = -a[i]
//!
//! if __name__ == '__main__':
//!     num = Value('d', 0.0)
//!     arr = Array('i', range(10))
//!     p = Process(target=f, args=(num, arr))
//!     p.start()
//!     p.join()
//!     print(num.value)
//!     print(arr[:])
//! ```
use multiproc::{Array, Process, Value, process_fn};

#[process_fn]
#[allow(clippy::approx_constant)] // the Python docs' literal
fn f(n: Value<f64>, a: Array<i32>) {
    n.set(3.1415927);
    let mut a = a.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for x in a.iter_mut() {
        *x = -*x;
    }
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let num = Value::new(0.0f64)?;
    let arr = Array::new(&(0..10).collect::<Vec<i32>>())?;
    let mut p = Process::new(f, (num.clone(), arr.clone()));
    p.start()?;
    p.join()?;
    println!("{}", num.get());
    println!("{:?}", arr.to_vec());
    Ok(())
}
