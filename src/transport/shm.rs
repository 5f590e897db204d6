//! The shared-memory data path of a session: one ring per channel, in a memfd both sides map.
//!
//! A session between two processes of the same uid on one host negotiates the `SHM` feature.
//! Its socket then carries only control: OPEN, CLOSE, RESET, credit, the RING frame that hands
//! over a channel's memfd, and the few messages that cannot go through a ring (those carrying
//! handles, and those larger than a ring's share). Every other message is written by the
//! sending thread straight into the channel's ring, and read in place by the receiving thread:
//! no syscall, no copy on the way in, no thread in between.
//!
//! - [`RingOut`] is the sending side (`OutChan` creates it on the channel's first send and
//!   sends its memfd in a RING frame before anything else on that channel).
//! - [`RingIn`] is the receiving side: a [`Lane`] of the channel's inbox. A message it hands out
//!   borrows its slot (a [`Lent`]); the slot goes back to the sender when the `Msg` drops, in
//!   any order ([`RingIn::give_back`] sweeps the records done so far).
//!
//! Each ring record starts with a 16-byte tag (so the archive behind it stays 16-byte aligned)
//! holding a kind and the session's send sequence number; the number orders the messages that
//! reach one inbox through several rings of one session (a `Sender` sent over several times),
//! so that what one thread sends arrives in the order it sent it. The kind is
//! [`TAG_MESSAGE`] (an archive follows) or [`TAG_ON_SOCKET`] (this channel's next message comes
//! on the socket, as a DATA frame). The socket's DATA frames for a ring channel wait in the
//! ring's own queue until their tag is reached, so per-channel order holds across both paths.
//! [`TAG_HANDLES`] carries `Sender`s on ring offers beside an archive, and [`TAG_CLOSE`] closes
//! a channel bound to a ring offer in place of its CLOSE frame.
//!
//! Waiting: a receiver spins, then sleeps on the ring's "consumer parked" futex word, which the
//! sender wakes only when it is set. A sender facing a full ring does the same on the "producer
//! parked" word. The session's control thread wakes both words when the session ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use super::conn::Conn;
use crate::channel::{Entry, Lane, LanePop, PushError, Wait};
use crate::message::{Bytes, Lender, Lent, Packet};
use crate::proto::frame::HandleDesc;
use crate::ring::release::{self, Outstanding};
use crate::ring::shm::ShmRegion;
use crate::ring::spsc::{region_len, Consumer, Detached, Grant, Producer, Record, Room};
use crate::ring::Corrupt;
use crate::sys::{futex_wait, futex_wake};

/// Data bytes of each channel's ring this side makes: room for messages up to 2 MiB in the
/// ring. Pages are touched only as the ring cycles through them, so a channel that carries
/// little costs little; a busy one holds up to this much shared memory.
pub(crate) const RING_CAPACITY: usize = 4 << 20;
/// The ring sizes a RING frame may announce (powers of two).
pub(crate) const MIN_RING: u64 = 64 << 10;
/// The largest ring size a RING frame may announce.
pub(crate) const MAX_RING: u64 = 64 << 20;

/// Length of the tag in front of each record's payload.
const TAG_LEN: usize = 16;
/// The record holds one message archive.
pub(crate) const TAG_MESSAGE: u32 = 1;
/// The channel's next message travels on the socket.
pub(crate) const TAG_ON_SOCKET: u32 = 2;
/// The record holds handle descriptors, then one message archive: after the tag, a u32 count
/// (and 12 zero bytes), the 16-byte descriptors, then the archive. Only descriptors that need
/// no fd and no frame of their own go this way (SENDER_RING); the receiving thread opens their
/// channels itself.
pub(crate) const TAG_HANDLES: u32 = 3;
/// The sender closed the channel: nothing follows. Only on a ring the reader's side bound to
/// an offer (a reply channel), where it stands in for the CLOSE frame, so that closing such a
/// channel wakes no session thread on either side (see `conn::offer`).
pub(crate) const TAG_CLOSE: u32 = 4;

/// Most handle descriptors one TAG_HANDLES record carries.
pub(crate) const MAX_RING_HANDLES: usize = 16;

/// Bytes between a TAG_HANDLES record's tag and its descriptors.
const HANDLES_HEAD: usize = 16;

/// The longest one futex sleep lasts before the sleeper re-checks on its own: a bound on how
/// long a missed wake-up (which the protocol rules out) could cost, and how a dead peer is seen
/// even if the wake from the control thread were lost.
const MAX_SLEEP: std::time::Duration = std::time::Duration::from_millis(50);

/// The sending side of a channel's ring.
pub(crate) struct RingOut {
    prod: Producer<ShmRegion>,
}

impl RingOut {
    /// Creates a ring in a new memfd; returns it and the memfd to send to the peer.
    pub(crate) fn create() -> std::io::Result<(RingOut, std::os::fd::OwnedFd)> {
        let (region, fd) = ShmRegion::create(region_len(RING_CAPACITY))?;
        // SAFETY: the region was created just above; nobody else has attached a producer.
        let prod = unsafe { Producer::attach(region) }
            .map_err(|c| std::io::Error::other(c.to_string()))?;
        Ok((RingOut { prod }, fd))
    }

    /// Where the next record starts: the end of everything written so far.
    pub(crate) fn position(&self) -> u64 {
        self.prod.position()
    }

    /// Whether the reader has read and released everything before `pos`; a broken ring
    /// counts as not.
    pub(crate) fn read_through(&mut self, pos: u64) -> bool {
        self.prod.released_through(pos).unwrap_or(false)
    }

