//! A small cache of freed shim-owned mappings, so a program that repeatedly allocates and frees
//! large buffers reuses warm pages (as glibc's heap would) instead of paying mmap, page faults and
//! munmap every time.
//!
//! Invariants: fixed slots in `.bss`; each slot is claimed with a CAS (FREE → BUSY → FULL → BUSY →
//! FREE), so no lock; at most `MAX_BYTES` are held; a slot is only reused for a request whose
//! page-rounded length is within 25 % of the cached one. Cached memory is not zeroed: calloc never
//! takes from here.

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering::*};

const SLOTS: usize = 16;
pub const MAX_BYTES: usize = 32 << 20;
const FREE: u8 = 0;
const BUSY: u8 = 1;
const FULL: u8 = 2;

struct Slot {
    state: AtomicU8,
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
    addr: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
};

pub static CACHE: Cache = Cache::new();

impl Cache {
    pub const fn new() -> Cache {
        Cache {
            slots: [NEW_SLOT; SLOTS],
            bytes: AtomicUsize::new(0),
        }
    }

    /// Keeps `[addr, addr+len)` for reuse; `false` if it does not fit (the caller unmaps it).
    pub fn put(&self, addr: usize, len: usize) -> bool {
        if len > MAX_BYTES || self.bytes.fetch_add(len, AcqRel) + len > MAX_BYTES {
            if len <= MAX_BYTES {
                self.bytes.fetch_sub(len, AcqRel);
            }
            return false;
        }
        for s in &self.slots {
            if s.state
                .compare_exchange(FREE, BUSY, Acquire, Relaxed)
                .is_ok()
            {
                s.addr.store(addr, Relaxed);
                s.len.store(len, Relaxed);
                s.state.store(FULL, Release);
                return true;
            }
        }
        self.bytes.fetch_sub(len, AcqRel);
        false
    }

    /// A cached mapping of at least `len` bytes (and at most 25 % more): `(addr, its length)`.
    pub fn take(&self, len: usize) -> Option<(usize, usize)> {
        if self.bytes.load(Relaxed) < len {
            return None;
        }
        for s in &self.slots {
            if s.state.load(Relaxed) != FULL {
                continue;
            }
            let l = s.len.load(Relaxed);
            if l < len || l - len > len / 4 {
                continue;
            }
            if s.state
                .compare_exchange(FULL, BUSY, Acquire, Relaxed)
                .is_ok()
            {
                let (a, l) = (s.addr.load(Relaxed), s.len.load(Relaxed));
                if l < len || l - len > len / 4 {
                    s.state.store(FULL, Release);
                    continue;
                }
                s.state.store(FREE, Release);
                self.bytes.fetch_sub(l, AcqRel);
                return Some((a, l));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_take_bounds() {
        let c = Cache::new();
        assert!(c.put(0x10000, 1 << 20));
        assert_eq!(c.take(2 << 20), None, "too small");
        assert_eq!(c.take(512 << 10), None, "too much waste");
        assert_eq!(c.take(900 << 10), Some((0x10000, 1 << 20)));
        assert_eq!(c.take(900 << 10), None);
        assert!(!c.put(0x20000, MAX_BYTES + 4096));
        for i in 0..SLOTS {
            assert!(c.put(0x100000 * (i + 1), 4096));
        }
        assert!(!c.put(0x9000000, 4096), "no slot left");
        assert_eq!(c.bytes.load(Relaxed), SLOTS * 4096);
    }
}
