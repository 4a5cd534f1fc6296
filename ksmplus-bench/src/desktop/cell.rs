//! One desktop cell: one scenario under one approach, from a clean ksmd to a clean ksmd.
//!
//! Sequence: ksmd stopped (`run=0`) -> approach launched (agent first, from the bench's
//! `approach.rs`) -> programs started one by one, each timed until its first window appears
//! and then until it is ready -> pages turned as a reader would -> memory of the programs
//! measured (`smaps_rollup`, before any merging) -> `run=1` at t0 -> sampled until the merging
//! pages settle -> one more key per window after merging, with a screenshot (the program must
//! still answer) -> programs and agent ended -> ksmd back to the baseline. With a steady
//! window (D1-D4), each program's control twin (no approach, its own home) starts right after
//! it and is read the same way: the reference for the programs' CPU in the same window.
//!
//! A scenario of the unprivileged user (the browsers, `Scenario::user`) runs its programs as
//! that user, with their sandboxes, in a home and runtime directory the user owns; under
//! ksmplus its agent runs as the user too, with the run's learned store. Its processes are the
//! programs' descendants and every process of the user started during the cell (crash handlers
//! re-parent to init), the user's bus and agent excepted.

use super::ctx::{set, user_of, wait_clean, Ctx};
use super::observe::observe;
use super::results::DeskCell;
use super::running::{cell_procs, leftovers, spawn, stop_all, wait_ready, Running};
use super::scenario::{Program, Scenario};
use super::user::UserSide;
use crate::approach::{Approach, Launch};
use crate::sys;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
    let smart = ctx.smart_scan_all || ap.smart_scan();
    set("smart_scan", if smart { "1" } else { "0" }).ok();
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
    // The control group's own home and runtime directory (a program's second instance must
    // not share the first one's files).
    let control = if ctx.wants_control(sc) {
        Some(place(ctx, None, &format!("{name}-control"))?)
    } else {
        None
    };
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
        control.as_ref().map(|(h, r)| (h.as_path(), r.as_path())),
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
    for dir in [Some(&(home, rundir)), control.as_ref()]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_dir_all(&dir.0);
        let _ = std::fs::remove_dir_all(&dir.1);
    }
    Ok(r)
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
            &ctx.tools.policy,
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

/// Starts each distinct program once (no KSM, not measured) so first-run work — GIMP's
/// plug-in database, KDE's service cache, fontconfig, a browser's profile — is done before the
/// first cell. A program's `home_files` are written into its home template first.
pub fn warm_up(ctx: &Ctx, scenarios: &[Scenario]) -> Result<(), String> {
    let tools_none = Launch::plain();
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
