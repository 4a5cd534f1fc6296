//! The harness agent: a stand-in for `ksmplus-agentd` that listens on a unix socket, accepts shim
//! clients, records every message each one sends, answers `Hello` with a configurable
//! [`HelloAnswer`], and lets a test send commands and wait (with deadlines) for replies or for
//! any condition on what it has recorded.
//!
//! Dropping a `HarnessAgent` is "the agent dies": the listening socket is closed and unlinked and
//! every client connection is shut down, so shims see end-of-stream and start reconnecting.
use ksmplus_common::protocol::{Advice, Hello, Message, Origin, PageHash, ShimStats, Status};
use ksmplus_common::{read_message, write_message};
use std::collections::BTreeMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the harness answers to a shim's `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloAnswer {
    /// `Track{flags}`.
    Track(u32),
    /// `Ignore`: the shim goes dormant.
    Ignore,
    /// No answer at all (the shim must keep the program running regardless).
    Silent,
}

/// Credentials of a connected peer (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
}

/// Everything known about one accepted connection.
#[derive(Clone, Debug)]
pub struct ClientRecord {
    /// Index in [`AgentState::clients`] (accept order).
    pub index: usize,
    pub peer: Option<PeerCred>,
    /// The `Hello`, once received.
    pub hello: Option<Hello>,
    /// Every message this client sent, in order, `Hello` included.
    pub messages: Vec<Message>,
    /// False once the stream ended or failed.
    pub connected: bool,
    /// Why the stream ended, if it ended with an error (decode error, reset).
    pub error: Option<String>,
}

/// A region in a client's view: `start -> (len, origin)`.
pub type RegionMap = BTreeMap<u64, (u64, Origin)>;

/// A region as `(start, len, origin)`.
pub type Region = (u64, u64, Origin);

impl ClientRecord {
    /// The pid from `Hello`.
    pub fn pid(&self) -> Option<u32> {
        self.hello.as_ref().map(|h| h.pid)
    }

    /// This client's live regions as an agent following the protocol would see them now:
    /// `ResyncBegin` clears, `RegionAdded` inserts, `RegionRemoved` cuts a range (possibly
    /// splitting a region in two), `RegionResized` moves/resizes one.
    pub fn regions(&self) -> RegionMap {
        let mut map = RegionMap::new();
        for m in &self.messages {
            apply_event(&mut map, m);
        }
        map
    }

    /// The regions of the last *complete* resync (`ResyncBegin` .. `ResyncEnd`), with the count the
    /// shim announced in `ResyncEnd`, or `None` if no resync has completed.
    pub fn last_resync(&self) -> Option<(Vec<Region>, u64)> {
        let end = self
            .messages
            .iter()
            .rposition(|m| matches!(m, Message::ResyncEnd { .. }))?;
        let begin = self.messages[..end]
            .iter()
            .rposition(|m| matches!(m, Message::ResyncBegin { .. }))?;
        let regions = self.messages[begin..end]
            .iter()
            .filter_map(|m| match m {
                Message::RegionAdded {
                    start, len, origin, ..
                } => Some((*start, *len, *origin)),
                _ => None,
            })
            .collect();
        let Message::ResyncEnd { regions: n, .. } = self.messages[end] else {
            unreachable!()
        };
        Some((regions, n))
    }

    /// How many `ResyncEnd` this client sent.
    pub fn resyncs_completed(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| matches!(m, Message::ResyncEnd { .. }))
            .count()
    }

    /// The reply (of any kind) carrying command id `id`.
    pub fn reply(&self, id: u32) -> Option<&Message> {
        self.messages.iter().find(|m| match m {
            Message::Reply { id: i, .. }
            | Message::FingerprintReply { id: i, .. }
            | Message::StatsReply { id: i, .. }
            | Message::ResidencyReply { id: i, .. } => *i == id,
            _ => false,
        })
    }

    /// The live region containing `addr`, as `(start, len, origin)`.
    pub fn region_containing(&self, addr: u64) -> Option<Region> {
        let map = self.regions();
        let (&start, &(len, origin)) = map.range(..=addr).next_back()?;
        (addr < start + len).then_some((start, len, origin))
    }

    /// Sequence numbers of every event message, in arrival order.
    pub fn seqs(&self) -> Vec<u64> {
        self.messages.iter().filter_map(event_seq).collect()
    }
}

