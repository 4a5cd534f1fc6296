//! The agent under a `Type=notify` unit with a watchdog: READY=1 once its socket listens,
//! WATCHDOG=1 every half `WATCHDOG_USEC`, RELOADING=1 then READY=1 around a SIGHUP reload,
//! STOPPING=1 on SIGTERM. The test plays the service manager on a datagram socket. Also: its
//! stderr lines carry sd-daemon priorities exactly when `JOURNAL_STREAM` names its stderr.
use ksmplus_tests::target_bin;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn recv(l: &UnixDatagram, deadline: Instant) -> String {
    let left = deadline.saturating_duration_since(Instant::now());
    l.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = l
        .recv(&mut buf)
        .expect("a notification before the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_watchdog_reload_and_stop_reach_the_service_manager() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    let socket = dir.path().join("run/agent.sock");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "track = [\"nothing-here\"]\n").unwrap();
    let mut agent = Command::new(target_bin("ksmplus-agentd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--policy")
        .arg(&policy)
        .arg("--state")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "400000") // pings every 200 ms
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);

    let ready = recv(&manager, deadline);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(socket.exists(), "READY=1 only once the socket listens");

    // The agent has nothing to do; the watchdog pings keep coming anyway.
    for _ in 0..3 {
        assert_eq!(recv(&manager, deadline), "WATCHDOG=1");
    }

    // SAFETY: kill sends a signal to the agent this test started.
    unsafe { libc::kill(agent.id() as i32, libc::SIGHUP) };
    let mut seen = Vec::new();
    while !seen.iter().any(|m: &String| m.starts_with("READY=1")) {
        let m = recv(&manager, deadline);
        if m != "WATCHDOG=1" {
            seen.push(m);
        }
    }
    assert_eq!(seen[0], "RELOADING=1", "{seen:?}");

    // SAFETY: as above.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    loop {
        let m = recv(&manager, deadline);
        if m == "STOPPING=1" {
            break;
        }
        assert_eq!(m, "WATCHDOG=1", "only pings before STOPPING=1");
    }
    assert!(agent.wait().unwrap().success());
}

/// Runs the agent with stderr on a fresh file and `JOURNAL_STREAM` naming that file
/// (`journal`) or another inode, as systemd sets it for a unit logging to the journal (or as a
/// child inherits it with its stderr redirected). Returns its exit status and stderr.
fn agent_stderr(journal: bool, policy_text: &str) -> (std::process::ExitStatus, String) {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, policy_text).unwrap();
    let log = dir.path().join("stderr");
    let f = std::fs::File::create(&log).unwrap();
    let md = f.metadata().unwrap();
    let stream = format!("{}:{}", md.dev(), md.ino() + u64::from(!journal));
    let mut agent = Command::new(target_bin("ksmplus-agentd"))
        .arg("-v")
        .arg("--socket")
        .arg(dir.path().join("run/agent.sock"))
        .arg("--policy")
        .arg(&policy)
        .arg("--state")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &notify)
        .env("JOURNAL_STREAM", &stream)
        .env_remove("KSMPLUS_LOG")
        .stdin(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    manager
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 512];
    let status = loop {
        if let Some(st) = agent.try_wait().unwrap() {
            break st; // a bad policy: it never gets ready
        }
        if matches!(manager.recv(&mut buf), Ok(n) if buf[..n].starts_with(b"READY=1")) {
            // SAFETY: kill sends a signal to the agent this test started.
            unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
            break agent.wait().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the agent neither got ready nor exited"
        );
    };
    (status, std::fs::read_to_string(&log).unwrap())
}

/// Under journald (`JOURNAL_STREAM` names the agent's stderr) every line carries its
/// sd-daemon priority and nothing else; elsewhere lines name the program and the level.
#[test]
fn stderr_lines_carry_journal_priorities_only_when_stderr_is_the_journal() {
    let (st, err) = agent_stderr(true, "track = [\"nothing-here\"]\n");
    assert!(st.success(), "{st}: {err}");
    assert!(
        err.lines().any(|l| l.starts_with("<6>listening on ")),
        "{err:?}"
    );
    for l in err.lines() {
        assert!(
            l.len() > 3 && matches!(&l[..3], "<3>" | "<4>" | "<6>" | "<7>"),
            "a line without a priority prefix: {l:?} in {err:?}"
        );
        assert!(
            !l.contains("ksmplus-agentd:"),
            "journald names the unit: {l:?}"
        );
    }

    // An error (a bad policy) at priority 3; exit status 2.
    let (st, err) = agent_stderr(true, "track = 7\n");
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.starts_with("<3>"), "{err:?}");

    // JOURNAL_STREAM inherited but stderr elsewhere: plain lines.
    let (st, err) = agent_stderr(false, "track = [\"nothing-here\"]\n");
    assert!(st.success(), "{st}: {err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("ksmplus-agentd: info: listening on ")),
        "{err:?}"
    );
    assert!(!err.lines().any(|l| l.starts_with('<')), "{err:?}");
}
