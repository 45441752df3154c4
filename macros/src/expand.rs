//! Code generation: pure `quote!` over validated input.
//!
//! Generated code names everything by absolute path: `::core::...` and
//! `#krate::__private::...`, where `#krate` is `::multiproc` unless the user
//! passed `crate = "..."`. Nothing here can fail.

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{DeriveInput, ItemFn};

use crate::attr::{EntryArgs, ProcessFnArgs, TaskArgs};
use crate::parse::ProcessFn;

/// `#[process_fn]`: the function as written, plus its registry entry.
pub(crate) fn process_fn(args: &ProcessFnArgs, f: &ProcessFn) -> TokenStream {
    let krate = args.krate.tokens();
    let item = &f.item;
    let ident = &item.sig.ident;
    let name = match &args.name {
        Some(name) => quote!(#name),
        None => {
            let ident_str = ident.to_string();
            quote!(::core::concat!(::core::module_path!(), "::", #ident_str))
        }
    };

    let arg_asserts = f
        .params
        .iter()
        .map(|ty| quote_spanned!(ty.span()=> #krate::__private::assert_arg::<#ty>();));
    let ret_assert = match &f.output {
        Some(ty) => quote_spanned!(ty.span()=> #krate::__private::assert_ret::<#ty>();),
        None => quote!(#krate::__private::assert_ret::<()>();),
    };

    let vars: Vec<Ident> = (0..f.params.len())
        .map(|i| format_ident!("__a{}", i))
        .collect();
    let types = &f.params;

    quote! {
        #item

        #[doc(hidden)]
        const _: () = {
            fn __multiproc_assert() {
                #(#arg_asserts)*
                #ret_assert
            }

            fn __multiproc_type_id() -> ::core::any::TypeId {
                #krate::__private::type_id_of(&#ident)
            }

            fn __multiproc_invoke(
                call: &mut #krate::__private::Call<'_>,
            ) -> ::core::result::Result<(), #krate::Error> {
                call.run(|(#(#vars,)*): (#(#types,)*)| #ident(#(#vars),*))
            }

            #krate::__private::inventory::submit! {
                #krate::__private::Entry::new(#name, __multiproc_type_id, __multiproc_invoke)
            }
        };
    }
}

/// `#[derive(ProcessTask)]`: the `RegisteredTask` impl and the registry entry.
pub(crate) fn process_task(args: &TaskArgs, input: &DeriveInput) -> TokenStream {
    let krate = args.krate.tokens();
    let ident = &input.ident;
    let name = match &args.name {
        Some(name) => quote!(#name),
        None => {
            let ident_str = ident.to_string();
            quote!(::core::concat!(::core::module_path!(), "::", #ident_str))
        }
    };
    // The entry's only obligation on the type is `T: ProcessTask`, checked
    // once, at the type's name: `ProcessTask` already requires `Serialize`
    // and `DeserializeOwned`, and those are reported at the user's
    // `impl ProcessTask`, so asserting them here again would only repeat
    // every error. A missing impl is reported at the type's name.
    let invoke_task = quote_spanned!(ident.span()=> __multiproc_invoke_task::<#ident>);

    quote! {
        #[doc(hidden)]
        const _: () = {
            impl #krate::__private::RegisteredTask for #ident {
                const NAME: &'static str = #name;
            }

            fn __multiproc_type_id() -> ::core::any::TypeId {
                ::core::any::TypeId::of::<#ident>()
            }

            fn __multiproc_invoke_task<T: #krate::ProcessTask>(
                call: &mut #krate::__private::Call<'_>,
            ) -> ::core::result::Result<(), #krate::Error> {
                call.run(|task: T| <T as #krate::ProcessTask>::run(task))
            }

            fn __multiproc_invoke(
                call: &mut #krate::__private::Call<'_>,
            ) -> ::core::result::Result<(), #krate::Error> {
                #invoke_task(call)
            }

            #krate::__private::inventory::submit! {
                #krate::__private::Entry::new(
                    <#ident as #krate::__private::RegisteredTask>::NAME,
                    __multiproc_type_id,
                    __multiproc_invoke,
                )
            }
        };
    }
}

/// `#[multiproc::main]`: the user's `main` becomes an inner function, called
/// after `init()` and with a guard that joins the children when it returns.
pub(crate) fn main(args: &EntryArgs, item: &ItemFn) -> TokenStream {
    let krate = args.krate.tokens();
    let ItemFn {
        attrs,
        vis,
        modifiers: _,
        sig,
        block,
    } = item;
    let output = &sig.output;
    quote! {
        #(#attrs)*
        #vis #sig {
            fn __multiproc_main() #output #block
            #krate::__private::main_init();
            let __multiproc_guard = #krate::__private::MainGuard::new();
            __multiproc_main()
        }
    }
}

/// `#[multiproc::test]`: a `#[test]` whose body first calls `init()`.
pub(crate) fn test(args: &EntryArgs, item: &ItemFn) -> TokenStream {
    let krate = args.krate.tokens();
    let ItemFn {
        attrs,
        vis,
        modifiers: _,
        sig,
        block,
    } = item;
    quote! {
        #[::core::prelude::v1::test]
        #(#attrs)*
        #vis #sig {
            #krate::__private::init();
            #block
        }
    }
}
