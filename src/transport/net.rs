//! Network plumbing shared by the TCP-based transports: address checks, connecting with a
//! deadline, socket options, and the listener that runs handshakes off the accept thread.

use std::collections::VecDeque;
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

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
