//! `ksmplusctl wrap` / `unwrap` / `wrapped`: start a desktop program from the menu under the shim.
//!
//! `wrap APP` writes, for each matching desktop entry, a user override with the same desktop-file
//! id in `$XDG_DATA_HOME/applications` (which takes precedence over `$XDG_DATA_DIRS`, per the
//! Desktop Entry / Base Directory specifications) whose `Exec` lines run the original command as
//! `env LD_PRELOAD=/abs/libksmplus.so <original command>`.
//!
//! Invariants:
//! - Only files under `$XDG_DATA_HOME` are ever written, renamed or removed.
//! - The override is the base entry byte for byte, except: the value of each `Exec` key in the
//!   `[Desktop Entry]` and `[Desktop Action *]` groups gets our words *prepended* (the original
//!   command text, its quoting and its field codes are kept verbatim; an existing `env` prefix is
//!   merged into, an existing `LD_PRELOAD=` assignment gets our library appended), and one line
//!   `X-Ksmplus-Wrapped=true` follows the `[Desktop Entry]` header.
//! - The base entry is the one the menu would use without us: an existing user override (moved to
//!   `$XDG_DATA_HOME/ksmplus/backup/applications/<id>` by rename, so `unwrap` puts back exactly
//!   that file), else the first entry with that id in `$XDG_DATA_DIRS`. Wrapping again rebuilds
//!   from the base, so wrap twice = wrap once (and a new `--lib` replaces the old one).
//! - `unwrap` only touches overrides carrying the marker: it renames the backup back, or deletes
//!   the override when there was none.
//! - `DBusActivatable=true` entries are refused: launchers start them through D-Bus, never through
//!   `Exec`, so a wrapped `Exec` would look wrapped and not be.
//! - `Hidden=true` means deleted (spec): such an entry is not wrapped.
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub const MARKER_KEY: &str = "X-Ksmplus-Wrapped";
const MARKER_LINE: &str = "X-Ksmplus-Wrapped=true";

/// The XDG directories used for lookup and writing.
#[derive(Clone, Debug)]
pub struct Xdg {
    /// `$XDG_DATA_HOME` (default `~/.local/share`): overrides and backups go here.
    pub data_home: PathBuf,
    /// `$XDG_DATA_DIRS` (default `/usr/local/share:/usr/share`), most important first.
    pub data_dirs: Vec<PathBuf>,
}

impl Xdg {
    /// From the environment, with the specification's defaults.
    pub fn from_env() -> Result<Xdg, String> {
        let data_home = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                let home = std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .ok_or("neither XDG_DATA_HOME nor HOME is set")?;
                PathBuf::from(home).join(".local/share")
            }
        };
        let dirs = std::env::var("XDG_DATA_DIRS")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "/usr/local/share:/usr/share".into());
        Ok(Xdg {
            data_home,
            data_dirs: dirs
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(PathBuf::from)
                .collect(),
        })
    }

    pub fn user_apps(&self) -> PathBuf {
        self.data_home.join("applications")
    }

    pub fn backup_dir(&self) -> PathBuf {
        self.data_home.join("ksmplus/backup/applications")
    }
}

/// Why a wrap or unwrap did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn ioe(path: &Path) -> impl FnOnce(io::Error) -> DesktopError + '_ {
    move |source| DesktopError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Key files (pure)

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

fn is_true(v: Option<String>) -> bool {
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

/// The wrapped entry for `base`: every `Exec` of the entry and its actions wrapped, the marker
/// added after the `[Desktop Entry]` header, everything else byte for byte.
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
    if get(base, "Desktop Entry", "Exec").is_none() {
        return Err("no Exec key in [Desktop Entry] (not an application?)".into());
    }
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
            out.push_str(MARKER_LINE);
            out.push_str(if l.text.ends_with("\r\n") {
                "\r\n"
            } else {
                "\n"
            });
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

/// Every `*.desktop` under `apps`, by desktop-file id (relative path with `/` → `-`).
fn entries_in(apps: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![apps.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "desktop") {
                if let Ok(rel) = p.strip_prefix(apps) {
                    let id = rel.to_string_lossy().replace('/', "-");
                    out.insert(id, p);
                }
            }
        }
    }
    out
}

