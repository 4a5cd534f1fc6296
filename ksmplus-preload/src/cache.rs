//! A cache of freed shim-owned mappings, so a program that repeatedly allocates and frees large
//! buffers reuses warm pages (as glibc's heap would) instead of paying mmap, a page fault per
//! page, and munmap every time — and so a freed block's address stays readable, as it does in
//! glibc's heap.
//!
//! Invariants:
//! - Fixed slots in `.bss`, each claimed with a CAS (FREE → BUSY → FULL → BUSY → FREE): no lock,
//!   no allocation; every operation scans the `SLOTS` slots a bounded number of times.
//! - Cached ranges are disjoint page-aligned pieces of shim mappings that no registry entry and
//!   no caller holds. A piece is **warm** (its pages as the program left them; at most
//!   `MAX_BYTES` of them) or **cold** (its memory given back with `MADV_DONTNEED`, its address
//!   range still mapped and reading as zeros; at most `COLD_MAX_BYTES` of address space).
//!   Adjacent pieces of the same kind are coalesced.
//! - A freed block is not unmapped while it fits the cache: programs read memory after freeing
//!   it (WebKit's compositor thread does, through Mesa's software rasteriser), and glibc, which
//!   keeps blocks up to its mmap threshold in its heap, lets them; an unmapped block would crash
//!   them (issue 9: "no crash"). Only blocks above `MAX_PIECE` (which glibc unmaps too), the
//!   oldest cold pieces past `COLD_MAX_BYTES` or a full slot table, and every cold piece when a
//!   new mapping fails ([`Cache::release_cold`]) are unmapped.
//! - Only blocks of at most `MAX_PIECE` bytes are kept, and only requests of at most `MAX_PIECE`
//!   are served. A warm piece keeps its old owner's resident pages, and a request served from
//!   it pays for all of them, touched or not, where a fresh mapping faults in only what the
//!   program touches. glibc never reuses a freed block above its mmap threshold, which it raises
//!   to at most 32 MiB (`DEFAULT_MMAP_THRESHOLD_MAX`); neither does the cache. (Without this
//!   bound GIMP grew a freed 47 MiB buffer into a sparsely used 48 MiB one: +14 MiB Pss.)
//! - `take` cuts from the start of the largest fitting piece the calling thread stored (warm
//!   first), else of the largest fitting one, and puts the rest back, or grows the largest piece
//!   in place (a mapping right after it) so only the missing pages are new. Like glibc's top
//!   chunk in a per-thread arena, this keeps each thread on the same warm pages and leaves room
//!   after a block for realloc to grow into (`take_at`): no mmap/munmap, only the
//!   `MADV_KEEPONFORK` below (which, like any advice, waits for a concurrent `fork`'s copy).
//! - Cached memory is not zeroed: calloc never takes from here.
//! - A fork does not copy cached pieces: they are `MADV_WIPEONFORK` while cached (a fork child
//!   finds them zero-filled, which is as good as any content for free memory) and
//!   `MADV_KEEPONFORK` again before they are handed out. A fork's cost is its copy of the page
//!   tables of resident memory, and the cache holds about as much as the program's live large
//!   blocks (issue 12: 200 forks beside 4 allocating threads took 1.5x glibc's CPU without
//!   this). Not under a seccomp filter, which may trap advice it does not expect.
//!   `MADV_DONTNEED`, which every allocator uses (glibc's `free` among them), is used under one.
//! - A warm piece not reused within one to two `trim` periods (a quarter to half a second)
//!   turns cold, so the cache speeds up allocate/free loops without holding idle memory; a
//!   process that stops calling the allocator is trimmed by the agent (`TRIM_CACHE` after half a
//!   second without a change). With a 1 s trim period and the agent's trim after 2 s,
//!   epiphany's web processes each held 7-27 MiB more than under glibc when the desktop bench
//!   measured them (1 s after its keys). The rest of a
//!   split piece keeps the piece's age (serving part of it does not make the rest young); a
//!   piece coalesced with a newly freed block is as young as that block.

use crate::sys;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};

pub const SLOTS: usize = 32;
/// The most warm (resident) memory cached.
pub const MAX_BYTES: usize = 64 << 20;
/// The most address space held by cold pieces (no memory: their pages were given back).
pub const COLD_MAX_BYTES: usize = 256 << 20;
/// The largest block kept, and the largest request served (see the module invariants).
pub const MAX_PIECE: usize = 32 << 20;
const FREE: u8 = 0;
const BUSY: u8 = 1;
const FULL: u8 = 2;

