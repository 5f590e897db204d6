//! Real second processes: the test binary re-executes itself as the peer.
//!
//! Each test listens on a fresh abstract unix address and spawns
//! `current_exe() --exact child_entry --nocapture --test-threads=1` with `LIBCHAN_CHILD` naming
//! the child's role and `LIBCHAN_ADDR` the address to connect to. `child_entry` is a no-op in
//! the parent run. Every test runs its body under a timeout, and every child is killed and
//! reaped when the test ends, whether it passed or not (`KillOnDrop`); a child also exits on
//! its own after `CHILD_WATCHDOG` in case its parent vanished.
//!
//! Covers conformance items 12 (handles forwarded to a third process), 22 (fds and channel
//! tables are freed) and 25 (SIGKILL of the peer wakes every blocked call with
//! `Disconnected` within a second), plus a listener facing processes that are not libchan.

mod common;

use common::{fresh_addr, with_timeout};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, ExitStatus};
use std::sync::{mpsc, Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use libchan::{
    ByteStream, Error, Fd, RecvError, RecvTimeoutError, Role, SendTimeoutError, Sender, Session,
};

/// A child gives up after this long whatever it is doing (its parent may have died).
const CHILD_WATCHDOG: Duration = Duration::from_secs(20);

/// Size of one message in the "killed mid-message" test.
const CHUNK: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Message types
// ---------------------------------------------------------------------------------------------

/// A large, verifiable message: `data` is `pattern()[seq % 251..][..CHUNK]`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Chunk {
    seq: u64,
    data: Vec<u8>,
}

/// One message of the fd-hygiene test: a socket end passed as a plain fd and a byte stream,
/// each holding a line of text naming `n`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Carry {
    n: u32,
    file: Fd,
    stream: ByteStream,
}

/// A request that travels A -> P -> B: B answers on `reply` and talks to A over `stream`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Offer {
    reply: Sender<String>,
    stream: ByteStream,
}

// ---------------------------------------------------------------------------------------------
// Parent-side helpers
// ---------------------------------------------------------------------------------------------

/// Tests that count this process's fds must not run while another test opens or closes some:
/// they take the lock for writing, every other test for reading.
static FD_LOCK: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    FD_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    FD_LOCK.write().unwrap_or_else(|e| e.into_inner())
}

/// A child process running `child_entry` in `role`.
struct Kid {
    role: &'static str,
    child: Mutex<Child>,
}

