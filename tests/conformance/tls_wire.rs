//! The `tls` wire: sessions over `tls://` on loopback with mutual TLS, and the raw TLS peer
//! the wire-level cases write their frames through.
//!
//! Certificates (a CA, the server's for 127.0.0.1, a client's) are made by rcgen once per test
//! binary. Every listener and client shares one set of `Options`, so later connections also
//! exercise TLS 1.3 session resumption.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use libchan::{Options, Session};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::harness::{Raw, SessionT, Wire};

/// Sessions over `tls://` on loopback, the client presenting a certificate.
pub struct TlsWire;

/// The `tls` transport.
pub type TlsT = SessionT<TlsWire>;

impl Wire for TlsWire {
    const NAME: &'static str = "tls";
    const TRANSPORT: libchan::Transport = libchan::Transport::Tls;

    fn connect() -> (Session, Session) {
        let (listener, addr) = listen();
        let client =
            thread::spawn(move || libchan::connect_with(&addr, &certs().client).expect("connect"));
        let server = listener.accept().expect("accept");
        let client = client.join().expect("connect thread");
        assert_eq!(
            server.peer_identity().as_deref(),
            Some("conformance client")
        );
        assert_eq!(
            client.peer_identity().as_deref(),
            Some("conformance server")
        );
        (client, server)
    }

    fn raw() -> (Raw, Session) {
        let (listener, addr) = listen();
        let hostport = addr.trim_start_matches("tls://").to_string();
        // The TLS handshake needs both sides at once: the raw client runs it (and writes its
        // hello) on a thread while the listener accepts.
        let client = thread::spawn(move || {
            let mut raw = RawTls::connect(&hostport);
            raw.write_all(&crate::wire::hello()).expect("write hello");
            raw
        });
        let session = listener.accept().expect("handshake");
        (Raw::Tls(client.join().expect("raw client")), session)
    }
}

/// A raw TLS client: the test's frames go through rustls to a `tls://` session. Clones share
/// the connection, so one thread can read while another writes.
pub struct RawTls {
    shared: Arc<Shared>,
    read_timeout: Mutex<Option<Duration>>,
}

struct Shared {
    /// Blocking, with short timeouts: no call holds the lock for longer than [`SLICE`].
    sock: TcpStream,
    tls: Mutex<rustls::ClientConnection>,
}

/// The longest a socket call of the raw peer blocks while it holds the connection's lock.
const SLICE: Duration = Duration::from_millis(10);

impl RawTls {
    fn connect(hostport: &str) -> RawTls {
        let mut sock = TcpStream::connect(hostport).expect("connect");
        sock.set_nodelay(true).expect("nodelay");
        let name = ServerName::try_from("127.0.0.1").expect("server name");
        let mut tls =
            rustls::ClientConnection::new(certs().raw_config.clone(), name).expect("TLS client");
        sock.set_read_timeout(Some(crate::harness::PATIENCE))
            .expect("timeout");
        while tls.is_handshaking() {
            tls.complete_io(&mut sock).expect("TLS handshake");
        }
        sock.set_read_timeout(Some(SLICE)).expect("timeout");
        sock.set_write_timeout(Some(SLICE)).expect("timeout");
        RawTls {
            shared: Arc::new(Shared {
                sock,
                tls: Mutex::new(tls),
            }),
            read_timeout: Mutex::new(None),
        }
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<RawTls> {
        Ok(RawTls {
            shared: self.shared.clone(),
            read_timeout: Mutex::new(*self.read_timeout.lock().expect("timeout lock")),
        })
    }

    /// How long `read` waits for data (`None`: for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        *self.read_timeout.lock().expect("timeout lock") = t;
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, rustls::ClientConnection> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Read for RawTls {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = *self.read_timeout.lock().expect("timeout lock");
        let deadline = limit.map(|t| Instant::now() + t);
        loop {
            {
                let mut tls = self.shared.lock();
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Cut off without close_notify: the end of the stream, for a test.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                match tls.read_tls(&mut &self.shared.sock) {
                    Ok(_) => {
                        tls.process_new_packets().map_err(io::Error::other)?;
                        continue;
                    }
                    Err(e) if timed_out(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }
}

impl Write for RawTls {
    /// Returns once what it took is on the socket (the harness never calls `flush`).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.shared.lock().writer().write(buf)?;
            loop {
                // The lock is let go between attempts, so a reader can take its turn.
                let mut tls = self.shared.lock();
                if !tls.wants_write() {
                    break;
                }
                match tls.write_tls(&mut &self.shared.sock) {
                    Ok(_) => {}
                    Err(e) if timed_out(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            if n > 0 {
                return Ok(n);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The certificates and options every `tls` case shares.
struct Certs {
    server: Options,
    client: Options,
    /// For the raw peer: trusts the CA, presents the client certificate.
    raw_config: Arc<rustls::ClientConfig>,
}

fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name = named("conformance CA");
        let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
        let issuer = Issuer::new(ca, ca_key);
        let issue = |cn: &str, sans: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name = named(cn);
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = issue("conformance server", vec!["127.0.0.1".into()]);
        let (client_cert, client_key) = issue("conformance client", vec![]);
        let server = Options::new()
            .tls_identity_pem(server_cert.as_bytes(), server_key.as_bytes())
            .expect("server identity")
            .tls_client_auth_pem(ca_pem.as_bytes())
            .expect("client CA");
        let client = Options::new()
            .tls_ca_pem(ca_pem.as_bytes())
            .expect("CA")
            .tls_identity_pem(client_cert.as_bytes(), client_key.as_bytes())
            .expect("client identity");

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM"))
            .expect("CA");
        let chain = vec![CertificateDer::from_pem_slice(client_cert.as_bytes()).expect("PEM")];
        let key = PrivateKeyDer::from_pem_slice(client_key.as_bytes()).expect("key PEM");
        let raw_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
        Certs {
            server,
            client,
            raw_config: Arc::new(raw_config),
        }
    })
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A `tls://` listener on a fresh loopback port, and its address.
fn listen() -> (libchan::Listener, String) {
    let listener = libchan::listen_with("tls://127.0.0.1:0", &certs().server).expect("listen");
    let addr = listener.local_addr().expect("local_addr");
    (listener, addr)
}