struct Slot {
    state: AtomicU8,
    /// Trims survived while cached (see `trim`), at most 255.
    age: AtomicU8,
    /// The piece's memory was given back (see the module invariants).
    cold: AtomicBool,
    addr: AtomicUsize,
    len: AtomicUsize,
    /// [`thread_tag`] of the thread that stored the piece: a thread is served from its own
    /// pieces first, so each thread keeps reusing the same warm pages (glibc's per-thread
    /// arenas do the same).
    tag: AtomicUsize,
}

/// A cached piece as claimed out of its slot.
#[derive(Clone, Copy)]
struct Piece {
    addr: usize,
    len: usize,
    age: u8,
    cold: bool,
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

/// Gives the memory of a range the cache owns back to the kernel, keeping the range mapped
/// (it then reads as zeros). False if the kernel refused (a seccomp filter could).
#[inline]
fn give_back(addr: usize, len: usize) -> bool {
    // SAFETY: a range of a shim mapping that no one but the cache holds: its contents are free
    // memory, and MADV_DONTNEED only replaces them with zeros.
    unsafe { sys::madvise(addr, len, libc::MADV_DONTNEED) }.is_ok()
}

/// Unmaps a range the cache owns.
#[inline]
fn unmap(addr: usize, len: usize) {
    // SAFETY: a range of a shim mapping that no one but the cache holds.
    let _ = unsafe { sys::munmap(addr, len) };
}

pub struct Cache {
    slots: [Slot; SLOTS],
    /// Bytes of warm pieces.
    bytes: AtomicUsize,
    /// Bytes of cold pieces.
    cold_bytes: AtomicUsize,
    /// Monotonic milliseconds of the next due trim (0: not started).
    next_trim_ms: AtomicU64,
}

/// Period of the idle-piece trim.
pub const TRIM_PERIOD_MS: u64 = 250;

#[allow(clippy::declare_interior_mutable_const)]
const NEW_SLOT: Slot = Slot {
    state: AtomicU8::new(FREE),
    age: AtomicU8::new(0),
    cold: AtomicBool::new(false),
    addr: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    tag: AtomicUsize::new(0),
};

pub static CACHE: Cache = Cache::new();

impl Slot {
    /// Claims a FULL slot and empties it.
    fn claim(&self) -> Option<Piece> {
        self.state
            .compare_exchange(FULL, BUSY, Acquire, Relaxed)
            .ok()?;
        let p = Piece {
            addr: self.addr.load(Relaxed),
            len: self.len.load(Relaxed),
            age: self.age.load(Relaxed),
            cold: self.cold.load(Relaxed),
        };
        self.state.store(FREE, Release);
        Some(p)
    }
    fn peek(&self) -> Option<(usize, usize)> {
        (self.state.load(Acquire) == FULL)
            .then(|| (self.addr.load(Relaxed), self.len.load(Relaxed)))
    }
    /// `peek` with the piece's kind (true: cold).
    fn peek_kind(&self) -> Option<(usize, usize, bool)> {
        let (a, l) = self.peek()?;
        Some((a, l, self.cold.load(Relaxed)))
    }
}

impl Cache {
    pub const fn new() -> Cache {
        Cache {
            slots: [NEW_SLOT; SLOTS],
            bytes: AtomicUsize::new(0),
            cold_bytes: AtomicUsize::new(0),
            next_trim_ms: AtomicU64::new(0),
        }
    }

    fn counter(&self, cold: bool) -> &AtomicUsize {
        if cold {
            &self.cold_bytes
        } else {
            &self.bytes
        }
    }

    /// Keeps a freed block `[addr, addr+len)` for reuse, merged with adjacent cached pieces of
    /// its kind: warm, unless `warm` is false or `MAX_BYTES` would be exceeded (then cold: its
    /// memory goes back to the kernel at once). `false` if it is larger than `MAX_PIECE` (the
    /// caller unmaps it). Takes ownership otherwise.
    pub fn put(&self, addr: usize, len: usize, warm: bool) -> bool {
        if len > MAX_PIECE {
            return false;
        }
        fork_wipes(addr, len, true);
        self.put_piece(Piece {
            addr,
            len,
            age: 0,
            cold: !warm,
        });
        true
    }

