//! A hostile peer: raw bytes written per docs/PROTOCOL.md at a libchan session.
//!
//! Each test connects a raw socket to a libchan acceptor (`Session::from_unix_stream` on the
//! other end of a `UnixStream::pair()`, run on its own thread because libchan reads our hello
//! only after writing its own), breaks one rule, and checks that
//!
//! - the libchan session ends: a blocked `accept_channel` (or `recv`) returns an error, not a
//!   timeout, and `is_closed()` holds;
//! - `close_reason()` names the problem, and the raw side reads a GOAWAY (section 10) then
//!   end of stream;
//! - nothing panics, and a healthy session in the same process, with a channel in use since
//!   before the attack, keeps working.
//!
//! The raw side plays the connector, so its channel ids are odd.

mod common;

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    frame, header, open, Header, Hello, CLOSE, DATA, GOAWAY, MAX_FRAME, MAX_MESSAGE, PING, WINDOW,
};
use libchan::{Error, Receiver, RecvTimeoutError, Role, Sender, Session};

const FD_HANDLE: u8 = 1;

/// GOAWAY reason codes (section 4.2).
const PROTOCOL_ERROR: u32 = 1;
const LIMITS_EXCEEDED: u32 = 2;

/// A message type whose archive can be invalid (a `bool` byte other than 0 or 1).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
struct Note {
    flag: bool,
    text: String,
}

// ---------------------------------------------------------------------------------------------
// Wire helpers
// ---------------------------------------------------------------------------------------------

/// A DATA frame carrying `value` as the payload, with no handles.
fn data_u64(chan: u32, value: u64) -> Vec<u8> {
    let payload = libchan::rkyv::to_bytes::<libchan::rkyv::rancor::Error>(&value).unwrap();
    frame(DATA, 0, chan, 0, &payload)
}

/// Connects a raw peer that sends `hello`; returns its socket and libchan's handshake result.
fn handshake(hello: [u8; 32]) -> (UnixStream, Result<Session, Error>) {
    let (mut raw, lib) = UnixStream::pair().unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let libside = thread::spawn(move || Session::from_unix_stream(lib, Role::Acceptor));
    raw.write_all(&hello).unwrap();
    common::read_hello(&mut raw);
    let session = libside.join().expect("handshake panicked");
    (raw, session)
}

/// A raw peer with a completed handshake at the reference defaults.
fn established() -> (UnixStream, Arc<Session>) {
    let (raw, session) = handshake(Hello::good().bytes());
    (
        raw,
        Arc::new(session.expect("handshake with a valid hello")),
    )
}

/// Reads what libchan writes until end of stream; returns the GOAWAY's reason and text.
fn read_goaway(raw: &mut UnixStream) -> (u32, String) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            // We may have been writing when libchan hung up: what it sent was read already.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading libchan's frames: {e}"),
        }
    }
    let mut at = 0;
    let mut goaway = None;
    while let Some(h) = bytes.get(at..).and_then(Header::parse) {
        let body = &bytes[at + 16..(at + 16 + h.len).min(bytes.len())];
        if h.kind == GOAWAY {
            assert!(goaway.is_none(), "two GOAWAY frames");
            goaway = Some((h.arg, String::from_utf8_lossy(body).into_owned()));
        } else {
            assert!(goaway.is_none(), "frame of kind {} after GOAWAY", h.kind);
        }
        at += 16 + h.len;
    }
    assert_eq!(at, bytes.len(), "libchan wrote a partial frame");
    goaway.expect("libchan closed without a GOAWAY")
}

/// Blocks in `accept_channel` (which reads the session) until it fails; returns the error
/// and how long it waited. Accepted channels are kept open until then.
fn drive(session: Arc<Session>) -> thread::JoinHandle<Error> {
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut kept: Vec<Receiver<u64>> = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match session.accept_channel_timeout::<u64>(left) {
                Ok(rx) => kept.push(rx),
                Err(e) => return e,
            }
        }
    })
}

