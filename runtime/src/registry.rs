//! What the macros fill: the table of functions and task types that a child
//! process can run, by name.
//!
//! `#[process_fn]` and `#[derive(ProcessTask)]` each submit one [`Entry`]
//! with [`inventory`]. The table is turned into two maps (by name, for the
//! child; by `TypeId`, for the parent) once, on first use. Registration has
//! no order, entries are `const` values, and a child finds the same entries
//! because it is the same executable.

use std::any::TypeId;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::os::fd::OwnedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::error::{Error, Result};
use crate::wire::Channel;

/// One registered function or task type. Built by the macros; not public API.
#[doc(hidden)]
#[derive(Debug)]
pub struct Entry {
    name: &'static str,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// A `#[process_fn]` or a `#[derive(ProcessTask)]` type.
    User {
        type_id: fn() -> TypeId,
        invoke: fn(&mut Call<'_>) -> Result<()>,
    },
    /// A runtime-internal entry point (the pool worker), under
    /// [`RESERVED_PREFIX`].
    Internal(InternalMain),
}

/// A runtime-internal entry point: the child's socket to its parent, the
/// start arguments and their descriptors in; the exit code out.
pub(crate) type InternalMain = fn(Channel, Vec<u8>, Vec<OwnedFd>) -> i32;

/// Names that start with this are the runtime's own entry points; the
/// macros refuse them for user functions.
pub(crate) const RESERVED_PREFIX: &str = "__multiproc::";

impl Entry {
    /// Used by the macros.
    pub const fn new(
        name: &'static str,
        type_id: fn() -> TypeId,
        invoke: fn(&mut Call<'_>) -> Result<()>,
    ) -> Entry {
        Entry {
            name,
            kind: Kind::User { type_id, invoke },
        }
    }

    /// A runtime-internal entry point; `name` must start with
    /// [`RESERVED_PREFIX`].
    pub(crate) const fn internal(name: &'static str, main: InternalMain) -> Entry {
        Entry {
            name,
            kind: Kind::Internal(main),
        }
    }

    /// The registered name (`module::path::function`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The entry point, for a runtime-internal entry.
    pub(crate) fn internal_main(&self) -> Option<InternalMain> {
        match self.kind {
            Kind::Internal(main) => Some(main),
            Kind::User { .. } => None,
        }
    }

    pub(crate) fn invoke(&self, call: &mut Call<'_>) -> Result<()> {
        match self.kind {
            Kind::User { invoke, .. } => invoke(call),
            Kind::Internal(_) => Err(Error::misuse(format!(
                "`{}` is a runtime entry point, not a function to call",
                self.name
            ))),
        }
    }
}

inventory::collect!(Entry);

/// The maps are built from compile-time names, not input: a fixed hasher
/// is enough and spares every child a `getrandom` call at start.
type FixedState = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

struct Registry {
    by_name: HashMap<&'static str, &'static Entry, FixedState>,
    by_type: HashMap<TypeId, &'static Entry, FixedState>,
    duplicates: Vec<&'static str>,
    fingerprint: Fingerprint,
}

/// What a parent and its child compare to tell whether they registered
/// the same entries: how many, and a hash of their sorted names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Fingerprint {
    pub(crate) count: u32,
    pub(crate) hash: u64,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut by_name = HashMap::default();
        let mut by_type = HashMap::default();
        let mut duplicates = Vec::new();
        let mut names = Vec::new();
        for entry in inventory::iter::<Entry> {
            if by_name.insert(entry.name, entry).is_some() {
                duplicates.push(entry.name);
            }
            match entry.kind {
                // The macros refuse reserved names; a user entry that has
                // one anyway is never found from its function.
                Kind::User { .. } if entry.name.starts_with(RESERVED_PREFIX) => {}
                Kind::User { type_id, .. } => {
                    by_type.insert(type_id(), entry);
                }
                Kind::Internal(_) => {}
            }
            names.push(entry.name);
        }
        names.sort_unstable();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        names.hash(&mut hasher);
        Registry {
            by_name,
            by_type,
            duplicates,
            fingerprint: Fingerprint {
                count: u32::try_from(names.len()).unwrap_or(u32::MAX),
                hash: hasher.finish(),
            },
        }
    })
}

/// This process's [`Fingerprint`].
pub(crate) fn fingerprint() -> Fingerprint {
    registry().fingerprint
}

