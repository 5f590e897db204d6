//! `ws://` and `wss://` links: libchan's byte stream carried in WebSocket binary messages
//! (tungstenite), so that sessions pass through ordinary HTTP infrastructure (reverse proxies,
//! load balancers). `wss://` runs the same WebSocket over the rustls stream of the `tls`
//! module (its certificates and client authentication, and the peer identity it reports).
//!
//! The HTTP upgrade runs inside [`connect`] and [`accept`], after TLS for `wss://` and before
//! the libchan hello, all under the handshake deadline. The client asks for the listener's path
//! with the `libchan` subprotocol; the server answers 404 to another path and 400 to a request
//! that does not offer the subprotocol, and both sides' errors say why. After the upgrade the
//! socket is non-blocking and the session engine drives the [`WsLink`].
//!
//! Framing (docs/ARCHITECTURE.md, "WebSocket: the byte stream in binary messages", and
//! docs/PROTOCOL.md section 2.5): libchan frames are a byte stream, and WebSocket message
//! boundaries carry no meaning. Every [`Link::send`] writes (up to [`CHUNK`] bytes of) its
//! buffers as one binary message; [`Link::recv`] hands out the payloads of received binary
//! messages as one continuous stream. A text message, or any WebSocket protocol violation, is
//! an error that ends the session; a close frame is the end of the stream; pings are answered
//! with pongs that the link flushes like its other output. A link that ends (cut or dropped)
//! sends a close frame if the socket takes it.
//!
//! Invariants:
//! - The tungstenite `WebSocket` sits behind one mutex, used by the engine's reader and writer
//!   threads alike; every call under it is non-blocking, so the lock is never held across a
//!   wait.
//! - Output is bounded: `send` takes a new message only once everything written before has
//!   reached the socket, so a peer that stops reading holds at most one message (plus a pong
//!   and a close frame) in this process.
//! - `recv` reports `WouldBlock` only when the socket itself had nothing to read: the rest of
//!   the current message, every complete frame in tungstenite's read buffer and (for `wss://`)
//!   every byte rustls has decrypted come first.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::handshake::{HandshakeError, HandshakeRole};
use tungstenite::http::{header, HeaderValue, StatusCode};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Bytes, Message, WebSocket};

use crate::error::Error;
use crate::proto::frame::HEADER_LEN;
use crate::sys;

use super::link::Link;
use super::tls::{self, TlsStream};
use super::{closer, net, Options, Transport};

/// The WebSocket subprotocol a libchan client asks for and a libchan server requires.
pub(super) const SUBPROTOCOL: &str = "libchan";

/// The largest binary message `send` writes: a libchan frame larger than this spans several
/// messages. It bounds the output one session buffers when its peer stops reading.
const CHUNK: usize = 64 << 10;

/// How much tungstenite reads from the socket at a time.
const READ_BUFFER: usize = 64 << 10;

/// The longest the upgrade sleeps between attempts to make progress: the handshake machine
/// does not say whether it waits to read or to write, so it waits for input and retries a
/// write at this pace (writes of a few hundred bytes on a fresh connection do not block).
const HANDSHAKE_SLICE: Duration = Duration::from_millis(10);

/// Runs the client side of the WebSocket upgrade for `path` on `hostport`.
pub(super) fn connect(
    hostport: &str,
    path: &str,
    secure: bool,
    opts: &Options,
    timeout: Duration,
) -> Result<Box<dyn Link>, Error> {
    let deadline = Instant::now() + timeout;
    let scheme = if secure { "wss" } else { "ws" };
    let url = format!("{scheme}://{hostport}{path}");
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| Error::Address(format!("{url:?}: {e}")))?;
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let tcp = net::connect_tcp(hostport, timeout)?;
    let (io, stream) = open_stream(tcp, secure, Some(hostport), opts, deadline)?;
    let started = tungstenite::client::client_with_config(request, stream, Some(config(opts)));
    let (ws, _response) = finish(started, io.fd(), deadline).map_err(|e| {
        let refused = format!("{url}: the server refused the WebSocket upgrade:");
        upgrade_error(&url, &refused, e)
    })?;
    Ok(Box::new(WsLink::new(io, ws)))
}

