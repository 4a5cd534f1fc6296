//! The agent's socket: a safe place for it, peers checked by credentials, frames read through
//! the one [`FrameReader`], and bounds on what any peer can make the agent hold.
//!
//! Invariants:
//! - The socket's directory is this user's and private (0700, not a symlink); one that belongs
//!   to another user, or is a symlink, is refused with an error naming it — never used.
//! - Every peer is checked with `SO_PEERCRED` (same uid as the agent, or root) before a byte
//!   of it is read.
//! - No peer can stall another or grow the agent without bound: sockets are non-blocking,
//!   reads per wake-up are capped, frames are refused from their length prefix
//!   ([`FRAME_MAX`]), all peers together hold at most [`TOTAL_BUFFERED_MAX`] bytes (over it,
//!   the peer holding the most is dropped), a peer that has not completed a frame within
//!   [`PEER_TIMEOUT_MS`] is dropped, and buffers are given back when a frame is consumed.
//! - A shim's connection carries one Hello and is then closed (the shim closes its end too).

use crate::debug;
use ksmplus_common::{FrameReader, Hello, Message};
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Largest frame a peer may send (a Hello is ≤ 8.3 KiB, control requests are small).
pub const FRAME_MAX: usize = 64 * 1024;
/// Bytes read from one peer per wake-up.
const READ_BUDGET: usize = 256 * 1024;
/// All peers' buffered input and output together.
pub const TOTAL_BUFFERED_MAX: usize = 16 << 20;
/// Output held for one control peer that does not read (a status reply may be large).
pub const OUT_MAX: usize = 4 << 20;
/// A peer that has not completed its frame (or, for ksmplusctl, its next one) by then is
/// dropped.
pub const PEER_TIMEOUT_MS: u64 = 5_000;
/// Most connections at once.
pub const MAX_PEERS: usize = 16384;

/// Why the socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{dir} belongs to uid {owner}, not to this user (uid {me}): refusing to put the agent's socket there")]
    ForeignDir { dir: String, owner: u32, me: u32 },
    #[error("{0} is a symbolic link: refusing to put the agent's socket there")]
    SymlinkDir(String),
    #[error("another ksmplus-agentd is already serving {0}")]
    InUse(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SocketError + '_ {
    move |source| SocketError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Makes sure the socket's directory is this user's and private, and removes a stale socket
/// (one nobody answers on).
pub fn prepare_socket_path(path: &Path) -> Result<(), SocketError> {
    let me = nix::unistd::geteuid().as_raw();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(dir))?;
            }
            Err(e) => return Err(io_err(dir)(e)),
            Ok(md) if md.file_type().is_symlink() => {
                return Err(SocketError::SymlinkDir(dir.display().to_string()))
            }
            Ok(_) => {}
        }
        let md = std::fs::symlink_metadata(dir).map_err(io_err(dir))?;
        if md.uid() != me {
            return Err(SocketError::ForeignDir {
                dir: dir.display().to_string(),
                owner: md.uid(),
                me,
            });
        }
        if md.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir))?;
        }
    }
    if std::fs::symlink_metadata(path).is_ok() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.display().to_string())),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    || e.kind() == io::ErrorKind::NotFound =>
            {
                crate::info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(io_err(path))?;
            }
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok(())
}

pub use ksmplus_common::paths::peer_cred;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    New,
    Control,
}

struct Peer {
    stream: UnixStream,
    frames: FrameReader,
    out: Vec<u8>,
    out_pos: usize,
    kind: Kind,
    pid: u32,
    /// When the peer connected or completed its last frame.
    since_ms: u64,
    close_after_flush: bool,
}

impl Peer {
    fn buffered(&self) -> usize {
        self.frames.pending() + self.out.len() - self.out_pos
    }
}

/// What a peer said.
#[derive(Debug)]
pub enum PeerEvent {
    /// A shim's Hello; `pid` is the peer's pid from SO_PEERCRED (the agent's namespace).
    Hello { pid: u32, hello: Hello },
    /// A ksmplusctl request; answer with [`Peers::reply`].
    Control { token: Token, json: String },
}

/// Counters shown by `status`.
pub use ksmplus_common::status::PeerStats;

/// The listener and its peers.
pub struct Peers {
    listener: UnixListener,
    peers: HashMap<Token, Peer>,
    next_token: usize,
    first_token: usize,
    uid: u32,
    pub stats: PeerStats,
    /// Peers to read again (their read budget ran out, or data arrived with the accept).
    again: Vec<Token>,
    /// Large buffers were freed since the last `malloc_trim`.
    trim_due: bool,
}