/// The `seq` of an event message.
pub fn event_seq(m: &Message) -> Option<u64> {
    match m {
        Message::RegionAdded { seq, .. }
        | Message::RegionRemoved { seq, .. }
        | Message::RegionResized { seq, .. }
        | Message::ResyncBegin { seq }
        | Message::ResyncEnd { seq, .. } => Some(*seq),
        _ => None,
    }
}

/// Applies one shim event to a region view (non-events are ignored).
pub fn apply_event(map: &mut RegionMap, m: &Message) {
    match *m {
        Message::ResyncBegin { .. } => map.clear(),
        Message::RegionAdded {
            start, len, origin, ..
        } => {
            map.insert(start, (len, origin));
        }
        Message::RegionRemoved { start, len, .. } => cut(map, start, start + len),
        Message::RegionResized {
            origin,
            old_start,
            old_len,
            new_start,
            new_len,
            ..
        } => {
            cut(map, old_start, old_start + old_len);
            map.insert(new_start, (new_len, origin));
        }
        _ => {}
    }
}

fn cut(map: &mut RegionMap, a: u64, b: u64) {
    let hit: Vec<(u64, u64, Origin)> = map
        .range(..b)
        .filter(|(&s, &(l, _))| s + l > a)
        .map(|(&s, &(l, o))| (s, l, o))
        .collect();
    for (s, l, o) in hit {
        map.remove(&s);
        if s < a {
            map.insert(s, (a - s, o));
        }
        if s + l > b {
            map.insert(b, (s + l - b, o));
        }
    }
}

/// Everything the harness has recorded.
#[derive(Debug, Default)]
pub struct AgentState {
    pub clients: Vec<ClientRecord>,
}

impl AgentState {
    /// The most recent client whose `Hello` carries `pid`.
    pub fn client_of_pid(&self, pid: u32) -> Option<&ClientRecord> {
        self.clients.iter().rev().find(|c| c.pid() == Some(pid))
    }

    /// Every client whose `Hello` carries `pid`, oldest first.
    pub fn clients_of_pid(&self, pid: u32) -> Vec<&ClientRecord> {
        self.clients
            .iter()
            .filter(|c| c.pid() == Some(pid))
            .collect()
    }

    /// A one-line-per-client summary, for failure messages.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for c in &self.clients {
            let regions = c.regions();
            s += &format!(
                "client {} peer={:?} hello={:?} connected={} error={:?} msgs={} regions={:x?}\n",
                c.index,
                c.peer,
                c.hello.as_ref().map(|h| (h.pid, &h.comm)),
                c.connected,
                c.error,
                c.messages.len(),
                regions.iter().take(20).collect::<Vec<_>>()
            );
        }
        s
    }
}

struct Shared {
    state: Mutex<AgentState>,
    changed: Condvar,
    answer: Mutex<HelloAnswer>,
    /// Write halves, by client index.
    writers: Mutex<Vec<Option<UnixStream>>>,
    stop: AtomicBool,
}

/// A unix-socket agent for tests. See the module documentation.
pub struct HarnessAgent {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    next_id: AtomicU32,
}

impl HarnessAgent {
    /// Listens on `agent.sock` in a fresh temporary directory, answering `Track{flags: 0}`.
    pub fn start() -> HarnessAgent {
        let dir = tempfile::Builder::new()
            .prefix("ksmplus-harness-")
            .tempdir()
            .expect("create a temp dir for the harness socket");
        let path = dir.path().join("agent.sock");
        let mut a = HarnessAgent::start_at(&path);
        a._dir = Some(dir);
        a
    }

