//! The client thread: the only part of the shim that does I/O, allocates freely (through the
//! Rust global allocator, which goes straight to glibc), or reads program memory.
//!
//! Invariants:
//! - One client thread per process, created with every signal blocked, so the program's signal
//!   handlers never run on it.
//! - `STATE` (view + outbox) is guarded by a spin lock taken only by this thread and by the fork
//!   handlers — never by a hook — and held only for in-memory work, never across socket I/O.
//!   The ring is popped only under that lock, so it has a single consumer.
//! - fork: `prepare` takes the lock and drains the ring into the view; the child then owns a
//!   consistent view, resets the ring, drops the inherited socket and starts its own thread,
//!   which connects as a new client and resyncs.
//! - Program memory is only read with `mincore` first (never fault a page in) and then
//!   a read of `/proc/self/mem`, so a page unmapped meanwhile is an error, not a crash (and a
//!   merged page is not unshared, as `process_vm_readv` would: it pins pages).
//! - Diagnostics go to fd 2 with raw `write` (std's stderr lock may be held by a thread that no
//!   longer exists after fork), and only when `KSMPLUS_LOG` is set.

use crate::conn::{Conn, ConnectError, OwnFd};
use crate::maps;
use crate::ring::{Event, Kind, CONSUMER_WAITING, DROPPED, NEED_RESYNC, RING, WAKE_FD};
use crate::sys::{PAGE, PAGE_MASK};
use crate::table::TABLE;
use crate::view::{Region, View};
use crate::{DORMANT, REGISTRY_FULL, THRESHOLD};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::*};
use ksmplus_common::{
    page_hash, track_flags, Advice, Message, Origin, PageHash, ShimStats, Status,
    MAX_FINGERPRINT_PAGES, MAX_RESIDENCY_RUNS,
};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Settings read once from the environment at load time.
pub struct Config {
    pub socket: String,
    pub min_region: usize,
    pub log: bool,
    /// KSMPLUS_MADVISE_ALL=1: mark every region MERGEABLE at once; no agent needed.
    pub madvise_all: bool,
    /// KSMPLUS_COVER_MAPS=1: register the rest of the anonymous address space without being asked.
    pub cover_maps: bool,
}

pub static CONFIG: OnceLock<Config> = OnceLock::new();

/// The client machinery is running (initialised, not dormant, not disabled).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The connected socket's fd, so the fork child can close its inherited copy.
static SOCK_FD: AtomicI32 = AtomicI32::new(-1);
/// An address inside the glibc arena the client thread allocates from (see `refresh_maps`).
static ARENA_PROBE: AtomicUsize = AtomicUsize::new(0);
/// `fork_prepare` took the state lock: its partner handler must release it.
static FORK_HELD: AtomicBool = AtomicBool::new(false);

static EVENTS_SENT: AtomicU64 = AtomicU64::new(0);
static RESYNCS: AtomicU64 = AtomicU64::new(0);
static FINGERPRINT_PAGES: AtomicU64 = AtomicU64::new(0);
static MADVISE_CALLS: AtomicU64 = AtomicU64::new(0);

