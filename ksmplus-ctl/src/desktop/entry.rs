//! Desktop entry text (pure): parsing key files, splitting and quoting `Exec` values per the
//! Desktop Entry specification, and rewriting an entry so it starts under the shim.

pub const MARKER_KEY: &str = "X-Ksmplus-Wrapped";
const MARKER_LINE: &str = "X-Ksmplus-Wrapped=true";

use std::path::Path;

/// One line of a key file, with the byte range of its value when it is `Key=Value`.
struct Line<'a> {
    text: &'a str,
    /// The group this line belongs to (the header itself belongs to its group).
    group: Option<&'a str>,
    key: Option<&'a str>,
    value_start: usize,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut group = None;
    for raw in text.split_inclusive('\n') {
        let body = raw.trim_end_matches(['\n', '\r']);
        let t = body.trim_start();
        let mut l = Line {
            text: raw,
            group,
            key: None,
            value_start: 0,
        };
        if t.starts_with('[') && t.trim_end().ends_with(']') {
            let g = &t.trim_end()[1..t.trim_end().len() - 1];
            group = Some(g);
            l.group = group;
        } else if !t.starts_with('#') {
            if let Some(eq) = body.find('=') {
                let key = body[..eq].trim();
                if !key.is_empty() {
                    l.key = Some(key);
                    // The value starts after '=' and any spaces following it.
                    let after = &body[eq + 1..];
                    l.value_start = eq + 1 + (after.len() - after.trim_start().len());
                }
            }
        }
        out.push(l);
    }
    out
}

impl Line<'_> {
    fn value(&self) -> &str {
        let body = self.text.trim_end_matches(['\n', '\r']);
        &body[self.value_start..]
    }
}

/// The value of `key` in `group`, as written in the file (not unescaped).
pub fn get(text: &str, group: &str, key: &str) -> Option<String> {
    lines(text)
        .into_iter()
        .find(|l| l.group == Some(group) && l.key == Some(key))
        .map(|l| l.value().to_owned())
}

pub(super) fn is_true(v: Option<String>) -> bool {
    v.map(|v| v.trim() == "true").unwrap_or(false)
}

fn exec_group(g: &str) -> bool {
    g == "Desktop Entry" || g.starts_with("Desktop Action ")
}

/// Key-file string unescaping (`\s \n \t \r \\`), with, for each output byte, the offset of the
/// input byte it came from (plus a final entry for the end).
fn unescape_with_map(raw: &str) -> (String, Vec<usize>) {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut map = Vec::with_capacity(b.len() + 1);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let c = match b[i + 1] {
                b's' => Some(b' '),
                b'n' => Some(b'\n'),
                b't' => Some(b'\t'),
                b'r' => Some(b'\r'),
                b'\\' => Some(b'\\'),
                _ => None,
            };
            if let Some(c) = c {
                out.push(c);
                map.push(i);
                i += 2;
                continue;
            }
        }
        out.push(b[i]);
        map.push(i);
        i += 1;
    }
    map.push(b.len());
    (String::from_utf8_lossy(&out).into_owned(), map)
}

/// One argument of an `Exec` value: its text after the spec's unquoting, whether it was quoted,
/// and its byte range in the *raw* (file) value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Word {
    pub text: String,
    pub quoted: bool,
    pub span: (usize, usize),
}

/// Splits a raw `Exec` value into arguments per the Desktop Entry specification: key-file
/// unescaping first, then arguments separated by spaces, double-quoted arguments with `\"`,
/// `` \` ``, `\$` and `\\` escapes. Field codes stay in the text (`%f`, `%U`, …).
pub fn split_exec(raw: &str) -> Result<Vec<Word>, String> {
    let (s, map) = unescape_with_map(raw);
    let b = s.as_bytes();
    let mut words = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b' ' || b[i] == b'\t' || b[i] == b'\n' {
            i += 1;
            continue;
        }
        let start = i;
        let mut text = Vec::new();
        let mut quoted = false;
        while i < b.len() && !(b[i] == b' ' || b[i] == b'\t' || b[i] == b'\n') {
            if b[i] == b'"' {
                quoted = true;
                i += 1;
                loop {
                    if i >= b.len() {
                        return Err(format!("unterminated quote in Exec={raw}"));
                    }
                    match b[i] {
                        b'"' => {
                            i += 1;
                            break;
                        }
                        b'\\'
                            if i + 1 < b.len()
                                && matches!(b[i + 1], b'"' | b'`' | b'$' | b'\\') =>
                        {
                            text.push(b[i + 1]);
                            i += 2;
                        }
                        c => {
                            text.push(c);
                            i += 1;
                        }
                    }
                }
            } else {
                text.push(b[i]);
                i += 1;
            }
        }
        words.push(Word {
            text: String::from_utf8_lossy(&text).into_owned(),
            quoted,
            span: (map[start], map[i]),
        });
    }
    Ok(words)
}

