//! The agent's policy: which programs are tracked, the sampling schedule and its limits.
//!
//! Read from `$XDG_CONFIG_HOME/ksmplus/policy.toml` (a missing file means [`Policy::default`]).
//! Every table refuses unknown keys, so a typo is an error, and errors carry the file, line,
//! column and key they come from. `examples/policy.toml` documents every key.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub use crate::names::{name_matches, COMM_LEN, DEFAULT_EXCLUDE};

/// The whole policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Track every program not excluded. Off by default: the list in `track` decides.
    pub track_all: bool,
    /// Programs to track, by comm (`/proc/PID/comm`, 15 bytes at most) or executable basename.
    pub track: Vec<String>,
    /// Programs never tracked, even with `track_all` or when listed in `track`.
    pub exclude: Vec<String>,
    /// Regions smaller than this many bytes are not sampled.
    pub min_region_bytes: u64,
    /// Accepted for old policy files; no effect since the agent reads every mapping from
    /// `/proc/PID/maps` itself.
    pub cover_maps: bool,
    /// What to do for a process whose sandbox refuses KSM advice (a seccomp filter that
    /// answers `madvise(MADV_MERGEABLE)` with EPERM, as Chromium's renderers do).
    pub sandbox_fallback: SandboxFallback,
    pub sampling: Sampling,
    pub limits: Limits,
    pub ksmd: Ksmd,
}

/// See [`Policy::sandbox_fallback`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxFallback {
    /// Ask the process the refusing children were forked from (a fork server such as
    /// Chromium's zygote, which has no such sandbox) to switch on the kernel's
    /// merge-everything mode (`PR_SET_MEMORY_MERGE`), which its later children inherit: they are
    /// merged like under systemd's `MemoryKSM=yes`, at that mode's cost. Switched off again if
    /// a child of that parent turns out to accept marks, or if the children's KSM profit
    /// (`ksm_process_profit`) is negative.
    #[default]
    MergeAny,
    /// Leave such processes alone (ksmplus saves nothing in them).
    None,
}

/// The KSM+ sampling schedule (thesis 4.1.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    /// Percentage of a region's pages sampled in the first round (1..=100).
    pub start: u32,
    /// Decrease of the percentage after each round.
    pub step: u32,
    /// A region whose percentage reaches this floor with nothing merged is dropped.
    pub floor: u32,
    /// Pause between two rounds of one region, milliseconds.
    pub round_interval_ms: u64,
    /// Pause between the first and the second round of a region, milliseconds (at most
    /// `round_interval_ms`): the checksum rule needs two samples of a page, so this sets how
    /// soon a new region's duplicates can be marked.
    pub first_recheck_ms: u64,
    /// Marked runs closer than this many pages are coalesced into one (bounds VMA splits; 0:
    /// only touching runs). Every page of a marked range costs ksmd a visit per pass, merged or
    /// not, and a page that did not merge costs it a checksum each time: 2 rather than 8 halved
    /// ksmd's CPU on the desktop scenarios at fast settings (session 7), 0 rather than 2 halved
    /// it again on D3 for ~70 % more marked VMAs there (docs/DESKTOP-BENCH.md, session 8).
    pub coalesce_gap_pages: u64,
    /// A marked run with nothing merged after this many full ksmd scans is unmarked.
    pub unmerge_after_full_scans: u64,
}

/// Rate and memory limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Pages fingerprinted per second, per client process.
    pub fingerprint_pages_per_sec: u64,
    /// Pages fingerprinted per second, all clients together.
    pub fingerprint_pages_per_sec_total: u64,
    /// Most MERGEABLE ranges the agent keeps per process (each may split a VMA in up to three;
    /// `vm.max_map_count` is 65530).
    pub max_marked_ranges: u64,
    /// Most page fingerprints the agent remembers, all processes together; beyond it the
    /// fingerprints of the least recently sampled regions are evicted.
    pub max_fingerprints: u64,
}

