//! `copy`: forward messages from a receiver to a sender without deserializing them.

use std::fmt;

use super::inbox::{PopError, PushError, Wait};
use super::{Receiver, Sender};
use crate::message::Message;

/// `copy` stopped because one side broke; `copied` messages were forwarded before it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyError {
    /// Messages forwarded before the failure.
    pub copied: usize,
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "copy broke off after {} messages", self.copied)
    }
}

impl std::error::Error for CopyError {}

/// Forwards every message from `rx` to `tx`, handles included, without deserializing them,
/// until every sender into `rx` is gone. Returns how many messages it forwarded.
///
/// This is how a process proxies a channel: replies carried by the forwarded messages keep
/// working end to end.
///
/// ```
/// let (tx_in, rx_in) = libchan::pipe::<u32>();
/// let (tx_out, rx_out) = libchan::pipe::<u32>();
/// let proxy = std::thread::spawn(move || libchan::copy(&rx_in, &tx_out));
/// for i in 0..3 {
///     tx_in.send(i).unwrap();
/// }
/// drop(tx_in);
/// assert_eq!(proxy.join().unwrap(), Ok(3));
/// assert_eq!(rx_out.iter().map(|m| *m).collect::<Vec<_>>(), [0, 1, 2]);
/// ```
///
/// # Errors
///
/// Fails when `rx`'s channel breaks (the peer died) or `tx`'s receiver is gone; the message in
/// hand is dropped then, and the error says how many were forwarded.
pub fn copy<T: Message>(rx: &Receiver<T>, tx: &Sender<T>) -> Result<usize, CopyError> {
    let mut copied = 0;
    loop {
        let entry = match rx.pop_raw(Wait::Forever) {
            Ok(e) => e,
            Err(PopError::Closed) => return Ok(copied),
            Err(_) => return Err(CopyError { copied }),
        };
        if let Some(c) = &entry.credit {
            c.consumed(entry.body_len());
        }
        let packet = entry.into_packet();
        if packet.bytes.len() > tx.core.max_message() {
            return Err(CopyError { copied });
        }
        match tx.core.send(packet, Wait::Forever) {
            Ok(()) => copied += 1,
            Err(PushError::Disconnected | PushError::Full | PushError::Timeout) => {
                return Err(CopyError { copied })
            }
        }
    }
}
