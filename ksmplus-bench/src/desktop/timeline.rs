//! The long run's outputs (`--long-run`, issue 12): a time-series table per cell, a CSV per
//! cell and, per scenario, an SVG of the saving and the whole cost over time with one line
//! per approach (`plot.rs`, the head-to-head bench's plotter).
//!
//! `extra` is a sample's programs' CPU beyond that of the same scenario's `none` cell's sample
//! of the same index (the same nominal time: every cell samples on the same grid from its t0),
//! `whole` = ksmd + agent + extra, as in the steady table.

use super::results::DeskCell;
use crate::cost;
use crate::plot::{self, Line, Panel, Scale};
use crate::table::opt;
use std::fmt::Write as _;
use std::path::Path;

/// One sample of a cell, as % of one core over its interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub t: f64,
    pub saved_mib: f64,
    pub merging: u64,
    pub rmap_items: u64,
    pub ksmd: f64,
    pub agent: Option<f64>,
    pub programs: f64,
    pub extra: Option<f64>,
    pub whole: Option<f64>,
    pub wakeups_per_s: Option<f64>,
    /// `(answered, windows)` of the key round in the interval, if one was.
    pub keys: Option<(usize, usize)>,
}

/// The `none` cell of `c`'s scenario with a long run.
fn none_of<'a>(cells: &'a [DeskCell], c: &DeskCell) -> Option<&'a DeskCell> {
    cells.iter().find(|n| {
        n.scenario == c.scenario && n.approach == "none" && n.ran() && n.long_run.is_some()
    })
}

/// The rows of a cell's long run; `none` gives `extra` and `whole`.
pub fn rows(c: &DeskCell, none: Option<&DeskCell>) -> Vec<Row> {
    let Some(lr) = &c.long_run else {
        return Vec::new();
    };
    let base = none.and_then(|n| n.long_run.as_ref());
    let mut prev_t = 0.0;
    lr.samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let programs = s.pct(s.programs_secs);
            let extra = base
                .and_then(|b| b.samples.get(i))
                .map(|n| cost::extra(programs, n.pct(n.programs_secs)));
            let (ksmd, agent) = (s.pct(s.ksmd_secs), s.agent_secs.map(|a| s.pct(a)));
            let keys = lr
                .turns
                .iter()
                .find(|k| k.t > prev_t && k.t <= s.t)
                .map(|k| (k.answered, k.windows));
            prev_t = s.t;
            Row {
                t: s.t,
                saved_mib: s.saved_mib,
                merging: s.merging,
                rmap_items: s.rmap_items,
                ksmd,
                agent,
                programs,
                extra,
                whole: extra.map(|e| cost::whole(ksmd, agent, e)),
                wakeups_per_s: s.agent_wakeups.map(|w| w as f64 / s.secs.max(1e-9)),
                keys,
            }
        })
        .collect()
}

