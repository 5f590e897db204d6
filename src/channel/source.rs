//! What the channel layer needs from the sessions below it, as three small traits.
//!
//! A channel end can live on a session: its messages are then read from a socket (`Feed`),
//! sent through one (`Outlet`), and its credit returned over one (`CreditSink`). The channel
//! layer only sees these traits; `transport` implements them. Dependencies thus point one way,
//! from `transport` down to `channel`'s inbox, and the cost is one indirect call where a
//! message crosses into a session.

use std::any::Any;
use std::sync::atomic::AtomicU32;

use super::inbox::{Entry, Inbox, PushError, Wait};
use crate::message::{Lent, Packet};

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

    /// True when the session reads its socket on a thread of its own, so waiting receivers
    /// need not drive it.
    fn self_driven(&self) -> bool {
        false
    }
}

/// What [`Lane::try_pop`] found.
pub(crate) enum LanePop {
    /// The next message.
    Entry(Entry),
    /// Nothing now.
    Empty,
    /// Nothing ever again: the sender closed (or the session ended) and everything was read.
    Done,
}

/// A stream of messages an inbox reads without its lock, waiting on a futex word when idle: a
/// shared-memory ring from one sending process.
pub(crate) trait Lane: Send + Sync {
    /// Takes the next message, if there is one.
    fn try_pop(&self) -> LanePop;

    /// [`try_pop`](Self::try_pop) for an inbox that reads this lane alone: `solo` says
    /// whether that still holds, and a lane whose records wait for other lanes (see
    /// `transport::shm`) asks it only once those lanes are known to be added, so that a lane
    /// added meanwhile is never overtaken. Returns `Empty` when `solo` no longer holds.
    fn try_pop_solo(&self, solo: &dyn Fn() -> bool) -> LanePop {
        let _ = solo;
        self.try_pop()
    }

    /// The receive fast path: the next message when it is a plain archive lent in place (no
    /// handles, nothing on the socket before it, nothing to wait for) and the lane is free;
    /// `None` otherwise, and the caller goes the general way through [`try_pop`](Self::try_pop).
    /// `solo` as for [`try_pop_solo`](Self::try_pop_solo).
    fn take_lent(&self, solo: &dyn Fn() -> bool) -> Option<Lent> {
        let _ = solo;
        None
    }

    /// Cheap check: `try_pop` would not return `Empty` (it may still, spuriously).
    fn ready(&self) -> bool;

    /// `try_pop` returned `Done`: the lane can be dropped.
    fn finished(&self) -> bool;

    /// Finishes the lane if nothing is left in it and nothing more will come (what `try_pop`
    /// would report as `Done`), without ever taking a message; returns whether it is finished.
    /// For an inbox that found no next message in any of its lanes: one that arrived since
    /// must wait for the look that orders the lanes (see `Inbox::poll_lanes`).
    fn try_finish(&self) -> bool;

    /// Nobody will receive any more: drop what waits (closing its handles) and finish.
    fn discard(&self);

    /// The inbox dropped this lane, finished or discarded, and holds no lock: what finishing
    /// asks of others (a lane closed by a record tells its session) happens here, since the
    /// inbox reads its lanes under its lanes lock, which that work could need again.
    fn retire(&self) {}

    /// Where the next message stands in its sender's order: the sending session, and the
    /// message's number in it; `None` when there is no next message yet. Lanes of one session
    /// deliver in number order.
    fn order(&self) -> Option<(usize, u64)>;

    /// Announces that the consumer is about to sleep, and returns the word to sleep on while it
    /// holds 1. The caller re-checks [`ready`](Self::ready) before sleeping and calls
    /// [`park_done`](Self::park_done) after.
    fn park_prepare(&self) -> &AtomicU32;

    /// The consumer is awake again.
    fn park_done(&self);

    /// Wakes a consumer sleeping on this lane's word (a local event: a message from another
    /// sender, a close, the session ending).
    fn unpark(&self);
}

/// The sending half of a channel on a session.
pub(crate) trait Outlet: Send + Sync {
    /// Sends one message, waiting for credit as `wait` allows. A message that is not sent is
    /// dropped (its handles close); the caller still holds the value it encoded.
    fn send(&self, packet: Packet, wait: Wait) -> Result<(), PushError>;

    /// Sends one message serialized by `encode` straight into the transport's buffer (a ring
    /// record), if this channel has one: `encode(at, cap)` writes the archive at `at` (16-byte
    /// aligned, `cap` bytes writable) and returns its length, or `None` when it cannot (too
    /// big, or it carries handles). `estimate` sizes the space offered. Returns `None` when the
    /// message was not sent this way (the caller then encodes it into a buffer and calls
    /// [`send`](Self::send)).
    fn send_in_place(
        &self,
        _estimate: usize,
        _wait: Wait,
        _encode: &mut dyn FnMut(*mut u8, usize) -> Option<usize>,
    ) -> Option<Result<(), PushError>> {
        None
    }

    /// Reserves `len` bytes in the transport's buffer (a ring record) for the caller to write
    /// and then hand to [`commit_loan`](Self::commit_loan) (or
    /// [`abandon_loan`](Self::abandon_loan)), if this channel has one; `None` otherwise.
    fn loan(&self, _len: usize, _wait: Wait) -> Option<Result<LoanSlot, PushError>> {
        None
    }

    /// Publishes the first `n` bytes of a slot from [`loan`](Self::loan) as one message.
    fn commit_loan(&self, _slot: LoanSlot, _n: usize) {}

    /// Gives a slot from [`loan`](Self::loan) back unsent.
    fn abandon_loan(&self, _slot: LoanSlot) {}

    /// Largest archive the session accepts.
    fn max_message(&self) -> usize;

    /// True when nothing more can be sent on this channel.
    fn is_disconnected(&self) -> bool;

    /// For the session that owns this outlet to recognise it.
    fn as_any(&self) -> &dyn Any;
}

/// Space reserved in a transport's buffer by [`Outlet::loan`]: `len` bytes at `at`, 16-byte
/// aligned, valid for writes and read by nobody until the outlet that lent it commits it. The
/// holder must hand it back to that outlet ([`Outlet::commit_loan`] or
/// [`Outlet::abandon_loan`]), which keeps the memory mapped while the holder borrows it.
pub(crate) struct LoanSlot {
    pub(crate) at: *mut u8,
    pub(crate) len: usize,
    /// Which reservation this is, in the outlet's own terms.
    pub(crate) key: (u64, usize),
}

// SAFETY: `at` points at space reserved for this slot alone (see the type); moving the slot to
// another thread moves that exclusive access with it.
unsafe impl Send for LoanSlot {}

/// Where the credit of a message received from a session goes back.
pub(crate) trait CreditSink: Send + Sync {
    /// The application consumed (received, forwarded or dropped) a message whose frame body
    /// was `body_len` bytes (see [`Entry::body_len`]).
    fn consumed(&self, body_len: usize);
}
