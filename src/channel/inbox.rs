//! The receiving side of every channel.
//!
//! Messages reach an inbox two ways. Local senders write into the channel's ring (see `local`),
//! and shared-memory sessions into rings of their own: these are *lanes*, read without the
//! inbox's lock. Sessions without shared memory push what they read into `queue`. A waiting
//! receiver polls the lanes, then the queue; with lanes it spins (adaptively, 2-50 us) and
//! then sleeps on the first lane's futex word, which every local event (a push into the queue,
//! a close, the session ending) also rings. Without lanes it reads a session itself when one
//! feeds the inbox and nobody is reading its socket (so a reply costs one kernel wake-up, not
//! two), or spins for up to 10 us and parks until a pusher unparks it.
//!
//! Invariants (all under `state`'s lock):
//! - `senders` counts live local `SendCore`s plus open session feeds; the inbox is *closed* when
//!   it reaches zero, and a receiver gets `Closed` (or `Disconnected` if a feed broke) once the
//!   lanes and the queue are drained;
//! - `receivers` counts live `RecvCore`s; at zero, senders get `Disconnected` and waiting
//!   messages are dropped (closing their handles);
//! - the local ring holds at most `cap` messages; session feeds are bounded by their credit
//!   windows or rings instead, so they never block the thread that reads the socket.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use super::local::LocalRing;
use super::source::{CreditSink, Drive, Feed, Lane, LanePop};
use crate::message::{Body, Bytes, Lent, Packet};
use crate::sys;

/// One queued message and, when it came from a session, where to return its credit.
pub(crate) struct Entry {
    pub(crate) packet: Packet,
    pub(crate) credit: Option<Arc<dyn CreditSink>>,
    /// The message's bytes, when a ring lends them (`packet.bytes` is then empty).
    pub(crate) lent: Option<Lent>,
}

impl Entry {
    /// A message from a local sender.
    pub(crate) fn local(packet: Packet) -> Self {
        Self {
            packet,
            credit: None,
            lent: None,
        }
    }

    /// A plain message lent in place by a ring (see [`Inbox::take_lent`]).
    pub(crate) fn lent(lent: Lent) -> Self {
        Self {
            packet: Packet {
                bytes: Bytes::new(),
                handles: Vec::new(),
            },
            credit: None,
            lent: Some(lent),
        }
    }

    /// The length of the frame body the message arrived in (handle descriptors and archive):
    /// what its credit was charged.
    pub(crate) fn body_len(&self) -> usize {
        let lent = self.lent.as_ref().map_or(0, |l| l.len());
        self.packet.handles.len() * 16 + self.packet.bytes.len() + lent
    }

    /// The message as a packet of its own (lent bytes are copied out), for forwarding.
    pub(crate) fn into_packet(self) -> Packet {
        let Entry {
            mut packet, lent, ..
        } = self;
        if let Some(lent) = lent {
            packet.bytes = Body::Lent(lent).into_owned();
        }
        packet
    }
}

/// The longest a receiver sleeps on one lane's word while something else (another lane, a
/// session it must read itself) could also bring a message.
const LANE_POLL: Duration = Duration::from_millis(1);

pub(crate) struct Inbox {
    state: Mutex<State>,
    /// Length of `queue`, readable without the lock while spinning.
    len: AtomicUsize,
    /// Copy of `State::senders`, so a reader of a session sees a close without the lock.
    open_senders: AtomicUsize,
    /// Copy of `State::receivers`, so a sender sees a disconnect without the lock.
    open_receivers: AtomicUsize,
    cap: usize,
    /// Shared-memory rings feeding this inbox, read without `state`'s lock.
    lanes: RwLock<Vec<Arc<dyn Lane>>>,
    /// `lanes` was ever non-empty: receivers take the lane path.
    has_lanes: AtomicBool,
    /// The first lane ever added, and whether it is still the only one: the common case (one
    /// sending process) then reads it without taking `lanes`' lock.
    solo: std::sync::OnceLock<Arc<dyn Lane>>,
    solo_only: AtomicBool,
    /// The receive spin's current bound, in microseconds (see `pop_lanes`).
    spin_us: std::sync::atomic::AtomicU32,
    /// A receiving thread sleeps on the first lane's word (at most one does: see `pop_lanes`).
    lane_sleeper: AtomicBool,
    /// Where the search for a lane with a message starts (see `poll_lanes`).
    next_lane: AtomicUsize,
    /// The ring local senders write into, made on the first local send.
    local: std::sync::OnceLock<Arc<LocalRing>>,
}

