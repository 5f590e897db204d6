//! The write path: whole frames under the writer lock, the control-frame queue and its
//! flusher, and waiting for socket space without deadlocking against a peer that writes too.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::channel::{Feed, PushError, Wait};
use crate::sys;

use super::{Conn, MAX_CONTROL_QUEUE};

impl Conn {
    /// A write failed: the peer is gone or stopped reading for good. Senders fail from now on;
    /// reading goes on until end of stream, so messages the peer sent before it closed are
    /// still delivered (the read side ends the session).
    pub(super) fn write_failed(&self, e: &io::Error) {
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
            match self.link.send(&slices, attach) {
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
        // A link that buffers (TLS, WebSocket) must have the frame on the wire before the
        // writer seat is given up; for a socket this is a no-op.
        self.flush_link(true)?;
        self.flush_control(false)?;
        drop(guard);
        self.try_flush_control();
        Ok(())
    }

    /// Pushes output the link accepted but could not write yet. Caller holds `writer`. With
    /// `all`, waits until none is left.
    fn flush_link(&self, all: bool) -> Result<(), PushError> {
        loop {
            match self.link.flush() {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !all {
                        return Ok(());
                    }
                    self.wait_writable()?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.write_failed(&e);
                    return Err(PushError::Disconnected);
                }
            }
        }
    }

    /// Writes `frame` with `fd` attached to its first byte if that can be done without waiting:
    /// the writer seat is free, no control frame is queued, and the socket takes the first
    /// byte at once. Returns false, having written nothing, otherwise. For the session's own
    /// thread, which must never wait on the socket (the peer's may be waiting on ours).
    ///
    /// If the socket takes only part of the frame, the rest goes to the head of the (empty)
    /// control queue, which is written before anything else.
    pub(super) fn try_write_now(&self, frame: &[u8], fd: BorrowedFd<'_>) -> bool {
        if self.cannot_send() {
            return false;
        }
        let Ok(guard) = self.writer.try_lock() else {
            return false;
        };
        if self.flush_control(false).is_err() || !self.control_is_empty() {
            return false;
        }
        let written = loop {
            match self.link.send(&[IoSlice::new(frame)], &[fd]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    self.write_failed(&e);
                    return false;
                }
            }
        };
        if written < frame.len() {
            self.control
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&frame[written..]);
        }
        drop(guard);
        self.try_flush_control();
        true
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

    pub(super) fn try_flush_control(&self) {
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
    pub(super) fn spawn_flusher(&self) {
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
                let _ = sys::poll(conn.link.fd(), false, true, Some(Duration::from_millis(50)));
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

    /// True when no control frame waits in the queue and the link has written everything it
    /// accepted.
    pub(super) fn control_is_empty(&self) -> bool {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
            && !self.link.output_pending()
    }

    /// Writes queued control frames. Caller holds `writer`. With `all`, waits until every
    /// byte is out (a data frame must not start in the middle of a control frame).
    pub(super) fn flush_control(&self, all: bool) -> Result<(), PushError> {
        loop {
            let mut q = self.control.lock().unwrap_or_else(|e| e.into_inner());
            if q.is_empty() {
                drop(q);
                return self.flush_link(all);
            }
            match self.link.send(&[IoSlice::new(&q)], &[]) {
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
        matches!(sys::poll(self.link.fd(), false, true, Some(timeout)), Ok(r) if r.writable)
    }

    /// Waits until the socket takes more bytes or something was read (which may have changed
    /// what the writer waits for). Reads incoming frames meanwhile when the reader seat is
    /// free, so two writers facing each other cannot deadlock.
    pub(super) fn wait_writable(&self) -> Result<(), PushError> {
        if self.cannot_send() {
            return Err(PushError::Disconnected);
        }
        if let Ok(mut seat) = self.reader.try_lock() {
            let bell = self.doorbell.as_fd();
            match sys::poll_with_doorbell(self.link.fd(), bell, true, None) {
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
            let _ = sys::poll(self.link.fd(), false, true, Some(Duration::from_millis(5)));
        }
        if self.cannot_send() {
            return Err(PushError::Disconnected);
        }
        Ok(())
    }
}
