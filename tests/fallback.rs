//! Transparent fallback (issue 4, item 5): `connect("tcp://...")` moves to shared memory when
//! the server shares our host and network namespace, and stays on TCP otherwise, with the same
//! application code.
//!
//! The upgrade is described in docs/PROTOCOL.md section 2.4. Some tests below play a client by
//! hand to check the wire form and the token rules. The namespace test creates a second
//! network namespace joined to ours by a veth pair and runs the server there: the test binary
//! re-executes itself with `ip netns exec` (`LIBCHAN_FALLBACK_SERVER` names the address the
//! child listens on; `child_server` is a no-op, and ignored, in a normal run). It needs root
//! and iproute2, and says why it skips when it cannot create the namespace.

mod common;

use common::with_timeout;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use libchan::{Options, Session, Transport};

/// Any single wait in a test.
const PATIENCE: Duration = Duration::from_secs(10);

/// Our hello as a raw client: version 1, features `FDS` on unix sockets and none on TCP, the
/// reference limits (PROTOCOL.md section 3).
fn hello(fds: bool) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(b"LCHN");
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[8..16].copy_from_slice(&u64::from(fds).to_le_bytes());
    h[16..20].copy_from_slice(&16_842_752u32.to_le_bytes());
    h[20..24].copy_from_slice(&(16u32 << 20).to_le_bytes());
    h[24..28].copy_from_slice(&(256u32 << 10).to_le_bytes());
    h[28..32].copy_from_slice(&65_536u32.to_le_bytes());
    h
}

/// A listener on a free loopback port, with its address.
fn listen(opts: &Options) -> (libchan::Listener, String) {
    let listener = libchan::listen_with("tcp://127.0.0.1:0", opts).expect("listen");
    let addr = listener.local_addr().expect("local_addr");
    (listener, addr)
}

/// Connects a client thread with `client` options to a fresh listener with `server` options:
/// (client session, server session).
fn session_pair(client: Options, server: &Options) -> (Session, Session) {
    let (listener, addr) = listen(server);
    let c = thread::spawn(move || libchan::connect_with(&addr, &client).expect("connect"));
    let s = listener.accept().expect("accept");
    (c.join().expect("client thread"), s)
}

/// Requests flow one way and replies the other, each side in its own thread.
fn exchange(client: Session, server: Session) {
    let server = thread::spawn(move || {
        let rx = server
            .accept_channel_timeout::<u64>(PATIENCE)
            .expect("server: accept");
        let tx = server.open_channel::<String>().expect("server: open");
        let mut n = 0;
        while let Ok(x) = rx.recv_timeout(PATIENCE) {
            tx.send(format!("reply {}", x.to_native() * 2))
                .expect("server: send");
            n += 1;
        }
        n
    });
    let tx = client.open_channel::<u64>().expect("client: open");
    tx.send(0).expect("client: send");
    let rx = client
        .accept_channel_timeout::<String>(PATIENCE)
        .expect("client: accept");
    assert_eq!(
        rx.recv_timeout(PATIENCE).expect("reply").as_str(),
        "reply 0"
    );
    for i in 1..200u64 {
        tx.send(i).expect("client: send");
        let r = rx.recv_timeout(PATIENCE).expect("reply");
        assert_eq!(r.as_str(), format!("reply {}", i * 2));
    }
    drop(tx);
    assert_eq!(server.join().expect("server thread"), 200);
}

#[test]
fn same_namespace_upgrades_to_shm() {
    with_timeout(PATIENCE * 2, || {
        let (client, server) = session_pair(Options::new(), &Options::new());
        assert_eq!(client.transport(), Transport::Shm);
        assert_eq!(server.transport(), Transport::Shm);
        // Now a unix socket underneath: the kernel names the peer.
        let me = rustix::process::getuid().as_raw();
        assert_eq!((client.peer_uid(), server.peer_uid()), (Some(me), Some(me)));
        exchange(client, server);
    });
}

#[test]
fn client_without_shm_stays_on_tcp() {
    with_timeout(PATIENCE * 2, || {
        let (client, server) = session_pair(Options::new().shm(false), &Options::new());
        assert_eq!(client.transport(), Transport::Tcp);
        assert_eq!(server.transport(), Transport::Tcp);
        assert_eq!((client.peer_uid(), server.peer_uid()), (None, None));
        exchange(client, server);
    });
}

#[test]
fn server_without_shm_declines_and_stays_on_tcp() {
    with_timeout(PATIENCE * 2, || {
        let (client, server) = session_pair(Options::new(), &Options::new().shm(false));
        assert_eq!(client.transport(), Transport::Tcp);
        assert_eq!(server.transport(), Transport::Tcp);
        exchange(client, server);
    });
}

