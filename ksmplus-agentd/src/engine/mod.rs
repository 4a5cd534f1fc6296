//! The KSM+ engine: a pure state machine, no I/O. Time (`now_ms`), randomness (seed) and the
//! kernel's feedback are inputs; agent→shim commands are outputs ([`Engine::take_output`]).
//!
//! Per region (thesis 4.1.3, 4.2.2), rounds of sampling: each round first asks the shim which
//! pages of the region are resident (`Residency`, in pieces of at most `MAX_RESIDENCY_RUNS`
//! runs), then, with coefficient `c`, the `R` resident pages (the index space of the
//! concatenated runs) are cut into `m = ceil(R·c/100)` equal gaps and one random page of each
//! gap is fingerprinted. Reserved, never-touched address space costs nothing but the query.
//! A page is a *candidate* when its hash equals the one of its previous sample (KSM's checksum
//! rule against volatile pages) and at least one other page anywhere (this region, another
//! region, another process) has that hash now; an all-zero page only from the region's third
//! round on ([`ZERO_PAGE_MIN_ROUND`]: fresh buffers are zero until written), and a page in a
//! marked run never (it ends a stretch of candidates). A candidate grows into a run by
//! fingerprinting its neighbours in both directions, stopping at a page whose hash has no
//! duplicate; runs closer than `coalesce_gap_pages` are coalesced, then marked MERGEABLE through
//! the shim. After each round `c` decreases by `step`; a region whose round at the floor ends
//! with nothing marked is dropped: its fingerprints are forgotten and it is not sampled again
//! unless it grows or is replaced. A marked run with no merged page after
//! `unmerge_after_full_scans` full ksmd scans is marked UNMERGEABLE again (merged: mapped more
//! than once, by the pagemap of the run; `server::turn::feedback`).
//!
//! Files: `state` (regions, runs, growth jobs, commands in flight), `regions` (events from the
//! maps), `schedule` (rounds and rate limits), `replies` (residency, fingerprints, growth,
//! marks), `index` (the fingerprint index and its cap), `feedback` (ksmd's verdict on marks),
//! `tests` (against a simulated process).
//!
//! Invariants:
//! - a client has at most one `Fingerprint` or `Residency` command in flight; replies are matched by id and
//!   region generation, so a reply for a region removed meanwhile is ignored;
//! - `index[h]` is the number of remembered pages whose latest hash is `h` (each page counts
//!   once), so "another page has this hash" is `index[h] >= 2`;
//! - remembered fingerprints never exceed `max_fingerprints` (least recently sampled regions
//!   are evicted first). Memory: see [`BYTES_PER_FINGERPRINT`].
//! - `NotResident` and `Unavailable` pages are never candidates and never extend a run.
//! - resident runs are kept for one piece of one round only: at most one region per client
//!   holds them (the one being sampled), at most `MAX_RESIDENCY_RUNS` entries (16 bytes each).

use ksmplus_common::policy::{Limits, Policy, Sampling};
use std::collections::{BTreeMap, HashMap, VecDeque};

mod feedback;
mod index;
mod regions;
mod replies;
mod schedule;
mod state;
#[cfg(test)]
mod tests;

use index::dec;
use state::*;
pub use state::{ClientStatus, ProcCounters};

/// Most page addresses in one [`Command::Fingerprint`] (and hashes in its reply).
pub const MAX_FINGERPRINT_PAGES: usize = 16 * 1024;
/// Most resident runs in one [`Reply::Residency`].
pub const MAX_RESIDENCY_RUNS: usize = 16 * 1024;

/// What a `Madvise` command asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Advice {
    Mergeable,
    Unmergeable,
}

/// Outcome of a command, carried by replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    /// The address range is not (or no longer) inside the client's covered memory.
    NotRegistered,
    /// Malformed request (unaligned, empty, too many pages).
    Invalid,
    /// The system call failed with this errno (for `Madvise`: the process refused it).
    Errno(i32),
    /// The client obeys no command any more.
    Dormant,
}

/// Result for one page of a `Fingerprint` command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageHash {
    /// 64-bit content hash (xxh3) of the resident page.
    Hash(u64),
    /// The page is not resident; it was not read (and so not faulted in).
    NotResident,
    /// The page is outside the client's memory, or could not be read.
    Unavailable,
}

/// What the engine asks the I/O layer to do for a client. Each carries an `id` that its
/// [`Reply`] repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// The resident page runs of `[start, start+len)`.
    Residency { id: u32, start: u64, len: u64 },
    /// The content hash of each page.
    Fingerprint { id: u32, pages: Vec<u64> },
    /// `madvise` inside the client's process.
    Madvise {
        id: u32,
        start: u64,
        len: u64,
        advice: Advice,
    },
}

