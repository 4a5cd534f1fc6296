//! Reading (and, for the channel page only, writing) one process from outside, through
//! `/proc/PID`: its maps, which pages are resident (`pagemap`), page contents (`mem`), its
//! threads and children.
//!
//! Invariants:
//! - A [`ProcHandle`] opens the pidfd *first*, then `mem` and `pagemap`, then checks the pidfd
//!   still says alive: the descriptors belong to that process's memory (a descriptor of
//!   `/proc/PID/mem` is bound to the mm that opened it), so a recycled pid or an exec never
//!   makes a later read or write land in another program.
//! - Page contents are read with `pread` on `mem`, which does not pin pages (a merged KSM page
//!   stays merged; `process_vm_readv` would unshare it), and only pages the pagemap says are
//!   present (and not the shared zero page) are read, so nothing is faulted in.
//! - The only writes are to the channel page, at an address the process itself announced and
//!   whose magic and nonce the caller checked through the same descriptor (see `client`).
//! - Every path is under `root` (normally `/`), so tests can point the text parsers elsewhere.

use crate::engine::PageHash;
use ksmplus_common::channel::{Snapshot, CHANNEL_BYTES};
use ksmplus_common::page_hash;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a process could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("process {0} is gone")]
    Gone(u32),
    #[error("cannot read {path}: {source} (not dumpable, another user's, or ptrace restricted)")]
    Denied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A pidfd (Linux ≥ 5.3).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// True once the process behind `pidfd` has exited (its pidfd polls readable).
pub fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pfd = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut pfd, PollTimeout::ZERO), Ok(n) if n > 0)
        && pfd[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
        })
}

/// What [`ProcHandle::sharing`] found in a range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sharing {
    /// Present anonymous pages mapped more than once (merged by KSM, or shared with a fork).
    pub shared: u64,
    /// Address ranges `(start, end)` of the stretches of present anonymous pages mapped once,
    /// of at least the length asked.
    pub lone: Vec<(u64, u64)>,
}

/// Open descriptors on one process.
#[derive(Debug)]
pub struct ProcHandle {
    pub pid: u32,
    pidfd: OwnedFd,
    mem: File,
    pagemap: File,
}

fn open_in(root: &Path, pid: u32, name: &str, write: bool) -> Result<File, ProcError> {
    let path = root.join(format!("proc/{pid}/{name}"));
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(&path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ProcError::Gone(pid),
            io::ErrorKind::PermissionDenied => ProcError::Denied { path, source },
            _ if source.raw_os_error() == Some(libc::ESRCH) => ProcError::Gone(pid),
            _ => ProcError::Io { path, source },
        })
}

impl ProcHandle {
    pub fn open(root: &Path, pid: u32) -> Result<ProcHandle, ProcError> {
        let pidfd = pidfd_open(pid).map_err(|_| ProcError::Gone(pid))?;
        let mem = open_in(root, pid, "mem", true)?;
        let pagemap = open_in(root, pid, "pagemap", false)?;
        let h = ProcHandle {
            pid,
            pidfd,
            mem,
            pagemap,
        };
        if !h.alive() {
            return Err(ProcError::Gone(pid));
        }
        Ok(h)
    }

