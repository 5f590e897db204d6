//! The two halves of a session channel in this process: `InChan` (we receive) and `OutChan`
//! (we send), with their credit accounting, and the relay used when a handle must be proxied.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{self, Thread};

use super::conn::Conn;
use super::shm::{RingIn, RingOut, RingWriteError, TAG_MESSAGE, TAG_ON_SOCKET};
use crate::channel::{
    CreditSink, Drive, Feed, Inbox, LoanSlot, Outlet, PopError, PushError, RecvCore, SendCore, Wait,
};
use crate::message::Packet;
use crate::proto::credit::{data_cost, RecvWindow, SendCredit};
use crate::proto::frame;
use crate::ring::spsc::Detached;

/// A channel the peer sends on: its inbox and its receive window.
pub(crate) struct InChan {
    conn: Weak<Conn>,
    pub(crate) id: u32,
    pub(crate) inbox: Arc<Inbox>,
    window: Mutex<RecvWindow>,
    /// The sender's ring, once its RING frame arrived (shared-memory sessions).
    pub(crate) ring: OnceLock<Arc<RingIn>>,
}

impl InChan {
    pub(crate) fn new(conn: &Arc<Conn>, id: u32, inbox: Arc<Inbox>) -> Arc<Self> {
        Arc::new(Self {
            conn: Arc::downgrade(conn),
            id,
            inbox,
            window: Mutex::new(RecvWindow::new(
                conn.limits.local_window,
                conn.limits.max_frame,
            )),
            ring: OnceLock::new(),
        })
    }

    /// Accounts for a DATA frame of `cost` credit; an error is a protocol violation.
    pub(crate) fn handle_data(&self, cost: u64) -> Result<(), String> {
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handle_data(cost)
            .map_err(|e| e.to_string())
    }
}

impl CreditSink for InChan {
    /// The application consumed `packet` (received it, forwarded it, or dropped it unread):
    /// grant its credit back, in batches of half a window.
    fn consumed(&self, body_len: usize) {
        let cost = data_cost(body_len);
        let grant = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .consume(cost);
        if let (Some(grant), Some(conn)) = (grant, self.conn.upgrade()) {
            let mut buf = Vec::with_capacity(16);
            frame::encode_credit(&mut buf, self.id, grant);
            conn.send_control(&buf);
        }
    }
}

/// A channel we send on. The last `Arc` dropping closes it (CLOSE frame).
pub(crate) struct OutChan {
    pub(crate) conn: Arc<Conn>,
    pub(crate) id: u32,
    credit: Mutex<SendCredit>,
    reset: AtomicBool,
    waiters: Mutex<Vec<Thread>>,
    /// The channel's ring on a shared-memory session (made on the first send).
    ring: Mutex<RingState>,
    /// The ring's "producer parked" word, for waking a sender when the channel ends. Points
    /// into the mapping `ring` owns, which lives as long as `self`.
    room_word: AtomicPtr<AtomicU32>,
    /// The ring's "consumer gone" word (null until the ring is made), which the receiver sets
    /// when it reads no more. Points into the mapping `ring` owns, as `room_word`.
    gone_word: AtomicPtr<AtomicU32>,
    /// The ring is one this side offered (see `conn::offer`) and nothing was sent on it yet.
    fresh_offer: AtomicBool,
    /// The id of the offer the ring came from (0: the channel made its own), under which it
    /// goes back to the offers once the channel closes.
    offer: u32,
}

/// What [`OutChan::send_shm`] did.
enum ShmSend {
    /// Sent through the ring, or failed.
    Done(Result<(), PushError>),
    /// Credit taken and a tag written: the frame goes on the socket now.
    Tagged,
    /// No ring: the socket carries the message, as on any session.
    NoRing,
}

enum RingState {
    /// Not made yet: nothing was sent.
    Unset,
    Ready(RingOut),
    /// No shared memory on this session, or making the ring failed: the socket carries all.
    Unavailable,
}

impl OutChan {
    pub(crate) fn new(conn: Arc<Conn>, id: u32) -> Arc<Self> {
        Self::with_ring_state(conn, id, RingState::Unset, 0)
    }

    /// A channel whose ring is `ring`, the one this side offered as `offer` and the peer bound
    /// to channel `id` (a SENDER_RING descriptor): no RING frame announces it.
    pub(crate) fn on_offer(conn: Arc<Conn>, id: u32, ring: RingOut, offer: u32) -> Arc<Self> {
        let o = Self::with_ring_state(conn, id, RingState::Unset, offer);
        o.keep_words(&ring);
        *o.ring.lock().unwrap_or_else(|e| e.into_inner()) = RingState::Ready(ring);
        o.fresh_offer.store(true, Ordering::Relaxed);
        o
    }

