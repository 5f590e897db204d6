//! WebSocket wires: `ws` (a client straight to a `ws://` listener) and `ws_nginx` (client →
//! a real nginx reverse proxy on loopback → the libchan listener), the raw WebSocket peer the
//! wire-level cases write their frames through, and checks of the WebSocket binding itself
//! (docs/PROTOCOL.md, "WebSocket binding"): the upgrade's path and subprotocol, text messages,
//! pings, close frames and the message size limit.
//!
//! nginx is started once for the whole test binary, as a child that dies with it: a
//! parent-death signal (set in the child before exec, tied to a thread that lives as long as
//! the process) and a SIGTERM from an `atexit` handler. Where nginx is not installed, the
//! `ws_nginx` cases say so on stderr and run on a direct connection, and the nginx-only checks
//! here print why they skip.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use libchan::{Error, Listener, Session};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::{header, HeaderValue};
use tungstenite::protocol::Role;
use tungstenite::{Bytes, Message, WebSocket};

use crate::harness::{watchdog, Raw, SessionT, Wire, PATIENCE};

/// The path every listener here serves.
const PATH: &str = "/chan";

/// The largest binary message the raw peer writes (libchan frames are a byte stream; message
/// boundaries mean nothing).
const RAW_CHUNK: usize = 64 << 10;

/// Sessions over a WebSocket on loopback, client straight to the listener.
pub struct WsWire;

/// The `ws` transport.
pub type WsT = SessionT<WsWire>;

impl Wire for WsWire {
    const NAME: &'static str = "ws";
    const TRANSPORT: libchan::Transport = libchan::Transport::Ws;

    fn connect() -> (Session, Session) {
        let listener = ws_listener();
        let addr = listener.local_addr().expect("local_addr");
        pair_through(&listener, addr)
    }

    fn raw() -> (Raw, Session) {
        let listener = ws_listener();
        let addr = listener.local_addr().expect("local_addr");
        raw_through(&listener, addr)
    }
}

/// Sessions through nginx: the client connects to nginx, which proxies the upgrade (and then
/// the connection's bytes) to one libchan listener shared by the whole test binary.
pub struct NginxWire;

/// The `ws_nginx` transport.
pub type WsNginxT = SessionT<NginxWire>;

impl Wire for NginxWire {
    const NAME: &'static str = "ws_nginx";
    const TRANSPORT: libchan::Transport = libchan::Transport::Ws;

    fn connect() -> (Session, Session) {
        let Some(nginx) = nginx() else {
            eprintln!(
                "ws_nginx: {}; this case runs on a direct ws:// connection",
                no_nginx()
            );
            return WsWire::connect();
        };
        let upstream = nginx.upstream();
        pair_through(&upstream, nginx.url(PATH))
    }

    fn raw() -> (Raw, Session) {
        // The raw peer goes through nginx as well: after the upgrade nginx relays the
        // connection's bytes as they come (it does not re-frame them), so a frame a case
        // writes by hand reaches libchan as written.
        let Some(nginx) = nginx() else {
            eprintln!(
                "ws_nginx: {}; this case runs on a direct ws:// connection",
                no_nginx()
            );
            return WsWire::raw();
        };
        let upstream = nginx.upstream();
        raw_through(&upstream, nginx.url(PATH))
    }
}

/// A fresh `ws://` listener on a loopback port the system picks.
fn ws_listener() -> Listener {
    libchan::listen(&format!("ws://127.0.0.1:0{PATH}")).expect("listen ws://")
}

/// Connects a client to `url` (on another thread) while `listener` accepts it.
fn pair_through(listener: &Listener, url: String) -> (Session, Session) {
    let client = thread::spawn(move || libchan::connect(&url));
    let server = listener.accept().expect("accept");
    let client = client.join().expect("connect thread").expect("connect");
    (client, server)
}

/// A raw WebSocket peer at `url` that has sent its hello, and the session `listener` accepted
/// for it.
fn raw_through(listener: &Listener, url: String) -> (Raw, Session) {
    let client = thread::spawn(move || {
        let mut raw = RawWs::connect(&url).expect("raw WebSocket upgrade");
        raw.write_all(&crate::wire::hello()).expect("write hello");
        raw
    });
    let session = listener.accept().expect("handshake");
    (Raw::Ws(client.join().expect("raw client thread")), session)
}

