//! The slot-state protocol of the ring: every transition of a slot's state
//! word and of the head and tail counters, and the participant table that
//! names the holder of a slot (see the module docs of `ring` for what the
//! states mean).
//!
//! It is generic over the 64-bit atomic word ([`Word`]) and over what the
//! protocol asks of its surroundings ([`Slots`]: where the words are, who
//! this process is, whether another holder is alive, the counters and
//! wake-ups that follow a transition; [`Roster`]: where the participant
//! table is and whether a process is dead), so that one text runs in two
//! places: the real ring, over `std` atomics in a shared mapping, and the
//! `loom` model (`queue::loom`), over `loom`'s atomics with threads
//! standing in for processes and a table standing in for "is this process
//! alive". Being generic costs nothing: every use is monomorphized and
//! inlined.
//!
//! # The rights
//!
//! A transition that gives a slot to the caller returns a right:
//! [`WriteRight`] (won "free in lap L" to "writing, holder P": the slot's
//! payload is the caller's to write until it publishes or tombstones it)
//! or [`ReadRight`] (won "ready" to "taken, holder C", or took over a dead
//! consumer's "taken": the payload is the caller's to read until it
//! releases the slot). Their fields are private to this module, so a right
//! exists only where one of these CASes was won; handing the slot on
//! ([`Slots::mark_ready`], [`Slots::tombstone`], [`Slots::release`])
//! consumes it. The ring relies on this for its one `unsafe` claim (that
//! no one else touches a payload while it holds the slot), and the loom
//! model checks it: every payload access there is a `loom` `UnsafeCell`
//! access, which fails the model if two ever race.
//!
//! # Who holds a slot: participants
//!
//! A slot word has 29 bits for its holder, too few for a pid and a start
//! time. So each process that attaches to a ring first takes an entry of
//! the ring's participant table ([`join`]): the entry holds its
//! [`Holder`](crate::sys::ipc::Holder) word (pid and start-time tag) and a
//! generation, bumped by every process that takes the entry. The slot
//! words name the participant: [`PARTICIPANT`] set, the entry's index and
//! the generation's low [`GEN_BITS`] bits ([`participant`]). A participant
//! is dead ([`who_alive`]) once its entry's generation has moved
//! on, or its entry is free again, or the entry's holder is certainly
//! dead; an entry is taken from another holder only once that holder is
//! certainly dead, and given back when the ring is dropped (then nothing
//! of the process can still hold a slot). So a pid reused by a live
//! process does not keep a dead participant's slot held: the entry's
//! holder word carries the dead one's start time.
//!
//! A process that finds no entry (more live participants than entries, or
//! its own start time unknown) names itself by its bare pid, with
//! [`PARTICIPANT`] clear, and is judged by its pid alone as before (a
//! reused pid keeps its slots held while the reusing process lives).
//!
//! # Orderings
//!
//! Slot words: a right is won by a CAS with acquire ordering and handed on
//! by a release store (or CAS), so each holder's payload accesses
//! happen-before the next holder's. The CASes that write the caller's name
//! into a word have release ordering as well: whoever reads that name
//! (with acquire) and looks it up in the participant table sees the entry
//! as the caller set it up, or later, never an older holder or
//! generation (which could make a live participant look dead). On x86
//! every CAS is a full barrier, so this costs nothing; the loom model
//! fails without it. Head and tail: moved by release CASes, read with
//! acquire, so a process that sees the head or tail past a position also
//! sees the slot word that let it move. (With relaxed counters, which the
//! loom model caught, a process could see the tail past a claimed slot and
//! still read that slot's previous "free" word, or the head past a taken
//! one and its "ready" word, and report the queue corrupt: a legal
//! execution on weakly ordered CPUs. On x86 both are the same instructions
//! as before.)
//!
//! The one assumption the model cannot check is the liveness answer: a
//! slot or a table entry is taken over from a holder only once
//! [`Roster::holder_dead`] (or, for a bare pid, [`Slots::alive`]) says it
//! is dead, and a dead process touches nothing.

use std::sync::atomic::Ordering;

