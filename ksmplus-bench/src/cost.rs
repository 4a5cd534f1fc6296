//! The whole cost of an approach (issue 12), shared by the head-to-head and the desktop
//! benchmarks: the steady window after convergence (ksmd's, the agent's and the programs' CPU,
//! the agent's wake-ups), the programs' CPU beyond a reference's (a control group read in the
//! same window where there is one, else the `none` cell's), and the time to a
//! fraction of the merging. The window's [`Reading`]s and [`between`] are the desktop long run's
//! too: every figure of CPU between two moments is read and subtracted the same way.

use crate::sys;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The cost of staying merged: a window after convergence with the programs open and idle.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Steady {
    /// Seconds after convergence the window started.
    pub after: f64,
    /// What the window spent (its fields are the window's in the JSON).
    #[serde(flatten)]
    pub spent: Interval,
}

impl Steady {
    /// Percent of one core over the window.
    pub fn pct(&self, cpu_secs: f64) -> f64 {
        pct(cpu_secs, self.spent.secs)
    }

    /// The agent's context switches per second over the window.
    pub fn ctxsw_per_sec(&self) -> Option<f64> {
        self.per_sec(self.spent.agent_ctxsw)
    }

    /// The agent's own wake-ups per second over the window, where the bench read them.
    pub fn wakeups_per_sec(&self) -> Option<f64> {
        self.per_sec(self.spent.agent_wakeups)
    }

    /// Pages the agent read per second over the window, where the bench read them.
    pub fn agent_pages_per_sec(&self) -> Option<f64> {
        self.per_sec(self.spent.agent_pages)
    }

    /// Pages ksmd looked at per second over the window.
    pub fn ksmd_pages_per_sec(&self) -> Option<f64> {
        self.per_sec(self.spent.ksmd_scanned)
    }

    /// ksmd's CPU per page it looked at, microseconds (`None` when it looked at none): the
    /// price of its work on this machine at this moment.
    pub fn ksmd_us_per_page(&self) -> Option<f64> {
        let n = self.spent.ksmd_scanned.filter(|&n| n > 0)?;
        Some(self.spent.ksmd_secs * 1e6 / n as f64)
    }

    /// A count over the window, per second (a zero-length window counts as a nanosecond).
    fn per_sec(&self, n: Option<u64>) -> Option<f64> {
        n.map(|n| n as f64 / self.spent.secs.max(1e-9))
    }

    /// The steady cost in % of one core. The reference for the programs' CPU is the window's
    /// own control group when it has one (the same programs without the approach, read at the
    /// same moments), else `none` (the same workload's `none` cell's window, minutes away:
    /// on a machine whose speed drifts, that difference is mostly drift).
    pub fn row(&self, none: Option<&Steady>) -> SteadyRow {
        let s = &self.spent;
        let progs = self.pct(s.programs_secs);
        let ksmd = self.pct(s.ksmd_secs);
        let agent = s.agent_secs.map(|a| self.pct(a));
        let reference = match s.control_secs {
            Some(c) => Some((Reference::Control, self.pct(c))),
            None => none.map(|n| (Reference::NoneCell, n.pct(n.spent.programs_secs))),
        };
        let extra = reference.map(|(_, r)| extra(progs, r));
        SteadyRow {
            ksmd,
            agent,
            progs,
            extra,
            reference: reference.map(|(which, _)| which),
            whole: extra.map(|e| whole(ksmd, agent, e)),
        }
    }
}

/// `cpu_secs` of CPU over `secs` as percent of one core (0 s counts as 1 ns).
pub fn pct(cpu_secs: f64, secs: f64) -> f64 {
    100.0 * cpu_secs / secs.max(1e-9)
}

/// What the programs' CPU is compared with for their `extra`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    /// Their control group, in the same window.
    Control,
    /// The same workload's `none` cell's window.
    NoneCell,
}

impl Reference {
    /// As the steady tables print it.
    pub fn label(self) -> &'static str {
        match self {
            Reference::Control => "ctl",
            Reference::NoneCell => "none",
        }
    }
}

/// One row of a steady-cost table, % of one core.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SteadyRow {
    pub ksmd: f64,
    pub agent: Option<f64>,
    pub progs: f64,
    /// The programs' CPU beyond the reference's: the control group's, else the `none` cell's
    /// (`None` when there is neither).
    pub extra: Option<f64>,
    /// Which reference `extra` was taken against.
    pub reference: Option<Reference>,
    /// ksmd + agent + extra.
    pub whole: Option<f64>,
}

