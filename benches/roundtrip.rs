//! Round trip of a 64-byte payload: libchan over mem (two threads) and over unix (two
//! processes), each next to its floor (crossbeam bounded channel, raw unix socket), all in
//! one criterion group so the report shows them side by side.
//!
//! Run with `cargo bench --bench roundtrip` (about a minute). Each function is timed with
//! `iter_custom`: one iteration is one round trip (send 64 B, the peer reads every byte and
//! sends the 64 B back, read every byte of the answer).
//!
//! The unix peers are real processes: the bench binary re-executes itself
//! (`std::env::current_exe()`) with `LIBCHAN_BENCH_CHILD=chan|raw` in its environment and one
//! end of a socket pair as its stdin. `main` checks that variable before criterion starts;
//! the child then echoes until the socket closes and exits. The two sides are pinned to the
//! first two CPUs this process may use (`LIBCHAN_BENCH_CPU` tells the child which one).

use std::hint::black_box;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::Criterion;
use libchan::{Receiver, RecvError, Role, Sender, Session};

/// Set in a re-executed child: its role (`chan` or `raw`).
const CHILD_ENV: &str = "LIBCHAN_BENCH_CHILD";
/// Set in a re-executed child: the CPU to pin to.
const CPU_ENV: &str = "LIBCHAN_BENCH_CPU";
/// Payload size.
const SIZE: usize = 64;
/// Raw floor frame header: u32 length of what follows, u64 sequence number.
const RAW_HDR: usize = 12;

#[derive(libchan::rkyv::Archive, libchan::rkyv::Serialize, libchan::rkyv::Deserialize)]
#[rkyv(crate = libchan::rkyv)]
struct Payload {
    seq: u64,
    data: Vec<u8>,
}

/// Reads every byte of a payload and checks it is `seq as u8` repeated.
fn touch_check(seq: u64, data: &[u8]) {
    let sum: u64 = black_box(data).iter().map(|&b| u64::from(b)).sum();
    assert_eq!(
        black_box(sum),
        u64::from(seq as u8) * data.len() as u64,
        "payload {seq} is corrupt"
    );
}

/// The measuring side of a link.
trait RoundTrip {
    /// One round trip of message `seq`.
    fn round_trip(&mut self, seq: u64);
}

/// The peer side of a link.
trait Echo {
    /// Echoes one message back; `false` once the other side closed.
    fn echo(&mut self) -> bool;
}

struct ChanLink {
    tx: Sender<Payload>,
    rx: Receiver<Payload>,
}

impl RoundTrip for ChanLink {
    fn round_trip(&mut self, seq: u64) {
        let data = vec![seq as u8; SIZE];
        if self.tx.send(Payload { seq, data }).is_err() {
            panic!("libchan send failed");
        }
        let m = self.rx.recv().expect("libchan recv");
        assert_eq!(m.seq.to_native(), seq);
        touch_check(seq, m.data.as_slice());
    }
}

impl Echo for ChanLink {
    fn echo(&mut self) -> bool {
        match self.rx.recv() {
            Ok(m) => {
                let seq = m.seq.to_native();
                touch_check(seq, m.data.as_slice());
                let data = m.data.as_slice().to_vec();
                drop(m);
                self.tx.send(Payload { seq, data }).is_ok()
            }
            Err(RecvError::Closed | RecvError::Disconnected) => false,
            Err(e) => panic!("libchan recv: {e}"),
        }
    }
}

struct CrossbeamLink {
    tx: crossbeam_channel::Sender<(u64, Vec<u8>)>,
    rx: crossbeam_channel::Receiver<(u64, Vec<u8>)>,
}

impl RoundTrip for CrossbeamLink {
    fn round_trip(&mut self, seq: u64) {
        self.tx.send((seq, vec![seq as u8; SIZE])).expect("send");
        let (s, data) = self.rx.recv().expect("recv");
        assert_eq!(s, seq);
        touch_check(seq, &data);
    }
}

impl Echo for CrossbeamLink {
    fn echo(&mut self) -> bool {
        match self.rx.recv() {
            Ok((seq, data)) => {
                touch_check(seq, &data);
                self.tx.send((seq, data)).is_ok()
            }
            Err(_) => false,
        }
    }
}

