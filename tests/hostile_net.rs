//! Slow, silent and hostile network peers (issue 4 item 7): each is cut off with a logged
//! reason, the sender's memory stays bounded, and other sessions keep working.
//!
//! The hostile peers are raw TCP clients speaking the wire protocol by hand
//! (docs/PROTOCOL.md): a 32-byte hello, then 16-byte frame headers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use common::{header, open, with_timeout, Header, Hello, DATA, GOAWAY, PING};
use libchan::{Error, Options, RecvTimeoutError, Session, Transport, TrySendError};

const LIMIT: Duration = Duration::from_secs(20);

/// Log lines libchan wrote (the `log` facade), captured for the assertions below.
static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        LOGGED.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    fn flush(&self) {}
}

fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&Capture).expect("no other logger");
        log::set_max_level(log::LevelFilter::Debug);
    });
}

/// True once a captured log line contains every one of `parts`.
fn logged(parts: &[&str]) -> bool {
    common::eventually(Duration::from_secs(5), || {
        LOGGED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    })
}

/// A listener on a free loopback port, with `opts` (shared memory off: these are network
/// sessions even though both ends are on this host).
fn listener(opts: &Options) -> (libchan::Listener, String) {
    let l = libchan::listen_with("tcp://127.0.0.1:0", &opts.clone().shm(false)).expect("listen");
    let addr = l.local_addr().expect("local_addr");
    (l, addr)
}

/// A raw client of `addr` that sent the reference hello of a network peer.
fn raw_client(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr.trim_start_matches("tcp://")).expect("connect");
    s.write_all(&Hello::network().bytes()).expect("hello");
    s
}

/// A raw client of `l` (at `addr`) past the handshake, our hello sent and the server's read,
/// and the session `l` made for it.
fn raw_session(l: &libchan::Listener, addr: &str) -> (TcpStream, Session) {
    let mut raw = raw_client(addr);
    let server = l.accept().expect("accept");
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    common::read_hello(&mut raw);
    (raw, server)
}

/// A healthy session pair on `l`, with a channel each way checked to work.
fn healthy(l: &libchan::Listener, addr: &str) -> (Session, Session) {
    let addr = addr.to_string();
    let c = thread::spawn(move || {
        libchan::connect_with(&addr, &Options::new().shm(false)).expect("connect")
    });
    let server = l.accept().expect("accept");
    let client = c.join().unwrap();
    assert_eq!(client.transport(), Transport::Tcp);
    check_talks(&client, &server);
    (client, server)
}

/// Runs `attack` on a fresh listener (given with its address) beside a healthy session pair
/// it made before, then checks that the pair still works.
fn beside_healthy(attack: impl FnOnce(&libchan::Listener, &str) + Send + 'static) {
    with_timeout(LIMIT, || {
        let (l, addr) = listener(&Options::new());
        let (a, b) = healthy(&l, &addr);
        attack(&l, &addr);
        check_talks(&a, &b);
    });
}

fn check_talks(a: &Session, b: &Session) {
    let tx = a.open_channel::<u64>().expect("open");
    tx.send(42).expect("send");
    let rx = b
        .accept_channel_timeout::<u64>(Duration::from_secs(5))
        .expect("accept");
    let m = rx.recv_timeout(Duration::from_secs(5)).expect("recv");
    assert_eq!(*m, 42);
}

/// A peer that completes the handshake and then says nothing, not even to PINGs (a host that
/// lost power looks the same): the session ends after the keepalive timeout, blocked calls
/// wake with `Disconnected`, and the reason is logged.
#[test]
fn silent_peer_is_cut_off_by_keepalive() {
    capture_logs();
    with_timeout(LIMIT, || {
        let opts = Options::new().keepalive(Duration::from_millis(100), Duration::from_millis(500));
        let (l, addr) = listener(&opts);
        let (mut raw, server) = raw_session(&l, &addr);
        let start = Instant::now();
        let err = server
            .accept_channel_timeout::<u64>(Duration::from_secs(10))
            .expect_err("no channel can come");
        let waited = start.elapsed();
        assert!(matches!(err, Error::Disconnected), "got {err:?}");
        assert!(waited < Duration::from_secs(5), "took {waited:?}");
        let reason = server.close_reason().expect("a reason");
        assert!(reason.contains("keepalive"), "reason: {reason}");
        assert!(logged(&["WARN", "cutting off tcp 127.0.0.1", "keepalive"]));
        // The PINGs went out before the end: the peer saw frames of kind 6.
        let mut got = Vec::new();
        let _ = raw.read_to_end(&mut got);
        let kinds: Vec<u8> = frames(&got).map(|h| h.kind).collect();
        assert!(kinds.contains(&PING), "no PING among {kinds:?}");
    });
}

/// The header of each frame in `bytes` (the last one's body may be cut short).
fn frames(mut bytes: &[u8]) -> impl Iterator<Item = Header> + '_ {
    std::iter::from_fn(move || {
        let h = Header::parse(bytes)?;
        bytes = bytes.get(16 + h.len..).unwrap_or(&[]);
        Some(h)
    })
}

/// Two healthy libchan peers with short keepalives stay connected while idle, with no thread
/// of theirs reading: each side's pings are answered. (A timeout of 1 s, three times over:
/// with 300 ms, two test suites at once on two cores starved a session thread past it.)
#[test]
fn idle_sessions_answer_each_others_pings() {
    with_timeout(LIMIT, || {
        let opts = Options::new().keepalive(Duration::from_millis(50), Duration::from_secs(1));
        let (l, addr) = listener(&opts);
        let c =
            thread::spawn(move || libchan::connect_with(&addr, &opts.shm(false)).expect("connect"));
        let server = l.accept().expect("accept");
        let client = c.join().unwrap();
        thread::sleep(Duration::from_secs(3));
        assert!(!client.is_closed(), "{:?}", client.close_reason());
        assert!(!server.is_closed(), "{:?}", server.close_reason());
        check_talks(&client, &server);
        check_talks(&server, &client);
    });
}

