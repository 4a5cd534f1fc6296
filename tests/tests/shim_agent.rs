//! The shim and its agent: absent, unreachable, ignoring, silent, of another uid; commands an
//! agent writes into the channel page, executed by the shim from its hooks or from the wake-up
//! signal, checked against what the kernel shows in `/proc/PID/{smaps,mem,pagemap}`.
//!
//! Needs `cargo build -p ksmplus-preload` first (see `ksmplus_tests::shim_lib`).
use ksmplus_agentd::engine::PageHash;
use ksmplus_common::channel::{flag, op, verdict, Command};
use ksmplus_tests::shim::command;
use ksmplus_tests::{
    compile, num_field, page_size, procfs, HarnessAgent, HelloAnswer, Interactive, ShimChannel,
    ShimMode,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

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

/// Live blocks of a scripted session: `(ptr, requested size)`.
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
        // Stays silent without KSMPLUS_LOG, and still page-aligns (an agent started later
        // adopts the process).
        let r = p.cmd("malloc 200000", T);
        assert_eq!(num_field(&r, "ptr") % page_size(), 0, "{what}: {r}");
        assert_eq!(p.stderr(), "", "{what}: the shim wrote to stderr");
        let ch = ShimChannel::wait(p.pid(), T);
        assert_eq!(ch.snapshot().verdict, verdict::PENDING, "{what}");
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
    assert!(
        ShimChannel::of(p.pid()).is_none(),
        "no channel when disabled"
    );
    drop(p);
    assert_eq!(scripted(&ShimMode::Disabled, |_, _, _| {}), want);
    assert_eq!(agent.state().accepted, 0);
}

/// An ignored program's shim goes pass-through at its next call and never calls the agent
/// again (one Hello per run, even though the agent closes the connection at once).
#[test]
fn ignore_makes_the_shim_dormant_after_one_hello() {
    let want = baseline();
    let agent = HarnessAgent::start();
    agent.set_answer(HelloAnswer::Ignore);
    let mut pids = Vec::new();
    let got = scripted(&on(agent.socket_path()), |phase, pid, _| {
        agent.wait_hello(pid, T);
        if phase == 0 {
            pids.push(pid);
        }
    });
    assert_eq!(got, want);
    let mut p = driver(&on(agent.socket_path()));
    agent.wait_hello(p.pid(), T);
    let r = p.cmd("malloc 200000", T);
    assert_ne!(
        num_field(&r, "ptr") % page_size(),
        0,
        "dormant: glibc's block, {r}"
    );
    let s = ShimChannel::wait(p.pid(), T).snapshot();
    assert!(s.flags & flag::DORMANT != 0, "{s:?}");
    assert_eq!(s.cache_bytes, 0);
    drop(p);
    let st = agent.state();
    assert_eq!(
        st.hellos.len(),
        2,
        "one Hello per program run: {:?}",
        st.hellos
    );
    assert_eq!(st.accepted, 2);
}

#[test]
fn silent_agent_does_not_block_the_program() {
    let want = baseline();
    let agent = HarnessAgent::start();
    agent.set_answer(HelloAnswer::Silent);
    let got = scripted(&on(agent.socket_path()), |_, pid, _| {
        agent.wait_hello(pid, T);
    });
    assert_eq!(got, want);
}

#[test]
fn foreign_uid_agent_is_not_talked_to() {
    if !ksmplus_tests::ksmd::require_root("needs root to start an agent as nobody") {
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
            // The shim did connect (so the check below is not vacuous)...
            assert_eq!(agent.line(T), "accepted=1");
        }
    });
    assert_eq!(got, want);
    let (status, lines) = agent.finish(T);
    assert!(status.success());
    // ... and sent nothing: the agent's uid is not ours.
    assert!(lines.iter().any(|l| l == "hellos=0"), "{lines:?}");
}

/// `key=N` in a program's output line.
fn ms_field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Runs `shim_forkwait` under `mode`: `(child's fork, parent's first fork, its second)` in ms.
fn fork_times(mode: &ShimMode) -> (u64, u64, u64) {
    let mut p = Interactive::spawn(&mut command(compile("shim_forkwait"), mode));
    let child = p.line(T);
    let (st, rest) = p.finish(T);
    assert!(st.success(), "{st:?} {rest:?}");
    let parent = rest.first().cloned().unwrap_or_default();
    assert_eq!(ms_field(&parent, "status"), 0, "{parent}");
    (
        ms_field(&child, "fork_ms"),
        ms_field(&parent, "first_ms"),
        ms_field(&parent, "second_ms"),
    )
}

