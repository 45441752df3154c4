//! A program for the boot tests with a plain `main` (no
//! `#[multiproc::main]`): its children start from the load-time hook. The
//! scenarios are in `src/probe/scenarios.rs`.
#[path = "../probe/scenarios.rs"]
mod scenarios;

fn main() -> multiproc::Result<()> {
    scenarios::run_scenario()
}
