//! System calls the agent, ksmplusctl and the bench share, through nix (feature `sys`): typed
//! `Errno` results, no `unsafe`. The LD_PRELOAD shim builds without this module and stays on
//! raw libc (nix may allocate, and a hook must not).

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The highest soft descriptor limit [`raise_nofile`] asks for: the kernel's default
/// `fs.nr_open`, which a hard limit of `RLIM_INFINITY` would exceed.
pub const NOFILE_CAP: u64 = 1 << 20;

/// Raises the soft limit on open descriptors to the hard one (at most [`NOFILE_CAP`]) and
/// returns the soft limit now in force. The agent holds three descriptors per tracked process
/// (pidfd, `mem`, `pagemap`); the bench one socket or child per simulated program.
pub fn raise_nofile() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = hard.min(NOFILE_CAP);
    if soft >= want {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_the_soft_limit_to_the_hard_one() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Lower the soft limit first (always allowed), then raise it again.
        setrlimit(Resource::RLIMIT_NOFILE, 64.min(hard), hard).unwrap();
        let now = raise_nofile().unwrap();
        assert_eq!(now, hard.min(NOFILE_CAP));
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap().0, now);
        // Already there: nothing to do, same answer.
        assert_eq!(raise_nofile().unwrap(), now);
    }
}
