//! The tutorial's Process subclass, ported: a type whose `run` runs in the
//! child, the way a Python class overrides `Process.run`.
use multiproc::{Process, ProcessTask};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, ProcessTask)]
struct Animal {
    name: String,
}

impl ProcessTask for Animal {
    fn run(self) {
        let me = multiproc::process::current_process();
        println!(
            "l am a {} (process {}, pid {})",
            self.name,
            me.name(),
            me.pid()
        );
    }
}

#[multiproc::main]
fn main() -> multiproc::Result<()> {
    let mut children: Vec<Process> = ["snake", "tom"]
        .into_iter()
        .map(|name| {
            Process::from_task(Animal {
                name: name.to_string(),
            })
        })
        .collect();
    for child in &mut children {
        child.start()?;
    }
    for child in &mut children {
        let status = child.join()?;
        assert!(status.success(), "{} ended with {status}", child.name());
    }
    println!("end");
    Ok(())
}
