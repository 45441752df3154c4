//! multiproc's fault matrix: every fault scenario, N times, each run in a
//! fresh process under a watchdog, with leak checks after each run. See
//! `chaos/README.md` for the table it prints and what each column means.
//!
//! ```text
//! cargo run --release -p multiproc-chaos -- --runs 100
//! cargo run --release -p multiproc-chaos -- --only queue/ --runs 10 --seed 7
//! ```
//!
//! This one executable plays every part: the driver (no sub-command), a
//! run (`__run <scenario>`, started by the driver), a probe program some
//! scenarios start (`__probe <name>`), and, as every multiproc program,
//! its own children (dispatched before `main`).
mod ctx;
mod harness;
mod scenarios;
mod util;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__run") => harness::run_main(&args[1..]),
        Some("__probe") => std::process::exit(scenarios::probe_main(&args[1..])),
        _ => match harness::parse_options(&args) {
            Ok(opts) => std::process::exit(harness::driver_main(&opts)),
            Err(msg) => {
                if !msg.is_empty() {
                    eprintln!("{msg}");
                }
                eprintln!("{}", harness::USAGE);
                std::process::exit(if msg.is_empty() { 0 } else { 2 });
            }
        },
    }
}