    /// Whether a message of `len` bytes fits one record.
    pub(crate) fn fits(&self, len: usize) -> bool {
        len + TAG_LEN <= self.prod.max_len()
    }

    /// Writes one record (tag, then `bytes`), waiting for room as `wait` allows; `stop` says
    /// the channel or session ended while waiting.
    pub(crate) fn write(
        &mut self,
        tag: u32,
        stamp: Stamp,
        bytes: &[u8],
        wait: Wait,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), RingWriteError> {
        let len = TAG_LEN + bytes.len();
        let mut grant = self.reserve(len, wait, stop)?;
        grant.write_at(0, &tag_bytes(tag, stamp));
        grant.write_at(TAG_LEN, bytes);
        grant.commit();
        self.wake_consumer();
        Ok(())
    }

    /// Serializes a message straight into a record: reserves `TAG_LEN + estimate` bytes
    /// (waiting for room as `wait` allows), lets `encode` write the archive at the payload's
    /// 16-byte aligned start, and publishes what it wrote. `encode` returns the archive's
    /// length, or `None` when it does not fit or cannot go through the ring; the record is
    /// then dropped (the consumer skips it) and this returns `Ok(false)`.
    pub(crate) fn write_in_place(
        &mut self,
        stamp: Stamp,
        estimate: usize,
        wait: Wait,
        stop: &dyn Fn() -> bool,
        encode: &mut dyn FnMut(*mut u8, usize) -> Option<usize>,
    ) -> Result<bool, RingWriteError> {
        let len = (TAG_LEN + estimate).min(self.prod.max_len());
        let mut grant = self.reserve(len, wait, stop)?;
        grant.write_at(0, &tag_bytes(TAG_MESSAGE, stamp));
        let cap = grant.len() - TAG_LEN;
        let at = grant.as_mut_ptr().wrapping_add(TAG_LEN);
        let wrote = match encode(at, cap) {
            Some(n) if n <= cap => {
                grant.commit_len(TAG_LEN + n);
                true
            }
            // Dropped uncommitted: it becomes padding.
            _ => {
                drop(grant);
                false
            }
        };
        if wrote {
            self.wake_consumer();
        }
        Ok(wrote)
    }

    /// Writes one TAG_HANDLES record: `n` descriptors, which `export` makes once the record's
    /// room is reserved (so that a channel is never opened for a message that then finds no
    /// room), then `archive`. Returns `Ok(false)`, with nothing written, when `export` declines
    /// (the message then goes the usual way).
    pub(crate) fn write_with_handles(
        &mut self,
        stamp: Stamp,
        n: usize,
        archive: &[u8],
        wait: Wait,
        stop: &dyn Fn() -> bool,
        export: &mut dyn FnMut() -> Option<Vec<[u8; 16]>>,
    ) -> Result<bool, RingWriteError> {
        let descs_len = HANDLES_HEAD + 16 * n;
        let len = TAG_LEN + descs_len + archive.len();
        let mut grant = self.reserve(len, wait, stop)?;
        let Some(descs) = export().filter(|d| d.len() == n) else {
            // Dropped uncommitted: it becomes padding.
            return Ok(false);
        };
        grant.write_at(0, &tag_bytes(TAG_HANDLES, stamp));
        let mut head = [0u8; HANDLES_HEAD];
        head[..4].copy_from_slice(&(n as u32).to_le_bytes());
        grant.write_at(TAG_LEN, &head);
        for (i, d) in descs.iter().enumerate() {
            grant.write_at(TAG_LEN + HANDLES_HEAD + 16 * i, d);
        }
        grant.write_at(TAG_LEN + descs_len, archive);
        grant.commit();
        self.wake_consumer();
        Ok(true)
    }

    /// Whether the receiver marked the ring gone, looked at after a commit: `true` means it
    /// may have stopped reading before the record just committed (see `RingIn::discard`).
    pub(crate) fn gone_after_commit(&self) -> bool {
        // SeqCst fence: pairs with the one in `RingIn::discard` (Dekker): either its last
        // look at the ring sees our commit, or we see its mark.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.prod.gone_word().load(Ordering::Acquire) != 0
    }

    /// Whether a TAG_HANDLES record of `n` descriptors and `archive_len` bytes fits the ring.
    pub(crate) fn fits_with_handles(&self, n: usize, archive_len: usize) -> bool {
        n <= MAX_RING_HANDLES && self.fits(HANDLES_HEAD + 16 * n + archive_len)
    }

    /// Reserves a record for a loan of `len` archive bytes (waiting for room as `wait`
    /// allows) and detaches it, so the channel's other senders can go on behind it.
    pub(crate) fn loan(
        &mut self,
        stamp: Stamp,
        len: usize,
        wait: Wait,
        stop: &dyn Fn() -> bool,
    ) -> Result<(Detached, *mut u8), RingWriteError> {
        let room = self.room(TAG_LEN + len, wait, stop)?;
        let d = self.prod.reserve_detached(room);
        self.prod
            .write_detached(&d, 0, &tag_bytes(TAG_MESSAGE, stamp));
        let at = self.prod.detached_ptr(&d).wrapping_add(TAG_LEN);
        Ok((d, at))
    }

    /// Publishes a loan's first `n` archive bytes.
    pub(crate) fn commit_loan(&self, d: Detached, n: usize) {
        self.prod.commit_detached(d, TAG_LEN + n);
        self.wake_consumer();
    }

    /// Gives a loan's record back unsent (the receiver skips it).
    pub(crate) fn abandon_loan(&self, d: Detached) {
        self.prod.abandon_detached(d);
        self.wake_consumer();
    }

