use multiproc::ProcessTask;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, ProcessTask)]
enum Command {
    Start { id: u64 },
    Stop(u64),
    Shutdown,
}

impl ProcessTask for Command {
    fn run(self) {
        match self {
            Command::Start { id } | Command::Stop(id) => println!("{id}"),
            Command::Shutdown => {}
        }
    }
}

fn main() {
    Command::Shutdown.run();
}
