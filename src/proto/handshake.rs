//! The handshake: one fixed 32-byte hello in each direction, then negotiated limits.
//!
//! Both sides write their hello immediately after connecting and read the peer's; there is no
//! second round trip and no ordering between the two writes. Layout (little endian):
//!
//! ```text
//! 0       4        6         8          16          20            24       28             32
//! | "LCHN" | version | reserved | features | max_frame | max_message | window | max_channels |
//! ```
//!
//! [`Handshake`] is a sans-io machine: [`Handshake::poll_transmit`] yields the local hello
//! once, [`Handshake::handle_bytes`] consumes at most the 32 peer bytes (anything after them
//! already belongs to the frame decoder), and [`Handshake::poll_outcome`] yields the
//! [`Negotiated`] parameters. Negotiation is symmetric: both sides compute the same
//! `max_frame`, `max_message`, `max_channels` and `features` from the two hellos.

use std::fmt;
use std::ops::BitAnd;

use super::{DecodeError, Reader};

/// The four magic bytes that open every hello.
pub(crate) const MAGIC: [u8; 4] = *b"LCHN";
/// The protocol version this implementation speaks; peers must match exactly.
pub(crate) const VERSION: u16 = 1;
/// Length of a hello in bytes.
pub(crate) const HELLO_LEN: usize = 32;
/// Smallest `max_frame` a hello may announce.
pub(crate) const MIN_MAX_FRAME: u32 = 4096;
/// Smallest `window` a hello may announce.
pub(crate) const MIN_WINDOW: u32 = 4096;

/// Optional capabilities, as a bitmask; the session uses those both sides announce.
///
/// ```text
/// assert!(!(Features::FDS & Features::from_bits(0)).contains(Features::FDS));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Features(u64);

impl Features {
    /// No optional features.
    #[cfg(test)]
    pub(crate) const NONE: Self = Self(0);
    /// Bit 0: this side can send and receive file descriptors.
    pub(crate) const FDS: Self = Self(1);
    /// Bit 1: this side can move messages through shared-memory rings (RING frames). Announced
    /// only to a peer of the same uid on the same host, over a unix socket.
    pub(crate) const SHM: Self = Self(2);

    /// Both sets together.
    pub(crate) fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// This set less `other`.
    pub(crate) fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// The features with wire bitmask `bits` (unknown bits are kept, and dropped by `&`
    /// with our own announcement).
    pub(crate) fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The wire bitmask.
    pub(crate) fn bits(self) -> u64 {
        self.0
    }

    /// Whether every feature in `other` is in `self`.
    pub(crate) fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitAnd for Features {
    type Output = Self;

    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

/// What one side announces in its hello.
///
/// ```text
/// let limits = Limits { window: 1 << 20, ..Limits::default() };
/// let hs = Handshake::new(limits);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Largest frame body this side accepts (at least [`MIN_MAX_FRAME`]).
    pub(crate) max_frame: u32,
    /// Largest message archive this side accepts (at most `max_frame`).
    pub(crate) max_message: u32,
    /// Initial credit, in bytes, this side grants on every channel it receives on (at least
    /// [`MIN_WINDOW`]).
    pub(crate) window: u32,
    /// Most open channels this side tracks (at least 1).
    pub(crate) max_channels: u32,
    /// Capabilities this side offers.
    pub(crate) features: Features,
}

impl Default for Limits {
    /// 16 MiB messages in 16 MiB + 64 KiB frames, a 256 KiB window, 65536 channels, fds.
    fn default() -> Self {
        Self {
            max_frame: (16 << 20) + (64 << 10),
            max_message: 16 << 20,
            window: 256 << 10,
            max_channels: 65536,
            features: Features::FDS,
        }
    }
}

impl Limits {
    /// The 32-byte hello announcing these limits.
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0; HELLO_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        // [6..8] reserved, zero.
        out[8..16].copy_from_slice(&self.features.bits().to_le_bytes());
        out[16..20].copy_from_slice(&self.max_frame.to_le_bytes());
        out[20..24].copy_from_slice(&self.max_message.to_le_bytes());
        out[24..28].copy_from_slice(&self.window.to_le_bytes());
        out[28..32].copy_from_slice(&self.max_channels.to_le_bytes());
        out
    }

