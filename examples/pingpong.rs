//! Ping-pong and streaming benchmark of libchan transports, measured against their floors.
//!
//! ```text
//! cargo run --release --example pingpong -- --transport mem|unix|shm|tcp|tls --size N
//!     [--iters K] [--warmup W] [--mode rtt|rtt-parked|stream] [--json]
//! ```
//!
//! `--transport`, `--size` and `--mode` also take comma-separated lists (`--size 64,64k`).
//!
//! * `mem`: two threads in this process, a `libchan::pipe` each way. Floor: a
//!   `crossbeam_channel::bounded(256)` each way carrying `(u64, Vec<u8>)` of the same size.
//! * `unix`: two real processes. The parent makes a socket pair and re-executes itself with
//!   a hidden `--child ROLE ...` argument and the other end of the pair as the child's stdin;
//!   both ends run `Session::from_unix_stream_with` with `Options::new().shm(false)`, so that
//!   the session stays on the plain socket (same-uid sessions negotiate shared memory
//!   otherwise). Both sides check `session.transport() == Transport::Unix` and fail if not.
//!   Floor: the same two processes exchanging length-prefixed frames over the raw socket (std
//!   `UnixStream`, `BufReader` + `read_exact`, one `write_all` per message).
//! * `shm`: libchan with shared memory on (`Options::new()`, the default), over the same
//!   child-process mechanism as `unix`; both sides check `transport() == Transport::Shm`.
//!   Messages without handles that fit half a channel's 4 MiB ring go through the ring; larger
//!   ones travel in a sealed memfd. Floors: two real processes sharing a memfd mapping, per mode: a
//!   cache-line ping-pong (`rtt`), a futex ping-pong where both sides sleep (`rtt-parked`),
//!   and an SPSC ring of N-byte records (`stream`, plus single-core memcpy of N bytes for
//!   N >= 64 KiB, reported beside). See the "Shared-memory floors" section below for exactly
//!   what they do.
//!
//! The two sides are pinned to two different CPUs (the first two this process may run on).
//! Whoever receives a message reads every byte of it (sums it) and checks the sum.
//!
//! * `rtt`: K round trips after W warm-up ones; each round trip is timed on its own and the
//!   echo carries the whole payload back. Reports p50, p99, mean and round trips/s.
//! * `rtt-parked`: shm only (skipped for the others): round trips in which each side sleeps
//!   in the kernel until the other wakes it, i.e. the cost of two cross-core wake-ups.
//!   libchan has no knob to turn its spinning off, so its side is made to sleep by waiting:
//!   before each round trip the initiator busy-waits [`PARKED_DELAY`] (outside the timed
//!   span), so the echo side has spun out and sleeps on its futex when the message comes;
//!   the echo side busy-waits [`PARKED_DELAY`] before replying, so the initiator sleeps too.
//!   The echo side measures that delay of its own with `Instant` each round trip and sends
//!   the list back at the end; each round trip's own delay is subtracted from its time.
//!   Reported as "libchan rtt with the receiver asleep (echo delays 200 us; delay subtracted)".
//!   The futex floor sleeps the same way (the same two busy-waits, the echo's subtracted):
//!   on a virtual machine, waking a vCPU that has been idle for a while costs more than
//!   waking one that went idle a moment ago (the hypervisor polls a halted vCPU briefly
//!   before it deschedules it), so a floor whose sides sleep only for a wake-up would measure
//!   a cheaper wake-up than the one libchan's side is given.
//! * `stream`: K messages one way (after W warm-up ones: by default at least 8 MiB, once
//!   round a shm channel's ring), then one acknowledgement back;
//!   the clock runs from the first message to the acknowledgement. Reports msgs/s, bytes/s.
//!
//! `--loan` makes every libchan side send raw bytes through `Sender::<Vec<u8>>::loan` (8
//! sequence bytes, then the payload, written in place) instead of a typed `Payload`; floors
//! are unchanged. Not with `rtt-parked`.
//!
//! * `tcp`: two real processes over loopback TCP; this process listens
//!   (`libchan::listen_with("tcp://127.0.0.1:0")`), the child connects; shared memory is off
//!   on both sides so the session stays on TCP (both check `transport() == Transport::Tcp`).
//!   Floor: the same length-prefixed frames as `unix`, over a raw `TcpStream` with
//!   `TCP_NODELAY` (which libchan sets too).
//!
//! * `tls`: as `tcp`, over TLS 1.3 (rustls with ring): the parent makes a throwaway CA and a
//!   certificate for `localhost` (rcgen), listens on `tls://`, and hands the child the CA in a
//!   temporary file. Floor: the same raw frames through a `rustls::StreamOwned` over
//!   `TCP_NODELAY` sockets, same certificates, one `write_all` + `flush` per message.
//!
//! Another transport plugs in as a [`TransportKind`] variant: it needs a way to
//! build a [`ChanLink`] on both sides and a floor [`Link`]; the drivers are generic.

use std::error::Error as StdError;
use std::hint::black_box;
use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::ptr::{self, NonNull};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use libchan::{Options, Receiver, RecvError, Role, Sender, Session, Transport};

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
/// libchan rtt-parked: how long each side busy-waits before it sends, so that the other side
/// has spun out (libchan spins about 10 us) and sleeps on its futex.
const PARKED_DELAY: Duration = Duration::from_micros(200);

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
        Ok(self.echo_after(Duration::ZERO)?.is_some())
    }
}

impl ChanLink {
    /// [`Link::echo`], busy-waiting `delay` (if not zero) between checking the message and
    /// sending it back; returns how long that wait actually took (`None` on close).
    fn echo_after(&mut self, delay: Duration) -> Res<Option<Duration>> {
        match self.rx.recv() {
            Ok(m) => {
                let seq = m.seq.to_native();
                touch_check(seq, m.data.as_slice())?;
                let data = m.data.as_slice().to_vec();
                drop(m);
                let waited = if delay.is_zero() {
                    Duration::ZERO
                } else {
                    busy_wait(delay)
                };
                self.tx
                    .send(Payload { seq, data })
                    .map_err(|e| format!("libchan send: {e}"))?;
                Ok(Some(waited))
            }
            Err(RecvError::Closed | RecvError::Disconnected) => Ok(None),
            Err(e) => Err(format!("libchan recv: {e}").into()),
        }
    }
}

/// libchan with raw bytes through [`libchan::Loan`] (`--loan`): a `Vec<u8>` message of 8
/// sequence bytes then the payload, written in place by the sender, read in place by the
/// receiver.
struct LoanLink {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

impl LoanLink {
    fn send_bytes(&self, seq: u64, fill_with: Option<&[u8]>, size: usize) -> Res<()> {
        let mut loan = self.tx.loan(8 + size)?;
        loan[..8].copy_from_slice(&seq.to_le_bytes());
        match fill_with {
            Some(data) => loan[8..].copy_from_slice(data),
            None => loan[8..].fill(seq as u8),
        }
        loan.commit()?;
        Ok(())
    }
}

impl Link for LoanLink {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        self.send_bytes(seq, None, size)
    }

    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        match self.rx.recv() {
            Ok(m) => {
                let bytes = m.as_slice();
                let seq = u64::from_le_bytes(bytes.get(..8).ok_or("short loan")?.try_into()?);
                touch_check(seq, &bytes[8..])?;
                Ok(Some((seq, bytes.len() - 8)))
            }
            Err(RecvError::Closed | RecvError::Disconnected) => Ok(None),
            Err(e) => Err(format!("libchan recv: {e}").into()),
        }
    }

    fn echo(&mut self) -> Res<bool> {
        match self.rx.recv() {
            Ok(m) => {
                let bytes = m.as_slice();
                let seq = u64::from_le_bytes(bytes.get(..8).ok_or("short loan")?.try_into()?);
                touch_check(seq, &bytes[8..])?;
                self.send_bytes(seq, Some(&bytes[8..]), bytes.len() - 8)?;
                Ok(true)
            }
            Err(RecvError::Closed | RecvError::Disconnected) => Ok(false),
            Err(e) => Err(format!("libchan recv: {e}").into()),
        }
    }
}

