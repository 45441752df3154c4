//! `ProcessTask`: a type whose `run` runs in a child process.
//!
//! Kept in its own file (like `private.rs`) because the ui-tests' snapshots
//! quote these lines.

use crate::__private;

/// A type whose [`run`](ProcessTask::run) runs in a child process, like a
/// Python class that overrides `Process.run`. Start it with
/// [`Process::from_task`](crate::Process::from_task).
///
/// Add `#[derive(ProcessTask)]` (which registers the type) and implement
/// this trait by hand:
///
/// ```no_run
/// use multiproc::{Process, ProcessTask};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, ProcessTask)]
/// struct Greeter {
///     name: String,
/// }
///
/// impl ProcessTask for Greeter {
///     fn run(self) {
///         println!("l am a {}", self.name);
///     }
/// }
///
/// # fn main() -> multiproc::Result<()> {
/// let mut p = Process::from_task(Greeter { name: "tom".into() });
/// p.start()?;
/// p.join()?;
/// # Ok(())
/// # }
/// ```
pub trait ProcessTask:
    __private::RegisteredTask + serde::Serialize + serde::de::DeserializeOwned + 'static
{
    /// The work, run in the child.
    fn run(self);

    /// The process name to use; `None` gives Python's `Process-N`.
    fn name(&self) -> Option<String> {
        None
    }
}
