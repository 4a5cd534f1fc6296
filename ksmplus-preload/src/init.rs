//! The library constructor: configuration from the environment, the channel page, the wake-up
//! handler, and the one Hello to the agent.
//!
//! Invariants:
//! - Runs once, in the constructor, before `main` and before any sandbox the program may set
//!   up later; it may allocate (through glibc, see `rust_alloc`) and open descriptors, and
//!   closes every descriptor it opened before it returns. No thread is started.
//! - The Hello is best-effort and never blocks: a non-blocking connect (which fails at once
//!   when no agent listens or its backlog is full), a peer-credential check (the agent must be
//!   this user or root), one non-blocking send, close. Whatever fails, the program runs on
//!   unchanged; an agent started later adopts the process through its anchor instead.
//! - Diagnostics go to fd 2 with raw `write`, and only when `KSMPLUS_LOG` is set.
//! - Once the Hello reached an agent, and only then, the constructor registers a
//!   `pthread_atfork` prepare handler ([`chan::before_fork`]): a fork waits (bounded) for the
//!   agent's verdict and runs the batch posted with it, so children inherit a learned fork
//!   server's merge-any. Registering allocates nothing (see `wait_for_verdict_before_forks`).
//! - Under Yama `ptrace_scope` 1 (Ubuntu's default) the agent, not being an ancestor, could not
//!   open `/proc/PID/mem`: the constructor names the agent it reached (its pid from
//!   `SO_PEERCRED`) with `PR_SET_PTRACER`, and a forked child does the same (the relation is
//!   not inherited). Never under a seccomp filter (Chromium's kills on that `prctl`), never
//!   under other scopes, never for anyone but the verified agent.

use crate::chan;
use crate::ptracer::{self, names_ptracer, set_ptracer};
use crate::sys::{self, PAGE};
use crate::wake;
use crate::{CACHING, MADVISE_ALL, MIN_REGION, REAL_USABLE_SIZE, THRESHOLD};
use core::sync::atomic::{AtomicBool, Ordering::*};
use ksmplus_common::channel::flag;
use ksmplus_common::{names, Hello, Message};

static LOG: AtomicBool = AtomicBool::new(false);

fn log(msg: &str) {
    if LOG.load(Relaxed) {
        let line = format!("ksmplus[{}]: {msg}\n", sys::getpid());
        // SAFETY: writing a live buffer to fd 2; a short or failed write only loses a diagnostic.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
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

fn flag_set(name: &core::ffi::CStr) -> bool {
    env(name).is_some_and(|v| v != "0" && !v.is_empty())
}

/// Library constructor.
pub fn init() {
    if flag_set(c"KSMPLUS_DISABLE") {
        return;
    }
    LOG.store(flag_set(c"KSMPLUS_LOG"), Relaxed);
    // SAFETY: sysconf has no preconditions.
    if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != PAGE as libc::c_long {
        log("page size is not 4096; staying disabled");
        return;
    }
    let min_region = match env(c"KSMPLUS_MIN_REGION") {
        None => 64 * 1024,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= PAGE => n,
            _ => {
                log(&format!(
                    "KSMPLUS_MIN_REGION={v:?} is not a size in bytes >= {PAGE}; using 65536"
                ));
                64 * 1024
            }
        },
    };
    let signal = match env(c"KSMPLUS_SIGNAL") {
        None => libc::SIGURG,
        Some(v) => match v.trim().parse::<i32>() {
            Ok(n) if (0..65).contains(&n) => n,
            _ => {
                log(&format!(
                    "KSMPLUS_SIGNAL={v:?} is not a signal number; using SIGURG"
                ));
                libc::SIGURG
            }
        },
    };
    let comm = std::fs::read_to_string("/proc/self/comm")
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default();
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A seccomp filter this process was exec'd with is a launcher's (bubblewrap, flatpak,
    // systemd): the agent may advise under it, unless the program adds one of its own.
    // Read once: the Yama check below uses it too (nothing installs a filter before main).
    let status = std::fs::read_to_string("/proc/self/status").ok();
    if let Some(st) = &status {
        crate::filter::note_inherited(crate::filter::inherited_filters(st));
    }
    let madvise_all = flag_set(c"KSMPLUS_MADVISE_ALL");
    // SAFETY: dlsym with a static name; RTLD_NEXT finds glibc's definition behind ours.
    let real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) };
    REAL_USABLE_SIZE.store(real as usize, Release);
    MIN_REGION.store(min_region, Relaxed);
    let socket: String = env(c"KSMPLUS_SOCKET")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            ksmplus_common::default_socket_path(env(c"XDG_RUNTIME_DIR").as_deref(), uid)
                .to_string_lossy()
                .into_owned()
        });
    chan::SOCKET_HASH.store(
        ksmplus_common::channel::socket_hash(socket.as_bytes()),
        Relaxed,
    );
    if madvise_all && names::excluded_by_default(&comm, &exe) {
        // The exclusion list holds in every mode: no agent decides here, so the shim does.
        log(&format!("{comm} is excluded: KSMPLUS_MADVISE_ALL ignored"));
        let ch = chan::setup(min_region, false);
        if ch.is_some() {
            chan::set_dormant();
        }
        return;
    }
    MADVISE_ALL.store(madvise_all, Relaxed);
    let Some((channel, doorbell, nonce)) = chan::setup(min_region, madvise_all) else {
        log("the kernel cannot wipe a page on fork (MADV_WIPEONFORK); no agent can track this process");
        CACHING.store(true, Release);
        THRESHOLD.store(min_region, Release);
        return;
    };
    CACHING.store(true, Release);
    THRESHOLD.store(min_region, Release);
    if signal != 0 && !wake::install(signal) {
        log(&format!(
            "signal {signal} is not at its default disposition; no wake-ups"
        ));
    }
    if madvise_all {
        return;
    }
    let hello = Hello {
        pid: sys::getpid(),
        // SAFETY: these getters have no preconditions.
        ppid: unsafe { libc::getppid() } as u32,
        // SAFETY: as above.
        uid: unsafe { libc::getuid() },
        page_size: PAGE as u32,
        min_region: min_region as u64,
        comm,
        exe,
        channel,
        doorbell,
        nonce,
        flags: if madvise_all { flag::MADVISE_ALL } else { 0 },
    };
    match say_hello(&socket, &hello) {
        Ok(agent) => {
            allow_agent(agent, status.as_deref());
            wait_for_verdict_before_forks();
        }
        Err(why) => log(&format!("no agent reached at {socket}: {why}")),
    }
}

