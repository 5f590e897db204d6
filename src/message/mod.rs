//! rkyv glue: what a message is, how it is encoded, validated and decoded.
//!
//! A message is any `#[derive(Archive, Serialize, Deserialize)]` type ([`Message`] is implemented
//! for all of them). It is encoded as one rkyv archive with the format pinned in Cargo.toml
//! (little endian, aligned, 32-bit relative pointers) plus a list of *handles*: channel ends,
//! fds and byte streams that the archive names by index. Handles are collected while the value
//! serializes and resolved while it deserializes, through a per-thread table that is only
//! installed for the duration of one call ([`encode`], [`decode`]).
//!
//! Invariants:
//! - the bytes handed to [`Validated::new`] are the exact archive (rkyv's root sits at the end);
//! - a [`Validated`] never changes after it has been checked, so reading it without re-checking
//!   is sound.

mod fd;
mod handles;
mod stream;

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Arc;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::writer::{Positional, Writer};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Portable, Serialize};

pub use fd::{ArchivedFd, Fd};
pub(crate) use handles::{deserialize_handle, serialize_handle};
pub use handles::{ArchivedHandle, HandleIndex};
pub use stream::{ArchivedByteStream, ByteStream};

use crate::channel::Handle;
use crate::error::{Error, InvalidMessage};

/// Bytes of one message archive, 16-byte aligned.
pub(crate) type Bytes = AlignedVec<16>;

/// The serializer libchan uses. Appears in [`Message`]'s bounds only.
#[doc(hidden)]
pub type Ser<'a> = HighSerializer<LimitedVec, ArenaHandle<'a>, rancor::Error>;
/// The validator libchan uses. Appears in [`Message`]'s bounds only.
#[doc(hidden)]
pub type Val<'a> = HighValidator<'a, rancor::Error>;
/// The deserializer libchan uses. Appears in [`Message`]'s bounds only.
#[doc(hidden)]
pub type De = HighDeserializer<rancor::Error>;

/// A type that can travel over a libchan channel.
///
/// Implemented for every type that derives rkyv's `Archive`, `Serialize` and `Deserialize` and
/// whose archive can be validated (rkyv's `bytecheck` is on). Channel ends ([`Sender`],
/// [`Receiver`]), [`Fd`] and [`ByteStream`] may be fields.
///
/// [`Sender`]: crate::Sender
/// [`Receiver`]: crate::Receiver
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
/// struct Job {
///     id: u64,
///     reply: libchan::Sender<u64>,
/// }
/// fn assert_message<T: libchan::Message>() {}
/// assert_message::<Job>();
/// ```
pub trait Message: Archive + Send + Sized + 'static {
    #[doc(hidden)]
    fn encode_into(&self, out: LimitedVec) -> Result<LimitedVec, rancor::Error>;
    #[doc(hidden)]
    fn check(bytes: &[u8]) -> Result<&Self::Archived, rancor::Error>;
    #[doc(hidden)]
    fn decode_archived(archived: &Self::Archived) -> Result<Self, rancor::Error>;
}

impl<T> Message for T
where
    T: Archive + Send + 'static + for<'a> Serialize<Ser<'a>>,
    T::Archived: Portable + for<'a> rkyv::bytecheck::CheckBytes<Val<'a>> + Deserialize<T, De>,
{
    fn encode_into(&self, out: LimitedVec) -> Result<LimitedVec, rancor::Error> {
        rkyv::api::high::to_bytes_in(self, out)
    }

    fn check(bytes: &[u8]) -> Result<&Self::Archived, rancor::Error> {
        rkyv::access::<T::Archived, rancor::Error>(bytes)
    }

    fn decode_archived(archived: &Self::Archived) -> Result<Self, rancor::Error> {
        rkyv::deserialize::<T, rancor::Error>(archived)
    }
}

/// The identity of a message type on the wire: FNV-1a 64 over the type's name followed by the
/// size and alignment of its archive (docs/PROTOCOL.md, "Type fingerprints").
pub fn fingerprint<T: Message>() -> u64 {
    let mut h = Fnv::new();
    h.write(std::any::type_name::<T>().as_bytes());
    h.write(&(std::mem::size_of::<T::Archived>() as u32).to_le_bytes());
    h.write(&(std::mem::align_of::<T::Archived>() as u32).to_le_bytes());
    h.0
}

/// An encoded message: its archive and the handles the archive names by index.
pub(crate) struct Packet {
    pub(crate) bytes: Bytes,
    pub(crate) handles: Vec<Handle>,
}

/// Serializes `value` and collects its handles. Fails with `TooLarge` when the archive would
/// exceed `limit` bytes (checked while writing, before rkyv's 32-bit offsets could overflow).
///
/// `capacity` sizes the buffer up front (the sender passes its last message's size), so that a
/// typical message is written without the buffer growing.
pub(crate) fn encode<T: Message>(
    value: &T,
    limit: usize,
    capacity: usize,
) -> Result<Packet, Error> {
    let out = LimitedVec {
        vec: Bytes::with_capacity(capacity.min(limit)),
        limit,
        overflow: false,
        slot: None,
        slot_len: 0,
    };
    let (result, handles) = collect_handles(|| value.encode_into(out));
    match result {
        Ok(out) if !out.overflow => Ok(Packet {
            bytes: out.vec,
            handles,
        }),
        Ok(out) => Err(Error::TooLarge {
            size: out.vec.len(),
            limit,
        }),
        Err(e) => {
            let text = e.to_string();
            if text.contains(OVERFLOW) {
                Err(Error::TooLarge {
                    size: limit + 1,
                    limit,
                })
            } else {
                Err(Error::Encode(text))
            }
        }
    }
}

