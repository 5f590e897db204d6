//! `tls://` links: TLS 1.3 over TCP, with rustls and `ring` as the one crypto provider.
//!
//! A [`TlsStream`] is a rustls connection over a non-blocking TCP socket; it is the link of a
//! `tls://` session (it implements [`Link`]) and the byte stream under `wss://` (it implements
//! `Read` and `Write`). The TLS handshake runs to its end inside [`connect`] and [`accept`]
//! (and [`client_stream`] / [`server_stream`]), waiting on the socket up to a deadline, before
//! the libchan hello. After that nothing here blocks.
//!
//! Invariants:
//! - The rustls connection sits behind one mutex that a session's reader and writer threads
//!   share. It is held only across non-blocking work (socket reads and writes with
//!   `MSG_DONTWAIT`, and rustls' own processing), never across a wait.
//! - [`TlsStream::read_plain`] returns plaintext rustls already decrypted before it touches the
//!   socket, and reports `WouldBlock` only after the socket did: a poll on [`TlsStream::fd`]
//!   never sleeps on data that is already here.
//! - [`TlsStream::write_plain`] takes only what rustls' outgoing buffer has room for
//!   ([`SEND_BUFFER`]), so a peer that stops reading cannot make this side's memory grow.
//!   Records it could not write yet are [`output_pending`](TlsStream::output_pending) and go
//!   out with the next write or [`flush_tls`](TlsStream::flush_tls).
//!
//! Who the peer is: both sides verify the other's certificate chain against the CAs they were
//! given (webpki, through rustls); the client also checks that the server's certificate names
//! the host it connected to. The identity a session reports ([`TlsStream::peer_identity`]) is
//! the subject common name of the peer's verified certificate, else its first DNS or URI
//! subject alternative name. See docs/SECURITY.md, "TLS".

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore,
    ServerConfig, ServerConnection, SignatureScheme,
};

use crate::error::Error;
use crate::sys;

use super::link::Link;
use super::{net, Options, Transport};

/// Most TLS output rustls may hold for the socket (rustls' buffer limit): `write_plain` takes
/// no more plaintext while this much is waiting.
const SEND_BUFFER: usize = 64 * 1024;

/// How long a side that refuses a handshake waits for its alert to leave and the peer to hang
/// up, so that closing the socket does not reset the alert away.
const LINGER: Duration = Duration::from_secs(1);

/// Certificates and keys a session may use for TLS (set through the `Options::tls_*`
/// methods).
#[derive(Clone, Default)]
pub(super) struct TlsOptions {
    /// This side's certificate chain and private key: the server's certificate, or the
    /// client's for mutual TLS.
    identity: Option<Arc<CertifiedKey>>,
    /// CAs a server's certificate must chain to (the client side).
    server_roots: Option<RootCertStore>,
    /// CAs a client's certificate must chain to; set, the server requires client
    /// certificates.
    client_roots: Option<RootCertStore>,
    /// The name the server's certificate must carry, instead of the host in the address.
    server_name: Option<ServerName<'static>>,
    /// rustls configurations built from the fields above, once; a setter starts a fresh one.
    configs: Arc<Configs>,
}

/// Built rustls configurations (a build error is kept as its message).
#[derive(Default)]
struct Configs {
    server: OnceLock<Result<Arc<ServerConfig>, String>>,
    client: OnceLock<Result<Arc<ClientConfig>, String>>,
}

impl Options {
    /// This side's certificate chain and private key, from PEM files: the server's
    /// certificate for `listen("tls://…")` (required there), or the client's certificate for
    /// mutual TLS when the server asks for one ([`Options::tls_client_auth`]).
    ///
    /// `cert_chain` holds the certificate first, then any intermediate CA certificates; `key`
    /// holds its private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// ```no_run
    /// let opts = libchan::Options::new().tls_identity("server.pem", "server.key")?;
    /// let listener = libchan::listen_with("tls://0.0.0.0:7000", &opts)?;
    /// # Ok::<(), libchan::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when a file cannot be read, holds no certificate or no private key, or
    /// the key does not match the certificate.
    pub fn tls_identity(
        self,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let (cert_chain, key) = (cert_chain.as_ref(), key.as_ref());
        let certs = read_file(cert_chain)?;
        let key_pem = read_file(key)?;
        self.set_identity(
            &certs,
            &key_pem,
            &cert_chain.display().to_string(),
            &key.display().to_string(),
        )
    }

