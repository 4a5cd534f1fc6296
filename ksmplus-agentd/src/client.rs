//! One tracked process as the agent's I/O layer sees it: its `/proc` handles, what of its
//! maps is covered (turned into engine [`Event`]s), and its mailbox (engine `Madvise`
//! commands and the agent's own commands, posted in batches to the channel page).
//!
//! Invariants:
//! - Nothing is written to the process before its channel's magic and nonce were read back
//!   through the same `mem` descriptor ([`Client::adopt`]), and only agent fields of the page
//!   are written, commands before `cmd_seq`.
//! - At most one batch is posted at a time; the next one waits for `done_seq`.
//! - The covered ranges handed to the engine are exactly `ranges`: every maps refresh hands
//!   over the difference, after first replaying the mremaps the shim recorded, so a moved
//!   region keeps its state and a region split by our own marking is not an event at all.

use crate::engine::{Advice, ClientId, Command, Event};
use crate::procfs::{self, ProcHandle};
use ksmplus_common::channel::{self, offsets, op, Snapshot, MAX_CMDS, MAX_MOVES};
use ksmplus_common::maps::{self, Skip};
use std::collections::VecDeque;
use std::path::Path;

/// What a queued command is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// An engine `Madvise` with its id.
    Engine(u32),
    /// Empty the shim's cache of freed blocks.
    Trim,
    /// `PR_SET_MEMORY_MERGE` on or off.
    MergeAny(bool),
}

/// A batch written to the channel and not yet executed.
#[derive(Clone, Debug)]
pub struct Posted {
    pub seq: u64,
    pub at_ms: u64,
    pub items: Vec<(Item, channel::Command)>,
    /// Wake-up signals sent for it, and when the last was.
    pub wakes: u32,
    pub last_wake_ms: u64,
    /// When to look at the channel again, and the current interval (doubling: a batch of an
    /// idle program that cannot be woken must not make the agent spin).
    pub check_ms: u64,
    pub every_ms: u64,
}

/// First and longest interval between looks at a posted batch.
pub const BATCH_POLL_MIN_MS: u64 = 5;
pub const BATCH_POLL_MAX_MS: u64 = 2000;

/// Whether the process's sandbox lets `madvise(MADV_MERGEABLE)` through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sandbox {
    #[default]
    Unknown,
    /// Refused with this errno (seccomp answers EPERM, EACCES or ENOSYS).
    Refuses(i32),
}

/// Why a process could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
    #[error("channel page at {addr:#x}: {source}")]
    Channel {
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("no ksmplus channel at {addr:#x} (or another program's after an exec)")]
    NoChannel { addr: u64 },
    #[error("maps: {0}")]
    Maps(#[source] std::io::Error),
}

pub struct Client {
    pub id: ClientId,
    pub proc: ProcHandle,
    pub channel: u64,
    pub nonce: u64,
    pub parent_nonce: u64,
    /// The family it belongs to (the doorbell's shmem inode; 0: none).
    pub family: u64,
    pub doorbell: u64,
    pub comm: String,
    pub exe: String,
    /// Said Hello (as opposed to found by the agent).
    pub hello: bool,
    pub page_size: u64,
    pub ppid: u32,
    /// `Seccomp:` and `Seccomp_filters:` of its status, as last read.
    pub seccomp: u32,
    pub seccomp_filters: u32,
    pub sandbox: Sandbox,
    /// `PR_SET_MEMORY_MERGE` set by the agent's fallback.
    pub merge_any: bool,
    /// Covered ranges handed to the engine, sorted, disjoint.
    pub ranges: Vec<(u64, u64)>,
    pub skipped: Vec<(u64, u64, Skip)>,
    pub map_gen_seen: u64,
    pub moves_seen: u64,
    pub maps_read_ms: u64,
    /// How old the maps may get before an unprompted refresh ([`next_maps_age`]).
    pub maps_age_ms: u64,
    /// The least time between maps reads prompted by `map_gen` ([`next_maps_gap`]).
    pub maps_gap_ms: u64,
    /// When to look at the channel's `map_gen` next, and the current interval.
    pub check_at_ms: u64,
    pub check_every_ms: u64,
    pub queue: VecDeque<(Item, channel::Command)>,
    pub posted: Option<Posted>,
    pub seq: u64,
    /// The last channel page read.
    pub last: Snapshot,
    pub wakes_sent: u64,
    pub batches_done: u64,
    /// Its key for the learned store (executable and flag names).
    pub key: String,
    /// Stack pointers of its threads (tid → sp), read once per thread while it was blocked.
    pub stack_sps: std::collections::BTreeMap<u32, u64>,
    /// The shim's cached bytes as last seen, and since when unchanged: an idle program's cache
    /// of freed blocks is trimmed by command (no hook of its own will).
    pub cache_seen: (u64, u64),
    /// When the agent started tracking it (agent clock).
    pub tracked_ms: u64,
}

