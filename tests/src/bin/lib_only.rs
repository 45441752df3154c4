//! A program whose only registered functions live in a library crate
//! (`multiproc_tests`): a plain `main`, a pool and a spawn.
use multiproc::Pool;
use multiproc_tests::helper_triple;

fn main() -> multiproc::Result<()> {
    let pool = Pool::new(2)?;
    let tripled = pool.map(helper_triple, 1..=4u64)?;
    let one = multiproc::spawn(helper_triple, (5,))?.join()?;
    println!("{tripled:?} {one}");
    Ok(())
}
