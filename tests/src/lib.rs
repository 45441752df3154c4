//! Shared helpers for the integration tests, and functions registered in a
//! crate other than the test binaries (proving that registrations from
//! another crate of the workspace reach a child).
use multiproc::process_fn;

/// Registered in this crate, called from the test binaries.
#[process_fn]
pub fn helper_triple(x: u64) -> u64 {
    x * 3
}

/// The number of open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}
