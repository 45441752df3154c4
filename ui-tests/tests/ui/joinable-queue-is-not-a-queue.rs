// A JoinableQueue has the queue's methods but is not a Queue (no Deref):
// it travels as a kind of its own, and task counting must not be bypassed.
use multiproc::Queue;
use multiproc::queue::JoinableQueue;

fn drain(q: &Queue<u8>) -> usize {
    q.try_iter().count()
}

fn main() {
    let q = JoinableQueue::<u8>::new().unwrap();
    drain(&q);
}
