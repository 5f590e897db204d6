//! Large messages on a shared-memory session: the archive in a sealed memfd of its own.
//!
//! A message larger than half its channel's ring cannot be a ring record. The sender writes
//! its archive into a new memfd, seals it (size and contents: `F_SEAL_WRITE`, so nobody can
//! change it any more, the sender included) and sends the memfd in a BLOB frame, behind a tag
//! in the ring that keeps the message's place. The receiver maps the memfd read-only and reads
//! the message in place: one copy into the memfd, none on the way out, and since the contents
//! are sealed, validating them in place is sound even for a peer that is not trusted.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};

use crate::message::{Lender, Lent};
use crate::sys::{memfd, seal, seals, size, Seal};

/// Writes `bytes` into a new memfd and seals it against any change.
pub(crate) fn make(bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = memfd("libchan-blob", bytes.len())?;
    let mut done = 0;
    while done < bytes.len() {
        // `pwrite` through the fd, not a mapping: `F_SEAL_WRITE` refuses while any writable
        // mapping exists.
        match rustix::io::pwrite(&fd, &bytes[done..], done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    seal(fd.as_fd(), Seal::Immutable)?;
    Ok(fd)
}

/// A received blob, mapped read-only; unmapped when the last message view of it drops.
pub(crate) struct Blob {
    map: Mmap,
}

impl Blob {
    /// Maps `fd` after checking that it is sealed against every change and holds at least
    /// `len` bytes.
    pub(crate) fn map(fd: &OwnedFd, len: usize) -> io::Result<Arc<Blob>> {
        let s = seals(fd.as_fd())?;
        if !s.immutable() || !s.size_fixed() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "large-message memfd is not sealed against writes and resizing",
            ));
        }
        let actual = size(fd.as_fd())?;
        if actual < len as u64 || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("large-message memfd has {actual} bytes, the frame says {len}"),
            ));
        }
        // SAFETY: `Mmap` requires that the file not change while mapped (a `&[u8]` is formed
        // over it): the memfd is sealed against writes, shrinking and growing (checked above),
        // and seals cannot be removed, so no process can change or truncate it.
        let map = unsafe { MmapOptions::new().len(len).map(fd) }?;
        Ok(Arc::new(Blob { map }))
    }

    /// The archive, lent for reading in place until the view drops.
    pub(crate) fn lend(self: &Arc<Self>) -> Lent {
        let lender: Arc<dyn Lender> = self.clone();
        // SAFETY: the mapping is page-aligned (so 16-byte aligned), `map.len()` bytes long,
        // immutable (sealed), and lives as long as `lender`, which the `Lent` holds.
        unsafe { Lent::new(self.map.as_ptr(), self.map.len(), 0, lender) }
    }
}

impl Lender for Blob {
    /// Nothing to give back: the mapping goes when the last `Arc` does.
    fn give_back(&self, _token: u64) {}
}
