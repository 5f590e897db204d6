//! Anonymous shared memory files (`memfd_create`) and their seals.
//!
//! A memfd has no name in any file system: when the last fd and mapping go, the memory goes, so a
//! crashed process leaves nothing behind in `/dev/shm`. The same-host transport puts its rings in
//! one (mapped by both peers, see `ring::shm`) and sends messages too large for a ring in others.
//!
//! # Seals and trust
//!
//! A memfd received from a peer is hostile until its seals say otherwise. Seals can only be
//! added, never removed, so a seal seen once holds for the life of the file:
//!
//! - Without `F_SEAL_SHRINK`, the peer can truncate the file under our mapping and every access
//!   past the new end raises SIGBUS. [`seal`] with [`Seal::Size`] fixes the size; a receiver checks
//!   [`Seals::size_fixed`] *before* it trusts [`size`] and maps the file.
//! - Without `F_SEAL_WRITE`, the peer can change bytes we are validating or reading in place.
//!   [`Seal::Immutable`] adds it. `F_SEAL_FUTURE_WRITE` is not enough for this purpose: it leaves
//!   the writable mappings that exist when it is applied working, so a writer that sealed with it
//!   could still write. `F_SEAL_WRITE` instead fails (`EBUSY`) while any writable shared mapping
//!   exists, which is what makes it a promise: the writer unmaps first, then seals.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags};

/// Which seals [`seal`] adds.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seal {
    /// `F_SEAL_SHRINK | F_SEAL_GROW`: the size is fixed; contents stay writable. For rings,
    /// which both peers write.
    Size,
    /// `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL`: size and contents are fixed
    /// and no further seal can be added. For large messages sent out of line, which the receiver
    /// validates in place. Fails with `EBUSY` while any writable shared mapping of the file
    /// exists (in any process): unmap first.
    Immutable,
}

/// The seals a memfd carries, as read by [`seals`].
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seals(SealFlags);

#[cfg_attr(not(test), allow(dead_code))]
impl Seals {
    /// Neither shrinking nor growing is possible any more: [`size`] is final.
    pub(crate) fn size_fixed(self) -> bool {
        self.0.contains(SealFlags::SHRINK | SealFlags::GROW)
    }

    /// The size is fixed and no process can write the contents any more (`F_SEAL_WRITE`), so
    /// bytes validated once stay valid. `F_SEAL_FUTURE_WRITE` alone does not count: see the
    /// module docs.
    pub(crate) fn immutable(self) -> bool {
        self.size_fixed() && self.0.contains(SealFlags::WRITE)
    }

    /// No seal can be added any more (`F_SEAL_SEAL`).
    pub(crate) fn sealed(self) -> bool {
        self.0.contains(SealFlags::SEAL)
    }
}

/// Creates a memfd of `len` zero bytes, close-on-exec and sealable; `name` shows up only in
/// `/proc/PID/fd` (as `memfd:NAME`), for debugging.
///
/// # Errors
///
/// `InvalidInput` if `name` contains a NUL byte or is longer than the kernel allows (249 bytes);
/// otherwise the errors of `memfd_create(2)` and `ftruncate(2)` (e.g. `EMFILE`, `ENOMEM`).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    // `usize` is at most 64 bits on every target Rust supports.
    rustix::fs::ftruncate(&fd, len as u64)?;
    Ok(fd)
}

/// Adds the seals `which` describes to the memfd `fd`. Adding a seal that is already present
/// is not an error.
///
/// # Errors
///
/// `EPERM` if the file was not created with `MFD_ALLOW_SEALING` or already carries
/// `F_SEAL_SEAL`; `EBUSY` for [`Seal::Immutable`] while a writable shared mapping exists;
/// `EINVAL` if `fd` is not a memfd (or other sealable file).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn seal(fd: BorrowedFd<'_>, which: Seal) -> io::Result<()> {
    let size = SealFlags::SHRINK | SealFlags::GROW;
    let flags = match which {
        Seal::Size => size,
        Seal::Immutable => size | SealFlags::WRITE | SealFlags::SEAL,
    };
    rustix::fs::fcntl_add_seals(fd, flags)?;
    Ok(())
}

