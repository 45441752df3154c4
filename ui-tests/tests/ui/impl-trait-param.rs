use multiproc::process_fn;

#[process_fn]
fn show(value: impl std::fmt::Display) -> String {
    value.to_string()
}

fn main() {}
