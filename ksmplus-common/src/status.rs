//! The control channel's contract: typed requests and replies, shared by the agent (which
//! builds them), `ksmplusctl` (which prints them), the benchmark and the tests (which read
//! them). JSON on the wire; every reply carries [`REPLY_VERSION`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the reply layout; bumped when a field changes meaning or goes away.
pub const REPLY_VERSION: u32 = 2;

/// A control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    Status,
    Reload,
    Add { app: String },
    Remove { app: String },
}

/// The answer to anything but `status`: `ok`, and an error or what changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimpleReply {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ping`: the agent's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `add`/`remove`: whether the policy file changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl SimpleReply {
    pub fn ok() -> SimpleReply {
        SimpleReply {
            version: REPLY_VERSION,
            ok: true,
            ..Default::default()
        }
    }
    pub fn err(msg: impl Into<String>) -> SimpleReply {
        SimpleReply {
            version: REPLY_VERSION,
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

/// `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub version: u32,
    pub ok: bool,
    pub agent: AgentInfo,
    pub engine: EngineInfo,
    pub policy: PolicyInfo,
    pub ksmd: BTreeMap<String, i64>,
    pub page_size: u64,
    pub processes: Vec<ProcessStatus>,
    pub totals: Totals,
    /// Processes the policy names that said Hello and that the agent cannot read.
    #[serde(default)]
    pub unreadable: Vec<UnreadableProcess>,
}

/// A process the agent was asked to track and cannot read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableProcess {
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    pub reason: String,
}

/// What happened to the socket's peers since the agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    pub accepted: u64,
    /// Another user's process (SO_PEERCRED).
    pub refused_uid: u64,
    /// The agent was at its peer limit.
    pub refused_full: u64,
    pub dropped_malformed: u64,
    pub dropped_overflow: u64,
    /// A peer that did not finish its frame in time.
    pub dropped_slow: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub uid: u32,
    pub uptime_ms: u64,
    pub socket: String,
    pub policy: String,
    pub rss_kib: u64,
    pub cpu_ms: u64,
    pub fds: u64,
    /// Loop wake-ups since start.
    pub wakeups: u64,
    pub peers: Peers,
    /// Connections: flattened, so the JSON keeps `agent.accepted`, `agent.refused_uid`, ...
    #[serde(flatten)]
    pub connections: PeerStats,
    /// Processes that said Hello and were not tracked (not listed / excluded).
    pub ignored: u64,
    pub excluded: u64,
    /// Processes found without a Hello (started before the agent, forked, or sandboxed).
    pub adopted: u64,
    pub reloads: u64,
    /// Wake-up signals sent to idle programs.
    pub wakes: u64,
    /// Walks of families' process trees, and due walks skipped because no process was born
    /// into the tree (absent from agents before session 9).
    #[serde(default)]
    pub family_walks: u64,
    #[serde(default)]
    pub family_walks_skipped: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peers {
    pub tracked: u64,
    /// Known processes the policy does not track (their shims are dormant).
    pub untracked: u64,
    pub control: u64,
    pub unidentified: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    pub fingerprints: u64,
    pub distinct_hashes: u64,
    pub bytes_per_fingerprint: u64,
    pub index_bytes_estimate: u64,
    pub max_fingerprints: u64,
    pub evictions: u64,
    pub idle: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    pub track_all: bool,
    pub track: Vec<String>,
    pub exclude: Vec<String>,
}

/// One tracked process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub exe: String,
    /// How the agent found it: "hello", "fork" (a fork child of a tracked process) or "scan".
    pub found: String,
    pub regions: u64,
    pub regions_sampling: u64,
    pub regions_dropped: u64,
    /// Address space of the covered regions.
    pub tracked_bytes: u64,
    pub marked_bytes: u64,
    pub marked_ranges: u64,
    pub fingerprints: u64,
    pub coefficient: u32,
    /// What ksmplus can do in this process: "marks", "marks-pending" (program idle, batch
    /// waiting), "refused" (its sandbox refuses KSM advice), "merge-any" (the kernel's
    /// merge-everything mode, set by the fallback or inherited).
    pub marking: String,
    /// Why, in words, when `marking` is not "marks".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub marking_note: String,
    pub coverage: Coverage,
    pub ksm_stat_available: bool,
    pub merging_pages: u64,
    pub rmap_items: u64,
    pub zero_pages: u64,
    pub profit: i64,
    pub merge_any: bool,
    pub shim: ShimFigures,
    pub fingerprinted_pages: u64,
    pub candidates: u64,
    pub runs_marked: u64,
    pub runs_unmarked: u64,
    pub runs_loosened: u64,
    /// Pages cut out of merging runs because they did not merge (agents before 2026-11-29: 0).
    #[serde(default)]
    pub pages_trimmed: u64,
    /// Residency reads: one or more per sampling round, also at the floor, where a region
    /// that is all marked reads no page (agents before session 9: 0).
    #[serde(default)]
    pub residency_queries: u64,
    /// Of `fingerprinted_pages`: read by rounds at the floor coefficient, and by growing
    /// candidates into runs; the rest by regions' learning schedules (agents before session
    /// 10: 0).
    #[serde(default)]
    pub floor_pages: u64,
    #[serde(default)]
    pub grown_pages: u64,
    /// Of `candidates`: found by rounds at the floor.
    #[serde(default)]
    pub floor_candidates: u64,
    /// Of `floor_pages`: remembered pages read again because their last hash has a duplicate
    /// now (a twin appeared elsewhere since).
    #[serde(default)]
    pub partner_pages: u64,
    /// Fingerprint index lookups of the floor rounds' search for partner pages (only pages
    /// whose hash was stored for another page since they were read are looked up).
    #[serde(default)]
    pub partner_lookups: u64,
    /// Regions that appeared in the process's maps (not moves or growth in place).
    #[serde(default)]
    pub regions_added: u64,
    pub marks_refused: u64,
    pub madvise_errors: u64,
}

