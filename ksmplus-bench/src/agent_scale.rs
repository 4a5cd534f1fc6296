//! `ksmplus-bench agent-scale`: issue 11 #4 — how the agent's control path and its own cost
//! grow with the number of tracked programs. For each N (100, 500, 1000 by default): a fresh
//! release agent, N idle programs under the shim (the bench's workload in mode `none`: 1 MiB of
//! unique pages each, then blocked in `poll`), tracked; once the agent has sampled them all and
//! gone idle, an idle window measures its CPU and wake-ups, then `ksmplusctl status --json` is
//! timed over several calls, the way a user or a panel applet calls it. Target: ≤ 0.25 s at
//! 1 000 clients. See docs/BENCH.md.
//!
//! Invariants: every program and the agent are children of the bench, ended (stdin closed,
//! SIGKILL after 2 s) on every path that unwinds, signals included; nothing touches ksmd (the
//! programs' pages are unique and never marked), so the ksmd lock is not taken. As root, the
//! agent, the programs and `ksmplusctl` run as a uid of their own (`--uid`), as a user's agent
//! runs (its `/proc` reads pass the checks an ordinary user's do), with nothing else of that
//! uid on the machine.

use crate::args::ToolArgs;
use crate::{approach, cost, session, sys, workload};
use clap::Parser;
use serde::Serialize;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The idle program's file name (and comm, which the agent's policy tracks). Not the head-to-head
/// bench's `ksmplus-wl`, whose stray processes make that bench refuse to start.
const COMM: &str = "ksmplus-idle";
/// The uid everything runs as when the bench runs as root.
const DEFAULT_UID: u32 = 64_979;
/// Issue 11 #4's target for `status --json` at 1 000 clients, seconds.
const TARGET_S: f64 = 0.25;

#[derive(Parser, Debug)]
#[command(
    name = "ksmplus-bench agent-scale",
    about = "ksmplusctl status latency, agent CPU and wake-ups with N tracked idle programs (issue 11 #4)"
)]
struct Cli {
    /// Numbers of tracked programs, one fresh agent each.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
    counts: Vec<usize>,
    /// `ksmplusctl status --json` calls timed per count.
    #[arg(long, default_value_t = 15)]
    calls: usize,
    /// Length of the idle window that measures the agent's CPU and wake-ups, seconds.
    #[arg(long, default_value_t = 20.0)]
    idle_secs: f64,
    /// MiB of unique memory per program (1, 2, 4, 5, 8, 10, ... : a divisor of 200).
    #[arg(long, default_value_t = 1)]
    mib: u64,
    /// Give up waiting for the agent to track every program, or to go idle, after this long.
    #[arg(long, default_value_t = 180.0)]
    deadline_secs: f64,
    #[command(flatten)]
    tools: ToolArgs,
    /// ksmplusctl [default: searched like --preload].
    #[arg(long)]
    ctl: Option<PathBuf>,
    /// As root: the uid the agent, the programs and ksmplusctl run as (not root: yourself).
    #[arg(long, default_value_t = DEFAULT_UID)]
    uid: u32,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
}

/// One row of the table.
#[derive(Serialize, Debug, Default)]
struct Row {
    clients: usize,
    /// Seconds from the first program's start to every program tracked.
    tracked_secs: f64,
    /// Seconds from every program tracked to the engine idle (every region sampled out).
    idle_secs: f64,
    /// Agent CPU from the first program's start to idle, seconds.
    ramp_cpu_secs: f64,
    /// `ksmplusctl status --json` wall time over `calls` calls, seconds.
    status_median_secs: f64,
    status_max_secs: f64,
    status_min_secs: f64,
    /// Agent CPU per status call, milliseconds.
    status_cpu_ms: f64,
    /// Bytes of one status reply.
    status_bytes: usize,
    /// Over the idle window: agent CPU in % of one core, its own loop wake-ups per second
    /// (`agent.wakeups` of the status), and the kernel's count of its context switches per
    /// second (all threads, voluntary + involuntary).
    idle_cpu_pct: f64,
    idle_wakeups_per_s: f64,
    idle_ctxsw_per_s: f64,
    /// Wake-up signals the agent sent to idle programs during the window.
    idle_wakes_sent: u64,
    rss_kib: u64,
    fds: u64,
}