/// Runs the server side of the WebSocket upgrade on an accepted connection: the request must
/// be for `path` (a 404 otherwise) and offer the `libchan` subprotocol (a 400 otherwise).
pub(super) fn accept(
    stream: TcpStream,
    path: &str,
    secure: bool,
    opts: &Options,
    timeout: Duration,
) -> Result<Box<dyn Link>, Error> {
    let deadline = Instant::now() + timeout;
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "a client".to_string(), |a| a.to_string());
    let (io, stream) = open_stream(stream, secure, None, opts, deadline)?;
    let serves = path.split('?').next().unwrap_or(path).to_string();
    // The shape is tungstenite's `Callback`: its error is the HTTP answer, by value.
    #[allow(clippy::result_large_err)]
    let check = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != serves {
            return Err(refusal(
                StatusCode::NOT_FOUND,
                format!(
                    "no libchan endpoint at {:?}: this listener serves {serves:?}",
                    req.uri().path()
                ),
            ));
        }
        if !offers_subprotocol(req) {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "a libchan endpoint: the client must offer the {SUBPROTOCOL:?} subprotocol"
                ),
            ));
        }
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        Ok(resp)
    };
    let started = tungstenite::accept_hdr_with_config(stream, check, Some(config(opts)));
    let ws = finish(started, io.fd(), deadline).map_err(|e| {
        let refused = format!("WebSocket upgrade from {peer} refused with");
        upgrade_error(&peer, &refused, e)
    })?;
    Ok(Box::new(WsLink::new(io, ws)))
}

/// A session link over a WebSocket connection whose upgrade is done.
pub(super) struct WsLink {
    /// The connection under the WebSocket (shared with it), to wait on and to cut.
    io: Io,
    /// Shared with the closer thread once the link is dropped (see [`WsLink::drop`]).
    state: Arc<Mutex<State>>,
}

struct State {
    ws: WebSocket<Stream>,
    /// The part of the last binary message not handed out yet.
    input: Bytes,
    /// `ws.flush` could not write everything yet (a message, a pong or a close frame).
    pending: bool,
    /// The peer closed the WebSocket (or the connection): `recv` reports the end of stream.
    eof: bool,
}

impl WsLink {
    fn new(io: Io, ws: WebSocket<Stream>) -> Self {
        Self {
            io,
            state: Arc::new(Mutex::new(State {
                ws,
                input: Bytes::new(),
                pending: false,
                eof: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Ends the WebSocket before its connection: a close frame, as far as the socket takes it
    /// now (proxies and other WebSocket peers see an orderly end), and nothing more to read.
    fn end_messages(&self) {
        let mut st = self.lock();
        if !st.eof {
            let _ = st.ws.close(None);
        }
        st.eof = true;
        st.pending = false;
    }
}

impl State {
    /// Writes what tungstenite holds (messages, a pong, a close frame) as far as the socket
    /// takes it now, and remembers whether some is left.
    fn flush(&mut self) -> io::Result<()> {
        match self.ws.flush() {
            Ok(()) => {
                self.pending = false;
                Ok(())
            }
            Err(e) => {
                let e = write_error(e);
                self.pending = e.kind() == io::ErrorKind::WouldBlock;
                Err(e)
            }
        }
    }
}

impl Link for WsLink {
    fn fd(&self) -> BorrowedFd<'_> {
        self.io.fd()
    }

    fn send(&self, bufs: &[IoSlice<'_>], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        if !fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors on a WebSocket link",
            ));
        }
        let mut st = self.lock();
        // Take a new message only once the last one is out: this bounds what a peer that stops
        // reading makes us hold.
        st.flush()?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut payload = Vec::with_capacity(total.min(CHUNK));
        for b in bufs {
            let take = b.len().min(CHUNK - payload.len());
            payload.extend_from_slice(&b[..take]);
            if payload.len() == CHUNK {
                break;
            }
        }
        if payload.is_empty() {
            return Ok(0);
        }
        let n = payload.len();
        match st.ws.write(Message::Binary(payload.into())) {
            Ok(()) => {}
            // The frame is in tungstenite's buffer; the socket took part of it or none.
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(write_error(e)),
        }
        match st.flush() {
            Ok(()) => Ok(n),
            // Accepted: `output_pending` tells the engine to flush the rest.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(e),
        }
    }

    fn recv(&self, buf: &mut [u8], _fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.lock();
        loop {
            if !st.input.is_empty() {
                let n = buf.len().min(st.input.len());
                buf[..n].copy_from_slice(&st.input[..n]);
                st.input = st.input.slice(n..);
                return Ok(n);
            }
            if st.eof {
                return Ok(0);
            }
            match st.ws.read() {
                Ok(Message::Binary(data)) => st.input = data,
                Ok(Message::Ping(_)) => {
                    // tungstenite queued the pong; write it now if the socket takes it, or
                    // leave it to the engine's flush (`output_pending`).
                    match st.flush() {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Close(_)) => {
                    // Answer the close frame (best effort) and end the stream.
                    st.eof = true;
                    let _ = st.flush();
                    return Ok(0);
                }
                Ok(Message::Text(_)) | Err(tungstenite::Error::Utf8(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket text message: libchan sessions carry binary messages only",
                    ));
                }
                Err(
                    tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::AlreadyClosed
                    | tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ),
                ) => {
                    // The connection ended, with or without a close frame: for libchan, the
                    // end of the stream (the engine tells a clean end from a cut frame).
                    st.eof = true;
                    return Ok(0);
                }
                Err(tungstenite::Error::Io(e)) => return Err(e),
                Err(tungstenite::Error::Capacity(e)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("WebSocket message exceeds the limit: {e}"),
                    ));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("WebSocket protocol violation: {e}"),
                    ));
                }
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.lock().flush()
    }

    fn output_pending(&self) -> bool {
        let pending = self.lock().pending;
        // TLS may also owe the peer records of its own (a key update) after a read.
        pending
            || match &self.io {
                Io::Plain(_) => false,
                Io::Tls(tls) => tls.output_pending(),
            }
    }

    fn transport(&self) -> Transport {
        Transport::Ws
    }

    fn peer_identity(&self) -> Option<String> {
        match &self.io {
            Io::Plain(_) => None,
            Io::Tls(tls) => tls.peer_identity(),
        }
    }

    fn cut(&self) {
        self.end_messages();
        match &self.io {
            Io::Plain(sock) => sys::cut(sock),
            Io::Tls(tls) => tls.cut(),
        }
    }

    fn cut_after_goaway(&self) {
        self.end_messages();
        match &self.io {
            Io::Plain(sock) => super::link::linger_and_cut(sock),
            Io::Tls(tls) => tls.cut(),
        }
    }
}

