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
    /// glibc's `pthread_atfork` (in `libc_nonshared.a`: it registers with this library's own
    /// `__dso_handle`); the `libc` crate does not declare it for Linux.
    pub fn pthread_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
    ) -> libc::c_int;
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

/// Extends the caller's mapping ending at `addr` by `len` fresh bytes if nothing is mapped
/// there (`MAP_FIXED_NOREPLACE`: never replaces a mapping; a kernel without it takes the
/// address as a hint, and a mapping elsewhere is undone). `true` when `[addr, addr+len)` is
/// now a new private anonymous mapping.
pub fn mmap_anon_at(addr: usize, len: usize) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE fails rather than replace anything mapped at `addr`.
    let r = unsafe {
        mmap(
            addr as *mut c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    match r {
        Ok(a) if a == addr => true,
        Ok(a) => {
            // SAFETY: the kernel placed a new mapping of ours at `a`; nobody else knows it.
            let _ = unsafe { munmap(a, len) };
            false
        }
        Err(_) => false,
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

/// A system call by the `syscall` instruction itself: never through glibc's `syscall()`,
/// which the shim interposes on x86-64 (`seccomp`); elsewhere glibc's, turned back into
/// `-errno`. Returns the kernel's value (`-errno` on failure).
#[inline]
pub unsafe fn raw_syscall6(nr: libc::c_long, a: [libc::c_long; 6]) -> libc::c_long {
    #[cfg(target_arch = "x86_64")]
    {
        let r: libc::c_long;
        // SAFETY: the caller passes a system call and arguments valid for it (pointers into
        // memory the kernel may read or write); the instruction clobbers rcx and r11 only and
        // uses no stack, and the asm is not `nomem`, so the compiler assumes memory changed.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") nr => r,
                in("rdi") a[0],
                in("rsi") a[1],
                in("rdx") a[2],
                in("r10") a[3],
                in("r8") a[4],
                in("r9") a[5],
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        r
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: forwarding the caller's system call.
        let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
        if r == -1 {
            -(errno() as libc::c_long)
        } else {
            r
        }
    }
}

/// glibc's convention for a raw result: `-errno` (-4095..-1) sets errno and becomes -1.
#[inline]
pub fn errno_convention(r: libc::c_long) -> libc::c_long {
    if (-4095..0).contains(&r) {
        set_errno(-r as i32);
        -1
    } else {
        r
    }
}

/// Sets the calling thread's errno.
#[inline]
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Raw `madvise`; `Err(errno)` on failure.
#[inline]
pub unsafe fn madvise(addr: usize, len: usize, advice: i32) -> Result<usize, i32> {
    // SAFETY: the caller names a range of its own address space; the kernel validates it.
    ret(unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) })
}

/// Raw `mprotect`.
#[inline]
pub unsafe fn mprotect(addr: usize, len: usize, prot: i32) -> Result<usize, i32> {
    // SAFETY: forwarding the caller's arguments to the kernel.
    ret(unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) })
}

/// `prctl(option, arg2, 0, 0, 0)`.
#[inline]
pub fn prctl(option: i32, arg2: usize) -> Result<usize, i32> {
    // SAFETY: the prctl options the shim uses take integers only.
    ret(unsafe { libc::syscall(libc::SYS_prctl, option, arg2, 0usize, 0usize, 0usize) })
}

/// The process id as the process itself sees it (allowed by every sandbox we know of).
#[inline]
pub fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::syscall(libc::SYS_getpid) as u32 }
}

/// The calling thread's errno.
#[inline]
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Sleeps about one millisecond: a raw `nanosleep` (a signal may end it early; no errno is
/// touched on x86-64).
#[inline]
pub fn sleep_1ms() {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    };
    let req = &ts as *const libc::timespec as libc::c_long;
    // SAFETY: nanosleep only reads the live timespec; no remainder is asked for.
    let _ = unsafe { raw_syscall6(libc::SYS_nanosleep, [req, 0, 0, 0, 0, 0]) };
}

/// Monotonic milliseconds (`CLOCK_MONOTONIC_COARSE`, served by the vDSO: no system call).
#[inline]
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// 64 bits that differ between processes and calls, without a system call a sandbox could
/// refuse: the CPU's cycle counter (or the monotonic clock), the pid and a stack address.
pub fn entropy(seed: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions on x86-64.
    let t = unsafe { core::arch::x86_64::_rdtsc() };
    #[cfg(not(target_arch = "x86_64"))]
    let t = {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a live timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    let local = 0u8;
    let mut x = seed ^ t ^ (getpid() as u64) << 32 ^ (&local as *const u8 as u64);
    // splitmix64 finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) | 1
}
