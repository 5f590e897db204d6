//! Errors at the API edge.
//!
//! Channel errors have crossbeam's shape: a failed send hands the message back. The receive
//! errors distinguish a graceful close (`Closed`: every sender was dropped and everything they
//! sent was received) from a broken one (`Disconnected`: the peer died or the session broke),
//! and a single message that failed validation (`Invalid`), after which the channel goes on.

use std::fmt;
use std::io;

/// The message could not be sent because the receiving side is gone. Carries the message.
#[derive(PartialEq, Eq, Clone, Copy)]
pub struct SendError<T>(pub T);

/// Why [`Sender::try_send`](crate::Sender::try_send) failed. Carries the message.
#[derive(PartialEq, Eq, Clone, Copy)]
pub enum TrySendError<T> {
    /// The channel is at capacity (or out of credit); the receiver is behind.
    Full(T),
    /// The receiving side is gone.
    Disconnected(T),
}

/// Why [`Sender::send_timeout`](crate::Sender::send_timeout) failed. Carries the message.
#[derive(PartialEq, Eq, Clone, Copy)]
pub enum SendTimeoutError<T> {
    /// The channel stayed full until the deadline.
    Timeout(T),
    /// The receiving side is gone.
    Disconnected(T),
}

/// Why [`Receiver::recv`](crate::Receiver::recv) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// Every sender was dropped and every message was received.
    Closed,
    /// The channel broke: the peer process died, the session failed, or the channel end was
    /// sent away.
    Disconnected,
    /// One message failed validation. It was dropped; the next `recv` reads the next one.
    Invalid(InvalidMessage),
}

/// Why [`Receiver::try_recv`](crate::Receiver::try_recv) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryRecvError {
    /// No message is ready now.
    Empty,
    /// Every sender was dropped and every message was received.
    Closed,
    /// The channel broke (see [`RecvError::Disconnected`]).
    Disconnected,
    /// One message failed validation (see [`RecvError::Invalid`]).
    Invalid(InvalidMessage),
}

/// Why [`Receiver::recv_timeout`](crate::Receiver::recv_timeout) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvTimeoutError {
    /// No message arrived before the deadline.
    Timeout,
    /// Every sender was dropped and every message was received.
    Closed,
    /// The channel broke (see [`RecvError::Disconnected`]).
    Disconnected,
    /// One message failed validation (see [`RecvError::Invalid`]).
    Invalid(InvalidMessage),
}

/// A message that arrived but could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMessage {
    pub(crate) reason: String,
}

impl InvalidMessage {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Why resolving a handle carried by a message failed ([`Msg::take`](crate::Msg::take)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeError {
    /// The handle was already taken from this message.
    Taken,
    /// The message names a handle it does not carry, or one of another kind.
    Invalid,
    /// The handle is a channel of another message type.
    TypeMismatch,
}

/// A session-level error: connecting, accepting, opening channels, protocol violations.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    Io(io::Error),
    /// The address could not be parsed or names an unsupported transport.
    Address(String),
    /// The peer broke the protocol; the session was closed.
    Protocol(String),
    /// The handshake failed (wrong magic, version or limits).
    Handshake(String),
    /// The channel's message type differs on the two sides.
    TypeMismatch {
        /// Fingerprint of the type this side expected.
        expected: u64,
        /// Fingerprint the peer announced.
        found: u64,
    },
    /// A message exceeds the negotiated size limit.
    TooLarge {
        /// Encoded size of the message.
        size: usize,
        /// Largest size the session accepts.
        limit: usize,
    },
    /// A message carries more handles (or file descriptors) than one frame can: at most 1024
    /// handles, of which at most 253 fds or byte streams, on a session.
    TooManyHandles {
        /// Handles (or fds) the message carries.
        count: usize,
        /// The most one message may carry.
        limit: usize,
    },
    /// The session is closed or the peer is gone.
    Disconnected,
    /// No peer or channel arrived before the deadline.
    Timeout,
    /// The message could not be serialized.
    Encode(String),
}

impl<T> SendError<T> {
    /// Returns the message that could not be sent.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> TrySendError<T> {
    /// Returns the message that could not be sent.
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(t) | Self::Disconnected(t) => t,
        }
    }

    /// True when the channel was full rather than disconnected.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full(_))
    }
}