/// Before a fork the shim waits for the verdict of its own Hello (so a learned fork server's
/// merge-any, posted with the verdict, runs before its children are made), within 200 ms for
/// the process's whole life; a silent agent costs one program that much once. Never waited:
/// with no agent, with a verdict known, in a fork child (it said no Hello).
#[test]
fn a_fork_waits_for_the_verdict_once_within_a_budget_and_never_in_a_child() {
    // Far above a fork's own cost, far below the budget.
    const QUICK_MS: u64 = 150;
    let agent = HarnessAgent::start();
    agent.set_answer(HelloAnswer::Silent);
    let (child, first, second) = fork_times(&on(agent.socket_path()));
    assert!(
        (200..2000).contains(&first),
        "the first fork waits out the budget (200 ms of 1 ms steps): {first} ms"
    );
    assert!(second < QUICK_MS, "the budget is spent: {second} ms");
    assert!(child < QUICK_MS, "a fork child never waits: {child} ms");
    for (what, mode) in [
        (
            "no agent",
            on(&agent.socket_path().with_file_name("none.sock")),
        ),
        ("shim off", ShimMode::Off),
    ] {
        let (child, first, second) = fork_times(&mode);
        assert!(
            child.max(first).max(second) < QUICK_MS,
            "{what}: {child} {first} {second} ms"
        );
    }
    // An agent that answers: the fork waits only until the verdict comes.
    agent.set_answer(HelloAnswer::Track);
    let (child, first, second) = fork_times(&on(agent.socket_path()));
    assert!(
        child.max(first).max(second) < QUICK_MS,
        "tracked: {child} {first} {second} ms"
    );
}

/// A driver under the shim with a harness agent, tracked, and its channel.
fn tracked() -> (HarnessAgent, Interactive, ShimChannel) {
    let agent = HarnessAgent::start();
    let p = driver(&on(agent.socket_path()));
    agent.wait_hello(p.pid(), T);
    let ch = ShimChannel::wait(p.pid(), T);
    ch.wait_for("verdict TRACK", T, |s| {
        (s.verdict == verdict::TRACK).then_some(())
    });
    (agent, p, ch)
}

fn cmd(op: u32, start: u64, len: u64) -> Command {
    Command { op, start, len }
}

/// An idle program (blocked in `read`) executes a batch when woken by the signal; its `read`
/// resumes unseen and the program goes on unchanged.
#[test]
fn madvise_subrange_splits_vma_at_exact_bounds_in_an_idle_program() {
    let (_agent, mut p, ch) = tracked();
    let ps = page_size();
    let size = 4 << 20;
    let a = num_field(&p.cmd(&format!("malloc {size}"), T), "ptr");
    p.cmd(&format!("fill {a} {size} 1"), T);
    let pid = p.pid();
    let (lo, hi) = (a + 16 * ps, a + 48 * ps);
    // The driver now waits in fgets → read(0): nothing of ours runs until the signal.
    let seq = ch.post(&[cmd(op::MERGEABLE, lo, hi - lo)]);
    assert_eq!(ch.wait_done(seq, T, true), vec![0]);
    let s = ch.snapshot();
    assert_eq!(
        s.batches_signal, 1,
        "executed by the wake-up handler: {s:?}"
    );
    let inside = procfs::vma_containing(pid, lo).unwrap();
    assert_eq!((inside.start, inside.end), (lo, hi), "{inside:?}");
    assert!(inside.has_flag("mg"), "{inside:?}");
    let before = procfs::vma_containing(pid, lo - 1).unwrap();
    assert_eq!(before.end, lo);
    assert!(!before.has_flag("mg"), "{before:?}");
    let after = procfs::vma_containing(pid, hi).unwrap();
    assert_eq!(after.start, hi);
    assert!(!after.has_flag("mg"), "{after:?}");
    // And back, this time executed by the program's own next call into the shim: a small
    // `free` (a small `malloc` does not look at the mailbox, see hooks.rs).
    let seq = ch.post(&[cmd(op::UNMERGEABLE, lo, hi - lo)]);
    let small = num_field(&p.cmd("malloc 100", T), "ptr");
    assert_eq!(p.cmd(&format!("free {small}"), T), "ok");
    assert_eq!(ch.wait_done(seq, T, false), vec![0]);
    assert!(ch.snapshot().batches_hook >= 1);
    assert!(!procfs::vma_containing(pid, lo).unwrap().has_flag("mg"));
    // The content was not disturbed, and the program never saw the signal.
    assert_eq!(
        p.cmd(&format!("sum {a} {size}"), T),
        format!(
            "sum={:016x}",
            procfs::fnv1a(&procfs::read_mem(pid, a, size as usize))
        )
    );
    assert_eq!(p.cmd("sigurg count", T), "ret=0 urgs=0");
    assert_eq!(p.stderr(), "");
    assert!(p.finish(T).0.success());
}

