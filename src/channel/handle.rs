//! Untyped channel ends and the handles a message carries.
//!
//! `SendCore` and `RecvCore` are the reference-counted ends behind `Sender<T>` and
//! `Receiver<T>`: creating one counts it on its inbox (or session channel), dropping one uncounts
//! it, which is how closing works on every transport. A `Handle` is one entry of a message's
//! handle table while the message travels.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::inbox::{Entry, Inbox, PopError, PushError, Wait};
use super::source::Outlet;
use crate::error::Error;
use crate::message::{Lent, Packet};
use crate::proto::frame::{MAX_FDS, MAX_HANDLES};

/// One entry of a message's handle table.
pub(crate) enum Handle {
    Sender(SendCore, u64),
    Receiver(RecvCore, u64),
    Fd(OwnedFd),
    Stream(OwnedFd),
}

/// The sending end of a channel, untyped.
pub(crate) enum SendCore {
    /// Straight into an inbox of this process.
    Local(Arc<Inbox>),
    /// Over a session.
    Remote(Arc<dyn Outlet>),
}

/// The receiving end of a channel, untyped: always an inbox of this process.
pub(crate) struct RecvCore(pub(crate) Arc<Inbox>);

impl SendCore {
    pub(crate) fn local(inbox: Arc<Inbox>) -> Self {
        inbox.add_sender();
        SendCore::Local(inbox)
    }

    /// Largest archive this end can carry.
    pub(crate) fn max_message(&self) -> usize {
        match self {
            SendCore::Local(_) => MAX_LOCAL_MESSAGE,
            SendCore::Remote(out) => out.max_message(),
        }
    }

    /// Checks that `packet`'s handles fit one message on this end (a frame carries at most 1024
    /// handle descriptors, at most 253 of them fds).
    pub(crate) fn check_handles(&self, packet: &Packet) -> Result<(), Error> {
        if let SendCore::Local(_) = self {
            return Ok(());
        }
        let fds = packet
            .handles
            .iter()
            .filter(|h| matches!(h, Handle::Fd(_) | Handle::Stream(_)))
            .count();
        let (max_handles, max_fds) = (MAX_HANDLES as usize, usize::from(MAX_FDS));
        if packet.handles.len() > max_handles {
            return Err(Error::TooManyHandles {
                count: packet.handles.len(),
                limit: max_handles,
            });
        }
        if fds > max_fds {
            return Err(Error::TooManyHandles {
                count: fds,
                limit: max_fds,
            });
        }
        Ok(())
    }

    pub(crate) fn send(&self, packet: Packet, wait: Wait) -> Result<(), PushError> {
        match self {
            SendCore::Local(inbox) => inbox.push(packet, wait),
            SendCore::Remote(out) => out.send(packet, wait),
        }
    }

    /// See [`Outlet::send_in_place`].
    pub(crate) fn send_in_place(
        &self,
        estimate: usize,
        wait: Wait,
        encode: &mut dyn FnMut(*mut u8, usize) -> Option<usize>,
    ) -> Option<Result<(), PushError>> {
        match self {
            SendCore::Local(inbox) => inbox.push_in_place(estimate, wait, encode),
            SendCore::Remote(out) => out.send_in_place(estimate, wait, encode),
        }
    }

    pub(crate) fn is_disconnected(&self) -> bool {
        match self {
            SendCore::Local(inbox) => inbox.is_disconnected(),
            SendCore::Remote(out) => out.is_disconnected(),
        }
    }
}

impl Clone for SendCore {
    fn clone(&self) -> Self {
        match self {
            SendCore::Local(inbox) => SendCore::local(inbox.clone()),
            SendCore::Remote(out) => SendCore::Remote(out.clone()),
        }
    }
}

impl Drop for SendCore {
    fn drop(&mut self) {
        if let SendCore::Local(inbox) = self {
            inbox.remove_sender(false);
        }
        // A remote end closes its session channel when its last `Arc` drops.
    }
}

impl RecvCore {
    pub(crate) fn new(inbox: Arc<Inbox>) -> Self {
        // `Inbox::new` starts with one receiver: this one.
        RecvCore(inbox)
    }

    /// Another counted receiver on the same inbox (used while a handle is in flight).
    pub(crate) fn share(&self) -> Self {
        self.0.add_receiver();
        RecvCore(self.0.clone())
    }

    pub(crate) fn pop(&self, wait: Wait) -> Result<Entry, PopError> {
        self.0.pop(wait)
    }

    /// See [`Inbox::take_lent`].
    #[inline]
    pub(crate) fn take_lent(&self) -> Option<Lent> {
        self.0.take_lent()
    }
}

impl Drop for RecvCore {
    fn drop(&mut self) {
        self.0.remove_receiver();
    }
}

/// Largest message on an in-process channel: rkyv's 32-bit relative pointers reach 2 GiB.
pub(crate) const MAX_LOCAL_MESSAGE: usize = (i32::MAX as usize) - 4096;
