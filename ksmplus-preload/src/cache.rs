//! A cache of freed shim-owned mappings, so a program that repeatedly allocates and frees large
//! buffers reuses warm pages (as glibc's heap would) instead of paying mmap, a page fault per
//! page, and munmap every time.
//!
//! Invariants:
//! - Fixed slots in `.bss`, each claimed with a CAS (FREE → BUSY → FULL → BUSY → FREE): no lock,
//!   no allocation; every operation scans the `SLOTS` slots a bounded number of times.
//! - Cached ranges are disjoint page-aligned pieces of shim mappings that no registry entry and
//!   no caller holds; at most `MAX_BYTES` of them.
//! - Adjacent pieces are coalesced on `put`; `take` serves the best fit and puts the rest back,
//!   or grows the largest piece with `mremap` so only the missing pages are new.
//! - Cached memory is not zeroed: calloc never takes from here.
//! - A piece not reused within one to two `trim` periods (about a second) goes back to the kernel,
//!   so the cache speeds up allocate/free loops without holding idle memory.

use crate::sys;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering::*};

const SLOTS: usize = 32;
pub const MAX_BYTES: usize = 64 << 20;
const FREE: u8 = 0;
const BUSY: u8 = 1;
const FULL: u8 = 2;

struct Slot {
    state: AtomicU8,
    /// Trims survived while cached (see `trim`).
    age: AtomicU8,
    addr: AtomicUsize,
    len: AtomicUsize,
}

pub struct Cache {
    slots: [Slot; SLOTS],
    bytes: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const NEW_SLOT: Slot = Slot {
    state: AtomicU8::new(FREE),
    age: AtomicU8::new(0),
    addr: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};

pub static CACHE: Cache = Cache::new();

impl Slot {
    /// Claims a FULL slot and empties it: its range.
    fn claim(&self) -> Option<(usize, usize)> {
        self.state
            .compare_exchange(FULL, BUSY, Acquire, Relaxed)
            .ok()?;
        let r = (self.addr.load(Relaxed), self.len.load(Relaxed));
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
        }
    }

    /// Keeps `[addr, addr+len)` for reuse, merged with adjacent cached pieces; `false` if it
    /// would exceed `MAX_BYTES` (the caller unmaps it). Takes ownership otherwise.
    pub fn put(&self, mut addr: usize, mut len: usize) -> bool {
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
                if let Some((a, l)) = s.claim() {
                    if a + l == addr {
                        addr = a;
                        len += l;
                        continue 'merge;
                    } else if addr + len == a {
                        len += l;
                        continue 'merge;
                    } else if !self.store(a, l) {
                        // Raced with a change: put it back; if no slot, release it.
                        // SAFETY: a cached range is ours alone.
                        let _ = unsafe { sys::munmap(a, l) };
                        self.bytes.fetch_sub(l, AcqRel);
                    }
                }
            }
            break;
        }
        if !self.store(addr, len) {
            // Every slot taken meanwhile. The range may include merged neighbours, which the
            // caller does not know of, so release it here.
            // SAFETY: the caller's range and the claimed neighbours are ours alone.
            let _ = unsafe { sys::munmap(addr, len) };
            self.bytes.fetch_sub(len, AcqRel);
        }
        true
    }

    fn store(&self, addr: usize, len: usize) -> bool {
        for s in &self.slots {
            if s.state
                .compare_exchange(FREE, BUSY, Acquire, Relaxed)
                .is_ok()
            {
                s.addr.store(addr, Relaxed);
                s.len.store(len, Relaxed);
                s.age.store(0, Relaxed);
                s.state.store(FULL, Release);
                return true;
            }
        }
        false
    }

    /// A range of exactly `len` bytes built from cached memory: the best-fitting piece (its rest
    /// goes back), else the largest piece grown with `mremap`. `None` if the cache is empty or
    /// the growth fails.
    pub fn take(&self, len: usize) -> Option<usize> {
        for _ in 0..4 {
            let mut best: Option<(usize, usize)> = None; // (slot, len) smallest >= len
            let mut largest: Option<(usize, usize)> = None;
            for (i, s) in self.slots.iter().enumerate() {
                let Some((_, l)) = s.peek() else { continue };
                if l >= len && best.is_none_or(|(_, b)| l < b) {
                    best = Some((i, l));
                }
                if largest.is_none_or(|(_, b)| l > b) {
                    largest = Some((i, l));
                }
            }
            let (i, _) = best.or(largest)?;
            let Some((a, l)) = self.slots[i].claim() else {
                continue;
            };
            self.bytes.fetch_sub(l, AcqRel);
            if l >= len {
                if l > len && !self.put(a + len, l - len) {
                    // SAFETY: the rest of a cached range is ours alone.
                    let _ = unsafe { sys::munmap(a + len, l - len) };
                }
                return Some(a);
            }
            // SAFETY: [a, a+l) is ours alone; MAYMOVE lets the kernel find room.
            match unsafe { sys::mremap(a, l, len, libc::MREMAP_MAYMOVE, 0) } {
                Ok(new) => return Some(new),
                Err(_) => {
                    // E.g. the piece spans two VMAs: keep it for a request it fits.
                    if !self.put(a, l) {
                        // SAFETY: as above.
                        let _ = unsafe { sys::munmap(a, l) };
                    }
                    return None;
                }
            }
        }
        None
    }

    /// Gives back to the kernel every piece that stayed cached since the previous trim, so idle
    /// freed memory does not linger (the client thread calls this about once a second).
    pub fn trim(&self) {
        for s in &self.slots {
            if s.state.load(Acquire) != FULL {
                continue;
            }
            if s.age.fetch_add(1, Relaxed) == 0 {
                continue;
            }
            if let Some((a, l)) = s.claim() {
                self.bytes.fetch_sub(l, AcqRel);
                // SAFETY: a cached range is ours alone.
                let _ = unsafe { sys::munmap(a, l) };
            }
        }
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

    #[test]
    fn best_fit_split_and_coalesce() {
        let c = Cache::new();
        let a = map(64 * P);
        assert!(c.put(a, 64 * P));
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
        // SAFETY: test mappings made above, owned by this test.
        unsafe { sys::munmap(a, 64 * P).unwrap() };
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
        let c = Cache::new();
        let a = map(8 * P);
        assert!(c.put(a, 8 * P));
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
    fn bounded_bytes_and_slots() {
        let c = Cache::new();
        assert!(!c.put(0x10_0000_0000, MAX_BYTES + P));
        assert_eq!(c.bytes(), 0);
        // Non-adjacent pieces each take a slot.
        for i in 0..SLOTS {
            assert!(c.put(0x20_0000_0000 + i * 2 * P, P));
        }
        assert_eq!(c.bytes(), SLOTS * P);
        // With every slot taken, a new piece is released (here: a real mapping) and not counted.
        let a = map(P);
        assert!(c.put(a, P));
        assert_eq!(c.bytes(), SLOTS * P);
        let mut v = 0u8;
        // SAFETY: mincore writes one byte into `v`; an unmapped page only gives ENOMEM.
        assert_ne!(
            unsafe { libc::mincore(a as *mut _, P, &mut v) },
            0,
            "unmapped"
        );
    }
}
