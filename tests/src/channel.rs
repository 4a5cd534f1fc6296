//! A test's view of a shim's channel page, through `/proc/PID/mem` — what the agent sees and
//! writes, without the agent: counters, `map_gen`, mremap records, verdicts, command batches.
use ksmplus_agentd::procfs::{self, ProcHandle};
use ksmplus_common::channel::{self, offsets, Command, Snapshot};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct ShimChannel {
    pub pid: u32,
    pub addr: u64,
    pub doorbell: u64,
    h: ProcHandle,
}

impl ShimChannel {
    /// The channel of `pid`, found through the shim's anchor, if it has an initialised one.
    pub fn of(pid: u32) -> Option<ShimChannel> {
        let h = ProcHandle::open(Path::new("/"), pid).ok()?;
        let maps = procfs::read_maps(Path::new("/"), pid).ok()?;
        let (addr, doorbell) = procfs::find_channel(&h, &maps)?;
        let c = ShimChannel {
            pid,
            addr,
            doorbell,
            h,
        };
        c.snapshot().valid().then_some(c)
    }

    /// [`ShimChannel::of`], waited for with a deadline.
    pub fn wait(pid: u32, timeout: Duration) -> ShimChannel {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = ShimChannel::of(pid) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "no ksmplus channel in pid {pid} after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.h.snapshot(self.addr).unwrap_or_default()
    }

    /// Re-evaluates `f` on fresh snapshots until it returns `Some`, panicking after `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Snapshot) -> Option<T>,
    ) -> T {
        crate::poll_until(what, timeout, Duration::from_millis(5), || {
            let s = self.snapshot();
            f(&s).ok_or_else(|| format!("channel: {s:?}"))
        })
    }

    pub fn set_verdict(&self, v: u32) {
        self.h
            .write(self.addr + offsets::VERDICT as u64, &v.to_ne_bytes())
            .unwrap();
    }

    /// Writes a batch; returns its sequence number.
    pub fn post(&self, cmds: &[Command]) -> u64 {
        let s = self.snapshot();
        let seq = s.cmd_seq.max(s.done_seq) + 1;
        self.h
            .write(
                self.addr + offsets::CMDS as u64,
                &channel::encode_cmds(cmds),
            )
            .unwrap();
        self.h
            .write(
                self.addr + offsets::N_CMDS as u64,
                &(cmds.len() as u32).to_ne_bytes(),
            )
            .unwrap();
        self.h
            .write(self.addr + offsets::CMD_SEQ as u64, &seq.to_ne_bytes())
            .unwrap();
        seq
    }

    /// Waits until batch `seq` is executed and returns its results. With `wake`, the shim's
    /// wake-up signal is sent to the process first (as the agent does for an idle program).
    pub fn wait_done(&self, seq: u64, timeout: Duration, wake: bool) -> Vec<i32> {
        if wake {
            let s = self.snapshot();
            assert_ne!(s.signal, 0, "the shim has no wake-up signal");
            // SAFETY: kill with a pid and a signal number.
            unsafe { libc::kill(self.pid as i32, s.signal as i32) };
        }
        self.wait_for(&format!("batch {seq} executed"), timeout, |s| {
            (s.done_seq == seq).then(|| s.results.clone())
        })
    }

    /// The doorbell's ring count.
    pub fn rings(&self) -> u64 {
        let mut b = [0u8; 8];
        self.h
            .read(self.doorbell + offsets::DOORBELL_RINGS as u64, &mut b)
            .unwrap();
        u64::from_ne_bytes(b)
    }

    pub fn handle(&self) -> &ProcHandle {
        &self.h
    }
}
