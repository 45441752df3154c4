use multiproc::ProcessTask;

#[derive(ProcessTask)]
struct Job {
    id: u64,
}

impl ProcessTask for Job {
    fn run(self) {}
}

fn main() {}