/// The entry registered for the function item or task type `F`.
pub(crate) fn lookup_type<F: 'static>() -> Result<&'static Entry> {
    let reg = registry();
    match reg.by_type.get(&TypeId::of::<F>()) {
        Some(entry) if reg.duplicates.contains(&entry.name) => Err(Error::DuplicateName {
            name: entry.name.to_string(),
        }),
        Some(entry) => Ok(entry),
        None => Err(Error::NotRegistered {
            name: user_type_name(std::any::type_name::<F>()),
        }),
    }
}

/// A type name as the user wrote it: without the inner function that
/// `#[multiproc::main]` wraps `main`'s body in.
fn user_type_name(name: &str) -> String {
    name.replace("::__multiproc_main", "")
}

/// The entry registered under `name`.
pub(crate) fn lookup_name(name: &str) -> Result<&'static Entry> {
    let reg = registry();
    if reg.duplicates.contains(&name) {
        return Err(Error::DuplicateName {
            name: name.to_string(),
        });
    }
    reg.by_name
        .get(name)
        .copied()
        .ok_or_else(|| Error::NotRegistered {
            name: name.to_string(),
        })
}

/// Every registered name, sorted (for diagnostics).
pub fn registered_names() -> Vec<&'static str> {
    let mut names: Vec<_> = registry().by_name.keys().copied().collect();
    names.sort_unstable();
    names
}

/// What a panic left behind: its message and location.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct PanicRecord {
    pub(crate) message: String,
    pub(crate) location: Option<String>,
}

impl PanicRecord {
    pub(crate) fn into_error(self, pid: u32, item: Option<usize>) -> Error {
        Error::Panicked {
            message: self.message,
            location: self.location,
            pid,
            item,
        }
    }
}

// The panic hook records the location here; `catch_unwind` gives the message.
thread_local! {
    static LAST_PANIC_LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that records each panic's location and
/// then defers to the previous hook, unless the thread asked for quiet
/// panics (pool tasks: the parent reports them).
///
/// Under `panic = "abort"` nothing can catch a panic, so the hook is the
/// last code that runs: it hands the record to the reporter set with
/// [`set_abort_reporter`], which sends it to the parent and exits (see
/// `child`), so that the parent sees the panic as it would with unwinding.
pub(crate) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
            if cfg!(panic = "abort") {
                let reporter = ABORT_REPORTER.try_lock().ok().and_then(|r| *r);
                if let Some(report) = reporter {
                    let message = payload_message(info.payload());
                    report(PanicRecord { message, location });
                }
                return;
            }
            LAST_PANIC_LOCATION.with(|slot| *slot.borrow_mut() = location);
        }));
    });
}

/// What the panic hook calls under `panic = "abort"`: sends the record to
/// the parent and ends the process (returning lets the abort happen).
pub(crate) type AbortReporter = fn(PanicRecord);

static ABORT_REPORTER: std::sync::Mutex<Option<AbortReporter>> = std::sync::Mutex::new(None);

/// Sets this process's [`AbortReporter`] (used only under `panic = "abort"`).
pub(crate) fn set_abort_reporter(report: AbortReporter) {
    if let Ok(mut slot) = ABORT_REPORTER.lock() {
        *slot = Some(report);
    }
}

/// Makes panics on this thread silent (their record still reaches the parent).
pub(crate) fn set_quiet_panics(quiet: bool) {
    QUIET_PANICS.with(|q| q.set(quiet));
}

/// A panic payload's message.
fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "explicit panic (payload is not a string)".to_string()
    }
}

fn panic_record(payload: Box<dyn std::any::Any + Send>) -> PanicRecord {
    let message = payload_message(&*payload);
    let location = LAST_PANIC_LOCATION.with(|slot| slot.borrow_mut().take());
    PanicRecord { message, location }
}

/// Runs `f`, turning a panic into its record.
pub(crate) fn catch<R>(f: impl FnOnce() -> R) -> std::result::Result<R, PanicRecord> {
    catch_unwind(AssertUnwindSafe(f)).map_err(panic_record)
}

