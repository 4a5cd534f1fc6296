//! The agent's I/O around the pure engine: one thread, one `mio` event loop.
//!
//! - `socket`: the listener and its peers (a shim's one Hello, ksmplusctl's requests);
//! - `tunables`: the policy's ksmd settings;
//! - this module: the loop — tracked processes ([`Client`]s) and their families, the engine's
//!   commands executed against `/proc` (residency, fingerprints) or posted to the channel page
//!   (marks), kernel feedback, and the policy.
//!
//! Invariants:
//! - The loop sleeps until something is due: an idle agent with no tracked process never wakes
//!   on a timer; periodic work of tracked processes is gathered on a half-second grid.
//! - One turn does a bounded amount of `/proc` work ([`TURN_BUDGET`]); status replies are
//!   built from what the agent already holds plus one cheap `ksm_stat` read per process, so no
//!   request waits behind a walk of every process's smaps (coverage figures are refreshed in
//!   the background, at most one process per second).
//! - A process is forgotten as soon as its pidfd says it exited: its handles, engine state and
//!   fingerprints.
//! - What the agent reads from `/proc/PID` about a client counts only if the client's pidfd
//!   still says alive after the read.

pub mod socket;
pub mod tunables;

use crate::client::{Client, Item, Sandbox};
use crate::engine::{ClientId, Command, Config, Engine, Reply, Status};
use crate::procfs;
use crate::{debug, info, warn};
use ksmplus_common::channel::{self, verdict};
use ksmplus_common::policy::{Decision, Policy, SandboxFallback};
use ksmplus_common::{ksm, maps, Hello, Message};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket::{PeerEvent, Peers};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_PEER: usize = 2;
/// pidfds are registered as `PIDFD_BASE + client id`.
const PIDFD_BASE: usize = 1 << 48;

/// Most time one turn spends on engine work before it serves sockets again.
pub const TURN_BUDGET: Duration = Duration::from_millis(20);
/// A posted batch not executed after this long gets a wake-up signal; then every
/// [`WAKE_AGAIN_MS`], at most [`MAX_WAKES`] times.
pub const WAKE_AFTER_MS: u64 = 20;
pub const WAKE_AGAIN_MS: u64 = 1000;
pub const MAX_WAKES: u32 = 5;
/// How often a family's doorbell is read, and its process tree walked without a ring.
pub const DOORBELL_MS: u64 = 500;
/// For its first [`YOUNG_FAMILY_MS`], a family's doorbell is read every [`DOORBELL_YOUNG_MS`].
pub const YOUNG_FAMILY_MS: u64 = 10_000;
pub const DOORBELL_YOUNG_MS: u64 = 100;
pub const FAMILY_WALK_MS: u64 = 5000;
/// Kernel feedback pace.
pub const FEEDBACK_MS: u64 = 1000;
/// Background coverage figures: one process at most this often, each at most this old.
pub const COVERAGE_EVERY_MS: u64 = 1000;
pub const COVERAGE_MAX_AGE_MS: u64 = 30_000;
/// Periodic work is gathered on this grid, so many processes share a wake-up.
pub const GRID_MS: u64 = 500;

/// How the agent is started.
#[derive(Clone, Debug)]
pub struct Options {
    pub socket: PathBuf,
    pub policy_path: PathBuf,
    /// Root of `/proc` and `/sys` (tests may point it elsewhere).
    pub root: PathBuf,
    /// Seed of the sampling PRNG.
    pub seed: u64,
    /// Where the agent keeps what it learned across runs (`None`: in memory only).
    pub state: Option<PathBuf>,
}

/// Counters shown by `status` (besides the socket's own).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub ignored: u64,
    pub excluded: u64,
    pub adopted: u64,
    pub reloads: u64,
    pub wakes: u64,
    pub wakeups: u64,
}

/// A process the policy does not track: its shim is dormant; kept to track it after a reload
/// that names it.
#[derive(Clone, Debug)]
pub struct Dormant {
    pub channel: u64,
    pub nonce: u64,
    pub comm: String,
    pub exe: String,
}

/// Processes sharing a doorbell (an exec'd process and everything forked from it).
#[derive(Clone, Debug)]
pub struct Family {
    pub born_ms: u64,
    pub doorbell: u64,
    pub channel: u64,
    pub rings_seen: u64,
    pub doorbell_at: u64,
    pub walk_at: u64,
    pub members: BTreeSet<ClientId>,
    /// Fork children whose channel was not initialised yet (no hook ran): pid → tries.
    pub pending: BTreeMap<u32, u32>,
}

