//! The unprivileged user the browser scenarios run as, and what runs as that user beside them.
//!
//! Chromium refuses to run its sandbox as root, and a browser's sandbox is part of what D5/D6
//! measure, so their programs run as a dedicated system user (`--browser-user`, default
//! `ksmplus-bench`; created with `useradd --system` when missing and kept for later runs). Under
//! ksmplus the agent runs as that same user, as a user's agent would: the shim's Hello and the
//! agent's reads of `/proc/PID/{maps,mem}` are same-user operations, and `ksmplusctl` only talks
//! to an agent of its own uid (or root's).
//!
//! Invariants:
//! - what the user must run (the agent, `ksmplusctl`) is a copy in `TMP/user/bin` (mode 0755),
//!   and each path the user needs is checked by running `test` as the user: a checkout under a
//!   root-only directory fails early with a message, not in a browser's log;
//! - the shim of every shim cell (root's programs too) is a copy installed for the run in
//!   `/usr/local/lib/ksmplus-bench-PID/`: WebKit's and Firefox's sandboxes bind `/usr/local/lib`
//!   but not `/tmp` or a home, so a web process exec'd inside bubblewrap can still load it (the
//!   documented install location is `/usr/local/lib`, docs/DESKTOP.md). The directory is removed
//!   when the run ends, however it unwinds ([`ShimInstall`]'s `Drop`);
//! - the user's processes of a cell are those that did not exist when the cell started, minus
//!   the run's session bus and what it activated: ended by pid, never by uid.

use crate::approach::{Agent, Launch, Unavailable};
use crate::sys;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// This run created the account.
    pub created: bool,
}

/// `(uid, gid)` of a user name, from the passwd database.
fn lookup(name: &str) -> Option<(u32, u32)> {
    let out = Command::new("getent")
        .args(["passwd", name])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<&str> = line.trim().split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

impl User {
    /// The user `name`, created as a system account without a home when it does not exist.
    pub fn ensure(name: &str) -> Result<User, String> {
        if let Some((uid, gid)) = lookup(name) {
            if uid == 0 {
                return Err(format!(
                    "--browser-user {name} is root: browsers must run unprivileged"
                ));
            }
            return Ok(User {
                name: name.into(),
                uid,
                gid,
                created: false,
            });
        }
        let st = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "ksmplus-bench desktop: browsers run as this user",
                name,
            ])
            .stdin(Stdio::null())
            .status()
            .map_err(|e| {
                format!("useradd {name}: {e} (create the user, or pass --browser-user)")
            })?;
        let (uid, gid) = lookup(name)
            .filter(|_| st.success())
            .ok_or_else(|| format!("useradd {name} failed ({st})"))?;
        Ok(User {
            name: name.into(),
            uid,
            gid,
            created: true,
        })
    }

    /// Runs `cmd` as this user (std drops root's supplementary groups with the uid).
    pub fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid);
    }

    /// `chown -R` to this user.
    pub fn chown(&self, path: &Path) -> Result<(), String> {
        let st = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.uid, self.gid))
            .arg(path)
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("chown -R {} {} failed", self.name, path.display()))
        }
    }

    /// True when this user can `test OP path` (e.g. `-x` for a program, `-r` for a file).
    pub fn can(&self, op: &str, path: &Path) -> bool {
        let mut c = Command::new("test");
        c.arg(op)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.apply(&mut c);
        c.status().is_ok_and(|s| s.success())
    }

    /// Every process whose real uid is this user's.
    pub fn pids(&self) -> BTreeSet<u32> {
        sys::pids()
            .filter(|&p| real_uid(p) == Some(self.uid))
            .collect()
    }
}

/// The real uid of a process (`/proc/PID/status`; `/proc/PID` itself is root's when the process
/// is not dumpable, as sandboxed renderers are).
pub fn real_uid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A directory this run made and removes when dropped.
pub struct ShimInstall {
    dir: PathBuf,
    pub so: PathBuf,
}

