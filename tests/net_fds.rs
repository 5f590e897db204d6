//! Fds and byte streams over tcp sessions, which cannot carry descriptors: the library pumps
//! each one through two channels of the session (docs/PROTOCOL.md section 5.6), and the
//! receiver still gets an fd, one end of a socket pair.
//!
//! Every test counts this process's fds and threads before and after, so they run one at a
//! time (`alone`). The peer-death test re-executes this binary as the peer (`child_entry`, a
//! no-op in a normal run) and SIGKILLs it mid-stream.

mod common;

use std::fs::File;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    eventually, fd_count, frame, open, with_timeout, Header, Hello, KillOnDrop, CLOSE, CREDIT,
    DATA, GOAWAY, PING, PONG, RESET,
};
use libchan::{ByteStream, Fd, Options, Receiver, Sender, Session, Transport};

/// How long any test body may run.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a single blocking read or write in a test may take.
const PATIENCE: Duration = Duration::from_secs(10);
/// Bytes each way in the large-stream test.
const BIG: usize = 8 << 20;

/// A message carrying a plain fd.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Carry {
    tag: u32,
    fd: Fd,
}

/// A message carrying a byte stream.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Piped {
    stream: ByteStream,
}

static ALONE: Mutex<()> = Mutex::new(());

/// Runs tests one at a time: they count the process's fds and threads.
fn alone() -> MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps same-host tcp sessions on TCP (no upgrade to shared memory).
fn opts() -> Options {
    Options::new().shm(false)
}

/// Two sessions over loopback TCP: (connector, acceptor).
fn tcp_pair() -> (Session, Session) {
    let listener = libchan::listen_with("tcp://127.0.0.1:0", &opts()).expect("listen");
    let addr = listener.local_addr().expect("local_addr");
    let client = thread::spawn(move || libchan::connect_with(&addr, &opts()).expect("connect"));
    let server = listener.accept().expect("accept");
    let client = client.join().expect("connect thread");
    assert_eq!(
        (client.transport(), server.transport()),
        (Transport::Tcp, Transport::Tcp)
    );
    (client, server)
}

/// Runs a test body alone and within [`LIMIT`], on a fresh channel from one tcp session to
/// another; then checks that every fd and thread the body used is gone.
fn over_tcp<T: libchan::Message>(body: impl FnOnce(Sender<T>, Receiver<T>) + Send + 'static) {
    let _g = alone();
    with_timeout(LIMIT, || {
        let base = Baseline::take();
        let (a, b) = tcp_pair();
        let tx = a.open_channel::<T>().expect("open_channel");
        let rx = b.accept_channel_timeout::<T>(PATIENCE).expect("accept");
        body(tx, rx);
        drop((a, b));
        base.assert_back();
    });
}

/// Sends `fd` across (as message `tag`) and takes it out of the message at the far end.
fn carry(tx: &Sender<Carry>, rx: &Receiver<Carry>, tag: u32, fd: impl Into<OwnedFd>) -> OwnedFd {
    tx.send(Carry {
        tag,
        fd: Fd::new(fd),
    })
    .expect("send");
    let m = rx.recv_timeout(PATIENCE).expect("recv");
    assert_eq!(m.tag, tag);
    m.take(&m.fd).expect("take fd").into_owned_fd()
}

/// Writes `content` into `w` on a thread, then closes it; reads `r` to EOF here and checks
/// that exactly `content` came out.
fn round_trip(mut w: impl Write + Send + 'static, mut r: impl Read, content: &[u8]) {
    let c = content.to_vec();
    let writer = thread::spawn(move || w.write_all(&c).expect("write"));
    let mut got = Vec::new();
    r.read_to_end(&mut got).expect("read to EOF");
    writer.join().expect("writer");
    assert!(got == content, "{} of {} bytes", got.len(), content.len());
}

/// A write into a stream whose far end is gone fails with EPIPE, or with ECONNRESET when the
/// pump's end closed with our bytes still unread in it.
#[track_caller]
fn assert_broken_pipe(err: &io::Error) {
    assert!(
        matches!(
            err.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
        ),
        "{err}"
    );
}

/// libchan's threads in this process (all named `libchan-*`). Not every thread: the test
/// harness starts threads for other tests whenever a slot frees, and those are no leak.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("libchan"))
        .count()
}

/// This process's fds and threads when no session is open.
struct Baseline {
    fds: usize,
    threads: usize,
}

