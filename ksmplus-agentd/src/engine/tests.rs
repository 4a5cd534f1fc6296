//! Unit tests of the engine against a simulated shim.

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
    let mut c = Config {
        min_region_bytes: 64 * 1024,
        ..Config::default()
    };
    c.sampling.round_interval_ms = 100;
    c
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
            self.answer(c, m);
        }
        assert!(self.eng.fingerprints() <= self.eng.config().limits.max_fingerprints);
        self.now += 10;
    }
    /// What the simulated shim and kernel answer to one command.
    fn answer(&mut self, c: ClientId, m: Command) {
        {
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
    assert_eq!(
        (c.sampling.round_interval_ms, c.sampling.first_recheck_ms),
        (1000, 150)
    );
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

fn resize(s: &mut Sim, id: ClientId, old: (u64, u64), new: (u64, u64), pages: Vec<Option<u64>>) {
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
        // the 2 000, then 10 % per round at the floor; the 300 marked ones are not sampled
        // again); growth adds the run and one batch beyond each end. Nothing of the
        // 1 046 576 non-resident pages.
        let f = st.counters.fingerprinted_pages;
        assert!(f > 1700 * 55 / 10, "{f} {st:?}");
        assert!(f <= st.counters.resident_pages + 1000, "{f} {st:?}");
        assert!(f < 2000 * 10, "{f} {st:?}");
    }
}

#[test]
fn residency_in_pieces() {
    // A gap wide enough to bridge the pages sampling has not found yet (the default, 0, leaves
    // a few ranges): this test is about residency asked in pieces.
    let mut c = cfg();
    c.sampling.coalesce_gap_pages = 8;
    let mut s = Sim::new(c);
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
    // Dup runs 1 page apart (coalesced at gap 2, not at the default, 0), 4 pages apart (not),
    // and one far away.
    assert_eq!(Config::default().sampling.coalesce_gap_pages, 0);
    let r = |lo: u64, hi: u64| (0x1000_0000 + lo * PS, (hi - lo) * PS);
    for (gap, want) in [
        (0, vec![r(100, 200), r(201, 300), r(304, 350), r(600, 650)]),
        (2, vec![r(100, 300), r(304, 350), r(600, 650)]),
    ] {
        let mut c = cfg();
        c.sampling.coalesce_gap_pages = gap;
        let mut s = Sim::new(c);
        let mut a = unique(1024, 1);
        for i in (100..200).chain(201..300).chain(304..350).chain(600..650) {
            a[i] = Some(0xaa);
        }
        s.client(1, vec![(0x1000_0000, a)]);
        s.run(5_000);
        let mut m = s.eng.marked(1);
        m.sort();
        assert_eq!(m, want, "gap {gap}");
    }
}

/// Clients 1 and 2 at 0x1000_0000 and 0x5000_0000: 256 pages alike (what gets marked), then
/// `n` pages unique to each (client `id`'s page 256 + i holds `unique(n, id)[i]`).
fn half_marked_pair(c: Config, n: u64) -> Sim {
    let mut s = Sim::new(c);
    for (id, base) in [(1, 0x1000_0000), (2, 0x5000_0000)] {
        let mut pages: Vec<Option<u64>> = vec![Some(7); 256];
        pages.extend(unique(n, id));
        s.client(id, vec![(base, pages)]);
    }
    s
}

/// Two clients with the same 256 pages at 0x1000_0000 and 0x5000_0000, run until client 1's
/// region is marked (one run).
fn marked_pair() -> Sim {
    let mut s = Sim::new(cfg());
    let same: Vec<Option<u64>> = vec![Some(7); 256];
    s.client(1, vec![(0x1000_0000, same.clone())]);
    s.client(2, vec![(0x5000_0000, same)]);
    s.run(1_000);
    assert_eq!(s.eng.marked(1).len(), 1);
    s
}

#[test]
fn unmerged_run_is_unmarked_after_full_scans() {
    let mut s = marked_pair();
    s.eng.set_full_scans(2); // first read after marking: the grace period starts
    assert!(s.eng.due_checks().is_empty());
    s.eng.set_full_scans(5);
    assert!(s.eng.due_checks().is_empty());
    s.eng.set_full_scans(6);
    let due = s.eng.due_checks();
    assert_eq!(due, vec![1, 2]);
    // Client 1 merged something, client 2 nothing.
    s.eng
        .feedback(1, &[(0x1000_0000, 0x1000_0000 + 256 * PS, 1024)], &[]);
    s.eng
        .feedback(2, &[(0x5000_0000, 0x5000_0000 + 256 * PS, 0)], &[]);
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
        &[],
    );
    let out = s.eng.take_output();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(s.eng.marked(1).is_empty());
    s.run(30_000);
    let mut m = s.eng.marked(1);
    m.sort();
    assert_eq!(m, vec![(0x1000_0000, 256 * PS), (0x2000_0000, 256 * PS)]);
}

