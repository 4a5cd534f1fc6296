//! The agent's I/O around the pure engine: one thread, one `mio` event loop, non-blocking
//! unix sockets.
//!
//! Invariants:
//! - no peer can stall another: every socket is non-blocking, reads per wake-up are capped
//!   (the rest is read on the next turn), output is buffered per peer with a hard cap and a
//!   peer whose buffer overflows is dropped;
//! - every peer is checked with `SO_PEERCRED` (same uid as the agent, or root) before a byte
//!   of it is read;
//! - a malformed, oversized or unexpected frame closes that peer only; frames are bounded by
//!   the peer's kind before they are buffered ([`PRE_ID_FRAME_MAX`], [`SHIM_FRAME_MAX`]);
//! - a peer that goes away (exit, crash) is forgotten at once: connection, engine state,
//!   fingerprints.

use crate::control;
use crate::engine::{ClientId, Config, Engine};
use crate::{debug, info, warn};
use ksmplus_common::policy::{Decision, Policy};
use ksmplus_common::protocol::HEADER_LEN;
use ksmplus_common::{ksm, Hello, Message};
use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest frame accepted before a peer said what it is (Hello is ≤ 8.2 KiB, control requests small).
pub const PRE_ID_FRAME_MAX: usize = 64 * 1024;
/// Largest frame accepted from a shim (a full FingerprintReply is ~144 KiB, a full
/// ResidencyReply 256 KiB + 20 bytes).
pub const SHIM_FRAME_MAX: usize = 320 * 1024;
/// Output buffered for one shim before it is dropped as not reading.
pub const SHIM_OUT_MAX: usize = 1 << 20;
/// Output buffered for one ksmplusctl (a status reply may be large).
pub const CONTROL_OUT_MAX: usize = 2 * ksmplus_common::MAX_FRAME;
/// Bytes read from one peer per wake-up, for fairness.
const READ_BUDGET: usize = 512 * 1024;
/// Most peers served at once; more are refused at accept.
pub const MAX_PEERS: usize = 16384;

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_PEER: usize = 2;

/// How the agent is started.
#[derive(Clone, Debug)]
pub struct Options {
    pub socket: PathBuf,
    pub policy_path: PathBuf,
    /// Root of `/proc` and `/sys` (tests may point it elsewhere).
    pub root: PathBuf,
    /// Seed of the sampling PRNG.
    pub seed: u64,
}

#[derive(Debug)]
enum Kind {
    New,
    Shim { hello: Hello, tracked: bool },
    Control,
}

struct Peer {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    kind: Kind,
    pid: u32,
    uid: u32,
    /// Close once the output is flushed (after Ignore).
    close_after_flush: bool,
    /// A pidfd of a tracked shim's process (None before Hello, or where pidfd_open fails):
    /// what the agent reads from `/proc/PID` counts only if this process was still alive after
    /// the read, so a recycled pid is never mistaken for the client.
    pidfd: Option<OwnedFd>,
}

impl Peer {
    fn frame_max(&self) -> usize {
        match self.kind {
            Kind::New | Kind::Control => PRE_ID_FRAME_MAX,
            Kind::Shim { .. } => SHIM_FRAME_MAX,
        }
    }
    fn out_max(&self) -> usize {
        match self.kind {
            Kind::Control => CONTROL_OUT_MAX,
            _ => SHIM_OUT_MAX,
        }
    }
    fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }
}

/// Counters shown by `status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerStats {
    pub accepted: u64,
    pub refused_uid: u64,
    pub refused_full: u64,
    pub dropped_malformed: u64,
    pub dropped_overflow: u64,
    pub ignored: u64,
    pub excluded: u64,
    pub reloads: u64,
}

