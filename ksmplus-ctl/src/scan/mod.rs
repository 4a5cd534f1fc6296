//! `ksmplusctl scan`: counts duplicate page contents in running processes, like the thesis's
//! `parser.ko` (section 5.3, figures 5-12/5-13), from user space.
//!
//! What is scanned: the *present* private anonymous pages of each process — mappings without a
//! file (`[heap]`, `[stack]`, `[anon:…]`, unnamed), plus the copy-on-write copies inside private
//! file mappings (pagemap "file/shared" bit clear). These are the pages KSM can merge.
//!
//! How (invariants):
//! - `/proc/PID/pagemap` first: a page whose bit 63 (present) is clear is skipped, so the scan
//!   never faults memory in and never reads swap. Pages mapping the shared zero page (known when
//!   pagemap shows PFNs, i.e. as root) are counted apart: they already cost nothing.
//! - Memory is read with `pread` on `/proc/PID/mem` in runs of consecutive present pages (at most
//!   [`CHUNK_PAGES`] at a time) into one reused buffer: memory use is the buffer plus one
//!   hash-table entry per distinct content ([`Entry`]), whatever the size of the address space.
//! - Contents are identified by [`ksmplus_common::page_hash`] (xxh3-64); a collision would merge
//!   two counts, which at 2^-64 per pair is ignored.
//! - A process that exits mid-scan, or a range unmapped meanwhile, is skipped with a note; a
//!   process the caller may not read is reported as such, never an error for `--all`.
//! - Processes are scanned one after another, so per-process counts come from the same table:
//!   an entry remembers the last process that saw it and how often it saw it there.
mod classify;
mod procfs;
mod report;

pub use classify::{classify, Class};
pub use procfs::{all_pids, pids_by_comm};

use ksmplus_common::maps;
use procfs::{
    alive, is_file, open_reason, proc_state, read_comm, scannable, zero_page_pfn, PF_KTHREAD,
};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Pages read per `pread` at most (2 MiB with 4 KiB pages).
pub const CHUNK_PAGES: usize = 512;
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// One distinct content: the only per-content state the scanner keeps.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Pages with this content, across every scanned process.
    pub count: u64,
    /// Processes in which it was seen.
    pub procs: u32,
    /// The last process that saw it, and how many times it saw it there.
    last_pid: u32,
    last_count: u32,
    pub class: Class,
    /// Where it was first seen.
    pub first_pid: u32,
    pub first_addr: u64,
}

/// Counts of one process.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProcCounts {
    pub pid: u32,
    pub comm: String,
    /// Present private anonymous pages hashed.
    pub pages: u64,
    /// Contents seen once in this process.
    pub unique: u64,
    /// Pages whose content appears at least twice in this process.
    pub duplicate: u64,
    /// Distinct contents in this process.
    pub distinct: u64,
    /// Pages mapping the kernel's shared zero page (already free; not hashed).
    pub zero_page_mapped: u64,
    /// Present pages that could not be read (unmapped meanwhile).
    pub unreadable: u64,
    /// Why the scan of this process stopped early, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl ProcCounts {
    /// Pages KSM could free inside this process alone: pages − distinct contents.
    pub fn saving(&self) -> u64 {
        self.pages - self.distinct
    }
}

/// A process left out, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Skipped {
    pub pid: u32,
    pub comm: String,
    pub reason: String,
}

/// The hash table and counters of one scan.
pub struct Scanner {
    map: HashMap<u64, Entry>,
    page_size: usize,
    /// The PFN of the shared zero page, when pagemap shows PFNs.
    zero_pfn: Option<u64>,
    pub procs: Vec<ProcCounts>,
    pub skipped: Vec<Skipped>,
    pub bytes_read: u64,
    started: Instant,
    proc_root: PathBuf,
}

/// The whole-set counts, computed from the table at the end.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Totals {
    pub processes: usize,
    pub pages: u64,
    pub unique: u64,
    pub duplicate: u64,
    pub distinct: u64,
    /// pages − distinct: what KSM could free across the set.
    pub saving_pages: u64,
    /// The part of `saving_pages` only merging across processes gives.
    pub cross_process_saving_pages: u64,
    /// Contents seen in more than one process.
    pub shared_contents: u64,
    pub zero_page_mapped: u64,
    /// Distinct duplicate contents by count: [2..9], [10..99], [100..].
    pub histogram: [u64; 3],
}

