//! The desktop tables: one row per cell with the thesis's figures beside ours, per-program
//! rows (start-up, merging, profit, responsiveness), per-process rows of the browsers under
//! ksmplus, the `scan` summaries and the targets of issues 7 and 10.

use super::results::DeskCell;
use super::scenario::Scenario;
use crate::table::{conv, not_ran, opt, verdict, MIB};
use std::fmt::Write as _;

fn find<'a>(cells: &'a [DeskCell], sc: &str, ap: &str) -> Option<&'a DeskCell> {
    cells
        .iter()
        .find(|c| c.scenario == sc && c.approach == ap && c.ran())
}

pub fn table(cells: &[DeskCell], scenarios: &[Scenario]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "saved = sharing × 4 KiB; sharing = the thesis's pages_sharing restricted to the programs (KSM pages they map − distinct KSM pages,\n\
         from pagemap + kpageflags at convergence); sysΔ = change of the system-wide pages_sharing (other mergeable processes included)\n\
         %Pss / %anon = saved / the programs' Pss / anonymous memory before ksmd ran (all their processes)\n\
         netMiB / %net = Pss of the same programs under none − (this approach's Pss − saved): what is left in memory vs no KSM at all\n\
         merging, rmap = Σ ksm_merging_pages, ksm_rmap_items; profit = Σ ksm_process_profit; gprof = Δgeneral_profit\n"
    );
    let _ = writeln!(
        s,
        "{:<4} {:<11} {:>5} {:>7} {:>7} {:>7} {:>6} {:>8} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>7} {:>7} {:>7}",
        "scn", "approach", "procs", "PssMiB", "anonMiB", "sharing", "sysΔ", "savedMiB", "%Pss", "%anon", "netMiB", "%net",
        "merging", "rmap", "profitMB", "gprofMB", "conv_s", "ksmd_s", "agent_s", "agentMB", "start_s"
    );
    let mut notes = Vec::new();
    for sc in scenarios {
        for c in cells.iter().filter(|c| c.scenario == sc.id) {
            if !c.ran() {
                let head = format!("{:<4} {:<11}", c.scenario, c.approach);
                let name = format!("{} {}", c.scenario, c.approach);
                not_ran(&mut s, &mut notes, &head, &name, &c.status);
                continue;
            }
            // What the approach leaves in memory against the same programs without KSM: the
            // shim changes the programs' footprint (page-aligned allocations), so saved alone
            // can flatter it.
            let net = find(cells, sc.id, "none").map(|n| {
                let none = n.mem_t0.pss_kib as f64 / 1024.0;
                let after = c.mem_t0.pss_kib as f64 / 1024.0 - c.saved_mib;
                (none - after, (none - after) * 100.0 / none)
            });
            let start: Vec<f64> = c.programs.iter().filter_map(|p| p.startup_secs).collect();
            let start = (!start.is_empty()).then(|| start.iter().sum::<f64>() / start.len() as f64);
            let _ = writeln!(
                s,
                "{:<4} {:<11} {:>5} {:>7.1} {:>7.1} {:>7} {:>6} {:>8.2} {:>6.2} {:>6.2} {:>7} {:>7} {:>7} {:>7} {:>8.2} {:>7.2} {:>6} {:>6.2} {:>7} {:>7} {:>7}",
                c.scenario,
                c.approach,
                c.processes.len(),
                c.mem_t0.pss_kib as f64 / 1024.0,
                c.mem_t0.anon_kib as f64 / 1024.0,
                c.own_sharing,
                c.pages_sharing,
                c.saved_mib,
                c.saved_pct_pss,
                c.saved_pct_anon,
                net.map_or("-".into(), |(m, _)| format!("{m:.1}")),
                net.map_or("-".into(), |(_, p)| format!("{p:.1}")),
                c.merging_pages,
                c.rmap_items,
                c.process_profit as f64 / MIB,
                c.general_profit_delta as f64 / MIB,
                conv(c.converged, c.converge_secs, c.observed_secs),
                c.ksmd_cpu_secs,
                opt(c.agent_cpu_secs, 2),
                opt(c.agent_hwm_kib.map(|k| k as f64 / 1024.0), 1),
                opt(start, 2),
            );
        }
        let t = &sc.thesis;
        let mut th = Vec::new();
        if let (Some(mb), Some(p)) = (t.saved_mb, t.saved_pct) {
            th.push(format!("saved {mb} MB = {p} %"));
        }
        if let Some(ps) = t.pages_sharing {
            th.push(format!("pages_sharing {ps}"));
        }
        if let Some(cv) = t.converge {
            th.push(format!("converged {cv}"));
        }
        for (g, p) in &t.per_group {
            th.push(format!("{g} {p} %"));
        }
        if !th.is_empty() {
            let _ = writeln!(
                s,
                "{:<4} thesis (KSM+, 2017 desktop): {}",
                sc.id,
                th.join(", ")
            );
        }
        let _ = writeln!(s, "{:<4} = {}\n", sc.id, sc.title);
    }
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(s, "[{}] {n}", i + 1);
    }
    s
}

