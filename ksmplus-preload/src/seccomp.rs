//! Knowing, inside the process, that it has entered a seccomp sandbox — before the filter is in.
//!
//! A sandbox filter may kill the process for `madvise(MADV_MERGEABLE)` (Firefox's utility and
//! content processes trap it with SIGSYS). The agent reads a process's `Seccomp:` state before
//! posting a batch, but a filter installed between that read and the shim running the batch
//! would still be hit. So the shim watches the two doors glibc offers for installing a filter,
//! `prctl(PR_SET_SECCOMP, …)` and `syscall(SYS_seccomp, …)`, and sets `filter::FILTERED`
//! before the filter goes in; from then on it runs no KSM advice nor `prctl` command in this
//! process (nor in its fork children, which inherit the flag with the filter).
//!
//! Invariants:
//! - The hooks behave exactly like glibc's functions: same arguments to the kernel, same return
//!   value and errno. `syscall` makes the system call from its own body with the stack as on
//!   entry and no frame (as glibc's), so a `syscall(SYS_vfork)` or
//!   `syscall(SYS_clone, CLONE_VM|CLONE_VFORK, …)` child cannot clobber a frame its parent
//!   returns through. It calls into Rust for the seccomp case (a tail jump) and, before
//!   `SYS_fork` or a `SYS_clone` without `CLONE_VM` (a new process: Chromium's zygote forks
//!   that way, and no `pthread_atfork` handler runs for it), for [`crate::chan::before_fork`]
//!   — a call that returns before the system call is made. `clone3` and `vfork` are not
//!   covered.
//! - No allocation, lock or panic. The one wait — until a batch being executed on another
//!   thread finishes, so no advice runs once the filter is in — is bounded.
//! - Not covered: a filter installed with a raw `syscall` instruction (not through glibc); the
//!   agent sees it in `/proc/PID/status` before its next batch. Filters inherited over `execve`
//!   are `filter`'s concern.

use crate::filter::FILTERED;
use core::sync::atomic::{AtomicBool, Ordering::SeqCst};
use ksmplus_common::channel::flag;

/// `PR_SET_SECCOMP`.
const PR_SET_SECCOMP: i32 = 22;

/// `SECCOMP_SET_MODE_STRICT`, `SECCOMP_SET_MODE_FILTER` (seccomp(2) operations).
const SET_MODE_STRICT: i64 = 0;
const SET_MODE_FILTER: i64 = 1;
/// `SECCOMP_MODE_STRICT`, `SECCOMP_MODE_FILTER` (prctl's modes).
const MODE_STRICT: i64 = 1;
const MODE_FILTER: i64 = 2;

/// Does `prctl(PR_SET_SECCOMP, mode, prog)` install something? A null program is the probe
/// Firefox and others make to learn whether seccomp-bpf exists (it fails with EFAULT).
fn prctl_installs(mode: i64, prog: i64) -> bool {
    mode == MODE_STRICT || (mode == MODE_FILTER && prog != 0)
}

/// Does `seccomp(op, flags, args)` install something? (Null `args`: a probe, as above.)
fn seccomp_installs(op: i64, args: i64) -> bool {
    op == SET_MODE_STRICT || (op == SET_MODE_FILTER && args != 0)
}

/// Runs `install` (a system call that may install a filter; `-errno` on failure) with the
/// flag set before — no advice runs from then on, nor still runs on another thread when the
/// filter goes in — and cleared again if it failed and was clear before.
#[cold]
fn guarded(install: impl FnOnce() -> i64) -> i64 {
    guarded_on(&FILTERED, install)
}

fn guarded_on(filtered: &AtomicBool, install: impl FnOnce() -> i64) -> i64 {
    let was = filtered.swap(true, SeqCst);
    crate::chan::wait_not_busy();
    let r = install();
    if r < 0 && !was {
        filtered.store(false, SeqCst);
    }
    if r >= 0 {
        crate::chan::add_flags(flag::FILTER_OWN);
    }
    r
}

#[cfg(not(test))]
mod hooks {
    use super::{guarded, prctl_installs, seccomp_installs, PR_SET_SECCOMP};
    use crate::sys;
    use libc::{c_int, c_long, c_ulong};

    /// glibc's `int prctl(int option, ...)`: every option takes at most four integer or
    /// pointer arguments, read from their registers as a variadic callee would.
    #[no_mangle]
    pub unsafe extern "C" fn prctl(
        option: c_int,
        a2: c_ulong,
        a3: c_ulong,
        a4: c_ulong,
        a5: c_ulong,
    ) -> c_int {
        // SAFETY: the caller's arguments, unchanged, to the kernel (glibc's wrapper does the same).
        let call = || unsafe {
            let args = [
                option as c_long,
                a2 as c_long,
                a3 as c_long,
                a4 as c_long,
                a5 as c_long,
                0,
            ];
            sys::raw_syscall6(libc::SYS_prctl, args)
        };
        let r = if option == PR_SET_SECCOMP && prctl_installs(a2 as i64, a3 as i64) {
            guarded(call)
        } else {
            call()
        };
        sys::errno_convention(r) as c_int
    }

