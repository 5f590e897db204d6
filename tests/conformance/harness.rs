//! The transport harness: everything that differs between transports lives here.
//!
//! A case is a generic function over [`Transport`]; `main.rs` instantiates every case once per
//! transport. Adding a transport is one `impl Transport` here plus one `conformance!` line.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use libchan::{Message, Msg, Options, Receiver, RecvTimeoutError, Role, Sender, Session};

/// How long any single wait in a case may take before the case fails as hung.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// How long a whole case may run before the watchdog fails it.
pub const WATCHDOG: Duration = Duration::from_secs(10);

/// A transport under test.
///
/// Every method returns channels whose two ends both live in this process, as they would in
/// two processes: sending and receiving are done by different threads where the volume is
/// larger than a socket buffer (unix sessions have no I/O thread).
pub trait Transport: Sized + Send + Sync + 'static {
    /// Short name, used in failure messages.
    fn name() -> &'static str;

    /// A fresh harness (for session transports: a fresh connected pair).
    fn new() -> Self;

    /// A channel across the transport, ready to use. On session transports every channel made
    /// by one harness shares the same connection.
    fn channel<T: Message>(&self) -> (Sender<T>, Receiver<T>);

    /// A channel whose receiving end is not created ("accepted") yet: messages may be sent at
    /// once, and the returned closure produces the receiver later. It runs on a connection of
    /// its own so that other channels never race for the pending accept.
    fn late_channel<T: Message>(&self) -> (Sender<T>, LateReceiver<T>);

    /// A sender into a channel that nobody ever accepts or reads, on the same connection as
    /// [`channel`](Transport::channel)'s channels (it travels in the opposite direction on
    /// session transports, so that the pending accept cannot be taken by `channel`). Dropping
    /// the returned guard makes the channel's far end go away (on session transports it closes
    /// the connection), which unblocks its senders.
    fn unaccepted<T: Message>(&self) -> (Sender<T>, Box<dyn std::any::Any + Send>);

    /// A channel on a connection that nothing else holds: once both ends are dropped the
    /// connection itself closes (gracefully).
    fn channel_alone<T: Message>() -> (Sender<T>, Receiver<T>);

    /// Whether messages may carry fds and byte streams on this transport.
    fn passes_fds() -> bool;

    /// The largest message a channel of this transport must refuse to carry, if testing the
    /// limit is affordable (it is not for mem: its limit is 2 GiB).
    fn max_message() -> Option<usize>;

    /// The two sessions under the channels, on session transports: `(sending side, receiving
    /// side)` of [`channel`](Transport::channel)'s channels.
    fn sessions(&self) -> Option<(Arc<Session>, Arc<Session>)>;

    /// Channels tracked by the connection, both sides together, after reading whatever frames
    /// are pending; `None` on transports without connection tables.
    fn channel_count(&self) -> Option<usize>;

    /// A raw byte stream to a freshly handshaken session: the test speaks the wire protocol on
    /// the stream itself (docs/PROTOCOL.md). `None` when the transport has no wire.
    fn raw_peer() -> Option<(Raw, Session)>;
}

/// Produces the receiving end of a [`Transport::late_channel`].
pub type LateReceiver<T> = Box<dyn FnOnce() -> Receiver<T> + Send>;

/// The in-process transport: `libchan::pipe`.
pub struct MemT;

impl Transport for MemT {
    fn name() -> &'static str {
        "mem"
    }

    fn new() -> Self {
        MemT
    }

    fn channel<T: Message>(&self) -> (Sender<T>, Receiver<T>) {
        libchan::pipe()
    }

    fn late_channel<T: Message>(&self) -> (Sender<T>, LateReceiver<T>) {
        // A pipe's receiver exists from the start; "late" means nobody receives until later.
        let (tx, rx) = libchan::pipe();
        (tx, Box::new(move || rx))
    }

    fn unaccepted<T: Message>(&self) -> (Sender<T>, Box<dyn std::any::Any + Send>) {
        let (tx, rx) = libchan::pipe::<T>();
        (tx, Box::new(rx))
    }

    fn channel_alone<T: Message>() -> (Sender<T>, Receiver<T>) {
        libchan::pipe()
    }

    fn passes_fds() -> bool {
        true
    }

    fn max_message() -> Option<usize> {
        // The mem limit is rkyv's 2 GiB reach: allocating that in a test is not affordable.
        None
    }

    fn sessions(&self) -> Option<(Arc<Session>, Arc<Session>)> {
        None
    }

    fn channel_count(&self) -> Option<usize> {
        None
    }

    fn raw_peer() -> Option<(Raw, Session)> {
        None
    }
}

