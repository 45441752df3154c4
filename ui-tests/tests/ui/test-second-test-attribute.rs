#[multiproc::test]
#[test]
fn works() {}

fn main() {}
