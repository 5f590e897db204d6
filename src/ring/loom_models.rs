//! loom models of the ring: the real [`Producer`]/[`Consumer`]/[`Grant`](super::spsc::Grant)
//! code, over a memory whose shared words are loom atomics.
//!
//! Run them with (a separate target directory keeps the cfg from rebuilding the main one):
//!
//! ```text
//! RUSTFLAGS="--cfg libchan_loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test --release --lib ring::loom
//! ```
//!
//! About 15 s of model checking in a release build on 2 cores, plus the build. Each model
//! prints how many executions loom explored. `LOOM_MAX_PREEMPTIONS` overrides each model's
//! preemption bound (none for the small models, 4 for the others: all pass at 5 too, in about
//! 75 s); the other `LOOM_*` variables of [`loom::model::Builder`] apply too.
//!
//! # What is modelled, and how faithfully
//!
//! The ring code under test is the production code: `spsc.rs` reaches the region only through
//! [`Memory`], and [`LoomMemory`] implements it. Its shared words (`head`, `tail`, both
//! doorbells, one commit word per 16-byte slot of the data area) are `loom::sync::atomic`
//! atomics, so loom explores the interleavings (up to each model's preemption bound) and the
//! values each load may return under the C++/Rust memory model, within loom's limits: a
//! bounded store history, SeqCst *accesses* treated as AcqRel (the ring uses SeqCst only as
//! fences, which loom supports), and the partial modification order described below.
//!
//! Data bytes are one `loom::cell::UnsafeCell<[u8; 16]>` per 16-byte slot: loom reports any
//! payload write and read of the same slot not ordered by happens-before (a data race), and
//! since records are 16-aligned, slots map exactly onto records. The one departure from real
//! memory: a slot's commit word and its bytes are separate storage here, while in a region
//! the commit word *is* the first 4 bytes of the slot. The protocol never reads one as the
//! other (a commit word is always stored before it is loaded: zeroed by `reserve`, or written
//! as padding; a payload byte is always written before it is read), so the split does not hide
//! a stale value; what it does not check is a race between a commit-word access and a payload
//! access of the same 4 bytes in different laps (those are ordered through `head`, which the
//! release model checks through the payload slots).
//!
//! The futex is modelled as what the kernel guarantees: `wait(word, expected)` compares the
//! word and sleeps under the same lock that `wake` takes, so a waker that changed the word
//! before waking cannot be missed. A lost wake-up shows as a loom deadlock. The
//! `*_without_seqcst_fences` model runs the same doorbell code with the SeqCst fences
//! weakened to AcqRel and must fail: evidence that the models can see the store-buffer outcome
//! the fences exist to prevent.
//!
//! One loom imprecision shaped the ring code: loom orders a plain store and a concurrent
//! read-modify-write of the same word only partially, so with `park_prepare` writing its 1 by
//! a store, `doorbells_both_ways` (at 4 preemptions) reported a lost wake-up that the C++
//! model forbids; `park_prepare` now writes it with a swap (see "Why a swap" in `spsc`).

use std::sync::atomic::AtomicUsize as StdAtomicUsize;

use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicU32, AtomicU64};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use super::atomic::Ordering;
use super::spsc::{region_len, Consumer, Line, Memory, Producer, Record};

/// The smallest ring: 64 bytes, four 16-byte slots. Two records of up to 16 bytes fill it.
const CAPACITY: usize = 64;

/// A ring's memory for loom: loom atomics for the words, loom cells for the bytes.
///
/// `SEQ_CST_FENCES = false` weakens the ring's SeqCst fences to AcqRel (for the mutation
/// models, which must fail).
struct LoomMemory<const SEQ_CST_FENCES: bool> {
    head: AtomicU64,
    tail: AtomicU64,
    /// The *producer parked* word (on the head line).
    producer_parked: AtomicU32,
    /// The *consumer parked* word (on the tail line).
    consumer_parked: AtomicU32,
    /// The commit word of each 16-byte slot.
    words: Box<[AtomicU32]>,
    /// The bytes of each 16-byte slot.
    slots: Box<[UnsafeCell<[u8; 16]>]>,
}

// SAFETY: `Sync` lets both ends (in two loom threads) share the memory. The atomics are `Sync`;
// the cells are accessed only through `UnsafeCell::with`/`with_mut` in `read`/`write`, whose
// callers follow the ring protocol (no concurrent write and access of one slot), and loom checks
// exactly that at run time, panicking on a race instead of allowing it.
unsafe impl<const F: bool> Sync for LoomMemory<F> {}

impl<const F: bool> LoomMemory<F> {
    /// A zeroed ring memory of `capacity` data bytes (a fresh, empty ring).
    fn new(capacity: usize) -> Arc<Self> {
        let slots = capacity / 16;
        Arc::new(Self {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            producer_parked: AtomicU32::new(0),
            consumer_parked: AtomicU32::new(0),
            words: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            slots: (0..slots).map(|_| UnsafeCell::new([0; 16])).collect(),
        })
    }

