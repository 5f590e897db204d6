//! `tls://` sessions: round trips, mutual TLS with the peer's identity on the `Session`, the
//! refusal of unauthenticated or mismatched peers (each side's error checked), configuration
//! errors, and a handshake with `openssl s_client` (TLS 1.3).
//!
//! Certificates are made by rcgen when the tests run; no key is kept in the repository.

mod common;

use common::with_timeout;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use libchan::{Error, Listener, Options, Session, Transport};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};

/// Every test body gets this long.
const LIMIT: Duration = Duration::from_secs(30);

/// A certificate authority made for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its private key, both PEM.
struct Identity {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = named(name);
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for common name `cn`, valid for `names` (DNS names or IP addresses).
    fn issue(&self, cn: &str, names: &[&str]) -> Identity {
        let key = KeyPair::generate().expect("key");
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name = named(cn);
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Identity {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Server options with `id` as the certificate.
fn server_opts(id: &Identity) -> Options {
    Options::new()
        .tls_identity_pem(id.cert.as_bytes(), id.key.as_bytes())
        .expect("server identity")
}

/// Client options trusting `ca`.
fn client_opts(ca: &Ca) -> Options {
    Options::new()
        .tls_ca_pem(ca.pem.as_bytes())
        .expect("trusted CA")
}

/// A listener on a fresh loopback port and its `tls://` address.
fn listen(opts: &Options) -> (Listener, String) {
    let listener = libchan::listen_with("tls://127.0.0.1:0", opts).expect("listen");
    let addr = listener.local_addr().expect("local_addr");
    assert!(addr.starts_with("tls://127.0.0.1:"), "{addr}");
    (listener, addr)
}

/// Connects with `client` in a thread while `listener` accepts: (client's result, server's).
fn handshake(
    listener: &Listener,
    addr: &str,
    client: Options,
) -> (Result<Session, Error>, Result<Session, Error>) {
    let addr = addr.to_string();
    let connector = thread::spawn(move || libchan::connect_with(&addr, &client));
    let server = listener.accept();
    (connector.join().expect("connect thread"), server)
}

/// The text of a handshake error, or a failure naming what came instead.
#[track_caller]
fn refusal(r: Result<Session, Error>, side: &str) -> String {
    match r {
        Err(Error::Handshake(why)) => why,
        Err(e) => panic!("{side}: expected a handshake error, got {e:?}"),
        Ok(_) => panic!("{side}: expected a refusal, the session was established"),
    }
}

/// A fresh directory for PEM files, removed by the caller.
fn scratch_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "libchan-tls-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Messages travel both ways over `tls://`; both sessions say so, the client knows the
/// server's name from its certificate, and the server (no client certificates) knows none.
#[test]
fn round_trip_over_tls() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let server_id = ca.issue("server", &["127.0.0.1", "localhost"]);
        let (listener, addr) = listen(&server_opts(&server_id));
        let (client, server) = handshake(&listener, &addr, client_opts(&ca));
        let (client, server) = (client.expect("connect"), server.expect("accept"));
        assert_eq!(client.transport(), Transport::Tls);
        assert_eq!(server.transport(), Transport::Tls);
        assert_eq!(client.peer_identity().as_deref(), Some("server"));
        assert_eq!(server.peer_identity(), None);
        assert_eq!(client.peer_uid(), None);

        let up = client.open_channel::<String>().expect("open up");
        let down = server.open_channel::<Vec<u8>>().expect("open down");
        up.send("over TLS".to_string()).expect("send up");
        let big = (0..200_000u32).map(|i| i as u8).collect::<Vec<u8>>();
        down.send(big.clone()).expect("send down");
        let rx_up = server
            .accept_channel_timeout::<String>(Duration::from_secs(5))
            .expect("accept up");
        let rx_down = client
            .accept_channel_timeout::<Vec<u8>>(Duration::from_secs(5))
            .expect("accept down");
        let m = rx_up.recv_timeout(Duration::from_secs(5)).expect("recv up");
        assert_eq!(m.as_str(), "over TLS");
        let m = rx_down
            .recv_timeout(Duration::from_secs(5))
            .expect("recv down");
        assert_eq!(m.as_slice(), &big[..]);
    });
}

