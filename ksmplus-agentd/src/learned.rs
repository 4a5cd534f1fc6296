//! What the agent learns and keeps across its runs: fork servers whose sandboxed children
//! refuse KSM advice (Chromium's zygote). The merge-any fallback must be in place before such
//! a process forks its first children — at a browser's start, within a second, before the
//! agent could learn it again — so the agent remembers the fork server by its executable and
//! the names of its command-line flags, and switches the fallback on at its Hello.
//!
//! Invariants: the file is one key per line under a comment header, rewritten whole
//! ([`ksmplus_common::fsutil::write_atomic`]); an unreadable or missing file is an empty store;
//! a key is forgotten as soon as a child of that fork server accepts marks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const HEADER: &str = "# ksmplus-agentd: fork servers whose sandboxed children refuse KSM advice.\n\
# Each line: executable, then the names of its command-line flags. The agent switches the\n\
# kernel's merge-any mode on in these processes at start (policy: sandbox_fallback). Delete a\n\
# line, or the file, to forget.\n";

#[derive(Debug, Default)]
pub struct Learned {
    path: Option<PathBuf>,
    fork_servers: BTreeSet<String>,
}

impl Learned {
    /// The store at `path` (`None`: kept in memory only).
    pub fn load(path: Option<PathBuf>) -> Learned {
        let fork_servers = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Learned { path, fork_servers }
    }

    pub fn is_fork_server(&self, key: &str) -> bool {
        !key.is_empty() && self.fork_servers.contains(key)
    }

    /// Remembers (or forgets) a fork server; saved at once.
    pub fn set_fork_server(&mut self, key: &str, yes: bool) {
        let changed = if yes {
            self.fork_servers.insert(key.to_owned())
        } else {
            self.fork_servers.remove(key)
        };
        if changed && !key.is_empty() {
            self.save();
        }
    }

    pub fn fork_servers(&self) -> impl Iterator<Item = &str> {
        self.fork_servers.iter().map(String::as_str)
    }

    fn save(&self) {
        let Some(p) = &self.path else { return };
        let mut text = HEADER.to_owned();
        for k in &self.fork_servers {
            text.push_str(k);
            text.push('\n');
        }
        let r = p
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| ksmplus_common::fsutil::write_atomic(p, text.as_bytes()));
        if let Err(e) = r {
            crate::warn!("cannot save {}: {e}", p.display());
        }
    }
}

/// A process's key: its executable and the sorted names of its `--flags` (values vary from run
/// to run; the set of flags tells Chromium's sandboxed zygote from its unsandboxed one and from
/// the browser). Empty when the command line is unreadable.
pub fn key(exe: &str, cmdline: &[u8]) -> String {
    let trimmed = cmdline
        .iter()
        .rposition(|&b| b != 0)
        .map_or(&cmdline[..0], |i| &cmdline[..=i]);
    // A program that rewrote its title (Chromium does) shows one string, spaces between words.
    let sep = if trimmed.contains(&0) { 0 } else { b' ' };
    let mut flags: Vec<&str> = trimmed
        .split(|&b| b == sep)
        .skip(1)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a))
        .collect();
    if exe.is_empty() {
        return String::new();
    }
    flags.sort_unstable();
    flags.dedup();
    let mut k = exe.to_owned();
    for f in flags {
        k.push(' ');
        k.push_str(f);
    }
    k
}

/// [`key`] of a running process.
pub fn key_of(root: &Path, pid: u32, exe: &str) -> String {
    std::fs::read(root.join(format!("proc/{pid}/cmdline")))
        .map(|c| key(exe, &c))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_keeps_flag_names_only() {
        let a = key(
            "/usr/lib/chromium/chromium",
            b"/usr/lib/chromium/chromium\0--type=zygote\0--user-data-dir=/tmp/a\0--noerrdialogs\0",
        );
        let b = key(
            "/usr/lib/chromium/chromium",
            b"chromium\0--noerrdialogs\0--user-data-dir=/home/x\0--type=zygote\0file.html\0",
        );
        assert_eq!(a, b);
        assert_eq!(
            a,
            "/usr/lib/chromium/chromium --noerrdialogs --type --user-data-dir"
        );
        let c = key(
            "/usr/lib/chromium/chromium",
            b"chromium\0--type=zygote\0--no-zygote-sandbox\0--noerrdialogs\0--user-data-dir=/x\0",
        );
        assert_ne!(a, c, "the unsandboxed zygote is another process");
        let retitled = key(
            "/usr/lib/chromium/chromium",
            b"/usr/lib/chromium/chromium --type=zygote --user-data-dir=/y --noerrdialogs\0\0\0",
        );
        assert_eq!(retitled, a, "a rewritten title is split on spaces");
        assert_eq!(key("", b"x\0--a\0"), "");
    }

    #[test]
    fn store_round_trips_and_forgets() {
        let d = std::env::temp_dir().join(format!("ksmplus-learned-{}", std::process::id()));
        let p = d.join("state/learned");
        let mut l = Learned::load(Some(p.clone()));
        assert!(!l.is_fork_server("k"));
        l.set_fork_server("/bin/z --type", true);
        let l2 = Learned::load(Some(p.clone()));
        assert!(l2.is_fork_server("/bin/z --type"));
        assert!(std::fs::read_to_string(&p)
            .unwrap()
            .starts_with("# ksmplus-agentd"));
        l.set_fork_server("/bin/z --type", false);
        assert!(!Learned::load(Some(p)).is_fork_server("/bin/z --type"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
