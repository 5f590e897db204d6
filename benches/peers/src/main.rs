//! libchan against servo's ipc-channel and the raw unix-socket floor, two processes, one run.
//!
//! ```text
//! cargo run --release --manifest-path benches/peers/Cargo.toml -- [--size N[,M..]]
//!     [--iters K] [--json]
//! ```
//!
//! For every size, each transport is measured in both modes, each time with a fresh child
//! process (this program re-executed with a hidden `--child` argument). The parent is pinned
//! to the first CPU it may run on and the child to the second (cores 0 and 1 here).
//!
//! * `raw-unix`: length-prefixed frames (u32 len, u64 seq, data) over a `UnixStream` pair,
//!   the child's end as its stdin; `BufReader` + `read_exact`, one `write_all` per message.
//! * `libchan-unix`: `libchan::listen`/`connect` on `unix:@libchan-peers-<pid>-<n>` with
//!   shared memory off (`Options::shm(false)`), one channel each way carrying [`Payload`]
//!   `{ seq: u64, data: Vec<u8> }`.
//! * `libchan-shm`: the same with the default options: the session upgrades to shared memory
//!   (checked on both sides).
//! * `ipc-channel`: an `IpcSender<Vec<u8>>`/`IpcReceiver<Vec<u8>>` pair each way (serde +
//!   postcard, as a user of the typed API gets), set up through an `IpcOneShotServer`.
//! * `ipc-channel-bytes`: the same with `IpcBytesSender`/`IpcBytesReceiver` (no serde).
//!
//! Every message carries a u64 sequence number and `size` bytes of `seq as u8` (for
//! ipc-channel the Vec is the 8 sequence bytes followed by the data). The receiver reads every
//! byte (sums it) and checks it. Modes, as in `examples/pingpong.rs`:
//!
//! * `rtt`: K timed round trips after W warm-up ones; the echo carries the payload back.
//!   Reports p50, p99 and round trips/s.
//! * `stream`: K messages one way after W warm-up ones, then one acknowledgement back; the
//!   clock runs from the first measured message to the acknowledgement. Reports msgs/s, B/s.

use std::error::Error as StdError;
use std::hint::black_box;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ipc_channel::ipc::{self, IpcBytesReceiver, IpcBytesSender, IpcOneShotServer};
use ipc_channel::ipc::{IpcReceiver, IpcSender};
use ipc_channel::IpcError;
use libchan::{Receiver, RecvError, Sender, Session};

type Res<T> = Result<T, Box<dyn StdError + Send + Sync>>;

/// The message libchan carries.
#[derive(libchan::rkyv::Archive, libchan::rkyv::Serialize, libchan::rkyv::Deserialize)]
#[rkyv(crate = libchan::rkyv)]
struct Payload {
    seq: u64,
    data: Vec<u8>,
}

/// Bound on connection setup and on a finished child's exit.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Raw floor frame header: u32 length (of what follows), u64 sequence number.
const RAW_HDR: usize = 12;

/// Reads every byte of `data`, checks it is `seq as u8` throughout, returns `(seq, len)`.
fn touch_check(seq: u64, data: &[u8]) -> Res<(u64, usize)> {
    let sum: u64 = black_box(data).iter().map(|&b| u64::from(b)).sum();
    if black_box(sum) != u64::from(seq as u8) * data.len() as u64 {
        return Err(format!("payload of message {seq} is corrupt").into());
    }
    Ok((seq, data.len()))
}

/// The ipc-channel message: 8 bytes of `seq`, then `size` bytes of `seq as u8`.
fn ipc_msg(seq: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + size);
    v.extend_from_slice(&seq.to_le_bytes());
    v.resize(8 + size, seq as u8);
    v
}

fn ipc_check(v: &[u8]) -> Res<(u64, usize)> {
    let seq = u64::from_le_bytes(v.get(..8).ok_or("short message")?.try_into()?);
    touch_check(seq, &v[8..])
}

/// Maps ipc-channel's "all senders gone" to `None`.
fn ipc_recv(r: Result<Vec<u8>, IpcError>) -> Res<Option<Vec<u8>>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(IpcError::Disconnected) => Ok(None),
        Err(e) => Err(format!("ipc-channel recv: {e}").into()),
    }
}

// ---------------------------------------------------------------------------------------
// Links: one side of a two-way connection; the drivers are generic over them.

