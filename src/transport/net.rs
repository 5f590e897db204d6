//! Network plumbing shared by the TCP-based transports: address checks, connecting with a
//! deadline, socket options, and the listener that runs handshakes off the accept thread.

use std::collections::VecDeque;
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::sys;

use super::link::{Link, SocketLink};
use super::{Options, Session};

/// Checks that `rest` (the part of `addr` after the scheme) is `HOST:PORT` and returns it.
pub(super) fn host_port(addr: &str, rest: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::Address(format!("{addr:?}: {why}"));
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    port.parse::<u16>().map_err(|_| bad("bad port"))?;
    Ok(rest.to_string())
}

/// Connects to `host_port`, trying each address it resolves to, each for at most `timeout`.
pub(super) fn connect_tcp(host_port: &str, timeout: Duration) -> Result<TcpStream, Error> {
    let mut last = None;
    for a in host_port.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => Error::Address(format!("{host_port:?}: resolves to no address")),
    })
}

/// Prepares a connected TCP stream for a session: no Nagle delay (frames are written whole,
/// and small ones are latency-bound), non-blocking.
pub(super) fn prepare(stream: &TcpStream) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok(())
}

/// A session link over a plain TCP connection.
pub(super) fn tcp_link(stream: TcpStream) -> Result<Box<dyn Link>, Error> {
    prepare(&stream)?;
    Ok(Box::new(SocketLink::tcp(OwnedFd::from(stream))))
}

/// Handshakes one listener runs at once; past that, `accept` leaves connections in the kernel's
/// backlog until one finishes.
const MAX_HANDSHAKES: usize = 64;

/// Runs the acceptor's side of one new connection (TLS, WebSocket upgrade, libchan hello).
pub(super) type Handshake = dyn Fn(TcpStream, &Options) -> Result<Session, Error> + Send + Sync;

/// The listening side of the TCP-based transports. A connection's handshake runs on a thread
/// of its own, at most [`MAX_HANDSHAKES`] at once, so one slow or silent client holds up
/// nobody; [`Server::accept`] returns whichever finishes first.
pub(super) struct Server {
    listener: TcpListener,
    handshake: Arc<Handshake>,
    handshakes: Arc<Handshakes>,
}

impl Server {
    pub(super) fn bind(hostport: &str, handshake: Arc<Handshake>) -> Result<Self, Error> {
        let listener = TcpListener::bind(hostport)?;
        // `accept` waits in poll, on the listener and on finished handshakes.
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            handshake,
            handshakes: Arc::new(Handshakes {
                done: Mutex::new(VecDeque::new()),
                running: AtomicUsize::new(0),
                doorbell: sys::Doorbell::new()?,
            }),
        })
    }

    /// Takes connections from the kernel and starts their handshakes, until one has finished:
    /// its session (or why it failed) is the answer.
    pub(super) fn accept(&self, opts: &Options) -> Result<Session, Error> {
        let hs = &self.handshakes;
        loop {
            // Clear before looking, so that a handshake finishing after the look rings again.
            hs.doorbell.clear();
            if let Some(result) = hs.take() {
                return result;
            }
            if hs.running.load(Ordering::Relaxed) < MAX_HANDSHAKES {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        self.start(stream, opts)?;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                }
                sys::poll_with_doorbell(self.listener.as_fd(), hs.doorbell.as_fd(), false, None)?;
            } else {
                sys::poll(&hs.doorbell, true, false, None)?;
            }
        }
    }

    pub(super) fn local_addr(&self) -> Result<std::net::SocketAddr, Error> {
        Ok(self.listener.local_addr()?)
    }

    /// Runs the handshake of a new connection on a thread of its own.
    fn start(&self, stream: TcpStream, opts: &Options) -> Result<(), Error> {
        let handshakes = self.handshakes.clone();
        let handshake = self.handshake.clone();
        let opts = opts.clone();
        // A count only: results travel under `done`'s mutex, wake-ups by the doorbell.
        self.handshakes.running.fetch_add(1, Ordering::Relaxed);
        let spawned = thread::Builder::new()
            .name("libchan-handshake".into())
            .spawn(move || {
                let result = handshake(stream, &opts);
                handshakes.finish(result);
            });
        if let Err(e) = spawned {
            self.handshakes.running.fetch_sub(1, Ordering::Relaxed);
            return Err(e.into());
        }
        Ok(())
    }
}