/// How a session transport connects two sessions in this process: the only part of a session
/// transport that differs between `unix`, `shm`, `tcp` and the others.
pub trait Wire: Send + Sync + 'static {
    /// Short name, used in failure messages.
    const NAME: &'static str;
    /// The transport both sessions must report.
    const TRANSPORT: libchan::Transport;
    /// Whether fds and byte streams travel on this transport.
    const FDS: bool = true;

    /// A connected pair of sessions: (connector, acceptor).
    fn connect() -> (Session, Session);

    /// A raw byte stream to a session whose handshake is done: the test writes frames on it.
    fn raw() -> (Raw, Session);
}

/// Sessions over a `Session::pair` in this process: on the socket alone (`SHM = false`, the
/// `unix` transport) or with shared-memory rings (`SHM = true`, the `shm` transport).
pub struct Pair<const SHM: bool>;

impl<const SHM: bool> Wire for Pair<SHM> {
    const NAME: &'static str = if SHM { "shm" } else { "unix" };
    const TRANSPORT: libchan::Transport = if SHM {
        libchan::Transport::Shm
    } else {
        libchan::Transport::Unix
    };

    fn connect() -> (Session, Session) {
        Session::pair_with(&Options::new().shm(SHM)).expect("Session::pair")
    }

    fn raw() -> (Raw, Session) {
        let (mut raw, theirs) = UnixStream::pair().expect("socketpair");
        // Our hello first: the handshake then completes without a second thread.
        raw.write_all(&crate::wire::hello()).expect("write hello");
        let opts = Options::new().shm(SHM);
        let session =
            Session::from_unix_stream_with(theirs, Role::Acceptor, &opts).expect("handshake");
        (Raw::Unix(raw), session)
    }
}

/// Sessions over TCP on loopback.
pub struct TcpWire;

impl Wire for TcpWire {
    const NAME: &'static str = "tcp";
    const TRANSPORT: libchan::Transport = libchan::Transport::Tcp;

    fn connect() -> (Session, Session) {
        // Without shared memory: on loopback the session would otherwise move to shm
        // (PROTOCOL.md section 2.4) and this suite would not test TCP.
        tcp_pair(Options::new().shm(false))
    }

    fn raw() -> (Raw, Session) {
        let listener = libchan::listen("tcp://127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("local_addr");
        let mut raw = TcpStream::connect(addr.trim_start_matches("tcp://")).expect("connect");
        raw.write_all(&crate::wire::hello()).expect("write hello");
        let session = listener.accept().expect("handshake");
        (Raw::Tcp(raw), session)
    }
}

/// Sessions that start on loopback TCP and move to a unix socket and shared memory (same host,
/// same network namespace: PROTOCOL.md section 2.4).
pub struct UpgradedWire;

impl Wire for UpgradedWire {
    const NAME: &'static str = "tcp_upgraded";
    const TRANSPORT: libchan::Transport = libchan::Transport::Shm;

    fn connect() -> (Session, Session) {
        tcp_pair(Options::new())
    }

