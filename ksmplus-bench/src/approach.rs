//! The approaches under comparison, each a launcher: what to set up before the workload starts
//! (environment, a pre-exec `prctl`, an agent) and what to check once it runs.

use crate::sys;
use ksmplus_common::ksm;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Approach {
    /// No KSM at all: nothing is marked mergeable.
    None,
    /// The shim marks every large region MERGEABLE at allocation (`KSMPLUS_MADVISE_ALL=1`).
    MadviseAll,
    /// `prctl(PR_SET_MEMORY_MERGE, 1)`: the kernel scans every anonymous page of the program.
    MergeAny,
    /// `merge_any` with the kernel's `smart_scan=1` (skip pages that did not merge lately).
    SmartScan,
    /// The shim + `ksmplus-agentd` with the default policy and the workload tracked.
    Ksmplus,
}

pub const ALL: &[Approach] = &[
    Approach::None,
    Approach::MadviseAll,
    Approach::MergeAny,
    Approach::SmartScan,
    Approach::Ksmplus,
];

impl Approach {
    pub fn name(self) -> &'static str {
        match self {
            Approach::None => "none",
            Approach::MadviseAll => "madvise-all",
            Approach::MergeAny => "merge_any",
            Approach::SmartScan => "smart_scan",
            Approach::Ksmplus => "ksmplus",
        }
    }

    pub fn parse(s: &str) -> Option<Approach> {
        ALL.iter().copied().find(|a| a.name() == s)
    }

    /// The `smart_scan` tunable during this approach's cells; every other tunable is the same
    /// for all approaches.
    pub fn smart_scan(self) -> bool {
        self == Approach::SmartScan
    }
}

/// Where the shim and the agent are, and how to start the agent.
#[derive(Clone, Debug)]
pub struct Tools {
    pub preload: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    /// The agent's policy file text.
    pub policy: String,
    /// Extra arguments for the agent, after `--socket S --policy P`.
    pub agent_args: Vec<String>,
}

/// The default policy plus the workload tracked (keys of `ksmplus-common/src/policy.rs`);
/// `{comm}` stands for the workload's comm.
pub const DEFAULT_POLICY: &str =
    "# written by ksmplus-bench: the default policy, the workload tracked\ntrack = [\"{comm}\"]\n";

/// How to start a cell's processes, and what runs beside them.
pub struct Launch {
    pub env: Vec<(String, String)>,
    pub prctl_merge_any: bool,
    pub agent: Option<Agent>,
    /// Each workload process must map this file (the shim).
    pub must_map: Option<String>,
}

impl Launch {
    /// Nothing beside the programs and nothing on them: approach `none`, the warm-up, the
    /// desktop's control group.
    pub fn plain() -> Launch {
        Launch {
            env: Vec::new(),
            prctl_merge_any: false,
            agent: None,
            must_map: None,
        }
    }

    /// Puts the launcher on a process about to start: its environment, and for merge_any the
    /// `prctl` between fork and exec.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if self.prctl_merge_any {
            // SAFETY: the closure runs in the child between fork and exec and only makes one
            // async-signal-safe system call. On Linux >= 6.4 (checked on 6.18) the MERGE_ANY flag
            // set here survives exec, so the program itself stays unchanged.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
}

