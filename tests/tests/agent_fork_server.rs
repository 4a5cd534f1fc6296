//! A learned fork server's first children inherit merge-any. Chromium's zygote forks its
//! children right after start; `PR_SET_MEMORY_MERGE` reaches only children forked after the
//! parent ran it. The agent posts a learned fork server's merge-any before it writes the
//! verdict, and the shim, before a fork (a `pthread_atfork` prepare handler, or its `syscall`
//! hook for a raw clone without `CLONE_VM`), waits briefly for the verdict of its own Hello and
//! runs the waiting batch — so even a fork in the first instruction of `main` inherits the mode.
//! Needs no ksmd: the mode is a flag of the process (`PR_GET_MEMORY_MERGE`).
mod agent_support;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
/// Runs per fork flavour: without the fix every run lost, but one run could win by chance.
const RUNS: usize = 5;

fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn a_learned_fork_servers_first_child_inherits_merge_any() {
    let mut agent = agent_support::tracking(&["forkmerge"]);
    let exe = agent.program("shim_forkmerge", "forkmerge");
    // The key of a program run without `--flags` is its executable.
    agent.learn_fork_server(&exe.to_string_lossy());
    let mut lost = Vec::new();
    for how in ["fork", "clone"] {
        for run in 0..RUNS {
            let (p, child) = agent.run_under_shim(&exe, &[how]);
            let (st, rest) = p.finish(T);
            assert!(st.success(), "{how} run {run}: {st:?} {rest:?}");
            let parent = rest.first().cloned().unwrap_or_default();
            // The agent did switch the mode on in the fork server: the test is not vacuous.
            assert_eq!(
                field(&parent, "merge_any"),
                1,
                "{how} run {run}: {parent}; agent log:\n{}",
                agent_support::tail(&agent.log(), 3000)
            );
            assert_eq!(field(&parent, "status"), 0, "{parent}");
            if field(&child, "merge_any") != 1 {
                lost.push(format!("{how} run {run}: {child}"));
            }
        }
    }
    assert!(
        lost.is_empty(),
        "children forked before their parent's merge-any ran: {lost:#?}"
    );
}
