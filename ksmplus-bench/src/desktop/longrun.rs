//! The long run of a cell (`--long-run SECS`, issue 12): from ksmd's start (t0) the programs
//! stay open `SECS` seconds; every `--turn-every` seconds each program window gets the next key
//! of its scenario's cycle (a page turn in okular, a scroll or tab switch in the browsers, a
//! key in abiword and xterm), and every `--sample-every` seconds the sampler records the
//! saving and the cost of the interval that just ended.
//!
//! It starts at t0, not at convergence, so the samples show the convergence too. The cell's
//! convergence loop calls `tick` while it runs (the usual figures at convergence are taken as
//! without a long run); `finish` then carries the schedule on to `SECS`. The measurements are
//! the cell's own: `ksm_stat` for merging pages and rmap items, `procs::ksm_pages` (pagemap +
//! kpageflags) for the saving; for the CPU the steady window's `cost::Reading` and
//! `cost::between` (schedstat for ksmd and for every thread of the agent, utime + stime for the
//! programs, the agent's `status` for its wake-ups).

use super::ctx::{agent_status, root, Ctx, LongCfg};
use super::procs;
use super::results::{LongRun, LongSample, TurnRound};
use super::running::read_like_a_user;
use super::scenario::Scenario;
use super::user::UserSide;
use crate::approach::Launch;
use crate::cost::{self, AgentCounters, Probes, Reading};
use crate::sys;
use ksmplus_common::ksm;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The sample of the interval from `a` to `b` with its CPU figures ([`cost::between`]), at `t`
/// = `b`'s seconds since `t0`; the rest left at zero.
fn cpu_sample(t0: Instant, a: &Reading, b: &Reading) -> LongSample {
    let cpu = cost::between(a, b);
    LongSample {
        t: b.at.saturating_duration_since(t0).as_secs_f64(),
        secs: cpu.secs,
        ksmd_secs: cpu.ksmd_secs,
        agent_secs: cpu.agent_secs,
        programs_secs: cpu.programs_secs,
        agent_wakeups: cpu.agent_wakeups,
        ..Default::default()
    }
}

/// The cell's CPU counters (ksmd's, the agent's threads', those of `pids`, utime + stime) and
/// the agent's wake-ups, read through its status call.
fn read(
    ctx: &Ctx,
    user: Option<&UserSide>,
    agent: Option<&(u32, PathBuf)>,
    pids: &[u32],
    notes: &mut Vec<String>,
) -> Reading {
    let ksmd_ns = || ctx.ksmd_pid.and_then(sys::task_runtime_ns).unwrap_or(0);
    let mut counters = || AgentCounters::from_status(&agent_status(ctx, user, &agent?.1, notes)?);
    Reading::take(&mut Probes {
        ksmd_ns: &ksmd_ns,
        agent: agent.map(|(p, _)| *p),
        programs: pids,
        program_ns: sys::process_cpu_ns,
        control: &[],
        agent_counters: Some(&mut counters),
    })
}

/// When the next event of a schedule of period `every` is due after `done` of them, or never
/// past `end`.
fn due(every: f64, done: usize, end: f64) -> Option<f64> {
    let t = every * (done + 1) as f64;
    (every > 0.0 && t <= end + 1e-9).then_some(t)
}

pub struct Sampler<'a> {
    ctx: &'a Ctx<'a>,
    sc: &'a Scenario,
    user: Option<&'a UserSide>,
    agent: Option<(u32, PathBuf)>,
    /// The programs' own pids (their windows), in the scenario's order.
    windows: Vec<u32>,
    t0: Instant,
    /// Every process of the programs seen so far.
    known: BTreeSet<u32>,
    /// The reading at the end of the last interval.
    prev: Reading,
    pub run: LongRun,
    pub notes: Vec<String>,
}

