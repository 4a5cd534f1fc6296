//! `ksmplusctl wrap` / `unwrap` / `wrapped`: start a desktop program from the menu under the shim.
//!
//! `wrap APP` writes, for each matching desktop entry, a user override with the same desktop-file
//! id in `$XDG_DATA_HOME/applications` (which takes precedence over `$XDG_DATA_DIRS`, per the
//! Desktop Entry / Base Directory specifications) whose `Exec` lines run the original command as
//! `env LD_PRELOAD=/abs/libksmplus.so <original command>`.
//!
//! Invariants:
//! - Only files under `$XDG_DATA_HOME` are ever written, renamed or removed.
//! - The override is the base entry byte for byte, except: the value of each `Exec` key in the
//!   `[Desktop Entry]` and `[Desktop Action *]` groups gets our words *prepended* (the original
//!   command text, its quoting and its field codes are kept verbatim; an existing `env` prefix is
//!   merged into, an existing `LD_PRELOAD=` assignment gets our library appended), one line
//!   `X-Ksmplus-Wrapped=true` follows the `[Desktop Entry]` header, and, when the entry has no
//!   `TryExec`, a line `TryExec=<the program Exec runs>` follows the marker (so the override
//!   hides itself once the program is uninstalled, as the system entry would have gone).
//! - The library path is written as found or given, never canonicalised: an installed
//!   `$PREFIX/lib/ksmplus/libksmplus.so` stays that path across upgrades ([`find_lib`]).
//! - The base entry is the one the menu would use without us: an existing user override (moved to
//!   `$XDG_DATA_HOME/ksmplus/backup/applications/<id>` by rename, so `unwrap` puts back exactly
//!   that file), else the first entry with that id in `$XDG_DATA_DIRS`. Wrapping again rebuilds
//!   from the base, so wrap twice = wrap once (and a new `--lib` replaces the old one).
//! - `unwrap` only touches overrides carrying the marker: it renames the backup back, or deletes
//!   the override when there was none.
//! - `DBusActivatable=true` entries are refused: launchers start them through D-Bus, never through
//!   `Exec`, so a wrapped `Exec` would look wrapped and not be.
//! - `Hidden=true` means deleted (spec): such an entry is not wrapped.
mod entry;

use entry::{exec_program, get, is_true, is_wrapped, wrap_entry, MARKER_KEY};

use crate::output::{exit, fail, hint, print_json};
use ksmplus_common::paths::XdgData;
use ksmplus_common::status::{
    DesktopOutcome, DesktopReply, WrappedEntry, WrappedReply, REPLY_VERSION,
};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// The XDG directories used for lookup and writing, and where `wrap` puts what.
#[derive(Clone, Debug)]
pub struct Xdg(pub XdgData);

impl std::ops::Deref for Xdg {
    type Target = XdgData;
    fn deref(&self) -> &XdgData {
        &self.0
    }
}

impl Xdg {
    /// From the environment, with the specification's defaults.
    pub fn from_env() -> Result<Xdg, String> {
        XdgData::from_env().map(Xdg)
    }

    pub fn user_apps(&self) -> PathBuf {
        self.data_home.join("applications")
    }

    pub fn backup_dir(&self) -> PathBuf {
        self.data_home.join("ksmplus/backup/applications")
    }
}

/// Why a wrap or unwrap did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn ioe(path: &Path) -> impl FnOnce(io::Error) -> DesktopError + '_ {
    move |source| DesktopError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Every `*.desktop` under `apps`, by desktop-file id (relative path with `/` → `-`).
fn entries_in(apps: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for p in ksmplus_common::fsutil::files_under(apps, true) {
        if p.extension().is_some_and(|x| x == "desktop") {
            if let Ok(rel) = p.strip_prefix(apps) {
                let id = rel.to_string_lossy().replace('/', "-");
                out.insert(id, p);
            }
        }
    }
    out
}

