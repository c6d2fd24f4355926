//! A counting global allocator for the allocation tests (`fanout_alloc.rs`, `server_alloc.rs`):
//! every allocation and reallocation calls the test's own `count` hook (which must not
//! allocate), then goes to the system allocator unchanged. A test binary installs it with
//! `#[global_allocator] static GLOBAL: Counting = Counting(count);`.

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, calling its hook on every allocation and reallocation.
pub struct Counting(pub fn());

// SAFETY: forwards every call to the system allocator unchanged; only calls the hook, which
// the installing test keeps allocation-free (atomics and const-initialised thread-locals).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        (self.0)();
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        (self.0)();
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(p, l, n) }
    }
}
