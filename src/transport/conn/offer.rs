//! Ring offers: rings a shared-memory session makes ahead of time, so that a channel born by
//! handing a `Sender` to the peer has its ring from the start.
//!
//! A channel's sender makes the channel's ring and announces it (a RING frame) on its first
//! send. For a reply channel (a job carries a fresh `Sender`, the worker answers once on it)
//! that announcement is on the answer's path: the worker makes a memfd, and the coordinator's
//! session thread must wake, map it and hand the lane to the waiting receiver before the answer
//! can be read, two cross-core wake-ups more than the answer itself.
//!
//! Instead, the side that receives `Sender`s over the session (the worker) offers rings before
//! they are needed: OFFER frames, each with a memfd and an id, written by its session thread
//! after it delivers a message that carried a `Sender`. The peer maps each offer as a consumer
//! and keeps it. When it hands over a `Sender` later, it binds the oldest offer to the new
//! channel (a SENDER_RING descriptor names the offer), adds the ring as a lane of its inbox at
//! once, and the worker's first answer goes straight into a ring its receiver already reads.
//!
//! Offers are bounded on both sides: a side keeps at most [`OFFERS`] offers out, and refuses a
//! peer that has more than [`MAX_OFFERS_IN`] outstanding. It makes new ones only as fast as
//! bound offers are used (a channel's first send), so `Sender`s that are handed over and never
//! used (10 000 nested channels, say) take a few offers and then the plain path, with no ring
//! made for them.
//!
//! Rings are used again, with no frame of their own. When a channel bound to an offer has
//! closed (the maker's CLOSE arrived) and nothing on the binding side reads or holds its ring
//! any more, that side reads the ring to its end, releases it, and puts it back among the
//! maker's offers it holds, under the same id, to bind to its next `Sender`. The maker keeps
//! the ring of every channel on its offers that closed (before its CLOSE goes), so a
//! SENDER_RING may name it again; and it counts those that closed lately as offers out,
//! making new ones only while fewer than [`OFFERS`] are unbound or lately closed. A side that
//! will not bind a ring again (it holds enough) says so with FORGET, and both unmap it. A job
//! with a fresh reply `Sender` thus costs no memfd, mapping or unmapping once the session has
//! its few rings. Offer ids are never used twice in a session.
//!
//! Nor does it cost a frame: a channel on an offered ring closes through the ring (a TAG_CLOSE
//! record after its last message, which the receiving thread reads and acts on as the CLOSE
//! frame's dispatch would: `closed_in_ring`), and a receiver that goes first sets the ring's
//! *consumer gone* word instead of sending RESET. A frame would wake the other side's session
//! thread, on the cores the application runs on, for every job. A reader that went before the
//! record was written finds it when its side looks into such rings (`look_for_closes`); CLOSE
//! is still sent when the ring has no room for the record, or when the record is still unread
//! `GONE_CLOSE_WAIT` after a reader went (`settle_gone_closes`).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::chan::InChan;
use super::super::direct;
use super::super::shm::{record_tag, RingIn, RingOut, Stamp, RING_CAPACITY, TAG_CLOSE};
use super::dispatch::Violation;
use super::Conn;
use crate::channel::{Feed, Handle, Inbox, Lane, SendCore, Wait};
use crate::proto::frame::{self, HandleDesc, HandleKind};
use crate::ring::shm::ShmRegion;
use crate::ring::spsc::{Consumer, RECORD_ALIGN};

/// Offers a side keeps out (made, not yet bound to a channel, or bound to a channel that closed
/// lately). Eight, not four: with rings used again a job with a fresh reply channel takes a few
/// microseconds, less than a used ring takes to come back (the CLOSE must reach the peer's
/// session thread), and a job that finds no offer takes the socket path, tens of microseconds
/// more (ARCHITECTURE.md section 2.39).
pub(super) const OFFERS: usize = 8;

/// Most offers a side accepts from its peer before it calls the peer broken.
pub(super) const MAX_OFFERS_IN: usize = 16;

/// How long the session's thread waits before it tries again an offer the socket refused.
const OFFER_RETRY: Duration = Duration::from_millis(1);

/// How long the ring of a channel that closed on this side counts as an offer out: the peer
/// normally binds it again within microseconds of its CLOSE, once its receiver let go of the
/// ring. A ring the peer still holds after this (its application keeps the channel's receiver)
/// no longer stands in for a new offer.
const CLOSED_COUNTS: Duration = Duration::from_millis(20);

/// Rings of closed channels a side keeps for its peer before it stops making new offers: a
/// peer that neither binds them again nor forgets them (its application holds the channels'
/// receivers, or it breaks the protocol) does not make this side map rings without bound. Its
/// channels then take the plain path.
const MAX_CLOSED: usize = 64;

/// How long a channel closed through its ring after its reader went waits for the reader's
/// side to find the close record before it gets a CLOSE frame as well (see
/// `OffersOut::gone_closes`). The reader's side looks when it binds its next offer and on its
/// session thread's turn.
const GONE_CLOSE_WAIT: Duration = Duration::from_millis(50);

/// Offer ids travel in 24 bits of a handle descriptor.
const MAX_OFFER_ID: u32 = (1 << 24) - 1;

/// Rings of the peer's a side keeps to bind again: put back among its offers, or waiting for
/// the peer to close a channel whose reader here is gone. Past it, a ring is unmapped and the
/// peer hears FORGET.
pub(super) const MAX_KEPT: usize = 16;

/// This side's offers.
#[derive(Default)]
pub(super) struct OffersOut {
    /// The last offer id used: ids go up from 1 and are never reused in a session (at
    /// `MAX_OFFER_ID` no new ring is offered; the peer still binds the ones it has again).
    last_id: u32,
    /// Offers the peer has not bound yet, by id.
    unbound: HashMap<u32, RingOut>,
    /// Rings of channels on our offers that closed on this side, by id, with when: the peer
    /// binds them again (a SENDER_RING naming the id) or forgets them (FORGET).
    closed: HashMap<u32, (RingOut, Instant)>,
    /// The peer has handed us a `Sender`: this session carries such channels, so it gets
    /// offers.
    wanted: bool,
    /// Offers still to make: [`OFFERS`] once the session wants them, and one more each time
    /// a bound offer's channel sends its first message.
    budget: usize,
    /// The socket refused an offer: no new try before this.
    retry_after: Option<Instant>,
    /// Channels closed through their rings whose reader was gone when the close record went:
    /// it may have stopped before the record, and then learns of the close when its side
    /// looks into the ring (`look_for_closes`). If it has not after `GONE_CLOSE_WAIT` (it
    /// cannot look into a ring it unmapped), CLOSE goes (`settle_gone_closes`).
    gone_closes: Vec<GoneClose>,
}

/// A channel closed through its ring while its reader was gone (see `OffersOut::gone_closes`).
struct GoneClose {
    offer: u32,
    chan: u32,
    /// Where the close record ends in the ring.
    end: u64,
    at: Instant,
}

