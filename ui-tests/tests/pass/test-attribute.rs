use multiproc::process_fn;

#[process_fn]
fn double(x: i32) -> i32 {
    x * 2
}

#[multiproc::test]
fn doubles() {
    assert_eq!(double(2), 4);
}

#[multiproc::test]
#[should_panic(expected = "boom")]
fn panics() {
    panic!("boom");
}

#[multiproc::test]
#[ignore]
fn returns_result() -> Result<(), String> {
    Ok(())
}

fn main() {}
