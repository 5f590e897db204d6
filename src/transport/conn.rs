//! `Conn`: one session over a unix stream socket, driven by whichever thread needs it.
//!
//! There is no I/O thread. A thread that must wait on the session (a `recv` on a channel the
//! session feeds, a `send` short of credit, an `accept_channel`) takes the *reader seat* if it is
//! free and reads the socket itself, dispatching every frame it finds: its own message costs it
//! one kernel wake-up, not two (a cross-core wake-up costs ~33 us on the
//! virtual machines libchan is developed on). Threads that
//! find the seat taken park, and are unparked by the reader when their frame arrives or when it
//! leaves the seat.
//!
//! Frames are written by the sending thread under `writer`. Control frames produced while
//! reading (credit, close, reset, pong) go to `control` and are flushed by the next writer or
//! reader; they never block the thread that produced them.
//!
//! Lock order: `table` before any inbox lock; `writer` before `control`. No lock is held while
//! a handle is dropped (dropping one may close a channel and re-enter the session).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use super::chan::{spawn_proxy, InChan, OutChan};
use crate::channel::{Entry, Handle, Inbox, PushError, RecvCore, SendCore, Wait, DEFAULT_CAPACITY};
use crate::error::Error;
use crate::message::{Bytes, Packet};
use crate::proto::credit::data_cost;
use crate::proto::decoder::{Decoder, Frame};
use crate::proto::frame::{self, GoAwayReason, HandleDesc, HandleKind, Kind, ResetReason};
use crate::proto::handshake::{Features, Handshake, Limits, Negotiated, HELLO_LEN};
use crate::proto::{id_is_peers, DecodeError, IdAllocator};
use crate::sys;

/// Most bytes of control frames (credit, close, reset, pong) queued for a peer that does not
/// read. Credit, close and reset frames are bounded by the channel table; PONGs are not.
const MAX_CONTROL_QUEUE: usize = 1 << 20;

/// What a call to [`Conn::drive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drive {
    /// This thread held the reader seat until its condition held, the deadline passed, or
    /// the session died.
    Progress,
    /// Another thread holds the seat; this one is registered to be unparked when it leaves.
    Busy,
    /// The session is dead.
    Dead,
}

pub(crate) struct Conn {
    me: std::sync::Weak<Conn>,
    sock: OwnedFd,
    we_connected: bool,
    pub(crate) limits: Negotiated,
    peer_uid: Option<u32>,
    reader: Mutex<Reader>,
    seat_waiters: Mutex<Vec<Thread>>,
    writer: Mutex<()>,
    control: Mutex<Vec<u8>>,
    table: Mutex<Table>,
    dead: AtomicBool,
    /// A flusher thread is running (see `spawn_flusher`).
    flushing: AtomicBool,
    /// Interrupts the reader's `poll` when a local sender fills an inbox it waits on.
    doorbell: sys::Doorbell,
    /// Writing failed (the peer closed): nothing more can be sent, but what the peer sent
    /// before it closed is still read and delivered.
    write_broken: AtomicBool,
}

struct Reader {
    dec: Decoder,
    fds: Vec<OwnedFd>,
}

struct Table {
    ids: IdAllocator,
    /// Channels the peer sends on and we receive.
    inbound: HashMap<u32, Arc<InChan>>,
    /// Inbound channels we reset: their data is discarded (its credit granted back) until the
    /// peer closes them.
    reset_inbound: HashSet<u32>,
    /// Channels we send on.
    outbound: HashMap<u32, std::sync::Weak<OutChan>>,
    /// Channels the peer opened that nobody accepted yet.
    accepts: VecDeque<(u32, u64, RecvCore)>,
    accept_waiters: Vec<Thread>,
    error: Option<String>,
}

/// Handles ready to go out with one DATA frame.
pub(crate) struct Exported {
    pub(crate) descs: Vec<HandleDesc>,
    pub(crate) fds: Vec<OwnedFd>,
    /// Channels opened by this frame whose local receiver is already gone: reset them once the
    /// frame is written.
    resets: Vec<u32>,
    /// Relays to start once the frame is written: data on a channel must not overtake the
    /// frame that opens it.
    relays: Vec<(RecvCore, SendCore)>,
}

