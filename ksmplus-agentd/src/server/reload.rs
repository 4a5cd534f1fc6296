//! The policy, reloaded: tracked processes it no longer names get their marks taken back and
//! go dormant; dormant ones it now names are tracked.

use super::*;

impl Agent {
    /// Reloads the policy file. On error the old policy stays in force. Tracked processes the
    /// policy no longer names get their marks taken back and go dormant; dormant ones it now
    /// names are tracked.
    pub fn reload(&mut self) -> Result<(), String> {
        let p = Policy::load(&self.opts.policy_path).map_err(|e| e.to_string())?;
        self.policy = p;
        self.engine.set_config(Config::from_policy(&self.policy));
        self.stats.reloads += 1;
        if self.uid == 0 {
            self.tunables.apply(&self.policy.ksmd);
        }
        let now = self.now_ms();
        let stop: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| self.policy.decide(&c.comm, &c.exe) != Decision::Track)
            .map(|(id, _)| *id)
            .collect();
        for id in stop {
            let marked = self.engine.marked(id);
            if let Some(c) = self.clients.get_mut(&id) {
                for (start, len) in marked {
                    c.queue.push_back((
                        Item::Engine(0),
                        channel::Command {
                            op: channel::op::UNMERGEABLE,
                            start,
                            len,
                        },
                    ));
                }
                if c.merge_any {
                    c.queue_op(Item::MergeAny(false));
                }
                let _ = c.post(now);
                let _ = c.set_verdict(verdict::IGNORE);
                if let Some(snap) = c.refresh().cloned() {
                    let _ = crate::wake::wake(&self.opts.root, c.pid(), &snap);
                }
                self.dormant.insert(
                    c.pid(),
                    Dormant {
                        channel: c.channel,
                        nonce: c.nonce,
                        comm: c.comm.clone(),
                        exe: c.exe.clone(),
                    },
                );
            }
            self.remove_client(id, "no longer in the policy");
        }
        let start: Vec<(u32, Dormant)> = self
            .dormant
            .iter()
            .filter(|(_, d)| self.policy.decide(&d.comm, &d.exe) == Decision::Track)
            .map(|(p, d)| (*p, d.clone()))
            .collect();
        for (pid, d) in start {
            self.dormant.remove(&pid);
            let id = self.new_id();
            if let Ok((c, maps)) = Client::adopt(&self.root(), id, pid, d.channel, Some(d.nonce)) {
                self.admit(c, &maps);
            }
        }
        self.forget_gone();
        info!("policy reloaded from {}", self.opts.policy_path.display());
        Ok(())
    }

    /// `(tracked, dormant)` processes.
    pub fn process_counts(&self) -> (u64, u64) {
        (self.clients.len() as u64, self.dormant.len() as u64)
    }
}