struct State {
    queue: VecDeque<Entry>,
    senders: usize,
    receivers: usize,
    /// A session feed broke: after draining, receivers get `Disconnected`.
    broken: bool,
    /// Sessions that push into this inbox, each with the number of its channels that do.
    feeds: Vec<(Arc<dyn Feed>, usize)>,
    /// The session a receiver is blocked reading right now: a local push rings its doorbell.
    driving: Option<Arc<dyn Feed>>,
    recv_waiters: Vec<Thread>,
}

/// Why a pop failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PopError {
    Empty,
    Timeout,
    Closed,
    Disconnected,
}

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    Full,
    Timeout,
    Disconnected,
}

/// How long a blocking operation may wait.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    No,
    Until(Instant),
    Forever,
}

impl Wait {
    pub(crate) fn expired(self) -> bool {
        match self {
            Wait::No => true,
            Wait::Until(t) => Instant::now() >= t,
            Wait::Forever => false,
        }
    }

    /// Parks the current thread until unparked or the deadline passes.
    pub(crate) fn park(self) {
        match self {
            Wait::No => {}
            Wait::Until(t) => {
                let now = Instant::now();
                if t > now {
                    thread::park_timeout(t - now);
                }
            }
            Wait::Forever => thread::park(),
        }
    }
}

