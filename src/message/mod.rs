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

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::Arc;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::rancor;
use rkyv::ser::allocator::{Arena, ArenaHandle};
use rkyv::ser::sharing::Share;
use rkyv::ser::writer::{Positional, Writer};
use rkyv::ser::Serializer;
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
    fn encode_into(
        &self,
        out: LimitedVec,
        arena: ArenaHandle<'_>,
    ) -> Result<LimitedVec, rancor::Error>;
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
    #[inline]
    fn encode_into(
        &self,
        out: LimitedVec,
        arena: ArenaHandle<'_>,
    ) -> Result<LimitedVec, rancor::Error> {
        // What `rkyv::to_bytes_in` does, minus its thread-local arena: `encode_with` lends one.
        let mut serializer = Serializer::new(out, arena, Share::new());
        rkyv::api::serialize_using(self, &mut serializer)?;
        Ok(serializer.into_writer())
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
    OVERFLOWED.set(false);
    encode_with(value, out, |result, handles| match result {
        Ok(out) if !out.overflow => Ok(Packet {
            bytes: out.vec,
            handles,
        }),
        Ok(out) => Err(Error::TooLarge {
            size: out.vec.len(),
            limit,
        }),
        // Every refused write sets `OVERFLOWED`, in debug and release builds alike.
        Err(e) => {
            if OVERFLOWED.replace(false) {
                Err(Error::TooLarge {
                    size: limit + 1,
                    limit,
                })
            } else {
                Err(Error::Encode(e.to_string()))
            }
        }
    })
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

impl LimitedVec {
    /// Records that a write was refused for going past the limit.
    #[cold]
    #[inline(never)]
    fn overflowed<E: rancor::Source>(&mut self) -> E {
        self.overflow = true;
        // The writer is lost with the error it returns, and in a release build rancor's error
        // carries no message: the thread remembers the overflow for `encode` to report.
        OVERFLOWED.set(true);
        E::new(LimitError)
    }
}

impl Positional for LimitedVec {
    #[inline]
    fn pos(&self) -> usize {
        match self.slot {
            Some(_) => self.slot_len,
            None => self.vec.len(),
        }
    }
}

impl<E: rancor::Source> Writer<E> for LimitedVec {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        match self.slot {
            Some(base) => {
                if self.slot_len + bytes.len() > self.limit {
                    return Err(self.overflowed());
                }
                // SAFETY: `encode_in_place`'s contract makes `base..base + limit` valid for
                // writes and unaliased by references; `slot_len + bytes.len() <= limit` was
                // checked just above, and `bytes` is a Rust slice, so it cannot overlap the slot.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        base.as_ptr().add(self.slot_len),
                        bytes.len(),
                    );
                }
                self.slot_len += bytes.len();
            }
            None => {
                if self.vec.len() + bytes.len() > self.limit {
                    return Err(self.overflowed());
                }
                self.vec.extend_from_slice(bytes);
            }
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
    encode_with(value, out, |result, handles| match result {
        Ok(out) if !out.overflow && handles.is_empty() => Some(out.slot_len),
        // Dropping `handles` releases the duplicates serialization made.
        _ => None,
    })
}

#[derive(Debug)]
struct LimitError;

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(OVERFLOW)
    }
}

impl std::error::Error for LimitError {}

/// What encoding keeps per thread. The two parts are borrowed separately: while a value
/// serializes, its handle fields push to `handles` (`push_handle`) and a nested encode (a
/// `Serialize` impl that encodes another message) finds `arena` empty and uses one of its own.
struct EncodeState {
    /// The handles of the encoding in progress; `None` when there is none.
    handles: RefCell<Option<Vec<Handle>>>,
    /// Serializer scratch space kept between messages (rkyv's `to_bytes_in` takes its own
    /// thread-local arena out, shrinks it and puts it back on every call); taken out while in
    /// use.
    arena: Cell<Option<Arena>>,
}