    /// [`Options::tls_identity`] from PEM text in memory.
    ///
    /// ```
    /// # let ca_key = rcgen::KeyPair::generate().unwrap();
    /// # let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    /// # ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    /// # let ca_cert = ca.self_signed(&ca_key).unwrap();
    /// # let issuer = rcgen::Issuer::new(ca, ca_key);
    /// # let key = rcgen::KeyPair::generate().unwrap();
    /// # let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    /// # leaf.distinguished_name.push(rcgen::DnType::CommonName, "server");
    /// # let cert = leaf.signed_by(&key, &issuer).unwrap();
    /// # let (cert_pem, key_pem, ca_pem) = (cert.pem(), key.serialize_pem(), ca_cert.pem());
    /// use libchan::{Options, Transport};
    ///
    /// let server = Options::new().tls_identity_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
    /// let listener = libchan::listen_with("tls://127.0.0.1:0", &server)?;
    /// let addr = listener.local_addr()?;
    /// let client = std::thread::spawn(move || {
    ///     let opts = Options::new().tls_ca_pem(ca_pem.as_bytes())?;
    ///     let session = libchan::connect_with(&addr, &opts)?;
    ///     session.open_channel::<u32>()?.send(7).unwrap();
    ///     Ok::<_, libchan::Error>(session)
    /// });
    /// let session = listener.accept()?;
    /// assert_eq!(session.transport(), Transport::Tls);
    /// assert_eq!(*session.accept_channel::<u32>()?.recv().unwrap(), 7);
    /// let client = client.join().unwrap()?;
    /// assert_eq!(client.peer_identity().as_deref(), Some("server"));
    /// # Ok::<(), libchan::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Options::tls_identity`].
    pub fn tls_identity_pem(self, cert_chain: &[u8], key: &[u8]) -> Result<Self, Error> {
        self.set_identity(cert_chain, key, "certificate PEM", "key PEM")
    }

    /// Trusts the CA certificates in a PEM file to vouch for servers: a `tls://` connection
    /// succeeds only if the server's certificate chains to one of them and names the host in
    /// the address (or [`Options::tls_server_name`]). Required for connecting; each call adds
    /// more CAs.
    ///
    /// ```no_run
    /// let opts = libchan::Options::new().tls_ca("ca.pem")?;
    /// let session = libchan::connect_with("tls://db.example:7000", &opts)?;
    /// # Ok::<(), libchan::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be read or holds no usable CA certificate.
    pub fn tls_ca(self, ca: impl AsRef<Path>) -> Result<Self, Error> {
        let pem = read_file(ca.as_ref())?;
        let what = ca.as_ref().display().to_string();
        self.add_cas(|t| &mut t.server_roots, &pem, &what)
    }

    /// [`Options::tls_ca`] from PEM text in memory.
    ///
    /// ```
    /// # let key = rcgen::KeyPair::generate().unwrap();
    /// # let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    /// # ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    /// # let ca_pem = ca.self_signed(&key).unwrap().pem();
    /// let opts = libchan::Options::new().tls_ca_pem(ca_pem.as_bytes())?;
    /// assert!(libchan::Options::new().tls_ca_pem(b"not PEM").is_err());
    /// # Ok::<(), libchan::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Options::tls_ca`].
    pub fn tls_ca_pem(self, ca: &[u8]) -> Result<Self, Error> {
        self.add_cas(|t| &mut t.server_roots, ca, "CA PEM")
    }

