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
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Pages read per `pread` at most (2 MiB with 4 KiB pages).
pub const CHUNK_PAGES: usize = 512;
/// The longest period the classifier looks for, in bytes.
pub const MAX_PERIOD: usize = 64;
/// Bytes of a periodic pattern kept for display.
pub const PATTERN_HEAD: usize = 16;

const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// What a page's content looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Every byte 0x00.
    Zero,
    /// Every byte 0xff.
    Ones,
    /// The page repeats a pattern of `period` bytes (the smallest such period, 1..=64); `head`
    /// holds its first `min(period, 16)` bytes.
    Periodic {
        period: u8,
        head: [u8; PATTERN_HEAD],
    },
    /// Anything else.
    Other,
}

impl Class {
    /// Short name: `all-zero`, `all-0xff`, `periodic`, `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            Class::Zero => "all-zero",
            Class::Ones => "all-0xff",
            Class::Periodic { .. } => "periodic",
            Class::Other => "other",
        }
    }

    /// The period in bytes (1 for all-zero and all-0xff), if periodic at all.
    pub fn period(&self) -> Option<usize> {
        match self {
            Class::Zero | Class::Ones => Some(1),
            Class::Periodic { period, .. } => Some(*period as usize),
            Class::Other => None,
        }
    }

    /// The repeating pattern in upper-case hex (`FFFFFF00`), `…` when longer than 16 bytes.
    pub fn pattern_hex(&self) -> Option<String> {
        match self {
            Class::Zero => Some("00".into()),
            Class::Ones => Some("FF".into()),
            Class::Periodic { period, head } => {
                let n = (*period as usize).min(PATTERN_HEAD);
                let mut s: String = head[..n].iter().map(|b| format!("{b:02X}")).collect();
                if *period as usize > PATTERN_HEAD {
                    s.push('…');
                }
                Some(s)
            }
            Class::Other => None,
        }
    }

    /// Human-readable: `all-zero`, `all-0xff`, `periodic 4 B: FFFFFF00`, `other`.
    pub fn describe(&self) -> String {
        match self {
            Class::Periodic { period, .. } => {
                format!(
                    "periodic {period} B: {}",
                    self.pattern_hex().unwrap_or_default()
                )
            }
            c => c.kind().into(),
        }
    }
}

