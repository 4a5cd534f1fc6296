//! What the shim knows of this process's seccomp state: filters it was exec'd with (a
//! launcher's), and whether the program has started installing one of its own (set by the
//! `seccomp` hooks). The channel page and the command executor read it; it reads nothing.
//!
//! Invariant: atomics only — every function may run inside a hook or a signal handler.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use ksmplus_common::channel::flag;

/// The process has started installing (or inherited from its forking parent) a seccomp filter.
pub(crate) static FILTERED: AtomicBool = AtomicBool::new(false);
/// How many seccomp filters the process was exec'd with (0: none, or unknown).
static INHERITED: AtomicU32 = AtomicU32::new(0);

/// Records the filters the process was exec'd with (the constructor reads them from
/// `/proc/self/status`): a launcher's filter, which the agent may advise under.
pub fn note_inherited(filters: u32) {
    INHERITED.store(filters.min(255), SeqCst);
}

/// `Seccomp_filters:` of a `/proc/self/status` text when `Seccomp:` says filter mode (2).
pub fn inherited_filters(status: &str) -> u32 {
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    match field("Seccomp") {
        Some(2) => field("Seccomp_filters").unwrap_or(0),
        _ => 0,
    }
}

/// The channel flags that say what this process's seccomp state is, as the shim knows it.
pub fn channel_flags() -> u32 {
    let n = INHERITED.load(SeqCst);
    let mut f = 0;
    if n != 0 {
        f |= flag::FILTER_INHERITED | (n << flag::INHERITED_SHIFT);
    }
    if FILTERED.load(SeqCst) {
        f |= flag::FILTER_OWN;
    }
    f
}

/// May the shim run KSM advice and `prctl` commands here? (false once a filter is coming.)
#[inline]
pub fn may_advise() -> bool {
    !FILTERED.load(SeqCst)
}

/// No seccomp filter at all, as far as the shim knows: not exec'd under one, none coming. Only
/// then does the cache use `madvise` advice beyond what every allocator needs (a filter may
/// trap advice it does not expect: Firefox's allows a short list).
#[inline]
pub fn unfiltered() -> bool {
    INHERITED.load(SeqCst) == 0 && !FILTERED.load(SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_at_start_from_status() {
        let st = "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t3\nSpeculation_Store_Bypass:\tx\n";
        assert_eq!(inherited_filters(st), 3);
        assert_eq!(inherited_filters("Seccomp:\t0\nSeccomp_filters:\t0\n"), 0);
        assert_eq!(
            inherited_filters("Seccomp:\t1\n"),
            0,
            "strict mode is not a filter"
        );
        assert_eq!(inherited_filters(""), 0);
    }
}
