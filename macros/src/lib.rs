//! Procedural macros for [multiproc](https://docs.rs/multiproc).
//!
//! Do not depend on this crate directly: `multiproc` re-exports every macro
//! here, and the generated code only works through it (it names
//! `::multiproc::__private`, which is not public API).
//!
//! Layout: this file holds the entry points only. `attr` parses attribute
//! arguments, `parse` validates the item, `expand` generates code, and
//! `fallback` generates the output used when the input is wrong (the error,
//! plus whatever keeps the rest of the crate from failing a second time).

mod attr;
mod expand;
mod fallback;
mod parse;

use proc_macro::TokenStream;

/// Registers a function so that a child process can run it.
///
/// The function is kept exactly as written (`cube(3)` still works), and an
/// entry is added to multiproc's registry under the name
/// `concat!(module_path!(), "::", "cube")`. A `Pool`, a `Process` or `spawn`
/// in the parent recognises the function item and sends its name; the child,
/// the same executable re-executed, finds the entry, decodes the arguments,
/// calls the function and sends the result back.
///
/// The function must be a free function (in a module or a block, not an
/// associated function in an `impl`), and a plain, safe, synchronous,
/// non-generic `fn` with at most 8 parameters, each bound to a name (`x: T` or `mut x: T`). Every
/// parameter type and the return type must implement `Serialize` and
/// `DeserializeOwned`: they travel between processes. References therefore
/// cannot be parameters; take `String` rather than `&str`. Each of these
/// rules is checked with an error that points at the offending token.
///
/// # Arguments
///
/// - `name = "..."`: register under exactly this name instead of the
///   module path. Names must be unique within the program.
/// - `crate = "..."`: the path to the `multiproc` crate, when it is not
///   reachable as `::multiproc` (renamed dependency, re-export).
///
/// # Examples
///
/// ```
/// use multiproc::{process_fn, Pool};
///
/// #[process_fn]
/// fn cube(x: u64) -> u64 {
///     x * x * x
/// }
///
/// #[process_fn(name = "greeter")]
/// fn greet(name: String, times: usize) {
///     for _ in 0..times {
///         println!("hello, {name}");
///     }
/// }
///
/// #[multiproc::main]
/// fn main() -> multiproc::Result<()> {
///     let pool = Pool::new(4)?;
///     assert_eq!(pool.map(cube, 0..4)?, [0, 1, 8, 27]);
///     Ok(())
/// }
/// ```
///
/// # Equivalent code without `#[process_fn]`
///
/// ```
/// fn cube(x: u64) -> u64 {
///     x * x * x
/// }
///
/// const _: () = {
///     fn __multiproc_assert() {
///         ::multiproc::__private::assert_arg::<u64>();
///         ::multiproc::__private::assert_ret::<u64>();
///     }
///
///     fn __multiproc_type_id() -> ::core::any::TypeId {
///         ::multiproc::__private::type_id_of(&cube)
///     }
///
///     fn __multiproc_invoke(
///         call: &mut ::multiproc::__private::Call<'_>,
///     ) -> ::core::result::Result<(), ::multiproc::Error> {
///         call.run(|(__a0,): (u64,)| cube(__a0))
///     }
///
///     ::multiproc::__private::inventory::submit! {
///         ::multiproc::__private::Entry::new(
///             ::core::concat!(::core::module_path!(), "::", "cube"),
///             __multiproc_type_id,
///             __multiproc_invoke,
///         )
///     }
/// };
/// ```
#[proc_macro_attribute]
pub fn process_fn(args: TokenStream, input: TokenStream) -> TokenStream {
    let input = proc_macro2::TokenStream::from(input);
    let args = attr::process_fn_args(args.into());
    let item = parse::process_fn(input.clone());
    match attr::both(args, item) {
        Ok((args, item)) => expand::process_fn(&args, &item),
        Err(error) => fallback::item(input, &error),
    }
    .into()
}

