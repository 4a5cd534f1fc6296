//! One cell of the table: one workload under one approach, from a clean ksmd to a clean ksmd.
//!
//! Sequence: ksmd stopped (`run=0`) with the run's tunables -> approach launched (agent first) ->
//! workload processes started and `ready` -> memory verified through `/proc/PID/mem` (this gives
//! the ideal) -> counters snapshot, `run=1` at t0 -> sampled until the merging pages stop
//! changing -> the steady window (processes left idle, `--steady-secs`) -> processes and agent
//! ended -> wait until ksmd holds no more pages than before the run.

use crate::approach::{Approach, Tools};
use crate::cost::{self, Steady};
use crate::sys;
use crate::workload::{self, Proc, Workload};
use ksmplus_common::ksm;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/";

fn root() -> &'static Path {
    Path::new(ROOT)
}

/// How long to wait for what, and the workload size.
#[derive(Clone, Debug, Serialize)]
pub struct Params {
    /// Size divisor (1 = full size, 8 = smoke).
    pub div: u64,
    /// Converged once the merging pages did not change for this long (and ksmd did two full
    /// scans since the last change, when it has anything to scan).
    pub stable_secs: f64,
    /// Never declare convergence before this long after t0 (gives the agent time to act).
    pub min_secs: f64,
    /// Give up waiting for convergence after this long; the cell is reported as not converged.
    pub deadline_secs: f64,
    pub sample_ms: u64,
    /// The steady window after convergence, seconds (0: none).
    pub steady_secs: f64,
    /// smart_scan for every approach (`--ksmd-defaults`: the kernel's default).
    pub smart_scan_all: bool,
}