#[derive(Serialize)]
struct Output<'a> {
    date: String,
    kernel: String,
    loadavg_before: String,
    loadavg_after: String,
    uid: u32,
    calls: usize,
    window_secs: f64,
    mib_per_program: u64,
    rows: &'a [Row],
}

/// `ksmplus-bench agent-scale ARGS...` (args[0] is `agent-scale`).
pub fn main(args: Vec<String>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match run(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ksmplus-bench agent-scale: {e}");
            ExitCode::from(1)
        }
    }
}

/// The files of a run, world-readable, in a directory removed on drop.
struct Kit {
    dir: PathBuf,
    lib: PathBuf,
    prog: PathBuf,
    agent: PathBuf,
    ctl: PathBuf,
    /// `Some` when running as root: everything runs as this uid.
    uid: Option<u32>,
}

impl Drop for Kit {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Kit {
    fn new(cli: &Cli) -> Result<Kit, String> {
        let need = |p: Option<PathBuf>, name: &str| {
            approach::find_tool(p, name).ok_or_else(|| {
                format!("{name} not found: build with `cargo build --release -p ksmplus-preload -p ksmplus-agentd -p ksmplus-bench`, or pass its path")
            })
        };
        let lib = need(cli.tools.preload.clone(), "libksmplus.so")?;
        let agent = need(cli.tools.agent.clone(), "ksmplus-agentd")?;
        let ctl = need(cli.ctl.clone(), "ksmplusctl")?;
        // SAFETY: geteuid has no preconditions.
        let uid = (unsafe { libc::geteuid() } == 0).then_some(cli.uid);
        let dir = std::env::temp_dir().join(format!("ksmplus-agent-scale-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut kit = Kit {
            lib: PathBuf::new(),
            prog: PathBuf::new(),
            agent: PathBuf::new(),
            ctl: PathBuf::new(),
            dir,
            uid,
        };
        for d in [kit.dir.clone(), kit.dir.join("bin")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
        }
        // The workload program, compiled as the head-to-head run does, under its own name.
        let built = workload::compile(&kit.dir)?;
        let bin = kit.dir.join("bin");
        let copy = |from: &Path, name: &str| -> Result<PathBuf, String> {
            let to = bin.join(name);
            std::fs::copy(from, &to).map_err(|e| format!("copy {}: {e}", from.display()))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
            Ok(to)
        };
        kit.prog = copy(&built, COMM)?;
        kit.lib = copy(&lib, "libksmplus.so")?;
        kit.agent = copy(&agent, "ksmplus-agentd")?;
        kit.ctl = copy(&ctl, "ksmplusctl")?;
        Ok(kit)
    }

    fn as_user<'c>(&self, c: &'c mut Command) -> &'c mut Command {
        if let Some(uid) = self.uid {
            std::os::unix::process::CommandExt::uid(c, uid);
            std::os::unix::process::CommandExt::gid(c, uid);
        }
        c
    }

    /// A directory the agent's user owns (its socket and state live there).
    fn own_dir(&self, name: &str) -> Result<PathBuf, String> {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(&d, Some(uid), Some(uid)).map_err(|e| e.to_string())?;
        }
        Ok(d)
    }
}