/// Handshakes in flight on their threads, and what the finished ones produced.
struct Handshakes {
    /// Finished handshakes, oldest first, waiting for `accept`.
    done: Mutex<VecDeque<Result<Session, Error>>>,
    /// Handshake threads started and not finished.
    running: AtomicUsize,
    /// Rung when a handshake finishes.
    doorbell: sys::Doorbell,
}

impl Handshakes {
    fn take(&self) -> Option<Result<Session, Error>> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let first = done.pop_front();
        if first.is_some() && !done.is_empty() {
            // Another thread may be waiting in `accept`, and this one cleared the bell.
            self.doorbell.ring();
        }
        first
    }

    fn finish(&self, result: Result<Session, Error>) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(result);
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.doorbell.ring();
    }
}

/// A connection that ended in order and waits for its peer to close before its descriptor is
/// closed. Closing a TCP socket at once resets the connection when the peer's late bytes
/// arrive (or are already unread here), and a reset throws away what the peer had not read
/// yet, and what this side still had queued for it: the end of the session would be lost.
/// So the closer sends what is left and a FIN, then reads and discards until the peer closes
/// or [`CLOSE_LINGER`] passes.
pub(super) trait Closing: Send {
    /// Makes what progress it can without blocking; true when done (dropping the value then
    /// closes the connection).
    fn step(&mut self) -> bool;
}

/// A plain socket's lingering close (tcp, and the socket under TLS once its close_notify is
/// out).
pub(super) struct SocketClosing {
    sock: OwnedFd,
    until: Instant,
    fin: bool,
}

impl SocketClosing {
    /// Lingers on `sock` (a duplicate of the link's descriptor, so that the link may close
    /// its own).
    pub(super) fn new(sock: OwnedFd) -> Box<Self> {
        Box::new(Self {
            sock,
            until: Instant::now() + CLOSE_LINGER,
            fin: false,
        })
    }
}

impl Closing for SocketClosing {
    fn step(&mut self) -> bool {
        if !self.fin {
            self.fin = true;
            let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Write);
        }
        let mut buf = [0u8; 4096];
        loop {
            match rustix::net::recv(&self.sock, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((0, _)) => return true,
                Ok(_) => {}
                Err(rustix::io::Errno::AGAIN) => return Instant::now() >= self.until,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return true,
            }
        }
    }
}

/// How long a dropped link waits for its peer to close.
pub(super) const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// How often the closer thread looks at its links.
const CLOSE_POLL: Duration = Duration::from_millis(5);

/// Dropped links the closer thread is closing.
static CLOSING: Mutex<Vec<Box<dyn Closing>>> = Mutex::new(Vec::new());

/// Whether a closer thread runs.
static CLOSER: AtomicBool = AtomicBool::new(false);

/// Hands a dropped link to the closer thread, starting it if none runs.
pub(super) fn close_later(c: Box<dyn Closing>) {
    lock(&CLOSING).push(c);
    if CLOSER.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = thread::Builder::new()
        .name("libchan-close".into())
        .stack_size(128 * 1024)
        .spawn(closer);
    if spawned.is_err() {
        // No thread to wait with: close now.
        CLOSER.store(false, Ordering::Release);
        lock(&CLOSING).clear();
    }
}

/// The closer thread: steps every closing link until none is left, then ends.
fn closer() {
    loop {
        let mut batch = std::mem::take(&mut *lock(&CLOSING));
        // Done links drop here, closing their connections.
        batch.retain_mut(|c| !c.step());
        let idle = {
            let mut q = lock(&CLOSING);
            q.append(&mut batch);
            q.is_empty()
        };
        if idle {
            CLOSER.store(false, Ordering::Release);
            // A link handed over after the check above saw the flag still set and started no
            // thread: take it on, unless a new thread already did.
            if lock(&CLOSING).is_empty() || CLOSER.swap(true, Ordering::AcqRel) {
                return;
            }
            continue;
        }
        thread::sleep(CLOSE_POLL);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
