use multiproc::ProcessTask;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, ProcessTask)]
struct Job {
    id: u64,
}

fn main() {}
