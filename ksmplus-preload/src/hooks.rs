//! The interposed allocator and mapping entry points.
//!
//! Invariants (each hook):
//! - calls only glibc's `__libc_*` functions, raw syscalls (`sys`), the lock-free registry
//!   (`table`), cache (`cache`) and channel (`chan`): no allocation through the hooked
//!   allocator, no lock, no blocking I/O, no panic;
//! - a request below `THRESHOLD` (everything, before init or once ignored) goes straight to
//!   glibc after three loads for the agent's mailbox (`chan::pending`), with every slower path
//!   out of line (`malloc_slow`, `free_slow`);
//! - a pointer is looked up in the registry only when it is page-aligned, and one that is not
//!   found there is glibc's and goes back to glibc;
//! - every hook that maps or unmaps memory bumps the channel's `map_gen` after the kernel
//!   answered, so the agent re-reads `/proc/PID/maps` when (and only when) something changed.

use crate::cache::CACHE;
use crate::chan;
use crate::sys::{self, page_round, PAGE, PAGE_MASK};
use crate::table::TABLE;
use crate::{CACHING, MADVISE_ALL, REAL_USABLE_SIZE, THRESHOLD};
use core::ffi::c_void;
use core::ptr::null_mut;
use core::sync::atomic::Ordering::*;

#[inline]
fn threshold() -> usize {
    THRESHOLD.load(Relaxed)
}

/// A shim-owned page-aligned mapping of at least `size` bytes, registered and reported.
/// `None` when it cannot be made (the caller falls back to glibc).
fn large_alloc(size: usize, align: usize, zeroed: bool) -> Option<*mut c_void> {
    let len = page_round(size)?;
    if len > isize::MAX as usize || TABLE.is_half_full() {
        if TABLE.is_half_full() {
            registry_full();
        }
        return None;
    }
    chan::touch();
    if size < threshold() {
        // The agent's verdict, just seen, says pass-through.
        return None;
    }
    CACHE.maybe_trim(sys::now_ms());
    let cached = (align <= PAGE && !zeroed && CACHING.load(Relaxed))
        .then(|| CACHE.take(len))
        .flatten();
    let addr = match cached {
        Some(a) => a,
        // A failed mapping may be for want of address space, some of it held by cold pieces.
        None => match map_aligned(len, align) {
            Some(a) => a,
            None if CACHE.release_cold() => map_aligned(len, align)?,
            None => return None,
        },
    };
    if !TABLE.insert(addr, len) {
        registry_full();
        // SAFETY: we just mapped (or took from the cache) this range and handed it to nobody.
        let _ = unsafe { sys::munmap(addr, len) };
        return None;
    }
    block_added(addr, len);
    Some(addr as *mut c_void)
}

/// Maps `len` bytes aligned to `align` (a power of two ≥ PAGE gives that alignment).
fn map_aligned(len: usize, align: usize) -> Option<usize> {
    if align <= PAGE {
        return sys::mmap_anon(len).ok();
    }
    let span = len.checked_add(align)?;
    let raw = sys::mmap_anon(span).ok()?;
    let start = (raw + align - 1) & !(align - 1);
    // SAFETY: both trims lie inside the mapping made just above and owned by nobody else.
    unsafe {
        if start > raw {
            let _ = sys::munmap(raw, start - raw);
        }
        let end = start + len;
        if raw + span > end {
            let _ = sys::munmap(end, raw + span - end);
        }
    }
    Some(start)
}

fn registry_full() {
    if let Some(c) = chan::counters() {
        c.registry_full.fetch_add(1, Relaxed);
    }
}

/// Bookkeeping of a new shim block: counters, `map_gen`, and the mark of madvise-all mode.
fn block_added(addr: usize, len: usize) {
    if let Some(c) = chan::counters() {
        c.blocks.fetch_add(1, Relaxed);
        c.block_bytes.fetch_add(len as u64, Relaxed);
    }
    chan::bump_map_gen();
    advise_all(addr, len);
    chan::set_cache_bytes();
}

/// madvise-all mode (`KSMPLUS_MADVISE_ALL=1`): marks a mapping the program owns MERGEABLE at
/// once — unless a sandbox filter is in, which may kill the process for it. errno is kept.
fn advise_all(addr: usize, len: usize) {
    if MADVISE_ALL.load(Relaxed) && crate::filter::may_advise() {
        let e = sys::errno();
        // SAFETY: KSM advice on a mapping of the program's; the contents stay as they are.
        let _ = unsafe { sys::madvise(addr, len, libc::MADV_MERGEABLE) };
        sys::set_errno(e);
    }
}

