//! `ksmplusctl status` as text: the per-process table (99 columns: 7-digit pids, 15-character
//! comms and up to ~970 GiB per figure stay aligned), then one paragraph
//! each for the engine, ksmd, the agent and its connections, every line wrapped at 100 columns
//! (a long path alone may exceed it).
use crate::output::hint;
use ksmplus_common::status::StatusReply;
use std::fmt::Write;

/// The width every line keeps to.
pub const WIDTH: usize = 100;

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

/// `head` then `parts` joined by ", ", wrapped at [`WIDTH`] between parts where they fit
/// (a part that fits no line is wrapped between its words; a single word longer than that, a
/// path, stays whole). Continuation lines are indented by two spaces.
fn paragraph(out: &mut String, head: &str, parts: &[String]) {
    let len = |s: &str| s.chars().count();
    let mut line = head.to_owned();
    for (i, part) in parts.iter().enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        let comma = if i + 1 < parts.len() { 1 } else { 0 };
        if len(&line) + len(sep) + len(part) + comma <= WIDTH {
            line.push_str(sep);
            line.push_str(part);
            continue;
        }
        if i > 0 {
            line.push(',');
        }
        if 2 + len(part) + comma <= WIDTH {
            let _ = writeln!(out, "{line}");
            line = format!("  {part}");
            continue;
        }
        // Too long for any line: word by word, starting on the current one.
        for w in part.split(' ').filter(|w| !w.is_empty()) {
            if line.trim().is_empty() {
                line.push_str(w); // a fresh line takes a word whatever its length
            } else if len(&line) + 1 + len(w) > WIDTH {
                let _ = writeln!(out, "{line}");
                line = format!("  {w}");
            } else {
                line.push(' ');
                line.push_str(w);
            }
        }
    }
    let _ = writeln!(out, "{line}");
}

fn row(out: &mut String, cols: [&str; 8]) {
    let _ = writeln!(
        out,
        "{:>7} {:<15} {:<13} {:>19} {:>9} {:>9} {:>9} {:>11}",
        cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6], cols[7]
    );
}

/// The whole text of `status`.
pub fn render(v: &StatusReply) -> String {
    let mut out = String::new();
    row(
        &mut out,
        [
            "PID",
            "COMM",
            "MARKING",
            "COVERED/ANON MiB",
            "MARKED",
            "MERGING",
            "RMAP",
            "PROFIT KiB",
        ],
    );
    for p in &v.processes {
        let cov = if p.coverage.anon_bytes > 0 {
            format!(
                "{} / {}",
                mib(p.coverage.covered_bytes),
                mib(p.coverage.anon_bytes)
            )
        } else {
            "-".into()
        };
        let comm: String = p.comm.chars().take(15).collect();
        row(
            &mut out,
            [
                &p.pid.to_string(),
                &comm,
                &p.marking,
                &cov,
                &mib(p.marked_bytes),
                &p.merging_pages.to_string(),
                &p.rmap_items.to_string(),
                &(p.profit / 1024).to_string(),
            ],
        );
    }
    let t = &v.totals;
    let cov = if t.anon_bytes > 0 {
        format!("{} / {}", mib(t.covered_bytes), mib(t.anon_bytes))
    } else {
        String::new()
    };
    row(
        &mut out,
        [
            "TOTAL",
            &format!("{} processes", t.processes),
            "",
            &cov,
            &mib(t.marked_bytes),
            &t.merging_pages.to_string(),
            &t.rmap_items.to_string(),
            &(t.profit / 1024).to_string(),
        ],
    );
    // Why memory is not covered, and why a process is not marked: only where it matters.
    for p in &v.processes {
        let mut parts: Vec<String> = p
            .coverage
            .uncovered
            .iter()
            .filter(|(_, b)| **b >= 1 << 20)
            .map(|(k, b)| format!("not covered: {k} {} MiB", mib(*b)))
            .collect();
        if !p.marking_note.is_empty() {
            parts.push(p.marking_note.clone());
        }
        if !parts.is_empty() {
            paragraph(&mut out, &format!("{:>7} {}:", p.pid, p.comm), &parts);
        }
    }
    let e = &v.engine;
    paragraph(
        &mut out,
        "engine:",
        &[
            format!("{} fingerprints", e.fingerprints),
            format!("~{} KiB", e.index_bytes_estimate / 1024),
            format!("limit {}", e.max_fingerprints),
            if e.idle { "schedule done" } else { "sampling" }.to_owned(),
        ],
    );
    ksmd(&mut out, v);
    agent(&mut out, v);
    for u in &v.unreadable {
        let _ = writeln!(
            out,
            "cannot track pid {} ({}): {}",
            u.pid,
            if u.exe.is_empty() { &u.comm } else { &u.exe },
            u.reason
        );
    }
    out
}