/// Under `panic = "abort"`: how far the chunk running on this thread has
/// got, kept where the panic hook can read it (see [`Call::run`]).
struct AbortProgress {
    /// The chunk's output: from `base`, a run header and the results of
    /// the items before the running one.
    out: Vec<u8>,
    base: usize,
    /// The running item's place in the chunk.
    done: u32,
    /// Where the arguments of the item after it start.
    next: usize,
}

thread_local! {
    static ABORT_PROGRESS: std::cell::Cell<Option<AbortProgress>> =
        const { std::cell::Cell::new(None) };
}

/// Under `panic = "abort"`, from the panic hook: the running item's place
/// in its chunk, where the next item's arguments start, and the outcomes
/// of the items before it (one run, in the chunk's output format).
pub(crate) fn take_abort_progress() -> Option<(u32, usize, Vec<u8>)> {
    let progress = ABORT_PROGRESS.take()?;
    let mut partial = progress.out.get(progress.base..)?.to_vec();
    partial
        .get_mut(..RUN_HEADER)?
        .copy_from_slice(&progress.done.to_le_bytes());
    Some((progress.done, progress.next, partial))
}

/// Bytes of the length that starts each run of results in a chunk's output.
pub(crate) const RUN_HEADER: usize = 4;

enum Mode {
    Single,
    Chunk { count: usize },
}

/// One invocation of a registered function, in a child: the encoded
/// arguments in, the encoded result out. Not public API.
///
/// In single mode the input is one argument tuple and the output one
/// result; a panic is caught and returned as [`Error::Panicked`]. In chunk
/// mode (pool tasks) the input is `count` argument tuples back to back and
/// the output a sequence of *runs*: a `u32` count `k` then `k` results
/// back to back; when a run ends before the chunk does, the item after it
/// panicked and its [`PanicRecord`] follows, then the next run. A panic
/// fails only its item, and the parent decodes a run of plain results in
/// one tight loop, with no per-item tag.
#[doc(hidden)]
pub struct Call<'a> {
    input: &'a [u8],
    in_fds: Vec<OwnedFd>,
    out: &'a mut Vec<u8>,
    out_fds: &'a mut Vec<OwnedFd>,
    mode: Mode,
    /// Where a chunk of fixed-width results may be written in place of
    /// `out` (a pool worker's output arena), and how much of it was.
    direct: Option<&'a mut [u8]>,
    direct_used: Option<usize>,
}

