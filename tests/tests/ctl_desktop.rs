//! `ksmplusctl wrap` as a desktop sees it: every override it writes passes
//! `desktop-file-validate` (package desktop-file-utils) whenever the entry it was built from
//! does, for the fixtures (tests/data/desktop) and for every entry this machine has in
//! /usr/share/applications; `unwrap --all` puts everything back; the library path found next to
//! an installed ksmplusctl is written as installed; `--json` replies parse into their types.
//!
//! Needs the binaries of the same target dir: `cargo build -p ksmplus-ctl`.
mod ctl_support;

use ksmplus_common::status::{DesktopReply, SimpleReply, WrappedReply};
use ksmplus_tests::target_bin as bin;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/desktop")
}

/// `ksmplusctl ARGS` with `XDG_DATA_HOME=home`, `XDG_DATA_DIRS=dirs`.
fn ctl(exe: &Path, home: &Path, dirs: &str, args: &[&str]) -> Output {
    // A copied ksmplusctl may meet ETXTBSY (see output_retrying).
    ksmplus_tests::process::output_retrying(
        Command::new(exe)
            .env("XDG_DATA_HOME", home)
            .env("XDG_DATA_DIRS", dirs)
            .env_remove("LD_PRELOAD")
            .args(args),
    )
    .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every `*.desktop` under `dir/applications`, by desktop-file id (found independently of
/// ksmplusctl's own walk, which this checks).
fn entries(dir: &Path) -> BTreeMap<String, PathBuf> {
    let apps = dir.join("applications");
    ctl_support::files_under(&apps)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "desktop"))
        .map(|p| (p.to_string_lossy().replace('/', "-"), apps.join(p)))
        .collect()
}

/// What `desktop-file-validate` says about `p`, with the file's own path taken out (so the
/// messages of an entry and of its override compare); `None` when the tool is missing.
fn validate(p: &Path) -> Option<Vec<String>> {
    let o = Command::new("desktop-file-validate").arg(p).output().ok()?;
    let text = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    let mut v: Vec<String> = text
        .lines()
        .map(|l| l.replace(&p.display().to_string(), "FILE"))
        .map(|l| {
            let name = p.file_name().unwrap().to_string_lossy();
            l.replace(&*name, "FILE")
        })
        .collect();
    if !o.status.success() && v.is_empty() {
        v.push(format!("exit {}", o.status));
    }
    v.sort();
    Some(v)
}

/// Wraps every entry of `sys` into a fresh `$XDG_DATA_HOME` and checks each override against
/// its base; returns how many overrides were checked.
fn wrap_all_and_validate(sys: &Path) -> usize {
    let home = tempfile::tempdir().unwrap();
    let lib = home.path().join("lib/libksmplus.so");
    std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
    std::fs::write(&lib, b"wrap only needs the file").unwrap();
    let share = home.path().join("share");
    let dirs = sys.to_string_lossy().into_owned();
    let mut checked = 0;
    let mut problems = Vec::new();
    for (id, base) in entries(sys) {
        let o = ctl(
            &bin("ksmplusctl"),
            &share,
            &dirs,
            &["wrap", &id, "--lib", &lib.to_string_lossy()],
        );
        let over = share.join("applications").join(&id);
        if !o.status.success() {
            // Refused (DBusActivatable, Hidden, no Exec): nothing may have been written.
            assert_eq!(o.status.code(), Some(1), "wrap {id}: {o:?}");
            assert!(!over.exists(), "refused {id} but wrote {}", over.display());
            continue;
        }
        let Some(mine) = validate(&over) else {
            ksmplus_tests::ksmd::skip_or_fail(
                "desktop-file-validate (package desktop-file-utils) is not installed",
            );
            return 0;
        };
        let theirs = validate(&base).unwrap();
        if theirs.is_empty() && !mine.is_empty() || !theirs.is_empty() && mine != theirs {
            problems.push(format!(
                "{id}: the entry says {theirs:?}, its override {mine:?}\n{}",
                std::fs::read_to_string(&over).unwrap()
            ));
        }
        checked += 1;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    checked
}

/// A temporary directory with the `share` directory of a user (not made yet) and a stand-in
/// `libksmplus.so` (wrap only needs the file).
fn share_and_lib() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let lib = tmp.path().join("libksmplus.so");
    std::fs::write(&lib, b"x").unwrap();
    (tmp, share, lib)
}

