//! A global allocator that counts live bytes and fails any allocation that would take them above [`CAP`].
//!
//! A failed allocation makes Rust call `handle_alloc_error`, which aborts the process: libFuzzer reports the input
//! as a crash ("deadly signal") and saves it. The readers are expected to check every size read from a file
//! against the file (or a documented limit) before allocating, so no input of fuzzer size (a few KiB to a MiB)
//! may make them allocate this much.
//!
//! Page-aligned allocations (alignment of 4 KiB or more) are passed through uncounted ([`WORKSPACE_ALIGN`]): they
//! are GEMM packing workspaces, not reader data. faer's x86 kernels (`private-gemm-x86`) keep one per thread,
//! sized from the L3 cache the CPU reports, not from any input: twice the L3, which is 600 MiB on a 2-core Xeon VM
//! that reports a 300 MiB L3 (the replay test aborted there on the first MoSA forward). Readers allocate `Vec`s
//! of bytes and numbers, whose alignment is at most 16.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Live heap bytes allowed at once: 256 MiB.
pub const CAP: usize = 256 << 20;

/// Allocations with at least this alignment are not counted (see the module docs).
pub const WORKSPACE_ALIGN: usize = 4096;

fn counted(layout: Layout) -> bool {
    layout.align() < WORKSPACE_ALIGN
}

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The counting, capped allocator (see the module docs); wraps [`System`].
pub struct CapAlloc;

impl CapAlloc {
    /// Reserves `size` bytes of the cap; false when that would exceed it.
    fn reserve(size: usize) -> bool {
        let mut cur = LIVE.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(size).filter(|&n| n <= CAP) else { return false };
            match LIVE.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    PEAK.fetch_max(next, Ordering::Relaxed);
                    return true;
                }
                Err(now) => cur = now,
            }
        }
    }

    fn release(size: usize) {
        LIVE.fetch_sub(size, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's layout; the counter only decides whether to forward.
unsafe impl GlobalAlloc for CapAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !counted(layout) {
            // SAFETY: as below.
            return unsafe { System.alloc(layout) };
        }
        if !Self::reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for `layout`.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            Self::release(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !counted(layout) {
            // SAFETY: as `alloc`.
            return unsafe { System.alloc_zeroed(layout) };
        }
        if !Self::reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            Self::release(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes through this type).
        unsafe { System.dealloc(ptr, layout) };
        if counted(layout) {
            Self::release(layout.size());
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !counted(layout) {
            // SAFETY: as `alloc`; the alignment (and so the uncounted status) is kept by `realloc`.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let old = layout.size();
        if new_size > old && !Self::reserve(new_size - old) {
            return std::ptr::null_mut();
        }
        // SAFETY: as `alloc`; `ptr`/`layout` describe a live allocation of this allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                Self::release(new_size - old);
            }
        } else if new_size < old {
            Self::release(old - new_size);
        }
        p
    }
}

/// Live heap bytes now.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most live heap bytes seen so far in this process.
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}