/// A hand-driven WebSocket client: writes bytes as binary messages and reads the payloads of
/// binary messages as one stream. Reading and writing use separate handles (a blocking
/// tungstenite reader, and a writer on a clone of the socket), so that one thread can block
/// reading while another writes, as on a plain socket.
pub struct RawWs {
    reader: Arc<Mutex<RawReader>>,
    writer: Arc<Mutex<WebSocket<TcpStream>>>,
}

struct RawReader {
    ws: WebSocket<TcpStream>,
    /// What is left of the last binary message.
    input: Bytes,
}

impl RawWs {
    /// Runs the upgrade for `url` (with the `libchan` subprotocol), blocking.
    pub fn connect(url: &str) -> Result<RawWs, tungstenite::Error> {
        Self::connect_with(url, Some("libchan"))
    }

    /// Runs the upgrade for `url`, offering `subprotocol` if any.
    pub fn connect_with(url: &str, subprotocol: Option<&str>) -> Result<RawWs, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if let Some(p) = subprotocol {
            let value = HeaderValue::from_str(p).expect("a header value");
            request
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
        }
        let hostport = request
            .uri()
            .authority()
            .expect("a ws:// URL names a host")
            .to_string();
        let tcp = TcpStream::connect(hostport)?;
        tcp.set_read_timeout(Some(PATIENCE))?;
        tcp.set_write_timeout(Some(PATIENCE))?;
        let (ws, _response) = tungstenite::client::client(request, tcp).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => {
                tungstenite::Error::Io(io::ErrorKind::TimedOut.into())
            }
        })?;
        let writer = WebSocket::from_raw_socket(ws.get_ref().try_clone()?, Role::Client, None);
        Ok(RawWs {
            reader: Arc::new(Mutex::new(RawReader {
                ws,
                input: Bytes::new(),
            })),
            writer: Arc::new(Mutex::new(writer)),
        })
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<RawWs> {
        Ok(RawWs {
            reader: self.reader.clone(),
            writer: self.writer.clone(),
        })
    }

    /// Sets the read timeout of the connection.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        lock(&self.reader).ws.get_ref().set_read_timeout(t)
    }

    /// Sends one WebSocket message as it is.
    pub fn send(&self, msg: Message) -> Result<(), tungstenite::Error> {
        lock(&self.writer).send(msg)
    }

    /// Writes bytes on the TCP connection, under the WebSocket layer.
    pub fn write_tcp(&self, bytes: &[u8]) -> io::Result<()> {
        lock(&self.writer).get_mut().write_all(bytes)
    }

    /// The next WebSocket message, whatever its kind (bytes of a binary message partly read
    /// through `Read` are lost).
    pub fn next_message(&self) -> Result<Message, tungstenite::Error> {
        let mut r = lock(&self.reader);
        r.input = Bytes::new();
        r.ws.read()
    }
}

