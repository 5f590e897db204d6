//! Incoming frames: every rule a peer can break is checked here, and a broken one becomes a
//! `Violation` that closes the session with a GOAWAY saying why.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::super::blob::Blob;
use super::super::chan::{InChan, OutChan};
use super::super::direct;
use super::super::pump::Pending;
use super::super::shm::{RingIn, MAX_RING, MIN_RING};
use crate::channel::{CreditSink, Entry, Handle, Inbox, RecvCore, SendCore, DEFAULT_CAPACITY};
use crate::message::{Bytes, Packet};
use crate::proto::credit::data_cost;
use crate::proto::decoder::Frame;
use crate::proto::frame::{
    self, GoAwayReason, HandleDesc, HandleKind, Kind, Pumped, PumpedAs, ResetReason,
};
use crate::proto::{id_is_peers, DecodeError};
use crate::ring::shm::ShmRegion;
use crate::ring::spsc::region_len;

use super::{Conn, Table};

/// Why the peer's input was refused: a broken rule, or an exceeded limit (GOAWAY reason 2).
#[derive(Debug)]
pub(super) struct Violation {
    limits: bool,
    text: String,
}

impl Violation {
    /// What the peer did wrong.
    #[cfg(test)]
    pub(super) fn text(&self) -> &str {
        &self.text
    }

    pub(super) fn limit(text: impl Into<String>) -> Self {
        Self {
            limits: true,
            text: text.into(),
        }
    }
}

impl From<String> for Violation {
    fn from(text: String) -> Self {
        Self {
            limits: false,
            text,
        }
    }
}

impl From<&str> for Violation {
    fn from(text: &str) -> Self {
        text.to_string().into()
    }
}

impl From<DecodeError> for Violation {
    fn from(e: DecodeError) -> Self {
        let limits = matches!(
            e,
            DecodeError::FrameTooLarge { .. }
                | DecodeError::MessageTooLarge { .. }
                | DecodeError::TooManyFds { .. }
                | DecodeError::TooManyHandles { .. }
        );
        Self {
            limits,
            text: e.to_string(),
        }
    }
}

impl Conn {
    /// Handles one frame from the peer. An `Err` is a protocol violation.
    pub(super) fn dispatch(&self, frame: Frame<'_>) -> Result<(), Violation> {
        let Frame { header, body, fds } = frame;
        match header.kind {
            Kind::Open => {
                let fp = frame::parse_open(body)?;
                let this = self.arc()?;
                let mut t = self.lock_table();
                self.check_new_peer_id(&t, header.chan)?;
                let inbox = Inbox::new(DEFAULT_CAPACITY);
                let rx = RecvCore::new(inbox.clone());
                inbox.add_feed(this.clone());
                t.inbound
                    .insert(header.chan, InChan::new(&this, header.chan, inbox));
                t.accepts.push_back((header.chan, fp, rx));
                let waiters = std::mem::take(&mut t.accept_waiters);
                drop(t);
                waiters.into_iter().for_each(|t| t.unpark());
                Ok(())
            }
            Kind::Data => self.dispatch_data(header.chan, &header, body, fds),
            Kind::Close => {
                self.closes_heard.fetch_add(1, Ordering::Relaxed);
                self.close_inbound(header.chan);
                // Only the peer's CLOSE says it writes no more into the channel's ring.
                self.offer_ring_closed(header.chan);
                Ok(())
            }
            Kind::Ring => self.dispatch_ring(header.chan, body, fds),
            Kind::Blob => self.dispatch_blob(header.chan, body, fds),
            Kind::Offer => self.dispatch_offer(header.arg, body, fds),
            Kind::Forget => self.dispatch_forget(header.arg),
            Kind::Intro => self.dispatch_intro(header.chan, header.arg, body, fds),
            Kind::Join => self.dispatch_join(header.chan, header.arg, body),
            Kind::Reset => {
                frame::parse_reset(&header, body)?;
                self.resets_heard.fetch_add(1, Ordering::Relaxed);
                if let Some(o) = self.outbound(header.chan) {
                    o.mark_reset();
                }
                Ok(())
            }
            Kind::Credit => {
                if let Some(o) = self.outbound(header.chan) {
                    o.grant(header.arg);
                }
                Ok(())
            }
            Kind::Ping => {
                let opaque = frame::parse_ping(body)?;
                let mut buf = Vec::with_capacity(24);
                frame::encode_pong(&mut buf, opaque);
                self.send_control(&buf);
                Ok(())
            }
            Kind::Pong => Ok(()),
            Kind::GoAway => {
                let (_, text) = frame::parse_goaway(&header, body)?;
                self.fail(&format!("peer closed the session: {text}"));
                Ok(())
            }
        }
    }