impl<T> SendTimeoutError<T> {
    /// Returns the message that could not be sent.
    pub fn into_inner(self) -> T {
        match self {
            Self::Timeout(t) | Self::Disconnected(t) => t,
        }
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendError(..)")
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sending on a disconnected channel")
    }
}

impl<T> fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("Full(..)"),
            Self::Disconnected(_) => f.write_str("Disconnected(..)"),
        }
    }
}

impl<T> fmt::Display for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("sending on a full channel"),
            Self::Disconnected(_) => f.write_str("sending on a disconnected channel"),
        }
    }
}

impl<T> fmt::Debug for SendTimeoutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout(_) => f.write_str("Timeout(..)"),
            Self::Disconnected(_) => f.write_str("Disconnected(..)"),
        }
    }
}

impl<T> fmt::Display for SendTimeoutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout(_) => f.write_str("timed out sending on a full channel"),
            Self::Disconnected(_) => f.write_str("sending on a disconnected channel"),
        }
    }
}

impl<T> std::error::Error for SendError<T> {}
impl<T> std::error::Error for TrySendError<T> {}
impl<T> std::error::Error for SendTimeoutError<T> {}

impl fmt::Display for InvalidMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid message: {}", self.reason)
    }
}

impl std::error::Error for InvalidMessage {}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("receiving on a closed channel"),
            Self::Disconnected => f.write_str("receiving on a disconnected channel"),
            Self::Invalid(e) => e.fmt(f),
        }
    }
}

impl fmt::Display for TryRecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("receiving on an empty channel"),
            Self::Closed => f.write_str("receiving on a closed channel"),
            Self::Disconnected => f.write_str("receiving on a disconnected channel"),
            Self::Invalid(e) => e.fmt(f),
        }
    }
}

impl fmt::Display for RecvTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timed out waiting on a channel"),
            Self::Closed => f.write_str("receiving on a closed channel"),
            Self::Disconnected => f.write_str("receiving on a disconnected channel"),
            Self::Invalid(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RecvError {}
impl std::error::Error for TryRecvError {}
impl std::error::Error for RecvTimeoutError {}

impl fmt::Display for TakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Taken => f.write_str("handle already taken from this message"),
            Self::Invalid => f.write_str("message names a handle it does not carry"),
            Self::TypeMismatch => f.write_str("handle is a channel of another message type"),
        }
    }
}

impl std::error::Error for TakeError {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o error: {e}"),
            Self::Address(a) => write!(f, "bad address: {a}"),
            Self::Protocol(p) => write!(f, "protocol violation: {p}"),
            Self::Handshake(h) => write!(f, "handshake failed: {h}"),
            Self::TypeMismatch { expected, found } => write!(
                f,
                "channel message type mismatch: expected fingerprint {expected:#018x}, peer has {found:#018x}"
            ),
            Self::TooLarge { size, limit } => {
                write!(f, "message of {size} bytes exceeds the limit of {limit} bytes")
            }
            Self::TooManyHandles { count, limit } => {
                write!(f, "message carries {count} handles (or fds); the limit is {limit}")
            }
            Self::Disconnected => f.write_str("session disconnected"),
            Self::Timeout => f.write_str("timed out"),
            Self::Encode(e) => write!(f, "cannot serialize message: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<rustix::io::Errno> for Error {
    fn from(e: rustix::io::Errno) -> Self {
        Self::Io(e.into())
    }
}

impl From<RecvError> for TryRecvError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Closed => Self::Closed,
            RecvError::Disconnected => Self::Disconnected,
            RecvError::Invalid(i) => Self::Invalid(i),
        }
    }
}

impl From<RecvError> for RecvTimeoutError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Closed => Self::Closed,
            RecvError::Disconnected => Self::Disconnected,
            RecvError::Invalid(i) => Self::Invalid(i),
        }
    }
}
