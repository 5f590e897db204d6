//! The in-process (`mem`) transport on the shared-memory ring: the same ring, over heap memory.
//!
//! A channel's local senders write into one [`LocalRing`] that its inbox reads as a lane, so
//! an in-process message travels exactly like a shared-memory one: serialized straight into a
//! ring record by the sender, validated and read in place by the receiver, the record handed
//! back when the `Msg` drops, in any order. Handles (channel ends, fds) are Rust objects and
//! cannot live in ring bytes: a message that carries them, or that is larger than an eighth of
//! the ring, goes as a boxed packet whose pointer is the record (the ring is private to this
//! process, so a pointer is a fine payload); order is the ring's either way.
//!
//! The channel is bounded twice: by its capacity in messages (as `pipe_with_capacity` says) and
//! by the ring's bytes.
//!
//! The sending and the receiving thread each write only lines of their own: the two locks sit
//! on separate cache lines, and the count of messages in the channel is two counters, one each
//! side writes (`sent`, `taken`), rather than one that both change for every message. A sender
//! reads `taken` only when its last look says the channel is full, the way the ring's producer
//! reads `head`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use super::inbox::{Entry, PushError, Wait};
use super::source::{Lane, LanePop};
use crate::message::{Lender, Lent, Packet};
use crate::ring::region::HeapRegion;
use crate::ring::release::{self, Outstanding};
use crate::ring::spsc::{pair, Consumer, Producer, Record};
use crate::sys::{futex_wait, futex_wake};

/// Tag length in front of each record's payload (keeps the archive 16-byte aligned).
const TAG_LEN: usize = 16;
/// The record holds an archive.
const TAG_ARCHIVE: u32 = 1;
/// The record holds a `Box<Packet>` pointer (a message with handles, or a large one).
const TAG_BOXED: u32 = 2;

/// The longest one futex sleep lasts before the sleeper re-checks on its own.
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// How long a sender busy-waits for room before it sleeps.
const SPIN: Duration = Duration::from_micros(10);

type Region = Arc<HeapRegion>;

/// The largest record that goes in the ring itself: an eighth of it. Larger messages go
/// boxed, so that a receiver that keeps several of them (each `Msg` read in place holds its
/// record until it drops) does not fill the ring and stall its sender: a boxed message holds
/// 48 bytes of ring. The archive is written once either way (into the ring, or into the
/// box's buffer), and read in place either way.
fn in_ring(prod: &Producer<Region>) -> usize {
    (prod.capacity() / 8).min(prod.max_len())
}

/// The ring behind an in-process channel's local senders.
pub(crate) struct LocalRing {
    me: Weak<LocalRing>,
    prod: CachePadded<Mutex<ProdState>>,
    cons: CachePadded<Mutex<ConsState>>,
    /// Messages written into the ring; only senders change it, under `prod`'s lock.
    sent: CachePadded<AtomicUsize>,
    /// Messages taken out of the ring (or dropped with it); only the receiving side changes it,
    /// under `cons`'s lock. `sent - taken` messages are waiting.
    taken: CachePadded<AtomicUsize>,
    cap: usize,
    /// The ring's "consumer parked" and "producer parked" words; they point into the region,
    /// which `prod` and `cons` keep alive as long as `self`.
    data_word: *const AtomicU32,
    room_word: *const AtomicU32,
    discarded: AtomicBool,
}

// SAFETY: the two raw pointers point into the heap region owned (through `Arc`) by `prod` and
// `cons`, which live as long as `self`; they are only used for atomic operations. Everything
// else is `Send + Sync` on its own.
unsafe impl Send for LocalRing {}
// SAFETY: as for `Send`.
unsafe impl Sync for LocalRing {}

struct ProdState {
    prod: Producer<Region>,
    /// `taken` as the senders last read it: the channel has room for a message while
    /// `sent - taken_seen < cap`, and `taken` is read again only when that says full.
    taken_seen: usize,
}

struct ConsState {
    cons: Consumer<Region>,
    /// Records handed out (archives) or taken (boxes), oldest first, with whether done.
    outstanding: Outstanding,
}

