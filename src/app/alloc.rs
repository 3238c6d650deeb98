//! [`CountingAlloc`]: a global allocator that wraps [`System`] and counts heap bytes.
//!
//! It tracks the bytes currently allocated (as requested by each [`Layout`], not the allocator's
//! own overhead) and the peak since the last [`CountingAlloc::reset_peak`], with atomics, so it
//! counts every thread (candle's and rayon's workers included). The library only defines the
//! type; a binary installs it:
//!
//! ```
//! use lora::app::alloc::CountingAlloc;
//!
//! #[global_allocator]
//! static ALLOC: CountingAlloc = CountingAlloc::new();
//!
//! fn main() {
//!     let base = ALLOC.current();
//!     ALLOC.reset_peak();
//!     let v = vec![1u8; 1 << 20];
//!     assert!(ALLOC.peak() >= base + (1 << 20));
//!     drop(v);
//! }
//! ```
//!
//! This measures heap bytes the process asked for, which is what a training step costs; the
//! resident set size (RSS) does not drop when memory is freed and includes the binary and every
//! mapped page, so it cannot compare two steps run one after the other in one process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A [`GlobalAlloc`] over [`System`] that counts current and peak heap bytes.
#[derive(Debug, Default)]
pub struct CountingAlloc {
    current: AtomicUsize,
    peak: AtomicUsize,
    calls: AtomicUsize,
}

impl CountingAlloc {
    /// A counter at zero, usable in a `static`.
    pub const fn new() -> Self {
        CountingAlloc {
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }
    }

    /// Heap bytes allocated now (requested sizes; everything freed is subtracted).
    pub fn current(&self) -> usize {
        self.current.load(Ordering::SeqCst)
    }

    /// The most bytes allocated at once since the last [`CountingAlloc::reset_peak`] (or start).
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Restarts peak tracking from the current level.
    pub fn reset_peak(&self) {
        self.peak.store(self.current(), Ordering::SeqCst);
    }

    /// Whether this allocator has served any allocation: true once it is installed as the
    /// global allocator (a binary always allocates before `main`'s code runs).
    pub fn is_counting(&self) -> bool {
        self.calls.load(Ordering::Relaxed) > 0
    }

    fn added(&self, n: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let now = self.current.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn removed(&self, n: usize) {
        self.current.fetch_sub(n, Ordering::SeqCst);
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// the counters are only updated after a successful call and never touch the memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            self.added(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees (keeps calloc's lazily zeroed pages).
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.added(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        self.removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old block is gone and the new one is live (counted as a free, then an alloc).
            self.removed(layout.size());
            self.added(new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A local instance (not the lib test binary's global allocator), driven through the
    // `GlobalAlloc` calls a `Vec` makes, so other tests running in parallel cannot disturb it.
    #[test]
    fn counts_current_and_peak_bytes_exactly() {
        let a = CountingAlloc::new();
        assert!(!a.is_counting());
        let big = Layout::array::<f32>(1 << 20).unwrap(); // 4 MiB
        let small = Layout::from_size_align(1000, 8).unwrap();
        unsafe {
            let p = a.alloc(big);
            assert!(!p.is_null());
            assert_eq!((a.current(), a.peak()), (4 << 20, 4 << 20));
            let q = a.alloc_zeroed(small);
            assert_eq!(*q, 0);
            assert_eq!(a.current(), (4 << 20) + 1000);
            a.dealloc(p, big);
            assert_eq!((a.current(), a.peak()), (1000, (4 << 20) + 1000));
            a.reset_peak();
            assert_eq!(a.peak(), 1000);
            // Growing a block: the peak sees the new size, the old one is released.
            let q = a.realloc(q, small, 5000);
            assert!(!q.is_null());
            assert_eq!((a.current(), a.peak()), (5000, 5000));
            a.dealloc(q, Layout::from_size_align(5000, 8).unwrap());
        }
        assert_eq!(a.current(), 0);
        assert!(a.is_counting());
    }
}
