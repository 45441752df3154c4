//! The tutorial's first example: `with Pool(5) as p: print(p.map(cube, range(4)))`.
use multiproc::{Pool, process_fn};

#[process_fn]
fn cube(x: u64) -> u64 {
    x * x * x
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let pool = Pool::new(5)?;
    println!("{:?}", pool.map(cube, 0..4)?);
    Ok(())
}
