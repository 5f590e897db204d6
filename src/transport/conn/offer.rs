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
use std::time::{Duration, Instant};

use super::super::chan::InChan;
use super::super::direct;
use super::super::shm::{RingIn, RingOut, RING_CAPACITY};
use super::dispatch::Violation;
use super::Conn;
use crate::channel::{Feed, Handle, Inbox, Lane, SendCore};
use crate::proto::frame::{self, HandleDesc, HandleKind};

/// Offers a side keeps out (made, not yet bound to a channel).
pub(super) const OFFERS: usize = 4;

/// Most offers a side accepts from its peer before it calls the peer broken.
pub(super) const MAX_OFFERS_IN: usize = 16;

/// How long the session's thread waits before it tries again an offer the socket refused.
const OFFER_RETRY: Duration = Duration::from_millis(1);

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
    /// The socket refused an offer: no new try before this.
    retry_after: Option<Instant>,
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
            // Kept before the frame goes: the peer may bind it, and send a descriptor naming
            // it, as soon as the frame is written.
            let id = self.keep_offer(ring);
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

    /// Keeps `ring` as an unbound offer under the next id not in use, and returns the id.
    fn keep_offer(&self, ring: RingOut) -> u32 {
        let mut o = self.lock_offers_out();
        loop {
            o.last_id = if o.last_id >= MAX_OFFER_ID {
                1
            } else {
                o.last_id + 1
            };
            let id = o.last_id;
            if let std::collections::hash_map::Entry::Vacant(e) = o.unbound.entry(id) {
                e.insert(ring);
                return id;
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
        {
            let mut o = self.lock_offers_out();
            o.budget = (o.budget + 1).min(OFFERS);
        }
        // The session's thread makes it (it may be asleep in `poll`): offers are bound as
        // fast as jobs come, and messages read from rings do not wake it.
        self.interrupt();
    }

    /// Whether offers are due and may be tried now: the session's thread stops reading to make
    /// them.
    pub(super) fn offers_due(&self) -> bool {
        let o = self.lock_offers_out();
        o.wanted
            && o.budget > 0
            && o.unbound.len() < OFFERS
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
            if offers.len() >= MAX_OFFERS_IN {
                return Err(Violation::limit(format!(
                    "more than {MAX_OFFERS_IN} ring offers outstanding"
                )));
            }
            if offers.iter().any(|(o, _)| *o == id) {
                return Err(format!("ring offer {id} made twice").into());
            }
        }
        let ring = self.attach_peer_ring("OFFER", capacity, fds)?;
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
            let rings: Vec<_> = offers.drain(..targets.len()).collect();
            ids.into_iter().zip(rings).collect::<Vec<_>>()
        };
        let mut descs = Vec::with_capacity(targets.len());
        let mut lanes = Vec::new();
        for ((inbox, fingerprint), (id, (offer, ring))) in targets.into_iter().zip(bound) {
            if inbox.add_feed(self.clone()) {
                let c = InChan::new(self, id, inbox.clone());
                let _ = c.ring.set(ring.clone());
                t.inbound.insert(id, c);
                lanes.push((inbox.clone(), ring));
            } else {
                // The receiver is gone already: the channel is born closed. Its ring says so
                // to the peer's first send, and what it may send on the socket is discarded.
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
    use crate::ring::shm::ShmRegion;
    use crate::ring::spsc::region_len;
    use crate::{pipe, Options, Receiver, Sender, Session};

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
        let (coord, worker, jobs, rx) = warmed_up();

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