    /// Channel `chan`, which the peer sends on, is closed: by the peer's CLOSE, or (a channel
    /// opened by a ring record the peer never read) by us. Closing one that is not open does
    /// nothing.
    pub(crate) fn close_inbound(&self, chan: u32) {
        let c = {
            let mut t = self.lock_table();
            if t.reset_inbound.remove(&chan) {
                None
            } else {
                t.inbound.remove(&chan)
            }
        };
        if let Some(c) = c {
            if let Some(ring) = c.ring.get() {
                ring.mark_closed();
            }
            c.inbox.remove_feed(self, false);
        }
    }

    pub(super) fn dispatch_data(
        &self,
        chan: u32,
        header: &frame::Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Violation> {
        let (descs, payload) = frame::parse_data(header, body)?;
        let cost = data_cost(body.len());
        if payload.len() > self.limits.max_message as usize {
            return Err(Violation::limit(format!(
                "message of {} bytes exceeds the limit of {}",
                payload.len(),
                self.limits.max_message
            )));
        }
        let this = self.arc()?;
        let mut t = self.lock_table();
        // DATA on a channel we reset is discarded, but its descriptors still open their
        // channels (the peer may already send on them): they are made and dropped at once.
        let inchan = if t.reset_inbound.contains(&chan) {
            None
        } else {
            let c = t
                .inbound
                .get(&chan)
                .cloned()
                .ok_or_else(|| Violation::from(format!("data on unknown channel {chan}")))?;
            c.handle_data(cost).map_err(Violation::limit)?;
            Some(c)
        };
        let gets_senders = descs
            .clone()
            .any(|d| matches!(d.kind, HandleKind::Sender | HandleKind::SenderRing));
        let mut fds = fds.into_iter();
        let mut handles = Vec::with_capacity(descs.len());
        let mut pumps = Vec::new();
        for d in descs {
            match self.import(&mut t, &this, d, &mut fds, &mut pumps) {
                Ok(h) => handles.push(h),
                Err(v) => {
                    // Dropping a handle may end its channel, which takes the table's lock.
                    drop(t);
                    drop((handles, pumps));
                    return Err(v);
                }
            }
        }
        let Some(inchan) = inchan else {
            drop(t);
            drop((handles, pumps));
            // Discarded, but its credit goes back so the peer's window stays honest.
            let mut buf = Vec::with_capacity(16);
            frame::encode_credit(&mut buf, chan, cost.min(u64::from(u32::MAX)) as u32);
            self.send_control(&buf);
            return Ok(());
        };
        let mut bytes = Bytes::with_capacity(payload.len());
        bytes.extend_from_slice(payload);
        let entry = Entry {
            packet: Packet { bytes, handles },
            credit: Some(inchan.clone()),
            lent: None,
        };
        let refused = match inchan.ring.get() {
            // The ring holds this message's place: it waits there.
            Some(ring) => ring.push_socket(entry).err(),
            None => inchan.inbox.push_from_feed(entry).err(),
        };
        drop(t);
        if let Some(entry) = refused {
            // Nobody receives any more: return the credit and close the handles (a pumped
            // stream's channels end unpumped).
            inchan.consumed(entry.body_len());
            drop((entry, pumps));
            return Ok(());
        }
        for p in pumps {
            p.start();
        }
        if gets_senders {
            // The peer hands us senders: offer rings for the next ones (after the delivery,
            // which they must not delay).
            this.top_up_offers(true);
        }
        Ok(())
    }

    /// Turns one handle descriptor of a DATA frame into the handle the message gets, opening
    /// the channels it names. Called under the table's lock (`t`); a pumped stream's pump is
    /// left in `pumps`, to start once the lock is released.
    pub(super) fn import(
        &self,
        t: &mut Table,
        this: &Arc<Conn>,
        d: HandleDesc,
        fds: &mut impl Iterator<Item = OwnedFd>,
        pumps: &mut Vec<Pending>,
    ) -> Result<Handle, Violation> {
        Ok(match d.kind {
            HandleKind::Fd => Handle::Fd(fds.next().ok_or("missing fd")?),
            HandleKind::Stream => Handle::Stream(fds.next().ok_or("missing fd")?),
            HandleKind::Sender => {
                self.check_new_peer_id(t, d.chan)?;
                let o = OutChan::new(this.clone(), d.chan);
                t.outbound.insert(d.chan, Arc::downgrade(&o));
                Handle::Sender(SendCore::Remote(o), d.fingerprint)
            }
            HandleKind::SenderRing => {
                self.check_new_peer_id(t, d.chan)?;
                let ring = self.take_offer(d.offer)?;
                let o = OutChan::on_offer(this.clone(), d.chan, ring, d.offer);
                t.outbound.insert(d.chan, Arc::downgrade(&o));
                Handle::Sender(SendCore::Remote(o), d.fingerprint)
            }
            HandleKind::Receiver => {
                self.check_new_peer_id(t, d.chan)?;
                let inbox = Inbox::new(DEFAULT_CAPACITY);
                let rx = RecvCore::new(inbox.clone());
                inbox.add_feed(this.clone());
                t.inbound.insert(d.chan, InChan::new(this, d.chan, inbox));
                Handle::Receiver(rx, d.fingerprint)
            }
            HandleKind::SenderLocal => {
                if id_is_peers(d.chan, self.we_connected) {
                    return Err(format!("sender-local handle names peer channel {}", d.chan).into());
                }
                let inbox = match t.inbound.get(&d.chan) {
                    Some(c) => c.inbox.clone(),
                    // Our receiver is gone: the sender is born disconnected.
                    None => {
                        let inbox = Inbox::new(1);
                        drop(RecvCore::new(inbox.clone()));
                        inbox
                    }
                };
                Handle::Sender(SendCore::local(inbox), d.fingerprint)
            }
            HandleKind::SenderDirect => {
                if !self.shm() {
                    return Err("SENDER_DIRECT handle on a session without shared memory".into());
                }
                let sock = fds.next().ok_or("missing fd")?;
                // The direct session is made on a thread: its sends wait for it.
                let out = direct::connect(self, sock, d.chan, d.fingerprint);
                Handle::Sender(SendCore::Remote(out), d.fingerprint)
            }
            HandleKind::Pumped => {
                let p = d.as_pumped().ok_or("malformed pumped handle")?;
                self.import_pumped(t, this, p, pumps)?
            }
        })
    }

    /// A PUMPED descriptor: the application gets one end of a socket pair; the pump moves the
    /// bytes between ours and the two channels the descriptor opens.
    fn import_pumped(
        &self,
        t: &mut Table,
        this: &Arc<Conn>,
        p: Pumped,
        pumps: &mut Vec<Pending>,
    ) -> Result<Handle, Violation> {
        self.check_new_peer_id(t, p.to_reader)?;
        self.check_new_peer_id(t, p.to_writer)?;
        // Both checks counted the table without the other channel.
        if t.inbound.len() + t.outbound.len() + 1 >= self.limits.max_channels as usize {
            return Err(Violation::limit("too many channels"));
        }
        // Out of descriptors, the message cannot be delivered as sent: as when SCM_RIGHTS
        // loses descriptors, the session ends.
        let (theirs, ours) = UnixStream::pair()
            .map_err(|e| Violation::from(format!("no socket pair for a pumped stream: {e}")))?;
        let inbox = Inbox::new(1);
        let rx = RecvCore::new(inbox.clone());
        inbox.add_feed(this.clone());
        t.inbound
            .insert(p.to_reader, InChan::new(this, p.to_reader, inbox));
        let o = OutChan::new(this.clone(), p.to_writer);
        t.outbound.insert(p.to_writer, Arc::downgrade(&o));
        // Refused when the session runs too many pumps: the channels end once the lock is
        // released, and `theirs` reads EOF at once.
        pumps.push(Pending::new(OwnedFd::from(ours), o, rx));
        let theirs = OwnedFd::from(theirs);
        Ok(match p.kind {
            PumpedAs::Fd => Handle::Fd(theirs),
            PumpedAs::Stream => Handle::Stream(theirs),
        })
    }

    /// A RING frame: from now on the peer sends `chan`'s messages through the ring in `fds`.
    fn dispatch_ring(&self, chan: u32, body: &[u8], fds: Vec<OwnedFd>) -> Result<(), Violation> {
        let attached = self.attach_ring(chan, body, fds);
        // Counted whatever became of it: the peer's records are stamped with its count.
        self.ring_seen();
        attached
    }

    fn attach_ring(&self, chan: u32, body: &[u8], fds: Vec<OwnedFd>) -> Result<(), Violation> {
        if !self.shm() {
            return Err("RING frame on a session without shared memory".into());
        }
        let capacity = frame::parse_ring(body)?;
        let inchan = {
            let t = self.lock_table();
            if t.reset_inbound.contains(&chan) {
                // We already refused the channel: its ring is not needed.
                return Ok(());
            }
            t.inbound
                .get(&chan)
                .cloned()
                .ok_or_else(|| Violation::from(format!("RING frame on unknown channel {chan}")))?
        };
        let ring = self.attach_peer_ring("RING", capacity, fds)?;
        if inchan.ring.set(ring.clone()).is_err() {
            return Err(format!("second RING frame on channel {chan}").into());
        }
        inchan.inbox.add_lane(ring);
        Ok(())
    }

    /// Maps the ring of `capacity` data bytes in the one memfd of a RING or OFFER frame (named by
    /// `kind`) and attaches to it as its consumer.
    pub(super) fn attach_peer_ring(
        &self,
        kind: &str,
        capacity: u64,
        fds: Vec<OwnedFd>,
    ) -> Result<Arc<RingIn>, Violation> {
        if !capacity.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&capacity) {
            return Err(format!(
                "{kind} frame with capacity {capacity}, not a power of two in {MIN_RING}..={MAX_RING}"
            )
            .into());
        }
        let this = self.arc()?;
        let fd = fds
            .into_iter()
            .next()
            .ok_or_else(|| format!("{kind} frame without its memfd"))?;
        let region = ShmRegion::map(fd.as_fd(), region_len(capacity as usize))
            .map_err(|e| Violation::from(format!("cannot map the ring of a {kind} frame: {e}")))?;
        RingIn::attach(&this, region)
            .map_err(|e| Violation::from(format!("bad ring in a {kind} frame: {e}")))
    }

