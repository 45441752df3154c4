//! The tutorial's Lock example: ten processes print one at a time.
//!
//! Python:
//! ```python
//! def f(l, i):
//!     l.acquire()
//!     try:
//!         print('hello world', i)
//!     finally:
//!         l.release()
//!
//! if __name__ == '__main__':
//!     lock = Lock()
//!     for num in range(10):
//!         Process(target=f, args=(lock, num)).start()
//! ```
use multiproc::{Lock, Process, process_fn};

#[process_fn]
fn f(lock: Lock, i: u32) {
    // Err only if a previous holder died holding the lock; printing is
    // still fine then, so take the guard either way.
    let _guard = lock
        .acquire()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    println!("hello world {i}");
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let lock = Lock::new()?;
    let mut procs = Vec::new();
    for num in 0..10 {
        let mut p = Process::new(f, (lock.clone(), num));
        p.start()?;
        procs.push(p);
    }
    for p in &mut procs {
        p.join()?;
    }
    Ok(())
}
