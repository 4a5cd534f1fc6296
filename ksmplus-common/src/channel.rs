//! The per-process channel between the shim and the agent: one page of the shim's *private*
//! memory that the agent reads and writes through `/proc/PID/mem`, plus a *shared* doorbell
//! page per family of forked processes.
//!
//! Why this shape (see docs/ARCHITECTURE.md): the shim owns no thread and no descriptor after
//! its constructor, so a program can enter a user namespace, close every descriptor, or switch
//! on a seccomp sandbox without noticing it. The agent does all the reading (`maps`,
//! `pagemap`, `mem`) from outside; only `madvise(MADV_MERGEABLE)` must run inside the process
//! (the kernel refuses it through `process_madvise` on another process). So the agent writes
//! commands into this page and the shim executes them from its own hooks, or from a wake-up
//! signal handler when the program is idle.
//!
//! Invariants:
//! - Every field has exactly one writer: the fields under "shim" only the shim (any thread),
//!   the fields under "agent" only the agent (through `/proc/PID/mem`). Nothing is written by
//!   both sides, so a write of the other side is never lost; a torn 8-byte value is at worst
//!   seen as "changed", and every command is idempotent.
//! - The agent writes `cmds[..n]` and `n_cmds` first and `cmd_seq` last; the shim executes the
//!   batch, writes each `result`, then sets `done_seq = cmd_seq` (the value it read).
//! - The page is `MADV_WIPEONFORK`: a forked child (fork, vfork-less clone) starts with an
//!   all-zero page, which is how its shim knows it is a new process. It then writes a new
//!   `nonce` and rings the family doorbell, which the parent's mapping shares.
//! - The agent treats everything the shim wrote as untrusted input from the program: indices
//!   are bounds-checked, counters are only displayed.
//! - The layout is `#[repr(C)]` and versioned by [`CHANNEL_VERSION`]; the agent refuses a
//!   channel of another version.

use core::mem::offset_of;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize};

/// `channel.magic` once the shim initialised the page ("ksm+chn2").
pub const CHANNEL_MAGIC: u64 = u64::from_le_bytes(*b"ksm+chn2");
/// `doorbell.magic` ("ksm+bel2").
pub const DOORBELL_MAGIC: u64 = u64::from_le_bytes(*b"ksm+bel2");
/// The first bytes of the shim's [`Anchor`], found in its `.data` by an agent that adopts a
/// process it never heard a Hello from (started before the agent, or unable to reach it).
pub const ANCHOR_MAGIC: [u8; 16] = *b"ksmplus-anchor-2";
/// Layout version of [`Channel`] and [`Doorbell`].
pub const CHANNEL_VERSION: u32 = 2;
/// Size of the channel mapping (one page on every supported system).
pub const CHANNEL_BYTES: usize = 4096;
/// Size of the doorbell mapping.
pub const DOORBELL_BYTES: usize = 4096;
/// Commands per batch.
pub const MAX_CMDS: usize = 64;
/// mremap records kept (a ring).
pub const MAX_MOVES: usize = 16;
/// Pieces of the shim's cache of freed blocks published in the page (its slot count).
pub const CACHE_PIECES: usize = 32;

/// `channel.verdict`, written by the agent.
pub mod verdict {
    /// No agent has answered yet: large allocations are page-aligned, nothing is cached.
    pub const PENDING: u32 = 0;
    /// Tracked: the shim executes commands and keeps freed blocks warm.
    pub const TRACK: u32 = 1;
    /// Not tracked (policy): the shim is a pure pass-through until told otherwise.
    pub const IGNORE: u32 = 2;
}

