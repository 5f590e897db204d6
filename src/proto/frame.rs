//! Frames: the 16-byte header, the frame kinds, handle descriptors, body parsers and encoders.
//!
//! Layout (all integers little endian; `docs/PROTOCOL.md` is normative):
//!
//! ```text
//! 0      4     5      6      8      12     16
//! | len  | kind| flags| nfds | chan | arg  | body (len bytes) ...
//! ```
//!
//! [`Header::parse`] enforces every rule that can be checked from the header alone (kind,
//! body length per kind, channel id 0 or not, fds only on DATA). The negotiated size limits
//! are checked by the decoder, which knows them. Body parsers ([`parse_open`], [`parse_data`],
//! [`parse_reset`], [`parse_goaway`], [`parse_ping`]) take a header that already passed
//! [`Header::parse`] and validate the rest.
//!
//! Encoders append to a `Vec<u8>` so a whole batch of frames can go out in one write; DATA is
//! encoded in two steps ([`encode_data`] writes the header and descriptors, the caller then
//! serializes the archive straight after) so the payload is never copied.

use std::borrow::Cow;

use super::{DecodeError, Reader};

/// Length of a frame header in bytes.
pub(crate) const HEADER_LEN: usize = 16;
/// Length of one handle descriptor in bytes.
pub(crate) const HANDLE_LEN: usize = 16;
/// Most handle descriptors one DATA frame may carry.
pub(crate) const MAX_HANDLES: u32 = 1024;
/// Most file descriptors one frame may carry (Linux's `SCM_MAX_FD` is 253).
pub(crate) const MAX_FDS: u16 = 253;
/// Longest diagnostic text in a RESET or GOAWAY body, in bytes.
pub(crate) const MAX_TEXT: usize = 256;

/// The kind byte of a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(crate) enum Kind {
    /// The writer opens `chan` and will send on it; body: `u64` type fingerprint.
    Open = 1,
    /// One message on `chan`; `arg` handle descriptors, then the archive.
    Data = 2,
    /// The writer will send no more on `chan`.
    Close = 3,
    /// The receiver of `chan` refuses or drops it; `arg` is a [`ResetReason`].
    Reset = 4,
    /// The receiver of `chan` grants `arg` more bytes of credit.
    Credit = 5,
    /// Liveness probe; body: 8 opaque bytes.
    Ping = 6,
    /// Answer to a PING, echoing its body.
    Pong = 7,
    /// The writer is closing the session; `arg` is a [`GoAwayReason`].
    GoAway = 8,
    /// Shared-memory sessions only: from now on the writer sends `chan`'s messages through the
    /// ring in the one memfd this frame carries; body: `u64` ring capacity in bytes.
    Ring = 9,
    /// Shared-memory sessions only: `chan`'s next message is the archive in the one sealed
    /// memfd this frame carries; body: `u64` archive length.
    Blob = 10,
    /// Shared-memory sessions only: the writer offers a ring, the one memfd this frame carries,
    /// for a channel its peer will hand it a sender of (a SENDER_RING descriptor); `arg` is the
    /// offer's id (nonzero), body: `u64` ring capacity in bytes. Names no channel.
    Offer = 11,
    /// Shared-memory sessions only, written by the sender of `chan`: the process at the other
    /// end of the one socket this frame carries will feed `chan` too, over a session of its own
    /// (a *direct path*); `arg` is the introduction's token, body: `u64` type fingerprint.
    Intro = 12,
    /// The first frame on a session made from an INTRO's socket: the writer opens `chan` as
    /// one more sender of the channel introduced with token `arg`; body: `u64` fingerprint.
    Join = 13,
    /// Shared-memory sessions only, written by the side that binds the peer's offers: it will
    /// not bind offer `arg` again, so the peer may unmap the ring it keeps for it. Empty body,
    /// names no channel.
    Forget = 14,
}

impl Kind {
    /// The kind with wire value `byte`, if any.
    pub(crate) fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Open,
            2 => Self::Data,
            3 => Self::Close,
            4 => Self::Reset,
            5 => Self::Credit,
            6 => Self::Ping,
            7 => Self::Pong,
            8 => Self::GoAway,
            9 => Self::Ring,
            10 => Self::Blob,
            11 => Self::Offer,
            12 => Self::Intro,
            13 => Self::Join,
            14 => Self::Forget,
            _ => return None,
        })
    }

    /// Whether frames of this kind name a channel (nonzero `chan`) rather than the session.
    pub(crate) fn is_channel_frame(self) -> bool {
        !matches!(
            self,
            Self::Ping | Self::Pong | Self::GoAway | Self::Offer | Self::Forget
        )
    }
}

/// A frame header.
///
/// ```text
/// let h = Header::new(Kind::Credit, 3, 4096, 0);
/// assert_eq!(Header::parse(&h.encode()), Ok(h));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Body length in bytes, not counting the header.
    pub(crate) len: u32,
    /// What the frame means.
    pub(crate) kind: Kind,
    /// Reserved flag bits: written as 0, ignored on receipt.
    pub(crate) flags: u8,
    /// File descriptors attached to this frame (DATA only).
    pub(crate) nfds: u16,
    /// Channel id (0 for PING, PONG, GOAWAY).
    pub(crate) chan: u32,
    /// Kind-specific argument.
    pub(crate) arg: u32,
}

impl Header {
    /// A header with no flags and no fds.
    pub(crate) fn new(kind: Kind, chan: u32, arg: u32, len: u32) -> Self {
        Self {
            len,
            kind,
            flags: 0,
            nfds: 0,
            chan,
            arg,
        }
    }