impl Read for RawWs {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut r = lock(&self.reader);
        loop {
            if !r.input.is_empty() {
                let n = buf.len().min(r.input.len());
                buf[..n].copy_from_slice(&r.input[..n]);
                r.input = r.input.slice(n..);
                return Ok(n);
            }
            match r.ws.read() {
                Ok(Message::Binary(data)) => r.input = data,
                Ok(Message::Text(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "libchan sent a text message",
                    ))
                }
                Ok(Message::Close(_))
                | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(0)
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

impl Write for RawWs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(RAW_CHUNK);
        match self.send(Message::Binary(buf[..n].to_vec().into())) {
            Ok(()) => Ok(n),
            Err(tungstenite::Error::Io(e)) => Err(e),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A case that panicked while holding it leaves nothing half-done that matters here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The nginx this test binary runs, with the libchan listener it proxies to.
struct Nginx {
    /// nginx's loopback port.
    port: u16,
    /// Its prefix directory (configuration and logs).
    dir: PathBuf,
    /// The listener behind nginx. Whoever accepts holds the lock from the client's connect
    /// to the accept, so that each accept takes the connection its caller made.
    upstream: Mutex<Listener>,
}

impl Nginx {
    fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    fn upstream(&self) -> MutexGuard<'_, Listener> {
        lock(&self.upstream)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

/// Where nginx is installed (`.ci/run` installs Debian's package), if it is:
/// `$LIBCHAN_TEST_NGINX` when set (a path that is not a file means "no nginx"), else
/// /usr/sbin/nginx, else `nginx` on `PATH`.
fn nginx_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LIBCHAN_TEST_NGINX") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let system = PathBuf::from("/usr/sbin/nginx");
    if system.is_file() {
        return Some(system);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("nginx"))
        .find(|p| p.is_file())
}

fn no_nginx() -> &'static str {
    "nginx is not installed (not at $LIBCHAN_TEST_NGINX, /usr/sbin/nginx nor on PATH; \
     .ci/run installs it)"
}

/// The nginx of this test binary, started on first use; `None` where nginx is not installed.
/// Panics if nginx is installed but does not start.
fn nginx() -> Option<&'static Nginx> {
    static NGINX: OnceLock<Option<Nginx>> = OnceLock::new();
    NGINX
        .get_or_init(|| nginx_binary().map(start_nginx))
        .as_ref()
}

/// nginx's process id, for the `atexit` handler.
static NGINX_PID: OnceLock<u32> = OnceLock::new();
/// The prefix directory to remove at exit.
static NGINX_DIR: OnceLock<PathBuf> = OnceLock::new();

fn start_nginx(bin: PathBuf) -> Nginx {
    let upstream = ws_listener();
    let up_port = port_of(&upstream.local_addr().expect("local_addr"));
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("libchan-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("nginx prefix directory");
    let _ = NGINX_DIR.set(dir.clone());
    register_atexit();
    let mut failures = String::new();
    // A port chosen by binding port 0 may be taken again before nginx binds it: try a few.
    for _ in 0..3 {
        let port = free_port();
        std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, port, up_port))
            .expect("write nginx.conf");
        let exited = spawn_nginx(&bin, &dir);
        if wait_for_port(port, &exited) {
            return Nginx {
                port,
                dir,
                upstream: Mutex::new(upstream),
            };
        }
        let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        failures.push_str(&format!("port {port}: {log}\n"));
    }
    panic!("nginx ({}) did not start:\n{failures}", bin.display());
}

/// A configuration that proxies `/chan` on `port` to the libchan listener on `upstream`, with
/// everything nginx writes kept in `dir`. One process (no master, no workers): it runs as the
/// current user, root included, with no `user` directive, and dies as one.
fn nginx_conf(dir: &Path, port: u16, upstream: u16) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{
    worker_connections 1024;
}}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /chan {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"#
    )
}

/// Starts nginx from a thread that lives as long as this process: the parent-death signal is
/// tied to the thread that forked, so the child is killed when the process ends, not when a
/// test's thread does. Returns a flag set once nginx has exited.
fn spawn_nginx(bin: &Path, dir: &Path) -> Arc<Mutex<Option<String>>> {
    let exited = Arc::new(Mutex::new(None));
    let (tx, rx) = mpsc::channel();
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec, and only makes one system
    // call (prctl), which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(io::Error::from)
        });
    }
    let flag = exited.clone();
    thread::Builder::new()
        .name("nginx-keeper".into())
        .spawn(move || match cmd.spawn() {
            Err(e) => {
                *lock(&flag) = Some(format!("spawn failed: {e}"));
                let _ = tx.send(());
            }
            Ok(mut child) => {
                let _ = NGINX_PID.set(child.id());
                let _ = tx.send(());
                // Waiting keeps this thread (the child's "parent") alive for the whole run,
                // and reaps nginx if it ends early.
                let status = child.wait();
                *lock(&flag) = Some(format!("nginx exited: {status:?}"));
            }
        })
        .expect("spawn the nginx keeper thread");
    let _ = rx.recv();
    exited
}

