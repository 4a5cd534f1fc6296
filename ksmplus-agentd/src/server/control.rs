//! The control channel: typed requests from `ksmplusctl` ([`Request`]), answered with typed
//! replies ([`StatusReply`], [`SimpleReply`]) as JSON.
//!
//! Invariant: answering reads nothing slower than one `ksm_stat` per tracked process (and the
//! agent's own `/proc/self`); coverage figures come from the background refresh, with their age.

use super::{Agent, MAX_WAKES};
use crate::client::{Client, Sandbox};
use crate::engine::BYTES_PER_FINGERPRINT;
use ksmplus_common::channel::flag;
use ksmplus_common::ksm::{self, SmapsVma};
use ksmplus_common::maps::Skip;
use ksmplus_common::policy::Policy;
use ksmplus_common::status::*;
use std::collections::BTreeMap;
use std::path::Path;

impl Agent {
    /// Answers one control request (JSON in, JSON out).
    pub(super) fn control(&mut self, request: &str) -> String {
        handle(self, request)
    }
}

fn handle(agent: &mut Agent, request: &str) -> String {
    let req: Request = match serde_json::from_str(request) {
        Ok(r) => r,
        Err(e) => return json(&SimpleReply::err(format!("bad request: {e}"))),
    };
    match req {
        Request::Ping => json(&SimpleReply {
            pid: Some(std::process::id()),
            ..SimpleReply::ok()
        }),
        Request::Status => json(&status(agent)),
        Request::Reload => json(&match agent.reload() {
            Ok(()) => SimpleReply {
                policy: Some(agent.opts.policy_path.display().to_string()),
                ..SimpleReply::ok()
            },
            Err(e) => SimpleReply::err(format!("{e} (the previous policy stays in force)")),
        }),
        Request::Add { app } => json(&edit(agent, &app, true)),
        Request::Remove { app } => json(&edit(agent, &app, false)),
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
}

fn edit(agent: &mut Agent, app: &str, add: bool) -> SimpleReply {
    if app.is_empty() || app.len() > 4096 || app.contains('\n') {
        return SimpleReply::err("an application name is required");
    }
    match edit_policy(&agent.opts.policy_path, app, add) {
        Ok(changed) => match agent.reload() {
            Ok(()) => SimpleReply {
                changed: Some(changed),
                app: Some(app.to_owned()),
                policy: Some(agent.opts.policy_path.display().to_string()),
                ..SimpleReply::ok()
            },
            Err(e) => SimpleReply::err(e),
        },
        Err(e) => SimpleReply::err(e),
    }
}

/// Adds `app` to (or removes it from) the policy's `track` list, keeping comments and layout.
/// The edited text is validated before it is written. Returns whether the file changed.
pub fn edit_policy(path: &Path, app: &str, add: bool) -> Result<bool, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let item = doc
        .entry("track")
        .or_insert(toml_edit::value(toml_edit::Array::new()));
    let arr = item
        .as_array_mut()
        .ok_or_else(|| format!("{}: `track` is not an array", path.display()))?;
    let present = arr.iter().any(|v| v.as_str() == Some(app));
    let changed = if add && !present {
        arr.push(app);
        true
    } else if !add && present {
        arr.retain(|v| v.as_str() != Some(app));
        true
    } else {
        false
    };
    if !changed {
        return Ok(false);
    }
    let new = doc.to_string();
    Policy::parse(&new, path).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    ksmplus_common::fsutil::write_atomic(path, new.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(true)
}

fn self_usage() -> (u64, u64, u64) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    // Fields 14 and 15 of /proc/self/stat (after the parenthesised comm) are utime, stime.
    let cpu_ticks: u64 = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as u64;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (rss, cpu_ticks * 1000 / hz, fds)
}

fn ksmd(root: &Path) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    m.insert("available".into(), ksm::sysfs_dir(root).is_dir() as i64);
    for name in [
        "run",
        "pages_to_scan",
        "sleep_millisecs",
        "use_zero_pages",
        "full_scans",
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "pages_scanned",
        "general_profit",
        "ksm_zero_pages",
    ] {
        if let Ok(v) = ksm::read_sysfs(root, name) {
            m.insert(name.into(), v);
        }
    }
    m
}