/// Registers a task type, the way a Python class overrides `Process.run`.
///
/// Derive `ProcessTask` (together with `Serialize` and `Deserialize`), then
/// implement the `ProcessTask` trait with a `run(self)` method. The value is
/// sent to the child process, which decodes it and calls `run`.
/// Implementing `ProcessTask` without this derive is a compile error that
/// says to add it.
///
/// The type must be a struct or an enum without generic parameters: the
/// child finds the task by its name, so it must be one concrete type.
///
/// # Arguments
///
/// Given in a `#[multiproc(...)]` attribute on the type:
///
/// - `name = "..."`: register under exactly this name instead of the
///   module path (`concat!(module_path!(), "::", "Greeter")`).
/// - `crate = "..."`: the path to the `multiproc` crate, when it is not
///   reachable as `::multiproc`.
///
/// # Examples
///
/// ```
/// use multiproc::{Process, ProcessTask};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, ProcessTask)]
/// struct Greeter {
///     name: String,
/// }
///
/// impl ProcessTask for Greeter {
///     fn run(self) {
///         println!("hello, {}", self.name);
///     }
/// }
///
/// #[multiproc::main]
/// fn main() -> multiproc::Result<()> {
///     let mut p = Process::from_task(Greeter { name: "bob".into() });
///     p.start()?;
///     p.join()?;
///     Ok(())
/// }
/// ```
///
/// # Equivalent code without `#[derive(ProcessTask)]`
///
/// The derive does not assert `Serialize` and `DeserializeOwned` itself:
/// they are supertraits of `ProcessTask`, so a missing one is reported once,
/// at your `impl ProcessTask`. The only bound the generated code adds is
/// `Greeter: ProcessTask`, reported at the type's name if the impl is missing.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)]
/// # struct Greeter {
/// #     name: String,
/// # }
/// # impl multiproc::ProcessTask for Greeter {
/// #     fn run(self) {}
/// # }
/// const _: () = {
///     impl ::multiproc::__private::RegisteredTask for Greeter {
///         const NAME: &'static str = ::core::concat!(::core::module_path!(), "::", "Greeter");
///     }
///
///     fn __multiproc_type_id() -> ::core::any::TypeId {
///         ::core::any::TypeId::of::<Greeter>()
///     }
///
///     fn __multiproc_invoke_task<T: ::multiproc::ProcessTask>(
///         call: &mut ::multiproc::__private::Call<'_>,
///     ) -> ::core::result::Result<(), ::multiproc::Error> {
///         call.run(|task: T| <T as ::multiproc::ProcessTask>::run(task))
///     }
///
///     fn __multiproc_invoke(
///         call: &mut ::multiproc::__private::Call<'_>,
///     ) -> ::core::result::Result<(), ::multiproc::Error> {
///         __multiproc_invoke_task::<Greeter>(call)
///     }
///
///     ::multiproc::__private::inventory::submit! {
///         ::multiproc::__private::Entry::new(
///             <Greeter as ::multiproc::__private::RegisteredTask>::NAME,
///             __multiproc_type_id,
///             __multiproc_invoke,
///         )
///     }
/// };
/// ```
#[proc_macro_derive(ProcessTask, attributes(multiproc))]
pub fn derive_process_task(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    let (args, args_error) = attr::task_args(&input.attrs);
    let checked = parse::task(&input);
    match attr::both(attr::error_or(args_error, ()), checked) {
        Ok(((), ())) => expand::process_task(&args, &input),
        Err(error) => fallback::process_task(&args.krate, &input, &error),
    }
    .into()
}