/// Waits until nginx accepts on `port`; false if it exited or did not within a few seconds.
fn wait_for_port(port: u16, exited: &Mutex<Option<String>>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if lock(exited).is_some() {
            return false;
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Removes the nginx directories of earlier runs that were killed (their `atexit` never ran).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("libchan-nginx-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn port_of(addr: &str) -> u16 {
    let rest = addr.trim_start_matches("ws://");
    let hostport = rest.split('/').next().expect("host:port");
    hostport
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

extern "C" {
    fn atexit(cb: extern "C" fn()) -> std::os::raw::c_int;
}

/// Stops nginx and removes its directory when the test binary exits normally (the parent-death
/// signal covers every other end).
extern "C" fn stop_nginx() {
    if let Some(&pid) = NGINX_PID.get() {
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    if let Some(dir) = NGINX_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn register_atexit() {
    // SAFETY: `stop_nginx` is an `extern "C" fn()` that never unwinds (it ignores every error);
    // atexit only stores the pointer, which stays valid for the life of the program.
    let _ = unsafe { atexit(stop_nginx) };
}

/// Runs `body` under the conformance watchdog.
fn guarded(name: &str, body: impl FnOnce() + Send + 'static) {
    watchdog(name, body);
}

/// A listener and a raw peer that completed the upgrade and the hello; the raw peer has read
/// the session's hello.
fn raw_session() -> (RawWs, Session) {
    let listener = ws_listener();
    let addr = listener.local_addr().expect("local_addr");
    let (raw, session) = raw_through(&listener, addr);
    let Raw::Ws(mut raw) = raw else {
        unreachable!("raw_through makes a WebSocket peer")
    };
    let mut hello = [0u8; 32];
    raw.read_exact(&mut hello).expect("the session's hello");
    assert_eq!(&hello[..4], b"LCHN");
    (raw, session)
}

/// Drives `session` (nothing else reads it) until it closes; returns its close reason.
fn closes(session: &Session) -> String {
    let deadline = Instant::now() + PATIENCE;
    while !session.is_closed() {
        assert!(Instant::now() < deadline, "the session did not close");
        let _ = session.accept_channel_timeout::<u8>(Duration::from_millis(20));
    }
    session
        .close_reason()
        .expect("a closed session has a reason")
}

#[test]
fn wrong_path_is_refused_with_404() {
    guarded("ws_wire::wrong_path_is_refused_with_404", || {
        let listener = ws_listener();
        let addr = listener.local_addr().expect("local_addr");
        let wrong = addr.replace(PATH, "/elsewhere");
        let client = thread::spawn(move || libchan::connect(&wrong));
        let server = listener.accept().expect_err("a wrong path is refused");
        let client = client.join().expect("client thread").expect_err("refused");
        assert!(
            matches!(&server, Error::Handshake(m) if m.contains("404") && m.contains("/elsewhere")),
            "server side: {server}"
        );
        assert!(
            matches!(&client, Error::Handshake(m) if m.contains("404") && m.contains("no libchan endpoint")),
            "client side: {client}"
        );
        // The listener still serves its own path.
        let (a, b) = pair_through(&listener, addr);
        assert_eq!(a.transport(), libchan::Transport::Ws);
        drop((a, b));
    });
}

#[test]
fn upgrade_without_the_subprotocol_is_refused() {
    guarded(
        "ws_wire::upgrade_without_the_subprotocol_is_refused",
        || {
            let listener = ws_listener();
            let addr = listener.local_addr().expect("local_addr");
            let client = thread::spawn(move || RawWs::connect_with(&addr, None).map(|_| ()));
            let server = listener.accept().expect_err("no subprotocol, no session");
            assert!(
                matches!(&server, Error::Handshake(m) if m.contains("400") && m.contains("subprotocol")),
                "server side: {server}"
            );
            match client.join().expect("client thread") {
                Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 400),
                other => panic!("expected an HTTP 400, got {other:?}"),
            }
        },
    );
}

#[test]
fn text_message_ends_the_session() {
    guarded("ws_wire::text_message_ends_the_session", || {
        let (raw, session) = raw_session();
        raw.send(Message::text("hello")).expect("send text");
        let reason = closes(&session);
        assert!(reason.contains("text message"), "unclear reason: {reason}");
    });
}

#[test]
fn ping_is_answered_with_pong() {
    guarded("ws_wire::ping_is_answered_with_pong", || {
        let (raw, session) = raw_session();
        raw.send(Message::Ping(Bytes::from_static(b"are you there")))
            .expect("send ping");
        // Nothing reads a session unless a thread waits on it: wait for a channel meanwhile.
        let reader = thread::spawn(move || {
            let _ = session.accept_channel_timeout::<u8>(Duration::from_millis(500));
            session
        });
        match raw.next_message().expect("an answer") {
            Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
            other => panic!("expected a pong, got {other:?}"),
        }
        let session = reader.join().expect("reader thread");
        assert!(!session.is_closed(), "a ping is no error");
    });
}

#[test]
fn close_frame_ends_the_session() {
    guarded("ws_wire::close_frame_ends_the_session", || {
        let (raw, session) = raw_session();
        raw.send(Message::Close(None)).expect("send close");
        let reason = closes(&session);
        assert!(reason.contains("closed"), "reason: {reason}");
        // The session answers the close frame.
        loop {
            match raw.next_message() {
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(e) => panic!("expected a close frame back, got {e}"),
            }
        }
    });
}

#[test]
fn message_over_the_limit_ends_the_session() {
    guarded("ws_wire::message_over_the_limit_ends_the_session", || {
        let (raw, session) = raw_session();
        // A binary frame header announcing 64 MiB (masked, as a client's must be); the body
        // never comes: the length alone is over the limit.
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&(64u64 << 20).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        raw.write_tcp(&frame).expect("write the frame header");
        let reason = closes(&session);
        assert!(
            reason.contains("exceeds the limit"),
            "unclear reason: {reason}"
        );
    });
}

#[test]
fn large_messages_cross_in_pieces() {
    guarded("ws_wire::large_messages_cross_in_pieces", || {
        let (a, b) = WsWire::connect();
        let tx = a.open_channel::<Vec<u8>>().expect("open");
        let rx = b
            .accept_channel_timeout::<Vec<u8>>(PATIENCE)
            .expect("accept");
        let sender = thread::spawn(move || {
            for i in 0..4u8 {
                tx.send(vec![i; 3 << 20]).expect("send");
            }
            a
        });
        for i in 0..4u8 {
            let m = rx.recv_timeout(PATIENCE).expect("a message");
            assert_eq!(m.len(), 3 << 20);
            assert!(m.iter().all(|&x| x == i));
        }
        drop(sender.join().expect("sender"));
    });
}

#[test]
fn nginx_proxies_sessions() {
    guarded("ws_wire::nginx_proxies_sessions", || {
        let Some(nginx) = nginx() else {
            eprintln!("skipped: {}", no_nginx());
            return;
        };
        let (a, b) = {
            let upstream = nginx.upstream();
            pair_through(&upstream, nginx.url(PATH))
        };
        let tx = a.open_channel::<String>().expect("open");
        tx.send("through nginx".to_string()).expect("send");
        let rx = b
            .accept_channel_timeout::<String>(PATIENCE)
            .expect("accept");
        assert_eq!(
            rx.recv_timeout(PATIENCE).expect("a message").as_str(),
            "through nginx"
        );
        drop((tx, rx));
        a.close();
        drop((a, b));
        // nginx logs a request when its connection ends: the upgrade, answered 101.
        let deadline = Instant::now() + PATIENCE;
        while !nginx
            .access_log()
            .lines()
            .any(|l| l.contains("GET /chan HTTP/1.1\" 101"))
        {
            assert!(
                Instant::now() < deadline,
                "nginx logged no upgrade:\n{}",
                nginx.access_log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    });
}

#[test]
fn nginx_passes_libchan_404_back() {
    guarded("ws_wire::nginx_passes_libchan_404_back", || {
        let Some(nginx) = nginx() else {
            eprintln!("skipped: {}", no_nginx());
            return;
        };
        // nginx forwards every path under /chan; libchan serves /chan only.
        let upstream = nginx.upstream();
        let url = nginx.url("/chan/other");
        let client = thread::spawn(move || libchan::connect(&url));
        let server = upstream.accept().expect_err("a wrong path is refused");
        drop(upstream);
        assert!(
            matches!(&server, Error::Handshake(m) if m.contains("404")),
            "{server}"
        );
        let client = client.join().expect("client thread").expect_err("refused");
        assert!(
            matches!(&client, Error::Handshake(m) if m.contains("404")),
            "{client}"
        );
    });
}

/// A CA for one test: its PEM, and certificates it issues as (certificate PEM, key PEM).
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn issue(&self, cn: &str, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let sans = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut params = rcgen::CertificateParams::new(sans).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}

#[test]
fn wss_carries_sessions_with_client_certificates() {
    guarded(
        "ws_wire::wss_carries_sessions_with_client_certificates",
        || {
            let ca = TestCa::new("test CA");
            let (cert, key) = ca.issue("server", &["127.0.0.1"]);
            let (alice_cert, alice_key) = ca.issue("alice", &["alice.example"]);
            let server_opts = libchan::Options::new()
                .tls_identity_pem(cert.as_bytes(), key.as_bytes())
                .and_then(|o| o.tls_client_auth_pem(ca.pem.as_bytes()))
                .expect("server options");
            let client_opts = libchan::Options::new()
                .tls_ca_pem(ca.pem.as_bytes())
                .and_then(|o| o.tls_identity_pem(alice_cert.as_bytes(), alice_key.as_bytes()))
                .expect("client options");
            let listener = libchan::listen_with(&format!("wss://127.0.0.1:0{PATH}"), &server_opts)
                .expect("listen");
            let addr = listener.local_addr().expect("local_addr");
            assert!(
                addr.starts_with("wss://127.0.0.1:") && addr.ends_with(PATH),
                "{addr}"
            );
            let client = thread::spawn(move || libchan::connect_with(&addr, &client_opts));
            let b = listener.accept().expect("accept");
            let a = client.join().expect("client thread").expect("connect");
            assert_eq!(
                (a.transport(), b.transport()),
                (libchan::Transport::Ws, libchan::Transport::Ws)
            );
            assert_eq!(b.peer_identity().as_deref(), Some("alice"));
            assert_eq!(a.peer_identity().as_deref(), Some("server"));
            // Messages larger than a TLS record and than a WebSocket message, both ways.
            let tx = a.open_channel::<Vec<u8>>().expect("open");
            let rx = b
                .accept_channel_timeout::<Vec<u8>>(PATIENCE)
                .expect("accept");
            let back = b.open_channel::<Vec<u8>>().expect("open back");
            let back_rx = a
                .accept_channel_timeout::<Vec<u8>>(PATIENCE)
                .expect("accept back");
            // The far side reads while this one writes (a blocked send waits for its receiver's
            // credit), then the roles swap.
            let far = thread::spawn(move || {
                for i in 0..3u8 {
                    tx.send(vec![i; (2 << 20) + 7]).expect("send");
                }
                for i in 0..3u8 {
                    let m = back_rx.recv_timeout(PATIENCE).expect("a reply");
                    assert!(m.len() == (2 << 20) + 7 && m.iter().all(|&x| x == i));
                }
                a
            });
            let mut got = Vec::new();
            for i in 0..3u8 {
                let m = rx.recv_timeout(PATIENCE).expect("a message");
                assert_eq!(m.len(), (2 << 20) + 7);
                assert!(m.iter().all(|&x| x == i));
                got.push(m.to_vec());
            }
            for m in got {
                back.send(m).expect("send back");
            }
            let a = far.join().expect("far side");
            drop((a, b));
        },
    );
}

#[test]
fn wss_refuses_an_unknown_server() {
    guarded("ws_wire::wss_refuses_an_unknown_server", || {
        let ca = TestCa::new("test CA");
        let (cert, key) = ca.issue("server", &["127.0.0.1"]);
        let server_opts = libchan::Options::new()
            .tls_identity_pem(cert.as_bytes(), key.as_bytes())
            .expect("server options");
        let other = TestCa::new("another CA");
        let client_opts = libchan::Options::new()
            .tls_ca_pem(other.pem.as_bytes())
            .expect("client options");
        let listener = libchan::listen_with(&format!("wss://127.0.0.1:0{PATH}"), &server_opts)
            .expect("listen");
        let addr = listener.local_addr().expect("local_addr");
        let client = thread::spawn(move || libchan::connect_with(&addr, &client_opts));
        let server = listener.accept().expect_err("the client walks away");
        let client = client
            .join()
            .expect("client thread")
            .expect_err("unknown issuer");
        assert!(
            matches!(&client, Error::Handshake(m) if m.contains("certificate")),
            "client side: {client}"
        );
        assert!(
            matches!(server, Error::Handshake(_)),
            "server side: {server}"
        );
    });
}

#[test]
fn dropped_session_ends_with_goaway_then_close_frame() {
    guarded(
        "ws_wire::dropped_session_ends_with_goaway_then_close_frame",
        || {
            let (mut raw, session) = raw_session();
            drop(session);
            let goaway = crate::wire::read_goaway(&mut raw);
            assert!(goaway.is_some(), "no GOAWAY before the end");
            loop {
                match raw.next_message() {
                    Ok(Message::Close(_)) => break,
                    Ok(Message::Binary(_)) => {}
                    other => panic!("expected a close frame after GOAWAY, got {other:?}"),
                }
            }
            // Then the connection ends (the libchan side waited for our close, sent back by
            // tungstenite when it read the frame, or its FIN).
            assert!(matches!(
                raw.next_message(),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)
            ));
        },
    );
}