/// The wire form by hand: the request, then the offer's exact layout.
fn request_offer(tcp: &mut TcpStream) -> [u8; 56] {
    tcp.set_read_timeout(Some(PATIENCE)).expect("timeout");
    tcp.write_all(b"LCHU\x01\x00\x00\x00").expect("request");
    let mut offer = [0u8; 56];
    tcp.read_exact(&mut offer).expect("offer");
    assert_eq!(
        &offer[..8],
        b"LCHO\x01\x00\x01\x00",
        "magic, version 1, offered"
    );
    assert!(offer[24..32] == *b"libchan-", "{:?}", &offer[24..56]);
    assert!(offer[32..56]
        .iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)));
    offer
}

/// Connects to the offered abstract socket.
fn offered_socket(offer: &[u8; 56]) -> std::io::Result<UnixStream> {
    UnixStream::connect_addr(&SocketAddr::from_abstract_name(&offer[24..56])?)
}

/// Presents `token` on `unix`.
fn present(unix: &mut UnixStream, token: &[u8]) {
    unix.write_all(b"LCHT\0\0\0\0").expect("present");
    unix.write_all(token).expect("token");
}

#[test]
fn wrong_token_is_refused_and_the_right_one_works_once() {
    with_timeout(PATIENCE * 2, || {
        let (listener, addr) = listen(&Options::new());
        // Handshakes progress while someone accepts.
        let accepted = thread::spawn(move || listener.accept());
        let mut tcp = TcpStream::connect(addr.trim_start_matches("tcp://")).expect("connect");
        let offer = request_offer(&mut tcp);

        // A stranger on the same host found the name (/proc/net/unix lists it), not the token.
        let mut wrong = offered_socket(&offer).expect("reach the offered socket");
        let mut bad = [0u8; 16];
        bad.copy_from_slice(&offer[8..24]);
        bad[15] ^= 1;
        present(&mut wrong, &bad);
        wrong.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0u8; 32];
        match wrong.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("a wrong token must be refused (closed), got {other:?}"),
        }

        // Another connects and says nothing: it must not hold up the client.
        let _silent = offered_socket(&offer).expect("reach the offered socket");

        // The client itself comes next, with the token, and runs the handshake there.
        let mut unix = offered_socket(&offer).expect("the offer survives a wrong token");
        present(&mut unix, &offer[8..24]);
        unix.write_all(&hello(true)).expect("hello");
        unix.set_read_timeout(Some(PATIENCE)).unwrap();
        unix.read_exact(&mut buf)
            .expect("the server's hello on the unix socket");
        assert_eq!(&buf[..4], b"LCHN");
        // The token is spent: the name is gone.
        let again = offered_socket(&offer);
        assert!(
            matches!(&again, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
            "{again:?}"
        );
        // Closing TCP commits the move; the server's accept returns the unix session.
        drop(tcp);
        let session = accepted.join().expect("accept thread").expect("accept");
        // Our raw hello announced no SHM: frames on the unix socket.
        assert_eq!(session.transport(), Transport::Unix);
        assert!(session.peer_uid().is_some());
    });
}

#[test]
fn expired_offer_falls_back_to_tcp() {
    with_timeout(PATIENCE * 2, || {
        let (listener, addr) = listen(&Options::new());
        let accepted = thread::spawn(move || listener.accept());
        let mut tcp = TcpStream::connect(addr.trim_start_matches("tcp://")).expect("connect");
        let offer = request_offer(&mut tcp);
        // The token lives a few seconds; then its socket is gone.
        let gone = common::eventually(PATIENCE, || offered_socket(&offer).is_err());
        assert!(gone, "the offered socket outlived its token");
        // A client that did not move sends its hello on TCP and is served there.
        tcp.write_all(&hello(false)).expect("hello");
        let mut buf = [0u8; 32];
        tcp.read_exact(&mut buf).expect("the server's hello on TCP");
        assert_eq!(&buf[..4], b"LCHN");
        let session = accepted.join().expect("accept thread").expect("accept");
        assert_eq!(session.transport(), Transport::Tcp);
    });
}

#[test]
fn silent_clients_do_not_hold_up_accept() {
    // Well under the 10 s handshake timeout: accept must not wait for any of the silent ones.
    with_timeout(Duration::from_secs(5), || {
        let (listener, addr) = listen(&Options::new());
        let hostport = addr.trim_start_matches("tcp://").to_string();
        let mut silent = Vec::new();
        // One sends nothing, one part of a magic, one a request and then nothing.
        for first in [&b""[..], b"LCH", b"LCHU\x01\x00\x00\x00"] {
            let mut s = TcpStream::connect(&hostport).expect("connect");
            s.write_all(first).expect("write");
            silent.push(s);
        }
        let client = thread::spawn(move || libchan::connect(&addr).expect("connect"));
        let session = listener.accept().expect("accept");
        assert_eq!(session.transport(), Transport::Shm);
        exchange(client.join().expect("client"), session);
        drop(silent);
    });
}