/// The connection under a WebSocket, as the link sees it (the WebSocket's [`Stream`] holds
/// another reference to the same connection).
#[derive(Clone)]
enum Io {
    /// `ws://`: the TCP socket.
    Plain(Arc<OwnedFd>),
    /// `wss://`: TLS over the TCP socket.
    Tls(Arc<TlsStream>),
}

impl Io {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Io::Plain(sock) => sock.as_fd(),
            Io::Tls(tls) => tls.fd(),
        }
    }
}

impl Drop for WsLink {
    /// The session ended in order (nothing uses it any more; its GOAWAY is written): a close
    /// frame, then the connection closes once the peer has closed its side, from the closer
    /// thread. Closing at once could reset the connection (the kernel answers the peer's
    /// late bytes with a reset), and a proxy in between drops what it had not yet passed on
    /// when it sees a reset: the peer would lose the end of the session. For the same reason
    /// the FIN waits for the peer's answer to the close frame (see [`Closing`]).
    fn drop(&mut self) {
        let mut st = self.lock();
        if st.eof {
            // Cut, or the peer closed first: nothing is left to wait for.
            return;
        }
        st.eof = true;
        let _ = st.ws.close(None);
        drop(st);
        closer::close_later(Box::new(Closing {
            io: self.io.clone(),
            state: self.state.clone(),
            until: Instant::now() + closer::CLOSE_LINGER,
            answered: false,
            fin: false,
        }));
    }
}

/// A dropped link waiting for its peer to close: its remaining output (the close frame) is
/// pushed out, and its input is read and discarded until the peer closes or `until` passes.
/// On `ws://` a FIN follows once the peer has answered the close frame, not before: a
/// reverse proxy (nginx) that sees one side half-close ends the tunnel at once, closing its
/// connection to the peer with whatever the peer sent last (CREDIT frames) unread, so the
/// kernel resets that connection and drops what the proxy had queued for the peer, the end
/// of the session included. The peer answers only after reading everything sent before the
/// close frame, so after its answer there is nothing left to lose.
struct Closing {
    io: Io,
    state: Arc<Mutex<State>>,
    until: Instant,
    /// The peer's close frame arrived: it has read all that this side sent.
    answered: bool,
    /// The FIN (`ws://`) is sent, or not needed (`wss://`: TLS sends its close_notify when the
    /// stream drops).
    fin: bool,
}