impl Scanner {
    pub fn new(proc_root: &Path) -> Scanner {
        Scanner {
            map: HashMap::new(),
            page_size: procfs::page_size(),
            zero_pfn: zero_page_pfn(),
            procs: Vec::new(),
            skipped: Vec::new(),
            bytes_read: 0,
            started: Instant::now(),
            proc_root: proc_root.to_owned(),
        }
    }

    /// Counts one page of process `pc.pid` at `addr`. Processes must be fed one after another.
    pub fn add_page(&mut self, pc: &mut ProcCounts, addr: u64, page: &[u8]) {
        let h = ksmplus_common::page_hash(page);
        pc.pages += 1;
        let pid = pc.pid;
        match self.map.get_mut(&h) {
            Some(e) => {
                e.count += 1;
                if e.last_pid != pid {
                    e.last_pid = pid;
                    e.last_count = 1;
                    e.procs += 1;
                    pc.distinct += 1;
                    pc.unique += 1;
                } else {
                    e.last_count = e.last_count.saturating_add(1);
                    if e.last_count == 2 {
                        pc.unique -= 1;
                        pc.duplicate += 2;
                    } else {
                        pc.duplicate += 1;
                    }
                }
            }
            None => {
                self.map.insert(
                    h,
                    Entry {
                        count: 1,
                        procs: 1,
                        last_pid: pid,
                        last_count: 1,
                        class: classify(page),
                        first_pid: pid,
                        first_addr: addr,
                    },
                );
                pc.distinct += 1;
                pc.unique += 1;
            }
        }
    }

