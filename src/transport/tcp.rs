//! `tcp://` sessions, and their transparent upgrade to a unix socket (and so to shared memory)
//! when both ends share a host and a network namespace.
//!
//! The upgrade (docs/PROTOCOL.md section 2.4, docs/ARCHITECTURE.md 2.29): a connector that
//! allows shared memory starts the TCP connection with an 8-byte *request* instead of its
//! hello. The acceptor answers with an *offer*: the name of a unix socket in the abstract
//! namespace, bound for this one connection, and a random one-time token. The connector
//! connects to that name, presents the token, and runs the ordinary unix handshake there (which
//! goes on to shared memory between same-uid peers); it then closes the TCP connection, which
//! commits the move. If it cannot reach the name (another network namespace: abstract sockets
//! belong to one, which is exactly the boundary of "same host"), it sends its hello on TCP and
//! the session stays there. A connector that sends its hello first gets the plain protocol, so
//! peers that know nothing of the upgrade are served as before.
//!
//! Invariants:
//! - The offer's socket accepts one valid token, once: it is closed as soon as a connection
//!   presents the token, as soon as the connector sends its hello on TCP, and when the token
//!   expires ([`TOKEN_TTL`]). Connections with another token are closed and do not count;
//!   connections are read side by side (up to [`MAX_CANDIDATES`]), so one that says nothing
//!   does not hold up the client.
//! - Tokens are compared in constant time and come from the kernel's CSPRNG (`/dev/urandom`).
//! - The connector decides: the acceptor returns the unix session only once the connector has
//!   closed TCP, and falls back to TCP whenever the connector's hello arrives there instead.
//! - A connector only ever connects to names of the form libchan makes (`libchan-` and 24 hex
//!   digits), so a hostile server cannot point it at another local abstract socket.
//! - The listener never runs a handshake itself (`net::Server`): each runs on a thread of its
//!   own, so one slow or silent client holds up nobody.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::error::Error;
use crate::sys;

use super::conn::Conn;
use super::{net, Options, Role, Session, HANDSHAKE_TIMEOUT};

/// The connector's upgrade request: `"LCHU"`, u16 version 1, u16 reserved (0).
const REQUEST_LEN: usize = 8;
const REQUEST_MAGIC: [u8; 4] = *b"LCHU";
/// The acceptor's reply: `"LCHO"`, u16 version, u8 status, u8 reserved, token, name.
const REPLY_LEN: usize = 56;
const REPLY_MAGIC: [u8; 4] = *b"LCHO";
/// What the connector presents on the offered socket: `"LCHT"`, 4 reserved bytes, token.
const PRESENT_LEN: usize = 24;
const PRESENT_MAGIC: [u8; 4] = *b"LCHT";
/// The magic of a hello (PROTOCOL.md section 3): a server that knows no upgrade sends it.
const HELLO_MAGIC: [u8; 4] = *b"LCHN";
const VERSION: u16 = 1;
const TOKEN_LEN: usize = 16;
/// An abstract socket name: `libchan-` and 24 lowercase hex digits.
const NAME_LEN: usize = 32;
const NAME_PREFIX: &[u8] = b"libchan-";

/// How long an offered token (and its socket) lives.
const TOKEN_TTL: Duration = Duration::from_secs(5);

/// Connects to a `tcp://` listener, moving to a unix socket when the server offers one this
/// process can reach.
pub(super) fn connect(hostport: &str, opts: &Options) -> Result<Session, Error> {
    let mut stream = net::connect_tcp(hostport, HANDSHAKE_TIMEOUT)?;
    if !opts.shm {
        return Session::over(net::tcp_link(stream)?, Role::Connector, opts);
    }
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // The request and the token are small writes that must leave at once.
    stream.set_nodelay(true)?;
    write_full(&mut stream, &encode_request(), deadline)?;
    let mut reply = [0u8; REPLY_LEN];
    read_full(&mut stream, &mut reply[..4], deadline)?;
    if reply[..4] == HELLO_MAGIC {
        // A server that knows no upgrade sent its hello at once, and refuses our request as a
        // bad hello: connect again and speak the plain protocol.
        drop(stream);
        let stream = net::connect_tcp(hostport, HANDSHAKE_TIMEOUT)?;
        return Session::over(net::tcp_link(stream)?, Role::Connector, opts);
    }
    read_full(&mut stream, &mut reply[4..], deadline)?;
    match decode_reply(&reply) {
        Ok(Reply::Declined) => {}
        Ok(Reply::Offer { token, name }) => match upgrade(&name, &token, opts, deadline) {
            Ok(session) => {
                // Closing TCP tells the server that we moved.
                drop(stream);
                return Ok(session);
            }
            Err(e) => log::debug!("libchan: tcp://{hostport}: staying on TCP: {e}"),
        },
        Err(why) => return Err(Error::Handshake(format!("bad upgrade reply: {why}"))),
    }
    // Our hello on TCP tells the server that we stay.
    Session::over(net::tcp_link(stream)?, Role::Connector, opts)
}

