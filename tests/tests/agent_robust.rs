//! Robustness of the agent's server: a thousand clients at once, ten thousand hostile frames,
//! peers that never read, a peer of another uid, and an agent restart under running programs.
//! The agent must keep serving well-behaved clients, free what departed clients held, and never
//! crash.
mod agent_support;
use agent_support::{Agent, FAST_POLICY};
use ksmplus_common::protocol::{Hello, Message, Origin};
use ksmplus_common::{read_message, write_message};
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn hello(comm: &str) -> Message {
    Message::Hello(Hello {
        pid: std::process::id(),
        ppid: 1,
        uid: 0,
        page_size: 4096,
        min_region: 65536,
        comm: comm.into(),
        exe: format!("/usr/bin/{comm}"),
    })
}

/// A resync announcing one 1 MiB region.
fn one_region_resync() -> [Message; 3] {
    [
        Message::ResyncBegin { seq: 1 },
        Message::RegionAdded {
            seq: 2,
            start: 0x7000_0000_0000,
            len: 1 << 20,
            origin: Origin::Malloc,
        },
        Message::ResyncEnd { seq: 3, regions: 1 },
    ]
}

/// A fake shim: Hello, the agent's answer, then a resync announcing one 1 MiB region.
fn fake_shim(socket: &Path) -> (UnixStream, Message) {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(T)).unwrap();
    write_message(&mut s, &hello("agent_work")).unwrap();
    let answer = read_message(&mut s).unwrap().expect("an answer to Hello");
    for m in one_region_resync() {
        write_message(&mut s, &m).unwrap();
    }
    (s, answer)
}

/// A well-behaved client is served: Hello answered with Track, and status answers.
fn assert_serves(agent: &Agent) {
    let (_s, a) = fake_shim(&agent.socket);
    assert_eq!(a, Message::Track { flags: 0 });
    assert!(agent.status()["ok"].as_bool().unwrap());
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

#[test]
fn a_thousand_clients_at_once_then_fds_and_memory_return_to_baseline() {
    raise_nofile();
    let agent = Agent::start(FAST_POLICY);
    let base = agent.status();
    let base_fds = u(&base["agent"]["fds"]);
    // Connect all first (a thousand pending in the backlog), then say Hello on each.
    let mut socks: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&agent.socket).expect("connect"))
        .collect();
    for s in socks.iter_mut() {
        write_message(s, &hello("agent_work")).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
    }
    for s in socks.iter_mut() {
        assert_eq!(read_message(s).unwrap(), Some(Message::Track { flags: 0 }));
        for m in one_region_resync() {
            write_message(s, &m).unwrap();
        }
    }
    let s = agent.wait("1000 tracked clients", T, |s| {
        (u(&s["agent"]["peers"]["tracked"]) == 1000).then(|| s.clone())
    });
    assert_eq!(u(&s["totals"]["regions"]), 1000, "{}", s["totals"]);
    let rss_busy = u(&s["agent"]["rss_kib"]);
    assert_serves(&agent);
    drop(socks);
    let s = agent.wait("every client forgotten", T, |s| {
        (u(&s["agent"]["peers"]["tracked"]) == 0 && u(&s["agent"]["fds"]) == base_fds)
            .then(|| s.clone())
    });
    assert_eq!(u(&s["engine"]["fingerprints"]), 0, "{}", s["engine"]);
    let rss = u(&s["agent"]["rss_kib"]);
    agent_support::figure(
        "agent RSS idle / 1000 clients / after",
        format!("{} / {rss_busy} / {rss} KiB", u(&base["agent"]["rss_kib"])),
    );
    assert!(
        rss < 64 * 1024,
        "agent RSS {rss} KiB after 1000 clients left"
    );
}

/// The default policy asks tracked shims to cover the heap and anonymous mappings too.
#[test]
fn default_policy_asks_shims_to_cover_maps() {
    let agent = Agent::start("track = [\"agent_work\"]\n");
    let (_s, a) = fake_shim(&agent.socket);
    assert_eq!(
        a,
        Message::Track {
            flags: ksmplus_common::track_flags::COVER_MAPS
        }
    );
}

