//! The fingerprint index: remembered hashes per page, the global count per hash, eviction
//! under the memory cap.

use super::state::*;
use super::*;

impl Engine {
    pub(super) fn forget(&mut self, r: &Region) {
        for h in r.hashes.values() {
            dec(&mut self.index, *h);
        }
        self.fingerprints -= r.hashes.len() as u64;
    }

    /// Records a page's latest hash; returns the previous one.
    pub(super) fn remember(
        &mut self,
        id: ClientId,
        region: u64,
        idx: u64,
        h: Option<u64>,
    ) -> Option<u64> {
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

    pub(super) fn dup(&self, h: u64) -> bool {
        self.index.get(&h).copied().unwrap_or(0) >= 2
    }

    /// Evicts fingerprints of least recently sampled regions while over `max_fingerprints`.
    pub(super) fn evict(&mut self, _now: u64, keep_region: u64) {
        while self.fingerprints > self.cfg.limits.max_fingerprints {
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
}

pub(super) fn dec(index: &mut HashMap<u64, u32>, h: u64) {
    if let Some(c) = index.get_mut(&h) {
        *c -= 1;
        if *c == 0 {
            index.remove(&h);
        }
    }
}
