//! Shared state: plain data in shared memory that several processes read
//! and write. [`Value`] and [`Array`] carry a lock beside the data
//! (Python's `Value` and `Array`), [`RawValue`] and [`RawArray`] do not,
//! and [`SharedMemory`] is a block of bytes found by name.
//!
//! The data is any `T: bytemuck::Pod` (integers, floats, arrays of them,
//! `#[derive(Pod, Zeroable)] #[repr(C)]` structs): every bit pattern is a
//! valid value, so a process that dies mid-write can leave a half-written
//! value but never an invalid one. The memory is a memfd mapped in each
//! process that has a handle, and is freed when the last handle is gone,
//! however its processes end: nothing is ever left in `/dev/shm`.

mod array;
mod memory;
mod value;

pub use array::{Array, ArrayGuard, RawArray};
pub use memory::SharedMemory;
pub use value::{AtomicInteger, RawValue, Value, ValueGuard};
