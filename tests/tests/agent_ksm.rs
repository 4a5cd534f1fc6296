//! The agent end to end with the real shim, the real agent and the real ksmd: thesis Table 5-2,
//! a process with no duplicates, the dense thesis program in two processes, and `status --json`
//! against `/proc/PID/ksm_stat`. Each test holds ksmd exclusively (flock) and restores it.
//!
//! Needs `cargo build --workspace` first (the shim and the agent binaries). Figures for the notes
//! are printed as `FIGURE ...` lines (`cargo test -p ksmplus-tests --test agent_ksm -- --nocapture`).
mod agent_support;
use agent_support::{cpu_ms, figure, full_scans, ksmd_pid, Agent, FAST_POLICY};
use ksmplus_tests::{num_field, page_size, procfs, require_ksm, Interactive, KsmdGuard};
use serde_json::Value;
use std::time::{Duration, Instant};

const LINE: Duration = Duration::from_secs(60);

/// Waits until ksmd has completed `n` more full scans.
fn wait_full_scans(n: u64, timeout: Duration) {
    let target = full_scans() + n;
    let deadline = Instant::now() + timeout;
    while full_scans() < target {
        assert!(
            Instant::now() < deadline,
            "ksmd did not finish {n} full scans within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The process's status entry agrees with `/proc/PID/ksm_stat` (read before and after; when
/// the two reads agree the figures were stable, and the agent's must equal them).
fn assert_status_matches_ksm_stat(agent: &Agent, pid: u32) {
    for _ in 0..50 {
        let before = procfs::ksm_stat(pid);
        let p = agent.process(pid).expect("process in status");
        let after = procfs::ksm_stat(pid);
        if before != after {
            continue;
        }
        assert_eq!(u(&p["rmap_items"]), before.rmap_items, "{p}");
        assert_eq!(u(&p["merging_pages"]), before.merging_pages, "{p}");
        assert_eq!(u(&p["zero_pages"]), before.zero_pages, "{p}");
        assert_eq!(p["profit"].as_i64().unwrap(), before.process_profit, "{p}");
        return;
    }
    panic!("ksm_stat of {pid} never stable across a status call");
}

struct Usage {
    t0: Instant,
    ksmd0: u64,
    agent0: u64,
}

/// ksmd for this test alone, an agent with the fast policy, and their usage measured from the
/// agent's start.
struct Measured {
    agent: Agent,
    usage: Usage,
    _ksmd: KsmdGuard,
}

/// [`Measured`] now; `None` (the test skips) without KSM.
fn measured() -> Option<Measured> {
    if !require_ksm() {
        return None;
    }
    let _ksmd = KsmdGuard::acquire();
    let agent = Agent::start(FAST_POLICY);
    let usage = Usage::start(&agent);
    Some(Measured {
        agent,
        usage,
        _ksmd,
    })
}

impl Measured {
    /// The end of a case: see [`Usage::finish`].
    fn finish(&self, case: &str, procs: Vec<Interactive>) {
        self.usage.finish(case, &self.agent, procs);
    }
}

impl Usage {
    /// The end of a case: its figures reported, `status --json` checked against the kernel for
    /// the first of `procs` (case 7), then every one of them ended, each with success.
    fn finish(&self, case: &str, agent: &Agent, procs: Vec<Interactive>) {
        let pids: Vec<u32> = procs.iter().map(|p| p.pid()).collect();
        self.report(case, agent, &pids);
        assert_status_matches_ksm_stat(agent, pids[0]);
        for p in procs {
            assert!(p.finish(LINE).0.success());
        }
    }

    fn start(agent: &Agent) -> Usage {
        Usage {
            t0: Instant::now(),
            ksmd0: ksmd_pid().map(cpu_ms).unwrap_or(0),
            agent0: cpu_ms(agent.pid()),
        }
    }
    fn report(&self, case: &str, agent: &Agent, pids: &[u32]) {
        let s = agent.status();
        figure(
            &format!("{case} time to converge"),
            format!("{:.2?}", self.t0.elapsed()),
        );
        figure(
            &format!("{case} ksmd cpu"),
            format!(
                "{} ms (other ksmd users may add to it)",
                ksmd_pid().map(cpu_ms).unwrap_or(0) - self.ksmd0
            ),
        );
        let rmap: u64 = pids.iter().map(|p| procfs::ksm_stat(*p).rmap_items).sum();
        let merging: u64 = pids
            .iter()
            .map(|p| procfs::ksm_stat(*p).merging_pages)
            .sum();
        figure(
            &format!("{case} rmap_items / merging_pages"),
            format!("{rmap} / {merging}"),
        );
        figure(
            &format!("{case} agent cpu / rss"),
            format!(
                "{} ms / {} KiB",
                cpu_ms(agent.pid()) - self.agent0,
                u(&s["agent"]["rss_kib"])
            ),
        );
    }
}

#[test]
fn table_5_2_two_regions_merge_512_pages_with_few_rmap_items() {
    let Some(m) = measured() else { return };
    let (p, line) = m.agent.workload("agent_work", &["table52"]);
    let pid = p.pid();
    let ps = page_size();
    let (a, b, size) = (
        num_field(&line, "a"),
        num_field(&line, "b"),
        num_field(&line, "size"),
    );
    assert_eq!(size, 100 << 20);
    // The program really holds what it says: 256 pages of 0xff, then unique pages.
    let mut sum: u64 = 1469598103934665603;
    for base in [a, b] {
        assert_eq!(base % ps, 0, "{line}");
        let mem = procfs::read_mem(pid, base, size as usize);
        assert!(mem[..256 * ps as usize].iter().all(|&x| x == 0xff));
        assert_ne!(
            &mem[256 * ps as usize..257 * ps as usize],
            &mem[..ps as usize]
        );
        for &x in &mem {
            sum = (sum ^ x as u64).wrapping_mul(1099511628211);
        }
    }
    assert_eq!(
        format!("{sum:016x}"),
        ksmplus_tests::field(&line, "sum").unwrap()
    );

    // Converged: the duplicates merge and nothing else is left marked (a run grown while the
    // program was still zero-filling its buffers is loosened by the agent on the way).
    m.agent.wait(
        ">= 510 pages merging with <= 1027 rmap_items",
        Duration::from_secs(180),
        |_| {
            let k = procfs::ksm_stat(pid);
            (k.merging_pages >= 510 && k.rmap_items <= 1027).then_some(())
        },
    );
    // Converged: a few more full scans change nothing.
    wait_full_scans(3, Duration::from_secs(60));
    let k = procfs::ksm_stat(pid);
    assert!(k.merging_pages >= 510, "{k:?}");
    assert!(k.rmap_items <= 1027, "{k:?}");
    let st = m.agent.process(pid).unwrap();
    assert_eq!(u(&st["marked_bytes"]), 2 * 256 * ps, "{st}");
    m.finish("table 5-2", vec![p]);
}

#[test]
fn unique_pages_end_with_no_rmap_items_and_no_fingerprints() {
    let Some(m) = measured() else { return };
    let (p, line) = m.agent.workload("agent_work", &["unique", "200"]);
    let pid = p.pid();
    let (a, size) = (num_field(&line, "a"), num_field(&line, "size"));
    let mem = procfs::read_mem(pid, a, 2 * page_size() as usize);
    assert_ne!(mem[..page_size() as usize], mem[page_size() as usize..]);
    assert_eq!(size, 200 << 20);
    let st = m
        .agent
        .wait("the schedule to run out", Duration::from_secs(180), |s| {
            let p = s["processes"]
                .as_array()?
                .iter()
                .find(|p| p["pid"].as_u64() == Some(pid as u64))?;
            (u(&p["regions"]) > 0
                && u(&p["regions_dropped"]) == u(&p["regions"])
                && u(&p["fingerprints"]) == 0)
                .then(|| p.clone())
        });
    assert_eq!(u(&st["marked_bytes"]), 0, "{st}");
    assert_eq!(u(&st["runs_marked"]), 0, "{st}");
    // Rounds 3 to 10 (80 + 70 + … + 10 = 360 %) sample the whole buffer; the first two only
    // what was resident then (the agent may find the region while the program still fills it,
    // and only resident pages are sampled).
    assert!(u(&st["fingerprinted_pages"]) >= 51200 * 36 / 10, "{st}");
    // Never marked, so ksmd never took the process in (with nothing mergeable anywhere ksmd
    // stops counting full scans, so there is nothing to wait for).
    let k = procfs::ksm_stat(pid);
    assert_eq!(k.rmap_items, 0, "{k:?}");
    assert!(!k.mergeable, "{k:?}");
    let s = m.agent.status();
    assert_eq!(u(&s["engine"]["fingerprints"]), 0, "{s}");
    assert_eq!(u(&s["engine"]["distinct_hashes"]), 0, "{s}");
    m.finish("no duplicates (200 MiB)", vec![p]);
}

#[test]
fn dense_thesis_program_in_two_processes_merges_99_percent() {
    let Some(m) = measured() else { return };
    let (p1, l1) = m.agent.workload("agent_work", &["dense", "20"]);
    let (p2, l2) = m.agent.workload("agent_work", &["dense", "20"]);
    let ps = page_size();
    let pages = (20u64 << 20) / ps;
    for (p, l) in [(&p1, &l1), (&p2, &l2)] {
        let mem = procfs::read_mem(p.pid(), num_field(l, "a"), 20 << 20);
        assert!(mem.iter().enumerate().all(|(i, &x)| x == i as u8));
    }
    let (a, b) = (p1.pid(), p2.pid());
    m.agent.wait(
        "99 % of both buffers merging",
        Duration::from_secs(120),
        |_| {
            let (x, y) = (procfs::ksm_stat(a), procfs::ksm_stat(b));
            (x.merging_pages * 100 >= pages * 99 && y.merging_pages * 100 >= pages * 99)
                .then_some(())
        },
    );
    m.finish("dense 2 x 20 MiB", vec![p1, p2]);
}

/// The kernel feedback end to end: runs that merge stay marked through several checks (the
/// agent reads "merged" from the pagemap of each run: a merged page is mapped more than once),
/// and once the program rewrites them with unique content they are unmarked, which frees their
/// rmap_items.
#[test]
fn merging_runs_stay_marked_and_rewritten_ones_are_unmarked() {
    let Some(m) = measured() else { return };
    let (mut p, line) = m.agent.workload("agent_work", &["rewrite", "20"]);
    let pid = p.pid();
    let pages = (20u64 << 20) / page_size();
    let mem = procfs::read_mem(pid, num_field(&line, "a"), 20 << 20);
    assert!(mem.iter().enumerate().all(|(i, &x)| x == i as u8));
    m.agent.wait("99 % of the buffer merging", LINE * 2, |_| {
        (procfs::ksm_stat(pid).merging_pages * 100 >= pages * 99).then_some(())
    });
    // Checks are due 3 full scans after marking (FAST_POLICY), then 6, 12, ...
    wait_full_scans(16, LINE * 2);
    let st = m.agent.process(pid).unwrap();
    assert_eq!(
        u(&st["runs_unmarked"]),
        0,
        "a merging run was unmarked: {st}"
    );
    assert_eq!(
        u(&st["runs_loosened"]),
        0,
        "a merging run was loosened: {st}"
    );
    assert!(
        u(&st["marked_bytes"]) >= pages * page_size() * 99 / 100,
        "{st}"
    );
    let out = p.cmd("rewrite", LINE);
    assert!(out.starts_with("sum="), "{out}");
    let st = m.agent.wait(
        "the rewritten runs unmarked, their rmap_items freed",
        LINE * 3,
        |s| {
            let p = s["processes"]
                .as_array()?
                .iter()
                .find(|p| p["pid"].as_u64() == Some(pid as u64))?;
            // The unmark is the shim's madvise, after the agent's decision.
            let k = procfs::ksm_stat(pid);
            (u(&p["marked_bytes"]) == 0 && k.rmap_items < pages / 100).then(|| p.clone())
        },
    );
    assert!(u(&st["runs_unmarked"]) >= 1, "{st}");
    assert_eq!(procfs::ksm_stat(pid).merging_pages, 0);
    m.finish("rewritten after merging (20 MiB)", vec![p]);
}

fn ksmd_value(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{name}"))
        .unwrap()
        .trim()
        .to_string()
}

fn wait_ksmd_value(name: &str, want: &str, what: &str, agent: &Agent) {
    let deadline = Instant::now() + LINE;
    while ksmd_value(name) != want {
        assert!(
            Instant::now() < deadline,
            "{what}: ksmd {name} is {} not {want}; agent log:\n{}",
            ksmd_value(name),
            agent_support::tail(&agent.log(), 3000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The policy's `[ksmd]` table is applied at start, a tunable dropped from it on reload gets its
/// old value back, and at exit (SIGTERM) every tunable the agent changed is restored.
#[test]
fn policy_ksmd_settings_are_applied_and_restored() {
    if !require_ksm() {
        return;
    }
    let _ksmd = KsmdGuard::acquire();
    let (scan0, sleep0) = (ksmd_value("pages_to_scan"), ksmd_value("sleep_millisecs"));
    // Values nobody else would pick, different from what is there now.
    let scan1 = if scan0 == "1234" { "1235" } else { "1234" };
    let sleep1 = if sleep0 == "37" { "38" } else { "37" };
    let with_both =
        format!("{FAST_POLICY}\n[ksmd]\npages_to_scan = {scan1}\nsleep_millisecs = {sleep1}\n");
    let mut agent = Agent::start(&with_both);
    wait_ksmd_value("pages_to_scan", scan1, "applied at start", &agent);
    assert_eq!(ksmd_value("sleep_millisecs"), sleep1);
    // Reload without pages_to_scan: that one goes back, sleep_millisecs stays.
    std::fs::write(
        &agent.policy,
        format!("{FAST_POLICY}\n[ksmd]\nsleep_millisecs = {sleep1}\n"),
    )
    .unwrap();
    let out = agent.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    wait_ksmd_value("pages_to_scan", &scan0, "dropped on reload", &agent);
    assert_eq!(ksmd_value("sleep_millisecs"), sleep1);
    agent.stop(libc::SIGTERM);
    assert_eq!(ksmd_value("sleep_millisecs"), sleep0, "restored at exit");
    assert_eq!(ksmd_value("pages_to_scan"), scan0);
}
