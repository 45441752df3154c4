//! The load-time hook of `multiproc`. Not public API.
//!
//! A multiproc child must be dispatched before `main`, after every
//! `inventory` registration has run. Registrations are load-time
//! constructors (`.init_array`) in the crates that use `multiproc`, and the
//! loader runs `.init_array` in link order. Rustc links a crate's objects
//! before those of its dependencies, so a constructor in a crate that
//! `multiproc` depends on runs after every registering crate, including
//! `multiproc` itself (whose own unit tests register functions). That is
//! this crate's only job: `multiproc` hands it the dispatch function from
//! its own (earlier) constructor, and this crate's constructor calls it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static HOOK: OnceLock<fn()> = OnceLock::new();
static RAN: AtomicBool = AtomicBool::new(false);

/// Sets the function to call once every constructor before this crate's has
/// run. Returns `false` if this crate's constructor already ran (the link
/// order was not the expected one): the caller must then run it itself.
pub fn set_hook(hook: fn()) -> bool {
    let _ = HOOK.set(hook);
    !RAN.load(Ordering::SeqCst)
}

extern "C" fn run_hook() {
    RAN.store(true, Ordering::SeqCst);
    if let Some(hook) = HOOK.get() {
        hook();
    }
}

// `.init_array` holds `extern "C" fn()` pointers that the loader calls
// before `main`; `run_hook` has that type and cannot unwind (the hook
// catches its own panics).
#[used]
#[unsafe(link_section = ".init_array")]
static RUN_HOOK: extern "C" fn() = run_hook;
