//! `ksmplusctl`: asks a running ksmplus-agentd for its status, edits its policy, reloads it;
//! and, without an agent, wraps desktop programs (`desktop`), scans for duplicate pages (`scan`)
//! and writes the user unit (`service`).
mod client;
mod desktop;
mod scan;
mod service;

use clap::{Parser, Subcommand};
use ksmplus_common::status::{Request, SimpleReply, StatusReply};
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "Control the KSM+ agent (ksmplus-agentd)")]
struct Args {
    /// Agent socket [default: $KSMPLUS_SOCKET, else $XDG_RUNTIME_DIR/ksmplus/agent.sock]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print the agent's reply as JSON
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tracked processes, what is marked and merged, and ksmd's state
    Status,
    /// Track a program (by comm or executable name); saved in the policy file, then reloaded
    Add { app: String },
    /// Stop tracking a program; saved in the policy file, then reloaded
    Remove { app: String },
    /// Re-read the policy file (a bad file leaves the old policy in force)
    Reload,
    /// Count duplicate page contents in running processes (what KSM could save); no agent needed
    Scan(scan::ScanArgs),
    /// Make a program's desktop entries (menu, file associations) start it under the shim
    Wrap(desktop::WrapArgs),
    /// Undo `wrap`: restore the previous user entry, or remove the override
    Unwrap(desktop::UnwrapArgs),
    /// List the desktop entries `wrap` wrote
    Wrapped,
    /// Write the systemd user unit for ksmplus-agentd (~/.config/systemd/user)
    InstallService(service::InstallArgs),
}

fn main() {
    let args = Args::parse();
    // Local commands (desktop integration, scanner): they do not talk to the agent.
    let local = match &args.cmd {
        Cmd::Scan(a) => Some(scan::cli(a, args.json)),
        Cmd::Wrap(a) => Some(desktop::cli_wrap(a, args.json)),
        Cmd::Unwrap(a) => Some(desktop::cli_unwrap(a, args.json)),
        Cmd::Wrapped => Some(desktop::cli_wrapped(args.json)),
        Cmd::InstallService(a) => Some(service::cli_install(a, args.json)),
        _ => None,
    };
    if let Some(code) = local {
        std::process::exit(code);
    }
    let socket = ksmplus_common::paths::socket_path(args.socket.as_deref());
    let req = match &args.cmd {
        Cmd::Status => Request::Status,
        Cmd::Add { app } => Request::Add { app: app.clone() },
        Cmd::Remove { app } => Request::Remove { app: app.clone() },
        Cmd::Reload => Request::Reload,
        _ => unreachable!("local commands returned above"),
    };
    let json = serde_json::to_string(&req).expect("a request serialises");
    let reply = match client::control_request(&socket, &json) {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&SimpleReply::err(e.to_string())).unwrap()
                );
            } else {
                eprintln!("ksmplusctl: {e}");
            }
            // 3: "not running", as systemctl says it.
            let code = if matches!(e, client::CtlError::NotRunning(_)) {
                3
            } else {
                2
            };
            std::process::exit(code);
        }
    };
    let ok = if let Cmd::Status = args.cmd {
        match serde_json::from_str::<StatusReply>(&reply) {
            Ok(st) => {
                if args.json {
                    println!("{reply}");
                } else {
                    print_status(&st);
                }
                st.ok
            }
            Err(_) => report_simple(&args, &reply),
        }
    } else {
        report_simple(&args, &reply)
    };
    std::process::exit(if ok { 0 } else { 1 });
}

