//! A program the policy names and the agent may not read is listed by `status` with the reason
//! (not silently missing), and forgotten once it exits.
//!
//! The program's executable is not readable by its user, so the kernel makes the process
//! non-dumpable at exec: the same user's agent may then not open its `/proc/PID/mem` — as for
//! a setuid-style program, or (under Yama `ptrace_scope` 2) every program.
mod agent_support;
use agent_support::{find, workload_named, Agent, FAST_POLICY};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
/// A uid of this test's own, so its agent meets only this test's programs.
const UID: u32 = 64_978;

fn unreadable_entry(s: &Value, pid: u32) -> Option<Value> {
    s["unreadable"]
        .as_array()?
        .iter()
        .find(|u| u["pid"].as_u64() == Some(pid as u64))
        .cloned()
}

#[test]
fn a_tracked_program_the_agent_cannot_read_is_listed_with_the_reason() {
    if !ksmplus_tests::ksmd::require_root(
        "needs root, to run the agent and its programs as another user",
    ) {
        return;
    }
    let policy = FAST_POLICY.replace(
        "track = [\"agent_work\"]",
        "track = [\"agent_work\", \"sealed_work\"]",
    );
    let agent = Agent::start_as(&policy, Some(UID));
    // Owned by root, executable but not readable by UID.
    let sealed_exe = agent.dir.path().join("bin/sealed_work");
    std::fs::copy(workload_named("agent_work"), &sealed_exe).unwrap();
    std::fs::set_permissions(&sealed_exe, std::fs::Permissions::from_mode(0o711)).unwrap();

    let (sealed, line) = agent.run_under_shim(&sealed_exe, &["dense", "4"]);
    assert!(line.starts_with("a="), "sealed_work did not run: {line}");
    let (work, _) = agent.workload("agent_work", &["dense", "4"]);

    let s = agent.wait("sealed_work listed as unreadable", T, |s| {
        unreadable_entry(s, sealed.pid()).map(|_| s.clone())
    });
    let u = unreadable_entry(&s, sealed.pid()).unwrap();
    assert_eq!(u["comm"], "sealed_work", "{u}");
    let reason = u["reason"].as_str().unwrap_or("");
    assert!(reason.contains("not dumpable"), "reason: {reason}");
    assert!(
        find(&s, sealed.pid()).is_none(),
        "an unreadable process is not tracked: {s}"
    );
    // The readable program of the same user is tracked as usual.
    agent.wait("agent_work tracked", T, |s| find(s, work.pid()).map(|_| ()));
    // The text status says it too.
    let out = agent.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("cannot track pid {}", sealed.pid())),
        "{text}"
    );

    let pid = sealed.pid();
    assert!(sealed.finish(T).0.success());
    agent.wait("the exited program forgotten", T, |s| {
        unreadable_entry(s, pid).is_none().then_some(())
    });
    assert!(work.finish(T).0.success());
}
