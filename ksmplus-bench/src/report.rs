//! The outputs: the text table (with ratios and the targets of issue 4), and the W2 plot
//! (`plot.rs`: two panels, merged MiB and rmap_items over time).

use crate::cell::CellResult;
use crate::plot::{self, Line, Panel, Scale};
use crate::table::{conv, not_ran, opt, verdict, MIB};
use std::fmt::Write as _;

fn find<'a>(cells: &'a [CellResult], wl: &str, ap: &str) -> Option<&'a CellResult> {
    cells
        .iter()
        .find(|c| c.workload == wl && c.approach == ap && c.ran())
}

/// The table, one row per cell, and its footnotes.
pub fn table(cells: &[CellResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<3} {:<11} {:>5} {:>6} {:>7} {:>7} {:>8} {:>9} {:>9} {:>7} {:>6} {:>6} {:>7} {:>7} {:>7} {:>6} {:>7} {:>7} {:>6}",
        "wl", "approach", "procs", "ideal", "merging", "%ideal", "rmap", "profitMiB", "gprofMiB",
        "conv_s", "t90_s", "t99_s", "ksmd_s", "agent_s", "agentMB", "app_s", "extra_s", "whole_s",
        "cow"
    );
    let mut notes = Vec::new();
    let mut prev = "";
    for c in cells {
        if c.workload != prev && !prev.is_empty() {
            s.push('\n');
        }
        prev = &c.workload;
        if !c.ran() {
            let head = format!("{:<3} {:<11} {:>5} ", c.workload, c.approach, c.processes);
            let name = format!("{} {}", c.workload, c.approach);
            not_ran(&mut s, &mut notes, &head, &name, &c.status);
            continue;
        }
        let pct = if c.ideal_pages > 0 {
            format!(
                "{:.1}",
                c.merging_pages as f64 * 100.0 / c.ideal_pages as f64
            )
        } else {
            "-".into()
        };
        let cow = c.vmstat_delta.get("cow_ksm").map(|v| v.to_string());
        let mark = if c.foreign.is_empty() {
            String::new()
        } else {
            notes.push(format!(
                "{} {}: other KSM users during the cell, global columns include them: {}",
                c.workload,
                c.approach,
                c.foreign.join("; ")
            ));
            format!(" *[{}]", notes.len())
        };
        let _ = writeln!(
            s,
            "{:<3} {:<11} {:>5} {:>6} {:>7} {:>7} {:>8} {:>9.2} {:>9.2} {:>7} {:>6} {:>6} {:>7.3} {:>7} {:>7} {:>6.2} {:>7} {:>7} {:>6}{}",
            c.workload,
            c.approach,
            c.processes,
            c.ideal_pages,
            c.merging_pages,
            pct,
            c.rmap_items,
            c.process_profit as f64 / MIB,
            c.general_profit_delta as f64 / MIB,
            conv(c.converged, c.converge_secs, c.observed_secs),
            opt(c.t90_secs, 1),
            opt(c.t99_secs, 1),
            c.ksmd_cpu_secs,
            opt(c.agent_cpu_secs, 2),
            opt(c.agent_hwm_kib.map(|k| k as f64 / 1024.0), 1),
            c.app_cpu_secs,
            opt(c.extra_app_secs, 2),
            opt(c.whole_secs, 3),
            cow.unwrap_or_else(|| "-".into()),
            mark,
        );
    }
    if !notes.is_empty() {
        s.push('\n');
        for (i, n) in notes.iter().enumerate() {
            let _ = writeln!(s, "[{}] {}", i + 1, n);
        }
    }
    s
}