impl OffersOut {
    /// Offers out: unbound ones, and rings of channels that closed here lately, which the peer
    /// binds again (see [`CLOSED_COUNTS`]); all of them once [`MAX_CLOSED`] rings wait.
    fn out(&self) -> usize {
        if self.closed.len() >= MAX_CLOSED {
            return OFFERS;
        }
        let recent = self
            .closed
            .values()
            .filter(|(_, at)| at.elapsed() < CLOSED_COUNTS)
            .count();
        self.unbound.len() + recent
    }
}

/// The peer's offers we hold, mapped: the ones it made, and the rings of closed channels put
/// back (see `hand_back`).
#[derive(Default)]
pub(super) struct OffersIn {
    /// Offers the peer made (OFFER frames), oldest first: at most [`MAX_OFFERS_IN`].
    fresh: VecDeque<(u32, Arc<RingIn>)>,
    /// Rings put back, oldest first: at most [`MAX_KEPT`]. Bound before fresh offers, since
    /// their lines and pages are warm.
    recycled: VecDeque<(u32, Arc<RingIn>)>,
}

impl OffersIn {
    fn len(&self) -> usize {
        self.fresh.len() + self.recycled.len()
    }

    fn pop_front(&mut self) -> Option<(u32, Arc<RingIn>)> {
        self.recycled.pop_front().or_else(|| self.fresh.pop_front())
    }
}

/// The peer's rings bound to our channels, on their way back among its offers we hold.
#[derive(Default)]
pub(super) struct Returns {
    /// Channels bound to one of the peer's offers, by channel id.
    bound: HashMap<u32, BoundOffer>,
    /// Channels among them whose reader is gone while the peer had not closed them, with the
    /// ring still mapped: the peer's close record may come without a frame (its writer saw
    /// the reader gone after writing it), so `look_for_closes` looks into these rings.
    waiting: Vec<u32>,
    /// Rings put back among the offers so far.
    recycled: u64,
}

/// A channel bound to one of the peer's offers: its ring goes back among the offers once the
/// peer closed the channel and nothing here uses the ring any more.
struct BoundOffer {
    offer: u32,
    /// Keeps the ring mapped after the channel's reader (`RingIn`) is gone; `None` once it was
    /// unmapped for `MAX_KEPT`: the peer then hears FORGET when the channel closes.
    region: Option<ShmRegion>,
    /// The peer's CLOSE arrived: it writes no more.
    closed: bool,
    /// The reader is gone: nothing of the ring is held here.
    released: bool,
}

/// Reads a ring whose reader is gone to its end and releases it: what its receiver left
/// unread, which nobody will read. Returns whether a TAG_CLOSE record was among it; `None`
/// for a broken ring, or one that does not end within a lap and a record (a peer that keeps
/// writing into it must not keep this thread here). Copies each record out, as for an
/// untrusted peer.
fn drain_gone_ring(cons: &mut Consumer<ShmRegion>) -> Option<bool> {
    let mut closed = false;
    for _ in 0..=cons.capacity() / RECORD_ALIGN {
        let Some(rec) = cons.pop().ok()? else {
            cons.release();
            return Some(closed);
        };
        closed |= record_tag(&cons.to_vec(rec)) == Some(TAG_CLOSE);
    }
    None
}

impl Conn {
    /// Makes the offers the budget allows, keeping at most [`OFFERS`] out; `sender_arrived`
    /// says the peer just handed us a `Sender` (the first one starts the offers). Runs on the
    /// session's own thread, so it never waits for the socket: an offer the socket does not
    /// take at once is dropped and stays in the budget, for the next call (the next message
    /// with a `Sender`, or the thread's next turn, within `CONTROL_POLL`).
    pub(super) fn top_up_offers(self: &Arc<Self>, sender_arrived: bool) {
        if !self.shm() || self.cannot_send() {
            return;
        }
        let want = {
            let mut o = self.lock_offers_out();
            if sender_arrived && !o.wanted {
                o.wanted = true;
                o.budget = OFFERS;
            }
            o.budget.min(OFFERS.saturating_sub(o.out()))
        };
        for _ in 0..want {
            let Ok((ring, fd)) = RingOut::create() else {
                return;
            };
            // Kept before the frame goes: the peer may bind it, and send a descriptor naming
            // it, as soon as the frame is written.
            let Some(id) = self.keep_offer(ring) else {
                return;
            };
            if !self.write_offer(id, &fd) {
                let mut o = self.lock_offers_out();
                o.unbound.remove(&id);
                o.retry_after = Some(Instant::now() + OFFER_RETRY);
                return;
            }
            let mut o = self.lock_offers_out();
            o.budget = o.budget.saturating_sub(1);
            o.retry_after = None;
        }
    }

    /// Keeps `ring` as an unbound offer under the next id, and returns the id; `None` (and the
    /// ring is dropped) once the session has used every id.
    fn keep_offer(&self, ring: RingOut) -> Option<u32> {
        let mut o = self.lock_offers_out();
        if o.last_id >= MAX_OFFER_ID {
            return None;
        }
        o.last_id += 1;
        let id = o.last_id;
        o.unbound.insert(id, ring);
        Some(id)
    }

    /// Channel `chan` on our offer `id` closed on this side (its `OutChan` is gone): keep its
    /// ring, which the peer may bind again, and close the channel through it, with a TAG_CLOSE
    /// record stamped `stamp` after its last message. Returns whether that record closes it:
    /// `false` when the ring had no room for it, and the caller sends the CLOSE frame. When
    /// the reader was gone already, and may have stopped before the record, the channel waits
    /// in `gone_closes` for the reader's side to find the record, or for a CLOSE frame (a
    /// channel closed both ways is closed once: the second close does nothing).
    pub(crate) fn offer_closed(&self, id: u32, chan: u32, ring: RingOut, stamp: Stamp) -> bool {
        if !self.shm() || self.cannot_send() {
            return false;
        }
        let mut o = self.lock_offers_out();
        // Kept before the record goes, under the same lock: the peer may bind the ring again
        // (SENDER_RING naming `id`, which `take_offer` looks up) as soon as it reads the record.
        let (ring, _) = o
            .closed
            .entry(id)
            .insert_entry((ring, Instant::now()))
            .into_mut();
        if ring
            .write(TAG_CLOSE, stamp, &[], Wait::No, &|| false)
            .is_err()
        {
            return false;
        }
        if ring.gone_after_commit() {
            let end = ring.position();
            o.gone_closes.push(GoneClose {
                offer: id,
                chan,
                end,
                at: Instant::now(),
            });
        }
        true
    }