    /// The 16 wire bytes of this header.
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[0..4].copy_from_slice(&self.len.to_le_bytes());
        out[4] = self.kind as u8;
        out[5] = self.flags;
        out[6..8].copy_from_slice(&self.nfds.to_le_bytes());
        out[8..12].copy_from_slice(&self.chan.to_le_bytes());
        out[12..16].copy_from_slice(&self.arg.to_le_bytes());
        out
    }

    /// Parses and validates a header, without the negotiated size limits.
    ///
    /// # Errors
    ///
    /// [`DecodeError::UnknownKind`], [`DecodeError::BadBodyLength`] (OPEN, PING and PONG need
    /// exactly 8 bytes, CLOSE and CREDIT 0, RESET and GOAWAY at most [`MAX_TEXT`], DATA at
    /// least `16 * arg`), [`DecodeError::BadChannel`], [`DecodeError::FdsOnNonData`],
    /// [`DecodeError::TooManyHandles`] and [`DecodeError::TooManyFds`].
    pub(crate) fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let len = r.u32("frame length")?;
        let kind_byte = r.u8("frame kind")?;
        let flags = r.u8("frame flags")?;
        let nfds = r.u16("frame fd count")?;
        let chan = r.u32("frame channel")?;
        let arg = r.u32("frame argument")?;
        let kind = Kind::from_u8(kind_byte).ok_or(DecodeError::UnknownKind(kind_byte))?;

        let len_ok = match kind {
            Kind::Open
            | Kind::Ping
            | Kind::Pong
            | Kind::Ring
            | Kind::Blob
            | Kind::Offer
            | Kind::Intro
            | Kind::Join => len == 8,
            Kind::Close | Kind::Credit | Kind::Forget => len == 0,
            Kind::Reset | Kind::GoAway => len as usize <= MAX_TEXT,
            // `arg <= MAX_HANDLES` is checked below, so this cannot overflow.
            Kind::Data => u64::from(len) >= u64::from(arg) * HANDLE_LEN as u64,
        };
        if kind == Kind::Data && arg > MAX_HANDLES {
            return Err(DecodeError::TooManyHandles { count: arg });
        }
        if !len_ok {
            return Err(DecodeError::BadBodyLength { kind, len });
        }
        if (chan != 0) != kind.is_channel_frame() {
            return Err(DecodeError::BadChannel { kind, chan });
        }
        match kind {
            // Exactly the memfd, and no handle count.
            Kind::Ring | Kind::Blob if nfds != 1 || arg != 0 => {
                return Err(DecodeError::FdCountMismatch {
                    nfds,
                    handles: arg as u16,
                });
            }
            // Exactly the memfd (OFFER) or the socket (INTRO); `arg` is the offer's id or the
            // introduction's token.
            Kind::Offer | Kind::Intro if nfds != 1 => {
                return Err(DecodeError::FdCountMismatch { nfds, handles: 1 });
            }
            Kind::Offer | Kind::Forget if arg == 0 => return Err(DecodeError::BadOffer),
            Kind::Ring | Kind::Blob | Kind::Offer | Kind::Intro => {}
            _ if nfds != 0 && kind != Kind::Data => {
                return Err(DecodeError::FdsOnNonData { kind, nfds });
            }
            _ if nfds > MAX_FDS => {
                return Err(DecodeError::TooManyFds { count: nfds.into() });
            }
            // Every fd is named by an FD or STREAM descriptor.
            _ if u32::from(nfds) > arg => {
                return Err(DecodeError::FdCountMismatch {
                    nfds,
                    handles: arg as u16,
                });
            }
            _ => {}
        }
        Ok(Self {
            len,
            kind,
            flags,
            nfds,
            chan,
            arg,
        })
    }

    /// Total frame length on the wire: header plus body.
    pub(crate) fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }
}

/// What a handle descriptor in a DATA body transfers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(crate) enum HandleKind {
    /// A plain file descriptor; consumes the frame's next fd.
    Fd = 1,
    /// A byte stream; consumes the frame's next fd.
    Stream = 2,
    /// The reader gets a Sender on the new channel `chan` (data flows reader to writer).
    Sender = 3,
    /// The reader gets a Receiver on the new channel `chan` (data flows writer to reader).
    Receiver = 4,
    /// The reader gets a Sender into its own inbound channel `chan` from the writer.
    SenderLocal = 5,
    /// The reader gets a Sender into a channel of a third process, over a session of its own
    /// made on the frame's next fd (a socket); `chan` is the introduction's token.
    SenderDirect = 6,
    /// An fd or byte stream that crosses as bytes (sessions without fds): the reader gets one
    /// end of a socket pair whose bytes travel on two new channels, `chan` (writer to reader)
    /// and the one [`HandleDesc::pumped`] names (reader to writer). Consumes no fd.
    Pumped = 7,
    /// As SENDER, and the reader sends on `chan` through the ring it offered (an OFFER frame)
    /// under the id in the descriptor's `offer` field, instead of announcing a ring of its own.
    SenderRing = 8,
}

impl HandleKind {
    /// The kind with wire value `byte`, if any.
    pub(crate) fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Fd,
            2 => Self::Stream,
            3 => Self::Sender,
            4 => Self::Receiver,
            5 => Self::SenderLocal,
            6 => Self::SenderDirect,
            7 => Self::Pumped,
            8 => Self::SenderRing,
            _ => return None,
        })
    }

    /// Whether descriptors of this kind consume one of the frame's fds.
    pub(crate) fn takes_fd(self) -> bool {
        matches!(self, Self::Fd | Self::Stream | Self::SenderDirect)
    }

    /// Whether descriptors of this kind name a channel (a nonzero `chan`).
    fn names_channel(self) -> bool {
        matches!(
            self,
            Self::Sender | Self::Receiver | Self::SenderLocal | Self::Pumped | Self::SenderRing
        )
    }
}

/// One 16-byte handle descriptor from a DATA body.
///
/// ```text
/// let d = HandleDesc { kind: HandleKind::Receiver, chan: 5, fingerprint: 7, offer: 0 };
/// assert_eq!(HandleDesc::parse(&d.encode(), 0), Ok(d));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HandleDesc {
    /// What is transferred.
    pub(crate) kind: HandleKind,
    /// The channel named (0 for FD and STREAM).
    pub(crate) chan: u32,
    /// The channel's type fingerprint (0 for FD and STREAM). For PUMPED, bytes `[8..16]` of the
    /// descriptor hold other fields instead: see [`HandleDesc::pumped`].
    pub(crate) fingerprint: u64,
    /// SENDER_RING only: the id of the reader's ring offer the channel takes (nonzero, below
    /// 2^24, in bytes `[1..4]`); 0 for every other kind.
    pub(crate) offer: u32,
}

/// What the reader of a PUMPED descriptor gets: the handle kind the writer's fd had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PumpedAs {
    /// An [`Fd`](crate::Fd) (wire value 1, as the FD handle kind).
    Fd,
    /// A [`ByteStream`](crate::ByteStream) (wire value 2, as the STREAM handle kind).
    Stream,
}

