//! Compile-fail and must-compile cases for the multiproc macros.
//!
//! The cases live in `tests/ui` (each must fail to compile with the error in
//! its `.stderr` file) and `tests/pass` (each must compile); `tests/ui.rs`
//! runs them with trybuild. Regenerate the snapshots with
//! `TRYBUILD=overwrite cargo test -p multiproc-ui-tests` and review the diff.
