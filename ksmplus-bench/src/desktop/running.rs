//! A cell's programs while they run: started under the approach's launcher (as the
//! unprivileged user for the browsers), waited for until ready, read like a user would, their
//! processes found and ended.

use super::procs::{self, ppid, zombie};
use super::scenario::{Program, Ready};
use super::user::UserSide;
use super::x11::{self, Desktop};
use crate::approach::Launch;
use crate::sys;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment of every program: a private home and runtime dir, no accessibility bus,
/// and a dead proxy so nothing reaches the network. Sandboxes stay on (WebKit's bubblewrap,
/// Firefox's and Chromium's seccomp and namespaces) under every approach.
pub fn base_env(home: &Path, run: &Path) -> Vec<(String, String)> {
    [
        ("HOME", home.display().to_string()),
        ("XDG_RUNTIME_DIR", run.display().to_string()),
        ("NO_AT_BRIDGE", "1".into()),
        ("GTK_A11Y", "none".into()),
        ("GSETTINGS_BACKEND", "memory".into()),
        ("http_proxy", "http://127.0.0.1:9".into()),
        ("https_proxy", "http://127.0.0.1:9".into()),
        ("QT_QPA_PLATFORM", "xcb".into()),
        ("LANG", "C.UTF-8".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A started program.
pub struct Running {
    pub child: Child,
    pub spawned: Instant,
}

/// Starts a program under the approach's launcher (environment, `prctl` before exec); as the
/// unprivileged user when `user` is given (with a clean environment and the user's bus).
pub fn spawn(
    desktop: &Desktop,
    p: &Program,
    launch: &Launch,
    home: &Path,
    run: &Path,
    log: &Path,
    user: Option<&UserSide>,
) -> Result<Running, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let home_s = home.display().to_string();
    let mut cmd = Command::new(&p.argv[0]);
    cmd.args(
        p.argv[1..]
            .iter()
            .map(|a| a.replace(super::scenario::HOME, &home_s)),
    );
    match user {
        Some(u) => {
            cmd.env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("USER", &u.user.name)
                .env("LOGNAME", &u.user.name)
                .envs(desktop.env_with(u.bus.as_ref()));
            u.user.apply(&mut cmd);
        }
        None => {
            cmd.env_remove("LD_PRELOAD")
                .env_remove("KSMPLUS_SOCKET")
                .envs(desktop.env());
        }
    }
    cmd.envs(base_env(home, run))
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    // After base_env: the approach's variables win.
    launch.apply(&mut cmd);
    let spawned = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", p.argv[0]))?;
    Ok(Running { child, spawned })
}

/// Waits for the first window (returns the start-up time), then for readiness.
pub fn wait_ready(
    desktop: &Desktop,
    p: &Program,
    r: &mut Running,
    deadline: Duration,
) -> Result<(f64, f64), String> {
    let pid = r.child.id();
    let end = r.spawned + deadline;
    let mut startup = None;
    loop {
        if let Ok(Some(st)) = r.child.try_wait() {
            return Err(format!("{} exited during start-up ({st})", p.label));
        }
        let wins = desktop.windows_of(pid);
        if !wins.is_empty() {
            let t = *startup.get_or_insert_with(|| r.spawned.elapsed().as_secs_f64());
            let ready = match &p.ready {
                Ready::Window => true,
                Ready::Title(s) => wins.iter().any(|&w| desktop.window_name(w).contains(s)),
            };
            if ready {
                return Ok((t, r.spawned.elapsed().as_secs_f64()));
            }
        }
        if Instant::now() >= end {
            return Err(format!(
                "{}: {} after {:.0} s",
                p.label,
                if startup.is_some() {
                    "window appeared but never got ready"
                } else {
                    "no window"
                },
                deadline.as_secs_f64()
            ));
        }
        sys::sleep_checked(Duration::from_millis(50))?;
    }
}

/// Presses `n` keys of the program's cycle to its main window; true when the content changed.
pub fn read_like_a_user(desktop: &Desktop, p: &Program, pid: u32, n: usize, from: usize) -> bool {
    let Some(w) = desktop.main_window(pid) else {
        return false;
    };
    desktop.focus(w);
    std::thread::sleep(Duration::from_millis(150));
    let before = desktop.capture(w).map(|b| x11::digest(&b));
    for i in 0..n {
        desktop.key(p.keys[(from + i) % p.keys.len()]);
        std::thread::sleep(Duration::from_millis(200));
    }
    if changed(desktop, w, &before) {
        return true;
    }
    // At the end of the document (or page) the keys change nothing: back to its start.
    p.rewind.is_some_and(|k| {
        desktop.key(k);
        changed(desktop, w, &before)
    })
}

/// Whether window `w` shows something else than `before` (a digest) now, looking a few times:
/// rendering may lag behind a key.
fn changed(desktop: &Desktop, w: u64, before: &Option<u64>) -> bool {
    for _ in 0..10 {
        let after = desktop.capture(w).map(|b| x11::digest(&b));
        if after.is_some() && after != *before {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

/// Ends every process `list` names (asked again after SIGTERM: children may have appeared).
pub fn stop_all(list: &dyn Fn() -> BTreeSet<u32>) {
    let pids = list();
    for &p in &pids {
        sys::kill(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && pids.iter().any(|&p| sys::pid_alive(p) && !zombie(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &p in list().iter().chain(pids.iter()) {
        sys::kill(p, libc::SIGKILL);
    }
}

/// The processes of a cell, each with the index of its program: the programs and their
/// descendants; for a scenario of the user also the processes of the user that did not exist
/// at the cell's start (`before`), run an executable from a program's own directory (crash
/// handlers re-parent to init: `/usr/lib/firefox-esr/crashhelper`) and are not the agent's
/// (`exclude`). Services the user's bus activates (at-spi) are not the programs'.
pub fn cell_procs(
    user: Option<&UserSide>,
    roots: &[u32],
    before: &BTreeSet<u32>,
    exclude: &[u32],
) -> BTreeMap<u32, usize> {
    let mut m = procs::trees(roots);
    let Some(u) = user else {
        return m;
    };
    let mut not_ours: BTreeSet<u32> = procs::trees(exclude).into_keys().collect();
    not_ours.extend(u.bus.as_ref().map(|b| b.pid()));
    not_ours.extend(procs::trees(&u.bus.iter().map(|b| b.pid()).collect::<Vec<_>>()).into_keys());
    let dir = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
    };
    let root_dirs: Vec<Option<PathBuf>> = roots.iter().map(|&r| dir(r)).collect();
    for pid in u.user.pids() {
        if before.contains(&pid) || not_ours.contains(&pid) || m.contains_key(&pid) {
            continue;
        }
        let d = dir(pid);
        if let Some(i) = root_dirs.iter().position(|r| r.is_some() && *r == d) {
            m.insert(pid, i);
        }
    }
    m
}

/// Whatever else of the user a cell started (a service the user's bus activated for the
/// browser): every process of the user that is new since `before`, the bus and its
/// activation helpers excepted.
pub fn leftovers(u: &UserSide, before: &BTreeSet<u32>) -> BTreeSet<u32> {
    let bus: BTreeSet<u32> = u.bus.iter().map(|b| b.pid()).collect();
    u.user
        .pids()
        .into_iter()
        .filter(|p| !before.contains(p) && !bus.contains(p) && !bus.contains(&ppid(*p)))
        .collect()
}
