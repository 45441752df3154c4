//! Value, Array, RawArray and SharedMemory across real processes.
//!
//! Every wait is bounded; nothing sleeps to synchronise.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use multiproc::shared::{RawArray, SharedMemory};
use multiproc::sync::Event;
use multiproc::{Array, Process, Value, process_fn};

const JOIN: Duration = Duration::from_secs(30);

fn run_all(mut procs: Vec<Process>) {
    for p in &mut procs {
        p.start().expect("start");
    }
    for p in &mut procs {
        let status = p
            .join_timeout(JOIN)
            .expect("join")
            .expect("the child did not end in time");
        assert!(status.success(), "child failed: {status:?}");
    }
}

#[process_fn]
fn locked_adds(counter: Value<i64>, n: u32) {
    for _ in 0..n {
        *counter.lock().expect("not poisoned") += 1;
    }
}

#[test]
fn value_lock_four_processes_count_40000() {
    let counter = Value::new(0i64).expect("value");
    run_all(
        (0..4)
            .map(|_| Process::new(locked_adds, (counter.clone(), 10_000)))
            .collect(),
    );
    assert_eq!(counter.get(), 40_000);
}

#[process_fn]
fn atomic_adds(counter: Value<u64>, n: u32) {
    for _ in 0..n {
        counter.fetch_add(1);
    }
}

#[test]
fn value_fetch_add_four_processes_count_40000() {
    let counter = Value::new(0u64).expect("value");
    run_all(
        (0..4)
            .map(|_| Process::new(atomic_adds, (counter.clone(), 10_000)))
            .collect(),
    );
    assert_eq!(counter.load(), 40_000);
}

#[process_fn]
#[allow(clippy::approx_constant)] // the Python docs' literal
fn python_docs_f(n: Value<f64>, a: Array<i32>) {
    n.set(3.1415927);
    for x in a.lock().expect("not poisoned").iter_mut() {
        *x = -*x;
    }
}

#[test]
fn python_docs_value_and_array_example() {
    let num = Value::new(0.0f64).expect("value");
    let arr = Array::new(&(0..10).collect::<Vec<i32>>()).expect("array");
    run_all(vec![Process::new(
        python_docs_f,
        (num.clone(), arr.clone()),
    )]);
    #[allow(clippy::approx_constant)]
    let expected = 3.1415927;
    assert_eq!(num.get(), expected);
    assert_eq!(arr.to_vec(), (0..10).map(|i| -i).collect::<Vec<i32>>());
}

#[process_fn]
fn fill_half(arr: Array<f64>, half: usize) {
    let mut guard = arr.lock().expect("not poisoned");
    let n = guard.len() / 2;
    for (i, x) in guard[half * n..(half + 1) * n].iter_mut().enumerate() {
        *x = (half * n + i) as f64;
    }
}

#[test]
fn array_of_a_million_f64_filled_by_two_processes() {
    let arr = Array::<f64>::zeroed(1_000_000).expect("array");
    run_all(
        (0..2)
            .map(|half| Process::new(fill_half, (arr.clone(), half)))
            .collect(),
    );
    let sum: f64 = arr.lock().expect("not poisoned").iter().sum();
    assert_eq!(sum, 499_999_500_000.0);
    assert_eq!(arr.get(999_999).expect("in range"), 999_999.0);
    assert!(arr.get(1_000_000).is_err());
}

#[process_fn]
fn raw_write(arr: RawArray<u32>, start: usize) {
    let values: Vec<u32> = (start as u32..start as u32 + 50).collect();
    arr.write(start, &values).expect("in range");
}

#[test]
fn raw_array_disjoint_writes_by_two_processes() {
    let arr = RawArray::<u32>::zeroed(100).expect("array");
    run_all(
        (0..2)
            .map(|i| Process::new(raw_write, (arr.clone(), i * 50)))
            .collect(),
    );
    assert_eq!(arr.to_vec(), (0..100).collect::<Vec<u32>>());
}

#[process_fn]
fn write_by_name(name: String) -> usize {
    let shm = SharedMemory::open(&name).expect("open by name");
    shm.write(0, b"hello").expect("in range");
    shm.len()
}

