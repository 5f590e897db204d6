//! Unix-socket I/O with file descriptors attached (SCM_RIGHTS), and readiness waits.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors one message may carry (the kernel's SCM_MAX_FD).
pub(crate) const MAX_FDS: usize = 253;

const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS));

/// Writes `bufs` and attaches `fds` to the first byte written. Never blocks; never raises
/// SIGPIPE (a closed peer is `BrokenPipe`).
pub(crate) fn send_with_fds(
    socket: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    if fds.is_empty() {
        let mut control = SendAncillaryBuffer::default();
        return Ok(rustix::net::sendmsg(socket, bufs, &mut control, flags)?);
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 253 descriptors in one message",
        ));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small"));
    }
    Ok(rustix::net::sendmsg(socket, bufs, &mut control, flags)?)
}

/// Reads into `buf`, appending any descriptors that came with the bytes to `fds` (close-on-exec
/// set atomically). Never blocks. `Ok(0)` is end of stream. Truncated control data (more
/// descriptors than fit) is an error: they were closed by the kernel and the stream is no
/// longer trustworthy.
pub(crate) fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(
        socket,
        &mut iov,
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control data truncated (peer sent too many descriptors)",
        ));
    }
    Ok(msg.bytes)
}

/// What a socket is ready for.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Readiness {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
}

/// Waits until `fd` is readable (if `read`) or writable (if `write`), or `timeout` passes
/// (`None`: no limit). Hang-up and errors count as readable and writable so that the next
/// call reports them.
pub(crate) fn poll(
    fd: impl AsFd,
    read: bool,
    write: bool,
    timeout: Option<Duration>,
) -> io::Result<Readiness> {
    let mut events = PollFlags::empty();
    if read {
        events |= PollFlags::IN;
    }
    if write {
        events |= PollFlags::OUT;
    }
    let fd = fd.as_fd();
    let mut fds = [PollFd::from_borrowed_fd(fd, events)];
    let ts = timeout.map(|d| Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    });
    match rustix::event::poll(&mut fds, ts.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(Readiness::default()),
        Err(e) => return Err(e.into()),
    }
    let r = fds[0].revents();
    let bad = r.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL);
    Ok(Readiness {
        readable: r.contains(PollFlags::IN) || bad,
        writable: r.contains(PollFlags::OUT) || bad,
    })
}

/// Like [`poll`] on `fd`, also returning when `doorbell` becomes readable (`Ok(None)`).
pub(crate) fn poll_with_doorbell(
    fd: BorrowedFd<'_>,
    doorbell: BorrowedFd<'_>,
    write: bool,
    timeout: Option<Duration>,
) -> io::Result<Option<Readiness>> {
    let mut events = PollFlags::IN;
    if write {
        events |= PollFlags::OUT;
    }
    let mut fds = [
        PollFd::from_borrowed_fd(fd, events),
        PollFd::from_borrowed_fd(doorbell, PollFlags::IN),
    ];
    let ts = timeout.map(|d| Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    });
    match rustix::event::poll(&mut fds, ts.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(Some(Readiness::default())),
        Err(e) => return Err(e.into()),
    }
    if fds[1].revents().contains(PollFlags::IN) {
        return Ok(None);
    }
    let r = fds[0].revents();
    let bad = r.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL);
    Ok(Some(Readiness {
        readable: r.contains(PollFlags::IN) || bad,
        writable: r.contains(PollFlags::OUT) || bad,
    }))
}

/// Ends a connection now, even while other threads poll or write on `socket`: shuts it down,
/// then puts a dead socket in its place (dup2), so the connection's last descriptor is closed
/// and the kernel resets it if the peer's data is still unread. A peer blocked writing to us
/// then fails at once instead of waiting for a reader that will never come (for TCP, a
/// shutdown alone leaves it blocked). The descriptor number stays valid (reads see end of
/// stream, writes fail) until its owner closes it.
pub(crate) fn cut(socket: &OwnedFd) {
    let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Both);
    cut_keeping_connection(socket);
}

/// As [`cut`], without shutting the connection down: `socket`'s number moves to an inert socket,
/// and the connection lives on in whatever other descriptor refers to it (a lingering close).
pub(crate) fn cut_keeping_connection(socket: &OwnedFd) {
    let Ok((inert, far)) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        None,
    ) else {
        return;
    };
    drop(far);
    // SAFETY: the OwnedFd made here aliases `socket`'s descriptor and is never dropped
    // (ManuallyDrop), so the descriptor keeps exactly one owner, `socket`; dup2 only swaps the
    // file that number refers to.
    let mut alias = std::mem::ManuallyDrop::new(unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::AsRawFd::as_raw_fd(socket))
    });
    let _ = rustix::io::dup2(&inert, &mut alias);
    // dup2 does not carry close-on-exec over; set it again.
    let _ = rustix::io::fcntl_setfd(&*alias, rustix::io::FdFlags::CLOEXEC);
}

/// The user id of the process at the other end of a unix socket (SO_PEERCRED).
pub(crate) fn peer_uid(socket: BorrowedFd<'_>) -> io::Result<u32> {
    let cred = rustix::net::sockopt::socket_peercred(socket)?;
    Ok(cred.uid.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_travel_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        let n = send_with_fds(a.as_fd(), &[IoSlice::new(b"hello")], &[x.as_fd()]).unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn empty_socket_would_block() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 4];
        let err = recv_with_fds(b.as_fd(), &mut buf, &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let r = poll(&b, true, false, Some(Duration::from_millis(1))).unwrap();
        assert!(!r.readable);
    }
}