    /// Scans one process; a failure to start is recorded in `skipped`, an early stop in the
    /// process's `note`.
    pub fn scan_pid(&mut self, pid: u32, buf: &mut Vec<u8>) {
        let dir = self.proc_root.join(pid.to_string());
        let comm = read_comm(&dir);
        let skip = |s: &mut Scanner, reason: String| {
            s.skipped.push(Skipped {
                pid,
                comm: comm.clone(),
                reason,
            })
        };
        let open_reason = |e: &io::Error| {
            // Kernel threads and zombies have a /proc entry but no address space to open.
            match proc_state(&dir) {
                Some((_, flags)) if flags & PF_KTHREAD != 0 => {
                    "no user memory (kernel thread)".to_string()
                }
                Some(('Z' | 'X', _)) => "no user memory (zombie: exited)".to_string(),
                Some(_) => open_reason(e),
                None => "exited before it could be scanned".to_string(),
            }
        };
        // Open mem and pagemap before reading maps: both hold the address space they were opened
        // on, so a pid reused meanwhile is never read by mistake.
        let mem = match File::open(dir.join("mem")) {
            Ok(f) => f,
            Err(e) => return skip(self, open_reason(&e)),
        };
        let pagemap = match File::open(dir.join("pagemap")) {
            Ok(f) => f,
            Err(e) => return skip(self, open_reason(&e)),
        };
        let maps = match std::fs::read_to_string(dir.join("maps")) {
            Ok(m) => m,
            Err(e) => return skip(self, open_reason(&e)),
        };
        let vmas = maps::parse(&maps);
        if vmas.is_empty() {
            return skip(self, "no user memory (zombie: exited)".into());
        }
        let mut pc = ProcCounts {
            pid,
            comm: comm.clone(),
            ..Default::default()
        };
        let ps = self.page_size;
        if buf.len() < CHUNK_PAGES * ps {
            buf.resize(CHUNK_PAGES * ps, 0);
        }
        let mut pm = vec![0u8; CHUNK_PAGES * 8];
        'vmas: for v in vmas.iter().filter(|v| scannable(v)) {
            let file_backed = is_file(v);
            let mut addr = v.start;
            while addr < v.end {
                let n = (((v.end - addr) / ps as u64) as usize).min(CHUNK_PAGES);
                let pm_bytes = &mut pm[..n * 8];
                match pagemap.read_at(pm_bytes, addr / ps as u64 * 8) {
                    Ok(got) if got == n * 8 => {}
                    Ok(_) | Err(_) => {
                        // pagemap stops short when the range is gone: the process changed or
                        // exited under us.
                        if !alive(&dir) {
                            pc.note = Some("exited during the scan; counted up to there".into());
                            break 'vmas;
                        }
                        addr += (n * ps) as u64;
                        continue;
                    }
                }
                let entry =
                    |i: usize| u64::from_le_bytes(pm_bytes[i * 8..i * 8 + 8].try_into().unwrap());
                let mut i = 0;
                while i < n {
                    let e = entry(i);
                    let wanted = e & PM_PRESENT != 0 && !(file_backed && e & PM_FILE != 0);
                    if !wanted {
                        i += 1;
                        continue;
                    }
                    if self.zero_pfn.is_some() && Some(e & PM_PFN_MASK) == self.zero_pfn {
                        pc.zero_page_mapped += 1;
                        i += 1;
                        continue;
                    }
                    // A run of wanted, non-zero-page pages, read with one pread.
                    let mut j = i + 1;
                    while j < n {
                        let e = entry(j);
                        let ok = e & PM_PRESENT != 0
                            && !(file_backed && e & PM_FILE != 0)
                            && !(self.zero_pfn.is_some() && Some(e & PM_PFN_MASK) == self.zero_pfn);
                        if !ok {
                            break;
                        }
                        j += 1;
                    }
                    let run_addr = addr + (i * ps) as u64;
                    let want = (j - i) * ps;
                    let got = read_full(&mem, &mut buf[..want], run_addr);
                    self.bytes_read += got as u64;
                    let whole = got / ps;
                    for k in 0..whole {
                        let page = &buf[k * ps..(k + 1) * ps];
                        self.add_page(&mut pc, run_addr + (k * ps) as u64, page);
                    }
                    if whole < j - i {
                        if !alive(&dir) {
                            pc.note = Some("exited during the scan; counted up to there".into());
                            break 'vmas;
                        }
                        // The page after what was read failed (unmapped meanwhile): skip it and
                        // go on with the rest of the run.
                        pc.unreadable += 1;
                        i += whole + 1;
                    } else {
                        i = j;
                    }
                }
                addr += (n * ps) as u64;
            }
        }
        self.procs.push(pc);
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whole-set counts.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            processes: self.procs.len(),
            distinct: self.map.len() as u64,
            ..Default::default()
        };
        for p in &self.procs {
            t.pages += p.pages;
            t.zero_page_mapped += p.zero_page_mapped;
        }
        for e in self.map.values() {
            if e.count == 1 {
                t.unique += 1;
            } else {
                t.duplicate += e.count;
                let b = match e.count {
                    2..=9 => 0,
                    10..=99 => 1,
                    _ => 2,
                };
                t.histogram[b] += 1;
            }
            if e.procs > 1 {
                t.shared_contents += 1;
            }
        }
        t.saving_pages = t.pages - t.distinct;
        let within: u64 = self.procs.iter().map(ProcCounts::saving).sum();
        t.cross_process_saving_pages = t.saving_pages.saturating_sub(within);
        t
    }

    /// The `n` most repeated contents (count ≥ 2), most repeated first.
    pub fn top(&self, n: usize) -> Vec<(u64, &Entry)> {
        let mut v: Vec<(u64, &Entry)> = self
            .map
            .iter()
            .filter(|(_, e)| e.count >= 2)
            .map(|(h, e)| (*h, e))
            .collect();
        v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// Reads as much of `buf` as possible at `off`; returns the bytes read (short on an error).
fn read_full(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done
}

/// `ksmplusctl scan` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ScanArgs {
    /// A process to scan (repeatable)
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Every process with this comm or executable name (repeatable)
    #[arg(long = "comm")]
    pub comms: Vec<String>,
    /// Every process the caller may read
    #[arg(long)]
    pub all: bool,
    /// How many of the most repeated contents to list
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[command(flatten)]
    pub out: crate::output::JsonArg,
}

