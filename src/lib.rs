#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod channel;
mod error;
mod message;
mod proto;
mod ring;
mod spawn;
mod sys;
mod transport;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

pub use channel::{
    copy, pipe, pipe_with_capacity, ArchivedReceiver, ArchivedSender, CopyError, Loan, Msg,
    Receiver, Sender, DEFAULT_CAPACITY,
};
pub use error::{
    Error, InvalidMessage, RecvError, RecvTimeoutError, SendError, SendTimeoutError, TakeError,
    TryRecvError, TrySendError,
};
pub use message::{fingerprint, ArchivedByteStream, ArchivedFd, ByteStream, Fd, Message};
pub use spawn::{is_worker, parent, parent_with, spawn, spawn_with, SpawnOptions};
pub use transport::{
    connect, connect_with, listen, listen_with, Listener, Options, Role, Session, Transport, Trust,
};

/// Re-exported so that messages can derive rkyv's traits without a direct dependency.
pub use rkyv;
