//! One desktop cell: one scenario under one approach, from a clean ksmd to a clean ksmd.
//!
//! Sequence: ksmd stopped (`run=0`) -> approach launched (agent first, from the bench's
//! `approach.rs`) -> programs started one by one, each timed until its first window appears
//! and then until it is ready -> pages turned as a reader would -> memory of the programs
//! measured (`smaps_rollup`, before any merging) -> `run=1` at t0 -> sampled until the merging
//! pages settle -> one more key per window after merging, with a screenshot (the program must
//! still answer) -> programs and agent ended -> ksmd back to the baseline.

use super::procs::{self, Mem};
use super::scenario::{Program, Ready, Scenario};
use super::x11::{self, Desktop};
use crate::approach::{Approach, Launch, Tools};
use crate::sys;
use ksmplus_common::ksm;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

fn root() -> &'static Path {
    Path::new("/")
}

fn set(name: &str, value: &str) -> Result<(), String> {
    ksm::write_sysfs(root(), name, value).map_err(|e| format!("ksm {name}={value}: {e}"))
}

/// What stays the same for every cell of a run.
pub struct Ctx<'a> {
    pub desktop: &'a Desktop,
    pub tools: Tools,
    pub ctl: Option<PathBuf>,
    pub results: PathBuf,
    pub tmp: PathBuf,
    pub home_template: PathBuf,
    pub ksmd_pid: Option<u32>,
    /// `(pages_shared, pages_sharing, general_profit)` before the first cell. ksmd drops the
    /// rmap items of an exited process later than its pages, so `general_profit` shows them.
    pub baseline: (i64, i64, i64),
    pub min_secs: f64,
    pub stable_secs: f64,
    pub deadline_secs: f64,
    /// Run `ksmplusctl scan` in this cell (once per scenario), when the subcommand exists.
    pub scan: bool,
}

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
    /// In the agent's `status --json` (ksmplus only).
    pub tracked: Option<bool>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub t: f64,
    pub merging: u64,
    pub rmap_items: u64,
    pub pages_sharing: i64,
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
    pub scan: Option<Value>,
    pub notes: Vec<String>,
    pub series: Vec<Sample>,
}

impl DeskCell {
    pub fn ran(&self) -> bool {
        self.status == "ok" || self.status == "deadline"
    }
}