    /// Calls `each(slot, range in the slot, range in the buffer)` for the slots that bytes
    /// `off..off + len` of the data area span.
    fn spans(
        off: usize,
        len: usize,
        mut each: impl FnMut(usize, std::ops::Range<usize>, std::ops::Range<usize>),
    ) {
        let mut done = 0;
        while done < len {
            let at = off + done;
            let within = at % 16;
            let n = (16 - within).min(len - done);
            each(at / 16, within..within + n, done..done + n);
            done += n;
        }
    }
}

impl<const F: bool> std::fmt::Debug for LoomMemory<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoomMemory")
            .field("capacity", &(self.slots.len() * 16))
            .finish_non_exhaustive()
    }
}

impl<const SEQ_CST_FENCES: bool> Memory for Arc<LoomMemory<SEQ_CST_FENCES>> {
    type U32 = AtomicU32;
    type U64 = AtomicU64;

    fn fence(order: Ordering) {
        if SEQ_CST_FENCES || order != Ordering::SeqCst {
            fence(order);
        } else {
            fence(Ordering::AcqRel);
        }
    }

    fn size(&self) -> usize {
        region_len(self.slots.len() * 16)
    }

    fn base_aligned(&self) -> bool {
        true
    }

    unsafe fn index(&self, line: Line) -> &AtomicU64 {
        match line {
            Line::Head => &self.head,
            Line::Tail => &self.tail,
        }
    }

    unsafe fn doorbell(&self, line: Line) -> &AtomicU32 {
        match line {
            Line::Head => &self.producer_parked,
            Line::Tail => &self.consumer_parked,
        }
    }

    unsafe fn word(&self, off: usize) -> &AtomicU32 {
        &self.words[off / 16]
    }

    unsafe fn write(&self, off: usize, src: &[u8]) {
        LoomMemory::<SEQ_CST_FENCES>::spans(off, src.len(), |slot, at, from| {
            self.slots[slot].with_mut(|bytes| {
                // SAFETY: `bytes` points to the slot's live `[u8; 16]`; loom's `with_mut` checks
                // that no other access of the slot is concurrent with this one.
                unsafe { (&mut *bytes)[at].copy_from_slice(&src[from]) }
            });
        });
    }

    unsafe fn read(&self, off: usize, dst: &mut [u8]) {
        LoomMemory::<SEQ_CST_FENCES>::spans(off, dst.len(), |slot, at, to| {
            self.slots[slot].with(|bytes| {
                // SAFETY: `bytes` points to the slot's live `[u8; 16]`; loom's `with` checks that
                // no write of the slot is concurrent with this read.
                dst[to].copy_from_slice(unsafe { &(&*bytes)[at] })
            });
        });
    }
}

/// Both ends of a fresh loom ring of `capacity` bytes.
fn pair<const F: bool>(
    capacity: usize,
) -> (Producer<Arc<LoomMemory<F>>>, Consumer<Arc<LoomMemory<F>>>) {
    let memory = LoomMemory::<F>::new(capacity);
    // SAFETY: `attach` requires that no other producer is attached to this ring; the memory was
    // created just above and only this call attaches a producer to it.
    let producer = unsafe { Producer::attach(Arc::clone(&memory)) }.expect("valid ring");
    // SAFETY: as above, for the one consumer.
    let consumer = unsafe { Consumer::attach(memory) }.expect("valid ring");
    assert_eq!(consumer.capacity(), capacity);
    (producer, consumer)
}

/// The payload of record `seq`: `len` bytes that differ from every other record's.
fn payload(seq: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seq.wrapping_mul(37) ^ i as u8).collect()
}

/// Reserves, writes and commits `payload(seq, len)`, reserving `reserve` bytes
/// ([`Grant::commit_len`](super::spsc::Grant::commit_len) when larger); false if full.
fn try_push<F: Memory>(p: &mut Producer<F>, seq: u8, len: usize, reserve: usize) -> bool {
    match p.reserve(reserve).expect("not corrupt") {
        Some(mut grant) => {
            grant.write(&payload(seq, len));
            if reserve == len {
                grant.commit();
            } else {
                grant.commit_len(len);
            }
            true
        }
        None => false,
    }
}

/// [`try_push`], spinning (a loom yield) while the ring is full.
fn push<F: Memory>(p: &mut Producer<F>, seq: u8, len: usize, reserve: usize) {
    while !try_push(p, seq, len, reserve) {
        thread::yield_now();
    }
}