trait Link {
    /// Sends a fresh message of `size` bytes.
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()>;
    /// Receives one message and checks every byte; `None` when the peer closed.
    fn recv_check(&mut self) -> Res<Option<(u64, usize)>>;
    /// Receives one message, checks it and sends the same bytes back; `false` on close.
    fn echo(&mut self) -> Res<bool>;
}

struct IpcLink {
    tx: IpcSender<Vec<u8>>,
    rx: IpcReceiver<Vec<u8>>,
}

impl Link for IpcLink {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        Ok(self.tx.send(ipc_msg(seq, size))?)
    }
    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        ipc_recv(self.rx.recv())?.map(|v| ipc_check(&v)).transpose()
    }
    fn echo(&mut self) -> Res<bool> {
        let Some(v) = ipc_recv(self.rx.recv())? else {
            return Ok(false);
        };
        ipc_check(&v)?;
        self.tx.send(v)?;
        Ok(true)
    }
}

struct IpcBytesLink {
    tx: IpcBytesSender,
    rx: IpcBytesReceiver,
}

impl Link for IpcBytesLink {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        Ok(self.tx.send(&ipc_msg(seq, size))?)
    }
    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        ipc_recv(self.rx.recv())?.map(|v| ipc_check(&v)).transpose()
    }
    fn echo(&mut self) -> Res<bool> {
        let Some(v) = ipc_recv(self.rx.recv())? else {
            return Ok(false);
        };
        ipc_check(&v)?;
        self.tx.send(&v)?;
        Ok(true)
    }
}

struct ChanLink {
    tx: Sender<Payload>,
    rx: Receiver<Payload>,
    /// Kept open for as long as the channels are used; dropped after them.
    _session: Session,
}

impl Link for ChanLink {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        let data = vec![seq as u8; size];
        self.tx
            .send(Payload { seq, data })
            .map_err(|e| format!("libchan send: {e}").into())
    }
    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        match self.rx.recv() {
            Ok(m) => touch_check(m.seq.to_native(), m.data.as_slice()).map(Some),
            Err(RecvError::Closed | RecvError::Disconnected) => Ok(None),
            Err(e) => Err(format!("libchan recv: {e}").into()),
        }
    }
    fn echo(&mut self) -> Res<bool> {
        let m = match self.rx.recv() {
            Ok(m) => m,
            Err(RecvError::Closed | RecvError::Disconnected) => return Ok(false),
            Err(e) => return Err(format!("libchan recv: {e}").into()),
        };
        let (seq, _) = touch_check(m.seq.to_native(), m.data.as_slice())?;
        let data = m.data.as_slice().to_vec();
        drop(m);
        self.tx
            .send(Payload { seq, data })
            .map_err(|e| format!("libchan send: {e}"))?;
        Ok(true)
    }
}

struct RawLink {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Header + payload of the last frame received or sent.
    buf: Vec<u8>,
}

impl RawLink {
    fn new(s: UnixStream) -> io::Result<Self> {
        let w = s.try_clone()?;
        Ok(RawLink {
            r: BufReader::with_capacity(16 * 1024, s),
            w,
            buf: Vec::new(),
        })
    }
}

impl Link for RawLink {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        let len = u32::try_from(8 + size).map_err(|_| "raw frame: too large")?;
        self.buf.clear();
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.resize(RAW_HDR + size, seq as u8);
        Ok(self.w.write_all(&self.buf)?)
    }
    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        let mut hdr = [0u8; RAW_HDR];
        match self.r.read_exact(&mut hdr) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            r => r?,
        }
        let n = (u32::from_le_bytes(hdr[..4].try_into()?) as usize)
            .checked_sub(8)
            .ok_or("raw frame: bad length")?;
        self.buf.resize(RAW_HDR + n, 0);
        self.buf[..RAW_HDR].copy_from_slice(&hdr);
        self.r.read_exact(&mut self.buf[RAW_HDR..])?;
        touch_check(
            u64::from_le_bytes(hdr[4..].try_into()?),
            &self.buf[RAW_HDR..],
        )
        .map(Some)
    }
    fn echo(&mut self) -> Res<bool> {
        if self.recv_check()?.is_none() {
            return Ok(false);
        }
        self.w.write_all(&self.buf)?;
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------
// Drivers (the same protocol as examples/pingpong.rs).

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rtt,
    Stream,
}

/// How much to do: identical on both sides.
#[derive(Clone, Copy)]
struct Plan {
    mode: Mode,
    size: usize,
    warmup: usize,
    iters: usize,
}

