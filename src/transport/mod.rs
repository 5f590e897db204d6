//! Sessions: one connection that multiplexes any number of channels in both directions.
//!
//! `listen`/`connect` pick the transport from the address. This module drives the sans-io
//! protocol (`crate::proto`) over real sockets; it holds no unsafe code.
//!
//! | address        | transport                                    |
//! |----------------|----------------------------------------------|
//! | `unix:PATH`    | unix stream socket at a filesystem path       |
//! | `unix:@NAME`   | unix stream socket in the abstract namespace  |
//!
//! Between two processes of the same uid, a unix session moves its messages through shared
//! memory (`shm`, see [`shm`]) unless [`Options::shm`] turns it off; the socket then carries
//! control only. [`Trust::Untrusted`] extends shared memory to peers of any uid, copying every
//! message out of the ring before it is validated.

mod blob;
mod chan;
mod closer;
mod conn;
mod direct;
mod keepalive;
mod link;
mod net;
mod pump;
mod shm;
mod tcp;
mod tls;
mod ws;

use std::fmt;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use conn::Conn;

use crate::channel::{Receiver, SendCore, Sender, Wait};
use crate::error::Error;
use crate::message::{fingerprint, Message};
use crate::proto::frame::ResetReason;
use crate::proto::handshake::{Features, Limits};

/// How sessions are set up.
///
/// ```
/// // Keep a same-host session on the socket (no shared memory):
/// let opts = libchan::Options::new().shm(false);
/// let (a, _b) = libchan::Session::pair_with(&opts).unwrap();
/// assert_eq!(a.transport(), libchan::Transport::Unix);
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    shm: bool,
    trust: Trust,
    /// Certificates and keys for `tls://` and `wss://` (see the `tls` module).
    tls: tls::TlsOptions,
    keepalive: keepalive::Keepalive,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            shm: true,
            trust: Trust::default(),
            tls: tls::TlsOptions::default(),
            keepalive: keepalive::Keepalive::default(),
        }
    }
}

/// How far a session trusts its peer with shared memory (see docs/SECURITY.md, "Shared
/// memory").
///
/// A message that arrives through a shared-memory ring lives in pages the peer can still write.
/// With [`SameUid`](Trust::SameUid) (the default) it is validated and read in place, which is
/// sound only if the peer does not rewrite it meanwhile: shared memory is then used only with
/// peers of this process's own uid, which could write this process's memory anyway.
/// With [`Untrusted`](Trust::Untrusted) every ring message is first copied into a private
/// buffer, and only the copy is validated and read: shared memory is then safe with peers of
/// any uid, and is offered to all of them.
///
/// Each side decides for itself, and shared memory needs both: a session between two uids runs
/// on shared memory only when *both* sides use `Untrusted` (a default side never offers shared
/// memory to a peer of another uid).
///
/// ```
/// use libchan::{Options, Session, Transport, Trust};
///
/// let opts = Options::new().trust(Trust::Untrusted);
/// let (a, b) = Session::pair_with(&opts).unwrap();
/// assert_eq!(a.transport(), Transport::Shm);
/// let tx = a.open_channel::<String>().unwrap();
/// tx.send("copied out of the ring".to_string()).unwrap();
/// let rx = b.accept_channel::<String>().unwrap();
/// // This message was copied out of the ring before it was validated.
/// assert_eq!(rx.recv().unwrap().as_str(), "copied out of the ring");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Trust {
    /// Shared memory only with peers of this process's uid; ring messages are validated and
    /// read in place (no copy). The default.
    #[default]
    SameUid,
    /// Shared memory with peers of any uid (same uid included); every ring message is copied
    /// out of the ring into a private aligned buffer before it is validated, and the message
    /// reads that copy. The peer can then change nothing this process has validated.
    Untrusted,
}

