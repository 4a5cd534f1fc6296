//! The shim against its agent: absent, unreachable, killed and restarted (full resync), foreign
//! uid; and the commands an agent sends (Madvise, Fingerprint, GetStats) checked against what the
//! kernel shows in `/proc/PID/{smaps,mem,pagemap}`.
//!
//! Needs `cargo build -p ksmplus-preload` first (see `ksmplus_tests::shim_lib`).
use ksmplus_common::protocol::{Advice, Message, Origin, PageHash, Status};
use ksmplus_tests::shim::command;
use ksmplus_tests::{compile, num_field, page_size, procfs, HarnessAgent, Interactive, ShimMode};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
/// Reconnection back-off grows to a few seconds: allow several rounds of it.
const RECONNECT: Duration = Duration::from_secs(30);

fn on(socket: &Path) -> ShimMode {
    ShimMode::On {
        socket: socket.to_owned(),
    }
}

fn driver(mode: &ShimMode) -> Interactive {
    let mut p = Interactive::spawn(&mut command(compile("shim_driver"), mode));
    let pid = num_field(&p.cmd("pid", T), "pid") as u32;
    assert_eq!(pid, p.pid());
    p
}

/// Live shim-owned blocks of a scripted session: `(ptr, requested size)`.
type Blocks = Vec<(u64, u64)>;

/// The same deterministic allocation script in three phases; `between(phase, pid, blocks)` runs
/// after phases 0 and 1. Returns the program's non-pointer output (sums, zero checks, exit).
fn scripted(mode: &ShimMode, mut between: impl FnMut(usize, u32, &Blocks)) -> Vec<String> {
    let mut p = driver(mode);
    let pid = p.pid();
    let mut out = Vec::new();
    let mut blocks: Blocks = Vec::new();
    for phase in 0..3u64 {
        for (i, size) in [100_000u64, 1 << 20, 3000, 5 << 20].into_iter().enumerate() {
            let kind = if i % 2 == 0 { "malloc" } else { "calloc" };
            let ptr = num_field(&p.cmd(&format!("{kind} {size}"), T), "ptr");
            assert_ne!(ptr, 0);
            if kind == "calloc" {
                out.push(p.cmd(&format!("zero {ptr} {size}"), T));
            }
            out.push(p.cmd(&format!("fill {ptr} {size} {}", phase * 10 + i as u64), T));
            blocks.push((ptr, size));
        }
        let m = num_field(&p.cmd("mmap 2097152", T), "ptr");
        out.push(p.cmd(&format!("fill {m} 2097152 {phase}"), T));
        blocks.push((m, 2 << 20));
        // Free one block per phase so the registry changes while the agent may be away.
        let (ptr, size) = blocks.remove(0);
        out.push(p.cmd(&format!("sum {ptr} {size}"), T));
        let gone = if size == 2 << 20 {
            p.cmd(&format!("munmap {ptr} {size}"), T)
        } else {
            p.cmd(&format!("free {ptr}"), T)
        };
        out.push(gone.replace(&format!("{ptr:#x}"), "P"));
        if phase < 2 {
            between(phase as usize, pid, &blocks);
        }
    }
    for (ptr, size) in &blocks {
        out.push(p.cmd(&format!("sum {ptr} {size}"), T));
    }
    let (status, rest) = p.finish(T);
    out.push(format!("{status:?}"));
    out.extend(rest);
    out
}

fn baseline() -> Vec<String> {
    scripted(&ShimMode::Off, |_, _, _| {})
}

#[test]
fn agent_absent_unreachable_or_bad_path_changes_nothing() {
    let want = baseline();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let cases: Vec<(&str, PathBuf)> = vec![
        ("no listener", dir.path().join("agent.sock")),
        ("nonexistent dir", dir.path().join("no/such/dir/agent.sock")),
        ("parent is a file", file.join("agent.sock")),
        ("not a socket", file.clone()),
        ("path too long", dir.path().join("x".repeat(200))),
    ];
    for (what, path) in cases {
        let mut p = driver(&on(&path));
        // Stays silent without KSMPLUS_LOG.
        assert!(p.cmd("malloc 200000", T).starts_with("ptr=0x"));
        assert_eq!(p.stderr(), "", "{what}: the shim wrote to stderr");
        drop(p);
        assert_eq!(scripted(&on(&path), |_, _, _| {}), want, "{what}");
    }
}

