//! The shim's side of the channel page (`ksmplus_common::channel`): set-up, fork detection,
//! verdicts, and executing the agent's commands.
//!
//! Invariants:
//! - Everything here may run inside a hook or the wake-up signal handler: no allocation, no
//!   lock (the batch is claimed with a CAS on `busy`; a thread that loses just returns), no
//!   panic, only raw system calls that a sandbox may refuse with an errno (never a new kind of
//!   system call in a fork child: only `getpid`, `madvise`, `munmap`, `mremap`, `prctl` — and
//!   `prctl` only when the agent asks, which it does only for a process without seccomp).
//! - A hook executes at most [`HOOK_BUDGET`] commands per call, so no allocation waits behind a
//!   long batch; the signal handler executes the whole batch, and so does [`before_fork`].
//! - The one wait: before a fork ([`before_fork`]: the `pthread_atfork` prepare handler, and
//!   the `syscall` hook for a raw fork or clone without `CLONE_VM`), a process whose own Hello
//!   reached an agent and whose verdict is still `PENDING` sleeps for it in ~1 ms steps (raw
//!   `nanosleep`), at most [`VERDICT_WAIT_MS`] over its whole life; then it applies the
//!   verdict and runs the batch the agent posted before it (a learned fork server's
//!   merge-any, which only children forked afterwards inherit). Never in a fork child (it
//!   said no Hello: `fork_child` clears the flag, and a page not set up yet is left alone),
//!   once the verdict is known, once ignored or dormant, nor under a seccomp filter.
//! - The channel page is `MADV_WIPEONFORK`: a zero `magic` in a hook means "this is a new
//!   process forked from ours" (fork, or a raw `clone` that bypasses `pthread_atfork`). Its first
//!   hook re-initialises the page with a new nonce and rings the family doorbell, which the
//!   parent's mapping shares. A child of an ignored process stays quiet.
//! - The shim only ever writes the "shim" fields of the page; the agent only the "agent" ones.

use crate::cache::CACHE;
use crate::sys::{self, PAGE};
use crate::{CACHING, MADVISE_ALL, MIN_REGION, THRESHOLD};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use ksmplus_common::channel::{
    flag, op, verdict, Anchor, Channel, Counters, Doorbell, ANCHOR_MAGIC, CHANNEL_BYTES,
    CHANNEL_MAGIC, CHANNEL_VERSION, DOORBELL_BYTES, DOORBELL_MAGIC, MAX_CMDS, MAX_MOVES,
};
const _: () = assert!(crate::cache::SLOTS == ksmplus_common::channel::CACHE_PIECES);

/// Commands a hook executes per call.
pub const HOOK_BUDGET: usize = 8;

/// The longest a process waits for its verdict before its forks, over its whole life (in
/// steps of about a millisecond).
pub const VERDICT_WAIT_MS: u32 = 200;

/// `prctl(PR_SET_MEMORY_MERGE)` (Linux 6.4).
const PR_SET_MEMORY_MERGE: i32 = 67;

/// The signpost an agent finds in our `.data` when it adopts a process that never said Hello.
#[no_mangle]
#[used]
pub static KSMPLUS_ANCHOR: Anchor = Anchor {
    magic: ANCHOR_MAGIC,
    channel: AtomicUsize::new(0),
    doorbell: AtomicUsize::new(0),
};

