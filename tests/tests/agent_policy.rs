//! The policy end to end: untracked programs' shims go dormant, excluded programs are never
//! marked, volatile pages are never marked, and a bad policy on reload keeps the old one.
//! None of this needs ksmd: marking is the agent's decision, merging is the kernel's.
mod agent_support;
use agent_support::{Agent, FAST_POLICY};
use ksmplus_common::channel::{flag, verdict};
use ksmplus_tests::{num_field, procfs, Interactive, ShimChannel, ShimMode};
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn find(s: &Value, pid: u32) -> Option<&Value> {
    s["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid as u64))
}

/// True if any VMA overlapping `[a, a+len)` of `pid` is marked MERGEABLE (`mg`).
fn any_mergeable(pid: u32, a: u64, len: u64) -> bool {
    procfs::vmas_overlapping(pid, a, a + len)
        .iter()
        .any(|v| v.has_flag("mg"))
}

/// Starts `agent_work` (4 MiB of dense duplicates, tracked by the policy) and waits until the
/// agent has marked all of it, as the kernel confirms.
fn tracked_work_marked(agent: &Agent) -> Interactive {
    let (work, lw) = agent.workload("agent_work", &["dense", "4"]);
    agent.wait("agent_work marked", T, |s| {
        find(s, work.pid())
            .filter(|p| u(&p["marked_bytes"]) >= 4 << 20)
            .map(|_| ())
    });
    assert!(any_mergeable(work.pid(), num_field(&lw, "a"), 4 << 20));
    work
}

#[test]
fn untracked_program_goes_dormant_and_excluded_program_is_never_marked() {
    let policy = FAST_POLICY
        .replace(
            "unmerge_after_full_scans = 3",
            "unmerge_after_full_scans = 1000000",
        )
        .replace(
            "track = [\"agent_work\"]",
            "track = [\"agent_work\", \"agent_secret\"]\nexclude = [\"agent_secret\"]",
        );
    let agent = Agent::start(&policy);
    let (other, _) = agent.workload("agent_other", &["dense", "4"]);
    let (secret, ls) = agent.workload("agent_secret", &["dense", "4"]);
    // The tracked one gets marked: proof the excluded one's pages would have qualified.
    let work = tracked_work_marked(&agent);
    let s = agent.wait("both others refused", T, |s| {
        (u(&s["agent"]["ignored"]) >= 1 && u(&s["agent"]["excluded"]) >= 1).then(|| s.clone())
    });
    assert!(find(&s, other.pid()).is_none(), "{s}");
    assert!(find(&s, secret.pid()).is_none(), "{s}");
    // Dormant: known to the agent as untracked (tracked later if the policy names them), and
    // holding no connection.
    assert_eq!(u(&s["agent"]["peers"]["untracked"]), 2, "{s}");
    assert_eq!(u(&s["agent"]["peers"]["unidentified"]), 0, "{s}");
    for (p, want) in [(&other, "agent_other"), (&secret, "agent_secret")] {
        let ch = ksmplus_tests::ShimChannel::wait(p.pid(), T);
        assert_eq!(
            ch.snapshot().verdict,
            ksmplus_common::channel::verdict::IGNORE,
            "{want}"
        );
    }
    assert!(!any_mergeable(secret.pid(), num_field(&ls, "a"), 4 << 20));
    assert!(!procfs::ksm_stat(secret.pid()).mergeable);
    for p in [other, secret, work] {
        assert!(p.finish(T).0.success());
    }
}

/// The VMAs of `pid` marked MERGEABLE, anywhere in its address space.
fn mergeable_vmas(pid: u32) -> Vec<String> {
    procfs::smaps(pid)
        .iter()
        .filter(|v| v.has_flag("mg"))
        .map(|v| format!("{v:?}"))
        .collect()
}

/// Issue 11 #5, the mode without an agent: `KSMPLUS_MADVISE_ALL=1` marks every large region of
/// a program (here `agent_work` under its own name: its 4 MiB buffer is marked), but not one
/// region of the same program named `ssh-agent`, which is on the default exclusion list: its
/// shim is dormant, no VMA has the `mg` flag and the kernel says `ksm_mergeable: no`.
#[test]
fn default_exclusion_holds_in_madvise_all_mode() {
    for (name, excluded) in [("agent_work", false), ("ssh-agent", true)] {
        let exe = agent_support::workload_named(name);
        let mode = ShimMode::On {
            socket: "/nonexistent/ksmplus/agent.sock".into(),
        };
        let mut cmd = ksmplus_tests::shim::command(&exe, &mode);
        cmd.env("KSMPLUS_MADVISE_ALL", "1").args(["dense", "4"]);
        let mut p = Interactive::spawn(&mut cmd);
        let line = p.line(T);
        let pid = p.pid();
        let a = num_field(&line, "a");
        let ch = ShimChannel::wait(pid, T);
        let flags = ch.snapshot().flags;
        let k = procfs::ksm_stat(pid);
        if excluded {
            assert_ne!(flags & flag::DORMANT, 0, "{name}: shim not dormant");
            assert_eq!(flags & flag::MADVISE_ALL, 0, "{name}");
            assert_eq!(mergeable_vmas(pid), Vec::<String>::new(), "{name}");
            assert!(!k.mergeable, "{name}: {k:?}");
        } else {
            assert_ne!(flags & flag::MADVISE_ALL, 0, "{name}");
            assert!(any_mergeable(pid, a, 4 << 20), "{name}: buffer not marked");
            assert!(k.mergeable, "{name}: {k:?}");
        }
        assert!(p.finish(T).0.success(), "{name}");
    }
}

/// Issue 11 #5, the tracked mode: an agent with `track_all = true` and the default exclusion
/// list tracks and marks `agent_work`, and never tracks nor marks the same program named
/// `ssh-agent` (its pages are the same as the marked ones, so only the exclusion stops it).
///
/// The agent and both programs run as a uid of their own (when the tests run as root), as a
/// user's agent runs: a `track_all` agent of that uid meets only this test's programs.
#[test]
fn default_exclusion_holds_for_a_track_all_agent() {
    // SAFETY: geteuid has no preconditions.
    let uid = (unsafe { libc::geteuid() } == 0).then_some(TRACK_ALL_UID);
    let policy = FAST_POLICY
        .replace("track = [\"agent_work\"]", "track_all = true")
        .replace(
            "unmerge_after_full_scans = 3",
            "unmerge_after_full_scans = 1000000",
        );
    let agent = Agent::start_as(&policy, uid);
    let s = agent.status();
    assert_eq!(s["policy"]["track_all"], true, "{s}");
    assert!(
        s["policy"]["exclude"]
            .as_array()
            .is_some_and(|e| e.iter().any(|n| n == "ssh-agent")),
        "{s}"
    );
    let (secret, ls) = agent.workload("ssh-agent", &["dense", "4"]);
    let work = tracked_work_marked(&agent);
    let s = agent.wait("ssh-agent refused as excluded", T, |s| {
        (u(&s["agent"]["excluded"]) >= 1).then(|| s.clone())
    });
    assert!(find(&s, secret.pid()).is_none(), "{s}");
    assert_eq!(u(&s["agent"]["excluded"]), 1, "{}", s["agent"]);
    let ch = ShimChannel::wait(secret.pid(), T);
    ch.wait_for("ssh-agent's verdict IGNORE", T, |c| {
        (c.verdict == verdict::IGNORE).then_some(())
    });
    // A few more rounds of the agent (it marks what it tracks within them), then nothing of
    // ssh-agent is marked.
    // (Rounds over agent_work's all-marked region read residency only, no page.)
    let w = agent.wait("two more rounds on agent_work", T, |s| {
        find(s, work.pid()).map(|p| u(&p["residency_queries"]))
    });
    agent.wait("agent_work sampled again", T, |s| {
        find(s, work.pid()).and_then(|p| (u(&p["residency_queries"]) > w).then_some(()))
    });
    assert_eq!(mergeable_vmas(secret.pid()), Vec::<String>::new());
    assert!(!any_mergeable(secret.pid(), num_field(&ls, "a"), 4 << 20));
    assert!(!procfs::ksm_stat(secret.pid()).mergeable);
    assert!(secret.finish(T).0.success());
    assert!(work.finish(T).0.success());
}

/// A uid no account uses, for [`default_exclusion_holds_for_a_track_all_agent`].
const TRACK_ALL_UID: u32 = 64_977;

#[test]
fn volatile_pages_are_never_marked() {
    // ksmd is not ours here (another test may run it): never unmark for lack of merging.
    let agent = Agent::start(&FAST_POLICY.replace(
        "unmerge_after_full_scans = 3",
        "unmerge_after_full_scans = 1000000",
    ));
    let (vol, lv) = agent.workload("agent_work", &["volatile", "8"]);
    let (dense, _) = agent.workload("agent_work", &["dense", "4"]);
    let a = num_field(&lv, "a");
    // Same content in every page at any instant, but rewritten continuously.
    let m1 = procfs::read_mem(vol.pid(), a, 8192);
    assert_eq!(m1[8..4096], m1[4096 + 8..]);
    let st = agent.wait("the volatile region's schedule to run out", T, |s| {
        let p = find(s, vol.pid())?;
        assert_eq!(u(&p["marked_bytes"]), 0, "volatile pages marked: {p}");
        let d = find(s, dense.pid())?;
        (u(&p["regions"]) > 0
            && u(&p["regions_dropped"]) == u(&p["regions"])
            && u(&d["marked_bytes"]) >= 4 << 20)
            .then(|| p.clone())
    });
    assert_eq!(u(&st["runs_marked"]), 0, "{st}");
    assert_eq!(u(&st["fingerprints"]), 0, "{st}");
    assert!(u(&st["fingerprinted_pages"]) > 2048, "{st}");
    assert!(!any_mergeable(vol.pid(), a, 8 << 20));
    let m2 = procfs::read_mem(vol.pid(), a, 8);
    assert_ne!(m1[..8], m2[..], "the workload did not rewrite its pages");
    assert!(vol.finish(T).0.success());
    assert!(dense.finish(T).0.success());
}

/// A marked region the program moves with mremap keeps its mark: the kernel moves the
/// VM_MERGEABLE flag with the pages, and the agent moves its runs with the region instead of
/// forgetting them (and marking again).
#[test]
fn a_marked_region_moved_by_mremap_stays_marked() {
    let agent = Agent::start(&FAST_POLICY.replace(
        "unmerge_after_full_scans = 3",
        "unmerge_after_full_scans = 1000000",
    ));
    let (mut p, line) = agent.workload("agent_work", &["moved", "4"]);
    let pid = p.pid();
    let a = num_field(&line, "a");
    let st = agent.wait("the region marked", T, |s| {
        find(s, pid)
            .filter(|x| u(&x["marked_bytes"]) >= 4 << 20)
            .cloned()
    });
    assert!(any_mergeable(pid, a, 4 << 20));
    let (runs, regions) = (u(&st["runs_marked"]), u(&st["regions"]));
    let r = p.cmd("move", T);
    let b = num_field(&r, "b");
    assert_ne!(a, b, "{r}");
    // The program's pages really moved, intact, with their flag.
    let mem = procfs::read_mem(pid, b, 4 << 20);
    assert!(mem.iter().enumerate().all(|(i, &x)| x == i as u8));
    assert!(any_mergeable(pid, b, 4 << 20));
    let st = agent.wait("the later block registered", T, |s| {
        find(s, pid).filter(|x| u(&x["regions"]) > regions).cloned()
    });
    assert!(u(&st["marked_bytes"]) >= 4 << 20, "mark forgotten: {st}");
    assert_eq!(u(&st["runs_marked"]), runs, "marked again: {st}");
    assert_eq!(u(&st["madvise_errors"]), 0, "{st}");
    assert!(p.finish(T).0.success());
}

#[test]
fn bad_policy_on_reload_keeps_the_old_one_and_add_remove_edit_the_file() {
    let agent = Agent::start("# the user's own comment\ntrack = [\"agent_work\"] # tracked\n");
    // add / remove persist to the file, keep comments, and reload.
    let o = agent.ctl(&["add", "okular"]);
    assert!(o.status.success(), "{o:?}");
    let text = std::fs::read_to_string(&agent.policy).unwrap();
    assert!(
        text.contains("# the user's own comment") && text.contains("# tracked"),
        "{text}"
    );
    assert!(text.contains("\"okular\""), "{text}");
    let s = agent.status();
    assert_eq!(
        s["policy"]["track"],
        serde_json::json!(["agent_work", "okular"])
    );
    let o = agent.ctl(&["remove", "agent_work", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        agent.status()["policy"]["track"],
        serde_json::json!(["okular"])
    );

    // A bad file: reload fails with file:line, the old policy stays.
    std::fs::write(&agent.policy, "track = [\"x\"]\n[sampling]\nstpe = 10\n").unwrap();
    let o = agent.ctl(&["reload"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    let want = format!("{}:3:", agent.policy.display());
    assert!(err.contains(&want) && err.contains("stpe"), "{err}");
    assert_eq!(
        agent.status()["policy"]["track"],
        serde_json::json!(["okular"])
    );
    // Same through SIGHUP: the agent logs it and keeps serving with the old policy.
    // SAFETY: kill on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    let s = agent.status();
    assert_eq!(s["policy"]["track"], serde_json::json!(["okular"]));
    // A type error names the key.
    std::fs::write(&agent.policy, "\nmin_region_bytes = \"big\"\n").unwrap();
    let o = agent.ctl(&["reload", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = v["error"].as_str().unwrap();
    assert!(e.contains(":2:") && e.contains("min_region_bytes"), "{e}");
    // A good file is taken.
    std::fs::write(&agent.policy, "track_all = true\n").unwrap();
    assert!(agent.ctl(&["reload"]).status.success());
    assert_eq!(agent.status()["policy"]["track_all"], true);
    assert!(agent.log().contains("reload refused"), "{}", agent.log());
}
