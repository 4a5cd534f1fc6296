//! The agent's I/O around the pure engine: one thread, one `mio` event loop.
//!
//! - `socket`: the listener and its peers (a shim's one Hello, ksmplusctl's requests);
//! - `tunables`: the policy's ksmd settings;
//! - `processes`: which processes are tracked (Hello, doorbells and process trees, the anchor
//!   scan at start), and forgetting them;
//! - `turn`: after the sockets, each turn — channel reads, wake-ups, maps refreshes, the
//!   sandbox fallback, the engine's commands executed against `/proc` (residency,
//!   fingerprints) or posted to the channel page (marks), kernel feedback;
//! - `reload`: the policy, reloaded;
//! - this module: the agent's state and the loop itself.
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

mod control;
mod processes;
mod reload;
pub mod socket;
pub mod tunables;
mod turn;

use crate::client::{AdoptError, Client, Item, Sandbox};
use crate::engine::{ClientId, Command, Config, Engine, Reply, Status};
use crate::procfs::{self, ProcError};
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
/// Known-but-untracked pids (dormant, no shim, unreadable) are checked for exit this often, on a
/// turn the loop makes anyway (never a wake-up of its own).
const FORGET_EVERY_MS: u64 = 10_000;

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
/// A family's process tree is walked this often without a ring ([`Family::walk_pace`]) …
pub const FAMILY_WALK_MS: u64 = 5000;
/// … and this often for [`YOUNG_FAMILY_MS`] after it was born or its doorbell last rang: a
/// fork child that execs a sandboxed program (bubblewrap's, for WebKit's web processes) starts
/// a shim that cannot say Hello and does not ring, and is found by the walk. At 5 s epiphany's
/// web processes went untracked (their freed blocks warm in the shim's cache, nothing marked)
/// for 4-5 s after they started.
pub const FAMILY_WALK_YOUNG_MS: u64 = 1000;
/// A due walk runs only when a process was born into the family's tree since its last walk
/// ([`Births`]); at least this often it runs anyway.
pub const FAMILY_WALK_MAX_MS: u64 = 60_000;
/// More pids handed out than this since the last look at births: every family walks.
pub const MAX_BIRTHS: u32 = 1024;
/// Kernel feedback pace.
pub const FEEDBACK_MS: u64 = 1000;
/// Background coverage figures: one process at most this often, each at most this old (a
/// figure for the user, `status` shows its age; the smaps read behind it was, at 60 s, the
/// largest part of the agent's CPU on a converged desktop once the feedback stopped reading
/// smaps).
pub const COVERAGE_EVERY_MS: u64 = 1000;
pub const COVERAGE_MAX_AGE_MS: u64 = 300_000;
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
    /// Family tree walks made, and due walks skipped because nothing was born into the tree.
    pub walks: u64,
    pub walks_skipped: u64,
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

/// A process that said Hello, which the policy would track, and that the agent cannot read
/// (not dumpable: setuid, `PR_SET_DUMPABLE` 0; or another user's): `status` lists it.
#[derive(Clone, Debug)]
pub struct Unreadable {
    pub comm: String,
    pub exe: String,
    pub reason: String,
}

/// Processes sharing a doorbell (an exec'd process and everything forked from it).
#[derive(Clone, Debug)]
pub struct Family {
    /// The socket its processes' shims were started for (see `Channel::socket_hash`).
    pub socket_hash: u64,
    pub born_ms: u64,
    pub doorbell: u64,
    pub channel: u64,
    pub rings_seen: u64,
    /// When its doorbell last rang (agent clock; `born_ms` before the first ring).
    pub rang_ms: u64,
    pub doorbell_at: u64,
    pub walk_at: u64,
    pub members: BTreeSet<ClientId>,
    /// Fork children whose channel was not initialised yet (no hook ran): pid → tries.
    pub pending: BTreeMap<u32, u32>,
    /// Fork children still uninitialised after every try (idle since the fork): looked at
    /// again only when the doorbell rings (their first hook rings it).
    pub idle: BTreeSet<u32>,
    /// Every pid of the family's tree (members and their descendants) at its last walk, and
    /// members that joined since.
    pub tree: BTreeSet<u32>,
    /// A process was born into the tree since its last walk (or the agent could not tell).
    pub dirty: bool,
    /// When the tree was last walked.
    pub walked_ms: u64,
}