#[test]
fn client_falls_back_to_a_server_without_the_upgrade() {
    with_timeout(PATIENCE * 2, || {
        // A server that implements only the plain protocol: it writes its hello at once.
        let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = format!("tcp://{}", server.local_addr().unwrap());
        let fake = thread::spawn(move || {
            // First connection: our hello, then the client's "hello" is a request: refused.
            let (mut first, _) = server.accept().expect("accept 1");
            first.write_all(&hello(false)).expect("hello 1");
            let mut request = [0u8; 8];
            first.set_read_timeout(Some(PATIENCE)).unwrap();
            first.read_exact(&mut request).expect("request");
            assert_eq!(&request[..4], b"LCHU");
            drop(first);
            // Second connection: the plain protocol.
            let (mut second, _) = server.accept().expect("accept 2");
            second.write_all(&hello(false)).expect("hello 2");
            second.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut theirs = [0u8; 32];
            second.read_exact(&mut theirs).expect("the client's hello");
            assert_eq!(&theirs[..4], b"LCHN");
            let mut open = [0u8; 24];
            second.read_exact(&mut open).expect("OPEN");
            let chan = u32::from_le_bytes(open[8..12].try_into().unwrap());
            // The connection stays open until the client has sent.
            ((open[4], chan), second)
        });
        let session = libchan::connect(&addr).expect("connect");
        assert_eq!(session.transport(), Transport::Tcp);
        let tx = session.open_channel::<u64>().expect("open");
        tx.send(7).expect("send");
        // OPEN (kind 1) of the connector's first channel (id 1).
        let (open, _connection) = fake.join().expect("fake server");
        assert_eq!(open, (1, 1));
    });
}

/// Asks the server at `hostport` for an upgrade by hand and tries to reach the socket it
/// offers; then stays on TCP (sends its hello there and reads the server's). Returns the result
/// of connecting to the offered socket.
fn probe(hostport: &str) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(hostport).expect("probe: connect");
    let offer = request_offer(&mut tcp);
    let reached = offered_socket(&offer).map(drop);
    tcp.write_all(&hello(false)).expect("probe: hello");
    let mut theirs = [0u8; 32];
    tcp.read_exact(&mut theirs)
        .expect("probe: the server's hello");
    assert_eq!(&theirs[..4], b"LCHN");
    reached
}

/// The server half of the process tests, run in a child process (in a network namespace or
/// not): listens on `LIBCHAN_FALLBACK_SERVER`'s address, prints the port, serves one session
/// and answers each number with the transport it sees.
#[test]
#[ignore = "the server of the process tests: run by them in a child process"]
fn child_server() {
    let Ok(host) = std::env::var("LIBCHAN_FALLBACK_SERVER") else {
        return;
    };
    with_timeout(Duration::from_secs(30), move || {
        let listener = libchan::listen(&format!("tcp://{host}:0")).expect("child: listen");
        let addr = listener.local_addr().expect("child: local_addr");
        let port = addr.rsplit(':').next().expect("a port");
        println!("LIBCHAN_FALLBACK_PORT={port}");
        std::io::stdout().flush().unwrap();
        // The parent's probe (a hand-made client that stays on TCP and leaves) and its
        // session, in the order their handshakes finished: the one that opens a channel is
        // the session.
        let sessions = [
            listener.accept().expect("child: accept"),
            listener.accept().expect("child: accept"),
        ];
        let (session, rx) = sessions
            .iter()
            .find_map(|s| Some((s, s.accept_channel_timeout::<u64>(PATIENCE).ok()?)))
            .expect("child: no session opened a channel");
        let tx = session.open_channel::<String>().expect("child: open");
        while let Ok(x) = rx.recv_timeout(PATIENCE) {
            tx.send(format!("{:?} {}", session.transport(), x.to_native()))
                .expect("child: send");
        }
        eprintln!("child server: served a {:?} session", session.transport());
    });
}