impl Inbox {
    /// A new inbox with one receiver and no senders yet.
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                senders: 0,
                receivers: 1,
                broken: false,
                feeds: Vec::new(),
                driving: None,
                recv_waiters: Vec::new(),
            }),
            len: AtomicUsize::new(0),
            open_senders: AtomicUsize::new(0),
            open_receivers: AtomicUsize::new(1),
            cap: cap.max(1),
            lanes: RwLock::new(Vec::new()),
            has_lanes: AtomicBool::new(false),
            solo: std::sync::OnceLock::new(),
            solo_only: AtomicBool::new(false),
            spin_us: std::sync::atomic::AtomicU32::new(SPIN_FOR.as_micros() as u32),
            lane_sleeper: AtomicBool::new(false),
            next_lane: AtomicUsize::new(0),
            local: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (every critical section
        // is a handful of field updates), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add_sender(&self) {
        let mut s = self.lock();
        s.senders += 1;
        self.open_senders.store(s.senders, Ordering::Release);
    }

    pub(crate) fn remove_sender(&self, broken: bool) {
        let waiters = {
            let mut s = self.lock();
            s.senders -= 1;
            self.open_senders.store(s.senders, Ordering::Release);
            s.broken |= broken;
            if s.senders > 0 {
                return;
            }
            std::mem::take(&mut s.recv_waiters)
        };
        self.wake_all(waiters);
    }

    /// Records that a source of this inbox broke (its session died): once every sender is
    /// gone, receivers get `Disconnected` rather than `Closed`.
    pub(crate) fn mark_broken(&self) {
        self.lock().broken = true;
    }

    pub(crate) fn add_receiver(&self) {
        let mut s = self.lock();
        s.receivers += 1;
        self.open_receivers.store(s.receivers, Ordering::Release);
    }

    pub(crate) fn remove_receiver(&self) {
        let (dropped, feeds) = {
            let mut s = self.lock();
            s.receivers -= 1;
            self.open_receivers.store(s.receivers, Ordering::Release);
            if s.receivers > 0 {
                return;
            }
            self.len.store(0, Ordering::Relaxed);
            let dropped: Vec<Entry> = s.queue.drain(..).collect();
            let feeds = std::mem::take(&mut s.feeds);
            (dropped, feeds)
        };
        // Sessions feeding us tell their peers the receiver is gone (RESET), before the credit
        // of the dropped messages goes back: a sender blocked for credit must see the reset
        // first, or it would send into a channel that no longer has a receiver.
        for (conn, _) in feeds {
            conn.receiver_gone(self);
        }
        self.solo_only.store(false, Ordering::Release);
        let lanes = std::mem::take(&mut *self.lanes.write().unwrap_or_else(|e| e.into_inner()));
        for lane in lanes {
            lane.discard();
            lane.retire();
        }
        // Dropping the entries outside the lock: their handles may close channels that lead
        // back here. Their credit is still returned so a session's window stays honest.
        for e in dropped {
            if let Some(c) = &e.credit {
                c.consumed(e.body_len());
            }
        }
        // Local senders waiting for room were woken by their ring's `discard` above.
    }

    /// True when nobody can receive any more: sends fail.
    pub(crate) fn is_disconnected(&self) -> bool {
        // pairs with the Release stores in `add_receiver`/`remove_receiver`.
        self.open_receivers.load(Ordering::Acquire) == 0
    }

    /// Registers a session channel that feeds this inbox (one more sender). Returns false
    /// (and registers nothing) when no receiver is left.
    pub(crate) fn add_feed(&self, conn: Arc<dyn Feed>) -> bool {
        let mut s = self.lock();
        if s.receivers == 0 {
            return false;
        }
        s.senders += 1;
        self.open_senders.store(s.senders, Ordering::Release);
        match s.feeds.iter_mut().find(|(c, _)| same_feed(c, &*conn)) {
            Some((_, n)) => *n += 1,
            None => s.feeds.push((conn, 1)),
        }
        // A receiver parked before this session fed us must start reading it.
        let waiters = std::mem::take(&mut s.recv_waiters);
        drop(s);
        self.wake_all(waiters);
        true
    }

    /// True when a session other than `conn` feeds this inbox.
    pub(crate) fn fed_by_other(&self, conn: &dyn Feed) -> bool {
        self.lock().feeds.iter().any(|(c, _)| !same_feed(c, conn))
    }

    /// One session channel feeding this inbox ended: gracefully, or because the session broke.
    pub(crate) fn remove_feed(&self, conn: &dyn Feed, broken: bool) {
        let feed = {
            let mut s = self.lock();
            let at = s.feeds.iter().position(|(c, _)| same_feed(c, conn));
            match at {
                Some(i) if s.feeds[i].1 > 1 => {
                    s.feeds[i].1 -= 1;
                    None
                }
                Some(i) => Some(s.feeds.swap_remove(i).0),
                None => None,
            }
        };
        // The last reference to a session may be this feed: drop it outside the lock.
        drop(feed);
        self.remove_sender(broken);
    }

    /// Pushes a message from a session feed: never blocks (credit bounds it). Returns the entry
    /// when no receiver is left.
    pub(crate) fn push_from_feed(&self, entry: Entry) -> Result<(), Entry> {
        let waiters = {
            let mut s = self.lock();
            if s.receivers == 0 {
                return Err(entry);
            }
            s.queue.push_back(entry);
            self.len.store(s.queue.len(), Ordering::Release);
            std::mem::take(&mut s.recv_waiters)
        };
        self.wake_all(waiters);
        Ok(())
    }

    /// Pushes a message from a local sender, waiting for room as `wait` allows. Local senders
    /// write into the channel's ring (see `local`), which receivers read as a lane.
    pub(crate) fn push(&self, packet: Packet, wait: Wait) -> Result<(), PushError> {
        let ring = self.local_ring().ok_or(PushError::Disconnected)?;
        let gone = || self.open_receivers.load(Ordering::Acquire) == 0;
        ring.push(packet, wait, &gone)
    }

    /// Serializes a message from a local sender straight into the channel's ring (see
    /// `Outlet::send_in_place`); `None` when it did not go this way.
    pub(crate) fn push_in_place(
        &self,
        estimate: usize,
        wait: Wait,
        encode: &mut dyn FnMut(*mut u8, usize) -> Option<usize>,
    ) -> Option<Result<(), PushError>> {
        let Some(ring) = self.local_ring() else {
            return Some(Err(PushError::Disconnected));
        };
        let gone = || self.open_receivers.load(Ordering::Acquire) == 0;
        ring.push_in_place(estimate, wait, &gone, encode)
    }

    /// The local ring, if one was made (for tests).
    #[cfg(test)]
    pub(crate) fn local_for_tests(&self) -> Option<&Arc<LocalRing>> {
        self.local.get()
    }

    /// The ring of this channel's local senders, made (and added as a lane) on first use;
    /// `None` once the last receiver is gone.
    fn local_ring(&self) -> Option<&Arc<LocalRing>> {
        if let Some(ring) = self.local.get() {
            return Some(ring);
        }
        if self.open_receivers.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut added = false;
        let ring = self.local.get_or_init(|| {
            let ring = LocalRing::new(self.cap);
            added = self.add_lane(ring.clone());
            ring
        });
        if added || self.open_receivers.load(Ordering::Acquire) > 0 {
            Some(ring)
        } else {
            None
        }
    }

    /// The receive fast path (see [`Lane::take_lent`]): a plain message lent in place by the
    /// only lane, if one is there; `None` sends the caller through [`pop`](Self::pop).
    #[inline]
    pub(crate) fn take_lent(&self) -> Option<Lent> {
        if !self.solo_only.load(Ordering::Acquire) {
            return None;
        }
        self.solo
            .get()?
            .take_lent(&|| self.solo_only.load(Ordering::Acquire))
    }

    /// Takes the next message, waiting as `wait` allows.
    pub(crate) fn pop(&self, wait: Wait) -> Result<Entry, PopError> {
        let mut spun = false;
        let mut polled = false;
        loop {
            if self.has_lanes.load(Ordering::Acquire) {
                return self.pop_lanes(wait);
            }
            let feed = {
                let mut s = self.lock();
                if let Some(e) = s.queue.pop_front() {
                    self.len.store(s.queue.len(), Ordering::Relaxed);
                    return Ok(e);
                }
                if s.senders == 0 {
                    if self.has_lanes.load(Ordering::Acquire) {
                        // A sender made the channel's first lane (its ring), wrote into it and
                        // left since the check at the top: what it wrote is in that lane. The
                        // lane is added before the sender count drops, so it is visible here.
                        continue;
                    }
                    return Err(if s.broken {
                        PopError::Disconnected
                    } else {
                        PopError::Closed
                    });
                }
                if wait.expired() && !(matches!(wait, Wait::No) && !polled && !s.feeds.is_empty()) {
                    return Err(if matches!(wait, Wait::No) {
                        PopError::Empty
                    } else {
                        PopError::Timeout
                    });
                }
                // (A `try_recv` on a channel a session feeds reads that session once, without
                // waiting, before it reports `Empty`.)
                polled = true;
                let feed = s.feeds.first().map(|(c, _)| c.clone());
                s.driving.clone_from(&feed);
                feed
            };
            if let Some(conn) = feed {
                // Read the session ourselves when nobody else is: no hand-off between threads.
                // A lane added meanwhile (a local sender's first message makes the channel's
                // ring) ends the read too: that message is in the lane, not the queue.
                let ready = || {
                    self.len.load(Ordering::Acquire) > 0
                        || self.open_senders.load(Ordering::Acquire) == 0
                        || self.has_lanes.load(Ordering::Acquire)
                };
                let drove = conn.drive(wait, &ready);
                self.lock().driving = None;
                match drove {
                    Drive::Progress => continue,
                    Drive::Busy | Drive::Dead => {}
                }
            } else if !spun {
                // Spin on the length alone: taking the lock here would hold the pusher up.
                // pairs with the Release stores of `len` in `push` and of `open_senders`.
                spun = true;
                spin_until(|| {
                    self.len.load(Ordering::Acquire) != 0
                        || self.open_senders.load(Ordering::Acquire) == 0
                });
                continue;
            }
            let me = thread::current();
            {
                let mut s = self.lock();
                // A lane added since the top of the loop: `add_lane` sets the flag before it
                // takes the lock to wake waiters, so under the lock one of us sees the other.
                if !s.queue.is_empty() || s.senders == 0 || self.has_lanes.load(Ordering::Acquire) {
                    continue;
                }
                s.recv_waiters.push(me.clone());
            }
            wait.park();
            self.lock().recv_waiters.retain(|t| t.id() != me.id());
        }
    }

    /// Adds a ring that feeds this inbox. Returns false (and drops nothing) when the last
    /// receiver is gone.
    pub(crate) fn add_lane(&self, lane: Arc<dyn Lane>) -> bool {
        if self.open_receivers.load(Ordering::Acquire) == 0 {
            return false;
        }
        {
            let mut lanes = self.lanes.write().unwrap_or_else(|e| e.into_inner());
            let first = lanes.is_empty() && self.solo.set(lane.clone()).is_ok();
            self.solo_only.store(first, Ordering::Release);
            lanes.push(lane);
        }
        self.has_lanes.store(true, Ordering::Release);
        // A receiver parked the lane-less way, or reading a session, must start polling the
        // lane.
        let (waiters, driving) = {
            let mut s = self.lock();
            (std::mem::take(&mut s.recv_waiters), s.driving.clone())
        };
        self.wake_all(waiters);
        if let Some(feed) = driving {
            feed.interrupt();
        }
        true
    }

    /// Unparks `waiters` and any receiver asleep on a lane's word.
    fn wake_all(&self, waiters: Vec<Thread>) {
        wake(waiters);
        self.unpark_lanes();
    }

    fn unpark_lanes(&self) {
        if self.has_lanes.load(Ordering::Acquire) {
            for lane in self.lanes.read().unwrap_or_else(|e| e.into_inner()).iter() {
                lane.unpark();
            }
        }
    }

    /// Takes a message from some lane, dropping the lanes that finished.
    ///
    /// With several lanes, one sending thread may have used several of them (a `Sender` sent
    /// over the session more than once); the lanes' sequence numbers then say which message it
    /// sent first. Anything committed before the first message found is visible to a second
    /// look, which is why there are two.
    fn poll_lanes(&self) -> Option<Entry> {
        if self.solo_only.load(Ordering::Acquire) {
            if let Some(solo) = self.solo.get() {
                match solo.try_pop_solo(&|| self.solo_only.load(Ordering::Acquire)) {
                    LanePop::Entry(e) => return Some(e),
                    LanePop::Empty if self.solo_only.load(Ordering::Acquire) => return None,
                    // A lane was added meanwhile: the general path below orders them.
                    LanePop::Empty => {}
                    // Dropped below, with the lock; never the fast path again.
                    LanePop::Done => self.solo_only.store(false, Ordering::Release),
                }
            }
        }
        let mut finished = false;
        let mut taken = None;
        // The lane to read, chosen under the lanes lock and read without it: reading a lane
        // may call into its session (a record's handles open channels, a broken ring ends the
        // session), which takes the session's locks, and a thread holding those may wait for
        // this lock (it wakes our lanes). Order across lanes does not need the lock: a lane
        // added after the choice is ordered by its records' "rings announced".
        let chosen: Option<Arc<dyn Lane>> = {
            let lanes = self.lanes.read().unwrap_or_else(|e| e.into_inner());
            if lanes.len() == 1 {
                Some(lanes[0].clone())
            } else if let Some((session, _)) = {
                // Start the search at a different lane each time, so one busy session cannot
                // starve the others.
                let n = lanes.len();
                let start = self.next_lane.fetch_add(1, Ordering::Relaxed) % n.max(1);
                (0..n).find_map(|i| lanes[(start + i) % n].order())
            } {
                lanes
                    .iter()
                    .filter_map(|l| match l.order() {
                        Some((s, seq)) if s == session => Some((seq, l)),
                        _ => None,
                    })
                    .min_by_key(|(seq, _)| *seq)
                    .map(|(_, l)| l.clone())
            } else {
                // Nothing seen: notice finished lanes, and take nothing. A message that came
                // since the look above waits for the next call, which orders it: taken here, in
                // whatever lane comes first, it could overtake a message its sender had put in
                // another lane before it (section 2.38 of docs/ARCHITECTURE.md).
                for l in lanes.iter() {
                    finished |= l.try_finish();
                }
                None
            }
        };
        if let Some(lane) = chosen {
            match lane.try_pop() {
                LanePop::Entry(e) => taken = Some(e),
                LanePop::Empty => {}
                LanePop::Done => finished = true,
            }
        }
        if finished {
            let gone: Vec<Arc<dyn Lane>> = {
                let mut lanes = self.lanes.write().unwrap_or_else(|e| e.into_inner());
                let (done, live) = std::mem::take(&mut *lanes)
                    .into_iter()
                    .partition(|l| l.finished());
                *lanes = live;
                done
            };
            // Retired and dropped outside the lock: the last reference unmaps the ring.
            for lane in &gone {
                lane.retire();
            }
            drop(gone);
        }
        taken
    }

    fn lanes_ready(&self) -> bool {
        if self.solo_only.load(Ordering::Acquire) {
            if let Some(solo) = self.solo.get() {
                return solo.ready();
            }
        }
        self.lanes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.ready())
    }

    /// `pop` for an inbox fed by rings: lanes first, without the lock, then the queue.
    fn pop_lanes(&self, wait: Wait) -> Result<Entry, PopError> {
        let mut spun = false;
        // A plain message the readiness check below took while it looked (the receive fast
        // path, `take_lent`): the spin ends with the message in hand, not just the news of it.
        let caught: std::cell::Cell<Option<Lent>> = std::cell::Cell::new(None);
        loop {
            if let Some(lent) = caught.take() {
                return Ok(Entry::lent(lent));
            }
            if let Some(e) = self.poll_lanes() {
                return Ok(e);
            }
            let feed = {
                let mut s = self.lock();
                if let Some(e) = s.queue.pop_front() {
                    self.len.store(s.queue.len(), Ordering::Relaxed);
                    return Ok(e);
                }
                if s.senders == 0 {
                    let broken = s.broken;
                    drop(s);
                    // What a ring's sender committed before it closed is still there: the close
                    // reached us after it (through the session's socket).
                    if let Some(e) = self.poll_lanes() {
                        return Ok(e);
                    }
                    return Err(if broken {
                        PopError::Disconnected
                    } else {
                        PopError::Closed
                    });
                }
                if wait.expired() {
                    return Err(if matches!(wait, Wait::No) {
                        PopError::Empty
                    } else {
                        PopError::Timeout
                    });
                }
                s.feeds
                    .iter()
                    .find(|(f, _)| !f.self_driven())
                    .map(|(f, _)| f.clone())
            };
            if let Some(f) = &feed {
                // A session nobody else reads: read what it has, without blocking on it.
                f.drive(Wait::No, &|| true);
            }
            let ready = || {
                let held = caught.take();
                let have = held.is_some();
                caught.set(held);
                if have {
                    return true;
                }
                if let Some(lent) = self.take_lent() {
                    caught.set(Some(lent));
                    return true;
                }
                self.lanes_ready()
                    || self.len.load(Ordering::Acquire) != 0
                    || self.open_senders.load(Ordering::Acquire) == 0
            };
            if !spun {
                spun = true;
                // Adaptive: a spin that catches its message earns a longer one next time, one
                // that runs out a shorter one, so a receiver whose messages come seldom stops
                // burning a core others could use, and one in a conversation keeps catching
                // replies without a sleep.
                let budget = self.spin_us.load(Ordering::Relaxed);
                let next = match spin_for(Duration::from_micros(u64::from(budget)), ready) {
                    Spun::Caught => (budget + budget / 2 + 1).min(MAX_SPIN_US),
                    Spun::Missed => (budget / 2).max(MIN_SPIN_US),
                    Spun::Preempted => MIN_SPIN_US,
                };
                self.spin_us.store(next, Ordering::Relaxed);
                continue;
            }
            let lanes: Vec<Arc<dyn Lane>> =
                self.lanes.read().unwrap_or_else(|e| e.into_inner()).clone();
            let Some(first) = lanes.first() else {
                // Every lane finished: wait the lane-less way.
                let me = thread::current();
                {
                    let mut s = self.lock();
                    if !s.queue.is_empty() || s.senders == 0 {
                        continue;
                    }
                    s.recv_waiters.push(me.clone());
                }
                wait.park();
                self.lock().recv_waiters.retain(|t| t.id() != me.id());
                continue;
            };
            // One receiving thread at a time sleeps on the lane's word. The ring's doorbell is a
            // flag the waker takes, with one wake-up for however many records: a second thread
            // asleep there would miss every later wake-up (the flag already taken) and sleep on
            // with messages waiting, or through the channel's close. The others wait in
            // `recv_waiters` for the one on the lane to hand over, or for a local event.
            if self.lane_sleeper.swap(true, Ordering::AcqRel) {
                let me = thread::current();
                {
                    let mut s = self.lock();
                    if !s.queue.is_empty() || s.senders == 0 {
                        continue;
                    }
                    s.recv_waiters.push(me.clone());
                }
                // The sleeper clears the flag before it takes the lock to hand over: under the
                // lock one of us sees the other (and an unpark before our park is kept).
                if self.lane_sleeper.load(Ordering::Acquire) && !ready() {
                    wait.park();
                }
                self.lock().recv_waiters.retain(|t| t.id() != me.id());
                continue;
            }
            let word = first.park_prepare();
            if !ready() {
                let mut timeout = match wait {
                    Wait::Until(t) => Some(t.saturating_duration_since(Instant::now())),
                    _ => None,
                };
                if lanes.len() > 1 || feed.is_some() {
                    timeout = Some(timeout.map_or(LANE_POLL, |t| t.min(LANE_POLL)));
                }
                // Any outcome (woken, changed, interrupted, timed out) re-checks the loop.
                let _ = sys::futex_wait(word, 1, timeout);
            }
            first.park_done();
            self.lane_sleeper.store(false, Ordering::Release);
            // Another receiving thread takes over the watch: what woke us may be one message of
            // several, or the end of the channel.
            self.hand_over_watch();
        }
    }

    /// Wakes one receiving thread waiting for the lane's sleeper to hand over (see `pop_lanes`).
    fn hand_over_watch(&self) {
        let next = {
            let s = self.lock();
            s.recv_waiters.first().cloned()
        };
        if let Some(t) = next {
            t.unpark();
        }
    }

    /// Number of queued messages.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed) + self.local.get().map_or(0, |r| r.len())
    }
}