    /// Requires mutual TLS on `tls://` (and `wss://`) listeners: every client must present a
    /// certificate that chains to one of the CA certificates in this PEM file, or its
    /// handshake is refused. The session then reports the client's name through
    /// [`Session::peer_identity`](crate::Session::peer_identity). Each call adds more CAs.
    ///
    /// ```no_run
    /// let opts = libchan::Options::new()
    ///     .tls_identity("server.pem", "server.key")?
    ///     .tls_client_auth("clients-ca.pem")?;
    /// let listener = libchan::listen_with("tls://0.0.0.0:7000", &opts)?;
    /// let session = listener.accept()?;
    /// println!("client: {:?}", session.peer_identity());
    /// # Ok::<(), libchan::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be read or holds no usable CA certificate.
    pub fn tls_client_auth(self, ca: impl AsRef<Path>) -> Result<Self, Error> {
        let pem = read_file(ca.as_ref())?;
        let what = ca.as_ref().display().to_string();
        self.add_cas(|t| &mut t.client_roots, &pem, &what)
    }

    /// [`Options::tls_client_auth`] from PEM text in memory.
    ///
    /// ```
    /// # let key = rcgen::KeyPair::generate().unwrap();
    /// # let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    /// # ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    /// # let clients_ca_pem = ca.self_signed(&key).unwrap().pem();
    /// let opts = libchan::Options::new().tls_client_auth_pem(clients_ca_pem.as_bytes())?;
    /// # Ok::<(), libchan::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Options::tls_client_auth`].
    pub fn tls_client_auth_pem(self, ca: &[u8]) -> Result<Self, Error> {
        self.add_cas(|t| &mut t.client_roots, ca, "CA PEM")
    }

    /// The name the server's certificate must carry (a DNS name or an IP address), when it
    /// differs from the host in the address: for example when connecting by IP address to a
    /// server whose certificate names its host name.
    ///
    /// ```
    /// let opts = libchan::Options::new().tls_server_name("db.example")?;
    /// assert!(libchan::Options::new().tls_server_name("not a name").is_err());
    /// # Ok::<(), libchan::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Address`] when `name` is neither a DNS name nor an IP address.
    pub fn tls_server_name(mut self, name: &str) -> Result<Self, Error> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| Error::Address(format!("{name:?} is not a DNS name or IP address")))?;
        self.tls.server_name = Some(name);
        self.tls.configs = Arc::default();
        Ok(self)
    }

    fn set_identity(
        mut self,
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_what: &str,
        key_what: &str,
    ) -> Result<Self, Error> {
        let chain = certificates(cert_pem, cert_what)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| invalid(format!("{key_what}: no private key ({e})")))?;
        let identity = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| invalid(format!("{cert_what} with {key_what}: {e}")))?;
        self.tls.identity = Some(Arc::new(identity));
        self.tls.configs = Arc::default();
        Ok(self)
    }

    /// Adds the CA certificates in `pem` to the roots `which` picks: those that vouch for
    /// servers or those that vouch for clients.
    fn add_cas(
        mut self,
        which: fn(&mut TlsOptions) -> &mut Option<RootCertStore>,
        pem: &[u8],
        what: &str,
    ) -> Result<Self, Error> {
        add_roots(
            which(&mut self.tls).get_or_insert_with(empty_roots),
            pem,
            what,
        )?;
        self.tls.configs = Arc::default();
        Ok(self)
    }
}