    pub fn alive(&self) -> bool {
        !pidfd_exited(&self.pidfd)
    }

    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// Reads process memory; an unmapped address is an error, a read never faults a page in
    /// beyond what the kernel does for `/proc/PID/mem` (the caller checks residency first).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read_exact_at(buf, addr)
    }

    /// Writes process memory (the channel page only; see the module invariants).
    pub fn write(&self, addr: u64, bytes: &[u8]) -> io::Result<()> {
        self.mem.write_all_at(bytes, addr)
    }

    /// The channel page at `addr`, decoded.
    pub fn snapshot(&self, addr: u64) -> io::Result<Snapshot> {
        // On the stack: a zeroed heap page per read showed in the agent's profile.
        let mut page = [0u8; CHANNEL_BYTES];
        self.read(addr, &mut page)?;
        Snapshot::decode(&page).ok_or_else(|| io::ErrorKind::InvalidData.into())
    }

    /// The runs of present pages (not the shared zero page, not file pages) of
    /// `[start, start+len)`, at most `max_runs` of them: `(covered bytes, runs)`.
    pub fn residency(
        &self,
        start: u64,
        len: u64,
        max_runs: usize,
    ) -> io::Result<(u64, Vec<(u64, u64)>)> {
        pagemap_scan(&self.pagemap, start, len, max_runs)
    }

    /// How `[start, end)` (page-aligned) is shared: its present pages that are mapped more than
    /// once, and its stretches of at least `min_lone` present pages mapped once. The pagemap's
    /// "exclusively mapped" bit (56) is clear on a present anonymous page mapped more than once.
    /// A page KSM merged is mapped by every duplicate it replaced, so `shared` counts what a
    /// marked run saves, at 8 bytes read per page of the range, where `smaps` walks every page
    /// of the process. Also counted as shared: pages still shared with a fork child
    /// (copy-on-write not yet broken) and the shared zero page (a page only read) — both occupy
    /// no memory of their own either. Neither shared nor lone: file pages (bit 61), absent and
    /// swapped pages (an absent page ends a lone stretch).
    pub fn sharing(
        &self,
        start: u64,
        end: u64,
        page_size: u64,
        min_lone: u64,
    ) -> io::Result<Sharing> {
        const CHUNK: u64 = 4096;
        let mut buf = vec![0u8; 8 * CHUNK as usize];
        let mut out = Sharing::default();
        // First page of the lone stretch in progress.
        let mut lone_from = None;
        let close = |out: &mut Sharing, from: &mut Option<u64>, at: u64| {
            if let Some(f) = from.take() {
                if at - f >= min_lone.max(1) {
                    out.lone.push((f * page_size, at * page_size));
                }
            }
        };
        let mut at = start / page_size;
        let last = end.div_ceil(page_size);
        while at < last {
            let n = (last - at).min(CHUNK) as usize;
            let b = &mut buf[..n * 8];
            self.pagemap.read_exact_at(b, at * 8)?;
            for (i, e) in b.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap());
                let page = at + i as u64;
                let anon = e >> 63 & 1 == 1 && e >> 61 & 1 == 0;
                if anon && e >> 56 & 1 == 0 {
                    out.shared += 1;
                } else if anon {
                    lone_from.get_or_insert(page);
                    continue;
                }
                close(&mut out, &mut lone_from, page);
            }
            at += n as u64;
        }
        close(&mut out, &mut lone_from, last);
        Ok(out)
    }

    /// Hashes of the pages at `pages` (page-aligned addresses): `NotResident` for a page the
    /// pagemap does not show present, `Unavailable` for one that cannot be read.
    pub fn hashes(&self, pages: &[u64], page_size: u64) -> Vec<PageHash> {
        let mut out = vec![PageHash::Unavailable; pages.len()];
        if pages.is_empty() {
            return out;
        }
        let lo = *pages.iter().min().unwrap();
        let hi = *pages.iter().max().unwrap() + page_size;
        // Present runs over the span; a span with more runs than this is asked in parts.
        let mut present: Vec<(u64, u64)> = Vec::new();
        let mut at = lo;
        while at < hi {
            match self.residency(at, hi - at, 4096) {
                Ok((covered, runs)) if covered > 0 => {
                    present.extend(runs);
                    at += covered;
                }
                _ => break,
            }
        }
        let is_present = |a: u64| {
            let i = present.partition_point(|&(s, _)| s <= a);
            i > 0 && {
                let (s, l) = present[i - 1];
                a < s + l
            }
        };
        // Read consecutive pages together (up to 64 KiB at a time).
        let mut order: Vec<usize> = (0..pages.len()).collect();
        order.sort_by_key(|&i| pages[i]);
        // Grown to the longest chunk read (most calls read single pages: a 64 KiB buffer zeroed
        // up front was 4.5 % of the agent's CPU once D3 had converged).
        let mut buf = Vec::new();
        let mut k = 0;
        while k < order.len() {
            let first = pages[order[k]];
            if !is_present(first) {
                out[order[k]] = PageHash::NotResident;
                k += 1;
                continue;
            }
            let mut n = 1;
            while k + n < order.len()
                && n < 16
                && pages[order[k + n]] == first + n as u64 * page_size
                && is_present(pages[order[k + n]])
            {
                n += 1;
            }
            if buf.len() < n * page_size as usize {
                buf.resize(n * page_size as usize, 0u8);
            }
            let chunk = &mut buf[..n * page_size as usize];
            match self.read(first, chunk) {
                Ok(()) => {
                    for j in 0..n {
                        let p = &chunk[j * page_size as usize..(j + 1) * page_size as usize];
                        out[order[k + j]] = PageHash::Hash(page_hash(p));
                    }
                }
                Err(_) => {
                    // Something in the chunk went away: page by page.
                    for j in 0..n {
                        let p = &mut chunk[..page_size as usize];
                        if self.read(first + j as u64 * page_size, p).is_ok() {
                            out[order[k + j]] = PageHash::Hash(page_hash(p));
                        }
                    }
                }
            }
            k += n;
        }
        out
    }
}