/// Asserts that the session died of a protocol violation described by `needle`.
fn assert_broken(session: &Session, driver: thread::JoinHandle<Error>, needle: &str) {
    let err = driver
        .join()
        .expect("a thread reading the session panicked");
    assert!(
        matches!(err, Error::Disconnected),
        "blocked accept_channel returned {err:?} instead of Disconnected"
    );
    assert!(session.is_closed());
    let reason = session.close_reason().expect("a closed session says why");
    assert!(
        reason.contains(needle),
        "close_reason {reason:?} does not mention {needle:?}"
    );
    assert!(session.open_channel::<u64>().is_err());
}

/// Asserts the GOAWAY's reason code is one of `codes` and its text mentions `needle`.
fn assert_goaway(raw: &mut UnixStream, codes: &[u32], needle: &str) {
    let (code, text) = read_goaway(raw);
    assert!(codes.contains(&code), "GOAWAY reason {code} ({text:?})");
    assert!(
        text.contains(needle),
        "GOAWAY text {text:?} lacks {needle:?}"
    );
}

/// A healthy session pair in this process, with a channel already carrying messages.
struct Healthy {
    sessions: (Session, Session),
    tx: Sender<String>,
    rx: Receiver<String>,
}

impl Healthy {
    fn start() -> Self {
        let (a, b) = Session::pair().unwrap();
        let tx = a.open_channel::<String>().unwrap();
        tx.send("before".into()).unwrap();
        let rx = b
            .accept_channel_timeout::<String>(Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap().as_str(),
            "before"
        );
        Healthy {
            sessions: (a, b),
            tx,
            rx,
        }
    }

    /// The pair still carries messages both on its old channel and on a new one.
    fn check(self) {
        for i in 0..20 {
            self.tx.send(format!("after {i} ✓")).unwrap();
        }
        for i in 0..20 {
            let m = self.rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(m.as_str(), format!("after {i} ✓"));
        }
        let (a, b) = &self.sessions;
        assert!(!a.is_closed() && !b.is_closed());
        let tx = b.open_channel::<u64>().unwrap();
        tx.send(7).unwrap();
        let rx = a
            .accept_channel_timeout::<u64>(Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap().to_native(),
            7
        );
    }
}

/// Runs `body` on a thread and fails the test if it takes longer than `limit`.
fn with_timeout(limit: Duration, body: impl FnOnce() + Send + 'static) {
    let (done, wait) = mpsc::channel();
    let worker = thread::spawn(move || {
        body();
        let _ = done.send(());
    });
    match wait.recv_timeout(limit) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(()) => unreachable!("the body reports completion before it returns"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test timed out after {limit:?}"),
    }
}

/// The common shape: start a healthy pair, connect a raw peer, let `attack` write its bytes
/// while a thread blocks in `accept_channel`, then check the session died for `needle`, the
/// GOAWAY's reason is one of `codes`, and the healthy pair still works.
fn hostile_case(codes: &'static [u32], needle: &'static str, attack: fn(&mut UnixStream)) {
    with_timeout(Duration::from_secs(10), move || {
        let healthy = Healthy::start();
        let (mut raw, session) = established();
        let driver = drive(session.clone());
        attack(&mut raw);
        assert_broken(&session, driver, needle);
        assert_goaway(&mut raw, codes, needle);
        healthy.check();
    });
}

/// Writes `bytes` on a thread, ignoring errors: libchan may hang up before it has read them.
fn write_in_background(raw: &UnixStream, bytes: Vec<u8>) -> thread::JoinHandle<()> {
    let mut w = raw.try_clone().unwrap();
    thread::spawn(move || {
        for chunk in bytes.chunks(64 * 1024) {
            if w.write_all(chunk).is_err() {
                return;
            }
        }
    })
}