/// The time-series table of every cell with a long run.
pub fn table(cells: &[DeskCell]) -> String {
    let mut s = String::new();
    for c in cells.iter().filter(|c| c.ran()) {
        let Some(lr) = &c.long_run else {
            continue;
        };
        let rows = rows(c, none_of(cells, c));
        let answered: usize = lr.turns.iter().map(|k| k.answered).sum();
        let keys: usize = lr.turns.iter().map(|k| k.windows).sum();
        let _ = writeln!(
            s,
            "long run {} {}: {:.0} s from ksmd's start, a key per window every {:.0} s ({} rounds, {answered}/{keys} windows changed), a sample every {:.0} s; saved from pagemap + kpageflags; CPU as % of one core over each interval{}",
            c.scenario,
            c.approach,
            lr.secs,
            lr.turn_every,
            lr.turns.len(),
            lr.sample_every,
            if none_of(cells, c).is_none() {
                " (no none cell: extra and whole unknown)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "{:>6} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>5}",
            "t_s",
            "savedMiB",
            "merging",
            "rmap",
            "ksmd%",
            "agent%",
            "progs%",
            "extra%",
            "whole%",
            "wake/s",
            "keys"
        );
        for r in &rows {
            let _ = writeln!(
                s,
                "{:>6.1} {:>8.2} {:>7} {:>7} {:>7.2} {:>7} {:>7.2} {:>7} {:>7} {:>7} {:>5}",
                r.t,
                r.saved_mib,
                r.merging,
                r.rmap_items,
                r.ksmd,
                opt(r.agent, 2),
                r.programs,
                opt(r.extra, 2),
                opt(r.whole, 2),
                opt(r.wakeups_per_s, 1),
                r.keys.map_or(String::new(), |(a, w)| format!("{a}/{w}")),
            );
        }
        // Intervals that began after convergence: the cost of staying merged.
        let after: Vec<&Row> = rows
            .iter()
            .zip(&lr.samples)
            .filter(|(_, x)| x.t - x.secs >= c.converge_secs)
            .map(|(r, _)| r)
            .collect();
        if !after.is_empty() {
            let n = after.len() as f64;
            let mean = |f: &dyn Fn(&Row) -> Option<f64>| -> Option<f64> {
                let v: Option<Vec<f64>> = after.iter().map(|r| f(r)).collect();
                v.map(|v| v.iter().sum::<f64>() / n)
            };
            let _ = writeln!(
                s,
                "mean of the {} samples after convergence ({:.1} s): ksmd {}%, agent {}%, extra {}%, whole {}%, {} wake-ups/s",
                after.len(),
                c.converge_secs,
                opt(mean(&|r| Some(r.ksmd)), 2),
                opt(mean(&|r| r.agent), 2),
                opt(mean(&|r| r.extra), 2),
                opt(mean(&|r| r.whole), 2),
                opt(mean(&|r| r.wakeups_per_s), 1),
            );
        }
        s.push('\n');
    }
    s
}

/// A cell's rows as CSV (empty fields for figures that do not exist).
pub fn csv(rows: &[Row]) -> String {
    let o = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.3}"));
    let mut s = String::from(
        "t_s,saved_mib,merging_pages,rmap_items,ksmd_pct,agent_pct,programs_pct,extra_pct,whole_pct,agent_wakeups_per_s,keys_changed,keys_windows\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:.1},{:.3},{},{},{:.3},{},{:.3},{},{},{},{},{}",
            r.t,
            r.saved_mib,
            r.merging,
            r.rmap_items,
            r.ksmd,
            o(r.agent),
            r.programs,
            o(r.extra),
            o(r.whole),
            o(r.wakeups_per_s),
            r.keys.map_or(String::new(), |k| k.0.to_string()),
            r.keys.map_or(String::new(), |k| k.1.to_string()),
        );
    }
    s
}

/// Saved MiB and the whole cost over time, one line per approach of `scenario` (with the
/// `none` cell missing the cost panel shows ksmd + agent and says so); `None` without a long
/// run in that scenario.
pub fn svg(cells: &[DeskCell], scenario: &str, title: &str) -> Option<String> {
    let with: Vec<(&DeskCell, Vec<Row>)> = cells
        .iter()
        .filter(|c| c.scenario == scenario && c.ran() && c.long_run.is_some())
        .map(|c| (c, rows(c, none_of(cells, c))))
        .collect();
    if with.is_empty() {
        return None;
    }
    let whole = with
        .iter()
        .all(|(_, rs)| rs.iter().all(|r| r.whole.is_some()));
    let lines = |v: &dyn Fn(&Row) -> f64, origin: bool| -> Vec<Line> {
        with.iter()
            .map(|(c, rs)| Line {
                name: &c.approach,
                color: plot::color(&c.approach),
                points: origin
                    .then_some((0.0, 0.0))
                    .into_iter()
                    .chain(rs.iter().map(|r| (r.t, v(r))))
                    .collect(),
            })
            .collect()
    };
    let panels = [
        Panel {
            label: "saved MiB",
            scale: Scale::Linear,
            lines: lines(&|r| r.saved_mib, true),
        },
        Panel {
            label: if whole {
                "whole cost, % of one core"
            } else {
                "ksmd + agent, % of one core (no none cell)"
            },
            scale: Scale::Linear,
            lines: lines(
                &|r| r.whole.unwrap_or(r.ksmd + r.agent.unwrap_or(0.0)),
                false,
            ),
        },
    ];
    Some(plot::svg(title, "seconds since ksmd started", &panels))
}