impl fmt::Debug for TlsOptions {
    /// What is configured, never key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("identity", &self.identity.is_some())
            .field("ca", &self.server_roots.as_ref().map_or(0, |r| r.len()))
            .field(
                "client_auth",
                &self.client_roots.as_ref().map_or(0, |r| r.len()),
            )
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Checks that `opts` can serve TLS (a certificate and key are set).
pub(super) fn check_server(opts: &Options) -> Result<(), Error> {
    server_config(&opts.tls).map(drop)
}

/// Connects to `hostport` and runs the client side of a TLS handshake, all within `timeout`.
pub(super) fn connect(
    hostport: &str,
    opts: &Options,
    timeout: Duration,
) -> Result<Box<dyn Link>, Error> {
    let deadline = Instant::now() + timeout;
    let tcp = net::connect_tcp(hostport, timeout)?;
    let stream = client_stream_until(tcp, hostport, opts, deadline)?;
    Ok(Box::new(stream))
}

/// Runs the server side of a TLS handshake on an accepted connection.
pub(super) fn accept(
    stream: TcpStream,
    opts: &Options,
    timeout: Duration,
) -> Result<Box<dyn Link>, Error> {
    Ok(Box::new(server_stream(stream, opts, timeout)?))
}

/// Runs the client side of a TLS handshake on a connected TCP stream, within `timeout`.
/// `server` is `HOST:PORT` or `HOST`: the name the server's certificate must carry, unless
/// [`Options::tls_server_name`] set one. The stream is non-blocking on return.
///
/// When the server asked for a client certificate, this also waits for the server's first
/// record after the handshake (a session ticket, data or an alert): in TLS 1.3 the server
/// judges the client's certificate only after the client finished, and a refusal is reported
/// here rather than by the first read.
pub(super) fn client_stream(
    tcp: TcpStream,
    server: &str,
    opts: &Options,
    timeout: Duration,
) -> Result<TlsStream, Error> {
    client_stream_until(tcp, server, opts, Instant::now() + timeout)
}

/// Runs the server side of a TLS handshake on an accepted TCP stream, within `timeout`. The
/// stream is non-blocking on return.
pub(super) fn server_stream(
    tcp: TcpStream,
    opts: &Options,
    timeout: Duration,
) -> Result<TlsStream, Error> {
    let deadline = Instant::now() + timeout;
    let config = server_config(&opts.tls)?;
    let conn = ServerConnection::new(config).map_err(|e| Error::Handshake(format!("TLS: {e}")))?;
    TlsStream::establish(tcp, conn.into(), None, deadline)
}

fn client_stream_until(
    tcp: TcpStream,
    server: &str,
    opts: &Options,
    deadline: Instant,
) -> Result<TlsStream, Error> {
    let name = match &opts.tls.server_name {
        Some(name) => name.clone(),
        None => {
            let host = host_of(server);
            ServerName::try_from(host.to_string()).map_err(|_| {
                Error::Address(format!(
                    "{server:?}: {host:?} is not a DNS name or IP address to check the server's \
                     certificate against (see Options::tls_server_name)"
                ))
            })?
        }
    };
    let shared = client_config(&opts.tls)?;
    // A per-connection resolver notes whether the server asked for a client certificate.
    let asked = Arc::new(AskedFor {
        identity: opts.tls.identity.clone(),
        asked: AtomicBool::new(false),
    });
    let mut config = (*shared).clone();
    config.client_auth_cert_resolver = asked.clone();
    let conn = ClientConnection::new(Arc::new(config), name)
        .map_err(|e| Error::Handshake(format!("TLS: {e}")))?;
    TlsStream::establish(tcp, conn.into(), Some(&asked.asked), deadline)
}

/// A rustls connection over a non-blocking TCP socket, handshake done: the link of a `tls://`
/// session, and the stream under `wss://` (`Read` and `Write` pass `WouldBlock` through).
pub(super) struct TlsStream {
    sock: OwnedFd,
    tls: Mutex<Connection>,
    /// The name in the peer's verified certificate.
    peer: Option<String>,
}

impl TlsStream {
    /// Runs the handshake on `tcp` up to `deadline`. `asked` (client side): set by rustls when
    /// the server asks for a certificate.
    fn establish(
        tcp: TcpStream,
        mut conn: Connection,
        asked: Option<&AtomicBool>,
        deadline: Instant,
    ) -> Result<TlsStream, Error> {
        net::prepare(&tcp)?;
        let who = tcp
            .peer_addr()
            .map_or_else(|_| "the peer".to_string(), |a| a.to_string());
        let sock = OwnedFd::from(tcp);
        handshake(sock.as_fd(), &mut conn, asked, deadline)
            .map_err(|e| e.into_error(sock.as_fd(), &mut conn, &who))?;
        conn.set_buffer_limit(Some(SEND_BUFFER));
        let peer = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(identity_of);
        Ok(TlsStream {
            sock,
            tls: Mutex::new(conn),
            peer,
        })
    }

