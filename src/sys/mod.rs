//! Every system call libchan makes goes through here.
//!
//! The layers above see `OwnedFd`/`BorrowedFd` and `io::Result`, never raw integers. Sockets
//! are driven non-blocking: a call that would block returns `WouldBlock`, and the caller waits
//! with [`poll`].

mod futex;
mod memfd;
mod process;
mod socket;
mod wake;

pub(crate) use socket::{
    cut, cut_keeping_connection, peer_uid, poll, poll_with_doorbell, recv_with_fds, send_with_fds,
};
pub(crate) use wake::Doorbell;
// The shared-memory transport's doorbell will call these; until then only tests do.
#[cfg_attr(not(test), allow(unused_imports))]
pub(crate) use futex::{futex_wait, futex_wake, WaitResult};
pub(crate) use memfd::{memfd, seal, seals, size, Seal};
pub(crate) use process::{
    check_inherited_socket, inherit_and_pin, inherited_socket_taken, set_cloexec,
    take_inherited_socket, Refused,
};