/// A loosened run in a big region is grown again from a schedule over its own pages, not over
/// the whole region from 100 % again (gimp: 9 loosened runs made the agent fingerprint its
/// 28 000 pages 25 times over).
#[test]
fn a_loosened_run_restarts_the_schedule_on_its_pages_only() {
    let mut s = Sim::new(cfg());
    let big = 16_384u64;
    let mut a = unique(big, 1);
    for p in a.iter_mut().take(512) {
        *p = Some(7);
    }
    s.client(1, vec![(0x1000_0000, a), (0x5000_0000, vec![Some(7); 512])]);
    s.run(10_000);
    let mut m = s.eng.marked(1);
    m.sort();
    assert_eq!(m, vec![(0x1000_0000, 512 * PS), (0x5000_0000, 512 * PS)]);
    // The program rewrites all but the first 128 pages of the run in the big region.
    let v = s.mem.get_mut(&1).unwrap().get_mut(&0x1000_0000).unwrap();
    for (i, p) in v.iter_mut().enumerate().take(512).skip(128) {
        *p = Some((9 << 32) | i as u64);
    }
    s.eng.set_full_scans(10);
    s.eng.set_full_scans(20);
    s.eng.feedback(
        1,
        &[
            (0x1000_0000, 0x1000_0000 + 512 * PS, 512),
            (0x5000_0000, 0x5000_0000 + 512 * PS, 2048),
        ],
        &[],
    );
    let out = s.eng.take_output();
    assert_eq!(
        out.len(),
        1,
        "only the big region's run is loosened: {out:?}"
    );
    let before = s.eng.status(1).unwrap().counters.fingerprinted_pages;
    s.run(20_000);
    let spent = s.eng.status(1).unwrap().counters.fingerprinted_pages - before;
    let mut m = s.eng.marked(1);
    m.sort();
    assert_eq!(m, vec![(0x1000_0000, 128 * PS), (0x5000_0000, 512 * PS)]);
    // The whole region's first round at 100 % alone would be `big` pages.
    assert!(
        spent < big,
        "{spent} pages fingerprinted after the loosening"
    );
}

/// A run loosened while its region's round at the floor is in progress: when that round ends
/// the focused schedule starts at once (not after a floor pause, and not over the whole region);
/// the focused schedule's own last round at the floor gives the whole region back.
#[test]
fn a_loosening_during_a_floor_round_restarts_on_the_focus_at_once() {
    let c = cfg();
    let mut r = Region::new(1000, 1, 0);
    r.rounds = 10;
    r.coefficient = c.sampling.floor;
    r.phase = Phase::Sampling {
        m: 0,
        next: 0,
        scan: 0,
        seen: 0,
    };
    r.restart_on(100, 200);
    r.end_round(&c, 5_000);
    assert_eq!(r.phase, Phase::Waiting { at: 5_000 });
    assert_eq!(r.scan_range(), (100, 200));
    r.rounds = 10;
    r.end_round(&c, 6_000);
    assert_eq!(r.scan_range(), (0, 1000));
    assert!(matches!(r.phase, Phase::Waiting { at } if at > 6_000));
}

