//! The only doors out of the shim: glibc's exported allocator entry points and raw syscalls.
//!
//! Invariant: nothing here allocates, locks or panics, so every function may be called from a hook.

use core::ffi::c_void;

pub const PAGE: usize = 4096;
pub const PAGE_MASK: usize = PAGE - 1;

extern "C" {
    pub fn __libc_malloc(size: usize) -> *mut c_void;
    pub fn __libc_free(p: *mut c_void);
    pub fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    pub fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
    pub fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    pub fn __libc_valloc(size: usize) -> *mut c_void;
    pub fn __libc_pvalloc(size: usize) -> *mut c_void;
}

/// Rounds `n` up to a whole number of pages; `None` on overflow.
#[inline]
pub fn page_round(n: usize) -> Option<usize> {
    n.checked_add(PAGE_MASK).map(|v| v & !PAGE_MASK)
}

/// `syscall(2)` returns -1 and sets errno on failure (no valid address is -1).
#[inline]
fn ret(r: libc::c_long) -> Result<usize, i32> {
    if r == -1 {
        // SAFETY: __errno_location always returns this thread's errno slot.
        Err(unsafe { *libc::__errno_location() })
    } else {
        Ok(r as usize)
    }
}

/// Raw `mmap`: bypasses glibc's wrapper (and our own `mmap` hook).
#[inline]
pub unsafe fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
) -> Result<usize, i32> {
    // SAFETY: the caller upholds mmap's contract; a raw syscall touches no user-space state.
    ret(unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) })
}

/// A fresh private anonymous read-write mapping.
#[inline]
pub fn mmap_anon(len: usize) -> Result<usize, i32> {
    // SAFETY: a new anonymous mapping at an address the kernel chooses aliases nothing.
    unsafe {
        mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }
}

#[inline]
pub unsafe fn munmap(addr: usize, len: usize) -> Result<usize, i32> {
    // SAFETY: the caller owns [addr, addr+len).
    ret(unsafe { libc::syscall(libc::SYS_munmap, addr, len) })
}

#[inline]
pub unsafe fn mremap(
    old: usize,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: usize,
) -> Result<usize, i32> {
    // SAFETY: the caller owns the old range.
    ret(unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) })
}

/// Sets the calling thread's errno.
#[inline]
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}
