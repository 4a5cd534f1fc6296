//! What a desktop cell measured: per process, per program and for the whole cell, as the
//! report and the JSON results show it.

use super::procs::Mem;
use crate::cost::{self, Steady};
use serde::Serialize;
use serde_json::Value;

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcResult {
    pub pid: u32,
    pub comm: String,
    pub program: String,
    pub mem_t0: Mem,
    pub merging_pages: u64,
    pub rmap_items: u64,
    pub zero_pages: u64,
    pub profit: i64,
    pub merge_any: bool,
    pub shim: bool,
    pub exe: String,
    /// The agent's policy names it (comm or executable): under ksmplus it must be tracked.
    pub named: bool,
    /// Present when ksmd started (t0); processes that appear later join the figures.
    pub at_t0: bool,
    /// Already exited at t0 (not reaped yet): no maps to check.
    pub zombie_t0: bool,
    /// In the agent's `status` (ksmplus cells; judged for the processes alive then).
    pub tracked: Option<bool>,
    /// How the agent found it (`hello`, `fork`, `scan`) and what it can do in it (`marks`,
    /// `refused`, `merge-any`, ...), from `status`.
    pub found: String,
    pub marking: String,
    /// Alive after merging, when the last key was answered.
    pub alive_end: bool,
    /// How it ended, when the bench saw it exited before its parent reaped it.
    pub exit: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgResult {
    pub label: String,
    pub group: String,
    pub pid: u32,
    /// Seconds from exec to the first visible window.
    pub startup_secs: Option<f64>,
    /// Seconds from exec to ready (e.g. the last image open).
    pub ready_secs: Option<f64>,
    /// The reading keys changed the window's content.
    pub reading_changed: bool,
    /// After merging: a key was processed (content changed) and the program still ran.
    pub responsive_after: bool,
    pub alive_end: bool,
    pub screenshot: Option<String>,
    pub window_title: String,
    pub processes: usize,
    pub mem_t0: Mem,
    pub merging_pages: u64,
    pub rmap_items: u64,
    pub profit: i64,
    /// In the agent's `status --json` (ksmplus only): the program and every process of it
    /// that the policy names and that was alive when the status was read.
    pub tracked: Option<bool>,
    /// `PID comm` of its processes present at t0 and gone by the end.
    pub gone: Vec<String>,
    /// `PID comm` of its processes present at t0 without the shim mapped (shim cells).
    pub no_shim: Vec<String>,
    /// `PID comm` of its processes the policy names that the agent did not track (ksmplus).
    pub untracked: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub t: f64,
    pub merging: u64,
    pub rmap_items: u64,
    pub pages_sharing: i64,
}

/// One sample of a long run (`--long-run`): the state at `t` and the CPU spent in the interval
/// that ends there.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LongSample {
    /// Seconds since ksmd started (t0).
    pub t: f64,
    /// The interval's length: seconds since the previous sample (the first: since t0).
    pub secs: f64,
    /// The cell's `own_sharing` at `t` (pagemap + kpageflags over the programs' processes);
    /// `saved_mib` is it × 4 KiB.
    pub own_sharing: u64,
    pub saved_mib: f64,
    /// Σ `ksm_merging_pages`, Σ `ksm_rmap_items` of the programs' processes at `t`.
    pub merging: u64,
    pub rmap_items: u64,
    /// CPU seconds in the interval: ksmd (schedstat), the agent (schedstat of its threads),
    /// every process of the programs alive at both ends of the interval (utime + stime).
    pub ksmd_secs: f64,
    pub agent_secs: Option<f64>,
    pub programs_secs: f64,
    /// The agent's loop wake-ups in the interval, the sampler's own status call's excepted.
    pub agent_wakeups: Option<u64>,
    /// The programs' live processes at `t`.
    pub processes: usize,
}

impl LongSample {
    /// Percent of one core over the interval.
    pub fn pct(&self, cpu_secs: f64) -> f64 {
        cost::pct(cpu_secs, self.secs)
    }
}