#[repr(C)]
#[derive(Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

// <linux/fs.h>, Linux 6.7.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610; // _IOWR('f', 16, struct pm_scan_arg)
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// Present, non-zero-page, anonymous runs via `PAGEMAP_SCAN` (Linux ≥ 6.7), else by reading
/// pagemap entries.
fn pagemap_scan(
    pagemap: &File,
    start: u64,
    len: u64,
    max_runs: usize,
) -> io::Result<(u64, Vec<(u64, u64)>)> {
    const _: () = assert!(core::mem::size_of::<PmScanArg>() == 96);
    thread_local! {
        /// The ioctl's output, kept between calls: up to 16 Ki runs are 384 KiB, which
        /// allocated and zeroed per call (glibc maps and unmaps a block that size) was a tenth
        /// of the agent's CPU once D3 had settled.
        static RUNS: core::cell::RefCell<Vec<PageRegion>> = const { core::cell::RefCell::new(Vec::new()) };
    }
    let end = start.saturating_add(len);
    // At most one run per two pages (a run needs a page not in it after it).
    let want = max_runs
        .clamp(1, 16 * 1024)
        .min((len / 4096).div_ceil(2).max(1) as usize);
    RUNS.with(|v| {
        let mut v = v.borrow_mut();
        if v.len() < want {
            v.resize_with(want, PageRegion::default);
        }
        pagemap_scan_into(pagemap, start, end, &mut v[..want])
    })
    .or_else(|e| {
        if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) {
            pagemap_entries(pagemap, start, len, max_runs)
        } else {
            Err(e)
        }
    })
}

/// One `PAGEMAP_SCAN` over `[start, end)` into `v`.
fn pagemap_scan_into(
    pagemap: &File,
    start: u64,
    end: u64,
    v: &mut [PageRegion],
) -> io::Result<(u64, Vec<(u64, u64)>)> {
    let mut arg = PmScanArg {
        size: core::mem::size_of::<PmScanArg>() as u64,
        flags: 0,
        start,
        end,
        walk_end: 0,
        vec: v.as_mut_ptr() as u64,
        vec_len: v.len() as u64,
        max_pages: 0,
        category_inverted: PAGE_IS_PFNZERO | PAGE_IS_FILE,
        category_mask: PAGE_IS_PRESENT | PAGE_IS_PFNZERO | PAGE_IS_FILE,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_PRESENT,
    };
    // SAFETY: the ioctl writes at most vec_len PageRegions into v and updates arg.
    let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let runs = v[..n as usize]
        .iter()
        .map(|r| (r.start, r.end - r.start))
        .collect();
    let walked = arg.walk_end.clamp(start, end);
    Ok((walked - start, runs))
}