impl closer::Closing for Closing {
    fn step(&mut self) -> bool {
        let mut st = lock(&self.state);
        let flushed = !matches!(
            st.ws.flush(),
            Err(tungstenite::Error::Io(ref e)) if e.kind() == io::ErrorKind::WouldBlock
        );
        loop {
            match st.ws.read() {
                Ok(Message::Close(_)) => self.answered = true,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The peer closed (or broke) the connection: done.
                Err(_) => return true,
            }
        }
        if flushed && self.answered && !self.fin {
            self.fin = true;
            if let Io::Plain(sock) = &self.io {
                let _ = rustix::net::shutdown(&**sock, rustix::net::Shutdown::Write);
            }
        }
        Instant::now() >= self.until
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under the lock leaves the WebSocket as consistent as any I/O error would.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The byte stream under the WebSocket.
enum Stream {
    /// Plain TCP (`ws://`): the link's socket itself.
    Plain(Arc<OwnedFd>),
    /// TLS (`wss://`): the link's TLS connection, which passes `WouldBlock` through.
    Tls(Arc<TlsStream>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(fd) => {
                let flags = rustix::net::RecvFlags::DONTWAIT;
                Ok(rustix::net::recv(&**fd, buf, flags)?.0)
            }
            Stream::Tls(tls) => tls.read_plain(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(fd) => sys::send_with_fds(fd.as_fd(), &[IoSlice::new(buf)], &[]),
            Stream::Tls(tls) => tls.write_plain(&[IoSlice::new(buf)]),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(tls) => tls.flush_tls(),
        }
    }
}

/// Prepares a connected TCP stream (non-blocking, no Nagle delay) and, for `wss://`, runs the
/// TLS handshake on it (as client when `server` names the server, `HOST:PORT`, whose
/// certificate to check): returns the connection for the link and the stream for the
/// WebSocket.
fn open_stream(
    tcp: TcpStream,
    secure: bool,
    server: Option<&str>,
    opts: &Options,
    deadline: Instant,
) -> Result<(Io, Stream), Error> {
    if secure {
        let left = deadline.saturating_duration_since(Instant::now());
        let tls = match server {
            Some(server) => tls::client_stream(tcp, server, opts, left)?,
            None => tls::server_stream(tcp, opts, left)?,
        };
        let tls = Arc::new(tls);
        return Ok((Io::Tls(tls.clone()), Stream::Tls(tls)));
    }
    net::prepare(&tcp)?;
    let sock = Arc::new(OwnedFd::from(tcp));
    Ok((Io::Plain(sock.clone()), Stream::Plain(sock)))
}

/// The WebSocket settings of a libchan session: no incoming message or frame larger than the
/// largest libchan frame this side accepts (the negotiated `max_frame` is never larger), and a
/// write buffer that holds one outgoing message and the control frames that may queue behind
/// it.
fn config(opts: &Options) -> WebSocketConfig {
    let largest = opts.limits().max_frame as usize + HEADER_LEN;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * CHUNK)
        .max_message_size(Some(largest))
        .max_frame_size(Some(largest))
}

/// Drives a non-blocking upgrade to its end, waiting on `sock` until `deadline`.
fn finish<R: HandshakeRole>(
    mut attempt: Result<R::FinalResult, HandshakeError<R>>,
    sock: BorrowedFd<'_>,
    deadline: Instant,
) -> Result<R::FinalResult, tungstenite::Error> {
    loop {
        match attempt {
            Ok(done) => return Ok(done),
            Err(HandshakeError::Failure(e)) => return Err(e),
            Err(HandshakeError::Interrupted(mid)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(tungstenite::Error::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the WebSocket upgrade did not complete in time",
                    )));
                }
                sys::poll(sock, true, false, Some(left.min(HANDSHAKE_SLICE)))
                    .map_err(tungstenite::Error::Io)?;
                attempt = mid.handshake();
            }
        }
    }
}

/// A failed upgrade as a session error: an HTTP refusal says `refused`, then the status and
/// the first line of the answer's body; other errors name `who`, the other end.
fn upgrade_error(who: &str, refused: &str, e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Http(resp) => Error::Handshake(format!(
            "{refused} {}{}",
            resp.status(),
            body_text(resp.body().as_deref())
        )),
        tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
            Error::Handshake(format!("{who}: {e}"))
        }
        tungstenite::Error::Io(e) => Error::Io(e),
        e => Error::Handshake(format!("{who}: WebSocket upgrade failed: {e}")),
    }
}