/// Whoever lent the bytes of a [`Lent`] (a shared-memory ring), to be told when they come back.
pub(crate) trait Lender: Send + Sync {
    /// The bytes lent under `token` are no longer read.
    fn give_back(&self, token: u64);
}

/// Message bytes read in place where they arrived (a ring slot), handed back to their
/// [`Lender`] on drop.
pub(crate) struct Lent {
    ptr: *const u8,
    len: usize,
    token: u64,
    lender: Arc<dyn Lender>,
}

// SAFETY: a `Lent` is a read-only view of bytes that its lender keeps valid and unchanged until
// `give_back` (see `Lent::new`); reading them from any thread is sound, and `give_back` is
// callable from any thread (`Lender: Send + Sync`).
unsafe impl Send for Lent {}
// SAFETY: as for `Send`: shared access only reads.
unsafe impl Sync for Lent {}

impl Lent {
    /// Bytes `ptr..ptr + len`, lent under `token`.
    ///
    /// # Safety
    ///
    /// `ptr` is 16-byte aligned and valid for reads of `len` bytes, and those bytes do not
    /// change, until `lender.give_back(token)` is called (by this value's drop).
    pub(crate) unsafe fn new(
        ptr: *const u8,
        len: usize,
        token: u64,
        lender: Arc<dyn Lender>,
    ) -> Self {
        Self {
            ptr,
            len,
            token,
            lender,
        }
    }
}

impl std::ops::Deref for Lent {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `new`'s contract: valid, unchanging bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.lender.give_back(self.token);
    }
}

/// The bytes of a received message: owned, or lent by the ring they arrived in.
pub(crate) enum Body {
    /// A buffer of our own.
    Owned(Bytes),
    /// Read in place in shared memory.
    Lent(Lent),
}

impl std::ops::Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Body::Owned(b) => b,
            Body::Lent(l) => l,
        }
    }
}

impl Body {
    /// The bytes in a buffer of our own (a copy when lent).
    pub(crate) fn into_owned(self) -> Bytes {
        match self {
            Body::Owned(b) => b,
            Body::Lent(l) => {
                let mut b = Bytes::with_capacity(l.len());
                b.extend_from_slice(&l);
                b
            }
        }
    }
}

/// A validated archive of a `T`, ready to be read in place.
pub(crate) struct Validated<T: Message> {
    bytes: Body,
    _t: PhantomData<fn() -> T>,
}

impl<T: Message> Validated<T> {
    /// Checks `bytes` as an archive of `T`.
    pub(crate) fn new(bytes: Body) -> Result<Self, InvalidMessage> {
        if let Err(e) = T::check(&bytes) {
            return Err(InvalidMessage::new(format!(
                "archive of {} failed validation: {e}",
                std::any::type_name::<T>()
            )));
        }
        Ok(Self {
            bytes,
            _t: PhantomData,
        })
    }

    /// The archived value, read in place.
    pub(crate) fn archived(&self) -> &T::Archived {
        // SAFETY: `self.bytes` passed `T::check` (full bytecheck validation of a `T::Archived`
        // rooted at the end of the slice) in `new`, and is never mutated afterwards: the field is
        // private and no method hands out `&mut`.
        unsafe { rkyv::access_unchecked::<T::Archived>(&self.bytes) }
    }

    /// The raw archive bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Deserializes `archived`, resolving handle fields from `table`.
pub(crate) fn decode<T: Message>(
    archived: &T::Archived,
    table: &mut Vec<Option<Handle>>,
) -> Result<T, InvalidMessage> {
    let taken = std::mem::take(table);
    let prev = DECODE_TABLE.with(|t| t.replace(Some(taken)));
    let result = T::decode_archived(archived);
    let taken = DECODE_TABLE.with(|t| t.replace(prev));
    *table = taken.unwrap_or_default();
    result.map_err(|e| InvalidMessage::new(format!("cannot deserialize: {e}")))
}

/// The writer rkyv serializes into: an aligned buffer that refuses to grow past a limit, or
/// a slot of shared memory (a ring record) written in place.
#[doc(hidden)]
pub struct LimitedVec {
    vec: Bytes,
    limit: usize,
    overflow: bool,
    /// Writing into `slot..slot + limit` instead of `vec` (see [`encode_in_place`]).
    slot: Option<std::ptr::NonNull<u8>>,
    /// Bytes written into the slot.
    slot_len: usize,
}

const OVERFLOW: &str = "libchan: message exceeds the size limit";

impl Positional for LimitedVec {
    fn pos(&self) -> usize {
        match self.slot {
            Some(_) => self.slot_len,
            None => self.vec.len(),
        }
    }
}

impl<E: rancor::Source> Writer<E> for LimitedVec {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        if self.pos() + bytes.len() > self.limit {
            self.overflow = true;
            return Err(E::new(LimitError));
        }
        match self.slot {
            Some(base) => {
                // SAFETY: `encode_in_place`'s contract makes `base..base + limit` valid for
                // writes and unaliased by references; `slot_len + bytes.len() <= limit` was
                // checked above, and `bytes` is a Rust slice, so it cannot overlap the slot.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        base.as_ptr().add(self.slot_len),
                        bytes.len(),
                    );
                }
                self.slot_len += bytes.len();
            }
            None => self.vec.extend_from_slice(bytes),
        }
        Ok(())
    }
}

