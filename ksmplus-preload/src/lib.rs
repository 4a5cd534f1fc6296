//! `libksmplus.so`: an `LD_PRELOAD` shim that makes a program's large allocations page-aligned
//! whole-page mappings (so identical contents land on identical pages) and executes the
//! ksmplus agent's `madvise` commands inside the process — without the program noticing.
//!
//! The shim owns no thread and, after its constructor, no file descriptor: a program may enter
//! a user namespace (the kernel refuses that to a multi-threaded process), close every
//! descriptor or switch on a seccomp sandbox and the shim stays out of its way. The agent reads
//! the process from outside (`/proc/PID/{maps,pagemap,mem}`) and writes commands into the
//! process's channel page; the shim runs them from its own hooks, or from a wake-up signal
//! handler when the program is idle.
//!
//! Map of the crate (one owner per concern; each file states its invariants at the top):
//! - `sys`    — glibc's `__libc_*` entry points and raw syscalls: the only doors out of a hook.
//! - `hooks`  — the interposed allocator and mapping functions (malloc … mremap, mprotect).
//! - `table`  — lock-free registry of shim-owned allocations (for free/realloc/usable_size).
//! - `cache`  — a few freed mappings kept warm for reuse.
//! - `chan`   — the channel page: fork detection, verdicts, executing the agent's commands.
//! - `filter`  — the process's seccomp state as the shim knows it (inherited, or its own coming).
//! - `seccomp` — the `prctl`/`syscall` hooks that see a sandbox filter coming: no advice after.
//! - `wake`   — the wake-up signal: its handler and the `sigaction`/`signal` hooks guarding it.
//! - `init`   — the constructor: configuration, channel set-up, the one Hello to the agent.

#![cfg_attr(test, allow(dead_code))] // hooks and the constructor are left out of unit-test builds

mod cache;
mod chan;
mod filter;
mod ptracer;
mod seccomp;
mod sys;
mod table;

#[cfg(not(test))]
mod hooks;
#[cfg(not(test))]
mod init;
#[cfg(not(test))]
mod wake;

use core::sync::atomic::{AtomicBool, AtomicUsize};

/// Requests of at least this many bytes become shim mappings. `usize::MAX` (before init, when
/// disabled, once ignored) makes every hook a pass-through.
pub(crate) static THRESHOLD: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The configured threshold (`KSMPLUS_MIN_REGION`), restored when the agent tracks again.
pub(crate) static MIN_REGION: AtomicUsize = AtomicUsize::new(64 * 1024);
/// Freed shim blocks may be cached (initialised, not ignored).
pub(crate) static CACHING: AtomicBool = AtomicBool::new(false);
/// `KSMPLUS_MADVISE_ALL=1`: every large region is marked MERGEABLE at once.
pub(crate) static MADVISE_ALL: AtomicBool = AtomicBool::new(false);
/// glibc's `malloc_usable_size`, resolved at init.
pub(crate) static REAL_USABLE_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Rust's own allocations (the constructor's strings) go straight to glibc, never through our
/// hooks, so they are neither registered nor able to recurse.
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
    init::init();
}
