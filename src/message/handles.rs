//! The archived form of a handle field: an index into the message's handle table.
//!
//! Every handle type (`Sender<T>`, `Receiver<T>`, `Fd`, `ByteStream`) archives as the same
//! four bytes, a little-endian `u32` index; any value is a valid archive, and whether the index
//! names a handle of the right kind is checked when the handle is taken from the message.

use std::marker::PhantomData;

use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::{Fallible, Source};
use rkyv::traits::NoUndef;
use rkyv::{Archived, Place, Portable};

use crate::channel::Handle;
use crate::error::TakeError;

/// The archived form of a handle of kind `K`: an index into the message's handle table.
#[repr(C)]
pub struct ArchivedHandle<K> {
    index: Archived<u32>,
    _kind: PhantomData<fn() -> K>,
}

/// A kind of handle: how to get the owned value back from the untyped handle table.
pub trait HandleIndex {
    /// What [`Msg::take`](crate::Msg::take) returns for this handle.
    type Owned;
    #[doc(hidden)]
    #[allow(private_interfaces)]
    fn from_handle(handle: Handle) -> Result<Self::Owned, (Handle, TakeError)>;
}

impl<K> ArchivedHandle<K> {
    /// Index of this handle in its message's handle table.
    pub(crate) fn index(&self) -> u32 {
        self.index.to_native()
    }

    /// Writes the archived form of handle `index` into `out`.
    pub(crate) fn resolve(index: u32, out: Place<Self>) {
        out.write(Self {
            index: Archived::<u32>::from_native(index),
            _kind: PhantomData,
        });
    }
}

/// Registers `handle` with the encoding in progress, or fails when a handle is serialized
/// outside libchan (for example by calling `rkyv::to_bytes` on a message directly).
pub(crate) fn serialize_handle<E: Source>(handle: Handle) -> Result<u32, E> {
    super::push_handle(handle).ok_or_else(|| E::new(OutsideLibchan))
}

/// Takes the handle at `index` from the decoding in progress.
pub(crate) fn deserialize_handle<K: HandleIndex, E: Source>(index: u32) -> Result<K::Owned, E> {
    let handle = super::take_handle(index).ok_or_else(|| E::new(TakeError::Invalid))?;
    K::from_handle(handle).map_err(|(_, e)| E::new(e))
}

#[derive(Debug)]
struct OutsideLibchan;

impl std::fmt::Display for OutsideLibchan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("handles can only be serialized by libchan's send")
    }
}

impl std::error::Error for OutsideLibchan {}

// SAFETY: `ArchivedHandle` is `repr(C)` with one `u32_le` field and a zero-sized marker, so it
// has no padding and no uninitialised bytes.
unsafe impl<K> NoUndef for ArchivedHandle<K> {}

// SAFETY: the layout is fixed (`repr(C)`, a `u32_le` and a ZST) and independent of the host, and
// the type holds no pointers.
unsafe impl<K> Portable for ArchivedHandle<K> {}

// SAFETY: every bit pattern of a `u32_le` is a valid value and the marker is zero-sized, so any
// aligned pointer to four initialised bytes is a valid `ArchivedHandle`.
unsafe impl<K, C: Fallible + ?Sized> CheckBytes<C> for ArchivedHandle<K> {
    unsafe fn check_bytes(_value: *const Self, _context: &mut C) -> Result<(), C::Error> {
        Ok(())
    }
}

impl<K> std::fmt::Debug for ArchivedHandle<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handle#{}", self.index())
    }
}