#[test]
fn disabled_shim_is_pass_through() {
    let want = baseline();
    let agent = HarnessAgent::start();
    let mut p = Interactive::spawn(&mut command(compile("shim_driver"), &ShimMode::Disabled));
    let r = p.cmd("malloc 200000", T);
    // glibc's mmapped chunk starts 16 bytes into its page: not a shim block.
    assert_ne!(num_field(&r, "ptr") % page_size(), 0, "{r}");
    drop(p);
    assert_eq!(scripted(&ShimMode::Disabled, |_, _, _| {}), want);
    assert!(agent.state().clients.is_empty());
}

#[test]
fn ignore_makes_the_shim_dormant() {
    let want = baseline();
    let agent = HarnessAgent::start();
    agent.set_answer(ksmplus_tests::HelloAnswer::Ignore);
    let got = scripted(&on(agent.socket_path()), |_, pid, _| {
        agent.wait_hello(pid, T);
    });
    assert_eq!(got, want);
    let st = agent.state();
    assert_eq!(st.clients.len(), 1, "a dormant shim never reconnects");
    assert!(
        !st.clients[0]
            .messages
            .iter()
            .any(|m| matches!(m, Message::RegionAdded { .. })),
        "events after Ignore: {:?}",
        st.clients[0].messages
    );
}

#[test]
fn silent_agent_does_not_block_the_program() {
    let want = baseline();
    let agent = HarnessAgent::start();
    agent.set_answer(ksmplus_tests::HelloAnswer::Silent);
    let got = scripted(&on(agent.socket_path()), |_, pid, _| {
        agent.wait_hello(pid, T);
    });
    assert_eq!(got, want);
}

/// Asserts the client's last complete resync lists exactly the live blocks (shim-owned ones
/// rounded to pages) and that ResyncEnd's count matches.
fn assert_resync_covers(agent: &HarnessAgent, pid: u32, blocks: &Blocks) {
    let ps = page_size();
    let st = agent.state();
    let c = st.client_of_pid(pid).unwrap();
    let (regions, announced) = c.last_resync().unwrap();
    assert_eq!(regions.len() as u64, announced, "ResyncEnd count");
    for &(ptr, size) in blocks {
        if size < 65536 {
            continue;
        }
        let want_origin = if size == 2 << 20 {
            Origin::Mmap
        } else {
            Origin::Malloc
        };
        assert!(
            regions.iter().any(|&(s, l, o)| s == ptr
                && l >= size
                && l < size.div_ceil(ps) * ps + ps
                && o == want_origin),
            "live block {ptr:#x}+{size} ({want_origin:?}) missing from resync {regions:x?}"
        );
    }
    assert!(
        c.seqs().windows(2).all(|w| w[0] < w[1]),
        "seq not increasing within a connection"
    );
}

#[test]
fn agent_killed_and_restarted_gets_full_resync() {
    let want = baseline();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let mut agent = Some(HarnessAgent::start_at(&path));
    let mut pid = 0;
    let got = scripted(&on(&path), |phase, p, blocks| match phase {
        0 => {
            pid = p;
            let a = agent.as_ref().unwrap();
            a.wait_synced(pid, T);
            // Everything allocated so far reaches the first agent live.
            a.wait_for("phase-0 blocks registered", T, |s| {
                let c = s.client_of_pid(pid)?;
                blocks
                    .iter()
                    .filter(|b| b.1 >= 65536)
                    .all(|b| c.region_containing(b.0).is_some())
                    .then_some(())
            });
            agent = None; // the agent dies; phase 1 runs without one
        }
        _ => {
            let a = HarnessAgent::start_at(&path);
            a.wait_synced(pid, RECONNECT);
            assert_resync_covers(&a, pid, blocks);
            agent = Some(a);
        }
    });
    assert_eq!(got, want);
    // Phase 2 ran with the restarted agent: its events arrived live, after the resync.
    let a = agent.unwrap();
    let st = a.state();
    let c = st.client_of_pid(pid).unwrap();
    let end = c
        .messages
        .iter()
        .rposition(|m| matches!(m, Message::ResyncEnd { .. }))
        .unwrap();
    let live_adds = c.messages[end..]
        .iter()
        .filter(|m| matches!(m, Message::RegionAdded { .. }))
        .count();
    assert!(
        live_adds >= 3,
        "phase-2 allocations not reported live after the resync: {:?}",
        &c.messages[end..]
    );
}