/// The two channels and the handle kind of a PUMPED descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pumped {
    /// The channel the descriptor's writer sends the fd's bytes on (its reader receives).
    pub(crate) to_reader: u32,
    /// The channel the descriptor's reader sends its end's bytes on (its writer receives).
    pub(crate) to_writer: u32,
    /// What the reader gets.
    pub(crate) kind: PumpedAs,
}

impl HandleDesc {
    /// A descriptor for a plain fd.
    pub(crate) fn fd() -> Self {
        Self {
            kind: HandleKind::Fd,
            chan: 0,
            fingerprint: 0,
            offer: 0,
        }
    }

    /// A PUMPED descriptor: `chan` is `p.to_reader`; bytes `[8..12]` of the descriptor hold
    /// `p.to_writer`, byte 12 the handle kind the reader gets (1 FD, 2 STREAM), bytes
    /// `[13..16]` are zero.
    pub(crate) fn pumped(p: Pumped) -> Self {
        let kind: u64 = match p.kind {
            PumpedAs::Fd => HandleKind::Fd as u64,
            PumpedAs::Stream => HandleKind::Stream as u64,
        };
        Self {
            kind: HandleKind::Pumped,
            chan: p.to_reader,
            fingerprint: u64::from(p.to_writer) | kind << 32,
            offer: 0,
        }
    }

    /// The fields of a PUMPED descriptor; `None` for other kinds or when its fields break the
    /// rules [`parse`](Self::parse) checks.
    pub(crate) fn as_pumped(&self) -> Option<Pumped> {
        if self.kind != HandleKind::Pumped {
            return None;
        }
        let to_writer = self.fingerprint as u32;
        let kind = match self.fingerprint >> 32 {
            1 => PumpedAs::Fd,
            2 => PumpedAs::Stream,
            _ => return None,
        };
        if self.chan == 0 || to_writer == 0 || to_writer == self.chan {
            return None;
        }
        Some(Pumped {
            to_reader: self.chan,
            to_writer,
            kind,
        })
    }

    /// The 16 wire bytes of this descriptor.
    pub(crate) fn encode(&self) -> [u8; HANDLE_LEN] {
        let mut out = [0; HANDLE_LEN];
        out[0] = self.kind as u8;
        out[1..4].copy_from_slice(&self.offer.to_le_bytes()[..3]);
        out[4..8].copy_from_slice(&self.chan.to_le_bytes());
        out[8..16].copy_from_slice(&self.fingerprint.to_le_bytes());
        out
    }

    /// Parses and validates descriptor number `index` of a frame.
    ///
    /// # Errors
    ///
    /// [`DecodeError::BadHandle`] for an unknown kind, nonzero reserved bytes, a channel or
    /// fingerprint on FD/STREAM, channel 0 on SENDER/RECEIVER/SENDER_LOCAL/SENDER_RING, an
    /// offer id of 0 on SENDER_RING or anything but 0 elsewhere, or a PUMPED
    /// descriptor whose fields break [`HandleDesc::pumped`]'s rules.
    pub(crate) fn parse(bytes: &[u8], index: u16) -> Result<Self, DecodeError> {
        let bad = |what| DecodeError::BadHandle { index, what };
        let mut r = Reader::new(bytes);
        let kind = r.u8("handle kind")?;
        let reserved = r.array::<3>("handle reserved bytes")?;
        let chan = r.u32("handle channel")?;
        let fingerprint = r.u64("handle fingerprint")?;
        let kind = HandleKind::from_u8(kind).ok_or(bad("unknown handle kind"))?;
        let offer = u32::from_le_bytes([reserved[0], reserved[1], reserved[2], 0]);
        if (offer != 0) != (kind == HandleKind::SenderRing) {
            return Err(bad(
                "offer id must be nonzero on SENDER_RING and reserved bytes zero elsewhere",
            ));
        }
        if matches!(kind, HandleKind::Fd | HandleKind::Stream) && (chan != 0 || fingerprint != 0) {
            return Err(bad("fd handle names a channel"));
        }
        if kind.names_channel() && chan == 0 {
            return Err(bad("channel handle names channel 0"));
        }
        let desc = Self {
            kind,
            chan,
            fingerprint,
            offer,
        };
        if kind == HandleKind::Pumped && desc.as_pumped().is_none() {
            return Err(bad(
                "pumped handle needs two distinct nonzero channels and kind 1 or 2",
            ));
        }
        Ok(desc)
    }
}

/// The validated handle descriptors of a DATA frame, as an iterator.
///
/// Produced by [`parse_data`], which checked every descriptor, so iteration cannot fail.
#[derive(Clone, Debug)]
pub(crate) struct HandleDescs<'a> {
    bytes: &'a [u8],
}

impl Iterator for HandleDescs<'_> {
    type Item = HandleDesc;

    fn next(&mut self) -> Option<HandleDesc> {
        if self.bytes.len() < HANDLE_LEN {
            return None;
        }
        let (head, tail) = self.bytes.split_at(HANDLE_LEN);
        self.bytes = tail;
        // Invariant: `parse_data` validated every descriptor in `bytes` before building us.
        Some(HandleDesc::parse(head, 0).expect("handle descriptors were validated by parse_data"))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.bytes.len() / HANDLE_LEN;
        (n, Some(n))
    }
}

impl ExactSizeIterator for HandleDescs<'_> {}

/// Why a RESET was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResetReason {
    /// The receiver expects a different message type (fingerprint mismatch).
    TypeMismatch = 1,
    /// The receiving end was dropped.
    ReceiverGone = 2,
    /// The receiver already tracks `max_channels` channels.
    TooManyChannels = 3,
    /// The channel is invalid for another reason; unknown codes read as this.
    Invalid = 4,
}

impl ResetReason {
    /// The reason for wire code `code`; unknown codes map to [`ResetReason::Invalid`].
    pub(crate) fn from_code(code: u32) -> Self {
        match code {
            1 => Self::TypeMismatch,
            2 => Self::ReceiverGone,
            3 => Self::TooManyChannels,
            _ => Self::Invalid,
        }
    }
}

/// Why a GOAWAY was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GoAwayReason {
    /// Orderly shutdown.
    Normal = 0,
    /// The peer violated the protocol; unknown codes read as this.
    ProtocolError = 1,
    /// The peer exceeded a negotiated limit.
    Limits = 2,
}

