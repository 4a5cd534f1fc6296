//! Shared by the `agent_*` end-to-end tests: runs the real `ksmplus-agentd` on a private socket
//! and policy, talks to it with the real `ksmplusctl`, and waits on conditions with deadlines.
#![allow(dead_code)]
use ksmplus_tests::{compile, Interactive, ShimMode};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Policy used by most tests: fast rounds, the workload tracked by name. The tests count the
/// workload's own buffers (MiBs) exactly, so mappings under 1 MiB (the small heap, `.data`
/// and `.bss`, whose pages are real duplicates between two runs of one program) are left out.
pub const FAST_POLICY: &str = r#"
track = ["agent_work"]
min_region_bytes = 1048576
[sampling]
round_interval_ms = 200
# The workloads memset their buffers before writing them: a recheck sooner than the fill takes
# sees pages still zero twice and marks them (the kernel feedback unmarks them later), which the
# exact counts below do not expect.
first_recheck_ms = 200
unmerge_after_full_scans = 3
"#;

pub use ksmplus_tests::target_bin as bin;

/// A running `ksmplus-agentd` on a private socket, killed (SIGTERM) on drop.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub policy: PathBuf,
    pub child: Option<Child>,
    log: PathBuf,
    /// The agent, `ksmplusctl` and the workloads run as this uid ([`Agent::start_as`]).
    uid: Option<u32>,
}

impl Agent {
    pub fn start(policy: &str) -> Agent {
        Agent::start_as(policy, None)
    }

    /// [`Agent::start`] with the agent, every `ksmplusctl` call and every [`Agent::workload`]
    /// run as `uid` (needs root), from copies in the agent's world-readable directory: the
    /// per-user daemon as users run it, whose `/proc` reads and channel writes pass the
    /// kernel's checks for an ordinary user (the other tests run everything as root). Its uid
    /// has no other processes, so even a `track_all` policy meets only the test's programs.
    pub fn start_as(policy: &str, uid: Option<u32>) -> Agent {
        let dir = ksmplus_tests::temp_dir("ksmplus-agent-test");
        let socket = dir.path().join("run/agent.sock");
        let policy_path = dir.path().join("config/policy.toml");
        std::fs::create_dir_all(policy_path.parent().unwrap()).unwrap();
        std::fs::write(&policy_path, policy).unwrap();
        if let Some(uid) = uid {
            use std::os::unix::fs::PermissionsExt;
            let d = dir.path();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            for sub in ["run", "state", "bin"] {
                std::fs::create_dir_all(d.join(sub)).unwrap();
                std::os::unix::fs::chown(d.join(sub), Some(uid), Some(uid)).unwrap();
            }
            for (name, from) in [
                ("ksmplus-agentd", bin("ksmplus-agentd")),
                ("ksmplusctl", bin("ksmplusctl")),
                ("libksmplus.so", ksmplus_tests::shim_lib()),
            ] {
                std::fs::copy(from, d.join("bin").join(name)).unwrap();
            }
        }
        let mut a = Agent {
            log: dir.path().join("agent.log"),
            dir,
            socket,
            policy: policy_path,
            child: None,
            uid,
        };
        a.spawn();
        a
    }

    /// A workspace binary (or the shim): the copy the agent's uid can run, or the build's.
    fn tool(&self, name: &str) -> PathBuf {
        match self.uid {
            Some(_) => self.dir.path().join("bin").join(name),
            None if name == "libksmplus.so" => ksmplus_tests::shim_lib(),
            None => bin(name),
        }
    }

