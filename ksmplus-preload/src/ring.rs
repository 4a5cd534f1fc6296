//! The bounded event ring between hooks (many producers) and the client thread (one consumer).
//!
//! Invariants:
//! - Lives in `.bss`; `push` never allocates, locks, blocks or fails other than by "full".
//! - A slot's `stamp` is `2k` when it is free for the k-th lap's producer and `2k+1` when it holds
//!   that lap's event; the consumer hands it back as `2k+2`.
//! - `pop` is only ever called by one thread at a time (the caller holds the view lock).
//! - When the ring is full the event is dropped, counted, and `NEED_RESYNC` is raised so the
//!   client thread rebuilds the agent's view.
//! - After `fork` the child calls `reset` before any other thread exists in it.

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::*};

pub const CAP: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Added,
    Removed,
    Resized,
}

/// One registry event. `origin` is a `ksmplus_common::Origin` as u8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub origin: u8,
    pub start: usize,
    pub len: usize,
    /// Resized: the new start and length.
    pub new_start: usize,
    pub new_len: usize,
}

struct Slot {
    stamp: AtomicUsize,
    ev: UnsafeCell<Event>,
}

pub struct Ring {
    slots: [Slot; CAP],
    tail: AtomicUsize,
    head: AtomicUsize,
}

// SAFETY: a slot's event is written only by the producer that won its stamp and read only by the
// single consumer after the stamp says it is published (Acquire/Release on `stamp`).
unsafe impl Sync for Ring {}

#[allow(clippy::declare_interior_mutable_const)]
const NEW_SLOT: Slot = Slot {
    stamp: AtomicUsize::new(0),
    ev: UnsafeCell::new(Event {
        kind: Kind::Added,
        origin: 0,
        start: 0,
        len: 0,
        new_start: 0,
        new_len: 0,
    }),
};

pub static RING: Ring = Ring::new();
pub static DROPPED: AtomicU64 = AtomicU64::new(0);
pub static NEED_RESYNC: AtomicBool = AtomicBool::new(false);
/// The consumer sleeps in `poll`; a producer that sees this set writes to `WAKE_FD`.
pub static CONSUMER_WAITING: AtomicBool = AtomicBool::new(false);
pub static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

impl Ring {
    pub const fn new() -> Ring {
        Ring {
            slots: [NEW_SLOT; CAP],
            tail: AtomicUsize::new(0),
            head: AtomicUsize::new(0),
        }
    }

    /// Publishes an event; `false` if the ring is full.
    pub fn push(&self, ev: Event) -> bool {
        let mut pos = self.tail.load(Relaxed);
        loop {
            let slot = &self.slots[pos % CAP];
            let lap = 2 * (pos / CAP);
            let stamp = slot.stamp.load(Acquire);
            if stamp == lap {
                match self
                    .tail
                    .compare_exchange_weak(pos, pos + 1, Relaxed, Relaxed)
                {
                    Ok(_) => {
                        // SAFETY: winning the tail CAS at `pos` with the slot free for this lap
                        // makes this thread the slot's only writer until it publishes.
                        unsafe { *slot.ev.get() = ev };
                        slot.stamp.store(lap + 1, Release);
                        return true;
                    }
                    Err(p) => pos = p,
                }
            } else if stamp < lap {
                // The previous lap's event is still there: full.
                return false;
            } else {
                pos = self.tail.load(Relaxed);
            }
        }
    }

    /// Takes the oldest event. Single consumer only.
    pub fn pop(&self) -> Option<Event> {
        let pos = self.head.load(Relaxed);
        let slot = &self.slots[pos % CAP];
        let lap = 2 * (pos / CAP);
        if slot.stamp.load(Acquire) != lap + 1 {
            return None;
        }
        // SAFETY: the stamp says the producer published this slot and nobody writes it until we
        // hand it back below.
        let ev = unsafe { *slot.ev.get() };
        slot.stamp.store(lap + 2, Release);
        self.head.store(pos + 1, Relaxed);
        Some(ev)
    }

    pub fn is_empty(&self) -> bool {
        let pos = self.head.load(Relaxed);
        self.slots[pos % CAP].stamp.load(Acquire) != 2 * (pos / CAP) + 1
    }

    /// Empties the ring. Only when no other thread can touch it (the child right after fork).
    pub fn reset(&self) {
        for s in &self.slots {
            s.stamp.store(0, Relaxed);
        }
        self.tail.store(0, Relaxed);
        self.head.store(0, Release);
    }
}

/// Hook side: queue an event and wake the client thread if it sleeps.
#[inline]
pub fn emit(ev: Event) {
    if !RING.push(ev) {
        DROPPED.fetch_add(1, Relaxed);
        NEED_RESYNC.store(true, Release);
    }
    // Pairs with the consumer's SeqCst store of CONSUMER_WAITING before it rechecks the ring.
    fence(SeqCst);
    if CONSUMER_WAITING.load(Relaxed) && CONSUMER_WAITING.swap(false, SeqCst) {
        let fd = WAKE_FD.load(Relaxed);
        if fd >= 0 {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live stack value to an eventfd; errors are ignored
            // (a lost wake-up only delays the consumer until its poll timeout).
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize) -> Event {
        Event {
            kind: Kind::Added,
            origin: 0,
            start: i,
            len: i,
            new_start: 0,
            new_len: 0,
        }
    }

    #[test]
    fn fifo_full_and_laps() {
        let r = Box::leak(Box::new(Ring::new()));
        for lap in 0..3 {
            for i in 0..CAP {
                assert!(r.push(ev(lap * CAP + i)));
            }
            assert!(!r.push(ev(0)), "full");
            for i in 0..CAP {
                assert_eq!(r.pop().unwrap().start, lap * CAP + i);
            }
            assert!(r.pop().is_none());
            assert!(r.is_empty());
        }
        r.push(ev(1));
        r.reset();
        assert!(r.is_empty());
        assert!(r.push(ev(2)));
        assert_eq!(r.pop().unwrap().start, 2);
    }

    #[test]
    fn many_producers_one_consumer_lose_nothing_counted() {
        let r: &'static Ring = Box::leak(Box::new(Ring::new()));
        let producers: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut dropped = 0;
                    for i in 0..50_000 {
                        while !r.push(ev(t * 1_000_000 + i)) {
                            dropped += 1;
                            std::thread::yield_now();
                        }
                    }
                    dropped
                })
            })
            .collect();
        let consumer = std::thread::spawn(move || {
            let mut last = [None::<usize>; 4];
            let mut n = 0;
            while n < 200_000 {
                if let Some(e) = r.pop() {
                    let t = e.start / 1_000_000;
                    let i = e.start % 1_000_000;
                    assert!(last[t].is_none_or(|l| l < i), "per-producer order");
                    last[t] = Some(i);
                    n += 1;
                }
            }
        });
        for p in producers {
            p.join().unwrap();
        }
        consumer.join().unwrap();
        assert!(r.is_empty());
    }
}