/// `cmds[i].op`.
pub mod op {
    /// `madvise(start, len, MADV_MERGEABLE)`.
    pub const MERGEABLE: u32 = 1;
    /// `madvise(start, len, MADV_UNMERGEABLE)`.
    pub const UNMERGEABLE: u32 = 2;
    /// Give every cached freed block back to the kernel.
    pub const TRIM_CACHE: u32 = 3;
    /// `prctl(PR_SET_MEMORY_MERGE, 1)`: the kernel's merge-everything mode for this process
    /// and every child it forks from now on (the fallback for children whose sandbox refuses
    /// marks). Only ever sent to a process without a seccomp filter.
    pub const MERGE_ANY_ON: u32 = 4;
    /// `prctl(PR_SET_MEMORY_MERGE, 0)`.
    pub const MERGE_ANY_OFF: u32 = 5;
    /// `madvise(channel page, one page, MADV_UNMERGEABLE)`: a no-op that tells whether the
    /// process's sandbox lets KSM advice through (0) or refuses it (EPERM, ENOSYS, ...).
    /// The agent no longer sends it (a sandbox may kill a process for it); kept in the ABI.
    pub const PROBE: u32 = 6;
}

/// Bits of `channel.flags`, written by the shim.
pub mod flag {
    /// The program installed its own handler for the wake-up signal: the agent must not send it.
    pub const SIGNAL_LOST: u32 = 1;
    /// The shim follows `KSMPLUS_MADVISE_ALL=1` (marks every large region itself).
    pub const MADVISE_ALL: u32 = 2;
    /// This process is a fork child (its channel was wiped and re-initialised).
    pub const FORK_CHILD: u32 = 4;
    /// The shim is dormant (verdict IGNORE seen, or excluded by name in madvise-all mode).
    pub const DORMANT: u32 = 8;
    /// The process was exec'd under a seccomp filter (bubblewrap, flatpak, systemd's
    /// `SystemCallFilter=`); how many filters it had then is in the bits from
    /// [`INHERITED_SHIFT`].
    pub const FILTER_INHERITED: u32 = 16;
    /// The program installed a seccomp filter of its own (seen by the shim's `prctl`/`syscall`
    /// hooks): the shim refuses KSM advice from then on.
    pub const FILTER_OWN: u32 = 32;
    /// `flags >> INHERITED_SHIFT`: the number of seccomp filters the process was exec'd with.
    pub const INHERITED_SHIFT: u32 = 24;
}

/// May the agent send KSM advice to a process whose `/proc/PID/status` says `Seccomp:
/// seccomp` and `Seccomp_filters: filters`, and whose channel says `flags`? Yes without a
/// filter; under one only if every filter it has was inherited at exec (a launcher's: they
/// filter system calls by number and allow `madvise`, which every allocator uses) and it
/// installed none itself (browsers' own filters may kill a process for MADV_MERGEABLE).
pub fn advice_allowed(seccomp: u32, filters: u32, flags: u32) -> bool {
    if seccomp == 0 {
        return true;
    }
    seccomp == 2
        && flags & flag::FILTER_INHERITED != 0
        && flags & flag::FILTER_OWN == 0
        && filters != 0
        && filters == flags >> flag::INHERITED_SHIFT
}

/// One command of a batch.
#[repr(C)]
pub struct Cmd {
    pub start: AtomicU64,
    pub len: AtomicU64,
    pub op: AtomicU32,
    /// Written by the shim: 0, or the errno of the call.
    pub result: AtomicI32,
}

/// One `mremap` the shim saw (`seq` is its 1-based position in the ring's history; 0 = empty).
#[repr(C)]
pub struct Move {
    pub seq: AtomicU64,
    pub old: AtomicU64,
    pub old_len: AtomicU64,
    pub new: AtomicU64,
    pub new_len: AtomicU64,
}

