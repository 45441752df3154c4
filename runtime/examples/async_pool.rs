//! `.await` on pool results from an async runtime (tokio here; any works):
//! an `AsyncResult` is a `Future`, an `Imap` a `Stream`. Needs the `async`
//! feature: `cargo run --example async_pool --features async`.
use std::future::poll_fn;
use std::pin::Pin;

use futures_core::Stream;
use multiproc::{Pool, process_fn};

#[process_fn]
fn square(x: u64) -> u64 {
    x * x
}

#[process_fn]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> multiproc::Result<()> {
    let pool = Pool::new(2)?;
    // Two calls in flight at once; the task sleeps until both are back.
    let (sum, squares) = tokio::join!(
        pool.apply_async(add, (2, 3))?,
        pool.map_async(square, 0..5)?
    );
    println!("2 + 3 = {}, squares: {:?}", sum?, squares?);

    // A stream of results, in input order.
    let mut stream = pool.imap(square, 10..13)?;
    while let Some(r) = poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await {
        println!("imap: {}", r?);
    }
    Ok(())
}
