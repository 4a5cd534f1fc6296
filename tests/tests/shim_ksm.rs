//! With ksmd running: the thesis program's 20 MiB buffer, page-aligned by the shim and marked
//! MERGEABLE through its channel page (as the agent does), merges (≥ 99 % of its 5120 pages); and what the same
//! program gets without the shim, marking its own page-rounded range.
//!
//! Measured finding, asserted: without the shim the buffer starts 16 bytes into its page, yet
//! the enclosing pages merge too (≥ 99 % of 5120). The thesis pattern `i % 256` has a period
//! that divides the page size, and glibc puts the buffer at the same offset in both processes,
//! so every page is still identical. Alignment matters for content whose page offset differs
//! between processes, not for this workload.
//!
//! Needs root and /sys/kernel/mm/ksm; skips otherwise unless KSMPLUS_REQUIRE_KSM=1.
use ksmplus_common::channel::{op, Command};
use ksmplus_tests::shim::command;
use ksmplus_tests::{
    compile, field, num_field, page_size, poll_until, procfs, require_ksm, HarnessAgent,
    Interactive, KsmdGuard, ShimChannel, ShimMode,
};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);
const MERGE_DEADLINE: Duration = Duration::from_secs(60);
const PAGES: u64 = 5120;

#[test]
fn thesis_program_merges_under_the_shim() {
    if !require_ksm() {
        return;
    }
    let ksmd = KsmdGuard::acquire();
    let agent = HarnessAgent::start();
    let prog = compile("shim_thesis");
    let mode = ShimMode::On {
        socket: agent.socket_path().to_owned(),
    };
    let mut procs = Vec::new();
    for _ in 0..2 {
        let mut p = Interactive::spawn(&mut command(&prog, &mode));
        let line = p.line(T);
        let (ptr, size) = (num_field(&line, "ptr"), num_field(&line, "size"));
        assert_eq!(ptr % page_size(), 0, "{line}");
        assert_eq!(size / page_size(), PAGES);
        agent.wait_hello(p.pid(), T);
        let ch = ShimChannel::wait(p.pid(), T);
        let seq = ch.post(&[Command {
            op: op::MERGEABLE,
            start: ptr,
            len: size,
        }]);
        // The program now waits on stdin: the wake-up signal gets the batch executed.
        assert_eq!(ch.wait_done(seq, T, true), vec![0]);
        procs.push((p, line));
    }
    let t0 = Instant::now();
    let scans0 = ksmd.full_scans();
    for (p, _) in &procs {
        let pid = p.pid();
        wait_99_percent_merging(pid, "");
    }
    eprintln!(
        "with the shim: both processes >= 99% merged after {:?} ({} full scans)",
        t0.elapsed(),
        ksmd.full_scans() - scans0
    );
    for (p, line) in procs {
        let (status, rest) = p.finish(T);
        assert!(status.success());
        assert_eq!(rest, [format!("sum={}", field(&line, "sum").unwrap())]);
    }
}

#[test]
fn without_the_shim_the_buffer_is_not_page_aligned() {
    if !require_ksm() {
        return;
    }
    let ksmd = KsmdGuard::acquire();
    let prog = compile("shim_thesis");
    let mut procs = Vec::new();
    for _ in 0..2 {
        let mut p = Interactive::spawn(command(&prog, &ShimMode::Off).arg("madvise"));
        let line = p.line(T);
        let ptr = num_field(&line, "ptr");
        assert_ne!(
            ptr % page_size(),
            0,
            "glibc's mmapped chunk should start after its header: {line}"
        );
        assert_eq!(p.line(T), "madvise=0");
        procs.push((p, ptr));
    }
    // The finding: the unaligned buffers merge all the same (see the module doc).
    let t0 = Instant::now();
    let scans0 = ksmd.full_scans();
    for (p, ptr) in &procs {
        let pid = p.pid();
        let s = wait_99_percent_merging(pid, " without the shim");
        eprintln!(
            "without the shim: buffer at page offset {} ({} pages enclosing it); \
             {} pages merging ({:.1}% of {PAGES}) after {:?} ({} full scans)",
            ptr % page_size(),
            PAGES + 1,
            s.merging_pages,
            s.merging_pages as f64 * 100.0 / PAGES as f64,
            t0.elapsed(),
            ksmd.full_scans() - scans0
        );
    }
    for (p, _) in procs {
        assert!(p.finish(T).0.success());
    }
}

/// Waits until at least 99 % of the `PAGES` pages of `pid` are merging; its `ksm_stat` then.
/// `how` finishes the description of what is waited for.
fn wait_99_percent_merging(pid: u32, how: &str) -> ksmplus_common::ksm::KsmStat {
    poll_until(
        &format!("pid {pid}: >= 99% of {PAGES} pages merging{how}"),
        MERGE_DEADLINE,
        Duration::from_millis(100),
        || {
            let s = procfs::ksm_stat(pid);
            if s.merging_pages * 100 >= PAGES * 99 {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
}
