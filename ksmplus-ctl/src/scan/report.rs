//! The scan's report, as text and as JSON.
use super::Scanner;
use serde_json::{json, Value};

impl Scanner {
    fn comm_of(&self, pid: u32) -> &str {
        self.procs
            .iter()
            .find(|p| p.pid == pid)
            .map(|p| p.comm.as_str())
            .unwrap_or("?")
    }

    /// The report as JSON.
    pub fn to_json(&self, top: usize) -> Value {
        let ps = self.page_size as u64;
        let t = self.totals();
        let secs = self.elapsed().as_secs_f64();
        let procs: Vec<Value> = self
            .procs
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
                v["saving_pages"] = json!(p.saving());
                v["saving_bytes"] = json!(p.saving() * ps);
                v
            })
            .collect();
        let top: Vec<Value> = self
            .top(top)
            .into_iter()
            .map(|(h, e)| {
                json!({
                    "hash": format!("{h:016x}"),
                    "count": e.count,
                    "bytes": e.count * ps,
                    "processes": e.procs,
                    "class": e.class.kind(),
                    "period": e.class.period(),
                    "pattern": e.class.pattern_hex(),
                    "first_pid": e.first_pid,
                    "first_addr": format!("{:#x}", e.first_addr),
                })
            })
            .collect();
        json!({
            "version": ksmplus_common::status::REPLY_VERSION,
            // Nothing scanned is exit status 1.
            "ok": !self.procs.is_empty(),
            "page_size": ps,
            "processes": procs,
            "skipped": self.skipped,
            "totals": t,
            "saving_bytes": t.saving_pages * ps,
            "top": top,
            "bytes_read": self.bytes_read,
            "seconds": secs,
            "mib_per_s": mib_per_s(self.bytes_read, secs),
            "zero_page_known": self.zero_pfn.is_some(),
        })
    }

    /// The report as text.
    pub fn to_text(&self, top: usize) -> String {
        use std::fmt::Write;
        let ps = self.page_size as u64;
        let mib = |pages: u64| pages as f64 * ps as f64 / (1 << 20) as f64;
        let t = self.totals();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>7}  {:<15}  {:>9}  {:>9}  {:>9}  {:>9}  {:>13}",
            "PID", "COMM", "PAGES", "UNIQUE", "DUPLICATE", "DISTINCT", "SAVING"
        );
        for p in &self.procs {
            let _ = writeln!(
                s,
                "{:>7}  {:<15}  {:>9}  {:>9}  {:>9}  {:>9}  {:>8.1} MiB{}",
                p.pid,
                p.comm,
                p.pages,
                p.unique,
                p.duplicate,
                p.distinct,
                mib(p.saving()),
                p.note
                    .as_deref()
                    .map(|n| format!("  ({n})"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            s,
            "{:>7}  {:<15}  {:>9}  {:>9}  {:>9}  {:>9}  {:>8.1} MiB",
            "ALL",
            format!("{} processes", t.processes),
            t.pages,
            t.unique,
            t.duplicate,
            t.distinct,
            mib(t.saving_pages)
        );
        let _ = writeln!(
            s,
            "saving KSM could give: {} pages ({:.1} MiB, {:.1}% of {:.1} MiB scanned); {} pages of it \
             only by merging across processes; {} contents appear in more than one process",
            t.saving_pages,
            mib(t.saving_pages),
            if t.pages > 0 {
                100.0 * t.saving_pages as f64 / t.pages as f64
            } else {
                0.0
            },
            mib(t.pages),
            t.cross_process_saving_pages,
            t.shared_contents
        );
        let _ = writeln!(
            s,
            "duplicate contents by count: {} seen 2-9 times, {} seen 10-99 times, {} seen 100+ times",
            t.histogram[0], t.histogram[1], t.histogram[2]
        );
        if t.zero_page_mapped > 0 {
            let _ = writeln!(
                s,
                "{} pages map the kernel's shared zero page (already free, not counted above)",
                t.zero_page_mapped
            );
        }
        let tops = self.top(top);
        if !tops.is_empty() {
            let _ = writeln!(s, "top {} duplicate contents:", tops.len());
            let _ = writeln!(
                s,
                "{:>3}  {:>9}  {:>10}  {:>5}  {:<40}  FIRST SEEN",
                "#", "COUNT", "SIZE", "PROCS", "CLASS"
            );
            for (i, (_, e)) in tops.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "{:>3}  {:>9}  {:>6.1} MiB  {:>5}  {:<40}  pid {} ({}) {:#x}",
                    i + 1,
                    e.count,
                    mib(e.count),
                    e.procs,
                    e.class.describe(),
                    e.first_pid,
                    self.comm_of(e.first_pid),
                    e.first_addr
                );
            }
        }
        for sk in &self.skipped {
            let _ = writeln!(s, "skipped pid {} ({}): {}", sk.pid, sk.comm, sk.reason);
        }
        let secs = self.elapsed().as_secs_f64();
        let _ = writeln!(
            s,
            "read {:.1} MiB in {:.2} s: {:.0} MiB/s; table: {} distinct contents",
            self.bytes_read as f64 / (1 << 20) as f64,
            secs,
            mib_per_s(self.bytes_read, secs),
            self.map.len()
        );
        s
    }
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / (1 << 20) as f64 / secs
    } else {
        0.0
    }
}