/// Commands are validated (page-aligned, non-empty), and a kernel refusal comes back as its
/// errno without marking anything.
#[test]
fn bad_commands_are_refused_with_an_errno() {
    let (_agent, mut p, ch) = tracked();
    let ps = page_size();
    let a = num_field(&p.cmd("malloc 1048576", T), "ptr");
    p.cmd(&format!("fill {a} 1048576 1"), T);
    let pid = p.pid();
    let seq = ch.post(&[
        cmd(op::MERGEABLE, a + 1, ps),
        cmd(op::MERGEABLE, a, 0),
        cmd(op::MERGEABLE, a, ps + 1),
        cmd(99, a, ps),
        cmd(op::MERGEABLE, 0x10000, ps),
    ]);
    let r = ch.wait_done(seq, T, true);
    assert_eq!(
        r,
        vec![
            libc::EINVAL,
            libc::EINVAL,
            libc::EINVAL,
            libc::EINVAL,
            libc::ENOMEM
        ]
    );
    let s = ch.snapshot();
    assert_eq!((s.cmds, s.cmd_errors, s.last_errno), (5, 5, libc::ENOMEM));
    for v in procfs::smaps(pid) {
        assert!(!v.has_flag("mg"), "a refused command marked {v:?}");
    }
    // PROBE: this unsandboxed program lets KSM advice through.
    let seq = ch.post(&[cmd(op::PROBE, 0, 0), cmd(op::TRIM_CACHE, 0, 0)]);
    assert_eq!(ch.wait_done(seq, T, true), vec![0, 0]);
    assert_eq!(ch.snapshot().cache_bytes, 0);
    drop(p);
}

/// The wake-up handler is invisible: the program sees SIGURG at its default, and resetting the
/// default (as Firefox's fork server does in its children) keeps it. A program that takes the
/// signal over: the channel says so before the change takes effect, so the agent stops using
/// it; putting the default back makes it usable again.
#[test]
fn a_program_taking_the_signal_over_is_never_sent_it() {
    let (_agent, mut p, ch) = tracked();
    let s = ch.snapshot();
    assert_eq!(s.signal, libc::SIGURG as u32);
    assert_eq!(s.flags & flag::SIGNAL_LOST, 0);
    assert_eq!(p.cmd("sigurg query", T), "is=dfl");
    assert_eq!(p.cmd("sigurg default", T), "ret=0 urgs=0");
    assert_eq!(p.cmd("sigurg query", T), "is=dfl");
    let s = ch.snapshot();
    assert_eq!(
        (s.signal, s.flags & flag::SIGNAL_LOST),
        (libc::SIGURG as u32, 0)
    );
    let st = ksmplus_agentd::procfs::read_status(Path::new("/"), p.pid()).unwrap();
    assert!(
        st.sig_cgt & (1 << (libc::SIGURG - 1)) != 0,
        "the shim's handler is installed"
    );
    assert_eq!(p.cmd("sigurg take", T), "ret=0 urgs=0");
    let s = ch.snapshot();
    assert!(s.flags & flag::SIGNAL_LOST != 0, "{s:?}");
    assert_eq!(s.signal, 0);
    // The agent's wake-up refuses now.
    assert!(ksmplus_agentd::wake::wake(Path::new("/"), p.pid(), &s).is_err());
    assert_eq!(p.cmd("sigurg query", T), "is=handler");
    assert_eq!(p.cmd("sigurg restore", T), "ret=0 urgs=0");
    assert_eq!(p.cmd("sigurg query", T), "is=dfl");
    let s = ch.snapshot();
    assert_eq!(s.flags & flag::SIGNAL_LOST, 0, "ours again: {s:?}");
    assert_eq!(s.signal, libc::SIGURG as u32);
    drop(p);
}

