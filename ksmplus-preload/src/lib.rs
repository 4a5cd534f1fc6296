//! `libksmplus.so`: an `LD_PRELOAD` shim that makes a program's large anonymous allocations
//! page-aligned whole-page mappings (so identical contents land on identical pages), reports
//! them to the ksmplus agent, and on the agent's word fingerprints sampled pages and marks runs
//! `MADV_MERGEABLE` — without the program noticing.
//!
//! Map of the crate (one owner per concern; each file states its invariants at the top):
//! - `sys`    — glibc's `__libc_*` entry points and raw syscalls: the only doors out of a hook.
//! - `hooks`  — the interposed functions (malloc … mremap).
//! - `table`  — lock-free registry of shim-owned allocations (for free/realloc/usable_size).
//! - `cache`  — a few freed mappings kept warm for reuse.
//! - `ring`   — bounded lock-free event queue from hooks to the client thread.
//! - `view`   — the client thread's range map of registered regions.
//! - `maps`   — which parts of /proc/self/maps to cover (origin Maps).
//! - `client` — the client thread: socket, agent commands, fork handling, initialisation.

#![cfg_attr(test, allow(dead_code))] // hooks and client are left out of unit-test builds

mod cache;
mod maps;
mod ring;
mod sys;
mod table;
mod view;

#[cfg(not(test))]
mod client;
#[cfg(not(test))]
mod conn;
#[cfg(not(test))]
mod hooks;

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

/// Requests of at least this many bytes become shim mappings. `usize::MAX` (before init, when
/// disabled, once dormant) makes every hook a pass-through.
pub(crate) static THRESHOLD: AtomicUsize = AtomicUsize::new(usize::MAX);
/// No events are recorded (before init, disabled, or told to ignore by the agent).
pub(crate) static DORMANT: AtomicBool = AtomicBool::new(true);
/// glibc's `malloc_usable_size`, resolved at init.
pub(crate) static REAL_USABLE_SIZE: AtomicUsize = AtomicUsize::new(0);
/// Allocations that fell back to glibc because the registry had no free slot.
pub(crate) static REGISTRY_FULL: AtomicU64 = AtomicU64::new(0);

/// Rust's own allocations (the client thread's buffers, maps) go straight to glibc, never
/// through our hooks, so they are neither registered nor able to recurse.
#[cfg(not(test))]
mod rust_alloc {
    use crate::sys;
    use core::alloc::{GlobalAlloc, Layout};

    struct LibcAlloc;

    const MIN_ALIGN: usize = 16;

    // SAFETY: glibc's allocator satisfies GlobalAlloc's contract for alignments ≤ 16 through
    // malloc/calloc/realloc and for larger ones through memalign.
    unsafe impl GlobalAlloc for LibcAlloc {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            // SAFETY: forwarding a non-zero-size request to glibc.
            unsafe {
                if l.align() <= MIN_ALIGN {
                    sys::__libc_malloc(l.size()).cast()
                } else {
                    sys::__libc_memalign(l.align(), l.size()).cast()
                }
            }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            if l.align() <= MIN_ALIGN {
                // SAFETY: forwarding to glibc.
                unsafe { sys::__libc_calloc(1, l.size()).cast() }
            } else {
                // SAFETY: alloc returns null or l.size() writable bytes.
                unsafe {
                    let p = self.alloc(l);
                    if !p.is_null() {
                        core::ptr::write_bytes(p, 0, l.size());
                    }
                    p
                }
            }
        }
        unsafe fn dealloc(&self, p: *mut u8, _: Layout) {
            // SAFETY: p came from glibc through this allocator.
            unsafe { sys::__libc_free(p.cast()) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            if l.align() <= MIN_ALIGN {
                // SAFETY: p came from __libc_malloc/calloc.
                return unsafe { sys::__libc_realloc(p.cast(), new).cast() };
            }
            // SAFETY: standard alloc-copy-free for over-aligned blocks.
            unsafe {
                let q = self.alloc(Layout::from_size_align_unchecked(new, l.align()));
                if !q.is_null() {
                    core::ptr::copy_nonoverlapping(p, q, l.size().min(new));
                    self.dealloc(p, l);
                }
                q
            }
        }
    }

    #[global_allocator]
    static GLOBAL: LibcAlloc = LibcAlloc;
}

#[cfg(not(test))]
#[ctor::ctor]
fn ksmplus_init() {
    client::init();
}