/// Classifies one page: all-zero, all-0xff, periodic with the smallest period ≤ 64 bytes, other.
pub fn classify(page: &[u8]) -> Class {
    if page.is_empty() {
        return Class::Other;
    }
    for period in 1..=MAX_PERIOD.min(page.len() / 2) {
        // Period p: every byte equals the byte p before it.
        if page[period..] == page[..page.len() - period] {
            if period == 1 && page[0] == 0 {
                return Class::Zero;
            }
            if period == 1 && page[0] == 0xff {
                return Class::Ones;
            }
            let mut head = [0u8; PATTERN_HEAD];
            let n = period.min(PATTERN_HEAD);
            head[..n].copy_from_slice(&page[..n]);
            return Class::Periodic {
                period: period as u8,
                head,
            };
        }
    }
    Class::Other
}

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
        // SAFETY: sysconf has no preconditions.
        let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Scanner {
            map: HashMap::new(),
            page_size: if ps > 0 { ps as usize } else { 4096 },
            zero_pfn: zero_page_pfn(),
            procs: Vec::new(),
            skipped: Vec::new(),
            bytes_read: 0,
            started: Instant::now(),
            proc_root: proc_root.to_owned(),
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Distinct contents so far.
    pub fn distinct(&self) -> usize {
        self.map.len()
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
        let vmas: Vec<Vma> = maps.lines().filter_map(parse_maps_line).collect();
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
        'vmas: for v in vmas.iter().filter(|v| v.scannable()) {
            let file_backed = v.is_file();
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

    fn comm_of(&self, pid: u32) -> &str {
        self.procs
            .iter()
            .find(|p| p.pid == pid)
            .map(|p| p.comm.as_str())
            .unwrap_or("?")
    }

    /// The report as JSON.
    pub fn to_json(&self, top: usize) -> Value {
        let ps = self.page_size as u64;
        let t = self.totals();
        let secs = self.elapsed().as_secs_f64();
        let procs: Vec<Value> = self
            .procs
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
                v["saving_pages"] = json!(p.saving());
                v["saving_bytes"] = json!(p.saving() * ps);
                v
            })
            .collect();
        let top: Vec<Value> = self
            .top(top)
            .into_iter()
            .map(|(h, e)| {
                json!({
                    "hash": format!("{h:016x}"),
                    "count": e.count,
                    "bytes": e.count * ps,
                    "processes": e.procs,
                    "class": e.class.kind(),
                    "period": e.class.period(),
                    "pattern": e.class.pattern_hex(),
                    "first_pid": e.first_pid,
                    "first_addr": format!("{:#x}", e.first_addr),
                })
            })
            .collect();
        json!({
            "ok": true,
            "page_size": ps,
            "processes": procs,
            "skipped": self.skipped,
            "totals": t,
            "saving_bytes": t.saving_pages * ps,
            "top": top,
            "bytes_read": self.bytes_read,
            "seconds": secs,
            "mib_per_s": mib_per_s(self.bytes_read, secs),
            "zero_page_known": self.zero_pfn.is_some(),
        })
    }

    /// The report as text.
    pub fn to_text(&self, top: usize) -> String {
        use std::fmt::Write;
        let ps = self.page_size as u64;
        let mib = |pages: u64| pages as f64 * ps as f64 / (1 << 20) as f64;
        let t = self.totals();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>7}  {:<15}  {:>9}  {:>9}  {:>9}  {:>9}  {:>13}",
            "PID", "COMM", "PAGES", "UNIQUE", "DUPLICATE", "DISTINCT", "SAVING"
        );
        for p in &self.procs {
            let _ = writeln!(
                s,
                "{:>7}  {:<15}  {:>9}  {:>9}  {:>9}  {:>9}  {:>8.1} MiB{}",
                p.pid,
                p.comm,
                p.pages,
                p.unique,
                p.duplicate,
                p.distinct,
                mib(p.saving()),
                p.note
                    .as_deref()
                    .map(|n| format!("  ({n})"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            s,
            "{:>7}  {:<15}  {:>9}  {:>9}  {:>9}  {:>9}  {:>8.1} MiB",
            "ALL",
            format!("{} processes", t.processes),
            t.pages,
            t.unique,
            t.duplicate,
            t.distinct,
            mib(t.saving_pages)
        );
        let _ = writeln!(
            s,
            "saving KSM could give: {} pages ({:.1} MiB, {:.1}% of {:.1} MiB scanned); {} pages of it \
             only by merging across processes; {} contents appear in more than one process",
            t.saving_pages,
            mib(t.saving_pages),
            if t.pages > 0 {
                100.0 * t.saving_pages as f64 / t.pages as f64
            } else {
                0.0
            },
            mib(t.pages),
            t.cross_process_saving_pages,
            t.shared_contents
        );
        let _ = writeln!(
            s,
            "duplicate contents by count: {} seen 2-9 times, {} seen 10-99 times, {} seen 100+ times",
            t.histogram[0], t.histogram[1], t.histogram[2]
        );
        if t.zero_page_mapped > 0 {
            let _ = writeln!(
                s,
                "{} pages map the kernel's shared zero page (already free, not counted above)",
                t.zero_page_mapped
            );
        }
        let tops = self.top(top);
        if !tops.is_empty() {
            let _ = writeln!(s, "top {} duplicate contents:", tops.len());
            let _ = writeln!(
                s,
                "{:>3}  {:>9}  {:>10}  {:>5}  {:<40}  FIRST SEEN",
                "#", "COUNT", "SIZE", "PROCS", "CLASS"
            );
            for (i, (_, e)) in tops.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "{:>3}  {:>9}  {:>6.1} MiB  {:>5}  {:<40}  pid {} ({}) {:#x}",
                    i + 1,
                    e.count,
                    mib(e.count),
                    e.procs,
                    e.class.describe(),
                    e.first_pid,
                    self.comm_of(e.first_pid),
                    e.first_addr
                );
            }
        }
        for sk in &self.skipped {
            let _ = writeln!(s, "skipped pid {} ({}): {}", sk.pid, sk.comm, sk.reason);
        }
        let secs = self.elapsed().as_secs_f64();
        let _ = writeln!(
            s,
            "read {:.1} MiB in {:.2} s: {:.0} MiB/s; table: {} distinct contents",
            self.bytes_read as f64 / (1 << 20) as f64,
            secs,
            mib_per_s(self.bytes_read, secs),
            self.map.len()
        );
        s
    }
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / (1 << 20) as f64 / secs
    } else {
        0.0
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

const PF_KTHREAD: u64 = 0x0020_0000;

/// State letter and flags from `/proc/PID/stat` (readable by anyone).
fn proc_state(dir: &Path) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(dir.join("stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let flags = f.nth(5)?.parse().ok()?; // field 9: after ppid pgrp session tty_nr tpgid
    Some((state, flags))
}

/// Still running (not gone, not a zombie).
fn alive(dir: &Path) -> bool {
    matches!(proc_state(dir), Some((s, _)) if s != 'Z' && s != 'X')
}

fn read_comm(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("comm"))
        .map(|s| s.trim_end_matches('\n').to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn open_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => "exited before it could be scanned".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "permission denied: reading another process's memory needs root (or CAP_SYS_PTRACE), \
             or the same user with kernel.yama.ptrace_scope=0"
                .into()
        }
        _ => e.to_string(),
    }
}

