//! `Receiver<T>` and `Msg<T>`: the typed receiving end and the guard over one message.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rkyv::rancor::{Fallible, Source};
use rkyv::{Archive, Deserialize, Place, Serialize};

use super::handle::{Handle, RecvCore};
use super::inbox::{Entry, PopError, Wait};
use crate::error::{InvalidMessage, RecvError, RecvTimeoutError, TakeError, TryRecvError};
use crate::message::{
    self, fingerprint, ArchivedHandle, Body, HandleIndex, Lent, Message, Validated,
};

/// The receiving end of a channel.
///
/// A `Receiver` can be a field of a message: the receiver of that message then receives what
/// is sent into the channel, wherever it runs.
///
/// ```
/// let (tx, rx) = libchan::pipe::<String>();
/// tx.send("hi".to_string()).unwrap();
/// drop(tx);
/// assert_eq!(rx.recv().unwrap().as_str(), "hi");
/// assert_eq!(rx.recv().unwrap_err(), libchan::RecvError::Closed);
/// ```
pub struct Receiver<T> {
    pub(crate) core: RecvCore,
    _t: PhantomData<fn() -> T>,
}

/// The archived form of a [`Receiver`]: an index into its message's handles.
pub type ArchivedReceiver<T> = ArchivedHandle<Receiver<T>>;

/// One received message, validated and read in place.
///
/// `Msg<T>` dereferences to `T`'s archived form, so fields are read without deserializing.
/// Handles that the message carries are resolved with [`take`](Msg::take), or all at once by
/// [`into_owned`](Msg::into_owned); handles never taken are closed when the `Msg` drops.
///
/// On a ring channel (a shared-memory session, or in process) a `Msg` is read where it arrived
/// and holds that room until it drops. Rings reuse their room in order, so a `Msg` kept for a
/// long time also holds back the room of everything sent after it: once about a ring's worth
/// has followed it (4 MiB on a shared-memory session; in process, 256 bytes per message of
/// capacity, from 4 KiB to 1 MiB), the sender waits for room. Keep a message beyond that with
/// [`into_owned`](Msg::into_owned), or copy what you need out of it.
///
/// ```
/// #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
/// struct Req { n: u32, reply: libchan::Sender<u32> }
///
/// let (tx, rx) = libchan::pipe::<Req>();
/// let (reply_tx, reply_rx) = libchan::pipe::<u32>();
/// tx.send(Req { n: 20, reply: reply_tx }).unwrap();
///
/// let req = rx.recv().unwrap();
/// let reply = req.take(&req.reply).unwrap();
/// reply.send(req.n.to_native() + 1).unwrap();
/// assert_eq!(*reply_rx.recv().unwrap(), 21);
/// ```
pub struct Msg<T: Message> {
    archive: Validated<T>,
    handles: Mutex<Vec<Option<Handle>>>,
}

impl<T: Message> Receiver<T> {
    pub(crate) fn from_core(core: RecvCore) -> Self {
        Self {
            core,
            _t: PhantomData,
        }
    }

    /// Waits for the next message.
    ///
    /// # Errors
    ///
    /// `Closed` once every sender is gone and every message was received; `Disconnected` when
    /// the peer died or the session broke; `Invalid` for one message that failed validation
    /// (the next call reads the next message).
    pub fn recv(&self) -> Result<Msg<T>, RecvError> {
        self.recv_with(Wait::Forever).map_err(|e| match e {
            RecvTimeoutError::Closed | RecvTimeoutError::Timeout => RecvError::Closed,
            RecvTimeoutError::Disconnected => RecvError::Disconnected,
            RecvTimeoutError::Invalid(i) => RecvError::Invalid(i),
        })
    }

    /// Takes the next message if one is ready.
    ///
    /// # Errors
    ///
    /// `Empty` when none is ready; otherwise as [`recv`](Self::recv).
    pub fn try_recv(&self) -> Result<Msg<T>, TryRecvError> {
        self.recv_with(Wait::No).map_err(|e| match e {
            RecvTimeoutError::Timeout => TryRecvError::Empty,
            RecvTimeoutError::Closed => TryRecvError::Closed,
            RecvTimeoutError::Disconnected => TryRecvError::Disconnected,
            RecvTimeoutError::Invalid(i) => TryRecvError::Invalid(i),
        })
    }

