use multiproc::{ProcessTask, process_fn};
use serde::{Deserialize, Serialize};

#[process_fn(name = "custom")]
fn cube(x: u64) -> u64 {
    x * x * x
}

#[derive(Serialize, Deserialize, ProcessTask)]
#[multiproc(name = "custom-task")]
struct Job;

impl ProcessTask for Job {
    fn run(self) {}
}

fn main() {
    assert_eq!(cube(3), 27);
    assert_eq!(
        <Job as multiproc::__private::RegisteredTask>::NAME,
        "custom-task"
    );
}