/// How much of a process's resident anonymous memory (Σ `Anonymous:` of its smaps) lies in
/// covered ranges, and the rest by reason.
pub fn coverage_of(c: &Client, vmas: &[SmapsVma]) -> Coverage {
    let mut cov = Coverage::default();
    let mut add = |k: &str, b: u64| {
        if b > 0 {
            *cov.uncovered.entry(k.to_owned()).or_insert(0) += b;
        }
    };
    let overlaps = |s: u64, e: u64, r: &[(u64, u64)]| {
        let i = r.partition_point(|&(_, re)| re <= s);
        r.get(i).is_some_and(|&(rs, _)| rs < e)
    };
    let mut covered = 0;
    let mut anon = 0;
    for v in vmas {
        let b = v.anonymous_kib * 1024;
        if b == 0 {
            continue;
        }
        anon += b;
        if overlaps(v.start, v.end, &c.ranges) {
            covered += b;
            continue;
        }
        let skip = c
            .skipped
            .iter()
            .find(|&&(s, e, _)| s < v.end && e > v.start)
            .map(|x| x.2);
        match skip {
            Some(Skip::Stack) => add("stack", b),
            Some(Skip::Shim) => add("shim", b),
            Some(Skip::Small) => add("small", b),
            Some(Skip::Cache) => add("cache", b),
            None if v.perms.ends_with('s') => add("shared", b),
            // Copy-on-write pages of read-only file mappings (relocated pointers: RELRO).
            None if v.name.starts_with('/') => add("file", b),
            None => add("other", b),
        }
    }
    cov.anon_bytes = anon;
    cov.covered_bytes = covered;
    cov
}

fn marking(c: &Client, inherited_merge_any: bool) -> (&'static str, String) {
    let why = |e: i32| {
        if e == 0 {
            "it runs under a seccomp filter, which may kill it for an unexpected system call, so it is never advised".to_string()
        } else {
            format!("its sandbox refuses KSM advice (errno {e})")
        }
    };
    match c.sandbox {
        Sandbox::Refuses(e) if inherited_merge_any && !c.merge_any => (
            "merge-any",
            format!(
                "{}; merged as a whole (merge-any inherited from the fork server)",
                why(e)
            ),
        ),
        Sandbox::Refuses(e) if c.merge_any => {
            ("merge-any", format!("{}; merged as a whole", why(e)))
        }
        Sandbox::Refuses(e) => (
            "refused",
            format!(
                "{}; children it forks next may get the kernel's merge-any fallback",
                why(e)
            ),
        ),
        _ if c.merge_any => (
            "merge-any",
            "fork server of sandboxed children: the kernel's merge-any mode, for them".into(),
        ),
        _ => match &c.posted {
            Some(p) if p.wakes > 0 && c.last.flags & flag::SIGNAL_LOST != 0 => (
                "marks-pending",
                "the program is idle and took over the wake-up signal".into(),
            ),
            Some(p) if p.wakes >= MAX_WAKES => (
                "marks-pending",
                "the program is idle where a signal would show (sleep, pause)".into(),
            ),
            _ => ("marks", String::new()),
        },
    }
}