/// The pagemap entries themselves (8 bytes per page; present = bit 63, file/shared = bit 61).
fn pagemap_entries(
    pagemap: &File,
    start: u64,
    len: u64,
    max_runs: usize,
) -> io::Result<(u64, Vec<(u64, u64)>)> {
    const PS: u64 = 4096;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    let mut at = start;
    let end = start + len;
    while at < end {
        let n = ((end - at) / PS).min(4096) as usize;
        let b = &mut buf[..n * 8];
        pagemap.read_exact_at(b, at / PS * 8)?;
        for i in 0..n {
            let e = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
            let a = at + i as u64 * PS;
            if e >> 63 & 1 == 1 && e >> 61 & 1 == 0 {
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == a => *l += PS,
                    _ => {
                        if runs.len() == max_runs {
                            return Ok((a - start, runs));
                        }
                        runs.push((a, PS));
                    }
                }
            }
        }
        at += n as u64 * PS;
    }
    Ok((len, runs))
}

/// Where a process's shim keeps its channel and doorbell, found through the anchor in the
/// shim's data (`None`: no shim mapped, or its anchor not set). `maps_text` is the process's maps.
pub fn find_channel(h: &ProcHandle, maps_text: &str) -> Option<(u64, u64)> {
    let lines = ksmplus_common::maps::parse(maps_text);
    for (s, e) in ksmplus_common::maps::shim_data(&lines) {
        let mut buf = vec![0u8; (e - s).min(1 << 20) as usize];
        if h.read(s, &mut buf).is_ok() {
            if let Some(a) = ksmplus_common::channel::find_anchor(&buf) {
                return Some(a);
            }
        }
    }
    None
}

/// `/proc/PID/maps`.
pub fn read_maps(root: &Path, pid: u32) -> io::Result<String> {
    std::fs::read_to_string(root.join(format!("proc/{pid}/maps")))
}

/// What the agent needs of `/proc/PID/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The thread group (process) this task belongs to: its pid for a process, not for a thread.
    pub tgid: u32,
    pub ppid: u32,
    /// Real uid.
    pub uid: u32,
    /// `Seccomp:` 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
    /// `Seccomp_filters:` how many filters are attached.
    pub seccomp_filters: u32,
    /// Caught signals (bit n-1 for signal n).
    pub sig_cgt: u64,
    pub sig_blk: u64,
    pub sig_ign: u64,
    /// The pid in each namespace, outermost first (`NSpid:`).
    pub nspid: Vec<u32>,
    pub threads: u32,
}

/// Parses the text of a `status` file.
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for l in text.lines() {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let hex = |v: &str| u64::from_str_radix(v, 16).unwrap_or(0);
        match k {
            "Tgid" => s.tgid = v.parse().unwrap_or(0),
            "PPid" => s.ppid = v.parse().unwrap_or(0),
            "Uid" => {
                s.uid = v
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0)
            }
            "Seccomp" => s.seccomp = v.parse().unwrap_or(0),
            "Seccomp_filters" => s.seccomp_filters = v.parse().unwrap_or(0),
            "SigCgt" => s.sig_cgt = hex(v),
            "SigBlk" => s.sig_blk = hex(v),
            "SigIgn" => s.sig_ign = hex(v),
            "NSpid" => {
                s.nspid = v
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            }
            "Threads" => s.threads = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    s
}

/// Whether process `pid` exists (its `/proc` directory does).
pub fn exists(root: &Path, pid: u32) -> bool {
    root.join(format!("proc/{pid}")).exists()
}

pub fn read_status(root: &Path, pid: u32) -> io::Result<Status> {
    std::fs::read_to_string(root.join(format!("proc/{pid}/status"))).map(|t| parse_status(&t))
}

/// The last pid the kernel handed out in the agent's pid namespace (the last field of
/// `/proc/loadavg`): it moves with every new process or thread anywhere, so while it stays put
/// nothing was born.
pub fn last_pid(root: &Path) -> Option<u32> {
    let t = std::fs::read_to_string(root.join("proc/loadavg")).ok()?;
    t.split_whitespace().nth(4)?.parse().ok()
}