impl LocalRing {
    /// A ring for a channel of `cap` messages: about 256 bytes a message, from 4 KiB to 1 MiB.
    pub(crate) fn new(cap: usize) -> Arc<LocalRing> {
        let bytes = cap
            .saturating_mul(256)
            .next_power_of_two()
            .clamp(4096, 1 << 20);
        let (prod, cons) = pair(bytes);
        let room_word: *const AtomicU32 = prod.room_word();
        let data_word: *const AtomicU32 = cons.data_word();
        Arc::new_cyclic(|me| LocalRing {
            me: me.clone(),
            prod: CachePadded::new(Mutex::new(ProdState {
                prod,
                taken_seen: 0,
            })),
            cons: CachePadded::new(Mutex::new(ConsState {
                cons,
                outstanding: Outstanding::default(),
            })),
            sent: CachePadded::new(AtomicUsize::new(0)),
            taken: CachePadded::new(AtomicUsize::new(0)),
            cap: cap.max(1),
            data_word,
            room_word,
            discarded: AtomicBool::new(false),
        })
    }

    fn prod(&self) -> MutexGuard<'_, ProdState> {
        self.prod.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cons(&self) -> MutexGuard<'_, ConsState> {
        self.cons.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data_word(&self) -> &AtomicU32 {
        // SAFETY: see the field.
        unsafe { &*self.data_word }
    }

    fn room_word(&self) -> &AtomicU32 {
        // SAFETY: see the field.
        unsafe { &*self.room_word }
    }

    /// Messages waiting in the ring.
    pub(crate) fn len(&self) -> usize {
        // `taken` first: `sent` is at least what it was when the messages taken were sent.
        let taken = self.taken.load(Ordering::Acquire);
        self.sent.load(Ordering::Acquire).saturating_sub(taken)
    }

    /// Counts a message about to be committed, so the receiver never takes one before it is
    /// counted. Under `prod`'s lock, the only place `sent` changes.
    fn count_sent(&self) {
        let sent = self.sent.load(Ordering::Relaxed);
        self.sent.store(sent + 1, Ordering::Release);
    }

    /// Sends `packet`, waiting for room as `wait` allows; `gone` says the receiver went away.
    pub(crate) fn push(
        &self,
        packet: Packet,
        wait: Wait,
        gone: &dyn Fn() -> bool,
    ) -> Result<(), PushError> {
        let mut st = self.prod();
        let in_place =
            packet.handles.is_empty() && packet.bytes.len() + TAG_LEN <= in_ring(&st.prod);
        let len = if in_place {
            TAG_LEN + packet.bytes.len()
        } else {
            TAG_LEN + 8
        };
        self.wait_room(&mut st, len, wait, gone)?;
        let mut grant = st
            .prod
            .reserve(len)
            .ok()
            .flatten()
            .expect("room checked under the producer lock");
        if in_place {
            grant.write_at(0, &tag(TAG_ARCHIVE));
            grant.write_at(TAG_LEN, &packet.bytes);
        } else {
            let ptr = Box::into_raw(Box::new(packet)) as usize as u64;
            grant.write_at(0, &tag(TAG_BOXED));
            grant.write_at(TAG_LEN, &ptr.to_le_bytes());
        }
        self.count_sent();
        grant.commit();
        if let Some(w) = st.prod.wake_needed() {
            let _ = futex_wake(w, 1);
        }
        Ok(())
    }