/// Sends `bytes` in one `sendmsg` with `fds` attached as `SCM_RIGHTS`.
fn send_with_fds(raw: &UnixStream, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    let n = sendmsg(
        raw.as_fd(),
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(n, bytes.len(), "short sendmsg");
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// Handshake failures close the connection without a GOAWAY (section 10).
fn bad_hello(hello: Hello, needle: &'static str) {
    with_timeout(Duration::from_secs(10), move || {
        let healthy = Healthy::start();
        let (mut raw, session) = handshake(hello.bytes());
        match session {
            Err(Error::Handshake(m)) => {
                assert!(m.contains(needle), "handshake error {m:?} lacks {needle:?}")
            }
            Err(e) => panic!("expected a handshake error, got {e:?}"),
            Ok(_) => panic!("a bad hello was accepted"),
        }
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "libchan wrote {} bytes after a bad hello",
            rest.len()
        );
        healthy.check();
    });
}

#[test]
fn bad_magic_fails_the_handshake() {
    bad_hello(
        Hello {
            magic: *b"HTTP",
            ..Hello::good()
        },
        "magic",
    );
}

#[test]
fn wrong_version_fails_the_handshake() {
    bad_hello(
        Hello {
            version: 2,
            ..Hello::good()
        },
        "version",
    );
}

#[test]
fn max_message_above_max_frame_fails_the_handshake() {
    bad_hello(
        Hello {
            max_frame: 8192,
            max_message: 8193,
            ..Hello::good()
        },
        "max_message",
    );
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// Only a header declaring a 2 GiB body is sent: the session must end without waiting for it.
#[test]
fn frame_over_max_frame_is_rejected_from_its_header() {
    hostile_case(&[PROTOCOL_ERROR, LIMITS_EXCEEDED], "max_frame", |raw| {
        raw.write_all(&open::<u64>(1)).unwrap();
        raw.write_all(&header(0x7fff_ffff, DATA, 0, 1, 0)).unwrap();
    });
}

#[test]
fn unknown_frame_kind_closes_the_session() {
    hostile_case(&[PROTOCOL_ERROR], "unknown frame kind 15", |raw| {
        raw.write_all(&frame(15, 0, 0, 0, &[])).unwrap();
    });
}

/// FORGET (kind 14) speaks of ring offers, which only shared-memory sessions have.
#[test]
fn forget_without_shared_memory_closes_the_session() {
    hostile_case(
        &[PROTOCOL_ERROR],
        "FORGET frame on a session without shared memory",
        |raw| {
            raw.write_all(&frame(14, 0, 0, 7, &[])).unwrap();
        },
    );
}

#[test]
fn data_on_a_channel_never_opened_closes_the_session() {
    hostile_case(&[PROTOCOL_ERROR], "unknown channel 5", |raw| {
        raw.write_all(&data_u64(5, 1)).unwrap();
    });
}

#[test]
fn open_reusing_an_id_closes_the_session() {
    hostile_case(&[PROTOCOL_ERROR], "already in use", |raw| {
        raw.write_all(&open::<u64>(1)).unwrap();
        raw.write_all(&data_u64(1, 1)).unwrap();
        raw.write_all(&open::<u64>(1)).unwrap();
    });
}

#[test]
fn open_with_an_id_of_the_wrong_parity_closes_the_session() {
    // libchan accepted: the even ids are its own.
    hostile_case(&[PROTOCOL_ERROR], "channel id 2", |raw| {
        raw.write_all(&open::<u64>(2)).unwrap();
    });
}

#[test]
fn frame_declaring_fds_that_never_came_closes_the_session() {
    hostile_case(&[PROTOCOL_ERROR], "file descriptors", |raw| {
        raw.write_all(&open::<u64>(1)).unwrap();
        let mut body = vec![FD_HANDLE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&7u64.to_le_bytes());
        raw.write_all(&frame(DATA, 1, 1, 1, &body)).unwrap();
    });
}

/// fds attached to a frame that declares none are unclaimed (section 5.4): the session ends,
/// and libchan closes the fd it received.
#[test]
fn fds_on_a_frame_that_declares_none_close_the_session_and_are_closed() {
    with_timeout(Duration::from_secs(10), || {
        let healthy = Healthy::start();
        let (mut raw, session) = established();
        let driver = drive(session.clone());
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        raw.write_all(&open::<u64>(1)).unwrap();
        send_with_fds(&raw, &data_u64(1, 1), &[theirs.as_fd()]);
        drop(theirs);
        // The session may already have closed on the unclaimed fd: the PING is best effort.
        let _ = raw.write_all(&frame(PING, 0, 0, 0, &[0; 8]));
        let needle = "no frame to claim them";
        assert_broken(&session, driver, needle);
        assert_goaway(&mut raw, &[PROTOCOL_ERROR], needle);
        // The only other copy of `theirs` was the one libchan received: it must be closed.
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            ours.read(&mut buf).unwrap(),
            0,
            "libchan kept the stray fd open"
        );
        healthy.check();
    });
}

/// A well-formed frame carrying a payload that is not a valid archive of the channel's type
/// fails only that message: `recv` reports `Invalid`, the next message reads correctly, and
/// the session stays up.
#[test]
fn invalid_archive_fails_one_message_not_the_session() {
    with_timeout(Duration::from_secs(10), || {
        let healthy = Healthy::start();
        let (mut raw, session) = established();
        raw.write_all(&open::<Note>(1)).unwrap();
        // ArchivedNote is 12 bytes (bool, padding, string repr) at the end of the buffer: a
        // `bool` byte of 0xff cannot validate.
        raw.write_all(&frame(DATA, 0, 1, 0, &[0xff; 24])).unwrap();
        let good = Note {
            flag: true,
            text: "still readable ✓".into(),
        };
        let payload = libchan::rkyv::to_bytes::<libchan::rkyv::rancor::Error>(&good).unwrap();
        raw.write_all(&frame(DATA, 0, 1, 0, &payload)).unwrap();
        raw.write_all(&frame(CLOSE, 0, 1, 0, &[])).unwrap();

        let rx = session
            .accept_channel_timeout::<Note>(Duration::from_secs(5))
            .unwrap();
        match rx.recv_timeout(Duration::from_secs(5)) {
            Err(RecvTimeoutError::Invalid(_)) => {}
            Err(e) => panic!("expected Invalid, got {e:?}"),
            Ok(m) => panic!("garbage validated as {:?}", m.flag),
        }
        let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(m.flag);
        assert_eq!(m.text.as_str(), "still readable ✓");
        assert_eq!(m.into_owned().unwrap(), good);
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(RecvTimeoutError::Closed)
        ));
        assert!(!session.is_closed(), "{:?}", session.close_reason());

        // The session goes on carrying new channels.
        raw.write_all(&open::<u64>(3)).unwrap();
        raw.write_all(&data_u64(3, 99)).unwrap();
        let rx = session
            .accept_channel_timeout::<u64>(Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap().to_native(),
            99
        );
        assert!(!session.is_closed());
        healthy.check();
    });
}

