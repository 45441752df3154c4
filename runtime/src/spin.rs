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
//! So each of those waits first looks without blocking (a `poll` with no
//! timeout, or a Pipe's read that does not wait), yielding the CPU
//! between looks (a child or another process that wants this CPU gets
//! it; a Pipe end looks back to back for its first [`EAGER`] 5 µs), for at
//! most its budget, and then sleeps as before. The budget follows how long the
//! waits take:
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
//! - a Pipe end spins only while the kernel counts no more runnable
//!   threads than this process has CPUs ([`room_for_the_peer`]): beside
//!   busy processes its spin made round trips slower, not faster; and a
//!   Pipe end's spin that lost its CPU (two looks more than 50 µs apart:
//!   another process ran) stops, and the next 2, 4, 8... (up to 4096)
//!   waits sleep at once, until a spin pays again. (A forkserver wait's
//!   yields are meant to hand the CPU to the child or the server it waits
//!   for: with those rules its starts were 0.27-0.30 ms, not 0.21-0.28.)
//! - a spin never outlasts the caller's deadline, and a wait whose
//!   deadline is nearly there (a look, as `is_alive`'s) neither spins nor
//!   counts.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

use crate::sys;
use crate::wire::remaining;

/// The longest spin: a little more than the wake-up it saves.
pub(crate) const MAX: Duration = Duration::from_micros(200);
/// How long a spin looks without yielding between looks.
const EAGER: Duration = Duration::from_micros(5);
/// The shortest spin worth doing.
pub(crate) const MIN: Duration = Duration::from_micros(20);

/// A look that comes this long after the one before lost its CPU
/// meanwhile (another process ran): the spin competes for the CPUs.
const PREEMPTED: Duration = Duration::from_micros(50);
/// The most waits a spin that lost its CPU keeps the next ones from
/// spinning (doubling from 2 with each such spin in a row).
const MAX_SKIP: u32 = 1 << 12;

/// A spin budget (see the module docs): the next spin's length, and how
/// many waits are still kept from spinning after spins that lost their
/// CPU (`skip`, `strikes` in a row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    spin: Duration,
    skip: u32,
    strikes: u32,
    /// A Pipe end's rules: spin only while the machine has a CPU for the
    /// peer ([`room_for_the_peer`]), look back to back for [`EAGER`], and
    /// back off after a spin that lost its CPU ([`PREEMPTED`]).
    needs_room: bool,
}

impl Budget {
    pub(crate) const START: Budget = Budget::of(MAX);

    /// A budget that spins only while the machine has a CPU for the peer
    /// ([`room_for_the_peer`]): a Pipe end's.
    pub(crate) const NEEDS_ROOM: Budget = Budget {
        needs_room: true,
        ..Budget::START
    };

    const fn of(spin: Duration) -> Budget {
        Budget {
            spin,
            skip: 0,
            strikes: 0,
            needs_room: false,
        }
    }

    /// The budget after a wait whose event came after `waited` (`None`:
    /// it timed out); `spun`: it was found while spinning.
    fn after(self, waited: Option<Duration>, spun: bool) -> Budget {
        let spin = match waited {
            Some(w) if w <= MAX => {
                let want = w.saturating_mul(2);
                let want = if spun { want.max(self.spin) } else { want };
                want.clamp(MIN, MAX)
            }
            _ => {
                let half = self.spin / 2;
                if half < MIN { Duration::ZERO } else { half }
            }
        };
        Budget {
            spin,
            strikes: if spun { 0 } else { self.strikes },
            ..self
        }
    }

    /// The budget after a spin that lost its CPU: the next waits sleep at
    /// once, twice as many as after the last such spin (spinning then
    /// only takes the CPU from whoever needs it, and makes the spinner
    /// look like a busy process to the scheduler, which then wakes it
    /// late).
    fn preempted(self) -> Budget {
        let strikes = (self.strikes + 1).min(MAX_SKIP.trailing_zeros());
        Budget {
            skip: 1 << strikes,
            strikes,
            ..self
        }
    }
}

/// Spinning pays only when the peer has a CPU of its own: with more
/// runnable processes than CPUs a spinner holds a CPU that the peer (or
/// someone else) could have used, and the peer's answer comes later than
/// if the spinner had slept; the scheduler also takes the spinner for a
/// busy process and wakes it late (measured on this 2-CPU machine, a Pipe
/// round trip beside one or two busy processes: 8-150 µs spinning against
/// 6.3-9.2 µs sleeping; 2.0-2.2 µs against 6-140 µs on a quiet one). So a
/// Pipe end's waits spin only while the kernel counts no more runnable
/// threads than this process has CPUs (`/proc/loadavg`'s fourth field,
/// read at most once per [`ROOM_EVERY`]).
fn room_for_the_peer() -> bool {
    static CHECKED: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
    let Ok(mut checked) = CHECKED.try_lock() else {
        return false;
    };
    let now = Instant::now();
    if let Some((at, room)) = *checked {
        if now.duration_since(at) < ROOM_EVERY {
            return room;
        }
    }
    let room = runnable().is_some_and(|n| n <= cpus());
    *checked = Some((now, room));
    room
}

/// How often [`room_for_the_peer`] reads the count again.
const ROOM_EVERY: Duration = Duration::from_millis(1);

