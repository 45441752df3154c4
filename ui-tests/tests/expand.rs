//! The macros' output, run for real: each registered function and task is
//! started in a child process through the runtime, and this file is built
//! with the workspace lints (and clippy in CI), so generated code that warns
//! would fail here.

use multiproc as mp;
use multiproc::{Process, ProcessTask, process_fn};
use serde::{Deserialize, Serialize};

#[process_fn]
fn zero() -> u64 {
    7
}

#[process_fn]
fn join_words(first: String, mut second: String, times: usize) -> String {
    second.push('!');
    format!("{first} {}", second.repeat(times))
}

#[process_fn(name = "expand::renamed")]
fn renamed(x: i32) -> i32 {
    -x
}

#[mp::process_fn(crate = "mp")]
fn through_alias(values: Vec<u8>) -> usize {
    values.len()
}

#[allow(clippy::too_many_arguments)]
#[process_fn]
fn eight(a: u8, b: u8, c: u8, d: u8, e: u8, f: u8, g: u8, h: u8) -> u32 {
    [a, b, c, d, e, f, g, h].iter().map(|&x| u32::from(x)).sum()
}

/// Exits with the code it carries, so the parent can see it ran.
#[derive(Serialize, Deserialize, ProcessTask)]
struct ExitWith(i32);

impl ProcessTask for ExitWith {
    fn run(self) {
        std::process::exit(self.0);
    }
}

/// An enum task with a name override.
#[derive(Serialize, Deserialize, ProcessTask)]
#[multiproc(name = "expand::Signal")]
enum Signal {
    Ok,
    Fail { code: i32 },
}

impl ProcessTask for Signal {
    fn run(self) {
        if let Signal::Fail { code } = self {
            std::process::exit(code);
        }
    }
}

#[multiproc::test]
fn process_fns_run_in_a_child() -> multiproc::Result<()> {
    assert_eq!(multiproc::spawn(zero, ())?.join()?, 7);
    let words = multiproc::spawn(join_words, ("hi".to_string(), "there".to_string(), 2))?;
    assert_eq!(words.join()?, "hi there!there!");
    assert_eq!(multiproc::spawn(renamed, (5,))?.join()?, -5);
    assert_eq!(
        multiproc::spawn(through_alias, (vec![1, 2, 3],))?.join()?,
        3
    );
    assert_eq!(
        multiproc::spawn(eight, (1, 2, 3, 4, 5, 6, 7, 8))?.join()?,
        36
    );
    Ok(())
}

#[multiproc::test]
fn tasks_run_in_a_child() -> multiproc::Result<()> {
    let mut exit = Process::from_task(ExitWith(3));
    exit.start()?;
    assert_eq!(exit.join()?.code(), 3);

    let mut ok = Process::from_task(Signal::Ok);
    ok.start()?;
    assert!(ok.join()?.success());

    let mut fail = Process::from_task(Signal::Fail { code: 4 });
    fail.start()?;
    assert_eq!(fail.join()?.code(), 4);
    Ok(())
}

#[test]
fn names_are_the_module_path_or_the_override() {
    use multiproc::__private::RegisteredTask;
    assert_eq!(<ExitWith as RegisteredTask>::NAME, "expand::ExitWith");
    assert_eq!(<Signal as RegisteredTask>::NAME, "expand::Signal");
    let names = multiproc::registry::registered_names();
    for name in [
        "expand::zero",
        "expand::join_words",
        "expand::renamed",
        "expand::through_alias",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
}