impl GoAwayReason {
    /// The reason for wire code `code`; unknown codes map to [`GoAwayReason::ProtocolError`].
    pub(crate) fn from_code(code: u32) -> Self {
        match code {
            0 => Self::Normal,
            2 => Self::Limits,
            _ => Self::ProtocolError,
        }
    }
}

/// The type fingerprint in an OPEN body.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] unless the body is exactly 8 bytes.
pub(crate) fn parse_open(body: &[u8]) -> Result<u64, DecodeError> {
    exact_u64(Kind::Open, body)
}

/// The opaque 8 bytes of a PING or PONG body, as a little-endian `u64`.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] unless the body is exactly 8 bytes.
pub(crate) fn parse_ping(body: &[u8]) -> Result<u64, DecodeError> {
    exact_u64(Kind::Ping, body)
}

/// The ring capacity in a RING body.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] unless the body is exactly 8 bytes.
pub(crate) fn parse_ring(body: &[u8]) -> Result<u64, DecodeError> {
    exact_u64(Kind::Ring, body)
}

/// The archive length in a BLOB body.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] unless the body is exactly 8 bytes.
pub(crate) fn parse_blob(body: &[u8]) -> Result<u64, DecodeError> {
    exact_u64(Kind::Blob, body)
}

/// The type fingerprint in an INTRO body.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] unless the body is exactly 8 bytes.
pub(crate) fn parse_intro(body: &[u8]) -> Result<u64, DecodeError> {
    exact_u64(Kind::Intro, body)
}

/// The type fingerprint in a JOIN body.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] unless the body is exactly 8 bytes.
pub(crate) fn parse_join(body: &[u8]) -> Result<u64, DecodeError> {
    exact_u64(Kind::Join, body)
}

/// Splits a DATA body into its validated handle descriptors and the archive payload.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] if the body is shorter than `16 * header.arg`,
/// [`DecodeError::BadHandle`] for a malformed descriptor, and
/// [`DecodeError::FdCountMismatch`] if the FD and STREAM descriptors do not number
/// `header.nfds`.
pub(crate) fn parse_data<'a>(
    header: &Header,
    body: &'a [u8],
) -> Result<(HandleDescs<'a>, &'a [u8]), DecodeError> {
    if header.arg > MAX_HANDLES {
        return Err(DecodeError::TooManyHandles { count: header.arg });
    }
    let count = header.arg as usize;
    let mut r = Reader::new(body);
    let descs = r
        .take(count * HANDLE_LEN, "handle descriptors")
        .map_err(|_| DecodeError::BadBodyLength {
            kind: Kind::Data,
            len: body.len() as u32,
        })?;
    let mut fd_handles: u16 = 0;
    for (index, chunk) in descs.chunks_exact(HANDLE_LEN).enumerate() {
        // `index < MAX_HANDLES` (1024), so it fits in a u16.
        let desc = HandleDesc::parse(chunk, index as u16)?;
        fd_handles += u16::from(desc.kind.takes_fd());
    }
    if fd_handles != header.nfds {
        return Err(DecodeError::FdCountMismatch {
            nfds: header.nfds,
            handles: fd_handles,
        });
    }
    Ok((HandleDescs { bytes: descs }, r.rest()))
}

/// The reason and diagnostic text of a RESET frame.
///
/// Invalid UTF-8 in the text is replaced, not rejected: the text is for humans.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] if the body exceeds [`MAX_TEXT`].
pub(crate) fn parse_reset<'a>(
    header: &Header,
    body: &'a [u8],
) -> Result<(ResetReason, Cow<'a, str>), DecodeError> {
    Ok((ResetReason::from_code(header.arg), text(Kind::Reset, body)?))
}

/// The reason and diagnostic text of a GOAWAY frame.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] if the body exceeds [`MAX_TEXT`].
pub(crate) fn parse_goaway<'a>(
    header: &Header,
    body: &'a [u8],
) -> Result<(GoAwayReason, Cow<'a, str>), DecodeError> {
    Ok((
        GoAwayReason::from_code(header.arg),
        text(Kind::GoAway, body)?,
    ))
}

/// Appends the header and handle descriptors of a DATA frame whose payload (the archive) the
/// caller appends next, exactly `payload_len` bytes of it.
///
/// # Panics
///
/// If `handles` holds more than [`MAX_HANDLES`] descriptors, `nfds` exceeds [`MAX_FDS`] or
/// differs from the number of FD/STREAM descriptors, or the body exceeds `u32::MAX` bytes:
/// the caller checks these against the negotiated limits before encoding.
pub(crate) fn encode_data(
    out: &mut Vec<u8>,
    chan: u32,
    handles: &[HandleDesc],
    payload_len: usize,
    nfds: u16,
) {
    assert!(handles.len() <= MAX_HANDLES as usize, "too many handles");
    assert!(nfds <= MAX_FDS, "too many fds");
    assert_eq!(
        handles.iter().filter(|h| h.kind.takes_fd()).count(),
        usize::from(nfds),
        "nfds must equal the number of FD and STREAM handles"
    );
    let len = u32::try_from(handles.len() * HANDLE_LEN + payload_len).expect("frame too large");
    let header = Header {
        len,
        kind: Kind::Data,
        flags: 0,
        nfds,
        chan,
        arg: handles.len() as u32,
    };
    out.reserve(header.frame_len());
    out.extend_from_slice(&header.encode());
    for handle in handles {
        out.extend_from_slice(&handle.encode());
    }
}

/// Appends an OPEN frame for `chan` carrying the message type's `fingerprint`.
pub(crate) fn encode_open(out: &mut Vec<u8>, chan: u32, fingerprint: u64) {
    out.extend_from_slice(&Header::new(Kind::Open, chan, 0, 8).encode());
    out.extend_from_slice(&fingerprint.to_le_bytes());
}

/// Appends a RING frame for `chan` announcing a ring of `capacity` data bytes (the memfd goes
/// with the write, as its one fd).
pub(crate) fn encode_ring(out: &mut Vec<u8>, chan: u32, capacity: u64) {
    let mut h = Header::new(Kind::Ring, chan, 0, 8);
    h.nfds = 1;
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&capacity.to_le_bytes());
}