#[test]
fn every_override_of_the_fixtures_validates() {
    let n = wrap_all_and_validate(&fixtures());
    // 10 fixtures, 2 refused (DBusActivatable, Hidden) — unless the tool is missing (skipped).
    assert!(n == 8 || n == 0, "{n} overrides checked");
}

#[test]
fn every_override_of_this_machines_entries_validates() {
    let sys = Path::new("/usr/share");
    if entries(sys).is_empty() {
        return ksmplus_tests::ksmd::skip_or_fail("no desktop entries in /usr/share/applications");
    }
    let n = wrap_all_and_validate(sys);
    eprintln!("{n} overrides of /usr/share/applications validated");
}

#[test]
fn unwrap_all_puts_every_file_back() {
    let (_tmp, share, lib) = share_and_lib();
    // A user override of the user's own, which wrap moves aside and unwrap must restore.
    let own = share.join("applications/org.example.Env.desktop");
    std::fs::create_dir_all(own.parent().unwrap()).unwrap();
    std::fs::write(
        &own,
        "[Desktop Entry]\nType=Application\nName=Mine\nExec=envapp --mine\n",
    )
    .unwrap();
    let before = std::fs::read(&own).unwrap();
    let dirs = fixtures().to_string_lossy().into_owned();
    let exe = bin("ksmplusctl");
    for app in ["plainviewer", "org.example.Env", "org.example.Actions"] {
        let o = ctl(
            &exe,
            &share,
            &dirs,
            &["wrap", app, "--lib", &lib.to_string_lossy()],
        );
        assert!(o.status.success(), "{o:?}");
    }
    let o = ctl(&exe, &share, &dirs, &["wrapped", "--json"]);
    let w: WrappedReply = serde_json::from_slice(&o.stdout).unwrap();
    assert!(w.ok && w.version >= 2);
    assert_eq!(w.entries.len(), 4, "{w:?}");
    assert_eq!(w.entries.iter().filter(|e| e.backup).count(), 1);

    let o = ctl(&exe, &share, &dirs, &["unwrap", "--all", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let r: DesktopReply = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r.ok);
    assert_eq!(r.entries.len(), 4, "{r:?}");
    // Only the user's own file is left, byte for byte; no backup directory stays behind.
    assert_eq!(entries(&share).len(), 1);
    assert_eq!(std::fs::read(&own).unwrap(), before);
    assert!(!share.join("ksmplus").exists());
    // Nothing left to unwrap: still success, and says so.
    let o = ctl(&exe, &share, &dirs, &["unwrap", "--all"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("nothing to unwrap"), "{}", stdout(&o));
    // An app and --all together is a usage error.
    let o = ctl(&exe, &share, &dirs, &["unwrap", "--all", "plainviewer"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn wrap_writes_the_installed_library_path_not_its_target() {
    // An installed layout: PREFIX/bin/ksmplusctl, PREFIX/lib/ksmplus/libksmplus.so, the library
    // a symbolic link to a versioned file (as packages do).
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir_all(prefix.join("lib/ksmplus")).unwrap();
    let exe = prefix.join("bin/ksmplusctl");
    std::fs::copy(bin("ksmplusctl"), &exe).unwrap();
    std::fs::write(prefix.join("lib/ksmplus/libksmplus.so.0.1.0"), b"x").unwrap();
    std::os::unix::fs::symlink(
        "libksmplus.so.0.1.0",
        prefix.join("lib/ksmplus/libksmplus.so"),
    )
    .unwrap();
    let share = tmp.path().join("share");
    let dirs = fixtures().to_string_lossy().into_owned();
    let o = ctl(
        &exe,
        &share,
        &dirs,
        &["wrap", "org.example.Plain", "--json"],
    );
    assert!(o.status.success(), "{o:?}");
    let r: DesktopReply = serde_json::from_slice(&o.stdout).unwrap();
    let want = prefix.join("lib/ksmplus/libksmplus.so");
    assert_eq!(r.lib.as_deref(), Some(&*want.to_string_lossy()));
    assert_eq!(r.programs, ["plainviewer"]);
    let text =
        std::fs::read_to_string(share.join("applications/org.example.Plain.desktop")).unwrap();
    assert!(
        text.contains(&format!(
            "Exec=env LD_PRELOAD={} plainviewer %U\n",
            want.display()
        )),
        "{text}"
    );
    // Installed, not a build tree: no warning.
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn json_replies_keep_ok_and_the_exit_status_together() {
    let (_tmp, share, lib) = share_and_lib();
    let dirs = fixtures().to_string_lossy().into_owned();
    let lib = lib.to_string_lossy();
    let wrap = |app: &str| {
        let o = ctl(
            &bin("ksmplusctl"),
            &share,
            &dirs,
            &["wrap", app, "--lib", &lib, "--json"],
        );
        (o.status.code(), o.stdout)
    };
    // Refused: exit 1, ok false, the reason in the entry.
    let (code, out) = wrap("org.example.DBus");
    assert_eq!(code, Some(1));
    let r: DesktopReply = serde_json::from_slice(&out).unwrap();
    assert!(!r.ok);
    assert_eq!(r.entries[0].result, "refused");
    assert!(r.entries[0].detail.contains("DBusActivatable"));
    // Nothing matches: exit 2, a SimpleReply with the error.
    let (code, out) = wrap("no-such-app");
    assert_eq!(code, Some(2));
    let r: SimpleReply = serde_json::from_slice(&out).unwrap();
    assert!(!r.ok && r.version >= 2);
    assert!(r.error.unwrap().contains("no desktop entry"));
    // Done: exit 0, ok true.
    let (code, out) = wrap("org.example.Plain");
    assert_eq!(code, Some(0));
    let r: DesktopReply = serde_json::from_slice(&out).unwrap();
    assert!(r.ok);
    assert_eq!(r.entries[0].result, "wrapped");
}

/// `wrap`'s closing hint names `ksmplusctl add PROGRAM` only while the user's policy does not
/// track the program yet.
#[test]
fn wrap_hints_at_add_only_for_untracked_programs() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let config = tmp.path().join("config");
    let lib = tmp.path().join("libksmplus.so");
    std::fs::write(&lib, b"x").unwrap();
    let dirs = fixtures().to_string_lossy().into_owned();
    let exe = bin("ksmplusctl");
    let wrap = |args: &[&str]| {
        let o = Command::new(&exe)
            .env("XDG_DATA_HOME", &share)
            .env("XDG_DATA_DIRS", &dirs)
            .env("XDG_CONFIG_HOME", &config)
            .env_remove("LD_PRELOAD")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        stdout(&o)
    };
    let lib = lib.to_string_lossy().into_owned();
    let out = wrap(&["wrap", "plainviewer", "--lib", &lib]);
    assert!(out.contains("ksmplusctl add plainviewer"), "{out}");
    wrap(&["unwrap", "plainviewer"]);
    std::fs::create_dir_all(config.join("ksmplus")).unwrap();
    std::fs::write(
        config.join("ksmplus/policy.toml"),
        "track = [\"plainviewer\"]\n",
    )
    .unwrap();
    let out = wrap(&["wrap", "plainviewer", "--lib", &lib]);
    assert!(!out.contains("ksmplusctl add"), "{out}");
    assert!(out.contains("the policy tracks them"), "{out}");
}
