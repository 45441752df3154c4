//! The integration tests that count or change something of the whole
//! process: its open descriptors, its children, its limits
//! (`RLIMIT_NOFILE`, `RLIMIT_AS`), the child initializer, the logger.
//! Each takes `multiproc_tests::alone()` first, so they run one at a time
//! (and never beside another binary's tests: cargo runs the binaries one
//! after the other). One binary, not one per file: under LTO each test
//! binary's link is most of its build.
mod arena;
mod child_init;
mod connection;
mod connection_faults;
mod handles;
mod logging;
mod queue;
mod zombies;