    /// A BLOB frame: `chan`'s next message is the archive in the sealed memfd in `fds`.
    fn dispatch_blob(&self, chan: u32, body: &[u8], fds: Vec<OwnedFd>) -> Result<(), Violation> {
        if !self.shm() {
            return Err("BLOB frame on a session without shared memory".into());
        }
        let len = frame::parse_blob(body)?;
        if len > u64::from(self.limits.max_message) {
            return Err(Violation::limit(format!(
                "message of {len} bytes exceeds the limit of {}",
                self.limits.max_message
            )));
        }
        let len = len as usize;
        let cost = data_cost(len);
        let inchan = {
            let t = self.lock_table();
            if t.reset_inbound.contains(&chan) {
                drop(t);
                // Discarded, but its credit goes back so the peer's window stays honest.
                let mut buf = Vec::with_capacity(16);
                frame::encode_credit(&mut buf, chan, cost.min(u64::from(u32::MAX)) as u32);
                self.send_control(&buf);
                return Ok(());
            }
            t.inbound
                .get(&chan)
                .cloned()
                .ok_or_else(|| Violation::from(format!("BLOB frame on unknown channel {chan}")))?
        };
        let ring = inchan.ring.get().cloned().ok_or_else(|| {
            Violation::from(format!("BLOB frame on channel {chan} without a ring"))
        })?;
        inchan.handle_data(cost).map_err(Violation::limit)?;
        let fd = fds
            .into_iter()
            .next()
            .ok_or("BLOB frame without its memfd")?;
        let blob = Blob::map(&fd, len)
            .map_err(|e| Violation::from(format!("bad large-message memfd: {e}")))?;
        drop(fd);
        let entry = Entry {
            packet: Packet {
                bytes: Bytes::new(),
                handles: Vec::new(),
            },
            credit: Some(inchan.clone()),
            lent: Some(blob.lend()),
        };
        if let Err(entry) = ring.push_socket(entry) {
            inchan.consumed(entry.body_len());
        }
        Ok(())
    }

