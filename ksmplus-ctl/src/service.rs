//! `ksmplusctl install-service`: the systemd *user* unit that runs ksmplus-agentd.
//!
//! One function, [`unit_text`], writes the unit; `dist/ksmplus-agentd.service` is its output for
//! `/usr/local/bin/ksmplus-agentd` (a test keeps the two identical).
//!
//! Hardening, after earlyoom's unit, limited to what a user service can use and the agent allows:
//! the agent reads `/proc/PID/{smaps,ksm_stat,status}` of the user's programs (so no ProtectProc=,
//! no ProcSubset=), serves a socket in `%t/ksmplus` and rewrites its policy in
//! `$XDG_CONFIG_HOME/ksmplus` on `ksmplusctl add/remove` (the only writable paths), and only
//! needs AF_UNIX. ProtectKernelTunables= is left out: it would not matter for a user service
//! (not root, so /sys/kernel/mm/ksm is read-only anyway), but the agent reads those files.
use std::path::{Path, PathBuf};

pub const UNIT_NAME: &str = "ksmplus-agentd.service";

/// Quotes a path for an `ExecStart=` line (systemd: `%` is written `%%`; spaces need quotes).
fn exec_quote(p: &str) -> String {
    let p = p.replace('%', "%%");
    if p.contains([' ', '\t', '"', '\'', '\\', ';']) {
        format!("\"{}\"", p.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        p
    }
}

/// The unit running `agentd` with the default socket and policy of the user manager's session.
pub fn unit_text(agentd: &Path) -> String {
    format!(
        "\
# ksmplus-agentd as a systemd user service: the per-user agent that finds duplicate pages in
# programs started under libksmplus.so and marks them for ksmd.
#
# Installed by `make install` / the ksmplus package into $PREFIX/lib/systemd/user, or by
#   ksmplusctl install-service   (writes ~/.config/systemd/user/{UNIT_NAME})
# Start:    systemctl --user daemon-reload && systemctl --user enable --now ksmplus-agentd
# Check:    systemctl --user status ksmplus-agentd; ksmplusctl status
# Reload:   systemctl --user reload ksmplus-agentd   (re-reads the policy; so does ksmplusctl reload)
# Logs:     journalctl --user -u ksmplus-agentd
#
# %t is $XDG_RUNTIME_DIR and %E is $XDG_CONFIG_HOME: the same socket and policy paths the shim
# and ksmplusctl use by default.
[Unit]
Description=KSM+ agent: memory deduplication for programs run under libksmplus.so
Documentation=man:ksmplus-agentd(1) man:ksmplusctl(1)
Documentation=https://github.com/ksmplus/ksmplus/blob/main/docs/INSTALL.md
# Nothing to do on a kernel without KSM.
ConditionPathExists=/sys/kernel/mm/ksm

[Service]
# The agent says READY=1 once its socket listens, RELOADING=1 ... READY=1 around a reload,
# STOPPING=1 on the way out, and WATCHDOG=1 every WatchdogSec/2: a hung agent is restarted.
Type=notify
NotifyAccess=main
WatchdogSec=30
ExecStart={exec} --socket %t/ksmplus/agent.sock --policy %E/ksmplus/policy.toml
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s
# Stays out of the way of the programs it serves.
Nice=10
CPUSchedulingPolicy=batch
IOSchedulingClass=idle

# Created before start (writable, owned by the user): the socket's directory and the policy's.
RuntimeDirectory=ksmplus
ConfigurationDirectory=ksmplus
# The socket, the policy it rewrites and its state are the user's alone.
UMask=0077

# Hardening. Everything is read-only but the socket and policy directories.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=%t/ksmplus %E/ksmplus
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictAddressFamilies=AF_UNIX
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources @mount @swap @reboot @module @raw-io
# Reading /proc/PID/* of the user's own programs is the agent's job: no ProtectProc=/ProcSubset=.

[Install]
WantedBy=default.target
",
        exec = exec_quote(&agentd.to_string_lossy())
    )
}

/// `$XDG_CONFIG_HOME/systemd/user`, else `~/.config/systemd/user`.
pub fn user_unit_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(d).join("systemd/user"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or("neither XDG_CONFIG_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".config/systemd/user"))
}

/// `ksmplus-agentd` next to the running executable.
pub fn agentd_next_to_self() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find ksmplusctl itself: {e}"))?;
    let p = exe
        .parent()
        .map(|d| d.join("ksmplus-agentd"))
        .ok_or("ksmplusctl has no directory")?;
    if p.is_file() {
        p.canonicalize()
            .map_err(|e| format!("{}: {e}", p.display()))
    } else {
        Err(format!(
            "{} not found: install ksmplus-agentd next to ksmplusctl, or pass --agentd PATH",
            p.display()
        ))
    }
}

/// What `install` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    Created(PathBuf),
    Replaced(PathBuf),
    Unchanged(PathBuf),
}