impl Baseline {
    /// Measured after one session came and went, so that what the library starts once per
    /// process (the keepalive watcher) is counted.
    fn take() -> Self {
        let (a, b) = tcp_pair();
        drop((a, b));
        let last = std::cell::Cell::new((0, 0));
        // Settled: two equal readings in a row.
        eventually(Duration::from_secs(5), || {
            thread::sleep(Duration::from_millis(20));
            let now = (fd_count(), thread_count());
            last.replace(now) == now
        });
        let (fds, threads) = last.get();
        Baseline { fds, threads }
    }

    /// Asserts that the fds and threads return to the baseline (pump threads end, sockets
    /// close) within a few seconds.
    #[track_caller]
    fn assert_back(&self) {
        let back = eventually(Duration::from_secs(5), || {
            fd_count() <= self.fds && thread_count() <= self.threads
        });
        assert!(
            back,
            "fds {} (baseline {}), threads {} (baseline {})",
            fd_count(),
            self.fds,
            thread_count(),
            self.threads
        );
    }
}

/// Byte `i` of the test streams (`seed` tells the two directions apart).
fn byte_at(seed: u8, i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ (i >> 11) as u8 ^ seed
}

fn pattern(seed: u8, from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| byte_at(seed, i)).collect()
}

/// Writes bytes `from..to` of stream `seed`.
fn write_range(w: &mut impl Write, seed: u8, from: usize, to: usize) {
    let mut at = from;
    while at < to {
        let n = (to - at).min(100_000);
        w.write_all(&pattern(seed, at, n)).expect("stream write");
        at += n;
    }
}

/// Reads exactly `len` bytes of stream `seed`, checking each, then expects EOF.
fn read_and_check(r: &mut impl Read, seed: u8, len: usize) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0;
    while at < len {
        let n = r.read(&mut buf).expect("stream read");
        assert!(n > 0, "EOF after {at} of {len} bytes");
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                byte_at(seed, at + k),
                "byte {} of stream {seed}",
                at + k
            );
        }
        at += n;
    }
    assert_eq!(at, len, "more bytes than sent");
    assert_eq!(r.read(&mut buf).expect("read at end"), 0, "EOF expected");
}

