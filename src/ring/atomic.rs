//! The one place the ring imports its atomics from, and the traits that let a loom model swap
//! them.
//!
//! The ring forms `&AtomicU64`/`&AtomicU32` over raw region bytes, which relies on std's atomics
//! having the layout of the plain integer; loom's atomics do not. So the ring does not swap its
//! atomics crate-wide under `--cfg libchan_loom`: it reaches its shared words through
//! [`Memory`](super::spsc::Memory), whose word types implement [`Atomic32`]/[`Atomic64`]. Every
//! real region (heap, memfd) uses std's atomics, in every build; the loom models
//! (`ring::loom_models`, built only under `--cfg libchan_loom`) give the same ring code a memory
//! whose words are loom's atomics. The rest of the crate never sees a loom type, so it builds
//! unchanged under that cfg.

#[allow(unused_imports)]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// The operations the ring performs on a 32-bit shared word (commit words, doorbells).
pub(crate) trait Atomic32 {
    /// As [`AtomicU32::load`].
    fn load(&self, order: Ordering) -> u32;
    /// As [`AtomicU32::store`].
    fn store(&self, value: u32, order: Ordering);
    /// As [`AtomicU32::swap`].
    fn swap(&self, value: u32, order: Ordering) -> u32;
}

/// The operations the ring performs on a 64-bit shared word (`head`, `tail`).
pub(crate) trait Atomic64 {
    /// As [`AtomicU64::load`].
    fn load(&self, order: Ordering) -> u64;
    /// As [`AtomicU64::store`].
    fn store(&self, value: u64, order: Ordering);
}

/// Forwards the trait methods to the inherent ones of an atomic type with std's signatures.
macro_rules! forward {
    ($u32:ty, $u64:ty) => {
        impl Atomic32 for $u32 {
            #[inline]
            fn load(&self, order: Ordering) -> u32 {
                <$u32>::load(self, order)
            }
            #[inline]
            fn store(&self, value: u32, order: Ordering) {
                <$u32>::store(self, value, order)
            }
            #[inline]
            fn swap(&self, value: u32, order: Ordering) -> u32 {
                <$u32>::swap(self, value, order)
            }
        }

        impl Atomic64 for $u64 {
            #[inline]
            fn load(&self, order: Ordering) -> u64 {
                <$u64>::load(self, order)
            }
            #[inline]
            fn store(&self, value: u64, order: Ordering) {
                <$u64>::store(self, value, order)
            }
        }
    };
}

forward!(AtomicU32, AtomicU64);

#[cfg(all(test, libchan_loom))]
forward!(loom::sync::atomic::AtomicU32, loom::sync::atomic::AtomicU64);