    /// The socket, to wait on for readiness.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The subject common name (else the first DNS or URI alternative name) of the peer's
    /// verified certificate; `None` for a client that presented none.
    pub(super) fn peer_identity(&self) -> Option<String> {
        self.peer.clone()
    }

    /// Reads decrypted bytes: first those rustls holds, then from the socket until it has none
    /// (`WouldBlock`). `Ok(0)` after the peer's close_notify; an end of stream without one is
    /// `ConnectionReset`.
    pub(super) fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut tls = self.lock();
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "peer closed the TLS connection without close_notify",
                    ));
                }
                Err(e) => return Err(e),
            }
            // Nothing decrypted is left: read the socket (`WouldBlock` passes through). At its
            // end of stream (0) the reader above reports how the peer closed.
            tls.read_tls(&mut Sock(self.fd()))?;
            if let Err(e) = tls.process_new_packets() {
                // The alert rustls queued tells the peer why, if the socket takes it now.
                let _ = push(&mut tls, self.fd());
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TLS: {}", describe(&e)),
                ));
            }
            // Records rustls owes the peer (a key update), if the socket takes them now; the
            // rest goes with the next write or flush.
            match push(&mut tls, self.fd()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Encrypts a prefix of `bufs` (as much as rustls' buffer takes) and writes what the socket
    /// takes now. `WouldBlock` when it took nothing.
    pub(super) fn write_plain(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let mut tls = self.lock();
        // Older records first; a full socket is no reason to refuse what the buffer can hold.
        match push(&mut tls, self.fd()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let n = tls.writer().write_vectored(bufs)?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // A failure here shows again at the next write or flush; these bytes were taken.
        let _ = push(&mut tls, self.fd());
        Ok(n)
    }

    /// Writes the records that wait for the socket. `WouldBlock` while some are left.
    pub(super) fn flush_tls(&self) -> io::Result<()> {
        push(&mut self.lock(), self.fd())
    }

    /// True while records wait for the socket.
    pub(super) fn output_pending(&self) -> bool {
        self.lock().wants_write()
    }

    /// Ends the connection now: a close_notify if the socket takes it, then the socket is cut
    /// (`sys::cut`), so a peer blocked on us fails at once and our own waiters wake.
    pub(super) fn cut(&self) {
        {
            let mut tls = self.lock();
            tls.send_close_notify();
            let _ = push(&mut tls, self.fd());
        }
        sys::cut(&self.sock);
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Link for TlsStream {
    fn fd(&self) -> BorrowedFd<'_> {
        TlsStream::fd(self)
    }

    fn send(&self, bufs: &[IoSlice<'_>], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        if !fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors on a link that cannot carry them",
            ));
        }
        self.write_plain(bufs)
    }

    fn recv(&self, buf: &mut [u8], _fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        self.read_plain(buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.flush_tls()
    }

    fn output_pending(&self) -> bool {
        TlsStream::output_pending(self)
    }

    fn transport(&self) -> Transport {
        Transport::Tls
    }

    fn peer_identity(&self) -> Option<String> {
        TlsStream::peer_identity(self)
    }

    fn cut(&self) {
        TlsStream::cut(self);
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_plain(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_plain(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}

impl Drop for TlsStream {
    fn drop(&mut self) {
        // A clean end for a peer still reading, if the socket takes it (a no-op after `cut`).
        let fd = self.sock.as_fd();
        let tls = self.tls.get_mut().unwrap_or_else(|e| e.into_inner());
        tls.send_close_notify();
        let _ = push(tls, fd);
        // Then close once the peer has (closer::Closing): closing now could reset the connection
        // and lose the end of the session. After a `cut` the descriptor is already dead and
        // this ends at once.
        if let Ok(dup) = self.sock.try_clone() {
            super::closer::close_later(super::closer::SocketClosing::new(dup));
        }
    }
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The client's certificate resolver for one connection: rustls asks it only when the server
/// requests a certificate, which is what `asked` records.
#[derive(Debug)]
struct AskedFor {
    identity: Option<Arc<CertifiedKey>>,
    asked: AtomicBool,
}

impl ResolvesClientCert for AskedFor {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Read by the same thread, after rustls returns (`handshake`).
        self.asked.store(true, Ordering::Relaxed);
        self.identity.clone()
    }

    fn has_certs(&self) -> bool {
        self.identity.is_some()
    }
}

/// The socket as rustls reads and writes it: never blocks, never raises SIGPIPE.
struct Sock<'a>(BorrowedFd<'a>);

impl Read for Sock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, _) = rustix::net::recv(self.0, buf, rustix::net::RecvFlags::DONTWAIT)?;
        Ok(n)
    }
}

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send_with_fds(self.0, &[IoSlice::new(buf)], &[])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sys::send_with_fds(self.0, bufs, &[])
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the records rustls holds until none is left (`Ok`) or the socket is full
/// (`WouldBlock`).
fn push(tls: &mut Connection, sock: BorrowedFd<'_>) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(&mut Sock(sock)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How a handshake failed, before it is put in words for the caller.
enum Failed {
    /// rustls refused the peer or the peer's message (an alert is queued for the peer).
    Tls(rustls::Error),
    /// The peer hung up first.
    Closed,
    /// The deadline passed.
    Timeout,
    /// The socket failed.
    Io(io::Error),
}

impl Failed {
    /// The error for the caller. A refusal sends its alert first and lingers (up to
    /// [`LINGER`]) until the peer hangs up, so closing does not reset the alert away.
    fn into_error(self, sock: BorrowedFd<'_>, tls: &mut Connection, who: &str) -> Error {
        match self {
            Failed::Tls(e) => {
                linger(sock, tls);
                Error::Handshake(format!("TLS handshake with {who} failed: {}", describe(&e)))
            }
            Failed::Closed if tls.is_handshaking() => Error::Handshake(format!(
                "TLS handshake with {who} failed: the peer closed the connection"
            )),
            Failed::Closed => Error::Handshake(format!(
                "TLS handshake with {who} failed: the server closed the connection after the \
                 handshake (it may have refused this client's certificate)"
            )),
            Failed::Timeout => Error::Timeout,
            Failed::Io(e) => Error::Handshake(format!("TLS handshake with {who} failed: {e}")),
        }
    }
}

/// Drives the handshake until it is done and its last flight is written. A client the server
/// asked for a certificate (`asked`) also waits for the server's first record after it: the
/// server's verdict on that certificate.
fn handshake(
    sock: BorrowedFd<'_>,
    tls: &mut Connection,
    asked: Option<&AtomicBool>,
    deadline: Instant,
) -> Result<(), Failed> {
    let mut heard_after = false;
    loop {
        match push(tls, sock) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(sock, false, deadline)?;
                continue;
            }
            Err(e) => return Err(Failed::Io(e)),
        }
        let verdict_due = asked.is_some_and(|a| a.load(Ordering::Relaxed)) && !heard_after;
        if !tls.is_handshaking() && !verdict_due {
            return Ok(());
        }
        match tls.read_tls(&mut Sock(sock)) {
            Ok(0) => return Err(Failed::Closed),
            Ok(_) => {
                let state = tls.process_new_packets().map_err(Failed::Tls)?;
                heard_after |= client_heard(tls, &state);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(sock, true, deadline)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failed::Io(e)),
        }
    }
}