fn log(msg: &str) {
    if CONFIG.get().is_some_and(|c| c.log) {
        // SAFETY: getpid has no preconditions.
        let line = format!("ksmplus[{}]: {msg}\n", unsafe { libc::getpid() });
        // SAFETY: writing a live buffer to fd 2; a short or failed write only loses a diagnostic.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }
}

/// The view of registered regions plus the messages waiting to be sent.
struct State {
    view: View,
    outbox: Vec<Message>,
    /// Forward ring events to the agent (connected and tracked).
    forwarding: bool,
    madvise_all: bool,
    seq: u64,
}

struct StateLock {
    locked: AtomicBool,
    state: UnsafeCell<Option<State>>,
}

// SAFETY: `state` is only touched while `locked` is held (see `lock`).
unsafe impl Sync for StateLock {}

static STATE: StateLock = StateLock {
    locked: AtomicBool::new(false),
    state: UnsafeCell::new(None),
};

struct Guard;

impl StateLock {
    fn acquire(&self) {
        while self
            .locked
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
    fn release(&self) {
        self.locked.store(false, Release);
    }
    fn lock(&self) -> Guard {
        self.acquire();
        Guard
    }
}

impl Guard {
    #[allow(clippy::mut_from_ref)]
    fn state(&mut self) -> &mut State {
        // SAFETY: the guard proves the lock is held; only one guard exists at a time.
        unsafe { &mut *STATE.state.get() }.get_or_insert_with(|| State {
            view: View::default(),
            outbox: Vec::new(),
            forwarding: false,
            madvise_all: false,
            seq: 0,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        STATE.release();
    }
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Applies one ring event to the view and queues what the agent must hear of it.
    fn apply(&mut self, ev: Event) {
        let origin = origin_of(ev.origin);
        match ev.kind {
            Kind::Added => {
                self.view.add(ev.start, ev.len, ev.origin);
                if self.madvise_all {
                    mark(ev.start, ev.len, Advice::Mergeable);
                }
                if self.forwarding {
                    let seq = self.next_seq();
                    self.outbox.push(Message::RegionAdded {
                        seq,
                        start: ev.start as u64,
                        len: ev.len as u64,
                        origin,
                    });
                }
            }
            Kind::Removed => {
                if self.view.remove(ev.start, ev.len) && self.forwarding {
                    let seq = self.next_seq();
                    self.outbox.push(Message::RegionRemoved {
                        seq,
                        start: ev.start as u64,
                        len: ev.len as u64,
                        origin,
                    });
                }
            }
            Kind::Resized => {
                let known = self.view.resize(ev.start, ev.len, ev.new_start, ev.new_len);
                if known.is_some() && self.madvise_all && ev.new_len > ev.len {
                    mark(ev.new_start, ev.new_len, Advice::Mergeable);
                }
                if !self.forwarding {
                    return;
                }
                let seq = self.next_seq();
                self.outbox.push(match known {
                    Some(o) => Message::RegionResized {
                        seq,
                        origin: origin_of(o),
                        old_start: ev.start as u64,
                        old_len: ev.len as u64,
                        new_start: ev.new_start as u64,
                        new_len: ev.new_len as u64,
                    },
                    None => Message::RegionRemoved {
                        seq,
                        start: ev.start as u64,
                        len: ev.len as u64,
                        origin,
                    },
                });
            }
        }
    }

    /// Pops every queued event into the view.
    fn drain(&mut self) {
        while let Some(ev) = RING.pop() {
            self.apply(ev);
        }
    }

    /// Rebuilds the view after lost events: malloc-family regions from the registry (the truth),
    /// mmap regions kept only where `/proc/self/maps` still shows a private anonymous writable
    /// mapping.
    fn rebuild(&mut self) {
        self.drain();
        let anon = anon_mappings();
        self.view.retain(|r| {
            r.origin != Origin::Malloc as u8
                && anon
                    .iter()
                    .any(|&(s, e)| s <= r.start && r.start + r.len <= e)
        });
        TABLE.for_each(|addr, len| self.view.add(addr, len, Origin::Malloc as u8));
    }

    /// Brings the `Maps` regions in line with `/proc/self/maps` (its text in `maps_text`).
    fn refresh_maps(&mut self, maps_text: &str, min_len: usize) {
        self.drain();
        let lines = maps::parse(maps_text);
        let (maps_now, others): (Vec<Region>, Vec<Region>) = self
            .view
            .iter()
            .partition(|r| r.origin == Origin::Maps as u8);
        // The shim's own memory is no program content: its .bss, and the glibc arena its client
        // thread allocates from (freed scratch buffers there look like duplicates and are
        // rewritten at once) — unless that arena is the main heap, which the program shares.
        let probe = ARENA_PROBE.load(Relaxed);
        let probe_in_heap = lines
            .iter()
            .any(|m| m.name == "[heap]" && (m.start..m.end).contains(&probe));
        let own = [
            &TABLE as *const _ as usize,
            &RING as *const _ as usize,
            &crate::cache::CACHE as *const _ as usize,
            if probe_in_heap { 0 } else { probe },
        ];
        let wanted = maps::candidates(&lines, &others, min_len, &own);
        let maps_origin = Origin::Maps as u8;
        for r in &maps_now {
            if wanted.contains(&(r.start, r.end())) {
                continue;
            }
            match wanted.iter().find(|w| w.0 == r.start) {
                Some(&(s, e)) => self.apply(Event {
                    kind: Kind::Resized,
                    origin: maps_origin,
                    start: s,
                    len: r.len,
                    new_start: s,
                    new_len: e - s,
                }),
                None => self.apply(Event {
                    kind: Kind::Removed,
                    origin: maps_origin,
                    start: r.start,
                    len: r.len,
                    new_start: 0,
                    new_len: 0,
                }),
            }
        }
        for &(s, e) in &wanted {
            if !maps_now.iter().any(|r| r.start == s) {
                self.apply(Event {
                    kind: Kind::Added,
                    origin: maps_origin,
                    start: s,
                    len: e - s,
                    new_start: 0,
                    new_len: 0,
                });
            }
        }
    }

    /// Queues a full resync of the view.
    fn queue_resync(&mut self) {
        RESYNCS.fetch_add(1, Relaxed);
        self.outbox.clear();
        let seq = self.next_seq();
        self.outbox.push(Message::ResyncBegin { seq });
        let regions: Vec<_> = self.view.iter().collect();
        for r in &regions {
            let seq = self.next_seq();
            self.outbox.push(Message::RegionAdded {
                seq,
                start: r.start as u64,
                len: r.len as u64,
                origin: origin_of(r.origin),
            });
        }
        let seq = self.next_seq();
        self.outbox.push(Message::ResyncEnd {
            seq,
            regions: regions.len() as u64,
        });
    }
}

fn origin_of(o: u8) -> Origin {
    match o {
        0 => Origin::Malloc,
        1 => Origin::Mmap,
        _ => Origin::Maps,
    }
}

/// How long the client thread waits before it does anything.
const START_DELAY: Duration = Duration::from_millis(20);

/// How often idle pieces of the freed-mapping cache are given back.
const CACHE_TRIM_INTERVAL: Duration = Duration::from_millis(1000);

/// How often the `Maps` regions are brought up to date.
const MAPS_INTERVAL: Duration = Duration::from_secs(5);

fn read_maps() -> String {
    std::fs::read_to_string("/proc/self/maps").unwrap_or_default()
}

/// `[start, end)` of every private anonymous writable mapping in `/proc/self/maps`.
fn anon_mappings() -> Vec<(usize, usize)> {
    let text = read_maps();
    maps::parse(&text)
        .iter()
        .filter(|m| maps::is_private_anon_rw(m))
        .map(|m| (m.start, m.end))
        .collect()
}

fn mark(start: usize, len: usize, advice: Advice) -> Status {
    let adv = match advice {
        Advice::Mergeable => libc::MADV_MERGEABLE,
        Advice::Unmergeable => libc::MADV_UNMERGEABLE,
    };
    MADVISE_CALLS.fetch_add(1, Relaxed);
    // SAFETY: MADV_(UN)MERGEABLE never changes the contents the program sees; on a range that is
    // no longer mapped the kernel returns ENOMEM.
    if unsafe { libc::madvise(start as *mut _, len, adv) } == 0 {
        Status::Ok
    } else {
        Status::Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Hash of one page of our own memory, read through `mem` (an fd of `/proc/self/mem`).
/// `NotResident` pages are never read, so never faulted in.
///
/// Not `process_vm_readv`: it pins the page (FOLL_PIN), and pinning a KSM page unshares it,
/// so every fingerprint would undo a merge. A read of `/proc/self/mem` does not; and on a page
/// unmapped since `mincore` it fails with EIO instead of faulting.
fn fingerprint_page(mem: i32, addr: usize, buf: &mut [u8; PAGE]) -> PageHash {
    let mut vec = 0u8;
    // SAFETY: mincore writes one byte for one page into `vec`; an unmapped page gives ENOMEM.
    if unsafe { libc::mincore(addr as *mut _, PAGE, &mut vec) } != 0 {
        return PageHash::Unavailable;
    }
    if vec & 1 == 0 {
        return PageHash::NotResident;
    }
    // SAFETY: pread writes at most PAGE bytes into buf.
    let n = unsafe { libc::pread(mem, buf.as_mut_ptr().cast(), PAGE, addr as libc::off_t) };
    if n != PAGE as isize {
        return PageHash::Unavailable;
    }
    PageHash::Hash(page_hash(&buf[..]))
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `[start, start+len)` lies inside one live registered region (the view brought up to date).
fn registered(start: usize, len: usize) -> bool {
    let mut g = STATE.lock();
    let st = g.state();
    st.drain();
    st.view.containing(start, len).is_some()
}

/// The resident page runs of `[start, start+len)` from `mincore`, in chunks, at most
/// `MAX_RESIDENCY_RUNS` of them: `(status, bytes covered, runs)`.
fn resident_runs(start: usize, len: usize) -> (Status, usize, Vec<(u64, u64)>) {
    const CHUNK_PAGES: usize = 64 * 1024;
    let mut vec = vec![0u8; CHUNK_PAGES];
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut at = start;
    let end = start + len;
    while at < end {
        let n = ((end - at) / PAGE).min(CHUNK_PAGES);
        // SAFETY: mincore writes one byte per page of [at, at + n pages) into vec (n ≤ its len).
        if unsafe { libc::mincore(at as *mut _, n * PAGE, vec.as_mut_ptr()) } != 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return (Status::Errno(e), at - start, runs);
        }
        for (i, &b) in vec[..n].iter().enumerate() {
            if b & 1 == 0 {
                continue;
            }
            let page = (at + i * PAGE) as u64;
            if let Some((s, l)) = runs.last_mut() {
                if *s + *l == page {
                    *l += PAGE as u64;
                    continue;
                }
            }
            if runs.len() == MAX_RESIDENCY_RUNS {
                return (Status::Ok, page as usize - start, runs);
            }
            runs.push((page, PAGE as u64));
        }
        at += n * PAGE;
    }
    (Status::Ok, len, runs)
}

/// Executes one agent command; `None` for messages that need no reply.
fn execute(msg: Message) -> Option<Message> {
    match msg {
        Message::Fingerprint { id, pages } => {
            if pages.len() > MAX_FINGERPRINT_PAGES {
                return Some(Message::FingerprintReply {
                    id,
                    status: Status::Invalid,
                    hashes: Vec::new(),
                });
            }
            let valid: Vec<bool> = {
                let mut g = STATE.lock();
                let st = g.state();
                st.drain();
                pages
                    .iter()
                    .map(|&p| {
                        let p = p as usize;
                        p & PAGE_MASK == 0 && st.view.containing(p, PAGE).is_some()
                    })
                    .collect()
            };
            let mut buf = [0u8; PAGE];
            // SAFETY: opening a constant path; the fd is closed below.
            let mem =
                unsafe { libc::open(c"/proc/self/mem".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            let hashes: Vec<PageHash> = pages
                .iter()
                .zip(valid)
                .map(|(&p, ok)| {
                    if ok {
                        FINGERPRINT_PAGES.fetch_add(1, Relaxed);
                        fingerprint_page(mem, p as usize, &mut buf)
                    } else {
                        PageHash::Unavailable
                    }
                })
                .collect();
            if mem >= 0 {
                // SAFETY: closing the fd opened above.
                unsafe { libc::close(mem) };
            }
            Some(Message::FingerprintReply {
                id,
                status: Status::Ok,
                hashes,
            })
        }
        Message::Madvise {
            id,
            start,
            len,
            advice,
        } => {
            let (start, len) = (start as usize, len as usize);
            let status = if start & PAGE_MASK != 0 || len == 0 || len & PAGE_MASK != 0 {
                Status::Invalid
            } else if !registered(start, len) {
                Status::NotRegistered
            } else {
                mark(start, len, advice)
            };
            Some(Message::Reply { id, status })
        }
        Message::Residency { id, start, len } => {
            let (start, len) = (start as usize, len as usize);
            let (status, covered, runs) =
                if start & PAGE_MASK != 0 || len == 0 || len & PAGE_MASK != 0 {
                    (Status::Invalid, 0, Vec::new())
                } else if !registered(start, len) {
                    (Status::NotRegistered, 0, Vec::new())
                } else {
                    resident_runs(start, len)
                };
            Some(Message::ResidencyReply {
                id,
                status,
                covered: covered as u64,
                runs,
            })
        }
        Message::GetStats { id } => {
            let (regions, bytes) = {
                let mut g = STATE.lock();
                let st = g.state();
                st.drain();
                (st.view.len() as u64, st.view.bytes() as u64)
            };
            Some(Message::StatsReply {
                id,
                stats: ShimStats {
                    regions,
                    region_bytes: bytes,
                    events_sent: EVENTS_SENT.load(Relaxed),
                    events_dropped: DROPPED.load(Relaxed),
                    resyncs: RESYNCS.load(Relaxed),
                    fingerprint_pages: FINGERPRINT_PAGES.load(Relaxed),
                    madvise_calls: MADVISE_CALLS.load(Relaxed),
                    registry_full: REGISTRY_FULL.load(Relaxed),
                    thread_cpu_ns: thread_cpu_ns(),
                },
            })
        }
        _ => None,
    }
}

/// A fresh wake-up eventfd, published for the hooks.
fn new_wake_fd() -> Option<OwnFd> {
    // SAFETY: eventfd has no memory preconditions.
    let fd = OwnFd::adopt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    WAKE_FD.store(fd.raw(), Release);
    Some(fd)
}

/// The client thread's body.
fn run(cfg: &'static Config) {
    // Most processes that live less than this (a shell's `ls`, `cat`, `true`) would only pay for
    // a connection they never use.
    std::thread::sleep(START_DELAY);
    // A small allocation made by this thread lands in the arena glibc gave it; it lives as long
    // as the thread (leaked on purpose: one per process).
    let probe: &'static mut [u8; 64] = Box::leak(Box::new([0u8; 64]));
    ARENA_PROBE.store(probe.as_ptr() as usize, Relaxed);
    let Some(mut wake) = new_wake_fd() else {
        log("cannot create an eventfd; going dormant");
        go_dormant();
        return;
    };
    {
        let mut g = STATE.lock();
        let st = g.state();
        st.madvise_all = cfg.madvise_all;
        st.forwarding = false;
        st.outbox.clear();
    }
    let mut conn: Option<Conn> = None;
    let mut backoff = Duration::from_millis(100);
    let mut next_attempt = Instant::now();
    let mut warned = false;
    let mut cover_maps = cfg.cover_maps;
    let mut next_maps = Instant::now();
    let mut next_trim = Instant::now() + CACHE_TRIM_INTERVAL;
    loop {
        // Idle freed memory goes back to the kernel.
        if Instant::now() >= next_trim {
            crate::cache::CACHE.trim();
            next_trim = Instant::now() + CACHE_TRIM_INTERVAL;
        }
        // 0. Keep the `Maps` regions current.
        if cover_maps && Instant::now() >= next_maps {
            let text = read_maps();
            STATE.lock().state().refresh_maps(&text, cfg.min_region);
            next_maps = Instant::now() + MAPS_INTERVAL;
        }
        // 1. Registry events (and a rebuild after lost events) into the view and the outbox.
        let out = {
            let mut g = STATE.lock();
            let st = g.state();
            if NEED_RESYNC.swap(false, AcqRel) {
                st.rebuild();
                if st.forwarding {
                    st.queue_resync();
                }
            }
            st.drain();
            std::mem::take(&mut st.outbox)
        };
        if let (Some(c), false) = (conn.as_mut(), out.is_empty()) {
            let mut bytes = Vec::new();
            for m in &out {
                m.encode(&mut bytes);
            }
            if let Err(e) = c.send_all(&bytes) {
                log(&format!("agent connection lost while sending: {e}"));
                disconnect(conn.take());
                next_attempt = Instant::now() + backoff;
            } else {
                EVENTS_SENT.fetch_add(out.len() as u64, Relaxed);
            }
        }
        // 2. Connect when due.
        if conn.is_none() && !cfg.madvise_all && Instant::now() >= next_attempt {
            match Conn::open(cfg) {
                Ok((c, flags)) => {
                    log(&format!("connected to {}", cfg.socket));
                    warned = false;
                    SOCK_FD.store(c.fd.raw(), Release);
                    backoff = Duration::from_millis(100);
                    cover_maps = cfg.cover_maps || flags & track_flags::COVER_MAPS != 0;
                    let maps_text = cover_maps.then(read_maps).unwrap_or_default();
                    next_maps = Instant::now() + MAPS_INTERVAL;
                    let mut g = STATE.lock();
                    let st = g.state();
                    st.drain();
                    st.forwarding = true;
                    st.madvise_all = flags & track_flags::MADVISE_ALL != 0;
                    if cover_maps {
                        st.refresh_maps(&maps_text, cfg.min_region);
                    }
                    if st.madvise_all {
                        let all: Vec<_> = st.view.iter().collect();
                        for r in all {
                            mark(r.start, r.len, Advice::Mergeable);
                        }
                    }
                    st.queue_resync();
                    conn = Some(c);
                    continue;
                }
                Err(ConnectError::Ignored) => {
                    log("agent says ignore: going dormant");
                    wake.release();
                    go_dormant();
                    return;
                }
                Err(e) => {
                    if !warned {
                        warned = true;
                        log(&match e {
                            ConnectError::PeerUid(uid) => format!(
                                "refusing agent socket {}: its peer is uid {uid}",
                                cfg.socket
                            ),
                            ConnectError::Io(e) => {
                                format!("cannot reach agent at {}: {e}", cfg.socket)
                            }
                            ConnectError::Protocol(m) => format!("agent at {}: {m}", cfg.socket),
                            ConnectError::Ignored => "agent said ignore".to_owned(),
                        });
                    }
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // 3. Sleep until an event, a command, or the next connection attempt.
        let mut wake_at = match &conn {
            Some(_) => Instant::now() + Duration::from_secs(5),
            None if cfg.madvise_all => Instant::now() + Duration::from_secs(5),
            None => next_attempt,
        };
        if cover_maps {
            wake_at = wake_at.min(next_maps);
        }
        if crate::cache::CACHE.bytes() > 0 {
            wake_at = wake_at.min(next_trim);
        }
        let timeout = wake_at
            .saturating_duration_since(Instant::now())
            .as_millis()
            .clamp(1, 5000) as i32;
        CONSUMER_WAITING.store(true, SeqCst);
        if !RING.is_empty() || NEED_RESYNC.load(SeqCst) {
            CONSUMER_WAITING.store(false, SeqCst);
            continue;
        }
        let mut fds = [
            libc::pollfd {
                fd: wake.raw(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: conn.as_ref().map_or(-1, |c| c.fd.raw()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two live pollfds (fd -1 is ignored by the kernel).
        unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        CONSUMER_WAITING.store(false, SeqCst);
        if fds[0].revents != 0 {
            if fds[0].revents & libc::POLLNVAL != 0 || !wake.still_ours() {
                // The program closed our eventfd: forget that number and make a new one.
                WAKE_FD.store(-1, Release);
                match new_wake_fd() {
                    Some(w) => wake = w,
                    None => {
                        log("cannot recreate the eventfd; going dormant");
                        disconnect(conn.take());
                        go_dormant();
                        return;
                    }
                }
            } else {
                let mut v = 0u64;
                // SAFETY: reading 8 bytes into a live u64 clears the eventfd counter.
                unsafe { libc::read(wake.raw(), (&mut v as *mut u64).cast(), 8) };
            }
        }
        // 4. Commands from the agent.
        if fds[1].revents != 0 {
            if let Some(c) = conn.as_mut() {
                if let Err(why) = serve(c) {
                    log(&format!("agent connection closed: {why}"));
                    disconnect(conn.take());
                    backoff = Duration::from_millis(100);
                    next_attempt = Instant::now() + backoff;
                }
            }
        }
    }
}

/// Reads what the agent sent and answers each command. `Err` closes the connection.
fn serve(c: &mut Conn) -> Result<(), String> {
    if !c.fd.still_ours() {
        return Err("the program closed or reused our socket's descriptor".into());
    }
    let open = c.receive().map_err(|e| e.to_string())?;
    loop {
        let msg = match c.frames.next_message() {
            Ok(Some(m)) => m,
            Ok(None) if open => return Ok(()),
            Ok(None) => return Err("end of stream".into()),
            Err(e) => return Err(format!("bad frame: {e}")),
        };
        if let Message::Ignore = msg {
            return Err("agent now says ignore".into());
        }
        if let Some(reply) = execute(msg) {
            c.send_all(&reply.to_frame()).map_err(|e| e.to_string())?;
        }
    }
}

fn disconnect(conn: Option<Conn>) {
    SOCK_FD.store(-1, Release);
    if let Some(c) = conn {
        c.close();
    }
    let mut g = STATE.lock();
    let st = g.state();
    st.forwarding = false;
    st.outbox.clear();
}

/// Pure pass-through from now on: new allocations go to glibc; existing shim blocks stay valid.
fn go_dormant() {
    THRESHOLD.store(usize::MAX, Release);
    DORMANT.store(true, Release);
    // Nobody will trim the cache any more: empty it (two trims release every piece).
    crate::cache::CACHE.trim();
    crate::cache::CACHE.trim();
    ACTIVE.store(false, Release);
    let mut g = STATE.lock();
    let st = g.state();
    st.forwarding = false;
    st.outbox.clear();
    st.view = View::default();
    while RING.pop().is_some() {}
}

extern "C" fn thread_main(_: *mut libc::c_void) -> *mut libc::c_void {
    if let Some(cfg) = CONFIG.get() {
        if std::panic::catch_unwind(|| run(cfg)).is_err() {
            log("client thread failed; going dormant");
            go_dormant();
        }
    }
    core::ptr::null_mut()
}

/// Starts the client thread with every signal blocked.
fn spawn_thread() -> bool {
    // SAFETY: sigset/pthread calls on live stack values; the old mask is restored right after.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut tid: libc::pthread_t = 0;
        let r = libc::pthread_create(
            &mut tid,
            core::ptr::null(),
            thread_main,
            core::ptr::null_mut(),
        );
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        if r != 0 {
            return false;
        }
        libc::pthread_setname_np(tid, c"ksmplus".as_ptr());
        libc::pthread_detach(tid);
    }
    true
}

extern "C" fn fork_prepare() {
    if ACTIVE.load(Acquire) {
        STATE.acquire();
        FORK_HELD.store(true, Relaxed);
        // SAFETY: we hold the lock (acquired just above) until fork_parent / fork_child.
        if let Some(st) = unsafe { &mut *STATE.state.get() } {
            st.drain();
        }
    }
}

extern "C" fn fork_parent() {
    if FORK_HELD.swap(false, Relaxed) {
        STATE.release();
    }
}

extern "C" fn fork_child() {
    if !FORK_HELD.swap(false, Relaxed) {
        return;
    }
    // SAFETY: we still hold the lock taken in fork_prepare, and this is the only thread.
    if let Some(st) = unsafe { &mut *STATE.state.get() } {
        st.drain();
        st.outbox.clear();
        st.forwarding = false;
        st.seq = 0;
    }
    RING.reset();
    NEED_RESYNC.store(false, Relaxed);
    CONSUMER_WAITING.store(false, Relaxed);
    for fd in [SOCK_FD.swap(-1, AcqRel), WAKE_FD.swap(-1, AcqRel)] {
        if fd >= 0 {
            // SAFETY: these fds belong to the parent's client thread, which does not exist here.
            unsafe { libc::close(fd) };
        }
    }
    STATE.release();
    if !spawn_thread() {
        go_dormant();
    }
}

fn env(name: &core::ffi::CStr) -> Option<String> {
    // SAFETY: getenv returns null or a NUL-terminated string owned by the environment; it is
    // copied before anything can change the environment (we run in the library constructor).
    let p = unsafe { libc::getenv(name.as_ptr()) };
    (!p.is_null()).then(|| {
        // SAFETY: non-null getenv result is a valid C string.
        unsafe { core::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    })
}

/// Library constructor: read the environment, then switch the hooks on and start the client.
pub fn init() {
    if env(c"KSMPLUS_DISABLE").is_some_and(|v| v != "0" && !v.is_empty()) {
        return;
    }
    let log_on = env(c"KSMPLUS_LOG").is_some_and(|v| v != "0" && !v.is_empty());
    // SAFETY: sysconf has no preconditions.
    if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != PAGE as libc::c_long {
        if log_on {
            let m = b"ksmplus: page size is not 4096; staying disabled\n";
            // SAFETY: writing a static buffer to fd 2.
            unsafe { libc::write(2, m.as_ptr().cast(), m.len()) };
        }
        return;
    }
    let mut bad_min = None;
    let min_region = match env(c"KSMPLUS_MIN_REGION") {
        None => 64 * 1024,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= PAGE => n,
            _ => {
                bad_min = Some(v);
                64 * 1024
            }
        },
    };
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let socket = env(c"KSMPLUS_SOCKET")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            ksmplus_common::default_socket_path(env(c"XDG_RUNTIME_DIR").as_deref(), uid)
                .to_string_lossy()
                .into_owned()
        });
    let flag = |name: &core::ffi::CStr| env(name).is_some_and(|v| v != "0" && !v.is_empty());
    let madvise_all = flag(c"KSMPLUS_MADVISE_ALL");
    let cover_maps = flag(c"KSMPLUS_COVER_MAPS");
    if CONFIG
        .set(Config {
            socket,
            min_region,
            log: log_on,
            madvise_all,
            cover_maps,
        })
        .is_err()
    {
        return;
    }
    if let Some(v) = bad_min {
        log(&format!(
            "KSMPLUS_MIN_REGION={v:?} is not a size in bytes >= {PAGE}; using 65536"
        ));
    }
    // SAFETY: dlsym with a static name; RTLD_NEXT finds glibc's definition behind ours.
    let real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) };
    crate::REAL_USABLE_SIZE.store(real as usize, Release);
    // SAFETY: registering three extern "C" handlers with no preconditions.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    DORMANT.store(false, Release);
    ACTIVE.store(true, Release);
    THRESHOLD.store(min_region, Release);
    if !spawn_thread() {
        log("cannot start the client thread; going dormant");
        go_dormant();
    }
}
