//! Issue 10: the shim is invisible to sandboxes. As an unprivileged user (nobody when the tests
//! run as root, else the user running them), a program under `libksmplus.so` can enter a user
//! namespace — which the kernel refuses to a multi-threaded process, so a shim with a thread of
//! its own broke `unshare -U`, bubblewrap, Chromium's zygote and rootless containers — and gives
//! the same output as without the shim.
//!
//! Each run has a harness agent of the same user listening (`harness-agent`, a Hello line per
//! Hello): the Hellos prove that the shim really ran in the process that entered the namespace
//! and in the programs started inside it, so "same output" cannot pass because the shim was not
//! loaded.
//!
//! Skips (with `skip_or_fail`, a failure under `KSMPLUS_REQUIRE_KSM=1`) only where the kernel has
//! no unprivileged user namespaces or the tool (`unshare`, `bwrap`) is missing.
use ksmplus_tests::ksmd::skip_or_fail;
use ksmplus_tests::shim::{assert_preloaded, shim_lib};
use ksmplus_tests::{compile, run, which, Interactive, RunOutput, ShimMode};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
/// The user the sandboxes run as when the tests run as root.
const NOBODY: u32 = 65534;

/// Why this kernel gives an unprivileged user no user namespace, if it does not.
fn no_unprivileged_userns() -> Option<String> {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return Some("/proc/sys/user/max_user_namespaces is 0".into());
    }
    // Debian's and Ubuntu's own switches for the same thing.
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Some("/proc/sys/kernel/unprivileged_userns_clone is 0".into());
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return Some("/proc/sys/kernel/apparmor_restrict_unprivileged_userns is 1".into());
    }
    None
}

/// The unprivileged user the sandboxes run as: nobody when we are root, else ourselves.
fn sandbox_uid() -> Option<u32> {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() } == 0).then_some(NOBODY)
}

fn as_sandbox_user(cmd: &mut Command) {
    if let Some(uid) = sandbox_uid() {
        // Supplementary groups are dropped too (std clears them when root sets a uid).
        std::os::unix::process::CommandExt::uid(cmd, uid);
        std::os::unix::process::CommandExt::gid(cmd, uid);
    }
}

/// A world-readable directory holding copies of the shim, the harness agent and `programs`, so
/// that the unprivileged user can run them wherever the checkout lives (it may be under /root).
struct Kit {
    dir: tempfile::TempDir,
    lib: PathBuf,
    socket: PathBuf,
}

impl Kit {
    fn new(programs: &[(&str, &Path)]) -> Kit {
        let dir = ksmplus_tests::temp_dir("ksmplus-sandbox");
        let put = |name: &str, from: &Path, mode: u32| {
            let to = dir.path().join(name);
            std::fs::copy(from, &to)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
            to
        };
        let lib = put("libksmplus.so", &shim_lib(), 0o644);
        put(
            "harness-agent",
            Path::new(env!("CARGO_BIN_EXE_harness-agent")),
            0o755,
        );
        for (name, from) in programs {
            put(name, from, 0o755);
        }
        // The agent (run as the sandbox user) binds its socket here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let socket = dir.path().join("agent.sock");
        Kit { dir, lib, socket }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A harness agent on the kit's socket, run as the sandbox user, answering Track.
    fn agent(&self) -> Interactive {
        let mut cmd = Command::new(self.path("harness-agent"));
        cmd.arg(&self.socket).current_dir(self.dir.path());
        as_sandbox_user(&mut cmd);
        let mut a = Interactive::spawn(&mut cmd);
        assert_eq!(a.line(T), "listening", "{}", a.stderr());
        a
    }

    /// `program args` as the sandbox user, without the shim or under it (talking to the kit's
    /// agent), from the kit's directory.
    fn run(&self, shim: bool, program: &str, args: &[&str]) -> RunOutput {
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(self.dir.path());
        let mode = if shim {
            ShimMode::On {
                socket: self.socket.clone(),
            }
        } else {
            ShimMode::Off
        };
        mode.apply(&mut cmd, &self.lib);
        as_sandbox_user(&mut cmd);
        let out = run(&mut cmd, b"", T);
        assert_preloaded(&out.stderr);
        out
    }
}

/// Reads the agent's lines until a Hello has come from a process of each comm in `comms`;
/// returns the Hello lines. Panics naming what is missing after the deadline.
fn wait_hellos(agent: &mut Interactive, comms: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + T;
    let mut hellos: Vec<String> = Vec::new();
    let missing = |hellos: &[String]| -> Vec<String> {
        comms
            .iter()
            .filter(|c| !hellos.iter().any(|h| h.ends_with(&format!(" comm={c}"))))
            .map(|c| c.to_string())
            .collect()
    };
    while !missing(&hellos).is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no Hello from {:?} within {T:?}; Hellos: {hellos:?}",
            missing(&hellos)
        );
        let l = agent.line(left);
        if l.starts_with("hello ") {
            hellos.push(l);
        }
    }
    hellos
}

