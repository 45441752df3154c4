use multiproc::process_fn;

#[process_fn]
fn identity<T: serde::Serialize>(x: T) -> T {
    x
}

fn main() {}
