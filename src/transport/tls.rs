//! `tls://` links: TLS over TCP. Not built yet.

use std::net::TcpStream;
use std::time::Duration;

use crate::error::Error;

use super::link::Link;
use super::Options;

/// Certificates and keys a session may use for TLS.
#[derive(Debug, Clone, Default)]
pub(super) struct TlsOptions {}

/// Checks that `opts` can serve TLS (a certificate and key are set).
pub(super) fn check_server(_opts: &Options) -> Result<(), Error> {
    Err(Error::Address("tls:// is not built yet".into()))
}

/// Runs the client side of a TLS handshake with `hostport`.
pub(super) fn connect(
    _hostport: &str,
    _opts: &Options,
    _timeout: Duration,
) -> Result<Box<dyn Link>, Error> {
    Err(Error::Address("tls:// is not built yet".into()))
}

/// Runs the server side of a TLS handshake on an accepted connection.
pub(super) fn accept(
    _stream: TcpStream,
    _opts: &Options,
    _timeout: Duration,
) -> Result<Box<dyn Link>, Error> {
    Err(Error::Address("tls:// is not built yet".into()))
}
