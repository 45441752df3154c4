//! What a scenario run records: its random generator, the data-integrity
//! counts (lost, duplicated, torn, lost where the docs allow it), a hang
//! seen by one of its own bounded waits, and failure messages.
use std::fmt::Display;
use std::time::Duration;

use crate::util::{self, Bounded, Rng};

/// A scenario's outcome so far. A scenario returns `Err(message)` to stop
/// at a failure; checks that let it go on record with [`Ctx::fail`].
#[derive(Debug)]
pub struct Ctx {
    pub rng: Rng,
    pub lost: u64,
    pub duplicated: u64,
    pub torn: u64,
    /// Lost where the runtime's docs say a message may be lost (a queue
    /// consumer killed between taking a message and decoding it).
    pub doc_lost: u64,
    pub hang: Option<String>,
    pub failures: Vec<String>,
}

pub type Res = Result<(), String>;

impl Ctx {
    pub fn new(seed: u64) -> Ctx {
        Ctx {
            rng: Rng::new(seed),
            lost: 0,
            duplicated: 0,
            torn: 0,
            doc_lost: 0,
            hang: None,
            failures: Vec::new(),
        }
    }

    pub fn fail(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        if self.failures.len() < 20 {
            self.failures.push(msg);
        }
    }

    pub fn check(&mut self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            self.fail(msg());
        }
    }

    pub fn lose(&mut self, n: u64, what: impl FnOnce() -> String) {
        if n > 0 {
            self.lost += n;
            self.fail(format!("lost {n}: {}", what()));
        }
    }

    pub fn duplicate(&mut self, n: u64, what: impl FnOnce() -> String) {
        if n > 0 {
            self.duplicated += n;
            self.fail(format!("duplicated {n}: {}", what()));
        }
    }

    pub fn tear(&mut self, n: u64, what: impl FnOnce() -> String) {
        if n > 0 {
            self.torn += n;
            self.fail(format!("torn {n}: {}", what()));
        }
    }

    /// Runs `f` on a thread, at most `limit`. A call that does not return
    /// is a hang (the scenario should stop: `?` on the `Err`).
    pub fn within<R: Send + 'static>(
        &mut self,
        limit: Duration,
        what: &str,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, String> {
        match util::bounded(limit, what, f) {
            Ok(r) => Ok(r),
            Err(Bounded::Hung(msg)) => {
                self.hang = Some(msg.clone());
                Err(format!("hang: {msg}"))
            }
            Err(Bounded::Panicked(msg)) => Err(format!("panic: {msg}")),
        }
    }

    /// A fresh record for work done on another thread, with its own
    /// random numbers (drawn from this one's); merge it back with
    /// [`Ctx::absorb`].
    pub fn fork(&mut self) -> Ctx {
        let seed = self.rng.next_u64();
        Ctx::new(seed)
    }

    pub fn absorb(&mut self, other: Ctx) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.torn += other.torn;
        self.doc_lost += other.doc_lost;
        if self.hang.is_none() {
            self.hang = other.hang;
        }
        for f in other.failures {
            self.fail(f);
        }
    }

    /// Runs `body` on a thread with a record of its own, at most `limit`:
    /// a body that does not return is a hang. Its counts and failures are
    /// merged into this record; its `Err` is returned.
    pub fn guarded(
        &mut self,
        limit: Duration,
        what: &str,
        body: impl FnOnce(&mut Ctx) -> Res + Send + 'static,
    ) -> Res {
        let mut sub = self.fork();
        let r = self.within(limit, what, move || {
            let r = body(&mut sub);
            (sub, r)
        })?;
        let (sub, r) = r;
        self.absorb(sub);
        r
    }

    /// A random pause in `lo..hi` ms: lets a victim get mid-operation
    /// before it is killed.
    pub fn pause(&mut self, lo: u64, hi: u64) {
        std::thread::sleep(self.rng.millis(lo, hi));
    }
}

/// `?` with context for any error that displays.
pub trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

impl<T> Context<T> for Option<T> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.ok_or_else(|| format!("{what}: nothing"))
    }
}