/// Counters the shim keeps (displayed by `ksmplusctl status`).
#[repr(C)]
pub struct Counters {
    /// Live shim-owned blocks (page-aligned large allocations) and their bytes.
    pub blocks: AtomicU64,
    pub block_bytes: AtomicU64,
    /// Large allocations that went to glibc because the registry was full.
    pub registry_full: AtomicU64,
    /// Bytes of freed blocks kept warm for reuse.
    pub cache_bytes: AtomicU64,
    /// Command batches executed from a hook, and from the wake-up signal handler.
    pub batches_hook: AtomicU64,
    pub batches_signal: AtomicU64,
    /// Commands executed, and how many failed.
    pub cmds: AtomicU64,
    pub cmd_errors: AtomicU64,
    /// errno of the last failed command.
    pub last_errno: AtomicI32,
    pub _pad: AtomicU32,
}

/// A freed block the shim keeps for reuse (`len` 0: empty). Its pages are garbage to the
/// program: the agent does not sample them.
#[repr(C)]
pub struct CachedPiece {
    pub addr: AtomicU64,
    pub len: AtomicU64,
}

/// The channel page. See the module invariants for who writes what.
#[repr(C, align(4096))]
pub struct Channel {
    // --- shim, at initialisation ---
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub page_size: AtomicU32,
    /// Random per process (a fork child draws a new one): ties an address to one process.
    pub nonce: AtomicU64,
    /// The nonce of the process this one was forked from (0 for an exec'd process).
    pub parent_nonce: AtomicU64,
    /// `getpid()` as the process itself sees it (inside a PID namespace: not the agent's pid).
    pub ns_pid: AtomicU32,
    /// The wake-up signal the shim handles (0: none).
    pub signal: AtomicU32,
    /// Address of the family's doorbell page (0: none).
    pub doorbell: AtomicU64,
    /// The shim's large-allocation threshold.
    pub min_region: AtomicU64,
    /// [`socket_hash`] of the agent socket the shim was started for: an agent adopts a process
    /// it never heard a Hello from only if this is its own socket (several agents of one uid,
    /// as tests and benchmarks run them, must not take each other's processes).
    pub socket_hash: AtomicU64,
    // --- agent ---
    pub verdict: AtomicU32,
    pub _pad0: AtomicU32,
    /// The agent's pid in its own namespace, for diagnostics.
    pub agent_pid: AtomicU64,
    pub cmd_seq: AtomicU64,
    pub n_cmds: AtomicU32,
    pub _pad1: AtomicU32,
    pub cmds: [Cmd; MAX_CMDS],
    // --- shim ---
    pub done_seq: AtomicU64,
    /// Claimed (1) by the one thread executing a batch.
    pub busy: AtomicU32,
    pub flags: AtomicU32,
    /// Bumped by every hook that changes the address space (mmap, munmap, mremap, mprotect,
    /// large malloc/free): the agent re-reads `/proc/PID/maps` only when it moved.
    pub map_gen: AtomicU64,
    /// Number of mremaps recorded so far (`moves[(n-1) % MAX_MOVES]` is the latest).
    pub moves_head: AtomicU64,
    pub moves: [Move; MAX_MOVES],
    pub counters: Counters,
    /// The shim's cache of freed blocks, mirrored after every change.
    pub cache: [CachedPiece; CACHE_PIECES],
}

const _: () = assert!(core::mem::size_of::<Channel>() == CHANNEL_BYTES);

/// The family doorbell: a shared anonymous page made by an exec'd process and inherited by
/// every process forked from it. A new fork child bumps `rings`; the agent then looks for it
/// among the children of the family's processes.
#[repr(C)]
pub struct Doorbell {
    pub magic: AtomicU64,
    pub rings: AtomicU64,
}

/// The shim's signpost in its `.data`: where its channel and doorbell are.
#[repr(C)]
pub struct Anchor {
    pub magic: [u8; 16],
    pub channel: AtomicUsize,
    pub doorbell: AtomicUsize,
}