/// Address of this process's channel page (0: none).
static CHANNEL: AtomicUsize = AtomicUsize::new(0);
/// A channel that never has a batch waiting: what [`pending`] reads until `setup` maps the
/// real page, so the small-allocation fast path needs no null test.
static IDLE: Channel = {
    // SAFETY: a Channel is atomics only (repr(C)); all-zero is a valid value of each.
    unsafe { core::mem::zeroed() }
};
/// The channel [`pending`] reads: [`IDLE`], then the real page once it is set up.
static FAST: AtomicPtr<Channel> = AtomicPtr::new(core::ptr::addr_of!(IDLE) as *mut Channel);
/// This process's nonce; a fork child's copy is its parent's until it re-initialises.
static MY_NONCE: AtomicU64 = AtomicU64::new(0);
/// The verdict the hooks act on now (`u32::MAX`: none applied yet).
static SEEN_VERDICT: AtomicU32 = AtomicU32::new(u32::MAX);
/// The family was ignored: a fork child stays dormant and does not ring the doorbell.
static FAMILY_IGNORED: AtomicBool = AtomicBool::new(false);
/// This process's own Hello reached an agent (a fork child's copy is cleared: it said none).
static HELLO_SENT: AtomicBool = AtomicBool::new(false);
/// What is left of [`VERDICT_WAIT_MS`] for this process.
static WAIT_LEFT_MS: AtomicU32 = AtomicU32::new(VERDICT_WAIT_MS);
/// Progress inside the current batch (only the thread holding `busy` touches these).
static BATCH_SEQ: AtomicU64 = AtomicU64::new(0);
static BATCH_POS: AtomicUsize = AtomicUsize::new(0);
/// [`ksmplus_common::channel::socket_hash`] of the socket this shim was started for.
pub static SOCKET_HASH: AtomicU64 = AtomicU64::new(0);
/// The wake-up signal the handler is installed for (0: none); set by `wake`.
pub static SIGNAL: AtomicU32 = AtomicU32::new(0);

#[inline]
fn channel() -> Option<&'static Channel> {
    let a = CHANNEL.load(Relaxed);
    // SAFETY: a non-zero CHANNEL is the page mapped in `setup`, never unmapped, and every
    // field of a Channel is an atomic (any bit pattern, any concurrent writer, is fine).
    (a != 0).then(|| unsafe { &*(a as *const Channel) })
}

/// The shim's counters, if it has a channel.
#[inline]
pub fn counters() -> Option<&'static Counters> {
    channel().map(|c| &c.counters)
}

