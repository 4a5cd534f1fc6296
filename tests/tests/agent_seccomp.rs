//! A tracked program under a seccomp filter is never sent KSM advice: a filter may kill a
//! process for a system call it does not expect (Firefox's utility processes die of SIGSYS on
//! `madvise(MADV_MERGEABLE)`), and nothing can ask a filter what it would do. The program here
//! installs such a filter (kill on MADV_MERGEABLE) after the shim's Hello, over a region of
//! identical pages the agent would otherwise mark; it must live, and `status` must say why it
//! is not advised, while a filter-free program beside it is marked as usual.
mod agent_support;
use agent_support::find;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn a_process_under_a_seccomp_filter_is_never_advised_and_lives() {
    let agent = agent_support::tracking(&["agent_work", "agent_seccomp"]);
    let exe = agent.program("agent_seccomp", "agent_seccomp");
    let (filtered, line) = agent.run_under_shim(&exe, &["8"]);
    assert!(line.contains("filtered=1"), "{line}");
    let (work, _) = agent.workload("agent_work", &["dense", "8"]);

    // The filter-free program gets its duplicates marked: the agent is at work...
    agent.wait("agent_work marked", T, |s| {
        find(s, work.pid())
            .filter(|p| u(&p["marked_bytes"]) >= 4 << 20)
            .map(|_| ())
    });
    // ... and the filtered one is known as such, with the reason, and nothing marked.
    let s = agent.wait("agent_seccomp known to be filtered", T, |s| {
        find(s, filtered.pid())
            .filter(|p| p["marking"] == "refused")
            .cloned()
    });
    let note = s["marking_note"].as_str().unwrap_or_default();
    assert!(note.contains("seccomp"), "{s}");
    assert_eq!(u(&s["marked_bytes"]), 0, "{s}");
    // Alive: the kill-on-MADV_MERGEABLE filter never fired.
    let (st, _) = filtered.finish(T);
    assert!(st.success(), "the filtered program ended with {st:?}");
    assert!(work.finish(T).0.success());
}

/// A filter the process was exec'd with — a launcher's, as bubblewrap installs for WebKit's web
/// processes — does not stop the agent: the shim reads `Seccomp_filters` at start, and while the
/// process adds no filter of its own its duplicates are marked as anywhere else.
#[test]
fn a_filter_inherited_at_exec_does_not_stop_marking() {
    let agent = agent_support::tracking(&["agent_seccomp"]);
    let exe = agent.program("agent_seccomp", "agent_seccomp");
    let (p, line) = agent.run_under_shim(&exe, &["launch", "8"]);
    assert!(line.contains("inherited=1"), "{line}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    assert!(
        status.contains("Seccomp:\t2") && status.contains("Seccomp_filters:\t1"),
        "{status}"
    );
    let s = agent.wait(
        "the exec'd program marked under its inherited filter",
        T,
        |s| {
            find(s, p.pid())
                .filter(|q| u(&q["marked_bytes"]) >= 4 << 20)
                .cloned()
        },
    );
    assert_eq!(s["marking"], "marks", "{s}");
    let (st, _) = p.finish(T);
    assert!(st.success(), "{st:?}");
}
