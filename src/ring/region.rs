//! The memory a ring lives in: a base pointer and a length, owned by someone else.
//!
//! A ring never allocates, maps or unmaps anything (and never makes a syscall): it is handed a
//! [`Region`] and lays its header and data area out inside it. Two implementations are planned:
//! [`HeapRegion`] (an aligned heap allocation, used by tests, miri and the in-process transport)
//! and a memfd mapping (`memmap2::MmapRaw`, in the shared-memory transport), which another
//! process maps too.
//!
//! Invariants every region upholds (the [`Region`] safety contract): the pointer is aligned to
//! [`REGION_ALIGN`], all `len` bytes are initialised, readable and writable for as long as the
//! region lives, and nobody holds a Rust reference (`&`/`&mut`) over them. Memory a peer process
//! can write is only ever touched through raw pointers and atomics.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

/// The alignment every region's base pointer has: two cache lines on x86 (adjacent-line
/// prefetch) and one on Apple silicon, so the ring's index lines never share a line.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const REGION_ALIGN: usize = 128;

/// Memory a ring can live in.
///
/// # Safety
///
/// Implementors guarantee, for as long as the value (or any clone of it) is alive:
/// - `as_ptr()` is non-null, aligned to [`REGION_ALIGN`], and returns the same pointer on every
///   call; `len()` returns the same length on every call;
/// - the `len()` bytes from `as_ptr()` are initialised (a fresh region is zero-filled), and valid
///   for reads and writes through that pointer, from any thread;
/// - no `&`/`&mut` reference to those bytes exists outside the ring code using the region.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) unsafe trait Region {
    /// The base of the region.
    fn as_ptr(&self) -> *mut u8;
    /// The length of the region in bytes.
    fn len(&self) -> usize;
}

/// A zero-filled heap allocation aligned to [`REGION_ALIGN`], freed on drop.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug)]
pub(crate) struct HeapRegion {
    base: NonNull<u8>,
    layout: Layout,
}

#[cfg_attr(not(test), allow(dead_code))]
impl HeapRegion {
    /// Allocates `len` zeroed bytes aligned to [`REGION_ALIGN`].
    ///
    /// # Panics
    ///
    /// If `len` is zero or too large for a `Layout`. Aborts (through
    /// [`alloc::handle_alloc_error`]) if the allocation fails.
    pub(crate) fn new(len: usize) -> Self {
        assert!(len > 0, "a region cannot be empty");
        let layout = Layout::from_size_align(len, REGION_ALIGN).expect("region too large");
        // SAFETY: `alloc_zeroed` requires a layout of non-zero size; `len > 0` was asserted.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(base) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        Self { base, layout }
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: `dealloc` requires that the pointer was allocated by the global allocator with
        // this same layout (it was, in `new`) and is not freed twice (drop runs once). No
        // reference into the region outlives it: rings borrow the region they live in.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

// SAFETY: `HeapRegion` owns its allocation outright; the raw pointer is what makes it !Send by
// default, not any thread affinity. Moving it to another thread and freeing it there is fine.
unsafe impl Send for HeapRegion {}

// SAFETY: `&HeapRegion` only hands out the base pointer and the length; every access through the
// pointer is made by ring code that synchronises through atomics in the region itself.
unsafe impl Sync for HeapRegion {}

// SAFETY: the pointer comes from `alloc_zeroed` with alignment `REGION_ALIGN` (non-null checked
// in `new`), is zero-filled, valid for `layout.size()` bytes until drop, and never changes; this
// type never creates references to the bytes.
unsafe impl Region for HeapRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    fn len(&self) -> usize {
        self.layout.size()
    }
}

// SAFETY: an `Arc` keeps its region alive as long as any clone lives and forwards to it, so the
// inner region's guarantees carry over unchanged.
unsafe impl<R: Region + ?Sized> Region for Arc<R> {
    fn as_ptr(&self) -> *mut u8 {
        (**self).as_ptr()
    }

    fn len(&self) -> usize {
        (**self).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_region_is_aligned_and_zeroed() {
        for len in [1, 128, 4096 + 256, 100_000] {
            let region = HeapRegion::new(len);
            assert_eq!(region.len(), len);
            assert_eq!(region.as_ptr() as usize % REGION_ALIGN, 0);
            // SAFETY: the region is valid for reads of `len` initialised bytes and nothing else
            // accesses it while this slice lives (it is local to this test).
            let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
            assert!(bytes.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn arc_forwards() {
        let region = Arc::new(HeapRegion::new(256));
        let clone = Arc::clone(&region);
        assert_eq!(region.as_ptr(), clone.as_ptr());
        assert_eq!(Region::len(&clone), 256);
    }
}
