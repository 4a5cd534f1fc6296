//! The control channel: JSON requests from `ksmplusctl`, answered by the agent.
//!
//! Request: `{"cmd": "status" | "reload" | "add" | "remove" | "ping", "app": "name"}`.
//! Reply: `{"ok": true, ...}` or `{"ok": false, "error": "message"}`.

use crate::engine::BYTES_PER_FINGERPRINT;
use crate::server::Agent;
use ksmplus_common::ksm;
use ksmplus_common::policy::Policy;
use serde_json::{json, Value};
use std::path::Path;

pub fn handle(agent: &mut Agent, request: &str) -> String {
    let v: Value = match serde_json::from_str(request) {
        Ok(v) => v,
        Err(e) => return err(&format!("bad request: {e}")),
    };
    let app = v.get("app").and_then(Value::as_str).unwrap_or("");
    let reply = match v.get("cmd").and_then(Value::as_str) {
        Some("ping") => json!({"ok": true, "pid": std::process::id()}),
        Some("status") => status(agent),
        Some("reload") => match agent.reload() {
            Ok(()) => json!({"ok": true, "policy": agent.opts.policy_path}),
            Err(e) => {
                json!({"ok": false, "error": format!("{e} (the previous policy stays in force)")})
            }
        },
        Some(cmd @ ("add" | "remove")) => {
            if app.is_empty() || app.len() > 4096 || app.contains('\n') {
                json!({"ok": false, "error": "an application name is required"})
            } else {
                match edit_policy(&agent.opts.policy_path, app, cmd == "add") {
                    Ok(changed) => match agent.reload() {
                        Ok(()) => json!({"ok": true, "changed": changed, "app": app,
                                         "policy": agent.opts.policy_path}),
                        Err(e) => json!({"ok": false, "error": e}),
                    },
                    Err(e) => json!({"ok": false, "error": e}),
                }
            }
        }
        _ => json!({"ok": false, "error": "unknown command"}),
    };
    reply.to_string()
}

fn err(msg: &str) -> String {
    json!({"ok": false, "error": msg}).to_string()
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
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, new).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
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
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (rss, cpu_ticks * 1000 / hz, fds)
}

fn ksmd(root: &Path) -> Value {
    let mut m = serde_json::Map::new();
    let available = ksm::sysfs_dir(root).is_dir();
    m.insert("available".into(), json!(available));
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
            m.insert(name.into(), json!(v));
        }
    }
    Value::Object(m)
}

/// The process's resident anonymous memory (Σ `Anonymous:` of its smaps) and how much of it lies in
/// VMAs that overlap a tracked region: what ksmplus covers of what the program really holds
/// (tracked bytes are address space, often mostly reserved and absent). `(0, 0)` if unreadable.
fn anon_coverage(root: &std::path::Path, pid: u32, regions: &[(u64, u64)]) -> (u64, u64) {
    let Ok(vmas) = ksm::read_smaps(root, pid) else {
        return (0, 0);
    };
    let (mut anon, mut covered) = (0, 0);
    for v in &vmas {
        let bytes = v.anonymous_kib * 1024;
        anon += bytes;
        let first = regions.partition_point(|&(s, l)| s + l <= v.start);
        if regions.get(first).is_some_and(|&(s, _)| s < v.end) {
            covered += bytes;
        }
    }
    (anon, covered)
}

