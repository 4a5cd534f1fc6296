//! A fork child of a tracked program that runs no allocator or mapping hook after the fork (it
//! sits in a system call) has no channel yet: `status` lists it as `pending`, and once it
//! allocates it is tracked like any fork child — also after the agent stopped polling for it.
mod agent_support;
use agent_support::find;
use ksmplus_tests::num_field;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn an_idle_fork_child_is_pending_then_tracked_when_it_allocates() {
    let agent = agent_support::tracking(&["forkchild"]);
    let exe = agent.program("shim_forkchild", "forkchild");
    let (mut p, line) = agent.run_under_shim(&exe, &["idle"]);
    assert!(line.starts_with("parent pid="), "{line}");
    let child = num_field(&p.line(T), "pid") as u32;

    let s = agent.wait("the idle child listed as pending", T, |s| {
        find(s, child)
            .filter(|c| c["marking"] == "pending")
            .cloned()
    });
    assert_eq!(s["found"], "fork", "{s}");
    // Whether the agent still polls for it or (after 20 tries) waits for the family's doorbell,
    // the child's first hook sets its channel up and rings the doorbell.
    assert!(p.cmd("go", T).starts_with("child active"));
    agent.wait("the child tracked after its first allocation", T, |s| {
        find(s, child)
            .filter(|c| c["marking"] != "pending" && c["found"] == "fork")
            .map(|_| ())
    });
    let (st, lines) = p.finish(T);
    assert!(st.success(), "{lines:?}");
}

fn walks(s: &Value) -> (u64, u64) {
    let a = &s["agent"];
    (
        a["family_walks"].as_u64().unwrap(),
        a["family_walks_skipped"].as_u64().unwrap(),
    )
}

/// A family's process tree is walked (the `children` of each of its threads read) only when a
/// process was born into it since the last walk: an idle family costs no walk, and a child
/// forked later, which never rings the doorbell (no hook runs in it), is still found.
#[test]
fn an_idle_family_is_walked_only_once_a_process_is_born_into_it() {
    let agent = agent_support::tracking(&["forkchild"]);
    let exe = agent.program("shim_forkchild", "forkchild");
    let (mut p, line) = agent.run_under_shim(&exe, &["idle-later"]);
    let parent = num_field(&line, "pid") as u32;
    agent.wait("the parent tracked", T, |s| find(s, parent).map(|_| ()));
    let (_, skipped) = walks(&agent.wait("a due walk skipped", T, |s| {
        (walks(s).1 >= 1).then(|| s.clone())
    }));
    let (w0, _) = walks(&agent.status());
    // A process born outside the family (and still alive when the agent looks) is no reason
    // to walk it.
    let mut outsider = std::process::Command::new("sleep")
        .arg("120")
        .spawn()
        .unwrap();
    let s = agent.wait("three more due walks skipped", T, |s| {
        (walks(s).1 >= skipped + 3).then(|| s.clone())
    });
    let _ = outsider.kill();
    let _ = outsider.wait();
    assert_eq!(
        walks(&s).0,
        w0,
        "no walk while nothing was born into the family: {}",
        s["agent"]
    );

    let child = num_field(&p.cmd("fork", T), "pid") as u32;
    let s = agent.wait("the child found by a walk", T, |s| {
        find(s, child).map(|_| s.clone())
    });
    assert!(walks(&s).0 > w0, "{}", s["agent"]);
    assert_eq!(find(&s, child).unwrap()["found"], "fork", "{s}");
    assert!(p.cmd("go", T).starts_with("child active"));
    let (st, lines) = p.finish(T);
    assert!(st.success(), "{lines:?}");
}
