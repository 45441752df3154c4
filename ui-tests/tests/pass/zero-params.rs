use multiproc::process_fn;

#[process_fn]
fn hello() {
    println!("hello");
}

#[process_fn]
fn answer() -> u64 {
    42
}

fn main() {
    hello();
    assert_eq!(answer(), 42);
}