/// A fresh agent for one count; killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        sys::kill(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(kit: &Kit, n: usize) -> Result<Agent, String> {
        let run = kit.own_dir(&format!("agent-{n}"))?;
        let policy = kit.dir.join(format!("policy-{n}.toml"));
        // What a user runs: the default policy, the idle programs tracked by name.
        std::fs::write(&policy, format!("track = [\"{COMM}\"]\n")).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;
        let log = kit.dir.join(format!("agent-{n}.log"));
        let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let socket = run.join("agent.sock");
        let child = kit
            .as_user(&mut Command::new(&kit.agent))
            .arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .arg("--state")
            .arg(run.join("learned"))
            .env_remove("KSMPLUS_LOG")
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("start {}: {e}", kit.agent.display()))?;
        let mut a = Agent { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while status(kit, &a.socket).is_err() {
            if let Ok(Some(st)) = a.child.try_wait() {
                return Err(format!("agent exited ({st}): {}", a.log_tail()));
            }
            if Instant::now() >= deadline {
                return Err(format!("agent not answering after 10 s: {}", a.log_tail()));
            }
            sys::sleep_checked(Duration::from_millis(20))?;
        }
        Ok(a)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        t[t.len().saturating_sub(2000)..].to_owned()
    }
}

/// `ksmplusctl --socket S status --json`: the reply and the call's wall time.
fn status_timed(kit: &Kit, socket: &Path) -> Result<(Value, Duration, usize), String> {
    let t0 = Instant::now();
    let out = kit
        .as_user(&mut Command::new(&kit.ctl))
        .arg("--socket")
        .arg(socket)
        .args(["status", "--json"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("run {}: {e}", kit.ctl.display()))?;
    let took = t0.elapsed();
    if !out.status.success() {
        return Err(format!(
            "status: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status --json: {e}"))?;
    if v["ok"] != true {
        return Err(format!("status not ok: {}", v["error"]));
    }
    Ok((v, took, out.stdout.len()))
}

fn status(kit: &Kit, socket: &Path) -> Result<Value, String> {
    status_timed(kit, socket).map(|(v, _, _)| v)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The idle programs of one count; every one ended on drop.
struct Programs(Vec<(Child, Option<ChildStdin>, Option<BufReader<ChildStdout>>)>);

impl Drop for Programs {
    fn drop(&mut self) {
        for (_, stdin, _) in &mut self.0 {
            stdin.take();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for (c, _, _) in &mut self.0 {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Programs {
    /// Starts `n` programs under the shim talking to `socket`, and waits for each one's `ready`.
    fn start(kit: &Kit, socket: &Path, n: usize, mib: u64) -> Result<Programs, String> {
        let div = (200 / mib.clamp(1, 200)).to_string();
        let mut ps = Programs(Vec::with_capacity(n));
        for i in 0..n {
            let mut c = Command::new(&kit.prog);
            c.args(["none", &i.to_string(), &div])
                .env("LD_PRELOAD", &kit.lib)
                .env("KSMPLUS_SOCKET", socket)
                .env_remove("KSMPLUS_LOG")
                .env_remove("KSMPLUS_DISABLE")
                .env_remove("KSMPLUS_MADVISE_ALL")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut child = kit
                .as_user(&mut c)
                .spawn()
                .map_err(|e| format!("start program {i}: {e}"))?;
            let stdin = child.stdin.take();
            let out = child.stdout.take().map(BufReader::new);
            ps.0.push((child, stdin, out));
            if sys::stop_requested() {
                return Err("interrupted by a signal".into());
            }
        }
        // Each prints `buf ...` then `ready`: read in a helper thread, bounded by a deadline.
        let readers: Vec<BufReader<ChildStdout>> =
            ps.0.iter_mut().filter_map(|(_, _, o)| o.take()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for (i, mut r) in readers.into_iter().enumerate() {
                let mut ok = false;
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|k| k > 0) {
                    if line.trim() == "ready" {
                        ok = true;
                        break;
                    }
                    line.clear();
                }
                if !ok {
                    let _ = tx.send(Err(format!("program {i} ended before `ready`")));
                    return;
                }
                kept.push(r);
            }
            let _ = tx.send(Ok(kept));
        });
        let kept = rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| "the programs did not all print `ready` within 120 s".to_string())??;
        for ((_, _, o), r) in ps.0.iter_mut().zip(kept) {
            *o = Some(r);
        }
        Ok(ps)
    }
}

/// CPU time of every live thread of `pid`, seconds.
fn cpu_secs(pid: u32) -> f64 {
    sys::threads_cpu_ns(pid) as f64 / 1e9
}

/// Polls the agent's status until `f` says done; `Err` naming `what` after the deadline.
fn wait_status(
    kit: &Kit,
    agent: &Agent,
    what: &str,
    deadline: Instant,
    mut f: impl FnMut(&Value) -> bool,
) -> Result<Value, String> {
    loop {
        let s = status(kit, &agent.socket)?;
        if f(&s) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{what}: not reached by the deadline; agent {}; log: {}",
                s["agent"],
                agent.log_tail()
            ));
        }
        sys::sleep_checked(Duration::from_millis(500))?;
    }
}

fn measure(kit: &Kit, cli: &Cli, n: usize) -> Result<Row, String> {
    let agent = Agent::start(kit, n)?;
    let apid = agent.pid();
    let cpu0 = cpu_secs(apid);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(cli.deadline_secs);
    let programs = Programs::start(kit, &agent.socket, n, cli.mib)?;
    wait_status(
        kit,
        &agent,
        &format!("{n} programs tracked"),
        deadline,
        |s| u(&s["agent"]["peers"]["tracked"]) == n as u64,
    )?;
    let tracked_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    wait_status(kit, &agent, "the engine idle", deadline, |s| {
        s["engine"]["idle"] == true
    })?;
    let idle_secs = t1.elapsed().as_secs_f64();
    let ramp_cpu_secs = cpu_secs(apid) - cpu0;

    // The idle window: nothing asks the agent anything between the two status calls.
    let (s0, _, _) = status_timed(kit, &agent.socket)?;
    let (c0, x0, w0) = (
        cpu_secs(apid),
        sys::threads_ctx_switches(apid),
        Instant::now(),
    );
    sys::sleep_checked(Duration::from_secs_f64(cli.idle_secs))?;
    let (c1, x1, secs) = (
        cpu_secs(apid),
        sys::threads_ctx_switches(apid),
        w0.elapsed().as_secs_f64(),
    );
    let (s1, _, _) = status_timed(kit, &agent.socket)?;
    if u(&s1["agent"]["peers"]["tracked"]) != n as u64 {
        return Err(format!(
            "{} of {n} programs still tracked after the idle window",
            u(&s1["agent"]["peers"]["tracked"])
        ));
    }
    // The second status call itself is one wake-up more.
    let wakeups = u(&s1["agent"]["wakeups"]).saturating_sub(u(&s0["agent"]["wakeups"]) + 1);

    // status --json, timed.
    let cs0 = cpu_secs(apid);
    let mut times = Vec::with_capacity(cli.calls);
    let mut bytes = 0;
    for _ in 0..cli.calls.max(1) {
        let (s, took, b) = status_timed(kit, &agent.socket)?;
        let listed = s["processes"].as_array().map_or(0, |p| p.len());
        if listed != n {
            return Err(format!("status lists {listed} processes, not {n}"));
        }
        times.push(took.as_secs_f64());
        bytes = b;
    }
    let status_cpu_ms = (cpu_secs(apid) - cs0) * 1000.0 / times.len() as f64;
    times.sort_by(f64::total_cmp);
    drop(programs);
    Ok(Row {
        clients: n,
        tracked_secs,
        idle_secs,
        ramp_cpu_secs,
        status_median_secs: times[times.len() / 2],
        status_max_secs: *times.last().unwrap(),
        status_min_secs: times[0],
        status_cpu_ms,
        status_bytes: bytes,
        idle_cpu_pct: (c1 - c0) * 100.0 / secs,
        idle_wakeups_per_s: wakeups as f64 / secs,
        idle_ctxsw_per_s: cost::rate(x0, x1, secs),
        idle_wakes_sent: u(&s1["agent"]["wakes"]).saturating_sub(u(&s0["agent"]["wakes"])),
        rss_kib: u(&s1["agent"]["rss_kib"]),
        fds: u(&s1["agent"]["fds"]),
    })
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "clients  tracked_s  idle_s  ramp_cpu_s  status_med_s  status_max_s  cpu/status_ms  reply_KiB  idle_cpu%  wakeups/s  ctxsw/s  wakes  rss_MiB   fds\n",
    );
    for r in rows {
        s += &format!(
            "{:>7}  {:>9.1}  {:>6.1}  {:>10.2}  {:>12.3}  {:>12.3}  {:>13.1}  {:>9.0}  {:>9.2}  {:>9.1}  {:>7.1}  {:>5}  {:>7.1}  {:>4}\n",
            r.clients,
            r.tracked_secs,
            r.idle_secs,
            r.ramp_cpu_secs,
            r.status_median_secs,
            r.status_max_secs,
            r.status_cpu_ms,
            r.status_bytes as f64 / 1024.0,
            r.idle_cpu_pct,
            r.idle_wakeups_per_s,
            r.idle_ctxsw_per_s,
            r.idle_wakes_sent,
            r.rss_kib as f64 / 1024.0,
            r.fds
        );
    }
    s
}

