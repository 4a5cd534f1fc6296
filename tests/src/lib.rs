//! Library for the end-to-end tests of ksmplus: real programs run under `libksmplus.so`
//! against the real kernel, with a [`HarnessAgent`] standing in for `ksmplus-agentd` where a
//! test is about the shim alone.
//!
//! - [`shim`]: find `libksmplus.so` and put a command under it;
//! - [`cc`]: compile the C workloads of `tests/c` (cached by source hash);
//! - [`agent`]: the harness agent — records every Hello and answers it with a verdict;
//! - [`channel`]: a shim's channel page read and written from outside, as the agent does;
//! - [`process`]: spawn programs with deadlines, drive interactive ones line by line;
//! - [`procfs`]: `/proc/PID/{smaps,mem,statm,ksm_stat}` of a workload;
//! - [`ksmd`]: [`KsmdGuard`] (exclusive use of ksmd with fast settings) and [`require_ksm`].
//!
//! Rule for every test built on this: wait for a condition with a deadline
//! ([`HarnessAgent::wait_for`], [`process::Interactive::line`]), never for a tuned sleep.
pub mod agent;
pub mod cc;
pub mod channel;
pub mod desktop_smoke;
pub mod ksmd;
pub mod process;
pub mod procfs;
pub mod shim;

pub use agent::{AgentState, HarnessAgent, HelloAnswer, HelloRecord};
pub use cc::compile;
pub use channel::ShimChannel;
pub use ksmd::{require_ksm, KsmdGuard};
pub use process::{run, Interactive, RunOutput};
pub use shim::{shim_lib, target_bin, ShimMode};

/// Parses `0x...` or decimal, as the C workloads print pointers and numbers.
pub fn parse_num(s: &str) -> u64 {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).unwrap_or_else(|_| panic!("bad hex number {s:?}"))
    } else if s == "(nil)" {
        0
    } else {
        s.parse()
            .unwrap_or_else(|_| panic!("bad decimal number {s:?}"))
    }
}

/// The value of `key=value` in a line of `key=value` words (as the C workloads print).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// [`field`] parsed as a number; panics naming the line when it is missing.
pub fn num_field(line: &str, key: &str) -> u64 {
    parse_num(field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}")))
}

/// Panics naming the first of `want` that `text` (`what`) does not contain.
pub fn assert_contains_all(text: &str, want: &[&str], what: &str) {
    for w in want {
        assert!(text.contains(w), "{w:?} not in {what}:\n{text}");
    }
}

/// Panics, with what it printed, when the command `what` that gave `o` failed.
pub fn assert_success(o: &std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A temporary directory named `prefix...` (so a leftover says which test made it), removed on
/// drop.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("temporary directory {prefix}...: {e}"))
}

/// The first `prog` on `$PATH`, as a shell finds it.
pub fn which(prog: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Re-evaluates `f` every `every` until it returns `Ok`, panicking (naming `what` and the last
/// `Err`, shown only then) after `timeout`. For state that has no change notification
/// (`/proc/PID/ksm_stat`, sysfs counters, a channel page, the agent's status); anything the
/// harness agent records should use [`HarnessAgent::wait_for`] instead.
pub fn poll_until<T, E: std::fmt::Display>(
    what: &str,
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if std::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}