    /// The largest archive that fits one record.
    pub(crate) fn max_archive(&self) -> usize {
        self.prod.max_len() - TAG_LEN
    }

    /// Reserves a record of `len` bytes, waiting for room as `wait` allows. The sender checked
    /// the channel before it came here; a ring with room takes the record without another look.
    fn reserve(
        &mut self,
        len: usize,
        wait: Wait,
        stop: &dyn Fn() -> bool,
    ) -> Result<Grant<'_, ShmRegion>, RingWriteError> {
        let room = self.room(len, wait, stop)?;
        Ok(self.prod.reserve_room(room))
    }

    /// Finds room for a record of `len` bytes, waiting for it as `wait` allows.
    fn room(
        &mut self,
        len: usize,
        wait: Wait,
        stop: &dyn Fn() -> bool,
    ) -> Result<Room, RingWriteError> {
        let room = match self.prod.room_for(len).map_err(RingWriteError::Corrupt)? {
            Some(room) => room,
            None => {
                self.wait_room(len, wait, stop)?;
                // Only this producer takes room, and `wait_room` saw enough.
                self.prod
                    .room_for(len)
                    .map_err(RingWriteError::Corrupt)?
                    .expect("room vanished under the only producer")
            }
        };
        Ok(room)
    }

    /// Waits until a record of `len` bytes fits, as `wait` allows.
    fn wait_room(
        &mut self,
        len: usize,
        wait: Wait,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), RingWriteError> {
        let mut spun = false;
        loop {
            if stop() {
                return Err(RingWriteError::Push(PushError::Disconnected));
            }
            if self.prod.has_room(len).map_err(RingWriteError::Corrupt)? {
                return Ok(());
            }
            if wait.expired() {
                let e = if matches!(wait, Wait::No) {
                    PushError::Full
                } else {
                    PushError::Timeout
                };
                return Err(RingWriteError::Push(e));
            }
            if !spun {
                spun = true;
                let start = Instant::now();
                // An error shows up in `has_room` next round.
                while start.elapsed() < SPIN && !self.prod.has_room(len).unwrap_or(true) && !stop()
                {
                    std::hint::spin_loop();
                }
                continue;
            }
            self.prod.park_prepare();
            if !self.prod.has_room(len).unwrap_or(true) && !stop() {
                let _ = futex_wait(self.prod.room_word(), 1, sleep_for(wait));
            }
            self.prod.park_done();
        }
    }

    /// Wakes the receiver if it sleeps: once for however many records it missed.
    fn wake_consumer(&self) {
        if let Some(word) = self.prod.wake_needed() {
            let _ = futex_wake(word, 1);
        }
    }

    /// The word a sender sleeps on while the ring is full, to wake it when the session ends.
    pub(crate) fn room_word(&self) -> &AtomicU32 {
        self.prod.room_word()
    }

    /// The ring's "consumer gone" word: nonzero once the receiver will read no more.
    pub(crate) fn gone_word(&self) -> &AtomicU32 {
        self.prod.gone_word()
    }
}

/// Where a record stands in its sender's order: the session-wide sequence number, and how
/// many rings the sender had announced on the session when it wrote the record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp {
    pub(crate) seq: u64,
    pub(crate) rings: u32,
}

/// A record's 16-byte tag: kind, rings announced, sequence number.
fn tag_bytes(tag: u32, stamp: Stamp) -> [u8; TAG_LEN] {
    let mut head = [0u8; TAG_LEN];
    head[..4].copy_from_slice(&tag.to_le_bytes());
    head[4..8].copy_from_slice(&stamp.rings.to_le_bytes());
    head[8..].copy_from_slice(&stamp.seq.to_le_bytes());
    head
}

/// The kind in a record's tag; `None` for a record too short to have a tag.
pub(crate) fn record_tag(bytes: &[u8]) -> Option<u32> {
    bytes
        .first_chunk::<4>()
        .map(|t| u32::from_le_bytes(*t))
        .filter(|_| bytes.len() >= TAG_LEN)
}

/// The rings-announced count in a record's tag (0 for a record too short to have one).
fn tag_rings(bytes: &[u8]) -> u32 {
    bytes
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// The descriptors of a TAG_HANDLES record and where its archive starts, from the payload
/// after the tag.
fn parse_handles(body: &[u8]) -> Result<(Vec<HandleDesc>, usize), &'static str> {
    let head = body
        .get(..HANDLES_HEAD)
        .ok_or("handles record shorter than its count")?;
    let n = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if n == 0 || n > MAX_RING_HANDLES || head[4..] != [0; HANDLES_HEAD - 4] {
        return Err("bad handle count in a handles record");
    }
    let end = HANDLES_HEAD + 16 * n;
    let descs = body
        .get(HANDLES_HEAD..end)
        .ok_or("handles record shorter than its descriptors")?
        .chunks_exact(16)
        .enumerate()
        .map(|(i, d)| HandleDesc::parse(d, i as u16))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "bad handle descriptor in a handles record")?;
    Ok((descs, end))
}

/// Why [`RingOut::write`] failed.
pub(crate) enum RingWriteError {
    Push(PushError),
    Corrupt(Corrupt),
}

/// How long a receiver or sender busy-waits before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(10);

fn sleep_for(wait: Wait) -> Option<std::time::Duration> {
    Some(match wait {
        Wait::Until(t) => t.saturating_duration_since(Instant::now()).min(MAX_SLEEP),
        _ => MAX_SLEEP,
    })
}

