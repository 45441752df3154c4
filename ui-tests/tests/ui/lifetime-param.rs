use multiproc::process_fn;
use std::borrow::Cow;

#[process_fn]
fn shout<'a>(text: Cow<'a, str>) -> String {
    text.to_uppercase()
}

fn main() {}
