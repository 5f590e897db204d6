//! `ByteStream`: a bidirectional byte stream that travels inside a message.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rkyv::rancor::{Fallible, Source};
use rkyv::{Archive, Deserialize, Place, Serialize};

use super::handles::{deserialize_handle, serialize_handle, ArchivedHandle, HandleIndex};
use crate::channel::Handle;
use crate::error::TakeError;

/// One end of a bidirectional byte stream; the other end can be sent in a message.
///
/// On one host a stream is one end of a unix socket pair, so reads and writes are plain system
/// calls with no libchan thread in between. Sending a `ByteStream` hands its end to the peer;
/// the local value keeps a duplicate that is closed when the message value is dropped.
///
/// Across a network (tcp, tls and ws sessions cannot pass descriptors) the receiver gets a
/// socket pair end of its own, and libchan pumps the bytes between the two ends over the
/// session, each direction with its own credit window, so a reader that stops reading stalls
/// the writer instead of filling memory. [`close_write`](ByteStream::close_write) on either end
/// makes the other read EOF, as on one host (docs/PROTOCOL.md section 5.6).
///
/// ```
/// use std::io::{Read, Write};
/// let (mut a, mut b) = libchan::ByteStream::pair().unwrap();
/// a.write_all("héllo".as_bytes()).unwrap();
/// drop(a);
/// let mut s = String::new();
/// b.read_to_string(&mut s).unwrap();
/// assert_eq!(s, "héllo");
/// ```
#[derive(Debug)]
pub struct ByteStream(UnixStream);

/// The archived form of a [`ByteStream`]: an index into its message's handles.
pub type ArchivedByteStream = ArchivedHandle<ByteStream>;

impl ByteStream {
    /// Creates a connected pair of streams.
    ///
    /// # Errors
    ///
    /// Fails when the system is out of descriptors.
    pub fn pair() -> io::Result<(ByteStream, ByteStream)> {
        let (a, b) = UnixStream::pair()?;
        Ok((ByteStream(a), ByteStream(b)))
    }

    /// Shuts down the writing half: the peer reads end-of-stream.
    ///
    /// # Errors
    ///
    /// Fails when the stream is already shut down or broken.
    pub fn close_write(&self) -> io::Result<()> {
        self.0.shutdown(std::net::Shutdown::Write)
    }

    /// Gives back the underlying socket.
    pub fn into_unix_stream(self) -> UnixStream {
        self.0
    }

    pub(crate) fn from_owned_fd(fd: OwnedFd) -> Self {
        Self(UnixStream::from(fd))
    }
}

impl Read for ByteStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for ByteStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl AsFd for ByteStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl HandleIndex for ByteStream {
    type Owned = ByteStream;

    #[allow(private_interfaces)]
    fn from_handle(handle: Handle) -> Result<ByteStream, (Handle, TakeError)> {
        match handle {
            Handle::Stream(fd) => Ok(ByteStream::from_owned_fd(fd)),
            other => Err((other, TakeError::Invalid)),
        }
    }
}

impl Archive for ByteStream {
    type Archived = ArchivedByteStream;
    type Resolver = u32;

    fn resolve(&self, resolver: u32, out: Place<Self::Archived>) {
        ArchivedHandle::resolve(resolver, out);
    }
}

impl<S: Fallible + ?Sized> Serialize<S> for ByteStream
where
    S::Error: Source,
{
    fn serialize(&self, _: &mut S) -> Result<u32, S::Error> {
        let dup = self.0.as_fd().try_clone_to_owned().map_err(S::Error::new)?;
        serialize_handle(Handle::Stream(dup))
    }
}

impl<D: Fallible + ?Sized> Deserialize<ByteStream, D> for ArchivedByteStream
where
    D::Error: Source,
{
    fn deserialize(&self, _: &mut D) -> Result<ByteStream, D::Error> {
        deserialize_handle::<ByteStream, D::Error>(self.index())
    }
}