/// The seals `fd` carries now. Seals are never removed, so what this returns stays true.
///
/// # Errors
///
/// `EINVAL` if `fd` is not a memfd (or other sealable file): a peer that sends something else
/// where a memfd is expected gets an error, not trust.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn seals(fd: BorrowedFd<'_>) -> io::Result<Seals> {
    Ok(Seals(rustix::fs::fcntl_get_seals(fd)?))
}

/// The size of the file behind `fd`, from `fstat(2)`. Only final once [`Seals::size_fixed`].
///
/// # Errors
///
/// The errors of `fstat(2)` (`EBADF`, in practice, never for a valid `BorrowedFd`).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let stat = rustix::fs::fstat(fd)?;
    // A regular file's size is never negative; anything else is not a memfd.
    u64::try_from(stat.st_size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use rustix::io::Errno;

    use super::*;

    #[test]
    fn create_has_size_and_no_seals() {
        let fd = memfd("libchan-test", 12_345).unwrap();
        assert_eq!(size(fd.as_fd()).unwrap(), 12_345);
        let s = seals(fd.as_fd()).unwrap();
        assert!(!s.size_fixed() && !s.immutable() && !s.sealed());
        // Close-on-exec, so a spawned child does not inherit it by accident.
        let flags = rustix::io::fcntl_getfd(&fd).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        // Still resizable before sealing.
        rustix::fs::ftruncate(&fd, 100).unwrap();
        assert_eq!(size(fd.as_fd()).unwrap(), 100);
    }

    #[test]
    fn size_seal_stops_resizing_but_not_writing() {
        let fd = memfd("libchan-test", 4096).unwrap();
        seal(fd.as_fd(), Seal::Size).unwrap();
        seal(fd.as_fd(), Seal::Size).unwrap(); // idempotent
        let s = seals(fd.as_fd()).unwrap();
        assert!(s.size_fixed());
        assert!(!s.immutable() && !s.sealed());

        assert_eq!(rustix::fs::ftruncate(&fd, 10), Err(Errno::PERM));
        assert_eq!(rustix::fs::ftruncate(&fd, 8192), Err(Errno::PERM));
        assert_eq!(size(fd.as_fd()).unwrap(), 4096);

        assert_eq!(rustix::io::pwrite(&fd, b"still writable", 0).unwrap(), 14);
    }

    #[test]
    fn immutable_seal_stops_writes_and_further_seals() {
        let fd = memfd("libchan-test", 64).unwrap();
        assert_eq!(rustix::io::pwrite(&fd, b"payload", 0).unwrap(), 7);
        seal(fd.as_fd(), Seal::Immutable).unwrap();
        let s = seals(fd.as_fd()).unwrap();
        assert!(s.size_fixed() && s.immutable() && s.sealed());

        assert_eq!(rustix::io::pwrite(&fd, b"x", 0), Err(Errno::PERM));
        let mut buf = [0u8; 7];
        assert_eq!(rustix::io::pread(&fd, &mut buf, 0).unwrap(), 7);
        assert_eq!(&buf, b"payload");
        // F_SEAL_SEAL: nothing more can be added (even a seal already present).
        assert!(seal(fd.as_fd(), Seal::Size).is_err());
    }

    #[test]
    fn immutable_seal_is_refused_while_a_writable_mapping_exists() {
        let fd = memfd("libchan-test", 4096).unwrap();
        let map = memmap2::MmapOptions::new().len(4096).map_raw(&fd).unwrap();
        let err = seal(fd.as_fd(), Seal::Immutable).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(Errno::BUSY.raw_os_error()));
        assert!(!seals(fd.as_fd()).unwrap().immutable());
        drop(map);
        seal(fd.as_fd(), Seal::Immutable).unwrap();
    }

    #[test]
    fn non_memfd_has_no_seals() {
        let (reader, _writer) = rustix::pipe::pipe().unwrap();
        assert!(seals(reader.as_fd()).is_err());
        assert!(seal(reader.as_fd(), Seal::Size).is_err());
    }

    #[test]
    fn bad_names_are_errors() {
        assert!(memfd("nul\0inside", 16).is_err());
        assert!(memfd(&"x".repeat(300), 16).is_err());
    }
}
