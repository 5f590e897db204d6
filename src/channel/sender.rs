//! `Sender<T>`: the typed sending end of a channel.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rkyv::rancor::{Fallible, Source};
use rkyv::{Archive, Deserialize, Place, Serialize};

use super::handle::{Handle, SendCore};
use super::inbox::{PushError, Wait};
use crate::error::{Error, SendError, SendTimeoutError, TakeError, TrySendError};
use crate::message::{self, fingerprint, ArchivedHandle, HandleIndex, Message};

/// The sending end of a channel. Cheap to clone; the channel closes when every clone is gone.
///
/// A `Sender` can itself be a field of a message: the receiver of that message gets a `Sender`
/// into the same channel, wherever it runs.
///
/// ```
/// let (tx, rx) = libchan::pipe::<u64>();
/// let tx2 = tx.clone();
/// std::thread::spawn(move || tx2.send(7).unwrap());
/// assert_eq!(*rx.recv().unwrap(), 7);
/// ```
pub struct Sender<T> {
    pub(crate) core: SendCore,
    /// Size of the last message this end encoded: the next buffer starts that large.
    size_hint: AtomicUsize,
    /// Size of the last archive written in place (see `send_in_place`); `NO_IN_PLACE` once a
    /// message turned out to carry handles, which cannot be written in place.
    slot_hint: AtomicUsize,
    /// The last two archives written in place had the same size (see `send_in_place`).
    slot_same: AtomicBool,
    _t: PhantomData<fn(T)>,
}

/// Smallest buffer a message is encoded into.
const MIN_BUFFER: usize = 256;

/// `slot_hint` value for "this sender's messages carry handles: do not try in place".
const NO_IN_PLACE: usize = usize::MAX;

/// The archived form of a [`Sender`]: an index into its message's handles.
pub type ArchivedSender<T> = ArchivedHandle<Sender<T>>;

impl<T: Message> Sender<T> {
    pub(crate) fn from_core(core: SendCore) -> Self {
        Self {
            core,
            size_hint: AtomicUsize::new(MIN_BUFFER),
            slot_hint: AtomicUsize::new(0),
            slot_same: AtomicBool::new(false),
            _t: PhantomData,
        }
    }

    /// Sends a message, waiting while the channel is full.
    ///
    /// The message is serialized straight into the channel; handles it carries (channel ends,
    /// fds, byte streams) go with it.
    ///
    /// # Errors
    ///
    /// Returns the message when the receiving side is gone, or when it cannot be serialized
    /// (for example, when it exceeds the size limit: see [`Sender::send_checked`] for the
    /// reason).
    pub fn send(&self, msg: T) -> Result<(), SendError<T>> {
        match self.send_with(msg, Wait::Forever) {
            Ok(()) => Ok(()),
            Err((msg, _)) => Err(SendError(msg)),
        }
    }

    /// Like [`send`](Self::send), but reports why a message could not be sent.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`] or [`Error::Encode`] when the message cannot be serialized,
    /// [`Error::Disconnected`] when the receiving side is gone; the message comes back with the
    /// error.
    pub fn send_checked(&self, msg: T) -> Result<(), (T, Error)> {
        match self.send_with(msg, Wait::Forever) {
            Ok(()) => Ok(()),
            Err((msg, Some(e))) => Err((msg, e)),
            Err((msg, None)) => Err((msg, Error::Disconnected)),
        }
    }

