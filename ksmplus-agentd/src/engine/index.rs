//! The fingerprint index: remembered hashes per page, the global count per hash, eviction
//! under the memory cap.

use super::state::*;
use super::*;

impl Engine {
    pub(super) fn forget(&mut self, r: &Region) {
        for m in r.hashes.values() {
            dec(&mut self.index, m.hash());
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
        let read_at = self.dup_seq;
        let prev = match h {
            Some(h) => r.hashes.insert(idx as u32, Memo::new(h, read_at)),
            None => r.hashes.remove(&(idx as u32)),
        }
        .map(Memo::hash);
        if let Some(old) = prev {
            dec(&mut self.index, old);
            self.fingerprints -= 1;
        }
        if let Some(h) = h {
            let c = self.index.entry(h).or_insert(0);
            *c += 1;
            // A page that keeps its hash is not news; one whose new hash another page has is
            // (for the other page, and for itself: its next read can confirm it).
            if *c >= 2 && prev != Some(h) {
                self.note_dup(h);
            }
            self.fingerprints += 1;
        }
        prev
    }

    /// A hash was stored for a page while another page has it: numbered in `dup_seq`, kept in
    /// `recent_dups` (its latest number) until that holds [`RECENT_DUPS_MAX`] hashes, when it
    /// starts over from `recent_floor`.
    pub(super) fn note_dup(&mut self, h: u64) {
        if self.dup_seq == u32::MAX {
            self.restart_dup_seq();
        }
        if self.recent_dups.len() >= RECENT_DUPS_MAX && !self.recent_dups.contains_key(&h) {
            self.recent_dups.clear();
            self.recent_floor = self.dup_seq;
        }
        self.dup_seq += 1;
        self.recent_dups.insert(h, self.dup_seq);
    }

    /// The sequence ran out (after 4·10⁹ events): every page is read "before" the new floor,
    /// so the next partner search looks each up in the index, as if nothing were known.
    fn restart_dup_seq(&mut self) {
        for p in self.procs.values_mut() {
            for r in p.regions.values_mut() {
                for m in r.hashes.values_mut() {
                    *m = Memo::new(m.hash(), 0);
                }
            }
        }
        self.recent_dups.clear();
        self.dup_seq = 1;
        self.recent_floor = 1;
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
            let hs: Vec<u64> = r.hashes.drain().map(|(_, m)| m.hash()).collect();
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

/// Whether the remembered page `m` may have a twin it has not been read since: a page of its
/// hash was stored after it was read (`recent`: the engine's `recent_dups`), or that is no
/// longer known (read before `floor`, the engine's `recent_floor`). Only such pages need an
/// index lookup to be partner pages.
pub(super) fn twin_news(recent: &HashMap<u64, u32>, floor: u32, m: Memo) -> bool {
    m.read_at() < floor || recent.get(&m.hash()).is_some_and(|&q| q > m.read_at())
}
