//! Helpers the real-process test files share (each includes this as `mod common;`).

#![allow(dead_code)] // Each test file uses its own subset.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A fresh abstract unix address, unique to this process and call: `unix:@<what>-<pid>-<n>`.
pub fn fresh_addr(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "unix:@{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `body` on a thread and fails the test if it takes longer than `limit`. A panic in the
/// body fails the test with the body's own message.
pub fn with_timeout<T: Send + 'static>(
    limit: Duration,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, wait) = mpsc::channel();
    let worker = thread::spawn(move || {
        let out = body();
        let _ = done.send(());
        out
    });
    match wait.recv_timeout(limit) {
        Ok(()) => worker.join().expect("test body panicked"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(_) => unreachable!("the body reports completion before it returns"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test timed out after {limit:?}"),
    }
}

/// Polls `f` until it returns true or `limit` passes; returns whether it did.
pub fn eventually(limit: Duration, f: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// Open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}