/// Maps the channel page (private, wiped on fork) and the family doorbell (shared), fills in
/// the channel and points the anchor at both. `(channel, doorbell, nonce)`, or `None` when the
/// kernel cannot wipe a page on fork (then no agent can track this process).
pub fn setup(min_region: usize, madvise_all: bool) -> Option<(u64, u64, u64)> {
    let page = sys::mmap_anon(CHANNEL_BYTES).ok()?;
    // SAFETY: madvise on the page just mapped.
    if unsafe { sys::madvise(page, CHANNEL_BYTES, libc::MADV_WIPEONFORK) }.is_err() {
        // SAFETY: unmapping the page just mapped, which nothing else knows of.
        let _ = unsafe { sys::munmap(page, CHANNEL_BYTES) };
        return None;
    }
    // SAFETY: a new shared anonymous page at an address the kernel chooses aliases nothing.
    let bell = unsafe {
        sys::mmap(
            core::ptr::null_mut(),
            DOORBELL_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }
    .ok()
    .unwrap_or(0);
    if bell != 0 {
        // SAFETY: the doorbell page was just mapped; Doorbell is atomics only.
        let d = unsafe { &*(bell as *const Doorbell) };
        d.magic.store(DOORBELL_MAGIC, Relaxed);
    }
    let nonce = sys::entropy(page as u64);
    // SAFETY: the channel page was just mapped, page-aligned and CHANNEL_BYTES long.
    let ch = unsafe { &*(page as *const Channel) };
    fill(ch, nonce, 0, bell as u64, min_region, madvise_all, false);
    MY_NONCE.store(nonce, Relaxed);
    CHANNEL.store(page, Release);
    FAST.store(page as *mut Channel, Release);
    SEEN_VERDICT.store(verdict::PENDING, Relaxed);
    KSMPLUS_ANCHOR.channel.store(page, Relaxed);
    KSMPLUS_ANCHOR.doorbell.store(bell, Release);
    Some((page as u64, bell as u64, nonce))
}

/// Writes the shim's fields of a fresh (all-zero) channel page, `magic` last.
fn fill(
    ch: &Channel,
    nonce: u64,
    parent: u64,
    bell: u64,
    min_region: usize,
    madvise_all: bool,
    fork_child: bool,
) {
    ch.version.store(CHANNEL_VERSION, Relaxed);
    ch.page_size.store(PAGE as u32, Relaxed);
    ch.nonce.store(nonce, Relaxed);
    ch.parent_nonce.store(parent, Relaxed);
    ch.ns_pid.store(sys::getpid(), Relaxed);
    ch.signal.store(SIGNAL.load(Relaxed), Relaxed);
    ch.doorbell.store(bell, Relaxed);
    ch.min_region.store(min_region as u64, Relaxed);
    ch.socket_hash.store(SOCKET_HASH.load(Relaxed), Relaxed);
    let mut f = 0;
    if madvise_all {
        f |= flag::MADVISE_ALL;
    }
    if fork_child {
        f |= flag::FORK_CHILD;
    }
    f |= crate::filter::channel_flags();
    ch.flags.fetch_or(f, Relaxed);
    ch.magic.store(CHANNEL_MAGIC, Release);
}

/// Records that the wake-up signal handler is installed (or, with 0, that it is not).
pub fn set_signal(sig: u32) {
    SIGNAL.store(sig, Relaxed);
    if let Some(ch) = channel() {
        ch.signal.store(sig, Relaxed);
        if sig == 0 {
            ch.flags.fetch_or(flag::SIGNAL_LOST, Relaxed);
        }
    }
}

/// Dormant for good (an excluded program in madvise-all mode): pass-through, and the flag says
/// why to whoever reads the channel.
pub fn set_dormant() {
    FAMILY_IGNORED.store(true, Relaxed);
    THRESHOLD.store(usize::MAX, Release);
    CACHING.store(false, Release);
    if let Some(ch) = channel() {
        ch.flags.fetch_or(flag::DORMANT, Relaxed);
    }
}

/// The program put our wake-up handler back.
pub fn clear_signal_lost() {
    if let Some(ch) = channel() {
        ch.flags.fetch_and(!flag::SIGNAL_LOST, Relaxed);
    }
}

/// Fork check, verdict and mailbox: called by every hook that is not the small-allocation
/// fast path.
#[inline]
pub fn touch() {
    let Some(ch) = channel() else { return };
    let magic = ch.magic.load(Acquire);
    if magic != CHANNEL_MAGIC {
        if magic == 0 {
            fork_child(ch);
        }
        return;
    }
    let v = ch.verdict.load(Relaxed);
    if v != SEEN_VERDICT.load(Relaxed) {
        apply_verdict(ch, v);
    }
    if ch.cmd_seq.load(Relaxed) != ch.done_seq.load(Relaxed) {
        service(HOOK_BUDGET, false);
    }
}

/// The small-allocation fast path's test: is a batch waiting? (three loads, no branch but
/// the answer's: before `setup`, [`FAST`] points at the idle channel.)
#[inline(always)]
pub fn pending() -> bool {
    // SAFETY: FAST points at IDLE (a static) or at the channel page mapped in `setup`, which is
    // never unmapped; every field of a Channel is an atomic.
    let ch = unsafe { &*FAST.load(Relaxed) };
    ch.cmd_seq.load(Relaxed) != ch.done_seq.load(Relaxed)
}

/// The small-allocation fast path's share: only "is a batch waiting?" (two loads).
#[inline(always)]
pub fn poll() {
    if let Some(ch) = channel() {
        if ch.cmd_seq.load(Relaxed) != ch.done_seq.load(Relaxed) {
            touch();
        }
    }
}

/// First hook of a forked child: a new nonce, the parent's nonce kept as `parent_nonce`, and a
/// ring of the doorbell so the agent comes looking.
#[cold]
fn fork_child(ch: &Channel) {
    if FAMILY_IGNORED.load(Relaxed) {
        return;
    }
    // One thread of the child initialises; the others go on meanwhile.
    if ch.magic.compare_exchange(0, 1, AcqRel, Relaxed).is_err() {
        return;
    }
    let parent = MY_NONCE.load(Relaxed);
    let nonce = sys::entropy(parent);
    let bell = KSMPLUS_ANCHOR.doorbell.load(Relaxed);
    // This process said no Hello: it never waits for a verdict before forking.
    HELLO_SENT.store(false, Relaxed);
    // The parent's batch progress means nothing here.
    BATCH_SEQ.store(0, Relaxed);
    BATCH_POS.store(0, Relaxed);
    SEEN_VERDICT.store(verdict::PENDING, Relaxed);
    MY_NONCE.store(nonce, Relaxed);
    // The page's counters start from zero: count the blocks inherited from the parent, which
    // this process now owns (and may free).
    let (mut n, mut bytes) = (0u64, 0u64);
    crate::table::TABLE.for_each(|_, len| {
        n += 1;
        bytes += len as u64;
    });
    ch.counters.blocks.store(n, Relaxed);
    ch.counters.block_bytes.store(bytes, Relaxed);
    fill(
        ch,
        nonce,
        parent,
        bell as u64,
        MIN_REGION.load(Relaxed),
        MADVISE_ALL.load(Relaxed),
        true,
    );
    let agent = crate::ptracer::PTRACER.load(Relaxed);
    if agent != 0 {
        // Yama's exception is per process: name the agent again before it comes looking.
        crate::ptracer::set_ptracer(agent);
    }
    if bell != 0 {
        // SAFETY: the doorbell page was mapped shared in the exec'd ancestor and is inherited
        // at the same address by every fork; Doorbell is atomics only.
        let d = unsafe { &*(bell as *const Doorbell) };
        d.rings.fetch_add(1, Release);
    }
}

/// Acts on a new verdict.
#[cold]
fn apply_verdict(ch: &Channel, v: u32) {
    SEEN_VERDICT.store(v, Relaxed);
    match v {
        verdict::IGNORE => {
            FAMILY_IGNORED.store(true, Relaxed);
            THRESHOLD.store(usize::MAX, Release);
            CACHING.store(false, Release);
            CACHE.trim_all();
            ch.flags.fetch_or(flag::DORMANT, Relaxed);
        }
        _ => {
            FAMILY_IGNORED.store(false, Relaxed);
            THRESHOLD.store(MIN_REGION.load(Relaxed), Release);
            CACHING.store(true, Release);
            ch.flags.fetch_and(!flag::DORMANT, Relaxed);
        }
    }
    set_cache_bytes();
}

/// Mirrors the cache into the channel: its size, and its pieces (freed blocks the agent must
/// not sample: their pages are garbage until reused).
#[inline]
pub fn set_cache_bytes() {
    let Some(ch) = channel() else { return };
    ch.counters.cache_bytes.store(CACHE.bytes() as u64, Relaxed);
    CACHE.for_each_slot(|i, a, l| {
        if let Some(p) = ch.cache.get(i) {
            if p.addr.load(Relaxed) != a as u64 || p.len.load(Relaxed) != l as u64 {
                p.len.store(0, Relaxed);
                p.addr.store(a as u64, Relaxed);
                p.len.store(l as u64, Release);
            }
        }
    });
}

/// The constructor's Hello reached an agent: forks wait for its verdict from now on.
pub fn hello_reached_agent() {
    HELLO_SENT.store(true, Relaxed);
}

/// Right before this process forks (the `pthread_atfork` prepare handler, the `syscall` hook
/// for a raw clone without `CLONE_VM`): a child inherits `PR_SET_MEMORY_MERGE` only if it ran
/// before the fork, and the agent posts a learned fork server's merge-any before its verdict.
/// So when our own Hello reached an agent whose verdict has not come yet, wait for it (bounded
/// by what is left of [`VERDICT_WAIT_MS`]), apply it, and run the whole waiting batch.
///
/// Does nothing in a fork child (it said no Hello), once the verdict is known but nothing
/// waits, once ignored or dormant, and under a seccomp filter (not even a `nanosleep`: the
/// agent sends merge-any only to a process without one).
pub fn before_fork() {
    if !HELLO_SENT.load(Relaxed) || !crate::filter::unfiltered() {
        return;
    }
    let Some(ch) = channel() else { return };
    let saved_errno = sys::errno();
    before_fork_on(ch, &WAIT_LEFT_MS, sys::sleep_1ms);
    sys::set_errno(saved_errno);
}

/// [`before_fork`] on `ch`, with `left` the wait budget and `sleep` one step of the wait.
/// Returns the verdict it acted on (`PENDING`: none came, or none was waited for).
fn before_fork_on(ch: &Channel, left: &AtomicU32, sleep: impl FnMut()) -> u32 {
    if FAMILY_IGNORED.load(Relaxed) || ch.magic.load(Acquire) != CHANNEL_MAGIC {
        // Ignored, or a fork child whose first hook has not set its page up yet.
        return verdict::PENDING;
    }
    let v = await_verdict(ch, left, sleep);
    if v == verdict::PENDING {
        return v;
    }
    if v != SEEN_VERDICT.load(Relaxed) {
        apply_verdict(ch, v);
    }
    if v == verdict::TRACK {
        service_on(ch, usize::MAX, false);
        if ch.cmd_seq.load(Acquire) != ch.done_seq.load(Acquire) {
            // Another thread holds the batch (a hook runs 8 commands at a time): let it
            // finish, then run the rest here.
            wait_not_busy_on(ch);
            service_on(ch, usize::MAX, false);
        }
    }
    v
}

/// The channel's verdict, waiting for it while it is `PENDING` in steps of `sleep`, each
/// taken from the budget `left` (never below zero, shared by every thread and every fork of
/// the process's life).
fn await_verdict(ch: &Channel, left: &AtomicU32, mut sleep: impl FnMut()) -> u32 {
    loop {
        // Acquire: the agent writes a batch before the verdict.
        let v = ch.verdict.load(Acquire);
        if v != verdict::PENDING {
            return v;
        }
        if left
            .fetch_update(Relaxed, Relaxed, |l| l.checked_sub(1))
            .is_err()
        {
            return v;
        }
        sleep();
    }
}

/// Executes up to `budget` commands of the waiting batch. Returns at once if another thread is
/// executing it, or if there is none.
pub fn service(budget: usize, from_signal: bool) {
    let Some(ch) = channel() else { return };
    service_on(ch, budget, from_signal);
}

/// [`service`] on `ch`.
fn service_on(ch: &Channel, budget: usize, from_signal: bool) {
    if ch.magic.load(Acquire) != CHANNEL_MAGIC {
        return;
    }
    let seq = ch.cmd_seq.load(Acquire);
    if seq == ch.done_seq.load(Acquire) {
        return;
    }
    // SeqCst: pairs with `seccomp::guarded_on` (flag, then `busy`; here `busy`, then flag).
    if ch.busy.compare_exchange(0, 1, SeqCst, Relaxed).is_err() {
        return;
    }
    // A failed command must not leave its errno behind for the program.
    let saved_errno = sys::errno();
    if BATCH_SEQ.load(Relaxed) != seq {
        BATCH_SEQ.store(seq, Relaxed);
        BATCH_POS.store(0, Relaxed);
    }
    let n = (ch.n_cmds.load(Acquire) as usize).min(MAX_CMDS);
    let from = BATCH_POS.load(Relaxed).min(n);
    let to = n.min(from.saturating_add(budget));
    for c in &ch.cmds[from..to] {
        let r = execute(
            ch,
            c.op.load(Relaxed),
            c.start.load(Relaxed),
            c.len.load(Relaxed),
        );
        c.result.store(r, Relaxed);
        ch.counters.cmds.fetch_add(1, Relaxed);
        if r != 0 {
            ch.counters.cmd_errors.fetch_add(1, Relaxed);
            ch.counters.last_errno.store(r, Relaxed);
        }
    }
    BATCH_POS.store(to, Relaxed);
    sys::set_errno(saved_errno);
    if to == n {
        let batches = if from_signal {
            &ch.counters.batches_signal
        } else {
            &ch.counters.batches_hook
        };
        batches.fetch_add(1, Relaxed);
        ch.done_seq.store(seq, Release);
    }
    ch.busy.store(0, Release);
}

/// One command; 0 or an errno.
fn execute(ch: &Channel, op: u32, start: u64, len: u64) -> i32 {
    let aligned = |s: u64, l: u64| {
        s.is_multiple_of(PAGE as u64)
            && l > 0
            && l.is_multiple_of(PAGE as u64)
            && s.checked_add(l).is_some()
    };
    let advice_or_prctl = matches!(
        op,
        op::MERGEABLE | op::UNMERGEABLE | op::PROBE | op::MERGE_ANY_ON | op::MERGE_ANY_OFF
    );
    if advice_or_prctl && !crate::filter::may_advise() {
        // A sandbox filter is in (or going in): it may kill the process for these calls.
        return libc::EPERM;
    }
    let res = match op {
        op::MERGEABLE | op::UNMERGEABLE => {
            if !aligned(start, len) {
                return libc::EINVAL;
            }
            let advice = if op == op::MERGEABLE {
                libc::MADV_MERGEABLE
            } else {
                libc::MADV_UNMERGEABLE
            };
            // SAFETY: KSM advice never changes the contents of memory; the kernel validates
            // the range against this process's own mappings.
            unsafe { sys::madvise(start as usize, len as usize, advice) }
        }
        op::PROBE => {
            // SAFETY: as above, on our own channel page (a no-op unless it were mergeable).
            unsafe {
                sys::madvise(
                    ch as *const Channel as usize,
                    CHANNEL_BYTES,
                    libc::MADV_UNMERGEABLE,
                )
            }
        }
        op::TRIM_CACHE => {
            CACHE.trim_all();
            set_cache_bytes();
            Ok(0)
        }
        op::MERGE_ANY_ON => sys::prctl(PR_SET_MEMORY_MERGE, 1),
        op::MERGE_ANY_OFF => sys::prctl(PR_SET_MEMORY_MERGE, 0),
        _ => return libc::EINVAL,
    };
    match res {
        Ok(_) => 0,
        Err(e) => e,
    }
}

/// Sets `f` in the channel's flags (for the agent to read).
pub fn add_flags(f: u32) {
    if let Some(ch) = channel() {
        ch.flags.fetch_or(f, Release);
    }
}

/// Waits (bounded) until no thread is executing a batch: after `seccomp::guarded_on` set
/// its flag, no command that started before can still be running when the filter goes in.
pub fn wait_not_busy() {
    let Some(ch) = channel() else { return };
    wait_not_busy_on(ch);
}

fn wait_not_busy_on(ch: &Channel) {
    // A batch is at most MAX_CMDS madvise calls: far below this many spins.
    for _ in 0..50_000_000u32 {
        if ch.busy.load(SeqCst) == 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// A hook changed the address space: the agent re-reads the maps.
#[inline]
pub fn bump_map_gen() {
    if let Some(ch) = channel() {
        ch.map_gen.fetch_add(1, Relaxed);
    }
}

/// Records an mremap so the agent can move what it knows of the old range to the new one.
pub fn record_move(old: usize, old_len: usize, new: usize, new_len: usize) {
    let Some(ch) = channel() else { return };
    let n = ch.moves_head.fetch_add(1, AcqRel) + 1;
    let m = &ch.moves[((n - 1) % MAX_MOVES as u64) as usize];
    m.seq.store(0, Release);
    m.old.store(old as u64, Relaxed);
    m.old_len.store(old_len as u64, Relaxed);
    m.new.store(new as u64, Relaxed);
    m.new_len.store(new_len as u64, Relaxed);
    m.seq.store(n, Release);
    ch.map_gen.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A channel page that is not the process's (tests run many at once).
    fn test_channel() -> &'static Channel {
        let p = sys::mmap_anon(CHANNEL_BYTES).unwrap();
        // SAFETY: a fresh zeroed page; Channel is atomics only.
        unsafe { &*(p as *const Channel) }
    }

    /// A test channel set up as `setup` would, with `n` PROBE commands posted (sequence 1).
    fn posted_channel(n: usize) -> &'static Channel {
        let ch = test_channel();
        for c in &ch.cmds[..n] {
            c.op.store(op::PROBE, Relaxed);
        }
        ch.n_cmds.store(n as u32, Relaxed);
        ch.cmd_seq.store(1, Relaxed);
        ch.magic.store(CHANNEL_MAGIC, Release);
        ch
    }

    /// The fork-time wait, every case in one test: it changes the process-wide verdict state
    /// (`SEEN_VERDICT`, `FAMILY_IGNORED`), which a parallel test must not see half-way.
    #[test]
    fn a_fork_waits_for_the_verdict_within_its_budget_and_runs_the_whole_batch() {
        let sleeps = core::cell::Cell::new(0u32);
        let count = || sleeps.set(sleeps.get() + 1);

        // The verdict comes while waiting (on the 3rd step): three steps taken from the budget,
        // and the whole batch (more than a hook's budget) runs before the fork.
        let n = HOOK_BUDGET + 4;
        let ch = posted_channel(n);
        let left = AtomicU32::new(VERDICT_WAIT_MS);
        let v = before_fork_on(ch, &left, || {
            count();
            if sleeps.get() == 3 {
                ch.verdict.store(verdict::TRACK, Release);
            }
        });
        assert_eq!(v, verdict::TRACK);
        assert_eq!(sleeps.get(), 3);
        assert_eq!(left.load(Relaxed), VERDICT_WAIT_MS - 3);
        assert_eq!(ch.done_seq.load(Relaxed), 1, "the whole batch ran");
        assert_eq!(ch.counters.cmds.load(Relaxed), n as u64);

        // The verdict known already: no wait; a batch posted since runs whole.
        sleeps.set(0);
        ch.n_cmds.store(2, Relaxed);
        ch.cmd_seq.store(2, Release);
        assert_eq!(before_fork_on(ch, &left, count), verdict::TRACK);
        assert_eq!(sleeps.get(), 0);
        assert_eq!(ch.done_seq.load(Relaxed), 2);

        // No verdict ever (a silent agent): the budget is spent once, then never waited again.
        sleeps.set(0);
        let ch = posted_channel(1);
        let left = AtomicU32::new(5);
        assert_eq!(before_fork_on(ch, &left, count), verdict::PENDING);
        assert_eq!((sleeps.get(), left.load(Relaxed)), (5, 0));
        assert_eq!(before_fork_on(ch, &left, count), verdict::PENDING);
        assert_eq!(
            sleeps.get(),
            5,
            "the budget is for the process's whole life"
        );
        assert_eq!(
            ch.done_seq.load(Relaxed),
            0,
            "nothing runs without a verdict"
        );

        // A fork child's page, wiped and not set up yet: no wait.
        let wiped = test_channel();
        let left = AtomicU32::new(VERDICT_WAIT_MS);
        assert_eq!(before_fork_on(wiped, &left, count), verdict::PENDING);
        assert_eq!((sleeps.get(), left.load(Relaxed)), (5, VERDICT_WAIT_MS));

        // Ignored: the verdict is applied, nothing runs, and no later fork waits.
        let ch = posted_channel(1);
        ch.verdict.store(verdict::IGNORE, Release);
        assert_eq!(before_fork_on(ch, &left, count), verdict::IGNORE);
        assert_eq!(ch.done_seq.load(Relaxed), 0);
        assert!(ch.flags.load(Relaxed) & flag::DORMANT != 0);
        let pending = posted_channel(1);
        assert_eq!(before_fork_on(pending, &left, count), verdict::PENDING);
        assert_eq!((sleeps.get(), left.load(Relaxed)), (5, VERDICT_WAIT_MS));
        FAMILY_IGNORED.store(false, Relaxed);
        SEEN_VERDICT.store(verdict::PENDING, Relaxed);
    }

    #[test]
    fn execute_refuses_unaligned_and_runs_madvise_and_probe() {
        let ch = test_channel();
        let buf = sys::mmap_anon(4 * PAGE).unwrap();
        assert_eq!(
            execute(ch, op::MERGEABLE, buf as u64 + 1, PAGE as u64),
            libc::EINVAL
        );
        assert_eq!(execute(ch, op::MERGEABLE, buf as u64, 0), libc::EINVAL);
        assert_eq!(execute(ch, 99, 0, 0), libc::EINVAL);
        assert_eq!(execute(ch, op::MERGEABLE, buf as u64, 2 * PAGE as u64), 0);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let vma = format!("{:x}-{:x}", buf, buf + 2 * PAGE);
        let flags = smaps
            .split(&vma)
            .nth(1)
            .and_then(|s| s.lines().find(|l| l.starts_with("VmFlags:")))
            .unwrap();
        assert!(flags.contains(" mg"), "{flags}");
        assert_eq!(execute(ch, op::UNMERGEABLE, buf as u64, 2 * PAGE as u64), 0);
        assert_eq!(execute(ch, op::PROBE, 0, 0), 0);
        // SAFETY: unmapping the test buffer.
        unsafe { sys::munmap(buf, 4 * PAGE).unwrap() };
    }
}