/// The connector's side of the move: reach the offered socket, present the token, handshake.
fn upgrade(
    name: &[u8; NAME_LEN],
    token: &[u8; TOKEN_LEN],
    opts: &Options,
    deadline: Instant,
) -> Result<Session, Error> {
    let until = deadline.min(Instant::now() + TOKEN_TTL);
    // In another network namespace the name does not exist: the connect is refused.
    let mut unix = UnixStream::connect_addr(&SocketAddr::from_abstract_name(name)?)?;
    write_full(&mut unix, &encode_present(token), until)?;
    let conn = Conn::establish(unix, true, opts.limits(), opts.trust, left(until)?)?;
    Ok(Session { conn })
}

/// The acceptor's side of a new TCP connection: the plain handshake, or the upgrade exchange
/// when the connector asks for it.
pub(super) fn accept(mut stream: TcpStream, opts: &Options) -> Result<Session, Error> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // Accepted from a non-blocking listener; the exchange below uses blocking reads with
    // deadlines, and `tcp_link` makes the stream non-blocking for the session.
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    if !upgrade_requested(&stream, deadline)? {
        return Session::over(net::tcp_link(stream)?, Role::Acceptor, opts);
    }
    let mut request = [0u8; REQUEST_LEN];
    read_full(&mut stream, &mut request, deadline)?;
    let offer = if decode_request(&request) && opts.shm {
        Offer::new()
            .map_err(|e| log::debug!("libchan: no upgrade offered: {e}"))
            .ok()
    } else {
        None
    };
    let Some(offer) = offer else {
        write_full(&mut stream, &encode_reply(&Reply::Declined), deadline)?;
        return Session::over(net::tcp_link(stream)?, Role::Acceptor, opts);
    };
    let reply = Reply::Offer {
        token: offer.token,
        name: offer.name,
    };
    write_full(&mut stream, &encode_reply(&reply), deadline)?;
    offer.wait(stream, opts, deadline)
}