impl Peers {
    /// Binds the socket (after [`prepare_socket_path`]) and registers it as `listener_token`;
    /// peers get tokens from `first_token` up.
    pub fn bind(
        path: &Path,
        registry: &Registry,
        listener_token: Token,
        first_token: usize,
        uid: u32,
    ) -> Result<Peers, SocketError> {
        prepare_socket_path(path)?;
        let mut listener = UnixListener::bind(path).map_err(io_err(path))?;
        registry
            .register(&mut listener, listener_token, Interest::READABLE)
            .map_err(io_err(path))?;
        Ok(Peers {
            listener,
            peers: HashMap::new(),
            next_token: first_token,
            first_token,
            uid,
            stats: PeerStats::default(),
            again: Vec::new(),
            trim_due: false,
        })
    }

    pub fn owns(&self, t: Token) -> bool {
        t.0 >= self.first_token && t.0 < usize::MAX / 2
    }

    pub fn has_work(&self) -> bool {
        !self.again.is_empty()
    }

    /// `(control peers, unidentified peers)`.
    pub fn counts(&self) -> (u64, u64) {
        let c = self
            .peers
            .values()
            .filter(|p| p.kind == Kind::Control)
            .count() as u64;
        (c, self.peers.len() as u64 - c)
    }

    /// Bytes all peers hold now.
    pub fn buffered(&self) -> usize {
        self.peers.values().map(Peer::buffered).sum()
    }