impl Options {
    /// The defaults: shared memory with same-uid peers on this host.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a unix session may move messages through shared memory (both sides must allow
    /// it, and the peer must have this process's uid unless [`Options::trust`] says
    /// [`Trust::Untrusted`]). On by default. It also lets a `tcp://` session move to a unix
    /// socket (and then shared memory) when both ends share a host and a network namespace;
    /// with `shm(false)` on either side it stays on TCP.
    pub fn shm(mut self, on: bool) -> Self {
        self.shm = on;
        self
    }

    /// How far to trust the peer with shared memory: [`Trust::SameUid`] by default. With
    /// [`Trust::Untrusted`], shared memory is offered to peers of any uid and every message
    /// read from a ring is copied out before validation. Has no effect with `shm(false)`.
    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }

    /// How network sessions (tcp, tls, ws) notice a peer that vanished without closing the
    /// connection: after `interval` without hearing from the peer a PING is sent, and after
    /// `timeout` the session ends (every blocked call returns `Disconnected`, and
    /// [`Session::close_reason`] says why). Defaults: 10 s and 30 s. Unix and shared-memory
    /// sessions learn of a dead peer from the kernel and need no pings.
    ///
    /// ```
    /// use std::time::Duration;
    /// let opts = libchan::Options::new().keepalive(Duration::from_secs(5), Duration::from_secs(15));
    /// # let _ = opts;
    /// ```
    ///
    /// # Panics
    ///
    /// If `interval` is zero or `timeout` is not longer than `interval`.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        assert!(
            !interval.is_zero() && timeout > interval,
            "keepalive: need 0 < interval < timeout"
        );
        self.keepalive = keepalive::Keepalive { interval, timeout };
        self
    }

    fn limits(&self) -> Limits {
        let mut l = Limits::default();
        if self.shm {
            l.features = l.features.with(Features::SHM);
        }
        l
    }
}

/// How long a handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// A unix stream socket carrying frames, with fds passed by SCM_RIGHTS.
    Unix,
    /// Shared memory: a ring per channel in memfds both processes map, with a unix socket for
    /// control and fds. Chosen automatically between processes of the same uid, and between
    /// any two processes that both use [`Trust::Untrusted`].
    Shm,
    /// A TCP connection carrying frames; fds and byte streams are pumped through it.
    Tcp,
    /// TLS (rustls) over TCP.
    Tls,
    /// WebSocket binary messages (over TCP, or TLS for `wss://`).
    Ws,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Unix => f.write_str("unix"),
            Transport::Shm => f.write_str("shm"),
            Transport::Tcp => f.write_str("tcp"),
            Transport::Tls => f.write_str("tls"),
            Transport::Ws => f.write_str("ws"),
        }
    }
}

/// Which end of a connection this process is: it decides how channel ids are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that connected (allocates odd channel ids).
    Connector,
    /// The side that accepted (allocates even channel ids).
    Acceptor,
}

/// One connection to a peer, carrying any number of channels in both directions.
///
/// Channels opened on a session keep working after the `Session` value is dropped; the
/// connection closes when nothing uses it any more.
///
/// ```
/// let (a, b) = libchan::Session::pair().unwrap();
/// let tx = a.open_channel::<String>().unwrap();
/// tx.send("over a socket".to_string()).unwrap();
/// let rx = b.accept_channel::<String>().unwrap();
/// assert_eq!(rx.recv().unwrap().as_str(), "over a socket");
/// ```
pub struct Session {
    conn: Arc<Conn>,
}

/// Accepts sessions on an address.
pub struct Listener {
    inner: Inner,
    path: Option<PathBuf>,
    opts: Options,
}

enum Inner {
    Unix(UnixListener),
    /// tcp, tls, ws and wss: handshakes run off the accept thread.
    Net {
        server: net::Server,
        /// The address form `local_addr` reports: `tcp://`, `tls://`, `ws://` or `wss://`.
        scheme: &'static str,
        /// The WebSocket path (empty for tcp and tls).
        path: String,
    },
}

