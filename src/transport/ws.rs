//! `ws://` and `wss://` links: WebSocket binary messages. Not built yet.

use std::net::TcpStream;
use std::time::Duration;

use crate::error::Error;

use super::link::Link;
use super::Options;

/// Runs the client side of the WebSocket upgrade for `path` on `hostport`.
pub(super) fn connect(
    _hostport: &str,
    _path: &str,
    _secure: bool,
    _opts: &Options,
    _timeout: Duration,
) -> Result<Box<dyn Link>, Error> {
    Err(Error::Address("ws:// is not built yet".into()))
}

/// Runs the server side of the WebSocket upgrade on an accepted connection.
pub(super) fn accept(
    _stream: TcpStream,
    _path: &str,
    _secure: bool,
    _opts: &Options,
    _timeout: Duration,
) -> Result<Box<dyn Link>, Error> {
    Err(Error::Address("ws:// is not built yet".into()))
}