/// A shim cache unchanged this long is given back ([`Item::Trim`]): an idle process's freed
/// blocks, warm in the shim's cache, should not outlast the burst that freed them by much (at
/// 2 s, epiphany's web processes held up to 64 MiB each when the desktop bench measured them).
pub const CACHE_IDLE_MS: u64 = 500;

/// A client tracked this long is settled: its timers (maps checks, batches, round starts at the floor) wait
/// for the agent's shared wake-up grid instead of waking it on their own.
pub const SETTLE_MS: u64 = 15_000;

/// The fastest and slowest pace of `map_gen` checks.
pub const CHECK_MIN_MS: u64 = 50;
pub const CHECK_MAX_MS: u64 = 2000;
/// A maps refresh even without a `map_gen` change (brk growth, raw system calls) comes this
/// long after the last one, twice as long after each such refresh that found nothing new, up
/// to [`MAPS_AGE_MAX_MS`]: reading a big program's maps costs (a path per file mapping), and a
/// settled program rarely maps anything the shim does not see.
pub const MAPS_AGE_MIN_MS: u64 = 10_000;
pub const MAPS_AGE_MAX_MS: u64 = 80_000;

/// The age the next unprompted maps refresh waits for, after one that `found` something new
/// (or was prompted by a `map_gen` change) or not.
pub fn next_maps_age(age: u64, found: bool) -> u64 {
    if found {
        MAPS_AGE_MIN_MS
    } else {
        (age * 2).clamp(MAPS_AGE_MIN_MS, MAPS_AGE_MAX_MS)
    }
}

/// A settled program whose `map_gen` keeps moving (a browser's heaps map and unmap all the
/// time) has its maps read at most this often after a read that found nothing new, twice as
/// long after each such read, up to [`MAPS_GAP_MAX_MS`]; after a read that finds something at
/// most this often too (a browser's reads nearly always find a heap chunk come or gone, and a
/// chunk that lives less than half a second is not worth learning); a young program reads at
/// every change. On a settled D3 the maps reads were 8 % of the agent's CPU (sessions 9, 10).
pub const MAPS_GAP_MIN_MS: u64 = 500;
pub const MAPS_GAP_MAX_MS: u64 = 8000;

/// Whether a client's maps are read now: `map_gen` moved (`changed`) and the gap since the last
/// read is over — or `moves` mremaps wait in the channel's ring, half of it (past its end they
/// are lost and their regions learned again) — or the maps are older than `age`.
pub fn maps_due(changed: bool, moves: u64, now: u64, read_ms: u64, gap: u64, age: u64) -> bool {
    let gap_over = now >= read_ms + gap || moves >= MAX_MOVES as u64 / 2;
    changed && gap_over || now >= read_ms + age
}

/// The least time from a maps read prompted by a `map_gen` change to the next: 0 for a program
/// not settled yet, [`MAPS_GAP_MIN_MS`] after a read that `found` something.
pub fn next_maps_gap(gap: u64, found: bool, settled: bool) -> u64 {
    if !settled {
        0
    } else if found {
        MAPS_GAP_MIN_MS
    } else {
        (gap * 2).clamp(MAPS_GAP_MIN_MS, MAPS_GAP_MAX_MS)
    }
}

impl Client {
    /// Under a seccomp filter that may kill it for KSM advice: one it installed itself, or
    /// any but those it was exec'd with ([`ksmplus_common::channel::advice_allowed`]).
    pub fn filtered(&self) -> bool {
        !ksmplus_common::channel::advice_allowed(
            self.seccomp,
            self.seccomp_filters,
            self.last.flags,
        )
    }

