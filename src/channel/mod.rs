//! Typed channels: `pipe`, `Sender`, `Receiver`, `Msg`, `copy`.
//!
//! Every channel is an [`Inbox`](inbox::Inbox) in the receiving process. A `Sender` either
//! pushes into an inbox of its own process or writes to a session that feeds an inbox in
//! another process; either way the same `SendCore`/`RecvCore` counting gives every transport
//! the same close and disconnect semantics (DESIGN.md §2).

mod copy;
mod handle;
mod inbox;
mod loan;
mod local;
mod receiver;
mod sender;
mod source;

pub use copy::{copy, CopyError};
pub(crate) use handle::{Handle, RecvCore, SendCore};
pub(crate) use inbox::{Entry, Inbox, PopError, PushError, Wait};
pub use loan::Loan;
pub use receiver::{ArchivedReceiver, Msg, Receiver};
pub use sender::{ArchivedSender, Sender};
pub(crate) use source::{CreditSink, Drive, Feed, Lane, LanePop, LoanSlot, Outlet};

use crate::message::Message;

/// Default capacity, in messages, of a channel made by [`pipe`].
pub const DEFAULT_CAPACITY: usize = 256;

/// Creates an in-process channel with room for [`DEFAULT_CAPACITY`] messages.
///
/// Either end can later be sent over a session to another process; the channel keeps working
/// across it.
///
/// ```
/// let (tx, rx) = libchan::pipe::<u32>();
/// tx.send(42).unwrap();
/// assert_eq!(*rx.recv().unwrap(), 42);
/// ```
pub fn pipe<T: Message>() -> (Sender<T>, Receiver<T>) {
    pipe_with_capacity(DEFAULT_CAPACITY)
}

/// Creates an in-process channel with room for `capacity` messages (at least one).
///
/// ```
/// let (tx, rx) = libchan::pipe_with_capacity::<u32>(1);
/// tx.send(1).unwrap();
/// assert!(tx.try_send(2).unwrap_err().is_full());
/// drop(rx);
/// ```
pub fn pipe_with_capacity<T: Message>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let inbox = Inbox::new(capacity);
    let tx = Sender::from_core(SendCore::local(inbox.clone()));
    let rx = Receiver::from_core(RecvCore::new(inbox));
    (tx, rx)
}
