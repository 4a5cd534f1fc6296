//! Waking an idle program so its shim executes a posted batch (see the shim's `wake.rs`).
//!
//! Invariants:
//! - The signal is sent only if the shim says it handles it (`channel.signal`, no
//!   `SIGNAL_LOST`), the kernel shows it caught (`SigCgt`) and not ignored, and only to one
//!   thread that does not block it.
//! - That thread must be running, or blocked in a system call that `SA_RESTART` resumes unseen
//!   (`read`, `write`, `futex`, `wait4`, ...) or that event loops retry (`poll`, `epoll_wait`,
//!   `select`). A thread in `nanosleep`, `pause`, `sigsuspend` and the like would see EINTR:
//!   it is never chosen, and if no thread qualifies nothing is sent now.

use crate::procfs;
use ksmplus_common::channel::{flag, Snapshot};
use std::path::Path;

/// System calls after which an interrupted thread resumes unseen (SA_RESTART) or whose
/// callers retry on EINTR by design (event loops).
fn tolerant(nr: i64) -> bool {
    const RESTARTED: &[i64] = &[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_recvmmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_futex,
        libc::SYS_flock,
        // Event loops: glib, Qt, libuv, tokio, asyncio all retry these on EINTR.
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_poll,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_select,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_epoll_wait,
    ];
    RESTARTED.contains(&nr)
}

/// Why no signal was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoWake {
    /// The shim has no handler (disabled, or the program took the signal over).
    NoHandler,
    /// Every thread is blocked where a signal would show (nanosleep, pause, ...), or blocks it.
    NoSafeThread,
    /// tgkill failed (the process is gone).
    Failed,
}

/// Sends the shim's wake-up signal to one suitable thread of `pid`. Returns the thread.
pub fn wake(root: &Path, pid: u32, snap: &Snapshot) -> Result<u32, NoWake> {
    let sig = snap.signal;
    if sig == 0 || sig >= 64 || snap.flags & flag::SIGNAL_LOST != 0 {
        return Err(NoWake::NoHandler);
    }
    let bit = 1u64 << (sig - 1);
    let st = procfs::read_status(root, pid).map_err(|_| NoWake::Failed)?;
    if st.sig_cgt & bit == 0 || st.sig_ign & bit != 0 {
        return Err(NoWake::NoHandler);
    }
    let mut best: Option<(u8, u32)> = None;
    for tid in procfs::threads(root, pid) {
        let Some(t) = procfs::thread_state(root, pid, tid) else {
            continue;
        };
        if t.sig_blk & bit != 0 {
            continue;
        }
        // Running in user space is best (nothing to interrupt), then a restartable call.
        let rank = match (t.state, t.syscall) {
            ('R', _) => 0,
            (_, Some(nr)) if tolerant(nr) => 1,
            _ => continue,
        };
        // Prefer the main thread among equals.
        let rank = rank * 2 + u8::from(tid != pid);
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, tid));
        }
    }
    let Some((_, tid)) = best else {
        return Err(NoWake::NoSafeThread);
    };
    // SAFETY: tgkill with the process's own tgid only reaches a thread of that process.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, pid as i32, tid as i32, sig as i32) };
    if r == 0 {
        Ok(tid)
    } else {
        Err(NoWake::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeping_calls_are_not_tolerant() {
        assert!(tolerant(libc::SYS_read));
        assert!(tolerant(libc::SYS_futex));
        assert!(!tolerant(libc::SYS_nanosleep));
        assert!(!tolerant(libc::SYS_clock_nanosleep));
        assert!(!tolerant(libc::SYS_rt_sigsuspend));
    }
}
