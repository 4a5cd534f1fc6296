//! `ksmplusctl`: asks a running ksmplus-agentd for its status, edits its policy, reloads it.
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
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
    Scan(ksmplus_agentd::scan::ScanArgs),
    /// Make a program's desktop entries (menu, file associations) start it under the shim
    Wrap(ksmplus_agentd::desktop::WrapArgs),
    /// Undo `wrap`: restore the previous user entry, or remove the override
    Unwrap(ksmplus_agentd::desktop::UnwrapArgs),
    /// List the desktop entries `wrap` wrote
    Wrapped,
    /// Write the systemd user unit for ksmplus-agentd (~/.config/systemd/user)
    InstallService(ksmplus_agentd::service::InstallArgs),
}

fn main() {
    let args = Args::parse();
    // Local commands (desktop integration, scanner): they do not talk to the agent.
    let local = match &args.cmd {
        Cmd::Scan(a) => Some(ksmplus_agentd::scan::cli(a, args.json)),
        Cmd::Wrap(a) => Some(ksmplus_agentd::desktop::cli_wrap(a, args.json)),
        Cmd::Unwrap(a) => Some(ksmplus_agentd::desktop::cli_unwrap(a, args.json)),
        Cmd::Wrapped => Some(ksmplus_agentd::desktop::cli_wrapped(args.json)),
        Cmd::InstallService(a) => Some(ksmplus_agentd::service::cli_install(a, args.json)),
        _ => None,
    };
    if let Some(code) = local {
        std::process::exit(code);
    }
    let socket = ksmplus_agentd::socket_path(args.socket.as_deref());
    let req = match &args.cmd {
        Cmd::Status => json!({"cmd": "status"}),
        Cmd::Add { app } => json!({"cmd": "add", "app": app}),
        Cmd::Remove { app } => json!({"cmd": "remove", "app": app}),
        Cmd::Reload => json!({"cmd": "reload"}),
        _ => unreachable!("local commands returned above"),
    };
    let reply = match ksmplus_agentd::control_request(&socket, &req.to_string()) {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                println!("{}", json!({"ok": false, "error": e.to_string()}));
            } else {
                eprintln!("ksmplusctl: {e}");
            }
            std::process::exit(2);
        }
    };
    let v: Value = serde_json::from_str(&reply)
        .unwrap_or_else(|_| json!({"ok": false, "error": "unparsable reply"}));
    let ok = v["ok"].as_bool().unwrap_or(false);
    if args.json {
        println!("{reply}");
    } else if !ok {
        eprintln!(
            "ksmplusctl: {}",
            v["error"]
                .as_str()
                .unwrap_or("the agent refused the request")
        );
    } else {
        match &args.cmd {
            Cmd::Status => print_status(&v),
            Cmd::Add { app } | Cmd::Remove { app } => {
                let verb = if matches!(args.cmd, Cmd::Add { .. }) {
                    "added"
                } else {
                    "removed"
                };
                if v["changed"].as_bool() == Some(true) {
                    println!("{app}: {verb} in {}; policy reloaded (applies to programs started from now on)",
                        v["policy"].as_str().unwrap_or("?"));
                } else {
                    println!(
                        "{app}: nothing to change in {}",
                        v["policy"].as_str().unwrap_or("?")
                    );
                }
            }
            Cmd::Reload => println!(
                "policy reloaded from {}",
                v["policy"].as_str().unwrap_or("?")
            ),
            _ => {}
        }
    }
    std::process::exit(if ok { 0 } else { 1 });
}

fn n(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn mib(v: &Value) -> String {
    format!("{:.1}", v.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64)
}

fn print_status(v: &Value) {
    println!(
        "{:>7}  {:<15}  {:>7}  {:>11}  {:>16}  {:>10}  {:>8}  {:>10}  {:>11}",
        "PID",
        "COMM",
        "REGIONS",
        "TRACKED MiB",
        "ANON COVERED MiB",
        "MARKED MiB",
        "MERGING",
        "RMAP_ITEMS",
        "PROFIT KiB"
    );
    let empty = vec![];
    for p in v["processes"].as_array().unwrap_or(&empty) {
        println!(
            "{:>7}  {:<15}  {:>7}  {:>11}  {:>16}  {:>10}  {:>8}  {:>10}  {:>11}",
            n(&p["pid"]),
            p["comm"].as_str().unwrap_or(""),
            n(&p["regions"]),
            mib(&p["tracked_bytes"]),
            format!(
                "{} / {}",
                mib(&p["anon_covered_bytes"]),
                mib(&p["anon_bytes"])
            ),
            mib(&p["marked_bytes"]),
            n(&p["merging_pages"]),
            n(&p["rmap_items"]),
            p["profit"].as_i64().unwrap_or(0) / 1024,
        );
    }
    let t = &v["totals"];
    println!(
        "{:>7}  {:<15}  {:>7}  {:>11}  {:>16}  {:>10}  {:>8}  {:>10}  {:>11}",
        "TOTAL",
        format!("{} processes", t["processes"]),
        n(&t["regions"]),
        mib(&t["tracked_bytes"]),
        "",
        mib(&t["marked_bytes"]),
        n(&t["merging_pages"]),
        n(&t["rmap_items"]),
        t["profit"].as_i64().unwrap_or(0) / 1024,
    );
    let e = &v["engine"];
    println!(
        "engine: {} fingerprints (~{} KiB, limit {}), {}",
        e["fingerprints"],
        e["index_bytes_estimate"].as_u64().unwrap_or(0) / 1024,
        e["max_fingerprints"],
        if e["idle"].as_bool() == Some(true) {
            "schedule done"
        } else {
            "sampling"
        }
    );
    let k = &v["ksmd"];
    if k["available"].as_bool() != Some(true) {
        println!(
            "ksmd: not available (this kernel has no /sys/kernel/mm/ksm): nothing will be merged"
        );
    } else if k["run"].as_i64() != Some(1) {
        println!(
            "ksmd: OFF (run = {}): ranges are marked but nothing merges until root runs `echo 1 > /sys/kernel/mm/ksm/run`",
            k["run"]
        );
    } else {
        println!(
            "ksmd: on, pages_to_scan {}, sleep {} ms, full_scans {}, pages_shared {}, pages_sharing {}, general_profit {} KiB",
            k["pages_to_scan"],
            k["sleep_millisecs"],
            k["full_scans"],
            k["pages_shared"],
            k["pages_sharing"],
            k["general_profit"].as_i64().unwrap_or(0) / 1024
        );
    }
    let a = &v["agent"];
    println!(
        "agent: pid {}, {} peers, RSS {} KiB, CPU {} ms, policy {}",
        a["pid"],
        a["peers"]["tracked"],
        a["rss_kib"],
        a["cpu_ms"],
        a["policy"].as_str().unwrap_or("?")
    );
}