    /// Sends a message if the channel has room now.
    ///
    /// # Errors
    ///
    /// `Full` when the receiver is behind, `Disconnected` when it is gone (or the message cannot
    /// be serialized); both return the message.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        match self.send_with(msg, Wait::No) {
            Ok(()) => Ok(()),
            Err((msg, None)) if !self.core.is_disconnected() => Err(TrySendError::Full(msg)),
            Err((msg, _)) => Err(TrySendError::Disconnected(msg)),
        }
    }

    /// Sends a message, waiting at most `timeout` for room.
    ///
    /// # Errors
    ///
    /// `Timeout` when the channel stayed full, `Disconnected` when the receiver is gone; both
    /// return the message.
    pub fn send_timeout(&self, msg: T, timeout: Duration) -> Result<(), SendTimeoutError<T>> {
        let wait = Instant::now()
            .checked_add(timeout)
            .map_or(Wait::Forever, Wait::Until);
        match self.send_with(msg, wait) {
            Ok(()) => Ok(()),
            Err((msg, None)) if !self.core.is_disconnected() => Err(SendTimeoutError::Timeout(msg)),
            Err((msg, _)) => Err(SendTimeoutError::Disconnected(msg)),
        }
    }

    /// True when the receiving side is gone: every further send fails.
    pub fn is_disconnected(&self) -> bool {
        self.core.is_disconnected()
    }

    /// Encodes and sends. On failure returns the message and, when the failure was not about
    /// room or the receiver, the error that explains it.
    fn send_with(&self, msg: T, wait: Wait) -> Result<(), (T, Option<Error>)> {
        if self.core.is_disconnected() {
            return Err((msg, Some(Error::Disconnected)));
        }
        if let Some(sent) = self.send_in_place(&msg, wait) {
            return match sent {
                Ok(()) => Ok(()),
                Err(PushError::Disconnected) => Err((msg, Some(Error::Disconnected))),
                Err(PushError::Full | PushError::Timeout) => Err((msg, None)),
            };
        }
        let hint = self.size_hint.load(Ordering::Relaxed);
        let packet = match message::encode(&msg, self.core.max_message(), hint) {
            Ok(p) => p,
            Err(e) => return Err((msg, Some(e))),
        };
        if packet.bytes.len() > hint {
            self.size_hint.store(packet.bytes.len(), Ordering::Relaxed);
        }
        if self.slot_hint.load(Ordering::Relaxed) != NO_IN_PLACE {
            let next = if packet.handles.is_empty() {
                packet.bytes.len()
            } else {
                NO_IN_PLACE
            };
            self.slot_hint.store(next, Ordering::Relaxed);
            self.slot_same.store(false, Ordering::Relaxed);
        }
        if let Err(e) = self.core.check_handles(&packet) {
            return Err((msg, Some(e)));
        }
        match self.core.send(packet, wait) {
            Ok(()) => Ok(()),
            // The packet's handles are duplicates owned by the packet: dropping it releases
            // them, and `msg` still owns the originals.
            Err(PushError::Disconnected) => Err((msg, Some(Error::Disconnected))),
            Err(PushError::Full | PushError::Timeout) => Err((msg, None)),
        }
    }
}

impl<T: Message> Sender<T> {
    /// Serializes `msg` straight into the channel's ring, when it has one: no buffer, no copy.
    /// `None` when the message must take the buffered path (no ring, larger than the space
    /// offered, or carrying handles).
    fn send_in_place(&self, msg: &T, wait: Wait) -> Option<Result<(), PushError>> {
        let last = self.slot_hint.load(Ordering::Relaxed);
        if last == NO_IN_PLACE {
            return None;
        }
        // Room for the last size and an eighth more (every byte reserved is a byte the
        // receiver's cache must fetch); a message that outgrows it is encoded into a buffer
        // once, and its size becomes the next estimate. When the last two were the same size,
        // just that: the record then ends where the archive does, with no padding record
        // behind it for the receiver to skip.
        let slack = if self.slot_same.load(Ordering::Relaxed) {
            0
        } else {
            last / 8
        };
        let estimate = (last + slack).next_multiple_of(16).max(64);
        let mut wrote = 0;
        let sent = self.core.send_in_place(estimate, wait, &mut |at, cap| {
            // SAFETY: the transport hands out `at..at + cap` as an unpublished, 16-byte aligned
            // ring record that nothing else reads or references until it is committed.
            let n = unsafe { message::encode_in_place(msg, at, cap) }?;
            wrote = n;
            Some(n)
        });
        if matches!(sent, Some(Ok(()))) {
            self.slot_same.store(wrote == last, Ordering::Relaxed);
            self.slot_hint.store(wrote, Ordering::Relaxed);
        }
        sent
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            size_hint: AtomicUsize::new(self.size_hint.load(Ordering::Relaxed)),
            slot_hint: AtomicUsize::new(self.slot_hint.load(Ordering::Relaxed)),
            slot_same: AtomicBool::new(self.slot_same.load(Ordering::Relaxed)),
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sender { .. }")
    }
}

impl<T: Message> HandleIndex for Sender<T> {
    type Owned = Sender<T>;

    #[allow(private_interfaces)]
    fn from_handle(handle: Handle) -> Result<Sender<T>, (Handle, TakeError)> {
        match handle {
            Handle::Sender(core, fp) if fp == fingerprint::<T>() => Ok(Sender::from_core(core)),
            h @ Handle::Sender(..) => Err((h, TakeError::TypeMismatch)),
            other => Err((other, TakeError::Invalid)),
        }
    }
}

impl<T: Message> Archive for Sender<T> {
    type Archived = ArchivedSender<T>;
    type Resolver = u32;

    fn resolve(&self, resolver: u32, out: Place<Self::Archived>) {
        ArchivedHandle::resolve(resolver, out);
    }
}

impl<T: Message, S: Fallible + ?Sized> Serialize<S> for Sender<T>
where
    S::Error: Source,
{
    fn serialize(&self, _: &mut S) -> Result<u32, S::Error> {
        message::serialize_handle(Handle::Sender(self.core.clone(), fingerprint::<T>()))
    }
}

impl<T: Message, D: Fallible + ?Sized> Deserialize<Sender<T>, D> for ArchivedSender<T>
where
    D::Error: Source,
{
    fn deserialize(&self, _: &mut D) -> Result<Sender<T>, D::Error> {
        message::deserialize_handle::<Sender<T>, D::Error>(self.index())
    }
}