impl Conn {
    /// Runs the handshake on a connected stream and returns the live session.
    pub(crate) fn establish(
        stream: UnixStream,
        we_connected: bool,
        local: Limits,
        timeout: Duration,
    ) -> Result<Arc<Conn>, Error> {
        stream.set_nonblocking(true)?;
        let sock = OwnedFd::from(stream);
        let deadline = Instant::now() + timeout;
        let mut hs = Handshake::new(local);
        let hello = hs
            .poll_transmit()
            .expect("a fresh handshake has a hello to send");
        let mut sent = 0;
        while sent < HELLO_LEN {
            match sys::send_with_fds(sock.as_fd(), &[IoSlice::new(&hello[sent..])], &[]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(&sock, false, deadline)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Read exactly the peer's hello: frames behind it are left for the decoder, and a read
        // that stops at the hello's end never swallows descriptors sent with the next frame.
        let mut buf = [0u8; HELLO_LEN];
        let mut got = 0;
        while hs.poll_outcome().is_none() {
            let mut fds = Vec::new();
            match sys::recv_with_fds(sock.as_fd(), &mut buf[got..], &mut fds) {
                Ok(0) => return Err(Error::Handshake("peer closed during the handshake".into())),
                Ok(n) => {
                    if !fds.is_empty() {
                        return Err(Error::Handshake("descriptors sent with the hello".into()));
                    }
                    got += n;
                    if got == HELLO_LEN {
                        hs.handle_bytes(&buf)
                            .map_err(|e| Error::Handshake(e.to_string()))?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_ready(&sock, true, deadline)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let limits = hs.poll_outcome().expect("checked by the loop above");
        let peer_uid = sys::peer_uid(sock.as_fd()).ok();
        let doorbell = sys::Doorbell::new()?;
        Ok(Arc::new_cyclic(|me| Conn {
            me: me.clone(),
            sock,
            we_connected,
            peer_uid,
            reader: Mutex::new(Reader {
                dec: Decoder::new(limits.max_frame, limits.max_message)
                    .with_fds_allowed(limits.features.contains(Features::FDS)),
                fds: Vec::new(),
            }),
            limits,
            seat_waiters: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
            control: Mutex::new(Vec::new()),
            table: Mutex::new(Table {
                ids: IdAllocator::new(we_connected),
                inbound: HashMap::new(),
                reset_inbound: HashSet::new(),
                outbound: HashMap::new(),
                accepts: VecDeque::new(),
                accept_waiters: Vec::new(),
                error: None,
            }),
            dead: AtomicBool::new(false),
            flushing: AtomicBool::new(false),
            doorbell,
            write_broken: AtomicBool::new(false),
        }))
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// True when nothing more can be sent on this session.
    pub(crate) fn cannot_send(&self) -> bool {
        self.is_dead() || self.write_broken.load(Ordering::Acquire)
    }

    /// A write failed: the peer is gone or stopped reading for good. Senders fail from now on;
    /// reading goes on until end of stream, so messages the peer sent before it closed are
    /// still delivered (the read side ends the session).
    fn write_failed(&self, e: &io::Error) {
        if self.write_broken.swap(true, Ordering::AcqRel) {
            return;
        }
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let outbound: Vec<_> = self
            .lock_table()
            .outbound
            .values()
            .filter_map(|w| w.upgrade())
            .collect();
        for o in outbound {
            o.wake();
        }
        self.lock_table()
            .error
            .get_or_insert_with(|| format!("write failed: {e}"));
        // A reader blocked in poll re-checks; with nothing left to read it sees end of stream.
        self.interrupt();
    }

    pub(crate) fn peer_uid(&self) -> Option<u32> {
        self.peer_uid
    }

    /// Why the session died, if it did.
    pub(crate) fn error(&self) -> Option<String> {
        self.lock_table().error.clone()
    }

    /// Number of channels the session tracks (open in either direction).
    pub(crate) fn channel_count(&self) -> usize {
        // Closes the peer sent but nobody read yet count as closed.
        self.poll_input();
        let t = self.lock_table();
        t.inbound.len() + t.outbound.len() + t.reset_inbound.len()
    }

    fn lock_table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a channel we send on.
    pub(crate) fn open(self: &Arc<Self>, fingerprint: u64) -> Result<Arc<OutChan>, Error> {
        let out = {
            let mut t = self.lock_table();
            if self.cannot_send() {
                return Err(Error::Disconnected);
            }
            let id = t
                .ids
                .next()
                .ok_or_else(|| Error::Protocol("channel ids exhausted".into()))?;
            let out = OutChan::new(self.clone(), id);
            t.outbound.insert(id, Arc::downgrade(&out));
            out
        };
        let mut buf = Vec::with_capacity(24);
        frame::encode_open(&mut buf, out.id, fingerprint);
        self.write_frame(&[&buf], &[], &|| false)
            .map_err(|_| Error::Disconnected)?;
        Ok(out)
    }

    /// Waits for the next channel the peer opens.
    pub(crate) fn accept(self: &Arc<Self>, wait: Wait) -> Result<(u32, u64, RecvCore), Error> {
        loop {
            let me = thread::current();
            {
                let mut t = self.lock_table();
                if let Some(a) = t.accepts.pop_front() {
                    return Ok(a);
                }
                if self.is_dead() {
                    return Err(Error::Disconnected);
                }
                if wait.expired() {
                    return Err(Error::Timeout);
                }
                t.accept_waiters.push(me.clone());
            }
            let ready = || self.is_dead() || !self.lock_table().accepts.is_empty();
            if self.drive(wait, &ready) != Drive::Progress {
                wait.park();
            }
            self.lock_table()
                .accept_waiters
                .retain(|t| t.id() != me.id());
        }
    }

    /// Refuses a channel the peer opened (type mismatch): it is reset and its data discarded.
    pub(crate) fn refuse(&self, id: u32, reason: ResetReason, text: &str) {
        let inchan = {
            let mut t = self.lock_table();
            t.reset_inbound.insert(id);
            t.inbound.remove(&id)
        };
        let mut buf = Vec::new();
        frame::encode_reset(&mut buf, id, reason, text);
        self.send_control(&buf);
        if let Some(c) = inchan {
            c.inbox.remove_feed(self, false);
        }
    }

    /// Resets every inbound channel that feeds `inbox`: its last receiver is gone.
    pub(crate) fn receiver_gone(&self, inbox: &Inbox) {
        let gone: Vec<Arc<InChan>> = {
            let mut t = self.lock_table();
            let ids: Vec<u32> = t
                .inbound
                .iter()
                .filter(|(_, c)| std::ptr::eq(Arc::as_ptr(&c.inbox), inbox))
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| {
                    t.reset_inbound.insert(*id);
                    t.inbound.remove(id)
                })
                .collect()
        };
        let mut buf = Vec::new();
        for c in &gone {
            frame::encode_reset(
                &mut buf,
                c.id,
                ResetReason::ReceiverGone,
                "receiver dropped",
            );
        }
        if !buf.is_empty() {
            self.send_control(&buf);
        }
        for c in gone {
            c.inbox.remove_feed(self, false);
        }
    }

    /// Forgets an outbound channel whose last sender is gone and tells the peer.
    pub(crate) fn close_outbound(&self, id: u32) {
        self.lock_table().outbound.remove(&id);
        if !self.is_dead() {
            let mut buf = Vec::with_capacity(16);
            frame::encode_close(&mut buf, id);
            self.send_control(&buf);
        }
    }

    /// Turns a message's handles into descriptors and fds for one DATA frame, opening the
    /// channels they need.
    pub(crate) fn export(self: &Arc<Self>, handles: Vec<Handle>) -> Result<Exported, Error> {
        let mut out = Exported {
            descs: Vec::with_capacity(handles.len()),
            fds: Vec::new(),
            resets: Vec::new(),
            relays: Vec::new(),
        };
        if handles.is_empty() {
            return Ok(out);
        }
        let mut proxies = Vec::new();
        {
            let mut t = self.lock_table();
            let alloc = |t: &mut Table| {
                t.ids
                    .next()
                    .ok_or_else(|| Error::Protocol("channel ids exhausted".into()))
            };
            for h in handles {
                let desc = match h {
                    Handle::Fd(fd) => {
                        out.fds.push(fd);
                        HandleDesc::fd()
                    }
                    Handle::Stream(fd) => {
                        out.fds.push(fd);
                        HandleDesc {
                            kind: HandleKind::Stream,
                            chan: 0,
                            fingerprint: 0,
                        }
                    }
                    Handle::Sender(SendCore::Remote(ref o), fp) if Arc::ptr_eq(&o.conn, self) => {
                        // The peer receives this channel: give it a sender into its own inbox.
                        HandleDesc {
                            kind: HandleKind::SenderLocal,
                            chan: o.id,
                            fingerprint: fp,
                        }
                    }
                    Handle::Sender(core, fp) => {
                        let id = alloc(&mut t)?;
                        let inbox = match core {
                            SendCore::Local(ref inbox) if !inbox.fed_by_other(self) => {
                                inbox.clone()
                            }
                            // An inbox reads at most one session itself; a second session, or
                            // a sender into another session, goes through a relay.
                            SendCore::Local(_) | SendCore::Remote(_) => {
                                // A sender into another session: relay through a local inbox.
                                let inbox = Inbox::new(DEFAULT_CAPACITY);
                                proxies.push((RecvCore::new(inbox.clone()), core.clone()));
                                inbox
                            }
                        };
                        if inbox.add_feed(self) {
                            let c = InChan::new(self, id, inbox);
                            t.inbound.insert(id, c);
                        } else {
                            t.reset_inbound.insert(id);
                            out.resets.push(id);
                        }
                        HandleDesc {
                            kind: HandleKind::Sender,
                            chan: id,
                            fingerprint: fp,
                        }
                    }
                    Handle::Receiver(core, fp) => {
                        let id = alloc(&mut t)?;
                        let o = OutChan::new(self.clone(), id);
                        t.outbound.insert(id, Arc::downgrade(&o));
                        proxies.push((core, SendCore::Remote(o)));
                        HandleDesc {
                            kind: HandleKind::Receiver,
                            chan: id,
                            fingerprint: fp,
                        }
                    }
                };
                out.descs.push(desc);
            }
        }
        out.relays = proxies;
        Ok(out)
    }

    /// Writes one DATA frame for `packet` on channel `id` (see `write_frame` for `abort`).
    pub(crate) fn send_data(
        self: &Arc<Self>,
        id: u32,
        packet: Packet,
        abort: &dyn Fn() -> bool,
    ) -> Result<(), PushError> {
        let Packet { bytes, handles } = packet;
        let exported = self.export(handles).map_err(|_| PushError::Disconnected)?;
        let nfds = exported.fds.len() as u16;
        let mut head = Vec::with_capacity(16 + 16 * exported.descs.len());
        frame::encode_data(&mut head, id, &exported.descs, bytes.len(), nfds);
        let fds: Vec<BorrowedFd<'_>> = exported.fds.iter().map(|f| f.as_fd()).collect();
        self.write_frame(&[&head, &bytes], &fds, abort)?;
        for (rx, tx) in exported.relays {
            spawn_proxy(rx, tx);
        }
        for id in exported.resets {
            let mut buf = Vec::new();
            frame::encode_reset(&mut buf, id, ResetReason::ReceiverGone, "receiver dropped");
            self.send_control(&buf);
        }
        Ok(())
    }

    /// Writes one whole frame, with `fds` attached to its first byte. Blocks until it is out
    /// (reading the socket meanwhile if nobody else is, so two writers facing each other
    /// cannot deadlock).
    ///
    /// `abort` is checked while the frame has not started: a send whose channel was reset
    /// meanwhile gives up instead of waiting for room it no longer needs.
    pub(crate) fn write_frame(
        self: &Arc<Self>,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        abort: &dyn Fn() -> bool,
    ) -> Result<(), PushError> {
        if self.cannot_send() {
            return Err(PushError::Disconnected);
        }
        let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.flush_control(true)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut sent = 0;
        while sent < total {
            let mut skip = sent;
            let mut slices = Vec::with_capacity(parts.len());
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                slices.push(IoSlice::new(&p[skip..]));
                skip = 0;
            }
            let attach = if sent == 0 { fds } else { &[] };
            match sys::send_with_fds(self.sock.as_fd(), &slices, attach) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sent == 0 && abort() {
                        return Err(PushError::Disconnected);
                    }
                    self.wait_writable()?;
                    // The wait may have read the reset this frame's channel waits on.
                    if sent == 0 && abort() {
                        return Err(PushError::Disconnected);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.write_failed(&e);
                    return Err(PushError::Disconnected);
                }
            }
        }
        self.flush_control(false)?;
        drop(guard);
        self.try_flush_control();
        Ok(())
    }

    /// Queues a control frame and writes it now if the writer is free.
    pub(crate) fn send_control(&self, bytes: &[u8]) {
        if self.cannot_send() {
            return;
        }
        let queued = {
            let mut q = self.control.lock().unwrap_or_else(|e| e.into_inner());
            q.extend_from_slice(bytes);
            q.len()
        };
        if queued > MAX_CONTROL_QUEUE {
            // Only a peer that keeps sending (PINGs, say) while never reading gets here: its
            // answers would pile up without bound.
            self.fail("peer does not read: its control frames exceed the queue limit");
            return;
        }
        self.try_flush_control();
    }

    fn try_flush_control(&self) {
        if self.control_is_empty() {
            return;
        }
        let Ok(guard) = self.writer.try_lock() else {
            // The holder flushes the queue before it lets go, and calls us again after.
            return;
        };
        let _ = self.flush_control(false);
        drop(guard);
        if !self.control_is_empty() && !self.is_dead() {
            // The socket is full and this thread cannot wait for it: a reader or writer will
            // flush the rest, and in case none comes, a flusher thread does.
            self.spawn_flusher();
        }
    }

    /// Starts a thread that waits for the socket to take the queued control frames, unless
    /// one runs already. Rare: only when the peer has stopped reading for a while.
    fn spawn_flusher(&self) {
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.me.clone();
        let spawned = thread::Builder::new()
            .name("libchan-flush".into())
            .stack_size(64 * 1024)
            .spawn(move || loop {
                let Some(conn) = me.upgrade() else { return };
                if conn.is_dead() || conn.control_is_empty() {
                    conn.flushing.store(false, Ordering::Release);
                    // A frame queued after the check above would have seen the flag set.
                    if conn.is_dead()
                        || conn.control_is_empty()
                        || conn.flushing.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                }
                let _ = sys::poll(
                    conn.sock.as_fd(),
                    false,
                    true,
                    Some(Duration::from_millis(50)),
                );
                let flushed = match conn.writer.try_lock() {
                    Ok(_guard) => conn.flush_control(false).is_ok(),
                    Err(_) => true,
                };
                if !flushed {
                    return;
                }
            });
        if spawned.is_err() {
            self.flushing.store(false, Ordering::Release);
        }
    }

    fn control_is_empty(&self) -> bool {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Writes queued control frames. Caller holds `writer`. With `all`, waits until every
    /// byte is out (a data frame must not start in the middle of a control frame).
    fn flush_control(&self, all: bool) -> Result<(), PushError> {
        loop {
            let mut q = self.control.lock().unwrap_or_else(|e| e.into_inner());
            if q.is_empty() {
                return Ok(());
            }
            match sys::send_with_fds(self.sock.as_fd(), &[IoSlice::new(&q)], &[]) {
                Ok(n) => {
                    q.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(q);
                    if !all {
                        return Ok(());
                    }
                    self.wait_writable()?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    drop(q);
                    self.write_failed(&e);
                    return Err(PushError::Disconnected);
                }
            }
        }
    }

    /// True when the socket takes bytes now or before the wait runs out.
    pub(crate) fn wait_writable_until(&self, wait: Wait) -> bool {
        let timeout = match wait {
            Wait::No => Duration::ZERO,
            Wait::Until(t) => t.saturating_duration_since(Instant::now()),
            Wait::Forever => return true,
        };
        matches!(sys::poll(self.sock.as_fd(), false, true, Some(timeout)), Ok(r) if r.writable)
    }

    /// Waits until the socket takes more bytes or something was read (which may have changed
    /// what the writer waits for). Reads incoming frames meanwhile when the reader seat is
    /// free, so two writers facing each other cannot deadlock.
    fn wait_writable(&self) -> Result<(), PushError> {
        if self.cannot_send() {
            return Err(PushError::Disconnected);
        }
        if let Ok(mut seat) = self.reader.try_lock() {
            let bell = self.doorbell.as_fd();
            match sys::poll_with_doorbell(self.sock.as_fd(), bell, true, None) {
                Ok(Some(r)) if r.readable => {
                    self.read_some(&mut seat);
                }
                Ok(Some(_)) => {}
                Ok(None) => self.doorbell.clear(),
                Err(e) => self.fail(&format!("poll failed: {e}")),
            }
            drop(seat);
            self.wake_seat_waiters();
        } else {
            let _ = sys::poll(
                self.sock.as_fd(),
                false,
                true,
                Some(Duration::from_millis(5)),
            );
        }
        if self.cannot_send() {
            return Err(PushError::Disconnected);
        }
        Ok(())
    }

    /// Dispatches whatever the socket holds now, if no other thread is reading. Never blocks.
    pub(crate) fn poll_input(&self) {
        if self.is_dead() {
            return;
        }
        if let Ok(mut seat) = self.reader.try_lock() {
            while self.read_some(&mut seat) && !self.is_dead() {}
            drop(seat);
            self.wake_seat_waiters();
        }
    }

    /// Interrupts the thread blocked reading this session, so it re-checks its condition.
    pub(crate) fn interrupt(&self) {
        self.doorbell.ring();
    }

    /// Refuses every channel the peer opened that was not accepted (the session handle is
    /// gone, so nobody can accept them any more).
    pub(crate) fn refuse_pending(&self) {
        let pending: Vec<_> = self.lock_table().accepts.drain(..).collect();
        // Dropping each receiver resets its channel (`receiver_gone`).
        drop(pending);
    }

    /// Reads the session on this thread until `cond` holds, the wait runs out, or the session
    /// dies, if no other thread is reading it.
    pub(crate) fn drive(self: &Arc<Self>, wait: Wait, cond: &dyn Fn() -> bool) -> Drive {
        if self.is_dead() {
            return Drive::Dead;
        }
        let mut seat = match self.reader.try_lock() {
            Ok(seat) => seat,
            Err(_) => {
                let me = thread::current();
                self.seat_waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(me);
                // The reader may have left between the first try and the registration.
                match self.reader.try_lock() {
                    Ok(seat) => seat,
                    Err(_) => return Drive::Busy,
                }
            }
        };
        while !cond() && !self.is_dead() {
            if self.read_some(&mut seat) {
                continue;
            }
            if wait.expired() {
                break;
            }
            let timeout = match wait {
                Wait::Until(t) => Some(t.saturating_duration_since(Instant::now())),
                _ => None,
            };
            let want_write = !self.control_is_empty();
            let bell = self.doorbell.as_fd();
            match sys::poll_with_doorbell(self.sock.as_fd(), bell, want_write, timeout) {
                Ok(Some(r)) if r.writable && want_write => self.try_flush_control(),
                Ok(Some(_)) => {}
                Ok(None) => self.doorbell.clear(),
                Err(e) => self.fail(&format!("poll failed: {e}")),
            }
        }
        drop(seat);
        self.wake_seat_waiters();
        Drive::Progress
    }

    fn wake_seat_waiters(&self) {
        let waiters =
            std::mem::take(&mut *self.seat_waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for t in waiters {
            t.unpark();
        }
    }

    /// One read from the socket, dispatching every complete frame. Returns false when there
    /// was nothing to read.
    fn read_some(&self, seat: &mut Reader) -> bool {
        let Reader { dec, fds } = seat;
        let buf = dec.read_buf(64 * 1024);
        let n = match sys::recv_with_fds(self.sock.as_fd(), buf, fds) {
            Ok(0) if dec.buffered() > 0 => {
                self.fail("peer closed the connection in the middle of a frame");
                return true;
            }
            Ok(0) => {
                self.fail("peer closed the connection");
                return true;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                self.protocol_error(format!("receive failed: {e}").into());
                return true;
            }
        };
        if let Err(e) = dec.handle_read(n, std::mem::take(fds)) {
            self.protocol_error(e.into());
            return true;
        }
        loop {
            match dec.poll_frame() {
                Ok(Some(frame)) => {
                    if let Err(e) = self.dispatch(frame) {
                        self.protocol_error(e);
                        return true;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.protocol_error(e.into());
                    break;
                }
            }
        }
        if !self.control_is_empty() {
            self.try_flush_control();
        }
        true
    }

    /// Handles one frame from the peer. An `Err` is a protocol violation.
    fn dispatch(&self, frame: Frame<'_>) -> Result<(), Violation> {
        let Frame { header, body, fds } = frame;
        match header.kind {
            Kind::Open => {
                let fp = frame::parse_open(body)?;
                let this = self.arc()?;
                let mut t = self.lock_table();
                self.check_new_peer_id(&t, header.chan)?;
                let inbox = Inbox::new(DEFAULT_CAPACITY);
                let rx = RecvCore::new(inbox.clone());
                inbox.add_feed(&this);
                t.inbound
                    .insert(header.chan, InChan::new(&this, header.chan, inbox));
                t.accepts.push_back((header.chan, fp, rx));
                let waiters = std::mem::take(&mut t.accept_waiters);
                drop(t);
                waiters.into_iter().for_each(|t| t.unpark());
                Ok(())
            }
            Kind::Data => self.dispatch_data(header.chan, &header, body, fds),
            Kind::Close => {
                let c = {
                    let mut t = self.lock_table();
                    if t.reset_inbound.remove(&header.chan) {
                        None
                    } else {
                        t.inbound.remove(&header.chan)
                    }
                };
                if let Some(c) = c {
                    c.inbox.remove_feed(self, false);
                }
                Ok(())
            }
            Kind::Reset => {
                frame::parse_reset(&header, body)?;
                if let Some(o) = self.outbound(header.chan) {
                    o.mark_reset();
                }
                Ok(())
            }
            Kind::Credit => {
                if let Some(o) = self.outbound(header.chan) {
                    o.grant(header.arg);
                }
                Ok(())
            }
            Kind::Ping => {
                let opaque = frame::parse_ping(body)?;
                let mut buf = Vec::with_capacity(24);
                frame::encode_pong(&mut buf, opaque);
                self.send_control(&buf);
                Ok(())
            }
            Kind::Pong => Ok(()),
            Kind::GoAway => {
                let (_, text) = frame::parse_goaway(&header, body)?;
                self.fail(&format!("peer closed the session: {text}"));
                Ok(())
            }
        }
    }

    fn dispatch_data(
        &self,
        chan: u32,
        header: &frame::Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Violation> {
        let (descs, payload) = frame::parse_data(header, body)?;
        let cost = data_cost(body.len());
        if payload.len() > self.limits.max_message as usize {
            return Err(Violation::limit(format!(
                "message of {} bytes exceeds the limit of {}",
                payload.len(),
                self.limits.max_message
            )));
        }
        let this = self.arc()?;
        let mut t = self.lock_table();
        if t.reset_inbound.contains(&chan) {
            drop(t);
            // Discarded, but its credit goes back so the peer's window stays honest.
            let mut buf = Vec::with_capacity(16);
            frame::encode_credit(&mut buf, chan, cost.min(u64::from(u32::MAX)) as u32);
            self.send_control(&buf);
            drop(fds);
            return Ok(());
        }
        let inchan = t
            .inbound
            .get(&chan)
            .cloned()
            .ok_or_else(|| Violation::from(format!("data on unknown channel {chan}")))?;
        inchan.handle_data(cost).map_err(Violation::limit)?;
        let mut fds = fds.into_iter();
        let mut handles = Vec::with_capacity(descs.len());
        for d in descs {
            let h = match d.kind {
                HandleKind::Fd => Handle::Fd(fds.next().ok_or("missing fd")?),
                HandleKind::Stream => Handle::Stream(fds.next().ok_or("missing fd")?),
                HandleKind::Sender => {
                    self.check_new_peer_id(&t, d.chan)?;
                    let o = OutChan::new(this.clone(), d.chan);
                    t.outbound.insert(d.chan, Arc::downgrade(&o));
                    Handle::Sender(SendCore::Remote(o), d.fingerprint)
                }
                HandleKind::Receiver => {
                    self.check_new_peer_id(&t, d.chan)?;
                    let inbox = Inbox::new(DEFAULT_CAPACITY);
                    let rx = RecvCore::new(inbox.clone());
                    inbox.add_feed(&this);
                    t.inbound.insert(d.chan, InChan::new(&this, d.chan, inbox));
                    Handle::Receiver(rx, d.fingerprint)
                }
                HandleKind::SenderLocal => {
                    if id_is_peers(d.chan, self.we_connected) {
                        return Err(
                            format!("sender-local handle names peer channel {}", d.chan).into()
                        );
                    }
                    let inbox = match t.inbound.get(&d.chan) {
                        Some(c) => c.inbox.clone(),
                        // Our receiver is gone: the sender is born disconnected.
                        None => {
                            let inbox = Inbox::new(1);
                            drop(RecvCore::new(inbox.clone()));
                            inbox
                        }
                    };
                    Handle::Sender(SendCore::local(inbox), d.fingerprint)
                }
            };
            handles.push(h);
        }
        let mut bytes = Bytes::with_capacity(payload.len());
        bytes.extend_from_slice(payload);
        let entry = Entry {
            packet: Packet { bytes, handles },
            credit: Some(inchan.clone()),
        };
        let refused = inchan.inbox.push_from_feed(entry).err();
        drop(t);
        if let Some(entry) = refused {
            // Nobody receives any more: return the credit and close the handles.
            inchan.consumed(&entry.packet);
        }
        Ok(())
    }

    /// The live channel we send on as `id`, if any (CREDIT and RESET for others are ignored).
    fn outbound(&self, id: u32) -> Option<Arc<OutChan>> {
        self.lock_table()
            .outbound
            .get(&id)
            .and_then(|w| w.upgrade())
    }

    fn check_new_peer_id(&self, t: &Table, id: u32) -> Result<(), Violation> {
        if !id_is_peers(id, self.we_connected) {
            return Err(format!("channel id {id} belongs to this side").into());
        }
        if t.inbound.contains_key(&id)
            || t.outbound.contains_key(&id)
            || t.reset_inbound.contains(&id)
        {
            return Err(format!("channel id {id} is already in use").into());
        }
        if t.inbound.len() + t.outbound.len() >= self.limits.max_channels as usize {
            return Err(Violation::limit("too many channels"));
        }
        Ok(())
    }

    /// The `Arc` holding this session: channels opened by a frame keep the session alive.
    fn arc(&self) -> Result<Arc<Conn>, Violation> {
        self.me
            .upgrade()
            .ok_or_else(|| Violation::from("session is shutting down"))
    }

    /// A violation by the peer: say why (GOAWAY), then close.
    fn protocol_error(&self, v: Violation) {
        let mut buf = Vec::new();
        let text: String = v.text.chars().take(200).collect();
        let reason = if v.limits {
            GoAwayReason::Limits
        } else {
            GoAwayReason::ProtocolError
        };
        frame::encode_goaway(&mut buf, reason, &text);
        let _ = sys::send_with_fds(self.sock.as_fd(), &[IoSlice::new(&buf)], &[]);
        self.fail(&format!("protocol violation by peer: {}", v.text));
    }

    /// Closes the session from this side: GOAWAY (best effort), then everything breaks.
    pub(crate) fn close(&self) {
        if self.is_dead() {
            return;
        }
        let mut buf = Vec::new();
        frame::encode_goaway(&mut buf, GoAwayReason::Normal, "closed by peer");
        if let Ok(_guard) = self.writer.lock() {
            let _ = self.flush_control(false);
            let _ = sys::send_with_fds(self.sock.as_fd(), &[IoSlice::new(&buf)], &[]);
        }
        self.fail("closed locally");
    }

    /// Marks the session dead and wakes everything that waits on it. Idempotent.
    pub(crate) fn fail(&self, reason: &str) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        // The reason first: the shutdown below makes concurrent writes fail, and theirs is not
        // the reason.
        self.lock_table()
            .error
            .get_or_insert_with(|| reason.to_string());
        let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Both);
        let (inbound, outbound, waiters) = {
            let mut t = self.lock_table();
            t.reset_inbound.clear();
            let inbound: Vec<_> = t.inbound.drain().map(|(_, c)| c).collect();
            let outbound: Vec<_> = t
                .outbound
                .drain()
                .filter_map(|(_, w)| w.upgrade())
                .collect();
            // Channels the peer opened stay acceptable: what arrived on them before the end is
            // delivered, then their receivers report how the session ended.
            (inbound, outbound, std::mem::take(&mut t.accept_waiters))
        };
        for c in inbound {
            c.inbox.remove_feed(self, true);
        }
        for o in outbound {
            o.wake();
        }
        waiters.into_iter().for_each(|t| t.unpark());
        self.wake_seat_waiters();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.is_dead() {
            return;
        }
        // Last chance for queued CLOSE frames to reach the peer; bounded, since a peer that
        // stopped reading must not hang this drop.
        let mut buf = Vec::new();
        frame::encode_goaway(&mut buf, GoAwayReason::Normal, "");
        self.control
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&buf);
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.control_is_empty() && Instant::now() < deadline {
            if self.flush_control(false).is_err() {
                break;
            }
            if !self.control_is_empty() {
                let _ = sys::poll(
                    self.sock.as_fd(),
                    false,
                    true,
                    Some(Duration::from_millis(10)),
                );
            }
        }
    }
}

/// Why the peer's input was refused: a broken rule, or an exceeded limit (GOAWAY reason 2).
struct Violation {
    limits: bool,
    text: String,
}

impl Violation {
    fn limit(text: impl Into<String>) -> Self {
        Self {
            limits: true,
            text: text.into(),
        }
    }
}

impl From<String> for Violation {
    fn from(text: String) -> Self {
        Self {
            limits: false,
            text,
        }
    }
}

impl From<&str> for Violation {
    fn from(text: &str) -> Self {
        text.to_string().into()
    }
}

impl From<DecodeError> for Violation {
    fn from(e: DecodeError) -> Self {
        let limits = matches!(
            e,
            DecodeError::FrameTooLarge { .. }
                | DecodeError::MessageTooLarge { .. }
                | DecodeError::TooManyFds { .. }
                | DecodeError::TooManyHandles { .. }
        );
        Self {
            limits,
            text: e.to_string(),
        }
    }
}

fn wait_ready(sock: &OwnedFd, read: bool, deadline: Instant) -> Result<(), Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout);
    }
    sys::poll(sock.as_fd(), read, !read, Some(left))?;
    Ok(())
}

/// Spawns the other side's handshake for an in-process pair.
pub(crate) fn pair(local: Limits) -> Result<(Arc<Conn>, Arc<Conn>), Error> {
    let (a, b) = UnixStream::pair()?;
    let timeout = Duration::from_secs(10);
    let other = thread::spawn(move || Conn::establish(b, false, local, timeout));
    let a = Conn::establish(a, true, local, timeout)?;
    let b = other
        .join()
        .map_err(|_| Error::Handshake("handshake thread panicked".into()))??;
    Ok((a, b))
}