/// The PFN of the kernel's shared zero page, learnt by read-faulting one page of our own; `None`
/// when pagemap hides PFNs (not root).
fn zero_page_pfn() -> Option<u64> {
    // SAFETY: a fresh private anonymous mapping, read once, then unmapped.
    unsafe {
        let ps = libc::sysconf(libc::_SC_PAGESIZE) as usize;
        let p = libc::mmap(
            std::ptr::null_mut(),
            ps,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        std::ptr::read_volatile(p as *const u8);
        let mut e = [0u8; 8];
        let r = File::open("/proc/self/pagemap")
            .and_then(|f| f.read_at(&mut e, (p as u64) / ps as u64 * 8));
        libc::munmap(p, ps);
        let e = u64::from_le_bytes(e);
        match r {
            Ok(8) if e & PM_PRESENT != 0 && e & PM_PFN_MASK != 0 => Some(e & PM_PFN_MASK),
            _ => None,
        }
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub path: String,
}

impl Vma {
    /// Private and readable, and anonymous or a private file mapping (whose COW copies are
    /// anonymous); never the kernel's special mappings.
    pub fn scannable(&self) -> bool {
        let p = self.perms.as_bytes();
        if p.len() < 4 || p[0] != b'r' || p[3] != b'p' {
            return false;
        }
        !matches!(
            self.path.as_str(),
            "[vvar]" | "[vdso]" | "[vsyscall]" | "[vvar_vclock]" | "[uprobes]"
        )
    }

    /// A mapping of a file (a path), whose present pages are anonymous only where pagemap says so.
    /// Unwritable file mappings never hold anonymous pages.
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/')
    }
}

/// Parses `start-end perms offset dev inode [path]`.
pub fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let _off = it.next()?;
    let _dev = it.next()?;
    let _inode = it.next()?;
    let path = it.next().unwrap_or("").trim_start().to_owned();
    let (s, e) = range.split_once('-')?;
    Some(Vma {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms: perms.to_owned(),
        path,
    })
}

/// Pids under `proc_root` whose comm is `name`, or whose executable's file name is `name` (comm is
/// cut to 15 bytes).
pub fn pids_by_comm(proc_root: &Path, name: &str) -> Vec<u32> {
    all_pids(proc_root)
        .into_iter()
        .filter(|pid| {
            let dir = proc_root.join(pid.to_string());
            let comm = read_comm(&dir);
            if comm == name {
                return true;
            }
            if name.len() > 15 && comm.len() == 15 && name.as_bytes().starts_with(comm.as_bytes()) {
                return true;
            }
            std::fs::read_link(dir.join("exe"))
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .is_some_and(|f| f == name)
        })
        .collect()
}

