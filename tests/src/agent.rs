//! The harness agent: a stand-in for `ksmplus-agentd` that listens on a unix socket, records
//! every shim's Hello with the peer's credentials, and answers it as told ([`HelloAnswer`]) by
//! writing the verdict into the shim's channel page, as the agent does.
//!
//! Dropping a `HarnessAgent` closes and unlinks the socket.
use crate::channel::ShimChannel;
use ksmplus_common::channel::verdict;
use ksmplus_common::{read_message, Hello, Message};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the harness answers to a shim's `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloAnswer {
    /// Verdict TRACK.
    Track,
    /// Verdict IGNORE: the shim goes dormant.
    Ignore,
    /// No verdict (the shim must keep the program running regardless).
    Silent,
}

/// Credentials of a connected peer (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
}

/// One Hello.
#[derive(Clone, Debug)]
pub struct HelloRecord {
    pub peer: PeerCred,
    pub hello: Hello,
}

#[derive(Default, Debug)]
pub struct AgentState {
    /// Connections accepted.
    pub accepted: usize,
    pub hellos: Vec<HelloRecord>,
    /// Connections that ended without a valid Hello, with why.
    pub errors: Vec<String>,
}

impl AgentState {
    pub fn hellos_of(&self, pid: u32) -> Vec<&HelloRecord> {
        self.hellos.iter().filter(|h| h.peer.pid == pid).collect()
    }
}

type Shared = Arc<(Mutex<AgentState>, Condvar)>;

pub struct HarnessAgent {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
    state: Shared,
    answer: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HarnessAgent {
    /// A harness agent on a fresh socket in a temporary directory, answering Track.
    pub fn start() -> HarnessAgent {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let mut a = HarnessAgent::start_at(&path);
        a._dir = Some(dir);
        a
    }

    pub fn start_at(path: &Path) -> HarnessAgent {
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let state: Shared = Arc::default();
        let answer = Arc::new(AtomicU32::new(verdict::TRACK));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, ans, stp) = (state.clone(), answer.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stp.load(Ordering::SeqCst) {
                let (mut s, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let peer = {
                    let (pid, uid) =
                        ksmplus_agentd::server::socket::peer_cred(&s).unwrap_or((0, 0));
                    PeerCred { pid, uid }
                };
                let (lock, cv) = &*st;
                lock.lock().unwrap().accepted += 1;
                cv.notify_all();
                match read_message(&mut s, 64 * 1024) {
                    Ok(Some(Message::Hello(hello))) => {
                        let v = ans.load(Ordering::SeqCst);
                        if v != u32::MAX {
                            if let Some(ch) = ShimChannel::of(peer.pid) {
                                if ch.snapshot().nonce == hello.nonce {
                                    ch.set_verdict(v);
                                }
                            }
                        }
                        lock.lock()
                            .unwrap()
                            .hellos
                            .push(HelloRecord { peer, hello });
                    }
                    other => lock.lock().unwrap().errors.push(format!("{other:?}")),
                }
                cv.notify_all();
            }
        });
        HarnessAgent {
            path: path.to_owned(),
            _dir: None,
            state,
            answer,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set_answer(&self, a: HelloAnswer) {
        let v = match a {
            HelloAnswer::Track => verdict::TRACK,
            HelloAnswer::Ignore => verdict::IGNORE,
            HelloAnswer::Silent => u32::MAX,
        };
        self.answer.store(v, Ordering::SeqCst);
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    pub fn state(&self) -> MutexGuard<'_, AgentState> {
        self.state.0.lock().unwrap()
    }

    /// Waits (deadline) until `f` returns `Some` on the recorded state.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&AgentState) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap();
        loop {
            if let Some(v) = f(&g) {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} waiting for {what}; state: {g:?}"
            );
            g = cv
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .unwrap()
                .0;
        }
    }

    /// Waits for a Hello from `pid` and returns it.
    pub fn wait_hello(&self, pid: u32, timeout: Duration) -> HelloRecord {
        self.wait_for(&format!("a Hello from pid {pid}"), timeout, |s| {
            s.hellos_of(pid).first().map(|h| (*h).clone())
        })
    }
}

impl Drop for HarnessAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