/// ksmd settings the agent applies at start and on reload, only when it runs as root.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ksmd {
    pub run: Option<u32>,
    pub pages_to_scan: Option<u32>,
    pub sleep_millisecs: Option<u32>,
    pub use_zero_pages: Option<u32>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            track_all: false,
            track: Vec::new(),
            exclude: DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect(),
            min_region_bytes: 65536,
            cover_maps: true,
            sandbox_fallback: SandboxFallback::MergeAny,
            sampling: Sampling::default(),
            limits: Limits::default(),
            ksmd: Ksmd::default(),
        }
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            start: 100,
            step: 10,
            floor: 10,
            round_interval_ms: 1000,
            first_recheck_ms: 150,
            coalesce_gap_pages: 0,
            unmerge_after_full_scans: 3,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fingerprint_pages_per_sec: 65536,
            fingerprint_pages_per_sec_total: 262144,
            max_marked_ranges: 4096,
            max_fingerprints: 1 << 20,
        }
    }
}

/// A policy that could not be read: the message names the file, line, column and key.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {key}{message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        /// "key `name`: " when the offending key is known, else empty.
        key: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Policy {
    /// Parses policy text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(|e| {
            let (line, column, key) = match e.span() {
                Some(span) => locate(text, span.start),
                None => (0, 0, String::new()),
            };
            let message = e.message().trim().to_owned();
            // An unknown-field message already names the key.
            let key = if key.is_empty() || message.contains(&format!("`{key}`")) {
                String::new()
            } else {
                format!("key `{key}`: ")
            };
            PolicyError::Parse {
                path: path.to_owned(),
                line,
                column,
                key,
                message,
            }
        })?;
        p.validate().map_err(|message| PolicyError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(p)
    }

    /// Reads a policy file; a missing file is the default policy.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Policy::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policy::default()),
            Err(source) => Err(PolicyError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.sampling;
        if !(1..=100).contains(&s.start) {
            return Err(format!("sampling.start = {} is not in 1..=100", s.start));
        }
        if s.floor == 0 || s.floor > s.start {
            return Err(format!(
                "sampling.floor = {} is not in 1..=sampling.start ({})",
                s.floor, s.start
            ));
        }
        if s.step == 0 {
            return Err("sampling.step must be at least 1".into());
        }
        let l = &self.limits;
        if l.fingerprint_pages_per_sec == 0 || l.fingerprint_pages_per_sec_total == 0 {
            return Err("limits.fingerprint_pages_per_sec* must be at least 1".into());
        }
        if l.max_fingerprints == 0 {
            return Err("limits.max_fingerprints must be at least 1".into());
        }
        if let Some(v) = self.ksmd.run {
            if v > 2 {
                return Err(format!("ksmd.run = {v} is not 0, 1 or 2"));
            }
        }
        if let Some(v) = self.ksmd.use_zero_pages {
            if v > 1 {
                return Err(format!("ksmd.use_zero_pages = {v} is not 0 or 1"));
            }
        }
        Ok(())
    }

    /// Whether a program is tracked: `exclude` first, then `track_all`, then `track`.
    /// `comm` is cut to 15 bytes by the kernel, so names are also matched against the
    /// basename of `exe`, and a name longer than 15 bytes matches a comm that is its prefix.
    pub fn decide(&self, comm: &str, exe: &str) -> Decision {
        if self.exclude.iter().any(|n| name_matches(n, comm, exe)) {
            return Decision::Excluded;
        }
        if self.track_all || self.track.iter().any(|n| name_matches(n, comm, exe)) {
            return Decision::Track;
        }
        Decision::NotListed
    }
}

/// The outcome of [`Policy::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Track,
    /// Listed in `exclude`: never tracked.
    Excluded,
    /// Not in `track` and `track_all` is off.
    NotListed,
}

/// 1-based line and column of byte `offset` in `text`, and the key assigned on that line (if any).
fn locate(text: &str, offset: usize) -> (usize, usize, String) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = offset - line_start + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = match line_text.split_once('=') {
        Some((k, _)) if !line_text.trim_start().starts_with('[') => {
            k.trim().trim_matches('"').to_owned()
        }
        _ => String::new(),
    };
    (line, column, key)
}