/// The most arena capacity a thread keeps after a message: a message that needed more gets
/// its scratch space from the allocator, and gives it back when done.
const ARENA_KEEP: usize = 64 * 1024;

thread_local! {
    static ENCODE: EncodeState = const {
        EncodeState {
            handles: RefCell::new(None),
            arena: Cell::new(None),
        }
    };
    static DECODE_TABLE: RefCell<Option<Vec<Option<Handle>>>> = const { RefCell::new(None) };
    /// A `LimitedVec` on this thread refused a write for going past its limit (see
    /// `LimitedVec::overflowed`).
    static OVERFLOWED: Cell<bool> = const { Cell::new(false) };
}

/// Serializes `value` into `out` with this thread's arena, collecting its handles, and hands
/// both to `finish` (called in place, so that the writer is not moved around once more).
#[inline]
fn encode_with<T: Message, R>(
    value: &T,
    out: LimitedVec,
    finish: impl FnOnce(Result<LimitedVec, rancor::Error>, Vec<Handle>) -> R,
) -> R {
    ENCODE.with(|state| {
        // Empty while an encode is in progress on this thread (this one is nested in it).
        let mut arena = state.arena.take().unwrap_or_default();
        let collecting = Collecting {
            prev: state.handles.replace(Some(Vec::new())),
            handles: &state.handles,
        };
        let result = value.encode_into(out, arena.acquire());
        let handles = collecting.finish();
        // One block is left, the largest used; more than `ARENA_KEEP` goes back now. A nested
        // encode may have put its arena back meanwhile: keeping either is as good.
        if arena.shrink() <= ARENA_KEEP {
            state.arena.set(Some(arena));
        }
        finish(result, handles)
    })
}

/// Puts back the handle list of an enclosing encode (or none), also when serialization
/// panics.
struct Collecting<'a> {
    handles: &'a RefCell<Option<Vec<Handle>>>,
    prev: Option<Vec<Handle>>,
}

impl Collecting<'_> {
    /// The handles collected, the enclosing list back in place.
    fn finish(mut self) -> Vec<Handle> {
        let mine = self.handles.replace(self.prev.take());
        // Nothing is left to drop or to restore (`prev` is `None`).
        std::mem::forget(self);
        mine.unwrap_or_default()
    }
}

impl Drop for Collecting<'_> {
    fn drop(&mut self) {
        // Only reached by unwinding. `push_handle` holds the borrow only while pushing, so it
        // is free here; the handles collected so far are released once it is given back.
        let mine = match self.handles.try_borrow_mut() {
            Ok(mut handles) => std::mem::replace(&mut *handles, self.prev.take()),
            Err(_) => None,
        };
        drop(mine);
    }
}

