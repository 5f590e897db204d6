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

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use super::super::shm::{RingIn, RingOut, MAX_RING, MIN_RING, RING_CAPACITY};
use super::dispatch::Violation;
use super::Conn;
use crate::proto::frame;
use crate::ring::shm::ShmRegion;
use crate::ring::spsc::region_len;

/// Offers a side keeps out (made, not yet bound to a channel).
pub(super) const OFFERS: usize = 4;

/// Most offers a side accepts from its peer before it calls the peer broken.
pub(super) const MAX_OFFERS_IN: usize = 16;

/// Offer ids travel in 24 bits of a handle descriptor.
const MAX_OFFER_ID: u32 = (1 << 24) - 1;

/// This side's offers.
#[derive(Default)]
pub(super) struct OffersOut {
    /// The last offer id used (ids cycle through `1..=MAX_OFFER_ID`).
    last_id: u32,
    /// Offers the peer has not bound yet, by id.
    unbound: HashMap<u32, RingOut>,
    /// The peer has handed us a `Sender`: this session carries such channels, so it gets
    /// offers.
    wanted: bool,
    /// Offers still to make: [`OFFERS`] once the session wants them, and one more each time
    /// a bound offer's channel sends its first message.
    budget: usize,
}

/// The peer's offers, mapped, oldest first.
pub(super) type OffersIn = VecDeque<(u32, Arc<RingIn>)>;

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
            o.budget.min(OFFERS.saturating_sub(o.unbound.len()))
        };
        for _ in 0..want {
            let Ok((ring, fd)) = RingOut::create() else {
                return;
            };
            let id = self.next_offer_id();
            if !self.write_offer(id, &fd) {
                return;
            }
            let mut o = self.lock_offers_out();
            o.unbound.insert(id, ring);
            o.budget = o.budget.saturating_sub(1);
        }
    }

    /// The next offer id not in use.
    fn next_offer_id(&self) -> u32 {
        let mut o = self.lock_offers_out();
        loop {
            o.last_id = if o.last_id >= MAX_OFFER_ID {
                1
            } else {
                o.last_id + 1
            };
            if !o.unbound.contains_key(&o.last_id) {
                return o.last_id;
            }
        }
    }

    /// Writes OFFER `id` with its memfd if the socket takes it now.
    fn write_offer(self: &Arc<Self>, id: u32, fd: &OwnedFd) -> bool {
        let mut buf = Vec::with_capacity(24);
        frame::encode_offer(&mut buf, id, RING_CAPACITY as u64);
        self.try_write_now(&buf, fd.as_fd())
    }

    /// The peer bound our offer `id` (a SENDER_RING descriptor): its ring, now the channel's.
    pub(super) fn take_offer(&self, id: u32) -> Result<RingOut, Violation> {
        self.lock_offers_out()
            .unbound
            .remove(&id)
            .ok_or_else(|| Violation::from(format!("SENDER_RING names unknown ring offer {id}")))
    }

    /// A channel on one of our offers sent its first message: one offer to replace.
    pub(crate) fn offer_used(&self) {
        let mut o = self.lock_offers_out();
        o.budget = (o.budget + 1).min(OFFERS);
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
        if !capacity.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&capacity) {
            return Err(format!(
                "OFFER frame with capacity {capacity}, not a power of two in {MIN_RING}..={MAX_RING}"
            )
            .into());
        }
        {
            let offers = self.lock_offers_in();
            if offers.len() >= MAX_OFFERS_IN {
                return Err(Violation::limit(format!(
                    "more than {MAX_OFFERS_IN} ring offers outstanding"
                )));
            }
            if offers.iter().any(|(o, _)| *o == id) {
                return Err(format!("ring offer {id} made twice").into());
            }
        }
        let this = self.arc()?;
        let fd = fds
            .into_iter()
            .next()
            .ok_or("OFFER frame without its memfd")?;
        let region = ShmRegion::map(fd.as_fd(), region_len(capacity as usize))
            .map_err(|e| Violation::from(format!("cannot map an offered ring: {e}")))?;
        let ring = RingIn::attach(&this, region)
            .map_err(|e| Violation::from(format!("bad offered ring {id}: {e}")))?;
        self.lock_offers_in().push_back((id, ring));
        Ok(())
    }

    /// The peer's oldest offer, to bind to a channel we hand it a `Sender` of.
    pub(super) fn bind_offer(&self) -> Option<(u32, Arc<RingIn>)> {
        if !self.shm() {
            return None;
        }
        self.lock_offers_in().pop_front()
    }

    /// The session ended: unmap every offer, ours and the peer's.
    pub(super) fn drop_offers(&self) {
        let ours = std::mem::take(&mut self.lock_offers_out().unbound);
        let theirs = std::mem::take(&mut *self.lock_offers_in());
        drop((ours, theirs));
    }

    fn lock_offers_out(&self) -> std::sync::MutexGuard<'_, OffersOut> {
        self.offers_out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_offers_in(&self) -> std::sync::MutexGuard<'_, OffersIn> {
        self.offers_in.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::{pipe, Receiver, Sender, Session};

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
        // The answers used their offers: the worker replaces both.
        let replies = job(&jobs, 3);
        work(&rx, true);
        assert_eq!(*replies.recv().unwrap(), 6);
        eventually("used offers are replaced", || {
            offered(&coord) == OFFERS && unbound(&worker) == OFFERS
        });
    }

    #[test]
    fn unused_senders_use_up_offers_then_take_the_plain_path() {
        let (coord, worker) = Session::pair().unwrap();
        let jobs = coord.open_channel::<Job>().unwrap();
        let rx = worker.accept_channel::<Job>().unwrap();
        let replies = job(&jobs, 1);
        work(&rx, true);
        assert_eq!(*replies.recv().unwrap(), 2);
        eventually("offers arrive", || offered(&coord) == OFFERS);

        // Senders handed over and dropped unused: every one closes its channel, no offer is
        // made to replace the ones they took.
        for id in 0..3 * OFFERS as u64 {
            let replies = job(&jobs, id);
            work(&rx, false);
            assert!(
                replies.recv().is_err(),
                "an unused reply channel did not close"
            );
        }
        assert_eq!(offered(&coord), 0);
        assert_eq!(unbound(&worker), 0);
        // Without offers, a reply channel still works (its ring is announced as usual).
        let replies = job(&jobs, 7);
        work(&rx, true);
        assert_eq!(*replies.recv().unwrap(), 14);
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
