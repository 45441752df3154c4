//! Runs the trybuild cases: `tests/ui` must fail to compile with the
//! snapshotted errors, `tests/pass` must compile.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/pass/*.rs");
}
