use multiproc::ProcessTask;
use serde::{Deserialize, Serialize};

/// A task with named fields.
#[derive(Serialize, Deserialize, ProcessTask)]
struct Greeter {
    name: String,
}

impl ProcessTask for Greeter {
    fn run(self) {
        println!("hello, {}", self.name);
    }

    fn name(&self) -> Option<String> {
        Some(format!("greeter-{}", self.name))
    }
}

#[derive(Serialize, Deserialize, ProcessTask)]
struct Tuple(u8, String);

impl ProcessTask for Tuple {
    fn run(self) {
        let _ = (self.0, self.1);
    }
}

#[derive(Serialize, Deserialize, ProcessTask)]
struct Unit;

impl ProcessTask for Unit {
    fn run(self) {}
}

fn main() {
    let name = <Greeter as multiproc::__private::RegisteredTask>::NAME;
    assert!(name.ends_with("::Greeter"), "{name}");
    assert!(<Unit as multiproc::__private::RegisteredTask>::NAME.ends_with("::Unit"));
    Greeter { name: "bob".into() }.run();
}