    fn raw() -> (Raw, Session) {
        // The upgrade by hand: the request on TCP, the offer, the token on the offered
        // abstract socket, then our hello there.
        let listener = libchan::listen("tcp://127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("local_addr");
        // The server answers the request while someone accepts.
        let accepted = thread::spawn(move || listener.accept());
        let mut tcp = TcpStream::connect(addr.trim_start_matches("tcp://")).expect("connect");
        tcp.set_read_timeout(Some(PATIENCE)).expect("timeout");
        tcp.write_all(b"LCHU\x01\x00\x00\x00")
            .expect("upgrade request");
        let mut offer = [0u8; 56];
        tcp.read_exact(&mut offer).expect("upgrade offer");
        assert_eq!(&offer[..8], b"LCHO\x01\x00\x01\x00", "an offer");
        let name = std::os::unix::net::SocketAddr::from_abstract_name(&offer[24..56])
            .expect("abstract name");
        let mut raw = UnixStream::connect_addr(&name).expect("connect to the offer");
        raw.write_all(b"LCHT\0\0\0\0").expect("token");
        raw.write_all(&offer[8..24]).expect("token");
        raw.write_all(&crate::wire::hello()).expect("write hello");
        // Closing TCP commits the move.
        drop(tcp);
        let session = accepted.join().expect("accept thread").expect("handshake");
        (Raw::Unix(raw), session)
    }
}

/// A session pair over loopback TCP, the client using `client`: (connector, acceptor).
fn tcp_pair(client: Options) -> (Session, Session) {
    let listener = libchan::listen("tcp://127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("local_addr");
    let client = thread::spawn(move || libchan::connect_with(&addr, &client).expect("connect"));
    let server = listener.accept().expect("accept");
    (client.join().expect("connect thread"), server)
}

/// The raw end of [`Wire::raw`].
pub enum Raw {
    /// A unix stream socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
    /// A WebSocket connection: bytes travel as binary messages.
    Ws(crate::ws_wire::RawWs),
    /// A TLS connection (rustls).
    Tls(crate::tls_wire::RawTls),
}

impl Raw {
    /// Another handle on the same stream.
    pub fn try_clone(&self) -> std::io::Result<Raw> {
        Ok(match self {
            Raw::Unix(s) => Raw::Unix(s.try_clone()?),
            Raw::Tcp(s) => Raw::Tcp(s.try_clone()?),
            Raw::Ws(s) => Raw::Ws(s.try_clone()?),
            Raw::Tls(s) => Raw::Tls(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Raw::Unix(s) => s.set_read_timeout(t),
            Raw::Tcp(s) => s.set_read_timeout(t),
            Raw::Ws(s) => s.set_read_timeout(t),
            Raw::Tls(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Raw {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Raw::Unix(s) => s.read(buf),
            Raw::Tcp(s) => s.read(buf),
            Raw::Ws(s) => s.read(buf),
            Raw::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Raw {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Raw::Unix(s) => s.write(buf),
            Raw::Tcp(s) => s.write(buf),
            Raw::Ws(s) => s.write(buf),
            Raw::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Session transports: two sessions connected by the wire `W`.
pub struct SessionT<W: Wire> {
    /// Opens the channels of `channel()` (the connector).
    a: Arc<Session>,
    /// Accepts them (the acceptor).
    b: Arc<Session>,
    wire: std::marker::PhantomData<W>,
}

/// The unix transport: frames on the socket.
pub type UnixT = SessionT<Pair<false>>;
/// The shm transport: rings in shared memory, the socket for control.
pub type ShmT = SessionT<Pair<true>>;
/// The tcp transport: frames on a loopback TCP connection.
pub type TcpT = SessionT<TcpWire>;
/// The tcp transport upgraded on one host: started on TCP, moved to shared memory.
pub type UpgradedT = SessionT<UpgradedWire>;

/// A session pair of the wire `W`, checked to run on its transport.
fn pair<W: Wire>() -> (Session, Session) {
    let (a, b) = W::connect();
    assert_eq!((a.transport(), b.transport()), (W::TRANSPORT, W::TRANSPORT));
    (a, b)
}

impl<W: Wire> Transport for SessionT<W> {
    fn name() -> &'static str {
        W::NAME
    }

    fn new() -> Self {
        let (a, b) = pair::<W>();
        SessionT {
            a: Arc::new(a),
            b: Arc::new(b),
            wire: std::marker::PhantomData,
        }
    }

    fn channel<T: Message>(&self) -> (Sender<T>, Receiver<T>) {
        // open_channel does not block, and accept_channel reads the OPEN frame itself.
        let tx = self.a.open_channel::<T>().expect("open_channel");
        let rx = self
            .b
            .accept_channel_timeout::<T>(PATIENCE)
            .expect("accept_channel");
        (tx, rx)
    }

    fn late_channel<T: Message>(&self) -> (Sender<T>, LateReceiver<T>) {
        let (a, b) = pair::<W>();
        let tx = a.open_channel::<T>().expect("open_channel");
        (
            tx,
            Box::new(move || {
                b.accept_channel_timeout::<T>(PATIENCE)
                    .expect("accept_channel")
            }),
        )
    }

    fn unaccepted<T: Message>(&self) -> (Sender<T>, Box<dyn std::any::Any + Send>) {
        let tx = self.b.open_channel::<T>().expect("open_channel");
        (tx, Box::new(CloseOnDrop(self.b.clone())))
    }

    fn channel_alone<T: Message>() -> (Sender<T>, Receiver<T>) {
        let (a, b) = pair::<W>();
        let tx = a.open_channel::<T>().expect("open_channel");
        let rx = b
            .accept_channel_timeout::<T>(PATIENCE)
            .expect("accept_channel");
        (tx, rx)
    }

    fn passes_fds() -> bool {
        W::FDS
    }

    fn max_message() -> Option<usize> {
        Some(16 << 20)
    }

    fn sessions(&self) -> Option<(Arc<Session>, Arc<Session>)> {
        Some((self.a.clone(), self.b.clone()))
    }

    fn channel_count(&self) -> Option<usize> {
        // Nothing reads an idle session: CLOSE frames sit in the socket until some thread
        // waits on it. A short accept makes this thread read both sides; every case accepts
        // its channels at once, so no pending accept can be taken (and refused) here.
        for s in [&self.a, &self.b] {
            let _ = s.accept_channel_timeout::<Pump>(Duration::from_millis(20));
        }
        Some(self.a.channel_count() + self.b.channel_count())
    }

    fn raw_peer() -> Option<(Raw, Session)> {
        let (mut raw, session) = W::raw();
        let mut peer_hello = [0u8; 32];
        raw.set_read_timeout(Some(PATIENCE)).expect("timeout");
        raw.read_exact(&mut peer_hello).expect("read hello");
        assert_eq!(&peer_hello[..4], b"LCHN");
        Some((raw, session))
    }
}

/// Closes a session when dropped: the far end of an unaccepted channel "goes away".
struct CloseOnDrop(Arc<Session>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A message type no case opens a channel for (used to drive sessions in `channel_count`).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Pump;

/// Runs `body` on its own thread; a hang becomes a failure after `WATCHDOG` and a panic in the
/// body fails the test with the body's message.
pub fn watchdog<F: FnOnce() + Send + 'static>(name: &str, body: F) {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let handle = thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            body();
            let _ = done_tx.send(());
        })
        .expect("spawn test body");
    match done_rx.recv_timeout(WATCHDOG) {
        Ok(()) => handle.join().expect("body finished"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: fail with its message.
            if let Err(e) = handle.join() {
                std::panic::resume_unwind(e);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{name}: hung for more than {WATCHDOG:?}")
        }
    }
}

/// Receives the next message or fails the case after `PATIENCE`.
#[track_caller]
pub fn next<T: Message>(rx: &Receiver<T>) -> Msg<T> {
    match rx.recv_timeout(PATIENCE) {
        Ok(m) => m,
        Err(e) => panic!("expected a message, got {e:?}"),
    }
}

/// Receives the end of the channel, or fails: a message, or nothing within `PATIENCE`.
#[track_caller]
pub fn end<T: Message>(rx: &Receiver<T>) -> RecvTimeoutError {
    match rx.recv_timeout(PATIENCE) {
        Ok(_) => panic!("expected the channel to end, got a message"),
        Err(RecvTimeoutError::Timeout) => panic!("the channel did not end in {PATIENCE:?}"),
        Err(e) => e,
    }
}

/// Spawns a named helper thread of a case.
pub fn spawn<R: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> thread::JoinHandle<R> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .expect("spawn")
}

/// Joins a helper thread, failing the case if it panicked or is still running after
/// `PATIENCE` (the watchdog would catch it too, with a less precise message).
#[track_caller]
pub fn join<R>(h: thread::JoinHandle<R>) -> R {
    let deadline = Instant::now() + PATIENCE;
    while !h.is_finished() {
        assert!(
            Instant::now() < deadline,
            "helper thread {:?} did not finish in {PATIENCE:?}",
            h.thread().name()
        );
        thread::sleep(Duration::from_millis(1));
    }
    match h.join() {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Polls `cond` until it holds, failing after `PATIENCE`.
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}
