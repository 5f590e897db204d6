//! Network plumbing shared by the TCP-based transports: address checks, connecting with a
//! deadline, and socket options.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::error::Error;

use super::link::{Link, SocketLink};

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