/// The steady cost (issue 12), one row per cell that had a steady window, % of one core: ksmd,
/// the agent, the programs, the programs beyond the same workload's `none` cell (`extra`),
/// `whole` = ksmd + agent + extra, the agent's context switches per second, and ksmd's work:
/// the pages it looked at per second and its CPU per page. Empty when no cell had a window;
/// else ends with a blank line.
pub fn steady(cells: &[CellResult]) -> String {
    let mut s = String::new();
    let with: Vec<&CellResult> = cells.iter().filter(|c| c.steady.is_some()).collect();
    let Some(first) = with.first().and_then(|c| c.steady.as_ref()) else {
        return s;
    };
    let _ = writeln!(
        s,
        "steady cost: {:.0} s right after convergence, processes alive and idle (% of one core; 1 % = 0.6 s per minute)",
        first.spent.secs
    );
    let _ = writeln!(
        s,
        "{:<3} {:<11} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>10} {:>11}",
        "wl",
        "approach",
        "ksmd%",
        "agent%",
        "progs%",
        "extra%",
        "whole%",
        "ctxsw/s",
        "ksmd_pg/s",
        "ksmd_us/pg"
    );
    let mut prev = "";
    for c in with {
        if c.workload != prev && !prev.is_empty() {
            s.push('\n');
        }
        prev = &c.workload;
        let st = c.steady.as_ref().expect("filtered");
        let row = st.row(None);
        let _ = writeln!(
            s,
            "{:<3} {:<11} {:>7.2} {:>7} {:>7.2} {:>7} {:>7} {:>8} {:>10} {:>11}",
            c.workload,
            c.approach,
            row.ksmd,
            opt(row.agent, 2),
            row.progs,
            opt(c.steady_extra_pct, 2),
            opt(c.steady_whole_pct, 2),
            opt(st.ctxsw_per_sec(), 1),
            opt(st.ksmd_pages_per_sec(), 0),
            opt(st.ksmd_us_per_page(), 2),
        );
    }
    s.push('\n');
    s
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        if a == 0.0 {
            "1 (0/0)".into()
        } else {
            format!("{a:.3}/0")
        }
    } else {
        format!("{:.3}", a / b)
    }
}

/// ksmplus / merge_any for profit, rmap_items and ksmd CPU, per workload.
pub fn ratios(cells: &[CellResult], workloads: &[&str]) -> String {
    let mut s = String::from("ratios ksmplus / merge_any:\n");
    let _ = writeln!(
        s,
        "{:<3} {:>12} {:>12} {:>14}",
        "wl", "profit", "rmap_items", "ksmd_s(conv)"
    );
    for wl in workloads {
        match (find(cells, wl, "ksmplus"), find(cells, wl, "merge_any")) {
            (Some(k), Some(m)) => {
                let _ = writeln!(
                    s,
                    "{:<3} {:>12} {:>12} {:>14}",
                    wl,
                    ratio(k.process_profit as f64, m.process_profit as f64),
                    ratio(k.rmap_items as f64, m.rmap_items as f64),
                    ratio(k.ksmd_cpu_secs, m.ksmd_cpu_secs)
                );
            }
            _ => {
                let _ = writeln!(s, "{wl:<3} n/a (ksmplus or merge_any did not run)");
            }
        }
    }
    s
}

/// One target of issue 4: `None` when the cells it needs did not run.
pub struct Target {
    pub name: &'static str,
    pub verdict: Option<bool>,
    pub detail: String,
    /// The smoke run fails when this target does: it holds today, at smoke size too.
    pub smoke: bool,
}

/// Whether the smoke run asserts a target ([`Target::smoke`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Smoke {
    Asserted,
    /// Printed only: it does not hold with today's design, or not at smoke size (docs/BENCH.md).
    Reported,
}

