use multiproc::process_fn;

#[process_fn]
fn numbers(n: u32) -> impl Iterator<Item = u32> {
    0..n
}

fn main() {}
