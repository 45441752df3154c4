//! `multiproc::spawn`: std::thread's shape across processes. A return
//! value comes back, and so does a panic's message.
use multiproc::process_fn;

#[process_fn]
fn square_sum(values: Vec<u64>) -> u64 {
    values.iter().map(|v| v * v).sum()
}

#[process_fn]
fn divide(a: u32, b: u32) -> u32 {
    if b == 0 {
        panic!("cannot divide {a} by zero");
    }
    a / b
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let sum = multiproc::spawn(square_sum, (vec![1, 2, 3, 4],))?.join()?;
    println!("sum of squares: {sum}");

    let ok = multiproc::spawn(divide, (10, 2))?.join()?;
    println!("10 / 2 = {ok}");

    match multiproc::spawn(divide, (1, 0))?.join() {
        Ok(v) => println!("unexpected: {v}"),
        Err(err) => println!(
            "the child panicked, as expected: {}",
            err.panic_message().unwrap_or("?")
        ),
    }
    Ok(())
}