#[test]
fn fingerprint_memory_is_bounded() {
    let mut c = cfg();
    c.limits.max_fingerprints = 1000;
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
    c.limits.fingerprint_pages_per_sec = 1000;
    c.limits.fingerprint_pages_per_sec_total = 1500;
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

#[test]
fn floor_pause_doubles_while_rounds_find_nothing_and_resets_on_a_find() {
    let c = cfg();
    let base = c.sampling.round_interval_ms * FLOOR_SLOWDOWN;
    let mut r = Region::new(256, 1, 0);
    r.coefficient = c.sampling.floor;
    r.rounds = 10;
    let mut pauses = Vec::new();
    for now in [0u64, 100_000, 200_000, 300_000, 400_000, 500_000, 600_000] {
        r.end_round(&c, now);
        let Phase::Waiting { at } = r.phase else {
            panic!("{:?}", r.phase)
        };
        pauses.push(at - now);
    }
    let max = base << FLOOR_BACKOFF_MAX_SHIFT;
    assert_eq!(
        pauses,
        vec![base * 2, base * 4, base * 8, max, max, max, max],
        "quiet rounds double the pause up to the cap"
    );
    // A round that seeded a candidate: back to the base pace.
    r.found = true;
    r.end_round(&c, 700_000);
    assert_eq!(r.phase, Phase::Waiting { at: 700_000 + base });
    assert_eq!(r.quiet_rounds, 0);
    // Above the floor the schedule is the thesis's, whatever was found.
    r.coefficient = 50;
    r.end_round(&c, 800_000);
    assert_eq!(
        r.phase,
        Phase::Waiting {
            at: 800_000 + c.sampling.round_interval_ms
        }
    );
}

#[test]
fn a_settled_pair_of_processes_is_sampled_ever_less_often() {
    // Half duplicates (marked), half unique pages (what the floor rounds sample).
    let mut s = half_marked_pair(cfg(), 256);
    let fingerprinted = |s: &Sim| s.eng.status(1).unwrap().counters.fingerprinted_pages;
    // Converged (marked, at the floor: ten rounds of ~100 ms), then two windows of 10 s.
    s.run(1_000);
    let a = fingerprinted(&s);
    s.run(10_000);
    let early = fingerprinted(&s) - a;
    s.run(90_000);
    let b = fingerprinted(&s);
    s.run(10_000);
    let late = fingerprinted(&s) - b;
    assert!(early > 0, "the floor rounds still sample");
    assert!(
        late * 2 <= early,
        "10 s of sampling once settled ({late} pages) should be at most half of the 10 s \
         after convergence ({early})"
    );
}

/// Runs the simulation for `ms`, counting the pages client `c` is asked to fingerprint:
/// `(inside any of ranges, in all)`.
fn sampled_in(s: &mut Sim, c: ClientId, ranges: &[(u64, u64)], ms: u64) -> (u64, u64) {
    let (mut inside, mut all) = (0, 0);
    let end = s.now + ms;
    while s.now < end {
        s.eng.tick(s.now);
        for (id, m) in s.eng.take_output() {
            if let Command::Fingerprint { pages, .. } = &m {
                if id == c {
                    all += pages.len() as u64;
                    inside += pages
                        .iter()
                        .filter(|&&a| ranges.iter().any(|&(lo, hi)| lo <= a && a < hi))
                        .count() as u64;
                }
            }
            s.answer(id, m);
        }
        s.now += 10;
    }
    (inside, all)
}

/// A floor round reads no page of a marked run: a region that is all marked costs its floor
/// rounds a residency read and nothing else; in one half marked, half unique, only the
/// unique half is read.
#[test]
fn floor_rounds_skip_marked_pages() {
    let mut s = marked_pair();
    s.run(2_000);
    let queries = s.eng.status(1).unwrap().counters.residency_queries;
    let (_, all) = sampled_in(&mut s, 1, &[], 60_000);
    assert_eq!(all, 0, "nothing read in an all-marked region");
    assert!(
        s.eng.status(1).unwrap().counters.residency_queries > queries,
        "floor rounds ran"
    );

    let mut s = half_marked_pair(cfg(), 256);
    s.run(2_000);
    let m = s.eng.marked(1);
    assert_eq!(m, vec![(0x1000_0000, 256 * PS)]);
    let (inside, all) = sampled_in(&mut s, 1, &[(m[0].0, m[0].0 + m[0].1)], 60_000);
    assert_eq!(inside, 0, "nothing read in the marked run");
    assert!(all > 0, "the unique half is still sampled");
}

#[test]
fn a_run_that_keeps_merging_is_checked_ever_less_often() {
    let mut s = marked_pair();
    let merged = [(0x1000_0000, 0x1000_0000 + 256 * PS, 1024)];
    let n = s.eng.config().sampling.unmerge_after_full_scans;
    s.eng.set_full_scans(2);
    // (scans at which the check falls due, the wait before it)
    let mut at = 2;
    let mut wait = n;
    for _ in 0..6 {
        s.eng.set_full_scans(at + wait);
        assert!(!s.eng.due_checks().contains(&1), "not due at {}", at + wait);
        s.eng.set_full_scans(at + wait + 1);
        assert!(s.eng.due_checks().contains(&1), "due at {}", at + wait + 1);
        s.eng.feedback(1, &merged, &[]);
        assert!(s.eng.take_output().is_empty(), "a merging run stays marked");
        at += wait + 1;
        wait = (wait * 2).min(n * CHECK_BACKOFF_MAX);
    }
    assert_eq!(wait, n * CHECK_BACKOFF_MAX, "the wait reaches its cap");
}

/// A run that merges as a whole but not in a stretch of MIN_TRIM_PAGES or more at its second
/// check has that stretch cut out (unmarked, not marked again); shorter stretches stay.
#[test]
fn stretches_of_a_merging_run_that_did_not_merge_are_cut_out() {
    let mut s = marked_pair();
    let a = 0x1000_0000u64;
    let at = |p: u64| a + p * PS;
    assert_eq!(s.eng.marked(1), vec![(a, 256 * PS)]);
    s.eng.set_full_scans(2);
    s.eng.set_full_scans(6);
    assert!(s.eng.due_checks().contains(&1));
    let lone = [
        (at(100), at(100 + MIN_TRIM_PAGES + 12)),
        (at(200), at(200 + MIN_TRIM_PAGES - 1)),
        (at(240), at(256)),
    ];
    // The first check only confirms the run: its content may still be settling.
    s.eng.feedback(1, &[(a, at(256), 200 * 4)], &lone);
    assert!(s.eng.take_output().is_empty());
    assert_eq!(s.eng.marked(1), vec![(a, 256 * PS)]);
    s.eng
        .set_full_scans(6 + 2 * s.eng.config().sampling.unmerge_after_full_scans + 1);
    assert!(s.eng.due_checks().contains(&1));
    s.eng.feedback(1, &[(a, at(256), 200 * 4)], &lone);
    let mut out: Vec<(u64, u64)> = s
        .eng
        .take_output()
        .into_iter()
        .map(|(c, m)| match m {
            Command::Madvise {
                start,
                len,
                advice: Advice::Unmergeable,
                ..
            } if c == 1 => (start, len),
            other => panic!("unexpected command {other:?}"),
        })
        .collect();
    out.sort();
    let cut = MIN_TRIM_PAGES + 12;
    assert_eq!(out, vec![(at(100), cut * PS), (at(240), 16 * PS)]);
    let pieces = vec![(a, 100 * PS), (at(100 + cut), (140 - cut) * PS)];
    let mut m = s.eng.marked(1);
    m.sort();
    assert_eq!(m, pieces, "the short stretch stays in the run");
    assert_eq!(s.eng.status(1).unwrap().counters.pages_trimmed, cut + 16);
    // The pages cut out are duplicates still, but not marked again, nor read again.
    let cut_out = [(at(100), at(100 + cut)), (at(240), at(256))];
    let (inside, _) = sampled_in(&mut s, 1, &cut_out, 30_000);
    assert_eq!(inside, 0, "a range barred from marking is not sampled");
    let mut m = s.eng.marked(1);
    m.sort();
    assert_eq!(m, pieces);
}

/// At `max_marked_ranges`, a stretch inside a run is not cut (that would split it in two);
/// one at its end still is.
#[test]
fn no_cut_splits_a_run_past_the_range_limit() {
    let mut c = cfg();
    c.limits.max_marked_ranges = 1;
    let mut s = Sim::new(c);
    s.client(1, vec![(0x1000_0000, vec![Some(7); 256])]);
    s.run(1_000);
    let a = 0x1000_0000u64;
    let at = |p: u64| a + p * PS;
    assert_eq!(s.eng.marked(1), vec![(a, 256 * PS)]);
    let lone = [(at(100), at(120)), (at(236), at(256))];
    s.eng.set_full_scans(2);
    s.eng.set_full_scans(6);
    s.eng.feedback(1, &[(a, at(256), 200 * 4)], &lone);
    assert!(s.eng.take_output().is_empty());
    s.eng
        .set_full_scans(6 + 2 * s.eng.config().sampling.unmerge_after_full_scans + 1);
    s.eng.feedback(1, &[(a, at(256), 200 * 4)], &lone);
    let out = s.eng.take_output();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(s.eng.marked(1), vec![(a, 236 * PS)]);
}

/// `tick_clients` schedules the clients it is given and no other (the agent's follow-up ticks
/// within a turn); `tick` schedules everyone.
#[test]
fn tick_clients_schedules_only_the_clients_named() {
    let mut s = Sim::new(cfg());
    s.client(1, vec![(0x1000_0000, unique(64, 1))]);
    s.client(2, vec![(0x2000_0000, unique(64, 2))]);
    s.eng.tick_clients(0, &[1, 7]);
    let out: Vec<ClientId> = s.eng.take_output().iter().map(|(c, _)| *c).collect();
    assert_eq!(out, vec![1]);
    s.eng.tick(0);
    let out: Vec<ClientId> = s.eng.take_output().iter().map(|(c, _)| *c).collect();
    assert_eq!(out, vec![2], "client 1 still waits for its reply");
}

/// A region at the floor whose pages get twins elsewhere later: client 1 keeps a marked half
/// and 2 048 unique pages; then client 3 appears holding copies of four scattered stretches of
/// four of them. Once client 3 marked its copies, `meanwhile` runs; then comes client 1's next
/// floor round and the growth and marks it seeds. Returns the sim and the stretches' first
/// pages (in client 1's region at 0x1000_0000).
fn twins_after_the_floor(meanwhile: impl FnOnce(&mut Sim)) -> (Sim, Vec<u64>) {
    let mut s = half_marked_pair(cfg(), 2048);
    let (base, uniq) = (0x1000_0000u64, 256u64);
    let pages = unique(2048, 1);
    s.run(3_000);
    assert_eq!(s.eng.marked(1), vec![(base, uniq * PS)]);
    let stretches: Vec<u64> = (0..4).map(|k| uniq + 100 + k * 500).collect();
    let twins: Vec<Option<u64>> = stretches
        .iter()
        .flat_map(|&i| (i..i + 4).map(|j| pages[(j - uniq) as usize]))
        .collect();
    s.client(3, vec![(0x9000_0000, twins)]);
    let deadline = s.now + 2_000;
    while s.eng.marked(3).is_empty() {
        assert!(s.now < deadline, "client 3's copies are marked");
        s.step();
    }
    meanwhile(&mut s);
    next_round_of_client_1(&mut s, 60_000);
    (s, stretches)
}

/// Runs until client 1's next round (its next residency query) comes, within `within_ms`,
/// and 300 ms more for the growth and marks it seeds.
fn next_round_of_client_1(s: &mut Sim, within_ms: u64) {
    let q = s.eng.status(1).unwrap().counters.residency_queries;
    let deadline = s.now + within_ms;
    while s.eng.status(1).unwrap().counters.residency_queries == q {
        assert!(s.now < deadline, "a round of client 1 comes");
        s.step();
    }
    s.run(300);
}

/// Every stretch of [`twins_after_the_floor`] is marked in client 1 by the round.
fn assert_stretches_marked(s: &Sim, stretches: &[u64]) {
    let marked = s.eng.marked(1);
    for &i in stretches {
        let a = 0x1000_0000 + i * PS;
        assert!(
            marked.iter().any(|&(s, l)| s <= a && a + 4 * PS <= s + l),
            "stretch at page {i} marked by that round: {marked:x?}"
        );
    }
}

/// Client 1's very next floor round reads the 16 pages whose twins appeared again (their
/// remembered hashes have duplicates now) and marks all four stretches. A random floor sample
/// (≤ 10 % of the pages, one per gap) would find all four in one round with a chance below 3 %.
#[test]
fn a_floor_round_reads_again_the_pages_whose_twin_appeared_since() {
    let (s, stretches) = twins_after_the_floor(|_| {});
    assert_stretches_marked(&s, &stretches);
    let st = s.eng.status(1).unwrap().counters;
    assert!(st.partner_pages >= 16, "{st:?}");
}

/// The search for partner pages looks up in the index only the pages whose hash was stored
/// for another page since they were read: none in quiet floor rounds, then the 16 whose twins
/// appeared (not the 2 048 remembered pages of the region).
#[test]
fn floor_rounds_look_up_only_pages_whose_hash_got_a_twin() {
    let mut quiet = None;
    let (s, stretches) = twins_after_the_floor(|s| {
        let c = s.eng.status(1).unwrap().counters;
        assert!(c.floor_pages > 0, "client 1 had floor rounds: {c:?}");
        quiet = Some(c.partner_lookups);
    });
    assert_eq!(quiet, Some(0), "quiet floor rounds look nothing up");
    assert_stretches_marked(&s, &stretches);
    let st = s.eng.status(1).unwrap().counters;
    assert!(
        (16..=32).contains(&st.partner_lookups),
        "the twins' pages, not the region: {st:?}"
    );
}

/// When the record of recent duplicates overflows, or its sequence runs out, between a twin's
/// appearance and the floor round, pages read before are looked up again: the twins are
/// still found.
#[test]
fn partner_pages_survive_the_loss_of_recent_duplicates() {
    let (s, stretches) = twins_after_the_floor(|s| {
        for h in 0..=RECENT_DUPS_MAX as u64 {
            s.eng.note_dup(0xdead_0000_0000 + h);
        }
    });
    assert_stretches_marked(&s, &stretches);
    let (s, stretches) = twins_after_the_floor(|s| {
        s.eng.dup_seq = u32::MAX;
        s.eng.note_dup(0xdead_0000_0000);
        assert_eq!(s.eng.dup_seq, 2);
    });
    assert_stretches_marked(&s, &stretches);
}

/// A process at `max_marked_ranges` reads no partner page: each would be grown again and
/// refused at every floor round (and keep its region at the fast floor pace).
#[test]
fn a_process_at_its_range_limit_reads_no_partner_pages() {
    let mut c = cfg();
    c.limits.max_marked_ranges = 1;
    let mut s = half_marked_pair(c, 2048);
    let base = 0x1000_0000u64;
    s.run(3_000);
    assert_eq!(s.eng.marked(1), vec![(base, 256 * PS)]);
    let twins: Vec<Option<u64>> = unique(2048, 1)[100..116].to_vec();
    s.client(3, vec![(0x9000_0000, twins)]);
    s.run(60_000);
    let st = s.eng.status(1).unwrap().counters;
    assert_eq!(st.partner_pages, 0, "{st:?}");
    assert_eq!(s.eng.marked(1), vec![(base, 256 * PS)]);
    assert!(!s.eng.marked(3).is_empty(), "the twins' side is marked");
}

/// While its floor rounds find nothing, a region's random share shrinks: each quiet round
/// halves it, up to [`FLOOR_SAMPLE_MAX_SHIFT`] times (10 % → 1.25 % of the unmarked pages).
#[test]
fn quiet_floor_rounds_sample_ever_fewer_random_pages() {
    let mut s = half_marked_pair(cfg(), 4096);
    s.run(3_000);
    // Pages per floor round of client 1 (one fingerprint command each at these sizes).
    let mut rounds = Vec::new();
    let end = s.now + 120_000;
    while s.now < end {
        s.eng.tick(s.now);
        for (id, m) in s.eng.take_output() {
            if let (1, Command::Fingerprint { pages, .. }) = (id, &m) {
                rounds.push(pages.len() as u64);
            }
            s.answer(id, m);
        }
        s.now += 10;
    }
    // (A sample that falls in the marked run is skipped: counts move by a page or two.)
    assert!(rounds.len() >= 4, "{rounds:?}");
    assert!(
        rounds.windows(2).all(|w| w[1] <= w[0] + 4),
        "never more: {rounds:?}"
    );
    let last = *rounds.last().unwrap();
    assert!(rounds[0] >= 3 * last, "it shrank: {rounds:?}");
    assert!(
        last * 8 <= 4352 * 10 / 100 + 8,
        "1.25 % at most: {rounds:?}"
    );
    assert!(last > 0, "but never nothing: {rounds:?}");
}

/// After the record of recent duplicates overflowed, the next floor round looks up the
/// region's remembered pages once; those with no twin are not looked up again by the rounds
/// after it.
#[test]
fn pages_looked_up_with_no_twin_are_not_looked_up_again() {
    let mut s = half_marked_pair(cfg(), 2048);
    s.run(3_000);
    let floor_round = |s: &mut Sim| {
        next_round_of_client_1(s, 200_000);
        s.eng.status(1).unwrap().counters.partner_lookups
    };
    let before = floor_round(&mut s);
    for h in 0..=RECENT_DUPS_MAX as u64 {
        s.eng.note_dup(0xdead_0000_0000 + h);
    }
    let once = floor_round(&mut s);
    assert!(
        once - before >= 1024,
        "looked up after the overflow: {before} → {once}"
    );
    let again = floor_round(&mut s);
    assert_eq!(again, once, "and not again");
}

/// The growth of a short run reads little past its ends: the four 4-page stretches of
/// [`twins_after_the_floor`] cost client 1 a first batch of [`GROW_FIRST_BATCH`] (8) pages in
/// each direction each: 64 pages (at 64 a batch, it was 512).
#[test]
fn a_short_run_grows_from_small_batches() {
    let mut before = 0;
    let (s, stretches) = twins_after_the_floor(|s| {
        before = s.eng.status(1).unwrap().counters.grown_pages;
    });
    assert_stretches_marked(&s, &stretches);
    let grown = s.eng.status(1).unwrap().counters.grown_pages - before;
    assert!(
        GROW_FIRST_BATCH <= 8 && grown <= 4 * (2 * 8 + 4),
        "{grown} pages read by the growth of four 4-page runs"
    );
}