/// The answer to a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The resident runs `(start, len)` (page-aligned, in address order) found in the first
    /// `covered` bytes of the asked range; `covered` is less than asked when
    /// [`MAX_RESIDENCY_RUNS`] runs were found first.
    Residency {
        id: u32,
        status: Status,
        covered: u64,
        runs: Vec<(u64, u64)>,
    },
    Fingerprint {
        id: u32,
        status: Status,
        hashes: Vec<PageHash>,
    },
    Madvise {
        id: u32,
        status: Status,
    },
}

/// A change of a client's covered memory, as the I/O layer sees it in `/proc/PID/maps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// New covered memory.
    Added { start: u64, len: u64 },
    /// A range is gone (it may cut a region in two).
    Removed { start: u64, len: u64 },
    /// A region moved or changed size (`mremap`, or grown in place).
    Resized {
        old_start: u64,
        old_len: u64,
        new_start: u64,
        new_len: u64,
    },
}

/// Identifies a connected shim.
pub type ClientId = u64;

/// Upper bound of the agent's memory per remembered page fingerprint. Per page: one entry of
/// its region's `HashMap<u32, Memo>` (16 bytes + 1 control byte, at a load between 7/16 and 7/8
/// after growth: 19–39 bytes); per distinct hash (one per page when pages are unique): one entry
/// of the global `HashMap<u64, u32>` (same sizes). Measured: ~60 bytes per unique page
/// (200 MiB of unique pages, 51 200 fingerprints, +3 MiB of agent RSS).
pub const BYTES_PER_FINGERPRINT: u64 = 80;

/// Pages a growth reads first in each direction, twice as many in each next batch while the
/// run goes on. The reads stop at the first page with no duplicate, but a batch is read whole:
/// starting at 64, most of the pages read by the growth of a short run (most runs found once
/// a desktop program settles) came after its end.
pub const GROW_FIRST_BATCH: u64 = 8;

/// Most hashes [`Engine`] keeps the latest duplicate event of (16 bytes each, 64 KiB): past
/// that it forgets them all, and pages read before are looked up in the index once more.
pub const RECENT_DUPS_MAX: usize = 4096;

/// A marked run that merges keeps being scanned by ksmd page by page; a stretch of at least this
/// many of its pages that did not merge by its check is cut out of it (unmarked). Shorter ones
/// stay: each cut inside a run splits its VMA in three. Measured on D3/D4 (epiphany, session 8):
/// 75 % of the pages of marked runs that had not merged were in stretches of 8 or more.
pub const MIN_TRIM_PAGES: u64 = 8;

/// Most runs per region unmarked for merging less than half of their pages (then re-grown).
pub const MAX_LOOSEN: u32 = 3;

/// An all-zero page is a candidate only from this round of its region on. The first two rounds
/// come `first_recheck_ms` apart right after the region appears, while a program typically still
/// fills what it just allocated (calloc, memset, a transparent huge page faulted in ahead of the
/// writer): zero pages stable over that short gap are mostly about to be written, and marking
/// them costs rmap items, and a COW fault per page if ksmd merges them first. The third round
/// comes a full `round_interval_ms` later.
pub const ZERO_PAGE_MIN_ROUND: u64 = 3;

/// Rounds at the floor coefficient (regions kept because something in them is marked) pause
/// this many times `round_interval_ms`.
pub const FLOOR_SLOWDOWN: u64 = 10;
/// At most this many doublings of the floor pause for a region whose rounds find nothing new
/// (10 s × 2⁴ = 160 s with the default one-second round interval).
pub const FLOOR_BACKOFF_MAX_SHIFT: u32 = 4;
/// At most this many halvings of the random share of a floor round (10 % → 1.25 % at the
/// default floor) for a region whose floor rounds found nothing new.
pub const FLOOR_SAMPLE_MAX_SHIFT: u32 = 3;
/// A run confirmed merging again and again is checked at most every this many times
/// `unmerge_after_full_scans` full scans.
pub const CHECK_BACKOFF_MAX: u64 = 16;

/// Engine tunables, taken from the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub sampling: Sampling,
    pub limits: Limits,
    pub min_region_bytes: u64,
}

