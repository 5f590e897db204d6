//! `tcp://` sessions: a listener and a connector over plain TCP.

use std::net::TcpListener;

use crate::error::Error;

use super::{net, Options, Role, Session, HANDSHAKE_TIMEOUT};

/// The listening side of `tcp://`.
pub(super) struct Server {
    listener: TcpListener,
}

impl Server {
    pub(super) fn bind(hostport: &str, _opts: &Options) -> Result<Self, Error> {
        Ok(Self {
            listener: TcpListener::bind(hostport)?,
        })
    }

    pub(super) fn accept(&self, opts: &Options) -> Result<Session, Error> {
        let (stream, _) = self.listener.accept()?;
        Session::over(net::tcp_link(stream)?, Role::Acceptor, opts)
    }

    pub(super) fn local_addr(&self) -> Result<std::net::SocketAddr, Error> {
        Ok(self.listener.local_addr()?)
    }
}

/// Connects to a `tcp://` listener.
pub(super) fn connect(hostport: &str, opts: &Options) -> Result<Session, Error> {
    let stream = net::connect_tcp(hostport, HANDSHAKE_TIMEOUT)?;
    Session::over(net::tcp_link(stream)?, Role::Connector, opts)
}