/// Every numeric entry of `proc_root`.
pub fn all_pids(proc_root: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(proc_root)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
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
}

/// Runs `ksmplusctl scan`; returns the exit code (0 ok, 1 nothing scanned, 2 usage).
pub fn cli(args: &ScanArgs, json_out: bool) -> i32 {
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
        eprintln!("ksmplusctl scan: say what to scan: --pid N, --comm NAME or --all");
        return 2;
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

    fn page_of(pattern: &[u8]) -> Vec<u8> {
        pattern.iter().copied().cycle().take(4096).collect()
    }

    #[test]
    fn zero_and_ones() {
        assert_eq!(classify(&[0u8; 4096]), Class::Zero);
        assert_eq!(classify(&[0xffu8; 4096]), Class::Ones);
        assert_eq!(Class::Zero.period(), Some(1));
    }

    #[test]
    fn periodic_smallest_period() {
        let c = classify(&page_of(&[0xff, 0xff, 0xff, 0x00]));
        assert_eq!(c.period(), Some(4));
        assert_eq!(c.pattern_hex().unwrap(), "FFFFFF00");
        assert_eq!(c.describe(), "periodic 4 B: FFFFFF00");
        // A pattern of 8 that is really two copies of 4 is period 4.
        let c = classify(&page_of(&[1, 2, 3, 4, 1, 2, 3, 4]));
        assert_eq!(c.period(), Some(4));
        // A single non-zero byte repeated.
        assert_eq!(classify(&page_of(&[0x41])).period(), Some(1));
        assert_eq!(classify(&page_of(&[0x41])).kind(), "periodic");
        // A period not dividing the page size still counts.
        assert_eq!(classify(&page_of(&[7, 8, 9])).period(), Some(3));
    }

    #[test]
    fn long_periods_and_limit() {
        let pat: Vec<u8> = (0..64u8).collect();
        let c = classify(&page_of(&pat));
        assert_eq!(c.period(), Some(64));
        assert!(c.pattern_hex().unwrap().ends_with('…'));
        assert!(c.pattern_hex().unwrap().starts_with("000102030405"));
        let pat: Vec<u8> = (0..65u8).collect();
        assert_eq!(classify(&page_of(&pat)), Class::Other);
    }

    #[test]
    fn other() {
        let mut p = vec![0u8; 4096];
        p[4095] = 1;
        assert_eq!(classify(&p), Class::Other);
        let mut p = page_of(&[0xff, 0xff, 0xff, 0x00]);
        p[100] ^= 1;
        assert_eq!(classify(&p), Class::Other);
        assert_eq!(classify(&[]), Class::Other);
    }

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
    fn maps_lines() {
        let v = parse_maps_line(
            "7f00a0000000-7f00a0021000 rw-p 00000000 00:00 0                          [heap]",
        )
        .unwrap();
        assert_eq!(v.start, 0x7f00a0000000);
        assert_eq!(v.path, "[heap]");
        assert!(v.scannable() && !v.is_file());
        let v = parse_maps_line("7fff1000-7fff3000 r--p 00000000 00:00 0  [vvar]").unwrap();
        assert!(!v.scannable());
        let v = parse_maps_line("1000-2000 rw-s 00000000 00:05 12 /dev/shm/x").unwrap();
        assert!(!v.scannable());
        let v = parse_maps_line("1000-2000 ---p 00000000 00:00 0").unwrap();
        assert!(!v.scannable());
        let v =
            parse_maps_line("1000-2000 rw-p 00001000 08:01 77 /usr/lib/a b.so (deleted)").unwrap();
        assert_eq!(v.path, "/usr/lib/a b.so (deleted)");
        assert!(v.scannable() && v.is_file());
        let v = parse_maps_line("1000-2000 rw-p 00000000 00:00 0").unwrap();
        assert_eq!(v.path, "");
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
