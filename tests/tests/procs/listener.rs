//! `Listener` and `Client`: connections over Unix paths, abstract names
//! and TCP, the authkey handshake (CPython's semantics: a mismatch fails
//! on both sides), hostile peers, handles refused over TCP, and
//! descriptors passed with `send_handle` or as `Descriptor`s.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use multiproc::connection::{Address, Client, Connection, Descriptor, Listener};
use multiproc::{Error, Lock, Pipe, Process, Queue, Value, process_fn, wait};

const LONG: Duration = Duration::from_secs(30);

fn tcp_any() -> Address {
    "127.0.0.1:0".parse().expect("address")
}

/// A name no other test (or run) uses.
fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "multiproc-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `f` on a thread; its result, or a failure if it takes longer than
/// [`LONG`] (a hang).
fn bounded<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> mpsc::Receiver<R> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

fn get<R>(rx: &mpsc::Receiver<R>) -> R {
    rx.recv_timeout(LONG)
        .expect("the call did not return in time")
}

/// Connects with this process's authkey (inherited from the parent) and
/// doubles every number it gets until the server closes.
#[process_fn]
fn doubler(address: Address) {
    let key = multiproc::process::authkey().expect("authkey");
    let mut conn: Connection<u64> =
        Client::connect_timeout(&address, Some(&key), LONG).expect("connect");
    while let Ok(x) = conn.recv_timeout(LONG) {
        conn.send(&(x * 2)).expect("send");
    }
}

#[test]
fn a_child_connects_over_tcp_with_the_inherited_authkey() {
    let key = multiproc::process::authkey().expect("authkey");
    let mut listener = Listener::bind(tcp_any(), Some(&key)).expect("bind");
    let mut p = Process::new(doubler, (listener.address().clone(),));
    p.start().expect("start");
    let mut conn: Connection<u64> = listener.accept_timeout(LONG).expect("accept");
    assert!(matches!(listener.last_accepted(), Some(Address::Tcp(a)) if a.ip().is_loopback()));
    for x in [1u64, 21, 1 << 40] {
        conn.send(&x).expect("send");
        assert_eq!(conn.recv_timeout(LONG).expect("recv"), 2 * x);
    }
    drop(conn);
    let status = p.join_timeout(LONG).expect("join").expect("exited");
    assert!(status.success(), "{status}");
}

#[process_fn]
fn report_authkey(out: multiproc::connection::Sender<Vec<u8>>) {
    let key = multiproc::process::current_process()
        .authkey()
        .expect("current_process has a key")
        .to_vec();
    out.send(&key).expect("send");
}

#[test]
fn children_inherit_the_authkey_of_their_parent() {
    let mine = multiproc::process::authkey().expect("authkey");
    assert_eq!(mine.len(), 32);
    for method in [
        multiproc::StartMethod::Spawn,
        multiproc::StartMethod::ForkServer,
    ] {
        let (mut rx, tx) = Pipe::simplex::<Vec<u8>>().expect("pipe");
        let mut p = Process::builder()
            .start_method(method)
            .target(report_authkey, (tx,))
            .build();
        p.start().expect("start");
        let got = rx.recv_timeout(LONG).expect("recv");
        assert_eq!(got, mine.to_vec(), "{method:?}");
        let status = p.join_timeout(LONG).expect("join").expect("exited");
        assert!(status.success(), "{method:?}: {status}");
    }
}