/// Byte offsets of the fields the agent reads or writes through `/proc/PID/mem`.
pub mod offsets {
    use super::*;
    pub const MAGIC: usize = offset_of!(Channel, magic);
    pub const FLAGS: usize = offset_of!(Channel, flags);
    pub const VERDICT: usize = offset_of!(Channel, verdict);
    pub const AGENT_PID: usize = offset_of!(Channel, agent_pid);
    pub const CMD_SEQ: usize = offset_of!(Channel, cmd_seq);
    pub const N_CMDS: usize = offset_of!(Channel, n_cmds);
    pub const CMDS: usize = offset_of!(Channel, cmds);
    pub const CMD_SIZE: usize = core::mem::size_of::<Cmd>();
    pub const DONE_SEQ: usize = offset_of!(Channel, done_seq);
    pub const DOORBELL_RINGS: usize = offset_of!(Doorbell, rings);
    pub const ANCHOR_CHANNEL: usize = offset_of!(Anchor, channel);
    pub const ANCHOR_DOORBELL: usize = offset_of!(Anchor, doorbell);
}

/// A command as the agent builds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command {
    pub op: u32,
    pub start: u64,
    pub len: u64,
}

/// What the agent reads of a channel page (a plain copy, decoded from raw bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub magic: u64,
    pub version: u32,
    pub page_size: u32,
    pub nonce: u64,
    pub parent_nonce: u64,
    pub ns_pid: u32,
    pub signal: u32,
    pub doorbell: u64,
    pub min_region: u64,
    pub socket_hash: u64,
    pub verdict: u32,
    pub cmd_seq: u64,
    pub n_cmds: u32,
    /// `result` of each of the first `n_cmds` commands (at most [`MAX_CMDS`]).
    pub results: Vec<i32>,
    pub done_seq: u64,
    pub flags: u32,
    pub map_gen: u64,
    pub moves_head: u64,
    /// `(seq, old, old_len, new, new_len)` of every ring entry.
    pub moves: Vec<(u64, u64, u64, u64, u64)>,
    /// The shim's cached freed blocks `(addr, len)`.
    pub cache: Vec<(u64, u64)>,
    pub blocks: u64,
    pub block_bytes: u64,
    pub registry_full: u64,
    pub cache_bytes: u64,
    pub batches_hook: u64,
    pub batches_signal: u64,
    pub cmds: u64,
    pub cmd_errors: u64,
    pub last_errno: i32,
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(a)
}

impl Snapshot {
    /// Decodes a channel page read from a process. `None` if `page` is too short.
    pub fn decode(page: &[u8]) -> Option<Snapshot> {
        if page.len() < CHANNEL_BYTES {
            return None;
        }
        let c = |off: usize| u64_at(page, off);
        let w = |off: usize| u32_at(page, off);
        let n_cmds = w(offset_of!(Channel, n_cmds));
        let results = (0..(n_cmds as usize).min(MAX_CMDS))
            .map(|i| {
                w(offset_of!(Channel, cmds) + i * offsets::CMD_SIZE + offset_of!(Cmd, result))
                    as i32
            })
            .collect();
        let moves = (0..MAX_MOVES)
            .map(|i| {
                let base = offset_of!(Channel, moves) + i * core::mem::size_of::<Move>();
                (
                    c(base + offset_of!(Move, seq)),
                    c(base + offset_of!(Move, old)),
                    c(base + offset_of!(Move, old_len)),
                    c(base + offset_of!(Move, new)),
                    c(base + offset_of!(Move, new_len)),
                )
            })
            .collect();
        let k = offset_of!(Channel, counters);
        let cache = (0..CACHE_PIECES)
            .map(|i| {
                let base = offset_of!(Channel, cache) + i * core::mem::size_of::<CachedPiece>();
                (c(base), c(base + 8))
            })
            .filter(|&(_, l)| l > 0)
            .collect();
        Some(Snapshot {
            magic: c(offset_of!(Channel, magic)),
            version: w(offset_of!(Channel, version)),
            page_size: w(offset_of!(Channel, page_size)),
            nonce: c(offset_of!(Channel, nonce)),
            parent_nonce: c(offset_of!(Channel, parent_nonce)),
            ns_pid: w(offset_of!(Channel, ns_pid)),
            signal: w(offset_of!(Channel, signal)),
            doorbell: c(offset_of!(Channel, doorbell)),
            min_region: c(offset_of!(Channel, min_region)),
            socket_hash: c(offset_of!(Channel, socket_hash)),
            verdict: w(offset_of!(Channel, verdict)),
            cmd_seq: c(offset_of!(Channel, cmd_seq)),
            n_cmds,
            results,
            done_seq: c(offset_of!(Channel, done_seq)),
            flags: w(offset_of!(Channel, flags)),
            map_gen: c(offset_of!(Channel, map_gen)),
            moves_head: c(offset_of!(Channel, moves_head)),
            moves,
            cache,
            blocks: c(k + offset_of!(Counters, blocks)),
            block_bytes: c(k + offset_of!(Counters, block_bytes)),
            registry_full: c(k + offset_of!(Counters, registry_full)),
            cache_bytes: c(k + offset_of!(Counters, cache_bytes)),
            batches_hook: c(k + offset_of!(Counters, batches_hook)),
            batches_signal: c(k + offset_of!(Counters, batches_signal)),
            cmds: c(k + offset_of!(Counters, cmds)),
            cmd_errors: c(k + offset_of!(Counters, cmd_errors)),
            last_errno: w(k + offset_of!(Counters, last_errno)) as i32,
        })
    }