impl std::fmt::Debug for Call<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("input_len", &self.input.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Call<'a> {
    pub(crate) fn single(
        input: &'a [u8],
        in_fds: Vec<OwnedFd>,
        out: &'a mut Vec<u8>,
        out_fds: &'a mut Vec<OwnedFd>,
    ) -> Self {
        Call {
            input,
            in_fds,
            out,
            out_fds,
            mode: Mode::Single,
            direct: None,
            direct_used: None,
        }
    }

    pub(crate) fn chunk(
        input: &'a [u8],
        count: usize,
        in_fds: Vec<OwnedFd>,
        out: &'a mut Vec<u8>,
        out_fds: &'a mut Vec<OwnedFd>,
    ) -> Self {
        Call {
            input,
            in_fds,
            out,
            out_fds,
            mode: Mode::Chunk { count },
            direct: None,
            direct_used: None,
        }
    }

    /// Lets a chunk whose arguments and results are fixed-width numbers
    /// write its outcomes into `region` instead of the output buffer,
    /// when they fit and no item panics (see
    /// [`direct_used`](Call::direct_used)).
    pub(crate) fn with_direct(mut self, region: &'a mut [u8]) -> Self {
        self.direct = Some(region);
        self
    }

    /// The bytes of the direct region that hold the chunk's outcomes, if
    /// they went there (the output buffer is then empty).
    pub(crate) fn direct_used(&self) -> Option<usize> {
        self.direct_used
    }

    /// Decodes the arguments, calls `f`, encodes the result(s).
    pub fn run<A: DeserializeOwned + 'static, R: Serialize + 'static>(
        &mut self,
        mut f: impl FnMut(A) -> R,
    ) -> Result<()> {
        let in_fds = std::mem::take(&mut self.in_fds);
        match self.mode {
            Mode::Single => {
                let args: A = codec::decode(self.input, in_fds)?;
                let result =
                    catch(move || f(args)).map_err(|p| p.into_error(std::process::id(), None))?;
                codec::encode(&result, self.out, self.out_fds)
            }
            Mode::Chunk { count } if cfg!(panic = "abort") => {
                let input = self.input;
                let out = &mut *self.out;
                let out_fds = &mut *self.out_fds;
                codec::with_fd_source(in_fds, || {
                    codec::with_fd_sink(out_fds, || {
                        // Nothing can catch a panic: the chunk is one run,
                        // and while an item runs the chunk's progress sits
                        // where the panic hook finds it (a panic ends the
                        // process, and the parent keeps what came before).
                        let base = out.len();
                        out.extend_from_slice(&[0; RUN_HEADER]);
                        let mut dec = codec::SeqDecoder::new(input);
                        let mut done: u32 = 0;
                        while (done as usize) < count {
                            let args: A = dec.next()?;
                            ABORT_PROGRESS.set(Some(AbortProgress {
                                out: std::mem::take(out),
                                base,
                                done,
                                next: input.len() - dec.remaining(),
                            }));
                            let r = f(args);
                            if let Some(progress) = ABORT_PROGRESS.take() {
                                *out = progress.out;
                            }
                            codec::SeqEncoder::new(out).push_value(&r)?;
                            done += 1;
                        }
                        out[base..base + RUN_HEADER].copy_from_slice(&done.to_le_bytes());
                        Ok(())
                    })
                })
            }
            Mode::Chunk { count } => {
                let input = self.input;
                let out = &mut *self.out;
                let out_fds = &mut *self.out_fds;
                let direct = self.direct.take();
                let direct_used = &mut self.direct_used;
                codec::with_fd_source(in_fds, || {
                    codec::with_fd_sink(out_fds, || {
                        // Numbers in, numbers out: the first run in one
                        // tight loop; after a panic, the rest as below.
                        let mut done = 0;
                        let first = match direct {
                            Some(region) => fixed_run_direct(input, count, region, out, &mut f)
                                .map(|r| {
                                    r.map(|(ran, panicked, used)| {
                                        *direct_used = used;
                                        (ran, panicked)
                                    })
                                }),
                            None => fixed_run(input, count, out, &mut f),
                        };
                        if let Some(first) = first {
                            let (ran, panicked) = first?;
                            done = ran;
                            if let Some(record) = panicked {
                                codec::SeqEncoder::new(out).push(&record)?;
                            }
                        }
                        let rest = codec::primitive_width::<A>()
                            .and_then(|w| input.get(done * w..))
                            .filter(|_| done > 0)
                            .unwrap_or(input);
                        let mut dec = codec::SeqDecoder::new(rest);
                        let mut enc = codec::SeqEncoder::new(out);
                        let mut mark = 0;
                        while done < count {
                            // One catch_unwind for a run of items: the happy
                            // path pays nothing per item; after a panic the
                            // run restarts at the next item.
                            let run_at = enc.out().len();
                            enc.out().extend_from_slice(&[0; RUN_HEADER]);
                            let mut in_run: u32 = 0;
                            let run = catch(|| -> Result<()> {
                                while done < count {
                                    let args: A = dec.next()?;
                                    done += 1;
                                    mark = enc.out().len();
                                    let r = f(args);
                                    enc.push_value(&r)?;
                                    in_run += 1;
                                }
                                Ok(())
                            });
                            let panicked = match run {
                                Ok(r) => {
                                    r?;
                                    None
                                }
                                // Drop whatever the panicking item wrote.
                                Err(record) => Some(record),
                            };
                            if panicked.is_some() {
                                enc.out().truncate(mark);
                            }
                            enc.out()[run_at..run_at + RUN_HEADER]
                                .copy_from_slice(&in_run.to_le_bytes());
                            if let Some(record) = panicked {
                                enc.push(&record)?;
                            }
                        }
                        Ok(())
                    })
                })
            }
        }
    }
}

/// The outcome of a chunk's first run of fixed-width items: the items it
/// went through (the panicking one included), the panic that stopped it.
type FirstRun = Result<(usize, Option<PanicRecord>)>;