/// What was born since the agent last looked: the families' periodic walks (each reads the
/// `children` of every thread of every process in the tree: a fifth of the agent's CPU on a
/// settled D3) run only for a family a process was born into. The kernel's last pid (see
/// [`crate::procfs::last_pid`]) says which pids are new; each is read once.
#[derive(Clone, Debug, Default)]
pub struct Births {
    /// The last pid at the previous look (`None`: never looked, or could not read it).
    pub cursor: Option<u32>,
    /// New pids that had no task yet at the previous look: looked at once more.
    pub recheck: Vec<u32>,
}

impl Family {
    /// The time from a walk of the family's tree to the next one without a ring.
    pub fn walk_pace(&self, now: u64) -> u64 {
        if now < self.born_ms.max(self.rang_ms) + YOUNG_FAMILY_MS {
            FAMILY_WALK_YOUNG_MS
        } else {
            FAMILY_WALK_MS
        }
    }
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
    births: Births,
    pub dormant: HashMap<u32, Dormant>,
    /// pids known to have no shim (or a foreign channel): not read again.
    /// (keyed by pid, with the comm it had then: an exec, which changes the comm, makes the
    /// pid worth a new look — a fork child seen before its exec of a program with a shim).
    no_shim: BTreeMap<u32, String>,
    pub unreadable: BTreeMap<u32, Unreadable>,
    /// When `dormant`, `no_shim` and `unreadable` were last cleared of gone processes.
    forget_at: u64,
    pub figures: HashMap<ClientId, Figures>,
    next_id: ClientId,
    tunables: tunables::Tunables,
    signals: Option<crate::signals::SignalPipe>,
    shutdown: bool,
    feedback_at: u64,
    coverage_at: u64,
    /// Parents switched to merge-any by the fallback: parent client → children refusing.
    pub fallback: BTreeMap<ClientId, u32>,
    /// Fork servers learned across runs (`--state`).
    pub learned: crate::learned::Learned,
    /// `socket_hash` of this agent's socket path: processes found without a Hello are adopted
    /// only if started for it.
    socket_hash: u64,
    /// The service manager (`Type=notify`, watchdog).
    notify: crate::notify::Notifier,
    watchdog_at: u64,
}

fn grid(t: u64) -> u64 {
    t.div_ceil(GRID_MS) * GRID_MS
}

/// When to wake for work due at `t`: at `t` itself only for a young client's work due within
/// `urgent_ms`; anything else waits for the grid, where it shares a wake-up with the rest.
fn wake_for(t: u64, now: u64, young: bool, urgent_ms: u64) -> u64 {
    if young && t <= now.saturating_add(urgent_ms) {
        t
    } else {
        grid(t)
    }
}

fn refused(errno: i32) -> bool {
    matches!(errno, libc::EPERM | libc::EACCES | libc::ENOSYS)
}