/// Everything a cell needs that stays the same for the whole run.
pub struct Ctx {
    pub bin: PathBuf,
    pub tmp: PathBuf,
    pub tools: Tools,
    pub params: Params,
    pub ksmd_pid: Option<u32>,
    /// ksmd's global state before the first cell (after [`settle`]).
    pub baseline: Global,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since t0 (ksmd started).
    pub t: f64,
    pub merging: u64,
    pub rmap_items: u64,
    pub profit: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CellResult {
    pub workload: String,
    pub mode: String,
    pub approach: String,
    /// `ok`, `deadline` (did not converge in time), `unavailable: why` or `error: why`.
    pub status: String,
    pub processes: usize,
    /// Pages of the workload's buffers that have an equal page among them (hashed via /proc/PID/mem).
    pub ideal_pages: u64,
    /// Sum of `ksm_merging_pages` over the cell's processes at the end.
    pub merging_pages: u64,
    pub zero_pages: u64,
    pub rmap_items: u64,
    /// Sum of `ksm_process_profit`, bytes.
    pub process_profit: i64,
    /// Change of the global `general_profit` from t0 to the end, bytes.
    pub general_profit_delta: i64,
    pub converged: bool,
    /// Seconds from t0 to the last change of the merging pages.
    pub converge_secs: f64,
    /// Seconds from t0 to the first sample with at least 99 % of the ideal merging (0 when the
    /// ideal is 0; `None` if never reached). Robust when merging flaps and never settles.
    pub t99_secs: Option<f64>,
    /// Seconds from t0 to the first sample with at least 90 % of the final merging (the last
    /// sample's); `None` when nothing merged.
    pub t90_secs: Option<f64>,
    /// Seconds from t0 to the end of observation.
    pub observed_secs: f64,
    /// ksmd CPU seconds from t0 to convergence.
    pub ksmd_cpu_secs: f64,
    /// ksmd CPU seconds over the whole observation.
    pub ksmd_cpu_total_secs: f64,
    /// The steady window after convergence (processes alive and idle): ksmd's, the agent's
    /// and the programs' CPU and the agent's context switches; `None` when the cell did not
    /// converge or the run has no window (`--steady-secs 0`, the smoke's default).
    pub steady: Option<Steady>,
    /// The steady window's programs' CPU beyond the same workload's `none` cell's, and ksmd +
    /// agent + that extra, % of one core (`None` without both windows).
    pub steady_extra_pct: Option<f64>,
    pub steady_whole_pct: Option<f64>,
    /// Other processes KSM had rmap items or merged pages for during the cell (checked about
    /// once a second): `pid comm rmap_items merging`. When not empty, the global columns
    /// (general_profit delta, ksmd CPU, cow_ksm) include their share.
    pub foreign: Vec<String>,
    /// Full ksmd scans from t0 to the end.
    pub full_scans: i64,
    /// Agent CPU seconds, from its start to convergence detected (ksmplus only).
    pub agent_cpu_secs: Option<f64>,
    /// Agent peak RSS (VmHWM), KiB (ksmplus only).
    pub agent_hwm_kib: Option<u64>,
    /// CPU of the workload processes from all of them `ready` (before the memory check and
    /// t0) to convergence detected, all threads; over `app_window_secs` seconds.
    pub app_cpu_secs: f64,
    pub app_window_secs: f64,
    /// `app_cpu_secs` beyond the same workload's `none` cell's (its rate, over this cell's
    /// window); `None` when the none cell did not run.
    pub extra_app_secs: Option<f64>,
    /// The whole cost to converge: ksmd_cpu_secs + agent_cpu_secs + extra_app_secs (`None`
    /// without the none cell).
    pub whole_secs: Option<f64>,
    /// Change of the `/proc/vmstat` KSM counters (`cow_ksm`, `ksm_swpin_copy`, ...) from t0.
    pub vmstat_delta: BTreeMap<String, i64>,
    /// `pages_unshared` and `pages_volatile` at the end (gauges).
    pub pages_unshared: i64,
    pub pages_volatile: i64,
    pub series: Vec<Sample>,
}

impl CellResult {
    pub fn ran(&self) -> bool {
        self.status == "ok" || self.status == "deadline"
    }
}

/// Fills in what each cell's cost is beyond the same workload's `none` cell (whole cost to
/// converge, steady extra and whole), once all cells ran.
pub fn cost_vs_none(cells: &mut [CellResult]) {
    let nones: Vec<CellResult> = cells
        .iter()
        .filter(|c| c.approach == "none" && c.ran())
        .cloned()
        .collect();
    for c in cells.iter_mut().filter(|c| c.ran()) {
        let Some(none) = nones.iter().find(|n| n.workload == c.workload) else {
            continue;
        };
        let extra = cost::extra_scaled(
            c.app_cpu_secs,
            c.app_window_secs,
            none.app_cpu_secs,
            none.app_window_secs,
        );
        c.extra_app_secs = Some(extra);
        c.whole_secs = Some(cost::whole(c.ksmd_cpu_secs, c.agent_cpu_secs, extra));
        if let Some(st) = &c.steady {
            let row = st.row(none.steady.as_ref());
            c.steady_extra_pct = row.extra;
            c.steady_whole_pct = row.whole;
        }
    }
}

/// Runs one cell. `Err` only for what must end the whole run (a signal, ksmd left dirty, a
/// tunable that cannot be written); a cell that fails on its own is returned with an `error:`
/// status.
pub fn run(ctx: &Ctx, wl: Workload, ap: Approach) -> Result<CellResult, String> {
    let mut r = CellResult {
        workload: wl.id().into(),
        mode: wl.mode().into(),
        approach: ap.name().into(),
        processes: wl.processes(),
        ..Default::default()
    };
    wait_clean(ctx, Duration::from_secs(20))?;
    sys::ksm_set("run", "0")?;
    let smart = ctx.params.smart_scan_all || ap.smart_scan();
    sys::ksm_set("smart_scan", if smart { "1" } else { "0" })?;

    let cell_name = format!("{}-{}", wl.id(), ap.name());
    let mut launch = match ap.launch(&ctx.tools, &ctx.tmp, &cell_name) {
        Ok(l) => l,
        Err(u) => {
            r.status = format!("unavailable: {}", u.0);
            return Ok(r);
        }
    };
    let outcome = observe(ctx, wl, ap, &mut launch, &mut r);
    // Teardown in this order: workload processes, then the agent, then wait for ksmd.
    let procs_gone = match outcome {
        Ok(mut procs) => {
            for p in procs.iter_mut() {
                p.stop();
            }
            let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
            drop(procs);
            pids
        }
        Err(e) => {
            if sys::stop_requested() {
                return Err(e);
            }
            r.status = format!("error: {e}");
            Vec::new()
        }
    };
    if let Some(a) = launch.agent.as_mut() {
        a.stop();
    }
    drop(launch);
    if let Some(p) = procs_gone.iter().find(|&&p| sys::pid_alive(p)) {
        return Err(format!(
            "workload process {p} is still alive after the cell"
        ));
    }
    sys::ksm_set("run", "1")?;
    wait_clean(ctx, Duration::from_secs(30))?;
    Ok(r)
}

/// ksmd's global counters, enough to tell whether anything is left of a cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Global {
    pub pages_shared: i64,
    pub pages_sharing: i64,
    pub zero_pages: i64,
    pub general_profit: i64,
}

