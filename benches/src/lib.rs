//! Shared pieces of the benchmarks (the benchmarks live in `benches/`).
//!
//! The raw `pipe(2)` ping-pong is the floor that the Pipe round trip is
//! compared with in the `queue` and `pipe` benches: a child of the bench
//! binary echoes 8-byte messages with plain `read`/`write`.

pub mod plot;
pub mod work;

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Set in a bench binary's environment to make it a raw echo child
/// (`pipe` or `socket`) instead of running benchmarks.
pub const ECHO_ENV: &str = "MULTIPROC_BENCH_RAW_ECHO";

/// Echoes 8-byte messages from stdin to stdout (pipes) or back into stdin
/// (a socket), with plain unbuffered `read`/`write`, until end of input.
pub fn raw_echo(socket: bool) {
    use std::os::fd::AsFd;
    let fd_in = std::io::stdin().as_fd().try_clone_to_owned().expect("dup");
    let mut input = std::fs::File::from(fd_in);
    let mut output = if socket {
        input.try_clone().expect("dup")
    } else {
        std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().expect("dup"))
    };
    let mut buf = [0u8; 8];
    while input.read_exact(&mut buf).is_ok() {
        if output.write_all(&buf).is_err() {
            return;
        }
    }
}

/// A raw echo child of this bench binary over two pipes.
#[derive(Debug)]
pub struct RawPipeEcho {
    child: Child,
    to: Option<ChildStdin>,
    from: ChildStdout,
}

impl RawPipeEcho {
    /// Starts the echo child (the bench's `main` must call [`raw_echo`]
    /// when [`ECHO_ENV`] is set).
    pub fn start() -> RawPipeEcho {
        let exe = std::env::current_exe().expect("exe");
        let mut child = Command::new(exe)
            .env(ECHO_ENV, "pipe")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("raw echo child");
        let to = child.stdin.take();
        let from = child.stdout.take().expect("stdout");
        RawPipeEcho { child, to, from }
    }

    /// One round trip of an 8-byte message.
    pub fn ping(&mut self) -> [u8; 8] {
        let mut buf = [0u8; 8];
        let to = self.to.as_mut().expect("open");
        to.write_all(&42u64.to_le_bytes()).expect("write");
        self.from.read_exact(&mut buf).expect("read");
        buf
    }

    /// Closes the pipe and reaps the child.
    pub fn stop(mut self) {
        drop(self.to.take());
        self.child.wait().expect("wait raw echo");
    }
}
