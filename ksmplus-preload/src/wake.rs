//! The wake-up signal: how the agent gets a command executed in a program that makes no call
//! the shim sees (a worker sleeping in `read`, a GUI idle in `poll`).
//!
//! Invariants:
//! - The signal is `SIGURG` unless `KSMPLUS_SIGNAL` names another (0: none). `SIGURG` is
//!   ignored by default, so a signal that arrives after the program replaced or reset our
//!   handler (or across an exec) is ignored or goes to a handler that expects spurious ones
//!   (Go's runtime uses it for preemption) — it never kills the program.
//! - The handler is installed only if the program left the signal at its default, with
//!   `SA_RESTART` (an interrupted `read`, `write`, `futex` wait or `wait4` resumes unseen) and
//!   `SA_ONSTACK`, every signal blocked while it runs. The agent only signals an idle program,
//!   and only a thread that is running or blocked in a call that `SA_RESTART` resumes or that
//!   event loops retry (see the agent's `wake` module).
//! - The handler saves and restores `errno` and only runs [`chan::service`] (atomics and raw
//!   system calls: async-signal-safe).
//! - `sigaction` and `signal` are hooked: when the program installs its own disposition for the
//!   signal, the channel says `SIGNAL_LOST` before the change takes effect, and the agent stops
//!   using it; when the program puts our handler back (save/restore), it is ours again.

use crate::chan;
use crate::sys;
use core::ffi::c_void;
use core::sync::atomic::{AtomicI32, AtomicUsize, Ordering::*};

/// The signal our handler is installed for now (0: none).
static WAKE: AtomicI32 = AtomicI32::new(0);
/// The signal configured at init (kept to recognise our handler coming back).
static CONFIGURED: AtomicI32 = AtomicI32::new(0);
static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);

type SigactionFn = unsafe extern "C" fn(i32, *const libc::sigaction, *mut libc::sigaction) -> i32;
type SignalFn = unsafe extern "C" fn(i32, libc::sighandler_t) -> libc::sighandler_t;

/// glibc's definition of `name` behind ours.
fn next(slot: &AtomicUsize, name: &core::ffi::CStr) -> usize {
    let mut f = slot.load(Relaxed);
    if f == 0 {
        // SAFETY: dlsym with a static name; RTLD_NEXT finds glibc's definition behind ours.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        slot.store(f, Relaxed);
    }
    f
}

extern "C" fn on_wake(_sig: i32, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let e = sys::errno();
    chan::service(usize::MAX, true);
    sys::set_errno(e);
}

/// Installs the handler for `sig` if the program has left it at its default. True if it did.
pub fn install(sig: i32) -> bool {
    if sig <= 0 || sig >= 65 || sig == libc::SIGKILL || sig == libc::SIGSTOP {
        return false;
    }
    let f = next(&REAL_SIGACTION, c"sigaction");
    if f == 0 {
        return false;
    }
    // SAFETY: f is glibc's sigaction.
    let real: SigactionFn = unsafe { core::mem::transmute(f) };
    // SAFETY: sigaction structs are plain data; zeroed is a valid starting point.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: querying the current disposition into a live struct.
    if unsafe { real(sig, core::ptr::null(), &mut old) } != 0 || old.sa_sigaction != libc::SIG_DFL {
        return false;
    }
    // SAFETY: as above.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = on_wake as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
    // SAFETY: sigfillset on a live sigset; installing a handler that is async-signal-safe.
    let ok = unsafe {
        libc::sigfillset(&mut sa.sa_mask);
        real(sig, &sa, core::ptr::null_mut()) == 0
    };
    if ok {
        CONFIGURED.store(sig, Relaxed);
        WAKE.store(sig, Relaxed);
        chan::set_signal(sig as u32);
    }
    ok
}

/// Notes a disposition the program sets for `sig` (`handler`: the new `sa_sigaction`).
fn program_sets(sig: i32, handler: usize) {
    if sig == 0 || sig != CONFIGURED.load(Relaxed) {
        return;
    }
    if handler == on_wake as *const () as usize {
        WAKE.store(sig, Relaxed);
        chan::set_signal(sig as u32);
        chan::clear_signal_lost();
    } else if WAKE.swap(0, Relaxed) != 0 {
        chan::set_signal(0);
    }
}

#[no_mangle]
pub extern "C" fn sigaction(
    sig: i32,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> i32 {
    if !act.is_null() {
        // SAFETY: the caller passes a valid sigaction when act is not null.
        program_sets(sig, unsafe { (*act).sa_sigaction });
    }
    let f = next(&REAL_SIGACTION, c"sigaction");
    if f == 0 {
        sys::set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: f is glibc's sigaction; the caller's arguments are forwarded unchanged.
    unsafe { core::mem::transmute::<usize, SigactionFn>(f)(sig, act, old) }
}

#[no_mangle]
pub extern "C" fn signal(sig: i32, handler: libc::sighandler_t) -> libc::sighandler_t {
    program_sets(sig, handler);
    let f = next(&REAL_SIGNAL, c"signal");
    if f == 0 {
        sys::set_errno(libc::ENOSYS);
        return libc::SIG_ERR;
    }
    // SAFETY: f is glibc's signal; the caller's arguments are forwarded unchanged.
    unsafe { core::mem::transmute::<usize, SignalFn>(f)(sig, handler) }
}