/// A running agent; killed and reaped on drop, its temporary directory removed.
pub struct Agent {
    pub child: Child,
    pub dir: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's own log (stdout and stderr), for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Waits up to 5 s for the agent's `socket`; the agent, or why it is not listening
    /// (through `fail`, which names the agent).
    pub fn listening(
        mut self,
        socket: &Path,
        fail: impl Fn(String) -> Unavailable,
    ) -> Result<Agent, Unavailable> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(fail(format!(
                    "exited ({st}) before creating its socket:\n{}",
                    self.log_tail()
                )));
            }
            if Instant::now() >= deadline || sys::stop_requested() {
                return Err(fail(format!(
                    "no socket at {} after 5 s:\n{}",
                    socket.display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self)
    }

    pub fn stop(&mut self) {
        sys::kill(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Approach {
    /// Checks that the launcher did what it claims in the process `pid` (`who` names it in the
    /// error): it maps the shim where one must be mapped, and the kernel's merge-everything
    /// mode is on exactly under merge_any and smart_scan.
    pub fn check_launched(self, launch: &Launch, pid: u32, who: &str) -> Result<(), String> {
        if let Some(so) = &launch.must_map {
            if !sys::maps_contain(pid, so) {
                return Err(format!("{who} does not map {so}: the shim is not loaded"));
            }
        }
        let st = ksm::read_ksm_stat(Path::new("/"), pid).map_err(|e| e.to_string())?;
        let want = matches!(self, Approach::MergeAny | Approach::SmartScan);
        if st.merge_any != want {
            return Err(format!(
                "{who}: ksm_merge_any is {} but {} needs {want}",
                st.merge_any,
                self.name()
            ));
        }
        Ok(())
    }
}

/// Why an approach cannot run here (reported in its cells, not a failure of the run).
pub struct Unavailable(pub String);

impl Approach {
    /// Prepares a cell: for `ksmplus` this starts a fresh agent with its own socket and policy.
    pub fn launch(self, tools: &Tools, tmp: &Path, cell: &str) -> Result<Launch, Unavailable> {
        let mut l = Launch::plain();
        let preload = || {
            tools.preload.clone().ok_or_else(|| {
                Unavailable("libksmplus.so not found (build: cargo build --release -p ksmplus-preload, or pass --preload)".into())
            })
        };
        match self {
            Approach::None => {}
            Approach::MergeAny | Approach::SmartScan => l.prctl_merge_any = true,
            Approach::MadviseAll => {
                let so = preload()?;
                l.env.push(("LD_PRELOAD".into(), so.display().to_string()));
                l.env.push(("KSMPLUS_MADVISE_ALL".into(), "1".into()));
                // No agent: point the shim at a socket nobody listens on, never a user's agent.
                l.env.push((
                    "KSMPLUS_SOCKET".into(),
                    tmp.join("no-agent.sock").display().to_string(),
                ));
                l.must_map = Some(file_name(&so));
            }
            Approach::Ksmplus => {
                let so = preload()?;
                let agent_bin = tools.agent.clone().ok_or_else(|| {
                    Unavailable("ksmplus-agentd not found (build: cargo build --release -p ksmplus-agentd, or pass --agent)".into())
                })?;
                let agent = start_agent(&agent_bin, tools, tmp, cell)?;
                l.env.push(("LD_PRELOAD".into(), so.display().to_string()));
                l.env.push((
                    "KSMPLUS_SOCKET".into(),
                    agent.dir.join("agent.sock").display().to_string(),
                ));
                l.must_map = Some(file_name(&so));
                l.agent = Some(agent);
            }
        }
        Ok(l)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn start_agent(bin: &Path, tools: &Tools, tmp: &Path, cell: &str) -> Result<Agent, Unavailable> {
    let dir = tmp.join(format!("agent-{cell}"));
    let fail = |what: String| Unavailable(format!("agent: {what}"));
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let policy = dir.join("policy.toml");
    let socket = dir.join("agent.sock");
    std::fs::write(&policy, &tools.policy)
        .map_err(|e| fail(format!("{}: {e}", policy.display())))?;
    let log = File::create(dir.join("agent.log")).map_err(|e| fail(e.to_string()))?;
    let log2 = log.try_clone().map_err(|e| fail(e.to_string()))?;
    let child = Command::new(bin)
        .arg("--socket")
        .arg(&socket)
        .arg("--policy")
        .arg(&policy)
        .args(&tools.agent_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", bin.display())))?;
    Agent { child, dir }.listening(&socket, fail)
}

/// The first existing file among the candidates.
pub fn find_tool(explicit: Option<PathBuf>, name: &str) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.exists().then_some(p);
    }
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            dirs.push(d.to_path_buf());
        }
    }
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        dirs.push(Path::new(&t).join("release"));
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    dirs.push(ws.join("target/release"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.exists())
}