// A slot's state word: the lap (low 32 bits of it) in bits 32..64, a tag
// in bits 29..32, its holder in bits 0..29: a participant word or a bare
// pid (Linux pids are below 2^22).
pub(crate) const TAG_FREE: u64 = 0;
pub(crate) const TAG_WRITING: u64 = 1 << 29;
pub(crate) const TAG_READY: u64 = 2 << 29;
pub(crate) const TAG_TOMB: u64 = 3 << 29;
pub(crate) const TAG_TAKEN: u64 = 4 << 29;
pub(crate) const TAG_MASK: u64 = 7 << 29;
pub(crate) const WHO_MASK: u64 = (1 << 29) - 1;

pub(crate) fn word(lap: u64, tag: u64, who: u64) -> u64 {
    (lap << 32) | tag | who
}

/// The slot word's lap minus `lap`, modulo 2^32 (laps wrap in the word).
pub(crate) fn lap_diff(s: u64, lap: u64) -> i32 {
    ((s >> 32) as u32).wrapping_sub(lap as u32) as i32
}

/// How positions map to slots. Positions carry the lap above bit `shift`
/// and the slot index below (`mask`), as in crossbeam's `ArrayQueue`: no
/// division on the fast path for any capacity. Index values `cap..=mask`
/// are skipped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) cap: u64,
    pub(crate) shift: u32,
    pub(crate) mask: u64,
}

impl Geometry {
    pub(crate) fn new(cap: u64) -> Geometry {
        let one_lap = cap.next_power_of_two();
        Geometry {
            cap,
            shift: one_lap.trailing_zeros(),
            mask: one_lap - 1,
        }
    }

    /// `(lap, slot index)` of a position.
    pub(crate) fn split(&self, pos: u64) -> (u64, usize) {
        (pos >> self.shift, (pos & self.mask) as usize)
    }

    /// The position after `pos`.
    pub(crate) fn next(&self, pos: u64) -> u64 {
        if (pos & self.mask) + 1 < self.cap {
            pos + 1
        } else {
            (pos | self.mask) + 1
        }
    }

    /// How many positions come before `pos`.
    pub(crate) fn count(&self, pos: u64) -> u64 {
        (pos >> self.shift)
            .wrapping_mul(self.cap)
            .wrapping_add(pos & self.mask)
    }

    /// A position as its slot words see it: the lap's low 32 bits and the
    /// index (what datagrams and arena headers carry).
    pub(crate) fn pos_id(&self, pos: u64) -> u64 {
        (u64::from((pos >> self.shift) as u32) << 32) | (pos & self.mask)
    }
}

pub(crate) use crate::sys::word::Word;

/// The right to write the payload of the slot of `pos`: only a won claim
/// (or the takeover of a dead writer's claim) makes one.
#[derive(Debug)]
#[must_use = "a claimed slot must be published or tombstoned"]
pub(crate) struct WriteRight {
    pos: u64,
}

/// The right to read the payload of the slot of `pos`: only a won take
/// (or the takeover of a dead consumer's slot) makes one.
#[derive(Debug)]
#[must_use = "a taken slot must be released"]
pub(crate) struct ReadRight {
    pos: u64,
}

impl WriteRight {
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }
}

impl ReadRight {
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }
}

/// Why a claim failed.
#[derive(Debug)]
pub(crate) enum Refused {
    Closed,
    /// A word the protocol cannot produce: what, its value, the position.
    Corrupt(&'static str, u64, u64),
}

/// The caller's answer before a ready slot is taken.
pub(crate) enum Gate<G> {
    /// Take it; `G` travels with the right (the ring's side lock).
    Go(G),
    /// Do not take it now (the side lock is busy).
    Busy,
}

/// The outcome of one [`Slots::take`].
pub(crate) enum Take<G> {
    /// Taken; the gate's value, `None` when taken on the direct CAS of a
    /// plain ready word (no gate asked).
    Slot(ReadRight, Option<G>),
    /// Nothing to take: the slot at the head is free, or still the
    /// previous lap's.
    Empty,
    /// The slot at the head (index, state word) is claimed, unpublished.
    Stalled(usize, u64),
    /// The gate said busy.
    Busy,
    /// A word the protocol cannot produce: what, its value, the position.
    Corrupt(&'static str, u64, u64),
}

/// The words and surroundings of one ring, as one process sees them; the
/// protocol is the provided methods.
pub(crate) trait Slots {
    type W: Word;