    /// Parses and validates a hello.
    ///
    /// # Errors
    ///
    /// Every [`HandshakeError`] variant except `Truncated` (the input is a whole hello).
    pub(crate) fn parse(hello: &[u8; HELLO_LEN]) -> Result<Self, HandshakeError> {
        let mut r = Reader::new(hello);
        let magic = r.array::<4>("hello magic")?;
        let version = r.u16("hello version")?;
        let reserved = r.u16("hello reserved")?;
        let features = Features::from_bits(r.u64("hello features")?);
        let limits = Self {
            max_frame: r.u32("hello max_frame")?,
            max_message: r.u32("hello max_message")?,
            window: r.u32("hello window")?,
            max_channels: r.u32("hello max_channels")?,
            features,
        };
        if magic != MAGIC {
            return Err(HandshakeError::BadMagic);
        }
        if version != VERSION {
            return Err(HandshakeError::VersionMismatch {
                local: VERSION,
                peer: version,
            });
        }
        if reserved != 0 {
            return Err(HandshakeError::ReservedNotZero);
        }
        limits.validate()?;
        Ok(limits)
    }

    /// Checks the minimums and `max_message <= max_frame`.
    ///
    /// # Errors
    ///
    /// [`HandshakeError::BelowMinimum`] or [`HandshakeError::MessageExceedsFrame`].
    pub(crate) fn validate(&self) -> Result<(), HandshakeError> {
        for (field, value, min) in [
            ("max_frame", self.max_frame, MIN_MAX_FRAME),
            ("window", self.window, MIN_WINDOW),
            ("max_channels", self.max_channels, 1),
        ] {
            if value < min {
                return Err(HandshakeError::BelowMinimum { field, value, min });
            }
        }
        if self.max_message > self.max_frame {
            return Err(HandshakeError::MessageExceedsFrame {
                max_message: self.max_message,
                max_frame: self.max_frame,
            });
        }
        Ok(())
    }
}

/// The session parameters both hellos imply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// Largest frame body either side may send: the smaller announcement.
    pub(crate) max_frame: u32,
    /// Largest archive either side may send: the smaller announcement.
    pub(crate) max_message: u32,
    /// Credit we grant the peer on each channel we receive on (our `window`).
    pub(crate) local_window: u32,
    /// Credit we start with on each channel we send on (the peer's `window`).
    pub(crate) peer_window: u32,
    /// Most channels one side may have created and not yet finished: the smaller announcement.
    pub(crate) max_channels: u32,
    /// Features both sides announced.
    pub(crate) features: Features,
}

impl Negotiated {
    /// Combines our limits with the peer's.
    pub(crate) fn new(local: &Limits, peer: &Limits) -> Self {
        Self {
            max_frame: local.max_frame.min(peer.max_frame),
            max_message: local.max_message.min(peer.max_message),
            local_window: local.window,
            peer_window: peer.window,
            max_channels: local.max_channels.min(peer.max_channels),
            features: local.features & peer.features,
        }
    }
}

/// Why a handshake failed. The session is closed without sending anything further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HandshakeError {
    /// The hello did not start with `LCHN`: the peer does not speak this protocol.
    BadMagic,
    /// The peer speaks another protocol version.
    VersionMismatch {
        /// Our version.
        local: u16,
        /// The peer's version.
        peer: u16,
    },
    /// The reserved field was not zero.
    ReservedNotZero,
    /// A limit is below its minimum.
    BelowMinimum {
        /// The field's name.
        field: &'static str,
        /// The announced value.
        value: u32,
        /// The minimum.
        min: u32,
    },
    /// `max_message` exceeds `max_frame`.
    MessageExceedsFrame {
        /// The announced `max_message`.
        max_message: u32,
        /// The announced `max_frame`.
        max_frame: u32,
    },
    /// A field was cut short (cannot happen for a whole hello; kept for the reader).
    Truncated {
        /// The field.
        what: &'static str,
    },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadMagic => f.write_str("peer is not a libchan endpoint (bad magic)"),
            Self::VersionMismatch { local, peer } => {
                write!(
                    f,
                    "protocol version mismatch: we speak {local}, peer speaks {peer}"
                )
            }
            Self::ReservedNotZero => f.write_str("reserved handshake field is not zero"),
            Self::BelowMinimum { field, value, min } => {
                write!(f, "handshake {field} = {value} is below the minimum {min}")
            }
            Self::MessageExceedsFrame {
                max_message,
                max_frame,
            } => write!(
                f,
                "handshake max_message {max_message} exceeds max_frame {max_frame}"
            ),
            Self::Truncated { what } => write!(f, "truncated {what}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<DecodeError> for HandshakeError {
    fn from(err: DecodeError) -> Self {
        match err {
            DecodeError::Truncated { what } => Self::Truncated { what },
            // The reader only ever reports truncation.
            _ => Self::Truncated { what: "hello" },
        }
    }
}