impl Global {
    pub fn read() -> Global {
        Global {
            pages_shared: sys::ksm_get("pages_shared"),
            pages_sharing: sys::ksm_get("pages_sharing"),
            zero_pages: sys::ksm_get("ksm_zero_pages").max(0),
            general_profit: sys::ksm_get("general_profit"),
        }
    }

    /// What ksmd's rmap items cost, bytes: `general_profit` is
    /// `(pages_sharing + ksm_zero_pages) * PAGE - rmap_items * sizeof(rmap_item)`.
    pub fn rmap_bytes(&self) -> i64 {
        (self.pages_sharing + self.zero_pages) * workload::PAGE as i64 - self.general_profit
    }

    /// Nothing more merged and no more rmap items than in `b`.
    pub fn within(&self, b: &Global) -> bool {
        self.pages_shared <= b.pages_shared
            && self.pages_sharing <= b.pages_sharing
            && self.zero_pages <= b.zero_pages
            && self.rmap_bytes() <= b.rmap_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.within(&Global::default())
    }
}

/// Before the baseline is taken: lets ksmd (`run=1`) drop what exited processes left behind, e.g.
/// when the previous holder of the lock stopped ksmd while pages were still merged (ksmd cleans
/// up only while it runs). Returns once nothing is left, or once ksmd did two full scans (what
/// is left then belongs to live processes), or after 15 s.
pub fn settle() -> Result<Global, String> {
    sys::ksm_set("run", "1")?;
    let scans0 = sys::ksm_get("full_scans");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let g = Global::read();
        if g.is_empty() || sys::ksm_get("full_scans") - scans0 >= 2 || Instant::now() >= deadline {
            return Ok(g);
        }
        sys::sleep_checked(Duration::from_millis(50))?;
    }
}

/// Waits until ksmd holds no more pages than before the run (ksmd must be running to drop the
/// rmap items of exited processes, so this runs with `run=1` unless nothing is left).
fn wait_clean(ctx: &Ctx, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut started = false;
    loop {
        let now = Global::read();
        let b = ctx.baseline;
        if now.within(&b) {
            return Ok(());
        }
        if !started {
            sys::ksm_set("run", "1")?;
            started = true;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "ksmd still holds pages after the previous cell: {now:?} (rmap bytes {}), baseline {b:?} (rmap bytes {}); refusing to contaminate the next cell",
                now.rmap_bytes(),
                b.rmap_bytes()
            ));
        }
        sys::sleep_checked(Duration::from_millis(50))?;
    }
}