    /// An INTRO frame: the process at the other end of the socket in `fds` will feed `chan`
    /// too, over a session of its own (a direct path).
    fn dispatch_intro(
        &self,
        chan: u32,
        token: u32,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Violation> {
        if !self.shm() {
            return Err("INTRO frame on a session without shared memory".into());
        }
        let fingerprint = frame::parse_intro(body)?;
        let sock = fds
            .into_iter()
            .next()
            .ok_or("INTRO frame without its socket")?;
        let inbox = self
            .lock_table()
            .inbound
            .get(&chan)
            .map(|c| c.inbox.clone());
        match inbox {
            Some(inbox) => direct::accept(self, inbox, token, fingerprint, sock),
            // A channel we reset or already finished (as for CLOSE): closing the socket fails
            // the introduced sender's handshake, so it is born disconnected.
            None => drop(sock),
        }
        Ok(())
    }

    /// A JOIN frame, the first on a session made from an INTRO's socket: the peer's new
    /// channel `chan` feeds the introduced channel's inbox.
    fn dispatch_join(&self, chan: u32, token: u32, body: &[u8]) -> Result<(), Violation> {
        let fingerprint = frame::parse_join(body)?;
        let this = self.arc()?;
        let joined = direct::joined(self.link.fd().as_raw_fd(), token)
            .ok_or("JOIN frame that answers no introduction")?;
        let mut t = self.lock_table();
        if let Err(v) = self.check_new_peer_id(&t, chan) {
            drop(t);
            // The introduced sender will never feed the channel.
            joined.inbox().mark_broken();
            return Err(v);
        }
        let refused = if fingerprint != joined.fingerprint {
            Some((ResetReason::TypeMismatch, "message type mismatch"))
        } else if joined.inbox().add_feed(this.clone()) {
            let c = InChan::new(&this, chan, joined.inbox().clone());
            t.inbound.insert(chan, c);
            None
        } else {
            Some((ResetReason::ReceiverGone, "receiver dropped"))
        };
        if refused.is_some() {
            t.reset_inbound.insert(chan);
        }
        drop(t);
        if let Some((reason, text)) = refused {
            let mut buf = Vec::new();
            frame::encode_reset(&mut buf, chan, reason, text);
            self.send_control(&buf);
        }
        // The new feed holds the channel open now: the placeholder may go.
        drop(joined);
        Ok(())
    }

    /// The live channel we send on as `id`, if any (CREDIT and RESET for others are ignored).
    pub(super) fn outbound(&self, id: u32) -> Option<Arc<OutChan>> {
        self.lock_table()
            .outbound
            .get(&id)
            .and_then(|w| w.upgrade())
    }

    pub(super) fn check_new_peer_id(&self, t: &Table, id: u32) -> Result<(), Violation> {
        if !id_is_peers(id, self.we_connected) {
            return Err(format!("channel id {id} belongs to this side").into());
        }
        if t.inbound.contains_key(&id)
            || t.outbound.contains_key(&id)
            || t.reset_inbound.contains(&id)
        {
            return Err(format!("channel id {id} is already in use").into());
        }
        if t.inbound.len() + t.outbound.len() >= self.limits.max_channels as usize {
            return Err(Violation::limit("too many channels"));
        }
        Ok(())
    }

    /// The `Arc` holding this session: channels opened by a frame keep the session alive.
    pub(super) fn arc(&self) -> Result<Arc<Conn>, Violation> {
        self.me
            .upgrade()
            .ok_or_else(|| Violation::from("session is shutting down"))
    }

    /// A violation by the peer: say why (GOAWAY), then close.
    pub(super) fn protocol_error(&self, v: Violation) {
        let mut buf = Vec::new();
        let text: String = v.text.chars().take(200).collect();
        let reason = if v.limits {
            GoAwayReason::Limits
        } else {
            GoAwayReason::ProtocolError
        };
        frame::encode_goaway(&mut buf, reason, &text);
        let _ = self.link.send(&[IoSlice::new(&buf)], &[]);
        let _ = self.link.flush();
        log::warn!(
            "libchan: cutting off {}: protocol violation: {}",
            self.peer(),
            v.text
        );
        // The GOAWAY must not be lost to a reset: the peer may still be sending what broke
        // the rules.
        self.link.cut_after_goaway();
        self.fail(&format!("protocol violation by peer: {}", v.text));
    }
}