/// Whether a whole record from the server arrived after the handshake: a session ticket, data
/// or a close_notify (an alert shows as an error instead). None can come before it ends.
fn client_heard(tls: &Connection, state: &rustls::IoState) -> bool {
    let tickets = match tls {
        Connection::Client(c) => c.tls13_tickets_received(),
        Connection::Server(_) => 0,
    };
    tickets > 0 || state.plaintext_bytes_to_read() > 0 || state.peer_has_closed()
}

/// Waits until the socket is readable (`read`) or writable, up to `deadline`.
fn wait(sock: BorrowedFd<'_>, read: bool, deadline: Instant) -> Result<(), Failed> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Failed::Timeout);
    }
    sys::poll(sock, read, !read, Some(left)).map_err(Failed::Io)?;
    Ok(())
}

/// Sends the alert rustls queued, then reads (and drops) what the peer still sends until it
/// hangs up, for at most [`LINGER`].
fn linger(sock: BorrowedFd<'_>, tls: &mut Connection) {
    let until = Instant::now() + LINGER;
    loop {
        match push(tls, sock) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if wait(sock, false, until).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = rustix::net::shutdown(sock, rustix::net::Shutdown::Write);
    let mut scratch = [0u8; 4096];
    loop {
        match Sock(sock).read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if wait(sock, true, until).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A rustls error in words a user can act on, with rustls' own text after.
fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    let why = match e {
        E::NoCertificatesPresented => {
            "the client presented no certificate, and this listener requires one"
        }
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the peer's certificate is not signed by a trusted CA"
        }
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the server's certificate does not carry the name this client connected to",
        E::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the peer's certificate has expired",
        E::InvalidCertificate(_) => "the peer's certificate was refused",
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the server requires a client certificate (see Options::tls_identity)"
        }
        E::AlertReceived(AlertDescription::UnknownCA) => {
            "the peer does not trust the CA that signed this side's certificate"
        }
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate,
        ) => "the peer refused this side's certificate",
        E::AlertReceived(AlertDescription::CertificateExpired) => {
            "the peer says this side's certificate has expired"
        }
        E::AlertReceived(AlertDescription::ProtocolVersion) => "the peer does not speak TLS 1.3",
        E::InvalidMessage(_) => "the peer does not speak TLS",
        _ => return e.to_string(),
    };
    format!("{why} ({e})")
}

