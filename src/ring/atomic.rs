//! The one place the ring imports its atomics from.
//!
//! Normally these are `std`'s atomics; under `--cfg libchan_loom` they are loom's, so that loom
//! models can explore every interleaving of the ring's protocol (the tokio pattern). loom is not
//! a dependency yet: the cfg'd line is the hook the loom models will use.
//!
//! Note for those models: the ring forms `&AtomicU64`/`&AtomicU32` over raw region bytes, which
//! relies on std's atomics having the layout of the plain integer. loom's atomics do not, so a
//! loom model needs a region whose header and commit words are real loom atomics.

#[cfg(not(libchan_loom))]
#[allow(unused_imports)]
// `fence` is for the futex doorbell (store/fence/load handshake), next.
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(libchan_loom)]
#[allow(unused_imports)]
// `fence` is for the futex doorbell (store/fence/load handshake), next.
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
