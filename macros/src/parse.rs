//! Validation of the items the macros are applied to.
//!
//! Each function checks one kind of item, reports every independent mistake
//! at the token that is wrong (errors are combined, never the first only), and
//! on success returns what `expand` needs.

use proc_macro2::TokenStream;
use quote::quote;
use syn::visit::Visit;
use syn::{
    Attribute, Data, DeriveInput, FnArg, Generics, Item, ItemFn, Pat, ReturnType, Signature, Type,
    TypeImplTrait, TypeReference,
};

use crate::attr::Errors;

/// The most parameters a `#[process_fn]` may take. The runtime implements its
/// argument-tuple traits up to this arity.
pub(crate) const MAX_PARAMS: usize = 8;

/// A function that `#[process_fn]` can register.
pub(crate) struct ProcessFn {
    /// The function, exactly as written.
    pub(crate) item: ItemFn,
    /// The type of each parameter, in order.
    pub(crate) params: Vec<Type>,
    /// The return type, or `None` for `()`.
    pub(crate) output: Option<Type>,
}

/// Parses the item under `#[process_fn]` and checks that it can be run in a
/// child process.
pub(crate) fn process_fn(input: TokenStream) -> syn::Result<ProcessFn> {
    let item = match syn::parse2::<Item>(input)? {
        Item::Fn(item) => item,
        other => {
            return Err(syn::Error::new_spanned(
                item_head(&other),
                "`#[process_fn]` can only be applied to a function; \
                 to run a type in a child process, use `#[derive(ProcessTask)]`",
            ));
        }
    };

    let mut errors = Errors::default();
    let sig = &item.sig;
    check_qualifiers(&mut errors, sig, "`#[process_fn]` cannot be applied to");
    check_generics(&mut errors, &sig.generics);

    let mut params = Vec::new();
    for (index, arg) in sig.inputs.iter().enumerate() {
        match arg {
            FnArg::Receiver(receiver) => errors.spanned(
                receiver,
                "`#[process_fn]` cannot be applied to a method: there is no `self` in the \
                 child process; use a free function, or a type with `#[derive(ProcessTask)]`",
            ),
            FnArg::Typed(typed) => {
                if let Some(attr) = typed.attrs.first() {
                    errors.spanned(
                        attr,
                        "attributes on the parameters of a `#[process_fn]` are not supported",
                    );
                }
                check_param_pattern(&mut errors, &typed.pat);
                check_type(&mut errors, &typed.ty, Position::Param);
                if index < MAX_PARAMS {
                    params.push((*typed.ty).clone());
                }
            }
        }
    }
    if sig.inputs.len() > MAX_PARAMS {
        let extra: Vec<_> = sig.inputs.iter().skip(MAX_PARAMS).collect();
        errors.spanned(
            quote!(#(#extra),*),
            format!(
                "`#[process_fn]` supports at most {MAX_PARAMS} parameters, found {}; \
                 group them into a tuple or a struct",
                sig.inputs.len()
            ),
        );
    }

    let output = match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => {
            check_type(&mut errors, ty, Position::Return);
            Some((**ty).clone())
        }
    };

    errors.finish(ProcessFn {
        item,
        params,
        output,
    })
}

/// Parses the item under `#[multiproc::main]`; see [`check_main`].
pub(crate) fn main_fn(input: TokenStream) -> syn::Result<ItemFn> {
    parse_fn(
        input,
        "`#[multiproc::main]` can only be applied to `fn main`",
    )
}

/// Checks that `item` can be the program's entry point.
pub(crate) fn check_main(item: &ItemFn) -> syn::Result<()> {
    let mut errors = Errors::default();
    let sig = &item.sig;
    if let Some(token) = &sig.asyncness {
        errors.spanned(
            token,
            "`async fn main` is not supported; put your async runtime's attribute \
             (such as `#[tokio::main]`) above `#[multiproc::main]`, or make `main` synchronous",
        );
    }
    check_entry_shape(&mut errors, sig, "`#[multiproc::main]`");
    errors.finish(())
}