/// The programs' CPU beyond the reference's (the `none` cell's), same unit as both. Negative
/// when the reference's programs were busier: noise, kept as measured.
pub fn extra(programs: f64, none_programs: f64) -> f64 {
    programs - none_programs
}

/// The whole cost: ksmd + agent (none without an agent) + the programs' extra.
pub fn whole(ksmd: f64, agent: Option<f64>, extra: f64) -> f64 {
    ksmd + agent.unwrap_or(0.0) + extra
}

/// Programs' CPU seconds beyond the `none` cell's over a window of `secs`, when the `none`
/// cell spent `none_cpu` over `none_secs`: its rate, scaled to this window (a workload that
/// keeps working, like W5's churn, costs in proportion to the time it is observed).
pub fn extra_scaled(cpu: f64, secs: f64, none_cpu: f64, none_secs: f64) -> f64 {
    if none_secs <= 0.0 {
        return extra(cpu, none_cpu);
    }
    extra(cpu, none_cpu * secs / none_secs)
}

/// Seconds of the first sample (`(t, merging)`) whose merging reaches `pct` % of `of`; `None`
/// when none does. With `of` = 0 the first sample reaches it.
pub fn time_to_pct(
    samples: impl IntoIterator<Item = (f64, u64)>,
    of: u64,
    pct: u64,
) -> Option<f64> {
    samples
        .into_iter()
        .find(|&(_, m)| m * 100 >= of * pct)
        .map(|(t, _)| t)
}

/// Seconds to 90 % of the final merging (the last sample's); `None` when nothing merged.
pub fn t90(samples: &[(f64, u64)]) -> Option<f64> {
    let &(_, last) = samples.last()?;
    if last == 0 {
        return None;
    }
    time_to_pct(samples.iter().copied(), last, 90)
}

/// Events per second between two readings of a counter `secs` apart (a counter that went back,
/// e.g. a thread that exited, counts 0).
pub fn rate(before: u64, after: u64, secs: f64) -> f64 {
    after.saturating_sub(before) as f64 / secs.max(1e-9)
}

/// What a [`Reading`] reads.
pub struct Probes<'a> {
    /// ksmd's CPU, nanoseconds.
    pub ksmd_ns: &'a dyn Fn() -> u64,
    pub agent: Option<u32>,
    /// Every process of the programs, and how to read one's CPU, nanoseconds (`None` when it is
    /// gone).
    pub programs: &'a [u32],
    pub program_ns: fn(u32) -> Option<u64>,
    /// The control group's processes (the same programs started beside them without the
    /// approach, desktop `--control`), read like `programs`; empty without one.
    pub control: &'a [u32],
    /// The agent's own counters, when the bench can read them (a status call).
    pub agent_counters: Option<&'a mut dyn FnMut() -> Option<AgentCounters>>,
}

impl Probes<'_> {
    fn agent_counters(&mut self) -> Option<AgentCounters> {
        self.agent_counters.as_mut().and_then(|w| w())
    }
}

/// What the agent counts itself (`ksmplusctl status --json`): its work, whatever the machine's
/// speed. On this machine the same work has cost 1 to 5 times the CPU from one hour to the
/// next, so a cell's CPU alone cannot tell a change of the agent from a change of the machine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentCounters {
    /// Event-loop wake-ups (`agent.wakeups`).
    pub wakeups: u64,
    /// Pages read (fingerprinted) per process (`processes[].fingerprinted_pages`).
    pub pages: BTreeMap<u32, u64>,
}

impl AgentCounters {
    /// From a status reply; `None` without the wake-up counter.
    pub fn from_status(v: &serde_json::Value) -> Option<AgentCounters> {
        let pages = v["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    u32::try_from(p["pid"].as_u64()?).ok()?,
                    p["fingerprinted_pages"].as_u64()?,
                ))
            })
            .collect();
        Some(AgentCounters {
            wakeups: v["agent"]["wakeups"].as_u64()?,
            pages,
        })
    }
}

/// The CPU counters at one moment; two of them give an [`Interval`] ([`between`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    /// When the counters had been read.
    pub at: Instant,
    /// ksmd's CPU, nanoseconds.
    pub ksmd_ns: u64,
    /// Every live thread of the agent (schedstat, nanoseconds), 0 when it is gone.
    pub agent_ns: Option<u64>,
    /// Context switches (voluntary + involuntary) of every live thread of the agent.
    pub agent_ctxsw: Option<u64>,
    /// Each process of the programs that could be read, nanoseconds.
    pub programs_ns: BTreeMap<u32, u64>,
    /// The same for the control group; `None` without one.
    pub control_ns: Option<BTreeMap<u32, u64>>,
    /// The agent's counters, when read.
    pub agent_counters: Option<AgentCounters>,
    /// ksmd's `pages_scanned` (pages it looked at; those smart_scan skipped are not counted),
    /// when the kernel has it.
    pub ksmd_scanned: Option<u64>,
}