fn expect(got: Option<(u64, usize)>, seq: usize, size: usize) -> Res<()> {
    match got {
        Some((s, n)) if s == seq as u64 && n == size => Ok(()),
        Some((s, n)) => Err(format!("expected message {seq} of {size} B, got {s} of {n} B").into()),
        None => Err(format!("peer closed while waiting for message {seq}").into()),
    }
}

/// The measuring side: one duration per round trip (rtt), or the whole stream's (stream).
fn drive(l: &mut dyn Link, p: Plan) -> Res<Vec<u64>> {
    let (w, n) = (p.warmup, p.warmup + p.iters);
    match p.mode {
        Mode::Rtt => {
            let mut samples = Vec::with_capacity(p.iters);
            for i in 0..n {
                let t0 = Instant::now();
                l.send_new(i as u64, p.size)?;
                let got = l.recv_check()?;
                let dt = t0.elapsed().as_nanos() as u64;
                expect(got, i, p.size)?;
                if i >= w {
                    samples.push(dt);
                }
            }
            Ok(samples)
        }
        Mode::Stream => {
            (0..w).try_for_each(|i| l.send_new(i as u64, p.size))?;
            expect(l.recv_check()?, w, 0)?;
            let t0 = Instant::now();
            (w..n).try_for_each(|i| l.send_new(i as u64, p.size))?;
            let got = l.recv_check()?;
            let dt = t0.elapsed().as_nanos() as u64;
            expect(got, n, 0)?;
            Ok(vec![dt])
        }
    }
}

