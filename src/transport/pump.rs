//! Pumped streams: an [`Fd`](crate::Fd) or [`ByteStream`](crate::ByteStream) crossing a session
//! that cannot carry descriptors (tcp, tls, ws) travels as bytes on two channels of the session,
//! one per direction (docs/PROTOCOL.md section 5.6, docs/ARCHITECTURE.md section 2.31).
//!
//! Each side of a pumped stream has a *local end*: on the writer's side of the PUMPED descriptor
//! the fd the message carried, on the reader's side our end of a socket pair whose other end
//! the application receives. Two threads pump it, each owning one direction:
//!
//! - *out* reads the local end and sends each chunk (at most [`CHUNK`] bytes) on the outgoing
//!   channel, blocking on that channel's credit. It holds one chunk at a time, so a reader that
//!   does not read stalls the writing application through the local socket's buffer; memory
//!   stays bounded by the channel's window.
//! - *in* receives chunks on the incoming channel and writes them to the local end, granting
//!   their credit back only once they are written.
//!
//! There is no I/O thread in a session: *in* reads the session while it waits for a chunk, as
//! any receiver does. *out* waits on the local end, on a doorbell of the pump's own, and on the
//! session's socket for hang-up only (a session that dies is cut, which wakes it), so no timer is
//! involved anywhere.
//!
//! How a pumped stream ends, in the terms of a socket's:
//!
//! | event | what the pump does |
//! |-------|--------------------|
//! | local end reads EOF | CLOSE the outgoing channel (the peer's end reads EOF); if the local end hung up altogether, first drop the incoming receiver (RESET): nobody reads what comes |
//! | writing the local end fails | drop the incoming receiver (RESET) |
//! | incoming channel closed (the peer's EOF) | shut down the local end for writing; if the outgoing channel was reset too, the far end is gone both ways: stop |
//! | outgoing channel reset | shut down the local end for reading (its writer gets EPIPE) |
//! | session dead | *out* ends; *in* writes what arrived before the end as far as the local end takes it without waiting, then shuts the local end down both ways |
//!
//! The local end closes when both threads have ended. A local end that is not a socket (a
//! pipe, a file, a memfd) is read and written with plain blocking calls made only after `poll`
//! says they will not block (writes of at most `PIPE_BUF` bytes where that matters), because
//! its file status flags are shared with whoever else holds it: the pump never makes it
//! non-blocking. A descriptor open read-only is never written (its incoming channel is reset at
//! once), one open write-only never read (its outgoing channel closes at once).
//!
//! Invariant: while a pump runs, its session's pump count (see [`Conn::pump_count`]) includes
//! it, so a peer cannot make us run more than [`MAX_PER_SESSION`] of them.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{FileType, OFlags};
use rustix::net::{RecvFlags, SendFlags, Shutdown};

use super::chan::OutChan;
use super::conn::Conn;
use crate::channel::{Inbox, Outlet, PopError, RecvCore, Wait};
use crate::message::{Bytes, Packet};
use crate::sys::Doorbell;

/// Largest chunk of bytes one DATA frame of a pumped stream carries.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Most pumped streams one session runs at once (both directions together). A peer that sends
/// more gets them refused: their channels end at once and the application's end reads EOF.
pub(crate) const MAX_PER_SESSION: u32 = 256;

/// Stack of a pump thread: it drives the session while it waits, as a relay thread does.
const STACK: usize = 128 * 1024;

/// A pump whose channels are registered with the session but whose threads have not started:
/// they start once the frame that names the channels is written or dispatched. Dropped
/// unstarted, its channels end (outgoing: CLOSE; incoming: RESET) and its local end closes.
pub(crate) struct Pending {
    local: OwnedFd,
    out: Arc<OutChan>,
    rx: RecvCore,
    /// Its place in the session's count; `None` when refused (the session runs its maximum).
    slot: Option<Slot>,
}

/// One pump counted against its session's [`MAX_PER_SESSION`]; uncounted on drop.
struct Slot(Arc<Conn>);

/// What both threads of one pump share.
struct Shared {
    local: Local,
    bell: Doorbell,
    /// The stream is over: both threads end as soon as they look. Relaxed: it publishes no
    /// data (the local end's shutdown is a system call, and the doorbell wakes the waiter).
    stop: AtomicBool,
    /// The incoming channel's receiver: dropping it resets the channel (nobody writes what
    /// arrives any more). *in* pops through its own reference to the inbox meanwhile.
    rx: Mutex<Option<RecvCore>>,
    /// The outgoing channel, to tell whether the peer reset it.
    out: Weak<OutChan>,
    conn: Arc<Conn>,
    _slot: Slot,
}

/// The local end and what can be done with it.
struct Local {
    fd: OwnedFd,
    /// Read and written with `MSG_DONTWAIT` (and `MSG_NOSIGNAL`) rather than poll-then-call.
    socket: bool,
    readable: bool,
    writable: bool,
    /// Largest write that cannot block once `poll` reported the fd writable (`PIPE_BUF` for
    /// pipes and devices; sockets and regular files take any size).
    max_write: usize,
}