    /// Serializes a message straight into a record (see `Outlet::send_in_place`): `None` when
    /// it did not go this way.
    pub(crate) fn push_in_place(
        &self,
        estimate: usize,
        wait: Wait,
        gone: &dyn Fn() -> bool,
        encode: &mut dyn FnMut(*mut u8, usize) -> Option<usize>,
    ) -> Option<Result<(), PushError>> {
        let mut st = self.prod();
        let len = TAG_LEN + estimate;
        if len > in_ring(&st.prod) {
            // Boxed instead, by the caller's fallback (see `in_ring`).
            return None;
        }
        if let Err(e) = self.wait_room(&mut st, len, wait, gone) {
            return Some(Err(e));
        }
        let mut grant = st
            .prod
            .reserve(len)
            .ok()
            .flatten()
            .expect("room checked under the producer lock");
        grant.write_at(0, &tag(TAG_ARCHIVE));
        let cap = grant.len() - TAG_LEN;
        let at = grant.as_mut_ptr().wrapping_add(TAG_LEN);
        match encode(at, cap) {
            Some(n) if n <= cap => {
                self.count_sent();
                grant.commit_len(TAG_LEN + n);
            }
            // Dropped uncommitted: it becomes padding.
            _ => return None,
        }
        if let Some(w) = st.prod.wake_needed() {
            let _ = futex_wake(w, 1);
        }
        Some(Ok(()))
    }

    /// Waits (as `wait` allows) until a record of `len` bytes fits and the channel holds fewer
    /// than its capacity in messages.
    fn wait_room(
        &self,
        st: &mut MutexGuard<'_, ProdState>,
        len: usize,
        wait: Wait,
        gone: &dyn Fn() -> bool,
    ) -> Result<(), PushError> {
        let room = |st: &mut ProdState| {
            let sent = self.sent.load(Ordering::Relaxed);
            if sent.wrapping_sub(st.taken_seen) >= self.cap {
                st.taken_seen = self.taken.load(Ordering::Acquire);
            }
            sent.wrapping_sub(st.taken_seen) < self.cap
                // A heap ring of our own cannot be corrupt; an error would read as no room.
                && st.prod.has_room(len).unwrap_or(false)
        };
        let mut spun = false;
        loop {
            if gone() || self.discarded.load(Ordering::Acquire) {
                return Err(PushError::Disconnected);
            }
            if room(st) {
                return Ok(());
            }
            if wait.expired() {
                return Err(if matches!(wait, Wait::No) {
                    PushError::Full
                } else {
                    PushError::Timeout
                });
            }
            if !spun {
                spun = true;
                let start = Instant::now();
                while start.elapsed() < SPIN && !room(st) && !gone() {
                    std::hint::spin_loop();
                }
                continue;
            }
            // Other senders wait on the lock meanwhile; they would wait for room anyway.
            st.prod.park_prepare();
            if !room(st) && !gone() && !self.discarded.load(Ordering::Acquire) {
                let timeout = match wait {
                    Wait::Until(t) => t.saturating_duration_since(Instant::now()).min(MAX_SLEEP),
                    _ => MAX_SLEEP,
                };
                let _ = futex_wait(self.room_word(), 1, Some(timeout));
            }
            st.prod.park_done();
        }
    }

    /// The receiver went away: wake every sender waiting for room, so it sees that.
    pub(crate) fn wake_senders(&self) {
        let w = self.room_word();
        w.store(0, Ordering::Release);
        let _ = futex_wake(w, u32::MAX);
    }

    /// A message left the ring (taken or dropped): uncount it, and wake a sender waiting for
    /// room if one sleeps.
    fn uncount(&self, st: &ConsState) {
        // Under `cons`'s lock, the only place `taken` changes.
        let taken = self.taken.load(Ordering::Relaxed);
        self.taken.store(taken + 1, Ordering::Release);
        if let Some(w) = st.cons.wake_needed() {
            let _ = futex_wake(w, 1);
        }
    }

    /// Notes a record just consumed (see `Outstanding::push`).
    fn took(st: &mut ConsState, rec: Record, done: bool) {
        if let Some(w) = st.outstanding.push(&mut st.cons, rec, done) {
            let _ = futex_wake(w, 1);
        }
    }

    /// Releases every leading record that is done.
    fn sweep(st: &mut ConsState) {
        if let Some(w) = st.outstanding.sweep(&mut st.cons) {
            let _ = futex_wake(w, 1);
        }
    }

