//! Observing one running cell: the launcher checked, the programs' memory at t0, ksmd
//! switched on and sampled until the merging settles, the agent's view, the programs'
//! answers after merging.

use super::ctx::{agent_status, json_out, root, set, user_of, Ctx};
use super::longrun::Sampler;
use super::procs::{self, exe, zombie};
use super::results::{DeskCell, ProcResult, ProgResult, Sample};
use super::running::{cell_procs, read_like_a_user, spawn, wait_ready, Running};
use super::scenario::{Program, Scenario, TRACK};
use super::user::UserSide;
use crate::approach::{Approach, Launch};
use crate::cost::{self, Steady};
use crate::sys;
use ksmplus_common::ksm;
use ksmplus_common::names::name_matches;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

/// The agent's policy names this process (as `TRACK` does for the scenarios' programs).
fn named(comm: &str, exe: &str) -> bool {
    TRACK.iter().any(|n| name_matches(n, comm, exe))
}

fn proc_result(pid: u32, program: &str) -> ProcResult {
    let (comm, exe) = (procs::comm(pid), exe(pid));
    ProcResult {
        pid,
        named: named(&comm, &exe),
        comm,
        exe,
        program: program.to_owned(),
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
pub fn observe(
    ctx: &Ctx,
    sc: &Scenario,
    ap: Approach,
    launch: &mut Launch,
    running: &mut Vec<Running>,
    (home, rundir): (&Path, &Path),
    mut control: Option<(&Path, &Path)>,
    before: &BTreeSet<u32>,
    r: &mut DeskCell,
) -> Result<(), String> {
    let d = ctx.desktop;
    let user = user_of(ctx, sc)?;
    let logs = ctx.results.join("logs");
    let log_of = |p: &Program, suffix: &str| {
        logs.join(format!(
            "{}-{}-{}{suffix}.log",
            sc.id,
            ap.name(),
            p.label.replace('#', "")
        ))
    };
    // The control group's first processes, one per program (`Ctx::wants_control`); empty
    // when the cell has none or one of them failed to start.
    let mut control_roots: Vec<u32> = Vec::new();
    // Start the programs one after another, as a user would; each one's control right after
    // it, so both share the cell's history.
    for p in &sc.programs {
        let log = log_of(p, "");
        let mut run = spawn(d, p, launch, home, rundir, &log, user)?;
        let res = wait_ready(d, p, &mut run, Duration::from_secs(120));
        let pid = run.child.id();
        running.push(run);
        let (startup, ready) = res.map_err(|e| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = tail.lines().collect();
            format!(
                "{e}; last lines of {}:\n{}",
                log.display(),
                lines[lines.len().saturating_sub(6)..].join("\n")
            )
        })?;
        r.programs.push(ProgResult {
            label: p.label.clone(),
            group: p.group.into(),
            pid,
            startup_secs: Some(startup),
            ready_secs: Some(ready),
            ..Default::default()
        });
        if let Some((chome, crun)) = control {
            let log = log_of(p, "-control");
            // A control that cannot start costs the cell its paired reference, not its run.
            let res = spawn(d, p, &Launch::plain(), chome, crun, &log, None).and_then(|mut run| {
                let res = wait_ready(d, p, &mut run, Duration::from_secs(120));
                control_roots.push(run.child.id());
                running.push(run);
                res
            });
            if let Err(e) = res {
                r.notes.push(format!(
                    "control group dropped ({e}): the none cell is the reference"
                ));
                control = None;
                control_roots.clear();
            }
        }
    }
    // Reading: pages turned, pages scrolled, tabs switched; the control the same way.
    sys::sleep_checked(Duration::from_millis(500))?;
    for (i, p) in sc.programs.iter().enumerate() {
        let pid = r.programs[i].pid;
        r.programs[i].reading_changed = read_like_a_user(d, p, pid, p.presses, 0);
        if let Some(&c) = control_roots.get(i) {
            read_like_a_user(d, p, c, p.presses, 0);
        }
    }
    sys::sleep_checked(Duration::from_secs(1))?;

    let roots: Vec<u32> = r.programs.iter().map(|p| p.pid).collect();
    let exclude: Vec<u32> = launch.agent.iter().map(|a| a.pid()).collect();
    let procs_now = || cell_procs(user, &roots, before, &exclude);
    let tree = procs_now();
    // The launcher must have done what it claims.
    for p in &r.programs {
        ap.check_launched(launch, p.pid, &format!("{} (pid {})", p.label, p.pid))?;
    }
    let mut procs_r: BTreeMap<u32, ProcResult> = BTreeMap::new();
    for (&pid, &i) in &tree {
        procs_r.insert(
            pid,
            ProcResult {
                mem_t0: procs::mem(pid),
                exit: procs::exit_status(pid),
                zombie_t0: zombie(pid),
                shim: launch
                    .must_map
                    .as_ref()
                    .is_some_and(|so| sys::maps_contain(pid, so)),
                at_t0: true,
                ..proc_result(pid, &r.programs[i].label)
            },
        );
    }
    if ctx.scan {
        r.scan = scan(ctx, &tree.keys().copied().collect::<Vec<_>>(), &mut r.notes);
    }

    // ksmd on: t0.
    let ksmd_ns = || ctx.ksmd_pid.and_then(sys::task_runtime_ns).unwrap_or(0);
    let (shared0, sharing0, gp0, scans0) = (
        sys::ksm_get("pages_shared"),
        sys::ksm_get("pages_sharing"),
        sys::ksm_get("general_profit"),
        sys::ksm_get("full_scans"),
    );
    let k0 = ksmd_ns();
    let mut long = ctx.long_run.map(|cfg| {
        let windows = r.programs.iter().map(|p| p.pid).collect();
        let all = tree.keys().copied().collect();
        Sampler::start(ctx, sc, user, launch, cfg, (windows, all))
    });
    let t0 = long.as_ref().map_or_else(Instant::now, Sampler::t0);
    set("run", "1")?;
    let mut last_level = 0u64;
    let (mut t_change, mut k_change) = (0.0, k0);
    let mut converged = false;
    loop {
        sys::sleep_checked(Duration::from_millis(500))?;
        let t = t0.elapsed().as_secs_f64();
        let (mut merging, mut rmap) = (0u64, 0u64);
        // New descendants (a plug-in, a web process) join their program.
        for (&pid, &i) in &procs_now() {
            procs_r
                .entry(pid)
                .or_insert_with(|| proc_result(pid, &r.programs[i].label));
        }
        for (&pid, pr) in procs_r.iter_mut() {
            if pr.exit.is_none() {
                pr.exit = procs::exit_status(pid);
            }
            if let Ok(st) = ksm::read_ksm_stat(root(), pid) {
                pr.merging_pages = st.merging_pages;
                pr.rmap_items = st.rmap_items;
                pr.zero_pages = st.zero_pages;
                pr.profit = st.process_profit;
                pr.merge_any = st.merge_any;
                merging += st.merging_pages;
                rmap += st.rmap_items;
            }
        }
        let sharing = sys::ksm_get("pages_sharing") - sharing0;
        r.series.push(Sample {
            t,
            merging,
            rmap_items: rmap,
            pages_sharing: sharing,
        });
        let tol = (last_level / 50).max(32);
        if merging.abs_diff(last_level) > tol {
            last_level = merging;
            t_change = t;
            k_change = ksmd_ns();
        }
        let scans = sys::ksm_get("full_scans") - scans0;
        // Two full scans since t0, unless ksmd has nothing of ours to scan (approach none).
        if t >= ctx.min_secs && t - t_change >= ctx.stable_secs && (scans >= 2 || rmap == 0) {
            converged = true;
            break;
        }
        if t >= ctx.deadline_secs {
            break;
        }
        if let Some(l) = long.as_mut() {
            l.tick(&|| r_pids(&procs_r))?;
        }
    }
    let k_end = ksmd_ns();
    r.observed_secs = t0.elapsed().as_secs_f64();
    r.converged = converged;
    r.status = if converged { "ok" } else { "deadline" }.into();
    r.converge_secs = t_change;
    r.ksmd_cpu_secs = k_change.saturating_sub(k0) as f64 / 1e9;
    r.ksmd_cpu_total_secs = k_end.saturating_sub(k0) as f64 / 1e9;
    r.full_scans = sys::ksm_get("full_scans") - scans0;
    r.pages_sharing = sys::ksm_get("pages_sharing") - sharing0;
    r.pages_shared = sys::ksm_get("pages_shared") - shared0;
    r.general_profit_delta = sys::ksm_get("general_profit") - gp0;
    if ctx.steady_secs > 0.0 && converged {
        let pids: Vec<u32> = procs_r.keys().copied().collect();
        // The control's processes now (its programs' helpers included), like the programs'.
        let control: Vec<u32> = procs::trees(&control_roots).into_keys().collect();
        r.steady = Some(steady_window(
            ctx,
            user,
            launch,
            (&pids, &control),
            &ksmd_ns,
            &mut r.notes,
        )?);
    }
    if let Some(a) = launch.agent.as_mut() {
        r.agent_cpu_secs = sys::process_cpu_ns(a.pid()).map(|n| n as f64 / 1e9);
        r.agent_rss_kib = sys::status_kib(a.pid(), "VmRSS");
        r.agent_hwm_kib = sys::status_kib(a.pid(), "VmHWM");
        if let Ok(Some(st)) = a.child.try_wait() {
            return Err(format!(
                "the agent exited during the cell ({st}):\n{}",
                a.log_tail()
            ));
        }
        r.agent_status = agent_status(ctx, user, &a.dir.join("agent.sock"), &mut r.notes);
        // `ksmplus_common::status::StatusReply` (read as JSON values: the bench builds
        // ksmplus-common without its `policy` feature).
        let listed = r
            .agent_status
            .as_ref()
            .and_then(|v| v["processes"].as_array().cloned());
        match listed {
            Some(list) => {
                for pr in procs_r.values_mut() {
                    let entry = list
                        .iter()
                        .find(|p| p["pid"].as_u64() == Some(pr.pid as u64));
                    if let Some(e) = entry {
                        let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                        pr.found = text("found");
                        pr.marking = text("marking");
                    }
                    // Judged for the processes alive when the status was read.
                    if sys::pid_alive(pr.pid) && !zombie(pr.pid) {
                        pr.tracked = Some(entry.is_some());
                    }
                }
            }
            None => r.notes.push("ksmplusctl status: no reply".into()),
        }
    }
    // Totals per program and per cell.
    for pr in procs_r.values() {
        let Some(p) = r.programs.iter_mut().find(|p| p.label == pr.program) else {
            continue;
        };
        if pr.at_t0 && !pr.zombie_t0 && !pr.shim && launch.must_map.is_some() {
            p.no_shim.push(format!("{} {}", pr.pid, pr.comm));
        }
        if launch.agent.is_some() && (pr.pid == p.pid || pr.named) {
            // The program's own process always; the others the policy names, when they were
            // alive as the status was read.
            let ok = pr.tracked.unwrap_or(pr.pid != p.pid);
            if !ok {
                p.untracked.push(format!("{} {}", pr.pid, pr.comm));
            }
            p.tracked = Some(p.tracked.unwrap_or(true) && ok);
        }
        p.add(pr);
        r.add(pr);
    }
    let pids: Vec<u32> = r_pids(&procs_r);
    match procs::ksm_pages(&pids) {
        Some((mapped, distinct)) => {
            r.own_sharing = mapped.saturating_sub(distinct);
            r.own_shared = distinct;
        }
        None => {
            r.notes
                .push("no /proc/kpageflags: saved is the system-wide pages_sharing".into());
            r.own_sharing = r.pages_sharing.max(0) as u64;
        }
    }
    r.saved_mib = (r.own_sharing * PAGE) as f64 / 1048576.0;
    let own = r.own_sharing;
    let pct = |kib: u64| {
        if kib == 0 {
            0.0
        } else {
            own as f64 * 4.0 * 100.0 / kib as f64
        }
    };
    r.saved_pct_pss = pct(r.mem_t0.pss_kib);
    r.saved_pct_anon = pct(r.mem_t0.anon_kib);
    if let Some(l) = long {
        let (run, notes) = l.finish(&|| procs_now().into_keys().collect())?;
        r.long_run = Some(run);
        r.notes.extend(notes);
    }

    // After merging: every program must still answer a key, and its window is kept.
    let shots = ctx.results.join("screenshots");
    std::fs::create_dir_all(&shots).map_err(|e| e.to_string())?;
    for (i, p) in sc.programs.iter().enumerate() {
        let pid = r.programs[i].pid;
        r.programs[i].responsive_after = read_like_a_user(d, p, pid, 1, p.presses);
        if let Some(w) = d.main_window(pid) {
            r.programs[i].window_title = d.window_name(w);
            if let Some(img) = d.capture(w) {
                let path = shots.join(format!(
                    "{}-{}-{}.png",
                    sc.id,
                    ap.name(),
                    p.label.replace('#', "")
                ));
                match d.save_png(&img, &path) {
                    Ok(()) => r.programs[i].screenshot = Some(path.display().to_string()),
                    Err(e) => r.notes.push(e),
                }
            }
        }
        r.programs[i].alive_end = sys::pid_alive(pid) && !zombie(pid);
    }
    // Every process that was there when ksmd started (a zombie then counts: it ended during
    // the start) must still be there.
    for pr in procs_r.values_mut() {
        if pr.exit.is_none() {
            pr.exit = procs::exit_status(pr.pid);
        }
        pr.alive_end = sys::pid_alive(pr.pid) && !zombie(pr.pid);
        if pr.at_t0 && !pr.alive_end {
            if let Some(p) = r.programs.iter_mut().find(|p| p.label == pr.program) {
                p.gone.push(format!(
                    "{} {}{}",
                    pr.pid,
                    pr.comm,
                    pr.exit
                        .as_ref()
                        .map_or(String::new(), |e| format!(" ({e})"))
                ));
            }
        }
    }
    r.processes = procs_r.into_values().collect();
    Ok(())
}

fn r_pids(procs_r: &BTreeMap<u32, ProcResult>) -> Vec<u32> {
    procs_r.keys().copied().collect()
}

/// The steady window: `ctx.steady_secs` with the programs open and idle, `ctx.steady_after`
/// after convergence, measuring ksmd's, the agent's, the programs' and their control group's
/// CPU and the agent's wake-ups (its own counter, through `ksmplusctl status`, and its context switches).
fn steady_window(
    ctx: &Ctx,
    user: Option<&UserSide>,
    launch: &Launch,
    (pids, control): (&[u32], &[u32]),
    ksmd_ns: &dyn Fn() -> u64,
    notes: &mut Vec<String>,
) -> Result<Steady, String> {
    let agent = launch.agent.as_ref().map(|a| a.pid());
    let sock = launch.agent.as_ref().map(|a| a.dir.join("agent.sock"));
    let mut counters =
        || cost::AgentCounters::from_status(&agent_status(ctx, user, sock.as_ref()?, notes)?);
    cost::window(
        ctx.steady_after,
        ctx.steady_secs,
        cost::Probes {
            ksmd_ns,
            agent,
            programs: pids,
            // Their threads come and go: utime + stime counts the exited ones too.
            program_ns: sys::process_cpu_ns,
            control,
            agent_counters: Some(&mut counters),
        },
    )
}

/// `ksmplusctl --json scan --pid ...` over the programs' processes, unmerged (before ksmd
/// runs), like the thesis's parser.ko figures; `None` with a note when the subcommand is absent.
fn scan(ctx: &Ctx, pids: &[u32], notes: &mut Vec<String>) -> Option<Value> {
    let Some(ctl) = ctx.ctl.as_ref() else {
        notes.push("scan: ksmplusctl not found".into());
        return None;
    };
    let has = Command::new(ctl)
        .args(["scan", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has {
        notes.push(format!(
            "scan: {} has no `scan` subcommand yet",
            ctl.display()
        ));
        return None;
    }
    let mut cmd = Command::new(ctl);
    cmd.args(["--json", "scan", "--top", "10"]);
    for p in pids {
        cmd.arg("--pid").arg(p.to_string());
    }
    json_out(&mut cmd, "scan: unparsable output", notes)
}