/// Many messages, more than any socket buffer, from one thread while another receives.
#[test]
fn streaming_over_tls() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let (listener, addr) = listen(&server_opts(&ca.issue("server", &["127.0.0.1"])));
        let (client, server) = handshake(&listener, &addr, client_opts(&ca));
        let (client, server) = (client.expect("connect"), server.expect("accept"));
        let tx = client.open_channel::<Vec<u8>>().expect("open");
        let sender = thread::spawn(move || {
            for i in 0..2000u32 {
                let mut m = vec![7u8; 4096];
                m[..4].copy_from_slice(&i.to_le_bytes());
                tx.send(m).expect("send");
            }
            client
        });
        let rx = server
            .accept_channel_timeout::<Vec<u8>>(Duration::from_secs(5))
            .expect("accept");
        for i in 0..2000u32 {
            let m = rx.recv_timeout(Duration::from_secs(5)).expect("recv");
            assert_eq!(m[..4], i.to_le_bytes(), "message {i} out of order");
            assert_eq!(m.len(), 4096);
        }
        drop(sender.join().expect("sender"));
    });
}

/// Mutual TLS, configured from PEM files: the server sees the client's name, the client the
/// server's.
#[test]
fn mutual_tls_reports_peer_identity() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let server_id = ca.issue("server", &["127.0.0.1"]);
        let alice = ca.issue("alice", &["alice.example"]);
        let dir = scratch_dir();
        let file = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write PEM");
            p
        };
        let (ca_pem, server_cert, server_key, alice_cert, alice_key) = (
            file("ca.pem", &ca.pem),
            file("server.pem", &server_id.cert),
            file("server.key", &server_id.key),
            file("alice.pem", &alice.cert),
            file("alice.key", &alice.key),
        );
        let server_opts = Options::new()
            .tls_identity(&server_cert, &server_key)
            .expect("server identity")
            .tls_client_auth(&ca_pem)
            .expect("client CA");
        let client_opts = Options::new()
            .tls_ca(&ca_pem)
            .expect("CA")
            .tls_identity(&alice_cert, &alice_key)
            .expect("client identity");
        std::fs::remove_dir_all(&dir).expect("remove scratch dir");

        let (listener, addr) = listen(&server_opts);
        let (client, server) = handshake(&listener, &addr, client_opts);
        let (client, server) = (client.expect("connect"), server.expect("accept"));
        assert_eq!(server.peer_identity().as_deref(), Some("alice"));
        assert_eq!(client.peer_identity().as_deref(), Some("server"));
        let tx = server.open_channel::<u64>().expect("open");
        tx.send(42).expect("send");
        let rx = client
            .accept_channel_timeout::<u64>(Duration::from_secs(5))
            .expect("accept");
        assert_eq!(*rx.recv_timeout(Duration::from_secs(5)).expect("recv"), 42);
    });
}

/// A client certificate without a common name is known by its first DNS name.
#[test]
fn identity_falls_back_to_the_dns_name() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["worker-7.example".to_string()]).expect("p");
        params.distinguished_name = DistinguishedName::new();
        let cert = params.signed_by(&key, &ca.issuer).expect("certificate");
        let server = server_opts(&ca.issue("server", &["127.0.0.1"]))
            .tls_client_auth_pem(ca.pem.as_bytes())
            .expect("client CA");
        let client = client_opts(&ca)
            .tls_identity_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .expect("client identity");
        let (listener, addr) = listen(&server);
        let (client, server) = handshake(&listener, &addr, client);
        let (_client, server) = (client.expect("connect"), server.expect("accept"));
        assert_eq!(server.peer_identity().as_deref(), Some("worker-7.example"));
    });
}

/// A listener that requires client certificates refuses a client without one, and says so
/// on both sides; the listener keeps serving.
#[test]
fn client_without_certificate_is_refused() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let server = server_opts(&ca.issue("server", &["127.0.0.1"]))
            .tls_client_auth_pem(ca.pem.as_bytes())
            .expect("client CA");
        let (listener, addr) = listen(&server);
        let (client, server) = handshake(&listener, &addr, client_opts(&ca));
        let server_why = refusal(server, "server");
        let client_why = refusal(client, "client");
        eprintln!("server: {server_why}\nclient: {client_why}");
        assert!(
            server_why.contains("presented no certificate"),
            "server: {server_why}"
        );
        assert!(
            client_why.contains("requires a client certificate"),
            "client: {client_why}"
        );

        // The same listener accepts a client that has one.
        let bob = ca.issue("bob", &[]);
        let good = client_opts(&ca)
            .tls_identity_pem(bob.cert.as_bytes(), bob.key.as_bytes())
            .expect("client identity");
        let (client, server) = handshake(&listener, &addr, good);
        let (_client, server) = (client.expect("connect"), server.expect("accept"));
        assert_eq!(server.peer_identity().as_deref(), Some("bob"));
    });
}

