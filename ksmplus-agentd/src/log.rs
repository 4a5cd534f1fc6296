//! Leveled logging to stderr. Quiet by default (warnings and errors only); `-v` / `-vv` or
//! `KSMPLUS_LOG=info|debug` say more. Under systemd (`JOURNAL_STREAM` set) lines carry a
//! `<N>` syslog priority prefix that journald understands.

use std::sync::atomic::{AtomicU8, Ordering};

pub const ERROR: u8 = 3;
pub const WARN: u8 = 4;
pub const INFO: u8 = 6;
pub const DEBUG: u8 = 7;

static LEVEL: AtomicU8 = AtomicU8::new(WARN);
static JOURNAL: AtomicU8 = AtomicU8::new(0);

/// Sets the level from `-v` count and the `KSMPLUS_LOG` variable (the larger wins).
pub fn init(verbose: u8, env: Option<&str>) {
    let from_env = match env.map(|s| s.trim().to_ascii_lowercase()) {
        Some(s) if s == "debug" || s == "2" || s == "trace" => DEBUG,
        Some(s) if s == "info" || s == "1" => INFO,
        Some(s) if s == "error" => ERROR,
        _ => WARN,
    };
    let from_v = match verbose {
        0 => WARN,
        1 => INFO,
        _ => DEBUG,
    };
    LEVEL.store(from_env.max(from_v), Ordering::Relaxed);
    JOURNAL.store(
        std::env::var_os("JOURNAL_STREAM").is_some() as u8,
        Ordering::Relaxed,
    );
}

pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

pub fn write(level: u8, args: std::fmt::Arguments) {
    if !enabled(level) {
        return;
    }
    let line = if JOURNAL.load(Ordering::Relaxed) == 1 {
        format!("<{level}>{args}\n")
    } else {
        let name = match level {
            ERROR => "error",
            WARN => "warning",
            INFO => "info",
            _ => "debug",
        };
        format!("ksmplus-agentd: {name}: {args}\n")
    };
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
}

#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::write($crate::log::ERROR, format_args!($($t)*)) } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::write($crate::log::WARN, format_args!($($t)*)) } }
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::write($crate::log::INFO, format_args!($($t)*)) } }
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::write($crate::log::DEBUG, format_args!($($t)*)) } }
