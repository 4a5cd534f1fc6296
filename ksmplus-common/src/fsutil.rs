//! Files written whole or not at all: the one atomic-write helper (policy edits, desktop
//! overrides, the user unit, the agent's learned state); and the one walk of a directory tree.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Every entry under `dir`, at any depth, that is not a directory (files, and links that do not
/// lead to a directory). A directory reached through a symbolic link is entered only when
/// `follow_links`; a directory that cannot be read is passed over. In no particular order.
pub fn files_under(dir: &Path, follow_links: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && (follow_links || !p.is_symlink()) {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Writes `bytes` to `path` through a temporary file in the same directory: written, synced
/// (`fsync`), renamed over `path`, and the directory synced, so a crash leaves the old file or
/// the new one, never a mix. The directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let d = std::env::temp_dir().join(format!("ksmplus-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("f.toml");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        assert!(write_atomic(&d.join("no/such/dir/f"), b"x").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_under_enters_linked_directories_only_when_told() {
        let d = std::env::temp_dir().join(format!("ksmplus-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::create_dir_all(d.join("elsewhere")).unwrap();
        std::fs::write(d.join("top"), b"").unwrap();
        std::fs::write(d.join("a/b/deep"), b"").unwrap();
        std::fs::write(d.join("elsewhere/linked"), b"").unwrap();
        std::os::unix::fs::symlink(d.join("elsewhere"), d.join("a/link")).unwrap();
        std::os::unix::fs::symlink(d.join("nowhere"), d.join("a/dangling")).unwrap();
        let rel = |follow| {
            let mut v: Vec<String> = files_under(&d.join("a"), follow)
                .iter()
                .map(|p| p.strip_prefix(&d).unwrap().display().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(rel(false), ["a/b/deep", "a/dangling", "a/link"]);
        assert_eq!(rel(true), ["a/b/deep", "a/dangling", "a/link/linked"]);
        assert!(files_under(&d.join("missing"), true).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