/// Makes `main` able to run as a child process, and joins the children at
/// its end.
///
/// A child process is the same executable, started again. With this
/// attribute, `main` first checks whether it was started as a child: if so,
/// it runs the function or task it was asked for and exits, before your
/// `main` body runs. Otherwise your body runs, and when it returns (or
/// panics) the children still running are handled as Python does at exit:
/// daemonic children are terminated, the others are joined.
///
/// `main` may return `()` or any `Termination` type, such as
/// `multiproc::Result<()>`. It cannot be `async` or take parameters. With an
/// async runtime, put the runtime's attribute first:
/// `#[tokio::main] #[multiproc::main] async fn main()`.
///
/// # Arguments
///
/// - `crate = "..."`: the path to the `multiproc` crate, when it is not
///   reachable as `::multiproc`.
///
/// # Examples
///
/// ```
/// use multiproc::{process_fn, Process};
///
/// #[process_fn]
/// fn hello(name: String) {
///     println!("hello, {name}");
/// }
///
/// #[multiproc::main]
/// fn main() -> multiproc::Result<()> {
///     let mut p = Process::new(hello, ("bob".to_string(),));
///     p.start()?;
///     p.join()?;
///     Ok(())
/// }
/// ```
///
/// # Equivalent code without `#[multiproc::main]`
///
/// ```
/// # use multiproc::{process_fn, Process};
/// # #[process_fn]
/// # fn hello(name: String) {
/// #     println!("hello, {name}");
/// # }
/// fn main() -> multiproc::Result<()> {
///     fn __multiproc_main() -> multiproc::Result<()> {
///         let mut p = Process::new(hello, ("bob".to_string(),));
///         p.start()?;
///         p.join()?;
///         Ok(())
///     }
///     ::multiproc::__private::main_init();
///     let __multiproc_guard = ::multiproc::__private::MainGuard::new();
///     __multiproc_main()
/// }
/// ```
#[proc_macro_attribute]
pub fn main(args: TokenStream, input: TokenStream) -> TokenStream {
    let input = proc_macro2::TokenStream::from(input);
    let args = attr::main_args(args.into());
    match parse::main_fn(input.clone()) {
        Ok(item) => match attr::both(args, parse::check_main(&item)) {
            Ok((args, ())) => expand::main(&args, &item),
            Err(error) => fallback::entry(&item, &error),
        },
        Err(error) => fallback::item(input, &attr::all(args.err(), error)),
    }
    .into()
}

/// A `#[test]` that can start child processes.
///
/// Adds `#[test]` and makes the test's first step a call to multiproc's
/// `init`, so that the test binary, started again as a child process, runs
/// the requested function instead of the test. Do not add `#[test]`
/// yourself; other attributes such as `#[ignore]` and `#[should_panic]` are
/// kept. The test cannot be `async` or take parameters.
///
/// # Arguments
///
/// - `crate = "..."`: the path to the `multiproc` crate, when it is not
///   reachable as `::multiproc`.
///
/// # Examples
///
/// ```
/// use multiproc::{process_fn, Pool};
///
/// #[process_fn]
/// fn double(x: i32) -> i32 {
///     x * 2
/// }
///
/// #[multiproc::test]
/// fn doubles_in_a_pool() -> multiproc::Result<()> {
///     let pool = Pool::new(2)?;
///     assert_eq!(pool.map(double, [1, 2, 3])?, [2, 4, 6]);
///     Ok(())
/// }
/// ```
///
/// # Equivalent code without `#[multiproc::test]`
///
/// ```
/// #[test]
/// fn doubles_in_a_pool() -> multiproc::Result<()> {
///     ::multiproc::__private::init();
///     {
///         let pool = Pool::new(2)?;
///         assert_eq!(pool.map(double, [1, 2, 3])?, [2, 4, 6]);
///         Ok(())
///     }
/// }
/// ```
// The examples show `#[test]` functions: in a doc test they compile but
// are not run, which is all they need to show.
#[allow(clippy::test_attr_in_doctest)]
#[proc_macro_attribute]
pub fn test(args: TokenStream, input: TokenStream) -> TokenStream {
    let input = proc_macro2::TokenStream::from(input);
    let args = attr::test_args(args.into());
    let item = parse::test_fn(input.clone());
    match attr::both(args, item) {
        Ok((args, item)) => expand::test(&args, &item),
        Err(error) => fallback::item(input, &error),
    }
    .into()
}
