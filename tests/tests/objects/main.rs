//! The integration tests of the objects processes share, which may run in
//! parallel with each other: queues (batches, faults), shared memory and
//! shared lists, the sync primitives (and their faults: killed holders,
//! reused pids). Why a few binaries and not one per file: tests/procs/main.rs.
mod queue_batch;
mod queue_faults;
mod shared;
mod shared_list;
mod shared_lock;
mod sync;
mod sync_faults;
mod sync_more;
