//! A program for the boot tests whose `main` has `#[multiproc::main]`:
//! its children run from `main`'s first line, on the real main thread. The
//! scenarios (the same as `boot_probe`'s) are in `src/probe/scenarios.rs`.
#[path = "../probe/scenarios.rs"]
mod scenarios;

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    scenarios::run_scenario()
}