    /// Opens `pid`, reads its channel at `addr` and checks it is an initialised channel of this
    /// layout (and, when given, has nonce `nonce`).
    pub fn adopt(
        root: &Path,
        id: ClientId,
        pid: u32,
        addr: u64,
        nonce: Option<u64>,
    ) -> Result<(Client, String), AdoptError> {
        let proc = ProcHandle::open(root, pid)?;
        let snap = proc
            .snapshot(addr)
            .map_err(|source| AdoptError::Channel { addr, source })?;
        if !snap.valid() || nonce.is_some_and(|n| n != snap.nonce) {
            return Err(AdoptError::NoChannel { addr });
        }
        let maps = procfs::read_maps(root, pid).map_err(AdoptError::Maps)?;
        let family = if snap.doorbell != 0 {
            procfs::shared_inode_at(&maps, snap.doorbell).unwrap_or(0)
        } else {
            0
        };
        let (comm, exe) = procfs::comm_exe(root, pid);
        let st = procfs::read_status(root, pid).unwrap_or_default();
        let page_size = if snap.page_size >= 4096 && snap.page_size.is_power_of_two() {
            snap.page_size as u64
        } else {
            4096
        };
        Ok((
            Client {
                id,
                proc,
                channel: addr,
                nonce: snap.nonce,
                parent_nonce: snap.parent_nonce,
                family,
                doorbell: snap.doorbell,
                comm,
                exe,
                hello: false,
                page_size,
                ppid: st.ppid,
                seccomp: st.seccomp,
                seccomp_filters: st.seccomp_filters,
                sandbox: Sandbox::Unknown,
                merge_any: false,
                ranges: Vec::new(),
                skipped: Vec::new(),
                map_gen_seen: snap.map_gen,
                moves_seen: snap.moves_head,
                maps_read_ms: 0,
                maps_age_ms: MAPS_AGE_MIN_MS,
                maps_gap_ms: 0,
                check_at_ms: 0,
                check_every_ms: CHECK_MIN_MS,
                queue: VecDeque::new(),
                posted: None,
                seq: snap.cmd_seq,
                last: snap,
                wakes_sent: 0,
                batches_done: 0,
                cache_seen: (0, 0),
                tracked_ms: 0,
                stack_sps: Default::default(),
                key: String::new(),
            },
            maps,
        ))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Reads the channel page again; `None` if the process is gone or the page is not ours
    /// any more.
    pub fn refresh(&mut self) -> Option<&Snapshot> {
        let s = self.proc.snapshot(self.channel).ok()?;
        if !s.valid() || s.nonce != self.nonce {
            return None;
        }
        self.last = s;
        Some(&self.last)
    }

    /// Writes the verdict (and who gave it).
    pub fn set_verdict(&self, v: u32) -> std::io::Result<()> {
        self.proc.write(
            self.channel + offsets::AGENT_PID as u64,
            &(std::process::id() as u64).to_ne_bytes(),
        )?;
        self.proc
            .write(self.channel + offsets::VERDICT as u64, &v.to_ne_bytes())
    }

    /// Queues an engine command (only `Madvise` goes to the process).
    pub fn queue_engine(&mut self, cmd: &Command) {
        if let Command::Madvise {
            id,
            start,
            len,
            advice,
        } = *cmd
        {
            let op = match advice {
                Advice::Mergeable => op::MERGEABLE,
                Advice::Unmergeable => op::UNMERGEABLE,
            };
            self.queue
                .push_back((Item::Engine(id), channel::Command { op, start, len }));
        }
    }

    pub fn queue_op(&mut self, item: Item) {
        let op = match item {
            Item::Trim => op::TRIM_CACHE,
            Item::MergeAny(true) => op::MERGE_ANY_ON,
            Item::MergeAny(false) => op::MERGE_ANY_OFF,
            Item::Engine(_) => return,
        };
        self.queue.push_back((
            item,
            channel::Command {
                op,
                start: 0,
                len: 0,
            },
        ));
    }

    /// Posts the next batch if none is in flight. True if one was posted. On failure the
    /// commands stay queued.
    pub fn post(&mut self, now: u64) -> std::io::Result<bool> {
        if self.posted.is_some() || self.queue.is_empty() {
            return Ok(false);
        }
        let n = self.queue.len().min(MAX_CMDS);
        let cmds: Vec<channel::Command> = self.queue.iter().take(n).map(|x| x.1).collect();
        let seq = self.last.done_seq.max(self.seq) + 1;
        self.proc.write(
            self.channel + offsets::CMDS as u64,
            &channel::encode_cmds(&cmds),
        )?;
        self.proc.write(
            self.channel + offsets::N_CMDS as u64,
            &(n as u32).to_ne_bytes(),
        )?;
        self.proc
            .write(self.channel + offsets::CMD_SEQ as u64, &seq.to_ne_bytes())?;
        self.seq = seq;
        let items: Vec<_> = self.queue.drain(..n).collect();
        self.posted = Some(Posted {
            seq,
            at_ms: now,
            items,
            wakes: 0,
            last_wake_ms: 0,
            check_ms: now + BATCH_POLL_MIN_MS,
            every_ms: BATCH_POLL_MIN_MS,
        });
        Ok(true)
    }

    /// The posted batch's results, if the shim finished it (read from `last`).
    pub fn take_done(&mut self) -> Option<Vec<(Item, i32)>> {
        let p = self.posted.as_ref()?;
        if self.last.done_seq != p.seq {
            return None;
        }
        let p = self.posted.take().unwrap();
        self.batches_done += 1;
        Some(
            p.items
                .iter()
                .enumerate()
                .map(|(i, (item, _))| (*item, self.last.results.get(i).copied().unwrap_or(0)))
                .collect(),
        )
    }

    /// Brings the known threads' stack pointers up to date (new threads read once they block,
    /// gone ones forgotten): the mappings holding them are stacks, not covered.
    pub fn refresh_stacks(&mut self, root: &Path) {
        let pid = self.pid();
        let tids = procfs::threads(root, pid);
        self.stack_sps.retain(|t, _| tids.contains(t));
        for tid in tids {
            if let std::collections::btree_map::Entry::Vacant(e) = self.stack_sps.entry(tid) {
                if let Some(sp) = procfs::thread_sp(root, pid, tid) {
                    e.insert(sp);
                }
            }
        }
    }

    /// New covered ranges from the text of the maps: the engine events that turn `ranges` into
    /// them (mremaps first). `min_len` is the engine's region threshold.
    pub fn maps_events(&mut self, maps_text: &str, min_len: u64) -> Vec<Event> {
        let mut events = Vec::new();
        // 1. mremaps the shim recorded since the last refresh.
        let head = self.last.moves_head;
        if head > self.moves_seen && head - self.moves_seen <= MAX_MOVES as u64 {
            for n in self.moves_seen + 1..=head {
                let (seq, old, old_len, new, new_len) =
                    self.last.moves[((n - 1) % MAX_MOVES as u64) as usize];
                if seq != n || old_len == 0 || new_len == 0 {
                    continue;
                }
                let known = self
                    .ranges
                    .iter()
                    .any(|&(s, e)| s <= old && old + old_len <= e);
                if known && (old != new || old_len != new_len) {
                    events.push(Event::Resized {
                        old_start: old,
                        old_len,
                        new_start: new,
                        new_len,
                    });
                    self.ranges = subtract(&self.ranges, &[(old, old + old_len)]);
                    self.ranges = union(&self.ranges, &[(new, new + new_len)]);
                }
            }
        }
        self.moves_seen = head;
        // 2. The difference with what the maps say now.
        let lines = maps::parse(maps_text);
        let own = [(self.channel, self.channel + channel::CHANNEL_BYTES as u64)];
        let sps: Vec<u64> = self.stack_sps.values().copied().collect();
        let cov = maps::coverage(&lines, min_len, &own, &sps, &self.last.cache);
        let removed = subtract(&self.ranges, &cov.ranges);
        for (s, e) in removed {
            events.push(Event::Removed {
                start: s,
                len: e - s,
            });
        }
        let added = subtract(&cov.ranges, &self.ranges);
        for (s, e) in added {
            // Grown in place: the covered range starting where a known one starts.
            let grown = self.ranges.iter().find(|&&(os, oe)| {
                oe == s && cov.ranges.iter().any(|&(ns, ne)| ns == os && ne >= e)
            });
            match grown {
                Some(&(os, oe)) if oe - os >= min_len => events.push(Event::Resized {
                    old_start: os,
                    old_len: oe - os,
                    new_start: os,
                    new_len: e - os,
                }),
                _ => events.push(Event::Added {
                    start: s,
                    len: e - s,
                }),
            }
        }
        self.ranges = cov.ranges;
        self.skipped = cov.skipped;
        events
    }

    /// Queues a trim of the shim's cache if it held freed blocks, unchanged, for
    /// [`CACHE_IDLE_MS`] (read from `last`). True if one was queued.
    pub fn trim_if_idle(&mut self, now: u64) -> bool {
        let bytes = self.last.cache_bytes;
        if bytes != self.cache_seen.0 {
            self.cache_seen = (bytes, now);
            return false;
        }
        let pending = self.queue.iter().any(|(i, _)| *i == Item::Trim)
            || self
                .posted
                .as_ref()
                .is_some_and(|p| p.items.iter().any(|(i, _)| *i == Item::Trim));
        if bytes > 0 && now >= self.cache_seen.1 + CACHE_IDLE_MS && !pending {
            self.queue_op(Item::Trim);
            self.cache_seen.1 = now;
            return true;
        }
        false
    }

    /// Tracked for [`SETTLE_MS`]: what it needs can wait for the next grid wake-up (the
    /// first seconds of a process are when most of its duplicates are found and marked).
    pub fn settled(&self, now: u64) -> bool {
        now >= self.tracked_ms + SETTLE_MS
    }

    /// The slowest pace of `map_gen` checks: faster while the shim holds cached blocks, so an
    /// idle one is trimmed in time.
    pub fn max_check_ms(&self) -> u64 {
        if self.last.cache_bytes > 0 {
            CACHE_IDLE_MS / 2
        } else {
            CHECK_MAX_MS
        }
    }

    /// Covered bytes (address space).
    pub fn covered_bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

/// `a − b` for sorted, disjoint range lists.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut cur = s;
        for &(bs, be) in b {
            if be <= cur || bs >= e {
                continue;
            }
            if bs > cur {
                out.push((cur, bs));
            }
            cur = cur.max(be);
            if cur >= e {
                break;
            }
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

/// `a ∪ b`, sorted and coalesced.
pub fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().filter(|r| r.1 > r.0).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in all {
        match out.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unprompted_maps_refreshes_back_off_while_nothing_changes() {
        let mut age = MAPS_AGE_MIN_MS;
        let mut ages = Vec::new();
        for _ in 0..5 {
            age = next_maps_age(age, false);
            ages.push(age);
        }
        assert_eq!(ages, [20_000, 40_000, 80_000, 80_000, 80_000]);
        assert_eq!(next_maps_age(age, true), MAPS_AGE_MIN_MS);
    }

    #[test]
    fn a_settled_program_whose_maps_keep_moving_is_read_ever_less_often() {
        // Young: every change is read.
        assert_eq!(next_maps_gap(0, false, false), 0);
        let mut gap = 0;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            gap = next_maps_gap(gap, false, true);
            gaps.push(gap);
        }
        assert_eq!(gaps, [500, 1000, 2000, 4000, 8000, 8000]);
        // A read that found a region: back to the shortest gap, not to every change.
        assert_eq!(next_maps_gap(gap, true, true), MAPS_GAP_MIN_MS);
        assert_eq!(next_maps_gap(gap, true, false), 0, "young: every change");
        let (read, age) = (10_000, MAPS_AGE_MIN_MS);
        assert!(!maps_due(true, 0, read + 7_999, read, 8000, age));
        assert!(maps_due(true, 0, read + 8000, read, 8000, age));
        assert!(
            !maps_due(false, 0, read + 8000, read, 8000, age),
            "no change"
        );
        assert!(maps_due(false, 0, read + age, read, 8000, age), "too old");
        let half = MAX_MOVES as u64 / 2;
        assert!(
            maps_due(true, half, read + 1, read, 8000, age),
            "the mremap ring fills"
        );
        assert!(!maps_due(true, half - 1, read + 1, read, 8000, age));
    }

    #[test]
    fn range_arithmetic() {
        let a = [(0, 100), (200, 300)];
        assert_eq!(subtract(&a, &[(50, 250)]), vec![(0, 50), (250, 300)]);
        assert_eq!(subtract(&a, &[(0, 300)]), vec![]);
        assert_eq!(subtract(&a, &[]), a.to_vec());
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (30, 40)]),
            vec![(0, 10), (20, 30), (40, 100)]
        );
        assert_eq!(union(&a, &[(90, 210)]), vec![(0, 300)]);
        assert_eq!(
            union(&a, &[(400, 500)]),
            vec![(0, 100), (200, 300), (400, 500)]
        );
    }
}
