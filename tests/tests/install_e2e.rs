//! The installed files, end to end (issue 13): `make install` into a temporary PREFIX, and
//! `make deb` unpacked into a temporary root, then everything runs from there and nothing from
//! the build tree: the installed ksmplus-agentd on a private socket, the installed ksmplusctl
//! adds a program and wraps a desktop entry (without --lib: it must find the installed shim),
//! the wrapped command runs under the installed libksmplus.so, and `ksmplusctl status --json`
//! tracks it. Also: the tmpfiles.d file carries the example policy's ksmd tunables and
//! systemd-tmpfiles applies it (to a stand-in sysfs); `man -l` renders every installed page without warnings (ksmplus-agentd's
//! too, with its options and signals), `man` finds the pages under the prefix, `systemd-analyze verify` accepts the installed unit, and
//! `make uninstall` leaves nothing behind.
//!
//! Runs `make` in the workspace, which builds the release binaries (about a minute the first
//! time). Needs make, python3, man-db, dpkg-deb; systemd-analyze where available.
mod ctl_support;

use ctl_support::{assert_fits_100_columns, assert_has_files, files_under};
use ksmplus_common::status::{SimpleReply, StatusReply};
use ksmplus_tests::poll_until;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The two tests run `make` in the same tree (generated files are rewritten): one at a time.
static MAKE: Mutex<()> = Mutex::new(());

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn make(args: &[&str]) -> Output {
    let o = Command::new("make")
        .current_dir(workspace())
        .arg("--no-print-directory")
        .args(args)
        .env_remove("MAKEFLAGS")
        .env_remove("DESTDIR")
        .output()
        .expect("run make (package make)");
    ksmplus_tests::assert_success(&o, &format!("make {args:?}"));
    o
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An installed ksmplus under `prefix` (`prefix/bin`, `prefix/lib/ksmplus`, ...).
struct Installed {
    prefix: PathBuf,
}

impl Installed {
    fn ctl(&self) -> Command {
        let mut c = Command::new(self.prefix.join("bin/ksmplusctl"));
        c.env_remove("LD_PRELOAD").env_remove("KSMPLUS_SOCKET");
        c
    }
    fn lib(&self) -> PathBuf {
        self.prefix.join("lib/ksmplus/libksmplus.so")
    }
}

/// The installed agent, stopped (SIGTERM) on drop.
struct AgentProc(Option<Child>);

impl AgentProc {
    fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` and waits for the exit.
    fn stop(&mut self, sig: i32) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        // SAFETY: kill on our own child, not yet waited for (its pid cannot be reused).
        unsafe { libc::kill(c.id() as i32, sig) };
        c.wait().ok()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
    }
}

/// A python3 program under the shim, printing `ready` once its buffer is filled; killed on drop.
struct Workload {
    child: Child,
    _stdin: ChildStdin,
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const WORK_PY: &str = "import sys\n\
buf = bytearray(b'ksmplus' * (2 << 20))\n\
print('ready', flush=True)\n\
sys.stdin.read()\n";

/// `status --json` of the agent at `socket`, through the installed ksmplusctl.
fn status(inst: &Installed, socket: &Path) -> (Option<i32>, String) {
    let o = inst
        .ctl()
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// The end-to-end run against the files under `inst.prefix`.
fn run_installed(inst: &Installed) {
    let tmp = ksmplus_tests::temp_dir("ksmplus-install-run");
    let socket = tmp.path().join("run/agent.sock");
    let policy = tmp.path().join("config/ksmplus/policy.toml");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();

    // No agent yet: exit status 3, and the JSON says so.
    let (code, out) = status(inst, &socket);
    assert_eq!(code, Some(3), "{out}");
    let r: SimpleReply = serde_json::from_str(&out).unwrap();
    assert!(!r.ok && r.error.unwrap().contains("not running"));

    let log = std::fs::File::create(tmp.path().join("agent.log")).unwrap();
    let _agent = AgentProc(Some(
        Command::new(inst.prefix.join("bin/ksmplus-agentd"))
            .arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(&policy)
            .arg("--state")
            .arg(tmp.path().join("state/learned"))
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the installed ksmplus-agentd"),
    ));
    let agent_log = || std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    poll_until(
        "the installed agent to answer",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || match status(inst, &socket) {
            (Some(0), _) => Ok(()),
            (c, out) => Err(format!("exit {c:?}: {out}; log: {}", agent_log())),
        },
    );

    // ksmplusctl add: into the policy file, reloaded.
    let o = inst
        .ctl()
        .args(["add", "python3", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: SimpleReply = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r.ok && r.changed == Some(true), "{r:?}");
    assert!(std::fs::read_to_string(&policy)
        .unwrap()
        .contains("\"python3\""));

    // A desktop entry running the program, wrapped by the installed ksmplusctl without --lib.
    let work = tmp.path().join("work.py");
    std::fs::write(&work, WORK_PY).unwrap();
    let sys = tmp.path().join("sys");
    std::fs::create_dir_all(sys.join("applications")).unwrap();
    std::fs::write(
        sys.join("applications/org.example.Work.desktop"),
        format!(
            "[Desktop Entry]\nType=Application\nName=Work\nExec=python3 {} %f\n",
            work.display()
        ),
    )
    .unwrap();
    let share = tmp.path().join("share");
    let o = inst
        .ctl()
        .env("XDG_DATA_HOME", &share)
        .env("XDG_DATA_DIRS", &sys)
        .args(["wrap", "org.example.Work"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("`ksmplusctl add python3`"),
        "{}",
        text(&o)
    );
    let entry =
        std::fs::read_to_string(share.join("applications/org.example.Work.desktop")).unwrap();
    let exec = entry.lines().find_map(|l| l.strip_prefix("Exec=")).unwrap();
    assert_eq!(
        exec,
        format!(
            "env LD_PRELOAD={} python3 {} %f",
            inst.lib().display(),
            work.display()
        ),
        "{entry}"
    );
    assert!(entry.contains("\nTryExec=python3\n"), "{entry}");

    // Run the wrapped command as a launcher would (no file: %f expands to nothing).
    let words: Vec<&str> = exec.split(' ').filter(|w| *w != "%f").collect();
    let mut child = Command::new(words[0])
        .args(&words[1..])
        .env("KSMPLUS_SOCKET", &socket)
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = child.id();
    let _work = Workload {
        child,
        _stdin: stdin,
    };
    assert_eq!(line.trim(), "ready");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.contains(&*inst.lib().to_string_lossy()),
        "the installed shim is not mapped:\n{maps}"
    );

    // Tracked, in the typed reply.
    let st: StatusReply = poll_until(
        "the wrapped program to be tracked",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let (code, out) = status(inst, &socket);
            let st: StatusReply = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
            if code == Some(0) && st.ok && st.processes.iter().any(|p| p.pid == pid) {
                Ok(st)
            } else {
                Err(format!("exit {code:?}: {out}\nlog: {}", agent_log()))
            }
        },
    );
    let p = st.processes.iter().find(|p| p.pid == pid).unwrap();
    assert!(p.comm.starts_with("python3"), "{p:?}");
    assert_eq!(st.agent.peers.tracked, 1, "{:?}", st.agent);

    // The text: the process row, no table line over 100 columns.
    let o = inst
        .ctl()
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let table: Vec<&str> = out
        .lines()
        .take_while(|l| !l.trim_start().starts_with("TOTAL"))
        .collect();
    assert!(
        table
            .iter()
            .any(|l| l.trim_start().starts_with(&format!("{pid} "))),
        "{out}"
    );
    assert_fits_100_columns(&out, tmp.path());
    assert!(out.contains("1 tracked"), "{out}");

    // --watch: one JSON object per refresh.
    let o = inst
        .ctl()
        .args([
            "status", "--watch", "0.2", "--count", "2", "--json", "--socket",
        ])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let lines: Vec<StatusReply> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|s| s.ok && s.version >= 2));
}

/// Reads notifications until one starts with `want` (each read waits at most 10 s).
fn expect_notification(l: &std::os::unix::net::UnixDatagram, want: &str) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match l.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                if m.starts_with(want) {
                    return;
                }
                seen.push(m);
            }
            Err(e) => panic!("no {want:?} from the agent ({e}); got {seen:?}"),
        }
    }
}

/// The installed agent speaks the notification protocol its `Type=notify` unit with
/// `WatchdogSec=` and `ExecReload=kill -HUP` relies on, to a stand-in for systemd's socket.
fn notify_protocol(inst: &Installed) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let l = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    l.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut agent = AgentProc(Some(
        Command::new(inst.prefix.join("bin/ksmplus-agentd"))
            .arg("--socket")
            .arg(tmp.path().join("agent.sock"))
            .arg("--policy")
            .arg(tmp.path().join("policy.toml"))
            .arg("--state")
            .arg(tmp.path().join("learned"))
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "400000")
            .env_remove("WATCHDOG_PID")
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    expect_notification(&l, "READY=1");
    expect_notification(&l, "WATCHDOG=1");
    // SAFETY: kill on our own running child (what ExecReload= does).
    unsafe { libc::kill(agent.pid(), libc::SIGHUP) };
    expect_notification(&l, "RELOADING=1");
    expect_notification(&l, "READY=1");
    // What systemctl stop does.
    let st = agent.stop(libc::SIGTERM).unwrap();
    expect_notification(&l, "STOPPING=1");
    assert!(st.success(), "the agent exited with {st}");
}

/// The installed tmpfiles.d file carries the example policy's [ksmd] tunables, switches ksmd on
/// last, and systemd-tmpfiles applies it as written (to a stand-in sysfs under `--root`).
fn tmpfiles_apply_the_example_policy(conf: &Path) {
    let conf_text = std::fs::read_to_string(conf).unwrap();
    let lines: Vec<&str> = conf_text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            "w /sys/kernel/mm/ksm/pages_to_scan - - - - 1000",
            "w /sys/kernel/mm/ksm/sleep_millisecs - - - - 20",
            "w /sys/kernel/mm/ksm/run - - - - 1",
        ],
        "{conf_text}"
    );
    let root = tempfile::tempdir().unwrap();
    let ksm = root.path().join("sys/kernel/mm/ksm");
    std::fs::create_dir_all(&ksm).unwrap();
    for f in ["run", "pages_to_scan", "sleep_millisecs", "use_zero_pages"] {
        std::fs::write(ksm.join(f), "0\n").unwrap();
    }
    match Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(conf)
        .output()
    {
        Ok(o) => {
            assert!(o.status.success(), "systemd-tmpfiles: {}", text(&o));
            let read = |f: &str| std::fs::read_to_string(ksm.join(f)).unwrap();
            assert_eq!(read("pages_to_scan").trim(), "1000");
            assert_eq!(read("sleep_millisecs").trim(), "20");
            assert_eq!(read("run").trim(), "1");
            assert_eq!(read("use_zero_pages").trim(), "0", "unset: left alone");
        }
        Err(e) => ksmplus_tests::ksmd::skip_or_fail(&format!(
            "systemd-tmpfiles (package systemd) cannot run ({e})"
        )),
    }
}

/// `man -l` renders the page without warnings; returns the text.
fn man_page(path: &Path) -> String {
    let o = Command::new("man")
        .args(["--warnings", "-P", "cat", "-l"])
        .arg(path)
        .env("MANWIDTH", "100")
        .output()
        .expect("run man (package man-db)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.trim().is_empty(),
        "man -l {}: {}\n{err}",
        path.display(),
        o.status
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn make_install_into_a_prefix_runs_end_to_end_and_uninstalls_clean() {
    let _one = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = ksmplus_tests::temp_dir("ksmplus-install");
    let prefix = tmp.path().join("prefix");
    let arg = |k: &str, v: &Path| format!("{k}={}", v.display());
    make(&["install", &arg("PREFIX", &prefix)]);
    let inst = Installed {
        prefix: prefix.clone(),
    };

    // What the manifest says is what is there.
    let manifest = std::fs::read_to_string(prefix.join("share/ksmplus/install-manifest")).unwrap();
    let mut listed: Vec<PathBuf> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("f "))
        .map(|p| Path::new(p).strip_prefix(&prefix).unwrap().to_owned())
        .collect();
    listed.push("share/ksmplus/install-manifest".into());
    listed.sort();
    assert_eq!(files_under(&prefix), listed);
    assert_has_files(
        &listed,
        &[
            "bin/ksmplus-agentd",
            "bin/ksmplusctl",
            "lib/ksmplus/libksmplus.so",
            "lib/systemd/user/ksmplus-agentd.service",
            "lib/tmpfiles.d/ksmplus.conf",
            "share/ksmplus/policy.toml",
            "share/man/man1/ksmplusctl.1",
            "share/man/man1/ksmplusctl-status.1",
            "share/man/man1/ksmplus-agentd.1",
            "share/bash-completion/completions/ksmplusctl",
            "share/zsh/site-functions/_ksmplusctl",
            "share/fish/vendor_completions.d/ksmplusctl.fish",
        ],
    );
    // Stripped: the shim is small (7 MB with debug info, under 1 MB without).
    let size = std::fs::metadata(inst.lib()).unwrap().len();
    assert!(
        size < 2 << 20,
        "libksmplus.so is {size} bytes: not stripped?"
    );
    tmpfiles_apply_the_example_policy(&prefix.join("lib/tmpfiles.d/ksmplus.conf"));

    // --version names the program.
    let o = inst.ctl().arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("ksmplusctl "),
        "{}",
        text(&o)
    );

    run_installed(&inst);
    notify_protocol(&inst);

    // Every page renders; `man ksmplusctl` finds the installed one through MANPATH.
    let pages = prefix.join("share/man/man1");
    for p in std::fs::read_dir(&pages).unwrap().flatten() {
        assert!(!man_page(&p.path()).trim().is_empty());
    }
    let main = man_page(&pages.join("ksmplusctl.1"));
    ksmplus_tests::assert_contains_all(
        &main,
        &[
            "SYNOPSIS",
            "EXIT STATUS",
            "not running",
            "ksmplusctl-status(1)",
        ],
        "ksmplusctl(1)",
    );
    // The agent's page, from its clap definition: every option and the sections clap does
    // not know.
    let agentd = man_page(&pages.join("ksmplus-agentd.1"));
    for s in [
        "SYNOPSIS",
        "--check-policy",
        "--state",
        "SIGNALS",
        "SIGHUP",
        "JOURNAL_STREAM",
        "ksmplusctl(1)",
    ] {
        assert!(
            agentd.contains(s),
            "{s} not in ksmplus-agentd(1):\n{agentd}"
        );
    }
    assert!(!agentd.contains("generate"), "hidden options:\n{agentd}");
    for name in ["ksmplusctl", "ksmplus-agentd"] {
        let o = Command::new("man")
            .args(["-w", name])
            .env("MANPATH", prefix.join("share/man"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            pages.join(format!("{name}.1")).display().to_string(),
            "{}",
            text(&o)
        );
    }

    // The installed unit: ExecStart names the installed agent; systemd's own parser agrees,
    // its man pages included (Documentation=man:...).
    let unit = prefix.join("lib/systemd/user/ksmplus-agentd.service");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(unit_text.contains(&format!(
        "\nExecStart={} --socket",
        prefix.join("bin/ksmplus-agentd").display()
    )));
    match Command::new("systemd-analyze")
        .env("XDG_RUNTIME_DIR", tmp.path())
        .env("MANPATH", prefix.join("share/man"))
        .args(["--user", "verify"])
        .arg(&unit)
        .output()
    {
        Ok(v) => assert!(
            v.status.success() && text(&v).trim().is_empty(),
            "systemd-analyze verify: {}",
            text(&v)
        ),
        Err(e) => ksmplus_tests::ksmd::skip_or_fail(&format!(
            "systemd-analyze (package systemd) cannot run ({e})"
        )),
    }

    // Uninstall removes every file and every directory install created: the prefix itself.
    make(&["uninstall", &arg("PREFIX", &prefix)]);
    assert!(!prefix.exists(), "left behind: {:?}", files_under(&prefix));
}

#[test]
fn make_deb_unpacked_into_a_root_runs_end_to_end() {
    let _one = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let o = make(&["deb"]);
    let out = text(&o);
    let deb = out
        .lines()
        .find_map(|l| l.strip_prefix("dpkg-deb: building package 'ksmplus' in '"))
        .and_then(|l| l.strip_suffix("'."))
        .unwrap_or_else(|| panic!("no .deb named in:\n{out}"));
    let deb = workspace().join(deb);
    let info = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .output()
        .unwrap();
    let info = text(&info);
    for field in [
        "Package: ksmplus",
        "Depends: libc6 (>= 2.",
        "Architecture: ",
    ] {
        assert!(info.contains(field), "{field} not in:\n{info}");
    }
    let root = ksmplus_tests::temp_dir("ksmplus-deb-root");
    let o = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let files = files_under(root.path());
    assert_has_files(
        &files,
        &[
            "usr/bin/ksmplusctl",
            "usr/lib/ksmplus/libksmplus.so",
            "usr/lib/systemd/user/ksmplus-agentd.service",
            "usr/lib/tmpfiles.d/ksmplus.conf",
            "usr/share/man/man1/ksmplusctl.1.gz",
            "usr/share/man/man1/ksmplus-agentd.1.gz",
            "usr/share/zsh/vendor-completions/_ksmplusctl",
            "usr/share/doc/ksmplus/copyright",
        ],
    );
    assert!(
        !files.iter().any(|f| f.ends_with("install-manifest")),
        "dpkg keeps its own file list"
    );
    let unit = std::fs::read_to_string(
        root.path()
            .join("usr/lib/systemd/user/ksmplus-agentd.service"),
    )
    .unwrap();
    assert!(unit.contains("\nExecStart=/usr/bin/ksmplus-agentd --socket"));
    man_page(&root.path().join("usr/share/man/man1/ksmplusctl.1.gz"));
    tmpfiles_apply_the_example_policy(&root.path().join("usr/lib/tmpfiles.d/ksmplus.conf"));
    let agentd = man_page(&root.path().join("usr/share/man/man1/ksmplus-agentd.1.gz"));
    assert!(agentd.contains("SIGNALS"), "{agentd}");
    run_installed(&Installed {
        prefix: root.path().join("usr"),
    });
}