fn run(cli: &Cli) -> Result<ExitCode, String> {
    // A descriptor or two per simulated program.
    if let Err(e) = ksmplus_common::sys::raise_nofile() {
        eprintln!("ksmplus-bench agent-scale: cannot raise the open-file limit: {e}");
    }
    let kit = Kit::new(cli)?;
    let load0 = session::loadavg();
    eprintln!(
        "ksmplus-bench agent-scale — {}, load average {load0}\nagent {} as {}; {} status calls and a {} s idle window per count; programs: {COMM} (1 × {} MiB of unique pages, then blocked in poll)",
        session::machine(),
        kit.agent.display(),
        kit.uid.map_or("yourself".into(), |u| format!("uid {u}")),
        cli.calls,
        cli.idle_secs,
        cli.mib,
    );
    let mut rows = Vec::new();
    for &n in &cli.counts {
        let t = Instant::now();
        let r = measure(&kit, cli, n)?;
        eprintln!(
            "[{n} clients, {:.0} s] status median {:.3} s max {:.3} s; idle CPU {:.2} %, {:.1} wake-ups/s",
            t.elapsed().as_secs_f64(),
            r.status_median_secs,
            r.status_max_secs,
            r.idle_cpu_pct,
            r.idle_wakeups_per_s
        );
        rows.push(r);
    }
    let load1 = session::loadavg();
    let mut text = format!(
        "ksmplus-bench agent-scale — {} — load average before {load0}, after {load1}\n",
        session::machine()
    );
    text += &format!(
        "each count: a fresh agent (default policy, track = [\"{COMM}\"]) as {}, N programs under the shim \
         holding {} MiB of unique pages each and blocked in poll; figures once every program is tracked \
         and the engine idle; idle window {} s; {} calls of `ksmplusctl status --json` (wall time, exec included)\n\n",
        kit.uid.map_or("the calling user".into(), |u| format!("uid {u}")),
        cli.mib,
        cli.idle_secs,
        cli.calls
    );
    text += &table(&rows);
    if let Some(r) = rows.iter().find(|r| r.clients == 1000) {
        let v = |x: f64| if x <= TARGET_S { "PASS" } else { "FAIL" };
        text += &format!(
            "\ntarget (issue 11 #4): status --json <= {TARGET_S} s at 1000 clients: median {} ({:.3} s), max {} ({:.3} s)\n",
            v(r.status_median_secs),
            r.status_median_secs,
            v(r.status_max_secs),
            r.status_max_secs
        );
    }
    print!("{text}");
    if let Some(p) = &cli.json_out {
        let out = Output {
            date: session::date(),
            kernel: session::kernel(),
            loadavg_before: load0,
            loadavg_after: load1,
            uid: kit.uid.unwrap_or_else(|| {
                // SAFETY: getuid has no preconditions.
                unsafe { libc::getuid() }
            }),
            calls: cli.calls,
            window_secs: cli.idle_secs,
            mib_per_program: cli.mib,
            rows: &rows,
        };
        let json = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
        std::fs::write(p, json).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
