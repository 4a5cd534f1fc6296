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
//! - `sigaction` and `signal` are hooked. While our handler stands in for the default, the
//!   program sees SIG_DFL (queries and `old` values say so) and setting SIG_DFL again keeps ours
//!   (Firefox's fork server resets every signal in its children). When the program installs its
//!   own handler or SIG_IGN, the channel says `SIGNAL_LOST` before the change takes effect and
//!   the agent stops using the signal; when it goes back to SIG_DFL, ours comes back.

use crate::chan;
use crate::sys;
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::*};

/// The signal our handler is installed for now (0: none).
static WAKE: AtomicI32 = AtomicI32::new(0);
/// The signal configured at init (kept to recognise our handler coming back).
static CONFIGURED: AtomicI32 = AtomicI32::new(0);
static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);

type SigactionFn = unsafe extern "C" fn(i32, *const libc::sigaction, *mut libc::sigaction) -> i32;

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
    let sa = ours();
    // SAFETY: installing a handler that is async-signal-safe.
    let ok = unsafe { real(sig, &sa, core::ptr::null_mut()) == 0 };
    if ok {
        CONFIGURED.store(sig, Relaxed);
        WAKE.store(sig, Relaxed);
        VIRTUAL_DFL.store(true, Relaxed);
        chan::set_signal(sig as u32);
    }
    ok
}

/// The program believes the signal is at its default disposition while our handler is
/// installed (see the module doc).
static VIRTUAL_DFL: AtomicBool = AtomicBool::new(false);

/// What a `sigaction`/`signal` call for our signal does. `Some(r)`: answered here (the
/// program's view kept at SIG_DFL, our handler stays); `None`: forward to glibc.
fn program_sets(sig: i32, handler: Option<usize>) -> Option<i32> {
    if sig == 0 || sig != CONFIGURED.load(Relaxed) {
        return None;
    }
    let ours = WAKE.load(Relaxed) != 0;
    match handler {
        // A query: the default while ours stands in for it.
        None if ours && VIRTUAL_DFL.load(Relaxed) => Some(0),
        None => None,
        // Back to (or staying at) the default: ours stays, or comes back.
        Some(h) if h == libc::SIG_DFL => {
            if ours {
                return Some(0);
            }
            // Installed by the caller with its own arguments replaced (see `sigaction`).
            None
        }
        // Its own handler, or SIG_IGN: ours goes, and the agent must not send the signal.
        Some(_) => {
            if WAKE.swap(0, Relaxed) != 0 {
                VIRTUAL_DFL.store(false, Relaxed);
                chan::set_signal(0);
            }
            None
        }
    }
}

/// The default disposition, as reported to the program.
fn dfl() -> libc::sigaction {
    // SAFETY: sigaction is plain data; all-zero is SIG_DFL with no flags and an empty mask.
    unsafe { core::mem::zeroed() }
}

/// Our handler's disposition.
fn ours() -> libc::sigaction {
    let mut sa = dfl();
    sa.sa_sigaction = on_wake as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
    // SAFETY: sigfillset on a live sigset.
    unsafe { libc::sigfillset(&mut sa.sa_mask) };
    sa
}

#[no_mangle]
pub extern "C" fn sigaction(
    sig: i32,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> i32 {
    let f = next(&REAL_SIGACTION, c"sigaction");
    if f == 0 {
        sys::set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: f is glibc's sigaction.
    let real: SigactionFn = unsafe { core::mem::transmute(f) };
    // SAFETY: the caller passes a valid sigaction when act is not null.
    let handler = (!act.is_null()).then(|| unsafe { (*act).sa_sigaction });
    let virtual_dfl = WAKE.load(Relaxed) != 0 && VIRTUAL_DFL.load(Relaxed);
    if let Some(r) = program_sets(sig, handler) {
        if !old.is_null() {
            // SAFETY: the caller passes a valid out-pointer when old is not null.
            unsafe { *old = dfl() };
        }
        return r;
    }
    if sig == CONFIGURED.load(Relaxed) && handler == Some(libc::SIG_DFL) {
        // The program puts the default back after having its own handler: ours comes back
        // in its place (the program's `old` gets its previous handler, as it should).
        let sa = ours();
        // SAFETY: installing our async-signal-safe handler; old is the caller's.
        let r = unsafe { real(sig, &sa, old) };
        if r == 0 {
            WAKE.store(sig, Relaxed);
            VIRTUAL_DFL.store(true, Relaxed);
            chan::set_signal(sig as u32);
            chan::clear_signal_lost();
        }
        return r;
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { real(sig, act, old) };
    if virtual_dfl && sig == CONFIGURED.load(Relaxed) && !old.is_null() {
        // Our handler was there, standing in for the default the program believed in.
        // SAFETY: as above.
        unsafe { *old = dfl() };
    }
    r
}

#[no_mangle]
pub extern "C" fn signal(sig: i32, handler: libc::sighandler_t) -> libc::sighandler_t {
    let mut old = dfl();
    let mut sa = dfl();
    sa.sa_sigaction = handler;
    sa.sa_flags = libc::SA_RESTART;
    // Through our sigaction hook, so the bookkeeping is in one place (glibc's signal is
    // sigaction with SA_RESTART and an empty mask).
    if sigaction(sig, &sa, &mut old) != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}
