use multiproc::process_fn;

#[process_fn]
fn parse(text: String) -> Result<u64, String> {
    text.parse().map_err(|e: std::num::ParseIntError| e.to_string())
}

/// The program's entry point; its doc comment and attributes are kept.
#[multiproc::main]
#[allow(clippy::needless_return)]
fn main() -> Result<(), String> {
    let n = parse("12".to_string())?;
    if n != 12 {
        return Err("wrong".into());
    }
    Ok(())
}
