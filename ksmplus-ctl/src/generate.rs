//! `ksmplusctl generate` (hidden): the man pages and shell completions, written at build time by
//! `make` from the very clap definition that parses the command line, so they cannot drift from
//! it. A subcommand of the CLI rather than an xtask crate: nothing more to build, and a packager
//! without make runs the same command.
//!
//! Pages: `ksmplusctl.1` and one `ksmplusctl-SUBCOMMAND.1` per visible subcommand (clap_mangen).
//! `ksmplus-agentd.1` is the agent's own (`ksmplus-agentd --generate-man DIR`, from its clap
//! definition), run by the same `make` step.
//! Completions (clap_complete): `bash/ksmplusctl`, `zsh/_ksmplusctl`, `fish/ksmplusctl.fish`.
use crate::cli::{self, GenerateArgs};
use clap_complete::Shell;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why generating failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("say what to generate: --man DIR and/or --completions DIR")]
    Nothing,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> GenerateError + '_ {
    move |source| GenerateError::Io {
        path: path.to_owned(),
        source,
    }
}

const SOURCE: &str = concat!("ksmplus ", env!("CARGO_PKG_VERSION"));
const MANUAL: &str = "ksmplus manual";

/// Text for roff: backslashes doubled, `-` as `\-`, a leading `.` or `'` protected.
fn roff_text(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// A man page section of `.TP` items (tag in bold, then its text).
fn items(title: &str, list: &[(&str, &str)]) -> String {
    let mut s = format!(".SH \"{title}\"\n");
    for (tag, text) in list {
        s += &format!(".TP\n\\fB{}\\fR\n{}\n", roff_text(tag), roff_text(text));
    }
    s
}

fn see_also(pages: &[&str]) -> String {
    let refs: Vec<String> = pages
        .iter()
        .map(|p| {
            let (name, sec) = p.split_once('(').unwrap_or((p, "1)"));
            format!("\\fB{}\\fR({}", roff_text(name), sec)
        })
        .collect();
    format!(".SH \"SEE ALSO\"\n{}\n", refs.join(",\n"))
}

const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "KSMPLUS_SOCKET",
        "The agent's socket, when --socket is not given.",
    ),
    (
        "XDG_RUNTIME_DIR",
        "The default socket is $XDG_RUNTIME_DIR/ksmplus/agent.sock.",
    ),
    (
        "XDG_CONFIG_HOME",
        "The policy file is $XDG_CONFIG_HOME/ksmplus/policy.toml (default ~/.config).",
    ),
    (
        "XDG_DATA_HOME, XDG_DATA_DIRS",
        "Where wrap looks for desktop entries and writes its overrides (default ~/.local/share).",
    ),
];

fn ctl_extra_sections() -> String {
    let mut s = items(
        "EXIT STATUS",
        &[
            ("0", "Done."),
            (
                "1",
                "The agent refused the request, or a desktop entry was refused; the reason is printed.",
            ),
            ("2", "Usage error, or a local failure (a file that cannot be read or written)."),
            (
                "3",
                "The agent is not running (nothing listens on the socket), as systemctl(1) says.",
            ),
        ],
    );
    s += ".PP\nWith \\fB\\-\\-json\\fR one JSON object is printed (one per refresh with \
          \\fBstatus \\-\\-watch\\fR); it has a \\fBversion\\fR, and its \\fBok\\fR is true exactly \
          when the exit status is 0.\n";
    s += &items("ENVIRONMENT", ENVIRONMENT);
    s += &items(
        "FILES",
        &[
            (
                "$XDG_CONFIG_HOME/ksmplus/policy.toml",
                "The policy: which programs are tracked, sampling and limits. add and remove edit \
                 it, keeping comments. An annotated example is installed in \
                 PREFIX/share/ksmplus/policy.toml.",
            ),
            (
                "$XDG_DATA_HOME/applications/*.desktop",
                "The overrides wrap writes (marked X-Ksmplus-Wrapped=true); a user entry they \
                 replace is kept in $XDG_DATA_HOME/ksmplus/backup/applications.",
            ),
        ],
    );
    s += &see_also(&[
        "ksmplus-agentd(1)",
        "ksmplusctl-status(1)",
        "ksmplusctl-wrap(1)",
        "systemctl(1)",
    ]);
    s
}