/// Length-prefixed frames over a raw unix socket: `BufReader` + `read_exact`, one
/// `write_all` per frame.
struct RawLink {
    r: BufReader<UnixStream>,
    w: UnixStream,
    buf: [u8; RAW_HDR + SIZE],
}

impl RawLink {
    fn new(s: UnixStream) -> Self {
        let w = s.try_clone().expect("dup socket");
        RawLink {
            r: BufReader::with_capacity(16 * 1024, s),
            w,
            buf: [0; RAW_HDR + SIZE],
        }
    }

    /// Reads one frame into `buf`; `None` at end of stream.
    fn read_frame(&mut self) -> Option<u64> {
        match self.r.read_exact(&mut self.buf[..RAW_HDR]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return None,
            Err(e) => panic!("raw read: {e}"),
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, 8 + SIZE, "raw frame length");
        let seq = u64::from_le_bytes(self.buf[4..RAW_HDR].try_into().unwrap());
        self.r
            .read_exact(&mut self.buf[RAW_HDR..])
            .expect("raw read");
        touch_check(seq, &self.buf[RAW_HDR..]);
        Some(seq)
    }
}

impl RoundTrip for RawLink {
    fn round_trip(&mut self, seq: u64) {
        self.buf[..4].copy_from_slice(&((8 + SIZE) as u32).to_le_bytes());
        self.buf[4..RAW_HDR].copy_from_slice(&seq.to_le_bytes());
        self.buf[RAW_HDR..].fill(seq as u8);
        self.w.write_all(&self.buf).expect("raw write");
        assert_eq!(self.read_frame(), Some(seq));
    }
}

impl Echo for RawLink {
    fn echo(&mut self) -> bool {
        match self.read_frame() {
            Some(_) => self.w.write_all(&self.buf).is_ok(),
            None => false,
        }
    }
}

fn allowed_cpus() -> Vec<usize> {
    let set = rustix::thread::sched_getaffinity(None).expect("sched_getaffinity");
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect()
}

fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).expect("sched_setaffinity");
}

/// A measuring link with its peer thread, joined on drop (after the link closes).
struct ThreadPeer<L> {
    link: L,
    _join: JoinOnDrop,
}

struct JoinOnDrop(Option<JoinHandle<()>>);

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            if t.join().is_err() && !thread::panicking() {
                panic!("echo thread panicked");
            }
        }
    }
}

fn thread_peer<L: RoundTrip, P: Echo + Send + 'static>(
    link: L,
    mut peer: P,
    cpu: usize,
) -> ThreadPeer<L> {
    let t = thread::spawn(move || {
        pin(cpu);
        while peer.echo() {}
    });
    ThreadPeer {
        link,
        _join: JoinOnDrop(Some(t)),
    }
}

/// A measuring link with its peer process, reaped on drop (after the link closes).
struct ProcPeer<L> {
    link: L,
    _child: ChildGuard,
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        eprintln!("roundtrip: echo child exited with {status}");
                    }
                    return;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
                _ => {
                    eprintln!("roundtrip: echo child did not exit; killing it");
                    let _ = self.0.kill();
                    let _ = self.0.wait();
                    return;
                }
            }
        }
    }
}

/// Re-executes this bench binary as an echo child with `role`; returns our end of its socket.
fn spawn_child(role: &str, cpu: usize) -> (ChildGuard, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let child = Command::new(std::env::current_exe().expect("current_exe"))
        .env(CHILD_ENV, role)
        .env(CPU_ENV, cpu.to_string())
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn echo child");
    (ChildGuard(child), ours)
}

/// The re-executed child: echo over the socket on stdin until it closes.
fn child_main(role: &str) {
    if let Some(cpu) = std::env::var(CPU_ENV).ok().and_then(|c| c.parse().ok()) {
        pin(cpu);
    }
    let fd = io::stdin().as_fd().try_clone_to_owned().expect("dup stdin");
    let sock = UnixStream::from(fd);
    match role {
        "chan" => {
            let session = Session::from_unix_stream_with(sock, Role::Acceptor, &unix_only())
                .expect("handshake");
            let rx = session
                .accept_channel_timeout::<Payload>(Duration::from_secs(10))
                .expect("accept_channel");
            let tx = session.open_channel::<Payload>().expect("open_channel");
            let mut link = ChanLink { tx, rx };
            while link.echo() {}
        }
        "raw" => {
            let mut link = RawLink::new(sock);
            while link.echo() {}
        }
        r => panic!("unknown {CHILD_ENV} role {r:?}"),
    }
}

