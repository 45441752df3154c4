//! What the macros emit when the input is wrong.
//!
//! The error comes first, as `compile_error!` at the offending tokens; then
//! whatever keeps the rest of the user's crate compiling, so that the one
//! mistake is reported once and not echoed by every use of the item.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{DeriveInput, ItemFn};

use crate::attr::CratePath;

/// The error, then the item exactly as the user wrote it: the function stays
/// callable, so its callers report nothing more.
pub(crate) fn item(input: TokenStream, error: &syn::Error) -> TokenStream {
    let error = error.to_compile_error();
    quote! {
        #error
        #input
    }
}

/// The error, then the function nested, unchanged, inside an empty entry
/// point of the same name.
///
/// Re-emitting a rejected `main` as it is would add rustc's own error for the
/// same mistake (`main` cannot be `async` or take parameters); nested, the
/// body is still checked, but only the macro's error is reported.
pub(crate) fn entry(item: &ItemFn, error: &syn::Error) -> TokenStream {
    let error = error.to_compile_error();
    let vis = &item.vis;
    let ident = &item.sig.ident;
    quote! {
        #error

        #vis fn #ident() {
            #[allow(dead_code)]
            #item
        }
    }
}

/// The error, then a stub `RegisteredTask` impl, so that the user's
/// `impl ProcessTask for T` does not add a second, confusing error about the
/// missing supertrait.
pub(crate) fn process_task(
    krate: &CratePath,
    input: &DeriveInput,
    error: &syn::Error,
) -> TokenStream {
    let krate = krate.tokens();
    let error = error.to_compile_error();
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        #error

        const _: () = {
            impl #impl_generics #krate::__private::RegisteredTask for #ident #ty_generics #where_clause {
                const NAME: &'static str = "";
            }
        };
    }
}
