//! `Conn`: one session over a unix stream socket, driven by whichever thread needs it.
//!
//! There is no I/O thread. A thread that must wait on the session (a `recv` on a channel the
//! session feeds, a `send` short of credit, an `accept_channel`) takes the *reader seat* if it is
//! free and reads the socket itself, dispatching every frame it finds: its own message costs it
//! one kernel wake-up, not two (a cross-core wake-up costs ~33 us on the
//! virtual machines libchan is developed on). Threads that
//! find the seat taken park, and are unparked by the reader when their frame arrives or when it
//! leaves the seat.
//!
//! Frames are written by the sending thread under `writer`. Control frames produced while
//! reading (credit, close, reset, pong) go to `control` and are flushed by the next writer or
//! reader; they never block the thread that produced them.
//!
//! Lock order: `table` before any inbox lock; `writer` before `control`. No lock is held while
//! a handle is dropped (dropping one may close a channel and re-enter the session).

mod dispatch;
mod export;
mod offer;
mod write;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use super::chan::{InChan, OutChan};
use super::keepalive::{self, Keepalive};
use super::link::{Link, SocketLink};
use super::{Transport, Trust};
use crate::channel::{Drive, Feed, Inbox, PushError, RecvCore, Wait};
use crate::error::Error;
use crate::proto::decoder::Decoder;
use crate::proto::frame::{self, GoAwayReason, ResetReason};
use crate::proto::handshake::{Features, Handshake, Limits, Negotiated, HELLO_LEN};
use crate::proto::IdAllocator;
use crate::sys;

/// Most bytes of control frames (credit, close, reset, pong) queued for a peer that does not
/// read. Credit, close and reset frames are bounded by the channel table; PONGs are not.
const MAX_CONTROL_QUEUE: usize = 1 << 20;

pub(crate) struct Conn {
    me: std::sync::Weak<Conn>,
    link: Box<dyn Link>,
    we_connected: bool,
    pub(crate) limits: Negotiated,
    peer_uid: Option<u32>,
    reader: Mutex<Reader>,
    seat_waiters: Mutex<Vec<Thread>>,
    writer: Mutex<()>,
    control: Mutex<Vec<u8>>,
    table: Mutex<Table>,
    dead: AtomicBool,
    /// A flusher thread is running (see `spawn_flusher`).
    flushing: AtomicBool,
    /// Interrupts the reader's `poll` when a local sender fills an inbox it waits on.
    doorbell: sys::Doorbell,
    /// Writing failed (the peer closed): nothing more can be sent, but what the peer sent
    /// before it closed is still read and delivered.
    write_broken: AtomicBool,
    /// Both sides negotiated shared memory: channels move their messages through rings, and a
    /// thread of the session's own reads the socket.
    shm: bool,
    /// `Trust::Untrusted`: messages are copied out of the peer's rings before validation.
    copy_out: bool,
    /// Numbers every message sent through a ring, so a receiver reading several rings of this
    /// session keeps one thread's messages in order.
    send_seq: std::sync::atomic::AtomicU64,
    /// RING frames this side sent. Every ring record carries the count as of its writing, so
    /// a receiver holds back a record until it has seen that many RING frames: a message on a
    /// ring it does not know yet may come first.
    rings_sent: AtomicU32,
    /// RING frames dispatched from the peer.
    rings_seen: Arc<AtomicU32>,
    /// Rings this side offered the peer, not yet bound to a channel (see `offer`).
    offers_out: Mutex<offer::OffersOut>,
    /// The peer's ring offers, mapped, for the next `Sender` we hand over (see `offer`).
    offers_in: Mutex<offer::OffersIn>,
    /// The peer's rings bound to our channels, to be bound again once those close (see
    /// `offer`).
    returns: Mutex<offer::Returns>,
    /// `Returns::waiting` may hold channels: `look_for_closes` has something to look at.
    returns_waiting: AtomicBool,
    /// Rings holding back a record until more RING frames are dispatched.
    ring_waiters: Mutex<Vec<std::sync::Weak<super::shm::RingIn>>>,
    /// Pumped streams running on this session (`pump`, bounded by `pump::MAX_PER_SESSION`).
    pumps: AtomicU32,
    /// Network sessions: how the peer's presence is checked (see `keepalive`).
    keepalive: Option<Keepalive>,
    /// When bytes last arrived from the peer (`keepalive::now_ms`).
    last_heard: AtomicU64,
    /// When we last sent a PING (`keepalive::now_ms`).
    last_ping: AtomicU64,
    /// When a sender last read the socket before sending (`keepalive::now_ms`; see
    /// `poll_input_before_send`).
    polled_before_send: AtomicU64,
    /// CLOSE and RESET frames the peer sent (statistics: channels on offered rings close
    /// through the ring, and their receivers leave out RESET).
    pub(super) closes_heard: AtomicU64,
    pub(super) resets_heard: AtomicU64,
    /// Who the peer is, for log lines ("tcp 10.0.0.2:4711", "unix").
    peer: String,
}