    fn with_ring_state(conn: Arc<Conn>, id: u32, ring: RingState, offer: u32) -> Arc<Self> {
        let credit = SendCredit::new(conn.limits.peer_window);
        Arc::new(Self {
            conn,
            id,
            credit: Mutex::new(credit),
            reset: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
            ring: Mutex::new(ring),
            room_word: AtomicPtr::new(std::ptr::null_mut()),
            gone_word: AtomicPtr::new(std::ptr::null_mut()),
            fresh_offer: AtomicBool::new(false),
            offer,
        })
    }

    /// Keeps the addresses of `ring`'s "producer parked" and "consumer gone" words, for use
    /// without the ring's lock; `ring` becomes this channel's ring, which lives as long as
    /// `self`.
    fn keep_words(&self, ring: &RingOut) {
        let room: *const AtomicU32 = ring.room_word();
        let gone: *const AtomicU32 = ring.gone_word();
        self.room_word.store(room.cast_mut(), Ordering::Release);
        self.gone_word.store(gone.cast_mut(), Ordering::Release);
    }

    /// The receiver marked the channel's ring gone: it reads no more (its RESET may still be
    /// on the way, or may have overtaken the frame that opened this channel).
    fn ring_gone(&self) -> bool {
        let word = self.gone_word.load(Ordering::Acquire);
        // SAFETY: set from the ring this `OutChan` owns (see the field), never cleared.
        !word.is_null() && unsafe { &*word }.load(Ordering::Acquire) != 0
    }

    fn try_spend(&self, cost: u64) -> bool {
        let mut c = self.credit.lock().unwrap_or_else(|e| e.into_inner());
        if c.can_send() {
            c.spend(cost);
            true
        } else {
            false
        }
    }

    fn has_credit(&self) -> bool {
        self.credit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .can_send()
    }

    pub(crate) fn grant(&self, n: u32) {
        self.credit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handle_grant(n);
        self.wake();
    }

    pub(crate) fn mark_reset(&self) {
        self.reset.store(true, Ordering::Release);
        self.wake();
    }

    pub(crate) fn wake(&self) {
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for t in waiters {
            t.unpark();
        }
        let word = self.room_word.load(Ordering::Acquire);
        if !word.is_null() {
            // SAFETY: set from the ring this `OutChan` owns (see the field), never cleared.
            let word = unsafe { &*word };
            word.store(0, Ordering::Relaxed);
            let _ = crate::sys::futex_wake(word, u32::MAX);
        }
    }

    /// Sends over the channel's ring when the session has shared memory; `None` when the
    /// socket must carry this channel.
    fn send_shm(&self, packet: &Packet, wait: Wait) -> ShmSend {
        self.with_ring(|out| self.send_on_ring(out, packet, wait))
            .unwrap_or(ShmSend::NoRing)
    }

    fn send_on_ring(&self, out: &mut RingOut, packet: &Packet, wait: Wait) -> ShmSend {
        let fits = out.fits(packet.bytes.len());
        let stop = || self.is_disconnected();
        let stamp = self.conn.next_stamp();
        let mut write = |tag, bytes: &[u8]| {
            out.write(tag, stamp, bytes, wait, &stop)
                .map_err(|e| self.ring_error(e))
        };
        if packet.handles.is_empty() && fits {
            return ShmSend::Done(write(TAG_MESSAGE, &packet.bytes));
        }
        // Handles or a large archive: the message goes on the socket (a large archive in a
        // sealed memfd), and a tag in the ring keeps its place. Credit first, so that once the
        // tag is written the frame follows.
        let cost = data_cost(packet.handles.len() * 16 + packet.bytes.len());
        if let Err(e) = self.take_credit(cost, wait) {
            return ShmSend::Done(Err(e));
        }
        let blob = if packet.handles.is_empty() {
            // No memfd (out of fds or memory): the socket carries it as a DATA frame.
            super::blob::make(&packet.bytes).ok()
        } else {
            None
        };
        if let Err(e) = write(TAG_ON_SOCKET, &[]) {
            self.grant(cost.min(u64::from(u32::MAX)) as u32);
            return ShmSend::Done(Err(e));
        }
        match blob {
            Some(fd) => ShmSend::Done(self.conn.send_blob(self.id, packet.bytes.len(), fd)),
            None => ShmSend::Tagged,
        }
    }

