//! The registered work functions the benches map (a library crate's
//! registrations reach every bench binary that links it).

use std::hint::black_box;

use multiproc::process_fn;

/// `x³`, the memory-bound task of the `map` benches.
#[process_fn]
pub fn cube(x: u64) -> u64 {
    x * x * x
}

/// About `iters` rounds of integer work: a CPU-bound task of a chosen cost.
#[process_fn]
pub fn burn(iters: u64) -> u64 {
    let mut acc: u64 = 0;
    for i in 0..iters {
        acc = black_box(acc.wrapping_mul(31).wrapping_add(i) & 0xFFFF_FFFF);
    }
    acc
}