/// The environment of every program: a private home and runtime dir, no accessibility bus,
/// WebKit without its bubblewrap sandbox (the sandbox would hide the shim's file and socket
/// from the web processes; it is off under every approach alike), and a dead proxy so nothing
/// reaches the network.
fn base_env(home: &Path, run: &Path) -> Vec<(String, String)> {
    [
        ("HOME", home.display().to_string()),
        ("XDG_RUNTIME_DIR", run.display().to_string()),
        ("NO_AT_BRIDGE", "1".into()),
        ("GTK_A11Y", "none".into()),
        ("GSETTINGS_BACKEND", "memory".into()),
        ("WEBKIT_DISABLE_SANDBOX_THIS_IS_DANGEROUS", "1".into()),
        ("http_proxy", "http://127.0.0.1:9".into()),
        ("https_proxy", "http://127.0.0.1:9".into()),
        ("QT_QPA_PLATFORM", "xcb".into()),
        ("LANG", "C.UTF-8".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A started program.
pub struct Running {
    pub child: Child,
    pub spawned: Instant,
}

/// Starts a program under the approach's launcher (environment, `prctl` before exec).
pub fn spawn(
    desktop: &Desktop,
    p: &Program,
    launch: &Launch,
    home: &Path,
    run: &Path,
    log: &Path,
) -> Result<Running, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&p.argv[0]);
    cmd.args(&p.argv[1..])
        .env_remove("LD_PRELOAD")
        .env_remove("KSMPLUS_SOCKET")
        .envs(desktop.env())
        .envs(base_env(home, run))
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    // After base_env: the approach's variables win.
    launch.apply(&mut cmd);
    let spawned = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", p.argv[0]))?;
    Ok(Running { child, spawned })
}

/// Waits for the first window (returns the start-up time), then for readiness.
pub fn wait_ready(
    desktop: &Desktop,
    p: &Program,
    r: &mut Running,
    deadline: Duration,
) -> Result<(f64, f64), String> {
    let pid = r.child.id();
    let end = r.spawned + deadline;
    let mut startup = None;
    loop {
        if let Ok(Some(st)) = r.child.try_wait() {
            return Err(format!("{} exited during start-up ({st})", p.label));
        }
        let wins = desktop.windows_of(pid);
        if !wins.is_empty() {
            let t = *startup.get_or_insert_with(|| r.spawned.elapsed().as_secs_f64());
            let ready = match &p.ready {
                Ready::Window => true,
                Ready::Title(s) => wins.iter().any(|&w| desktop.window_name(w).contains(s)),
            };
            if ready {
                return Ok((t, r.spawned.elapsed().as_secs_f64()));
            }
        }
        if Instant::now() >= end {
            return Err(format!(
                "{}: {} after {:.0} s",
                p.label,
                if startup.is_some() {
                    "window appeared but never got ready"
                } else {
                    "no window"
                },
                deadline.as_secs_f64()
            ));
        }
        sys::sleep_checked(Duration::from_millis(50))?;
    }
}

/// Presses `n` keys of the program's cycle to its main window; true when the content changed.
fn read_like_a_user(desktop: &Desktop, p: &Program, pid: u32, n: usize, from: usize) -> bool {
    let Some(w) = desktop.main_window(pid) else {
        return false;
    };
    desktop.focus(w);
    std::thread::sleep(Duration::from_millis(150));
    let before = desktop.capture(w).map(|b| x11::digest(&b));
    for i in 0..n {
        desktop.key(p.keys[(from + i) % p.keys.len()]);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Rendering may lag behind the key: look a few times.
    for _ in 0..10 {
        let after = desktop.capture(w).map(|b| x11::digest(&b));
        if after.is_some() && after != before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

fn stop_all(roots: &[u32]) {
    let pids = procs::all_pids(roots);
    for &p in &pids {
        sys::kill(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && pids.iter().any(|&p| sys::pid_alive(p) && !zombie(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &p in procs::all_pids(roots).iter().chain(pids.iter()) {
        sys::kill(p, libc::SIGKILL);
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Waits (ksmd running) until ksmd holds no more pages than before the run.
pub fn wait_clean(ctx: &Ctx, timeout: Duration) -> Result<bool, String> {
    let deadline = Instant::now() + timeout;
    set("run", "1")?;
    loop {
        if sys::ksm_get("pages_shared") <= ctx.baseline.0
            && sys::ksm_get("pages_sharing") <= ctx.baseline.1
            && sys::ksm_get("general_profit") >= ctx.baseline.2
        {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        sys::sleep_checked(Duration::from_millis(100))?;
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(to);
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| e.to_string())?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cp -a {} {} failed", from.display(), to.display()))
    }
}

/// Runs one cell; `Err` only for what must end the whole run (a signal, a tunable).
pub fn run(ctx: &Ctx, sc: &Scenario, ap: Approach) -> Result<DeskCell, String> {
    let mut r = DeskCell {
        scenario: sc.id.into(),
        approach: ap.name().into(),
        ..Default::default()
    };
    if !wait_clean(ctx, Duration::from_secs(30))? {
        r.notes.push(format!(
            "ksmd did not return to the baseline before the cell (pages_shared {} sharing {} general_profit {})",
            sys::ksm_get("pages_shared"),
            sys::ksm_get("pages_sharing"),
            sys::ksm_get("general_profit")
        ));
    }
    set("run", "0")?;
    set("smart_scan", if ap.smart_scan() { "1" } else { "0" }).ok();
    let name = format!("{}-{}", sc.id, ap.name());
    let mut launch = match ap.launch(&ctx.tools, &ctx.tmp, &name) {
        Ok(l) => l,
        Err(u) => {
            r.status = format!("unavailable: {}", u.0);
            return Ok(r);
        }
    };
    if matches!(ap, Approach::Ksmplus | Approach::MadviseAll) {
        // The whole anonymous address space (heap, arenas, toolkit allocators), for both
        // shim-based approaches alike; the agent does not send COVER_MAPS itself yet.
        launch.env.push(("KSMPLUS_COVER_MAPS".into(), "1".into()));
    }
    let home = ctx.tmp.join(format!("home-{name}"));
    let rundir = ctx.tmp.join(format!("run-{name}"));
    copy_dir(&ctx.home_template, &home)?;
    std::fs::create_dir_all(&rundir).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&rundir, std::fs::Permissions::from_mode(0o700));
    let logs = ctx.results.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;

    let mut running: Vec<Running> = Vec::new();
    let outcome = observe(
        ctx,
        sc,
        ap,
        &mut launch,
        &mut running,
        &home,
        &rundir,
        &mut r,
    );
    let roots: Vec<u32> = running.iter().map(|x| x.child.id()).collect();
    stop_all(&roots);
    for x in running.iter_mut() {
        let _ = x.child.wait();
    }
    if let Some(a) = launch.agent.as_mut() {
        let _ = std::fs::copy(
            a.dir.join("agent.log"),
            logs.join(format!("{name}-agent.log")),
        );
        a.stop();
    }
    drop(launch);
    if let Err(e) = outcome {
        if sys::stop_requested() {
            return Err(e);
        }
        r.status = format!("error: {e}");
    }
    let _ = std::fs::remove_dir_all(&home);
    let _ = std::fs::remove_dir_all(&rundir);
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
fn observe(
    ctx: &Ctx,
    sc: &Scenario,
    ap: Approach,
    launch: &mut Launch,
    running: &mut Vec<Running>,
    home: &Path,
    rundir: &Path,
    r: &mut DeskCell,
) -> Result<(), String> {
    let d = ctx.desktop;
    let logs = ctx.results.join("logs");
    // Start the programs one after another, as a user would.
    for p in &sc.programs {
        let log = logs.join(format!(
            "{}-{}-{}.log",
            sc.id,
            ap.name(),
            p.label.replace('#', "")
        ));
        let mut run = spawn(d, p, launch, home, rundir, &log)?;
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
    }
    // Reading: pages turned, pages scrolled, tabs switched.
    sys::sleep_checked(Duration::from_millis(500))?;
    for (i, p) in sc.programs.iter().enumerate() {
        let pid = r.programs[i].pid;
        r.programs[i].reading_changed = read_like_a_user(d, p, pid, p.presses, 0);
    }
    sys::sleep_checked(Duration::from_secs(1))?;

    let roots: Vec<u32> = r.programs.iter().map(|p| p.pid).collect();
    let tree = procs::trees(&roots);
    // The launcher must have done what it claims.
    for p in &r.programs {
        if let Some(so) = &launch.must_map {
            if !sys::maps_contain(p.pid, so) {
                return Err(format!("{} (pid {}) does not map {so}", p.label, p.pid));
            }
        }
        let st = ksm::read_ksm_stat(root(), p.pid).map_err(|e| e.to_string())?;
        let want = matches!(ap, Approach::MergeAny | Approach::SmartScan);
        if st.merge_any != want {
            return Err(format!(
                "{} (pid {}): ksm_merge_any is {} but {} needs {want}",
                p.label,
                p.pid,
                st.merge_any,
                ap.name()
            ));
        }
    }
    let mut procs_r: BTreeMap<u32, ProcResult> = BTreeMap::new();
    for (&pid, &i) in &tree {
        let m = procs::mem(pid);
        procs_r.insert(
            pid,
            ProcResult {
                pid,
                comm: procs::comm(pid),
                program: r.programs[i].label.clone(),
                mem_t0: m,
                shim: launch
                    .must_map
                    .as_ref()
                    .is_some_and(|so| sys::maps_contain(pid, so)),
                ..Default::default()
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
    let t0 = Instant::now();
    set("run", "1")?;
    let mut last_level = 0u64;
    let (mut t_change, mut k_change) = (0.0, k0);
    let mut converged = false;
    loop {
        sys::sleep_checked(Duration::from_millis(500))?;
        let t = t0.elapsed().as_secs_f64();
        let (mut merging, mut rmap) = (0u64, 0u64);
        // New descendants (a plug-in, a web process) join their program.
        for (&pid, &i) in &procs::trees(&roots) {
            procs_r.entry(pid).or_insert_with(|| ProcResult {
                pid,
                comm: procs::comm(pid),
                program: r.programs[i].label.clone(),
                ..Default::default()
            });
        }
        for (&pid, pr) in procs_r.iter_mut() {
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
        r.agent_status = agent_status(ctx, &a.dir.join("agent.sock"), &mut r.notes);
    }
    // Totals per program and per cell.
    for pr in procs_r.values() {
        let Some(p) = r.programs.iter_mut().find(|p| p.label == pr.program) else {
            continue;
        };
        p.processes += 1;
        p.mem_t0 += pr.mem_t0;
        p.merging_pages += pr.merging_pages;
        p.rmap_items += pr.rmap_items;
        p.profit += pr.profit;
        r.mem_t0 += pr.mem_t0;
        r.merging_pages += pr.merging_pages;
        r.rmap_items += pr.rmap_items;
        r.zero_pages += pr.zero_pages;
        r.process_profit += pr.profit;
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
    if let Some(st) = &r.agent_status {
        let empty = vec![];
        let tracked: Vec<u64> = st["processes"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .collect();
        for p in r.programs.iter_mut() {
            p.tracked = Some(tracked.contains(&(p.pid as u64)));
        }
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
    r.processes = procs_r.into_values().collect();
    Ok(())
}

fn r_pids(procs_r: &BTreeMap<u32, ProcResult>) -> Vec<u32> {
    procs_r.keys().copied().collect()
}

/// `ksmplusctl --json status` of the cell's agent.
fn agent_status(ctx: &Ctx, socket: &Path, notes: &mut Vec<String>) -> Option<Value> {
    let ctl = ctx.ctl.as_ref()?;
    let out = Command::new(ctl)
        .arg("--socket")
        .arg(socket)
        .args(["--json", "status"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(format!("ksmplusctl status: unparsable reply: {e}"));
            None
        }
    }
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
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(format!("scan: unparsable output: {e}"));
            None
        }
    }
}

/// Starts each distinct program once (no KSM, not measured) so first-run work — GIMP's
/// plug-in database, KDE's service cache, fontconfig — is done before the first cell.
pub fn warm_up(ctx: &Ctx, scenarios: &[Scenario]) -> Result<(), String> {
    let tools_none = Launch {
        env: Vec::new(),
        prctl_merge_any: false,
        agent: None,
        must_map: None,
    };
    let rundir = ctx.tmp.join("run-warmup");
    std::fs::create_dir_all(&rundir).map_err(|e| e.to_string())?;
    let logs = ctx.results.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    for sc in scenarios {
        for p in &sc.programs {
            if seen.contains(&p.group) {
                continue;
            }
            seen.push(p.group);
            let log = logs.join(format!("warmup-{}.log", p.group));
            let mut run = spawn(
                ctx.desktop,
                p,
                &tools_none,
                &ctx.home_template,
                &rundir,
                &log,
            )?;
            let t = Instant::now();
            let res = wait_ready(ctx.desktop, p, &mut run, Duration::from_secs(180));
            let _ = sys::sleep_checked(Duration::from_secs(2));
            let pid = run.child.id();
            stop_all(&[pid]);
            let _ = run.child.wait();
            eprintln!(
                "ksmplus-bench desktop: warm-up {} {:.1} s{}",
                p.group,
                t.elapsed().as_secs_f64(),
                match res {
                    Ok(_) => String::new(),
                    Err(e) => format!(" ({e})"),
                }
            );
        }
    }
    Ok(())
}
