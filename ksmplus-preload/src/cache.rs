//! A cache of freed shim-owned mappings, so a program that repeatedly allocates and frees large
//! buffers reuses warm pages (as glibc's heap would) instead of paying mmap, a page fault per
//! page, and munmap every time.
//!
//! Invariants:
//! - Fixed slots in `.bss`, each claimed with a CAS (FREE → BUSY → FULL → BUSY → FREE): no lock,
//!   no allocation; every operation scans the `SLOTS` slots a bounded number of times.
//! - Cached ranges are disjoint page-aligned pieces of shim mappings that no registry entry and
//!   no caller holds; at most `MAX_BYTES` of them.
//! - Only blocks of at most `MAX_PIECE` bytes are kept, and only requests of at most `MAX_PIECE`
//!   are served. A cached piece keeps its old owner's resident pages, and a request served from
//!   it pays for all of them, touched or not, where a fresh mapping faults in only what the
//!   program touches. glibc never reuses a freed block above its mmap threshold, which it raises
//!   to at most 32 MiB (`DEFAULT_MMAP_THRESHOLD_MAX`); neither does the cache. (Without this
//!   bound GIMP grew a freed 47 MiB buffer into a sparsely used 48 MiB one: +14 MiB Pss.)
//! - Adjacent pieces are coalesced on `put`; `take` cuts from the start of the largest fitting
//!   piece the calling thread stored (else of the largest fitting one) and puts the rest back,
//!   or grows the largest piece with `mremap` so only the missing pages are new. Like glibc's
//!   top chunk in a per-thread arena, this keeps each thread on the same warm pages and leaves
//!   room after a block for realloc to grow into (`take_at`): no mmap/munmap, only the
//!   `MADV_KEEPONFORK` below (which, like any advice, waits for a concurrent `fork`'s copy).
//! - Cached memory is not zeroed: calloc never takes from here.
//! - A fork does not copy cached pieces: they are `MADV_WIPEONFORK` while cached (a fork child
//!   finds them zero-filled, which is as good as any content for free memory) and
//!   `MADV_KEEPONFORK` again before they are handed out. A fork's cost is its copy of the page
//!   tables of resident memory, and the cache holds about as much as the program's live large
//!   blocks (issue 12: 200 forks beside 4 allocating threads took 1.5x glibc's CPU without
//!   this). Not under a seccomp filter, which may trap advice it does not expect.
//! - A piece not reused within one to two `trim` periods (one to two seconds) goes back to the
//!   kernel, so the cache speeds up allocate/free loops without holding idle memory. The rest of
//!   a split piece keeps the piece's age (serving part of it does not make the rest young); a
//!   piece coalesced with a newly freed block is as young as that block.

use crate::sys;
use core::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::*};

pub const SLOTS: usize = 32;
pub const MAX_BYTES: usize = 64 << 20;
/// The largest block kept, and the largest request served (see the module invariants).
pub const MAX_PIECE: usize = 32 << 20;
const FREE: u8 = 0;
const BUSY: u8 = 1;
const FULL: u8 = 2;

struct Slot {
    state: AtomicU8,
    /// Trims survived while cached (see `trim`).
    age: AtomicU8,
    addr: AtomicUsize,
    len: AtomicUsize,
    /// [`thread_tag`] of the thread that stored the piece: a thread is served from its own
    /// pieces first, so each thread keeps reusing the same warm pages (glibc's per-thread
    /// arenas do the same).
    tag: AtomicUsize,
}

/// A cheap identity of the calling thread: the 1 MiB granule of its stack. No system call and
/// no thread-local storage (whose first use may allocate). Two threads may share a tag; it only
/// steers the choice of a piece.
#[inline(always)]
fn thread_tag() -> usize {
    let probe = 0u8;
    (&probe as *const u8 as usize) >> 20
}

