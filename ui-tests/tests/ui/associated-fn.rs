// Known limitation, pinned so a change is noticed: an attribute cannot see
// the `impl` block around it, so the registration (`const _` beside the
// function, naming it by its bare path) is emitted where it cannot work. The
// first error points at `#[process_fn]`; `#[process_fn]` is for free
// functions only.
use multiproc::process_fn;

struct Math;

impl Math {
    #[process_fn]
    fn double(x: u64) -> u64 {
        x * 2
    }
}

fn main() {
    let _ = Math::double(2);
}
