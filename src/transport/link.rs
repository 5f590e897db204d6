//! `Link`: the byte stream under a session, so the session engine (`conn`) runs unchanged on a
//! unix socket, TCP, TLS or WebSocket.
//!
//! Every method is non-blocking: the engine waits for readiness itself, on [`Link::fd`]. A
//! link that keeps bytes in user space (TLS records, WebSocket frames) must drain them before
//! it reports `WouldBlock`, so that waiting on the descriptor never sleeps on data already
//! here: `recv` returns buffered input first, and output it could not write yet is reported by
//! [`Link::output_pending`] and pushed by [`Link::flush`].

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

use super::Transport;

/// A connected, non-blocking byte stream that a session runs on.
pub(crate) trait Link: Send + Sync + 'static {
    /// The descriptor to wait on for readiness (and to shut down when the session dies).
    fn fd(&self) -> BorrowedFd<'_>;

    /// Writes some of `bufs`, with `fds` attached to the first byte written (only links that
    /// [`carry_fds`](Link::carry_fds) are ever given any). Returns how many bytes it took;
    /// `WouldBlock` when it can take none now.
    fn send(&self, bufs: &[IoSlice<'_>], fds: &[BorrowedFd<'_>]) -> io::Result<usize>;

    /// Reads into `buf`, appending descriptors that came with the bytes to `fds`. `Ok(0)` is
    /// the end of the stream; `WouldBlock` means nothing is buffered and the descriptor has
    /// nothing to read.
    fn recv(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize>;

    /// Writes output that `send` accepted but could not write yet. `WouldBlock` while some is
    /// left.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// True while `flush` has something to write.
    fn output_pending(&self) -> bool {
        false
    }

    /// Whether descriptors travel with the bytes (SCM_RIGHTS).
    fn carries_fds(&self) -> bool {
        false
    }

    /// The transport to report for a session on this link (without shared memory).
    fn transport(&self) -> Transport;

    /// Who the peer proved to be, if the link authenticates it (a TLS client certificate).
    fn peer_identity(&self) -> Option<String> {
        None
    }

    /// Ends the connection (the session died): blocked peers and threads of ours waiting on
    /// [`fd`](Link::fd) wake. The link only fails from now on.
    fn cut(&self) {
        let _ = rustix::net::shutdown(self.fd(), rustix::net::Shutdown::Both);
    }

    /// As [`cut`](Link::cut), after a GOAWAY: what was written still reaches the peer. A TCP
    /// connection closed with unread bytes (a peer still sending what made us give up) is
    /// reset, and a reset can throw away the GOAWAY before the peer, or a proxy between us,
    /// has read it; so such a link ends with a FIN and lets the closer thread read and discard
    /// until the peer closes. The caller holds the reader seat: no thread of ours is blocked
    /// reading.
    fn cut_after_goaway(&self) {
        self.cut();
    }
}

/// Ends a TCP connection as [`Link::cut_after_goaway`] describes: the socket goes to the
/// closer thread (FIN, then reading until the peer closes, at most `closer::CLOSE_LINGER`),
/// and `sock`'s number is left on an inert socket, so the session's threads see it dead.
pub(super) fn linger_and_cut(sock: &OwnedFd) {
    if let Ok(dup) = sock.try_clone() {
        super::closer::close_later(super::closer::SocketClosing::new(dup));
    }
    sys::cut_keeping_connection(sock);
}

/// A socket used as it is: a unix stream socket (descriptors attached by SCM_RIGHTS) or a TCP
/// connection.
pub(crate) struct SocketLink {
    sock: OwnedFd,
    transport: Transport,
    /// The session died and `cut` ended the connection: no lingering close.
    was_cut: std::sync::atomic::AtomicBool,
}

impl SocketLink {
    /// A unix stream socket, already non-blocking.
    pub(crate) fn unix(sock: OwnedFd) -> Self {
        Self {
            sock,
            transport: Transport::Unix,
            was_cut: false.into(),
        }
    }

    /// A TCP connection, already non-blocking.
    pub(crate) fn tcp(sock: OwnedFd) -> Self {
        Self {
            sock,
            transport: Transport::Tcp,
            was_cut: false.into(),
        }
    }
}

impl Link for SocketLink {
    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn send(&self, bufs: &[IoSlice<'_>], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        if !fds.is_empty() && !self.carries_fds() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors on a link that cannot carry them",
            ));
        }
        sys::send_with_fds(self.sock.as_fd(), bufs, fds)
    }

    fn recv(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        sys::recv_with_fds(self.sock.as_fd(), buf, fds)
    }

    fn carries_fds(&self) -> bool {
        self.transport == Transport::Unix
    }

    fn transport(&self) -> Transport {
        self.transport
    }

    fn cut(&self) {
        if self.transport == Transport::Unix {
            // A shutdown wakes a unix peer's blocked writes; the socket stays as it is (direct
            // paths key pending introductions on its number).
            let _ = rustix::net::shutdown(&self.sock, rustix::net::Shutdown::Both);
        } else {
            self.was_cut
                .store(true, std::sync::atomic::Ordering::Relaxed);
            sys::cut(&self.sock);
        }
    }

    fn cut_after_goaway(&self) {
        if self.transport == Transport::Unix {
            // A unix socket loses nothing to a close with unread bytes.
            return self.cut();
        }
        self.was_cut
            .store(true, std::sync::atomic::Ordering::Relaxed);
        linger_and_cut(&self.sock);
    }
}

impl Drop for SocketLink {
    /// A TCP session that ended in order closes once its peer has (`closer::Closing`); a unix
    /// socket has no reset to fear and closes now.
    fn drop(&mut self) {
        if self.transport == Transport::Unix || *self.was_cut.get_mut() {
            return;
        }
        if let Ok(dup) = self.sock.try_clone() {
            super::closer::close_later(super::closer::SocketClosing::new(dup));
        }
    }
}
