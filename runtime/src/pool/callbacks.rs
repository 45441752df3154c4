//! The pool's callback thread: where the callbacks of its
//! [`AsyncResult`](super::AsyncResult)s run (Python's result-handler
//! thread).
//!
//! The reader thread never runs user code: when a result with callbacks is
//! complete, it hands a closure to this thread (a send on a channel, which
//! never blocks) and goes on delivering other results. The thread is named
//! `multiproc-pool-callbacks`, started when a pool's first callback is
//! added, runs callbacks one at a time in the order their results
//! completed, and is joined by [`Pool::join`](super::Pool::join) and
//! [`Pool::terminate`](super::Pool::terminate) (so by the pool's drop)
//! once every callback already due has run.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};

use super::job::lock;

/// What the callback thread runs.
pub(crate) type Work = Box<dyn FnOnce() + Send>;

enum Msg {
    Run(Work),
    Stop,
}

#[derive(Default)]
struct State {
    running: Option<(mpsc::Sender<Msg>, JoinHandle<()>, ThreadId)>,
    stopped: bool,
}

/// One pool's callback thread, started on first use.
#[derive(Default)]
pub(crate) struct CallbackThread {
    state: Mutex<State>,
}

impl std::fmt::Debug for CallbackThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("CallbackThread")
            .field("started", &st.running.is_some())
            .field("stopped", &st.stopped)
            .finish()
    }
}

impl CallbackThread {
    /// Runs `work` on the callback thread (started now if it is not).
    /// Once the thread was stopped (the pool was joined or terminated), or
    /// if the OS refuses a thread, `work` runs here, in the caller.
    pub(crate) fn run(self: &Arc<Self>, work: Work) {
        let work = {
            let mut st = lock(&self.state);
            if st.stopped {
                Some(work)
            } else {
                if st.running.is_none() {
                    st.running = CallbackThread::start();
                }
                match &st.running {
                    // The receiver lives until it has seen `Stop`, which is
                    // only sent under this lock with `stopped` set.
                    Some((tx, _, _)) => match tx.send(Msg::Run(work)) {
                        Ok(()) => None,
                        Err(mpsc::SendError(Msg::Run(work))) => Some(work),
                        Err(mpsc::SendError(Msg::Stop)) => None,
                    },
                    None => Some(work),
                }
            }
        };
        if let Some(work) = work {
            run_one(work);
        }
    }

    /// Starts the thread now if it is not running (so that the reader
    /// thread, which hands work over, never has to start it).
    pub(crate) fn ensure_started(&self) {
        let mut st = lock(&self.state);
        if !st.stopped && st.running.is_none() {
            st.running = CallbackThread::start();
        }
    }

    fn start() -> Option<(mpsc::Sender<Msg>, JoinHandle<()>, ThreadId)> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let handle = std::thread::Builder::new()
            .name("multiproc-pool-callbacks".into())
            .spawn(move || {
                while let Ok(Msg::Run(work)) = rx.recv() {
                    run_one(work);
                }
            })
            .ok()?;
        let id = handle.thread().id();
        Some((tx, handle, id))
    }

    /// Lets the callbacks already due run, then ends the thread; later
    /// work runs in the thread that hands it over. Called from a callback
    /// (a callback that joins its pool), it does not wait for itself.
    pub(crate) fn stop(&self) {
        let running = {
            let mut st = lock(&self.state);
            st.stopped = true;
            st.running.take()
        };
        if let Some((tx, handle, id)) = running {
            let _ = tx.send(Msg::Stop);
            if std::thread::current().id() != id {
                let _ = handle.join();
            }
        }
    }
}

/// Runs one piece of work; a panic in a user's callback is caught (the
/// panic hook has reported it), so the thread goes on with the others.
fn run_one(work: Work) {
    let _ = crate::registry::catch(work);
}
