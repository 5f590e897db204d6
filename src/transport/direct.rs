//! Direct paths: when this process hands the two ends of a channel to two other processes on
//! this host, those two get a session of their own, so their messages do not pass through it.
//!
//! Three processes take part (ARCHITECTURE.md section 2.26, PROTOCOL.md section 5.5):
//!
//! - the *creator* exported a `Receiver` over a shared-memory session to process C, which made
//!   it relay its inbox to C (`spawn_proxy`); `mark_relayed` records that. When it later exports
//!   a `Sender` into that inbox over another shared-memory session to process B, `export` asks
//!   `relayed_to` and, instead of a sender into its own inbox, *introduces* B to C: it makes a
//!   socket pair, sends one end to C in an INTRO frame on the relayed channel, and the other to
//!   B in a SENDER_DIRECT descriptor;
//! - C (`accept`) keeps the channel open with a placeholder sender, runs the handshake on its
//!   socket on a thread of its own, and the JOIN frame B sends there makes the new session one
//!   more feed of the channel's inbox (`Conn::dispatch_join`);
//! - B (`connect`) gets a `Sender` at once (a [`DirectOutlet`]), runs the handshake and writes
//!   JOIN on a thread; the first send waits for it, at most the handshake timeout.
//!
//! Both handshakes run off the threads that read the sessions the frames came in on: each
//! waits for the other side's hello, and a control thread blocked in one could wait for a peer
//! whose control thread waits in another (two workers introduced to each other both ways).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use super::chan::OutChan;
use super::{Conn, Trust, HANDSHAKE_TIMEOUT};
use crate::channel::{Inbox, LoanSlot, Outlet, PushError, SendCore, Wait};
use crate::message::Packet;
use crate::proto::handshake::{Features, Limits};

/// Stack of the short-lived threads that run a direct path's handshake.
const THREAD_STACK: usize = 256 * 1024;

/// How long an accepted introduction waits for the JOIN that follows the peer's hello.
const JOIN_TIMEOUT: Duration = HANDSHAKE_TIMEOUT;

/// Most direct handshakes in flight in this process, each way: each holds a thread for up to
/// the handshake timeout, and a peer must not be able to make it spawn threads without bound.
/// Introductions past it are refused (the introduced sender is born disconnected).
const MAX_IN_FLIGHT: usize = 256;

/// Direct handshakes in flight from the sending side (`connect`).
static CONNECTING: AtomicUsize = AtomicUsize::new(0);

// --- The creator's side --------------------------------------------------------------------

/// An inbox this process relays to another process over a shared-memory session.
struct Relayed {
    inbox: Weak<Inbox>,
    out: Weak<OutChan>,
    fingerprint: u64,
}

/// Every relay of an exported `Receiver` over a shared-memory session. Short: entries whose
/// inbox or relay is gone are dropped whenever an entry is added.
static RELAYED: Mutex<Vec<Relayed>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records that `inbox` is relayed to the peer of `out`'s session as channel `out.id`.
pub(crate) fn mark_relayed(inbox: Weak<Inbox>, out: Weak<OutChan>, fingerprint: u64) {
    let mut all = lock(&RELAYED);
    all.retain(|r| r.inbox.strong_count() > 0 && r.out.strong_count() > 0);
    all.push(Relayed {
        inbox,
        out,
        fingerprint,
    });
}

/// The relay that carries `inbox` to a process reached by another shared-memory session than
/// `via`, if any: a sender into `inbox` exported over `via` can then go direct.
pub(crate) fn relayed_to(inbox: &Arc<Inbox>, fingerprint: u64, via: &Conn) -> Option<Arc<OutChan>> {
    if !via.shm() {
        return None;
    }
    let out = lock(&RELAYED)
        .iter()
        .filter(|r| r.fingerprint == fingerprint && std::ptr::eq(r.inbox.as_ptr(), &**inbox))
        .find_map(|r| r.out.upgrade())?;
    let usable =
        !std::ptr::eq(&*out.conn, via) && out.conn.shm() && !Outlet::is_disconnected(&*out);
    usable.then_some(out)
}

/// A token for one introduction (nonzero; the receiving process also matches the socket).
fn next_token() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let token = n ^ std::process::id().wrapping_mul(0x9e37_79b9);
    token.max(1)
}

/// Introduces a new sender to the receiver behind `out`: sends it an INTRO frame with one end
/// of a new socket pair, and returns the token and the other end for the sender's
/// SENDER_DIRECT descriptor. `None` when that fails (the caller then relays as before).
pub(crate) fn introduce(out: &Arc<OutChan>, fingerprint: u64) -> Option<(u32, OwnedFd)> {
    let (ours, theirs) = UnixStream::pair().ok()?;
    let token = next_token();
    out.conn
        .send_intro(out.id, token, fingerprint, OwnedFd::from(theirs))
        .ok()?;
    Some((token, OwnedFd::from(ours)))
}