    /// An initialised channel of this layout.
    pub fn valid(&self) -> bool {
        self.magic == CHANNEL_MAGIC && self.version == CHANNEL_VERSION
    }

    /// The batch `cmd_seq` has been executed.
    pub fn batch_done(&self) -> bool {
        self.done_seq == self.cmd_seq
    }
}

/// The identity of an agent socket path, as written in [`Channel::socket_hash`].
pub fn socket_hash(path: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(path) | 1
}

/// Encodes a command batch as the bytes of `cmds[..n]` (results zeroed), for one write at
/// [`offsets::CMDS`]. At most [`MAX_CMDS`] commands are encoded.
pub fn encode_cmds(cmds: &[Command]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cmds.len().min(MAX_CMDS) * offsets::CMD_SIZE);
    for c in cmds.iter().take(MAX_CMDS) {
        out.extend_from_slice(&c.start.to_ne_bytes());
        out.extend_from_slice(&c.len.to_ne_bytes());
        out.extend_from_slice(&c.op.to_ne_bytes());
        out.extend_from_slice(&0i32.to_ne_bytes());
    }
    out
}

/// Finds an [`Anchor`] in bytes read from the shim's writable data: `(channel, doorbell)`.
pub fn find_anchor(data: &[u8]) -> Option<(u64, u64)> {
    let mut i = 0;
    while i + core::mem::size_of::<Anchor>() <= data.len() {
        if data[i..i + 16] == ANCHOR_MAGIC {
            let ch = u64_at(data, i + offsets::ANCHOR_CHANNEL);
            let db = u64_at(data, i + offsets::ANCHOR_DOORBELL);
            if ch != 0 {
                return Some((ch, db));
            }
        }
        i += 8;
    }
    None
}

#[cfg(test)]
mod tests {

    #[test]
    fn advice_under_a_filter_only_when_every_filter_was_inherited() {
        let inherited = |n: u32| flag::FILTER_INHERITED | (n << flag::INHERITED_SHIFT);
        assert!(advice_allowed(0, 0, 0), "no filter");
        assert!(
            advice_allowed(2, 1, inherited(1)),
            "the launcher's one filter"
        );
        assert!(
            !advice_allowed(2, 2, inherited(1)),
            "one added since: the program's own"
        );
        assert!(
            !advice_allowed(2, 1, inherited(1) | flag::FILTER_OWN),
            "the shim saw the program install one"
        );
        assert!(
            !advice_allowed(2, 1, 0),
            "a filter the shim did not see at start"
        );
        assert!(!advice_allowed(1, 0, 0), "strict mode");
        assert!(!advice_allowed(2, 0, inherited(0)), "no count: unknown");
    }
    use super::*;
    use core::sync::atomic::Ordering::Relaxed;