/// Every Pipe-end operation on one accepted connection and its client.
fn exercise(address: Address, key: Option<&'static [u8]>) {
    let mut listener = Listener::bind(address, key).expect("bind");
    let addr = listener.address().clone();
    let client = bounded(move || -> multiproc::Result<Vec<u8>> {
        let mut conn: Connection<(u32, String)> = Client::connect(&addr, key)?;
        conn.send(&(1, "one".into()))?;
        conn.send_bytes(b"raw")?;
        let (n, s) = conn.recv_timeout(LONG)?;
        conn.send(&(n + 1, s + "!"))?;
        Ok(conn.recv_bytes()?)
    });
    let mut conn: Connection<(u32, String)> = listener.accept_timeout(LONG).expect("accept");
    assert!(conn.poll(LONG).expect("poll"));
    assert_eq!(
        conn.recv_timeout(LONG).expect("recv"),
        (1, "one".to_string())
    );
    assert_eq!(conn.recv_bytes().expect("bytes"), b"raw");
    assert!(
        conn.recv_timeout(Duration::from_millis(20))
            .expect_err("nothing yet")
            .is_timeout()
    );
    conn.send(&(41, "hi".into())).expect("send");
    assert_eq!(
        conn.recv_timeout(LONG).expect("recv"),
        (42, "hi!".to_string())
    );
    conn.send_bytes(b"bye").expect("send bytes");
    assert_eq!(get(&client).expect("client"), b"bye");
    assert!(
        conn.recv_timeout(LONG)
            .expect_err("client gone")
            .is_disconnected()
    );
}

#[test]
fn tcp_connections_do_what_pipe_ends_do() {
    exercise(tcp_any(), Some(b"tcp key"));
    exercise(tcp_any(), None);
}

#[test]
fn unix_path_connections_do_what_pipe_ends_do_and_the_file_goes_with_the_listener() {
    let path = std::env::temp_dir().join(unique("sock"));
    exercise(Address::Unix(path.clone()), Some(b"unix key"));
    assert!(!path.exists(), "the listener removes its socket file");
}

#[test]
fn abstract_names_work_and_leave_no_file() {
    exercise(Address::abstract_name(unique("abs")), Some(b"abstract key"));
    let name = format!("@{}", unique("parsed"));
    exercise(name.parse().expect("address"), None);
}

#[test]
fn a_wrong_key_is_an_authentication_error_on_both_sides() {
    for address in [tcp_any(), Address::abstract_name(unique("wrong"))] {
        let mut listener = Listener::bind(address, Some(b"right")).expect("bind");
        let addr = listener.address().clone();
        let client = bounded(move || Client::connect_timeout::<u8>(&addr, Some(b"wrong"), LONG));
        let server = listener
            .accept_timeout::<u8>(LONG)
            .expect_err("server side");
        assert!(server.is_authentication_error(), "{server}");
        let client = get(&client).expect_err("client side");
        assert!(client.is_authentication_error(), "{client}");

        // The listener serves on: the right key passes.
        let addr = listener.address().clone();
        let client = bounded(move || {
            let conn = Client::connect_timeout::<u8>(&addr, Some(b"right"), LONG)?;
            conn.send(&7)
        });
        let mut conn = listener.accept_timeout::<u8>(LONG).expect("accept");
        get(&client).expect("client");
        assert_eq!(conn.recv_timeout(LONG).expect("recv"), 7);
    }
}

#[test]
fn a_keyless_client_never_reaches_a_keyed_server_s_decoder() {
    let mut listener = Listener::bind(tcp_any(), Some(b"key")).expect("bind");
    let addr = listener.address().clone();
    let client = bounded(move || -> multiproc::Result<Error> {
        let mut conn: Connection<String> = Client::connect(&addr, None)?;
        conn.send(&"let me in".to_string())?;
        // The server's challenge is no user message.
        Ok(Error::from(
            conn.recv_timeout(LONG).expect_err("a challenge"),
        ))
    });
    let server = listener
        .accept_timeout::<String>(LONG)
        .expect_err("refused");
    assert!(server.is_authentication_error(), "{server}");
    let seen = get(&client).expect("client");
    assert!(seen.is_authentication_error(), "{seen}");
}

#[test]
fn a_keyed_client_refuses_a_keyless_server() {
    let mut listener = Listener::bind(tcp_any(), None).expect("bind");
    let addr = listener.address().clone();
    let client = bounded(move || Client::connect_timeout::<String>(&addr, Some(b"key"), LONG));
    let mut conn: Connection<String> = listener.accept_timeout(LONG).expect("accept");
    conn.send(&"hello".to_string()).expect("send");
    let err = get(&client).expect_err("no challenge came");
    assert!(err.is_authentication_error(), "{err}");
    assert!(
        conn.recv_timeout(LONG)
            .expect_err("client left")
            .is_disconnected()
    );
}