/// One round of the scenario's keys during a long run: one key per program window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TurnRound {
    pub t: f64,
    /// Windows whose pixels changed on the key, of `windows`.
    pub answered: usize,
    pub windows: usize,
}

/// The long run of a cell: from ksmd's start, `secs` long, a key round every `turn_every`
/// seconds, a sample every `sample_every` seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LongRun {
    pub secs: f64,
    pub turn_every: f64,
    pub sample_every: f64,
    pub samples: Vec<LongSample>,
    pub turns: Vec<TurnRound>,
    /// Wall seconds the bench spent reading pagemap/kpageflags for `own_sharing` (its own CPU,
    /// in no column).
    pub probe_secs: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DeskCell {
    pub scenario: String,
    pub approach: String,
    /// `ok`, `deadline`, `unavailable: why`, `error: why`.
    pub status: String,
    pub programs: Vec<ProgResult>,
    pub processes: Vec<ProcResult>,
    /// Sums over the programs' processes before ksmd ran.
    pub mem_t0: Mem,
    /// The thesis's measure (pages_sharing: mappings of a KSM page beyond the one kept),
    /// restricted to the programs' processes: KSM pages they map minus distinct KSM pages
    /// (`/proc/PID/pagemap` + `/proc/kpageflags`). `saved` is this × 4 KiB.
    pub own_sharing: u64,
    /// Distinct KSM pages the programs map (their `pages_shared`).
    pub own_shared: u64,
    /// Change of the system-wide `pages_sharing` from t0 to the end (includes any other
    /// mergeable process on the machine; equals `own_sharing` on a quiet machine).
    pub pages_sharing: i64,
    pub pages_shared: i64,
    pub saved_mib: f64,
    /// `saved` as % of the programs' Pss at t0 (and of their anonymous memory).
    pub saved_pct_pss: f64,
    pub saved_pct_anon: f64,
    pub merging_pages: u64,
    pub rmap_items: u64,
    pub zero_pages: u64,
    pub process_profit: i64,
    pub general_profit_delta: i64,
    pub converged: bool,
    pub converge_secs: f64,
    pub observed_secs: f64,
    pub full_scans: i64,
    pub ksmd_cpu_secs: f64,
    pub ksmd_cpu_total_secs: f64,
    pub agent_cpu_secs: Option<f64>,
    pub agent_rss_kib: Option<u64>,
    pub agent_hwm_kib: Option<u64>,
    pub agent_status: Option<Value>,
    /// The steady window after convergence, when the run has one.
    pub steady: Option<Steady>,
    /// The long run (`--long-run`), from ksmd's start.
    pub long_run: Option<LongRun>,
    pub scan: Option<Value>,
    pub notes: Vec<String>,
    pub series: Vec<Sample>,
}

impl ProgResult {
    /// Counts one of the program's processes in its figures.
    pub fn add(&mut self, pr: &ProcResult) {
        self.processes += 1;
        self.mem_t0 += pr.mem_t0;
        self.merging_pages += pr.merging_pages;
        self.rmap_items += pr.rmap_items;
        self.profit += pr.profit;
    }
}

impl DeskCell {
    /// Counts one of the programs' processes in the cell's sums.
    pub fn add(&mut self, pr: &ProcResult) {
        self.mem_t0 += pr.mem_t0;
        self.merging_pages += pr.merging_pages;
        self.rmap_items += pr.rmap_items;
        self.zero_pages += pr.zero_pages;
        self.process_profit += pr.profit;
    }

    /// Seconds from ksmd's start until the merging pages first reached 90 % of their final
    /// count (the last sample's).
    pub fn t90(&self) -> Option<f64> {
        let points: Vec<(f64, u64)> = self.series.iter().map(|x| (x.t, x.merging)).collect();
        cost::t90(&points)
    }

    pub fn ran(&self) -> bool {
        self.status == "ok" || self.status == "deadline"
    }
}