    /// Accepts every waiting connection.
    pub fn accept(&mut self, registry: &Registry, now: u64) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    self.stats.accepted += 1;
                    let Ok((pid, uid)) = peer_cred(&stream) else {
                        continue;
                    };
                    if uid != self.uid && uid != 0 {
                        self.stats.refused_uid += 1;
                        debug!("refusing pid {pid}: uid {uid} is not {}", self.uid);
                        continue;
                    }
                    if self.peers.len() >= MAX_PEERS {
                        self.stats.refused_full += 1;
                        continue;
                    }
                    let t = Token(self.next_token);
                    self.next_token += 1;
                    if registry
                        .register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.peers.insert(
                        t,
                        Peer {
                            stream,
                            frames: FrameReader::new(FRAME_MAX),
                            out: Vec::new(),
                            out_pos: 0,
                            kind: Kind::New,
                            pid,
                            since_ms: now,
                            close_after_flush: false,
                        },
                    );
                    self.again.push(t);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: stop accepting this turn, the backlog waits.
                    crate::warn!("accept: {e}");
                    break;
                }
            }
        }
    }

    fn drop_peer(&mut self, registry: &Registry, t: Token, why: &str) {
        if let Some(mut p) = self.peers.remove(&t) {
            let _ = registry.deregister(&mut p.stream);
            if p.frames.capacity() + p.out.capacity() >= 16 * 1024 {
                self.trim_due = true;
            }
            if p.kind != Kind::Control {
                debug!("peer pid {} closed: {why}", p.pid);
            }
        }
    }

    /// Reads peers that are readable (`ready`) or left over from the last turn, returning what
    /// they said. Malformed, oversized or unexpected input closes that peer only.
    pub fn read(&mut self, registry: &Registry, ready: &[Token], now: u64) -> Vec<PeerEvent> {
        let mut todo: Vec<Token> = std::mem::take(&mut self.again);
        todo.extend_from_slice(ready);
        todo.sort_unstable();
        todo.dedup();
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        for t in todo {
            let mut budget = READ_BUDGET;
            while let Some(p) = self.peers.get_mut(&t) {
                match p.stream.read(&mut buf) {
                    Ok(0) => {
                        self.drop_peer(registry, t, "end of stream");
                        break;
                    }
                    Ok(n) => {
                        p.frames.push(&buf[..n]);
                        if let Err(why) = self.frames(registry, t, now, &mut out) {
                            self.stats.dropped_malformed += 1;
                            self.drop_peer(registry, t, &why);
                            break;
                        }
                        budget = budget.saturating_sub(n);
                        if budget == 0 {
                            self.again.push(t);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.drop_peer(registry, t, &e.to_string());
                        break;
                    }
                }
            }
        }
        self.enforce_total(registry);
        out
    }

    fn frames(
        &mut self,
        registry: &Registry,
        t: Token,
        now: u64,
        out: &mut Vec<PeerEvent>,
    ) -> Result<(), String> {
        loop {
            let Some(p) = self.peers.get_mut(&t) else {
                return Ok(());
            };
            let msg = match p.frames.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            p.since_ms = now;
            match (p.kind, msg) {
                (Kind::New, Message::Hello(hello)) => {
                    out.push(PeerEvent::Hello { pid: p.pid, hello });
                    self.drop_peer(registry, t, "Hello received");
                    return Ok(());
                }
                (Kind::New | Kind::Control, Message::ControlRequest { json }) => {
                    p.kind = Kind::Control;
                    out.push(PeerEvent::Control { token: t, json });
                }
                (k, m) => {
                    return Err(format!(
                        "unexpected {} from a {k:?} peer",
                        match m {
                            Message::Hello(_) => "Hello",
                            Message::ControlRequest { .. } => "ControlRequest",
                            Message::ControlReply { .. } => "ControlReply",
                        }
                    ))
                }
            }
        }
    }

    /// Over the total, the peers holding the most are dropped until it fits.
    fn enforce_total(&mut self, registry: &Registry) {
        while self.buffered() > TOTAL_BUFFERED_MAX {
            let Some(t) = self
                .peers
                .iter()
                .max_by_key(|(_, p)| p.buffered())
                .map(|(t, _)| *t)
            else {
                break;
            };
            self.stats.dropped_overflow += 1;
            self.drop_peer(registry, t, "holding too much buffered data");
        }
    }

    /// Drops peers that sat on an incomplete frame (or, for ksmplusctl, idle) for too long,
    /// and gives freed buffer memory back to the system.
    pub fn expire(&mut self, registry: &Registry, now: u64) {
        let slow: Vec<Token> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.since_ms) > PEER_TIMEOUT_MS)
            .map(|(t, _)| *t)
            .collect();
        for t in slow {
            self.stats.dropped_slow += 1;
            self.drop_peer(registry, t, "too slow");
        }
        if self.trim_due {
            self.trim_due = false;
            // SAFETY: malloc_trim only returns free heap memory to the kernel.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// The earliest time a peer may need expiring.
    pub fn next_expiry(&self) -> Option<u64> {
        self.peers
            .values()
            .map(|p| p.since_ms + PEER_TIMEOUT_MS + 1)
            .min()
    }

    /// Sends a control reply.
    pub fn reply(&mut self, registry: &Registry, t: Token, m: &Message) {
        let Some(p) = self.peers.get_mut(&t) else {
            return;
        };
        if p.out_pos > 0 && p.out_pos == p.out.len() {
            p.out.clear();
            p.out_pos = 0;
        }
        m.encode(&mut p.out);
        if p.out.len() - p.out_pos > OUT_MAX {
            self.stats.dropped_overflow += 1;
            return self.drop_peer(registry, t, "output buffer overflow (peer not reading)");
        }
        self.flush(registry, t);
    }

    /// Writes what a peer's output buffer holds.
    pub fn flush(&mut self, registry: &Registry, t: Token) {
        let Some(p) = self.peers.get_mut(&t) else {
            return;
        };
        while p.out_pos < p.out.len() {
            match p.stream.write(&p.out[p.out_pos..]) {
                Ok(0) => return self.drop_peer(registry, t, "write returned 0"),
                Ok(n) => p.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.drop_peer(registry, t, &e.to_string()),
            }
        }
        p.out.clear();
        p.out_pos = 0;
        if p.out.capacity() > 64 * 1024 {
            p.out = Vec::new();
            self.trim_due = true;
        }
        if p.close_after_flush {
            self.drop_peer(registry, t, "done");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_dir_of_another_user_or_a_symlink_is_refused() {
        let base = std::env::temp_dir().join(format!("ksmplus-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // A fresh directory is made private.
        let p = base.join("new/agent.sock");
        prepare_socket_path(&p).unwrap();
        let md = std::fs::metadata(base.join("new")).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
        // An existing one of ours that is too open is tightened.
        std::fs::create_dir(base.join("open")).unwrap();
        std::fs::set_permissions(base.join("open"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        prepare_socket_path(&base.join("open/agent.sock")).unwrap();
        assert_eq!(
            std::fs::metadata(base.join("open")).unwrap().mode() & 0o777,
            0o700
        );
        // A symlink is refused.
        std::os::unix::fs::symlink(base.join("open"), base.join("link")).unwrap();
        assert!(matches!(
            prepare_socket_path(&base.join("link/agent.sock")),
            Err(SocketError::SymlinkDir(_))
        ));
        // Another user's directory is refused (needs root to make one).
        if nix::unistd::geteuid().is_root() {
            let d = base.join("foreign");
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
            std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
            let e = prepare_socket_path(&d.join("agent.sock")).unwrap_err();
            assert!(
                matches!(e, SocketError::ForeignDir { owner: 65534, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("refusing"), "{e}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