impl Config {
    pub fn from_policy(p: &Policy) -> Config {
        Config {
            sampling: p.sampling.clone(),
            limits: p.limits.clone(),
            min_region_bytes: p.min_region_bytes,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::from_policy(&Policy::default())
    }
}

/// A token bucket holding at most one second of its rate.
#[derive(Clone, Debug)]
struct Bucket {
    tokens: u64,
    last_ms: u64,
}

impl Bucket {
    fn new(rate: u64, now: u64) -> Bucket {
        Bucket {
            tokens: rate,
            last_ms: now,
        }
    }
    fn refill(&mut self, rate: u64, now: u64) {
        let dt = now.saturating_sub(self.last_ms);
        let add = rate.saturating_mul(dt) / 1000;
        if add > 0 {
            self.tokens = (self.tokens + add).min(rate);
            self.last_ms = now;
        } else if self.tokens >= rate {
            self.last_ms = now;
        }
    }
}

/// Small deterministic PRNG (xorshift64*), seeded by the caller.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        if n == 0 {
            0
        } else {
            v % n
        }
    }
}

pub struct Engine {
    cfg: Config,
    procs: BTreeMap<ClientId, Proc>,
    index: HashMap<u64, u32>,
    fingerprints: u64,
    rng: Rng,
    out: Vec<(ClientId, Command)>,
    next_id: u32,
    next_gen: u64,
    global: Bucket,
    rr: ClientId,
    full_scans: u64,
    /// A run was marked since the last [`Engine::set_full_scans`] (it stamps them): without
    /// one, that call does not walk every run of every region.
    unstamped: bool,
    pub evictions: u64,
    /// Numbers each time a hash is stored for a page while another page has it (index count
    /// two or more after): a remembered page read before such an event for its hash may have
    /// a twin now ([`state::Memo`]). Floor rounds look up only those pages in the index.
    dup_seq: u32,
    /// The latest `dup_seq` of each hash with an event after `recent_floor`.
    recent_dups: HashMap<u64, u32>,
    recent_floor: u32,
}