fn status(agent: &mut Agent) -> Value {
    let root = agent.opts.root.clone();
    let ps = 4096u64;
    let mut procs = Vec::new();
    let mut tot = [0u64; 6];
    let mut tot_profit = 0i64;
    for (id, hello, pid) in agent.tracked() {
        let Some(st) = agent.engine.status(id) else {
            continue;
        };
        let ks = ksm::read_ksm_stat(&root, pid).ok();
        let k = ks.unwrap_or_default();
        let (anon, covered) = anon_coverage(&root, pid, &agent.engine.regions(id));
        if !agent.client_alive(id) {
            continue; // exited meanwhile: the figures may be another process's
        }
        tot[0] += st.regions;
        tot[1] += st.tracked_bytes;
        tot[2] += st.marked_bytes;
        tot[3] += k.merging_pages;
        tot[4] += k.rmap_items;
        tot[5] += st.fingerprints;
        tot_profit += k.process_profit;
        procs.push(json!({
            "client": id,
            "pid": pid,
            "comm": hello.comm,
            "exe": hello.exe,
            "regions": st.regions,
            "regions_sampling": st.regions_sampling,
            "regions_dropped": st.regions_dropped,
            "tracked_bytes": st.tracked_bytes,
            "anon_bytes": anon,
            "anon_covered_bytes": covered,
            "marked_bytes": st.marked_bytes,
            "marked_ranges": st.marked_ranges,
            "fingerprints": st.fingerprints,
            "coefficient": st.min_coefficient,
            "ksm_stat_available": ks.is_some(),
            "merging_pages": k.merging_pages,
            "rmap_items": k.rmap_items,
            "zero_pages": k.zero_pages,
            "profit": k.process_profit,
            "fingerprinted_pages": st.counters.fingerprinted_pages,
            "candidates": st.counters.candidates,
            "runs_marked": st.counters.runs_marked,
            "runs_unmarked": st.counters.runs_unmarked,
            "runs_loosened": st.counters.runs_loosened,
            "marks_refused": st.counters.marks_refused,
            "madvise_errors": st.counters.madvise_errors,
        }));
    }
    let (rss, cpu_ms, fds) = self_usage();
    let (tracked, untracked, control, new) = agent.peer_counts();
    let s = agent.stats;
    let e = &agent.engine;
    json!({
        "ok": true,
        "agent": {
            "pid": std::process::id(),
            "uid": agent.uid,
            "uptime_ms": agent.uptime_ms(),
            "socket": agent.opts.socket,
            "policy": agent.opts.policy_path,
            "rss_kib": rss,
            "cpu_ms": cpu_ms,
            "fds": fds,
            "peers": {"tracked": tracked, "untracked": untracked, "control": control, "unidentified": new},
            "accepted": s.accepted,
            "refused_uid": s.refused_uid,
            "refused_full": s.refused_full,
            "dropped_malformed": s.dropped_malformed,
            "dropped_overflow": s.dropped_overflow,
            "ignored": s.ignored,
            "excluded": s.excluded,
            "reloads": s.reloads,
        },
        "engine": {
            "fingerprints": e.fingerprints(),
            "distinct_hashes": e.distinct_hashes(),
            "bytes_per_fingerprint": BYTES_PER_FINGERPRINT,
            "index_bytes_estimate": e.fingerprints() * BYTES_PER_FINGERPRINT,
            "max_fingerprints": e.config().max_fingerprints,
            "evictions": e.evictions,
            "idle": e.idle(),
        },
        "policy": {
            "track_all": agent.policy.track_all,
            "track": agent.policy.track,
            "exclude": agent.policy.exclude,
        },
        "ksmd": ksmd(&root),
        "page_size": ps,
        "processes": procs,
        "totals": {
            "processes": procs.len(),
            "regions": tot[0],
            "tracked_bytes": tot[1],
            "marked_bytes": tot[2],
            "merging_pages": tot[3],
            "rmap_items": tot[4],
            "fingerprints": tot[5],
            "profit": tot_profit,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_keeps_comments_and_validates() {
        let dir = std::env::temp_dir().join(format!("ksmplus-edit-{}", std::process::id()));
        let path = dir.join("policy.toml");
        std::fs::create_dir_all(&dir).unwrap();
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
        let p2 = dir.join("sub/policy.toml");
        assert!(edit_policy(&p2, "okular", true).unwrap());
        assert_eq!(Policy::load(&p2).unwrap().track, vec!["okular"]);
        // A broken file is not overwritten.
        std::fs::write(&path, "track = [\nbroken").unwrap();
        assert!(edit_policy(&path, "x", true).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "track = [\nbroken");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn anon_coverage_counts_vmas_overlapping_tracked_regions() {
        let dir = std::env::temp_dir().join(format!("ksmplus-cov-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("proc/42")).unwrap();
        std::fs::write(
            dir.join("proc/42/smaps"),
            "\
10000-20000 rw-p 00000000 00:00 0 \n\
Anonymous:            64 kB\n\
30000-50000 rw-p 00000000 00:00 0                          [heap]\n\
Anonymous:           128 kB\n\
60000-61000 rw-p 00000000 00:00 0 \n\
Anonymous:             4 kB\n",
        )
        .unwrap();
        // One region inside the second VMA only.
        assert_eq!(
            anon_coverage(&dir, 42, &[(0x38000, 0x1000)]),
            (196 * 1024, 128 * 1024)
        );
        // Regions touching the first and the last VMA.
        assert_eq!(
            anon_coverage(&dir, 42, &[(0x1f000, 0x1000), (0x60000, 0x2000)]),
            (196 * 1024, 68 * 1024)
        );
        assert_eq!(anon_coverage(&dir, 43, &[]), (0, 0), "process gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