/// The handshake state machine for one side of a connection.
///
/// ```text
/// let mut a = Handshake::new(Limits::default());
/// let mut b = Handshake::new(Limits::default());
/// let (ha, hb) = (a.poll_transmit().unwrap(), b.poll_transmit().unwrap());
/// assert_eq!(a.handle_bytes(&hb), Ok(32));
/// assert_eq!(b.handle_bytes(&ha), Ok(32));
/// assert_eq!(a.poll_outcome(), b.poll_outcome().map(|n| n)); // symmetric limits
/// ```
#[derive(Clone, Debug)]
pub(crate) struct Handshake {
    local: Limits,
    transmit: Option<[u8; HELLO_LEN]>,
    peer: [u8; HELLO_LEN],
    filled: usize,
    outcome: Result<Option<Negotiated>, HandshakeError>,
}

impl Handshake {
    /// A handshake announcing `local`.
    ///
    /// # Panics
    ///
    /// If `local` fails [`Limits::validate`]: that is a configuration bug, not peer input.
    pub(crate) fn new(local: Limits) -> Self {
        if let Err(err) = local.validate() {
            panic!("invalid local limits: {err}");
        }
        Self {
            local,
            transmit: Some(local.encode()),
            peer: [0; HELLO_LEN],
            filled: 0,
            outcome: Ok(None),
        }
    }

    /// The local hello, the first time it is called; `None` afterwards.
    pub(crate) fn poll_transmit(&mut self) -> Option<[u8; HELLO_LEN]> {
        self.transmit.take()
    }

    /// Consumes peer bytes up to the end of the peer's hello; returns how many were used.
    ///
    /// Bytes after the hello are not consumed: they are the start of the frame stream. Once
    /// the hello is complete, this returns `Ok(0)`.
    ///
    /// # Errors
    ///
    /// The [`HandshakeError`] describing why the peer's hello is unacceptable; the machine
    /// then stays failed and returns the same error on every call.
    pub(crate) fn handle_bytes(&mut self, input: &[u8]) -> Result<usize, HandshakeError> {
        if self.outcome?.is_some() {
            return Ok(0);
        }
        let used = input.len().min(HELLO_LEN - self.filled);
        self.peer[self.filled..self.filled + used].copy_from_slice(&input[..used]);
        self.filled += used;
        if self.filled == HELLO_LEN {
            self.outcome =
                Limits::parse(&self.peer).map(|peer| Some(Negotiated::new(&self.local, &peer)));
            self.outcome?;
        }
        Ok(used)
    }

    /// The negotiated parameters, once the peer's hello has been accepted.
    pub(crate) fn poll_outcome(&self) -> Option<Negotiated> {
        self.outcome.ok().flatten()
    }