/// One row per program and cell.
pub fn programs(cells: &[DeskCell]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<4} {:<11} {:<10} {:>5} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>9} {:>7} {:>6} {:>6}  screenshot",
        "scn", "approach", "program", "procs", "start_s", "ready_s", "PssMiB", "merging", "rmap",
        "%Pss", "profitKiB", "tracked", "turned", "alive"
    );
    for c in cells.iter().filter(|c| c.ran()) {
        for p in &c.programs {
            let pct = if p.mem_t0.pss_kib > 0 {
                p.merging_pages as f64 * 4.0 * 100.0 / p.mem_t0.pss_kib as f64
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                "{:<4} {:<11} {:<10} {:>5} {:>7} {:>7} {:>7.1} {:>8} {:>7} {:>6.2} {:>9} {:>7} {:>6} {:>6}  {}",
                c.scenario,
                c.approach,
                p.label,
                p.processes,
                opt(p.startup_secs, 2),
                opt(p.ready_secs, 2),
                p.mem_t0.pss_kib as f64 / 1024.0,
                p.merging_pages,
                p.rmap_items,
                pct,
                p.profit / 1024,
                p.tracked.map_or("-", |t| if t { "yes" } else { "NO" }),
                format!(
                    "{}/{}",
                    if p.reading_changed { "y" } else { "n" },
                    if p.responsive_after { "y" } else { "n" }
                ),
                if p.alive_end { "yes" } else { "NO" },
                p.screenshot
                    .as_deref()
                    .and_then(|x| x.rsplit('/').next())
                    .unwrap_or("-"),
            );
        }
    }
    let _ = writeln!(
        s,
        "%Pss here = ksm_merging_pages × 4 KiB / Pss (merging counts the kept copy too); turned = content changed by the reading keys / by a key after merging"
    );
    s
}

/// The browsers' programs (their processes are checked one by one: alive, shim, tracked).
const BROWSERS: &[&str] = &["epiphany", "firefox", "chromium"];

fn browser_labels(sc: &Scenario) -> Vec<&str> {
    sc.programs
        .iter()
        .filter(|p| BROWSERS.contains(&p.group))
        .map(|p| p.label.as_str())
        .collect()
}