/// A frame header of the wire format: length, descriptor count, tag.
fn header(len: u64, tag: u32) -> Vec<u8> {
    let mut h = len.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&tag.to_le_bytes());
    h
}

const AUTH: u32 = u32::from_le_bytes(*b"AUTH");

#[test]
fn hostile_clients_get_an_error_by_the_handshake_deadline() {
    let mut noise = vec![0u8; 300];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut truncated = header(40, AUTH);
    truncated.extend_from_slice(b"{sha256}");
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("random bytes", noise, false),
        ("a huge length", header(1 << 40, AUTH), false),
        ("over the handshake's limit", header(257, AUTH), false),
        ("a user message instead of a response", header(0, 1), false),
        ("a response cut short", truncated, true),
        ("nothing at all", Vec::new(), true),
    ];
    let mut listener = Listener::bind(tcp_any(), Some(b"key")).expect("bind");
    listener.set_handshake_timeout(Duration::from_millis(300));
    for (what, bytes, stalls) in cases {
        let addr = match listener.address() {
            Address::Tcp(a) => *a,
            other => panic!("{other}"),
        };
        let peer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(&bytes).expect("write");
            // Keep the socket open (a stall) until the server is done.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let err = listener
            .accept_timeout::<u8>(LONG)
            .expect_err("a hostile peer is refused");
        if stalls {
            assert!(err.is_timeout(), "{what}: {err}");
        } else {
            assert!(err.is_authentication_error(), "{what}: {err}");
        }
        peer.join().expect("peer");
    }
}

#[test]
fn a_hostile_server_gives_the_client_an_error_by_its_deadline() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = Address::Tcp(server.local_addr().expect("addr"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("silence", Vec::new()),
        ("a huge length", header(u64::MAX / 4, AUTH)),
        ("a challenge without random bytes", {
            let mut m = header(19, AUTH);
            m.extend_from_slice(b"#CHALLENGE#{sha256}");
            m
        }),
    ];
    for (what, bytes) in cases {
        let addr = addr.clone();
        let client = bounded(move || {
            Client::connect_timeout::<u8>(&addr, Some(b"key"), Duration::from_millis(300))
        });
        let (mut s, _) = server.accept().expect("accept");
        s.write_all(&bytes).expect("write");
        let err = get(&client).expect_err("refused");
        assert!(
            err.is_timeout() || err.is_authentication_error(),
            "{what}: {err}"
        );
        if !bytes.is_empty() {
            assert!(err.is_authentication_error(), "{what}: {err}");
        }
    }
}

#[test]
fn a_peer_announcing_more_than_the_limit_gets_an_error_not_an_allocation() {
    let mut listener = Listener::bind(tcp_any(), None).expect("bind");
    let addr = match listener.address() {
        Address::Tcp(a) => *a,
        other => panic!("{other}"),
    };
    let peer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        // 512 MiB announced (under the 1 GiB limit), 3 bytes sent: the
        // receiver holds what came, not what was announced.
        s.write_all(&header(512 << 20, 1)).expect("write");
        s.write_all(b"abc").expect("write");
        s
    });
    let mut conn: Connection<Vec<u8>> = listener.accept_timeout(LONG).expect("accept");
    let s = peer.join().expect("peer");
    assert!(
        conn.recv_timeout(Duration::from_millis(100))
            .expect_err("not all there")
            .is_timeout()
    );
    drop(s);
    assert!(
        conn.recv_timeout(LONG)
            .expect_err("cut off")
            .is_disconnected()
    );
}