/// Names of entries in /dev/shm (nothing of ours may ever appear there).
fn dev_shm() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Retries `open` until it fails, for at most 30 s: the name of a killed
/// creator disappears when the kernel has closed its socket, which is
/// asynchronous to the parent's reaping.
fn gone(name: &str) -> bool {
    let deadline = Instant::now() + JOIN;
    while Instant::now() < deadline {
        if SharedMemory::open(name).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn shared_memory_round_trip_by_name_and_gone_after_unlink() {
    let name = format!("test-roundtrip-{}", std::process::id());
    let shm = SharedMemory::create(&name, 4096).expect("create");
    let mut child = multiproc::spawn(write_by_name, (name.clone(),)).expect("spawn");
    assert_eq!(child.join_timeout(JOIN).expect("join"), 4096);
    assert_eq!(&shm.to_vec()[..5], b"hello");
    assert!(dev_shm().iter().all(|e| !e.contains(&name)));
    shm.unlink().expect("unlink");
    let gone = SharedMemory::open(&name).expect_err("the name outlived unlink");
    assert_eq!(
        gone.io_kind(),
        Some(std::io::ErrorKind::NotFound),
        "FileNotFoundError's kind: {gone}"
    );
    assert_eq!(&shm.to_vec()[..5], b"hello", "open handles keep the memory");
}

#[process_fn]
fn create_and_linger(name: String, ready: Event) {
    let shm = SharedMemory::create(&name, 64).expect("create");
    shm.write(0, &[42]).expect("in range");
    ready.set();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn shared_memory_name_disappears_when_its_creator_is_killed() {
    let name = format!("test-killed-{}", std::process::id());
    let ready = Event::new().expect("event");
    let before = dev_shm();
    let mut p = Process::new(create_and_linger, (name.clone(), ready.clone()));
    p.start().expect("start");
    assert!(ready.wait_timeout(JOIN));
    let opened = SharedMemory::open(&name).expect("open while the creator lives");
    assert_eq!(opened.to_vec()[0], 42);
    p.kill().expect("kill");
    p.join_timeout(JOIN).expect("join").expect("reaped");
    assert!(gone(&name), "the name outlived its creator");
    assert_eq!(
        opened.to_vec()[0],
        42,
        "a process that still maps it keeps the memory"
    );
    assert_eq!(dev_shm(), before, "nothing may be left in /dev/shm");
}

/// Offsets in the block of the safe-surface test.
const TEXT: usize = 0;
const COUNT: usize = 32;
const READY: usize = 40;
const ACK: usize = 44;
const REPLY: usize = 48;
const BYTES: usize = 64;

/// Spins (yielding) until `flag` holds `value`, for at most [`JOIN`].
/// The flag is written by another process: the loop rereads it each time
/// because it is an atomic (a `&[u8]` loop could be compiled to read once).
fn wait_for(flag: &AtomicU8, value: u8) -> bool {
    let deadline = Instant::now() + JOIN;
    while flag.load(Ordering::Acquire) != value {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

#[process_fn]
fn safe_surface_child(name: String) -> Vec<u8> {
    let shm = SharedMemory::open(&name).expect("open by name");
    shm.write(TEXT, b"written by the child").expect("in range");
    for (i, cell) in shm.as_atomic_u8()[BYTES..BYTES + 16].iter().enumerate() {
        cell.store(i as u8 + 1, Ordering::Relaxed);
    }
    shm.as_atomic_u8()[READY].store(1, Ordering::Release);
    assert!(
        wait_for(&shm.as_atomic_u8()[ACK], 1),
        "the parent did not answer in time"
    );
    let mut reply = vec![0u8; 16];
    shm.read(REPLY, &mut reply).expect("in range");
    reply
}

#[process_fn]
fn count_in_shared_memory(shm: SharedMemory, n: u32) {
    let count = &shm.as_atomic_u8()[COUNT];
    for _ in 0..n {
        count.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn shared_memory_safe_surface_across_processes() {
    let name = format!("test-safe-{}", std::process::id());
    let shm = SharedMemory::create(&name, 4096).expect("create");
    let mut child = multiproc::spawn(safe_surface_child, (name.clone(),)).expect("spawn");

    assert!(
        wait_for(&shm.as_atomic_u8()[READY], 1),
        "the child did not write in time"
    );
    let mut text = [0u8; 20];
    shm.read(TEXT, &mut text).expect("in range");
    assert_eq!(&text, b"written by the child");
    let all = shm.to_vec();
    assert_eq!(all.len(), 4096);
    assert_eq!(&all[BYTES..BYTES + 16], &(1..=16).collect::<Vec<u8>>()[..]);
    assert!(
        all[BYTES + 16..].iter().all(|&b| b == 0),
        "nothing else written"
    );

    shm.write(REPLY, b"and the parent..").expect("in range");
    shm.as_atomic_u8()[ACK].store(1, Ordering::Release);
    assert_eq!(child.join_timeout(JOIN).expect("join"), b"and the parent..");

    // Handles that travel as arguments share the same bytes: two
    // processes count in one byte.
    run_all(
        (0..2)
            .map(|_| {
                let handle = SharedMemory::open(&name).expect("open");
                Process::new(count_in_shared_memory, (handle, 100))
            })
            .collect(),
    );
    assert_eq!(shm.as_atomic_u8()[COUNT].load(Ordering::SeqCst), 200);
    shm.unlink().expect("unlink");
}

/// Threads of this process named for a name server (`multiproc-shm`, or
/// `multiproc-shm-<name>` truncated, as each block had its own before).
fn name_server_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("multiproc-shm"))
        })
        .count()
}

#[test]
fn two_hundred_blocks_share_one_name_server_thread() {
    let base = format!("test-many-{}", std::process::id());
    let blocks: Vec<SharedMemory> = (0..200u32)
        .map(|i| {
            let shm = SharedMemory::create(&format!("{base}-{i}"), 8).expect("create");
            shm.write(0, &i.to_ne_bytes()).expect("in range");
            shm
        })
        .collect();
    // Other tests of this binary may create blocks meanwhile: they are
    // served by the same thread, so the count is 1 whatever they do.
    assert_eq!(name_server_threads(), 1, "one thread serves every name");
    for i in 0..200u32 {
        let opened = SharedMemory::open(&format!("{base}-{i}")).expect("open");
        let mut word = [0u8; 4];
        opened.read(0, &mut word).expect("in range");
        assert_eq!(u32::from_ne_bytes(word), i, "block {i} maps its own memory");
    }
    // Every name vanishes at its unlink, the others stay served.
    for (i, shm) in blocks.iter().enumerate() {
        shm.unlink().expect("unlink");
        assert!(SharedMemory::open(&format!("{base}-{i}")).is_err());
        if let Some(next) = blocks.get(i + 1) {
            assert_eq!(
                SharedMemory::open(next.name()).expect("still served").len(),
                8
            );
        }
    }
    assert_eq!(name_server_threads(), 1);
}

/// Set, for [`squatter`], to the abstract address it must take.
const SQUAT_ENV: &str = "MULTIPROC_TEST_SQUAT_ADDRESS";
const SQUATTING: &str = "squatting";

/// Not a test: started by [`another_users_name_is_neither_opened_nor_taken`]
/// as another user, it binds our name's address first (as a hostile local
/// user could), says so on stdout, and holds the name until its stdin
/// closes.
#[test]
#[ignore = "a helper, started as another user by another_users_name_is_neither_opened_nor_taken"]
fn squatter() {
    use std::io::Read;
    use std::os::linux::net::SocketAddrExt;
    let address = std::env::var(SQUAT_ENV).expect("started without an address");
    let address =
        std::os::unix::net::SocketAddr::from_abstract_name(address.as_bytes()).expect("address");
    let _listener = std::os::unix::net::UnixListener::bind_addr(&address).expect("bind");
    println!("{SQUATTING}");
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

/// Kills and reaps the child when dropped, even if an assertion failed.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn another_users_name_is_neither_opened_nor_taken() {
    use std::io::BufRead;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let our_uid = std::fs::metadata("/proc/self").expect("/proc/self").uid();
    if our_uid != 0 {
        eprintln!("skipped: only root can start a process of another user here");
        return;
    }
    const NOBODY: u32 = 65534;
    let name = format!("test-squatted-{}", std::process::id());
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "shared::squatter", "--ignored", "--nocapture"])
        .env(SQUAT_ENV, format!("multiproc-shm/{our_uid}/{name}"))
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        // The test binary lies under a directory that user cannot enter
        // (a target directory in /root, say).
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: uid {NOBODY} cannot run this test binary: {e}");
            return;
        }
        Err(e) => panic!("could not start the squatter as another user: {e}"),
    };
    let stdout = child.stdout.take().expect("piped");
    let child = Reaped(child);
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(SQUATTING) {
                let _ = said.send(());
                break;
            }
        }
    });
    heard
        .recv_timeout(JOIN)
        .expect("the squatter did not take the name in time");

    let refused = SharedMemory::open(&name).expect_err("a foreign server must be refused");
    assert_eq!(
        refused.io_kind(),
        Some(std::io::ErrorKind::PermissionDenied)
    );
    let message = refused.to_string();
    assert!(
        message.contains(&format!("another user (uid {NOBODY}")),
        "{message}"
    );
    let taken = SharedMemory::create(&name, 64).expect_err("the name is taken");
    assert_eq!(taken.io_kind(), Some(std::io::ErrorKind::AlreadyExists));
    let message = taken.to_string();
    assert!(
        message.contains(&format!("another user (uid {NOBODY})")),
        "{message}"
    );
    drop(child);
}