#[test]
fn foreign_uid_agent_is_not_talked_to() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to start an agent as nobody");
        return;
    }
    let want = baseline();
    let dir = tempfile::tempdir().unwrap();
    let sockdir = dir.path().join("sock");
    std::fs::create_dir(&sockdir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.path(), &sockdir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let path = sockdir.join("agent.sock");
    // User nobody must be able to reach the binary: the checkout may sit in a directory only
    // root can enter (e.g. under /root), so run a copy from the world-readable temp dir.
    let exe = dir.path().join("harness-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_harness-agent"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = std::process::Command::new(&exe);
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    cmd.arg(&path);
    let mut agent = Interactive::spawn(&mut cmd);
    assert_eq!(agent.line(T), "listening", "{}", agent.stderr());
    let got = scripted(&on(&path), |phase, _, _| {
        if phase == 0 {
            // The shim did try this socket (so the check below is not vacuous).
            assert_eq!(agent.line(RECONNECT), "accepted=1");
        }
    });
    assert_eq!(got, want);
    let (status, lines) = agent.finish(T);
    assert!(status.success());
    let clients: Vec<&String> = lines.iter().filter(|l| l.starts_with("client=")).collect();
    assert!(!clients.is_empty(), "{lines:?}");
    for c in clients {
        assert!(
            c.contains("pid=-1 msgs=0"),
            "the shim talked to an agent of another uid: {c}"
        );
    }
}

/// A driver under the shim with a harness agent, synced.
fn tracked() -> (HarnessAgent, Interactive, usize) {
    let agent = HarnessAgent::start();
    let p = driver(&on(agent.socket_path()));
    let idx = agent.wait_synced(p.pid(), T);
    (agent, p, idx)
}

#[test]
fn madvise_subrange_splits_vma_at_exact_bounds() {
    let (agent, mut p, idx) = tracked();
    let ps = page_size();
    let size = 4 << 20;
    let a = num_field(&p.cmd(&format!("malloc {size}"), T), "ptr");
    p.cmd(&format!("fill {a} {size} 1"), T);
    agent.wait_for("region registered", T, |s| {
        s.clients[idx].region_containing(a)
    });
    let (lo, hi) = (a + 16 * ps, a + 48 * ps);
    assert_eq!(
        agent.madvise(idx, lo, hi - lo, Advice::Mergeable, T),
        Status::Ok
    );
    let pid = p.pid();
    let inside = procfs::vma_containing(pid, lo).unwrap();
    assert_eq!((inside.start, inside.end), (lo, hi), "{inside:?}");
    assert!(inside.has_flag("mg"), "{inside:?}");
    let before = procfs::vma_containing(pid, lo - 1).unwrap();
    assert_eq!(before.end, lo);
    assert!(!before.has_flag("mg"), "{before:?}");
    let after = procfs::vma_containing(pid, hi).unwrap();
    assert_eq!(after.start, hi);
    assert!(!after.has_flag("mg"), "{after:?}");
    // And back.
    assert_eq!(
        agent.madvise(idx, lo, hi - lo, Advice::Unmergeable, T),
        Status::Ok
    );
    assert!(!procfs::vma_containing(pid, lo).unwrap().has_flag("mg"));
    // The content was not disturbed.
    assert_eq!(
        p.cmd(&format!("sum {a} {size}"), T),
        format!(
            "sum={:016x}",
            procfs::fnv1a(&procfs::read_mem(pid, a, size as usize))
        )
    );
    let stats = agent.stats(idx, T);
    assert!(stats.madvise_calls >= 2, "{stats:?}");
    assert!(
        stats.regions >= 1 && stats.region_bytes >= size,
        "{stats:?}"
    );
}

#[test]
fn madvise_outside_registered_regions_is_refused() {
    let (agent, mut p, idx) = tracked();
    let ps = page_size();
    let a = num_field(&p.cmd("malloc 1048576", T), "ptr");
    p.cmd(&format!("fill {a} 1048576 1"), T);
    let small = num_field(&p.cmd("malloc 100", T), "ptr");
    agent.wait_for("region registered", T, |s| {
        s.clients[idx].region_containing(a)
    });
    let (start, len, _) = agent.state().clients[idx].region_containing(a).unwrap();
    let pid = p.pid();
    let small_page = small & !(ps - 1);
    let cases = [
        ("glibc heap page", small_page, ps, Status::NotRegistered),
        (
            "straddles the region's end",
            start + len - ps,
            2 * ps,
            Status::NotRegistered,
        ),
        ("before the region", start - ps, ps, Status::NotRegistered),
        ("unmapped low address", 0x10000, ps, Status::NotRegistered),
        ("unaligned start", a + 1, ps, Status::Invalid),
        ("empty", a, 0, Status::Invalid),
    ];
    for (what, s, l, want) in cases {
        let got = agent.madvise(idx, s, l, Advice::Mergeable, T);
        assert_eq!(got, want, "{what}: {s:#x}+{l:#x}");
    }
    for v in procfs::smaps(pid) {
        assert!(!v.has_flag("mg"), "a refused madvise marked {v:?}");
    }
    drop(p);
}

#[test]
fn fingerprint_matches_page_content_and_never_faults_pages_in() {
    let (agent, mut p, idx) = tracked();
    let ps = page_size();
    let pid = p.pid();
    let pages = 256usize;
    let a = num_field(&p.cmd(&format!("malloc {}", pages as u64 * ps), T), "ptr");
    // Touch the first half only, each page different.
    p.cmd(&format!("fillpages {a} {}", pages / 2), T);
    agent.wait_for("region registered", T, |s| {
        s.clients[idx].region_containing(a)
    });
    let present_before = procfs::pages_present(pid, a, pages);
    assert!(present_before[..pages / 2].iter().all(|&x| x));
    assert!(!present_before[pages / 2..].iter().any(|&x| x));

    let addrs: Vec<u64> = (0..pages as u64).map(|k| a + k * ps).collect();
    let (status, hashes) = agent.fingerprint(idx, addrs, T);
    assert_eq!(status, Status::Ok);
    assert_eq!(hashes.len(), pages);
    let want = procfs::page_hashes(pid, a, pages / 2);
    for k in 0..pages / 2 {
        assert_eq!(hashes[k], PageHash::Hash(want[k]), "page {k}");
    }
    for (k, h) in hashes.iter().enumerate().skip(pages / 2) {
        assert_eq!(*h, PageHash::NotResident, "page {k}");
    }
    // Distinct pages got distinct hashes (the content really differs per page).
    let mut uniq = want.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), pages / 2);
    assert_eq!(
        procfs::pages_present(pid, a, pages),
        present_before,
        "fingerprinting faulted untouched pages in"
    );

    // Pages outside every region: Unavailable, and no crash.
    let small = num_field(&p.cmd("malloc 100", T), "ptr") & !(ps - 1);
    let (status, hashes) = agent.fingerprint(idx, vec![small, 0x10000, a + 4096 * ps], T);
    assert_eq!(status, Status::Ok);
    assert_eq!(hashes, [PageHash::Unavailable; 3]);
    // A region freed meanwhile: its pages become Unavailable.
    assert_eq!(p.cmd(&format!("free {a}"), T), "ok");
    agent.wait_for("region removed", T, |s| {
        s.clients[idx].region_containing(a).is_none().then_some(())
    });
    let (_, hashes) = agent.fingerprint(idx, vec![a], T);
    assert_eq!(hashes, [PageHash::Unavailable]);
    let stats = agent.stats(idx, T);
    assert!(stats.fingerprint_pages >= pages as u64 / 2, "{stats:?}");
    assert!(p.finish(T).0.success());
}