/// Limits and trust for a direct session: those of the session the introduction came over.
fn direct_options(via: &Conn) -> (Limits, Trust) {
    let mut limits = Limits::default();
    limits.features = limits.features.with(Features::SHM);
    let trust = if via.copy_out() {
        Trust::Untrusted
    } else {
        Trust::SameUid
    };
    (limits, trust)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> bool {
    thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
        .spawn(f)
        .is_ok()
}

// --- The receiver's side (C) ---------------------------------------------------------------

/// An introduction accepted and not yet joined.
struct Pending {
    /// Names this entry for the thread that runs its handshake.
    key: u64,
    /// The socket the joining session runs on (its fd stays open while the session lives).
    sock: RawFd,
    token: u32,
    fingerprint: u64,
    /// Keeps the channel open until the joining session feeds it: the creator's relay may
    /// close its own feed right after the INTRO.
    hold: SendCore,
}

static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
/// Signalled whenever an entry leaves `PENDING` by a JOIN.
static JOINED: Condvar = Condvar::new();

/// What a JOIN gets: the introduced channel's inbox and type, and the placeholder sender that
/// kept it open (drop it once the new feed is registered, outside any lock).
pub(crate) struct Joined {
    pub(crate) fingerprint: u64,
    pub(crate) hold: SendCore,
}

impl Joined {
    pub(crate) fn inbox(&self) -> &Arc<Inbox> {
        match &self.hold {
            SendCore::Local(inbox) => inbox,
            SendCore::Remote(_) => unreachable!("a placeholder is always a local sender"),
        }
    }
}

/// An INTRO arrived for a channel whose inbox is `inbox`: a process at the other end of `sock`
/// will feed it. Runs the handshake on a thread of its own.
pub(crate) fn accept(via: &Conn, inbox: Arc<Inbox>, token: u32, fingerprint: u64, sock: OwnedFd) {
    static KEYS: AtomicU64 = AtomicU64::new(0);
    let key = KEYS.fetch_add(1, Ordering::Relaxed);
    let raw = sock.as_raw_fd();
    {
        let mut all = lock(&PENDING);
        if all.len() >= MAX_IN_FLIGHT {
            // Closing the socket fails the introduced sender's handshake.
            return;
        }
        all.push(Pending {
            key,
            sock: raw,
            token,
            fingerprint,
            hold: SendCore::local(inbox),
        });
    }
    let (limits, trust) = direct_options(via);
    let spawned = spawn("libchan-direct", move || {
        let stream = UnixStream::from(sock);
        let conn = Conn::establish(stream, false, limits, trust, HANDSHAKE_TIMEOUT);
        // The session's own thread dispatches the JOIN, perhaps before `establish` returns;
        // holding `conn` keeps the session alive until then.
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut all = lock(&PENDING);
        loop {
            if !all.iter().any(|p| p.key == key) {
                return; // joined
            }
            let failed = match &conn {
                Ok(c) => c.is_dead() || Instant::now() >= deadline,
                Err(_) => true,
            };
            if failed {
                break;
            }
            all = JOINED
                .wait_timeout(all, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let gone = take(&mut all, |p| p.key == key);
        drop(all);
        fail(gone);
        drop(conn);
    });
    if !spawned {
        let gone = take(&mut lock(&PENDING), |p| p.key == key);
        fail(gone);
    }
}

fn take(all: &mut Vec<Pending>, which: impl Fn(&Pending) -> bool) -> Option<Pending> {
    let at = all.iter().position(which)?;
    Some(all.swap_remove(at))
}

/// The introduced sender never joined: the channel lost a sender it was promised.
fn fail(gone: Option<Pending>) {
    if let Some(p) = gone {
        if let SendCore::Local(inbox) = &p.hold {
            inbox.mark_broken();
        }
        // Dropping the placeholder may close the channel: no lock is held here.
        drop(p);
    }
}

/// A JOIN with `token` arrived on the session running on socket `sock`: the introduction it
/// answers, if any.
pub(crate) fn joined(sock: RawFd, token: u32) -> Option<Joined> {
    let p = take(&mut lock(&PENDING), |p| p.sock == sock && p.token == token)?;
    JOINED.notify_all();
    Some(Joined {
        fingerprint: p.fingerprint,
        hold: p.hold,
    })
}

// --- The sender's side (B) -----------------------------------------------------------------

/// The sending half of a direct path, handed out before its session exists: sends wait for
/// the handshake (bounded by its timeout), then go straight to the session's channel.
pub(crate) struct DirectOutlet {
    /// The joined channel, or `None` when the direct session could not be made.
    chan: OnceLock<Option<Arc<OutChan>>>,
    lock: Mutex<()>,
    ready: Condvar,
}

impl DirectOutlet {
    fn settle(&self, chan: Option<Arc<OutChan>>) {
        let _ = self.chan.set(chan);
        let _guard = lock(&self.lock);
        self.ready.notify_all();
    }

    /// The channel, waiting for the handshake as `wait` allows.
    fn chan(&self, wait: Wait) -> Result<&Arc<OutChan>, PushError> {
        loop {
            if let Some(c) = self.chan.get() {
                return c.as_ref().ok_or(PushError::Disconnected);
            }
            if wait.expired() {
                return Err(if matches!(wait, Wait::No) {
                    PushError::Full
                } else {
                    PushError::Timeout
                });
            }
            let guard = lock(&self.lock);
            if self.chan.get().is_some() {
                continue;
            }
            let timeout = match wait {
                Wait::Until(t) => t.saturating_duration_since(Instant::now()),
                _ => HANDSHAKE_TIMEOUT,
            };
            drop(
                self.ready
                    .wait_timeout(guard, timeout)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
    }
}

/// A SENDER_DIRECT descriptor arrived on `via` with socket `sock`: returns the sender at once
/// and runs the handshake and the JOIN on a thread.
pub(crate) fn connect(
    via: &Conn,
    sock: OwnedFd,
    token: u32,
    fingerprint: u64,
) -> Arc<DirectOutlet> {
    let outlet = Arc::new(DirectOutlet {
        chan: OnceLock::new(),
        lock: Mutex::new(()),
        ready: Condvar::new(),
    });
    if CONNECTING.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        CONNECTING.fetch_sub(1, Ordering::AcqRel);
        outlet.settle(None);
        return outlet;
    }
    let weak = Arc::downgrade(&outlet);
    let (limits, trust) = direct_options(via);
    let spawned = spawn("libchan-direct", move || {
        let stream = UnixStream::from(sock);
        let chan = Conn::establish(stream, true, limits, trust, HANDSHAKE_TIMEOUT)
            .and_then(|conn| conn.join(token, fingerprint))
            .ok();
        CONNECTING.fetch_sub(1, Ordering::AcqRel);
        // Joined even when the sender was dropped meanwhile: dropping the channel then closes
        // it cleanly (CLOSE), where a session ending before its JOIN reads as a failure.
        match weak.upgrade() {
            Some(outlet) => outlet.settle(chan),
            None => drop(chan),
        }
    });
    if !spawned {
        CONNECTING.fetch_sub(1, Ordering::AcqRel);
        outlet.settle(None);
    }
    outlet
}

impl Outlet for DirectOutlet {
    fn send(&self, packet: Packet, wait: Wait) -> Result<(), PushError> {
        self.chan(wait)?.send(packet, wait)
    }

    fn send_in_place(
        &self,
        estimate: usize,
        wait: Wait,
        encode: &mut dyn FnMut(*mut u8, usize) -> Option<usize>,
    ) -> Option<Result<(), PushError>> {
        match self.chan.get() {
            Some(Some(c)) => c.send_in_place(estimate, wait, encode),
            // Not joined yet: the caller encodes into a buffer and `send` waits.
            _ => None,
        }
    }

    fn loan(&self, len: usize, wait: Wait) -> Option<Result<LoanSlot, PushError>> {
        match self.chan(wait) {
            Ok(c) => c.loan(len, wait),
            Err(e) => Some(Err(e)),
        }
    }

    fn commit_loan(&self, slot: LoanSlot, n: usize) {
        // A slot was lent, so the channel was joined: `chan` is set for good.
        if let Some(Some(c)) = self.chan.get() {
            c.commit_loan(slot, n);
        }
    }

    fn abandon_loan(&self, slot: LoanSlot) {
        if let Some(Some(c)) = self.chan.get() {
            c.abandon_loan(slot);
        }
    }

    fn max_message(&self) -> usize {
        match self.chan.get() {
            Some(Some(c)) => c.max_message(),
            // Both sides of a direct session announce the defaults, so this is what they
            // negotiate; not waiting here keeps `try_send` from blocking on the handshake.
            _ => Limits::default().max_message as usize,
        }
    }

    fn is_disconnected(&self) -> bool {
        match self.chan.get() {
            Some(Some(c)) => c.is_disconnected(),
            Some(None) => true,
            None => false,
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
