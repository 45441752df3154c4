//! The integration tests of processes that may run in parallel with each
//! other: how a child boots and reports, `Process`, `spawn`, the Pool and
//! its futures, Listener/Client, `wait`.
//!
//! Integration tests live in a few binaries, not one per file: every test
//! binary is linked once per build profile, and under LTO the links are
//! most of CI's time. Two binaries of about the same size (this one and
//! `objects`) keep both cores busy under `codegen-units = 1`, where one
//! binary is one compile job. A test that counts or changes something of
//! the whole process (descriptors, children, limits, the child
//! initializer, the logger) goes in `alone`; one that changes the default
//! start method or the pids cgroup has its own binary (forkserver.rs,
//! forkserver_limits.rs).
mod boot;
mod listener;
mod pool;
mod pool_futures;
mod process;
mod process_more;
mod wait;
