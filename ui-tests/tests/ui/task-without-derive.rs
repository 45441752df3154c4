use multiproc::ProcessTask;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Job {
    id: u64,
}

impl ProcessTask for Job {
    fn run(self) {
        println!("job {}", self.id);
    }
}

fn main() {}