    /// Waits at most `timeout` for the next message.
    ///
    /// # Errors
    ///
    /// `Timeout` when none arrived in time; otherwise as [`recv`](Self::recv).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Msg<T>, RecvTimeoutError> {
        let wait = Instant::now()
            .checked_add(timeout)
            .map_or(Wait::Forever, Wait::Until);
        self.recv_with(wait)
    }

    /// An iterator that receives until the channel closes or breaks.
    pub fn iter(&self) -> impl Iterator<Item = Msg<T>> + '_ {
        std::iter::from_fn(move || loop {
            match self.recv() {
                Ok(m) => return Some(m),
                Err(RecvError::Invalid(_)) => continue,
                Err(_) => return None,
            }
        })
    }

    /// Number of messages waiting to be received.
    pub fn len(&self) -> usize {
        self.core.0.len()
    }

    /// True when no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn recv_with(&self, wait: Wait) -> Result<Msg<T>, RecvTimeoutError> {
        if let Some(lent) = self.core.take_lent() {
            return Msg::from_lent(lent).map_err(RecvTimeoutError::Invalid);
        }
        let entry = self.core.pop(wait).map_err(|e| match e {
            PopError::Empty | PopError::Timeout => RecvTimeoutError::Timeout,
            PopError::Closed => RecvTimeoutError::Closed,
            PopError::Disconnected => RecvTimeoutError::Disconnected,
        })?;
        Msg::from_entry(entry).map_err(RecvTimeoutError::Invalid)
    }

    pub(crate) fn pop_raw(&self, wait: Wait) -> Result<Entry, PopError> {
        self.core.pop(wait)
    }
}

impl<T: Message> Msg<T> {
    pub(crate) fn from_entry(entry: Entry) -> Result<Self, InvalidMessage> {
        if let Some(c) = &entry.credit {
            c.consumed(entry.body_len());
        }
        let Entry { packet, lent, .. } = entry;
        let body = match lent {
            Some(lent) => Body::Lent(lent),
            None => Body::Owned(packet.bytes),
        };
        let archive = Validated::new(body)?;
        let handles = if packet.handles.is_empty() {
            Vec::new()
        } else {
            packet.handles.into_iter().map(Some).collect()
        };
        Ok(Self {
            archive,
            handles: Mutex::new(handles),
        })
    }

    /// A message that carries no handles, read in place (the receive fast path).
    fn from_lent(lent: Lent) -> Result<Self, InvalidMessage> {
        Ok(Self {
            archive: Validated::new(Body::Lent(lent))?,
            handles: Mutex::new(Vec::new()),
        })
    }

    /// Resolves a handle field of this message (a `Sender`, `Receiver`, `Fd` or `ByteStream`).
    ///
    /// # Errors
    ///
    /// `Taken` when it was already taken, `Invalid` when the message does not carry a handle
    /// of that kind at that index, `TypeMismatch` for a channel of another message type.
    pub fn take<H: HandleIndex>(&self, field: &ArchivedHandle<H>) -> Result<H::Owned, TakeError> {
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        let slot = handles
            .get_mut(field.index() as usize)
            .ok_or(TakeError::Invalid)?;
        let handle = slot.take().ok_or(TakeError::Taken)?;
        H::from_handle(handle).map_err(|(h, e)| {
            *slot = Some(h);
            e
        })
    }

    /// Deserializes the whole message, resolving every handle it carries that was not taken.
    ///
    /// # Errors
    ///
    /// Fails when a handle field was already taken or names a handle of the wrong kind.
    pub fn into_owned(self) -> Result<T, InvalidMessage> {
        let mut handles = self.handles.into_inner().unwrap_or_else(|e| e.into_inner());
        message::decode::<T>(self.archive.archived(), &mut handles)
    }

    /// The archive bytes of this message, exactly as they travelled.
    pub fn as_bytes(&self) -> &[u8] {
        self.archive.bytes()
    }
}

impl<T: Message> Deref for Msg<T> {
    type Target = T::Archived;

    fn deref(&self) -> &T::Archived {
        self.archive.archived()
    }
}

impl<T: Message> fmt::Debug for Msg<T>
where
    T::Archived: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Msg").field(&**self).finish()
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Receiver { .. }")
    }
}

impl<T: Message> HandleIndex for Receiver<T> {
    type Owned = Receiver<T>;

    #[allow(private_interfaces)]
    fn from_handle(handle: Handle) -> Result<Receiver<T>, (Handle, TakeError)> {
        match handle {
            Handle::Receiver(core, fp) if fp == fingerprint::<T>() => Ok(Receiver::from_core(core)),
            h @ Handle::Receiver(..) => Err((h, TakeError::TypeMismatch)),
            other => Err((other, TakeError::Invalid)),
        }
    }
}

impl<T: Message> Archive for Receiver<T> {
    type Archived = ArchivedReceiver<T>;
    type Resolver = u32;

    fn resolve(&self, resolver: u32, out: Place<Self::Archived>) {
        ArchivedHandle::resolve(resolver, out);
    }
}

impl<T: Message, S: Fallible + ?Sized> Serialize<S> for Receiver<T>
where
    S::Error: Source,
{
    fn serialize(&self, _: &mut S) -> Result<u32, S::Error> {
        message::serialize_handle(Handle::Receiver(self.core.share(), fingerprint::<T>()))
    }
}

impl<T: Message, D: Fallible + ?Sized> Deserialize<Receiver<T>, D> for ArchivedReceiver<T>
where
    D::Error: Source,
{
    fn deserialize(&self, _: &mut D) -> Result<Receiver<T>, D::Error> {
        message::deserialize_handle::<Receiver<T>, D::Error>(self.index())
    }
}