    /// glibc's `long syscall(long nr, ...)`, instruction for instruction, with tests in
    /// front: `seccomp(2)` and `prctl(PR_SET_SECCOMP)` go through [`seccomp_call`]; `fork(2)`
    /// and a `clone(2)` without `CLONE_VM` (a new process, as Chromium's zygote forks: no
    /// `pthread_atfork` handler runs for it) first call [`before_fork`], as a prepare handler.
    // SAFETY (naked): the body is the whole function — it reads only its argument registers
    // and the caller's seventh argument slot, returns with `ret` or by a tail jump to an
    // `extern "C"` function taking the same arguments, and makes the system call with the
    // stack as on entry (so a child returns exactly as from glibc's). The one call out, to
    // `before_fork`, is made with a 16-byte aligned stack and the six argument registers saved
    // around it and restored before the system call; it comes back before the fork.
    #[cfg(target_arch = "x86_64")]
    #[unsafe(naked)]
    #[no_mangle]
    pub unsafe extern "C" fn syscall(nr: c_long) -> c_long {
        core::arch::naked_asm!(
            "cmp rdi, {sys_clone}",
            "je 4f",
            "cmp rdi, {sys_fork}",
            "je 5f",
            "cmp rdi, {sys_seccomp}",
            "je 2f",
            "cmp rdi, {sys_prctl}",
            "jne 1f",
            "cmp rsi, {pr_set_seccomp}",
            "jne 1f",
            "2:",
            // Same registers and stack as on entry: seccomp_call sees the caller's arguments.
            "jmp {seccomp_call}",
            // clone(flags, ...): flags in rsi. With CLONE_VM (a thread, vfork) it is no fork.
            "4:",
            "test rsi, {clone_vm}",
            "jnz 1f",
            "5:",
            // On entry rsp is 8 past a 16-byte boundary (the return address): six pushes and
            // 8 more bytes make it aligned for the call.
            "push rdi",
            "push rsi",
            "push rdx",
            "push rcx",
            "push r8",
            "push r9",
            "sub rsp, 8",
            "call {before_fork}",
            "add rsp, 8",
            "pop r9",
            "pop r8",
            "pop rcx",
            "pop rdx",
            "pop rsi",
            "pop rdi",
            "1:",
            "mov rax, rdi",
            "mov rdi, rsi",
            "mov rsi, rdx",
            "mov rdx, rcx",
            "mov r10, r8",
            "mov r8, r9",
            "mov r9, [rsp + 8]",
            "syscall",
            "cmp rax, -4095",
            "jae 3f",
            "ret",
            "3:",
            "mov rdi, rax",
            "jmp {fail}",
            sys_clone = const libc::SYS_clone,
            sys_fork = const libc::SYS_fork,
            clone_vm = const libc::CLONE_VM,
            before_fork = sym before_fork,
            sys_seccomp = const libc::SYS_seccomp,
            sys_prctl = const libc::SYS_prctl,
            pr_set_seccomp = const PR_SET_SECCOMP,
            seccomp_call = sym seccomp_call,
            fail = sym syscall_failed,
        )
    }

    /// `syscall(SYS_seccomp | SYS_prctl, …)` that installs (or may install) a filter.
    #[cfg(target_arch = "x86_64")]
    unsafe extern "C" fn seccomp_call(
        nr: c_long,
        a1: c_long,
        a2: c_long,
        a3: c_long,
        a4: c_long,
        a5: c_long,
        a6: c_long,
    ) -> c_long {
        // SAFETY: the caller's system call and arguments, unchanged.
        let call = || unsafe { sys::raw_syscall6(nr, [a1, a2, a3, a4, a5, a6]) };
        let installs = if nr == libc::SYS_seccomp {
            seccomp_installs(a1, a3)
        } else {
            prctl_installs(a2, a3)
        };
        sys::errno_convention(if installs { guarded(call) } else { call() })
    }

    /// `syscall(SYS_fork | SYS_clone without CLONE_VM, …)`: see [`crate::chan::before_fork`].
    #[cfg(target_arch = "x86_64")]
    extern "C" fn before_fork() {
        crate::chan::before_fork();
    }

    /// The error tail of [`syscall`]: `-errno` from the kernel becomes errno and -1.
    #[cfg(target_arch = "x86_64")]
    extern "C" fn syscall_failed(r: c_long) -> c_long {
        sys::errno_convention(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_not_installs() {
        assert!(!prctl_installs(MODE_FILTER, 0));
        assert!(prctl_installs(MODE_FILTER, 0x1000));
        assert!(prctl_installs(MODE_STRICT, 0));
        assert!(!seccomp_installs(SET_MODE_FILTER, 0));
        assert!(seccomp_installs(SET_MODE_FILTER, 0x1000));
        assert!(seccomp_installs(SET_MODE_STRICT, 0));
        assert!(!seccomp_installs(2, 0x1000)); // SECCOMP_GET_ACTION_AVAIL
    }

    #[test]
    fn the_flag_stays_only_when_the_install_succeeds() {
        // A flag of the test's own: the process-wide one is read by chan's tests meanwhile.
        let flag = AtomicBool::new(false);
        let efault = -(libc::EFAULT as i64);
        assert_eq!(guarded_on(&flag, || efault), efault);
        assert!(!flag.load(SeqCst), "a failed install leaves advice allowed");
        assert_eq!(guarded_on(&flag, || 0), 0);
        assert!(flag.load(SeqCst));
        assert_eq!(guarded_on(&flag, || efault), efault);
        assert!(
            flag.load(SeqCst),
            "a failed second install keeps the first one's flag"
        );
        assert!(crate::filter::may_advise());
    }
}
