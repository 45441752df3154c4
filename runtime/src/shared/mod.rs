//! Shared state: plain data in shared memory that several processes read
//! and write. [`Value`] and [`Array`] carry a lock beside the data
//! (Python's `Value` and `Array`), [`RawValue`] and [`RawArray`] do not,
//! [`SharedMemory`] is a block of bytes found by name, and
//! [`ShareableList`] a fixed-length list of numbers, booleans, strings and
//! bytes in one such block.
//!
//! The data is any `T: bytemuck::Pod` (integers, floats, arrays of them,
//! `#[derive(Pod, Zeroable)] #[repr(C)]` structs): every bit pattern is a
//! valid value, so a process that dies mid-write can leave a half-written
//! value but never an invalid one. The memory is a memfd mapped in each
//! process that has a handle (for a `Value`, or an array of at most 4080
//! bytes, a cell of a memfd arena shared by thousands of such objects), and
//! is freed when no process maps it any more, however its processes end:
//! nothing is ever left in `/dev/shm`. A small object that was sent to
//! another process keeps its cell until its whole arena is given up.

mod array;
mod list;
mod memory;
mod value;

pub use array::{Array, ArrayGuard, RawArray};
pub use list::{ListItem, ShareableList};
pub use memory::SharedMemory;
pub use value::{AtomicInteger, RawValue, Value, ValueGuard};
