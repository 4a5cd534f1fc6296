//! The command line, as clap types: what `ksmplusctl` accepts, and (through [`command`]) what its
//! man pages and shell completions describe.
//!
//! Each subcommand carries the options it uses: `--socket` only where ksmplusctl talks to the
//! agent (`status`, `add`, `remove`, `reload`), `--json` where there is a reply to print.
//! For scripts written before that, `--socket` and `--json` are still accepted (hidden) *before*
//! the subcommand; [`Args::resolve`] moves them onto the subcommand, and refuses them where the
//! subcommand has no such option.
use crate::output::JsonArg;
use crate::{desktop, scan, service};
use clap::{Args as ClapArgs, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

/// What the exit statuses mean (man page, `--help`).
pub const EXIT_STATUS: &str = "\
Exit status: 0 done; 1 the agent or a desktop entry refused (the reason is printed); \
2 usage error or local failure; 3 the agent is not running (as systemctl says).";

#[derive(Parser, Debug)]
#[command(
    name = "ksmplusctl",
    version,
    about = "Control the KSM+ agent (ksmplus-agentd): status, tracked programs, desktop entries",
    long_about = "Control the KSM+ agent (ksmplus-agentd), the per-user daemon that finds duplicate \
pages in programs started under libksmplus.so and marks them for the kernel's same-page merging \
(ksmd). `status`, `add`, `remove` and `reload` talk to the agent; `wrap`, `unwrap`, `wrapped`, \
`scan`, `install-service` and `tmpfiles` work without it.",
    after_help = EXIT_STATUS
)]
pub struct Args {
    /// Deprecated position of `--socket` (before the subcommand)
    #[arg(long, hide = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Deprecated position of `--json` (before the subcommand)
    #[arg(long, hide = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// `--socket`, for the subcommands that talk to the agent.
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct AgentArgs {
    /// Agent socket [default: $KSMPLUS_SOCKET, else $XDG_RUNTIME_DIR/ksmplus/agent.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct StatusArgs {
    /// Refresh every SECONDS (default 2) until interrupted
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
    /// With --watch: stop after N refreshes
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct AppArgs {
    /// Program name: its comm (as `ps -o comm` shows it) or its executable's file name
    pub app: String,
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub out: JsonArg,
}

/// `ksmplusctl generate` options.
#[derive(ClapArgs, Debug, Clone)]
pub struct GenerateArgs {
    /// Write the man pages (section 1) into DIR
    #[arg(long, value_name = "DIR")]
    pub man: Option<PathBuf>,
    /// Write bash/, zsh/ and fish/ completion files into DIR
    #[arg(long, value_name = "DIR")]
    pub completions: Option<PathBuf>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Cmd {
    /// Tracked processes, what is marked and merged, and ksmd's state
    Status(StatusArgs),
    /// Track a program; saved in the policy file, then reloaded
    Add(AppArgs),
    /// Stop tracking a program; saved in the policy file, then reloaded
    Remove(AppArgs),
    /// Re-read the policy file (a bad file leaves the old policy in force)
    Reload(ReloadArgs),
    /// Count duplicate page contents in running processes (what KSM could save); no agent needed
    Scan(scan::ScanArgs),
    /// Make a program's desktop entries (menu, file associations) start it under the shim
    Wrap(desktop::WrapArgs),
    /// Undo `wrap`: restore the previous user entry, or remove the override
    Unwrap(desktop::UnwrapArgs),
    /// List the desktop entries `wrap` wrote
    Wrapped(JsonArg),
    /// Write the systemd user unit for ksmplus-agentd (~/.config/systemd/user)
    InstallService(service::InstallArgs),
    /// Print the tmpfiles.d file that switches ksmd on at boot with the policy's [ksmd] settings
    Tmpfiles(crate::tmpfiles::TmpfilesArgs),
    /// Write the man pages and shell completions (at build time; see the Makefile)
    #[command(hide = true)]
    Generate(GenerateArgs),
}

impl Cmd {
    /// The subcommand's name as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Cmd::Status(_) => "status",
            Cmd::Add(_) => "add",
            Cmd::Remove(_) => "remove",
            Cmd::Reload(_) => "reload",
            Cmd::Scan(_) => "scan",
            Cmd::Wrap(_) => "wrap",
            Cmd::Unwrap(_) => "unwrap",
            Cmd::Wrapped(_) => "wrapped",
            Cmd::InstallService(_) => "install-service",
            Cmd::Tmpfiles(_) => "tmpfiles",
            Cmd::Generate(_) => "generate",
        }
    }

    fn agent_args(&mut self) -> Option<&mut AgentArgs> {
        match self {
            Cmd::Status(a) => Some(&mut a.agent),
            Cmd::Add(a) | Cmd::Remove(a) => Some(&mut a.agent),
            Cmd::Reload(a) => Some(&mut a.agent),
            _ => None,
        }
    }

    fn json_arg(&mut self) -> Option<&mut JsonArg> {
        match self {
            Cmd::Status(a) => Some(&mut a.out),
            Cmd::Add(a) | Cmd::Remove(a) => Some(&mut a.out),
            Cmd::Reload(a) => Some(&mut a.out),
            Cmd::Scan(a) => Some(&mut a.out),
            Cmd::Wrap(a) => Some(&mut a.out),
            Cmd::Unwrap(a) => Some(&mut a.out),
            Cmd::Wrapped(a) => Some(a),
            Cmd::InstallService(a) => Some(&mut a.out),
            Cmd::Tmpfiles(_) | Cmd::Generate(_) => None,
        }
    }
}

impl Args {
    /// The subcommand, with the options given before it moved onto it; an error (for exit status
    /// 2) naming the option when the subcommand does not take it.
    pub fn resolve(self) -> Result<Cmd, String> {
        let mut cmd = self.cmd;
        let name = cmd.name();
        if let Some(sock) = self.socket {
            match cmd.agent_args() {
                Some(a) => {
                    a.socket.get_or_insert(sock);
                }
                None => {
                    return Err(format!(
                        "`ksmplusctl {name}` talks to no agent: it has no --socket option"
                    ))
                }
            }
        }
        if self.json {
            match cmd.json_arg() {
                Some(j) => j.json = true,
                None => return Err(format!("`ksmplusctl {name}` has no --json option")),
            }
        }
        Ok(cmd)
    }
}

/// The whole command line, for the man pages and completions.
pub fn command() -> clap::Command {
    Args::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Cmd, String> {
        Args::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .resolve()
    }

    #[test]
    fn definition_is_consistent() {
        command().debug_assert();
    }

    /// `status` with `--json` and `--socket /s`, wherever they were given.
    fn assert_status_json_on_s(v: &[&str]) {
        let Cmd::Status(s) = parse(v).unwrap() else {
            panic!("{v:?}")
        };
        assert!(s.out.json);
        assert_eq!(s.agent.socket.as_deref(), Some(std::path::Path::new("/s")));
    }

    #[test]
    fn options_live_on_the_subcommands_that_use_them() {
        assert_status_json_on_s(&["ksmplusctl", "status", "--json", "--socket", "/s"]);
        // No --socket where no agent is involved, no --json on generate.
        assert!(parse(&["ksmplusctl", "wrap", "x", "--socket", "/s"]).is_err());
        assert!(parse(&["ksmplusctl", "scan", "--all", "--socket", "/s"]).is_err());
        assert!(parse(&["ksmplusctl", "scan", "--all", "--json"]).is_ok());
        assert!(parse(&["ksmplusctl", "--json", "generate", "--man", "/m"]).is_err());
    }

    #[test]
    fn the_old_leading_position_still_works_where_it_means_something() {
        assert_status_json_on_s(&["ksmplusctl", "--socket", "/s", "--json", "status"]);
        // The subcommand's own value wins.
        let c = parse(&["ksmplusctl", "--socket", "/a", "add", "x", "--socket", "/b"]).unwrap();
        let Cmd::Add(a) = c else { panic!() };
        assert_eq!(a.agent.socket.as_deref(), Some(std::path::Path::new("/b")));
        assert!(parse(&["ksmplusctl", "--json", "scan", "--all"]).is_ok());
        let e = parse(&["ksmplusctl", "--socket", "/s", "wrap", "x"]).unwrap_err();
        assert!(e.contains("`ksmplusctl wrap` talks to no agent"), "{e}");
    }

    #[test]
    fn watch_takes_an_optional_interval() {
        let Cmd::Status(s) = parse(&["ksmplusctl", "status", "--watch"]).unwrap() else {
            panic!()
        };
        assert_eq!(s.watch, Some(2.0));
        let Cmd::Status(s) = parse(&["ksmplusctl", "status", "--watch", "0.5"]).unwrap() else {
            panic!()
        };
        assert_eq!(s.watch, Some(0.5));
        assert!(parse(&["ksmplusctl", "status", "--count", "2"]).is_err());
    }
}