/// Quotes one argument for an `Exec` value (spec quoting, then key-file escaping of `\`).
pub fn quote_exec_arg(arg: &str) -> String {
    const RESERVED: &[char] = &[
        ' ', '\t', '\n', '"', '\'', '\\', '>', '<', '~', '|', '&', ';', '$', '*', '?', '#', '(',
        ')', '`',
    ];
    let s = if arg.contains(RESERVED) || arg.is_empty() {
        let mut q = String::from("\"");
        for c in arg.chars() {
            if matches!(c, '"' | '`' | '$' | '\\') {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    } else {
        arg.to_owned()
    };
    // A literal '%' is written "%%" in Exec; key-file level: '\' is written "\\".
    s.replace('%', "%%").replace('\\', "\\\\")
}

fn is_assignment(w: &str) -> bool {
    match w.split_once('=') {
        Some((k, _)) => {
            !k.is_empty()
                && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                && !k.as_bytes()[0].is_ascii_digit()
        }
        None => false,
    }
}

fn is_env(w: &str) -> bool {
    w == "env" || w.ends_with("/env")
}

/// Where the words of an `env [options] [VAR=x …] prog …` prefix end: the index of the program
/// word, and whether the prefix can be merged into (`-S` cannot).
fn env_prefix(words: &[Word]) -> (usize, bool) {
    if words.is_empty() || !is_env(&words[0].text) {
        return (0, true);
    }
    let mut i = 1;
    let mut mergeable = true;
    while i < words.len() {
        let w = words[i].text.as_str();
        if w == "--" {
            i += 1;
            continue;
        }
        if w.starts_with('-') && w.len() > 1 {
            if w.starts_with("-S") || w.starts_with("--split-string") {
                mergeable = false;
            }
            // Options taking a separate argument.
            if matches!(
                w,
                "-u" | "-C" | "-S" | "--unset" | "--chdir" | "--split-string"
            ) {
                i += 1;
            }
            i += 1;
            continue;
        }
        if is_assignment(w) {
            i += 1;
            continue;
        }
        break;
    }
    (i, mergeable)
}

/// The program an `Exec` value runs: the file name of its first word after an `env` prefix.
pub fn exec_program(raw: &str) -> Option<String> {
    let words = split_exec(raw).ok()?;
    let (i, _) = env_prefix(&words);
    let w = words.get(i)?;
    Some(
        Path::new(&w.text)
            .file_name()?
            .to_string_lossy()
            .into_owned(),
    )
}

/// The `Exec` value running `raw` under `lib` (see the module invariants). Idempotent on its own
/// output for the same `lib`.
pub fn wrap_exec(raw: &str, lib: &str) -> Result<String, String> {
    let words = split_exec(raw)?;
    if words.is_empty() {
        return Err("empty Exec".into());
    }
    let ours = format!("LD_PRELOAD={lib}");
    if !is_env(&words[0].text) {
        return Ok(format!("env {ours} {raw}"));
    }
    let (prog, mergeable) = env_prefix(&words);
    if !mergeable {
        return Err(format!(
            "Exec={raw}: `env -S` cannot be merged into; wrap this entry by hand"
        ));
    }
    if prog >= words.len() {
        return Err(format!("Exec={raw}: `env` without a program"));
    }
    // An existing LD_PRELOAD assignment: append ours to it (unless it is already there).
    if let Some(w) = words[1..prog]
        .iter()
        .find(|w| w.text.starts_with("LD_PRELOAD="))
    {
        let val = &w.text["LD_PRELOAD=".len()..];
        if val.split([':', ' ']).any(|p| p == lib) {
            return Ok(raw.to_owned());
        }
        let new = if val.is_empty() {
            ours
        } else {
            format!("LD_PRELOAD={val}:{lib}")
        };
        return Ok(format!(
            "{}{}{}",
            &raw[..w.span.0],
            quote_exec_arg(&new),
            &raw[w.span.1..]
        ));
    }
    // Insert our assignment right before the program word: after options (`env -i` would clear
    // an earlier one) and after the other assignments.
    let at = words[prog].span.0;
    Ok(format!("{}{ours} {}", &raw[..at], &raw[at..]))
}

/// The program word of a raw `Exec` value (after an `env` prefix), as a `TryExec` value
/// (key-file escaped); `None` when there is no plain one (a `%` would be a field code).
fn try_exec_value(raw: &str) -> Option<String> {
    let words = split_exec(raw).ok()?;
    let (i, _) = env_prefix(&words);
    let w = &words.get(i)?.text;
    if w.is_empty() || w.contains('%') {
        return None;
    }
    let mut v = String::with_capacity(w.len());
    for (n, c) in w.chars().enumerate() {
        match c {
            '\\' => v.push_str("\\\\"),
            '\n' => v.push_str("\\n"),
            '\t' => v.push_str("\\t"),
            '\r' => v.push_str("\\r"),
            ' ' if n == 0 => v.push_str("\\s"),
            c => v.push(c),
        }
    }
    Some(v)
}

/// The wrapped entry for `base`: every `Exec` of the entry and its actions wrapped, the marker
/// added after the `[Desktop Entry]` header, then `TryExec=` naming the program when the entry
/// has none; everything else byte for byte.
pub fn wrap_entry(base: &str, lib: &str) -> Result<String, String> {
    if is_true(get(base, "Desktop Entry", "DBusActivatable")) {
        return Err(
            "DBusActivatable=true: launchers start it through D-Bus, not its Exec line, \
             so a wrapped Exec would not be used; start it under the shim by hand \
             (env LD_PRELOAD=… prog), see docs/DESKTOP.md"
                .into(),
        );
    }
    if is_true(get(base, "Desktop Entry", "Hidden")) {
        return Err("Hidden=true: the entry is deleted, nothing to wrap".into());
    }
    let Some(exec) = get(base, "Desktop Entry", "Exec") else {
        return Err("no Exec key in [Desktop Entry] (not an application?)".into());
    };
    let try_exec = match get(base, "Desktop Entry", "TryExec") {
        Some(_) => None,
        None => try_exec_value(&exec),
    };
    let mut out = String::with_capacity(base.len() + 128);
    let mut marked = false;
    for l in lines(base) {
        if l.key == Some(MARKER_KEY) && l.group == Some("Desktop Entry") {
            continue; // a marker copied from elsewhere: ours is added below
        }
        if l.key == Some("Exec") && l.group.is_some_and(exec_group) {
            let body = l.text.trim_end_matches(['\n', '\r']);
            let eol = &l.text[body.len()..];
            let wrapped = wrap_exec(l.value(), lib)
                .map_err(|e| format!("[{}]: {e}", l.group.unwrap_or("")))?;
            out.push_str(&body[..l.value_start]);
            out.push_str(&wrapped);
            out.push_str(eol);
            continue;
        }
        out.push_str(l.text);
        if !marked && l.key.is_none() && l.group == Some("Desktop Entry") && l.text.contains('[') {
            if !l.text.ends_with('\n') {
                out.push('\n');
            }
            let eol = if l.text.ends_with("\r\n") {
                "\r\n"
            } else {
                "\n"
            };
            out.push_str(MARKER_LINE);
            out.push_str(eol);
            if let Some(t) = &try_exec {
                out.push_str("TryExec=");
                out.push_str(t);
                out.push_str(eol);
            }
            marked = true;
        }
    }
    if !marked {
        return Err("no [Desktop Entry] group".into());
    }
    Ok(out)
}

/// True when `text` is an override written by `wrap`.
pub fn is_wrapped(text: &str) -> bool {
    is_true(get(text, "Desktop Entry", MARKER_KEY))
}

// ---------------------------------------------------------------------------------------------
// Finding entries

#[cfg(test)]
mod tests {
    use super::*;

    const LIB: &str = "/opt/k/lib/libksmplus.so";

    #[test]
    fn split_quoted_and_field_codes() {
        let w = split_exec(r#"prog --title "a \"b\" \\$c" %U"#).unwrap();
        let t: Vec<&str> = w.iter().map(|w| w.text.as_str()).collect();
        // In the file `\\$` is a key-file escaped backslash then `$`: `\$` in Exec, i.e. `$`.
        assert_eq!(t, ["prog", "--title", "a \"b\" $c", "%U"]);
        assert!(w[2].quoted);
        // `\s` is a key-file escape for a space, which then separates arguments.
        let w = split_exec(r"a\sb c").unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[1].span, (3, 4));
        assert!(split_exec(r#"prog "open"#).is_err());
    }

    #[test]
    fn program_names() {
        assert_eq!(exec_program("okular %U").unwrap(), "okular");
        assert_eq!(exec_program("/usr/bin/okular %U").unwrap(), "okular");
        assert_eq!(
            exec_program("env GTK_THEME=Adwaita:dark gimp-2.10 %U").unwrap(),
            "gimp-2.10"
        );
        assert_eq!(
            exec_program(r#"/usr/bin/env -u FOO BAR=1 "/opt/My App/app" %f"#).unwrap(),
            "app"
        );
    }

    #[test]
    fn wrap_plain_env_and_existing_preload() {
        for (exec, want) in [
            ("okular %U", format!("env LD_PRELOAD={LIB} okular %U")),
            (
                "env FOO=1 BAR=\"x y\" prog %f",
                format!("env FOO=1 BAR=\"x y\" LD_PRELOAD={LIB} prog %f"),
            ),
            (
                "env -i HOME=/h prog",
                format!("env -i HOME=/h LD_PRELOAD={LIB} prog"),
            ),
            (
                "env LD_PRELOAD=/a.so prog %u",
                format!("env LD_PRELOAD=/a.so:{LIB} prog %u"),
            ),
        ] {
            assert_eq!(wrap_exec(exec, LIB).unwrap(), want);
        }
        // Idempotent on its own output.
        let once = wrap_exec("env LD_PRELOAD=/a.so prog", LIB).unwrap();
        assert_eq!(wrap_exec(&once, LIB).unwrap(), once);
        let once = wrap_exec("prog", LIB).unwrap();
        assert_eq!(wrap_exec(&once, LIB).unwrap(), once);
        assert!(wrap_exec("env -S 'a b' prog", LIB).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_exec_arg("plain"), "plain");
        assert_eq!(quote_exec_arg("a b"), "\"a b\"");
        assert_eq!(quote_exec_arg("a$b"), "\"a\\\\$b\"");
        assert_eq!(quote_exec_arg("100%"), "100%%");
        let w = split_exec(&quote_exec_arg("x \"y\" $z `w` \\v")).unwrap();
        assert_eq!(w[0].text, "x \"y\" $z `w` \\v");
    }

    #[test]
    fn entry_marker_and_actions() {
        let base = "[Desktop Entry]\r\nName=X\r\nExec = x %f\r\n\r\n[Desktop Action new]\r\nExec=x --new\r\n[Other]\r\nExec=keep\r\n";
        let w = wrap_entry(base, LIB).unwrap();
        assert_eq!(
            w,
            format!("[Desktop Entry]\r\nX-Ksmplus-Wrapped=true\r\nTryExec=x\r\nName=X\r\nExec = env LD_PRELOAD={LIB} x %f\r\n\r\n[Desktop Action new]\r\nExec=env LD_PRELOAD={LIB} x --new\r\n[Other]\r\nExec=keep\r\n")
        );
        assert!(is_wrapped(&w));
        assert!(wrap_entry("[Desktop Entry]\nDBusActivatable=true\nExec=x\n", LIB).is_err());
        assert!(wrap_entry("[Desktop Entry]\nHidden=true\nExec=x\n", LIB).is_err());
        assert!(wrap_entry("[Desktop Entry]\nType=Link\nURL=http://x\n", LIB).is_err());
    }

    #[test]
    fn try_exec_is_added_only_where_missing() {
        // Kept as it was.
        let w = wrap_entry("[Desktop Entry]\nTryExec=/opt/x\nExec=x\n", LIB).unwrap();
        assert_eq!(w.matches("TryExec=").count(), 1);
        assert!(w.contains("TryExec=/opt/x\n"));
        // The program after an env prefix, unquoted, key-file escaped.
        let w = wrap_entry(
            "[Desktop Entry]\nExec=env A=1 \"/opt/My App/run\\\\x\" %U\n",
            LIB,
        )
        .unwrap();
        assert!(w.contains("\nTryExec=/opt/My App/run\\\\x\n"), "{w}");
        assert_eq!(
            get(&w, "Desktop Entry", "TryExec").unwrap(),
            "/opt/My App/run\\\\x"
        );
        // A program word with a field code: no TryExec rather than a wrong one.
        let w = wrap_entry("[Desktop Entry]\nExec=%k/run\n", LIB).unwrap();
        assert!(!w.contains("TryExec"), "{w}");
        // Wrapping the wrapped entry's base again gives the same bytes.
        let base = "[Desktop Entry]\nExec=x %f\n";
        assert_eq!(
            wrap_entry(base, LIB).unwrap(),
            wrap_entry(base, LIB).unwrap()
        );
    }
}