/// The man page of the whole command (`ksmplusctl.1`).
fn ctl_page(cmd: &clap::Command) -> Result<Vec<u8>, std::io::Error> {
    let man = clap_mangen::Man::new(cmd.clone())
        .source(SOURCE)
        .manual(MANUAL);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    man.render_subcommands_section(&mut out)?;
    out.extend_from_slice(ctl_extra_sections().as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// The page of one subcommand (`ksmplusctl-status.1`, ...).
fn sub_page(sub: &clap::Command) -> Result<Vec<u8>, std::io::Error> {
    let mut out = Vec::new();
    clap_mangen::Man::new(sub.clone())
        .source(SOURCE)
        .manual(MANUAL)
        .render(&mut out)?;
    out.extend_from_slice(see_also(&["ksmplusctl(1)", "ksmplus-agentd(1)"]).as_bytes());
    Ok(out)
}

/// `cmd` without its hidden options and subcommands (clap_complete would offer them).
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut c = clap::Command::new("ksmplusctl")
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_subcommand(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(a) = cmd.get_about() {
        c = c.about(a.clone());
    }
    c
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), GenerateError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io_at(d))?;
    }
    let mut f = std::fs::File::create(path).map_err(io_at(path))?;
    f.write_all(bytes).map_err(io_at(path))
}

/// Writes what `args` asks for; returns the files written.
pub fn generate(args: &GenerateArgs) -> Result<Vec<PathBuf>, GenerateError> {
    if args.man.is_none() && args.completions.is_none() {
        return Err(GenerateError::Nothing);
    }
    let mut cmd = cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    if let Some(dir) = &args.man {
        let p = dir.join("ksmplusctl.1");
        write(&p, &ctl_page(&cmd).map_err(io_at(&p))?)?;
        written.push(p);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_display_name().unwrap_or(sub.get_name());
            let p = dir.join(format!("{name}.1"));
            write(&p, &sub_page(sub).map_err(io_at(&p))?)?;
            written.push(p);
        }
    }
    if let Some(dir) = &args.completions {
        let mut cmd = visible(&cmd);
        for (shell, file) in [
            (Shell::Bash, "bash/ksmplusctl"),
            (Shell::Zsh, "zsh/_ksmplusctl"),
            (Shell::Fish, "fish/ksmplusctl.fish"),
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "ksmplusctl", &mut buf);
            let p = dir.join(file);
            write(&p, &buf)?;
            written.push(p);
        }
    }
    Ok(written)
}

/// Runs `ksmplusctl generate`.
pub fn cli(args: &GenerateArgs) -> i32 {
    match generate(args) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            crate::output::exit::OK
        }
        Err(e) => crate::output::fail(&e.to_string(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_cover_every_visible_subcommand() {
        let dir = tempfile_dir("gen");
        let files = generate(&GenerateArgs {
            man: Some(dir.join("man")),
            completions: Some(dir.join("comp")),
        })
        .unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let have: Vec<&str> = names.iter().map(String::as_str).collect();
        crate::test_util::assert_has_each(
            &have,
            &[
                "ksmplusctl.1",
                "ksmplusctl-status.1",
                "ksmplusctl-wrap.1",
                "ksmplusctl-unwrap.1",
                "ksmplusctl",
                "_ksmplusctl",
                "ksmplusctl.fish",
            ],
            &format!("{names:?}"),
        );
        assert!(!names.iter().any(|n| n.contains("generate")), "{names:?}");
        let main = std::fs::read_to_string(dir.join("man/ksmplusctl.1")).unwrap();
        assert!(main.contains(".SH \"EXIT STATUS\""), "{main}");
        assert!(main.contains("not running"), "{main}");
        let bash = std::fs::read_to_string(dir.join("comp/bash/ksmplusctl")).unwrap();
        assert!(bash.contains("install-service"), "{bash}");
        for hidden in ["generate", "--socket --json status"] {
            assert!(!bash.contains(hidden), "{hidden}: {bash}");
        }
        // --socket is offered where it belongs.
        let status = &bash[bash.find("ksmplusctl__subcmd__status)").unwrap()..];
        assert!(status[..status.find(";;").unwrap()].contains("--socket"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ksmplusctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }
}