pub fn targets(cells: &[CellResult]) -> Vec<Target> {
    let k = |wl| find(cells, wl, "ksmplus");
    let m = |wl| find(cells, wl, "merge_any");
    let mut t = Vec::new();
    let mut push = |name: &'static str, smoke: Smoke, v: Option<(bool, String)>| {
        let smoke = smoke == Smoke::Asserted;
        t.push(match v {
            Some((ok, detail)) => Target {
                name,
                verdict: Some(ok),
                detail,
                smoke,
            },
            None => Target {
                name,
                verdict: None,
                detail: "cells missing".into(),
                smoke,
            },
        })
    };
    // A target comparing the ksmplus cell of `wl` with its merge_any cell.
    let vs = |wl, f: fn(&CellResult, &CellResult) -> (bool, String)| {
        k(wl).zip(m(wl)).map(|(k, m)| f(k, m))
    };
    // A target: the ksmplus cell of `wl` needs at most 1/`n` of merge_any's `get`.
    let fraction_vs = |wl, n: f64, get: fn(&CellResult) -> f64, show: fn(f64) -> String| {
        k(wl).zip(m(wl)).map(|(k, m)| {
            let (k, m) = (get(k), get(m));
            (k * n <= m, format!("{} vs {}", show(k), show(m)))
        })
    };
    // Its `ksm_process_profit` sums, bytes, with a verdict on them.
    let profit_vs = |wl, ok: fn(i64, i64) -> bool| {
        k(wl).zip(m(wl)).map(|(k, m)| {
            (
                ok(k.process_profit, m.process_profit),
                format!("{} B vs {} B", k.process_profit, m.process_profit),
            )
        })
    };
    push(
        "W2 ksmplus merges >= 510 of 512 with <= 600 rmap_items",
        Smoke::Asserted,
        k("W2").map(|k| {
            (
                k.merging_pages >= 510 && k.rmap_items <= 600,
                format!("{} merging, {} rmap_items", k.merging_pages, k.rmap_items),
            )
        }),
    );
    push(
        "W2 ksmd CPU to converge <= 1/20 of merge_any's",
        // Held at full size (1/24 to 1/66, results/), not at smoke size: merge_any's work
        // shrinks with the regions, ksmplus's (512 marked pages rescanned) does not.
        Smoke::Reported,
        fraction_vs("W2", 20.0, |c| c.ksmd_cpu_secs, |s| format!("{s:.3} s")),
    );
    push(
        "W2 profit > merge_any's",
        Smoke::Asserted,
        profit_vs("W2", |k, m| k > m),
    );
    push(
        "W3 ksmplus rmap_items = 0",
        Smoke::Asserted,
        k("W3").map(|k| (k.rmap_items == 0, format!("{} rmap_items", k.rmap_items))),
    );
    push(
        "W1 ksmplus >= 99.9 % of ideal",
        Smoke::Asserted,
        k("W1").map(|k| {
            (
                k.merging_pages * 1000 >= k.ideal_pages * 999,
                format!("{} of {}", k.merging_pages, k.ideal_pages),
            )
        }),
    );
    push(
        "W1 converge time <= 1.2x merge_any's",
        Smoke::Reported,
        vs("W1", |k, m| {
            (
                k.converged && k.converge_secs <= 1.2 * m.converge_secs,
                format!("{:.1} s vs {:.1} s", k.converge_secs, m.converge_secs),
            )
        }),
    );
    push(
        "W5 profit >= merge_any's",
        Smoke::Asserted,
        profit_vs("W5", |k, m| k >= m),
    );
    push(
        "W6 profit >= 0.9x merge_any's",
        Smoke::Asserted,
        profit_vs("W6", |k, m| k as f64 >= 0.9 * m as f64),
    );
    push(
        "W6 rmap_items <= 1/5 of merge_any's",
        Smoke::Reported,
        // Exact: rmap_items stay far below 2^53.
        fraction_vs(
            "W6",
            5.0,
            |c| c.rmap_items as f64,
            |n| format!("{}", n as u64),
        ),
    );
    t
}

pub fn targets_text(ts: &[Target]) -> String {
    let mut s = String::from("targets (issue 4; * = the smoke run fails when it does):\n");
    for t in ts {
        let v = verdict(t.verdict, ["PASS", "FAIL", "n/a "]);
        let mark = if t.smoke { '*' } else { ' ' };
        let _ = writeln!(s, "  {v}{mark} {:<55} {}", t.name, t.detail);
    }
    s
}

/// The smoke run's failures among the targets: every asserted target that failed. A target
/// whose cells did not run is left to the cell checks (an unavailable or failed cell fails the
/// smoke on its own).
pub fn smoke_failures(cells: &[CellResult]) -> Vec<String> {
    targets(cells)
        .into_iter()
        .filter(|t| t.smoke && t.verdict == Some(false))
        .map(|t| format!("target {}: {}", t.name, t.detail))
        .collect()
}

pub const THESIS_W2: &str = "thesis Table 5-2 (same program as W2, KSM on the 2011 kernel): \
KSM (madvise of region 0 only) merged 256 pages with 25 600 rmap_items; \
KSM+ merged 512 pages with 1 027 rmap_items";