    /// Takes the next record: an archive lent in place, or a boxed packet.
    fn take(&self, st: &mut ConsState) -> Option<Entry> {
        let rec = st.cons.peek().ok()??;
        st.cons.consume(rec);
        let (kind, word, payload, len) = {
            // SAFETY: the producer is this module's `push`, in this process, which never
            // writes a committed record before its release.
            let bytes = unsafe { st.cons.bytes(rec) };
            let kind = u32::from_le_bytes(bytes[..4].try_into().expect("a tag"));
            let word = bytes
                .get(TAG_LEN..TAG_LEN + 8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            (kind, word, bytes[TAG_LEN..].as_ptr(), bytes.len() - TAG_LEN)
        };
        self.uncount(st);
        if kind == TAG_BOXED {
            Self::took(st, rec, true);
            Self::sweep(st);
            // SAFETY: `push` wrote this pointer from `Box::into_raw`, and this is the only
            // place that takes it back, once per record (the record is consumed above).
            let packet = unsafe { Box::from_raw(word as usize as *mut Packet) };
            return Some(Entry::local(*packet));
        }
        Some(Entry::lent(self.lend(st, rec, payload, len)))
    }

    /// Lends the archive record `rec`, just consumed and uncounted, whose payload is the `len`
    /// bytes at `payload`.
    fn lend(&self, st: &mut ConsState, rec: Record, payload: *const u8, len: usize) -> Lent {
        Self::took(st, rec, false);
        let lender: Arc<dyn Lender> = self.me.upgrade().expect("a ring in use is alive");
        // SAFETY: the payload starts 16 bytes into a 16-byte aligned record and stays unchanged
        // until released, which only `give_back(rec.pos())` does.
        unsafe { Lent::new(payload, len, rec.pos(), lender) }
    }
}

fn tag(kind: u32) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    t[..4].copy_from_slice(&kind.to_le_bytes());
    t
}

impl Lender for LocalRing {
    fn give_back(&self, token: u64) {
        let mut st = self.cons();
        st.outstanding.done(token);
        Self::sweep(&mut st);
    }
}

impl Lane for LocalRing {
    fn take_lent(&self, _solo: &dyn Fn() -> bool) -> Option<Lent> {
        // A boxed packet, a receiver on another thread holding the lock, or a discarded ring:
        // the general path (`try_pop`) decides. (Local records wait for no other lane: `solo`
        // is not needed.)
        if self.discarded.load(Ordering::Relaxed) {
            return None;
        }
        let mut st = self.cons.try_lock().ok()?;
        let rec = st.cons.peek().ok()??;
        // SAFETY: as in `take`: the producer is this module's `push`.
        let bytes = unsafe { st.cons.bytes(rec) };
        if bytes[..4] != TAG_ARCHIVE.to_le_bytes() {
            return None;
        }
        let (payload, len) = (bytes[TAG_LEN..].as_ptr(), bytes.len() - TAG_LEN);
        st.cons.consume(rec);
        self.uncount(&st);
        Some(self.lend(&mut st, rec, payload, len))
    }

    fn try_pop(&self) -> LanePop {
        if self.discarded.load(Ordering::Acquire) {
            return LanePop::Done;
        }
        match self.take(&mut self.cons()) {
            Some(e) => LanePop::Entry(e),
            None => LanePop::Empty,
        }
    }

    fn ready(&self) -> bool {
        self.taken.load(Ordering::Acquire) != self.sent.load(Ordering::Acquire)
            || self.discarded.load(Ordering::Relaxed)
    }

    fn finished(&self) -> bool {
        self.discarded.load(Ordering::Acquire)
    }

    fn try_finish(&self) -> bool {
        // A local ring ends only when discarded.
        self.finished()
    }

    fn discard(&self) {
        self.discarded.store(true, Ordering::Release);
        // Drop every message still in the ring (closing the handles of boxed ones).
        let mut dropped = Vec::new();
        {
            let mut st = self.cons();
            while let Some(e) = self.take(&mut st) {
                dropped.push(e);
            }
        }
        drop(dropped);
        self.wake_senders();
    }

    fn order(&self) -> Option<(usize, u64)> {
        // Its own ordering domain: one ring, already in order.
        self.ready().then_some((self as *const Self as usize, 0))
    }

