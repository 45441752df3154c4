//! A bounded, adaptive spin before a wait sleeps: the forkserver's waits
//! and a Pipe end's receive (`connection/link.rs`).
//!
//! A forkserver start is a short chain of hand-offs: the program's
//! request wakes the server, the server's answer wakes the program, the
//! child's exit wakes the server, its status wakes the program; each
//! step is a few microseconds of work. On this project's VM (KVM, guest
//! halt-polling off) a vCPU that went idle takes about 100 µs to wake, so
//! on an otherwise quiet machine those wake-ups, not the work, were the
//! start: 0.30-0.33 ms, against 0.17-0.20 ms when the program's and the
//! server's waits first looked at their descriptors for up to 200 µs
//! (A/B in the same minutes, benches/RESULTS-spawn.md).
//!
//! So each of those waits first polls without blocking, yielding the CPU
//! between looks (a child or another process that wants this CPU gets
//! it), for at most its budget, and then sleeps in `poll` as before. The
//! budget follows how long the waits take:
//!
//! - a wait whose event came within [`MAX`] (found while spinning, or
//!   after the sleep) sets it to twice that wait (at least [`MIN`], at most
//!   [`MAX`]; while spins keep paying it does not shrink);
//! - a longer wait, or one that timed out, halves it, and below [`MIN`]
//!   spinning stops until a wait is short again: a server left idle, or a
//!   program whose children run for long, spins a few hundred
//!   microseconds in all and then sleeps at once, as before;
//! - nobody spins when the process may run on one CPU only (the peer
//!   could not run meanwhile);
//! - a spin never outlasts the caller's deadline, and a wait whose
//!   deadline is nearly there (a look, as `is_alive`'s) neither spins nor
//!   counts.

use std::os::fd::BorrowedFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

use crate::sys;
use crate::wire::remaining;

/// The longest spin: a little more than the wake-up it saves.
pub(crate) const MAX: Duration = Duration::from_micros(200);
/// The shortest spin worth doing.
pub(crate) const MIN: Duration = Duration::from_micros(20);

/// A spin budget (see the module docs): the next spin's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget(Duration);

impl Budget {
    pub(crate) const START: Budget = Budget(MAX);

    /// The budget after a wait whose event came after `waited` (`None`:
    /// it timed out); `spun`: it was found while spinning.
    fn after(self, waited: Option<Duration>, spun: bool) -> Budget {
        match waited {
            Some(w) if w <= MAX => {
                let want = w.saturating_mul(2);
                let want = if spun { want.max(self.0) } else { want };
                Budget(want.clamp(MIN, MAX))
            }
            _ => {
                let half = self.0 / 2;
                Budget(if half < MIN { Duration::ZERO } else { half })
            }
        }
    }
}

/// A budget several threads share (the program's side: any thread may
/// start a process or join one). Updates race benignly: a lost update
/// costs one spin more or less.
#[derive(Debug)]
pub(crate) struct Shared(AtomicU64);

impl Shared {
    pub(crate) const fn new() -> Shared {
        Shared(AtomicU64::new(MAX.as_nanos() as u64))
    }

    /// Waits until one of `fds` shows its events or `deadline` passes, as
    /// [`sys::poll_many`] does, spinning first (see the module docs).
    pub(crate) fn poll(
        &self,
        fds: &[(BorrowedFd<'_>, PollFlags)],
        deadline: Option<Instant>,
    ) -> std::io::Result<Vec<PollFlags>> {
        let mut budget = Budget(Duration::from_nanos(self.0.load(Ordering::Relaxed)));
        let events = poll(&mut budget, fds, deadline);
        self.0.store(budget.0.as_nanos() as u64, Ordering::Relaxed);
        events
    }
}

/// Whether this process may run on more than one CPU (its affinity mask
/// and cgroup quota), counted once.
fn several_cpus() -> bool {
    static SEVERAL: OnceLock<bool> = OnceLock::new();
    *SEVERAL.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// What a spinning wait waits for: something to [`look`](Self::look) at
/// without blocking, and a way to [`sleep`](Self::sleep) until it may be
/// there.
pub(crate) trait Wait {
    type Found;
    type Error;
    /// Looks without blocking: `Some` if it is there.
    fn look(&mut self) -> Result<Option<Self::Found>, Self::Error>;
    /// Blocks until it may be there or `left` passes (`None`: no limit),
    /// then looks: `None` if it was not there (a timeout, or another
    /// reader took it first).
    fn sleep(&mut self, left: Option<Duration>) -> Result<Option<Self::Found>, Self::Error>;
}

/// Waits for `what` until `deadline` (`Ok(None)`: it passed): one look,
/// then, if the budget and the CPUs allow, looks between yields for up to
/// the budget, then sleeps (see the module docs). The budget learns from
/// every wait that did not find it at the first look.
pub(crate) fn wait<W: Wait>(
    budget: &mut Budget,
    deadline: Option<Instant>,
    what: &mut W,
) -> Result<Option<W::Found>, W::Error> {
    if let Some(found) = what.look()? {
        return Ok(Some(found));
    }
    // A wait about to time out (`is_alive`'s look) is not a spin that
    // failed: it neither spins nor counts.
    if remaining(deadline).is_some_and(|left| left < MIN) {
        return what.sleep(remaining(deadline));
    }
    let start = Instant::now();
    if budget.0 > Duration::ZERO && several_cpus() {
        let until = deadline.map_or(start + budget.0, |d| d.min(start + budget.0));
        while Instant::now() < until {
            std::thread::yield_now();
            if let Some(found) = what.look()? {
                *budget = budget.after(Some(start.elapsed()), true);
                return Ok(Some(found));
            }
        }
    }
    loop {
        if let Some(found) = what.sleep(remaining(deadline))? {
            *budget = budget.after(Some(start.elapsed()), false);
            return Ok(Some(found));
        }
        if remaining(deadline).is_some_and(|left| left.is_zero()) {
            *budget = budget.after(None, false);
            return Ok(None);
        }
    }
}

/// Descriptors to poll: found when any shows one of its events.
struct Poll<'a, 'fd>(&'a [(BorrowedFd<'fd>, PollFlags)]);

impl Wait for Poll<'_, '_> {
    type Found = Vec<PollFlags>;
    type Error = std::io::Error;