    /// Sends CLOSE for the channels closed through their rings after their readers went
    /// (`OffersOut::gone_closes`) whose close record the peer has not read in
    /// `GONE_CLOSE_WAIT`. A ring the peer bound again, or forgot, was read to its end.
    /// Runs on the session's thread, at each of its turns.
    pub(super) fn settle_gone_closes(&self) {
        let late: Vec<u32> = {
            let mut o = self.lock_offers_out();
            if o.gone_closes.is_empty() {
                return;
            }
            let waiting = std::mem::take(&mut o.gone_closes);
            let mut late = Vec::new();
            for g in waiting {
                if g.at.elapsed() < GONE_CLOSE_WAIT {
                    o.gone_closes.push(g);
                    continue;
                }
                if let Some((ring, _)) = o.closed.get_mut(&g.offer) {
                    if !ring.read_through(g.end) {
                        late.push(g.chan);
                    }
                }
            }
            late
        };
        if !late.is_empty() && !self.is_dead() {
            let mut buf = Vec::with_capacity(16 * late.len());
            for chan in late {
                frame::encode_close(&mut buf, chan);
            }
            self.send_control(&buf);
        }
    }

    /// A TAG_CLOSE record closed channel `chan`, bound to one of the peer's offers: what its
    /// CLOSE frame would have done, done by the thread that read the record.
    pub(crate) fn closed_in_ring(&self, chan: u32) {
        self.close_inbound(chan);
        self.offer_ring_closed(chan);
    }

    /// A FORGET frame: the peer will not bind our offer `id` again; unmap its ring. (A FORGET
    /// for a ring we no longer keep does nothing.)
    pub(super) fn dispatch_forget(&self, id: u32) -> Result<(), Violation> {
        if !self.shm() {
            return Err("FORGET frame on a session without shared memory".into());
        }
        let ring = self.lock_offers_out().closed.remove(&id);
        drop(ring);
        Ok(())
    }

    /// Channel `chan` is bound to the peer's offer `offer`, read by `ring`: hand the ring back
    /// once the channel is closed and `ring` is gone.
    pub(super) fn track_bound_offer(&self, chan: u32, offer: u32, ring: &RingIn) {
        ring.bind(chan);
        let region = Some(ring.share_region());
        self.lock_returns().bound.insert(
            chan,
            BoundOffer {
                offer,
                region,
                closed: false,
                released: false,
            },
        );
    }

    /// The peer closed channel `chan` (its CLOSE arrived).
    pub(super) fn offer_ring_closed(&self, chan: u32) {
        self.offer_ring_progress(chan, |b| b.closed = true);
    }

    /// The reader of channel `chan`'s ring is gone (`RingIn` dropped).
    pub(crate) fn offer_ring_released(&self, chan: u32) {
        self.offer_ring_progress(chan, |b| b.released = true);
    }

    fn offer_ring_progress(&self, chan: u32, mark: impl FnOnce(&mut BoundOffer)) {
        let done = {
            let mut r = self.lock_returns();
            let Some(b) = r.bound.get_mut(&chan) else {
                return;
            };
            mark(b);
            if !b.closed {
                if b.released {
                    // The reader is gone and the peer still holds the channel open: keep at
                    // most `MAX_KEPT` such rings mapped, unmapping the rest now.
                    let waiting = r
                        .bound
                        .values()
                        .filter(|b| b.released && b.region.is_some())
                        .count();
                    if waiting > MAX_KEPT {
                        let unmapped = r.bound.get_mut(&chan).and_then(|b| b.region.take());
                        drop(r);
                        drop(unmapped);
                    } else {
                        r.waiting.push(chan);
                        self.returns_waiting.store(true, Ordering::Release);
                    }
                }
                return;
            }
            if !b.released {
                return;
            }
            r.bound.remove(&chan)
        };
        if let Some(b) = done {
            self.hand_back(b);
        }
    }

    /// Looks for the close record in the rings of channels whose reader is gone while the peer
    /// had them open (`Returns::waiting`): a peer that wrote it after our reader went sends no
    /// CLOSE at once (see `settle_gone_closes`). A ring that has it is closed, as by its
    /// CLOSE, and goes back among the offers. What else the ring holds, answers nobody will
    /// read, is released. Runs where no lock of the session is held: before a `Sender` binds
    /// an offer, and on the session thread's turn.
    pub(crate) fn look_for_closes(&self) {
        // A load first: this runs for every message that carries a `Sender`.
        if !self.returns_waiting.load(Ordering::Acquire)
            || !self.returns_waiting.swap(false, Ordering::AcqRel)
        {
            return;
        }
        let chans = std::mem::take(&mut self.lock_returns().waiting);
        for chan in chans {
            // Taken out of the entry while we look, so nothing else reads the ring meanwhile.
            let region = {
                let mut r = self.lock_returns();
                match r.bound.get_mut(&chan) {
                    Some(b) if b.released && !b.closed => b.region.take(),
                    _ => None,
                }
            };
            let Some(region) = region else {
                continue;
            };
            let closed = Self::close_record_in(&region);
            {
                let mut r = self.lock_returns();
                if let Some(b) = r.bound.get_mut(&chan) {
                    b.region = Some(region);
                    if !closed {
                        r.waiting.push(chan);
                        self.returns_waiting.store(true, Ordering::Release);
                    }
                }
            }
            if closed {
                self.closed_in_ring(chan);
            }
        }
    }

    /// Whether the ring in `region`, whose reader is gone, holds its channel's close record
    /// (read, with everything before it, and released).
    fn close_record_in(region: &ShmRegion) -> bool {
        // SAFETY: the channel's reader, the ring's only consumer on this side, is gone (its
        // `RingIn` dropped), and `look_for_closes` took the region out of the table while it
        // reads, so no other consumer is attached.
        let Ok(mut cons) = (unsafe { Consumer::attach(region.share()) }) else {
            return false;
        };
        drain_gone_ring(&mut cons).unwrap_or(false)
    }

    /// Puts the ring of a closed channel back among the peer's offers we hold: reads it to
    /// its end (records the reader left unread when its receiver went away), releases
    /// everything and clears its words, then attaches a new reader for the next channel bound
    /// to it. When that cannot be (too many offers held, a broken ring), the peer hears FORGET.
    fn hand_back(&self, b: BoundOffer) {
        if !self.shm() || self.cannot_send() {
            return;
        }
        let kept = b.region.and_then(|region| self.reuse(region));
        match kept {
            Some(ring) => {
                self.lock_offers_in().recycled.push_back((b.offer, ring));
                self.lock_returns().recycled += 1;
            }
            None => {
                let mut buf = Vec::with_capacity(16);
                frame::encode_forget(&mut buf, b.offer);
                self.send_control(&buf);
            }
        }
    }

    /// The ring in `region`, emptied and with a fresh reader, if it is to be kept.
    fn reuse(&self, region: ShmRegion) -> Option<Arc<RingIn>> {
        if self.lock_offers_in().recycled.len() >= MAX_KEPT {
            return None;
        }
        let this = self.arc().ok()?;
        // SAFETY: the channel's reader, the ring's only consumer on this side, is gone (its
        // `RingIn` dropped), and the peer's protocol attaches none.
        let mut cons = unsafe { Consumer::attach(region) }.ok()?;
        // A broken ring is not kept, nor one that does not end; the peer hears FORGET.
        drain_gone_ring(&mut cons)?;
        // The peer's side of the channel is gone too (its CLOSE arrived): nobody else uses the
        // ring's words until it is bound again.
        cons.reopen();
        RingIn::attach(&this, cons.into_region()).ok()
    }