/// `MADV_WIPEONFORK` (`wipe`) or `MADV_KEEPONFORK` on a range the cache owns (see the module
/// invariants); nothing under a seccomp filter. A failure only costs the saving.
#[inline]
fn fork_wipes(addr: usize, len: usize, wipe: bool) {
    if crate::filter::unfiltered() {
        let advice = if wipe {
            libc::MADV_WIPEONFORK
        } else {
            libc::MADV_KEEPONFORK
        };
        // SAFETY: a range of a shim mapping that no one but the cache (or the caller it is
        // handed to) holds; the advice changes what a fork child sees, not this process.
        let _ = unsafe { sys::madvise(addr, len, advice) };
    }
}

pub struct Cache {
    slots: [Slot; SLOTS],
    bytes: AtomicUsize,
    /// Monotonic milliseconds of the next due trim (0: not started).
    next_trim_ms: AtomicU64,
}

/// Period of the idle-piece trim.
pub const TRIM_PERIOD_MS: u64 = 1000;

#[allow(clippy::declare_interior_mutable_const)]
const NEW_SLOT: Slot = Slot {
    state: AtomicU8::new(FREE),
    age: AtomicU8::new(0),
    addr: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    tag: AtomicUsize::new(0),
};

pub static CACHE: Cache = Cache::new();

impl Slot {
    /// Claims a FULL slot and empties it: its range and age.
    fn claim(&self) -> Option<(usize, usize, u8)> {
        self.state
            .compare_exchange(FULL, BUSY, Acquire, Relaxed)
            .ok()?;
        let r = (
            self.addr.load(Relaxed),
            self.len.load(Relaxed),
            self.age.load(Relaxed),
        );
        self.state.store(FREE, Release);
        Some(r)
    }
    fn peek(&self) -> Option<(usize, usize)> {
        (self.state.load(Acquire) == FULL)
            .then(|| (self.addr.load(Relaxed), self.len.load(Relaxed)))
    }
}

impl Cache {
    pub const fn new() -> Cache {
        Cache {
            slots: [NEW_SLOT; SLOTS],
            bytes: AtomicUsize::new(0),
            next_trim_ms: AtomicU64::new(0),
        }
    }

    /// Keeps a freed block `[addr, addr+len)` for reuse, merged with adjacent cached pieces;
    /// `false` if it is larger than `MAX_PIECE` or would exceed `MAX_BYTES` (the caller unmaps
    /// it). Takes ownership otherwise.
    pub fn put(&self, addr: usize, len: usize) -> bool {
        if len > MAX_PIECE || self.bytes.load(Relaxed) + len > MAX_BYTES {
            return false;
        }
        fork_wipes(addr, len, true);
        self.put_aged(addr, len, 0)
    }

