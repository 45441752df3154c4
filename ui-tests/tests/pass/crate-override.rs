use multiproc as mp;
use serde::{Deserialize, Serialize};

#[mp::process_fn(crate = "mp")]
fn cube(x: u64) -> u64 {
    x * x * x
}

#[derive(Serialize, Deserialize, mp::ProcessTask)]
#[multiproc(crate = "mp")]
struct Job {
    id: u64,
}

impl mp::ProcessTask for Job {
    fn run(self) {
        let _ = self.id;
    }
}

#[mp::test(crate = "mp")]
fn works() {}

#[mp::main(crate = "mp")]
fn main() {
    assert_eq!(cube(2), 8);
}