/// One desktop-file id with the files that define it, most important first.
#[derive(Clone, Debug)]
pub struct Found {
    pub id: String,
    /// The user override in `$XDG_DATA_HOME/applications`, if any.
    pub user: Option<PathBuf>,
    /// The first system file (from `$XDG_DATA_DIRS`), if any.
    pub system: Option<PathBuf>,
}

/// Every desktop-file id visible in the XDG directories.
pub fn all_entries(xdg: &Xdg) -> BTreeMap<String, Found> {
    let mut out: BTreeMap<String, Found> = BTreeMap::new();
    for (id, p) in entries_in(&xdg.user_apps()) {
        out.insert(
            id.clone(),
            Found {
                id,
                user: Some(p),
                system: None,
            },
        );
    }
    for d in &xdg.data_dirs {
        for (id, p) in entries_in(&d.join("applications")) {
            let f = out.entry(id.clone()).or_insert(Found {
                id,
                user: None,
                system: None,
            });
            if f.system.is_none() {
                f.system = Some(p);
            }
        }
    }
    out
}

impl Found {
    /// The entry the menu would use without ksmplus, and where it lives: the backup of a
    /// user override we replaced, the user override, or the system file.
    pub fn base(&self, xdg: &Xdg) -> Option<PathBuf> {
        if let Some(u) = &self.user {
            match std::fs::read_to_string(u) {
                Ok(t) if is_wrapped(&t) => {
                    let b = xdg.backup_dir().join(&self.id);
                    if b.exists() || b.is_symlink() {
                        return Some(b);
                    }
                }
                _ => return Some(u.clone()),
            }
        }
        self.system.clone()
    }
}

/// The ids `app` names: an id (`org.kde.okular` or `org.kde.okular.desktop`) if one exists,
/// else every entry whose `Exec` program (its base entry's) has that file name.
pub fn resolve(xdg: &Xdg, app: &str) -> Vec<Found> {
    let all = all_entries(xdg);
    let id = if app.ends_with(".desktop") {
        app.to_owned()
    } else {
        format!("{app}.desktop")
    };
    if let Some(f) = all.get(&id) {
        return vec![f.clone()];
    }
    // By program name, deleted (Hidden=true) entries are not candidates.
    all.into_values()
        .filter(|f| {
            let Some(t) = f.base(xdg).and_then(|p| std::fs::read_to_string(p).ok()) else {
                return false;
            };
            !is_true(get(&t, "Desktop Entry", "Hidden"))
                && get(&t, "Desktop Entry", "Exec")
                    .and_then(|e| exec_program(&e))
                    .is_some_and(|p| p == app)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Doing it

/// What `wrap` or `unwrap` did to one id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Wrapped { id: String, path: PathBuf },
    Unchanged { id: String, path: PathBuf },
    Refused { id: String, why: String },
    Restored { id: String, path: PathBuf },
    Removed { id: String, path: PathBuf },
    NotWrapped { id: String },
}

fn write_atomic(path: &Path, text: &str) -> Result<(), DesktopError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(ioe(dir))?;
    ksmplus_common::fsutil::write_atomic(path, text.as_bytes()).map_err(ioe(path))
}

fn move_file(from: &Path, to: &Path) -> Result<(), DesktopError> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d).map_err(ioe(d))?;
    }
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to).map_err(ioe(to))?;
            std::fs::remove_file(from).map_err(ioe(from))
        }
        Err(e) => Err(DesktopError::Io {
            path: from.to_owned(),
            source: e,
        }),
    }
}

fn under(p: &Path, dir: &Path) -> bool {
    p.starts_with(dir)
}

