//! What the macros expand to. Not public API: no stability guarantees.
//!
//! Kept in its own file because the ui-tests' snapshots quote these lines.

pub use inventory;
pub use serde;

pub use crate::child::{init, main_init};
pub use crate::process::MainGuard;
pub use crate::registry::{Call, Entry, type_id_of};

/// A type that can travel to or from another process.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot travel to another process",
    label = "`{Self}` must implement serde's `Serialize` and `Deserialize` (and own its data: no borrows)",
    note = "arguments and results of a #[process_fn] are encoded with serde: add `#[derive(serde::Serialize, serde::Deserialize)]` to the type"
)]
pub trait Travels: serde::Serialize + serde::de::DeserializeOwned + 'static {}

impl<T: serde::Serialize + serde::de::DeserializeOwned + 'static> Travels for T {}

/// Fails to compile unless `T` can travel as an argument.
pub fn assert_arg<T: Travels>() {}

/// Fails to compile unless `T` can travel as a result.
pub fn assert_ret<T: Travels>() {}

/// Implemented by `#[derive(ProcessTask)]`: the type is registered.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not registered as a process task",
    label = "add `#[derive(ProcessTask)]` to `{Self}`",
    note = "`ProcessTask` needs `#[derive(ProcessTask)]` on the type, which registers it so a child process can run it"
)]
pub trait RegisteredTask {
    /// The registered name.
    const NAME: &'static str;
}