/// One desktop-file id with the files that define it, most important first.
#[derive(Clone, Debug)]
pub struct Found {
    pub id: String,
    /// The user override in `$XDG_DATA_HOME/applications`, if any.
    pub user: Option<PathBuf>,
    /// The first system file (from `$XDG_DATA_DIRS`), if any.
    pub system: Option<PathBuf>,
}

/// Every desktop-file id visible in the XDG directories.
pub fn all_entries(xdg: &Xdg) -> BTreeMap<String, Found> {
    let mut out: BTreeMap<String, Found> = BTreeMap::new();
    for (id, p) in entries_in(&xdg.user_apps()) {
        out.insert(
            id.clone(),
            Found {
                id,
                user: Some(p),
                system: None,
            },
        );
    }
    for d in &xdg.data_dirs {
        for (id, p) in entries_in(&d.join("applications")) {
            let f = out.entry(id.clone()).or_insert(Found {
                id,
                user: None,
                system: None,
            });
            if f.system.is_none() {
                f.system = Some(p);
            }
        }
    }
    out
}

impl Found {
    /// The entry the menu would use without ksmplus, and where it lives: the backup of a
    /// user override we replaced, the user override, or the system file.
    pub fn base(&self, xdg: &Xdg) -> Option<PathBuf> {
        if let Some(u) = &self.user {
            match std::fs::read_to_string(u) {
                Ok(t) if is_wrapped(&t) => {
                    let b = xdg.backup_dir().join(&self.id);
                    if b.exists() || b.is_symlink() {
                        return Some(b);
                    }
                }
                _ => return Some(u.clone()),
            }
        }
        self.system.clone()
    }
}

/// The ids `app` names: an id (`org.kde.okular` or `org.kde.okular.desktop`) if one exists,
/// else every entry whose `Exec` program (its base entry's) has that file name.
pub fn resolve(xdg: &Xdg, app: &str) -> Vec<Found> {
    let all = all_entries(xdg);
    let id = if app.ends_with(".desktop") {
        app.to_owned()
    } else {
        format!("{app}.desktop")
    };
    if let Some(f) = all.get(&id) {
        return vec![f.clone()];
    }
    // By program name, deleted (Hidden=true) entries are not candidates.
    all.into_values()
        .filter(|f| {
            let Some(t) = f.base(xdg).and_then(|p| std::fs::read_to_string(p).ok()) else {
                return false;
            };
            !is_true(get(&t, "Desktop Entry", "Hidden"))
                && get(&t, "Desktop Entry", "Exec")
                    .and_then(|e| exec_program(&e))
                    .is_some_and(|p| p == app)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Doing it

/// What `wrap` or `unwrap` did to one id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Wrapped { id: String, path: PathBuf },
    Unchanged { id: String, path: PathBuf },
    Refused { id: String, why: String },
    Restored { id: String, path: PathBuf },
    Removed { id: String, path: PathBuf },
    NotWrapped { id: String },
}

fn write_atomic(path: &Path, text: &str) -> Result<(), DesktopError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(ioe(dir))?;
    ksmplus_common::fsutil::write_atomic(path, text.as_bytes()).map_err(ioe(path))
}

fn move_file(from: &Path, to: &Path) -> Result<(), DesktopError> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d).map_err(ioe(d))?;
    }
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to).map_err(ioe(to))?;
            std::fs::remove_file(from).map_err(ioe(from))
        }
        Err(e) => Err(DesktopError::Io {
            path: from.to_owned(),
            source: e,
        }),
    }
}

fn under(p: &Path, dir: &Path) -> bool {
    p.starts_with(dir)
}