/// Of the tasks `pids`, the processes (not threads) as `(pid, parent pid)`, and the pids with no
/// task (exited, or not attached yet: a pid is handed out a little before its task appears).
pub fn births(root: &Path, pids: impl IntoIterator<Item = u32>) -> (Vec<(u32, u32)>, Vec<u32>) {
    let (mut procs, mut missing) = (Vec::new(), Vec::new());
    for pid in pids {
        match read_status(root, pid) {
            Ok(s) if s.tgid == pid => procs.push((pid, s.ppid)),
            Ok(_) => {} // a thread
            Err(_) => missing.push(pid),
        }
    }
    (procs, missing)
}

/// The threads of a process.
pub fn threads(root: &Path, pid: u32) -> Vec<u32> {
    std::fs::read_dir(root.join(format!("proc/{pid}/task")))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What one thread is doing: its state letter (`R`, `S`, `D`, ...), the system call it is
/// blocked in (`None` when running in user space or unknown), and its blocked-signal mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadState {
    pub state: char,
    pub syscall: Option<i64>,
    pub sig_blk: u64,
}

pub fn thread_state(root: &Path, pid: u32, tid: u32) -> Option<ThreadState> {
    let base = root.join(format!("proc/{pid}/task/{tid}"));
    let stat = std::fs::read_to_string(base.join("stat")).ok()?;
    let state = stat[stat.rfind(')')? + 1..].trim_start().chars().next()?;
    let syscall = std::fs::read_to_string(base.join("syscall"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok());
    let sig_blk = std::fs::read_to_string(base.join("status"))
        .map(|t| parse_status(&t).sig_blk)
        .unwrap_or(u64::MAX);
    Some(ThreadState {
        state,
        syscall,
        sig_blk,
    })
}

/// A blocked thread's stack pointer, from `/proc/PID/task/TID/syscall` (`nr args… sp pc`, or
/// `-1 sp pc`); `None` while it runs (`running`) or when unreadable.
pub fn thread_sp(root: &Path, pid: u32, tid: u32) -> Option<u64> {
    let t = std::fs::read_to_string(root.join(format!("proc/{pid}/task/{tid}/syscall"))).ok()?;
    let f: Vec<&str> = t.split_whitespace().collect();
    if f.len() < 3 {
        return None;
    }
    u64::from_str_radix(f[f.len() - 2].trim_start_matches("0x"), 16).ok()
}

/// The children of every thread of a process (`/proc/PID/task/TID/children`).
pub fn children(root: &Path, pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for tid in threads(root, pid) {
        if let Ok(t) = std::fs::read_to_string(root.join(format!("proc/{pid}/task/{tid}/children")))
        {
            out.extend(t.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `comm` and executable path of a process (empty when unreadable).
pub fn comm_exe(root: &Path, pid: u32) -> (String, String) {
    let comm = std::fs::read_to_string(root.join(format!("proc/{pid}/comm")))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default();
    let exe = std::fs::read_link(root.join(format!("proc/{pid}/exe")))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    (comm, exe)
}

/// The inode of the shared anonymous mapping that contains `addr` (the family doorbell), from
/// the text of a maps file.
pub fn shared_inode_at(maps: &str, addr: u64) -> Option<u64> {
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (a, b) = f.next()?.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        let perms = f.next()?;
        let _off = f.next()?;
        let _dev = f.next()?;
        let inode: u64 = f.next()?.parse().ok()?;
        (a <= addr && addr < b && perms.ends_with('s')).then_some(inode)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::mman::munmap;

    #[test]
    fn births_tell_new_processes_from_threads_and_gone_pids() {
        let root = Path::new("/");
        let before = last_pid(root).expect("/proc/loadavg names the last pid");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
            let _ = wait.recv();
        });
        let tid = rx.recv().unwrap();
        let after = last_pid(root).unwrap();
        assert!(
            after != before,
            "a process and a thread were born: {before} → {after}"
        );
        let me = std::process::id();
        let pid = child.id();
        // A pid handed out and gone is missing (a reaped child's: not reused before the pids
        // wrap, where the next free pid could be taken by any process in the meantime).
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        let gone = dead.id();
        let (procs, missing) = births(root, [pid, tid, gone]);
        assert_eq!(procs, vec![(pid, me)], "the child, not the thread");
        assert_eq!(missing, vec![gone]);
        child.kill().unwrap();
        child.wait().unwrap();
        go.send(()).unwrap();
        t.join().unwrap();
        // Without /proc the agent cannot tell: no last pid.
        assert_eq!(last_pid(Path::new("/nonexistent")), None);
    }

    #[test]
    fn status_parses_the_fields_the_agent_uses() {
        let t = "Name:\tx\nThreads:\t3\nPPid:\t7\nUid:\t1001\t1001\t1001\t1001\nNSpid:\t9584\t14\t1\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001000\nSigCgt:\t0000000000400000\nSeccomp:\t2\nSeccomp_filters:\t3\n";
        let s = parse_status(t);
        assert_eq!(s.ppid, 7);
        assert_eq!(s.threads, 3);
        assert_eq!(s.uid, 1001);
        assert_eq!(s.seccomp, 2);
        assert_eq!(s.seccomp_filters, 3);
        assert_eq!(s.nspid, vec![9584, 14, 1]);
        assert_eq!(s.sig_cgt, 1 << 22, "SIGURG (23) is bit 22");
        assert_eq!(s.sig_ign, 1 << 12);
    }

    #[test]
    fn a_blocked_thread_of_this_process_shows_its_stack_pointer() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<u32>();
        let t = std::thread::spawn(move || {
            let tid = nix::unistd::gettid().as_raw() as u32;
            ready_tx.send(tid).unwrap();
            let _ = rx.recv();
        });
        let tid = ready_rx.recv().unwrap();
        let root = Path::new("/");
        let pid = std::process::id();
        let mut sp = None;
        for _ in 0..200 {
            sp = thread_sp(root, pid, tid);
            if sp.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let sp = sp.expect("a blocked thread has a stack pointer");
        let maps = read_maps(root, pid).unwrap();
        let lines = ksmplus_common::maps::parse(&maps);
        let m = lines
            .iter()
            .find(|m| m.start <= sp && sp < m.end)
            .expect("sp is mapped");
        assert!(m.perms.starts_with("rw"), "{m:?}");
        tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn shared_inode_of_the_doorbell() {
        let m = "7f00-7f01 rw-s 00000000 00:01 4242   /dev/zero (deleted)\n7f01-7f02 rw-p 00000000 00:00 0\n";
        assert_eq!(shared_inode_at(m, 0x7f00), Some(4242));
        assert_eq!(shared_inode_at(m, 0x7f01), None);
    }

    /// A handle on this very process and a fresh private anonymous mapping of `pages` pages
    /// in it (the caller unmaps it).
    fn own_mapping(
        pages: usize,
    ) -> (
        ProcHandle,
        std::ptr::NonNull<core::ffi::c_void>,
        std::num::NonZeroUsize,
    ) {
        use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
        let h = ProcHandle::open(Path::new("/"), std::process::id()).unwrap();
        let len = std::num::NonZeroUsize::new(pages * 4096).unwrap();
        // SAFETY: a fresh private anonymous mapping owned by the calling test.
        let map = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .unwrap();
        (h, map, len)
    }

    /// A page is shared while a fork child still maps it and private again once written
    /// (copy-on-write broken); a never-touched page is not counted, one only read (the shared
    /// zero page) is. KSM's merged pages are checked end to end in `tests/` (`feedback`).
    #[test]
    fn shared_pages_are_those_mapped_more_than_once_and_lone_ones_are_found() {
        let ps = 4096u64;
        let n = 16usize;
        let (h, map, len) = own_mapping(n);
        let a = map.as_ptr() as u64;
        let page = |i: u64| (a + i * ps) as *mut u8;
        for i in 0..8 {
            // SAFETY: inside the mapping above.
            unsafe { page(i).write_volatile(i as u8 + 1) };
        }
        // SAFETY: inside the mapping; page 8 is only read (the shared zero page).
        let z = unsafe { page(8).read_volatile() };
        assert_eq!(z, 0);
        let end = a + n as u64 * ps;
        let before = h.sharing(a, end, ps, 1).unwrap();
        assert_eq!(before.shared, 1, "private until a fork");
        assert_eq!(
            before.lone,
            vec![(a, a + 8 * ps)],
            "the written pages; the zero page and the absent ones end the stretch"
        );
        assert!(h.sharing(a, end, ps, 9).unwrap().lone.is_empty());
        assert_eq!(
            h.sharing(a + 2 * ps, a + 5 * ps, ps, 3).unwrap().lone,
            vec![(a + 2 * ps, a + 5 * ps)],
            "a stretch reaching the end of the range"
        );
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only blocks on a read and exits (async-signal-safe calls only).
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let mut b = [0u8; 1];
                // SAFETY: close(2), read(2) and _exit(2) on descriptors the child owns; with
                // its copy of the write end closed, the read returns when the parent's is.
                unsafe {
                    libc::close(w.as_raw_fd());
                    libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
                    libc::_exit(0)
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let shared = h.sharing(a, end, ps, 1).unwrap().shared;
                for i in 0..3 {
                    // SAFETY: inside the mapping; breaks copy-on-write for pages 0..3.
                    unsafe { page(i).write_volatile(0x55) };
                }
                let after = h.sharing(a, end, ps, 1).unwrap().shared;
                let part = h.sharing(a + 4 * ps, a + 6 * ps, ps, 1).unwrap().shared;
                let lone = h.sharing(a, end, ps, 1).unwrap().lone;
                drop(w);
                nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    shared, 9,
                    "8 written pages and the zero page, shared with the child"
                );
                assert_eq!(
                    after, 6,
                    "3 pages written after the fork are the parent's own"
                );
                assert_eq!(part, 2, "only the range asked is read");
                assert_eq!(
                    lone,
                    vec![(a, a + 3 * ps)],
                    "the pages written since the fork"
                );
            }
        }
        assert_eq!(
            h.sharing(a, end, ps, 1).unwrap().shared,
            1,
            "the child exited"
        );
        // SAFETY: unmapping the test's own mapping.
        unsafe { munmap(map, len.get()).unwrap() };
    }

    /// Residency and hashes of this very process: present pages are found and hashed, never
    /// touched pages are reported absent and stay absent.
    #[test]
    fn residency_and_hashes_of_a_live_process() {
        let ps = 4096u64;
        let n = 64usize;
        let (h, map, len) = own_mapping(n);
        let a = map.as_ptr() as u64;
        for i in (0..n).step_by(4) {
            // SAFETY: inside the mapping above.
            unsafe { *((a + i as u64 * ps) as *mut u8) = i as u8 + 1 };
        }
        let (covered, runs) = h.residency(a, n as u64 * ps, 100).unwrap();
        assert_eq!(covered, n as u64 * ps);
        assert_eq!(runs.len(), n / 4);
        assert!(runs
            .iter()
            .all(|&(s, l)| (s - a).is_multiple_of(4 * ps) && l == ps));
        let (covered, runs) = h.residency(a, n as u64 * ps, 3).unwrap();
        assert_eq!(runs.len(), 3);
        assert!(covered < n as u64 * ps && covered >= 9 * ps);
        let pages: Vec<u64> = (0..8).map(|i| a + i * ps).collect();
        let hs = h.hashes(&pages, ps);
        let mut p0 = vec![0u8; ps as usize];
        p0[0] = 1;
        assert_eq!(hs[0], PageHash::Hash(page_hash(&p0)));
        assert_eq!(hs[1], PageHash::NotResident);
        assert!(matches!(hs[4], PageHash::Hash(_)));
        let (_, runs) = h.residency(a + ps, ps, 10).unwrap();
        assert!(runs.is_empty(), "reading hashes faulted nothing in");
        // SAFETY: unmapping the test mapping, which nothing refers to any more.
        unsafe { munmap(map, len.get()) }.unwrap();
    }
}