/// A client certificate from a CA the server does not trust is refused, on both sides.
#[test]
fn client_certificate_from_untrusted_ca_is_refused() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let rogue = Ca::new("rogue CA");
        let server = server_opts(&ca.issue("server", &["127.0.0.1"]))
            .tls_client_auth_pem(ca.pem.as_bytes())
            .expect("client CA");
        let mallory = rogue.issue("mallory", &[]);
        let client = client_opts(&ca)
            .tls_identity_pem(mallory.cert.as_bytes(), mallory.key.as_bytes())
            .expect("client identity");
        let (listener, addr) = listen(&server);
        let (client, server) = handshake(&listener, &addr, client);
        let server_why = refusal(server, "server");
        let client_why = refusal(client, "client");
        eprintln!("server: {server_why}\nclient: {client_why}");
        assert!(
            server_why.contains("not signed by a trusted CA"),
            "server: {server_why}"
        );
        assert!(
            client_why.contains("does not trust the CA"),
            "client: {client_why}"
        );
    });
}

/// A server whose certificate comes from a CA the client does not trust is refused, on both
/// sides.
#[test]
fn server_from_untrusted_ca_is_refused() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let rogue = Ca::new("rogue CA");
        let (listener, addr) = listen(&server_opts(&rogue.issue("server", &["127.0.0.1"])));
        let (client, server) = handshake(&listener, &addr, client_opts(&ca));
        let client_why = refusal(client, "client");
        let server_why = refusal(server, "server");
        eprintln!("server: {server_why}\nclient: {client_why}");
        assert!(
            client_why.contains("not signed by a trusted CA"),
            "client: {client_why}"
        );
        assert!(
            server_why.contains("does not trust the CA"),
            "server: {server_why}"
        );
    });
}

/// A server whose certificate names another host is refused, on both sides; naming that host
/// with `tls_server_name` makes the same server acceptable.
#[test]
fn server_with_wrong_name_is_refused() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let (listener, addr) = listen(&server_opts(&ca.issue("server", &["other.example"])));
        let (client, server) = handshake(&listener, &addr, client_opts(&ca));
        let client_why = refusal(client, "client");
        let server_why = refusal(server, "server");
        eprintln!("server: {server_why}\nclient: {client_why}");
        assert!(
            client_why.contains("does not carry the name") && client_why.contains("127.0.0.1"),
            "client: {client_why}"
        );
        assert!(
            server_why.contains("refused this side's certificate"),
            "server: {server_why}"
        );

        let named = client_opts(&ca)
            .tls_server_name("other.example")
            .expect("server name");
        let (client, server) = handshake(&listener, &addr, named);
        let (client, _server) = (client.expect("connect"), server.expect("accept"));
        assert_eq!(client.peer_identity().as_deref(), Some("server"));
    });
}

/// A plain `tcp://` libchan client at a `tls://` listener is refused on both sides, and the
/// listener keeps serving.
#[test]
fn plain_tcp_client_is_refused() {
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let (listener, addr) = listen(&server_opts(&ca.issue("server", &["127.0.0.1"])));
        let tcp_addr = addr.replace("tls://", "tcp://");
        let connector = thread::spawn(move || libchan::connect(&tcp_addr));
        let server_why = refusal(listener.accept(), "server");
        assert!(
            server_why.contains("does not speak TLS"),
            "server: {server_why}"
        );
        match connector.join().expect("connect thread") {
            Err(Error::Handshake(_) | Error::Io(_)) => {}
            other => panic!("client: expected a failed handshake, got {other:?}"),
        }
        let (client, server) = handshake(&listener, &addr, client_opts(&ca));
        assert_eq!(client.expect("connect").transport(), Transport::Tls);
        server.expect("accept");
    });
}