/// Wraps one id. Only `$XDG_DATA_HOME` is written.
pub fn wrap_one(xdg: &Xdg, f: &Found, lib: &str) -> Result<Outcome, DesktopError> {
    let id = f.id.clone();
    let Some(base) = f.base(xdg) else {
        return Ok(Outcome::Refused {
            id,
            why: "wrapped override without its original (no backup and no system entry); \
                  run `ksmplusctl unwrap` first"
                .into(),
        });
    };
    let base_text = std::fs::read_to_string(&base).map_err(ioe(&base))?;
    let new = match wrap_entry(&base_text, lib) {
        Ok(t) => t,
        Err(why) => return Ok(Outcome::Refused { id, why }),
    };
    let target = xdg.user_apps().join(f.user.as_ref().map_or_else(
        || PathBuf::from(&id),
        |u| {
            u.strip_prefix(xdg.user_apps())
                .map(Path::to_path_buf)
                .unwrap_or_else(|_| PathBuf::from(&id))
        },
    ));
    assert!(under(&target, &xdg.data_home));
    if let Ok(cur) = std::fs::read_to_string(&target) {
        if cur == new {
            return Ok(Outcome::Unchanged { id, path: target });
        }
        if !is_wrapped(&cur) {
            // A user override of their own: keep it, exactly, for unwrap.
            move_file(&target, &xdg.backup_dir().join(&id))?;
        }
    }
    write_atomic(&target, &new)?;
    Ok(Outcome::Wrapped { id, path: target })
}

/// Unwraps one id: the backup back in place, or the override removed.
pub fn unwrap_one(xdg: &Xdg, f: &Found) -> Result<Outcome, DesktopError> {
    let id = f.id.clone();
    let Some(user) = &f.user else {
        return Ok(Outcome::NotWrapped { id });
    };
    let text = std::fs::read_to_string(user).map_err(ioe(user))?;
    if !is_wrapped(&text) {
        return Ok(Outcome::NotWrapped { id });
    }
    assert!(under(user, &xdg.data_home));
    let backup = xdg.backup_dir().join(&id);
    if backup.exists() || backup.is_symlink() {
        move_file(&backup, user)?;
        // Leave no empty ksmplus/backup/applications behind (remove_dir keeps non-empty ones).
        let mut d = Some(xdg.backup_dir());
        while let Some(dir) = d.filter(|d| d.starts_with(xdg.data_home.join("ksmplus"))) {
            if std::fs::remove_dir(&dir).is_err() {
                break;
            }
            d = dir.parent().map(Path::to_path_buf);
        }
        Ok(Outcome::Restored {
            id,
            path: user.clone(),
        })
    } else {
        std::fs::remove_file(user).map_err(ioe(user))?;
        Ok(Outcome::Removed {
            id,
            path: user.clone(),
        })
    }
}

/// The overrides written by `wrap`: (id, path, has a backup).
pub fn wrapped(xdg: &Xdg) -> Vec<(String, PathBuf, bool)> {
    entries_in(&xdg.user_apps())
        .into_iter()
        .filter(|(_, p)| {
            std::fs::read_to_string(p)
                .map(|t| is_wrapped(&t))
                .unwrap_or(false)
        })
        .map(|(id, p)| {
            let b = xdg.backup_dir().join(&id);
            let has = b.exists() || b.is_symlink();
            (id, p, has)
        })
        .collect()
}

/// `libksmplus.so` for `--lib`, else next to this executable (`../lib/`, same directory), else
/// `/usr/local/lib/libksmplus.so`. Absolute; refused when LD_PRELOAD could not carry it.
pub fn find_lib(arg: Option<&Path>) -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    let cands: Vec<PathBuf> = match arg {
        Some(p) => vec![p.to_owned()],
        None => {
            let mut v = Vec::new();
            if let Some(dir) = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
            {
                v.push(dir.join("../lib/libksmplus.so"));
                v.push(dir.join("libksmplus.so"));
            }
            v.push(PathBuf::from("/usr/local/lib/libksmplus.so"));
            v
        }
    };
    for c in cands {
        if c.is_file() {
            let abs = c
                .canonicalize()
                .map_err(|e| format!("{}: {e}", c.display()))?;
            let s = abs.to_string_lossy();
            if !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._+-@,".contains(&b))
            {
                return Err(format!(
                    "{s}: LD_PRELOAD cannot carry this path (space, ':' or another special \
                     character); install libksmplus.so somewhere plainer and pass --lib"
                ));
            }
            return Ok(abs);
        }
        tried.push(c.display().to_string());
    }
    Err(format!(
        "libksmplus.so not found (tried {}); build it (`cargo build --release -p ksmplus-preload`) \
         and pass --lib /path/to/libksmplus.so",
        tried.join(", ")
    ))
}

