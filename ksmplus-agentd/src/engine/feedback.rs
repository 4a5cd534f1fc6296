//! Kernel feedback: ksmd's full scans and each marked run's `KSM:` kB decide what is unmarked.

use super::state::*;
use super::*;

impl Engine {
    /// Records ksmd's `full_scans` counter (read by the I/O layer). Runs marked since the last
    /// call start counting their grace period from this value, so a stale counter never makes a
    /// fresh run look old.
    pub fn set_full_scans(&mut self, v: u64) {
        self.full_scans = v;
        if !std::mem::take(&mut self.unstamped) {
            return;
        }
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

    /// Clients with marked runs due for a check (their `wait` of full scans since marked or
    /// last seen merging). The caller measures [`Engine::due_ranges`] and calls
    /// [`Engine::feedback`].
    pub fn due_checks(&self) -> Vec<ClientId> {
        self.procs
            .iter()
            .filter(|(_, p)| {
                p.regions
                    .values()
                    .any(|r| r.runs.iter().any(|x| x.state.check_due(self.full_scans)))
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// The address ranges `(start, end)` of `id`'s marked runs due for a check: what the I/O
    /// layer measures (merged kB of each) before calling [`Engine::feedback`].
    pub fn due_ranges(&self, id: ClientId) -> Vec<(u64, u64)> {
        let Some(p) = self.procs.get(&id) else {
            return Vec::new();
        };
        let ps = p.page_size;
        p.regions
            .iter()
            .flat_map(|(s, r)| r.runs.iter().map(move |x| (*s, x)))
            .filter(|(_, x)| x.state.check_due(self.full_scans))
            .map(|(s, x)| (s + x.lo * ps, s + x.hi * ps))
            .collect()
    }

    /// Kernel feedback: merged kB over address ranges, `(start, end, ksm_kib)` (the due runs'
    /// ranges, [`Engine::due_ranges`], or the client's VMAs), and the address ranges in them
    /// of at least [`MIN_TRIM_PAGES`] present pages that did not merge (`lone`). Due runs
    /// showing no merged kB are marked UNMERGEABLE (freeing their rmap_items); merging ones
    /// are confirmed, less their lone stretches, which are unmarked and not marked again.
    pub fn feedback(&mut self, id: ClientId, vmas: &[(u64, u64, u64)], lone: &[(u64, u64)]) {
        let n = self.cfg.sampling.unmerge_after_full_scans.max(1);
        let max_runs = self.cfg.limits.max_marked_ranges;
        let scans = self.full_scans;
        let Some(p) = self.procs.get_mut(&id) else {
            return;
        };
        let ps = p.page_size;
        // Sorted by start: a run's overlapping ranges are found by a binary search (a filter of
        // all ranges per run was quadratic in the runs due, 5 % of the agent's CPU on D3).
        let mut vmas = vmas.to_vec();
        vmas.sort_unstable();
        // Runs the process may still gain (by cuts that split one) below `max_marked_ranges`.
        let total_runs: u64 = p.regions.values().map(|r| r.runs.len() as u64).sum();
        let mut room = max_runs.saturating_sub(total_runs);
        let mut cmds = Vec::new();
        let mut restarted = false;
        for (s, r) in p.regions.iter_mut() {
            let mut keep = Vec::new();
            let mut restart = Vec::new();
            for mut x in std::mem::take(&mut r.runs) {
                if let RunState::Marked { wait, merged, .. } = x.state {
                    // The scan in progress when the run was marked does not count.
                    if x.state.check_due(scans) {
                        let (a, b) = (s + x.lo * ps, s + x.hi * ps);
                        let (ksm, kib) = overlap_kib(&vmas, a, b);
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
                            // The region's schedule starts over, on this run's pages.
                            restart.push((x.lo, x.hi));
                            continue;
                        }
                        x.state = RunState::Marked {
                            checked_at: Some(scans),
                            merged: true,
                            wait: (wait * 2).min(n * CHECK_BACKOFF_MAX),
                        };
                        // Merging as a whole, but with stretches that did not merge by its
                        // second check (grown over pages that changed, or whose twin went
                        // away): ksmd would checksum them on every pass for nothing. The
                        // thesis stops tracking pages that never merge; here they are cut out
                        // of the run. Not at the first check: content still settling then
                        // (a page being loaded) may merge a few scans later.
                        let lone = if merged { lone } else { &[] };
                        let cuts: Vec<(u64, u64)> = lone
                            .iter()
                            .map(|&(la, lb)| (la.max(a), lb.min(b)))
                            .filter(|&(la, lb)| lb >= la + MIN_TRIM_PAGES * ps)
                            .map(|(la, lb)| ((la - s) / ps, (lb - s) / ps))
                            .collect();
                        let (pieces, cut) = split_run(x, &cuts, &mut room);
                        for (lo, hi) in cut {
                            cmds.push((s + lo * ps, (hi - lo) * ps));
                            r.rejected.push((lo, hi));
                            p.stats.pages_trimmed += hi - lo;
                        }
                        keep.extend(pieces);
                        continue;
                    }
                }
                keep.push(x);
            }
            r.runs = keep;
            for (lo, hi) in restart {
                r.restart_on(lo, hi);
                restarted = true;
            }
        }
        if restarted {
            p.regions_changed();
        }
        // Counted after the unmarks and cuts above.
        p.runs_full = p.regions.values().map(|r| r.runs.len() as u64).sum::<u64>() >= max_runs;
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
}

/// Merged kB and total kB of the ranges of `vmas` (sorted by start, not overlapping) that
/// overlap `[a, b)`.
fn overlap_kib(vmas: &[(u64, u64, u64)], a: u64, b: u64) -> (u64, u64) {
    let first = vmas.partition_point(|v| v.1 <= a);
    vmas[first..]
        .iter()
        .take_while(|v| v.0 < b)
        .fold((0, 0), |(ksm, kib), v| {
            (ksm + v.2, kib + (v.1 - v.0) / 1024)
        })
}

/// Cuts the page ranges `cuts` (in page order, inside the region) out of the run `rest`: the
/// pieces left (in order, each keeping the run's state) and the ranges cut. A cut that would
/// split the run in two takes one of `room` and is skipped when there is none; a run cut away
/// whole gives one back.
fn split_run(mut rest: Run, cuts: &[(u64, u64)], room: &mut u64) -> (Vec<Run>, Vec<(u64, u64)>) {
    let mut pieces = Vec::new();
    let mut cut = Vec::new();
    for &(lo, hi) in cuts {
        if lo < rest.lo || hi > rest.hi {
            continue;
        }
        if lo > rest.lo && hi < rest.hi {
            if *room == 0 {
                continue;
            }
            *room -= 1;
        }
        cut.push((lo, hi));
        if lo > rest.lo {
            pieces.push(Run { hi: lo, ..rest });
        }
        rest.lo = hi;
    }
    if rest.lo < rest.hi {
        pieces.push(rest);
    } else if pieces.is_empty() {
        *room += 1;
    }
    (pieces, cut)
}

#[cfg(test)]
mod unit {
    use super::overlap_kib;

    #[test]
    fn overlap_counts_only_the_ranges_that_meet_the_run() {
        let k = 1024;
        let v = [
            (0, 4 * k, 4),
            (4 * k, 8 * k, 0),
            (16 * k, 20 * k, 2),
            (20 * k, 24 * k, 1),
        ];
        assert_eq!(overlap_kib(&v, 0, 4 * k), (4, 4));
        assert_eq!(overlap_kib(&v, 2 * k, 17 * k), (6, 12));
        assert_eq!(
            overlap_kib(&v, 8 * k, 16 * k),
            (0, 0),
            "the gap meets nothing"
        );
        assert_eq!(overlap_kib(&v, 19 * k, 40 * k), (3, 8));
        assert_eq!(overlap_kib(&v, 24 * k, 40 * k), (0, 0), "past the end");
        assert_eq!(overlap_kib(&[], 0, 40 * k), (0, 0));
    }
}
