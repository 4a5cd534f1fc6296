//! The service manager's notification protocol (`sd_notify(3)`), for a `Type=notify` unit with a
//! watchdog: `READY=1` once the socket listens, `RELOADING=1` … `READY=1` around a reload,
//! `STOPPING=1` on the way out, `WATCHDOG=1` every half `WATCHDOG_USEC`.
//!
//! Invariants:
//! - Without `$NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`) every call is a
//!   no-op; a failed send is ignored (the manager decides what a missing message means).
//! - The watchdog period is taken from `$WATCHDOG_USEC` only when `$WATCHDOG_PID` is unset or
//!   names this process; pings ride on the loop's own deadline, so the agent wakes for them at
//!   most once per half period.
//! - One datagram per message, on a socket opened once (`SOCK_CLOEXEC`: children never see it).
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// Where and how often to tell the service manager.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// Half the watchdog period, milliseconds (`None`: no watchdog).
    pub ping_every_ms: Option<u64>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        Notifier::new(
            std::env::var("NOTIFY_SOCKET").ok().as_deref(),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    pub fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        me: u32,
    ) -> Notifier {
        let socket = socket.filter(|s| !s.is_empty()).and_then(|s| {
            let addr = if let Some(name) = s.strip_prefix('@') {
                // An abstract socket name (Linux).
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                SocketAddr::from_pathname(Path::new(s)).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_me = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>().ok() == Some(me));
        let ping_every_ms = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_me && socket.is_some())
            .map(|u| (u / 2000).max(1));
        Notifier {
            socket,
            ping_every_ms,
        }
    }

    /// Sends one message, e.g. `READY=1`. Ignored without a notification socket.
    pub fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.socket {
            let _ = sock.send_to_addr(msg.as_bytes(), addr);
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn reloading(&self) {
        self.send("RELOADING=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn listener() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let l = UnixDatagram::bind(&path).unwrap();
        l.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, l, path.to_string_lossy().into_owned())
    }

    fn recv(l: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = l.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_the_manager_socket() {
        let (_d, l, path) = listener();
        let n = Notifier::new(Some(&path), None, None, 1);
        n.ready("listening");
        assert_eq!(recv(&l), "READY=1\nSTATUS=listening");
        n.reloading();
        assert_eq!(recv(&l), "RELOADING=1");
        n.watchdog();
        assert_eq!(recv(&l), "WATCHDOG=1");
        n.stopping();
        assert_eq!(recv(&l), "STOPPING=1");
        assert_eq!(n.ping_every_ms, None);
    }

    #[test]
    fn abstract_socket_names() {
        let name = format!("ksmplus-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let l = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        l.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Notifier::new(Some(&format!("@{name}")), None, None, 1).ready("x");
        assert_eq!(recv(&l), "READY=1\nSTATUS=x");
    }

    #[test]
    fn watchdog_period_is_half_and_only_for_this_pid() {
        let (_d, _l, path) = listener();
        let n = Notifier::new(Some(&path), Some("30000000"), None, 7);
        assert_eq!(n.ping_every_ms, Some(15_000));
        let n = Notifier::new(Some(&path), Some("30000000"), Some("7"), 7);
        assert_eq!(n.ping_every_ms, Some(15_000));
        let n = Notifier::new(Some(&path), Some("30000000"), Some("8"), 7);
        assert_eq!(n.ping_every_ms, None, "another process's watchdog");
        let n = Notifier::new(Some(&path), Some("junk"), None, 7);
        assert_eq!(n.ping_every_ms, None);
        let n = Notifier::new(None, Some("30000000"), None, 7);
        assert_eq!(n.ping_every_ms, None, "no socket, no watchdog");
        // Without a socket every call is a no-op.
        n.ready("x");
        n.watchdog();
    }
}
