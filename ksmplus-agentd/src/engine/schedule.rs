//! The schedule: due rounds start, sampling and growth commands are issued within the rate
//! limits.

use super::state::*;
use super::*;

impl Engine {
    /// Runs the schedule: starts due rounds and issues fingerprint commands within the rate limits.
    pub fn tick(&mut self, now: u64) {
        self.global
            .refill(self.cfg.limits.fingerprint_pages_per_sec_total, now);
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

    /// [`Engine::tick`] for `ids` alone (the clients whose replies just came back: no other
    /// client's work moved since the last tick). A turn's follow-up ticks cost in proportion
    /// to the clients at work, not to every region of every client.
    pub fn tick_clients(&mut self, now: u64, ids: &[ClientId]) {
        self.global
            .refill(self.cfg.limits.fingerprint_pages_per_sec_total, now);
        for &id in ids {
            if self.global.tokens == 0 {
                break;
            }
            if self.procs.contains_key(&id) {
                self.schedule_client(id, now);
            }
        }
    }

    pub(super) fn chunk_limit(&self) -> u64 {
        (MAX_FINGERPRINT_PAGES as u64)
            .min((self.cfg.limits.fingerprint_pages_per_sec / 4).max(64))
            .min(self.cfg.limits.fingerprint_pages_per_sec_total.max(1))
    }

    pub(super) fn schedule_client(&mut self, id: ClientId, now: u64) {
        let limit = self.chunk_limit();
        let (cfg_start, cfg_step, cfg_floor) = (
            self.cfg.sampling.start,
            self.cfg.sampling.step,
            self.cfg.sampling.floor,
        );
        let rate = self.cfg.limits.fingerprint_pages_per_sec;
        let p = self.procs.get_mut(&id).unwrap();
        if p.dormant || p.inflight.is_some() {
            return;
        }
        p.bucket.refill(rate, now);
        // Start due rounds, drop exhausted regions — when one can be due: a tick before
        // `round_due` (nothing changed since the last look) finds none.
        let mut dropped = Vec::new();
        if now < p.round_due {
            debug_assert!(
                p.regions
                    .values()
                    .all(|r| !matches!(r.phase, Phase::Waiting { at } if at <= now)),
                "client {id}: round_due {} hides a due region",
                p.round_due
            );
        } else {
            let (mut next, mut sampling) = (u64::MAX, false);
            for (s, r) in p.regions.iter_mut() {
                let Phase::Waiting { at } = r.phase else {
                    sampling |= matches!(r.phase, Phase::Sampling { .. });
                    continue;
                };
                if now < at {
                    next = next.min(at);
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
                    scan: r.scan_range().0,
                    seen: 0,
                };
                sampling = true;
            }
            p.round_due = next;
            p.maybe_sampling = sampling;
        }
        let mut forgotten = Vec::new();
        for s in dropped {
            let r = p.regions.get_mut(&s).unwrap();
            forgotten.extend(r.hashes.drain().map(|(_, m)| m.hash()));
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
            let p = self.procs.get_mut(&id).unwrap();
            if work.is_none() && p.maybe_sampling {
                let ps = p.page_size;
                let mut sampling = false;
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
                    sampling = true;
                    if next < m {
                        // One random resident page in each gap of the piece — unless it lies
                        // in a marked run (already handed to ksmd, checked by the kernel's
                        // feedback) or a range barred from marking: reading it again could
                        // only make a candidate the growth would skip. A settled region that
                        // is mostly marked costs its floor rounds next to nothing.
                        let n = r.piece_pages;
                        let k = budget.min(m - next);
                        let mut pages = Vec::with_capacity(k as usize);
                        let done = r.settled_spans();
                        for g in next..next + k {
                            let lo = g * n / m;
                            let hi = ((g + 1) * n / m).max(lo + 1);
                            let j = lo + self.rng.below(hi - lo);
                            let idx = r.piece_page(j);
                            if !in_spans(&done, idx) {
                                pages.push(s + idx * ps);
                            }
                        }
                        // A floor round also reads again, in its first batch, every remembered
                        // page of the piece whose last hash has a duplicate now (one that
                        // appeared elsewhere since, or content a random sample caught
                        // changing): a candidate if it still holds it. Random pages at the
                        // floor rarely hit the same page twice, so without this a page whose
                        // twin appeared later waited for luck, and the floor's random share
                        // can shrink while a region stays quiet (`residency_reply`).
                        if next == 0 && r.coefficient <= cfg_floor && budget > k && !p.runs_full {
                            // Only pages whose hash was stored for another page since they
                            // were read are looked up (the lookups, in an index of every
                            // remembered hash, were most of the search's cost); one found with
                            // no twin is not looked up again until its hash's next such event.
                            let (index, recent) = (&self.index, &self.recent_dups);
                            let (floor, seq) = (self.recent_floor, self.dup_seq);
                            let mut partners = Vec::new();
                            let mut no_twin = Vec::new();
                            for (&i, &memo) in r.hashes.iter() {
                                let j = u64::from(i);
                                if !index::twin_news(recent, floor, memo)
                                    || in_spans(&done, j)
                                    || !r.piece_resident(j)
                                {
                                    continue;
                                }
                                if index.get(&memo.hash()).is_some_and(|&c| c >= 2) {
                                    partners.push(j);
                                } else {
                                    no_twin.push(i);
                                }
                            }
                            p.stats.partner_lookups += (partners.len() + no_twin.len()) as u64;
                            for i in no_twin {
                                if let Some(m) = r.hashes.get_mut(&i) {
                                    *m = Memo::new(m.hash(), seq);
                                }
                            }
                            partners.sort_unstable();
                            let room = (budget - k) as usize;
                            if partners.len() > room {
                                // A window at a random place: pages that stay volatile cannot
                                // keep the same others out round after round.
                                let at = self.rng.below(partners.len() as u64) as usize;
                                partners.rotate_left(at);
                                partners.truncate(room);
                            }
                            p.stats.partner_pages += partners.len() as u64;
                            pages.extend(partners.into_iter().map(|i| s + i * ps));
                            pages.sort_unstable();
                            pages.dedup();
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
                    if scan < r.scan_range().1 {
                        work = Some(Pending::Residency {
                            region: *s,
                            gen: r.gen,
                            from: scan,
                        });
                        break;
                    }
                    // Nothing left to ask or sample (normally ended by the last reply).
                    r.end_round(&self.cfg, now);
                    p.round_due = 0;
                }
                // Only a look that found no region mid-round clears the flag (one that stopped
                // at the region it gave work to knows nothing of those after it).
                if !sampling {
                    p.maybe_sampling = false;
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
                    let end = p.regions[region].scan_range().1;
                    Command::Residency {
                        id: rid,
                        start: region + from * p.page_size,
                        len: end.saturating_sub(*from) * p.page_size,
                    }
                }
            };
            p.inflight = Some((rid, w));
            self.out.push((id, msg));
        }
        self.schedule_client_after(id, now, forgotten);
    }

    pub(super) fn schedule_client_after(&mut self, _id: ClientId, _now: u64, forgotten: Vec<u64>) {
        let n = forgotten.len() as u64;
        for h in forgotten {
            dec(&mut self.index, h);
        }
        self.fingerprints -= n;
    }
}