pub use crate::paths::default_policy_path;

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("/cfg/policy.toml"))
    }

    #[test]
    fn empty_is_default() {
        assert_eq!(p("").unwrap(), Policy::default());
        assert_eq!(
            Policy::load(Path::new("/nonexistent/ksmplus/policy.toml")).unwrap(),
            Policy::default()
        );
    }

    #[test]
    fn full_file_parses() {
        let t = r#"
track_all = false
track = ["okular", "firefox"]
exclude = ["ssh-agent"]
min_region_bytes = 65536
cover_maps = false
[sampling]
start = 100
step = 20
floor = 20
round_interval_ms = 200
first_recheck_ms = 50
coalesce_gap_pages = 4
unmerge_after_full_scans = 2
[limits]
fingerprint_pages_per_sec = 1000
fingerprint_pages_per_sec_total = 4000
max_marked_ranges = 10
max_fingerprints = 100000
[ksmd]
run = 1
pages_to_scan = 1000
"#;
        let pol = p(t).unwrap();
        assert_eq!(pol.track, vec!["okular", "firefox"]);
        assert_eq!(pol.sampling.step, 20);
        assert_eq!(pol.ksmd.pages_to_scan, Some(1000));
        assert_eq!(pol.ksmd.sleep_millisecs, None);
        assert!(!pol.cover_maps);
        assert_eq!(pol.sampling.first_recheck_ms, 50);
        assert!(Policy::default().cover_maps);
    }

    /// The error for `text` names the file, line `line` and `key`.
    fn assert_refused_at(text: &str, line: usize, key: &str) {
        let e = p(text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("/cfg/policy.toml:{line}:")), "{e}");
        assert!(e.contains(key), "{e}");
    }

    #[test]
    fn unknown_key_names_file_line_key() {
        assert_refused_at(
            "track = []\n[sampling]\nstart = 100\nstpe = 10\n",
            4,
            "stpe",
        );
    }

    #[test]
    fn wrong_type_names_key() {
        assert_refused_at(
            "track = []\n\nmin_region_bytes = \"big\"\n",
            3,
            "min_region_bytes",
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let e = p("track = [\"a\"\n\n").unwrap_err().to_string();
        assert!(e.starts_with("/cfg/policy.toml:"), "{e}");
        let e = p("a = 1\nb c\n").unwrap_err().to_string();
        assert!(e.starts_with("/cfg/policy.toml:2:"), "{e}");
    }

    #[test]
    fn invalid_values_refused() {
        assert!(p("[sampling]\nstart = 0\n").is_err());
        assert!(p("[sampling]\nfloor = 0\n").is_err());
        assert!(p("[sampling]\nstep = 0\n").is_err());
        assert!(p("[ksmd]\nrun = 7\n").is_err());
    }

    #[test]
    fn decide_by_comm_exe_and_exclude() {
        let mut pol =
            p("track = [\"okular\", \"a-very-long-program-name\", \"ssh-agent\"]").unwrap();
        assert_eq!(pol.decide("okular", "/usr/bin/okular"), Decision::Track);
        assert_eq!(pol.decide("x", "/usr/bin/okular"), Decision::Track);
        assert_eq!(
            pol.decide("a-very-long-pro", "/opt/a-very-long-program-name"),
            Decision::Track
        );
        assert_eq!(pol.decide("a-very-long-pro", ""), Decision::Track);
        assert_eq!(pol.decide("bash", "/bin/bash"), Decision::NotListed);
        assert_eq!(
            pol.decide("ssh-agent", "/usr/bin/ssh-agent"),
            Decision::Excluded
        );
        pol.track_all = true;
        assert_eq!(pol.decide("bash", "/bin/bash"), Decision::Track);
        assert_eq!(
            pol.decide("gpg-agent", "/usr/bin/gpg-agent"),
            Decision::Excluded
        );
        assert_eq!(
            pol.decide("prog", "/usr/bin/keepassxc (deleted)"),
            Decision::Excluded
        );
    }

    #[test]
    fn example_file_is_the_defaults_plus_okular_and_boot_time_tunables() {
        let text = include_str!("../../examples/policy.toml");
        let p = p(text).unwrap();
        let want = Policy {
            track: vec!["okular".into()],
            ksmd: Ksmd {
                pages_to_scan: Some(1000),
                sleep_millisecs: Some(20),
                ..Ksmd::default()
            },
            ..Policy::default()
        };
        assert_eq!(p, want);
    }

    /// The policy module's path is the one of `paths` (whose tests cover every case).
    #[test]
    fn default_path() {
        assert_eq!(
            default_policy_path(Some("/x"), Some("/h")),
            PathBuf::from("/x/ksmplus/policy.toml")
        );
    }
}