/// The peer dies in the middle of a frame: the complete messages before it are delivered,
/// then a blocked `recv` returns `Disconnected`.
#[test]
fn truncated_frame_then_eof_delivers_what_came_whole() {
    with_timeout(Duration::from_secs(10), || {
        let healthy = Healthy::start();
        let (mut raw, session) = established();
        raw.write_all(&open::<u64>(1)).unwrap();
        raw.write_all(&data_u64(1, 1)).unwrap();
        let rx = session
            .accept_channel_timeout::<u64>(Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap().to_native(),
            1
        );
        let (report, blocked) = mpsc::channel();
        let receiver = thread::spawn(move || {
            let first = rx
                .recv_timeout(Duration::from_secs(5))
                .map(|m| m.to_native());
            let _ = report.send(());
            let then = rx
                .recv_timeout(Duration::from_secs(5))
                .map(|m| m.to_native());
            (first, then)
        });
        raw.write_all(&data_u64(1, 2)).unwrap();
        blocked.recv_timeout(Duration::from_secs(5)).unwrap();
        let third = data_u64(1, 3);
        raw.write_all(&third[..third.len() - 3]).unwrap();
        drop(raw);
        let (first, then) = receiver.join().expect("receiver panicked");
        assert_eq!(first, Ok(2));
        assert_eq!(then, Err(RecvTimeoutError::Disconnected));
        assert!(session.is_closed());
        let reason = session.close_reason().unwrap();
        assert!(reason.contains("middle of a frame"), "{reason}");
        healthy.check();
    });
}

