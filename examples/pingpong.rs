//! Ping-pong and streaming benchmark of libchan transports, measured against their floors.
//!
//! ```text
//! cargo run --release --example pingpong -- --transport mem|unix --size N
//!     [--iters K] [--warmup W] [--mode rtt|stream] [--json]
//! ```
//!
//! `--transport`, `--size` and `--mode` also take comma-separated lists (`--size 64,64k`).
//!
//! * `mem`: two threads in this process, a `libchan::pipe` each way. Floor: a
//!   `crossbeam_channel::bounded(256)` each way carrying `(u64, Vec<u8>)` of the same size.
//! * `unix`: two real processes. The parent makes a socket pair and re-executes itself with
//!   a hidden `--child ROLE ...` argument and the other end of the pair as the child's stdin;
//!   both ends run `Session::from_unix_stream`. Floor: the same two processes exchanging
//!   length-prefixed frames over the raw socket (std `UnixStream`, `BufReader` +
//!   `read_exact`, one `write_all` per message).
//!
//! The two sides are pinned to two different CPUs (the first two this process may run on).
//! Whoever receives a message reads every byte of it (sums it) and checks the sum.
//!
//! * `rtt`: K round trips after W warm-up ones; each round trip is timed on its own and the
//!   echo carries the whole payload back. Reports p50, p99, mean and round trips/s.
//! * `stream`: K messages one way (after W warm-up ones), then one acknowledgement back;
//!   the clock runs from the first message to the acknowledgement. Reports msgs/s, bytes/s.
//!
//! A later transport (shm, tcp, tls) plugs in as a [`TransportKind`] variant: it needs a way to
//! build a [`ChanLink`] on both sides and a floor [`Link`]; the drivers are generic.

use std::error::Error as StdError;
use std::hint::black_box;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use libchan::{Receiver, RecvError, Role, Sender, Session};

type Res<T> = Result<T, Box<dyn StdError + Send + Sync>>;

/// The message every libchan run carries: a sequence number and `size` payload bytes.
#[derive(libchan::rkyv::Archive, libchan::rkyv::Serialize, libchan::rkyv::Deserialize)]
#[rkyv(crate = libchan::rkyv)]
struct Payload {
    seq: u64,
    data: Vec<u8>,
}

/// How long the parent waits for a finished child to exit before killing it.
const CHILD_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session handshake / first channel may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer of the raw-socket floor.
const RAW_READ_BUF: usize = 16 * 1024;
/// Raw floor frame header: u32 length (of what follows), u64 sequence number.
const RAW_HDR: usize = 12;

// ---------------------------------------------------------------------------------------
// Payload helpers shared by every link.

/// A fresh payload: `size` bytes of `seq as u8`.
fn fill(seq: u64, size: usize) -> Vec<u8> {
    vec![seq as u8; size]
}

