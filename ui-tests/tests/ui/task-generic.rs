use multiproc::ProcessTask;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, ProcessTask)]
struct Job<T> {
    input: T,
}

impl<T> ProcessTask for Job<T>
where
    T: Serialize + for<'de> Deserialize<'de> + 'static,
{
    fn run(self) {}
}

fn main() {}
