//! One desktop cell: one scenario under one approach, from a clean ksmd to a clean ksmd.
//!
//! Sequence: ksmd stopped (`run=0`) -> approach launched (agent first, from the bench's
//! `approach.rs`) -> programs started one by one, each timed until its first window appears
//! and then until it is ready -> pages turned as a reader would -> memory of the programs
//! measured (`smaps_rollup`, before any merging) -> `run=1` at t0 -> sampled until the merging
//! pages settle -> one more key per window after merging, with a screenshot (the program must
//! still answer) -> programs and agent ended -> ksmd back to the baseline.
//!
//! A scenario of the unprivileged user (the browsers, `Scenario::user`) runs its programs as
//! that user, with their sandboxes, in a home and runtime directory the user owns; under
//! ksmplus its agent runs as the user too, with the run's learned store. Its processes are the
//! programs' descendants and every process of the user started during the cell (crash handlers
//! re-parent to init), the user's bus and agent excepted.

use super::procs::{self, Mem};
use super::scenario::{Program, Ready, Scenario, TRACK};
use super::user::UserSide;
use super::x11::{self, Desktop};
use crate::approach::{Approach, Launch, Tools};
use crate::sys;
use ksmplus_common::ksm;
use ksmplus_common::names::name_matches;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
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
    /// The unprivileged user of the browser scenarios, when the run has any.
    pub user: Option<&'a UserSide>,
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
/// and a dead proxy so nothing reaches the network. Sandboxes stay on (WebKit's bubblewrap,
/// Firefox's and Chromium's seccomp and namespaces) under every approach.
fn base_env(home: &Path, run: &Path) -> Vec<(String, String)> {
    [
        ("HOME", home.display().to_string()),
        ("XDG_RUNTIME_DIR", run.display().to_string()),
        ("NO_AT_BRIDGE", "1".into()),
        ("GTK_A11Y", "none".into()),
        ("GSETTINGS_BACKEND", "memory".into()),
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

/// Starts a program under the approach's launcher (environment, `prctl` before exec); as the
/// unprivileged user when `user` is given (with a clean environment and the user's bus).
pub fn spawn(
    desktop: &Desktop,
    p: &Program,
    launch: &Launch,
    home: &Path,
    run: &Path,
    log: &Path,
    user: Option<&UserSide>,
) -> Result<Running, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let home_s = home.display().to_string();
    let mut cmd = Command::new(&p.argv[0]);
    cmd.args(
        p.argv[1..]
            .iter()
            .map(|a| a.replace(super::scenario::HOME, &home_s)),
    );
    match user {
        Some(u) => {
            cmd.env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("USER", &u.user.name)
                .env("LOGNAME", &u.user.name)
                .envs(desktop.env_with(u.bus.as_ref()));
            u.user.apply(&mut cmd);
        }
        None => {
            cmd.env_remove("LD_PRELOAD")
                .env_remove("KSMPLUS_SOCKET")
                .envs(desktop.env());
        }
    }
    cmd.envs(base_env(home, run))
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

/// Ends every process `list` names (asked again after SIGTERM: children may have appeared).
fn stop_all(list: &dyn Fn() -> BTreeSet<u32>) {
    let pids = list();
    for &p in &pids {
        sys::kill(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && pids.iter().any(|&p| sys::pid_alive(p) && !zombie(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &p in list().iter().chain(pids.iter()) {
        sys::kill(p, libc::SIGKILL);
    }
}

/// The processes of a cell, each with the index of its program: the programs and their
/// descendants; for a scenario of the user also the processes of the user that did not exist
/// at the cell's start (`before`), run an executable from a program's own directory (crash
/// handlers re-parent to init: `/usr/lib/firefox-esr/crashhelper`) and are not the agent's
/// (`exclude`). Services the user's bus activates (at-spi) are not the programs'.
fn cell_procs(
    user: Option<&UserSide>,
    roots: &[u32],
    before: &BTreeSet<u32>,
    exclude: &[u32],
) -> BTreeMap<u32, usize> {
    let mut m = procs::trees(roots);
    let Some(u) = user else {
        return m;
    };
    let mut not_ours: BTreeSet<u32> = procs::trees(exclude).into_keys().collect();
    not_ours.extend(u.bus.as_ref().map(|b| b.pid()));
    not_ours.extend(procs::trees(&u.bus.iter().map(|b| b.pid()).collect::<Vec<_>>()).into_keys());
    let dir = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
    };
    let root_dirs: Vec<Option<PathBuf>> = roots.iter().map(|&r| dir(r)).collect();
    for pid in u.user.pids() {
        if before.contains(&pid) || not_ours.contains(&pid) || m.contains_key(&pid) {
            continue;
        }
        let d = dir(pid);
        if let Some(i) = root_dirs.iter().position(|r| r.is_some() && *r == d) {
            m.insert(pid, i);
        }
    }
    m
}

/// Whatever else of the user a cell started (a service the user's bus activated for the
/// browser): every process of the user that is new since `before`, the bus and its
/// activation helpers excepted.
fn leftovers(u: &UserSide, before: &BTreeSet<u32>) -> BTreeSet<u32> {
    let bus: BTreeSet<u32> = u.bus.iter().map(|b| b.pid()).collect();
    u.user
        .pids()
        .into_iter()
        .filter(|p| !before.contains(p) && !bus.contains(p) && !bus.contains(&ppid(*p)))
        .collect()
}

fn ppid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

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
    let user = user_of(ctx, sc)?;
    // The user's processes before anything of this cell starts: what is new is the cell's.
    let before = user.map(|u| u.user.pids()).unwrap_or_default();
    let mut launch = match launcher(ctx, user, ap, &name) {
        Ok(l) => l,
        Err(u) => {
            r.status = format!("unavailable: {}", u.0);
            return Ok(r);
        }
    };
    let (home, rundir) = place(ctx, user, &name)?;
    let logs = ctx.results.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;

    let mut running: Vec<Running> = Vec::new();
    let outcome = observe(
        ctx,
        sc,
        ap,
        &mut launch,
        &mut running,
        (&home, &rundir),
        &before,
        &mut r,
    );
    end(user, &mut running, &mut launch, &before, &logs, &name);
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

/// The user side when the scenario runs as the unprivileged user.
fn user_of<'a>(ctx: &Ctx<'a>, sc: &Scenario) -> Result<Option<&'a UserSide>, String> {
    match (sc.user, ctx.user) {
        (false, _) => Ok(None),
        (true, Some(u)) => Ok(Some(u)),
        (true, None) => Err(format!(
            "{} runs as the unprivileged user, which is not set up",
            sc.id
        )),
    }
}

/// The approach's launcher; under ksmplus in a scenario of the user, an agent of that user.
fn launcher(
    ctx: &Ctx,
    user: Option<&UserSide>,
    ap: Approach,
    name: &str,
) -> Result<Launch, crate::approach::Unavailable> {
    match user {
        Some(u) if ap == Approach::Ksmplus => u.ksmplus(
            ctx.tools.preload.as_deref(),
            &ctx.tmp,
            name,
            &ctx.tools.policy_template,
        ),
        _ => ap.launch(&ctx.tools, &ctx.tmp, name),
    }
}

/// A fresh home (a copy of the warmed-up template) and runtime directory (0700), the user's
/// for a scenario of the user.
fn place(ctx: &Ctx, user: Option<&UserSide>, name: &str) -> Result<(PathBuf, PathBuf), String> {
    let home = ctx.tmp.join(format!("home-{name}"));
    let rundir = ctx.tmp.join(format!("run-{name}"));
    let template = user.map_or(&ctx.home_template, |u| &u.home_template);
    copy_dir(template, &home)?;
    let _ = std::fs::remove_dir_all(&rundir);
    std::fs::create_dir_all(&rundir).map_err(|e| e.to_string())?;
    if let Some(u) = user {
        u.user.chown(&home)?;
        u.user.chown(&rundir)?;
    }
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&rundir, std::fs::Permissions::from_mode(0o700));
    Ok((home, rundir))
}

/// Ends a cell's programs (and, for the user, what they left behind), then its agent, whose
/// log is kept.
fn end(
    user: Option<&UserSide>,
    running: &mut [Running],
    launch: &mut Launch,
    before: &BTreeSet<u32>,
    logs: &Path,
    name: &str,
) {
    let roots: Vec<u32> = running.iter().map(|x| x.child.id()).collect();
    let agent = launch.agent.as_ref().map(|a| a.pid());
    let exclude: Vec<u32> = agent.into_iter().collect();
    stop_all(&|| {
        cell_procs(user, &roots, before, &exclude)
            .into_keys()
            .collect()
    });
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
    if let Some(u) = user {
        stop_all(&|| leftovers(u, before));
    }
}

#[allow(clippy::too_many_arguments)]
fn observe(
    ctx: &Ctx,
    sc: &Scenario,
    ap: Approach,
    launch: &mut Launch,
    running: &mut Vec<Running>,
    (home, rundir): (&Path, &Path),
    before: &BTreeSet<u32>,
    r: &mut DeskCell,
) -> Result<(), String> {
    let d = ctx.desktop;
    let user = user_of(ctx, sc)?;
    let logs = ctx.results.join("logs");
    // Start the programs one after another, as a user would.
    for p in &sc.programs {
        let log = logs.join(format!(
            "{}-{}-{}.log",
            sc.id,
            ap.name(),
            p.label.replace('#', "")
        ));
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
    }
    // Reading: pages turned, pages scrolled, tabs switched.
    sys::sleep_checked(Duration::from_millis(500))?;
    for (i, p) in sc.programs.iter().enumerate() {
        let pid = r.programs[i].pid;
        r.programs[i].reading_changed = read_like_a_user(d, p, pid, p.presses, 0);
    }
    sys::sleep_checked(Duration::from_secs(1))?;

    let roots: Vec<u32> = r.programs.iter().map(|p| p.pid).collect();
    let exclude: Vec<u32> = launch.agent.iter().map(|a| a.pid()).collect();
    let procs_now = || cell_procs(user, &roots, before, &exclude);
    let tree = procs_now();
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

/// `ksmplusctl --json status` of the cell's agent (as the agent's user).
fn agent_status(
    ctx: &Ctx,
    user: Option<&UserSide>,
    socket: &Path,
    notes: &mut Vec<String>,
) -> Option<Value> {
    let mut cmd = match user {
        Some(u) => u.ctl()?,
        None => Command::new(ctx.ctl.as_ref()?),
    };
    let out = cmd
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
/// plug-in database, KDE's service cache, fontconfig, a browser's profile — is done before the
/// first cell. A program's `home_files` are written into its home template first.
pub fn warm_up(ctx: &Ctx, scenarios: &[Scenario]) -> Result<(), String> {
    let tools_none = Launch {
        env: Vec::new(),
        prctl_merge_any: false,
        agent: None,
        must_map: None,
    };
    let logs = ctx.results.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    for sc in scenarios {
        let user = user_of(ctx, sc)?;
        for p in &sc.programs {
            if seen.contains(&p.group) {
                continue;
            }
            seen.push(p.group);
            let template = user.map_or(&ctx.home_template, |u| &u.home_template);
            for (rel, text) in &p.home_files {
                let f = template.join(rel);
                if let Some(d) = f.parent() {
                    std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
                }
                std::fs::write(&f, text).map_err(|e| format!("{}: {e}", f.display()))?;
            }
            let rundir = ctx.tmp.join(format!("run-warmup-{}", p.group));
            std::fs::create_dir_all(&rundir).map_err(|e| e.to_string())?;
            if let Some(u) = user {
                u.user.chown(template)?;
                u.user.chown(&rundir)?;
            }
            let log = logs.join(format!("warmup-{}.log", p.group));
            let before = user.map(|u| u.user.pids()).unwrap_or_default();
            let mut run = spawn(ctx.desktop, p, &tools_none, template, &rundir, &log, user)?;
            let t = Instant::now();
            let res = wait_ready(ctx.desktop, p, &mut run, Duration::from_secs(180));
            let _ = sys::sleep_checked(Duration::from_secs(2));
            let pid = run.child.id();
            stop_all(&|| cell_procs(user, &[pid], &before, &[]).into_keys().collect());
            let _ = run.child.wait();
            if let Some(u) = user {
                stop_all(&|| leftovers(u, &before));
            }
            let _ = std::fs::remove_dir_all(&rundir);
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

/// The learning run of a program (`Program::learning_run`, Chromium): started once under
/// ksmplus, unmeasured, with the agent of the user and the run's learned store, until the agent
/// has learned a fork server (or 30 s after the window). The measured ksmplus cell is then the
/// program's second start, as on a desktop where the agent saw the browser before. Returns
/// what was learned.
pub fn learning_run(ctx: &Ctx, sc: &Scenario, p: &Program) -> Result<String, String> {
    let user = user_of(ctx, sc)?;
    let name = format!("{}-learning", sc.id);
    let before = user.map(|u| u.user.pids()).unwrap_or_default();
    let mut launch = launcher(ctx, user, Approach::Ksmplus, &name).map_err(|u| u.0)?;
    let (home, rundir) = place(ctx, user, &name)?;
    let logs = ctx.results.join("logs");
    let log = logs.join(format!("{name}-{}.log", p.label.replace('#', "")));
    let learned = |ctx: &Ctx| -> Vec<String> { ctx.user.map(|u| u.learned()).unwrap_or_default() };
    let known = learned(ctx);
    let t = Instant::now();
    let mut running = vec![spawn(ctx.desktop, p, &launch, &home, &rundir, &log, user)?];
    let res = wait_ready(ctx.desktop, p, &mut running[0], Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut outcome = res.map(|_| ());
    while outcome.is_ok() && Instant::now() < deadline {
        if learned(ctx).iter().any(|k| !known.contains(k)) {
            break;
        }
        outcome = sys::sleep_checked(Duration::from_millis(200));
    }
    end(user, &mut running, &mut launch, &before, &logs, &name);
    drop(launch);
    let _ = std::fs::remove_dir_all(&home);
    let _ = std::fs::remove_dir_all(&rundir);
    outcome?;
    let now = learned(ctx);
    let new: Vec<&String> = now.iter().filter(|k| !known.contains(k)).collect();
    Ok(format!(
        "{} learning run ({}, {:.1} s): {}",
        sc.id,
        p.label,
        t.elapsed().as_secs_f64(),
        if now.is_empty() {
            "the agent learned no fork server".to_owned()
        } else {
            format!(
                "{} fork server(s) learned now, {} known: {}",
                new.len(),
                now.len(),
                now.join(" | ")
            )
        }
    ))
}