/// Runs `ksmplusctl scan`; returns the exit code (0 ok, 1 nothing scanned, 2 usage).
pub fn cli(args: &ScanArgs) -> i32 {
    let json_out = args.out.json;
    let root = Path::new("/proc");
    let me = std::process::id();
    let mut pids: Vec<u32> = args.pids.clone();
    for c in &args.comms {
        let found = pids_by_comm(root, c);
        if found.is_empty() {
            eprintln!("ksmplusctl scan: no process named {c:?}");
        }
        pids.extend(found);
    }
    if args.all {
        pids.extend(all_pids(root));
    }
    if args.pids.is_empty() && args.comms.is_empty() && !args.all {
        return crate::output::fail(
            "scan: say what to scan: --pid N, --comm NAME or --all",
            json_out,
        );
    }
    let mut seen = std::collections::HashSet::new();
    pids.retain(|p| *p != me && seen.insert(*p));
    let mut sc = Scanner::new(root);
    let mut buf = Vec::new();
    for pid in &pids {
        sc.scan_pid(*pid, &mut buf);
    }
    if args.all {
        // With --all, unreadable and kernel processes are expected: summarise instead of listing.
        let before = sc.skipped.len();
        sc.skipped.retain(|s| {
            !s.reason.starts_with("permission denied")
                && !s.reason.starts_with("no user memory (kernel thread)")
        });
        let hidden = before - sc.skipped.len();
        if hidden > 0 && !json_out {
            eprintln!("ksmplusctl scan: {hidden} processes left out (kernel threads or not readable by this user)");
        }
    }
    if json_out {
        println!("{}", sc.to_json(args.top));
    } else {
        print!("{}", sc.to_text(args.top));
    }
    if sc.procs.is_empty() {
        if !json_out {
            eprintln!("ksmplusctl scan: nothing could be scanned");
        }
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::page_of;

    #[test]
    fn counts_per_process_and_across() {
        let mut sc = Scanner::new(Path::new("/proc"));
        let z = vec![0u8; 4096];
        let a = page_of(&[1, 2, 3]);
        let u1 = page_of(&[9, 8, 7, 6, 5]);
        let u2 = page_of(&[5, 6, 7]);
        let mut p1 = ProcCounts {
            pid: 1,
            ..Default::default()
        };
        for (i, pg) in [&z, &z, &z, &a, &u1].iter().enumerate() {
            sc.add_page(&mut p1, i as u64 * 4096, pg);
        }
        assert_eq!(
            (p1.pages, p1.unique, p1.duplicate, p1.distinct),
            (5, 2, 3, 3)
        );
        assert_eq!(p1.saving(), 2);
        sc.procs.push(p1);
        let mut p2 = ProcCounts {
            pid: 2,
            ..Default::default()
        };
        for (i, pg) in [&z, &a, &u2].iter().enumerate() {
            sc.add_page(&mut p2, i as u64 * 4096, pg);
        }
        assert_eq!(
            (p2.pages, p2.unique, p2.duplicate, p2.distinct),
            (3, 3, 0, 3)
        );
        sc.procs.push(p2);
        let t = sc.totals();
        assert_eq!(t.pages, 8);
        assert_eq!(t.distinct, 4);
        assert_eq!(t.unique, 2);
        assert_eq!(t.duplicate, 6);
        assert_eq!(t.saving_pages, 4);
        assert_eq!(t.cross_process_saving_pages, 2);
        assert_eq!(t.shared_contents, 2);
        let top = sc.top(10);
        assert_eq!(top[0].1.count, 4);
        assert_eq!(top[0].1.class, Class::Zero);
        assert_eq!(top[0].1.procs, 2);
        assert_eq!(top[1].1.count, 2);
        assert_eq!(top.len(), 2);
    }

    #[test]
    fn scans_itself_without_faulting() {
        // A child that holds known pages; we scan it.
        let mut sc = Scanner::new(Path::new("/proc"));
        let mut buf = Vec::new();
        sc.scan_pid(std::process::id(), &mut buf);
        assert_eq!(sc.procs.len(), 1, "skipped: {:?}", sc.skipped);
        assert!(sc.procs[0].pages > 0);
        sc.scan_pid(u32::MAX - 1, &mut buf);
        assert_eq!(sc.skipped.len(), 1);
        assert!(sc.skipped[0].reason.contains("exited"));
        // pid 2 is kthreadd.
        sc.scan_pid(2, &mut buf);
        assert_eq!(sc.skipped.len(), 2);
        assert!(
            sc.skipped[1].reason.contains("kernel thread"),
            "{:?}",
            sc.skipped[1]
        );
    }
}