/// A child process running `child_server`, killed and reaped on drop.
struct ChildServer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildServer {
    /// Starts the child, through `prefix` (e.g. `ip netns exec NS`) if given, listening on
    /// `host`.
    fn spawn(prefix: &[&str], host: &str) -> ChildServer {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = cmd
            .args([
                "--exact",
                "child_server",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LIBCHAN_FALLBACK_SERVER", host)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child server");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        ChildServer { child, lines }
    }

    /// The port the child listens on.
    fn port(&self) -> u16 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .expect("the child server did not report its port");
            // The harness may have printed "test child_server ... " on the same line.
            if let Some((_, p)) = line.split_once("LIBCHAN_FALLBACK_PORT=") {
                return p.trim().parse().expect("a port number");
            }
        }
    }

    /// Waits for the child to exit; true if it succeeded.
    fn wait(&mut self) -> bool {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("the child server did not exit");
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to `addr` with default options, checks the transport on our side, and sends a few
/// numbers; returns the child's answers.
fn talk_to_child(addr: String, expected: Transport) -> Vec<String> {
    with_timeout(PATIENCE * 2, move || {
        let session = libchan::connect(&addr).expect("connect to the child server");
        assert_eq!(session.transport(), expected, "our side of {addr}");
        let tx = session.open_channel::<u64>().expect("open");
        tx.send(1).expect("send");
        let rx = session
            .accept_channel_timeout::<String>(PATIENCE)
            .expect("accept the child's channel");
        let mut answers = vec![rx
            .recv_timeout(PATIENCE)
            .expect("answer")
            .as_str()
            .to_string()];
        for i in 2..=3 {
            tx.send(i).expect("send");
            answers.push(
                rx.recv_timeout(PATIENCE)
                    .expect("answer")
                    .as_str()
                    .to_string(),
            );
        }
        answers
    })
}

#[test]
fn child_server_in_our_namespace_upgrades() {
    let mut child = ChildServer::spawn(&[], "127.0.0.1");
    let hostport = format!("127.0.0.1:{}", child.port());
    // The child's offer is reachable from here.
    let reached = probe(&hostport);
    assert!(reached.is_ok(), "{reached:?}");
    let addr = format!("tcp://{hostport}");
    let answers = talk_to_child(addr, Transport::Shm);
    assert_eq!(answers, ["Shm 1", "Shm 2", "Shm 3"]);
    assert!(child.wait(), "the child server failed");
}

/// A network namespace joined to ours by a veth pair; deleted (with the pair) on drop.
struct Netns {
    name: String,
    veth: String,
}

impl Netns {
    /// Creates the namespace, the pair and their addresses (`ours`/30 here, `theirs`/30
    /// there). Err says why it could not.
    fn create(ours: &str, theirs: &str) -> Result<Netns, String> {
        let pid = std::process::id();
        let ns = Netns {
            name: format!("libchan-fb-{pid}"),
            // Interface names have at most 15 bytes.
            veth: format!("lcfb{pid}h"),
        };
        let peer = format!("lcfb{pid}n");
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{ours}/30"), "dev", &ns.veth])?;
        ip(&["link", "set", &ns.veth, "up"])?;
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &ns.name, "ip"];
            a.extend_from_slice(args);
            ip(&a)
        };
        inside(&["addr", "add", &format!("{theirs}/30"), "dev", &peer])?;
        inside(&["link", "set", &peer, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end deletes the pair (and the namespace would take its end anyway).
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs `ip ARGS`; Err with what went wrong.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[test]
fn child_server_in_another_namespace_stays_on_tcp() {
    if !rustix::process::geteuid().is_root() {
        return skip("needs root to create a network namespace");
    }
    // A /30 of 10.200.0.0/16 of our own, from the pid: parallel runs do not collide.
    let pid = std::process::id();
    let base = format!("10.200.{}.{}", (pid / 64) % 256, (pid % 64) * 4);
    let (ours, theirs) = (bump(&base, 1), bump(&base, 2));
    let ns = match Netns::create(&ours, &theirs) {
        Ok(ns) => ns,
        Err(why) => {
            return skip(&format!("cannot create a network namespace: {why}"));
        }
    };
    let mut child = ChildServer::spawn(&["ip", "netns", "exec", &ns.name], &theirs);
    let hostport = format!("{theirs}:{}", child.port());
    // The server offers the upgrade, but its abstract socket lives in its namespace: we cannot
    // reach it...
    let reached = probe(&hostport);
    assert!(
        matches!(&reached, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "the offered socket must be out of reach from another namespace: {reached:?}"
    );
    // ...and so a default client stays on TCP without the application noticing.
    let addr = format!("tcp://{hostport}");
    let answers = talk_to_child(addr.clone(), Transport::Tcp);
    assert_eq!(answers, ["Tcp 1", "Tcp 2", "Tcp 3"]);
    assert!(child.wait(), "the child server failed");
    eprintln!(
        "namespace {} (server at {addr}, us at {ours}): offer out of reach ({}), \
         the session stayed on TCP",
        ns.name,
        reached.expect_err("checked above")
    );
}

/// Says loudly that the namespace test did not run, and why.
fn skip(why: &str) {
    eprintln!("SKIPPED child_server_in_another_namespace_stays_on_tcp: {why}");
}

/// `base` is `10.200.A.B` with B a multiple of 4; returns `10.200.A.(B + n)`.
fn bump(base: &str, n: u32) -> String {
    let (head, last) = base.rsplit_once('.').expect("dotted");
    let last: u32 = last.parse().expect("a number");
    format!("{head}.{}", last + n)
}