/// The sequence number in a record's tag (0 for a record too short to have one, which
/// `try_pop` reports as corrupt).
fn tag_seq(bytes: &[u8]) -> u64 {
    bytes
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The receiving side of a channel's ring: a lane of the channel's inbox.
pub(crate) struct RingIn {
    me: Weak<RingIn>,
    conn: Weak<Conn>,
    /// Identifies the session, whose sequence numbers are comparable with each other.
    session: usize,
    /// RING frames the session dispatched: a record stamped with more waits (see
    /// `Conn::rings_seen`).
    rings_seen: Arc<std::sync::atomic::AtomicU32>,
    state: Mutex<InState>,
    /// The ring's "consumer parked" word. Points into the mapping `state` keeps alive.
    word: *const AtomicU32,
    /// The sender closed the channel (CLOSE arrived after everything it wrote).
    closed: AtomicBool,
    /// The session ended.
    dead: AtomicBool,
    finished: AtomicBool,
    /// The peer is not trusted (`Trust::Untrusted`): besides copying records out, local events
    /// wake a sleeping receiver whatever the shared parked word says (the peer can clear it).
    untrusted: bool,
    /// The channel bound to this ring when it is one the peer offered (0 otherwise): the ring
    /// goes back among the peer's offers we hold once the channel is closed and this reader is
    /// gone (see `conn::offer`).
    bound: AtomicU32,
    /// A TAG_CLOSE record was read; the session is told once (`tell_closed`), with no lock
    /// held.
    close_read: AtomicBool,
    close_told: AtomicBool,
    /// A broken ring noticed under the inbox's lanes lock (`try_finish`): the session ends
    /// from `retire`, with no lock held.
    broke: Mutex<Option<Corrupt>>,
}

// SAFETY: `word` points into the shared mapping owned by `state`'s consumer, which lives as long
// as `self`; it is only used for atomic operations, which are thread-safe. Everything else is
// `Send + Sync` on its own.
unsafe impl Send for RingIn {}
// SAFETY: as for `Send`.
unsafe impl Sync for RingIn {}

struct InState {
    cons: Consumer<ShmRegion>,
    /// Records handed out or skipped, oldest first, with whether they are done.
    outstanding: Outstanding,
    /// Tags read that promise a message on the socket, not yet delivered.
    on_socket: usize,
    /// Sequence number of the oldest of those.
    on_socket_seq: VecDeque<u64>,
    /// DATA frames that arrived on the socket for this channel, in order.
    socket: VecDeque<Entry>,
    /// Copy-out mode (`Trust::Untrusted`): records are copied out of the ring and released
    /// before anything in them is looked at; their bytes are never read in place.
    copy_out: bool,
    /// In copy-out mode, the next record, already copied out and released (by `order`, which
    /// needs its sequence number before `try_pop` takes it).
    staged: Option<Staged>,
}

/// A record copied out of the ring (copy-out mode): its tag, and the payload after the tag in
/// a private 16-byte aligned buffer.
struct Staged {
    /// The record's kind, or 0 (unknown, reported as corrupt) if it is too short for a tag.
    tag: u32,
    /// Rings its sender had announced when writing it.
    rings: u32,
    seq: u64,
    bytes: Bytes,
}

impl RingIn {
    /// Attaches to the ring in `region`, received from the peer for channel `conn`.
    pub(crate) fn attach(conn: &Arc<Conn>, region: ShmRegion) -> Result<Arc<RingIn>, Corrupt> {
        // SAFETY: this process attaches exactly one consumer per RING frame, and the peer's
        // protocol attaches none (it produces); a peer that breaks this only hurts its own ring.
        let cons = unsafe { Consumer::attach(region) }?;
        let copy_out = conn.copy_out();
        let word: *const AtomicU32 = cons.data_word();
        Ok(Arc::new_cyclic(|me| RingIn {
            me: me.clone(),
            conn: Arc::downgrade(conn),
            session: Arc::as_ptr(conn) as usize,
            rings_seen: conn.rings_seen().clone(),
            state: Mutex::new(InState {
                cons,
                outstanding: Outstanding::default(),
                on_socket: 0,
                on_socket_seq: VecDeque::new(),
                socket: VecDeque::new(),
                copy_out,
                staged: None,
            }),
            word,
            closed: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            untrusted: copy_out,
            bound: AtomicU32::new(0),
            close_read: AtomicBool::new(false),
            close_told: AtomicBool::new(false),
            broke: Mutex::new(None),
        }))
    }

    /// This ring, one the peer offered, now carries channel `chan`.
    pub(crate) fn bind(&self, chan: u32) {
        self.bound.store(chan, Ordering::Relaxed);
    }

    /// Whether this ring is one the peer offered, bound to a channel.
    pub(crate) fn offered(&self) -> bool {
        self.bound.load(Ordering::Relaxed) != 0
    }

    /// Tells the writer that nothing more will be read (the *consumer gone* word), and wakes
    /// it if it waits for room: it then fails its sends as disconnected, with no RESET.
    pub(crate) fn mark_reader_gone(&self) {
        let st = self.lock();
        st.cons.mark_gone();
        // Pairs with the fence in `RingOut::gone_after_commit`, as in `discard`.
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Some(word) = st.cons.wake_needed() {
            let _ = futex_wake(word, 1);
        }
    }

    /// A handle on the ring's mapping, which keeps it mapped after this reader is gone.
    pub(crate) fn share_region(&self) -> ShmRegion {
        self.lock().cons.region().share()
    }

    fn lock(&self) -> MutexGuard<'_, InState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: see the field: the mapping lives as long as `self`.
        unsafe { &*self.word }
    }

    /// A DATA frame for this channel arrived on the socket. Returns it when nobody receives
    /// any more.
    pub(crate) fn push_socket(&self, entry: Entry) -> Result<(), Entry> {
        if self.finished.load(Ordering::Acquire) {
            return Err(entry);
        }
        self.lock().socket.push_back(entry);
        self.unpark();
        Ok(())
    }

    /// The sender closed the channel.
    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.unpark();
    }

    /// The session ended: deliver what was committed, then finish.
    pub(crate) fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
        self.unpark();
    }

    /// The peer broke the ring: the lane is done and the session ends. Takes the state lock's
    /// guard to release it first (ending the session wakes, and may re-enter, this lane).
    fn corrupt(&self, st: MutexGuard<'_, InState>, c: Corrupt) -> LanePop {
        drop(st);
        self.dead.store(true, Ordering::Release);
        self.finished.store(true, Ordering::Release);
        if let Some(conn) = self.conn.upgrade() {
            conn.fail(&format!("peer broke a channel's ring: {c}"));
        }
        LanePop::Done
    }

    /// Copy-out mode: the next record, copied out of the ring and released at once (so the
    /// peer may reuse its room), or the one `order` staged. `Ok(None)` when the ring is empty.
    ///
    /// The copy is made with `Consumer::copy_to`, which forms no reference over the shared
    /// bytes; whatever the peer writes there afterwards cannot change it.
    fn stage(st: &mut InState) -> Result<Option<Staged>, Corrupt> {
        if let Some(s) = st.staged.take() {
            return Ok(Some(s));
        }
        let Some(rec) = st.cons.peek()? else {
            return Ok(None);
        };
        st.cons.consume(rec);
        let mut bytes = Bytes::with_capacity(rec.len());
        bytes.resize(rec.len(), 0);
        st.cons.copy_to(rec, &mut bytes);
        Self::took(st, rec, true);
        Self::sweep(st);
        if bytes.len() < TAG_LEN {
            return Ok(Some(Staged {
                tag: 0,
                rings: 0,
                seq: 0,
                bytes: Bytes::new(),
            }));
        }
        let tag = bytes
            .first_chunk::<4>()
            .map_or(0, |t| u32::from_le_bytes(*t));
        let seq = tag_seq(&bytes);
        let rings = tag_rings(&bytes);
        // The archive starts at offset 0 of the buffer, which keeps it 16-byte aligned.
        let len = bytes.len() - TAG_LEN;
        bytes.copy_within(TAG_LEN.., 0);
        bytes.resize(len, 0);
        Ok(Some(Staged {
            tag,
            rings,
            seq,
            bytes,
        }))
    }

    /// Whether a record stamped with `rings` must wait: its sender had announced rings this
    /// session has not dispatched yet, and a message on one of them may come before it. If so,
    /// asks to be woken when the next one is dispatched.
    fn held_back(&self, rings: u32) -> bool {
        if rings <= self.rings_seen.load(Ordering::Acquire) {
            return false;
        }
        if let Some(conn) = self.conn.upgrade() {
            conn.wait_for_rings(self.me.clone());
        }
        // Dispatched meanwhile: the wake-up may have gone before the registration.
        rings > self.rings_seen.load(Ordering::Acquire)
    }

    /// Reads the ring to its end, releasing every record, and returns the descriptors of the
    /// TAG_HANDLES records among them, and whether a TAG_CLOSE record was among them (for
    /// `discard`). Stops at a corrupt record.
    fn drain_handles(st: &mut InState) -> (Vec<Vec<HandleDesc>>, bool) {
        let mut unread = Vec::new();
        let mut closed = false;
        if st.copy_out {
            while let Ok(Some(s)) = Self::stage(st) {
                if s.tag == TAG_HANDLES {
                    unread.extend(parse_handles(&s.bytes).ok().map(|(d, _)| d));
                }
                closed |= s.tag == TAG_CLOSE;
            }
            return (unread, closed);
        }
        while let Ok(Some(rec)) = st.cons.peek() {
            // SAFETY: not copy-out mode: a trusted same-uid producer (as in `try_pop`).
            let bytes = unsafe { st.cons.bytes(rec) };
            let tag = record_tag(bytes);
            if tag == Some(TAG_HANDLES) {
                unread.extend(parse_handles(&bytes[TAG_LEN..]).ok().map(|(d, _)| d));
            }
            closed |= tag == Some(TAG_CLOSE);
            st.cons.consume(rec);
            Self::took(st, rec, true);
        }
        Self::sweep(st);
        (unread, closed)
    }

    /// A TAG_CLOSE record was read (only on a ring bound to an offer; on any other it is an
    /// unknown record, and the session ends): the channel is closed, as by the CLOSE frame
    /// its sender did not send. The session hears it from the receiving thread
    /// (`tell_closed`, once the inbox let go of its locks), so closing a reply channel wakes
    /// no session thread.
    fn closed_in_ring(&self) -> LanePop {
        self.close_read.store(true, Ordering::Release);
        self.closed.store(true, Ordering::Release);
        self.finished.store(true, Ordering::Release);
        LanePop::Done
    }

    /// Whether the writer closed the channel with a TAG_CLOSE record, read or still waiting
    /// in the ring. For the session's end, which must tell a channel closed in order (its
    /// receiver reads what is left, then `Closed`) from one cut off.
    pub(crate) fn close_pending(&self) -> bool {
        if !self.offered() {
            return false;
        }
        if self.close_read.load(Ordering::Acquire) {
            return true;
        }
        let mut st = self.lock();
        if st.staged.as_ref().is_some_and(|s| s.tag == TAG_CLOSE) {
            return true;
        }
        let copy_out = st.copy_out;
        let mut found = false;
        let _ = st.cons.look_ahead(|cons, rec| {
            let tag = if copy_out {
                // Copy-out mode never reads the ring in place.
                record_tag(&cons.to_vec(rec))
            } else {
                // SAFETY: not copy-out mode: a trusted same-uid producer (as in `try_pop`).
                record_tag(unsafe { cons.bytes(rec) })
            };
            found = tag == Some(TAG_CLOSE);
            found
        });
        found
    }

    /// Tells the session that a TAG_CLOSE record closed the channel (see `closed_in_ring`):
    /// the channel's entry goes, and its ring can go back among the peer's offers. Once.
    fn tell_closed(&self) {
        if !self.close_read.load(Ordering::Acquire) || self.close_told.swap(true, Ordering::AcqRel)
        {
            return;
        }
        if let Some(conn) = self.conn.upgrade() {
            conn.closed_in_ring(self.bound.load(Ordering::Relaxed));
        }
    }

    /// Opens the channels of a TAG_HANDLES record's descriptors. `None` when the session is
    /// gone or the peer broke the protocol (the session then ends): the lane is done.
    fn import(&self, descs: &[HandleDesc]) -> Option<Vec<crate::channel::Handle>> {
        let handles = self.conn.upgrade()?.import_from_ring(descs);
        if handles.is_none() {
            self.dead.store(true, Ordering::Release);
            self.finished.store(true, Ordering::Release);
        }
        handles
    }

    /// Lends the TAG_MESSAGE record `rec`, just consumed, as the message after its tag.
    fn lend(&self, mut st: MutexGuard<'_, InState>, rec: Record) -> Lent {
        // SAFETY: not copy-out mode (the callers check): a trusted same-uid producer.
        let ptr = unsafe { st.cons.bytes(rec) }.as_ptr().wrapping_add(TAG_LEN);
        Self::took(&mut st, rec, false);
        drop(st);
        let lender: Arc<dyn Lender> = self.me.upgrade().expect("a lane in use is alive");
        // SAFETY: the payload starts 16 bytes into a 16-byte aligned record, and stays
        // unchanged until released, which only `give_back(rec.pos())` does.
        unsafe { Lent::new(ptr, rec.len() - TAG_LEN, rec.pos(), lender) }
    }

    /// Notes a record just consumed (see `Outstanding::push`), and wakes a sender waiting
    /// for room if that released some.
    fn took(st: &mut InState, rec: Record, done: bool) {
        if let Some(word) = st.outstanding.push(&mut st.cons, rec, done) {
            let _ = futex_wake(word, 1);
        }
    }

    /// Releases every leading record that is done, and wakes a sender waiting for room.
    fn sweep(st: &mut InState) {
        if let Some(word) = st.outstanding.sweep(&mut st.cons) {
            let _ = futex_wake(word, 1);
        }
    }

    /// `Lane::try_pop`; with `solo` (the inbox's "this is my only lane" flag), a record is
    /// taken only if the flag still holds once the record's announced rings are known to be
    /// dispatched. The rings count is read first: a RING frame is counted after its lane is
    /// added, so a reader that sees the count sees the inbox's new lane too, and leaves the
    /// ordering between lanes to the inbox's general path.
    fn pop_checked(&self, solo: Option<&dyn Fn() -> bool>) -> LanePop {
        if self.finished.load(Ordering::Acquire) {
            return LanePop::Done;
        }
        // Read the flags before the ring: a close or death seen here was sent after every
        // record it covers, so an empty ring below really is the end.
        let closed = self.closed.load(Ordering::Acquire) || self.dead.load(Ordering::Acquire);
        let mut st = self.lock();
        loop {
            if st.on_socket > 0 {
                if let Some(e) = st.socket.pop_front() {
                    st.on_socket -= 1;
                    st.on_socket_seq.pop_front();
                    return LanePop::Entry(e);
                }
                if closed {
                    // The promised message never came: the session ended.
                    break;
                }
                return LanePop::Empty;
            }
            if st.copy_out {
                let staged = match Self::stage(&mut st) {
                    Ok(Some(s)) if self.held_back(s.rings) || solo.is_some_and(|f| !f()) => {
                        st.staged = Some(s);
                        return LanePop::Empty;
                    }
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        if closed {
                            break;
                        }
                        return LanePop::Empty;
                    }
                    Err(c) => return self.corrupt(st, c),
                };
                match staged.tag {
                    TAG_MESSAGE => {
                        drop(st);
                        // A private copy, like a message that came on the socket.
                        return LanePop::Entry(Entry {
                            packet: Packet {
                                bytes: staged.bytes,
                                handles: Vec::new(),
                            },
                            credit: None,
                            lent: None,
                        });
                    }
                    TAG_HANDLES => {
                        let (descs, at) = match parse_handles(&staged.bytes) {
                            Ok(parsed) => parsed,
                            Err(what) => return self.corrupt(st, Corrupt::new(what)),
                        };
                        drop(st);
                        let Some(handles) = self.import(&descs) else {
                            return LanePop::Done;
                        };
                        // The archive to the start of the buffer, which keeps it 16-aligned.
                        let mut bytes = staged.bytes;
                        let len = bytes.len() - at;
                        bytes.copy_within(at.., 0);
                        bytes.resize(len, 0);
                        return LanePop::Entry(Entry {
                            packet: Packet { bytes, handles },
                            credit: None,
                            lent: None,
                        });
                    }
                    TAG_ON_SOCKET => {
                        st.on_socket += 1;
                        st.on_socket_seq.push_back(staged.seq);
                        continue;
                    }
                    TAG_CLOSE if self.offered() => {
                        drop(st);
                        return self.closed_in_ring();
                    }
                    _ => return self.corrupt(st, Corrupt::new("unknown record tag")),
                }
            }
            let rec = match st.cons.peek() {
                Ok(Some(rec)) => rec,
                Ok(None) => {
                    if closed {
                        break;
                    }
                    return LanePop::Empty;
                }
                Err(c) => return self.corrupt(st, c),
            };
            // SAFETY: not copy-out mode, so the producer is a same-uid libchan peer (with
            // `Trust::SameUid` the SHM feature is only negotiated with one), trusted to follow
            // the ring protocol.
            let bytes = unsafe { st.cons.bytes(rec) };
            let tag = record_tag(bytes);
            let (rings, seq) = (tag_rings(bytes), tag_seq(bytes));
            // The payload, as a pointer: it stays valid past `consume` (until released).
            let payload = bytes.as_ptr().wrapping_add(TAG_LEN);
            if self.held_back(rings) || solo.is_some_and(|f| !f()) {
                return LanePop::Empty;
            }
            let handles = (tag == Some(TAG_HANDLES)).then(|| parse_handles(&bytes[TAG_LEN..]));
            st.cons.consume(rec);
            match tag {
                Some(TAG_HANDLES) => {
                    let (descs, at) = match handles {
                        Some(Ok(parsed)) => parsed,
                        Some(Err(what)) => return self.corrupt(st, Corrupt::new(what)),
                        None => unreachable!("parsed above for this tag"),
                    };
                    Self::took(&mut st, rec, false);
                    drop(st);
                    let Some(handles) = self.import(&descs) else {
                        return LanePop::Done;
                    };
                    let lender: Arc<dyn Lender> =
                        self.me.upgrade().expect("a lane in use is alive");
                    // SAFETY: as for TAG_MESSAGE below; the archive starts `at` bytes into the
                    // payload, a multiple of 16, so it is 16-byte aligned too.
                    let lent = unsafe {
                        Lent::new(
                            payload.wrapping_add(at),
                            rec.len() - TAG_LEN - at,
                            rec.pos(),
                            lender,
                        )
                    };
                    return LanePop::Entry(Entry {
                        packet: Packet {
                            bytes: Bytes::new(),
                            handles,
                        },
                        credit: None,
                        lent: Some(lent),
                    });
                }
                Some(TAG_MESSAGE) => return LanePop::Entry(Entry::lent(self.lend(st, rec))),
                Some(TAG_ON_SOCKET) => {
                    Self::took(&mut st, rec, true);
                    Self::sweep(&mut st);
                    st.on_socket += 1;
                    st.on_socket_seq.push_back(seq);
                }
                Some(TAG_CLOSE) if self.offered() => {
                    Self::took(&mut st, rec, true);
                    Self::sweep(&mut st);
                    drop(st);
                    return self.closed_in_ring();
                }
                _ => return self.corrupt(st, Corrupt::new("unknown record tag")),
            }
        }
        self.finished.store(true, Ordering::Release);
        LanePop::Done
    }
}

