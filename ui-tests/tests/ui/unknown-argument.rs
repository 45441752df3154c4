use multiproc::process_fn;

#[process_fn(nmae = "cube")]
fn cube(x: u64) -> u64 {
    x * x * x
}

fn main() {}