/// Pops the next record, spinning while there is none, and checks it is `payload(seq, len)`.
/// Returns its record so the caller decides when to release.
fn pop_expect<F: Memory>(c: &mut Consumer<F>, seq: u8, len: usize) -> Record {
    let rec = loop {
        match c.pop().expect("not corrupt") {
            Some(rec) => break rec,
            None => thread::yield_now(),
        }
    };
    assert_eq!(c.to_vec(rec), payload(seq, len), "record {seq}");
    rec
}

/// The futex, as the kernel provides it: compare-and-sleep and wake are atomic with respect to
/// each other (the hash-bucket lock).
#[derive(Default)]
struct Futex {
    bucket: Mutex<()>,
    queue: Condvar,
}

impl Futex {
    /// Sleeps until woken if `word` holds `expected` (`futex_wait` without a timeout; loom's
    /// condvar never wakes spuriously, so a missed wake is a deadlock loom reports).
    fn wait(&self, word: &AtomicU32, expected: u32) {
        let bucket = self.bucket.lock().unwrap();
        // Relaxed: the kernel's compare is a plain read; the bucket lock orders it against the
        // waker's `wake` (which comes after its change of the word).
        if word.load(Ordering::Relaxed) == expected {
            drop(self.queue.wait(bucket).unwrap());
        }
    }

    /// Wakes every waiter (`futex_wake`).
    fn wake(&self) {
        let _bucket = self.bucket.lock().unwrap();
        self.queue.notify_all();
    }
}

/// Runs `model` under loom with `preemptions` as the default preemption bound (`None`: every
/// interleaving), and checks that loom explored more than one execution.
fn check(preemptions: Option<usize>, model: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(StdAtomicUsize::new(0));
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = preemptions;
    }
    let start = std::time::Instant::now();
    let counter = std::sync::Arc::clone(&runs);
    builder.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        model();
    });
    let runs = runs.load(Ordering::Relaxed);
    eprintln!("{runs} executions in {:?}", start.elapsed());
    assert!(runs > 1, "loom explored {runs} execution(s)");
}

/// (a) Publish: the producer writes two records; the consumer reads both, with their bytes.
#[test]
fn publish() {
    check(None, || {
        let (mut p, mut c) = pair::<true>(CAPACITY);
        let producer = thread::spawn(move || {
            push(&mut p, 1, 5, 5);
            push(&mut p, 2, 16, 16);
        });
        pop_expect(&mut c, 1, 5);
        pop_expect(&mut c, 2, 16);
        assert_eq!(c.pop(), Ok(None));
        producer.join().unwrap();
    });
}

/// (b) Wrap: records that do not fit before the end of the data area are preceded by padding,
/// a partial commit pads inside its record, and the consumer skips both.
#[test]
fn wrap_and_partial_commit() {
    check(Some(4), || {
        let (mut p, mut c) = pair::<true>(CAPACITY);
        let producer = thread::spawn(move || {
            push(&mut p, 1, 8, 8); // 0..32
            push(&mut p, 2, 0, 16); // 32..48, then padding 48..64 inside the grant
            push(&mut p, 3, 16, 16); // 64..96: offset 0, once record 1 is released
        });
        let first = pop_expect(&mut c, 1, 8);
        c.release_through(first);
        let second = pop_expect(&mut c, 2, 0);
        let third = pop_expect(&mut c, 3, 16);
        assert_eq!((second.pos(), third.pos()), (32, 64));
        c.release();
        producer.join().unwrap();
        assert_eq!(c.pop(), Ok(None));
    });
}

/// (c) Release: the consumer releases a record while it still reads the next; the producer
/// reuses the released space and never writes the unreleased record's bytes.
#[test]
fn release_and_reuse() {
    check(Some(4), || {
        let (mut p, mut c) = pair::<true>(CAPACITY);
        let producer = thread::spawn(move || {
            push(&mut p, 1, 16, 16); // 0..32
            push(&mut p, 2, 16, 16); // 32..64
            push(&mut p, 3, 10, 10); // 64..96 = offset 0: needs record 1 released
        });
        let first = pop_expect(&mut c, 1, 16);
        c.release_through(first);
        // Record 2 is consumed after record 1 is released: its bytes must still be intact
        // whatever the producer does with the space of record 1 (loom checks the slots too).
        let second = pop_expect(&mut c, 2, 16);
        assert_eq!(c.to_vec(second), payload(2, 16), "record 2 after the reuse");
        c.release();
        pop_expect(&mut c, 3, 10);
        producer.join().unwrap();
    });
}

/// The consumer waits for one record through the doorbell; true if it slept at least once.
fn consume_parked<F: Memory<U32 = AtomicU32>>(c: &mut Consumer<F>, futex: &Futex) -> bool {
    let mut slept = false;
    loop {
        if let Some(rec) = c.pop().expect("not corrupt") {
            assert_eq!(c.to_vec(rec), payload(1, 4));
            return slept;
        }
        if let Some(word) = c.park_if_empty().expect("not corrupt") {
            futex.wait(word, 1);
            slept = true;
        }
        c.park_done();
    }
}