/// Writes the unit into `dir` (created if needed), atomically.
pub fn install(dir: &Path, agentd: &Path) -> Result<Installed, String> {
    let path = dir.join(UNIT_NAME);
    let text = unit_text(agentd);
    let old = std::fs::read_to_string(&path).ok();
    if old.as_deref() == Some(text.as_str()) {
        return Ok(Installed::Unchanged(path));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    ksmplus_common::fsutil::write_atomic(&path, text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if old.is_some() {
        Installed::Replaced(path)
    } else {
        Installed::Created(path)
    })
}

/// `ksmplusctl install-service` options.
#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    /// The agent binary [default: ksmplus-agentd next to ksmplusctl]
    #[arg(long, value_name = "PATH")]
    pub agentd: Option<PathBuf>,
    /// Print the unit instead of writing it
    #[arg(long)]
    pub print: bool,
    #[command(flatten)]
    pub out: crate::output::JsonArg,
}

/// Runs `ksmplusctl install-service`.
pub fn cli_install(args: &InstallArgs) -> i32 {
    let json_out = args.out.json;
    let agentd = match &args.agentd {
        Some(p) => std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display())),
        None => agentd_next_to_self(),
    };
    let agentd = match agentd {
        Ok(a) => a,
        Err(e) => return crate::output::fail(&e, json_out),
    };
    if args.print {
        print!("{}", unit_text(&agentd));
        return crate::output::exit::OK;
    }
    let r = match user_unit_dir().and_then(|d| install(&d, &agentd)) {
        Ok(r) => r,
        Err(e) => return crate::output::fail(&e, json_out),
    };
    let (what, path) = match &r {
        Installed::Created(p) => ("written", p),
        Installed::Replaced(p) => ("replaced", p),
        Installed::Unchanged(p) => ("unchanged", p),
    };
    let next = "systemctl --user daemon-reload && systemctl --user enable --now ksmplus-agentd";
    if json_out {
        crate::output::print_json(&ksmplus_common::status::ServiceReply {
            version: ksmplus_common::status::REPLY_VERSION,
            ok: true,
            result: what.into(),
            path: path.display().to_string(),
            agentd: agentd.display().to_string(),
            next: next.into(),
        });
    } else {
        println!("{}: {what} (runs {})", path.display(), agentd.display());
        println!("next: {next}");
    }
    crate::output::exit::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dist_file_is_the_generated_unit() {
        let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/ksmplus-agentd.service");
        let text = std::fs::read_to_string(&dist).expect("dist/ksmplus-agentd.service");
        assert_eq!(
            text,
            unit_text(Path::new("/usr/local/bin/ksmplus-agentd")),
            "regenerate it with: ksmplusctl install-service --agentd /usr/local/bin/ksmplus-agentd --print > dist/ksmplus-agentd.service"
        );
    }

    #[test]
    fn exec_paths_are_quoted() {
        let t = unit_text(Path::new("/opt/my apps/100%/ksmplus-agentd"));
        assert!(t.contains("ExecStart=\"/opt/my apps/100%%/ksmplus-agentd\" --socket"));
        let t = unit_text(Path::new("/usr/bin/ksmplus-agentd"));
        assert!(t.contains(
            "ExecStart=/usr/bin/ksmplus-agentd --socket %t/ksmplus/agent.sock --policy %E/ksmplus/policy.toml\n"
        ));
    }

    #[test]
    fn unit_is_a_notify_service_with_watchdog_reload_and_umask() {
        let t = unit_text(Path::new("/usr/bin/ksmplus-agentd"));
        let lines: Vec<&str> = t.lines().collect();
        crate::test_util::assert_has_each(
            &lines,
            &[
                "Type=notify",
                "NotifyAccess=main",
                "WatchdogSec=30",
                "ExecReload=/bin/kill -HUP $MAINPID",
                "ConditionPathExists=/sys/kernel/mm/ksm",
                "UMask=0077",
                "WantedBy=default.target",
            ],
            &t,
        );
        // A user service ordered after default.target would delay, not order, anything.
        assert!(!t.lines().any(|l| l.starts_with("After=")), "{t}");
    }

    #[test]
    fn install_is_idempotent() {
        let dir = std::env::temp_dir().join(format!("ksmplus-svc-test-{}", std::process::id()));
        let a = Path::new("/usr/bin/ksmplus-agentd");
        assert!(matches!(install(&dir, a).unwrap(), Installed::Created(_)));
        assert!(matches!(install(&dir, a).unwrap(), Installed::Unchanged(_)));
        let b = Path::new("/opt/bin/ksmplus-agentd");
        assert!(matches!(install(&dir, b).unwrap(), Installed::Replaced(_)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