impl ShimInstall {
    /// Copies the shim to `/usr/local/lib/ksmplus-bench-PID/` (mode 0644 in a 0755 directory).
    pub fn new(src: &Path) -> Result<ShimInstall, String> {
        let dir = PathBuf::from(format!(
            "/usr/local/lib/ksmplus-bench-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let g = ShimInstall {
            so: dir.join("libksmplus.so"),
            dir,
        };
        std::fs::set_permissions(&g.dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        std::fs::copy(src, &g.so).map_err(|e| format!("{}: {e}", g.so.display()))?;
        std::fs::set_permissions(&g.so, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;
        Ok(g)
    }
}

impl Drop for ShimInstall {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A copy of `src` in `dir`, both mode 0755.
pub fn copy_exec(src: &Path, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let name = src.file_name().ok_or("no file name")?;
    let dst = dir.join(name);
    std::fs::copy(src, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    Ok(dst)
}

/// What the user side of a run holds: the user, its copies of the tools, the agent's learned
/// store (kept across the cells of the run), the home every cell of theirs copies.
pub struct UserSide {
    pub user: User,
    pub agent: Option<PathBuf>,
    pub ctl: Option<PathBuf>,
    /// `--state` of every agent of the user's cells: what one cell (the learning run) learns,
    /// the next one uses.
    pub state: PathBuf,
    pub home_template: PathBuf,
    /// The user's session bus (root's bus refuses other users), `DBUS_SESSION_BUS_ADDRESS`.
    pub bus: Option<super::x11::Bus>,
}

impl UserSide {
    /// Prepares `tmp/user`: the tool copies, the state directory and the home template; checks
    /// the user can read the browsers' pages (`tmp/web`) and run the agent.
    pub fn new(
        user: User,
        tmp: &Path,
        agent: Option<&Path>,
        ctl: Option<&Path>,
    ) -> Result<UserSide, String> {
        let base = tmp.join("user");
        std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        for d in [tmp, base.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let bin = base.join("bin");
        let agent = agent.map(|a| copy_exec(a, &bin)).transpose()?;
        let ctl = ctl.map(|c| copy_exec(c, &bin)).transpose()?;
        let state_dir = base.join("state");
        let home_template = base.join("home-template");
        for d in [&state_dir, &home_template] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            user.chown(d)?;
        }
        let page = tmp.join("web").join(super::pages::PAGES[0].0);
        if !user.can("-r", &page) {
            return Err(format!(
                "user {} cannot read {} (is a directory above it closed to others? TMPDIR?)",
                user.name,
                page.display()
            ));
        }
        if let Some(a) = &agent {
            if !user.can("-x", a) {
                return Err(format!(
                    "user {} cannot run {} (is a directory above it closed to others? TMPDIR?)",
                    user.name,
                    a.display()
                ));
            }
        }
        let bus = super::x11::Bus::start(Some((user.uid, user.gid)));
        Ok(UserSide {
            user,
            agent,
            ctl,
            state: state_dir.join("learned"),
            home_template,
            bus,
        })
    }

    /// The fork servers the agent learned so far (lines of the state file).
    pub fn learned(&self) -> Vec<String> {
        std::fs::read_to_string(&self.state)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    /// A ksmplus launcher whose agent runs as the user, with its socket in a directory the
    /// user owns (mode 0700) and the run's learned store.
    pub fn ksmplus(
        &self,
        shim: Option<&Path>,
        tmp: &Path,
        cell: &str,
        policy: &str,
    ) -> Result<Launch, Unavailable> {
        let so = shim.ok_or_else(|| {
            Unavailable("libksmplus.so not found (build: cargo build --release -p ksmplus-preload, or pass --preload)".into())
        })?;
        let bin = self.agent.as_ref().ok_or_else(|| {
            Unavailable("ksmplus-agentd not found (build: cargo build --release -p ksmplus-agentd, or pass --agent)".into())
        })?;
        let agent = self.start_agent(bin, &tmp.join(format!("agent-{cell}")), policy)?;
        Ok(Launch {
            env: vec![
                ("LD_PRELOAD".into(), so.display().to_string()),
                (
                    "KSMPLUS_SOCKET".into(),
                    agent.dir.join("agent.sock").display().to_string(),
                ),
            ],
            prctl_merge_any: false,
            agent: Some(agent),
            must_map: so.file_name().map(|n| n.to_string_lossy().into_owned()),
        })
    }

    fn start_agent(&self, bin: &Path, dir: &Path, policy: &str) -> Result<Agent, Unavailable> {
        let fail = |what: String| Unavailable(format!("agent as {}: {what}", self.user.name));
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let p = dir.join("policy.toml");
        std::fs::write(&p, policy).map_err(|e| fail(format!("{}: {e}", p.display())))?;
        self.user.chown(dir).map_err(fail)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(e.to_string()))?;
        let socket = dir.join("agent.sock");
        let log = File::create(dir.join("agent.log")).map_err(|e| fail(e.to_string()))?;
        let log2 = log.try_clone().map_err(|e| fail(e.to_string()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(&p)
            .arg("--state")
            .arg(&self.state)
            // Its log (kept in the results' logs/) says how each process was found.
            .arg("-v")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", dir)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        self.user.apply(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {}: {e}", bin.display())))?;
        Agent {
            child,
            dir: dir.to_path_buf(),
        }
        .listening(&socket, fail)
    }

    /// `ksmplusctl` as the user (it refuses an agent of another uid, root excepted).
    pub fn ctl(&self) -> Option<Command> {
        let mut c = Command::new(self.ctl.as_ref()?);
        self.user.apply(&mut c);
        c.env_clear().env("PATH", "/usr/bin:/bin");
        Some(c)
    }
}