/// Registers a handle with the encoding in progress on this thread; returns its index, or
/// `None` when the value is being serialized outside libchan (by `rkyv::to_bytes` directly).
pub(crate) fn push_handle(handle: Handle) -> Option<u32> {
    ENCODE.with(|state| {
        let mut h = state.handles.borrow_mut();
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

    #[derive(Archive, Serialize, Deserialize)]
    struct Inner {
        a: crate::Sender<u64>,
        b: crate::Sender<u64>,
    }

    thread_local! {
        /// What the nested encode in `NestedEncode` produced.
        static INNER: RefCell<Option<Packet>> = const { RefCell::new(None) };
    }

    /// Serializes a `Sender` field after encoding another message that carries handles of its
    /// own, on the same thread: an encode nested in one in progress.
    struct NestedEncode;

    impl rkyv::with::ArchiveWith<crate::Sender<u64>> for NestedEncode {
        type Archived = crate::ArchivedSender<u64>;
        type Resolver = u32;

        fn resolve_with(field: &crate::Sender<u64>, index: u32, out: rkyv::Place<Self::Archived>) {
            field.resolve(index, out);
        }
    }

    impl<S> rkyv::with::SerializeWith<crate::Sender<u64>, S> for NestedEncode
    where
        S: rancor::Fallible + ?Sized,
        S::Error: rancor::Source,
    {
        fn serialize_with(field: &crate::Sender<u64>, s: &mut S) -> Result<u32, S::Error> {
            let inner = Inner {
                a: field.clone(),
                b: field.clone(),
            };
            let packet = encode(&inner, 1 << 20, 0).expect("nested encode");
            INNER.with(|i| *i.borrow_mut() = Some(packet));
            field.serialize(s)
        }
    }

    impl<D> rkyv::with::DeserializeWith<crate::ArchivedSender<u64>, crate::Sender<u64>, D>
        for NestedEncode
    where
        D: rancor::Fallible + ?Sized,
        D::Error: rancor::Source,
    {
        fn deserialize_with(
            field: &crate::ArchivedSender<u64>,
            d: &mut D,
        ) -> Result<crate::Sender<u64>, D::Error> {
            field.deserialize(d)
        }
    }

    #[derive(Archive, Serialize, Deserialize)]
    struct Outer {
        before: crate::Sender<u64>,
        #[rkyv(with = NestedEncode)]
        nested: crate::Sender<u64>,
        after: crate::Sender<u64>,
        names: Vec<String>,
    }

    #[test]
    fn nested_encode_keeps_its_handles_apart() {
        let (tx, _rx) = crate::pipe::<u64>();
        let outer = Outer {
            before: tx.clone(),
            nested: tx.clone(),
            after: tx.clone(),
            names: vec!["a".repeat(20); 3],
        };
        for _ in 0..2 {
            let packet = encode(&outer, 1 << 20, 0).unwrap();
            let inner = INNER
                .with(|i| i.borrow_mut().take())
                .expect("nested encode ran");
            assert_eq!(packet.handles.len(), 3);
            assert_eq!(inner.handles.len(), 2);
            let v = Validated::<Outer>::new(Body::Owned(packet.bytes)).unwrap();
            let a = v.archived();
            assert_eq!(
                [a.before.index(), a.nested.index(), a.after.index()],
                [0, 1, 2]
            );
            assert_eq!(a.names.len(), 3);
            let v = Validated::<Inner>::new(Body::Owned(inner.bytes)).unwrap();
            assert_eq!([v.archived().a.index(), v.archived().b.index()], [0, 1]);
        }
        // In place: refused for its handles, the nested encode still done, nothing left over.
        let mut slot = Slot([0; 256]);
        // SAFETY: 256 bytes, 16-byte aligned, named by no reference while `at` is in use.
        let n = unsafe { encode_in_place(&outer, slot.0.as_mut_ptr(), 256) };
        assert_eq!(n, None);
        assert!(INNER.with(|i| i.borrow_mut().take()).is_some());
        assert!(ENCODE.with(|e| e.handles.borrow().is_none()));
        // Serializing a handle outside libchan still fails.
        assert!(rkyv::to_bytes::<rancor::Error>(&outer.before).is_err());
    }

    /// Fails the encode after its first handle: a `Serialize` impl that panics.
    struct Panics;

    impl rkyv::with::ArchiveWith<u8> for Panics {
        type Archived = u8;
        type Resolver = ();

        fn resolve_with(field: &u8, _: (), out: rkyv::Place<u8>) {
            field.resolve((), out);
        }
    }

    impl<S: rancor::Fallible + ?Sized> rkyv::with::SerializeWith<u8, S> for Panics {
        fn serialize_with(_: &u8, _: &mut S) -> Result<(), S::Error> {
            panic!("serialize panics");
        }
    }

    impl<D: rancor::Fallible + ?Sized> rkyv::with::DeserializeWith<u8, u8, D> for Panics {
        fn deserialize_with(field: &u8, _: &mut D) -> Result<u8, D::Error> {
            Ok(*field)
        }
    }

    #[derive(Archive, Serialize, Deserialize)]
    struct Panicky {
        tx: crate::Sender<u64>,
        #[rkyv(with = Panics)]
        boom: u8,
    }

    #[test]
    fn a_panicking_encode_leaves_no_encode_in_progress() {
        let (tx, _rx) = crate::pipe::<u64>();
        let m = Panicky {
            tx: tx.clone(),
            boom: 1,
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            encode(&m, 1 << 20, 0).map(|_| ())
        }));
        assert!(r.is_err());
        assert!(ENCODE.with(|e| e.handles.borrow().is_none()));
        assert!(rkyv::to_bytes::<rancor::Error>(&tx).is_err());
        let packet = encode(&tx, 1 << 20, 0).unwrap();
        assert_eq!(packet.handles.len(), 1);
    }

    #[test]
    fn a_thread_keeps_a_bounded_arena() {
        // Resolvers of 20,000 strings need more scratch space than a thread keeps.
        let big: Vec<String> = (0..20_000).map(|i| format!("{i:>20}")).collect();
        let packet = encode(&big, 1 << 24, 0).unwrap();
        let v = Validated::<Vec<String>>::new(Body::Owned(packet.bytes)).unwrap();
        assert_eq!(v.archived()[19_999].trim_start(), "19999");
        let kept = ENCODE.with(|e| e.arena.take());
        assert!(
            kept.is_none(),
            "an arena that grew past ARENA_KEEP is dropped"
        );
        let small = encode(&payload(), 1 << 20, 0).unwrap();
        assert_eq!(small.bytes.len(), 80);
        let mut arena = ENCODE
            .with(|e| e.arena.take())
            .expect("kept after a small message");
        assert!(arena.shrink() <= ARENA_KEEP);
    }

    /// The 64-byte message of the ping-pong stream, for the measurements below.
    #[derive(Archive, Serialize, Deserialize)]
    struct Payload {
        seq: u64,
        data: Vec<u8>,
    }

    #[repr(align(16))]
    struct Slot([u8; 256]);

    /// Iterations for the measurements: `LIBCHAN_MEASURE_N`, 10 million by default. Run one
    /// under `perf stat -e instructions:u` with N and with 0: the difference over N is the
    /// instructions per message.
    fn measure_n() -> u64 {
        std::env::var("LIBCHAN_MEASURE_N")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(10_000_000)
    }

    fn payload() -> Payload {
        Payload {
            seq: 7,
            data: vec![0xab; 64],
        }
    }

    #[test]
    #[ignore = "measurement"]
    fn measure_encode_in_place() {
        let mut p = payload();
        let mut slot = Slot([0; 256]);
        let at = slot.0.as_mut_ptr();
        for i in 0..measure_n() {
            p.seq = i;
            // SAFETY: `at` points to 256 bytes, 16-byte aligned, that no reference names while
            // `slot` is only used through `at`.
            let n = unsafe { encode_in_place(std::hint::black_box(&p), at, 256) };
            std::hint::black_box(n.expect("fits"));
        }
    }

    #[test]
    #[ignore = "measurement"]
    fn measure_encode() {
        let mut p = payload();
        for i in 0..measure_n() {
            p.seq = i;
            let packet = encode(std::hint::black_box(&p), 1 << 24, 256).unwrap();
            std::hint::black_box(&packet.bytes);
        }
    }

    #[test]
    #[ignore = "measurement"]
    fn measure_validate() {
        let mut bytes = encode(&payload(), 1 << 24, 0).unwrap().bytes;
        for _ in 0..measure_n() {
            let v = Validated::<Payload>::new(Body::Owned(std::hint::black_box(bytes))).unwrap();
            bytes = match v.bytes {
                Body::Owned(b) => b,
                Body::Lent(_) => unreachable!(),
            };
        }
    }

    #[test]
    fn fingerprints_differ_by_type() {
        assert_ne!(fingerprint::<Point>(), fingerprint::<u64>());
        assert_eq!(fingerprint::<u64>(), fingerprint::<u64>());
    }
}