pub struct Agent {
    pub opts: Options,
    poll: Poll,
    listener: UnixListener,
    peers: HashMap<Token, Peer>,
    next_token: usize,
    pub engine: Engine,
    pub policy: Policy,
    started: Instant,
    pub uid: u32,
    pub stats: ServerStats,
    again: Vec<Token>,
    last_feedback: u64,
    sig_fd: i32,
    shutdown: bool,
    /// ksmd tunables the policy changed, with the value each had before the agent first wrote
    /// it; written back when the policy stops naming them and at exit.
    ksmd_saved: Vec<(&'static str, String)>,
}

static SIG_WRITE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIG_WRITE_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// Creates the socket's directory (mode 0700) and removes a stale socket file, but only when
/// no agent answers on it.
pub fn prepare_socket_path(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        } else {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(dir)?;
            // SAFETY: geteuid has no preconditions.
            if md.uid() == unsafe { libc::geteuid() } && md.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
    }
    if std::fs::symlink_metadata(path).is_ok() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another ksmplus-agentd is already serving {}",
                        path.display()
                    ),
                ))
            }
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    || e.kind() == io::ErrorKind::NotFound =>
            {
                info!("removing stale socket {}", path.display());
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn peer_cred(fd: i32) -> Option<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some((cred.pid as u32, cred.uid))
}

/// A pidfd for `pid` (Linux ≥ 5.3), or None.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a fresh fd that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// True once the process behind `pidfd` has exited (its pidfd polls readable).
fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// Raises the soft fd limit to the hard one so thousands of peers fit.
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

impl Agent {
    /// Binds the socket and loads the policy. `policy` is the already-loaded policy.
    pub fn new(opts: Options, policy: Policy) -> io::Result<Agent> {
        raise_nofile();
        prepare_socket_path(&opts.socket)?;
        let mut listener = UnixListener::bind(&opts.socket)?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let now_ms = 0;
        let engine = Engine::new(Config::from_policy(&policy), opts.seed, now_ms);
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let mut a = Agent {
            opts,
            poll,
            listener,
            peers: HashMap::new(),
            next_token: FIRST_PEER,
            engine,
            policy,
            started: Instant::now(),
            uid,
            stats: ServerStats::default(),
            again: Vec::new(),
            last_feedback: 0,
            sig_fd: -1,
            shutdown: false,
            ksmd_saved: Vec::new(),
        };
        a.apply_ksmd();
        Ok(a)
    }