    /// Sends a message whose handles are all `Sender`s that can take rings the peer offered
    /// as one ring record carrying their descriptors (TAG_HANDLES): the peer's receiving
    /// thread opens the channels itself, with no hop through its session's thread. `None` when
    /// this does not apply (the message then goes the usual way).
    fn send_handles_on_ring(&self, packet: &Packet, wait: Wait) -> Option<Result<(), PushError>> {
        let n = packet.handles.len();
        if n == 0 {
            return None;
        }
        // Rings of channels the peer closed through them after our reader went come back
        // among the offers first.
        self.conn.look_for_closes();
        if !self.conn.may_export_on_offers(&packet.handles) {
            return None;
        }
        self.with_ring(|out| {
            if !out.fits_with_handles(n, packet.bytes.len()) {
                return None;
            }
            let stop = || self.is_disconnected();
            let mut opened = Vec::new();
            let mut export = || {
                let descs = self.conn.export_on_offers(&packet.handles)?;
                opened = descs.iter().map(|d| d.chan).collect();
                Some(descs.iter().map(frame::HandleDesc::encode).collect())
            };
            let stamp = self.conn.next_stamp();
            match out.write_with_handles(stamp, n, &packet.bytes, wait, &stop, &mut export) {
                Ok(true) => {
                    if out.gone_after_commit() {
                        // The receiver stopped reading, maybe before this record: close the
                        // channels it opens here (if it did read it, it closes them too, and
                        // the second close does nothing).
                        for id in opened {
                            self.conn.close_inbound(id);
                        }
                        return Some(Err(PushError::Disconnected));
                    }
                    Some(Ok(()))
                }
                Ok(false) => None,
                Err(e) => Some(Err(self.ring_error(e))),
            }
        })?
    }

    /// Runs `f` on the channel's ring (made on first use), under the ring's lock; `None` when
    /// the session has no shared memory or the ring could not be made.
    fn with_ring<T>(&self, f: impl FnOnce(&mut RingOut) -> T) -> Option<T> {
        if !self.conn.shm() {
            return None;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if let RingState::Unset = *ring {
            *ring = self.make_ring();
        }
        let RingState::Ready(out) = &mut *ring else {
            return None;
        };
        // The first use of an offered ring (the ring's lock makes it happen once).
        let first_use = self.fresh_offer.load(Ordering::Relaxed);
        if first_use {
            self.fresh_offer.store(false, Ordering::Relaxed);
        }
        let done = f(out);
        drop(ring);
        if first_use {
            // After the message: one offer to make anew, which the session's thread does.
            self.conn.offer_used();
        }
        Some(done)
    }

    /// A ring failure as a send error; a ring the peer broke ends the session.
    fn ring_error(&self, e: RingWriteError) -> PushError {
        match e {
            RingWriteError::Push(e) => e,
            RingWriteError::Corrupt(c) => {
                self.conn.fail(&format!("peer broke a channel's ring: {c}"));
                PushError::Disconnected
            }
        }
    }

    fn make_ring(&self) -> RingState {
        if !self.conn.shm() {
            return RingState::Unavailable;
        }
        let Ok((out, fd)) = RingOut::create() else {
            return RingState::Unavailable;
        };
        if self.conn.send_ring(self.id, fd).is_err() {
            return RingState::Unavailable;
        }
        self.keep_words(&out);
        RingState::Ready(out)
    }

    /// Commits the first `n` bytes of a slot this channel lent (or, with `None`, gives it back).
    fn finish_loan(&self, slot: LoanSlot, n: Option<usize>) {
        let reserved = Detached::from_raw(slot.key);
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if let RingState::Ready(out) = &*ring {
            match n {
                Some(n) => out.commit_loan(reserved, n),
                None => out.abandon_loan(reserved),
            }
        }
    }

    /// Waits for `cost` bytes of the peer's credit as `wait` allows.
    fn take_credit(&self, cost: u64, wait: Wait) -> Result<(), PushError> {
        loop {
            if self.is_disconnected() {
                return Err(PushError::Disconnected);
            }
            if self.try_spend(cost) {
                break;
            }
            if wait.expired() {
                let e = if matches!(wait, Wait::No) {
                    PushError::Full
                } else {
                    PushError::Timeout
                };
                return Err(e);
            }
            let me = thread::current();
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(me.clone());
            let ready = || self.has_credit() || self.is_disconnected();
            if !ready() && self.conn.drive(wait, &ready) != Drive::Progress {
                wait.park();
            }
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|t| t.id() != me.id());
        }
        // `send` may block in the write that follows (the peer is reading, or will be when it
        // next waits on the session); `try_send` and `send_timeout` must not, so they first
        // wait, within their deadline, for the socket to take bytes.
        if !matches!(wait, Wait::Forever) && !self.conn.wait_writable_until(wait) {
            self.grant(cost.min(u64::from(u32::MAX)) as u32);
            let e = if matches!(wait, Wait::No) {
                PushError::Full
            } else {
                PushError::Timeout
            };
            return Err(e);
        }
        Ok(())
    }
}