/// Times `iters` round trips.
fn time_round_trips<L: RoundTrip>(link: &mut L, seq: &mut u64, iters: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        link.round_trip(*seq);
        *seq += 1;
    }
    t.elapsed()
}

fn roundtrip(c: &mut Criterion, cpus: (usize, usize)) {
    let mut g = c.benchmark_group("roundtrip_64B");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    // Peers start on first use, so a filtered-out function spawns nothing, and stop when
    // their `Option` is dropped at the end of this function.
    let mut seq = 0u64;

    let mut mem: Option<ThreadPeer<ChanLink>> = None;
    g.bench_function("mem/libchan", |b| {
        let p = mem.get_or_insert_with(|| {
            let (atx, arx) = libchan::pipe::<Payload>();
            let (btx, brx) = libchan::pipe::<Payload>();
            thread_peer(
                ChanLink { tx: atx, rx: brx },
                ChanLink { tx: btx, rx: arx },
                cpus.1,
            )
        });
        b.iter_custom(|iters| time_round_trips(&mut p.link, &mut seq, iters));
    });
    drop(mem);

    let mut cb: Option<ThreadPeer<CrossbeamLink>> = None;
    g.bench_function("mem/crossbeam_floor", |b| {
        let p = cb.get_or_insert_with(|| {
            let (atx, arx) = crossbeam_channel::bounded(256);
            let (btx, brx) = crossbeam_channel::bounded(256);
            let main = CrossbeamLink { tx: atx, rx: brx };
            thread_peer(main, CrossbeamLink { tx: btx, rx: arx }, cpus.1)
        });
        b.iter_custom(|iters| time_round_trips(&mut p.link, &mut seq, iters));
    });
    drop(cb);

    let mut unix: Option<ProcPeer<ChanLink>> = None;
    g.bench_function("unix/libchan", |b| {
        let p = unix.get_or_insert_with(|| {
            let (child, sock) = spawn_child("chan", cpus.1);
            let session = Session::from_unix_stream_with(sock, Role::Connector, &unix_only())
                .expect("handshake");
            let tx = session.open_channel::<Payload>().expect("open_channel");
            let rx = session
                .accept_channel_timeout::<Payload>(Duration::from_secs(10))
                .expect("accept_channel");
            ProcPeer {
                link: ChanLink { tx, rx },
                _child: child,
            }
        });
        b.iter_custom(|iters| time_round_trips(&mut p.link, &mut seq, iters));
    });
    drop(unix);

    let mut raw: Option<ProcPeer<RawLink>> = None;
    g.bench_function("unix/raw_floor", |b| {
        let p = raw.get_or_insert_with(|| {
            let (child, sock) = spawn_child("raw", cpus.1);
            ProcPeer {
                link: RawLink::new(sock),
                _child: child,
            }
        });
        b.iter_custom(|iters| time_round_trips(&mut p.link, &mut seq, iters));
    });
    drop(raw);

    g.finish();
}

fn main() {
    if let Ok(role) = std::env::var(CHILD_ENV) {
        child_main(&role);
        return;
    }
    let allowed = allowed_cpus();
    let cpus = match allowed.as_slice() {
        [a, b, ..] => (*a, *b),
        [a] => {
            eprintln!("roundtrip: only one CPU ({a}) available: both sides share it");
            (*a, *a)
        }
        [] => panic!("empty affinity mask"),
    };
    pin(cpus.0);
    let mut c = Criterion::default().configure_from_args();
    roundtrip(&mut c, cpus);
    c.final_summary();
}

/// The plain unix transport: same-uid sessions would otherwise move to shared memory.
fn unix_only() -> libchan::Options {
    libchan::Options::new().shm(false)
}