/// Appends an OFFER frame: offer `id` of a ring of `capacity` data bytes (the memfd goes with
/// the write, as its one fd).
pub(crate) fn encode_offer(out: &mut Vec<u8>, id: u32, capacity: u64) {
    let mut h = Header::new(Kind::Offer, 0, id, 8);
    h.nfds = 1;
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&capacity.to_le_bytes());
}

/// Appends a FORGET frame: the writer will not bind the peer's offer `id` again.
pub(crate) fn encode_forget(out: &mut Vec<u8>, id: u32) {
    out.extend_from_slice(&Header::new(Kind::Forget, 0, id, 0).encode());
}

/// The ring capacity in an OFFER body.
///
/// # Errors
///
/// [`DecodeError::BadBodyLength`] unless the body is exactly 8 bytes.
pub(crate) fn parse_offer(body: &[u8]) -> Result<u64, DecodeError> {
    exact_u64(Kind::Offer, body)
}

/// Appends a BLOB frame for `chan`: its next message is the `len`-byte archive in the sealed
/// memfd that goes with the write, as its one fd.
pub(crate) fn encode_blob(out: &mut Vec<u8>, chan: u32, len: u64) {
    let mut h = Header::new(Kind::Blob, chan, 0, 8);
    h.nfds = 1;
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&len.to_le_bytes());
}

/// Appends an INTRO frame for `chan` with introduction `token` (the socket goes in the same
/// `sendmsg`).
pub(crate) fn encode_intro(out: &mut Vec<u8>, chan: u32, token: u32, fingerprint: u64) {
    let mut h = Header::new(Kind::Intro, chan, token, 8);
    h.nfds = 1;
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&fingerprint.to_le_bytes());
}

/// Appends a JOIN frame: the writer opens `chan` as a sender of the channel introduced with
/// `token`.
pub(crate) fn encode_join(out: &mut Vec<u8>, chan: u32, token: u32, fingerprint: u64) {
    out.extend_from_slice(&Header::new(Kind::Join, chan, token, 8).encode());
    out.extend_from_slice(&fingerprint.to_le_bytes());
}

/// Appends a CLOSE frame for `chan`.
pub(crate) fn encode_close(out: &mut Vec<u8>, chan: u32) {
    out.extend_from_slice(&Header::new(Kind::Close, chan, 0, 0).encode());
}

/// Appends a RESET frame for `chan`; `text` is cut to [`MAX_TEXT`] bytes at a char boundary.
pub(crate) fn encode_reset(out: &mut Vec<u8>, chan: u32, reason: ResetReason, text: &str) {
    encode_text_frame(out, Kind::Reset, chan, reason as u32, text);
}

/// Appends a CREDIT frame granting `grant` more bytes on `chan`.
pub(crate) fn encode_credit(out: &mut Vec<u8>, chan: u32, grant: u32) {
    out.extend_from_slice(&Header::new(Kind::Credit, chan, grant, 0).encode());
}

/// Appends a PING frame with opaque body `opaque`.
// Liveness pings are sent by the network transports; unix sockets report a dead peer as EOF.
#[allow(dead_code)]
pub(crate) fn encode_ping(out: &mut Vec<u8>, opaque: u64) {
    out.extend_from_slice(&Header::new(Kind::Ping, 0, 0, 8).encode());
    out.extend_from_slice(&opaque.to_le_bytes());
}

/// Appends the PONG answering a PING whose body was `opaque`.
pub(crate) fn encode_pong(out: &mut Vec<u8>, opaque: u64) {
    out.extend_from_slice(&Header::new(Kind::Pong, 0, 0, 8).encode());
    out.extend_from_slice(&opaque.to_le_bytes());
}

/// Appends a GOAWAY frame; `text` is cut to [`MAX_TEXT`] bytes at a char boundary.
pub(crate) fn encode_goaway(out: &mut Vec<u8>, reason: GoAwayReason, text: &str) {
    encode_text_frame(out, Kind::GoAway, 0, reason as u32, text);
}

fn encode_text_frame(out: &mut Vec<u8>, kind: Kind, chan: u32, arg: u32, text: &str) {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text.as_bytes()[..end];
    // `end <= MAX_TEXT`, so the cast is lossless.
    out.extend_from_slice(&Header::new(kind, chan, arg, end as u32).encode());
    out.extend_from_slice(text);
}

fn exact_u64(kind: Kind, body: &[u8]) -> Result<u64, DecodeError> {
    let bad = DecodeError::BadBodyLength {
        kind,
        len: body.len() as u32,
    };
    let mut r = Reader::new(body);
    let value = r.u64("u64 body").map_err(|_| bad)?;
    if r.remaining() != 0 {
        return Err(bad);
    }
    Ok(value)
}

