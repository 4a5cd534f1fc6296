//! The agent under a `Type=notify` unit with a watchdog: READY=1 once its socket listens,
//! WATCHDOG=1 every half `WATCHDOG_USEC`, RELOADING=1 then READY=1 around a SIGHUP reload,
//! STOPPING=1 on SIGTERM. The test plays the service manager on a datagram socket.
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
