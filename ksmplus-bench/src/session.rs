//! What both runs — the head-to-head table and `desktop` — do around their cells: take ksmd for
//! themselves under the lock, save its settings and restore them however the run ends, set the
//! tunables every cell runs with, describe the machine in the header, and give the verdict.

use crate::sys;
use ksmplus_common::ksm::{self, KsmSettings};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The lock every user of ksmd on this machine takes (the bench, the tests, the demo).
pub const LOCK: &str = "/tmp/ksmplus-ksmd.lock";

/// KSMPLUS_REQUIRE_KSM=1 (as in CI): a smoke run fails instead of skipping what it cannot run.
pub fn ksm_required() -> bool {
    std::env::var("KSMPLUS_REQUIRE_KSM").as_deref() == Ok("1")
}

/// `--require-ksmplus`, or [`ksm_required`]: a smoke run whose ksmplus cells could not run fails
/// instead of passing on the kernel's approaches alone.
pub fn require_ksmplus(flag: bool) -> bool {
    flag || ksm_required()
}

/// Why this machine cannot run the bench, if it cannot.
pub fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (it changes /sys/kernel/mm/ksm)".into());
    }
    if !Path::new("/sys/kernel/mm/ksm/run").exists() {
        return Some("this kernel has no KSM (/sys/kernel/mm/ksm/run missing)".into());
    }
    if !Path::new("/proc/self/ksm_stat").exists() {
        return Some("this kernel has no /proc/PID/ksm_stat (needs Linux 6.1+)".into());
    }
    None
}

/// A run's hold on ksmd: the lock, the saved settings, the run's temporary directory.
pub struct Session {
    // Fields drop in this order: the directory is removed, the settings are restored, and only
    // then is the lock released, so the next holder finds ksmd as this run found it.
    tmp: TmpDir,
    guard: SettingsGuard,
    _lock: sys::LockFile,
}

impl Session {
    /// Takes the ksmd lock (waiting while another holder has it), runs `check` under it, then
    /// saves the ksmd settings and creates the temporary directory `{name}-{pid}`.
    pub fn start(
        name: &str,
        check: impl FnOnce() -> Result<(), String>,
    ) -> Result<Session, String> {
        let lock = sys::LockFile::acquire(Path::new(LOCK)).map_err(|e| format!("{LOCK}: {e}"))?;
        check()?;
        let saved = KsmSettings::save(root()).map_err(|e| e.to_string())?;
        let guard = SettingsGuard { saved, done: false };
        let tmp = TmpDir(std::env::temp_dir().join(format!("{name}-{}", std::process::id())));
        std::fs::create_dir_all(&tmp.0).map_err(|e| format!("{}: {e}", tmp.0.display()))?;
        Ok(Session {
            tmp,
            guard,
            _lock: lock,
        })
    }

    pub fn tmp(&self) -> &Path {
        &self.tmp.0
    }

    /// The tunables every cell of the run shares: `pages_to_scan`, `sleep_millisecs`,
    /// `use_zero_pages`, and `advisor_mode=none` where the kernel has the advisor.
    pub fn tune(
        &self,
        pages_to_scan: u32,
        sleep_millisecs: u32,
        use_zero_pages: u32,
    ) -> Result<(), String> {
        sys::ksm_set("pages_to_scan", &pages_to_scan.to_string())?;
        sys::ksm_set("sleep_millisecs", &sleep_millisecs.to_string())?;
        sys::ksm_set("use_zero_pages", &use_zero_pages.to_string())?;
        if self.guard.saved.get("advisor_mode").is_some() {
            sys::ksm_set("advisor_mode", "none")?;
        }
        Ok(())
    }

    /// Restores the saved settings now (an error if they cannot be) and reads them back.
    pub fn restore(&mut self) -> Result<Restored, String> {
        self.guard.restore()?;
        let now = KsmSettings::save(root()).map_err(|e| e.to_string())?;
        Ok(Restored {
            saved: self.guard.saved.clone(),
            now,
        })
    }
}

/// The ksmd settings saved at the start and those read back after [`Session::restore`].
pub struct Restored {
    saved: KsmSettings,
    now: KsmSettings,
}

impl Restored {
    pub fn ok(&self) -> bool {
        self.now == self.saved
    }
}

fn root() -> &'static Path {
    Path::new("/")
}

/// Restores the saved ksmd settings when dropped, so an error, a panic or a signal that unwinds
/// leaves ksmd as it was found.
struct SettingsGuard {
    saved: KsmSettings,
    done: bool,
}

impl SettingsGuard {
    fn restore(&mut self) -> Result<(), String> {
        self.done = true;
        // max_page_sharing refuses changes while pages are shared: retry while ksmd cleans up.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.saved.restore(root()) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    let _ = ksm::write_sysfs(root(), "run", "1");
                    eprintln!("ksmplus-bench: restoring ksmd settings: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(format!("cannot restore the ksmd settings: {e}")),
            }
        }
    }
}

impl Drop for SettingsGuard {
    fn drop(&mut self) {
        if !self.done {
            match self.restore() {
                Ok(()) => eprintln!("ksmplus-bench: ksmd settings restored"),
                Err(e) => eprintln!("ksmplus-bench: {e}"),
            }
        }
    }
}

/// A temporary directory removed on drop.
struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// `DATE — Linux KERNEL — N CPUs`, for a run's header.
pub fn machine() -> String {
    format!(
        "{} — Linux {} — {} CPUs",
        date(),
        kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The ksmd settings a run prints in its header (those that exist on this kernel).
pub fn shown_settings() -> Vec<(String, String)> {
    [
        "pages_to_scan",
        "sleep_millisecs",
        "use_zero_pages",
        "max_page_sharing",
        "merge_across_nodes",
        "advisor_mode",
    ]
    .iter()
    .filter_map(|n| {
        ksm::read_sysfs_text(root(), n)
            .ok()
            .map(|v| (n.to_string(), v))
    })
    .collect()
}

/// `name=value ...` of [`shown_settings`].
pub fn settings_text(settings: &[(String, String)]) -> String {
    settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tool's path for the header, or `not found`.
pub fn shown_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or("not found".into(), |p| p.display().to_string())
}

/// The end of a run: an error if the ksmd settings were not restored, exit 1 with every failed
/// smoke assertion, else success.
pub fn conclude(
    who: &str,
    restored: &Restored,
    smoke_failures: Option<Vec<String>>,
) -> Result<ExitCode, String> {
    if !restored.ok() {
        return Err(format!(
            "ksmd settings not restored: saved {:?}, now {:?}",
            restored.saved.values, restored.now.values
        ));
    }
    if let Some(failures) = smoke_failures {
        if !failures.is_empty() {
            for f in &failures {
                eprintln!("{who}: SMOKE FAILED: {f}");
            }
            return Ok(ExitCode::from(1));
        }
        eprintln!("{who}: smoke passed");
    }
    Ok(ExitCode::SUCCESS)
}
