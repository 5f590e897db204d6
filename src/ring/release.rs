//! What a ring's consumer side shares between its users (the shared-memory lane and the
//! in-process ring): out-of-order release, and the doorbell handshake on a raw word.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use super::spsc::{Consumer, Memory, Record};

/// The records a consumer has taken, oldest first, with whether each is done. Records may be
/// done in any order (a `Msg` dropped before an older one); the ring is released in order, up
/// to the first one still in use.
#[derive(Debug, Default)]
pub(crate) struct Outstanding {
    taken: VecDeque<(Record, bool)>,
}

impl Outstanding {
    /// Notes a record just consumed from `cons`; `done` when nothing will read it any more.
    /// When no earlier record is held, the padding the cursor skipped in front of `rec` is
    /// released at once (see [`Consumer::release_before`]); returns the producer's word when
    /// it sleeps waiting for room (the caller wakes it).
    pub(crate) fn push<'a, R: Memory>(
        &mut self,
        cons: &'a mut Consumer<R>,
        rec: Record,
        done: bool,
    ) -> Option<&'a R::U32> {
        let freed = self.taken.is_empty() && cons.release_before(Some(rec));
        self.taken.push_back((rec, done));
        if freed {
            cons.wake_needed()
        } else {
            None
        }
    }

    /// The record at `pos` is done.
    pub(crate) fn done(&mut self, pos: u64) {
        if let Some(slot) = self.taken.iter_mut().find(|(r, _)| r.pos() == pos) {
            slot.1 = true;
        }
    }

    /// Releases every leading record that is done, and the padding up to the first one still
    /// in use (or up to the cursor), in one `head` store; returns the producer's word when it
    /// sleeps waiting for room (the caller wakes it).
    pub(crate) fn sweep<'a, R: Memory>(&mut self, cons: &'a mut Consumer<R>) -> Option<&'a R::U32> {
        let mut any = false;
        while let Some(&(_, true)) = self.taken.front() {
            self.taken.pop_front();
            any = true;
        }
        if !any {
            return None;
        }
        if cons.release_before(self.taken.front().map(|&(rec, _)| rec)) {
            cons.wake_needed()
        } else {
            None
        }
    }
}

/// Announces on `word` that its owner is about to sleep on it (the consumer-parked word of a
/// ring seen as a raw word, e.g. by a thread that does not hold the consumer). The caller
/// re-checks its condition before sleeping on `word` while it holds 1.
pub(crate) fn park_prepare(word: &AtomicU32) {
    // A swap, not a store, as in `Consumer::park_prepare` (see "Why a swap" in `spsc`); the
    // SeqCst fence pairs with the waker's, so either it sees 1 or we see its event.
    word.swap(1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
}

/// For a waker that published an event: whether a sleeper announced itself on `word` (it is
/// then cleared, and the caller wakes it). `always` answers yes regardless, for a word a peer
/// that is not trusted could clear.
pub(crate) fn take_parked(word: &AtomicU32, always: bool) -> bool {
    // Pairs with the fence in `park_prepare`.
    fence(Ordering::SeqCst);
    if word.load(Ordering::Relaxed) != 0 || always {
        word.store(0, Ordering::Relaxed);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::spsc::pair;

    /// Records done out of order are released only up to the first one still in use.
    #[test]
    fn out_of_order_done_releases_the_done_prefix() {
        let (mut p, mut c) = pair(256);
        let mut taken = Outstanding::default();
        let mut recs = Vec::new();
        for i in 0..4u8 {
            let mut g = p.reserve(40).unwrap().unwrap();
            g.write(&[i; 40]);
            g.commit();
            let rec = c.pop().unwrap().unwrap();
            let _ = taken.push(&mut c, rec, false);
            recs.push(rec);
        }
        // Four 64-byte records fill the 256 bytes: another does not fit until a release.
        assert!(!p.has_room(40).unwrap());
        taken.done(recs[1].pos());
        let _ = taken.sweep(&mut c);
        assert!(
            !p.has_room(40).unwrap(),
            "released past a record still in use"
        );
        taken.done(recs[0].pos());
        let _ = taken.sweep(&mut c);
        assert!(p.has_room(40).unwrap(), "the done prefix was not released");
        assert_eq!(taken.taken.len(), 2);
    }

    #[test]
    fn doorbell_word_handshake() {
        let word = AtomicU32::new(0);
        assert!(!take_parked(&word, false), "nobody parked");
        assert!(take_parked(&word, true), "always wakes when told to");
        park_prepare(&word);
        assert!(take_parked(&word, false));
        assert_eq!(word.load(Ordering::Relaxed), 0, "cleared for the next park");
        assert!(!take_parked(&word, false), "one wake per park");
    }
}