    fn page_of(ch: &Channel) -> Vec<u8> {
        // SAFETY: Channel is plain old data of exactly CHANNEL_BYTES bytes.
        unsafe { core::slice::from_raw_parts(ch as *const Channel as *const u8, CHANNEL_BYTES) }
            .to_vec()
    }

    #[test]
    fn snapshot_decodes_what_the_shim_wrote() {
        // SAFETY: an all-zero Channel is valid (atomics of zero).
        let ch: Box<Channel> = unsafe { Box::new(core::mem::zeroed()) };
        ch.magic.store(CHANNEL_MAGIC, Relaxed);
        ch.version.store(CHANNEL_VERSION, Relaxed);
        ch.nonce.store(77, Relaxed);
        ch.ns_pid.store(5, Relaxed);
        ch.n_cmds.store(2, Relaxed);
        ch.cmds[1].result.store(-1, Relaxed);
        ch.cmds[1].result.store(1, Relaxed);
        ch.done_seq.store(9, Relaxed);
        ch.cmd_seq.store(9, Relaxed);
        ch.moves[3].seq.store(4, Relaxed);
        ch.moves[3].new.store(0x5000, Relaxed);
        ch.counters.cmd_errors.store(3, Relaxed);
        ch.counters.last_errno.store(1, Relaxed);
        let s = Snapshot::decode(&page_of(&ch)).unwrap();
        assert!(s.valid() && s.batch_done());
        assert_eq!((s.nonce, s.ns_pid, s.n_cmds), (77, 5, 2));
        assert_eq!(s.results, vec![0, 1]);
        assert_eq!(s.moves[3], (4, 0, 0, 0x5000, 0));
        assert_eq!((s.cmd_errors, s.last_errno), (3, 1));
        assert!(Snapshot::decode(&[0u8; 100]).is_none());
    }

    #[test]
    fn encoded_commands_land_where_the_shim_reads_them() {
        // SAFETY: as above.
        let ch: Box<Channel> = unsafe { Box::new(core::mem::zeroed()) };
        let bytes = encode_cmds(&[
            Command {
                op: op::MERGEABLE,
                start: 0x1000,
                len: 0x3000,
            },
            Command {
                op: op::TRIM_CACHE,
                start: 0,
                len: 0,
            },
        ]);
        let base = &*ch as *const Channel as *mut u8;
        // SAFETY: writing inside the boxed Channel, as /proc/PID/mem would.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(offsets::CMDS), bytes.len())
        };
        assert_eq!(ch.cmds[0].start.load(Relaxed), 0x1000);
        assert_eq!(ch.cmds[0].len.load(Relaxed), 0x3000);
        assert_eq!(ch.cmds[0].op.load(Relaxed), op::MERGEABLE);
        assert_eq!(ch.cmds[1].op.load(Relaxed), op::TRIM_CACHE);
        assert_eq!(
            encode_cmds(&vec![ch_cmd(); 100]).len(),
            MAX_CMDS * offsets::CMD_SIZE
        );
    }

    fn ch_cmd() -> Command {
        Command {
            op: op::PROBE,
            start: 0,
            len: 0,
        }
    }

    #[test]
    fn anchor_is_found_at_any_8_byte_offset() {
        let mut data = vec![0u8; 256];
        data[40..56].copy_from_slice(&ANCHOR_MAGIC);
        data[56..64].copy_from_slice(&0x7000u64.to_ne_bytes());
        data[64..72].copy_from_slice(&0x9000u64.to_ne_bytes());
        assert_eq!(find_anchor(&data), Some((0x7000, 0x9000)));
        data[56..64].copy_from_slice(&0u64.to_ne_bytes());
        assert_eq!(find_anchor(&data), None, "an anchor with no channel yet");
    }
}