struct Reader {
    dec: Decoder,
    fds: Vec<OwnedFd>,
}

struct Table {
    ids: IdAllocator,
    /// Channels the peer sends on and we receive.
    inbound: HashMap<u32, Arc<InChan>>,
    /// Inbound channels we reset: their data is discarded (its credit granted back) until the
    /// peer closes them.
    reset_inbound: HashSet<u32>,
    /// Channels we send on.
    outbound: HashMap<u32, std::sync::Weak<OutChan>>,
    /// Channels the peer opened that nobody accepted yet.
    accepts: VecDeque<(u32, u64, RecvCore)>,
    accept_waiters: Vec<Thread>,
    error: Option<String>,
}

impl Conn {
    /// Runs the handshake on a connected unix stream and returns the live session.
    pub(crate) fn establish(
        stream: UnixStream,
        we_connected: bool,
        local: Limits,
        trust: Trust,
        timeout: Duration,
    ) -> Result<Arc<Conn>, Error> {
        stream.set_nonblocking(true)?;
        let link = SocketLink::unix(OwnedFd::from(stream));
        Self::establish_on(Box::new(link), we_connected, local, trust, None, timeout)
    }

    /// Runs the handshake on a connected, non-blocking link and returns the live session,
    /// watched by `keepalive` if given.
    pub(crate) fn establish_on(
        link: Box<dyn Link>,
        we_connected: bool,
        local: Limits,
        trust: Trust,
        keepalive: Option<Keepalive>,
        timeout: Duration,
    ) -> Result<Arc<Conn>, Error> {
        let deadline = Instant::now() + timeout;
        let peer = peer_name(&*link);
        let result = Self::handshake(link, we_connected, local, trust, keepalive, deadline, peer);
        if let Err(e) = &result {
            log::warn!("libchan: handshake failed: {e}");
        }
        result
    }