/// A memfd's content, from its current offset, arrives over tcp as a socket that reads EOF
/// after the last byte.
#[test]
fn memfd_content_arrives_over_tcp() {
    over_tcp(|tx, rx| {
        let content = pattern(7, 0, 300_000);
        let memfd = rustix::fs::memfd_create("net-fds", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        let mut file = File::from(memfd);
        file.write_all(&content).expect("fill memfd");
        file.seek(SeekFrom::Start(1000)).expect("seek");

        let got = File::from(carry(&tx, &rx, 9, file));
        assert!(
            got.metadata().expect("fstat").file_type().is_socket(),
            "a pumped fd arrives as a socket"
        );
        let mut got = UnixStream::from(OwnedFd::from(got));
        got.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut bytes = Vec::new();
        got.read_to_end(&mut bytes).expect("read to EOF");
        assert_eq!(bytes.len(), content.len() - 1000);
        assert!(bytes == content[1000..], "content differs");
    });
}

/// One end of a socket pair sent over tcp talks both ways, and each direction closes on its
/// own (half-close), as the socket itself would.
#[test]
fn socketpair_end_talks_both_ways_over_tcp() {
    over_tcp(|tx, rx| {
        let (mine, theirs) = UnixStream::pair().expect("socketpair");
        mine.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let far = UnixStream::from(carry(&tx, &rx, 1, theirs));
        far.set_read_timeout(Some(PATIENCE)).expect("timeout");

        (&mine).write_all("ping über tcp ✓\n".as_bytes()).unwrap();
        let mut far_lines = BufReader::new(&far);
        let mut line = String::new();
        far_lines.read_line(&mut line).expect("far reads");
        assert_eq!(line, "ping über tcp ✓\n");
        (&far).write_all(b"pong\n").unwrap();
        let mut mine_lines = BufReader::new(&mine);
        line.clear();
        mine_lines.read_line(&mut line).expect("mine reads");
        assert_eq!(line, "pong\n");

        // The far end stops writing: this end reads EOF, and can still write.
        far.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        mine_lines
            .read_to_end(&mut rest)
            .expect("mine reads to EOF");
        assert!(rest.is_empty(), "nothing after pong: {rest:?}");
        (&mine).write_all(b"still open\n").unwrap();
        line.clear();
        far_lines
            .read_line(&mut line)
            .expect("far reads after its shutdown");
        assert_eq!(line, "still open\n");
        // Then this end stops writing too.
        mine.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        far_lines.read_to_end(&mut rest).expect("far reads to EOF");
        assert!(rest.is_empty());
    });
}

/// A file opened read-only arrives readable, but the far end's writes fail (EPIPE), as
/// writing to the file would.
#[test]
fn read_only_file_refuses_writes_over_tcp() {
    over_tcp(|tx, rx| {
        let path = std::env::temp_dir().join(format!("libchan-net-fds-{}", std::process::id()));
        std::fs::write(&path, b"read-only content").expect("write temp file");
        let file = File::open(&path).expect("open read-only");
        std::fs::remove_file(&path).expect("unlink");
        let mut far = UnixStream::from(carry(&tx, &rx, 2, file));
        far.set_read_timeout(Some(PATIENCE)).expect("timeout");
        far.set_write_timeout(Some(PATIENCE)).expect("timeout");
        let mut got = String::new();
        far.read_to_string(&mut got).expect("read");
        assert_eq!(got, "read-only content");
        let deadline = Instant::now() + PATIENCE;
        let err = loop {
            match far.write_all(b"into a read-only file") {
                Ok(()) => {
                    assert!(Instant::now() < deadline, "writes never failed");
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => break e,
            }
        };
        assert_broken_pipe(&err);
    });
}

/// Pipe ends over tcp: what the far side writes into a pipe's write end comes out of its read
/// end here, and the far side reads what is written into a pipe whose read end it got; closing
/// either end is EOF at the other.
#[test]
fn pipe_ends_over_tcp() {
    over_tcp(|tx, rx| {
        let content = pattern(3, 0, 200_000);

        // The far side writes into the write end.
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        let far = File::from(carry(&tx, &rx, 1, w));
        round_trip(far, File::from(r), &content);

        // The far side reads from the read end.
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        let far = UnixStream::from(carry(&tx, &rx, 2, r));
        far.set_read_timeout(Some(PATIENCE)).expect("timeout");
        round_trip(File::from(w), &far, &content);
    });
}

/// A ByteStream over tcp carries 8 MiB each way at once. Before anyone reads, a writer can
/// push only a bounded amount into it (the stream's credit window and the socket buffers):
/// the pump waits for credit rather than buffering everything.
#[test]
fn byte_stream_carries_8_mib_both_ways_with_bounded_memory() {
    over_tcp(|tx: Sender<Piped>, rx| {
        let (mine, theirs) = ByteStream::pair().expect("pair");
        tx.send(Piped { stream: theirs }).expect("send");
        let m = rx.recv_timeout(PATIENCE).expect("recv");
        let far = m.take(&m.stream).expect("take").into_unix_stream();
        drop(m);
        let mine = mine.into_unix_stream();

        // Nobody reads at the far end: writes stop being taken after a bounded amount.
        mine.set_nonblocking(true).expect("nonblocking");
        let mut taken = 0;
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < Duration::from_millis(300) {
            let chunk = pattern(1, taken, 64 * 1024);
            match (&mine).write(&chunk) {
                Ok(n) => {
                    taken += n;
                    idle_since = Instant::now();
                    assert!(taken < BIG, "the stream took all {taken} bytes unread");
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        eprintln!("unread, the stream took {taken} bytes");
        assert!(
            (64 * 1024..3 << 20).contains(&taken),
            "{taken} bytes in flight: the window should bound it"
        );
        mine.set_nonblocking(false).expect("blocking");

        let started = Instant::now();
        let mut w_mine = mine.try_clone().unwrap();
        let mut w_far = far.try_clone().unwrap();
        let writers = [
            thread::spawn(move || {
                write_range(&mut w_mine, 1, taken, BIG);
                w_mine.shutdown(std::net::Shutdown::Write).unwrap();
            }),
            thread::spawn(move || {
                write_range(&mut w_far, 2, 0, BIG);
                w_far.shutdown(std::net::Shutdown::Write).unwrap();
            }),
        ];
        let mut r_far = far.try_clone().unwrap();
        let far_reader = thread::spawn(move || read_and_check(&mut r_far, 1, BIG));
        read_and_check(&mut (&mine), 2, BIG);
        far_reader.join().expect("far reader");
        for w in writers {
            w.join().expect("writer");
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "8 MiB each way over loopback tcp in {secs:.3} s: {:.0} MiB/s per direction",
            BIG as f64 / (1 << 20) as f64 / secs
        );
    });
}

/// The peer process is SIGKILLed mid-stream: this end of the stream reads EOF (or an error)
/// and its writes fail, within seconds, and every pump thread and fd goes away.
#[test]
fn peer_killed_mid_stream_ends_the_stream() {
    let _g = alone();
    with_timeout(LIMIT, || {
        let base = Baseline::take();
        let listener = libchan::listen_with("tcp://127.0.0.1:0", &opts()).expect("listen");
        let addr = listener.local_addr().expect("local_addr");
        let child = common::child_command("LIBCHAN_NET_FDS", "sink", &addr).spawn();
        let mut kid = KillOnDrop(child.expect("spawn the child process"));
        let session = listener.accept().expect("accept");
        drop(listener);
        assert_eq!(session.transport(), Transport::Tcp);
        let tx = session.open_channel::<Piped>().expect("open");
        let (mine, theirs) = ByteStream::pair().expect("pair");
        tx.send(Piped { stream: theirs }).expect("send");
        let mine = mine.into_unix_stream();
        mine.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut line = String::new();
        BufReader::new(&mine)
            .read_line(&mut line)
            .expect("the child says it is ready");
        assert_eq!(line, "ready\n");

        // Mid-stream: a writer pushes until the (unread) stream stops taking bytes.
        let mut w = mine.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let chunk = vec![5u8; 64 * 1024];
            loop {
                if let Err(e) = w.write_all(&chunk) {
                    return e;
                }
            }
        });
        thread::sleep(Duration::from_millis(200));
        kid.0.kill().expect("kill the child");
        let _ = kid.0.wait();

        let started = Instant::now();
        let mut buf = [0u8; 16];
        match (&mine).read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("read {n} bytes from a dead peer"),
            Err(e) => assert_ne!(e.kind(), ErrorKind::WouldBlock, "read timed out: {e}"),
        }
        let err = writer.join().expect("writer thread");
        assert_broken_pipe(&err);
        eprintln!("the stream ended {:?} after the kill", started.elapsed());
        assert!(session.is_closed(), "the session saw its peer die");
        drop((mine, tx, session));
        base.assert_back();
    });
}

// ---------------------------------------------------------------------------------------------
// The wire, spoken by hand (docs/PROTOCOL.md sections 5.6 and 8.2)
// ---------------------------------------------------------------------------------------------

/// A raw TCP peer of a session: our hello (no features) is sent and the session's read.
fn raw_peer() -> (std::net::TcpStream, Session) {
    let listener = libchan::listen_with("tcp://127.0.0.1:0", &opts()).expect("listen");
    let addr = listener.local_addr().expect("local_addr");
    let mut raw = std::net::TcpStream::connect(addr.trim_start_matches("tcp://")).expect("connect");
    raw.write_all(&Hello::network().bytes()).expect("hello");
    let session = listener.accept().expect("handshake");
    raw.set_read_timeout(Some(PATIENCE)).expect("timeout");
    common::read_hello(&mut raw);
    (raw, session)
}

/// A PUMPED descriptor: `a` from us to the session, `b` back, handed over as an FD.
fn pumped_desc(a: u32, b: u32) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0] = 7;
    d[4..8].copy_from_slice(&a.to_le_bytes());
    d[8..12].copy_from_slice(&b.to_le_bytes());
    d[12] = 1;
    d
}