    /// The error that failed the handshake, if any.
    #[cfg(test)]
    pub(crate) fn error(&self) -> Option<HandshakeError> {
        self.outcome.err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(a: Limits, b: Limits) -> (Negotiated, Negotiated) {
        let mut ha = Handshake::new(a);
        let mut hb = Handshake::new(b);
        let ma = ha.poll_transmit().unwrap();
        let mb = hb.poll_transmit().unwrap();
        assert_eq!(ha.poll_transmit(), None);
        assert_eq!(ha.handle_bytes(&mb), Ok(32));
        assert_eq!(hb.handle_bytes(&ma), Ok(32));
        (ha.poll_outcome().unwrap(), hb.poll_outcome().unwrap())
    }

    fn peer_hello(edit: impl FnOnce(&mut [u8; 32])) -> Result<usize, HandshakeError> {
        let mut hello = Limits::default().encode();
        edit(&mut hello);
        Handshake::new(Limits::default()).handle_bytes(&hello)
    }

    #[test]
    fn default_hello_bytes() {
        let hello = Limits::default().encode();
        assert_eq!(
            hello,
            [
                b'L', b'C', b'H', b'N', 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, //
                0x00, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00, 0x01, //
                0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01, 0x00,
            ]
        );
        assert_eq!(Limits::parse(&hello), Ok(Limits::default()));
    }

    #[test]
    fn protocol_md_worked_example() {
        // docs/PROTOCOL.md section 12: the acceptor's hello and the negotiated values.
        let acceptor = Limits {
            max_frame: 1 << 20,
            max_message: 1 << 20,
            window: 64 << 10,
            max_channels: 1024,
            features: Features::NONE,
        };
        #[rustfmt::skip]
        let expect = [
            0x4c, 0x43, 0x48, 0x4e, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0x10, 0, 0, 0, 0x10, 0, 0, 0, 1, 0, 0, 4, 0, 0,
        ];
        assert_eq!(acceptor.encode(), expect);
        let (connector, accepted) = exchange(Limits::default(), acceptor);
        assert_eq!(
            (connector.max_frame, connector.max_message),
            (1 << 20, 1 << 20)
        );
        assert_eq!(
            (connector.max_channels, connector.features),
            (1024, Features::NONE)
        );
        assert_eq!(
            (connector.peer_window, accepted.peer_window),
            (65536, 262_144)
        );
    }

    #[test]
    fn negotiation_takes_minimums_and_keeps_windows_apart() {
        let a = Limits {
            max_frame: 1 << 20,
            max_message: 1 << 19,
            window: 8192,
            max_channels: 10,
            features: Features::FDS,
        };
        let b = Limits {
            features: Features::from_bits(0b110),
            ..Limits::default()
        };
        let (na, nb) = exchange(a, b);
        assert_eq!(
            na,
            Negotiated {
                max_frame: 1 << 20,
                max_message: 1 << 19,
                local_window: 8192,
                peer_window: 256 << 10,
                max_channels: 10,
                features: Features::NONE,
            }
        );
        assert_eq!((nb.local_window, nb.peer_window), (256 << 10, 8192));
        assert_eq!(
            (nb.max_frame, nb.max_message, nb.max_channels, nb.features),
            (na.max_frame, na.max_message, na.max_channels, na.features)
        );
        let (na, _) = exchange(Limits::default(), Limits::default());
        assert!(na.features.contains(Features::FDS));
    }

    #[test]
    fn hello_in_pieces_and_leftover_bytes() {
        let mut hs = Handshake::new(Limits::default());
        let mut stream = Limits::default().encode().to_vec();
        stream.extend_from_slice(b"frames");
        assert_eq!(hs.handle_bytes(&stream[..0]), Ok(0));
        assert_eq!(hs.handle_bytes(&stream[..5]), Ok(5));
        assert_eq!(hs.poll_outcome(), None);
        assert_eq!(hs.handle_bytes(&stream[5..31]), Ok(26));
        assert_eq!(hs.poll_outcome(), None);
        assert_eq!(hs.handle_bytes(&stream[31..]), Ok(1));
        assert!(hs.poll_outcome().is_some());
        assert_eq!(hs.handle_bytes(b"more"), Ok(0));
    }

    #[test]
    fn rejects_bad_hellos() {
        assert_eq!(peer_hello(|h| h[0] = b'X'), Err(HandshakeError::BadMagic));
        assert_eq!(
            peer_hello(|h| h[4] = 2),
            Err(HandshakeError::VersionMismatch { local: 1, peer: 2 })
        );
        assert_eq!(
            peer_hello(|h| h[7] = 1),
            Err(HandshakeError::ReservedNotZero)
        );
        assert_eq!(
            peer_hello(|h| h[16..20].copy_from_slice(&4095u32.to_le_bytes())),
            Err(HandshakeError::BelowMinimum {
                field: "max_frame",
                value: 4095,
                min: 4096
            })
        );
        assert_eq!(
            peer_hello(|h| h[24..28].copy_from_slice(&0u32.to_le_bytes())),
            Err(HandshakeError::BelowMinimum {
                field: "window",
                value: 0,
                min: 4096
            })
        );
        assert_eq!(
            peer_hello(|h| h[28..32].copy_from_slice(&0u32.to_le_bytes())),
            Err(HandshakeError::BelowMinimum {
                field: "max_channels",
                value: 0,
                min: 1
            })
        );
        assert_eq!(
            peer_hello(|h| h[20..24].copy_from_slice(&u32::MAX.to_le_bytes())),
            Err(HandshakeError::MessageExceedsFrame {
                max_message: u32::MAX,
                max_frame: (16 << 20) + (64 << 10)
            })
        );
        // Unknown feature bits are fine.
        assert_eq!(peer_hello(|h| h[15] = 0x80), Ok(32));
    }

    #[test]
    fn failure_is_sticky() {
        let mut hs = Handshake::new(Limits::default());
        let mut hello = Limits::default().encode();
        hello[1] = 0;
        assert_eq!(hs.handle_bytes(&hello), Err(HandshakeError::BadMagic));
        assert_eq!(hs.handle_bytes(&hello), Err(HandshakeError::BadMagic));
        assert_eq!(hs.poll_outcome(), None);
        assert_eq!(hs.error(), Some(HandshakeError::BadMagic));
    }

    #[test]
    #[should_panic(expected = "invalid local limits")]
    fn invalid_local_limits_panic() {
        let _ = Handshake::new(Limits {
            window: 1,
            ..Limits::default()
        });
    }
}