impl Kid {
    fn spawn(role: &'static str, addr: &str) -> Arc<Kid> {
        let child = common::child_command("LIBCHAN", role, addr)
            .spawn()
            .expect("spawn the child process");
        Arc::new(Kid {
            role,
            child: Mutex::new(child),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGKILL (a no-op if it already exited).
    fn kill(&self) {
        let _ = self.lock().kill();
    }

    /// Waits up to `limit` for the child to exit.
    fn wait_timeout(&self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.lock().try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asserts that the child exits successfully within `limit`.
    fn assert_success(&self, limit: Duration) {
        match self.wait_timeout(limit) {
            Some(status) => assert!(status.success(), "child {} failed: {status}", self.role),
            None => panic!("child {} did not exit within {limit:?}", self.role),
        }
    }
}

/// Kills and reaps its children when dropped: a failing or timed-out test leaves no process.
struct KillOnDrop(Vec<Arc<Kid>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for kid in &self.0 {
            let mut child = kid.lock();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Bytes that every `Chunk` is cut from.
fn pattern() -> Vec<u8> {
    (0..CHUNK + 256).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn chunk_data(pattern: &[u8], seq: u64) -> &[u8] {
    let at = (seq % 251) as usize;
    &pattern[at..at + CHUNK]
}

/// The open fds of this process, each with what it points at.
fn open_fds() -> Vec<(String, String)> {
    let mut fds: Vec<(String, String)> = std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "?".into());
            (e.file_name().to_string_lossy().into_owned(), target)
        })
        .collect();
    fds.sort();
    fds
}

/// A valid libchan hello (reference defaults), for children that impersonate a peer.
fn valid_hello() -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(b"LCHN");
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[8..16].copy_from_slice(&1u64.to_le_bytes());
    h[16..20].copy_from_slice(&16_842_752u32.to_le_bytes());
    h[20..24].copy_from_slice(&16_777_216u32.to_le_bytes());
    h[24..28].copy_from_slice(&262_144u32.to_le_bytes());
    h[28..32].copy_from_slice(&65_536u32.to_le_bytes());
    h
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Item 25: the peer is SIGKILLed while this process has a thread blocked in `recv` and
/// another blocked in `send` (the child never reads): both wake with `Disconnected` within a
/// second, and `accept_channel` on the dead session fails at once.
#[test]
fn sigkill_wakes_blocked_send_recv_and_accept() {
    let _g = shared();
    let addr = fresh_addr("libchan-test");
    let listener = libchan::listen(&addr).unwrap();
    let kid = Kid::spawn("sleeper", &addr);
    let _reap = KillOnDrop(vec![kid.clone()]);
    let victim = kid.clone();
    with_timeout(Duration::from_secs(10), move || {
        let session = listener.accept().unwrap();
        let rx = session
            .accept_channel_timeout::<u64>(Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap().to_native(),
            1
        );

        // Fill the channel until a send cannot complete: the child never reads.
        let tx = session.open_channel::<Vec<u8>>().unwrap();
        let mut sent = 0usize;
        loop {
            match tx.send_timeout(vec![0xA5; 64 * 1024], Duration::from_millis(200)) {
                Ok(()) => sent += 1,
                Err(SendTimeoutError::Timeout(_)) => break,
                Err(SendTimeoutError::Disconnected(_)) => panic!("disconnected while filling"),
            }
            assert!(sent < 1000, "64 MiB went out to a peer that never reads");
        }

        let (report, reports) = mpsc::channel::<(&str, bool, Instant)>();
        let r = report.clone();
        let receiver = thread::spawn(move || {
            let got = rx.recv();
            let ok = matches!(got, Err(RecvError::Disconnected));
            let _ = r.send(("recv", ok, Instant::now()));
        });
        let sender = thread::spawn(move || {
            // `send_timeout` may have given up on a socket that still takes a few bytes: keep
            // sending until a send blocks for good. Only an error ends this loop.
            let got = loop {
                if let Err(e) = tx.send(vec![0x5A; 64 * 1024]) {
                    break e;
                }
            };
            let ok = got.0.len() == 64 * 1024 && got.0[0] == 0x5A;
            let _ = report.send(("send", ok, Instant::now()));
        });
        // Give both calls time to block; if one has not yet, it still must fail the same way.
        thread::sleep(Duration::from_millis(200));
        if let Ok((what, _, _)) = reports.try_recv() {
            panic!("{what} failed before the peer died");
        }

        let killed = Instant::now();
        victim.kill();
        for _ in 0..2 {
            let (what, ok, at) = reports
                .recv_timeout(Duration::from_secs(5))
                .expect("a blocked call never woke after SIGKILL");
            assert!(ok, "blocked {what} did not fail with Disconnected");
            let took = at.duration_since(killed);
            assert!(
                took < Duration::from_secs(1),
                "blocked {what} woke {took:?} after SIGKILL"
            );
        }
        receiver.join().unwrap();
        sender.join().unwrap();

        let t = Instant::now();
        let accepted = session.accept_channel_timeout::<u64>(Duration::from_secs(5));
        assert!(
            matches!(accepted, Err(Error::Disconnected)),
            "accept_channel on a dead session: {:?}",
            accepted.err()
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(session.is_closed());
        assert!(session.close_reason().is_some());
        assert!(session.open_channel::<u64>().is_err());
    });
    assert!(!kid.wait_timeout(Duration::from_secs(5)).unwrap().success());
}

/// Item 25, variant: the child streams 1 MiB messages and is killed mid-stream. Every message
/// that arrived whole is delivered intact and in order, then `recv` says `Disconnected`.
#[test]
fn sigkill_mid_message_delivers_complete_messages_then_disconnects() {
    let _g = shared();
    let addr = fresh_addr("libchan-test");
    let listener = libchan::listen(&addr).unwrap();
    let kid = Kid::spawn("streamer", &addr);
    let _reap = KillOnDrop(vec![kid.clone()]);
    with_timeout(Duration::from_secs(15), move || {
        let pattern = pattern();
        let session = listener.accept().unwrap();
        let rx = session
            .accept_channel_timeout::<Chunk>(Duration::from_secs(5))
            .unwrap();
        let mut next = 0u64;
        let check = |m: &libchan::Msg<Chunk>, next: u64| {
            assert_eq!(m.seq.to_native(), next, "messages out of order");
            assert!(
                m.data.as_slice() == chunk_data(&pattern, next),
                "message {next} corrupted"
            );
        };
        while next < 3 {
            let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            check(&m, next);
            next += 1;
        }
        kid.kill();
        loop {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(m) => {
                    check(&m, next);
                    next += 1;
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("after SIGKILL: {e:?} instead of Disconnected"),
            }
        }
        assert!(next >= 3);
        assert!(matches!(
            rx.try_recv(),
            Err(libchan::TryRecvError::Disconnected)
        ));
        assert!(session.is_closed());
        let reason = session.close_reason().unwrap();
        assert!(reason.contains("closed"), "close reason: {reason}");
    });
}

/// Item 22: a child opens 100 channels and sends fds and byte streams on them, then closes
/// everything and exits. The session's channel table shrinks back as channels close, and once
/// the session is dropped this process holds exactly the fds it held before.
#[test]
fn closed_channels_and_streams_free_their_fds() {
    let _g = exclusive();
    let baseline = open_fds();
    {
        let addr = fresh_addr("libchan-test");
        let listener = libchan::listen(&addr).unwrap();
        let kid = Kid::spawn("churn", &addr);
        let _reap = KillOnDrop(vec![kid.clone()]);
        with_timeout(Duration::from_secs(15), move || {
            let session = listener.accept().unwrap();
            let go = session.open_channel::<u32>().unwrap();
            let rxs: Vec<_> = (0..100)
                .map(|_| {
                    session
                        .accept_channel_timeout::<Carry>(Duration::from_secs(5))
                        .unwrap()
                })
                .collect();
            for rx in &rxs {
                let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
                let n = m.n.to_native();
                if n % 2 == 0 {
                    let fd = m.take(&m.file).unwrap();
                    let mut sock = UnixStream::from(fd.into_owned_fd());
                    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut s = String::new();
                    sock.read_to_string(&mut s).unwrap();
                    assert_eq!(s, format!("fd {n} ✓"));
                    let mut stream = m.take(&m.stream).unwrap().into_unix_stream();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let mut s = String::new();
                    stream.read_to_string(&mut s).unwrap();
                    assert_eq!(s, format!("stream {n} ✓"));
                }
                // Odd messages drop their handles untaken: the Msg must close them.
            }
            let peak = session.channel_count();
            assert!(peak >= 101, "channel_count {peak} with 101 channels open");

            go.send(1).unwrap();
            for rx in &rxs {
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Err(RecvTimeoutError::Closed) => {}
                    Err(e) => panic!("channel should close cleanly, got {e:?}"),
                    Ok(_) => panic!("unexpected extra message"),
                }
            }
            let settle = Instant::now() + Duration::from_secs(1);
            while session.channel_count() > 1 && Instant::now() < settle {
                thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(
                session.channel_count(),
                1,
                "only the control channel is left"
            );
            drop(rxs);
            drop(go);
            assert_eq!(session.channel_count(), 0);
            kid.assert_success(Duration::from_secs(5));
            drop(session);
            drop(listener);
        });
    }
    // Only new fds count: one open before may be closed meanwhile by a relay thread that
    // outlived an earlier test.
    let leaked = || -> Vec<(String, String)> {
        open_fds()
            .into_iter()
            .filter(|fd| !baseline.contains(fd))
            .collect()
    };
    let settle = Instant::now() + Duration::from_secs(1);
    while !leaked().is_empty() && Instant::now() < settle {
        thread::sleep(Duration::from_millis(10));
    }
    let leaked = leaked();
    assert!(leaked.is_empty(), "fds leaked (number, target): {leaked:?}");
}

/// Item 12: A sends this process (P) a reply `Sender` and a `ByteStream`; P forwards both to B
/// over a second session; B answers on the sender and talks to A over the stream. A reports
/// what it got back to P.
#[test]
fn handles_forwarded_to_a_third_process() {
    let _g = shared();
    let addr = fresh_addr("libchan-test");
    let listener = libchan::listen(&addr).unwrap();
    let a = Kid::spawn("fwd_a", &addr);
    let _reap_a = KillOnDrop(vec![a.clone()]);
    let session_a = listener.accept().unwrap();
    let b = Kid::spawn("fwd_b", &addr);
    let _reap_b = KillOnDrop(vec![b.clone()]);
    with_timeout(Duration::from_secs(15), move || {
        let session_b = listener.accept().unwrap();
        let offers = session_a
            .accept_channel_timeout::<Offer>(Duration::from_secs(5))
            .unwrap();
        let reports = session_a
            .accept_channel_timeout::<String>(Duration::from_secs(5))
            .unwrap();
        let m = offers.recv_timeout(Duration::from_secs(5)).unwrap();
        let reply = m.take(&m.reply).unwrap();
        let stream = m.take(&m.stream).unwrap();
        let forward = session_b.open_channel::<Offer>().unwrap();
        forward.send(Offer { reply, stream }).unwrap();

        let report = reports.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            report.as_str(),
            "answer=[B got: ping from A ✓] stream=[pong from B ✓]"
        );
        // B stays until its channel closes.
        drop(forward);
        a.assert_success(Duration::from_secs(5));
        b.assert_success(Duration::from_secs(5));
        drop(session_b);
    });
}

/// A process that is not a libchan peer makes `accept` fail with a clear error, and the
/// listener goes on to accept a real peer.
#[test]
fn listener_survives_peers_that_are_not_libchan() {
    let _g = shared();
    let addr = fresh_addr("libchan-test");
    let listener = libchan::listen(&addr).unwrap();
    let garbage = Kid::spawn("garbage", &addr);
    let half = Kid::spawn("half_hello", &addr);
    let quitter = Kid::spawn("quitter", &addr);
    let good = Kid::spawn("good", &addr);
    let _reap = KillOnDrop(vec![
        garbage.clone(),
        half.clone(),
        quitter.clone(),
        good.clone(),
    ]);
    with_timeout(Duration::from_secs(15), move || {
        // The children connect in any order: accept until the good one has been served and
        // every bad one has been refused.
        let mut refused = Vec::new();
        let mut served = None;
        for _ in 0..4 {
            match listener.accept() {
                Ok(session) => {
                    assert!(served.is_none(), "two bad peers were accepted");
                    let rx = session
                        .accept_channel_timeout::<u64>(Duration::from_secs(5))
                        .unwrap();
                    assert_eq!(
                        rx.recv_timeout(Duration::from_secs(5)).unwrap().to_native(),
                        42
                    );
                    served = Some(session);
                }
                Err(e) => refused.push(e),
            }
        }
        assert!(served.is_some(), "the good peer was not accepted");
        assert_eq!(refused.len(), 3);
        let texts: Vec<String> = refused.iter().map(|e| format!("{e}")).collect();
        assert!(
            refused
                .iter()
                .any(|e| matches!(e, Error::Handshake(m) if m.contains("magic"))),
            "no error names the bad magic: {texts:?}"
        );
        for e in &refused {
            assert!(
                matches!(e, Error::Handshake(_) | Error::Io(_)),
                "unclear error for a bad peer: {e:?}"
            );
        }
        drop(served);
        garbage.assert_success(Duration::from_secs(5));
        half.assert_success(Duration::from_secs(5));
        quitter.assert_success(Duration::from_secs(5));
        good.assert_success(Duration::from_secs(5));
    });
}

/// Items 11 and 24: a peer opens a channel, sends on it, closes it and exits normally (CLOSE,
/// then GOAWAY) before this side accepted the channel. The message was sent before the
/// graceful close, so it must still be delivered.
#[test]

fn graceful_exit_keeps_channels_not_yet_accepted() {
    let _g = shared();
    let addr = fresh_addr("libchan-test");
    let listener = libchan::listen(&addr).unwrap();
    let kid = Kid::spawn("send_and_exit", &addr);
    let _reap = KillOnDrop(vec![kid.clone()]);
    with_timeout(Duration::from_secs(10), move || {
        let session = listener.accept().unwrap();
        // Everything the child wrote, GOAWAY included, is waiting in the socket.
        kid.assert_success(Duration::from_secs(5));
        let rx = session
            .accept_channel_timeout::<u64>(Duration::from_secs(5))
            .expect("the channel opened before GOAWAY");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap().to_native(),
            42
        );
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(RecvTimeoutError::Closed)
        ));
    });
}

// ---------------------------------------------------------------------------------------------
// The child side
// ---------------------------------------------------------------------------------------------

/// Entry point of the child processes; a no-op when the test binary runs normally.
#[test]
fn child_entry() {
    let Some((role, addr)) = common::child_role("LIBCHAN", CHILD_WATCHDOG) else {
        return;
    };
    match role.as_str() {
        "sleeper" => child_sleeper(&addr),
        "streamer" => child_streamer(&addr),
        "churn" => child_churn(&addr),
        "fwd_a" => child_fwd_a(&addr),
        "fwd_b" => child_fwd_b(&addr),
        "garbage" => child_garbage(&addr),
        "half_hello" => child_half_hello(&addr),
        "quitter" => drop(raw_connect(&addr)),
        "good" => child_good(&addr),
        "send_and_exit" => child_send_and_exit(&addr),
        other => panic!("unknown child role {other}"),
    }
}

fn raw_connect(addr: &str) -> UnixStream {
    use std::os::linux::net::SocketAddrExt;
    let name = addr.strip_prefix("unix:@").expect("abstract address");
    let sa = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
    let s = UnixStream::connect_addr(&sa).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Says it is ready, then never reads again: the parent's sends pile up until it is killed.
fn child_sleeper(addr: &str) {
    let session = libchan::connect(addr).unwrap();
    let tx = session.open_channel::<u64>().unwrap();
    tx.send(1).unwrap();
    thread::sleep(CHILD_WATCHDOG);
    drop((tx, session));
}

/// Sends 1 MiB messages until the parent kills it.
fn child_streamer(addr: &str) {
    let pattern = pattern();
    let session = libchan::connect(addr).unwrap();
    let tx = session.open_channel::<Chunk>().unwrap();
    for seq in 0u64.. {
        let data = chunk_data(&pattern, seq).to_vec();
        if tx.send(Chunk { seq, data }).is_err() {
            return;
        }
    }
}

/// Opens 100 channels, sends an fd and a stream on each, waits for the go, then closes all.
fn child_churn(addr: &str) {
    let session = libchan::connect(addr).unwrap();
    let go = session
        .accept_channel_timeout::<u32>(Duration::from_secs(10))
        .unwrap();
    let mut senders = Vec::new();
    for n in 0..100u32 {
        let tx = session.open_channel::<Carry>().unwrap();
        let (mut mine, file) = UnixStream::pair().unwrap();
        mine.write_all(format!("fd {n} ✓").as_bytes()).unwrap();
        drop(mine);
        let (mut ours, stream) = ByteStream::pair().unwrap();
        ours.write_all(format!("stream {n} ✓").as_bytes()).unwrap();
        drop(ours);
        tx.send(Carry {
            n,
            file: Fd::new(file),
            stream,
        })
        .unwrap();
        senders.push(tx);
    }
    assert_eq!(
        go.recv_timeout(Duration::from_secs(10))
            .unwrap()
            .to_native(),
        1
    );
    drop(senders);
    // The parent closes the control channel once it has seen every channel close.
    match go.recv_timeout(Duration::from_secs(10)) {
        Err(RecvTimeoutError::Closed) => {}
        Err(e) => panic!("control channel: {e:?}"),
        Ok(_) => panic!("unexpected control message"),
    }
}

fn child_fwd_a(addr: &str) {
    let session = libchan::connect(addr).unwrap();
    let offers = session.open_channel::<Offer>().unwrap();
    let reports = session.open_channel::<String>().unwrap();
    let (reply, answers) = libchan::pipe::<String>();
    let (mine, theirs) = ByteStream::pair().unwrap();
    offers
        .send(Offer {
            reply,
            stream: theirs,
        })
        .unwrap();
    let mut mine = mine.into_unix_stream();
    mine.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mine.write_all("ping from A ✓".as_bytes()).unwrap();
    mine.shutdown(std::net::Shutdown::Write).unwrap();
    let answer = answers.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut pong = String::new();
    mine.read_to_string(&mut pong).unwrap();
    reports
        .send(format!("answer=[{}] stream=[{pong}]", answer.as_str()))
        .unwrap();
}

fn child_fwd_b(addr: &str) {
    let session = libchan::connect(addr).unwrap();
    let offers = session
        .accept_channel_timeout::<Offer>(Duration::from_secs(10))
        .unwrap();
    let m = offers.recv_timeout(Duration::from_secs(10)).unwrap();
    let reply = m.take(&m.reply).unwrap();
    let mut stream = m.take(&m.stream).unwrap().into_unix_stream();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut ping = String::new();
    stream.read_to_string(&mut ping).unwrap();
    reply.send(format!("B got: {ping}")).unwrap();
    stream.write_all("pong from B ✓".as_bytes()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    // Stay until the parent is done with this session.
    let _ = offers.recv_timeout(Duration::from_secs(10));
}

/// Speaks HTTP at a libchan listener, then waits for it to hang up.
fn child_garbage(addr: &str) {
    let mut s = raw_connect(addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: libchan\r\n\r\n")
        .unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

/// Sends half a valid hello, reads the listener's, and hangs up.
fn child_half_hello(addr: &str) {
    let mut s = raw_connect(addr);
    s.write_all(&valid_hello()[..16]).unwrap();
    let mut theirs = [0u8; 32];
    s.read_exact(&mut theirs).unwrap();
    assert_eq!(&theirs[..4], b"LCHN");
}

fn child_good(addr: &str) {
    let stream = {
        use std::os::linux::net::SocketAddrExt;
        let name = addr.strip_prefix("unix:@").unwrap();
        let sa = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        UnixStream::connect_addr(&sa).unwrap()
    };
    let session = Session::from_unix_stream(stream, Role::Connector).unwrap();
    let tx = session.open_channel::<u64>().unwrap();
    tx.send(42).unwrap();
    // Stay until the parent drops the session.
    match session.accept_channel_timeout::<u64>(Duration::from_secs(10)) {
        Err(Error::Disconnected) => {}
        other => panic!("expected the parent to hang up, got {:?}", other.err()),
    }
}

/// Opens a channel, sends one message, and exits normally (CLOSE, then GOAWAY).
fn child_send_and_exit(addr: &str) {
    let session = libchan::connect(addr).unwrap();
    let tx = session.open_channel::<u64>().unwrap();
    tx.send(42).unwrap();
}
