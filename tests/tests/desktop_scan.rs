//! `ksmplusctl scan` on a C program with known duplicate contents (tests/c/desktop_dups.c).
//!
//! Needs `cargo build -p ksmplus-agentd` (same target dir). Reading another process's memory
//! needs root (or ptrace rights over it: the program is our child, so with Yama scope ≤ 1 a same
//! user scan works too).
use ksmplus_tests::{compile, num_field, page_size, procfs, Interactive};
use std::process::Command;
use std::time::Duration;

use ksmplus_tests::target_bin as bin;

/// The value of `"key":` in a flat part of a JSON text: a number or a string.
fn json_field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let at = obj.find(&pat)? + pat.len();
    let rest = obj[at..].trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return Some(&s[..s.find('"')?]);
    }
    let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// The objects of the `"top":[...]` array (flat objects, no nesting).
fn top_entries(json: &str) -> Vec<&str> {
    let at = json.find("\"top\":[").expect("no top in the scan JSON") + 7;
    let end = at + json[at..].find(']').unwrap();
    json[at..end]
        .split("},")
        .filter(|s| s.contains("\"count\""))
        .collect()
}

fn n(obj: &str, key: &str) -> u64 {
    json_field(obj, key)
        .unwrap_or_else(|| panic!("no {key} in {obj}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {obj}"))
}

#[test]
fn counts_known_duplicates_exactly() {
    let prog = compile("desktop_dups");
    let mut p = Interactive::spawn(Command::new(&prog).env_remove("LD_PRELOAD"));
    let line = p.line(Duration::from_secs(20));
    let buf = num_field(&line, "buf");
    let pages = num_field(&line, "pages");
    let copy = num_field(&line, "copy_page");
    let ps = page_size();
    let copy_hash = ksmplus_common::page_hash(&procfs::read_mem(p.pid(), copy, ps as usize));

    let out = Command::new(bin("ksmplusctl"))
        .args(["scan", "--json", "--top", "50", "--pid"])
        .arg(p.pid().to_string())
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scan failed: {json}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = top_entries(&json);
    let find = |class: &str| -> Vec<&str> {
        top.iter()
            .copied()
            .filter(|o| json_field(o, "class") == Some(class))
            .collect()
    };
    let in_buf = |o: &str| {
        let a = u64::from_str_radix(
            json_field(o, "first_addr")
                .unwrap()
                .trim_start_matches("0x"),
            16,
        )
        .unwrap();
        a >= buf && a < buf + pages * ps
    };

    // all-zero: our 300, plus whatever zeroed pages libc and the loader left present.
    let zero = find("all-zero");
    assert_eq!(zero.len(), 1, "{json}");
    assert!(n(zero[0], "count") >= 300, "{}", zero[0]);
    // all-0xff: ours only.
    let ones = find("all-0xff");
    assert_eq!(ones.len(), 1, "{json}");
    assert_eq!(n(ones[0], "count"), 200, "{}", ones[0]);
    assert!(in_buf(ones[0]));
    // FFFFFF00, period 4: exactly ours.
    let per: Vec<&str> = find("periodic")
        .into_iter()
        .filter(|o| json_field(o, "pattern") == Some("FFFFFF00"))
        .collect();
    assert_eq!(per.len(), 1, "{json}");
    assert_eq!(n(per[0], "count"), 100);
    assert_eq!(n(per[0], "period"), 4);
    assert!(in_buf(per[0]));
    // The random page copied 50 times, found by its hash.
    let hash = format!("{copy_hash:016x}");
    let cp: Vec<&str> = top
        .iter()
        .copied()
        .filter(|o| json_field(o, "hash") == Some(hash.as_str()))
        .collect();
    assert_eq!(cp.len(), 1, "hash {hash} not in the top list: {json}");
    assert_eq!(n(cp[0], "count"), 50);
    assert_eq!(json_field(cp[0], "class"), Some("other"));
    assert_eq!(
        json_field(cp[0], "first_addr").unwrap(),
        format!("{copy:#x}")
    );

    // Per-process counts are consistent and cover at least our buffer.
    let totals = &json[json.find("\"totals\":").unwrap()..];
    let scanned = n(totals, "pages");
    let distinct = n(totals, "distinct");
    let unique = n(totals, "unique");
    let dup = n(totals, "duplicate");
    assert!(scanned >= pages, "{totals}");
    assert_eq!(unique + dup, scanned);
    assert!(unique >= 40);
    assert!(dup >= 300 + 200 + 100 + 50);
    // The saving KSM could give: at least (300-1)+(200-1)+(100-1)+(50-1) from the buffer.
    assert!(scanned - distinct >= 299 + 199 + 99 + 49);
    assert_eq!(n(totals, "saving_pages"), scanned - distinct);
    assert_eq!(n(totals, "cross_process_saving_pages"), 0);
    eprintln!(
        "scan of desktop_dups: {scanned} pages, {distinct} distinct, throughput {} MiB/s",
        json_field(&json, "mib_per_s").unwrap_or("?")
    );

    // Text mode names the classes as a person reads them.
    let out = Command::new(bin("ksmplusctl"))
        .args(["scan", "--pid"])
        .arg(p.pid().to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("periodic 4 B: FFFFFF00"), "{text}");
    assert!(text.contains("all-0xff"), "{text}");
    assert!(text.contains("MiB/s"), "{text}");

    let (st, _) = p.finish(Duration::from_secs(10));
    assert!(st.success(), "the program's memory changed under the scan");
}

#[test]
fn gone_and_forbidden_processes_are_reported_not_fatal() {
    // A pid that does not exist.
    let out = Command::new(bin("ksmplusctl"))
        .args(["scan", "--pid", "2147483646"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("exited"), "{text}");

    // Without ptrace rights: as nobody, against a root-owned process (only testable as root).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--help").output().is_err() {
        ksmplus_tests::ksmd::skip_or_fail(
            "the permission case needs root and setpriv (util-linux)",
        );
        return;
    }
    let p = Interactive::spawn(&mut Command::new("cat"));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("ksmplusctl"))
        .args(["scan", "--pid"])
        .arg(p.pid().to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("permission denied"), "{text}");
}

#[test]
fn all_processes_scan_reports_itself() {
    let out = Command::new(bin("ksmplusctl"))
        .args(["scan", "--all", "--top", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("saving KSM could give"), "{text}");
    assert!(text.contains("MiB/s"), "{text}");
    eprintln!("{text}");
}