fn report_simple(args: &Args, reply: &str) -> bool {
    let v: SimpleReply = serde_json::from_str(reply)
        .unwrap_or_else(|e| SimpleReply::err(format!("unparsable reply from the agent: {e}")));
    if args.json {
        println!("{}", serde_json::to_string(&v).unwrap());
        return v.ok;
    }
    if !v.ok {
        eprintln!(
            "ksmplusctl: {}",
            v.error
                .as_deref()
                .unwrap_or("the agent refused the request")
        );
        return false;
    }
    let policy = v.policy.as_deref().unwrap_or("?");
    match &args.cmd {
        Cmd::Add { app } | Cmd::Remove { app } => {
            let verb = if matches!(args.cmd, Cmd::Add { .. }) {
                "added to"
            } else {
                "removed from"
            };
            if v.changed == Some(true) {
                println!("'{app}': {verb} {policy}; policy reloaded (running programs included)");
            } else {
                println!("'{app}': nothing to change in {policy}");
            }
        }
        Cmd::Reload => println!("policy reloaded from {policy}"),
        _ => {}
    }
    true
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

/// The table fits 100 columns.
fn print_status(v: &StatusReply) {
    println!(
        "{:>7} {:<15} {:<13} {:>17} {:>7} {:>8} {:>8} {:>10}",
        "PID", "COMM", "MARKING", "COVERED/ANON MiB", "MARKED", "MERGING", "RMAP", "PROFIT KiB"
    );
    for p in &v.processes {
        let cov = if p.coverage.anon_bytes > 0 {
            format!(
                "{} / {}",
                mib(p.coverage.covered_bytes),
                mib(p.coverage.anon_bytes)
            )
        } else {
            "-".into()
        };
        println!(
            "{:>7} {:<15} {:<13} {:>17} {:>7} {:>8} {:>8} {:>10}",
            p.pid,
            p.comm,
            p.marking,
            cov,
            mib(p.marked_bytes),
            p.merging_pages,
            p.rmap_items,
            p.profit / 1024,
        );
    }
    let t = &v.totals;
    println!(
        "{:>7} {:<15} {:<13} {:>17} {:>7} {:>8} {:>8} {:>10}",
        "TOTAL",
        format!("{} processes", t.processes),
        "",
        if t.anon_bytes > 0 {
            format!("{} / {}", mib(t.covered_bytes), mib(t.anon_bytes))
        } else {
            String::new()
        },
        mib(t.marked_bytes),
        t.merging_pages,
        t.rmap_items,
        t.profit / 1024,
    );
    // Why memory is not covered, and why a process is not marked: only where it matters.
    for p in &v.processes {
        let why: Vec<String> = p
            .coverage
            .uncovered
            .iter()
            .filter(|(_, b)| **b >= 1 << 20)
            .map(|(k, b)| format!("{k} {} MiB", mib(*b)))
            .collect();
        if !why.is_empty() || !p.marking_note.is_empty() {
            let mut line = format!("{:>7} {}:", p.pid, p.comm);
            if !why.is_empty() {
                line += &format!(" not covered: {};", why.join(", "));
            }
            if !p.marking_note.is_empty() {
                line += &format!(" {}", p.marking_note);
            }
            println!("{line}");
        }
    }
    let e = &v.engine;
    println!(
        "engine: {} fingerprints (~{} KiB, limit {}), {}",
        e.fingerprints,
        e.index_bytes_estimate / 1024,
        e.max_fingerprints,
        if e.idle { "schedule done" } else { "sampling" }
    );
    let k = |n: &str| v.ksmd.get(n).copied().unwrap_or(0);
    if k("available") != 1 {
        println!(
            "ksmd: not available (this kernel has no /sys/kernel/mm/ksm): nothing will be merged"
        );
    } else if k("run") != 1 {
        println!(
            "ksmd: OFF (run = {}): ranges are marked but nothing merges until root runs `echo 1 > /sys/kernel/mm/ksm/run`",
            k("run")
        );
    } else {
        println!(
            "ksmd: on, pages_to_scan {}, sleep {} ms, full_scans {}, pages_shared {}, pages_sharing {}, general_profit {} KiB",
            k("pages_to_scan"),
            k("sleep_millisecs"),
            k("full_scans"),
            k("pages_shared"),
            k("pages_sharing"),
            k("general_profit") / 1024
        );
    }
    let a = &v.agent;
    println!(
        "agent: pid {}, {} tracked, {} untracked, {} found without Hello, RSS {} KiB, CPU {} ms, {} wake-ups, policy {}",
        a.pid,
        a.peers.tracked,
        a.peers.untracked,
        a.adopted,
        a.rss_kib,
        a.cpu_ms,
        a.wakeups,
        a.policy
    );
    for u in &v.unreadable {
        println!(
            "cannot track pid {} ({}): {}",
            u.pid,
            if u.exe.is_empty() { &u.comm } else { &u.exe },
            u.reason
        );
    }
}