impl Drop for RingIn {
    /// A ring the peer offered goes back among its offers we hold once its channel is closed
    /// too (see `conn::offer`): nothing of it is read or held here any more.
    fn drop(&mut self) {
        let chan = self.bound.load(Ordering::Relaxed);
        if chan != 0 {
            if let Some(conn) = self.conn.upgrade() {
                conn.offer_ring_released(chan);
            }
        }
    }
}

impl Lender for RingIn {
    fn give_back(&self, token: u64) {
        let mut st = self.lock();
        st.outstanding.done(token);
        Self::sweep(&mut st);
    }
}

impl Lane for RingIn {
    fn take_lent(&self, solo: &dyn Fn() -> bool) -> Option<Lent> {
        // Copy-out mode never lends; a receiver on another thread holding the lane, a message
        // on the socket first, a record to wait for, or anything but a plain message: the
        // general path (`try_pop`) decides.
        if self.untrusted || self.finished.load(Ordering::Relaxed) {
            return None;
        }
        let mut st = self.state.try_lock().ok()?;
        if st.on_socket > 0 {
            return None;
        }
        let rec = st.cons.peek().ok()??;
        // SAFETY: not copy-out mode: a trusted same-uid producer (as in `try_pop`).
        let bytes = unsafe { st.cons.bytes(rec) };
        if bytes.len() < TAG_LEN
            || bytes[..4] != TAG_MESSAGE.to_le_bytes()
            || tag_rings(bytes) > self.rings_seen.load(Ordering::Acquire)
            || !solo()
        {
            return None;
        }
        st.cons.consume(rec);
        Some(self.lend(st, rec))
    }

