//! The programs' processes: a started program is its process and every descendant (WebKit's
//! web and network processes, GIMP's plug-ins, xterm's bash), found through `/proc/PID/stat`.
//! Memory comes from `/proc/PID/smaps_rollup`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

/// `pid -> ppid` of every process.
fn parents() -> BTreeMap<u32, u32> {
    let mut m = BTreeMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return m;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        // rest: " S PPID ..."
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            m.insert(pid, ppid);
        }
    }
    m
}

/// Each root and its live descendants, labelled with the root's index.
pub fn trees(roots: &[u32]) -> BTreeMap<u32, usize> {
    let par = parents();
    let mut out = BTreeMap::new();
    for (i, &r) in roots.iter().enumerate() {
        if par.contains_key(&r) {
            out.insert(r, i);
        }
    }
    // Children appear after their parents in no particular order: iterate to a fixed point.
    loop {
        let mut added = false;
        for (&pid, &ppid) in &par {
            if out.contains_key(&pid) {
                continue;
            }
            if let Some(&i) = out.get(&ppid) {
                out.insert(pid, i);
                added = true;
            }
        }
        if !added {
            return out;
        }
    }
}

/// Every live pid of a set of trees (for teardown).
pub fn all_pids(roots: &[u32]) -> BTreeSet<u32> {
    trees(roots).into_keys().collect()
}

/// `Rss`, `Pss` and `Anonymous` of `/proc/PID/smaps_rollup`, KiB.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Mem {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub anon_kib: u64,
}

pub fn mem(pid: u32) -> Mem {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let mut m = Mem::default();
    for l in text.lines() {
        let mut it = l.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) else {
            continue;
        };
        match k {
            "Rss:" => m.rss_kib = v,
            "Pss:" => m.pss_kib = v,
            "Anonymous:" => m.anon_kib = v,
            _ => {}
        }
    }
    m
}

pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}