fn ksmd(out: &mut String, v: &StatusReply) {
    let k = |n: &str| v.ksmd.get(n).copied().unwrap_or(0);
    if k("available") != 1 {
        let _ = writeln!(
            out,
            "ksmd: not available (this kernel has no /sys/kernel/mm/ksm): nothing will be merged"
        );
        return;
    }
    if k("run") != 1 {
        let _ = writeln!(
            out,
            "ksmd: OFF (run = {}): ranges are marked but nothing merges until root runs\n  \
             `echo 1 > /sys/kernel/mm/ksm/run` (at every boot: ksmplus.conf in tmpfiles.d)",
            k("run")
        );
        return;
    }
    let page = if v.page_size > 0 { v.page_size } else { 4096 };
    paragraph(
        out,
        "ksmd: on,",
        &[
            format!("pages_to_scan {}", k("pages_to_scan")),
            format!("sleep {} ms", k("sleep_millisecs")),
            format!("full_scans {}", k("full_scans")),
            format!("pages_shared {}", k("pages_shared")),
            format!(
                "pages_sharing {} ({} MiB saved)",
                k("pages_sharing"),
                mib(k("pages_sharing").max(0) as u64 * page)
            ),
            format!("general_profit {} KiB", k("general_profit") / 1024),
        ],
    );
}

