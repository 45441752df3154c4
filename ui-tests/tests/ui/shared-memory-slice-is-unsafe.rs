//! Another process (or another handle) may write a `SharedMemory`'s bytes
//! at any time, so safe code gets no `&[u8]` or `&mut [u8]` of them: no
//! indexing, no slicing, and `as_slice` only inside `unsafe`.

use multiproc::shared::SharedMemory;

fn read_in_place(shm: &SharedMemory) -> &[u8] {
    &shm[..]
}

fn write_in_place(shm: &mut SharedMemory) {
    shm[0] = 1;
}

fn borrow_without_unsafe(shm: &SharedMemory) -> &[u8] {
    shm.as_slice()
}

fn main() {}