/// The agent's reader on a real program: hashes match the page contents, untouched pages are
/// reported absent, and reading faults nothing in.
#[test]
fn fingerprint_matches_page_content_and_never_faults_pages_in() {
    let (_agent, mut p, ch) = tracked();
    let ps = page_size();
    let pid = p.pid();
    let pages = 256usize;
    let a = num_field(&p.cmd(&format!("malloc {}", pages as u64 * ps), T), "ptr");
    // Touch the first half only, each page different.
    p.cmd(&format!("fillpages {a} {}", pages / 2), T);
    let present_before = procfs::pages_present(pid, a, pages);
    assert!(present_before[..pages / 2].iter().all(|&x| x));
    assert!(!present_before[pages / 2..].iter().any(|&x| x));
    let addrs: Vec<u64> = (0..pages as u64).map(|k| a + k * ps).collect();
    let hashes = ch.handle().hashes(&addrs, ps);
    assert_eq!(hashes.len(), pages);
    let want = procfs::page_hashes(pid, a, pages / 2);
    for k in 0..pages / 2 {
        assert_eq!(hashes[k], PageHash::Hash(want[k]), "page {k}");
    }
    for (k, h) in hashes.iter().enumerate().skip(pages / 2) {
        assert_eq!(*h, PageHash::NotResident, "page {k}");
    }
    let mut uniq = want.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), pages / 2);
    assert_eq!(
        procfs::pages_present(pid, a, pages),
        present_before,
        "fingerprinting faulted untouched pages in"
    );
    let (covered, runs) = ch.handle().residency(a, pages as u64 * ps, 10).unwrap();
    assert_eq!(covered, pages as u64 * ps);
    assert_eq!(runs, vec![(a, pages as u64 / 2 * ps)]);
    // Unmapped pages: absent, and no crash.
    let m = num_field(&p.cmd("mmap 65536", T), "ptr");
    p.cmd(&format!("fill {m} 65536 1"), T);
    assert!(matches!(ch.handle().hashes(&[m], ps)[0], PageHash::Hash(_)));
    assert_eq!(num_field(&p.cmd(&format!("munmap {m} 65536"), T), "ret"), 0);
    let hashes = ch.handle().hashes(&[m, 0x10000], ps);
    assert_eq!(hashes, [PageHash::NotResident; 2]);
    assert!(p.finish(T).0.success());
}

/// A program may read a large block after freeing it (WebKit's compositor thread does, through
/// Mesa): glibc's heap lets it, so the shim never unmaps a freed block the cache can hold. When
/// the cache gives the memory back (here: the agent's TRIM_CACHE), the block holds no memory
/// and reads as zeros in the program; a request of its size reuses its addresses.
#[test]
fn a_freed_block_stays_readable_after_its_memory_goes_back() {
    let (_agent, mut p, ch) = tracked();
    let ps = page_size();
    let size: u64 = 1 << 20;
    let x = num_field(&p.cmd(&format!("malloc {size}"), T), "ptr");
    p.cmd(&format!("fill {x} {size} 9"), T);
    let filled = procfs::read_mem(p.pid(), x, size as usize);
    assert_eq!(p.cmd(&format!("free {x}"), T), "ok");
    assert_eq!(ch.snapshot().cache_bytes, size);
    // Right after free the block keeps what it held (as a chunk freed into glibc's heap does).
    assert_eq!(procfs::read_mem(p.pid(), x, size as usize), filled);
    let seq = ch.post(&[cmd(op::TRIM_CACHE, 0, 0)]);
    assert_eq!(ch.wait_done(seq, T, true), vec![0]);
    assert_eq!(ch.snapshot().cache_bytes, 0);
    let present = procfs::pages_present(p.pid(), x, (size / ps) as usize);
    assert!(!present.contains(&true), "memory given back: {present:?}");
    // The program reads it (a fault would end the driver): zeros.
    assert_eq!(p.cmd(&format!("zero {x} {size}"), T), "zero=1");
    let y = num_field(&p.cmd(&format!("malloc {size}"), T), "ptr");
    assert_eq!(y, x, "the freed addresses serve the next request");
    assert_eq!(p.cmd(&format!("free {y}"), T), "ok");
    drop(p);
}
