//! Keepalive for network sessions: a connection whose peer vanished without closing it (a
//! host that lost power, a cable pulled, a NAT that forgot the flow) is noticed and ended.
//!
//! A unix or shared-memory session learns of its peer's death from the kernel (end of stream
//! on the socket); TCP does not tell, it only stops delivering. So every network session is
//! watched by one process-wide thread: when nothing arrived for `interval` it sends a PING
//! (any frame from the peer counts as a sign of life, the PONG included), and when nothing
//! arrived for `timeout` it ends the session, waking every blocked call with `Disconnected`.
//!
//! The watcher also reads each session's socket when no other thread is reading it
//! ([`Conn::poll_input`]): an idle process must still answer its peer's PINGs, or the peer
//! would end a healthy session. The thread runs only while network sessions exist.

use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use super::conn::Conn;

/// How a session checks that its peer is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keepalive {
    /// Idle time after which a PING is sent.
    pub(crate) interval: Duration,
    /// Idle time after which the session is ended.
    pub(crate) timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Keepalive {
    /// How often the watcher looks at a session with these settings.
    fn tick(&self) -> Duration {
        (self.interval / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
    }
}

/// Milliseconds on a process-wide monotonic clock.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

struct Watched {
    sessions: Vec<Weak<Conn>>,
    /// The watcher thread is running.
    running: bool,
}

static WATCHED: Mutex<Watched> = Mutex::new(Watched {
    sessions: Vec::new(),
    running: false,
});

/// Wakes the watcher early: a session with a shorter tick than it sleeps for was added.
static ADDED: Condvar = Condvar::new();

fn watched() -> std::sync::MutexGuard<'static, Watched> {
    WATCHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts watching `conn` (whose keepalive settings are set).
pub(crate) fn watch(conn: &Arc<Conn>) {
    let mut w = watched();
    w.sessions.push(Arc::downgrade(conn));
    if w.running {
        ADDED.notify_all();
        return;
    }
    w.running = true;
    let spawned = thread::Builder::new()
        .name("libchan-keepalive".into())
        .stack_size(128 * 1024)
        .spawn(run);
    if spawned.is_err() {
        // Without the thread, sessions are not watched; they still end on any socket error.
        w.running = false;
    }
}

fn run() {
    loop {
        let live: Vec<Arc<Conn>> = {
            let mut w = watched();
            w.sessions
                .retain(|s| s.upgrade().is_some_and(|c| !c.is_dead()));
            if w.sessions.is_empty() {
                // Decided under the lock: a session registered after this sees `running` false
                // and starts a new thread.
                w.running = false;
                return;
            }
            w.sessions.iter().filter_map(Weak::upgrade).collect()
        };
        let mut tick = Duration::from_secs(1);
        for conn in &live {
            if let Some(k) = conn.keepalive() {
                tick = tick.min(k.tick());
                check(conn, k);
            }
        }
        drop(live);
        let w = watched();
        drop(ADDED.wait_timeout(w, tick));
    }
}

fn check(conn: &Conn, k: Keepalive) {
    // Read what is there, if nobody else is reading: PINGs get answered, PONGs counted.
    conn.poll_input();
    let now = now_ms();
    let idle = now.saturating_sub(conn.last_heard());
    if idle >= k.timeout.as_millis() as u64 {
        log::warn!(
            "libchan: cutting off {}: silent for {idle} ms (keepalive timeout)",
            conn.peer()
        );
        conn.fail(&format!(
            "peer silent for {} ms (keepalive timeout {:?}): connection lost",
            idle, k.timeout
        ));
    } else if idle >= k.interval.as_millis() as u64 {
        conn.ping_if_due(now, k.interval.as_millis() as u64);
    }
}