/// A RECEIVER descriptor for channel `chan` of type `fp`.
fn receiver_desc(chan: u32, fp: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0] = 4;
    d[4..8].copy_from_slice(&chan.to_le_bytes());
    d[8..16].copy_from_slice(&fp.to_le_bytes());
    d
}

/// Reads frames until `stop` says so; returns every `(kind, chan, arg)` read.
fn read_frames(
    raw: &mut impl Read,
    mut stop: impl FnMut(u8, u32, u32) -> bool,
) -> Vec<(u8, u32, u32)> {
    let mut seen = Vec::new();
    loop {
        let mut h = [0u8; 16];
        raw.read_exact(&mut h)
            .unwrap_or_else(|e| panic!("after {seen:?}: {e}"));
        let Header {
            len,
            kind,
            chan,
            arg,
        } = Header::parse(&h).expect("16 bytes");
        let mut body = vec![0u8; len];
        raw.read_exact(&mut body).expect("frame body");
        seen.push((kind, chan, arg));
        if stop(kind, chan, arg) {
            return seen;
        }
    }
}

/// A message with a pumped fd that arrives on a channel the receiver has reset is discarded,
/// but the two channels it opens exist: the peer may already send on them. They are reset and
/// closed at once, and the session goes on.
#[test]
fn pumped_stream_in_a_discarded_message_still_opens_its_channels() {
    let _g = alone();
    with_timeout(LIMIT, || {
        let (mut raw, session) = raw_peer();
        raw.write_all(&open::<u64>(1)).unwrap();
        let rx = session
            .accept_channel_timeout::<u64>(PATIENCE)
            .expect("accept");
        drop(rx);
        read_frames(&mut raw, |k, c, _| (k, c) == (RESET, 1));

        let mut body = pumped_desc(3, 5).to_vec();
        body.extend_from_slice(&42u64.to_le_bytes());
        raw.write_all(&frame(DATA, 0, 1, 1, &body)).unwrap();
        // The pump's first bytes, on the channel the discarded frame opened.
        raw.write_all(&frame(DATA, 0, 3, 0, b"hello")).unwrap();
        raw.write_all(&frame(PING, 0, 0, 0, &7u64.to_le_bytes()))
            .unwrap();
        let seen = read_frames(&mut raw, |k, _, _| k == PONG || k == GOAWAY);
        assert!(
            !seen.iter().any(|f| f.0 == GOAWAY),
            "session ended: {seen:?}"
        );
        assert!(seen.contains(&(RESET, 3, 2)), "channel 3 reset: {seen:?}");
        assert!(seen.contains(&(CLOSE, 5, 0)), "channel 5 closed: {seen:?}");
        assert!(seen.contains(&(CREDIT, 1, 16 + 16 + 8)), "credit: {seen:?}");
        assert!(!session.is_closed());
    });
}

