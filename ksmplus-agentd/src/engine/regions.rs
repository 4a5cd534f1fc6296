//! Region events: a process's covered memory appears, goes (cutting regions), moves.

use super::state::*;
use super::*;

impl Engine {
    pub(super) fn region_added(&mut self, id: ClientId, start: u64, len: u64, now: u64) {
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
        p.stats.regions_added += 1;
        p.regions.insert(start, Region::new(pages, gen, now));
    }

    /// mremap of a whole known region. Shrunk in place: the tail is removed. Moved or grown:
    /// its fingerprints and marked runs go with it (the kernel moves the pages and their VMA
    /// flags), clipped to the new size, and a grown region starts its schedule again so the new
    /// pages are sampled. Anything else (a region not known at that size, or now too small) is a
    /// removal and an addition.
    pub(super) fn region_resized(
        &mut self,
        id: ClientId,
        old: (u64, u64),
        new: (u64, u64),
        now: u64,
    ) {
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
            r.focus = None;
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
    pub(super) fn region_removed(&mut self, id: ClientId, start: u64, len: u64) {
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
                    forgotten.push(h.hash());
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
                // In the right piece's pages (possibly empty: its rounds then end at once).
                rr.focus = r
                    .focus
                    .map(|(a, b)| (a.saturating_sub(right_first), b.saturating_sub(right_first)));
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
}
