//! ksmplusctl's contract with a running agent (issue 13): the status text shows tracked,
//! untracked and ignored programs within 100 columns; `--json` replies parse into their types
//! and `ok` matches the exit status (0 done, 1 refused, 3 not running); `--socket`/`--json`
//! before the subcommand still work; names in hints are quoted for the shell.
//!
//! Needs the binaries of the same target dir (`cargo build --workspace`) and a C compiler.
mod agent_support;
mod ctl_support;

use agent_support::{bin, Agent};
use ksmplus_common::status::{SimpleReply, StatusReply};
use std::process::Command;
use std::time::Duration;

const POLICY: &str = "track = [\"agent_work\"]\nmin_region_bytes = 1048576\n";

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn status_text_shows_tracked_untracked_and_ignored_programs() {
    let agent = Agent::start(POLICY);
    let (work, _) = agent.workload("agent_work", &["dense", "4"]);
    let (other, _) = agent.workload("agent_other", &["dense", "4"]);
    let (wp, op) = (work.pid(), other.pid());
    agent.wait("one tracked, one untracked", Duration::from_secs(30), |s| {
        let tracked = agent_support::find(s, wp).is_some();
        (tracked && s["agent"]["peers"]["untracked"] == 1).then_some(())
    });
    let o = agent.ctl(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let text = stdout(&o);
    let rows: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim_start().starts_with("TOTAL"))
        .collect();
    assert!(
        rows.iter()
            .any(|l| l.trim_start().starts_with(&format!("{wp} "))),
        "{text}"
    );
    assert!(
        !rows
            .iter()
            .any(|l| l.trim_start().starts_with(&format!("{op} "))),
        "an untracked program in the table:\n{text}"
    );
    ksmplus_tests::assert_contains_all(
        &text,
        &[
            "1 tracked",
            "1 untracked (not in the policy",
            "1 ignored (not in the policy)",
            "`ksmplusctl add NAME`",
        ],
        "the status",
    );
    ctl_support::assert_fits_100_columns(&text, agent.dir.path());
    // The typed reply agrees.
    let st: StatusReply = serde_json::from_slice(&agent.ctl(&["status", "--json"]).stdout).unwrap();
    assert!(st.ok);
    assert_eq!((st.agent.peers.tracked, st.agent.peers.untracked), (1, 1));
    assert_eq!(st.agent.ignored, 1);
    drop((work, other));
}

#[test]
fn ok_matches_the_exit_status_and_old_option_positions_work() {
    let agent = Agent::start(POLICY);
    // Refused by the agent: exit 1, ok false, the reason.
    let o = agent.ctl(&["add", "", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let r: SimpleReply = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!r.ok && r.version >= 2 && r.error.is_some(), "{r:?}");
    // Done: exit 0, ok true. A name that needs quoting is quoted in the text.
    let o = agent.ctl(&["add", "Web Content"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(
        stdout(&o).starts_with("'Web Content': added to "),
        "{}",
        stdout(&o)
    );
    let o = agent.ctl(&["remove", "Web Content", "--json"]);
    let r: SimpleReply = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r.ok && o.status.success() && r.changed == Some(true));
    // `ksmplusctl --socket S --json status` (agent_support and the bench still call it so).
    let o = agent.ctl(&["--json", "status"]);
    assert!(o.status.success());
    let st: StatusReply = serde_json::from_slice(&o.stdout).unwrap();
    assert!(st.ok);
    // Where it means nothing, the old position is refused as a usage error.
    let o = Command::new(bin("ksmplusctl"))
        .args(["--socket", "/nonexistent/s", "wrapped"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no --socket option"));

    // Agent gone: exit 3 for every agent subcommand, ok false under --json.
    let socket = agent.socket.clone();
    drop(agent);
    for args in [
        &["status"][..],
        &["add", "x"],
        &["remove", "x"],
        &["reload"],
    ] {
        let o = Command::new(bin("ksmplusctl"))
            .args(args)
            .arg("--json")
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(3), "{args:?}: {o:?}");
        let r: SimpleReply = serde_json::from_slice(&o.stdout).unwrap();
        assert!(!r.ok && r.error.unwrap().contains("not running"));
    }
    let o = Command::new(bin("ksmplusctl"))
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("systemctl --user start ksmplus-agentd"),
        "{err}"
    );
    // --version names the program, not the crate.
    let o = Command::new(bin("ksmplusctl"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(stdout(&o).starts_with("ksmplusctl "), "{}", stdout(&o));
}