fn status(agent: &mut Agent) -> StatusReply {
    agent.forget_gone();
    let root = agent.opts.root.clone();
    let now = agent.uptime_ms();
    let mut procs = Vec::new();
    let mut tot = Totals::default();
    for (id, c) in &agent.clients {
        let st = agent.engine.status(*id).unwrap_or_default();
        let ks = ksm::read_ksm_stat(&root, c.pid()).ok();
        if !c.proc.alive() {
            continue; // exited meanwhile: the figures may be another process's
        }
        let k = ks.unwrap_or_default();
        let coverage = agent
            .figures
            .get(id)
            .and_then(|f| f.coverage.clone())
            .map(|(mut cv, at)| {
                cv.age_ms = now.saturating_sub(at);
                cv
            })
            .unwrap_or_default();
        let (m, note) = marking(c, k.merge_any);
        let s = &c.last;
        tot.processes += 1;
        tot.regions += st.regions;
        tot.tracked_bytes += c.covered_bytes();
        tot.marked_bytes += st.marked_bytes;
        tot.merging_pages += k.merging_pages;
        tot.rmap_items += k.rmap_items;
        tot.fingerprints += st.fingerprints;
        tot.profit += k.process_profit;
        tot.anon_bytes += coverage.anon_bytes;
        tot.covered_bytes += coverage.covered_bytes;
        procs.push(ProcessStatus {
            pid: c.pid(),
            ppid: c.ppid,
            comm: c.comm.clone(),
            exe: c.exe.clone(),
            found: if c.hello {
                "hello".into()
            } else if c.parent_nonce != 0 {
                "fork".into()
            } else {
                "scan".into()
            },
            regions: st.regions,
            regions_sampling: st.regions_sampling,
            regions_dropped: st.regions_dropped,
            tracked_bytes: c.covered_bytes(),
            marked_bytes: st.marked_bytes,
            marked_ranges: st.marked_ranges,
            fingerprints: st.fingerprints,
            coefficient: st.min_coefficient,
            marking: m.into(),
            marking_note: note,
            coverage,
            ksm_stat_available: ks.is_some(),
            merging_pages: k.merging_pages,
            rmap_items: k.rmap_items,
            zero_pages: k.zero_pages,
            profit: k.process_profit,
            merge_any: k.merge_any,
            shim: ShimFigures {
                blocks: s.blocks,
                block_bytes: s.block_bytes,
                cache_bytes: s.cache_bytes,
                registry_full: s.registry_full,
                batches_hook: s.batches_hook,
                batches_signal: s.batches_signal,
                cmds: s.cmds,
                cmd_errors: s.cmd_errors,
                last_errno: s.last_errno,
                signal: if s.flags & flag::SIGNAL_LOST != 0 {
                    0
                } else {
                    s.signal
                },
                madvise_all: s.flags & flag::MADVISE_ALL != 0,
            },
            fingerprinted_pages: st.counters.fingerprinted_pages,
            candidates: st.counters.candidates,
            runs_marked: st.counters.runs_marked,
            runs_unmarked: st.counters.runs_unmarked,
            runs_loosened: st.counters.runs_loosened,
            pages_trimmed: st.counters.pages_trimmed,
            residency_queries: st.counters.residency_queries,
            floor_pages: st.counters.floor_pages,
            grown_pages: st.counters.grown_pages,
            floor_candidates: st.counters.floor_candidates,
            partner_pages: st.counters.partner_pages,
            partner_lookups: st.counters.partner_lookups,
            regions_added: st.counters.regions_added,
            marks_refused: st.counters.marks_refused,
            madvise_errors: st.counters.madvise_errors,
        });
    }
    let (rss, cpu_ms, fds) = self_usage();
    let (tracked, dormant) = agent.process_counts();
    let (control, unidentified) = agent.peers.counts();
    let s = agent.stats;
    let p = agent.peers.stats;
    let e = &agent.engine;
    StatusReply {
        version: REPLY_VERSION,
        ok: true,
        agent: AgentInfo {
            pid: std::process::id(),
            uid: agent.uid,
            uptime_ms: now,
            socket: agent.opts.socket.display().to_string(),
            policy: agent.opts.policy_path.display().to_string(),
            rss_kib: rss,
            cpu_ms,
            fds,
            wakeups: s.wakeups,
            peers: Peers {
                tracked,
                untracked: dormant,
                control,
                unidentified,
            },
            connections: p,
            ignored: s.ignored,
            excluded: s.excluded,
            adopted: s.adopted,
            reloads: s.reloads,
            family_walks: s.walks,
            family_walks_skipped: s.walks_skipped,
            wakes: s.wakes,
        },
        engine: EngineInfo {
            fingerprints: e.fingerprints(),
            distinct_hashes: e.distinct_hashes(),
            bytes_per_fingerprint: BYTES_PER_FINGERPRINT,
            index_bytes_estimate: e.fingerprints() * BYTES_PER_FINGERPRINT,
            max_fingerprints: e.config().limits.max_fingerprints,
            evictions: e.evictions,
            idle: e.idle(),
        },
        policy: PolicyInfo {
            track_all: agent.policy.track_all,
            track: agent.policy.track.clone(),
            exclude: agent.policy.exclude.clone(),
        },
        ksmd: ksmd(&root),
        page_size: 4096,
        processes: {
            // Fork children of tracked families whose shim has not run since the fork (idle):
            // known, not yet readable through a channel.
            for f in agent.families.values() {
                for &pid in f.pending.keys().chain(f.idle.iter()) {
                    if procs.iter().any(|p| p.pid == pid) {
                        continue;
                    }
                    let (comm, exe) = crate::procfs::comm_exe(&root, pid);
                    if comm.is_empty() {
                        continue; // gone
                    }
                    procs.push(ProcessStatus {
                        pid,
                        comm,
                        exe,
                        found: "fork".into(),
                        marking: "pending".into(),
                        marking_note: "forked from a tracked process; its shim has not run since \
                                       the fork (the program is idle), so it is tracked from its \
                                       first allocation or mapping on"
                            .into(),
                        ..Default::default()
                    });
                }
            }
            procs
        },
        totals: tot,
        unreadable: agent
            .unreadable
            .iter()
            .map(|(&pid, u)| UnreadableProcess {
                pid,
                comm: u.comm.clone(),
                exe: u.exe.clone(),
                reason: u.reason.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_keeps_comments_and_validates() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("policy.toml");
        std::fs::write(
            &path,
            "# my policy\ntrack = [\"okular\"] # readers\n\n[sampling]\n# slow\nstep = 20\n",
        )
        .unwrap();
        assert!(edit_policy(&path, "firefox", true).unwrap());
        assert!(!edit_policy(&path, "firefox", true).unwrap());
        let t = std::fs::read_to_string(&path).unwrap();
        assert!(t.contains("# my policy") && t.contains("# slow") && t.contains("# readers"));
        let p = Policy::parse(&t, &path).unwrap();
        assert_eq!(p.track, vec!["okular", "firefox"]);
        assert!(edit_policy(&path, "okular", false).unwrap());
        let p = Policy::load(&path).unwrap();
        assert_eq!(p.track, vec!["firefox"]);
        // A missing file is created.
        let p2 = tmp.path().join("sub/policy.toml");
        assert!(edit_policy(&p2, "okular", true).unwrap());
        assert_eq!(Policy::load(&p2).unwrap().track, vec!["okular"]);
        // A broken file is not overwritten.
        std::fs::write(&path, "track = [\nbroken").unwrap();
        assert!(edit_policy(&path, "x", true).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "track = [\nbroken");
    }
}