/// Gives a shim-owned mapping back: to the cache, else to the kernel.
fn release(addr: usize, len: usize) {
    if let Some(c) = chan::counters() {
        c.blocks.fetch_sub(1, Relaxed);
        c.block_bytes.fetch_sub(len as u64, Relaxed);
    }
    // Not unmapped even when the cache is off (the agent ignores this process): the program
    // may still read the block it freed, as glibc's heap lets it (see the cache's invariants).
    if !CACHE.put(addr, len, CACHING.load(Relaxed)) {
        // SAFETY: the registry entry was just removed, so this mapping is ours alone.
        let _ = unsafe { sys::munmap(addr, len) };
    } else {
        CACHE.maybe_trim(sys::now_ms());
    }
    chan::set_cache_bytes();
    // Unmapped, or now a cached piece the agent stops sampling: either way its view changes.
    chan::bump_map_gen();
    chan::touch();
}

/// The registry's length for `p` if `p` is one of ours.
#[inline]
fn ours(p: *mut c_void) -> Option<usize> {
    if p as usize & PAGE_MASK != 0 || p.is_null() {
        return None;
    }
    TABLE.get(p as usize)
}

/// glibc's usable size for one of its own pointers.
fn glibc_usable_size(p: *mut c_void) -> usize {
    let f = REAL_USABLE_SIZE.load(Relaxed);
    if f != 0 {
        // SAFETY: REAL_USABLE_SIZE holds glibc's malloc_usable_size, resolved at init.
        let f: unsafe extern "C" fn(*mut c_void) -> usize = unsafe { core::mem::transmute(f) };
        // SAFETY: p is a live glibc pointer.
        return unsafe { f(p) };
    }
    // Before init: glibc's chunk header (size | flags) sits just before the pointer.
    // SAFETY: every live glibc pointer is preceded by its 16-byte chunk header.
    let size = unsafe { *(p as *const usize).sub(1) } & !7;
    size - if size & 2 != 0 { 16 } else { 8 }
}

/// A page-aligned shim block for a large request, else what `glibc` gives.
#[inline(always)]
fn large_or(size: usize, glibc: impl FnOnce() -> *mut c_void) -> *mut c_void {
    if size >= threshold() {
        if let Some(p) = large_alloc(size, PAGE, false) {
            return p;
        }
    }
    chan::poll();
    glibc()
}

#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    // The fast path is a load, a compare and a tail call; the slow path is `extern "C"` (it
    // cannot unwind), so it is a tail call too and no register is saved. A waiting batch is
    // noticed by `free` (and every other hook), not here: like `calloc`, small `malloc`s
    // never look (session 9: 13 → 4 instructions; callgrind, docs/BENCH.md).
    if size >= threshold() {
        return malloc_slow(size);
    }
    // SAFETY: plain forwarding to glibc.
    unsafe { sys::__libc_malloc(size) }
}

#[cold]
#[inline(never)]
extern "C" fn malloc_slow(size: usize) -> *mut c_void {
    // SAFETY: plain forwarding to glibc.
    large_or(size, || unsafe { sys::__libc_malloc(size) })
}

#[no_mangle]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    if let Some(total) = n.checked_mul(size) {
        if total >= threshold() {
            if let Some(p) = large_alloc(total, PAGE, true) {
                return p;
            }
        }
    }
    // SAFETY: plain forwarding to glibc (which also reports the overflow as ENOMEM).
    unsafe { sys::__libc_calloc(n, size) }
}

#[no_mangle]
pub extern "C" fn free(p: *mut c_void) {
    // glibc's blocks are never page-aligned (a chunk header precedes them), so only a
    // page-aligned pointer needs the registry; the small path's one look at the mailbox is
    // here (four loads, a compare, a tail call).
    if p as usize & PAGE_MASK == 0 || chan::pending() {
        if p.is_null() {
            return; // glibc's free(NULL) does nothing either
        }
        return free_slow(p);
    }
    // SAFETY: p is not page-aligned, so not ours: glibc's.
    unsafe { sys::__libc_free(p) }
}

#[cold]
#[inline(never)]
extern "C" fn free_slow(p: *mut c_void) {
    if let Some(addr) = (p as usize & PAGE_MASK == 0 && !p.is_null()).then_some(p as usize) {
        if let Some(len) = TABLE.remove(addr) {
            release(addr, len);
            return;
        }
    }
    chan::poll();
    // SAFETY: p is null or not ours, so it is glibc's.
    unsafe { sys::__libc_free(p) }
}

