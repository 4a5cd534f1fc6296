//! The shim's `Residency` command: the resident page runs of a registered range, from mincore,
//! checked against `/proc/PID/pagemap`; never faulting anything in; refused outside regions.
//!
//! Needs `cargo build -p ksmplus-preload` first (see `ksmplus_tests::shim_lib`).
use ksmplus_common::protocol::{Message, Status};
use ksmplus_tests::shim::command;
use ksmplus_tests::{compile, num_field, page_size, procfs, HarnessAgent, Interactive, ShimMode};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn residency(
    agent: &HarnessAgent,
    idx: usize,
    start: u64,
    len: u64,
) -> (Status, u64, Vec<(u64, u64)>) {
    match agent.request(idx, T, |id| Message::Residency { id, start, len }) {
        Message::ResidencyReply {
            status,
            covered,
            runs,
            ..
        } => (status, covered, runs),
        other => panic!("unexpected reply to Residency: {other:?}"),
    }
}

#[test]
fn residency_reports_exactly_the_present_pages() {
    let agent = HarnessAgent::start();
    let mut p = Interactive::spawn(&mut command(
        compile("shim_driver"),
        &ShimMode::On {
            socket: agent.socket_path().to_owned(),
        },
    ));
    let pid = num_field(&p.cmd("pid", T), "pid") as u32;
    let idx = agent.wait_synced(pid, T);
    let ps = page_size();
    let pages = 1024u64;
    let a = num_field(&p.cmd(&format!("mmap {}", pages * ps), T), "ptr");
    // Touch pages 0..100 and 300..310 (fillpages writes the first N pages of a block).
    p.cmd(&format!("fillpages {a} 100"), T);
    p.cmd(&format!("fillpages {} 10", a + 300 * ps), T);
    agent.wait_for("region registered", T, |s| {
        s.clients[idx].region_containing(a)
    });

    let (status, covered, runs) = residency(&agent, idx, a, pages * ps);
    assert_eq!(status, Status::Ok);
    assert_eq!(covered, pages * ps);
    assert_eq!(runs, vec![(a, 100 * ps), (a + 300 * ps, 10 * ps)]);
    // The kernel agrees, and nothing was faulted in by asking.
    let present = procfs::pages_present(pid, a, pages as usize);
    let n_present = present.iter().filter(|&&x| x).count();
    assert_eq!(n_present, 110, "residency query changed what is present");

    // A sub-range, and the refusals.
    let (_, _, runs) = residency(&agent, idx, a + 50 * ps, 300 * ps);
    assert_eq!(runs, vec![(a + 50 * ps, 50 * ps), (a + 300 * ps, 10 * ps)]);
    assert_eq!(residency(&agent, idx, a + 1, ps).0, Status::Invalid);
    assert_eq!(residency(&agent, idx, a, 0).0, Status::Invalid);
    assert_eq!(
        residency(&agent, idx, a, (pages + 1) * ps).0,
        Status::NotRegistered
    );
    assert_eq!(residency(&agent, idx, 0x10000, ps).0, Status::NotRegistered);
    assert!(p.finish(T).0.success());
}