/// Garbage instead of a hello: `accept` reports a handshake error for that client (and logs
/// it), and the listener and the sessions it already made keep working.
#[test]
fn garbage_client_is_refused_and_others_keep_working() {
    capture_logs();
    beside_healthy(|l, addr| {
        let mut junk = TcpStream::connect(addr.trim_start_matches("tcp://")).unwrap();
        junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n and some more bytes..")
            .unwrap();
        match l.accept() {
            Err(Error::Handshake(why)) => assert!(!why.is_empty()),
            other => panic!("expected a handshake error, got {other:?}"),
        }
        assert!(logged(&["WARN", "handshake failed"]));
        let (c, d) = healthy(l, addr);
        check_talks(&d, &c);
    });
}

/// A frame cut short by the connection closing ends that session with a reason; the others
/// keep working.
#[test]
fn truncated_frame_ends_only_its_session() {
    beside_healthy(|l, addr| {
        let (mut raw, server) = raw_session(l, addr);
        raw.write_all(&open::<Vec<u8>>(1)).unwrap();
        let rx = server
            .accept_channel_timeout::<Vec<u8>>(Duration::from_secs(5))
            .expect("accept");
        raw.write_all(&header(1000, DATA, 0, 1, 0)).unwrap();
        raw.write_all(&[7u8; 300]).unwrap();
        drop(raw);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).map(|_| ()),
            Err(RecvTimeoutError::Disconnected)
        );
        let reason = server.close_reason().expect("reason");
        assert!(reason.contains("middle of a frame"), "reason: {reason}");
    });
}

/// A frame header announcing 4 GiB is refused at once (GOAWAY, logged, cut off), without
/// waiting for or buffering a body; the others keep working.
#[test]
fn huge_length_is_cut_off_at_once() {
    capture_logs();
    beside_healthy(|l, addr| {
        let (mut raw, server) = raw_session(l, addr);
        raw.write_all(&header(u32::MAX, DATA, 0, 1, 0)).unwrap();
        assert!(common::eventually(Duration::from_secs(5), || server.is_closed()));
        let mut got = Vec::new();
        let _ = raw.read_to_end(&mut got);
        assert!(
            frames(&got).any(|h| h.kind == GOAWAY),
            "no GOAWAY before the connection closed"
        );
        assert!(logged(&[
            "WARN",
            "cutting off tcp 127.0.0.1",
            "protocol violation"
        ]));
    });
}

/// A peer that never reads: the sender's channel fills its credit window and then reports
/// `Full`; what libchan buffers for that peer stays bounded by the window.
#[test]
fn peer_that_stops_reading_bounds_the_senders_memory() {
    with_timeout(LIMIT, || {
        let (l, addr) = listener(&Options::new());
        let raw = raw_client(&addr);
        let server = l.accept().expect("accept");
        let tx = server.open_channel::<Vec<u8>>().expect("open");
        let mut accepted = 0usize;
        let full = loop {
            match tx.try_send(vec![1u8; 4096]) {
                Ok(()) => accepted += 1,
                Err(TrySendError::Full(m)) => break m,
                Err(e) => panic!("unexpected {e:?}"),
            }
            assert!(accepted < 10_000, "never reported Full");
        };
        assert_eq!(full.len(), 4096, "Full returns the message");
        // The window the raw peer announced (256 KiB) bounds what was taken.
        let bytes = accepted * 4096;
        assert!(
            bytes <= 256 << 10,
            "{bytes} bytes accepted for a peer that never reads"
        );
        assert!(bytes >= 128 << 10, "only {bytes} bytes before Full");
        // A blocking send waits for credit rather than buffering, and gives up on time.
        let r = tx.send_timeout(vec![2u8; 4096], Duration::from_millis(200));
        assert!(r.is_err(), "sent past the window");
        drop(raw);
    });
}

/// Clients that connect and say nothing do not hold up `accept` on any network listener: each
/// handshake runs on its own thread, and the next client is served at once.
#[test]
fn silent_clients_do_not_stall_accept() {
    with_timeout(LIMIT, || {
        let (server_opts, client_opts) = tls_opts();
        for (addr, server, client) in [
            ("tcp://127.0.0.1:0", Options::new(), Options::new()),
            ("ws://127.0.0.1:0/chan", Options::new(), Options::new()),
            (
                "tls://127.0.0.1:0",
                server_opts.clone(),
                client_opts.clone(),
            ),
            ("wss://127.0.0.1:0/chan", server_opts, client_opts),
        ] {
            let l = libchan::listen_with(addr, &server.shm(false)).expect("listen");
            let addr = l.local_addr().expect("local_addr");
            let host = addr.split("://").nth(1).unwrap().split('/').next().unwrap();
            let silent: Vec<TcpStream> =
                (0..3).map(|_| TcpStream::connect(host).unwrap()).collect();
            let start = Instant::now();
            let to = addr.clone();
            let c = thread::spawn(move || libchan::connect_with(&to, &client.shm(false)));
            let session = l.accept().expect("accept the talking client");
            let client = c.join().unwrap().expect("connect");
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{addr}: served after {:?}",
                start.elapsed()
            );
            check_talks(&client, &session);
            drop(silent);
        }
    });
}

/// Server and client options for TLS with a throwaway CA (rcgen).
fn tls_opts() -> (Options, Options) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let server = Options::new()
        .tls_identity_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .unwrap();
    let client = Options::new().tls_ca_pem(ca_pem.as_bytes()).unwrap();
    (server, client)
}
