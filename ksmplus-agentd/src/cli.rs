//! The command line, as clap types: what `ksmplus-agentd` accepts and, through [`man_page`],
//! what `man ksmplus-agentd` says (written at build time by the hidden `--generate-man DIR`,
//! from this very definition, so the page cannot drift from the options).
use clap::{CommandFactory, Parser};
use roff::{bold, roman, Roff};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "ksmplus-agentd",
    version,
    about = "KSM+ agent: finds duplicate pages in programs run under libksmplus.so and marks them for ksmd",
    long_about = "The per-user agent of ksmplus. Programs started under the LD_PRELOAD shim \
libksmplus.so say Hello on its socket; for those its policy names, it samples their memory (the \
KSM+ heuristic), asks the shim to mark only the page runs that have duplicates for the kernel's \
same-page merging (ksmd), and takes marks back that do not pay. It is controlled with \
ksmplusctl(1).\n\n\
As a systemd user service: systemctl --user enable --now ksmplus-agentd (the unit is \
ksmplus-agentd.service, Type=notify with a watchdog; its log: journalctl --user -u \
ksmplus-agentd). ksmd itself must run: the tmpfiles.d file ksmplus.conf switches it on at \
boot."
)]
pub struct Args {
    /// Socket to listen on [default: $KSMPLUS_SOCKET, else $XDG_RUNTIME_DIR/ksmplus/agent.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Policy file [default: $XDG_CONFIG_HOME/ksmplus/policy.toml]; a missing file means defaults
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,
    /// More log output (-v info, -vv debug); also KSMPLUS_LOG=info|debug
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Check the policy file, print the effective policy and exit
    #[arg(long)]
    pub check_policy: bool,
    /// What the agent learns and keeps across runs [default: $XDG_STATE_HOME/ksmplus/learned]
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Write the man page ksmplus-agentd.1 into DIR and exit (at build time; see the Makefile)
    #[arg(long, value_name = "DIR", hide = true)]
    pub generate_man: Option<PathBuf>,
}

/// The clap command (for the man page and tests).
pub fn command() -> clap::Command {
    Args::command()
}

const SOURCE: &str = concat!("ksmplus ", env!("CARGO_PKG_VERSION"));
const MANUAL: &str = "ksmplus manual";

/// A section of `.TP` items: the tag in bold, then its text.
fn items(roff: &mut Roff, title: &str, list: &[(&str, &str)]) {
    roff.control("SH", [title]);
    for (tag, text) in list {
        roff.control("TP", [])
            .text([bold(*tag)])
            .text([roman(*text)]);
    }
}

/// What clap does not know: signals, environment, files, related pages.
fn extra_sections() -> Roff {
    let mut r = Roff::new();
    items(
        &mut r,
        "SIGNALS",
        &[
            (
                "SIGHUP",
                "Re-read the policy file (systemctl --user reload ksmplus-agentd; ksmplusctl \
                 reload). A bad file is logged and the previous policy stays in force.",
            ),
            (
                "SIGTERM, SIGINT",
                "Exit: the socket is removed and the ksmd tunables the agent changed are \
                 restored. What was marked stays marked in the running programs.",
            ),
        ],
    );
    items(
        &mut r,
        "ENVIRONMENT",
        &[
            ("KSMPLUS_SOCKET", "The socket, when --socket is not given."),
            (
                "XDG_RUNTIME_DIR",
                "The default socket is $XDG_RUNTIME_DIR/ksmplus/agent.sock.",
            ),
            (
                "XDG_CONFIG_HOME",
                "The policy file is $XDG_CONFIG_HOME/ksmplus/policy.toml (default ~/.config).",
            ),
            (
                "XDG_STATE_HOME",
                "What the agent learns across runs is kept in $XDG_STATE_HOME/ksmplus/learned \
                 (default ~/.local/state).",
            ),
            (
                "KSMPLUS_LOG",
                "Log level: info or debug (as -v, -vv). Logs go to stderr: warnings and errors \
                 by default.",
            ),
            (
                "JOURNAL_STREAM",
                "Set by systemd. When it names the agent's stderr, log lines carry sd-daemon(3) \
                 priority prefixes for journald instead of the program's name and the level.",
            ),
            (
                "NOTIFY_SOCKET, WATCHDOG_USEC",
                "Set by systemd for a Type=notify unit: the agent reports READY=1, RELOADING=1, \
                 STOPPING=1 and pings the watchdog.",
            ),
        ],
    );
    items(
        &mut r,
        "FILES",
        &[
            (
                "$XDG_CONFIG_HOME/ksmplus/policy.toml",
                "The policy: which programs are tracked, sampling, limits and, for an agent \
                 running as root, ksmd's tunables. An annotated example is installed in \
                 PREFIX/share/ksmplus/policy.toml.",
            ),
            (
                "PREFIX/lib/systemd/user/ksmplus-agentd.service",
                "The systemd user unit.",
            ),
            (
                "PREFIX/lib/tmpfiles.d/ksmplus.conf",
                "Switches ksmd on at boot (systemd-tmpfiles).",
            ),
        ],
    );
    r.control("SH", ["SEE ALSO"]);
    let pages = [
        ("ksmplusctl", "1"),
        ("systemctl", "1"),
        ("journalctl", "1"),
        ("systemd-tmpfiles", "8"),
        ("madvise", "2"),
    ];
    let mut line = Vec::new();
    for (i, (name, sec)) in pages.iter().enumerate() {
        line.push(bold(*name));
        let sep = if i + 1 < pages.len() { ", " } else { "" };
        line.push(roman(format!("({sec}){sep}")));
    }
    r.text(line);
    r
}

/// `ksmplus-agentd.1`: clap_mangen's title, name, synopsis, description and options from
/// [`command`], then the sections clap does not know.
pub fn man_page() -> Vec<u8> {
    let man = clap_mangen::Man::new(command())
        .source(SOURCE)
        .manual(MANUAL);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    let _ = man.render_description_section(&mut out);
    let _ = man.render_options_section(&mut out);
    let _ = extra_sections().to_writer(&mut out);
    let _ = man.render_version_section(&mut out);
    out
}

/// Writes `dir/ksmplus-agentd.1`; returns its path.
pub fn write_man_page(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("ksmplus-agentd.1");
    std::fs::write(&p, man_page())?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn man_page_has_every_visible_option_and_the_extra_sections() {
        let page = String::from_utf8(man_page()).unwrap();
        assert!(page.contains(".TH ksmplus-agentd 1"), "{page}");
        for opt in ["socket", "policy", "verbose", "check\\-policy", "state"] {
            assert!(
                page.contains(&format!("\\-\\-{opt}")),
                "--{opt} not in:\n{page}"
            );
        }
        assert!(
            !page.contains("generate"),
            "hidden options stay hidden:\n{page}"
        );
        for s in [
            "SIGNALS",
            "ENVIRONMENT",
            "FILES",
            "SEE ALSO",
            "SIGHUP",
            "JOURNAL_STREAM",
        ] {
            assert!(page.contains(s), "{s} not in:\n{page}");
        }
        // The long description, not only the one-line about.
        assert!(page.contains("per\\-user agent"), "{page}");
    }
}
