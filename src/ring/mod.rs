//! Lock-free byte rings over memory the ring does not own.
//!
//! This layer is what the same-host transport moves messages through: a ring is laid out inside
//! a [`region::Region`] (heap memory in process, a memfd mapping shared between processes) and
//! carries variable-size records from one producer to one consumer ([`spsc`]). It makes no
//! syscalls, so it runs under miri, and its protocol code runs under loom (`--cfg libchan_loom`:
//! see `loom_models`, and [`spsc::Memory`] for how the ring reaches its memory).
//!
//! The ring treats the region as hostile input when the peer is another process: every index
//! and record length the peer writes is bounds-checked before use, and a value that breaks the
//! protocol is reported as [`Corrupt`] rather than trusted. Corruption can make the ring deliver
//! garbage or stop, never make it access memory outside the region or panic.

// The shared-memory transport will use these; until then only tests do (see the allowances).
mod atomic;
#[cfg(all(test, libchan_loom))]
mod loom_models;
pub(crate) mod region;
pub(crate) mod release;
pub(crate) mod shm;
pub(crate) mod spsc;

use std::fmt;

/// The peer broke the ring protocol: an index or record header in the shared region holds a
/// value no correct peer writes. The ring is unusable afterwards; the session should be torn
/// down.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt {
    what: &'static str,
}

#[cfg_attr(not(test), allow(dead_code))]
impl Corrupt {
    pub(crate) const fn new(what: &'static str) -> Self {
        Self { what }
    }

    /// Which check failed, e.g. `"tail is more than a capacity ahead of head"`.
    pub(crate) const fn what(&self) -> &'static str {
        self.what
    }
}

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corrupt ring: {}", self.what)
    }
}

impl std::error::Error for Corrupt {}
