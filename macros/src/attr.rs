//! Attribute arguments, parsed into typed structs.
//!
//! Every parser here reads the whole argument list and reports every bad
//! argument at once (errors are combined), so that a user fixes them in one
//! round rather than one per build.

use proc_macro2::TokenStream;
use quote::quote;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Attribute, Expr, ExprLit, Lit, LitStr, Meta, Path, Token};

/// The path through which generated code reaches the runtime crate:
/// `::multiproc` unless the user wrote `crate = "..."`.
#[derive(Clone)]
pub(crate) struct CratePath(Option<Path>);

impl CratePath {
    /// The crate path as tokens, ready for `quote!`.
    pub(crate) fn tokens(&self) -> TokenStream {
        match &self.0 {
            Some(path) => quote!(#path),
            None => quote!(::multiproc),
        }
    }
}

/// Arguments of `#[process_fn(...)]`.
pub(crate) struct ProcessFnArgs {
    /// `name = "..."`: the registered name, used verbatim.
    pub(crate) name: Option<LitStr>,
    /// `crate = "..."`.
    pub(crate) krate: CratePath,
}

/// Arguments of `#[multiproc::main(...)]` and `#[multiproc::test(...)]`.
pub(crate) struct EntryArgs {
    /// `crate = "..."`.
    pub(crate) krate: CratePath,
}

/// Arguments of `#[derive(ProcessTask)]`, read from `#[multiproc(...)]`.
pub(crate) struct TaskArgs {
    /// `name = "..."`: the registered name, used verbatim.
    pub(crate) name: Option<LitStr>,
    /// `crate = "..."`.
    pub(crate) krate: CratePath,
}

/// Which arguments a given attribute accepts, and how to name it in errors.
struct Accepts {
    /// The attribute as the user writes it, e.g. "process_fn".
    attribute: &'static str,
    /// Whether `name = "..."` is accepted.
    name: bool,
}

impl Accepts {
    fn expected(&self) -> &'static str {
        if self.name {
            "expected `name` or `crate`"
        } else {
            "expected `crate`"
        }
    }
}

/// Arguments common to every attribute, before they are split into the
/// attribute's own struct.
#[derive(Default)]
struct RawArgs {
    name: Option<LitStr>,
    krate: Option<Path>,
}

/// Parses `#[process_fn(...)]` arguments.
pub(crate) fn process_fn_args(args: TokenStream) -> syn::Result<ProcessFnArgs> {
    let accepts = Accepts {
        attribute: "process_fn",
        name: true,
    };
    let raw = parse_list(args, &accepts)?;
    Ok(ProcessFnArgs {
        name: raw.name,
        krate: CratePath(raw.krate),
    })
}

/// Parses `#[multiproc::main(...)]` arguments.
pub(crate) fn main_args(args: TokenStream) -> syn::Result<EntryArgs> {
    entry_args(args, "multiproc::main")
}

/// Parses `#[multiproc::test(...)]` arguments.
pub(crate) fn test_args(args: TokenStream) -> syn::Result<EntryArgs> {
    entry_args(args, "multiproc::test")
}

fn entry_args(args: TokenStream, attribute: &'static str) -> syn::Result<EntryArgs> {
    let accepts = Accepts {
        attribute,
        name: false,
    };
    let raw = parse_list(args, &accepts)?;
    Ok(EntryArgs {
        krate: CratePath(raw.krate),
    })
}

/// Parses every `#[multiproc(...)]` helper attribute of a derive input.
///
/// Returns what could be parsed together with the errors, so that the
/// fallback output can still use a valid `crate = "..."` when another
/// argument is wrong.
pub(crate) fn task_args(attrs: &[Attribute]) -> (TaskArgs, Option<syn::Error>) {
    let accepts = Accepts {
        attribute: "multiproc",
        name: true,
    };
    let mut raw = RawArgs::default();
    let mut errors = Errors::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("multiproc")) {
        match &attr.meta {
            Meta::List(list) => {
                match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(list.tokens.clone()) {
                    Ok(metas) => {
                        for meta in &metas {
                            errors.push(apply(&mut raw, meta, &accepts));
                        }
                    }
                    Err(e) => errors.push(Err(e)),
                }
            }
            other => errors.push(Err(syn::Error::new_spanned(
                other,
                "expected `#[multiproc(name = \"...\")]` or `#[multiproc(crate = \"...\")]`",
            ))),
        }
    }
    let args = TaskArgs {
        name: raw.name,
        krate: CratePath(raw.krate),
    };
    (args, errors.into_error())
}