/// How much of a process's resident anonymous memory ksmplus covers, and why the rest is not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// Σ `Anonymous:` of the process's smaps (what KSM could merge at most).
    pub anon_bytes: u64,
    /// Of it, in covered regions.
    pub covered_bytes: u64,
    /// The rest by reason: "stack", "shim", "small", "file" (copy-on-write pages of file
    /// mappings), "shared", "other".
    pub uncovered: BTreeMap<String, u64>,
    /// Age of these figures (they are refreshed in the background), milliseconds.
    pub age_ms: u64,
}

/// What the shim reports in its channel page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimFigures {
    pub blocks: u64,
    pub block_bytes: u64,
    pub cache_bytes: u64,
    pub registry_full: u64,
    pub batches_hook: u64,
    pub batches_signal: u64,
    pub cmds: u64,
    pub cmd_errors: u64,
    pub last_errno: i32,
    /// The wake-up signal (0: none).
    pub signal: u32,
    pub madvise_all: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub processes: u64,
    pub regions: u64,
    pub tracked_bytes: u64,
    pub marked_bytes: u64,
    pub merging_pages: u64,
    pub rmap_items: u64,
    pub fingerprints: u64,
    pub profit: i64,
    pub anon_bytes: u64,
    pub covered_bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// ksmplusctl's own replies: the commands that talk to no agent print these with `--json`, under
// the same contract (a `version`; `ok` is true exactly when the exit status is 0). A failure
// before anything was done prints a [`SimpleReply::err`].

/// `ksmplusctl wrap` / `unwrap`: what happened to each desktop-file id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesktopReply {
    pub version: u32,
    pub ok: bool,
    pub entries: Vec<DesktopOutcome>,
    /// `wrap`: the library the wrapped entries preload, as written into them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lib: Option<String>,
    /// `wrap`: the programs the wrapped entries start (track them with `ksmplusctl add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<String>,
}

/// One desktop-file id in a [`DesktopReply`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesktopOutcome {
    pub id: String,
    /// "wrapped", "already wrapped", "unwrapped (previous override restored)", "unwrapped
    /// (override removed)", "not wrapped" or "refused".
    pub result: String,
    /// The override's path, or why it was refused.
    pub detail: String,
}

/// `ksmplusctl wrapped`: the overrides `wrap` wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedReply {
    pub version: u32,
    pub ok: bool,
    pub entries: Vec<WrappedEntry>,
}

/// One override in a [`WrappedReply`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedEntry {
    pub id: String,
    pub path: String,
    /// It replaced a user override of the user's own, which `unwrap` restores.
    pub backup: bool,
    /// Its `Exec` value.
    #[serde(default)]
    pub exec: String,
}

/// `ksmplusctl install-service`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceReply {
    pub version: u32,
    pub ok: bool,
    /// "written", "replaced" or "unchanged".
    pub result: String,
    pub path: String,
    pub agentd: String,
    /// What to run next.
    pub next: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_refuse_unknown_fields() {
        let r: Request = serde_json::from_str(r#"{"cmd":"add","app":"okular"}"#).unwrap();
        assert_eq!(
            r,
            Request::Add {
                app: "okular".into()
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"add","app":"a","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"nope"}"#).is_err());
    }

    #[test]
    fn status_round_trips() {
        let mut s = StatusReply {
            version: REPLY_VERSION,
            ok: true,
            ..Default::default()
        };
        s.processes.push(ProcessStatus {
            pid: 7,
            marking: "refused".into(),
            ..Default::default()
        });
        s.processes[0]
            .coverage
            .uncovered
            .insert("stack".into(), 8192);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<StatusReply>(&j).unwrap(), s);
    }
}