    /// Caches a piece the cache owns (see `put`); unmaps it when it finds no room.
    fn put_piece(&self, mut p: Piece) {
        if !p.cold && self.bytes.fetch_add(p.len, AcqRel) + p.len > MAX_BYTES {
            self.bytes.fetch_sub(p.len, AcqRel);
            p.cold = true;
        }
        if p.cold {
            if !give_back(p.addr, p.len) {
                return unmap(p.addr, p.len);
            }
            if !self.make_cold_room(p.len) {
                return unmap(p.addr, p.len);
            }
        }
        // Coalesce with neighbours of the same kind (the counter already holds them, so the sum
        // stays right).
        'merge: for _ in 0..2 {
            for s in &self.slots {
                let Some((a, l, cold)) = s.peek_kind() else {
                    continue;
                };
                if cold != p.cold || a + l != p.addr && p.addr + p.len != a {
                    continue;
                }
                let Some(n) = s.claim() else { continue };
                if n.cold == p.cold && (n.addr + n.len == p.addr || p.addr + p.len == n.addr) {
                    p.addr = p.addr.min(n.addr);
                    p.len += n.len;
                    p.age = p.age.min(n.age);
                    continue 'merge;
                }
                // Changed between the look and the claim: put it back.
                self.keep_or_unmap(n);
            }
            break;
        }
        if !self.store(p) {
            // Every slot taken: the oldest cold piece makes room. Failing that, the range is
            // released here (it may include merged neighbours the caller does not know of).
            self.evict_oldest_cold();
            self.keep_or_unmap(p);
        }
    }

    /// Counts `len` more cold bytes, unmapping the oldest cold pieces while the sum would exceed
    /// `COLD_MAX_BYTES`. False (nothing counted) if that does not make room.
    fn make_cold_room(&self, len: usize) -> bool {
        for _ in 0..=SLOTS {
            if self.cold_bytes.fetch_add(len, AcqRel) + len <= COLD_MAX_BYTES {
                return true;
            }
            self.cold_bytes.fetch_sub(len, AcqRel);
            if !self.evict_oldest_cold() {
                return false;
            }
        }
        false
    }

    /// Unmaps the cold piece that has been cached longest. False if there is none.
    fn evict_oldest_cold(&self) -> bool {
        let oldest = self
            .slots
            .iter()
            .filter(|s| s.peek_kind().is_some_and(|(_, _, cold)| cold))
            .max_by_key(|s| s.age.load(Relaxed));
        let Some(n) = oldest.and_then(Slot::claim) else {
            return false;
        };
        if !n.cold {
            // Turned warm meanwhile (claimed, cut and put back): keep it.
            self.keep_or_unmap(n);
            return true;
        }
        self.cold_bytes.fetch_sub(n.len, AcqRel);
        unmap(n.addr, n.len);
        true
    }

    fn store(&self, p: Piece) -> bool {
        for s in &self.slots {
            if s.state
                .compare_exchange(FREE, BUSY, Acquire, Relaxed)
                .is_ok()
            {
                s.addr.store(p.addr, Relaxed);
                s.len.store(p.len, Relaxed);
                s.age.store(p.age, Relaxed);
                s.cold.store(p.cold, Relaxed);
                s.tag.store(thread_tag(), Relaxed);
                s.state.store(FULL, Release);
                return true;
            }
        }
        false
    }

    /// Puts back the rest `[at, at+len)` of a claimed piece `p`, its kind and age kept.
    fn put_rest(&self, p: Piece, at: usize, len: usize) {
        self.counter(p.cold).fetch_add(len, AcqRel);
        self.keep_or_unmap(Piece { addr: at, len, ..p });
    }

    /// Stores a claimed piece its counter still holds; with no free slot, uncounts and unmaps it.
    fn keep_or_unmap(&self, p: Piece) {
        if !self.store(p) {
            self.counter(p.cold).fetch_sub(p.len, AcqRel);
            unmap(p.addr, p.len);
        }
    }

