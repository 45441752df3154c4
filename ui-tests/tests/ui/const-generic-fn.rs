use multiproc::process_fn;

#[process_fn]
fn zeros<const N: usize>() -> [u8; N] {
    [0; N]
}

fn main() {}