/// Missing configuration is a clear error before any connection: no certificate to listen
/// with, no CA to check the server against.
#[test]
fn missing_configuration_is_an_error() {
    match libchan::listen("tls://127.0.0.1:0") {
        Err(Error::Address(why)) => assert!(why.contains("tls_identity"), "{why}"),
        other => panic!("listen without a certificate: {other:?}"),
    }
    let ca = Ca::new("test CA");
    let (listener, addr) = listen(&server_opts(&ca.issue("server", &["127.0.0.1"])));
    match libchan::connect(&addr) {
        Err(Error::Address(why)) => assert!(why.contains("tls_ca"), "{why}"),
        other => panic!("connect without a CA: {other:?}"),
    }
    drop(listener);
}

/// Bad PEM input is refused when it is configured.
#[test]
fn bad_pem_is_refused() {
    let ca = Ca::new("test CA");
    let id = ca.issue("server", &["127.0.0.1"]);
    let other = ca.issue("other", &["127.0.0.1"]);
    let io = |r: Result<Options, Error>| match r {
        Err(Error::Io(e)) => e.to_string(),
        Err(e) => panic!("expected an I/O error, got {e:?}"),
        Ok(_) => panic!("expected an error"),
    };
    let why = io(Options::new().tls_identity_pem(b"nothing here", id.key.as_bytes()));
    assert!(why.contains("no certificate"), "{why}");
    let why = io(Options::new().tls_identity_pem(id.cert.as_bytes(), id.cert.as_bytes()));
    assert!(why.contains("no private key"), "{why}");
    let why = io(Options::new().tls_identity_pem(id.cert.as_bytes(), other.key.as_bytes()));
    assert!(
        why.contains("key"),
        "a key that is not the certificate's: {why}"
    );
    let why = io(Options::new().tls_ca_pem(b""));
    assert!(why.contains("no certificate"), "{why}");
    let why = io(Options::new().tls_client_auth_pem(id.key.as_bytes()));
    assert!(why.contains("no certificate"), "{why}");
    match Options::new().tls_ca("/nonexistent/libchan-ca.pem") {
        Err(Error::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
            assert!(e.to_string().contains("/nonexistent/libchan-ca.pem"), "{e}");
        }
        other => panic!("missing file: {other:?}"),
    }
}

/// A client nobody here wrote, `openssl s_client`, completes a TLS 1.3 handshake with a
/// `tls://` listener and verifies its certificate.
#[test]
fn openssl_s_client_handshakes_tls13() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: `openssl` is not installed");
        return;
    }
    with_timeout(LIMIT, || {
        let ca = Ca::new("test CA");
        let (listener, addr) = listen(&server_opts(&ca.issue("server", &["127.0.0.1"])));
        let dir = scratch_dir();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).expect("write CA");
        let server = thread::spawn(move || listener.accept());
        let hostport = addr.trim_start_matches("tls://").to_string();
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &hostport, "-tls1_3", "-CAfile"])
            .arg(&ca_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl");
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read stdout");
        let mut err = String::new();
        let _ = child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err);
        let _ = child.wait();
        std::fs::remove_dir_all(&dir).expect("remove scratch dir");
        // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384": the handshake completed on 1.3.
        // (The session block, "Protocol  : TLSv1.3", is printed only when a session ticket
        // arrives before openssl hangs up; if it is there it must agree.)
        let new = out.lines().find(|l| l.starts_with("New, "));
        eprintln!("openssl: {new:?}");
        assert!(
            new.is_some_and(|l| l.starts_with("New, TLSv1.3, Cipher is ")),
            "openssl output:\n{out}\n{err}"
        );
        if let Some(p) = out
            .lines()
            .find(|l| l.trim_start().starts_with("Protocol  :"))
        {
            assert_eq!(p.trim(), "Protocol  : TLSv1.3", "openssl output:\n{out}");
        }
        assert!(
            out.contains("Verify return code: 0 (ok)"),
            "openssl did not verify the chain:\n{out}"
        );
        // openssl hangs up after the TLS handshake, before the libchan hello: the server's
        // TLS side completed and only the libchan handshake failed.
        match server.join().expect("server thread") {
            Err(Error::Handshake(why)) => {
                assert!(!why.starts_with("TLS"), "the TLS handshake failed: {why}")
            }
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the libchan handshake to fail, got {other:?}"),
        }
    });
}
