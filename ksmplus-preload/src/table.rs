//! The registry of live shim-owned allocations (malloc-family regions): a fixed-size,
//! open-addressed, lock-free hash table keyed by start address.
//!
//! Invariants:
//! - Lives in `.bss`: never allocates; untouched slots cost no memory.
//! - A key moves EMPTY → addr → TOMB → addr' …, never back to EMPTY, so a lookup that walks the
//!   probe sequence until EMPTY (or `MAX_PROBE`) never misses a live key.
//! - Every operation is O(`MAX_PROBE`) at most, whatever the number of regions; an insert that
//!   finds no slot fails and the caller falls back to glibc. New registrations stop at half the
//!   capacity, which keeps `reinsert` (realloc's remove-then-insert) from ever spinning in practice.
//! - Only the thread that owns an allocation (the one holding the pointer) inserts, updates or
//!   removes its entry.

use core::sync::atomic::{AtomicUsize, Ordering::*};

const BITS: u32 = 16;
const CAP: usize = 1 << BITS;
const MASK: usize = CAP - 1;
const MAX_PROBE: usize = 64;
const EMPTY: usize = 0;
const TOMB: usize = 1;

struct Entry {
    key: AtomicUsize,
    len: AtomicUsize,
}

pub struct Table {
    entries: [Entry; CAP],
    live: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const NEW_ENTRY: Entry = Entry {
    key: AtomicUsize::new(EMPTY),
    len: AtomicUsize::new(0),
};

pub static TABLE: Table = Table {
    entries: [NEW_ENTRY; CAP],
    live: AtomicUsize::new(0),
};

#[inline]
fn home(addr: usize) -> usize {
    ((addr >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (usize::BITS - BITS)) & MASK
}

impl Table {
    /// Registers `[addr, addr+len)`. `false` when no slot was found within `MAX_PROBE`.
    pub fn insert(&self, addr: usize, len: usize) -> bool {
        debug_assert!(addr > TOMB && len > 0);
        let h = home(addr);
        for i in 0..MAX_PROBE {
            let e = &self.entries[(h + i) & MASK];
            let k = e.key.load(Acquire);
            if (k == EMPTY || k == TOMB) && e.key.compare_exchange(k, addr, AcqRel, Acquire).is_ok()
            {
                e.len.store(len, Release);
                self.live.fetch_add(1, Relaxed);
                return true;
            }
        }
        false
    }

    fn find(&self, addr: usize) -> Option<&Entry> {
        let h = home(addr);
        for i in 0..MAX_PROBE {
            let e = &self.entries[(h + i) & MASK];
            match e.key.load(Acquire) {
                k if k == addr => return Some(e),
                EMPTY => return None,
                _ => {}
            }
        }
        None
    }

    /// New registrations stop at half the capacity, so the probe window of a key that was just
    /// removed is never entirely taken (the chance is below 2^-64) and `reinsert` succeeds.
    #[inline]
    pub fn is_half_full(&self) -> bool {
        self.live() >= CAP / 2
    }

    /// Registers again a key the caller removed a moment ago (realloc). Retries until a slot is
    /// free; with the table at most half full the first try succeeds.
    pub fn reinsert(&self, addr: usize, len: usize) {
        while !self.insert(addr, len) {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// The length of the allocation starting at `addr`, if it is one of ours.
    #[inline]
    pub fn get(&self, addr: usize) -> Option<usize> {
        self.find(addr).map(|e| e.len.load(Acquire))
    }

    /// Changes the registered length of `addr` (a block grown in place); `false` if `addr` is
    /// not registered.
    pub fn resize(&self, addr: usize, len: usize) -> bool {
        match self.find(addr) {
            Some(e) => {
                e.len.store(len, Release);
                true
            }
            None => false,
        }
    }

    /// Unregisters `addr`, returning its length.
    pub fn remove(&self, addr: usize) -> Option<usize> {
        let e = self.find(addr)?;
        let len = e.len.swap(0, AcqRel);
        if e.key.compare_exchange(addr, TOMB, AcqRel, Acquire).is_ok() {
            self.live.fetch_sub(1, Relaxed);
            Some(len)
        } else {
            None
        }
    }

    pub fn live(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// Calls `f(addr, len)` for every complete live entry (a walk of every slot: for a fork
    /// child's first count of what it inherited, and tests).
    pub fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        if self.live() == 0 {
            return;
        }
        for e in &self.entries {
            let k = e.key.load(Acquire);
            if k <= TOMB {
                continue;
            }
            let len = e.len.load(Acquire);
            if len != 0 && e.key.load(Acquire) == k {
                f(k, len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove_and_reuse() {
        let t = Box::leak(Box::new(Table {
            entries: [NEW_ENTRY; CAP],
            live: AtomicUsize::new(0),
        }));
        for i in 1..5000usize {
            assert!(t.insert(i << 16, i * 4096));
        }
        assert_eq!(t.live(), 4999);
        for i in 1..5000usize {
            assert_eq!(t.get(i << 16), Some(i * 4096));
            assert_eq!(t.get((i << 16) + 4096), None);
        }
        for i in (1..5000usize).step_by(2) {
            assert_eq!(t.remove(i << 16), Some(i * 4096));
            assert_eq!(t.remove(i << 16), None);
        }
        let mut n = 0;
        t.for_each(|a, l| {
            assert_eq!(a >> 16, l / 4096);
            n += 1
        });
        assert_eq!(n, t.live());
        // Tombstones are reused: churn far more keys than the capacity.
        for round in 0..40usize {
            for i in 0..4000usize {
                let a = (round * 4000 + i + 10_000) << 16;
                assert!(t.insert(a, 4096), "round {round} key {i}");
                assert_eq!(t.remove(a), Some(4096));
            }
        }
    }
}
