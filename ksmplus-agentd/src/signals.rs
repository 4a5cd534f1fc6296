//! SIGHUP (reload) and SIGTERM/SIGINT (clean exit) into the event loop, through a self-pipe:
//! the handler writes the signal's number, one byte, to a non-blocking pipe whose read end the
//! loop polls.
//!
//! Invariants:
//! - The handler only loads an atomic and calls write(2) (async-signal-safe); a full pipe drops
//!   the byte, and the loop still wakes for the bytes already in it.
//! - Both ends are `O_CLOEXEC`: programs the agent might start never inherit them.
//! - One [`SignalPipe`] per process (the handler's write end is a static); dropping it detaches
//!   the handler from the pipe before the descriptors close.
use nix::fcntl::OFlag;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The write end for the handler; -1 when no pipe is installed.
static WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: fd is the write end SignalPipe owns; it stays open until Drop has reset
        // WRITE_FD to -1.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = nix::unistd::write(fd, &[sig as u8]);
    }
}

/// The pipe the handlers write to; its read end is for the event loop.
pub struct SignalPipe {
    read: OwnedFd,
    _write: OwnedFd,
}

impl SignalPipe {
    /// Creates the pipe and routes `signals` to it (`SA_RESTART`: no system call of the agent
    /// sees EINTR because of them).
    pub fn install(signals: &[Signal]) -> nix::Result<SignalPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        WRITE_FD.store(write.as_raw_fd(), Ordering::Relaxed);
        let pipe = SignalPipe {
            read,
            _write: write,
        };
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for &sig in signals {
            // SAFETY: on_signal is async-signal-safe (an atomic load and write(2)).
            unsafe { sigaction(sig, &action) }?;
        }
        Ok(pipe)
    }

    /// The read end, to register with the event loop.
    pub fn raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// The signals received since the last call, oldest first (unknown bytes are skipped).
    pub fn drain(&self) -> Vec<Signal> {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match nix::unistd::read(self.read.as_fd(), &mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend(
                    buf[..n]
                        .iter()
                        .filter_map(|&b| Signal::try_from(i32::from(b)).ok()),
                ),
            }
        }
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        WRITE_FD.store(-1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SIGHUP raised at this process arrives through the pipe, once, and only once.
    #[test]
    fn a_raised_signal_comes_out_of_the_pipe() {
        let pipe = SignalPipe::install(&[Signal::SIGHUP]).unwrap();
        assert!(pipe.drain().is_empty());
        nix::sys::signal::raise(Signal::SIGHUP).unwrap();
        assert_eq!(pipe.drain(), vec![Signal::SIGHUP]);
        assert!(pipe.drain().is_empty());
        drop(pipe);
        assert_eq!(WRITE_FD.load(Ordering::Relaxed), -1);
    }
}
