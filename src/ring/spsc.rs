//! A single-producer single-consumer ring of variable-size byte records.
//!
//! # Layout
//!
//! ```text
//! region:  | head line (128 B) | tail line (128 B) | data area (capacity bytes, a power of two) |
//! line:    | index u64 | parked u32 | unused to 128 B |
//! record:  | commit word u32 | reserved (12 B) | payload (len B) | pad to 16 |
//! ```
//!
//! `head` (written by the consumer) and `tail` (written by the producer) are `u64` byte
//! positions that only grow; a position's place in the data area is `pos & (capacity - 1)`.
//! Each sits alone on its own 128-byte line, so the two sides never write the same line on the
//! fast path. Records are 16-byte aligned (so payloads are too) and never straddle the end of
//! the data area: when a record does not fit before the end, a padding record fills the rest
//! and the record starts at offset 0. A record takes at most half the data area, so it always
//! fits in an empty ring whatever the wrap point.
//!
//! Each line also holds a doorbell word (`parked`): the tail line the *consumer parked* word,
//! the head line the *producer parked* word. See [Doorbells](#doorbells).
//!
//! # Protocol
//!
//! - The producer *reserves* space: it checks `tail + size - head <= capacity` against its cached
//!   copy of `head` (reloading `head` only when that check fails), writes padding if needed, zeroes
//!   the new record's commit word ("reserved, not committed"), then moves `tail` (Release).
//! - It writes the payload and *commits* by storing the length into the commit word (Release):
//!   length-as-commit. Dropping an uncommitted grant stores a padding word instead, so the
//!   consumer never stalls behind an abandoned loan. [`Grant::commit_len`] commits a prefix of
//!   the reservation: the unused tail of the record becomes a padding record, written before the
//!   commit word's Release store so that a consumer which sees the commit sees the padding too.
//! - The consumer reads records from its cursor up to its cached copy of `tail` (reloading `tail`
//!   only when the cursor reaches it); a zero commit word means "not committed yet". It loads the
//!   commit word with Acquire, reads the payload, and later *releases*: it stores `head` (Release),
//!   handing the bytes back to the producer. Releases may be batched.
//!
//! Why it is correct, in short: the zeroed commit word is published by the `tail` Release, so a
//! consumer that sees `tail` cover a record never reads a stale word from the previous lap; the
//! payload is published by the commit word's Release; the consumer's reads of a record happen
//! before the producer overwrites it, through the `head` Release/Acquire pair.
//!
//! # Hot window
//!
//! Positions only grow, so a ring left to itself sweeps its whole data area (4 MiB for a
//! session channel) before it reuses a byte: every record lands on cache lines neither core has
//! touched for a long time, and on the first lap on pages nobody has touched at all (a page
//! fault every few dozen small records). Once `tail` is [`HOT_WINDOW`] bytes or more into the
//! data area, the producer starts the next record (if it is at most [`HOT_MAX_RECORD`] bytes)
//! at offset 0, padding out the rest of the lap, which the consumer skips with one read,
//! whenever the consumer has released everything (it then holds nothing in front of the
//! padding). A channel whose consumer keeps up thus cycles through the same cache-warm lines
//! and pages; one whose consumer falls behind, or keeps messages, still gets the whole ring.
//! The producer reloads `head` for this at most once per [`HOT_RECHECK`] bytes, so a consumer
//! that lags costs a load now and then.
//!
//! The price: right after an early wrap the padding counts as unreleased until the consumer
//! reads past it, so a producer that then runs ahead of a consumer that is not reading has the
//! lap it wrapped at (at least `HOT_WINDOW` bytes), not the whole ring, until the consumer
//! moves on. Once it has, [`Consumer::release_before`] gives the padding back even while the
//! consumer holds the records after it.
//!
//! The algorithm is the classic Lamport ring with cached indices (as in folly's
//! `ProducerConsumerQueue` and rigtorp's `SPSCQueue`), over variable-size records with a commit
//! word and end-of-buffer padding as in Aeron's log buffers.
//!
//! # Doorbells
//!
//! The ring makes no syscalls: a side that wants to sleep gets a 32-bit word from the ring and
//! calls `futex_wait` on it itself (`crate::sys::futex`), and its peer learns from the ring
//! whether to call `futex_wake`. Waiting for data:
//!
//! ```text
//! consumer                                   producer
//! c.park_prepare();            // word := 1      reserve, write, commit   // tail, commit word
//!                              // fence SeqCst   if let Some(word) = p.wake_needed() {
//! if c.is_empty()? {           // load tail,         // fence SeqCst; load word; swap it to 0
//!     futex_wait(c.data_word(), 1, ..);              futex_wake(word, 1);
//! }                            // commit word    }
//! c.park_done();               // word := 0
//! ```
//!
//! [`Consumer::park_if_empty`] is the first two steps in one call: it returns the word to wait
//! on, or `None` if a record arrived. Waiting for room is the mirror image:
//! [`Producer::park_prepare`], re-check with [`Producer::has_room`] (or both at once:
//! [`Producer::park_if_full`]), `futex_wait` on [`Producer::room_word`],
//! [`Producer::park_done`]; the consumer calls [`Consumer::wake_needed`] after a release.
//!
//! No lost wake-up (Dekker's argument): each side *stores* (the waiter its `parked := 1`, the
//! waker its `tail`/commit word), then issues a SeqCst fence, then *loads* what the other side
//! stored (the waiter `tail` and the commit word, in `peek`; the waker `parked`). SeqCst fences
//! are totally ordered. If the waiter's fence comes first, the waker's load after its own fence
//! sees `parked == 1` (C++ [atomics.fences]: a store before one SeqCst fence is visible to a
//! load after a later one), so it swaps the word to 0 and wakes; the kernel compares the word
//! and queues the waiter atomically with respect to `futex_wake`, so the waiter either finds the
//! word already 0 and does not sleep, or is queued before the wake. If the waker's fence comes
//! first, the waiter's re-check after its fence sees the new `tail` and commit word, finds the
//! record, and does not sleep. Without the fences (Release/Acquire alone) both loads could read
//! the old values, the store-buffer outcome, and the waiter would sleep on a ring with data.
//!
//! Why a swap in `park_prepare` where a store would do: the C++ model orders the waiter's
//! write after the waker's previous swap-to-0 (a read-modify-write is immediately after the
//! value it read, in the word's modification order), so a store is enough. loom's model of
//! modification order is only partial, and leaves a plain store and a concurrent swap
//! unordered: it then lets the waker's load after its fence read its own older 0 and reports a
//! lost wake-up that C++ forbids (found by the `doorbells_both_ways` model at 4 preemptions).
//! A swap reads the latest value, which orders it in loom too; on the parking path the cost of
//! an RMW over a store does not matter.
//!
//! The waker loads the word before swapping, so the common case (nobody parked) is a read of a
//! line it owns anyway: the *consumer parked* word sits on the tail line, which the producer
//! writes on every reservation, and the *producer parked* word on the head line, which the
//! consumer writes on every release. The swap to 0 makes one wake serve a whole batch: later
//! commits read 0 until the consumer parks again. A woken waiter (or one whose wait returned
//! for any other reason, spuriously, on a signal, on a timeout) calls `park_done` and re-checks:
//! the words only say who might be asleep, never what is in the ring. A control thread that
//! sees the peer die wakes both words ([`Consumer::data_word`], [`Producer::room_word`]) with
//! no other change: the waiters re-check their own state.
//!
//! # Trust
//!
//! Each side reads only the index its peer writes (`head` for the producer, `tail` for the
//! consumer) and the commit words, and checks every value before use: a value no correct peer
//! writes is [`Corrupt`], and a corrupt ring stays corrupt. The producer never reads `tail` back
//! from the region, nor the consumer `head`: each keeps its own index privately. All accesses to
//! data bytes are raw-pointer copies at offsets masked into the data area, so a hostile peer can
//! make the ring deliver garbage, never read or write outside the region. A peer may write any
//! value into the doorbell words: any nonzero value reads as "parked", and the words are never
//! used as an index or a length. The worst a peer can do with them is make us issue useless
//! wakes, or make our `futex_wait` return at once (burning our CPU, not corrupting anything).
//!
//! # Loom
//!
//! The ring reaches its shared words and bytes through [`Memory`], implemented for every
//! [`Region`] (std atomics over raw bytes: the real thing). Under `--cfg libchan_loom`,
//! `ring::loom_models` implements it over loom atomics and loom cells and runs this same
//! `Producer`/`Consumer`/`Grant` code in loom models.
//!
//! # Limitations (for the shared-memory issue)
//!
//! - One producer: a `Sender` shared by several threads or processes needs an MPSC variant
//!   (reservation by CAS on `tail`; then the consumer must zero released bytes instead, because
//!   the producer can no longer zero a commit word before publishing `tail`).
//! - Release is in order ("release everything up to this record"); a guard dropped out of order
//!   must wait for the ones before it.
//! - One waiter per doorbell word: the consumer's thread on the data word, the producer's on the
//!   room word (plus a control thread that only wakes).

use std::mem::{size_of, ManuallyDrop};
use std::ptr;
use std::sync::Arc;

use super::atomic::{fence, Atomic32, Atomic64, AtomicU32, AtomicU64, Ordering};
use super::region::{HeapRegion, Region, REGION_ALIGN};
use super::Corrupt;

/// Bytes taken by the ring header (the `head` and `tail` lines) at the start of the region.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const HEADER_SIZE: usize = size_of::<Header>();

/// Bytes taken by each record's header, before its payload.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const RECORD_HEADER: usize = 16;

/// Alignment of every record, and so of every payload.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const RECORD_ALIGN: usize = 16;

/// Smallest data area: room for two records of one 16-byte payload each.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const MIN_CAPACITY: usize = 64;

/// Largest data area: record sizes must fit in the 30 length bits of a commit word.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const MAX_CAPACITY: usize = 1 << 30;

/// Once `tail` is this far into the data area, the producer starts over at offset 0 as soon as
/// the consumer has released enough (see [Hot window](self#hot-window)). It is also the least a
/// producer can write ahead of a consumer that stopped reading right after such a wrap: as much
/// as a socket session's credit window (256 KiB), so a channel holds at least as much unread on
/// shared memory as on a socket.
pub(crate) const HOT_WINDOW: usize = 256 << 10;

/// Bytes the producer writes between two reloads of `head` for a hot-window wrap.
pub(crate) const HOT_RECHECK: u64 = (HOT_WINDOW / 4) as u64;

/// Largest record (header included) that starts a hot-window wrap. Right after a wrap the
/// producer has only the lap it wrapped at; a stream of large records would then have one of
/// them in flight at a time, and large records gain little from warm lines anyway.
pub(crate) const HOT_MAX_RECORD: usize = HOT_WINDOW / 8;

/// Offset in the region of the *consumer parked* word ([`Consumer::data_word`]), for code that
/// holds the region but not the consumer.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const DATA_WORD_OFFSET: usize = 128 + 8;

/// Offset in the region of the *consumer gone* word ([`Consumer::mark_gone`]).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const GONE_WORD_OFFSET: usize = 128 + 12;

/// Offset in the region of the *producer parked* word ([`Producer::room_word`]).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const ROOM_WORD_OFFSET: usize = 8;

/// Commit word tags (top two bits); the low 30 bits hold a length. A zero word is "reserved, not
/// committed yet".
const TAG_MASK: u32 = 0b11 << 30;
/// A data record: the low bits are the payload length.
const TAG_DATA: u32 = 0b10 << 30;
/// A padding record: the low bits are the record's total size, header included.
const TAG_PAD: u32 = 0b01 << 30;
const LEN_MASK: u32 = !TAG_MASK;

/// The length of a region that holds a ring with `capacity` bytes of data area.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const fn region_len(capacity: usize) -> usize {
    HEADER_SIZE + capacity
}

/// Creates a ring with `capacity` bytes of data area on the heap and returns its two ends.
///
/// # Panics
///
/// If `capacity` is not a power of two between [`MIN_CAPACITY`] and [`MAX_CAPACITY`].
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn pair(capacity: usize) -> (Producer<Arc<HeapRegion>>, Consumer<Arc<HeapRegion>>) {
    assert!(
        capacity_of(region_len(capacity)).is_ok(),
        "ring capacity must be a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}, not {capacity}"
    );
    let region = Arc::new(HeapRegion::new(region_len(capacity)));
    let for_producer = Arc::clone(&region);
    // SAFETY: `attach` requires that no other producer is attached to this ring; the region was
    // allocated just above and only this function attaches a producer to it.
    let producer = unsafe { Producer::attach(for_producer) };
    // SAFETY: `attach` requires that no other consumer is attached to this ring; the region was
    // allocated just above and only this function attaches a consumer to it.
    let consumer = unsafe { Consumer::attach(region) };
    // Invariant: a zero-filled region of a valid capacity is a valid empty ring.
    (
        producer.expect("a fresh ring is valid"),
        consumer.expect("a fresh ring is valid"),
    )
}

/// Which header line: `head` (the consumer's index, the *producer parked* word) or `tail` (the
/// producer's index, the *consumer parked* word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Line {
    /// The first line: `head`, and the word the producer parks on.
    Head,
    /// The second line: `tail`, and the word the consumer parks on.
    Tail,
}

