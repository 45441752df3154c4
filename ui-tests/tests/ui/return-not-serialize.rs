use multiproc::process_fn;

struct Report {
    lines: usize,
}

#[process_fn]
fn report(lines: usize) -> Report {
    Report { lines }
}

fn main() {}