    fn park_prepare(&self) -> &AtomicU32 {
        let word = self.data_word();
        release::park_prepare(word);
        word
    }

    fn park_done(&self) {
        self.data_word().store(0, Ordering::Relaxed);
    }

    fn unpark(&self) {
        let word = self.data_word();
        if release::take_parked(word, false) {
            let _ = futex_wake(word, 1);
        }
    }
}

impl Drop for LocalRing {
    /// Frees the boxed packets nobody took (closing their handles).
    fn drop(&mut self) {
        let st = self.cons.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut dropped = Vec::new();
        while let Some(rec) = st.cons.peek().ok().flatten() {
            st.cons.consume(rec);
            // SAFETY: as in `take`: our own producer, which is gone now.
            let bytes = unsafe { st.cons.bytes(rec) };
            if bytes[..4] == TAG_BOXED.to_le_bytes() {
                let word = u64::from_le_bytes(bytes[TAG_LEN..TAG_LEN + 8].try_into().expect("8"));
                // SAFETY: as in `take`: written by `push` from `Box::into_raw`, never taken.
                dropped.push(unsafe { Box::from_raw(word as usize as *mut Packet) });
            }
            st.cons.release();
        }
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use crate::ring::region::Region;

    /// A `pipe` message is read where the sender serialized it: inside the channel's heap
    /// ring. One with a handle goes boxed and still arrives in order.
    #[test]
    fn pipe_messages_are_read_in_the_ring() {
        let (tx, rx) = crate::pipe::<Vec<u8>>();
        tx.send(vec![5u8; 100]).unwrap();
        let ring = rx.core.0.local_for_tests().expect("a local ring");
        let (base, len) = {
            let st = ring.prod();
            (
                st.prod.region().as_ptr() as usize,
                Region::len(st.prod.region()),
            )
        };
        let m = rx.recv().unwrap();
        let at = m.as_bytes().as_ptr() as usize;
        assert!(base <= at && at < base + len, "read outside the ring");
        assert_eq!(m.as_slice(), [5u8; 100]);

        let (stx, srx) = crate::pipe::<crate::Sender<u8>>();
        let (inner_tx, inner_rx) = crate::pipe::<u8>();
        stx.send(inner_tx).unwrap();
        stx.send(crate::pipe::<u8>().0).unwrap();
        let first = srx.recv().unwrap();
        first.take(&*first).unwrap().send(9).unwrap();
        assert_eq!(*inner_rx.recv().unwrap(), 9);
        drop(srx.recv().unwrap());
    }

    /// The capacity in messages holds exactly, round after round, though senders re-read the
    /// receiver's count only when they find the channel full.
    #[test]
    fn capacity_in_messages_holds_round_after_round() {
        let (tx, rx) = crate::pipe_with_capacity::<u64>(3);
        let mut next = 0u64;
        let mut expect = 0u64;
        for round in 0..20 {
            while tx.try_send(next).is_ok() {
                next += 1;
            }
            assert_eq!(rx.len(), 3, "round {round}: full at the capacity");
            // One out, one in; a message kept does not count against the capacity.
            let kept = rx.recv().unwrap();
            assert_eq!(*kept, expect);
            expect += 1;
            assert_eq!(rx.len(), 2);
            tx.try_send(next).unwrap();
            next += 1;
            assert!(tx.try_send(next).unwrap_err().is_full(), "round {round}");
            drop(kept);
            for _ in 0..3 {
                assert_eq!(*rx.recv().unwrap(), expect);
                expect += 1;
            }
            assert_eq!(rx.len(), 0, "round {round}: drained");
        }
    }

    /// Boxed messages left in the ring are freed with it, closing their handles.
    #[test]
    fn unreceived_boxed_messages_close_their_handles() {
        let (stx, srx) = crate::pipe::<crate::Sender<u8>>();
        let (inner_tx, inner_rx) = crate::pipe::<u8>();
        stx.send(inner_tx).unwrap();
        drop((stx, srx));
        assert_eq!(inner_rx.recv().unwrap_err(), crate::RecvError::Closed);
    }
}
