//! The tutorial's first Process example: two children, each given a
//! function and its arguments, then "end" once both have been joined.
//!
//! Python:
//! ```python
//! def start(name):
//!     print(f"l am a {name}")
//!
//! if __name__ == "__main__":
//!     p1 = Process(target=start, args=("snake",))
//!     p2 = Process(target=start, args=("tom",))
//!     p1.start(); p2.start(); p1.join(); p2.join()
//!     print("end")
//! ```
use multiproc::{Process, process_fn};

#[process_fn]
fn start(name: String) {
    println!("l am a {name}");
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let mut p1 = Process::new(start, ("snake".to_string(),));
    let mut p2 = Process::new(start, ("tom".to_string(),));
    p1.start()?;
    p1.join()?;
    p2.start()?;
    p2.join()?;
    println!("end");
    Ok(())
}