    fn look(&mut self) -> std::io::Result<Option<Vec<PollFlags>>> {
        self.sleep(Some(Duration::ZERO))
    }

    fn sleep(&mut self, left: Option<Duration>) -> std::io::Result<Option<Vec<PollFlags>>> {
        let events = sys::poll_many(self.0, left)?;
        Ok(events.iter().any(|e| !e.is_empty()).then_some(events))
    }
}

/// [`Shared::poll`] with a budget of the caller's own.
pub(crate) fn poll(
    budget: &mut Budget,
    fds: &[(BorrowedFd<'_>, PollFlags)],
    deadline: Option<Instant>,
) -> std::io::Result<Vec<PollFlags>> {
    let found = wait(budget, deadline, &mut Poll(fds))?;
    Ok(found.unwrap_or_else(|| vec![PollFlags::empty(); fds.len()]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_budget_follows_the_waits_it_saw() {
        let b = Budget::START;
        // A spin that paid keeps at least the budget.
        assert_eq!(b.after(Some(30 * US), true), b);
        let small = Budget(40 * US);
        assert_eq!(small.after(Some(70 * US), true), Budget(140 * US));
        // A short wait found after the sleep sets it to twice that wait.
        assert_eq!(b.after(Some(30 * US), false), Budget(60 * US));
        assert_eq!(b.after(Some(2 * US), false), Budget(MIN));
        assert_eq!(small.after(Some(150 * US), false), Budget(MAX));
        // Long waits and timeouts halve it, then spinning stops...
        let mut b = Budget::START;
        let mut spins = vec![];
        for waited in [Some(MAX * 2), None, Some(MAX * 50), None] {
            spins.push(b.0);
            b = b.after(waited, false);
        }
        assert_eq!(spins, vec![200 * US, 100 * US, 50 * US, 25 * US]);
        assert_eq!(b, Budget(Duration::ZERO));
        assert_eq!(b.after(None, false), b);
        // ...until a wait is short again.
        assert_eq!(b.after(Some(80 * US), false), Budget(160 * US));
    }

    #[test]
    fn a_spin_ends_at_the_deadline_and_reports_what_is_ready() {
        use std::os::fd::AsFd;
        let (r, w) = sys::pipe().expect("pipe");
        let mut b = Budget::START;
        let deadline = Instant::now() + 5 * US;
        let events = poll(&mut b, &[(r.as_fd(), PollFlags::POLLIN)], Some(deadline)).expect("poll");
        assert!(events[0].is_empty(), "nothing was written: a timeout");
        assert_eq!(
            b,
            Budget::START,
            "a look at the deadline is not a failed spin"
        );
        let deadline = Instant::now() + Duration::from_millis(1);
        let events = poll(&mut b, &[(r.as_fd(), PollFlags::POLLIN)], Some(deadline)).expect("poll");
        assert!(events[0].is_empty(), "nothing was written: a timeout");
        sys::write(w.as_fd(), b"x").expect("write");
        let events = poll(&mut b, &[(r.as_fd(), PollFlags::POLLIN)], None).expect("poll");
        assert!(events[0].contains(PollFlags::POLLIN));
        let shared = Shared::new();
        let events = shared
            .poll(&[(r.as_fd(), PollFlags::POLLIN)], None)
            .expect("poll");
        assert!(events[0].contains(PollFlags::POLLIN));
    }
}