impl<'a> Sampler<'a> {
    /// t0 (`t0()`, to be taken as the cell's) and the counters there; call right before ksmd
    /// starts. `windows` are the programs' own pids in the scenario's order, `procs` every
    /// process of theirs.
    pub fn start(
        ctx: &'a Ctx<'a>,
        sc: &'a Scenario,
        user: Option<&'a UserSide>,
        launch: &Launch,
        cfg: LongCfg,
        (windows, procs): (Vec<u32>, Vec<u32>),
    ) -> Sampler<'a> {
        let agent = launch
            .agent
            .as_ref()
            .map(|a| (a.pid(), a.dir.join("agent.sock")));
        let t0 = Instant::now();
        let mut notes = Vec::new();
        let prev = read(ctx, user, agent.as_ref(), &procs, &mut notes);
        Sampler {
            ctx,
            sc,
            user,
            agent,
            known: windows.iter().chain(&procs).copied().collect(),
            windows,
            t0,
            prev,
            run: LongRun {
                secs: cfg.secs,
                turn_every: cfg.turn_every,
                sample_every: cfg.sample_every,
                ..Default::default()
            },
            notes,
        }
    }

    pub fn t0(&self) -> Instant {
        self.t0
    }

    fn elapsed(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn next_sample(&self) -> Option<f64> {
        due(self.run.sample_every, self.run.samples.len(), self.run.secs)
    }

    fn next_turn(&self) -> Option<f64> {
        // No key round at the very end: the cell's own "after merging" key follows.
        due(
            self.run.turn_every,
            self.run.turns.len(),
            self.run.secs - 1e-6,
        )
    }

    /// Takes what is due: the sample first (on time), then the key round. `current` lists
    /// the programs' processes now.
    pub fn tick(&mut self, current: &dyn Fn() -> Vec<u32>) -> Result<(), String> {
        let t = self.elapsed();
        if self.next_sample().is_some_and(|d| t >= d) {
            self.known.extend(current());
            self.sample();
        }
        if self.next_turn().is_some_and(|d| t >= d) {
            self.turn();
        }
        if sys::stop_requested() {
            return Err("stopped".into());
        }
        Ok(())
    }

    /// Carries the schedule on to the end of the long run; returns what was measured.
    pub fn finish(
        mut self,
        current: &dyn Fn() -> Vec<u32>,
    ) -> Result<(LongRun, Vec<String>), String> {
        loop {
            let next = match (self.next_sample(), self.next_turn()) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => break,
            };
            let wait = (next - self.elapsed()).max(0.0);
            sys::sleep_checked(Duration::from_secs_f64(wait))?;
            self.tick(current)?;
        }
        Ok((self.run, self.notes))
    }

    fn sample(&mut self) {
        let pids: Vec<u32> = self
            .known
            .iter()
            .copied()
            .filter(|&p| sys::pid_alive(p) && !procs::zombie(p))
            .collect();
        let (mut merging, mut rmap) = (0, 0);
        for &p in &pids {
            if let Ok(st) = ksm::read_ksm_stat(root(), p) {
                merging += st.merging_pages;
                rmap += st.rmap_items;
            }
        }
        let probe = Instant::now();
        let own = procs::ksm_pages(&pids).map(|(mapped, distinct)| mapped.saturating_sub(distinct));
        self.run.probe_secs += probe.elapsed().as_secs_f64();
        let now = read(
            self.ctx,
            self.user,
            self.agent.as_ref(),
            &pids,
            &mut self.notes,
        );
        let mut s = cpu_sample(self.t0, &self.prev, &now);
        self.prev = now;
        s.own_sharing = own.unwrap_or(0);
        s.saved_mib = s.own_sharing as f64 * 4096.0 / 1048576.0;
        s.merging = merging;
        s.rmap_items = rmap;
        s.processes = pids.len();
        if own.is_none() && self.run.samples.is_empty() {
            self.notes
                .push("long run: no /proc/kpageflags, saved is 0 in every sample".into());
        }
        // Progress of a run that may last many minutes.
        eprintln!(
            "ksmplus-bench desktop: long run {} {:>5.0} s: saved {:.2} MiB, merging {}, rmap {}, ksmd {:.1} %",
            self.sc.id,
            s.t,
            s.saved_mib,
            s.merging,
            s.rmap_items,
            s.pct(s.ksmd_secs)
        );
        self.run.samples.push(s);
    }

    /// One key per program window, the next of its cycle after the reading and the earlier
    /// rounds.
    fn turn(&mut self) {
        let t = self.elapsed();
        let round = self.run.turns.len();
        let mut answered = 0;
        for (p, &pid) in self.sc.programs.iter().zip(&self.windows) {
            if read_like_a_user(self.ctx.desktop, p, pid, 1, p.presses + 1 + round) {
                answered += 1;
            }
        }
        self.run.turns.push(TurnRound {
            t,
            answered,
            windows: self.windows.len(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_cpu_counts_processes_alive_at_both_ends() {
        let t0 = Instant::now();
        let a = Reading {
            at: t0 + Duration::from_secs(10),
            ksmd_ns: 1_000_000_000,
            agent_ns: Some(500_000_000),
            agent_ctxsw: Some(1_000),
            programs_ns: [(1, 100), (2, 2_000_000_000), (3, 7)].into(),
            control_ns: None,
            agent_counters: Some(AgentCounters {
                wakeups: 40,
                ..Default::default()
            }),
            ksmd_scanned: None,
        };
        let b = Reading {
            at: t0 + Duration::from_secs(20),
            ksmd_ns: 3_000_000_000,
            agent_ns: Some(600_000_000),
            agent_ctxsw: Some(1_200),
            // 3 exited, 4 appeared (its start-up is not this interval's).
            programs_ns: [(1, 100_000_100), (2, 2_400_000_000), (4, 9_000_000_000)].into(),
            control_ns: None,
            agent_counters: Some(AgentCounters {
                wakeups: 61,
                ..Default::default()
            }),
            ksmd_scanned: None,
        };
        let s = cpu_sample(t0, &a, &b);
        assert_eq!((s.t, s.secs), (20.0, 10.0));
        assert!((s.ksmd_secs - 2.0).abs() < 1e-9);
        assert!((s.agent_secs.unwrap() - 0.1).abs() < 1e-9);
        assert!((s.programs_secs - 0.5).abs() < 1e-9);
        // 21 wake-ups, one of them the sampler's status call.
        assert_eq!(s.agent_wakeups, Some(20));
        assert!((s.pct(s.ksmd_secs) - 20.0).abs() < 1e-9);
        // The state fields are the sampler's to fill.
        assert_eq!((s.own_sharing, s.merging, s.processes), (0, 0, 0));
        // No agent (approach none / merge_any): no agent figures.
        let no_agent = Reading {
            agent_ns: None,
            agent_ctxsw: None,
            agent_counters: None,
            ..a.clone()
        };
        let none = cpu_sample(t0, &no_agent, &b);
        assert_eq!((none.agent_secs, none.agent_wakeups), (None, None));
    }

    #[test]
    fn schedules_end_with_the_run() {
        assert_eq!(due(10.0, 0, 120.0), Some(10.0));
        assert_eq!(due(10.0, 11, 120.0), Some(120.0));
        assert_eq!(due(10.0, 12, 120.0), None);
        // Turns stop short of the end.
        assert_eq!(due(30.0, 3, 120.0 - 1e-6), None);
        assert_eq!(due(30.0, 2, 120.0 - 1e-6), Some(90.0));
        assert_eq!(due(0.0, 0, 120.0), None);
    }
}
