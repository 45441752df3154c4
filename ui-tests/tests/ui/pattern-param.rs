use multiproc::process_fn;

#[process_fn]
fn add((a, b): (u8, u8)) -> u8 {
    a + b
}

fn main() {}