/// Whether the upgrade request offers the libchan subprotocol.
fn offers_subprotocol(req: &Request) -> bool {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

/// The HTTP answer that refuses an upgrade, saying why in its body.
fn refusal(status: StatusCode, why: String) -> ErrorResponse {
    let body = format!("{why}\n");
    let mut resp = ErrorResponse::new(None);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    *resp.body_mut() = Some(body);
    resp
}

/// ": <first line of the body>" for an error message, or nothing.
fn body_text(body: Option<&[u8]>) -> String {
    let text = String::from_utf8_lossy(body.unwrap_or_default());
    match text.lines().next().map(str::trim) {
        Some(line) if !line.is_empty() => {
            format!(": {}", line.chars().take(200).collect::<String>())
        }
        _ => String::new(),
    }
}

/// A tungstenite write or flush error as the `io::Error` the engine expects: `WouldBlock`
/// passes through, a closed WebSocket is `BrokenPipe`.
fn write_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        // Not expected (`send` flushes before it writes), but it means "not now".
        tungstenite::Error::WriteBufferFull(_) => io::ErrorKind::WouldBlock.into(),
        tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed
        | tungstenite::Error::Protocol(tungstenite::error::ProtocolError::SendAfterClosing) => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed")
        }
        e => io::Error::other(format!("WebSocket: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use closer::Closing as _;
    use std::net::TcpListener;
    use tungstenite::protocol::Role;

    /// A lingering close on `ws://` over a loopback connection, stepped by hand (no closer
    /// thread), and the blocking WebSocket server at the other end.
    fn closing_pair() -> (Closing, WebSocket<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (theirs, _) = listener.accept().expect("accept");
        ours.set_nonblocking(true).expect("non-blocking");
        let sock = Arc::new(OwnedFd::from(ours));
        let ws = WebSocket::from_raw_socket(Stream::Plain(sock.clone()), Role::Client, None);
        let mut st = State {
            ws,
            input: Bytes::new(),
            pending: false,
            eof: false,
        };
        // What `WsLink::drop` does: the last data, then the close frame.
        st.ws
            .write(Message::Binary(Bytes::from_static(
                b"the end of the session",
            )))
            .expect("write");
        let _ = st.ws.close(None);
        let closing = Closing {
            io: Io::Plain(sock),
            state: Arc::new(Mutex::new(st)),
            // Far off: only the peer decides when this ends.
            until: Instant::now() + Duration::from_secs(3600),
            answered: false,
            fin: false,
        };
        let peek = theirs.try_clone().expect("clone");
        let peer = WebSocket::from_raw_socket(theirs, Role::Server, None);
        (closing, peer, peek)
    }

    /// Whether the connection's end (a FIN) reached `sock` within `wait`.
    fn ended_within(sock: &TcpStream, wait: Duration) -> bool {
        sock.set_read_timeout(Some(wait)).expect("timeout");
        let mut b = [0u8; 1];
        match sock.peek(&mut b) {
            Ok(0) => true,
            Ok(_) => panic!("unread bytes at the peer"),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(e) => panic!("peek: {e}"),
        }
    }

    #[test]
    fn fin_waits_for_the_peers_close_frame() {
        let (mut closing, mut peer, peek) = closing_pair();
        assert!(!closing.step(), "the peer has not closed");
        match peer.read().expect("data") {
            Message::Binary(b) => assert_eq!(&b[..], b"the end of the session"),
            other => panic!("expected the data, got {other:?}"),
        }
        assert!(matches!(peer.read(), Ok(Message::Close(None))));
        // The peer has not answered yet (tungstenite sends its answer on the next call): no
        // FIN may come, or a proxy in between would end the tunnel now.
        assert!(!closing.step(), "the peer has not closed");
        assert!(
            !ended_within(&peek, Duration::from_millis(200)),
            "FIN before the peer answered the close frame"
        );
        // The answer; then the FIN follows.
        match peer.flush() {
            // tungstenite's server sends the answer and reports the WebSocket closed.
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => {}
            Err(e) => panic!("answer the close frame: {e}"),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(!closing.step(), "the peer has not closed");
            if ended_within(&peek, Duration::from_millis(10)) {
                break;
            }
            assert!(Instant::now() < deadline, "no FIN after the answer");
        }
        // The peer closes its side: done.
        drop((peer, peek));
        loop {
            if closing.step() {
                break;
            }
            assert!(Instant::now() < deadline, "the close did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
