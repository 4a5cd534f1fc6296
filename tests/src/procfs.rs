//! Looking at a workload process from outside: smaps VMAs, its memory through `/proc/PID/mem`,
//! RSS, and `ksm_stat`. Used to check that a workload really holds what it claims and what the
//! kernel thinks of its regions.
use ksmplus_common::ksm::{self, KsmStat, SmapsVma};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// `/proc/PID/smaps`.
pub fn smaps(pid: u32) -> Vec<SmapsVma> {
    ksm::read_smaps(Path::new("/"), pid).unwrap_or_else(|e| panic!("read smaps: {e}"))
}

/// The VMA containing `addr`.
pub fn vma_containing(pid: u32, addr: u64) -> Option<SmapsVma> {
    smaps(pid)
        .into_iter()
        .find(|v| v.start <= addr && addr < v.end)
}

/// The VMAs overlapping `[start, end)`.
pub fn vmas_overlapping(pid: u32, start: u64, end: u64) -> Vec<SmapsVma> {
    smaps(pid)
        .into_iter()
        .filter(|v| v.start < end && v.end > start)
        .collect()
}

/// Reads `len` bytes at `addr` of process `pid` through `/proc/PID/mem`.
pub fn read_mem(pid: u32, addr: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("open /proc/{pid}/mem: {e}"));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, addr)
        .unwrap_or_else(|e| panic!("read /proc/{pid}/mem at {addr:#x}+{len}: {e}"));
    buf
}

/// `ksmplus_common::page_hash` of each of `pages` pages from `start` in process `pid`.
pub fn page_hashes(pid: u32, start: u64, pages: usize) -> Vec<u64> {
    let ps = crate::page_size() as usize;
    let mem = read_mem(pid, start, pages * ps);
    mem.chunks(ps).map(ksmplus_common::page_hash).collect()
}

/// The FNV-1a 64 checksum the C workloads print as `sum=`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 1469598103934665603;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(1099511628211);
    }
    h
}

/// Resident set size in KiB (`/proc/PID/statm`).
pub fn rss_kib(pid: u32) -> u64 {
    let t = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("read statm");
    let pages: u64 = t.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * crate::page_size() / 1024
}

/// `/proc/PID/ksm_stat`.
pub fn ksm_stat(pid: u32) -> KsmStat {
    ksm::read_ksm_stat(Path::new("/"), pid).unwrap_or_else(|e| panic!("read ksm_stat: {e}"))
}

/// For each of `pages` pages from `start`: is it present in RAM (`/proc/PID/pagemap` bit 63)?
/// A never-touched anonymous page is not; a page faulted in by a read (zero page) is.
pub fn pages_present(pid: u32, start: u64, pages: usize) -> Vec<bool> {
    let ps = crate::page_size();
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("open pagemap");
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, start / ps * 8)
        .expect("read pagemap");
    buf.chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()) >> 63 == 1)
        .collect()
}