    /// Writes OFFER `id` with its memfd if the socket takes it now.
    fn write_offer(self: &Arc<Self>, id: u32, fd: &OwnedFd) -> bool {
        let mut buf = Vec::with_capacity(24);
        frame::encode_offer(&mut buf, id, RING_CAPACITY as u64);
        self.try_write_now(&buf, fd.as_fd())
    }

    /// The peer bound our offer `id` (a SENDER_RING descriptor): its ring, now the channel's.
    pub(super) fn take_offer(&self, id: u32) -> Result<RingOut, Violation> {
        let mut o = self.lock_offers_out();
        // An offer not bound yet, or the ring of a closed channel the peer binds again.
        let closed = o.closed.remove(&id).map(|(ring, _)| ring);
        let ring = o.unbound.remove(&id).or(closed);
        ring.ok_or_else(|| Violation::from(format!("SENDER_RING names unknown ring offer {id}")))
    }

    /// A channel on one of our offers sent its first message: one offer to replace.
    pub(crate) fn offer_used(&self) {
        let due = {
            let mut o = self.lock_offers_out();
            o.budget = (o.budget + 1).min(OFFERS);
            o.out() < OFFERS
        };
        // The session's thread makes it (it may be asleep in `poll`): offers are bound as
        // fast as jobs come, and messages read from rings do not wake it. Not when enough
        // rings are out (rings of closed channels the peer binds again count): a wake-up per
        // job would put the session's thread on the application's cores for nothing.
        if due {
            self.interrupt();
        }
    }

    /// Whether offers are due and may be tried now: the session's thread stops reading to make
    /// them.
    pub(super) fn offers_due(&self) -> bool {
        let o = self.lock_offers_out();
        o.wanted
            && o.budget > 0
            && o.out() < OFFERS
            && o.retry_after.is_none_or(|t| Instant::now() >= t)
    }

    /// An OFFER frame: map the ring and keep it for the next `Sender` we hand over.
    pub(super) fn dispatch_offer(
        &self,
        id: u32,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Violation> {
        if !self.shm() {
            return Err("OFFER frame on a session without shared memory".into());
        }
        let capacity = frame::parse_offer(body)?;
        {
            let offers = self.lock_offers_in();
            if offers.fresh.len() >= MAX_OFFERS_IN {
                return Err(Violation::limit(format!(
                    "more than {MAX_OFFERS_IN} ring offers outstanding"
                )));
            }
            if offers
                .fresh
                .iter()
                .chain(&offers.recycled)
                .any(|(o, _)| *o == id)
            {
                return Err(format!("ring offer {id} made twice").into());
            }
        }
        let ring = self.attach_peer_ring("OFFER", capacity, fds)?;
        self.lock_offers_in().fresh.push_back((id, ring));
        Ok(())
    }

    /// The peer's oldest offer, to bind to a channel we hand it a `Sender` of.
    pub(super) fn bind_offer(&self) -> Option<(u32, Arc<RingIn>)> {
        if !self.shm() {
            return None;
        }
        self.lock_offers_in().pop_front()
    }

    /// Whether every one of `handles` can go out on an offer of the peer's inside a ring record
    /// (see [`export_on_offers`](Self::export_on_offers)), as far as a look without the locks
    /// tells.
    pub(crate) fn may_export_on_offers(&self, handles: &[Handle]) -> bool {
        self.shm()
            && handles.len() <= self.lock_offers_in().len()
            && handles.iter().all(|h| self.on_offer(h).is_some())
    }

    /// The inbox of a handle that can go out on an offer: a `Sender` into an inbox of ours that
    /// no other session feeds and that is not relayed anywhere (those take a relay or a direct
    /// path, section 2.26).
    fn on_offer<'h>(&self, h: &'h Handle) -> Option<(&'h Arc<Inbox>, u64)> {
        match h {
            Handle::Sender(SendCore::Local(inbox), fp)
                if !inbox.fed_by_other(self) && direct::relayed_to(inbox, *fp, self).is_none() =>
            {
                Some((inbox, *fp))
            }
            _ => None,
        }
    }

    /// Opens a channel for each of `handles` on an offer of the peer's, for a ring record that
    /// carries their SENDER_RING descriptors (TAG_HANDLES), and returns those. `None`, having
    /// done nothing, when one of them cannot go this way or there are not enough offers. The
    /// caller has reserved the record: it is written whatever becomes of these channels.
    pub(crate) fn export_on_offers(
        self: &Arc<Self>,
        handles: &[Handle],
    ) -> Option<Vec<HandleDesc>> {
        let targets: Vec<(&Arc<Inbox>, u64)> = handles
            .iter()
            .map(|h| self.on_offer(h))
            .collect::<Option<_>>()?;
        let mut t = self.lock_table();
        let bound = {
            let mut offers = self.lock_offers_in();
            if !self.shm() || offers.len() < targets.len() {
                return None;
            }
            let ids: Vec<u32> = targets
                .iter()
                .map(|_| t.ids.next())
                .collect::<Option<_>>()?;
            let rings: Vec<_> = (0..targets.len())
                .filter_map(|_| offers.pop_front())
                .collect();
            ids.into_iter().zip(rings).collect::<Vec<_>>()
        };
        let mut descs = Vec::with_capacity(targets.len());
        let mut lanes = Vec::new();
        for ((inbox, fingerprint), (id, (offer, ring))) in targets.into_iter().zip(bound) {
            if inbox.add_feed(self.clone()) {
                let c = InChan::new(self, id, inbox.clone());
                let _ = c.ring.set(ring.clone());
                t.inbound.insert(id, c);
                self.track_bound_offer(id, offer, &ring);
                lanes.push((inbox.clone(), ring));
            } else {
                // The receiver is gone already: the channel is born closed. Its ring says so
                // to the peer's first send, and what it may send on the socket is discarded.
                // Its ring still comes back once the peer closes the channel.
                self.track_bound_offer(id, offer, &ring);
                ring.discard();
                t.reset_inbound.insert(id);
            }
            descs.push(HandleDesc {
                kind: HandleKind::SenderRing,
                chan: id,
                fingerprint,
                offer,
            });
        }
        drop(t);
        // Before the record naming them is committed: the peer may send on them at once.
        for (inbox, ring) in lanes {
            inbox.add_lane(ring);
        }
        Some(descs)
    }