/// Background figures of a client for `status`.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub coverage: Option<(ksmplus_common::status::Coverage, u64)>,
}

pub struct Agent {
    pub opts: Options,
    poll: Poll,
    pub peers: Peers,
    pub engine: Engine,
    pub policy: Policy,
    started: Instant,
    pub uid: u32,
    pub stats: Stats,
    pub clients: BTreeMap<ClientId, Client>,
    by_pid: HashMap<u32, ClientId>,
    pub families: HashMap<u64, Family>,
    pub dormant: HashMap<u32, Dormant>,
    /// pids known to have no shim (or a foreign channel): not read again.
    no_shim: BTreeSet<u32>,
    pub figures: HashMap<ClientId, Figures>,
    next_id: ClientId,
    tunables: tunables::Tunables,
    sig_fd: i32,
    shutdown: bool,
    feedback_at: u64,
    coverage_at: u64,
    /// Parents switched to merge-any by the fallback: parent client → children refusing.
    pub fallback: BTreeMap<ClientId, u32>,
    /// Parents with at least one child that accepts marks: parent client → how many.
    allowing: BTreeMap<ClientId, u32>,
    pub learned: crate::learned::Learned,
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

/// Raises the soft fd limit to the hard one: three descriptors per tracked process.
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

fn grid(t: u64) -> u64 {
    t.div_ceil(GRID_MS) * GRID_MS
}

fn refused(errno: i32) -> bool {
    matches!(errno, libc::EPERM | libc::EACCES | libc::ENOSYS)
}

impl Agent {
    /// Binds the socket. `policy` is the already-loaded policy.
    pub fn new(opts: Options, policy: Policy) -> Result<Agent, socket::SocketError> {
        raise_nofile();
        let poll = Poll::new().map_err(|source| socket::SocketError::Io {
            path: "epoll".into(),
            source,
        })?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let peers = Peers::bind(&opts.socket, poll.registry(), LISTENER, FIRST_PEER, uid)?;
        let engine = Engine::new(Config::from_policy(&policy), opts.seed, 0);
        let mut a = Agent {
            tunables: tunables::Tunables::new(&opts.root),
            opts,
            poll,
            peers,
            engine,
            policy,
            started: Instant::now(),
            uid,
            stats: Stats::default(),
            clients: BTreeMap::new(),
            by_pid: HashMap::new(),
            families: HashMap::new(),
            dormant: HashMap::new(),
            no_shim: BTreeSet::new(),
            figures: HashMap::new(),
            next_id: 1,
            sig_fd: -1,
            shutdown: false,
            feedback_at: 0,
            coverage_at: 0,
            fallback: BTreeMap::new(),
            allowing: BTreeMap::new(),
            learned: crate::learned::Learned::default(),
        };
        a.learned = crate::learned::Learned::load(a.opts.state.clone());
        if a.uid == 0 {
            a.tunables.apply(&a.policy.ksmd);
        }
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

    pub fn uptime_ms(&self) -> u64 {
        self.now_ms()
    }

    fn root(&self) -> PathBuf {
        self.opts.root.clone()
    }

    /// Runs until SIGTERM/SIGINT, then removes the socket and restores the ksmd tunables it
    /// changed. Marks stay in the running programs.
    pub fn run(&mut self) -> io::Result<()> {
        self.adopt_running();
        let r = self.serve();
        let _ = std::fs::remove_file(&self.opts.socket);
        self.tunables.restore();
        r
    }

    fn serve(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while !self.shutdown {
            let now = self.now_ms();
            let timeout = self
                .next_due(now)
                .map(|t| Duration::from_millis(t.saturating_sub(now)));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.stats.wakeups += 1;
            let now = self.now_ms();
            let mut ready = Vec::new();
            let mut writable = Vec::new();
            let mut exited = Vec::new();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.peers.accept(self.poll.registry(), now),
                    SIGNALS => self.drain_signals(),
                    t if t.0 >= PIDFD_BASE => exited.push((t.0 - PIDFD_BASE) as ClientId),
                    t => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            ready.push(t);
                        }
                        if ev.is_writable() {
                            writable.push(t);
                        }
                    }
                }
            }
            for id in exited {
                self.remove_client(id, "exited");
            }
            for ev in self.peers.read(self.poll.registry(), &ready, now) {
                match ev {
                    PeerEvent::Hello { pid, hello } => self.on_hello(pid, hello),
                    PeerEvent::Control { token, json } => {
                        let reply = crate::control::handle(self, &json);
                        self.peers.reply(
                            self.poll.registry(),
                            token,
                            &Message::ControlReply { json: reply },
                        );
                    }
                }
            }
            for t in writable {
                self.peers.flush(self.poll.registry(), t);
            }
            self.turn();
        }
        Ok(())
    }

    /// The next time the loop must wake (`None`: only for sockets and signals).
    fn next_due(&self, now: u64) -> Option<u64> {
        if self.peers.has_work() {
            return Some(now);
        }
        let mut due: Option<u64> = self.peers.next_expiry();
        let mut at = |t: u64| due = Some(due.map_or(t, |d: u64| d.min(t)));
        // Urgent: the engine within a second (first rechecks), batches in flight.
        if let Some(t) = self.engine.next_due(now) {
            at(if t <= now + 1000 { t } else { grid(t) });
        }
        for c in self.clients.values() {
            if let Some(p) = &c.posted {
                at(p.check_ms.max(now + 1));
            } else if !c.queue.is_empty() {
                at(now);
            }
            at(if c.check_every_ms <= channel_fast() {
                c.check_at_ms
            } else {
                grid(c.check_at_ms)
            });
        }
        for f in self.families.values() {
            let t = f.doorbell_at.min(f.walk_at);
            at(if now < f.born_ms + YOUNG_FAMILY_MS {
                t
            } else {
                grid(t)
            });
        }
        if !self.clients.is_empty() && self.engine.has_marked() {
            at(grid(self.feedback_at));
        }
        due
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

    // ---- processes ----------------------------------------------------------------------

    fn new_id(&mut self) -> ClientId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn on_hello(&mut self, pid: u32, hello: Hello) {
        if let Some(&id) = self.by_pid.get(&pid) {
            // The same pid after an exec: the old image's channel is gone.
            let stale = self
                .clients
                .get_mut(&id)
                .is_none_or(|c| c.refresh().is_none() || c.nonce != hello.nonce);
            if !stale {
                return;
            }
            self.remove_client(id, "exec'd");
        }
        self.dormant.remove(&pid);
        let id = self.new_id();
        match Client::adopt(&self.root(), id, pid, hello.channel, Some(hello.nonce)) {
            Ok((mut c, maps)) => {
                c.hello = true;
                if !hello.comm.is_empty() {
                    c.comm = hello.comm;
                }
                if !hello.exe.is_empty() {
                    c.exe = hello.exe;
                }
                self.admit(c, &maps);
            }
            Err(e) => debug!("Hello from pid {pid} not taken: {e}"),
        }
    }

    /// Decides a new process by the policy and tracks it or lets its shim go dormant.
    fn admit(&mut self, mut c: Client, maps_text: &str) {
        let decision = self.policy.decide(&c.comm, &c.exe);
        let pid = c.pid();
        if decision != Decision::Track {
            if decision == Decision::Excluded {
                self.stats.excluded += 1;
            } else {
                self.stats.ignored += 1;
            }
            if let Err(e) = c.set_verdict(verdict::IGNORE) {
                debug!("pid {pid}: cannot write its verdict: {e}");
            }
            debug!(
                "not tracking pid {pid} ({} {}): {decision:?}",
                c.comm, c.exe
            );
            self.dormant.insert(
                pid,
                Dormant {
                    channel: c.channel,
                    nonce: c.nonce,
                    comm: c.comm.clone(),
                    exe: c.exe.clone(),
                },
            );
            return;
        }
        if let Err(e) = c.set_verdict(verdict::TRACK) {
            debug!("pid {pid}: cannot write its verdict: {e}");
            return;
        }
        let id = c.id;
        let now = self.now_ms();
        if self
            .poll
            .registry()
            .register(
                &mut SourceFd(&c.proc.pidfd()),
                Token(PIDFD_BASE + id as usize),
                Interest::READABLE,
            )
            .is_err()
        {
            return;
        }
        info!(
            "tracking pid {pid} ({} {}){}",
            c.comm,
            c.exe,
            if c.hello { "" } else { ", found without Hello" }
        );
        if !c.hello {
            self.stats.adopted += 1;
        }
        self.dormant.remove(&pid);
        self.engine.add_client(id, pid, &c.comm, c.page_size, now);
        let min = self.engine.config().min_region_bytes;
        c.refresh_stacks(&self.root());
        for ev in c.maps_events(maps_text, min) {
            self.engine.on_event(id, ev, now);
        }
        c.maps_read_ms = now;
        c.check_at_ms = now + crate::client::CHECK_MIN_MS;
        if c.seccomp != 0 {
            // Does its sandbox let KSM advice through? Learn it before sampling pays nothing.
            c.queue_op(Item::Probe);
        }
        c.key = crate::learned::key_of(&self.root(), pid, &c.exe);
        if self.policy.sandbox_fallback == SandboxFallback::MergeAny
            && c.seccomp == 0
            && self.learned.is_fork_server(&c.key)
        {
            info!(
                "pid {pid}: a fork server whose children refuse marks (learned): merge-any for them"
            );
            c.queue_op(Item::MergeAny(true));
            self.fallback.insert(id, 0);
        }
        if c.family != 0 {
            let f = self.families.entry(c.family).or_insert_with(|| Family {
                born_ms: now,
                doorbell: c.doorbell,
                channel: c.channel,
                rings_seen: 0,
                doorbell_at: now,
                walk_at: now + FAMILY_WALK_MS,
                members: BTreeSet::new(),
                pending: BTreeMap::new(),
            });
            f.members.insert(id);
            f.pending.remove(&pid);
        }
        self.by_pid.insert(pid, id);
        self.clients.insert(id, c);
    }

    fn remove_client(&mut self, id: ClientId, why: &str) {
        let Some(c) = self.clients.remove(&id) else {
            return;
        };
        debug!("pid {} forgotten: {why}", c.pid());
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&c.proc.pidfd()));
        self.by_pid.remove(&c.pid());
        self.engine.remove_client(id);
        self.figures.remove(&id);
        self.fallback.remove(&id);
        self.allowing.remove(&id);
        if let Some(f) = self.families.get_mut(&c.family) {
            f.members.remove(&id);
            if f.members.is_empty() {
                self.families.remove(&c.family);
            }
        }
    }

    /// At start: every process of this user that has the shim loaded (started before the agent,
    /// or unable to reach the socket) is found through its anchor.
    fn adopt_running(&mut self) {
        let root = self.root();
        let Ok(dir) = std::fs::read_dir(root.join("proc")) else {
            return;
        };
        let me = std::process::id();
        let mut pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&p| p != me)
            .collect();
        pids.sort_unstable();
        for pid in pids {
            use std::os::unix::fs::MetadataExt;
            let owned = std::fs::metadata(root.join(format!("proc/{pid}")))
                .is_ok_and(|m| m.uid() == self.uid || self.uid == 0);
            if owned {
                self.adopt_by_anchor(pid);
            }
        }
    }

    /// Finds a process's channel through the anchor in the shim's data and admits it.
    fn adopt_by_anchor(&mut self, pid: u32) -> bool {
        if self.by_pid.contains_key(&pid) || self.no_shim.contains(&pid) {
            return false;
        }
        let root = self.root();
        let Ok(text) = procfs::read_maps(&root, pid) else {
            return false;
        };
        if maps::shim_data(&maps::parse(&text)).is_empty() {
            self.no_shim.insert(pid);
            return false;
        }
        let Ok(h) = procfs::ProcHandle::open(&root, pid) else {
            return false;
        };
        let found = procfs::find_channel(&h, &text);
        drop(h);
        let Some((ch, _)) = found else {
            return false;
        };
        let id = self.new_id();
        match Client::adopt(&root, id, pid, ch, None) {
            Ok((c, maps)) => {
                if c.last.verdict == verdict::IGNORE
                    && self.policy.decide(&c.comm, &c.exe) != Decision::Track
                {
                    self.no_shim.insert(pid);
                    return false;
                }
                self.admit(c, &maps);
                true
            }
            Err(e) => {
                debug!("pid {pid}: {e}");
                false
            }
        }
    }

    /// Reads each family's doorbell; a ring (or the periodic walk) looks for new processes
    /// among the descendants of its members.
    fn families_turn(&mut self, now: u64) {
        let keys: Vec<u64> = self.families.keys().copied().collect();
        for key in keys {
            let Some(f) = self.families.get(&key) else {
                continue;
            };
            let mut walk = now >= f.walk_at || !f.pending.is_empty() && now >= f.doorbell_at;
            if now >= f.doorbell_at {
                let rings = f.members.iter().find_map(|m| {
                    let c = self.clients.get(m)?;
                    let mut b = [0u8; 8];
                    c.proc
                        .read(f.doorbell + channel::offsets::DOORBELL_RINGS as u64, &mut b)
                        .ok()
                        .map(|()| u64::from_ne_bytes(b))
                });
                let f = self.families.get_mut(&key).unwrap();
                // A young family forks its first children now: look more often.
                f.doorbell_at = now
                    + if now < f.born_ms + YOUNG_FAMILY_MS {
                        DOORBELL_YOUNG_MS
                    } else {
                        DOORBELL_MS
                    };
                if let Some(r) = rings {
                    if r != f.rings_seen {
                        f.rings_seen = r;
                        walk = true;
                    }
                }
            }
            if walk {
                self.walk_family(key, now);
            }
        }
    }

    /// Looks at every descendant of the family's members: a fork child with an initialised
    /// channel joins; an exec'd descendant with a shim is adopted through its anchor.
    fn walk_family(&mut self, key: u64, now: u64) {
        let root = self.root();
        let Some(f) = self.families.get_mut(&key) else {
            return;
        };
        f.walk_at = now + FAMILY_WALK_MS;
        let addr = f.channel;
        let nonces: BTreeSet<u64> = f
            .members
            .iter()
            .filter_map(|m| self.clients.get(m).map(|c| c.nonce))
            .collect();
        let mut frontier: Vec<u32> = f
            .members
            .iter()
            .filter_map(|m| self.clients.get(m).map(|c| c.pid()))
            .collect();
        let mut seen: BTreeSet<u32> = frontier.iter().copied().collect();
        let mut pending = std::mem::take(&mut f.pending);
        while let Some(pid) = frontier.pop() {
            for child in procfs::children(&root, pid) {
                if !seen.insert(child) {
                    continue;
                }
                frontier.push(child);
                if self.by_pid.contains_key(&child)
                    || self.dormant.contains_key(&child)
                    || self.no_shim.contains(&child)
                {
                    continue;
                }
                let id = self.new_id();
                match Client::adopt(&root, id, child, addr, None) {
                    Ok((c, maps)) if nonces.contains(&c.parent_nonce) => {
                        pending.remove(&child);
                        self.admit(c, &maps);
                    }
                    _ => {
                        // Not initialised yet (no hook ran in it), or an exec'd program with a
                        // channel of its own.
                        if !self.adopt_by_anchor(child) {
                            let tries = pending.entry(child).or_insert(0);
                            *tries += 1;
                            if *tries > 20 {
                                pending.remove(&child);
                                self.no_shim.insert(child);
                            }
                        }
                    }
                }
            }
        }
        if let Some(f) = self.families.get_mut(&key) {
            pending.retain(|p, _| seen.contains(p));
            f.pending = pending;
        }
    }

    // ---- the turn -----------------------------------------------------------------------

    fn turn(&mut self) {
        let now = self.now_ms();
        self.clients_turn(now);
        self.families_turn(now);
        self.engine_turn();
        let now = self.now_ms();
        self.post_batches(now);
        if now >= self.feedback_at {
            self.feedback_at = now + FEEDBACK_MS;
            if self.engine.has_marked() {
                self.feedback();
            }
        }
        if now >= self.coverage_at && !self.clients.is_empty() {
            self.coverage_at = now + COVERAGE_EVERY_MS;
            self.refresh_one_coverage(now);
        }
        self.peers.expire(self.poll.registry(), now);
    }

    /// Channel reads: finished batches, wake-ups, `map_gen` checks and maps refreshes.
    fn clients_turn(&mut self, now: u64) {
        let root = self.root();
        let min = self.engine.config().min_region_bytes;
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        let mut gone = Vec::new();
        for id in ids {
            let c = self.clients.get_mut(&id).unwrap();
            let batch_due = c.posted.as_ref().is_some_and(|p| now >= p.check_ms);
            if !batch_due && now < c.check_at_ms {
                continue;
            }
            if c.refresh().is_none() {
                gone.push(id);
                continue;
            }
            if let Some(results) = c.take_done() {
                self.batch_done(id, results, now);
            }
            let c = self.clients.get_mut(&id).unwrap();
            let (cpid, snap) = (c.pid(), &c.last);
            if let Some(p) = c.posted.as_mut() {
                let wake_due = if p.wakes == 0 {
                    p.at_ms + WAKE_AFTER_MS
                } else {
                    p.last_wake_ms + WAKE_AGAIN_MS
                };
                p.check_ms = now + p.every_ms;
                p.every_ms = (p.every_ms * 2).min(crate::client::BATCH_POLL_MAX_MS);
                if now >= wake_due && p.wakes < MAX_WAKES {
                    p.wakes += 1;
                    p.last_wake_ms = now;
                    match crate::wake::wake(&root, cpid, snap) {
                        Ok(tid) => {
                            self.stats.wakes += 1;
                            // Look again soon: the handler runs at once.
                            p.check_ms = now + crate::client::BATCH_POLL_MIN_MS;
                            p.every_ms = crate::client::BATCH_POLL_MIN_MS;
                            debug!("pid {cpid}: woke thread {tid}");
                        }
                        Err(why) => debug!("pid {cpid}: no wake-up: {why:?}"),
                    }
                }
                if p.wakes < MAX_WAKES {
                    p.check_ms = p.check_ms.min(if p.wakes == 0 {
                        p.at_ms + WAKE_AFTER_MS
                    } else {
                        p.last_wake_ms + WAKE_AGAIN_MS
                    });
                }
            }
            let c = self.clients.get_mut(&id).unwrap();
            c.trim_if_idle(now);
            if now >= c.check_at_ms {
                let changed = c.last.map_gen != c.map_gen_seen;
                if changed || now >= c.maps_read_ms + crate::client::MAPS_MAX_AGE_MS {
                    c.map_gen_seen = c.last.map_gen;
                    c.maps_read_ms = now;
                    match procfs::read_maps(&root, c.pid()) {
                        Ok(text) if c.proc.alive() => {
                            c.refresh_stacks(&root);
                            let evs = c.maps_events(&text, min);
                            let busy = !evs.is_empty();
                            for ev in evs {
                                self.engine.on_event(id, ev, now);
                            }
                            let c = self.clients.get_mut(&id).unwrap();
                            c.check_every_ms = if busy || changed {
                                crate::client::CHECK_MIN_MS
                            } else {
                                (c.check_every_ms * 2).min(c.max_check_ms())
                            };
                        }
                        _ => {
                            gone.push(id);
                            continue;
                        }
                    }
                } else {
                    c.check_every_ms = (c.check_every_ms * 2).min(c.max_check_ms());
                }
                let c = self.clients.get_mut(&id).unwrap();
                c.check_at_ms = now + c.check_every_ms;
            }
        }
        for id in gone {
            self.remove_client(id, "gone");
        }
    }

    fn batch_done(&mut self, id: ClientId, results: Vec<(Item, i32)>, now: u64) {
        for (item, res) in results {
            match item {
                Item::Engine(rid) => {
                    let status = if res == 0 {
                        Status::Ok
                    } else {
                        Status::Errno(res)
                    };
                    self.engine
                        .on_reply(id, Reply::Madvise { id: rid, status }, now);
                    if refused(res) {
                        self.sandbox_refuses(id, res);
                    }
                }
                Item::Probe => {
                    if res == 0 {
                        if let Some(c) = self.clients.get_mut(&id) {
                            c.sandbox = Sandbox::Allows;
                        }
                        self.child_allows(id);
                    } else if refused(res) {
                        self.sandbox_refuses(id, res);
                    }
                }
                Item::Trim => {}
                Item::MergeAny(on) => {
                    if let Some(c) = self.clients.get_mut(&id) {
                        if res == 0 {
                            c.merge_any = on;
                            info!(
                                "pid {}: merge-any {}",
                                c.pid(),
                                if on { "on" } else { "off" }
                            );
                        } else {
                            warn!("pid {}: PR_SET_MEMORY_MERGE refused: errno {res}", c.pid());
                        }
                    }
                }
            }
        }
    }

    /// The process's sandbox refuses KSM advice: stop sampling it (nothing could be marked),
    /// and apply the fallback to the process it was forked from.
    fn sandbox_refuses(&mut self, id: ClientId, errno: i32) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if matches!(c.sandbox, Sandbox::Refuses(_)) {
            return;
        }
        c.sandbox = Sandbox::Refuses(errno);
        c.queue.retain(|(i, _)| !matches!(i, Item::Engine(_)));
        let (pid, ppid) = (c.pid(), c.ppid);
        info!("pid {pid}: its sandbox refuses KSM advice (errno {errno})");
        self.engine.remove_client(id);
        if self.policy.sandbox_fallback != SandboxFallback::MergeAny {
            return;
        }
        let Some(&pid_c) = self.by_pid.get(&ppid) else {
            return;
        };
        let root = self.root();
        let Some(parent) = self.clients.get_mut(&pid_c) else {
            return;
        };
        // Only a parent without a seccomp filter (prctl is refused, or fatal, under one), and
        // none of whose children accepted marks (Firefox's fork server starts content
        // processes that accept marks, and a few utility processes that do not).
        // And only a fork server: single-threaded (Chromium's zygote), not a program that
        // happens to fork one sandboxed helper (Firefox's parent forks its socket process):
        // merge-any applies to the parent's own memory too.
        let st = match procfs::read_status(&root, parent.pid()) {
            Ok(s) => s,
            Err(e) => {
                debug!("pid {}: status: {e}", parent.pid());
                return;
            }
        };
        if st.seccomp != 0 || st.threads != 1 || self.allowing.contains_key(&pid_c) {
            debug!(
                "pid {}: no merge-any fallback (seccomp {}, {} threads, {} children accept marks)",
                parent.pid(),
                st.seccomp,
                st.threads,
                self.allowing.get(&pid_c).copied().unwrap_or(0)
            );
            return;
        }
        let key = parent.key.clone();
        let n = self.fallback.entry(pid_c).or_insert(0);
        *n += 1;
        if *n == 1 && !parent.merge_any {
            info!(
                "pid {}: children forked from it refuse marks (pid {pid}): merge-any for its next children",
                parent.pid()
            );
            parent.queue_op(Item::MergeAny(true));
        }
        self.learned.set_fork_server(&key, true);
    }

    /// A child that accepts marks: a parent switched to merge-any for its children goes back.
    fn child_allows(&mut self, id: ClientId) {
        let Some(ppid) = self.clients.get(&id).map(|c| c.ppid) else {
            return;
        };
        let Some(&p) = self.by_pid.get(&ppid) else {
            return;
        };
        *self.allowing.entry(p).or_insert(0) += 1;
        if self.fallback.remove(&p).is_some() {
            if let Some(parent) = self.clients.get_mut(&p) {
                self.learned.set_fork_server(&parent.key, false);
                info!(
                    "pid {}: a child accepts marks: merge-any off again",
                    parent.pid()
                );
                parent.queue_op(Item::MergeAny(false));
            }
        }
    }

    /// Runs the engine and executes what it asks: residency and fingerprints here and now,
    /// marks into the client's mailbox. Bounded by [`TURN_BUDGET`].
    fn engine_turn(&mut self) {
        let t0 = Instant::now();
        loop {
            let now = self.now_ms();
            self.engine.tick(now);
            let out = self.engine.take_output();
            if out.is_empty() {
                break;
            }
            for (id, cmd) in out {
                let Some(c) = self.clients.get_mut(&id) else {
                    continue;
                };
                let reply = match cmd {
                    Command::Residency {
                        id: rid,
                        start,
                        len,
                    } => {
                        match c
                            .proc
                            .residency(start, len, crate::engine::MAX_RESIDENCY_RUNS)
                        {
                            Ok((covered, runs)) => Reply::Residency {
                                id: rid,
                                status: Status::Ok,
                                covered,
                                runs,
                            },
                            Err(e) => Reply::Residency {
                                id: rid,
                                status: Status::Errno(e.raw_os_error().unwrap_or(libc::EIO)),
                                covered: len,
                                runs: Vec::new(),
                            },
                        }
                    }
                    Command::Fingerprint { id: rid, pages } => Reply::Fingerprint {
                        id: rid,
                        status: Status::Ok,
                        hashes: c.proc.hashes(&pages, c.page_size),
                    },
                    m @ Command::Madvise { .. } => {
                        c.queue_engine(&m);
                        continue;
                    }
                };
                self.engine.on_reply(id, reply, now);
            }
            if t0.elapsed() >= TURN_BUDGET {
                break;
            }
        }
    }

    fn post_batches(&mut self, now: u64) {
        let mut gone = Vec::new();
        for (id, c) in self.clients.iter_mut() {
            match c.post(now) {
                Ok(true) => c.check_at_ms = c.check_at_ms.min(now + WAKE_AFTER_MS),
                Ok(false) => {}
                Err(e) => {
                    debug!("pid {}: cannot post a batch: {e}", c.pid());
                    gone.push(*id);
                }
            }
        }
        for id in gone {
            self.remove_client(id, "channel unwritable");
        }
    }

    /// Kernel feedback: ksmd's full_scans and, for clients with runs due, their smaps.
    fn feedback(&mut self) {
        let root = self.root();
        let Ok(scans) = ksm::read_sysfs(&root, "full_scans") else {
            return;
        };
        self.engine.set_full_scans(scans.max(0) as u64);
        for id in self.engine.due_checks() {
            let Some(c) = self.clients.get(&id) else {
                continue;
            };
            match ksm::read_smaps(&root, c.pid()) {
                Ok(_) if !c.proc.alive() => {
                    debug!("pid {}: exited while its smaps were read", c.pid())
                }
                Ok(vmas) => {
                    let v: Vec<(u64, u64, u64)> =
                        vmas.iter().map(|v| (v.start, v.end, v.ksm_kib)).collect();
                    self.engine.feedback(id, &v);
                    let cov = crate::control::coverage_of(c, &vmas);
                    self.figures.entry(id).or_default().coverage = Some((cov, self.now_ms()));
                }
                Err(e) => debug!("pid {}: {e}", c.pid()),
            }
        }
    }

    /// Coverage figures of the client whose figures are oldest (and older than the limit).
    fn refresh_one_coverage(&mut self, now: u64) {
        let root = self.root();
        let oldest = self
            .clients
            .keys()
            .map(|id| {
                let at = self
                    .figures
                    .get(id)
                    .and_then(|f| f.coverage.as_ref().map(|c| c.1))
                    .unwrap_or(0);
                (at, *id)
            })
            .min();
        let Some((at, id)) = oldest else { return };
        if at != 0 && now < at + COVERAGE_MAX_AGE_MS {
            return;
        }
        let c = &self.clients[&id];
        if let Ok(vmas) = ksm::read_smaps(&root, c.pid()) {
            if c.proc.alive() {
                let cov = crate::control::coverage_of(c, &vmas);
                self.figures.entry(id).or_default().coverage = Some((cov, now));
            }
        }
    }

    // ---- policy -------------------------------------------------------------------------

    /// Reloads the policy file. On error the old policy stays in force. Tracked processes the
    /// policy no longer names get their marks taken back and go dormant; dormant ones it now
    /// names are tracked.
    pub fn reload(&mut self) -> Result<(), String> {
        let p = Policy::load(&self.opts.policy_path).map_err(|e| e.to_string())?;
        self.policy = p;
        self.engine.set_config(Config::from_policy(&self.policy));
        self.stats.reloads += 1;
        if self.uid == 0 {
            self.tunables.apply(&self.policy.ksmd);
        }
        let now = self.now_ms();
        let stop: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| self.policy.decide(&c.comm, &c.exe) != Decision::Track)
            .map(|(id, _)| *id)
            .collect();
        for id in stop {
            let marked = self.engine.marked(id);
            if let Some(c) = self.clients.get_mut(&id) {
                for (start, len) in marked {
                    c.queue.push_back((
                        Item::Engine(0),
                        channel::Command {
                            op: channel::op::UNMERGEABLE,
                            start,
                            len,
                        },
                    ));
                }
                if c.merge_any {
                    c.queue_op(Item::MergeAny(false));
                }
                let _ = c.post(now);
                let _ = c.set_verdict(verdict::IGNORE);
                if let Some(snap) = c.refresh().cloned() {
                    let _ = crate::wake::wake(&self.opts.root, c.pid(), &snap);
                }
                self.dormant.insert(
                    c.pid(),
                    Dormant {
                        channel: c.channel,
                        nonce: c.nonce,
                        comm: c.comm.clone(),
                        exe: c.exe.clone(),
                    },
                );
            }
            self.remove_client(id, "no longer in the policy");
        }
        let start: Vec<(u32, Dormant)> = self
            .dormant
            .iter()
            .filter(|(_, d)| self.policy.decide(&d.comm, &d.exe) == Decision::Track)
            .map(|(p, d)| (*p, d.clone()))
            .collect();
        for (pid, d) in start {
            self.dormant.remove(&pid);
            let id = self.new_id();
            if let Ok((c, maps)) = Client::adopt(&self.root(), id, pid, d.channel, Some(d.nonce)) {
                self.admit(c, &maps);
            }
        }
        // Forget dormant processes that are gone.
        let root = self.root();
        self.dormant
            .retain(|pid, _| root.join(format!("proc/{pid}")).exists());
        info!("policy reloaded from {}", self.opts.policy_path.display());
        Ok(())
    }

    /// `(tracked, dormant)` processes.
    pub fn process_counts(&self) -> (u64, u64) {
        (self.clients.len() as u64, self.dormant.len() as u64)
    }
}

/// The fastest `map_gen` check interval, below which checks are not put on the grid.
fn channel_fast() -> u64 {
    crate::client::CHECK_MIN_MS * 4
}