impl Reading {
    /// The agent's counters (a status call of the bench, whose CPU is then the interval's that
    /// ends here), then the CPU counters.
    pub fn take(p: &mut Probes) -> Reading {
        let agent_counters = p.agent_counters();
        Reading {
            agent_counters,
            ..Reading::counters(p)
        }
    }

    /// The counters only, without the agent's wake-ups (no status call).
    pub fn counters(p: &Probes) -> Reading {
        // Read in this order, the instant last.
        let ksmd_ns = (p.ksmd_ns)();
        let ksmd_scanned = u64::try_from(sys::ksm_get("pages_scanned")).ok();
        let agent_ns = p.agent.map(sys::threads_cpu_ns);
        let agent_ctxsw = p.agent.map(sys::threads_ctx_switches);
        let read = |pids: &[u32]| -> BTreeMap<u32, u64> {
            pids.iter()
                .filter_map(|&pid| Some((pid, (p.program_ns)(pid)?)))
                .collect()
        };
        let programs_ns = read(p.programs);
        let control_ns = (!p.control.is_empty()).then(|| read(p.control));
        Reading {
            at: Instant::now(),
            ksmd_ns,
            agent_ns,
            agent_ctxsw,
            programs_ns,
            control_ns,
            agent_counters: None,
            ksmd_scanned,
        }
    }
}

/// What was spent between two readings.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Interval {
    /// Its length.
    pub secs: f64,
    /// CPU seconds.
    pub ksmd_secs: f64,
    pub agent_secs: Option<f64>,
    /// The processes of the programs read at both ends (their own work plus the shim's).
    pub programs_secs: f64,
    /// The control group's processes read at both ends, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_secs: Option<f64>,
    /// The agent's event-loop wake-ups (`status`' `agent.wakeups`), less the one status call of
    /// the bench the interval holds, where the bench reads them (desktop).
    pub agent_wakeups: Option<u64>,
    /// Context switches (voluntary + involuntary) of all the agent's threads: its wake-ups as
    /// the kernel counts them.
    pub agent_ctxsw: Option<u64>,
    /// Pages the agent read, in the processes it tracked at both ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_pages: Option<u64>,
    /// Pages ksmd looked at (`pages_scanned`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ksmd_scanned: Option<u64>,
}

/// The interval from `a` to `b`. A counter that went back (a thread that exited) counts 0. A
/// program process counts only when read at both ends, so one that exits is not negative and
/// one that appears is counted from the next interval. With one status call per reading, the
/// wake-ups between two readings hold one of the bench's calls, which is not the agent's own
/// work and is left out.
pub fn between(a: &Reading, b: &Reading) -> Interval {
    let secs = |x: u64, y: u64| y.saturating_sub(x) as f64 / 1e9;
    let ns_secs = |a, b| both_ends(a, b) as f64 / 1e9;
    Interval {
        secs: b.at.saturating_duration_since(a.at).as_secs_f64(),
        ksmd_secs: secs(a.ksmd_ns, b.ksmd_ns),
        agent_secs: a.agent_ns.zip(b.agent_ns).map(|(x, y)| secs(x, y)),
        programs_secs: ns_secs(&a.programs_ns, &b.programs_ns),
        // A control none of whose processes was read at both ends (it died) is no reference.
        control_secs: a
            .control_ns
            .as_ref()
            .zip(b.control_ns.as_ref())
            .filter(|(x, y)| x.keys().any(|pid| y.contains_key(pid)))
            .map(|(x, y)| ns_secs(x, y)),
        agent_wakeups: a
            .agent_counters
            .as_ref()
            .zip(b.agent_counters.as_ref())
            .map(|(x, y)| y.wakeups.saturating_sub(x.wakeups + 1)),
        agent_pages: a
            .agent_counters
            .as_ref()
            .zip(b.agent_counters.as_ref())
            .map(|(x, y)| both_ends(&x.pages, &y.pages)),
        ksmd_scanned: a
            .ksmd_scanned
            .zip(b.ksmd_scanned)
            .map(|(x, y)| y.saturating_sub(x)),
        agent_ctxsw: a
            .agent_ctxsw
            .zip(b.agent_ctxsw)
            .map(|(x, y)| y.saturating_sub(x)),
    }
}