fn agent(out: &mut String, v: &StatusReply) {
    let a = &v.agent;
    paragraph(
        out,
        "agent:",
        &[
            format!("pid {}", a.pid),
            format!("RSS {} KiB", a.rss_kib),
            format!("CPU {} ms", a.cpu_ms),
            format!("{} wake-ups", a.wakeups),
            format!("{} reloads", a.reloads),
            format!("policy {}", a.policy),
        ],
    );
    // Programs under the shim the agent knows now, then what happened to connections.
    let mut now = vec![
        format!("{} tracked", a.peers.tracked),
        format!(
            "{} untracked (not in the policy; their shims are dormant)",
            a.peers.untracked
        ),
    ];
    // Connections that have not said what they are yet (this ksmplusctl is a control one).
    if a.peers.unidentified > 0 {
        now.push(format!("{} unidentified connections", a.peers.unidentified));
    }
    paragraph(out, "programs under the shim:", &now);
    let c = &a.connections;
    let mut since = vec![
        format!("{} connections", c.accepted),
        format!("{} ignored (not in the policy)", a.ignored),
        format!("{} excluded (exclude list)", a.excluded),
        format!("{} found without a Hello", a.adopted),
    ];
    if c.refused_uid > 0 {
        since.push(format!("{} refused (another user)", c.refused_uid));
    }
    if c.refused_full > 0 {
        since.push(format!("{} refused (agent full)", c.refused_full));
    }
    let dropped = c.dropped_malformed + c.dropped_overflow + c.dropped_slow;
    if dropped > 0 {
        since.push(format!(
            "{dropped} dropped ({} malformed, {} overflow, {} slow)",
            c.dropped_malformed, c.dropped_overflow, c.dropped_slow
        ));
    }
    paragraph(out, "since the agent started:", &since);
    if a.peers.untracked > 0 || a.ignored > 0 {
        let _ = writeln!(
            out,
            "track an untracked program with {} (its name as `ps -o comm` shows it)",
            hint(&["ksmplusctl", "add", "NAME"])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksmplus_common::status::*;

    /// A reply with every field at a wide but plausible value.
    fn wide() -> StatusReply {
        let mut v = StatusReply {
            version: REPLY_VERSION,
            ok: true,
            page_size: 4096,
            ..Default::default()
        };
        let gib = 1u64 << 30;
        for (pid, marking) in [(4_194_304, "marks-pending"), (7, "merge-any")] {
            let mut p = ProcessStatus {
                pid,
                comm: "a-very-long-comm-name".into(),
                marking: marking.into(),
                marked_bytes: 64 * gib,
                merging_pages: 16_777_216,
                rmap_items: 16_777_216,
                profit: 64 * gib as i64,
                marking_note: "its sandbox refuses KSM advice (EPERM); the kernel's \
                               merge-everything mode was switched on in its fork server instead"
                    .into(),
                ..Default::default()
            };
            p.coverage.anon_bytes = 96 * gib;
            p.coverage.covered_bytes = 95 * gib;
            p.coverage.uncovered.insert("stack".into(), 512 << 10);
            p.coverage.uncovered.insert("small".into(), 300 << 20);
            v.processes.push(p);
        }
        v.totals = Totals {
            processes: 99_999,
            marked_bytes: 900 * gib,
            merging_pages: 999_999_999,
            rmap_items: 999_999_999,
            profit: 900 * gib as i64,
            anon_bytes: 900 * gib,
            covered_bytes: 900 * gib,
            ..Default::default()
        };
        for (k, n) in [
            ("available", 1),
            ("run", 1),
            ("pages_to_scan", 5000),
            ("sleep_millisecs", 10),
            ("full_scans", 999_999_999),
            ("pages_shared", 999_999_999),
            ("pages_sharing", 999_999_999),
            ("general_profit", 999_999_999_999),
        ] {
            v.ksmd.insert(k.into(), n);
        }
        v.agent.pid = 4_194_304;
        v.agent.policy = "/home/someone/.config/ksmplus/policy.toml".into();
        v.agent.peers.tracked = 1000;
        v.agent.peers.untracked = 1234;
        v.agent.ignored = 99_999;
        v.agent.excluded = 99_999;
        v.agent.connections.refused_uid = 3;
        v.agent.connections.dropped_slow = 1;
        v
    }

    #[test]
    fn every_line_fits_100_columns() {
        let text = render(&wide());
        for l in text.lines() {
            assert!(l.chars().count() <= WIDTH, "{} columns: {l:?}", l.len());
        }
        // The table itself, with 7-digit pids and 15-character comms, is aligned.
        let lens: Vec<usize> = text.lines().take(4).map(|l| l.len()).collect();
        assert!(lens.iter().all(|l| *l == lens[0]), "{text}");
    }

    #[test]
    fn untracked_and_ignored_programs_are_shown() {
        let text = render(&wide());
        assert!(text.contains("1234 untracked (not in the policy"), "{text}");
        assert!(text.contains("99999 ignored (not in the policy)"), "{text}");
        assert!(text.contains("99999 excluded"), "{text}");
        assert!(text.contains("3 refused (another user)"), "{text}");
        assert!(text.contains("`ksmplusctl add NAME`"), "{text}");
        assert!(text.contains("not covered: small 300.0 MiB"), "{text}");
        assert!(!text.contains("not covered: stack"), "under 1 MiB: {text}");
    }

    #[test]
    fn ksmd_off_says_how_to_switch_it_on() {
        let mut v = wide();
        v.ksmd.insert("run".into(), 0);
        let text = render(&v);
        assert!(text.contains("ksmd: OFF (run = 0)"), "{text}");
        assert!(text.contains("echo 1 > /sys/kernel/mm/ksm/run"), "{text}");
        v.ksmd.insert("available".into(), 0);
        assert!(render(&v).contains("ksmd: not available"));
    }
}
