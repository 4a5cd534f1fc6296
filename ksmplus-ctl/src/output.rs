//! What every subcommand shares on the way out: exit statuses, the `--json` option and JSON
//! replies, error lines, and names quoted for the shell in the hints.
//!
//! Contract: with `--json` exactly one JSON object is printed on stdout (one per refresh with
//! `status --watch`), carrying `version` and `ok`; `ok` is true exactly when the exit status
//! is [`exit::OK`]. Without `--json` errors go to stderr as `ksmplusctl: ...`.
use ksmplus_common::status::SimpleReply;

/// `--json`.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct JsonArg {
    /// Print the reply as JSON (one object; with --watch, one per line)
    #[arg(long)]
    pub json: bool,
}

/// Exit statuses.
pub mod exit {
    /// Done.
    pub const OK: i32 = 0;
    /// The agent refused the request, or a desktop entry was refused (the reason is printed).
    pub const REFUSED: i32 = 1;
    /// Usage error, or a local failure (a file that cannot be read or written, ...).
    pub const FAILED: i32 = 2;
    /// The agent is not running (systemctl's "program is not running").
    pub const NOT_RUNNING: i32 = 3;
}

/// Prints `v` as one line of JSON.
pub fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        // Our reply types always serialise; never print nothing under `--json`.
        Err(e) => println!("{{\"ok\":false,\"error\":\"unserialisable reply: {e}\"}}"),
    }
}

/// Reports a failure (as a [`SimpleReply`] with `--json`) and returns `code`.
pub fn fail_with(code: i32, e: &str, json_out: bool) -> i32 {
    if json_out {
        print_json(&SimpleReply::err(e));
    } else {
        eprintln!("ksmplusctl: {e}");
    }
    code
}

/// Reports a local failure: exit status [`exit::FAILED`].
pub fn fail(e: &str, json_out: bool) -> i32 {
    fail_with(exit::FAILED, e, json_out)
}

/// `s` as one shell word: unchanged when it is plain, else in single quotes.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-@,:=%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A command line for a hint, in backquotes, each argument quoted for the shell.
pub fn hint(words: &[&str]) -> String {
    let w: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
    format!("`{}`", w.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_for_the_shell() {
        assert_eq!(shell_quote("okular"), "okular");
        assert_eq!(shell_quote("gimp-2.10"), "gimp-2.10");
        assert_eq!(shell_quote("My App"), "'My App'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(
            hint(&["ksmplusctl", "add", "Web Content"]),
            "`ksmplusctl add 'Web Content'`"
        );
    }
}