/// The child's side: echoes (rtt) or receives and acknowledges (stream) until the peer closes.
fn respond(l: &mut dyn Link, p: Plan) -> Res<()> {
    let (w, n) = (p.warmup, p.warmup + p.iters);
    if p.mode == Mode::Rtt {
        while l.echo()? {}
        return Ok(());
    }
    (0..w).try_for_each(|i| expect(l.recv_check()?, i, p.size))?;
    l.send_new(w as u64, 0)?;
    (w..n).try_for_each(|i| expect(l.recv_check()?, i, p.size))?;
    l.send_new(n as u64, 0)?;
    match l.recv_check()? {
        Some((seq, _)) => Err(format!("unexpected message {seq} after the stream").into()),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Transports: how each side builds its link.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Raw,
    Chan,
    ChanShm,
    Ipc,
    IpcBytes,
}

const TRANSPORTS: [Transport; 5] = [
    Transport::Raw,
    Transport::Chan,
    Transport::ChanShm,
    Transport::Ipc,
    Transport::IpcBytes,
];

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Raw => "raw-unix",
            Transport::Chan => "libchan-unix",
            Transport::ChanShm => "libchan-shm",
            Transport::Ipc => "ipc-channel",
            Transport::IpcBytes => "ipc-channel-bytes",
        }
    }

    /// libchan's options for this transport: shared memory on only for `libchan-shm`.
    fn options(self) -> libchan::Options {
        libchan::Options::new().shm(self == Transport::ChanShm)
    }

    /// Fails unless `session` runs on the transport this run measures.
    fn check(self, session: &Session) -> Res<()> {
        let want = if self == Transport::ChanShm {
            libchan::Transport::Shm
        } else {
            libchan::Transport::Unix
        };
        if session.transport() != want {
            return Err(format!("{}: session runs on {}", self.name(), session.transport()).into());
        }
        Ok(())
    }

    fn parse(s: &str) -> Res<Self> {
        TRANSPORTS
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("bad {s}").into())
    }

    /// Spawns the child, builds the parent's link, measures, and reaps the child.
    fn measure(self, p: Plan, child_cpu: usize, seq: usize) -> Res<Vec<u64>> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["--child", self.name(), "--cpu", &child_cpu.to_string()])
            .args(["--mode", if p.mode == Mode::Rtt { "rtt" } else { "stream" }])
            .args([
                "--size",
                &p.size.to_string(),
                "--warmup",
                &p.warmup.to_string(),
            ])
            .args(["--iters", &p.iters.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let (mut link, guard): (Box<dyn Link>, ChildGuard) = match self {
            Transport::Raw => {
                let (ours, theirs) = UnixStream::pair()?;
                // `cmd` holds the only other copy of `theirs`; it is dropped with `cmd`.
                let guard =
                    ChildGuard(Some(cmd.stdin(Stdio::from(OwnedFd::from(theirs))).spawn()?));
                (Box::new(RawLink::new(ours)?), guard)
            }
            Transport::Chan | Transport::ChanShm => {
                let addr = format!("unix:@libchan-peers-{}-{seq}", std::process::id());
                let listener = libchan::listen_with(&addr, &self.options())?;
                let guard = ChildGuard(Some(cmd.args(["--addr", &addr]).spawn()?));
                let session = bounded("libchan accept", move || Ok(listener.accept()?))?;
                self.check(&session)?;
                let tx = session.open_channel::<Payload>()?;
                let rx = session.accept_channel_timeout::<Payload>(SETUP_TIMEOUT)?;
                (
                    Box::new(ChanLink {
                        tx,
                        rx,
                        _session: session,
                    }),
                    guard,
                )
            }
            Transport::Ipc => {
                let (server, name) = IpcOneShotServer::<IpcPair>::new()?;
                let guard = ChildGuard(Some(cmd.args(["--addr", &name]).spawn()?));
                let (_, (tx, rx)) = bounded("ipc accept", move || Ok(server.accept()?))?;
                (Box::new(IpcLink { tx, rx }), guard)
            }
            Transport::IpcBytes => {
                let (server, name) = IpcOneShotServer::<IpcBytesPair>::new()?;
                let guard = ChildGuard(Some(cmd.args(["--addr", &name]).spawn()?));
                let (_, (tx, rx)) = bounded("ipc accept", move || Ok(server.accept()?))?;
                (Box::new(IpcBytesLink { tx, rx }), guard)
            }
        };
        let measured = drive(link.as_mut(), p);
        drop(link); // closes our ends: the child sees end of stream and exits
        let status = guard.finish();
        let measured = measured?;
        status?;
        Ok(measured)
    }

    /// The child's side of [`Transport::measure`].
    fn respond(self, p: Plan, addr: Option<&str>) -> Res<()> {
        let addr = || addr.map(str::to_string).ok_or("child: --addr missing");
        let mut link: Box<dyn Link> = match self {
            Transport::Raw => {
                let sock = UnixStream::from(io::stdin().as_fd().try_clone_to_owned()?);
                Box::new(RawLink::new(sock)?)
            }
            Transport::Chan | Transport::ChanShm => {
                let session = libchan::connect_with(&addr()?, &self.options())?;
                self.check(&session)?;
                let rx = session.accept_channel_timeout::<Payload>(SETUP_TIMEOUT)?;
                let tx = session.open_channel::<Payload>()?;
                Box::new(ChanLink {
                    tx,
                    rx,
                    _session: session,
                })
            }
            // The child makes both channels and hands the parent its two ends.
            Transport::Ipc => {
                let (to_child, from_parent) = ipc::channel()?;
                let (to_parent, from_child) = ipc::channel()?;
                IpcSender::<IpcPair>::connect(addr()?)?.send((to_child, from_child))?;
                Box::new(IpcLink {
                    tx: to_parent,
                    rx: from_parent,
                })
            }
            Transport::IpcBytes => {
                let (to_child, from_parent) = ipc::bytes_channel()?;
                let (to_parent, from_child) = ipc::bytes_channel()?;
                IpcSender::<IpcBytesPair>::connect(addr()?)?.send((to_child, from_child))?;
                Box::new(IpcBytesLink {
                    tx: to_parent,
                    rx: from_parent,
                })
            }
        };
        respond(link.as_mut(), p)
    }
}

/// What an ipc-channel child sends through the one-shot server: the parent's two ends.
type IpcPair = (IpcSender<Vec<u8>>, IpcReceiver<Vec<u8>>);
type IpcBytesPair = (IpcBytesSender, IpcBytesReceiver);

/// Runs a blocking setup step in a thread, so that a child that died cannot hang us.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> Res<T> + Send + 'static) -> Res<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(f()));
    rx.recv_timeout(SETUP_TIMEOUT)
        .map_err(|_| format!("{what}: no peer within {SETUP_TIMEOUT:?}"))?
}

