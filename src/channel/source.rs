//! What the channel layer needs from the sessions below it, as three small traits.
//!
//! A channel end can live on a session: its messages are then read from a socket (`Feed`),
//! sent through one (`Outlet`), and its credit returned over one (`CreditSink`). The channel
//! layer only sees these traits; `transport` implements them. Dependencies thus point one way,
//! from `transport` down to `channel`'s inbox, and the cost is one indirect call where a
//! message crosses into a session.

use std::any::Any;

use super::inbox::{Inbox, PushError, Wait};
use crate::message::Packet;

/// What a call to [`Feed::drive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drive {
    /// This thread read the session until its condition held, the wait ran out, or the
    /// session died.
    Progress,
    /// Another thread is reading the session; this one is registered to be unparked when it
    /// stops.
    Busy,
    /// The session is dead.
    Dead,
}

/// A session that pushes received messages into inboxes.
pub(crate) trait Feed: Send + Sync {
    /// Reads the session on this thread until `ready` holds, `wait` runs out or the session
    /// dies, unless another thread is reading it.
    fn drive(&self, wait: Wait, ready: &dyn Fn() -> bool) -> Drive;

    /// Wakes the thread blocked reading this session, so it re-checks its condition.
    fn interrupt(&self);

    /// The last receiver of `inbox` is gone: reset the session's channels that feed it.
    fn receiver_gone(&self, inbox: &Inbox);
}

/// The sending half of a channel on a session.
pub(crate) trait Outlet: Send + Sync {
    /// Sends one message, waiting for credit as `wait` allows. A message that is not sent is
    /// dropped (its handles close); the caller still holds the value it encoded.
    fn send(&self, packet: Packet, wait: Wait) -> Result<(), PushError>;

    /// Largest archive the session accepts.
    fn max_message(&self) -> usize;

    /// True when nothing more can be sent on this channel.
    fn is_disconnected(&self) -> bool;

    /// For the session that owns this outlet to recognise it.
    fn as_any(&self) -> &dyn Any;
}

/// Where the credit of a message received from a session goes back.
pub(crate) trait CreditSink: Send + Sync {
    /// The application consumed (received, forwarded or dropped) `packet`.
    fn consumed(&self, packet: &Packet);
}
