//! Futex wait and wake on a 32-bit word, which may live in memory shared between processes.
//!
//! This is the parking half of the same-host doorbell: a side that finds the ring empty (or
//! full) spins briefly, then sleeps in [`futex_wait`] on a word in the shared mapping, and its
//! peer calls [`futex_wake`] after changing that word. The flags never include
//! `FUTEX_PRIVATE_FLAG`: a private futex is keyed by the virtual address in one process, so a
//! waiter in another process (or on another mapping of the same memfd) would never be woken.
//! Shared futexes are keyed by the backing page and offset, which every mapping agrees on.
//!
//! # Ordering
//!
//! The kernel compares the word with `expected` and queues the waiter atomically with respect
//! to [`futex_wake`] on the same word, so a waker that changes the word *before* it calls
//! `futex_wake` cannot lose the wake-up: either the waiter's compare sees the new value (and it
//! returns [`WaitResult::Mismatch`]) or the waiter is queued before the wake. What the futex
//! does not give is a Rust-level happens-before: the caller reads the data it waited for with
//! its own `Acquire` load, paired with the waker's `Release` store of the word.

use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use rustix::io::Errno;
use rustix::thread::futex::{self, Flags, Timespec};

/// Why [`futex_wait`] returned. None of these is an error: every caller re-checks its condition
/// and decides whether to wait again.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitResult {
    /// Woken by [`futex_wake`], or spuriously (the kernel allows it): re-check the word.
    Woken,
    /// The word did not hold `expected` when the kernel looked (`EAGAIN`): it changed already.
    Mismatch,
    /// A signal handler ran (`EINTR`).
    Interrupted,
    /// The timeout passed without a wake (`ETIMEDOUT`).
    TimedOut,
}

/// Sleeps while `word` holds `expected`, until woken by [`futex_wake`], a signal, or
/// `timeout` (relative, measured on `CLOCK_MONOTONIC`; `None` waits indefinitely).
///
/// Returns at once with [`WaitResult::Mismatch`] if `word` does not hold `expected`. The word
/// may be in a shared mapping: the wait is a shared (non-private) futex.
///
/// # Errors
///
/// Only what `FUTEX_WAIT` reports for a misuse the types cannot rule out, e.g. `EFAULT`. The
/// expected outcomes (`EAGAIN`, `EINTR`, `ETIMEDOUT`) are [`WaitResult`]s.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<Duration>,
) -> io::Result<WaitResult> {
    let timeout = timeout.map(timespec);
    match futex::wait(word, Flags::empty(), expected, timeout.as_ref()) {
        Ok(()) => Ok(WaitResult::Woken),
        Err(Errno::AGAIN) => Ok(WaitResult::Mismatch),
        Err(Errno::INTR) => Ok(WaitResult::Interrupted),
        Err(Errno::TIMEDOUT) => Ok(WaitResult::TimedOut),
        Err(err) => Err(err.into()),
    }
}

/// Wakes up to `n` threads (in any process) sleeping in [`futex_wait`] on `word`, and returns
/// how many it woke. Call it after changing the word, so no waiter can miss the change.
///
/// `n` above `i32::MAX` is treated as "all" (the kernel reads it as a signed count).
///
/// # Errors
///
/// Only what `FUTEX_WAKE` reports for a misuse the types cannot rule out, e.g. `EFAULT`.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn futex_wake(word: &AtomicU32, n: u32) -> io::Result<usize> {
    let n = n.min(i32::MAX as u32);
    Ok(futex::wake(word, Flags::empty(), n)?)
}

/// `timeout` as a `Timespec`, saturating at the largest representable one (which the kernel
/// accepts and treats as "practically forever").
fn timespec(timeout: Duration) -> Timespec {
    Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{mpsc, Arc};
    use std::thread;
    use std::time::Instant;

    use super::*;

    #[test]
    fn wait_returns_at_once_when_the_value_differs() {
        let word = AtomicU32::new(1);
        let start = Instant::now();
        let got = futex_wait(&word, 0, Some(Duration::from_secs(10))).unwrap();
        assert_eq!(got, WaitResult::Mismatch);
        // Liveness bound only: a wait that slept would take the full 10 s.
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn wait_times_out_when_nobody_wakes() {
        let word = AtomicU32::new(0);
        let timeout = Duration::from_millis(20);
        let start = Instant::now();
        let got = futex_wait(&word, 0, Some(timeout)).unwrap();
        assert_eq!(got, WaitResult::TimedOut);
        assert!(start.elapsed() >= timeout);
    }

    #[test]
    fn wake_without_waiters_wakes_nobody() {
        let word = AtomicU32::new(0);
        assert_eq!(futex_wake(&word, 1).unwrap(), 0);
        assert_eq!(futex_wake(&word, u32::MAX).unwrap(), 0);
    }

    #[test]
    fn wait_returns_on_wake_from_another_thread() {
        let word = Arc::new(AtomicU32::new(0));
        let (done_tx, done_rx) = mpsc::channel();
        let waiter = {
            let word = Arc::clone(&word);
            thread::spawn(move || {
                let mut results = Vec::new();
                // Acquire: pairs with the Release store of 1 by the main thread below.
                while word.load(Ordering::Acquire) == 0 {
                    // Bounded so a lost wake fails the test instead of hanging it.
                    results.push(futex_wait(&word, 0, Some(Duration::from_secs(10))).unwrap());
                }
                done_tx.send(results).unwrap();
            })
        };
        // Wake until the waiter is seen to be parked and woken: a wake before it sleeps is
        // legitimately lost (the store below makes its wait return `Mismatch` instead).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut woken = 0;
        while woken == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
            woken = futex_wake(&word, 1).unwrap();
        }
        assert_eq!(
            woken, 1,
            "the waiter parked on the futex within the deadline"
        );
        // Release: pairs with the Acquire load in the waiter's loop.
        word.store(1, Ordering::Release);
        futex_wake(&word, u32::MAX).unwrap();
        let results = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("waiter returned");
        waiter.join().unwrap();
        assert!(results.contains(&WaitResult::Woken), "{results:?}");
        assert!(!results.contains(&WaitResult::TimedOut), "{results:?}");
    }

    #[test]
    fn huge_timeouts_are_accepted() {
        let word = AtomicU32::new(3);
        // The value differs, so this returns at once; the point is that the timespec is valid.
        assert_eq!(
            futex_wait(&word, 0, Some(Duration::MAX)).unwrap(),
            WaitResult::Mismatch
        );
        let ts = timespec(Duration::MAX);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (i64::MAX, 0));
        let ts = timespec(Duration::new(3, 5));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (3, 5));
    }
}
