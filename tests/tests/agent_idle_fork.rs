//! A fork child of a tracked program that runs no allocator or mapping hook after the fork (it
//! sits in a system call) has no channel yet: `status` lists it as `pending`, and once it
//! allocates it is tracked like any fork child — also after the agent stopped polling for it.
mod agent_support;
use agent_support::find;
use ksmplus_tests::num_field;
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