/// A DATA frame within `max_frame` whose payload exceeds `max_message` (16 MiB + 1 byte with
/// the reference limits, where `max_frame` leaves 64 KiB of room).
#[test]
fn payload_over_max_message_closes_the_session() {
    hostile_case(&[PROTOCOL_ERROR, LIMITS_EXCEEDED], "max_message", |raw| {
        raw.write_all(&open::<u64>(1)).unwrap();
        let len = MAX_MESSAGE + 1;
        assert!(len <= MAX_FRAME);
        let mut bytes = header(len, DATA, 0, 1, 0);
        bytes.resize(16 + len as usize, 0);
        // Not joined: it ends when its writes fail, once libchan has hung up.
        drop(write_in_background(raw, bytes));
    });
}

/// A peer that keeps sending on one channel while the receiver grants no credit: once
/// outstanding bytes pass `window + max_frame + 16` (section 7) the session is closed.
#[test]
fn credit_overrun_closes_the_session() {
    hostile_case(
        &[PROTOCOL_ERROR, LIMITS_EXCEEDED],
        "exceeded its credit",
        |raw| {
            raw.write_all(&open::<u64>(1)).unwrap();
            let limit = u64::from(WINDOW) + u64::from(MAX_FRAME) + 16;
            let body = vec![0u8; 64 * 1024];
            let one = frame(DATA, 0, 1, 0, &body);
            let mut bytes = Vec::new();
            while (bytes.len() as u64) < limit + 4 * one.len() as u64 {
                bytes.extend_from_slice(&one);
            }
            drop(write_in_background(raw, bytes));
        },
    );
}

/// Section 10: "GOAWAY with reason 1 (or 2 when a negotiated limit was exceeded)"; section 7
/// names reason 2 for a credit overrun.
#[test]

fn limit_violations_say_limits_exceeded() {
    hostile_case(&[LIMITS_EXCEEDED], "exceeded its credit", |raw| {
        raw.write_all(&open::<u64>(1)).unwrap();
        let one = frame(DATA, 0, 1, 0, &vec![0u8; 64 * 1024]);
        let mut bytes = Vec::new();
        while bytes.len() < 20 << 20 {
            bytes.extend_from_slice(&one);
        }
        drop(write_in_background(raw, bytes));
    });
    hostile_case(&[LIMITS_EXCEEDED], "max_message", |raw| {
        raw.write_all(&open::<u64>(1)).unwrap();
        raw.write_all(&header(MAX_MESSAGE + 1, DATA, 0, 1, 0))
            .unwrap();
    });
    hostile_case(&[LIMITS_EXCEEDED], "max_frame", |raw| {
        raw.write_all(&header(MAX_FRAME + 1, DATA, 0, 1, 0))
            .unwrap();
    });
}

/// A peer that sends PINGs and never reads cannot make the PONGs owed to it pile up without
/// bound: once they exceed the control-queue limit its session is closed, and others go on.
#[test]
fn ping_flood_from_a_peer_that_never_reads_closes_the_session() {
    with_timeout(Duration::from_secs(10), || {
        let healthy = Healthy::start();
        let (raw, session) = established();
        let driver = drive(session.clone());
        let ping = frame(6, 0, 0, 0, &[0x5a; 8]);
        // 4 MiB of PINGs: their PONGs fill the socket back to us (never read) and then the
        // queue, whose limit is 1 MiB.
        let bytes: Vec<u8> = ping
            .iter()
            .copied()
            .cycle()
            .take(ping.len() * 180_000)
            .collect();
        let writer = write_in_background(&raw, bytes);
        assert_broken(&session, driver, "does not read");
        drop(writer);
        healthy.check();
    });
}