    fn try_pop(&self) -> LanePop {
        self.pop_checked(None)
    }

    fn try_pop_solo(&self, solo: &dyn Fn() -> bool) -> LanePop {
        self.pop_checked(Some(solo))
    }

    fn ready(&self) -> bool {
        if self.closed.load(Ordering::Relaxed) || self.dead.load(Ordering::Relaxed) {
            return true;
        }
        match self.state.try_lock() {
            Ok(mut st) => {
                if st.on_socket > 0 {
                    return !st.socket.is_empty();
                }
                let seen = self.rings_seen.load(Ordering::Acquire);
                if let Some(s) = &st.staged {
                    return s.rings <= seen;
                }
                match st.cons.peek() {
                    Ok(None) => false,
                    // Copy-out mode never reads the ring in place: `try_pop` will look.
                    Ok(Some(_)) if st.copy_out => true,
                    // SAFETY: not copy-out mode: a trusted same-uid producer.
                    Ok(Some(rec)) => tag_rings(unsafe { st.cons.bytes(rec) }) <= seen,
                    Err(_) => true,
                }
            }
            Err(_) => true,
        }
    }

    fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    fn try_finish(&self) -> bool {
        if self.finished.load(Ordering::Acquire) {
            return true;
        }
        // As in `pop_checked`: the flags before the ring, so an empty ring really is the end.
        if !(self.closed.load(Ordering::Acquire) || self.dead.load(Ordering::Acquire)) {
            return false;
        }
        let mut st = self.lock();
        let empty = if st.on_socket > 0 {
            // A promised message that never came (the session ended) ends the lane too.
            st.socket.is_empty()
        } else {
            match st.cons.peek() {
                Ok(peeked) => peeked.is_none() && st.staged.is_none(),
                Err(c) => {
                    // Under the inbox's lanes lock: the session ends from `retire`.
                    drop(st);
                    self.dead.store(true, Ordering::Release);
                    self.finished.store(true, Ordering::Release);
                    *self.broke.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                    return true;
                }
            }
        };
        if empty {
            drop(st);
            self.finished.store(true, Ordering::Release);
        }
        empty
    }