/// How the ring reaches the memory it lives in: the header's words, the commit words and the
/// data bytes.
///
/// Every [`Region`] implements it over its raw bytes with std's atomics; loom models implement
/// it over loom atomics (see the module docs). The ring checks [`size`](Self::size) and
/// [`base_aligned`](Self::base_aligned) once, when an end attaches, and then only passes
/// in-bounds offsets: those checks are the preconditions of the unsafe methods.
pub(crate) trait Memory {
    /// A 32-bit shared word: `std::sync::atomic::AtomicU32` for every [`Region`].
    type U32: Atomic32;
    /// A 64-bit shared word: `std::sync::atomic::AtomicU64` for every [`Region`].
    type U64: Atomic64;

    /// A fence of the same kind as the atomics ([`std::sync::atomic::fence`] for regions).
    fn fence(order: Ordering);

    /// Total length in bytes: the header plus the data area.
    fn size(&self) -> usize;

    /// Whether the base is aligned to [`REGION_ALIGN`] (for memory that has a base).
    fn base_aligned(&self) -> bool;

    /// The index word (`head` or `tail`) of `line`.
    ///
    /// # Safety
    ///
    /// `size() >= HEADER_SIZE` and `base_aligned()`.
    unsafe fn index(&self, line: Line) -> &Self::U64;

    /// The doorbell word of `line`.
    ///
    /// # Safety
    ///
    /// As [`index`](Self::index).
    unsafe fn doorbell(&self, line: Line) -> &Self::U32;

    /// The commit word at data-area offset `off`.
    ///
    /// # Safety
    ///
    /// As [`index`](Self::index), and `off` is a multiple of [`RECORD_ALIGN`] with
    /// `off + RECORD_HEADER <= size() - HEADER_SIZE`.
    unsafe fn word(&self, off: usize) -> &Self::U32;

    /// Copies `src` into the data area at offset `off`.
    ///
    /// # Safety
    ///
    /// As [`index`](Self::index), `off + src.len() <= size() - HEADER_SIZE`, and the bytes are
    /// the caller's by the ring protocol: reserved by this producer and not committed, so no
    /// end following the protocol accesses them concurrently.
    unsafe fn write(&self, off: usize, src: &[u8]);

    /// Copies bytes from the data area at offset `off` into `dst`.
    ///
    /// # Safety
    ///
    /// As [`index`](Self::index), `off + dst.len() <= size() - HEADER_SIZE`, and the bytes are a
    /// committed, unreleased record: a producer following the protocol does not write them.
    unsafe fn read(&self, off: usize, dst: &mut [u8]);
}

/// The header of a region, over its raw bytes.
///
/// # Safety
///
/// `region.len() >= HEADER_SIZE` and its base is aligned to [`REGION_ALIGN`].
unsafe fn raw_header<R: Region + ?Sized>(region: &R) -> &Header {
    let header = region.as_ptr().cast::<Header>();
    // SAFETY: creating `&Header` requires a non-null, aligned pointer to initialised memory
    // valid for `size_of::<Header>()` bytes for the borrow, with no conflicting `&mut`: the
    // region base is 128-aligned and at least `HEADER_SIZE` long (the caller's promise), it
    // lives as long as `region`, its bytes are initialised and never under a `&mut` (`Region`
    // contract), and `Header` holds only atomics and padding (any bit pattern valid, shared
    // mutation allowed).
    unsafe { &*header }
}

impl<R: Region> Memory for R {
    type U32 = AtomicU32;
    type U64 = AtomicU64;

    #[inline]
    fn fence(order: Ordering) {
        fence(order);
    }

    #[inline]
    fn size(&self) -> usize {
        Region::len(self)
    }

    #[inline]
    fn base_aligned(&self) -> bool {
        self.as_ptr() as usize % REGION_ALIGN == 0
    }

    #[inline]
    unsafe fn index(&self, line: Line) -> &AtomicU64 {
        // SAFETY: `raw_header` requires what `index` requires.
        &unsafe { raw_header(self) }.line(line).index
    }

    #[inline]
    unsafe fn doorbell(&self, line: Line) -> &AtomicU32 {
        // SAFETY: `raw_header` requires what `doorbell` requires.
        &unsafe { raw_header(self) }.line(line).parked
    }

    #[inline]
    unsafe fn word(&self, off: usize) -> &AtomicU32 {
        let word = self
            .as_ptr()
            .wrapping_add(HEADER_SIZE + off)
            .cast::<AtomicU32>();
        // SAFETY: creating `&AtomicU32` requires a non-null, 4-aligned pointer valid for 4 bytes
        // of initialised memory for the borrow, with no conflicting `&mut`: `off + 16` is within
        // the data area (the caller's promise) so the word is inside the region, which lives as
        // long as `self`; it is 16-aligned (128-aligned base, `HEADER_SIZE` and `off` multiples
        // of 16); initialised and never under `&mut` by the `Region` contract. Non-atomic
        // accesses of these bytes (payload of another lap) are ordered against atomic ones
        // through `head`/`tail`, as the module docs explain.
        unsafe { &*word }
    }

    #[inline]
    unsafe fn write(&self, off: usize, src: &[u8]) {
        let dst = self.as_ptr().wrapping_add(HEADER_SIZE + off);
        // SAFETY: `copy_nonoverlapping` requires a source valid for `src.len()` reads (a slice),
        // a destination valid for as many writes (inside the data area, the caller's promise,
        // and the region is writable by its contract), and no overlap (`src` is a Rust
        // reference, and none exist over region bytes by the `Region` contract). Nothing
        // accesses these bytes concurrently (the caller's promise).
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    }

    #[inline]
    unsafe fn read(&self, off: usize, dst: &mut [u8]) {
        let src = self.as_ptr().wrapping_add(HEADER_SIZE + off);
        // SAFETY: `copy_nonoverlapping` requires a source valid for `dst.len()` reads (inside
        // the data area, the caller's promise; region bytes are initialised by the `Region`
        // contract), a destination valid for as many writes (`dst`) and no overlap (`dst` is a
        // Rust reference; none exist over region bytes). A producer following the protocol does
        // not write these bytes (the caller's promise).
        unsafe { ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
    }
}

/// The writing end of a ring.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct Producer<R: Memory> {
    ring: Ring<R>,
    /// Our own index: where the next reservation starts. Never read back from the region.
    tail: u64,
    /// The consumer's `head` as last loaded; `tail - cached_head <= capacity` always holds.
    cached_head: u64,
    /// The `tail` from which a hot-window wrap may reload `head` again.
    wrap_check: u64,
    corrupt: Option<Corrupt>,
}

/// Space reserved in the ring, to be written and then committed (a loan).
///
/// Dropping a grant without committing it turns it into padding, which the consumer skips.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct Grant<'a, R: Memory> {
    producer: &'a mut Producer<R>,
    /// Position of the record header.
    pos: u64,
    len: usize,
}

/// The reading end of a ring.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct Consumer<R: Memory> {
    ring: Ring<R>,
    /// Our own index as last published: bytes before it belong to the producer again.
    head: u64,
    /// Where the next record starts: records in `head..read` are consumed, not yet released.
    read: u64,
    /// The producer's `tail` as last loaded; `read <= cached_tail <= head + capacity`.
    cached_tail: u64,
    corrupt: Option<Corrupt>,
}

/// A committed record: its position in the ring and its payload length.
///
/// Read its bytes through the [`Consumer`] that returned it, until it is released.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pos: u64,
    len: u32,
}

#[cfg_attr(not(test), allow(dead_code))]
impl<R: Memory> Producer<R> {
    /// Attaches the writing end to the ring laid out in `region`, at the ring's current `tail`.
    ///
    /// # Errors
    ///
    /// [`Corrupt`] if the region's length is not a valid ring size, its base is misaligned, or
    /// `head`/`tail` are inconsistent.
    ///
    /// # Safety
    ///
    /// No other `Producer` is attached to this ring, in this process or any other that maps the
    /// region, while this one lives: two producers would write the same bytes concurrently.
    pub(crate) unsafe fn attach(region: R) -> Result<Self, Corrupt> {
        let ring = Ring::new(region)?;
        // Acquire: pairs with the Release store of `tail` by a previous producer, if any.
        let tail = ring.index(Line::Tail).load(Ordering::Acquire);
        // Acquire: pairs with the Release store of `head` in `Consumer::publish_head`.
        let head = ring.index(Line::Head).load(Ordering::Acquire);
        if tail % RECORD_ALIGN as u64 != 0 || head % RECORD_ALIGN as u64 != 0 {
            return Err(Corrupt::new("index is not 16-byte aligned"));
        }
        if tail.wrapping_sub(head) > ring.cap as u64 {
            return Err(Corrupt::new("tail is not within a capacity ahead of head"));
        }
        Ok(Self {
            ring,
            tail,
            cached_head: head,
            wrap_check: tail,
            corrupt: None,
        })
    }

