use multiproc::process_fn;

mod math {
    use multiproc::process_fn;

    /// Public, `const`, in a module: all fine.
    #[process_fn]
    pub const fn double(x: i64) -> i64 {
        x * 2
    }
}

#[multiproc::main]
fn main() {
    #[process_fn]
    fn local(x: Option<String>) -> usize {
        x.map_or(0, |s| s.len())
    }

    assert_eq!(math::double(21), 42);
    assert_eq!(local(Some("abc".into())), 3);
}