/// The uid a `hello pid=P uid=U comm=C` line names.
fn hello_uid(line: &str) -> u32 {
    ksmplus_tests::num_field(line, "uid") as u32
}

fn ready(tool: &str) -> Option<PathBuf> {
    if let Some(why) = no_unprivileged_userns() {
        skip_or_fail(&format!("no unprivileged user namespaces: {why}"));
        return None;
    }
    let p = which(tool);
    if p.is_none() {
        skip_or_fail(&format!(
            "{tool} is not installed (apt-get install {})",
            if tool == "bwrap" {
                "bubblewrap"
            } else {
                "util-linux"
            }
        ));
    }
    p
}

/// `LD_PRELOAD=libksmplus.so unshare -U -r id -u` prints `0` as an unprivileged user, as it does
/// without the shim: `unshare` (which calls `unshare(CLONE_NEWUSER)`, refused with EINVAL to a
/// multi-threaded process) and `id` (exec'd inside the namespace) both ran the shim.
#[test]
fn unshare_user_namespace_as_an_unprivileged_user_under_the_shim() {
    let Some(unshare) = ready("unshare") else {
        return;
    };
    let unshare = unshare.to_string_lossy().into_owned();
    let kit = Kit::new(&[]);
    let plain = kit.run(false, &unshare, &["-U", "-r", "id", "-u"]);
    assert!(
        plain.status.success() && plain.stdout_str() == "0\n",
        "without the shim, `unshare -U -r id -u` fails although the kernel allows unprivileged \
         user namespaces: {:?} {} {}",
        plain.status,
        plain.stdout_str(),
        plain.stderr_str()
    );
    let mut agent = kit.agent();
    let shim = kit.run(true, &unshare, &["-U", "-r", "id", "-u"]);
    assert!(
        shim.status.success(),
        "under the shim: {:?} {}",
        shim.status,
        shim.stderr_str()
    );
    assert_eq!(shim.stdout_str(), "0\n", "{}", shim.stderr_str());
    assert_eq!(shim.stdout, plain.stdout);
    let hellos = wait_hellos(&mut agent, &["unshare", "id"]);
    let me = sandbox_uid().unwrap_or_else(|| {
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() }
    });
    // Both are this user's processes, seen from the agent's (initial) user namespace.
    assert!(hellos.iter().all(|h| hello_uid(h) == me), "{hellos:?}");
}