#[test]
fn handles_are_refused_over_tcp_with_an_error_naming_them() {
    let mut listener = Listener::bind(tcp_any(), None).expect("bind");
    let addr = listener.address().clone();
    let client = bounded(move || -> multiproc::Result<()> {
        let queues: Connection<Queue<u64>> = Client::connect(&addr, None)?;
        let locks: Connection<(String, Lock)> = Client::connect(&addr, None)?;
        let values: Connection<Value<u64>> = Client::connect(&addr, None)?;
        let pipes: Connection<Connection<u8>> = Client::connect(&addr, None)?;
        let fds: Connection<Descriptor> = Client::connect(&addr, None)?;
        let check = |r: multiproc::Result<()>, name: &str| {
            let err = r.expect_err("refused");
            assert!(matches!(err, Error::Encode { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(name) && text.contains("TCP"), "{text}");
        };
        check(queues.send(&Queue::new()?), "Queue<u64>");
        check(locks.send(&("l".into(), Lock::new()?)), "Lock");
        check(values.send(&Value::new(1u64)?), "Value<u64>");
        let (end, _other) = Pipe::new::<u8>()?;
        check(pipes.send(&end), "Connection<u8>");
        let file = std::fs::File::open("/dev/null").map_err(Error::from)?;
        check(fds.send(&Descriptor::from(file)), "Descriptor");
        check(fds.send_handle(std::io::stdin()), "Descriptor");
        // Plain data still passes on the same connection.
        fds.send_bytes(b"plain")
    });
    let mut accepted: Vec<Connection<Descriptor>> = (0..5)
        .map(|_| listener.accept_timeout(LONG).expect("accept"))
        .collect();
    get(&client).expect("client");
    assert_eq!(accepted[4].recv_bytes().expect("plain"), b"plain");
    for conn in &mut accepted[..4] {
        assert!(
            conn.recv_timeout(LONG)
                .expect_err("nothing sent")
                .is_disconnected()
        );
    }
}

#[test]
fn a_unix_socket_connection_carries_handles_and_descriptors() {
    let mut listener =
        Listener::bind(Address::abstract_name(unique("handles")), Some(b"k")).expect("bind");
    let addr = listener.address().clone();
    let client = bounded(move || -> multiproc::Result<()> {
        let conn: Connection<(Queue<u64>, Descriptor)> = Client::connect(&addr, Some(b"k"))?;
        let q = Queue::new()?;
        q.put(5).map_err(Error::from)?;
        let (mut mine, theirs) = UnixStream::pair().map_err(Error::from)?;
        conn.send(&(q, Descriptor::from(theirs)))?;
        mine.write_all(b"via the socket").map_err(Error::from)?;
        Ok(())
    });
    let mut conn: Connection<(Queue<u64>, Descriptor)> =
        listener.accept_timeout(LONG).expect("accept");
    let (q, fd) = conn.recv_timeout(LONG).expect("recv");
    get(&client).expect("client");
    assert_eq!(q.get_timeout(LONG).expect("get"), 5);
    let mut stream = fd.into_unix_stream().expect("a unix stream");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    assert_eq!(text, "via the socket");
}

#[test]
fn wait_sees_a_pending_peer_and_an_accepted_connection_s_message() {
    let mut listener = Listener::bind(tcp_any(), Some(b"w")).expect("bind");
    assert!(
        wait(&[&listener], Some(Duration::ZERO))
            .expect("wait")
            .is_empty()
    );
    let addr = listener.address().clone();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let client = bounded(move || -> multiproc::Result<()> {
        let conn: Connection<u8> = Client::connect(&addr, Some(b"w"))?;
        let _ = go_rx.recv_timeout(LONG);
        conn.send(&9)?;
        let _ = go_rx.recv_timeout(LONG);
        Ok(())
    });
    assert_eq!(wait(&[&listener], Some(LONG)).expect("wait"), vec![0]);
    let mut conn: Connection<u8> = listener.accept_timeout(LONG).expect("accept");
    let (idle, _idle_peer) = Pipe::new::<u8>().expect("pipe");
    assert!(
        wait(&[&idle, &conn], Some(Duration::ZERO))
            .expect("wait")
            .is_empty()
    );
    go_tx.send(()).expect("go");
    assert_eq!(wait(&[&idle, &conn], Some(LONG)).expect("wait"), vec![1]);
    assert_eq!(conn.recv_timeout(LONG).expect("recv"), 9);
    drop(go_tx);
    get(&client).expect("client");
}

/// Serves an accepted connection handed to it: doubles every number.
#[process_fn]
fn serve_handed_connection(mut conn: Connection<u64>) {
    while let Ok(x) = conn.recv_timeout(LONG) {
        conn.send(&(x * 2)).expect("send");
    }
}

#[test]
fn an_accepted_connection_is_served_by_a_child_process() {
    for address in [tcp_any(), Address::abstract_name(unique("handed"))] {
        let mut listener = Listener::bind(address, Some(b"k")).expect("bind");
        let addr = listener.address().clone();
        let client = bounded(move || -> multiproc::Result<Vec<u64>> {
            let mut conn: Connection<u64> = Client::connect(&addr, Some(b"k"))?;
            let mut got = Vec::new();
            for x in [1u64, 5, 100] {
                conn.send(&x)?;
                got.push(conn.recv_timeout(LONG)?);
            }
            Ok(got)
        });
        let conn: Connection<u64> = listener.accept_timeout(LONG).expect("accept");
        // The pre-fork server's pattern: a worker process serves it.
        let mut p = Process::new(serve_handed_connection, (conn,));
        p.start().expect("start");
        assert_eq!(get(&client).expect("client"), [2, 10, 200]);
        let status = p.join_timeout(LONG).expect("join").expect("exited");
        assert!(status.success(), "{status}");
    }
}

#[test]
fn binding_and_connecting_fail_clearly() {
    let path = std::env::temp_dir().join(unique("taken"));
    let first = Listener::bind(path.as_path(), None).expect("bind");
    assert!(matches!(
        Listener::bind(path.as_path(), None),
        Err(Error::Io { .. })
    ));
    drop(first);
    assert!(matches!(
        Client::connect::<u8>(path.as_path(), None),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        Listener::bind(tcp_any(), Some(b"")),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Client::connect::<u8>(Address::Unnamed, None),
        Err(Error::InvalidArgument { .. })
    ));
}

#[process_fn]
fn read_passed_file(mut conn: Connection<()>) {
    let fd = conn.recv_handle_timeout(LONG).expect("recv handle");
    let mut text = String::new();
    std::fs::File::from(fd)
        .read_to_string(&mut text)
        .expect("read");
    conn.send_bytes(text.as_bytes()).expect("answer");
}

#[test]
fn send_handle_passes_a_file_to_a_child() {
    let path = std::env::temp_dir().join(unique("file"));
    std::fs::write(&path, "contents of a file").expect("write");
    let file = std::fs::File::open(&path).expect("open");
    std::fs::remove_file(&path).expect("unlink");
    let (mut mine, theirs) = Pipe::new::<()>().expect("pipe");
    let mut p = Process::new(read_passed_file, (theirs,));
    p.start().expect("start");
    mine.send_handle(&file).expect("send handle");
    assert_eq!(
        mine.recv_bytes_timeout(LONG).expect("answer"),
        b"contents of a file"
    );
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

#[process_fn]
fn answer_on_passed_stream(q: Queue<Descriptor>) {
    let fd = q.get_timeout(LONG).expect("get");
    let mut stream = fd.into_tcp_stream().expect("a tcp stream");
    stream.write_all(b"from the child").expect("write");
}

#[test]
fn a_tcp_stream_travels_to_a_child_through_a_queue() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(server.local_addr().expect("addr")).expect("connect");
    let (mut accepted, _) = server.accept().expect("accept");
    let q = Queue::<Descriptor>::new().expect("queue");
    let mut p = Process::new(answer_on_passed_stream, (q.clone(),));
    p.start().expect("start");
    q.put(Descriptor::from(client)).expect("put");
    accepted.set_read_timeout(Some(LONG)).expect("read timeout");
    let mut text = String::new();
    accepted.read_to_string(&mut text).expect("read");
    assert_eq!(text, "from the child");
    assert!(
        p.join_timeout(LONG)
            .expect("join")
            .expect("exited")
            .success()
    );
}

#[test]
fn a_descriptor_refuses_to_be_the_wrong_kind_of_socket() {
    let file = std::fs::File::open("/dev/null").expect("open");
    let err = Descriptor::from(file)
        .into_tcp_stream()
        .expect_err("a file");
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let (a, _b) = UnixStream::pair().expect("pair");
    assert!(Descriptor::from(a).into_tcp_stream().is_err());
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let tcp = TcpStream::connect(server.local_addr().expect("addr")).expect("connect");
    assert!(Descriptor::from(tcp).into_unix_stream().is_err());
}
