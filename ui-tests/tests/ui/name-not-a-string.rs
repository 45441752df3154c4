use multiproc::process_fn;

#[process_fn(name = cube)]
fn cube(x: u64) -> u64 {
    x * x * x
}

fn main() {}