/// Wraps one id. Only `$XDG_DATA_HOME` is written.
pub fn wrap_one(xdg: &Xdg, f: &Found, lib: &str) -> Result<Outcome, DesktopError> {
    let id = f.id.clone();
    let Some(base) = f.base(xdg) else {
        return Ok(Outcome::Refused {
            id,
            why: "wrapped override without its original (no backup and no system entry); \
                  run `ksmplusctl unwrap` first"
                .into(),
        });
    };
    let base_text = std::fs::read_to_string(&base).map_err(ioe(&base))?;
    let new = match wrap_entry(&base_text, lib) {
        Ok(t) => t,
        Err(why) => return Ok(Outcome::Refused { id, why }),
    };
    let target = xdg.user_apps().join(f.user.as_ref().map_or_else(
        || PathBuf::from(&id),
        |u| {
            u.strip_prefix(xdg.user_apps())
                .map(Path::to_path_buf)
                .unwrap_or_else(|_| PathBuf::from(&id))
        },
    ));
    assert!(under(&target, &xdg.data_home));
    if let Ok(cur) = std::fs::read_to_string(&target) {
        if cur == new {
            return Ok(Outcome::Unchanged { id, path: target });
        }
        if !is_wrapped(&cur) {
            // A user override of their own: keep it, exactly, for unwrap.
            move_file(&target, &xdg.backup_dir().join(&id))?;
        }
    }
    write_atomic(&target, &new)?;
    Ok(Outcome::Wrapped { id, path: target })
}

/// Unwraps one id: the backup back in place, or the override removed.
pub fn unwrap_one(xdg: &Xdg, f: &Found) -> Result<Outcome, DesktopError> {
    let id = f.id.clone();
    let Some(user) = &f.user else {
        return Ok(Outcome::NotWrapped { id });
    };
    let text = std::fs::read_to_string(user).map_err(ioe(user))?;
    if !is_wrapped(&text) {
        return Ok(Outcome::NotWrapped { id });
    }
    assert!(under(user, &xdg.data_home));
    let backup = xdg.backup_dir().join(&id);
    if backup.exists() || backup.is_symlink() {
        move_file(&backup, user)?;
        // Leave no empty ksmplus/backup/applications behind (remove_dir keeps non-empty ones).
        let mut d = Some(xdg.backup_dir());
        while let Some(dir) = d.filter(|d| d.starts_with(xdg.data_home.join("ksmplus"))) {
            if std::fs::remove_dir(&dir).is_err() {
                break;
            }
            d = dir.parent().map(Path::to_path_buf);
        }
        Ok(Outcome::Restored {
            id,
            path: user.clone(),
        })
    } else {
        std::fs::remove_file(user).map_err(ioe(user))?;
        Ok(Outcome::Removed {
            id,
            path: user.clone(),
        })
    }
}

/// The overrides written by `wrap`: (id, path, has a backup).
pub fn wrapped(xdg: &Xdg) -> Vec<(String, PathBuf, bool)> {
    entries_in(&xdg.user_apps())
        .into_iter()
        .filter(|(_, p)| {
            std::fs::read_to_string(p)
                .map(|t| is_wrapped(&t))
                .unwrap_or(false)
        })
        .map(|(id, p)| {
            let b = xdg.backup_dir().join(&id);
            let has = b.exists() || b.is_symlink();
            (id, p, has)
        })
        .collect()
}

