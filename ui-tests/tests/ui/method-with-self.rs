use multiproc::process_fn;

struct Counter;

impl Counter {
    #[process_fn]
    fn count(&self) -> u64 {
        0
    }
}

fn main() {
    let _ = Counter.count();
}
