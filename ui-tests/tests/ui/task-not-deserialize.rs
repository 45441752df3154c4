use multiproc::ProcessTask;
use serde::Serialize;

#[derive(Serialize, ProcessTask)]
struct Job {
    id: u64,
}

impl ProcessTask for Job {
    fn run(self) {}
}

fn main() {}
