use multiproc::process_fn;

#[process_fn]
fn count_down(mut n: u32, _: bool, mut log: Vec<u32>) -> Vec<u32> {
    while n > 0 {
        log.push(n);
        n -= 1;
    }
    log
}

fn main() {
    assert_eq!(count_down(3, true, vec![]), [3, 2, 1]);
}
