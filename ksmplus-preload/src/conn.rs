//! The client thread's file descriptors: the agent socket and the wake-up eventfd.
//!
//! Invariants: both are moved to a high fd number (the program's own opens take the lowest free
//! number, so they do not land on ours) and are checked by identity (`fstat` dev/inode) before
//! every write and before closing: a program that closes descriptors it does not know about
//! (`closefrom`, `close_range`) may have reused the number, and then it is no longer ours to
//! write to or close. Socket writes use `MSG_NOSIGNAL`: no SIGPIPE.

use crate::client::Config;
use crate::sys::PAGE;
use ksmplus_common::{FrameReader, Hello, Message};
use std::io;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

pub struct OwnFd {
    fd: i32,
    id: (u64, u64),
}

fn identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat writes into a zeroed, live stat struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; a closed fd gives EBADF.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

impl OwnFd {
    /// Takes ownership of `fd`, moving it high.
    pub fn adopt(fd: i32) -> Option<OwnFd> {
        if fd < 0 {
            return None;
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a live struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        let floor = (lim.rlim_cur.min(1024) as i32 - 64).max(3);
        // SAFETY: duplicating an fd we own to a free number ≥ floor.
        let hi = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
        let fd = if hi >= 0 {
            // SAFETY: fd is ours and now duplicated.
            unsafe { libc::close(fd) };
            hi
        } else {
            fd
        };
        let id = identity(fd)?;
        Some(OwnFd { fd, id })
    }

    pub fn raw(&self) -> i32 {
        self.fd
    }

    /// Still the descriptor we opened (not closed and reused by the program).
    pub fn still_ours(&self) -> bool {
        identity(self.fd) == Some(self.id)
    }

    /// Closes the fd if it is still ours; otherwise only forgets the number.
    pub fn release(self) {
        if self.still_ours() {
            // SAFETY: the identity check says this number is still our descriptor.
            unsafe { libc::close(self.fd) };
        }
    }
}

/// A connection to the agent that has said `Track`.
pub struct Conn {
    pub fd: OwnFd,
    pub frames: FrameReader,
}

#[derive(Debug)]
pub enum ConnectError {
    Io(io::Error),
    PeerUid(u32),
    Ignored,
    Protocol(String),
}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Io(e)
    }
}

fn hello(cfg: &Config) -> Hello {
    let comm = std::fs::read_to_string("/proc/self/comm")
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default();
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    // SAFETY: these getters have no preconditions.
    let (pid, ppid, uid) = unsafe { (libc::getpid(), libc::getppid(), libc::getuid()) };
    Hello {
        pid: pid as u32,
        ppid: ppid as u32,
        uid,
        page_size: PAGE as u32,
        min_region: cfg.min_region as u64,
        comm,
        exe,
    }
}

fn poll_fd(fd: i32, events: i16, timeout_ms: i32) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: poll on one live pollfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) };
    p.revents
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl Conn {
    /// Connects, checks the peer's uid, says Hello and reads the verdict: the `Track` flags.
    pub fn open(cfg: &Config) -> Result<(Conn, u32), ConnectError> {
        let s = UnixStream::connect(&cfg.socket)?;
        s.set_nonblocking(true)?;
        let fd = OwnFd::adopt(s.into_raw_fd())
            .ok_or_else(|| ConnectError::Protocol("socket vanished".into()))?;
        let mut conn = Conn {
            fd,
            frames: FrameReader::new(),
        };
        match conn.handshake(cfg) {
            Ok(flags) => Ok((conn, flags)),
            Err(e) => {
                conn.close();
                Err(e)
            }
        }
    }

    fn handshake(&mut self, cfg: &Config) -> Result<u32, ConnectError> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`.
        let r = unsafe {
            libc::getsockopt(
                self.fd.raw(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(last_err().into());
        }
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        if cred.uid != me && cred.uid != 0 {
            return Err(ConnectError::PeerUid(cred.uid));
        }
        self.send_all(&Message::Hello(hello(cfg)).to_frame())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.frames.next_message() {
                Ok(Some(Message::Track { flags })) => return Ok(flags),
                Ok(Some(Message::Ignore)) => return Err(ConnectError::Ignored),
                Ok(Some(other)) => {
                    return Err(ConnectError::Protocol(format!(
                        "unexpected first reply {other:?}"
                    )))
                }
                Ok(None) => {}
                Err(e) => return Err(ConnectError::Protocol(e.to_string())),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnectError::Protocol("no answer to Hello".into()));
            }
            poll_fd(self.fd.raw(), libc::POLLIN, left.as_millis() as i32 + 1);
            if !self.receive()? {
                return Err(ConnectError::Protocol("agent closed the connection".into()));
            }
        }
    }

    /// Reads whatever is available into the frame buffer. `Ok(false)` at end of stream.
    pub fn receive(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            // SAFETY: recv writes at most buf.len() bytes into buf.
            let n = unsafe {
                libc::recv(
                    self.fd.raw(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return Ok(false),
                n if n > 0 => self.frames.push(&buf[..n as usize]),
                _ => {
                    let e = last_err();
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Ok(true),
                        io::ErrorKind::Interrupted => continue,
                        _ => Err(e),
                    };
                }
            }
        }
    }

    /// Writes a whole buffer, waiting for room up to a deadline.
    pub fn send_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        if !self.fd.still_ours() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the program closed or reused our socket's descriptor",
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !buf.is_empty() {
            // SAFETY: send reads at most buf.len() bytes from buf.
            let n = unsafe {
                libc::send(
                    self.fd.raw(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                buf = &buf[n as usize..];
                continue;
            }
            let e = last_err();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    poll_fd(self.fd.raw(), libc::POLLOUT, 100);
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
        Ok(())
    }

    pub fn close(self) {
        self.fd.release();
    }
}