    /// Size of the data area in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.ring.cap
    }

    /// The largest payload a record can carry: half the data area, less the record header.
    pub(crate) fn max_len(&self) -> usize {
        self.ring.max_len()
    }

    /// The region the ring lives in.
    pub(crate) fn region(&self) -> &R {
        &self.ring.region
    }

    /// Reserves a record with a `len`-byte payload, to write and then [`Grant::commit`].
    ///
    /// Returns `Ok(None)` when the ring has no room now, or ever if `len > max_len()`. Only one
    /// grant exists at a time (it borrows the producer).
    ///
    /// # Errors
    ///
    /// [`Corrupt`] if the consumer's `head` is misaligned or outside `[previous head, tail]`.
    /// Once corrupt, every later call fails the same way.
    pub(crate) fn reserve(&mut self, len: usize) -> Result<Option<Grant<'_, R>>, Corrupt> {
        Ok(self.room_for(len)?.map(|room| self.reserve_room(room)))
    }

    /// The room [`reserve`](Self::reserve)`(len)` would take now, if the ring has it: a caller
    /// that must wait when it has not can look, wait, look again, then
    /// [`reserve_room`](Self::reserve_room) without working it out once more.
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve).
    pub(crate) fn room_for(&mut self, len: usize) -> Result<Option<Room>, Corrupt> {
        Ok(self.room(len)?.map(|(pad, size)| Room { pad, size, len }))
    }

    /// Reserves the record `room` describes: what [`room_for`](Self::room_for) returned last,
    /// with no reservation in between (the producer's `tail` must not have moved).
    pub(crate) fn reserve_room(&mut self, room: Room) -> Grant<'_, R> {
        let pos = self.take_room(room);
        self.publish_tail();
        Grant {
            producer: self,
            pos,
            len: room.len,
        }
    }

    /// Reserves the record `room` describes as [`reserve_room`](Self::reserve_room), detached
    /// at once (see [`Grant::detach`]), without moving the shared `tail` yet: the consumer
    /// learns of the record when it is committed or abandoned, or when a record reserved
    /// behind it is. A consumer that has caught up thus waits on the tail line alone while
    /// the record is filled, instead of reading the record's own line and pulling it back and
    /// forth between the cores as the producer writes it (a loan is filled by the application,
    /// for as long as it takes).
    pub(crate) fn reserve_detached(&mut self, room: Room) -> Detached {
        let pos = self.take_room(room);
        Detached { pos, len: room.len }
    }

    /// Writes `data` at `offset` into the payload of the detached reservation `d`.
    ///
    /// # Panics
    ///
    /// If `offset + data.len()` exceeds the reservation.
    pub(crate) fn write_detached(&self, d: &Detached, offset: usize, data: &[u8]) {
        let end = offset.checked_add(data.len());
        assert!(
            end.is_some_and(|end| end <= d.len),
            "write of {} bytes at {offset} overruns a {}-byte reservation",
            data.len(),
            d.len
        );
        let off = self.ring.offset(d.pos) + RECORD_HEADER + offset;
        // SAFETY: as in `Grant::write_at`: inside the data area, and reserved by `d`, not
        // committed, so the consumer does not access these bytes.
        unsafe { self.ring.region.write(off, data) };
    }

    /// Moves the shared `tail` over every record reserved so far.
    fn publish_tail(&self) {
        // Release: pairs with the Acquire load of `tail` in `Consumer::scan`: the padding and
        // the commit words written before (zeroed or committed) are visible to a consumer that
        // sees this `tail`.
        self.ring
            .index(Line::Tail)
            .store(self.tail, Ordering::Release);
    }

    /// Takes `room` after `tail` (padding first, the record's commit word zeroed) and returns
    /// the record's position; the caller publishes the new `tail`.
    fn take_room(&mut self, room: Room) -> u64 {
        let Room { pad, size, len: _ } = room;
        debug_assert!(
            self.tail - self.cached_head + (pad + size) as u64 <= self.ring.cap as u64,
            "a stale room"
        );
        let off = self.ring.offset(self.tail);
        if pad > 0 {
            // Relaxed: published by the Release store of `tail` below. `pad` is at least 16 (both
            // `off` and the capacity are multiples of 16) and below 2^30 (capacity cap).
            self.ring
                .word(off)
                .store(TAG_PAD | pad as u32, Ordering::Relaxed);
        }
        let pos = self.tail + pad as u64;
        // Relaxed: the word may still hold bytes from the previous lap; zero marks the record
        // "reserved, not committed" and is published by the caller's Release store of `tail`.
        self.ring
            .word(self.ring.offset(pos))
            .store(0, Ordering::Relaxed);
        self.tail = pos + size as u64;
        pos
    }

    /// Whether [`reserve`](Self::reserve)`(len)` would succeed now: false if the ring is full
    /// for such a record, or if `len > max_len()`.
    ///
    /// Cheap enough to spin on: it reloads the consumer's `head` only when the cached copy says
    /// there is no room (and, past the hot window, once per `HOT_RECHECK` bytes). This is the
    /// re-check between [`park_prepare`](Self::park_prepare) and
    /// `futex_wait`.
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve).
    pub(crate) fn has_room(&mut self, len: usize) -> Result<bool, Corrupt> {
        Ok(self.room(len)?.is_some())
    }

    /// Whether a record of `len` bytes fits now, and if so the padding to write before it and
    /// its size. Reloads `head` if the cached copy says it does not fit.
    fn room(&mut self, len: usize) -> Result<Option<(usize, usize)>, Corrupt> {
        if let Some(corrupt) = self.corrupt {
            return Err(corrupt);
        }
        if len > self.ring.max_len() {
            return Ok(None);
        }
        let size = record_size(len);
        let off = self.ring.offset(self.tail);
        let cap = self.ring.cap;
        if off >= HOT_WINDOW && size <= HOT_MAX_RECORD {
            // Far enough in: start over at offset 0 if the consumer has released enough (see
            // Hot window), reloading `head` for it at most once per `HOT_RECHECK` bytes.
            let pad = cap - off;
            if self.wraps_early(pad + size) {
                return Ok(Some((pad, size)));
            }
            if self.tail >= self.wrap_check {
                self.wrap_check = self.tail + HOT_RECHECK;
                self.reload_head()?;
                if self.wraps_early(pad + size) {
                    return Ok(Some((pad, size)));
                }
            }
        }
        let pad = if size > cap - off { cap - off } else { 0 };
        if !self.fits(pad + size) {
            self.reload_head()?;
            if !self.fits(pad + size) {
                return Ok(None);
            }
        }
        Ok(Some((pad, size)))
    }

    /// Whether to wrap early, padding `need` bytes less the record: by the cached `head`, the
    /// consumer holds nothing (see Hot window) and there is room. A consumer that held records
    /// in front of the padding would leave the producer only the room before the oldest of
    /// them until it released them all; holding nothing, it releases the padding as soon as it
    /// reads past it (`Consumer::release_before`), and the whole ring is the producer's again.
    fn wraps_early(&self, need: usize) -> bool {
        self.tail == self.cached_head && self.fits(need)
    }

    /// Whether `need` more bytes fit after `tail`, by the cached `head`.
    fn fits(&self, need: usize) -> bool {
        self.tail - self.cached_head + need as u64 <= self.ring.cap as u64
    }

    /// Where the next reservation starts: the end of everything reserved so far.
    pub(crate) fn position(&self) -> u64 {
        self.tail
    }

    /// Whether the consumer has released everything before `pos` (a position this producer
    /// reserved up to), reloading its `head`.
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve).
    pub(crate) fn released_through(&mut self, pos: u64) -> Result<bool, Corrupt> {
        if let Some(corrupt) = self.corrupt {
            return Err(corrupt);
        }
        self.reload_head()?;
        Ok(self.cached_head >= pos)
    }

    /// Loads the consumer's `head` into the cache.
    fn reload_head(&mut self) -> Result<(), Corrupt> {
        // Acquire: pairs with the Release store of `head` in `Consumer::publish_head`, so the
        // consumer's reads of the bytes it released happen before we overwrite them.
        let head = self.ring.index(Line::Head).load(Ordering::Acquire);
        self.cached_head = self.check_head(head)?;
        Ok(())
    }

    /// Checks a `head` loaded from the region: aligned, and in `[cached_head, tail]` (the consumer
    /// only moves it forward, and never past what we reserved).
    fn check_head(&mut self, head: u64) -> Result<u64, Corrupt> {
        let corrupt = if head % RECORD_ALIGN as u64 != 0 {
            Corrupt::new("head is not 16-byte aligned")
        } else if head.wrapping_sub(self.cached_head) > self.tail - self.cached_head {
            Corrupt::new("head is outside [previous head, tail]")
        } else {
            return Ok(head);
        };
        self.corrupt = Some(corrupt);
        Err(corrupt)
    }

    /// Announces that the producer is about to sleep waiting for room, and returns the word to
    /// `futex_wait(word, 1, ..)` on.
    ///
    /// Sets the *producer parked* word to 1, then issues a SeqCst fence. The caller must
    /// then re-check ([`has_room`](Self::has_room)) and wait only if there is still no room,
    /// and call [`park_done`](Self::park_done) once it stops waiting, whatever woke it. See
    /// [Doorbells](self#doorbells) for why no wake-up is lost.
    pub(crate) fn park_prepare(&self) -> &R::U32 {
        let word = self.ring.doorbell(Line::Head);
        // Relaxed, then a SeqCst fence: pairs with the SeqCst fence in `Consumer::wake_needed`
        // (Dekker): either the consumer's load there sees this 1, or our re-check of `head`
        // after the fence sees its release. A swap rather than a store: see "Why a swap" in the
        // module docs.
        word.swap(1, Ordering::Relaxed);
        R::fence(Ordering::SeqCst);
        word
    }

    /// [`park_prepare`](Self::park_prepare), then the re-check: returns the word to
    /// `futex_wait(word, 1, ..)` on if a `len`-byte record still does not fit, or `None` if it
    /// does now. Call [`park_done`](Self::park_done) afterwards either way. A `len` above
    /// [`max_len`](Self::max_len) never fits: check it before waiting for room.
    ///
    /// (The re-check needs `&mut self`, which the word returned by `park_prepare` borrows; this
    /// does both in one borrow. With `park_prepare` itself, wait on
    /// [`room_word`](Self::room_word) after the re-check.)
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve).
    pub(crate) fn park_if_full(&mut self, len: usize) -> Result<Option<&R::U32>, Corrupt> {
        self.park_prepare();
        if self.has_room(len)? {
            return Ok(None);
        }
        Ok(Some(self.ring.doorbell(Line::Head)))
    }

    /// Ends a wait begun with [`park_prepare`](Self::park_prepare): stores 0 into the *producer
    /// parked* word, so the consumer stops issuing wakes.
    pub(crate) fn park_done(&self) {
        // Relaxed: the word only tells the consumer's `wake_needed` whether to wake; if it still
        // reads the old 1, it issues one useless wake. The next wait starts with `park_prepare`,
        // whose write and fence do not depend on this store.
        self.ring.doorbell(Line::Head).store(0, Ordering::Relaxed);
    }

    /// Whether the consumer is parked waiting for data: call after a commit (once per batch is
    /// enough), and `futex_wake(word, 1)` the word it returns.
    ///
    /// Issues a SeqCst fence, then reads the *consumer parked* word; if it is nonzero (any
    /// nonzero value: a hostile peer may write anything), swaps it to 0 and returns it when the
    /// swap saw nonzero, so one wake serves a batch and concurrent callers do not both wake.
    pub(crate) fn wake_needed(&self) -> Option<&R::U32> {
        // SeqCst fence: pairs with the one in `Consumer::park_prepare` (Dekker): either our load
        // below sees the consumer's 1, or its re-check after its fence sees our commit.
        R::fence(Ordering::SeqCst);
        let word = self.ring.doorbell(Line::Tail);
        // Relaxed load and swap: the word carries no data; the commit it announces is published
        // by the commit word's Release store and read with the consumer's Acquire load.
        if word.load(Ordering::Relaxed) != 0 && word.swap(0, Ordering::Relaxed) != 0 {
            Some(word)
        } else {
            None
        }
    }

    /// The *producer parked* word, which the producer waits on for room: a control thread wakes
    /// it (`futex_wake(word, u32::MAX)`) when the consumer dies, so the waiter re-checks.
    pub(crate) fn room_word(&self) -> &R::U32 {
        self.ring.doorbell(Line::Head)
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl<R: Memory> Grant<'_, R> {
    /// Payload length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty (a zero-length record).
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `data` into the payload at `offset`.
    ///
    /// # Panics
    ///
    /// If `offset + data.len()` exceeds [`len`](Self::len).
    pub(crate) fn write_at(&mut self, offset: usize, data: &[u8]) {
        let end = offset.checked_add(data.len());
        assert!(
            end.is_some_and(|end| end <= self.len),
            "write of {} bytes at {offset} overruns a {}-byte grant",
            data.len(),
            self.len
        );
        let ring = &self.producer.ring;
        let off = ring.offset(self.pos) + RECORD_HEADER + offset;
        // SAFETY: `write` requires a ring that passed `Ring::new` (it did), bytes inside the data
        // area (the payload is: the record does not cross the end, and `offset + data.len()` is
        // within it, checked above), and bytes that are ours: reserved by this grant and not
        // committed, so the consumer does not access them.
        unsafe { ring.region.write(off, data) };
    }

    /// Copies `data` to the start of the payload; see [`write_at`](Self::write_at).
    ///
    /// # Panics
    ///
    /// If `data` is longer than the grant.
    pub(crate) fn write(&mut self, data: &[u8]) {
        self.write_at(0, data);
    }

    /// Publishes the record to the consumer.
    pub(crate) fn commit(self) {
        let grant = ManuallyDrop::new(self);
        // `len <= max_len < 2^30`, so it fits in the length bits.
        grant.publish(TAG_DATA | grant.len as u32);
    }

    /// Publishes only the first `n` bytes of the payload, for a reservation made larger than
    /// what was finally written (e.g. serialization into a size estimate).
    ///
    /// The rest of the record, if it spans at least one 16-byte unit, becomes a padding record
    /// that the consumer skips; it is written before the commit word is published, so a
    /// consumer that sees the commit sees the padding.
    ///
    /// # Panics
    ///
    /// If `n > len()`.
    pub(crate) fn commit_len(self, n: usize) {
        let grant = ManuallyDrop::new(self);
        grant.producer.ring.commit_len(grant.pos, grant.len, n);
    }

    /// Lets go of the producer's borrow, keeping the reservation: more records can be reserved
    /// behind it while it is written. The consumer stops at it until it is finished with
    /// [`Producer::commit_detached`] or [`Producer::abandon_detached`].
    pub(crate) fn detach(self) -> Detached {
        let grant = ManuallyDrop::new(self);
        Detached {
            pos: grant.pos,
            len: grant.len,
        }
    }

    fn publish(&self, word: u32) {
        let ring = &self.producer.ring;
        // Release: pairs with the Acquire load of the commit word in `Consumer::scan`, so the
        // payload written through this grant is visible to a consumer that sees the word.
        ring.word(ring.offset(self.pos))
            .store(word, Ordering::Release);
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl<R: Region> Grant<'_, R> {
    /// The start of the payload: 16-byte aligned, valid for writes of [`len`](Self::len) bytes
    /// until the grant is committed or dropped.
    ///
    /// The consumer does not read these bytes before the commit. Do not form `&mut [u8]` over
    /// them when the consumer is another process, which may write them regardless.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.producer.ring.payload(self.pos)
    }
}

/// Room for one record in a ring, as [`Producer::room_for`] found it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    /// Padding to write before the record (to the end of the lap).
    pad: usize,
    /// The record's size, header included.
    size: usize,
    /// Its payload length.
    len: usize,
}

/// A reservation detached from its producer (see [`Grant::detach`]).
#[derive(Debug)]
pub(crate) struct Detached {
    pos: u64,
    len: usize,
}

#[cfg_attr(not(test), allow(dead_code))]
impl Detached {
    /// Payload length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The reservation as plain numbers (position, payload length), for a caller that keeps
    /// it outside the producer's types; [`from_raw`](Self::from_raw) turns them back.
    pub(crate) fn into_raw(self) -> (u64, usize) {
        (self.pos, self.len)
    }

