use multiproc::process_fn;

#[process_fn]
struct Job {
    id: u64,
}

fn main() {}
