//! The programs' processes: a started program is its process and every descendant (WebKit's
//! web and network processes, GIMP's plug-ins, xterm's bash), found through `/proc/PID/stat`.
//! Memory comes from `/proc/PID/smaps_rollup`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

/// `pid -> ppid` of every process.
fn parents() -> BTreeMap<u32, u32> {
    let mut m = BTreeMap::new();
    for pid in crate::sys::pids() {
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

/// `Rss`, `Pss` and `Anonymous` of `/proc/PID/smaps_rollup`, KiB.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Mem {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub anon_kib: u64,
}

impl std::ops::AddAssign for Mem {
    fn add_assign(&mut self, o: Mem) {
        self.rss_kib += o.rss_kib;
        self.pss_kib += o.pss_kib;
        self.anon_kib += o.anon_kib;
    }
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

/// How a process that has exited (a zombie not reaped yet) ended: `killed by SIGSYS`,
/// `exit 0`; `None` while it runs or once it is reaped.
pub fn exit_status(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is the state; exit_code is field 52 of stat, the last one.
    if f.first() != Some(&"Z") {
        return None;
    }
    let code: i32 = f.last()?.parse().ok()?;
    let sig = code & 0x7f;
    Some(if sig != 0 {
        let name = match sig {
            6 => "SIGABRT",
            9 => "SIGKILL",
            11 => "SIGSEGV",
            15 => "SIGTERM",
            31 => "SIGSYS",
            _ => "",
        };
        format!("killed by signal {sig} {name}")
            .trim_end()
            .to_owned()
    } else {
        format!("exit {}", (code >> 8) & 0xff)
    })
}

pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// KSM pages mapped by a set of processes, from `/proc/PID/pagemap` and `/proc/kpageflags`
/// (root only): `(mapped, distinct)`. `mapped - distinct` is what merging saved inside the set,
/// whatever other mergeable processes on the machine do meanwhile (the system-wide
/// `pages_sharing` counts those too). Only VMAs whose smaps `KSM:` line is non-zero are read.
pub fn ksm_pages(pids: &[u32]) -> Option<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    const KPF_KSM: u64 = 1 << 21;
    const PFN_MASK: u64 = (1 << 55) - 1;
    const PRESENT: u64 = 1 << 63;
    let flags = fs::File::open("/proc/kpageflags").ok()?;
    let mut distinct = BTreeSet::new();
    let mut mapped = 0u64;
    for &pid in pids {
        let Ok(vmas) = ksmplus_common::ksm::read_smaps(std::path::Path::new("/"), pid) else {
            continue;
        };
        let Ok(pm) = fs::File::open(format!("/proc/{pid}/pagemap")) else {
            continue;
        };
        for v in vmas.iter().filter(|v| v.ksm_kib > 0) {
            let pages = ((v.end - v.start) / 4096) as usize;
            let mut buf = vec![0u8; pages * 8];
            if pm.read_exact_at(&mut buf, v.start / 4096 * 8).is_err() {
                continue;
            }
            for e in buf.chunks_exact(8) {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                let pfn = e & PFN_MASK;
                if e & PRESENT == 0 || pfn == 0 {
                    continue;
                }
                let mut f = [0u8; 8];
                if flags.read_exact_at(&mut f, pfn * 8).is_ok()
                    && u64::from_le_bytes(f) & KPF_KSM != 0
                {
                    mapped += 1;
                    distinct.insert(pfn);
                }
            }
        }
    }
    Some((mapped, distinct.len() as u64))
}

pub fn ppid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

pub fn exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// True for a zombie, or a process that is gone.
pub fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