    /// `put` of a range that has been cached for `age` trims already.
    fn put_aged(&self, mut addr: usize, mut len: usize, mut age: u8) -> bool {
        if self.bytes.fetch_add(len, AcqRel) + len > MAX_BYTES {
            self.bytes.fetch_sub(len, AcqRel);
            return false;
        }
        // Coalesce with neighbours (bytes already counts them, so the sum stays right).
        'merge: for _ in 0..2 {
            for s in &self.slots {
                let Some((a, l)) = s.peek() else { continue };
                if a + l != addr && addr + len != a {
                    continue;
                }
                if let Some((a, l, g)) = s.claim() {
                    if a + l == addr {
                        addr = a;
                        len += l;
                        age = age.min(g);
                        continue 'merge;
                    } else if addr + len == a {
                        len += l;
                        age = age.min(g);
                        continue 'merge;
                    } else if !self.store(a, l, g) {
                        // Raced with a change: put it back; if no slot, release it.
                        // SAFETY: a cached range is ours alone.
                        let _ = unsafe { sys::munmap(a, l) };
                        self.bytes.fetch_sub(l, AcqRel);
                    }
                }
            }
            break;
        }
        if !self.store(addr, len, age) {
            // Every slot taken meanwhile. The range may include merged neighbours, which the
            // caller does not know of, so release it here.
            // SAFETY: the caller's range and the claimed neighbours are ours alone.
            let _ = unsafe { sys::munmap(addr, len) };
            self.bytes.fetch_sub(len, AcqRel);
        }
        true
    }

    fn store(&self, addr: usize, len: usize, age: u8) -> bool {
        for s in &self.slots {
            if s.state
                .compare_exchange(FREE, BUSY, Acquire, Relaxed)
                .is_ok()
            {
                s.addr.store(addr, Relaxed);
                s.len.store(len, Relaxed);
                s.age.store(age, Relaxed);
                s.tag.store(thread_tag(), Relaxed);
                s.state.store(FULL, Release);
                return true;
            }
        }
        false
    }

    /// A range of exactly `len` bytes built from cached memory: cut from the start of the
    /// largest fitting piece the calling thread stored, else of the largest fitting piece (its
    /// rest goes back, adjacent, so a realloc can grow into it: [`Cache::take_at`]), else the
    /// largest piece grown with `mremap`. `None` if `len` is larger than `MAX_PIECE`, the cache
    /// is empty or the growth fails.
    pub fn take(&self, len: usize) -> Option<usize> {
        self.take_or_grow(len, true)
    }

    /// [`Cache::take`] without growth: a piece of at least `len` bytes cut to `len`, or `None`.
    /// No mapping call unless a rest has no slot to go back to.
    pub fn take_fitting(&self, len: usize) -> Option<usize> {
        self.take_or_grow(len, false)
    }

    fn take_or_grow(&self, len: usize, grow: bool) -> Option<usize> {
        if len > MAX_PIECE {
            return None;
        }
        let me = thread_tag();
        for _ in 0..4 {
            // (slot, len) of the largest piece overall and of the largest this thread stored.
            let mut largest: Option<(usize, usize)> = None;
            let mut mine: Option<(usize, usize)> = None;
            for (i, s) in self.slots.iter().enumerate() {
                let Some((_, l)) = s.peek() else { continue };
                if largest.is_none_or(|(_, b)| l > b) {
                    largest = Some((i, l));
                }
                if l >= len && s.tag.load(Relaxed) == me && mine.is_none_or(|(_, b)| l > b) {
                    mine = Some((i, l));
                }
            }
            let (i, l) = mine.or(largest)?;
            if l < len && !grow {
                return None;
            }
            let Some((a, l, age)) = self.slots[i].claim() else {
                continue;
            };
            self.bytes.fetch_sub(l, AcqRel);
            if l >= len {
                if l > len && !self.put_aged(a + len, l - len, age) {
                    // SAFETY: the rest of a cached range is ours alone.
                    let _ = unsafe { sys::munmap(a + len, l - len) };
                }
                fork_wipes(a, len, false);
                return Some(a);
            }
            // Room right after the piece: extend it there (no move, and no failure when the
            // piece spans two VMAs).
            if sys::mmap_anon_at(a + l, len - l) {
                fork_wipes(a, l, false);
                return Some(a);
            }
            // SAFETY: [a, a+l) is ours alone; MAYMOVE lets the kernel find room.
            match unsafe { sys::mremap(a, l, len, libc::MREMAP_MAYMOVE, 0) } {
                Ok(new) => {
                    fork_wipes(new, len, false);
                    return Some(new);
                }
                Err(_) => {
                    // E.g. the piece spans two VMAs: keep it for a request it fits.
                    if !self.put_aged(a, l, age) {
                        // SAFETY: as above.
                        let _ = unsafe { sys::munmap(a, l) };
                    }
                    return None;
                }
            }
        }
        None
    }

    /// Takes the `extra` bytes that start at `at` out of the cache if a cached piece begins
    /// exactly there and holds at least that much (its rest goes back): a block ending at `at`
    /// then grows in place, like glibc's realloc into the free space after a chunk. No mapping
    /// call unless the rest has no slot to go back to.
    pub fn take_at(&self, at: usize, extra: usize) -> bool {
        for s in &self.slots {
            let Some((a, l)) = s.peek() else { continue };
            if a != at || l < extra {
                continue;
            }
            let Some((a, l, age)) = s.claim() else {
                return false;
            };
            if a != at || l < extra {
                // Changed between the look and the claim: put it back untouched.
                if !self.store(a, l, age) {
                    // SAFETY: a cached range is ours alone.
                    let _ = unsafe { sys::munmap(a, l) };
                    self.bytes.fetch_sub(l, AcqRel);
                }
                return false;
            }
            self.bytes.fetch_sub(l, AcqRel);
            if l > extra && !self.put_aged(a + extra, l - extra, age) {
                // SAFETY: the rest of a cached range is ours alone.
                let _ = unsafe { sys::munmap(a + extra, l - extra) };
            }
            fork_wipes(a, extra, false);
            return true;
        }
        false
    }

    /// Gives back to the kernel every piece that stayed cached since the previous trim, so idle
    /// freed memory does not linger (hooks call this about once a second through
    /// [`Cache::maybe_trim`]; the agent's `TRIM_CACHE` command empties an idle process's cache).
    pub fn trim(&self) {
        for s in &self.slots {
            if s.state.load(Acquire) != FULL {
                continue;
            }
            if s.age.fetch_add(1, Relaxed) == 0 {
                continue;
            }
            if let Some((a, l, _)) = s.claim() {
                self.bytes.fetch_sub(l, AcqRel);
                // SAFETY: a cached range is ours alone.
                let _ = unsafe { sys::munmap(a, l) };
            }
        }
    }

    /// [`Cache::trim`] if at least `TRIM_PERIOD_MS` passed since the last one (`now_ms` from a
    /// monotonic clock). One caller wins the period; the others return at once.
    pub fn maybe_trim(&self, now_ms: u64) {
        let due = self.next_trim_ms.load(Relaxed);
        if now_ms < due || self.bytes() == 0 && due != 0 {
            return;
        }
        if self
            .next_trim_ms
            .compare_exchange(due, now_ms + TRIM_PERIOD_MS, Relaxed, Relaxed)
            .is_ok()
            && due != 0
        {
            self.trim();
        }
    }

    /// Calls `f(slot, addr, len)` for every slot, `len` 0 for an empty one (a racing change
    /// may be seen half-way: for a mirror that is refreshed after every change).
    pub fn for_each_slot(&self, mut f: impl FnMut(usize, usize, usize)) {
        for (i, s) in self.slots.iter().enumerate() {
            match s.peek() {
                Some((a, l)) => f(i, a, l),
                None => f(i, 0, 0),
            }
        }
    }

    /// Gives every cached piece back to the kernel.
    pub fn trim_all(&self) {
        self.trim();
        self.trim();
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const P: usize = 4096;

    fn map(len: usize) -> usize {
        sys::mmap_anon(len).unwrap()
    }

    /// How many of the `n` pages at `a` are resident.
    fn resident(a: usize, n: usize) -> usize {
        let mut v = vec![0u8; n];
        // SAFETY: mincore writes one byte per page of the range into `v`, which has `n` bytes.
        assert_eq!(
            unsafe { libc::mincore(a as *mut _, n * P, v.as_mut_ptr()) },
            0
        );
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    fn mapped(a: usize) -> bool {
        let mut v = 0u8;
        // SAFETY: mincore writes one byte into `v`; an unmapped page only gives ENOMEM.
        unsafe { libc::mincore(a as *mut _, P, &mut v) == 0 }
    }

    /// A mapping of `n` pages, every page written.
    fn touched(n: usize) -> usize {
        let a = map(n * P);
        for i in 0..n {
            // SAFETY: page i of the mapping made just above, owned by this test.
            unsafe { *((a + i * P) as *mut u8) = 0x0c };
        }
        a
    }

    /// A new cache holding one piece of `n` pages (resident ones with `warm`), and its address.
    fn holding(n: usize, warm: bool) -> (Cache, usize) {
        let c = Cache::new();
        let a = if warm { touched(n) } else { map(n * P) };
        assert!(c.put(a, n * P));
        (c, a)
    }

    /// Unmaps a mapping the test made.
    fn unmap(a: usize, len: usize) {
        // SAFETY: a test mapping made by the caller, owned by the test.
        unsafe { sys::munmap(a, len).unwrap() };
    }

    /// What a fork child reads at `a`: the byte there, as its exit status.
    fn read_in_fork_child(a: usize) -> u8 {
        // SAFETY: the child only reads memory and exits (async-signal-safe); the parent waits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::_exit(*(a as *const u8) as i32);
            }
            let mut st = 0;
            assert_eq!(libc::waitpid(pid, &mut st, 0), pid);
            assert!(libc::WIFEXITED(st));
            libc::WEXITSTATUS(st) as u8
        }
    }

    #[test]
    fn a_fork_copies_no_cached_piece_and_every_taken_block() {
        // Cached: the child finds the piece zero-filled (not copied), the parent its bytes.
        let (c, a) = holding(8, true);
        assert_eq!(read_in_fork_child(a + 3 * P), 0);
        // SAFETY: the test owns the cache and so the piece.
        assert_eq!(unsafe { *((a + 3 * P) as *const u8) }, 0x0c);
        // Taken (cut, then the rest grown into in place): a fork copies it again.
        assert_eq!(c.take_fitting(2 * P), Some(a));
        assert!(c.take_at(a + 2 * P, 2 * P));
        for i in 0..4 {
            assert_eq!(read_in_fork_child(a + i * P), 0x0c, "page {i}");
        }
        // The rest, still cached, is still not copied.
        assert_eq!(read_in_fork_child(a + 5 * P), 0);
        // Grown by mremap: the whole block is copied by a fork.
        let b = c.take(12 * P).unwrap();
        assert_eq!(read_in_fork_child(b + P), 0x0c);
        unmap(a, 4 * P);
        unmap(b, 12 * P);
    }

    #[test]
    fn no_stale_pages_for_a_block_above_max_piece() {
        // A freed, fully resident block that could be grown into a larger request.
        let (c, _) = holding(64, true);
        // A request above MAX_PIECE is not served from the cache (before the bound it got this
        // piece grown with mremap, its 64 stale resident pages included)...
        let len = MAX_PIECE + P;
        assert_eq!(c.take(len), None);
        assert_eq!(
            c.bytes(),
            64 * P,
            "the piece stays cached for a request it fits"
        );
        // ... so the hook maps it fresh: nothing resident until the program touches it.
        let b = map(len);
        assert_eq!(resident(b, len / P), 0);
        // A freed block above MAX_PIECE is not kept: the caller unmaps it.
        assert!(!c.put(b, len));
        assert_eq!(c.bytes(), 64 * P);
        // Up to MAX_PIECE the warm piece is grown (only the missing pages are new).
        let g = c.take(MAX_PIECE).unwrap();
        assert_eq!(resident(g, MAX_PIECE / P), 64);
        unmap(b, len);
        unmap(g, MAX_PIECE);
    }

    #[test]
    fn the_rest_of_a_split_piece_keeps_its_age() {
        let (c, a) = holding(64, true);
        c.trim();
        // A small request served from the old piece does not make its rest young...
        let x = c.take(4 * P).unwrap();
        assert_eq!(x, a);
        assert_eq!(c.bytes(), 60 * P);
        c.trim();
        assert_eq!(c.bytes(), 0, "the unused rest went back at the next trim");
        assert!(!mapped(a + 4 * P) && !mapped(a + 63 * P));
        assert_eq!(resident(x, 4), 4, "the block handed out is untouched");
        // ... while a block freed next to an old piece keeps the coalesced piece alive.
        let b = touched(64);
        assert!(c.put(b, 64 * P));
        c.trim();
        let y = c.take(4 * P).unwrap();
        assert!(c.put(y, 4 * P));
        c.trim();
        assert_eq!(c.bytes(), 64 * P, "reused within the trim period");
        c.trim();
        assert_eq!(c.bytes(), 0);
        assert!(!mapped(b));
        unmap(x, 4 * P);
    }

    #[test]
    fn take_at_grows_a_block_into_the_piece_after_it() {
        let c = Cache::new();
        let a = touched(8);
        // Pages 4..8 are free (cached); a block holds 0..4.
        assert!(c.put(a + 4 * P, 4 * P));
        assert!(!c.take_at(a + 5 * P, P), "no piece starts there");
        assert!(!c.take_at(a + 4 * P, 5 * P), "the piece is too short");
        assert!(c.take_at(a + 4 * P, 3 * P));
        assert_eq!(c.bytes(), P, "the rest stays cached");
        assert_eq!(c.take(P), Some(a + 7 * P));
        assert_eq!(c.bytes(), 0);
        // SAFETY: the test's own mapping.
        unsafe { sys::munmap(a, 8 * P).unwrap() };
    }

    #[test]
    fn best_fit_split_and_coalesce() {
        let (c, a) = holding(64, false);
        // Best fit takes the front and puts the rest back.
        let x = c.take(16 * P).unwrap();
        assert_eq!(x, a);
        assert_eq!(c.bytes(), 48 * P);
        // Giving it back coalesces into one piece again.
        assert!(c.put(x, 16 * P));
        assert_eq!(c.slots.iter().filter(|s| s.peek().is_some()).count(), 1);
        assert_eq!(c.take(64 * P), Some(a));
        assert_eq!(c.bytes(), 0);
        assert_eq!(c.take(P), None);
        unmap(a, 64 * P);
    }

    #[test]
    fn grows_the_largest_piece_and_keeps_contents() {
        let c = Cache::new();
        let a = map(4 * P);
        // SAFETY: test mappings made above, owned by this test.
        unsafe { *(a as *mut u8) = 42 };
        assert!(c.put(a, 4 * P));
        let b = c.take(256 * P).unwrap();
        // SAFETY: test mappings made above, owned by this test.
        assert_eq!(unsafe { *(b as *const u8) }, 42);
        // SAFETY: test mappings made above, owned by this test.
        unsafe { *((b + 255 * P) as *mut u8) = 1 };
        assert_eq!(c.bytes(), 0);
        // SAFETY: test mappings made above, owned by this test.
        unsafe { sys::munmap(b, 256 * P).unwrap() };
    }

    #[test]
    fn trim_releases_pieces_that_stayed_idle() {
        let (c, a) = holding(8, false);
        c.trim();
        assert_eq!(c.bytes(), 8 * P, "a fresh piece survives one trim");
        c.trim();
        assert_eq!(c.bytes(), 0);
        let mut v = 0u8;
        // SAFETY: mincore writes one byte into `v`; an unmapped page only gives ENOMEM.
        assert_ne!(
            unsafe { libc::mincore(a as *mut _, P, &mut v) },
            0,
            "unmapped"
        );
    }

    #[test]
    fn maybe_trim_runs_once_per_period() {
        let (c, _) = holding(8, false);
        c.maybe_trim(5000); // starts the clock
        c.maybe_trim(5000 + TRIM_PERIOD_MS); // first trim: the piece ages
        assert_eq!(c.bytes(), 8 * P);
        c.maybe_trim(5000 + TRIM_PERIOD_MS + 10); // not due yet
        assert_eq!(c.bytes(), 8 * P);
        c.maybe_trim(5000 + 2 * TRIM_PERIOD_MS); // second trim: released
        assert_eq!(c.bytes(), 0);
        let b = map(4 * P);
        assert!(c.put(b, 4 * P));
        c.trim_all();
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn bounded_bytes_and_slots() {
        let c = Cache::new();
        assert!(!c.put(0x10_0000_0000, MAX_PIECE + P));
        assert_eq!(c.bytes(), 0);
        // At most MAX_BYTES in all (here: two non-adjacent pieces of MAX_PIECE).
        assert_eq!(MAX_BYTES, 2 * MAX_PIECE);
        assert!(c.put(0x10_0000_0000, MAX_PIECE));
        assert!(c.put(0x18_0000_0000, MAX_PIECE));
        assert_eq!(c.bytes(), MAX_BYTES);
        assert!(!c.put(0x1c_0000_0000, P));
        assert_eq!(c.bytes(), MAX_BYTES);
        let c = Cache::new();
        // Non-adjacent pieces each take a slot.
        for i in 0..SLOTS {
            assert!(c.put(0x20_0000_0000 + i * 2 * P, P));
        }
        assert_eq!(c.bytes(), SLOTS * P);
        // With every slot taken, a new piece is released (here: a real mapping) and not counted.
        let a = map(P);
        assert!(c.put(a, P));
        assert_eq!(c.bytes(), SLOTS * P);
        assert!(!mapped(a), "unmapped");
    }
}