/// Parses the item under `#[multiproc::test]`.
pub(crate) fn test_fn(input: TokenStream) -> syn::Result<ItemFn> {
    let item = parse_fn(
        input,
        "`#[multiproc::test]` can only be applied to a function",
    )?;
    let mut errors = Errors::default();
    for attr in &item.attrs {
        if is_test_attribute(attr) {
            errors.spanned(
                attr,
                "second test attribute is supplied; `#[multiproc::test]` already adds \
                 `#[test]`, remove this one",
            );
        }
    }
    let sig = &item.sig;
    if let Some(token) = &sig.asyncness {
        errors.spanned(
            token,
            "`#[multiproc::test]` cannot be applied to an `async fn`; make the test \
             synchronous, or call `multiproc::init()` first in your async test",
        );
    }
    check_entry_shape(&mut errors, sig, "`#[multiproc::test]`");
    errors.finish(item)
}

/// Checks the type under `#[derive(ProcessTask)]`.
pub(crate) fn task(input: &DeriveInput) -> syn::Result<()> {
    let mut errors = Errors::default();
    if let Data::Union(data) = &input.data {
        errors.spanned(
            data.union_token,
            "`ProcessTask` cannot be derived for a union; use a struct or an enum",
        );
    }
    if !input.generics.params.is_empty() {
        errors.spanned(
            &input.generics,
            "`ProcessTask` cannot be derived for a generic type: the child process looks \
             the task up by name, so it must be one concrete type; wrap each instantiation \
             you need in a non-generic type",
        );
    } else if let Some(clause) = &input.generics.where_clause {
        errors.spanned(
            clause,
            "`ProcessTask` cannot be derived for a type with a `where` clause",
        );
    }
    errors.finish(())
}

fn parse_fn(input: TokenStream, not_fn: &str) -> syn::Result<ItemFn> {
    match syn::parse2::<Item>(input)? {
        Item::Fn(item) => Ok(item),
        other => Err(syn::Error::new_spanned(item_head(&other), not_fn)),
    }
}