/// Every process of the browsers in the ksmplus cells: how the agent found it (`hello`, `fork`,
/// `scan`), what it can do in it (`marks`, `refused` by a sandbox, `merge-any`), its figures.
pub fn processes(cells: &[DeskCell], scenarios: &[Scenario]) -> String {
    let mut s = String::new();
    for sc in scenarios {
        let labels = browser_labels(sc);
        if labels.is_empty() {
            continue;
        }
        for c in cells
            .iter()
            .filter(|c| c.scenario == sc.id && c.approach == "ksmplus" && c.ran())
        {
            let _ = writeln!(
                s,
                "{} ksmplus, every process of {} (t0 = present when ksmd started; found/marking from status --json):",
                c.scenario,
                labels.join(", ")
            );
            let _ = writeln!(
                s,
                "  {:>7} {:<16} {:<6} {:<10} {:>3} {:>5} {:>7} {:>5} {:>7} {:>8} {:>7} {:>9} {:>5}",
                "pid",
                "comm",
                "found",
                "marking",
                "t0",
                "shim",
                "tracked",
                "alive",
                "PssMiB",
                "merging",
                "rmap",
                "profitKiB",
                "m_any"
            );
            for pr in c
                .processes
                .iter()
                .filter(|pr| labels.contains(&pr.program.as_str()))
            {
                let yn = |b: bool| if b { "yes" } else { "NO" };
                let _ = writeln!(
                    s,
                    "  {:>7} {:<16} {:<6} {:<10} {:>3} {:>5} {:>7} {:>5} {:>7.1} {:>8} {:>7} {:>9} {:>5}",
                    pr.pid,
                    pr.comm,
                    if pr.found.is_empty() { "-" } else { &pr.found },
                    if pr.marking.is_empty() { "-" } else { &pr.marking },
                    if pr.at_t0 { "y" } else { "n" },
                    yn(pr.shim),
                    match (pr.tracked, pr.named) {
                        (Some(true), _) => "yes",
                        (Some(false), true) => "NO",
                        (Some(false), false) => "no*",
                        (None, _) => "-",
                    },
                    yn(pr.alive_end),
                    pr.mem_t0.pss_kib as f64 / 1024.0,
                    pr.merging_pages,
                    pr.rmap_items,
                    pr.profit / 1024,
                    if pr.merge_any { "yes" } else { "no" },
                );
            }
        }
    }
    if !s.is_empty() {
        s += "  no* = not tracked and not named by the policy (a sandbox helper: bwrap, xdg-dbus-proxy)\n";
    }
    s
}

/// The steady cost after convergence (issue 12): % of one core over the window, for ksmd, the
/// agent and the programs; `extra` is the programs' CPU beyond the reference's (the shim's
/// part and any work merging causes): their control group's in the same window (`ref` ctl)
/// or the same scenario's `none` cell's (`ref` none); `whole` = ksmd + agent + extra; and
/// `t90`, the seconds from ksmd's start to 90 % of the final merging pages. A `none` cell with
/// a control shows what the pairing itself reads as extra (two identical groups): the noise.
/// Beside the time, the work, which the machine's speed does not change: the pages ksmd looked
/// at per second and its CPU per page (the price of a page at that moment), and the pages the
/// agent read per second.
pub fn steady(cells: &[DeskCell]) -> String {
    let mut s = String::new();
    let with: Vec<&DeskCell> = cells.iter().filter(|c| c.steady.is_some()).collect();
    let Some(first) = with.first().and_then(|c| c.steady.as_ref()) else {
        return s;
    };
    let _ = writeln!(
        s,
        "steady cost: {:.0} s from {:.0} s after convergence, programs open and idle (% of one core)",
        first.spent.secs, first.after
    );
    let _ = writeln!(
        s,
        "scn  approach     t90_s   ksmd%  agent%  progs%  extra%  ref    whole%  wakeups/s  ksmd_pg/s  ksmd_us/pg  agent_pg/s"
    );
    for c in with {
        let st = c.steady.as_ref().unwrap();
        let none = find(cells, &c.scenario, "none").and_then(|n| n.steady.as_ref());
        let row = st.row(none);
        let _ = writeln!(
            s,
            "{:<4} {:<11} {:>6} {:>7.2} {:>7} {:>7.2} {:>7}  {:<4} {:>7} {:>10} {:>10} {:>11} {:>11}",
            c.scenario,
            c.approach,
            opt(c.t90(), 1),
            row.ksmd,
            opt(row.agent, 2),
            row.progs,
            opt(row.extra, 2),
            row.reference.map_or("-", |r| r.label()),
            opt(row.whole, 2),
            opt(st.wakeups_per_sec(), 1),
            opt(st.ksmd_pages_per_sec(), 0),
            opt(st.ksmd_us_per_page(), 2),
            opt(st.agent_pages_per_sec(), 1),
        );
    }
    s
}