#[no_mangle]
pub extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return malloc(size);
    }
    let Some(old_len) = ours(p) else {
        if size >= threshold() {
            // glibc → shim: copy what the old block holds.
            if let Some(q) = large_alloc(size, PAGE, false) {
                let n = glibc_usable_size(p).min(size);
                // SAFETY: p holds n readable bytes, q has room for size ≥ n; they don't overlap.
                unsafe {
                    core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, n);
                    sys::__libc_free(p);
                }
                return q;
            }
        }
        // SAFETY: p is glibc's.
        return unsafe { sys::__libc_realloc(p, size) };
    };
    if size == 0 {
        // glibc frees and returns NULL for realloc(p, 0).
        free(p);
        return null_mut();
    }
    if size < threshold() {
        // shim → glibc.
        // SAFETY: plain forwarding to glibc.
        let q = unsafe { sys::__libc_malloc(size) };
        if !q.is_null() {
            // SAFETY: size < old_len bytes of p are readable; q has size bytes.
            unsafe { core::ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, size) };
            if let Some(len) = TABLE.remove(p as usize) {
                release(p as usize, len);
            }
        }
        return q;
    }
    let Some(new_len) = page_round(size) else {
        sys::set_errno(libc::ENOMEM);
        return null_mut();
    };
    if new_len == old_len {
        return p;
    }
    let addr = p as usize;
    if new_len > old_len && CACHING.load(Relaxed) {
        // Without mapping a range (only the cache's one KEEPONFORK advice): grow into the
        // cached piece that follows the block, else copy into a cached piece that fits.
        if CACHE.take_at(addr + old_len, new_len - old_len) {
            if TABLE.resize(addr, new_len) {
                chan::set_cache_bytes();
                grown_in_place(addr, old_len, new_len);
                return p;
            }
            if !CACHE.put(addr + old_len, new_len - old_len, true) {
                // SAFETY: the range was a cached piece, ours alone.
                let _ = unsafe { sys::munmap(addr + old_len, new_len - old_len) };
            }
        }
        if let Some(q) = CACHE.take_fitting(new_len) {
            if TABLE.insert(q, new_len) {
                TABLE.remove(addr);
                block_added(q, new_len);
                // SAFETY: the old block holds old_len readable bytes; q has new_len > old_len
                // bytes and is a different range.
                unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, q as *mut u8, old_len) };
                release(addr, old_len);
                return q as *mut c_void;
            }
            // Registry full: the piece goes back where it came from.
            if !CACHE.put(q, new_len, true) {
                // SAFETY: a piece taken from the cache is ours alone.
                let _ = unsafe { sys::munmap(q, new_len) };
            }
        }
    }
    if new_len > old_len && sys::mmap_anon_at(addr + old_len, new_len - old_len) {
        // Grown in place: nothing moves, nothing is copied.
        TABLE.resize(addr, new_len);
        grown_in_place(addr, old_len, new_len);
        return p;
    }
    // Unregister before the kernel can free the old address: once mremap moves the block,
    // another thread may map that address and register it as its own.
    TABLE.remove(addr);
    // SAFETY: [addr, addr+old_len) is our mapping, owned by the caller's block.
    if let Ok(new) = unsafe { sys::mremap(addr, old_len, new_len, libc::MREMAP_MAYMOVE, 0) } {
        TABLE.reinsert(new, new_len);
        if let Some(c) = chan::counters() {
            c.block_bytes.fetch_add(new_len as u64, Relaxed);
            c.block_bytes.fetch_sub(old_len as u64, Relaxed);
        }
        chan::record_move(addr, old_len, new, new_len);
        if new_len > old_len {
            advise_all(new, new_len);
        }
        chan::touch();
        return new as *mut c_void;
    }
    // mremap failed (a block reused from the cache can span two VMAs): copy instead.
    let q = match large_alloc(size, PAGE, false) {
        Some(q) => q,
        // SAFETY: plain forwarding to glibc.
        None => unsafe { sys::__libc_malloc(size) },
    };
    if q.is_null() {
        // realloc fails; the old block stays valid and registered.
        TABLE.reinsert(addr, old_len);
        sys::set_errno(libc::ENOMEM);
        return null_mut();
    }
    // SAFETY: the old block holds old_len < size readable bytes; q has room for size bytes.
    unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, q as *mut u8, old_len) };
    release(addr, old_len);
    q
}

/// The bookkeeping of a block grown in place from `old_len` to `new_len` bytes (the registry
/// already says `new_len`): counters, madvise-all, and the agent's view.
fn grown_in_place(addr: usize, old_len: usize, new_len: usize) {
    if let Some(c) = chan::counters() {
        c.block_bytes.fetch_add((new_len - old_len) as u64, Relaxed);
    }
    advise_all(addr, new_len);
    chan::bump_map_gen();
    chan::touch();
}

