#[multiproc::test]
fn works(n: u32) {
    assert!(n > 0);
}

fn main() {}
