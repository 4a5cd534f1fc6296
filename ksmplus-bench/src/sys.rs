//! Small Linux helpers: CPU time and memory of processes from `/proc`, `/proc/vmstat`,
//! reading another process's memory, the ksmd lock, and the stop flag set by signals.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The pid of the kernel thread whose comm is `ksmd`.
pub fn ksmd_pid() -> Option<u32> {
    find_by_comm("ksmd").into_iter().next()
}

/// Every pid whose `/proc/PID/comm` is exactly `comm`.
pub fn find_by_comm(comm: &str) -> Vec<u32> {
    pids()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end_matches('\n') == comm)
        })
        .collect()
}

/// The pid of every process (the numeric entries of `/proc`; none when it cannot be read).
pub fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// A ksmd value of `/sys/kernel/mm/ksm` (-1 when it cannot be read).
pub fn ksm_get(name: &str) -> i64 {
    ksmplus_common::ksm::read_sysfs(Path::new("/"), name).unwrap_or(-1)
}

/// Writes a ksmd tunable of `/sys/kernel/mm/ksm`.
pub fn ksm_set(name: &str, value: &str) -> Result<(), String> {
    ksmplus_common::ksm::write_sysfs(Path::new("/"), name, value).map_err(|e| e.to_string())
}

/// Processes outside `ours` that KSM knows about (`ksm_rmap_items` or `ksm_merging_pages` not 0):
/// `(pid, comm, rmap_items, merging_pages)`. They share ksmd with the cell and so show up in
/// the global columns (general_profit, ksmd CPU, cow_ksm).
pub fn foreign_ksm_users(ours: &[u32]) -> Vec<(u32, String, u64, u64)> {
    let mut out = Vec::new();
    for pid in pids() {
        if ours.contains(&pid) {
            continue;
        }
        let Ok(st) = ksmplus_common::ksm::read_ksm_stat(Path::new("/"), pid) else {
            continue;
        };
        if st.rmap_items > 0 || st.merging_pages > 0 {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            out.push((
                pid,
                comm.trim_end().to_owned(),
                st.rmap_items,
                st.merging_pages,
            ));
        }
    }
    out
}

/// Nanoseconds one task has run (`/proc/PID/schedstat`, first field): precise, single thread.
pub fn task_runtime_ns(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// utime + stime of a whole process (all its threads, live or exited), nanoseconds,
/// from `/proc/PID/stat` (clock-tick resolution).
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (utime, stime) = parse_stat_times(&s)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some((utime + stime) * 1_000_000_000 / hz)
}

/// `(utime, stime)` in clock ticks from the text of `/proc/PID/stat`.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    // The comm field may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// CPU time of every live thread of `pid` (`/proc/PID/task/*/schedstat`, nanosecond
/// resolution); 0 when the process is gone.
pub fn threads_cpu_ns(pid: u32) -> u64 {
    tasks(pid)
        .filter_map(|t| {
            let s = fs::read_to_string(t.join("schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Context switches (voluntary + involuntary) of every live thread of `pid`, from
/// `/proc/PID/task/*/status`: how often it ran; 0 when the process is gone.
pub fn threads_ctx_switches(pid: u32) -> u64 {
    tasks(pid)
        .map(|t| {
            let s = fs::read_to_string(t.join("status")).unwrap_or_default();
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// [`threads_cpu_ns`], `None` when the process is gone.
pub fn live_threads_cpu_ns(pid: u32) -> Option<u64> {
    pid_alive(pid).then(|| threads_cpu_ns(pid))
}

/// The `/proc/PID/task/TID` directories of `pid`.
fn tasks(pid: u32) -> impl Iterator<Item = std::path::PathBuf> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
}

/// A `Vm*:` line of `/proc/PID/status` in KiB (e.g. `VmHWM`).
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The KSM counters of `/proc/vmstat` (`cow_ksm`, `ksm_swpin_copy`, ...), whatever this kernel has.
pub fn vmstat_ksm() -> BTreeMap<String, u64> {
    let text = fs::read_to_string("/proc/vmstat").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            if !k.contains("ksm") {
                return None;
            }
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// True when `/proc/PID/maps` mentions `needle` (e.g. the shim's file name).
pub fn maps_contain(pid: u32, needle: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.contains(needle))
        .unwrap_or(false)
}

/// Reads `len` bytes at `addr` of process `pid` through `/proc/PID/mem`.
pub fn read_mem(pid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let f = File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], addr + done as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read of /proc/{pid}/mem at {:#x}", addr + done as u64),
            ));
        }
        done += n;
    }
    Ok(buf)
}

/// The workload's checksum (see `workloads/workload.c`): FNV-1a over little-endian 64-bit words
/// with an xor-shift after each multiply.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for w in bytes.chunks_exact(8) {
        h ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = h.wrapping_mul(0x100000001b3);
        h ^= h >> 29;
    }
    h
}

/// An exclusive `flock` held for the life of the value.
pub struct LockFile {
    _file: File,
}

impl LockFile {
    /// Takes the lock, waiting (and saying so on stderr) while another holder has it.
    pub fn acquire(path: &Path) -> io::Result<LockFile> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let fd = file.as_raw_fd();
        // SAFETY: fd is a valid open descriptor owned by `file`.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!(
                "ksmplus-bench: waiting for the ksmd lock {} (another test or bench holds it)",
                path.display()
            );
            loop {
                // SAFETY: as above; a blocking flock that a signal may interrupt.
                if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted || stop_requested() {
                    return Err(e);
                }
            }
        }
        Ok(LockFile { _file: file })
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set the stop flag instead of killing the bench, so the run unwinds
/// through its guards (children killed, ksmd settings restored).
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleeps in short slices; `Err` as soon as a stop was requested.
pub fn sleep_checked(d: Duration) -> Result<(), String> {
    let step = Duration::from_millis(50);
    let mut left = d;
    loop {
        if stop_requested() {
            return Err("interrupted by a signal".into());
        }
        if left.is_zero() {
            return Ok(());
        }
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}

/// Sends `sig` to `pid` (errors ignored: the process may be gone already).
pub fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_survive_odd_comm() {
        let s = "42 (a) b) c) S 1 42 42 0 -1 4194304 100 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_times(s), Some((7, 3)));
    }

    #[test]
    fn checksum_matches_c_reference() {
        // Two words: 1 and 2, computed by hand from the C definition.
        let mut h: u64 = 0xcbf29ce484222325;
        for w in [1u64, 2] {
            h ^= w;
            h = h.wrapping_mul(0x100000001b3);
            h ^= h >> 29;
        }
        let bytes: Vec<u8> = [1u64, 2].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(checksum(&bytes), h);
    }
}