    /// A range of exactly `len` bytes built from cached memory: cut from the start of the
    /// largest fitting piece the calling thread stored (a warm one first), else of the largest
    /// fitting piece (its rest goes back, adjacent, so a realloc can grow into it:
    /// [`Cache::take_at`]), else the largest piece grown in place by a mapping right after it.
    /// `None` if `len` is larger than `MAX_PIECE`, the cache is empty or there is no room to
    /// grow.
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
            // (slot, len) of the largest piece overall, and (slot, warm, len) of the best this
            // thread stored.
            let mut largest: Option<(usize, usize)> = None;
            let mut mine: Option<(usize, bool, usize)> = None;
            for (i, s) in self.slots.iter().enumerate() {
                let Some((_, l, cold)) = s.peek_kind() else {
                    continue;
                };
                if largest.is_none_or(|(_, b)| l > b) {
                    largest = Some((i, l));
                }
                if l >= len
                    && s.tag.load(Relaxed) == me
                    && mine.is_none_or(|(_, w, b)| (!cold, l) > (w, b))
                {
                    mine = Some((i, !cold, l));
                }
            }
            let (i, l) = mine.map(|(i, _, l)| (i, l)).or(largest)?;
            if l < len && !grow {
                return None;
            }
            let Some(p) = self.slots[i].claim() else {
                continue;
            };
            let (a, l) = (p.addr, p.len);
            self.counter(p.cold).fetch_sub(l, AcqRel);
            if l >= len {
                if l > len {
                    self.put_rest(p, a + len, l - len);
                }
                fork_wipes(a, len, false);
                return Some(a);
            }
            // Room right after the piece: extend it there. Never moved with `mremap`: that
            // would unmap its old addresses (see the module invariants).
            if sys::mmap_anon_at(a + l, len - l) {
                fork_wipes(a, l, false);
                return Some(a);
            }
            // Keep it for a request it fits.
            self.put_rest(p, a, l);
            return None;
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
            let Some(p) = s.claim() else {
                return false;
            };
            if p.addr != at || p.len < extra {
                // Changed between the look and the claim: put it back untouched.
                self.keep_or_unmap(p);
                return false;
            }
            self.counter(p.cold).fetch_sub(p.len, AcqRel);
            if p.len > extra {
                self.put_rest(p, at + extra, p.len - extra);
            }
            fork_wipes(at, extra, false);
            return true;
        }
        false
    }

    /// Turns every warm piece that stayed cached since the previous trim cold, so idle freed
    /// memory does not linger (hooks call this about every `TRIM_PERIOD_MS` through
    /// [`Cache::maybe_trim`]; the agent's `TRIM_CACHE` command empties an idle process's cache).
    pub fn trim(&self) {
        for s in &self.slots {
            if s.state.load(Acquire) != FULL {
                continue;
            }
            let age = s.age.load(Relaxed);
            if age < u8::MAX {
                // A racing claim may lose this tick: the age only orders trims and evictions.
                let _ = s.age.compare_exchange(age, age + 1, Relaxed, Relaxed);
            }
            if age == 0 || s.cold.load(Relaxed) {
                continue;
            }
            if let Some(p) = s.claim() {
                self.counter(p.cold).fetch_sub(p.len, AcqRel);
                self.put_piece(Piece { cold: true, ..p });
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

    /// Gives the memory of every cached piece back to the kernel (every piece turns cold).
    pub fn trim_all(&self) {
        self.trim();
        self.trim();
    }

    /// Unmaps every cold piece: for a mapping that failed, perhaps for want of address space.
    /// True if there was one.
    pub fn release_cold(&self) -> bool {
        let mut any = false;
        for _ in 0..2 * SLOTS {
            if !self.evict_oldest_cold() {
                break;
            }
            any = true;
        }
        any
    }

    /// Bytes of warm (resident) pieces.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Relaxed)
    }

    /// Bytes of cold pieces (address space only).
    #[cfg(test)]
    pub fn cold_bytes(&self) -> usize {
        self.cold_bytes.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const P: usize = 4096;

    /// One cache test at a time: some rely on the free address space after a mapping, which a
    /// mapping made by a test running beside them could take.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

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
        assert!(c.put(a, n * P, true));
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
        let _serial = serial();
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
        unmap(a, 8 * P);
    }

    #[test]
    fn no_stale_pages_for_a_block_above_max_piece() {
        let _serial = serial();
        // A freed, fully resident block that could be grown into a larger request.
        let (c, _) = holding(64, true);
        // A request above MAX_PIECE is not served from the cache (before the bound it got this
        // piece grown, its 64 stale resident pages included)...
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
        assert!(!c.put(b, len, true));
        assert_eq!(c.bytes(), 64 * P);
        unmap(b, len);
    }

    #[test]
    fn the_rest_of_a_split_piece_keeps_its_age() {
        let _serial = serial();
        let (c, a) = holding(64, true);
        c.trim();
        // A small request served from the old piece does not make its rest young...
        let x = c.take(4 * P).unwrap();
        assert_eq!(x, a);
        assert_eq!(c.bytes(), 60 * P);
        c.trim();
        assert_eq!(c.bytes(), 0, "the unused rest went back at the next trim");
        assert_eq!(c.cold_bytes(), 60 * P);
        assert_eq!(resident(a + 4 * P, 60), 0);
        assert_eq!(resident(x, 4), 4, "the block handed out is untouched");
        // ... while a block freed next to an old piece keeps the coalesced piece alive.
        let b = touched(64);
        assert!(c.put(b, 64 * P, true));
        c.trim();
        let y = c.take(4 * P).unwrap();
        assert_eq!(y, b, "a warm piece is served before a cold one");
        assert!(c.put(y, 4 * P, true));
        c.trim();
        assert_eq!(c.bytes(), 64 * P, "reused within the trim period");
        c.trim();
        assert_eq!(c.bytes(), 0);
        assert_eq!(resident(b, 64), 0);
        unmap(x, 4 * P);
        assert!(c.release_cold());
        assert_eq!(c.cold_bytes(), 0);
    }

    #[test]
    fn take_at_grows_a_block_into_the_piece_after_it() {
        let _serial = serial();
        let c = Cache::new();
        let a = touched(8);
        // Pages 4..8 are free (cached); a block holds 0..4.
        assert!(c.put(a + 4 * P, 4 * P, true));
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
        let _serial = serial();
        let (c, a) = holding(64, false);
        // Best fit takes the front and puts the rest back.
        let x = c.take(16 * P).unwrap();
        assert_eq!(x, a);
        assert_eq!(c.bytes(), 48 * P);
        // Giving it back coalesces into one piece again.
        assert!(c.put(x, 16 * P, true));
        assert_eq!(c.slots.iter().filter(|s| s.peek().is_some()).count(), 1);
        assert_eq!(c.take(64 * P), Some(a));
        assert_eq!(c.bytes(), 0);
        assert_eq!(c.take(P), None);
        unmap(a, 64 * P);
    }

    #[test]
    fn grows_the_largest_piece_in_place_only() {
        let _serial = serial();
        let c = Cache::new();
        // Free address space after the piece: the test maps 256 pages and caches the first 4.
        let a = map(256 * P);
        unmap(a + 4 * P, 252 * P);
        // SAFETY: test mappings made above, owned by this test.
        unsafe { *(a as *mut u8) = 42 };
        assert!(c.put(a, 4 * P, true));
        let b = c.take(256 * P).unwrap();
        assert_eq!(b, a, "grown where it is");
        // SAFETY: test mappings made above, owned by this test.
        assert_eq!(unsafe { *(b as *const u8) }, 42);
        // SAFETY: test mappings made above, owned by this test.
        unsafe { *((b + 255 * P) as *mut u8) = 1 };
        assert_eq!(c.bytes(), 0);
        // No room after the piece: not moved (its old addresses would go), kept for later.
        let g = map(5 * P);
        assert!(c.put(g, 4 * P, true));
        assert_eq!(c.take(8 * P), None);
        assert!(mapped(g) && c.bytes() == 4 * P);
        unmap(b, 256 * P);
        unmap(g + 4 * P, P);
    }

    #[test]
    fn trim_gives_idle_memory_back_and_keeps_the_block_readable() {
        let _serial = serial();
        let (c, a) = holding(8, true);
        c.trim();
        assert_eq!(c.bytes(), 8 * P, "a fresh piece survives one trim");
        assert_eq!(resident(a, 8), 8);
        c.trim();
        assert_eq!((c.bytes(), c.cold_bytes()), (0, 8 * P));
        // A read after free finds zeros, not an unmapped page, and costs no memory.
        assert!(mapped(a) && mapped(a + 7 * P));
        assert_eq!(resident(a, 8), 0);
        // SAFETY: the test owns the cache and so the piece: reading it is a read of free memory.
        assert_eq!(unsafe { *((a + 3 * P) as *const u8) }, 0);
        // A cold piece serves a request like a fresh mapping: nothing resident until touched.
        assert_eq!(c.take(4 * P), Some(a));
        assert_eq!(resident(a, 8), 1, "only the page read above");
        assert_eq!(c.cold_bytes(), 4 * P);
        assert!(c.release_cold());
        assert!(!mapped(a + 4 * P));
        assert!(!c.release_cold(), "nothing left");
        unmap(a, 4 * P);
    }

    #[test]
    fn a_block_freed_past_the_warm_budget_or_uncached_goes_cold_at_once() {
        let _serial = serial();
        let c = Cache::new();
        let a = touched(4);
        assert!(c.put(a, 4 * P, false));
        assert_eq!((c.bytes(), c.cold_bytes()), (0, 4 * P));
        assert!(mapped(a) && resident(a, 4) == 0);
        // MAX_BYTES of warm pieces (untouched, so only address space), then one more.
        let big: Vec<usize> = (0..MAX_BYTES / MAX_PIECE).map(|_| map(MAX_PIECE)).collect();
        for &b in &big {
            assert!(c.put(b, MAX_PIECE, true));
        }
        assert_eq!(c.bytes(), MAX_BYTES);
        let d = touched(2);
        assert!(c.put(d, 2 * P, true));
        assert_eq!(c.bytes(), MAX_BYTES);
        assert!(mapped(d) && resident(d, 2) == 0);
        assert!(c.cold_bytes() >= 6 * P);
        c.trim_all();
        assert_eq!(c.bytes(), 0);
        c.release_cold();
        for b in big.into_iter().chain([a, d]) {
            assert!(!mapped(b));
        }
    }

    /// Cold pieces: `n` pages each, with an uncached guard page on both sides so none coalesce.
    fn guarded(n: usize) -> usize {
        map((n + 2) * P) + P
    }

    #[test]
    fn the_oldest_cold_pieces_go_past_the_cold_budget() {
        let _serial = serial();
        let c = Cache::new();
        let n = MAX_PIECE / P;
        let pieces: Vec<usize> = (0..COLD_MAX_BYTES / MAX_PIECE)
            .map(|_| guarded(n))
            .collect();
        for &p in &pieces {
            assert!(c.put(p, MAX_PIECE, false));
            c.trim(); // ages the pieces already cached
        }
        assert_eq!(c.cold_bytes(), COLD_MAX_BYTES);
        let last = guarded(n);
        assert!(c.put(last, MAX_PIECE, false));
        assert_eq!(c.cold_bytes(), COLD_MAX_BYTES);
        assert!(!mapped(pieces[0]), "the oldest went");
        assert!(pieces[1..].iter().chain([&last]).all(|&p| mapped(p)));
        c.release_cold();
        for p in pieces.into_iter().chain([last]) {
            unmap(p - P, P);
            unmap(p + MAX_PIECE, P);
        }
    }

    #[test]
    fn maybe_trim_runs_once_per_period() {
        let _serial = serial();
        let (c, a) = holding(8, false);
        c.maybe_trim(5000); // starts the clock
        c.maybe_trim(5000 + TRIM_PERIOD_MS); // first trim: the piece ages
        assert_eq!(c.bytes(), 8 * P);
        c.maybe_trim(5000 + TRIM_PERIOD_MS + 10); // not due yet
        assert_eq!(c.bytes(), 8 * P);
        c.maybe_trim(5000 + 2 * TRIM_PERIOD_MS); // second trim: cold
        assert_eq!((c.bytes(), c.cold_bytes()), (0, 8 * P));
        let b = touched(4);
        assert!(c.put(b, 4 * P, true));
        c.trim_all();
        assert_eq!((c.bytes(), resident(b, 4)), (0, 0));
        c.release_cold();
        assert!(!mapped(a) && !mapped(b));
    }

    #[test]
    fn bounded_slots() {
        let _serial = serial();
        let c = Cache::new();
        assert!(!c.put(0x10_0000_0000, MAX_PIECE + P, true));
        assert_eq!(c.bytes(), 0);
        // Non-adjacent pieces each take a slot.
        for i in 0..SLOTS {
            assert!(c.put(0x20_0000_0000 + i * 2 * P, P, true));
        }
        assert_eq!(c.bytes(), SLOTS * P);
        // With every slot taken by a warm piece, a new piece is released (here: a real
        // mapping) and not counted.
        let a = map(P);
        assert!(c.put(a, P, true));
        assert_eq!(c.bytes(), SLOTS * P);
        assert!(!mapped(a), "unmapped");
        // With a cold piece among them, the oldest cold piece makes room.
        let c = Cache::new();
        let cold = guarded(1);
        assert!(c.put(cold, P, false));
        c.trim();
        for i in 1..SLOTS {
            assert!(c.put(0x20_0000_0000 + i * 2 * P, P, true));
        }
        let a = guarded(1);
        assert!(c.put(a, P, true));
        assert_eq!((c.bytes(), c.cold_bytes()), (SLOTS * P, 0));
        assert!(mapped(a) && !mapped(cold));
        unmap(cold - P, P);
        unmap(cold + P, P);
        unmap(a - P, 3 * P);
    }
}