/// `--loan`: libchan sides send raw bytes through loans instead of typed messages.
static LOAN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn loan_mode() -> bool {
    LOAN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Spins (without sleeping) for at least `d`; returns the time actually spent.
fn busy_wait(d: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let dt = t0.elapsed();
        if dt >= d {
            return dt;
        }
        std::hint::spin_loop();
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

/// The socket floors: length-prefixed frames over a raw byte stream `S`, either a socket
/// ([`Split`]: unix, tcp) or a rustls stream (tls, one connection read and written by this one
/// thread). One `write_all` + `flush` per message.
struct RawLink<S: Read + Write> {
    s: S,
    /// Header + payload of the last frame received or sent.
    buf: Vec<u8>,
}

/// A socket read through a [`BufReader`] and written through a clone of itself.
struct Split<S> {
    r: BufReader<S>,
    w: S,
}

impl<S: Read> Split<S> {
    /// Reads `s`, writes `w` (the same socket).
    fn new(s: S, w: S) -> Self {
        Split {
            r: BufReader::with_capacity(RAW_READ_BUF, s),
            w,
        }
    }
}

impl<S: Read> Read for Split<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.r.read_exact(buf)
    }
}

impl<S: Write> Write for Split<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.w.write_all(buf)
    }

    /// A no-op for the sockets (std's `flush` on them does nothing).
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl<S: Read + Write> RawLink<S> {
    fn over(s: S) -> Self {
        RawLink { s, buf: Vec::new() }
    }

    /// Reads one frame into `buf`; `None` at a clean end of stream.
    fn read_frame(&mut self) -> Res<Option<(u64, usize)>> {
        let mut hdr = [0u8; RAW_HDR];
        match self.s.read_exact(&mut hdr) {
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
        self.s.read_exact(&mut self.buf[RAW_HDR..RAW_HDR + n])?;
        touch_check(seq, &self.buf[RAW_HDR..RAW_HDR + n])?;
        Ok(Some((seq, n)))
    }

    /// Writes the first `len` bytes of `buf` as one message.
    fn write_buf(&mut self, len: usize) -> Res<()> {
        self.s.write_all(&self.buf[..len])?;
        self.s.flush()?;
        Ok(())
    }
}

impl RawLink<Split<UnixStream>> {
    fn new(s: UnixStream) -> io::Result<Self> {
        let w = s.try_clone()?;
        Ok(RawLink::over(Split::new(s, w)))
    }
}

impl RawLink<Split<TcpStream>> {
    /// The TCP floor: Nagle off, as libchan sets it.
    fn tcp(s: TcpStream) -> io::Result<Self> {
        s.set_nodelay(true)?;
        let w = s.try_clone()?;
        Ok(RawLink::over(Split::new(s, w)))
    }
}

impl<S: Read + Write> Link for RawLink<S> {
    fn send_new(&mut self, seq: u64, size: usize) -> Res<()> {
        let len = u32::try_from(8 + size).map_err(|_| "raw frame: too large")?;
        self.buf.clear();
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.resize(RAW_HDR + size, seq as u8);
        self.write_buf(RAW_HDR + size)
    }

    fn recv_check(&mut self) -> Res<Option<(u64, usize)>> {
        self.read_frame()
    }

    fn echo(&mut self) -> Res<bool> {
        match self.read_frame()? {
            Some((_, n)) => {
                self.write_buf(RAW_HDR + n)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// A throwaway CA and a certificate for `localhost` it signed, for the `tls` runs; the CA goes
/// to a file the child reads.
struct TestPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl TestPki {
    fn new() -> Res<TestPki> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let cert =
            CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &issuer)?;
        Ok(TestPki {
            ca_pem,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn server_config(&self) -> Res<Arc<rustls::ServerConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())?;
        let cfg = rustls::ServerConfig::builder_with_provider(tls_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(Arc::new(cfg))
    }
}

fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_client_config(ca_pem: &[u8]) -> Res<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(tls_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
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
        Mode::Rtt | Mode::RttParked => {
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
        Mode::Rtt | Mode::RttParked => while l.echo()? {},
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

/// libchan rtt-parked, measuring side. Like [`drive`]'s rtt, but busy-waits [`PARKED_DELAY`]
/// before each round trip, outside the timed span, so that the echo side sleeps when the
/// message comes; the echo side waits as long before replying, so that we sleep too. Once the
/// round trips are done we close our sender; the echo side then sends back, on a channel it
/// opens, the delay it measured in each round trip, and each is subtracted from its own round
/// trip's time.
fn drive_parked(
    session: &Session,
    mut l: ChanLink,
    size: usize,
    warmup: usize,
    iters: usize,
) -> Res<Measured> {
    let total = warmup + iters;
    let mut times = Vec::with_capacity(total);
    let mut last_report = Instant::now();
    for i in 0..total {
        let seq = i as u64;
        busy_wait(PARKED_DELAY);
        let t0 = Instant::now();
        l.send_new(seq, size)?;
        let got = l.recv_check()?;
        let dt = t0.elapsed();
        expect_msg(got, seq, size)?;
        times.push(dt.as_nanos() as u64);
        if i % 256 == 0 && last_report.elapsed() > Duration::from_secs(2) {
            eprintln!("pingpong:   {i}/{total} round trips");
            last_report = Instant::now();
        }
    }
    let ChanLink { tx, rx } = l;
    drop(tx);
    let delays_rx = session.accept_channel_timeout::<Vec<u64>>(SETUP_TIMEOUT)?;
    let msg = delays_rx
        .recv_timeout(SETUP_TIMEOUT)
        .map_err(|e| format!("libchan recv of the echo delays: {e}"))?;
    let delays: Vec<u64> = msg.iter().map(|d| d.to_native()).collect();
    drop((msg, rx));
    if delays.len() != total {
        return Err(format!(
            "the echo side reported {} delays for {total} round trips",
            delays.len()
        )
        .into());
    }
    let mut samples = Vec::with_capacity(iters);
    for (i, (&t, &d)) in times.iter().zip(&delays).enumerate().skip(warmup) {
        // The echo's delay lies inside the round trip, so this cannot underflow unless the
        // two processes' clocks disagree.
        let net = t
            .checked_sub(d)
            .ok_or_else(|| format!("round trip {i}: {t} ns, shorter than its delay {d} ns"))?;
        samples.push(net);
    }
    let measured = &delays[warmup..];
    eprintln!(
        "pingpong:   echo delay per round trip (subtracted): mean {:.0} ns, min {} ns, max {} ns",
        measured.iter().sum::<u64>() as f64 / measured.len() as f64,
        measured.iter().min().unwrap_or(&0),
        measured.iter().max().unwrap_or(&0),
    );
    Ok(Measured::Rtt(samples))
}

/// libchan rtt-parked, echo side: see [`drive_parked`].
fn respond_parked(session: &Session, mut l: ChanLink) -> Res<()> {
    let mut delays = Vec::new();
    while let Some(d) = l.echo_after(PARKED_DELAY)? {
        delays.push(d.as_nanos() as u64);
    }
    let tx = session.open_channel::<Vec<u64>>()?;
    tx.send(delays)
        .map_err(|e| format!("libchan send of the echo delays: {e}"))?;
    // Stay until the parent has read them and closed the session.
    match session.accept_channel_timeout::<u8>(SETUP_TIMEOUT) {
        Err(libchan::Error::Disconnected) => Ok(()),
        Err(e) => Err(format!("child: waiting for the parent to close: {e}").into()),
        Ok(_) => Err("child: unexpected channel from the parent".into()),
    }
}

/// The child side of a libchan run on `session`: takes the parent's channel, opens one back,
/// and echoes or consumes what comes (`--loan`: raw bytes read and written through loans).
fn respond_on(session: &Session, mode: Mode, size: usize, warmup: usize, iters: usize) -> Res<()> {
    if loan_mode() {
        let rx = session.accept_channel_timeout::<Vec<u8>>(SETUP_TIMEOUT)?;
        let tx = session.open_channel::<Vec<u8>>()?;
        return respond(&mut LoanLink { tx, rx }, mode, size, warmup, iters);
    }
    let rx = session.accept_channel_timeout::<Payload>(SETUP_TIMEOUT)?;
    let tx = session.open_channel::<Payload>()?;
    let mut link = ChanLink { tx, rx };
    if mode == Mode::RttParked {
        respond_parked(session, link)
    } else {
        respond(&mut link, mode, size, warmup, iters)
    }
}

/// A libchan session over `sock` that must run on `want`: shared memory is allowed only for
/// [`Transport::Shm`]. Says on stderr which transport `side` got, and fails if it is not `want`.
fn chan_session(sock: UnixStream, role: Role, want: Transport, side: &str) -> Res<Session> {
    let opts = Options::new().shm(want == Transport::Shm);
    let session = Session::from_unix_stream_with(sock, role, &opts)?;
    check_transport(&session, want, side)?;
    Ok(session)
}

/// Says on stderr which transport `side` got, and fails if it is not `want`.
fn check_transport(session: &Session, want: Transport, side: &str) -> Res<()> {
    let got = session.transport();
    eprintln!("pingpong:   {side}: libchan session transport = {got}");
    if got != want {
        return Err(format!("{side}: libchan session runs on {got}, expected {want}").into());
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

impl ChildGuard {
    /// Fails if the child has already exited (it should still be working).
    fn check_running(&mut self) -> Res<()> {
        let child = self.0.as_mut().expect("child already reaped");
        match child.try_wait()? {
            Some(status) => Err(format!("child process exited early: {status}").into()),
            None => Ok(()),
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
    /// libchan session over the inherited socket, shared memory off.
    Chan,
    /// libchan session over the inherited socket, shared memory on.
    ChanShm,
    /// Raw frames over the inherited socket.
    Raw,
    /// The shared-memory floors, over an inherited memfd.
    Shm,
    /// libchan session over TCP to `--addr` (shared memory off).
    ChanTcp,
    /// Raw frames over TCP to `--addr`.
    RawTcp,
    /// libchan session over TLS to `--addr`, trusting the CA in `--ca`.
    ChanTls,
    /// Raw frames through rustls over TCP to `--addr`, trusting the CA in `--ca`.
    RawTls,
}

impl ChildRole {
    fn name(self) -> &'static str {
        match self {
            ChildRole::Chan => "chan",
            ChildRole::ChanShm => "chan-shm",
            ChildRole::Raw => "raw",
            ChildRole::Shm => "shm",
            ChildRole::ChanTcp => "chan-tcp",
            ChildRole::RawTcp => "raw-tcp",
            ChildRole::ChanTls => "chan-tls",
            ChildRole::RawTls => "raw-tls",
        }
    }
}

/// The command that re-executes this program as the other side of `run`, pinned to `cpu`.
fn child_command(role: ChildRole, run: &Run, cpu: usize) -> Res<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--child")
        .arg(role.name())
        .args(["--mode", run.mode.name()])
        .args(["--size", &run.size.to_string()])
        .args(["--warmup", &run.warmup.to_string()])
        .args(["--iters", &run.iters.to_string()])
        .args(["--cpu", &cpu.to_string()])
        .args(loan_mode().then_some("--loan"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Ok(cmd)
}

/// Re-executes this program as the other side; returns the guard and our end of the socket.
fn spawn_child(role: ChildRole, run: &Run, cpu: usize) -> Res<(ChildGuard, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    let child = {
        // The command owns `theirs` until it is dropped at the end of this block, so that
        // the parent keeps no copy of the child's end.
        let mut cmd = child_command(role, run, cpu)?;
        cmd.stdin(Stdio::from(OwnedFd::from(theirs)));
        cmd.spawn()?
    };
    Ok((ChildGuard(Some(child)), ours))
}

/// The CA certificate of a `tls` run, in a file for the child; removed on drop.
struct CaFile(String);

impl CaFile {
    fn write(pki: &TestPki) -> Res<CaFile> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pingpong-ca-{}-{n}.pem", std::process::id()));
        std::fs::write(&path, &pki.ca_pem)?;
        Ok(CaFile(path.to_string_lossy().into_owned()))
    }

    fn path(&self) -> &str {
        &self.0
    }
}

impl Drop for CaFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Re-executes this program as the other side, to connect to `addr` itself.
fn spawn_child_to(role: ChildRole, run: &Run, cpu: usize, addr: &str) -> Res<ChildGuard> {
    let mut cmd = child_command(role, run, cpu)?;
    cmd.args(["--addr", addr]).stdin(Stdio::null());
    Ok(ChildGuard(Some(cmd.spawn()?)))
}

/// Entry point of a re-executed child: its socket is its stdin (shm: its memfd is `--shm-fd`;
/// tcp: it connects to `--addr`).
fn child_main(args: &[String]) -> Res<()> {
    let mut role = None;
    let (mut mode, mut size, mut warmup, mut iters, mut cpu) = (Mode::Rtt, 0, 0, 0, None);
    let (mut shm_fd, mut yield_cpu, mut addr, mut ca) = (None, false, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--child" => {
                role = Some(match val()?.as_str() {
                    "chan" => ChildRole::Chan,
                    "chan-shm" => ChildRole::ChanShm,
                    "raw" => ChildRole::Raw,
                    "shm" => ChildRole::Shm,
                    "chan-tcp" => ChildRole::ChanTcp,
                    "raw-tcp" => ChildRole::RawTcp,
                    "chan-tls" => ChildRole::ChanTls,
                    "raw-tls" => ChildRole::RawTls,
                    r => return Err(format!("unknown child role {r}").into()),
                })
            }
            "--mode" => mode = Mode::parse(val()?)?,
            "--size" => size = val()?.parse()?,
            "--warmup" => warmup = val()?.parse()?,
            "--iters" => iters = val()?.parse()?,
            "--cpu" => cpu = Some(val()?.parse()?),
            "--shm-fd" => shm_fd = Some(val()?.parse::<RawFd>()?),
            "--yield" => yield_cpu = true,
            "--addr" => addr = Some(val()?.clone()),
            "--ca" => ca = Some(val()?.clone()),
            "--loan" => LOAN.store(true, std::sync::atomic::Ordering::Relaxed),
            x => return Err(format!("child: unknown argument {x}").into()),
        }
    }
    if let Some(cpu) = cpu {
        pin(cpu)?;
    }
    let sock = || -> Res<UnixStream> { Ok(io::stdin().as_fd().try_clone_to_owned()?.into()) };
    match role.ok_or("child: no role")? {
        r @ (ChildRole::Chan | ChildRole::ChanShm) => {
            let want = if r == ChildRole::ChanShm {
                Transport::Shm
            } else {
                Transport::Unix
            };
            let session = chan_session(sock()?, Role::Acceptor, want, "child")?;
            respond_on(&session, mode, size, warmup, iters)
        }
        ChildRole::Raw => respond(&mut RawLink::new(sock()?)?, mode, size, warmup, iters),
        r @ (ChildRole::ChanTcp | ChildRole::ChanTls) => {
            let addr = addr.ok_or("child: tcp needs --addr")?;
            let (opts, want) = if r == ChildRole::ChanTls {
                let ca = ca.ok_or("child: tls needs --ca")?;
                let opts = Options::new().tls_ca(ca)?.tls_server_name("localhost")?;
                (opts, Transport::Tls)
            } else {
                (Options::new(), Transport::Tcp)
            };
            let session = libchan::connect_with(&addr, &opts.shm(false))?;
            check_transport(&session, want, "child")?;
            // rtt-parked runs on shm only: the parent never asks this side for it.
            respond_on(&session, mode, size, warmup, iters)
        }
        ChildRole::RawTcp => {
            let addr = addr.ok_or("child: raw tcp needs --addr")?;
            let s = TcpStream::connect(addr.trim_start_matches("tcp://"))?;
            respond(&mut RawLink::tcp(s)?, mode, size, warmup, iters)
        }
        ChildRole::RawTls => {
            let addr = addr.ok_or("child: raw tls needs --addr")?;
            let ca = std::fs::read(ca.ok_or("child: raw tls needs --ca")?)?;
            let s = TcpStream::connect(addr.trim_start_matches("tls://"))?;
            s.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let conn = rustls::ClientConnection::new(tls_client_config(&ca)?, name)?;
            let mut link = RawLink::over(rustls::StreamOwned::new(conn, s));
            respond(&mut link, mode, size, warmup, iters)
        }
        ChildRole::Shm => {
            let fd = shm_fd.ok_or("child: shm needs --shm-fd")?;
            shm_child(fd, mode, size, warmup + iters, yield_cpu)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Transports.

/// The transports this tool knows. Add tcp/tls here.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TransportKind {
    /// In-process: two threads.
    Mem,
    /// Two processes over a unix socket.
    Unix,
    /// Two processes, a libchan session with shared memory on (floors: shared memory).
    Shm,
    /// Two processes over loopback TCP.
    Tcp,
    /// Two processes over TLS 1.3 (rustls, ring) on loopback TCP.
    Tls,
}

impl TransportKind {
    fn parse(s: &str) -> Res<Self> {
        match s {
            "mem" => Ok(TransportKind::Mem),
            "unix" => Ok(TransportKind::Unix),
            "shm" => Ok(TransportKind::Shm),
            "tcp" => Ok(TransportKind::Tcp),
            "tls" => Ok(TransportKind::Tls),
            _ => Err(format!("unknown transport {s} (mem, unix, shm, tcp, tls)").into()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            TransportKind::Mem => "mem",
            TransportKind::Unix => "unix",
            TransportKind::Shm => "shm",
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
        }
    }

    fn floor_name(self, mode: Mode) -> &'static str {
        match (self, mode) {
            (TransportKind::Mem, _) => "crossbeam bounded(256), 2 threads",
            (TransportKind::Unix, _) => "raw unix socket, 2 processes",
            (TransportKind::Shm, Mode::Rtt) => "cache-line ping-pong over a memfd, 2 processes",
            (TransportKind::Shm, Mode::RttParked) => {
                "futex ping-pong over a memfd, 2 processes, sleeping as long as libchan's sides"
            }
            (TransportKind::Shm, Mode::Stream) => "SPSC ring over a memfd, 2 processes",
            (TransportKind::Tcp, _) => "raw loopback TCP (TCP_NODELAY), 2 processes",
            (TransportKind::Tls, _) => "raw rustls TLS 1.3 over loopback TCP, 2 processes",
        }
    }

    /// Whether libchan implements this transport and mode (if not, only the floor runs).
    /// Every one this tool runs has a libchan side now (rtt-parked runs for shm only); a
    /// transport measured before libchan implements it (tcp, tls) returns false here.
    fn has_libchan(self, mode: Mode) -> bool {
        match self {
            TransportKind::Mem | TransportKind::Unix | TransportKind::Tcp | TransportKind::Tls => {
                mode != Mode::RttParked
            }
            TransportKind::Shm => true,
        }
    }

    /// libchan on this transport.
    fn measure_ours(self, run: &Run, cpus: (usize, usize)) -> Res<Measured> {
        match self {
            TransportKind::Tcp | TransportKind::Tls => self.measure_ours_net(run, cpus),
            TransportKind::Mem if loan_mode() => {
                let (atx, arx) = libchan::pipe::<Vec<u8>>();
                let (btx, brx) = libchan::pipe::<Vec<u8>>();
                let peer = LoanLink { tx: btx, rx: arx };
                let main = LoanLink { tx: atx, rx: brx };
                in_thread(run, cpus.1, main, peer)
            }
            TransportKind::Mem => {
                let (atx, arx) = libchan::pipe::<Payload>();
                let (btx, brx) = libchan::pipe::<Payload>();
                let peer = ChanLink { tx: btx, rx: arx };
                let main = ChanLink { tx: atx, rx: brx };
                in_thread(run, cpus.1, main, peer)
            }
            TransportKind::Unix | TransportKind::Shm => {
                let (role, want) = if self == TransportKind::Shm {
                    (ChildRole::ChanShm, Transport::Shm)
                } else {
                    (ChildRole::Chan, Transport::Unix)
                };
                let (guard, sock) = spawn_child(role, run, cpus.1)?;
                let measured = {
                    let session = chan_session(sock, Role::Connector, want, "parent")?;
                    if loan_mode() {
                        let tx = session.open_channel::<Vec<u8>>()?;
                        let rx = session.accept_channel_timeout::<Vec<u8>>(SETUP_TIMEOUT)?;
                        let measured = drive(
                            &mut LoanLink { tx, rx },
                            run.mode,
                            run.size,
                            run.warmup,
                            run.iters,
                        );
                        drop(session);
                        guard.finish()?;
                        return measured;
                    }
                    let tx = session.open_channel::<Payload>()?;
                    let rx = session.accept_channel_timeout::<Payload>(SETUP_TIMEOUT)?;
                    let mut link = ChanLink { tx, rx };
                    if run.mode == Mode::RttParked {
                        drive_parked(&session, link, run.size, run.warmup, run.iters)?
                    } else {
                        drive(&mut link, run.mode, run.size, run.warmup, run.iters)?
                    }
                };
                guard.finish()?;
                Ok(measured)
            }
        }
    }

    /// libchan over loopback TCP or TLS: this process listens, the child connects.
    fn measure_ours_net(self, run: &Run, cpus: (usize, usize)) -> Res<Measured> {
        let (listener, guard, want, _ca) = if self == TransportKind::Tls {
            let pki = TestPki::new()?;
            let opts = Options::new()
                .shm(false)
                .tls_identity_pem(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes())?;
            let listener = libchan::listen_with("tls://127.0.0.1:0", &opts)?;
            let ca = CaFile::write(&pki)?;
            let mut cmd = child_command(ChildRole::ChanTls, run, cpus.1)?;
            cmd.args(["--addr", &listener.local_addr()?, "--ca", ca.path()])
                .stdin(Stdio::null());
            let guard = ChildGuard(Some(cmd.spawn()?));
            (listener, guard, Transport::Tls, Some(ca))
        } else {
            let listener = libchan::listen_with("tcp://127.0.0.1:0", &Options::new().shm(false))?;
            let addr = listener.local_addr()?;
            let guard = spawn_child_to(ChildRole::ChanTcp, run, cpus.1, &addr)?;
            (listener, guard, Transport::Tcp, None)
        };
        let measured = {
            let session = listener.accept()?;
            check_transport(&session, want, "parent")?;
            if loan_mode() {
                let tx = session.open_channel::<Vec<u8>>()?;
                let rx = session.accept_channel_timeout::<Vec<u8>>(SETUP_TIMEOUT)?;
                drive(
                    &mut LoanLink { tx, rx },
                    run.mode,
                    run.size,
                    run.warmup,
                    run.iters,
                )?
            } else {
                let tx = session.open_channel::<Payload>()?;
                let rx = session.accept_channel_timeout::<Payload>(SETUP_TIMEOUT)?;
                drive(
                    &mut ChanLink { tx, rx },
                    run.mode,
                    run.size,
                    run.warmup,
                    run.iters,
                )?
            }
        };
        guard.finish()?;
        Ok(measured)
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
            TransportKind::Shm => measure_shm_floor(run, cpus),
            TransportKind::Tcp => {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let addr = format!("tcp://{}", listener.local_addr()?);
                let guard = spawn_child_to(ChildRole::RawTcp, run, cpus.1, &addr)?;
                let measured = {
                    let (sock, _) = listener.accept()?;
                    let mut link = RawLink::tcp(sock)?;
                    drive(&mut link, run.mode, run.size, run.warmup, run.iters)?
                };
                guard.finish()?;
                Ok(measured)
            }
            TransportKind::Tls => {
                let pki = TestPki::new()?;
                let config = pki.server_config()?;
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let addr = format!("tls://{}", listener.local_addr()?);
                let ca = CaFile::write(&pki)?;
                let mut cmd = child_command(ChildRole::RawTls, run, cpus.1)?;
                cmd.args(["--addr", &addr, "--ca", ca.path()])
                    .stdin(Stdio::null());
                let guard = ChildGuard(Some(cmd.spawn()?));
                let measured = {
                    let (sock, _) = listener.accept()?;
                    sock.set_nodelay(true)?;
                    let conn = rustls::ServerConnection::new(config)?;
                    let mut link = RawLink::over(rustls::StreamOwned::new(conn, sock));
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
    /// Round trips where both sides sleep in the kernel (shm only).
    RttParked,
    Stream,
}

impl Mode {
    fn parse(s: &str) -> Res<Self> {
        match s {
            "rtt" => Ok(Mode::Rtt),
            "rtt-parked" | "parked" => Ok(Mode::RttParked),
            "stream" => Ok(Mode::Stream),
            _ => Err(format!("unknown mode {s} (rtt, rtt-parked, stream)").into()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Rtt => "rtt",
            Mode::RttParked => "rtt-parked",
            Mode::Stream => "stream",
        }
    }

    /// The name in the table's 6-character column.
    fn short_name(self) -> &'static str {
        match self {
            Mode::RttParked => "parked",
            m => m.name(),
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
        // Each round trip sleeps twice (tens of microseconds).
        Mode::RttParked => 10_000,
        // 200k messages, or about 1 GiB for large ones.
        Mode::Stream => ((1usize << 30) / size.max(1)).clamp(2_000, 200_000),
    }
}

/// A tenth of the measured messages, from 100 to 10 000; for streams, at least 8 MiB of
/// traffic, so that a ring channel has gone once around its 4 MiB ring (whose pages are touched
/// for the first time on that lap) before the clock starts.
fn default_warmup(mode: Mode, size: usize, iters: usize) -> usize {
    let tenth = (iters / 10).clamp(100, 10_000);
    match mode {
        Mode::Stream => tenth.max((8 << 20) / (size + 64)),
        Mode::Rtt | Mode::RttParked => tenth,
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

const USAGE: &str =
    "usage: pingpong --transport mem|unix|shm|tcp|tls --size N [--iters K] [--warmup W] \
[--mode rtt|rtt-parked|stream] [--loan] [--json]\n  (--transport, --size and --mode take \
comma-separated lists; sizes may end in k or m; rtt-parked runs for shm only; --loan sends raw \
bytes through Sender::<Vec<u8>>::loan instead of typed messages, rtt and stream only)";

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
            "--loan" => LOAN.store(true, std::sync::atomic::Ordering::Relaxed),
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
    if loan_mode() {
        if modes.contains(&Mode::RttParked) {
            return Err("--loan does not run rtt-parked".into());
        }
        eprintln!("pingpong: libchan sides send raw bytes through Sender::<Vec<u8>>::loan");
    }
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
        if transports.contains(&TransportKind::Shm) {
            println!(
                "note: shm = libchan session with shared memory on; unix = shared memory off \
                 (both sides check session.transport())"
            );
            println!(
                "note: shm floors: rtt = cache-line ping-pong, parked = futex ping-pong with \
                 libchan's echo delays (payload one way, parent -> child, read fully); stream = \
                 SPSC ring; memcpy = one core copying size bytes, same run"
            );
            if modes.contains(&Mode::RttParked) {
                println!("note: shm parked libchan = {PARKED_NOTE}");
            }
        }
    }

    for &transport in &transports {
        for &mode in &modes {
            if mode == Mode::RttParked && transport != TransportKind::Shm {
                eprintln!(
                    "pingpong: {} {}: skipped (rtt-parked runs for shm only)",
                    transport.name(),
                    mode.name()
                );
                continue;
            }
            for &size in &sizes {
                let iters = iters.unwrap_or_else(|| default_iters(mode, size));
                let warmup = warmup.unwrap_or_else(|| default_warmup(mode, size, iters));
                let run = Run {
                    transport,
                    mode,
                    size,
                    warmup,
                    iters,
                };
                let label = format!("{} {} {size} B x {iters}", transport.name(), mode.name());
                eprintln!(
                    "pingpong: {label}: floor ({})...",
                    transport.floor_name(mode)
                );
                let t = Instant::now();
                let floor = Stats::of(transport.measure_floor(&run, cpus)?, size, iters);
                let memcpy = (transport == TransportKind::Shm
                    && mode == Mode::Stream
                    && size >= MEMCPY_MIN_SIZE)
                    .then(|| memcpy_bytes_per_s(size));
                let ours = if transport.has_libchan(mode) {
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
                    Some(ours)
                } else {
                    eprintln!(
                        "pingpong: {label}: floor done in {:.2} s; no libchan side: floor only",
                        t.elapsed().as_secs_f64()
                    );
                    None
                };
                let ratio = ours.as_ref().map_or(f64::NAN, |ours| match mode {
                    Mode::Rtt | Mode::RttParked => {
                        ours.p50.unwrap_or(f64::NAN) / floor.p50.unwrap_or(f64::NAN)
                    }
                    // Same message count and size on both sides: the msgs/s ratio is the
                    // bytes/s ratio, and is defined for size 0 too.
                    Mode::Stream => floor.msgs_per_s / ours.msgs_per_s,
                });
                if json {
                    // Keys beyond the common ones: shm adds memcpy (null below 64 KiB),
                    // libchan rtt-parked says how it was measured, a transport without a
                    // libchan side (none yet) says so.
                    let mut extra = String::new();
                    if ours.is_none() {
                        extra
                            .push_str(",\"libchan\":null,\"note\":\"no libchan side: floor only\"");
                    } else if mode == Mode::RttParked {
                        extra.push_str(&format!(",\"note\":\"{PARKED_NOTE}\""));
                    }
                    if transport == TransportKind::Shm {
                        extra.push_str(&format!(",\"memcpy_bytes_per_s\":{}", json_num(memcpy)));
                    }
                    println!(
                        "{{\"transport\":\"{}\",\"mode\":\"{}\",\"size\":{size},\"iters\":{iters},\
                         \"warmup\":{warmup},\"p50_ns\":{},\"p99_ns\":{},\"mean_ns\":{},\
                         \"msgs_per_s\":{},\"bytes_per_s\":{},\"floor\":\"{}\",\
                         \"floor_p50_ns\":{},\"floor_p99_ns\":{},\"floor_mean_ns\":{},\
                         \"floor_msgs_per_s\":{},\"floor_bytes_per_s\":{},\"ratio\":{},\
                         \"ratio_of\":\"{}\"{extra},\"cpus\":[{},{}]}}",
                        transport.name(),
                        mode.name(),
                        json_num(ours.as_ref().and_then(|o| o.p50)),
                        json_num(ours.as_ref().and_then(|o| o.p99)),
                        json_num(ours.as_ref().map(|o| o.mean)),
                        json_num(ours.as_ref().map(|o| o.msgs_per_s)),
                        json_num(ours.as_ref().map(|o| o.bytes_per_s)),
                        transport.floor_name(mode),
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
                            Mode::Rtt | Mode::RttParked => "p50 / floor p50",
                            Mode::Stream => "floor rate / rate",
                        },
                        cpus.0,
                        cpus.1,
                    );
                } else {
                    let dash = || "-".to_string();
                    println!(
                        "{:<5} {:<6} {:>7} {:>7} | {:>8} {:>8} {:>8} {:>8} {:>9} | {:>8} {:>8} {:>8.0} {:>8} {:>9.1} | {:>6}{}",
                        transport.name(),
                        mode.short_name(),
                        size,
                        iters,
                        fmt_opt(ours.as_ref().and_then(|o| o.p50)),
                        fmt_opt(ours.as_ref().and_then(|o| o.p99)),
                        ours.as_ref().map_or_else(dash, |o| format!("{:.0}", o.mean)),
                        ours.as_ref().map_or_else(dash, |o| fmt_rate(o.msgs_per_s)),
                        ours.as_ref()
                            .map_or_else(dash, |o| format!("{:.1}", o.bytes_per_s / 1e6)),
                        fmt_opt(floor.p50),
                        fmt_opt(floor.p99),
                        floor.mean,
                        fmt_rate(floor.msgs_per_s),
                        floor.bytes_per_s / 1e6,
                        if ours.is_some() {
                            format!("{ratio:.2}")
                        } else {
                            dash()
                        },
                        memcpy.map_or_else(String::new, |m| format!("  memcpy {:.1} MB/s", m / 1e6)),
                    );
                }
            }
        }
    }
    Ok(())
}

// =======================================================================================
// Shared-memory floors (`--transport shm`).
//
// libchan's own shm runs go through `TransportKind::measure_ours` like unix (a session with
// shared memory on); these are the floors they are measured against. Each runs between this process and a re-executed child (`--child shm --shm-fd N`),
// pinned like the other transports, over one memfd mapping: the parent creates and maps it,
// clears close-on-exec on the fd for the spawn and passes its number; the child maps the
// inherited fd. Layout:
//
//   offset   0   ping word, written by the parent (sequence number / ring write index)
//   offset 128   pong word, written by the child (echo / ring read index)
//   offset 4096  payload: one N-byte region (rtt modes) or the ring's records (stream)
//
// * rtt: cache-line ping-pong. The parent writes the N-byte payload, stores the sequence
//   number into the ping word (release) and spins until the child echoes it into the pong
//   word; the child spins on the ping word, reads and sums the whole payload, then echoes.
//   The payload travels one way; the timed span covers writing it.
// * rtt-parked: the same exchange on 32-bit futex words. Each side sleeps in FUTEX_WAIT
//   (shared, not PRIVATE: the waiters are in two processes) until its word changes, and the
//   writer calls FUTEX_WAKE after every store: each round trip pays two cross-core wake-ups.
//   Like libchan's parked run, the parent busy-waits PARKED_DELAY before each round trip
//   (untimed) and the child busy-waits PARKED_DELAY before echoing; the child stores the
//   delay it measured in the delay word before the echo, and the parent subtracts it.
// * stream: an SPSC ring of N-byte records (stride N rounded up to 64 B; 256 records, fewer
//   when that exceeds 2 MiB, at least 2). The parent fills a record and publishes the write
//   index; the child reads and sums the record and publishes the read index; each side
//   reloads the other's index only when it must wait. Clocked like the other streams: from
//   the first measured record until the child has consumed the last one.
// * memcpy (stream, N >= 64 KiB): one core copying N bytes between two buffers of this
//   process, repeatedly (about 1 GiB in all), in the same run.

/// How libchan's rtt-parked is measured (see the module docs).
const PARKED_NOTE: &str =
    "libchan rtt with the receiver asleep (echo delays 200 us; delay subtracted)";
/// Offset of the word the parent writes; the child's is one 128-byte line further, so that
/// adjacent-line prefetch does not couple them.
const SHM_PING: usize = 0;
/// Offset of the word the child writes.
const SHM_PONG: usize = 128;
/// Offset of the word where the rtt-parked child leaves the delay it waited (ns).
const SHM_DELAY: usize = 256;
/// Offset of the payload / ring records.
const SHM_DATA: usize = 4096;
/// Stream ring: at most this many records...
const SHM_RING_SLOTS: usize = 256;
/// ...and at most this many bytes (but at least two records).
const SHM_RING_BYTES: usize = 2 << 20;
/// What the parent stores in the ping word to end an rtt run.
const SHM_STOP: u64 = u64::MAX;
/// The same for rtt-parked's 32-bit futex word.
const SHM_STOP32: u32 = u32::MAX;
/// The stream reports memcpy bandwidth from this size up.
const MEMCPY_MIN_SIZE: usize = 64 * 1024;
/// A waiting side fails when its peer made no progress for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A spinning side checks on its peer every this many spins.
const SPINS_PER_CHECK: u32 = 1 << 16;
/// A parked side wakes up this often to check on its peer.
const PARK_CHECK: Duration = Duration::from_millis(100);

/// Where things are in the mapping for one run; both processes derive it from mode and size.
#[derive(Clone, Copy)]
struct ShmLayout {
    /// Distance between two records (stream), or the payload size (rtt modes).
    stride: usize,
    /// Records in the ring (stream), or 1.
    slots: usize,
}

impl ShmLayout {
    fn of(mode: Mode, size: usize) -> ShmLayout {
        match mode {
            Mode::Rtt | Mode::RttParked => ShmLayout {
                stride: size,
                slots: 1,
            },
            Mode::Stream => {
                let stride = size.next_multiple_of(64);
                let slots = (SHM_RING_BYTES / stride.max(1)).clamp(2, SHM_RING_SLOTS);
                ShmLayout { stride, slots }
            }
        }
    }

    fn map_len(self) -> usize {
        SHM_DATA + self.stride * self.slots
    }

    /// Offset, from the start of the data area, of the record with this index.
    fn record(self, i: u64) -> usize {
        (i % self.slots as u64) as usize * self.stride
    }
}

/// A shared read-write mapping of a memfd, unmapped on drop.
struct ShmMap {
    base: NonNull<u8>,
    len: usize,
}

impl ShmMap {
    /// A fresh zero-filled memfd of `len` bytes, mapped; the fd is close-on-exec.
    fn create(len: usize) -> Res<(ShmMap, OwnedFd)> {
        use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
        let fd = memfd_create("libchan-pingpong", MemfdFlags::CLOEXEC)?;
        ftruncate(&fd, len as u64)?;
        let map = ShmMap::map(&fd, len)?;
        Ok((map, fd))
    }

    /// Maps the first `len` bytes of `fd`, shared, read-write.
    fn map(fd: impl AsFd, len: usize) -> Res<ShmMap> {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a new mapping at an address the kernel picks: it aliases no Rust object.
        let p = unsafe { mmap(ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)? };
        let base = NonNull::new(p.cast::<u8>()).ok_or("mmap returned null")?;
        Ok(ShmMap { base, len })
    }

    /// The 64-bit atomic word at `off` in the header.
    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(off % 8 == 0 && off + 8 <= SHM_DATA.min(self.len));
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); it lives as long as
        // `self`, and both processes only ever access it atomically.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    /// The 32-bit atomic (futex) word at `off` in the header.
    fn word32(&self, off: usize) -> &AtomicU32 {
        assert!(off % 4 == 0 && off + 4 <= SHM_DATA.min(self.len));
        // SAFETY: as in `word`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    /// Pointer to `len` data bytes at `off` (from the start of the data area), bounds-checked.
    fn data(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            SHM_DATA + off + len <= self.len,
            "data range out of the mapping"
        );
        // SAFETY: in bounds, checked just above.
        unsafe { self.base.as_ptr().add(SHM_DATA + off) }
    }

    /// Writes `len` bytes of `byte` at data offset `off`.
    ///
    /// # Safety
    /// The peer must not access that range until we publish it (release store).
    unsafe fn fill(&self, off: usize, len: usize, byte: u8) {
        let p = self.data(off, len);
        // SAFETY: in bounds (`data` checks); exclusive access is the caller's promise.
        unsafe { ptr::write_bytes(p, byte, len) }
    }

    /// The `len` data bytes at `off`.
    ///
    /// # Safety
    /// The peer must have published that range (we acquired it) and must not write it while
    /// the slice lives.
    unsafe fn bytes(&self, off: usize, len: usize) -> &[u8] {
        let p = self.data(off, len);
        // SAFETY: in bounds (`data` checks); no concurrent writer is the caller's promise.
        unsafe { std::slice::from_raw_parts(p, len) }
    }
}

impl Drop for ShmMap {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range; every borrow of it (words, slices) borrows
        // `self`, so none outlives this call.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Waits on the peer (spinning or parked), checking now and then that it is alive and
/// making progress, so that a dead or stuck peer is an error, not a hang.
struct Watch<'a> {
    /// Fails once the peer is gone.
    peer_alive: &'a mut dyn FnMut() -> Res<()>,
    /// Both sides share one CPU: yield instead of spinning.
    yield_cpu: bool,
}

impl Watch<'_> {
    /// Spins until `ready` returns a value.
    fn spin_for<T>(&mut self, mut ready: impl FnMut() -> Option<T>) -> Res<T> {
        let (mut spins, mut since) = (0u32, None);
        loop {
            if let Some(v) = ready() {
                return Ok(v);
            }
            spins = spins.wrapping_add(1);
            if spins % SPINS_PER_CHECK == 0 {
                self.check(&mut since)?;
            }
            if self.yield_cpu {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Sleeps on the futex `word` while it holds `old`; returns the new value.
    fn park_while(&mut self, word: &AtomicU32, old: u32) -> Res<u32> {
        use rustix::io::Errno;
        use rustix::thread::futex;
        let timeout = futex::Timespec {
            tv_sec: 0,
            tv_nsec: PARK_CHECK.as_nanos() as _,
        };
        let mut since = None;
        loop {
            let v = word.load(Acquire);
            if v != old {
                return Ok(v);
            }
            // Not PRIVATE: the waker is another process.
            match futex::wait(word, futex::Flags::empty(), old, Some(&timeout)) {
                Ok(()) => {}
                Err(Errno::AGAIN | Errno::INTR) => {}
                Err(Errno::TIMEDOUT) => self.check(&mut since)?,
                Err(e) => return Err(format!("futex wait: {e}").into()),
            }
        }
    }

    fn check(&mut self, since: &mut Option<Instant>) -> Res<()> {
        (self.peer_alive)()?;
        if since.get_or_insert_with(Instant::now).elapsed() > STALL_TIMEOUT {
            return Err(format!("peer made no progress for {STALL_TIMEOUT:?}").into());
        }
        Ok(())
    }
}

/// Wakes the (other-process) waiter on `word`.
fn futex_wake(word: &AtomicU32) -> Res<()> {
    use rustix::thread::futex;
    futex::wake(word, futex::Flags::empty(), 1)?;
    Ok(())
}

/// Parent side of an shm floor: makes the mapping, spawns the child, measures.
fn measure_shm_floor(run: &Run, cpus: (usize, usize)) -> Res<Measured> {
    let total = run.warmup + run.iters;
    if run.mode == Mode::RttParked && total >= SHM_STOP32 as usize {
        return Err("rtt-parked: too many round trips for a 32-bit futex word".into());
    }
    let layout = ShmLayout::of(run.mode, run.size);
    let (map, fd) = ShmMap::create(layout.map_len())?;
    let yield_cpu = cpus.0 == cpus.1;
    let spawned = {
        // The child inherits the memfd: clear close-on-exec for this spawn. No other
        // thread of this process starts programs meanwhile, and `fd` is closed right after.
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty())?;
        let mut cmd = child_command(ChildRole::Shm, run, cpus.1)?;
        cmd.args(["--shm-fd", &fd.as_raw_fd().to_string()])
            .stdin(Stdio::null());
        if yield_cpu {
            cmd.arg("--yield");
        }
        let spawned = cmd.spawn();
        drop(fd); // The mapping keeps the memory; only the child holds the fd now.
        spawned?
    };
    let mut guard = ChildGuard(Some(spawned));
    let measured = {
        let mut alive = || guard.check_running();
        let mut watch = Watch {
            peer_alive: &mut alive,
            yield_cpu,
        };
        shm_drive(&map, layout, run, &mut watch)?
    };
    guard.finish()?;
    Ok(measured)
}

/// The measuring (parent) side of the shm floors.
fn shm_drive(map: &ShmMap, layout: ShmLayout, run: &Run, w: &mut Watch) -> Res<Measured> {
    let (size, total) = (run.size, run.warmup + run.iters);
    let mut samples = Vec::with_capacity(run.iters);
    let mut last_report = Instant::now();
    let mut progress = |i: usize, dt: Duration| {
        if i >= run.warmup {
            samples.push(dt.as_nanos() as u64);
        }
        if i % 1024 == 0 && last_report.elapsed() > Duration::from_secs(2) {
            eprintln!("pingpong:   {i}/{total} round trips");
            last_report = Instant::now();
        }
    };
    match run.mode {
        Mode::Rtt => {
            let (ping, pong) = (map.word(SHM_PING), map.word(SHM_PONG));
            for i in 0..total {
                let seq = i as u64 + 1;
                let t0 = Instant::now();
                // SAFETY: the child reads the payload only once it sees `seq`, and it is done
                // with the previous one: it echoed it.
                unsafe { map.fill(0, size, seq as u8) };
                ping.store(seq, Release);
                w.spin_for(|| (pong.load(Acquire) == seq).then_some(()))?;
                progress(i, t0.elapsed());
            }
            ping.store(SHM_STOP, Release);
        }
        Mode::RttParked => {
            let (ping, pong) = (map.word32(SHM_PING), map.word32(SHM_PONG));
            for i in 0..total {
                let seq = i as u32 + 1;
                // As in libchan's parked run: the child has slept this long when pinged.
                busy_wait(PARKED_DELAY);
                let t0 = Instant::now();
                // SAFETY: as for rtt.
                unsafe { map.fill(0, size, seq as u8) };
                ping.store(seq, Release);
                futex_wake(ping)?;
                let got = w.park_while(pong, seq - 1)?;
                let rtt = t0.elapsed();
                // Stored before the echo, which `park_while` acquired.
                let delay = Duration::from_nanos(map.word(SHM_DELAY).load(Relaxed));
                progress(i, rtt.saturating_sub(delay));
                if got != seq {
                    return Err(format!("child echoed {got}, expected {seq}").into());
                }
            }
            ping.store(SHM_STOP32, Release);
            futex_wake(ping)?;
        }
        Mode::Stream => {
            let (wr, rd) = (map.word(SHM_PING), map.word(SHM_PONG));
            let slots = layout.slots as u64;
            let mut read_seen = 0u64;
            let mut produce = |w: &mut Watch, range: std::ops::Range<u64>| -> Res<()> {
                for i in range {
                    if i - read_seen == slots {
                        read_seen = w.spin_for(|| {
                            let r = rd.load(Acquire);
                            (i - r < slots).then_some(r)
                        })?;
                    }
                    // SAFETY: the child has consumed record i - slots (read index > it) and
                    // reads record i only after we publish the write index i + 1.
                    unsafe { map.fill(layout.record(i), size, i as u8) };
                    wr.store(i + 1, Release);
                }
                Ok(())
            };
            let consumed =
                |w: &mut Watch, n: u64| w.spin_for(|| (rd.load(Acquire) == n).then_some(()));
            let (warmup, total) = (run.warmup as u64, total as u64);
            produce(w, 0..warmup)?;
            consumed(w, warmup)?;
            let t0 = Instant::now();
            produce(w, warmup..total)?;
            consumed(w, total)?;
            return Ok(Measured::Stream(t0.elapsed()));
        }
    }
    Ok(Measured::Rtt(samples))
}

/// The child side of the shm floors: echoes (rtt modes) or consumes `total` records.
fn shm_child(fd: RawFd, mode: Mode, size: usize, total: usize, yield_cpu: bool) -> Res<()> {
    if fd <= 2 {
        return Err(format!("child: bad --shm-fd {fd}").into());
    }
    // SAFETY: the parent cleared close-on-exec on this memfd and passed its number; nothing
    // else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let layout = ShmLayout::of(mode, size);
    let len = rustix::fs::fstat(&fd)?.st_size as usize;
    if len < layout.map_len() {
        return Err(format!(
            "child: memfd is {len} B, the layout needs {}",
            layout.map_len()
        )
        .into());
    }
    let map = ShmMap::map(&fd, len)?;
    drop(fd);
    let parent = rustix::process::getppid();
    let mut alive = || -> Res<()> {
        if rustix::process::getppid() != parent {
            return Err("child: the parent is gone".into());
        }
        Ok(())
    };
    let w = &mut Watch {
        peer_alive: &mut alive,
        yield_cpu,
    };
    match mode {
        Mode::Rtt => {
            let (ping, pong) = (map.word(SHM_PING), map.word(SHM_PONG));
            let mut last = 0;
            loop {
                let seq = w.spin_for(|| {
                    let v = ping.load(Acquire);
                    (v != last).then_some(v)
                })?;
                if seq == SHM_STOP {
                    return Ok(());
                }
                // SAFETY: the parent wrote the payload before publishing `seq` (we acquired
                // it) and writes it again only after our echo.
                touch_check(seq, unsafe { map.bytes(0, size) })?;
                pong.store(seq, Release);
                last = seq;
            }
        }
        Mode::RttParked => {
            let (ping, pong) = (map.word32(SHM_PING), map.word32(SHM_PONG));
            let mut last = 0;
            loop {
                let seq = w.park_while(ping, last)?;
                if seq == SHM_STOP32 {
                    return Ok(());
                }
                // SAFETY: as for rtt.
                touch_check(u64::from(seq), unsafe { map.bytes(0, size) })?;
                // As in libchan's parked run: the parent sleeps this long before the echo.
                let waited = busy_wait(PARKED_DELAY);
                map.word(SHM_DELAY).store(waited.as_nanos() as u64, Relaxed);
                pong.store(seq, Release);
                futex_wake(pong)?;
                last = seq;
            }
        }
        Mode::Stream => {
            let (wr, rd) = (map.word(SHM_PING), map.word(SHM_PONG));
            let mut written_seen = 0u64;
            for i in 0..total as u64 {
                if i == written_seen {
                    written_seen = w.spin_for(|| {
                        let v = wr.load(Acquire);
                        (v > i).then_some(v)
                    })?;
                }
                // SAFETY: the parent published record i (write index > i, acquired) and
                // reuses its slot only after our read index passes it.
                touch_check(i, unsafe { map.bytes(layout.record(i), size) })?;
                rd.store(i + 1, Release);
            }
            Ok(())
        }
    }
}

/// Single-core memcpy bandwidth for `size`-byte copies between two buffers, in bytes/s.
fn memcpy_bytes_per_s(size: usize) -> f64 {
    let src = vec![0x5a_u8; size];
    let mut dst = vec![0_u8; size];
    let reps = ((1usize << 30) / size.max(1)).clamp(16, 1 << 20);
    let mut copy = |n: usize| {
        for _ in 0..n {
            dst.copy_from_slice(black_box(&src[..]));
            black_box(&mut dst);
        }
    };
    copy(reps / 10 + 1);
    let t0 = Instant::now();
    copy(reps);
    (reps * size) as f64 / t0.elapsed().as_secs_f64()
}