impl Agent {
    /// Binds the socket. `policy` is the already-loaded policy.
    pub fn new(opts: Options, policy: Policy) -> Result<Agent, socket::SocketError> {
        // Three descriptors per tracked process.
        if let Err(e) = ksmplus_common::sys::raise_nofile() {
            warn!("cannot raise the open-file limit: {e}");
        }
        let poll = Poll::new().map_err(|source| socket::SocketError::Io {
            path: "epoll".into(),
            source,
        })?;
        let uid = nix::unistd::geteuid().as_raw();
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
            births: Births::default(),
            dormant: HashMap::new(),
            no_shim: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            forget_at: 0,
            figures: HashMap::new(),
            next_id: 1,
            signals: None,
            shutdown: false,
            feedback_at: 0,
            coverage_at: 0,
            fallback: BTreeMap::new(),
            learned: crate::learned::Learned::default(),
            socket_hash: 0,
            notify: crate::notify::Notifier::from_env(),
            watchdog_at: 0,
        };
        a.socket_hash =
            ksmplus_common::channel::socket_hash(a.opts.socket.as_os_str().as_encoded_bytes());
        a.learned = crate::learned::Learned::load(a.opts.state.clone());
        if a.uid == 0 {
            a.tunables.apply(&a.policy.ksmd);
        }
        Ok(a)
    }

    /// Routes SIGHUP (reload) and SIGTERM/SIGINT (clean exit) into the event loop.
    pub fn install_signals(&mut self) -> io::Result<()> {
        use nix::sys::signal::Signal;
        let pipe = crate::signals::SignalPipe::install(&[
            Signal::SIGHUP,
            Signal::SIGTERM,
            Signal::SIGINT,
        ])?;
        self.poll.registry().register(
            &mut SourceFd(&pipe.raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        self.signals = Some(pipe);
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
        self.notify.ready(&format!(
            "listening on {}; {} processes tracked",
            self.opts.socket.display(),
            self.clients.len()
        ));
        let r = self.serve();
        self.notify.stopping();
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
            if let Some(every) = self.notify.ping_every_ms {
                if now >= self.watchdog_at {
                    self.notify.watchdog();
                    self.watchdog_at = now + every;
                }
            }
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
                        let reply = self.control(&json);
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
        if self.notify.ping_every_ms.is_some() {
            at(self.watchdog_at);
        }
        // A young client's work runs when due: the engine within a second (first rechecks),
        // batches in flight, fast maps checks. So does work in progress for any client (a
        // round being sampled, a run being grown: put off, it would only stretch, the same
        // work later). A settled client's round starts, batches and maps checks wait for the
        // grid, so every settled client shares the same few wake-ups a second.
        let young = |c: &crate::client::Client| !c.settled(now);
        for (id, t, busy) in self.engine.dues(now) {
            let y = self.clients.get(&id).is_some_and(young);
            at(if busy { t } else { wake_for(t, now, y, 1000) });
        }
        for c in self.clients.values() {
            let young = young(c);
            if let Some(p) = &c.posted {
                at(wake_for(p.check_ms.max(now + 1), now, young, u64::MAX));
            } else if !c.queue.is_empty() {
                at(wake_for(now, now, young, u64::MAX));
            }
            let fast = c.check_every_ms <= channel_fast();
            at(wake_for(c.check_at_ms, now, young && fast, u64::MAX));
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
        let got = self.signals.as_ref().map(|p| p.drain()).unwrap_or_default();
        for sig in got {
            match sig {
                nix::sys::signal::Signal::SIGHUP => {
                    self.notify.reloading();
                    if let Err(e) = self.reload() {
                        warn!("reload refused, old policy kept: {e}");
                    }
                    self.notify.ready("policy reloaded");
                }
                _ => self.shutdown = true,
            }
        }
    }

    // ---- processes ----------------------------------------------------------------------

    // ---- the turn -----------------------------------------------------------------------

    // ---- policy -------------------------------------------------------------------------
}

/// The fastest `map_gen` check interval, below which checks are not put on the grid.
fn channel_fast() -> u64 {
    crate::client::CHECK_MIN_MS * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_is_walked_every_second_while_young_or_after_a_ring() {
        let mut f = Family {
            socket_hash: 0,
            born_ms: 1_000,
            doorbell: 0,
            channel: 0,
            rings_seen: 0,
            rang_ms: 1_000,
            doorbell_at: 0,
            walk_at: 0,
            members: BTreeSet::new(),
            pending: BTreeMap::new(),
            idle: BTreeSet::new(),
            tree: BTreeSet::new(),
            dirty: true,
            walked_ms: 0,
        };
        assert_eq!(f.walk_pace(1_000), FAMILY_WALK_YOUNG_MS);
        assert_eq!(f.walk_pace(1_000 + YOUNG_FAMILY_MS), FAMILY_WALK_MS);
        // A ring (a member forked: its child may exec a program that cannot say Hello).
        f.rang_ms = 60_000;
        assert_eq!(
            f.walk_pace(60_000 + YOUNG_FAMILY_MS - 1),
            FAMILY_WALK_YOUNG_MS
        );
        assert_eq!(f.walk_pace(60_000 + YOUNG_FAMILY_MS), FAMILY_WALK_MS);
    }

    #[test]
    fn only_a_young_clients_urgent_work_wakes_off_the_grid() {
        let now = 10_123;
        // Young, due within the urgent span: exactly when due.
        assert_eq!(wake_for(now + 7, now, true, 1000), now + 7);
        assert_eq!(wake_for(now + 7_000, now, true, u64::MAX), now + 7_000);
        // Young but not urgent, or settled: the next grid point, shared with everything else.
        assert_eq!(wake_for(now + 5_000, now, true, 1000), 15_500);
        assert_eq!(wake_for(now + 7, now, false, u64::MAX), 10_500);
        assert_eq!(wake_for(now, now, false, 1000), 10_500);
        // Settled work of several clients due at different times within a grid step: one
        // wake-up.
        let w: std::collections::BTreeSet<u64> = (1..GRID_MS)
            .map(|d| wake_for(10_000 + d, 10_000, false, 1000))
            .collect();
        assert_eq!(w.len(), 1);
    }
}