    /// Listens on `path` (a stale socket file there is removed first). The directory is not
    /// removed on drop; use this to restart an agent at the path of one that was dropped.
    pub fn start_at(path: &Path) -> HarnessAgent {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("bind harness socket {}: {e}", path.display()));
        let shared = Arc::new(Shared {
            state: Mutex::new(AgentState::default()),
            changed: Condvar::new(),
            answer: Mutex::new(HelloAnswer::Track(0)),
            writers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("harness-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .expect("spawn the accept thread");
        HarnessAgent {
            path: path.to_owned(),
            _dir: None,
            shared,
            accept: Some(accept),
            next_id: AtomicU32::new(1),
        }
    }

    /// Sets the answer to the next `Hello`s.
    pub fn set_answer(&self, a: HelloAnswer) {
        *self.shared.answer.lock().unwrap() = a;
    }

    /// The socket path, for `KSMPLUS_SOCKET`.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// A snapshot-able view of everything recorded so far (do not hold it across waits).
    pub fn state(&self) -> MutexGuard<'_, AgentState> {
        self.shared.state.lock().unwrap()
    }

    /// Waits until `f` returns `Some`, re-evaluating on every recorded message, at most `timeout`.
    pub fn try_wait_for<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&AgentState) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock().unwrap();
        loop {
            if let Some(v) = f(&st) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// [`try_wait_for`](Self::try_wait_for) that panics on timeout, naming `what` and dumping
    /// the recorded state.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&AgentState) -> Option<T>,
    ) -> T {
        match self.try_wait_for(timeout, f) {
            Some(v) => v,
            None => panic!(
                "harness agent: timed out after {timeout:?} waiting for {what}\n{}",
                self.state().summary()
            ),
        }
    }

    /// Waits for the `Hello` of `pid` and returns that client's index.
    pub fn wait_hello(&self, pid: u32, timeout: Duration) -> usize {
        self.wait_for(&format!("Hello from pid {pid}"), timeout, |s| {
            s.client_of_pid(pid).map(|c| c.index)
        })
    }

    /// Waits until the client `pid` has completed a resync (its initial registry is known).
    pub fn wait_synced(&self, pid: u32, timeout: Duration) -> usize {
        self.wait_for(&format!("a complete resync from pid {pid}"), timeout, |s| {
            s.client_of_pid(pid)
                .filter(|c| c.resyncs_completed() > 0)
                .map(|c| c.index)
        })
    }

    /// A fresh command id.
    pub fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a message to client `index`.
    pub fn send(&self, index: usize, m: &Message) -> std::io::Result<()> {
        let mut w = self.shared.writers.lock().unwrap();
        let s = w
            .get_mut(index)
            .and_then(|s| s.as_mut())
            .ok_or_else(|| std::io::Error::other(format!("no client {index}")))?;
        write_message(s, m)
    }

    /// Sends a command built from a fresh id and waits for the reply with that id.
    pub fn request(
        &self,
        index: usize,
        timeout: Duration,
        build: impl FnOnce(u32) -> Message,
    ) -> Message {
        let id = self.next_id();
        let m = build(id);
        self.send(index, &m)
            .unwrap_or_else(|e| panic!("send {m:?} to client {index}: {e}"));
        self.wait_for(&format!("the reply to {m:?}"), timeout, |s| {
            s.clients[index].reply(id).cloned()
        })
    }

    /// `Madvise` → the reply's status.
    pub fn madvise(
        &self,
        index: usize,
        start: u64,
        len: u64,
        advice: Advice,
        timeout: Duration,
    ) -> Status {
        match self.request(index, timeout, |id| Message::Madvise {
            id,
            start,
            len,
            advice,
        }) {
            Message::Reply { status, .. } => status,
            other => panic!("unexpected reply to Madvise: {other:?}"),
        }
    }

    /// `Fingerprint` → `(status, hashes)`.
    pub fn fingerprint(
        &self,
        index: usize,
        pages: Vec<u64>,
        timeout: Duration,
    ) -> (Status, Vec<PageHash>) {
        match self.request(index, timeout, |id| Message::Fingerprint { id, pages }) {
            Message::FingerprintReply { status, hashes, .. } => (status, hashes),
            other => panic!("unexpected reply to Fingerprint: {other:?}"),
        }
    }

    /// `GetStats` → the shim's counters.
    pub fn stats(&self, index: usize, timeout: Duration) -> ShimStats {
        match self.request(index, timeout, |id| Message::GetStats { id }) {
            Message::StatsReply { stats, .. } => stats,
            other => panic!("unexpected reply to GetStats: {other:?}"),
        }
    }
}

impl Drop for HarnessAgent {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        for s in self.shared.writers.lock().unwrap().iter().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn peer_cred(s: &UnixStream) -> Option<PeerCred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(PeerCred {
        pid: cred.pid as u32,
        uid: cred.uid,
    })
}