/// How much the per-process counters `a` grew by `b`, over the processes read at both ends (a
/// counter that went back counts 0).
fn both_ends(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> u64 {
    b.iter()
        .filter_map(|(pid, nb)| Some(nb.saturating_sub(*a.get(pid)?)))
        .sum()
}

/// The steady window: waits `after` seconds, then measures `secs` seconds.
pub fn window(after: f64, secs: f64, mut p: Probes) -> Result<Steady, String> {
    sys::sleep_checked(Duration::from_secs_f64(after))?;
    let a = Reading::take(&mut p);
    sys::sleep_checked(Duration::from_secs_f64(secs))?;
    // The end's status call after the counters: the window's CPU and context switches hold no
    // status call of the bench (its wake-ups one, which `between` leaves out).
    let mut b = Reading::counters(&p);
    b.agent_counters = p.agent_counters();
    Ok(Steady {
        after,
        spent: between(&a, &b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_and_whole_against_the_none_cell() {
        assert_eq!(extra(0.5, 0.25), 0.25);
        // Busier reference: negative, kept.
        assert_eq!(extra(0.1, 0.25), -0.15);
        assert_eq!(whole(1.0, Some(0.5), 0.25), 1.75);
        assert_eq!(whole(1.0, None, -0.25), 0.75);
        // The none cell burnt 1 s in 4 s; this cell was observed 8 s: 2 s are the workload's.
        assert_eq!(extra_scaled(2.5, 8.0, 1.0, 4.0), 0.5);
        assert_eq!(extra_scaled(2.5, 8.0, 1.0, 0.0), 1.5);
    }

    /// The window's JSON keeps its flat field names (results files of earlier runs use them).
    #[test]
    fn steady_json_is_flat() {
        let st = Steady {
            after: 20.0,
            spent: Interval {
                secs: 30.0,
                agent_ctxsw: Some(7),
                ..Default::default()
            },
        };
        let v = serde_json::to_value(&st).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "after",
                "agent_ctxsw",
                "agent_secs",
                "agent_wakeups",
                "ksmd_secs",
                "programs_secs",
                "secs"
            ]
        );
        assert_eq!(v["secs"], 30.0);
    }

    #[test]
    fn steady_row_in_percent_of_a_core() {
        let none = Steady {
            spent: Interval {
                secs: 20.0,
                programs_secs: 0.2,
                ..Default::default()
            },
            ..Default::default()
        };
        let st = Steady {
            spent: Interval {
                secs: 20.0,
                ksmd_secs: 2.0,
                agent_secs: Some(0.4),
                programs_secs: 0.6,
                agent_ctxsw: Some(100),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = st.row(Some(&none));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(r.ksmd, 10.0) && close(r.agent.unwrap(), 2.0) && close(r.progs, 3.0));
        assert!(close(r.extra.unwrap(), 2.0) && close(r.whole.unwrap(), 14.0));
        assert_eq!(st.ctxsw_per_sec(), Some(5.0));
        // Without the none cell there is no extra, hence no whole.
        let r = st.row(None);
        assert_eq!((r.extra, r.whole), (None, None));
        // A control group read in the same window is the reference, before the none cell.
        let paired = Steady {
            spent: Interval {
                control_secs: Some(0.5),
                ..st.spent.clone()
            },
            ..Default::default()
        };
        for none in [Some(&none), None] {
            let r = paired.row(none);
            assert!(close(r.extra.unwrap(), 0.5) && close(r.whole.unwrap(), 12.5));
        }
    }

    #[test]
    fn t90_and_t99_from_a_series() {
        let s = [
            (0.1, 0),
            (0.2, 50),
            (0.3, 89),
            (0.4, 95),
            (0.5, 100),
            (0.6, 99),
        ];
        // 90 % of the last sample (99) is 89.1: first reached at 0.4.
        assert_eq!(t90(&s), Some(0.4));
        assert_eq!(time_to_pct(s, 100, 99), Some(0.5));
        assert_eq!(time_to_pct(s, 200, 99), None);
        assert_eq!(time_to_pct(s, 0, 99), Some(0.1));
        assert_eq!(t90(&[(0.1, 0), (0.2, 0)]), None);
        assert_eq!(t90(&[]), None);
    }

    fn counters(wakeups: u64, pages: &[(u32, u64)]) -> AgentCounters {
        AgentCounters {
            wakeups,
            pages: pages.iter().copied().collect(),
        }
    }

    #[test]
    fn agent_counters_from_a_status_reply() {
        let v = serde_json::json!({
            "agent": {"wakeups": 12},
            "processes": [
                {"pid": 7, "fingerprinted_pages": 300},
                {"pid": 8},
                {"pid": 9, "fingerprinted_pages": 5},
            ],
        });
        assert_eq!(
            AgentCounters::from_status(&v),
            Some(counters(12, &[(7, 300), (9, 5)]))
        );
        // An error reply (no agent) has no counters.
        let err = serde_json::json!({"ok": false, "error": "not running"});
        assert_eq!(AgentCounters::from_status(&err), None);
    }

    #[test]
    fn between_counts_what_was_read_at_both_ends() {
        let t = Instant::now();
        let a = Reading {
            at: t,
            ksmd_ns: 1_000_000_000,
            agent_ns: Some(700_000_000),
            agent_ctxsw: Some(500),
            programs_ns: [(1, 100), (2, 2_000_000_000), (3, 7)].into(),
            control_ns: None,
            agent_counters: Some(counters(40, &[(1, 10), (5, 100)])),
            ksmd_scanned: Some(1_000),
        };
        let b = Reading {
            at: t + Duration::from_secs(20),
            ksmd_ns: 3_000_000_000,
            // A thread of the agent exited: its counters went back.
            agent_ns: Some(600_000_000),
            agent_ctxsw: Some(450),
            // 1 ran 0.1 s, 2 went back (counts 0), 3 exited, 4 appeared.
            programs_ns: [(1, 100_000_100), (2, 1_000_000_000), (4, 9_000_000_000)].into(),
            control_ns: None,
            // Process 5 gone, 6 new: only 1's pages count.
            agent_counters: Some(counters(61, &[(1, 25), (6, 7)])),
            ksmd_scanned: Some(6_000),
        };
        let i = between(&a, &b);
        let close = |x: f64, y: f64| (x - y).abs() < 1e-9;
        assert!(close(i.secs, 20.0) && close(i.ksmd_secs, 2.0));
        assert_eq!((i.agent_secs, i.agent_ctxsw), (Some(0.0), Some(0)));
        assert!(close(i.programs_secs, 0.1));
        assert_eq!(i.control_secs, None);
        // A control group is counted like the programs, on its own.
        let with_control = |ns: [(u32, u64); 2], r: &Reading| Reading {
            control_ns: Some(ns.into()),
            ..r.clone()
        };
        let c = between(
            &with_control([(7, 1_000), (8, 5)], &a),
            &with_control([(7, 300_001_000), (9, 4_000_000_000)], &b),
        );
        assert!(close(c.control_secs.unwrap(), 0.3) && close(c.programs_secs, 0.1));
        // A control whose processes all went away between the readings is no reference.
        let gone = between(
            &with_control([(7, 1_000), (8, 5)], &a),
            &with_control([(9, 4_000_000_000), (10, 1)], &b),
        );
        assert_eq!(gone.control_secs, None);
        // 21, one of them the bench's status call.
        assert_eq!(i.agent_wakeups, Some(20));
        assert_eq!((i.agent_pages, i.ksmd_scanned), (Some(15), Some(5_000)));
        // The same reading twice: the wake-up counter did not move, 0 and not an underflow.
        let same = between(&a, &a);
        assert_eq!(same.agent_wakeups, Some(0));
        assert_eq!((same.secs, same.programs_secs), (0.0, 0.0));
        // No agent, or wake-ups read at one end only: no figure.
        let none = between(
            &Reading {
                agent_ns: None,
                agent_ctxsw: None,
                agent_counters: None,
                ..a.clone()
            },
            &b,
        );
        assert_eq!(
            (none.agent_secs, none.agent_ctxsw, none.agent_wakeups),
            (None, None, None)
        );
        // Read the wrong way round: the counters count 0, the length 0.
        let back = between(&b, &a);
        assert_eq!((back.secs, back.ksmd_secs), (0.0, 0.0));
    }

    #[test]
    fn percent_of_a_core() {
        assert_eq!(pct(0.5, 10.0), 5.0);
        assert_eq!(pct(0.0, 0.0), 0.0);
        assert!(pct(1.0, 0.0).is_finite());
    }

    #[test]
    fn wakeup_rate_from_two_samples() {
        assert_eq!(rate(100, 300, 20.0), 10.0);
        assert_eq!(rate(300, 100, 20.0), 0.0);
    }
}