    /// Opens the channels of the descriptors a TAG_HANDLES ring record carries, on the thread
    /// that received the record: only SENDER_RING descriptors travel this way. `None` when
    /// the peer broke the protocol: the session is then ended (GOAWAY).
    pub(crate) fn import_from_ring(self: &Arc<Self>, descs: &[HandleDesc]) -> Option<Vec<Handle>> {
        let mut handles = Vec::with_capacity(descs.len());
        let mut t = self.lock_table();
        for d in descs {
            let imported = if d.kind == HandleKind::SenderRing {
                self.import(&mut t, self, *d, &mut std::iter::empty(), &mut Vec::new())
            } else {
                Err(format!("{:?} descriptor in a ring record", d.kind).into())
            };
            match imported {
                Ok(h) => handles.push(h),
                Err(v) => {
                    // Dropping a handle may end its channel, which takes the table's lock.
                    drop(t);
                    drop(handles);
                    self.protocol_error(v);
                    return None;
                }
            }
        }
        drop(t);
        // The peer hands us senders: it gets offers (made on the session's thread).
        let mut o = self.lock_offers_out();
        if !o.wanted {
            o.wanted = true;
            o.budget = OFFERS;
        }
        Some(handles)
    }

    /// The session ended: unmap every offer, ours and the peer's.
    pub(super) fn drop_offers(&self) {
        let ours = std::mem::take(&mut *self.lock_offers_out());
        let theirs = std::mem::take(&mut *self.lock_offers_in());
        let returns = std::mem::take(&mut *self.lock_returns());
        drop((ours, theirs, returns));
    }

    fn lock_offers_out(&self) -> std::sync::MutexGuard<'_, OffersOut> {
        self.offers_out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_returns(&self) -> std::sync::MutexGuard<'_, Returns> {
        self.returns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_offers_in(&self) -> std::sync::MutexGuard<'_, OffersIn> {
        self.offers_in.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::ring::shm::ShmRegion;
    use crate::ring::spsc::region_len;
    use crate::{pipe, Options, Receiver, Sender, Session, Trust};

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct Job {
        id: u64,
        reply: Sender<u64>,
    }