/// A frame whose second descriptor (PUMPED) reuses the channel its first one opened is a
/// protocol error: the session ends with GOAWAY, and dropping the handle the first descriptor
/// made (which ends its channel) does not deadlock the session on its own table.
#[test]
fn reused_channel_id_in_one_frame_ends_the_session() {
    let _g = alone();
    with_timeout(LIMIT, || {
        let (mut raw, session) = raw_peer();
        let fp = libchan::fingerprint::<u64>();
        raw.write_all(&open::<u64>(1)).unwrap();
        let rx = session
            .accept_channel_timeout::<u64>(PATIENCE)
            .expect("accept");
        let mut body = receiver_desc(3, fp).to_vec();
        body.extend_from_slice(&pumped_desc(5, 3));
        body.extend_from_slice(&42u64.to_le_bytes());
        raw.write_all(&frame(DATA, 0, 1, 2, &body)).unwrap();
        match rx.recv_timeout(PATIENCE) {
            Err(libchan::RecvTimeoutError::Disconnected) => {}
            other => panic!("expected Disconnected, got {:?}", other.map(|m| *m)),
        }
        let seen = read_frames(&mut raw, |k, _, _| k == GOAWAY);
        assert_eq!(seen.last(), Some(&(GOAWAY, 0, 1)), "protocol error");
        assert!(session.is_closed());
        let reason = session.close_reason().unwrap_or_default();
        assert!(reason.contains("already in use"), "{reason}");
    });
}

/// Entry point of the child processes; a no-op when the test binary runs normally.
#[test]
fn child_entry() {
    let Some((role, addr)) = common::child_role("LIBCHAN_NET_FDS", Duration::from_secs(20)) else {
        return;
    };
    match role.as_str() {
        // Takes the stream, says it is ready, then never reads: the parent's writes pile up
        // until it is killed.
        "sink" => {
            let session = libchan::connect_with(&addr, &opts()).expect("connect");
            let rx = session
                .accept_channel_timeout::<Piped>(PATIENCE)
                .expect("accept");
            let m = rx.recv_timeout(PATIENCE).expect("recv");
            let mut stream = m.take(&m.stream).expect("take");
            stream.write_all(b"ready\n").expect("write");
            thread::sleep(Duration::from_secs(30));
            drop((stream, m, rx, session));
        }
        other => panic!("unknown child role {other}"),
    }
}
