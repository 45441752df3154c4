// Builders, iterators and the bool of a try_/_timeout are #[must_use].
#![deny(unused_must_use)]

use std::time::Duration;

use multiproc::sync::{Event, Semaphore};
use multiproc::{Pool, Queue};

fn main() {
    Pool::builder().processes(2);
    let q = Queue::<u8>::new().unwrap();
    q.iter();
    let sem = Semaphore::new(1).unwrap();
    sem.try_acquire();
    Event::new().unwrap().wait_timeout(Duration::ZERO);
}
