//! Exclusive, fast ksmd for tests that measure merging, and the policy for skipping such tests.
use ksmplus_common::ksm::{self, KsmSettings};
use std::os::fd::AsRawFd;
use std::path::Path;

/// The lock every test (and every engineer's tool) that changes ksmd settings takes.
pub const KSMD_LOCK: &str = "/tmp/ksmplus-ksmd.lock";

/// True when KSM tests can run here (root and `/sys/kernel/mm/ksm` present). Otherwise prints why
/// the test is skipped and returns false — unless `KSMPLUS_REQUIRE_KSM=1`, then it panics.
pub fn require_ksm() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let present = ksm::sysfs_dir(Path::new("/")).join("run").exists();
    if root && present {
        return true;
    }
    let why = if !present {
        "/sys/kernel/mm/ksm is missing (kernel without CONFIG_KSM?)"
    } else {
        "not running as root (ksmd settings and /proc/PID/mem need it)"
    };
    if std::env::var("KSMPLUS_REQUIRE_KSM").as_deref() == Ok("1") {
        panic!("KSMPLUS_REQUIRE_KSM=1 but {why}");
    }
    eprintln!("SKIPPED: {why} (set KSMPLUS_REQUIRE_KSM=1 to make this a failure)");
    false
}

/// A test that cannot run here (missing kernel feature, not root): prints why and returns —
/// unless `KSMPLUS_REQUIRE_KSM=1` (as in CI), then the skip is a failure.
pub fn skip_or_fail(why: &str) {
    if std::env::var("KSMPLUS_REQUIRE_KSM").as_deref() == Ok("1") {
        panic!("KSMPLUS_REQUIRE_KSM=1 but this test cannot run: {why}");
    }
    eprintln!("SKIPPED: {why} (set KSMPLUS_REQUIRE_KSM=1 to make this a failure)");
}

/// True when the test runs as root; otherwise [`skip_or_fail`] with `why` (what root is needed
/// for) and false.
pub fn require_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_fail(why);
    false
}

/// Holds `flock(LOCK_EX)` on [`KSMD_LOCK`], runs ksmd fast (`run=1`, `pages_to_scan=5000`,
/// `sleep_millisecs=10`) and restores the saved settings on drop.
pub struct KsmdGuard {
    saved: KsmSettings,
    _lock: std::fs::File,
}

impl KsmdGuard {
    /// Blocks until the lock is free, then takes over ksmd.
    pub fn acquire() -> KsmdGuard {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(KSMD_LOCK)
            .unwrap_or_else(|e| panic!("open {KSMD_LOCK}: {e}"));
        // SAFETY: a valid open fd.
        let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            r,
            0,
            "flock {KSMD_LOCK}: {}",
            std::io::Error::last_os_error()
        );
        let root = Path::new("/");
        let saved = KsmSettings::save(root).expect("save ksm settings");
        for (k, v) in [
            ("pages_to_scan", "5000"),
            ("sleep_millisecs", "10"),
            ("run", "1"),
        ] {
            ksm::write_sysfs(root, k, v).unwrap_or_else(|e| panic!("set ksm {k}={v}: {e}"));
        }
        KsmdGuard { saved, _lock: lock }
    }

    /// `/sys/kernel/mm/ksm/full_scans`.
    pub fn full_scans(&self) -> i64 {
        ksm::read_sysfs(Path::new("/"), "full_scans").expect("read full_scans")
    }
}

impl Drop for KsmdGuard {
    fn drop(&mut self) {
        if let Err(e) = self.saved.restore(Path::new("/")) {
            eprintln!("warning: could not restore ksm settings: {e}");
        }
    }
}
