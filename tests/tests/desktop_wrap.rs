//! `ksmplusctl wrap` / `unwrap` / `wrapped` / `install-service` on real-world desktop-entry shapes
//! (tests/data/desktop/applications), in temporary XDG directories.
//!
//! Needs the binaries of the same target dir: `cargo build -p ksmplus-agentd`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ksmplus_tests::target_bin as bin;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/desktop")
}

/// A temporary `$XDG_DATA_HOME` (empty) and one `$XDG_DATA_DIRS` entry (the fixtures, copied),
/// plus a fake `libksmplus.so` (wrap only needs the file to exist).
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&fixtures(), &dir.path().join("sys"));
        std::fs::create_dir_all(dir.path().join("lib")).unwrap();
        std::fs::write(
            dir.path().join("lib/libksmplus.so"),
            b"not really a library",
        )
        .unwrap();
        Env { dir }
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home-share")
    }
    fn sys(&self) -> PathBuf {
        self.dir.path().join("sys")
    }
    fn lib(&self) -> String {
        self.dir
            .path()
            .join("lib/libksmplus.so")
            .canonicalize()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
    fn user_entry(&self, id: &str) -> PathBuf {
        self.home().join("applications").join(id)
    }
    fn ctl(&self, args: &[&str]) -> Output {
        let lib = self.lib();
        let mut c = Command::new(bin("ksmplusctl"));
        c.env("XDG_DATA_HOME", self.home())
            .env("XDG_DATA_DIRS", self.sys())
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env_remove("LD_PRELOAD");
        if matches!(args.first(), Some(&"wrap")) {
            c.args(args).args(["--lib", &lib]);
        } else {
            c.args(args);
        }
        c.output().unwrap()
    }
    /// Every file under the temp dir, with its bytes.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        ksmplus_common::fsutil::files_under(self.dir.path(), true)
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect()
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let t = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

fn ok(o: &Output) -> String {
    ksmplus_tests::assert_success(o, "ksmplusctl");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The lines of `wrapped` that differ from `base`, given the marker line is dropped (and the
/// `TryExec=` line wrap adds after it when `base` has none).
fn changed_lines(base: &str, wrapped: &str) -> Vec<(String, String)> {
    let added_try_exec = !base.contains("\nTryExec=");
    let w: Vec<&str> = wrapped
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("X-Ksmplus-Wrapped=true"))
        .filter(|l| !(added_try_exec && l.starts_with("TryExec=")))
        .collect();
    let b: Vec<&str> = base.split_inclusive('\n').collect();
    assert_eq!(w.len(), b.len(), "line count changed:\n{wrapped}");
    b.iter()
        .zip(w)
        .filter(|(b, w)| **b != *w)
        .map(|(b, w)| (b.to_string(), w.to_string()))
        .collect()
}

#[test]
fn wrap_by_id_changes_only_exec_and_unwrap_removes() {
    let env = Env::new();
    let before = env.snapshot();
    let out = ok(&env.ctl(&["wrap", "org.example.Plain"]));
    assert!(out.contains("org.example.Plain.desktop: wrapped"), "{out}");
    let base = read(&env.sys().join("applications/org.example.Plain.desktop"));
    let w = read(&env.user_entry("org.example.Plain.desktop"));
    assert!(
        w.starts_with("[Desktop Entry]\nX-Ksmplus-Wrapped=true\n"),
        "{w}"
    );
    let lib = env.lib();
    assert_eq!(
        changed_lines(&base, &w),
        [(
            "Exec=plainviewer %U\n".to_string(),
            format!("Exec=env LD_PRELOAD={lib} plainviewer %U\n")
        )]
    );
    assert!(w.contains("TryExec=plainviewer\n"));
    // Idempotent: the same bytes, reported as such; the `.desktop` suffix is accepted.
    let out = ok(&env.ctl(&["wrap", "org.example.Plain.desktop"]));
    assert!(out.contains("already wrapped"), "{out}");
    assert_eq!(read(&env.user_entry("org.example.Plain.desktop")), w);
    // Listed.
    let out = ok(&env.ctl(&["wrapped"]));
    assert!(out.contains("org.example.Plain.desktop"), "{out}");
    assert!(out.contains("over the system entry"), "{out}");
    // Unwrap: the override is gone, nothing else changed, the system tree never was.
    let out = ok(&env.ctl(&["unwrap", "org.example.Plain"]));
    assert!(out.contains("override removed"), "{out}");
    let after: BTreeMap<_, _> = env.snapshot();
    assert_eq!(before, after);
    let out = ok(&env.ctl(&["unwrap", "org.example.Plain"]));
    assert!(out.contains("not wrapped"), "{out}");
}

#[test]
fn wrap_by_program_name_covers_nodisplay_handlers_not_hidden_ones() {
    let env = Env::new();
    let out = ok(&env.ctl(&["wrap", "plainviewer"]));
    assert!(out.contains("org.example.Plain.desktop: wrapped"), "{out}");
    assert!(out.contains("plainviewer-pdf.desktop: wrapped"), "{out}");
    assert!(!out.contains("plainviewer-old"), "{out}");
    assert!(!env.user_entry("plainviewer-old.desktop").exists());
    let w = read(&env.user_entry("plainviewer-pdf.desktop"));
    assert!(w.contains("NoDisplay=true\n"));
    // By program name again on the wrapped overrides: unchanged.
    let out = ok(&env.ctl(&["wrap", "plainviewer"]));
    assert_eq!(out.matches("already wrapped").count(), 2, "{out}");
    ok(&env.ctl(&["unwrap", "plainviewer"]));
    assert!(!env.user_entry("plainviewer-pdf.desktop").exists());
    assert!(!env.user_entry("org.example.Plain.desktop").exists());
}

#[test]
fn actions_env_prefix_preload_quotes_and_crlf() {
    let env = Env::new();
    let lib = env.lib();
    for id in [
        "org.example.Actions",
        "org.example.Env",
        "org.example.Preloaded",
        "org.example.Quoted",
        "org.example.Crlf",
        "kde4-legacy",
    ] {
        ok(&env.ctl(&["wrap", id]));
    }
    let sys = |id: &str| read(&env.sys().join("applications").join(id));
    let usr = |id: &str| read(&env.user_entry(id));

    let ch = changed_lines(
        &sys("org.example.Actions.desktop"),
        &usr("org.example.Actions.desktop"),
    );
    assert_eq!(ch.len(), 3, "{ch:?}");
    assert_eq!(
        ch[1].1,
        format!("Exec=env LD_PRELOAD={lib} /usr/bin/actapp --new-window %u\n")
    );
    assert!(usr("org.example.Actions.desktop").contains("Exec=not-an-action-must-stay\n"));

    let ch = changed_lines(
        &sys("org.example.Env.desktop"),
        &usr("org.example.Env.desktop"),
    );
    assert_eq!(
        ch[0].1,
        format!("Exec=env GDK_BACKEND=x11 QT_SCALE_FACTOR=1 LD_PRELOAD={lib} envapp %F\n")
    );

    let ch = changed_lines(
        &sys("org.example.Preloaded.desktop"),
        &usr("org.example.Preloaded.desktop"),
    );
    assert_eq!(
        ch[0].1,
        format!("Exec=env LD_PRELOAD=/usr/lib/libfoo.so:{lib} preloadapp %f\n")
    );

    // The quoted command is kept verbatim after our prefix.
    let base = sys("org.example.Quoted.desktop");
    let exec = base.lines().find(|l| l.starts_with("Exec=")).unwrap();
    let ch = changed_lines(&base, &usr("org.example.Quoted.desktop"));
    assert_eq!(
        ch[0].1,
        format!("Exec=env LD_PRELOAD={lib} {}\n", &exec["Exec=".len()..])
    );

    let w = usr("kde4-legacy.desktop");
    assert!(env.user_entry("kde4-legacy.desktop").is_file());
    assert!(w.contains(&format!(
        "Exec=env LD_PRELOAD={lib} legacyapp -caption \"%c\" %i\n"
    )));

    let w = usr("org.example.Crlf.desktop");
    assert_eq!(
        w,
        format!("[Desktop Entry]\r\nX-Ksmplus-Wrapped=true\r\nTryExec=crlfapp\r\nType=Application\r\nName=CRLF App\r\nExec=env LD_PRELOAD={lib} crlfapp %f")
    );
}

#[test]
fn existing_user_override_is_restored_byte_identical() {
    let env = Env::new();
    let mine = "[Desktop Entry]\nType=Application\nName=My Own Env App\nExec=envapp --my-flag %F\n# mine\n";
    let p = env.user_entry("org.example.Env.desktop");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, mine).unwrap();
    let before = env.snapshot();
    ok(&env.ctl(&["wrap", "org.example.Env"]));
    let w = read(&p);
    assert!(
        w.contains(&format!(
            "Exec=env LD_PRELOAD={} envapp --my-flag %F\n",
            env.lib()
        )),
        "{w}"
    );
    assert!(w.contains("Name=My Own Env App"));
    ok(&env.ctl(&["wrap", "envapp"])); // again, by name: still built from the user's own file
    assert_eq!(read(&p), w);
    let out = ok(&env.ctl(&["wrapped"]));
    assert!(out.contains("replaces a previous user override"), "{out}");
    let out = ok(&env.ctl(&["unwrap", "envapp"]));
    assert!(out.contains("previous override restored"), "{out}");
    assert_eq!(read(&p), mine);
    assert_eq!(before, env.snapshot());
}

#[test]
fn round_trip_over_every_fixture() {
    let env = Env::new();
    let before = env.snapshot();
    let ids: Vec<String> = before
        .keys()
        .filter_map(|p| {
            let rel = p.strip_prefix(env.sys().join("applications")).ok()?;
            Some(rel.to_string_lossy().replace('/', "-"))
        })
        .collect();
    assert!(ids.len() >= 10, "{ids:?}");
    for id in &ids {
        let _ = env.ctl(&["wrap", id]); // DBus and Hidden ones are refused
    }
    for id in &ids {
        ok(&env.ctl(&["unwrap", id]));
    }
    assert_eq!(before, env.snapshot());
}

#[test]
fn refusals_are_clear_and_write_nothing() {
    let env = Env::new();
    let before = env.snapshot();
    let o = env.ctl(&["wrap", "org.example.DBus"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("DBusActivatable"), "{err}");
    let o = env.ctl(&["wrap", "plainviewer-old"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Hidden"));
    let o = env.ctl(&["wrap", "no-such-app"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no desktop entry"));
    // A missing library.
    let o = Command::new(bin("ksmplusctl"))
        .env("XDG_DATA_HOME", env.home())
        .env("XDG_DATA_DIRS", env.sys())
        .args([
            "wrap",
            "org.example.Plain",
            "--lib",
            "/nonexistent/libksmplus.so",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("libksmplus.so not found"));
    assert_eq!(before, env.snapshot());
}

#[test]
fn install_service_writes_a_valid_user_unit() {
    let env = Env::new();
    let cfg = env.dir.path().join("config");
    let o = Command::new(bin("ksmplusctl"))
        .env("XDG_CONFIG_HOME", &cfg)
        .args(["install-service"])
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(
        out.contains(
            "systemctl --user daemon-reload && systemctl --user enable --now ksmplus-agentd"
        ),
        "{out}"
    );
    let unit = cfg.join("systemd/user/ksmplus-agentd.service");
    let text = read(&unit);
    let agentd = bin("ksmplus-agentd").canonicalize().unwrap();
    assert!(text.contains(&format!(
        "ExecStart={} --socket %t/ksmplus/agent.sock --policy %E/ksmplus/policy.toml\n",
        agentd.display()
    )));
    for key in [
        "Restart=on-failure\n",
        "RestartSec=",
        "NoNewPrivileges=yes\n",
        "ProtectSystem=strict\n",
        "ReadWritePaths=%t/ksmplus %E/ksmplus\n",
        "PrivateTmp=yes\n",
        "WantedBy=default.target\n",
    ] {
        assert!(text.contains(key), "{key} missing:\n{text}");
    }
    // /proc must stay readable, /sys/kernel/mm/ksm too: no such directive lines.
    for forbidden in ["ProtectProc=", "ProcSubset=", "ProtectKernelTunables="] {
        assert!(
            !text.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden} in:\n{text}"
        );
    }
    // Again: unchanged.
    let out = ok(&Command::new(bin("ksmplusctl"))
        .env("XDG_CONFIG_HOME", &cfg)
        .args(["install-service"])
        .output()
        .unwrap());
    assert!(out.contains("unchanged"), "{out}");
    // systemd's own parser, when present: no warnings at all.
    match Command::new("systemd-analyze")
        .env("XDG_RUNTIME_DIR", env.dir.path())
        // The unit's Documentation= names man pages, installed with it by `make install` (the
        // installed unit is verified with them in install_e2e.rs); not here.
        .args(["--user", "--man=no", "verify"])
        .arg(&unit)
        .output()
    {
        Ok(v) => {
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            );
            assert!(
                v.status.success() && all.trim().is_empty(),
                "systemd-analyze verify: {all}"
            );
        }
        Err(e) => ksmplus_tests::ksmd::skip_or_fail(&format!(
            "systemd-analyze (package systemd) cannot run ({e}): structural checks only"
        )),
    }
}