    fn geometry(&self) -> &Geometry;
    fn tail(&self) -> &Self::W;
    fn head(&self) -> &Self::W;
    /// The state word of slot `idx`, which is below the capacity.
    fn state(&self, idx: usize) -> &Self::W;
    /// How this process names itself in slot words: its participant word
    /// or its bare pid (nonzero, at most [`WHO_MASK`]).
    fn me(&self) -> u64;
    /// `false` once the holder named `who` in a slot word (read with
    /// acquire) certainly touches nothing more (see [`who_alive`]).
    fn alive(&self, who: u64) -> bool;
    fn closed(&self) -> bool;
    /// This process found a message waiting at the head last time (see
    /// `Ring::try_take`).
    fn backlog(&self) -> bool;
    fn set_backlog(&self, on: bool);
    /// A slot was handed back to producers (wake one).
    fn freed(&self);
    /// A position became a tombstone (count it).
    fn tombstoned(&self);
    /// The head skipped a tombstone (count it).
    fn skipped(&self);
    /// A tombstone is left at the head for consumers to skip (wake one).
    fn left_tomb(&self);
    /// A dead writer's claim on slot `idx` was taken over: free what it
    /// may have written outside the slot.
    fn took_over_writer(&self, idx: usize);
    /// The slot at the head (position, state word) is claimed and not
    /// published: `true` if this took the claim over from a dead writer
    /// (the ring checks the clock first, then
    /// [`take_over_writer`](Slots::take_over_writer)).
    fn writer_stalled(&self, pos: u64, s: u64) -> bool;

    /// The state word of slot `idx`, or `None` past the capacity.
    #[inline(always)]
    fn checked_state(&self, idx: usize) -> Option<&Self::W> {
        ((idx as u64) < self.geometry().cap).then(|| self.state(idx))
    }

    /// Claims the slot at the tail. `Ok(None)`: full.
    ///
    /// The claim is one CAS on the slot's word, from "free in lap L" to
    /// "written by P in lap L", so a slot is never reserved without
    /// the name of its writer; the tail then moves by a CAS that anyone
    /// who finds the slot claimed also attempts (helping), so a producer
    /// that dies between the two steps blocks nobody.
    #[inline(always)]
    fn claim(&self) -> Result<Option<WriteRight>, Refused> {
        let g = *self.geometry();
        let tail = self.tail();
        let mut t = tail.load(Ordering::Acquire);
        loop {
            if self.closed() {
                return Err(Refused::Closed);
            }
            let (lap, idx) = g.split(t);
            let Some(slot) = self.checked_state(idx) else {
                return Err(Refused::Corrupt("tail index", idx as u64, t));
            };
            // First a CAS straight from the word a free slot of this lap
            // has (a released slot's word names no one): one transfer of
            // the slot's line, in exclusive state, where a load and then
            // a CAS would take two (the line was last written by the
            // consumer that released it). Its failure reads the word.
            let s = match slot.compare_exchange(
                word(lap, TAG_FREE, 0),
                word(lap, TAG_WRITING, self.me()),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let _ =
                        tail.compare_exchange(t, g.next(t), Ordering::Release, Ordering::Relaxed);
                    return Ok(Some(WriteRight { pos: t }));
                }
                Err(s) => s,
            };
            let d = lap_diff(s, lap);
            let tag = s & TAG_MASK;
            if d == 0 {
                if tag == TAG_FREE {
                    if slot
                        .compare_exchange(
                            s,
                            word(lap, TAG_WRITING, self.me()),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                    {
                        let _ = tail.compare_exchange(
                            t,
                            g.next(t),
                            Ordering::Release,
                            Ordering::Relaxed,
                        );
                        return Ok(Some(WriteRight { pos: t }));
                    }
                } else if tag > TAG_TAKEN {
                    return Err(Refused::Corrupt("slot word", s, t));
                } else {
                    // Claimed by another producer: help it move the tail.
                    let _ =
                        tail.compare_exchange(t, g.next(t), Ordering::Release, Ordering::Relaxed);
                }
                t = tail.load(Ordering::Acquire);
                continue;
            }
            let now = tail.load(Ordering::Acquire);
            if now != t {
                t = now;
                continue;
            }
            if d == -1 {
                // The previous lap's position is still in the slot: full,
                // unless it is a skipped tombstone whose skipper died
                // before handing the slot back.
                match tag {
                    TAG_FREE => return Err(Refused::Corrupt("free slot word", s, t)),
                    TAG_TOMB => {
                        let prev = ((lap.wrapping_sub(1)) << g.shift) | idx as u64;
                        if self.release_tomb_behind_head(prev, s) {
                            continue;
                        }
                        return Ok(None);
                    }
                    _ => return Ok(None),
                }
            }
            // A lap ahead of a tail that has not moved (the slot was
            // released before its position was claimed), or two behind.
            return Err(Refused::Corrupt("slot word", s, t));
        }
    }