/// (d) The data doorbell: the consumer parks on an empty ring while the producer commits and
/// asks whether to wake. No lost wake-up (a lost one is a loom deadlock), and a wake only for
/// a parked consumer.
#[test]
fn doorbell_data() {
    check(None, || {
        let (mut p, mut c) = pair::<true>(CAPACITY);
        let futex = Arc::new(Futex::default());
        let waker = Arc::clone(&futex);
        let producer = thread::spawn(move || {
            push(&mut p, 1, 4, 4);
            let woke = p.wake_needed().is_some();
            if woke {
                waker.wake();
            }
            woke
        });
        let slept = consume_parked(&mut c, &futex);
        let woke = producer.join().unwrap();
        assert!(!slept || woke, "a consumer that slept was woken");
        assert_eq!(
            c.data_word().load(Ordering::Relaxed),
            0,
            "park_done cleared the word"
        );
    });
}

/// (e) The room doorbell: the producer parks on a full ring while the consumer releases and
/// asks whether to wake.
#[test]
fn doorbell_room() {
    check(None, || {
        let (mut p, mut c) = pair::<true>(CAPACITY);
        assert!(try_push(&mut p, 1, 16, 16));
        assert!(try_push(&mut p, 2, 16, 16));
        let futex = Arc::new(Futex::default());
        let waker = Arc::clone(&futex);
        let consumer = thread::spawn(move || {
            let first = pop_expect(&mut c, 1, 16);
            c.release_through(first);
            let woke = c.wake_needed().is_some();
            if woke {
                waker.wake();
            }
            (c, woke)
        });
        let mut slept = false;
        while !try_push(&mut p, 3, 16, 16) {
            if let Some(word) = p.park_if_full(16).expect("not corrupt") {
                futex.wait(word, 1);
                slept = true;
            }
            p.park_done();
        }
        let (mut c, woke) = consumer.join().unwrap();
        assert!(!slept || woke, "a producer that slept was woken");
        assert_eq!(
            p.room_word().load(Ordering::Relaxed),
            0,
            "park_done cleared the word"
        );
        pop_expect(&mut c, 2, 16);
        pop_expect(&mut c, 3, 16);
    });
}

/// (f) Both doorbells at once: three records through a ring that holds two, each side parking
/// whenever it cannot proceed (the producer on a full ring, the consumer on an empty one) and
/// waking the other after each commit or release.
#[test]
fn doorbells_both_ways() {
    check(Some(4), || {
        let (mut p, mut c) = pair::<true>(CAPACITY);
        let futex = Arc::new(Futex::default());
        let for_producer = Arc::clone(&futex);
        let producer = thread::spawn(move || {
            for seq in 1..=3 {
                while !try_push(&mut p, seq, 16, 16) {
                    if let Some(word) = p.park_if_full(16).expect("not corrupt") {
                        for_producer.wait(word, 1);
                    }
                    p.park_done();
                }
                if p.wake_needed().is_some() {
                    for_producer.wake();
                }
            }
        });
        let mut seq = 1;
        while seq <= 3 {
            if let Some(rec) = c.pop().expect("not corrupt") {
                assert_eq!(c.to_vec(rec), payload(seq, 16), "record {seq}");
                c.release();
                if c.wake_needed().is_some() {
                    futex.wake();
                }
                seq += 1;
                continue;
            }
            if let Some(word) = c.park_if_empty().expect("not corrupt") {
                futex.wait(word, 1);
            }
            c.park_done();
        }
        producer.join().unwrap();
        assert_eq!(c.pop(), Ok(None));
    });
}

/// Runs `model` and returns the panic message it failed with, if any.
fn failure(model: impl FnOnce() + std::panic::UnwindSafe) -> Option<String> {
    let failed = std::panic::catch_unwind(model).err()?;
    Some(
        failed
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| failed.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    )
}

/// The data doorbell with the SeqCst fences weakened to AcqRel: loom must find the lost
/// wake-up (both sides read the other's old value and the consumer sleeps forever).
#[test]
fn doorbell_data_without_seqcst_fences_loses_a_wake_up() {
    let failed = failure(|| {
        check(None, || {
            let (mut p, mut c) = pair::<false>(CAPACITY);
            let futex = Arc::new(Futex::default());
            let waker = Arc::clone(&futex);
            let producer = thread::spawn(move || {
                push(&mut p, 1, 4, 4);
                if p.wake_needed().is_some() {
                    waker.wake();
                }
            });
            consume_parked(&mut c, &futex);
            producer.join().unwrap();
        });
    });
    let failed = failed.expect("loom finds the lost wake-up without the SeqCst fences");
    assert!(
        failed.contains("deadlock"),
        "failed as a deadlock: {failed}"
    );
}