/// Serializes `value` straight into `slot..slot + cap` (a ring record's payload) and returns the
/// archive's length; `None` when it does not fit, fails, or carries handles (those travel
/// beside the archive, which a ring record cannot do). Nothing is allocated for the archive.
///
/// # Safety
///
/// `slot` is 16-byte aligned and valid for writes of `cap` bytes for the duration of the call,
/// and no Rust reference to those bytes exists (no other thread or process reads them before
/// the caller publishes them).
pub(crate) unsafe fn encode_in_place<T: Message>(
    value: &T,
    slot: *mut u8,
    cap: usize,
) -> Option<usize> {
    let out = LimitedVec {
        vec: Bytes::new(),
        limit: cap,
        overflow: false,
        slot: Some(std::ptr::NonNull::new(slot)?),
        slot_len: 0,
    };
    let (result, handles) = collect_handles(|| value.encode_into(out));
    match result {
        Ok(out) if !out.overflow && handles.is_empty() => Some(out.slot_len),
        // Dropping `handles` releases the duplicates serialization made.
        _ => None,
    }
}

#[derive(Debug)]
struct LimitError;

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(OVERFLOW)
    }
}

impl std::error::Error for LimitError {}

thread_local! {
    static ENCODE_HANDLES: RefCell<Option<Vec<Handle>>> = const { RefCell::new(None) };
    static DECODE_TABLE: RefCell<Option<Vec<Option<Handle>>>> = const { RefCell::new(None) };
}

fn collect_handles<R>(f: impl FnOnce() -> R) -> (R, Vec<Handle>) {
    let prev = ENCODE_HANDLES.with(|h| h.replace(Some(Vec::new())));
    let r = f();
    let handles = ENCODE_HANDLES.with(|h| h.replace(prev)).unwrap_or_default();
    (r, handles)
}

/// Registers a handle with the encoding in progress on this thread; returns its index, or
/// `None` when the value is being serialized outside libchan (by `rkyv::to_bytes` directly).
pub(crate) fn push_handle(handle: Handle) -> Option<u32> {
    ENCODE_HANDLES.with(|h| {
        let mut h = h.borrow_mut();
        let list = h.as_mut()?;
        list.push(handle);
        Some((list.len() - 1) as u32)
    })
}

/// Takes handle `index` from the decoding in progress on this thread.
pub(crate) fn take_handle(index: u32) -> Option<Handle> {
    DECODE_TABLE.with(|t| {
        let mut t = t.borrow_mut();
        t.as_mut()?.get_mut(index as usize)?.take()
    })
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
    struct Point {
        x: i32,
        name: String,
    }

    #[test]
    fn round_trip() {
        let p = Point {
            x: -7,
            name: "héllo".into(),
        };
        let packet = encode(&p, 1 << 20, 0).unwrap();
        assert!(packet.handles.is_empty());
        let v = Validated::<Point>::new(Body::Owned(packet.bytes)).unwrap();
        assert_eq!(v.archived().x, -7);
        assert_eq!(v.archived().name, "héllo");
        let back: Point = decode(v.archived(), &mut Vec::new()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn too_large_is_refused_while_writing() {
        let p = Point {
            x: 1,
            name: "x".repeat(1000),
        };
        match encode(&p, 100, 0) {
            Err(Error::TooLarge { limit: 100, .. }) => {}
            other => panic!("expected TooLarge, got {:?}", other.err()),
        }
    }

    #[test]
    fn invalid_utf8_fails_validation() {
        let p = encode(
            &Point {
                x: 1,
                name: "ab".into(),
            },
            1 << 20,
            64,
        )
        .unwrap();
        let at = p
            .bytes
            .windows(2)
            .position(|w| w == b"ab")
            .expect("short strings are stored inline");
        let mut bad = Bytes::new();
        bad.extend_from_slice(&p.bytes);
        bad[at] = 0xc3;
        bad[at + 1] = 0x28;
        assert!(Validated::<Point>::new(Body::Owned(p.bytes)).is_ok());
        assert!(Validated::<Point>::new(Body::Owned(bad)).is_err());
    }

    #[test]
    fn fingerprints_differ_by_type() {
        assert_ne!(fingerprint::<Point>(), fingerprint::<u64>());
        assert_eq!(fingerprint::<u64>(), fingerprint::<u64>());
    }
}
