//! The agent's backend for the `log` facade: one line per record on stderr, in the form the
//! reader of that stderr understands. Call sites use the facade's macros (`crate::info!` and
//! the others are `log`'s own, re-exported at the crate root).
//!
//! - **journald** — stderr is the journal's stream when `$JOURNAL_STREAM` (`DEV:INODE`, set
//!   by systemd for a unit whose output goes to the journal) names the file fd 2 is open on.
//!   Then each line is `<N>message`, N the sd-daemon(3) priority (3 error, 4 warning, 6 info,
//!   7 debug), with no program name and no timestamp: journald records both.
//! - **anything else** (a terminal, a file, a pipe; also a child that inherited
//!   `$JOURNAL_STREAM` but whose stderr was redirected) — `ksmplus-agentd: warning: message`.
//!
//! Quiet by default (warnings and errors); `-v` or `KSMPLUS_LOG=info` (or `1`) adds info, `-vv`
//! or `KSMPLUS_LOG=debug` (`2`, `trace`) debug; the more verbose of the two wins.
//!
//! Invariants: one `write(2)` per record (lines of concurrent writers never interleave);
//! a failed write is ignored (nowhere left to report it); the records of dependencies (mio's)
//! go through the same filter and format.
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

/// The level from `-v` count and `$KSMPLUS_LOG` (the more verbose wins).
pub fn level(verbose: u8, env: Option<&str>) -> LevelFilter {
    let from_env = match env.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("debug" | "2" | "trace") => LevelFilter::Debug,
        Some("info" | "1") => LevelFilter::Info,
        Some("error") => LevelFilter::Error,
        _ => LevelFilter::Warn,
    };
    let from_v = match verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        _ => LevelFilter::Debug,
    };
    from_env.max(from_v)
}

/// Whether `journal_stream` (`$JOURNAL_STREAM`, `DEV:INODE` in decimal) names `stderr`'s
/// `(st_dev, st_ino)`.
pub fn is_journal(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let parsed = journal_stream.and_then(|v| {
        let (dev, ino) = v.trim().split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    });
    matches!((parsed, stderr), (Some(j), Some(s)) if j == s)
}

/// The sd-daemon(3) priority of a level.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// One record as written: for the journal each line gets the priority prefix (journald takes
/// every line as its own entry); elsewhere the program and level name the record once.
pub fn format(journal: bool, level: Level, msg: &str) -> String {
    if journal {
        let p = priority(level);
        let mut s = String::with_capacity(msg.len() + 4);
        for line in msg.lines() {
            s.push_str(&format!("<{p}>{line}\n"));
        }
        if s.is_empty() {
            s = format!("<{p}>\n");
        }
        s
    } else {
        let name = match level {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug | Level::Trace => "debug",
        };
        format!("ksmplus-agentd: {name}: {msg}\n")
    }
}

struct Stderr {
    journal: bool,
    level: LevelFilter,
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            let line = format(self.journal, r.level(), &r.args().to_string());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// `(st_dev, st_ino)` of what fd 2 is open on.
fn stderr_id() -> Option<(u64, u64)> {
    let st = nix::sys::stat::fstat(std::io::stderr()).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// Installs the backend (once; later calls only change nothing) at the level of `verbose`
/// and `env` (see [`level`]).
pub fn init(verbose: u8, env: Option<&str>) {
    let level = level(verbose, env);
    let journal = is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref(), stderr_id());
    if log::set_boxed_logger(Box::new(Stderr { journal, level })).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_carry_priorities_and_nothing_else() {
        assert_eq!(format(true, Level::Error, "bad"), "<3>bad\n");
        assert_eq!(format(true, Level::Warn, "w"), "<4>w\n");
        assert_eq!(format(true, Level::Info, "listening"), "<6>listening\n");
        assert_eq!(format(true, Level::Debug, "d"), "<7>d\n");
        assert_eq!(format(true, Level::Trace, "t"), "<7>t\n");
        // Every line of a multi-line message is an entry of its own, at the same priority.
        assert_eq!(format(true, Level::Warn, "a\nb"), "<4>a\n<4>b\n");
        assert_eq!(format(true, Level::Warn, "a\n"), "<4>a\n", "no empty entry");
        assert_eq!(format(true, Level::Info, ""), "<6>\n");
    }

    #[test]
    fn terminal_lines_name_the_program_and_the_level() {
        assert_eq!(
            format(false, Level::Warn, "cannot save x"),
            "ksmplus-agentd: warning: cannot save x\n"
        );
        assert_eq!(
            format(false, Level::Error, "e"),
            "ksmplus-agentd: error: e\n"
        );
        assert_eq!(format(false, Level::Info, "i"), "ksmplus-agentd: info: i\n");
        assert_eq!(
            format(false, Level::Debug, "d"),
            "ksmplus-agentd: debug: d\n"
        );
    }

    #[test]
    fn journal_only_when_the_stream_is_stderr() {
        assert!(is_journal(Some("8:1234"), Some((8, 1234))));
        assert!(is_journal(Some(" 8:1234\n"), Some((8, 1234))));
        // Inherited by a child whose stderr went elsewhere.
        assert!(!is_journal(Some("8:1234"), Some((8, 99))));
        assert!(!is_journal(Some("8:1234"), None));
        assert!(!is_journal(None, Some((8, 1234))));
        // Set but not DEV:INODE (the old rule took any value as "journal").
        for junk in ["", "1", "x:y", "8:", ":1234", "8:1234:5"] {
            assert!(!is_journal(Some(junk), Some((8, 1234))), "{junk:?}");
        }
    }

    #[test]
    fn level_from_flags_and_environment() {
        assert_eq!(level(0, None), LevelFilter::Warn);
        assert_eq!(level(1, None), LevelFilter::Info);
        assert_eq!(level(2, None), LevelFilter::Debug);
        assert_eq!(level(5, None), LevelFilter::Debug);
        assert_eq!(level(0, Some("info")), LevelFilter::Info);
        assert_eq!(level(0, Some("1")), LevelFilter::Info);
        assert_eq!(level(0, Some(" DEBUG ")), LevelFilter::Debug);
        assert_eq!(level(0, Some("trace")), LevelFilter::Debug);
        assert_eq!(level(0, Some("2")), LevelFilter::Debug);
        assert_eq!(level(0, Some("nonsense")), LevelFilter::Warn);
        // The more verbose wins.
        assert_eq!(level(2, Some("info")), LevelFilter::Debug);
        assert_eq!(level(1, Some("debug")), LevelFilter::Debug);
        assert_eq!(level(0, Some("error")), LevelFilter::Warn);
    }
}