/// Writes `longrun-SCN-APPROACH.csv` per cell and `longrun-SCN.svg` per scenario into `dir`;
/// returns the paths written. `title` follows the scenario's id in each plot's title.
pub fn write(cells: &[DeskCell], dir: &Path, title: &str) -> Result<Vec<String>, String> {
    let mut written = Vec::new();
    let mut put = |name: String, text: String| -> Result<(), String> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        written.push(p.display().to_string());
        Ok(())
    };
    let mut scenarios: Vec<&str> = Vec::new();
    for c in cells.iter().filter(|c| c.ran() && c.long_run.is_some()) {
        put(
            format!("longrun-{}-{}.csv", c.scenario, c.approach),
            csv(&rows(c, none_of(cells, c))),
        )?;
        if !scenarios.contains(&c.scenario.as_str()) {
            scenarios.push(&c.scenario);
        }
    }
    for sc in scenarios {
        if let Some(text) = svg(cells, sc, &format!("{sc} long run: {title}")) {
            put(format!("longrun-{sc}.svg"), text)?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desktop::results::{LongRun, LongSample, TurnRound};

    fn cell(ap: &str, progs: f64, saved: [f64; 2]) -> DeskCell {
        let sample = |t: f64, saved_mib: f64| LongSample {
            t,
            secs: 10.0,
            saved_mib,
            merging: 100,
            rmap_items: 200,
            ksmd_secs: if ap == "none" { 0.0 } else { 1.0 },
            agent_secs: (ap == "ksmplus").then_some(0.1),
            programs_secs: progs,
            agent_wakeups: (ap == "ksmplus").then_some(30),
            processes: 3,
            ..Default::default()
        };
        DeskCell {
            scenario: "D4".into(),
            approach: ap.into(),
            status: "ok".into(),
            converge_secs: 5.0,
            long_run: Some(LongRun {
                secs: 20.0,
                turn_every: 15.0,
                sample_every: 10.0,
                samples: vec![sample(10.0, saved[0]), sample(20.0, saved[1])],
                turns: vec![TurnRound {
                    t: 15.5,
                    answered: 6,
                    windows: 7,
                }],
                probe_secs: 0.0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rows_csv_and_plot_of_a_long_run() {
        let cells = vec![
            cell("none", 0.2, [0.0, 0.0]),
            cell("merge_any", 0.3, [30.0, 40.0]),
            cell("ksmplus", 0.25, [20.0, 35.0]),
        ];
        let k = rows(&cells[2], none_of(&cells, &cells[2]));
        assert_eq!(k.len(), 2);
        // 1 s of ksmd, 0.1 s of agent, 0.05 s more than none's programs over 10 s.
        assert!((k[1].ksmd - 10.0).abs() < 1e-9);
        assert!((k[1].extra.unwrap() - 0.5).abs() < 1e-9);
        assert!((k[1].whole.unwrap() - 11.5).abs() < 1e-9);
        assert_eq!(k[1].wakeups_per_s, Some(3.0));
        assert_eq!((k[0].keys, k[1].keys), (None, Some((6, 7))));
        let c = csv(&k);
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("t_s,saved_mib,"));
        assert_eq!(
            lines[2],
            "20.0,35.000,100,200,10.000,1.000,2.500,0.500,11.500,3.000,6,7"
        );
        // merge_any has no agent: empty fields.
        let m = csv(&rows(&cells[1], none_of(&cells, &cells[1])));
        assert!(m
            .lines()
            .nth(1)
            .unwrap()
            .contains(",10.000,,3.000,1.000,11.000,,,"));
        let plot = svg(&cells, "D4", "D4 <x>").unwrap();
        // Two panels, three approaches.
        assert_eq!(plot.matches("<polyline").count(), 6);
        assert!(plot.contains("whole cost") && plot.contains("D4 &lt;x&gt;"));
        assert!(svg(&cells, "D1", "x").is_none());
        let t = table(&cells);
        assert!(
            t.contains("long run D4 ksmplus") && t.contains("6/7"),
            "{t}"
        );
        assert!(t.contains("whole 11.00%"), "{t}");
    }

    #[test]
    fn without_a_none_cell_the_cost_is_ksmd_and_agent() {
        let cells = vec![cell("ksmplus", 0.25, [20.0, 35.0])];
        let k = rows(&cells[0], None);
        assert_eq!((k[0].extra, k[0].whole), (None, None));
        let svg = svg(&cells, "D4", "t").unwrap();
        assert!(svg.contains("no none cell"));
        assert!(table(&cells).contains("extra and whole unknown"));
    }
}