    fn handshake(
        link: Box<dyn Link>,
        we_connected: bool,
        local: Limits,
        trust: Trust,
        keepalive: Option<Keepalive>,
        deadline: Instant,
        peer: String,
    ) -> Result<Arc<Conn>, Error> {
        let peer_uid = if link.carries_fds() {
            sys::peer_uid(link.fd()).ok()
        } else {
            None
        };
        let mut local = local;
        if !link.carries_fds() {
            // Descriptors (and the shared memory that travels as descriptors) need a unix
            // socket; across a network they are pumped as byte streams instead.
            local.features = local.features.without(Features::FDS).without(Features::SHM);
        }
        if trust == Trust::SameUid && peer_uid != Some(rustix::process::getuid().as_raw()) {
            // Shared memory only with a peer of our own uid: it is trusted to follow the ring
            // protocol (see docs/SECURITY.md). An untrusted peer may use it too, since every
            // message is then copied out of its ring before it is validated.
            local.features = local.features.without(Features::SHM);
        }
        let mut hs = Handshake::new(local);
        let hello = hs
            .poll_transmit()
            .expect("a fresh handshake has a hello to send");
        let mut sent = 0;
        while sent < HELLO_LEN {
            match link.send(&[IoSlice::new(&hello[sent..])], &[]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(&*link, false, deadline)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Read exactly the peer's hello: frames behind it are left for the decoder, and a read
        // that stops at the hello's end never swallows descriptors sent with the next frame.
        let mut buf = [0u8; HELLO_LEN];
        let mut got = 0;
        while hs.poll_outcome().is_none() {
            let mut fds = Vec::new();
            match link.recv(&mut buf[got..], &mut fds) {
                Ok(0) => return Err(Error::Handshake("peer closed during the handshake".into())),
                Ok(n) => {
                    if !fds.is_empty() {
                        return Err(Error::Handshake("descriptors sent with the hello".into()));
                    }
                    got += n;
                    if got == HELLO_LEN {
                        hs.handle_bytes(&buf)
                            .map_err(|e| Error::Handshake(e.to_string()))?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(&*link, true, deadline)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let limits = hs.poll_outcome().expect("checked by the loop above");
        let doorbell = sys::Doorbell::new()?;
        let shm = limits.features.contains(Features::SHM);
        loop {
            match link.flush() {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(&*link, false, deadline)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let conn = Arc::new_cyclic(|me| Conn {
            me: me.clone(),
            link,
            we_connected,
            peer_uid,
            reader: Mutex::new(Reader {
                dec: Decoder::new(limits.max_frame, limits.max_message)
                    .with_fds_allowed(limits.features.contains(Features::FDS)),
                fds: Vec::new(),
            }),
            limits,
            seat_waiters: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
            control: Mutex::new(Vec::new()),
            table: Mutex::new(Table {
                ids: IdAllocator::new(we_connected),
                inbound: HashMap::new(),
                reset_inbound: HashSet::new(),
                outbound: HashMap::new(),
                accepts: VecDeque::new(),
                accept_waiters: Vec::new(),
                error: None,
            }),
            dead: AtomicBool::new(false),
            flushing: AtomicBool::new(false),
            doorbell,
            write_broken: AtomicBool::new(false),
            shm,
            copy_out: trust == Trust::Untrusted,
            send_seq: std::sync::atomic::AtomicU64::new(0),
            rings_sent: AtomicU32::new(0),
            rings_seen: Arc::new(AtomicU32::new(0)),
            offers_out: Mutex::new(offer::OffersOut::default()),
            offers_in: Mutex::new(offer::OffersIn::default()),
            returns: Mutex::new(offer::Returns::default()),
            returns_waiting: AtomicBool::new(false),
            ring_waiters: Mutex::new(Vec::new()),
            pumps: AtomicU32::new(0),
            keepalive,
            last_heard: AtomicU64::new(keepalive::now_ms()),
            last_ping: AtomicU64::new(0),
            polled_before_send: AtomicU64::new(u64::MAX),
            closes_heard: AtomicU64::new(0),
            resets_heard: AtomicU64::new(0),
            peer,
        });
        if keepalive.is_some() {
            keepalive::watch(&conn);
        }
        if shm {
            spawn_control_reader(&conn)?;
        }
        Ok(conn)
    }

    /// The next message's place in this session's order (see `send_seq` and `rings_sent`).
    pub(crate) fn next_stamp(&self) -> super::shm::Stamp {
        super::shm::Stamp {
            seq: self.send_seq.fetch_add(1, Ordering::Relaxed),
            rings: self.rings_sent.load(Ordering::Acquire),
        }
    }

    /// RING frames dispatched from the peer (see `rings_seen`).
    pub(crate) fn rings_seen(&self) -> &Arc<AtomicU32> {
        &self.rings_seen
    }

    /// `ring` waits for RING frames still in the socket; wake it when one is dispatched.
    pub(crate) fn wait_for_rings(&self, ring: std::sync::Weak<super::shm::RingIn>) {
        self.ring_waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ring);
    }

    /// A RING frame was dispatched (attached or not): count it and wake the rings that wait.
    pub(super) fn ring_seen(&self) {
        self.rings_seen.fetch_add(1, Ordering::AcqRel);
        let waiters =
            std::mem::take(&mut *self.ring_waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for w in waiters {
            if let Some(ring) = w.upgrade() {
                crate::channel::Lane::unpark(&*ring);
            }
        }
    }

    /// How this session checks that its peer is there (network sessions only).
    pub(crate) fn keepalive(&self) -> Option<Keepalive> {
        self.keepalive
    }

    /// Who the peer is, for log lines.
    pub(crate) fn peer(&self) -> &str {
        &self.peer
    }

    /// When bytes last arrived from the peer, on `keepalive::now_ms`'s clock.
    pub(crate) fn last_heard(&self) -> u64 {
        self.last_heard.load(Ordering::Relaxed)
    }

    /// Sends a PING unless one went out less than `every_ms` ago.
    pub(crate) fn ping_if_due(&self, now_ms: u64, every_ms: u64) {
        let last = self.last_ping.load(Ordering::Relaxed);
        // 0: no PING sent yet.
        if (last != 0 && now_ms.saturating_sub(last) < every_ms)
            || self
                .last_ping
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let mut buf = Vec::with_capacity(24);
        frame::encode_ping(&mut buf, now_ms);
        self.send_control(&buf);
    }

    /// Whether this session moves messages through shared-memory rings.
    pub(crate) fn shm(&self) -> bool {
        self.shm
    }

    /// The transport this session runs on.
    pub(crate) fn transport(&self) -> Transport {
        if self.shm {
            Transport::Shm
        } else {
            self.link.transport()
        }
    }

    /// Who the peer proved to be, when the link authenticates peers (a TLS client
    /// certificate).
    pub(crate) fn peer_identity(&self) -> Option<String> {
        self.link.peer_identity()
    }

    /// Whether messages read from the peer's rings must be copied out before validation
    /// (`Trust::Untrusted`), rather than validated and read in place.
    pub(crate) fn copy_out(&self) -> bool {
        self.copy_out
    }

    /// Sends channel `id`'s next message as the `len`-byte archive in the sealed memfd `fd` (a
    /// BLOB frame).
    pub(crate) fn send_blob(
        self: &Arc<Self>,
        id: u32,
        len: usize,
        fd: OwnedFd,
    ) -> Result<(), PushError> {
        let mut buf = Vec::with_capacity(24);
        frame::encode_blob(&mut buf, id, len as u64);
        self.write_frame(&[&buf], &[fd.as_fd()], &|| false)
    }

    /// Hands the peer the memfd of channel `id`'s ring (a RING frame).
    pub(crate) fn send_ring(self: &Arc<Self>, id: u32, fd: OwnedFd) -> Result<(), PushError> {
        let mut buf = Vec::with_capacity(24);
        frame::encode_ring(&mut buf, id, super::shm::RING_CAPACITY as u64);
        self.write_frame(&[&buf], &[fd.as_fd()], &|| false)?;
        // Counted once the frame is in the socket, ahead of every record stamped with it.
        self.rings_sent.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// True when nothing more can be sent on this session.
    pub(crate) fn cannot_send(&self) -> bool {
        self.is_dead() || self.write_broken.load(Ordering::Acquire)
    }

    pub(crate) fn peer_uid(&self) -> Option<u32> {
        self.peer_uid
    }

    /// Why the session died, if it did.
    pub(crate) fn error(&self) -> Option<String> {
        self.lock_table().error.clone()
    }

    /// Number of channels the session tracks (open in either direction).
    pub(crate) fn channel_count(&self) -> usize {
        // Closes the peer sent but nobody read yet count as closed.
        self.poll_input();
        let t = self.lock_table();
        t.inbound.len() + t.outbound.len() + t.reset_inbound.len()
    }

    fn lock_table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a channel we send on.
    pub(crate) fn open(self: &Arc<Self>, fingerprint: u64) -> Result<Arc<OutChan>, Error> {
        self.new_outbound(|buf, id| frame::encode_open(buf, id, fingerprint))
    }

    /// Registers a new channel we send on, then writes the frame that announces it to the peer
    /// (`announce` encodes it for the channel's id: OPEN, or JOIN on a direct session).
    fn new_outbound(
        self: &Arc<Self>,
        announce: impl FnOnce(&mut Vec<u8>, u32),
    ) -> Result<Arc<OutChan>, Error> {
        let out = {
            let mut t = self.lock_table();
            if self.cannot_send() {
                return Err(Error::Disconnected);
            }
            let id = t
                .ids
                .next()
                .ok_or_else(|| Error::Protocol("channel ids exhausted".into()))?;
            let out = OutChan::new(self.clone(), id);
            t.outbound.insert(id, Arc::downgrade(&out));
            out
        };
        let mut buf = Vec::with_capacity(24);
        announce(&mut buf, out.id);
        self.write_frame(&[&buf], &[], &|| false)
            .map_err(|_| Error::Disconnected)?;
        Ok(out)
    }

    /// Waits for the next channel the peer opens.
    pub(crate) fn accept(self: &Arc<Self>, wait: Wait) -> Result<(u32, u64, RecvCore), Error> {
        loop {
            let me = thread::current();
            {
                let mut t = self.lock_table();
                if let Some(a) = t.accepts.pop_front() {
                    return Ok(a);
                }
                if self.is_dead() {
                    return Err(Error::Disconnected);
                }
                if wait.expired() {
                    return Err(Error::Timeout);
                }
                t.accept_waiters.push(me.clone());
            }
            let ready = || self.is_dead() || !self.lock_table().accepts.is_empty();
            if self.drive(wait, &ready) != Drive::Progress {
                wait.park();
            }
            self.lock_table()
                .accept_waiters
                .retain(|t| t.id() != me.id());
        }
    }

    /// Refuses a channel the peer opened (type mismatch): it is reset and its data discarded.
    pub(crate) fn refuse(&self, id: u32, reason: ResetReason, text: &str) {
        let inchan = {
            let mut t = self.lock_table();
            t.reset_inbound.insert(id);
            t.inbound.remove(&id)
        };
        let mut buf = Vec::new();
        frame::encode_reset(&mut buf, id, reason, text);
        self.send_control(&buf);
        if let Some(c) = inchan {
            c.inbox.remove_feed(self, false);
        }
    }

    /// Forgets channel `id`, which we sent on, closed without a CLOSE frame (through its ring:
    /// see `offer_closed`).
    pub(crate) fn forget_outbound(&self, id: u32) {
        self.lock_table().outbound.remove(&id);
    }

    /// Forgets an outbound channel whose last sender is gone and tells the peer.
    pub(crate) fn close_outbound(&self, id: u32) {
        // CLOSE first, so the channel counts as open until its CLOSE is on its way (a process
        // that waits for its channel count to drop before exiting then loses no CLOSE).
        if !self.is_dead() {
            let mut buf = Vec::with_capacity(16);
            frame::encode_close(&mut buf, id);
            self.send_control(&buf);
        }
        self.lock_table().outbound.remove(&id);
    }

    /// [`poll_input`](Self::poll_input) for a sender about to send on the socket, at most once
    /// a millisecond. Each read is a system call that mostly finds nothing: done for every
    /// message, it cost a stream of small messages a third of its rate. A reset from the peer
    /// (its receiver dropped) still fails a send within about a millisecond of arriving, and a
    /// sender short of credit reads the socket anyway (`OutChan::take_credit`).
    pub(crate) fn poll_input_before_send(&self) {
        let now = keepalive::now_ms();
        if self.polled_before_send.load(Ordering::Relaxed) != now {
            self.polled_before_send.store(now, Ordering::Relaxed);
            self.poll_input();
        }
    }

    /// Dispatches whatever the socket holds now, if no other thread is reading. Never blocks.
    pub(crate) fn poll_input(&self) {
        if self.is_dead() || self.shm {
            return;
        }
        if let Ok(mut seat) = self.reader.try_lock() {
            while self.read_some(&mut seat) && !self.is_dead() {}
            drop(seat);
            self.wake_seat_waiters();
        }
    }

    /// Refuses every channel the peer opened that was not accepted (the session handle is
    /// gone, so nobody can accept them any more).
    pub(crate) fn refuse_pending(&self) {
        let pending: Vec<_> = self.lock_table().accepts.drain(..).collect();
        // Dropping each receiver resets its channel (`receiver_gone`).
        drop(pending);
    }

    fn wake_seat_waiters(&self) {
        let waiters =
            std::mem::take(&mut *self.seat_waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for t in waiters {
            t.unpark();
        }
    }

    /// One read from the socket, dispatching every complete frame. Returns false when there
    /// was nothing to read.
    fn read_some(&self, seat: &mut Reader) -> bool {
        let Reader { dec, fds } = seat;
        let buf = dec.read_buf(64 * 1024);
        let n = match self.link.recv(buf, fds) {
            Ok(0) if dec.buffered() > 0 => {
                self.fail("peer closed the connection in the middle of a frame");
                return true;
            }
            Ok(0) => {
                self.fail("peer closed the connection");
                return true;
            }
            Ok(n) => {
                if self.keepalive.is_some() {
                    self.last_heard
                        .store(keepalive::now_ms(), Ordering::Relaxed);
                }
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                // The peer died with bytes of ours unread: an end, not a broken rule.
                self.fail("peer closed the connection (reset)");
                return true;
            }
            Err(e) => {
                self.protocol_error(format!("receive failed: {e}").into());
                return true;
            }
        };
        if let Err(e) = dec.handle_read(n, std::mem::take(fds)) {
            self.protocol_error(e.into());
            return true;
        }
        loop {
            match dec.poll_frame() {
                Ok(Some(frame)) => {
                    if let Err(e) = self.dispatch(frame) {
                        self.protocol_error(e);
                        return true;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.protocol_error(e.into());
                    break;
                }
            }
        }
        if !self.control_is_empty() {
            self.try_flush_control();
        }
        true
    }

    /// Closes the session from this side: GOAWAY (best effort), then everything breaks.
    pub(crate) fn close(&self) {
        if self.is_dead() {
            return;
        }
        let mut buf = Vec::new();
        frame::encode_goaway(&mut buf, GoAwayReason::Normal, "closed by peer");
        if let Ok(_guard) = self.writer.lock() {
            let _ = self.flush_control(false);
            let _ = self.link.send(&[IoSlice::new(&buf)], &[]);
            let _ = self.link.flush();
        }
        self.fail("closed locally");
    }

    /// Marks the session dead and wakes everything that waits on it. Idempotent.
    pub(crate) fn fail(&self, reason: &str) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        log::debug!("libchan: session with {} ended: {reason}", self.peer);
        // The reason first: the shutdown below makes concurrent writes fail, and theirs is not
        // the reason.
        self.lock_table()
            .error
            .get_or_insert_with(|| reason.to_string());
        self.link.cut();
        let (inbound, outbound, waiters) = {
            let mut t = self.lock_table();
            t.reset_inbound.clear();
            let inbound: Vec<_> = t.inbound.drain().map(|(_, c)| c).collect();
            let outbound: Vec<_> = t
                .outbound
                .drain()
                .filter_map(|(_, w)| w.upgrade())
                .collect();
            // Channels the peer opened stay acceptable: what arrived on them before the end is
            // delivered, then their receivers report how the session ended.
            (inbound, outbound, std::mem::take(&mut t.accept_waiters))
        };
        for c in inbound {
            // A channel whose writer closed it through its ring before the end is closed in
            // order, not cut off: its receiver reads what is left, then `Closed`.
            let closed = c.ring.get().is_some_and(|ring| {
                ring.mark_dead();
                ring.close_pending()
            });
            c.inbox.remove_feed(self, !closed);
        }
        for o in outbound {
            o.wake();
        }
        self.drop_offers();
        waiters.into_iter().for_each(|t| t.unpark());
        self.wake_seat_waiters();
    }
}

impl Feed for Conn {
    /// Reads the session on this thread until `cond` holds, the wait runs out, or the session
    /// dies, if no other thread is reading it.
    fn drive(&self, wait: Wait, ready: &dyn Fn() -> bool) -> Drive {
        if self.is_dead() {
            return Drive::Dead;
        }
        if self.shm && !CONTROL_READER.get() {
            // Only the session's own thread reads a shared-memory session: a receiver waits on
            // its ring, which a socket reader would never notice.
            return Drive::Busy;
        }
        let mut seat = match self.reader.try_lock() {
            Ok(seat) => seat,
            Err(_) => {
                let me = thread::current();
                self.seat_waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(me);
                // The reader may have left between the first try and the registration.
                match self.reader.try_lock() {
                    Ok(seat) => seat,
                    Err(_) => return Drive::Busy,
                }
            }
        };
        while !ready() && !self.is_dead() {
            if self.read_some(&mut seat) {
                continue;
            }
            if wait.expired() {
                break;
            }
            let timeout = match wait {
                Wait::Until(t) => Some(t.saturating_duration_since(Instant::now())),
                _ => None,
            };
            let want_write = !self.control_is_empty();
            let bell = self.doorbell.as_fd();
            match sys::poll_with_doorbell(self.link.fd(), bell, want_write, timeout) {
                Ok(Some(r)) if r.writable && want_write => self.try_flush_control(),
                Ok(Some(_)) => {}
                Ok(None) => self.doorbell.clear(),
                Err(e) => self.fail(&format!("poll failed: {e}")),
            }
        }
        drop(seat);
        self.wake_seat_waiters();
        Drive::Progress
    }

    /// Interrupts the thread blocked reading this session, so it re-checks its condition.
    fn interrupt(&self) {
        self.doorbell.ring();
    }

    fn self_driven(&self) -> bool {
        self.shm
    }

    /// Resets every inbound channel that feeds `inbox`: its last receiver is gone.
    fn receiver_gone(&self, inbox: &Inbox) {
        let gone: Vec<Arc<InChan>> = {
            let mut t = self.lock_table();
            let ids: Vec<u32> = t
                .inbound
                .iter()
                .filter(|(_, c)| std::ptr::eq(Arc::as_ptr(&c.inbox), inbox))
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| {
                    t.reset_inbound.insert(*id);
                    t.inbound.remove(id)
                })
                .collect()
        };
        let mut buf = Vec::new();
        for c in &gone {
            if let Some(ring) = c.ring.get().filter(|r| r.offered()) {
                // A channel on a ring we bound to the peer's offer: the ring's *consumer
                // gone* word tells its writer, with no RESET to wake the peer's session
                // thread. The writer then closes the channel through the ring, or with CLOSE
                // when it sees the word after writing its close record.
                ring.mark_reader_gone();
                continue;
            }
            frame::encode_reset(
                &mut buf,
                c.id,
                ResetReason::ReceiverGone,
                "receiver dropped",
            );
        }
        if !buf.is_empty() {
            self.send_control(&buf);
        }
        for c in gone {
            c.inbox.remove_feed(self, false);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.is_dead() {
            return;
        }
        // Last chance for queued CLOSE frames to reach the peer; bounded, since a peer that
        // stopped reading must not hang this drop.
        let mut buf = Vec::new();
        frame::encode_goaway(&mut buf, GoAwayReason::Normal, "");
        self.control
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&buf);
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.control_is_empty() && Instant::now() < deadline {
            if self.flush_control(false).is_err() {
                break;
            }
            if !self.control_is_empty() {
                let _ = sys::poll(self.link.fd(), false, true, Some(Duration::from_millis(10)));
            }
        }
    }
}

/// The peer's transport and address, for log lines.
fn peer_name(link: &dyn Link) -> String {
    let addr = rustix::net::getpeername(link.fd())
        .ok()
        .flatten()
        .and_then(|a| std::net::SocketAddr::try_from(a).ok());
    match addr {
        Some(a) => format!("{} {a}", link.transport()),
        None => link.transport().to_string(),
    }
}

fn wait_ready(link: &dyn Link, read: bool, deadline: Instant) -> Result<(), Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout);
    }
    sys::poll(link.fd(), read, !read, Some(left))?;
    Ok(())
}

/// How long the control reader blocks at a time: it lets go of the session between reads, so
/// the session can drop (and the thread end) within this long of its last user.
const CONTROL_POLL: Duration = Duration::from_millis(100);

thread_local! {
    /// This thread is a shared-memory session's control reader.
    static CONTROL_READER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Starts the thread that reads a shared-memory session's socket. Messages go through rings;
/// the socket carries control (opens, closes, credit, fds), which nobody waits on from a ring,
/// and the end of the session, which this thread turns into wake-ups for every waiter.
fn spawn_control_reader(conn: &Arc<Conn>) -> Result<(), Error> {
    let weak = Arc::downgrade(conn);
    thread::Builder::new()
        .name("libchan-shm-control".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            CONTROL_READER.set(true);
            loop {
                let Some(conn) = weak.upgrade() else {
                    return;
                };
                if conn.is_dead() {
                    return;
                }
                // Offers the socket did not take when they were due (see `offer`).
                conn.look_for_closes();
                conn.settle_gone_closes();
                conn.top_up_offers(false);
                let until = Wait::Until(Instant::now() + CONTROL_POLL);
                conn.drive(until, &|| conn.offers_due());
            }
        })?;
    Ok(())
}

/// Spawns the other side's handshake for an in-process pair.
pub(crate) fn pair(local: Limits, trust: Trust) -> Result<(Arc<Conn>, Arc<Conn>), Error> {
    let (a, b) = UnixStream::pair()?;
    let timeout = Duration::from_secs(10);
    let other = thread::spawn(move || Conn::establish(b, false, local, trust, timeout));
    let a = Conn::establish(a, true, local, trust, timeout)?;
    let b = other
        .join()
        .map_err(|_| Error::Handshake("handshake thread panicked".into()))??;
    Ok((a, b))
}