/// How long a receiver busy-waits before it parks. A park and wake-up across cores costs tens
/// of microseconds on the machines libchan is measured on; a reply that comes sooner than this
/// is caught without one.
const SPIN_FOR: Duration = Duration::from_micros(10);

/// Bounds of a ring receiver's adaptive spin, in microseconds. At the top it still costs less
/// than the two cross-core wake-ups (~33 us each on the machines libchan is measured on) that a
/// sleep would; at the bottom it catches a reply that is already on its way.
const MIN_SPIN_US: u32 = 2;
const MAX_SPIN_US: u32 = 50;

/// How a spin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spun {
    /// `ready` held.
    Caught,
    /// The bound passed.
    Missed,
    /// The thread lost its core for a while during the spin: other threads need it, so the
    /// caller parks rather than spin again.
    Preempted,
}

/// A gap this long between two looks at the clock (64 turns of a few nanoseconds each) means
/// the spinning thread was descheduled.
const PREEMPTED: Duration = Duration::from_micros(20);

/// Busy-waits until `ready` holds or `SPIN_FOR` passes. It checks after every pause, not in
/// exponentially growing rounds as crossbeam's `Backoff` does, so a message is seen within a
/// pause of its arrival however long the wait has been.
fn spin_until(ready: impl Fn() -> bool) -> Spun {
    spin_for(SPIN_FOR, ready)
}