/// The one crypto provider: ring.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn server_config(t: &TlsOptions) -> Result<Arc<ServerConfig>, Error> {
    t.configs
        .server
        .get_or_init(|| build_server(t).map(Arc::new))
        .clone()
        .map_err(Error::Address)
}

fn client_config(t: &TlsOptions) -> Result<Arc<ClientConfig>, Error> {
    t.configs
        .client
        .get_or_init(|| build_client(t).map(Arc::new))
        .clone()
        .map_err(Error::Address)
}

fn build_server(t: &TlsOptions) -> Result<ServerConfig, String> {
    let Some(identity) = &t.identity else {
        return Err(
            "a tls:// or wss:// listener needs a certificate and private key \
                    (Options::tls_identity)"
                .into(),
        );
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &t.client_roots {
        Some(roots) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
                    .build()
                    .map_err(|e| format!("TLS client CAs: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // Session tickets stay on (rustls sends two after each handshake): a client that was
    // asked for a certificate waits for them as the server's verdict.
    Ok(builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(identity.clone()))))
}

fn build_client(t: &TlsOptions) -> Result<ClientConfig, String> {
    let Some(roots) = &t.server_roots else {
        return Err(
            "a tls:// or wss:// connection needs the CA that signed the server's \
                    certificate (Options::tls_ca)"
                .into(),
        );
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
        .build()
        .map_err(|e| format!("TLS CAs: {e}"))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_webpki_verifier(verifier);
    // This side's certificate goes in per connection (`AskedFor`, in `client_stream_until`).
    Ok(builder.with_no_client_auth())
}

fn empty_roots() -> RootCertStore {
    RootCertStore::empty()
}

/// Adds every certificate in `pem` to `roots`; at least one must be there.
fn add_roots(roots: &mut RootCertStore, pem: &[u8], what: &str) -> Result<(), Error> {
    for cert in certificates(pem, what)? {
        roots
            .add(cert)
            .map_err(|e| invalid(format!("{what}: not a usable CA certificate ({e})")))?;
    }
    Ok(())
}

/// The certificates in `pem`, in order; at least one.
fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{what}: bad PEM ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(format!("{what}: no certificate in it")));
    }
    Ok(certs)
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display()))))
}

