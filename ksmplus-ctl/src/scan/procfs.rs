//! What the scan reads about processes in `/proc`: which exist, their names and states, why one
//! cannot be read, and the shared zero page's frame number.
use ksmplus_common::maps::MapLine;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{PM_PFN_MASK, PM_PRESENT};

pub(super) const PF_KTHREAD: u64 = 0x0020_0000;

/// State letter and flags from `/proc/PID/stat` (readable by anyone).
pub(super) fn proc_state(dir: &Path) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(dir.join("stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let flags = f.nth(5)?.parse().ok()?; // field 9: after ppid pgrp session tty_nr tpgid
    Some((state, flags))
}

/// Still running (not gone, not a zombie).
pub(super) fn alive(dir: &Path) -> bool {
    matches!(proc_state(dir), Some((s, _)) if s != 'Z' && s != 'X')
}

pub(super) fn read_comm(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("comm"))
        .map(|s| s.trim_end_matches('\n').to_owned())
        .unwrap_or_else(|_| "?".into())
}

pub(super) fn open_reason(e: &io::Error) -> String {
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
pub(super) fn zero_page_pfn() -> Option<u64> {
    use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    let ps = page_size();
    let len = std::num::NonZeroUsize::new(ps)?;
    // SAFETY: a fresh private anonymous mapping nothing else refers to.
    let p =
        unsafe { mmap_anonymous(None, len, ProtFlags::PROT_READ, MapFlags::MAP_PRIVATE) }.ok()?;
    // SAFETY: the first byte of the readable page just mapped.
    unsafe { std::ptr::read_volatile(p.as_ptr() as *const u8) };
    let mut e = [0u8; 8];
    let r = File::open("/proc/self/pagemap")
        .and_then(|f| f.read_at(&mut e, (p.as_ptr() as u64) / ps as u64 * 8));
    // SAFETY: unmapping that page, which nothing refers to any more.
    let _ = unsafe { munmap(p, ps) };
    let e = u64::from_le_bytes(e);
    match r {
        Ok(8) if e & PM_PRESENT != 0 && e & PM_PFN_MASK != 0 => Some(e & PM_PFN_MASK),
        _ => None,
    }
}

/// The page size (4096 where sysconf does not say).
pub(super) fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .filter(|&p| p > 0)
        .map_or(4096, |p| p as usize)
}

/// Worth scanning: private and readable, anonymous or a private file mapping (whose COW copies
/// are anonymous, also after a later mprotect to read-only, like RELRO), never the kernel's
/// special mappings.
pub fn scannable(l: &MapLine) -> bool {
    l.perms.starts_with('r')
        && l.perms.ends_with('p')
        && !matches!(
            l.name,
            "[vvar]" | "[vdso]" | "[vsyscall]" | "[vvar_vclock]" | "[uprobes]"
        )
}

/// A mapping of a file, whose present pages are anonymous only where pagemap says so.
pub fn is_file(l: &MapLine) -> bool {
    l.inode != 0 || l.name.starts_with('/')
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

#[cfg(test)]
mod tests {
    use super::*;
    use ksmplus_common::maps::parse;

    #[test]
    fn maps_lines() {
        let one = |s: &'static str| parse(s).into_iter().next().unwrap();
        let v =
            one("7f00a0000000-7f00a0021000 rw-p 00000000 00:00 0                          [heap]");
        assert_eq!(v.start, 0x7f00a0000000);
        assert_eq!(v.name, "[heap]");
        assert!(scannable(&v) && !is_file(&v));
        assert!(!scannable(&one(
            "7fff1000-7fff3000 r--p 00000000 00:00 0  [vvar]"
        )));
        assert!(!scannable(&one(
            "1000-2000 rw-s 00000000 00:05 12 /dev/shm/x"
        )));
        assert!(!scannable(&one("1000-2000 ---p 00000000 00:00 0")));
        let v = one("1000-2000 rw-p 00001000 08:01 77 /usr/lib/a b.so (deleted)");
        assert_eq!(v.name, "/usr/lib/a b.so (deleted)");
        assert!(scannable(&v) && is_file(&v));
        let v = one("1000-2000 r--p 00001000 08:01 77 /usr/lib/relro.so");
        assert!(scannable(&v) && is_file(&v));
        assert_eq!(one("1000-2000 rw-p 00000000 00:00 0").name, "");
    }
}