#[no_mangle]
pub extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        Some(total) => realloc(p, total),
        None => {
            sys::set_errno(libc::ENOMEM);
            null_mut()
        }
    }
}

#[no_mangle]
pub extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    match ours(p) {
        Some(len) => len,
        None => glibc_usable_size(p),
    }
}

/// memalign semantics: a large request gets a shim mapping aligned to `max(align, PAGE)`.
fn aligned(align: usize, size: usize) -> *mut c_void {
    if size >= threshold() && align.is_power_of_two() {
        if let Some(p) = large_alloc(size, align.max(PAGE), false) {
            return p;
        }
    }
    // SAFETY: plain forwarding to glibc.
    unsafe { sys::__libc_memalign(align, size) }
}

#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    aligned(align, size)
}

#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    aligned(align, size)
}

#[no_mangle]
pub extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<usize>()) {
        return libc::EINVAL;
    }
    let p = aligned(align, size);
    if p.is_null() && size != 0 {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a valid out-pointer, as posix_memalign requires.
    unsafe { *out = p };
    0
}

#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: plain forwarding to glibc.
    large_or(size, || unsafe { sys::__libc_valloc(size) })
}

#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    // pvalloc rounds the request up to whole pages (0 gives one page).
    let rounded = if size == 0 {
        PAGE
    } else {
        page_round(size).unwrap_or(size)
    };
    // SAFETY: plain forwarding to glibc.
    large_or(rounded, || unsafe { sys::__libc_pvalloc(size) })
}

fn registrable(len: usize, prot: i32, flags: i32) -> bool {
    len >= threshold()
        && flags & libc::MAP_ANONYMOUS != 0
        && flags & libc::MAP_TYPE == libc::MAP_PRIVATE
        && flags & (libc::MAP_STACK | libc::MAP_GROWSDOWN) == 0
        && prot & libc::PROT_WRITE != 0
}

#[no_mangle]
pub extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: forwarding the caller's arguments unchanged to the kernel.
    match unsafe { sys::mmap(addr, len, prot, flags, fd, off) } {
        Err(e) => {
            sys::set_errno(e);
            libc::MAP_FAILED
        }
        Ok(a) => {
            chan::touch();
            chan::bump_map_gen();
            if MADVISE_ALL.load(Relaxed) && registrable(len, prot, flags) {
                advise_all(a, page_round(len).unwrap_or(len));
            }
            a as *mut c_void
        }
    }
}

#[no_mangle]
pub extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: libc::off_t,
) -> *mut c_void {
    mmap(addr, len, prot, flags, fd, off)
}

#[no_mangle]
pub extern "C" fn munmap(addr: *mut c_void, len: usize) -> i32 {
    // SAFETY: forwarding the caller's arguments unchanged to the kernel.
    match unsafe { sys::munmap(addr as usize, len) } {
        Err(e) => {
            sys::set_errno(e);
            -1
        }
        Ok(_) => {
            chan::touch();
            chan::bump_map_gen();
            0
        }
    }
}

#[no_mangle]
pub extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: i32) -> i32 {
    // SAFETY: forwarding the caller's arguments unchanged to the kernel.
    match unsafe { sys::mprotect(addr as usize, len, prot) } {
        Err(e) => {
            sys::set_errno(e);
            -1
        }
        Ok(_) => {
            // Allocators with their own reservations (PartitionAlloc, V8) commit memory by
            // making PROT_NONE pages writable: the maps change without an mmap.
            chan::bump_map_gen();
            chan::touch();
            0
        }
    }
}

/// `mremap(old, old_len, new_len, flags, ... /* new_address */)`. On x86-64 and aarch64 the
/// variadic pointer travels in the same register as a fifth fixed argument; it is read only when
/// MREMAP_FIXED says the caller passed it.
#[no_mangle]
pub extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: *mut c_void,
) -> *mut c_void {
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let target = if fixed { new_addr as usize } else { 0 };
    // SAFETY: forwarding the caller's arguments unchanged to the kernel.
    match unsafe { sys::mremap(old as usize, old_len, new_len, flags, target) } {
        Err(e) => {
            sys::set_errno(e);
            libc::MAP_FAILED
        }
        Ok(a) => {
            chan::record_move(
                old as usize,
                page_round(old_len).unwrap_or(old_len),
                a,
                page_round(new_len).unwrap_or(new_len),
            );
            chan::touch();
            a as *mut c_void
        }
    }
}