#[test]
fn ten_thousand_hostile_frames_close_only_their_senders() {
    let agent = Agent::start(FAST_POLICY);
    // A well-behaved client connected throughout.
    let (mut good, a) = fake_shim(&agent.socket);
    assert_eq!(a, Message::Track { flags: 0 });
    let valid_hello = hello("agent_work").to_frame();
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
        let frame: Vec<u8> = match i % 8 {
            // Random garbage.
            0 => (0..(rnd() % 300)).map(|_| rnd() as u8).collect(),
            // Oversized length prefix.
            1 => {
                let mut f = u32::MAX.to_le_bytes().to_vec();
                f.extend_from_slice(&[1, 0, 1]);
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
            4 => vec![3, 0, 0, 1, 0, 250],
            // A shim message before Hello.
            5 => Message::RegionAdded {
                seq: 1,
                start: 0,
                len: 1 << 30,
                origin: Origin::Malloc,
            }
            .to_frame(),
            // Hello then an agent-only command.
            6 => {
                let mut f = valid_hello.clone();
                f.extend(
                    Message::Madvise {
                        id: 1,
                        start: 0,
                        len: 4096,
                        advice: ksmplus_common::Advice::Mergeable,
                    }
                    .to_frame(),
                );
                f
            }
            // A frame over the pre-Hello limit but under MAX_FRAME, body never sent.
            _ => ((200u32 * 1024).to_le_bytes()).to_vec(),
        };
        let _ = s.write_all(&frame);
    }
    // The good client is still served: its region's residency is asked (all of it resident),
    // then it is fingerprinted and the reply accepted.
    good.set_read_timeout(Some(T)).unwrap();
    let m = read_message(&mut good).unwrap().expect("a command");
    let Message::Residency { id, start, len } = m else {
        panic!("expected Residency, got {m:?}");
    };
    write_message(
        &mut good,
        &Message::ResidencyReply {
            id,
            status: ksmplus_common::Status::Ok,
            covered: len,
            runs: vec![(start, len)],
        },
    )
    .unwrap();
    let m = read_message(&mut good).unwrap().expect("a command");
    let Message::Fingerprint { id, pages } = m else {
        panic!("expected Fingerprint, got {m:?}");
    };
    write_message(
        &mut good,
        &Message::FingerprintReply {
            id,
            status: ksmplus_common::Status::Ok,
            hashes: pages
                .iter()
                .map(|_| ksmplus_common::PageHash::NotResident)
                .collect(),
        },
    )
    .unwrap();
    let s = agent.wait("the hostile peers gone", T, |s| {
        let fp = s["processes"].as_array()?.first()?["fingerprinted_pages"].as_u64()?;
        (u(&s["agent"]["peers"]["unidentified"]) == 0
            && u(&s["agent"]["peers"]["untracked"]) == 0
            && fp > 0)
            .then(|| s.clone())
    });
    assert!(
        u(&s["agent"]["dropped_malformed"]) >= 5000,
        "{}",
        s["agent"]
    );
    assert_eq!(s["processes"].as_array().unwrap().len(), 1, "{s}");
    assert_serves(&agent);
    assert!(agent.child.is_some());
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
    // A tracked shim announcing a huge region that never reads its commands.
    let (_silent, a) = fake_shim(&agent.socket);
    assert_eq!(a, Message::Track { flags: 0 });
    let s = agent.wait("the flooding peer dropped", T, |s| {
        (u(&s["agent"]["dropped_overflow"]) >= 1).then(|| s.clone())
    });
    assert_eq!(u(&s["agent"]["peers"]["control"]), 1, "{}", s["agent"]);
    assert_serves(&agent);
}

#[test]
fn a_peer_of_another_uid_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to setuid a child to nobody");
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
    // Everything the child needs is prepared before fork: it only makes system calls.
    let frame = hello("agent_work").to_frame();
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

#[test]
fn agent_restart_while_programs_run() {
    let mut agent = Agent::start(FAST_POLICY);
    let (w, _) = agent.workload("agent_work", &["dense", "8"]);
    let pid = w.pid();
    agent.wait("the program tracked and marked", T, |s| {
        s["processes"]
            .as_array()?
            .iter()
            .find(|p| p["pid"].as_u64() == Some(pid as u64) && u(&p["marked_bytes"]) > 0)
            .map(|_| ())
    });
    // A crash: SIGKILL leaves the socket file behind; the new agent removes it (no one answers).
    agent.stop(libc::SIGKILL);
    assert!(agent.socket.exists());
    agent.spawn();
    agent.wait("the program back after the restart", T, |s| {
        s["processes"]
            .as_array()?
            .iter()
            .find(|p| p["pid"].as_u64() == Some(pid as u64) && u(&p["regions"]) > 0)
            .map(|_| ())
    });
    // A second agent on a live socket refuses to start and leaves the first alone.
    let o = std::process::Command::new(agent_support::bin("ksmplus-agentd"))
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