fn accept_loop(listener: UnixListener, sh: Arc<Shared>) {
    for conn in listener.incoming() {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let Ok(writer) = stream.try_clone() else {
            continue;
        };
        let index = {
            let mut st = sh.state.lock().unwrap();
            let index = st.clients.len();
            st.clients.push(ClientRecord {
                index,
                peer: peer_cred(&stream),
                hello: None,
                messages: Vec::new(),
                connected: true,
                error: None,
            });
            sh.writers.lock().unwrap().push(Some(writer));
            index
        };
        sh.changed.notify_all();
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("harness-client-{index}"))
            .spawn(move || client_loop(stream, index, sh2));
        if spawned.is_err() {
            sh.state.lock().unwrap().clients[index].connected = false;
        }
    }
}

fn client_loop(mut stream: UnixStream, index: usize, sh: Arc<Shared>) {
    loop {
        let res = read_message(&mut stream);
        let mut st = sh.state.lock().unwrap();
        let c = &mut st.clients[index];
        match res {
            Ok(Some(m)) => {
                let answer = if let Message::Hello(h) = &m {
                    if c.hello.is_none() {
                        c.hello = Some(h.clone());
                    }
                    Some(*sh.answer.lock().unwrap())
                } else {
                    None
                };
                c.messages.push(m);
                drop(st);
                let reply = match answer {
                    Some(HelloAnswer::Track(flags)) => Some(Message::Track { flags }),
                    Some(HelloAnswer::Ignore) => Some(Message::Ignore),
                    _ => None,
                };
                if let Some(r) = reply {
                    if let Some(w) = sh.writers.lock().unwrap()[index].as_mut() {
                        let _ = write_message(w, &r);
                    }
                }
            }
            Ok(None) => {
                c.connected = false;
                break;
            }
            Err(e) => {
                c.connected = false;
                c.error = Some(e.to_string());
                break;
            }
        }
        sh.changed.notify_all();
    }
    sh.changed.notify_all();
    if let Some(w) = sh.writers.lock().unwrap()[index].take() {
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_view_follows_events() {
        let mut m = RegionMap::new();
        let add = |start, len| Message::RegionAdded {
            seq: 0,
            start,
            len,
            origin: Origin::Malloc,
        };
        apply_event(&mut m, &add(0x10000, 0x10000));
        apply_event(&mut m, &add(0x40000, 0x4000));
        apply_event(
            &mut m,
            &Message::RegionRemoved {
                seq: 1,
                start: 0x14000,
                len: 0x1000,
                origin: Origin::Malloc,
            },
        );
        let v: Vec<_> = m.iter().map(|(&s, &(l, _))| (s, l)).collect();
        assert_eq!(v, [(0x10000, 0x4000), (0x15000, 0xb000), (0x40000, 0x4000)]);
        apply_event(
            &mut m,
            &Message::RegionResized {
                seq: 2,
                origin: Origin::Mmap,
                old_start: 0x40000,
                old_len: 0x4000,
                new_start: 0x80000,
                new_len: 0x8000,
            },
        );
        assert_eq!(m.get(&0x80000), Some(&(0x8000, Origin::Mmap)));
        assert!(!m.contains_key(&0x40000));
        apply_event(&mut m, &Message::ResyncBegin { seq: 3 });
        assert!(m.is_empty());
    }

    #[test]
    fn harness_answers_hello_and_records() {
        let agent = HarnessAgent::start();
        let mut s = UnixStream::connect(agent.socket_path()).unwrap();
        let hello = Hello {
            pid: 4242,
            comm: "fake".into(),
            ..Default::default()
        };
        write_message(&mut s, &Message::Hello(hello)).unwrap();
        assert_eq!(
            read_message(&mut s).unwrap(),
            Some(Message::Track { flags: 0 })
        );
        write_message(&mut s, &Message::ResyncBegin { seq: 1 }).unwrap();
        write_message(&mut s, &Message::ResyncEnd { seq: 2, regions: 0 }).unwrap();
        let i = agent.wait_synced(4242, Duration::from_secs(5));
        // A command goes out and the reply is matched by id.
        let t = std::thread::spawn(move || {
            let Some(Message::GetStats { id }) = read_message(&mut s).unwrap() else {
                panic!("expected GetStats")
            };
            let stats = ShimStats {
                regions: 7,
                ..Default::default()
            };
            write_message(&mut s, &Message::StatsReply { id, stats }).unwrap();
            s
        });
        assert_eq!(agent.stats(i, Duration::from_secs(5)).regions, 7);
        let s = t.join().unwrap();
        drop(agent);
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!(
            (&s).read(&mut buf).unwrap(),
            0,
            "drop closes client streams"
        );
    }
}