/// [`spin_until`] with a bound of `limit`. It stops early when the thread was descheduled
/// meanwhile (more runnable threads than cores, the normal case on small machines): the core
/// is wanted, and a futex sleep gives it up until the message comes, where spinning on would
/// take it back from the thread that is to send it. It does not `sched_yield` either: with
/// several runnable threads a yield can keep the yielder off its core for milliseconds.
fn spin_for(limit: Duration, ready: impl Fn() -> bool) -> Spun {
    let start = Instant::now();
    let mut last = start;
    let mut i: u32 = 0;
    loop {
        if ready() {
            return Spun::Caught;
        }
        std::hint::spin_loop();
        i = i.wrapping_add(1);
        if i % 64 == 0 {
            let now = Instant::now();
            if now - last > PREEMPTED {
                return if ready() {
                    Spun::Caught
                } else {
                    Spun::Preempted
                };
            }
            if now - start > limit {
                return Spun::Missed;
            }
            last = now;
        }
    }
}

/// True when `a` and `b` are the same session (compared by address: vtables may differ).
fn same_feed(a: &Arc<dyn Feed>, b: &dyn Feed) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), b as *const dyn Feed)
}

fn wake(waiters: Vec<Thread>) {
    for t in waiters {
        t.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A lane of one session holding numbered messages, each one's bytes its number. Its
    /// first `hidden` looks by `order` find nothing: the messages arrive just after the
    /// inbox looked, before it takes.
    struct LateLane {
        seqs: Mutex<VecDeque<u64>>,
        hidden: AtomicU32,
        word: AtomicU32,
    }

    impl LateLane {
        fn new(seqs: &[u64], hidden: u32) -> Arc<Self> {
            Arc::new(Self {
                seqs: Mutex::new(seqs.iter().copied().collect()),
                hidden: AtomicU32::new(hidden),
                word: AtomicU32::new(0),
            })
        }
    }

    impl Lane for LateLane {
        fn try_pop(&self) -> LanePop {
            match self.seqs.lock().unwrap().pop_front() {
                Some(seq) => {
                    let mut bytes = Bytes::new();
                    bytes.extend_from_slice(&seq.to_le_bytes());
                    LanePop::Entry(Entry::local(Packet {
                        bytes,
                        handles: Vec::new(),
                    }))
                }
                None => LanePop::Empty,
            }
        }

        fn ready(&self) -> bool {
            !self.seqs.lock().unwrap().is_empty()
        }

        fn finished(&self) -> bool {
            false
        }

        fn try_finish(&self) -> bool {
            false
        }

        fn discard(&self) {}

        fn order(&self) -> Option<(usize, u64)> {
            if self.hidden.load(Ordering::Relaxed) > 0 {
                self.hidden.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            self.seqs.lock().unwrap().front().map(|&seq| (1, seq))
        }

        fn park_prepare(&self) -> &AtomicU32 {
            &self.word
        }

        fn park_done(&self) {}

        fn unpark(&self) {}
    }

    /// One sender's messages 3..6 went into the second lane before 6..9 went into the first,
    /// both after the inbox found every lane empty: the inbox must still deliver 3 first,
    /// not whatever the lane it happens to try first holds.
    #[test]
    fn a_message_arriving_between_looks_waits_for_its_turn() {
        let inbox = Inbox::new(16);
        assert!(inbox.add_lane(LateLane::new(&[6, 7, 8], 1)));
        assert!(inbox.add_lane(LateLane::new(&[3, 4, 5], 1)));
        let mut got = Vec::new();
        for _ in 0..100 {
            if let Some(e) = inbox.poll_lanes() {
                let bytes: [u8; 8] = e.packet.bytes[..8].try_into().unwrap();
                got.push(u64::from_le_bytes(bytes));
            }
            if got.len() == 6 {
                break;
            }
        }
        assert_eq!(got, [3, 4, 5, 6, 7, 8]);
    }
}