    /// Routes SIGHUP (reload) and SIGTERM/SIGINT (clean exit) into the event loop.
    pub fn install_signals(&mut self) -> io::Result<()> {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.sig_fd = fds[0];
        SIG_WRITE_FD.store(fds[1], std::sync::atomic::Ordering::Relaxed);
        self.poll
            .registry()
            .register(&mut SourceFd(&fds[0]), SIGNALS, Interest::READABLE)?;
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            // SAFETY: on_signal only calls write(2).
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Applies the policy's ksmd settings (root only), remembering each tunable's value from
    /// before the agent first changed it; a tunable the policy no longer names gets that value
    /// back.
    fn apply_ksmd(&mut self) {
        if self.uid != 0 {
            return;
        }
        let k = &self.policy.ksmd;
        // Tunables first, `run` last.
        let wanted = [
            ("pages_to_scan", k.pages_to_scan),
            ("sleep_millisecs", k.sleep_millisecs),
            ("use_zero_pages", k.use_zero_pages),
            ("run", k.run),
        ];
        for (name, v) in wanted {
            let saved = self.ksmd_saved.iter().position(|(n, _)| *n == name);
            match (v, saved) {
                (Some(v), _) => {
                    if saved.is_none() {
                        match ksm::read_sysfs_text(&self.opts.root, name) {
                            Ok(old) => self.ksmd_saved.push((name, old.trim().to_string())),
                            Err(e) => {
                                warn!("cannot read ksmd.{name}, not changing it: {e}");
                                continue;
                            }
                        }
                    }
                    if let Err(e) = ksm::write_sysfs(&self.opts.root, name, &v.to_string()) {
                        warn!("cannot apply ksmd.{name} = {v}: {e}");
                    }
                }
                (None, Some(i)) => {
                    let (name, old) = self.ksmd_saved.remove(i);
                    self.write_back(name, &old);
                }
                (None, None) => {}
            }
        }
    }

    /// Writes back every ksmd tunable the agent changed (`run` last).
    fn restore_ksmd(&mut self) {
        let mut saved = std::mem::take(&mut self.ksmd_saved);
        saved.sort_by_key(|(n, _)| *n == "run");
        for (name, old) in saved {
            self.write_back(name, &old);
        }
    }

    fn write_back(&self, name: &str, old: &str) {
        match ksm::write_sysfs(&self.opts.root, name, old) {
            Ok(()) => info!("ksmd.{name} restored to {old}"),
            Err(e) => warn!("cannot restore ksmd.{name} to {old}: {e}"),
        }
    }

    /// Reloads the policy file. On error the old policy stays in force.
    pub fn reload(&mut self) -> Result<(), String> {
        let p = Policy::load(&self.opts.policy_path).map_err(|e| e.to_string())?;
        self.policy = p;
        self.engine.set_config(Config::from_policy(&self.policy));
        self.stats.reloads += 1;
        self.apply_ksmd();
        // Clients no longer tracked: unmark what was marked, then let their shim go dormant.
        let mut stop = Vec::new();
        for (t, peer) in &self.peers {
            if let Kind::Shim {
                hello,
                tracked: true,
            } = &peer.kind
            {
                if self.policy.decide(&hello.comm, &hello.exe) != Decision::Track {
                    stop.push(*t);
                }
            }
        }
        for t in stop {
            let id = t.0 as ClientId;
            let mut msgs: Vec<Message> = self
                .engine
                .marked(id)
                .into_iter()
                .enumerate()
                .map(|(i, (start, len))| Message::Madvise {
                    id: 0x8000_0000 | i as u32,
                    start,
                    len,
                    advice: ksmplus_common::Advice::Unmergeable,
                })
                .collect();
            msgs.push(Message::Ignore);
            self.engine.remove_client(id);
            if let Some(p) = self.peers.get_mut(&t) {
                p.kind = Kind::Shim {
                    hello: match &p.kind {
                        Kind::Shim { hello, .. } => hello.clone(),
                        _ => Hello::default(),
                    },
                    tracked: false,
                };
                p.close_after_flush = true;
            }
            for m in msgs {
                self.send(t, &m);
            }
        }
        info!("policy reloaded from {}", self.opts.policy_path.display());
        Ok(())
    }

    /// Runs until SIGTERM/SIGINT, then removes the socket and restores the ksmd tunables it
    /// changed.
    pub fn run(&mut self) -> io::Result<()> {
        let r = self.serve();
        let _ = std::fs::remove_file(&self.opts.socket);
        self.restore_ksmd();
        r
    }

    fn serve(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !self.shutdown {
            let timeout = if self.again.is_empty() {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    SIGNALS => self.drain_signals(),
                    t => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read_peer(t);
                        }
                        if ev.is_writable() {
                            self.flush(t);
                        }
                    }
                }
            }
            for t in std::mem::take(&mut self.again) {
                self.read_peer(t);
            }
            self.turn();
        }
        Ok(())
    }

    /// Engine tick, kernel feedback, output dispatch.
    fn turn(&mut self) {
        let now = self.now_ms();
        if now >= self.last_feedback + 1000 {
            self.last_feedback = now;
            self.feedback();
        }
        self.engine.tick(now);
        self.dispatch();
    }

    fn dispatch(&mut self) {
        for (id, m) in self.engine.take_output() {
            self.send(Token(id as usize), &m);
        }
    }

    fn feedback(&mut self) {
        let Ok(scans) = ksm::read_sysfs(&self.opts.root, "full_scans") else {
            return;
        };
        self.engine.set_full_scans(scans.max(0) as u64);
        for id in self.engine.due_checks() {
            let Some(st) = self.engine.status(id) else {
                continue;
            };
            match ksm::read_smaps(&self.opts.root, st.pid) {
                Ok(_) if !self.client_alive(id) => {
                    debug!("pid {}: exited while its smaps were read", st.pid)
                }
                Ok(vmas) => {
                    let v: Vec<(u64, u64, u64)> =
                        vmas.iter().map(|v| (v.start, v.end, v.ksm_kib)).collect();
                    self.engine.feedback(id, &v);
                }
                Err(e) => debug!("pid {}: {e}", st.pid),
            }
        }
    }

    fn drain_signals(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: buf is valid for 64 bytes.
            let n = unsafe { libc::read(self.sig_fd, buf.as_mut_ptr() as *mut libc::c_void, 64) };
            if n <= 0 {
                break;
            }
            for &s in &buf[..n as usize] {
                match s as i32 {
                    libc::SIGHUP => {
                        if let Err(e) = self.reload() {
                            warn!("reload refused, old policy kept: {e}");
                        }
                    }
                    _ => self.shutdown = true,
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    self.stats.accepted += 1;
                    let Some((pid, uid)) = peer_cred(stream.as_raw_fd()) else {
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
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.peers.insert(
                        t,
                        Peer {
                            stream,
                            inbuf: Vec::new(),
                            out: Vec::new(),
                            out_pos: 0,
                            kind: Kind::New,
                            pid,
                            uid,
                            close_after_flush: false,
                            pidfd: None,
                        },
                    );
                    // Data may already be waiting (edge-triggered).
                    self.again.push(t);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: stop accepting this turn, the backlog waits.
                    warn!("accept: {e}");
                    break;
                }
            }
        }
    }

    fn drop_peer(&mut self, t: Token, why: &str) {
        if let Some(mut p) = self.peers.remove(&t) {
            let _ = self.poll.registry().deregister(&mut p.stream);
            if let Kind::Shim { tracked: true, .. } = p.kind {
                self.engine.remove_client(t.0 as ClientId);
            }
            if !matches!(p.kind, Kind::Control) {
                debug!("peer pid {} (uid {}) closed: {why}", p.pid, p.uid);
            }
        }
    }

    fn read_peer(&mut self, t: Token) {
        let mut buf = [0u8; 65536];
        let mut budget = READ_BUDGET;
        loop {
            let Some(p) = self.peers.get_mut(&t) else {
                return;
            };
            match p.stream.read(&mut buf) {
                Ok(0) => return self.drop_peer(t, "end of stream"),
                Ok(n) => {
                    p.inbuf.extend_from_slice(&buf[..n]);
                    if let Err(why) = self.frames(t) {
                        self.stats.dropped_malformed += 1;
                        return self.drop_peer(t, &why);
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        self.again.push(t);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.drop_peer(t, &e.to_string()),
            }
        }
    }

    /// Handles every complete frame in the peer's input buffer.
    fn frames(&mut self, t: Token) -> Result<(), String> {
        let mut pos = 0;
        loop {
            let Some(p) = self.peers.get_mut(&t) else {
                return Ok(());
            };
            let avail = &p.inbuf[pos..];
            if avail.len() < HEADER_LEN {
                break;
            }
            let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
            if len > p.frame_max() {
                return Err(format!("frame of {len} bytes refused"));
            }
            if avail.len() < HEADER_LEN + len {
                break;
            }
            let msg = Message::decode_payload(&avail[HEADER_LEN..HEADER_LEN + len])
                .map_err(|e| e.to_string())?;
            pos += HEADER_LEN + len;
            self.handle(t, msg)?;
        }
        if let Some(p) = self.peers.get_mut(&t) {
            p.inbuf.drain(..pos);
            if p.inbuf.capacity() > 2 * SHIM_FRAME_MAX && p.inbuf.len() < SHIM_FRAME_MAX {
                p.inbuf.shrink_to(SHIM_FRAME_MAX);
            }
        }
        Ok(())
    }

    fn handle(&mut self, t: Token, msg: Message) -> Result<(), String> {
        let now = self.now_ms();
        let p = self.peers.get_mut(&t).unwrap();
        match (&p.kind, msg) {
            (Kind::New, Message::Hello(h)) => {
                let decision = self.policy.decide(&h.comm, &h.exe);
                let pid = p.pid;
                let tracked = decision == Decision::Track;
                if h.pid != pid {
                    debug!("Hello says pid {} but the socket's peer is {pid}", h.pid);
                }
                p.kind = Kind::Shim {
                    hello: h.clone(),
                    tracked,
                };
                if tracked {
                    info!("tracking pid {pid} ({} {})", h.comm, h.exe);
                    p.pidfd = pidfd_open(pid);
                    self.engine
                        .add_client(t.0 as ClientId, pid, &h.comm, h.page_size as u64, now);
                    let flags = if self.policy.cover_maps {
                        ksmplus_common::track_flags::COVER_MAPS
                    } else {
                        0
                    };
                    self.send(t, &Message::Track { flags });
                } else {
                    if decision == Decision::Excluded {
                        self.stats.excluded += 1;
                    } else {
                        self.stats.ignored += 1;
                    }
                    debug!("ignoring pid {pid} ({} {}): {decision:?}", h.comm, h.exe);
                    p.close_after_flush = true;
                    self.send(t, &Message::Ignore);
                }
                Ok(())
            }
            (Kind::New, Message::ControlRequest { json }) => {
                p.kind = Kind::Control;
                self.control(t, &json);
                Ok(())
            }
            (Kind::Control, Message::ControlRequest { json }) => {
                self.control(t, &json);
                Ok(())
            }
            (Kind::Shim { tracked, .. }, m)
                if m.is_from_shim() && !matches!(m, Message::Hello(_)) =>
            {
                if *tracked {
                    self.engine.on_message(t.0 as ClientId, m, now);
                }
                Ok(())
            }
            (k, m) => Err(format!("unexpected {} from a {k:?} peer", msg_name(&m))),
        }
    }

    fn control(&mut self, t: Token, json: &str) {
        let reply = control::handle(self, json);
        self.send(t, &Message::ControlReply { json: reply });
    }

    /// Queues a message to a peer and tries to write it now.
    fn send(&mut self, t: Token, m: &Message) {
        let Some(p) = self.peers.get_mut(&t) else {
            return;
        };
        if p.out_pos > 0 && p.out_pos == p.out.len() {
            p.out.clear();
            p.out_pos = 0;
        }
        m.encode(&mut p.out);
        if p.pending_out() > p.out_max() {
            self.stats.dropped_overflow += 1;
            return self.drop_peer(t, "output buffer overflow (peer not reading)");
        }
        self.flush(t);
    }

    fn flush(&mut self, t: Token) {
        let Some(p) = self.peers.get_mut(&t) else {
            return;
        };
        while p.out_pos < p.out.len() {
            match p.stream.write(&p.out[p.out_pos..]) {
                Ok(0) => return self.drop_peer(t, "write returned 0"),
                Ok(n) => p.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.drop_peer(t, &e.to_string()),
            }
        }
        p.out.clear();
        p.out_pos = 0;
        if p.out.capacity() > SHIM_FRAME_MAX {
            p.out.shrink_to(4096);
        }
        if p.close_after_flush {
            self.drop_peer(t, "ignored by policy");
        }
    }

    /// Connected peers by kind: (shims tracked, shims untracked, control, not yet identified).
    pub fn peer_counts(&self) -> (u64, u64, u64, u64) {
        let mut c = (0, 0, 0, 0);
        for p in self.peers.values() {
            match p.kind {
                Kind::Shim { tracked: true, .. } => c.0 += 1,
                Kind::Shim { tracked: false, .. } => c.1 += 1,
                Kind::Control => c.2 += 1,
                Kind::New => c.3 += 1,
            }
        }
        c
    }

    /// False if the client's process has exited, so what was just read from `/proc/PID` may
    /// belong to another process that got the pid (or the client is gone). Call it after the
    /// read: a process alive after the read held its pid during it.
    pub fn client_alive(&self, id: ClientId) -> bool {
        match self.peers.get(&Token(id as usize)) {
            Some(p) => !p.pidfd.as_ref().is_some_and(pidfd_exited),
            None => false,
        }
    }

    /// Tracked clients: (client id, hello, pid).
    pub fn tracked(&self) -> Vec<(ClientId, &Hello, u32)> {
        let mut v: Vec<_> = self
            .peers
            .iter()
            .filter_map(|(t, p)| match &p.kind {
                Kind::Shim {
                    hello,
                    tracked: true,
                } => Some((t.0 as ClientId, hello, p.pid)),
                _ => None,
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    pub fn uptime_ms(&self) -> u64 {
        self.now_ms()
    }
}

fn msg_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::ControlRequest { .. } => "ControlRequest",
        Message::ControlReply { .. } => "ControlReply",
        Message::Track { .. } | Message::Ignore => "agent command",
        Message::Fingerprint { .. } | Message::Madvise { .. } | Message::GetStats { .. } => {
            "agent command"
        }
        _ => "shim message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard behind `client_alive`: a pidfd polls "exited" only once its process is gone,
    /// and keeps saying so after the pid is reaped (when the pid could be recycled).
    #[test]
    fn pidfd_tells_a_live_process_from_an_exited_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let fd = pidfd_open(child.id()).expect("pidfd_open (Linux >= 5.3)");
        assert!(!pidfd_exited(&fd), "a running process");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(pidfd_exited(&fd), "killed and reaped");
    }
}