    /// Runs `cmd` as the agent's uid, if it has one.
    fn as_user<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        if let Some(uid) = self.uid {
            std::os::unix::process::CommandExt::uid(cmd, uid);
            std::os::unix::process::CommandExt::gid(cmd, uid);
        }
        cmd
    }

    /// Starts (again) the agent process on the same socket and policy.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(self.tool("ksmplus-agentd"));
        self.as_user(&mut cmd)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--policy")
            .arg(&self.policy)
            .arg("--state")
            .arg(self.dir.path().join("state/learned"))
            .arg("-vv")
            .env_remove("KSMPLUS_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // The agent may be a copy just made (start_as): see spawn_retrying.
        let child = ksmplus_tests::process::spawn_retrying(&mut cmd).expect("spawn ksmplus-agentd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.try_ctl(&["--json", "status"]).map(|o| o.status.code()) != Some(Some(0)) {
            assert!(
                Instant::now() < deadline,
                "agent did not answer within 20 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The agent process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` and waits for the exit.
    pub fn stop(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
        }
    }

    fn try_ctl(&self, args: &[&str]) -> Option<Output> {
        self.as_user(&mut Command::new(self.tool("ksmplusctl")))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .ok()
    }

    /// Runs `ksmplusctl --socket S ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.try_ctl(args).expect("run ksmplusctl")
    }

    /// `ksmplusctl status --json`, parsed.
    pub fn status(&self) -> Value {
        let o = self.ctl(&["status", "--json"]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "status failed: {text} {}\nagent log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status --json: {e}: {text}"))
    }

    /// The status entry of process `pid`, if the agent tracks it.
    pub fn process(&self, pid: u32) -> Option<Value> {
        self.status()["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"].as_u64() == Some(pid as u64))
            .cloned()
    }

    /// Polls `f` on the status until it returns `Some`, or panics after `timeout` naming `what`.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Value) -> Option<T>,
    ) -> T {
        /// The last status and the agent's log tail, read only when the wait fails.
        struct Last<'a>(&'a Agent, Value);
        impl std::fmt::Display for Last<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "status:\n{}\nagent log tail:\n{}",
                    serde_json::to_string_pretty(&self.1).unwrap(),
                    tail(&self.0.log(), 3000)
                )
            }
        }
        ksmplus_tests::poll_until(what, timeout, Duration::from_millis(100), || {
            let s = self.status();
            f(&s).ok_or(Last(self, s))
        })
    }

    pub fn shim(&self) -> ShimMode {
        ShimMode::On {
            socket: self.socket.clone(),
        }
    }

    /// Runs `agent_work ARGS` (under the name `name`) under the shim, returning it and its line.
    pub fn workload(&self, name: &str, args: &[&str]) -> (Interactive, String) {
        let mut exe = workload_named(name);
        if self.uid.is_some() {
            let copy = self.dir.path().join("bin").join(name);
            if !copy.is_file() {
                std::fs::copy(&exe, &copy).unwrap();
            }
            exe = copy;
        }
        self.run_under_shim(&exe, args)
    }

    /// Runs the program `exe ARGS` under the shim (as the agent's uid, if it has one),
    /// returning it and its first line.
    pub fn run_under_shim(&self, exe: &Path, args: &[&str]) -> (Interactive, String) {
        let mut cmd = Command::new(exe);
        self.shim().apply(&mut cmd, &self.tool("libksmplus.so"));
        self.as_user(&mut cmd).args(args);
        let mut p = Interactive::spawn(&mut cmd);
        let line = p.line(Duration::from_secs(60));
        (p, line)
    }
}

/// An agent on [`FAST_POLICY`] tracking `track` instead of `agent_work`.
pub fn tracking(track: &[&str]) -> Agent {
    let names: Vec<String> = track.iter().map(|n| format!("{n:?}")).collect();
    Agent::start(&FAST_POLICY.replace(
        "track = [\"agent_work\"]",
        &format!("track = [{}]", names.join(", ")),
    ))
}

impl Agent {
    /// The test program `src` (tests/c/SRC.c), copied into the agent's directory as `name`:
    /// run under its own name, its comm is exactly what the policy says.
    pub fn program(&self, src: &str, name: &str) -> PathBuf {
        let exe = self.dir.path().join(name);
        std::fs::copy(compile(src), &exe).unwrap();
        exe
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The compiled `agent_work` (cached as `agent_work-HASH`), copied once under the file name `name`
/// so that its comm and exe basename are exactly `name` for the policy.
pub fn workload_named(name: &str) -> PathBuf {
    let exe = compile("agent_work");
    let dir = exe.parent().unwrap().join(format!(
        "named-{}",
        exe.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    if !out.is_file() {
        let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
        std::fs::copy(&exe, &tmp).unwrap();
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// The status entry of process `pid` in a status reply.
pub fn find(s: &Value, pid: u32) -> Option<&Value> {
    s["processes"]
        .as_array()?
        .iter()
        .find(|p| p["pid"].as_u64() == Some(pid as u64))
}

/// ksmd's `/sys/kernel/mm/ksm/full_scans`.
pub fn full_scans() -> u64 {
    ksmplus_common::ksm::read_sysfs(Path::new("/"), "full_scans").unwrap_or(0) as u64
}

/// CPU time (user + system) of a process, milliseconds.
pub fn cpu_ms(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(i) = s.rfind(')') else { return 0 };
    let f: Vec<&str> = s[i + 2..].split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let t: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    t * 1000 / hz
}

/// The pid of the ksmd kernel thread, if any.
pub fn ksmd_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "ksmd").then_some(pid)
    })
}

/// Prints a figure line for the notes (shown with `--nocapture`).
pub fn figure(what: &str, v: impl std::fmt::Display) {
    eprintln!("FIGURE {what}: {v}");
}

impl Agent {
    /// Restarts the agent with `key` in its learned store (`--state`): as if an earlier run had
    /// learned that this executable (plus the names of its `--flags`) is a fork server whose
    /// sandboxed children refuse marks.
    pub fn learn_fork_server(&mut self, key: &str) {
        self.stop(libc::SIGTERM);
        let path = self.dir.path().join("state/learned");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("{key}\n")).unwrap();
        self.spawn();
    }
}
