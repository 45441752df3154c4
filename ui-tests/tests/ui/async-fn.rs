use multiproc::process_fn;

#[process_fn]
async fn fetch(id: u64) -> u64 {
    id
}

fn main() {}
