//! Replies: residency cuts a round's gaps, fingerprints find candidates and grow runs, a grown
//! run is coalesced and marked, madvise replies confirm or reject marks.

use super::state::*;
use super::*;

impl Engine {
    /// The command a reply answers, if it is the one in flight (matched by id; a stale reply
    /// leaves the in-flight command waiting). A `Dormant` status makes the client dormant.
    pub(super) fn take_reply(&mut self, id: ClientId, rid: u32, status: Status) -> Option<Pending> {
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

    pub(super) fn fingerprint_reply(
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
                    Phase::Sampling { m, next, scan, .. } if next >= m && scan >= r.scan_range().1);
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
                if r.coefficient <= self.cfg.sampling.floor {
                    p.stats.floor_pages += hashes.len() as u64;
                }
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
                    if r.coefficient <= self.cfg.sampling.floor {
                        p.stats.floor_candidates += 1;
                    }
                    r.found = true;
                    crate::debug!("client {id}: candidate page {idx} in region {region:#x}");
                    p.grows.push_back(Grow {
                        region,
                        gen,
                        lo: idx,
                        hi: idx,
                        dir: Dir::Up,
                        up_done: false,
                        down_done: false,
                        batch: GROW_FIRST_BATCH,
                    });
                }
                if round_done {
                    r.end_round(&self.cfg, now);
                    p.regions_changed();
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
                p.stats.grown_pages += hashes.len() as u64;
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
                    job.batch = GROW_FIRST_BATCH;
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
    pub(super) fn residency_reply(
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
        let last_page = r.scan_range().1;
        let end = region + last_page * ps;
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
            last_page
        } else {
            (from + covered_pages).min(last_page)
        };
        p.stats.resident_pages += resident;
        // m over the whole round is ceil(R·c/100): each piece gets its share of it. At the
        // floor, each quiet round before this one halved the random share (up to
        // FLOOR_SAMPLE_MAX_SHIFT times): what a random page can still teach there is mostly
        // content that changed, which the round's partner pages confirm (`schedule_client`).
        let c = r.coefficient as u64;
        let shift = if r.coefficient <= self.cfg.sampling.floor {
            r.quiet_rounds.min(FLOOR_SAMPLE_MAX_SHIFT)
        } else {
            0
        };
        let d = 100u64 << shift;
        let m = ((seen + resident) * c).div_ceil(d) - (seen * c).div_ceil(d);
        r.phase = Phase::Sampling {
            m,
            next: 0,
            scan,
            seen: seen + resident,
        };
        if m == 0 {
            if scan >= last_page {
                r.end_round(&self.cfg, now);
                p.regions_changed();
            }
        } else {
            r.piece = piece;
            r.piece_pages = resident;
        }
    }

    /// A grown run `[lo, hi]` is coalesced with nearby runs and marked MERGEABLE.
    pub(super) fn finish_grow(&mut self, id: ClientId, g: Grow) {
        let gap = self.cfg.sampling.coalesce_gap_pages;
        let max_runs = self.cfg.limits.max_marked_ranges;
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
        // Runs within `coalesce_gap_pages` of it are coalesced with it.
        let near: Vec<usize> = r
            .runs
            .iter()
            .enumerate()
            .filter(|(_, x)| x.lo <= hi + gap && lo <= x.hi + gap)
            .map(|(i, _)| i)
            .collect();
        if near.is_empty() && total_runs >= max_runs {
            p.stats.marks_refused += 1;
            p.runs_full = true;
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
        p.runs_full = total_runs + 1 - near.len() as u64 >= max_runs;
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

    pub(super) fn madvise_reply(&mut self, id: ClientId, rid: u32, status: Status) {
        let unmerge_after = self.cfg.sampling.unmerge_after_full_scans.max(1);
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
                        wait: unmerge_after,
                    };
                    self.unstamped = true;
                } else {
                    p.stats.madvise_errors += 1;
                    let x = r.runs.remove(i);
                    r.rejected.push((x.lo, x.hi));
                }
                return;
            }
        }
    }
}