/// Merged MiB and rmap_items over time for each approach on one workload (normally W2).
pub fn svg(cells: &[CellResult], wl: &str, title: &str) -> String {
    let series: Vec<&CellResult> = cells
        .iter()
        .filter(|c| c.workload == wl && c.ran())
        .collect();
    let mib = |p: u64| p as f64 * 4096.0 / MIB;
    let lines = |v: &dyn Fn(&crate::cell::Sample) -> f64| -> Vec<Line> {
        series
            .iter()
            .map(|c| Line {
                name: &c.approach,
                color: plot::color(&c.approach),
                points: c.series.iter().map(|p| (p.t, v(p))).collect(),
            })
            .collect()
    };
    let panels = [
        Panel {
            label: "merged MiB",
            scale: Scale::Linear,
            lines: lines(&|p| mib(p.merging)),
        },
        Panel {
            label: "rmap_items (log)",
            scale: Scale::Log,
            lines: lines(&|p| p.rmap_items as f64),
        },
    ];
    plot::svg(title, "seconds since ksmd started", &panels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::Sample;

    fn cell(wl: &str, ap: &str, merging: u64, rmap: u64, profit: i64) -> CellResult {
        CellResult {
            workload: wl.into(),
            approach: ap.into(),
            status: "ok".into(),
            converged: true,
            ideal_pages: 512,
            merging_pages: merging,
            rmap_items: rmap,
            process_profit: profit,
            series: vec![
                Sample {
                    t: 0.1,
                    ..Default::default()
                },
                Sample {
                    t: 2.0,
                    merging,
                    rmap_items: rmap,
                    profit,
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn targets_and_svg() {
        let cells = vec![
            cell("W2", "merge_any", 256, 25600, -100),
            cell("W2", "ksmplus", 512, 1027, 1000),
        ];
        let t = targets(&cells);
        assert_eq!(t[0].verdict, Some(false)); // 1027 > 600
        assert_eq!(t[2].verdict, Some(true));
        assert_eq!(t[2].detail, "1000 B vs -100 B");
        assert_eq!(t[3].verdict, None);
        assert_eq!(t[3].detail, "cells missing");
        let svg = svg(&cells, "W2", "W2 <test>");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("W2 &lt;test&gt;"));
        assert!(table(&cells).contains("ksmplus"));
        // No steady window in any cell: no steady table.
        assert_eq!(steady(&cells), "");
        let mut with = cells.clone();
        with[1].steady = Some(crate::cost::Steady {
            spent: crate::cost::Interval {
                secs: 20.0,
                ksmd_secs: 0.2,
                agent_secs: Some(0.1),
                agent_ctxsw: Some(50),
                ksmd_scanned: Some(100_000),
                ..Default::default()
            },
            ..Default::default()
        });
        let st = steady(&with);
        assert!(st.starts_with("steady cost: 20 s"), "{st}");
        assert!(st.contains("W2  ksmplus        1.00    0.50"), "{st}");
        // 2.5 context switches a second; 5 000 pages a second at 2 µs each (0.2 s of ksmd).
        assert!(
            st.trim_end().ends_with("2.5       5000        2.00"),
            "{st}"
        );
    }

    #[test]
    fn profit_targets_compare_with_merge_any() {
        let cells = vec![
            cell("W6", "merge_any", 25800, 103550, 1000),
            cell("W6", "ksmplus", 25600, 25600, 900),
        ];
        let t = targets(&cells);
        let get = |name: &str| t.iter().find(|t| t.name == name).expect(name);
        let w6 = get("W6 profit >= 0.9x merge_any's");
        assert_eq!(
            (w6.verdict, w6.detail.as_str()),
            (Some(true), "900 B vs 1000 B")
        );
        assert_eq!(
            get("W6 rmap_items <= 1/5 of merge_any's").verdict,
            Some(false)
        );
        assert_eq!(get("W5 profit >= merge_any's").verdict, None);
    }

    #[test]
    fn smoke_fails_on_asserted_targets_only() {
        let mut w2m = cell("W2", "merge_any", 514, 51224, -100);
        w2m.ksmd_cpu_secs = 0.2;
        let mut w2k = cell("W2", "ksmplus", 512, 601, 1000); // > 600 rmap_items
        w2k.ksmd_cpu_secs = 0.1; // > 1/20 of merge_any's: reported only
        let mut w1k = cell("W1", "ksmplus", 1000, 1000, 1000);
        w1k.ideal_pages = 1024; // < 99.9 %
        let w1m = cell("W1", "merge_any", 1024, 1024, 1000);
        let w5m = cell("W5", "merge_any", 1026, 1560, 1001);
        let w5k = cell("W5", "ksmplus", 1024, 1024, 1000); // profit < merge_any's
        let w6m = cell("W6", "merge_any", 25800, 103550, 1000);
        let w6k = cell("W6", "ksmplus", 25600, 25600, 950); // >= 0.9x; rmap > 1/5 (reported)
        let cells = vec![w2m, w2k, w1k, w1m, w5m, w5k, w6m, w6k];
        let f = smoke_failures(&cells);
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].contains("W2 ksmplus merges") && f[0].contains("601 rmap_items"));
        assert!(f[1].contains("W1 ksmplus >= 99.9 %") && f[1].contains("1000 of 1024"));
        assert!(f[2].contains("W5 profit") && f[2].contains("1000 B vs 1001 B"));
        let text = targets_text(&targets(&cells));
        assert!(text.contains("FAIL  W2 ksmd CPU"), "{text}");
        assert!(text.contains("FAIL  W6 rmap_items"), "{text}");
        assert!(text.contains("PASS* W6 profit"), "{text}");
        assert!(text.contains("n/a * W3 ksmplus rmap_items = 0"), "{text}");
    }
}