/// The threads the kernel counts as runnable now, this one included.
/// The file is opened for each look (at most one per [`ROOM_EVERY`]), so
/// that the library keeps no descriptor of its own open.
fn runnable() -> Option<usize> {
    use std::io::Read;
    let mut buf = [0u8; 128];
    let n = std::fs::File::open("/proc/loadavg")
        .and_then(|mut f| f.read(&mut buf))
        .ok()?;
    // "0.52 0.58 0.59 2/431 12345": the fourth field is runnable/total.
    let text = std::str::from_utf8(buf.get(..n)?).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

/// A budget several threads share (the program's side: any thread may
/// start a process or join one). Updates race benignly: a lost update
/// costs one spin more or less. It holds the spin's length only: the
/// back-off after a spin that lost its CPU is a Pipe end's rule, and a
/// Pipe end's budget is its own.
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
        let mut budget = Budget::of(Duration::from_nanos(self.0.load(Ordering::Relaxed)));
        let events = poll(&mut budget, fds, deadline);
        let nanos = u64::try_from(budget.spin.as_nanos()).unwrap_or(u64::MAX);
        self.0.store(nanos, Ordering::Relaxed);
        events
    }
}

/// The CPUs this process may run on (its affinity mask and cgroup
/// quota), counted once.
fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Whether this process may run on more than one CPU.
fn several_cpus() -> bool {
    cpus() > 1
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

/// Waits for `what` until `deadline` (`Ok(None)`: it passed): if the
/// budget and the CPUs allow, looks, and looks again between yields for up
/// to the budget; then sleeps (see the module docs). Without a spin the
/// wait is `sleep` alone, as a wait that never spins would be.
pub(crate) fn wait<W: Wait>(
    budget: &mut Budget,
    deadline: Option<Instant>,
    what: &mut W,
) -> Result<Option<W::Found>, W::Error> {
    // A wait about to time out (`is_alive`'s look) is not a spin that
    // failed: it neither spins nor counts.
    if remaining(deadline).is_some_and(|left| left < MIN) {
        return what.sleep(remaining(deadline));
    }
    let start = Instant::now();
    let spins = budget.skip == 0
        && budget.spin > Duration::ZERO
        && several_cpus()
        && (!budget.needs_room || room_for_the_peer());
    budget.skip = budget.skip.saturating_sub(1);
    if spins {
        if let Some(found) = what.look()? {
            return Ok(Some(found));
        }
    }
    spin_then_sleep(budget, deadline, what, start, spins)
}

/// [`wait`] after its first look: the spin (if `spins`), then the sleep.
fn spin_then_sleep<W: Wait>(
    budget: &mut Budget,
    deadline: Option<Instant>,
    what: &mut W,
    start: Instant,
    spins: bool,
) -> Result<Option<W::Found>, W::Error> {
    if spins {
        let until = deadline.map_or(start + budget.spin, |d| d.min(start + budget.spin));
        let mut last = start;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            // A Pipe end's peer runs on a CPU of its own (see
            // `needs_room`): a spin that lost its CPU competes for them.
            // A forkserver wait's yields are meant to give the CPU to the
            // child or the server it waits for, so neither rule is its.
            if budget.needs_room && now - last > PREEMPTED {
                *budget = budget.preempted();
                break;
            }
            // The first microseconds look back to back (a peer answering
            // at once is found a yield sooner); then each look yields the
            // CPU first, to whoever else wants it.
            if !budget.needs_room || now - start >= EAGER {
                std::thread::yield_now();
            }
            if let Some(found) = what.look()? {
                *budget = budget.after(Some(start.elapsed()), true);
                return Ok(Some(found));
            }
            last = now;
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
        let small = Budget::of(40 * US);
        assert_eq!(small.after(Some(70 * US), true), Budget::of(140 * US));
        // A short wait found after the sleep sets it to twice that wait.
        assert_eq!(b.after(Some(30 * US), false), Budget::of(60 * US));
        assert_eq!(b.after(Some(2 * US), false), Budget::of(MIN));
        assert_eq!(small.after(Some(150 * US), false), Budget::of(MAX));
        // Long waits and timeouts halve it, then spinning stops...
        let mut b = Budget::START;
        let mut spins = vec![];
        for waited in [Some(MAX * 2), None, Some(MAX * 50), None] {
            spins.push(b.spin);
            b = b.after(waited, false);
        }
        assert_eq!(spins, vec![200 * US, 100 * US, 50 * US, 25 * US]);
        assert_eq!(b, Budget::of(Duration::ZERO));
        assert_eq!(b.after(None, false), b);
        // ...until a wait is short again.
        assert_eq!(b.after(Some(80 * US), false), Budget::of(160 * US));
    }

    #[test]
    fn a_spin_that_lost_its_cpu_keeps_ever_more_waits_from_spinning() {
        let mut b = Budget::START;
        let mut skips = vec![];
        for _ in 0..14 {
            b = b.preempted();
            skips.push(b.skip);
        }
        assert_eq!(&skips[..4], &[2, 4, 8, 16]);
        assert_eq!(skips[13], MAX_SKIP, "the back-off is bounded");
        assert_eq!(b.spin, MAX, "the spin's length is kept for later");
        // A sleeping wait keeps the back-off; a spin that paid ends it.
        let slept = b.after(Some(30 * US), false);
        assert_eq!((slept.skip, slept.strikes), (b.skip, b.strikes));
        let paid = Budget { skip: 0, ..b }.after(Some(3 * US), true);
        assert_eq!(paid, Budget::START);
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