impl Engine {
    pub fn new(cfg: Config, seed: u64, now: u64) -> Engine {
        Engine {
            global: Bucket::new(cfg.limits.fingerprint_pages_per_sec_total, now),
            cfg,
            procs: BTreeMap::new(),
            index: HashMap::new(),
            fingerprints: 0,
            rng: Rng::new(seed),
            out: Vec::new(),
            next_id: 1,
            next_gen: 1,
            rr: 0,
            full_scans: 0,
            unstamped: false,
            evictions: 0,
            dup_seq: 0,
            recent_dups: HashMap::new(),
            recent_floor: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Applies a new configuration; regions in progress keep their coefficient.
    pub fn set_config(&mut self, cfg: Config) {
        self.cfg = cfg;
        self.evict(u64::MAX, 0);
    }

    /// Fingerprints remembered, all clients.
    pub fn fingerprints(&self) -> u64 {
        self.fingerprints
    }

    /// Distinct hashes in the global index.
    pub fn distinct_hashes(&self) -> u64 {
        self.index.len() as u64
    }

    pub fn clients(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.procs.keys().copied()
    }

    /// A tracked shim said Hello.
    pub fn add_client(&mut self, id: ClientId, pid: u32, comm: &str, page_size: u64, now: u64) {
        let page_size = if page_size.is_power_of_two() && page_size >= 4096 {
            page_size
        } else {
            4096
        };
        self.procs.insert(
            id,
            Proc {
                pid,
                comm: comm.to_owned(),
                page_size,
                zero_hash: ksmplus_common::protocol::page_hash(&vec![0u8; page_size as usize]),
                regions: BTreeMap::new(),
                inflight: None,
                grows: VecDeque::new(),
                bucket: Bucket::new(self.cfg.limits.fingerprint_pages_per_sec, now),
                dormant: false,
                stats: ProcCounters::default(),
                round_due: 0,
                maybe_sampling: false,
                runs_full: false,
            },
        );
    }

    /// The client went away: everything about it is forgotten.
    pub fn remove_client(&mut self, id: ClientId) {
        if let Some(p) = self.procs.remove(&id) {
            for r in p.regions.values() {
                self.forget(r);
            }
        }
    }

    fn new_gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    fn new_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    /// A change of the client's covered memory.
    pub fn on_event(&mut self, id: ClientId, ev: Event, now: u64) {
        if !self.procs.contains_key(&id) {
            return;
        }
        match ev {
            Event::Added { start, len } => self.region_added(id, start, len, now),
            Event::Removed { start, len } => self.region_removed(id, start, len),
            Event::Resized {
                old_start,
                old_len,
                new_start,
                new_len,
            } => self.region_resized(id, (old_start, old_len), (new_start, new_len), now),
        }
        if let Some(p) = self.procs.get_mut(&id) {
            p.regions_changed();
        }
    }

    /// The answer to one of the client's commands.
    pub fn on_reply(&mut self, id: ClientId, reply: Reply, now: u64) {
        if !self.procs.contains_key(&id) {
            return;
        }
        match reply {
            Reply::Fingerprint {
                id: rid,
                status,
                hashes,
            } => self.fingerprint_reply(id, rid, status, hashes, now),
            Reply::Residency {
                id: rid,
                status,
                covered,
                runs,
            } => self.residency_reply(id, rid, status, covered, runs, now),
            Reply::Madvise { id: rid, status } => self.madvise_reply(id, rid, status),
        }
    }

    /// Commands to send, in order.
    pub fn take_output(&mut self) -> Vec<(ClientId, Command)> {
        std::mem::take(&mut self.out)
    }

    pub fn status(&self, id: ClientId) -> Option<ClientStatus> {
        let p = self.procs.get(&id)?;
        let mut s = ClientStatus {
            pid: p.pid,
            comm: p.comm.clone(),
            counters: p.stats,
            min_coefficient: 100,
            ..Default::default()
        };
        for r in p.regions.values() {
            s.regions += 1;
            match r.phase {
                Phase::Dropped => s.regions_dropped += 1,
                _ => {
                    s.regions_sampling += 1;
                    s.min_coefficient = s.min_coefficient.min(r.coefficient.max(1));
                }
            }
            s.tracked_bytes += r.pages * p.page_size;
            s.fingerprints += r.hashes.len() as u64;
            // Only runs the process confirmed: a mark still waiting in its mailbox is not one.
            for x in r
                .runs
                .iter()
                .filter(|x| matches!(x.state, RunState::Marked { .. }))
            {
                s.marked_ranges += 1;
                s.marked_bytes += (x.hi - x.lo) * p.page_size;
            }
        }
        Some(s)
    }

    /// Whether any client has a marked run (kernel feedback is due only then).
    pub fn has_marked(&self) -> bool {
        self.procs
            .values()
            .any(|p| p.regions.values().any(|r| !r.runs.is_empty()))
    }

    /// Marked byte ranges of a client (for tests and status).
    pub fn marked(&self, id: ClientId) -> Vec<(u64, u64)> {
        let Some(p) = self.procs.get(&id) else {
            return Vec::new();
        };
        let mut v = Vec::new();
        for (s, r) in &p.regions {
            for x in &r.runs {
                v.push((s + x.lo * p.page_size, (x.hi - x.lo) * p.page_size));
            }
        }
        v
    }

    /// The client's tracked regions, `(start, len)` in bytes, in address order.
    pub fn regions(&self, id: ClientId) -> Vec<(u64, u64)> {
        self.procs.get(&id).map_or_else(Vec::new, |p| {
            p.regions
                .iter()
                .map(|(s, r)| (*s, r.pages * p.page_size))
                .collect()
        })
    }

    /// When [`Engine::tick`] next has something to do (a round due, work waiting for tokens),
    /// `None` if nothing is scheduled. Work blocked by a reply in flight is not due.
    pub fn next_due(&self, now: u64) -> Option<u64> {
        self.dues(now).map(|(_, t, _)| t).min()
    }

    /// When each client's schedule next needs a tick (clients with nothing due are left out),
    /// and whether that is work in progress (a round being sampled, a run being grown, the next
    /// round of a region still on its learning schedule) rather than a round at the floor.
    pub fn dues(&self, now: u64) -> impl Iterator<Item = (ClientId, u64, bool)> + '_ {
        let starved = self.global.tokens == 0;
        self.procs.iter().filter_map(move |(&id, p)| {
            if p.dormant || p.inflight.is_some() {
                return None;
            }
            let ready = if starved || p.bucket.tokens == 0 {
                now + 10
            } else {
                now
            };
            let busy = !p.grows.is_empty()
                || p.regions
                    .values()
                    .any(|r| matches!(r.phase, Phase::Sampling { .. }));
            if busy {
                return Some((id, ready, true));
            }
            // A round of a region still on its learning schedule counts as work in progress:
            // put off, the schedule would only stretch.
            let floor = self.cfg.sampling.floor;
            p.regions
                .values()
                .filter_map(|r| match r.phase {
                    Phase::Waiting { at: t } => {
                        Some((t.max(now), r.rounds == 0 || r.coefficient > floor))
                    }
                    _ => None,
                })
                .min()
                .map(|(t, learning)| (id, t, learning))
        })
    }

    /// Whether every region of every client has finished its schedule (dropped or at floor).
    pub fn idle(&self) -> bool {
        self.procs.values().all(|p| {
            p.grows.is_empty()
                && p.inflight.is_none()
                && p.regions.values().all(|r| {
                    r.phase == Phase::Dropped
                        || (r.rounds > 0 && r.coefficient <= self.cfg.sampling.floor)
                })
        })
    }
}