/// Peeks at the connector's first four bytes: an upgrade request, or (anything else) the
/// plain protocol, which the session handshake then reads and checks.
fn upgrade_requested(stream: &TcpStream, deadline: Instant) -> Result<bool, Error> {
    let mut first = [0u8; 4];
    loop {
        stream.set_read_timeout(Some(left(deadline)?))?;
        match stream.peek(&mut first) {
            Ok(0) => return Err(Error::Handshake("peer closed during the handshake".into())),
            Ok(n) if first[..n] != REQUEST_MAGIC[..n] => return Ok(false),
            Ok(n) if n == first.len() => return Ok(true),
            // Part of the magic so far: look again once more has come.
            Ok(_) => thread::sleep(Duration::from_millis(2)),
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// An offered move: the socket bound for one connection and the token it waits for.
struct Offer {
    listener: UnixListener,
    token: [u8; TOKEN_LEN],
    name: [u8; NAME_LEN],
    expires: Instant,
}

impl Offer {
    fn new() -> io::Result<Self> {
        let random: [u8; TOKEN_LEN + 12] = random()?;
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&random[..TOKEN_LEN]);
        let name = name_from(&random[TOKEN_LEN..]);
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            token,
            name,
            expires: Instant::now() + TOKEN_TTL,
        })
    }

    /// Waits for the connector to come on the offered socket with the token, or to send its
    /// hello on TCP, and returns the session on whichever it chose.
    fn wait(self, tcp: TcpStream, opts: &Options, deadline: Instant) -> Result<Session, Error> {
        let until = self.expires.min(deadline);
        let listener = self.listener;
        // Connections to the offered socket that have not presented a whole token yet. They
        // are read side by side, so a stranger that connects and says nothing delays nobody.
        let mut candidates: Vec<Candidate> = Vec::new();
        // The connector closed TCP: it committed to the unix socket.
        let mut tcp_closed = false;
        let unix = loop {
            let Ok(wait) = left(until) else {
                // Expired: the name goes away with the listener.
                drop((listener, candidates));
                if tcp_closed {
                    return Err(Error::Handshake(
                        "the client left TCP but did not present its token".into(),
                    ));
                }
                return Session::over(net::tcp_link(tcp)?, Role::Acceptor, opts);
            };
            // The listener, the candidates, then TCP while it is open (a closed one would
            // report its end again and again).
            let mut fds = Vec::with_capacity(2 + candidates.len());
            fds.push(PollFd::new(&listener, PollFlags::IN));
            fds.extend(
                candidates
                    .iter()
                    .map(|c| PollFd::new(&c.stream, PollFlags::IN)),
            );
            if !tcp_closed {
                fds.push(PollFd::new(&tcp, PollFlags::IN));
            }
            poll_all(&mut fds, wait)?;
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            if !tcp_closed && ready[1 + candidates.len()] {
                if tcp_has_data(&tcp) {
                    // The connector's hello: it stays on TCP. The token dies with the socket.
                    drop((listener, candidates));
                    return Session::over(net::tcp_link(tcp)?, Role::Acceptor, opts);
                }
                tcp_closed = true;
            }
            let mut chosen = None;
            // Backwards, so that removing one leaves the indices still to visit in place.
            for i in (0..candidates.len()).rev() {
                if !ready[1 + i] {
                    continue;
                }
                match candidates[i].read(&self.token) {
                    Presented::Not => {}
                    Presented::Refused => drop(candidates.remove(i)),
                    Presented::Token => {
                        chosen = Some(candidates.remove(i).stream);
                        break;
                    }
                }
            }
            if let Some(unix) = chosen {
                break unix;
            }
            if ready[0] {
                accept_candidates(&listener, &mut candidates)?;
            }
        };
        // One valid token, once: nobody else may connect to the name from now on.
        drop((listener, candidates));
        let session = Conn::establish(unix, false, opts.limits(), opts.trust, left(deadline)?)
            .map(|conn| Session { conn });
        if tcp_closed {
            return session;
        }
        // The connector closes TCP once its unix handshake is done, or sends its hello on TCP
        // if it gave up on the unix socket (its handshake failed or timed out).
        let r = sys::poll(&tcp, true, false, Some(left(deadline)?))?;
        if !r.readable {
            return Err(Error::Handshake(
                "the client neither closed TCP nor sent its hello after the upgrade".into(),
            ));
        }
        if tcp_has_data(&tcp) {
            drop(session);
            return Session::over(net::tcp_link(tcp)?, Role::Acceptor, opts);
        }
        session
    }
}

/// Connections to an offered socket read side by side at most; past that the oldest is
/// dropped (a client presents its token as soon as it connects, so a crowd of silent
/// strangers cannot push it out).
const MAX_CANDIDATES: usize = 16;

/// A connection to an offered socket, and what it presented so far.
struct Candidate {
    stream: UnixStream,
    got: [u8; PRESENT_LEN],
    len: usize,
}

/// What a candidate presented.
enum Presented {
    /// Not a whole presentation yet.
    Not,
    /// Something other than the token, or the connection ended.
    Refused,
    /// The token.
    Token,
}

impl Candidate {
    /// Reads what has arrived (the stream is non-blocking) and judges it once it is whole.
    fn read(&mut self, token: &[u8; TOKEN_LEN]) -> Presented {
        loop {
            match self.stream.read(&mut self.got[self.len..]) {
                Ok(0) => return Presented::Refused,
                Ok(n) => self.len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Presented::Not,
                Err(_) => return Presented::Refused,
            }
            if self.len == PRESENT_LEN {
                return match decode_present(&self.got) {
                    Some(t) if same_token(&t, token) => Presented::Token,
                    _ => {
                        log::debug!("libchan: refused a connection to an upgrade socket");
                        Presented::Refused
                    }
                };
            }
        }
    }
}