/// A wait for the local end gave up: the stream is over.
struct Stopped;

/// How the out thread's loop ended.
enum OutEnd {
    /// The local end reads EOF (or fails to read).
    Eof,
    /// The outgoing channel refuses more (reset by the peer, or the session is gone).
    Refused,
    /// The stream is over.
    Stopped,
}

impl Pending {
    /// A pump of `local` over the outgoing channel `out` and the incoming channel `rx`. It is
    /// refused (never started) when the session already runs [`MAX_PER_SESSION`] pumps.
    pub(crate) fn new(local: OwnedFd, out: Arc<OutChan>, rx: RecvCore) -> Self {
        // A counter and nothing else: the read-modify-write alone keeps it within the bound.
        let counted = out
            .conn
            .pump_count()
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_PER_SESSION).then_some(n + 1)
            })
            .is_ok();
        let slot = counted.then(|| Slot(out.conn.clone()));
        Self {
            local,
            out,
            rx,
            slot,
        }
    }

    /// Starts the pump's threads. A refused pump, or a direction whose thread cannot be made,
    /// ends at once.
    pub(crate) fn start(self) {
        let Pending {
            local,
            out,
            rx,
            slot,
        } = self;
        let Some(slot) = slot else { return };
        let Ok(local) = Local::new(local) else { return };
        let Ok(bell) = Doorbell::new() else { return };
        let inbox = rx.0.clone();
        let shared = Arc::new(Shared {
            local,
            bell,
            stop: AtomicBool::new(false),
            rx: Mutex::new(Some(rx)),
            out: Arc::downgrade(&out),
            conn: out.conn.clone(),
            _slot: slot,
        });
        if !shared.local.writable {
            shared.reset_incoming();
        }
        let s = shared.clone();
        let spawned = thread::Builder::new()
            .name("libchan-pump-in".into())
            .stack_size(STACK)
            .spawn(move || s.run_in(&inbox));
        if spawned.is_err() {
            shared.reset_incoming();
        }
        let s = shared;
        // Without its thread, `out` drops with the closure: the channel closes.
        let _ = thread::Builder::new()
            .name("libchan-pump-out".into())
            .stack_size(STACK)
            .spawn(move || s.run_out(out));
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.pump_count().fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The out thread: local end to the outgoing channel.
    fn run_out(&self, out: Arc<OutChan>) {
        let chunk = CHUNK.min(out.max_message()).max(1);
        let end = if self.local.readable {
            self.pump_out(&out, chunk)
        } else {
            OutEnd::Eof
        };
        match end {
            OutEnd::Eof => {
                if self.local.hung_up() {
                    // Nobody at the local end reads either: the RESET goes out before the
                    // CLOSE below, so the peer sees our end gone both ways.
                    self.reset_incoming();
                }
            }
            // The far end takes no more (it reset the channel, or the session is gone): the
            // local writer gets EPIPE, as from a socket whose peer closed. The other
            // direction is the in thread's: it still delivers what arrived.
            OutEnd::Refused | OutEnd::Stopped => self.local.shutdown(Shutdown::Read),
        }
        // The last reference: the channel's CLOSE, after any RESET queued above.
        drop(out);
    }

    fn pump_out(&self, out: &OutChan, chunk: usize) -> OutEnd {
        loop {
            if self.stopped() {
                return OutEnd::Stopped;
            }
            let mut bytes = Bytes::with_capacity(chunk);
            bytes.resize(chunk, 0);
            match self.local.read(&mut bytes) {
                Ok(0) => return OutEnd::Eof,
                Ok(n) => {
                    bytes.resize(n, 0);
                    let packet = Packet {
                        bytes,
                        handles: Vec::new(),
                    };
                    // Blocks on the channel's credit: the pump's flow control.
                    if out.send(packet, Wait::Forever).is_err() {
                        return OutEnd::Refused;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.wait(false).is_err() {
                        return OutEnd::Stopped;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A read error ends this direction as EOF would.
                Err(_) => return OutEnd::Eof,
            }
        }
    }

    /// The in thread: incoming channel to the local end.
    fn run_in(&self, inbox: &Inbox) {
        loop {
            match inbox.pop(Wait::Forever) {
                Ok(entry) => {
                    let credit = entry.credit.clone();
                    let cost = entry.body_len();
                    let packet = entry.into_packet();
                    let written = matches!(self.write_all(&packet.bytes), Ok(true));
                    drop(packet);
                    if !written {
                        // Before the credit goes back: a sender waiting for it must see the
                        // reset first.
                        self.reset_incoming();
                    }
                    if let Some(c) = credit {
                        c.consumed(cost);
                    }
                    if !written {
                        break;
                    }
                }
                Err(PopError::Closed) => {
                    let far_end_gone = self.out.upgrade().is_some_and(|o| o.is_disconnected());
                    if far_end_gone {
                        self.stop_all();
                    } else {
                        self.local.shutdown(Shutdown::Write);
                    }
                    break;
                }
                // The session died (`Wait::Forever` has no other end): handled below.
                Err(_) => break,
            }
        }
        self.reset_incoming();
        if self.conn.is_dead() {
            // What arrived before the end was written, as far as the local end took it
            // without waiting; now the stream ends both ways.
            self.stop_all();
        }
    }

    /// Writes `buf` to the local end. `Ok(false)`: the local end takes no more (the bytes are
    /// dropped, and so is the channel); `Err`: the stream is over.
    fn write_all(&self, mut buf: &[u8]) -> Result<bool, Stopped> {
        if !self.local.writable || self.rx_reset() {
            return Ok(false);
        }
        while !buf.is_empty() {
            match self.local.write(buf) {
                Ok(0) => return Ok(false),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(true)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Waits until the local end is readable (or writable, with `write`), or the stream is
    /// over.
    fn wait(&self, write: bool) -> Result<(), Stopped> {
        loop {
            if self.stopped() {
                return Err(Stopped);
            }
            let want = if write { PollFlags::OUT } else { PollFlags::IN };
            let link = self.conn.link_fd();
            let mut fds = [
                PollFd::new(&self.local.fd, want),
                PollFd::new(&self.bell, PollFlags::IN),
                // Hang-up and errors only: the session's traffic does not wake us.
                PollFd::new(&link, PollFlags::empty()),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(_) => return Err(Stopped),
            }
            if !fds[0].revents().is_empty() {
                // Ready, or hung up: the next call says which.
                return Ok(());
            }
            if !fds[2].revents().is_empty() && !self.conn.is_dead() {
                // The connection ended and nobody has read that yet: read it, or let the
                // thread that reads it get there.
                self.conn.poll_input();
                if !self.conn.is_dead() {
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// Whether the stream is over, or its session is: waiting on the local end is pointless.
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.conn.is_dead()
    }

    /// The stream is over (the session died, or the far end is gone both ways): the local end
    /// is shut down and the out thread ends (the in thread calls this on its way out).
    fn stop_all(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.bell.ring();
        self.local.shutdown(Shutdown::Both);
    }

    /// Drops the incoming channel's receiver (the peer gets RESET), once.
    fn reset_incoming(&self) {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(rx);
    }

    fn rx_reset(&self) -> bool {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

impl Local {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        let mode = rustix::fs::fcntl_getfl(&fd)? & OFlags::RWMODE;
        let max_write = match kind {
            FileType::Socket | FileType::RegularFile | FileType::BlockDevice => usize::MAX,
            _ => PIPE_BUF,
        };
        Ok(Self {
            fd,
            socket: kind == FileType::Socket,
            readable: mode != OFlags::WRONLY,
            writable: mode != OFlags::RDONLY,
            max_write,
        })
    }

    /// Reads what is there; `WouldBlock` when nothing is.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.socket {
            return Ok(rustix::net::recv(&self.fd, buf, RecvFlags::DONTWAIT)?.0);
        }
        if self.ready(PollFlags::IN).is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(rustix::io::read(&self.fd, buf)?)
    }

    /// Writes what fits now; `WouldBlock` when nothing does.
    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if self.socket {
            let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
            return Ok(rustix::net::send(&self.fd, buf, flags)?);
        }
        let ready = self.ready(PollFlags::OUT);
        if ready.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if ready.contains(PollFlags::ERR) {
            // A pipe without readers: writing would raise SIGPIPE in a host that does not
            // ignore it, as Rust programs do.
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.max_write);
        Ok(rustix::io::write(&self.fd, &buf[..n])?)
    }

    /// What `poll` reports now for `events`: empty when a blocking call would block, else
    /// ready, hung up (`HUP`) or failed (`ERR`).
    fn ready(&self, events: PollFlags) -> PollFlags {
        let mut fds = [PollFd::new(&self.fd, events)];
        match rustix::event::poll(&mut fds, Some(&ZERO)) {
            Ok(n) if n > 0 => fds[0].revents(),
            _ => PollFlags::empty(),
        }
    }

    /// Whether the other side of the local end is gone both ways (a socket peer that closed).
    fn hung_up(&self) -> bool {
        self.ready(PollFlags::empty()).contains(PollFlags::HUP)
    }

    /// Shuts a socket down (a no-op for other descriptors).
    fn shutdown(&self, how: Shutdown) {
        if self.socket {
            let _ = rustix::net::shutdown(&self.fd, how);
        }
    }
}

/// Writes up to this size to a pipe are atomic, so one that `poll` calls writable takes them
/// without blocking.
const PIPE_BUF: usize = 4096;

const ZERO: rustix::time::Timespec = rustix::time::Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};
