//! The engine's state: regions, runs, growth jobs, commands in flight, per-process counters.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RunState {
    /// Madvise(MERGEABLE) sent, reply pending.
    Marking(u32),
    /// Marked; `checked_at` is the full_scans count first read after marking, or when last
    /// confirmed merging (`None` until the I/O layer next reads the counter). The next check
    /// of its merged pages is due `wait` full scans later: `unmerge_after_full_scans` after marking,
    /// doubled by each confirmation (up to [`CHECK_BACKOFF_MAX`] times that), so a run that
    /// keeps merging is looked at less and less often.
    Marked {
        checked_at: Option<u64>,
        merged: bool,
        wait: u64,
    },
}

impl RunState {
    /// Marked, and its check is due: `wait` full scans have passed since `checked_at`.
    pub(super) fn check_due(&self, full_scans: u64) -> bool {
        matches!(*self, RunState::Marked { checked_at: Some(c), wait, .. } if full_scans > c + wait)
    }
}

#[derive(Clone, Debug)]
pub(super) struct Run {
    pub(super) lo: u64,
    /// Exclusive.
    pub(super) hi: u64,
    pub(super) state: RunState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
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

/// A remembered page: its latest hash and the index's duplicate sequence number when it was
/// read ([`Engine::dup_seq`](super::Engine)): a page whose hash was stored for another page
/// since then may have a twin now. Three `u32`s, so an entry of [`Region::hashes`] stays 16
/// bytes (see [`BYTES_PER_FINGERPRINT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Memo([u32; 3]);

// A region's map entry is what BYTES_PER_FINGERPRINT counts on.
const _: () = assert!(std::mem::size_of::<(u32, Memo)>() == 16);

impl Memo {
    pub(super) fn new(hash: u64, read_at: u32) -> Memo {
        Memo([hash as u32, (hash >> 32) as u32, read_at])
    }
    pub(super) fn hash(self) -> u64 {
        u64::from(self.0[0]) | u64::from(self.0[1]) << 32
    }
    pub(super) fn read_at(self) -> u32 {
        self.0[2]
    }
}

#[derive(Clone, Debug)]
pub(super) struct Region {
    pub(super) pages: u64,
    pub(super) gen: u64,
    /// Coefficient of the current (or last) round; 0 before the first round.
    pub(super) coefficient: u32,
    pub(super) rounds: u64,
    pub(super) phase: Phase,
    /// Remembered pages by index in the region: latest hash, and when it was read.
    pub(super) hashes: HashMap<u32, Memo>,
    pub(super) runs: Vec<Run>,
    /// Ranges unmarked for merging nothing: not marked again.
    pub(super) rejected: Vec<(u64, u64)>,
    /// Runs unmarked for merging less than half their pages.
    pub(super) loosened: u32,
    /// Pages `[lo, hi)` the rounds cover until the schedule next reaches the floor: the span of
    /// the runs loosened since (a loosened run is grown again from its current content without
    /// sampling the rest of the region from 100 % again). `None`: the whole region.
    pub(super) focus: Option<(u64, u64)>,
    pub(super) last_sampled_ms: u64,
    /// A candidate was seeded in the current round.
    pub(super) found: bool,
    /// Consecutive rounds at the floor that found no candidate: each doubles the next pause
    /// (up to [`FLOOR_BACKOFF_MAX_SHIFT`] doublings), so a settled region costs ever less.
    pub(super) quiet_rounds: u32,
    /// Resident runs of the current piece of the round: `(first page, resident pages of the
    /// piece before it)`, in page order. Empty outside a round's piece.
    pub(super) piece: Vec<(u64, u64)>,
    /// Resident pages of the current piece.
    pub(super) piece_pages: u64,
}

impl Region {
    pub(super) fn new(pages: u64, gen: u64, now: u64) -> Region {
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
            focus: None,
            last_sampled_ms: now,
            found: false,
            quiet_rounds: 0,
            piece: Vec::new(),
            piece_pages: 0,
        }
    }
    pub(super) fn in_run(&self, idx: u64) -> bool {
        self.runs.iter().any(|r| r.lo <= idx && idx < r.hi)
    }
    pub(super) fn rejected(&self, idx: u64) -> bool {
        self.rejected.iter().any(|&(lo, hi)| lo <= idx && idx < hi)
    }
    /// Marked runs and rejected ranges as sorted, merged `[lo, hi)` page spans (for
    /// [`in_spans`]): the pages sampling has nothing left to learn from.
    pub(super) fn settled_spans(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.runs.iter().map(|x| (x.lo, x.hi)).collect();
        v.extend(self.rejected.iter().copied());
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        out
    }
    /// The pages `[lo, hi)` a round covers: the focus, within the region, else all of it.
    pub(super) fn scan_range(&self) -> (u64, u64) {
        match self.focus {
            Some((lo, hi)) => (lo.min(self.pages), hi.min(self.pages)),
            None => (0, self.pages),
        }
    }
    /// The run `[lo, hi)` was loosened: the region's schedule starts over on it (and on any
    /// run loosened before that round reaches the floor), unless it already starts over whole.
    pub(super) fn restart_on(&mut self, lo: u64, hi: u64) {
        let whole_pending = self.rounds == 0 && self.focus.is_none();
        if !whole_pending {
            self.focus = Some(match self.focus {
                Some((a, b)) => (a.min(lo), b.max(hi)),
                None => (lo, hi),
            });
        }
        self.rounds = 0;
        if matches!(self.phase, Phase::Waiting { .. }) {
            self.phase = Phase::Waiting { at: 0 };
        }
    }
    /// Whether page `idx` is resident in the current piece.
    pub(super) fn piece_resident(&self, idx: u64) -> bool {
        let i = self.piece.partition_point(|&(lo, _)| lo <= idx);
        if i == 0 {
            return false;
        }
        let (lo, before) = self.piece[i - 1];
        let next = self.piece.get(i).map_or(self.piece_pages, |&(_, b)| b);
        idx < lo + (next - before)
    }
    /// Page index of the `j`-th resident page of the current piece (`j < piece_pages`).
    pub(super) fn piece_page(&self, j: u64) -> u64 {
        let i = self.piece.partition_point(|&(_, before)| before <= j) - 1;
        let (lo, before) = self.piece[i];
        lo + (j - before)
    }
    /// The round is over: the next starts after a pause.
    pub(super) fn end_round(&mut self, cfg: &Config, now: u64) {
        // Past the schedule (kept for its marked runs) a region is only watched for new
        // duplicates, at a tenth of the pace, and half as often again after each round that
        // found nothing new: the steady cost follows what changes, not what is tracked.
        // The second round comes sooner: a new region's duplicates need two samples.
        let pause = if self.rounds == 0 {
            // A run was loosened during this round ([`Region::restart_on`]): the schedule
            // starts over now, on the focus it set (not after a floor pause, focus dropped).
            0
        } else if self.coefficient <= cfg.sampling.floor {
            // The focused schedule is over: floor rounds watch the whole region again.
            self.focus = None;
            if std::mem::take(&mut self.found) {
                self.quiet_rounds = 0;
            } else {
                self.quiet_rounds = self.quiet_rounds.saturating_add(1);
            }
            let shift = self.quiet_rounds.min(FLOOR_BACKOFF_MAX_SHIFT);
            (cfg.sampling.round_interval_ms * FLOOR_SLOWDOWN) << shift
        } else if self.rounds == 1 {
            cfg.sampling
                .first_recheck_ms
                .min(cfg.sampling.round_interval_ms)
        } else {
            cfg.sampling.round_interval_ms
        };
        self.found = false;
        self.phase = Phase::Waiting { at: now + pause };
        self.piece = Vec::new();
        self.piece_pages = 0;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dir {
    Up,
    Down,
}

#[derive(Clone, Debug)]
pub(super) struct Grow {
    pub(super) region: u64,
    pub(super) gen: u64,
    pub(super) lo: u64,
    /// Inclusive.
    pub(super) hi: u64,
    pub(super) dir: Dir,
    pub(super) up_done: bool,
    pub(super) down_done: bool,
    pub(super) batch: u64,
}

#[derive(Clone, Debug)]
pub(super) enum Pending {
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
pub(super) struct Proc {
    pub(super) pid: u32,
    pub(super) comm: String,
    pub(super) page_size: u64,
    /// Hash of an all-zero page of `page_size` bytes (see [`ZERO_PAGE_MIN_ROUND`]).
    pub(super) zero_hash: u64,
    pub(super) regions: BTreeMap<u64, Region>,
    pub(super) inflight: Option<(u32, Pending)>,
    pub(super) grows: VecDeque<Grow>,
    pub(super) bucket: Bucket,
    pub(super) dormant: bool,
    pub(super) stats: ProcCounters,
    /// No region starts a round before this time, and whether one may be mid-round, as the
    /// last look at every region found (`schedule_client`). Anything that puts a region back
    /// to waiting or adds one sets `round_due` to 0 ([`Proc::regions_changed`]), so a tick
    /// in between looks at no region: a reply's follow-up tick used to walk them all.
    pub(super) round_due: u64,
    pub(super) maybe_sampling: bool,
    /// It had `max_marked_ranges` runs when last counted (a run grown, the feedback): a
    /// partner page would only be grown again and refused at every floor round.
    pub(super) runs_full: bool,
}

impl Proc {
    /// A region was added, split, moved or put back to waiting: the next tick looks at all.
    pub(super) fn regions_changed(&mut self) {
        self.round_due = 0;
    }
}

/// Counters kept per client, reported by `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcCounters {
    pub fingerprinted_pages: u64,
    /// Of them, read by rounds at the floor coefficient, and by the growth of candidates into
    /// runs (the rest: rounds of regions still on their learning schedule).
    pub floor_pages: u64,
    pub grown_pages: u64,
    /// Candidates found by rounds at the floor.
    pub floor_candidates: u64,
    /// Of `floor_pages`: remembered pages read again because their hash has a duplicate now.
    pub partner_pages: u64,
    /// Fingerprint index lookups by the floor rounds' search for partner pages: only for
    /// remembered pages whose hash was stored for another page since they were read.
    pub partner_lookups: u64,
    /// Regions that appeared (new covered memory, not a move or a growth in place).
    pub regions_added: u64,
    pub candidates: u64,
    pub runs_marked: u64,
    pub runs_unmarked: u64,
    pub runs_loosened: u64,
    /// Pages cut out of merging runs for not merging ([`MIN_TRIM_PAGES`]).
    pub pages_trimmed: u64,
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

/// Whether page `idx` lies in one of `spans` (sorted, disjoint `[lo, hi)`).
pub(super) fn in_spans(spans: &[(u64, u64)], idx: u64) -> bool {
    let i = spans.partition_point(|&(lo, _)| lo <= idx);
    i > 0 && idx < spans[i - 1].1
}