/// Where `libksmplus.so` is looked for without `--lib`, most likely first: the installed layout
/// of the prefix this executable is in (`$PREFIX/bin/ksmplusctl` → `$PREFIX/lib/ksmplus/`, also
/// `lib64/` and the multiarch directory), the build tree (`target/release/` holds both), the
/// layout before `make install` existed (`$PREFIX/lib/libksmplus.so`), then `/usr/local`, `/usr`.
pub fn lib_candidates(exe: Option<&Path>) -> Vec<PathBuf> {
    const LIB: &str = "libksmplus.so";
    let multiarch = format!("lib/{}-linux-gnu/ksmplus", std::env::consts::ARCH);
    let mut v = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        if let Some(prefix) = dir.parent() {
            for sub in ["lib/ksmplus", "lib64/ksmplus", &multiarch] {
                v.push(prefix.join(sub).join(LIB));
            }
        }
        v.push(dir.join(LIB));
        if let Some(prefix) = dir.parent() {
            v.push(prefix.join("lib").join(LIB));
        }
    }
    for p in [
        "/usr/local/lib/ksmplus",
        "/usr/lib/ksmplus",
        "/usr/local/lib",
    ] {
        let p = Path::new(p).join(LIB);
        if !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

/// The library `wrap` writes into `LD_PRELOAD=`: `arg` (`--lib`, made absolute, symbolic links
/// kept), else the first of [`lib_candidates`] that exists. Never canonicalised: the path the
/// user or the installation chose is the one that stays valid. Refused when `LD_PRELOAD` could
/// not carry it. The second value is a warning to print, if any.
pub fn find_lib(arg: Option<&Path>) -> Result<(PathBuf, Option<String>), String> {
    let exe = std::env::current_exe().ok();
    let cands = match arg {
        Some(p) => vec![std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))?],
        None => lib_candidates(exe.as_deref()),
    };
    let Some(lib) = cands.iter().find(|c| c.is_file()) else {
        return Err(format!(
            "libksmplus.so not found (tried {}); install it (`make install`, see docs/INSTALL.md) \
             or pass --lib /path/to/libksmplus.so",
            cands
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let s = lib.to_string_lossy();
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._+-@,".contains(&b))
    {
        return Err(format!(
            "{s}: LD_PRELOAD cannot carry this path (space, ':' or another special \
             character); install libksmplus.so somewhere plainer and pass --lib"
        ));
    }
    // Next to a ksmplusctl in target/<profile>/: a build tree, gone after `cargo clean`.
    let in_build_tree = arg.is_none()
        && exe
            .as_deref()
            .and_then(Path::parent)
            .is_some_and(|d| lib.parent() == Some(d))
        && lib.ancestors().any(|a| a.join("CACHEDIR.TAG").is_file());
    let warning = in_build_tree.then(|| {
        format!(
            "{s} is in a cargo build tree: `cargo clean` would leave the wrapped entries without \
             the shim; install ksmplus (`make install`) and wrap again"
        )
    });
    Ok((lib.clone(), warning))
}

/// `ksmplusctl wrap` options.
#[derive(clap::Args, Debug, Clone)]
pub struct WrapArgs {
    /// Desktop-file id (`org.kde.okular[.desktop]`) or program name (every entry running it)
    pub app: String,
    /// The shim, written as given [default: PREFIX/lib/ksmplus/libksmplus.so of the prefix
    /// ksmplusctl is installed in, else /usr/local/lib/ksmplus, /usr/lib/ksmplus]
    #[arg(long, value_name = "PATH")]
    pub lib: Option<PathBuf>,
    #[command(flatten)]
    pub out: crate::output::JsonArg,
}

/// `ksmplusctl unwrap` options.
#[derive(clap::Args, Debug, Clone)]
pub struct UnwrapArgs {
    /// Desktop-file id or program name, as given to `wrap`
    #[arg(required_unless_present = "all")]
    pub app: Option<String>,
    /// Every override `wrap` wrote (see `ksmplusctl wrapped`)
    #[arg(long, conflicts_with = "app")]
    pub all: bool,
    #[command(flatten)]
    pub out: crate::output::JsonArg,
}

/// Prints what happened (text, or a [`DesktopReply`] with `--json`); the exit status: 1 when
/// an entry was refused.
fn print_outcomes(v: &[Outcome], mut reply: DesktopReply, json_out: bool) -> i32 {
    for o in v {
        let (what, id, detail) = match o {
            Outcome::Wrapped { id, path } => ("wrapped", id, path.display().to_string()),
            Outcome::Unchanged { id, path } => ("already wrapped", id, path.display().to_string()),
            Outcome::Restored { id, path } => (
                "unwrapped (previous override restored)",
                id,
                path.display().to_string(),
            ),
            Outcome::Removed { id, path } => (
                "unwrapped (override removed)",
                id,
                path.display().to_string(),
            ),
            Outcome::NotWrapped { id } => ("not wrapped", id, String::new()),
            Outcome::Refused { id, why } => ("refused", id, why.clone()),
        };
        if !json_out {
            if what == "refused" {
                eprintln!("{id}: not wrapped: {detail}");
            } else if detail.is_empty() {
                println!("{id}: {what}");
            } else {
                println!("{id}: {what}: {detail}");
            }
        }
        reply.entries.push(DesktopOutcome {
            id: id.clone(),
            result: what.into(),
            detail,
        });
    }
    reply.version = REPLY_VERSION;
    reply.ok = !v.iter().any(|o| matches!(o, Outcome::Refused { .. }));
    if json_out {
        print_json(&reply);
    } else if !reply.programs.is_empty() {
        // The hint names only what the user's policy does not track yet (best effort: an
        // unreadable policy hints at every program).
        let policy =
            ksmplus_common::policy::Policy::load(&ksmplus_common::paths::policy_path(None));
        let adds: Vec<String> = reply
            .programs
            .iter()
            .filter(|p| {
                policy.as_ref().map_or(true, |pol| {
                    pol.decide(p, p) != ksmplus_common::policy::Decision::Track
                })
            })
            .map(|p| hint(&["ksmplusctl", "add", p]))
            .collect();
        if adds.is_empty() {
            println!(
                "started from the menu, these now run under the shim, and the policy tracks them"
            );
        } else {
            println!(
                "started from the menu, these now run under the shim; the agent merges them once \
                 tracked: {}",
                adds.join(", ")
            );
        }
    }
    if reply.ok {
        exit::OK
    } else {
        exit::REFUSED
    }
}

/// Runs `ksmplusctl wrap`.
pub fn cli_wrap(args: &WrapArgs) -> i32 {
    let json_out = args.out.json;
    let run = || -> Result<(Vec<Outcome>, PathBuf, Option<String>), String> {
        let xdg = Xdg::from_env()?;
        let (lib, warning) = find_lib(args.lib.as_deref())?;
        let found = resolve(&xdg, &args.app);
        if found.is_empty() {
            return Err(format!(
                "no desktop entry with id {0:?} or running a program named {0:?} in {1}/applications or {2}",
                args.app,
                xdg.data_home.display(),
                xdg.data_dirs
                    .iter()
                    .map(|d| format!("{}/applications", d.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let v = found
            .iter()
            .map(|f| wrap_one(&xdg, f, &lib.to_string_lossy()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok((v, lib, warning))
    };
    let (v, lib, warning) = match run() {
        Ok(r) => r,
        Err(e) => return fail(&e, json_out),
    };
    if let Some(w) = warning {
        eprintln!("ksmplusctl: warning: {w}");
    }
    // The programs the wrapped entries run, for the `ksmplusctl add` hint.
    let mut programs: Vec<String> = v
        .iter()
        .filter_map(|o| match o {
            Outcome::Wrapped { path, .. } | Outcome::Unchanged { path, .. } => {
                std::fs::read_to_string(path).ok()
            }
            _ => None,
        })
        .filter_map(|t| get(&t, "Desktop Entry", "Exec"))
        .filter_map(|e| exec_program(&e))
        .collect();
    programs.sort();
    programs.dedup();
    let reply = DesktopReply {
        lib: Some(lib.to_string_lossy().into_owned()),
        programs,
        ..Default::default()
    };
    print_outcomes(&v, reply, json_out)
}

/// Runs `ksmplusctl unwrap`.
pub fn cli_unwrap(args: &UnwrapArgs) -> i32 {
    let json_out = args.out.json;
    let run = || -> Result<Vec<Outcome>, String> {
        let xdg = Xdg::from_env()?;
        let found: Vec<Found> = match &args.app {
            Some(app) if !args.all => {
                let f = resolve(&xdg, app);
                if f.is_empty() {
                    return Err(format!("no desktop entry matches {app:?}"));
                }
                f
            }
            // --all: every override carrying the marker.
            _ => {
                let all = all_entries(&xdg);
                wrapped(&xdg)
                    .into_iter()
                    .filter_map(|(id, _, _)| all.get(&id).cloned())
                    .collect()
            }
        };
        found
            .iter()
            .map(|f| unwrap_one(&xdg, f).map_err(|e| e.to_string()))
            .collect()
    };
    match run() {
        Ok(v) => {
            if v.is_empty() && !json_out {
                println!("nothing to unwrap: no entry carries the {MARKER_KEY} marker");
            }
            print_outcomes(&v, DesktopReply::default(), json_out)
        }
        Err(e) => fail(&e, json_out),
    }
}

/// Runs `ksmplusctl wrapped`.
pub fn cli_wrapped(json_out: bool) -> i32 {
    let xdg = match Xdg::from_env() {
        Ok(x) => x,
        Err(e) => return fail(&e, json_out),
    };
    let entries: Vec<WrappedEntry> = wrapped(&xdg)
        .into_iter()
        .map(|(id, p, backup)| WrappedEntry {
            exec: std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| get(&t, "Desktop Entry", "Exec"))
                .unwrap_or_default(),
            id,
            path: p.display().to_string(),
            backup,
        })
        .collect();
    if json_out {
        print_json(&WrappedReply {
            version: REPLY_VERSION,
            ok: true,
            entries,
        });
    } else if entries.is_empty() {
        println!(
            "no wrapped desktop entries in {}",
            xdg.user_apps().display()
        );
    } else {
        for e in &entries {
            println!(
                "{}\t{}\t{}\tExec={}",
                e.id,
                e.path,
                if e.backup {
                    "replaces a previous user override (restored by unwrap)"
                } else {
                    "over the system entry (removed by unwrap)"
                },
                e.exec
            );
        }
    }
    exit::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_layout_of_our_own_prefix_comes_first() {
        let c = lib_candidates(Some(Path::new("/opt/ks/bin/ksmplusctl")));
        assert_eq!(c[0], Path::new("/opt/ks/lib/ksmplus/libksmplus.so"));
        assert_eq!(c[1], Path::new("/opt/ks/lib64/ksmplus/libksmplus.so"));
        let build_tree = c
            .iter()
            .position(|p| p == Path::new("/opt/ks/bin/libksmplus.so"));
        let system = c
            .iter()
            .position(|p| p == Path::new("/usr/lib/ksmplus/libksmplus.so"));
        assert!(build_tree.unwrap() < system.unwrap(), "{c:?}");
        // No duplicates when ksmplusctl itself is in /usr/local/bin.
        let c = lib_candidates(Some(Path::new("/usr/local/bin/ksmplusctl")));
        let mut d = c.clone();
        d.sort();
        d.dedup();
        assert_eq!(c.len(), d.len(), "{c:?}");
    }

    #[test]
    fn a_given_library_is_written_as_given_not_canonicalised() {
        let dir = std::env::temp_dir().join(format!("ksmplusctl-lib-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::fs::write(dir.join("real/libksmplus.so.0.1.0"), b"x").unwrap();
        std::os::unix::fs::symlink("libksmplus.so.0.1.0", dir.join("real/libksmplus.so")).unwrap();
        std::os::unix::fs::symlink("real", dir.join("current")).unwrap();
        let given = dir.join("current/libksmplus.so");
        let (lib, warning) = find_lib(Some(&given)).unwrap();
        assert_eq!(lib, given);
        assert!(warning.is_none());
        // Not there: the error names what was tried.
        let e = find_lib(Some(&dir.join("nope/libksmplus.so"))).unwrap_err();
        assert!(e.contains("nope/libksmplus.so"), "{e}");
        // LD_PRELOAD splits on spaces and colons.
        std::fs::create_dir_all(dir.join("a b")).unwrap();
        std::fs::write(dir.join("a b/libksmplus.so"), b"x").unwrap();
        let e = find_lib(Some(&dir.join("a b/libksmplus.so"))).unwrap_err();
        assert!(e.contains("LD_PRELOAD cannot carry"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
