//! Lingering close for network connections that ended in order, on one closer thread.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// A connection that ended in order and waits for its peer to close before its descriptor is
/// closed. Closing a TCP socket at once resets the connection when the peer's late bytes
/// arrive (or are already unread here), and a reset throws away what the peer had not read
/// yet, and what this side still had queued for it: the end of the session would be lost.
/// So the closer sends what is left and a FIN, then reads and discards until the peer closes
/// or [`CLOSE_LINGER`] passes.
pub(super) trait Closing: Send {
    /// Makes what progress it can without blocking; true when done (dropping the value then
    /// closes the connection).
    fn step(&mut self) -> bool;
}

/// A plain socket's lingering close (tcp, and the socket under TLS once its close_notify is
/// out).
pub(super) struct SocketClosing {
    sock: OwnedFd,
    until: Instant,
    fin: bool,
}

impl SocketClosing {
    /// Lingers on `sock` (a duplicate of the link's descriptor, so that the link may close
    /// its own).
    pub(super) fn new(sock: OwnedFd) -> Box<Self> {
        Box::new(Self {
            sock,
            until: Instant::now() + CLOSE_LINGER,
            fin: false,
        })
    }
}

impl Closing for SocketClosing {
    fn step(&mut self) -> bool {
        if !self.fin {
            self.fin = true;
            let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Write);
        }
        let mut buf = [0u8; 4096];
        loop {
            match rustix::net::recv(&self.sock, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((0, _)) => return true,
                Ok(_) => {}
                Err(rustix::io::Errno::AGAIN) => return Instant::now() >= self.until,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return true,
            }
        }
    }
}

/// How long a dropped link waits for its peer to close.
pub(super) const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// How often the closer thread looks at its links.
const CLOSE_POLL: Duration = Duration::from_millis(5);

/// Dropped links the closer thread is closing.
static CLOSING: Mutex<Vec<Box<dyn Closing>>> = Mutex::new(Vec::new());

/// Whether a closer thread runs.
static CLOSER: AtomicBool = AtomicBool::new(false);

/// Hands a dropped link to the closer thread, starting it if none runs.
pub(super) fn close_later(c: Box<dyn Closing>) {
    lock(&CLOSING).push(c);
    if CLOSER.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = thread::Builder::new()
        .name("libchan-close".into())
        .stack_size(128 * 1024)
        .spawn(closer);
    if spawned.is_err() {
        // No thread to wait with: close now.
        CLOSER.store(false, Ordering::Release);
        lock(&CLOSING).clear();
    }
}

/// The closer thread: steps every closing link until none is left, then ends.
fn closer() {
    loop {
        let mut batch = std::mem::take(&mut *lock(&CLOSING));
        // Done links drop here, closing their connections.
        batch.retain_mut(|c| !c.step());
        let idle = {
            let mut q = lock(&CLOSING);
            q.append(&mut batch);
            q.is_empty()
        };
        if idle {
            CLOSER.store(false, Ordering::Release);
            // A link handed over after the check above saw the flag still set and started no
            // thread: take it on, unless a new thread already did.
            if lock(&CLOSING).is_empty() || CLOSER.swap(true, Ordering::AcqRel) {
                return;
            }
            continue;
        }
        thread::sleep(CLOSE_POLL);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