/// Per-group figures of the mixed session (the thesis gives okular and epiphany).
pub fn groups(cells: &[DeskCell], scenario: &str) -> String {
    let mut s = String::new();
    for c in cells.iter().filter(|c| c.scenario == scenario && c.ran()) {
        let mut groups: Vec<(String, u64, u64)> = Vec::new();
        for p in &c.programs {
            match groups.iter_mut().find(|g| g.0 == p.group) {
                Some(g) => {
                    g.1 += p.merging_pages;
                    g.2 += p.mem_t0.pss_kib;
                }
                None => groups.push((p.group.clone(), p.merging_pages, p.mem_t0.pss_kib)),
            }
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|(g, m, pss)| {
                format!(
                    "{g} {:.2} %",
                    if *pss > 0 {
                        *m as f64 * 400.0 / *pss as f64
                    } else {
                        0.0
                    }
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "{scenario} {:<11} merging/Pss per program: {}",
            c.approach,
            parts.join(", ")
        );
    }
    s
}

/// The `ksmplusctl scan` summaries (thesis figures 5-12/5-13: what the duplicates are).
pub fn scans(cells: &[DeskCell]) -> String {
    let mut s = String::new();
    for c in cells {
        if let Some(v) = &c.scan {
            let t = &v["totals"];
            let _ = writeln!(
                s,
                "{} {} scan ({} processes, before ksmd): {} pages present, {} duplicate, could free {} pages = {:.1} MiB ({} across processes); zero pages mapped {}",
                c.scenario,
                c.approach,
                t["processes"],
                t["pages"],
                t["duplicate"],
                t["saving_pages"],
                t["saving_pages"].as_u64().unwrap_or(0) as f64 * 4.0 / 1024.0,
                t["cross_process_saving_pages"],
                t["zero_page_mapped"],
            );
            let empty = vec![];
            let top = v["top"].as_array().unwrap_or(&empty);
            let mut by_class: Vec<(String, u64)> = Vec::new();
            for e in top {
                let k = e["class"].as_str().unwrap_or("?").to_owned();
                let n = e["count"].as_u64().unwrap_or(0);
                match by_class.iter_mut().find(|x| x.0 == k) {
                    Some(x) => x.1 += n,
                    None => by_class.push((k, n)),
                }
            }
            for e in top.iter().take(6) {
                let _ = writeln!(
                    s,
                    "    ×{:<6} {:<9} period {:<4} pattern {:<34} in {} process(es)",
                    e["count"],
                    e["class"].as_str().unwrap_or("?"),
                    e["period"].as_u64().map_or("-".into(), |p| p.to_string()),
                    e["pattern"].as_str().unwrap_or("-"),
                    e["processes"]
                );
            }
            let _ = writeln!(
                s,
                "    top-10 contents by class: {}",
                by_class
                    .iter()
                    .map(|(k, n)| format!("{k} {n} pages"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for n in c.notes.iter().filter(|n| n.starts_with("scan")) {
            let _ = writeln!(s, "{} {}: {n}", c.scenario, c.approach);
        }
    }
    s
}

pub struct Target {
    pub name: String,
    pub verdict: Option<bool>,
    pub detail: String,
}

pub fn targets(cells: &[DeskCell], scenarios: &[Scenario]) -> Vec<Target> {
    let mut out = Vec::new();
    // No program crashes or misbehaves under the shim.
    let shimmed: Vec<&DeskCell> = cells
        .iter()
        .filter(|c| c.approach == "ksmplus" || c.approach == "madvise-all")
        .collect();
    let bad: Vec<String> = shimmed
        .iter()
        .flat_map(|c| {
            let mut v: Vec<String> = c
                .programs
                .iter()
                .filter(|p| !p.alive_end || !p.responsive_after)
                .map(|p| format!("{} {} {}", c.scenario, c.approach, p.label))
                .collect();
            if c.status.starts_with("error") {
                v.push(format!("{} {}: {}", c.scenario, c.approach, c.status));
            }
            v
        })
        .collect();
    out.push(Target {
        name: "no program crashes or stops answering under the shim".into(),
        verdict: (!shimmed.is_empty()).then_some(bad.is_empty()),
        detail: if bad.is_empty() {
            format!(
                "{} shim cells, every program alive and answering keys after merging",
                shimmed.len()
            )
        } else {
            bad.join("; ")
        },
    });
    for sc in scenarios {
        let k = find(cells, sc.id, "ksmplus");
        let m = find(cells, sc.id, "merge_any");
        if let (Some(th), Some(k)) = (sc.thesis.saved_pct, k) {
            out.push(Target {
                name: format!("{} ksmplus saves >= the thesis's {th} %", sc.id),
                verdict: Some(k.saved_pct_pss >= th),
                detail: format!(
                    "{:.2} % of Pss ({:.2} % of anonymous), {:.1} MiB",
                    k.saved_pct_pss, k.saved_pct_anon, k.saved_mib
                ),
            });
        }
        if let (Some(k), Some(m)) = (k, m) {
            out.push(Target {
                name: format!("{} ksmplus saves >= 0.9 x merge_any", sc.id),
                verdict: Some(k.saved_mib >= 0.9 * m.saved_mib),
                detail: format!(
                    "{:.2} vs {:.2} MiB ({:.0} %); rmap_items {} vs {} ({:.1} %)",
                    k.saved_mib,
                    m.saved_mib,
                    if m.saved_mib > 0.0 {
                        k.saved_mib * 100.0 / m.saved_mib
                    } else {
                        0.0
                    },
                    k.rmap_items,
                    m.rmap_items,
                    if m.rmap_items > 0 {
                        k.rmap_items as f64 * 100.0 / m.rmap_items as f64
                    } else {
                        0.0
                    }
                ),
            });
        }
        if let Some(k) = k {
            let neg: Vec<String> = k
                .programs
                .iter()
                .filter(|p| p.profit <= 0)
                .map(|p| format!("{} {} B", p.label, p.profit))
                .collect();
            out.push(Target {
                name: format!("{} ksmplus profit > 0 for every program", sc.id),
                verdict: Some(neg.is_empty()),
                detail: if neg.is_empty() {
                    k.programs
                        .iter()
                        .map(|p| format!("{} {} KiB", p.label, p.profit / 1024))
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    neg.join(", ")
                },
            });
        }
    }
    browser_targets(cells, scenarios, &mut out);
    out
}

/// Issue 10: every process of every browser alive after merging under every approach, mapping
/// the shim in the shim cells and tracked under ksmplus; on D5/D6 ksmplus merges ≥ 0.9× of
/// merge_any's pages with ≤ 1/5 of its rmap items.
fn browser_targets(cells: &[DeskCell], scenarios: &[Scenario], out: &mut Vec<Target>) {
    for sc in scenarios {
        let labels = browser_labels(sc);
        if labels.is_empty() {
            continue;
        }
        let mut bad = Vec::new();
        let (mut n_cells, mut n_procs) = (0, 0);
        for c in cells.iter().filter(|c| c.scenario == sc.id) {
            if !c.ran() {
                bad.push(format!("{}: {}", c.approach, c.status));
                continue;
            }
            n_cells += 1;
            for p in c
                .programs
                .iter()
                .filter(|p| labels.contains(&p.label.as_str()))
            {
                n_procs += c
                    .processes
                    .iter()
                    .filter(|pr| pr.at_t0 && pr.program == p.label)
                    .count();
                for (what, list) in [
                    ("gone", &p.gone),
                    ("no shim", &p.no_shim),
                    ("not tracked", &p.untracked),
                ] {
                    if !list.is_empty() {
                        bad.push(format!("{} {what}: {}", c.approach, list.join(", ")));
                    }
                }
                if !p.alive_end || !p.responsive_after {
                    bad.push(format!(
                        "{} {}: died or stopped answering",
                        c.approach, p.label
                    ));
                }
            }
        }
        if n_cells > 0 || !bad.is_empty() {
            out.push(Target {
                name: format!(
                    "{} every browser process alive after merging, mapping the shim (shim cells) and tracked (ksmplus)",
                    sc.id
                ),
                verdict: Some(bad.is_empty()),
                detail: if bad.is_empty() {
                    format!("{n_cells} cells, {n_procs} processes present when ksmd started")
                } else {
                    bad.join("; ")
                },
            });
        }
        if !sc.user {
            continue;
        }
        if let (Some(k), Some(m)) = (
            find(cells, sc.id, "ksmplus"),
            find(cells, sc.id, "merge_any"),
        ) {
            let pct = |a: u64, b: u64| {
                if b > 0 {
                    a as f64 * 100.0 / b as f64
                } else {
                    0.0
                }
            };
            out.push(Target {
                name: format!(
                    "{} ksmplus merges >= 0.9 x merge_any's pages with <= 1/5 of its rmap_items",
                    sc.id
                ),
                verdict: Some(
                    k.merging_pages * 10 >= m.merging_pages * 9 && k.rmap_items * 5 <= m.rmap_items,
                ),
                detail: format!(
                    "merging {} vs {} ({:.0} %), rmap_items {} vs {} ({:.1} %); saved {:.1} vs {:.1} MiB",
                    k.merging_pages,
                    m.merging_pages,
                    pct(k.merging_pages, m.merging_pages),
                    k.rmap_items,
                    m.rmap_items,
                    pct(k.rmap_items, m.rmap_items),
                    k.saved_mib,
                    m.saved_mib
                ),
            });
        }
    }
}

pub fn targets_text(ts: &[Target]) -> String {
    let mut s = String::from("targets (issues 7 and 10):\n");
    for t in ts {
        let v = verdict(t.verdict, ["MET ", "MISS", "n/a "]);
        let _ = writeln!(s, "  [{v}] {}: {}", t.name, t.detail);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{Interval, Steady};

    fn cell(scenario: &str, approach: &str, programs: f64, control: Option<f64>) -> DeskCell {
        DeskCell {
            scenario: scenario.into(),
            approach: approach.into(),
            status: "ok".into(),
            steady: Some(Steady {
                after: 20.0,
                spent: Interval {
                    secs: 100.0,
                    ksmd_secs: if approach == "none" { 0.0 } else { 0.5 },
                    programs_secs: programs,
                    control_secs: control,
                    ..Default::default()
                },
            }),
            ..Default::default()
        }
    }

    /// The extra is against the control group in the same window where there is one, else
    /// against the none cell; the table says which.
    #[test]
    fn steady_table_names_the_reference() {
        let cells = [
            cell("D1", "none", 0.4, Some(0.3)),
            cell("D1", "ksmplus", 1.0, Some(0.9)),
            cell("D5", "none", 2.0, None),
            cell("D5", "ksmplus", 2.5, None),
        ];
        let t = steady(&cells);
        let row = |sc: &str, ap: &str| {
            t.lines()
                .find(|l| l.starts_with(sc) && l.contains(ap))
                .unwrap()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        // scn approach t90 ksmd agent progs extra ref whole wakeups
        let k1 = row("D1", "ksmplus");
        assert_eq!(
            (&k1[6][..], &k1[7][..], &k1[8][..]),
            ("0.10", "ctl", "0.60")
        );
        // The none cell against its own control: what the pairing reads as noise.
        let n1 = row("D1", "none");
        assert_eq!(
            (&n1[6][..], &n1[7][..], &n1[8][..]),
            ("0.10", "ctl", "0.10")
        );
        let k5 = row("D5", "ksmplus");
        assert_eq!(
            (&k5[6][..], &k5[7][..], &k5[8][..]),
            ("0.50", "none", "1.00")
        );
    }
}