/// `ksmplusctl wrap` options.
#[derive(clap::Args, Debug, Clone)]
pub struct WrapArgs {
    /// Desktop-file id (`org.kde.okular[.desktop]`) or program name (every entry running it)
    pub app: String,
    /// The shim [default: next to ksmplusctl (../lib/ or same dir), else /usr/local/lib]
    #[arg(long)]
    pub lib: Option<PathBuf>,
}

/// `ksmplusctl unwrap` options.
#[derive(clap::Args, Debug, Clone)]
pub struct UnwrapArgs {
    /// Desktop-file id or program name, as given to `wrap`
    pub app: String,
}

fn print_outcomes(v: &[Outcome], json_out: bool) -> i32 {
    let mut refused = 0;
    let mut js = Vec::new();
    for o in v {
        let (what, id, detail) = match o {
            Outcome::Wrapped { id, path } => ("wrapped", id, path.display().to_string()),
            Outcome::Unchanged { id, path } => ("already wrapped", id, path.display().to_string()),
            Outcome::Restored { id, path } => (
                "unwrapped (previous override restored)",
                id,
                path.display().to_string(),
            ),
            Outcome::Removed { id, path } => (
                "unwrapped (override removed)",
                id,
                path.display().to_string(),
            ),
            Outcome::NotWrapped { id } => ("not wrapped", id, String::new()),
            Outcome::Refused { id, why } => {
                refused += 1;
                ("refused", id, why.clone())
            }
        };
        if json_out {
            js.push(serde_json::json!({"id": id, "result": what, "detail": detail}));
        } else if what == "refused" {
            eprintln!("{id}: not wrapped: {detail}");
        } else if detail.is_empty() {
            println!("{id}: {what}");
        } else {
            println!("{id}: {what}: {detail}");
        }
    }
    if json_out {
        println!("{}", serde_json::json!({"ok": refused == 0, "entries": js}));
    }
    if refused == 0 {
        0
    } else {
        1
    }
}

