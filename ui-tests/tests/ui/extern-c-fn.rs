use multiproc::process_fn;

#[process_fn]
extern "C" fn callback(code: i32) -> i32 {
    code
}

fn main() {}
