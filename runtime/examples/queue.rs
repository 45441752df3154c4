//! The tutorial's Queue example: a child puts a list, the parent gets it.
//!
//! Python:
//! ```python
//! def f(q):
//!     q.put([38, None, "hello"])
//! if __name__ == "__main__":
//!     q = Queue(); p = Process(target=f, args=(q,)); p.start()
//!     print(q.get()); p.join()
//! ```
use multiproc::{Process, Queue, process_fn};

#[process_fn]
fn f(q: Queue<(u32, String, String)>) {
    q.put((38, "snake".to_string(), "hello".to_string())).ok();
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let q = Queue::new()?;
    let mut p = Process::new(f, (q.clone(),));
    p.start()?;
    println!("{:?}", q.get()?);
    p.join()?;
    Ok(())
}
