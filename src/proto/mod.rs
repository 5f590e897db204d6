//! The libchan wire protocol as a sans-io state machine.
//!
//! Nothing in this module performs a system call or reads a clock: bytes and file descriptors
//! go in through `handle_*` methods, and frames, hellos and credit grants come out through
//! `poll_*` methods and plain encoders. The transport (`crate::transport`) owns the socket and
//! drives these machines; tests drive them from memory.
//!
//! The normative description of the format is `docs/PROTOCOL.md`; this module is its reference
//! implementation. The pieces:
//!
//! - [`handshake`]: the fixed 32-byte hello each side sends first, and the negotiated limits.
//! - [`frame`]: the 16-byte frame header, the frame kinds, handle descriptors, body parsers
//!   and encoders.
//! - [`decoder`]: turns a byte stream (with the fd batches that arrived alongside it) into
//!   frames, binding each fd batch to the frame that declares it.
//! - [`credit`]: per-channel, byte-counted flow control.
//!
//! # Invariants
//!
//! - Every byte a peer sends is parsed through one bounds-checked [`Reader`]; no index into
//!   peer data is unchecked, and nothing a peer sends can make this module panic.
//! - Errors are small `Copy` values with `'static` context ([`DecodeError`]); a machine that
//!   returned an error is poisoned and keeps returning it.
//! - No `unsafe` code.

#![forbid(unsafe_code)]

pub(crate) mod credit;
pub(crate) mod decoder;
pub(crate) mod frame;
pub(crate) mod handshake;

use std::fmt;

use frame::Kind;

