//! The workloads: compiling `workloads/workload.c`, starting a cell's processes, waiting for
//! `ready`, and checking through `/proc/PID/mem` that their memory holds what they claim.

use crate::approach::Launch;
use crate::sys;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workload source, embedded so the bench binary works from any directory.
const SOURCE: &str = include_str!("../workloads/workload.c");
/// The workload's file name, and so its comm (what the agent's policy tracks).
pub const COMM: &str = "ksmplus-wl";
pub const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Dense,
    Sparse,
    None,
    Churn,
    Many,
}

pub const ALL: &[Workload] = &[
    Workload::Dense,
    Workload::Sparse,
    Workload::None,
    Workload::Churn,
    Workload::Many,
];

impl Workload {
    pub fn id(self) -> &'static str {
        match self {
            Workload::Dense => "W1",
            Workload::Sparse => "W2",
            Workload::None => "W3",
            Workload::Churn => "W5",
            Workload::Many => "W6",
        }
    }

    /// The workload program's mode argument.
    pub fn mode(self) -> &'static str {
        match self {
            Workload::Dense => "dense",
            Workload::Sparse => "sparse",
            Workload::None => "none",
            Workload::Churn => "churn",
            Workload::Many => "many",
        }
    }

    pub fn parse(s: &str) -> Option<Workload> {
        ALL.iter()
            .copied()
            .find(|w| w.id().eq_ignore_ascii_case(s) || w.mode() == s)
    }

    pub fn processes(self) -> usize {
        match self {
            Workload::Dense => 2,
            Workload::Many => 50,
            _ => 1,
        }
    }

    /// The pages with a duplicate that this design promises at size divisor `div`, as
    /// `(at least, at most)`. W1 uses plain `malloc` like the thesis, so its buffer need not be
    /// page-aligned: the partial first and last pages may also be duplicates across processes.
    pub fn designed_ideal(self, div: u64) -> (u64, u64) {
        match self {
            Workload::Dense => {
                let full = 2 * (20 * MIB / div / PAGE);
                (full, full + 4)
            }
            Workload::Sparse => (512, 512),
            Workload::None => (0, 0),
            Workload::Churn => {
                let n = 32 * MIB / div / PAGE;
                (n, n)
            }
            Workload::Many => {
                let n = 50 * (8 * MIB / div / PAGE / 4);
                (n, n)
            }
        }
    }
}

/// Compiles the workload with `cc -O2` into `dir`; returns the binary's path.
pub fn compile(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("workload.c");
    std::fs::write(&src, SOURCE).map_err(|e| format!("{}: {e}", src.display()))?;
    let bin = dir.join(COMM);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-O2", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run {cc}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cc} -O2 workload.c failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

/// One buffer a workload process reported.
#[derive(Clone, Debug)]
pub struct Buf {
    pub start: u64,
    pub len: u64,
    pub checksum: u64,
    pub stable: bool,
}

/// A running workload process. Dropping it closes its stdin (its signal to exit) and kills it
/// if it does not go within two seconds, so no cell leaves a process behind.
pub struct Proc {
    pub pid: u32,
    pub bufs: Vec<Buf>,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Proc {
    /// Ends the process and reaps it.
    pub fn stop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Line {
    Ready(Vec<Buf>),
    Failed(String),
}

fn parse_buf(line: &str) -> Option<Buf> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 5 || f[0] != "buf" {
        return None;
    }
    Some(Buf {
        start: u64::from_str_radix(f[1], 16).ok()?,
        len: f[2].parse().ok()?,
        checksum: u64::from_str_radix(f[3], 16).ok()?,
        stable: f[4] == "stable",
    })
}

/// Starts the cell's processes under `launch` and waits until every one printed `ready`.
pub fn start(
    bin: &Path,
    wl: Workload,
    div: u64,
    launch: &Launch,
    timeout: Duration,
) -> Result<Vec<Proc>, String> {
    let (tx, rx) = mpsc::channel::<(usize, Line)>();
    let mut procs = Vec::new();
    for i in 0..wl.processes() {
        let mut cmd = Command::new(bin);
        cmd.arg(wl.mode())
            .arg(i.to_string())
            .arg(div.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        launch.apply(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut bufs = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "ready" {
                    let _ = tx.send((i, Line::Ready(bufs)));
                    return;
                }
                match parse_buf(&line) {
                    Some(b) => bufs.push(b),
                    None => {
                        let _ = tx.send((i, Line::Failed(format!("unexpected line {line:?}"))));
                        return;
                    }
                }
            }
            let _ = tx.send((i, Line::Failed("exited before ready".into())));
        });
        procs.push(Proc {
            pid: child.id(),
            bufs: Vec::new(),
            child,
            stdin,
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut ready = 0;
    while ready < procs.len() {
        if sys::stop_requested() {
            return Err("interrupted by a signal".into());
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((i, Line::Ready(bufs))) => {
                procs[i].bufs = bufs;
                ready += 1;
            }
            Ok((i, Line::Failed(why))) => {
                return Err(format!("{} process {i}: {why}", wl.id()));
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => {
                return Err(format!(
                    "{}: only {ready} of {} processes ready after {timeout:?}",
                    wl.id(),
                    procs.len()
                ))
            }
        }
    }
    Ok(procs)
}

/// Reads every stable buffer of every process through `/proc/PID/mem`, checks it against the
/// checksum the process printed, hashes its pages, and returns the number of pages that have at
/// least one equal page among them (what an ideal merger would merge).
pub fn verify(procs: &[Proc]) -> Result<u64, String> {
    let mut counts: HashMap<u64, u64> = HashMap::new();
    for p in procs {
        for b in p.bufs.iter().filter(|b| b.stable) {
            let first = b.start / PAGE * PAGE;
            let end = (b.start + b.len).div_ceil(PAGE) * PAGE;
            let mem = sys::read_mem(p.pid, first, (end - first) as usize)
                .map_err(|e| format!("pid {}: /proc/PID/mem: {e}", p.pid))?;
            let off = (b.start - first) as usize;
            let sum = sys::checksum(&mem[off..off + b.len as usize]);
            if sum != b.checksum {
                return Err(format!(
                    "pid {}: buffer at {:#x} has checksum {sum:#x} in /proc/PID/mem but the program printed {:#x}",
                    p.pid, b.start, b.checksum
                ));
            }
            for page in mem.chunks_exact(PAGE as usize) {
                *counts.entry(ksmplus_common::page_hash(page)).or_default() += 1;
            }
        }
    }
    Ok(counts.values().filter(|&&n| n >= 2).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buf_lines() {
        let b = parse_buf("buf 7f0000001000 8192 ff stable").unwrap();
        assert_eq!(
            (b.start, b.len, b.checksum, b.stable),
            (0x7f0000001000, 8192, 255, true)
        );
        assert!(!parse_buf("buf 1 2 3 volatile").unwrap().stable);
        assert!(parse_buf("hello").is_none());
    }

    #[test]
    fn designed_ideal_at_smoke_size() {
        assert_eq!(Workload::Sparse.designed_ideal(8), (512, 512));
        assert_eq!(Workload::Many.designed_ideal(8), (3200, 3200));
        assert_eq!(Workload::Dense.designed_ideal(1).0, 10240);
    }
}
