//! One cell of the table: one workload under one approach, from a clean ksmd to a clean ksmd.
//!
//! Sequence: ksmd stopped (`run=0`) with the run's tunables -> approach launched (agent first) ->
//! workload processes started and `ready` -> memory verified through `/proc/PID/mem` (this gives
//! the ideal) -> counters snapshot, `run=1` at t0 -> sampled until the merging pages stop
//! changing -> processes and agent ended -> wait until ksmd holds no more pages than before the
//! run.

use crate::approach::{Approach, Tools};
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
    /// Seconds from t0 to the end of observation.
    pub observed_secs: f64,
    /// ksmd CPU seconds from t0 to convergence.
    pub ksmd_cpu_secs: f64,
    /// ksmd CPU seconds over the whole observation.
    pub ksmd_cpu_total_secs: f64,
    /// ksmd CPU, percent of one core, from convergence to the end (the cost of staying merged);
    /// `None` when the cell did not converge.
    pub ksmd_steady_pct: Option<f64>,
    /// Other processes KSM had rmap items or merged pages for during the cell (checked about
    /// once a second): `pid comm rmap_items merging`. When not empty, the global columns
    /// (general_profit delta, ksmd CPU, cow_ksm) include their share.
    pub foreign: Vec<String>,
    /// Full ksmd scans from t0 to the end.
    pub full_scans: i64,
    /// Agent CPU seconds, whole life of the agent (ksmplus only).
    pub agent_cpu_secs: Option<f64>,
    /// Agent peak RSS (VmHWM), KiB (ksmplus only).
    pub agent_hwm_kib: Option<u64>,
    /// CPU of the workload processes from t0 to the end, all threads.
    pub app_cpu_secs: f64,
    /// CPU of the shim's client threads (threads named `ksmplus*`) at the end, when visible.
    pub shim_cpu_secs: Option<f64>,
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
    sys::ksm_set("smart_scan", if ap.smart_scan() { "1" } else { "0" })?;

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
    let app_ns = |procs: &[Proc]| -> u64 {
        procs
            .iter()
            .filter_map(|p| sys::process_cpu_ns(p.pid))
            .sum()
    };
    let vm0 = sys::vmstat_ksm();
    let gp0 = sys::ksm_get("general_profit");
    let scans0 = sys::ksm_get("full_scans");
    let app0 = app_ns(&procs);
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
    r.t99_secs = if r.ideal_pages == 0 {
        Some(0.0)
    } else {
        r.series
            .iter()
            .find(|s| s.merging * 100 >= r.ideal_pages * 99)
            .map(|s| s.t)
    };
    r.observed_secs = t_end;
    r.ksmd_cpu_secs = (k_change - k0) as f64 / 1e9;
    r.ksmd_cpu_total_secs = (k_end - k0) as f64 / 1e9;
    r.ksmd_steady_pct = (converged && t_end > t_change)
        .then(|| (k_end - k_change) as f64 / 1e9 / (t_end - t_change) * 100.0);
    r.app_cpu_secs = app_ns(&procs).saturating_sub(app0) as f64 / 1e9;
    let shim: Vec<u64> = procs
        .iter()
        .filter_map(|p| sys::threads_runtime_ns(p.pid, "ksmplus"))
        .collect();
    r.shim_cpu_secs = (!shim.is_empty()).then(|| shim.iter().sum::<u64>() as f64 / 1e9);
    if let Some(a) = launch.agent.as_mut() {
        r.agent_cpu_secs = sys::process_cpu_ns(a.pid()).map(|n| n as f64 / 1e9);
        r.agent_hwm_kib = sys::status_kib(a.pid(), "VmHWM");
        if let Ok(Some(st)) = a.child.try_wait() {
            return Err(format!(
                "the agent exited during the cell ({st}):\n{}",
                a.log_tail()
            ));
        }
    }
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
    Ok(procs)
}

#[cfg(test)]
mod tests {
    use super::*;

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