/// Why a byte stream could not be decoded as libchan frames.
///
/// Every variant is a protocol violation by the peer: the session answers it with
/// `GOAWAY` (reason 1, protocol error) and closes. The value is `Copy` and carries only
/// numbers and `'static` strings, so it can be stored in a poisoned decoder and returned
/// again without allocation.
///
/// ```text
/// let err = DecodeError::UnknownKind(99);
/// assert_eq!(err.to_string(), "unknown frame kind 99");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// Fewer bytes than a field needs; `what` names the field.
    Truncated {
        /// The field that was cut short.
        what: &'static str,
    },
    /// The header's `len` exceeds the negotiated `max_frame`.
    FrameTooLarge {
        /// The declared body length.
        len: u32,
        /// The negotiated limit.
        max: u32,
    },
    /// A DATA frame's payload exceeds the negotiated `max_message`.
    MessageTooLarge {
        /// The payload (archive) length.
        len: u32,
        /// The negotiated limit.
        max: u32,
    },
    /// The header's `kind` byte names no known frame kind.
    UnknownKind(u8),
    /// The body length is not allowed for this kind of frame.
    BadBodyLength {
        /// The frame kind.
        kind: Kind,
        /// The declared body length.
        len: u32,
    },
    /// The channel id is 0 on a channel frame, or nonzero on a session frame.
    BadChannel {
        /// The frame kind.
        kind: Kind,
        /// The offending channel id.
        chan: u32,
    },
    /// A frame other than DATA declares file descriptors.
    FdsOnNonData {
        /// The frame kind.
        kind: Kind,
        /// The declared fd count.
        nfds: u16,
    },
    /// A DATA frame declares more than [`frame::MAX_HANDLES`] handle descriptors.
    TooManyHandles {
        /// The declared descriptor count.
        count: u32,
    },
    /// A frame declares, or one read delivered, more than [`frame::MAX_FDS`] descriptors.
    TooManyFds {
        /// The count that was too large.
        count: usize,
    },
    /// A handle descriptor is malformed; `what` says how.
    BadHandle {
        /// Index of the descriptor within its frame.
        index: u16,
        /// Which rule it broke.
        what: &'static str,
    },
    /// The number of FD and STREAM descriptors differs from the header's `nfds`.
    FdCountMismatch {
        /// The header's `nfds`.
        nfds: u16,
        /// FD + STREAM descriptors found in the body.
        handles: u16,
    },
    /// An OFFER or FORGET frame with offer id 0.
    BadOffer,
    /// A frame declaring `nfds` descriptors did not find exactly that many in the batch
    /// delivered with the read holding its first byte.
    MisboundFds {
        /// The header's `nfds`.
        nfds: u16,
        /// How many descriptors the matching batch held (0 if there was none).
        received: u16,
    },
    /// Descriptors arrived on a session that did not negotiate the `FDS` feature.
    FdsNotNegotiated {
        /// How many descriptors arrived.
        count: u16,
    },
    /// A read delivered descriptors that no frame starting in that read claimed.
    UnclaimedFds {
        /// How many descriptors were left over.
        count: u16,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { what } => write!(f, "truncated {what}"),
            Self::FrameTooLarge { len, max } => {
                write!(f, "frame body of {len} bytes exceeds max_frame {max}")
            }
            Self::MessageTooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds max_message {max}")
            }
            Self::UnknownKind(kind) => write!(f, "unknown frame kind {kind}"),
            Self::BadBodyLength { kind, len } => {
                write!(f, "{kind:?} frame with invalid body length {len}")
            }
            Self::BadChannel { kind, chan } => {
                write!(f, "{kind:?} frame on invalid channel {chan}")
            }
            Self::FdsOnNonData { kind, nfds } => {
                write!(f, "{kind:?} frame declares {nfds} file descriptors")
            }
            Self::TooManyHandles { count } => write!(f, "{count} handle descriptors in one frame"),
            Self::TooManyFds { count } => {
                write!(f, "{count} file descriptors in one frame or read")
            }
            Self::BadHandle { index, what } => write!(f, "handle descriptor {index}: {what}"),
            Self::FdCountMismatch { nfds, handles } => write!(
                f,
                "frame declares {nfds} file descriptors but carries {handles} fd handles"
            ),
            Self::BadOffer => f.write_str("OFFER or FORGET frame with offer id 0"),
            Self::MisboundFds { nfds, received } => write!(
                f,
                "frame declares {nfds} file descriptors but its read delivered {received}"
            ),
            Self::FdsNotNegotiated { count } => write!(
                f,
                "{count} file descriptors arrived but fd passing was not negotiated"
            ),
            Self::UnclaimedFds { count } => {
                write!(
                    f,
                    "{count} file descriptors arrived with no frame to claim them"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Whether `id` is a channel id the peer allocates (as opposed to one we allocate).
///
/// The side that connected allocates odd ids, the side that accepted even ids; 0 is never a
/// channel. The transport uses this to reject an OPEN or a SENDER/RECEIVER descriptor that
/// names an id the peer may not create.
///
/// ```text
/// assert!(id_is_peers(2, true)); // we connected: the peer's ids are even
/// assert!(!id_is_peers(0, true));
/// assert!(id_is_peers(1, false));
/// ```
pub(crate) fn id_is_peers(id: u32, we_connected: bool) -> bool {
    id != 0 && (id % 2 == 1) != we_connected
}

/// Allocates this side's channel ids: odd if it connected, even (from 2) if it accepted.
///
/// Ids are never reused within a session, so the allocator only counts up; after about two
/// billion channels it is exhausted and [`IdAllocator::next`] returns `None`.
///
/// ```text
/// let mut ids = IdAllocator::new(true);
/// assert_eq!(ids.next(), Some(1));
/// assert_eq!(ids.next(), Some(3));
/// ```
#[derive(Clone, Debug)]
pub(crate) struct IdAllocator {
    next: Option<u32>,
}

impl IdAllocator {
    /// An allocator for the side that connected (`true`: odd ids) or accepted (even ids).
    pub(crate) fn new(we_connected: bool) -> Self {
        Self {
            next: Some(if we_connected { 1 } else { 2 }),
        }
    }

    /// The next unused id, or `None` once the id space is exhausted.
    #[allow(clippy::should_implement_trait)] // not an iterator: ids are a finite resource
    pub(crate) fn next(&mut self) -> Option<u32> {
        let id = self.next?;
        self.next = id.checked_add(2);
        Some(id)
    }
}

/// The one bounds-checked cursor every parser in this module reads peer bytes through.
///
/// Each accessor either returns the next field and advances, or returns
/// [`DecodeError::Truncated`] naming the field, leaving the cursor where it was.
#[derive(Clone, Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `bytes`, starting at the first byte.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.bytes.len() {
            return Err(DecodeError::Truncated { what });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// Everything not yet read.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// The next byte.
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// The next little-endian `u16`.
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    /// The next little-endian `u32`.
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// The next little-endian `u64`.
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_parity() {
        // We connected: we own odd ids, the peer owns even ones.
        assert!(!id_is_peers(0, true));
        assert!(!id_is_peers(1, true));
        assert!(id_is_peers(2, true));
        assert!(id_is_peers(u32::MAX - 1, true));
        // We accepted: the peer owns odd ids.
        assert!(!id_is_peers(0, false));
        assert!(id_is_peers(1, false));
        assert!(!id_is_peers(2, false));
        assert!(id_is_peers(u32::MAX, false));
    }

    #[test]
    fn allocator_counts_by_two_and_runs_out() {
        let mut odd = IdAllocator::new(true);
        assert_eq!(
            (odd.next(), odd.next(), odd.next()),
            (Some(1), Some(3), Some(5))
        );
        let mut even = IdAllocator::new(false);
        assert_eq!((even.next(), even.next()), (Some(2), Some(4)));
        for id in [1, 3, 5] {
            assert!(id_is_peers(id, false));
        }

        let mut last = IdAllocator {
            next: Some(u32::MAX - 2),
        };
        assert_eq!(last.next(), Some(u32::MAX - 2));
        assert_eq!(last.next(), Some(u32::MAX));
        assert_eq!(last.next(), None);
        assert_eq!(last.next(), None);
        let mut last_even = IdAllocator {
            next: Some(u32::MAX - 1),
        };
        assert_eq!(last_even.next(), Some(u32::MAX - 1));
        assert_eq!(last_even.next(), None);
    }

    /// The type fingerprint of docs/PROTOCOL.md section 8.1 (implemented for real by
    /// `crate::message::fingerprint`), to check the document's test vectors.
    pub(crate) fn type_fingerprint(type_name: &str, size: u32, align: u32) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let bytes = type_name
            .bytes()
            .chain(size.to_le_bytes())
            .chain(align.to_le_bytes());
        bytes.fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
    }

    #[test]
    fn fingerprint_vectors() {
        // Vectors shared with docs/PROTOCOL.md, computed by an independent FNV-1a.
        assert_eq!(type_fingerprint("", 0, 0), 0xa8c7_f832_281a_39c5);
        assert_eq!(type_fingerprint("u32", 4, 4), 0xfc1c_e082_c667_a131);
        assert_eq!(
            type_fingerprint("alloc::string::String", 8, 4),
            0xfd19_2937_1943_91ca
        );
        assert_ne!(type_fingerprint("u32", 4, 4), type_fingerprint("u32", 4, 8));
        assert_ne!(type_fingerprint("u32", 4, 4), type_fingerprint("i32", 4, 4));
    }

    #[test]
    fn reader_is_bounds_checked() {
        let mut r = Reader::new(&[1, 2, 0, 3, 0, 0, 0]);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.u16("b"), Ok(2));
        assert_eq!(r.remaining(), 4);
        assert_eq!(r.u64("c"), Err(DecodeError::Truncated { what: "c" }));
        // A failed read does not advance.
        assert_eq!(r.u32("d"), Ok(3));
        assert_eq!(r.u8("e"), Err(DecodeError::Truncated { what: "e" }));
        assert_eq!(r.rest(), &[] as &[u8]);
    }
}