    /// A reservation from [`into_raw`](Self::into_raw)'s numbers. Numbers that do not come from
    /// this producer's reservations make it publish a commit word in the wrong place of its
    /// own ring (the consumer then sees garbage or a corrupt ring), never write outside it.
    pub(crate) fn from_raw((pos, len): (u64, usize)) -> Self {
        Self { pos, len }
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl<R: Memory> Producer<R> {
    /// Publishes the first `n` bytes of a detached reservation, as [`Grant::commit_len`].
    ///
    /// # Panics
    ///
    /// If `n > d.len()`.
    pub(crate) fn commit_detached(&self, d: Detached, n: usize) {
        self.ring.commit_len(d.pos, d.len, n);
        // A reservation from `reserve_detached` may not be covered by `tail` yet.
        self.publish_tail();
    }

    /// Turns a detached reservation into padding, as dropping a [`Grant`] does.
    pub(crate) fn abandon_detached(&self, d: Detached) {
        let off = self.ring.offset(d.pos);
        // Release: as in `Grant::publish`. A record is at most half a capacity, below 2^30.
        self.ring
            .word(off)
            .store(TAG_PAD | record_size(d.len) as u32, Ordering::Release);
        self.publish_tail();
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl<R: Region> Producer<R> {
    /// The start of a detached reservation's payload, as [`Grant::as_mut_ptr`].
    pub(crate) fn detached_ptr(&self, d: &Detached) -> *mut u8 {
        self.ring.payload(d.pos)
    }

    /// The *consumer gone* word: nonzero once the consumer marked the ring gone
    /// ([`Consumer::mark_gone`]). A word rather than a method, so a sender can look at it
    /// without the producer (its lock).
    pub(crate) fn gone_word(&self) -> &AtomicU32 {
        &self.ring.header().tail.gone
    }
}

impl<R: Memory> Drop for Grant<'_, R> {
    /// An uncommitted grant becomes padding, so the consumer skips it instead of waiting.
    fn drop(&mut self) {
        // A record is at most half a capacity, below 2^30.
        self.publish(TAG_PAD | record_size(self.len) as u32);
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl<R: Memory> Consumer<R> {
    /// Attaches the reading end to the ring laid out in `region`, at the ring's current `head`.
    ///
    /// # Errors
    ///
    /// [`Corrupt`] if the region's length is not a valid ring size, its base is misaligned, or
    /// `head` is misaligned.
    ///
    /// # Safety
    ///
    /// No other `Consumer` is attached to this ring, in this process or any other that maps the
    /// region, while this one lives: a second consumer would release bytes this one still reads.
    pub(crate) unsafe fn attach(region: R) -> Result<Self, Corrupt> {
        let ring = Ring::new(region)?;
        // Acquire: pairs with the Release store of `head` by a previous consumer, if any.
        let head = ring.index(Line::Head).load(Ordering::Acquire);
        if head % RECORD_ALIGN as u64 != 0 {
            return Err(Corrupt::new("head is not 16-byte aligned"));
        }
        Ok(Self {
            ring,
            head,
            read: head,
            cached_tail: head,
            corrupt: None,
        })
    }

    /// Size of the data area in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.ring.cap
    }

    /// The region the ring lives in.
    pub(crate) fn region(&self) -> &R {
        &self.ring.region
    }

    /// Detaches, returning the region: what was released stays released, what was not is the
    /// next consumer's to read.
    pub(crate) fn into_region(self) -> R {
        self.ring.region
    }

    /// The next committed record, without consuming it; `Ok(None)` if there is none yet.
    ///
    /// Skips padding. Calling it again returns the same record until [`consume`](Self::consume).
    ///
    /// # Errors
    ///
    /// [`Corrupt`] if the producer's `tail` or a commit word breaks the protocol: `tail`
    /// misaligned, moved back, or more than a capacity ahead of `head`; a record longer than
    /// [`Producer::max_len`], with an unknown tag, crossing the end of the data area or extending
    /// past `tail`. Once corrupt, every later call fails the same way.
    pub(crate) fn peek(&mut self) -> Result<Option<Record>, Corrupt> {
        if let Some(corrupt) = self.corrupt {
            return Err(corrupt);
        }
        let scanned = self.scan();
        if let Err(corrupt) = scanned {
            self.corrupt = Some(corrupt);
        }
        scanned
    }

    /// Whether there is no committed record to read now: `peek()` found none.
    ///
    /// Cheap enough to spin on: it reloads the producer's `tail` only once the cursor has
    /// caught up with the cached copy. This (or `peek`) is the re-check between
    /// [`park_prepare`](Self::park_prepare) and `futex_wait`.
    ///
    /// # Errors
    ///
    /// As [`peek`](Self::peek).
    pub(crate) fn is_empty(&mut self) -> Result<bool, Corrupt> {
        Ok(self.peek()?.is_none())
    }

    /// Moves the read cursor past `rec`, which must be the record [`peek`](Self::peek) returned
    /// last. Its bytes stay readable until released.
    ///
    /// # Panics
    ///
    /// If `rec` is not the record at the read cursor.
    pub(crate) fn consume(&mut self, rec: Record) {
        assert_eq!(rec.pos, self.read, "consume takes the record peek returned");
        self.read = rec.end();
    }

    /// [`peek`](Self::peek), then [`consume`](Self::consume) the record, if any.
    ///
    /// # Errors
    ///
    /// As [`peek`](Self::peek).
    pub(crate) fn pop(&mut self) -> Result<Option<Record>, Corrupt> {
        let rec = self.peek()?;
        if let Some(rec) = rec {
            self.consume(rec);
        }
        Ok(rec)
    }

    /// Calls `f` on each committed record from the read cursor on, without consuming any (the
    /// cursor is back where it was afterwards): a look at what the producer has left, e.g. once
    /// it is gone. Stops when `f` returns true, at a record not committed yet, or after one
    /// lap's worth of records.
    ///
    /// # Errors
    ///
    /// As [`peek`](Self::peek).
    pub(crate) fn look_ahead(
        &mut self,
        mut f: impl FnMut(&Self, Record) -> bool,
    ) -> Result<(), Corrupt> {
        let start = self.read;
        let mut looked = Ok(());
        for _ in 0..self.ring.cap / RECORD_ALIGN {
            match self.peek() {
                Ok(Some(rec)) if !f(self, rec) => self.read = rec.end(),
                Ok(_) => break,
                Err(c) => {
                    looked = Err(c);
                    break;
                }
            }
        }
        self.read = start;
        looked
    }

    /// Hands every consumed record (and skipped padding) back to the producer.
    pub(crate) fn release(&mut self) {
        self.publish_head(self.read);
    }

    /// Hands `rec` and every record before it back to the producer; records consumed after it
    /// stay readable. Releasing a record already released does nothing.
    ///
    /// Release is in order only: a record cannot be released before the ones ahead of it.
    ///
    /// # Panics
    ///
    /// If `rec` has not been consumed.
    pub(crate) fn release_through(&mut self, rec: Record) {
        assert!(
            rec.end() <= self.read,
            "release_through takes a consumed record"
        );
        if rec.end() > self.head {
            self.publish_head(rec.end());
        }
    }

    /// Hands back everything before `oldest`, the oldest record still in use (`None`: every
    /// consumed record is done). Unlike [`release_through`](Self::release_through) this also
    /// frees padding the cursor skipped in front of `oldest`: after an early wrap (see Hot
    /// window) that padding is most of a lap, and holding it until `oldest` is released would
    /// leave the producer a fraction of the ring while the application keeps a few messages.
    /// Returns whether `head` moved.
    ///
    /// # Panics
    ///
    /// If `oldest` is not a record this consumer consumed and has not released.
    pub(crate) fn release_before(&mut self, oldest: Option<Record>) -> bool {
        let to = oldest.map_or(self.read, |r| r.pos);
        assert!(
            to <= self.read && to >= self.head,
            "release_before takes a consumed, unreleased record"
        );
        let moved = to > self.head;
        if moved {
            self.publish_head(to);
        }
        moved
    }

    /// Copies `rec`'s payload into `dst`.
    ///
    /// This is the read to use when the producer is not trusted: the copy cannot go out of
    /// bounds whatever the producer does, though a producer that breaks the protocol by
    /// rewriting a committed record can make it see torn bytes.
    ///
    /// # Panics
    ///
    /// If `dst.len() != rec.len()`, or `rec` was not returned by this consumer or is released.
    pub(crate) fn copy_to(&self, rec: Record, dst: &mut [u8]) {
        assert_eq!(dst.len(), rec.len(), "destination length");
        let off = self.payload_offset(rec);
        // SAFETY: `read` requires a ring that passed `Ring::new` (it did), bytes inside the data
        // area (checked by `payload_offset`), and a committed, unreleased record (checked there
        // too), which a producer following the protocol does not write.
        unsafe { self.ring.region.read(off, dst) };
    }

    /// Copies `rec`'s payload into a new vector; see [`copy_to`](Self::copy_to).
    ///
    /// # Panics
    ///
    /// If `rec` was not returned by this consumer or is released.
    pub(crate) fn to_vec(&self, rec: Record) -> Vec<u8> {
        let mut out = vec![0; rec.len()];
        self.copy_to(rec, &mut out);
        out
    }

    /// The data-area offset of `rec`'s payload, after checking that `rec` is committed and
    /// unreleased in this ring: `head <= rec.pos` and `rec.end() <= cached_tail`, and that it
    /// lies inside the data area.
    fn payload_offset(&self, rec: Record) -> usize {
        let off = self.ring.offset(rec.pos);
        assert!(
            self.head <= rec.pos
                && rec.end() <= self.cached_tail
                && off + record_size(rec.len()) <= self.ring.cap,
            "record is not readable in this ring (released, or from another ring)"
        );
        off + RECORD_HEADER
    }

    fn publish_head(&mut self, head: u64) {
        self.head = head;
        // Release: pairs with the Acquire load of `head` in `Producer::room`, so our reads of
        // the released records happen before the producer overwrites them.
        self.ring.index(Line::Head).store(head, Ordering::Release);
    }

    /// Announces that the consumer is about to sleep waiting for data, and returns the word to
    /// `futex_wait(word, 1, ..)` on.
    ///
    /// Sets the *consumer parked* word to 1, then issues a SeqCst fence. The caller must
    /// then re-check ([`peek`](Self::peek) or [`is_empty`](Self::is_empty)) and wait only if
    /// there is still nothing, and call [`park_done`](Self::park_done) once it stops waiting,
    /// whatever woke it. See [Doorbells](self#doorbells) for why no wake-up is lost.
    pub(crate) fn park_prepare(&self) -> &R::U32 {
        let word = self.ring.doorbell(Line::Tail);
        // Relaxed, then a SeqCst fence: pairs with the SeqCst fence in `Producer::wake_needed`
        // (Dekker): either the producer's load there sees this 1, or our re-check of `tail` and
        // the commit word after the fence sees its commit. A swap rather than a store: see
        // "Why a swap" in the module docs.
        word.swap(1, Ordering::Relaxed);
        R::fence(Ordering::SeqCst);
        word
    }

    /// [`park_prepare`](Self::park_prepare), then the re-check: returns the word to
    /// `futex_wait(word, 1, ..)` on if there is still no record, or `None` if one arrived. Call
    /// [`park_done`](Self::park_done) afterwards either way.
    ///
    /// (The re-check needs `&mut self`, which the word returned by `park_prepare` borrows; this
    /// does both in one borrow. With `park_prepare` itself, wait on
    /// [`data_word`](Self::data_word) after the re-check.)
    ///
    /// # Errors
    ///
    /// As [`peek`](Self::peek).
    pub(crate) fn park_if_empty(&mut self) -> Result<Option<&R::U32>, Corrupt> {
        self.park_prepare();
        if !self.is_empty()? {
            return Ok(None);
        }
        Ok(Some(self.ring.doorbell(Line::Tail)))
    }

    /// Ends a wait begun with [`park_prepare`](Self::park_prepare): stores 0 into the *consumer
    /// parked* word, so the producer stops issuing wakes.
    pub(crate) fn park_done(&self) {
        // Relaxed: the word only tells the producer's `wake_needed` whether to wake; if it still
        // reads the old 1, it issues one useless wake. The next wait starts with `park_prepare`,
        // whose write and fence do not depend on this store.
        self.ring.doorbell(Line::Tail).store(0, Ordering::Relaxed);
    }

    /// Whether the producer is parked waiting for room: call after a release, and
    /// `futex_wake(word, 1)` the word it returns.
    ///
    /// Issues a SeqCst fence, then reads the *producer parked* word; if it is nonzero (any
    /// nonzero value: a hostile peer may write anything), swaps it to 0 and returns it when the
    /// swap saw nonzero.
    pub(crate) fn wake_needed(&self) -> Option<&R::U32> {
        // SeqCst fence: pairs with the one in `Producer::park_prepare` (Dekker): either our load
        // below sees the producer's 1, or its re-check of `head` after its fence sees our release.
        R::fence(Ordering::SeqCst);
        let word = self.ring.doorbell(Line::Head);
        // Relaxed load and swap: the word carries no data; the released space is published by
        // the Release store of `head` and read with the producer's Acquire load.
        if word.load(Ordering::Relaxed) != 0 && word.swap(0, Ordering::Relaxed) != 0 {
            Some(word)
        } else {
            None
        }
    }

    /// The *consumer parked* word, which the consumer waits on for data: a control thread wakes
    /// it (`futex_wake(word, u32::MAX)`) when the producer dies, so the waiter re-checks.
    pub(crate) fn data_word(&self) -> &R::U32 {
        self.ring.doorbell(Line::Tail)
    }

    /// Finds the next data record at or after the cursor, skipping padding.
    fn scan(&mut self) -> Result<Option<Record>, Corrupt> {
        let mut reloaded = false;
        loop {
            if self.read == self.cached_tail {
                // Reload `tail` at most once per call: a producer that keeps appending padding
                // cannot keep us here.
                if reloaded {
                    return Ok(None);
                }
                reloaded = true;
                // Acquire: pairs with the Release store of `tail` in `Producer::reserve`, so the
                // commit words zeroed and the padding written before it are visible below.
                let tail = self.ring.index(Line::Tail).load(Ordering::Acquire);
                self.cached_tail = self.check_tail(tail)?;
                if self.read == self.cached_tail {
                    return Ok(None);
                }
            }
            let off = self.ring.offset(self.read);
            // Acquire: pairs with the Release store in `Grant::publish`, so the payload written
            // before the commit (and the padding `Grant::commit_len` wrote after it) is visible
            // to our reads after this load.
            let word = self.ring.word(off).load(Ordering::Acquire);
            let (size, data_len) = match word & TAG_MASK {
                _ if word == 0 => return Ok(None), // reserved, not committed yet
                TAG_DATA => {
                    let len = (word & LEN_MASK) as usize;
                    if len > self.ring.max_len() {
                        return Err(Corrupt::new("record length exceeds the ring's maximum"));
                    }
                    (record_size(len), Some(len))
                }
                TAG_PAD => {
                    let size = (word & LEN_MASK) as usize;
                    if size < RECORD_HEADER || size % RECORD_ALIGN != 0 {
                        return Err(Corrupt::new("padding is not a positive multiple of 16"));
                    }
                    (size, None)
                }
                _ => return Err(Corrupt::new("unknown record tag")),
            };
            if size > self.ring.cap - off {
                return Err(Corrupt::new("record crosses the end of the data area"));
            }
            if size as u64 > self.cached_tail - self.read {
                return Err(Corrupt::new("record extends past tail"));
            }
            match data_len {
                // `len <= max_len < 2^30`.
                Some(len) => {
                    return Ok(Some(Record {
                        pos: self.read,
                        len: len as u32,
                    }))
                }
                None => self.read += size as u64,
            }
        }
    }

    /// Checks a `tail` loaded from the region: aligned, not behind the cursor, and at most a
    /// capacity ahead of `head`.
    fn check_tail(&self, tail: u64) -> Result<u64, Corrupt> {
        let ahead = tail.wrapping_sub(self.head);
        if tail % RECORD_ALIGN as u64 != 0 {
            Err(Corrupt::new("tail is not 16-byte aligned"))
        } else if ahead > self.ring.cap as u64 {
            Err(Corrupt::new("tail is more than a capacity ahead of head"))
        } else if ahead < self.read - self.head {
            Err(Corrupt::new("tail moved backwards"))
        } else {
            Ok(tail)
        }
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl<R: Region> Consumer<R> {
    /// Tells the producer that nothing more will be read from this ring: its
    /// [`consumer_gone`](Producer::consumer_gone) answers true from now on. Records already
    /// committed stay readable.
    pub(crate) fn mark_gone(&self) {
        // Release: orders our last releases of `head` before it, for a producer that reads it
        // with Acquire (it carries no data of its own).
        self.ring.header().tail.gone.store(1, Ordering::Release);
    }

    /// Clears the *consumer gone* mark and both doorbells, for a ring that both ends have left
    /// idle (its producer detached or not writing, this consumer about to hand it on): the
    /// next pair of ends starts from clean words. Only while nobody else uses the ring.
    pub(crate) fn reopen(&self) {
        let header = self.ring.header();
        header.tail.gone.store(0, Ordering::Relaxed);
        header.tail.parked.store(0, Ordering::Relaxed);
        header.head.parked.store(0, Ordering::Relaxed);
    }

    /// `rec`'s payload, read in place (16-byte aligned).
    ///
    /// The borrow of `self` keeps the record from being released (which takes `&mut self`)
    /// while the slice lives, and a producer following the protocol never writes a committed
    /// record before its release: so the bytes do not change under the slice.
    ///
    /// # Panics
    ///
    /// If `rec` was not returned by this consumer or is released.
    ///
    /// # Safety
    ///
    /// The producer follows the protocol: it is this crate's [`Producer`] in this process, or in
    /// a process trusted not to write committed records before their release. A hostile producer
    /// could change the bytes under the shared reference, which is undefined behaviour; use
    /// [`copy_to`](Self::copy_to) for untrusted producers.
    pub(crate) unsafe fn bytes(&self, rec: Record) -> &[u8] {
        let src = self.ring.data().wrapping_add(self.payload_offset(rec));
        // SAFETY: `from_raw_parts` requires a pointer valid for reads of `rec.len()` initialised
        // bytes (inside the data area, checked by `payload_offset`; initialised by the `Region`
        // contract) that nothing mutates while the slice lives: the record is committed and not
        // released, cannot be released while `&self` is borrowed, and the caller guarantees the
        // producer does not write it before release. `rec.len() <= capacity <= isize::MAX`.
        unsafe { std::slice::from_raw_parts(src, rec.len()) }
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl Record {
    /// Position of the record in the ring (a byte index that only grows).
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Payload length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the payload is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position just past the record: where the next one starts, and what `head` becomes when it
    /// is released.
    pub(crate) fn end(&self) -> u64 {
        self.pos + record_size(self.len()) as u64
    }
}

/// One index and one doorbell word on a cache-line pair of their own. Part of the shared
/// layout, so its alignment is spelled out rather than taken from `CachePadded`, whose alignment
/// varies by target.
#[repr(C, align(128))]
#[derive(Debug)]
struct IndexLine {
    /// `head` or `tail`: written only by the side that owns the line.
    index: AtomicU64,
    /// The doorbell: nonzero while the *other* side is parked (or about to park) on it.
    parked: AtomicU32,
    /// On the `tail` line only: nonzero once the consumer will read no more (its receiver is
    /// gone), so the producer stops writing. Advisory: it carries no data. On the line the
    /// producer writes, not on `head`'s, so that a sender can look at it before every message
    /// without pulling in the line the consumer writes on every release.
    gone: AtomicU32,
}

/// The ring header at the start of the region.
#[repr(C)]
#[derive(Debug)]
struct Header {
    /// Written by the consumer only: everything before it is free for the producer. Its
    /// doorbell is the *producer parked* word.
    head: IndexLine,
    /// Written by the producer only: everything before it is reserved or committed. Its
    /// doorbell is the *consumer parked* word.
    tail: IndexLine,
}

impl Header {
    fn line(&self, line: Line) -> &IndexLine {
        match line {
            Line::Head => &self.head,
            Line::Tail => &self.tail,
        }
    }
}

/// The region plus the derived capacity: the memory access helpers both ends share.
#[derive(Debug)]
struct Ring<R: Memory> {
    region: R,
    /// Data area size: a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    cap: usize,
}

impl<R: Memory> Ring<R> {
    /// Checks what every unsafe method of [`Memory`] requires: an aligned base and a valid
    /// length (at least the header, since the data area is at least `MIN_CAPACITY`).
    fn new(region: R) -> Result<Self, Corrupt> {
        // The `Region` contract promises this; everything below relies on it, so check anyway.
        if !region.base_aligned() {
            return Err(Corrupt::new("region base is not 128-byte aligned"));
        }
        let cap = capacity_of(region.size())?;
        Ok(Self { region, cap })
    }

    /// The index word of `line`.
    fn index(&self, line: Line) -> &R::U64 {
        // SAFETY: `index` requires an aligned base and at least `HEADER_SIZE` bytes, which
        // `new` checked.
        unsafe { self.region.index(line) }
    }

    /// The doorbell word of `line`.
    fn doorbell(&self, line: Line) -> &R::U32 {
        // SAFETY: `doorbell` requires an aligned base and at least `HEADER_SIZE` bytes, which
        // `new` checked.
        unsafe { self.region.doorbell(line) }
    }

    /// Where position `pos` falls in the data area.
    fn offset(&self, pos: u64) -> usize {
        // The capacity is a power of two, at most 2^30: the masked value fits in `usize`.
        (pos & (self.cap as u64 - 1)) as usize
    }

    /// The commit word of the record at data-area offset `off`.
    ///
    /// # Panics
    ///
    /// If `off` is not a 16-aligned offset inside the data area (an internal bug).
    fn word(&self, off: usize) -> &R::U32 {
        assert!(
            off < self.cap && off % RECORD_ALIGN == 0,
            "bad record offset {off}"
        );
        // SAFETY: `word` requires what `index` does (checked in `new`) and a 16-aligned `off`
        // with `off + 16 <= cap`: asserted above (`cap` is a multiple of 16).
        unsafe { self.region.word(off) }
    }

    fn max_len(&self) -> usize {
        self.cap / 2 - RECORD_HEADER
    }

    /// Publishes the first `n` bytes of the `len`-byte reservation at `pos`; the rest, if it
    /// spans at least one 16-byte unit, becomes a padding record, written before the commit
    /// word is published so a consumer that sees the commit sees the padding.
    ///
    /// # Panics
    ///
    /// If `n > len`.
    fn commit_len(&self, pos: u64, len: usize, n: usize) {
        assert!(n <= len, "commit of {n} bytes of a {len}-byte grant");
        let rest = record_size(len) - record_size(n);
        if rest > 0 {
            let off = self.offset(pos) + record_size(n);
            // Relaxed: published by the Release store of the commit word below, which the
            // consumer loads with Acquire before it moves on to this word. `rest` is a positive
            // multiple of 16 below 2^30, and the padding ends where the grant ended, inside the
            // data area.
            self.word(off)
                .store(TAG_PAD | rest as u32, Ordering::Relaxed);
        }
        // Release: pairs with the Acquire load of the commit word in `Consumer::scan`, so the
        // payload is visible to a consumer that sees the word. `n <= len <= max_len < 2^30`.
        self.word(self.offset(pos))
            .store(TAG_DATA | n as u32, Ordering::Release);
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl<R: Region> Ring<R> {
    fn header(&self) -> &Header {
        // SAFETY: `raw_header` requires an aligned base and at least `HEADER_SIZE` bytes, which
        // `new` checked.
        unsafe { raw_header(&self.region) }
    }

    /// The data area's start: `HEADER_SIZE` bytes into the region, so 128-byte aligned.
    fn data(&self) -> *mut u8 {
        self.region.as_ptr().wrapping_add(HEADER_SIZE)
    }

    /// The payload of the record at `pos`: 16 bytes past its header.
    fn payload(&self, pos: u64) -> *mut u8 {
        self.data().wrapping_add(self.offset(pos) + RECORD_HEADER)
    }
}

/// The capacity of the ring a region of `len` bytes holds.
fn capacity_of(len: usize) -> Result<usize, Corrupt> {
    match len.checked_sub(HEADER_SIZE) {
        Some(cap) if cap.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&cap) => {
            Ok(cap)
        }
        _ => Err(Corrupt::new(
            "region is not a header plus a power-of-two data area",
        )),
    }
}

/// Bytes a record with a `len`-byte payload takes: header plus payload, rounded up to 16.
fn record_size(len: usize) -> usize {
    RECORD_HEADER + len.next_multiple_of(RECORD_ALIGN)
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of};
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::sys::{futex_wait, futex_wake, WaitResult};

    type P = Producer<Arc<HeapRegion>>;
    type C = Consumer<Arc<HeapRegion>>;

    /// Reserves, writes and commits `data`; false if the ring is full.
    fn push(p: &mut P, data: &[u8]) -> bool {
        match p.reserve(data.len()).expect("not corrupt") {
            Some(mut grant) => {
                grant.write(data);
                grant.commit();
                true
            }
            None => false,
        }
    }

    /// Pops the next record and copies it out (without releasing it).
    fn pop_vec(c: &mut C) -> Option<Vec<u8>> {
        let rec = c.pop().expect("not corrupt")?;
        Some(c.to_vec(rec))
    }

    #[test]
    fn look_ahead_sees_what_is_left_and_consumes_nothing() {
        let (mut p, mut c) = pair(256);
        for i in 1..=3u8 {
            assert!(push(&mut p, &[i; 20]));
        }
        assert_eq!(pop_vec(&mut c), Some(vec![1; 20]));
        let mut seen = Vec::new();
        c.look_ahead(|c, rec| {
            seen.push(c.to_vec(rec));
            false
        })
        .unwrap();
        assert_eq!(seen, vec![vec![2; 20], vec![3; 20]]);
        let mut first = None;
        c.look_ahead(|c, rec| {
            first = Some(c.to_vec(rec));
            true
        })
        .unwrap();
        assert_eq!(first, Some(vec![2; 20]), "stops when told to");
        assert_eq!(
            pop_vec(&mut c),
            Some(vec![2; 20]),
            "the cursor did not move"
        );
        assert_eq!(pop_vec(&mut c), Some(vec![3; 20]));
        assert_eq!(pop_vec(&mut c), None);
    }

    fn payload(seed: usize, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seed * 31 + i * 7) as u8).collect()
    }

    #[test]
    fn layout() {
        assert_eq!(size_of::<IndexLine>(), 128);
        assert_eq!(align_of::<IndexLine>(), 128);
        assert_eq!(offset_of!(Header, head), 0);
        assert_eq!(offset_of!(Header, tail), 128);
        assert_eq!(HEADER_SIZE, 256);
        assert_eq!(align_of::<Header>(), REGION_ALIGN);
        assert_eq!(region_len(4096), 4096 + 256);
        assert_eq!(record_size(0), 16);
        assert_eq!(record_size(1), 32);
        assert_eq!(record_size(16), 32);
        assert_eq!(record_size(17), 48);

        let (mut p, c) = pair(1024);
        let base = p.region().as_ptr() as usize;
        assert_eq!(base % REGION_ALIGN, 0);
        assert_eq!(c.region().as_ptr() as usize, base);
        assert_eq!(p.ring.data() as usize - base, HEADER_SIZE);
        assert_eq!(
            &p.ring.header().tail.index as *const AtomicU64 as usize - base,
            128
        );
        assert_eq!(p.capacity(), 1024);
        let addr = |word: &AtomicU32| word as *const AtomicU32 as usize - base;
        assert_eq!(addr(p.room_word()), ROOM_WORD_OFFSET);
        assert_eq!(addr(p.gone_word()), GONE_WORD_OFFSET);
        assert_eq!(p.gone_word().load(Ordering::Relaxed), 0);
        c.mark_gone();
        assert_eq!(p.gone_word().load(Ordering::Acquire), 1);
        assert_eq!(addr(&p.ring.header().head.parked), ROOM_WORD_OFFSET);
        assert_eq!(addr(c.data_word()), DATA_WORD_OFFSET);
        assert_eq!(addr(&p.ring.header().tail.parked), DATA_WORD_OFFSET);
        assert_eq!(c.capacity(), 1024);
        assert_eq!(p.max_len(), 512 - 16);
        for len in [0, 1, 15, 16, 17, 100] {
            let mut grant = p.reserve(len).unwrap().unwrap();
            assert_eq!(grant.len(), len);
            assert_eq!(grant.is_empty(), len == 0);
            let ptr = grant.as_mut_ptr() as usize;
            assert_eq!(ptr % RECORD_ALIGN, 0, "payloads are 16-byte aligned");
            assert!(ptr >= base + HEADER_SIZE + RECORD_HEADER);
            assert!(ptr + len <= base + region_len(1024));
            grant.commit();
        }
    }

    #[test]
    fn capacity_must_be_a_power_of_two_in_range() {
        assert!(capacity_of(region_len(64)).is_ok());
        assert!(capacity_of(region_len(1 << 20)).is_ok());
        for bad in [0, 32, 96, 1000, 2 * MAX_CAPACITY] {
            assert!(capacity_of(region_len(bad)).is_err(), "{bad}");
        }
        assert!(capacity_of(100).is_err(), "shorter than the header");
    }

    #[test]
    fn round_trip() {
        let (mut p, mut c) = pair(1024);
        assert_eq!(c.peek(), Ok(None));
        assert!(push(&mut p, b"hello"));
        assert!(push(&mut p, b"world!"));
        let rec = c.peek().unwrap().unwrap();
        assert_eq!(rec.len(), 5);
        assert_eq!(c.peek().unwrap(), Some(rec), "peek does not consume");
        c.consume(rec);
        // SAFETY: the producer is this crate's `Producer`, in this thread.
        assert_eq!(unsafe { c.bytes(rec) }, b"hello");
        let rec2 = c.pop().unwrap().unwrap();
        assert_eq!(rec2.pos(), rec.end());
        assert_eq!(c.to_vec(rec2), b"world!");
        assert_eq!(c.to_vec(rec), b"hello", "still readable before release");
        assert_eq!(c.pop(), Ok(None));
        c.release();
        assert_eq!(c.pop(), Ok(None));
    }

    #[test]
    fn zero_length_records() {
        let (mut p, mut c) = pair(64);
        // 64 bytes of data area hold four header-only records.
        for _ in 0..4 {
            assert!(push(&mut p, b""));
        }
        assert!(!push(&mut p, b""), "full");
        for _ in 0..4 {
            let rec = c.pop().unwrap().unwrap();
            assert!(rec.is_empty());
            assert_eq!(c.to_vec(rec), b"");
        }
        assert_eq!(c.pop(), Ok(None));
        c.release();
        assert!(push(&mut p, b""));
        assert!(c.pop().unwrap().unwrap().is_empty());
    }

    #[test]
    fn full_ring_returns_none_until_released() {
        let (mut p, mut c) = pair(256);
        // Records of 48 bytes (32-byte payload): five fit in 256 bytes with 16 to spare.
        let mut pushed = 0;
        while push(&mut p, &payload(pushed, 32)) {
            pushed += 1;
        }
        assert_eq!(pushed, 5);
        assert!(
            push(&mut p, b""),
            "a header-only record still fits the last 16 bytes"
        );
        assert!(!push(&mut p, b""));
        let first = c.pop().unwrap().unwrap();
        assert!(
            !push(&mut p, b"x"),
            "consumed but unreleased bytes stay taken"
        );
        c.release_through(first);
        assert!(
            push(&mut p, &payload(99, 32)),
            "released bytes are free again"
        );
        for i in 1..5 {
            assert_eq!(pop_vec(&mut c).unwrap(), payload(i, 32));
        }
        assert_eq!(pop_vec(&mut c).unwrap(), b"");
        assert_eq!(pop_vec(&mut c).unwrap(), payload(99, 32));
    }

    #[test]
    fn too_large_never_fits_and_max_len_always_fits_in_an_empty_ring() {
        let (mut p, mut c) = pair(256);
        assert!(p.reserve(p.max_len() + 1).unwrap().is_none());
        // Walk the tail through every 16-byte offset; at each, an empty ring takes max_len.
        for step in 0..(256 / 16) {
            let max = p.max_len();
            assert!(push(&mut p, &payload(step, max)), "offset {}", step * 16);
            assert_eq!(pop_vec(&mut c).unwrap(), payload(step, max));
            assert!(push(&mut p, b""));
            assert_eq!(pop_vec(&mut c).unwrap(), b"");
            c.release();
            assert!(p.reserve(p.max_len() + 1).unwrap().is_none());
        }
    }

    #[test]
    fn wrap_inserts_padding_and_keeps_payloads_contiguous() {
        let (mut p, mut c) = pair(256);
        assert!(push(&mut p, &payload(1, 100))); // 128 bytes: 0..128
        assert!(push(&mut p, &payload(2, 64))); // 80 bytes: 128..208
        assert_eq!(pop_vec(&mut c).unwrap(), payload(1, 100));
        c.release();
        // 80 bytes do not fit in 208..256: padding fills it, the record goes to 0..80.
        assert!(push(&mut p, &payload(3, 64)));
        let pad = p.ring.word(208).load(Ordering::Relaxed);
        assert_eq!(pad, TAG_PAD | 48);
        assert_eq!(pop_vec(&mut c).unwrap(), payload(2, 64));
        let rec = c.pop().unwrap().unwrap();
        assert_eq!(rec.pos(), 256, "after the padding");
        assert_eq!(c.ring.offset(rec.pos()), 0);
        assert_eq!(c.to_vec(rec), payload(3, 64));
        assert_eq!(c.pop(), Ok(None));
    }

    #[test]
    fn many_laps_of_varied_sizes() {
        // Against a model; small enough for miri.
        let (mut p, mut c) = pair(256);
        let mut model = std::collections::VecDeque::new();
        let mut unreleased = 0;
        let mut x = 0x2545_f491_u32;
        let mut seq = 0;
        for _ in 0..if cfg!(miri) { 300 } else { 3000 } {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match x % 4 {
                0 | 1 => {
                    let data = payload(seq, (x as usize >> 3) % (p.max_len() + 1));
                    if push(&mut p, &data) {
                        model.push_back(data);
                        seq += 1;
                    }
                }
                2 => match pop_vec(&mut c) {
                    Some(got) => {
                        assert_eq!(Some(got), model.pop_front());
                        unreleased += 1;
                    }
                    None => assert!(model.is_empty()),
                },
                _ => {
                    if unreleased > 0 {
                        c.release();
                        unreleased = 0;
                    }
                }
            }
        }
        assert!(seq > 50, "the test exercised the ring ({seq} records)");
    }

    #[test]
    fn uncommitted_grant_blocks_and_dropped_grant_is_skipped() {
        let (mut p, mut c) = pair(256);
        let mut grant = p.reserve(8).unwrap().unwrap();
        grant.write(b"pending!");
        assert_eq!(c.peek(), Ok(None), "reserved but not committed");
        grant.commit();
        assert_eq!(pop_vec(&mut c).unwrap(), b"pending!");

        let abandoned = p.reserve(40).unwrap().unwrap();
        assert_eq!(c.peek(), Ok(None));
        drop(abandoned);
        assert!(push(&mut p, b"after"));
        assert_eq!(
            pop_vec(&mut c).unwrap(),
            b"after",
            "the dropped grant is skipped"
        );
    }

    #[test]
    fn batched_and_partial_release() {
        let (mut p, mut c) = pair(256);
        for i in 0..5 {
            assert!(push(&mut p, &payload(i, 32)));
        }
        let recs: Vec<Record> = (0..4).map(|_| c.pop().unwrap().unwrap()).collect();
        c.release_through(recs[1]);
        // The two records released; the other two still readable.
        assert_eq!(c.to_vec(recs[2]), payload(2, 32));
        assert_eq!(c.to_vec(recs[3]), payload(3, 32));
        c.release_through(recs[0]); // already released: no-op
        assert!(push(&mut p, &payload(5, 32)));
        assert!(push(&mut p, &payload(6, 32)));
        assert!(
            !push(&mut p, &payload(7, 32)),
            "only two records' worth was released"
        );
        c.release();
        assert_eq!(pop_vec(&mut c).unwrap(), payload(4, 32));
        assert_eq!(pop_vec(&mut c).unwrap(), payload(5, 32));
        assert_eq!(pop_vec(&mut c).unwrap(), payload(6, 32));
    }

    #[test]
    #[should_panic(expected = "not readable")]
    fn released_record_cannot_be_read() {
        let (mut p, mut c) = pair(256);
        assert!(push(&mut p, b"gone"));
        let rec = c.pop().unwrap().unwrap();
        c.release();
        let _ = c.to_vec(rec);
    }

    #[test]
    fn hot_window_starts_over_while_the_consumer_keeps_up() {
        let cap = 4 * HOT_WINDOW;
        let (mut p, mut c) = pair(cap);
        // Records of `size` bytes with their header (fewer, larger ones under miri).
        let size = if cfg!(miri) { 16 << 10 } else { 1 << 10 };
        let data = payload(7, size - RECORD_HEADER);
        let per_lap = HOT_WINDOW / size + 1;
        // A consumer that keeps up: the producer goes back to offset 0 once past the window.
        let mut offsets = Vec::new();
        for _ in 0..3 * per_lap {
            assert!(push(&mut p, &data));
            let rec = c.pop().unwrap().unwrap();
            offsets.push(c.ring.offset(rec.pos()));
            assert_eq!(c.to_vec(rec), data);
            c.release();
        }
        assert!(
            offsets.iter().all(|&o| o < HOT_WINDOW + size),
            "stayed in the window"
        );
        assert!(
            offsets.iter().filter(|&&o| o == 0).count() >= 3,
            "wrapped every lap"
        );
        // A consumer that stops reading right after a wrap: the producer still gets the lap it
        // wrapped at, at least the window.
        loop {
            assert!(push(&mut p, &data));
            let rec = c.pop().unwrap().unwrap();
            c.release();
            if c.ring.offset(rec.pos()) == 0 {
                break;
            }
        }
        let mut held = 0;
        while push(&mut p, &data) {
            held += 1;
        }
        assert!(held * size >= HOT_WINDOW, "only {held} records fit");
        for _ in 0..held {
            assert_eq!(pop_vec(&mut c).unwrap(), data);
        }
        assert_eq!(c.pop(), Ok(None));
        c.release();
        // A consumer that falls behind before the window ends: the producer fills the ring.
        let (mut p, _c) = pair(cap);
        let mut more = 0;
        while push(&mut p, &data) {
            more += 1;
        }
        assert_eq!(more, cap / size, "the whole ring");
    }

    /// A consumer that holds records keeps the producer from wrapping early, and the padding
    /// of a wrap goes back as soon as the consumer reads past it, whatever it holds after it:
    /// the producer always has the ring less what is held.
    #[test]
    fn held_records_do_not_shrink_the_ring() {
        let cap = 4 * HOT_WINDOW;
        let (mut p, mut c) = pair(cap);
        let size = 16 << 10;
        let data = payload(3, size - RECORD_HEADER);
        // Past the window with one record held (taken just before it): no early wrap.
        let mut taken = crate::ring::release::Outstanding::default();
        let first = loop {
            assert!(push(&mut p, &data));
            let rec = c.pop().unwrap().unwrap();
            if c.ring.offset(rec.pos()) + 2 * size >= HOT_WINDOW {
                break rec;
            }
            let _ = taken.push(&mut c, rec, true);
            let _ = taken.sweep(&mut c);
        };
        let _ = taken.push(&mut c, first, false);
        while c.ring.offset(p.tail) < HOT_WINDOW + size {
            assert!(push(&mut p, &data));
            let rec = c.pop().unwrap().unwrap();
            let _ = taken.push(&mut c, rec, true);
        }
        assert!(push(&mut p, &data));
        let rec = c.pop().unwrap().unwrap();
        assert_ne!(c.ring.offset(rec.pos()), 0, "wrapped with a record held");
        let _ = taken.push(&mut c, rec, true);
        taken.done(first.pos());
        let _ = taken.sweep(&mut c);

        // Nothing held: the next look at `head` wraps.
        let mut wrapped = None;
        for _ in 0..HOT_RECHECK as usize / size + 1 {
            assert!(push(&mut p, &data));
            let rec = c.pop().unwrap().unwrap();
            if c.ring.offset(rec.pos()) == 0 {
                wrapped = Some(rec);
                break;
            }
            let _ = taken.push(&mut c, rec, true);
            let _ = taken.sweep(&mut c);
        }
        let wrapped = wrapped.expect("an early wrap");
        // The consumer keeps the record after the padding, and everything it reads next.
        let _ = taken.push(&mut c, wrapped, false);
        let mut more = 1;
        while push(&mut p, &data) {
            let rec = c.pop().unwrap().unwrap();
            let _ = taken.push(&mut c, rec, false);
            more += 1;
        }
        assert_eq!(more, cap / size, "the whole ring, less nothing");
    }

    #[test]
    fn cached_indices_avoid_reloads() {
        let (mut p, mut c) = pair(256);
        assert!(push(&mut p, b"a"));
        assert!(push(&mut p, b"b"));
        // The consumer loads `tail` once and reads both records from its cached copy.
        assert!(c.pop().unwrap().is_some());
        p.ring.header().tail.index.store(7, Ordering::Relaxed); // would be corrupt if loaded
        assert!(c.pop().unwrap().is_some());
        p.ring.header().tail.index.store(64, Ordering::Relaxed);
        // The producer reloads `head` only when its cached copy says the ring is full.
        c.ring.header().head.index.store(8, Ordering::Relaxed); // would be corrupt if loaded
        assert!(push(&mut p, b"c"));
        assert_eq!(p.cached_head, 0);
    }

    // Doorbells.

    fn same(a: &AtomicU32, b: &AtomicU32) -> bool {
        ptr::eq(a, b)
    }

    #[test]
    fn consumer_doorbell_wakes_once_per_park() {
        let (mut p, c) = pair(256);
        assert!(p.wake_needed().is_none(), "nobody parked");
        assert!(push(&mut p, b"x"));
        assert!(p.wake_needed().is_none());

        let word = c.park_prepare();
        assert!(same(word, c.data_word()));
        assert_eq!(word.load(Ordering::Relaxed), 1);
        let woken = p.wake_needed().expect("the consumer is parked");
        assert!(
            same(woken, c.data_word()),
            "the producer wakes the word the consumer waits on"
        );
        assert_eq!(
            c.data_word().load(Ordering::Relaxed),
            0,
            "the wake clears the word"
        );
        assert!(
            p.wake_needed().is_none(),
            "one wake per park, however many commits"
        );
        c.park_done();
        assert_eq!(c.data_word().load(Ordering::Relaxed), 0);

        // A park that ends without a wake (e.g. a timeout) leaves no wake pending.
        let _ = c.park_prepare();
        c.park_done();
        assert!(p.wake_needed().is_none());

        // The producer's own word is untouched by all this.
        assert_eq!(p.room_word().load(Ordering::Relaxed), 0);
    }

    #[test]
    fn producer_doorbell_wakes_once_per_park() {
        let (mut p, mut c) = pair(64);
        assert!(push(&mut p, &[1; 16]));
        assert!(push(&mut p, &[2; 16]));
        assert_eq!(p.has_room(0), Ok(false), "full");
        assert!(c.wake_needed().is_none(), "nobody parked");

        let word = p.park_prepare();
        assert!(same(word, p.room_word()));
        assert_eq!(word.load(Ordering::Relaxed), 1);
        assert_eq!(p.has_room(0), Ok(false), "the re-check still finds it full");
        assert!(c.pop().unwrap().is_some());
        c.release();
        let woken = c.wake_needed().expect("the producer is parked");
        assert!(same(woken, p.room_word()));
        assert!(c.wake_needed().is_none(), "one wake per park");
        p.park_done();
        assert_eq!(p.room_word().load(Ordering::Relaxed), 0);
        assert_eq!(p.has_room(16), Ok(true), "the release is visible");
        assert_eq!(c.data_word().load(Ordering::Relaxed), 0);
    }

    #[test]
    fn hostile_doorbell_values_read_as_parked() {
        let (p, c) = pair(256);
        for junk in [2, 0xdead_beef, u32::MAX, 1 << 31] {
            c.data_word().store(junk, Ordering::Relaxed);
            assert!(p.wake_needed().is_some(), "{junk:#x}");
            assert_eq!(c.data_word().load(Ordering::Relaxed), 0);
            p.room_word().store(junk, Ordering::Relaxed);
            assert!(c.wake_needed().is_some(), "{junk:#x}");
            assert_eq!(p.room_word().load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn has_room_and_is_empty() {
        let (mut p, mut c) = pair(256);
        assert_eq!(c.is_empty(), Ok(true));
        assert_eq!(p.has_room(p.max_len()), Ok(true));
        assert_eq!(p.has_room(p.max_len() + 1), Ok(false), "never fits");
        assert!(push(&mut p, &payload(0, 100))); // 0..128
        assert_eq!(c.is_empty(), Ok(false));
        assert_eq!(c.is_empty(), Ok(false), "is_empty does not consume");
        assert!(push(&mut p, &payload(1, 64))); // 128..208
        assert_eq!(p.has_room(16), Ok(true), "fits in 208..256");
        assert_eq!(
            p.has_room(64),
            Ok(false),
            "would pad to 256 and wrap onto unreleased bytes"
        );
        assert_eq!(pop_vec(&mut c).unwrap(), payload(0, 100));
        assert_eq!(p.has_room(64), Ok(false), "consumed but not released");
        c.release();
        assert_eq!(p.has_room(64), Ok(true), "has_room reloads head");
        assert_eq!(pop_vec(&mut c).unwrap(), payload(1, 64));
        assert_eq!(c.is_empty(), Ok(true));
        // A reservation dropped uncommitted is padding: the ring reads as empty.
        drop(p.reserve(8).unwrap().unwrap());
        assert_eq!(c.is_empty(), Ok(true));
        // Corruption is reported, not hidden behind a bool.
        let (mut p, _c) = pair(64);
        assert!(push(&mut p, &[1; 16]));
        assert!(push(&mut p, &[2; 16]));
        p.ring.header().head.index.store(8, Ordering::Release);
        assert_eq!(
            p.has_room(0).unwrap_err().what(),
            "head is not 16-byte aligned"
        );
        assert!(p.reserve(0).is_err(), "stays corrupt");
    }

    // Partial commits.

    #[test]
    fn detached_reservations_hold_their_place() {
        let (mut p, mut c) = pair(256);
        let mut grant = p.reserve(40).unwrap().unwrap();
        grant.write(&payload(1, 40));
        let first = grant.detach();
        assert_eq!(first.len(), 40);
        assert!(
            push(&mut p, &payload(2, 8)),
            "reserved behind the detached one"
        );
        let dropped = p.reserve(24).unwrap().unwrap().detach();
        assert!(push(&mut p, &payload(3, 8)));
        assert_eq!(
            c.pop(),
            Ok(None),
            "the consumer waits at the unfinished one"
        );
        p.commit_detached(first, 33);
        assert_eq!(pop_vec(&mut c).unwrap(), payload(1, 33));
        assert_eq!(pop_vec(&mut c).unwrap(), payload(2, 8));
        assert_eq!(c.pop(), Ok(None));
        p.abandon_detached(dropped);
        assert_eq!(
            pop_vec(&mut c).unwrap(),
            payload(3, 8),
            "abandoned: skipped"
        );
        assert_eq!(c.pop(), Ok(None));
    }

    /// A reservation made detached is not shown to the consumer until it is finished, or a
    /// record behind it is reserved; then the consumer waits at it, as at any detached one.
    #[test]
    fn quiet_detached_reservations_are_shown_when_finished() {
        let (mut p, mut c) = pair(256);
        let room = p.room_for(40).unwrap().unwrap();
        let first = p.reserve_detached(room);
        p.write_detached(&first, 0, &payload(1, 40));
        assert_eq!(c.is_empty(), Ok(true));
        assert_eq!(
            p.ring.index(Line::Tail).load(Ordering::Relaxed),
            0,
            "tail not moved yet"
        );
        p.commit_detached(first, 40);
        assert_eq!(pop_vec(&mut c).unwrap(), payload(1, 40));

        let room = p.room_for(24).unwrap().unwrap();
        let second = p.reserve_detached(room);
        assert!(push(&mut p, &payload(3, 8)), "reserved behind it");
        assert_eq!(
            c.pop(),
            Ok(None),
            "the consumer waits at the unfinished one"
        );
        p.abandon_detached(second);
        assert_eq!(
            pop_vec(&mut c).unwrap(),
            payload(3, 8),
            "abandoned: skipped"
        );
        assert_eq!(c.pop(), Ok(None));
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn detached_writes_stay_inside_the_reservation() {
        let (mut p, _c) = pair(256);
        let room = p.room_for(16).unwrap().unwrap();
        let d = p.reserve_detached(room);
        p.write_detached(&d, 8, &[0; 9]);
    }

    #[test]
    fn commit_len_pads_the_unused_rest() {
        let (mut p, mut c) = pair(256);
        let mut grant = p.reserve(100).unwrap().unwrap(); // 0..128
        grant.write(&payload(1, 10));
        grant.commit_len(10); // 0..32 data, 32..128 padding
        assert_eq!(p.ring.word(32).load(Ordering::Relaxed), TAG_PAD | 96);
        assert!(push(&mut p, &payload(2, 20))); // 128..176
        let rec = c.pop().unwrap().unwrap();
        assert_eq!((rec.pos(), rec.len()), (0, 10));
        assert_eq!(c.to_vec(rec), payload(1, 10));
        let rec = c.pop().unwrap().unwrap();
        assert_eq!(rec.pos(), 128, "the padding is skipped");
        assert_eq!(c.to_vec(rec), payload(2, 20));
        assert_eq!(c.pop(), Ok(None));

        // The whole grant: no padding. The same record size: no padding either.
        let before = p.ring.word(176 + 48).load(Ordering::Relaxed);
        let mut grant = p.reserve(20).unwrap().unwrap(); // 176..224
        grant.write(&payload(3, 20));
        grant.commit_len(17);
        assert_eq!(
            p.ring.word(176 + 48).load(Ordering::Relaxed),
            before,
            "nothing written past the record"
        );
        assert_eq!(pop_vec(&mut c).unwrap(), payload(3, 17));
        let mut grant = p.reserve(16).unwrap().unwrap(); // 224..256
        grant.write(&payload(4, 16));
        grant.commit_len(16);
        assert_eq!(pop_vec(&mut c).unwrap(), payload(4, 16));

        // Nothing at all: an empty record, then padding.
        c.release();
        let grant = p.reserve(40).unwrap().unwrap(); // 256..320
        grant.commit_len(0);
        assert_eq!(pop_vec(&mut c).unwrap(), b"");
        assert!(push(&mut p, b"next"));
        let rec = c.pop().unwrap().unwrap();
        assert_eq!(rec.pos(), 256 + 64);
        assert_eq!(c.to_vec(rec), b"next");
    }

    #[test]
    #[should_panic(expected = "commit of 9 bytes of a 8-byte grant")]
    fn commit_len_past_the_grant_panics() {
        let (mut p, _c) = pair(256);
        p.reserve(8).unwrap().unwrap().commit_len(9);
    }

    #[test]
    fn commit_len_many_laps_against_a_model() {
        // Tiny ring, reservations up to the maximum, commits of any prefix: every lap pads at
        // the end of the data area and inside records. Small enough for miri.
        for capacity in [64, 128, 256] {
            let (mut p, mut c) = pair(capacity);
            let mut model = std::collections::VecDeque::new();
            let mut x = 0x9e37_79b9_u32 ^ capacity as u32;
            let mut seq = 0;
            let mut partial = 0;
            for _ in 0..if cfg!(miri) { 1000 } else { 5000 } {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                match x % 8 {
                    0..=3 => {
                        let len = (x as usize >> 4) % (p.max_len() + 1);
                        // Under miri, a multiple of 4: see `record_len` for the miri crash that
                        // a payload ending inside a commit word of another lap triggers.
                        let len = if cfg!(miri) { len / 4 * 4 } else { len };
                        let n = (x as usize >> 12) % (len + 1);
                        let data = payload(seq, len);
                        if let Some(mut grant) = p.reserve(len).unwrap() {
                            grant.write(&data);
                            if (x >> 24) % 8 == 0 {
                                drop(grant);
                            } else {
                                if record_size(n) < record_size(len) {
                                    partial += 1;
                                }
                                grant.commit_len(n);
                                model.push_back(data[..n].to_vec());
                            }
                            seq += 1;
                        }
                    }
                    4 | 5 => match pop_vec(&mut c) {
                        Some(got) => {
                            assert_eq!(Some(got), model.pop_front());
                        }
                        None => assert!(model.is_empty()),
                    },
                    // Also when nothing was popped: dropped grants are padding to release.
                    _ => c.release(),
                }
            }
            while let Some(got) = pop_vec(&mut c) {
                assert_eq!(Some(got), model.pop_front());
            }
            assert!(model.is_empty());
            assert!(
                seq > 40 && partial > 10,
                "the test exercised the ring ({seq} records, {partial} padded, capacity {capacity})"
            );
        }
    }

    // Corruption: a peer scribbles on the header or a commit word.

    fn corrupt_tail(tail: u64) -> Corrupt {
        let (mut p, mut c) = pair(256);
        assert!(push(&mut p, b"one"));
        assert!(push(&mut p, b"two"));
        assert!(c.pop().unwrap().is_some());
        c.release();
        assert!(c.pop().unwrap().is_some());
        assert_eq!(c.pop(), Ok(None)); // cursor at tail: the next peek reloads it
        p.ring.header().tail.index.store(tail, Ordering::Release);
        let err = c.peek().unwrap_err();
        assert_eq!(c.peek(), Err(err), "a corrupt ring stays corrupt");
        err
    }

    #[test]
    fn corrupt_tail_too_far_ahead() {
        // head is 32 after the release.
        let err = corrupt_tail(32 + 256 + 16);
        assert_eq!(err.what(), "tail is more than a capacity ahead of head");
        assert!(corrupt_tail(u64::MAX - 15).what().contains("ahead of head"));
    }

    #[test]
    fn corrupt_tail_misaligned() {
        assert_eq!(corrupt_tail(72).what(), "tail is not 16-byte aligned");
    }

    #[test]
    fn corrupt_tail_backwards() {
        assert_eq!(corrupt_tail(32).what(), "tail moved backwards");
    }

    fn corrupt_word(word: u32) -> Corrupt {
        let (mut p, mut c) = pair(256);
        assert!(push(&mut p, b"0123456789"));
        c.ring.word(0).store(word, Ordering::Release);
        let err = c.peek().unwrap_err();
        assert_eq!(c.pop(), Err(err));
        err
    }

    #[test]
    fn corrupt_length() {
        let err = corrupt_word(TAG_DATA | 113);
        assert_eq!(err.what(), "record length exceeds the ring's maximum");
        assert_eq!(corrupt_word(TAG_DATA | LEN_MASK), err);
        assert_eq!(
            corrupt_word(TAG_DATA | 17).what(),
            "record extends past tail"
        );
    }

    #[test]
    fn corrupt_tag_and_padding() {
        assert_eq!(corrupt_word(TAG_MASK | 16).what(), "unknown record tag");
        assert_eq!(corrupt_word(0x0000_0010).what(), "unknown record tag");
        assert_eq!(
            corrupt_word(TAG_PAD | 8).what(),
            "padding is not a positive multiple of 16"
        );
        assert_eq!(
            corrupt_word(TAG_PAD).what(),
            "padding is not a positive multiple of 16"
        );
        assert_eq!(
            corrupt_word(TAG_PAD | 512).what(),
            "record crosses the end of the data area"
        );
        assert_eq!(
            corrupt_word(TAG_PAD | 64).what(),
            "record extends past tail"
        );
    }

    #[test]
    fn corrupt_record_crossing_the_end() {
        let (mut p, mut c) = pair(256);
        for _ in 0..7 {
            assert!(push(&mut p, b"x")); // 32 bytes each: 0..224
        }
        for _ in 0..7 {
            assert!(c.pop().unwrap().is_some());
        }
        c.release();
        assert!(push(&mut p, b"y")); // 224..256
                                     // A 48-byte record at 224 would run 16 bytes past the end of the data area.
        c.ring.word(224).store(TAG_DATA | 20, Ordering::Release);
        assert_eq!(
            c.peek().unwrap_err().what(),
            "record crosses the end of the data area"
        );
    }

    #[test]
    fn corrupt_head_is_seen_by_the_producer() {
        for (head, what) in [
            (8, "head is not 16-byte aligned"),
            (4096, "head is outside [previous head, tail]"),
        ] {
            let (mut p, _c) = pair(64);
            assert!(push(&mut p, &[1; 16]));
            assert!(push(&mut p, &[2; 16]));
            p.ring.header().head.index.store(head, Ordering::Release);
            let err = p.reserve(0).map(|g| g.is_some()).unwrap_err();
            assert_eq!(err.what(), what);
            assert_eq!(p.reserve(0).map(|g| g.is_some()), Err(err), "stays corrupt");
        }
    }

    #[test]
    fn corrupt_region_is_refused_at_attach() {
        let region = Arc::new(HeapRegion::new(region_len(256)));
        let header = region.as_ptr().cast::<Header>();
        // SAFETY: the region is valid and 128-aligned for a `Header`, and nothing else uses it.
        let header = unsafe { &*header };
        header.tail.index.store(512, Ordering::Relaxed);
        // SAFETY: no other producer or consumer is attached to this region.
        let producer = unsafe { Producer::attach(Arc::clone(&region)) };
        assert!(producer.is_err());
        header.head.index.store(3, Ordering::Relaxed);
        // SAFETY: no other producer or consumer is attached to this region.
        let consumer = unsafe { Consumer::attach(Arc::clone(&region)) };
        assert!(consumer.is_err());
        let short = Arc::new(HeapRegion::new(region_len(256) - 16));
        // SAFETY: no other consumer is attached to this region.
        let consumer = unsafe { Consumer::attach(short) };
        assert!(consumer.is_err());
    }

    // Two threads.

    /// Body bytes of the stress records: a fixed pattern, sliced at an offset chosen by `seq`.
    const PATTERN: [u8; 512] = {
        let mut table = [0; 512];
        let mut i = 0;
        while i < 512 {
            table[i] = (i * 167 + 13) as u8 ^ (i >> 3) as u8;
            i += 1;
        }
        table
    };

    /// Payload length of stress record `seq`, in `12..=max_len` (`max_len <= 268`).
    ///
    /// Under miri, a multiple of 4: miri's weak-memory emulation panics (an ICE, "cannot have
    /// empty store buffer when previous write was atomic") when a non-atomic write partially
    /// overlaps a location earlier used atomically, which is what a payload ending inside a
    /// later lap's commit word does. That is legal Rust (the accesses are ordered through
    /// `head`); odd lengths run concurrently under miri with `-Zmiri-disable-weak-memory-emulation`
    /// and single-threaded in `many_laps_of_varied_sizes`.
    fn record_len(seq: u64, max_len: usize) -> usize {
        let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 29;
        let len = 12 + (x as usize % (max_len - 11));
        if cfg!(miri) {
            len / 4 * 4
        } else {
            len
        }
    }

    /// Record `seq`: 8 bytes of `seq`, a body from `PATTERN`, a 4-byte checksum of the rest.
    /// (Built from slices, not byte loops, so the debug-build stress test stays quick.)
    fn make_record(seq: u64, buf: &mut Vec<u8>, max_len: usize) {
        let len = record_len(seq, max_len);
        let start = (seq as usize * 11) % 256;
        buf.clear();
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&PATTERN[start..start + len - 12]);
        let sum = checksum(buf);
        buf.extend_from_slice(&sum.to_le_bytes());
    }

    /// A position-sensitive checksum over 8-byte words (and the tail bytes).
    fn checksum(bytes: &[u8]) -> u32 {
        let words = bytes.chunks_exact(8);
        let tail = words.remainder().iter().map(|&b| u64::from(b));
        let sum = words
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .chain(tail)
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, w| {
                (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5)
            });
        (sum ^ (sum >> 32)) as u32
    }

    /// Runs a producer and a consumer thread over a ring of `capacity` for `count` records of up
    /// to `max_len` bytes; the consumer checks order, length and checksum and reads in place.
    ///
    /// With `slack > 0`, the producer reserves up to `slack` bytes more than each record and
    /// commits the record's length ([`Grant::commit_len`]): the rest becomes padding.
    fn two_threads(capacity: usize, count: u64, max_len: usize, slack: usize) {
        let (mut p, mut c) = pair(capacity);
        let (done_tx, done_rx) = mpsc::channel();
        let producer = thread::spawn(move || {
            let mut buf = Vec::new();
            for seq in 0..count {
                make_record(seq, &mut buf, max_len);
                let want = (buf.len() + seq as usize % (slack + 1)).min(p.max_len());
                loop {
                    if let Some(mut grant) = p.reserve(want).expect("not corrupt") {
                        grant.write(&buf);
                        if want == buf.len() {
                            grant.commit();
                        } else {
                            grant.commit_len(buf.len());
                        }
                        break;
                    }
                    thread::yield_now();
                }
            }
        });
        let consumer = thread::spawn(move || {
            let mut seq = 0;
            let mut unreleased = 0;
            while seq < count {
                let Some(rec) = c.pop().expect("not corrupt") else {
                    c.release();
                    unreleased = 0;
                    thread::yield_now();
                    continue;
                };
                // SAFETY: the producer is this crate's `Producer`, in this process.
                let got = unsafe { c.bytes(rec) };
                assert_eq!(
                    got.len(),
                    record_len(seq, max_len),
                    "length of record {seq}"
                );
                let (body, sum) = got.split_at(got.len() - 4);
                assert_eq!(
                    checksum(body).to_le_bytes(),
                    sum,
                    "checksum of record {seq}"
                );
                assert_eq!(u64::from_le_bytes(body[..8].try_into().unwrap()), seq);
                let start = (seq as usize * 11) % 256;
                assert_eq!(&body[8..], &PATTERN[start..start + body.len() - 8]);
                seq += 1;
                unreleased += 1;
                if unreleased == 16 {
                    c.release();
                    unreleased = 0;
                }
            }
            assert_eq!(c.pop(), Ok(None));
            done_tx.send(seq).unwrap();
        });
        let received = done_rx.recv_timeout(Duration::from_secs(60));
        assert_eq!(
            received,
            Ok(count),
            "consumer finished within the time limit"
        );
        producer.join().unwrap();
        consumer.join().unwrap();
    }

    #[test]
    fn two_threads_small() {
        // Small enough for miri, which checks the pairs for data races; a tiny ring forces
        // constant wrap, full and empty transitions.
        two_threads(256, if cfg!(miri) { 200 } else { 20_000 }, 100, 0);
    }

    #[test]
    fn two_threads_partial_commits() {
        // As `two_threads_small`, with reservations larger than the records: the consumer must
        // see the padding `commit_len` writes after each record (and miri checks its ordering).
        two_threads(256, if cfg!(miri) { 200 } else { 20_000 }, 100, 40);
    }

    /// What one side of [`two_threads_parked`] did.
    #[derive(Debug, Default)]
    struct Parking {
        /// `park_prepare` calls.
        prepared: u64,
        /// `futex_wait` calls (the re-check found nothing to do).
        waited: u64,
        /// Waits that ran into the (generous) timeout: a lost wake-up.
        timed_out: u64,
        /// `futex_wake` calls, on `wake_needed`'s say-so.
        woke: u64,
    }

    /// Waits on `word` for 1 changing, with a timeout that only a lost wake-up reaches.
    fn wait(word: &AtomicU32, side: &mut Parking) {
        side.waited += 1;
        let waited = futex_wait(word, 1, Some(Duration::from_secs(10))).expect("futex_wait");
        if waited == WaitResult::TimedOut {
            side.timed_out += 1;
        }
    }

    /// Like [`two_threads`], but both sides sleep on the doorbells instead of spinning, and the
    /// producer reserves more than it writes and commits the prefix ([`Grant::commit_len`]).
    fn two_threads_parked(capacity: usize, count: u64, max_len: usize) {
        let (mut p, mut c) = pair(capacity);
        let (done_tx, done_rx) = mpsc::channel();
        let producer = thread::spawn(move || {
            let mut side = Parking::default();
            let mut buf = Vec::new();
            for seq in 0..count {
                make_record(seq, &mut buf, max_len);
                let want = (buf.len() + (seq as usize * 7) % 40).min(p.max_len());
                loop {
                    if let Some(mut grant) = p.reserve(want).expect("not corrupt") {
                        grant.write(&buf);
                        grant.commit_len(buf.len());
                        break;
                    }
                    side.prepared += 1;
                    if let Some(word) = p.park_if_full(want).expect("not corrupt") {
                        wait(word, &mut side);
                    }
                    p.park_done();
                }
                if let Some(word) = p.wake_needed() {
                    futex_wake(word, 1).expect("futex_wake");
                    side.woke += 1;
                }
            }
            side
        });
        let consumer = thread::spawn(move || {
            let mut side = Parking::default();
            let mut seq = 0;
            let mut unreleased = 0;
            while seq < count {
                if let Some(rec) = c.pop().expect("not corrupt") {
                    let mut got = vec![0; rec.len()];
                    c.copy_to(rec, &mut got);
                    assert_eq!(got.len(), record_len(seq, max_len), "length of {seq}");
                    let (body, sum) = got.split_at(got.len() - 4);
                    assert_eq!(checksum(body).to_le_bytes(), sum, "checksum of {seq}");
                    assert_eq!(u64::from_le_bytes(body[..8].try_into().unwrap()), seq);
                    seq += 1;
                    unreleased += 1;
                    if unreleased < 4 {
                        continue;
                    }
                }
                if unreleased > 0 {
                    c.release();
                    unreleased = 0;
                    if let Some(word) = c.wake_needed() {
                        futex_wake(word, 1).expect("futex_wake");
                        side.woke += 1;
                    }
                    continue;
                }
                side.prepared += 1;
                if let Some(word) = c.park_if_empty().expect("not corrupt") {
                    wait(word, &mut side);
                }
                c.park_done();
            }
            done_tx.send(seq).unwrap();
            side
        });
        let received = done_rx.recv_timeout(Duration::from_secs(60));
        assert_eq!(
            received,
            Ok(count),
            "consumer finished within the time limit"
        );
        let producer = producer.join().unwrap();
        let consumer = consumer.join().unwrap();
        eprintln!("producer {producer:?}\nconsumer {consumer:?}");
        assert_eq!(
            producer.timed_out + consumer.timed_out,
            0,
            "no lost wake-up"
        );
        assert!(
            producer.woke <= consumer.prepared && consumer.woke <= producer.prepared,
            "a side wakes only a peer that parked, once per park"
        );
    }

    #[test]
    fn two_threads_parked_small() {
        // A tiny ring: the producer parks on a full ring and the consumer on an empty one
        // constantly. (miri emulates the futex calls.)
        two_threads_parked(256, if cfg!(miri) { 100 } else { 20_000 }, 100);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "too slow under miri; two_threads_parked_small covers it"
    )]
    fn two_threads_parked_large() {
        two_threads_parked(64 * 1024, 50_000, 256);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "200k records take hours under miri; two_threads_small covers it"
    )]
    fn two_threads_stress() {
        let start = Instant::now();
        two_threads(64 * 1024, 200_000, 256, 0);
        eprintln!("200k records in {:?}", start.elapsed());
    }
}
