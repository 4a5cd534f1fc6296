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
//! unless it grows or is replaced. A marked run whose VMAs show no `KSM:` kB after
//! `unmerge_after_full_scans` full ksmd scans is marked UNMERGEABLE again.
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

use ksmplus_common::policy::Policy;
use std::collections::{BTreeMap, HashMap, VecDeque};

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
/// its region's `HashMap<u32, u64>` (16 bytes + 1 control byte, at a load between 7/16 and 7/8
/// after growth: 19–39 bytes); per distinct hash (one per page when pages are unique): one entry
/// of the global `HashMap<u64, u32>` (same sizes). Measured: ~60 bytes per unique page
/// (200 MiB of unique pages, 51 200 fingerprints, +3 MiB of agent RSS).
pub const BYTES_PER_FINGERPRINT: u64 = 80;

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

/// Engine tunables, taken from the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub start: u32,
    pub step: u32,
    pub floor: u32,
    pub round_interval_ms: u64,
    pub first_recheck_ms: u64,
    pub coalesce_gap_pages: u64,
    pub unmerge_after_full_scans: u64,
    pub min_region_bytes: u64,
    pub rate_client: u64,
    pub rate_total: u64,
    pub max_marked_ranges: u64,
    pub max_fingerprints: u64,
}

impl Config {
    pub fn from_policy(p: &Policy) -> Config {
        Config {
            start: p.sampling.start,
            step: p.sampling.step,
            floor: p.sampling.floor,
            round_interval_ms: p.sampling.round_interval_ms,
            first_recheck_ms: p.sampling.first_recheck_ms,
            coalesce_gap_pages: p.sampling.coalesce_gap_pages,
            unmerge_after_full_scans: p.sampling.unmerge_after_full_scans,
            min_region_bytes: p.min_region_bytes,
            rate_client: p.limits.fingerprint_pages_per_sec,
            rate_total: p.limits.fingerprint_pages_per_sec_total,
            max_marked_ranges: p.limits.max_marked_ranges,
            max_fingerprints: p.limits.max_fingerprints,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    /// Madvise(MERGEABLE) sent, reply pending.
    Marking(u32),
    /// Marked; `checked_at` is the full_scans count first read after marking, or when last
    /// confirmed merging (`None` until the I/O layer next reads the counter).
    Marked {
        checked_at: Option<u64>,
        merged: bool,
    },
}

#[derive(Clone, Debug)]
struct Run {
    lo: u64,
    /// Exclusive.
    hi: u64,
    state: RunState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Next round starts at `at`.
    Waiting { at: u64 },
    /// Round in progress. The residency of pages `0..scan` is known (`seen` of them resident);
    /// gaps `next..m` of the current piece (`Region::piece`) are still to issue. When the
    /// piece is done and `scan < pages`, the next piece's residency is asked.
    Sampling {
        m: u64,
        next: u64,
        scan: u64,
        seen: u64,
    },
    /// Schedule ran out with nothing merged: fingerprints forgotten.
    Dropped,
}

#[derive(Clone, Debug)]
struct Region {
    pages: u64,
    gen: u64,
    /// Coefficient of the current (or last) round; 0 before the first round.
    coefficient: u32,
    rounds: u64,
    phase: Phase,
    hashes: HashMap<u32, u64>,
    runs: Vec<Run>,
    /// Ranges unmarked for merging nothing: not marked again.
    rejected: Vec<(u64, u64)>,
    /// Runs unmarked for merging less than half their pages.
    loosened: u32,
    last_sampled_ms: u64,
    /// Resident runs of the current piece of the round: `(first page, resident pages of the
    /// piece before it)`, in page order. Empty outside a round's piece.
    piece: Vec<(u64, u64)>,
    /// Resident pages of the current piece.
    piece_pages: u64,
}

impl Region {
    fn new(pages: u64, gen: u64, now: u64) -> Region {
        Region {
            pages,
            gen,
            coefficient: 0,
            rounds: 0,
            phase: Phase::Waiting { at: now },
            hashes: HashMap::new(),
            runs: Vec::new(),
            rejected: Vec::new(),
            loosened: 0,
            last_sampled_ms: now,
            piece: Vec::new(),
            piece_pages: 0,
        }
    }
    fn in_run(&self, idx: u64) -> bool {
        self.runs.iter().any(|r| r.lo <= idx && idx < r.hi)
    }
    fn rejected(&self, idx: u64) -> bool {
        self.rejected.iter().any(|&(lo, hi)| lo <= idx && idx < hi)
    }
    /// Page index of the `j`-th resident page of the current piece (`j < piece_pages`).
    fn piece_page(&self, j: u64) -> u64 {
        let i = self.piece.partition_point(|&(_, before)| before <= j) - 1;
        let (lo, before) = self.piece[i];
        lo + (j - before)
    }
    /// The round is over: the next starts after a pause.
    fn end_round(&mut self, cfg: &Config, now: u64) {
        // Past the schedule (kept for its marked runs) a region is only watched for new
        // duplicates, at a tenth of the pace.
        // The second round comes sooner: a new region's duplicates need two samples.
        let pause = if self.coefficient <= cfg.floor {
            cfg.round_interval_ms * FLOOR_SLOWDOWN
        } else if self.rounds == 1 {
            cfg.first_recheck_ms.min(cfg.round_interval_ms)
        } else {
            cfg.round_interval_ms
        };
        self.phase = Phase::Waiting { at: now + pause };
        self.piece = Vec::new();
        self.piece_pages = 0;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

#[derive(Clone, Debug)]
struct Grow {
    region: u64,
    gen: u64,
    lo: u64,
    /// Inclusive.
    hi: u64,
    dir: Dir,
    up_done: bool,
    down_done: bool,
    batch: u64,
}

#[derive(Clone, Debug)]
enum Pending {
    Sample {
        region: u64,
        gen: u64,
        pages: Vec<u64>,
    },
    Grow {
        job: Grow,
        pages: Vec<u64>,
    },
    /// Residency of the region's pages `from..` asked.
    Residency {
        region: u64,
        gen: u64,
        from: u64,
    },
}

#[derive(Clone, Debug)]
struct Proc {
    pid: u32,
    comm: String,
    page_size: u64,
    /// Hash of an all-zero page of `page_size` bytes (see [`ZERO_PAGE_MIN_ROUND`]).
    zero_hash: u64,
    regions: BTreeMap<u64, Region>,
    inflight: Option<(u32, Pending)>,
    grows: VecDeque<Grow>,
    bucket: Bucket,
    dormant: bool,
    stats: ProcCounters,
}

/// Counters kept per client, reported by `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcCounters {
    pub fingerprinted_pages: u64,
    pub candidates: u64,
    pub runs_marked: u64,
    pub runs_unmarked: u64,
    pub runs_loosened: u64,
    pub marks_refused: u64,
    pub regions_dropped: u64,
    pub madvise_errors: u64,
    /// `Residency` commands answered, and the resident pages they reported.
    pub residency_queries: u64,
    pub resident_pages: u64,
}

/// What `status` shows for one client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStatus {
    pub pid: u32,
    pub comm: String,
    pub regions: u64,
    pub regions_sampling: u64,
    pub regions_dropped: u64,
    pub tracked_bytes: u64,
    pub marked_bytes: u64,
    pub marked_ranges: u64,
    pub fingerprints: u64,
    pub min_coefficient: u32,
    pub counters: ProcCounters,
}

/// One madvise the I/O layer must check against smaps: `(client, start, end)` byte addresses.
pub type RunToCheck = (ClientId, u64, u64);

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
    pub evictions: u64,
}

impl Engine {
    pub fn new(cfg: Config, seed: u64, now: u64) -> Engine {
        Engine {
            global: Bucket::new(cfg.rate_total, now),
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
            evictions: 0,
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

    /// Records ksmd's `full_scans` counter (read by the I/O layer). Runs marked since the last
    /// call start counting their grace period from this value, so a stale counter never makes a
    /// fresh run look old.
    pub fn set_full_scans(&mut self, v: u64) {
        self.full_scans = v;
        for p in self.procs.values_mut() {
            for r in p.regions.values_mut() {
                for x in r.runs.iter_mut() {
                    if let RunState::Marked {
                        checked_at: c @ None,
                        ..
                    } = &mut x.state
                    {
                        *c = Some(v);
                    }
                }
            }
        }
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
                bucket: Bucket::new(self.cfg.rate_client, now),
                dormant: false,
                stats: ProcCounters::default(),
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

    fn forget(&mut self, r: &Region) {
        for h in r.hashes.values() {
            dec(&mut self.index, *h);
        }
        self.fingerprints -= r.hashes.len() as u64;
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

    fn region_added(&mut self, id: ClientId, start: u64, len: u64, now: u64) {
        let ps = self.procs[&id].page_size;
        if start & (ps - 1) != 0 || len < self.cfg.min_region_bytes.max(ps) {
            return;
        }
        let pages = len / ps;
        crate::debug!("client {id}: region {start:#x} + {pages} pages");
        // Whatever overlaps the new region is gone.
        self.region_removed(id, start, pages * ps);
        let gen = self.new_gen();
        let p = self.procs.get_mut(&id).unwrap();
        p.regions.insert(start, Region::new(pages, gen, now));
    }

    /// mremap of a whole known region. Shrunk in place: the tail is removed. Moved or grown:
    /// its fingerprints and marked runs go with it (the kernel moves the pages and their VMA
    /// flags), clipped to the new size, and a grown region starts its schedule again so the new
    /// pages are sampled. Anything else (a region not known at that size, or now too small) is a
    /// removal and an addition.
    fn region_resized(&mut self, id: ClientId, old: (u64, u64), new: (u64, u64), now: u64) {
        let ((old_start, old_len), (new_start, new_len)) = (old, new);
        let p = &self.procs[&id];
        let ps = p.page_size;
        let same = p.regions.get(&old_start).map(|r| r.pages * ps) == Some(old_len);
        if same && new_start == old_start && new_len < old_len {
            self.region_removed(id, old_start + new_len, old_len - new_len);
            return;
        }
        if !same || new_start & (ps - 1) != 0 || new_len < self.cfg.min_region_bytes.max(ps) {
            self.region_removed(id, old_start, old_len);
            self.region_added(id, new_start, new_len, now);
            return;
        }
        let pages = new_len / ps;
        if pages < old_len / ps {
            // Moved and shrunk: the tail goes first, with its fingerprints and runs.
            self.region_removed(id, old_start + pages * ps, old_len - pages * ps);
        }
        let gen = self.new_gen();
        let p = self.procs.get_mut(&id).unwrap();
        let mut r = p.regions.remove(&old_start).unwrap();
        p.grows.retain(|g| g.region != old_start);
        crate::debug!("client {id}: region {old_start:#x} now {new_start:#x} + {pages} pages");
        // Whatever overlapped the new place is gone.
        self.region_removed(id, new_start, pages * ps);
        // Replies to commands about the old place are ignored (generation), so the round
        // in progress starts again.
        r.gen = gen;
        r.piece = Vec::new();
        r.piece_pages = 0;
        if pages > r.pages {
            r.rounds = 0;
            r.coefficient = 0;
            r.phase = Phase::Waiting { at: now };
        } else if matches!(r.phase, Phase::Sampling { .. }) {
            r.phase = Phase::Waiting { at: now };
        }
        r.pages = pages;
        self.procs
            .get_mut(&id)
            .unwrap()
            .regions
            .insert(new_start, r);
    }

    /// Removes the byte range `[start, start+len)` from the client's regions, cutting regions
    /// that straddle it. Pieces keep their fingerprints and runs.
    fn region_removed(&mut self, id: ClientId, start: u64, len: u64) {
        let p = self.procs.get_mut(&id).unwrap();
        let ps = p.page_size;
        let end = start.saturating_add(len);
        let hit: Vec<u64> = p
            .regions
            .range(..end)
            .filter(|(s, r)| **s + r.pages * ps > start)
            .map(|(s, _)| *s)
            .collect();
        let mut forgotten = Vec::new();
        let mut pieces = Vec::new();
        for s in hit {
            let r = p.regions.remove(&s).unwrap();
            let rend = s + r.pages * ps;
            // Left piece [s, start), right piece [end, rend), in pages of r.
            let left = if start > s { (start - s) / ps } else { 0 };
            let right_lo = if end < rend {
                end.div_ceil(ps) * ps
            } else {
                rend
            };
            let right_first = (right_lo - s) / ps;
            let mut r = r;
            let mut left_hashes = HashMap::new();
            let mut rh = HashMap::new();
            for (k, h) in r.hashes.drain() {
                let k64 = k as u64;
                if k64 < left {
                    left_hashes.insert(k, h);
                } else if k64 >= right_first {
                    rh.insert((k64 - right_first) as u32, h);
                } else {
                    forgotten.push(h);
                }
            }
            let clip = |runs: &[Run], lo: u64, hi: u64| -> Vec<Run> {
                runs.iter()
                    .filter(|x| x.lo < hi && x.hi > lo)
                    .map(|x| Run {
                        lo: x.lo.max(lo) - lo,
                        hi: x.hi.min(hi) - lo,
                        state: x.state,
                    })
                    .collect()
            };
            if left > 0 {
                let mut l = r.clone();
                l.pages = left;
                l.hashes = left_hashes;
                l.runs = clip(&r.runs, 0, left);
                pieces.push((s, l));
            }
            if right_first < r.pages {
                let mut rr = r.clone();
                rr.pages = r.pages - right_first;
                rr.hashes = rh;
                rr.runs = clip(&r.runs, right_first, r.pages);
                rr.rejected.clear();
                pieces.push((right_lo, rr));
            }
            r.runs.clear();
        }
        let n = forgotten.len() as u64;
        for h in forgotten {
            dec(&mut self.index, h);
        }
        self.fingerprints -= n;
        for (s, mut r) in pieces {
            r.gen = self.new_gen();
            if matches!(r.phase, Phase::Sampling { .. }) {
                r.phase = Phase::Waiting { at: 0 };
                r.piece = Vec::new();
                r.piece_pages = 0;
            }
            self.procs.get_mut(&id).unwrap().regions.insert(s, r);
        }
    }

    /// Runs the schedule: starts due rounds and issues fingerprint commands within the rate limits.
    pub fn tick(&mut self, now: u64) {
        self.global.refill(self.cfg.rate_total, now);
        let ids: Vec<ClientId> = self
            .procs
            .range(self.rr..)
            .chain(self.procs.range(..self.rr))
            .map(|(k, _)| *k)
            .collect();
        for id in ids {
            self.rr = id + 1;
            self.schedule_client(id, now);
            if self.global.tokens == 0 {
                break;
            }
        }
    }

    fn chunk_limit(&self) -> u64 {
        (MAX_FINGERPRINT_PAGES as u64)
            .min((self.cfg.rate_client / 4).max(64))
            .min(self.cfg.rate_total.max(1))
    }

    fn schedule_client(&mut self, id: ClientId, now: u64) {
        let limit = self.chunk_limit();
        let (cfg_start, cfg_step, cfg_floor) = (self.cfg.start, self.cfg.step, self.cfg.floor);
        let rate = self.cfg.rate_client;
        let p = self.procs.get_mut(&id).unwrap();
        if p.dormant || p.inflight.is_some() {
            return;
        }
        p.bucket.refill(rate, now);
        // Start due rounds, drop exhausted regions.
        let mut dropped = Vec::new();
        for (s, r) in p.regions.iter_mut() {
            if let Phase::Waiting { at } = r.phase {
                if now < at {
                    continue;
                }
                let growing = p.grows.iter().any(|g| g.region == *s);
                if r.rounds > 0 && r.coefficient <= cfg_floor && r.runs.is_empty() && !growing {
                    r.phase = Phase::Dropped;
                    dropped.push(*s);
                    continue;
                }
                r.coefficient = if r.rounds == 0 {
                    cfg_start
                } else {
                    r.coefficient.saturating_sub(cfg_step).max(cfg_floor)
                };
                r.rounds += 1;
                // The gaps are known once the residency of the first piece is.
                r.phase = Phase::Sampling {
                    m: 0,
                    next: 0,
                    scan: 0,
                    seen: 0,
                };
            }
        }
        let mut forgotten = Vec::new();
        for s in dropped {
            let r = p.regions.get_mut(&s).unwrap();
            forgotten.extend(r.hashes.drain().map(|(_, h)| h));
            p.stats.regions_dropped += 1;
        }
        let budget = limit.min(p.bucket.tokens).min(self.global.tokens);
        let mut work: Option<Pending> = None;
        if budget > 0 {
            // Growth first: it finishes what sampling found.
            while let Some(mut g) = p.grows.pop_front() {
                let Some(r) = p.regions.get(&g.region).filter(|r| r.gen == g.gen) else {
                    crate::debug!("client {id}: grow job for a replaced region dropped");
                    continue;
                };
                // A seed already covered by a run grown from an earlier seed is done.
                let fresh = g.lo == g.hi && !g.up_done && !g.down_done;
                if fresh && (r.in_run(g.lo) || r.rejected(g.lo)) {
                    continue;
                }
                let mut pages = Vec::new();
                loop {
                    if g.up_done && g.down_done {
                        break;
                    }
                    let n = g.batch.min(budget);
                    match g.dir {
                        Dir::Up if !g.up_done => {
                            let a = g.hi + 1;
                            let b = (a + n).min(r.pages);
                            if a >= b || r.in_run(a) {
                                g.up_done = true;
                                g.dir = Dir::Down;
                                continue;
                            }
                            pages.extend((a..b).map(|i| g.region + i * p.page_size));
                        }
                        Dir::Down if !g.down_done => {
                            if g.lo == 0 || r.in_run(g.lo - 1) {
                                g.down_done = true;
                                g.dir = Dir::Up;
                                continue;
                            }
                            let b = g.lo.saturating_sub(n);
                            pages.extend((b..g.lo).rev().map(|i| g.region + i * p.page_size));
                        }
                        _ => {
                            g.dir = if g.dir == Dir::Up { Dir::Down } else { Dir::Up };
                            continue;
                        }
                    }
                    break;
                }
                if pages.is_empty() {
                    // Both directions done: the run is final.
                    let job = g.clone();
                    self.finish_grow(id, job);
                    return self.schedule_client_after(id, now, forgotten);
                }
                work = Some(Pending::Grow { job: g, pages });
                break;
            }
            if work.is_none() {
                let p = self.procs.get_mut(&id).unwrap();
                let ps = p.page_size;
                for (s, r) in p.regions.iter_mut() {
                    let Phase::Sampling {
                        m,
                        next,
                        scan,
                        seen,
                    } = r.phase
                    else {
                        continue;
                    };
                    if next < m {
                        // One random resident page in each gap of the piece.
                        let n = r.piece_pages;
                        let k = budget.min(m - next);
                        let mut pages = Vec::with_capacity(k as usize);
                        for g in next..next + k {
                            let lo = g * n / m;
                            let hi = ((g + 1) * n / m).max(lo + 1);
                            let j = lo + self.rng.below(hi - lo);
                            pages.push(s + r.piece_page(j) * ps);
                        }
                        r.phase = Phase::Sampling {
                            m,
                            next: next + k,
                            scan,
                            seen,
                        };
                        r.last_sampled_ms = now;
                        work = Some(Pending::Sample {
                            region: *s,
                            gen: r.gen,
                            pages,
                        });
                        break;
                    }
                    if scan < r.pages {
                        work = Some(Pending::Residency {
                            region: *s,
                            gen: r.gen,
                            from: scan,
                        });
                        break;
                    }
                    // Nothing left to ask or sample (normally ended by the last reply).
                    r.end_round(&self.cfg, now);
                }
            }
        }
        if let Some(w) = work {
            let rid = self.new_id();
            let p = self.procs.get_mut(&id).unwrap();
            let msg = match &w {
                Pending::Sample { pages, .. } | Pending::Grow { pages, .. } => {
                    let n = pages.len() as u64;
                    p.bucket.tokens -= n.min(p.bucket.tokens);
                    self.global.tokens -= n.min(self.global.tokens);
                    Command::Fingerprint {
                        id: rid,
                        pages: pages.clone(),
                    }
                }
                // A pagemap scan reads no page: no tokens.
                Pending::Residency { region, from, .. } => {
                    let pages = p.regions[region].pages;
                    Command::Residency {
                        id: rid,
                        start: region + from * p.page_size,
                        len: (pages - from) * p.page_size,
                    }
                }
            };
            p.inflight = Some((rid, w));
            self.out.push((id, msg));
        }
        self.schedule_client_after(id, now, forgotten);
    }

    fn schedule_client_after(&mut self, _id: ClientId, _now: u64, forgotten: Vec<u64>) {
        let n = forgotten.len() as u64;
        for h in forgotten {
            dec(&mut self.index, h);
        }
        self.fingerprints -= n;
    }

    /// Records a page's latest hash; returns the previous one.
    fn remember(&mut self, id: ClientId, region: u64, idx: u64, h: Option<u64>) -> Option<u64> {
        let r = self
            .procs
            .get_mut(&id)
            .and_then(|p| p.regions.get_mut(&region))
            .unwrap();
        let prev = match h {
            Some(h) => r.hashes.insert(idx as u32, h),
            None => r.hashes.remove(&(idx as u32)),
        };
        if let Some(old) = prev {
            dec(&mut self.index, old);
            self.fingerprints -= 1;
        }
        if let Some(h) = h {
            *self.index.entry(h).or_insert(0) += 1;
            self.fingerprints += 1;
        }
        prev
    }

    fn dup(&self, h: u64) -> bool {
        self.index.get(&h).copied().unwrap_or(0) >= 2
    }

    /// The command a reply answers, if it is the one in flight (matched by id; a stale reply
    /// leaves the in-flight command waiting). A `Dormant` status makes the client dormant.
    fn take_reply(&mut self, id: ClientId, rid: u32, status: Status) -> Option<Pending> {
        let p = self.procs.get_mut(&id).unwrap();
        let (want, pending) = p.inflight.take()?;
        if want != rid {
            p.inflight = Some((want, pending));
            return None;
        }
        if status == Status::Dormant {
            p.dormant = true;
            return None;
        }
        Some(pending)
    }

    fn fingerprint_reply(
        &mut self,
        id: ClientId,
        rid: u32,
        status: Status,
        hashes: Vec<PageHash>,
        now: u64,
    ) {
        let Some(pending) = self.take_reply(id, rid, status) else {
            return;
        };
        let p = self.procs.get_mut(&id).unwrap();
        let ps = p.page_size;
        match pending {
            Pending::Sample { region, gen, pages } => {
                let Some(r) = p.regions.get(&region).filter(|r| r.gen == gen) else {
                    return;
                };
                let round_done = matches!(r.phase,
                    Phase::Sampling { m, next, scan, .. } if next >= m && scan >= r.pages);
                let piece_done = matches!(r.phase, Phase::Sampling { m, next, .. } if next >= m);
                let nreg = r.pages;
                let zero_ok = r.rounds >= ZERO_PAGE_MIN_ROUND;
                // Marked pages end a stretch: a stretch running on past a marked run must seed
                // its growth after the run, not inside it (where it would be skipped).
                let marked: Vec<(u64, u64)> = r.runs.iter().map(|x| (x.lo, x.hi)).collect();
                let zero = p.zero_hash;
                let run_of = |idx: u64| r.piece.partition_point(|&(lo, _)| lo <= idx);
                let runs: Vec<usize> = pages.iter().map(|a| run_of((a - region) / ps)).collect();
                p.stats.fingerprinted_pages += hashes.len() as u64;
                // Only the first candidate of a stretch of consecutive candidate samples seeds
                // a growth (the growth covers the rest), so a dense region costs a few jobs,
                // not one per page; a stretch broken by a unique page is found next round.
                // Consecutive samples in different resident runs are not one stretch: growth
                // stops at the non-resident pages between them.
                let mut candidates = Vec::new();
                let mut in_stretch = false;
                let mut last_run = usize::MAX;
                for ((addr, ph), run) in pages.iter().zip(hashes.iter()).zip(runs) {
                    let idx = (addr - region) / ps;
                    if idx >= nreg {
                        continue;
                    }
                    if run != last_run {
                        in_stretch = false;
                        last_run = run;
                    }
                    let h = match ph {
                        PageHash::Hash(h) => Some(*h),
                        _ => None,
                    };
                    let prev = self.remember(id, region, idx, h);
                    let in_run = marked.iter().any(|&(lo, hi)| lo <= idx && idx < hi);
                    let cand = !in_run
                        && h.is_some_and(|h| {
                            prev == Some(h) && self.dup(h) && (zero_ok || h != zero)
                        });
                    if cand && !in_stretch {
                        candidates.push(idx);
                    }
                    in_stretch = cand;
                }
                let p = self.procs.get_mut(&id).unwrap();
                let r = p.regions.get_mut(&region).unwrap();
                for idx in candidates {
                    if r.in_run(idx)
                        || r.rejected(idx)
                        || p.grows
                            .iter()
                            .any(|g| g.region == region && g.lo <= idx && idx <= g.hi)
                    {
                        continue;
                    }
                    p.stats.candidates += 1;
                    crate::debug!("client {id}: candidate page {idx} in region {region:#x}");
                    p.grows.push_back(Grow {
                        region,
                        gen,
                        lo: idx,
                        hi: idx,
                        dir: Dir::Up,
                        up_done: false,
                        down_done: false,
                        batch: 64,
                    });
                }
                if round_done {
                    r.end_round(&self.cfg, now);
                } else if piece_done {
                    r.piece = Vec::new();
                    r.piece_pages = 0;
                }
                self.evict(now, region);
            }
            Pending::Grow { mut job, pages } => {
                let Some(r) = p.regions.get(&job.region).filter(|r| r.gen == job.gen) else {
                    return;
                };
                let nreg = r.pages;
                p.stats.fingerprinted_pages += hashes.len() as u64;
                let mut stopped = hashes.len() < pages.len();
                for (addr, ph) in pages.iter().zip(hashes.iter()) {
                    let idx = (addr - job.region) / ps;
                    if idx >= nreg {
                        stopped = true;
                        break;
                    }
                    let h = match ph {
                        PageHash::Hash(h) => Some(*h),
                        _ => None,
                    };
                    // Only duplication counts here: a neighbour's last sample may be old (a
                    // buffer being initialised), and runs grown over content that changes
                    // afterwards are loosened by the kernel feedback.
                    self.remember(id, job.region, idx, h);
                    let ok = h.is_some_and(|h| self.dup(h));
                    if !ok {
                        stopped = true;
                        break;
                    }
                    if job.dir == Dir::Up {
                        job.hi = idx;
                    } else {
                        job.lo = idx;
                    }
                }
                if stopped {
                    match job.dir {
                        Dir::Up => {
                            job.up_done = true;
                            job.dir = Dir::Down;
                        }
                        Dir::Down => {
                            job.down_done = true;
                            job.dir = Dir::Up;
                        }
                    }
                    job.batch = 64;
                } else {
                    job.batch = (job.batch * 2).min(MAX_FINGERPRINT_PAGES as u64);
                }
                let p = self.procs.get_mut(&id).unwrap();
                if job.up_done && job.down_done {
                    self.finish_grow(id, job);
                } else {
                    p.grows.push_front(job);
                }
                self.evict(now, u64::MAX);
            }
            Pending::Residency { .. } => {
                crate::debug!("client {id}: FingerprintReply to a Residency command ignored");
            }
        }
    }

    /// The resident runs of a piece of a region: the piece's gaps are cut among them.
    fn residency_reply(
        &mut self,
        id: ClientId,
        rid: u32,
        status: Status,
        covered: u64,
        runs: Vec<(u64, u64)>,
        now: u64,
    ) {
        let Some(pending) = self.take_reply(id, rid, status) else {
            return;
        };
        let Pending::Residency { region, gen, from } = pending else {
            crate::debug!("client {id}: ResidencyReply to a Fingerprint command ignored");
            return;
        };
        let p = self.procs.get_mut(&id).unwrap();
        let ps = p.page_size;
        let Some(r) = p.regions.get_mut(&region).filter(|r| r.gen == gen) else {
            return;
        };
        let Phase::Sampling { scan, seen, .. } = r.phase else {
            return;
        };
        if scan != from {
            return;
        }
        p.stats.residency_queries += 1;
        if status != Status::Ok {
            // NotRegistered: the region is going away (its event follows); an errno: nothing
            // to sample in the rest of it this round.
            crate::debug!("client {id}: residency of region {region:#x}: {status:?}");
        }
        let end = region + r.pages * ps;
        let mut piece = Vec::with_capacity(if status == Status::Ok { runs.len() } else { 0 });
        let mut resident = 0u64;
        let mut last = from;
        if status == Status::Ok {
            for (a, l) in runs {
                let (a, b) = (a.max(region + from * ps), a.saturating_add(l).min(end));
                if b <= a {
                    continue;
                }
                let (lo, hi) = ((a - region).div_ceil(ps), (b - region) / ps);
                // Out of order or overlapping runs are not trusted.
                if hi <= lo || lo < last {
                    continue;
                }
                piece.push((lo, resident));
                resident += hi - lo;
                last = hi;
            }
        }
        let covered_pages = if status == Status::Ok {
            covered / ps
        } else {
            0
        };
        // A reply that covers nothing would ask the same forever: the rest counts as empty.
        let scan = if covered_pages == 0 {
            r.pages
        } else {
            (from + covered_pages).min(r.pages)
        };
        p.stats.resident_pages += resident;
        // m over the whole round is ceil(R·c/100): each piece gets its share of it.
        let c = r.coefficient as u64;
        let m = ((seen + resident) * c).div_ceil(100) - (seen * c).div_ceil(100);
        r.phase = Phase::Sampling {
            m,
            next: 0,
            scan,
            seen: seen + resident,
        };
        if m == 0 {
            if scan >= r.pages {
                r.end_round(&self.cfg, now);
            }
        } else {
            r.piece = piece;
            r.piece_pages = resident;
        }
    }

    /// A grown run `[lo, hi]` is coalesced with nearby runs and marked MERGEABLE.
    fn finish_grow(&mut self, id: ClientId, g: Grow) {
        let gap = self.cfg.coalesce_gap_pages;
        let max_runs = self.cfg.max_marked_ranges;
        let rid = self.new_id();
        let p = self.procs.get_mut(&id).unwrap();
        let total_runs: u64 = p.regions.values().map(|r| r.runs.len() as u64).sum();
        let ps = p.page_size;
        let Some(r) = p.regions.get_mut(&g.region).filter(|r| r.gen == g.gen) else {
            return;
        };
        let (mut lo, mut hi) = (g.lo, g.hi + 1);
        crate::debug!(
            "client {id}: run [{lo}, {hi}) grown in region {:#x}",
            g.region
        );
        // A single page is not worth a VMA split unless it joins a neighbour.
        let near: Vec<usize> = r
            .runs
            .iter()
            .enumerate()
            .filter(|(_, x)| x.lo <= hi + gap && lo <= x.hi + gap)
            .map(|(i, _)| i)
            .collect();
        if near.is_empty() && total_runs >= max_runs {
            p.stats.marks_refused += 1;
            return;
        }
        for &i in near.iter().rev() {
            let x = r.runs.remove(i);
            lo = lo.min(x.lo);
            hi = hi.max(x.hi);
        }
        r.runs.push(Run {
            lo,
            hi,
            state: RunState::Marking(rid),
        });
        r.runs.sort_by_key(|x| x.lo);
        p.stats.runs_marked += 1;
        self.out.push((
            id,
            Command::Madvise {
                id: rid,
                start: g.region + lo * ps,
                len: (hi - lo) * ps,
                advice: Advice::Mergeable,
            },
        ));
    }

    fn madvise_reply(&mut self, id: ClientId, rid: u32, status: Status) {
        let p = self.procs.get_mut(&id).unwrap();
        for r in p.regions.values_mut() {
            if let Some(i) = r
                .runs
                .iter()
                .position(|x| x.state == RunState::Marking(rid))
            {
                if status == Status::Ok {
                    r.runs[i].state = RunState::Marked {
                        checked_at: None,
                        merged: false,
                    };
                } else {
                    p.stats.madvise_errors += 1;
                    let x = r.runs.remove(i);
                    r.rejected.push((x.lo, x.hi));
                }
                return;
            }
        }
    }

    /// Marked runs due for a check against smaps (`unmerge_after_full_scans` scans since marked
    /// or last seen merging). The caller reads the client's smaps and calls [`Engine::feedback`].
    pub fn due_checks(&self) -> Vec<ClientId> {
        let n = self.cfg.unmerge_after_full_scans.max(1);
        self.procs
            .iter()
            .filter(|(_, p)| {
                p.regions.values().any(|r| {
                    r.runs.iter().any(|x| {
                        matches!(x.state, RunState::Marked { checked_at: Some(c), .. }
                            if self.full_scans > c + n)
                    })
                })
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Kernel feedback: the client's VMAs as `(start, end, ksm_kib)`. Due runs showing no merged
    /// kB are marked UNMERGEABLE (freeing their rmap_items); merging ones are confirmed.
    pub fn feedback(&mut self, id: ClientId, vmas: &[(u64, u64, u64)]) {
        let n = self.cfg.unmerge_after_full_scans.max(1);
        let scans = self.full_scans;
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        let ps = p.page_size;
        let mut cmds = Vec::new();
        for (s, r) in p.regions.iter_mut() {
            let mut keep = Vec::new();
            for mut x in r.runs.drain(..) {
                if let RunState::Marked {
                    checked_at: Some(c),
                    ..
                } = x.state
                {
                    // The scan in progress when the run was marked does not count.
                    if scans > c + n {
                        let (a, b) = (s + x.lo * ps, s + x.hi * ps);
                        let over: Vec<_> = vmas.iter().filter(|v| v.0 < b && v.1 > a).collect();
                        let ksm: u64 = over.iter().map(|v| v.2).sum();
                        let kib: u64 = over.iter().map(|v| (v.1 - v.0) / 1024).sum();
                        if ksm == 0 {
                            cmds.push((a, b - a));
                            r.rejected.push((x.lo, x.hi));
                            p.stats.runs_unmarked += 1;
                            continue;
                        }
                        // Mostly not merging (content changed after it was grown, e.g. a
                        // buffer sampled while being initialised): unmark it to free its
                        // rmap_items, and let sampling grow a tight run again from the
                        // current content. A few times per region at most.
                        if ksm * 2 < kib && r.loosened < MAX_LOOSEN {
                            cmds.push((a, b - a));
                            r.loosened += 1;
                            p.stats.runs_loosened += 1;
                            // The region's schedule starts over.
                            r.rounds = 0;
                            if matches!(r.phase, Phase::Waiting { .. }) {
                                r.phase = Phase::Waiting { at: 0 };
                            }
                            continue;
                        }
                        x.state = RunState::Marked {
                            checked_at: Some(scans),
                            merged: true,
                        };
                    }
                }
                keep.push(x);
            }
            r.runs = keep;
        }
        for (start, len) in cmds {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            self.out.push((
                id,
                Command::Madvise {
                    id: self.next_id,
                    start,
                    len,
                    advice: Advice::Unmergeable,
                },
            ));
        }
    }

    /// Evicts fingerprints of least recently sampled regions while over `max_fingerprints`.
    fn evict(&mut self, _now: u64, keep_region: u64) {
        while self.fingerprints > self.cfg.max_fingerprints {
            let victim = self
                .procs
                .iter()
                .flat_map(|(id, p)| {
                    p.regions
                        .iter()
                        .filter(|(s, r)| **s != keep_region && !r.hashes.is_empty())
                        .map(move |(s, r)| (r.last_sampled_ms, *id, *s))
                })
                .min();
            let victim = victim.or_else(|| {
                // Only the region being sampled is left: it loses its history too.
                self.procs.iter().find_map(|(id, p)| {
                    p.regions
                        .get(&keep_region)
                        .filter(|r| !r.hashes.is_empty())
                        .map(|_| (0, *id, keep_region))
                })
            });
            let Some((_, id, s)) = victim else {
                break;
            };
            let r = self
                .procs
                .get_mut(&id)
                .unwrap()
                .regions
                .get_mut(&s)
                .unwrap();
            let hs: Vec<u64> = r.hashes.drain().map(|(_, h)| h).collect();
            self.fingerprints -= hs.len() as u64;
            for h in hs {
                dec(&mut self.index, h);
            }
            self.evictions += 1;
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
        let mut due: Option<u64> = None;
        let mut at = |t: u64| due = Some(due.map_or(t, |d| d.min(t)));
        let starved = self.global.tokens == 0;
        for p in self.procs.values() {
            if p.dormant || p.inflight.is_some() {
                continue;
            }
            let ready = if starved || p.bucket.tokens == 0 {
                now + 10
            } else {
                now
            };
            if !p.grows.is_empty() {
                at(ready);
            }
            for r in p.regions.values() {
                match r.phase {
                    Phase::Waiting { at: t } => at(t.max(now)),
                    Phase::Sampling { .. } => at(ready),
                    Phase::Dropped => {}
                }
            }
        }
        due
    }

    /// Whether every region of every client has finished its schedule (dropped or at floor).
    pub fn idle(&self) -> bool {
        self.procs.values().all(|p| {
            p.grows.is_empty()
                && p.inflight.is_none()
                && p.regions.values().all(|r| {
                    r.phase == Phase::Dropped || (r.rounds > 0 && r.coefficient <= self.cfg.floor)
                })
        })
    }
}

fn dec(index: &mut HashMap<u64, u32>, h: u64) {
    if let Some(c) = index.get_mut(&h) {
        *c -= 1;
        if *c == 0 {
            index.remove(&h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;

    /// A fake shim side: page contents per client region (`None` = not resident).
    struct Sim {
        eng: Engine,
        mem: HashMap<ClientId, BTreeMap<u64, Vec<Option<u64>>>>,
        madvised: Vec<(ClientId, u64, u64, Advice)>,
        volatile: bool,
        volatile_client: Option<ClientId>,
        now: u64,
        counter: u64,
        /// Most runs per ResidencyReply (the shim's is MAX_RESIDENCY_RUNS).
        max_runs: usize,
    }

    fn cfg() -> Config {
        Config {
            round_interval_ms: 100,
            min_region_bytes: 64 * 1024,
            ..Config::default()
        }
    }

    impl Sim {
        fn new(cfg: Config) -> Sim {
            Sim {
                eng: Engine::new(cfg, 42, 0),
                mem: HashMap::new(),
                madvised: Vec::new(),
                volatile: false,
                volatile_client: None,
                now: 0,
                counter: 1 << 40,
                max_runs: MAX_RESIDENCY_RUNS,
            }
        }
        fn client(&mut self, id: ClientId, regions: Vec<(u64, Vec<Option<u64>>)>) {
            self.eng
                .add_client(id, 1000 + id as u32, "prog", PS, self.now);
            let mut m = BTreeMap::new();
            for (start, pages) in regions {
                self.eng.on_event(
                    id,
                    Event::Added {
                        start,
                        len: pages.len() as u64 * PS,
                    },
                    self.now,
                );
                m.insert(start, pages);
            }
            self.mem.insert(id, m);
        }
        fn page(&mut self, id: ClientId, addr: u64) -> PageHash {
            let m = &self.mem[&id];
            let Some((s, v)) = m.range(..=addr).next_back() else {
                return PageHash::Unavailable;
            };
            let i = ((addr - s) / PS) as usize;
            match v.get(i) {
                Some(Some(h)) => {
                    if self.volatile || (self.volatile_client == Some(id)) {
                        self.counter += 1;
                        PageHash::Hash(*h ^ self.counter)
                    } else {
                        PageHash::Hash(*h)
                    }
                }
                Some(None) => PageHash::NotResident,
                None => PageHash::Unavailable,
            }
        }
        /// What the shim answers to Residency: resident runs from the start of the range.
        fn residency(&self, id: ClientId, start: u64, len: u64) -> (Status, u64, Vec<(u64, u64)>) {
            let m = &self.mem[&id];
            let Some((s, v)) = m.range(..=start).next_back() else {
                return (Status::NotRegistered, 0, Vec::new());
            };
            if start + len > s + v.len() as u64 * PS {
                return (Status::NotRegistered, 0, Vec::new());
            }
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let first = (start - s) / PS;
            for i in first..first + len / PS {
                if v[i as usize].is_none() {
                    continue;
                }
                let a = s + i * PS;
                if let Some((rs, rl)) = runs.last_mut() {
                    if *rs + *rl == a {
                        *rl += PS;
                        continue;
                    }
                }
                if runs.len() == self.max_runs {
                    return (Status::Ok, a - start, runs);
                }
                runs.push((a, PS));
            }
            (Status::Ok, len, runs)
        }
        fn step(&mut self) {
            self.eng.tick(self.now);
            for (c, m) in self.eng.take_output() {
                match m {
                    Command::Fingerprint { id, pages } => {
                        let hashes = pages.iter().map(|a| self.page(c, *a)).collect();
                        self.eng.on_reply(
                            c,
                            Reply::Fingerprint {
                                id,
                                status: Status::Ok,
                                hashes,
                            },
                            self.now,
                        );
                    }
                    Command::Madvise {
                        id,
                        start,
                        len,
                        advice,
                    } => {
                        self.madvised.push((c, start, len, advice));
                        self.eng.on_reply(
                            c,
                            Reply::Madvise {
                                id,
                                status: Status::Ok,
                            },
                            self.now,
                        );
                    }
                    Command::Residency { id, start, len } => {
                        let (status, covered, runs) = self.residency(c, start, len);
                        self.eng.on_reply(
                            c,
                            Reply::Residency {
                                id,
                                status,
                                covered,
                                runs,
                            },
                            self.now,
                        );
                    }
                }
            }
            assert!(self.eng.fingerprints() <= self.eng.config().max_fingerprints);
            self.now += 10;
        }
        fn run(&mut self, ms: u64) {
            let end = self.now + ms;
            while self.now < end {
                self.step();
            }
        }
        fn marks(&self, c: ClientId) -> Vec<(u64, u64)> {
            self.madvised
                .iter()
                .filter(|m| m.0 == c && m.3 == Advice::Mergeable)
                .map(|m| (m.1, m.2))
                .collect()
        }
    }

    fn unique(n: u64, salt: u64) -> Vec<Option<u64>> {
        (0..n).map(|i| Some((salt << 32) | i)).collect()
    }

    #[test]
    fn table_5_2_two_regions_256_dup_pages_each() {
        let mut s = Sim::new(cfg());
        let mut a = unique(2560, 1);
        let mut b = unique(2560, 2);
        for i in 0..256 {
            a[i] = Some(0xff);
            b[i] = Some(0xff);
        }
        let (ra, rb) = (0x1000_0000, 0x2000_0000);
        s.client(1, vec![(ra, a), (rb, b)]);
        s.run(5_000);
        assert!(s.eng.idle(), "{:?}", s.eng.status(1));
        let mut marked = s.eng.marked(1);
        marked.sort();
        assert_eq!(marked, vec![(ra, 256 * PS), (rb, 256 * PS)]);
        // Unique regions' tails are never marked.
        for (start, len) in s.marks(1) {
            assert!(start == ra || start == rb, "{start:x}");
            assert_eq!(len, 256 * PS);
        }
    }

    #[test]
    fn unique_pages_are_dropped_and_forgotten() {
        let mut s = Sim::new(cfg());
        s.client(1, vec![(0x1000_0000, unique(4096, 1))]);
        s.client(2, vec![(0x1000_0000, unique(4096, 2))]);
        s.run(10_000);
        assert!(s.marks(1).is_empty() && s.marks(2).is_empty());
        assert_eq!(s.eng.fingerprints(), 0);
        assert_eq!(s.eng.distinct_hashes(), 0);
        let st = s.eng.status(1).unwrap();
        assert_eq!(st.regions_dropped, 1);
        assert!(st.counters.fingerprinted_pages >= 4096 * 55 / 10 - 100);
        // Nothing more is sampled.
        let before = st.counters.fingerprinted_pages;
        s.run(2_000);
        assert_eq!(
            s.eng.status(1).unwrap().counters.fingerprinted_pages,
            before
        );
    }

    #[test]
    fn dense_two_processes_fully_marked() {
        let mut s = Sim::new(cfg());
        let same: Vec<Option<u64>> = vec![Some(7); 5120];
        s.client(1, vec![(0x1000_0000, same.clone())]);
        s.client(2, vec![(0x5000_0000, same)]);
        s.run(3_000);
        assert_eq!(s.eng.marked(1), vec![(0x1000_0000, 5120 * PS)]);
        assert_eq!(s.eng.marked(2), vec![(0x5000_0000, 5120 * PS)]);
    }

    #[test]
    fn volatile_pages_never_marked() {
        let mut s = Sim::new(cfg());
        s.volatile = true;
        s.client(1, vec![(0x1000_0000, vec![Some(3); 1024])]);
        s.client(2, vec![(0x2000_0000, vec![Some(3); 1024])]);
        s.run(10_000);
        assert!(s.madvised.is_empty());
        assert_eq!(s.eng.fingerprints(), 0);
    }

    /// Default schedule (rounds 1 s apart, the second after `first_recheck_ms`): two
    /// processes' duplicates are marked well before the first full interval, and pages
    /// rewritten continuously are still never marked.
    #[test]
    fn second_round_comes_after_first_recheck() {
        let c = Config {
            min_region_bytes: 64 * 1024,
            ..Config::default()
        };
        assert_eq!((c.round_interval_ms, c.first_recheck_ms), (1000, 150));
        let mut s = Sim::new(c.clone());
        let same: Vec<Option<u64>> = vec![Some(7); 5120];
        s.client(1, vec![(0x1000_0000, same.clone())]);
        s.client(2, vec![(0x5000_0000, same)]);
        s.run(400);
        assert_eq!(s.eng.marked(1), vec![(0x1000_0000, 5120 * PS)]);
        assert_eq!(s.eng.marked(2), vec![(0x5000_0000, 5120 * PS)]);
        let st = s.eng.status(1).unwrap();
        assert_eq!(st.min_coefficient, 90, "{st:?}");

        let mut s = Sim::new(c);
        s.volatile = true;
        s.client(1, vec![(0x1000_0000, vec![Some(3); 1024])]);
        s.client(2, vec![(0x2000_0000, vec![Some(3); 1024])]);
        s.run(15_000);
        assert!(s.madvised.is_empty());
        for c in [1, 2] {
            let st = s.eng.status(c).unwrap();
            assert_eq!(st.counters.candidates, 0, "{st:?}");
            assert_eq!(st.min_coefficient, 10, "{st:?}");
        }
    }

    /// All-zero pages (a buffer just allocated and not yet written) wait for the third round,
    /// a full interval after the region appeared; other duplicates are marked after the second.
    #[test]
    fn zero_pages_wait_for_the_third_round() {
        let c = Config {
            min_region_bytes: 64 * 1024,
            ..Config::default()
        };
        let zero = ksmplus_common::protocol::page_hash(&[0u8; PS as usize]);
        let mut s = Sim::new(c);
        s.client(1, vec![(0x1000_0000, vec![Some(zero); 512])]);
        s.client(2, vec![(0x5000_0000, vec![Some(zero); 512])]);
        s.client(3, vec![(0x7000_0000, vec![Some(9); 512])]);
        s.client(4, vec![(0x9000_0000, vec![Some(9); 512])]);
        s.run(400);
        assert!(s.eng.marked(1).is_empty(), "{:?}", s.eng.marked(1));
        assert!(s.eng.marked(2).is_empty());
        assert_eq!(s.eng.status(1).unwrap().counters.candidates, 0);
        assert_eq!(s.eng.marked(3), vec![(0x7000_0000, 512 * PS)]);
        assert_eq!(s.eng.marked(4), vec![(0x9000_0000, 512 * PS)]);
        s.run(1_500);
        assert_eq!(s.eng.marked(1), vec![(0x1000_0000, 512 * PS)]);
        assert_eq!(s.eng.marked(2), vec![(0x5000_0000, 512 * PS)]);
    }

    fn resize(
        s: &mut Sim,
        id: ClientId,
        old: (u64, u64),
        new: (u64, u64),
        pages: Vec<Option<u64>>,
    ) {
        let m = s.mem.get_mut(&id).unwrap();
        m.remove(&old.0);
        m.insert(new.0, pages);
        s.eng.on_event(
            id,
            Event::Resized {
                old_start: old.0,
                old_len: old.1 * PS,
                new_start: new.0,
                new_len: new.1 * PS,
            },
            s.now,
        );
    }

    /// A region moved by mremap keeps its marked runs (the kernel moved the VMA flags with the
    /// pages): nothing is marked again; one grown in place samples the new pages and marks them.
    #[test]
    fn mremap_moves_and_growth_keep_marks() {
        let mut s = Sim::new(cfg());
        s.client(1, vec![(0x1000_0000, vec![Some(7); 512])]);
        s.client(2, vec![(0x5000_0000, vec![Some(7); 512])]);
        s.run(1_000);
        assert_eq!(s.eng.marked(1), vec![(0x1000_0000, 512 * PS)]);
        s.madvised.clear();
        resize(
            &mut s,
            1,
            (0x1000_0000, 512),
            (0x3000_0000, 512),
            vec![Some(7); 512],
        );
        assert_eq!(s.eng.marked(1), vec![(0x3000_0000, 512 * PS)]);
        s.run(3_000);
        assert_eq!(s.eng.marked(1), vec![(0x3000_0000, 512 * PS)]);
        assert!(
            !s.madvised.iter().any(|m| m.0 == 1),
            "marked again after a move: {:?}",
            s.madvised
        );
        // Grown in place (shrunk tail first, to check clipping): 512 -> 256 -> 1024 pages.
        resize(
            &mut s,
            1,
            (0x3000_0000, 512),
            (0x3000_0000, 256),
            vec![Some(7); 256],
        );
        assert_eq!(s.eng.marked(1), vec![(0x3000_0000, 256 * PS)]);
        resize(
            &mut s,
            1,
            (0x3000_0000, 256),
            (0x3000_0000, 1024),
            vec![Some(7); 1024],
        );
        s.run(3_000);
        let marked: u64 = s.eng.marked(1).iter().map(|m| m.1).sum();
        assert_eq!(
            marked,
            1024 * PS,
            "{:?} {:?}",
            s.eng.marked(1),
            s.eng.status(1)
        );
        assert!(s.eng.marked(1).iter().all(|m| m.0 >= 0x3000_0000));
    }

    #[test]
    fn volatile_neighbour_process_does_not_stop_marking() {
        let mut s = Sim::new(cfg());
        s.volatile_client = Some(1);
        s.client(1, vec![(0x1000_0000, vec![Some(3); 2048])]);
        s.client(2, vec![(0x2000_0000, vec![Some(4); 1024])]);
        s.run(10_000);
        assert!(s.marks(1).is_empty());
        assert_eq!(
            s.eng.marked(2),
            vec![(0x2000_0000, 1024 * PS)],
            "{:?}",
            s.eng.status(2)
        );
    }

    #[test]
    fn not_resident_pages_are_nothing() {
        let mut s = Sim::new(cfg());
        s.client(1, vec![(0x1000_0000, vec![None; 1024])]);
        s.client(2, vec![(0x2000_0000, vec![None; 1024])]);
        s.run(10_000);
        assert!(s.madvised.is_empty());
        let st = s.eng.status(1).unwrap();
        assert_eq!(st.regions_dropped, 1);
        // Nothing resident: nothing fingerprinted.
        assert_eq!(st.counters.fingerprinted_pages, 0, "{st:?}");
    }

    /// Regions of 1 Mi pages (4 GiB, like JavaScriptCore's gigacages) with 2 000 resident
    /// pages each, 300 of them duplicates across the two processes.
    fn sparse(salt: u64) -> Vec<Option<u64>> {
        let mut v = vec![None; 1 << 20];
        for (k, base) in [1000usize, 300_000, 900_000].into_iter().enumerate() {
            let n = if k == 0 { 800 } else { 600 };
            for i in 0..n {
                v[base + i] = Some((salt << 32) | (base + i) as u64);
            }
        }
        // The duplicates: a run in the middle of the second resident stretch.
        for p in &mut v[300_100..300_400] {
            *p = Some(0xd0d0);
        }
        v
    }

    #[test]
    fn sparse_regions_sample_resident_pages_only() {
        let mut s = Sim::new(cfg());
        s.client(1, vec![(0x1000_0000_0000, sparse(1))]);
        s.client(2, vec![(0x2000_0000_0000, sparse(2))]);
        s.run(20_000);
        for (c, base) in [(1, 0x1000_0000_0000u64), (2, 0x2000_0000_0000)] {
            assert_eq!(
                s.eng.marked(c),
                vec![(base + 300_100 * PS, 300 * PS)],
                "{:?}",
                s.eng.status(c)
            );
            let st = s.eng.status(c).unwrap();
            // A round samples at most the resident pages it found (100 + 90 + … + 10 % of
            // the 2 000, then 10 % per round at the floor); growth adds the run and one batch
            // beyond each end. Nothing of the 1 046 576 non-resident pages.
            let f = st.counters.fingerprinted_pages;
            assert!(f > 2000 * 55 / 10, "{f} {st:?}");
            assert!(f <= st.counters.resident_pages + 1000, "{f} {st:?}");
            assert!(f < 2000 * 10, "{f} {st:?}");
        }
    }

    #[test]
    fn residency_in_pieces() {
        let mut s = Sim::new(cfg());
        s.max_runs = 50;
        // Every other page resident: 1024 runs of one page, asked 50 at a time.
        let mut a: Vec<Option<u64>> = vec![None; 2048];
        let mut b = a.clone();
        for i in (0..1024).step_by(2) {
            a[i] = Some(0x77);
            b[i] = Some(0x77);
        }
        for i in (1024..2048).step_by(2) {
            a[i] = Some((1 << 40) | i as u64);
            b[i] = Some((2 << 40) | i as u64);
        }
        s.client(1, vec![(0x1000_0000, a)]);
        s.client(2, vec![(0x2000_0000, b)]);
        s.run(15_000);
        let st = s.eng.status(1).unwrap();
        assert!(st.counters.residency_queries > 40, "{st:?}");
        // Single-page runs (growth stops at the non-resident pages), 2 pages apart: coalesced
        // into one range (gap 8).
        let m = s.eng.marked(1);
        assert_eq!(m.len(), 1, "{m:?} {st:?}");
        assert!(m[0].0 < 0x1000_0000 + 16 * PS && m[0].1 > 900 * PS, "{m:?}");
        // The first round sampled every resident page once.
        assert!(st.counters.fingerprinted_pages >= 1024, "{st:?}");
    }

    #[test]
    fn runs_coalesce_within_gap() {
        let mut s = Sim::new(cfg());
        let mut a = unique(1024, 1);
        // Two dup runs 4 pages apart (coalesced, gap 8) and one far away.
        for i in (100..200).chain(204..300).chain(600..650) {
            a[i] = Some(0xaa);
        }
        s.client(1, vec![(0x1000_0000, a)]);
        s.run(5_000);
        let mut m = s.eng.marked(1);
        m.sort();
        assert_eq!(
            m,
            vec![
                (0x1000_0000 + 100 * PS, 200 * PS),
                (0x1000_0000 + 600 * PS, 50 * PS)
            ]
        );
    }

    #[test]
    fn unmerged_run_is_unmarked_after_full_scans() {
        let mut s = Sim::new(cfg());
        let same: Vec<Option<u64>> = vec![Some(7); 256];
        s.client(1, vec![(0x1000_0000, same.clone())]);
        s.client(2, vec![(0x5000_0000, same)]);
        s.run(1_000);
        assert_eq!(s.eng.marked(1).len(), 1);
        s.eng.set_full_scans(2); // first read after marking: the grace period starts
        assert!(s.eng.due_checks().is_empty());
        s.eng.set_full_scans(5);
        assert!(s.eng.due_checks().is_empty());
        s.eng.set_full_scans(6);
        let due = s.eng.due_checks();
        assert_eq!(due, vec![1, 2]);
        // Client 1 merged something, client 2 nothing.
        s.eng
            .feedback(1, &[(0x1000_0000, 0x1000_0000 + 256 * PS, 1024)]);
        s.eng
            .feedback(2, &[(0x5000_0000, 0x5000_0000 + 256 * PS, 0)]);
        let out = s.eng.take_output();
        assert_eq!(out.len(), 1);
        assert!(matches!(
            out[0],
            (
                2,
                Command::Madvise {
                    start: 0x5000_0000,
                    advice: Advice::Unmergeable,
                    ..
                }
            )
        ));
        assert!(s.eng.marked(2).is_empty());
        assert_eq!(s.eng.marked(1).len(), 1);
        // Client 2's region is not re-marked.
        s.run(5_000);
        assert!(
            s.eng.marked(2).is_empty(),
            "{:?} {:?}",
            s.eng.marked(2),
            s.eng.status(2)
        );
    }

    #[test]
    fn run_grown_over_initialising_buffer_is_loosened_then_regrown_tight() {
        let mut s = Sim::new(cfg());
        // Sampled while both buffers are still all zero: everything looks duplicate.
        s.client(
            1,
            vec![
                (0x1000_0000, vec![Some(0); 2560]),
                (0x2000_0000, vec![Some(0); 2560]),
            ],
        );
        s.run(1_000);
        assert_eq!(s.eng.status(1).unwrap().marked_bytes, 2 * 2560 * PS);
        // Then the program writes its real content: 256 duplicate pages each, the rest unique.
        for (k, start) in [(1u64, 0x1000_0000u64), (2, 0x2000_0000)] {
            let mut v = unique(2560, k);
            for p in v.iter_mut().take(256) {
                *p = Some(0xff);
            }
            s.mem.get_mut(&1).unwrap().insert(start, v);
        }
        s.eng.set_full_scans(10);
        s.eng.set_full_scans(20);
        // ksmd merged only the 256 + 256 duplicate pages.
        s.eng.feedback(
            1,
            &[
                (0x1000_0000, 0x1000_0000 + 2560 * PS, 1024),
                (0x2000_0000, 0x2000_0000 + 2560 * PS, 1024),
            ],
        );
        let out = s.eng.take_output();
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(s.eng.marked(1).is_empty());
        s.run(30_000);
        let mut m = s.eng.marked(1);
        m.sort();
        assert_eq!(m, vec![(0x1000_0000, 256 * PS), (0x2000_0000, 256 * PS)]);
    }

    #[test]
    fn fingerprint_memory_is_bounded() {
        let mut c = cfg();
        c.max_fingerprints = 1000;
        let mut s = Sim::new(c);
        for id in 1..=4 {
            s.client(id, vec![(0x1000_0000, unique(2048, id))]);
        }
        s.run(3_000); // Sim::step asserts the bound after every step.
        assert!(s.eng.evictions > 0);
    }

    #[test]
    fn rate_limits_hold() {
        let mut c = cfg();
        c.rate_client = 1000;
        c.rate_total = 1500;
        let mut s = Sim::new(c);
        s.client(1, vec![(0x1000_0000, unique(100_000, 1))]);
        s.client(2, vec![(0x1000_0000, unique(100_000, 2))]);
        s.run(10_000);
        let a = s.eng.status(1).unwrap().counters.fingerprinted_pages;
        let b = s.eng.status(2).unwrap().counters.fingerprinted_pages;
        // 10 s at 1500/s total, plus one second of burst.
        assert!(a + b <= 16_500, "{a} + {b}");
        assert!(a <= 11_000 && b <= 11_000, "{a} {b}");
        assert!(a > 4000 && b > 4000, "unfair: {a} {b}");
    }

    #[test]
    fn removal_and_resync_keep_index_consistent() {
        let mut s = Sim::new(cfg());
        let same: Vec<Option<u64>> = vec![Some(9); 512];
        s.client(
            1,
            vec![(0x1000_0000, same.clone()), (0x3000_0000, same.clone())],
        );
        s.client(2, vec![(0x5000_0000, same)]);
        s.run(300);
        // Punch a hole in the middle of the first region.
        s.eng.on_event(
            1,
            Event::Removed {
                start: 0x1000_0000 + 100 * PS,
                len: 50 * PS,
            },
            s.now,
        );
        let st = s.eng.status(1).unwrap();
        assert_eq!(st.regions, 3);
        assert_eq!(st.tracked_bytes, (1024 - 50) * PS);
        // The maps no longer show the first region at all.
        s.eng.on_event(
            1,
            Event::Removed {
                start: 0x1000_0000,
                len: 512 * PS,
            },
            s.now,
        );
        assert_eq!(s.eng.status(1).unwrap().regions, 1);
        s.mem.get_mut(&1).unwrap().remove(&0x1000_0000);
        s.run(2_000);
        s.eng.remove_client(1);
        s.eng.remove_client(2);
        assert_eq!(s.eng.fingerprints(), 0);
        assert_eq!(s.eng.distinct_hashes(), 0);
    }

    #[test]
    fn replies_for_wrong_id_are_ignored() {
        let mut s = Sim::new(cfg());
        s.client(1, vec![(0x1000_0000, unique(64, 1))]);
        s.eng.tick(0);
        let _ = s.eng.take_output();
        s.eng.on_reply(
            1,
            Reply::Fingerprint {
                id: 999_999,
                status: Status::Ok,
                hashes: vec![PageHash::Hash(1); 10_000],
            },
            0,
        );
        assert_eq!(s.eng.fingerprints(), 0);
    }
}