/// A bubblewrap sandbox (new user, pid, ipc, uts, net and cgroup namespaces, read-only root,
/// private /tmp) run as an unprivileged user under the shim: bwrap itself, the shell inside, a
/// nested `unshare -U -r` and a program exercising every allocator entry point all run the
/// shim (their Hellos reach the agent), and the output is byte for byte the same as without the
/// shim.
#[test]
fn bubblewrap_sandbox_runs_the_same_under_the_shim() {
    let Some(bwrap) = ready("bwrap") else {
        return;
    };
    let hooks = compile("shim_hooks");
    let kit = Kit::new(&[("shim_hooks", &hooks)]);
    let d = kit.dir.path().to_string_lossy().into_owned();
    let script = format!(
        "id -u; id -g; wc -l < /proc/self/uid_map; echo pid=$$; unshare -U -r id -u; {d}/shim_hooks"
    );
    let args = [
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--ro-bind",
        &d,
        &d,
        "--chdir",
        "/",
        "--",
        "/bin/sh",
        "-c",
        &script,
    ];
    let bwrap = bwrap.to_string_lossy().into_owned();
    let plain = kit.run(false, &bwrap, &args);
    let text = plain.stdout_str();
    assert!(
        plain.status.success(),
        "bwrap without the shim failed although the kernel allows unprivileged user namespaces: \
         {:?} {text} {}",
        plain.status,
        plain.stderr_str()
    );
    // In its own pid namespace the shell is pid 2 (bwrap's init is 1); a nested user namespace
    // maps it to root.
    assert!(
        text.contains("\npid=2\n0\n") && text.ends_with("failures=0\n"),
        "{text}"
    );
    let mut agent = kit.agent();
    let shim = kit.run(true, &bwrap, &args);
    assert!(
        shim.status.success(),
        "bwrap under the shim: {:?} {}",
        shim.status,
        shim.stderr_str()
    );
    assert!(
        shim.stdout == plain.stdout,
        "output differs:\n--- without the shim\n{text}\n--- with\n{}",
        shim.stdout_str()
    );
    wait_hellos(&mut agent, &["bwrap", "sh", "unshare", "shim_hooks"]);
}

/// A batch of advice that waits for a process which then installs a seccomp filter (the way
/// Firefox's sandboxed processes do, after the agent's last look at `/proc/PID/status`) is
/// refused by the shim (`EPERM`) instead of run: the filter would kill the process for
/// `madvise(MADV_MERGEABLE)`. Both doors glibc offers, `prctl(PR_SET_SECCOMP)` and
/// `syscall(SYS_seccomp)`; without the shim's watch the program dies of SIGSYS here. Probes
/// with a null filter (Firefox makes them at start) do not count as a filter.
#[test]
fn advice_waiting_when_a_filter_goes_in_is_refused_not_run() {
    use ksmplus_common::channel::{op, Command};
    use ksmplus_tests::shim::command;
    use ksmplus_tests::{num_field, HarnessAgent, ShimChannel};
    use std::os::unix::process::ExitStatusExt;
    let prog = compile("agent_seccomp");
    let agent = HarnessAgent::start();
    let mode = ShimMode::On {
        socket: agent.socket_path().to_owned(),
    };
    for how in ["prctl", "syscall"] {
        let mut cmd = command(&prog, &mode);
        cmd.args(["late", how, "8"]);
        let mut p = Interactive::spawn(&mut cmd);
        let line = p.line(T);
        let (a, size) = (num_field(&line, "a"), num_field(&line, "size"));
        agent.wait_hello(p.pid(), T);
        let ch = ShimChannel::wait(p.pid(), T);
        // The block's whole pages (the shim page-aligns it; its tail page may hold more).
        let mark = [Command {
            op: op::MERGEABLE,
            start: a,
            len: size & !0xfff,
        }];
        // After the start-up probes (a null filter) advice still runs.
        let seq = ch.post(&mark);
        assert_eq!(
            ch.wait_done(seq, T, true),
            vec![0],
            "{how}: after the probes"
        );
        let seq = ch.post(&mark);
        let alive = p.cmd("go", T);
        assert!(alive.starts_with("alive"), "{how}: {alive}");
        let results = ch.wait_done(seq, T, false);
        assert_eq!(
            results,
            vec![libc::EPERM],
            "{how}: the advice must be refused"
        );
        let (status, _) = p.finish(T);
        assert_eq!(
            (status.code(), status.signal()),
            (Some(0), None),
            "{how}: {status}"
        );
    }
}
