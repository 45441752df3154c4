use multiproc::process_fn;

struct Config {
    verbose: bool,
}

#[process_fn]
fn configure(config: Config) -> bool {
    config.verbose
}

fn main() {}
