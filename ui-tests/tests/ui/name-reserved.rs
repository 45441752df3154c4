use multiproc::process_fn;

#[process_fn(name = "__multiproc::pool::worker")]
fn impostor(x: u64) -> u64 {
    x
}

fn main() {}
