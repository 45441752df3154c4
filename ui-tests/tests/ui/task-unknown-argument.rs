use multiproc::ProcessTask;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, ProcessTask)]
#[multiproc(rename = "job")]
struct Job {
    id: u64,
}

impl ProcessTask for Job {
    fn run(self) {}
}

fn main() {}
