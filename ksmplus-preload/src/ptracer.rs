//! Yama `ptrace_scope` 1: naming the agent as this process's ptracer, so it can read
//! `/proc/PID/mem` without being an ancestor (see `init.rs`).
use core::sync::atomic::AtomicI32;

/// The agent named with `PR_SET_PTRACER` (0: none); forked children name it again.
pub static PTRACER: AtomicI32 = AtomicI32::new(0);

/// Whether to name the agent: Yama scope exactly 1 and no seccomp filter (or an unreadable
/// status: not known to be safe).
pub fn names_ptracer(scope: Option<&str>, status: Option<&str>) -> bool {
    let unfiltered = status.is_some_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .is_some_and(|v| v.trim() == "0")
    });
    scope.map(str::trim) == Some("1") && unfiltered
}

/// `prctl(PR_SET_PTRACER, pid)`; true when the kernel took it.
pub fn set_ptracer(pid: i32) -> bool {
    // SAFETY: PR_SET_PTRACER takes a pid and changes only who may ptrace this process.
    unsafe { libc::prctl(libc::PR_SET_PTRACER, pid as libc::c_ulong, 0, 0, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::names_ptracer;

    #[test]
    fn ptracer_only_under_scope_one_without_seccomp() {
        let plain = "Name:\tx\nSeccomp:\t0\nSeccomp_filters:\t0\n";
        let filtered = "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert!(names_ptracer(Some("1\n"), Some(plain)));
        assert!(!names_ptracer(Some("1\n"), Some(filtered)));
        assert!(!names_ptracer(Some("1\n"), Some("Name:\tx\n")));
        assert!(!names_ptracer(Some("1\n"), None));
        for other in ["0\n", "2\n", "3\n", ""] {
            assert!(!names_ptracer(Some(other), Some(plain)));
        }
        assert!(!names_ptracer(None, Some(plain)));
    }
}