fn parse_list(args: TokenStream, accepts: &Accepts) -> syn::Result<RawArgs> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
    let mut raw = RawArgs::default();
    let mut errors = Errors::default();
    for meta in &metas {
        errors.push(apply(&mut raw, meta, accepts));
    }
    match errors.into_error() {
        Some(e) => Err(e),
        None => Ok(raw),
    }
}

/// Applies one `key = "value"` argument to `raw`.
fn apply(raw: &mut RawArgs, meta: &Meta, accepts: &Accepts) -> syn::Result<()> {
    let path = meta.path();
    let key = if path.is_ident("name") && accepts.name {
        "name"
    } else if path.is_ident("crate") {
        "crate"
    } else {
        let shown = path_to_string(path);
        return Err(syn::Error::new_spanned(
            path,
            format!(
                "unknown `{}` argument `{}`; {}",
                accepts.attribute,
                shown,
                accepts.expected()
            ),
        ));
    };
    let lit = string_value(meta, key)?;
    match key {
        "name" => {
            if raw.name.is_some() {
                return Err(duplicate(path, key));
            }
            if lit.value().is_empty() {
                return Err(syn::Error::new_spanned(&lit, "`name` must not be empty"));
            }
            if lit.value().starts_with("__multiproc::") {
                return Err(syn::Error::new_spanned(
                    &lit,
                    "names that start with `__multiproc::` are reserved for multiproc's own \
                     entry points; choose another `name`",
                ));
            }
            raw.name = Some(lit);
        }
        _ => {
            if raw.krate.is_some() {
                return Err(duplicate(path, key));
            }
            let parsed = lit.parse_with(Path::parse_mod_style).map_err(|_| {
                syn::Error::new_spanned(
                    &lit,
                    "`crate` must be a path to the multiproc crate, like `crate = \"::multiproc\"`",
                )
            })?;
            raw.krate = Some(parsed);
        }
    }
    Ok(())
}

/// Reads the string literal of `key = "..."`.
fn string_value(meta: &Meta, key: &str) -> syn::Result<LitStr> {
    let message = || format!("expected `{key} = \"...\"`");
    match meta {
        Meta::NameValue(nv) => match &nv.value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(lit), ..
            }) => Ok(lit.clone()),
            other => Err(syn::Error::new_spanned(other, message())),
        },
        Meta::Path(path) => Err(syn::Error::new_spanned(path, message())),
        Meta::List(list) => Err(syn::Error::new(list.delimiter.span().join(), message())),
    }
}

fn duplicate(path: &Path, key: &str) -> syn::Error {
    syn::Error::new_spanned(path, format!("duplicate `{key}` argument"))
}

fn path_to_string(path: &Path) -> String {
    let mut out = String::new();
    if path.leading_colon.is_some() {
        out.push_str("::");
    }
    for (i, segment) in path.segments.iter().enumerate() {
        if i > 0 {
            out.push_str("::");
        }
        out.push_str(&segment.ident.to_string());
    }
    out
}

/// Collects independent errors, and combines them into one.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    /// Records the error of `result`, if any.
    pub(crate) fn push(&mut self, result: syn::Result<()>) {
        if let Err(e) = result {
            self.add(e);
        }
    }

    /// Records `error`.
    pub(crate) fn add(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    /// Records a new error at `spanned`.
    pub(crate) fn spanned(
        &mut self,
        spanned: impl quote::ToTokens,
        message: impl std::fmt::Display,
    ) {
        self.add(syn::Error::new_spanned(spanned, message));
    }

    /// The combined error, if any was recorded.
    pub(crate) fn into_error(self) -> Option<syn::Error> {
        self.0
    }

    /// `Ok(value)` when no error was recorded.
    pub(crate) fn finish<T>(self, value: T) -> syn::Result<T> {
        match self.0 {
            Some(e) => Err(e),
            None => Ok(value),
        }
    }
}

/// Both results, or every error of the two combined.
pub(crate) fn both<A, B>(a: syn::Result<A>, b: syn::Result<B>) -> syn::Result<(A, B)> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(mut e), Err(other)) => {
            e.combine(other);
            Err(e)
        }
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
    }
}

/// `Err(error)` if there is one, else `Ok(value)`.
pub(crate) fn error_or<T>(error: Option<syn::Error>, value: T) -> syn::Result<T> {
    match error {
        Some(e) => Err(e),
        None => Ok(value),
    }
}

/// `error`, combined with `first` if there is one (reported first).
pub(crate) fn all(first: Option<syn::Error>, error: syn::Error) -> syn::Error {
    match first {
        Some(mut all) => {
            all.combine(error);
            all
        }
        None => error,
    }
}