/// Kills and reaps the child if it is still there when dropped.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Waits (bounded) for a child that should be exiting, and checks its status.
    fn finish(mut self) -> Res<()> {
        let mut child = self.0.take().expect("child already reaped");
        let deadline = Instant::now() + SETUP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait()? {
                Some(s) if s.success() => return Ok(()),
                Some(s) => return Err(format!("child process failed: {s}").into()),
                None => thread::sleep(Duration::from_millis(2)),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("child process did not exit; killed it".into())
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

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Res<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(|e| format!("pin to cpu {cpu}: {e}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Command line and reporting.

const USAGE: &str = "usage: libchan-peers [--size N[,M..]] [--iters K] [--json]   \
(sizes may end in k or m; default --size 64,64k)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let child = args.first().map(String::as_str) == Some("--child");
    match if child {
        child_main(&args)
    } else {
        parent_main(&args)
    } {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "libchan-peers{}: error: {e}",
                if child { " (child)" } else { "" }
            );
            ExitCode::FAILURE
        }
    }
}

fn child_main(args: &[String]) -> Res<()> {
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let num = |name: &str| -> Res<usize> { Ok(value(name).ok_or(name.to_string())?.parse()?) };
    pin(num("--cpu")?)?;
    let mode = if value("--mode").map(String::as_str) == Some("rtt") {
        Mode::Rtt
    } else {
        Mode::Stream
    };
    let plan = Plan {
        mode,
        size: num("--size")?,
        warmup: num("--warmup")?,
        iters: num("--iters")?,
    };
    Transport::parse(value("--child").ok_or("no transport")?)?
        .respond(plan, value("--addr").map(String::as_str))
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

fn parent_main(args: &[String]) -> Res<()> {
    let (mut sizes, mut iters, mut json) = (vec![64, 65536], None, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--size" => sizes = val()?.split(',').map(parse_size).collect::<Res<_>>()?,
            "--iters" => iters = Some(val()?.parse::<usize>()?.max(1)),
            "--json" => json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            x => return Err(format!("unknown argument {x}\n{USAGE}").into()),
        }
    }
    let set = rustix::thread::sched_getaffinity(None)?;
    let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect();
    let (c0, c1) = match cpus[..] {
        [a, b, ..] => (a, b),
        _ => return Err("need two CPUs to pin the two processes to".into()),
    };
    pin(c0)?;
    if !json {
        println!(
            "libchan-peers: parent on cpu {c0}, child on cpu {c1}; rtt msgs/s = round trips/s"
        );
        println!(
            "{:<18} {:<6} {:>6} {:>6} | {:>8} {:>8} {:>10} {:>9} | {:>6}",
            "transport", "mode", "size", "iters", "p50 ns", "p99 ns", "msgs/s", "MB/s", "/raw"
        );
    }
    let mut children = 0;
    for &size in &sizes {
        for mode in [Mode::Rtt, Mode::Stream] {
            let iters = iters.unwrap_or(match mode {
                Mode::Rtt => 10_000,
                Mode::Stream => ((256 << 20) / size.max(1)).clamp(2_000, 100_000),
            });
            let plan = Plan {
                mode,
                size,
                warmup: (iters / 10).clamp(100, 5_000),
                iters,
            };
            let mut raw_cost = f64::NAN; // raw-unix p50 (rtt) or 1/rate (stream): comes first
            for t in TRANSPORTS {
                children += 1;
                let mut s = t.measure(plan, c1, children)?;
                s.sort_unstable();
                let pct = |q: usize| s[(s.len() * q / 100).min(s.len() - 1)] as f64;
                let (p50, p99, rate) = match mode {
                    Mode::Rtt => (
                        Some(pct(50)),
                        Some(pct(99)),
                        1e9 * s.len() as f64 / s.iter().sum::<u64>() as f64,
                    ),
                    Mode::Stream => (None, None, 1e9 * iters as f64 / s[0] as f64),
                };
                let cost = p50.unwrap_or(1.0 / rate);
                if t == Transport::Raw {
                    raw_cost = cost;
                }
                let mname = if mode == Mode::Rtt { "rtt" } else { "stream" };
                let opt =
                    |x: Option<f64>, null: &str| x.map_or(null.to_string(), |v| format!("{v:.0}"));
                if json {
                    println!(
                        "{{\"transport\":\"{}\",\"mode\":\"{mname}\",\"size\":{size},\"iters\":{iters},\
                         \"warmup\":{},\"p50_ns\":{},\"p99_ns\":{},\"msgs_per_s\":{rate:.1},\
                         \"bytes_per_s\":{:.1},\"cpus\":[{c0},{c1}]}}",
                        t.name(),
                        plan.warmup,
                        opt(p50, "null"),
                        opt(p99, "null"),
                        rate * size as f64
                    );
                } else {
                    println!(
                        "{:<18} {:<6} {:>6} {:>6} | {:>8} {:>8} {:>10.0} {:>9.1} | {:>6.2}",
                        t.name(),
                        mname,
                        size,
                        iters,
                        opt(p50, "-"),
                        opt(p99, "-"),
                        rate,
                        rate * size as f64 / 1e6,
                        cost / raw_cost
                    );
                }
            }
        }
    }
    Ok(())
}
