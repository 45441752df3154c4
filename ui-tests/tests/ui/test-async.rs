#[multiproc::test]
async fn works() {}

fn main() {}