/// Listens on `addr`: `unix:PATH`, `unix:@NAME` (abstract), `tcp://HOST:PORT`,
/// `tls://HOST:PORT` (with a certificate: [`Options::tls_identity`]),
/// `ws://HOST:PORT/PATH` or `wss://HOST:PORT/PATH`. Port 0 picks a free port
/// ([`Listener::local_addr`] says which).
///
/// ```
/// let name = format!("unix:@libchan-doc-listen-{}", std::process::id());
/// let listener = libchan::listen(&name).unwrap();
/// let client = std::thread::spawn(move || {
///     let s = libchan::connect(&name).unwrap();
///     s.open_channel::<u32>().unwrap().send(5).unwrap();
///     s
/// });
/// let server = listener.accept().unwrap();
/// assert_eq!(*server.accept_channel::<u32>().unwrap().recv().unwrap(), 5);
/// drop(client.join().unwrap());
/// ```
///
/// # Errors
///
/// [`Error::Address`] for an address libchan cannot serve, [`Error::Io`] when binding fails.
pub fn listen(addr: &str) -> Result<Listener, Error> {
    listen_with(addr, &Options::default())
}

/// [`listen`] with [`Options`] for the sessions it accepts.
///
/// # Errors
///
/// As [`listen`].
pub fn listen_with(addr: &str, opts: &Options) -> Result<Listener, Error> {
    let opts = opts.clone();
    match parse(addr)? {
        Addr::Path(path) => {
            let inner = Inner::Unix(UnixListener::bind(&path)?);
            Ok(Listener {
                inner,
                path: Some(path),
                opts,
            })
        }
        Addr::Abstract(name) => {
            let a = SocketAddr::from_abstract_name(name.as_bytes())?;
            Ok(Listener {
                inner: Inner::Unix(UnixListener::bind_addr(&a)?),
                path: None,
                opts,
            })
        }
        Addr::Tcp(hostport) => {
            let handshake: Arc<net::Handshake> = Arc::new(tcp::accept);
            Listener::net(&hostport, handshake, "tcp", String::new(), opts)
        }
        Addr::Tls(hostport) => {
            tls::check_server(&opts)?;
            let handshake: Arc<net::Handshake> = Arc::new(|stream, opts: &Options| {
                let link = tls::accept(stream, opts, HANDSHAKE_TIMEOUT)?;
                Session::over(link, Role::Acceptor, opts)
            });
            Listener::net(&hostport, handshake, "tls", String::new(), opts)
        }
        Addr::Ws {
            hostport,
            path,
            secure,
        } => {
            if secure {
                tls::check_server(&opts)?;
            }
            let want = path.clone();
            let handshake: Arc<net::Handshake> = Arc::new(move |stream, opts: &Options| {
                let link = ws::accept(stream, &want, secure, opts, HANDSHAKE_TIMEOUT)?;
                Session::over(link, Role::Acceptor, opts)
            });
            let scheme = if secure { "wss" } else { "ws" };
            Listener::net(&hostport, handshake, scheme, path, opts)
        }
    }
}

/// Connects to a listener at `addr`, in any of the forms [`listen`] takes. A `tcp://` session
/// to a listener on this host and network namespace moves to a unix socket, and so to shared
/// memory ([`Session::transport`] says which; [`Options::shm`] turns it off); `tls://` needs the
/// CA that signed the server's certificate ([`Options::tls_ca`]).
///
/// # Errors
///
/// [`Error::Address`] for an address libchan cannot reach, [`Error::Io`] when nothing listens
/// there, [`Error::Handshake`] when the peer is not a compatible libchan.
pub fn connect(addr: &str) -> Result<Session, Error> {
    connect_with(addr, &Options::default())
}

