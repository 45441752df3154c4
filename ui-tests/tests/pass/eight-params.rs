use multiproc::process_fn;

#[allow(clippy::too_many_arguments)]
#[process_fn]
fn sum(a: u8, b: u16, c: u32, d: u64, e: i8, f: i16, g: i32, h: String) -> String {
    let total = u64::from(a) + u64::from(b) + u64::from(c) + d;
    let signed = i64::from(e) + i64::from(f) + i64::from(g);
    format!("{h}{total}{signed}")
}

fn main() {
    assert_eq!(sum(1, 2, 3, 4, -1, -2, -3, "=".to_string()), "=10-6");
}