fn observe(
    ctx: &Ctx,
    wl: Workload,
    ap: Approach,
    launch: &mut crate::approach::Launch,
    r: &mut CellResult,
) -> Result<Vec<Proc>, String> {
    let p = &ctx.params;
    let procs = workload::start(&ctx.bin, wl, p.div, launch, Duration::from_secs(60))?;
    // The programs' CPU counts from here: what the shim does while the memory is checked (the
    // agent may mark before ksmd starts) is part of its cost. The workload is single-threaded
    // (the shim has no thread), so schedstat of the live threads is all of it, in ns rather
    // than the clock ticks of utime + stime (50 processes in W6).
    let app_ns = |procs: &[Proc]| -> u64 {
        procs
            .iter()
            .filter_map(|p| sys::live_threads_cpu_ns(p.pid))
            .sum()
    };
    let (app0, ready) = (app_ns(&procs), Instant::now());
    // Check the launcher did what it claims before trusting any figure.
    for pr in &procs {
        ap.check_launched(launch, pr.pid, &format!("pid {}", pr.pid))?;
    }
    r.ideal_pages = workload::verify(&procs)?;
    let (lo, hi) = wl.designed_ideal(p.div);
    if r.ideal_pages < lo || r.ideal_pages > hi {
        return Err(format!(
            "the workload's memory holds {} duplicated pages, its design says {lo}..={hi}",
            r.ideal_pages
        ));
    }

    // schedstat gives nanoseconds; /proc/PID/stat (10 ms ticks) only when schedstat is missing.
    let ksmd_ns = || {
        ctx.ksmd_pid
            .and_then(|p| sys::task_runtime_ns(p).or_else(|| sys::process_cpu_ns(p)))
            .unwrap_or(0)
    };
    let vm0 = sys::vmstat_ksm();
    let gp0 = sys::ksm_get("general_profit");
    let scans0 = sys::ksm_get("full_scans");
    let k0 = ksmd_ns();
    let t0 = Instant::now();
    sys::ksm_set("run", "1")?;

    let mut last = u64::MAX;
    let (mut t_change, mut k_change, mut scans_change) = (0.0, k0, scans0);
    let mut converged = false;
    let mut sample;
    let mut ours: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    ours.extend(launch.agent.as_ref().map(|a| a.pid()));
    ours.push(std::process::id());
    let note_foreign = |r: &mut CellResult| {
        for (pid, comm, rmap, merging) in sys::foreign_ksm_users(&ours) {
            let tag = format!("{pid} {comm}");
            if !r.foreign.iter().any(|f| f.starts_with(&format!("{tag} "))) {
                r.foreign
                    .push(format!("{tag} rmap_items={rmap} merging={merging}"));
            }
        }
    };
    note_foreign(r);
    let mut n = 0u64;
    loop {
        n += 1;
        if n % 10 == 0 {
            note_foreign(r);
        }
        sys::sleep_checked(Duration::from_millis(p.sample_ms))?;
        let t = t0.elapsed().as_secs_f64();
        let (mut merging, mut rmap, mut profit, mut zero) = (0u64, 0u64, 0i64, 0u64);
        for pr in &procs {
            let st = ksm::read_ksm_stat(root(), pr.pid)
                .map_err(|e| format!("workload process {} vanished: {e}", pr.pid))?;
            merging += st.merging_pages;
            rmap += st.rmap_items;
            profit += st.process_profit;
            zero += st.zero_pages;
        }
        let scans = sys::ksm_get("full_scans");
        if merging != last {
            last = merging;
            if merging != 0 || t_change > 0.0 {
                t_change = t;
                k_change = ksmd_ns();
            }
            scans_change = scans;
        }
        sample = Sample {
            t,
            merging,
            rmap_items: rmap,
            profit,
        };
        r.series.push(sample.clone());
        r.zero_pages = zero;
        let scanned_enough = scans - scans_change >= 2 || rmap == 0;
        if t >= p.min_secs && t - t_change >= p.stable_secs && scanned_enough {
            converged = true;
            break;
        }
        if t >= p.deadline_secs {
            break;
        }
    }
    note_foreign(r);
    let k_end = ksmd_ns();
    let t_end = t0.elapsed().as_secs_f64();
    r.status = if converged { "ok" } else { "deadline" }.into();
    r.converged = converged;
    r.merging_pages = sample.merging;
    r.rmap_items = sample.rmap_items;
    r.process_profit = sample.profit;
    r.general_profit_delta = sys::ksm_get("general_profit") - gp0;
    r.full_scans = sys::ksm_get("full_scans") - scans0;
    r.converge_secs = t_change;
    let points: Vec<(f64, u64)> = r.series.iter().map(|s| (s.t, s.merging)).collect();
    r.t99_secs = if r.ideal_pages == 0 {
        Some(0.0)
    } else {
        cost::time_to_pct(points.iter().copied(), r.ideal_pages, 99)
    };
    r.t90_secs = cost::t90(&points);
    r.observed_secs = t_end;
    r.ksmd_cpu_secs = (k_change - k0) as f64 / 1e9;
    r.ksmd_cpu_total_secs = (k_end - k0) as f64 / 1e9;
    r.app_cpu_secs = app_ns(&procs).saturating_sub(app0) as f64 / 1e9;
    r.app_window_secs = ready.elapsed().as_secs_f64();
    let agent_pid = launch.agent.as_ref().map(|a| a.pid());
    r.agent_cpu_secs = agent_pid.map(|a| sys::threads_cpu_ns(a) as f64 / 1e9);
    let vm1 = sys::vmstat_ksm();
    r.vmstat_delta = vm1
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                *v as i64 - vm0.get(k).copied().unwrap_or(0) as i64,
            )
        })
        .collect();
    r.pages_unshared = sys::ksm_get("pages_unshared");
    r.pages_volatile = sys::ksm_get("pages_volatile");
    if converged && p.steady_secs > 0.0 {
        let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        let probes = cost::Probes {
            ksmd_ns: &ksmd_ns,
            agent: agent_pid,
            programs: &pids,
            program_ns: sys::live_threads_cpu_ns,
            control: &[],
            agent_counters: None,
        };
        r.steady = Some(cost::window(0.0, p.steady_secs, probes)?);
    }
    if let Some(a) = launch.agent.as_mut() {
        r.agent_hwm_kib = sys::status_kib(a.pid(), "VmHWM");
        if let Ok(Some(st)) = a.child.try_wait() {
            return Err(format!(
                "the agent exited during the cell ({st}):\n{}",
                a.log_tail()
            ));
        }
    }
    Ok(procs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(wl: &str, ap: &str, app: f64, window: f64) -> CellResult {
        CellResult {
            workload: wl.into(),
            approach: ap.into(),
            status: "ok".into(),
            app_cpu_secs: app,
            app_window_secs: window,
            ..Default::default()
        }
    }

    #[test]
    fn whole_cost_is_beyond_the_none_cell_of_the_same_workload() {
        let none = ran("W5", "none", 1.0, 4.0);
        let mut k = ran("W5", "ksmplus", 2.5, 8.0);
        (k.ksmd_cpu_secs, k.agent_cpu_secs) = (0.1, Some(0.2));
        k.steady = Some(Steady {
            spent: crate::cost::Interval {
                secs: 10.0,
                ksmd_secs: 0.5,
                agent_secs: Some(0.1),
                programs_secs: 0.3,
                ..Default::default()
            },
            ..Default::default()
        });
        let mut m = ran("W5", "merge_any", 2.0, 8.0);
        m.ksmd_cpu_secs = 0.4;
        let mut cells = vec![none.clone(), k, m, ran("W1", "ksmplus", 0.5, 6.0)];
        cells[0].steady = Some(Steady {
            spent: crate::cost::Interval {
                secs: 10.0,
                programs_secs: 0.1,
                ..Default::default()
            },
            ..Default::default()
        });
        cost_vs_none(&mut cells);
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        // The none cell's 1 s over 4 s is the workload's own rate: 2 s of the 8 s window.
        assert!(
            close(cells[1].extra_app_secs, 0.5),
            "{:?}",
            cells[1].extra_app_secs
        );
        assert!(close(cells[1].whole_secs, 0.8));
        assert!(close(cells[1].steady_extra_pct, 2.0));
        assert!(close(cells[1].steady_whole_pct, 8.0));
        // No agent: ksmd + extra; no steady window: no steady figures.
        assert!(close(cells[2].whole_secs, 0.4));
        assert_eq!(cells[2].steady_whole_pct, None);
        assert!(close(cells[0].whole_secs, 0.0));
        // W1 has no none cell: n/a.
        assert_eq!((cells[3].extra_app_secs, cells[3].whole_secs), (None, None));
    }

    #[test]
    fn leftover_rmap_items_are_not_within_the_baseline() {
        let base = Global::default();
        // An exited process's 100 rmap items not yet dropped: no pages shared, profit negative.
        let stale = Global {
            general_profit: -6400,
            ..Default::default()
        };
        assert!(!stale.within(&base));
        // A live outsider with merged pages at the baseline, which later exits: not our leftover.
        let outsider = Global {
            pages_shared: 40,
            pages_sharing: 10200,
            zero_pages: 0,
            general_profit: 10200 * 4096 - 10240 * 64,
        };
        assert_eq!(outsider.rmap_bytes(), 10240 * 64);
        assert!(Global::default().within(&outsider));
        assert!(outsider.within(&outsider));
    }
}