impl Outlet for OutChan {
    /// Sends one message: through the channel's ring when the session has shared memory,
    /// otherwise as a DATA frame, waiting for credit as `wait` allows.
    fn send(&self, packet: Packet, wait: Wait) -> Result<(), PushError> {
        if self.conn.shm() {
            if let Some(result) = self.send_handles_on_ring(&packet, wait) {
                // The packet's handles are duplicates: dropping them leaves the channels the
                // record opened to their new ends.
                return result;
            }
            // A tag and its frame need not pair up exactly between concurrent senders: every
            // frame's tag is in the ring before the frame is written, so each sender's own
            // messages still arrive in order.
            match self.send_shm(&packet, wait) {
                ShmSend::Done(result) => return result,
                ShmSend::Tagged => {
                    let reset = || self.reset.load(Ordering::Acquire);
                    return self.conn.send_data(self.id, packet, &reset);
                }
                ShmSend::NoRing => {}
            }
        }
        let cost = data_cost(packet.handles.len() * 16 + packet.bytes.len());
        // Take in what the peer already sent (credit, a reset), so that a dropped receiver
        // fails a send soon after its reset arrives.
        self.conn.poll_input_before_send();
        self.take_credit(cost, wait)?;
        let reset = || self.reset.load(Ordering::Acquire);
        self.conn.send_data(self.id, packet, &reset)
    }

    fn send_in_place(
        &self,
        estimate: usize,
        wait: Wait,
        encode: &mut dyn FnMut(*mut u8, usize) -> Option<usize>,
    ) -> Option<Result<(), PushError>> {
        self.with_ring(|out| {
            if estimate > out.max_archive() {
                return None;
            }
            let stop = || self.is_disconnected();
            match out.write_in_place(self.conn.next_stamp(), estimate, wait, &stop, encode) {
                Ok(true) => Some(Ok(())),
                Ok(false) => None,
                Err(e) => Some(Err(self.ring_error(e))),
            }
        })?
    }

    fn loan(&self, len: usize, wait: Wait) -> Option<Result<LoanSlot, PushError>> {
        let loaned = self.with_ring(|out| {
            if len > out.max_archive() {
                return None;
            }
            let stop = || self.is_disconnected();
            Some(out.loan(self.conn.next_stamp(), len, wait, &stop))
        })??;
        Some(match loaned {
            Ok((reserved, at)) => Ok(LoanSlot {
                at,
                len,
                key: reserved.into_raw(),
            }),
            Err(e) => Err(self.ring_error(e)),
        })
    }

    fn commit_loan(&self, slot: LoanSlot, n: usize) {
        assert!(n <= slot.len, "loan commit past its end");
        self.finish_loan(slot, Some(n));
    }

    fn abandon_loan(&self, slot: LoanSlot) {
        self.finish_loan(slot, None);
    }

    fn max_message(&self) -> usize {
        self.conn.limits.max_message as usize
    }

    fn is_disconnected(&self) -> bool {
        self.reset.load(Ordering::Acquire) || self.conn.cannot_send() || self.ring_gone()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for OutChan {
    fn drop(&mut self) {
        if self.offer != 0 {
            // Kept before the channel closes, which lets the peer hand the ring back. The
            // close goes through the ring when it can: a record the receiving thread reads,
            // where a CLOSE frame would wake the peer's session thread.
            let ring = std::mem::replace(
                self.ring.get_mut().unwrap_or_else(|e| e.into_inner()),
                RingState::Unavailable,
            );
            if let RingState::Ready(ring) = ring {
                let stamp = self.conn.next_stamp();
                if self.conn.offer_closed(self.offer, self.id, ring, stamp) {
                    self.conn.forget_outbound(self.id);
                    return;
                }
            }
        }
        self.conn.close_outbound(self.id);
    }
}

/// Relays every message from `rx` to `tx` on a small thread, until either side ends. Used when
/// a handle crosses from one session to another (or a receiver leaves this process) and no
/// direct path exists.
pub(crate) fn spawn_proxy(rx: RecvCore, tx: SendCore) {
    let spawned = thread::Builder::new()
        .name("libchan-relay".into())
        .stack_size(128 * 1024)
        .spawn(move || loop {
            match rx.pop(Wait::Forever) {
                Ok(entry) => {
                    if let Some(c) = &entry.credit {
                        c.consumed(entry.body_len());
                    }
                    if tx.send(entry.into_packet(), Wait::Forever).is_err() {
                        return;
                    }
                }
                Err(PopError::Disconnected) => {
                    // The source broke: so does the channel behind the relay.
                    if let SendCore::Local(inbox) = &tx {
                        inbox.mark_broken();
                    }
                    return;
                }
                Err(_) => return,
            }
        });
    // Without a thread the relay cannot run: its ends drop here, so both sides see the
    // channel close rather than hang.
    drop(spawned);
}
