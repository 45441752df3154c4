//! Several producers and consumers around a JoinableQueue: producers put
//! numbers, consumers square them and mark each task done, the parent
//! waits with `join()` until every task is done, then closes the results
//! queue and iterates over it.
use multiproc::queue::JoinableQueue;
use multiproc::{Process, Queue, process_fn};

#[process_fn]
fn produce(tasks: JoinableQueue<Option<u64>>, from: u64, to: u64) {
    for n in from..to {
        tasks.put(Some(n)).ok();
    }
}

#[process_fn]
fn consume(tasks: JoinableQueue<Option<u64>>, results: Queue<u64>) {
    while let Ok(Some(n)) = tasks.get() {
        results.put(n * n).ok();
        tasks.task_done().ok();
    }
    tasks.task_done().ok(); // the `None` that told us to stop
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let tasks = JoinableQueue::new()?;
    let results = Queue::new()?;
    let mut procs = Vec::new();
    for k in 0..3 {
        procs.push(Process::new(
            produce,
            (tasks.clone(), k * 100, (k + 1) * 100),
        ));
    }
    for _ in 0..2 {
        procs.push(Process::new(consume, (tasks.clone(), results.clone())));
    }
    procs.iter_mut().try_for_each(|p| p.start())?;
    procs[..3].iter_mut().try_for_each(|p| p.join().map(drop))?;
    tasks.join()?; // every number was processed
    (0..2).try_for_each(|_| tasks.put(None))?;
    procs[3..].iter_mut().try_for_each(|p| p.join().map(drop))?;
    results.close(); // no producer is left: `iter` ends once it is drained
    let sum: u64 = results.iter().sum();
    println!("sum of squares of 0..300: {sum}");
    Ok(())
}