/// Runs `ksmplusctl wrap`.
pub fn cli_wrap(args: &WrapArgs, json_out: bool) -> i32 {
    let run = || -> Result<Vec<Outcome>, String> {
        let xdg = Xdg::from_env()?;
        let lib = find_lib(args.lib.as_deref())?;
        let found = resolve(&xdg, &args.app);
        if found.is_empty() {
            return Err(format!(
                "no desktop entry with id {0:?} or running a program named {0:?} in {1}/applications or {2}",
                args.app,
                xdg.data_home.display(),
                xdg.data_dirs
                    .iter()
                    .map(|d| format!("{}/applications", d.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        found
            .iter()
            .map(|f| wrap_one(&xdg, f, &lib.to_string_lossy()).map_err(|e| e.to_string()))
            .collect()
    };
    match run() {
        Ok(v) => {
            let code = print_outcomes(&v, json_out);
            // The programs the wrapped entries run, for the `ksmplusctl add` hint.
            let mut progs: Vec<String> = v
                .iter()
                .filter_map(|o| match o {
                    Outcome::Wrapped { path, .. } | Outcome::Unchanged { path, .. } => {
                        std::fs::read_to_string(path).ok()
                    }
                    _ => None,
                })
                .filter_map(|t| get(&t, "Desktop Entry", "Exec"))
                .filter_map(|e| exec_program(&e))
                .collect();
            progs.sort();
            progs.dedup();
            if !json_out && !progs.is_empty() {
                println!(
                    "started from the menu, these now run under the shim; the agent merges them once \
                     tracked: {}",
                    progs
                        .iter()
                        .map(|p| format!("`ksmplusctl add {p}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            code
        }
        Err(e) => fail(&e, json_out),
    }
}

/// Runs `ksmplusctl unwrap`.
pub fn cli_unwrap(args: &UnwrapArgs, json_out: bool) -> i32 {
    let run = || -> Result<Vec<Outcome>, String> {
        let xdg = Xdg::from_env()?;
        let found = resolve(&xdg, &args.app);
        if found.is_empty() {
            return Err(format!("no desktop entry matches {:?}", args.app));
        }
        found
            .iter()
            .map(|f| unwrap_one(&xdg, f).map_err(|e| e.to_string()))
            .collect()
    };
    match run() {
        Ok(v) => print_outcomes(&v, json_out),
        Err(e) => fail(&e, json_out),
    }
}

/// Runs `ksmplusctl wrapped`.
pub fn cli_wrapped(json_out: bool) -> i32 {
    let xdg = match Xdg::from_env() {
        Ok(x) => x,
        Err(e) => return fail(&e, json_out),
    };
    let v = wrapped(&xdg);
    if json_out {
        let js: Vec<_> = v
            .iter()
            .map(|(id, p, b)| serde_json::json!({"id": id, "path": p, "backup": b}))
            .collect();
        println!("{}", serde_json::json!({"ok": true, "entries": js}));
    } else if v.is_empty() {
        println!(
            "no wrapped desktop entries in {}",
            xdg.user_apps().display()
        );
    } else {
        for (id, p, b) in &v {
            let exec = std::fs::read_to_string(p)
                .ok()
                .and_then(|t| get(&t, "Desktop Entry", "Exec"))
                .unwrap_or_default();
            println!(
                "{id}\t{}\t{}\tExec={exec}",
                p.display(),
                if *b {
                    "replaces a previous user override (restored by unwrap)"
                } else {
                    "over the system entry (removed by unwrap)"
                }
            );
        }
    }
    0
}

/// Reports a failed ksmplusctl command (as JSON with `--json`) and returns its exit code, 2.
pub(crate) fn fail(e: &str, json_out: bool) -> i32 {
    if json_out {
        println!("{}", serde_json::json!({"ok": false, "error": e}));
    } else {
        eprintln!("ksmplusctl: {e}");
    }
    2
}

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
        assert_eq!(
            wrap_exec("okular %U", LIB).unwrap(),
            format!("env LD_PRELOAD={LIB} okular %U")
        );
        assert_eq!(
            wrap_exec("env FOO=1 BAR=\"x y\" prog %f", LIB).unwrap(),
            format!("env FOO=1 BAR=\"x y\" LD_PRELOAD={LIB} prog %f")
        );
        assert_eq!(
            wrap_exec("env -i HOME=/h prog", LIB).unwrap(),
            format!("env -i HOME=/h LD_PRELOAD={LIB} prog")
        );
        assert_eq!(
            wrap_exec("env LD_PRELOAD=/a.so prog %u", LIB).unwrap(),
            format!("env LD_PRELOAD=/a.so:{LIB} prog %u")
        );
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
            format!("[Desktop Entry]\r\nX-Ksmplus-Wrapped=true\r\nName=X\r\nExec = env LD_PRELOAD={LIB} x %f\r\n\r\n[Desktop Action new]\r\nExec=env LD_PRELOAD={LIB} x --new\r\n[Other]\r\nExec=keep\r\n")
        );
        assert!(is_wrapped(&w));
        assert!(wrap_entry("[Desktop Entry]\nDBusActivatable=true\nExec=x\n", LIB).is_err());
        assert!(wrap_entry("[Desktop Entry]\nHidden=true\nExec=x\n", LIB).is_err());
        assert!(wrap_entry("[Desktop Entry]\nType=Link\nURL=http://x\n", LIB).is_err());
    }
}