fn text(kind: Kind, body: &[u8]) -> Result<Cow<'_, str>, DecodeError> {
    if body.len() > MAX_TEXT {
        return Err(DecodeError::BadBodyLength {
            kind,
            len: body.len() as u32,
        });
    }
    Ok(String::from_utf8_lossy(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(frame: &[u8]) -> (Header, &[u8]) {
        let header = Header::parse(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        let body = &frame[HEADER_LEN..];
        assert_eq!(body.len(), header.len as usize);
        (header, body)
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header {
            len: 0x0102_0304,
            kind: Kind::Data,
            flags: 0,
            nfds: 2,
            chan: 0x0a0b_0c0d,
            arg: 3,
        };
        let bytes = h.encode();
        assert_eq!(
            bytes,
            [4, 3, 2, 1, 2, 0, 2, 0, 0x0d, 0x0c, 0x0b, 0x0a, 3, 0, 0, 0]
        );
        assert_eq!(Header::parse(&bytes), Ok(h));
    }

    #[test]
    fn protocol_md_worked_example() {
        // docs/PROTOCOL.md section 12, byte for byte.
        let mut out = Vec::new();
        encode_open(
            &mut out,
            1,
            crate::proto::tests::type_fingerprint("u64", 8, 8),
        );
        encode_data(&mut out, 1, &[HandleDesc::fd()], 8, 1);
        out.extend_from_slice(&42u64.to_le_bytes());
        #[rustfmt::skip]
        let expect = [
            0x08, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
            0xb2, 0xa5, 0xb6, 0x25, 0xe6, 0x02, 0x4c, 0x8e,
            0x18, 0, 0, 0, 2, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0,
            1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0x2a, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(out, expect);
    }

    #[test]
    fn unknown_flags_are_ignored() {
        let mut bytes = Header::new(Kind::Close, 1, 0, 0).encode();
        bytes[5] = 0xff;
        assert_eq!(Header::parse(&bytes).unwrap().flags, 0xff);
    }

    #[test]
    fn open_round_trip() {
        let mut out = Vec::new();
        encode_open(&mut out, 7, 0xdead_beef_cafe_f00d);
        let (h, body) = split(&out);
        assert_eq!((h.kind, h.chan, h.arg), (Kind::Open, 7, 0));
        assert_eq!(parse_open(body), Ok(0xdead_beef_cafe_f00d));
    }

    #[test]
    fn close_and_credit_round_trip() {
        let mut out = Vec::new();
        encode_close(&mut out, 9);
        let (h, body) = split(&out);
        assert_eq!((h.kind, h.chan, body.len()), (Kind::Close, 9, 0));

        let mut out = Vec::new();
        encode_credit(&mut out, 4, 131_072);
        let (h, body) = split(&out);
        assert_eq!(
            (h.kind, h.chan, h.arg, body.len()),
            (Kind::Credit, 4, 131_072, 0)
        );
    }

    #[test]
    fn ping_pong_round_trip() {
        for (encode, kind) in [
            (encode_ping as fn(&mut Vec<u8>, u64), Kind::Ping),
            (encode_pong, Kind::Pong),
        ] {
            let mut out = Vec::new();
            encode(&mut out, 42);
            let (h, body) = split(&out);
            assert_eq!((h.kind, h.chan), (kind, 0));
            assert_eq!(parse_ping(body), Ok(42));
        }
    }

    #[test]
    fn reset_and_goaway_round_trip() {
        let mut out = Vec::new();
        encode_reset(&mut out, 6, ResetReason::TypeMismatch, "expected u32");
        let (h, body) = split(&out);
        assert_eq!((h.kind, h.chan), (Kind::Reset, 6));
        let (reason, text) = parse_reset(&h, body).unwrap();
        assert_eq!(
            (reason, &*text),
            (ResetReason::TypeMismatch, "expected u32")
        );

        let mut out = Vec::new();
        encode_goaway(&mut out, GoAwayReason::Limits, "");
        let (h, body) = split(&out);
        assert_eq!(
            parse_goaway(&h, body).unwrap(),
            (GoAwayReason::Limits, "".into())
        );
    }

    #[test]
    fn long_text_is_cut_at_a_char_boundary() {
        let text = "é".repeat(200); // 400 bytes, 2 per char
        let mut out = Vec::new();
        encode_goaway(&mut out, GoAwayReason::Normal, &text);
        let (h, body) = split(&out);
        assert_eq!(body.len(), MAX_TEXT);
        assert_eq!(parse_goaway(&h, body).unwrap().1, "é".repeat(128));

        let text = format!("a{}", "é".repeat(200)); // boundary falls mid-char at 256
        let mut out = Vec::new();
        encode_reset(&mut out, 1, ResetReason::Invalid, &text);
        assert_eq!(split(&out).1.len(), MAX_TEXT - 1);
    }

    #[test]
    fn unknown_reason_codes_degrade() {
        assert_eq!(ResetReason::from_code(99), ResetReason::Invalid);
        assert_eq!(GoAwayReason::from_code(99), GoAwayReason::ProtocolError);
        // Invalid UTF-8 is replaced, not rejected.
        let h = Header::new(Kind::Reset, 1, 2, 2);
        let (reason, text) = parse_reset(&h, &[0xff, b'a']).unwrap();
        assert_eq!((reason, &*text), (ResetReason::ReceiverGone, "\u{fffd}a"));
    }

    #[test]
    fn data_round_trip() {
        let handles = [
            HandleDesc::fd(),
            HandleDesc {
                kind: HandleKind::Sender,
                chan: 3,
                fingerprint: 11,
                offer: 0,
            },
            HandleDesc {
                kind: HandleKind::Stream,
                chan: 0,
                fingerprint: 0,
                offer: 0,
            },
            HandleDesc {
                kind: HandleKind::Receiver,
                chan: 5,
                fingerprint: 12,
                offer: 0,
            },
            HandleDesc {
                kind: HandleKind::SenderLocal,
                chan: 2,
                fingerprint: 13,
                offer: 0,
            },
        ];
        let mut out = Vec::new();
        encode_data(&mut out, 1, &handles, 5, 2);
        out.extend_from_slice(b"hello");
        let (h, body) = split(&out);
        assert_eq!((h.kind, h.chan, h.arg, h.nfds), (Kind::Data, 1, 5, 2));
        let (descs, payload) = parse_data(&h, body).unwrap();
        assert_eq!(descs.len(), 5);
        assert_eq!(descs.collect::<Vec<_>>(), handles);
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn data_with_empty_payload_and_no_handles() {
        let mut out = Vec::new();
        encode_data(&mut out, 3, &[], 0, 0);
        let (h, body) = split(&out);
        let (descs, payload) = parse_data(&h, body).unwrap();
        assert_eq!((descs.count(), payload.len()), (0, 0));
    }

    #[test]
    fn header_rejects_bad_shapes() {
        let parse = |h: Header| Header::parse(&h.encode());
        let mut bytes = Header::new(Kind::Open, 1, 0, 8).encode();
        bytes[4] = 0;
        assert_eq!(Header::parse(&bytes), Err(DecodeError::UnknownKind(0)));
        bytes[4] = 15;
        assert_eq!(Header::parse(&bytes), Err(DecodeError::UnknownKind(15)));

        for (kind, len) in [
            (Kind::Open, 7),
            (Kind::Open, 9),
            (Kind::Ping, 0),
            (Kind::Pong, 16),
            (Kind::Close, 1),
            (Kind::Credit, 8),
            (Kind::Reset, 257),
            (Kind::GoAway, 1 << 20),
        ] {
            let chan = u32::from(kind.is_channel_frame());
            assert_eq!(
                parse(Header::new(kind, chan, 0, len)),
                Err(DecodeError::BadBodyLength { kind, len }),
                "{kind:?} {len}"
            );
        }
        assert_eq!(
            parse(Header::new(Kind::Data, 1, 2, 31)),
            Err(DecodeError::BadBodyLength {
                kind: Kind::Data,
                len: 31
            })
        );
        assert_eq!(
            parse(Header::new(Kind::Data, 1, 1025, 1 << 20)),
            Err(DecodeError::TooManyHandles { count: 1025 })
        );
        assert_eq!(
            parse(Header::new(Kind::Data, 1, u32::MAX, u32::MAX)),
            Err(DecodeError::TooManyHandles { count: u32::MAX })
        );
        assert_eq!(
            parse(Header::new(Kind::Data, 0, 0, 0)),
            Err(DecodeError::BadChannel {
                kind: Kind::Data,
                chan: 0
            })
        );
        assert_eq!(
            parse(Header::new(Kind::Ping, 1, 0, 8)),
            Err(DecodeError::BadChannel {
                kind: Kind::Ping,
                chan: 1
            })
        );
        let mut h = Header::new(Kind::Close, 1, 0, 0);
        h.nfds = 1;
        assert_eq!(
            parse(h),
            Err(DecodeError::FdsOnNonData {
                kind: Kind::Close,
                nfds: 1
            })
        );
        let mut h = Header::new(Kind::Data, 1, 254, 254 * 16);
        h.nfds = 254;
        assert_eq!(parse(h), Err(DecodeError::TooManyFds { count: 254 }));
        let mut h = Header::new(Kind::Data, 1, 1, 16);
        h.nfds = 2;
        assert_eq!(
            parse(h),
            Err(DecodeError::FdCountMismatch {
                nfds: 2,
                handles: 1
            })
        );
    }

    #[test]
    fn data_rejects_bad_handles() {
        let header = |arg, nfds| {
            let mut h = Header::new(Kind::Data, 1, arg, arg * 16);
            h.nfds = nfds;
            h
        };
        let bad = |what| Err(DecodeError::BadHandle { index: 0, what });

        let mut d = HandleDesc::fd().encode();
        d[0] = 9;
        assert_eq!(
            parse_data(&header(1, 0), &d).map(|_| ()),
            bad("unknown handle kind")
        );
        let offer_rule =
            bad("offer id must be nonzero on SENDER_RING and reserved bytes zero elsewhere");
        let mut d = HandleDesc::fd().encode();
        d[2] = 1;
        assert_eq!(parse_data(&header(1, 1), &d).map(|_| ()), offer_rule);
        // SENDER_RING needs an offer id; only it may carry one.
        let ring = HandleDesc {
            kind: HandleKind::SenderRing,
            chan: 3,
            fingerprint: 9,
            offer: 0x00ab_cdef,
        };
        let bytes = ring.encode();
        let (mut descs, _) = parse_data(&header(1, 0), &bytes).unwrap();
        assert_eq!(descs.next(), Some(ring));
        let mut d = ring.encode();
        d[1..4].fill(0);
        assert_eq!(parse_data(&header(1, 0), &d).map(|_| ()), offer_rule);
        let mut d = ring.encode();
        d[0] = HandleKind::Sender as u8;
        assert_eq!(parse_data(&header(1, 0), &d).map(|_| ()), offer_rule);
        let mut d = HandleDesc::fd().encode();
        d[4] = 1;
        assert_eq!(
            parse_data(&header(1, 1), &d).map(|_| ()),
            bad("fd handle names a channel")
        );
        let mut d = HandleDesc::fd().encode();
        d[15] = 1;
        assert_eq!(
            parse_data(&header(1, 1), &d).map(|_| ()),
            bad("fd handle names a channel")
        );
        let d = HandleDesc {
            kind: HandleKind::Receiver,
            chan: 0,
            fingerprint: 1,
            offer: 0,
        }
        .encode();
        assert_eq!(
            parse_data(&header(1, 0), &d).map(|_| ()),
            bad("channel handle names channel 0")
        );

        // FD/STREAM count must equal nfds, in both directions.
        let d = HandleDesc::fd().encode();
        assert_eq!(
            parse_data(&header(1, 0), &d).map(|_| ()),
            Err(DecodeError::FdCountMismatch {
                nfds: 0,
                handles: 1
            })
        );
        let d = HandleDesc {
            kind: HandleKind::Sender,
            chan: 3,
            fingerprint: 0,
            offer: 0,
        }
        .encode();
        assert_eq!(
            parse_data(&header(1, 1), &d).map(|_| ()),
            Err(DecodeError::FdCountMismatch {
                nfds: 1,
                handles: 0
            })
        );
        // A body too short for its descriptors.
        assert_eq!(
            parse_data(&header(2, 0), &d).map(|_| ()),
            Err(DecodeError::BadBodyLength {
                kind: Kind::Data,
                len: 16
            })
        );
    }

    #[test]
    fn body_parsers_reject_wrong_lengths() {
        assert!(parse_open(&[0; 7]).is_err());
        assert!(parse_open(&[0; 9]).is_err());
        assert!(parse_ping(&[]).is_err());
        let h = Header::new(Kind::GoAway, 0, 0, 0);
        assert!(parse_goaway(&h, &[b'x'; 257]).is_err());
        assert!(parse_intro(&[0; 7]).is_err());
        assert!(parse_join(&[0; 9]).is_err());
    }

    #[test]
    fn intro_and_join_round_trip() {
        let mut buf = Vec::new();
        encode_intro(&mut buf, 4, 0xdead_beef, 77);
        let (h, body) = split(&buf);
        assert_eq!(
            (h.kind, h.chan, h.arg, h.nfds),
            (Kind::Intro, 4, 0xdead_beef, 1)
        );
        assert_eq!(parse_intro(body), Ok(77));
        assert_eq!(buf[4], 12);

        let mut buf = Vec::new();
        encode_join(&mut buf, 3, 9, 78);
        let (h, body) = split(&buf);
        assert_eq!((h.kind, h.chan, h.arg, h.nfds), (Kind::Join, 3, 9, 0));
        assert_eq!(parse_join(body), Ok(78));
        assert_eq!(buf[4], 13);

        // INTRO carries exactly its socket; JOIN carries none.
        let parse = |h: Header| Header::parse(&h.encode());
        let mut h = Header::new(Kind::Intro, 4, 1, 8);
        assert_eq!(
            parse(h),
            Err(DecodeError::FdCountMismatch {
                nfds: 0,
                handles: 1
            })
        );
        h.nfds = 2;
        assert!(parse(h).is_err());
        let mut h = Header::new(Kind::Join, 3, 1, 8);
        h.nfds = 1;
        assert!(parse(h).is_err());
        assert!(parse(Header::new(Kind::Join, 0, 1, 8)).is_err());
        assert!(parse(Header::new(Kind::Intro, 4, 1, 16)).is_err());
    }

    #[test]
    fn forget_names_an_offer_and_nothing_else() {
        let mut buf = Vec::new();
        encode_forget(&mut buf, 0x00ab_cdef);
        let h = Header::parse(buf[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(
            (h.kind, h.chan, h.arg, h.len),
            (Kind::Forget, 0, 0x00ab_cdef, 0)
        );
        assert_eq!(buf[4], 14);

        let parse = |h: Header| Header::parse(&h.encode());
        let mut h = Header::new(Kind::Forget, 0, 0, 0);
        assert_eq!(parse(h), Err(DecodeError::BadOffer));
        h.arg = 1;
        h.len = 8;
        assert!(matches!(parse(h), Err(DecodeError::BadBodyLength { .. })));
        h.len = 0;
        h.chan = 3;
        assert!(matches!(parse(h), Err(DecodeError::BadChannel { .. })));
        h.chan = 0;
        h.nfds = 1;
        assert!(matches!(parse(h), Err(DecodeError::FdsOnNonData { .. })));
    }

    #[test]
    fn offer_round_trips_and_names_no_channel() {
        let mut buf = Vec::new();
        encode_offer(&mut buf, 0x00ff_fffe, 4 << 20);
        let (h, body) = split(&buf);
        assert_eq!(
            (h.kind, h.chan, h.arg, h.nfds),
            (Kind::Offer, 0, 0x00ff_fffe, 1)
        );
        assert_eq!(parse_offer(body), Ok(4 << 20));
        assert_eq!(buf[4], 11);

        // Exactly its memfd, a nonzero id, no channel, an 8-byte body.
        let parse = |h: Header| Header::parse(&h.encode());
        let mut h = Header::new(Kind::Offer, 0, 1, 8);
        assert_eq!(
            parse(h),
            Err(DecodeError::FdCountMismatch {
                nfds: 0,
                handles: 1
            })
        );
        h.nfds = 1;
        assert!(parse(h).is_ok());
        h.arg = 0;
        assert_eq!(parse(h), Err(DecodeError::BadOffer));
        h.arg = 1;
        h.chan = 2;
        assert!(matches!(parse(h), Err(DecodeError::BadChannel { .. })));
        h.chan = 0;
        h.len = 16;
        assert!(matches!(parse(h), Err(DecodeError::BadBodyLength { .. })));
    }

    #[test]
    fn sender_direct_descriptor_takes_an_fd_and_names_a_type() {
        let d = HandleDesc {
            kind: HandleKind::SenderDirect,
            chan: 5,
            fingerprint: 99,
            offer: 0,
        };
        let bytes = d.encode();
        assert_eq!(bytes[0], 6);
        assert_eq!(HandleDesc::parse(&bytes, 0), Ok(d));
        let mut h = Header::new(Kind::Data, 1, 1, 16);
        h.nfds = 1;
        let (descs, payload) = parse_data(&h, &bytes).unwrap();
        assert_eq!(descs.collect::<Vec<_>>(), vec![d]);
        assert!(payload.is_empty());
        // Its fd is counted like an FD's.
        let h = Header::new(Kind::Data, 1, 1, 16);
        assert!(parse_data(&h, &bytes).is_err());
    }

    #[test]
    fn pumped_descriptor_layout_and_round_trip() {
        let p = Pumped {
            to_reader: 3,
            to_writer: 5,
            kind: PumpedAs::Fd,
        };
        let d = HandleDesc::pumped(p);
        let bytes = d.encode();
        assert_eq!(bytes, [7, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(HandleDesc::parse(&bytes, 0), Ok(d));
        assert_eq!(d.as_pumped(), Some(p));
        let s = HandleDesc::pumped(Pumped {
            kind: PumpedAs::Stream,
            ..p
        });
        assert_eq!(s.encode()[12], 2);
        assert_eq!(s.as_pumped().map(|p| p.kind), Some(PumpedAs::Stream));
        // It consumes no fd.
        let h = Header::new(Kind::Data, 1, 1, 16);
        let (descs, _) = parse_data(&h, &bytes).unwrap();
        assert_eq!(descs.collect::<Vec<_>>(), vec![d]);
        let mut h = Header::new(Kind::Data, 1, 1, 16);
        h.nfds = 1;
        assert!(parse_data(&h, &bytes).is_err());
    }

    #[test]
    fn protocol_md_pumped_example() {
        // docs/PROTOCOL.md section 5.6, byte for byte.
        let mut out = Vec::new();
        let pumped = HandleDesc::pumped(Pumped {
            to_reader: 3,
            to_writer: 5,
            kind: PumpedAs::Fd,
        });
        encode_data(&mut out, 1, &[pumped], 8, 0);
        out.extend_from_slice(&42u64.to_le_bytes());
        encode_data(&mut out, 3, &[], 3, 0);
        out.extend_from_slice(b"hi\n");
        encode_close(&mut out, 3);
        encode_data(&mut out, 5, &[], 2, 0);
        out.extend_from_slice(b"ok");
        encode_close(&mut out, 5);
        #[rustfmt::skip]
        let expect = [
            0x18, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0,
            7, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0,
            0x2a, 0, 0, 0, 0, 0, 0, 0,
            3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,
            0x68, 0x69, 0x0a,
            0, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,
            2, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0,
            0x6f, 0x6b,
            0, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(out, expect);
    }

    #[test]
    fn pumped_descriptor_rejects_bad_fields() {
        let good = HandleDesc::pumped(Pumped {
            to_reader: 3,
            to_writer: 5,
            kind: PumpedAs::Stream,
        })
        .encode();
        for (at, value) in [
            (4, 0),  // to_reader 0
            (8, 0),  // to_writer 0
            (8, 3),  // the same channel both ways
            (12, 0), // no handle kind
            (12, 3), // not FD or STREAM
            (13, 1), // nonzero padding
            (15, 1),
            (1, 1), // reserved byte
        ] {
            let mut d = good;
            d[at] = value;
            assert!(
                matches!(
                    HandleDesc::parse(&d, 2),
                    Err(DecodeError::BadHandle { index: 2, .. })
                ),
                "byte {at} = {value}"
            );
        }
    }
}
