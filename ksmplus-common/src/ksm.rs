//! Readers and writers for the kernel's KSM interfaces: `/sys/kernel/mm/ksm/*`,
//! `/proc/PID/ksm_stat` and the `KSM:` lines of `/proc/PID/smaps`.
//!
//! Every reader takes a root directory (normally `/`) so tests can point it at a fake tree;
//! parsing is pure and errors carry the path they came from.

use std::fs;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// An error reading or writing a KSM file, with the path it came from.
#[derive(Debug, Error)]
pub enum KsmError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: cannot parse {text:?}")]
    Parse {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

impl KsmError {
    /// True when the file does not exist (process gone, or kernel without the feature).
    pub fn is_not_found(&self) -> bool {
        matches!(self, KsmError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc_esrch()))
    }
}

const fn libc_esrch() -> i32 {
    3 // ESRCH on Linux: reading /proc/PID/* of a process that just exited.
}

fn read(path: &Path) -> Result<String, KsmError> {
    fs::read_to_string(path).map_err(|source| KsmError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The tunables of `/sys/kernel/mm/ksm` that ksmplus reads or changes.
pub const TUNABLES: &[&str] = &[
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "use_zero_pages",
    "max_page_sharing",
    "merge_across_nodes",
    "smart_scan",
    "advisor_mode",
];

/// The sysfs KSM directory under `root`.
pub fn sysfs_dir(root: &Path) -> PathBuf {
    root.join("sys/kernel/mm/ksm")
}

/// Reads one numeric file of the sysfs KSM directory (`run`, `full_scans`, `general_profit`, ...).
pub fn read_sysfs(root: &Path, name: &str) -> Result<i64, KsmError> {
    let path = sysfs_dir(root).join(name);
    let text = read(&path)?;
    text.trim().parse().map_err(|_| KsmError::Parse {
        path,
        line: 1,
        text: text.trim().to_owned(),
    })
}

/// Reads a textual sysfs KSM file (e.g. `advisor_mode` reads `[none] scan-time`).
pub fn read_sysfs_text(root: &Path, name: &str) -> Result<String, KsmError> {
    read(&sysfs_dir(root).join(name)).map(|s| s.trim().to_owned())
}

/// Writes one sysfs KSM tunable.
pub fn write_sysfs(root: &Path, name: &str, value: &str) -> Result<(), KsmError> {
    let path = sysfs_dir(root).join(name);
    fs::write(&path, value).map_err(|source| KsmError::Io { path, source })
}

/// A snapshot of KSM tunables, to restore later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KsmSettings {
    pub values: Vec<(String, String)>,
}

impl KsmSettings {
    /// Saves every tunable in [`TUNABLES`] that this kernel has.
    pub fn save(root: &Path) -> Result<KsmSettings, KsmError> {
        let mut values = Vec::new();
        for name in TUNABLES {
            match read_sysfs_text(root, name) {
                Ok(v) => values.push((name.to_string(), selected_choice(&v))),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(KsmSettings { values })
    }

    /// Writes the saved values back; `run` last so ksmd resumes with the restored settings.
    /// `max_page_sharing` and `merge_across_nodes` can only change while no page is shared, so
    /// an unchanged value is not rewritten.
    pub fn restore(&self, root: &Path) -> Result<(), KsmError> {
        let mut run = None;
        for (name, value) in &self.values {
            if name == "run" {
                run = Some(value);
                continue;
            }
            if read_sysfs_text(root, name)
                .map(|v| selected_choice(&v))
                .ok()
                == Some(value.clone())
            {
                continue;
            }
            write_sysfs(root, name, value)?;
        }
        if let Some(v) = run {
            write_sysfs(root, "run", v)?;
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `[none] scan-time` -> `none`; plain values pass through.
fn selected_choice(v: &str) -> String {
    match (v.find('['), v.find(']')) {
        (Some(a), Some(b)) if a < b => v[a + 1..b].to_owned(),
        _ => v.to_owned(),
    }
}

/// `/proc/PID/ksm_stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KsmStat {
    pub rmap_items: u64,
    pub zero_pages: u64,
    pub merging_pages: u64,
    pub process_profit: i64,
    pub merge_any: bool,
    pub mergeable: bool,
}

/// Parses the text of `/proc/PID/ksm_stat`. Unknown lines are ignored (newer kernels add some).
pub fn parse_ksm_stat(text: &str, path: &Path) -> Result<KsmStat, KsmError> {
    let mut s = KsmStat::default();
    for (i, line) in text.lines().enumerate() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let key = key.trim_end_matches(':');
        let bad = || KsmError::Parse {
            path: path.to_owned(),
            line: i + 1,
            text: line.to_owned(),
        };
        match key {
            "ksm_rmap_items" => s.rmap_items = val.parse().map_err(|_| bad())?,
            "ksm_zero_pages" => s.zero_pages = val.parse().map_err(|_| bad())?,
            "ksm_merging_pages" => s.merging_pages = val.parse().map_err(|_| bad())?,
            "ksm_process_profit" => s.process_profit = val.parse().map_err(|_| bad())?,
            "ksm_merge_any" => s.merge_any = val == "yes",
            "ksm_mergeable" => s.mergeable = val == "yes",
            _ => {}
        }
    }
    Ok(s)
}

/// Reads `/proc/PID/ksm_stat` under `root`.
pub fn read_ksm_stat(root: &Path, pid: u32) -> Result<KsmStat, KsmError> {
    let path = root.join(format!("proc/{pid}/ksm_stat"));
    let text = read(&path)?;
    parse_ksm_stat(&text, &path)
}

/// One VMA of `/proc/PID/smaps`, reduced to what ksmplus needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmapsVma {
    pub start: u64,
    pub end: u64,
    /// `rw-p` etc.
    pub perms: String,
    /// The path or pseudo-path (`[heap]`, `[stack]`, empty for anonymous).
    pub name: String,
    pub rss_kib: u64,
    pub anonymous_kib: u64,
    /// The `KSM:` line (merged KiB in this VMA), when the kernel has it.
    pub ksm_kib: u64,
    /// VmFlags, e.g. `["rd", "wr", "mg"]`.
    pub flags: Vec<String>,
}

impl SmapsVma {
    pub fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }
}

/// Parses the text of `/proc/PID/smaps`.
pub fn parse_smaps(text: &str, path: &Path) -> Result<Vec<SmapsVma>, KsmError> {
    let mut out: Vec<SmapsVma> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = || KsmError::Parse {
            path: path.to_owned(),
            line: i + 1,
            text: line.to_owned(),
        };
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let (range, rest) = line.split_once(' ').ok_or_else(bad)?;
            let (a, b) = range.split_once('-').ok_or_else(bad)?;
            let mut fields = rest.split_whitespace();
            let perms = fields.next().ok_or_else(bad)?.to_owned();
            // offset, dev, inode, then the optional name (may contain spaces).
            let name = rest
                .split_whitespace()
                .skip(4)
                .collect::<Vec<_>>()
                .join(" ");
            out.push(SmapsVma {
                start: u64::from_str_radix(a, 16).map_err(|_| bad())?,
                end: u64::from_str_radix(b, 16).map_err(|_| bad())?,
                perms,
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(vma) = out.last_mut() else {
            return Err(bad());
        };
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            vma.flags = flags.split_whitespace().map(str::to_owned).collect();
            continue;
        }
        let kib = || -> Result<u64, KsmError> {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .ok_or_else(bad)
        };
        match first {
            "Rss:" => vma.rss_kib = kib()?,
            "Anonymous:" => vma.anonymous_kib = kib()?,
            "KSM:" => vma.ksm_kib = kib()?,
            _ => {}
        }
    }
    Ok(out)
}

/// Reads `/proc/PID/smaps` under `root`.
pub fn read_smaps(root: &Path, pid: u32) -> Result<Vec<SmapsVma>, KsmError> {
    let path = root.join(format!("proc/{pid}/smaps"));
    let text = read(&path)?;
    parse_smaps(&text, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksm_stat_parses() {
        let t = "ksm_rmap_items 1027\nksm_zero_pages 0\nksm_merging_pages 512\nksm_process_profit -4000\nksm_merge_any: no\nksm_mergeable: yes\n";
        let s = parse_ksm_stat(t, Path::new("x")).unwrap();
        assert_eq!(s.rmap_items, 1027);
        assert_eq!(s.merging_pages, 512);
        assert_eq!(s.process_profit, -4000);
        assert!(s.mergeable && !s.merge_any);
        let e = parse_ksm_stat("ksm_rmap_items lots\n", Path::new("/p/ksm_stat")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/p/ksm_stat: line 1: cannot parse \"ksm_rmap_items lots\""
        );
    }

    #[test]
    fn smaps_parses() {
        let t = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n\
Size:               1024 kB\n\
Rss:                 512 kB\n\
Anonymous:           512 kB\n\
KSM:                 256 kB\n\
VmFlags: rd wr mr mw me ac mg\n\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]\n\
Rss:                   4 kB\n\
VmFlags: rd wr mr mw me ac\n";
        let v = parse_smaps(t, Path::new("x")).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].start, 0x7f0000000000);
        assert_eq!(v[0].end, 0x7f0000100000);
        assert_eq!(v[0].ksm_kib, 256);
        assert!(v[0].has_flag("mg"));
        assert_eq!(v[1].name, "[heap]");
        assert!(!v[1].has_flag("mg"));
    }

    #[test]
    fn settings_save_restore_on_fake_tree() {
        let dir = std::env::temp_dir().join(format!("ksmplus-fake-{}", std::process::id()));
        let ksm = dir.join("sys/kernel/mm/ksm");
        fs::create_dir_all(&ksm).unwrap();
        fs::write(ksm.join("run"), "0\n").unwrap();
        fs::write(ksm.join("pages_to_scan"), "100\n").unwrap();
        fs::write(ksm.join("advisor_mode"), "[none] scan-time\n").unwrap();
        let s = KsmSettings::save(&dir).unwrap();
        assert_eq!(s.get("run"), Some("0"));
        assert_eq!(s.get("advisor_mode"), Some("none"));
        write_sysfs(&dir, "run", "1").unwrap();
        write_sysfs(&dir, "pages_to_scan", "5000").unwrap();
        s.restore(&dir).unwrap();
        assert_eq!(read_sysfs(&dir, "run").unwrap(), 0);
        assert_eq!(read_sysfs(&dir, "pages_to_scan").unwrap(), 100);
        fs::remove_dir_all(&dir).unwrap();
    }
}