/// [`connect`] with [`Options`].
///
/// # Errors
///
/// As [`connect`].
pub fn connect_with(addr: &str, opts: &Options) -> Result<Session, Error> {
    let stream = match parse(addr)? {
        Addr::Path(path) => UnixStream::connect(path)?,
        Addr::Abstract(name) => {
            UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?
        }
        Addr::Tcp(hostport) => return tcp::connect(&hostport, opts),
        Addr::Tls(hostport) => {
            let link = tls::connect(&hostport, opts, HANDSHAKE_TIMEOUT)?;
            return Session::over(link, Role::Connector, opts);
        }
        Addr::Ws {
            hostport,
            path,
            secure,
        } => {
            let link = ws::connect(&hostport, &path, secure, opts, HANDSHAKE_TIMEOUT)?;
            return Session::over(link, Role::Connector, opts);
        }
    };
    Session::from_unix_stream_with(stream, Role::Connector, opts)
}

impl Listener {
    /// Waits for the next peer and completes its handshake.
    ///
    /// On network listeners (tcp, tls, ws, wss) every connection's handshake runs on a thread
    /// of its own (at most 64 at once), so a client that connects and says nothing holds up
    /// nobody: `accept` returns whichever handshake finishes first, success or failure.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when accepting fails, [`Error::Handshake`] when the peer is not a
    /// compatible libchan (the listener stays usable).
    pub fn accept(&self) -> Result<Session, Error> {
        match &self.inner {
            Inner::Unix(l) => {
                let (stream, _) = l.accept()?;
                Session::from_unix_stream_with(stream, Role::Acceptor, &self.opts)
            }
            Inner::Net { server, .. } => server.accept(&self.opts),
        }
    }

    /// The address this listener serves, in the form [`connect`] takes: with the port the
    /// system chose when the listener was bound to port 0 (`tcp://127.0.0.1:0`).
    ///
    /// ```
    /// let listener = libchan::listen("tcp://127.0.0.1:0").unwrap();
    /// let addr = listener.local_addr().unwrap();
    /// assert!(addr.starts_with("tcp://127.0.0.1:") && !addr.ends_with(":0"));
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the system cannot say.
    pub fn local_addr(&self) -> Result<String, Error> {
        match &self.inner {
            Inner::Unix(l) => {
                let a = l.local_addr()?;
                if let Some(name) = a.as_abstract_name() {
                    Ok(format!("unix:@{}", String::from_utf8_lossy(name)))
                } else if let Some(p) = a.as_pathname() {
                    Ok(format!("unix:{}", p.display()))
                } else {
                    Err(Error::Address("unnamed unix socket".into()))
                }
            }
            Inner::Net {
                server,
                scheme,
                path,
            } => Ok(format!("{scheme}://{}{path}", server.local_addr()?)),
        }
    }