/// Reads every byte of `data` and checks it is what [`fill`] wrote for `seq`.
fn touch_check(seq: u64, data: &[u8]) -> Res<()> {
    let sum: u64 = black_box(data).iter().map(|&b| u64::from(b)).sum();
    let want = u64::from(seq as u8) * data.len() as u64;
    if black_box(sum) != want {
        return Err(format!("payload of message {seq} is corrupt (sum {sum}, want {want})").into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Links: one side of a two-way connection carrying (seq, N bytes) messages.

/// One side of a two-way message link. Implemented for libchan, crossbeam and raw sockets;
/// the benchmark drivers are generic over it.
trait Link {
    /// Sends a fresh message of `size` bytes.
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()>;
    /// Receives one message, reads and checks every byte; `None` when the peer closed.
    fn recv_check(&mut self) -> Res<Option<(u64, usize)>>;
    /// Receives one message, checks it and sends the same bytes back; `false` on close.
    fn echo(&mut self) -> Res<bool>;
}

/// libchan, on any transport: a sender and a receiver of [`Payload`].
struct ChanLink {
    tx: Sender<Payload>,
    rx: Receiver<Payload>,
}

impl Link for ChanLink {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        let data = fill(seq, size);
        self.tx
            .send(Payload { seq, data })
            .map_err(|e| format!("libchan send: {e}").into())
    }

    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        match self.rx.recv() {
            Ok(m) => {
                let seq = m.seq.to_native();
                let data = m.data.as_slice();
                touch_check(seq, data)?;
                Ok(Some((seq, data.len())))
            }
            Err(RecvError::Closed | RecvError::Disconnected) => Ok(None),
            Err(e) => Err(format!("libchan recv: {e}").into()),
        }
    }

    fn echo(&mut self) -> Res<bool> {
        match self.rx.recv() {
            Ok(m) => {
                let seq = m.seq.to_native();
                touch_check(seq, m.data.as_slice())?;
                let data = m.data.as_slice().to_vec();
                drop(m);
                self.tx
                    .send(Payload { seq, data })
                    .map_err(|e| format!("libchan send: {e}"))?;
                Ok(true)
            }
            Err(RecvError::Closed | RecvError::Disconnected) => Ok(false),
            Err(e) => Err(format!("libchan recv: {e}").into()),
        }
    }
}

/// The mem floor: crossbeam bounded channels carrying `(seq, Vec<u8>)`.
struct CrossbeamLink {
    tx: crossbeam_channel::Sender<(u64, Vec<u8>)>,
    rx: crossbeam_channel::Receiver<(u64, Vec<u8>)>,
}

impl Link for CrossbeamLink {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        self.tx
            .send((seq, fill(seq, size)))
            .map_err(|_| "crossbeam send: disconnected".into())
    }

    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        match self.rx.recv() {
            Ok((seq, data)) => {
                touch_check(seq, &data)?;
                Ok(Some((seq, data.len())))
            }
            Err(_) => Ok(None),
        }
    }

    fn echo(&mut self) -> Res<bool> {
        match self.rx.recv() {
            Ok((seq, data)) => {
                touch_check(seq, &data)?;
                self.tx
                    .send((seq, data))
                    .map_err(|_| "crossbeam send: disconnected")?;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }
}

/// The socket floor: length-prefixed frames over a raw byte stream (unix now, tcp later).
struct RawLink<S: Read + Write> {
    r: BufReader<S>,
    w: S,
    /// Header + payload of the last frame received or sent.
    buf: Vec<u8>,
}

impl RawLink<UnixStream> {
    fn new(s: UnixStream) -> io::Result<Self> {
        let w = s.try_clone()?;
        Ok(RawLink {
            r: BufReader::with_capacity(RAW_READ_BUF, s),
            w,
            buf: Vec::new(),
        })
    }
}

impl<S: Read + Write> RawLink<S> {
    /// Reads one frame into `buf`; `None` at a clean end of stream.
    fn read_frame(&mut self) -> Res<Option<(u64, usize)>> {
        let mut hdr = [0u8; RAW_HDR];
        match self.r.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(hdr[..4].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(hdr[4..].try_into().unwrap());
        let n = len.checked_sub(8).ok_or("raw frame: bad length")?;
        if self.buf.len() < RAW_HDR + n {
            self.buf.resize(RAW_HDR + n, 0);
        }
        self.buf[..RAW_HDR].copy_from_slice(&hdr);
        self.r.read_exact(&mut self.buf[RAW_HDR..RAW_HDR + n])?;
        touch_check(seq, &self.buf[RAW_HDR..RAW_HDR + n])?;
        Ok(Some((seq, n)))
    }
}

impl<S: Read + Write> Link for RawLink<S> {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        let len = u32::try_from(8 + size).map_err(|_| "raw frame: too large")?;
        self.buf.clear();
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.resize(RAW_HDR + size, seq as u8);
        self.w.write_all(&self.buf)?;
        Ok(())
    }

    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        self.read_frame()
    }

    fn echo(&mut self) -> Res<bool> {
        match self.read_frame()? {
            Some((_, n)) => {
                self.w.write_all(&self.buf[..RAW_HDR + n])?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Drivers, generic over the link.

/// What the measuring side brings back.
enum Measured {
    /// One duration per round trip, in ns.
    Rtt(Vec<u64>),
    /// Time for the whole measured stream, acknowledgement included.
    Stream(Duration),
}

fn expect_msg(got: Option<(u64, usize)>, seq: u64, size: usize) -> Res<()> {
    match got {
        Some((s, n)) if s == seq && n == size => Ok(()),
        Some((s, n)) => Err(format!("expected message {seq} of {size} B, got {s} of {n} B").into()),
        None => Err(format!("peer closed while waiting for message {seq}").into()),
    }
}

/// The measuring side.
fn drive<L: Link>(
    l: &mut L,
    mode: Mode,
    size: usize,
    warmup: usize,
    iters: usize,
) -> Res<Measured> {
    match mode {
        Mode::Rtt => {
            let mut samples = Vec::with_capacity(iters);
            let mut last_report = Instant::now();
            for i in 0..warmup + iters {
                let seq = i as u64;
                let t0 = Instant::now();
                l.send_new(seq, size)?;
                let got = l.recv_check()?;
                let dt = t0.elapsed();
                expect_msg(got, seq, size)?;
                if i >= warmup {
                    samples.push(dt.as_nanos() as u64);
                }
                if i % 1024 == 0 && last_report.elapsed() > Duration::from_secs(2) {
                    eprintln!("pingpong:   {i}/{} round trips", warmup + iters);
                    last_report = Instant::now();
                }
            }
            Ok(Measured::Rtt(samples))
        }
        Mode::Stream => {
            for i in 0..warmup {
                l.send_new(i as u64, size)?;
            }
            expect_msg(l.recv_check()?, warmup as u64, 0)?;
            let t0 = Instant::now();
            for i in warmup..warmup + iters {
                l.send_new(i as u64, size)?;
            }
            let got = l.recv_check()?;
            let dt = t0.elapsed();
            expect_msg(got, (warmup + iters) as u64, 0)?;
            Ok(Measured::Stream(dt))
        }
    }
}

/// The other side: echoes (rtt) or receives and acknowledges (stream), until the peer closes.
fn respond<L: Link>(l: &mut L, mode: Mode, size: usize, warmup: usize, iters: usize) -> Res<()> {
    match mode {
        Mode::Rtt => while l.echo()? {},
        Mode::Stream => {
            for i in 0..warmup {
                expect_msg(l.recv_check()?, i as u64, size)?;
            }
            l.send_new(warmup as u64, 0)?;
            for i in warmup..warmup + iters {
                expect_msg(l.recv_check()?, i as u64, size)?;
            }
            l.send_new((warmup + iters) as u64, 0)?;
            if let Some((seq, _)) = l.recv_check()? {
                return Err(format!("unexpected message {seq} after the stream").into());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Pinning.

fn allowed_cpus() -> Res<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect())
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Res<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
        .map_err(|e| format!("sched_setaffinity(cpu {cpu}): {e}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Child processes.

/// Kills and reaps the child if it is still there when dropped.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Waits (bounded) for a child that should be exiting, and checks its status.
    fn finish(mut self) -> Res<()> {
        let mut child = self.0.take().expect("child already reaped");
        let deadline = Instant::now() + CHILD_EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                return Err(format!("child process failed: {status}").into());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("child process did not exit; killed it".into());
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The roles a re-executed child can play.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ChildRole {
    /// libchan session over the inherited socket.
    Chan,
    /// Raw frames over the inherited socket.
    Raw,
}

impl ChildRole {
    fn name(self) -> &'static str {
        match self {
            ChildRole::Chan => "chan",
            ChildRole::Raw => "raw",
        }
    }
}

/// Re-executes this program as the other side; returns the guard and our end of the socket.
fn spawn_child(role: ChildRole, run: &Run, cpu: usize) -> Res<(ChildGuard, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    let child = {
        // The command owns `theirs` until it is dropped at the end of this block, so that
        // the parent keeps no copy of the child's end.
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--child")
            .arg(role.name())
            .args(["--mode", run.mode.name()])
            .args(["--size", &run.size.to_string()])
            .args(["--warmup", &run.warmup.to_string()])
            .args(["--iters", &run.iters.to_string()])
            .args(["--cpu", &cpu.to_string()])
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd.spawn()?
    };
    Ok((ChildGuard(Some(child)), ours))
}

/// Entry point of a re-executed child: its socket is its stdin.
fn child_main(args: &[String]) -> Res<()> {
    let mut role = None;
    let (mut mode, mut size, mut warmup, mut iters, mut cpu) = (Mode::Rtt, 0, 0, 0, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--child" => {
                role = Some(match val()?.as_str() {
                    "chan" => ChildRole::Chan,
                    "raw" => ChildRole::Raw,
                    r => return Err(format!("unknown child role {r}").into()),
                })
            }
            "--mode" => mode = Mode::parse(val()?)?,
            "--size" => size = val()?.parse()?,
            "--warmup" => warmup = val()?.parse()?,
            "--iters" => iters = val()?.parse()?,
            "--cpu" => cpu = Some(val()?.parse()?),
            x => return Err(format!("child: unknown argument {x}").into()),
        }
    }
    if let Some(cpu) = cpu {
        pin(cpu)?;
    }
    let sock = UnixStream::from(io::stdin().as_fd().try_clone_to_owned()?);
    match role.ok_or("child: no role")? {
        ChildRole::Chan => {
            let session = Session::from_unix_stream(sock, Role::Acceptor)?;
            let rx = session.accept_channel_timeout::<Payload>(SETUP_TIMEOUT)?;
            let tx = session.open_channel::<Payload>()?;
            respond(&mut ChanLink { tx, rx }, mode, size, warmup, iters)
        }
        ChildRole::Raw => respond(&mut RawLink::new(sock)?, mode, size, warmup, iters),
    }
}

// ---------------------------------------------------------------------------------------
// Transports.

/// The transports this tool knows. Add shm/tcp/tls here.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TransportKind {
    /// In-process: two threads.
    Mem,
    /// Two processes over a unix socket.
    Unix,
}

impl TransportKind {
    fn parse(s: &str) -> Res<Self> {
        match s {
            "mem" => Ok(TransportKind::Mem),
            "unix" => Ok(TransportKind::Unix),
            "shm" | "tcp" | "tls" => Err(format!("transport {s} is not built yet").into()),
            _ => Err(format!("unknown transport {s} (mem, unix)").into()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            TransportKind::Mem => "mem",
            TransportKind::Unix => "unix",
        }
    }

    fn floor_name(self) -> &'static str {
        match self {
            TransportKind::Mem => "crossbeam bounded(256), 2 threads",
            TransportKind::Unix => "raw unix socket, 2 processes",
        }
    }

    /// libchan on this transport.
    fn measure_ours(self, run: &Run, cpus: (usize, usize)) -> Res<Measured> {
        match self {
            TransportKind::Mem => {
                let (atx, arx) = libchan::pipe::<Payload>();
                let (btx, brx) = libchan::pipe::<Payload>();
                let peer = ChanLink { tx: btx, rx: arx };
                let main = ChanLink { tx: atx, rx: brx };
                in_thread(run, cpus.1, main, peer)
            }
            TransportKind::Unix => {
                let (guard, sock) = spawn_child(ChildRole::Chan, run, cpus.1)?;
                let measured = {
                    let session = Session::from_unix_stream(sock, Role::Connector)?;
                    let tx = session.open_channel::<Payload>()?;
                    let rx = session.accept_channel_timeout::<Payload>(SETUP_TIMEOUT)?;
                    drive(
                        &mut ChanLink { tx, rx },
                        run.mode,
                        run.size,
                        run.warmup,
                        run.iters,
                    )?
                };
                guard.finish()?;
                Ok(measured)
            }
        }
    }

    /// The floor for this transport, in the same shape.
    fn measure_floor(self, run: &Run, cpus: (usize, usize)) -> Res<Measured> {
        match self {
            TransportKind::Mem => {
                let (atx, arx) = crossbeam_channel::bounded(256);
                let (btx, brx) = crossbeam_channel::bounded(256);
                let peer = CrossbeamLink { tx: btx, rx: arx };
                let main = CrossbeamLink { tx: atx, rx: brx };
                in_thread(run, cpus.1, main, peer)
            }
            TransportKind::Unix => {
                let (guard, sock) = spawn_child(ChildRole::Raw, run, cpus.1)?;
                let measured = {
                    let mut link = RawLink::new(sock)?;
                    drive(&mut link, run.mode, run.size, run.warmup, run.iters)?
                };
                guard.finish()?;
                Ok(measured)
            }
        }
    }
}

/// Runs `peer` in a thread pinned to `cpu` and drives `main` from this thread.
fn in_thread<L: Link, P: Link + Send + 'static>(
    run: &Run,
    cpu: usize,
    mut main: L,
    mut peer: P,
) -> Res<Measured> {
    let (mode, size, warmup, iters) = (run.mode, run.size, run.warmup, run.iters);
    let t = thread::spawn(move || -> Res<()> {
        pin(cpu)?;
        respond(&mut peer, mode, size, warmup, iters)
    });
    let measured = drive(&mut main, mode, size, warmup, iters);
    drop(main);
    let peer_result = t.join().map_err(|_| "peer thread panicked")?;
    let measured = measured?;
    peer_result?;
    Ok(measured)
}

// ---------------------------------------------------------------------------------------
// Configuration and reporting.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rtt,
    Stream,
}

impl Mode {
    fn parse(s: &str) -> Res<Self> {
        match s {
            "rtt" => Ok(Mode::Rtt),
            "stream" => Ok(Mode::Stream),
            _ => Err(format!("unknown mode {s} (rtt, stream)").into()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Rtt => "rtt",
            Mode::Stream => "stream",
        }
    }
}

/// One measurement: a transport, mode and size.
struct Run {
    transport: TransportKind,
    mode: Mode,
    size: usize,
    warmup: usize,
    iters: usize,
}

struct Stats {
    p50: Option<f64>,
    p99: Option<f64>,
    mean: f64,
    msgs_per_s: f64,
    bytes_per_s: f64,
}

impl Stats {
    fn of(m: Measured, size: usize, iters: usize) -> Stats {
        match m {
            Measured::Rtt(mut s) => {
                s.sort_unstable();
                let pct = |p: usize| s[(s.len() * p / 100).min(s.len() - 1)] as f64;
                let mean = s.iter().sum::<u64>() as f64 / s.len() as f64;
                let msgs_per_s = 1e9 / mean;
                Stats {
                    p50: Some(pct(50)),
                    p99: Some(pct(99)),
                    mean,
                    msgs_per_s,
                    bytes_per_s: msgs_per_s * size as f64,
                }
            }
            Measured::Stream(d) => {
                let secs = d.as_secs_f64();
                Stats {
                    p50: None,
                    p99: None,
                    mean: secs * 1e9 / iters as f64,
                    msgs_per_s: iters as f64 / secs,
                    bytes_per_s: (iters * size) as f64 / secs,
                }
            }
        }
    }
}

fn default_iters(mode: Mode, size: usize) -> usize {
    match mode {
        Mode::Rtt => 20_000,
        // 200k messages, or about 1 GiB for large ones.
        Mode::Stream => ((1usize << 30) / size.max(1)).clamp(2_000, 200_000),
    }
}

fn parse_size(s: &str) -> Res<usize> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1024),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    Ok(num
        .parse::<usize>()
        .map_err(|e| format!("bad size {s}: {e}"))?
        * mul)
}

fn json_num(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.1}"),
        _ => "null".to_string(),
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else {
        format!("{:.1}k", x / 1e3)
    }
}

const USAGE: &str = "usage: pingpong --transport mem|unix --size N [--iters K] [--warmup W] \
[--mode rtt|stream] [--json]\n  (--transport, --size and --mode take comma-separated lists; \
sizes may end in k or m)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("--child") {
        child_main(&args)
    } else {
        parent_main(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pingpong: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parent_main(args: &[String]) -> Res<()> {
    let (mut transports, mut sizes, mut modes) = (Vec::new(), Vec::new(), vec![Mode::Rtt]);
    let (mut iters, mut warmup, mut json) = (None, None, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--transport" => {
                transports = val()?
                    .split(',')
                    .map(TransportKind::parse)
                    .collect::<Res<_>>()?
            }
            "--size" => sizes = val()?.split(',').map(parse_size).collect::<Res<_>>()?,
            "--mode" => modes = val()?.split(',').map(Mode::parse).collect::<Res<_>>()?,
            "--iters" => iters = Some(val()?.parse::<usize>()?),
            "--warmup" => warmup = Some(val()?.parse::<usize>()?),
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            x => return Err(format!("unknown argument {x}\n{USAGE}").into()),
        }
    }
    if transports.is_empty() || sizes.is_empty() {
        return Err(USAGE.into());
    }
    if iters == Some(0) {
        return Err("--iters must be at least 1".into());
    }

    let allowed = allowed_cpus()?;
    let cpus = match allowed.as_slice() {
        [a, b, ..] => (*a, *b),
        [a] => {
            eprintln!(
                "pingpong: only one CPU ({a}) is available: both sides share it, \
                 numbers are not representative"
            );
            (*a, *a)
        }
        [] => return Err("no CPU in the affinity mask".into()),
    };
    pin(cpus.0)?;
    let cores_note = if cpus.0 == cpus.1 {
        format!("ONE cpu only ({}), both sides share it", cpus.0)
    } else {
        format!("sides pinned to cpus {} and {}", cpus.0, cpus.1)
    };
    if !json {
        println!(
            "pingpong: {} cpus available; {cores_note}; rtt = one round trip with the payload \
             both ways, msgs/s = round trips/s; stream = one way",
            allowed.len()
        );
        println!(
            "{:<5} {:<6} {:>7} {:>7} | {:>8} {:>8} {:>8} {:>8} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>9} | {:>6}",
            "trans", "mode", "size", "iters", "p50 ns", "p99 ns", "mean ns", "msgs/s", "MB/s",
            "fl p50", "fl p99", "fl mean", "fl msg/s", "fl MB/s", "ratio"
        );
    }

    for &transport in &transports {
        for &mode in &modes {
            for &size in &sizes {
                let iters = iters.unwrap_or_else(|| default_iters(mode, size));
                let warmup = warmup.unwrap_or((iters / 10).clamp(100, 10_000));
                let run = Run {
                    transport,
                    mode,
                    size,
                    warmup,
                    iters,
                };
                let label = format!("{} {} {size} B x {iters}", transport.name(), mode.name());
                eprintln!("pingpong: {label}: floor ({})...", transport.floor_name());
                let t = Instant::now();
                let floor = Stats::of(transport.measure_floor(&run, cpus)?, size, iters);
                eprintln!(
                    "pingpong: {label}: floor done in {:.2} s; libchan...",
                    t.elapsed().as_secs_f64()
                );
                let t = Instant::now();
                let ours = Stats::of(run.transport.measure_ours(&run, cpus)?, size, iters);
                eprintln!(
                    "pingpong: {label}: libchan done in {:.2} s",
                    t.elapsed().as_secs_f64()
                );
                let ratio = match mode {
                    Mode::Rtt => ours.p50.unwrap_or(f64::NAN) / floor.p50.unwrap_or(f64::NAN),
                    // Same message count and size on both sides: the msgs/s ratio is the
                    // bytes/s ratio, and is defined for size 0 too.
                    Mode::Stream => floor.msgs_per_s / ours.msgs_per_s,
                };
                if json {
                    println!(
                        "{{\"transport\":\"{}\",\"mode\":\"{}\",\"size\":{size},\"iters\":{iters},\
                         \"warmup\":{warmup},\"p50_ns\":{},\"p99_ns\":{},\"mean_ns\":{},\
                         \"msgs_per_s\":{},\"bytes_per_s\":{},\"floor\":\"{}\",\
                         \"floor_p50_ns\":{},\"floor_p99_ns\":{},\"floor_mean_ns\":{},\
                         \"floor_msgs_per_s\":{},\"floor_bytes_per_s\":{},\"ratio\":{},\
                         \"ratio_of\":\"{}\",\"cpus\":[{},{}]}}",
                        transport.name(),
                        mode.name(),
                        json_num(ours.p50),
                        json_num(ours.p99),
                        json_num(Some(ours.mean)),
                        json_num(Some(ours.msgs_per_s)),
                        json_num(Some(ours.bytes_per_s)),
                        transport.floor_name(),
                        json_num(floor.p50),
                        json_num(floor.p99),
                        json_num(Some(floor.mean)),
                        json_num(Some(floor.msgs_per_s)),
                        json_num(Some(floor.bytes_per_s)),
                        if ratio.is_finite() {
                            format!("{ratio:.3}")
                        } else {
                            "null".to_string()
                        },
                        match mode {
                            Mode::Rtt => "p50 / floor p50",
                            Mode::Stream => "floor rate / rate",
                        },
                        cpus.0,
                        cpus.1,
                    );
                } else {
                    println!(
                        "{:<5} {:<6} {:>7} {:>7} | {:>8} {:>8} {:>8.0} {:>8} {:>9.1} | {:>8} {:>8} {:>8.0} {:>8} {:>9.1} | {:>6.2}",
                        transport.name(),
                        mode.name(),
                        size,
                        iters,
                        fmt_opt(ours.p50),
                        fmt_opt(ours.p99),
                        ours.mean,
                        fmt_rate(ours.msgs_per_s),
                        ours.bytes_per_s / 1e6,
                        fmt_opt(floor.p50),
                        fmt_opt(floor.p99),
                        floor.mean,
                        fmt_rate(floor.msgs_per_s),
                        floor.bytes_per_s / 1e6,
                        ratio
                    );
                }
            }
        }
    }
    Ok(())
}
