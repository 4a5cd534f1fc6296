//! Robustness of the real agent: hundreds of programs at once, ten thousand hostile frames,
//! slow and non-reading peers, a peer of another uid, a socket directory another user owns,
//! untracked programs (one Hello each), and an agent restart under running programs. The agent
//! must keep serving, give back what departed peers held, and never crash.
mod agent_support;
use agent_support::{Agent, FAST_POLICY};
use ksmplus_common::channel::verdict;
use ksmplus_common::{Hello, Message};
use ksmplus_tests::{Interactive, ShimChannel};
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// `n` idle `agent_work unique 1` programs under the shim (their stdin open: they wait).
fn idle_programs(agent: &Agent, name: &str, n: usize) -> Vec<Child> {
    let exe = agent_support::workload_named(name);
    (0..n)
        .map(|_| {
            let mut c = ksmplus_tests::shim::command(&exe, &agent.shim());
            c.args(["unique", "1"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect()
}

fn finish(children: Vec<Child>) {
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
}

/// A well-behaved peer is served: status answers.
fn assert_serves(agent: &Agent) {
    assert!(agent.status()["ok"].as_bool().unwrap());
}

/// An agent with the fast policy, and `agent_work` (8 MiB of duplicates) running under it,
/// tracked.
fn agent_with_a_tracked_program() -> (Agent, Interactive) {
    let agent = Agent::start(FAST_POLICY);
    let (p, _) = agent.workload("agent_work", &["dense", "8"]);
    let pid = p.pid();
    agent.wait("the program tracked", T, |s| {
        agent_support::find(s, pid).map(|_| ())
    });
    (agent, p)
}

#[test]
fn hundreds_of_programs_then_fds_and_memory_return_to_baseline() {
    raise_nofile();
    let agent = Agent::start(FAST_POLICY);
    let base = agent.status();
    let base_fds = u(&base["agent"]["fds"]);
    let n = 300;
    let progs = idle_programs(&agent, "agent_work", n);
    let s = agent.wait("every program tracked", T, |s| {
        (u(&s["agent"]["peers"]["tracked"]) == n as u64).then(|| s.clone())
    });
    assert!(u(&s["totals"]["regions"]) >= n as u64, "{}", s["totals"]);
    let rss_busy = u(&s["agent"]["rss_kib"]);
    let t0 = std::time::Instant::now();
    assert_serves(&agent);
    agent_support::figure(
        &format!("status round trip with {n} tracked programs"),
        format!("{:?}", t0.elapsed()),
    );
    finish(progs);
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .map(|e| format!("{:?}", std::fs::read_link(e.path()).ok()))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let base_list = fds(agent.pid());
    let s = agent.wait("every program forgotten", T, |s| {
        (u(&s["agent"]["peers"]["tracked"]) == 0 && u(&s["agent"]["fds"]) <= base_fds)
            .then(|| s.clone())
            .or_else(|| {
                eprintln!(
                    "fds now {} (base {base_fds}): {}\nbase: {base_list}",
                    u(&s["agent"]["fds"]),
                    fds(agent.pid())
                );
                None
            })
    });
    assert_eq!(u(&s["engine"]["fingerprints"]), 0, "{}", s["engine"]);
    let rss = u(&s["agent"]["rss_kib"]);
    agent_support::figure(
        &format!("agent RSS idle / {n} programs / after"),
        format!("{} / {rss_busy} / {rss} KiB", u(&base["agent"]["rss_kib"])),
    );
    // Measured: 4 MiB idle, 10.5 MiB with 300 programs, 11 MiB after (the heap's high-water
    // mark, reused by the next 300: no growth from round to round).
    assert!(
        rss < 16 * 1024,
        "agent RSS {rss} KiB after {n} programs left"
    );
}

fn hello_frame(channel: u64) -> Vec<u8> {
    Message::Hello(Hello {
        pid: std::process::id(),
        comm: "agent_work".into(),
        exe: "/usr/bin/agent_work".into(),
        channel,
        nonce: 42,
        ..Default::default()
    })
    .to_frame()
}

#[test]
fn ten_thousand_hostile_frames_close_only_their_senders() {
    // A real tracked program throughout.
    let (mut agent, good) = agent_with_a_tracked_program();
    let pid = good.pid();
    let valid_hello = hello_frame(0x7000_0000_0000);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..10_000u32 {
        let Ok(mut s) = UnixStream::connect(&agent.socket) else {
            panic!("connect #{i} refused; agent log:\n{}", agent.log());
        };
        let frame: Vec<u8> = match i % 7 {
            // Random garbage.
            0 => (0..(rnd() % 300)).map(|_| rnd() as u8).collect(),
            // Oversized length prefix.
            1 => {
                let mut f = u32::MAX.to_le_bytes().to_vec();
                f.extend_from_slice(&[2, 0, 1]);
                f
            }
            // Truncated Hello, then the writer closes.
            2 => valid_hello[..valid_hello.len() - 1 - (rnd() as usize % 8)].to_vec(),
            // Wrong protocol version.
            3 => {
                let mut f = valid_hello.clone();
                f[4] = 0xee;
                f
            }
            // Unknown tag.
            4 => vec![3, 0, 0, 0, 2, 0, 250],
            // A Hello naming a channel that is not there (this test process has none).
            5 => valid_hello.clone(),
            // A reply only the agent sends.
            _ => Message::ControlReply { json: "{}".into() }.to_frame(),
        };
        let _ = s.write_all(&frame);
    }
    let s = agent.wait("the hostile peers gone", T, |s| {
        (u(&s["agent"]["peers"]["unidentified"]) == 0).then(|| s.clone())
    });
    assert!(
        u(&s["agent"]["dropped_malformed"]) >= 5000,
        "{}",
        s["agent"]
    );
    let procs = s["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "only the real program is tracked: {s}");
    assert_eq!(u(&procs[0]["pid"]), pid as u64);
    // The real program is still being served: its marks land.
    agent.wait("the real program marked", T, |s| {
        let p = agent_support::find(s, pid)?;
        (u(&p["marked_bytes"]) > 0).then_some(())
    });
    assert!(agent.alive(), "the agent died");
    assert!(good.finish(T).0.success());
}

#[test]
fn peers_that_never_read_are_dropped_and_stall_nobody() {
    let agent = Agent::start(FAST_POLICY);
    // A control peer that floods status requests and never reads its replies.
    let mut flood = UnixStream::connect(&agent.socket).unwrap();
    flood.set_write_timeout(Some(T)).unwrap();
    let req = Message::ControlRequest {
        json: r#"{"cmd":"status"}"#.into(),
    }
    .to_frame();
    for _ in 0..20_000 {
        if flood.write_all(&req).is_err() {
            break; // dropped by the agent
        }
    }
    let s = agent.wait("the flooding peer dropped", T, |s| {
        (u(&s["agent"]["dropped_overflow"]) >= 1).then(|| s.clone())
    });
    assert_eq!(u(&s["agent"]["peers"]["control"]), 1, "{}", s["agent"]);
    assert_serves(&agent);
}

/// Issue 11 #2: peers that hold partial frames. Their buffers are bounded in total, they are
/// dropped after the timeout, and the agent gives the memory back.
#[test]
fn slow_peers_are_timed_out_and_their_memory_given_back() {
    raise_nofile();
    let agent = Agent::start(FAST_POLICY);
    let base = u(&agent.status()["agent"]["rss_kib"]);
    let mut peers = Vec::new();
    // 500 peers announcing a 60 KiB frame and sending all of it but the last byte.
    for _ in 0..500 {
        let mut s = UnixStream::connect(&agent.socket).unwrap();
        let mut f = (60u32 * 1024).to_le_bytes().to_vec();
        f.resize(4 + 60 * 1024 - 1, 7);
        let _ = s.write_all(&f);
        peers.push(s);
    }
    let s = agent.wait("the slow peers dropped", T, |s| {
        (u(&s["agent"]["dropped_slow"]) + u(&s["agent"]["dropped_overflow"]) >= 500
            && u(&s["agent"]["peers"]["unidentified"]) == 0)
            .then(|| s.clone())
    });
    let after = u(&s["agent"]["rss_kib"]);
    agent_support::figure(
        "agent RSS before / after 500 peers holding 60 KiB partial frames",
        format!("{base} / {after} KiB"),
    );
    assert!(
        after < base + 8 * 1024,
        "agent RSS {after} KiB after the slow peers left (was {base} KiB)"
    );
    drop(peers);
    assert_serves(&agent);
}

#[test]
fn a_peer_of_another_uid_is_refused() {
    if !ksmplus_tests::ksmd::require_root("needs root to setuid a child to nobody") {
        return;
    }
    let agent = Agent::start(FAST_POLICY);
    // Let nobody reach the socket so that only SO_PEERCRED stands in the way.
    use std::os::unix::fs::PermissionsExt;
    for p in [
        agent.dir.path(),
        agent.socket.parent().unwrap(),
        agent.socket.as_path(),
    ] {
        let mode = if p == agent.socket { 0o777 } else { 0o711 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let frame = Message::ControlRequest {
        json: r#"{"cmd":"status"}"#.into(),
    }
    .to_frame();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = agent.socket.as_os_str().as_encoded_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child calls only async-signal-safe functions and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(10);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if libc::connect(
                fd,
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as u32,
            ) != 0
            {
                libc::_exit(11);
            }
            let tv = libc::timeval {
                tv_sec: 20,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            libc::write(fd, frame.as_ptr() as *const libc::c_void, frame.len());
            let mut b = [0u8; 16];
            let n = libc::read(fd, b.as_mut_ptr() as *mut libc::c_void, 16);
            // 0: closed without an answer (refused); >0: answered; <0: timeout or reset.
            libc::_exit(
                if n == 0 || (n < 0 && *libc::__errno_location() == libc::ECONNRESET) {
                    0
                } else if n > 0 {
                    12
                } else {
                    13
                },
            );
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status), "child status {status}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the nobody peer was not refused (11: connect failed, 12: answered, 13: no close)"
    );
    let s = agent.status();
    assert!(u(&s["agent"]["refused_uid"]) >= 1, "{}", s["agent"]);
    assert_serves(&agent);
}

/// Issue 11 #3: a socket directory that another user made beforehand (mode 777 in /tmp) is
/// refused with an error naming it, and `ksmplusctl` refuses to talk to a socket another user
/// serves.
#[test]
fn socket_takeover_is_refused_by_agent_and_ctl() {
    if !ksmplus_tests::ksmd::require_root("needs root to make a directory owned by nobody") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let foreign = dir.path().join("ksmplus-0");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let o = Command::new(agent_support::bin("ksmplus-agentd"))
        .arg("--socket")
        .arg(foreign.join("agent.sock"))
        .arg("--policy")
        .arg(dir.path().join("none.toml"))
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "the agent listened in another user's directory"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("belongs to uid 65534") && err.contains(&*foreign.to_string_lossy()),
        "{err}"
    );
    assert!(!foreign.join("agent.sock").exists());
    // The other user serves a socket there; ksmplusctl must not send it our commands.
    let exe = dir.path().join("harness-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_harness-agent"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(&exe);
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    cmd.arg(foreign.join("agent.sock"));
    let mut impostor = Interactive::spawn(&mut cmd);
    assert_eq!(impostor.line(T), "listening", "{}", impostor.stderr());
    let o = Command::new(agent_support::bin("ksmplusctl"))
        .arg("--socket")
        .arg(foreign.join("agent.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("served by uid 65534"), "{err}");
    let (_, lines) = impostor.finish(T);
    assert!(
        lines.iter().any(|l| l == "hellos=0") && lines.iter().any(|l| l == "errors=1"),
        "{lines:?}"
    );
}

/// Issue 11 #1: an untracked program says Hello once, its shim goes dormant, and nothing more
/// reaches the agent for the rest of its life.
#[test]
fn untracked_programs_say_hello_once_and_go_dormant() {
    let agent = Agent::start(FAST_POLICY);
    let progs = idle_programs(&agent, "agent_other", 4);
    let s = agent.wait("four programs ignored", T, |s| {
        (u(&s["agent"]["ignored"]) == 4).then(|| s.clone())
    });
    assert_eq!(u(&s["agent"]["peers"]["tracked"]), 0);
    for c in &progs {
        let ch = ShimChannel::wait(c.id(), T);
        ch.wait_for("verdict IGNORE", T, |s| {
            (s.verdict == verdict::IGNORE).then_some(())
        });
    }
    // The programs keep running (waiting on stdin) for a while: no more connections.
    let accepted = u(&s["agent"]["accepted"]);
    std::thread::sleep(Duration::from_secs(2));
    let s = agent.status();
    // The status request itself is the only new connection.
    assert_eq!(u(&s["agent"]["accepted"]), accepted + 1, "{}", s["agent"]);
    assert_eq!(u(&s["agent"]["ignored"]), 4);
    finish(progs);
}

#[test]
fn agent_restart_while_programs_run() {
    let (mut agent, w) = agent_with_a_tracked_program();
    let pid = w.pid();
    agent.wait("the program marked", T, |s| {
        let p = agent_support::find(s, pid)?;
        (u(&p["marked_bytes"]) > 0).then_some(())
    });
    // A crash: SIGKILL leaves the socket file behind; the new agent removes it (no one
    // answers) and finds the running program again through its shim's anchor.
    agent.stop(libc::SIGKILL);
    assert!(agent.socket.exists());
    agent.spawn();
    let s = agent.wait("the program back after the restart", T, |s| {
        let p = agent_support::find(s, pid)?;
        (u(&p["regions"]) > 0).then(|| s.clone())
    });
    let p = agent_support::find(&s, pid).unwrap();
    assert_eq!(p["found"], "scan", "{p}");
    assert!(u(&s["agent"]["adopted"]) >= 1);
    // A second agent on a live socket refuses to start and leaves the first alone.
    let o = Command::new(agent_support::bin("ksmplus-agentd"))
        .arg("--socket")
        .arg(&agent.socket)
        .arg("--policy")
        .arg(&agent.policy)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already serving"),
        "{o:?}"
    );
    assert_serves(&agent);
    assert!(w.finish(T).0.success());
}

/// Two agents of one uid (tests and benchmarks run several): an agent started later finds the
/// other's programs in its start-up scan and leaves them alone — it adopts only programs whose
/// shim was started for its own socket.
#[test]
fn an_agent_never_takes_another_agents_programs() {
    let a = Agent::start(FAST_POLICY);
    let (w, _) = a.workload("agent_work", &["dense", "4"]);
    let pid = w.pid();
    a.wait("the program tracked by the first agent", T, |s| {
        agent_support::find(s, pid).map(|_| ())
    });
    let b = Agent::start(&FAST_POLICY.replace("track = [", "track_all = true\ntrack = ["));
    // b's start-up scan has run once it answers; give its loop a few turns more.
    let s = b.wait("the second agent's first status", T, |s| {
        (u(&s["agent"]["uptime_ms"]) > 500).then(|| s.clone())
    });
    assert!(agent_support::find(&s, pid).is_none(), "{s}");
    assert_eq!(u(&s["agent"]["adopted"]), 0, "{s}");
    let s = a.status();
    assert!(
        agent_support::find(&s, pid).is_some(),
        "the first agent lost it: {s}"
    );
    let ch = ShimChannel::wait(pid, T);
    assert_eq!(ch.snapshot().verdict, verdict::TRACK);
    assert!(w.finish(T).0.success());
}
