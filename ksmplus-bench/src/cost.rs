//! The whole cost of an approach (issue 12), shared by the head-to-head and the desktop
//! benchmarks: the steady window after convergence (ksmd's, the agent's and the programs' CPU,
//! the agent's wake-ups), the programs' CPU beyond the `none` cell's, and the time to a
//! fraction of the merging.

use crate::sys;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The cost of staying merged: a window after convergence with the programs open and idle.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Steady {
    /// Seconds after convergence the window started, and its length.
    pub after: f64,
    pub secs: f64,
    /// CPU seconds in the window.
    pub ksmd_secs: f64,
    pub agent_secs: Option<f64>,
    /// Every process of the programs (their own work plus the shim's).
    pub programs_secs: f64,
    /// The agent's event-loop wake-ups (`status`' `agent.wakeups`), minus the status call's,
    /// where the bench reads them (desktop).
    pub agent_wakeups: Option<u64>,
    /// Context switches (voluntary + involuntary) of all the agent's threads in the window: its
    /// wake-ups as the kernel counts them.
    pub agent_ctxsw: Option<u64>,
}

impl Steady {
    /// Percent of one core over the window.
    pub fn pct(&self, cpu_secs: f64) -> f64 {
        100.0 * cpu_secs / self.secs.max(1e-9)
    }

    /// The agent's context switches per second over the window.
    pub fn ctxsw_per_sec(&self) -> Option<f64> {
        self.agent_ctxsw.map(|n| n as f64 / self.secs.max(1e-9))
    }

    /// The steady cost in % of one core, with `none` (the same workload's `none` cell's
    /// window) as the reference for the programs' CPU.
    pub fn row(&self, none: Option<&Steady>) -> SteadyRow {
        let progs = self.pct(self.programs_secs);
        let ksmd = self.pct(self.ksmd_secs);
        let agent = self.agent_secs.map(|a| self.pct(a));
        let extra = none.map(|n| extra(progs, n.pct(n.programs_secs)));
        SteadyRow {
            ksmd,
            agent,
            progs,
            extra,
            whole: extra.map(|e| whole(ksmd, agent, e)),
        }
    }
}

/// One row of a steady-cost table, % of one core.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SteadyRow {
    pub ksmd: f64,
    pub agent: Option<f64>,
    pub progs: f64,
    /// The programs' CPU beyond the `none` cell's (`None` when that cell has no figure).
    pub extra: Option<f64>,
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

/// What the window reads.
pub struct Probes<'a> {
    /// ksmd's CPU, nanoseconds.
    pub ksmd_ns: &'a dyn Fn() -> u64,
    pub agent: Option<u32>,
    /// Every process of the programs, and how to read one's CPU, nanoseconds (`None` when it is
    /// gone).
    pub programs: &'a [u32],
    pub program_ns: fn(u32) -> Option<u64>,
    /// The agent's own wake-up counter, when the bench can read it.
    pub wakeups: Option<&'a mut dyn FnMut() -> Option<u64>>,
}

/// The steady window: waits `after` seconds, then measures `secs` seconds.
pub fn window(after: f64, secs: f64, mut p: Probes) -> Result<Steady, String> {
    let agent_ns = |a: Option<u32>| a.map(sys::threads_cpu_ns);
    let ctxsw = |a: Option<u32>| a.map(sys::threads_ctx_switches);
    let progs = || -> BTreeMap<u32, u64> {
        p.programs
            .iter()
            .filter_map(|&pid| Some((pid, (p.program_ns)(pid)?)))
            .collect()
    };
    sys::sleep_checked(Duration::from_secs_f64(after))?;
    let w0 = p.wakeups.as_mut().and_then(|w| w());
    let (k0, a0, x0, p0) = ((p.ksmd_ns)(), agent_ns(p.agent), ctxsw(p.agent), progs());
    let t0 = Instant::now();
    sys::sleep_checked(Duration::from_secs_f64(secs))?;
    let (k1, a1, x1, p1) = ((p.ksmd_ns)(), agent_ns(p.agent), ctxsw(p.agent), progs());
    let secs = t0.elapsed().as_secs_f64();
    let w1 = p.wakeups.as_mut().and_then(|w| w());
    // Per process, so one that exits in the window does not count negative.
    let programs_ns: u64 = p1
        .iter()
        .filter_map(|(pid, b)| Some(b.saturating_sub(*p0.get(pid)?)))
        .sum();
    let ns = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9;
    Ok(Steady {
        after,
        secs,
        ksmd_secs: ns(k0, k1),
        agent_secs: a0.zip(a1).map(|(a, b)| ns(a, b)),
        programs_secs: programs_ns as f64 / 1e9,
        // The first status call's own wake-up is inside the window.
        agent_wakeups: w0.zip(w1).map(|(a, b)| b.saturating_sub(a + 1)),
        agent_ctxsw: x0.zip(x1).map(|(a, b)| b.saturating_sub(a)),
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

    #[test]
    fn steady_row_in_percent_of_a_core() {
        let none = Steady {
            secs: 20.0,
            programs_secs: 0.2,
            ..Default::default()
        };
        let st = Steady {
            secs: 20.0,
            ksmd_secs: 2.0,
            agent_secs: Some(0.4),
            programs_secs: 0.6,
            agent_ctxsw: Some(100),
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

    #[test]
    fn wakeup_rate_from_two_samples() {
        assert_eq!(rate(100, 300, 20.0), 10.0);
        assert_eq!(rate(300, 100, 20.0), 0.0);
    }
}
