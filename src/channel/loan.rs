//! `Loan`: raw bytes written straight into a channel's buffer, sent as a `Vec<u8>` message.
//!
//! On a shared-memory channel the loan is a ring record: the application writes its bytes
//! where the receiver will read them, and [`Loan::commit`] adds the few bytes that make them a
//! valid archive of a `Vec<u8>` (rkyv's `ArchivedVec<u8>` root: a relative pointer back to the
//! start and the length, after padding to 4). Elsewhere (in process, unix sockets) it is a
//! buffer sent on commit.

use std::ops::{Deref, DerefMut};

use super::handle::SendCore;
use super::inbox::{PushError, Wait};
use super::source::LoanSlot;
use super::Sender;
use crate::error::Error;
use crate::message::{Bytes, Packet};

/// Bytes lent by a `Sender<Vec<u8>>` to be written in place and sent with
/// [`commit`](Loan::commit); the receiver gets them as a `Vec<u8>` message.
///
/// Dropping a loan without committing it sends nothing. While a loan on a shared-memory
/// channel is open, the receiver stops at it (messages sent behind it wait), so commit or drop
/// it promptly.
///
/// ```
/// let (tx, rx) = libchan::pipe::<Vec<u8>>();
/// let mut loan = tx.loan(5).unwrap();
/// loan.copy_from_slice(b"hello");
/// loan.commit().unwrap();
/// assert_eq!(rx.recv().unwrap().as_slice(), b"hello");
/// ```
pub struct Loan<'a> {
    sender: &'a Sender<Vec<u8>>,
    len: usize,
    space: Space,
}

enum Space {
    /// A ring record of the channel (at least `archive_len(len)` bytes), lent by the sender's
    /// outlet, which keeps it mapped while the loan borrows the sender.
    Slot(LoanSlot),
    /// A buffer of our own, sent on commit.
    Buffer(Bytes),
    /// Committed or given back.
    Done,
}

/// The archive length of a `Vec<u8>` of `len` bytes: the bytes, padding to 4, then the 8-byte
/// root (pointer_width_32).
fn archive_len(len: usize) -> usize {
    len.next_multiple_of(4) + 8
}

/// Writes the `ArchivedVec<u8>` root (and the padding before it) after `len` data bytes at
/// `base`, which has room for `archive_len(len)` bytes.
///
/// # Safety
///
/// `base` is valid for writes of `archive_len(len)` bytes and nothing references them.
unsafe fn write_root(base: *mut u8, len: usize) {
    let root = len.next_multiple_of(4);
    let mut tail = [0u8; 11];
    let pad = root - len;
    // The relative pointer points back from the root to offset 0: `-root`. Both fit 32 bits:
    // `len` is at most a ring's half or `MAX_LOCAL_MESSAGE`, below 2^31.
    tail[pad..pad + 4].copy_from_slice(&(-(root as i32)).to_le_bytes());
    tail[pad + 4..pad + 8].copy_from_slice(&(len as u32).to_le_bytes());
    // SAFETY: the caller's contract; `pad + 8 <= 11` bytes from `base + len` end exactly at
    // `base + archive_len(len)`.
    unsafe { std::ptr::copy_nonoverlapping(tail.as_ptr(), base.add(len), pad + 8) };
}

impl Sender<Vec<u8>> {
    /// Reserves `len` bytes to write in place, waiting for room; send them with
    /// [`Loan::commit`].
    ///
    /// # Errors
    ///
    /// [`Error::Disconnected`] when the receiving side is gone, [`Error::TooLarge`] when `len`
    /// exceeds what one message may carry.
    pub fn loan(&self, len: usize) -> Result<Loan<'_>, Error> {
        let total = archive_len(len);
        if total > self.core.max_message() || len > i32::MAX as usize / 2 {
            return Err(Error::TooLarge {
                size: total,
                limit: self.core.max_message(),
            });
        }
        if self.core.is_disconnected() {
            return Err(Error::Disconnected);
        }
        let space = match &self.core {
            SendCore::Remote(out) => match out.loan(total, Wait::Forever) {
                Some(Ok(slot)) => Space::Slot(slot),
                Some(Err(_)) => return Err(Error::Disconnected),
                None => Space::Buffer(zeroed(len)),
            },
            SendCore::Local(_) => Space::Buffer(zeroed(len)),
        };
        Ok(Loan {
            sender: self,
            len,
            space,
        })
    }
}

fn zeroed(len: usize) -> Bytes {
    let mut b = Bytes::with_capacity(archive_len(len));
    b.resize(len, 0);
    b
}

impl Loan<'_> {
    /// Sends the bytes as one `Vec<u8>` message.
    ///
    /// # Errors
    ///
    /// [`Error::Disconnected`] when the receiving side went away.
    pub fn commit(mut self) -> Result<(), Error> {
        match std::mem::replace(&mut self.space, Space::Done) {
            Space::Slot(slot) => {
                // SAFETY: the slot holds at least `archive_len(len)` writable bytes (it was
                // reserved that large) that nobody references or reads before the commit.
                unsafe { write_root(slot.at, self.len) };
                if let SendCore::Remote(out) = &self.sender.core {
                    out.commit_loan(slot, archive_len(self.len));
                }
                Ok(())
            }
            Space::Buffer(mut bytes) => {
                bytes.resize(archive_len(self.len), 0);
                // SAFETY: `bytes` is our own buffer of exactly `archive_len(len)` bytes, and no
                // reference to it lives across the call.
                unsafe { write_root(bytes.as_mut_ptr(), self.len) };
                let packet = Packet {
                    bytes,
                    handles: Vec::new(),
                };
                match self.sender.core.send(packet, Wait::Forever) {
                    Ok(()) => Ok(()),
                    Err(PushError::Disconnected | PushError::Full | PushError::Timeout) => {
                        Err(Error::Disconnected)
                    }
                }
            }
            Space::Done => unreachable!("a loan is committed once"),
        }
    }
}

impl Drop for Loan<'_> {
    /// A loan dropped uncommitted gives its space back: the receiver skips it.
    fn drop(&mut self) {
        if let Space::Slot(slot) = std::mem::replace(&mut self.space, Space::Done) {
            if let SendCore::Remote(out) = &self.sender.core {
                out.abandon_loan(slot);
            }
        }
    }
}

impl Deref for Loan<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.space {
            Space::Slot(slot) => {
                // SAFETY: the slot's first `len` bytes are writable and readable, unread by the
                // receiver until commit, and only reachable through this loan.
                unsafe { std::slice::from_raw_parts(slot.at, self.len) }
            }
            Space::Buffer(b) => &b[..self.len],
            Space::Done => &[],
        }
    }
}

impl DerefMut for Loan<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.space {
            Space::Slot(slot) => {
                // SAFETY: as in `deref`, and `&mut self` makes this the only reference. The
                // receiver (a same-uid libchan peer) does not touch an uncommitted record.
                unsafe { std::slice::from_raw_parts_mut(slot.at, len) }
            }
            Space::Buffer(b) => &mut b[..len],
            Space::Done => &mut [],
        }
    }
}

impl std::fmt::Debug for Loan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loan").field("len", &self.len).finish()
    }
}
