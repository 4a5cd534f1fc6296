//! `ksmplus-bench`: runs each workload under each approach with identical ksmd settings and
//! prints one table (see docs/BENCH.md). Needs root and a kernel with KSM (6.4+ for merge_any).
//!
//! Invariants: the exclusive flock on /tmp/ksmplus-ksmd.lock is held for the whole run; the ksmd
//! settings saved at the start are restored on every exit path that unwinds (normal end, error,
//! panic, SIGINT/SIGTERM/SIGHUP) — both kept by `session::Session`, shared with `desktop`; no
//! cell starts while the previous one's processes live or ksmd still holds more pages than
//! before the run.

mod agent_scale;
mod approach;
mod args;
mod cell;
mod cost;
mod desktop;
mod plot;
mod report;
mod session;
mod sys;
mod table;
mod workload;

use approach::{Approach, Tools};
use cell::{CellResult, Ctx, Params};
use clap::Parser;
use serde::Serialize;
use session::Session;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use workload::Workload;

#[derive(Parser, Debug)]
#[command(
    name = "ksmplus-bench",
    about = "Head-to-head KSM benchmark: none / madvise-all / merge_any / smart_scan / ksmplus"
)]
struct Cli {
    /// CI smoke mode: every cell at 1/8 size, short waits, assert only what must hold.
    #[arg(long)]
    smoke: bool,
    /// Print the results as JSON on stdout instead of the text table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON results to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Write the W2 plot (merged MiB and rmap_items over time) here [default: ksmplus-bench-w2.svg,
    /// none in smoke mode].
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    #[command(flatten)]
    ksmd: args::KsmdArgs,
    /// ksmd max_page_sharing during every cell (only changeable while no page is shared).
    #[arg(long, default_value_t = 256)]
    max_page_sharing: u32,
    /// Comma-separated workloads (W1,W2,W3,W5,W6 or dense,sparse,none,churn,many).
    #[arg(long, default_value = "W1,W2,W3,W5,W6")]
    workloads: String,
    /// Comma-separated approaches.
    #[arg(long, default_value = "none,madvise-all,merge_any,smart_scan,ksmplus")]
    approaches: String,
    /// Size divisor [default: 1, smoke 8].
    #[arg(long)]
    div: Option<u64>,
    /// Seconds without a change of the merging pages that count as converged [default: 3, smoke 1.5].
    #[arg(long)]
    stable_secs: Option<f64>,
    /// Never declare convergence earlier than this many seconds after ksmd starts [default: 5, smoke 3].
    #[arg(long)]
    min_secs: Option<f64>,
    /// Give up on convergence after this many seconds [default: 90, smoke 30].
    #[arg(long)]
    deadline_secs: Option<f64>,
    /// After convergence, keep the processes alive and idle this long and measure the steady
    /// cost: ksmd's, the agent's and the programs' CPU, the agent's context switches (0: skip)
    /// [default: 20, smoke 0].
    #[arg(long)]
    steady_secs: Option<f64>,
    /// Sampling period of /proc/PID/ksm_stat, milliseconds.
    #[arg(long, default_value_t = 100)]
    sample_ms: u64,
    #[command(flatten)]
    tools: args::ToolArgs,
    /// A policy file for the agent; `{comm}` in it becomes the workload's comm.
    #[arg(long)]
    agent_policy: Option<PathBuf>,
    /// Extra argument for the agent (repeatable), after `--socket S --policy P`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Smoke mode: fail (instead of skipping the ksmplus assertions) when ksmplus is unavailable;
    /// implied by KSMPLUS_REQUIRE_KSM=1 (as in CI).
    #[arg(long)]
    require_ksmplus: bool,
}

#[derive(Serialize)]
struct Output<'a> {
    date: String,
    kernel: String,
    smoke: bool,
    settings: Vec<(String, String)>,
    params: &'a Params,
    cells: &'a [CellResult],
    targets: Vec<(String, Option<bool>, String)>,
}

fn main() -> ExitCode {
    // `ksmplus-bench desktop ...`: the desktop experiments (docs/DESKTOP-BENCH.md), own options.
    if std::env::args().nth(1).as_deref() == Some("desktop") {
        sys::install_signal_handlers();
        return desktop::main(std::env::args().skip(1).collect());
    }
    // `ksmplus-bench agent-scale ...`: status latency and agent cost vs tracked programs.
    if std::env::args().nth(1).as_deref() == Some("agent-scale") {
        sys::install_signal_handlers();
        return agent_scale::main(std::env::args().skip(1).collect());
    }
    let mut cli = Cli::parse();
    cli.ksmd = cli.ksmd.resolved();
    sys::install_signal_handlers();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ksmplus-bench: {e}");
            ExitCode::from(1)
        }
    }
}