/// Takes the connections waiting on an offered socket.
fn accept_candidates(listener: &UnixListener, into: &mut Vec<Candidate>) -> Result<(), Error> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                if into.len() == MAX_CANDIDATES {
                    into.remove(0);
                }
                into.push(Candidate {
                    stream,
                    got: [0; PRESENT_LEN],
                    len: 0,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until one of `fds` is ready or `timeout` passes.
fn poll_all(fds: &mut [PollFd<'_>], timeout: Duration) -> Result<(), Error> {
    let ts = Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether a readable TCP stream holds data (rather than the end of the stream, or an error).
fn tcp_has_data(tcp: &TcpStream) -> bool {
    let mut one = [0u8; 1];
    matches!(tcp.peek(&mut one), Ok(n) if n > 0)
}

/// The acceptor's answer to an upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// No upgrade: the connector sends its hello on TCP.
    Declined,
    /// Connect to the abstract socket `name` and present `token`.
    Offer {
        token: [u8; TOKEN_LEN],
        name: [u8; NAME_LEN],
    },
}

fn encode_request() -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b
}

/// Whether `b` is a request this side can offer an upgrade for (version 1, reserved 0).
fn decode_request(b: &[u8; REQUEST_LEN]) -> bool {
    b[..4] == REQUEST_MAGIC && b[4..6] == VERSION.to_le_bytes() && b[6..8] == [0, 0]
}

fn encode_reply(reply: &Reply) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[..4].copy_from_slice(&REPLY_MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    if let Reply::Offer { token, name } = reply {
        b[6] = 1;
        b[8..24].copy_from_slice(token);
        b[24..56].copy_from_slice(name);
    }
    b
}

fn decode_reply(b: &[u8; REPLY_LEN]) -> Result<Reply, &'static str> {
    if b[..4] != REPLY_MAGIC {
        return Err("bad magic");
    }
    if b[4..6] != VERSION.to_le_bytes() {
        return Err("unknown version");
    }
    if b[7] != 0 {
        return Err("reserved byte is not 0");
    }
    match b[6] {
        0 if b[8..].iter().all(|&x| x == 0) => Ok(Reply::Declined),
        0 => Err("declined with a token or a name"),
        1 => {
            let mut token = [0u8; TOKEN_LEN];
            token.copy_from_slice(&b[8..24]);
            let mut name = [0u8; NAME_LEN];
            name.copy_from_slice(&b[24..56]);
            if !is_libchan_name(&name) {
                return Err("the socket name is not one libchan makes");
            }
            Ok(Reply::Offer { token, name })
        }
        _ => Err("unknown status"),
    }
}

fn encode_present(token: &[u8; TOKEN_LEN]) -> [u8; PRESENT_LEN] {
    let mut b = [0u8; PRESENT_LEN];
    b[..4].copy_from_slice(&PRESENT_MAGIC);
    b[8..].copy_from_slice(token);
    b
}

fn decode_present(b: &[u8; PRESENT_LEN]) -> Option<[u8; TOKEN_LEN]> {
    if b[..4] != PRESENT_MAGIC || b[4..8] != [0; 4] {
        return None;
    }
    let mut token = [0u8; TOKEN_LEN];
    token.copy_from_slice(&b[8..]);
    Some(token)
}

/// Compares two tokens in time independent of where they differ.
fn same_token(a: &[u8; TOKEN_LEN], b: &[u8; TOKEN_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    // Keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// `libchan-` and the hex digits of 12 random bytes.
fn name_from(random: &[u8]) -> [u8; NAME_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = [0u8; NAME_LEN];
    name[..NAME_PREFIX.len()].copy_from_slice(NAME_PREFIX);
    for (i, byte) in random.iter().take(12).enumerate() {
        name[NAME_PREFIX.len() + 2 * i] = HEX[usize::from(byte >> 4)];
        name[NAME_PREFIX.len() + 2 * i + 1] = HEX[usize::from(byte & 15)];
    }
    name
}

fn is_libchan_name(name: &[u8; NAME_LEN]) -> bool {
    name.starts_with(NAME_PREFIX)
        && name[NAME_PREFIX.len()..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// Bytes from the kernel's CSPRNG.
fn random<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

/// Time left until `until`; a handshake error once it has passed.
fn left(until: Instant) -> Result<Duration, Error> {
    let d = until.saturating_duration_since(Instant::now());
    if d.is_zero() {
        Err(Error::Handshake("the upgrade exchange timed out".into()))
    } else {
        Ok(d)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A blocking stream whose reads and writes can be given a time limit.
trait Timed: Read + Write {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}

impl Timed for TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Timed for UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// Fills `buf` from `s` before `until` (however slowly the peer sends).
fn read_full(s: &mut impl Timed, buf: &mut [u8], until: Instant) -> Result<(), Error> {
    let mut got = 0;
    while got < buf.len() {
        s.set_timeouts(left(until)?)?;
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(Error::Handshake(
                    "peer closed during the upgrade exchange".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes all of `buf` to `s` before `until`.
fn write_full(s: &mut impl Timed, buf: &[u8], until: Instant) -> Result<(), Error> {
    let mut sent = 0;
    while sent < buf.len() {
        s.set_timeouts(left(until)?)?;
        match s.write(&buf[sent..]) {
            Ok(0) => return Err(Error::Handshake("peer stopped reading".into())),
            Ok(n) => sent += n,
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_rejects_other_versions() {
        let r = encode_request();
        assert_eq!(&r, b"LCHU\x01\x00\x00\x00");
        assert!(decode_request(&r));
        let mut v2 = r;
        v2[4] = 2;
        assert!(!decode_request(&v2));
        let mut reserved = r;
        reserved[7] = 1;
        assert!(!decode_request(&reserved));
    }

    #[test]
    fn reply_round_trips() {
        let offer = Reply::Offer {
            token: [7; TOKEN_LEN],
            name: name_from(&[0xab; 12]),
        };
        let b = encode_reply(&offer);
        assert_eq!(&b[..8], b"LCHO\x01\x00\x01\x00");
        assert_eq!(&b[24..56], b"libchan-abababababababababababab");
        assert_eq!(decode_reply(&b), Ok(offer));
        let declined = encode_reply(&Reply::Declined);
        assert_eq!(&declined[..8], b"LCHO\x01\x00\x00\x00");
        assert_eq!(decode_reply(&declined), Ok(Reply::Declined));
    }

    #[test]
    fn reply_refuses_names_libchan_does_not_make() {
        let mut b = encode_reply(&Reply::Offer {
            token: [1; TOKEN_LEN],
            name: name_from(&[0; 12]),
        });
        // A hostile server pointing the client at another local socket.
        b[24..56].copy_from_slice(b"/tmp/.X11-unix/X0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        assert!(decode_reply(&b).is_err());
        let mut upper = encode_reply(&Reply::Offer {
            token: [1; TOKEN_LEN],
            name: name_from(&[0; 12]),
        });
        upper[40] = b'A';
        assert!(decode_reply(&upper).is_err());
    }

    #[test]
    fn reply_refuses_malformed_records() {
        let good = encode_reply(&Reply::Declined);
        for (at, value) in [(0, b'X'), (4, 2), (6, 2), (7, 1), (30, 1)] {
            let mut b = good;
            b[at] = value;
            assert!(decode_reply(&b).is_err(), "byte {at} = {value}");
        }
    }

    #[test]
    fn token_presentation_round_trips() {
        let token = [0x5a; TOKEN_LEN];
        let b = encode_present(&token);
        assert_eq!(&b[..8], b"LCHT\0\0\0\0");
        assert_eq!(decode_present(&b), Some(token));
        let mut reserved = b;
        reserved[5] = 1;
        assert_eq!(decode_present(&reserved), None);
        let mut magic = b;
        magic[3] = b'N';
        assert_eq!(decode_present(&magic), None);
    }

    #[test]
    fn tokens_compare_whole() {
        let a = [3u8; TOKEN_LEN];
        assert!(same_token(&a, &a));
        for i in 0..TOKEN_LEN {
            let mut b = a;
            b[i] ^= 0x80;
            assert!(!same_token(&a, &b), "differs at {i}");
        }
    }

    #[test]
    fn names_are_random_and_recognised() {
        let a = name_from(&random::<12>().unwrap());
        let b = name_from(&random::<12>().unwrap());
        assert_ne!(a, b);
        assert!(is_libchan_name(&a) && is_libchan_name(&b));
    }
}