    /// A network listener on `hostport` (`scheme://hostport{path}`) that runs `handshake` on
    /// each connection, off the accept thread.
    fn net(
        hostport: &str,
        handshake: Arc<net::Handshake>,
        scheme: &'static str,
        path: String,
        opts: Options,
    ) -> Result<Listener, Error> {
        Ok(Listener {
            inner: Inner::Net {
                server: net::Server::bind(hostport, handshake)?,
                scheme,
                path,
            },
            path: None,
            opts,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Session {
    /// A connected pair of sessions over a socket pair: one end for this process, the other
    /// for a thread or (through [`Session::from_unix_stream`]) a child process.
    ///
    /// # Errors
    ///
    /// Fails when the system is out of descriptors.
    pub fn pair() -> Result<(Session, Session), Error> {
        Self::pair_with(&Options::default())
    }

    /// [`Session::pair`] with [`Options`] (both ends use them).
    ///
    /// # Errors
    ///
    /// As [`Session::pair`].
    pub fn pair_with(opts: &Options) -> Result<(Session, Session), Error> {
        let (a, b) = conn::pair(opts.limits(), opts.trust)?;
        Ok((Session { conn: a }, Session { conn: b }))
    }

    /// Runs the handshake over an already connected unix stream (for example one inherited
    /// from a parent process). The two ends must pass opposite roles.
    ///
    /// # Errors
    ///
    /// [`Error::Handshake`] when the peer is not a compatible libchan or does not answer in
    /// ten seconds.
    pub fn from_unix_stream(stream: UnixStream, role: Role) -> Result<Session, Error> {
        Self::from_unix_stream_with(stream, role, &Options::default())
    }

    /// [`Session::from_unix_stream`] with [`Options`].
    ///
    /// # Errors
    ///
    /// As [`Session::from_unix_stream`].
    pub fn from_unix_stream_with(
        stream: UnixStream,
        role: Role,
        opts: &Options,
    ) -> Result<Session, Error> {
        let conn = Conn::establish(
            stream,
            role == Role::Connector,
            opts.limits(),
            opts.trust,
            HANDSHAKE_TIMEOUT,
        )?;
        Ok(Session { conn })
    }

    /// Runs the handshake over a connected link.
    fn over(link: Box<dyn link::Link>, role: Role, opts: &Options) -> Result<Session, Error> {
        // Network links need pings to notice a vanished peer; unix sockets report it.
        let keepalive = (!link.carries_fds()).then_some(opts.keepalive);
        let conn = Conn::establish_on(
            link,
            role == Role::Connector,
            opts.limits(),
            opts.trust,
            keepalive,
            HANDSHAKE_TIMEOUT,
        )?;
        Ok(Session { conn })
    }

    /// Opens a channel to the peer, which receives it with [`accept_channel`]. Messages can
    /// be sent at once, before the peer accepts (they wait in the peer's window).
    ///
    /// [`accept_channel`]: Session::accept_channel
    ///
    /// # Errors
    ///
    /// [`Error::Disconnected`] when the session is closed.
    pub fn open_channel<T: Message>(&self) -> Result<Sender<T>, Error> {
        let out = self.conn.open(fingerprint::<T>())?;
        Ok(Sender::from_core(SendCore::Remote(out)))
    }

    /// Waits for the next channel the peer opens.
    ///
    /// # Errors
    ///
    /// [`Error::TypeMismatch`] when the peer opened it for another message type (the channel
    /// is refused and the peer's sends fail), [`Error::Disconnected`] when the session closed.
    pub fn accept_channel<T: Message>(&self) -> Result<Receiver<T>, Error> {
        self.accept_with(Wait::Forever)
    }

    /// Like [`accept_channel`](Session::accept_channel), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As `accept_channel`, plus [`Error::Timeout`].
    pub fn accept_channel_timeout<T: Message>(
        &self,
        timeout: Duration,
    ) -> Result<Receiver<T>, Error> {
        let wait = Instant::now()
            .checked_add(timeout)
            .map_or(Wait::Forever, Wait::Until);
        self.accept_with(wait)
    }

    fn accept_with<T: Message>(&self, wait: Wait) -> Result<Receiver<T>, Error> {
        let (id, found, rx) = self.conn.accept(wait)?;
        let expected = fingerprint::<T>();
        if found != expected {
            drop(rx);
            self.conn
                .refuse(id, ResetReason::TypeMismatch, "message type mismatch");
            return Err(Error::TypeMismatch { expected, found });
        }
        Ok(Receiver::from_core(rx))
    }

    /// The transport this session runs on: [`Transport::Shm`] (or [`Transport::Unix`]) for a
    /// `tcp://` session that moved to a unix socket on the same host.
    pub fn transport(&self) -> Transport {
        self.conn.transport()
    }

    /// True once the session broke or was closed.
    pub fn is_closed(&self) -> bool {
        self.conn.is_dead()
    }

    /// Why the session closed, if it did.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.error()
    }

    /// The peer's user id, as the kernel reports it (SO_PEERCRED); `None` across a network.
    pub fn peer_uid(&self) -> Option<u32> {
        self.conn.peer_uid()
    }

    /// Who the peer proved to be, on transports that authenticate peers: for TLS with client
    /// certificates, the subject of the peer's certificate. `None` otherwise.
    pub fn peer_identity(&self) -> Option<String> {
        self.conn.peer_identity()
    }

    /// Channels the session currently tracks, in both directions.
    pub fn channel_count(&self) -> usize {
        self.conn.channel_count()
    }

    /// Closes the session now: every channel on it breaks (`Disconnected`) on both sides.
    /// Closing twice is harmless.
    pub fn close(&self) {
        self.conn.close();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Channels still waiting to be accepted can never be accepted now.
        self.conn.refuse_pending();
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("transport", &self.transport())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener").finish_non_exhaustive()
    }
}

enum Addr {
    Path(PathBuf),
    Abstract(String),
    /// `HOST:PORT`, checked to have both.
    Tcp(String),
    /// `HOST:PORT`.
    Tls(String),
    /// `HOST:PORT` and the request path (starting with `/`); `secure` for `wss://`.
    Ws {
        hostport: String,
        path: String,
        secure: bool,
    },
}

fn parse(addr: &str) -> Result<Addr, Error> {
    if let Some(rest) = addr.strip_prefix("tcp://") {
        return net::host_port(addr, rest).map(Addr::Tcp);
    }
    if let Some(rest) = addr.strip_prefix("tls://") {
        return net::host_port(addr, rest).map(Addr::Tls);
    }
    for (scheme, secure) in [("ws://", false), ("wss://", true)] {
        if let Some(rest) = addr.strip_prefix(scheme) {
            let (hostport, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            return Ok(Addr::Ws {
                hostport: net::host_port(addr, hostport)?,
                path: path.to_string(),
                secure,
            });
        }
    }
    let Some(rest) = addr.strip_prefix("unix:") else {
        return Err(Error::Address(format!(
            "{addr:?}: expected unix:PATH, unix:@NAME, tcp://HOST:PORT, tls://HOST:PORT, \
             ws://HOST:PORT/PATH or wss://HOST:PORT/PATH"
        )));
    };
    if let Some(name) = rest.strip_prefix('@') {
        if name.is_empty() || name.len() > 100 {
            return Err(Error::Address(format!(
                "{addr:?}: bad abstract socket name"
            )));
        }
        return Ok(Addr::Abstract(name.to_string()));
    }
    if rest.is_empty() {
        return Err(Error::Address(format!("{addr:?}: empty path")));
    }
    Ok(Addr::Path(PathBuf::from(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert!(matches!(parse("unix:/tmp/x"), Ok(Addr::Path(_))));
        assert!(matches!(parse("unix:@n"), Ok(Addr::Abstract(_))));
        assert!(matches!(parse("tcp://1.2.3.4:5"), Ok(Addr::Tcp(_))));
        assert!(matches!(parse("tcp://[::1]:5"), Ok(Addr::Tcp(_))));
        assert!(matches!(parse("tcp://1.2.3.4"), Err(Error::Address(_))));
        assert!(matches!(parse("tcp://:5"), Err(Error::Address(_))));
        assert!(matches!(parse("tcp://h:x"), Err(Error::Address(_))));
        assert!(matches!(parse("udp://h:1"), Err(Error::Address(_))));
        assert!(matches!(parse("tls://h:1"), Ok(Addr::Tls(_))));
        assert!(matches!(
            parse("ws://h:1/a/b"),
            Ok(Addr::Ws { ref path, secure: false, .. }) if path == "/a/b"
        ));
        assert!(matches!(
            parse("wss://h:1"),
            Ok(Addr::Ws { ref path, secure: true, .. }) if path == "/"
        ));
        assert!(matches!(parse("unix:"), Err(Error::Address(_))));
        assert!(matches!(parse("unix:@"), Err(Error::Address(_))));
    }
}