fn invalid(why: String) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::InvalidData, why))
}

/// The host in `HOST:PORT`, `[V6]:PORT` or a bare `HOST`.
fn host_of(s: &str) -> &str {
    if s.parse::<IpAddr>().is_ok() {
        return s;
    }
    let host = match s.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => s,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The name a verified certificate proves: its subject common name, else its first DNS or URI
/// subject alternative name.
fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    if let Some(cn) = common_name(cert.subject()) {
        return Some(cn);
    }
    cert.valid_dns_names()
        .next()
        .or_else(|| cert.valid_uri_names().next())
        .map(str::to_string)
}

/// The first common name (OID 2.5.4.3) in the contents of a DER `Name` (a sequence of sets of
/// attribute type and value), as text.
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (tag, mut set, rest) = der(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (tag, pair, rest) = der(set)?;
            set = rest;
            if tag != 0x30 {
                return None;
            }
            let (tag, oid, value) = der(pair)?;
            if tag != 0x06 || oid != CN {
                continue;
            }
            let (tag, text, _) = der(value)?;
            return match tag {
                // UTF8String, PrintableString, TeletexString (ASCII in practice), IA5String.
                0x0c | 0x13 | 0x14 | 0x16 => std::str::from_utf8(text).ok().map(str::to_string),
                // BMPString: UTF-16, big-endian.
                0x1e if text.len() % 2 == 0 => char::decode_utf16(
                    text.chunks_exact(2)
                        .map(|p| u16::from_be_bytes([p[0], p[1]])),
                )
                .collect::<Result<String, _>>()
                .ok(),
                _ => None,
            };
        }
    }
    None
}

/// Splits one DER element off `input`: its tag, its contents and what follows. Single-byte
/// tags and definite lengths only; `None` for anything else or too short.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("example.com:443"), "example.com");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("example.com"), "example.com");
    }

    #[test]
    fn der_rejects_truncation() {
        assert_eq!(
            der(&[0x30, 0x02, 1, 2, 9]),
            Some((0x30, &[1u8, 2][..], &[9u8][..]))
        );
        assert_eq!(der(&[0x30, 0x03, 1, 2]), None);
        assert_eq!(der(&[0x30, 0x81]), None);
        assert_eq!(der(&[0x30, 0x80]), None);
        assert_eq!(der(&[0x30]), None);
        let long = [&[0x04, 0x82, 0x01, 0x00][..], &[7u8; 256]].concat();
        assert_eq!(der(&long).map(|(_, c, _)| c.len()), Some(256));
    }

    #[test]
    fn common_name_found_among_attributes() {
        // SET { SEQ { OID 2.5.4.6 (C), PrintableString "NL" } },
        // SET { SEQ { OID 2.5.4.3 (CN), UTF8String "alice" } }
        let name = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'N', b'L', //
            0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b'a', b'l', b'i',
            b'c', b'e',
        ];
        assert_eq!(common_name(&name).as_deref(), Some("alice"));
        assert_eq!(common_name(&name[..13]), None);
        assert_eq!(common_name(&name[..20]), None, "truncated");
    }
}