    /// Publishes the claimed slot (`flags` in the holder bits of the ready
    /// word). Everything the writer wrote before this is visible to the
    /// consumer that takes the slot.
    #[inline(always)]
    fn mark_ready(&self, right: WriteRight, flags: u64) {
        let (lap, idx) = self.geometry().split(right.pos);
        self.state(idx)
            .store(word(lap, TAG_READY, flags), Ordering::Release);
    }

    /// One attempt to take the message at the head; `gate` is asked before
    /// the CAS that takes a ready slot (never while holding one).
    ///
    /// Emptiness is read from the slot at the head alone (free in this
    /// lap, or still holding the previous lap): slots are claimed in
    /// position order, so a free slot at the head means nothing behind it
    /// is claimed either. While [`backlog`](Slots::backlog) is set, the
    /// first attempt is a CAS straight from the plain ready word.
    #[inline(always)]
    fn take<G>(&self, mut gate: impl FnMut(usize) -> Gate<G>) -> Take<G> {
        let g = *self.geometry();
        let head = self.head();
        let mut h = head.load(Ordering::Acquire);
        let mut first = true;
        loop {
            let (lap, idx) = g.split(h);
            let Some(slot) = self.checked_state(idx) else {
                return Take::Corrupt("head index", idx as u64, h);
            };
            let s = if first && self.backlog() {
                match slot.compare_exchange(
                    word(lap, TAG_READY, 0),
                    word(lap, TAG_TAKEN, self.me()),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        let _ = head.compare_exchange(
                            h,
                            g.next(h),
                            Ordering::Release,
                            Ordering::Relaxed,
                        );
                        return Take::Slot(ReadRight { pos: h }, None);
                    }
                    Err(s) => s,
                }
            } else {
                slot.load(Ordering::Acquire)
            };
            if first {
                first = false;
                let ready = s & TAG_MASK == TAG_READY && lap_diff(s, lap) == 0;
                if self.backlog() != ready {
                    self.set_backlog(ready);
                }
            }
            let d = lap_diff(s, lap);
            let tag = s & TAG_MASK;
            if d != 0 {
                if d == -1 && (tag == TAG_TAKEN || tag == TAG_TOMB) {
                    // The previous lap's message, still being read (or
                    // its reader died: see `recover_from`), or a skipped
                    // tombstone not handed back yet. Nothing new here.
                    if tag == TAG_TOMB {
                        let prev = ((lap.wrapping_sub(1)) << g.shift) | idx as u64;
                        self.release_tomb_behind_head(prev, s);
                    }
                    return Take::Empty;
                }
                let now = head.load(Ordering::Acquire);
                if now != h {
                    h = now;
                    continue;
                }
                return Take::Corrupt("slot word", s, h);
            }
            match tag {
                TAG_FREE => return Take::Empty,
                TAG_WRITING => {
                    // A producer is writing, or died writing.
                    if self.writer_stalled(h, s) {
                        h = head.load(Ordering::Acquire);
                        continue;
                    }
                    return Take::Stalled(idx, s);
                }
                TAG_TAKEN => {
                    // Another consumer took it: help it move the head.
                    let _ =
                        head.compare_exchange(h, g.next(h), Ordering::Release, Ordering::Relaxed);
                    h = head.load(Ordering::Acquire);
                }
                TAG_TOMB => {
                    match head.compare_exchange(h, g.next(h), Ordering::Release, Ordering::Acquire)
                    {
                        Ok(_) => {
                            self.skipped();
                            self.release_tomb(h, s);
                            h = g.next(h);
                        }
                        Err(now) => h = now,
                    }
                }
                TAG_READY => {
                    let pass = match gate(idx) {
                        Gate::Go(pass) => pass,
                        Gate::Busy => return Take::Busy,
                    };
                    if slot
                        .compare_exchange(
                            s,
                            word(lap, TAG_TAKEN, self.me()),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_err()
                    {
                        drop(pass);
                        h = head.load(Ordering::Acquire);
                        continue;
                    }
                    let _ =
                        head.compare_exchange(h, g.next(h), Ordering::Release, Ordering::Relaxed);
                    return Take::Slot(ReadRight { pos: h }, Some(pass));
                }
                _ => return Take::Corrupt("slot word", s, h),
            }
        }
    }