/// A chunk's first run when its arguments and results are fixed-width
/// numbers (see [`codec::primitive_width`]): the results are stored in
/// place, with no per-item length bookkeeping, under one `catch`, the run
/// (header and results) appended to `out`. `None` (nothing written) for
/// other types or an input of the wrong length, which the general loop
/// handles.
fn fixed_run<A: 'static, R: 'static>(
    input: &[u8],
    count: usize,
    out: &mut Vec<u8>,
    f: &mut impl FnMut(A) -> R,
) -> Option<FirstRun> {
    let width = fixed_widths::<A, R>(input, count)?;
    let base = out.len();
    out.resize(base + RUN_HEADER + count * width, 0);
    let run = fixed_loop(input, out.get_mut(base..).unwrap_or_default(), width, f);
    let finished = match &run {
        Ok((finished, _)) => *finished,
        Err(_) => 0,
    };
    out.truncate(base + RUN_HEADER + finished * width);
    Some(run.map(|(finished, panicked)| went_through(finished, panicked)))
}

/// [`FirstRun`], and the bytes of the direct region used, when the whole
/// outcome went there.
type DirectRun = Result<(usize, Option<PanicRecord>, Option<usize>)>;

/// [`fixed_run`] into `region` (a worker's output arena): when every item
/// ran, the whole outcome is there and the used length comes back;
/// after a panic, the run is copied to `out` and the chunk goes on there.
fn fixed_run_direct<A: 'static, R: 'static>(
    input: &[u8],
    count: usize,
    region: &mut [u8],
    out: &mut Vec<u8>,
    f: &mut impl FnMut(A) -> R,
) -> Option<DirectRun> {
    let width = fixed_widths::<A, R>(input, count)?;
    let need = RUN_HEADER + count * width;
    if region.len() < need {
        return fixed_run(input, count, out, f).map(|r| r.map(|(n, p)| (n, p, None)));
    }
    let region = &mut region[..need];
    Some(
        fixed_loop(input, region, width, f).map(|(finished, panicked)| match panicked {
            None => (finished, None, Some(need)),
            Some(record) => {
                out.extend_from_slice(&region[..RUN_HEADER + finished * width]);
                let (ran, panicked) = went_through(finished, Some(record));
                (ran, panicked, None)
            }
        }),
    )
}

/// The result width when `A` and `R` are fixed-width and `input` holds
/// exactly `count` arguments.
fn fixed_widths<A: 'static, R: 'static>(input: &[u8], count: usize) -> Option<usize> {
    let arg_width = codec::primitive_width::<A>()?;
    let width = codec::primitive_width::<R>()?;
    (count > 0 && input.len() == count.checked_mul(arg_width)?).then_some(width)
}

fn went_through(finished: usize, panicked: Option<PanicRecord>) -> (usize, Option<PanicRecord>) {
    let ran = if panicked.is_some() {
        finished + 1
    } else {
        finished
    };
    (ran, panicked)
}

/// Runs the fixed-width items of `input` into `dst` (a run header, then
/// `width` bytes per result, as long as the input has items), writes the
/// header, and returns how many finished and the panic that stopped them.
fn fixed_loop<A: 'static, R: 'static>(
    input: &[u8],
    dst: &mut [u8],
    width: usize,
    f: &mut impl FnMut(A) -> R,
) -> Result<(usize, Option<PanicRecord>)> {
    let arg_width = codec::primitive_width::<A>().unwrap_or(1);
    let (header, results) = dst.split_at_mut(RUN_HEADER.min(dst.len()));
    // Items started so far (a plain store per item, no load).
    let mut started = 0usize;
    let run = catch(|| -> Result<()> {
        let items = input
            .chunks_exact(arg_width)
            .zip(results.chunks_exact_mut(width));
        for (i, (arg, slot)) in items.enumerate() {
            started = i + 1;
            let args: A = codec::read_primitive_exact(arg).unwrap_or_else(|| {
                Err(Error::internal(
                    "a fixed-width argument has the wrong width",
                ))
            })?;
            let r = f(args);
            codec::write_primitive(&r, slot);
        }
        Ok(())
    });
    let (finished, panicked) = match run {
        Ok(Ok(())) => (started, None),
        Ok(Err(err)) => return Err(err),
        Err(record) => (started.saturating_sub(1), Some(record)),
    };
    header.copy_from_slice(&(finished as u32).to_le_bytes()[..header.len()]);
    Ok((finished, panicked))
}

/// Used by the macros: the `TypeId` of a value's type (a function item's
/// type cannot be named).
#[doc(hidden)]
pub fn type_id_of<T: 'static>(_: &T) -> TypeId {
    TypeId::of::<T>()
}