    /// Waits up to 10 s for `cond`: offers travel through the sessions' own threads.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn offered(s: &Session) -> usize {
        s.conn.lock_offers_in().len()
    }

    fn unbound(s: &Session) -> usize {
        s.conn.lock_offers_out().unbound.len()
    }

    /// Sends job `id` and returns the receiver of its reply.
    fn job(jobs: &Sender<Job>, id: u64) -> Receiver<u64> {
        let (reply, replies) = pipe();
        jobs.send(Job { id, reply }).unwrap();
        replies
    }

    /// The worker's side: takes the next job and answers it (or drops its reply sender).
    fn work(rx: &Receiver<Job>, answer: bool) {
        let m = rx.recv().unwrap();
        let reply = m.take(&m.reply).unwrap();
        if answer {
            reply.send(m.id.to_native() * 2).unwrap();
        }
    }

    #[test]
    fn senders_handed_over_bind_offered_rings() {
        let (coord, worker) = Session::pair().unwrap();
        assert!(coord.conn.shm(), "test needs a shared-memory session");
        let jobs = coord.open_channel::<Job>().unwrap();
        let rx = worker.accept_channel::<Job>().unwrap();
        assert_eq!(
            (offered(&coord), unbound(&worker)),
            (0, 0),
            "offers before any sender"
        );

        // The first sender the worker gets makes it offer rings.
        let replies = job(&jobs, 1);
        work(&rx, true);
        assert_eq!(*replies.recv().unwrap(), 2);
        eventually("the worker's offers reach the coordinator", || {
            offered(&coord) == OFFERS
        });
        assert_eq!(unbound(&worker), OFFERS);

        // The next sender binds one: its channel's ring is a lane already, and the answer
        // comes through it.
        let replies = job(&jobs, 2);
        assert_eq!(
            offered(&coord),
            OFFERS - 1,
            "the sender did not bind an offer"
        );
        work(&rx, true);
        assert_eq!(*replies.recv().unwrap(), 4);
        // The answers used their offers: the worker makes new ones, and the rings come back
        // once their channels closed and the coordinator let go of them.
        let replies = job(&jobs, 3);
        work(&rx, true);
        assert_eq!(*replies.recv().unwrap(), 6);
        drop(replies);
        eventually("used offers are replaced", || offered(&coord) >= OFFERS);
    }

    #[test]
    fn unused_senders_make_no_new_rings() {
        let (coord, worker, jobs, rx) = warmed_up();
        let before = rings_made(&worker);

        // Senders handed over and dropped unused: every one closes its channel, and its ring
        // comes back to be bound again; no new ring is made for them.
        for id in 0..3 * OFFERS as u64 {
            let replies = job(&jobs, id);
            work(&rx, false);
            assert!(
                replies.recv().is_err(),
                "an unused reply channel did not close"
            );
        }
        assert_eq!(rings_made(&worker), before, "unused senders made rings");

        // Senders handed over and kept unused (nested channels, say) take the offers out (and
        // the returned rings the worker still had) and then the plain path, still without new
        // rings.
        let mut kept = Vec::new();
        for id in 0..4 * OFFERS as u64 {
            let replies = job(&jobs, id);
            let m = rx.recv().unwrap();
            kept.push((replies, m.take(&m.reply).unwrap()));
        }
        assert_eq!(rings_made(&worker), before, "unused senders made rings");
        assert!(offered(&coord) <= OFFERS);
        // Without offers, a reply channel still works (its ring is announced as usual).
        let replies = job(&jobs, 7);
        work(&rx, true);
        assert_eq!(*replies.recv().unwrap(), 14);
    }

    /// Starts a coordinator and a worker session with the worker's offers made.
    fn warmed_up() -> (Session, Session, Sender<Job>, Receiver<Job>) {
        warmed_up_with(&Options::default())
    }

    fn warmed_up_with(opts: &Options) -> (Session, Session, Sender<Job>, Receiver<Job>) {
        let (coord, worker) = Session::pair_with(opts).unwrap();
        let jobs = coord.open_channel::<Job>().unwrap();
        let rx = worker.accept_channel::<Job>().unwrap();
        let replies = job(&jobs, 1);
        work(&rx, true);
        assert_eq!(*replies.recv().unwrap(), 2);
        // Read to the close: a receiver dropped earlier would send RESET, maybe after the
        // caller started counting frames.
        assert!(replies.recv().is_err());
        eventually("offers arrive", || offered(&coord) == OFFERS);
        (coord, worker, jobs, rx)
    }

    #[test]
    fn jobs_in_flight_with_offers_and_without_all_get_answers() {
        let (_coord, _worker, jobs, rx) = warmed_up();
        // More jobs in flight than offers: some senders travel inside ring records, the rest
        // in DATA frames once the offers run out.
        let replies: Vec<_> = (0..50).map(|id| job(&jobs, id)).collect();
        for _ in 0..50 {
            work(&rx, true);
        }
        for (id, r) in replies.iter().enumerate() {
            assert_eq!(*r.recv().unwrap(), 2 * id as u64);
        }
    }

    #[test]
    fn unread_jobs_close_their_reply_channels() {
        let (coord, worker, jobs, rx) = warmed_up();
        let replies: Vec<_> = (0..3).map(|id| job(&jobs, id)).collect();
        assert_eq!(
            offered(&coord),
            OFFERS - 3,
            "the senders did not go on offers"
        );
        // The worker goes away without reading them: their channels still close.
        drop(rx);
        for r in &replies {
            assert_eq!(
                r.recv_timeout(Duration::from_secs(10)).unwrap_err(),
                crate::RecvTimeoutError::Closed
            );
        }
        // And the jobs channel fails from now on.
        assert!(jobs
            .send(Job {
                id: 9,
                reply: pipe().0
            })
            .is_err());
        drop(worker);
    }

    #[test]
    fn an_answer_to_a_dropped_reply_receiver_fails() {
        let (coord, _worker, jobs, rx) = warmed_up();
        let replies = job(&jobs, 5);
        assert_eq!(offered(&coord), OFFERS - 1);
        // The receiver goes before the worker has opened the channel: its RESET reaches the
        // worker first, and the answer must still fail rather than vanish.
        drop(replies);
        std::thread::sleep(Duration::from_millis(50));
        let m = rx.recv().unwrap();
        let reply = m.take(&m.reply).unwrap();
        assert!(
            reply.send(1).is_err(),
            "an answer nobody can receive was accepted"
        );
    }

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct TwoWay {
        ok: Sender<u64>,
        err: Sender<String>,
    }

    #[test]
    fn a_message_with_two_senders_on_offers() {
        let (coord, worker) = Session::pair().unwrap();
        let jobs = coord.open_channel::<TwoWay>().unwrap();
        let rx = worker.accept_channel::<TwoWay>().unwrap();
        for round in 0..4 {
            let ((ok, oks), (err, errs)) = (pipe(), pipe());
            jobs.send(TwoWay { ok, err }).unwrap();
            let m = rx.recv().unwrap();
            m.take(&m.ok).unwrap().send(round).unwrap();
            m.take(&m.err)
                .unwrap()
                .send(format!("round {round}"))
                .unwrap();
            assert_eq!(*oks.recv().unwrap(), round);
            assert_eq!(errs.recv().unwrap().as_str(), format!("round {round}"));
            if round == 0 {
                eventually("offers arrive", || offered(&coord) == OFFERS);
            }
        }
    }

    #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct Req {
        n: u32,
        reply: Sender<u64>,
    }

    /// A proxy thread forwards requests, and so opens their reply channels from ring records
    /// while the session's thread makes offers: an offer must be known to its maker before the
    /// frame announcing it goes out (this lost one request in ten rounds when it was not).
    #[test]
    fn a_proxy_forwarding_senders_loses_no_reply() {
        for round in 0..20 {
            let (a, b) = Session::pair().unwrap();
            let front_tx = a.open_channel::<Req>().unwrap();
            let front_rx = b.accept_channel::<Req>().unwrap();
            let back_tx = a.open_channel::<Req>().unwrap();
            let back_rx = b.accept_channel::<Req>().unwrap();
            let proxy = std::thread::spawn(move || crate::copy(&front_rx, &back_tx));
            let server = std::thread::spawn(move || {
                for m in back_rx.iter() {
                    let reply = m.take(&m.reply).unwrap();
                    reply.send(u64::from(m.n.to_native()) * 2).unwrap();
                }
            });
            let (reply, replies) = pipe::<u64>();
            for n in 0..100 {
                let reply = reply.clone();
                front_tx.send(Req { n, reply }).unwrap();
                match replies.recv_timeout(Duration::from_secs(10)) {
                    Ok(v) => assert_eq!(*v, u64::from(n) * 2),
                    Err(e) => panic!("round {round}, request {n}: {e:?}"),
                }
            }
            drop(front_tx);
            assert_eq!(proxy.join().unwrap(), Ok(100));
            server.join().unwrap();
        }
    }

    #[test]
    fn reply_senders_in_ring_records_in_copy_out_mode() {
        let opts = Options::default().trust(crate::Trust::Untrusted);
        let (coord, _worker, jobs, rx) = warmed_up_with(&opts);
        assert!(coord.conn.shm() && coord.conn.copy_out());
        for id in 2..20 {
            let replies = job(&jobs, id);
            if id == 2 {
                assert_eq!(
                    offered(&coord),
                    OFFERS - 1,
                    "the sender did not take an offer"
                );
            }
            work(&rx, true);
            assert_eq!(*replies.recv().unwrap(), 2 * id);
        }
    }

    /// The worker's side, for a job whose reply receiver may be gone: answers if it can.
    fn work_if_wanted(rx: &Receiver<Job>) {
        let m = rx.recv().unwrap();
        let reply = m.take(&m.reply).unwrap();
        let _ = reply.send(m.id.to_native() * 2);
    }

    /// New rings the worker made so far (offer ids are never reused).
    fn rings_made(worker: &Session) -> u32 {
        worker.conn.lock_offers_out().last_id
    }

    /// Rings the coordinator put back among its offers so far.
    fn recycled(coord: &Session) -> u64 {
        coord.conn.lock_returns().recycled
    }

    /// What the two sides keep of rings between channels, within the bounds.
    fn assert_kept_within_bounds(coord: &Session, worker: &Session) {
        let o = worker.conn.lock_offers_out();
        assert!(o.unbound.len() <= OFFERS);
        assert!(o.closed.len() <= MAX_OFFERS_IN);
        assert!(offered(coord) <= MAX_OFFERS_IN);
    }

    #[test]
    fn reply_rings_come_back_and_are_offered_again() {
        let (coord, worker, jobs, rx) = warmed_up();
        let before = rings_made(&worker);
        for id in 0..200u64 {
            // Every job binds an offer (a busy machine may not have put one back yet).
            eventually("an offer to bind", || offered(&coord) > 0);
            let replies = job(&jobs, id);
            work(&rx, true);
            assert_eq!(*replies.recv().unwrap(), 2 * id);
        }
        eventually("the rings come back", || recycled(&coord) >= 190);
        // Without reuse every job's answer takes a ring of its own: 200.
        let fresh = rings_made(&worker) - before;
        assert!(fresh < 100, "{fresh} new rings for 200 jobs");
        assert_kept_within_bounds(&coord, &worker);
    }

    /// A reply channel on an offered ring closes through the ring: its receiver reads the
    /// answer, then `Closed`, and the coordinator's session hears no CLOSE frame (which would
    /// wake its thread for every job); the rings still come back.
    #[test]
    fn reply_channels_close_through_their_rings() {
        for opts in [Options::default(), Options::new().trust(Trust::Untrusted)] {
            let (coord, worker, jobs, rx) = warmed_up_with(&opts);
            let closes = coord.conn.closes_heard.load(Ordering::Relaxed);
            let recycled_before = recycled(&coord);
            for id in 0..100u64 {
                eventually("an offer to bind", || offered(&coord) > 0);
                let replies = job(&jobs, id);
                work(&rx, true);
                assert_eq!(*replies.recv().unwrap(), 2 * id);
                assert!(
                    matches!(replies.recv(), Err(crate::RecvError::Closed)),
                    "job {id}: the reply channel did not close"
                );
            }
            assert_eq!(
                coord.conn.closes_heard.load(Ordering::Relaxed) - closes,
                0,
                "reply channels closed by CLOSE frames"
            );
            eventually("the rings come back", || {
                recycled(&coord) - recycled_before >= 100
            });
            assert!(
                coord.conn.lock_table().inbound.len() <= 1,
                "channels left open"
            );
            assert_kept_within_bounds(&coord, &worker);
        }
    }

    /// A worker that answers, closes its reply channels and ends its session in order: the
    /// coordinator reads each answer, then `Closed` (not `Disconnected`), also when the
    /// session's end is seen before the close records are read.
    #[test]
    fn reply_channels_closed_before_the_session_ends_read_closed() {
        for opts in [Options::default(), Options::new().trust(Trust::Untrusted)] {
            let (coord, worker, jobs, rx) = warmed_up_with(&opts);
            let mut pending = Vec::new();
            for id in 0..4u64 {
                eventually("an offer to bind", || offered(&coord) > 0);
                pending.push((id, job(&jobs, id)));
                work(&rx, true);
            }
            drop((rx, worker));
            eventually("the coordinator sees the session end", || {
                coord.conn.is_dead()
            });
            for (id, replies) in pending {
                assert_eq!(*replies.recv().unwrap(), 2 * id);
                assert!(
                    matches!(replies.recv(), Err(crate::RecvError::Closed)),
                    "job {id}: the reply channel did not read Closed"
                );
            }
        }
    }

    /// A reply receiver dropped on an offered ring, right after its answer (before or after
    /// the close record came) or before the answer: no RESET, and no CLOSE frame unless the
    /// receiver went before the record; the worker's answer to a receiver already gone fails;
    /// nothing stays in either side's tables, and the rings come back.
    #[test]
    fn reply_receivers_go_without_a_reset() {
        for opts in [Options::default(), Options::new().trust(Trust::Untrusted)] {
            let (coord, worker, jobs, rx) = warmed_up_with(&opts);
            let resets = worker.conn.resets_heard.load(Ordering::Relaxed);
            let closes = coord.conn.closes_heard.load(Ordering::Relaxed);
            let recycled_before = recycled(&coord);
            for id in 0..150u64 {
                eventually("an offer to bind", || offered(&coord) > 0);
                let replies = job(&jobs, id);
                if id % 3 == 0 {
                    drop(replies);
                    let m = rx.recv().unwrap();
                    let reply = m.take(&m.reply).unwrap();
                    eventually("the worker sees the receiver gone", || {
                        reply.is_disconnected()
                    });
                    assert!(reply.send(1).is_err(), "job {id}: an answer to nobody");
                } else {
                    work(&rx, true);
                    assert_eq!(*replies.recv().unwrap(), 2 * id);
                }
            }
            assert_eq!(
                worker.conn.resets_heard.load(Ordering::Relaxed) - resets,
                0,
                "reply receivers sent RESET"
            );
            // The worker's close records after the receivers went are found by the next job
            // that binds an offer: no CLOSE frame, but perhaps for the last job or two (the
            // coordinator's session thread may look after the worker's gave up waiting).
            let frames = coord.conn.closes_heard.load(Ordering::Relaxed) - closes;
            assert!(frames <= 2, "{frames} CLOSE frames for 150 jobs");
            eventually("the rings come back", || {
                recycled(&coord) - recycled_before >= 150
            });
            eventually("no channel is left open on either side", || {
                let t = coord.conn.lock_table();
                t.inbound.len() <= 1 && t.reset_inbound.is_empty()
            });
            assert!(worker.conn.lock_table().outbound.len() <= 1);
            assert_kept_within_bounds(&coord, &worker);
        }
    }

    /// Reply receivers dropped with their answer unread (or before it came) leave it in the
    /// ring: the ring still comes back, read to its end, and whichever job gets it next reads
    /// only its own answer.
    #[test]
    fn rings_come_back_emptied_of_unread_answers() {
        for opts in [Options::default(), Options::new().trust(Trust::Untrusted)] {
            let (coord, worker, jobs, rx) = warmed_up_with(&opts);
            let before = rings_made(&worker);
            for id in 0..300u64 {
                eventually("an offer to bind", || offered(&coord) > 0);
                let replies = job(&jobs, id);
                match id % 3 {
                    0 => {
                        work(&rx, true);
                        drop(replies);
                    }
                    1 => {
                        drop(replies);
                        work_if_wanted(&rx);
                    }
                    _ => {
                        work(&rx, true);
                        assert_eq!(*replies.recv().unwrap(), 2 * id);
                    }
                }
            }
            // Rings did come back to be read again, and fewer new ones were made than jobs.
            eventually("the rings come back", || recycled(&coord) >= 250);
            let fresh = rings_made(&worker) - before;
            assert!(fresh < 150, "{fresh} new rings for 300 jobs");
            assert_kept_within_bounds(&coord, &worker);
        }
    }

    /// A `Sender` handed over after its receiver is gone binds an offer too (the channel is
    /// born closed); its ring comes back once the worker closes the channel.
    #[test]
    fn rings_of_channels_born_closed_come_back() {
        let (coord, _worker, jobs, rx) = warmed_up();
        for id in 0..20u64 {
            // An offer to bind (a busy machine may not have put one back yet).
            eventually("an offer to bind", || offered(&coord) > 0);
            let before = recycled(&coord);
            let (reply, replies) = pipe::<u64>();
            drop(replies);
            jobs.send(Job { id, reply }).unwrap();
            work_if_wanted(&rx);
            eventually("the ring of a channel born closed comes back", || {
                recycled(&coord) > before
            });
        }
    }

    /// Several coordinator threads and two worker threads at once, reply channels answered and
    /// read, answered and dropped unread, or dropped before their job: every answer read is its
    /// own job's, whichever ring it came through, in both trust modes.
    #[test]
    fn reply_rings_reused_under_concurrency_carry_only_their_answers() {
        for opts in [Options::default(), Options::new().trust(Trust::Untrusted)] {
            let (coord, worker, jobs, rx) = warmed_up_with(&opts);
            let rx = Arc::new(rx);
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let rx = rx.clone();
                    std::thread::spawn(move || {
                        while let Ok(m) = rx.recv() {
                            let reply = m.take(&m.reply).unwrap();
                            let _ = reply.send(m.id.to_native() * 2);
                        }
                    })
                })
                .collect();
            let clients: Vec<_> = (0..3u64)
                .map(|c| {
                    let jobs = jobs.clone();
                    std::thread::spawn(move || {
                        for n in 0..200u64 {
                            let id = c * 1_000 + n;
                            let (reply, replies) = pipe::<u64>();
                            match n % 4 {
                                0 => drop(replies),
                                _ => {
                                    jobs.send(Job { id, reply }).unwrap();
                                    if n % 4 == 1 {
                                        continue; // answered, dropped unread
                                    }
                                    let got = replies.recv_timeout(Duration::from_secs(10));
                                    assert_eq!(*got.unwrap(), 2 * id, "client {c} job {n}");
                                    continue;
                                }
                            }
                        }
                    })
                })
                .collect();
            for c in clients {
                c.join().unwrap();
            }
            drop(jobs);
            for w in workers {
                w.join().unwrap();
            }
            assert!(recycled(&coord) > 0, "no ring was used again");
            assert!(!coord.conn.is_dead() && !worker.conn.is_dead());
        }
    }

    /// More closed channels' rings than a side keeps: the rest are forgotten on both sides,
    /// and the kept ones still serve later jobs.
    #[test]
    fn rings_past_the_bound_are_forgotten_on_both_sides() {
        let (coord, worker, jobs, rx) = warmed_up();
        // Answered and closed, their answers unread: each ring waits for its receiver.
        let mut held = Vec::new();
        for id in 0..2 * MAX_KEPT as u64 {
            let replies = job(&jobs, id);
            work(&rx, true);
            held.push(replies);
            // Past `CLOSED_COUNTS`, closed rings no longer stand in for offers: the worker
            // makes new ones, so every job gets a ring of its own.
            std::thread::sleep(CLOSED_COUNTS + Duration::from_millis(5));
        }
        let closed = || worker.conn.lock_offers_out().closed.len();
        eventually("the worker keeps the closed rings", || {
            closed() >= MAX_KEPT + 4
        });
        drop(held);
        eventually("the rings past the bound are forgotten", || {
            closed() <= MAX_KEPT
        });
        assert!(coord.conn.lock_offers_in().recycled.len() <= MAX_KEPT);
        for id in 0..50 {
            let replies = job(&jobs, id);
            work(&rx, true);
            assert_eq!(*replies.recv().unwrap(), 2 * id);
        }
        assert!(!coord.conn.is_dead() && !worker.conn.is_dead());
    }

    /// Reply receivers dropped while the worker holds their senders, more than the rings the
    /// coordinator keeps mapped for them: when the worker then closes the channels through
    /// their rings, the coordinator finds the close records in the rings it kept, and the
    /// worker sends CLOSE for the others (whose records nobody reads); every channel ends on
    /// both sides.
    #[test]
    fn close_records_nobody_reads_are_followed_by_close_frames() {
        let (coord, worker, jobs, rx) = warmed_up();
        let mut senders = Vec::new();
        for id in 0..(MAX_KEPT + 8) as u64 {
            eventually("an offer to bind", || offered(&coord) > 0);
            let replies = job(&jobs, id);
            let m = rx.recv().unwrap();
            let reply = m.take(&m.reply).unwrap();
            // A first message on the ring, which lets the worker make the next offer.
            reply.send(id).unwrap();
            senders.push(reply);
            drop(replies);
        }
        let kept_unclosed = || coord.conn.lock_returns().bound.len();
        eventually("every receiver's ring is released", || {
            kept_unclosed() == MAX_KEPT + 8
        });
        let closes = coord.conn.closes_heard.load(Ordering::Relaxed);
        drop(senders);
        eventually("every channel ends on the coordinator's side", || {
            let t = coord.conn.lock_table();
            t.reset_inbound.is_empty() && t.inbound.len() <= 1 && kept_unclosed() == 0
        });
        eventually("and on the worker's", || {
            worker.conn.lock_offers_out().gone_closes.is_empty()
        });
        let frames = coord.conn.closes_heard.load(Ordering::Relaxed) - closes;
        assert!(
            (8..=MAX_KEPT as u64 + 8).contains(&frames),
            "{frames} CLOSE frames: 8 rings were unmapped"
        );
        assert!(!coord.conn.is_dead() && !worker.conn.is_dead());
    }

    /// A coordinator that holds the receivers of closed reply channels keeps their rings from
    /// coming back: the worker keeps them for it up to a bound, then stops making offers.
    #[test]
    fn rings_held_by_the_peer_stop_new_offers_at_a_bound() {
        let (_coord, worker, jobs, rx) = warmed_up();
        let closed = || worker.conn.lock_offers_out().closed.len();
        let mut held = Vec::new();
        let mut id = 0u64;
        let mut run = |held: &mut Vec<Receiver<u64>>| {
            let replies = job(&jobs, id);
            work(&rx, true);
            held.push(replies);
            id += 1;
            // Past `CLOSED_COUNTS`, so that only the bound stops the worker making offers.
            std::thread::sleep(CLOSED_COUNTS + Duration::from_millis(5));
        };
        while closed() < MAX_CLOSED {
            assert!(held.len() < 4 * MAX_CLOSED, "closed rings do not pile up");
            run(&mut held);
        }
        let at_bound = rings_made(&worker);
        for _ in 0..40 {
            run(&mut held);
        }
        // Without the bound, every one of these 40 jobs makes a ring.
        let more = rings_made(&worker) - at_bound;
        assert!(more <= OFFERS as u32, "{more} rings made past the bound");
        // Every answer is there, through an offered ring or the plain path.
        for (id, replies) in held.iter().enumerate() {
            assert_eq!(*replies.recv().unwrap(), 2 * id as u64);
        }
    }

    #[test]
    fn bad_offers_are_refused() {
        let (a, _b) = Session::pair().unwrap();
        let conn = &a.conn;
        let memfd = || ShmRegion::create(region_len(RING_CAPACITY)).unwrap().1;
        let capacity = (RING_CAPACITY as u64).to_le_bytes();
        let err = |r: Result<(), Violation>| r.unwrap_err().text().to_string();

        assert!(
            err(conn.dispatch_offer(1, &3u64.to_le_bytes(), vec![memfd()])).contains("capacity")
        );
        assert!(err(conn.dispatch_offer(1, &capacity, Vec::new())).contains("without its memfd"));
        // A FORGET of a ring we do not keep does nothing (it may cross our CLOSE's reuse).
        conn.dispatch_forget(12_345).unwrap();
        assert!(!conn.is_dead());
        conn.dispatch_offer(7, &capacity, vec![memfd()]).unwrap();
        assert!(err(conn.dispatch_offer(7, &capacity, vec![memfd()])).contains("twice"));
        for id in 8..7 + MAX_OFFERS_IN as u32 {
            conn.dispatch_offer(id, &capacity, vec![memfd()]).unwrap();
        }
        assert!(err(conn.dispatch_offer(99, &capacity, vec![memfd()])).contains("outstanding"));
        // A SENDER_RING naming an offer this side never made.
        assert!(conn.take_offer(5).is_err());
    }
}
