//! What every desktop cell of a run shares: the run's context, ksmd's switch, and the user
//! side of a scenario.

use super::scenario::Scenario;
use super::user::UserSide;
use super::x11::Desktop;
use crate::approach::Tools;
use crate::sys;
use ksmplus_common::ksm;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> &'static Path {
    Path::new("/")
}

pub fn set(name: &str, value: &str) -> Result<(), String> {
    ksm::write_sysfs(root(), name, value).map_err(|e| format!("ksm {name}={value}: {e}"))
}

/// `--long-run SECS --turn-every SECS --sample-every SECS`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LongCfg {
    pub secs: f64,
    pub turn_every: f64,
    pub sample_every: f64,
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
    /// smart_scan for every approach (`--ksmd-defaults`: the kernel's default).
    pub smart_scan_all: bool,
    /// `(pages_shared, pages_sharing, general_profit)` before the first cell. ksmd drops the
    /// rmap items of an exited process later than its pages, so `general_profit` shows them.
    pub baseline: (i64, i64, i64),
    pub min_secs: f64,
    pub stable_secs: f64,
    pub deadline_secs: f64,
    /// The steady window after convergence (0: none).
    pub steady_secs: f64,
    /// How long after convergence the steady window starts.
    pub steady_after: f64,
    /// A control group beside the programs when the cell has a steady window (`--no-control`
    /// turns it off); see [`Ctx::wants_control`].
    pub control: bool,
    /// The long run after ksmd's start (`--long-run`), when asked for.
    pub long_run: Option<LongCfg>,
    /// Run `ksmplusctl scan` in this cell (once per scenario), when the subcommand exists.
    pub scan: bool,
    /// The unprivileged user of the browser scenarios, when the run has any.
    pub user: Option<&'a UserSide>,
}

impl Ctx<'_> {
    /// Whether a cell of `sc` gets a control group: only with a steady window to measure, and
    /// only for scenarios of root — a browser's second instance would share the user's profile
    /// and processes, so D5/D6 keep the `none` cell as their reference.
    pub fn wants_control(&self, sc: &Scenario) -> bool {
        // A long run has no steady window (its options conflict).
        self.control && self.steady_secs > 0.0 && !sc.user
    }
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

/// The user side when the scenario runs as the unprivileged user.
pub fn user_of<'a>(ctx: &Ctx<'a>, sc: &Scenario) -> Result<Option<&'a UserSide>, String> {
    match (sc.user, ctx.user) {
        (false, _) => Ok(None),
        (true, Some(u)) => Ok(Some(u)),
        (true, None) => Err(format!(
            "{} runs as the unprivileged user, which is not set up",
            sc.id
        )),
    }
}

/// `ksmplusctl --json status` of the cell's agent (as the agent's user).
pub fn agent_status(
    ctx: &Ctx,
    user: Option<&UserSide>,
    socket: &Path,
    notes: &mut Vec<String>,
) -> Option<Value> {
    let mut cmd = match user {
        Some(u) => u.ctl()?,
        None => Command::new(ctx.ctl.as_ref()?),
    };
    cmd.arg("--socket").arg(socket).args(["--json", "status"]);
    json_out(&mut cmd, "ksmplusctl status: unparsable reply", notes)
}

/// What `cmd` prints on stdout, as JSON; `None` when it cannot run, or with a note (`what:
/// error`) when its output is not JSON.
pub fn json_out(cmd: &mut Command, what: &str, notes: &mut Vec<String>) -> Option<Value> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(format!("{what}: {e}"));
            None
        }
    }
}
