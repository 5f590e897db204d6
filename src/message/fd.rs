//! `Fd`: an owned file descriptor that travels inside a message.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rkyv::rancor::{Fallible, Source};
use rkyv::{Archive, Deserialize, Place, Serialize};

use super::handles::{deserialize_handle, serialize_handle, ArchivedHandle, HandleIndex};
use crate::channel::Handle;
use crate::error::TakeError;

/// An owned file descriptor that can be a field of a message.
///
/// Sending a message duplicates the descriptor into the message (the sender's copy closes when
/// the message value is dropped); the receiver gets its own descriptor for the same open file,
/// bound to that message only.
///
/// Across a network (tcp, tls and ws sessions cannot pass descriptors) the receiver gets one end
/// of a unix socket pair instead, carrying the same bytes both ways: what can be read from the
/// sent fd (for a file or memfd, its content from the current offset to the end, then EOF), and
/// what the receiver writes, which the sending side writes into the fd. libchan pumps the bytes
/// over the session with their own flow control, on two threads per fd on each side, for as
/// long as both processes and the session live (docs/PROTOCOL.md section 5.6).
///
/// ```
/// use std::io::{Read, Seek, Write};
/// let mut file = tempfile_like();
/// file.write_all(b"hello").unwrap();
/// file.rewind().unwrap();
/// let fd = libchan::Fd::from(std::os::fd::OwnedFd::from(file));
/// let mut again = std::fs::File::from(fd.into_owned_fd());
/// let mut s = String::new();
/// again.read_to_string(&mut s).unwrap();
/// assert_eq!(s, "hello");
/// # fn tempfile_like() -> std::fs::File {
/// #     let p = std::env::temp_dir().join(format!("libchan-fd-doc-{}", std::process::id()));
/// #     let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
/// #     std::fs::remove_file(&p).unwrap();
/// #     f
/// # }
/// ```
#[derive(Debug)]
pub struct Fd(OwnedFd);

/// The archived form of an [`Fd`]: an index into its message's handles.
pub type ArchivedFd = ArchivedHandle<Fd>;

impl Fd {
    /// Wraps an owned descriptor.
    pub fn new(fd: impl Into<OwnedFd>) -> Self {
        Self(fd.into())
    }

    /// Gives back the owned descriptor.
    pub fn into_owned_fd(self) -> OwnedFd {
        self.0
    }
}

impl From<OwnedFd> for Fd {
    fn from(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

impl From<Fd> for OwnedFd {
    fn from(fd: Fd) -> Self {
        fd.0
    }
}

impl AsFd for Fd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl HandleIndex for Fd {
    type Owned = Fd;

    #[allow(private_interfaces)]
    fn from_handle(handle: Handle) -> Result<Fd, (Handle, TakeError)> {
        match handle {
            Handle::Fd(fd) => Ok(Fd(fd)),
            other => Err((other, TakeError::Invalid)),
        }
    }
}

impl Archive for Fd {
    type Archived = ArchivedFd;
    type Resolver = u32;

    fn resolve(&self, resolver: u32, out: Place<Self::Archived>) {
        ArchivedHandle::resolve(resolver, out);
    }
}

impl<S: Fallible + ?Sized> Serialize<S> for Fd
where
    S::Error: Source,
{
    fn serialize(&self, _: &mut S) -> Result<u32, S::Error> {
        let dup = self.0.try_clone().map_err(S::Error::new)?;
        serialize_handle(Handle::Fd(dup))
    }
}

impl<D: Fallible + ?Sized> Deserialize<Fd, D> for ArchivedFd
where
    D::Error: Source,
{
    fn deserialize(&self, _: &mut D) -> Result<Fd, D::Error> {
        deserialize_handle::<Fd, D::Error>(self.index())
    }
}