/// The leading tokens of an item (its keyword and name) to point an error
/// at, rather than underlining a whole struct body.
fn item_head(item: &Item) -> TokenStream {
    match item {
        Item::Struct(s) => {
            let (token, ident) = (&s.struct_token, &s.ident);
            quote!(#token #ident)
        }
        Item::Enum(e) => {
            let (token, ident) = (&e.enum_token, &e.ident);
            quote!(#token #ident)
        }
        Item::Union(u) => {
            let (token, ident) = (&u.union_token, &u.ident);
            quote!(#token #ident)
        }
        Item::Impl(i) => {
            let token = &i.impl_token;
            quote!(#token)
        }
        Item::Mod(m) => {
            let (token, ident) = (&m.mod_token, &m.ident);
            quote!(#token #ident)
        }
        Item::Trait(t) => {
            let (token, ident) = (&t.trait_token, &t.ident);
            quote!(#token #ident)
        }
        Item::Const(c) => {
            let (token, ident) = (&c.const_token, &c.ident);
            quote!(#token #ident)
        }
        Item::Static(s) => {
            let (token, ident) = (&s.static_token, &s.ident);
            quote!(#token #ident)
        }
        Item::Type(t) => {
            let (token, ident) = (&t.type_token, &t.ident);
            quote!(#token #ident)
        }
        other => quote!(#other),
    }
}

/// Rejects `async`, `unsafe`, `extern` and variadic functions.
fn check_qualifiers(errors: &mut Errors, sig: &Signature, prefix: &str) {
    if let Some(token) = &sig.asyncness {
        errors.spanned(
            token,
            format!(
                "{prefix} an `async fn`; make it a synchronous `fn` and block on the \
                 future inside it"
            ),
        );
    }
    if let syn::Safety::Unsafe(token) = &sig.safety {
        errors.spanned(
            token,
            format!(
                "{prefix} an `unsafe fn`: the child process calls it with nobody to uphold \
                 its safety contract; make it a safe `fn` with an `unsafe` block inside"
            ),
        );
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(
            abi,
            format!(
                "{prefix} an `extern` function; remove the ABI, or call the `extern` \
                 function from a plain Rust `fn`"
            ),
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.spanned(variadic, format!("{prefix} a variadic function"));
    }
}

/// Rejects type, const and lifetime parameters and `where` clauses.
fn check_generics(errors: &mut Errors, generics: &Generics) {
    if generics.params.is_empty() {
        if let Some(clause) = &generics.where_clause {
            errors.spanned(
                clause,
                "`#[process_fn]` cannot be applied to a function with a `where` clause",
            );
        }
        return;
    }
    let only_lifetimes = generics.lifetimes().count() == generics.params.len();
    let message = if only_lifetimes {
        "`#[process_fn]` cannot be applied to a function with lifetime parameters: \
         arguments are decoded into owned values in the child process; take owned types \
         such as `String` or `Vec<T>`"
    } else {
        "`#[process_fn]` cannot be applied to a generic function: the child process looks \
         the function up by name, so it must be one concrete function; write a \
         non-generic `#[process_fn]` wrapper for each type you need"
    };
    errors.spanned(generics, message);
}

/// Accepts `x`, `mut x` and `_`; rejects every other pattern.
fn check_param_pattern(errors: &mut Errors, pat: &Pat) {
    match pat {
        Pat::Ident(ident) if ident.by_ref.is_none() && ident.subpat.is_none() => {}
        Pat::Wild(_) => {}
        other => errors.spanned(
            other,
            "`#[process_fn]` parameters must be plain names such as `x: T`; \
             destructure the value inside the function body",
        ),
    }
}

/// Where a type appears in a `#[process_fn]` signature.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Position {
    Param,
    Return,
}

/// Rejects `impl Trait` and references anywhere inside a parameter or
/// return type: neither can be decoded into an owned value on the other side.
fn check_type(errors: &mut Errors, ty: &Type, position: Position) {
    struct Finder<'a> {
        errors: &'a mut Errors,
        position: Position,
    }

    impl<'ast> Visit<'ast> for Finder<'_> {
        fn visit_type_impl_trait(&mut self, node: &'ast TypeImplTrait) {
            let message = match self.position {
                Position::Param => {
                    "`impl Trait` parameters are not supported by `#[process_fn]`: the child \
                     process must know the concrete type to decode; use a concrete type"
                }
                Position::Return => {
                    "`impl Trait` cannot be returned from a `#[process_fn]`: the parent must \
                     know the concrete type to decode the result; return a concrete type"
                }
            };
            self.errors.spanned(node, message);
        }

        fn visit_type_reference(&mut self, node: &'ast TypeReference) {
            let owned = match &*node.elem {
                Type::Path(p) if p.qself.is_none() && p.path.is_ident("str") => {
                    "take `String` instead of `&str`"
                }
                Type::Path(p) if p.qself.is_none() && p.path.is_ident("Path") => {
                    "take `PathBuf` instead of `&Path`"
                }
                Type::Slice(_) => "take `Vec<T>` instead of `&[T]`",
                _ => {
                    "take the value itself, or an owned type such as `String`, `Vec<T>` or `Box<T>`"
                }
            };
            let message = match self.position {
                Position::Param => format!(
                    "`#[process_fn]` parameters cannot be references: arguments are \
                     decoded into owned values in the child process; {owned}"
                ),
                Position::Return => format!(
                    "a `#[process_fn]` cannot return a reference: the result is decoded \
                     into an owned value in the parent; {}",
                    owned.replace("take", "return")
                ),
            };
            self.errors.spanned(node, message);
            // The referenced type is not visited: one error per reference.
        }
    }

    Finder { errors, position }.visit_type(ty);
}

/// Rejects parameters and generics on `main` and test functions.
fn check_entry_shape(errors: &mut Errors, sig: &Signature, attribute: &str) {
    if !sig.generics.params.is_empty() {
        errors.spanned(
            &sig.generics,
            format!("{attribute} cannot be applied to a generic function"),
        );
    }
    if !sig.inputs.is_empty() {
        let inputs = &sig.inputs;
        errors.spanned(
            inputs,
            format!("{attribute} functions cannot take parameters"),
        );
    }
}

/// Whether `attr` is a test attribute: `#[test]`, `#[core::prelude::v1::test]`,
/// `#[tokio::test]` and the like.
fn is_test_attribute(attr: &Attribute) -> bool {
    attr.path()
        .segments
        .last()
        .is_some_and(|segment| segment.ident == "test")
}
