//! Running workloads with deadlines: [`run`] for batch programs, [`Interactive`] for programs
//! driven line by line through stdin/stdout (e.g. `tests/c/shim_driver.c`).
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use wait_timeout::ChildExt;

/// The outcome of [`run`].
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl RunOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Starts `cmd` with piped stdin, stdout and stderr; panics naming it when it cannot start.
fn spawn_piped(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_retrying(cmd).unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// `cmd.output()` with [`spawn_retrying`]'s patience for ETXTBSY.
pub fn output_retrying(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_retrying(cmd)?.wait_with_output()
}

/// `cmd.spawn()`, tried again for up to 5 s while exec says ETXTBSY. A test that copies a
/// program and runs it gets that when another test thread forks while the copy's descriptor
/// is still open: the fork child holds it for write until it execs.
pub fn spawn_retrying(cmd: &mut Command) -> std::io::Result<Child> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

/// Runs `cmd` with `stdin` as its input, killing it (and panicking with what it printed) if it has
/// not exited within `timeout`.
pub fn run(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> RunOutput {
    let started = Instant::now();
    let mut child = spawn_piped(cmd);
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = match child.wait_timeout(timeout).expect("wait") {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let o = out.join().unwrap_or_default();
            let e = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {timeout:?} (killed)\nstdout: {}\nstderr: {}",
                tail(&o),
                tail(&e)
            );
        }
    };
    let _ = feeder.join();
    RunOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

/// The last 4 KiB of some output, lossily decoded (for failure messages).
pub fn tail(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[b.len().saturating_sub(4096)..]).into_owned()
}

/// A running program driven through stdin and read line by line from stdout, with deadlines.
/// Killed on drop if still running.
pub struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    what: String,
}

impl Interactive {
    /// Spawns `cmd` with piped stdin/stdout/stderr.
    pub fn spawn(cmd: &mut Command) -> Interactive {
        let what = format!("{cmd:?}");
        let mut child = spawn_piped(cmd);
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (mut err, buf) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Interactive {
            child,
            stdin,
            lines,
            stderr,
            what,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the program wrote on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// The next stdout line; panics (with stderr) if none comes within `timeout`.
    pub fn line(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!(
                "{}: no output line within {timeout:?}; stderr: {}",
                self.what,
                self.stderr()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let st = self
                    .child
                    .wait_timeout(Duration::from_secs(5))
                    .ok()
                    .flatten();
                panic!(
                    "{}: stdout closed (exit status {st:?}); stderr: {}",
                    self.what,
                    self.stderr()
                )
            }
        }
    }

    /// Writes `cmd` and a newline to stdin and returns the next stdout line.
    pub fn cmd(&mut self, cmd: &str, timeout: Duration) -> String {
        let w = self.stdin.as_mut().expect("stdin already closed");
        writeln!(w, "{cmd}")
            .and_then(|_| w.flush())
            .unwrap_or_else(|e| {
                panic!(
                    "{}: write {cmd:?}: {e}; stderr: {}",
                    self.what,
                    self.stderr()
                )
            });
        self.line(timeout)
    }

    /// Closes stdin, waits for the exit within `timeout` (kill + panic otherwise), and returns
    /// the exit status and the remaining stdout lines.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        drop(self.stdin.take());
        let status = match self.child.wait_timeout(timeout).expect("wait") {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{}: did not exit within {timeout:?} after stdin closed (killed); stderr: {}",
                    self.what,
                    self.stderr()
                );
            }
        };
        let mut rest = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            rest.push(l);
        }
        (status, rest)
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
