//! The policy's `[ksmd]` table: ksmd tunables the agent writes (only when it runs as root),
//! remembering each one's value from before it first changed it.
//!
//! Invariants: a tunable the policy stops naming gets that value back at once (reload); every
//! tunable the agent changed gets it back at exit; `run` is written last in both directions,
//! so ksmd never runs with half-applied settings.

use crate::{info, warn};
use ksmplus_common::ksm;
use ksmplus_common::policy::Ksmd;
use std::path::{Path, PathBuf};

pub struct Tunables {
    root: PathBuf,
    /// `(name, value before the agent first wrote it)`.
    saved: Vec<(&'static str, String)>,
}

impl Tunables {
    pub fn new(root: &Path) -> Tunables {
        Tunables {
            root: root.to_owned(),
            saved: Vec::new(),
        }
    }

    /// Applies `k`; tunables it no longer names go back to their saved value.
    pub fn apply(&mut self, k: &Ksmd) {
        let wanted = [
            ("pages_to_scan", k.pages_to_scan),
            ("sleep_millisecs", k.sleep_millisecs),
            ("use_zero_pages", k.use_zero_pages),
            ("run", k.run),
        ];
        for (name, v) in wanted {
            let saved = self.saved.iter().position(|(n, _)| *n == name);
            match (v, saved) {
                (Some(v), _) => {
                    if saved.is_none() {
                        match ksm::read_sysfs_text(&self.root, name) {
                            Ok(old) => self.saved.push((name, old.trim().to_string())),
                            Err(e) => {
                                warn!("cannot read ksmd.{name}, not changing it: {e}");
                                continue;
                            }
                        }
                    }
                    if let Err(e) = ksm::write_sysfs(&self.root, name, &v.to_string()) {
                        warn!("cannot apply ksmd.{name} = {v}: {e}");
                    }
                }
                (None, Some(i)) => {
                    let (name, old) = self.saved.remove(i);
                    self.write_back(name, &old);
                }
                (None, None) => {}
            }
        }
    }

    /// Writes back every tunable the agent changed (`run` last).
    pub fn restore(&mut self) {
        let mut saved = std::mem::take(&mut self.saved);
        saved.sort_by_key(|(n, _)| *n == "run");
        for (name, old) in saved {
            self.write_back(name, &old);
        }
    }

    fn write_back(&self, name: &str, old: &str) {
        match ksm::write_sysfs(&self.root, name, old) {
            Ok(()) => info!("ksmd.{name} restored to {old}"),
            Err(e) => warn!("cannot restore ksmd.{name} to {old}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a temporary sysfs tree: applied values are written, a dropped key and every key at
    /// exit get their old value back.
    #[test]
    fn apply_drop_and_restore_on_a_fake_sysfs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let dir = root.join("sys/kernel/mm/ksm");
        std::fs::create_dir_all(&dir).unwrap();
        for (n, v) in [
            ("run", "0"),
            ("pages_to_scan", "100"),
            ("sleep_millisecs", "20"),
        ] {
            std::fs::write(dir.join(n), format!("{v}\n")).unwrap();
        }
        let read = |n: &str| {
            std::fs::read_to_string(dir.join(n))
                .unwrap()
                .trim()
                .to_owned()
        };
        let mut t = Tunables::new(&root);
        t.apply(&Ksmd {
            run: Some(1),
            pages_to_scan: Some(5000),
            sleep_millisecs: Some(10),
            use_zero_pages: None,
        });
        assert_eq!(
            (read("run"), read("pages_to_scan"), read("sleep_millisecs")),
            ("1".into(), "5000".into(), "10".into())
        );
        t.apply(&Ksmd {
            run: Some(1),
            pages_to_scan: None,
            sleep_millisecs: Some(10),
            use_zero_pages: None,
        });
        assert_eq!(
            read("pages_to_scan"),
            "100",
            "dropped from the policy: restored"
        );
        t.restore();
        assert_eq!(
            (read("run"), read("sleep_millisecs")),
            ("0".into(), "20".into())
        );
    }
}