    fn order(&self) -> Option<(usize, u64)> {
        let mut st = self.lock();
        if let Some(&seq) = st.on_socket_seq.front() {
            return Some((self.session, seq));
        }
        if st.copy_out {
            // Never read in place: copy the next record out now, for `try_pop` to take.
            // A corrupt ring stays corrupt, so `try_pop` reports it.
            if st.staged.is_none() {
                st.staged = Self::stage(&mut st).ok()?;
            }
            return st.staged.as_ref().map(|s| (self.session, s.seq));
        }
        let rec = st.cons.peek().ok()??;
        // SAFETY: as in `try_pop`: not copy-out mode, so a trusted same-uid producer.
        let bytes = unsafe { st.cons.bytes(rec) };
        Some((self.session, tag_seq(bytes)))
    }

    fn discard(&self) {
        self.finished.store(true, Ordering::Release);
        let (dropped, unread, closed) = {
            let mut st = self.lock();
            // The sender stops at its next message, without waiting for our RESET.
            st.cons.mark_gone();
            // Pairs with the fence in `RingOut::gone_after_commit`: a record committed before
            // the sender could see the mark is seen by the drain below.
            std::sync::atomic::fence(Ordering::SeqCst);
            let (unread, closed) = Self::drain_handles(&mut st);
            st.staged = None;
            (std::mem::take(&mut st.socket), unread, closed)
        };
        if closed && self.offered() {
            // The inbox tells the session (`retire`), with no lock held. A ring discarded as
            // its channel is bound (born closed) is not retired: its record is found later by
            // `look_for_closes`, as for any ring whose reader went first.
            self.closed_in_ring();
        }
        // Channels that unread records open are opened and closed at once, as they would be
        // for a DATA frame on a reset channel: their receivers (the peer's) see them close.
        for descs in unread {
            drop(self.import(&descs));
        }
        for e in dropped {
            if let Some(c) = &e.credit {
                c.consumed(e.body_len());
            }
        }
    }