/// The `pthread_atfork` prepare handler: see [`chan::before_fork`].
unsafe extern "C" fn prepare_fork() {
    chan::before_fork();
}

/// An agent has our Hello: a fork from now on first waits (bounded) for its verdict and runs
/// the batch posted with it, so the children inherit a learned fork server's merge-any.
///
/// `pthread_atfork` is glibc's `libc_nonshared.a` wrapper around `__register_atfork` (linked
/// into this library, with our `__dso_handle`), which takes glibc's `atfork_lock` and stores
/// the handler in a dynarray whose first 48 entries are static storage (as read in glibc
/// 2.36's `posix/register-atfork.c`; the same since 2.28): no allocation unless the process
/// registered 48 handlers before us, and then a `malloc` that our hook serves like any other
/// (it takes no lock and never forks). glibc's `fork` runs the prepare handlers first, before
/// it takes stdio's and malloc's locks, and releases `atfork_lock` around each.
fn wait_for_verdict_before_forks() {
    chan::hello_reached_agent();
    // SAFETY: registers a handler that never unwinds and is async-signal-safe (a fork from a
    // signal handler runs it too); it stays valid for the life of the process (the shim is
    // never unloaded: an LD_PRELOAD library).
    let r = unsafe { sys::pthread_atfork(Some(prepare_fork), None, None) };
    if r != 0 {
        log(&format!(
            "pthread_atfork failed ({r}): forks do not wait for the verdict"
        ));
    }
}

/// Lets the agent read this process under Yama scope 1 (see the module invariants).
fn allow_agent(agent: i32, status: Option<&str>) {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok();
    if agent <= 0 || scope.is_none() {
        return;
    }
    if !names_ptracer(scope.as_deref(), status) {
        log("Yama: the agent is not named as ptracer (scope is not 1, or a seccomp filter)");
        return;
    }
    if set_ptracer(agent) {
        ptracer::PTRACER.store(agent, Relaxed);
    }
}

/// Owns a descriptor for the length of the constructor.
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor was opened by this constructor and is closed exactly once.
        unsafe { libc::close(self.0) };
    }
}

fn last_error() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Connects, checks the agent's uid, sends the Hello and closes; returns the agent's pid. Never
/// blocks.
fn say_hello(path: &str, hello: &Hello) -> Result<i32, String> {
    // SAFETY: a sockaddr_un is plain data; zeroed is valid.
    let mut addr: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err("socket path too long".into());
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() has no memory preconditions.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(last_error());
    }
    let fd = Fd(fd);
    // SAFETY: addr is a valid sockaddr_un of the size given.
    let r = unsafe {
        libc::connect(
            fd.0,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            core::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last_error());
    }
    // The shim stays on raw libc (ksmplus-common's peer_cred is nix, feature `sys`).
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(last_error());
    }
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let (peer_pid, peer_uid) = (cred.pid, cred.uid);
    if peer_uid != me && peer_uid != 0 {
        return Err(format!("refusing a socket served by uid {peer_uid}"));
    }
    let frame = Message::Hello(hello.clone()).to_frame();
    // SAFETY: send reads frame.len() bytes from a live buffer.
    let n = unsafe {
        libc::send(
            fd.0,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n != frame.len() as isize {
        return Err(if n < 0 {
            last_error()
        } else {
            "short send".into()
        });
    }
    log(&format!("said Hello to the agent at {path}"));
    Ok(peer_pid)
}