fn parse_list<T>(s: &str, what: &str, f: fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| f(x.trim()).ok_or_else(|| format!("unknown {what} {x:?}")))
        .collect()
}

fn run(cli: &Cli) -> Result<ExitCode, String> {
    if let Some(why) = session::unsupported() {
        if cli.smoke && !session::ksm_required() {
            println!("ksmplus-bench: skipped: {why} (set KSMPLUS_REQUIRE_KSM=1 to fail instead)");
            return Ok(ExitCode::SUCCESS);
        }
        return Err(why);
    }
    let workloads = parse_list(&cli.workloads, "workload", Workload::parse)?;
    let approaches = parse_list(&cli.approaches, "approach", Approach::parse)?;
    let smoke = cli.smoke;
    let params = Params {
        div: cli.div.unwrap_or(if smoke { 8 } else { 1 }).max(1),
        stable_secs: cli.stable_secs.unwrap_or(if smoke { 1.5 } else { 3.0 }),
        min_secs: cli.min_secs.unwrap_or(if smoke { 3.0 } else { 5.0 }),
        deadline_secs: cli.deadline_secs.unwrap_or(if smoke { 30.0 } else { 90.0 }),
        sample_ms: cli.sample_ms.max(10),
        steady_secs: cli
            .steady_secs
            .unwrap_or(if smoke { 0.0 } else { 20.0 })
            .max(0.0),
        smart_scan_all: cli.ksmd.ksmd_defaults,
    };
    let policy = match &cli.agent_policy {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => approach::DEFAULT_POLICY.to_owned(),
    }
    .replace("{comm}", workload::COMM);
    let tools = Tools {
        preload: approach::find_tool(cli.tools.preload.clone(), "libksmplus.so"),
        agent: approach::find_tool(cli.tools.agent.clone(), "ksmplus-agentd"),
        policy,
        agent_args: cli.agent_args.clone(),
    };

    let mut session = Session::start("ksmplus-bench", || {
        let stray = sys::find_by_comm(workload::COMM);
        if !stray.is_empty() {
            return Err(format!(
                "{} process(es) already running ({stray:?}): they would contaminate the cells",
                workload::COMM
            ));
        }
        Ok(())
    })?;
    let bin = workload::compile(session.tmp())?;

    session.tune(
        cli.ksmd.pages_to_scan,
        cli.ksmd.sleep_millisecs,
        cli.ksmd.use_zero_pages,
    )?;
    // Let ksmd drop what exited processes left (run=1) before the baseline is taken.
    let baseline = cell::settle()?;
    let mps = sys::ksm_get("max_page_sharing");
    if mps != cli.max_page_sharing as i64 {
        if sys::ksm_get("pages_shared") > 0 {
            return Err(format!(
                "max_page_sharing is {mps} and cannot change to {} while ksmd shares pages; pass --max-page-sharing {mps}",
                cli.max_page_sharing,
            ));
        }
        sys::ksm_set("max_page_sharing", &cli.max_page_sharing.to_string())?;
    }
    let ctx = Ctx {
        bin,
        tmp: session.tmp().to_path_buf(),
        tools,
        params: params.clone(),
        ksmd_pid: sys::ksmd_pid(),
        baseline,
    };
    let settings = session::shown_settings();
    let mut header = format!(
        "ksmplus-bench{} — {}, load average {}\nksmd: {} smart_scan={}\n",
        if smoke { " --smoke" } else { "" },
        session::machine(),
        session::loadavg(),
        session::settings_text(&settings),
        if params.smart_scan_all {
            "1 (the kernel's default)"
        } else {
            "0 (1 for the smart_scan approach only)"
        },
    );
    header += &format!(
        "size 1/{}; converged = merging pages unchanged {} s (and 2 full scans), not before {} s, deadline {} s; steady window {} s; baseline pages_shared {} sharing {} general_profit {}{}\nshim: {}  agent: {}\n",
        params.div,
        params.stable_secs,
        params.min_secs,
        params.deadline_secs,
        params.steady_secs,
        ctx.baseline.pages_shared,
        ctx.baseline.pages_sharing,
        ctx.baseline.general_profit,
        if ctx.baseline.is_empty() {
            ""
        } else {
            " (live processes outside the bench use KSM)"
        },
        session::shown_path(&ctx.tools.preload),
        session::shown_path(&ctx.tools.agent),
    );
    eprint!("{header}");
    if ctx.ksmd_pid.is_none() {
        eprintln!("ksmplus-bench: warning: no ksmd thread found; ksmd CPU reads 0");
    }

    let started = Instant::now();
    let mut cells = Vec::new();
    for &wl in &workloads {
        for &ap in &approaches {
            let c = cell::run(&ctx, wl, ap)?;
            eprintln!(
                "[{:>5.0}s] {} {:<11} {:<9} merging {:>6}/{:<6} rmap {:>7} conv {:>5.1}s ksmd {:.3}s{}",
                started.elapsed().as_secs_f64(),
                c.workload,
                c.approach,
                c.status.split(':').next().unwrap_or(""),
                c.merging_pages,
                c.ideal_pages,
                c.rmap_items,
                c.converge_secs,
                c.ksmd_cpu_secs,
                if c.ran() { String::new() } else { format!(" — {}", c.status) },
            );
            cells.push(c);
        }
    }
    drop(ctx);
    cell::cost_vs_none(&mut cells);
    let restored = session.restore()?;

    let wl_ids: Vec<&str> = workloads.iter().map(|w| w.id()).collect();
    let targets = report::targets(&cells);
    let mut text = header.clone();
    text += &format!(
        "\n{}\n{}{}\n{}\n{}\n",
        report::table(&cells),
        report::steady(&cells),
        report::ratios(&cells, &wl_ids),
        report::targets_text(&targets),
        report::THESIS_W2
    );
    text += &format!(
        "ksmd settings restored: {}\nwall time {:.0} s\n",
        if restored.ok() { "yes" } else { "NO" },
        started.elapsed().as_secs_f64()
    );
    let out = Output {
        date: session::date(),
        kernel: session::kernel(),
        smoke,
        settings,
        params: &params,
        cells: &cells,
        targets: targets
            .iter()
            .map(|t| (t.name.to_owned(), t.verdict, t.detail.clone()))
            .collect(),
    };
    let json = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
    if cli.json {
        println!("{json}");
    } else {
        print!("{text}");
    }
    if let Some(p) = &cli.json_out {
        std::fs::write(p, &json).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let svg_path = cli
        .svg
        .clone()
        .or_else(|| (!smoke).then(|| PathBuf::from("ksmplus-bench-w2.svg")));
    if let Some(p) = svg_path.filter(|_| workloads.contains(&Workload::Sparse)) {
        let title = format!(
            "W2 (thesis 5.2.3): merged MiB and rmap_items vs time — Linux {}, pages_to_scan={}, sleep_millisecs={}",
            session::kernel(),
            cli.ksmd.pages_to_scan,
            cli.ksmd.sleep_millisecs
        );
        let tmp_path = p.with_extension("svg.tmp");
        std::fs::write(&tmp_path, report::svg(&cells, "W2", &title))
            .and_then(|()| std::fs::rename(&tmp_path, &p))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        eprintln!("ksmplus-bench: wrote {}", p.display());
    }

    session::conclude(
        "ksmplus-bench",
        &restored,
        smoke.then(|| smoke_assertions(&cells, session::require_ksmplus(cli.require_ksmplus))),
    )
}

/// What must hold whatever the machine: returns the failures.
fn smoke_assertions(cells: &[CellResult], require_ksmplus: bool) -> Vec<String> {
    let mut f = Vec::new();
    let get = |wl: &str, ap: &str| cells.iter().find(|c| c.workload == wl && c.approach == ap);
    for c in cells {
        if c.status.starts_with("error") {
            f.push(format!("{} {}: {}", c.workload, c.approach, c.status));
        }
        // The shim-based approaches may be unbuilt on a CI runner; the kernel ones may not.
        let needs_shim = c.approach == "ksmplus" || c.approach == "madvise-all";
        if c.status.starts_with("unavailable") && (!needs_shim || require_ksmplus) {
            f.push(format!("{} {}: {}", c.workload, c.approach, c.status));
        }
        if c.approach == "none" && c.ran() && c.merging_pages != 0 {
            f.push(format!(
                "{} none merged {} pages (must be 0)",
                c.workload, c.merging_pages
            ));
        }
    }
    for ap in ["merge_any", "madvise-all"] {
        if let Some(c) = get("W1", ap).filter(|c| c.ran()) {
            if c.merging_pages * 100 < c.ideal_pages * 99 {
                f.push(format!(
                    "W1 {ap} merged {} of {} pages (must be >= 99 %)",
                    c.merging_pages, c.ideal_pages
                ));
            }
        }
    }
    // Every issue-4 target that holds today (docs/BENCH.md, "Smoke").
    f.extend(report::smoke_failures(cells));
    match get("W3", "ksmplus").filter(|c| c.ran()) {
        Some(c) if c.rmap_items != 0 => f.push(format!(
            "W3 ksmplus has {} rmap_items (must be 0)",
            c.rmap_items
        )),
        _ => {}
    }
    if let Some(c) = get("W2", "ksmplus").filter(|c| c.ran()) {
        if c.merging_pages + 2 < c.ideal_pages {
            f.push(format!(
                "W2 ksmplus merged {} of the {} duplicate pages",
                c.merging_pages, c.ideal_pages
            ));
        }
    }
    f
}