    fn park_prepare(&self) -> &AtomicU32 {
        let word = self.word();
        release::park_prepare(word);
        word
    }

    fn park_done(&self) {
        self.word().store(0, Ordering::Relaxed);
    }

    fn retire(&self) {
        self.tell_closed();
        let broke = self.broke.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(c), Some(conn)) = (broke, self.conn.upgrade()) {
            conn.fail(&format!("peer broke a channel's ring: {c}"));
        }
    }

    fn unpark(&self) {
        let word = self.word();
        // An untrusted peer can zero the word under a sleeping receiver; the wake for a local
        // event (above all the session's end) must not depend on it.
        if release::take_parked(word, self.untrusted) {
            let _ = futex_wake(word, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::HandleKind;

    /// The payload of a TAG_HANDLES record after its tag: `n` in the count, `descs`, an archive.
    fn body(n: u32, descs: &[HandleDesc], archive: &[u8]) -> Vec<u8> {
        let mut b = n.to_le_bytes().to_vec();
        b.resize(HANDLES_HEAD, 0);
        for d in descs {
            b.extend_from_slice(&d.encode());
        }
        b.extend_from_slice(archive);
        b
    }

    fn sender_ring(chan: u32) -> HandleDesc {
        HandleDesc {
            kind: HandleKind::SenderRing,
            chan,
            fingerprint: 7,
            offer: 3,
        }
    }

    #[test]
    fn handles_records_parse_and_malformed_ones_are_refused() {
        let d = [sender_ring(5), sender_ring(9)];
        let ok = body(2, &d, b"archive!");
        assert_eq!(parse_handles(&ok), Ok((d.to_vec(), HANDLES_HEAD + 32)));
        assert_eq!(&ok[HANDLES_HEAD + 32..], b"archive!");

        let bad = |b: &[u8]| parse_handles(b).unwrap_err();
        assert_eq!(bad(&ok[..8]), "handles record shorter than its count");
        assert_eq!(
            bad(&body(0, &[], b"")),
            "bad handle count in a handles record"
        );
        let many = vec![sender_ring(5); MAX_RING_HANDLES + 1];
        assert_eq!(
            bad(&body(many.len() as u32, &many, b"")),
            "bad handle count in a handles record"
        );
        let mut reserved = ok.clone();
        reserved[7] = 1;
        assert_eq!(bad(&reserved), "bad handle count in a handles record");
        assert_eq!(
            bad(&body(3, &d, b"")),
            "handles record shorter than its descriptors"
        );
        let mut broken = ok.clone();
        broken[HANDLES_HEAD] = 99; // an unknown handle kind
        assert_eq!(bad(&broken), "bad handle descriptor in a handles record");
    }
}