    /// Hands a taken slot back to producers. Everything its reader did
    /// before this happens-before the next writer's claim.
    #[inline(always)]
    fn release(&self, right: ReadRight) {
        let (lap, idx) = self.geometry().split(right.pos);
        self.state(idx)
            .store(word(lap.wrapping_add(1), TAG_FREE, 0), Ordering::Release);
        self.freed();
    }

    /// Hands back a tombstone (state `s`) that the head has passed. By CAS:
    /// the one who skipped it and a process that found it left behind by a
    /// dead skipper may both try.
    fn release_tomb(&self, pos: u64, s: u64) -> bool {
        let (lap, idx) = self.geometry().split(pos);
        let done = self
            .state(idx)
            .compare_exchange(
                s,
                word(lap.wrapping_add(1), TAG_FREE, 0),
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_ok();
        if done {
            self.freed();
        }
        done
    }

    /// A tombstone (state `s`) at position `pos` of the previous lap: if
    /// the head has passed it, its skipper died before handing it back, or
    /// is about to: hand it back (`true` if this did). If it is at the
    /// head, skip it first.
    fn release_tomb_behind_head(&self, pos: u64, s: u64) -> bool {
        let g = *self.geometry();
        let head = self.head();
        let h = head.load(Ordering::Acquire);
        if h == pos {
            if head
                .compare_exchange(pos, g.next(pos), Ordering::Release, Ordering::Relaxed)
                .is_err()
            {
                return false;
            }
            self.skipped();
        } else if g.count(h) <= g.count(pos) {
            return false;
        }
        self.release_tomb(pos, s)
    }

    /// Turns a claimed position into a tombstone (an encoding error, a
    /// dead writer's claim taken over, no room for its handles). If it is
    /// at the head, skips it at once as a consumer would (the CAS on the
    /// head decides between us and any consumer), so failed puts on a
    /// queue nobody reads do not fill it with tombstones.
    fn tombstone(&self, right: WriteRight) {
        let g = *self.geometry();
        let pos = right.pos;
        let (lap, idx) = g.split(pos);
        let tomb = word(lap, TAG_TOMB, 0);
        self.state(idx).store(tomb, Ordering::Release);
        self.tombstoned();
        if self
            .head()
            .compare_exchange(pos, g.next(pos), Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            self.skipped();
            self.release_tomb(pos, tomb);
        } else {
            self.left_tomb();
        }
    }

    /// The slot of `pos` is claimed (state `s`) and not published: if its
    /// writer is dead, takes its claim over (a CAS from the dead writer's
    /// own word, which cannot race with that writer) and tombstones it
    /// (`true`: the slot moved on). A live writer's word is never touched,
    /// so a message is either published whole once or dropped because its
    /// `put` never returned.
    fn take_over_writer(&self, pos: u64, s: u64) -> bool {
        let who = s & WHO_MASK;
        if who == self.me() || self.alive(who) {
            return false;
        }
        let g = *self.geometry();
        // It may have died before moving the tail past its slot: move it,
        // so the tail counts the position that is about to be a tombstone.
        let _ = self
            .tail()
            .compare_exchange(pos, g.next(pos), Ordering::SeqCst, Ordering::Relaxed);
        let (lap, idx) = g.split(pos);
        if self
            .state(idx)
            .compare_exchange(
                s,
                word(lap, TAG_WRITING, self.me()),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.took_over_writer(idx);
            self.tombstone(WriteRight { pos });
        }
        true
    }

    /// Scans the slots from index `from` for one taken by a dead consumer
    /// (handing back, on the way, tombstones left behind by dead
    /// skippers); `taken` is set if any slot was seen taken. `gate` is
    /// asked before the CAS that takes such a slot over (`None`: leave it
    /// for now). Returns the slot's index, the right and the gate's value.
    fn recover_from<G>(
        &self,
        from: usize,
        taken: &mut bool,
        mut gate: impl FnMut(usize) -> Option<G>,
    ) -> Option<(usize, ReadRight, G)> {
        let g = *self.geometry();
        for idx in from..g.cap as usize {
            let slot = self.state(idx);
            let s = slot.load(Ordering::Acquire);
            let lap = s >> 32;
            let pos = (lap << g.shift) | idx as u64;
            match s & TAG_MASK {
                TAG_TAKEN => *taken = true,
                TAG_TOMB => {
                    // Only one lap behind the head can be left behind.
                    let h = self.head().load(Ordering::Acquire);
                    let back = ((h >> g.shift) as u32).wrapping_sub(lap as u32);
                    if back == 1 || (back == 0 && (h & g.mask) > idx as u64) {
                        let full =
                            ((h >> g.shift).wrapping_sub(u64::from(back)) << g.shift) | idx as u64;
                        self.release_tomb_behind_head(full, s);
                    }
                    continue;
                }
                _ => continue,
            }
            let who = s & WHO_MASK;
            if who == self.me() || self.alive(who) {
                continue;
            }
            let Some(pass) = gate(idx) else {
                continue;
            };
            if slot
                .compare_exchange(
                    s,
                    word(lap, TAG_TAKEN, self.me()),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                continue;
            }
            // It may have died before moving the head past its slot; the
            // head must be past it before it is released.
            let head = self.head();
            let h = head.load(Ordering::Acquire);
            if g.pos_id(h) == g.pos_id(pos) {
                let _ = head.compare_exchange(h, g.next(h), Ordering::AcqRel, Ordering::Relaxed);
            }
            return Some((idx, ReadRight { pos }, pass));
        }
        None
    }
}

// ---------------------------------------------------------------------
// The participant table.

/// Set in a slot word's holder bits when they name a participant (else a
/// bare pid: pids are below 2^22).
pub(crate) const PARTICIPANT: u64 = 1 << 28;
/// Bits of the entry index in a participant word (above the generation).
pub(crate) const INDEX_BITS: u32 = 8;
/// Bits of the generation in a participant word.
pub(crate) const GEN_BITS: u32 = 20;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
/// The most entries a table can have.
pub(crate) const MAX_ENTRIES: usize = 1 << INDEX_BITS;

/// The participant word of entry `idx` in generation `generation` (its
/// low [`GEN_BITS`] bits).
pub(crate) fn participant(idx: usize, generation: u64) -> u64 {
    PARTICIPANT | ((idx as u64 & (MAX_ENTRIES as u64 - 1)) << GEN_BITS) | (generation & GEN_MASK)
}

/// The participant table of one ring, as one process sees it.
///
/// Entry `i` is two words: its *holder* (0 when free, else a packed
/// [`Holder`](crate::sys::ipc::Holder), never 0) and its *generation*,
/// written only by the entry's holder, right after it took the entry and
/// before it names itself anywhere. The holder word moves from 0 or from a
/// dead holder to a new holder by CAS ([`join`]), and back to 0 when its
/// holder leaves ([`leave`]); so while a participant lives, its entry
/// holds its holder and its generation.
pub(crate) trait Roster {
    type W: Word;
    /// How many entries the table has (at most [`MAX_ENTRIES`]).
    fn entries(&self) -> usize;
    /// Entry `idx`'s holder and generation words (`idx < entries()`).
    fn entry(&self, idx: usize) -> (&Self::W, &Self::W);
    /// `true` only if `holder` (a nonzero holder word read with acquire
    /// from an entry) names a process that certainly no longer runs.
    /// Doubt (another pid namespace, `/proc` hidden) must answer `false`.
    fn holder_dead(&self, holder: u64) -> bool;
    /// `true` only if the bare `pid` (a slot holder without
    /// [`PARTICIPANT`]) certainly names no running process.
    fn pid_dead(&self, pid: u64) -> bool;
}

/// Takes an entry for `me` (a nonzero holder word): a free one, else one
/// whose holder is certainly dead. Returns the participant word, `None`
/// if every entry is held by a process that may be alive.
///
/// Free entries are tried first with one load each; the dead are looked
/// for only when there is none (each [`Roster::holder_dead`] reads
/// `/proc`). The CAS has release ordering, so whoever reads `me` in the
/// entry also sees what this process did before (its pid namespace
/// registration), and acquire ordering, so this process sees the entry's
/// generation as its previous holder left it: that holder gave it back by
/// a release store, or died (a dead process's writes are all done).
pub(crate) fn join<R: Roster>(r: &R, me: u64) -> Option<u64> {
    let n = r.entries().min(MAX_ENTRIES);
    for idx in 0..n {
        let (holder, _) = r.entry(idx);
        if holder.load(Ordering::Relaxed) == 0
            && holder
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Some(next_generation(r, idx));
        }
    }
    for idx in 0..n {
        let (holder, _) = r.entry(idx);
        let h = holder.load(Ordering::Acquire);
        // A holder is never recycled while it may live, and a dead one
        // never comes back, so the CAS takes the entry from the holder
        // that was judged (the limit: `Holder`'s, two processes with one
        // pid and one start tick).
        if h != 0
            && h != me
            && r.holder_dead(h)
            && holder
                .compare_exchange(h, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Some(next_generation(r, idx));
        }
    }
    None
}

/// Entry `idx` was just taken: moves its generation on (only the holder
/// writes it), so that every slot word naming an earlier participant of
/// the entry now names a dead one. The participant word is made after the
/// store, which comes before any slot word names it.
fn next_generation<R: Roster>(r: &R, idx: usize) -> u64 {
    let (_, generation) = r.entry(idx);
    let g = generation.load(Ordering::Relaxed).wrapping_add(1);
    generation.store(g, Ordering::Release);
    participant(idx, g)
}

/// Gives back the entry of participant `who`, held by `me`: called when
/// nothing of this process can hold a slot in its name any more (the ring
/// is dropped). A release store, so the next holder sees the generation.
pub(crate) fn leave<R: Roster>(r: &R, who: u64, me: u64) {
    if who & PARTICIPANT == 0 {
        return;
    }
    let idx = ((who >> GEN_BITS) as usize) & (MAX_ENTRIES - 1);
    if idx < r.entries() {
        let _ = r
            .entry(idx)
            .0
            .compare_exchange(me, 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// Whether the holder named `who` in a slot word (or the side lock) may
/// still touch what it holds: `false` only if it certainly does not.
///
/// `who` must have been read with acquire from a word written by its
/// holder with release (see the module docs): then the entry reads as its
/// holder set it up, or later. So a generation other than `who`'s means
/// the entry was taken since, which happens only once `who` gave it back
/// or was judged dead; a free entry means it was given back; and a holder
/// word, whether `who`'s own or a later one, is dead only if its process
/// is. A participant word naming an entry past the table (corrupt memory)
/// answers alive: nothing is taken over on doubt.
pub(crate) fn who_alive<R: Roster>(r: &R, who: u64) -> bool {
    if who & PARTICIPANT == 0 {
        return !r.pid_dead(who);
    }
    let idx = ((who >> GEN_BITS) as usize) & (MAX_ENTRIES - 1);
    if idx >= r.entries() {
        return true;
    }
    let (holder, generation) = r.entry(idx);
    if generation.load(Ordering::Acquire) & GEN_MASK != who & GEN_MASK {
        return false;
    }
    match holder.load(Ordering::Acquire) {
        0 => false,
        h => !r.holder_dead(h),
    }
}
